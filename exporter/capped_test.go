package exporter

import (
	"fmt"
	"math/rand"
	"net/netip"
	"slices"
	"sort"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/nsflow/nsflow/collector/flow"
)

func labelMap(ls []*dto.LabelPair) map[string]string {
	m := map[string]string{}
	for _, l := range ls {
		m[l.GetName()] = l.GetValue()
	}
	return m
}

// series is one scrape: metric name and labels (name=value,...) -> value.
type series map[string]float64

func gatherSeries(t *testing.T, reg *prometheus.Registry) series {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	out := series{}
	for _, mf := range mfs {
		for _, m := range mf.Metric {
			var ls []string
			for _, l := range m.Label {
				ls = append(ls, l.GetName()+"="+l.GetValue())
			}
			out[mf.GetName()+"{"+strings.Join(ls, ",")+"}"] = m.GetCounter().GetValue() + m.GetGauge().GetValue()
		}
	}
	return out
}

// sumBy adds up the series of a metric by the given labels.
func (s series) sumBy(metric string, by ...string) map[string]float64 {
	out := map[string]float64{}
	for k, v := range s {
		name, rest, _ := strings.Cut(k, "{")
		if name != metric {
			continue
		}
		l := map[string]string{}
		for _, p := range strings.Split(strings.TrimSuffix(rest, "}"), ",") {
			n, v, _ := strings.Cut(p, "=")
			l[n] = v
		}
		var key []string
		for _, b := range by {
			key = append(key, l[b])
		}
		out[strings.Join(key, "/")] += v
	}
	return out
}

// count returns how many series of a metric have (or, with not, do not
// have) label=value.
func (s series) count(metric, label, value string, not bool) int {
	n := 0
	for k := range s {
		if name, _, _ := strings.Cut(k, "{"); name == metric && strings.Contains(k, label+"="+value) != not {
			n++
		}
	}
	return n
}

// checkMonotonic fails for a series of prefix that went down from prev to
// cur, and returns how many of prev's series are in cur.
func checkMonotonic(t *testing.T, step int, prefix string, prev, cur series) int {
	t.Helper()
	kept := 0
	for k, v := range prev {
		if !strings.HasPrefix(k, prefix) {
			continue
		}
		if w, ok := cur[k]; ok {
			kept++
			if w < v {
				t.Errorf("step %d: %s went down from %v to %v", step, k, v, w)
			}
		}
	}
	return kept
}

// flowSim is a synthetic flow map and its totals over a sequence of
// scrapes: traffic on flows, packets in no flow (non-IP), new flows,
// evictions, re-created flows, and reads where the flows were read after
// more packets than the totals were.
type flowSim struct {
	rng    *rand.Rand
	points []flowEntry // (ino, idx, dir) of each observation point
	totals map[flowEntry]flow.Counters
	flows  map[flowEntry]*flow.Counters
}

func newFlowSim(seed int64) *flowSim {
	s := &flowSim{rng: rand.New(rand.NewSource(seed)), totals: map[flowEntry]flow.Counters{}, flows: map[flowEntry]*flow.Counters{}}
	for _, p := range []struct {
		ino uint64
		idx int
	}{{1, 1}, {1, 2}, {2, 2}} {
		for _, d := range []flow.Direction{flow.RX, flow.TX} {
			s.points = append(s.points, flowEntry{ino: p.ino, idx: p.idx, dir: d})
		}
	}
	return s
}

func (s *flowSim) point(e flowEntry) flowEntry { return flowEntry{ino: e.ino, idx: e.idx, dir: e.dir} }

// step changes the maps; the flows gain pending packets that the totals
// gain only at the next step when skew (read between the two).
func (s *flowSim) step(skew bool) (snapTotals map[flowEntry]flow.Counters, pending map[flowEntry]flow.Counters) {
	for n := s.rng.Intn(12); n > 0; n-- {
		switch r := s.rng.Intn(10); {
		case r < 5 && len(s.flows) > 0: // traffic on a flow
			e := s.pick()
			c := flow.Counters{Packets: uint64(1 + s.rng.Intn(50))}
			c.Bytes = c.Packets * uint64(60+s.rng.Intn(1400))
			*s.flows[e] = add(*s.flows[e], c)
			s.totals[s.point(e)] = add(s.totals[s.point(e)], c)
		case r < 7: // a new (or re-created) flow: keys from a small space
			p := s.points[s.rng.Intn(len(s.points))]
			e := p
			e.proto, e.src, e.dst = 6, netip.AddrFrom4([4]byte{10, 0, 0, byte(s.rng.Intn(4))}), netip.MustParseAddr("10.0.1.1")
			e.sport, e.dport = uint16(40000+s.rng.Intn(6)), 80
			if s.flows[e] == nil {
				c := flow.Counters{Packets: uint64(1 + s.rng.Intn(20)), Bytes: 0}
				c.Bytes = c.Packets * 100
				s.flows[e] = &c
				s.totals[p] = add(s.totals[p], c)
			}
		case r < 8 && len(s.flows) > 0: // evicted: its packets stay in the totals
			delete(s.flows, s.pick())
		default: // non-IP
			p := s.points[s.rng.Intn(len(s.points))]
			s.totals[p] = add(s.totals[p], flow.Counters{Packets: 1, Bytes: 42})
		}
	}
	snapTotals = map[flowEntry]flow.Counters{}
	for k, v := range s.totals {
		snapTotals[k] = v
	}
	pending = map[flowEntry]flow.Counters{}
	if skew && len(s.flows) > 0 {
		// Packets counted after the totals were read, before the flows.
		for n := 1 + s.rng.Intn(3); n > 0; n-- {
			e := s.pick()
			c := flow.Counters{Packets: 3, Bytes: 300}
			*s.flows[e] = add(*s.flows[e], c)
			s.totals[s.point(e)] = add(s.totals[s.point(e)], c)
			pending[e] = add(pending[e], c)
		}
	}
	return snapTotals, pending
}

// keys returns the flows' keys in a fixed order (the simulation is
// deterministic for its seed).
func (s *flowSim) keys() []flowEntry {
	ks := make([]flowEntry, 0, len(s.flows))
	for k := range s.flows {
		ks = append(ks, k)
	}
	sort.Slice(ks, func(a, b int) bool {
		x, y := ks[a], ks[b]
		switch {
		case x.ino != y.ino:
			return x.ino < y.ino
		case x.idx != y.idx:
			return x.idx < y.idx
		case x.dir != y.dir:
			return x.dir < y.dir
		case x.src != y.src:
			return x.src.Less(y.src)
		}
		return x.sport < y.sport
	})
	return ks
}

func (s *flowSim) pick() flowEntry {
	ks := s.keys()
	return ks[s.rng.Intn(len(ks))]
}

func (s *flowSim) snapshot(totals map[flowEntry]flow.Counters) *flow.Snapshot {
	c := func(ino uint64, idx int, d flow.Direction) flow.Counters {
		return totals[flowEntry{ino: ino, idx: idx, dir: d}]
	}
	iface := func(ino uint64, idx int, name string) flow.InterfaceStats {
		return flow.InterfaceStats{Name: name, Index: idx, State: flow.StateAttached, RX: c(ino, idx, flow.RX), TX: c(ino, idx, flow.TX)}
	}
	snap := &flow.Snapshot{Namespaces: []flow.NamespaceStats{
		{Name: "a", Inode: 1, Interfaces: []flow.InterfaceStats{iface(1, 1, "lo"), iface(1, 2, "eth0")}},
		{Name: "b", Inode: 2, Interfaces: []flow.InterfaceStats{iface(2, 2, "eth0")}},
	}}
	names := map[int]string{1: "lo", 2: "eth0"}
	for _, k := range s.keys() {
		f := flow.Flow{Key: flow.Key{Netns: map[uint64]string{1: "a", 2: "b"}[k.ino], NetnsInode: k.ino, Interface: names[k.idx], Ifindex: k.idx,
			Direction: k.dir, Protocol: k.proto, Src: k.src, Dst: k.dst, SrcPort: k.sport, DstPort: k.dport}}
		f.Packets, f.Bytes = s.flows[k].Packets, s.flows[k].Bytes
		snap.Flows = append(snap.Flows, f)
	}
	s.rng.Shuffle(len(snap.Flows), func(a, b int) { snap.Flows[a], snap.Flows[b] = snap.Flows[b], snap.Flows[a] })
	snap.Stats.FlowEntries = uint64(len(snap.Flows))
	return snap
}

// Flow series with a cap, over 300 scrapes of churn: for every observation
// point, the flow series plus the remainder equal the totals exactly
// whenever the read was consistent (also right after a skewed one); every
// series is monotonic; at most max-series flow series; a flow keeps its
// series while it is in the map, and free places are taken.
func TestFlowSeriesAddUp(t *testing.T) {
	for _, tc := range []struct {
		name    string
		max     int
		seed    int64
		select_ bool
	}{{"cap3", 3, 1, false}, {"cap3-select", 3, 1, true}, {"cap0", 0, 2, false}, {"cap8", 8, 3, false}, {"uncapped", -1, 4, false}, {"cap5-select", 5, 5, true}} {
		t.Run(tc.name, func(t *testing.T) {
			sim := newFlowSim(tc.seed)
			fs := &fakeSource{}
			var src Source = fs
			if tc.select_ {
				src = &selectSource{fakeSource: *fs}
			}
			setSnap := func(s *flow.Snapshot) {
				fs.snap = s
				if ss, ok := src.(*selectSource); ok {
					ss.snap = s
				}
			}
			reg := prometheus.NewPedanticRegistry()
			reg.MustRegister(New(src, Config{Flows: true, MaxFlowSeries: tc.max}))
			var prev series
			var prevLive map[flowEntry]bool
			exact, skewed := 0, 0
			for step := 0; step < 300; step++ {
				skew := step%7 == 3
				totals, _ := sim.step(skew)
				snap := sim.snapshot(totals)
				setSnap(snap)
				cur := gatherSeries(t, reg)

				flowsP := cur.sumBy("nsflow_flow_packets_total", "netns", "interface", "direction")
				flowsB := cur.sumBy("nsflow_flow_bytes_total", "netns", "interface", "direction")
				totP := cur.sumBy("nsflow_packets_total", "netns", "interface", "direction")
				totB := cur.sumBy("nsflow_bytes_total", "netns", "interface", "direction")
				if len(totP) != 6 || len(flowsP) != 6 {
					t.Fatalf("step %d: %d points in the totals, %d in the flow series", step, len(totP), len(flowsP))
				}
				if !skew {
					exact++
					for k, v := range totP {
						if flowsP[k] != v || flowsB[k] != totB[k] {
							t.Errorf("step %d: %s: flow series sum to %v packets %v bytes, totals %v %v", step, k, flowsP[k], flowsB[k], v, totB[k])
						}
					}
				} else {
					skewed++
				}
				n := cur.count("nsflow_flow_packets_total", "protocol", "other", true)
				live := len(snap.Flows)
				want := live
				if tc.max >= 0 {
					want = min(tc.max, live)
				}
				if n > want || (tc.max < 0 && n != live) {
					t.Errorf("step %d: %d flow series, cap %d, %d flows in the map", step, n, tc.max, live)
				}
				if prev != nil {
					checkMonotonic(t, step, "nsflow_flow_packets_total", prev, cur)
					checkMonotonic(t, step, "nsflow_flow_bytes_total", prev, cur)
					// Sticky: a flow with a series whose entry is still in
					// the map keeps it.
					for k, v := range prev {
						if !strings.HasPrefix(k, "nsflow_flow_packets_total") || strings.Contains(k, "protocol=other") {
							continue
						}
						if _, ok := cur[k]; !ok && prevLive[seriesEntry(k)] && sim.flows[seriesEntry(k)] != nil {
							t.Errorf("step %d: %s (%v) lost its series while its flow is in the map", step, k, v)
						}
					}
				}
				prev = cur
				prevLive = map[flowEntry]bool{}
				for k := range sim.flows {
					prevLive[k] = true
				}
			}
			if exact < 250 || skewed < 40 {
				t.Fatalf("%d exact and %d skewed steps", exact, skewed)
			}
		})
	}
}

// seriesEntry maps a flow series of the simulation back to its flow.
func seriesEntry(k string) flowEntry {
	l := map[string]string{}
	_, rest, _ := strings.Cut(k, "{")
	for _, p := range strings.Split(strings.TrimSuffix(rest, "}"), ",") {
		n, v, _ := strings.Cut(p, "=")
		l[n] = v
	}
	e := flowEntry{ino: map[string]uint64{"a": 1, "b": 2}[l["netns"]], idx: map[string]int{"lo": 1, "eth0": 2}[l["interface"]],
		dir: flow.Direction(l["direction"]), proto: 6}
	e.src, _ = netip.ParseAddr(l["src"])
	e.dst, _ = netip.ParseAddr(l["dst"])
	fmt.Sscan(l["src_port"], &e.sport)
	fmt.Sscan(l["dst_port"], &e.dport)
	return e
}

// The first scrape gives every flow that fits its whole count; a flow
// placed later starts from 0 when the remainder cannot give its count up.
func TestFlowSeriesStart(t *testing.T) {
	a, b := netip.MustParseAddr("10.0.0.1"), netip.MustParseAddr("10.0.0.2")
	mk := func(sport uint16, p uint64) flow.Flow {
		return flow.Flow{Key: flow.Key{Netns: "a", NetnsInode: 1, Interface: "lo", Ifindex: 1, Direction: flow.TX, Protocol: 17, Src: a, Dst: b, SrcPort: sport, DstPort: 53},
			Packets: p, Bytes: p * 100}
	}
	snap := func(total uint64, flows ...flow.Flow) *flow.Snapshot {
		return &flow.Snapshot{Namespaces: []flow.NamespaceStats{{Name: "a", Inode: 1, Interfaces: []flow.InterfaceStats{
			{Name: "lo", Index: 1, State: flow.StateAttached, TX: flow.Counters{Packets: total, Bytes: total * 100}}}}},
			Flows: flows, Stats: flow.Stats{FlowEntries: uint64(len(flows))}}
	}
	fs := &fakeSource{snap: snap(30, mk(1, 10), mk(2, 20))}
	reg := prometheus.NewPedanticRegistry()
	reg.MustRegister(New(fs, Config{Flows: true, MaxFlowSeries: 1}))
	get := func(s series, sport string) float64 {
		return s[`nsflow_flow_packets_total{direction=tx,dst=`+map[bool]string{true: "", false: "10.0.0.2"}[sport == ""]+
			`,dst_port=`+map[bool]string{true: "", false: "53"}[sport == ""]+`,interface=lo,netns=a,protocol=`+
			map[bool]string{true: "other", false: "udp"}[sport == ""]+`,src=`+map[bool]string{true: "", false: "10.0.0.1"}[sport == ""]+
			`,src_port=`+sport+`}`]
	}
	check := func(step int, want map[string]float64) {
		t.Helper()
		s := gatherSeries(t, reg)
		for port, v := range want {
			if got := get(s, port); got != v {
				t.Errorf("scrape %d: series src_port=%q is %v, want %v", step, port, got, v)
			}
		}
	}
	// Cap 1: flow 2 (20) placed with its whole count, flow 1 in the
	// remainder (10).
	check(1, map[string]float64{"2": 20, "1": 0, "": 10})
	// Flow 3 (50) appears: no free place, it is in the remainder.
	fs.snap = snap(80, mk(1, 10), mk(2, 20), mk(3, 50))
	check(2, map[string]float64{"2": 20, "3": 0, "": 60})
	// Flow 2 evicted: its 20 go to the remainder, which can give up 20
	// (80 minus its last 60), not flow 3's 50: flow 3 takes the place from 0.
	fs.snap = snap(80, mk(1, 10), mk(3, 50))
	check(3, map[string]float64{"3": 0, "": 80})
	fs.snap = snap(83, mk(1, 10), mk(3, 53))
	check(4, map[string]float64{"3": 3, "": 80})
	// Flow 3 counted 2 more, was evicted and re-created with 2: its
	// series goes on (+2), the 2 lost go to the remainder.
	fs.snap = snap(87, mk(1, 10), mk(3, 2))
	check(5, map[string]float64{"3": 5, "": 82})
	// Flow 3 evicted: its 5 go to the remainder, which can give up only
	// those 5 (87 minus its last 82), not flow 1's 10: flow 1 starts at 0.
	fs.snap = snap(87, mk(1, 10))
	check(6, map[string]float64{"1": 0, "": 87})
	// Quiet: every flow series and the remainder hold still.
	check(7, map[string]float64{"1": 0, "": 87})
	fs.snap = snap(88, mk(1, 11))
	check(8, map[string]float64{"1": 1, "": 87})
}

// Container series with a cap, over scrapes of churn (containers restarted
// in new cgroups, entries evicted, new containers): per namespace and
// direction they add up to the totals, are monotonic, and at most
// max-series of them besides the remainders.
func TestContainerSeriesAddUp(t *testing.T) {
	rng := rand.New(rand.NewSource(7))
	type ent struct {
		ino    uint64
		iface  string
		dir    flow.Direction
		cgroup uint64
	}
	totals := map[ent]flow.Counters{} // cgroup 0: the point's total
	entries := map[ent]flow.Counters{}
	names := map[uint64]string{} // cgroup -> container
	pods := map[uint64]string{1: "p1", 2: "p2"}
	ifaces := map[string]int{"lo": 1, "eth0": 2}
	nextCg := uint64(100)
	reg := prometheus.NewPedanticRegistry()
	fs := &fakeSource{}
	const max = 3
	reg.MustRegister(New(fs, Config{Containers: true, MaxContainerSeries: max}))
	var prev series
	for step := 0; step < 300; step++ {
		for n := rng.Intn(8); n > 0; n-- {
			ino := uint64(1 + rng.Intn(2))
			iface := []string{"lo", "eth0"}[rng.Intn(2)]
			dir := []flow.Direction{flow.RX, flow.TX}[rng.Intn(2)]
			c := flow.Counters{Packets: uint64(1 + rng.Intn(9)), Bytes: uint64(100 + rng.Intn(900))}
			totals[ent{ino, iface, dir, 0}] = add(totals[ent{ino, iface, dir, 0}], c)
			switch r := rng.Intn(10); {
			case r < 2: // unknown sender
			case r < 3: // a container (re)started in a new cgroup
				names[nextCg] = fmt.Sprintf("c%d", rng.Intn(6))
				entries[ent{ino, iface, dir, nextCg}] = add(entries[ent{ino, iface, dir, nextCg}], c)
				nextCg++
			default:
				var cgs []uint64
				for cg := range names {
					cgs = append(cgs, cg)
				}
				slices.Sort(cgs)
				if len(cgs) == 0 {
					continue
				}
				cg := cgs[rng.Intn(len(cgs))]
				entries[ent{ino, iface, dir, cg}] = add(entries[ent{ino, iface, dir, cg}], c)
			}
		}
		if rng.Intn(5) == 0 && len(entries) > 0 { // an entry evicted
			var ks []ent
			for k := range entries {
				ks = append(ks, k)
			}
			sort.Slice(ks, func(a, b int) bool { return fmt.Sprint(ks[a]) < fmt.Sprint(ks[b]) })
			delete(entries, ks[rng.Intn(len(ks))])
		}
		snap := &flow.Snapshot{}
		for _, ino := range []uint64{1, 2} {
			ns := flow.NamespaceStats{Name: fmt.Sprintf("ns%d", ino), Inode: ino, Pod: &flow.PodInfo{Name: pods[ino], Namespace: "default"}}
			for _, name := range []string{"lo", "eth0"} {
				ns.Interfaces = append(ns.Interfaces, flow.InterfaceStats{Name: name, Index: ifaces[name], State: flow.StateAttached,
					RX: totals[ent{ino, name, flow.RX, 0}], TX: totals[ent{ino, name, flow.TX, 0}]})
			}
			snap.Namespaces = append(snap.Namespaces, ns)
		}
		var ks []ent
		for k := range entries {
			ks = append(ks, k)
		}
		sort.Slice(ks, func(a, b int) bool { return fmt.Sprint(ks[a]) < fmt.Sprint(ks[b]) })
		for _, k := range ks {
			snap.Containers = append(snap.Containers, flow.ContainerStats{Netns: fmt.Sprintf("ns%d", k.ino), NetnsInode: k.ino, Interface: k.iface,
				Direction: k.dir, Cgroup: k.cgroup, Container: names[k.cgroup], Pod: &flow.PodInfo{Name: pods[k.ino], Namespace: "default"}, Counters: entries[k]})
		}
		fs.snap = snap
		cur := gatherSeries(t, reg)
		ctrP := cur.sumBy("nsflow_container_packets_total", "netns", "direction")
		ctrB := cur.sumBy("nsflow_container_bytes_total", "netns", "direction")
		totP := cur.sumBy("nsflow_packets_total", "netns", "direction")
		totB := cur.sumBy("nsflow_bytes_total", "netns", "direction")
		if len(totP) != 4 {
			t.Fatalf("step %d: %d groups", step, len(totP))
		}
		for k, v := range totP {
			if ctrP[k] != v || ctrB[k] != totB[k] {
				t.Errorf("step %d: %s: container series sum to %v packets %v bytes, totals %v %v", step, k, ctrP[k], ctrB[k], v, totB[k])
			}
		}
		if n := cur.count("nsflow_container_packets_total", "container", ",", true); n > max {
			// container="" is followed by ","
			t.Errorf("step %d: %d container series, cap %d", step, n, max)
		}
		if prev != nil {
			checkMonotonic(t, step, "nsflow_container_", prev, cur)
			checkMonotonic(t, step, "nsflow_packets_total", prev, cur)
		}
		prev = cur
	}
	if len(names) < 10 {
		t.Fatalf("only %d cgroups made", len(names))
	}
}
