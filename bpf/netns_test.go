package bpf

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/btf"
	"github.com/gopacket/gopacket/layers"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/nsflow/nsflow/collector/nsenter"
	"github.com/nsflow/nsflow/test/testenv"
)

// skbLayout is where the fields of struct __sk_buff are, from the kernel's
// BTF. BPF_PROG_TEST_RUN takes a few fields of its context input: ifindex
// picks the device the packet is on, gso_segs and gso_size make it a GSO
// packet.
type skbLayout struct {
	size    uint32
	offsets map[string]uint32
}

func loadSkbLayout(t testing.TB) skbLayout {
	t.Helper()
	spec, err := btf.LoadKernelSpec()
	if err != nil {
		t.Fatal(err)
	}
	var skb *btf.Struct
	if err := spec.TypeByName("__sk_buff", &skb); err != nil {
		t.Fatal(err)
	}
	l := skbLayout{size: skb.Size, offsets: map[string]uint32{}}
	for _, m := range skb.Members {
		l.offsets[m.Name] = m.Offset.Bytes()
	}
	return l
}

// context is a struct __sk_buff with the named 32-bit fields set ("cb1"
// names cb[1], ...).
func (l skbLayout) context(fields map[string]uint32) []byte {
	ctx := make([]byte, l.size)
	for name, v := range fields {
		off, ok := l.offsets[name]
		if len(name) == 3 && name[:2] == "cb" {
			off, ok = l.offsets["cb"]+4*uint32(name[2]-'0'), name[2] >= '0' && name[2] <= '4'
		}
		if !ok {
			panic("struct __sk_buff has no field " + name)
		}
		binary.NativeEndian.PutUint32(ctx[off:], v)
	}
	return ctx
}

// inNewNetns runs fn on a locked thread in a new, empty network namespace,
// where BPF_PROG_TEST_RUN puts packets on that namespace's devices; netns is
// its inode. The namespace and its devices vanish after fn. fn runs on
// another goroutine than the test's: it reports failures by its error (or
// t.Error), never t.Fatal.
func inNewNetns(t *testing.T, fn func(netns uint32) error) {
	t.Helper()
	testenv.RequireRoot(t)
	err := nsenter.Run(func() error { return unix.Unshare(unix.CLONE_NEWNET) }, func() error {
		var st unix.Stat_t
		if err := unix.Stat("/proc/thread-self/ns/net", &st); err != nil {
			return err
		}
		return fn(uint32(st.Ino))
	})
	if err != nil {
		t.Fatal(err)
	}
}

// A flow's observation point is its hook's: the stub's slot, which names
// the namespace, interface and direction it was loaded for (the programs
// read no device). Packets on the loopback device of another namespace, on
// a veth and on a device without a link-layer header (tun, its stubs
// loaded with LinkNone) of that namespace all land under their hooks'
// points in that namespace, none under the test's own.
func TestNetnsFromDevice(t *testing.T) {
	objs := load(t, Options{})
	skb := loadSkbLayout(t)
	self := selfNetns(t)
	udp4 := build(t, eth(layers.EthernetTypeIPv4), ipv4(layers.IPProtocolUDP), udpDgram(), payload(8))
	// A tun device has no link-layer header (ARPHRD_NONE: its stubs hand
	// the parser LinkNone): the program parses from the first byte. BPF_PROG_TEST_RUN still derives skb->protocol from bytes 12-13
	// as if they were an ethertype: 0x0800 (0x86dd) is put there, in the
	// IPv4 (IPv6) source address.
	src4, src6 := net.IP{8, 0, 0, 1}, net.ParseIP("2001:db8:86dd::1")
	ip := ipv4(layers.IPProtocolUDP)
	ip.SrcIP = src4
	l3v4 := build(t, ip, udpDgram(), payload(8))
	ip6 := ipv6(layers.IPProtocolTCP)
	ip6.SrcIP = src6
	l3v6 := build(t, ip6, tcpSeg("S"), payload(8))
	if binary.BigEndian.Uint16(l3v4[12:]) != 0x0800 || binary.BigEndian.Uint16(l3v6[12:]) != 0x86dd {
		t.Fatal("the L3 frames do not carry their ethertype in bytes 12-13")
	}
	w4, w6 := flow4(17, 5353, 53, 0), flow6(6, 40000, 8080, 0x02)
	w4.saddr, w6.saddr = src4, src6

	wantTotals := map[NsflowObsKey]NsflowCounters{}
	wantFlows := map[pointFlow]uint64{}
	inNewNetns(t, func(netns uint32) error {
		if netns == self {
			return errors.New("still in the test's own namespace")
		}
		// lo (ifindex 1): the default device under BPF_PROG_TEST_RUN.
		p, err := stubFor(objs, NsflowObsKey{Netns: netns, Ifindex: 1, Dir: uint8(RX)})
		if err != nil {
			return err
		}
		if err := tryRun(p, &ebpf.RunOptions{Data: udp4}); err != nil {
			return err
		}
		wantTotals[NsflowObsKey{Netns: netns, Ifindex: 1, Dir: uint8(RX)}] = NsflowCounters{Packets: 1, Bytes: uint64(len(udp4))}
		wantFlows[flow4(17, 5353, 53, 0).key(netns, 1, RX)] = 1

		// A veth, named by ifindex in the context.
		veth := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "nsf0"}, PeerName: "nsf1"}
		if err := netlink.LinkAdd(veth); err != nil {
			return fmt.Errorf("add veth: %w", err)
		}
		vethIdx := uint32(veth.Attrs().Index)
		p, err = stubFor(objs, NsflowObsKey{Netns: netns, Ifindex: vethIdx, Dir: uint8(TX)})
		if err != nil {
			return err
		}
		if err := tryRun(p, &ebpf.RunOptions{Data: udp4, Context: skb.context(map[string]uint32{"ifindex": vethIdx})}); err != nil {
			return err
		}
		wantTotals[NsflowObsKey{Netns: netns, Ifindex: vethIdx, Dir: uint8(TX)}] = NsflowCounters{Packets: 1, Bytes: uint64(len(udp4))}
		wantFlows[flow4(17, 5353, 53, 0).key(netns, vethIdx, TX)] = 1

		// A tun device, gone when its file is closed.
		tun := &netlink.Tuntap{LinkAttrs: netlink.LinkAttrs{Name: "nsftun0"}, Mode: netlink.TUNTAP_MODE_TUN,
			Flags: netlink.TUNTAP_NO_PI, Queues: 1, NonPersist: true}
		if err := netlink.LinkAdd(tun); err != nil {
			return fmt.Errorf("add tun: %w", err)
		}
		defer func() {
			for _, f := range tun.Fds {
				f.Close()
			}
		}()
		tunIdx := uint32(tun.Attrs().Index)
		p, err = stubForHook(objs, Hook{Point: NsflowObsKey{Netns: netns, Ifindex: tunIdx, Dir: uint8(RX)}, Link: LinkNone})
		if err != nil {
			return err
		}
		for _, f := range [][]byte{l3v4, l3v6} {
			if err := tryRun(p, &ebpf.RunOptions{Data: f, Context: skb.context(map[string]uint32{"ifindex": tunIdx})}); err != nil {
				return err
			}
		}
		wantTotals[NsflowObsKey{Netns: netns, Ifindex: tunIdx, Dir: uint8(RX)}] = NsflowCounters{Packets: 2, Bytes: uint64(len(l3v4) + len(l3v6))}
		wantFlows[w4.key(netns, tunIdx, RX)] = 1
		wantFlows[w6.key(netns, tunIdx, RX)] = 1
		return nil
	})
	st := readMaps(t, objs)
	if !equalMaps(st.totals, wantTotals) {
		t.Errorf("totals %+v, want exactly %+v", st.totals, wantTotals)
	}
	if len(st.flows) != len(wantFlows) {
		t.Errorf("%d flows, want %d", len(st.flows), len(wantFlows))
	}
	for k, v := range st.flows {
		if n, ok := wantFlows[k]; !ok || v.Packets != n {
			t.Errorf("flow %+v: %d packets; want one of %+v", k, v.Packets, wantFlows)
		}
	}
	if want := [NsflowStatSTAT_MAX]uint64{NsflowStatSTAT_FLOW_NEW: uint64(len(wantFlows))}; st.stats != want {
		t.Errorf("stats %v, want %v", st.stats, want)
	}
}

// At egress, a GSO packet that the kernel segments in software after the TC
// hook is counted as the device counts it: gso_segs packets, each segment
// with its own copy of the headers. At ingress a GSO packet is one packet.
// BPF_PROG_TEST_RUN's sk_buffs carry gso_segs and gso_size but no GSO type
// and no pending checksum (CHECKSUM_NONE), so validate_xmit_skb would
// segment every one of them, below the size limit too (gso_features_check
// strips the GSO features of an sk_buff without a GSO type): the rows below
// the limit count segments. Which real GSO packets a device takes whole
// (TSO on, below gso_max_size) is tested end to end against the kernel's
// interface counters (test/e2e/offload_test.go).
//
// Both egress parsers: the one that reads the kernel's fields through
// bpf_cast_to_kern_ctx (where the kernel has it) and the one that reads them
// through bpf_probe_read_kernel (kernels before 6.3).
func TestGSOSegments(t *testing.T) {
	for _, probe := range []bool{false, true} {
		t.Run(map[bool]string{false: "kctx", true: "probe_reads"}[probe], func(t *testing.T) {
			gsoSegments(t, Options{ProbeReads: probe})
		})
	}
}

func gsoSegments(t *testing.T, opts Options) {
	objs := load(t, opts)
	t.Logf("egress parser through bpf_cast_to_kern_ctx: %v", objs.KernCtx)
	skb := loadSkbLayout(t)
	const ipv4Max, ipv6Max = 1000, 2000 // lo's limits in the test's namespace
	tcp4 := func(size int, opts ...layers.TCPOption) []byte {
		s := tcpSeg("A")
		s.Options = opts
		// Headers only would be padded to Ethernet's 60-byte minimum.
		hdr := len(build(t, eth(layers.EthernetTypeIPv4), ipv4(layers.IPProtocolTCP), s, payload(100))) - 100
		return build(t, eth(layers.EthernetTypeIPv4), ipv4(layers.IPProtocolTCP), s, payload(size-hdr))
	}
	tcp6 := func(size int) []byte {
		ls := func(n int) []byte {
			return build(t, eth(layers.EthernetTypeIPv6), ipv6(layers.IPProtocolIPv6Destination), dstOpts(layers.IPProtocolTCP), tcpSeg("A"), payload(n))
		}
		return ls(size - (len(ls(100)) - 100))
	}
	const hdr4, hdr6, hdrUDP, hdrVLAN = 14 + 20 + 20, 14 + 40 + 8 + 20, 14 + 20 + 8, 18 + 20 + 20
	udp4 := build(t, eth(layers.EthernetTypeIPv4), ipv4(layers.IPProtocolUDP), udpDgram(), payload(1200-hdrUDP))
	vlan4 := build(t, eth(layers.EthernetTypeDot1Q), vlan(5, layers.EthernetTypeIPv4), ipv4(layers.IPProtocolTCP), tcpSeg("A"), payload(1200-hdrVLAN))
	arp := build(t, eth(layers.EthernetTypeARP), payload(1200-14))
	mss := layers.TCPOption{OptionType: layers.TCPOptionKindMSS, OptionLength: 4, OptionData: []byte{0x05, 0xb4}}
	nop := layers.TCPOption{OptionType: layers.TCPOptionKindNop}
	ts := layers.TCPOption{OptionType: layers.TCPOptionKindTimestamps, OptionLength: 10, OptionData: make([]byte, 8)}
	for _, c := range []struct {
		name           string
		dir            Direction
		frame          []byte
		segs           uint32
		packets, bytes uint64
		res            NsflowParseResult // PARSE_FLOW: a flow with packets and bytes
	}{
		{name: "ipv4 tcp above the limit", dir: TX, frame: tcp4(1254), segs: 3, packets: 3, bytes: 1254 + 2*hdr4},
		{name: "ipv4 tcp at the limit", dir: TX, frame: tcp4(ipv4Max), segs: 3, packets: 3, bytes: ipv4Max + 2*hdr4},
		{name: "ipv4 tcp below the limit, no GSO type", dir: TX, frame: tcp4(ipv4Max - 1), segs: 3, packets: 3, bytes: ipv4Max - 1 + 2*hdr4},
		{name: "ipv4 tcp at ingress", dir: RX, frame: tcp4(1254), segs: 3, packets: 1, bytes: 1254},
		{name: "one segment", dir: TX, frame: tcp4(1254), segs: 1, packets: 1, bytes: 1254},
		{name: "ipv4 tcp with mss option", dir: TX, frame: tcp4(1254, mss), segs: 4, packets: 4, bytes: 1254 + 3*(hdr4+4)},
		{name: "ipv4 tcp with timestamps", dir: TX, frame: tcp4(1254, nop, nop, ts), segs: 2, packets: 2, bytes: 1254 + (hdr4 + 12)},
		{name: "ipv6 tcp under the ipv6 limit, no GSO type", dir: TX, frame: tcp6(1500), segs: 3, packets: 3, bytes: 1500 + 2*hdr6},
		{name: "ipv6 tcp above the ipv6 limit", dir: TX, frame: tcp6(2100), segs: 3, packets: 3, bytes: 2100 + 2*hdr6},
		{name: "ipv4 udp (USO)", dir: TX, frame: udp4, segs: 4, packets: 4, bytes: 1200 + 3*hdrUDP},
		{name: "802.1q ipv4 tcp", dir: TX, frame: vlan4, segs: 2, packets: 2, bytes: 1200 + hdrVLAN},
		{name: "non-IP: headers unknown", dir: TX, frame: arp, segs: 3, packets: 3, bytes: 1200, res: NsflowParseResultPARSE_NON_IP},
	} {
		t.Run(c.name, func(t *testing.T) {
			clearMaps(t, objs)
			ctx := skb.context(map[string]uint32{"gso_segs": c.segs, "gso_size": 500})
			var netns uint32
			inNewNetns(t, func(ns uint32) error {
				netns = ns
				lo, err := netlink.LinkByName("lo")
				if err != nil {
					return err
				}
				// The generic (IPv6) limit first: lowering it lowers the
				// IPv4 one too.
				if err := netlink.LinkSetGSOMaxSize(lo, ipv6Max); err != nil {
					return fmt.Errorf("set lo gso_max_size: %w", err)
				}
				if err := netlink.LinkSetGSOIPv4MaxSize(lo, ipv4Max); err != nil {
					return fmt.Errorf("set lo gso_ipv4_max_size: %w", err)
				}
				p, err := stubFor(objs, NsflowObsKey{Netns: ns, Ifindex: testIfindex, Dir: uint8(c.dir)})
				if err != nil {
					return err
				}
				return tryRun(p, &ebpf.RunOptions{Data: c.frame, Context: ctx})
			})
			st := readMaps(t, objs)
			ok := NsflowObsKey{Netns: netns, Ifindex: testIfindex, Dir: uint8(c.dir)}
			want := NsflowCounters{Packets: c.packets, Bytes: c.bytes}
			if !equalMaps(st.totals, map[NsflowObsKey]NsflowCounters{ok: want}) {
				t.Errorf("%d-byte frame, %d segments: totals %+v, want {%+v: %+v}", len(c.frame), c.segs, st.totals, ok, want)
			}
			var wantStats [NsflowStatSTAT_MAX]uint64
			if c.res != NsflowParseResultPARSE_FLOW {
				wantStats[c.res.stat()] = 1
			} else {
				wantStats[NsflowStatSTAT_FLOW_NEW] = 1
				for k, v := range st.flows {
					if v.Packets != c.packets || v.Bytes != c.bytes || k.Netns != netns || k.Dir != uint8(c.dir) {
						t.Errorf("flow %+v: %+v, want %d packets, %d bytes", k, v, c.packets, c.bytes)
					}
				}
			}
			if uint64(len(st.flows)) != wantStats[NsflowStatSTAT_FLOW_NEW] || st.stats != wantStats {
				t.Errorf("%d flows, stats %v; want stats %v", len(st.flows), st.stats, wantStats)
			}
		})
	}
}
