package e2e

import (
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/nsflow/nsflow/test/testenv"
)

// TestServeFlowsOff: serve accounts flows only with --flows (issue 17).
// Without it the stubs count the exact totals alone: after UDP traffic
// between two pods the flow map is empty (nsflow_flow_map_entries 0, no
// packet unparsed) while the totals count the traffic; with --flows the
// same traffic fills the map and is exported per flow.
func TestServeFlowsOff(t *testing.T) {
	testenv.RequireRoot(t)
	pods := newPods(t, "10.213.173.0/24", "e2e-fo-a", "e2e-fo-b")
	a, b := pods[0], pods[1]
	for i, args := range [][]string{nil, {"--flows"}} {
		flows := len(args) > 0
		srv := startServe(t, "http", append([]string{"--netns.host=false", "--netns.include", "^e2e-fo-"}, args...)...)
		waitUntil(t, 10*time.Second, "both pods' eth0 in /metrics", func() bool {
			s, _ := srv.scrape(t)
			for _, p := range pods {
				if _, ok := s[pointSeries("nsflow_packets_total", p.Name, "eth0", "tx")]; !ok {
					return false
				}
			}
			return true
		})
		s0, _ := srv.scrape(t)
		udpExchange(t, a, b, netip.AddrPortFrom(b.IPv4, uint16(9330+i)), 20, 64)
		s1, _ := srv.scrape(t)
		tx := pointSeries("nsflow_packets_total", a.Name, "eth0", "tx")
		if d := s1[tx] - s0[tx]; d < 20 {
			t.Errorf("--flows=%v: a's eth0 tx counted %v packets, want at least the 20 sent", flows, d)
		}
		entries, ok := s1["nsflow_flow_map_entries{}"]
		if !ok {
			t.Fatal("no nsflow_flow_map_entries in /metrics")
		}
		var flowSeries int
		var unparsed float64
		for k, v := range s1 {
			if strings.HasPrefix(k, "nsflow_flow_packets_total{") {
				flowSeries++
			}
			if strings.HasPrefix(k, "nsflow_unparsed_packets_total{") {
				unparsed += v
			}
		}
		if flows && (entries == 0 || flowSeries == 0) {
			t.Errorf("--flows: %v flows in the map, %d flow series, want some", entries, flowSeries)
		}
		if !flows && (entries != 0 || flowSeries != 0 || unparsed != 0) {
			t.Errorf("no --flows: %v flows in the map, %d flow series, %v packets unparsed, want none", entries, flowSeries, unparsed)
		}
		t.Logf("--flows=%v: flow map entries %v, flow series %d, unparsed %v", flows, entries, flowSeries, unparsed)
		srv.stop(t)
	}
}
