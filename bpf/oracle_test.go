package bpf

import (
	"encoding/binary"
	"fmt"
	"net"
	"testing"

	"github.com/gopacket/gopacket"
	"github.com/gopacket/gopacket/layers"
)

// Two independent oracles of what the programs make of a frame: refParse,
// written from nsflow.c's documented semantics on raw bytes, and
// gopacketParse, which applies the same semantics to gopacket's decoding.
// The random and fuzz tests judge the programs by refParse; gopacketParse
// keeps refParse honest.

// refResult is what an oracle makes of a frame: a flow key (observation
// point left zero) and its TCP flags, or the stat the frame is counted in.
type refResult struct {
	res   NsflowParseResult
	key   NsflowFlowKey
	flags uint8
}

// stat is the stat a frame without a flow counts in (parse_stat in nsflow.c).
func (r NsflowParseResult) stat() NsflowStat {
	if r == NsflowParseResultPARSE_NON_IP {
		return NsflowStatSTAT_NON_IP
	}
	return NsflowStatSTAT_TRUNCATED
}

func (r refResult) String() string {
	switch r.res {
	case NsflowParseResultPARSE_FLOW:
	case NsflowParseResultPARSE_NON_IP:
		return "non-IP"
	case NsflowParseResultPARSE_TRUNCATED:
		return "truncated"
	default:
		return fmt.Sprintf("result %d", r.res)
	}
	k := r.key
	src, dst := net.IP(k.Saddr[:]), net.IP(k.Daddr[:])
	if k.Family == 4 {
		src, dst = src[:4], dst[:4]
	}
	return fmt.Sprintf("v%d proto %d %s:%d > %s:%d flags %#x", k.Family, k.Proto, src, k.Sport, dst, k.Dport, r.flags)
}

// IP protocol numbers the parser treats specially.
const (
	protoHopOpts  = 0
	protoICMP     = 1
	protoTCP      = 6
	protoUDP      = 17
	protoRouting  = 43
	protoFragment = 44
	protoAH       = 51
	protoICMPv6   = 58
	protoDstOpts  = 60
	protoSCTP     = 132
	protoUDPLite  = 136

	maxExtHeaders = int(NsflowConstsIPV6MAX_EXT_HEADERS)
)

func isExtHeader(p uint8) bool {
	switch p {
	case protoHopOpts, protoRouting, protoFragment, protoAH, protoDstOpts:
		return true
	}
	return false
}

// refParse is the reference parser, on raw bytes.
func refParse(f []byte) refResult {
	trunc := refResult{res: NsflowParseResultPARSE_TRUNCATED}
	has := func(off, n int) bool { return off+n <= len(f) }
	if !has(0, 14) {
		return trunc
	}
	etype, off := binary.BigEndian.Uint16(f[12:]), 14
	if etype == 0x8100 || etype == 0x88a8 { // one 802.1Q or 802.1ad tag
		if !has(off, 4) {
			return trunc
		}
		etype, off = binary.BigEndian.Uint16(f[off+2:]), off+4
	}
	var r refResult
	k := &r.key
	switch etype {
	case 0x0800:
		if !has(off, 20) || f[off]>>4 != 4 || f[off]&0xf < 5 {
			return trunc
		}
		k.Family, k.Proto = 4, f[off+9]
		copy(k.Saddr[:4], f[off+12:off+16])
		copy(k.Daddr[:4], f[off+16:off+20])
		if binary.BigEndian.Uint16(f[off+6:])&0x1fff != 0 {
			return r // a later fragment: no transport header
		}
		off += int(f[off]&0xf) * 4
	case 0x86dd:
		if !has(off, 40) || f[off]>>4 != 6 {
			return trunc
		}
		k.Family = 6
		copy(k.Saddr[:], f[off+8:off+24])
		copy(k.Daddr[:], f[off+24:off+40])
		next := f[off+6]
		off += 40
		for i := 0; i < maxExtHeaders && isExtHeader(next); i++ {
			switch next {
			case protoAH: // length in 4-byte units, minus 2
				if !has(off, 2) {
					return trunc
				}
				next, off = f[off], off+(int(f[off+1])+2)*4
			case protoFragment:
				if !has(off, 8) {
					return trunc
				}
				later := binary.BigEndian.Uint16(f[off+2:])&0xfff8 != 0
				next, off = f[off], off+8
				if later {
					k.Proto = next
					return r
				}
			default: // length in 8-byte units, minus 1
				if !has(off, 2) {
					return trunc
				}
				next, off = f[off], off+(int(f[off+1])+1)*8
			}
		}
		k.Proto = next
		if isExtHeader(next) {
			return r // more extension headers than walked: no ports
		}
	default:
		return refResult{res: NsflowParseResultPARSE_NON_IP}
	}
	switch k.Proto {
	case protoTCP:
		if !has(off, 14) {
			return trunc
		}
		r.flags = f[off+13]
		k.Sport, k.Dport = binary.BigEndian.Uint16(f[off:]), binary.BigEndian.Uint16(f[off+2:])
	case protoUDP, protoUDPLite, protoSCTP:
		if !has(off, 4) {
			return trunc
		}
		k.Sport, k.Dport = binary.BigEndian.Uint16(f[off:]), binary.BigEndian.Uint16(f[off+2:])
	case protoICMP, protoICMPv6:
		if !has(off, 2) {
			return trunc
		}
		k.Sport, k.Dport = uint16(f[off]), uint16(f[off+1])
	}
	return r
}

// gopacketParse applies nsflow's semantics to gopacket's decoding of the
// frame, one layer at a time. Where gopacket needs more bytes than nsflow
// reads (a full TCP, UDP or ICMP header, consistent IP lengths and options),
// it says truncated where nsflow may see a flow; whenever it sees a flow or a
// non-IP frame, refParse must agree with it exactly.
func gopacketParse(f []byte) refResult {
	trunc := refResult{res: NsflowParseResultPARSE_TRUNCATED}
	df := gopacket.NilDecodeFeedback
	var e layers.Ethernet
	if e.DecodeFromBytes(f, df) != nil {
		return trunc
	}
	data, etype := e.Payload, e.EthernetType
	if etype == layers.EthernetTypeDot1Q || etype == layers.EthernetTypeQinQ {
		var tag layers.Dot1Q
		if tag.DecodeFromBytes(data, df) != nil {
			return trunc
		}
		data, etype = tag.Payload, tag.Type // a second tag is not IP
	}
	var r refResult
	k := &r.key
	var proto layers.IPProtocol
	switch etype {
	case layers.EthernetTypeIPv4:
		var ip layers.IPv4
		if ip.DecodeFromBytes(data, df) != nil || ip.Version != 4 {
			return trunc
		}
		k.Family, k.Proto = 4, uint8(ip.Protocol)
		copy(k.Saddr[:4], ip.SrcIP.To4())
		copy(k.Daddr[:4], ip.DstIP.To4())
		if ip.FragOffset != 0 {
			return r // a later fragment: no transport header
		}
		data, proto = ip.Payload, ip.Protocol
	case layers.EthernetTypeIPv6:
		var ip layers.IPv6
		if ip.DecodeFromBytes(data, df) != nil || ip.Version != 6 {
			return trunc
		}
		k.Family = 6
		copy(k.Saddr[:], ip.SrcIP.To16())
		copy(k.Daddr[:], ip.DstIP.To16())
		data, proto = ip.Payload, ip.NextHeader
		n := 0
		if ip.HopByHop != nil { // gopacket decodes it with the IPv6 header
			proto, n = ip.HopByHop.NextHeader, 1
		}
		for ; isExtHeader(uint8(proto)); n++ {
			if n == maxExtHeaders {
				k.Proto = uint8(proto)
				return r // more extension headers than walked: no ports
			}
			var l interface {
				DecodeFromBytes([]byte, gopacket.DecodeFeedback) error
				LayerPayload() []byte
			}
			var nextOf func() layers.IPProtocol
			switch proto {
			case layers.IPProtocolIPv6HopByHop:
				h := &layers.IPv6HopByHop{}
				l, nextOf = h, func() layers.IPProtocol { return h.NextHeader }
			case layers.IPProtocolIPv6Destination:
				h := &layers.IPv6Destination{}
				l, nextOf = h, func() layers.IPProtocol { return h.NextHeader }
			case layers.IPProtocolAH:
				h := &layers.IPSecAH{}
				l, nextOf = h, func() layers.IPProtocol { return h.NextHeader }
			case layers.IPProtocolIPv6Fragment:
				h := &layers.IPv6Fragment{}
				if h.DecodeFromBytes(data, df) != nil {
					return trunc
				}
				if h.FragmentOffset != 0 {
					k.Proto = uint8(h.NextHeader)
					return r // a later fragment: no transport header
				}
				data, proto = h.Payload, h.NextHeader
				continue
			case layers.IPProtocolIPv6Routing:
				h, ok := decodeLayer(data, layers.LayerTypeIPv6Routing).(*layers.IPv6Routing)
				if !ok {
					return trunc
				}
				data, proto = h.Payload, h.NextHeader
				continue
			}
			if l.DecodeFromBytes(data, df) != nil {
				return trunc
			}
			data, proto = l.LayerPayload(), nextOf()
		}
		k.Proto = uint8(proto)
	default:
		return refResult{res: NsflowParseResultPARSE_NON_IP}
	}
	switch proto {
	case layers.IPProtocolTCP:
		var tcp layers.TCP
		if tcp.DecodeFromBytes(data, df) != nil {
			return trunc
		}
		k.Sport, k.Dport = uint16(tcp.SrcPort), uint16(tcp.DstPort)
		for i, set := range []bool{tcp.FIN, tcp.SYN, tcp.RST, tcp.PSH, tcp.ACK, tcp.URG, tcp.ECE, tcp.CWR} {
			if set {
				r.flags |= 1 << i
			}
		}
	case layers.IPProtocolUDP:
		var udp layers.UDP
		if udp.DecodeFromBytes(data, df) != nil {
			return trunc
		}
		k.Sport, k.Dport = uint16(udp.SrcPort), uint16(udp.DstPort)
	case layers.IPProtocolUDPLite:
		udp, ok := decodeLayer(data, layers.LayerTypeUDPLite).(*layers.UDPLite)
		if !ok {
			return trunc
		}
		k.Sport, k.Dport = uint16(udp.SrcPort), uint16(udp.DstPort)
	case layers.IPProtocolSCTP:
		var sctp layers.SCTP
		if sctp.DecodeFromBytes(data, df) != nil {
			return trunc
		}
		k.Sport, k.Dport = uint16(sctp.SrcPort), uint16(sctp.DstPort)
	case layers.IPProtocolICMPv4:
		var icmp layers.ICMPv4
		if icmp.DecodeFromBytes(data, df) != nil {
			return trunc
		}
		k.Sport, k.Dport = uint16(icmp.TypeCode.Type()), uint16(icmp.TypeCode.Code())
	case layers.IPProtocolICMPv6:
		var icmp layers.ICMPv6
		if icmp.DecodeFromBytes(data, df) != nil {
			return trunc
		}
		k.Sport, k.Dport = uint16(icmp.TypeCode.Type()), uint16(icmp.TypeCode.Code())
	}
	return r
}

// decodeLayer decodes data as a layer of type typ with gopacket's packet
// decoder (for the layers that have no DecodeFromBytes); nil when it cannot.
func decodeLayer(data []byte, typ gopacket.LayerType) gopacket.Layer {
	ls := gopacket.NewPacket(data, typ, gopacket.Default).Layers()
	if len(ls) == 0 || ls[0].LayerType() != typ {
		return nil
	}
	return ls[0]
}

// rowResult is what the table says of a row, in the oracles' terms.
func rowResult(row frameRow) refResult {
	if row.res != NsflowParseResultPARSE_FLOW {
		return refResult{res: row.res}
	}
	return refResult{key: row.want.key(0, 0, 0).NsflowFlowKey, flags: row.want.flags}
}

// Both oracles agree with the hand-written table, row by row, so neither
// can drift from the documented semantics unnoticed.
func TestOraclesAgreeWithTable(t *testing.T) {
	for _, row := range frameRows(t) {
		want := rowResult(row)
		if got := refParse(row.frame); got != want {
			t.Errorf("%s: reference parser: %v, table: %v", row.name, got, want)
		}
		if row.notGopacket != "" {
			if got := gopacketParse(row.frame); got.res != NsflowParseResultPARSE_TRUNCATED {
				t.Errorf("%s: gopacket: %v, expected it to refuse the frame (%s)", row.name, got, row.notGopacket)
			}
			continue
		}
		if got := gopacketParse(row.frame); got != want {
			t.Errorf("%s: gopacket: %v, table: %v", row.name, got, want)
		}
	}
}

// crossCheck compares refParse with gopacketParse on a frame: wherever
// gopacket decodes the headers nsflow reads, both must agree exactly.
// It reports whether gopacket could judge the frame.
func crossCheck(t testing.TB, f []byte) bool {
	t.Helper()
	g := gopacketParse(f)
	if g.res == NsflowParseResultPARSE_TRUNCATED {
		return false
	}
	if r := refParse(f); r != g {
		t.Errorf("reference parser %v, gopacket %v, frame %x", r, g, f)
	}
	return true
}
