package discovery

import (
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/nsflow/nsflow/collector"
	"github.com/nsflow/nsflow/collector/flow"
)

// pairPeer returns the nsid and ifindex of a veth (or netkit) end's peer as
// its own namespace sees them; nsid -1 when the peer is in the same
// namespace or l is not such an end.
func pairPeer(l netlink.Link) (int, int) {
	a := l.Attrs()
	if t := l.Type(); (t != "veth" && t != "netkit") || a.NetNsID < 0 || a.ParentIndex <= 0 {
		return -1, 0
	}
	return a.NetNsID, a.ParentIndex
}

// markPeers names the peer of each host-side veth whose peer lies in
// another listed namespace, and marks it peer-observed unless
// cfg.HostVeths: what a collector observing the same namespaces does (it
// also requires the peer to be attached; list attaches nothing).
func markPeers(nss []ListedNamespace, cfg Config) {
	var host *ListedNamespace
	for i := range nss {
		if nss[i].Name == collector.HostName {
			host = &nss[i]
		}
	}
	if host == nil {
		return
	}
	wanted := false
	for _, li := range host.Interfaces {
		wanted = wanted || li.peerNsid >= 0
	}
	if !wanted {
		return
	}
	h, err := netns.GetFromPath(host.Path)
	if err != nil {
		return
	}
	defer h.Close()
	nl, err := netlink.NewHandleAt(h, unix.NETLINK_ROUTE)
	if err != nil {
		return
	}
	defer nl.Close()
	byNsid := map[int]*ListedNamespace{}
	for i := range nss {
		ns := &nss[i]
		if ns == host || ns.Error != "" {
			continue
		}
		fd, err := netns.GetFromPath(ns.Path)
		if err != nil {
			continue
		}
		if id, err := nl.GetNetNsIdByFd(int(fd)); err == nil && id >= 0 {
			byNsid[id] = ns
		}
		fd.Close()
	}
	for i := range host.Interfaces {
		li := &host.Interfaces[i]
		p := byNsid[li.peerNsid]
		if li.peerNsid < 0 || p == nil {
			continue
		}
		for _, pi := range p.Interfaces {
			if pi.Index == li.peerIndex {
				li.Peer = p.Name + "/" + pi.Name
				if !cfg.HostVeths {
					li.State = string(flow.StatePeerObserved)
				}
			}
		}
	}
}
