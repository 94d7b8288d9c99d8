package bpf

import (
	"encoding/binary"
	"errors"
	"math/rand"
	"testing"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"
)

// send is one frame through one program.
type send struct {
	dir   Direction
	frame []byte
}

// checkAgainstReference runs frames through the programs, on maps the
// caller cleared, and checks every invariant: the verdict is untouched and
// no run fails; the totals count exactly the frames sent and their bytes;
// the flows are exactly those the reference parser makes of the frames,
// with its packet, byte and TCP flag counts; the stats moved exactly as the
// reference says. Frames the kernel refuses before running the program
// (kernelRefuses) must fail with EINVAL and count nowhere.
func checkAgainstReference(t testing.TB, objs *Objects, sends []send) {
	t.Helper()
	netns := selfNetns(t)
	wantTotals := map[NsflowObsKey]NsflowCounters{}
	wantFlows := map[pointFlow]NsflowFlowVal{}
	var wantStats [NsflowStatSTAT_MAX]uint64
	for _, s := range sends {
		ret, err := prog(t, objs, s.dir).Run(&ebpf.RunOptions{Data: s.frame})
		if err != nil {
			if kernelRefuses(s.frame) && errors.Is(err, unix.EINVAL) {
				continue
			}
			t.Fatalf("run %s on %x: %v", dirName(s.dir), s.frame, err)
		}
		if int32(ret) != -1 {
			t.Fatalf("%s returned %d on %x, want -1 (TC_NEXT)", dirName(s.dir), int32(ret), s.frame)
		}
		n := uint64(len(s.frame))
		ok := NsflowObsKey{Netns: netns, Ifindex: testIfindex, Dir: uint8(s.dir)}
		c := wantTotals[ok]
		c.Packets++
		c.Bytes += n
		wantTotals[ok] = c

		ref := refParse(s.frame)
		if ref.res != NsflowParseResultPARSE_FLOW {
			wantStats[ref.res.stat()]++
			continue
		}
		key := pointFlow{Netns: netns, Ifindex: testIfindex, Dir: uint8(s.dir), NsflowFlowKey: ref.key}
		v, seen := wantFlows[key]
		if !seen {
			wantStats[NsflowStatSTAT_FLOW_NEW]++
		}
		v.Packets++
		v.Bytes += n
		v.TcpFlags |= ref.flags
		wantFlows[key] = v
	}
	st := readMaps(t, objs)
	if !equalMaps(st.totals, wantTotals) {
		t.Errorf("totals %+v, want exactly %+v", st.totals, wantTotals)
	}
	for k, v := range st.flows {
		w, ok := wantFlows[k]
		if !ok {
			t.Errorf("wrong flow %+v: the reference parser made no such key of any frame sent", k)
			continue
		}
		if v.Packets != w.Packets || v.Bytes != w.Bytes || v.TcpFlags != w.TcpFlags {
			t.Errorf("flow %+v: %d packets, %d bytes, flags %#x; reference %d, %d, %#x",
				k, v.Packets, v.Bytes, v.TcpFlags, w.Packets, w.Bytes, w.TcpFlags)
		}
		if v.FirstNs == 0 || v.LastNs < v.FirstNs {
			t.Errorf("flow %+v: first seen %d, last %d", k, v.FirstNs, v.LastNs)
		}
	}
	for k := range wantFlows {
		if _, ok := st.flows[k]; !ok {
			t.Errorf("missing flow %+v", k)
		}
	}
	if st.stats != wantStats {
		t.Errorf("stats %v, reference %v", st.stats, wantStats)
	}
}

// Ethertypes the random frames are forced to: IPv4, IPv6, 802.1Q, 802.1ad.
var ipTypes = []uint16{0x0800, 0x86dd, 0x8100, 0x88a8}

// Protocols the random frames are biased to, to reach deep into the parser:
// every extension header and every transport with ports.
var nextHeaders = []byte{protoHopOpts, protoRouting, protoFragment, protoAH, protoDstOpts,
	protoTCP, protoUDP, protoUDPLite, protoSCTP, protoICMP, protoICMPv6, 47, 59}

// randomFrame is random bytes behind a forced IP (or VLAN) ethertype, with,
// half of the time, a plausible IP version and a chain of IPv6 extension
// headers of random kinds and small lengths, so the walk and its limit are
// exercised and not only the first bounds check.
func randomFrame(rng *rand.Rand) []byte {
	f := make([]byte, 14+rng.Intn(200))
	rng.Read(f)
	etype := ipTypes[rng.Intn(len(ipTypes))]
	binary.BigEndian.PutUint16(f[12:], etype)
	off := 14
	if etype == 0x8100 || etype == 0x88a8 {
		if len(f) >= 18 && rng.Intn(4) != 0 {
			binary.BigEndian.PutUint16(f[16:], ipTypes[rng.Intn(2)])
		}
		off = 18
		if len(f) < 18 {
			return f
		}
		etype = binary.BigEndian.Uint16(f[16:])
	}
	if rng.Intn(2) == 0 || len(f) <= off {
		return f
	}
	switch etype {
	case 0x0800:
		f[off] = 0x45 + byte(rng.Intn(3))
		if off+8 <= len(f) && rng.Intn(2) == 0 {
			f[off+6], f[off+7] = 0x40, 0 // DF, offset 0: a whole datagram
		}
		if off+10 <= len(f) {
			f[off+9] = nextHeaders[5+rng.Intn(len(nextHeaders)-5)]
		}
	case 0x86dd:
		f[off] = 0x60
		if off+7 > len(f) {
			return f
		}
		f[off+6] = nextHeaders[rng.Intn(len(nextHeaders))]
		next, pos := f[off+6], off+40
		for i := 0; i < 8 && isExtHeader(next) && pos+4 <= len(f); i++ {
			hdr := pos
			f[hdr] = nextHeaders[rng.Intn(len(nextHeaders))]
			f[hdr+1] = byte(rng.Intn(3))
			switch next {
			case protoAH:
				pos += (int(f[hdr+1]) + 2) * 4
			case protoFragment:
				if rng.Intn(2) == 0 {
					f[hdr+2], f[hdr+3] = 0, byte(rng.Intn(2)) // a first fragment
				}
				pos += 8
			default:
				pos += (int(f[hdr+1]) + 1) * 8
			}
			next = f[hdr]
		}
	}
	return f
}

// mutate flips a few bits of a valid frame, and half of the time cuts it.
func mutate(rng *rand.Rand, valid []byte) []byte {
	f := append([]byte(nil), valid...)
	if rng.Intn(2) == 0 {
		f = f[:14+rng.Intn(len(f)-13)]
	}
	for i := rng.Intn(4); i >= 0; i-- {
		f[rng.Intn(len(f))] ^= 1 << rng.Intn(8)
	}
	return f
}

// Random and mutated frames: never a failed run, never a verdict, never a
// wrong flow, totals exact; and wherever gopacket can decode a frame, the
// reference parser agrees with it.
func TestRandomFrames(t *testing.T) {
	objs := load(t, Options{})
	rng := rand.New(rand.NewSource(1))
	valid := validFrames(t)
	const n = 20000
	sends := make([]send, 0, n)
	judged := 0
	for i := 0; i < n; i++ {
		var f []byte
		if i%2 == 0 {
			f = randomFrame(rng)
		} else {
			f = mutate(rng, valid[rng.Intn(len(valid))])
		}
		sends = append(sends, send{Direction(rng.Intn(2)), f})
		if crossCheck(t, f) {
			judged++
		}
	}
	checkAgainstReference(t, objs, sends)
	st := readMaps(t, objs)
	refused := 0
	for _, s := range sends {
		if kernelRefuses(s.frame) {
			refused++
		}
	}
	t.Logf("%d random and mutated frames (%d refused by BPF_PROG_TEST_RUN): %d flows, stats %v; gopacket judged %d of them",
		n, refused, len(st.flows), st.stats, judged)
	// The frames must reach every outcome, or the test proves little.
	if len(st.flows) < 1000 || st.stats[NsflowStatSTAT_TRUNCATED] < 1000 || st.stats[NsflowStatSTAT_NON_IP] < 100 || judged < 2000 {
		t.Errorf("the random frames reach too few outcomes: %d flows, stats %v, %d judged by gopacket", len(st.flows), st.stats, judged)
	}
}

// FuzzProgram checks the same invariants on any frame; its seed corpus is
// the table of frame kinds, so plain `go test` runs it on those.
func FuzzProgram(f *testing.F) {
	for _, row := range frameRows(f) {
		f.Add(row.frame)
	}
	objs := load(f, Options{})
	f.Fuzz(func(t *testing.T, frame []byte) {
		if len(frame) > 1500 {
			t.Skip("longer than an Ethernet MTU")
		}
		clearMaps(t, objs)
		crossCheck(t, frame)
		// Both directions, and one frame twice: the counts add up.
		checkAgainstReference(t, objs, []send{{RX, frame}, {TX, frame}, {RX, frame}})
	})
}
