package collector

import (
	"errors"
	"fmt"
	"os"
	"strings"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// Mode selects how programs are attached to interfaces.
type Mode string

const (
	// ModeAuto uses TCX where the kernel has it (6.6+) and clsact otherwise.
	ModeAuto Mode = "auto"
	// ModeTCX attaches with TCX links (bpf_link, kernel 6.6+).
	ModeTCX Mode = "tcx"
	// ModeClsact attaches cls_bpf filters to a clsact qdisc via netlink.
	ModeClsact Mode = "clsact"
)

// ParseMode parses a --attach-mode value.
func ParseMode(s string) (Mode, error) {
	switch m := Mode(strings.ToLower(s)); m {
	case ModeAuto, ModeTCX, ModeClsact:
		return m, nil
	}
	return "", fmt.Errorf("unknown attach mode %q (want auto, tcx or clsact)", s)
}

// clsact filter identity: nsflow's filters are found and removed by these.
const (
	clsactPriority = 1      // first on the hook: counts what later filters drop
	clsactHandle   = 0x6e73 // "ns"
	clsactName     = "nsflow"
)

// attachment is the pair of hooks (ingress, egress) nsflow holds on one
// interface. close detaches both; it is safe on an interface that is gone.
// release lets go of them but leaves them attached (and pinned), for the
// next nsflow process to adopt (--pin).
type attachment interface {
	close() error
	release() error
}

// hookPrograms are the programs for the two hooks of one interface: its
// stubs (bpf.Objects.Stub), which count into the interface's own slots. The
// kernel holds them while they are attached: the caller closes its fds
// after attach.
type hookPrograms struct{ ingress, egress *ebpf.Program }

// attacher attaches the two programs to one interface of a namespace.
type attacher interface {
	attach(ns netns.NsHandle, nl *netlink.Handle, inode uint64, ifindex int, progs hookPrograms) (attachment, error)
}

type tcxAttacher struct {
	pins *pinnedLinks // nil without --pin
}

type tcxAttachment struct {
	links []link.Link
	pins  []string
}

// faultNoTCX makes every TCX attach fail as on a kernel without TCX
// (NSFLOW_FAULT_NO_TCX=1), to test the clsact fallback on kernels that have it.
var faultNoTCX = os.Getenv("NSFLOW_FAULT_NO_TCX") == "1"

func (a *tcxAttacher) attach(ns netns.NsHandle, _ *netlink.Handle, inode uint64, ifindex int, progs hookPrograms) (attachment, error) {
	if faultNoTCX {
		return nil, fmt.Errorf("tcx (fault injected by NSFLOW_FAULT_NO_TCX): %w", ebpf.ErrNotSupported)
	}
	att := &tcxAttachment{}
	hooks := []struct {
		prog *ebpf.Program
		typ  ebpf.AttachType
		name string
	}{{progs.ingress, ebpf.AttachTCXIngress, "ingress"}, {progs.egress, ebpf.AttachTCXEgress, "egress"}}
	// ifindex is relative to the calling thread's namespace: attach from inside.
	err := inNetns(ns, func() error {
		for _, h := range hooks {
			key := linkKey(inode, ifindex, h.name)
			// A link a previous nsflow process left pinned: swap the new
			// program in atomically, so that no packet goes uncounted.
			if l := a.pins.adopt(key, h.prog); l != nil {
				att.links = append(att.links, l)
				att.pins = append(att.pins, a.pins.path(key))
				continue
			}
			l, err := link.AttachTCX(link.TCXOptions{
				Interface: ifindex,
				Program:   h.prog,
				Attach:    h.typ,
				Anchor:    link.Head(), // first: counts what later programs drop
			})
			if err != nil {
				return fmt.Errorf("tcx %s: %w", h.name, err)
			}
			att.links = append(att.links, l)
			if a.pins != nil {
				p := a.pins.path(key)
				if err := l.Pin(p); err != nil {
					return fmt.Errorf("pin tcx %s link: %w", h.name, err)
				}
				att.pins = append(att.pins, p)
			}
		}
		return nil
	})
	if err != nil {
		_ = att.close()
		return nil, err
	}
	return att, nil
}

func (a *tcxAttachment) close() error {
	var errs []error
	for _, l := range a.links {
		if err := l.Unpin(); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, err)
		}
		errs = append(errs, l.Close())
	}
	a.links = nil
	return errors.Join(errs...)
}

func (a *tcxAttachment) release() error {
	var errs []error
	for _, l := range a.links {
		errs = append(errs, l.Close()) // the pin keeps the link attached
	}
	a.links = nil
	return errors.Join(errs...)
}

type clsactAttacher struct {
	keep bool // --pin: filters stay on exit, for the next process
}

type clsactAttachment struct {
	nl        *netlink.Handle
	ifindex   int
	ownsQdisc bool
	keep      bool
	filters   []*netlink.BpfFilter
}

func clsactQdisc(ifindex int) *netlink.GenericQdisc {
	return &netlink.GenericQdisc{
		QdiscAttrs: netlink.QdiscAttrs{
			LinkIndex: ifindex,
			Handle:    netlink.MakeHandle(0xffff, 0),
			Parent:    netlink.HANDLE_CLSACT,
		},
		QdiscType: "clsact",
	}
}

func (a *clsactAttacher) attach(_ netns.NsHandle, nl *netlink.Handle, _ uint64, ifindex int, progs hookPrograms) (attachment, error) {
	att := &clsactAttachment{nl: nl, ifindex: ifindex, keep: a.keep}
	// Another tool's clsact qdisc is shared, never replaced or removed.
	switch err := nl.QdiscAdd(clsactQdisc(ifindex)); {
	case err == nil:
		att.ownsQdisc = true
	case errors.Is(err, unix.EEXIST):
	default:
		return nil, fmt.Errorf("add clsact qdisc: %w", err)
	}
	for _, h := range []struct {
		prog   *ebpf.Program
		parent uint32
		name   string
	}{{progs.ingress, netlink.HANDLE_MIN_INGRESS, "ingress"}, {progs.egress, netlink.HANDLE_MIN_EGRESS, "egress"}} {
		f := &netlink.BpfFilter{
			FilterAttrs: netlink.FilterAttrs{
				LinkIndex: ifindex,
				Parent:    h.parent,
				Handle:    clsactHandle,
				Priority:  clsactPriority,
				Protocol:  unix.ETH_P_ALL,
			},
			Fd:           h.prog.FD(),
			Name:         clsactName,
			DirectAction: true,
		}
		// Replace: a filter a previous nsflow process left (--pin) gets the
		// new program atomically; otherwise the filter is created.
		if err := nl.FilterReplace(f); err != nil {
			_ = att.close()
			return nil, fmt.Errorf("add cls_bpf filter %s: %w", h.name, err)
		}
		att.filters = append(att.filters, f)
	}
	return att, nil
}

func (a *clsactAttachment) close() error {
	var errs []error
	for _, f := range a.filters {
		if err := a.nl.FilterDel(f); err != nil && !gone(err) {
			errs = append(errs, fmt.Errorf("delete cls_bpf filter: %w", err))
		}
	}
	a.filters = nil
	if a.ownsQdisc && a.qdiscUnused() {
		if err := a.nl.QdiscDel(clsactQdisc(a.ifindex)); err != nil && !gone(err) {
			errs = append(errs, fmt.Errorf("delete clsact qdisc: %w", err))
		}
	}
	return errors.Join(errs...)
}

func (a *clsactAttachment) release() error {
	if a.keep {
		a.filters = nil // they stay in the kernel, holding the program
		return nil
	}
	return a.close()
}

// qdiscUnused reports whether no other filter sits on the clsact qdisc that
// nsflow created (another tool may have added one meanwhile).
func (a *clsactAttachment) qdiscUnused() bool {
	l, err := a.nl.LinkByIndex(a.ifindex)
	if err != nil {
		return false
	}
	for _, parent := range []uint32{netlink.HANDLE_MIN_INGRESS, netlink.HANDLE_MIN_EGRESS} {
		fs, err := a.nl.FilterList(l, parent)
		if err != nil || len(fs) > 0 {
			return false
		}
	}
	return true
}

// gone reports whether err says the interface or the object on it no longer
// exists: detaching from a vanished interface is not a failure.
func gone(err error) bool {
	return errors.Is(err, unix.ENODEV) || errors.Is(err, unix.ENOENT) || errors.Is(err, unix.EINVAL)
}
