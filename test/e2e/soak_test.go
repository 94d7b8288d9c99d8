package e2e

import (
	"fmt"
	"net/netip"
	"os"
	"strconv"
	"testing"
	"time"

	"github.com/nsflow/nsflow/collector/flow"
	"github.com/nsflow/nsflow/test/podns"
	"github.com/nsflow/nsflow/test/testenv"
)

// soakCycles is the number of pod create/delete cycles: small in the normal
// test run, large with `make soak` (NSFLOW_SOAK_CYCLES).
func soakCycles() int {
	if n, err := strconv.Atoi(os.Getenv("NSFLOW_SOAK_CYCLES")); err == nil && n > 0 {
		return n
	}
	return 40
}

// Pods come and go while traffic flows and Prometheus-style scrapes run:
// serve leaks no fd, link, program or goroutine, its memory stays flat, and
// the surviving pods' counts stay exact.
func TestChurnSoak(t *testing.T) {
	testenv.RequireRoot(t)
	cycles := soakCycles()
	srv := startServe(t, "http", "--netns.host=false", "--netns.proc=false", "--netns.include", "^e2e-soak-", "--netns.grace-period", "100ms")
	pid := srv.cmd.Process.Pid
	survivors := newPods(t, "10.213.140.0/24", "e2e-soak-keep-0", "e2e-soak-keep-1")
	byIno := map[uint64]*podns.Pod{}
	for _, p := range survivors {
		byIno[inodeOf(t, p)] = p
	}
	waitUntil(t, 10*time.Second, "survivors in /metrics", func() bool {
		s, _ := srv.scrape(t)
		for _, p := range survivors {
			if _, ok := s[pointSeries("nsflow_packets_total", p.Name, "lo", "tx")]; !ok {
				return false
			}
		}
		return true
	})
	k0, s0, _ := quiescentScrape(t, srv, byIno)
	// serve's TCX link fds with only the survivors (none under auto, which
	// attaches pods with clsact: their filters are counted in the kernel).
	survivorLinks := countFDs(fds(t, pid), "bpf_link")
	hooks := func() int {
		n := 0
		for _, p := range survivors {
			n += hookPrograms(t, p)
		}
		return n
	}

	type usage struct {
		fds, links, progs     int
		goroutines, rss, nsfd float64
	}
	measure := func() usage {
		f := fds(t, pid)
		s, _ := srv.scrape(t)
		return usage{fds: len(f), links: countFDs(f, "bpf_link"), progs: countFDs(f, "bpf-prog"),
			goroutines: s["go_goroutines{}"], rss: s["process_resident_memory_bytes{}"]}
	}
	var base usage
	start := time.Now()
	for i := 0; i < cycles; i++ {
		name := fmt.Sprintf("e2e-soak-%d", i)
		p, err := podns.Create(podns.Config{}, name, podns.Options{Subnet: netip.MustParsePrefix("10.213.141.0/24")})
		if err != nil {
			t.Fatalf("cycle %d: %v", i, err)
		}
		// Traffic in the short-lived pod and in a survivor.
		udpExchange(t, p, p, netip.MustParseAddrPort("127.0.0.1:9900"), 3, 10)
		udpExchange(t, survivors[i%2], survivors[i%2], netip.MustParseAddrPort("127.0.0.1:9901"), 2, 10)
		srv.scrape(t)
		if _, err := podns.Delete(podns.Config{}, name); err != nil {
			t.Fatal(err)
		}
		if i == 9 {
			waitUntil(t, 10*time.Second, "warm-up pods released", func() bool { return countFDs(fds(t, pid), "bpf_link") == survivorLinks })
			base = measure()
		}
	}
	elapsed := time.Since(start)
	waitUntil(t, 20*time.Second, "every churned pod released and pruned", func() bool {
		s, _ := srv.scrape(t)
		return countFDs(fds(t, pid), "bpf_link") == survivorLinks && s[`nsflow_namespaces{state="gone"}`] == 0
	})
	end := measure()
	t.Logf("%d cycles in %s; fds %d→%d, bpf links %d→%d, programs %d→%d, goroutines %.0f→%.0f, RSS %.1f→%.1f MiB",
		cycles, elapsed.Round(time.Millisecond), base.fds, end.fds, base.links, end.links, base.progs, end.progs,
		base.goroutines, end.goroutines, base.rss/(1<<20), end.rss/(1<<20))
	if end.fds > base.fds || end.links != survivorLinks || end.progs != base.progs {
		t.Errorf("leak: fds %d→%d, links %d (want %d), programs %d→%d", base.fds, end.fds, end.links, survivorLinks, base.progs, end.progs)
	}
	if n := hooks(); n != 4*len(survivors) {
		t.Errorf("%d programs on the survivors' hooks, want %d (lo and eth0, both directions)", n, 4*len(survivors))
	}
	if base.goroutines == 0 || base.rss == 0 {
		t.Fatal("go_goroutines or process_resident_memory_bytes missing from /metrics")
	}
	if end.goroutines > base.goroutines+3 {
		t.Errorf("goroutines grew %.0f→%.0f", base.goroutines, end.goroutines)
	}
	if end.rss > base.rss+16<<20 {
		t.Errorf("RSS grew %.1f→%.1f MiB", base.rss/(1<<20), end.rss/(1<<20))
	}
	for _, f := range fds(t, pid) {
		if len(f) > 4 && f[:4] == "net:" && f != fmt.Sprintf("net:[%d]", selfNetnsInode(t)) {
			found := false
			for ino := range byIno {
				found = found || f == fmt.Sprintf("net:[%d]", ino)
			}
			if !found {
				t.Errorf("serve still holds %s, a namespace that is gone", f)
			}
		}
	}
	k1, s1, _ := quiescentScrape(t, srv, byIno)
	kd, sd := delta(k0, k1), delta(s0, s1)
	for p, want := range kd {
		if sd[p] != want {
			t.Errorf("survivor %s after churn: /metrics %+v, kernel %+v", p, sd[p], want)
		}
	}
	lo := point{inodeOf(t, survivors[0]), "lo", flow.TX}
	if kd[lo].Packets < uint64(cycles) {
		t.Errorf("survivor lo tx %d packets, want at least %d", kd[lo].Packets, cycles)
	}
}

func selfNetnsInode(t *testing.T) uint64 {
	t.Helper()
	ino, err := os.Readlink("/proc/self/ns/net")
	if err != nil {
		t.Fatal(err)
	}
	var n uint64
	fmt.Sscanf(ino, "net:[%d]", &n)
	return n
}
