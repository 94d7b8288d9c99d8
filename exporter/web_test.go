package exporter

import (
	"bytes"
	"compress/gzip"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	"github.com/spf13/pflag"
)

// gateCollector exports the number of its Collect calls so far
// (test_gather_number); Collect waits for the gate when one is set.
type gateCollector struct {
	desc      *prometheus.Desc
	started   atomic.Uint64
	completed atomic.Uint64
	entered   chan struct{} // receives once per Collect, if not nil
	gate      chan struct{} // Collect waits for a value or its close, if not nil
}

func newGateCollector() *gateCollector {
	return &gateCollector{desc: prometheus.NewDesc("test_gather_number", "Collect calls so far.", nil, nil)}
}

func (c *gateCollector) Describe(ch chan<- *prometheus.Desc) { ch <- c.desc }
func (c *gateCollector) Collect(ch chan<- prometheus.Metric) {
	n := c.started.Add(1)
	if c.entered != nil {
		c.entered <- struct{}{}
	}
	if c.gate != nil {
		<-c.gate
	}
	ch <- prometheus.MustNewConstMetric(c.desc, prometheus.CounterValue, float64(n))
	c.completed.Add(1)
}

func newTestHandler(t *testing.T, flags WebFlags, cs ...prometheus.Collector) (*Handler, *prometheus.Registry) {
	t.Helper()
	reg := prometheus.NewRegistry()
	reg.MustRegister(cs...)
	return NewHandler(reg, flags, nil), reg
}

type answer struct {
	code int
	body string
	hdr  http.Header
}

func get(h http.Handler, target string, hdr ...string) answer {
	req := httptest.NewRequest("GET", target, nil)
	for i := 0; i+1 < len(hdr); i += 2 {
		req.Header.Set(hdr[i], hdr[i+1])
	}
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, req)
	return answer{rec.Code, rec.Body.String(), rec.Header()}
}

// gatherNumber parses test_gather_number out of a text answer.
func gatherNumber(t *testing.T, body string) uint64 {
	t.Helper()
	p := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := p.TextToMetricFamilies(strings.NewReader(body))
	if err != nil {
		t.Fatalf("parse answer: %v\n%s", err, body)
	}
	f := fams["test_gather_number"]
	if f == nil || len(f.Metric) != 1 {
		t.Fatalf("no test_gather_number in answer:\n%s", body)
	}
	return uint64(f.Metric[0].GetCounter().GetValue())
}

// finished returns how many gathers are over.
func (h *Handler) finished() uint64 {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.nFinished
}

// joined returns how many requests wait for the gather in progress.
func (h *Handler) joined() int {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.cur == nil {
		return 0
	}
	h.cur.mu.Lock()
	defer h.cur.mu.Unlock()
	return h.cur.refs
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(time.Millisecond)
	}
}

// Scrapes arriving during a gather share it: one Collect, one encoding,
// identical answers; the next scrape starts a gather of its own.
func TestHandlerCoalesces(t *testing.T) {
	c := newGateCollector()
	c.entered, c.gate = make(chan struct{}, 1), make(chan struct{})
	h, _ := newTestHandler(t, WebFlags{}, c)

	const n = 30
	answers := make([]answer, n)
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { defer wg.Done(); answers[0] = get(h, "/metrics") }()
	<-c.entered // the first scrape's gather is in progress
	for i := 1; i < n; i++ {
		wg.Add(1)
		go func() { defer wg.Done(); answers[i] = get(h, "/metrics") }()
	}
	waitFor(t, "all scrapes waiting for the gather", func() bool { return h.joined() == n })
	close(c.gate)
	wg.Wait()

	for i, a := range answers {
		if a.code != 200 || a.body != answers[0].body {
			t.Fatalf("answer %d: %d, differs from answer 0:\n%s\n---\n%s", i, a.code, a.body, answers[0].body)
		}
	}
	if got := gatherNumber(t, answers[0].body); got != 1 {
		t.Errorf("answers from gather %d, want 1", got)
	}
	st := h.Stats()
	if c.started.Load() != 1 || st.Gathers != 1 || st.Encodings != 1 || st.Requests != n {
		t.Errorf("%d requests: %d Collect calls, %d gathers, %d encodings; want 1 of each", st.Requests, c.started.Load(), st.Gathers, st.Encodings)
	}

	// The gather is over: a new scrape does not get its result.
	c.entered = nil
	if a := get(h, "/metrics"); gatherNumber(t, a.body) != 2 {
		t.Errorf("scrape after the shared gather answered from gather %d, want 2", gatherNumber(t, a.body))
	}
}

// Under a stream of concurrent scrapes, every answer comes from a gather
// that had not finished when the request was sent (the freshness rule), and
// pooled buffers never mix answers.
func TestHandlerFreshness(t *testing.T) {
	c := newGateCollector()
	h, _ := newTestHandler(t, WebFlags{MaxRequests: 0}, c)
	const clients, scrapes = 40, 50
	var wg sync.WaitGroup
	var mu sync.Mutex
	var failures []string
	for i := 0; i < clients; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for j := 0; j < scrapes; j++ {
				done := h.finished()
				a := get(h, "/metrics")
				p := expfmt.NewTextParser(model.UTF8Validation)
				fams, err := p.TextToMetricFamilies(strings.NewReader(a.body))
				mu.Lock()
				switch {
				case a.code != 200 || err != nil || fams["test_gather_number"] == nil:
					failures = append(failures, fmt.Sprintf("%d %v %q", a.code, err, a.body))
				case uint64(fams["test_gather_number"].Metric[0].GetCounter().GetValue()) <= done:
					failures = append(failures, "stale answer: gather finished before the request")
				}
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	if len(failures) > 0 {
		t.Fatalf("%d bad answers, first: %s", len(failures), failures[0])
	}
	st := h.Stats()
	t.Logf("%d scrapes, %d gathers, %d encodings", st.Requests, st.Gathers, st.Encodings)
	if st.Gathers > st.Requests || st.Gathers != c.started.Load() {
		t.Errorf("%d gathers for %d requests, %d Collect calls", st.Gathers, st.Requests, c.started.Load())
	}
}

// Beyond --web.max-requests a scrape is answered 503 at once.
func TestHandlerMaxRequests(t *testing.T) {
	c := newGateCollector()
	c.entered, c.gate = make(chan struct{}, 1), make(chan struct{})
	h, reg := newTestHandler(t, WebFlags{MaxRequests: 2}, c)
	var wg sync.WaitGroup
	answers := make([]answer, 2)
	for i := range answers {
		wg.Add(1)
		go func() { defer wg.Done(); answers[i] = get(h, "/metrics") }()
	}
	<-c.entered
	waitFor(t, "two scrapes in flight", func() bool { return h.joined() == 2 })
	start := time.Now()
	a := get(h, "/metrics")
	if a.code != http.StatusServiceUnavailable || !strings.Contains(a.body, "--web.max-requests") {
		t.Errorf("third scrape: %d %q, want 503", a.code, a.body)
	}
	if d := time.Since(start); d > time.Second {
		t.Errorf("503 took %s, want at once", d)
	}
	c.entered = nil
	close(c.gate)
	wg.Wait()
	for i, a := range answers {
		if a.code != 200 {
			t.Errorf("scrape %d in flight: %d", i, a.code)
		}
	}
	// The slots are free again, and the rejection is counted.
	a = get(h, "/metrics")
	if a.code != 200 {
		t.Fatalf("scrape after the burst: %d", a.code)
	}
	if !strings.Contains(a.body, `nsflow_scrapes_rejected_total{reason="max_requests"} 1`) ||
		!strings.Contains(a.body, `nsflow_scrapes_rejected_total{reason="timeout"} 0`) {
		t.Errorf("rejections not counted:\n%s", a.body)
	}
	_ = reg
}

// A scrape whose gather takes longer than --web.scrape-timeout is answered
// 503 when the timeout passes; the gather goes on for the scrapes after it.
func TestHandlerTimeout(t *testing.T) {
	c := newGateCollector()
	c.entered, c.gate = make(chan struct{}, 1), make(chan struct{})
	h, _ := newTestHandler(t, WebFlags{ScrapeTimeout: 200 * time.Millisecond}, c)
	start := time.Now()
	a := get(h, "/metrics")
	<-c.entered
	if d := time.Since(start); a.code != http.StatusServiceUnavailable || d < 200*time.Millisecond || d > 5*time.Second {
		t.Errorf("scrape of a stuck gather: %d after %s, want 503 after 200ms", a.code, d)
	}
	if st := h.Stats(); st.Rejected[rejectTimeout] != 1 {
		t.Errorf("timeouts counted: %v", st.Rejected)
	}
	c.entered = nil
	close(c.gate)
	waitFor(t, "the stuck gather to end", func() bool { return h.joined() == 0 && c.completed.Load() == 1 })
	if a := get(h, "/metrics"); a.code != 200 || gatherNumber(t, a.body) != 2 {
		t.Errorf("scrape after the stuck gather: %d %q", a.code, a.body)
	}
}

// The answers equal promhttp's for the same registry, in every format and
// compression, and name[] filters.
func TestHandlerMatchesPromhttp(t *testing.T) {
	snap := fixture()
	reg := prometheus.NewRegistry()
	reg.MustRegister(New(fakeSource{snap}, Config{Flows: true, MaxFlowSeries: 2}))
	h := NewHandler(reg, WebFlags{MaxRequests: 40, ScrapeTimeout: time.Second}, nil)
	ref := promhttp.HandlerFor(reg, promhttp.HandlerOpts{})
	// Both gather the handler's own counters: compare everything else.
	strip := func(s string) string {
		var out []string
		for _, l := range strings.Split(s, "\n") {
			// The handler's counters, and the dropped flows counted per gather.
			if !strings.Contains(l, "nsflow_scrape_") && !strings.Contains(l, "nsflow_scrapes_rejected") &&
				!strings.HasPrefix(l, "nsflow_flow_series_dropped_total ") {
				out = append(out, l)
			}
		}
		return strings.Join(out, "\n")
	}
	for _, accept := range []string{"", "text/plain", string(expfmt.NewFormat(expfmt.TypeProtoDelim))} {
		for _, gz := range []bool{false, true} {
			hdr := []string{"Accept", accept}
			if gz {
				hdr = append(hdr, "Accept-Encoding", "gzip")
			}
			got, want := get(h, "/metrics", hdr...), get(ref, "/metrics", hdr...)
			if got.code != 200 || got.hdr.Get("Content-Type") != want.hdr.Get("Content-Type") ||
				got.hdr.Get("Content-Encoding") != want.hdr.Get("Content-Encoding") {
				t.Errorf("accept %q gzip %v: %d %v, promhttp %v", accept, gz, got.code, got.hdr, want.hdr)
				continue
			}
			gb, wb := got.body, want.body
			if gz {
				gb, wb = gunzip(t, gb), gunzip(t, wb)
			}
			if strings.HasPrefix(accept, "application/") {
				gb, wb = decodeProto(t, gb), decodeProto(t, wb)
			}
			if strip(gb) != strip(wb) {
				t.Errorf("accept %q gzip %v: answer differs from promhttp's:\n%s\n---\n%s", accept, gz, gb, wb)
			}
		}
	}
	got, want := get(h, "/metrics?name[]=nsflow_packets_total&name[]=nsflow_attach_mode_info"), get(ref, "/metrics?name[]=nsflow_packets_total&name[]=nsflow_attach_mode_info")
	if got.body != want.body || !strings.Contains(got.body, "nsflow_packets_total{") || strings.Contains(got.body, "nsflow_bytes_total") {
		t.Errorf("name[] filter:\n%s\n---\n%s", got.body, want.body)
	}
}

func gunzip(t *testing.T, s string) string {
	t.Helper()
	r, err := gzip.NewReader(strings.NewReader(s))
	if err != nil {
		t.Fatal(err)
	}
	b, err := io.ReadAll(r)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// decodeProto turns a delimited protobuf answer into text.
func decodeProto(t *testing.T, s string) string {
	t.Helper()
	dec := expfmt.NewDecoder(strings.NewReader(s), expfmt.NewFormat(expfmt.TypeProtoDelim))
	var out bytes.Buffer
	enc := expfmt.NewEncoder(&out, expfmt.NewFormat(expfmt.TypeTextPlain))
	for {
		mf := new(dto.MetricFamily)
		if err := dec.Decode(mf); err == io.EOF {
			break
		} else if err != nil {
			t.Fatalf("decode protobuf answer: %v", err)
		}
		if err := enc.Encode(mf); err != nil {
			t.Fatal(err)
		}
	}
	return out.String()
}

func TestWebFlags(t *testing.T) {
	var f WebFlags
	fs := pflag.NewFlagSet("serve", pflag.ContinueOnError)
	f.Register(fs)
	if err := fs.Parse(nil); err != nil {
		t.Fatal(err)
	}
	if f != (WebFlags{MaxRequests: 40, ScrapeTimeout: 10 * time.Second}) || f.Validate() != nil {
		t.Errorf("defaults: %+v, %v", f, f.Validate())
	}
	if err := fs.Parse([]string{"--web.max-requests=0", "--web.scrape-timeout=0"}); err != nil || f.Validate() != nil || f.MaxRequests != 0 || f.ScrapeTimeout != 0 {
		t.Errorf("0 (no limit): %+v, %v %v", f, err, f.Validate())
	}
	for _, bad := range []WebFlags{{MaxRequests: -1}, {ScrapeTimeout: -time.Second}} {
		if err := bad.Validate(); err == nil {
			t.Errorf("%+v accepted", bad)
		}
	}
	if !acceptsGzip("deflate, gzip;q=1.0, *;q=0.5") || acceptsGzip("gzip;q=0") || acceptsGzip("identity") || acceptsGzip("") {
		t.Error("Accept-Encoding parsing")
	}
}

// The write deadline of --web.scrape-timeout ends with its request: a
// scraper that keeps its connection open (as Prometheus does) is served
// again after the timeout has passed.
func TestHandlerTimeoutKeepAlive(t *testing.T) {
	c := newGateCollector()
	h, _ := newTestHandler(t, WebFlags{ScrapeTimeout: 100 * time.Millisecond}, c)
	// ConnState is set before the server starts, and counted atomically
	// (the server's goroutines call it).
	srv := httptest.NewUnstartedServer(h)
	var conns atomic.Int32
	srv.Config.ConnState = func(_ net.Conn, s http.ConnState) {
		if s == http.StateNew {
			conns.Add(1)
		}
	}
	srv.Start()
	defer srv.Close()
	client := srv.Client()
	for i := 0; i < 3; i++ {
		resp, err := client.Get(srv.URL + "/metrics")
		if err != nil {
			t.Fatalf("scrape %d: %v", i, err)
		}
		b, err := io.ReadAll(resp.Body)
		resp.Body.Close()
		if err != nil || resp.StatusCode != 200 || gatherNumber(t, string(b)) != uint64(i+1) {
			t.Fatalf("scrape %d: %d %v", i, resp.StatusCode, err)
		}
		time.Sleep(250 * time.Millisecond)
	}
	if n := conns.Load(); n != 1 {
		t.Errorf("%d connections for 3 scrapes, want 1 (kept alive)", n)
	}
}
