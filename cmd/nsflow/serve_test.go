package main

import "testing"

// --containers needs the flow path in the kernel (the per-container totals
// are kept there), --flows too; without either the stubs count the totals
// alone.
func TestServeCollectorConfig(t *testing.T) {
	for _, tc := range []struct {
		flows, containers bool
		noFlows           bool
	}{{false, false, true}, {true, false, false}, {false, true, false}, {true, true, false}} {
		f := serveFlags{listen: []string{":9990"}, telemetryPath: "/metrics", resync: 1, flows: tc.flows, containers: tc.containers,
			log: logFlags{level: "info"}, cri: criFlags{endpoint: "none", interval: 1}, attach: attachFlags{mode: "auto", maxIfaces: 64}}
		sc, err := f.validate()
		if err != nil {
			t.Fatal(err)
		}
		c := sc.session.Collector
		if c.NoFlows != tc.noFlows || c.Containers != tc.containers {
			t.Errorf("--flows=%v --containers=%v: NoFlows %v Containers %v", tc.flows, tc.containers, c.NoFlows, c.Containers)
		}
	}
}
