// Package exporter exposes collector snapshots as Prometheus metrics. The
// maps are read at scrape time (a custom prometheus.Collector): no value is
// cached across scrapes, so none can go stale (what is kept is the series'
// layout, rebuilt whenever the namespaces or interfaces read change).
// Concurrent scrapes share one read (Handler).
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
	// MaxFlowSeries caps the flow series (negative: no cap). A flow keeps
	// its series while it is in the flow map; new flows take free places,
	// largest by bytes first. The rest of each observation point's traffic
	// is in one remainder series (protocol="other"), so that the flow
	// series of a point add up to its totals (see capped). Flows left
	// without a series are counted in nsflow_flow_series_dropped_total.
	MaxFlowSeries int
	// Containers exports per-container totals from Snapshot.Containers
	// (nsflow_container_*_total), at most MaxContainerSeries of them
	// (negative: no cap); the rest of each namespace's traffic, per
	// direction, is in its container="" series.
	Containers         bool
	MaxContainerSeries int
}

// SelectSource is a Source that can read, of the flows, only those keep
// accepts and the n largest others (n < 0: all): with --flows, a scrape then
// holds the flows with a series and as many candidates as there are free
// places, not the whole flow map.
type SelectSource interface {
	SnapshotSelect(n int, keep func(*flow.Flow) bool) (*flow.Snapshot, error)
}

// Source is what the exporter reads at scrape time: a *collector.Collector.
type Source interface {
	Snapshot() (*flow.Snapshot, error)
	Totals() (*flow.Snapshot, error)
	Interfaces() []collector.NamespaceInfo
	AttachErrors() map[string]uint64
	Mode() attach.Mode
}

// ModeSource is a Source whose attach mechanism depends on the namespace
// (collector.Collector.ModeFor: under auto, TCX in the host's, clsact in
// the others).
type ModeSource interface {
	ModeFor(host bool) attach.Mode
}

// RefusedSource is a Source that counts the interfaces it refused to
// attach, by reason (collector.Collector.Refused).
type RefusedSource interface {
	Refused() map[string]uint64
}

// StateSource is a Source that counts its observed namespaces' interfaces
// by attach state without copying them (collector.Collector.AttachStates):
// what counting Interfaces gives.
type StateSource interface {
	AttachStates() map[flow.AttachState]int
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
	ctrPackets, ctrBytes                      *prometheus.Desc
	attachRefused                             *prometheus.Desc

	flows      *capped[flowGroup, flowLabels, flowEntry]
	containers *capped[ctrGroup, ctrLabels, ctrEntry]

	// scrapeMu orders the reads and the capped series' updates of
	// concurrent scrapes (with --flows or --containers): an older read
	// applied after a newer one would look like counters going down.
	scrapeMu sync.Mutex

	mu           sync.Mutex
	droppedTotal uint64 // flow series left out by the cap, over all scrapes
	errorsTotal  uint64
	// layout is the per-interface series of the last scrape (replaced,
	// never modified: concurrent scrapes may read it): a scrape that reads
	// the same namespaces and interfaces reuses it.
	layout *layout
	// flowLabels and ctrLabels keep the label pairs of the flow and
	// container series (remainders included) from one scrape to the next
	// likewise (they are sticky: most are the same), under scrapeMu;
	// entries not used in a scrape are dropped. flowSeries is the flow
	// scrape's buffer.
	flowLabels       map[flowLabels]*cachedLabels
	ctrLabels        map[ctrLabels]*cachedLabels
	labelGen, ctrGen uint64
	flowSeries       []seriesValue
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
	ctr := []string{"netns", "pod", "namespace", "container", "direction"}
	return &Exporter{
		c: c, cfg: cfg,
		flows:             newCapped[flowGroup, flowLabels, flowEntry](cfg.MaxFlowSeries),
		flowLabels:        map[flowLabels]*cachedLabels{},
		ctrLabels:         map[ctrLabels]*cachedLabels{},
		containers:        newCapped[ctrGroup, ctrLabels, ctrEntry](cfg.MaxContainerSeries),
		ctrPackets:        d("container_packets_total", "Packets per container (cgroup) sent (tx) or received (rx) in a network namespace, all its interfaces (only with --containers; capped: container=\"\" holds the rest of the namespace's traffic).", ctr...),
		ctrBytes:          d("container_bytes_total", "Bytes per container (cgroup) sent or received in a network namespace (only with --containers; capped like the packets).", ctr...),
		packets:           d("packets_total", "Packets per network namespace, interface and direction (rx: ingress, tx: egress), exact.", point...),
		bytes:             d("bytes_total", "Bytes per network namespace, interface and direction, Ethernet header included.", point...),
		flowPackets:       d("flow_packets_total", "Packets per flow at an observation point (only with --flows; capped: protocol=\"other\" holds the rest of the point's traffic).", flow...),
		flowBytes:         d("flow_bytes_total", "Bytes per flow at an observation point (only with --flows; capped like the packets).", flow...),
		namespaces:        d("namespaces", "Network namespaces observed (state=observed) or removed and awaiting their grace period (state=gone).", "state"),
		attachments:       d("attachments", "Interfaces by the state of nsflow's programs on them.", "state"),
		attachErrors:      d("attach_errors_total", "Failed attaches, by reason.", "reason"),
		attachRefused:     d("attach_refused_total", "Interfaces not attached by policy, by reason (interfaces: over the cap of interfaces per namespace; reserve: a process-only namespace at the totals slots reserved for named ones).", "reason"),
		flowEntries:       d("flow_map_entries", "Flows in the flow map."),
		flowCapacity:      d("flow_map_capacity", "Capacity of the flow map (--flow-entries)."),
		flowsEvicted:      d("flows_evicted_total", "Flows evicted from the full flow map (their packets stay in the exact totals)."),
		flowInsertErrors:  d("flow_insert_errors_total", "New flows that could not be recorded in the flow map."),
		unparsed:          d("unparsed_packets_total", "Packets counted in the totals but in no flow, by reason (non_ip, truncated, no_device).", "reason"),
		totalsFull:        d("totals_map_full_total", "Packets the programs could not count into a slot of the exact totals (none in normal operation)."),
		attachMode:        d("attach_mode_info", "The attach mechanism in use (tcx or clsact), by scope: host (the host's own namespace) and other (every other namespace); all where one mechanism serves every namespace.", "mode", "scope"),
		flowSeriesDropped: d("flow_series_dropped_total", "Flow series left out of scrapes by --flows.max-series."),
		scrapeErrs:        d("scrape_errors_total", "Scrapes that could not read the BPF maps completely."),
	}
}

// Describe implements prometheus.Collector.
func (e *Exporter) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{e.packets, e.bytes, e.namespaces, e.attachments, e.attachErrors, e.attachRefused,
		e.flowEntries, e.flowCapacity, e.flowsEvicted, e.flowInsertErrors, e.unparsed, e.totalsFull,
		e.attachMode, e.flowSeriesDropped, e.scrapeErrs} {
		ch <- d
	}
	if e.cfg.Flows {
		ch <- e.flowPackets
		ch <- e.flowBytes
	}
	if e.cfg.Containers {
		ch <- e.ctrPackets
		ch <- e.ctrBytes
	}
}

// Collect implements prometheus.Collector: it reads the maps now.
func (e *Exporter) Collect(ch chan<- prometheus.Metric) {
	read := e.c.Totals
	if e.cfg.Flows {
		read = e.c.Snapshot
		if ss, ok := e.c.(SelectSource); ok {
			placed := e.flows.entries()
			read = func() (*flow.Snapshot, error) {
				return ss.SnapshotSelect(e.flows.free(), func(f *flow.Flow) bool { return placed[entryOf(f)] })
			}
		}
	}
	if e.cfg.Flows || e.cfg.Containers {
		e.scrapeMu.Lock()
		defer e.scrapeMu.Unlock()
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
	}
	e.mu.Lock()
	lay := e.layout
	e.mu.Unlock()
	if !lay.fits(snap) {
		lay = newLayout(snap, e.cfg.Flows || e.cfg.Containers)
		e.mu.Lock()
		e.layout = lay
		e.mu.Unlock()
	}
	rx, tx := lay.sum(snap)
	// One allocation for the scrape's metrics, not one per series.
	ms := make([]counterMetric, 0, 4*len(lay.order))
	for _, m := range []struct {
		d       *prometheus.Desc
		dir     int
		packets bool
	}{{e.packets, 0, true}, {e.packets, 1, true}, {e.bytes, 0, false}, {e.bytes, 1, false}} {
		c := rx
		if m.dir == 1 {
			c = tx
		}
		for _, k := range lay.order {
			v := c[k].Bytes
			if m.packets {
				v = c[k].Packets
			}
			ms = append(ms, counterMetric{desc: m.d, labels: lay.labels[k][m.dir], value: float64(v)})
			ch <- &ms[len(ms)-1]
		}
	}
	gauge(e.namespaces, float64(observed), "observed")
	gauge(e.namespaces, float64(gone), "gone")

	states := map[flow.AttachState]int{flow.StateAttached: 0, flow.StateFailed: 0, flow.StateDetached: 0, flow.StatePeerObserved: 0}
	if ss, ok := e.c.(StateSource); ok {
		for s, n := range ss.AttachStates() {
			states[s] += n
		}
	} else {
		for _, ns := range e.c.Interfaces() {
			if ns.Gone {
				continue
			}
			for _, i := range ns.Interfaces {
				states[i.State]++
			}
		}
	}
	for s, n := range states {
		gauge(e.attachments, float64(n), string(s))
	}
	for reason, n := range e.c.AttachErrors() {
		counter(e.attachErrors, n, reason)
	}
	if rs, ok := e.c.(RefusedSource); ok {
		for reason, n := range rs.Refused() {
			counter(e.attachRefused, n, reason)
		}
	}
	if ms, ok := e.c.(ModeSource); ok {
		gauge(e.attachMode, 1, string(ms.ModeFor(true)), "host")
		gauge(e.attachMode, 1, string(ms.ModeFor(false)), "other")
	} else {
		gauge(e.attachMode, 1, string(e.c.Mode()), "all")
	}

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
	if e.cfg.Flows && err == nil {
		// A partial read would look like flows leaving the map: the flow
		// series skip a scrape that could not read everything.
		dropped = e.collectFlows(snap, lay.points, func(k int) ([]ifaceID, flow.Counters, flow.Counters) {
			return lay.members[k], rx[k], tx[k]
		}, ch)
	}
	if e.cfg.Containers && err == nil {
		e.collectContainers(snap, lay.points, func(k int) ([]ifaceID, flow.Counters, flow.Counters) {
			return lay.members[k], rx[k], tx[k]
		}, ch)
	}
	e.mu.Lock()
	e.droppedTotal += uint64(dropped)
	droppedTotal := e.droppedTotal
	e.mu.Unlock()
	counter(e.flowSeriesDropped, droppedTotal)
}

// ifaceID is an interface as the maps name it.
type ifaceID struct {
	ino  uint64
	idx  int
	name string // as the collector names it, unescaped
}

// flowGroup is an observation point of the flow series (its labels).
type flowGroup struct {
	netns, iface string
	dir          flow.Direction
}

// flowLabels is a flow series' label set (a remainder's has proto 0 and
// invalid addresses, but remainders are not items).
type flowLabels struct {
	flowGroup
	proto        flow.Protocol
	src, dst     netip.Addr
	sport, dport uint16
}

// flowEntry is a flow map entry.
type flowEntry struct {
	ino          uint64
	idx          int
	dir          flow.Direction
	proto        flow.Protocol
	src, dst     netip.Addr
	sport, dport uint16
}

func entryOf(f *flow.Flow) flowEntry {
	return flowEntry{f.NetnsInode, f.Ifindex, f.Direction, f.Protocol, f.Src, f.Dst, f.SrcPort, f.DstPort}
}

// members returns the interfaces a per-interface series sums, and its sums.
type members func(k int) ([]ifaceID, flow.Counters, flow.Counters)

// collectFlows exports the flow series (at most MaxFlowSeries) and one
// remainder per observation point (capped), and returns how many flows in the
// map have no series.
func (e *Exporter) collectFlows(snap *flow.Snapshot, points []pointKey, sums members, ch chan<- prometheus.Metric) int {
	point := make(map[[2]uint64]flowGroup, len(points)) // (inode, ifindex) of a summed interface -> its point
	for k, p := range points {
		ifs, _, _ := sums(k)
		for _, m := range ifs {
			point[[2]uint64{m.ino, uint64(m.idx)}] = flowGroup{netns: p.netns, iface: p.iface}
		}
	}
	totals := func(add func(flowGroup, flow.Counters)) {
		for k, p := range points {
			_, rx, tx := sums(k)
			add(flowGroup{p.netns, p.iface, flow.RX}, rx)
			add(flowGroup{p.netns, p.iface, flow.TX}, tx)
		}
	}
	obs := make([]observation[flowGroup, flowLabels, flowEntry], 0, len(snap.Flows))
	for i := range snap.Flows {
		f := &snap.Flows[i]
		g, ok := point[[2]uint64{f.NetnsInode, uint64(f.Ifindex)}]
		if !ok {
			continue // a gone twin's flow, or its point not read
		}
		g.dir = f.Direction
		obs = append(obs, observation[flowGroup, flowLabels, flowEntry]{
			group: g,
			item:  flowLabels{g, f.Protocol, f.Src, f.Dst, f.SrcPort, f.DstPort},
			entry: entryOf(f),
			c:     flow.Counters{Packets: f.Packets, Bytes: f.Bytes},
		})
	}
	// Label pairs built once per series (remainders: a flowLabels with
	// proto 0 and no addresses, which no flow has), emitted in the order
	// the registry sorts them into. (The scrape lock is held: the cache is
	// this scrape's.)
	e.labelGen++
	series := e.flowSeries[:0]
	get := func(l flowLabels, values func() []string) []*dto.LabelPair {
		c := e.flowLabels[l]
		if c == nil {
			c = &cachedLabels{pairs: labelPairs([]string{"direction", "dst", "dst_port", "interface", "netns", "protocol", "src", "src_port"}, values())}
			e.flowLabels[l] = c
		}
		c.gen = e.labelGen
		return c.pairs
	}
	placed := 0
	left := e.flows.update(totals, obs, func(l flowLabels, c flow.Counters) {
		placed++
		lp := get(l, func() []string {
			return []string{string(l.dir), l.dst.String(), strconv.Itoa(int(l.dport)), l.iface, l.netns, l.proto.String(), l.src.String(), strconv.Itoa(int(l.sport))}
		})
		series = append(series, seriesValue{lp, c})
	}, func(g flowGroup, c flow.Counters) {
		lp := get(flowLabels{flowGroup: g}, func() []string { return []string{string(g.dir), "", "", g.iface, g.netns, "other", "", ""} })
		series = append(series, seriesValue{lp, c})
	})
	for l, c := range e.flowLabels {
		if c.gen != e.labelGen {
			delete(e.flowLabels, l)
		}
	}
	e.emitSorted(series, e.flowPackets, e.flowBytes, ch)
	clear(series)
	e.flowSeries = series[:0]
	// With a SelectSource, flows beyond the free places were not read.
	return max(left, int(snap.Stats.FlowEntries)-placed)
}

// cachedLabels are a series' label pairs, and the last scrape that had it.
type cachedLabels struct {
	pairs []*dto.LabelPair
	gen   uint64
}

// seriesValue is a series of a pair of packets and bytes metrics.
type seriesValue struct {
	labels []*dto.LabelPair
	c      flow.Counters
}

// emitSorted sends the series' packets and bytes in the registry's order.
func (e *Exporter) emitSorted(series []seriesValue, packets, bytes *prometheus.Desc, ch chan<- prometheus.Metric) {
	slices.SortFunc(series, func(a, b seriesValue) int { return compareLabels(a.labels, b.labels) })
	for _, m := range series {
		ch <- &counterMetric{desc: packets, labels: m.labels, value: float64(m.c.Packets)}
	}
	for _, m := range series {
		ch <- &counterMetric{desc: bytes, labels: m.labels, value: float64(m.c.Bytes)}
	}
}

// ctrGroup is a namespace and direction: the container series' remainder.
type ctrGroup struct {
	netns string
	dir   flow.Direction
}

// ctrLabels is a container series' label set.
type ctrLabels struct {
	ctrGroup
	pod, podNS, container string
}

// ctrEntry is an entry of the container map.
type ctrEntry struct {
	ino    uint64
	iface  string
	dir    flow.Direction
	cgroup uint64
}

// collectContainers exports the container series (at most
// MaxContainerSeries), summed over a namespace's interfaces, and one
// remainder (container="", pod="", namespace="") per namespace and
// direction, that holds what no container series does: packets of unknown
// cgroups, and of containers over the cap.
func (e *Exporter) collectContainers(snap *flow.Snapshot, points []pointKey, sums members, ch chan<- prometheus.Metric) {
	netns := map[ifaceID]string{} // a summed interface (by name) -> its netns label
	for k, p := range points {
		ifs, _, _ := sums(k)
		for _, m := range ifs {
			netns[ifaceID{ino: m.ino, name: m.name}] = p.netns
		}
	}
	totals := func(add func(ctrGroup, flow.Counters)) {
		for k, p := range points {
			_, rx, tx := sums(k)
			add(ctrGroup{p.netns, flow.RX}, rx)
			add(ctrGroup{p.netns, flow.TX}, tx)
		}
	}
	obs := make([]observation[ctrGroup, ctrLabels, ctrEntry], 0, len(snap.Containers))
	for i := range snap.Containers {
		cs := &snap.Containers[i]
		ns, ok := netns[ifaceID{ino: cs.NetnsInode, name: cs.Interface}]
		if !ok {
			continue
		}
		l := ctrLabels{ctrGroup: ctrGroup{ns, cs.Direction}, container: flow.SafeName(cs.Container)}
		if cs.Pod != nil {
			l.pod, l.podNS = flow.SafeName(cs.Pod.Name), flow.SafeName(cs.Pod.Namespace)
		}
		if l.pod == "" && l.podNS == "" && l.container == "" {
			continue // unknown: the remainder's
		}
		obs = append(obs, observation[ctrGroup, ctrLabels, ctrEntry]{
			group: l.ctrGroup, item: l,
			entry: ctrEntry{cs.NetnsInode, cs.Interface, cs.Direction, cs.Cgroup},
			c:     cs.Counters,
		})
	}
	e.ctrGen++
	series := make([]seriesValue, 0, len(points)*2)
	add := func(l ctrLabels, c flow.Counters) {
		lc := e.ctrLabels[l]
		if lc == nil {
			lc = &cachedLabels{pairs: labelPairs([]string{"container", "direction", "namespace", "netns", "pod"}, []string{l.container, string(l.dir), l.podNS, l.netns, l.pod})}
			e.ctrLabels[l] = lc
		}
		lc.gen = e.ctrGen
		series = append(series, seriesValue{lc.pairs, c})
	}
	e.containers.update(totals, obs, add, func(g ctrGroup, c flow.Counters) { add(ctrLabels{ctrGroup: g}, c) })
	for l, c := range e.ctrLabels {
		if c.gen != e.ctrGen {
			delete(e.ctrLabels, l)
		}
	}
	e.emitSorted(series, e.ctrPackets, e.ctrBytes, ch)
}

// labelPairs returns label pairs of names (sorted) and their values.
// Pairs that many series share (directions, empty values, the
// remainders' protocol) are shared: label pairs are never modified.
func labelPairs(names, values []string) []*dto.LabelPair {
	out := make([]*dto.LabelPair, len(names))
	for i := range names {
		if p, ok := sharedPairs[[2]string{names[i], values[i]}]; ok {
			out[i] = p
			continue
		}
		out[i] = &dto.LabelPair{Name: &names[i], Value: &values[i]}
	}
	return out
}

var sharedPairs = func() map[[2]string]*dto.LabelPair {
	m := map[[2]string]*dto.LabelPair{}
	add := func(name, value string) { m[[2]string{name, value}] = &dto.LabelPair{Name: &name, Value: &value} }
	for _, d := range []flow.Direction{flow.RX, flow.TX} {
		add("direction", string(d))
	}
	for _, n := range []string{"dst", "dst_port", "src", "src_port", "container", "pod", "namespace"} {
		add(n, "")
	}
	add("protocol", "other")
	for _, p := range []flow.Protocol{1, 6, 17, 58, 132} {
		add("protocol", p.String())
	}
	return m
}()

// compareLabels orders label pairs of one family (same names, sorted) by
// their values, as the registry sorts its series.
func compareLabels(a, b []*dto.LabelPair) int {
	for i := range a {
		if c := strings.Compare(a[i].GetValue(), b[i].GetValue()); c != 0 {
			return c
		}
	}
	return 0
}

// pointKey identifies a per-interface series.
type pointKey struct {
	netns, iface, pod, podNS string
}

// counterMetric is a counter whose label pairs are shared between scrapes
// (what prometheus.MustNewConstMetric builds anew for every series of
// every scrape).
type counterMetric struct {
	desc    *prometheus.Desc
	labels  []*dto.LabelPair
	value   float64
	counter dto.Counter // what Write points to (a metric is written once)
}

func (m *counterMetric) Desc() *prometheus.Desc { return m.desc }
func (m *counterMetric) Write(out *dto.Metric) error {
	out.Label = m.labels
	m.counter.Value = &m.value
	out.Counter = &m.counter
	return nil
}
