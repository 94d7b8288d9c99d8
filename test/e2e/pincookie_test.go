package e2e

import (
	"fmt"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/nsflow/nsflow/collector/attach"
	"github.com/nsflow/nsflow/collector/flow"
	"github.com/nsflow/nsflow/collector/nsenter"
	"github.com/nsflow/nsflow/test/podns"
	"github.com/nsflow/nsflow/test/testenv"
)

// Pinned state is keyed by namespace cookie, not inode: namespaces counted
// by a serve --pin go while no serve runs, and a new namespace that gets
// one of their inodes starts at zero when the next serve observes it,
// equal to its own kernel counters; the gone namespace's counts are not
// exported under its inode either. With clsact, the filters a previous
// process left on a namespace the next serve does not observe (its own
// pinned ones, a SIGKILLed trace's) are gone once that serve is ready; a
// live trace's and another tool's stay.
func TestPinInodeReuse(t *testing.T) {
	testenv.RequireRoot(t)
	pods := newPods(t, "10.213.141.0/24", "pr-a", "pr-b")
	for _, mode := range []string{"tcx", "clsact"} {
		t.Run(mode, func(t *testing.T) { testPinInodeReuse(t, mode, pods[0], pods[1]) })
	}
}

func testPinInodeReuse(t *testing.T, mode string, a, b *podns.Pod) {
	pin := fmt.Sprintf("/sys/fs/bpf/nsflow-e2e-pr-%s-%d", mode, os.Getpid())
	t.Cleanup(func() { os.RemoveAll(pin) })
	args := []string{"--pin", "--pin.path", pin, "--attach-mode", mode, "--netns.host=false", "--netns.proc=false"}
	prefix := "pr-" + mode + "-"
	nsPath := func(name string) string { return filepath.Join("/run/netns", name) }
	pingLo := func(name string, n int) {
		t.Helper()
		out, err := exec.Command("ip", "netns", "exec", name, "ping", "-c", fmt.Sprint(n), "-i", "0.02", "-W", "1", "127.0.0.1").CombinedOutput()
		if err != nil {
			t.Fatalf("ping in %s: %v\n%s", name, err, out)
		}
	}

	// A namespace that stays (the next serve adopts its programs), and a
	// pool that goes while no serve runs. The pool is made last, just
	// before the serve stops: the kernel hands out the lowest free inode
	// number, so that few numbers below theirs are freed (by namespaces
	// going elsewhere) before they go, and a new namespace soon gets one
	// of theirs.
	include := "^" + prefix + "[pk]"
	if mode == "clsact" {
		include += "|^pr-[ab]$"
	}
	srv := startServe(t, "http", append(args, "--netns.include", include)...)
	kept := &podns.Pod{Name: prefix + "k", NetnsPath: nsPath(prefix + "k")}
	newRawNetns(t, kept.NetnsPath)
	keptIno := nsInode(t, kept.NetnsPath)
	inMetrics := func(names ...string) func() bool {
		return func() bool {
			s, _ := srv.scrape(t)
			for _, name := range names {
				if _, ok := s[pointSeries("nsflow_packets_total", name, "lo", "tx")]; !ok {
					return false
				}
			}
			return true
		}
	}
	waitUntil(t, 10*time.Second, "the kept namespace in /metrics", inMetrics(kept.Name))
	pingLo(kept.Name, 4)

	var foreign *netlink.BpfFilter
	var live *tracer
	pinned := pinnedName(pin, attach.PinLayout) // the serve's clsact filters
	var deadName, liveName string
	if mode == "clsact" {
		// A trace killed on a (no Close: its filters stay, their owner dead),
		// a trace alive on b, and another tool's filter on a's lo.
		dead := startTrace(t, 1, "--netns", a.Name, "--attach-mode", "clsact")
		deadName = ownerNames(t, dead.cmd.Process.Pid)[0]
		dead.cmd.Process.Kill()
		dead.cmd.Wait()
		live = startTrace(t, 1, "--netns", b.Name, "--attach-mode", "clsact", "--output", "json")
		liveName = ownerNames(t, live.cmd.Process.Pid)[0]
		foreign = addForeignFilter(t, a)
		if got := bpfFilters(t, a.NetnsPath); got[pinned] != 4 || got[deadName] != 4 {
			t.Fatalf("pod a: filters %v, want the serve's (%s) and the dead trace's (%s), 4 each", got, pinned, deadName)
		}
	}

	const poolSize = 4
	pool := map[uint64]string{}
	for i := 0; i < poolSize; i++ {
		name := fmt.Sprintf("%sp%d", prefix, i)
		makeNetns(t, nsPath(name), true)
		pool[nsInode(t, nsPath(name))] = name
	}
	waitUntil(t, 10*time.Second, "the pool in /metrics", inMetrics(slices.Collect(maps.Values(pool))...))
	for _, name := range pool {
		pingLo(name, 5)
	}
	srv.stop(t)
	for _, name := range pool {
		removeRawNetns(t, nsPath(name))
	}
	pingLo(kept.Name, 5) // counted while no serve runs

	// New namespaces are made (and kept, filling the lower free numbers)
	// until one gets the inode of a gone one; the others are removed. The
	// kernel frees a namespace's inode number only once it has cleaned the
	// namespace up (a work queue, after RCU grace periods): bounded in
	// time as well as in count.
	var reused string
	var reusedIno uint64
	var extra []string
	deadline := time.Now().Add(20 * time.Second)
	for i := 0; i < 600 && reused == "" && time.Now().Before(deadline); i++ {
		name := fmt.Sprintf("%sn%d", prefix, i)
		makeNetns(t, nsPath(name), false)
		if ino := nsInode(t, nsPath(name)); pool[ino] != "" {
			reused, reusedIno = name, ino
			t.Logf("%s got inode %d of the gone %s after %d namespaces", name, ino, pool[ino], i+1)
		} else {
			extra = append(extra, name)
			time.Sleep(10 * time.Millisecond)
		}
	}
	for _, name := range extra {
		removeRawNetns(t, nsPath(name))
	}
	if reused == "" {
		t.Fatalf("no new namespace got the inode of a gone one in %d tries", len(extra))
	}
	setLoUp(t, nsPath(reused))

	srv = startServe(t, "http", append(args, "--netns.include", "^"+prefix+"[nk]")...)
	waitUntil(t, 10*time.Second, "the new namespace in /metrics", func() bool {
		s, _ := srv.scrape(t)
		_, ok := s[pointSeries("nsflow_packets_total", reused, "lo", "tx")]
		return ok
	})
	pingLo(reused, 3)
	pingLo(kept.Name, 3)
	newNs := map[uint64]*podns.Pod{reusedIno: {Name: reused, NetnsPath: nsPath(reused)}, keptIno: kept}
	k, s, body := quiescentScrape(t, srv, newNs)
	// The kept namespace's programs were adopted, not doubled, and its
	// counts continued: equal to its kernel counters since it was made
	// (the first serve attached before any packet), including the pings
	// while no serve ran.
	for _, d := range []flow.Direction{flow.RX, flow.TX} {
		p := point{keptIno, "lo", d}
		if s[p] != k[p] || k[p].Packets != 24 {
			t.Errorf("%s lo %s across the restart: /metrics %+v, kernel %+v; want equal, 24 packets (12 pings)", kept.Name, d, s[p], k[p])
		}
	}
	switch mode {
	case "tcx":
		if n := common(heldLinks(t, srv.cmd.Process.Pid), tcxLinks(t, kept.NetnsPath)); n != 2 {
			t.Errorf("%s: %d tcx links of the serve after the restart, want 2 (adopted)", kept.Name, n)
		}
	case "clsact":
		if got := bpfFilters(t, kept.NetnsPath); got[pinned] != 2 {
			t.Errorf("%s: filters %v after the restart, want %s once on each hook of lo (adopted, not doubled)", kept.Name, got, pinned)
		}
	}
	for _, d := range []flow.Direction{flow.RX, flow.TX} {
		p := point{reusedIno, "lo", d}
		if s[p] != k[p] {
			t.Errorf("%s (inode %d of a gone namespace) lo %s: /metrics %+v, kernel %+v since it was created: want equal, nothing inherited",
				reused, reusedIno, d, s[p], k[p])
		}
	}
	if k[point{reusedIno, "lo", flow.TX}].Packets != 6 {
		t.Errorf("kernel lo tx %+v in %s, want the 6 packets of 3 pings", k[point{reusedIno, "lo", flow.TX}], reused)
	}
	if orphan := fmt.Sprintf(`netns="netns:%d"`, reusedIno); strings.Contains(body, orphan) {
		t.Errorf("the gone namespace's counts are exported under its reused inode (%s):\n%s", orphan, body)
	}
	if !strings.Contains(srv.logText(), "got the inode of one that went while no nsflow ran") {
		t.Errorf("no log line about the reused inode:\n%s", srv.logText())
	}

	if mode == "clsact" {
		// a is not observed any more: the pinned filters and the dead
		// trace's are gone; the foreign one stays; b keeps the live
		// trace's (it was swept too) and the pinned ones go.
		if got := bpfFilters(t, a.NetnsPath); got[pinned] != 0 || got[deadName] != 0 || got[foreign.Name] != 1 {
			t.Errorf("pod a: filters %v once the next serve is ready, want none of %s, %s; the foreign one kept", got, pinned, deadName)
		}
		if got := bpfFilters(t, b.NetnsPath); got[pinned] != 0 || got[liveName] != 4 {
			t.Errorf("pod b: filters %v, want the live trace's %s (4), none of %s", got, liveName, pinned)
		}
		if !strings.Contains(srv.logText(), "removed clsact filters nobody adopts") {
			t.Errorf("no log line about the removed filters:\n%s", srv.logText())
		}
		live.stop(t)
	}
	srv.stop(t)

	if mode == "clsact" {
		// The next serve with this pin path uses TCX: it adopts the kept
		// namespace's slots and removes the pinned filters there, which
		// would otherwise count every packet a second time.
		srv = startServe(t, "http", "--pin", "--pin.path", pin, "--attach-mode", "tcx", "--netns.host=false",
			"--netns.proc=false", "--netns.include", "^"+prefix+"k$")
		if got := bpfFilters(t, kept.NetnsPath); got[pinned] != 0 {
			t.Errorf("%s: filters %v once a TCX serve with the same pin path is ready, want none of %s", kept.Name, got, pinned)
		}
		if n := common(heldLinks(t, srv.cmd.Process.Pid), tcxLinks(t, kept.NetnsPath)); n != 2 {
			t.Errorf("%s: %d tcx links of the serve, want 2", kept.Name, n)
		}
		pingLo(kept.Name, 3)
		only := map[uint64]*podns.Pod{keptIno: kept}
		k, s, _ := quiescentScrape(t, srv, only)
		for _, d := range []flow.Direction{flow.RX, flow.TX} {
			p := point{keptIno, "lo", d}
			if s[p] != k[p] {
				t.Errorf("%s lo %s after switching to TCX: /metrics %+v, kernel %+v; want equal (counted once)", kept.Name, d, s[p], k[p])
			}
		}
		srv.stop(t)
	}
}

// makeNetns makes a bind-mounted namespace at path from this process (no
// fork: fast enough to make hundreds), optionally with lo up, and removes
// it when the test ends.
func makeNetns(t *testing.T, path string, loUp bool) {
	t.Helper()
	if err := os.WriteFile(path, nil, 0o444); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { removeRawNetns(t, path) })
	err := nsenter.Run(func() error { return unix.Unshare(unix.CLONE_NEWNET) }, func() error {
		return unix.Mount("/proc/thread-self/ns/net", path, "", unix.MS_BIND, "")
	})
	if err != nil {
		t.Fatalf("make namespace %s: %v", path, err)
	}
	if loUp {
		setLoUp(t, path)
	}
}

func setLoUp(t *testing.T, path string) {
	t.Helper()
	nl := openNetlinkAt(t, path)
	defer nl.Close()
	lo, err := nl.LinkByName("lo")
	if err == nil {
		err = nl.LinkSetUp(lo)
	}
	if err != nil {
		t.Fatalf("lo up in %s: %v", path, err)
	}
}

// addForeignFilter puts another tool's counting cls_bpf filter (priority
// 10) on pod p's lo ingress, removed when the test ends.
func addForeignFilter(t *testing.T, p *podns.Pod) *netlink.BpfFilter {
	t.Helper()
	prog, _ := foreignCounter(t)
	nl, err := p.Netlink()
	if err != nil {
		t.Fatal(err)
	}
	defer nl.Close()
	lo, err := nl.LinkByName("lo")
	if err != nil {
		t.Fatal(err)
	}
	f := &netlink.BpfFilter{FilterAttrs: netlink.FilterAttrs{LinkIndex: lo.Attrs().Index, Parent: netlink.HANDLE_MIN_INGRESS,
		Handle: 0x77, Priority: 10, Protocol: unix.ETH_P_ALL}, Fd: prog.FD(), Name: "foreign-count", DirectAction: true}
	if err := nl.FilterAdd(f); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if nl, err := p.Netlink(); err == nil {
			nl.FilterDel(f)
			nl.Close()
		}
	})
	return f
}
