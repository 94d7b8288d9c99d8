package collector

import (
	"fmt"
	"net/netip"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/nsflow/nsflow/collector/flow"
)

// jf builds a flow at namespace ino's interface in direction d with its
// own cgroup (the egress sender's, or the ingress socket lookup's).
func jf(ino uint64, iface string, d flow.Direction, proto flow.Protocol, src, dst string, sport, dport uint16, own uint64) flow.Flow {
	f := flow.Flow{Key: flow.Key{NetnsInode: ino, Interface: iface, Direction: d, Protocol: proto,
		Src: netip.MustParseAddr(src), Dst: netip.MustParseAddr(dst), SrcPort: sport, DstPort: dport}}
	if d == flow.TX {
		f.SrcCgroup = own
	} else {
		f.DstCgroup = own
	}
	return f
}

func joined(flows []flow.Flow) []flow.Flow {
	s := newSenderIndex(len(flows) / 2)
	for i := range flows {
		if f := &flows[i]; f.Direction == flow.TX && f.SrcCgroup != 0 {
			s.add(&f.Key, f.SrcCgroup)
		} else if f.Direction == flow.RX && f.DstCgroup != 0 {
			s.addReceiver(&f.Key, f.DstCgroup)
		}
	}
	s.join(flows)
	return flows
}

// TestJoin: the join rule on flows of two pods (namespaces 1 and 2), with
// and without the ingress socket lookup, and what it must not join.
func TestJoin(t *testing.T) {
	const tcp, udp, icmp = flow.Protocol(6), flow.Protocol(17), flow.Protocol(1)
	const web, sidecar, db, other = 11, 12, 21, 31
	for _, lookup := range []bool{true, false} {
		t.Run(fmt.Sprintf("lookup=%v", lookup), func(t *testing.T) {
			rx := func(own uint64) uint64 {
				if lookup {
					return own
				}
				return 0
			}
			flows := joined([]flow.Flow{
				// 0-3: web -> sidecar over pod 1's lo, and the reply.
				jf(1, "lo", flow.TX, tcp, "127.0.0.1", "127.0.0.1", 40000, 7070, web),
				jf(1, "lo", flow.RX, tcp, "127.0.0.1", "127.0.0.1", 40000, 7070, rx(sidecar)),
				jf(1, "lo", flow.TX, tcp, "127.0.0.1", "127.0.0.1", 7070, 40000, sidecar),
				jf(1, "lo", flow.RX, tcp, "127.0.0.1", "127.0.0.1", 7070, 40000, rx(web)),
				// 4-7: web (pod 1) -> db (pod 2) over eth0, and the reply.
				jf(1, "eth0", flow.TX, udp, "10.0.0.2", "10.0.0.3", 40001, 53, web),
				jf(2, "eth0", flow.RX, udp, "10.0.0.2", "10.0.0.3", 40001, 53, rx(db)),
				jf(2, "eth0", flow.TX, udp, "10.0.0.3", "10.0.0.2", 53, 40001, db),
				jf(1, "eth0", flow.RX, udp, "10.0.0.3", "10.0.0.2", 53, 40001, rx(web)),
				// 8: the same loopback tuple in pod 2, sent by another
				// container: never joined with pod 1's.
				jf(2, "lo", flow.RX, tcp, "127.0.0.1", "127.0.0.1", 7070, 40000, 0),
				// 9: one-way UDP in: no reverse flow.
				jf(2, "eth0", flow.RX, udp, "10.0.0.9", "10.0.0.3", 999, 514, rx(db)),
				// 10: ICMP: ports are type and code, no reverse tuple.
				jf(1, "eth0", flow.TX, icmp, "10.0.0.2", "10.0.0.3", 8, 0, web),
				jf(2, "eth0", flow.TX, icmp, "10.0.0.3", "10.0.0.2", 0, 0, db),
				// 12-13: namespace 3 sends db's reply tuple too (a
				// replica with the same address): in namespace 3 its own
				// sender is the receiver; elsewhere the lowest namespace's.
				jf(3, "eth0", flow.TX, udp, "10.0.0.3", "10.0.0.2", 53, 40001, other),
				jf(3, "eth0", flow.RX, udp, "10.0.0.2", "10.0.0.3", 40001, 53, 0),
				// 14-15: one-way UDP web -> sidecar over pod 1's lo: the
				// egress flow's receiver is the socket lookup's.
				jf(1, "lo", flow.TX, udp, "127.0.0.1", "127.0.0.1", 5000, 6000, web),
				jf(1, "lo", flow.RX, udp, "127.0.0.1", "127.0.0.1", 5000, 6000, rx(sidecar)),
				// 16-17: one-way UDP web (pod 1) -> db (pod 2) over eth0.
				jf(1, "eth0", flow.TX, udp, "10.0.0.2", "10.0.0.3", 777, 514, web),
				jf(2, "eth0", flow.RX, udp, "10.0.0.2", "10.0.0.3", 777, 514, rx(db)),
				// 18: a one-way loopback tuple pod 2 receives: never
				// pod 1's receiver.
				jf(2, "lo", flow.TX, udp, "127.0.0.1", "127.0.0.1", 5000, 6000, db),
			})
			want := [][2]uint64{
				{web, sidecar}, {web, sidecar}, {sidecar, web}, {sidecar, web},
				{web, db}, {web, db}, {db, web}, {db, web},
				{0, 0},
				{0, rx(db)},
				{web, 0}, {db, 0},
				{other, web}, {web, other},
				{web, rx(sidecar)}, {web, rx(sidecar)},
				{web, rx(db)}, {web, rx(db)},
				{db, 0},
			}
			for i, f := range flows {
				if got := [2]uint64{f.SrcCgroup, f.DstCgroup}; got != want[i] {
					t.Errorf("flow %d (%s %s:%d>%s:%d ns %d %s): cgroups %v, want %v", i, f.Protocol, f.Src, f.SrcPort, f.Dst, f.DstPort, f.NetnsInode, f.Direction, got, want[i])
				}
			}
		})
	}
}

// BenchmarkJoin: the snapshot's cost of attribution per flow (index and
// join), on 65,536 flows: TCP conversations, each flow's reverse present.
func BenchmarkJoin(b *testing.B) {
	const n = 65536
	base := make([]flow.Flow, 0, n)
	for i := 0; len(base) < n; i++ {
		a := netip.AddrFrom4([4]byte{10, 1, byte(i >> 8), byte(i)})
		base = append(base,
			jf(uint64(1+i%64), "eth0", flow.TX, 6, a.String(), "10.2.0.1", uint16(i), 80, uint64(100+i%50)),
			jf(uint64(1+i%64), "eth0", flow.RX, 6, "10.2.0.1", a.String(), 80, uint16(i), 0))
	}
	flows := make([]flow.Flow, n)
	cpu := func() int64 {
		var ru unix.Rusage
		unix.Getrusage(unix.RUSAGE_SELF, &ru)
		return ru.Utime.Nano() + ru.Stime.Nano()
	}
	b.ResetTimer()
	c0 := cpu()
	for b.Loop() {
		copy(flows, base)
		joined(flows)
	}
	// CPU time too: on a shared machine wall time mostly measures the
	// others' load.
	b.ReportMetric(float64(cpu()-c0)/float64(b.N)/n, "cpu-ns/flow")
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N)/n, "ns/flow")
}
