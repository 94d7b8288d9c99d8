package e2e

import (
	"encoding/json"
	"net/netip"
	"os/exec"
	"regexp"
	"testing"
	"time"

	"github.com/cilium/ebpf/link"
	"github.com/vishvananda/netlink"

	"github.com/nsflow/nsflow/collector/flow"
	"github.com/nsflow/nsflow/exporter/report"
	"github.com/nsflow/nsflow/test/podns"
	"github.com/nsflow/nsflow/test/testenv"
)

// Instances coexist: a serve and two traces on the same pods at once, in
// both attach modes, each count exactly what the kernel counted over its own
// window (the first trace starts before the serve, the serve's start and the
// second trace's attach leave its programs alone); each removes only its
// own programs, and after the traces exit the serve still counts every
// packet.
func TestCoexist(t *testing.T) {
	testenv.RequireRoot(t)
	pods := newPods(t, "10.213.140.0/24", "co-a", "co-b")
	staticNeighbours(t, pods...) // no ARP: nothing crosses eth0 unless the test sends it
	for _, mode := range []string{"tcx", "clsact"} {
		t.Run(mode, func(t *testing.T) { testCoexist(t, mode, pods[0], pods[1]) })
	}
}

func testCoexist(t *testing.T, mode string, a, b *podns.Pod) {
	byIno := map[uint64]*podns.Pod{inodeOf(t, a): a, inodeOf(t, b): b}
	paths := map[uint64]string{}
	for ino, p := range byIno {
		paths[ino] = p.NetnsPath
	}
	port := 9800
	traffic := func() {
		t.Helper()
		port += 2
		udpExchange(t, a, b, netip.AddrPortFrom(b.IPv4, uint16(port)), 10, 100)
		udpExchange(t, a, a, netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), uint16(port+1)), 10, 64)
	}
	// quiet runs fn (a trace starting or stopping) between two reads of
	// the kernel's counters, and returns them: equal, no packet crossed
	// the pods meanwhile, so they are the counts at the trace's edge.
	quiet := func(what string, fn func()) counts {
		t.Helper()
		before := kernelCounts(t, paths)
		fn()
		after := kernelCounts(t, paths)
		if !equalCounts(before, after) {
			t.Fatalf("packets crossed the pods while %s: %v then %v", what, before, after)
		}
		return after
	}
	traceArgs := []string{"--netns", a.Name, "--netns", b.Name, "--output", "json", "--attach-mode", mode}
	var t1, t2 *tracer
	var out1, out2 []byte

	settle(t, paths)
	k1s := quiet("trace 1 started", func() { t1 = startTrace(t, 2, traceArgs...) })
	traffic()
	srv := startServe(t, "http", "--attach-mode", mode, "--netns.host=false", "--netns.proc=false",
		"--netns.include", "^co-[ab]$")
	waitUntil(t, 10*time.Second, "the pods in /metrics", func() bool {
		s, _ := srv.scrape(t)
		_, okA := s[pointSeries("nsflow_packets_total", a.Name, "eth0", "tx")]
		_, okB := s[pointSeries("nsflow_packets_total", b.Name, "eth0", "rx")]
		return okA && okB
	})
	k0, s0, _ := quiescentScrape(t, srv, byIno)
	traffic()
	k2s := quiet("trace 2 started", func() { t2 = startTrace(t, 2, traceArgs...) })
	traffic()

	// Three instances on every hook of both pods, each with programs of
	// its own: 2 interfaces x 2 hooks each.
	procs := map[string]int{"serve": srv.cmd.Process.Pid, "trace 1": t1.cmd.Process.Pid, "trace 2": t2.cmd.Process.Pid}
	links := map[string]map[link.ID]bool{}
	names := map[string][]string{}
	for who, pid := range procs {
		switch mode {
		case "tcx":
			links[who] = heldLinks(t, pid)
			for _, p := range []*podns.Pod{a, b} {
				if n := common(links[who], tcxLinks(t, p.NetnsPath)); n != 4 {
					t.Errorf("%s: %d tcx links of the %s, want 4", p.Name, n, who)
				}
			}
		case "clsact":
			names[who] = ownerNames(t, pid)
			for _, p := range []*podns.Pod{a, b} {
				filters := bpfFilters(t, p.NetnsPath)
				for _, name := range names[who] {
					if filters[name] != 4 {
						t.Errorf("%s: %d filters of the %s (%s), want 4; all filters: %v", p.Name, filters[name], who, name, filters)
					}
				}
			}
		}
	}
	// own counts the programs on pod p of the given instances.
	own := func(p *podns.Pod, who ...string) int {
		n := 0
		var onPod map[link.ID]bool
		var filters map[string]int
		if mode == "tcx" {
			onPod = tcxLinks(t, p.NetnsPath)
		} else {
			filters = bpfFilters(t, p.NetnsPath)
		}
		for _, w := range who {
			n += common(links[w], onPod)
			for _, name := range names[w] {
				n += filters[name]
			}
		}
		return n
	}

	// `nsflow list` recognizes every instance's programs.
	for _, p := range []*podns.Pod{a, b} {
		for iface, att := range listedAttach(t, p) {
			if att != mode {
				t.Errorf("nsflow list: %s %s attach %q, want %q", p.Name, iface, att, mode)
			}
		}
	}

	k1e := quiet("trace 1 stopped", func() { out1 = t1.stop(t) })
	traffic()
	k2e := quiet("trace 2 stopped", func() { out2 = t2.stop(t) })
	traffic()

	checkTrace(t, "trace 1 (started before the serve, stopped while trace 2 ran)", out1, mode, byIno, delta(k1s, k1e))
	checkTrace(t, "trace 2 (started after the serve)", out2, mode, byIno, delta(k2s, k2e))

	// The serve counted every packet, through both traces' exits.
	k1, s1, _ := quiescentScrape(t, srv, byIno)
	kd, sd := delta(k0, k1), delta(s0, s1)
	for p, want := range kd {
		if sd[p] != want {
			t.Errorf("serve %s: %+v, kernel %+v", p, sd[p], want)
		}
	}
	lo := point{inodeOf(t, a), "lo", flow.TX}
	if kd[lo].Packets < 40 {
		t.Errorf("a lo tx: the kernel counted %d packets, want at least the 40 datagrams sent", kd[lo].Packets)
	}
	t.Logf("%s: serve counted a eth0 tx %+v, lo tx %+v through both traces, equal to the kernel", mode,
		sd[point{inodeOf(t, a), "eth0", flow.TX}], sd[lo])

	// Only the serve's programs are left.
	for _, p := range []*podns.Pod{a, b} {
		if n := own(p, "serve"); n != 4 {
			t.Errorf("%s: %d programs of the serve after the traces exited, want 4", p.Name, n)
		}
		if n := own(p, "trace 1", "trace 2"); n != 0 {
			t.Errorf("%s: %d programs of the traces left after they exited", p.Name, n)
		}
	}
	srv.stop(t)
	for _, p := range []*podns.Pod{a, b} {
		if n := own(p, "serve", "trace 1", "trace 2"); n != 0 {
			t.Errorf("%s: %d programs left after everything exited", p.Name, n)
		}
	}
}

// settle waits (up to 20 s) until no packet has crossed the namespaces for
// a second: a new pod's IPv6 announces itself (DAD, MLD reports) for a
// few seconds after it is created.
func settle(t *testing.T, paths map[uint64]string) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	last, since := kernelCounts(t, paths), time.Now()
	for time.Since(since) < time.Second {
		if time.Now().After(deadline) {
			t.Fatal("the namespaces never went quiet for a second")
		}
		time.Sleep(50 * time.Millisecond)
		if now := kernelCounts(t, paths); !equalCounts(last, now) {
			last, since = now, time.Now()
		}
	}
}

// listedAttach runs `nsflow list -o json` on pod p and returns the attach
// state it reports for each of p's interfaces.
func listedAttach(t *testing.T, p *podns.Pod) map[string]string {
	t.Helper()
	out, err := exec.Command(nsflowBin, "list", "-o", "json", "--netns.host=false", "--netns.proc=false",
		"--netns.include", "^"+regexp.QuoteMeta(p.Name)+"$").Output()
	if err != nil {
		t.Fatalf("nsflow list: %v\n%s", err, out)
	}
	var listed []struct {
		Name       string `json:"name"`
		Interfaces []struct {
			Name   string `json:"name"`
			Attach string `json:"attach"`
		} `json:"interfaces"`
	}
	if err := json.Unmarshal(out, &listed); err != nil {
		t.Fatalf("nsflow list output: %v\n%s", err, out)
	}
	got := map[string]string{}
	for _, ns := range listed {
		if ns.Name != p.Name {
			continue
		}
		for _, i := range ns.Interfaces {
			got[i.Name] = i.Attach
		}
	}
	if len(got) != 2 {
		t.Fatalf("nsflow list: %s interfaces %v, want lo and eth0\n%s", p.Name, got, out)
	}
	return got
}

// checkTrace compares a trace's JSON result with the kernel's counters
// over the trace's window, for every interface of the pods.
func checkTrace(t *testing.T, what string, out []byte, mode string, pods map[uint64]*podns.Pod, want counts) {
	t.Helper()
	var tr report.Trace
	if err := json.Unmarshal(out, &tr); err != nil {
		t.Fatalf("%s: output is not JSON: %v\n%s", what, err, out)
	}
	if tr.AttachMode != mode {
		t.Errorf("%s: attach mode %q, want %q", what, tr.AttachMode, mode)
	}
	got := counts{}
	for _, ns := range tr.Namespaces {
		if pods[ns.Inode] == nil {
			continue
		}
		for _, i := range ns.Interfaces {
			got[point{ns.Inode, i.Name, flow.RX}] = flow.Counters{Packets: i.RXPackets, Bytes: i.RXBytes}
			got[point{ns.Inode, i.Name, flow.TX}] = flow.Counters{Packets: i.TXPackets, Bytes: i.TXBytes}
		}
	}
	for p, w := range want {
		if got[p] != w {
			t.Errorf("%s %s: %+v, kernel %+v", what, p, got[p], w)
		}
	}
	var total uint64
	for _, c := range want {
		total += c.Packets
	}
	if total == 0 {
		t.Errorf("%s: no traffic in its window: the test sent none?", what)
	}
}

// bpfFilters counts the cls_bpf filters on every clsact hook of every
// interface of the namespace at path, by name.
func bpfFilters(t *testing.T, path string) map[string]int {
	t.Helper()
	nl := openNetlinkAt(t, path)
	defer nl.Close()
	links, err := nl.LinkList()
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]int{}
	for _, l := range links {
		for _, parent := range []uint32{netlink.HANDLE_MIN_INGRESS, netlink.HANDLE_MIN_EGRESS} {
			fs, err := nl.FilterList(l, parent)
			if err != nil {
				continue // no clsact qdisc
			}
			for _, f := range fs {
				if bf, ok := f.(*netlink.BpfFilter); ok {
					out[bf.Name]++
				}
			}
		}
	}
	return out
}
