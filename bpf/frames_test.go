package bpf

import (
	"encoding/binary"
	"net"
	"testing"

	"github.com/gopacket/gopacket"
	"github.com/gopacket/gopacket/layers"
)

// Frames for the tests, built with gopacket, and the table of frame kinds
// that TestFrames checks row by row and the random and fuzz tests start from.

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
					if err := c.SetNetworkLayerForChecksum(nl); err != nil {
						t.Fatal(err)
					}
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

func vlan(id uint16, inner layers.EthernetType) *layers.Dot1Q {
	return &layers.Dot1Q{VLANIdentifier: id, Type: inner}
}

func ipv4(proto layers.IPProtocol) *layers.IPv4 {
	return &layers.IPv4{Version: 4, IHL: 5, TTL: 64, Protocol: proto, SrcIP: ip4a, DstIP: ip4b, Flags: layers.IPv4DontFragment}
}

// frag4 is an IPv4 header of a fragment at offset8 (in 8-byte units).
func frag4(proto layers.IPProtocol, offset8 uint16, more bool) *layers.IPv4 {
	ip := ipv4(proto)
	ip.Flags, ip.FragOffset = 0, offset8
	if more {
		ip.Flags = layers.IPv4MoreFragments
	}
	return ip
}

func ipv6(next layers.IPProtocol) *layers.IPv6 {
	return &layers.IPv6{Version: 6, HopLimit: 64, NextHeader: next, SrcIP: ip6a, DstIP: ip6b}
}

// padN is an IPv6 option that pads a hop-by-hop or destination options
// header with no other option to its minimum of 8 bytes.
func padN() []byte { return []byte{0, 0, 0, 0} }

func hopByHop(next layers.IPProtocol) *layers.IPv6HopByHop {
	h := &layers.IPv6HopByHop{Options: []*layers.IPv6HopByHopOption{{OptionType: 1, OptionData: padN()}}}
	h.NextHeader = next
	return h
}

func dstOpts(next layers.IPProtocol) *layers.IPv6Destination {
	d := &layers.IPv6Destination{Options: []*layers.IPv6DestinationOption{{OptionType: 1, OptionData: padN()}}}
	d.NextHeader = next
	return d
}

// routing is a type 0 routing header with one address (24 bytes: the
// length field, in 8-byte units after the first 8, is 2).
func routing(next layers.IPProtocol) *layers.IPv6Routing {
	r := &layers.IPv6Routing{RoutingType: 0, SegmentsLeft: 0, Reserved: make([]byte, 4), SourceRoutingIPs: []net.IP{ip6b}}
	r.NextHeader = next
	return r
}

func frag6(next layers.IPProtocol, offset8 uint16, more bool) *layers.IPv6Fragment {
	return &layers.IPv6Fragment{NextHeader: next, FragmentOffset: offset8, MoreFragments: more, Identification: 0xabcd}
}

// authHeader is an IPsec AH header with a 12-byte ICV: 24 bytes, its length
// field in 4-byte units minus 2 (gopacket decodes AH but cannot build it).
func authHeader(next layers.IPProtocol) gopacket.Payload {
	b := make([]byte, 24)
	b[0], b[1] = byte(next), 24/4-2
	binary.BigEndian.PutUint32(b[4:], 0x1000) // SPI
	binary.BigEndian.PutUint32(b[8:], 1)      // sequence number
	return b
}

// udpLite is a UDP-Lite header (gopacket decodes it but cannot build it).
func udpLite(sport, dport uint16) gopacket.Payload {
	b := make([]byte, 8)
	binary.BigEndian.PutUint16(b[0:], sport)
	binary.BigEndian.PutUint16(b[2:], dport)
	b[5] = 8 // checksum coverage: the header
	return b
}

func tcpSeg(flags string) *layers.TCP {
	t := &layers.TCP{SrcPort: 40000, DstPort: 8080, Seq: 1, Window: 1000}
	for _, f := range flags {
		switch f {
		case 'F':
			t.FIN = true
		case 'S':
			t.SYN = true
		case 'R':
			t.RST = true
		case 'P':
			t.PSH = true
		case 'A':
			t.ACK = true
		case 'U':
			t.URG = true
		case 'E':
			t.ECE = true
		case 'C':
			t.CWR = true
		}
	}
	return t
}

func udpDgram() *layers.UDP { return &layers.UDP{SrcPort: 5353, DstPort: 53} }

func payload(n int) gopacket.Payload { return make([]byte, n) }

// wantFlow is the flow a frame must make; the observation point (netns,
// ifindex, direction) is the test's.
type wantFlow struct {
	family       uint8
	proto        uint8
	saddr, daddr net.IP
	sport, dport uint16
	flags        uint8 // TCP flags
}

func flow4(proto uint8, sport, dport uint16, flags uint8) wantFlow {
	return wantFlow{family: 4, proto: proto, saddr: ip4a, daddr: ip4b, sport: sport, dport: dport, flags: flags}
}

func flow6(proto uint8, sport, dport uint16, flags uint8) wantFlow {
	return wantFlow{family: 6, proto: proto, saddr: ip6a, daddr: ip6b, sport: sport, dport: dport, flags: flags}
}

// key is the flow key the programs must write for w at an observation point.
func (w wantFlow) key(netns, ifindex uint32, dir Direction) pointFlow {
	k := pointFlow{Netns: netns, Ifindex: ifindex, Dir: uint8(dir),
		NsflowFlowKey: NsflowFlowKey{Family: w.family, Proto: w.proto, Sport: w.sport, Dport: w.dport}}
	if w.family == 4 {
		copy(k.Saddr[:], w.saddr.To4())
		copy(k.Daddr[:], w.daddr.To4())
	} else {
		copy(k.Saddr[:], w.saddr.To16())
		copy(k.Daddr[:], w.daddr.To16())
	}
	return k
}

// frameRow is one frame kind and what the programs must make of it.
type frameRow struct {
	name  string
	frame []byte
	// res is PARSE_FLOW (zero) when the frame makes the flow want;
	// otherwise the frame is in the totals only and counted in
	// stats[res.stat()] (STAT_NON_IP or STAT_TRUNCATED).
	res  NsflowParseResult
	want wantFlow
	// notGopacket, when set, says why gopacket's decoding cannot confirm
	// this row: nsflow's documented semantics read less than a full decoder
	// requires.
	notGopacket string
}

// cut returns the first n bytes of frame.
func cut(frame []byte, n int) []byte { return frame[:n] }

// patched returns a copy of frame with b written at off.
func patched(frame []byte, off int, b ...byte) []byte {
	f := append([]byte(nil), frame...)
	copy(f[off:], b)
	return f
}

// frameRows is the table of frame kinds. Expectations are written by hand
// from nsflow.c's documented semantics: ports in host byte order, ICMP type
// and code in the ports, one VLAN tag, IPv4 version and IHL checked, no
// transport header in non-first fragments, at most 6 IPv6 extension headers
// walked, and a frame too short for the headers it announces counted as
// truncated.
func frameRows(t testing.TB) []frameRow {
	t.Helper()
	const (
		tcp     = uint8(layers.IPProtocolTCP)
		udp     = uint8(layers.IPProtocolUDP)
		icmp    = uint8(layers.IPProtocolICMPv4)
		icmp6   = uint8(layers.IPProtocolICMPv6)
		sctp    = uint8(layers.IPProtocolSCTP)
		udplite = uint8(layers.IPProtocolUDPLite)
		gre     = uint8(layers.IPProtocolGRE)
		dstopts = uint8(layers.IPProtocolIPv6Destination)
		synAck  = 0x12
		finAck  = 0x11
		syn     = 0x02
		ack     = 0x10
		pshAck  = 0x18
	)
	E4, E6 := layers.EthernetTypeIPv4, layers.EthernetTypeIPv6
	P := layers.IPProtocolUDP
	arp := &layers.ARP{AddrType: layers.LinkTypeEthernet, Protocol: E4, HwAddressSize: 6, ProtAddressSize: 4, Operation: 1,
		SourceHwAddress: mac1, SourceProtAddress: ip4a, DstHwAddress: make([]byte, 6), DstProtAddress: ip4b}
	// An IPv4 header with a 4-byte option (router alert): IHL 6.
	withOptions := ipv4(layers.IPProtocolUDP)
	withOptions.Options = []layers.IPv4Option{{OptionType: 148, OptionLength: 4, OptionData: []byte{0, 0}}}
	// The bytes of a TCP header with SYN behind a later fragment's offset:
	// data, not a header, so neither ports nor flags may be read from them.
	fakeTCP := func() gopacket.Payload {
		buf := gopacket.NewSerializeBuffer()
		if err := tcpSeg("S").SerializeTo(buf, gopacket.SerializeOptions{FixLengths: true}); err != nil {
			t.Fatal(err)
		}
		return buf.Bytes()
	}()

	return []frameRow{
		// Transport protocols over IPv4 and IPv6.
		{name: "ipv4/tcp syn-ack", frame: build(t, eth(E4), ipv4(layers.IPProtocolTCP), tcpSeg("SA"), payload(32)), want: flow4(tcp, 40000, 8080, synAck)},
		{name: "ipv4/tcp psh-ack with options", frame: build(t, eth(E4), ipv4(layers.IPProtocolTCP), func() *layers.TCP {
			s := tcpSeg("PA")
			s.Options = []layers.TCPOption{{OptionType: layers.TCPOptionKindMSS, OptionLength: 4, OptionData: []byte{0x05, 0xb4}}}
			return s
		}(), payload(10)), want: flow4(tcp, 40000, 8080, pshAck)},
		{name: "ipv4/udp", frame: build(t, eth(E4), ipv4(P), udpDgram(), payload(32)), want: flow4(udp, 5353, 53, 0)},
		{name: "ipv4/icmp echo", frame: build(t, eth(E4), ipv4(layers.IPProtocolICMPv4),
			&layers.ICMPv4{TypeCode: layers.CreateICMPv4TypeCode(8, 0), Id: 7, Seq: 1}, payload(32)), want: flow4(icmp, 8, 0, 0)},
		{name: "ipv4/icmp port unreachable", frame: build(t, eth(E4), ipv4(layers.IPProtocolICMPv4),
			&layers.ICMPv4{TypeCode: layers.CreateICMPv4TypeCode(3, 3)}, payload(28)), want: flow4(icmp, 3, 3, 0)},
		{name: "ipv4/options/udp", frame: build(t, eth(E4), withOptions, udpDgram(), payload(8)), want: flow4(udp, 5353, 53, 0)},
		{name: "ipv4/sctp", frame: build(t, eth(E4), ipv4(layers.IPProtocolSCTP), &layers.SCTP{SrcPort: 3868, DstPort: 3869, VerificationTag: 1}),
			want: flow4(sctp, 3868, 3869, 0)},
		{name: "ipv4/udplite", frame: build(t, eth(E4), ipv4(layers.IPProtocolUDPLite), udpLite(1234, 4321), payload(8)), want: flow4(udplite, 1234, 4321, 0)},
		{name: "ipv4/gre (no ports)", frame: build(t, eth(E4), ipv4(layers.IPProtocolGRE), payload(32)), want: flow4(gre, 0, 0, 0)},
		{name: "ipv6/tcp fin-ack", frame: build(t, eth(E6), ipv6(layers.IPProtocolTCP), tcpSeg("FA"), payload(32)), want: flow6(tcp, 40000, 8080, finAck)},
		{name: "ipv6/udp", frame: build(t, eth(E6), ipv6(P), udpDgram(), payload(32)), want: flow6(udp, 5353, 53, 0)},
		{name: "ipv6/icmpv6 echo request", frame: build(t, eth(E6), ipv6(layers.IPProtocolICMPv6),
			&layers.ICMPv6{TypeCode: layers.CreateICMPv6TypeCode(128, 0)}, &layers.ICMPv6Echo{Identifier: 1, SeqNumber: 1}, payload(32)),
			want: flow6(icmp6, 128, 0, 0)},

		// VLAN tags: one is parsed.
		{name: "802.1q/ipv4/udp", frame: build(t, eth(layers.EthernetTypeDot1Q), vlan(42, E4), ipv4(P), udpDgram(), payload(32)),
			want: flow4(udp, 5353, 53, 0)},
		{name: "802.1ad/ipv6/tcp syn", frame: build(t, eth(layers.EthernetTypeQinQ), vlan(7, E6), ipv6(layers.IPProtocolTCP), tcpSeg("S"), payload(32)),
			want: flow6(tcp, 40000, 8080, syn)},
		{name: "802.1ad+802.1q (two tags: not parsed)", frame: build(t, eth(layers.EthernetTypeQinQ), vlan(7, layers.EthernetTypeDot1Q), vlan(42, E4),
			ipv4(P), udpDgram(), payload(32)), res: NsflowParseResultPARSE_NON_IP},

		// IPv6 extension headers.
		{name: "ipv6/hop-by-hop+dstopts/udp", frame: build(t, eth(E6), ipv6(layers.IPProtocolIPv6HopByHop),
			hopByHop(layers.IPProtocolIPv6Destination), dstOpts(P), udpDgram(), payload(32)), want: flow6(udp, 5353, 53, 0)},
		{name: "ipv6/routing/tcp", frame: build(t, eth(E6), ipv6(layers.IPProtocolIPv6Routing), routing(layers.IPProtocolTCP), tcpSeg("A"), payload(32)),
			want: flow6(tcp, 40000, 8080, ack)},
		{name: "ipv6/ah/tcp", frame: build(t, eth(E6), ipv6(layers.IPProtocolAH), authHeader(layers.IPProtocolTCP), tcpSeg("S"), payload(32)),
			want: flow6(tcp, 40000, 8080, syn)},
		{name: "ipv6/6 extension headers/udp", frame: build(t, eth(E6), ipv6(layers.IPProtocolIPv6HopByHop),
			hopByHop(layers.IPProtocolIPv6Destination), dstOpts(layers.IPProtocolIPv6Routing), routing(layers.IPProtocolAH),
			authHeader(layers.IPProtocolIPv6Fragment), frag6(layers.IPProtocolIPv6Destination, 0, true), dstOpts(P), udpDgram(), payload(8)),
			want: flow6(udp, 5353, 53, 0)},
		{name: "ipv6/7 extension headers (walk stops at 6)", frame: build(t, eth(E6), ipv6(layers.IPProtocolIPv6HopByHop),
			hopByHop(layers.IPProtocolIPv6Destination), dstOpts(layers.IPProtocolIPv6Routing), routing(layers.IPProtocolIPv6Destination),
			dstOpts(layers.IPProtocolIPv6Routing), routing(layers.IPProtocolIPv6Destination), dstOpts(layers.IPProtocolIPv6Destination),
			dstOpts(P), udpDgram(), payload(8)),
			want: flow6(dstopts, 0, 0, 0)},

		// Fragments: the first carries the transport header, the others not.
		{name: "ipv6/first fragment/udp", frame: build(t, eth(E6), ipv6(layers.IPProtocolIPv6Fragment), frag6(P, 0, true), udpDgram(), payload(32)),
			want: flow6(udp, 5353, 53, 0)},
		{name: "ipv6/later fragment/udp", frame: build(t, eth(E6), ipv6(layers.IPProtocolIPv6Fragment), frag6(P, 185, false), fakeTCP),
			want: flow6(udp, 0, 0, 0)},
		{name: "ipv4/first fragment/udp", frame: build(t, eth(E4), frag4(P, 0, true), udpDgram(), payload(32)), want: flow4(udp, 5353, 53, 0)},
		{name: "ipv4/later fragment/udp", frame: build(t, eth(E4), frag4(P, 185, true), payload(32)), want: flow4(udp, 0, 0, 0)},
		{name: "ipv4/last fragment/tcp", frame: build(t, eth(E4), frag4(layers.IPProtocolTCP, 3, false), fakeTCP), want: flow4(tcp, 0, 0, 0)},

		// Not IP: in the totals only.
		{name: "arp", frame: build(t, eth(layers.EthernetTypeARP), arp), res: NsflowParseResultPARSE_NON_IP},
		{name: "lldp", frame: build(t, eth(layers.EthernetTypeLinkLayerDiscovery), payload(46)), res: NsflowParseResultPARSE_NON_IP},
		{name: "802.1q/arp", frame: build(t, eth(layers.EthernetTypeDot1Q), vlan(3, layers.EthernetTypeARP), arp), res: NsflowParseResultPARSE_NON_IP},

		// Truncated: in the totals only. BPF_PROG_TEST_RUN refuses an
		// untagged IPv4 (IPv6) frame shorter than its IP header (see
		// TestKernelRefuses): behind a VLAN tag the program's own checks run.
		{name: "truncated/802.1q/ipv4 header", frame: cut(build(t, eth(layers.EthernetTypeDot1Q), vlan(1, E4), ipv4(P), udpDgram()), 18+19),
			res: NsflowParseResultPARSE_TRUNCATED},
		{name: "truncated/802.1ad/ipv6 header", frame: cut(build(t, eth(layers.EthernetTypeQinQ), vlan(1, E6), ipv6(P), udpDgram()), 18+39),
			res: NsflowParseResultPARSE_TRUNCATED},
		{name: "truncated/vlan tag", frame: cut(build(t, eth(layers.EthernetTypeDot1Q), vlan(1, E4), ipv4(P), udpDgram()), 17),
			res: NsflowParseResultPARSE_TRUNCATED},
		{name: "truncated/ipv4 options beyond the frame", frame: patched(cut(build(t, eth(E4), ipv4(P), udpDgram()), 14+20+8), 14, 0x4f),
			res: NsflowParseResultPARSE_TRUNCATED},
		{name: "truncated/tcp header", frame: cut(build(t, eth(E4), ipv4(layers.IPProtocolTCP), tcpSeg("S")), 14+20+13),
			res: NsflowParseResultPARSE_TRUNCATED},
		{name: "truncated/udp header", frame: cut(build(t, eth(E6), ipv6(P), udpDgram()), 14+40+3), res: NsflowParseResultPARSE_TRUNCATED},
		{name: "truncated/icmp header", frame: cut(build(t, eth(E4), ipv4(layers.IPProtocolICMPv4), &layers.ICMPv4{TypeCode: 0x0800}), 14+20+1),
			res: NsflowParseResultPARSE_TRUNCATED},
		{name: "truncated/ipv6 hop-by-hop missing", frame: cut(build(t, eth(E6), ipv6(layers.IPProtocolIPv6HopByHop), hopByHop(P), udpDgram()), 14+40),
			res: NsflowParseResultPARSE_TRUNCATED},
		{name: "truncated/ipv6 extension header", frame: cut(build(t, eth(E6), ipv6(layers.IPProtocolIPv6Destination), dstOpts(P), udpDgram()), 14+40+1),
			res: NsflowParseResultPARSE_TRUNCATED},
		{name: "truncated/ipv6 fragment header", frame: cut(build(t, eth(E6), ipv6(layers.IPProtocolIPv6Fragment), frag6(P, 0, true), udpDgram()), 14+40+7),
			res: NsflowParseResultPARSE_TRUNCATED},
		{name: "truncated/udp behind ipv6 extension header", frame: cut(build(t, eth(E6), ipv6(layers.IPProtocolIPv6Routing), routing(P), udpDgram()), 14+40+24+2),
			res: NsflowParseResultPARSE_TRUNCATED},

		// Malformed IP headers.
		{name: "ipv4 bad version", frame: patched(build(t, eth(E4), ipv4(P), udpDgram()), 14, 0x65), res: NsflowParseResultPARSE_TRUNCATED},
		{name: "ipv4 bad ihl", frame: patched(build(t, eth(E4), ipv4(P), udpDgram()), 14, 0x44), res: NsflowParseResultPARSE_TRUNCATED},
		{name: "ipv6 bad version", frame: patched(build(t, eth(E6), ipv6(P), udpDgram()), 14, 0x40), res: NsflowParseResultPARSE_TRUNCATED},

		// nsflow reads no more than it needs: ports from 4 bytes, TCP flags
		// from 14.
		{name: "tcp header of 14 bytes", frame: cut(build(t, eth(E4), ipv4(layers.IPProtocolTCP), tcpSeg("SA")), 14+20+14),
			want: flow4(tcp, 40000, 8080, synAck), notGopacket: "gopacket needs the full 20-byte TCP header"},
		{name: "udp header of 4 bytes", frame: cut(build(t, eth(E4), ipv4(P), udpDgram()), 14+20+4),
			want: flow4(udp, 5353, 53, 0), notGopacket: "gopacket needs the full 8-byte UDP header"},
	}
}

// validFrames are the table's frames that make a flow.
func validFrames(t testing.TB) [][]byte {
	var fs [][]byte
	for _, r := range frameRows(t) {
		if r.res == NsflowParseResultPARSE_FLOW {
			fs = append(fs, r.frame)
		}
	}
	return fs
}
