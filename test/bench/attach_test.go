package bench

import (
	"net"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"

	"github.com/nsflow/nsflow/bpf"
	"github.com/nsflow/nsflow/test/testenv"
)

// BenchmarkAttach measures one TCX attach (BPF_LINK_CREATE) of each kind of
// program nsflow could attach: an empty program, the shared parser (what a
// design with one program for every hook attaches) and a fresh stub (what
// nsflow attaches: its load is measured by bpf's BenchmarkStubLoad). The
// kinds are interleaved over rounds; each figure is the median attach.
// Attaching swaps the hook's program list under RTNL and waits for an RCU
// grace period (tcx_entry_sync), so the figures follow the kernel's RCU
// mode (/sys/kernel/rcu_expedited, reported).
func BenchmarkAttach(b *testing.B) {
	testenv.RequireRoot(b)
	pods := newPods(b, "10.213.152.0/24", "bench-at")
	objs, err := bpf.Load(bpf.Options{})
	if err != nil {
		b.Fatal(err)
	}
	defer objs.Close()
	empty := emptyProgram(b)
	rounds := map[string][]float64{}
	kinds := []string{"empty", "parser", "stub"}
	for r := 0; r < 10; r++ {
		for k := range kinds {
			kind := kinds[(k+r)%len(kinds)]
			p := empty
			switch kind {
			case "parser":
				p = objs.NsflowIngress
			case "stub":
				if p, err = objs.Stub(bpf.NsflowObsKey{Netns: 1, Ifindex: uint32(r), Dir: uint8(bpf.RX)}); err != nil {
					b.Fatal(err)
				}
			}
			var l link.Link
			var d time.Duration
			err := pods[0].Do(func() error {
				i, err := net.InterfaceByName("eth0")
				if err != nil {
					return err
				}
				t0 := time.Now()
				l, err = link.AttachTCX(link.TCXOptions{Interface: i.Index, Program: p, Attach: ebpf.AttachTCXIngress, Anchor: link.Head()})
				d = time.Since(t0)
				return err
			})
			if kind == "stub" {
				p.Close()
			}
			if err != nil {
				b.Fatal(err)
			}
			l.Close()
			rounds[kind] = append(rounds[kind], float64(d.Microseconds()))
		}
	}
	for _, k := range kinds {
		b.ReportMetric(median(rounds[k]), "µs_attach/"+k)
	}
	exp, _ := os.ReadFile("/sys/kernel/rcu_expedited")
	b.Logf("rcu_expedited=%s; µs per attach by round: %v", strings.TrimSpace(string(exp)), rounds)
}
