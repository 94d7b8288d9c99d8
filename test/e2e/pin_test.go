package e2e

import (
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"

	"github.com/nsflow/nsflow/collector/attach"
	"github.com/nsflow/nsflow/collector/flow"
	"github.com/nsflow/nsflow/test/podns"
	"github.com/nsflow/nsflow/test/testenv"
)

// With --pin, a restarted serve adopts the programs, links and maps of the
// previous one: counters continue without a reset, and packets sent while no
// nsflow process ran are counted too.
// Both mechanisms: TCX links (pinned) and clsact filters (left in the
// kernel, adopted by name), which auto uses in pod namespaces.
func TestServePinRestart(t *testing.T) {
	testenv.RequireRoot(t)
	for i, mode := range []string{"tcx", "clsact"} {
		t.Run(mode, func(t *testing.T) { testServePinRestart(t, mode, i) })
	}
}

// nsflowHooks counts the hooks of pod a that hold an nsflow program of the
// mechanism: TCX programs, or nsflow's cls_bpf filters.
func nsflowHooks(t *testing.T, a *podns.Pod, mode string) int {
	filters, nsflow := 0, 0
	for name, c := range bpfFilters(t, a.NetnsPath) {
		filters += c
		if attach.IsNsflowFilter(name) {
			nsflow += c
		}
	}
	if mode == "tcx" {
		return hookPrograms(t, a) - filters
	}
	return nsflow
}

func testServePinRestart(t *testing.T, mode string, i int) {
	pin := fmt.Sprintf("/sys/fs/bpf/nsflow-e2e-%d-%s", os.Getpid(), mode)
	t.Cleanup(func() { os.RemoveAll(pin) }) // unpinning detaches what is left
	args := []string{"--pin", "--pin.path", pin, "--attach-mode", mode, "--netns.host=false", "--netns.proc=false", "--netns.include", "^e2e-pin-"}
	pods := newPods(t, fmt.Sprintf("10.213.%d.0/24", 126+100*i), fmt.Sprintf("e2e-pin-%s", mode))
	a := pods[0]
	byIno := map[uint64]*podns.Pod{inodeOf(t, a): a}
	lo := point{inodeOf(t, a), "lo", flow.TX}

	seriesUp := func(srv *server) {
		waitUntil(t, 10*time.Second, "pod a in /metrics", func() bool {
			s, _ := srv.scrape(t)
			_, ok := s[pointSeries("nsflow_packets_total", a.Name, "lo", "tx")]
			return ok
		})
	}
	srv := startServe(t, "http", args...)
	seriesUp(srv)
	k0, s0, _ := quiescentScrape(t, srv, byIno)
	udpExchange(t, a, a, netip.MustParseAddrPort("127.0.0.1:9700"), 10, 20)
	srv.stop(t)

	if n := nsflowHooks(t, a, mode); n != 4 {
		t.Fatalf("%d %s hooks with nsflow programs in pod a after serve --pin exited, want 4 (left attached)", n, mode)
	}
	// Pins are private to root: directories 0700, files 0600.
	filepath.Walk(pin, func(path string, fi os.FileInfo, err error) error {
		if err != nil {
			return nil
		}
		perm := fi.Mode().Perm()
		if (fi.IsDir() && perm != 0o700) || (!fi.IsDir() && perm&0o077 != 0) {
			t.Errorf("%s has mode %v", path, perm)
		}
		return nil
	})
	if !strings.Contains(srv.logText(), "left programs attached") {
		t.Errorf("no log of what was left pinned:\n%s", srv.logText())
	}
	// Nobody runs: the pinned programs keep counting.
	udpExchange(t, a, a, netip.MustParseAddrPort("127.0.0.1:9701"), 15, 20)

	srv = startServe(t, "http", args...)
	seriesUp(srv)
	if n := nsflowHooks(t, a, mode); n != 4 {
		t.Errorf("%d %s hooks with nsflow programs after the restart, want 4: adopted, not attached twice", n, mode)
	}
	udpExchange(t, a, a, netip.MustParseAddrPort("127.0.0.1:9702"), 5, 20)
	k1, s1, _ := quiescentScrape(t, srv, byIno)
	kd, sd := delta(k0, k1), delta(s0, s1)
	for p, want := range kd {
		if sd[p] != want {
			t.Errorf("%s across the restart: /metrics %+v, kernel %+v", p, sd[p], want)
		}
	}
	if kd[lo].Packets < 30 {
		t.Errorf("lo tx %d packets, want at least the 30 datagrams sent", kd[lo].Packets)
	}
	t.Logf("across a restart with traffic while down: lo tx %+v, equal to the kernel's", sd[lo])
	if mode == "tcx" && !strings.Contains(srv.logText(), "adopted pinned link") {
		t.Errorf("the restarted serve did not adopt the links:\n%s", srv.logText())
	}
	srv.stop(t)

	// The pod goes while no serve runs: the next serve releases its pins,
	// exports its last counts (under its inode: its name is gone with it)
	// for the grace period, then forgets them and frees their slots.
	inoA := inodeOf(t, a)
	if _, err := podns.Delete(podns.Config{}, a.Name); err != nil {
		t.Fatal(err)
	}
	// The grace period of the orphaned counts starts when this serve finds
	// them, so no earlier than starting: a scrape that has returned less
	// than the grace period after starting must still show them, however
	// long the start and the release took (then the check is logged as not
	// made, rather than failed).
	const grace = 4 * time.Second
	starting := time.Now()
	srv = startServe(t, "http", append(args, fmt.Sprintf("--netns.grace-period=%s", grace))...)
	waitUntil(t, 10*time.Second, "stale pins released", func() bool {
		ents, _ := os.ReadDir(filepath.Join(pin, attach.PinLayout, "links"))
		return len(ents) == 0
	})
	orphan := pointSeries("nsflow_packets_total", fmt.Sprintf("netns:%d", inoA), "if1", "tx")
	if s, body := srv.scrape(t); time.Since(starting) >= grace {
		t.Logf("start and release took until %s after starting serve: no scrape inside the %s grace period to check", time.Since(starting), grace)
	} else if s[orphan] < float64(k1[lo].Packets) {
		t.Errorf("the gone pod's last counts are not exported as %s (want >= %d):\n%s", orphan, k1[lo].Packets, body)
	}
	waitUntil(t, 15*time.Second, "the gone pod's series forgotten after the grace period", func() bool {
		s, _ := srv.scrape(t)
		_, ok := s[orphan]
		return !ok
	})
	points, err := ebpf.LoadPinnedMap(filepath.Join(pin, attach.PinLayout, "points"), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer points.Close()
	var slot uint32
	var key [12]byte
	for it := points.Iterate(); it.Next(&slot, &key); {
		if key != ([12]byte{}) {
			t.Errorf("slot %d still assigned (%x) after every point was forgotten", slot, key)
		}
	}
	srv.stop(t)
}

// Pinned state from another version is detected and replaced, with a log
// line, never misread.
func TestServePinIncompatible(t *testing.T) {
	testenv.RequireRoot(t)
	pin := fmt.Sprintf("/sys/fs/bpf/nsflow-e2e-incompat-%d", os.Getpid())
	t.Cleanup(func() { os.RemoveAll(pin) })
	dir := filepath.Join(pin, attach.PinLayout)
	if err := os.MkdirAll(filepath.Join(pin, "v0"), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	// A "totals" map whose values are 8 bytes, not 16.
	m, err := ebpf.NewMap(&ebpf.MapSpec{Name: "totals", Type: ebpf.PerCPUHash, KeySize: 12, ValueSize: 8, MaxEntries: 16})
	if err != nil {
		t.Fatal(err)
	}
	if err := m.Pin(filepath.Join(dir, "totals")); err != nil {
		t.Fatal(err)
	}
	m.Close()

	pods := newPods(t, "10.213.127.0/24", "e2e-pin-inc")
	srv := startServe(t, "http", "--pin", "--pin.path", pin, "--netns.host=false", "--netns.proc=false", "--netns.include", "^e2e-pin-inc$")
	waitUntil(t, 10*time.Second, "pod in /metrics", func() bool {
		s, _ := srv.scrape(t)
		_, ok := s[pointSeries("nsflow_packets_total", pods[0].Name, "lo", "tx")]
		return ok
	})
	log := srv.logText()
	for _, want := range []string{"pinned map incompatible", "map=totals", "removing pinned state of an incompatible layout", "layout=v0"} {
		if !strings.Contains(log, want) {
			t.Errorf("log lacks %q:\n%s", want, log)
		}
	}
	got, err := ebpf.LoadPinnedMap(filepath.Join(dir, "totals"), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer got.Close()
	if got.ValueSize() != 16 {
		t.Errorf("pinned totals value size %d after replacement, want 16", got.ValueSize())
	}
	if _, err := os.Stat(filepath.Join(pin, "v0")); !os.IsNotExist(err) {
		t.Errorf("old layout directory still there: %v", err)
	}
}
