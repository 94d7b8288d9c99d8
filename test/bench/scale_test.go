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
	"regexp"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/nsflow/nsflow/collector/nsenter"
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

func freePort(b testing.TB) int {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// procStat returns a process's CPU time and resident memory.
func procStat(b testing.TB, pid int) (cpu time.Duration, rss int64) {
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
func kernelMemory(b testing.TB, pid int) (maps, progs int64) {
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

func percentile(v []time.Duration, p float64) time.Duration {
	if len(v) == 0 {
		return 0
	}
	s := append([]time.Duration(nil), v...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	return s[min(len(s)-1, int(float64(len(s))*p))]
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

// scaleConfig is one run of serve over many pods.
type scaleConfig struct {
	pods   int    // pods present before serve starts
	churn  int    // pods created while it runs (after readiness), rate per second
	rate   int    //
	mode   string // --attach-mode; "" is serve's default (auto)
	prefix string // names of this run's pods (foreign namespaces are left observed)
	subnet netip.Prefix
	// churnSubnet: another bridge (one Linux bridge takes 1,024 ports at most).
	churnSubnet netip.Prefix
	idle        bool // 20 scrapes and 5 s of CPU once ready and quiet
	// excludeForeign passes --netns.exclude naming the foreign namespaces
	// present at start (a concurrent test's, which serve as deployed would
	// observe and attach with this run's): isolation for the CI smoke
	// test; the benchmark observes them, and reports how many.
	excludeForeign bool
}

// scaleResult is what runScale measured.
type scaleResult struct {
	ready        time.Duration   // start → /-/ready
	listen       time.Duration   // start → the first answer to a scrape (any status)
	storm        []time.Duration // /metrics scrapes (200) from start until ready
	stormBad     int             // scrapes answered other than 200 once serve listened
	idleScrapes  []time.Duration
	rss          int64
	kmaps        int64
	kprogs       int64 // nsflow programs in the kernel, less those before serve started
	cpuIdle      float64
	notAttached  []string        // this run's pods without their four hooks at readiness
	foreign      int             // namespaces in /run/netns not this run's (observed too)
	attach       []time.Duration // churn: veth appeared (RTM_NEWLINK) → the pod's four hooks attached
	attachCreate []time.Duration // churn: podns.Create called → four hooks (an upper bound)
	ethWindow    []time.Duration // churn: veth appeared → both of eth0's hooks
	loWindow     []time.Duration // churn: namespace opened by the probe → both of lo's hooks
	ethGap       []time.Duration // churn: eth0's first hook seen → its second
	loGap        []time.Duration
	pollPeriod   []time.Duration // one probe round (the resolution of the above)
	interfaces   string          // nsflow_attachments lines at readiness
	churnMissed  int             // churned pods not attached within 10 s
}

// ownNetnsCookie is the SO_NETNS_COOKIE of the calling process's namespace.
func ownNetnsCookie() (uint64, error) {
	fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_DGRAM, 0)
	if err != nil {
		return 0, err
	}
	defer unix.Close(fd)
	return unix.GetsockoptUint64(fd, unix.SOL_SOCKET, unix.SO_NETNS_COOKIE)
}

// serveFilterName is the name of the clsact filters of the nsflow process
// pid (collector/attach Owner: nsflow/COOKIE/ID, ID of its abstract socket
// @nsflow/ID), so that another nsflow's filters (a concurrent test's trace)
// are not taken for its own.
func serveFilterName(pid int) (string, error) {
	inodes := map[string]bool{}
	dir := fmt.Sprintf("/proc/%d/fd", pid)
	ents, _ := os.ReadDir(dir)
	for _, e := range ents {
		t, _ := os.Readlink(filepath.Join(dir, e.Name()))
		if in, ok := strings.CutPrefix(t, "socket:["); ok {
			inodes[strings.TrimSuffix(in, "]")] = true
		}
	}
	raw, err := os.ReadFile(fmt.Sprintf("/proc/%d/net/unix", pid))
	if err != nil {
		return "", err
	}
	for _, line := range strings.Split(string(raw), "\n") {
		f := strings.Fields(line)
		if len(f) < 8 || !inodes[f[6]] {
			continue
		}
		if id, ok := strings.CutPrefix(f[7], "@nsflow/"); ok {
			c, err := ownNetnsCookie()
			if err != nil {
				return "", err
			}
			return fmt.Sprintf("nsflow/%016x/%s", c, id), nil
		}
	}
	return "", fmt.Errorf("process %d holds no @nsflow/ socket", pid)
}

// hookProbe tells which hooks of a namespace's interfaces hold serve's
// programs, in either mechanism: serve's cls_bpf filter (by name), or an
// nsflow TCX program (TCX links carry no owner: any nsflow process's).
type hookProbe struct {
	ns    netns.NsHandle
	nl    *netlink.Handle
	owner string
	idx   map[string]int
}

var nsflowProgs sync.Map // ebpf.ProgramID → bool

func isNsflowProg(id ebpf.ProgramID) bool {
	if v, ok := nsflowProgs.Load(id); ok {
		return v.(bool)
	}
	ok := false
	if p, err := ebpf.NewProgramFromID(id); err == nil {
		if info, err := p.Info(); err == nil {
			ok = strings.HasPrefix(info.Name, "nsflow_")
		}
		p.Close()
	}
	nsflowProgs.Store(id, ok)
	return ok
}

func openProbe(path, owner string) (*hookProbe, error) {
	ns, err := netns.GetFromPath(path)
	if err != nil {
		return nil, err
	}
	nl, err := netlink.NewHandleAt(ns, unix.NETLINK_ROUTE)
	if err != nil {
		ns.Close()
		return nil, err
	}
	return &hookProbe{ns: ns, nl: nl, owner: owner, idx: map[string]int{}}, nil
}

func (p *hookProbe) Close() { p.nl.Close(); p.ns.Close() }

// hooks reports whether the ingress and egress hooks of interface name hold
// serve's program.
func (p *hookProbe) hooks(name string) (bool, bool) {
	idx, ok := p.idx[name]
	if !ok {
		l, err := p.nl.LinkByName(name)
		if err != nil {
			return false, false
		}
		idx = l.Attrs().Index
		p.idx[name] = idx
	}
	var got [2]bool
	dummy := &netlink.Dummy{LinkAttrs: netlink.LinkAttrs{Index: idx}}
	for i, parent := range []uint32{netlink.HANDLE_MIN_INGRESS, netlink.HANDLE_MIN_EGRESS} {
		fs, err := p.nl.FilterList(dummy, parent)
		if err != nil {
			continue
		}
		for _, f := range fs {
			if bf, ok := f.(*netlink.BpfFilter); ok && bf.Name == p.owner {
				got[i] = true
			}
		}
	}
	if !got[0] || !got[1] {
		nsenter.Do(p.ns, func() error {
			for i, at := range []ebpf.AttachType{ebpf.AttachTCXIngress, ebpf.AttachTCXEgress} {
				if got[i] {
					continue
				}
				r, err := link.QueryPrograms(link.QueryOptions{Target: idx, Attach: at})
				if err != nil {
					continue
				}
				for _, pr := range r.Programs {
					if isNsflowProg(pr.ID) {
						got[i] = true
						break
					}
				}
			}
			return nil
		})
	}
	return got[0], got[1]
}

// podAttached reports whether both hooks of a pod's lo and eth0 hold serve's programs.
func podAttached(path, owner string) bool {
	p, err := openProbe(path, owner)
	if err != nil {
		return false
	}
	defer p.Close()
	for _, n := range []string{"lo", "eth0"} {
		if in, eg := p.hooks(n); !in || !eg {
			return false
		}
	}
	return true
}

// churnTimes are the moments one churned pod was seen at.
type churnTimes struct {
	create, ns                         time.Time // podns.Create called; namespace opened
	loFirst, loBoth, ethFirst, ethBoth time.Time
	polls                              int
	pollTime                           time.Duration
}

// track polls a pod being created until its four hooks hold serve's programs.
func track(path, owner string, deadline time.Time) (c churnTimes) {
	var p *hookProbe
	defer func() {
		if p != nil {
			p.Close()
		}
	}()
	for time.Now().Before(deadline) {
		if p == nil {
			var err error
			if p, err = openProbe(path, owner); err != nil { // not there (or not mounted) yet
				p = nil
				time.Sleep(200 * time.Microsecond)
				continue
			}
			c.ns = time.Now()
		}
		t := time.Now()
		li, le := p.hooks("lo")
		ei, ee := p.hooks("eth0")
		now := time.Now()
		c.polls++
		c.pollTime += now.Sub(t)
		if (li || le) && c.loFirst.IsZero() {
			c.loFirst = now
		}
		if li && le && c.loBoth.IsZero() {
			c.loBoth = now
		}
		if (ei || ee) && c.ethFirst.IsZero() {
			c.ethFirst = now
		}
		if ei && ee && c.ethBoth.IsZero() {
			c.ethBoth = now
		}
		if !c.loBoth.IsZero() && !c.ethBoth.IsZero() {
			return c
		}
		time.Sleep(200 * time.Microsecond)
	}
	return c
}

// runScale creates cfg.pods pods, starts `nsflow serve` as the DaemonSet
// runs it (host namespace and processes observed, no include filter:
// namespaces of concurrent tests are observed too, and counted in
// foreign), and measures it (scaleResult).
func runScale(tb testing.TB, cfg scaleConfig) scaleResult {
	var r scaleResult
	bin := nsflowBinary(tb)
	t0 := time.Now()
	var pods []*podns.Pod
	for i := 0; i < cfg.pods; i++ {
		name := fmt.Sprintf("%s%d", cfg.prefix, i)
		p, err := podns.Create(podns.Config{}, name, podns.Options{Subnet: cfg.subnet})
		if err != nil {
			tb.Fatal(err)
		}
		tb.Cleanup(func() { podns.Delete(podns.Config{}, name) })
		pods = append(pods, p)
	}
	tb.Logf("created %d pods in %s", cfg.pods, time.Since(t0).Round(time.Millisecond))
	var foreign []string
	if ents, err := os.ReadDir(podns.NetnsDir); err == nil {
		for _, e := range ents {
			if !strings.HasPrefix(e.Name(), cfg.prefix) {
				r.foreign++
				foreign = append(foreign, regexp.QuoteMeta(e.Name()))
			}
		}
	}
	load, _ := os.ReadFile("/proc/loadavg")
	tb.Logf("rcu_expedited=%s (the kernel's default here, not changed); loadavg %s; foreign namespaces in %s: %d",
		rcuExpedited(), strings.TrimSpace(string(load)), podns.NetnsDir, r.foreign)
	_, progs0 := kernelMemory(tb, os.Getpid())

	port := freePort(tb)
	url := fmt.Sprintf("http://127.0.0.1:%d", port)
	args := []string{"serve", "--web.listen-address", "127.0.0.1:" + strconv.Itoa(port), "--log.level", "warn"}
	if cfg.excludeForeign && len(foreign) > 0 {
		args = append(args, "--netns.exclude", "^("+strings.Join(foreign, "|")+")$")
	}
	if cfg.mode != "" {
		args = append(args, "--attach-mode", cfg.mode)
	}
	cmd := exec.Command(bin, args...)
	cmd.Stderr = os.Stderr
	start := time.Now()
	if err := cmd.Start(); err != nil {
		tb.Fatal(err)
	}
	exited := make(chan struct{}) // closed once serve has exited (waitErr set)
	var waitErr error
	go func() { waitErr = cmd.Wait(); close(exited) }()
	stopServe := sync.OnceFunc(func() {
		cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(time.Minute):
			cmd.Process.Kill()
		}
	})
	tb.Cleanup(stopServe)
	defer stopServe() // before the pods go: their removal is not measured
	client := &http.Client{Timeout: 10 * time.Second}

	// Scrapes back to back (20 ms apart) from start until ready.
	stop := make(chan struct{})
	stormDone := make(chan struct{})
	go func() {
		defer close(stormDone)
		listening := false
		for {
			select {
			case <-stop:
				return
			default:
			}
			t := time.Now()
			resp, err := client.Get(url + "/metrics")
			if err != nil {
				if listening {
					r.stormBad++
				}
				time.Sleep(5 * time.Millisecond)
				continue
			}
			if !listening {
				r.listen = time.Since(start)
			}
			listening = true
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			if resp.StatusCode == 200 {
				r.storm = append(r.storm, time.Since(t))
			} else {
				r.stormBad++
			}
			time.Sleep(20 * time.Millisecond)
		}
	}()
	for {
		resp, err := client.Get(url + "/-/ready")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == 200 {
				break
			}
		}
		if time.Since(start) > 5*time.Minute {
			tb.Fatal("serve never ready")
		}
		select {
		case <-exited:
			tb.Fatalf("serve exited before ready after %s: %v", time.Since(start).Round(time.Millisecond), waitErr)
		case <-time.After(5 * time.Millisecond):
		}
	}
	r.ready = time.Since(start)
	close(stop)
	<-stormDone
	pid := cmd.Process.Pid
	owner := ""
	if cfg.mode != "tcx" {
		var err error
		if owner, err = serveFilterName(pid); err != nil {
			tb.Fatal(err)
		}
	}

	// Every pod attached at readiness (4 workers).
	var mu sync.Mutex
	var wg sync.WaitGroup
	next := make(chan *podns.Pod)
	for w := 0; w < 4; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for p := range next {
				if !podAttached(p.NetnsPath, owner) {
					mu.Lock()
					r.notAttached = append(r.notAttached, p.Name)
					mu.Unlock()
				}
			}
		}()
	}
	for _, p := range pods {
		next <- p
	}
	close(next)
	wg.Wait()
	// Those not attached at readiness: when they are (up to 10 s more).
	for _, name := range r.notAttached {
		path := filepath.Join(podns.NetnsDir, name)
		t := time.Now()
		for !podAttached(path, owner) && time.Since(t) < 10*time.Second {
			time.Sleep(10 * time.Millisecond)
		}
		tb.Logf("pod %s not attached at readiness: attached %v, %s after it", name, podAttached(path, owner), time.Since(start)-r.ready)
	}

	scrape := func() (time.Duration, string) {
		t := time.Now()
		resp, err := client.Get(url + "/metrics")
		if err != nil {
			tb.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 200 {
			tb.Fatalf("scrape: %s", resp.Status)
		}
		return time.Since(t), string(body)
	}
	_, body := scrape()
	for _, l := range strings.Split(body, "\n") {
		if strings.HasPrefix(l, "nsflow_attachments{") {
			r.interfaces += strings.TrimPrefix(l, "nsflow_attachments") + " "
		}
	}
	_, r.rss = procStat(tb, pid)
	var progs int64
	r.kmaps, progs = kernelMemory(tb, pid)
	r.kprogs = progs - progs0
	if cfg.idle {
		for i := 0; i < 20; i++ {
			d, _ := scrape()
			r.idleScrapes = append(r.idleScrapes, d)
		}
		cpu0, _ := procStat(tb, pid)
		time.Sleep(5 * time.Second)
		cpu1, _ := procStat(tb, pid)
		r.cpuIdle = 100 * (cpu1 - cpu0).Seconds() / 5
	}

	if cfg.churn == 0 {
		return r
	}
	// Churn: the moment each pod's veth appears, from the host's link events.
	updates := make(chan netlink.LinkUpdate, 1024)
	done := make(chan struct{})
	if err := netlink.LinkSubscribeWithOptions(updates, done, netlink.LinkSubscribeOptions{}); err != nil {
		tb.Fatal(err)
	}
	seen := map[string]time.Time{}
	watchDone := make(chan struct{})
	go func() {
		defer close(watchDone)
		for u := range updates {
			if u.Header.Type != unix.RTM_NEWLINK {
				continue
			}
			mu.Lock()
			if _, ok := seen[u.Attrs().Name]; !ok {
				seen[u.Attrs().Name] = time.Now()
			}
			mu.Unlock()
		}
	}()
	times := make([]churnTimes, cfg.churn)
	names := make([]string, cfg.churn)
	tick := time.NewTicker(time.Second / time.Duration(cfg.rate))
	for i := 0; i < cfg.churn; i++ {
		<-tick.C
		name := fmt.Sprintf("%schurn-%d", cfg.prefix, i)
		names[i] = name
		wg.Add(1)
		created := time.Now()
		go func() {
			defer wg.Done()
			times[i] = track(filepath.Join(podns.NetnsDir, name), owner, created.Add(10*time.Second))
			times[i].create = created
		}()
		if _, err := podns.Create(podns.Config{}, name, podns.Options{Subnet: cfg.churnSubnet}); err != nil {
			tb.Fatal(err)
		}
		tb.Cleanup(func() { podns.Delete(podns.Config{}, name) })
	}
	tick.Stop()
	wg.Wait()
	close(done)
	for range updates { // the subscription closes it
	}
	<-watchDone
	for i, c := range times {
		if c.polls > 0 {
			r.pollPeriod = append(r.pollPeriod, c.pollTime/time.Duration(c.polls))
		}
		if c.loBoth.IsZero() || c.ethBoth.IsZero() {
			r.churnMissed++
			tb.Logf("NOT MET: churned pod %s not attached within 10 s (lo %v, eth0 %v)", names[i], !c.loBoth.IsZero(), !c.ethBoth.IsZero())
			continue
		}
		all := c.loBoth
		if c.ethBoth.After(all) {
			all = c.ethBoth
		}
		veth, ok := seen[podns.HostVethName(names[i])]
		if !ok {
			tb.Errorf("churned pod %s: no RTM_NEWLINK for its veth %s", names[i], podns.HostVethName(names[i]))
			continue
		}
		r.attach = append(r.attach, all.Sub(veth))
		r.attachCreate = append(r.attachCreate, all.Sub(c.create))
		r.ethWindow = append(r.ethWindow, c.ethBoth.Sub(veth))
		r.loWindow = append(r.loWindow, c.loBoth.Sub(c.ns))
		r.ethGap = append(r.ethGap, c.ethBoth.Sub(c.ethFirst))
		r.loGap = append(r.loGap, c.loBoth.Sub(c.loFirst))
	}
	return r
}

// BenchmarkScale runs `nsflow serve` as deployed (the DaemonSet's
// defaults: host namespace and processes observed, no include filter) over
// N pods (10, 100, 1,000; NSFLOW_BENCH_MAX_PODS caps N) at the kernel's RCU
// mode (logged, never changed), NSFLOW_BENCH_ATTACH_MODE the --attach-mode
// (default: serve's, auto). It reports the time from start until /-/ready
// (every pod's four hooks then checked: serve's cls_bpf filter by name, or
// an nsflow TCX program), /metrics scrapes from start until ready (20 ms
// apart: p50, p99, max), resident memory, kernel memory of maps and of
// programs (nsflow programs less those before start: a concurrent test's
// would be counted), 20 idle scrapes, idle CPU, and for 200 pods created
// at 20 per second meanwhile: the time from the pod's veth appearing (the
// host's RTM_NEWLINK) to its four hooks attached, its eth0's window (veth
// → both hooks), its lo's (namespace → both hooks) and the gap between
// each interface's first and second hook, polled (the poll period is
// reported: a gap under it reads 0).
func BenchmarkScale(b *testing.B) {
	testenv.RequireRoot(b)
	maxPods := 1000
	if n, err := strconv.Atoi(os.Getenv("NSFLOW_BENCH_MAX_PODS")); err == nil {
		maxPods = n
	}
	for _, n := range []int{10, 100, 1000} {
		if n > maxPods {
			break
		}
		b.Run(fmt.Sprintf("pods=%d", n), func(b *testing.B) {
			cfg := scaleConfig{pods: n, churn: 200, rate: 20, mode: os.Getenv("NSFLOW_BENCH_ATTACH_MODE"),
				prefix: "bench-sc-", subnet: netip.MustParsePrefix("10.214.0.0/16"),
				churnSubnet: netip.MustParsePrefix("10.215.0.0/16"), idle: true}
			// NSFLOW_BENCH_SCALE_NET=PREFIX,SUBNET,CHURN_SUBNET: other names
			// and bridges, to run while a previous run's pods are still being
			// removed (that takes minutes at 1,000).
			if v := os.Getenv("NSFLOW_BENCH_SCALE_NET"); v != "" {
				f := strings.Split(v, ",")
				if len(f) != 3 {
					b.Fatalf("NSFLOW_BENCH_SCALE_NET=%q: want PREFIX,SUBNET,CHURN_SUBNET", v)
				}
				cfg.prefix, cfg.subnet, cfg.churnSubnet = f[0], netip.MustParsePrefix(f[1]), netip.MustParsePrefix(f[2])
			}
			// NSFLOW_BENCH_SCALE_EXCLUDE=1: the foreign namespaces present at
			// start excluded by name (such as a previous run's, being removed).
			cfg.excludeForeign = os.Getenv("NSFLOW_BENCH_SCALE_EXCLUDE") == "1"
			r := runScale(b, cfg)
			// Reported, not failed: a failed benchmark prints no figures.
			if len(r.notAttached) > 0 {
				b.Logf("NOT MET: %d pods not attached at readiness: %v", len(r.notAttached), r.notAttached[:min(10, len(r.notAttached))])
			}
			if r.stormBad > 0 {
				b.Logf("NOT MET: %d scrapes failed during the attach storm", r.stormBad)
			}
			b.ReportMetric(float64(len(r.notAttached)), "pods_not_attached_at_ready")
			b.ReportMetric(float64(r.stormBad), "storm_scrapes_failed")
			b.Logf("interfaces at readiness: %s; foreign namespaces excluded by name: %v", r.interfaces, cfg.excludeForeign)
			if r.listen == 0 {
				b.Logf("no scrape answered before ready (serve listened only then): s_to_listen 0, no storm scrapes")
			}
			b.Logf("new pod attach ms (veth → 4 hooks): %v", r.attach)
			b.ReportMetric(r.ready.Seconds(), "s_to_ready")
			b.ReportMetric(r.listen.Seconds(), "s_to_listen")
			b.ReportMetric(float64(len(r.storm)), "storm_scrapes")
			b.ReportMetric(ms(percentile(r.storm, 0.5)), "ms_storm_scrape_p50")
			b.ReportMetric(ms(percentile(r.storm, 0.99)), "ms_storm_scrape_p99")
			b.ReportMetric(ms(percentile(r.storm, 1)), "ms_storm_scrape_max")
			b.ReportMetric(float64(r.rss)/(1<<20), "MiB_rss")
			b.ReportMetric(float64(r.kmaps)/(1<<20), "MiB_kernel_maps")
			b.ReportMetric(float64(r.kprogs)/(1<<10), "KiB_kernel_progs")
			b.ReportMetric(ms(percentile(r.idleScrapes, 0.5)), "ms_scrape_median")
			b.ReportMetric(r.cpuIdle, "%cpu_idle")
			b.ReportMetric(float64(r.foreign), "foreign_netns")
			b.ReportMetric(ms(percentile(r.attach, 0.5)), "ms_new_pod_p50")
			b.ReportMetric(ms(percentile(r.attach, 0.99)), "ms_new_pod_p99")
			b.ReportMetric(ms(percentile(r.attachCreate, 0.99)), "ms_new_pod_from_create_p99")
			b.ReportMetric(ms(percentile(r.ethWindow, 0.99)), "ms_eth0_window_p99")
			b.ReportMetric(ms(percentile(r.loWindow, 0.99)), "ms_lo_window_p99")
			b.ReportMetric(ms(percentile(r.ethGap, 0.99)), "ms_eth0_gap_p99")
			b.ReportMetric(ms(percentile(r.loGap, 0.99)), "ms_lo_gap_p99")
			b.ReportMetric(ms(percentile(r.pollPeriod, 0.5)), "ms_poll_period")
		})
	}
}

// TestScaleSmoke is BenchmarkScale's bounded form (part of make test): 20
// pods, serve as deployed (default attach mode) but for the namespaces of
// concurrent tests present at its start, excluded by name (another
// package's test may hold hundreds, which serve would attach first: the
// benchmark measures that case, not this test), ready within 30 s with
// every pod's four hooks attached, every scrape during the attach storm
// answered 200, and 5 pods created meanwhile all attached. It asserts the
// harness and the outcome, not the figures (the targets are the
// benchmark's: make bench-scale).
func TestScaleSmoke(t *testing.T) {
	testenv.RequireRoot(t)
	r := runScale(t, scaleConfig{pods: 20, churn: 5, rate: 5, prefix: "bench-scs-", excludeForeign: true,
		subnet: netip.MustParsePrefix("10.218.0.0/24"), churnSubnet: netip.MustParsePrefix("10.218.1.0/24")})
	if r.ready > 30*time.Second {
		t.Errorf("ready after %s, want ≤ 30 s", r.ready)
	}
	if len(r.notAttached) > 0 {
		t.Errorf("pods not attached at readiness: %v", r.notAttached)
	}
	if r.stormBad > 0 {
		t.Errorf("%d scrapes failed during the attach storm", r.stormBad)
	}
	if len(r.attach) != 5 {
		t.Errorf("%d of 5 pods created meanwhile attached", len(r.attach))
	}
	t.Logf("ready %s; storm scrapes %d (p50 %.1f ms, max %.1f ms); new pod p50 %.1f ms, max %.1f ms; foreign namespaces %d",
		r.ready.Round(time.Millisecond), len(r.storm), ms(percentile(r.storm, 0.5)), ms(percentile(r.storm, 1)),
		ms(percentile(r.attach, 0.5)), ms(percentile(r.attach, 1)), r.foreign)
}
