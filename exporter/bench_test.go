package exporter

import (
	"fmt"
	"io"
	"net/http/httptest"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/nsflow/nsflow/collector/flow"
)

// BenchmarkScrape measures a full /metrics scrape (collect, encode) of the
// series of 1,000 pods (two interfaces each), without the map reads.
func BenchmarkScrape(b *testing.B) {
	snap := &flow.Snapshot{}
	for i := 0; i < 1000; i++ {
		ns := flow.NamespaceStats{Name: fmt.Sprintf("pod-%d", i), Inode: uint64(4026530000 + i)}
		for j, name := range []string{"lo", "eth0"} {
			ns.Interfaces = append(ns.Interfaces, flow.InterfaceStats{Name: name, Index: j + 1, State: flow.StateAttached,
				RX: flow.Counters{Packets: 12345, Bytes: 1234567}, TX: flow.Counters{Packets: 23456, Bytes: 2345678}})
		}
		snap.Namespaces = append(snap.Namespaces, ns)
	}
	reg := prometheus.NewRegistry()
	reg.MustRegister(New(fakeSource{snap}, Config{}))
	h := promhttp.HandlerFor(reg, promhttp.HandlerOpts{})
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
		io.Copy(io.Discard, rec.Body)
	}
}
