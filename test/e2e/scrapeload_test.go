package e2e

import (
	"compress/gzip"
	"fmt"
	"hash/maphash"
	"io"
	"net/http"
	"os"
	"os/exec"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/nsflow/nsflow/test/podns"
	"github.com/nsflow/nsflow/test/testenv"
)

// Scrape-load budgets, as docs/DEPLOY.md states them.
const (
	scrapeLoadRSSBudget = 64 << 20 // peak resident memory of serve (VmHWM)
	scrapeLoadP99Budget = time.Second
)

// 100 concurrent clients scrape `serve --flows` 20 times each, back to back,
// while 50 pods exchange traffic. serve runs with the DaemonSet's defaults
// otherwise (the host's namespace and its interfaces observed; only the
// namespaces of other tests running at the same time are left out). Every
// answer is 200 or a deliberate 503 (--web.max-requests, default 40), every
// 200 is complete and passes promtool's lint, the counts are exact against
// the kernel's once traffic stops, p99 latency stays within a second and the
// peak resident memory of serve within the documented 64 MiB.
func TestServeScrapeLoad(t *testing.T) {
	testenv.RequireRoot(t)
	if _, err := exec.LookPath("promtool"); err != nil {
		t.Fatalf("promtool not installed (make deps): %v", err)
	}
	const npods, clients, scrapes = 50, 100, 20
	names := make([]string, npods)
	for i := range names {
		names[i] = fmt.Sprintf("sl-%02d", i)
	}
	created := time.Now()
	pods := newPods(t, "10.213.180.0/24", names...)
	t.Logf("%d pods created in %s", npods, time.Since(created).Round(time.Millisecond))
	byIno := map[uint64]*podns.Pod{}
	for _, p := range pods {
		byIno[inodeOf(t, p)] = p
	}

	srv := startServe(t, "http", "--flows", "--netns.include", "^(host|sl-)$|^sl-")
	waitUntil(t, 60*time.Second, "all pods' eth0 and lo in /metrics", func() bool {
		s, _ := srv.scrape(t)
		for _, p := range pods {
			for _, i := range []string{"lo", "eth0"} {
				if _, ok := s[pointSeries("nsflow_packets_total", p.Name, i, "tx")]; !ok {
					return false
				}
			}
		}
		return true
	})
	t.Logf("serve attached to all pods %s after they were created", time.Since(created).Round(time.Millisecond))
	k0, s0, _ := quiescentScrape(t, srv, byIno)

	// Traffic: every pod pings the next one and its own loopback, bounded
	// in count (200 each) and time (-w).
	var pings []*exec.Cmd
	for i, p := range pods {
		next := pods[(i+1)%npods]
		for _, dst := range []string{next.IPv4.String(), "127.0.0.1"} {
			cmd := exec.Command("ping", "-q", "-c", "200", "-i", "0.02", "-w", "20", dst)
			if err := p.Start(cmd); err != nil {
				t.Fatalf("ping in %s: %v", p.Name, err)
			}
			pings = append(pings, cmd)
		}
	}
	t.Cleanup(func() {
		for _, c := range pings {
			if c.ProcessState == nil {
				c.Process.Kill()
				c.Wait()
			}
		}
	})

	// The load: 100 clients, 20 scrapes each, back to back. Half take gzip
	// (as Prometheus does), half plain text. The clients keep gzip answers
	// compressed (only distinct answers are decompressed and checked), so
	// that they take less of the CPU serve needs.
	type result struct {
		code int
		dur  time.Duration
		sum  uint64
		err  string
	}
	var (
		mu      sync.Mutex
		results []result
		bodies  = map[uint64]answer{} // distinct 200 bodies
		seed    = maphash.MakeSeed()
		wg      sync.WaitGroup
	)
	tr := &http.Transport{MaxIdleConnsPerHost: clients, MaxConnsPerHost: clients, DisableCompression: true}
	t.Cleanup(tr.CloseIdleConnections)
	client := &http.Client{Transport: tr, Timeout: 15 * time.Second}
	start := time.Now()
	for c := 0; c < clients; c++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < scrapes; i++ {
				req, _ := http.NewRequest(http.MethodGet, srv.url+"/metrics", nil)
				if c%2 == 0 {
					req.Header.Set("Accept-Encoding", "gzip")
				}
				t0 := time.Now()
				resp, err := client.Do(req)
				var r result
				if err != nil {
					r.err = err.Error()
				} else {
					b, err := io.ReadAll(resp.Body)
					resp.Body.Close()
					r.code = resp.StatusCode
					if err != nil {
						r.err = err.Error()
					}
					if r.code == http.StatusOK {
						r.sum = maphash.Bytes(seed, b)
						mu.Lock()
						if _, ok := bodies[r.sum]; !ok {
							bodies[r.sum] = answer{string(b), resp.Header.Get("Content-Encoding") == "gzip"}
						}
						mu.Unlock()
					}
				}
				r.dur = time.Since(t0)
				mu.Lock()
				results = append(results, r)
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	loadTime := time.Since(start)
	hwm := vmHWM(t, srv.cmd.Process.Pid)
	for _, c := range pings {
		if err := c.Wait(); err != nil {
			t.Errorf("%v: %v", c.Args, err)
		}
	}

	// Every answer is 200 or 503.
	codes := map[int]int{}
	var durs []time.Duration
	for _, r := range results {
		if r.err != "" {
			t.Errorf("scrape failed: %s (status %d)", r.err, r.code)
		}
		codes[r.code]++
		durs = append(durs, r.dur)
	}
	sort.Slice(durs, func(a, b int) bool { return durs[a] < durs[b] })
	pct := func(p float64) time.Duration { return durs[int(p*float64(len(durs)-1))] }
	t.Logf("%d scrapes by %d clients in %s: %v (status: count); %d distinct 200 answers; latency p50 %s p90 %s p99 %s max %s; serve peak RSS (VmHWM) %.1f MiB",
		len(results), clients, loadTime.Round(time.Millisecond), codes, len(bodies),
		pct(0.5).Round(time.Microsecond), pct(0.9).Round(time.Microsecond), pct(0.99).Round(time.Microsecond), durs[len(durs)-1].Round(time.Microsecond), float64(hwm)/(1<<20))
	if len(results) != clients*scrapes {
		t.Errorf("%d answers, want %d", len(results), clients*scrapes)
	}
	for code, n := range codes {
		if code != http.StatusOK && code != http.StatusServiceUnavailable {
			t.Errorf("%d answers with status %d", n, code)
		}
	}
	if codes[http.StatusOK] == 0 {
		t.Fatal("no scrape answered 200")
	}
	if p99 := pct(0.99); p99 > scrapeLoadP99Budget {
		t.Errorf("p99 scrape latency %s, budget %s", p99, scrapeLoadP99Budget)
	}
	if hwm > scrapeLoadRSSBudget {
		t.Errorf("serve's peak resident memory %.1f MiB, budget %d MiB", float64(hwm)/(1<<20), scrapeLoadRSSBudget>>20)
	}

	// Every distinct 200 answer is complete and lint-clean.
	lint := make(chan string)
	var lintWG sync.WaitGroup
	for w := 0; w < 2; w++ {
		lintWG.Add(1)
		go func() {
			defer lintWG.Done()
			for body := range lint {
				check := exec.Command("promtool", "check", "metrics")
				check.Stdin = strings.NewReader(body)
				if out, err := check.CombinedOutput(); err != nil || len(strings.TrimSpace(string(out))) > 0 {
					t.Errorf("promtool check metrics: %v\n%s", err, out)
				}
			}
		}()
	}
	gzipped := 0
	for _, a := range bodies {
		body := a.body
		if a.gzip {
			gzipped++
			zr, err := gzip.NewReader(strings.NewReader(body))
			if err != nil {
				t.Fatalf("gzip answer: %v", err)
			}
			b, err := io.ReadAll(zr)
			if err != nil {
				t.Fatalf("gzip answer: %v", err)
			}
			body = string(b)
		}
		checkComplete(t, body, pods)
		lint <- body
	}
	if gzipped == 0 || gzipped == len(bodies) {
		t.Errorf("%d of %d distinct answers gzipped, want both kinds", gzipped, len(bodies))
	}
	close(lint)
	lintWG.Wait()

	// Traffic over: the counts are exact against the kernel's.
	k1, s1, body := quiescentScrape(t, srv, byIno)
	kd, sd := delta(k0, k1), delta(s0, s1)
	for p, want := range kd {
		if got, ok := sd[p]; !ok || got != want {
			t.Errorf("%s: /metrics %+v, kernel %+v", p, got, want)
		}
	}
	var sent uint64
	for ino := range byIno {
		sent += kd[point{ino, "eth0", "tx"}].Packets
	}
	if sent < npods*200 {
		t.Errorf("pods' eth0 sent %d packets, want at least %d (the pings)", sent, npods*200)
	}

	// The handler's own counters agree with what the clients saw: every
	// 503 a deliberate rejection, and fewer gathers than requests.
	s := parseSamples(t, body)
	rejected := s[`nsflow_scrapes_rejected_total{reason="max_requests"}`] + s[`nsflow_scrapes_rejected_total{reason="timeout"}`]
	if int(rejected) != codes[http.StatusServiceUnavailable] {
		t.Errorf("nsflow_scrapes_rejected_total %v, clients saw %d answers 503", rejected, codes[http.StatusServiceUnavailable])
	}
	gathers, requests := s["nsflow_scrape_gathers_total{}"], s["nsflow_scrape_requests_total{}"]
	t.Logf("serve: %v requests, %v gathers, %v encodings, %v rejected", requests, gathers, s["nsflow_scrape_encodings_total{}"], rejected)
	if gathers >= float64(clients*scrapes) {
		t.Errorf("%v gathers for %d scrapes: concurrent scrapes did not share them", gathers, clients*scrapes)
	}
}

// answer is a distinct 200 answer as received.
type answer struct {
	body string
	gzip bool
}

// checkComplete checks that a 200 answer holds every series it must: both
// counters of lo and eth0 of every pod in both directions, the host's lo,
// flow series within the cap, and the exporter's own families.
func checkComplete(t *testing.T, body string, pods []*podns.Pod) {
	t.Helper()
	s := parseSamples(t, body)
	var missing []string
	need := func(k string) {
		if _, ok := s[k]; !ok {
			missing = append(missing, k)
		}
	}
	for _, p := range pods {
		for _, m := range []string{"nsflow_packets_total", "nsflow_bytes_total"} {
			for _, i := range []string{"lo", "eth0"} {
				need(pointSeries(m, p.Name, i, "rx"))
				need(pointSeries(m, p.Name, i, "tx"))
			}
		}
	}
	need(pointSeries("nsflow_packets_total", "host", "lo", "rx"))
	for _, k := range []string{"nsflow_scrape_errors_total{}", "nsflow_flow_map_entries{}", "nsflow_flow_series_dropped_total{}",
		"process_resident_memory_bytes{}", "go_goroutines{}",
		// auto: TCX in the host namespace, clsact in the others.
		"nsflow_attach_mode_info" + model.LabelSet{"mode": "tcx", "scope": "host"}.String(),
		"nsflow_attach_mode_info" + model.LabelSet{"mode": "clsact", "scope": "other"}.String()} {
		need(k)
	}
	flows := 0
	for k := range s {
		// Not the remainders (protocol="other", one per observation point).
		if strings.HasPrefix(k, "nsflow_flow_packets_total{") && !strings.Contains(k, `protocol="other"`) {
			flows++
		}
	}
	if flows == 0 || flows > 1000 {
		missing = append(missing, fmt.Sprintf("flow series: %d, want 1 to 1000", flows))
	}
	if s["nsflow_scrape_errors_total{}"] != 0 {
		missing = append(missing, "nsflow_scrape_errors_total is not 0")
	}
	if len(missing) > 0 {
		t.Errorf("incomplete answer: %s", strings.Join(missing, "; "))
	}
}

func parseSamples(t *testing.T, body string) samples {
	t.Helper()
	p := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := p.TextToMetricFamilies(strings.NewReader(body))
	if err != nil {
		t.Fatalf("parse answer: %v", err)
	}
	out := samples{}
	for name, f := range fams {
		for _, m := range f.Metric {
			out[series(name, m)] = value(m)
		}
	}
	return out
}

// vmHWM returns a process's peak resident memory (VmHWM) in bytes.
func vmHWM(t *testing.T, pid int) uint64 {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(string(b), "\n") {
		if rest, ok := strings.CutPrefix(l, "VmHWM:"); ok {
			kb, err := strconv.ParseUint(strings.TrimSuffix(strings.TrimSpace(rest), " kB"), 10, 64)
			if err != nil {
				t.Fatalf("VmHWM %q: %v", rest, err)
			}
			return kb << 10
		}
	}
	t.Fatal("no VmHWM in /proc/pid/status")
	return 0
}
