package filter

import (
	"errors"
	"net/netip"
	"strings"
	"testing"

	"github.com/nsflow/nsflow/collector/flow"
)

var flows = []flow.Flow{
	{Key: flow.Key{Protocol: 6, Src: netip.MustParseAddr("10.213.0.2"), Dst: netip.MustParseAddr("10.213.0.3"), SrcPort: 40000, DstPort: 80, Direction: flow.TX}},
	{Key: flow.Key{Protocol: 17, Src: netip.MustParseAddr("10.213.0.3"), Dst: netip.MustParseAddr("10.213.0.2"), SrcPort: 53, DstPort: 5353, Direction: flow.RX}},
	{Key: flow.Key{Protocol: 1, Src: netip.MustParseAddr("10.213.0.2"), Dst: netip.MustParseAddr("10.213.0.9"), SrcPort: 8, DstPort: 0, Direction: flow.TX}},
	{Key: flow.Key{Protocol: 6, Src: netip.MustParseAddr("fd6e::2"), Dst: netip.MustParseAddr("fd6e::3"), SrcPort: 443, DstPort: 50000, Direction: flow.RX}},
	{Key: flow.Key{Protocol: 58, Src: netip.MustParseAddr("fd6e::2"), Dst: netip.MustParseAddr("ff02::1"), SrcPort: 135, DstPort: 0, Direction: flow.TX}},
	{Key: flow.Key{Protocol: 132, Src: netip.MustParseAddr("127.0.0.1"), Dst: netip.MustParseAddr("127.0.0.1"), SrcPort: 9000, DstPort: 9001, Direction: flow.TX}},
}

func TestMatch(t *testing.T) {
	for _, tc := range []struct {
		expr string
		want []int // indexes of matching flows
	}{
		{"", []int{0, 1, 2, 3, 4, 5}},
		{"tcp", []int{0, 3}},
		{"udp", []int{1}},
		{"icmp", []int{2}},
		{"icmp6", []int{4}},
		{"sctp", []int{5}},
		{"ip", []int{0, 1, 2, 5}},
		{"ip6", []int{3, 4}},
		{"proto 17", []int{1}},
		{"ip proto udp", []int{1}},
		{"port 80", []int{0}},
		{"port 0", nil}, // ICMP code 0 is not a port
		{"src port 53", []int{1}},
		{"dst port 53", nil},
		{"portrange 9000-9001", []int{5}},
		{"dst portrange 5000-6000", []int{1}},
		{"host 10.213.0.2", []int{0, 1, 2}},
		{"src host 10.213.0.2", []int{0, 2}},
		{"dst host 10.213.0.2", []int{1}},
		{"net 10.213.0.0/24", []int{0, 1, 2}},
		{"dst net fd6e::/64", []int{3}},
		{"tcp and port 443", []int{3}},
		{"tcp && dst port 80", []int{0}},
		{"tcp port 80", []int{0}}, // implicit and
		{"udp or icmp", []int{1, 2}},
		{"udp || icmp || sctp", []int{1, 2, 5}},
		{"not tcp", []int{1, 2, 4, 5}},
		{"! ip", []int{3, 4}},
		{"tcp and not port 80", []int{3}},
		{"(udp or tcp) and host 10.213.0.3", []int{0, 1}},
		{"not (udp or tcp)", []int{2, 4, 5}},
		{"tx", []int{0, 2, 4, 5}},
		{"inbound and tcp", []int{3}},
		{"TCP AND PORT 80", []int{0}},
	} {
		f, err := Parse(tc.expr)
		if err != nil {
			t.Errorf("Parse(%q): %v", tc.expr, err)
			continue
		}
		var got []int
		for i := range flows {
			if f.Match(&flows[i]) {
				got = append(got, i)
			}
		}
		if !equal(got, tc.want) {
			t.Errorf("%q matches %v, want %v", tc.expr, got, tc.want)
		}
	}
}

func equal(a, b []int) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

func TestSyntaxErrors(t *testing.T) {
	for _, expr := range []string{
		"tcp and", "or tcp", "(tcp", "tcp)", "port", "port x", "port 70000", "host nothost",
		"net 10.0.0.0/33", "portrange 5-1", "portrange 5", "src tcp", "proto 300", "frob", "tcp & udp", "tcp | udp", "()",
	} {
		if _, err := Parse(expr); !errors.Is(err, ErrSyntax) {
			t.Errorf("Parse(%q): %v, want a syntax error", expr, err)
		}
	}
}

func FuzzParse(f *testing.F) {
	for _, s := range []string{"tcp", "src net 10.0.0.0/8 and not (port 22 or portrange 1-1024)", "!udp||icmp", "ip6 proto 58"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		flt, err := Parse(s)
		if err != nil {
			if !errors.Is(err, ErrSyntax) {
				t.Fatalf("error without ErrSyntax: %v", err)
			}
			return
		}
		for i := range flows {
			flt.Match(&flows[i]) // must not panic
		}
		if strings.TrimSpace(s) == "" {
			return // the empty filter matches all; "()" is not an expression
		}
		// Wrapping a valid expression keeps it valid and equivalent.
		g, err := Parse("(" + s + ")")
		if err != nil {
			t.Fatalf("(%s) does not parse: %v", s, err)
		}
		n, err := Parse("not not (" + s + ")")
		if err != nil {
			t.Fatal(err)
		}
		for i := range flows {
			if flt.Match(&flows[i]) != g.Match(&flows[i]) || flt.Match(&flows[i]) != n.Match(&flows[i]) {
				t.Fatalf("%q: parenthesized or double-negated form disagrees on flow %d", s, i)
			}
		}
	})
}
