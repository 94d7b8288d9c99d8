package bpf

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/ringbuf"
	"github.com/gopacket/gopacket/layers"
	"golang.org/x/sys/unix"

	"github.com/nsflow/nsflow/test/testenv"
)

// Under BPF_PROG_TEST_RUN the packet's device is the loopback device of the
// calling thread's namespace (unless the context names another device):
// ifindex 1 of this process's netns.
const testIfindex = 1

// netnsInode is the inode of the network namespace at path.
func netnsInode(t testing.TB, path string) uint32 {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	return uint32(st.Ino)
}

func selfNetns(t testing.TB) uint32 { return netnsInode(t, "/proc/self/ns/net") }

// load loads fresh objects, closed (with the stubs loaded for them) when
// the test ends.
func load(t testing.TB, opts Options) *Objects {
	t.Helper()
	testenv.RequireRoot(t)
	objs, err := Load(opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		stubs.Lock()
		for _, p := range stubs.m[objs] {
			p.Close()
		}
		delete(stubs.m, objs)
		stubs.Unlock()
		objs.Close()
	})
	return objs
}

// stubs are the stubs loaded for the tests' objects, by observation point:
// one per point, as the collector holds one per hook.
var stubs = struct {
	sync.Mutex
	m map[*Objects]map[NsflowObsKey]*ebpf.Program
}{m: map[*Objects]map[NsflowObsKey]*ebpf.Program{}}

// stubFor returns the stub that counts into key's slot, loading it the
// first time. Safe on any goroutine.
func stubFor(objs *Objects, key NsflowObsKey) (*ebpf.Program, error) {
	return stubForHook(objs, Hook{Point: key, Link: LinkEther})
}

// stubForHook is stubFor with the hook's link layer.
func stubForHook(objs *Objects, h Hook) (*ebpf.Program, error) {
	key := h.Point
	stubs.Lock()
	defer stubs.Unlock()
	if p, ok := stubs.m[objs][key]; ok {
		return p, nil
	}
	p, err := objs.StubFor(h)
	if err != nil {
		return nil, err
	}
	if stubs.m[objs] == nil {
		stubs.m[objs] = map[NsflowObsKey]*ebpf.Program{}
	}
	stubs.m[objs][key] = p
	return p, nil
}

func stub(t testing.TB, objs *Objects, key NsflowObsKey) *ebpf.Program {
	t.Helper()
	p, err := stubFor(objs, key)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// prog is the stub of dir's hook on the device BPF_PROG_TEST_RUN uses by
// default: lo (testIfindex) of the test's namespace.
func prog(t testing.TB, objs *Objects, dir Direction) *ebpf.Program {
	t.Helper()
	return stub(t, objs, NsflowObsKey{Netns: selfNetns(t), Ifindex: testIfindex, Dir: uint8(dir)})
}

func dirName(dir Direction) string {
	if dir == TX {
		return "egress"
	}
	return "ingress"
}

// pointFlow is a flow key with its slot replaced by the observation point
// the slot names (Slot 0).
type pointFlow struct {
	Netns, Ifindex uint32
	Dir            uint8
	NsflowFlowKey
}

// mapState is everything the programs wrote, per-CPU values summed.
type mapState struct {
	totals map[NsflowObsKey]NsflowCounters
	flows  map[pointFlow]NsflowFlowVal
	stats  [NsflowStatSTAT_MAX]uint64
}

// readMaps reads the kernel's maps themselves: totals by the observation
// point the points map names for each slot (points with no packet left out).
func readMaps(t testing.TB, objs *Objects) mapState {
	t.Helper()
	st := mapState{totals: map[NsflowObsKey]NsflowCounters{}, flows: map[pointFlow]NsflowFlowVal{}}
	slots := make([]uint32, objs.Points.MaxEntries())
	points := make([]NsflowObsKey, objs.Points.MaxEntries())
	var cursor ebpf.MapBatchCursor
	n, err := objs.Points.BatchLookup(&cursor, slots, points, nil)
	if err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		t.Fatal(err)
	}
	for i, ok := range points[:n] {
		if ok.Netns == 0 {
			continue // a free slot
		}
		var cv []NsflowCounters
		if err := objs.Totals.Lookup(slots[i], &cv); err != nil {
			t.Fatal(err)
		}
		var sum NsflowCounters
		for _, v := range cv {
			sum.Packets += v.Packets
			sum.Bytes += v.Bytes
		}
		if _, dup := st.totals[ok]; dup {
			t.Fatalf("point %+v has two slots", ok)
		}
		if sum != (NsflowCounters{}) {
			st.totals[ok] = sum
		}
	}
	var fk NsflowFlowKey
	var sum NsflowFlowVal // one value shared by every CPU
	it := objs.Flows.Iterate()
	for it.Next(&fk, &sum) {
		ok, found := objs.Point(uint32(fk.Slot))
		if !found {
			t.Fatalf("flow %+v: its slot names no point", fk)
		}
		pk := pointFlow{Netns: ok.Netns, Ifindex: ok.Ifindex, Dir: ok.Dir, NsflowFlowKey: fk}
		pk.Slot = 0
		st.flows[pk] = sum
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

// clearMaps zeroes every totals slot (the points keep their slots, as the
// test's stubs keep counting into them), empties flows and containers and
// zeroes the stats.
func clearMaps(t testing.TB, objs *Objects) {
	t.Helper()
	zeroes := make([]NsflowCounters, ebpf.MustPossibleCPU())
	for _, slot := range objs.Slots() {
		if err := objs.Totals.Put(slot, zeroes); err != nil {
			t.Fatal(err)
		}
	}
	var fk NsflowFlowKey
	var fv NsflowFlowVal
	var fkeys []NsflowFlowKey
	it := objs.Flows.Iterate()
	for it.Next(&fk, &fv) {
		fkeys = append(fkeys, fk)
	}
	if err := it.Err(); err != nil {
		t.Fatal(err)
	}
	for _, k := range fkeys {
		if err := objs.Flows.Delete(k); err != nil {
			t.Fatal(err)
		}
	}
	var ck NsflowContainerKey
	var cv NsflowCounters
	var ckeys []NsflowContainerKey
	for it := objs.Containers.Iterate(); it.Next(&ck, &cv); {
		ckeys = append(ckeys, ck)
	}
	for _, k := range ckeys {
		if err := objs.Containers.Delete(k); err != nil {
			t.Fatal(err)
		}
	}
	zero := make([]uint64, ebpf.MustPossibleCPU())
	for i := uint32(0); i < uint32(NsflowStatSTAT_MAX); i++ {
		if err := objs.Stats.Put(i, zero); err != nil {
			t.Fatal(err)
		}
	}
}

// kernelRefuses reports whether BPF_PROG_TEST_RUN rejects the frame before
// the program runs (EINVAL, measured on 6.18): shorter than an Ethernet
// header, or an untagged IPv4 (IPv6) frame without room for a full IPv4
// (IPv6) header. Real TC hooks do see such frames; the VLAN-tagged
// truncated rows of the table reach the program's own checks for them.
func kernelRefuses(frame []byte) bool {
	if len(frame) < 14 {
		return true
	}
	switch binary.BigEndian.Uint16(frame[12:]) {
	case 0x0800:
		return len(frame) < 14+20
	case 0x86dd:
		return len(frame) < 14+40
	}
	return false
}

// runOpts runs a program and checks it returned TC_NEXT without error.
func runOpts(t testing.TB, p *ebpf.Program, opts *ebpf.RunOptions) {
	t.Helper()
	if err := tryRun(p, opts); err != nil {
		t.Fatal(err)
	}
}

// tryRun runs a program; an error if the run failed or the program
// returned anything but TC_NEXT. For goroutines other than the test's,
// where t.Fatal must not be called.
func tryRun(p *ebpf.Program, opts *ebpf.RunOptions) error {
	ret, err := p.Run(opts)
	if err != nil {
		return fmt.Errorf("run %s on a %d-byte frame: %w", p, len(opts.Data), err)
	}
	if int32(ret) != -1 {
		return fmt.Errorf("%s returned %d on a %d-byte frame, want -1 (TC_NEXT): it must never change a verdict", p, int32(ret), len(opts.Data))
	}
	return nil
}

func run(t testing.TB, p *ebpf.Program, frame []byte) {
	t.Helper()
	runOpts(t, p, &ebpf.RunOptions{Data: frame})
}

// coarseNow reads the clock the programs stamp flows with
// (bpf_ktime_get_coarse_ns).
func coarseNow(t testing.TB) uint64 {
	t.Helper()
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_MONOTONIC_COARSE, &ts); err != nil {
		t.Fatal(err)
	}
	return uint64(ts.Nano())
}

// TestFrames runs every frame kind of the table through both programs, on
// emptied maps, and checks everything they wrote, exactly. Twice: with the
// parsers of the default, and with those of the per-container attribution
// (all of it on), which must count the same and, besides, write the cgroup
// of the socket BPF_PROG_TEST_RUN gives its sk_buff (one it makes in the
// calling process's cgroup) into egress flows, 0 into ingress ones (no
// socket has the table's addresses), and the same counts per (slot,
// cgroup) into the containers map as into the totals.
func TestFrames(t *testing.T) {
	for _, attr := range []bool{false, true} {
		t.Run(map[bool]string{false: "plain", true: "attribution"}[attr], func(t *testing.T) {
			opts := Options{}
			if attr {
				opts = Options{Attribution: true, SocketLookup: true, ContainerEntries: 64}
			}
			frames(t, opts)
		})
	}
}

// selfCgroup is the cgroup v2 id of the calling process's cgroup.
func selfCgroup(t *testing.T) uint64 {
	t.Helper()
	b, err := os.ReadFile("/proc/self/cgroup")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if path, ok := strings.CutPrefix(line, "0::"); ok {
			var st unix.Stat_t
			if err := unix.Stat(filepath.Join(cgroup2Mount(t), path), &st); err != nil {
				t.Fatal(err)
			}
			return st.Ino
		}
	}
	t.Fatalf("no cgroup v2 line in /proc/self/cgroup: %q", b)
	return 0
}

func frames(t *testing.T, opts Options) {
	objs := load(t, opts) // one load: a load takes ~0.1 s here
	netns := selfNetns(t)
	var selfCg uint64
	if opts.Attribution {
		selfCg = selfCgroup(t)
	}
	// Three separate runs: RunOptions.Repeat would do, but cilium/ebpf
	// restarts a repeated run from scratch when a signal interrupts it,
	// which would break exact counts once in a long while.
	const runs = 3
	for _, row := range frameRows(t) {
		for _, dir := range []Direction{RX, TX} {
			t.Run(row.name+"/"+dirName(dir), func(t *testing.T) {
				clearMaps(t, objs)
				p := prog(t, objs, dir)
				before := coarseNow(t)
				for range runs {
					run(t, p, row.frame)
				}
				after := coarseNow(t)
				st := readMaps(t, objs)

				ok := NsflowObsKey{Netns: netns, Ifindex: testIfindex, Dir: uint8(dir)}
				nbytes := uint64(runs * len(row.frame))
				wantTotals := map[NsflowObsKey]NsflowCounters{ok: {Packets: runs, Bytes: nbytes}}
				if !equalMaps(st.totals, wantTotals) {
					t.Errorf("totals %+v, want exactly %+v", st.totals, wantTotals)
				}
				var wantStats [NsflowStatSTAT_MAX]uint64
				if row.res != NsflowParseResultPARSE_FLOW {
					wantStats[row.res.stat()] = runs
					if len(st.flows) != 0 {
						t.Errorf("flows %+v, want none", st.flows)
					}
				} else {
					wantStats[NsflowStatSTAT_FLOW_NEW] = 1
					k := row.want.key(netns, testIfindex, dir)
					v, found := st.flows[k]
					if len(st.flows) != 1 || !found {
						t.Fatalf("flows %+v, want exactly one: %+v", st.flows, k)
					}
					if v.Packets != runs || v.Bytes != nbytes || v.TcpFlags != row.want.flags || v.Pad != [7]uint8{} {
						t.Errorf("flow value %+v, want %d packets, %d bytes, TCP flags %#x", v, runs, nbytes, row.want.flags)
					}
					if v.FirstNs < before || v.LastNs < v.FirstNs || v.LastNs > after {
						t.Errorf("flow seen first %d, last %d: want both within [%d, %d], first <= last", v.FirstNs, v.LastNs, before, after)
					}
					if want := map[Direction]uint64{TX: selfCg}[dir]; v.Cgroup != want {
						t.Errorf("flow cgroup %d, want %d", v.Cgroup, want)
					}
				}
				containers := map[NsflowContainerKey]NsflowCounters{}
				if err := objs.ReadContainers(func(slot uint32, _ NsflowObsKey, cg uint64, c NsflowCounters) {
					containers[NsflowContainerKey{Slot: slot, Cgroup: cg}] = c
				}); err != nil {
					t.Fatal(err)
				}
				wantContainers := map[NsflowContainerKey]NsflowCounters{}
				if opts.ContainerEntries > 0 {
					wantContainers[NsflowContainerKey{Slot: objs.Slots()[ok], Cgroup: map[Direction]uint64{TX: selfCg}[dir]}] = wantTotals[ok]
				}
				if !equalMaps(containers, wantContainers) {
					t.Errorf("containers %+v, want %+v", containers, wantContainers)
				}
				if st.stats != wantStats {
					t.Errorf("stats %v, want %v", st.stats, wantStats)
				}
			})
		}
	}
}

func equalMaps[K comparable, V comparable](a, b map[K]V) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if w, ok := b[k]; !ok || w != v {
			return false
		}
	}
	return true
}

// BPF_PROG_TEST_RUN refuses frames shorter than an Ethernet header, and
// untagged IP frames shorter than their IP header, before the program runs:
// nothing may be counted for them.
func TestKernelRefuses(t *testing.T) {
	objs := load(t, Options{})
	ip4 := build(t, eth(layers.EthernetTypeIPv4), ipv4(layers.IPProtocolUDP), udpDgram())
	ip6 := build(t, eth(layers.EthernetTypeIPv6), ipv6(layers.IPProtocolUDP), udpDgram())
	refused := [][]byte{nil, {0}, make([]byte, 13), ip4[:14], ip4[:14+19], ip6[:14], ip6[:14+39]}
	for _, f := range refused {
		if !kernelRefuses(f) {
			t.Fatalf("kernelRefuses(%x) = false", f)
		}
		for _, dir := range []Direction{RX, TX} {
			if _, err := prog(t, objs, dir).Run(&ebpf.RunOptions{Data: f}); !errors.Is(err, unix.EINVAL) {
				t.Errorf("%s on a %d-byte frame: %v, want EINVAL", dirName(dir), len(f), err)
			}
		}
	}
	st := readMaps(t, objs)
	if len(st.totals) != 0 || len(st.flows) != 0 || st.stats != [NsflowStatSTAT_MAX]uint64{} {
		t.Errorf("refused frames were counted: %+v", st)
	}
	// The shortest frames the kernel takes are counted.
	arp := make([]byte, 14)
	binary.BigEndian.PutUint16(arp[12:], uint16(layers.EthernetTypeARP))
	for _, f := range [][]byte{arp, ip4[:14+20], ip6[:14+40]} {
		if kernelRefuses(f) {
			t.Fatalf("kernelRefuses(%x) = true", f)
		}
		run(t, prog(t, objs, RX), f)
	}
	st = readMaps(t, objs)
	ok := NsflowObsKey{Netns: selfNetns(t), Ifindex: testIfindex, Dir: uint8(RX)}
	if want := (NsflowCounters{Packets: 3, Bytes: 14 + 34 + 54}); st.totals[ok] != want || len(st.totals) != 1 {
		t.Errorf("totals %+v, want {%+v: %+v}", st.totals, ok, want)
	}
}

// The Go side relies on these layouts and map shapes.
func TestLayout(t *testing.T) {
	for _, c := range []struct {
		name string
		v    any
		want int
	}{
		{"obs_key", NsflowObsKey{}, 12},
		{"flow_key", NsflowFlowKey{}, 40},
		{"counters", NsflowCounters{}, 16},
		{"flow_val", NsflowFlowVal{}, 48},
		{"container_key", NsflowContainerKey{}, 16},
		{"flow_event", NsflowFlowEvent{}, 48},
	} {
		if got := binary.Size(c.v); got != c.want {
			t.Errorf("binary.Size(%s) = %d, want %d", c.name, got, c.want)
		}
	}
	type shape struct {
		typ        ebpf.MapType
		key, value uint32
		max        uint32
	}
	check := func(t *testing.T, name string, m *ebpf.Map, want shape) {
		t.Helper()
		got := shape{m.Type(), m.KeySize(), m.ValueSize(), m.MaxEntries()}
		if got != want {
			t.Errorf("map %s: %+v, want %+v", name, got, want)
		}
	}
	ncpu := ebpf.MustPossibleCPU()
	for _, c := range []struct {
		name            string
		opts            Options
		entries, points uint32
		containers      uint32
	}{
		{"default", Options{}, DefaultFlowEntries(ncpu), DefaultMaxPoints(ncpu), 1},
		{"sizes", Options{FlowEntries: 1234, MaxPoints: 100, ContainerEntries: 777}, 1234, 100, 777},
	} {
		t.Run(c.name, func(t *testing.T) {
			objs := load(t, c.opts)
			check(t, NsflowMapTotals, objs.Totals, shape{ebpf.PerCPUArray, 4, 16, c.points})
			check(t, NsflowMapPoints, objs.Points, shape{ebpf.Array, 4, 12, c.points})
			check(t, NsflowMapAccountProgs, objs.AccountProgs, shape{ebpf.ProgramArray, 4, 4, 2})
			check(t, NsflowMapFlows, objs.Flows, shape{ebpf.LRUHash, 40, 48, c.entries})
			check(t, NsflowMapContainers, objs.Containers, shape{ebpf.LRUHash, 16, 16, c.containers})
			check(t, NsflowMapStats, objs.Stats, shape{ebpf.PerCPUArray, 4, 8, uint32(NsflowStatSTAT_MAX)})
			check(t, NsflowMapFlowEvents, objs.FlowEvents, shape{ebpf.RingBuf, 0, 0, 256 * 1024})
		})
	}
}

// NoFlows keeps the exact totals and writes no flow. Nothing is parsed, so
// no frame is counted as non-IP or truncated either.
func TestNoFlows(t *testing.T) {
	objs := load(t, Options{NoFlows: true})
	netns := selfNetns(t)
	want := map[NsflowObsKey]NsflowCounters{}
	for _, row := range frameRows(t) {
		for _, dir := range []Direction{RX, TX} {
			run(t, prog(t, objs, dir), row.frame)
			ok := NsflowObsKey{Netns: netns, Ifindex: testIfindex, Dir: uint8(dir)}
			c := want[ok]
			c.Packets++
			c.Bytes += uint64(len(row.frame))
			want[ok] = c
		}
	}
	st := readMaps(t, objs)
	if !equalMaps(st.totals, want) {
		t.Errorf("totals %+v, want %+v", st.totals, want)
	}
	if len(st.flows) != 0 {
		t.Errorf("NoFlows: %d flows, want none", len(st.flows))
	}
	if st.stats != [NsflowStatSTAT_MAX]uint64{} {
		t.Errorf("NoFlows: stats %v, want all 0", st.stats)
	}
}

// A full flow map evicts old flows (LRU) while the totals stay exact.
func TestFlowMapFull(t *testing.T) {
	objs := load(t, Options{FlowEntries: 64})
	const n = 1000
	var nbytes uint64
	for i := 0; i < n; i++ {
		u := udpDgram()
		u.SrcPort = layers.UDPPort(10000 + i)
		f := build(t, eth(layers.EthernetTypeIPv4), ipv4(layers.IPProtocolUDP), u)
		run(t, prog(t, objs, RX), f)
		nbytes += uint64(len(f))
	}
	st := readMaps(t, objs)
	ok := NsflowObsKey{Netns: selfNetns(t), Ifindex: testIfindex, Dir: uint8(RX)}
	if want := (NsflowCounters{Packets: n, Bytes: nbytes}); st.totals[ok] != want {
		t.Errorf("totals %+v, want %+v", st.totals[ok], want)
	}
	if len(st.flows) == 0 || len(st.flows) > 64 {
		t.Errorf("%d flows, want 1..64 (the map's capacity)", len(st.flows))
	}
	for k, v := range st.flows {
		if v.Packets != 1 {
			t.Errorf("flow %+v: %d packets, want 1", k, v.Packets)
		}
	}
	if st.stats[NsflowStatSTAT_FLOW_NEW] != n || st.stats[NsflowStatSTAT_FLOW_ERR] != 0 {
		t.Errorf("%d flows created, %d insert errors; want %d and 0", st.stats[NsflowStatSTAT_FLOW_NEW], st.stats[NsflowStatSTAT_FLOW_ERR], n)
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
		run(t, prog(t, objs, RX), f)
	}
	rd.SetDeadline(time.Now().Add(200 * time.Millisecond)) // the events are in the buffer before Read
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
