package e2e

import (
	"net"
	"os/exec"
	"testing"

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

// foreignCounter is another tool's TC program: it counts every packet in
// an array map and passes it on (TCX_NEXT / TC_ACT_UNSPEC).
func foreignCounter(t *testing.T) (*ebpf.Program, *ebpf.Map) {
	t.Helper()
	m, err := ebpf.NewMap(&ebpf.MapSpec{Type: ebpf.Array, KeySize: 4, ValueSize: 8, MaxEntries: 1})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close() })
	p, err := ebpf.NewProgram(&ebpf.ProgramSpec{
		Type:    ebpf.SchedCLS,
		License: "GPL",
		Instructions: asm.Instructions{
			asm.StoreImm(asm.RFP, -4, 0, asm.Word),
			asm.Mov.Reg(asm.R2, asm.RFP),
			asm.Add.Imm(asm.R2, -4),
			asm.LoadMapPtr(asm.R1, m.FD()),
			asm.FnMapLookupElem.Call(),
			asm.JEq.Imm(asm.R0, 0, "out"),
			asm.Mov.Imm(asm.R1, 1),
			asm.StoreXAdd(asm.R0, asm.R1, asm.DWord),
			asm.Mov.Imm(asm.R0, -1).WithSymbol("out"),
			asm.Return(),
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Close() })
	return p, m
}

func counterValue(t *testing.T, m *ebpf.Map) uint64 {
	t.Helper()
	var v uint64
	if err := m.Lookup(uint32(0), &v); err != nil {
		t.Fatal(err)
	}
	return v
}

// foreignDropper drops every packet (TCX_DROP / TC_ACT_SHOT).
func foreignDropper(t *testing.T) *ebpf.Program {
	t.Helper()
	p, err := ebpf.NewProgram(&ebpf.ProgramSpec{Type: ebpf.SchedCLS, License: "GPL",
		Instructions: asm.Instructions{asm.Mov.Imm(asm.R0, 2), asm.Return()}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Close() })
	return p
}

// attachForeignTCX attaches prog to the pod's eth0 ingress with TCX, as
// another tool would, and detaches it when the test ends.
func attachForeignTCX(t *testing.T, p *podns.Pod, prog *ebpf.Program) link.Link {
	t.Helper()
	var l link.Link
	err := p.Do(func() error {
		i, err := net.InterfaceByName("eth0")
		if err != nil {
			return err
		}
		l, err = link.AttachTCX(link.TCXOptions{Interface: i.Index, Program: prog, Attach: ebpf.AttachTCXIngress})
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	return l
}

func eth0Ingress(t *testing.T, p *podns.Pod) int {
	t.Helper()
	n := 0
	if err := p.Do(func() error {
		i, err := net.InterfaceByName("eth0")
		if err != nil {
			return err
		}
		r, err := link.QueryPrograms(link.QueryOptions{Target: i.Index, Attach: ebpf.AttachTCXIngress})
		if err != nil {
			return err
		}
		n = len(r.Programs)
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	return n
}

func observe(t *testing.T, mode attach.Mode, pods ...*podns.Pod) *collector.Collector {
	t.Helper()
	c, err := collector.New(collector.Config{Mode: mode})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	for _, p := range pods {
		if _, err := c.Add(collector.Target{Name: p.Name, Path: p.NetnsPath}); err != nil {
			t.Fatal(err)
		}
	}
	return c
}

func rxPackets(t *testing.T, c *collector.Collector, p *podns.Pod) uint64 {
	t.Helper()
	snap, err := c.Snapshot()
	if err != nil {
		t.Fatal(err)
	}
	ino := inodeOf(t, p)
	return nsflowCounts(snap, map[uint64]string{ino: p.NetnsPath})[point{ino, "eth0", flow.RX}].Packets
}

// pingFails runs ping from one pod to another and reports whether every
// echo went unanswered.
func pingFails(t *testing.T, from, to *podns.Pod, n string) bool {
	t.Helper()
	cmd := exec.Command("ping", "-c", n, "-i", "0.05", "-W", "1", to.IPv4.String())
	if err := from.Start(cmd); err != nil {
		t.Fatal(err)
	}
	return cmd.Wait() != nil
}

// Another program on the same TCX hook keeps seeing every packet with
// nsflow attached, and stays attached when nsflow leaves.
func TestNeighbourTCXProgram(t *testing.T) {
	testenv.RequireRoot(t)
	pods := newPods(t, "10.213.128.0/24", "e2e-nb-a", "e2e-nb-b")
	a, b := pods[0], pods[1]
	prog, counter := foreignCounter(t)
	attachForeignTCX(t, a, prog)

	c := observe(t, attach.ModeTCX, a)
	if n := eth0Ingress(t, a); n != 2 {
		t.Fatalf("%d programs on a's eth0 ingress, want the foreign one and nsflow's", n)
	}
	f0, n0 := counterValue(t, counter), rxPackets(t, c, a)
	if pingFails(t, b, a, "5") {
		t.Fatal("ping failed with both programs attached")
	}
	f1, n1 := counterValue(t, counter), rxPackets(t, c, a)
	if f1-f0 < 5 || f1-f0 != n1-n0 {
		t.Errorf("foreign program counted %d packets, nsflow %d: both must see all", f1-f0, n1-n0)
	}
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	if n := eth0Ingress(t, a); n != 1 {
		t.Errorf("%d programs on a's eth0 ingress after nsflow left, want the foreign one", n)
	}
	f2 := counterValue(t, counter)
	pingFails(t, b, a, "2")
	if counterValue(t, counter) < f2+2 {
		t.Error("the foreign program stopped counting when nsflow left")
	}
}

// A program that drops keeps dropping: nsflow never changes a verdict,
// but counts the packets before the drop (it attaches first).
func TestNeighbourTCXDrop(t *testing.T) {
	testenv.RequireRoot(t)
	pods := newPods(t, "10.213.129.0/24", "e2e-nd-a", "e2e-nd-b")
	a, b := pods[0], pods[1]
	drop := attachForeignTCX(t, b, foreignDropper(t))
	c := observe(t, attach.ModeTCX, b)
	before := rxPackets(t, c, b)
	if !pingFails(t, a, b, "3") {
		t.Fatal("ping succeeded: nsflow overrode the foreign drop")
	}
	if got := rxPackets(t, c, b) - before; got < 3 {
		t.Errorf("nsflow counted %d packets arriving at b, want at least the 3 echo requests", got)
	}
	c.Close()
	if !pingFails(t, a, b, "1") {
		t.Error("the drop went away with nsflow")
	}
	if err := drop.Close(); err != nil {
		t.Fatal(err)
	}
	if n := eth0Ingress(t, b); n != 0 {
		t.Fatalf("%d programs left on b's eth0 ingress", n)
	}
	// Forget the neighbour entry the drops left FAILED.
	exec.Command("ip", "-n", a.Name, "neigh", "flush", "dev", "eth0").Run()
	if pingFails(t, a, b, "3") {
		out, _ := exec.Command("ip", "-n", a.Name, "neigh").CombinedOutput()
		t.Errorf("ping still fails without any program; a's neighbours:\n%s", out)
	}
}

// A foreign clsact qdisc and cls_bpf filter (one that drops) keep working
// next to nsflow's clsact filter, and stay when nsflow leaves.
func TestNeighbourClsactFilter(t *testing.T) {
	testenv.RequireRoot(t)
	pods := newPods(t, "10.213.130.0/24", "e2e-nc-a", "e2e-nc-b")
	a, b := pods[0], pods[1]
	nl, err := b.Netlink()
	if err != nil {
		t.Fatal(err)
	}
	defer nl.Close()
	eth0, err := nl.LinkByName("eth0")
	if err != nil {
		t.Fatal(err)
	}
	qdisc := &netlink.GenericQdisc{QdiscAttrs: netlink.QdiscAttrs{LinkIndex: eth0.Attrs().Index,
		Handle: netlink.MakeHandle(0xffff, 0), Parent: netlink.HANDLE_CLSACT}, QdiscType: "clsact"}
	if err := nl.QdiscAdd(qdisc); err != nil {
		t.Fatal(err)
	}
	drop := foreignDropper(t)
	foreign := &netlink.BpfFilter{FilterAttrs: netlink.FilterAttrs{LinkIndex: eth0.Attrs().Index, Parent: netlink.HANDLE_MIN_INGRESS,
		Handle: 0x99, Priority: 10, Protocol: unix.ETH_P_ALL}, Fd: drop.FD(), Name: "foreign-drop", DirectAction: true}
	if err := nl.FilterAdd(foreign); err != nil {
		t.Fatal(err)
	}

	c := observe(t, attach.ModeClsact, b)
	before := rxPackets(t, c, b)
	if !pingFails(t, a, b, "3") {
		t.Fatal("ping succeeded: the foreign drop filter was bypassed")
	}
	if got := rxPackets(t, c, b) - before; got < 3 {
		t.Errorf("nsflow counted %d packets, want at least 3", got)
	}
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	filters, err := nl.FilterList(eth0, netlink.HANDLE_MIN_INGRESS)
	if err != nil {
		t.Fatal(err)
	}
	if len(filters) != 1 || filters[0].Attrs().Handle != 0x99 {
		t.Errorf("filters after nsflow left: %+v, want only the foreign one", filters)
	}
	qs, _ := nl.QdiscList(eth0)
	found := false
	for _, q := range qs {
		found = found || q.Type() == "clsact"
	}
	if !found {
		t.Error("the foreign clsact qdisc went with nsflow")
	}
	if !pingFails(t, a, b, "1") {
		t.Error("the foreign drop stopped working")
	}
}
