package collector

import (
	"fmt"
	"os"
	"sort"
	"strings"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"

	"github.com/nsflow/nsflow/collector/flow"
)

// ListedNamespace is a namespace found on the node, as `nsflow list` shows it.
type ListedNamespace struct {
	Name       string        `json:"name"`
	Inode      uint64        `json:"inode"`
	Path       string        `json:"path"`
	Pids       []int         `json:"pids"`
	Commands   []string      `json:"commands"` // of the first pids, from /proc/PID/comm
	Pod        *flow.PodInfo `json:"pod,omitempty"`
	Interfaces []ListedIface `json:"interfaces"`
	Error      string        `json:"error,omitempty"`
}

// ListedIface is an interface and whether nsflow's programs are on it (by
// any nsflow process: a running `serve` or `trace`).
type ListedIface struct {
	Name    string `json:"name"`
	Index   int    `json:"ifindex"`
	Type    string `json:"type"`
	Up      bool   `json:"up"`
	Attach  string `json:"attach"` // tcx, clsact, tcx+clsact or none
	Partial bool   `json:"partial,omitempty"`
}

// List finds the namespaces cfg selects, without attaching anything, and
// reports the interfaces of each and the nsflow programs on them; pods
// (by namespace inode, may be nil) name their pods.
func List(cfg DiscoveryConfig, pods map[uint64]flow.PodInfo) ([]ListedNamespace, error) {
	d, err := NewDiscovery(nil, cfg)
	if err != nil {
		return nil, err
	}
	found := d.scan()
	out := make([]ListedNamespace, 0, len(found))
	for ino, f := range found {
		ln := ListedNamespace{Name: f.target.Name, Inode: ino, Path: f.target.Path, Pids: f.pids, Interfaces: []ListedIface{}}
		if p, ok := pods[ino]; ok {
			ln.Pod = &p
		}
		sort.Ints(ln.Pids)
		if ln.Pids == nil {
			ln.Pids = []int{}
		}
		ln.Commands = []string{}
		for i, pid := range ln.Pids {
			if i == 8 {
				break
			}
			comm, _ := os.ReadFile(fmt.Sprintf("%s/%d/comm", d.cfg.ProcDir, pid))
			ln.Commands = append(ln.Commands, strings.TrimSpace(string(comm)))
		}
		if err := listInterfaces(&ln); err != nil {
			ln.Error = err.Error()
		}
		out = append(out, ln)
	}
	sort.Slice(out, func(a, b int) bool { return out[a].Name < out[b].Name })
	return out, nil
}

func listInterfaces(ln *ListedNamespace) error {
	h, err := netns.GetFromPath(ln.Path)
	if err != nil {
		return err
	}
	defer h.Close()
	nl, err := netlink.NewHandleAt(h)
	if err != nil {
		return err
	}
	defer nl.Close()
	links, err := nl.LinkList()
	if err != nil {
		return err
	}
	for _, l := range links {
		a := l.Attrs()
		li := ListedIface{Name: a.Name, Index: a.Index, Type: l.Type(), Up: a.Flags&1 != 0}
		var kinds []string
		tcx, err := tcxHooks(h, a.Index)
		if err != nil {
			return fmt.Errorf("query tcx on %s: %w", a.Name, err)
		}
		cls := clsactHooks(nl, l)
		if tcx > 0 {
			kinds = append(kinds, "tcx")
		}
		if cls > 0 {
			kinds = append(kinds, "clsact")
		}
		li.Attach = strings.Join(kinds, "+")
		if li.Attach == "" {
			li.Attach = "none"
		}
		li.Partial = (tcx > 0 && tcx < 2) || (cls > 0 && cls < 2)
		ln.Interfaces = append(ln.Interfaces, li)
	}
	return nil
}

// tcxHooks counts the hooks (ingress, egress) of an interface that hold an
// nsflow program attached with TCX.
func tcxHooks(ns netns.NsHandle, ifindex int) (int, error) {
	n := 0
	err := inNetns(ns, func() error {
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
			if bf, ok := f.(*netlink.BpfFilter); ok && bf.Handle == clsactHandle && bf.Priority == clsactPriority {
				n++
				break
			}
		}
	}
	return n
}
