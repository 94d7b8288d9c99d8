package exporter

import (
	"slices"
	"strings"

	dto "github.com/prometheus/client_model/go"

	"github.com/nsflow/nsflow/collector/flow"
)

// layout is what the per-interface series of a snapshot are, apart from
// their values: which interfaces each sums, in which order the series are
// sent, their label pairs. It depends only on the namespaces and
// interfaces read (names, inodes, indexes, pods, states), which change
// when pods come and go, not from one scrape to the next: a scrape whose
// snapshot fits the last layout only adds up counters.
//
// No two series may share a label set (the whole scrape would fail): an
// interface deleted and re-created under its name (or a namespace under
// its name) while the old one awaits its grace period gives two points one
// label set. The live one is exported alone: its series restarts from its
// own count (a counter reset, which rate() and increase() handle), and the
// gone twin's last increments since the previous scrape are given up.
// Summing them would look continuous but drop by the gone one's count when
// it is pruned, a reset after which increase() counts the live interface's
// whole total a second time. Points that are all gone are summed.
type layout struct {
	ifaces []ifaceShape // every interface of the snapshot, in its order
	// point is, per interface, the series it is summed into, or -1 (a
	// gone twin of a live interface).
	point   []int
	points  []pointKey
	members [][]ifaceID // per point, the interfaces it sums (if asked for)
	// order lists the points in the order the registry sorts series into
	// (by label values in the order of the label names: direction,
	// interface, namespace, netns, pod), so that its sort finds them
	// sorted: with 1,000 pods it took a sixth of a scrape's CPU time.
	order  []int
	labels [][2][]*dto.LabelPair // per point, its rx and tx label pairs
}

// ifaceShape is what an interface of a snapshot contributes to the layout.
type ifaceShape struct {
	netns, pod, podNS, iface string // unescaped
	ino                      uint64
	idx                      int
	live                     bool
}

func shapeOf(ns *flow.NamespaceStats, i *flow.InterfaceStats) ifaceShape {
	s := ifaceShape{netns: ns.Name, iface: i.Name, ino: ns.Inode, idx: i.Index,
		live: !ns.Gone && i.State != flow.StateDetached && i.State != ""}
	if ns.Pod != nil {
		s.pod, s.podNS = ns.Pod.Name, ns.Pod.Namespace
	}
	return s
}

// fits reports whether snap has the namespaces and interfaces l was built
// from (l may be nil). The collector's names are the same strings from one
// read to the next, so that comparing them is cheap.
func (l *layout) fits(snap *flow.Snapshot) bool {
	if l == nil {
		return false
	}
	n := 0
	for i := range snap.Namespaces {
		ns := &snap.Namespaces[i]
		for j := range ns.Interfaces {
			if n == len(l.ifaces) || l.ifaces[n] != shapeOf(ns, &ns.Interfaces[j]) {
				return false
			}
			n++
		}
	}
	return n == len(l.ifaces)
}

// pointLabelNames are the label names of the per-interface series, sorted
// as the registry wants them.
var pointLabelNames = [...]string{"direction", "interface", "namespace", "netns", "pod"}

// directions are the direction label values, rx and tx.
var directions = [...]string{string(flow.RX), string(flow.TX)}

// newLayout returns the layout of snap, with the interfaces each point
// sums if members (only the flow and container series need them).
func newLayout(snap *flow.Snapshot, members bool) *layout {
	n := 0
	for i := range snap.Namespaces {
		n += len(snap.Namespaces[i].Interfaces)
	}
	l := &layout{ifaces: make([]ifaceShape, 0, n), point: make([]int, 0, n), points: make([]pointKey, 0, n)}
	if members {
		l.members = make([][]ifaceID, 0, n)
	}
	index := make(map[pointKey]int, n)
	live := make([]bool, 0, n) // per point: it sums live interfaces only
	for i := range snap.Namespaces {
		ns := &snap.Namespaces[i]
		for j := range ns.Interfaces {
			s := shapeOf(ns, &ns.Interfaces[j])
			l.ifaces = append(l.ifaces, s)
			// Label values are valid UTF-8 whatever a tenant names things.
			p := pointKey{netns: flow.SafeName(s.netns), iface: flow.SafeName(s.iface), pod: flow.SafeName(s.pod), podNS: flow.SafeName(s.podNS)}
			k, ok := index[p]
			if !ok {
				k = len(l.points)
				index[p] = k
				l.points = append(l.points, p)
				if members {
					l.members = append(l.members, nil)
				}
				live = append(live, false)
			}
			switch {
			case s.live && !live[k]:
				if ok { // the live one replaces gone twins
					for n, pk := range l.point {
						if pk == k {
							l.point[n] = -1
						}
					}
				}
				if members {
					l.members[k] = nil
				}
				live[k] = true
			case !s.live && live[k]:
				l.point = append(l.point, -1) // a gone twin of a live one
				continue
			}
			l.point = append(l.point, k)
			if members {
				l.members[k] = append(l.members[k], ifaceID{s.ino, s.idx, s.iface})
			}
		}
	}
	l.order = make([]int, len(l.points))
	for k := range l.order {
		l.order[k] = k
	}
	slices.SortFunc(l.order, func(a, b int) int {
		pa, pb := &l.points[a], &l.points[b]
		if c := strings.Compare(pa.iface, pb.iface); c != 0 {
			return c
		}
		if c := strings.Compare(pa.podNS, pb.podNS); c != 0 {
			return c
		}
		if c := strings.Compare(pa.netns, pb.netns); c != 0 {
			return c
		}
		return strings.Compare(pa.pod, pb.pod)
	})
	// The label pairs of all the series in one block, in the order a
	// scrape sends them (near one another in memory: the registry and the
	// encoder read each several times), names shared, values the points'.
	n = len(l.points)
	pairs := make([]dto.LabelPair, 2*n*len(pointLabelNames))
	ptrs := make([]*dto.LabelPair, len(pairs))
	l.labels = make([][2][]*dto.LabelPair, n)
	for d := range directions {
		for o, k := range l.order {
			p := &l.points[k]
			at := (d*n + o) * len(pointLabelNames)
			for i, v := range [...]*string{&directions[d], &p.iface, &p.podNS, &p.netns, &p.pod} {
				pairs[at+i].Name, pairs[at+i].Value = &pointLabelNames[i], v
				ptrs[at+i] = &pairs[at+i]
			}
			l.labels[k][d] = ptrs[at : at+len(pointLabelNames) : at+len(pointLabelNames)]
		}
	}
	return l
}

// sum adds up, per point, the counters of the interfaces of snap (which
// fits l).
func (l *layout) sum(snap *flow.Snapshot) (rx, tx []flow.Counters) {
	rx, tx = make([]flow.Counters, len(l.points)), make([]flow.Counters, len(l.points))
	n := 0
	for i := range snap.Namespaces {
		for _, it := range snap.Namespaces[i].Interfaces {
			if k := l.point[n]; k >= 0 {
				rx[k].Packets += it.RX.Packets
				rx[k].Bytes += it.RX.Bytes
				tx[k].Packets += it.TX.Packets
				tx[k].Bytes += it.TX.Bytes
			}
			n++
		}
	}
	return rx, tx
}
