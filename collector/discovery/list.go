package discovery

import (
	"fmt"
	"os"
	"strings"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/nsflow/nsflow/collector/attach"
	"github.com/nsflow/nsflow/collector/flow"
	"github.com/nsflow/nsflow/collector/linkwatch"
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
	// Peer is a host-side veth's peer (netns/interface) when it lies in a
	// listed namespace; State is then "peer-observed" unless
	// Config.HostVeths: serve, trace and top leave this end out (peer.go).
	Peer  string `json:"peer,omitempty"`
	State string `json:"state,omitempty"`

	peerNsid, peerIndex int // a veth's peer, as its namespace sees it
}

// List finds the namespaces cfg selects, without attaching anything, and
// reports the interfaces of each and the nsflow programs on them; pods
// (by namespace inode, may be nil) name their pods.
func List(cfg Config, pods map[uint64]flow.PodInfo) ([]ListedNamespace, error) {
	out, _, err := ListSkipped(cfg, pods)
	return out, err
}

// ListSkipped is List, and also returns the references to namespaces it
// could not read (a process of another user without CAP_SYS_PTRACE): what
// List does not show.
func ListSkipped(cfg Config, pods map[uint64]flow.PodInfo) ([]ListedNamespace, []Skipped, error) {
	found, skipped, err := ScanSkipped(cfg)
	if err != nil {
		return nil, nil, err
	}
	procDir := cfg.ProcDir
	if procDir == "" {
		procDir = "/proc"
	}
	out := make([]ListedNamespace, 0, len(found))
	for _, f := range found {
		ln := ListedNamespace{Name: f.Target.Name, Inode: f.Inode, Path: f.Target.Path, Pids: f.Pids, Interfaces: []ListedIface{}}
		if p, ok := pods[f.Inode]; ok {
			ln.Pod = &p
		}
		if ln.Pids == nil {
			ln.Pids = []int{}
		}
		ln.Commands = []string{}
		for i, pid := range ln.Pids {
			if i == 8 {
				break
			}
			comm, _ := os.ReadFile(fmt.Sprintf("%s/%d/comm", procDir, pid))
			ln.Commands = append(ln.Commands, strings.TrimSpace(string(comm)))
		}
		if err := listInterfaces(&ln); err != nil {
			ln.Error = err.Error()
		}
		out = append(out, ln)
	}
	markPeers(out, cfg)
	return out, skipped, nil
}

func listInterfaces(ln *ListedNamespace) error {
	h, err := netns.GetFromPath(ln.Path)
	if err != nil {
		return err
	}
	defer h.Close()
	nl, err := netlink.NewHandleAt(h, unix.NETLINK_ROUTE)
	if err != nil {
		return err
	}
	defer nl.Close()
	links, err := linkwatch.List(nl)
	if err != nil {
		return err
	}
	for _, l := range links {
		a := l.Attrs()
		li := ListedIface{Name: a.Name, Index: a.Index, Type: l.Type(), Up: a.Flags&1 != 0}
		li.peerNsid, li.peerIndex = pairPeer(l)
		var kinds []string
		hooks, err := attach.Query(h, nl, l)
		if err != nil {
			return fmt.Errorf("query tcx on %s: %w", a.Name, err)
		}
		tcx, cls := hooks.TCX, hooks.Clsact
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
