package collector

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/nsflow/nsflow/bpf"
	"github.com/nsflow/nsflow/collector/cgroup"
	"github.com/nsflow/nsflow/collector/flow"
)

func direction(d uint8) flow.Direction {
	if bpf.Direction(d) == bpf.TX {
		return flow.TX
	}
	return flow.RX
}

// Snapshot reads the maps: every observed namespace with every interface
// (zero counters included), the flows, and the programs' statistics.
func (c *Collector) Snapshot() (*flow.Snapshot, error) { return c.snapshot(-1) }

// SnapshotTop is Snapshot with only the n largest flows by bytes, largest
// first (Stats.FlowEntries still counts them all): a scrape capped at n
// flow series holds n flows, not the whole flow map (flow.Top).
func (c *Collector) SnapshotTop(n int) (*flow.Snapshot, error) { return c.snapshot(max(n, 0)) }

// Totals is Snapshot without the flows themselves (Stats still counts
// them): what a scrape needs when flows are not exported, at a fraction of
// the cost when the flow map holds tens of thousands of flows.
func (c *Collector) Totals() (*flow.Snapshot, error) { return c.snapshot(0) }

// SnapshotSelect is Snapshot with only the flows keep accepts and the n
// largest others (n < 0: all flows): the exporter's capped flow series
// read the flows that have a series and as many candidates as there are
// free places (exporter.SelectSource).
func (c *Collector) SnapshotSelect(n int, keep func(*flow.Flow) bool) (*flow.Snapshot, error) {
	return c.read(n, keep)
}

// snapshot reads the maps with all flows (limit < 0), none, or the limit
// largest.
func (c *Collector) snapshot(limit int) (*flow.Snapshot, error) { return c.read(limit, nil) }

// read is snapshot that also keeps, whatever the limit, the flows keep
// accepts (keep may be nil).
func (c *Collector) read(limit int, keep func(*flow.Flow) bool) (*flow.Snapshot, error) {
	type ifaceKey struct {
		ino   uint64
		index int
	}
	// Copy the registry, so that map reads do not hold the lock: the
	// interfaces in one block, each namespace's together and sorted by
	// index, found by key (at, nsAt).
	c.mu.Lock()
	n := 0
	for _, ns := range c.namespaces {
		n += len(ns.ifaces)
	}
	nss := make([]flow.NamespaceStats, 0, len(c.namespaces))
	pods := make([]flow.PodInfo, 0, len(c.namespaces))
	all := make([]flow.InterfaceStats, 0, n)
	nsAt := make(map[uint64]int, len(c.namespaces))
	at := make(map[ifaceKey]int, n)
	for ino, ns := range c.namespaces {
		nst := flow.NamespaceStats{Name: ns.name, Inode: ino, Gone: !ns.gone.IsZero()}
		if ns.pod != nil {
			pods = append(pods, *ns.pod)
			nst.Pod = &pods[len(pods)-1]
		}
		first := len(all)
		for idx, i := range ns.ifaces {
			all = append(all, flow.InterfaceStats{Name: i.name, Index: idx, State: i.state})
		}
		nst.Interfaces = all[first:len(all):len(all)] // appending copies
		slices.SortFunc(nst.Interfaces, byIndex)
		for k := range nst.Interfaces {
			at[ifaceKey{ino, nst.Interfaces[k].Index}] = first + k
		}
		nsAt[ino] = len(nss)
		nss = append(nss, nst)
	}
	flowsDeleted := c.objs.FlowsDeleted()
	c.mu.Unlock()

	snap := &flow.Snapshot{Time: time.Now()}
	var errs []error

	counted := make([]bool, len(all))            // by the totals
	extra := map[ifaceKey]*flow.InterfaceStats{} // counted, not in the registry
	err := c.objs.ReadTotals(func(ok bpf.NsflowObsKey, cv []bpf.NsflowCounters) {
		k := ifaceKey{uint64(ok.Netns), int(ok.Ifindex)}
		var is *flow.InterfaceStats
		if i, found := at[k]; found {
			is, counted[i] = &all[i], true
		} else if is = extra[k]; is == nil {
			is = &flow.InterfaceStats{Name: fmt.Sprintf("if%d", ok.Ifindex), Index: int(ok.Ifindex)}
			extra[k] = is
		}
		sum := &is.RX
		if bpf.Direction(ok.Dir) == bpf.TX {
			sum = &is.TX
		}
		for _, v := range cv {
			sum.Packets += v.Packets
			sum.Bytes += v.Bytes
		}
	})
	if err != nil {
		errs = append(errs, fmt.Errorf("read totals: %w", err))
	}
	// Host ends left out (peer-observed) are shown only while they still
	// have counters (from before they were left out), like removed ones.
	for i := range nss {
		ns := &nss[i]
		quiet := func(is flow.InterfaceStats) bool {
			return is.State == flow.StatePeerObserved && !counted[at[ifaceKey{ns.Inode, is.Index}]]
		}
		if slices.ContainsFunc(ns.Interfaces, quiet) {
			ns.Interfaces = slices.DeleteFunc(slices.Clone(ns.Interfaces), quiet) // a copy: all is at's
		}
	}
	// Interfaces not (or no longer) in the registry: still counted, never
	// lost.
	for k, is := range extra {
		i, ok := nsAt[k.ino]
		if !ok {
			i = len(nss)
			nsAt[k.ino] = i
			nss = append(nss, flow.NamespaceStats{Name: fmt.Sprintf("netns:%d", k.ino), Inode: k.ino})
		}
		nss[i].Interfaces = append(nss[i].Interfaces, *is)
		slices.SortFunc(nss[i].Interfaces, byIndex) // a copy: not all's
	}
	slices.SortFunc(nss, func(a, b flow.NamespaceStats) int {
		if c := strings.Compare(a.Name, b.Name); c != 0 {
			return c
		}
		return cmp.Compare(a.Inode, b.Inode)
	})
	for i := range nss {
		nsAt[nss[i].Inode] = i
	}
	snap.Namespaces = nss

	nameOf := func(ino uint64, idx int) (nsName, ifName string) {
		if i, ok := nsAt[ino]; ok {
			nsName = nss[i].Name
		} else {
			nsName = fmt.Sprintf("netns:%d", ino)
		}
		if i, ok := at[ifaceKey{ino, idx}]; ok {
			ifName = all[i].Name
		} else {
			ifName = fmt.Sprintf("if%d", idx)
		}
		return nsName, ifName
	}
	var senders *senderIndex
	if c.cfg.Attribution || c.cfg.SocketLookup || c.cfg.Containers {
		c.mu.Lock()
		senders = newSenderIndex(c.lastFlows / 2)
		c.mu.Unlock()
	}
	flows, nflows, err := c.readFlows(limit, keep, nameOf, senders)
	if err != nil {
		errs = append(errs, err)
	}
	snap.Flows = flows
	if senders != nil {
		senders.join(snap.Flows)
	}
	if c.cfg.Containers {
		// One entry per point and cgroup: a point counted under two
		// slots meanwhile (re-attached) is summed, as its totals are.
		type ck struct {
			ino   uint64
			index uint32
			dir   uint8
			cg    uint64
		}
		at := map[ck]int{}
		if err := c.objs.ReadContainers(func(_ uint32, k bpf.NsflowObsKey, cg uint64, v bpf.NsflowCounters) {
			key := ck{uint64(k.Netns), k.Ifindex, k.Dir, cg}
			if i, ok := at[key]; ok {
				snap.Containers[i].Packets += v.Packets
				snap.Containers[i].Bytes += v.Bytes
				return
			}
			cs := flow.ContainerStats{NetnsInode: uint64(k.Netns), Direction: direction(k.Dir), Cgroup: cg,
				Counters: flow.Counters{Packets: v.Packets, Bytes: v.Bytes}}
			cs.Netns, cs.Interface = nameOf(cs.NetnsInode, int(k.Ifindex))
			at[key] = len(snap.Containers)
			snap.Containers = append(snap.Containers, cs)
		}); err != nil {
			errs = append(errs, err)
		}
	}
	c.nameCgroups(snap)

	st, err := c.readStats()
	if err != nil {
		errs = append(errs, err)
	}
	st.FlowEntries = uint64(nflows)
	st.FlowCapacity = uint64(c.objs.Flows.MaxEntries())
	if gone := st.FlowsCreated - flowsDeleted; st.FlowsCreated >= flowsDeleted && gone > st.FlowEntries {
		st.FlowsEvicted = gone - st.FlowEntries
	}
	snap.Stats = st
	return snap, errors.Join(errs...)
}

// AttachStates counts the interfaces of the observed namespaces (not the
// gone ones) by the state of nsflow's programs on them: what counting
// Interfaces gives, without copying the registry.
func (c *Collector) AttachStates() map[flow.AttachState]int {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := map[flow.AttachState]int{}
	for _, ns := range c.namespaces {
		if !ns.gone.IsZero() {
			continue
		}
		for _, i := range ns.ifaces {
			out[i.state]++
		}
	}
	return out
}

func byIndex(a, b flow.InterfaceStats) int { return cmp.Compare(a.Index, b.Index) }

// readFlows reads the flow map: all flows (limit < 0), none (0) or the
// limit largest, and how many live flows there are.
// With senders set, it records there every egress flow's sending cgroup
// (all flows, also those a limit leaves out) and sets each flow's own
// cgroup (SrcCgroup at egress, DstCgroup at ingress).
func (c *Collector) readFlows(limit int, keepFn func(*flow.Flow) bool, name func(ino uint64, idx int) (string, string), senders *senderIndex) ([]flow.Flow, int, error) {
	keep := limit != 0 || keepFn != nil
	// Flow timestamps are CLOCK_MONOTONIC_COARSE: anchor them to wall time.
	var mono unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_MONOTONIC_COARSE, &mono); err != nil {
		return nil, 0, fmt.Errorf("read monotonic clock: %w", err)
	}
	now := time.Now()
	wall := func(ns uint64) time.Time {
		return now.Add(-time.Duration(uint64(mono.Nano()) - ns))
	}

	var flows []flow.Flow
	var top *flow.Top
	if limit > 0 || (limit == 0 && keepFn != nil) {
		top = flow.NewTop(limit)
	} else if limit < 0 {
		c.mu.Lock()
		flows = make([]flow.Flow, 0, c.lastFlows+c.lastFlows/8)
		c.mu.Unlock()
	}
	n := 0
	points := c.objs.PointsBySlot() // what each flow key's slot names
	err := readPerCPU(c.objs.Flows, func(k *bpf.NsflowFlowKey, vals []bpf.NsflowFlowVal) {
		if !keep {
			for _, v := range vals {
				if v.Packets > 0 {
					n++
					return
				}
			}
			return
		}
		pt, ok := points[uint32(k.Slot)]
		if !ok {
			return // its point released meanwhile (the flow is being deleted)
		}
		f := flow.Flow{Key: decodeKey(k, pt)}
		var first, last, cg uint64
		for _, v := range vals {
			if cg == 0 {
				cg = v.Cgroup
			}
			f.Packets += v.Packets
			f.Bytes += v.Bytes
			f.TCPFlags |= flow.TCPFlags(v.TcpFlags)
			if v.FirstNs != 0 && (first == 0 || v.FirstNs < first) {
				first = v.FirstNs
			}
			if v.LastNs > last {
				last = v.LastNs
			}
		}
		if f.Packets == 0 {
			return // LRU slot recycled between iteration steps
		}
		if senders != nil && cg != 0 {
			if f.Direction == flow.TX {
				f.SrcCgroup = cg
				senders.add(&f.Key, cg)
			} else {
				f.DstCgroup = cg
				senders.addReceiver(&f.Key, cg)
			}
		}
		f.Netns, f.Interface = name(f.NetnsInode, f.Ifindex)
		f.FirstSeen, f.LastSeen = wall(first), wall(last)
		if top != nil && (keepFn == nil || !keepFn(&f)) {
			top.Offer(&f)
		} else {
			flows = append(flows, f)
		}
		n++
	})
	if top != nil {
		flows = append(flows, top.Flows()...)
	} else if keep {
		c.mu.Lock()
		c.lastFlows = n
		c.mu.Unlock()
	}
	if err != nil {
		return flows, n, fmt.Errorf("read flows: %w", err)
	}
	// Unsorted: the exporter needs no order, and sorting thousands of flows
	// on every scrape dominated its cost; renderers sort what they show.
	return flows, n, nil
}

func (c *Collector) readStats() (flow.Stats, error) {
	var st flow.Stats
	get := func(s bpf.NsflowStat) (uint64, error) {
		var vals []uint64
		if err := c.objs.Stats.Lookup(uint32(s), &vals); err != nil {
			return 0, err
		}
		var sum uint64
		for _, v := range vals {
			sum += v
		}
		return sum, nil
	}
	var errs []error
	for _, f := range []struct {
		s   bpf.NsflowStat
		dst *uint64
	}{
		{bpf.NsflowStatSTAT_TOTALS_FULL, &st.TotalsFull},
		{bpf.NsflowStatSTAT_FLOW_NEW, &st.FlowsCreated},
		{bpf.NsflowStatSTAT_FLOW_ERR, &st.FlowInsertErrors},
		{bpf.NsflowStatSTAT_NON_IP, &st.NonIP},
		{bpf.NsflowStatSTAT_TRUNCATED, &st.Truncated},
		{bpf.NsflowStatSTAT_NO_DEV, &st.NoDevice},
		{bpf.NsflowStatSTAT_EVENTS_LOST, &st.EventsLost},
	} {
		v, err := get(f.s)
		if err != nil {
			errs = append(errs, fmt.Errorf("read stat %d: %w", f.s, err))
		}
		*f.dst = v
	}
	return st, errors.Join(errs...)
}

// DefaultContainerEntries is the per-container totals map's size with
// Config.Containers (observation points × cgroups; LRU).
const DefaultContainerEntries = 16384

// CgroupResolver names cgroup ids (collector/cgroup.Resolver).
type CgroupResolver interface {
	Resolve(ctx context.Context, ids []uint64) map[uint64]cgroup.Name
}

// SetResolver sets what names the cgroup ids of snapshots' flows and
// containers (with attribution on); nil names none.
func (c *Collector) SetResolver(r CgroupResolver) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.resolver = r
}

// tuple is a flow's addresses, ports and protocol, without its
// observation point: plain bytes, hashed fast.
type tuple struct {
	src, dst     [16]byte
	sport, dport uint16
	proto        flow.Protocol
}

func tupleOf(k *flow.Key) tuple {
	return tuple{src: k.Src.As16(), dst: k.Dst.As16(), sport: k.SrcPort, dport: k.DstPort, proto: k.Protocol}
}

func (t tuple) reverse() tuple {
	return tuple{src: t.dst, dst: t.src, sport: t.dport, dport: t.sport, proto: t.proto}
}

// loopback reports whether either address is a loopback one (127/8 as an
// IPv4-mapped address, ::1).
func (t tuple) loopback() bool {
	return netip.AddrFrom16(t.src).Unmap().IsLoopback() || netip.AddrFrom16(t.dst).Unmap().IsLoopback()
}

type sender struct{ ino, cgroup uint64 }

// senders are the egress senders of one tuple, one per namespace: nearly
// always one (more only for a tuple several namespaces send).
type senders struct {
	first sender
	more  []sender
}

// senderIndex holds, per tuple, the sending cgroups of its egress flows,
// by namespace (m), and the receiving cgroups the ingress socket lookup
// found for its ingress flows (rcv).
type senderIndex struct{ m, rcv map[tuple]senders }

func newSenderIndex(hint int) *senderIndex {
	return &senderIndex{m: make(map[tuple]senders, hint), rcv: map[tuple]senders{}}
}

func (s *senderIndex) add(k *flow.Key, cg uint64) { addTo(s.m, k, cg) }

// addReceiver records the receiving cgroup of an ingress flow (socket lookup).
func (s *senderIndex) addReceiver(k *flow.Key, cg uint64) { addTo(s.rcv, k, cg) }

func addTo(m map[tuple]senders, k *flow.Key, cg uint64) {
	t := tupleOf(k)
	e, ok := m[t]
	if !ok {
		m[t] = senders{first: sender{k.NetnsInode, cg}}
		return
	}
	if e.first.ino == k.NetnsInode {
		return // one per namespace: a tuple's other interfaces send the same socket's
	}
	for _, o := range e.more {
		if o.ino == k.NetnsInode {
			return
		}
	}
	e.more = append(e.more, sender{k.NetnsInode, cg})
	m[t] = e
}

// find returns the sending cgroup of t: in namespace ino, else (others
// true, and not a loopback tuple, which never leaves its namespace) in the
// namespace of lowest inode that sent it; 0 if none.
func (s *senderIndex) find(t tuple, ino uint64, others bool) uint64 {
	return findIn(s.m, t, ino, others)
}

func findIn(m map[tuple]senders, t tuple, ino uint64, others bool) uint64 {
	e, ok := m[t]
	if !ok {
		return 0
	}
	if e.first.ino == ino {
		return e.first.cgroup
	}
	best := e.first
	for _, o := range e.more {
		if o.ino == ino {
			return o.cgroup
		}
		if o.ino < best.ino {
			best = o
		}
	}
	if !others || t.loopback() {
		return 0
	}
	return best.cgroup
}

// join fills the flows' other end (the join rule of docs/ARCHITECTURE.md):
// an egress flow's receiver is the sender of its reverse tuple (in its
// namespace first, then another's: the peer pod's eth0), else, for a
// one-way flow, the receiving socket's cgroup that the ingress socket
// lookup found for the same tuple (its namespace first: lo; then
// another's); an ingress flow's
// sender is the sender of the same tuple (its namespace first: lo; then
// another's), and its receiver, without the socket lookup's, the sender of
// the reverse tuple in its namespace.
func (s *senderIndex) join(flows []flow.Flow) {
	if len(s.m) == 0 && len(s.rcv) == 0 {
		return
	}
	for i := range flows {
		f := &flows[i]
		if f.Protocol != flow.Protocol(unix.IPPROTO_TCP) && f.Protocol != flow.Protocol(unix.IPPROTO_UDP) {
			continue // ICMP's ports are type and code: no reverse tuple
		}
		t := tupleOf(&f.Key)
		if f.Direction == flow.TX {
			if f.DstCgroup == 0 {
				f.DstCgroup = s.find(t.reverse(), f.NetnsInode, true)
			}
			if f.DstCgroup == 0 {
				f.DstCgroup = findIn(s.rcv, t, f.NetnsInode, true)
			}
			continue
		}
		if f.SrcCgroup == 0 {
			f.SrcCgroup = s.find(t, f.NetnsInode, true)
		}
		if f.DstCgroup == 0 {
			f.DstCgroup = s.find(t.reverse(), f.NetnsInode, false)
		}
	}
}

// nameCgroups names the snapshot's cgroup ids through the resolver.
func (c *Collector) nameCgroups(snap *flow.Snapshot) {
	c.mu.Lock()
	r := c.resolver
	c.mu.Unlock()
	if r == nil {
		return
	}
	seen := map[uint64]bool{}
	var ids []uint64
	add := func(id uint64) {
		if id != 0 && !seen[id] {
			seen[id] = true
			ids = append(ids, id)
		}
	}
	for i := range snap.Flows {
		add(snap.Flows[i].SrcCgroup)
		add(snap.Flows[i].DstCgroup)
	}
	for i := range snap.Containers {
		add(snap.Containers[i].Cgroup)
	}
	if len(ids) == 0 {
		return
	}
	names := r.Resolve(context.Background(), ids)
	for i := range snap.Flows {
		f := &snap.Flows[i]
		if n, ok := names[f.SrcCgroup]; ok {
			f.SrcContainer, f.SrcPod = n.Container, n.PodString()
		}
		if n, ok := names[f.DstCgroup]; ok {
			f.DstContainer, f.DstPod = n.Container, n.PodString()
		}
	}
	for i := range snap.Containers {
		cs := &snap.Containers[i]
		if n, ok := names[cs.Cgroup]; ok {
			cs.Container = n.Container
			if n.Pod != nil {
				p := *n.Pod
				cs.Pod = &p
			}
		}
	}
}
