package collector

import (
	"bytes"
	"encoding/binary"
	"testing"

	"github.com/nsflow/nsflow/bpf"
)

// Flow keys come from the kernel; any 40 bytes decode without panic into a
// flow whose addresses have the key's family.
func FuzzDecodeFlowKey(f *testing.F) {
	f.Add(make([]byte, 40))
	k := bpf.NsflowFlowKey{Slot: 1, Family: 4, Proto: 6, Sport: 1, Dport: 2}
	var buf bytes.Buffer
	binary.Write(&buf, binary.NativeEndian, &k)
	f.Add(buf.Bytes())
	f.Fuzz(func(t *testing.T, raw []byte) {
		if len(raw) != 40 {
			return
		}
		var k bpf.NsflowFlowKey
		if err := binary.Read(bytes.NewReader(raw), binary.NativeEndian, &k); err != nil {
			t.Fatal(err)
		}
		pt := bpf.NsflowObsKey{Netns: 1, Ifindex: 2, Dir: 1}
		fl := decodeKey(&k, pt)
		if fl.NetnsInode != 1 || fl.Ifindex != 2 {
			t.Fatal("the point's namespace or interface changed")
		}
		if k.Family == 4 && (!fl.Src.Is4() || !fl.Dst.Is4()) {
			t.Fatalf("family 4 decoded as %s > %s", fl.Src, fl.Dst)
		}
		if k.Family != 4 && (!fl.Src.Is6() || !fl.Dst.Is6()) {
			t.Fatalf("family %d decoded as %s > %s", k.Family, fl.Src, fl.Dst)
		}
		if fl.SrcPort != k.Sport || fl.DstPort != k.Dport || uint8(fl.Protocol) != k.Proto {
			t.Fatal("ports or protocol changed")
		}
	})
}
