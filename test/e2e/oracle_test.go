package e2e

import (
	"fmt"
	"net"
	"testing"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"

	"github.com/nsflow/nsflow/collector"
	"github.com/nsflow/nsflow/collector/flow"
)

// ethHeader is the Ethernet header nsflow counts in bytes and the kernel's
// lo counters leave out (see flow.Counters).
const ethHeader = 14

// point is an observation point: namespace inode, interface name, direction.
type point struct {
	inode uint64
	iface string
	dir   flow.Direction
}

// counts maps observation points to packets and bytes.
type counts map[point]flow.Counters

// kernelCounts reads the kernel's own interface counters inside each
// namespace, converted to nsflow's byte definition (lo: + 14 per packet).
func kernelCounts(t *testing.T, paths map[uint64]string) counts {
	t.Helper()
	out := counts{}
	for ino, path := range paths {
		h, err := netns.GetFromPath(path)
		if err != nil {
			t.Fatalf("open %s: %v", path, err)
		}
		nl, err := netlink.NewHandleAt(h)
		if err != nil {
			h.Close()
			t.Fatalf("netlink in %s: %v", path, err)
		}
		links, err := nl.LinkList()
		nl.Close()
		h.Close()
		if err != nil {
			t.Fatalf("list links in %s: %v", path, err)
		}
		for _, l := range links {
			a := l.Attrs()
			s := a.Statistics
			rxb, txb := s.RxBytes, s.TxBytes
			if a.Flags&net.FlagLoopback != 0 {
				rxb += ethHeader * s.RxPackets
				txb += ethHeader * s.TxPackets
			}
			out[point{ino, a.Name, flow.RX}] = flow.Counters{Packets: s.RxPackets, Bytes: rxb}
			out[point{ino, a.Name, flow.TX}] = flow.Counters{Packets: s.TxPackets, Bytes: txb}
		}
	}
	return out
}

// nsflowCounts flattens a snapshot's totals for the given namespaces.
func nsflowCounts(snap *flow.Snapshot, paths map[uint64]string) counts {
	out := counts{}
	for _, ns := range snap.Namespaces {
		if _, ok := paths[ns.Inode]; !ok {
			continue
		}
		for _, i := range ns.Interfaces {
			out[point{ns.Inode, i.Name, flow.RX}] = i.RX
			out[point{ns.Inode, i.Name, flow.TX}] = i.TX
		}
	}
	return out
}

// quiescentRead reads nsflow's counters bracketed by two reads of the
// kernel's: when both kernel reads agree, no packet crossed any observed
// interface during the nsflow read, so the two views are of one instant.
func quiescentRead(t *testing.T, c *collector.Collector, paths map[uint64]string) (kernel, ours counts) {
	t.Helper()
	for try := 0; try < 200; try++ {
		before := kernelCounts(t, paths)
		snap, err := c.Snapshot()
		if err != nil {
			t.Fatalf("snapshot: %v", err)
		}
		after := kernelCounts(t, paths)
		if equalCounts(before, after) {
			return after, nsflowCounts(snap, paths)
		}
	}
	t.Fatal("interfaces never quiet for one snapshot")
	return nil, nil
}

func equalCounts(a, b counts) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if b[k] != v {
			return false
		}
	}
	return true
}

// delta returns end - start per point (points absent at start count from 0).
func delta(start, end counts) counts {
	out := counts{}
	for k, v := range end {
		s := start[k]
		out[k] = flow.Counters{Packets: v.Packets - s.Packets, Bytes: v.Bytes - s.Bytes}
	}
	return out
}

func (p point) String() string { return fmt.Sprintf("netns %d %s %s", p.inode, p.iface, p.dir) }
