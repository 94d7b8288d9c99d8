package flow

import (
	"encoding/json"
	"fmt"
	"sort"
	"strconv"
	"strings"
)

// Protocol is an IP protocol number, shown by its name.
type Protocol uint8

var protoNames = map[Protocol]string{
	1: "icmp", 2: "igmp", 6: "tcp", 17: "udp", 47: "gre", 50: "esp", 51: "ah",
	58: "icmpv6", 132: "sctp", 136: "udplite",
}

// String returns the protocol's name (e.g. "tcp"), or its number.
func (p Protocol) String() string {
	if n, ok := protoNames[p]; ok {
		return n
	}
	return strconv.Itoa(int(p))
}

// MarshalJSON encodes the protocol by name.
func (p Protocol) MarshalJSON() ([]byte, error) { return json.Marshal(p.String()) }

// ParseProtocol parses a protocol name or number.
func ParseProtocol(s string) (Protocol, error) {
	s = strings.ToLower(s)
	for p, n := range protoNames {
		if n == s {
			return p, nil
		}
	}
	n, err := strconv.ParseUint(s, 10, 8)
	if err != nil {
		return 0, fmt.Errorf("unknown protocol %q", s)
	}
	return Protocol(n), nil
}

// TCPFlags is the OR of the TCP flags seen in a flow.
type TCPFlags uint8

// String lists the flags, e.g. "SYN|ACK".
func (f TCPFlags) String() string {
	names := []string{"FIN", "SYN", "RST", "PSH", "ACK", "URG", "ECE", "CWR"}
	var out []string
	for i, n := range names {
		if f&(1<<i) != 0 {
			out = append(out, n)
		}
	}
	return strings.Join(out, "|")
}

// MarshalJSON encodes the flags as their names.
func (f TCPFlags) MarshalJSON() ([]byte, error) { return json.Marshal(f.String()) }

// SortKey orders flows.
type SortKey string

const (
	SortBytes   SortKey = "bytes"
	SortPackets SortKey = "packets"
)

// SortFlows sorts flows by the key, largest first, ties in a stable order.
func SortFlows(flows []Flow, by SortKey) {
	sort.SliceStable(flows, func(a, b int) bool {
		fa, fb := &flows[a], &flows[b]
		va, vb := fa.Bytes, fb.Bytes
		if by == SortPackets {
			va, vb = fa.Packets, fb.Packets
		}
		if va != vb {
			return va > vb
		}
		return flowLess(fa, fb)
	})
}

func flowLess(a, b *Flow) bool {
	switch {
	case a.Netns != b.Netns:
		return a.Netns < b.Netns
	case a.Interface != b.Interface:
		return a.Interface < b.Interface
	case a.Direction != b.Direction:
		return a.Direction < b.Direction
	case a.Protocol != b.Protocol:
		return a.Protocol < b.Protocol
	case a.Src != b.Src:
		return a.Src.Less(b.Src)
	case a.Dst != b.Dst:
		return a.Dst.Less(b.Dst)
	case a.SrcPort != b.SrcPort:
		return a.SrcPort < b.SrcPort
	}
	return a.DstPort < b.DstPort
}
