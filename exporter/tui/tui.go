// Package tui is `nsflow top`: a live, full-screen view of namespaces and
// flows with their current rates, built on bubbletea.
package tui

import (
	"fmt"
	"sort"
	"strings"
	"time"

	tea "github.com/charmbracelet/bubbletea"

	"github.com/nsflow/nsflow/collector/filter"
	"github.com/nsflow/nsflow/collector/flow"
	"github.com/nsflow/nsflow/exporter/report"
)

// SortKeys are the orders `s` cycles through.
var SortKeys = []string{"rate", "packet-rate", "bytes", "packets"}

// Config configures the view.
type Config struct {
	// Snapshot reads the collector.
	Snapshot func() (*flow.Snapshot, error)
	// Interval between refreshes.
	Interval time.Duration
	// Filter is the initial flow filter (may be empty).
	Filter string
	// Mode is shown in the header.
	Mode string
	// AggregateBy shows rows of flows summed (report.Aggregate) instead
	// of flows; empty means flows.
	AggregateBy report.AggregateBy
}

// Model is the bubbletea model of `nsflow top`.
type Model struct {
	cfg     Config
	prev    *flow.Snapshot
	cur     *flow.Snapshot
	delta   *flow.Snapshot
	err     error
	sortIdx int
	filter  *filter.Filter
	editing bool
	input   string
	paused  bool
	width   int
	height  int
}

type tickMsg time.Time

type snapMsg struct {
	snap *flow.Snapshot
	err  error
}

// New returns the model; Filter must parse (the caller validates it).
func New(cfg Config) (*Model, error) {
	f, err := filter.Parse(cfg.Filter)
	if err != nil {
		return nil, err
	}
	if cfg.Interval <= 0 {
		cfg.Interval = time.Second
	}
	if cfg.AggregateBy == "" {
		cfg.AggregateBy = report.ByFlow
	}
	return &Model{cfg: cfg, filter: f, width: 120, height: 40}, nil
}

// Init implements tea.Model.
func (m *Model) Init() tea.Cmd { return m.read }

func (m *Model) read() tea.Msg {
	s, err := m.cfg.Snapshot()
	return snapMsg{s, err}
}

func (m *Model) tick() tea.Cmd {
	return tea.Tick(m.cfg.Interval, func(t time.Time) tea.Msg { return tickMsg(t) })
}

// Update implements tea.Model.
func (m *Model) Update(msg tea.Msg) (tea.Model, tea.Cmd) {
	switch msg := msg.(type) {
	case tea.WindowSizeMsg:
		m.width, m.height = msg.Width, msg.Height
	case tickMsg:
		if m.paused {
			return m, m.tick()
		}
		return m, m.read
	case snapMsg:
		m.err = msg.err
		if msg.snap != nil {
			if m.cur != nil {
				m.prev = m.cur
			}
			m.cur = msg.snap
			if m.prev != nil {
				m.delta = report.Delta(m.prev, m.cur)
			}
		}
		return m, m.tick()
	case tea.KeyMsg:
		if m.editing {
			return m, m.edit(msg)
		}
		switch msg.String() {
		case "q", "ctrl+c", "esc":
			return m, tea.Quit
		case "s":
			m.sortIdx = (m.sortIdx + 1) % len(SortKeys)
		case "p", " ":
			m.paused = !m.paused
		case "/", "f":
			m.editing, m.input = true, m.filter.String()
		}
	}
	return m, nil
}

func (m *Model) edit(k tea.KeyMsg) tea.Cmd {
	switch k.Type {
	case tea.KeyEnter:
		f, err := filter.Parse(m.input)
		if err != nil {
			m.err = err
			return nil
		}
		m.filter, m.editing, m.err = f, false, nil
	case tea.KeyEsc:
		m.editing, m.err = false, nil
	case tea.KeyBackspace:
		if r := []rune(m.input); len(r) > 0 {
			m.input = string(r[:len(r)-1])
		}
	case tea.KeyCtrlC:
		return tea.Quit
	case tea.KeyRunes, tea.KeySpace:
		m.input += string(k.Runes)
		if k.Type == tea.KeySpace {
			m.input += " "
		}
	}
	return nil
}

// Sort returns the current sort key.
func (m *Model) Sort() string { return SortKeys[m.sortIdx] }

// row is a flow with its current rates.
type row struct {
	f           flow.Flow
	bps, pps    float64
	total, pkts uint64
	agg         int // an aggregated row's index
}

// View implements tea.Model.
func (m *Model) View() string {
	var b strings.Builder
	state := "live"
	if m.paused {
		state = "PAUSED"
	}
	flt := m.filter.String()
	if flt == "" {
		flt = "(all flows)"
	}
	fmt.Fprintf(&b, "nsflow top — %s — sort: %s — filter: %s — mode: %s — %s\n", time.Now().Format("15:04:05"), m.Sort(), flt, m.cfg.Mode, state)
	if m.cur == nil {
		b.WriteString("\nreading…\n")
		return b.String()
	}
	secs := m.cfg.Interval.Seconds()
	if m.prev != nil {
		secs = m.cur.Time.Sub(m.prev.Time).Seconds()
	}
	rate := func(v uint64, scale float64) float64 {
		if secs <= 0 {
			return 0
		}
		return float64(v) * scale / secs
	}

	// Namespaces: current rates from the delta, totals from the snapshot.
	fmt.Fprintf(&b, "\n%-24s %-12s %12s %12s %10s %10s %12s %12s\n", "NETNS", "INTERFACE", "RX RATE", "TX RATE", "RX PKT/S", "TX PKT/S", "RX TOTAL", "TX TOTAL")
	deltaIf := map[[2]uint64]flow.InterfaceStats{}
	if m.delta != nil {
		for _, ns := range m.delta.Namespaces {
			for _, i := range ns.Interfaces {
				deltaIf[[2]uint64{ns.Inode, uint64(i.Index)}] = i
			}
		}
	}
	lines := 0
	for _, ns := range m.cur.Namespaces {
		name := flow.SafeName(ns.Name)
		if ns.Pod != nil {
			name = flow.SafeName(ns.Pod.Namespace + "/" + ns.Pod.Name)
		}
		for _, i := range ns.Interfaces {
			d := deltaIf[[2]uint64{ns.Inode, uint64(i.Index)}]
			fmt.Fprintf(&b, "%-24s %-12s %12s %12s %10.0f %10.0f %12s %12s\n", trunc(name, 24), trunc(flow.SafeName(i.Name), 12),
				report.Bits(rate(d.RX.Bytes, 8)), report.Bits(rate(d.TX.Bytes, 8)), rate(d.RX.Packets, 1), rate(d.TX.Packets, 1),
				report.Bytes(i.RX.Bytes), report.Bytes(i.TX.Bytes))
			lines++
		}
	}

	room := m.height - lines - 9
	if room < 5 {
		room = 5
	}
	if m.cfg.AggregateBy != report.ByFlow {
		m.viewAggregated(&b, rate, room)
	} else {
		m.viewFlows(&b, rate, room)
	}
	b.WriteString("\n")
	switch {
	case m.editing:
		fmt.Fprintf(&b, "filter (pcap-filter syntax, enter to apply, esc to cancel): %s█\n", m.input)
	default:
		b.WriteString("s: sort   /: filter   p: pause   q: quit\n")
	}
	if m.err != nil {
		fmt.Fprintf(&b, "error: %v\n", m.err)
	}
	return b.String()
}

// viewFlows writes the flows table.
func (m *Model) viewFlows(b *strings.Builder, rate func(uint64, float64) float64, room int) {
	deltaFlows := map[flowID]flow.Flow{}
	if m.delta != nil {
		for _, f := range m.delta.Flows {
			deltaFlows[id(&f)] = f
		}
	}
	var rows []row
	named := false // a flow has a container: show the columns
	for _, f := range m.cur.Flows {
		if !m.filter.Match(&f) {
			continue
		}
		d := deltaFlows[id(&f)]
		rows = append(rows, row{f: f, bps: rate(d.Bytes, 8), pps: rate(d.Packets, 1), total: f.Bytes, pkts: f.Packets})
		named = named || f.SrcContainer != "" || f.DstContainer != ""
	}
	m.sortRows(rows)
	ctr := func(src, dst string) string {
		if !named {
			return ""
		}
		return fmt.Sprintf(" %-14s %-14s", trunc(src, 14), trunc(dst, 14))
	}
	fmt.Fprintf(b, "\n%-16s %-8s %-3s %-6s %-40s %-40s%s %12s %9s %10s\n", "NETNS", "IFACE", "DIR", "PROTO", "SOURCE", "DESTINATION",
		ctr("SRC CONTAINER", "DST CONTAINER"), "RATE", "PKT/S", "BYTES")
	for i, r := range rows {
		if i >= room {
			fmt.Fprintf(b, "… %d more flows\n", len(rows)-room)
			break
		}
		p := r.f.Protocol.String()
		fmt.Fprintf(b, "%-16s %-8s %-3s %-6s %-40s %-40s%s %12s %9.0f %10s\n", trunc(flow.SafeName(r.f.Netns), 16), trunc(flow.SafeName(r.f.Interface), 8),
			r.f.Direction, p, report.Endpoint(r.f.Src, r.f.SrcPort, p), report.Endpoint(r.f.Dst, r.f.DstPort, p),
			ctr(name(r.f.SrcContainer), name(r.f.DstContainer)), report.Bits(r.bps), r.pps, report.Bytes(r.total))
	}
	if len(rows) == 0 {
		b.WriteString("(no flows)\n")
	}
}

// viewAggregated writes the rows of flows summed by m.cfg.AggregateBy:
// totals from the snapshot, rates from the last interval's delta.
func (m *Model) viewAggregated(b *strings.Builder, rate func(uint64, float64) float64, room int) {
	filtered := func(s *flow.Snapshot) []flow.Flow {
		var out []flow.Flow
		for _, f := range s.Flows {
			if m.filter.Match(&f) {
				out = append(out, f)
			}
		}
		return out
	}
	deltas := map[report.AggKey]report.AggRow{}
	if m.delta != nil {
		for _, r := range report.Aggregate(m.cfg.AggregateBy, m.delta.Namespaces, filtered(m.delta)) {
			deltas[r.AggKey] = r
		}
	}
	var rows []row
	keys := map[int]report.AggRow{}
	for _, r := range report.Aggregate(m.cfg.AggregateBy, m.cur.Namespaces, filtered(m.cur)) {
		d := deltas[r.AggKey]
		keys[len(rows)] = r
		rows = append(rows, row{bps: rate(d.Bytes, 8), pps: rate(d.Packets, 1), total: r.Bytes, pkts: r.Packets, agg: len(rows)})
	}
	m.sortRows(rows)
	src, dst := "SRC CONTAINER", "DST CONTAINER"
	label := func(pod, ctr string) string {
		if ctr == "" {
			return name(pod)
		}
		if pod == "" {
			return flow.SafeName(ctr)
		}
		return flow.SafeName(pod + ":" + ctr)
	}
	switch m.cfg.AggregateBy {
	case report.ByPod:
		src, dst = "SRC POD", "DST POD"
	case report.ByNetns:
		src, dst = "", ""
	}
	fmt.Fprintf(b, "\n%-16s %-8s %-3s %-30s %-30s %6s %12s %9s %10s\n", "NETNS", "IFACE", "DIR", src, dst, "FLOWS", "RATE", "PKT/S", "BYTES")
	for i, r := range rows {
		if i >= room {
			fmt.Fprintf(b, "… %d more rows\n", len(rows)-room)
			break
		}
		k := keys[r.agg]
		s, d := label(k.SrcPod, k.SrcContainer), label(k.DstPod, k.DstContainer)
		if m.cfg.AggregateBy == report.ByNetns {
			s, d = "", ""
		}
		fmt.Fprintf(b, "%-16s %-8s %-3s %-30s %-30s %6d %12s %9.0f %10s\n", trunc(flow.SafeName(k.Netns), 16), trunc(flow.SafeName(k.Interface), 8),
			k.Direction, trunc(s, 30), trunc(d, 30), k.Flows, report.Bits(r.bps), r.pps, report.Bytes(r.total))
	}
	if len(rows) == 0 {
		b.WriteString("(no flows)\n")
	}
}

// sortRows orders rows by the current sort key.
func (m *Model) sortRows(rows []row) {
	less := map[string]func(a, b row) bool{
		"rate":        func(a, b row) bool { return a.bps > b.bps },
		"packet-rate": func(a, b row) bool { return a.pps > b.pps },
		"bytes":       func(a, b row) bool { return a.total > b.total },
		"packets":     func(a, b row) bool { return a.pkts > b.pkts },
	}[m.Sort()]
	sort.SliceStable(rows, func(i, j int) bool { return less(rows[i], rows[j]) })
}

// name formats a container's or pod's name for the terminal ("-" unknown).
func name(s string) string {
	if s == "" {
		return "-"
	}
	return flow.SafeName(s)
}

type flowID struct {
	ino          uint64
	idx          int
	dir          flow.Direction
	proto        flow.Protocol
	src, dst     string
	sport, dport uint16
}

func id(f *flow.Flow) flowID {
	return flowID{f.NetnsInode, f.Ifindex, f.Direction, f.Protocol, f.Src.String(), f.Dst.String(), f.SrcPort, f.DstPort}
}

func trunc(s string, n int) string {
	if r := []rune(s); len(r) > n {
		return string(r[:n-1]) + "…"
	}
	return s
}
