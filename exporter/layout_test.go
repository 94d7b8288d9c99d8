package exporter

import (
	"bytes"
	"net/netip"
	"testing"

	"github.com/nsflow/nsflow/collector/flow"
)

// A scrape reuses the last scrape's layout while the namespaces and
// interfaces read are the same: every scrape of a sequence that adds,
// removes, renames and re-creates them, and changes only counters in
// between, exports what a new exporter's first scrape of the same
// snapshot does. Some steps change one field and nothing else (an
// interface's liveness; of a live namespace, its pod arriving late from
// CRI, its pod's name or namespace, its name, its inode, an interface's
// index): each makes the test fail if fits ignores that field (checked by
// breaking fits). The inode and index steps change only what the flow and container series
// map to their points (the layout's members), which the run with --flows
// and --containers checks.
func TestLayoutReuse(t *testing.T) {
	c := func(p, b uint64) flow.Counters { return flow.Counters{Packets: p, Bytes: b} }
	at := flow.StateAttached
	base := func(n uint64) *flow.Snapshot {
		return &flow.Snapshot{Namespaces: []flow.NamespaceStats{
			{Name: "host", Inode: 1, Interfaces: []flow.InterfaceStats{
				{Name: "lo", Index: 1, State: at, RX: c(n, 100*n), TX: c(n, 100*n)},
				{Name: "nsf-1", Index: 5, State: at, RX: c(2*n, 200), TX: c(3, 300*n)},
			}},
			{Name: "web", Inode: 2, Pod: &flow.PodInfo{Name: "web-1", Namespace: "shop"}, Interfaces: []flow.InterfaceStats{
				{Name: "lo", Index: 1, State: at, RX: c(n+1, 10), TX: c(n+1, 10)},
				{Name: "eth0", Index: 2, State: at, RX: c(4, 40*n), TX: c(5*n, 50)},
			}},
		}}
	}
	var steps []*flow.Snapshot
	steps = append(steps, base(1), base(2)) // counters only
	s := base(3)                            // a pod added
	s.Namespaces = append(s.Namespaces, flow.NamespaceStats{Name: "db", Inode: 3, Pod: &flow.PodInfo{Name: "db-0", Namespace: "shop"},
		Interfaces: []flow.InterfaceStats{{Name: "eth0", Index: 2, State: at, RX: c(7, 70), TX: c(8, 80)}}})
	steps = append(steps, s)
	s = base(4) // its interface re-created under its name, the old one awaiting its grace period
	s.Namespaces[0].Interfaces = append(s.Namespaces[0].Interfaces, flow.InterfaceStats{Name: "nsf-1", Index: 9, State: at, RX: c(1, 1), TX: c(1, 1)})
	s.Namespaces[0].Interfaces[1].State = flow.StateDetached
	steps = append(steps, s)
	s = base(4) // only the re-created one's state: detached too, both gone (summed)
	s.Namespaces[0].Interfaces = append(s.Namespaces[0].Interfaces, flow.InterfaceStats{Name: "nsf-1", Index: 9, State: flow.StateDetached, RX: c(1, 1), TX: c(1, 1)})
	s.Namespaces[0].Interfaces[1].State = flow.StateDetached
	steps = append(steps, s)
	s = base(5) // the pod's namespace gone, its labels changed
	s.Namespaces[1].Gone = true
	s.Namespaces[1].Pod = &flow.PodInfo{Name: "web-2", Namespace: "shop"}
	steps = append(steps, s, base(6), base(7))
	s = base(8) // an interface renamed (a tenant's name: escaped)
	s.Namespaces[1].Interfaces[1].Name = "eth\x1b0"
	steps = append(steps, s, base(9))

	// A live namespace found by its process ("pid:123"), then changed in
	// one field per step, its counters unchanged.
	late := func(n uint64, name string, pod *flow.PodInfo, ino uint64, idx int) *flow.Snapshot {
		s := base(n)
		s.Namespaces = append(s.Namespaces, flow.NamespaceStats{Name: name, Inode: ino, Pod: pod, Interfaces: []flow.InterfaceStats{
			{Name: "lo", Index: 1, State: at, RX: c(n, 10*n), TX: c(n, 10*n)},
			{Name: "eth0", Index: idx, State: at, RX: c(2*n, 20*n), TX: c(3*n, 30*n)},
		}})
		return s
	}
	api1 := &flow.PodInfo{Name: "api-1", Namespace: "shop"}
	api2 := &flow.PodInfo{Name: "api-2", Namespace: "shop"}
	api2b := &flow.PodInfo{Name: "api-2", Namespace: "stage"}
	steps = append(steps,
		late(10, "pid:123", nil, 4, 3),   // added, its pod not known yet
		late(10, "pid:123", nil, 4, 3),   // nothing changed
		late(10, "pid:123", api1, 4, 3),  // only its pod: known late from CRI
		late(10, "pid:123", api2, 4, 3),  // only its pod's name
		late(10, "pid:123", api2b, 4, 3), // only its pod's namespace
		late(10, "api", api2b, 4, 3),     // only its name (same inode, interfaces, state)
		late(10, "api", api2b, 5, 3),     // only its inode (re-created under its name, the old one pruned)
		late(10, "api", api2b, 5, 4),     // only an interface's index (re-created under its name)
		late(11, "api", api2b, 5, 4),     // counters only
	)

	// With --flows and --containers: one flow and one container entry per
	// interface and direction, as the collector names them (by the
	// namespace's inode and the interface's index and name; the container
	// by the namespace's pod, unknown without one).
	traffic := func(snap *flow.Snapshot) *flow.Snapshot {
		out := *snap
		out.Flows, out.Containers = nil, nil
		for _, ns := range snap.Namespaces {
			for _, it := range ns.Interfaces {
				for _, d := range []struct {
					dir flow.Direction
					c   flow.Counters
				}{{flow.RX, it.RX}, {flow.TX, it.TX}} {
					half := c(d.c.Packets/2, d.c.Bytes/2)
					src := netip.AddrFrom4([4]byte{10, byte(ns.Inode), byte(it.Index), 1})
					out.Flows = append(out.Flows, flow.Flow{Key: flow.Key{Netns: ns.Name, NetnsInode: ns.Inode, Interface: it.Name, Ifindex: it.Index,
						Direction: d.dir, Protocol: 6, Src: src, Dst: src.Next(), SrcPort: 40000, DstPort: 80}, Packets: half.Packets, Bytes: half.Bytes})
					ctr := flow.ContainerStats{Netns: ns.Name, NetnsInode: ns.Inode, Interface: it.Name, Direction: d.dir, Cgroup: 7000 + ns.Inode, Counters: half}
					if ns.Pod != nil {
						ctr.Container, ctr.Pod = "app", ns.Pod
					}
					out.Containers = append(out.Containers, ctr)
				}
			}
		}
		out.Stats.FlowEntries = uint64(len(out.Flows))
		return &out
	}

	for _, tc := range []struct {
		name string
		cfg  Config
	}{
		{"defaults", Config{}},
		// As serve builds it with --flows --containers (their default caps).
		{"flows+containers", Config{Flows: true, MaxFlowSeries: 1000, Containers: true, MaxContainerSeries: 1000}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			// e reuses its layout; fresh has the same history (the flow and
			// container series carry state from scrape to scrape) but
			// builds its layout anew for every scrape.
			src, freshSrc := &fakeSource{}, &fakeSource{}
			e, fresh := New(src, tc.cfg), New(freshSrc, tc.cfg)
			for i, snap := range steps {
				if tc.cfg.Flows || tc.cfg.Containers {
					snap = traffic(snap)
				}
				src.snap, freshSrc.snap = snap, snap
				got := scrape(t, e)
				fresh.layout = nil
				want := scrape(t, fresh)
				if !bytes.Equal(got, want) {
					t.Errorf("scrape %d:\n%s\nwant (a layout built anew):\n%s", i, got, want)
				}
				if !tc.cfg.Flows && !tc.cfg.Containers {
					// Without state: what a new exporter exports.
					if first := scrape(t, New(fakeSource{snap}, tc.cfg)); !bytes.Equal(got, first) {
						t.Errorf("scrape %d:\n%s\nwant (a new exporter's):\n%s", i, got, first)
					}
				}
			}
		})
	}
}
