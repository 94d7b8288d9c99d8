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

// selectSource is a fake collector that reads only the flows keep accepts
// and the n largest others, as a SelectSource does, and records the n it
// was asked for.
type selectSource struct {
	fakeSource
	asked []int
}

func (s *selectSource) SnapshotSelect(n int, keep func(*flow.Flow) bool) (*flow.Snapshot, error) {
	s.asked = append(s.asked, n)
	snap := *s.snap
	top := flow.NewTop(n)
	snap.Flows = nil
	for i := range s.snap.Flows {
		if f := &s.snap.Flows[i]; keep(f) {
			snap.Flows = append(snap.Flows, *f)
		} else {
			top.Offer(f)
		}
	}
	snap.Flows = append(snap.Flows, top.Flows()...)
	snap.Stats.FlowEntries = uint64(len(s.snap.Flows))
	return &snap, nil
}

func gatherText(t *testing.T, reg *prometheus.Registry) string {
	t.Helper()
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

// With --flows the exporter asks a SelectSource for the flows with a series
// and as many others as there are free places, exports the largest and
// counts the rest of the flow map as dropped; a plain Source gives the same
// series.
func TestExporterSelectFlows(t *testing.T) {
	snap := fixture()
	snap.Flows = nil
	for i := 0; i < 50; i++ {
		snap.Flows = append(snap.Flows, flow.Flow{Key: flow.Key{Netns: "web", NetnsInode: 4026532200, Interface: "eth0", Ifindex: 2, Direction: flow.TX, Protocol: 17,
			Src: netip.MustParseAddr("10.213.0.2"), Dst: netip.MustParseAddr("10.213.0.3"), SrcPort: uint16(1000 + i), DstPort: 53},
			Packets: uint64(i + 1), Bytes: uint64(100 * (i%10 + 1))})
	}
	snap.Stats.FlowEntries = uint64(len(snap.Flows))
	// The interface's totals hold the flows' packets and 10 more.
	var sum flow.Counters
	for _, f := range snap.Flows {
		sum = add(sum, flow.Counters{Packets: f.Packets, Bytes: f.Bytes})
	}
	snap.Namespaces[1].Interfaces[1].TX = add(sum, flow.Counters{Packets: 10, Bytes: 600})

	ss := &selectSource{fakeSource: fakeSource{snap}}
	regS, regP := prometheus.NewRegistry(), prometheus.NewRegistry()
	regS.MustRegister(New(ss, Config{Flows: true, MaxFlowSeries: 7}))
	regP.MustRegister(New(fakeSource{snap}, Config{Flows: true, MaxFlowSeries: 7}))
	for round := 0; round < 2; round++ {
		got, want := gatherSeries(t, regS), gatherSeries(t, regP)
		for k, v := range want {
			if got[k] != v {
				t.Errorf("round %d: %s is %v from a SelectSource, %v from a full snapshot", round, k, got[k], v)
			}
		}
		if len(got) != len(want) {
			t.Errorf("round %d: %d series from a SelectSource, %d from a full snapshot", round, len(got), len(want))
		}
	}
	// All places taken after the first scrape: the second reads no
	// candidate.
	if len(ss.asked) != 2 || ss.asked[0] != 7 || ss.asked[1] != 0 {
		t.Errorf("SnapshotSelect asked for %v, want [7 0]", ss.asked)
	}
	if err := testutil.GatherAndCompare(regS, strings.NewReader(`
# HELP nsflow_flow_series_dropped_total Flow series left out of scrapes by --flows.max-series.
# TYPE nsflow_flow_series_dropped_total counter
nsflow_flow_series_dropped_total 129
`), "nsflow_flow_series_dropped_total"); err != nil {
		t.Error(err)
	}
	// The 7 kept: the five flows of 1,000 bytes and the first two of 900;
	// the remainder of web/eth0/tx holds the other 43 and the 10 packets
	// that were in no flow.
	out, _ := regS.Gather()
	var ports []string
	var rem float64
	for _, mf := range out {
		if mf.GetName() != "nsflow_flow_bytes_total" {
			continue
		}
		for _, m := range mf.Metric {
			l := labelMap(m.Label)
			switch {
			case l["protocol"] == "other" && l["netns"] == "web" && l["interface"] == "eth0" && l["direction"] == "tx":
				rem = m.GetCounter().GetValue()
			case l["protocol"] != "other":
				ports = append(ports, fmt.Sprintf("%s:%v", l["src_port"], m.GetCounter().GetValue()))
			}
		}
	}
	if len(ports) != 7 || strings.Join(ports, " ") != "1008:900 1009:1000 1018:900 1019:1000 1029:1000 1039:1000 1049:1000" {
		t.Errorf("kept flows (src_port:bytes): %v", ports)
	}
	if want := float64(sum.Bytes + 600 - 5*1000 - 2*900); rem != want {
		t.Errorf("remainder of web/eth0/tx: %v bytes, want %v", rem, want)
	}
}
