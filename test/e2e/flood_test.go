package e2e

import (
	"fmt"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/nsflow/nsflow/collector/attach"
	"github.com/nsflow/nsflow/collector/discovery"
	"github.com/nsflow/nsflow/collector/flow"
	"github.com/nsflow/nsflow/test/podns"
	"github.com/nsflow/nsflow/test/testenv"
)

const (
	// floodSize is how many network namespaces the unprivileged user
	// makes, each in a user namespace of its own (`unshare -Urn`).
	floodSize = 300
	// podAttachBound is the pod's own attach time on this VM (issue 13):
	// from its veth's appearance to every hook of its lo and eth0 held.
	podAttachBound = 2 * time.Second
)

// floodCred is the unprivileged user of the flood: nobody (65534), no
// supplementary groups; no account needs creating.
var floodCred = &syscall.Credential{Uid: 65534, Gid: 65534, Groups: []uint32{}}

// An unprivileged user floods the node with user-namespace network
// namespaces while serve runs with its defaults, and a pod is created in
// the middle of the flood. The pod's hooks are attached within its own
// attach time of its veth appearing, its counts are exact, every scrape
// and health check answers 200, and nothing is logged against the pod. By
// default the flood is skipped (reason userns: each of its namespaces
// logged, once, and counted, none attached); with --netns.userns it is
// observed, and the pod still comes first (attach classes).
func TestFlood(t *testing.T) {
	testenv.RequireRoot(t)
	check := exec.Command("unshare", "-Urn", "true")
	check.SysProcAttr = &syscall.SysProcAttr{Credential: floodCred}
	if out, err := check.CombinedOutput(); err != nil {
		t.Fatalf("an unprivileged user cannot make a user namespace here (unshare -Urn as 65534): %v\n%s", err, out)
	}
	t.Run("default", func(t *testing.T) { testFlood(t, false, "e2e-flood-d", "10.213.236.0/24") })
	t.Run("userns", func(t *testing.T) { testFlood(t, true, "e2e-flood-u", "10.213.237.0/24") })
}

func testFlood(t *testing.T, userns bool, name, subnet string) {
	var args []string
	if userns {
		args = append(args, "--netns.userns")
	}
	begin := time.Now()
	phase := func(what string) { t.Logf("%6.2fs %s", time.Since(begin).Seconds(), what) }
	srv := startServe(t, "http", args...)
	phase("serve ready")
	pr := startProber(t, srv)
	veth := watchLinkAppears(t, podns.HostVethName(name))

	// The flood; the pod once half of it is under way.
	half := make(chan struct{})
	fl := startFlood(t, floodSize, half)
	select {
	case <-half:
	case <-time.After(20 * time.Second):
		t.Fatal("the flood's first half did not start within 20s")
	}
	attached := watchPodHooks(t, name)
	created := time.Now()
	p, err := podns.Create(podns.Config{}, name, podns.Options{Subnet: netip.MustParsePrefix(subnet)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { podns.Delete(podns.Config{}, name) })
	var at time.Time
	select {
	case at = <-attached:
	case <-time.After(20 * time.Second):
		t.Fatalf("pod %s: hooks not all attached 20s after it was created", name)
	}
	seen := veth()
	if seen.IsZero() {
		t.Fatalf("pod %s: its veth %s was never seen appearing", name, p.HostVeth)
	}
	lat := at.Sub(seen)
	t.Logf("pod %s: hooks attached %s after its veth appeared (%s after podns.Create began), flood: %d started", name,
		lat.Round(time.Millisecond), at.Sub(created).Round(time.Millisecond), fl.started())
	if lat > podAttachBound {
		var lines []string
		for _, l := range strings.Split(srv.logText(), "\n") {
			if strings.Contains(l, name) {
				lines = append(lines, l)
			}
		}
		t.Errorf("pod %s: hooks attached %s after its veth appeared (%s), want <= %s; serve's lines about it:\n%s", name, lat.Round(time.Millisecond),
			seen.UTC().Format("15:04:05.000"), podAttachBound, strings.Join(lines, "\n"))
	}

	// The pod's counts are exact: deltas of a bounded ping to its gateway
	// and on its lo, against the kernel's interface counters.
	ino := nsInode(t, p.NetnsPath)
	byIno := map[uint64]*podns.Pod{ino: p}
	waitUntil(t, 10*time.Second, "the pod's lo and eth0 series", func() bool {
		s, _ := srv.scrape(t)
		for _, i := range []string{"lo", "eth0"} {
			for _, d := range []string{"rx", "tx"} {
				if _, ok := s[pointSeries("nsflow_packets_total", name, i, d)]; !ok {
					return false
				}
			}
		}
		return true
	})
	k0, s0, _ := quiescentScrape(t, srv, byIno)
	run(t, p, exec.Command("ping", "-c", "5", "-i", "0.05", "-W", "2", p.Gateway4.String()))
	run(t, p, exec.Command("ping", "-c", "3", "-i", "0.05", "-W", "2", "127.0.0.1"))
	k1, s1, _ := quiescentScrape(t, srv, byIno)
	kd, sd := delta(k0, k1), delta(s0, s1)
	for pt, want := range kd {
		if got, ok := sd[pt]; !ok || got != want {
			t.Errorf("%s: /metrics %+v, kernel %+v", pt, got, want)
		}
	}
	for _, pt := range []point{{ino, "eth0", flow.TX}, {ino, "eth0", flow.RX}, {ino, "lo", flow.TX}} {
		if kd[pt].Packets == 0 {
			t.Errorf("%s: no traffic measured: %+v", pt, kd)
		}
	}

	phase("pod's counts checked")
	// The flood, all of it: each process in a namespace of its own.
	flood := fl.namespaces(t)
	phase("flood running")
	s, _ := srv.scrape(t)
	if !userns {
		// Every flood namespace skipped, logged once (its inode), none
		// attached, no series.
		const series = `nsflow_namespaces_skipped_total{reason="userns"}`
		waitUntil(t, 20*time.Second, fmt.Sprintf("%s >= %d", series, floodSize), func() bool {
			s, _ = srv.scrape(t)
			return s[series] >= floodSize
		})
		log := srv.logText()
		logged := map[string]int{}
		for _, m := range regexp.MustCompile(`reason=userns .*inode=([0-9]+)`).FindAllStringSubmatch(log, -1) {
			logged[m[1]]++
		}
		missing, twice := 0, 0
		for _, ns := range flood {
			switch logged[strconv.FormatUint(ns.inode, 10)] {
			case 0:
				missing++
			case 1:
			default:
				twice++
			}
		}
		if missing > 0 || twice > 0 {
			t.Errorf("of %d flood namespaces, %d not logged as skipped for their user namespace, %d logged more than once", len(flood), missing, twice)
		}
		if n := strings.Count(log, "--netns.userns observes them"); n != 1 {
			t.Errorf("the explanation of userns skips logged %d times, want once", n)
		}
		if n := countAttached(t, flood); n != 0 {
			t.Errorf("%d flood namespaces have nsflow's hooks on their lo", n)
		}
		for pid := range flood {
			if _, ok := s[pointSeries("nsflow_packets_total", "pid:"+strconv.Itoa(pid), "lo", "rx")]; ok {
				t.Errorf("flood pid %d has series", pid)
				break
			}
		}
		t.Logf("%s = %v (the flood: %d)", series, s[series], len(flood))
	} else {
		// The flood is observed: every namespace of it attached, except
		// what the reserve or the interface cap refused.
		var n int
		refused := func(s samples) float64 {
			var sum float64
			for k, v := range s {
				if strings.HasPrefix(k, "nsflow_attach_refused_total{") {
					sum += v
				}
			}
			return sum
		}
		waitUntil(t, 25*time.Second, "the flood's namespaces attached (or refused)", func() bool {
			n = countAttached(t, flood)
			s, _ = srv.scrape(t)
			return n == len(flood) || float64(n)+refused(s) >= float64(len(flood))
		})
		t.Logf("flood namespaces attached: %d of %d; refused (all namespaces of the node): %v", n, len(flood), refused(s))
		if n == 0 {
			t.Errorf("none of the flood's %d namespaces attached with --netns.userns", len(flood))
		}
		if v := s[`nsflow_namespaces_skipped_total{reason="userns"}`]; v != 0 {
			t.Errorf("with --netns.userns, %v namespaces skipped for their user namespace", v)
		}
	}

	phase("flood checked")
	// Nothing logged against the pod; every scrape and health check 200.
	for _, l := range strings.Split(srv.logText(), "\n") {
		if (strings.Contains(l, "level=WARN") || strings.Contains(l, "level=ERROR")) && strings.Contains(l, name) {
			t.Errorf("serve logged against the pod: %s", l)
		}
	}
	pr.check(t)
}

// flood is the unprivileged user's processes, each `unshare -Urn sleep
// 120` (bounded: killed when the test ends, and by themselves after 2 min).
type flood struct {
	mu   sync.Mutex
	cmds []*exec.Cmd
	err  error
	done chan struct{}
}

// startFlood starts n flood processes one after the other, in the
// background, and closes half once n/2 are started.
func startFlood(t *testing.T, n int, half chan<- struct{}) *flood {
	f := &flood{done: make(chan struct{})}
	t.Cleanup(f.kill)
	go func() {
		defer close(f.done)
		for i := range n {
			if i == n/2 {
				close(half)
			}
			cmd := exec.Command("unshare", "-Urn", "sleep", "120")
			cmd.SysProcAttr = &syscall.SysProcAttr{Credential: floodCred}
			err := cmd.Start()
			f.mu.Lock()
			if err != nil {
				f.err = err
				f.mu.Unlock()
				return
			}
			f.cmds = append(f.cmds, cmd)
			f.mu.Unlock()
		}
	}()
	return f
}

func (f *flood) started() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return len(f.cmds)
}

func (f *flood) kill() {
	<-f.done
	for _, c := range f.cmds {
		c.Process.Kill()
	}
	for _, c := range f.cmds {
		c.Wait()
	}
}

// floodNs is a flood process's namespace.
type floodNs struct {
	inode uint64
	path  string
}

// namespaces waits until every flood process has exec'd sleep in a
// network namespace of its own, and returns them by pid.
func (f *flood) namespaces(t *testing.T) map[int]floodNs {
	t.Helper()
	select {
	case <-f.done:
	case <-time.After(30 * time.Second):
		t.Fatal("the flood did not start within 30s")
	}
	if f.err != nil {
		t.Fatalf("flood: %d started, then: %v", len(f.cmds), f.err)
	}
	host := nsInode(t, "/proc/self/ns/net")
	out := map[int]floodNs{}
	waitUntil(t, 20*time.Second, "every flood process in a namespace of its own", func() bool {
		for _, c := range f.cmds {
			pid := c.Process.Pid
			if _, ok := out[pid]; ok {
				continue
			}
			comm, _ := os.ReadFile(fmt.Sprintf("/proc/%d/comm", pid))
			if strings.TrimSpace(string(comm)) != "sleep" {
				return false
			}
			path := fmt.Sprintf("/proc/%d/ns/net", pid)
			var st unix.Stat_t
			if unix.Stat(path, &st) != nil || st.Ino == host {
				return false
			}
			out[pid] = floodNs{st.Ino, path}
		}
		return true
	})
	inodes := map[uint64]bool{}
	for _, ns := range out {
		inodes[ns.inode] = true
	}
	if len(inodes) != len(f.cmds) {
		t.Fatalf("%d flood processes in %d namespaces", len(f.cmds), len(inodes))
	}
	return out
}

// countAttached counts the flood namespaces whose lo holds every hook of
// nsflow's (as `nsflow list` tells: the kernel's BPF_PROG_QUERY, tc filters).
func countAttached(t *testing.T, nss map[int]floodNs) int {
	t.Helper()
	n := 0
	for _, ns := range nss {
		h, err := netns.GetFromPath(ns.path)
		if err != nil {
			t.Fatalf("open %s: %v", ns.path, err)
		}
		nl, err := netlink.NewHandleAt(h, unix.NETLINK_ROUTE)
		if err != nil {
			h.Close()
			t.Fatalf("netlink in %s: %v", ns.path, err)
		}
		l, err := nl.LinkByName("lo")
		var hk attach.Hooks
		if err == nil {
			hk, err = attach.Query(h, nl, l)
		}
		nl.Close()
		h.Close()
		if err != nil {
			t.Fatalf("lo in %s: %v", ns.path, err)
		}
		if hooksComplete(hk) {
			n++
		}
	}
	return n
}

// hooksComplete: an interface nsflow observes, as list reports it (attach
// not none, not partial).
func hooksComplete(h attach.Hooks) bool {
	partial := (h.TCX > 0 && h.TCX < 2) || (h.Clsact > 0 && h.Clsact < 2)
	return (h.TCX > 0 || h.Clsact > 0) && !partial
}

// watchLinkAppears watches the host namespace's link events and returns
// when a link named name was first announced (zero until it is).
func watchLinkAppears(t *testing.T, name string) func() time.Time {
	t.Helper()
	ch := make(chan netlink.LinkUpdate, 1024)
	done := make(chan struct{})
	if err := netlink.LinkSubscribeWithOptions(ch, done, netlink.LinkSubscribeOptions{ErrorCallback: func(error) {}}); err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	var seen time.Time
	stopped := make(chan struct{})
	go func() {
		defer close(stopped)
		for u := range ch {
			if u.Attrs() != nil && u.Attrs().Name == name && u.Header.Type == unix.RTM_NEWLINK {
				now := time.Now()
				mu.Lock()
				if seen.IsZero() {
					seen = now
				}
				mu.Unlock()
			}
		}
	}()
	t.Cleanup(func() {
		close(done)
		// The subscription closes ch once its receive returns: drain.
		select {
		case <-stopped:
		case <-time.After(5 * time.Second):
		}
	})
	return func() time.Time {
		mu.Lock()
		defer mu.Unlock()
		return seen
	}
}

// watchPodHooks polls, from now on, the pod's namespace (by its ip netns
// name) until its lo and eth0 both exist and hold all of nsflow's hooks,
// and delivers the time it first saw them so (or nothing, if that never
// happens before the test ends).
func watchPodHooks(t *testing.T, name string) <-chan time.Time {
	out := make(chan time.Time, 1)
	stop := make(chan struct{})
	var wg sync.WaitGroup
	t.Cleanup(func() { close(stop); wg.Wait() })
	cfg := discovery.Config{Include: regexp.MustCompile("^" + regexp.QuoteMeta(name) + "$")}
	wg.Add(1)
	go func() {
		defer wg.Done()
		tick := time.NewTicker(5 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-stop:
				return
			case <-tick.C:
			}
			nss, err := discovery.List(cfg, nil)
			if err != nil || len(nss) != 1 || nss[0].Error != "" {
				continue
			}
			now := time.Now()
			got := map[string]bool{}
			for _, i := range nss[0].Interfaces {
				got[i.Name] = i.Attach != "none" && !i.Partial
			}
			if got["lo"] && got["eth0"] {
				out <- now
				return
			}
		}
	}()
	return out
}

// prober scrapes /metrics and asks /-/healthy every 100 ms, recording
// every answer that is not 200 and the slowest.
type prober struct {
	once    sync.Once
	stop    chan struct{}
	done    chan struct{}
	n       int
	bad     []string
	slowest time.Duration
}

func startProber(t *testing.T, srv *server) *prober {
	p := &prober{stop: make(chan struct{}), done: make(chan struct{})}
	t.Cleanup(p.halt)
	go func() {
		defer close(p.done)
		tick := time.NewTicker(100 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-p.stop:
				return
			case <-tick.C:
			}
			for _, path := range []string{"/metrics", "/-/healthy"} {
				start := time.Now()
				code, body := srv.get(path)
				p.slowest = max(p.slowest, time.Since(start))
				p.n++
				if code != http.StatusOK {
					if len(body) > 200 {
						body = body[:200]
					}
					p.bad = append(p.bad, fmt.Sprintf("%s: %d %s", path, code, body))
				}
			}
		}
	}()
	return p
}

func (p *prober) halt() {
	p.once.Do(func() { close(p.stop) })
	<-p.done
}

// check stops the prober and fails t if any answer was not 200.
func (p *prober) check(t *testing.T) {
	t.Helper()
	p.halt()
	t.Logf("%d scrapes and health checks during the flood, the slowest %s", p.n, p.slowest.Round(time.Millisecond))
	if len(p.bad) > 0 {
		t.Errorf("%d of %d answers not 200: %q", len(p.bad), p.n, p.bad)
	}
}
