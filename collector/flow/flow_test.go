package flow

import (
	"encoding/json"
	"net/netip"
	"testing"
	"time"
)

// The key is embedded: a flow and an event encode their key fields at the
// top level, in the order the published schema (docs/schema) shows them.
func TestJSONFlattensKey(t *testing.T) {
	t0 := time.Date(2026, 11, 24, 12, 0, 0, 0, time.UTC)
	k := Key{Netns: "web", NetnsInode: 7, Interface: "eth0", Ifindex: 2, Direction: TX, Protocol: 6,
		Src: netip.MustParseAddr("10.0.0.1"), Dst: netip.MustParseAddr("fd00::2"), SrcPort: 40000, DstPort: 80}
	for _, tc := range []struct {
		v    any
		want string
	}{
		{Flow{Key: k, Packets: 3, Bytes: 180, TCPFlags: 0x12, FirstSeen: t0, LastSeen: t0.Add(time.Second)},
			`{"netns":"web","netns_inode":7,"interface":"eth0","ifindex":2,"direction":"tx","protocol":"tcp","src":"10.0.0.1","dst":"fd00::2","src_port":40000,"dst_port":80,` +
				`"packets":3,"bytes":180,"tcp_flags":"SYN|ACK","first_seen":"2026-11-24T12:00:00Z","last_seen":"2026-11-24T12:00:01Z",` +
				`"src_container":"","dst_container":""}`},
		{Flow{Key: k, Packets: 1, Bytes: 60, FirstSeen: t0, LastSeen: t0, SrcCgroup: 11, DstCgroup: 12, SrcContainer: "web", DstContainer: "sidecar", SrcPod: "default/p", DstPod: "default/p"},
			`{"netns":"web","netns_inode":7,"interface":"eth0","ifindex":2,"direction":"tx","protocol":"tcp","src":"10.0.0.1","dst":"fd00::2","src_port":40000,"dst_port":80,` +
				`"packets":1,"bytes":60,"first_seen":"2026-11-24T12:00:00Z","last_seen":"2026-11-24T12:00:00Z",` +
				`"src_cgroup":11,"dst_cgroup":12,"src_container":"web","dst_container":"sidecar","src_pod":"default/p","dst_pod":"default/p"}`},
		{Event{Time: t0, Key: k},
			`{"time":"2026-11-24T12:00:00Z","netns":"web","netns_inode":7,"interface":"eth0","ifindex":2,"direction":"tx","protocol":"tcp","src":"10.0.0.1","dst":"fd00::2","src_port":40000,"dst_port":80}`},
	} {
		b, err := json.Marshal(tc.v)
		if err != nil {
			t.Fatal(err)
		}
		if string(b) != tc.want {
			t.Errorf("got  %s\nwant %s", b, tc.want)
		}
	}
	ev := Event{Time: t0, Key: k}
	if f := ev.Flow(); f.Key != k || f.Packets != 0 {
		t.Errorf("Event.Flow() = %+v", f)
	}
}

func TestProtocol(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want Protocol
		name string
	}{
		{"tcp", 6, "tcp"}, {"UDP", 17, "udp"}, {"icmpv6", 58, "icmpv6"}, {"132", 132, "sctp"}, {"253", 253, "253"},
	} {
		p, err := ParseProtocol(tc.in)
		if err != nil || p != tc.want || p.String() != tc.name {
			t.Errorf("ParseProtocol(%q) = %d (%s), %v; want %d (%s)", tc.in, p, p, err, tc.want, tc.name)
		}
	}
	for _, bad := range []string{"", "tcpx", "256", "-1"} {
		if _, err := ParseProtocol(bad); err == nil {
			t.Errorf("ParseProtocol(%q) accepted", bad)
		}
	}
}

func TestTCPFlags(t *testing.T) {
	for f, want := range map[TCPFlags]string{0: "", 0x02: "SYN", 0x12: "SYN|ACK", 0x11: "FIN|ACK", 0xff: "FIN|SYN|RST|PSH|ACK|URG|ECE|CWR"} {
		if got := f.String(); got != want {
			t.Errorf("%#x: %q, want %q", uint8(f), got, want)
		}
	}
}

// Flows sort largest first by the chosen counter; ties fall back to the key,
// so that a table does not reorder between refreshes.
func TestSortFlows(t *testing.T) {
	a, b := netip.MustParseAddr("10.0.0.1"), netip.MustParseAddr("10.0.0.2")
	mk := func(ns string, src netip.Addr, pkts, bytes uint64) Flow {
		return Flow{Key: Key{Netns: ns, Src: src, Dst: a}, Packets: pkts, Bytes: bytes}
	}
	flows := []Flow{mk("y", a, 1, 100), mk("x", b, 9, 50), mk("x", a, 1, 100), mk("z", a, 5, 500)}
	SortFlows(flows, SortBytes)
	var got []string
	for _, f := range flows {
		got = append(got, f.Netns+"/"+f.Src.String())
	}
	want := []string{"z/10.0.0.1", "x/10.0.0.1", "y/10.0.0.1", "x/10.0.0.2"}
	if len(got) != len(want) {
		t.Fatalf("%v", got)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Fatalf("by bytes: %v, want %v", got, want)
		}
	}
	SortFlows(flows, SortPackets)
	if flows[0].Netns != "x" || flows[0].Packets != 9 || flows[1].Netns != "z" {
		t.Errorf("by packets: %+v", flows)
	}
}
