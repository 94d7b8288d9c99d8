package report

import (
	"fmt"
	"sort"

	"github.com/nsflow/nsflow/collector/flow"
)

// AggregateBy is what trace and top sum flows by (--aggregate-by).
type AggregateBy string

const (
	ByFlow      AggregateBy = "flow"      // no aggregation: one row per flow
	ByContainer AggregateBy = "container" // per (point, source and destination container)
	ByPod       AggregateBy = "pod"       // per (point, source and destination pod)
	ByNetns     AggregateBy = "netns"     // per observation point
)

// AggregateKinds are the values --aggregate-by takes.
var AggregateKinds = []AggregateBy{ByFlow, ByContainer, ByPod, ByNetns}

// ParseAggregateBy checks an --aggregate-by value.
func ParseAggregateBy(s string) (AggregateBy, error) {
	for _, k := range AggregateKinds {
		if string(k) == s {
			return k, nil
		}
	}
	return "", fmt.Errorf("must be flow, container, pod or netns, got %q", s)
}

// Attributed reports whether the aggregation needs the flows' containers
// (collector attribution).
func (a AggregateBy) Attributed() bool { return a == ByContainer || a == ByPod }

// AggKey is an aggregated row's key. Every row is counted at one
// observation point (netns, interface, direction), so no packet is counted
// twice in a row. By container and by pod, the flows received on lo are
// left out: a packet over lo is seen at lo's tx and again at its rx with
// the same source and destination, and is counted once, at tx. By netns
// every observation point is a row of its own.
type AggKey struct {
	Netns      string
	NetnsInode uint64
	Interface  string
	Direction  flow.Direction
	// SrcPod and DstPod are "namespace/name" (by container and by pod);
	// SrcContainer and DstContainer (by container). "" unknown.
	SrcPod, SrcContainer string
	DstPod, DstContainer string
}

// AggRow is the sum of the flows of one key.
type AggRow struct {
	AggKey
	Flows int // how many flows were summed
	flow.Counters
}

// Aggregate sums flows (of snap's namespaces, for their pods) by the key
// the aggregation asks for, sorted by key. A flow whose pod the collector
// did not name takes, as its source when sent (tx) and as its destination
// when received (rx), the pod of the namespace it is observed in: packets
// sent in a pod's namespace come from that pod, packets received there go
// to it.
func Aggregate(by AggregateBy, namespaces []flow.NamespaceStats, flows []flow.Flow) []AggRow {
	pods := map[uint64]string{}
	for _, ns := range namespaces {
		if ns.Pod != nil {
			pods[ns.Inode] = ns.Pod.Namespace + "/" + ns.Pod.Name
		}
	}
	index := map[AggKey]int{}
	var rows []AggRow
	for i := range flows {
		f := &flows[i]
		k := AggKey{Netns: f.Netns, NetnsInode: f.NetnsInode, Interface: f.Interface, Direction: f.Direction}
		if by == ByContainer || by == ByPod {
			if f.Direction == flow.RX && f.Interface == "lo" {
				continue
			}
			k.SrcPod, k.DstPod = f.SrcPod, f.DstPod
			if k.SrcPod == "" && f.Direction == flow.TX {
				k.SrcPod = pods[f.NetnsInode]
			}
			if k.DstPod == "" && (f.Direction == flow.RX || f.Interface == "lo") {
				k.DstPod = pods[f.NetnsInode]
			}
			if by == ByContainer {
				k.SrcContainer, k.DstContainer = f.SrcContainer, f.DstContainer
			}
		}
		j, ok := index[k]
		if !ok {
			j = len(rows)
			index[k] = j
			rows = append(rows, AggRow{AggKey: k})
		}
		rows[j].Flows++
		rows[j].Packets += f.Packets
		rows[j].Bytes += f.Bytes
	}
	sort.Slice(rows, func(a, b int) bool { return rows[a].AggKey.less(&rows[b].AggKey) })
	return rows
}

func (k *AggKey) less(o *AggKey) bool {
	if k.NetnsInode != o.NetnsInode && k.Netns == o.Netns {
		return k.NetnsInode < o.NetnsInode
	}
	for _, p := range [][2]string{{k.Netns, o.Netns}, {k.Interface, o.Interface}, {string(k.Direction), string(o.Direction)},
		{k.SrcPod, o.SrcPod}, {k.SrcContainer, o.SrcContainer}, {k.DstPod, o.DstPod}, {k.DstContainer, o.DstContainer}} {
		if p[0] != p[1] {
			return p[0] < p[1]
		}
	}
	return false
}

// SortRows orders rows largest first by bytes or packets (ties: by key).
func SortRows(rows []AggRow, by flow.SortKey) {
	sort.SliceStable(rows, func(a, b int) bool {
		x, y := &rows[a], &rows[b]
		if by == flow.SortPackets && x.Packets != y.Packets {
			return x.Packets > y.Packets
		}
		if x.Bytes != y.Bytes {
			return x.Bytes > y.Bytes
		}
		return x.Packets > y.Packets
	})
}
