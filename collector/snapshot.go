package collector

import (
	"errors"
	"fmt"
	"sort"
	"time"

	"golang.org/x/sys/unix"

	"github.com/nsflow/nsflow/bpf"
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

// snapshot reads the maps with all flows (limit < 0), none, or the limit
// largest.
func (c *Collector) snapshot(limit int) (*flow.Snapshot, error) {
	type ifaceKey struct {
		ino   uint64
		index int
	}
	// Copy the registry, so that map reads do not hold the lock.
	c.mu.Lock()
	names := map[uint64]*flow.NamespaceStats{}
	ifaces := map[ifaceKey]*flow.InterfaceStats{}
	// Host ends left out (peer-observed) are shown only while they still
	// have counters (from before they were left out), like removed ones.
	quiet := map[ifaceKey]bool{}
	for ino, ns := range c.namespaces {
		nst := &flow.NamespaceStats{Name: ns.name, Inode: ino, Gone: !ns.gone.IsZero()}
		if ns.pod != nil {
			p := *ns.pod
			nst.Pod = &p
		}
		names[ino] = nst
		for idx, i := range ns.ifaces {
			ifaces[ifaceKey{ino, idx}] = &flow.InterfaceStats{Name: i.name, Index: idx, State: i.state}
			if i.state == flow.StatePeerObserved {
				quiet[ifaceKey{ino, idx}] = true
			}
		}
	}
	flowsDeleted := c.objs.FlowsDeleted()
	c.mu.Unlock()

	snap := &flow.Snapshot{Time: time.Now()}
	var errs []error

	err := c.objs.ReadTotals(func(ok bpf.NsflowObsKey, cv []bpf.NsflowCounters) {
		k := ifaceKey{uint64(ok.Netns), int(ok.Ifindex)}
		delete(quiet, k)
		is := ifaces[k]
		if is == nil {
			// Not (or no longer) in the registry: still counted, never lost.
			is = &flow.InterfaceStats{Name: fmt.Sprintf("if%d", ok.Ifindex), Index: int(ok.Ifindex)}
			ifaces[k] = is
		}
		if names[k.ino] == nil {
			names[k.ino] = &flow.NamespaceStats{Name: fmt.Sprintf("netns:%d", k.ino), Inode: k.ino}
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
	for k, is := range ifaces {
		if ns := names[k.ino]; ns != nil && !quiet[k] {
			ns.Interfaces = append(ns.Interfaces, *is)
		}
	}
	for _, ns := range names {
		sort.Slice(ns.Interfaces, func(a, b int) bool { return ns.Interfaces[a].Index < ns.Interfaces[b].Index })
		snap.Namespaces = append(snap.Namespaces, *ns)
	}
	sort.Slice(snap.Namespaces, func(a, b int) bool {
		if snap.Namespaces[a].Name != snap.Namespaces[b].Name {
			return snap.Namespaces[a].Name < snap.Namespaces[b].Name
		}
		return snap.Namespaces[a].Inode < snap.Namespaces[b].Inode
	})

	flows, nflows, err := c.readFlows(limit, func(ino uint64, idx int) (string, string) {
		nsName, ifName := fmt.Sprintf("netns:%d", ino), fmt.Sprintf("if%d", idx)
		if ns := names[ino]; ns != nil {
			nsName = ns.Name
		}
		if is := ifaces[ifaceKey{ino, idx}]; is != nil {
			ifName = is.Name
		}
		return nsName, ifName
	})
	if err != nil {
		errs = append(errs, err)
	}
	snap.Flows = flows

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

// readFlows reads the flow map: all flows (limit < 0), none (0) or the
// limit largest, and how many live flows there are.
func (c *Collector) readFlows(limit int, name func(ino uint64, idx int) (string, string)) ([]flow.Flow, int, error) {
	keep := limit != 0
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
	if limit > 0 {
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
		f.Netns, f.Interface = name(f.NetnsInode, f.Ifindex)
		var first, last uint64
		for _, v := range vals {
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
		f.FirstSeen, f.LastSeen = wall(first), wall(last)
		if top != nil {
			top.Offer(&f)
		} else {
			flows = append(flows, f)
		}
		n++
	})
	if top != nil {
		flows = top.Flows()
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
