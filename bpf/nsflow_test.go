package bpf

import (
	"bytes"
	"encoding/binary"
	"errors"
	"math/rand"
	"net"
	"net/netip"
	"testing"
	"time"
	"unsafe"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/ringbuf"
	"github.com/gopacket/gopacket"
	"github.com/gopacket/gopacket/layers"
	"golang.org/x/sys/unix"

	"github.com/nsflow/nsflow/test/testenv"
)

// Under BPF_PROG_TEST_RUN the packet's device is the loopback device of the
// calling thread's namespace: ifindex 1 of this process's netns.
const testIfindex = 1

func selfNetns(t testing.TB) uint32 {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Stat("/proc/self/ns/net", &st); err != nil {
		t.Fatal(err)
	}
	return uint32(st.Ino)
}

func load(t testing.TB, opts Options) *NsflowObjects {
	t.Helper()
	testenv.RequireRoot(t)
	objs, err := Load(opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { objs.Close() })
	return objs
}

var (
	mac1 = net.HardwareAddr{0x02, 0, 0, 0, 0, 1}
	mac2 = net.HardwareAddr{0x02, 0, 0, 0, 0, 2}
	ip4a = net.IP{10, 213, 0, 2}
	ip4b = net.IP{10, 213, 0, 3}
	ip6a = net.ParseIP("fd6e:7366:ad5::2")
	ip6b = net.ParseIP("fd6e:7366:ad5::3")
)

// build serializes layers into a frame, fixing lengths and checksums.
func build(t testing.TB, ls ...gopacket.SerializableLayer) []byte {
	t.Helper()
	type checksummed interface {
		SetNetworkLayerForChecksum(gopacket.NetworkLayer) error
	}
	for _, l := range ls {
		if c, ok := l.(checksummed); ok {
			for _, n := range ls {
				if nl, ok := n.(gopacket.NetworkLayer); ok {
					c.SetNetworkLayerForChecksum(nl)
				}
			}
		}
	}
	buf := gopacket.NewSerializeBuffer()
	if err := gopacket.SerializeLayers(buf, gopacket.SerializeOptions{FixLengths: true, ComputeChecksums: true}, ls...); err != nil {
		t.Fatal(err)
	}
	return append([]byte(nil), buf.Bytes()...)
}

func eth(typ layers.EthernetType) *layers.Ethernet {
	return &layers.Ethernet{SrcMAC: mac1, DstMAC: mac2, EthernetType: typ}
}

func ipv4(proto layers.IPProtocol) *layers.IPv4 {
	return &layers.IPv4{Version: 4, IHL: 5, TTL: 64, Protocol: proto, SrcIP: ip4a, DstIP: ip4b, Flags: layers.IPv4DontFragment}
}

func ipv6(next layers.IPProtocol) *layers.IPv6 {
	return &layers.IPv6{Version: 6, HopLimit: 64, NextHeader: next, SrcIP: ip6a, DstIP: ip6b}
}

// ext is a raw IPv6 extension header of 8*(1+units) bytes.
func ext(next layers.IPProtocol, units int) gopacket.Payload {
	b := make([]byte, 8*(units+1))
	b[0], b[1] = byte(next), byte(units)
	if units == 0 {
		b[2], b[3] = 1, 4 // a PadN option filling the header
	}
	return b
}

// fragHdr is an IPv6 fragment header.
func fragHdr(next layers.IPProtocol, offset8 uint16, more bool) gopacket.Payload {
	b := make([]byte, 8)
	b[0] = byte(next)
	v := offset8 << 3
	if more {
		v |= 1
	}
	binary.BigEndian.PutUint16(b[2:], v)
	binary.BigEndian.PutUint32(b[4:], 0xabcd)
	return b
}

func tcpSeg(flags string) *layers.TCP {
	t := &layers.TCP{SrcPort: 40000, DstPort: 8080, Seq: 1, Window: 1000}
	for _, f := range flags {
		switch f {
		case 'S':
			t.SYN = true
		case 'A':
			t.ACK = true
		case 'F':
			t.FIN = true
		case 'P':
			t.PSH = true
		case 'R':
			t.RST = true
		}
	}
	return t
}

func udpDgram() *layers.UDP { return &layers.UDP{SrcPort: 5353, DstPort: 53} }

// Reference semantics of nsflow.c's parser, written independently from the
// C: the oracle the programs are checked against.

type refResult struct {
	stat  NsflowStat // 0: a flow; else STAT_NON_IP or STAT_TRUNCATED
	key   NsflowFlowKey
	flags uint8
}

func refParse(f []byte) refResult {
	trunc := refResult{stat: NsflowStatSTAT_TRUNCATED}
	if len(f) < 14 {
		return trunc
	}
	proto, off := binary.BigEndian.Uint16(f[12:]), 14
	if proto == 0x8100 || proto == 0x88a8 {
		if len(f) < 18 {
			return trunc
		}
		proto, off = binary.BigEndian.Uint16(f[16:]), 18
	}
	var r refResult
	k := &r.key
	switch proto {
	case 0x0800:
		if len(f) < off+20 || f[off]>>4 != 4 || f[off]&0xf < 5 {
			return trunc
		}
		k.Family, k.Proto = 4, f[off+9]
		copy(k.Saddr[:4], f[off+12:])
		copy(k.Daddr[:4], f[off+16:])
		if binary.BigEndian.Uint16(f[off+6:])&0x1fff != 0 {
			return r
		}
		off += int(f[off]&0xf) * 4
	case 0x86dd:
		if len(f) < off+40 || f[off]>>4 != 6 {
			return trunc
		}
		k.Family = 6
		copy(k.Saddr[:], f[off+8:])
		copy(k.Daddr[:], f[off+24:])
		next := f[off+6]
		off += 40
	walk:
		for i := 0; i < 6; i++ {
			switch next {
			case 0, 43, 60: // hop-by-hop, routing, destination options
				if len(f) < off+2 {
					return trunc
				}
				next, off = f[off], off+(int(f[off+1])+1)*8
			case 51: // AH
				if len(f) < off+2 {
					return trunc
				}
				next, off = f[off], off+(int(f[off+1])+2)*4
			case 44: // fragment
				if len(f) < off+8 {
					return trunc
				}
				n, fo := f[off], binary.BigEndian.Uint16(f[off+2:])&0xfff8
				next, off = n, off+8
				if fo != 0 {
					k.Proto = next
					return r
				}
			default:
				break walk
			}
		}
		k.Proto = next
		switch next {
		case 0, 43, 60, 51, 44:
			return r
		}
		if off > 0xffff {
			return trunc
		}
	default:
		return refResult{stat: NsflowStatSTAT_NON_IP}
	}
	switch k.Proto {
	case 6:
		if len(f) < off+14 {
			return trunc
		}
		r.flags = f[off+13]
		k.Sport, k.Dport = binary.BigEndian.Uint16(f[off:]), binary.BigEndian.Uint16(f[off+2:])
	case 17, 136, 132:
		if len(f) < off+4 {
			return trunc
		}
		k.Sport, k.Dport = binary.BigEndian.Uint16(f[off:]), binary.BigEndian.Uint16(f[off+2:])
	case 1, 58:
		if len(f) < off+2 {
			return trunc
		}
		k.Sport, k.Dport = uint16(f[off]), uint16(f[off+1])
	}
	return r
}

// mapState is everything the programs wrote.
type mapState struct {
	totals map[NsflowObsKey]NsflowCounters
	flows  map[NsflowFlowKey]NsflowFlowVal
	stats  [NsflowStatSTAT_MAX]uint64
}

func readMaps(t testing.TB, objs *NsflowObjects) mapState {
	t.Helper()
	st := mapState{totals: map[NsflowObsKey]NsflowCounters{}, flows: map[NsflowFlowKey]NsflowFlowVal{}}
	var ok NsflowObsKey
	var cv []NsflowCounters
	it := objs.Totals.Iterate()
	for it.Next(&ok, &cv) {
		var sum NsflowCounters
		for _, v := range cv {
			sum.Packets += v.Packets
			sum.Bytes += v.Bytes
		}
		st.totals[ok] = sum
	}
	if err := it.Err(); err != nil {
		t.Fatal(err)
	}
	var fk NsflowFlowKey
	var fv []NsflowFlowVal
	it = objs.Flows.Iterate()
	for it.Next(&fk, &fv) {
		var sum NsflowFlowVal
		for _, v := range fv {
			sum.Packets += v.Packets
			sum.Bytes += v.Bytes
			sum.TcpFlags |= v.TcpFlags
			if v.FirstNs != 0 && (sum.FirstNs == 0 || v.FirstNs < sum.FirstNs) {
				sum.FirstNs = v.FirstNs
			}
			sum.LastNs = max(sum.LastNs, v.LastNs)
		}
		st.flows[fk] = sum
	}
	if err := it.Err(); err != nil {
		t.Fatal(err)
	}
	for i := range st.stats {
		var vals []uint64
		if err := objs.Stats.Lookup(uint32(i), &vals); err != nil {
			t.Fatal(err)
		}
		for _, v := range vals {
			st.stats[i] += v
		}
	}
	return st
}

func run(t testing.TB, p *ebpf.Program, frame []byte) {
	t.Helper()
	if !runMaybe(t, p, frame) {
		t.Fatalf("the kernel refused the %d-byte frame", len(frame))
	}
}

// kernelRefuses reports whether BPF_PROG_TEST_RUN rejects the frame before
// running the program: an IPv4 or IPv6 ethertype whose IP header does not
// fit (measured on 6.18). Such frames still reach real TC hooks; the
// VLAN-tagged rows cover the program's own checks for them.
func kernelRefuses(frame []byte) bool {
	switch binary.BigEndian.Uint16(frame[12:]) {
	case 0x0800:
		return len(frame) < 14+20
	case 0x86dd:
		return len(frame) < 14+40
	}
	return false
}

// runMaybe runs the program on a frame; it returns false for a frame the
// kernel refuses (see kernelRefuses), and fails on any other error.
func runMaybe(t testing.TB, p *ebpf.Program, frame []byte) bool {
	t.Helper()
	ret, err := p.Run(&ebpf.RunOptions{Data: frame})
	if err != nil {
		if kernelRefuses(frame) && errors.Is(err, unix.EINVAL) {
			return false
		}
		t.Fatalf("run: %v", err)
	}
	if int32(ret) != -1 {
		t.Fatalf("program returned %d, want -1 (TC_NEXT): it must never change a verdict", int32(ret))
	}
	return true
}

func addr4(ip net.IP) (a [16]uint8) { copy(a[:], ip.To4()); return }
func addr6(ip net.IP) (a [16]uint8) { copy(a[:], ip.To16()); return }

func TestFrames(t *testing.T) {
	testenv.RequireRoot(t)
	netns := selfNetns(t)
	type want struct {
		stat   NsflowStat // 0: a flow with key
		family uint8
		proto  uint8
		sport  uint16
		dport  uint16
		flags  uint8
	}
	frag4 := func(offset uint16, more bool) *layers.IPv4 {
		ip := ipv4(layers.IPProtocolUDP)
		ip.Flags, ip.FragOffset = 0, offset
		if more {
			ip.Flags = layers.IPv4MoreFragments
		}
		return ip
	}
	payload := gopacket.Payload(make([]byte, 32))
	tcpSYNACK := tcpSeg("SA")
	rows := []struct {
		name  string
		frame []byte
		want  want
	}{
		{"ipv4 tcp", build(t, eth(layers.EthernetTypeIPv4), ipv4(layers.IPProtocolTCP), tcpSYNACK, payload), want{0, 4, 6, 40000, 8080, 0x12}},
		{"ipv4 udp", build(t, eth(layers.EthernetTypeIPv4), ipv4(layers.IPProtocolUDP), udpDgram(), payload), want{0, 4, 17, 5353, 53, 0}},
		{"ipv4 icmp echo", build(t, eth(layers.EthernetTypeIPv4), ipv4(layers.IPProtocolICMPv4),
			&layers.ICMPv4{TypeCode: layers.CreateICMPv4TypeCode(8, 0), Id: 7, Seq: 1}, payload), want{0, 4, 1, 8, 0, 0}},
		{"ipv4 icmp unreachable", build(t, eth(layers.EthernetTypeIPv4), ipv4(layers.IPProtocolICMPv4),
			&layers.ICMPv4{TypeCode: layers.CreateICMPv4TypeCode(3, 3)}, payload), want{0, 4, 1, 3, 3, 0}},
		{"ipv6 tcp", build(t, eth(layers.EthernetTypeIPv6), ipv6(layers.IPProtocolTCP), tcpSeg("FA"), payload), want{0, 6, 6, 40000, 8080, 0x11}},
		{"ipv6 udp", build(t, eth(layers.EthernetTypeIPv6), ipv6(layers.IPProtocolUDP), udpDgram(), payload), want{0, 6, 17, 5353, 53, 0}},
		{"icmpv6 echo", build(t, eth(layers.EthernetTypeIPv6), ipv6(layers.IPProtocolICMPv6),
			&layers.ICMPv6{TypeCode: layers.CreateICMPv6TypeCode(128, 0)}, &layers.ICMPv6Echo{Identifier: 1, SeqNumber: 1}, payload), want{0, 6, 58, 128, 0, 0}},
		{"vlan 802.1q ipv4 udp", build(t, eth(layers.EthernetTypeDot1Q), &layers.Dot1Q{VLANIdentifier: 42, Type: layers.EthernetTypeIPv4},
			ipv4(layers.IPProtocolUDP), udpDgram(), payload), want{0, 4, 17, 5353, 53, 0}},
		{"vlan 802.1ad ipv6 tcp", build(t, eth(layers.EthernetTypeQinQ), &layers.Dot1Q{VLANIdentifier: 7, Type: layers.EthernetTypeIPv6},
			ipv6(layers.IPProtocolTCP), tcpSeg("S"), payload), want{0, 6, 6, 40000, 8080, 0x02}},
		{"ipv6 hop-by-hop + dstopts + udp", build(t, eth(layers.EthernetTypeIPv6), ipv6(0),
			ext(60, 0), ext(17, 1), udpDgram(), payload), want{0, 6, 17, 5353, 53, 0}},
		{"ipv6 routing + tcp", build(t, eth(layers.EthernetTypeIPv6), ipv6(43), ext(6, 2), tcpSeg("A"), payload), want{0, 6, 6, 40000, 8080, 0x10}},
		{"ipv6 first fragment", build(t, eth(layers.EthernetTypeIPv6), ipv6(44), fragHdr(17, 0, true), udpDgram(), payload), want{0, 6, 17, 5353, 53, 0}},
		{"ipv6 later fragment", build(t, eth(layers.EthernetTypeIPv6), ipv6(44), fragHdr(17, 185, false), payload), want{0, 6, 17, 0, 0, 0}},
		{"ipv4 first fragment", build(t, eth(layers.EthernetTypeIPv4), frag4(0, true), udpDgram(), payload), want{0, 4, 17, 5353, 53, 0}},
		{"ipv4 later fragment", build(t, eth(layers.EthernetTypeIPv4), frag4(185, false), payload), want{0, 4, 17, 0, 0, 0}},
		{"gre (no ports)", build(t, eth(layers.EthernetTypeIPv4), ipv4(layers.IPProtocolGRE), payload), want{0, 4, 47, 0, 0, 0}},
		{"arp", build(t, eth(layers.EthernetTypeARP), &layers.ARP{AddrType: layers.LinkTypeEthernet, Protocol: layers.EthernetTypeIPv4,
			HwAddressSize: 6, ProtAddressSize: 4, Operation: 1, SourceHwAddress: mac1, SourceProtAddress: ip4a,
			DstHwAddress: make([]byte, 6), DstProtAddress: ip4b}), want{stat: NsflowStatSTAT_NON_IP}},
		{"ipv4 options cut", func() []byte {
			f := build(t, eth(layers.EthernetTypeIPv4), ipv4(layers.IPProtocolUDP), udpDgram())[:14+20+8]
			f[14] = 0x4f // IHL 15: 40 bytes of options the frame does not have
			return f
		}(), want{stat: NsflowStatSTAT_TRUNCATED}},
		{"ipv6 without ext header", build(t, eth(layers.EthernetTypeIPv6), ipv6(0))[:14+40], want{stat: NsflowStatSTAT_TRUNCATED}},
		{"tcp header cut", build(t, eth(layers.EthernetTypeIPv4), ipv4(layers.IPProtocolTCP), tcpSeg("S"))[:14+20+10], want{stat: NsflowStatSTAT_TRUNCATED}},
		{"ipv6 ext header cut", build(t, eth(layers.EthernetTypeIPv6), ipv6(0), ext(17, 1), udpDgram())[:14+40+1], want{stat: NsflowStatSTAT_TRUNCATED}},
		{"vlan tag cut", build(t, eth(layers.EthernetTypeDot1Q), gopacket.Payload{0, 42})[:16], want{stat: NsflowStatSTAT_TRUNCATED}},
		{"vlan ipv4 header cut", build(t, eth(layers.EthernetTypeDot1Q), &layers.Dot1Q{Type: layers.EthernetTypeIPv4},
			ipv4(layers.IPProtocolUDP), udpDgram())[:18+12], want{stat: NsflowStatSTAT_TRUNCATED}},
		{"ipv4 bad version", func() []byte {
			f := build(t, eth(layers.EthernetTypeIPv4), ipv4(layers.IPProtocolUDP), udpDgram())
			f[14] = 0x65
			return f
		}(), want{stat: NsflowStatSTAT_TRUNCATED}},
		{"ipv4 bad ihl", func() []byte {
			f := build(t, eth(layers.EthernetTypeIPv4), ipv4(layers.IPProtocolUDP), udpDgram())
			f[14] = 0x44
			return f
		}(), want{stat: NsflowStatSTAT_TRUNCATED}},
	}
	for _, row := range rows {
		for _, dir := range []Direction{RX, TX} {
			t.Run(row.name+"/"+map[Direction]string{RX: "ingress", TX: "egress"}[dir], func(t *testing.T) {
				objs := load(t, Options{})
				prog := objs.NsflowIngress
				if dir == TX {
					prog = objs.NsflowEgress
				}
				const repeat = 3
				for i := 0; i < repeat; i++ {
					run(t, prog, row.frame)
				}
				st := readMaps(t, objs)
				ok := NsflowObsKey{Netns: netns, Ifindex: testIfindex, Dir: uint8(dir)}
				wantTotals := NsflowCounters{Packets: repeat, Bytes: repeat * uint64(len(row.frame))}
				if len(st.totals) != 1 || st.totals[ok] != wantTotals {
					t.Errorf("totals %+v, want exactly {%+v: %+v}", st.totals, ok, wantTotals)
				}
				var wantStats [NsflowStatSTAT_MAX]uint64
				if row.want.stat != 0 {
					wantStats[row.want.stat] = repeat
					if len(st.flows) != 0 {
						t.Errorf("flows %+v, want none", st.flows)
					}
				} else {
					wantStats[NsflowStatSTAT_FLOW_NEW] = 1
					k := NsflowFlowKey{Netns: netns, Ifindex: testIfindex, Dir: uint8(dir), Family: row.want.family,
						Proto: row.want.proto, Sport: row.want.sport, Dport: row.want.dport}
					if row.want.family == 4 {
						k.Saddr, k.Daddr = addr4(ip4a), addr4(ip4b)
					} else {
						k.Saddr, k.Daddr = addr6(ip6a), addr6(ip6b)
					}
					v, found := st.flows[k]
					if len(st.flows) != 1 || !found {
						t.Fatalf("flows %+v, want exactly %+v", st.flows, k)
					}
					if v.Packets != repeat || v.Bytes != wantTotals.Bytes || v.TcpFlags != row.want.flags || v.FirstNs == 0 || v.LastNs < v.FirstNs {
						t.Errorf("flow value %+v, want %d packets, %d bytes, flags %#x, timestamps set", v, repeat, wantTotals.Bytes, row.want.flags)
					}
					if ref := refParse(row.frame); ref.stat != 0 || ref.key.Proto != k.Proto || ref.key.Sport != k.Sport || ref.key.Dport != k.Dport {
						t.Errorf("reference parser disagrees with the expectation: %+v", ref)
					}
				}
				if st.stats != wantStats {
					t.Errorf("stats %v, want %v", st.stats, wantStats)
				}
			})
		}
	}
}

// PROG_TEST_RUN itself refuses frames shorter than an Ethernet header.
func TestShortFrameRejected(t *testing.T) {
	objs := load(t, Options{})
	if _, err := objs.NsflowIngress.Run(&ebpf.RunOptions{Data: make([]byte, 13)}); err == nil {
		t.Error("a 13-byte frame was accepted")
	}
}

// The reference parser agrees with gopacket on well-formed frames, so it is
// a trustworthy oracle.
func TestReferenceParserAgreesWithGopacket(t *testing.T) {
	frames := [][]byte{
		build(t, eth(layers.EthernetTypeIPv4), ipv4(layers.IPProtocolTCP), tcpSeg("SA")),
		build(t, eth(layers.EthernetTypeIPv6), ipv6(layers.IPProtocolUDP), udpDgram()),
		build(t, eth(layers.EthernetTypeDot1Q), &layers.Dot1Q{VLANIdentifier: 3, Type: layers.EthernetTypeIPv4}, ipv4(layers.IPProtocolUDP), udpDgram()),
		build(t, eth(layers.EthernetTypeIPv6), ipv6(0), ext(60, 0), ext(6, 1), tcpSeg("A")),
	}
	for i, f := range frames {
		ref := refParse(f)
		p := gopacket.NewPacket(f, layers.LayerTypeEthernet, gopacket.Default)
		var src, dst netip.Addr
		if n := p.NetworkLayer(); n != nil {
			src, _ = netip.AddrFromSlice(n.NetworkFlow().Src().Raw())
			dst, _ = netip.AddrFromSlice(n.NetworkFlow().Dst().Raw())
		}
		tl := p.TransportLayer()
		if tl == nil {
			t.Fatalf("frame %d: gopacket found no transport layer", i)
		}
		sp := binary.BigEndian.Uint16(tl.TransportFlow().Src().Raw())
		dp := binary.BigEndian.Uint16(tl.TransportFlow().Dst().Raw())
		var rs, rd netip.Addr
		if ref.key.Family == 4 {
			rs, rd = netip.AddrFrom4([4]byte(ref.key.Saddr[:4])), netip.AddrFrom4([4]byte(ref.key.Daddr[:4]))
		} else {
			rs, rd = netip.AddrFrom16(ref.key.Saddr), netip.AddrFrom16(ref.key.Daddr)
		}
		if rs != src || rd != dst || ref.key.Sport != sp || ref.key.Dport != dp {
			t.Errorf("frame %d: reference %s:%d > %s:%d, gopacket %s:%d > %s:%d", i, rs, ref.key.Sport, rd, ref.key.Dport, src, sp, dst, dp)
		}
	}
}

// checkAgainstReference sends frames through a program and checks every
// invariant: verdict untouched, totals exact, flows exactly the reference's.
func checkAgainstReference(t testing.TB, objs *NsflowObjects, frames [][]byte) {
	t.Helper()
	netns := selfNetns(t)
	wantFlows := map[NsflowFlowKey]NsflowCounters{}
	var wantStats [NsflowStatSTAT_MAX]uint64
	var bytes uint64
	sent := 0
	for _, f := range frames {
		if !runMaybe(t, objs.NsflowEgress, f) {
			continue
		}
		sent++
		bytes += uint64(len(f))
		ref := refParse(f)
		if ref.stat != 0 {
			wantStats[ref.stat]++
			continue
		}
		ref.key.Netns, ref.key.Ifindex, ref.key.Dir = netns, testIfindex, uint8(TX)
		c := wantFlows[ref.key]
		if c.Packets == 0 {
			wantStats[NsflowStatSTAT_FLOW_NEW]++
		}
		c.Packets++
		c.Bytes += uint64(len(f))
		wantFlows[ref.key] = c
	}
	st := readMaps(t, objs)
	ok := NsflowObsKey{Netns: netns, Ifindex: testIfindex, Dir: uint8(TX)}
	if sent == 0 {
		return
	}
	if got := st.totals[ok]; got.Packets != uint64(sent) || got.Bytes != bytes || len(st.totals) != 1 {
		t.Fatalf("totals %+v, want %d packets %d bytes", st.totals, sent, bytes)
	}
	if len(st.flows) != len(wantFlows) {
		t.Errorf("%d flows, reference %d", len(st.flows), len(wantFlows))
	}
	for k, v := range st.flows {
		w, ok := wantFlows[k]
		if !ok {
			t.Errorf("wrong flow %+v: the reference parser made no such key", k)
			continue
		}
		if v.Packets != w.Packets || v.Bytes != w.Bytes {
			t.Errorf("flow %+v: %d packets %d bytes, reference %d/%d", k, v.Packets, v.Bytes, w.Packets, w.Bytes)
		}
	}
	if st.stats != wantStats {
		t.Errorf("stats %v, reference %v", st.stats, wantStats)
	}
}

func seedFrames(t testing.TB) [][]byte {
	return [][]byte{
		build(t, eth(layers.EthernetTypeIPv4), ipv4(layers.IPProtocolTCP), tcpSeg("SA")),
		build(t, eth(layers.EthernetTypeIPv4), ipv4(layers.IPProtocolUDP), udpDgram()),
		build(t, eth(layers.EthernetTypeIPv6), ipv6(layers.IPProtocolTCP), tcpSeg("P")),
		build(t, eth(layers.EthernetTypeIPv6), ipv6(0), ext(60, 0), ext(44, 1), fragHdr(17, 0, true), udpDgram()),
		build(t, eth(layers.EthernetTypeDot1Q), &layers.Dot1Q{VLANIdentifier: 9, Type: layers.EthernetTypeIPv6}, ipv6(layers.IPProtocolICMPv6),
			&layers.ICMPv6{TypeCode: layers.CreateICMPv6TypeCode(135, 0)}),
		build(t, eth(layers.EthernetTypeIPv4), ipv4(51), gopacket.Payload(make([]byte, 16))),
	}
}

// Random and mutated frames: never a crash, never a verdict, never a wrong
// flow, totals exact.
func TestRandomFrames(t *testing.T) {
	objs := load(t, Options{})
	rng := rand.New(rand.NewSource(1))
	seeds := seedFrames(t)
	types := []uint16{0x0800, 0x86dd, 0x8100, 0x88a8}
	var frames [][]byte
	for i := 0; i < 20000; i++ {
		var f []byte
		if i%2 == 0 {
			f = make([]byte, 14+rng.Intn(120))
			rng.Read(f)
			binary.BigEndian.PutUint16(f[12:], types[rng.Intn(len(types))])
			if rng.Intn(2) == 0 && len(f) > 14 {
				f[14] = f[14]&0x0f | []byte{0x40, 0x60}[rng.Intn(2)] // plausible IP version
			}
		} else {
			s := seeds[rng.Intn(len(seeds))]
			f = append([]byte(nil), s[:14+rng.Intn(len(s)-13)]...)
			for j := rng.Intn(4); j >= 0; j-- {
				f[rng.Intn(len(f))] ^= 1 << rng.Intn(8)
			}
			if len(f) < 14 {
				continue
			}
		}
		frames = append(frames, f)
	}
	checkAgainstReference(t, objs, frames)
	t.Logf("%d random and mutated frames checked against the reference parser", len(frames))
}

func FuzzProgram(f *testing.F) {
	testenv.RequireRoot(f)
	for _, s := range seedFrames(f) {
		f.Add(s)
	}
	objs, err := Load(Options{})
	if err != nil {
		f.Fatal(err)
	}
	f.Cleanup(func() { objs.Close() })
	f.Fuzz(func(t *testing.T, frame []byte) {
		if len(frame) < 14 || len(frame) > 1500 {
			t.Skip()
		}
		// Fresh maps per input: clear what the previous input left.
		clearMaps(t, objs)
		checkAgainstReference(t, objs, [][]byte{frame})
	})
}

func clearMaps(t testing.TB, objs *NsflowObjects) {
	t.Helper()
	var ok NsflowObsKey
	var cv []NsflowCounters
	var okeys []NsflowObsKey
	for it := objs.Totals.Iterate(); it.Next(&ok, &cv); {
		okeys = append(okeys, ok)
	}
	for _, k := range okeys {
		objs.Totals.Delete(k)
	}
	var fk NsflowFlowKey
	var fv []NsflowFlowVal
	var fkeys []NsflowFlowKey
	for it := objs.Flows.Iterate(); it.Next(&fk, &fv); {
		fkeys = append(fkeys, fk)
	}
	for _, k := range fkeys {
		objs.Flows.Delete(k)
	}
	zero := make([]uint64, ebpf.MustPossibleCPU())
	for i := uint32(0); i < uint32(NsflowStatSTAT_MAX); i++ {
		if err := objs.Stats.Put(i, zero); err != nil {
			t.Fatal(err)
		}
	}
}

// The Go side relies on these layouts and map shapes.
func TestLayout(t *testing.T) {
	for _, c := range []struct {
		name string
		got  uintptr
		want uintptr
	}{
		{"obs_key", unsafe.Sizeof(NsflowObsKey{}), 12},
		{"flow_key", unsafe.Sizeof(NsflowFlowKey{}), 48},
		{"counters", unsafe.Sizeof(NsflowCounters{}), 16},
		{"flow_val", unsafe.Sizeof(NsflowFlowVal{}), 40},
	} {
		if c.got != c.want {
			t.Errorf("sizeof(%s) = %d, want %d", c.name, c.got, c.want)
		}
	}
	objs := load(t, Options{FlowEntries: 1234})
	for _, m := range []struct {
		m          *ebpf.Map
		typ        ebpf.MapType
		key, value uint32
		max        uint32
	}{
		{objs.Totals, ebpf.PerCPUHash, 12, 16, 65536},
		{objs.Flows, ebpf.LRUCPUHash, 48, 40, 1234},
		{objs.Stats, ebpf.PerCPUArray, 4, 8, uint32(NsflowStatSTAT_MAX)},
	} {
		if m.m.Type() != m.typ || m.m.KeySize() != m.key || m.m.ValueSize() != m.value || m.m.MaxEntries() != m.max {
			t.Errorf("map %s: %s key %d value %d max %d, want %s %d %d %d", m.m, m.m.Type(), m.m.KeySize(), m.m.ValueSize(),
				m.m.MaxEntries(), m.typ, m.key, m.value, m.max)
		}
	}
}

// NoFlows keeps the exact totals and no flows.
func TestNoFlows(t *testing.T) {
	objs := load(t, Options{NoFlows: true})
	f := build(t, eth(layers.EthernetTypeIPv4), ipv4(layers.IPProtocolUDP), udpDgram())
	run(t, objs.NsflowIngress, f)
	st := readMaps(t, objs)
	if len(st.flows) != 0 || len(st.totals) != 1 {
		t.Errorf("NoFlows: %d flows, %d totals; want 0 and 1", len(st.flows), len(st.totals))
	}
}

// A full flow map evicts old flows (LRU) while the totals stay exact.
func TestFlowMapFull(t *testing.T) {
	objs := load(t, Options{FlowEntries: 64})
	var frames [][]byte
	for i := 0; i < 1000; i++ {
		u := udpDgram()
		u.SrcPort = layers.UDPPort(10000 + i)
		frames = append(frames, build(t, eth(layers.EthernetTypeIPv4), ipv4(layers.IPProtocolUDP), u))
	}
	for _, f := range frames {
		run(t, objs.NsflowIngress, f)
	}
	st := readMaps(t, objs)
	ok := NsflowObsKey{Netns: selfNetns(t), Ifindex: testIfindex, Dir: uint8(RX)}
	if st.totals[ok].Packets != 1000 {
		t.Errorf("totals %d packets, want 1000", st.totals[ok].Packets)
	}
	if len(st.flows) > 64 || st.stats[NsflowStatSTAT_FLOW_NEW] != 1000 {
		t.Errorf("%d flows (cap 64), %d created (want 1000)", len(st.flows), st.stats[NsflowStatSTAT_FLOW_NEW])
	}
}

// With Events, every new flow is reported once, in order, through the ring
// buffer; packets of known flows report nothing.
func TestFlowEvents(t *testing.T) {
	objs := load(t, Options{Events: true})
	rd, err := ringbuf.NewReader(objs.FlowEvents)
	if err != nil {
		t.Fatal(err)
	}
	defer rd.Close()
	var frames [][]byte
	for i := 0; i < 5; i++ {
		u := udpDgram()
		u.DstPort = layers.UDPPort(7000 + i)
		f := build(t, eth(layers.EthernetTypeIPv4), ipv4(layers.IPProtocolUDP), u)
		frames = append(frames, f, f) // the second packet of a flow is no event
	}
	for _, f := range frames {
		run(t, objs.NsflowIngress, f)
	}
	rd.SetDeadline(time.Now().Add(time.Second))
	var last uint64
	for i := 0; i < 5; i++ {
		rec, err := rd.Read()
		if err != nil {
			t.Fatalf("event %d: %v", i, err)
		}
		var ev NsflowFlowEvent
		if err := binary.Read(bytes.NewReader(rec.RawSample), binary.NativeEndian, &ev); err != nil {
			t.Fatal(err)
		}
		if ev.Key.Dport != uint16(7000+i) || ev.Key.Proto != 17 || ev.TsNs < last {
			t.Errorf("event %d: %+v, want dport %d in time order", i, ev, 7000+i)
		}
		last = ev.TsNs
	}
	if rec, err := rd.Read(); err == nil {
		t.Errorf("unexpected extra event: %x", rec.RawSample)
	}
	if st := readMaps(t, objs); st.stats[NsflowStatSTAT_EVENTS_LOST] != 0 {
		t.Errorf("%d events lost", st.stats[NsflowStatSTAT_EVENTS_LOST])
	}
}
