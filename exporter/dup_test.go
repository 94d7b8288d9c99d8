package exporter

import (
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/nsflow/nsflow/collector/flow"
)

// An interface re-created under its name while the old one awaits its
// grace period, and a namespace re-created under its name, give one series
// each: a duplicate label set would fail the whole scrape. The live one is
// exported alone (its series restarts: a counter reset); points that are
// all gone are summed.
func TestExporterSameNames(t *testing.T) {
	c := func(p, b uint64) flow.Counters { return flow.Counters{Packets: p, Bytes: b} }
	snap := &flow.Snapshot{Namespaces: []flow.NamespaceStats{
		{Name: "host", Inode: 1, Interfaces: []flow.InterfaceStats{
			{Name: "nsf-1", Index: 5, State: flow.StateDetached, RX: c(1, 100), TX: c(2, 200)},
			{Name: "nsf-1", Index: 9, State: flow.StateAttached, RX: c(3, 300), TX: c(4, 400)},
		}},
		{Name: "web", Inode: 2, Gone: true, Interfaces: []flow.InterfaceStats{{Name: "lo", Index: 1, RX: c(10, 1000), TX: c(10, 1000)}}},
		{Name: "web", Inode: 3, Interfaces: []flow.InterfaceStats{{Name: "lo", Index: 1, State: flow.StateAttached, RX: c(1, 100), TX: c(1, 100)}}},
		{Name: "db", Inode: 4, Gone: true, Interfaces: []flow.InterfaceStats{{Name: "lo", Index: 1, State: flow.StateDetached, RX: c(5, 500), TX: c(5, 500)}}},
		{Name: "db", Inode: 5, Gone: true, Interfaces: []flow.InterfaceStats{{Name: "lo", Index: 1, State: flow.StateDetached, RX: c(2, 200), TX: c(2, 200)}}},
	}}
	reg := prometheus.NewRegistry()
	reg.MustRegister(New(fakeSource{snap}, Config{}))
	err := testutil.GatherAndCompare(reg, strings.NewReader(`
# HELP nsflow_packets_total Packets per network namespace, interface and direction (rx: ingress, tx: egress), exact.
# TYPE nsflow_packets_total counter
nsflow_packets_total{direction="rx",interface="nsf-1",namespace="",netns="host",pod=""} 3
nsflow_packets_total{direction="tx",interface="nsf-1",namespace="",netns="host",pod=""} 4
nsflow_packets_total{direction="rx",interface="lo",namespace="",netns="web",pod=""} 1
nsflow_packets_total{direction="tx",interface="lo",namespace="",netns="web",pod=""} 1
nsflow_packets_total{direction="rx",interface="lo",namespace="",netns="db",pod=""} 7
nsflow_packets_total{direction="tx",interface="lo",namespace="",netns="db",pod=""} 7
`), "nsflow_packets_total")
	if err != nil {
		t.Error(err)
	}
}
