package e2e

import (
	"encoding/json"
	"net/netip"
	"os/exec"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"

	"github.com/nsflow/nsflow/collector"
	"github.com/nsflow/nsflow/collector/attach"
	"github.com/nsflow/nsflow/collector/discovery"
	"github.com/nsflow/nsflow/collector/flow"
	"github.com/nsflow/nsflow/test/podns"
	"github.com/nsflow/nsflow/test/testenv"
)

// linksOn counts the TCX links of a process (by its link ids) on a host
// interface, both directions.
func linksOn(t *testing.T, ids map[link.ID]bool, name string) int {
	t.Helper()
	l, err := netlink.LinkByName(name)
	if err != nil {
		t.Fatalf("host link %s: %v", name, err)
	}
	n := 0
	for _, at := range []ebpf.AttachType{ebpf.AttachTCXIngress, ebpf.AttachTCXEgress} {
		r, err := link.QueryPrograms(link.QueryOptions{Target: l.Attrs().Index, Attach: at})
		if err != nil {
			t.Fatalf("query tcx on %s: %v", name, err)
		}
		for _, p := range r.Programs {
			if id, ok := p.LinkID(); ok && ids[id] {
				n++
			}
		}
	}
	return n
}

// hostKernel reads host interfaces' own counters, keyed with inode 0.
func hostKernel(t *testing.T, names []string) counts {
	t.Helper()
	out := counts{}
	for _, name := range names {
		l, err := netlink.LinkByName(name)
		if err != nil {
			t.Fatalf("host link %s: %v", name, err)
		}
		s := l.Attrs().Statistics
		out[point{0, name, flow.RX}] = flow.Counters{Packets: s.RxPackets, Bytes: s.RxBytes}
		out[point{0, name, flow.TX}] = flow.Counters{Packets: s.TxPackets, Bytes: s.TxBytes}
	}
	return out
}

// onceScrape scrapes between two equal reads of the kernel's counters (the
// pods' and the host interfaces'): the scraped pods' eth0 and the host
// interfaces' series (those present) and the kernel's, at one instant.
func onceScrape(t *testing.T, srv *server, pods map[uint64]*podns.Pod, host []string) (kernel, scraped counts, s samples) {
	t.Helper()
	paths := map[uint64]string{}
	for ino, p := range pods {
		paths[ino] = p.NetnsPath
	}
	read := func() counts {
		k := kernelCounts(t, paths)
		for p, c := range hostKernel(t, host) {
			k[p] = c
		}
		return k
	}
	for try := 0; try < 100; try++ {
		before := read()
		s, _ = srv.scrape(t)
		after := read()
		if !equalCounts(before, after) {
			continue
		}
		scraped = scrapeCounts(s, pods, []string{"eth0"})
		for _, name := range host {
			for _, d := range []flow.Direction{flow.RX, flow.TX} {
				pk, ok1 := s[pointSeries("nsflow_packets_total", "host", name, string(d))]
				by, ok2 := s[pointSeries("nsflow_bytes_total", "host", name, string(d))]
				if ok1 && ok2 {
					scraped[point{0, name, d}] = flow.Counters{Packets: uint64(pk), Bytes: uint64(by)}
				}
			}
		}
		return after, scraped, s
	}
	t.Fatal("interfaces never quiet for one scrape")
	return nil, nil, nil
}

// hasSeries reports whether a scrape has a host interface's series.
func hasHostSeries(s samples, name string) bool {
	_, ok := s[pointSeries("nsflow_packets_total", "host", name, "rx")]
	return ok
}

// onceTraffic exchanges pings and UDP between pod a and the others.
func onceTraffic(t *testing.T, a *podns.Pod, others ...*podns.Pod) {
	t.Helper()
	for i, p := range others {
		run(t, a, exec.Command("ping", "-c", "3", "-i", "0.05", "-W", "2", p.IPv4.String()))
		udpExchange(t, a, p, netip.AddrPortFrom(p.IPv4, uint16(9310+i)), 20, 200)
	}
}

// assertDeltas checks that every wanted point's scraped delta equals the
// kernel's, and that pod a sent something.
func assertDeltas(t *testing.T, what string, k0, s0, k1, s1 counts, want []point) {
	t.Helper()
	kd, sd := delta(k0, k1), delta(s0, s1)
	for _, p := range want {
		got, ok := sd[p]
		if !ok {
			t.Errorf("%s: %s: no series", what, p)
			continue
		}
		if got != kd[p] {
			t.Errorf("%s: %s: /metrics %+v, kernel %+v", what, p, got, kd[p])
		}
		if kd[p].Packets == 0 {
			t.Errorf("%s: %s: no traffic measured", what, p)
		}
	}
}

// Each packet between pods is counted once by serve's defaults (the host
// observed): the host ends of the pods' veths carry no nsflow program of
// this serve and have no series, while the pods' eth0 series equal the
// kernel's counters. A pod whose namespace is excluded keeps its host end
// observed (its packets are counted there, exactly), and a pod created
// while serve runs has its host end left out once its namespace is
// observed. With --netns.host-veths the host ends are observed too, equal
// to the kernel's counters. `nsflow list` shows which host ends are left
// out and whose peer counts them.
func TestCountOnce(t *testing.T) {
	testenv.RequireRoot(t)
	const subnet = "10.213.217.0/24"
	a := newPods(t, subnet, "once-a")[0] // before serve: found at start
	args := []string{"--attach-mode", "tcx", "--cri.endpoint", "none", "--netns.grace-period", "2s",
		"--netns.include", "^(host|once-[abc])$", "--netns.exclude", "^once-c$"}
	srv := startServe(t, "http", args...)
	bc := newPods(t, subnet, "once-b", "once-c") // while serve runs
	b, c := bc[0], bc[1]
	pods := map[uint64]*podns.Pod{inodeOf(t, a): a, inodeOf(t, b): b}
	hostEnds := []string{a.HostVeth, b.HostVeth, c.HostVeth}

	// A host end attached before its pod's namespace was observed (b's,
	// if serve saw the veth first) counted both views until then: its
	// series stays for the grace period, frozen, and goes.
	waitUntil(t, 20*time.Second, "pods' eth0 observed, their host ends without series, c's host end observed", func() bool {
		s, _ := srv.scrape(t)
		for _, p := range []*podns.Pod{a, b} {
			if _, ok := s[pointSeries("nsflow_packets_total", p.Name, "eth0", "tx")]; !ok || hasHostSeries(s, p.HostVeth) {
				return false
			}
		}
		return hasHostSeries(s, c.HostVeth)
	})
	ids := heldLinks(t, srv.cmd.Process.Pid)
	for _, p := range []*podns.Pod{a, b} {
		if n := linksOn(t, ids, p.HostVeth); n != 0 {
			t.Errorf("defaults: %d TCX links of serve on %s's host end %s, want 0", n, p.Name, p.HostVeth)
		}
	}
	if n := linksOn(t, ids, c.HostVeth); n != 2 {
		t.Errorf("defaults: %d TCX links of serve on excluded %s's host end %s, want 2", n, c.Name, c.HostVeth)
	}

	k0, s0, _ := onceScrape(t, srv, pods, hostEnds)
	onceTraffic(t, a, b, c)
	k1, s1, sc := onceScrape(t, srv, pods, hostEnds)
	inoA, inoB := inodeOf(t, a), inodeOf(t, b)
	assertDeltas(t, "defaults", k0, s0, k1, s1, []point{
		{inoA, "eth0", flow.TX}, {inoA, "eth0", flow.RX}, {inoB, "eth0", flow.TX}, {inoB, "eth0", flow.RX},
		{0, c.HostVeth, flow.TX}, {0, c.HostVeth, flow.RX},
	})
	for _, p := range []*podns.Pod{a, b} {
		if hasHostSeries(sc, p.HostVeth) {
			t.Errorf("defaults: %s's host end %s has series after traffic", p.Name, p.HostVeth)
		}
	}
	if v := sc[`nsflow_attachments{state="peer-observed"}`]; v < 2 {
		t.Errorf(`nsflow_attachments{state="peer-observed"} = %v, want at least 2`, v)
	}

	// list, with the same selection, names the peer of each host end and
	// says which are left out.
	// The host's listing fails as a whole when one of its interfaces
	// vanishes while it is read (other tests' pods come and go): retried.
	state := map[string]discovery.ListedIface{}
	for try := 0; try < 10 && len(state) == 0; try++ {
		out, err := exec.Command(nsflowBin, "list", "-o", "json", "--cri.endpoint", "none",
			"--netns.include", "^(host|once-[abc])$", "--netns.exclude", "^once-c$").Output()
		if err != nil {
			t.Fatalf("list: %v", err)
		}
		var listed []discovery.ListedNamespace
		if err := json.Unmarshal(out, &listed); err != nil {
			t.Fatalf("list json: %v", err)
		}
		for _, ns := range listed {
			if ns.Name == "host" && ns.Error == "" {
				for _, i := range ns.Interfaces {
					state[i.Name] = i
				}
			}
		}
	}
	for _, p := range []*podns.Pod{a, b} {
		if i := state[p.HostVeth]; i.State != "peer-observed" || i.Peer != p.Name+"/eth0" {
			t.Errorf("list: %s: state %q peer %q, want peer-observed, %s/eth0", p.HostVeth, i.State, i.Peer, p.Name)
		}
	}
	if i, ok := state[c.HostVeth]; !ok || i.State != "" || i.Peer != "" {
		t.Errorf("list: excluded pod's host end %s: %+v, want listed without peer", c.HostVeth, i)
	}
	srv.stop(t)

	// --netns.host-veths: both views, each exact.
	srv = startServe(t, "http", append(args, "--netns.host-veths")...)
	waitUntil(t, 20*time.Second, "host ends observed with --netns.host-veths", func() bool {
		s, _ := srv.scrape(t)
		return hasHostSeries(s, a.HostVeth) && hasHostSeries(s, b.HostVeth)
	})
	ids = heldLinks(t, srv.cmd.Process.Pid)
	if n := linksOn(t, ids, a.HostVeth); n != 2 {
		t.Errorf("--netns.host-veths: %d TCX links of serve on %s, want 2", n, a.HostVeth)
	}
	k0, s0, _ = onceScrape(t, srv, pods, hostEnds)
	onceTraffic(t, a, b, c)
	k1, s1, _ = onceScrape(t, srv, pods, hostEnds)
	assertDeltas(t, "--netns.host-veths", k0, s0, k1, s1, []point{
		{inoA, "eth0", flow.TX}, {inoB, "eth0", flow.RX},
		{0, a.HostVeth, flow.TX}, {0, a.HostVeth, flow.RX}, {0, b.HostVeth, flow.TX}, {0, b.HostVeth, flow.RX},
		{0, c.HostVeth, flow.TX},
	})
}

// onceRead reads the collector's counters of the pods' namespaces and of
// the named host interfaces (inode hostIno), bracketed by two equal reads of
// the kernel's.
func onceRead(t *testing.T, c *collector.Collector, hostIno uint64, pods []*podns.Pod, host []string) (kernel, ours counts) {
	t.Helper()
	paths := map[uint64]string{}
	for _, p := range pods {
		paths[inodeOf(t, p)] = p.NetnsPath
	}
	read := func() counts {
		k := kernelCounts(t, paths)
		for p, v := range hostKernel(t, host) {
			k[point{hostIno, p.iface, p.dir}] = v
		}
		return k
	}
	for try := 0; try < 200; try++ {
		before := read()
		snap, err := c.Snapshot()
		if err != nil {
			t.Fatalf("snapshot: %v", err)
		}
		after := read()
		if !equalCounts(before, after) {
			continue
		}
		ours = nsflowCounts(snap, paths)
		for _, ns := range snap.Namespaces {
			if ns.Inode != hostIno {
				continue
			}
			for _, i := range ns.Interfaces {
				for _, name := range host {
					if i.Name == name {
						ours[point{hostIno, name, flow.RX}] = i.RX
						ours[point{hostIno, name, flow.TX}] = i.TX
					}
				}
			}
		}
		return after, ours
	}
	t.Fatal("interfaces never quiet for one snapshot")
	return nil, nil
}

// hostEndPeer returns the state and the peer the collector reports for a
// host interface.
func hostEndPeer(c *collector.Collector, hostIno uint64, name string) (flow.AttachState, string) {
	for _, ns := range c.Interfaces() {
		if ns.Inode == hostIno {
			for _, i := range ns.Interfaces {
				if i.Name == name {
					return i.State, i.Peer
				}
			}
		}
	}
	return "", ""
}

// The rule follows the namespaces and links as they change, in the
// collector: a host end observed before its pod's namespace is left out
// when the namespace is added (its eth0 attached first), and observed
// again, exactly, when the namespace is removed (attached before the pod's
// programs go); a veth made in the host with one end then moved into an
// observed namespace, as CNI plugins do, has its host end left out once
// the moved end is attached there (the host end gets no link event: the
// moved end's DELLINK names it), and observed again when that end moves
// back. Under TCX and clsact.
func TestCountOnceTransitions(t *testing.T) {
	testenv.RequireRoot(t)
	pods := newPods(t, "10.213.218.0/24", "once-t-a", "once-t-b")
	for _, mode := range []attach.Mode{attach.ModeTCX, attach.ModeClsact} {
		t.Run(string(mode), func(t *testing.T) { testCountOnceTransitions(t, mode, pods[0], pods[1]) })
	}
}

func testCountOnceTransitions(t *testing.T, mode attach.Mode, a, b *podns.Pod) {
	c, err := collector.New(collector.Config{Mode: mode})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	hostIno, err := c.Add(collector.Target{Name: "host", Path: "/proc/self/ns/net"})
	if err != nil {
		t.Logf("host: %v (interfaces of other tests vanish meanwhile)", err)
	}
	if st, _ := hostEndPeer(c, hostIno, a.HostVeth); st != flow.StateAttached {
		t.Fatalf("a's host end before a is observed: %q, want attached", st)
	}
	inoA, err := c.Add(collector.Target{Name: a.Name, Path: a.NetnsPath})
	if err != nil {
		t.Fatal(err)
	}
	if st, peer := hostEndPeer(c, hostIno, a.HostVeth); st != flow.StatePeerObserved || peer != a.Name+"/eth0" {
		t.Errorf("a's host end once a is observed: %q (peer %q), want peer-observed (%s/eth0)", st, peer, a.Name)
	}
	if st, _ := hostEndPeer(c, hostIno, b.HostVeth); st != flow.StateAttached {
		t.Errorf("b's host end (b not observed): %q, want attached", st)
	}
	hostLinks := func(name string) int {
		ids := map[ebpf.ProgramID]bool{}
		for _, id := range c.ProgramIDs() {
			ids[id] = true
		}
		l, err := netlink.LinkByName(name)
		if err != nil {
			t.Fatal(err)
		}
		n := 0
		if mode == attach.ModeClsact {
			for _, parent := range []uint32{netlink.HANDLE_MIN_INGRESS, netlink.HANDLE_MIN_EGRESS} {
				fs, _ := netlink.FilterList(l, parent) // an error: no clsact qdisc
				for _, f := range fs {
					if bf, ok := f.(*netlink.BpfFilter); ok && ids[ebpf.ProgramID(bf.Id)] {
						n++
					}
				}
			}
			return n
		}
		for _, at := range []ebpf.AttachType{ebpf.AttachTCXIngress, ebpf.AttachTCXEgress} {
			r, err := link.QueryPrograms(link.QueryOptions{Target: l.Attrs().Index, Attach: at})
			if err != nil {
				t.Fatal(err)
			}
			for _, p := range r.Programs {
				if ids[p.ID] {
					n++
				}
			}
		}
		return n
	}
	if n := hostLinks(a.HostVeth); n != 0 {
		t.Errorf("%d of the collector's programs on a's host end left out", n)
	}

	// Counted once: a's eth0 exact; its host end's counters (from before
	// a was observed) frozen.
	k0, o0 := onceRead(t, c, hostIno, []*podns.Pod{a}, []string{a.HostVeth, b.HostVeth})
	onceTraffic(t, a, b)
	k1, o1 := onceRead(t, c, hostIno, []*podns.Pod{a}, []string{a.HostVeth, b.HostVeth})
	assertDeltas(t, "a observed", k0, o0, k1, o1, []point{
		{inoA, "eth0", flow.TX}, {inoA, "eth0", flow.RX}, {hostIno, b.HostVeth, flow.TX}, {hostIno, b.HostVeth, flow.RX},
	})
	if o0[point{hostIno, a.HostVeth, flow.RX}] != o1[point{hostIno, a.HostVeth, flow.RX}] {
		t.Errorf("a's host end left out still counts: %+v then %+v", o0[point{hostIno, a.HostVeth, flow.RX}], o1[point{hostIno, a.HostVeth, flow.RX}])
	}

	// a removed: its host end observed again, exactly.
	c.Remove(inoA)
	if st, _ := hostEndPeer(c, hostIno, a.HostVeth); st != flow.StateAttached {
		t.Fatalf("a's host end once a is removed: %q, want attached", st)
	}
	if n := hostLinks(a.HostVeth); n != 2 {
		t.Errorf("%d of the collector's programs on a's host end once a is removed, want 2", n)
	}
	k0, o0 = onceRead(t, c, hostIno, nil, []string{a.HostVeth})
	onceTraffic(t, a, b)
	k1, o1 = onceRead(t, c, hostIno, nil, []string{a.HostVeth})
	assertDeltas(t, "a removed", k0, o0, k1, o1, []point{{hostIno, a.HostVeth, flow.TX}, {hostIno, a.HostVeth, flow.RX}})

	// A veth made in the host, one end moved into b (observed).
	inoB, err := c.Add(collector.Target{Name: b.Name, Path: b.NetnsPath})
	if err != nil {
		t.Fatal(err)
	}
	veth := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "once-th"}, PeerName: "once-tp"}
	if err := netlink.LinkAdd(veth); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if l, err := netlink.LinkByName("once-th"); err == nil {
			netlink.LinkDel(l)
		}
	})
	waitUntil(t, 5*time.Second, "both ends attached in the host", func() bool {
		s1, _ := hostEndPeer(c, hostIno, "once-th")
		s2, _ := hostEndPeer(c, hostIno, "once-tp")
		return s1 == flow.StateAttached && s2 == flow.StateAttached
	})
	tp, err := netlink.LinkByName("once-tp")
	if err != nil {
		t.Fatal(err)
	}
	hb, err := netns.GetFromPath(b.NetnsPath)
	if err != nil {
		t.Fatal(err)
	}
	defer hb.Close()
	if err := netlink.LinkSetNsFd(tp, int(hb)); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, 5*time.Second, "once-tp attached in b, once-th left out", func() bool {
		st, peer := hostEndPeer(c, hostIno, "once-th")
		return ifaceState(c, inoB, "once-tp") == flow.StateAttached && st == flow.StatePeerObserved && peer == b.Name+"/once-tp"
	})
	// Moved back: both ends in the host, both observed.
	nlb, err := b.Netlink()
	if err != nil {
		t.Fatal(err)
	}
	defer nlb.Close()
	tpb, err := nlb.LinkByName("once-tp")
	if err != nil {
		t.Fatal(err)
	}
	self, err := netns.Get()
	if err != nil {
		t.Fatal(err)
	}
	defer self.Close()
	if err := nlb.LinkSetNsFd(tpb, int(self)); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, 5*time.Second, "both ends observed in the host again", func() bool {
		s1, _ := hostEndPeer(c, hostIno, "once-th")
		s2, _ := hostEndPeer(c, hostIno, "once-tp")
		return s1 == flow.StateAttached && s2 == flow.StateAttached
	})
}
