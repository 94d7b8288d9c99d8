// Package filter parses and evaluates flow filters: a subset of
// pcap-filter(7) (the tcpdump expression language), applied to flows in
// user space.
//
// Grammar (case-insensitive keywords):
//
//	expr      = or
//	or        = and { ("or" | "||") and }
//	and       = not { ["and" | "&&"] not }      adjacent primitives are ANDed
//	not       = ("not" | "!") not | "(" expr ")" | primitive
//	primitive = proto
//	          | ["src" | "dst"] "host" ADDR
//	          | ["src" | "dst"] "net" CIDR
//	          | ["src" | "dst"] "port" PORT
//	          | ["src" | "dst"] "portrange" PORT "-" PORT
//	          | ("proto" | "ip proto" | "ip6 proto") (NUMBER | NAME)
//	          | "rx" | "tx" | ("inbound" | "outbound")
//	proto     = "tcp" | "udp" | "icmp" | "icmp6" | "sctp" | "ip" | "ip6"
//
// As in pcap-filter, "host", "net" and "port" without src/dst match either
// end; "ip" and "ip6" match the address family. rx/inbound and tx/outbound
// select the direction at the observation point. For ICMP flows, ports hold
// the type and code, so "port" never matches them (as in pcap-filter).
package filter

import (
	"errors"
	"fmt"
	"net/netip"
	"strconv"
	"strings"
	"unicode"

	"github.com/nsflow/nsflow/collector/flow"
)

// ErrSyntax is wrapped by every parse error.
var ErrSyntax = errors.New("filter syntax error")

// Filter is a parsed expression.
type Filter struct {
	expr node
	text string
}

// String returns the expression as given.
func (f *Filter) String() string { return f.text }

// Match reports whether the flow satisfies the filter. A nil Filter
// matches everything.
func (f *Filter) Match(fl *flow.Flow) bool {
	if f == nil || f.expr == nil {
		return true
	}
	return f.expr.match(fl)
}

// Parse parses an expression; an empty one matches every flow.
func Parse(s string) (*Filter, error) {
	toks, err := lex(s)
	if err != nil {
		return nil, err
	}
	f := &Filter{text: strings.TrimSpace(s)}
	if len(toks) == 0 {
		return f, nil
	}
	p := &parser{toks: toks}
	f.expr, err = p.or()
	if err != nil {
		return nil, err
	}
	if !p.done() {
		return nil, p.errorf("unexpected %q", p.peek())
	}
	return f, nil
}

type node interface {
	match(*flow.Flow) bool
}

type (
	orNode  struct{ a, b node }
	andNode struct{ a, b node }
	notNode struct{ a node }
	fnNode  func(*flow.Flow) bool
)

func (n orNode) match(f *flow.Flow) bool  { return n.a.match(f) || n.b.match(f) }
func (n andNode) match(f *flow.Flow) bool { return n.a.match(f) && n.b.match(f) }
func (n notNode) match(f *flow.Flow) bool { return !n.a.match(f) }
func (n fnNode) match(f *flow.Flow) bool  { return n(f) }

func lex(s string) ([]string, error) {
	var toks []string
	rs := []rune(s)
	for i := 0; i < len(rs); {
		r := rs[i]
		switch {
		case unicode.IsSpace(r):
			i++
		case r == '(' || r == ')' || r == '!':
			toks = append(toks, string(r))
			i++
		case r == '&' || r == '|':
			if i+1 >= len(rs) || rs[i+1] != r {
				return nil, fmt.Errorf("%w: at %d: %q must be doubled (%c%c)", ErrSyntax, i, r, r, r)
			}
			toks = append(toks, string([]rune{r, r}))
			i += 2
		default:
			j := i
			for j < len(rs) && !unicode.IsSpace(rs[j]) && !strings.ContainsRune("()!&|", rs[j]) {
				j++
			}
			toks = append(toks, string(rs[i:j]))
			i = j
		}
	}
	return toks, nil
}

type parser struct {
	toks []string
	pos  int
}

func (p *parser) done() bool { return p.pos >= len(p.toks) }

func (p *parser) peek() string {
	if p.done() {
		return ""
	}
	return strings.ToLower(p.toks[p.pos])
}

func (p *parser) next() string {
	t := p.peek()
	p.pos++
	return t
}

func (p *parser) errorf(format string, args ...any) error {
	return fmt.Errorf("%w: %s", ErrSyntax, fmt.Sprintf(format, args...))
}

func (p *parser) or() (node, error) {
	a, err := p.and()
	if err != nil {
		return nil, err
	}
	for t := p.peek(); t == "or" || t == "||"; t = p.peek() {
		p.next()
		b, err := p.and()
		if err != nil {
			return nil, err
		}
		a = orNode{a, b}
	}
	return a, nil
}

func (p *parser) and() (node, error) {
	a, err := p.not()
	if err != nil {
		return nil, err
	}
	for {
		t := p.peek()
		switch {
		case t == "and" || t == "&&":
			p.next()
		case t == "" || t == "or" || t == "||" || t == ")":
			return a, nil
		}
		b, err := p.not()
		if err != nil {
			return nil, err
		}
		a = andNode{a, b}
	}
}

func (p *parser) not() (node, error) {
	switch t := p.peek(); t {
	case "not", "!":
		p.next()
		a, err := p.not()
		if err != nil {
			return nil, err
		}
		return notNode{a}, nil
	case "(":
		p.next()
		a, err := p.or()
		if err != nil {
			return nil, err
		}
		if p.next() != ")" {
			return nil, p.errorf("missing )")
		}
		return a, nil
	case "":
		return nil, p.errorf("expression ends too early")
	}
	return p.primitive()
}

var protoNumbers = map[string]flow.Protocol{"tcp": 6, "udp": 17, "icmp": 1, "icmp6": 58, "icmpv6": 58, "sctp": 132}

func (p *parser) primitive() (node, error) {
	t := p.next()
	if n, ok := protoNumbers[t]; ok {
		return fnNode(func(f *flow.Flow) bool { return f.Protocol == n }), nil
	}
	switch t {
	case "ip":
		if p.peek() == "proto" {
			p.next()
			return p.protoArg()
		}
		return fnNode(func(f *flow.Flow) bool { return f.Src.Is4() }), nil
	case "ip6":
		if p.peek() == "proto" {
			p.next()
			return p.protoArg()
		}
		return fnNode(func(f *flow.Flow) bool { return f.Src.Is6() && !f.Src.Is4In6() }), nil
	case "proto":
		return p.protoArg()
	case "rx", "inbound":
		return fnNode(func(f *flow.Flow) bool { return f.Direction == flow.RX }), nil
	case "tx", "outbound":
		return fnNode(func(f *flow.Flow) bool { return f.Direction == flow.TX }), nil
	case "src", "dst":
		return p.qualified(t, p.next())
	case "host", "net", "port", "portrange":
		return p.qualified("", t)
	case ")":
		return nil, p.errorf("unexpected )")
	}
	return nil, p.errorf("unknown primitive %q (want tcp, udp, icmp, icmp6, sctp, ip, ip6, proto, host, net, port, portrange, src, dst, rx, tx)", t)
}

func (p *parser) protoArg() (node, error) {
	t := p.next()
	if n, ok := protoNumbers[t]; ok {
		return fnNode(func(f *flow.Flow) bool { return f.Protocol == n }), nil
	}
	v, err := strconv.ParseUint(t, 10, 8)
	if err != nil {
		return nil, p.errorf("proto wants a protocol name or a number 0-255, got %q", t)
	}
	n := flow.Protocol(v)
	return fnNode(func(f *flow.Flow) bool { return f.Protocol == n }), nil
}

// hasPorts reports whether the flow's port fields are ports (not ICMP type
// and code).
func hasPorts(f *flow.Flow) bool {
	switch f.Protocol {
	case 6, 17, 132, 136:
		return true
	}
	return false
}

func (p *parser) qualified(dir, kind string) (node, error) {
	arg := p.next()
	if arg == "" {
		return nil, p.errorf("%s needs an argument", kind)
	}
	var src, dst func(*flow.Flow) bool
	switch kind {
	case "host":
		a, err := netip.ParseAddr(arg)
		if err != nil {
			return nil, p.errorf("host wants an IP address, got %q", arg)
		}
		src = func(f *flow.Flow) bool { return f.Src == a }
		dst = func(f *flow.Flow) bool { return f.Dst == a }
	case "net":
		n, err := netip.ParsePrefix(arg)
		if err != nil {
			return nil, p.errorf("net wants a CIDR prefix, got %q", arg)
		}
		n = n.Masked()
		src = func(f *flow.Flow) bool { return n.Contains(f.Src) }
		dst = func(f *flow.Flow) bool { return n.Contains(f.Dst) }
	case "port":
		v, err := strconv.ParseUint(arg, 10, 16)
		if err != nil {
			return nil, p.errorf("port wants a number 0-65535, got %q", arg)
		}
		port := uint16(v)
		src = func(f *flow.Flow) bool { return hasPorts(f) && f.SrcPort == port }
		dst = func(f *flow.Flow) bool { return hasPorts(f) && f.DstPort == port }
	case "portrange":
		lo, hi, ok := strings.Cut(arg, "-")
		l, err1 := strconv.ParseUint(lo, 10, 16)
		h, err2 := strconv.ParseUint(hi, 10, 16)
		if !ok || err1 != nil || err2 != nil || l > h {
			return nil, p.errorf("portrange wants LOW-HIGH, got %q", arg)
		}
		in := func(v uint16) bool { return uint64(v) >= l && uint64(v) <= h }
		src = func(f *flow.Flow) bool { return hasPorts(f) && in(f.SrcPort) }
		dst = func(f *flow.Flow) bool { return hasPorts(f) && in(f.DstPort) }
	default:
		return nil, p.errorf("%s must be followed by host, net, port or portrange, got %q", dir, kind)
	}
	switch dir {
	case "src":
		return fnNode(src), nil
	case "dst":
		return fnNode(dst), nil
	}
	return fnNode(func(f *flow.Flow) bool { return src(f) || dst(f) }), nil
}
