package attach

import (
	"strings"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"

	"github.com/nsflow/nsflow/collector/nsenter"
)

// Hooks counts the hooks (ingress, egress: 0 to 2 each) of one interface
// that hold an nsflow program, by attach mechanism.
type Hooks struct {
	TCX, Clsact int
}

// Query tells which hooks of interface l, in namespace ns (nl: a netlink
// handle in it), hold nsflow's programs, whichever nsflow process attached
// them.
func Query(ns netns.NsHandle, nl *netlink.Handle, l netlink.Link) (Hooks, error) {
	tcx, err := tcxHooks(ns, l.Attrs().Index)
	if err != nil {
		return Hooks{}, err
	}
	return Hooks{TCX: tcx, Clsact: clsactHooks(nl, l)}, nil
}

// tcxHooks counts the hooks of an interface that hold an nsflow program
// attached with TCX.
func tcxHooks(ns netns.NsHandle, ifindex int) (int, error) {
	n := 0
	err := nsenter.Do(ns, func() error {
		for _, at := range []ebpf.AttachType{ebpf.AttachTCXIngress, ebpf.AttachTCXEgress} {
			r, err := link.QueryPrograms(link.QueryOptions{Target: ifindex, Attach: at})
			if err != nil {
				return err
			}
			for _, p := range r.Programs {
				if isNsflowProgram(p.ID) {
					n++
					break
				}
			}
		}
		return nil
	})
	return n, err
}

func isNsflowProgram(id ebpf.ProgramID) bool {
	p, err := ebpf.NewProgramFromID(id)
	if err != nil {
		return false
	}
	defer p.Close()
	info, err := p.Info()
	return err == nil && strings.HasPrefix(info.Name, "nsflow_")
}

// clsactHooks counts the clsact hooks of an interface holding nsflow's filter.
func clsactHooks(nl *netlink.Handle, l netlink.Link) int {
	n := 0
	for _, parent := range []uint32{netlink.HANDLE_MIN_INGRESS, netlink.HANDLE_MIN_EGRESS} {
		fs, err := nl.FilterList(l, parent)
		if err != nil {
			continue
		}
		for _, f := range fs {
			if bf, ok := f.(*netlink.BpfFilter); ok && IsNsflowFilter(bf.Name) {
				n++
				break
			}
		}
	}
	return n
}
