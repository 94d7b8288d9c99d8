package bench

import (
	"fmt"
	"io"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/nsflow/nsflow/test/podns"
	"github.com/nsflow/nsflow/test/testenv"
)

// vmHWM returns a process's peak resident memory (VmHWM) in bytes.
func vmHWM(b *testing.B, pid int) int64 {
	st, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		b.Fatal(err)
	}
	for _, l := range strings.Split(string(st), "\n") {
		if rest, ok := strings.CutPrefix(l, "VmHWM:"); ok {
			kb, _ := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(rest), " kB"), 10, 64)
			return kb << 10
		}
	}
	b.Fatal("no VmHWM")
	return 0
}

// BenchmarkScrapeLoadServe runs `nsflow serve --flows` with the DaemonSet's
// defaults otherwise (the host's namespace observed, --web.max-requests 40)
// over 1,000 pods (NSFLOW_BENCH_MAX_PODS caps it) that have pinged their
// neighbour (flows at every pod and host veth), then scrapes it with 1, 10
// and 100 concurrent clients, 20 scrapes each, back to back (gzip, as
// Prometheus asks): the answers by status, latency p50/p99 of all answers
// and of the 200s, and serve's peak resident memory so far (VmHWM).
func BenchmarkScrapeLoadServe(b *testing.B) {
	testenv.RequireRoot(b)
	n := 1000
	if m, err := strconv.Atoi(os.Getenv("NSFLOW_BENCH_MAX_PODS")); err == nil && m < n {
		n = m
	}
	bin := nsflowBinary(b)
	subnet := netip.MustParsePrefix("10.216.0.0/16")
	t0 := time.Now()
	pods := make([]*podns.Pod, n)
	for i := range pods {
		name := fmt.Sprintf("bench-sl-%d", i)
		p, err := podns.Create(podns.Config{}, name, podns.Options{Subnet: subnet})
		if err != nil {
			b.Fatal(err)
		}
		pods[i] = p
		b.Cleanup(func() { podns.Delete(podns.Config{}, name) })
	}
	b.Logf("created %d pods in %s", n, time.Since(t0).Round(time.Millisecond))

	port := freePort(b)
	url := fmt.Sprintf("http://127.0.0.1:%d", port)
	args := []string{"serve", "--web.listen-address", "127.0.0.1:" + strconv.Itoa(port),
		"--flows", "--netns.include", "^(host$|bench-sl-)", "--log.level", "warn"}
	prof := os.Getenv("NSFLOW_BENCH_PROFILE")
	if prof != "" {
		args = append(args, "--web.enable-pprof")
	}
	cmd := exec.Command(bin, args...)
	cmd.Stderr = os.Stderr
	start := time.Now()
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	defer func() { cmd.Process.Signal(syscall.SIGTERM); cmd.Wait() }()
	client := &http.Client{Timeout: 30 * time.Second}
	for {
		resp, err := client.Get(url + "/-/ready")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == 200 {
				break
			}
		}
		if time.Since(start) > 5*time.Minute {
			b.Fatal("serve never ready")
		}
		time.Sleep(10 * time.Millisecond)
	}
	b.Logf("serve ready (all attached) after %s", time.Since(start).Round(time.Millisecond))

	// Flows: every pod pings its neighbour three times, 100 pods at a time.
	for i := 0; i < n; i += 100 {
		var pings []*exec.Cmd
		for j := i; j < min(i+100, n); j++ {
			c := exec.Command("ping", "-q", "-c", "3", "-i", "0.1", "-w", "5", pods[(j+1)%n].IPv4.String())
			if err := pods[j].Start(c); err != nil {
				b.Fatal(err)
			}
			pings = append(pings, c)
		}
		for _, c := range pings {
			c.Wait()
		}
	}
	resp, err := client.Get(url + "/metrics")
	if err != nil {
		b.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	for _, l := range strings.Split(string(body), "\n") {
		if strings.HasPrefix(l, "nsflow_flow_map_entries ") || strings.HasPrefix(l, "nsflow_attachments{") {
			b.Log(l)
		}
	}

	if prof != "" {
		// A CPU profile of serve while one client scrapes back to back.
		done := make(chan struct{})
		go func() {
			defer close(done)
			resp, err := client.Get(url + "/debug/pprof/profile?seconds=5")
			if err == nil {
				out, _ := os.Create(prof)
				io.Copy(out, resp.Body)
				out.Close()
				resp.Body.Close()
			}
		}()
		for t := time.Now(); time.Since(t) < 5*time.Second; {
			if resp, err := client.Get(url + "/metrics"); err == nil {
				io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
			}
		}
		<-done
	}

	for _, clients := range []int{1, 10, 100} {
		b.Run(fmt.Sprintf("pods=%d/clients=%d", n, clients), func(b *testing.B) {
			const scrapes = 20
			tr := &http.Transport{MaxIdleConnsPerHost: clients, MaxConnsPerHost: clients}
			defer tr.CloseIdleConnections()
			c := &http.Client{Transport: tr, Timeout: 30 * time.Second}
			var mu sync.Mutex
			var all, ok []time.Duration
			codes := map[int]int{}
			var wg sync.WaitGroup
			for k := 0; k < clients; k++ {
				wg.Add(1)
				go func() {
					defer wg.Done()
					for i := 0; i < scrapes; i++ {
						t := time.Now()
						resp, err := c.Get(url + "/metrics")
						code := 0
						if err == nil {
							io.Copy(io.Discard, resp.Body)
							resp.Body.Close()
							code = resp.StatusCode
						}
						d := time.Since(t)
						mu.Lock()
						codes[code]++
						all = append(all, d)
						if code == 200 {
							ok = append(ok, d)
						}
						mu.Unlock()
					}
				}()
			}
			wg.Wait()
			b.Logf("answers by status: %v", codes)
			for code := range codes {
				if code != 200 && code != 503 {
					b.Errorf("%d answers with status %d", codes[code], code)
				}
			}
			b.ReportMetric(float64(percentile(all, 0.5).Microseconds())/1000, "ms_p50")
			b.ReportMetric(float64(percentile(all, 0.99).Microseconds())/1000, "ms_p99")
			if len(ok) > 0 {
				b.ReportMetric(float64(percentile(ok, 0.99).Microseconds())/1000, "ms_p99_200s")
			}
			b.ReportMetric(float64(codes[503])/float64(clients*scrapes), "share_503")
			b.ReportMetric(float64(vmHWM(b, cmd.Process.Pid))/(1<<20), "MiB_peak_rss")
		})
	}
}
