package bpf

import (
	"testing"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/gopacket/gopacket"
	"github.com/gopacket/gopacket/layers"
)

// emptyProgram is the baseline: a TC program that only returns TC_NEXT.
func emptyProgram(b *testing.B) *ebpf.Program {
	p, err := ebpf.NewProgram(&ebpf.ProgramSpec{
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

// BenchmarkProgram measures the programs in BPF_PROG_TEST_RUN (the kernel
// repeats the run and reports the mean): compare each variant with the
// empty program measured in the same run.
func BenchmarkProgram(b *testing.B) {
	udp := build(b, eth(layers.EthernetTypeIPv4), ipv4(layers.IPProtocolUDP), udpDgram(), gopacket.Payload(make([]byte, 64)))
	tcp6 := build(b, eth(layers.EthernetTypeIPv6), ipv6(layers.IPProtocolTCP), tcpSeg("A"), gopacket.Payload(make([]byte, 64)))
	full := load(b, Options{})
	totals := load(b, Options{NoFlows: true})
	for _, v := range []struct {
		name  string
		prog  *ebpf.Program
		frame []byte
	}{
		{"empty", emptyProgram(b), udp},
		{"totals_only/udp4", totals.NsflowEgress, udp},
		{"with_flows/udp4", full.NsflowEgress, udp},
		{"with_flows/tcp6", full.NsflowEgress, tcp6},
	} {
		b.Run(v.name, func(b *testing.B) {
			ret, d, err := v.prog.Benchmark(v.frame, b.N, b.ResetTimer)
			if err != nil {
				b.Fatal(err)
			}
			if int32(ret) != -1 {
				b.Fatalf("returned %d", int32(ret))
			}
			b.ReportMetric(float64(d.Nanoseconds()), "ns/run")
		})
	}
}
