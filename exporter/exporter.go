// Package exporter exposes collector snapshots as Prometheus metrics. The
// maps are read at scrape time (a custom prometheus.Collector): nothing is
// cached, so nothing can go stale.
package exporter

import (
	"net/netip"
	"sort"
	"strconv"
	"sync"

	"github.com/prometheus/client_golang/prometheus"

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

	var observed, gone int
	for _, ns := range snap.Namespaces {
		if ns.Gone {
			gone++
		} else {
			observed++
		}
		var pod, podNS string
		if ns.Pod != nil {
			pod, podNS = ns.Pod.Name, ns.Pod.Namespace
		}
		for _, i := range ns.Interfaces {
			counter(e.packets, i.RX.Packets, ns.Name, i.Name, string(flow.RX), pod, podNS)
			counter(e.packets, i.TX.Packets, ns.Name, i.Name, string(flow.TX), pod, podNS)
			counter(e.bytes, i.RX.Bytes, ns.Name, i.Name, string(flow.RX), pod, podNS)
			counter(e.bytes, i.TX.Bytes, ns.Name, i.Name, string(flow.TX), pod, podNS)
		}
	}
	gauge(e.namespaces, float64(observed), "observed")
	gauge(e.namespaces, float64(gone), "gone")

	states := map[flow.AttachState]int{flow.StateAttached: 0, flow.StateFailed: 0, flow.StateDetached: 0}
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
		dropped = e.collectFlows(snap.Flows, counter)
	}
	e.mu.Lock()
	e.droppedTotal += uint64(dropped)
	droppedTotal := e.droppedTotal
	e.mu.Unlock()
	counter(e.flowSeriesDropped, droppedTotal)
}

// collectFlows exports the largest flows up to the cap and returns how many
// it left out. Flows that differ only in what the labels do not show (none
// today) are summed, so that no two series share a label set.
func (e *Exporter) collectFlows(flows []flow.Flow, counter func(*prometheus.Desc, uint64, ...string)) int {
	type key struct {
		netns, iface, dir, proto string
		src, dst                 netip.Addr
		sport, dport             uint16
	}
	sums := map[key]*flow.Counters{}
	var order []key
	for _, f := range flows {
		k := key{f.Netns, f.Interface, string(f.Direction), f.Protocol.String(), f.Src, f.Dst, f.SrcPort, f.DstPort}
		s, ok := sums[k]
		if !ok {
			s = &flow.Counters{}
			sums[k] = s
			order = append(order, k)
		}
		s.Packets += f.Packets
		s.Bytes += f.Bytes
	}
	sort.SliceStable(order, func(a, b int) bool { return sums[order[a]].Bytes > sums[order[b]].Bytes })
	dropped := 0
	if max := e.cfg.MaxFlowSeries; max >= 0 && len(order) > max {
		dropped = len(order) - max
		order = order[:max]
	}
	for _, k := range order {
		labels := []string{k.netns, k.iface, k.dir, k.proto, k.src.String(), k.dst.String(),
			strconv.Itoa(int(k.sport)), strconv.Itoa(int(k.dport))}
		counter(e.flowPackets, sums[k].Packets, labels...)
		counter(e.flowBytes, sums[k].Bytes, labels...)
	}
	return dropped
}
