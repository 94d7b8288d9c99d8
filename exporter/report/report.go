// Package report renders collector snapshots for people (tables) and for
// programs (JSON): the output of `nsflow trace`.
package report

import (
	"encoding/json"
	"fmt"
	"io"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/nsflow/nsflow/collector/flow"
)

// Trace is the result of one trace: the traffic of the selected namespaces
// between Start and End. Its JSON form is the document `nsflow trace
// --output json` prints (documented in docs/OUTPUT.md).
type Trace struct {
	Start      time.Time `json:"start"`
	End        time.Time `json:"end"`
	Duration   float64   `json:"duration_seconds"`
	AttachMode string    `json:"attach_mode"`
	Filter     string    `json:"filter,omitempty"`
	Sort       string    `json:"sort"`
	// AggregateBy is flow (one row per flow), container, pod or netns
	// (rows of flows summed: see Aggregate).
	AggregateBy string      `json:"aggregate_by"`
	Namespaces  []Namespace `json:"namespaces"`
	// Flows are the flows, or the aggregated rows.
	Flows []Flow `json:"flows"`
	// FlowsShown and FlowsTotal count the flows (or rows) printed and
	// those that matched the filter (or the rows they make).
	FlowsShown int        `json:"flows_shown"`
	FlowsTotal int        `json:"flows_total"`
	Stats      flow.Stats `json:"stats"`
}

// Namespace is one namespace's totals, per interface.
type Namespace struct {
	Name       string        `json:"name"`
	Inode      uint64        `json:"inode"`
	Pod        *flow.PodInfo `json:"pod,omitempty"`
	Interfaces []Interface   `json:"interfaces"`
}

// Interface is one interface's totals.
type Interface struct {
	Name      string `json:"name"`
	Ifindex   int    `json:"ifindex"`
	State     string `json:"state,omitempty"`
	RXPackets uint64 `json:"rx_packets"`
	TXPackets uint64 `json:"tx_packets"`
	RXBytes   uint64 `json:"rx_bytes"`
	TXBytes   uint64 `json:"tx_bytes"`
	// Rates over the trace (or the interval).
	RXPacketRate float64 `json:"rx_packets_per_second"`
	TXPacketRate float64 `json:"tx_packets_per_second"`
	RXBitRate    float64 `json:"rx_bits_per_second"`
	TXBitRate    float64 `json:"tx_bits_per_second"`
}

// Flow is one flow at one observation point, or an aggregated row
// (Aggregated > 0: the key fields, the sums and the rates only).
type Flow struct {
	Netns     string     `json:"netns"`
	Interface string     `json:"interface"`
	Direction string     `json:"direction"`
	Protocol  string     `json:"protocol"`
	Src       netip.Addr `json:"src"`
	Dst       netip.Addr `json:"dst"`
	SrcPort   uint16     `json:"src_port"`
	DstPort   uint16     `json:"dst_port"`
	Packets   uint64     `json:"packets"`
	Bytes     uint64     `json:"bytes"`
	TCPFlags  string     `json:"tcp_flags,omitempty"`
	FirstSeen time.Time  `json:"first_seen"`
	LastSeen  time.Time  `json:"last_seen"`
	// Rates over the trace (or the interval).
	PacketRate float64 `json:"packets_per_second"`
	BitRate    float64 `json:"bits_per_second"`
	// SrcContainer and DstContainer name the sending and the receiving
	// container (attribution on; "" unknown); SrcPod and DstPod their pods
	// ("namespace/name"; by CRI).
	SrcContainer string `json:"src_container"`
	DstContainer string `json:"dst_container"`
	SrcPod       string `json:"src_pod,omitempty"`
	DstPod       string `json:"dst_pod,omitempty"`
	// Aggregated is, in an aggregated row, the number of flows summed.
	Aggregated int `json:"-"`
}

// aggregateJSON is an aggregated row's JSON form.
type aggregateJSON struct {
	Netns        string  `json:"netns"`
	Interface    string  `json:"interface"`
	Direction    string  `json:"direction"`
	SrcPod       string  `json:"src_pod"`
	SrcContainer string  `json:"src_container"`
	DstPod       string  `json:"dst_pod"`
	DstContainer string  `json:"dst_container"`
	Flows        int     `json:"flows"`
	Packets      uint64  `json:"packets"`
	Bytes        uint64  `json:"bytes"`
	PacketRate   float64 `json:"packets_per_second"`
	BitRate      float64 `json:"bits_per_second"`
}

// MarshalJSON writes a flow, or an aggregated row in its own form.
func (f Flow) MarshalJSON() ([]byte, error) {
	type plain Flow
	if f.Aggregated == 0 {
		return json.Marshal(plain(f))
	}
	return json.Marshal(aggregateJSON{Netns: f.Netns, Interface: f.Interface, Direction: f.Direction,
		SrcPod: f.SrcPod, SrcContainer: f.SrcContainer, DstPod: f.DstPod, DstContainer: f.DstContainer,
		Flows: f.Aggregated, Packets: f.Packets, Bytes: f.Bytes, PacketRate: f.PacketRate, BitRate: f.BitRate})
}

// Options shape a Trace.
type Options struct {
	AttachMode string
	// Filter keeps the flows it matches (the totals are never filtered).
	Filter interface{ Match(*flow.Flow) bool }
	// FilterText is the filter as given, for the output.
	FilterText string
	// Sort orders the flows; empty means by bytes.
	Sort flow.SortKey
	// Top keeps the largest flows (or rows); 0 keeps all.
	Top int
	// AggregateBy sums the flows into rows (Aggregate); empty means by
	// flow.
	AggregateBy AggregateBy
}

// NewTrace builds a Trace from a snapshot of the traffic between start and
// the snapshot's time (a whole trace, or one interval of it: see Delta).
func NewTrace(snap *flow.Snapshot, start time.Time, o Options) *Trace {
	if o.Sort == "" {
		o.Sort = flow.SortBytes
	}
	if o.AggregateBy == "" {
		o.AggregateBy = ByFlow
	}
	secs := snap.Time.Sub(start).Seconds()
	rate := func(v uint64, scale float64) float64 {
		if secs <= 0 {
			return 0
		}
		return float64(v) * scale / secs
	}
	t := &Trace{
		Start:       start,
		End:         snap.Time,
		Duration:    secs,
		AttachMode:  o.AttachMode,
		Filter:      o.FilterText,
		Sort:        string(o.Sort),
		AggregateBy: string(o.AggregateBy),
		Namespaces:  []Namespace{},
		Flows:       []Flow{},
		Stats:       snap.Stats,
	}
	for _, ns := range snap.Namespaces {
		n := Namespace{Name: ns.Name, Inode: ns.Inode, Pod: ns.Pod, Interfaces: []Interface{}}
		for _, i := range ns.Interfaces {
			n.Interfaces = append(n.Interfaces, Interface{
				Name: i.Name, Ifindex: i.Index, State: string(i.State),
				RXPackets: i.RX.Packets, TXPackets: i.TX.Packets,
				RXBytes: i.RX.Bytes, TXBytes: i.TX.Bytes,
				RXPacketRate: rate(i.RX.Packets, 1), TXPacketRate: rate(i.TX.Packets, 1),
				RXBitRate: rate(i.RX.Bytes, 8), TXBitRate: rate(i.TX.Bytes, 8),
			})
		}
		t.Namespaces = append(t.Namespaces, n)
	}
	var flows []flow.Flow
	for i := range snap.Flows {
		if f := &snap.Flows[i]; f.Packets > 0 && (o.Filter == nil || o.Filter.Match(f)) {
			flows = append(flows, *f)
		}
	}
	if o.AggregateBy != ByFlow {
		rows := Aggregate(o.AggregateBy, snap.Namespaces, flows)
		SortRows(rows, o.Sort)
		t.FlowsTotal = len(rows)
		for i, r := range rows {
			if o.Top > 0 && i >= o.Top {
				break
			}
			t.Flows = append(t.Flows, Flow{Netns: r.Netns, Interface: r.Interface, Direction: string(r.Direction),
				SrcPod: r.SrcPod, SrcContainer: r.SrcContainer, DstPod: r.DstPod, DstContainer: r.DstContainer,
				Aggregated: r.Flows, Packets: r.Packets, Bytes: r.Bytes, PacketRate: rate(r.Packets, 1), BitRate: rate(r.Bytes, 8)})
		}
		t.FlowsShown = len(t.Flows)
		return t
	}
	flow.SortFlows(flows, o.Sort)
	t.FlowsTotal = len(flows)
	for i, f := range flows {
		if o.Top > 0 && i >= o.Top {
			break
		}
		t.Flows = append(t.Flows, Flow{
			Netns: f.Netns, Interface: f.Interface, Direction: string(f.Direction),
			Protocol: f.Protocol.String(), Src: f.Src, Dst: f.Dst,
			SrcPort: f.SrcPort, DstPort: f.DstPort, Packets: f.Packets, Bytes: f.Bytes,
			TCPFlags: f.TCPFlags.String(), FirstSeen: f.FirstSeen, LastSeen: f.LastSeen,
			PacketRate: rate(f.Packets, 1), BitRate: rate(f.Bytes, 8),
			SrcContainer: f.SrcContainer, DstContainer: f.DstContainer, SrcPod: f.SrcPod, DstPod: f.DstPod,
		})
	}
	t.FlowsShown = len(t.Flows)
	return t
}

// Delta returns the traffic between two snapshots of one collector: cur's
// counters minus prev's, per interface and per flow. Flows evicted from the
// map between the two are missing from cur and so from the delta.
func Delta(prev, cur *flow.Snapshot) *flow.Snapshot {
	type ifKey struct {
		ino uint64
		idx int
	}
	before := map[ifKey]flow.InterfaceStats{}
	for _, ns := range prev.Namespaces {
		for _, i := range ns.Interfaces {
			before[ifKey{ns.Inode, i.Index}] = i
		}
	}
	out := &flow.Snapshot{Time: cur.Time, Stats: cur.Stats}
	sub := func(a, b flow.Counters) flow.Counters {
		if a.Packets < b.Packets || a.Bytes < b.Bytes {
			return a // counters restarted (e.g. the inode was reused)
		}
		return flow.Counters{Packets: a.Packets - b.Packets, Bytes: a.Bytes - b.Bytes}
	}
	for _, ns := range cur.Namespaces {
		n := ns
		n.Interfaces = nil
		for _, i := range ns.Interfaces {
			b := before[ifKey{ns.Inode, i.Index}]
			i.RX, i.TX = sub(i.RX, b.RX), sub(i.TX, b.TX)
			n.Interfaces = append(n.Interfaces, i)
		}
		out.Namespaces = append(out.Namespaces, n)
	}
	type flowKey struct {
		ino          uint64
		idx          int
		dir          flow.Direction
		proto        flow.Protocol
		src, dst     netip.Addr
		sport, dport uint16
	}
	key := func(f *flow.Flow) flowKey {
		return flowKey{f.NetnsInode, f.Ifindex, f.Direction, f.Protocol, f.Src, f.Dst, f.SrcPort, f.DstPort}
	}
	prevFlows := map[flowKey]flow.Counters{}
	for i := range prev.Flows {
		prevFlows[key(&prev.Flows[i])] = flow.Counters{Packets: prev.Flows[i].Packets, Bytes: prev.Flows[i].Bytes}
	}
	for _, f := range cur.Flows {
		c := sub(flow.Counters{Packets: f.Packets, Bytes: f.Bytes}, prevFlows[key(&f)])
		if c.Packets == 0 {
			continue
		}
		f.Packets, f.Bytes = c.Packets, c.Bytes
		out.Flows = append(out.Flows, f)
	}
	return out
}

// WriteJSON writes the trace as one indented JSON document.
func (t *Trace) WriteJSON(w io.Writer) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(t)
}

// WriteTable writes the per-interface totals and the top flows as aligned
// text tables.
func (t *Trace) WriteTable(w io.Writer) error {
	fmt.Fprintf(w, "%s – %s (%.1fs)\n", t.Start.Format("15:04:05"), t.End.Format("15:04:05"), t.Duration)
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintf(tw, "NETNS\tINODE\tINTERFACE\tRX PACKETS\tRX BYTES\tRX RATE\tTX PACKETS\tTX BYTES\tTX RATE\t\n")
	for _, ns := range t.Namespaces {
		for _, i := range ns.Interfaces {
			fmt.Fprintf(tw, "%s\t%d\t%s\t%d\t%s\t%s\t%d\t%s\t%s\t\n", ns.Label(), ns.Inode, flow.SafeName(i.Name),
				i.RXPackets, Bytes(i.RXBytes), Bits(i.RXBitRate), i.TXPackets, Bytes(i.TXBytes), Bits(i.TXBitRate))
		}
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	what := "FLOWS"
	if t.Filter != "" {
		what = fmt.Sprintf("FLOWS matching %q", t.Filter)
	}
	if t.AggregateBy != "" && t.AggregateBy != string(ByFlow) {
		fmt.Fprintf(w, "\n%s BY %s (%d of %d rows, by %s)\n", what, strings.ToUpper(t.AggregateBy), t.FlowsShown, t.FlowsTotal, t.Sort)
	} else {
		fmt.Fprintf(w, "\n%s (%d of %d, by %s)\n", what, t.FlowsShown, t.FlowsTotal, t.Sort)
	}
	if len(t.Flows) == 0 {
		_, err := fmt.Fprintln(w, "(none)")
		return err
	}
	tw = tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	var cols []column
	switch AggregateBy(t.AggregateBy) {
	case ByContainer:
		cols = []column{colNetns, colInterface, colDir, colSrcPod, colSrcContainer, colDstPod, colDstContainer, colFlows, colPackets, colBytes, colRate}
	case ByPod:
		cols = []column{colNetns, colInterface, colDir, colSrcPod, colDstPod, colFlows, colPackets, colBytes, colRate}
	case ByNetns:
		cols = []column{colNetns, colInterface, colDir, colFlows, colPackets, colBytes, colRate}
	default:
		cols = []column{colNetns, colInterface, colDir, colProto, colSource, colDestination, colSrcContainer, colDstContainer, colPackets, colBytes, colRate, colFlags}
	}
	// Columns of names nobody has (no attribution, no pods) are left out.
	shown := cols[:0]
	for _, c := range cols {
		if c.optional == nil || slices.ContainsFunc(t.Flows, func(f Flow) bool { return c.optional(&f) != "" }) {
			shown = append(shown, c)
		}
	}
	for i, c := range shown {
		fmt.Fprint(tw, c.title, map[bool]string{true: "\n", false: "\t"}[i == len(shown)-1])
	}
	for _, f := range t.Flows {
		for i, c := range shown {
			fmt.Fprint(tw, c.value(&f), map[bool]string{true: "\n", false: "\t"}[i == len(shown)-1])
		}
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	if s := t.Stats; s.FlowsEvicted > 0 || s.FlowInsertErrors > 0 {
		fmt.Fprintf(w, "\nflow map full: %d flows evicted, %d not recorded (their packets are in the totals above)\n",
			s.FlowsEvicted, s.FlowInsertErrors)
	}
	return nil
}

// column is a column of the flows' table.
type column struct {
	title string
	value func(*Flow) string
	// optional, if set, returns the name that makes the column shown
	// (left out when no row has one).
	optional func(*Flow) string
}

// name formats a name of a container or pod for a terminal ("-" unknown).
func name(s string) string {
	if s == "" {
		return "-"
	}
	return flow.SafeName(s)
}

var (
	colNetns        = column{title: "NETNS", value: func(f *Flow) string { return flow.SafeName(f.Netns) }}
	colInterface    = column{title: "INTERFACE", value: func(f *Flow) string { return flow.SafeName(f.Interface) }}
	colDir          = column{title: "DIR", value: func(f *Flow) string { return f.Direction }}
	colProto        = column{title: "PROTO", value: func(f *Flow) string { return f.Protocol }}
	colSource       = column{title: "SOURCE", value: func(f *Flow) string { return Endpoint(f.Src, f.SrcPort, f.Protocol) }}
	colDestination  = column{title: "DESTINATION", value: func(f *Flow) string { return Endpoint(f.Dst, f.DstPort, f.Protocol) }}
	colSrcPod       = column{title: "SRC POD", value: func(f *Flow) string { return name(f.SrcPod) }, optional: func(f *Flow) string { return f.SrcPod + f.DstPod }}
	colDstPod       = column{title: "DST POD", value: func(f *Flow) string { return name(f.DstPod) }, optional: func(f *Flow) string { return f.SrcPod + f.DstPod }}
	colSrcContainer = column{title: "SRC CONTAINER", value: func(f *Flow) string { return name(f.SrcContainer) }, optional: func(f *Flow) string { return f.SrcContainer + f.DstContainer }}
	colDstContainer = column{title: "DST CONTAINER", value: func(f *Flow) string { return name(f.DstContainer) }, optional: func(f *Flow) string { return f.SrcContainer + f.DstContainer }}
	colFlows        = column{title: "FLOWS", value: func(f *Flow) string { return strconv.Itoa(f.Aggregated) }}
	colPackets      = column{title: "PACKETS", value: func(f *Flow) string { return strconv.FormatUint(f.Packets, 10) }}
	colBytes        = column{title: "BYTES", value: func(f *Flow) string { return Bytes(f.Bytes) }}
	colRate         = column{title: "RATE", value: func(f *Flow) string { return Bits(f.BitRate) }}
	colFlags        = column{title: "FLAGS", value: func(f *Flow) string {
		if f.Protocol == "icmp" || f.Protocol == "icmpv6" {
			return fmt.Sprintf("type %d code %d", f.SrcPort, f.DstPort)
		}
		return f.TCPFlags
	}}
)

// Endpoint formats an address and port; ICMP "ports" (type and code) are
// left out.
func Endpoint(a netip.Addr, port uint16, proto string) string {
	switch proto {
	case "tcp", "udp", "sctp", "udplite":
		return netip.AddrPortFrom(a, port).String()
	}
	return a.String()
}

// Bytes formats a byte count with binary units (1.5 KiB).
func Bytes(n uint64) string {
	const unit = 1024
	if n < unit {
		return strconv.FormatUint(n, 10) + " B"
	}
	div, exp := uint64(unit), 0
	for m := n / unit; m >= unit && exp < 5; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", float64(n)/float64(div), "KMGTPE"[exp])
}

// Bits formats a bit rate with decimal units (12.3 Mbit/s), as network
// rates are quoted.
func Bits(bps float64) string {
	units := []string{"bit/s", "kbit/s", "Mbit/s", "Gbit/s", "Tbit/s"}
	i := 0
	for bps >= 1000 && i < len(units)-1 {
		bps /= 1000
		i++
	}
	if i == 0 {
		return fmt.Sprintf("%.0f %s", bps, units[i])
	}
	return fmt.Sprintf("%.1f %s", bps, units[i])
}

// Label is the namespace's name, with its pod (namespace/name) when known,
// safe to print on a terminal (flow.SafeName).
func (n Namespace) Label() string {
	if n.Pod != nil {
		return fmt.Sprintf("%s (pod %s/%s)", flow.SafeName(n.Name), flow.SafeName(n.Pod.Namespace), flow.SafeName(n.Pod.Name))
	}
	return flow.SafeName(n.Name)
}
