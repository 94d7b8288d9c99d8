package collector

import (
	"errors"
	"fmt"
	"net/netip"
	"sort"
	"time"

	"golang.org/x/sys/unix"

	"github.com/nsflow/nsflow/bpf"
)

// Direction is the direction of traffic at an observation point, from the
// namespace's own view.
type Direction string

const (
	RX Direction = "rx" // received: the interface's ingress hook
	TX Direction = "tx" // sent: the interface's egress hook
)

func direction(d uint8) Direction {
	if bpf.Direction(d) == bpf.TX {
		return TX
	}
	return RX
}

// Counters are packets and bytes. Bytes are frame lengths as the TC hook sees
// them (skb->len), the 14-byte Ethernet header included, as veth's own
// counters and packet captures count them. The kernel's counters of lo
// exclude that header.
type Counters struct {
	Packets uint64 `json:"packets"`
	Bytes   uint64 `json:"bytes"`
}

// Snapshot is the state of the maps at one instant. Namespaces are sorted by
// name, interfaces by index; flows are in map order.
type Snapshot struct {
	Time       time.Time        `json:"time"`
	Namespaces []NamespaceStats `json:"namespaces"`
	Flows      []Flow           `json:"flows"`
	Stats      Stats            `json:"stats"`
}

// NamespaceStats are the totals of one namespace, per interface.
type NamespaceStats struct {
	Name       string           `json:"name"`
	Inode      uint64           `json:"inode"`
	Pod        *PodInfo         `json:"pod,omitempty"`
	Gone       bool             `json:"gone,omitempty"`
	Interfaces []InterfaceStats `json:"interfaces"`
}

// InterfaceStats are the exact totals of one interface, per direction.
type InterfaceStats struct {
	Name  string      `json:"name"`
	Index int         `json:"ifindex"`
	State AttachState `json:"state,omitempty"`
	RX    Counters    `json:"rx"`
	TX    Counters    `json:"tx"`
}

// Flow is the traffic of one flow at one observation point.
type Flow struct {
	Netns      string     `json:"netns"`
	NetnsInode uint64     `json:"netns_inode"`
	Interface  string     `json:"interface"`
	Ifindex    int        `json:"ifindex"`
	Direction  Direction  `json:"direction"`
	Protocol   Protocol   `json:"protocol"`
	Src        netip.Addr `json:"src"`
	Dst        netip.Addr `json:"dst"`
	// SrcPort and DstPort carry the ICMP type and code for ICMP and ICMPv6.
	SrcPort   uint16    `json:"src_port"`
	DstPort   uint16    `json:"dst_port"`
	Packets   uint64    `json:"packets"`
	Bytes     uint64    `json:"bytes"`
	TCPFlags  TCPFlags  `json:"tcp_flags,omitempty"`
	FirstSeen time.Time `json:"first_seen"`
	LastSeen  time.Time `json:"last_seen"`
}

// Stats are the programs' own event counters and the flow map's fill.
type Stats struct {
	FlowEntries  uint64 `json:"flow_entries"`
	FlowCapacity uint64 `json:"flow_capacity"`
	// FlowsCreated counts flows the programs created; FlowsEvicted those
	// the LRU map evicted to make room (their packets remain in the totals);
	// FlowInsertErrors new flows that could not be recorded at all.
	FlowsCreated     uint64 `json:"flows_created"`
	FlowsEvicted     uint64 `json:"flows_evicted"`
	FlowInsertErrors uint64 `json:"flow_insert_errors"`
	// TotalsFull counts packets the programs could not count into a slot
	// of the totals (none in normal operation: every hook has its slot).
	TotalsFull uint64 `json:"totals_full"`
	NonIP      uint64 `json:"non_ip_packets"`
	Truncated  uint64 `json:"truncated_packets"`
	NoDevice   uint64 `json:"no_device_packets"`
	// EventsLost counts new-flow events dropped because the reader fell
	// behind (only with flow events).
	EventsLost uint64 `json:"events_lost,omitempty"`
}

// Snapshot reads the maps: every observed namespace with every interface
// (zero counters included), the flows, and the programs' statistics.
func (c *Collector) Snapshot() (*Snapshot, error) { return c.snapshot(true) }

// Totals is Snapshot without the flows themselves (Stats still counts
// them): what a scrape needs when flows are not exported, at a fraction of
// the cost when the flow map holds tens of thousands of flows.
func (c *Collector) Totals() (*Snapshot, error) { return c.snapshot(false) }

func (c *Collector) snapshot(withFlows bool) (*Snapshot, error) {
	type ifaceKey struct {
		ino   uint64
		index int
	}
	// Copy the registry, so that map reads do not hold the lock.
	c.mu.Lock()
	names := map[uint64]*NamespaceStats{}
	ifaces := map[ifaceKey]*InterfaceStats{}
	for ino, ns := range c.namespaces {
		nst := &NamespaceStats{Name: ns.name, Inode: ino, Gone: !ns.gone.IsZero()}
		if p, ok := c.pods[ino]; ok {
			nst.Pod = &p
		}
		names[ino] = nst
		for idx, i := range ns.ifaces {
			ifaces[ifaceKey{ino, idx}] = &InterfaceStats{Name: i.name, Index: idx, State: i.state}
		}
	}
	flowsDeleted := c.flowsDeleted
	c.mu.Unlock()

	snap := &Snapshot{Time: time.Now()}
	var errs []error

	err := c.objs.ReadTotals(func(ok bpf.NsflowObsKey, cv []bpf.NsflowCounters) {
		k := ifaceKey{uint64(ok.Netns), int(ok.Ifindex)}
		is := ifaces[k]
		if is == nil {
			// Not (or no longer) in the registry: still counted, never lost.
			is = &InterfaceStats{Name: fmt.Sprintf("if%d", ok.Ifindex), Index: int(ok.Ifindex)}
			ifaces[k] = is
		}
		if names[k.ino] == nil {
			names[k.ino] = &NamespaceStats{Name: fmt.Sprintf("netns:%d", k.ino), Inode: k.ino}
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
		if ns := names[k.ino]; ns != nil {
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

	flows, nflows, err := c.readFlows(withFlows, func(ino uint64, idx int) (string, string) {
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

// readFlows reads the flow map: the flows when keep is set, and how many
// live flows there are.
func (c *Collector) readFlows(keep bool, name func(ino uint64, idx int) (string, string)) ([]Flow, int, error) {
	// Flow timestamps are CLOCK_MONOTONIC_COARSE: anchor them to wall time.
	var mono unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_MONOTONIC_COARSE, &mono); err != nil {
		return nil, 0, fmt.Errorf("read monotonic clock: %w", err)
	}
	now := time.Now()
	wall := func(ns uint64) time.Time {
		return now.Add(-time.Duration(uint64(mono.Nano()) - ns))
	}

	c.mu.Lock()
	flows := make([]Flow, 0, c.lastFlows+c.lastFlows/8)
	c.mu.Unlock()
	n := 0
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
		f := decodeFlowKey(k)
		f.Netns, f.Interface = name(f.NetnsInode, f.Ifindex)
		var first, last uint64
		for _, v := range vals {
			f.Packets += v.Packets
			f.Bytes += v.Bytes
			f.TCPFlags |= TCPFlags(v.TcpFlags)
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
		flows = append(flows, f)
		n++
	})
	if keep {
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

func (c *Collector) readStats() (Stats, error) {
	var st Stats
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
