// Package bench holds nsflow's macro-benchmarks: the cost of the programs
// in the real data path, throughput kept, scale. Run them with `make bench`
// (as root); figures and method are in docs/BENCHMARKS.md.
package bench

import (
	"encoding/binary"
	"fmt"
	"net"
	"net/netip"
	"os"
	"slices"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"

	"github.com/nsflow/nsflow/bpf"
	"github.com/nsflow/nsflow/collector"
	"github.com/nsflow/nsflow/collector/attach"
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

// udpRawBlast sends n datagrams of size bytes from pod a to dst:port, the
// i-th from source port 1024+i (n at most 64,000): through a raw socket, so
// that every packet is a new flow to the same receiving socket (the socket
// lookup at ingress finds it), without a socket per source port.
func udpRawBlast(b *testing.B, a *podns.Pod, dst netip.Addr, port uint16, n, size int) {
	b.Helper()
	if n > 64000 {
		b.Fatalf("%d packets: at most 64,000 source ports", n)
	}
	var fd int
	if err := a.Do(func() (err error) { fd, err = unix.Socket(unix.AF_INET, unix.SOCK_RAW, unix.IPPROTO_UDP); return err }); err != nil {
		b.Fatal(err)
	}
	defer unix.Close(fd)
	to := &unix.SockaddrInet4{Addr: dst.As4()}
	dgram := make([]byte, 8+size) // checksum 0: none (IPv4)
	binary.BigEndian.PutUint16(dgram[2:], port)
	binary.BigEndian.PutUint16(dgram[4:], uint16(len(dgram)))
	deadline := time.Now().Add(60 * time.Second)
	for i := 0; i < n && time.Now().Before(deadline); i++ {
		binary.BigEndian.PutUint16(dgram[0:], uint16(1024+i))
		if err := unix.Sendto(fd, dgram, 0, to); err != nil {
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
// reset, when set, empties its flow map before a round (the variants of
// nsflow's objects alone: bpfVariant).
type variant struct {
	name   string
	attach func(b *testing.B) (ingress, egress *ebpf.Program, detach func())
	reset  func(b *testing.B)
}

// BenchmarkDataPath measures the programs' cost per packet in the real data
// path (kernel.bpf_stats_enabled: run time / run count) while UDP packets
// with a 64-byte payload go from pod a to pod b: an empty TC program, nsflow
// with totals only, and nsflow with flows. Each round attaches one variant
// alone to the same hooks (pod a's egress, pod b's ingress), the variants
// interleaved A B C A B C …, and each figure is the median of its rounds;
// what matters is each one's distance to the empty program.
//
// The per-container attribution variants (issue 15), nsflow's stubs alone
// on the two hooks as flows_direct: attribution (the sending socket's
// cgroup into each egress flow), attribution_sklookup (plus the receiving
// socket's at ingress, looked up at each flow's first packet) and
// containers (both, plus the per (point, cgroup) map). Three traffic
// cases: one_flow (the steady state: nothing is looked up after the first
// packet), new_flow_storm (every packet a new flow to a port where no
// socket listens: the lookup misses) and new_flows_to_socket (every packet
// a new flow, from a new source port through a raw socket, to pod b's
// socket: the lookup finds it and reads its cgroup; only the variants whose
// flow map can be emptied between rounds take part, so that every packet is
// new in every round; 30,000 per round: the two hooks' flows fit the map,
// which does not evict).
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
	bpfVariant := func(opts bpf.Options) (func(b *testing.B) (*ebpf.Program, *ebpf.Program, func()), func(b *testing.B)) {
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
			}, func(b *testing.B) {
				var k bpf.NsflowFlowKey
				var v bpf.NsflowFlowVal
				var keys []bpf.NsflowFlowKey
				for it := objs.Flows.Iterate(); it.Next(&k, &v); {
					keys = append(keys, k)
				}
				for _, k := range keys {
					objs.Flows.Delete(k)
				}
			}
	}
	direct := func(name string, opts bpf.Options) variant {
		attach, reset := bpfVariant(opts)
		return variant{name: name, attach: attach, reset: reset}
	}
	variants := []variant{
		{name: "empty", attach: func(b *testing.B) (*ebpf.Program, *ebpf.Program, func()) {
			le := attachTCXLink(b, a, "eth0", emptyE, ebpf.AttachTCXEgress)
			li := attachTCXLink(b, bb, "eth0", emptyI, ebpf.AttachTCXIngress)
			return emptyI, emptyE, func() { le.Close(); li.Close() }
		}},
		// TCX in the pods too (the default attaches there with clsact):
		// the hooks measured are the same as the other variants'.
		{name: "totals", attach: collectorVariant(collector.Config{NoFlows: true, Mode: attach.ModeTCX})},
		{name: "flows", attach: collectorVariant(collector.Config{Mode: attach.ModeTCX})},
		// The stubs alone on the measured hooks (no collector, nothing on
		// the pods' other hooks): the control for the variants after it.
		direct("flows_direct", bpf.Options{}),
		direct("flows_nocommonlru", bpf.Options{NoCommonLRU: true}),
		direct("attribution", bpf.Options{Attribution: true}),
		direct("attribution_sklookup", bpf.Options{Attribution: true, SocketLookup: true}),
		direct("containers", bpf.Options{Attribution: true, SocketLookup: true, ContainerEntries: 4096}),
	}

	// NSFLOW_BENCH_VARIANTS (comma-separated names) keeps only those
	// variants (empty always), e.g. to compare one variant between two
	// builds of nsflow.
	if only := os.Getenv("NSFLOW_BENCH_VARIANTS"); only != "" {
		keep := map[string]bool{"empty": true}
		for _, n := range strings.Split(only, ",") {
			keep[n] = true
		}
		variants = slices.DeleteFunc(variants, func(v variant) bool { return !keep[v.name] })
	}
	// NSFLOW_BENCH_ROUNDS: rounds per variant (default 5).
	nrounds := 5
	if n, err := strconv.Atoi(os.Getenv("NSFLOW_BENCH_ROUNDS")); err == nil && n > 0 {
		nrounds = n
	}
	for _, tc := range []struct {
		name  string
		ports int // 0: raw socket, a new source port per packet
	}{{"one_flow", 1}, {"new_flow_storm", 40000}, {"new_flows_to_socket", 0}} {
		b.Run(tc.name, func(b *testing.B) {
			vs := variants
			perRound := 100000
			if tc.ports == 0 {
				// Every flow fits the emptied map (both hooks' flows):
				// inserts, no evictions.
				perRound = 30000
				vs = nil
				for _, v := range variants {
					if v.name == "empty" || v.reset != nil {
						vs = append(vs, v)
					}
				}
			}
			rounds := map[string][]float64{}
			for r := 0; r < nrounds; r++ {
				for k := range vs {
					v := vs[(k+r)%len(vs)] // rotate the order between rounds
					if v.reset != nil && tc.ports == 0 {
						v.reset(b)
					}
					ing, egr, detach := v.attach(b)
					pi, pe := &progStats{prog: ing}, &progStats{prog: egr}
					pi.delta(b)
					pe.delta(b)
					if tc.ports == 0 {
						udpRawBlast(b, a, bb.IPv4, 20000, perRound, 64)
					} else {
						udpBlast(b, a, bb.IPv4, perRound, 64, tc.ports)
					}
					rounds[v.name+"_egress"] = append(rounds[v.name+"_egress"], pe.delta(b))
					rounds[v.name+"_ingress"] = append(rounds[v.name+"_ingress"], pi.delta(b))
					detach()
				}
			}
			for _, dir := range []string{"egress", "ingress"} {
				e := median(rounds["empty_"+dir])
				b.ReportMetric(e, "ns/empty_"+dir)
				for _, v := range vs[1:] {
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
