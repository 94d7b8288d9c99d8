package collector

// Counting each packet once: the host end of a veth (or netkit) pair whose
// peer is attached in another observed namespace sees every packet its peer
// sees, so by default it is left out (state peer-observed) and the pod side
// alone counts the pair. Config.HostVeths observes both ends.
//
// The host identifies a peer's namespace by its nsid (IFLA_LINK_NETNSID on
// the host end, allocated by the kernel as soon as the link is reported)
// and the peer's ifindex (IFLA_LINK); each observed namespace's nsid in the
// host is asked once (RTM_GETNSID by fd) and cached while it is observed.
//
// The rule is re-evaluated whenever one of its inputs changes:
//   - a link event in the host namespace (a NEWLINK carries the host end's
//     peer; the DELLINK of a veth end moved out of the host names its peer,
//     the end left behind, which gets no event of its own);
//   - an interface attached, or removed, in another observed namespace;
//   - a namespace added to, or removed from, the registry.
//
// Transitions never leave a packet uncounted: the pod side is attached
// before the host end is detached, and the host end attached again before
// the pod side's namespace is detached. Between a host end's attach and
// its peer's (a pod's veth made before discovery observes its namespace),
// both ends count: the host end's counters then stay readable (its series
// frozen) for the grace period, like those of a removed interface, and are
// forgotten by Prune.

import (
	"time"

	"github.com/vishvananda/netlink"

	"github.com/nsflow/nsflow/collector/attach"
	"github.com/nsflow/nsflow/collector/flow"
)

// hostLocked returns the observed host namespace, or nil.
func (c *Collector) hostLocked() *namespace {
	if ns := c.namespaces[c.hostIno]; ns != nil && ns.gone.IsZero() {
		return ns
	}
	return nil
}

// pairPeer returns the nsid and ifindex of a paired device's peer, as the
// namespace l was listed in sees them; ok is false unless l is a veth or
// netkit end whose peer lies in another namespace.
func pairPeer(l netlink.Link) (nsid, index int, ok bool) {
	a := l.Attrs()
	switch l.Type() {
	case "veth", "netkit":
	default:
		return -1, 0, false
	}
	if a.NetNsID < 0 || a.ParentIndex <= 0 {
		return -1, 0, false
	}
	return a.NetNsID, a.ParentIndex, true
}

// nsidLocked returns the host's nsid for ns (-1 when the host has none for
// it yet, or the host is not observed); a known one is cached: the kernel
// does not change it while both namespaces live.
func (c *Collector) nsidLocked(ns *namespace) int {
	if ns.nsid >= 0 {
		return ns.nsid
	}
	host := c.hostLocked()
	if host == nil || host == ns {
		return -1
	}
	id, err := host.nl.GetNetNsIdByFd(int(ns.handle))
	if err != nil || id < 0 {
		return -1
	}
	ns.nsid = id
	return id
}

// peerLocked returns the observed namespace of host nsid nsid and its
// attached interface of that index, if any. Namespaces whose nsid is not
// known yet are all asked at once on a miss (not one per miss: a host
// listed after 1,000 pods would ask O(pods²) times).
func (c *Collector) peerLocked(nsid, index int) (*namespace, *iface) {
	host := c.hostLocked()
	find := func() *namespace {
		for _, ns := range c.namespaces {
			if ns != host && ns.gone.IsZero() && ns.nsid == nsid {
				return ns
			}
		}
		return nil
	}
	p := find()
	if p == nil {
		for _, ns := range c.namespaces {
			if ns != host && ns.gone.IsZero() && ns.nsid < 0 {
				c.nsidLocked(ns)
			}
		}
		p = find()
	}
	if p == nil {
		return nil, nil
	}
	if i := p.ifaces[index]; i != nil && i.state == flow.StateAttached && i.gone.IsZero() {
		return p, i
	}
	return nil, nil
}

// placeLocked attaches to one interface of ns, or, for a host end whose
// peer is attached in an observed namespace, leaves it out; an interface
// attached elsewhere may leave its host end out.
func (c *Collector) placeLocked(ns *namespace, l netlink.Link) error {
	a := l.Attrs()
	if ns.inode != c.hostIno {
		err := c.attachLocked(ns, a.Index, a.Name)
		if err == nil {
			c.peerAttachedLocked(ns, a.Index)
		}
		return err
	}
	nsid, index, paired := pairPeer(l)
	if paired && !c.cfg.HostVeths {
		if p, pi := c.peerLocked(nsid, index); p != nil {
			c.skipLocked(ns, a.Index, a.Name, nsid, index, p.name+"/"+pi.name)
			return nil
		}
	}
	err := c.attachLocked(ns, a.Index, a.Name)
	if i := ns.ifaces[a.Index]; i != nil {
		i.peerNsid, i.peerIndex = nsid, index // a peer that moved back: none
	}
	return err
}

// skipLocked leaves a host end out: detached, its counters (if it had
// any) kept for the grace period.
func (c *Collector) skipLocked(ns *namespace, index int, name string, nsid, peerIndex int, peer string) {
	i := ns.ifaces[index]
	if i != nil && i.state == flow.StatePeerObserved {
		i.name, i.peerNsid, i.peerIndex, i.peer = name, nsid, peerIndex, peer
		return
	}
	if i == nil && c.mode == attach.ModeClsact {
		// First sight: a dead process's clsact filter, or a previous
		// pinned process's, may be on it, counting into a slot that is
		// handed to another point once this one is forgotten. Attaching
		// sweeps or adopts them; detaching removes them with ours. (A
		// previous process's pinned TCX link, unclaimed, is released by
		// DropStalePins after the first scan, and SweepStaleFilters covers
		// observed namespaces under TCX: no attach needed, none paid for.)
		if err := c.attachLocked(ns, index, name); err != nil {
			c.log.Debug("clear hooks of a host end left out", "interface", name, "err", err)
		}
	}
	if i = ns.ifaces[index]; i != nil {
		c.detachLocked(ns, index, "peer observed")
	}
	ns.ifaces[index] = &iface{
		index: index, name: name, state: flow.StatePeerObserved,
		peerNsid: nsid, peerIndex: peerIndex, peer: peer, skipped: time.Now(),
	}
	c.log.Debug("host end left out: its peer counts it", "interface", name, "peer", peer)
}

// peerAttachedLocked leaves out the host ends whose peer is ns's interface
// of that index (any interface: index < 0), now attached.
func (c *Collector) peerAttachedLocked(ns *namespace, index int) {
	host := c.hostLocked()
	if host == nil || c.cfg.HostVeths || ns == host {
		return
	}
	var nsid = -2
	for _, hi := range host.ifaces {
		if hi.state != flow.StateAttached || !hi.gone.IsZero() || hi.peerIndex <= 0 || (index >= 0 && hi.peerIndex != index) {
			continue
		}
		if nsid == -2 {
			nsid = c.nsidLocked(ns)
		}
		if nsid < 0 || hi.peerNsid != nsid {
			continue
		}
		if pi := ns.ifaces[hi.peerIndex]; pi != nil && pi.state == flow.StateAttached && pi.gone.IsZero() {
			c.skipLocked(host, hi.index, hi.name, hi.peerNsid, hi.peerIndex, ns.name+"/"+pi.name)
		}
	}
}

// peerLostLocked observes again the host ends left out for ns's interface
// of that index (any: index < 0), which is gone, or whose namespace is no
// longer observed (call it with ns.gone set).
func (c *Collector) peerLostLocked(ns *namespace, index int) {
	host := c.hostLocked()
	if host == nil || ns == host || ns.nsid < 0 {
		return
	}
	for _, hi := range host.ifaces {
		if hi.state != flow.StatePeerObserved || hi.peerNsid != ns.nsid || (index >= 0 && hi.peerIndex != index) {
			continue
		}
		c.replaceLocked(host, hi.index)
	}
}

// replaceLocked applies the rule again to the host's interface of that
// index, from a fresh look at it (its peer may have moved).
func (c *Collector) replaceLocked(host *namespace, index int) {
	l, err := host.nl.LinkByIndex(index)
	if err != nil {
		return // gone: its DELLINK marks it
	}
	if err := c.placeLocked(host, l); err != nil {
		if vanished(host.nl, index) {
			return
		}
		c.log.Warn("attach", "err", err)
	}
}

// linkGoneLocked follows an interface's removal: in the host, a veth end
// that leaves it (moved to another namespace) names the end it leaves
// behind, whose peer now lies elsewhere; elsewhere, a removed peer
// brings its host end back.
func (c *Collector) linkGoneLocked(ns *namespace, l netlink.Link) {
	if c.cfg.HostVeths {
		return
	}
	if ns.inode != c.hostIno {
		c.peerLostLocked(ns, l.Attrs().Index)
		return
	}
	a := l.Attrs()
	if (l.Type() == "veth" || l.Type() == "netkit") && a.NetNsID < 0 && a.ParentIndex > 0 {
		if i := ns.ifaces[a.ParentIndex]; i != nil && i.gone.IsZero() {
			c.replaceLocked(ns, a.ParentIndex)
		}
	}
}
