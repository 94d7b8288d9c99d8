package tui

import (
	"net/netip"
	"strings"
	"testing"
	"time"

	tea "github.com/charmbracelet/bubbletea"

	"github.com/nsflow/nsflow/collector/flow"
)

func snap(at time.Time, udp, tcp uint64) *flow.Snapshot {
	a, b := netip.MustParseAddr("10.213.0.2"), netip.MustParseAddr("10.213.0.3")
	return &flow.Snapshot{
		Time: at,
		Namespaces: []flow.NamespaceStats{{Name: "web", Inode: 7, Interfaces: []flow.InterfaceStats{
			{Name: "eth0", Index: 2, TX: flow.Counters{Packets: udp + tcp, Bytes: 100*udp + 1500*tcp}},
		}}},
		Flows: []flow.Flow{
			{Key: flow.Key{Netns: "web", NetnsInode: 7, Interface: "eth0", Ifindex: 2, Direction: flow.TX, Protocol: 17, Src: a, Dst: b, SrcPort: 1, DstPort: 53}, Packets: udp, Bytes: 100 * udp},
			{Key: flow.Key{Netns: "web", NetnsInode: 7, Interface: "eth0", Ifindex: 2, Direction: flow.TX, Protocol: 6, Src: a, Dst: b, SrcPort: 2, DstPort: 80}, Packets: tcp, Bytes: 1500 * tcp},
		},
	}
}

func key(s string) tea.KeyMsg {
	switch s {
	case "enter":
		return tea.KeyMsg{Type: tea.KeyEnter}
	case "esc":
		return tea.KeyMsg{Type: tea.KeyEsc}
	}
	return tea.KeyMsg{Type: tea.KeyRunes, Runes: []rune(s)}
}

// The flows' destinations, as the table shows them (a bare ":53" also
// matches the clock in the header).
const udpDst, tcpDst = "10.213.0.3:53", "10.213.0.3:80"

func TestModel(t *testing.T) {
	t0 := time.Unix(1000, 0)
	m, err := New(Config{Interval: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	m.Update(snapMsg{snap: snap(t0, 0, 0)})
	// In one second: 100 UDP packets (10 kB) and 10 TCP packets (15 kB).
	m.Update(snapMsg{snap: snap(t0.Add(time.Second), 100, 10)})
	v := m.View()
	if !strings.Contains(v, "sort: rate") || strings.Index(v, tcpDst) > strings.Index(v, udpDst) {
		t.Errorf("by byte rate TCP (120 kbit/s) comes before UDP (80 kbit/s):\n%s", v)
	}
	if !strings.Contains(v, "120.0 kbit/s") || !strings.Contains(v, "80.0 kbit/s") {
		t.Errorf("rates missing:\n%s", v)
	}
	m.Update(key("s"))
	v = m.View()
	if !strings.Contains(v, "sort: packet-rate") || strings.Index(v, udpDst) > strings.Index(v, tcpDst) {
		t.Errorf("by packet rate UDP comes first:\n%s", v)
	}
	// Edit the filter: a bad one shows an error and keeps editing; a good one applies.
	m.Update(key("/"))
	for _, r := range "tcp and" {
		m.Update(key(string(r)))
	}
	m.Update(key("enter"))
	if v = m.View(); !strings.Contains(v, "error:") || !m.editing {
		t.Errorf("bad filter accepted:\n%s", v)
	}
	m.input = "tcp"
	m.Update(key("enter"))
	v = m.View()
	if m.editing || strings.Contains(v, udpDst) || !strings.Contains(v, tcpDst) || !strings.Contains(v, "filter: tcp") {
		t.Errorf("filter tcp not applied:\n%s", v)
	}
	if _, cmd := m.Update(key("q")); cmd == nil {
		t.Error("q does not quit")
	}
}

// Names a tenant chose reach the screen escaped: the view holds no control
// character but the line ends (and no byte that is not UTF-8), whatever
// the namespace, pod and interface are called.
func TestHostileNamesOnScreen(t *testing.T) {
	t0 := time.Unix(1000, 0)
	hostile := func(at time.Time) *flow.Snapshot {
		s := snap(at, 5, 5)
		s.Namespaces[0].Name = "w\x1b[2J\xff"
		s.Namespaces[0].Interfaces[0].Name = "\x1b[31mred"
		s.Namespaces = append(s.Namespaces, flow.NamespaceStats{Name: "p", Inode: 8,
			Pod:        &flow.PodInfo{Name: "x\u202ey", Namespace: "n\x07"},
			Interfaces: []flow.InterfaceStats{{Name: "lo", Index: 1}}})
		for i := range s.Flows {
			s.Flows[i].Netns, s.Flows[i].Interface = s.Namespaces[0].Name, s.Namespaces[0].Interfaces[0].Name
		}
		return s
	}
	m, err := New(Config{Interval: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	m.Update(tea.WindowSizeMsg{Width: 200, Height: 40})
	m.Update(snapMsg{snap: hostile(t0)})
	m.Update(snapMsg{snap: hostile(t0.Add(time.Second))})
	v := m.View()
	for _, r := range v {
		if (r < 0x20 && r != '\n') || r == 0x7f || (r >= 0x80 && r <= 0x9f) || r == 0x202e || r == 0xfffd {
			t.Fatalf("view holds %U:\n%q", r, v)
		}
	}
	for _, want := range []string{flow.SafeName("\x1b[31mred"), flow.SafeName("w\x1b[2J\xff")[:10]} {
		if !strings.Contains(v, want) {
			t.Errorf("view lacks %q:\n%s", want, v)
		}
	}
}

// ctrSnap is pod web's containers web and sidecar over lo (each flow seen
// at lo's tx and rx): n packets of web to the sidecar, n/2 back.
func ctrSnap(at time.Time, n uint64) *flow.Snapshot {
	lo := netip.MustParseAddr("127.0.0.1")
	mk := func(dir flow.Direction, sport, dport uint16, p uint64, src, dst string) flow.Flow {
		return flow.Flow{Key: flow.Key{Netns: "web", NetnsInode: 7, Interface: "lo", Ifindex: 1, Direction: dir, Protocol: 6, Src: lo, Dst: lo,
			SrcPort: sport, DstPort: dport}, Packets: p, Bytes: 100 * p, SrcContainer: src, DstContainer: dst}
	}
	return &flow.Snapshot{
		Time: at,
		Namespaces: []flow.NamespaceStats{{Name: "web", Inode: 7, Interfaces: []flow.InterfaceStats{
			{Name: "lo", Index: 1, TX: flow.Counters{Packets: n + n/2, Bytes: 100 * (n + n/2)}, RX: flow.Counters{Packets: n + n/2, Bytes: 100 * (n + n/2)}},
		}}},
		Flows: []flow.Flow{
			mk(flow.TX, 40000, 8080, n, "web", "side\x1bcar"), mk(flow.RX, 40000, 8080, n, "web", "side\x1bcar"),
			mk(flow.TX, 8080, 40000, n/2, "side\x1bcar", "web"), mk(flow.RX, 8080, 40000, n/2, "side\x1bcar", "web"),
		},
	}
}

// Flows show their containers; --aggregate-by container shows one row per
// pair, lo counted at tx, with the interval's rate.
func TestModelContainers(t *testing.T) {
	t0 := time.Unix(1000, 0)
	m, err := New(Config{Interval: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	m.Update(snapMsg{snap: ctrSnap(t0, 0)})
	m.Update(snapMsg{snap: ctrSnap(t0.Add(time.Second), 100)})
	v := m.View()
	if !strings.Contains(v, "SRC CONTAINER") || !strings.Contains(v, `side\x1bcar`) || strings.ContainsRune(v, 0x1b) {
		t.Errorf("flows without their (escaped) containers:\n%s", v)
	}
	m, _ = New(Config{Interval: time.Second, AggregateBy: "container"})
	m.Update(snapMsg{snap: ctrSnap(t0, 0)})
	m.Update(snapMsg{snap: ctrSnap(t0.Add(time.Second), 100)})
	v = m.View()
	var rows []string
	for _, l := range strings.Split(v, "\n") {
		if f := strings.Fields(l); len(f) > 2 && f[0] == "web" && (f[2] == "tx" || f[2] == "rx") {
			rows = append(rows, strings.Join(strings.Fields(l), " "))
		}
	}
	// 100 packets of 100 bytes in a second: 80 kbit/s; 50 back: 40 kbit/s.
	want := []string{`web lo tx web side\x1bcar 1 80.0 kbit/s 100 9.8 KiB`, `web lo tx side\x1bcar web 1 40.0 kbit/s 50 4.9 KiB`}
	if strings.Join(rows, "|") != strings.Join(want, "|") {
		t.Errorf("aggregated rows:\n%s\nwant\n%s\nview:\n%s", strings.Join(rows, "\n"), strings.Join(want, "\n"), v)
	}
}
