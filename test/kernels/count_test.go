// Package kernels holds the end-to-end count test that `make test-kernels`
// runs inside each kernel of its matrix (test/kernels/run.sh boots them under
// QEMU with this package's test binary in the initramfs) and natively on the
// running kernel. It is an ordinary test too: `go test ./test/kernels/` runs
// it on the machine's own kernel.
//
// It needs nothing but the kernel and the test binary (no ip, no ping): the
// namespaces, the veth pair and the traffic are made in-process.
package kernels

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/nsflow/nsflow/collector"
	"github.com/nsflow/nsflow/collector/attach"
	"github.com/nsflow/nsflow/collector/flow"
	"github.com/nsflow/nsflow/collector/nsenter"
	"github.com/nsflow/nsflow/test/testenv"
)

// ethHeader is the Ethernet header nsflow counts in bytes and lo's kernel
// counters leave out.
const ethHeader = 14

// Traffic per sender: rounds of window datagrams, each echoed back.
const (
	rounds = 25
	window = 16
)

var (
	addrA = netip.MustParseAddr("10.213.251.1")
	addrB = netip.MustParseAddr("10.213.251.2")
)

// ns is one test namespace, bind-mounted under /run/netns like `ip netns`.
type ns struct {
	name string
	path string
	h    netns.NsHandle
}

func newNS(t *testing.T, name string) *ns {
	t.Helper()
	h, err := nsenter.NewNetns()
	if err != nil {
		t.Fatalf("new namespace %s: %v", name, err)
	}
	if err := os.MkdirAll("/run/netns", 0o755); err != nil {
		t.Fatal(err)
	}
	path := "/run/netns/" + name
	f, err := os.OpenFile(path, os.O_CREATE|os.O_EXCL|os.O_RDONLY, 0o444)
	if err != nil {
		h.Close()
		t.Fatalf("namespace file: %v", err)
	}
	f.Close()
	if err := unix.Mount(fmt.Sprintf("/proc/self/fd/%d", int(h)), path, "", unix.MS_BIND, ""); err != nil {
		os.Remove(path)
		h.Close()
		t.Fatalf("bind-mount %s: %v", path, err)
	}
	n := &ns{name: name, path: path, h: h}
	t.Cleanup(func() {
		h.Close()
		if err := unix.Unmount(path, unix.MNT_DETACH); err != nil {
			t.Errorf("unmount %s: %v", path, err)
		}
		os.Remove(path)
	})
	return n
}

func (n *ns) netlink(t *testing.T) *netlink.Handle {
	t.Helper()
	nl, err := netlink.NewHandleAt(n.h, unix.NETLINK_ROUTE)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nl.Close)
	return nl
}

// udp opens a UDP socket inside the namespace, bound to addr:0.
func (n *ns) udp(t *testing.T, addr netip.Addr) *net.UDPConn {
	t.Helper()
	var c *net.UDPConn
	err := nsenter.Do(n.h, func() error {
		var err error
		c, err = net.ListenUDP("udp4", net.UDPAddrFromAddrPort(netip.AddrPortFrom(addr, 0)))
		return err
	})
	if err != nil {
		t.Fatalf("udp socket in %s: %v", n.name, err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// pair makes two namespaces joined by a veth pair (eth0 in each, a /30
// between them), IPv6 off so that nothing but the test's own traffic (and
// ARP) passes, lo up in both.
func pair(t *testing.T, prefix string) (a, b *ns) {
	t.Helper()
	a, b = newNS(t, prefix+"-a"), newNS(t, prefix+"-b")
	for _, n := range []*ns{a, b} {
		err := nsenter.Do(n.h, func() error {
			for _, f := range []string{"/proc/sys/net/ipv6/conf/all/disable_ipv6", "/proc/sys/net/ipv6/conf/default/disable_ipv6"} {
				if err := os.WriteFile(f, []byte("1"), 0o644); err != nil && !errors.Is(err, os.ErrNotExist) {
					return err
				}
			}
			return nil
		})
		if err != nil {
			t.Fatalf("disable IPv6 in %s: %v", n.name, err)
		}
	}
	nlA, nlB := a.netlink(t), b.netlink(t)
	veth := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "eth0"}, PeerName: "eth0", PeerNamespace: netlink.NsFd(int(b.h))}
	if err := nlA.LinkAdd(veth); err != nil {
		t.Fatalf("veth: %v", err)
	}
	for _, x := range []struct {
		nl   *netlink.Handle
		addr netip.Addr
	}{{nlA, addrA}, {nlB, addrB}} {
		for _, name := range []string{"lo", "eth0"} {
			l, err := x.nl.LinkByName(name)
			if err != nil {
				t.Fatal(err)
			}
			if name == "eth0" {
				a := &netlink.Addr{IPNet: &net.IPNet{IP: x.addr.AsSlice(), Mask: net.CIDRMask(30, 32)}}
				if err := x.nl.AddrAdd(l, a); err != nil {
					t.Fatal(err)
				}
			}
			if err := x.nl.LinkSetUp(l); err != nil {
				t.Fatal(err)
			}
		}
	}
	return a, b
}

// echo answers every datagram c receives until c is closed; it returns the
// number of datagrams it sent back.
func echo(c *net.UDPConn) *atomic.Uint64 {
	var n atomic.Uint64
	go func() {
		buf := make([]byte, 2048)
		for {
			k, from, err := c.ReadFromUDPAddrPort(buf)
			if err != nil {
				return
			}
			if _, err := c.WriteToUDPAddrPort(buf[:k], from); err == nil {
				n.Add(1)
			}
		}
	}()
	return &n
}

// sender is one CPU's traffic on one path: what it sent and got back.
type sender struct {
	c          *net.UDPConn
	to         netip.AddrPort
	sent, recv uint64
}

// run sends rounds of window datagrams from a thread pinned to cpu, waiting
// (bounded) for the echoes of each round before the next, so that no queue
// on the path overflows.
func (s *sender) run(cpu int) error {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	var set unix.CPUSet
	set.Set(cpu)
	if err := unix.SchedSetaffinity(0, &set); err != nil {
		return fmt.Errorf("pin to CPU %d: %w", cpu, err)
	}
	payload := make([]byte, 64+cpu) // a size of its own per CPU
	buf := make([]byte, 2048)
	for r := 0; r < rounds; r++ {
		for i := 0; i < window; i++ {
			if _, err := s.c.WriteToUDPAddrPort(payload, s.to); err != nil {
				return err
			}
			s.sent++
		}
		deadline := time.Now().Add(2 * time.Second)
		for got := 0; got < window; got++ {
			s.c.SetReadDeadline(deadline)
			if _, _, err := s.c.ReadFromUDPAddrPort(buf); err != nil {
				break // a lost echo does not matter: counts are checked against the kernel's
			}
			s.recv++
		}
	}
	return nil
}

type point struct {
	ns, iface string
	dir       flow.Direction
}

func kernelCounts(t *testing.T, nss ...*ns) map[point]flow.Counters {
	t.Helper()
	out := map[point]flow.Counters{}
	for _, n := range nss {
		links, err := n.netlink(t).LinkList()
		if err != nil {
			t.Fatal(err)
		}
		for _, l := range links {
			a := l.Attrs()
			s := a.Statistics
			if s.TxDropped != 0 || s.RxDropped != 0 {
				t.Errorf("%s %s: the kernel dropped %d tx, %d rx: the traffic must not overflow a queue for an exact comparison", n.name, a.Name, s.TxDropped, s.RxDropped)
			}
			rxb, txb := s.RxBytes, s.TxBytes
			if a.Flags&net.FlagLoopback != 0 {
				rxb += ethHeader * s.RxPackets
				txb += ethHeader * s.TxPackets
			}
			out[point{n.name, a.Name, flow.RX}] = flow.Counters{Packets: s.RxPackets, Bytes: rxb}
			out[point{n.name, a.Name, flow.TX}] = flow.Counters{Packets: s.TxPackets, Bytes: txb}
		}
	}
	return out
}

// TestCount: two namespaces joined by a veth pair, observed by a collector
// from before their interfaces carry traffic; UDP over the veth and over
// each lo from a thread pinned to every CPU at once (echoed back). Every
// hook's totals equal the kernel's interface counters, and every sender's
// flow is counted exactly at each hook it passes. On PREEMPT_RT this is the
// proof that no count is lost when the TC path is preempted on a CPU.
// Modes: the one the kernel's features choose (auto), and clsact too where
// that was TCX.
func TestCount(t *testing.T) {
	testenv.RequireRoot(t)
	eachMode(t, func(t *testing.T, mode attach.Mode) attach.Mode {
		s := newSetup(t, fmt.Sprintf("nsfk-%d-%s", os.Getpid(), mode))
		c := s.observe(t, collector.Config{Mode: mode})
		s.send(t)
		s.stop()
		s.check(t, c)
		return c.Mode()
	})
}

// TestRestart: as TestCount, with the collector restarted (pinned maps and
// hooks, Config.PinPath) in the middle: traffic before, while no collector
// runs (the pinned programs keep counting) and after the new one adopted
// the pins; totals and flows are exact across the three phases.
func TestRestart(t *testing.T) {
	testenv.RequireRoot(t)
	eachMode(t, func(t *testing.T, mode attach.Mode) attach.Mode {
		pin := fmt.Sprintf("/sys/fs/bpf/nsfk-%d-%s", os.Getpid(), mode)
		t.Cleanup(func() { os.RemoveAll(pin) })
		s := newSetup(t, fmt.Sprintf("nsfr-%d-%s", os.Getpid(), mode))
		cfg := collector.Config{Mode: mode, PinPath: pin}
		c1 := s.observe(t, cfg)
		s.send(t)
		if err := c1.Close(); err != nil {
			t.Fatalf("close the first collector: %v", err)
		}
		s.send(t) // no collector: the pinned hooks count
		c2 := s.observe(t, cfg)
		s.send(t)
		s.stop()
		s.check(t, c2)
		return c2.Mode()
	})
}

// eachMode runs fn in attach mode auto, and in clsact too when auto
// resolved to TCX; it logs a NSFLOW-MODE line for run.sh's table.
func eachMode(t *testing.T, fn func(*testing.T, attach.Mode) attach.Mode) {
	modes := []attach.Mode{attach.ModeAuto}
	for i := 0; i < len(modes); i++ {
		mode := modes[i]
		var resolved attach.Mode
		ok := t.Run(string(mode), func(t *testing.T) { resolved = fn(t, mode) })
		t.Logf("NSFLOW-MODE %s -> %s ok=%v", mode, resolved, ok)
		if mode == attach.ModeAuto && resolved == attach.ModeTCX {
			modes = append(modes, attach.ModeClsact)
		}
	}
}

// setup is the two namespaces, their echo servers and one sender per CPU
// and path (veth A→B, lo in A, lo in B).
type setup struct {
	a, b    *ns
	srvs    []*net.UDPConn
	senders []*sender
}

func newSetup(t *testing.T, prefix string) *setup {
	a, b := pair(t, prefix)
	s := &setup{a: a, b: b}
	srvB := b.udp(t, addrB)
	srvLoA := a.udp(t, netip.MustParseAddr("127.0.0.1"))
	srvLoB := b.udp(t, netip.MustParseAddr("127.0.0.1"))
	s.srvs = []*net.UDPConn{srvB, srvLoA, srvLoB}
	for _, srv := range s.srvs {
		echo(srv)
	}
	for cpu := 0; cpu < runtime.NumCPU(); cpu++ {
		s.senders = append(s.senders,
			&sender{c: a.udp(t, addrA), to: srvB.LocalAddr().(*net.UDPAddr).AddrPort()},
			&sender{c: a.udp(t, netip.MustParseAddr("127.0.0.1")), to: srvLoA.LocalAddr().(*net.UDPAddr).AddrPort()},
			&sender{c: b.udp(t, netip.MustParseAddr("127.0.0.1")), to: srvLoB.LocalAddr().(*net.UDPAddr).AddrPort()})
	}
	return s
}

// observe starts a collector on both namespaces.
func (s *setup) observe(t *testing.T, cfg collector.Config) *collector.Collector {
	t.Helper()
	c, err := collector.New(cfg)
	if err != nil {
		t.Fatalf("collector (%s): %v", cfg.Mode, err)
	}
	t.Cleanup(func() { c.Close() })
	for _, n := range []*ns{s.a, s.b} {
		if _, err := c.Add(collector.Target{Name: n.name, Path: n.path}); err != nil {
			t.Fatalf("observe %s: %v", n.name, err)
		}
	}
	t.Logf("attach mode %s: %s; %d CPUs", cfg.Mode, c.Mode(), runtime.NumCPU())
	return c
}

// send runs every sender at once, each on its CPU.
func (s *setup) send(t *testing.T) {
	t.Helper()
	start := time.Now()
	var wg sync.WaitGroup
	errs := make([]error, len(s.senders))
	for i, x := range s.senders {
		wg.Add(1)
		go func() { defer wg.Done(); errs[i] = x.run(i / 3) }()
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		t.Fatal(err)
	}
	var sent, recv uint64
	for _, x := range s.senders {
		sent, recv = sent+x.sent, recv+x.recv
	}
	t.Logf("%d datagrams sent so far from %d senders on %d CPUs, %d echoed (this round %v)", sent, len(s.senders), runtime.NumCPU(), recv, time.Since(start))
}

// stop closes the echo servers (they may still be answering a late round),
// so that nothing moves while the counters are read.
func (s *setup) stop() {
	for _, srv := range s.srvs {
		srv.Close()
	}
	time.Sleep(100 * time.Millisecond)
}

// check compares c's totals with the kernel's counters at the 8 hooks, and
// each sender's flow with what it sent.
func (s *setup) check(t *testing.T, c *collector.Collector) {
	t.Helper()
	a, b := s.a, s.b
	snap, err := c.Snapshot()
	if err != nil {
		t.Fatal(err)
	}
	kernel := kernelCounts(t, a, b)
	got := map[point]flow.Counters{}
	for _, n := range snap.Namespaces {
		for _, i := range n.Interfaces {
			got[point{n.Name, i.Name, flow.RX}] = i.RX
			got[point{n.Name, i.Name, flow.TX}] = i.TX
		}
	}
	var checked int
	for p, want := range kernel {
		g, ok := got[p]
		if !ok {
			t.Errorf("%s %s %s: not observed (kernel: %+v)", p.ns, p.iface, p.dir, want)
			continue
		}
		if g != want {
			t.Errorf("%s %s %s: nsflow %+v, kernel %+v", p.ns, p.iface, p.dir, g, want)
		}
		checked++
	}
	if checked != 8 {
		t.Errorf("compared %d hooks, want 8 (lo and eth0 in 2 namespaces, rx and tx)", checked)
	}

	// Flows: each sender's datagrams at every hook they pass, exactly.
	type fk struct {
		ns, iface string
		dir       flow.Direction
		src, dst  netip.AddrPort
	}
	flows := map[fk]uint64{}
	for _, f := range snap.Flows {
		if f.Protocol != unix.IPPROTO_UDP {
			continue
		}
		flows[fk{f.Netns, f.Interface, f.Direction, netip.AddrPortFrom(f.Src, f.SrcPort), netip.AddrPortFrom(f.Dst, f.DstPort)}] += f.Packets
	}
	for i, x := range s.senders {
		src := x.c.LocalAddr().(*net.UDPAddr).AddrPort()
		var hooks []fk
		switch i % 3 {
		case 0:
			hooks = []fk{{a.name, "eth0", flow.TX, src, x.to}, {b.name, "eth0", flow.RX, src, x.to}}
		case 1:
			hooks = []fk{{a.name, "lo", flow.TX, src, x.to}, {a.name, "lo", flow.RX, src, x.to}}
		case 2:
			hooks = []fk{{b.name, "lo", flow.TX, src, x.to}, {b.name, "lo", flow.RX, src, x.to}}
		}
		for _, h := range hooks {
			if flows[h] != x.sent {
				t.Errorf("flow %s → %s at %s %s %s: %d packets, sent %d", h.src, h.dst, h.ns, h.iface, h.dir, flows[h], x.sent)
			}
		}
	}
	if t.Failed() {
		var lines []string
		for p, g := range got {
			lines = append(lines, fmt.Sprintf("  %s %s %s nsflow %+v kernel %+v", p.ns, p.iface, p.dir, g, kernel[p]))
		}
		t.Logf("stats %+v\n%s", snap.Stats, strings.Join(lines, "\n"))
	}
}

// TestHarness is the harness's own canary, independent of nsflow's
// programs: a minimal TC program (an atomic counter in an array map, a
// handful of instructions any kernel with cls_bpf loads) on both clsact
// hooks of a veth, under the same traffic as TestCount. Its count equals the
// kernel's interface counters. If this fails on a kernel, the environment
// (modules, namespaces, veth, clsact, traffic) is at fault, not nsflow.
func TestHarness(t *testing.T) {
	testenv.RequireRoot(t)
	a, b := pair(t, fmt.Sprintf("nsfh-%d", os.Getpid()))
	m, err := ebpf.NewMap(&ebpf.MapSpec{Type: ebpf.Array, KeySize: 4, ValueSize: 8, MaxEntries: 1})
	if err != nil {
		t.Fatalf("array map: %v", err)
	}
	t.Cleanup(func() { m.Close() })
	prog, err := ebpf.NewProgram(&ebpf.ProgramSpec{Type: ebpf.SchedCLS, License: "GPL", Instructions: asm.Instructions{
		asm.StoreImm(asm.R10, -4, 0, asm.Word),
		asm.Mov.Reg(asm.R2, asm.R10),
		asm.Add.Imm(asm.R2, -4),
		asm.LoadMapPtr(asm.R1, m.FD()),
		asm.FnMapLookupElem.Call(),
		asm.JEq.Imm(asm.R0, 0, "out"),
		asm.Mov.Imm(asm.R1, 1),
		asm.StoreXAdd(asm.R0, asm.R1, asm.DWord),
		asm.Mov.Imm(asm.R0, -1).WithSymbol("out"), // TC_ACT_UNSPEC
		asm.Return(),
	}})
	if err != nil {
		t.Fatalf("load a minimal TC program: %v", err)
	}
	t.Cleanup(func() { prog.Close() })

	nl := a.netlink(t)
	l, err := nl.LinkByName("eth0")
	if err != nil {
		t.Fatal(err)
	}
	q := &netlink.GenericQdisc{QdiscAttrs: netlink.QdiscAttrs{LinkIndex: l.Attrs().Index, Handle: netlink.MakeHandle(0xffff, 0), Parent: netlink.HANDLE_CLSACT}, QdiscType: "clsact"}
	if err := nl.QdiscAdd(q); err != nil {
		t.Fatalf("clsact qdisc: %v", err)
	}
	before := kernelCounts(t, a)[point{a.name, "eth0", flow.RX}].Packets + kernelCounts(t, a)[point{a.name, "eth0", flow.TX}].Packets
	for _, parent := range []uint32{netlink.HANDLE_MIN_INGRESS, netlink.HANDLE_MIN_EGRESS} {
		f := &netlink.BpfFilter{FilterAttrs: netlink.FilterAttrs{LinkIndex: l.Attrs().Index, Parent: parent, Handle: 1, Priority: 1, Protocol: unix.ETH_P_ALL},
			Fd: prog.FD(), Name: "nsflow-harness", DirectAction: true}
		if err := nl.FilterAdd(f); err != nil {
			t.Fatalf("cls_bpf filter: %v", err)
		}
	}

	srv := b.udp(t, addrB)
	echo(srv)
	var senders []*sender
	for cpu := 0; cpu < runtime.NumCPU(); cpu++ {
		senders = append(senders, &sender{c: a.udp(t, addrA), to: srv.LocalAddr().(*net.UDPAddr).AddrPort()})
	}
	var wg sync.WaitGroup
	errs := make([]error, len(senders))
	for i, s := range senders {
		wg.Add(1)
		go func() { defer wg.Done(); errs[i] = s.run(i) }()
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		t.Fatal(err)
	}
	srv.Close()
	time.Sleep(100 * time.Millisecond)
	k := kernelCounts(t, a)
	want := k[point{a.name, "eth0", flow.RX}].Packets + k[point{a.name, "eth0", flow.TX}].Packets - before
	var got uint64
	if err := m.Lookup(uint32(0), &got); err != nil {
		t.Fatal(err)
	}
	var sent uint64
	for _, s := range senders {
		sent += s.sent
	}
	t.Logf("%d datagrams from %d CPUs; the minimal program counted %d packets on eth0's two hooks, the kernel %d", sent, len(senders), got, want)
	if got != want || got < sent {
		t.Errorf("minimal TC program counted %d packets, the kernel's counters %d (sent %d)", got, want, sent)
	}
}
