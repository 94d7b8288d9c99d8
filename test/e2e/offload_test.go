package e2e

import (
	"bytes"
	"io"
	"net"
	"net/netip"
	"os/exec"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/link"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/nsflow/nsflow/collector"
	"github.com/nsflow/nsflow/collector/attach"
	"github.com/nsflow/nsflow/collector/flow"
	"github.com/nsflow/nsflow/test/podns"
	"github.com/nsflow/nsflow/test/testenv"
)

// Offloads: a GSO sk_buff that the device cannot take whole is segmented in
// software after the TC egress hook (validate_xmit_skb), and the device
// counts every segment. These tests change the offloads of the pods' eth0
// as an operator would (ethtool -K, ip link set ... gso_max_size) and
// require nsflow's per-interface packets and bytes to equal the kernel's
// counters exactly, both pods, both directions, TCX and clsact; and every
// flow's packets to add up to those totals (the pods resolve each other
// through permanent neighbour entries: no ARP, every frame is IP).

// offloadCase is one setting of the pods' offloads and the traffic that
// exercises it.
type offloadCase struct {
	name string
	// devices, if set, adds devices to the pods before nsflow attaches.
	devices func(t *testing.T, a, b *podns.Pod)
	// setup changes the pods' offloads before the traffic (nsflow is
	// already attached: it must follow the devices' features as they are).
	setup func(t *testing.T, a, b *podns.Pod)
	// traffic runs between a and b; nil means bulk TCP both ways, IPv4
	// from a to b and IPv6 from b to a.
	traffic func(t *testing.T, a, b *podns.Pod)
	// segmented: the kernel must have segmented a's egress GSO packets in
	// software (a's eth0 TX frames are all MTU-sized: the setting took
	// effect, and the test exercises what it claims).
	segmented bool
	// napiRX: the pods' eth0 receive through NAPI, where veth counts the
	// bytes of a frame without its Ethernet header (veth_xdp_rcv counts
	// skb->len after eth_type_trans pulled it): nsflow's RX bytes are the
	// kernel's + 14 per packet, as on lo.
	napiRX bool
	// vxlan: the pods have a VXLAN device vx0, which counts bytes without
	// the inner Ethernet header (nsflow's = the kernel's + 14 per packet,
	// as on lo); with mergedRX it also receives through GRO cells, which
	// merge the decapsulated segments after vxlan counted them and mark
	// no NAPI ID: nsflow's vx0 rx counts the merged packets, fewer.
	vxlan, mergedRX bool
}

// mtuFrame is the largest frame the pods' eth0 (MTU 1500) put on the wire.
const mtuFrame = 1500 + ethHeader

func offloadCases() []offloadCase {
	both := func(args ...string) func(t *testing.T, a, b *podns.Pod) {
		return func(t *testing.T, a, b *podns.Pod) {
			ethtoolK(t, a, args...)
			ethtoolK(t, b, args...)
		}
	}
	return []offloadCase{
		{name: "defaults"},
		{name: "tx-off", setup: both("tx", "off"), segmented: true},
		{name: "tso-off-gso-off", setup: both("tso", "off", "gso", "off"), segmented: true},
		{name: "gso-off", setup: both("gso", "off")},
		{name: "tso-off", setup: both("tso", "off"), segmented: true},
		{name: "gso-max-size", segmented: true, traffic: func(t *testing.T, a, b *podns.Pod) {
			// The socket sizes its GSO packets for the limit it saw when it
			// connected; lowering the limit on a connected socket makes the
			// device segment them in software (gso_features_check: len >= max).
			lowered := func() {
				for _, p := range []*podns.Pod{a, b} {
					setGSOMax(t, p, 16000, 0)
				}
			}
			tcpInPods(t, a, b, netip.AddrPortFrom(b.IPv4, 9300), 2<<20, lowered)
			tcpInPods(t, b, a, netip.AddrPortFrom(a.IPv6, 9301), 2<<20, nil)
		}},
		{name: "gso-max-segs", segmented: true, traffic: func(t *testing.T, a, b *podns.Pod) {
			lowered := func() {
				for _, p := range []*podns.Pod{a, b} {
					setGSOMax(t, p, 0, 4)
				}
			}
			tcpInPods(t, a, b, netip.AddrPortFrom(b.IPv4, 9302), 2<<20, lowered)
		}},
		{name: "udp-gso", traffic: func(t *testing.T, a, b *podns.Pod) {
			udpGSOInPods(t, a, b, netip.AddrPortFrom(b.IPv4, 9303), 1200, 8, 100)
			udpGSOInPods(t, b, a, netip.AddrPortFrom(a.IPv6, 9304), 1000, 16, 50)
		}},
		{name: "udp-gso-sw", setup: both("tx-udp-segmentation", "off"), segmented: true, traffic: func(t *testing.T, a, b *podns.Pod) {
			udpGSOInPods(t, a, b, netip.AddrPortFrom(b.IPv4, 9305), 1200, 8, 100)
			udpGSOInPods(t, b, a, netip.AddrPortFrom(a.IPv6, 9306), 1000, 16, 50)
		}},
		// TCP in a VXLAN tunnel between the pods: eth0 takes the
		// encapsulated GSO packets whole (its hw_enc_features), or, with
		// TSO off, segments them in software, each segment repeating the
		// outer and the inner headers.
		{name: "vxlan", vxlan: true, devices: addVXLAN, traffic: vxlanTraffic},
		{name: "vxlan-tso-off", vxlan: true, mergedRX: true, segmented: true, devices: addVXLAN, setup: both("tso", "off"), traffic: vxlanTraffic},
		// GRO at a receiving veth: the pod's eth0 with GRO on, fed by a
		// host-side peer that cannot do TSO: veth then receives through
		// NAPI, and GRO merges the segments before the ingress hook
		// (veth_skb_is_eligible_for_gro); the device counts them before.
		{name: "gro-receiver", napiRX: true, setup: func(t *testing.T, a, b *podns.Pod) {
			for _, p := range []*podns.Pod{a, b} {
				ethtoolK(t, p, "gro", "on")
				hostEthtoolK(t, p.HostVeth, "tso", "off")
			}
		}, traffic: func(t *testing.T, a, b *podns.Pod) {
			// GRO did merge: b's ingress sees frames above the MTU.
			merged := captureOne(t, b, "tcp and greater 3000")
			tcpInPods(t, a, b, netip.AddrPortFrom(b.IPv4, 9312), 2<<20, nil)
			if err := merged(); err != nil {
				t.Errorf("no GRO-merged frame at b's eth0: %v", err)
			}
			tcpInPods(t, b, a, netip.AddrPortFrom(a.IPv6, 9313), 2<<20, nil)
		}},
		// The pod's eth0 with GRO on, its host-side peer with TSO (the
		// default): veth passes GSO packets whole, nothing to merge.
		{name: "gro-receiver-tso-peer", setup: func(t *testing.T, a, b *podns.Pod) {
			ethtoolK(t, a, "gro", "on")
			ethtoolK(t, b, "gro", "on")
		}},
	}
}

func TestOffloads(t *testing.T) {
	testenv.RequireRoot(t)
	requireEthtool(t)
	for _, mode := range []attach.Mode{attach.ModeTCX, attach.ModeClsact} {
		for _, oc := range offloadCases() {
			t.Run(string(mode)+"/"+oc.name, func(t *testing.T) { testOffload(t, mode, oc) })
		}
	}
}

func testOffload(t *testing.T, mode attach.Mode, oc offloadCase) {
	pods := newPods(t, "10.213.160.0/24", "of-a", "of-b")
	a, b := pods[0], pods[1]
	staticNeighbours(t, a, b)
	if oc.devices != nil {
		oc.devices(t, a, b)
	}
	c, err := collector.New(collector.Config{Mode: mode})
	if err != nil {
		t.Fatalf("load: %v", err)
	}
	t.Cleanup(func() { c.Close() })
	paths := map[uint64]string{}
	for _, p := range pods {
		ino, err := c.Add(collector.Target{Name: p.Name, Path: p.NetnsPath})
		if err != nil {
			t.Fatalf("observe %s: %v", p.Name, err)
		}
		paths[ino] = p.NetnsPath
	}
	if c.Mode() != mode {
		t.Fatalf("attach mode %s, want %s", c.Mode(), mode)
	}
	if oc.setup != nil {
		oc.setup(t, a, b)
	}
	k0, ours0, _ := quiescentSnapshot(t, c, paths)
	if oc.traffic != nil {
		oc.traffic(t, a, b)
	} else {
		tcpInPods(t, a, b, netip.AddrPortFrom(b.IPv4, 9310), 2<<20, nil)
		tcpInPods(t, b, a, netip.AddrPortFrom(a.IPv6, 9311), 2<<20, nil)
	}
	k1, ours, snap := quiescentSnapshot(t, c, paths)
	kd, od := delta(k0, k1), delta(ours0, ours)
	for p, v := range kd {
		if oc.napiRX && p.iface == "eth0" && p.dir == flow.RX || oc.vxlan && p.iface == "vx0" {
			kd[p] = flow.Counters{Packets: v.Packets, Bytes: v.Bytes + ethHeader*v.Packets}
		}
		if oc.mergedRX && p.iface == "vx0" && p.dir == flow.RX {
			// The documented difference: fewer, never more.
			if got := od[p]; got.Packets == 0 || got.Packets >= v.Packets {
				t.Errorf("%s: nsflow %+v, kernel %+v: want fewer packets (GRO cells merged them)", p, got, v)
			}
			t.Logf("%s: nsflow %d packets, vxlan counted %d before GRO cells merged them", p, od[p].Packets, v.Packets)
			delete(kd, p)
			delete(od, p)
		}
	}
	assertExact(t, kd, od)

	inoA := inodeOf(t, a)
	tx := kd[point{inoA, "eth0", flow.TX}]
	if tx.Packets == 0 {
		t.Fatalf("no traffic left a's eth0: %+v", kd)
	}
	avg := tx.Bytes / tx.Packets
	if oc.segmented && avg > mtuFrame {
		t.Errorf("a's eth0 sent %d frames of %d bytes on average: the kernel did not segment (the setting did not take effect)", tx.Packets, avg)
	}
	if oc.name == "defaults" && avg <= mtuFrame {
		t.Errorf("defaults: a's eth0 sent %d frames of %d bytes on average, want GSO packets taken whole by the veth", tx.Packets, avg)
	}

	// Flows: every frame is IP, so the flows of each eth0 observation
	// point add up to its total, which equals the device's count (the
	// capture after segmentation).
	for ino := range paths {
		for _, dir := range []flow.Direction{flow.RX, flow.TX} {
			var sum flow.Counters
			for _, f := range snap.Flows {
				if f.NetnsInode == ino && f.Interface == "eth0" && f.Direction == dir {
					sum.Packets += f.Packets
					sum.Bytes += f.Bytes
				}
			}
			if p := (point{ino, "eth0", dir}); sum != ours[p] {
				t.Errorf("%s: flows add up to %+v, total %+v", p, sum, ours[p])
			}
		}
	}
	t.Logf("%s/%s: a eth0 tx %+v (avg %d B) rx %+v; b eth0 tx %+v rx %+v: equal to the kernel's", mode, oc.name,
		tx, avg, kd[point{inoA, "eth0", flow.RX}],
		kd[point{inodeOf(t, b), "eth0", flow.TX}], kd[point{inodeOf(t, b), "eth0", flow.RX}])
}

// quiescentSnapshot is quiescentRead that also returns the snapshot.
func quiescentSnapshot(t *testing.T, c *collector.Collector, paths map[uint64]string) (counts, counts, *flow.Snapshot) {
	t.Helper()
	for try := 0; try < 200; try++ {
		before := kernelCounts(t, paths)
		snap, err := c.Snapshot()
		if err != nil {
			t.Fatalf("snapshot: %v", err)
		}
		after := kernelCounts(t, paths)
		if equalCounts(before, after) {
			return after, nsflowCounts(snap, paths), snap
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Fatal("interfaces never quiet for one snapshot")
	return nil, nil, nil
}

// assertExact requires nsflow's deltas (od) to equal the kernel's (kd) at
// every observation point.
func assertExact(t *testing.T, kd, od counts) {
	t.Helper()
	for p, want := range kd {
		if got := od[p]; got != want {
			t.Errorf("%s: nsflow %+v, kernel %+v", p, got, want)
		}
	}
	for p := range od {
		if _, ok := kd[p]; !ok {
			t.Errorf("%s: counted by nsflow, unknown to the kernel", p)
		}
	}
}

func requireEthtool(t *testing.T) {
	t.Helper()
	if _, err := exec.LookPath("ethtool"); err != nil {
		t.Fatal("ethtool not installed (make deps installs it)")
	}
}

// ethtoolK runs `ethtool -K eth0 args...` inside pod p.
func ethtoolK(t *testing.T, p *podns.Pod, args ...string) {
	t.Helper()
	run(t, p, exec.Command("ethtool", append([]string{"-K", "eth0"}, args...)...))
}

// captureOne starts tcpdump on pod p's eth0 for one frame matching filter
// and returns a function that waits (5 s at most) for it to be captured.
func captureOne(t *testing.T, p *podns.Pod, filter string) func() error {
	t.Helper()
	cmd := exec.Command("timeout", "5", "tcpdump", "-i", "eth0", "-c", "1", "-nn", "-q", filter)
	stderr, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := p.Start(cmd); err != nil {
		t.Fatalf("tcpdump in %s: %v", p.Name, err)
	}
	buf := make([]byte, 4096)
	var got strings.Builder
	for !strings.Contains(got.String(), "listening on") {
		k, err := stderr.Read(buf)
		got.Write(buf[:k])
		if err != nil {
			cmd.Wait()
			t.Fatalf("tcpdump in %s did not start: %s", p.Name, got.String())
		}
	}
	return func() error {
		go io.Copy(io.Discard, stderr)
		return cmd.Wait()
	}
}

// hostEthtoolK runs `ethtool -K dev args...` on a host-side device the
// test created (a pod's host veth).
func hostEthtoolK(t *testing.T, dev string, args ...string) {
	t.Helper()
	if out, err := exec.Command("ethtool", append([]string{"-K", dev}, args...)...).CombinedOutput(); err != nil {
		t.Fatalf("ethtool -K %s %v: %v\n%s", dev, args, err, out)
	}
}

// setGSOMax lowers eth0's GSO size limit (IPv6 and IPv4) or segment limit
// in pod p (0: leave it).
func setGSOMax(t *testing.T, p *podns.Pod, size, segs int) {
	t.Helper()
	nl, err := p.Netlink()
	if err != nil {
		t.Fatal(err)
	}
	defer nl.Close()
	l, err := nl.LinkByName("eth0")
	if err != nil {
		t.Fatal(err)
	}
	if size > 0 {
		if err := nl.LinkSetGSOMaxSize(l, size); err != nil {
			t.Fatalf("%s: gso_max_size %d: %v", p.Name, size, err)
		}
		if err := nl.LinkSetGSOIPv4MaxSize(l, size); err != nil {
			t.Fatalf("%s: gso_ipv4_max_size %d: %v", p.Name, size, err)
		}
	}
	if segs > 0 {
		if err := nl.LinkSetGSOMaxSegs(l, segs); err != nil {
			t.Fatalf("%s: gso_max_segs %d: %v", p.Name, segs, err)
		}
	}
}

// staticNeighbours gives each pod a permanent neighbour entry for the
// other's IPv4 address: no ARP crosses eth0, so every frame is in a flow.
func staticNeighbours(t *testing.T, pods ...*podns.Pod) {
	t.Helper()
	macs := map[*podns.Pod]net.HardwareAddr{}
	for _, p := range pods {
		nl, err := p.Netlink()
		if err != nil {
			t.Fatal(err)
		}
		l, err := nl.LinkByName("eth0")
		nl.Close()
		if err != nil {
			t.Fatal(err)
		}
		macs[p] = l.Attrs().HardwareAddr
	}
	for _, p := range pods {
		nl, err := p.Netlink()
		if err != nil {
			t.Fatal(err)
		}
		l, err := nl.LinkByName("eth0")
		if err != nil {
			nl.Close()
			t.Fatal(err)
		}
		for _, q := range pods {
			if q == p {
				continue
			}
			n := &netlink.Neigh{LinkIndex: l.Attrs().Index, Family: unix.AF_INET, State: netlink.NUD_PERMANENT,
				IP: net.IP(q.IPv4.AsSlice()), HardwareAddr: macs[q]}
			if err := nl.NeighSet(n); err != nil {
				nl.Close()
				t.Fatalf("%s: neighbour %s: %v", p.Name, q.IPv4, err)
			}
		}
		nl.Close()
	}
}

// The pods' VXLAN addresses (addVXLAN).
var vxlanAddrs = []netip.Addr{netip.MustParseAddr("10.213.166.2"), netip.MustParseAddr("10.213.166.3")}

func vxlanTraffic(t *testing.T, a, b *podns.Pod) {
	tcpInPods(t, a, b, netip.AddrPortFrom(vxlanAddrs[1], 9314), 2<<20, nil)
	tcpInPods(t, b, a, netip.AddrPortFrom(vxlanAddrs[0], 9315), 2<<20, nil)
}

// addVXLAN adds a VXLAN device vx0 (VNI 42) to pods a and b, each with the
// other's eth0 address as its remote, addresses from vxlanAddrs and
// permanent neighbour entries for each other.
func addVXLAN(t *testing.T, a, b *podns.Pod) {
	t.Helper()
	pods := []*podns.Pod{a, b}
	macs := make([]net.HardwareAddr, 2)
	for i, p := range pods {
		nl, err := p.Netlink()
		if err != nil {
			t.Fatal(err)
		}
		eth0, err := nl.LinkByName("eth0")
		if err == nil {
			err = nl.LinkAdd(&netlink.Vxlan{LinkAttrs: netlink.LinkAttrs{Name: "vx0"}, VxlanId: 42,
				VtepDevIndex: eth0.Attrs().Index, Group: net.IP(pods[1-i].IPv4.AsSlice()), Port: 4789})
		}
		var l netlink.Link
		if err == nil {
			l, err = nl.LinkByName("vx0")
		}
		if err == nil {
			err = nl.AddrAdd(l, &netlink.Addr{IPNet: &net.IPNet{IP: net.IP(vxlanAddrs[i].AsSlice()), Mask: net.CIDRMask(24, 32)}})
		}
		if err == nil {
			err = nl.LinkSetUp(l)
		}
		nl.Close()
		if err != nil {
			t.Fatalf("%s: vxlan: %v", p.Name, err)
		}
		macs[i] = l.Attrs().HardwareAddr
	}
	for i, p := range pods {
		nl, err := p.Netlink()
		if err != nil {
			t.Fatal(err)
		}
		l, err := nl.LinkByName("vx0")
		if err == nil {
			err = nl.NeighSet(&netlink.Neigh{LinkIndex: l.Attrs().Index, Family: unix.AF_INET, State: netlink.NUD_PERMANENT,
				IP: net.IP(vxlanAddrs[1-i].AsSlice()), HardwareAddr: macs[1-i]})
		}
		nl.Close()
		if err != nil {
			t.Fatalf("%s: vxlan neighbour: %v", p.Name, err)
		}
	}
}

// tcpInPods streams n bytes over TCP from a socket of this process in pod
// from to a listener in pod to; once connected, before the first byte, it
// calls connected if set. It checks that every byte arrived.
func tcpInPods(t *testing.T, from, to *podns.Pod, dst netip.AddrPort, n int, connected func()) {
	t.Helper()
	var ln net.Listener
	if err := to.Do(func() (err error) {
		ln, err = net.Listen("tcp", dst.String())
		return err
	}); err != nil {
		t.Fatalf("listen %s: %v", dst, err)
	}
	defer ln.Close()
	deadline := time.Now().Add(20 * time.Second)
	ln.(*net.TCPListener).SetDeadline(deadline)
	var got int64
	var rerr error
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		c, err := ln.Accept()
		if err != nil {
			rerr = err
			return
		}
		defer c.Close()
		c.SetDeadline(deadline)
		got, rerr = io.Copy(io.Discard, c)
	}()
	var conn net.Conn
	if err := from.Do(func() (err error) {
		conn, err = net.DialTimeout("tcp", dst.String(), 5*time.Second)
		return err
	}); err != nil {
		t.Fatalf("dial %s: %v", dst, err)
	}
	conn.SetDeadline(deadline)
	if connected != nil {
		connected()
	}
	buf := bytes.Repeat([]byte{'n'}, 64<<10)
	for sent := 0; sent < n; {
		k := min(n-sent, len(buf))
		if _, err := conn.Write(buf[:k]); err != nil {
			t.Fatalf("tcp %s: write: %v", dst, err)
		}
		sent += k
	}
	if err := conn.Close(); err != nil {
		t.Fatalf("tcp %s: close: %v", dst, err)
	}
	wg.Wait()
	if rerr != nil || got != int64(n) {
		t.Fatalf("tcp %s: %d of %d bytes arrived: %v", dst, got, n, rerr)
	}
}

// udpGSOInPods sends sends UDP GSO buffers (UDP_SEGMENT: segs datagrams of
// size bytes each per send) from pod from to a socket of this process in
// pod to, and waits for the datagrams, which the receiver gets one by one.
func udpGSOInPods(t *testing.T, from, to *podns.Pod, dst netip.AddrPort, size, segs, sends int) {
	t.Helper()
	var rc *net.UDPConn
	if err := to.Do(func() (err error) {
		rc, err = net.ListenUDP("udp", net.UDPAddrFromAddrPort(dst))
		return err
	}); err != nil {
		t.Fatalf("listen udp %s: %v", dst, err)
	}
	defer rc.Close()
	rc.SetReadBuffer(8 << 20)
	var sc *net.UDPConn
	if err := from.Do(func() (err error) {
		sc, err = net.DialUDP("udp", nil, net.UDPAddrFromAddrPort(dst))
		return err
	}); err != nil {
		t.Fatalf("dial udp %s: %v", dst, err)
	}
	defer sc.Close()
	raw, err := sc.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var serr error
	if err := raw.Control(func(fd uintptr) {
		serr = unix.SetsockoptInt(int(fd), unix.IPPROTO_UDP, unix.UDP_SEGMENT, size)
	}); err != nil || serr != nil {
		t.Fatalf("UDP_SEGMENT: %v %v", err, serr)
	}
	want := segs * sends
	var got int
	done := make(chan struct{})
	go func() {
		defer close(done)
		buf := make([]byte, 65536)
		rc.SetReadDeadline(time.Now().Add(10 * time.Second))
		for got < want {
			k, err := rc.Read(buf)
			if err != nil {
				return
			}
			if k != size {
				return
			}
			got++
		}
	}()
	payload := make([]byte, size*segs)
	for i := 0; i < sends; i++ {
		if _, err := sc.Write(payload); err != nil {
			t.Fatalf("udp gso %s: send %d: %v", dst, i, err)
		}
		if i%10 == 9 {
			time.Sleep(time.Millisecond) // let the receiver keep up
		}
	}
	<-done
	if got != want {
		t.Fatalf("udp gso %s: %d of %d datagrams of %d bytes arrived", dst, got, want, size)
	}
}

// TestOffloadsLive: offloads changed while `nsflow serve` runs (on, off,
// on again, traffic in each phase): every phase is exact in /metrics.
func TestOffloadsLive(t *testing.T) {
	testenv.RequireRoot(t)
	requireEthtool(t)
	srv := startServe(t, "http", "--netns.host=false", "--netns.include", "^of-sv-")
	pods := newPods(t, "10.213.161.0/24", "of-sv-a", "of-sv-b")
	a, b := pods[0], pods[1]
	byIno := map[uint64]*podns.Pod{inodeOf(t, a): a, inodeOf(t, b): b}
	waitUntil(t, 10*time.Second, "both pods' eth0 in /metrics", func() bool {
		s, _ := srv.scrape(t)
		for _, p := range pods {
			if _, ok := s[pointSeries("nsflow_packets_total", p.Name, "eth0", "tx")]; !ok {
				return false
			}
		}
		return true
	})
	inoA := inodeOf(t, a)
	port := uint16(9320)
	for _, phase := range []struct {
		name      string
		ethtool   []string
		segmented bool
	}{
		{"on", nil, false},
		{"off", []string{"tx", "off", "tso", "off", "gso", "off"}, true},
		{"on-again", []string{"tx", "on", "tso", "on", "gso", "on"}, false},
	} {
		if phase.ethtool != nil {
			for _, p := range pods {
				ethtoolK(t, p, phase.ethtool...)
			}
		}
		k0, s0, _ := quiescentScrape(t, srv, byIno)
		tcpInPods(t, a, b, netip.AddrPortFrom(b.IPv4, port), 2<<20, nil)
		tcpInPods(t, b, a, netip.AddrPortFrom(a.IPv6, port+1), 2<<20, nil)
		port += 2
		k1, s1, _ := quiescentScrape(t, srv, byIno)
		kd, sd := delta(k0, k1), delta(s0, s1)
		for p, want := range kd {
			if got, ok := sd[p]; !ok || got != want {
				t.Errorf("phase %s: %s: /metrics %+v, kernel %+v", phase.name, p, got, want)
			}
		}
		tx := kd[point{inoA, "eth0", flow.TX}]
		if tx.Packets == 0 {
			t.Fatalf("phase %s: no traffic", phase.name)
		}
		if avg := tx.Bytes / tx.Packets; phase.segmented != (avg <= mtuFrame) {
			t.Errorf("phase %s: a's eth0 frames of %d bytes on average: segmented %v, want %v", phase.name, avg, avg <= mtuFrame, phase.segmented)
		}
		t.Logf("phase %s: a eth0 tx %+v, b eth0 rx %+v: /metrics equal to the kernel's", phase.name, tx, kd[point{inodeOf(t, b), "eth0", flow.RX}])
	}
}

// TestOffloadsQdiscDrops: a qdisc on a pod's eth0 that drops (a tiny tbf)
// drops after the egress hook: nsflow counts every packet handed to the
// device, which transmits (and counts) only those the qdisc let through.
// The relation: nsflow TX = device TX + the qdisc's drops, in packets and
// in bytes (all the dropped frames are the test's datagrams), once the
// queue is empty.
func TestOffloadsQdiscDrops(t *testing.T) {
	testenv.RequireRoot(t)
	pods := newPods(t, "10.213.162.0/24", "of-q-a", "of-q-b")
	a, b := pods[0], pods[1]
	staticNeighbours(t, a, b)
	for _, mode := range []attach.Mode{attach.ModeTCX, attach.ModeClsact} {
		t.Run(string(mode), func(t *testing.T) { testQdiscDrops(t, mode, a, b) })
	}
}

func testQdiscDrops(t *testing.T, mode attach.Mode, a, b *podns.Pod) {
	c, err := collector.New(collector.Config{Mode: mode})
	if err != nil {
		t.Fatalf("load: %v", err)
	}
	defer c.Close()
	paths := map[uint64]string{}
	for _, p := range []*podns.Pod{a, b} {
		ino, err := c.Add(collector.Target{Name: p.Name, Path: p.NetnsPath})
		if err != nil {
			t.Fatalf("observe %s: %v", p.Name, err)
		}
		paths[ino] = p.NetnsPath
	}
	nl, err := a.Netlink()
	if err != nil {
		t.Fatal(err)
	}
	defer nl.Close()
	eth0, err := nl.LinkByName("eth0")
	if err != nil {
		t.Fatal(err)
	}
	// 1 Mbit/s, a 2 KB bucket, 4 KB of queue: a burst of 1 KB datagrams
	// overflows it at once.
	run(t, a, exec.Command("tc", "qdisc", "replace", "dev", "eth0", "root", "handle", "1:", "tbf",
		"rate", "1mbit", "burst", "2kb", "limit", "4kb"))
	t.Cleanup(func() {
		out, err := exec.Command("ip", "netns", "exec", podNetnsName(a), "tc", "qdisc", "del", "dev", "eth0", "root").CombinedOutput()
		if err != nil && !strings.Contains(string(out), "Cannot find device") {
			t.Logf("remove tbf: %v %s", err, out)
		}
	})
	drops0 := qdiscDrops(t, nl, eth0.Attrs().Index)
	k0, ours0, _ := quiescentSnapshot(t, c, paths)

	const n, size = 200, 1000
	var sc *net.UDPConn
	dst := netip.AddrPortFrom(b.IPv4, 9330)
	if err := a.Do(func() (err error) {
		sc, err = net.DialUDP("udp", nil, net.UDPAddrFromAddrPort(dst))
		return err
	}); err != nil {
		t.Fatal(err)
	}
	payload := make([]byte, size)
	for i := 0; i < n; i++ {
		sc.Write(payload) // drops are silent (no IP_RECVERR)
	}
	sc.Close()
	// The queue drains at 1 Mbit/s: 4 KB in 33 ms.
	waitUntil(t, 5*time.Second, "tbf queue empty", func() bool { return qdiscBacklog(t, nl, eth0.Attrs().Index) == 0 })
	k1, ours1, _ := quiescentSnapshot(t, c, paths)
	drops := qdiscDrops(t, nl, eth0.Attrs().Index) - drops0
	kd, od := delta(k0, k1), delta(ours0, ours1)
	p := point{inodeOf(t, a), "eth0", flow.TX}
	frame := uint64(size + udpHeader + ipv4Header + ethHeader)
	want := flow.Counters{Packets: kd[p].Packets + drops, Bytes: kd[p].Bytes + drops*frame}
	if drops == 0 || od[p] != want {
		t.Errorf("%s: nsflow %+v, device %+v, qdisc drops %d: want nsflow = device + drops = %+v", p, od[p], kd[p], drops, want)
	}
	// Every other point is exact.
	t.Logf("%s: nsflow a eth0 tx %+v = device %+v + %d qdisc drops of %d-byte frames", mode, od[p], kd[p], drops, frame)
	delete(kd, p)
	delete(od, p)
	assertExact(t, kd, od)
}

// podNetnsName is the name of pod p's namespace under /run/netns.
func podNetnsName(p *podns.Pod) string {
	return p.NetnsPath[strings.LastIndex(p.NetnsPath, "/")+1:]
}

func qdiscStats(t *testing.T, nl *netlink.Handle, index int) *netlink.QdiscStatistics {
	t.Helper()
	link, err := nl.LinkByIndex(index)
	if err != nil {
		t.Fatal(err)
	}
	qs, err := nl.QdiscList(link)
	if err != nil {
		t.Fatal(err)
	}
	for _, q := range qs {
		if q.Attrs().Parent == netlink.HANDLE_ROOT && q.Type() == "tbf" {
			if q.Attrs().Statistics == nil {
				t.Fatal("tbf without statistics")
			}
			return q.Attrs().Statistics
		}
	}
	t.Fatalf("no tbf on link %d", index)
	return nil
}

func qdiscDrops(t *testing.T, nl *netlink.Handle, index int) uint64 {
	return uint64(qdiscStats(t, nl, index).Queue.Drops)
}

func qdiscBacklog(t *testing.T, nl *netlink.Handle, index int) uint32 {
	return qdiscStats(t, nl, index).Queue.Backlog
}

// TestOffloadsXDPDrop: packets dropped before the ingress hook (here by an
// XDP program on the pod's eth0) are counted by the device and not by
// nsflow: nsflow RX = device RX - the dropped packets. With an XDP program
// a veth receives through NAPI, so its rx bytes leave the Ethernet header
// out (as in TestOffloads' gro-receiver): nsflow RX bytes = device RX bytes
// + 14 x the packets nsflow saw - the dropped frames' bytes as the device
// counted them (without their header).
func TestOffloadsXDPDrop(t *testing.T) {
	testenv.RequireRoot(t)
	pods := newPods(t, "10.213.163.0/24", "of-x-a", "of-x-b")
	a, b := pods[0], pods[1]
	staticNeighbours(t, a, b)
	const dropped, passed, dropSize, passSize = 50, 30, 333, 200
	dropFrame := uint64(dropSize + udpHeader + ipv4Header + ethHeader)
	// Drops the frames of exactly dropFrame bytes, passes the others.
	xdp, err := ebpf.NewProgram(&ebpf.ProgramSpec{Type: ebpf.XDP, License: "GPL",
		Instructions: asm.Instructions{
			asm.LoadMem(asm.R2, asm.R1, 4, asm.Word), // data_end
			asm.LoadMem(asm.R3, asm.R1, 0, asm.Word), // data
			asm.Sub.Reg(asm.R2, asm.R3),
			asm.Mov.Imm(asm.R0, 2), // XDP_PASS
			asm.JNE.Imm(asm.R2, int32(dropFrame), "out"),
			asm.Mov.Imm(asm.R0, 1), // XDP_DROP
			asm.Return().WithSymbol("out"),
		}})
	if err != nil {
		t.Fatal(err)
	}
	defer xdp.Close()
	var xl link.Link
	if err := b.Do(func() error {
		i, err := net.InterfaceByName("eth0")
		if err != nil {
			return err
		}
		xl, err = link.AttachXDP(link.XDPOptions{Program: xdp, Interface: i.Index})
		return err
	}); err != nil {
		t.Fatalf("attach XDP to %s eth0: %v", b.Name, err)
	}
	defer xl.Close()
	for _, mode := range []attach.Mode{attach.ModeTCX, attach.ModeClsact} {
		t.Run(string(mode), func(t *testing.T) {
			c, err := collector.New(collector.Config{Mode: mode})
			if err != nil {
				t.Fatalf("load: %v", err)
			}
			defer c.Close()
			paths := map[uint64]string{}
			for _, p := range pods {
				ino, err := c.Add(collector.Target{Name: p.Name, Path: p.NetnsPath})
				if err != nil {
					t.Fatalf("observe %s: %v", p.Name, err)
				}
				paths[ino] = p.NetnsPath
			}
			k0, ours0, _ := quiescentSnapshot(t, c, paths)
			dst := netip.AddrPortFrom(b.IPv4, 9340)
			var rc *net.UDPConn
			if err := b.Do(func() (err error) {
				rc, err = net.ListenUDP("udp", net.UDPAddrFromAddrPort(dst))
				return err
			}); err != nil {
				t.Fatal(err)
			}
			defer rc.Close()
			var sc *net.UDPConn
			if err := a.Do(func() (err error) {
				sc, err = net.DialUDP("udp", nil, net.UDPAddrFromAddrPort(dst))
				return err
			}); err != nil {
				t.Fatal(err)
			}
			for i := 0; i < dropped+passed; i++ {
				size := dropSize // alternating, then the rest of the dropped (passed <= dropped)
				if i%2 == 1 && i/2 < passed {
					size = passSize
				}
				if _, err := sc.Write(make([]byte, size)); err != nil {
					t.Fatal(err)
				}
			}
			sc.Close()
			k1, ours1, _ := quiescentSnapshot(t, c, paths)
			kd, od := delta(k0, k1), delta(ours0, ours1)
			p := point{inodeOf(t, b), "eth0", flow.RX}
			seen := od[p].Packets
			want := flow.Counters{Packets: kd[p].Packets - dropped,
				Bytes: kd[p].Bytes + ethHeader*seen - dropped*(dropFrame-ethHeader)}
			if kd[p].Packets < dropped || od[p] != want {
				t.Errorf("%s: nsflow %+v, device %+v, %d dropped by XDP: want %+v", p, od[p], kd[p], dropped, want)
			}
			t.Logf("%s: b eth0 rx: nsflow %+v, device %+v, %d dropped by XDP before the hook", mode, od[p], kd[p], dropped)
			delete(kd, p)
			delete(od, p)
			assertExact(t, kd, od)
		})
	}
}
