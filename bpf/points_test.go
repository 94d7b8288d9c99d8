package bpf

import (
	"errors"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/gopacket/gopacket/layers"
	"golang.org/x/sys/unix"

	"github.com/nsflow/nsflow/test/testenv"
)

// totalsOf reads key's counters through ReadTotals, as the collector does.
func totalsOf(t *testing.T, objs *Objects) map[NsflowObsKey]NsflowCounters {
	t.Helper()
	out := map[NsflowObsKey]NsflowCounters{}
	err := objs.ReadTotals(func(k NsflowObsKey, cv []NsflowCounters) {
		var sum NsflowCounters
		for _, v := range cv {
			sum.Packets += v.Packets
			sum.Bytes += v.Bytes
		}
		out[k] = sum
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// Each observation point gets its own slot, the lowest free one; a released
// slot comes back zeroed, with its points entry cleared, and is the next one
// handed out; a point that asks again keeps its slot; a full table is a
// clear error, and the stubs of two points never count into each other.
func TestSlots(t *testing.T) {
	objs := load(t, Options{MaxPoints: 3})
	udp := build(t, eth(layers.EthernetTypeIPv4), ipv4(layers.IPProtocolUDP), udpDgram(), payload(8))
	a := NsflowObsKey{Netns: 1001, Ifindex: 1, Dir: uint8(RX)}
	b := NsflowObsKey{Netns: 1001, Ifindex: 1, Dir: uint8(TX)}
	c := NsflowObsKey{Netns: 1002, Ifindex: 2, Dir: uint8(RX)}
	d := NsflowObsKey{Netns: 1003, Ifindex: 3, Dir: uint8(TX)}

	pa, pb := stub(t, objs, a), stub(t, objs, b)
	run(t, pa, udp)
	run(t, pa, udp)
	run(t, pb, udp)
	slots := objs.Slots()
	if slots[a] != 0 || slots[b] != 1 || len(slots) != 2 {
		t.Errorf("slots %v, want a:0 b:1", slots)
	}
	n := uint64(len(udp))
	want := map[NsflowObsKey]NsflowCounters{a: {Packets: 2, Bytes: 2 * n}, b: {Packets: 1, Bytes: n}}
	if got := totalsOf(t, objs); !equalMaps(got, want) {
		t.Errorf("totals %v, want %v", got, want)
	}

	// a goes: its counters and its points entry are cleared.
	if n, err := objs.ReleasePoints(func(k NsflowObsKey) bool { return k == a }); n != 1 || err != nil {
		t.Fatalf("release a: %d, %v", n, err)
	}
	var cv []NsflowCounters
	if err := objs.Totals.Lookup(uint32(0), &cv); err != nil {
		t.Fatal(err)
	}
	for cpu, v := range cv {
		if v != (NsflowCounters{}) {
			t.Errorf("released slot 0 still holds %+v on CPU %d", v, cpu)
		}
	}
	var pk NsflowObsKey
	if err := objs.Points.Lookup(uint32(0), &pk); err != nil || pk != (NsflowObsKey{}) {
		t.Errorf("points[0] = %+v (%v), want cleared", pk, err)
	}

	// c takes slot 0 and starts from zero; b is untouched.
	pc := stub(t, objs, c)
	if s := objs.Slots()[c]; s != 0 {
		t.Errorf("c got slot %d, want the freed 0", s)
	}
	run(t, pc, udp)
	want = map[NsflowObsKey]NsflowCounters{b: {Packets: 1, Bytes: n}, c: {Packets: 1, Bytes: n}}
	if got := totalsOf(t, objs); !equalMaps(got, want) {
		t.Errorf("totals %v, want %v", got, want)
	}
	if got := readMaps(t, objs).totals; !equalMaps(got, want) {
		t.Errorf("kernel's maps %v, want %v", got, want)
	}

	// b again: the same slot, its counts continue.
	pb2, err := objs.Stub(b)
	if err != nil {
		t.Fatal(err)
	}
	defer pb2.Close()
	run(t, pb2, udp)
	if got := totalsOf(t, objs)[b]; got != (NsflowCounters{Packets: 2, Bytes: 2 * n}) || objs.Slots()[b] != 1 {
		t.Errorf("b after a second stub: %+v in slot %d, want 2 packets in slot 1", got, objs.Slots()[b])
	}

	stub(t, objs, d) // the third and last slot
	if _, err := objs.Stub(NsflowObsKey{Netns: 1004, Ifindex: 4}); !errors.Is(err, ErrTotalsFull) {
		t.Errorf("a fourth point: %v, want ErrTotalsFull", err)
	}
	if _, err := objs.Stub(NsflowObsKey{Ifindex: 4}); err == nil {
		t.Error("a point without a namespace was given a slot")
	}
}

// privateBPFFS mounts a bpffs of the test's own (on a temporary directory,
// unmounted at the end): the test needs none mounted at /sys/fs/bpf and
// leaves nothing there. A root test that cannot mount one fails.
func privateBPFFS(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	if err := unix.Mount("bpf", dir, "bpf", 0, "mode=0700"); err != nil {
		t.Fatalf("mount a bpffs on %s: %v", dir, err)
	}
	// Registered after TempDir's cleanup, so it runs before it.
	t.Cleanup(func() {
		if err := unix.Unmount(dir, unix.MNT_DETACH); err != nil {
			t.Errorf("unmount bpffs %s: %v", dir, err)
		}
	})
	return dir
}

// With pinned maps, the next Load knows every slot a previous one assigned,
// with its counts, and hands new points other slots.
func TestSlotsPinned(t *testing.T) {
	testenv.RequireRoot(t)
	dir := privateBPFFS(t)
	udp := build(t, eth(layers.EthernetTypeIPv4), ipv4(layers.IPProtocolUDP), udpDgram(), payload(8))
	a := NsflowObsKey{Netns: 2001, Ifindex: 1, Dir: uint8(RX)}
	b := NsflowObsKey{Netns: 2002, Ifindex: 7, Dir: uint8(TX)}

	first, err := Load(Options{PinPath: dir})
	if err != nil {
		t.Fatal(err)
	}
	for _, k := range []NsflowObsKey{a, b} {
		p, err := first.Stub(k)
		if err != nil {
			t.Fatal(err)
		}
		run(t, p, udp)
		p.Close()
	}
	first.ReleasePoints(func(k NsflowObsKey) bool { return k == a })
	first.Close()

	second, err := Load(Options{PinPath: dir})
	if err != nil {
		t.Fatal(err)
	}
	defer second.Close()
	if got := second.Slots(); len(got) != 1 || got[b] != 1 {
		t.Errorf("slots after reload %v, want only b in slot 1", got)
	}
	if got := totalsOf(t, second); !equalMaps(got, map[NsflowObsKey]NsflowCounters{b: {Packets: 1, Bytes: uint64(len(udp))}}) {
		t.Errorf("totals after reload %v, want b's packet", got)
	}
	c := NsflowObsKey{Netns: 2003, Ifindex: 1, Dir: uint8(RX)}
	p, err := second.Stub(c)
	if err != nil {
		t.Fatal(err)
	}
	p.Close()
	if s := second.Slots()[c]; s != 0 {
		t.Errorf("new point got slot %d, want the free 0", s)
	}
	// The pinned parsers are this Load's: the stubs of the first, still
	// attached in a real restart, tail-call them.
	var id ebpf.ProgramID
	if err := second.AccountProgs.Lookup(uint32(RX), &id); err != nil {
		t.Fatal(err)
	}
	info, _ := second.NsflowIngress.Info()
	if want, _ := info.ID(); id != want {
		t.Errorf("account_progs[RX] = program %d, want this load's parser %d", id, want)
	}
}

// The stub counts the packet itself when the parser is missing from
// account_progs (the tail call fails): totals never miss a packet. The
// parser run without a stub has no slot: it counts the packet as one the
// totals could not take (STAT_TOTALS_FULL), and has no point to key a flow
// by. The hand-off is the pair in cb[0] and cb[1]: a parser handed a slot
// that way counts into it; a pair that does not match is no hand-off.
func TestStubAndParserAlone(t *testing.T) {
	objs := load(t, Options{})
	udp := build(t, eth(layers.EthernetTypeIPv4), ipv4(layers.IPProtocolUDP), udpDgram(), payload(8))
	key := NsflowObsKey{Netns: selfNetns(t), Ifindex: testIfindex, Dir: uint8(RX)}
	n := uint64(len(udp))

	if err := objs.AccountProgs.Delete(uint32(RX)); err != nil {
		t.Fatal(err)
	}
	run(t, prog(t, objs, RX), udp)
	st := readMaps(t, objs)
	if want := map[NsflowObsKey]NsflowCounters{key: {Packets: 1, Bytes: n}}; !equalMaps(st.totals, want) {
		t.Errorf("without the parser: totals %v, want %v", st.totals, want)
	}
	if len(st.flows) != 0 || st.stats != [NsflowStatSTAT_MAX]uint64{} {
		t.Errorf("without the parser: flows %v, stats %v; want none", st.flows, st.stats)
	}

	clearMaps(t, objs)
	run(t, objs.NsflowIngress, udp)
	st = readMaps(t, objs)
	if len(st.totals) != 0 || len(st.flows) != 0 {
		t.Errorf("parser alone: totals %v, %d flows; want none", st.totals, len(st.flows))
	}
	if want := [NsflowStatSTAT_MAX]uint64{NsflowStatSTAT_TOTALS_FULL: 1}; st.stats != want {
		t.Errorf("parser alone: stats %v, want %v", st.stats, want)
	}

	skb := loadSkbLayout(t)
	slot := objs.Slots()[key]
	w := slot | uint32(LinkEther)<<16
	for _, c := range []struct {
		name     string
		cb0, cb1 uint32
		handed   bool
	}{
		{"handed", w, w ^ uint32(NsflowConstsHANDOFF_MAGIC), true},
		{"not a pair", w, w ^ uint32(NsflowConstsHANDOFF_MAGIC) ^ 1, false},
	} {
		clearMaps(t, objs)
		runOpts(t, objs.NsflowIngress, &ebpf.RunOptions{Data: udp, Context: skb.context(map[string]uint32{"cb0": c.cb0, "cb1": c.cb1})})
		st = readMaps(t, objs)
		wantTotals, wantFlows, wantStats := map[NsflowObsKey]NsflowCounters{}, 0, [NsflowStatSTAT_MAX]uint64{NsflowStatSTAT_TOTALS_FULL: 1}
		if c.handed {
			wantTotals[key] = NsflowCounters{Packets: 1, Bytes: n}
			wantFlows, wantStats = 1, [NsflowStatSTAT_MAX]uint64{NsflowStatSTAT_FLOW_NEW: 1}
		}
		if !equalMaps(st.totals, wantTotals) || len(st.flows) != wantFlows || st.stats != wantStats {
			t.Errorf("%s: totals %v, %d flows, stats %v; want %v, %d, %v", c.name, st.totals, len(st.flows), st.stats, wantTotals, wantFlows, wantStats)
		}
	}
}

// The pinned cookies map records each slot's namespace: a later Load that
// asks for a point under the same cookie gets the slot with its counts; under
// another cookie (a namespace that got the inode of a gone one) it gets the
// slot zeroed; ReleaseOtherNamespaces frees a reused inode's other points.
func TestSlotsCookies(t *testing.T) {
	testenv.RequireRoot(t)
	dir := privateBPFFS(t)
	udp := build(t, eth(layers.EthernetTypeIPv4), ipv4(layers.IPProtocolUDP), udpDgram(), payload(8))
	n := uint64(len(udp))
	a := NsflowObsKey{Netns: 3001, Ifindex: 1, Dir: uint8(RX)}
	b := NsflowObsKey{Netns: 3002, Ifindex: 1, Dir: uint8(RX)}
	b2 := NsflowObsKey{Netns: 3002, Ifindex: 2, Dir: uint8(RX)}
	const cookieA, cookieB, cookieB2 = 11, 22, 33

	first, err := Load(Options{PinPath: dir})
	if err != nil {
		t.Fatal(err)
	}
	for k, c := range map[NsflowObsKey]uint64{a: cookieA, b: cookieB, b2: cookieB} {
		p, err := first.StubIn(k, c)
		if err != nil {
			t.Fatal(err)
		}
		run(t, p, udp)
		p.Close()
	}
	first.Close()

	second, err := Load(Options{PinPath: dir})
	if err != nil {
		t.Fatal(err)
	}
	defer second.Close()
	if got := second.PointCookies(); got[a] != cookieA || got[b] != cookieB || got[b2] != cookieB {
		t.Fatalf("cookies after reload %v", got)
	}
	// a's namespace is the same one: its counts continue.
	pa, err := second.StubIn(a, cookieA)
	if err != nil {
		t.Fatal(err)
	}
	pa.Close()
	// b's inode now names another namespace: nothing of the old one stays.
	if n, err := second.ReleaseOtherNamespaces(b.Netns, cookieB2); n != 2 || err != nil {
		t.Errorf("release the old namespace of inode %d: %d, %v; want 2", b.Netns, n, err)
	}
	pb, err := second.StubIn(b, cookieB2)
	if err != nil {
		t.Fatal(err)
	}
	pb.Close()
	want := map[NsflowObsKey]NsflowCounters{a: {Packets: 1, Bytes: n}, b: {}}
	if got := totalsOf(t, second); !equalMaps(got, want) {
		t.Errorf("totals %v, want %v (a continued, b from zero)", got, want)
	}
	// Without the release, a point asked under another cookie is zeroed too.
	pa, err = second.StubIn(a, cookieA+1)
	if err != nil {
		t.Fatal(err)
	}
	pa.Close()
	if got := totalsOf(t, second)[a]; got != (NsflowCounters{}) || second.PointCookies()[a] != cookieA+1 {
		t.Errorf("a under a new cookie: %+v, cookie %d; want zero, %d", got, second.PointCookies()[a], cookieA+1)
	}
}
