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
// The rule is applied to the host's interfaces by the host's worker
// (queue.go) only: a pod namespace's worker queues work on the host once
// it attached something (workPeers) or one of its interfaces went
// (workPlace), and Remove queues it first in line (workPeerGone) and waits
// for it before detaching the namespace. A host end whose peer's namespace
// has attach work pending (its first pass, queued events) waits, unlisted,
// until that work is done: at 1,000 pods, attaching and then leaving out
// each host end would cost two TCX grace periods per pod.
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
	"github.com/vishvananda/netns"

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
// it yet); a known one is cached: the kernel does not change it while both
// namespaces live. (One RTM_GETNSID request, not a dump.)
func (c *Collector) nsidLocked(ns *namespace) int {
	if ns.nsid >= 0 {
		return ns.nsid
	}
	if ns.inode == c.hostIno || !ns.gone.IsZero() {
		return -1
	}
	ns.nsid = c.nsidOf(ns.handle)
	return ns.nsid
}

// nsidOf asks the host's nsid for the namespace of h (-1: none yet).
func (c *Collector) nsidOf(h netns.NsHandle) int {
	// One request at a time on the handle's socket: concurrent ones read
	// each other's replies.
	c.hostNlMu.Lock()
	defer c.hostNlMu.Unlock()
	if c.hostNl == nil { // none, or closed
		return -1
	}
	id, err := c.hostNl.GetNetNsIdByFd(int(h))
	if err != nil || id < 0 {
		return -1
	}
	return id
}

// waitingEnd is a host end waiting for its peer's namespace's attach work,
// or (until set) for its peer's namespace to be observed at all.
type waitingEnd struct {
	name  string
	nsid  int
	until time.Time
}

// peerHold is how long a new host end whose peer lies in a namespace not
// observed (yet) waits for discovery to observe it, before it is attached
// itself. A pod's veth often appears a few milliseconds after its
// namespace's mount, before discovery has registered the namespace:
// attaching the host end then and leaving it out a moment later cost two
// TCX grace periods under RTNL, which the pod's own attach and its
// runtime's setup waited for (tens of milliseconds per new pod,
// BenchmarkScale). A host end whose peer's namespace is never observed
// (excluded, or skipped) is attached this much later than it appeared.
const peerHold = 250 * time.Millisecond

// peerLocked returns the observed namespace of host nsid nsid and its
// attached interface of that index, if any; wait is true when that
// namespace has attach work under way (its first pass, queued link events)
// and the interface is not attached yet: the host end waits for it rather
// than being attached and then left out (a TCX attach and detach in the
// host each wait for a grace period). Namespaces whose nsid is not known
// yet are all asked at once on a miss (not one per miss: a host listed
// after 1,000 pods would ask O(pods²) times).
func (c *Collector) peerLocked(nsid, index int) (p *namespace, pi *iface, wait bool) {
	host := c.hostLocked()
	find := func() *namespace {
		for _, ns := range c.namespaces {
			if ns != host && ns.gone.IsZero() && !ns.leaving && ns.nsid == nsid {
				return ns
			}
		}
		return nil
	}
	p = find()
	if p == nil {
		for _, ns := range c.namespaces {
			if ns != host && ns.gone.IsZero() && ns.nsid < 0 {
				c.nsidLocked(ns)
			}
		}
		p = find()
	}
	if p == nil {
		return nil, nil, false
	}
	i := p.ifaces[index]
	if i != nil && i.state == flow.StateAttached && i.gone.IsZero() {
		return p, i, false
	}
	if i != nil && i.gone.IsZero() && (i.state == flow.StateFailed || i.state == flow.StateRefused) {
		// Its attach is done and did not count it: the host end counts
		// the pair (not waiting while that namespace has other work,
		// which under churn may be always).
		return nil, nil, false
	}
	return nil, nil, !p.firstDone || p.busy || p.queued
}

// holdableLocked reports whether a new host end whose peer (ifindex index
// in the namespace of host nsid nsid) is not attached may be held for
// peerHold: when no observed namespace has that nsid (yet), or the one that
// has it has not seen that interface yet; not when that namespace is
// leaving, nor when its attach of the peer is done and did not count it
// (failed, refused: the host end counts the pair at once).
func (c *Collector) holdableLocked(nsid, index int) bool {
	host := c.hostLocked()
	for _, ns := range c.namespaces {
		if ns == host || !ns.gone.IsZero() || ns.nsid != nsid {
			continue
		}
		if ns.leaving {
			return false
		}
		i := ns.ifaces[index]
		return i == nil || !i.gone.IsZero()
	}
	return true
}

// place attaches to one interface of ns, or, for a host end whose peer is
// attached in an observed namespace, leaves it out (or lets it wait for
// its peer's namespace). It reports whether it attached.
func (c *Collector) place(ns *namespace, l netlink.Link) (bool, error) {
	a := l.Attrs()
	if ns.inode != c.hostIno {
		return c.attach(ns, a.Index, a.Name, l)
	}
	nsid, index, paired := pairPeer(l)
	if paired && !c.cfg.HostVeths {
		c.mu.Lock()
		prior := ns.waiting[a.Index]
		delete(ns.waiting, a.Index)
		p, pi, wait := c.peerLocked(nsid, index)
		if p == nil && !wait && ns.firstDone && ns.ifaces[a.Index] == nil && c.holdableLocked(nsid, index) {
			// A new host end whose peer is not observed (yet): its
			// namespace is not, or its link event is still to come.
			until := prior.until
			if until.IsZero() {
				until = time.Now().Add(peerHold)
				index := a.Index
				time.AfterFunc(peerHold, func() {
					c.mu.Lock()
					defer c.mu.Unlock()
					if w, ok := ns.waiting[index]; ok && w.until.Equal(until) {
						c.pushLocked(ns, work{kind: workPlace, index: index})
					}
				})
				c.log.Debug("host end held: its peer is not observed yet", "interface", a.Name, "peer_nsid", nsid, "for", peerHold)
			}
			if time.Now().Before(until) {
				ns.waiting[a.Index] = waitingEnd{name: a.Name, nsid: nsid, until: until}
				c.mu.Unlock()
				return false, nil
			}
		}
		if wait {
			if i := ns.ifaces[a.Index]; i != nil && i.gone.IsZero() && (i.state == flow.StateAttached || i.state == flow.StatePeerObserved) {
				// As it is until the peer's namespace is done, which then
				// finds it by its peer (peersOf).
				i.name, i.peerNsid, i.peerIndex = a.Name, nsid, index
			} else {
				ns.waiting[a.Index] = waitingEnd{name: a.Name, nsid: nsid}
			}
			c.mu.Unlock()
			return false, nil
		}
		var peer string
		if p != nil {
			peer = p.name + "/" + pi.name
		}
		c.mu.Unlock()
		if p != nil {
			c.skip(ns, a.Index, a.Name, nsid, index, peer)
			return false, nil
		}
	}
	attached, err := c.attach(ns, a.Index, a.Name, l)
	c.mu.Lock()
	if i := ns.ifaces[a.Index]; i != nil {
		i.peerNsid, i.peerIndex = nsid, index // a peer that moved back: none
	}
	c.mu.Unlock()
	return attached, err
}

// skip leaves a host end out: detached, its counters (if it had any) kept
// for the grace period.
func (c *Collector) skip(host *namespace, index int, name string, nsid, peerIndex int, peer string) {
	c.mu.Lock()
	i := host.ifaces[index]
	if i != nil && i.state == flow.StatePeerObserved && i.gone.IsZero() {
		i.name, i.peerNsid, i.peerIndex, i.peer = name, nsid, peerIndex, peer
		c.mu.Unlock()
		return
	}
	firstSight := i == nil && c.modeOfLocked(host) == attach.ModeClsact
	c.mu.Unlock()
	if firstSight {
		// First sight: a dead process's clsact filter, or a previous
		// pinned process's, may be on it, counting into a slot that is
		// handed to another point once this one is forgotten. Attaching
		// sweeps or adopts them; detaching removes them with ours. (A
		// previous process's pinned TCX link, unclaimed, is released by
		// DropStalePins after the first scan, and SweepStaleFilters covers
		// observed namespaces under TCX: no attach needed, none paid for.)
		if _, err := c.attach(host, index, name, nil); err != nil {
			c.log.Debug("clear hooks of a host end left out", "interface", name, "err", err)
		}
	}
	c.mu.Lock()
	if p, _, _ := c.peerLocked(nsid, peerIndex); p == nil {
		// The peer's namespace began leaving (or its end went) since the
		// rule was applied: nothing would count the pair, and no event of
		// the peer's will bring the host end back. Observe it.
		c.mu.Unlock()
		if _, err := c.attach(host, index, name, nil); err != nil {
			c.log.Warn("attach", "err", err)
		}
		c.mu.Lock()
		if i := host.ifaces[index]; i != nil {
			i.peerNsid, i.peerIndex = nsid, peerIndex
		}
		c.mu.Unlock()
		return
	}
	var att attach.Attachment
	if i = host.ifaces[index]; i != nil {
		att = c.takeLocked(i)
	}
	host.ifaces[index] = &iface{
		index: index, name: name, state: flow.StatePeerObserved,
		peerNsid: nsid, peerIndex: peerIndex, peer: peer, skipped: time.Now(),
	}
	c.mu.Unlock()
	c.closeAttachment(host, name, att)
	c.log.Debug("host end left out: its peer counts it", "interface", name, "peer", peer)
}

// peersOf applies the rule again to the host ends whose peer lies in the
// namespace of that inode (its attach work done), or of that nsid (inode
// 0: the namespace is being removed).
func (c *Collector) peersOf(host *namespace, inode uint64, nsid int) {
	c.mu.Lock()
	if inode != 0 {
		p := c.namespaces[inode]
		if p == nil || !p.gone.IsZero() {
			c.mu.Unlock()
			return
		}
		nsid = c.nsidLocked(p)
	}
	if nsid < 0 {
		c.mu.Unlock()
		return
	}
	var idx []int
	for index, i := range host.ifaces {
		if i.gone.IsZero() && i.peerIndex > 0 && i.peerNsid == nsid && (i.state == flow.StateAttached || i.state == flow.StatePeerObserved) {
			idx = append(idx, index)
		}
	}
	for index, w := range host.waiting {
		if w.nsid == nsid {
			idx = append(idx, index)
		}
	}
	c.mu.Unlock()
	for _, index := range idx {
		c.replace(host, index)
	}
}

// leftOutFor reports whether host ends are left out for (or wait for the
// attach work of) the namespace of that nsid. Called on the host with c.mu
// held. A held end (peerHold) does not count: the namespace going, its
// place is decided anew (attached at once, its peer gone).
func (host *namespace) leftOutFor(nsid int) bool {
	for _, i := range host.ifaces {
		if i.state == flow.StatePeerObserved && i.gone.IsZero() && i.peerNsid == nsid {
			return true
		}
	}
	for _, w := range host.waiting {
		if w.nsid == nsid && w.until.IsZero() {
			return true
		}
	}
	return false
}

// waitingFor reports whether host ends wait for ns's attach work. Called
// on the host with c.mu held.
func (host *namespace) waitingFor(ns *namespace) bool {
	return ns.nsid >= 0 && host.waitsFor(ns.nsid)
}

func (host *namespace) waitsFor(nsid int) bool {
	for _, w := range host.waiting {
		if w.nsid == nsid {
			return true
		}
	}
	return false
}

// replace applies the rule again to ns's interface of that index, from a
// fresh look at it (its peer may have moved).
func (c *Collector) replace(ns *namespace, index int) {
	l, err := ns.nl.LinkByIndex(index)
	if err != nil {
		return // gone: its DELLINK marks it
	}
	if _, err := c.place(ns, l); err != nil {
		if vanished(ns.nl, index) {
			return
		}
		c.log.Warn("attach", "err", err)
	}
}

// linkGone follows an interface's removal: in the host, a veth end that
// leaves it (moved to another namespace) names the end it leaves behind,
// whose peer now lies elsewhere; elsewhere, a removed peer brings its host
// end back.
func (c *Collector) linkGone(ns *namespace, l netlink.Link) {
	if c.cfg.HostVeths {
		return
	}
	a := l.Attrs()
	if ns.inode != c.hostIno {
		c.mu.Lock()
		defer c.mu.Unlock()
		host := c.hostLocked()
		if host == nil || ns.nsid < 0 {
			return
		}
		for _, hi := range host.ifaces {
			if hi.state == flow.StatePeerObserved && hi.gone.IsZero() && hi.peerNsid == ns.nsid && hi.peerIndex == a.Index {
				c.pushLocked(host, work{kind: workPlace, index: hi.index})
			}
		}
		return
	}
	if (l.Type() == "veth" || l.Type() == "netkit") && a.NetNsID < 0 && a.ParentIndex > 0 {
		c.mu.Lock()
		i := ns.ifaces[a.ParentIndex]
		live := i != nil && i.gone.IsZero()
		c.mu.Unlock()
		if live {
			c.replace(ns, a.ParentIndex)
		}
	}
}
