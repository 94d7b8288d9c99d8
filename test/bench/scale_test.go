package bench

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"

	"github.com/nsflow/nsflow/test/podns"
	"github.com/nsflow/nsflow/test/testenv"
)

var (
	buildOnce sync.Once
	binPath   string
	buildErr  error
)

func nsflowBinary(b testing.TB) string {
	buildOnce.Do(func() {
		dir, err := os.MkdirTemp("", "nsflow-bench-")
		if err != nil {
			buildErr = err
			return
		}
		binPath = filepath.Join(dir, "nsflow")
		out, err := exec.Command("go", "build", "-o", binPath, "github.com/nsflow/nsflow/cmd/nsflow").CombinedOutput()
		if err != nil {
			buildErr = fmt.Errorf("%v: %s", err, out)
		}
	})
	if buildErr != nil {
		b.Fatal(buildErr)
	}
	return binPath
}

func freePort(b *testing.B) int {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// procStat returns a process's CPU time and resident memory.
func procStat(b *testing.B, pid int) (cpu time.Duration, rss int64) {
	raw, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		b.Fatal(err)
	}
	f := strings.Fields(string(raw[strings.LastIndexByte(string(raw), ')')+2:]))
	ut, _ := strconv.ParseInt(f[11], 10, 64)
	st, _ := strconv.ParseInt(f[12], 10, 64)
	pages, _ := strconv.ParseInt(f[21], 10, 64)
	return time.Duration(ut+st) * (time.Second / 100), pages * int64(os.Getpagesize())
}

// kernelMemory adds up the memlock of the BPF maps a process holds (from
// /proc/PID/fdinfo) and of nsflow's programs in the kernel: the process
// closes its fds of the per-hook stubs once they are attached, so those are
// found through the kernel's list of programs, by name.
func kernelMemory(b *testing.B, pid int) (maps, progs int64) {
	for id := ebpf.ProgramID(0); ; {
		next, err := ebpf.ProgramGetNextID(id)
		if err != nil {
			break
		}
		id = next
		p, err := ebpf.NewProgramFromID(id)
		if err != nil {
			continue
		}
		if info, err := p.Info(); err == nil && strings.HasPrefix(info.Name, "nsflow_") {
			if n, ok := info.Memlock(); ok {
				progs += int64(n)
			}
		}
		p.Close()
	}
	dir := fmt.Sprintf("/proc/%d/fd", pid)
	ents, _ := os.ReadDir(dir)
	for _, e := range ents {
		target, _ := os.Readlink(filepath.Join(dir, e.Name()))
		if target != "anon_inode:bpf-map" && target != "anon_inode:bpf-prog" {
			continue
		}
		f, err := os.Open(fmt.Sprintf("/proc/%d/fdinfo/%s", pid, e.Name()))
		if err != nil {
			continue
		}
		s := bufio.NewScanner(f)
		for s.Scan() {
			if v, ok := strings.CutPrefix(s.Text(), "memlock:"); ok {
				n, _ := strconv.ParseInt(strings.TrimSpace(v), 10, 64)
				if target == "anon_inode:bpf-map" {
					maps += n
				}
			}
		}
		f.Close()
	}
	return maps, progs
}

func tcxCount(p *podns.Pod) int {
	n := 0
	p.Do(func() error {
		for _, name := range []string{"lo", "eth0"} {
			i, err := net.InterfaceByName(name)
			if err != nil {
				continue
			}
			for _, at := range []ebpf.AttachType{ebpf.AttachTCXIngress, ebpf.AttachTCXEgress} {
				if r, err := link.QueryPrograms(link.QueryOptions{Target: i.Index, Attach: at}); err == nil {
					n += len(r.Programs)
				}
			}
		}
		return nil
	})
	return n
}

func percentile(v []time.Duration, p float64) time.Duration {
	s := append([]time.Duration(nil), v...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	return s[min(len(s)-1, int(float64(len(s))*p))]
}

// BenchmarkScale runs `nsflow serve` over N pod namespaces (10, 100, 1,000;
// NSFLOW_BENCH_MAX_PODS caps N): time from start until every namespace is
// attached (readiness), resident memory, kernel memory of maps and programs,
// the median time of a full /metrics scrape, idle CPU, and the attach
// latency of namespaces created at 20 per second while it runs.
func BenchmarkScale(b *testing.B) {
	testenv.RequireRoot(b)
	maxPods := 1000
	if n, err := strconv.Atoi(os.Getenv("NSFLOW_BENCH_MAX_PODS")); err == nil {
		maxPods = n
	}
	bin := nsflowBinary(b)
	subnet := netip.MustParsePrefix("10.214.0.0/16")
	for _, n := range []int{10, 100, 1000} {
		if n > maxPods {
			break
		}
		b.Run(fmt.Sprintf("pods=%d", n), func(b *testing.B) {
			t0 := time.Now()
			for i := 0; i < n; i++ {
				name := fmt.Sprintf("bench-sc-%d", i)
				if _, err := podns.Create(podns.Config{}, name, podns.Options{Subnet: subnet}); err != nil {
					b.Fatal(err)
				}
				b.Cleanup(func() { podns.Delete(podns.Config{}, name) })
			}
			b.Logf("created %d pods in %s", n, time.Since(t0).Round(time.Millisecond))
			exp, _ := os.ReadFile("/sys/kernel/rcu_expedited") // a TCX attach waits for an RCU grace period
			b.Logf("rcu_expedited=%s", strings.TrimSpace(string(exp)))

			port := freePort(b)
			url := fmt.Sprintf("http://127.0.0.1:%d", port)
			cmd := exec.Command(bin, "serve", "--web.listen-address", "127.0.0.1:"+strconv.Itoa(port),
				"--netns.host=false", "--netns.proc=false", "--netns.include", "^bench-sc-", "--log.level", "warn", "--web.enable-pprof")
			cmd.Stderr = os.Stderr
			start := time.Now()
			if err := cmd.Start(); err != nil {
				b.Fatal(err)
			}
			defer func() { cmd.Process.Signal(syscall.SIGTERM); cmd.Wait() }()
			client := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{DisableCompression: false}}
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
				time.Sleep(5 * time.Millisecond)
			}
			ready := time.Since(start)
			scrape := func() (time.Duration, string) {
				t := time.Now()
				resp, err := client.Get(url + "/metrics")
				if err != nil {
					b.Fatal(err)
				}
				body, _ := io.ReadAll(resp.Body)
				resp.Body.Close()
				return time.Since(t), string(body)
			}
			_, body := scrape()
			want := fmt.Sprintf(`nsflow_attachments{state="attached"} %d`, 2*n)
			if !strings.Contains(body, want) {
				b.Fatalf("not every interface attached at readiness: want %q", want)
			}
			var scrapes []time.Duration
			if prof := os.Getenv("NSFLOW_BENCH_PROFILE"); prof != "" {
				// A CPU profile of serve while it is scraped back to back.
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
					scrape()
				}
				<-done
			}
			for i := 0; i < 20; i++ {
				d, _ := scrape()
				scrapes = append(scrapes, d)
			}
			pid := cmd.Process.Pid
			cpu0, _ := procStat(b, pid)
			time.Sleep(5 * time.Second)
			cpu1, rss := procStat(b, pid)
			kmaps, kprogs := kernelMemory(b, pid)

			// Churn: 20 new namespaces per second; latency from the pod's
			// interfaces existing to all four hooks attached.
			var lat []time.Duration
			var mu sync.Mutex
			var wg sync.WaitGroup
			churn := 60
			tick := time.NewTicker(50 * time.Millisecond)
			for i := 0; i < churn; i++ {
				<-tick.C
				name := fmt.Sprintf("bench-sc-churn-%d", i)
				// Another bridge: one Linux bridge takes at most 1,024 ports.
				p, err := podns.Create(podns.Config{}, name, podns.Options{Subnet: netip.MustParsePrefix("10.215.0.0/16")})
				if err != nil {
					b.Fatal(err)
				}
				created := time.Now()
				b.Cleanup(func() { podns.Delete(podns.Config{}, name) })
				wg.Add(1)
				go func() {
					defer wg.Done()
					for time.Since(created) < 10*time.Second {
						if tcxCount(p) == 4 {
							mu.Lock()
							lat = append(lat, time.Since(created))
							mu.Unlock()
							return
						}
						time.Sleep(time.Millisecond)
					}
				}()
			}
			tick.Stop()
			wg.Wait()
			if len(lat) != churn {
				b.Errorf("%d of %d churned namespaces attached within 10 s", len(lat), churn)
			}
			b.ReportMetric(ready.Seconds(), "s_to_all_attached")
			b.ReportMetric(float64(rss)/(1<<20), "MiB_rss")
			b.ReportMetric(float64(kmaps)/(1<<20), "MiB_kernel_maps")
			b.ReportMetric(float64(kprogs)/(1<<10), "KiB_kernel_progs")
			b.ReportMetric(float64(percentile(scrapes, 0.5).Microseconds())/1000, "ms_scrape_median")
			b.ReportMetric(100*(cpu1-cpu0).Seconds()/5, "%cpu_idle")
			if len(lat) > 0 {
				b.ReportMetric(float64(percentile(lat, 0.5).Microseconds())/1000, "ms_churn_attach_p50")
				b.ReportMetric(float64(percentile(lat, 0.99).Microseconds())/1000, "ms_churn_attach_p99")
			}
		})
	}
}
