package exporter

import (
	"fmt"
	"net/netip"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/nsflow/nsflow/collector/flow"
)

// topSource is a fake collector that reads only the n largest flows when
// asked to, as collector.SnapshotTop does, and records what it was asked.
type topSource struct {
	fakeSource
	asked []int
}

func (s *topSource) SnapshotTop(n int) (*flow.Snapshot, error) {
	s.asked = append(s.asked, n)
	snap := *s.snap
	top := flow.NewTop(n)
	for i := range snap.Flows {
		top.Offer(&snap.Flows[i])
	}
	snap.Flows = top.Flows()
	snap.Stats.FlowEntries = uint64(len(s.snap.Flows))
	return &snap, nil
}

// With --flows the exporter asks a TopSource for --flows.max-series flows,
// exports the largest and counts the rest of the flow map as dropped; a
// plain Source gives the same series.
func TestExporterTopFlows(t *testing.T) {
	snap := fixture()
	snap.Flows = nil
	for i := 0; i < 50; i++ {
		snap.Flows = append(snap.Flows, flow.Flow{Key: flow.Key{Netns: "web", Interface: "eth0", Direction: flow.TX, Protocol: 17,
			Src: netip.MustParseAddr("10.213.0.2"), Dst: netip.MustParseAddr("10.213.0.3"), SrcPort: uint16(1000 + i), DstPort: 53},
			Packets: uint64(i + 1), Bytes: uint64(100 * (i%10 + 1))})
	}
	snap.Stats.FlowEntries = uint64(len(snap.Flows))
	scrape := func(src Source) string {
		reg := prometheus.NewRegistry()
		reg.MustRegister(New(src, Config{Flows: true, MaxFlowSeries: 7}))
		var b strings.Builder
		mfs, err := reg.Gather()
		if err != nil {
			t.Fatal(err)
		}
		for _, mf := range mfs {
			fmt.Fprintln(&b, mf.String())
		}
		return b.String()
	}
	ts := &topSource{fakeSource: fakeSource{snap}}
	got, want := scrape(ts), scrape(fakeSource{snap})
	if got != want {
		t.Errorf("series from a TopSource differ from a full snapshot's:\n%s\n---\n%s", got, want)
	}
	if len(ts.asked) != 1 || ts.asked[0] != 7 {
		t.Errorf("SnapshotTop asked for %v, want [7]", ts.asked)
	}

	reg := prometheus.NewRegistry()
	reg.MustRegister(New(&topSource{fakeSource: fakeSource{snap}}, Config{Flows: true, MaxFlowSeries: 7}))
	if err := testutil.GatherAndCompare(reg, strings.NewReader(`
# HELP nsflow_flow_series_dropped_total Flow series left out of scrapes by --flows.max-series.
# TYPE nsflow_flow_series_dropped_total counter
nsflow_flow_series_dropped_total 43
`), "nsflow_flow_series_dropped_total"); err != nil {
		t.Error(err)
	}
	// The 7 kept: the five flows of 1,000 bytes and the first two of 900.
	out, _ := reg.Gather()
	var ports []string
	for _, mf := range out {
		if mf.GetName() == "nsflow_flow_bytes_total" {
			for _, m := range mf.Metric {
				for _, l := range m.Label {
					if l.GetName() == "src_port" {
						ports = append(ports, fmt.Sprintf("%s:%v", l.GetValue(), m.GetCounter().GetValue()))
					}
				}
			}
		}
	}
	if len(ports) != 7 || strings.Join(ports, " ") != "1008:900 1009:1000 1018:900 1019:1000 1029:1000 1039:1000 1049:1000" {
		t.Errorf("kept flows (src_port:bytes): %v", ports)
	}
}
