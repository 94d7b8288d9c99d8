// Package exporter exposes collector snapshots as Prometheus metrics. The
// maps are read at scrape time (a custom prometheus.Collector): nothing is
// cached across scrapes, so nothing can go stale. Concurrent scrapes share
// one read (Handler).
package exporter

import (
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"sync"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/nsflow/nsflow/collector"
	"github.com/nsflow/nsflow/collector/attach"
	"github.com/nsflow/nsflow/collector/flow"
)

const namespace = "nsflow"

// Config configures the exporter.
type Config struct {
	// Flows exports per-flow series (off by default: their cardinality is
	// unbounded by nature).
	Flows bool
	// MaxFlowSeries caps the flows exported per scrape, largest by bytes
	// first; the rest is counted in nsflow_flow_series_dropped_total.
	MaxFlowSeries int
}

// TopSource is a Source that can read only the n largest flows
// (collector.SnapshotTop): with --flows, a scrape then holds
// --flows.max-series flows, not the whole flow map.
type TopSource interface {
	SnapshotTop(n int) (*flow.Snapshot, error)
}

// Source is what the exporter reads at scrape time: a *collector.Collector.
type Source interface {
	Snapshot() (*flow.Snapshot, error)
	Totals() (*flow.Snapshot, error)
	Interfaces() []collector.NamespaceInfo
	AttachErrors() map[string]uint64
	Mode() attach.Mode
}

// Exporter is a prometheus.Collector over a Source.
type Exporter struct {
	c   Source
	cfg Config

	packets, bytes                            *prometheus.Desc
	flowPackets, flowBytes                    *prometheus.Desc
	namespaces, attachments, attachErrors     *prometheus.Desc
	flowEntries, flowCapacity, flowsEvicted   *prometheus.Desc
	flowInsertErrors, unparsed, totalsFull    *prometheus.Desc
	attachMode, flowSeriesDropped, scrapeErrs *prometheus.Desc

	mu           sync.Mutex
	droppedTotal uint64 // flow series left out by the cap, over all scrapes
	errorsTotal  uint64
	// labels keeps the label pairs of the per-interface series from one
	// scrape to the next (replaced, never modified: concurrent scrapes
	// may read it), so that a scrape builds them for new interfaces only.
	labels map[pointKey][]*dto.LabelPair
}

// New returns an exporter for c.
func New(c Source, cfg Config) *Exporter {
	// pod and namespace: the Kubernetes pod of the network namespace (empty
	// when none is known), named as cAdvisor and kube-state-metrics name them.
	point := []string{"netns", "interface", "direction", "pod", "namespace"}
	flow := []string{"netns", "interface", "direction", "protocol", "src", "dst", "src_port", "dst_port"}
	d := func(name, help string, labels ...string) *prometheus.Desc {
		return prometheus.NewDesc(prometheus.BuildFQName(namespace, "", name), help, labels, nil)
	}
	return &Exporter{
		c: c, cfg: cfg,
		packets:           d("packets_total", "Packets per network namespace, interface and direction (rx: ingress, tx: egress), exact.", point...),
		bytes:             d("bytes_total", "Bytes per network namespace, interface and direction, Ethernet header included.", point...),
		flowPackets:       d("flow_packets_total", "Packets per flow at an observation point (only with --flows; capped).", flow...),
		flowBytes:         d("flow_bytes_total", "Bytes per flow at an observation point (only with --flows; capped).", flow...),
		namespaces:        d("namespaces", "Network namespaces observed (state=observed) or removed and awaiting their grace period (state=gone).", "state"),
		attachments:       d("attachments", "Interfaces by the state of nsflow's programs on them.", "state"),
		attachErrors:      d("attach_errors_total", "Failed attaches, by reason.", "reason"),
		flowEntries:       d("flow_map_entries", "Flows in the flow map."),
		flowCapacity:      d("flow_map_capacity", "Capacity of the flow map (--flow-entries)."),
		flowsEvicted:      d("flows_evicted_total", "Flows evicted from the full flow map (their packets stay in the exact totals)."),
		flowInsertErrors:  d("flow_insert_errors_total", "New flows that could not be recorded in the flow map."),
		unparsed:          d("unparsed_packets_total", "Packets counted in the totals but in no flow, by reason (non_ip, truncated, no_device).", "reason"),
		totalsFull:        d("totals_map_full_total", "Packets the programs could not count into a slot of the exact totals (none in normal operation)."),
		attachMode:        d("attach_mode_info", "The attach mechanism in use (tcx or clsact).", "mode"),
		flowSeriesDropped: d("flow_series_dropped_total", "Flow series left out of scrapes by --flows.max-series."),
		scrapeErrs:        d("scrape_errors_total", "Scrapes that could not read the BPF maps completely."),
	}
}

// Describe implements prometheus.Collector.
func (e *Exporter) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{e.packets, e.bytes, e.namespaces, e.attachments, e.attachErrors,
		e.flowEntries, e.flowCapacity, e.flowsEvicted, e.flowInsertErrors, e.unparsed, e.totalsFull,
		e.attachMode, e.flowSeriesDropped, e.scrapeErrs} {
		ch <- d
	}
	if e.cfg.Flows {
		ch <- e.flowPackets
		ch <- e.flowBytes
	}
}

// Collect implements prometheus.Collector: it reads the maps now.
func (e *Exporter) Collect(ch chan<- prometheus.Metric) {
	read := e.c.Totals
	if e.cfg.Flows {
		read = e.c.Snapshot
		if ts, ok := e.c.(TopSource); ok && e.cfg.MaxFlowSeries >= 0 {
			read = func() (*flow.Snapshot, error) { return ts.SnapshotTop(e.cfg.MaxFlowSeries) }
		}
	}
	snap, err := read()
	e.mu.Lock()
	if err != nil {
		e.errorsTotal++
	}
	errorsTotal := e.errorsTotal
	e.mu.Unlock()
	ch <- prometheus.MustNewConstMetric(e.scrapeErrs, prometheus.CounterValue, float64(errorsTotal))
	if snap == nil {
		return
	}
	counter := func(d *prometheus.Desc, v uint64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, float64(v), labels...)
	}
	gauge := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, labels...)
	}

	// No two series may share a label set (the whole scrape would fail):
	// an interface deleted and re-created under its name (or a namespace
	// under its name) while the old one awaits its grace period gives two
	// points one label set. The live one is exported alone: its series
	// restarts from its own count (a counter reset, which rate() and
	// increase() handle), and the gone twin's last increments since the
	// previous scrape are given up. Summing them would look continuous but
	// drop by the gone one's count when it is pruned, a reset after which
	// increase() counts the live interface's whole total a second time.
	// Points that are all gone are summed.
	type point = pointKey
	type sum struct {
		rx, tx flow.Counters
		live   bool // the sum holds only live points
	}
	index := map[point]int{}
	var points []point
	var sums []sum
	var observed, gone int
	for _, ns := range snap.Namespaces {
		if ns.Gone {
			gone++
		} else {
			observed++
		}
		var pod, podNS string
		if ns.Pod != nil {
			pod, podNS = flow.SafeName(ns.Pod.Name), flow.SafeName(ns.Pod.Namespace)
		}
		for _, i := range ns.Interfaces {
			// Label values are valid UTF-8 whatever a tenant names things.
			p := point{netns: flow.SafeName(ns.Name), iface: flow.SafeName(i.Name), pod: pod, podNS: podNS}
			k, ok := index[p]
			if !ok {
				k = len(points)
				index[p] = k
				points = append(points, p)
				sums = append(sums, sum{})
			}
			s := &sums[k]
			live := !ns.Gone && i.State != flow.StateDetached && i.State != ""
			switch {
			case live && !s.live:
				*s = sum{live: true} // the live one replaces gone twins
			case !live && s.live:
				continue // a gone twin of a live one
			}
			s.rx.Packets += i.RX.Packets
			s.rx.Bytes += i.RX.Bytes
			s.tx.Packets += i.TX.Packets
			s.tx.Bytes += i.TX.Bytes
		}
	}
	// Emitted in the order the registry sorts them into (by label values
	// in the order of the label names: direction, interface, namespace,
	// netns, pod), so that its sort finds them sorted: with 1,000 pods it
	// took a sixth of a scrape's CPU time.
	order := make([]int, len(points))
	for k := range order {
		order[k] = k
	}
	slices.SortFunc(order, func(a, b int) int {
		pa, pb := &points[a], &points[b]
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
	e.mu.Lock()
	oldLabels := e.labels
	e.mu.Unlock()
	labels := make(map[pointKey][]*dto.LabelPair, len(points))
	pairs := func(p pointKey, dir flow.Direction) []*dto.LabelPair {
		p.dir = dir
		if l, ok := labels[p]; ok {
			return l
		}
		l, ok := oldLabels[p]
		if !ok {
			l = pointLabels(p)
		}
		labels[p] = l
		return l
	}
	for _, m := range []struct {
		d       *prometheus.Desc
		dir     flow.Direction
		packets bool
	}{{e.packets, flow.RX, true}, {e.packets, flow.TX, true}, {e.bytes, flow.RX, false}, {e.bytes, flow.TX, false}} {
		for _, k := range order {
			c := sums[k].rx
			if m.dir == flow.TX {
				c = sums[k].tx
			}
			v := c.Bytes
			if m.packets {
				v = c.Packets
			}
			ch <- &counterMetric{desc: m.d, labels: pairs(points[k], m.dir), value: float64(v)}
		}
	}
	e.mu.Lock()
	e.labels = labels
	e.mu.Unlock()
	gauge(e.namespaces, float64(observed), "observed")
	gauge(e.namespaces, float64(gone), "gone")

	states := map[flow.AttachState]int{flow.StateAttached: 0, flow.StateFailed: 0, flow.StateDetached: 0, flow.StatePeerObserved: 0}
	for _, ns := range e.c.Interfaces() {
		if ns.Gone {
			continue
		}
		for _, i := range ns.Interfaces {
			states[i.State]++
		}
	}
	for s, n := range states {
		gauge(e.attachments, float64(n), string(s))
	}
	for reason, n := range e.c.AttachErrors() {
		counter(e.attachErrors, n, reason)
	}
	gauge(e.attachMode, 1, string(e.c.Mode()))

	st := snap.Stats
	gauge(e.flowEntries, float64(st.FlowEntries))
	gauge(e.flowCapacity, float64(st.FlowCapacity))
	counter(e.flowsEvicted, st.FlowsEvicted)
	counter(e.flowInsertErrors, st.FlowInsertErrors)
	counter(e.unparsed, st.NonIP, "non_ip")
	counter(e.unparsed, st.Truncated, "truncated")
	counter(e.unparsed, st.NoDevice, "no_device")
	counter(e.totalsFull, st.TotalsFull)

	dropped := 0
	if e.cfg.Flows {
		// A TopSource's snapshot holds the largest flows only; all are
		// counted in FlowEntries.
		total := max(len(snap.Flows), int(st.FlowEntries))
		if _, ok := e.c.(TopSource); !ok || e.cfg.MaxFlowSeries < 0 {
			total = len(snap.Flows)
		}
		dropped = e.collectFlows(snap.Flows, total, counter)
	}
	e.mu.Lock()
	e.droppedTotal += uint64(dropped)
	droppedTotal := e.droppedTotal
	e.mu.Unlock()
	counter(e.flowSeriesDropped, droppedTotal)
}

// collectFlows exports the largest of flows up to the cap, and returns how
// many of total it left out. It holds the flows it exports only (flow.Top),
// not a copy of them all. Flows that differ only in what the labels do not
// show (none today: netns and interface names are unique while the flow map
// names them) are summed among those exported, so that no two series share a
// label set.
func (e *Exporter) collectFlows(flows []flow.Flow, total int, counter func(*prometheus.Desc, uint64, ...string)) int {
	top := flow.NewTop(e.cfg.MaxFlowSeries)
	for i := range flows {
		top.Offer(&flows[i])
	}
	kept := top.Flows()
	type key struct {
		netns, iface string
		dir          flow.Direction
		proto        flow.Protocol
		src, dst     netip.Addr
		sport, dport uint16
	}
	index := make(map[key]int, len(kept))
	sums := kept[:0]
	for _, f := range kept {
		k := key{f.Netns, f.Interface, f.Direction, f.Protocol, f.Src, f.Dst, f.SrcPort, f.DstPort}
		if i, ok := index[k]; ok {
			sums[i].Packets += f.Packets
			sums[i].Bytes += f.Bytes
			continue
		}
		index[k] = len(sums)
		sums = append(sums, f)
	}
	for i := range sums {
		f := &sums[i]
		labels := []string{flow.SafeName(f.Netns), flow.SafeName(f.Interface), string(f.Direction), f.Protocol.String(), f.Src.String(), f.Dst.String(),
			strconv.Itoa(int(f.SrcPort)), strconv.Itoa(int(f.DstPort))}
		counter(e.flowPackets, f.Packets, labels...)
		counter(e.flowBytes, f.Bytes, labels...)
	}
	return total - len(kept)
}

// pointKey identifies a per-interface series.
type pointKey struct {
	netns, iface, pod, podNS string
	dir                      flow.Direction
}

// pointLabels returns the label pairs of a per-interface series (its
// values made safe already), sorted by name as the registry wants them.
func pointLabels(p pointKey) []*dto.LabelPair {
	pair := func(name, value string) *dto.LabelPair {
		return &dto.LabelPair{Name: &name, Value: &value}
	}
	return []*dto.LabelPair{pair("direction", string(p.dir)), pair("interface", p.iface),
		pair("namespace", p.podNS), pair("netns", p.netns), pair("pod", p.pod)}
}

// counterMetric is a counter whose label pairs are shared between scrapes
// (what prometheus.MustNewConstMetric builds anew for every series of
// every scrape).
type counterMetric struct {
	desc   *prometheus.Desc
	labels []*dto.LabelPair
	value  float64
}

func (m *counterMetric) Desc() *prometheus.Desc { return m.desc }
func (m *counterMetric) Write(out *dto.Metric) error {
	out.Label = m.labels
	out.Counter = &dto.Counter{Value: &m.value}
	return nil
}
