package exporter

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/klauspost/compress/gzip"
	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/spf13/pflag"
)

// WebFlags are the flags of the /metrics handler under load.
type WebFlags struct {
	// MaxRequests caps the scrape requests served at once (0: no limit);
	// one more is answered 503 at once, as node_exporter's
	// --web.max-requests does.
	MaxRequests int
	// ScrapeTimeout bounds a scrape request from its arrival to the last
	// byte of its answer (0: no limit). A request whose metrics are not
	// gathered in time is answered 503.
	ScrapeTimeout time.Duration
}

// Default values of WebFlags: node_exporter's --web.max-requests, and
// Prometheus' default scrape_timeout.
const (
	DefaultMaxRequests   = 40
	DefaultScrapeTimeout = 10 * time.Second
)

// Register adds --web.max-requests and --web.scrape-timeout to fs.
func (f *WebFlags) Register(fs *pflag.FlagSet) {
	fs.IntVar(&f.MaxRequests, "web.max-requests", DefaultMaxRequests,
		"maximum number of scrape requests served at once; beyond it a request is answered 503 at once (0: no limit)")
	fs.DurationVar(&f.ScrapeTimeout, "web.scrape-timeout", DefaultScrapeTimeout,
		"answer a scrape 503 if its metrics are not gathered in this time, and give up writing its answer after it (0: no limit)")
}

// Validate checks the flags' values.
func (f WebFlags) Validate() error {
	if f.MaxRequests < 0 {
		return fmt.Errorf("--web.max-requests must not be negative, got %d", f.MaxRequests)
	}
	if f.ScrapeTimeout < 0 {
		return fmt.Errorf("--web.scrape-timeout must not be negative, got %s", f.ScrapeTimeout)
	}
	return nil
}

// Handler serves /metrics from a registry, sharing work between concurrent
// scrapes:
//
//   - Coalescing: a scrape that arrives while a gather of the registry is in
//     progress waits for that gather and answers with its result; one that
//     arrives when none is in progress starts one. So at most one gather runs
//     at a time, whatever the number of clients.
//   - Freshness: a scrape never answers with a gather that had finished
//     before the scrape arrived. Its data was read at most one gather's
//     duration before its arrival (when it joined a gather in progress), or
//     after it.
//   - Shared encoding: the scrapes that share a gather share its encoded
//     answer too (one encoding per format and compression), written from one
//     buffer; buffers are reused from gather to gather.
//   - Limits: WebFlags.MaxRequests requests at once (beyond: 503 at once),
//     each within WebFlags.ScrapeTimeout (a gather not done in time: 503).
type Handler struct {
	g     prometheus.Gatherer
	flags WebFlags
	log   *slog.Logger
	slots chan struct{} // nil: no limit
	bufs  sync.Pool     // *bytes.Buffer
	gzips sync.Pool     // *gzip.Writer

	mu  sync.Mutex
	cur *generation // the gather in progress, if any

	requestsDesc, gathersDesc       *prometheus.Desc
	rejectedDesc, encodingsDesc     *prometheus.Desc
	nRequests, nGathers, nEncodings uint64
	nFinished                       uint64 // gathers over
	nRejected                       map[string]uint64
}

// A generation is one gather and the answers encoded from it.
type generation struct {
	done chan struct{} // closed when the gather is over
	mfs  []*dto.MetricFamily
	err  error

	mu       sync.Mutex
	refs     int  // requests using it
	finished bool // the gather is over
	enc      map[encoding]*encoded
}

type encoding struct {
	format expfmt.Format
	gzip   bool
}

type encoded struct {
	once sync.Once
	buf  *bytes.Buffer
	err  error
}

// Rejection reasons, the reason label of nsflow_scrapes_rejected_total.
const (
	rejectMaxRequests = "max_requests"
	rejectTimeout     = "timeout"
)

// NewHandler returns the /metrics handler of reg, and registers its own
// counters in reg: nsflow_scrape_requests_total, nsflow_scrape_gathers_total
// (fewer than requests when scrapes share gathers),
// nsflow_scrape_encodings_total and nsflow_scrapes_rejected_total{reason}.
// log receives gather and encoding errors (nil: none).
func NewHandler(reg *prometheus.Registry, flags WebFlags, log *slog.Logger) *Handler {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	h := &Handler{g: reg, flags: flags, log: log, nRejected: map[string]uint64{rejectMaxRequests: 0, rejectTimeout: 0}}
	if flags.MaxRequests > 0 {
		h.slots = make(chan struct{}, flags.MaxRequests)
	}
	h.bufs.New = func() any { return new(bytes.Buffer) }
	// One compression per gather, shared by its scrapes: at BestSpeed it
	// takes a third of the default level's time for a 15% larger answer,
	// and klauspost/compress's (linked through client_golang already)
	// about half the standard library's (BenchmarkGzip).
	h.gzips.New = func() any { w, _ := gzip.NewWriterLevel(nil, gzip.BestSpeed); return w }
	d := func(name, help string, labels ...string) *prometheus.Desc {
		return prometheus.NewDesc(prometheus.BuildFQName(namespace, "", name), help, labels, nil)
	}
	h.requestsDesc = d("scrape_requests_total", "Scrape requests received by /metrics, rejected ones included.")
	h.gathersDesc = d("scrape_gathers_total", "Reads of the metrics for /metrics: concurrent scrapes share one.")
	h.encodingsDesc = d("scrape_encodings_total", "Encodings of a gather's metrics: one per format and compression per gather.")
	h.rejectedDesc = d("scrapes_rejected_total", "Scrape requests answered 503, by reason: max_requests (--web.max-requests reached), timeout (metrics not gathered within --web.scrape-timeout).", "reason")
	reg.MustRegister(handlerCollector{h})
	return h
}

// handlerCollector exports the handler's own counters.
type handlerCollector struct{ h *Handler }

func (c handlerCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- c.h.requestsDesc
	ch <- c.h.gathersDesc
	ch <- c.h.encodingsDesc
	ch <- c.h.rejectedDesc
}

func (c handlerCollector) Collect(ch chan<- prometheus.Metric) {
	h := c.h
	h.mu.Lock()
	req, gat, enc := h.nRequests, h.nGathers, h.nEncodings
	rej := map[string]uint64{}
	for k, v := range h.nRejected {
		rej[k] = v
	}
	h.mu.Unlock()
	ch <- prometheus.MustNewConstMetric(h.requestsDesc, prometheus.CounterValue, float64(req))
	ch <- prometheus.MustNewConstMetric(h.gathersDesc, prometheus.CounterValue, float64(gat))
	ch <- prometheus.MustNewConstMetric(h.encodingsDesc, prometheus.CounterValue, float64(enc))
	for reason, n := range rej {
		ch <- prometheus.MustNewConstMetric(h.rejectedDesc, prometheus.CounterValue, float64(n), reason)
	}
}

// HandlerStats are the handler's counters.
type HandlerStats struct {
	Requests, Gathers, Encodings uint64
	Rejected                     map[string]uint64
}

// Stats returns the handler's counters.
func (h *Handler) Stats() HandlerStats {
	h.mu.Lock()
	defer h.mu.Unlock()
	s := HandlerStats{Requests: h.nRequests, Gathers: h.nGathers, Encodings: h.nEncodings, Rejected: map[string]uint64{}}
	for k, v := range h.nRejected {
		s.Rejected[k] = v
	}
	return s
}

func (h *Handler) reject(w http.ResponseWriter, reason, msg string) {
	h.mu.Lock()
	h.nRejected[reason]++
	h.mu.Unlock()
	http.Error(w, msg, http.StatusServiceUnavailable)
}

// ServeHTTP implements http.Handler.
func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	h.mu.Lock()
	h.nRequests++
	h.mu.Unlock()
	if h.slots != nil {
		select {
		case h.slots <- struct{}{}:
			defer func() { <-h.slots }()
		default:
			h.reject(w, rejectMaxRequests, fmt.Sprintf("Limit of concurrent scrape requests reached (%d, --web.max-requests), try again later.", h.flags.MaxRequests))
			return
		}
	}
	ctx := r.Context()
	if h.flags.ScrapeTimeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, h.flags.ScrapeTimeout)
		defer cancel()
		// A slow reader does not hold its slot beyond the timeout.
		if dl, ok := ctx.Deadline(); ok {
			_ = http.NewResponseController(w).SetWriteDeadline(dl)
		}
	}

	g := h.join()
	defer h.release(g)
	select {
	case <-g.done:
	case <-ctx.Done():
		if errors.Is(ctx.Err(), context.DeadlineExceeded) {
			h.reject(w, rejectTimeout, fmt.Sprintf("Metrics not gathered within %s (--web.scrape-timeout).", h.flags.ScrapeTimeout))
		}
		return // else the client went away
	}
	if g.err != nil {
		h.log.Error("gather metrics", "err", g.err)
		http.Error(w, "An error has occurred while serving metrics:\n\n"+g.err.Error(), http.StatusInternalServerError)
		return
	}

	format := expfmt.Negotiate(r.Header)
	e := encoding{format: format, gzip: acceptsGzip(r.Header.Get("Accept-Encoding"))}
	var body []byte
	if names := r.URL.Query()["name[]"]; len(names) > 0 {
		// A filtered scrape (rare): encoded for itself alone.
		buf := h.bufs.Get().(*bytes.Buffer)
		defer h.putBuf(buf)
		if err := h.encode(buf, g.mfs, e, names); err != nil {
			h.log.Error("encode metrics", "err", err)
			http.Error(w, "An error has occurred while serving metrics:\n\n"+err.Error(), http.StatusInternalServerError)
			return
		}
		body = buf.Bytes()
	} else {
		enc := h.encoded(g, e)
		if enc.err != nil {
			h.log.Error("encode metrics", "err", enc.err)
			http.Error(w, "An error has occurred while serving metrics:\n\n"+enc.err.Error(), http.StatusInternalServerError)
			return
		}
		body = enc.buf.Bytes()
	}
	hd := w.Header()
	hd.Add("Vary", "Accept")
	hd.Add("Vary", "Accept-Encoding")
	hd.Set("Content-Type", string(format))
	if e.gzip {
		hd.Set("Content-Encoding", "gzip")
	}
	hd.Set("Content-Length", fmt.Sprint(len(body)))
	_, _ = w.Write(body) // an error is the client's: it went away or read too slowly
}

// join returns the gather in progress, or starts one.
func (h *Handler) join() *generation {
	h.mu.Lock()
	defer h.mu.Unlock()
	g := h.cur
	if g == nil {
		g = &generation{done: make(chan struct{}), enc: map[encoding]*encoded{}}
		h.cur = g
		h.nGathers++
		// In its own goroutine, so that waiting requests can time out.
		go h.gather(g)
	}
	g.mu.Lock()
	g.refs++
	g.mu.Unlock()
	return g
}

func (h *Handler) gather(g *generation) {
	defer func() {
		if p := recover(); p != nil {
			g.err = fmt.Errorf("gather panicked: %v", p)
		}
		// Requests from now on start a new gather: none is served data
		// gathered before it arrived.
		h.mu.Lock()
		if h.cur == g {
			h.cur = nil
		}
		h.nFinished++
		h.mu.Unlock()
		close(g.done)
		g.mu.Lock()
		g.finished = true
		if g.refs == 0 { // every request timed out or went away
			h.recycle(g)
		}
		g.mu.Unlock()
	}()
	g.mfs, g.err = h.g.Gather()
}

// release drops a request's use of g. The last one, once the gather is
// over, returns g's buffers to the pool.
func (h *Handler) release(g *generation) {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.refs--
	if g.refs == 0 && g.finished {
		h.recycle(g)
	}
}

// recycle returns g's buffers to the pool; g.mu is held, g unused.
func (h *Handler) recycle(g *generation) {
	for k, enc := range g.enc {
		if enc.buf != nil {
			h.putBuf(enc.buf)
			enc.buf = nil
		}
		delete(g.enc, k)
	}
	g.mfs = nil
}

func (h *Handler) putBuf(b *bytes.Buffer) {
	// Keep at most 4 MiB per pooled buffer: one outsized answer does not
	// pin its memory.
	if b.Cap() <= 4<<20 {
		b.Reset()
		h.bufs.Put(b)
	}
}

// encoded returns g's answer in encoding e, encoding it on first use.
func (h *Handler) encoded(g *generation, e encoding) *encoded {
	g.mu.Lock()
	enc, ok := g.enc[e]
	if !ok {
		enc = &encoded{}
		g.enc[e] = enc
	}
	g.mu.Unlock()
	enc.once.Do(func() {
		h.mu.Lock()
		h.nEncodings++
		h.mu.Unlock()
		buf := h.bufs.Get().(*bytes.Buffer)
		if err := h.encode(buf, g.mfs, e, nil); err != nil {
			h.putBuf(buf)
			enc.err = err
			return
		}
		enc.buf = buf
	})
	return enc
}

// encode writes mfs (only those named in names, if any) to buf in e.
func (h *Handler) encode(buf *bytes.Buffer, mfs []*dto.MetricFamily, e encoding, names []string) error {
	buf.Reset()
	var w interface {
		Write([]byte) (int, error)
	} = buf
	var gz *gzip.Writer
	if e.gzip {
		gz = h.gzips.Get().(*gzip.Writer)
		defer h.gzips.Put(gz)
		gz.Reset(buf)
		w = gz
	}
	enc := expfmt.NewEncoder(w, e.format)
	for _, mf := range mfs {
		if names != nil && !contains(names, mf.GetName()) {
			continue
		}
		if err := enc.Encode(mf); err != nil {
			return err
		}
	}
	if c, ok := enc.(expfmt.Closer); ok {
		if err := c.Close(); err != nil {
			return err
		}
	}
	if gz != nil {
		return gz.Close()
	}
	return nil
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

// acceptsGzip reports whether an Accept-Encoding header accepts gzip (with
// a non-zero quality).
func acceptsGzip(header string) bool {
	for _, part := range strings.Split(header, ",") {
		coding, params, _ := strings.Cut(strings.TrimSpace(part), ";")
		if !strings.EqualFold(strings.TrimSpace(coding), "gzip") {
			continue
		}
		q := strings.ReplaceAll(strings.TrimSpace(params), " ", "")
		return q != "q=0" && q != "q=0.0" && q != "q=0.00" && q != "q=0.000"
	}
	return false
}
