package exporter

import (
	"bytes"
	stdgzip "compress/gzip"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"runtime"
	"runtime/metrics"
	"sort"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/klauspost/compress/gzip"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	versioncollector "github.com/prometheus/client_golang/prometheus/collectors/version"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/prometheus/common/expfmt"

	"github.com/nsflow/nsflow/collector"
	"github.com/nsflow/nsflow/collector/attach"
	"github.com/nsflow/nsflow/collector/flow"
)

// synthSource is a synthetic collector of 1,000 pods: each a namespace with
// lo and eth0 and a host-side veth, 10 flows at each pod's eth0 (10,000),
// pod labels. Like the collector, it returns fresh copies on every read
// (Snapshot copies every flow, SnapshotSelect only those with a series
// and the n largest others), so that
// allocations compare; the BPF map reads themselves are not included
// (BenchmarkSnapshot in the collector measures those).
type synthSource struct {
	snap *flow.Snapshot
}

func newSynthSource(pods int) *synthSource {
	snap := &flow.Snapshot{Time: time.Now()}
	host := flow.NamespaceStats{Name: "host", Inode: 4026531840, Interfaces: []flow.InterfaceStats{
		{Name: "lo", Index: 1, State: flow.StateAttached}, {Name: "eth0", Index: 2, State: flow.StateAttached}}}
	for i := 0; i < pods; i++ {
		host.Interfaces = append(host.Interfaces, flow.InterfaceStats{Name: fmt.Sprintf("veth%08x", i), Index: 10 + i, State: flow.StateAttached,
			RX: flow.Counters{Packets: uint64(i) * 100, Bytes: uint64(i) * 150000}, TX: flow.Counters{Packets: uint64(i) * 90, Bytes: uint64(i) * 9000}})
	}
	snap.Namespaces = append(snap.Namespaces, host)
	for i := 0; i < pods; i++ {
		ns := flow.NamespaceStats{Name: fmt.Sprintf("cni-%08x-%04d", i*2654435761, i), Inode: uint64(4026532000 + i),
			Pod: &flow.PodInfo{Name: fmt.Sprintf("app-%d-7d4f9c", i), Namespace: fmt.Sprintf("team-%d", i%20)}}
		for j, name := range []string{"lo", "eth0"} {
			ns.Interfaces = append(ns.Interfaces, flow.InterfaceStats{Name: name, Index: j + 1, State: flow.StateAttached,
				RX: flow.Counters{Packets: 12345 + uint64(i), Bytes: 1234567 + uint64(i)}, TX: flow.Counters{Packets: 23456, Bytes: 2345678}})
		}
		snap.Namespaces = append(snap.Namespaces, ns)
		src := netip.AddrFrom4([4]byte{10, 244, byte(i >> 8), byte(i)})
		for k := 0; k < 10; k++ {
			snap.Flows = append(snap.Flows, flow.Flow{Key: flow.Key{Netns: ns.Name, NetnsInode: ns.Inode, Interface: "eth0", Ifindex: 2,
				Direction: flow.Direction([]string{"rx", "tx"}[k%2]), Protocol: 6, Src: src, Dst: netip.AddrFrom4([4]byte{10, 96, 0, byte(k)}),
				SrcPort: uint16(30000 + k), DstPort: 443}, Packets: uint64(i*10 + k + 1), Bytes: uint64((i*10+k+1)*1000 + k)})
		}
	}
	snap.Stats = flow.Stats{FlowEntries: uint64(len(snap.Flows)), FlowCapacity: 65536}
	return &synthSource{snap}
}

func (s *synthSource) copyNamespaces() *flow.Snapshot {
	out := &flow.Snapshot{Time: time.Now(), Stats: s.snap.Stats, Namespaces: make([]flow.NamespaceStats, len(s.snap.Namespaces))}
	for i, ns := range s.snap.Namespaces {
		ns.Interfaces = append([]flow.InterfaceStats(nil), ns.Interfaces...)
		out.Namespaces[i] = ns
	}
	return out
}

func (s *synthSource) Snapshot() (*flow.Snapshot, error) {
	out := s.copyNamespaces()
	out.Flows = append([]flow.Flow(nil), s.snap.Flows...)
	return out, nil
}

func (s *synthSource) SnapshotSelect(n int, keep func(*flow.Flow) bool) (*flow.Snapshot, error) {
	out := s.copyNamespaces()
	top := flow.NewTop(n)
	for i := range s.snap.Flows {
		f := s.snap.Flows[i] // the collector decodes each flow into a local
		if keep(&f) {
			out.Flows = append(out.Flows, f)
		} else {
			top.Offer(&f)
		}
	}
	out.Flows = append(out.Flows, top.Flows()...)
	return out, nil
}

func (s *synthSource) Totals() (*flow.Snapshot, error) { return s.copyNamespaces(), nil }
func (s *synthSource) Mode() attach.Mode               { return attach.ModeTCX }
func (s *synthSource) AttachErrors() map[string]uint64 {
	m := map[string]uint64{}
	for _, r := range flow.AttachErrorReasons {
		m[r] = 0
	}
	return m
}
func (s *synthSource) AttachStates() map[flow.AttachState]int {
	m := map[flow.AttachState]int{}
	for _, ns := range s.snap.Namespaces {
		for _, i := range ns.Interfaces {
			if !ns.Gone {
				m[i.State]++
			}
		}
	}
	return m
}
func (s *synthSource) Interfaces() []collector.NamespaceInfo {
	out := make([]collector.NamespaceInfo, 0, len(s.snap.Namespaces))
	for _, ns := range s.snap.Namespaces {
		ni := collector.NamespaceInfo{Name: ns.Name, Inode: ns.Inode, Gone: ns.Gone}
		for _, i := range ns.Interfaces {
			ni.Interfaces = append(ni.Interfaces, collector.InterfaceInfo{Name: i.Name, Index: i.Index, State: i.State})
		}
		out = append(out, ni)
	}
	return out
}

// plainSource hides SnapshotSelect (it has only Source's methods): the
// exporter then reads every flow.
type plainSource struct{ Source }

// BenchmarkScrapeLoad scrapes /metrics over loopback HTTP (gzip, as
// Prometheus asks) from 1, 10 and 100 concurrent clients, at 1,000 pods with
// --flows (10,000 flows, --flows.max-series 1000) and the Go, process and
// build-info collectors registered as serve does. handler=nsflow is
// NewHandler (coalesced gathers and encodings; no --web.max-requests cap
// here, so every request is served and measured); handler=promhttp is what
// serve used before: promhttp.HandlerFor, one gather and one encoding per
// request, over a source without SnapshotSelect. One op is one scrape;
// p50/p99 are the clients' request latencies, peak-heap-MiB the largest
// heap in use sampled every millisecond, gathers/op the share of scrapes
// that read the source.
func BenchmarkScrapeLoad(b *testing.B) {
	src := newSynthSource(1000)
	for _, handler := range []string{"nsflow", "promhttp"} {
		for _, clients := range []int{1, 10, 100} {
			b.Run(fmt.Sprintf("handler=%s/clients=%d", handler, clients), func(b *testing.B) {
				reg := prometheus.NewRegistry()
				reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
				var h http.Handler
				var gathers func() uint64
				cfg := Config{Flows: true, MaxFlowSeries: 1000}
				if handler == "nsflow" {
					reg.MustRegister(New(src, cfg))
					nh := NewHandler(reg, WebFlags{MaxRequests: 0, ScrapeTimeout: 10 * time.Second}, nil)
					h, gathers = nh, func() uint64 { return nh.Stats().Gathers }
				} else {
					var n atomic.Uint64
					reg.MustRegister(New(plainSource{src}, cfg))
					ph := promhttp.HandlerFor(reg, promhttp.HandlerOpts{})
					h = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { n.Add(1); ph.ServeHTTP(w, r) })
					gathers = n.Load
				}
				benchScrapes(b, h, clients, gathers)
			})
		}
	}
}

func benchScrapes(b *testing.B, h http.Handler, clients int, gathers func() uint64) {
	srv := httptest.NewServer(h)
	defer srv.Close()
	tr := &http.Transport{MaxIdleConnsPerHost: clients, MaxConnsPerHost: clients}
	defer tr.CloseIdleConnections()
	client := &http.Client{Transport: tr}
	get := func() (int, error) {
		resp, err := client.Get(srv.URL + "/metrics")
		if err != nil {
			return 0, err
		}
		defer resp.Body.Close()
		_, err = io.Copy(io.Discard, resp.Body)
		return resp.StatusCode, err
	}
	if code, err := get(); code != 200 || err != nil { // warm: connection, pools
		b.Fatalf("scrape: %d %v", code, err)
	}

	stop := make(chan struct{})
	var peak uint64
	var sampler sync.WaitGroup
	sampler.Add(1)
	go func() {
		defer sampler.Done()
		s := []metrics.Sample{{Name: "/memory/classes/heap/objects:bytes"}, {Name: "/memory/classes/heap/unused:bytes"}}
		t := time.NewTicker(time.Millisecond)
		defer t.Stop()
		for {
			metrics.Read(s)
			peak = max(peak, s[0].Value.Uint64()+s[1].Value.Uint64())
			select {
			case <-stop:
				return
			case <-t.C:
			}
		}
	}()
	runtime.GC()
	g0 := gathers()
	lat := make([]time.Duration, b.N)
	var next atomic.Int64
	var wg sync.WaitGroup
	var failed atomic.Value
	b.ReportAllocs()
	b.ResetTimer()
	for c := 0; c < clients; c++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := int(next.Add(1)) - 1
				if i >= b.N {
					return
				}
				t0 := time.Now()
				code, err := get()
				lat[i] = time.Since(t0)
				if code != 200 || err != nil {
					failed.Store(fmt.Sprintf("scrape: %d %v", code, err))
				}
			}
		}()
	}
	wg.Wait()
	b.StopTimer()
	close(stop)
	sampler.Wait()
	if f := failed.Load(); f != nil {
		b.Fatal(f)
	}
	sort.Slice(lat, func(a, c int) bool { return lat[a] < lat[c] })
	b.ReportMetric(float64(lat[len(lat)/2].Microseconds())/1000, "p50-ms")
	b.ReportMetric(float64(lat[(len(lat)-1)*99/100].Microseconds())/1000, "p99-ms")
	b.ReportMetric(float64(peak)/(1<<20), "peak-heap-MiB")
	b.ReportMetric(float64(gathers()-g0)/float64(b.N), "gathers/op")
}

// BenchmarkScrapeDefaults is one /metrics scrape of serve with its defaults
// (no --flows, no --containers) at 1,000 pods of the synthetic source: the
// registry serve builds (exporter, Go, process and build-info collectors),
// NewHandler, a request with gzip as Prometheus sends it, served in
// process (no network, no client: what the server spends). cpu-ms/op is
// the process's CPU time (user and system, the garbage collector's
// included) per scrape.
//
// pods=changing alternates between 1,000 pods and 999 (one pod gone): every
// scrape reads namespaces other than the last one's, as during an attach
// storm.
func BenchmarkScrapeDefaults(b *testing.B) {
	steady := newSynthSource(1000)
	fewer := &synthSource{snap: &flow.Snapshot{Stats: steady.snap.Stats}}
	fewer.snap.Namespaces = append(steady.snap.Namespaces[:1:1], steady.snap.Namespaces[2:]...)
	for _, tc := range []struct {
		name string
		src  Source
	}{{"pods=1000", steady}, {"pods=changing", &flipSource{a: steady, b: fewer}}} {
		b.Run(tc.name, func(b *testing.B) { benchScrapeDefaults(b, tc.src) })
	}
}

// flipSource reads a and b in turn.
type flipSource struct {
	a, b *synthSource
	n    atomic.Uint64
}

func (f *flipSource) next() *synthSource {
	if f.n.Add(1)%2 == 0 {
		return f.a
	}
	return f.b
}
func (f *flipSource) Snapshot() (*flow.Snapshot, error)      { return f.next().Snapshot() }
func (f *flipSource) Totals() (*flow.Snapshot, error)        { return f.next().Totals() }
func (f *flipSource) Mode() attach.Mode                      { return f.a.Mode() }
func (f *flipSource) AttachErrors() map[string]uint64        { return f.a.AttachErrors() }
func (f *flipSource) AttachStates() map[flow.AttachState]int { return f.a.AttachStates() }
func (f *flipSource) Interfaces() []collector.NamespaceInfo  { return f.a.Interfaces() }

func benchScrapeDefaults(b *testing.B, src Source) {
	reg := prometheus.NewRegistry()
	reg.MustRegister(New(src, Config{}), versioncollector.NewCollector("nsflow"),
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	h := NewHandler(reg, WebFlags{MaxRequests: 0, ScrapeTimeout: 10 * time.Second}, nil)
	scrape := func() {
		req := httptest.NewRequest("GET", "/metrics", nil)
		req.Header.Set("Accept-Encoding", "gzip")
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, req)
		if rec.Code != http.StatusOK {
			b.Fatalf("scrape: %d %s", rec.Code, rec.Body)
		}
	}
	scrape()
	runtime.GC()
	cpu0 := cpuTime()
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		scrape()
	}
	b.StopTimer()
	b.ReportMetric(float64((cpuTime()-cpu0).Microseconds())/1000/float64(b.N), "cpu-ms/op")
}

// cpuTime is the process's CPU time so far (user and system).
func cpuTime() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		panic(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// BenchmarkGzip compresses the text answer of 1,000 pods of the synthetic
// source (serve's defaults) at BestSpeed, in the text encoder's 4 KiB
// writes: the standard library's compress/gzip and klauspost/compress's
// (the handler's).
func BenchmarkGzip(b *testing.B) {
	reg := prometheus.NewRegistry()
	reg.MustRegister(New(newSynthSource(1000), Config{}))
	mfs, err := reg.Gather()
	if err != nil {
		b.Fatal(err)
	}
	var text bytes.Buffer
	enc := expfmt.NewEncoder(&text, expfmt.NewFormat(expfmt.TypeTextPlain))
	for _, mf := range mfs {
		if err := enc.Encode(mf); err != nil {
			b.Fatal(err)
		}
	}
	data := text.Bytes()
	type writer interface {
		io.WriteCloser
		Reset(io.Writer)
	}
	for _, lib := range []struct {
		name string
		new  func() (writer, error)
	}{
		{"stdlib", func() (writer, error) { return stdgzip.NewWriterLevel(nil, stdgzip.BestSpeed) }},
		{"klauspost", func() (writer, error) { return gzip.NewWriterLevel(nil, gzip.BestSpeed) }},
	} {
		b.Run(lib.name, func(b *testing.B) {
			w, err := lib.new()
			if err != nil {
				b.Fatal(err)
			}
			var out bytes.Buffer
			b.SetBytes(int64(len(data)))
			for i := 0; i < b.N; i++ {
				out.Reset()
				w.Reset(&out)
				for o := 0; o < len(data); o += 4096 {
					w.Write(data[o:min(o+4096, len(data))])
				}
				w.Close()
			}
			b.ReportMetric(float64(out.Len()), "gzip-bytes")
		})
	}
}
