package e2e

import (
	"bufio"
	"errors"
	"io"
	"net"
	"net/netip"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/nsflow/nsflow/collector"
	"github.com/nsflow/nsflow/collector/attach"
	"github.com/nsflow/nsflow/collector/flow"
	"github.com/nsflow/nsflow/test/podns"
	"github.com/nsflow/nsflow/test/testenv"
)

// Header sizes for the expected byte counts of UDP flows.
const (
	ipv4Header = 20
	ipv6Header = 40
	udpHeader  = 8
)

// newPods creates pods in a subnet of their own and deletes them when the
// test ends, pass or fail.
func newPods(t *testing.T, subnet string, names ...string) []*podns.Pod {
	t.Helper()
	var pods []*podns.Pod
	for _, name := range names {
		p, err := podns.Create(podns.Config{}, name, podns.Options{Subnet: netip.MustParsePrefix(subnet)})
		if err != nil {
			t.Fatalf("create pod %s: %v", name, err)
		}
		t.Cleanup(func() {
			if _, err := podns.Delete(podns.Config{}, name); err != nil {
				t.Errorf("delete pod %s: %v", name, err)
			}
		})
		pods = append(pods, p)
	}
	return pods
}

func TestPacketPath(t *testing.T) {
	testenv.RequireRoot(t)
	pods := newPods(t, "10.213.100.0/24", "e2e-pp-a", "e2e-pp-b")
	for _, mode := range []attach.Mode{attach.ModeTCX, attach.ModeClsact} {
		t.Run(string(mode), func(t *testing.T) { testPacketPath(t, mode, pods[0], pods[1]) })
	}
}

func testPacketPath(t *testing.T, mode attach.Mode, a, b *podns.Pod) {
	c, err := collector.New(collector.Config{Mode: mode})
	if err != nil {
		t.Fatalf("load: %v", err)
	}
	closed := false
	t.Cleanup(func() {
		if !closed {
			c.Close()
		}
	})
	paths := map[uint64]string{}
	for _, p := range []*podns.Pod{a, b} {
		ino, err := c.Add(collector.Target{Name: p.Name, Path: p.NetnsPath})
		if err != nil {
			t.Fatalf("observe %s: %v", p.Name, err)
		}
		paths[ino] = p.NetnsPath
	}
	inoA, inoB := inodeOf(t, a), inodeOf(t, b)
	if c.Mode() != mode {
		t.Fatalf("attach mode %s, want %s", c.Mode(), mode)
	}

	k0, c0 := quiescentRead(t, c, paths)

	// Traffic: ICMP, UDP and TCP between the pods over IPv4 and IPv6, and
	// TCP and UDP between two processes of pod a over its loopback.
	run(t, a, exec.Command("ping", "-c", "5", "-i", "0.05", "-W", "2", b.IPv4.String()))
	run(t, a, exec.Command("ping", "-6", "-c", "5", "-i", "0.05", "-W", "2", b.IPv6.String()))
	udpExchange(t, a, b, netip.AddrPortFrom(b.IPv4, 9000), 40, 100)
	udpExchange(t, a, b, netip.AddrPortFrom(b.IPv6, 9001), 20, 200)
	tcpExchange(t, a, b, netip.AddrPortFrom(b.IPv4, 9002), 1<<20)
	tcpExchange(t, a, a, netip.MustParseAddrPort("127.0.0.1:9100"), 256<<10)
	udpExchange(t, a, a, netip.MustParseAddrPort("127.0.0.1:9101"), 30, 64)
	udpExchange(t, a, a, netip.MustParseAddrPort("[::1]:9102"), 20, 300)

	k1, c1 := quiescentRead(t, c, paths)
	kd, cd := delta(k0, k1), delta(c0, c1)

	// 1. Every observation point matches the kernel's own counters exactly.
	for p, want := range kd {
		if got := cd[p]; got != want {
			t.Errorf("%s: nsflow %+v, kernel %+v", p, got, want)
		}
	}
	for p := range cd {
		if _, ok := kd[p]; !ok {
			t.Errorf("%s: counted by nsflow, unknown to the kernel", p)
		}
	}
	for _, p := range []point{{inoA, "lo", flow.TX}, {inoA, "eth0", flow.TX}, {inoB, "eth0", flow.RX}} {
		if kd[p].Packets == 0 {
			t.Errorf("%s: no traffic seen: the test sent none?", p)
		}
	}
	t.Logf("%s: pod a lo %+v/%+v eth0 %+v/%+v; pod b lo %+v eth0 %+v/%+v (rx/tx, equal to the kernel's)", mode,
		cd[point{inoA, "lo", flow.RX}], cd[point{inoA, "lo", flow.TX}],
		cd[point{inoA, "eth0", flow.RX}], cd[point{inoA, "eth0", flow.TX}],
		cd[point{inoB, "lo", flow.RX}], cd[point{inoB, "eth0", flow.RX}], cd[point{inoB, "eth0", flow.TX}])

	// 2. Flows match the traffic the test sent.
	snap, err := c.Snapshot()
	if err != nil {
		t.Fatal(err)
	}
	flows := snap.Flows
	expect := func(ino uint64, iface string, dir flow.Direction, proto string, src, dst netip.Addr, sport, dport int, packets, bytes uint64) {
		t.Helper()
		var got []flow.Flow
		for _, f := range flows {
			if f.NetnsInode == ino && f.Interface == iface && f.Direction == dir && f.Protocol.String() == proto &&
				f.Src == src && f.Dst == dst && (sport < 0 || int(f.SrcPort) == sport) && int(f.DstPort) == dport {
				got = append(got, f)
			}
		}
		if len(got) != 1 {
			t.Errorf("flow %d/%s/%s %s %s:%d > %s:%d: found %d, want 1", ino, iface, dir, proto, src, sport, dst, dport, len(got))
			return
		}
		if got[0].Packets != packets || (bytes != 0 && got[0].Bytes != bytes) {
			t.Errorf("flow %d/%s/%s %s %s > %s:%d: %d packets %d bytes, want %d packets %d bytes",
				ino, iface, dir, proto, src, dst, dport, got[0].Packets, got[0].Bytes, packets, bytes)
		}
	}
	// ping: echo request (type 8 / 128) out of a and into b, 5 each; replies back.
	expect(inoA, "eth0", flow.TX, "icmp", a.IPv4, b.IPv4, 8, 0, 5, 5*(84+ethHeader))
	expect(inoB, "eth0", flow.RX, "icmp", a.IPv4, b.IPv4, 8, 0, 5, 5*(84+ethHeader))
	expect(inoB, "eth0", flow.TX, "icmp", b.IPv4, a.IPv4, 0, 0, 5, 5*(84+ethHeader))
	expect(inoA, "eth0", flow.TX, "icmpv6", a.IPv6, b.IPv6, 128, 0, 5, 5*(104+ethHeader))
	expect(inoA, "eth0", flow.RX, "icmpv6", b.IPv6, a.IPv6, 129, 0, 5, 5*(104+ethHeader))
	// UDP datagrams, exactly as sent, on both ends of the wire.
	for _, ino := range []uint64{inoA, inoB} {
		dir := flow.TX
		if ino == inoB {
			dir = flow.RX
		}
		expect(ino, "eth0", dir, "udp", a.IPv4, b.IPv4, -1, 9000, 40, 40*(100+udpHeader+ipv4Header+ethHeader))
		expect(ino, "eth0", dir, "udp", a.IPv6, b.IPv6, -1, 9001, 20, 20*(200+udpHeader+ipv6Header+ethHeader))
	}
	// Loopback between two processes of pod a: seen leaving and entering lo.
	lo4, lo6 := netip.MustParseAddr("127.0.0.1"), netip.MustParseAddr("::1")
	for _, dir := range []flow.Direction{flow.TX, flow.RX} {
		expect(inoA, "lo", dir, "udp", lo4, lo4, -1, 9101, 30, 30*(64+udpHeader+ipv4Header+ethHeader))
		expect(inoA, "lo", dir, "udp", lo6, lo6, -1, 9102, 20, 20*(300+udpHeader+ipv6Header+ethHeader))
	}
	// TCP: the handshake, the data and the close are all in the flow.
	for _, f := range []struct {
		ino   uint64
		iface string
		src   netip.Addr
		dst   netip.AddrPort
		min   uint64
	}{{inoA, "eth0", a.IPv4, netip.AddrPortFrom(b.IPv4, 9002), 1 << 20}, {inoA, "lo", lo4, netip.MustParseAddrPort("127.0.0.1:9100"), 256 << 10}} {
		found := false
		for _, fl := range flows {
			if fl.NetnsInode == f.ino && fl.Interface == f.iface && fl.Direction == flow.TX && fl.Protocol.String() == "tcp" &&
				fl.Src == f.src && fl.Dst == f.dst.Addr() && fl.DstPort == f.dst.Port() {
				found = true
				if fl.Bytes < f.min {
					t.Errorf("tcp flow to %s: %d bytes, want at least %d", f.dst, fl.Bytes, f.min)
				}
				if fl.TCPFlags.String() == "" || !strings.Contains(fl.TCPFlags.String(), "SYN") || !strings.Contains(fl.TCPFlags.String(), "FIN") {
					t.Errorf("tcp flow to %s: flags %s, want SYN and FIN among them", f.dst, fl.TCPFlags)
				}
			}
		}
		if !found {
			t.Errorf("no tcp flow %s > %s on %s", f.src, f.dst, f.iface)
		}
	}
	// 3. On lo (no ARP, no neighbour discovery) every packet is in a flow:
	// the flows of an observation point add up to its exact total.
	for _, dir := range []flow.Direction{flow.TX, flow.RX} {
		var sum flow.Counters
		for _, f := range flows {
			if f.NetnsInode == inoA && f.Interface == "lo" && f.Direction == dir {
				sum.Packets += f.Packets
				sum.Bytes += f.Bytes
			}
		}
		total := nsflowCounts(snap, paths)[point{inoA, "lo", dir}]
		if sum != total {
			t.Errorf("pod a lo %s: flows add up to %+v, total is %+v", dir, sum, total)
		}
	}
	if snap.Stats.FlowsEvicted != 0 || snap.Stats.FlowInsertErrors != 0 || snap.Stats.TotalsFull != 0 {
		t.Errorf("nothing may be lost at this scale: %+v", snap.Stats)
	}

	// 4. Closing detaches everything: the programs are gone from the kernel
	// and no nsflow filter or qdisc remains in the pods.
	ids := c.ProgramIDs()
	closed = true
	if err := c.Close(); err != nil {
		t.Fatalf("close: %v", err)
	}
	assertProgramsGone(t, ids)
	for _, p := range []*podns.Pod{a, b} {
		assertNoClsact(t, p)
	}
}

// run runs cmd inside pod p and fails the test if it fails.
func run(t *testing.T, p *podns.Pod, cmd *exec.Cmd) {
	t.Helper()
	var out strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := p.Start(cmd); err != nil {
		t.Fatalf("start %v in %s: %v", cmd.Args, p.Name, err)
	}
	if err := cmd.Wait(); err != nil {
		t.Fatalf("%v in %s: %v\n%s", cmd.Args, p.Name, err, out.String())
	}
}

// udpExchange sends n datagrams of size bytes from a helper process in pod
// from to a socket of this process opened inside pod to, and checks that
// all of them arrived.
func udpExchange(t *testing.T, from, to *podns.Pod, dst netip.AddrPort, n, size int) {
	t.Helper()
	var conn *net.UDPConn
	if err := to.Do(func() (err error) {
		conn, err = net.ListenUDP("udp", net.UDPAddrFromAddrPort(dst))
		return err
	}); err != nil {
		t.Fatalf("listen udp %s in %s: %v", dst, to.Name, err)
	}
	defer conn.Close()
	conn.SetReadBuffer(1 << 20)
	run(t, from, helperCmd("udp-send", dst.String(), strconv.Itoa(n), strconv.Itoa(size)))
	conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	buf := make([]byte, 65536)
	for i := 0; i < n; i++ {
		k, err := conn.Read(buf)
		if err != nil {
			t.Fatalf("udp %s: received %d of %d datagrams: %v", dst, i, n, err)
		}
		if k != size {
			t.Fatalf("udp %s: datagram of %d bytes, want %d", dst, k, size)
		}
	}
}

// tcpExchange streams bytes over TCP from a helper process in pod from to a
// helper process in pod to (two "containers" when from == to).
func tcpExchange(t *testing.T, from, to *podns.Pod, dst netip.AddrPort, bytes int) {
	t.Helper()
	sink := helperCmd("tcp-sink", dst.String())
	stdout, err := sink.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := to.Start(sink); err != nil {
		t.Fatalf("start tcp sink in %s: %v", to.Name, err)
	}
	lines := bufio.NewScanner(stdout)
	if !lines.Scan() || lines.Text() != "listening" {
		sink.Process.Kill()
		sink.Wait()
		t.Fatalf("tcp sink in %s did not start", to.Name)
	}
	var wg sync.WaitGroup
	var got string
	wg.Add(1)
	go func() {
		defer wg.Done()
		if lines.Scan() {
			got = lines.Text()
		}
		io.Copy(io.Discard, stdout)
	}()
	run(t, from, helperCmd("tcp-send", dst.String(), strconv.Itoa(bytes)))
	wg.Wait()
	if err := sink.Wait(); err != nil {
		t.Fatalf("tcp sink: %v", err)
	}
	if got != strconv.Itoa(bytes) {
		t.Fatalf("tcp %s: sink read %q bytes, want %d", dst, got, bytes)
	}
}

func inodeOf(t *testing.T, p *podns.Pod) uint64 {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Stat(p.NetnsPath, &st); err != nil {
		t.Fatal(err)
	}
	return st.Ino
}

// assertNoClsact checks that no nsflow filter, and no qdisc nsflow created,
// remains on the pod's interfaces.
func assertNoClsact(t *testing.T, p *podns.Pod) {
	t.Helper()
	nl, err := p.Netlink()
	if err != nil {
		t.Fatal(err)
	}
	defer nl.Close()
	links, err := nl.LinkList()
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range links {
		qs, err := nl.QdiscList(l)
		if err != nil && !errors.Is(err, netlink.ErrDumpInterrupted) {
			t.Fatal(err)
		}
		for _, q := range qs {
			if q.Type() == "clsact" {
				t.Errorf("pod %s %s: clsact qdisc left behind", p.Name, l.Attrs().Name)
			}
		}
	}
}

// assertProgramsGone waits until the kernel has freed the programs (cls_bpf
// filters release theirs after an RCU grace period) and fails if it does
// not within 10 s: something still holds them.
func assertProgramsGone(t *testing.T, ids []ebpf.ProgramID) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for _, id := range ids {
		for {
			p, err := ebpf.NewProgramFromID(id)
			if err != nil {
				break
			}
			p.Close()
			if time.Now().After(deadline) {
				t.Errorf("program %d still loaded 10s after Close", id)
				break
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
}
