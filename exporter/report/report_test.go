package report

import (
	"bytes"
	"flag"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/santhosh-tekuri/jsonschema/v6"

	"github.com/nsflow/nsflow/collector/flow"
)

var update = flag.Bool("update", false, "rewrite the golden files")

func fixture() *flow.Snapshot {
	t0 := time.Date(2026, 11, 24, 12, 0, 0, 0, time.UTC)
	a4, b4 := netip.MustParseAddr("10.213.0.2"), netip.MustParseAddr("10.213.0.3")
	lo := netip.MustParseAddr("127.0.0.1")
	return &flow.Snapshot{
		Time: t0.Add(10 * time.Second),
		Namespaces: []flow.NamespaceStats{
			{Name: "db", Inode: 4026532300, Interfaces: []flow.InterfaceStats{
				{Name: "lo", Index: 1, State: flow.StateAttached},
				{Name: "eth0", Index: 2, State: flow.StateAttached, RX: flow.Counters{Packets: 5, Bytes: 490}, TX: flow.Counters{Packets: 5, Bytes: 490}},
			}},
			{Name: "web", Inode: 4026532200, Interfaces: []flow.InterfaceStats{
				{Name: "lo", Index: 1, State: flow.StateAttached, RX: flow.Counters{Packets: 40, Bytes: 3 << 20}, TX: flow.Counters{Packets: 40, Bytes: 3 << 20}},
				{Name: "eth0", Index: 2, State: flow.StateAttached, RX: flow.Counters{Packets: 5, Bytes: 490}, TX: flow.Counters{Packets: 5, Bytes: 490}},
			}},
		},
		Flows: []flow.Flow{
			{Key: flow.Key{Netns: "web", NetnsInode: 4026532200, Interface: "lo", Ifindex: 1, Direction: flow.TX, Protocol: 6, Src: lo, Dst: lo, SrcPort: 40000, DstPort: 8080},
				Packets: 20, Bytes: 3 << 19, TCPFlags: 0x1b,
				FirstSeen: t0.Add(time.Second), LastSeen: t0.Add(2 * time.Second)},
			{Key: flow.Key{Netns: "web", NetnsInode: 4026532200, Interface: "eth0", Ifindex: 2, Direction: flow.TX, Protocol: 1, Src: a4, Dst: b4, SrcPort: 8, DstPort: 0},
				Packets: 5, Bytes: 490,
				FirstSeen: t0.Add(time.Second), LastSeen: t0.Add(5 * time.Second)},
			{Key: flow.Key{Netns: "db", NetnsInode: 4026532300, Interface: "eth0", Ifindex: 2, Direction: flow.RX, Protocol: 17, Src: a4, Dst: b4, SrcPort: 5353, DstPort: 53},
				Packets: 1, Bytes: 80,
				FirstSeen: t0.Add(3 * time.Second), LastSeen: t0.Add(3 * time.Second)},
		},
		Stats: flow.Stats{FlowEntries: 3, FlowCapacity: 65536, FlowsCreated: 3},
	}
}

func golden(t *testing.T, name string, got []byte) {
	t.Helper()
	path := filepath.Join("testdata", name)
	if *update {
		if err := os.WriteFile(path, got, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("%v (run go test -update to create it)", err)
	}
	if !bytes.Equal(got, want) {
		t.Errorf("%s differs from the golden file (review, then go test -update):\n%s", name, got)
	}
}

func TestTraceGolden(t *testing.T) {
	start := time.Date(2026, 11, 24, 12, 0, 0, 0, time.UTC)
	tr := NewTrace(fixture(), start, Options{AttachMode: "tcx", Top: 2})
	if tr.FlowsShown != 2 || tr.FlowsTotal != 3 {
		t.Errorf("top 2 of 3: shown %d of %d", tr.FlowsShown, tr.FlowsTotal)
	}
	var js, table bytes.Buffer
	if err := tr.WriteJSON(&js); err != nil {
		t.Fatal(err)
	}
	if err := tr.WriteTable(&table); err != nil {
		t.Fatal(err)
	}
	golden(t, "trace.json", js.Bytes())
	golden(t, "trace.txt", table.Bytes())
}

func TestBytes(t *testing.T) {
	for n, want := range map[uint64]string{0: "0 B", 1023: "1023 B", 1024: "1.0 KiB", 1536: "1.5 KiB", 3 << 20: "3.0 MiB", 5 << 30: "5.0 GiB"} {
		if got := Bytes(n); got != want {
			t.Errorf("Bytes(%d) = %q, want %q", n, got, want)
		}
	}
}

type protoFilter flow.Protocol

func (p protoFilter) Match(f *flow.Flow) bool { return f.Protocol == flow.Protocol(p) }

func TestTraceOptions(t *testing.T) {
	start := time.Date(2026, 11, 24, 12, 0, 0, 0, time.UTC)
	tr := NewTrace(fixture(), start, Options{Filter: protoFilter(17), FilterText: "udp", Sort: flow.SortPackets})
	if tr.FlowsTotal != 1 || tr.Flows[0].Protocol != "udp" || tr.Filter != "udp" || tr.Sort != "packets" {
		t.Errorf("filtered trace: %+v", tr.Flows)
	}
	tr = NewTrace(fixture(), start, Options{Sort: flow.SortPackets})
	if tr.Flows[0].Packets != 20 || tr.Flows[1].Packets != 5 || tr.Flows[2].Packets != 1 {
		t.Errorf("sort by packets: %+v", tr.Flows)
	}
	// 5 packets of 490 bytes in 10 s: 0.5 packets/s, 392 bit/s.
	eth0 := tr.Namespaces[1].Interfaces[1]
	if eth0.RXPacketRate != 0.5 || eth0.RXBitRate != 392 {
		t.Errorf("rates %+v", eth0)
	}
}

func TestDelta(t *testing.T) {
	prev := fixture()
	cur := fixture()
	cur.Time = prev.Time.Add(time.Second)
	cur.Namespaces[1].Interfaces[0].TX.Packets += 7
	cur.Namespaces[1].Interfaces[0].TX.Bytes += 700
	cur.Flows[0].Packets += 7
	cur.Flows[0].Bytes += 700
	d := Delta(prev, cur)
	if got := d.Namespaces[1].Interfaces[0].TX; got != (flow.Counters{Packets: 7, Bytes: 700}) {
		t.Errorf("interface delta %+v", got)
	}
	if got := d.Namespaces[0].Interfaces[1].RX; got != (flow.Counters{}) {
		t.Errorf("idle interface delta %+v", got)
	}
	if len(d.Flows) != 1 || d.Flows[0].Packets != 7 || d.Flows[0].Bytes != 700 {
		t.Errorf("flow delta %+v, want only the flow that moved", d.Flows)
	}
	tr := NewTrace(d, prev.Time, Options{})
	if r := tr.Flows[0].BitRate; r != 5600 {
		t.Errorf("interval bit rate %v, want 5600", r)
	}
}

func TestBits(t *testing.T) {
	for v, want := range map[float64]string{0: "0 bit/s", 999: "999 bit/s", 1500: "1.5 kbit/s", 12.3e6: "12.3 Mbit/s", 2e9: "2.0 Gbit/s"} {
		if got := Bits(v); got != want {
			t.Errorf("Bits(%v) = %q, want %q", v, got, want)
		}
	}
}

// The golden document matches the published schema (docs/schema).
func TestGoldenMatchesSchema(t *testing.T) {
	sch, err := jsonschema.NewCompiler().Compile("../../docs/schema/trace.schema.json")
	if err != nil {
		t.Fatal(err)
	}
	f, err := os.Open("testdata/trace.json")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	v, err := jsonschema.UnmarshalJSON(f)
	if err != nil {
		t.Fatal(err)
	}
	if err := sch.Validate(v); err != nil {
		t.Error(err)
	}
}

// containersFixture is pod web (containers web and a sidecar whose name
// holds an escape character) talking over lo, TCP both ways and UDP, and
// web talking to container srv of pod db over eth0; every lo flow is seen
// at lo's tx and again at its rx. Without CRI pod names (SrcPod, DstPod)
// the aggregation takes them from the namespace.
func containersFixture() *flow.Snapshot {
	t0 := time.Date(2026, 11, 24, 12, 0, 0, 0, time.UTC)
	lo := netip.MustParseAddr("127.0.0.1")
	a4, b4 := netip.MustParseAddr("10.213.0.2"), netip.MustParseAddr("10.213.0.3")
	mk := func(iface string, idx int, dir flow.Direction, proto flow.Protocol, src, dst netip.Addr, sport, dport uint16, p uint64, sc, dc string) flow.Flow {
		return flow.Flow{Key: flow.Key{Netns: "web", NetnsInode: 4026532200, Interface: iface, Ifindex: idx, Direction: dir, Protocol: proto,
			Src: src, Dst: dst, SrcPort: sport, DstPort: dport}, Packets: p, Bytes: p * 100,
			FirstSeen: t0.Add(time.Second), LastSeen: t0.Add(2 * time.Second), SrcContainer: sc, DstContainer: dc}
	}
	const side = "side\x1bcar"
	flows := []flow.Flow{
		mk("lo", 1, flow.TX, 6, lo, lo, 40000, 8080, 20, "web", side),
		mk("lo", 1, flow.RX, 6, lo, lo, 40000, 8080, 20, "web", side),
		mk("lo", 1, flow.TX, 6, lo, lo, 8080, 40000, 15, side, "web"),
		mk("lo", 1, flow.RX, 6, lo, lo, 8080, 40000, 15, side, "web"),
		mk("lo", 1, flow.TX, 17, lo, lo, 5000, 53, 4, "web", side),
		mk("lo", 1, flow.RX, 17, lo, lo, 5000, 53, 4, "web", side),
		mk("eth0", 2, flow.TX, 6, a4, b4, 41000, 80, 5, "web", "srv"),
		mk("eth0", 2, flow.RX, 6, b4, a4, 80, 41000, 3, "srv", "web"),
	}
	flows[6].DstPod, flows[7].SrcPod = "shop/db-1", "shop/db-1"
	return &flow.Snapshot{
		Time: t0.Add(10 * time.Second),
		Namespaces: []flow.NamespaceStats{
			{Name: "web", Inode: 4026532200, Pod: &flow.PodInfo{Name: "web-7d4f", Namespace: "shop"}, Interfaces: []flow.InterfaceStats{
				{Name: "lo", Index: 1, State: flow.StateAttached, RX: flow.Counters{Packets: 39, Bytes: 3900}, TX: flow.Counters{Packets: 39, Bytes: 3900}},
				{Name: "eth0", Index: 2, State: flow.StateAttached, RX: flow.Counters{Packets: 3, Bytes: 300}, TX: flow.Counters{Packets: 5, Bytes: 500}},
			}},
		},
		Flows: flows,
		Stats: flow.Stats{FlowEntries: 8, FlowCapacity: 65536, FlowsCreated: 8},
	}
}

// By container: one row per point and pair of containers, lo counted at tx
// only, sums exact; by pod and by netns likewise.
func TestAggregate(t *testing.T) {
	snap := containersFixture()
	type row struct {
		iface, dir, src, dst string
		flows                int
		packets              uint64
	}
	web := "shop/web-7d4f"
	for _, tc := range []struct {
		by   AggregateBy
		want []row
	}{
		{ByContainer, []row{
			{"eth0", "rx", "shop/db-1:srv", web + ":web", 1, 3},
			{"eth0", "tx", web + ":web", "shop/db-1:srv", 1, 5},
			{"lo", "tx", web + ":side\x1bcar", web + ":web", 1, 15},
			{"lo", "tx", web + ":web", web + ":side\x1bcar", 2, 24},
		}},
		{ByPod, []row{
			{"eth0", "rx", "shop/db-1:", web + ":", 1, 3},
			{"eth0", "tx", web + ":", "shop/db-1:", 1, 5},
			{"lo", "tx", web + ":", web + ":", 3, 39},
		}},
		{ByNetns, []row{
			{"eth0", "rx", ":", ":", 1, 3},
			{"eth0", "tx", ":", ":", 1, 5},
			{"lo", "rx", ":", ":", 3, 39},
			{"lo", "tx", ":", ":", 3, 39},
		}},
	} {
		var got []row
		for _, r := range Aggregate(tc.by, snap.Namespaces, snap.Flows) {
			got = append(got, row{r.Interface, string(r.Direction), r.SrcPod + ":" + r.SrcContainer, r.DstPod + ":" + r.DstContainer, r.Flows, r.Packets})
		}
		if fmt.Sprint(got) != fmt.Sprint(tc.want) {
			t.Errorf("by %s:\n got %v\nwant %v", tc.by, got, tc.want)
		}
		// Every packet sent over lo and eth0 is in exactly one tx row: the
		// rows of a point add up to its totals.
		var loTX uint64
		for _, r := range got {
			if r.iface == "lo" && r.dir == "tx" {
				loTX += r.packets
			}
		}
		if loTX != snap.Namespaces[0].Interfaces[0].TX.Packets {
			t.Errorf("by %s: lo tx rows hold %d packets, lo sent %d", tc.by, loTX, snap.Namespaces[0].Interfaces[0].TX.Packets)
		}
	}
}

// Flows with containers, and each aggregation, as tables and JSON (golden
// files, the JSON checked against the schema).
func TestContainersGolden(t *testing.T) {
	start := time.Date(2026, 11, 24, 12, 0, 0, 0, time.UTC)
	sch, err := jsonschema.NewCompiler().Compile("../../docs/schema/trace.schema.json")
	if err != nil {
		t.Fatal(err)
	}
	for _, by := range AggregateKinds {
		tr := NewTrace(containersFixture(), start, Options{AttachMode: "tcx", AggregateBy: by})
		var js, table bytes.Buffer
		if err := tr.WriteJSON(&js); err != nil {
			t.Fatal(err)
		}
		if err := tr.WriteTable(&table); err != nil {
			t.Fatal(err)
		}
		if bytes.ContainsRune(table.Bytes(), 0x1b) {
			t.Errorf("by %s: an escape character reached the table", by)
		}
		golden(t, "containers_by_"+string(by)+".json", js.Bytes())
		golden(t, "containers_by_"+string(by)+".txt", table.Bytes())
		v, err := jsonschema.UnmarshalJSON(bytes.NewReader(js.Bytes()))
		if err != nil {
			t.Fatal(err)
		}
		if err := sch.Validate(v); err != nil {
			t.Errorf("by %s: %v", by, err)
		}
	}
}
