// Package bench holds nsflow's macro-benchmarks: the cost of the programs
// in the real data path, throughput kept, scale. Run them with `make bench`
// (as root); figures and method are in docs/BENCHMARKS.md.
package bench

import (
	"fmt"
	"net"
	"net/netip"
	"os"
	"sort"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"

	"github.com/nsflow/nsflow/bpf"
	"github.com/nsflow/nsflow/collector"
	"github.com/nsflow/nsflow/test/podns"
	"github.com/nsflow/nsflow/test/testenv"
)

func newPods(b *testing.B, subnet string, names ...string) []*podns.Pod {
	b.Helper()
	var pods []*podns.Pod
	for _, n := range names {
		p, err := podns.Create(podns.Config{}, n, podns.Options{Subnet: netip.MustParsePrefix(subnet)})
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { podns.Delete(podns.Config{}, n) })
		pods = append(pods, p)
	}
	return pods
}

func emptyProgram(b *testing.B) *ebpf.Program {
	p, err := ebpf.NewProgram(&ebpf.ProgramSpec{Type: ebpf.SchedCLS, License: "GPL",
		Instructions: asm.Instructions{asm.Mov.Imm(asm.R0, -1), asm.Return()}})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { p.Close() })
	return p
}

// udpBlast sends n datagrams of size bytes from pod a; ports cycles the
// destination port over that many values (1: one flow). With more, every
// packet is a new flow in every round: each run of ports packets comes
// from a socket of its own (a new source port), all kept open until the
// round ends, so no (source port, destination port) pair repeats, within
// a round or across rounds (a socket's ephemeral port is never one that
// another open socket holds).
func udpBlast(b *testing.B, a *podns.Pod, dst netip.Addr, n, size, ports int) {
	b.Helper()
	var conns []*net.UDPConn
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	open := func() *net.UDPConn {
		var conn *net.UDPConn
		if err := a.Do(func() (err error) { conn, err = net.ListenUDP("udp", nil); return err }); err != nil {
			b.Fatal(err)
		}
		conns = append(conns, conn)
		return conn
	}
	conn := open()
	payload := make([]byte, size)
	deadline := time.Now().Add(60 * time.Second)
	for i := 0; i < n && time.Now().Before(deadline); i++ {
		if ports > 1 && i > 0 && i%ports == 0 {
			conn = open()
		}
		port := 20000 + i%ports
		if _, err := conn.WriteToUDPAddrPort(payload, netip.AddrPortFrom(dst, uint16(port))); err != nil {
			b.Fatal(err)
		}
	}
}

type progStats struct {
	prog *ebpf.Program
	last ebpf.ProgramStats
}

func (p *progStats) delta(b *testing.B) float64 {
	s, err := p.prog.Stats()
	if err != nil {
		b.Fatal(err)
	}
	rt, rc := s.Runtime-p.last.Runtime, s.RunCount-p.last.RunCount
	p.last = *s
	if rc == 0 {
		return 0
	}
	return float64(rt.Nanoseconds()) / float64(rc)
}

func median(v []float64) float64 {
	s := append([]float64(nil), v...)
	sort.Float64s(s)
	return s[len(s)/2]
}

// variant is one program set under test, attached only for its own rounds.
type variant struct {
	name   string
	attach func(b *testing.B) (ingress, egress *ebpf.Program, detach func())
}

// BenchmarkDataPath measures the programs' cost per packet in the real data
// path (kernel.bpf_stats_enabled: run time / run count) while UDP packets
// with a 64-byte payload go from pod a to pod b: an empty TC program, nsflow
// with totals only, and nsflow with flows. Each round attaches one variant
// alone to the same hooks (pod a's egress, pod b's ingress), the variants
// interleaved A B C A B C …, and each figure is the median of its rounds;
// what matters is each one's distance to the empty program.
func BenchmarkDataPath(b *testing.B) {
	testenv.RequireRoot(b)
	stats, err := ebpf.EnableStats(uint32(unix.BPF_STATS_RUN_TIME))
	if err != nil {
		b.Fatal(err)
	}
	defer stats.Close()
	// Names of this run's own: a concurrent run elsewhere on the machine
	// never shares its pods.
	pre := fmt.Sprintf("dp%d", os.Getpid()%100000)
	pods := newPods(b, "10.213.150.0/24", pre+"-a", pre+"-b")
	a, bb := pods[0], pods[1]
	var sink *net.UDPConn
	if err := bb.Do(func() (err error) {
		sink, err = net.ListenUDP("udp", net.UDPAddrFromAddrPort(netip.AddrPortFrom(bb.IPv4, 20000)))
		return err
	}); err != nil {
		b.Fatal(err)
	}
	defer sink.Close()

	emptyE, emptyI := emptyProgram(b), emptyProgram(b)
	collectorVariant := func(cfg collector.Config) func(b *testing.B) (*ebpf.Program, *ebpf.Program, func()) {
		c, err := collector.New(cfg)
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { c.Close() })
		return func(b *testing.B) (*ebpf.Program, *ebpf.Program, func()) {
			var inos []uint64
			for _, p := range pods {
				ino, err := c.Add(collector.Target{Name: p.Name, Path: p.NetnsPath})
				if err != nil {
					b.Fatal(err)
				}
				inos = append(inos, ino)
			}
			// The stubs on the hooks measured (their run time includes the
			// parser they tail-call): as the kernel lists them.
			// Another observer on the machine (a trace --all, a serve)
			// may attach its own stubs to these pods too: ours are the
			// ones among the collector's programs.
			ours := map[ebpf.ProgramID]bool{}
			for _, id := range c.ProgramIDs() {
				ours[id] = true
			}
			ing, egr := hookProgram(b, bb, "eth0", ebpf.AttachTCXIngress, ours), hookProgram(b, a, "eth0", ebpf.AttachTCXEgress, ours)
			return ing, egr, func() {
				ing.Close()
				egr.Close()
				for _, ino := range inos {
					c.Remove(ino)
				}
			}
		}
	}
	// bpfVariant loads nsflow's objects with opts and attaches the stubs
	// of the two measured hooks alone (no collector).
	bpfVariant := func(opts bpf.Options) func(b *testing.B) (*ebpf.Program, *ebpf.Program, func()) {
		objs, err := bpf.Load(opts)
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { objs.Close() })
		ing, err := objs.Stub(bpf.NsflowObsKey{Netns: 1, Ifindex: 1, Dir: uint8(bpf.RX)})
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { ing.Close() })
		egr, err := objs.Stub(bpf.NsflowObsKey{Netns: 1, Ifindex: 2, Dir: uint8(bpf.TX)})
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { egr.Close() })
		return func(b *testing.B) (*ebpf.Program, *ebpf.Program, func()) {
			le := attachTCXLink(b, a, "eth0", egr, ebpf.AttachTCXEgress)
			li := attachTCXLink(b, bb, "eth0", ing, ebpf.AttachTCXIngress)
			return ing, egr, func() { le.Close(); li.Close() }
		}
	}
	variants := []variant{
		{"empty", func(b *testing.B) (*ebpf.Program, *ebpf.Program, func()) {
			le := attachTCXLink(b, a, "eth0", emptyE, ebpf.AttachTCXEgress)
			li := attachTCXLink(b, bb, "eth0", emptyI, ebpf.AttachTCXIngress)
			return emptyI, emptyE, func() { le.Close(); li.Close() }
		}},
		{"totals", collectorVariant(collector.Config{NoFlows: true})},
		{"flows", collectorVariant(collector.Config{})},
		// The stubs alone on the measured hooks (no collector, nothing on
		// the pods' other hooks): the control for the map variant after it.
		{"flows_direct", bpfVariant(bpf.Options{})},
		{"flows_nocommonlru", bpfVariant(bpf.Options{NoCommonLRU: true})},
	}

	for _, tc := range []struct {
		name  string
		ports int
	}{{"one_flow", 1}, {"new_flow_storm", 40000}} {
		b.Run(tc.name, func(b *testing.B) {
			rounds := map[string][]float64{}
			const perRound = 100000
			for r := 0; r < 5; r++ {
				for k := range variants {
					v := variants[(k+r)%len(variants)] // rotate the order between rounds
					ing, egr, detach := v.attach(b)
					pi, pe := &progStats{prog: ing}, &progStats{prog: egr}
					pi.delta(b)
					pe.delta(b)
					udpBlast(b, a, bb.IPv4, perRound, 64, tc.ports)
					rounds[v.name+"_egress"] = append(rounds[v.name+"_egress"], pe.delta(b))
					rounds[v.name+"_ingress"] = append(rounds[v.name+"_ingress"], pi.delta(b))
					detach()
				}
			}
			for _, dir := range []string{"egress", "ingress"} {
				e := median(rounds["empty_"+dir])
				b.ReportMetric(e, "ns/empty_"+dir)
				for _, v := range variants[1:] {
					r := rounds[v.name+"_"+dir]
					b.ReportMetric(median(r)-e, "ns_above_empty/"+v.name+"_"+dir)
					// The spread: the lowest and highest round.
					lo, hi := r[0], r[0]
					for _, x := range r {
						lo, hi = min(lo, x), max(hi, x)
					}
					b.ReportMetric(lo-e, "ns_above_empty_min/"+v.name+"_"+dir)
					b.ReportMetric(hi-e, "ns_above_empty_max/"+v.name+"_"+dir)
				}
			}
			fmt.Printf("%s: ns/run per round: %v\n", tc.name, rounds)
		})
	}
}

// hookProgram opens the one program of ours (by ID) the kernel lists on a
// TCX hook of pod
// p's interface.
func hookProgram(b *testing.B, p *podns.Pod, iface string, at ebpf.AttachType, ours map[ebpf.ProgramID]bool) *ebpf.Program {
	b.Helper()
	var prog *ebpf.Program
	if err := p.Do(func() error {
		i, err := net.InterfaceByName(iface)
		if err != nil {
			return err
		}
		q, err := link.QueryPrograms(link.QueryOptions{Target: i.Index, Attach: at})
		if err != nil {
			return err
		}
		var mine []ebpf.ProgramID
		for _, qp := range q.Programs {
			if ours[qp.ID] {
				mine = append(mine, qp.ID)
			}
		}
		if len(mine) != 1 {
			return fmt.Errorf("%d of our programs on %s %s (of %d), want 1", len(mine), iface, at, len(q.Programs))
		}
		prog, err = ebpf.NewProgramFromID(mine[0])
		return err
	}); err != nil {
		b.Fatal(err)
	}
	return prog
}

func attachTCXLink(b *testing.B, p *podns.Pod, iface string, prog *ebpf.Program, at ebpf.AttachType) link.Link {
	b.Helper()
	var l link.Link
	if err := p.Do(func() error {
		i, err := net.InterfaceByName(iface)
		if err != nil {
			return err
		}
		l, err = link.AttachTCX(link.TCXOptions{Interface: i.Index, Program: prog, Attach: at})
		return err
	}); err != nil {
		b.Fatal(err)
	}
	return l
}
