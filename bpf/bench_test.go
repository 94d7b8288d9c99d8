package bpf

import (
	"net"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/gopacket/gopacket/layers"
)

// emptyProgram is the baseline: a TC program that only returns TC_NEXT.
func emptyProgram(b *testing.B) *ebpf.Program {
	b.Helper()
	p, err := ebpf.NewProgram(&ebpf.ProgramSpec{
		Name:         "empty",
		Type:         ebpf.SchedCLS,
		Instructions: asm.Instructions{asm.Mov.Imm(asm.R0, -1), asm.Return()},
		License:      "GPL",
	})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { p.Close() })
	return p
}

// BenchmarkProgram measures the programs in BPF_PROG_TEST_RUN: one syscall
// in which the kernel runs the program b.N times on the same frame and
// reports the mean time per run, reported here as ns/op. Compare each
// variant with the empty program measured in the same run. The same frame
// every run: one flow, found in the map from the second run on. The
// attribution variants (issue 15): at egress the cgroup of the socket
// BPF_PROG_TEST_RUN gives its sk_buff (the calling process's cgroup), read
// at the flow's insert only (attribution), and for every packet with the
// containers map on (containers: plus its update); at ingress the socket
// lookup runs at the flow's first packet only (sk_lookup_ingress: the cost
// of a found flow, against flows_on_ingress).
func BenchmarkProgram(b *testing.B) {
	udp := build(b, eth(layers.EthernetTypeIPv4), ipv4(layers.IPProtocolUDP), udpDgram(), payload(64))
	tcp6 := build(b, eth(layers.EthernetTypeIPv6), ipv6(layers.IPProtocolTCP), tcpSeg("A"), payload(64))
	flowsOn := load(b, Options{})
	flowsOff := load(b, Options{NoFlows: true})
	attr := load(b, Options{Attribution: true})
	attrLookup := load(b, Options{Attribution: true, SocketLookup: true})
	containers := load(b, Options{Attribution: true, SocketLookup: true, ContainerEntries: 1024})
	stubOn, stubOff := prog(b, flowsOn, TX), prog(b, flowsOff, TX)
	stubOffRX := prog(b, flowsOff, RX)
	for _, v := range []struct {
		name  string
		prog  *ebpf.Program
		frame []byte
	}{
		{"empty/udp4", emptyProgram(b), udp},
		{"flows_off/udp4", stubOff, udp},
		{"flows_off_ingress/udp4", stubOffRX, udp},
		{"flows_on/udp4", stubOn, udp},
		{"flows_on/tcp6", stubOn, tcp6},
		{"flows_on_ingress/udp4", prog(b, flowsOn, RX), udp},
		{"attribution/udp4", prog(b, attr, TX), udp},
		{"sk_lookup_ingress/udp4", prog(b, attrLookup, RX), udp},
		{"containers/udp4", prog(b, containers, TX), udp},
		{"containers_ingress/udp4", prog(b, containers, RX), udp},
	} {
		b.Run(v.name, func(b *testing.B) {
			ret, d, err := v.prog.Benchmark(v.frame, b.N, b.ResetTimer)
			if err != nil {
				b.Fatal(err)
			}
			if int32(ret) != -1 {
				b.Fatalf("returned %d, want -1 (TC_NEXT)", int32(ret))
			}
			b.ReportMetric(float64(d.Nanoseconds()), "ns/op")
		})
	}
}

// BenchmarkNewFlow measures a flow's first packet at ingress, as
// BenchmarkProgram in BPF_PROG_TEST_RUN (on lo of the calling thread's
// namespace), but one run per call, its flow deleted after each, so that
// every run inserts one; ns/op is the mean of the kernel's times, which
// include a clock read pair (the empty program's figure). The variants:
// the plain ingress parser (flows_on_ingress), and the one with the socket
// lookup (sk_lookup_ingress) on UDP frames: to 127.0.0.1, port 9 (no
// socket: the lookup misses), and to port P of a UDP socket the benchmark
// binds on the wildcard address, from 127.0.0.1 (local: the lookup finds
// it, the FIB says local, its cgroup is read) and to 10.213.0.3 (a route
// out of the namespace: with forwarding on, the FIB says forwarded, no
// cgroup; with it off on lo, local as above).
func BenchmarkNewFlow(b *testing.B) {
	sock, err := net.ListenUDP("udp4", &net.UDPAddr{})
	if err != nil {
		b.Fatal(err)
	}
	defer sock.Close()
	port := uint16(sock.LocalAddr().(*net.UDPAddr).Port)
	frame := func(dst net.IP, dport uint16) []byte {
		ip := ipv4(layers.IPProtocolUDP)
		ip.SrcIP, ip.DstIP = net.IPv4(127, 0, 0, 1), dst
		udp := udpDgram()
		udp.DstPort = layers.UDPPort(dport)
		return build(b, eth(layers.EthernetTypeIPv4), ip, udp, payload(64))
	}
	lo, remote := net.IPv4(127, 0, 0, 1), net.IPv4(10, 213, 0, 3)
	flowsOn := load(b, Options{})
	attrLookup := load(b, Options{Attribution: true, SocketLookup: true})
	for _, v := range []struct {
		name  string
		prog  *ebpf.Program
		objs  *Objects
		frame []byte
	}{
		{"empty/udp4", emptyProgram(b), nil, frame(lo, 9)},
		{"flows_on_ingress/udp4", prog(b, flowsOn, RX), flowsOn, frame(lo, 9)},
		{"sk_lookup_ingress/udp4_no_socket", prog(b, attrLookup, RX), attrLookup, frame(lo, 9)},
		{"sk_lookup_ingress/udp4_socket_local", prog(b, attrLookup, RX), attrLookup, frame(lo, port)},
		{"sk_lookup_ingress/udp4_socket_remote", prog(b, attrLookup, RX), attrLookup, frame(remote, port)},
	} {
		b.Run(v.name, func(b *testing.B) {
			var total time.Duration
			var k NsflowFlowKey
			var val NsflowFlowVal
			for i := 0; i < b.N; i++ {
				ret, d, err := v.prog.Benchmark(v.frame, 1, nil)
				if err != nil {
					b.Fatal(err)
				}
				if int32(ret) != -1 {
					b.Fatalf("returned %d, want -1 (TC_NEXT)", int32(ret))
				}
				total += d
				if v.objs == nil {
					continue
				}
				n := 0
				for it := v.objs.Flows.Iterate(); it.Next(&k, &val); n++ {
				}
				if n != 1 {
					b.Fatalf("%d flows after a run, want 1", n)
				}
				if err := v.objs.Flows.Delete(&k); err != nil {
					b.Fatal(err)
				}
			}
			b.ReportMetric(float64(total.Nanoseconds())/float64(b.N), "ns/op")
		})
	}
}

// BenchmarkStubLoad measures what observing one hook costs besides its
// attach: loading its stub (a copy of the template with its slot).
func BenchmarkStubLoad(b *testing.B) {
	objs := load(b, Options{})
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		p, err := objs.Stub(NsflowObsKey{Netns: 1, Ifindex: uint32(i % 1000), Dir: uint8(i % 2)})
		if err != nil {
			b.Fatal(err)
		}
		p.Close()
	}
}

// BenchmarkGSO measures what a GSO packet at egress costs without flows:
// the stub, its tail call and the parser's decision (the device's features,
// the GSO type through bpf_probe_read_kernel, the headers), against the
// same frame without GSO (the stub alone). The context carries gso_segs and
// gso_size (BPF_PROG_TEST_RUN's sk_buff has no GSO type: the decision takes
// its software-segmentation branch). gso_probe_reads: the egress parser
// of kernels without bpf_cast_to_kern_ctx (a probe read per kernel field).
// Wall time of one BPF_PROG_TEST_RUN repeating the program b.N times, per
// run.
func BenchmarkGSO(b *testing.B) {
	skb := loadSkbLayout(b)
	frame := build(b, eth(layers.EthernetTypeIPv4), ipv4(layers.IPProtocolTCP), tcpSeg("A"), payload(1200))
	stubOff := prog(b, load(b, Options{NoFlows: true}), TX)
	stubProbe := prog(b, load(b, Options{NoFlows: true, ProbeReads: true}), TX)
	for _, v := range []struct {
		name   string
		prog   *ebpf.Program
		fields map[string]uint32
	}{
		{"not_gso/tcp4", stubOff, nil},
		{"gso/tcp4", stubOff, map[string]uint32{"gso_segs": 3, "gso_size": 400}},
		{"gso_probe_reads/tcp4", stubProbe, map[string]uint32{"gso_segs": 3, "gso_size": 400}},
	} {
		stubOff := v.prog
		b.Run(v.name, func(b *testing.B) {
			opts := &ebpf.RunOptions{Data: frame, Context: skb.context(v.fields), Repeat: uint32(b.N)}
			start := time.Now()
			ret, err := stubOff.Run(opts)
			if err != nil {
				b.Fatal(err)
			}
			if int32(ret) != -1 {
				b.Fatalf("returned %d, want -1 (TC_NEXT)", int32(ret))
			}
			b.ReportMetric(float64(time.Since(start).Nanoseconds())/float64(b.N), "ns/op")
		})
	}
}
