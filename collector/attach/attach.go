// Package attach puts a pair of TC programs (ingress, egress) on one
// interface of a network namespace and takes them off again: with TCX links
// (bpf_link, kernel 6.6+), optionally pinned so that they outlive the
// process, or with cls_bpf filters on a clsact qdisc. It also tells which
// interfaces hold nsflow programs (Query), for `nsflow list`.
package attach

import (
	"errors"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/nsflow/nsflow/collector/nsenter"
)

// Mode selects how programs are attached to interfaces.
type Mode string

const (
	// ModeAuto uses TCX in the host namespace and clsact in every other
	// (Mode.For), and clsact wherever the kernel has no TCX (before 6.6).
	ModeAuto Mode = "auto"
	// ModeTCX attaches with TCX links (bpf_link, kernel 6.6+).
	ModeTCX Mode = "tcx"
	// ModeClsact attaches cls_bpf filters to a clsact qdisc via netlink.
	ModeClsact Mode = "clsact"
)

// For returns the mechanism m uses for one namespace: host is the host's
// own namespace. ModeTCX and ModeClsact are the same everywhere; ModeAuto
// is TCX in the host namespace and clsact elsewhere (a caller falls back to
// clsact where the kernel has no TCX).
//
// Why: a TCX attach swaps the hook's bpf_mprog_entry and waits a normal
// RCU grace period under RTNL before it returns (kernel/bpf/tcx.c
// tcx_link_attach → include/net/tcx.h tcx_entry_sync → synchronize_rcu),
// 15–19 ms per hook at this VM's default (non-expedited) grace periods, one
// hook after another since RTNL serializes them. A cls_bpf filter changes
// a hook's filter chain head through mini_qdisc_pair_swap
// (net/sched/sch_generic.c), which on a non-RT kernel waits only when the
// miniq it is about to reuse was active less than a grace period ago, and
// then with synchronize_rcu_expedited; clsact_init (net/sched/sch_ingress.c)
// waits for none. A pod namespace gains nothing from TCX's head-of-chain
// position over clsact (nothing else attaches there as a rule), while the
// host's interfaces are where other tools' TCX programs sit and are few, so
// the host keeps TCX (BenchmarkAttach, docs/BENCHMARKS.md "Scale").
func (m Mode) For(host bool) Mode {
	if m != ModeAuto {
		return m
	}
	if host {
		return ModeTCX
	}
	return ModeClsact
}

// ParseMode parses a --attach-mode value.
func ParseMode(s string) (Mode, error) {
	switch m := Mode(strings.ToLower(s)); m {
	case ModeAuto, ModeTCX, ModeClsact:
		return m, nil
	}
	return "", fmt.Errorf("unknown attach mode %q (want auto, tcx or clsact)", s)
}

// clsactPriority is the priority of nsflow's cls_bpf filters: first on the
// hook, it counts what later filters drop. Every nsflow process's filters
// share it, each with a handle and a name of its own (owner.go): the
// programs return TC_ACT_UNSPEC, which with direct-action makes cls_bpf
// run the next filter of the priority, then the next priority, so that all
// of them see every packet.
const clsactPriority = 1

// Attachment is the pair of hooks (ingress, egress) nsflow holds on one
// interface. Close detaches both; it is safe on an interface that is gone.
// Release lets go of them but leaves them attached (and pinned), for the
// next nsflow process to adopt (--pin).
type Attachment interface {
	Close() error
	Release() error
}

// Programs are the programs for the two hooks of one interface: its stubs
// (bpf.Objects.Stub), which count into the interface's own slots. The
// kernel holds them while they are attached: the caller closes its fds
// after Attach.
type Programs struct{ Ingress, Egress *ebpf.Program }

// Attacher attaches the two programs to one interface of a namespace: ns
// is the namespace, nl a netlink handle in it, cookie its cookie
// (SO_NETNS_COOKIE: never reused within a boot, it names the pins),
// ifindex the interface's index in it.
type Attacher interface {
	Attach(ns netns.NsHandle, nl *netlink.Handle, cookie uint64, ifindex int, progs Programs) (Attachment, error)
}

// NewTCX returns an Attacher that attaches TCX links at the head of each
// hook; with pins (--pin) it pins them there and first adopts the links a
// previous process left pinned. An attach fails with an error matching
// ebpf.ErrNotSupported on a kernel without TCX.
func NewTCX(pins *Pins) Attacher { return &tcxAttacher{pins: pins} }

// NewClsact returns an Attacher that adds cls_bpf filters to a clsact
// qdisc (created if absent), named after owner: a pinned owner's stay in
// the kernel on Release, for the next process (--pin), and are adopted
// from the previous one. Filters of dead nsflow processes on the
// interfaces it attaches to are removed.
func NewClsact(owner *Owner) Attacher { return &clsactAttacher{owner: owner} }

type tcxAttacher struct {
	pins *Pins // nil without --pin
}

type tcxAttachment struct {
	links []link.Link
	pins  []string
}

// faultNoTCX makes every TCX attach fail as on a kernel without TCX
// (NSFLOW_FAULT_NO_TCX=1), to test the clsact fallback on kernels that have it.
var faultNoTCX = os.Getenv("NSFLOW_FAULT_NO_TCX") == "1"

func (a *tcxAttacher) Attach(ns netns.NsHandle, _ *netlink.Handle, cookie uint64, ifindex int, progs Programs) (Attachment, error) {
	if faultNoTCX {
		return nil, fmt.Errorf("tcx (fault injected by NSFLOW_FAULT_NO_TCX): %w", ebpf.ErrNotSupported)
	}
	att := &tcxAttachment{}
	hooks := []struct {
		prog *ebpf.Program
		typ  ebpf.AttachType
		name string
	}{{progs.Ingress, ebpf.AttachTCXIngress, "ingress"}, {progs.Egress, ebpf.AttachTCXEgress, "egress"}}
	// ifindex is relative to the calling thread's namespace: attach from inside.
	err := nsenter.Do(ns, func() error {
		for _, h := range hooks {
			key := linkKey(cookie, ifindex, h.name)
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
		_ = att.Close()
		return nil, err
	}
	return att, nil
}

func (a *tcxAttachment) Close() error {
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

func (a *tcxAttachment) Release() error {
	var errs []error
	for _, l := range a.links {
		errs = append(errs, l.Close()) // the pin keeps the link attached
	}
	a.links = nil
	return errors.Join(errs...)
}

type clsactAttacher struct {
	owner *Owner
}

type clsactAttachment struct {
	ns        netns.NsHandle // the interface's namespace (its qdisc lock)
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

func (a *clsactAttacher) Attach(ns netns.NsHandle, nl *netlink.Handle, _ uint64, ifindex int, progs Programs) (Attachment, error) {
	att := &clsactAttachment{ns: ns, nl: nl, ifindex: ifindex, keep: a.owner.pinned}
	// Another tool's clsact qdisc is shared, never replaced or removed.
	// A qdisc this call creates is deleted by no other nsflow process
	// (only its creator deletes one); on one that exists, the qdisc lock
	// is held until the filters are on, so that another nsflow process
	// that created it does not delete it meanwhile (Close). Without the
	// lock (a squatter held its name past attachLockWait) no nsflow
	// deletes the qdisc either.
	fresh := false
	unlock := func() {}
	defer func() { unlock() }()
	err := nl.QdiscAdd(clsactQdisc(ifindex))
	if errors.Is(err, unix.EEXIST) {
		unlock, _ = lockQdisc(ns, ifindex, attachLockWait)
		err = nl.QdiscAdd(clsactQdisc(ifindex)) // deleted before the lock came
	}
	switch {
	case err == nil:
		att.ownsQdisc, fresh = true, true
	case errors.Is(err, unix.EEXIST):
	default:
		return nil, fmt.Errorf("add clsact qdisc: %w", err)
	}
	link := &netlink.Dummy{LinkAttrs: netlink.LinkAttrs{Index: ifindex}}
	hooks := [2]struct {
		prog   *ebpf.Program
		parent uint32
		name   string
		adopt  *netlink.BpfFilter
	}{{progs.Ingress, netlink.HANDLE_MIN_INGRESS, "ingress", nil}, {progs.Egress, netlink.HANDLE_MIN_EGRESS, "egress", nil}}
	// A qdisc this call created holds no filter: nothing to adopt or sweep
	// (no dump). On an existing one, both hooks are read and swept first, so
	// that the two filters are added back to back: the window in which one
	// direction is counted and the other not is one netlink round trip.
	if !fresh {
		for i := range hooks {
			adopt, err := a.prepare(nl, link, hooks[i].parent)
			if err != nil {
				return nil, fmt.Errorf("cls_bpf %s: %w", hooks[i].name, err)
			}
			hooks[i].adopt = adopt
		}
	}
	for _, h := range hooks {
		f, err := a.add(nl, ifindex, h.parent, h.prog, h.adopt)
		if err != nil {
			unlock() // Close takes it again to delete the qdisc
			unlock = func() {}
			_ = att.Close()
			return nil, fmt.Errorf("add cls_bpf filter %s: %w", h.name, err)
		}
		att.filters = append(att.filters, f)
	}
	return att, nil
}

// prepare reads one hook's filters: it returns the owner's filter a
// previous process of a pinned owner left there, to adopt, and removes the
// filters of dead nsflow processes (and the owner's own duplicates).
func (a *clsactAttacher) prepare(nl *netlink.Handle, link netlink.Link, parent uint32) (*netlink.BpfFilter, error) {
	existing, err := nl.FilterList(link, parent)
	if err != nil {
		return nil, fmt.Errorf("list filters: %w", err)
	}
	var adopt *netlink.BpfFilter
	for _, f := range existing {
		bf, ok := f.(*netlink.BpfFilter)
		if !ok || !IsNsflowFilter(bf.Name) {
			continue
		}
		switch {
		case bf.Name == a.owner.name && a.owner.pinned && adopt == nil && bf.Priority == clsactPriority:
			adopt = bf
		case bf.Name == a.owner.name || a.owner.stale(bf.Name):
			// A duplicate of its own, or a dead process's: nobody else
			// will ever remove it.
			if err := nl.FilterDel(bf); err != nil && !gone(err) {
				return nil, fmt.Errorf("remove stale filter %s: %w", bf.Name, err)
			}
			a.owner.log.Info("removed a clsact filter of a dead nsflow process", "filter", bf.Name, "ifindex", link.Attrs().Index)
		}
	}
	return adopt, nil
}

// add puts prog on one hook as the owner's filter: in place of adopt (the
// one a previous process of a pinned owner left, replaced atomically: no
// packet goes uncounted), or as a new filter with a handle nobody uses.
func (a *clsactAttacher) add(nl *netlink.Handle, ifindex int, parent uint32, prog *ebpf.Program, adopt *netlink.BpfFilter) (*netlink.BpfFilter, error) {
	f := &netlink.BpfFilter{
		FilterAttrs: netlink.FilterAttrs{
			LinkIndex: ifindex,
			Parent:    parent,
			Priority:  clsactPriority,
			Protocol:  unix.ETH_P_ALL,
		},
		Fd:           prog.FD(),
		Name:         a.owner.name,
		DirectAction: true,
	}
	if adopt != nil {
		f.Handle = adopt.Handle
		if err := nl.FilterReplace(f); err != nil {
			return nil, err
		}
		a.owner.log.Debug("adopted pinned filter", "filter", f.Name, "ifindex", f.LinkIndex, "handle", f.Handle)
		return f, nil
	}
	// Create, never replace: a handle another process took meanwhile
	// (EEXIST) is someone else's filter; pick another.
	for try := 0; ; try++ {
		f.Handle = randomHandle()
		err := nl.FilterAdd(f)
		if err == nil {
			return f, nil
		}
		if !errors.Is(err, unix.EEXIST) || try == maxHandleChoice {
			return nil, err
		}
	}
}

func (a *clsactAttachment) Close() error {
	var errs []error
	for _, f := range a.filters {
		if err := a.nl.FilterDel(f); err != nil && !gone(err) {
			errs = append(errs, fmt.Errorf("delete cls_bpf filter: %w", err))
		}
	}
	a.filters = nil
	if a.ownsQdisc {
		// Checked and deleted under the qdisc lock, or left (empty): the
		// check and the delete are two requests, between which another
		// nsflow process could add its filters to the qdisc, and the
		// delete would take them with it (TestQdiscDeleteRace).
		unlock, locked := lockQdisc(a.ns, a.ifindex, closeLockWait)
		if locked && a.qdiscUnused() {
			if err := a.nl.QdiscDel(clsactQdisc(a.ifindex)); err != nil && !gone(err) {
				errs = append(errs, fmt.Errorf("delete clsact qdisc: %w", err))
			}
		}
		unlock()
	}
	return errors.Join(errs...)
}

// How long an attach, and a detach that may delete the qdisc, wait for the
// qdisc lock. Another nsflow process holds it for a few netlink round
// trips; a process of the namespace that holds the name for itself (a
// tenant squatting it) makes attaches wait this long and detaches leave
// the qdisc, never a filter of another process's deleted.
const (
	attachLockWait = 500 * time.Millisecond
	closeLockWait  = 100 * time.Millisecond
)

// lockQdisc takes the lock on the clsact qdisc of interface ifindex of
// namespace ns that nsflow processes share: the abstract unix socket
// "nsflow-clsact/IFINDEX" bound in that namespace (abstract names belong to
// a network namespace, so every process that attaches there contends for
// the same one, wherever it runs; the kernel releases it when its holder
// dies). It waits up to wait; locked is false when it did not get it.
func lockQdisc(ns netns.NsHandle, ifindex int, wait time.Duration) (unlock func(), locked bool) {
	fd := -1
	name := fmt.Sprintf("\x00nsflow-clsact/%d", ifindex)
	bind := func() error {
		s, err := unix.Socket(unix.AF_UNIX, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			return err
		}
		if err := unix.Bind(s, &unix.SockaddrUnix{Name: name}); err != nil {
			unix.Close(s)
			return err
		}
		fd = s
		return nil
	}
	deadline := time.Now().Add(wait)
	for delay := 50 * time.Microsecond; ; delay = min(2*delay, 5*time.Millisecond) {
		var err error
		if ns >= 0 {
			err = nsenter.Do(ns, bind)
		} else {
			err = bind() // the caller's own namespace
		}
		if err == nil {
			return func() { unix.Close(fd) }, true
		}
		if fd >= 0 { // bound, but the thread could not go back
			unix.Close(fd)
			fd = -1
		}
		if !errors.Is(err, unix.EADDRINUSE) || time.Now().After(deadline) {
			return func() {}, false
		}
		time.Sleep(delay)
	}
}

func (a *clsactAttachment) Release() error {
	if a.keep {
		a.filters = nil // they stay in the kernel, holding the program
		return nil
	}
	return a.Close()
}

// qdiscUnused reports whether no other filter sits on the clsact qdisc that
// nsflow created (another tool may have added one meanwhile).
func (a *clsactAttachment) qdiscUnused() bool {
	l := &netlink.Dummy{LinkAttrs: netlink.LinkAttrs{Index: a.ifindex}}
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
