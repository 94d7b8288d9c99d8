// Package report renders collector snapshots for people (tables) and for
// programs (JSON): the output of `nsflow trace`.
package report

import (
	"encoding/json"
	"fmt"
	"io"
	"net/netip"
	"strconv"
	"text/tabwriter"
	"time"

	"github.com/nsflow/nsflow/collector"
)

// Trace is the result of one trace: the traffic of the selected namespaces
// between Start and End. Its JSON form is the document `nsflow trace
// --output json` prints (documented in docs/OUTPUT.md).
type Trace struct {
	Start      time.Time       `json:"start"`
	End        time.Time       `json:"end"`
	Duration   float64         `json:"duration_seconds"`
	AttachMode string          `json:"attach_mode"`
	Namespaces []Namespace     `json:"namespaces"`
	Flows      []Flow          `json:"flows"`
	FlowsShown int             `json:"flows_shown"`
	FlowsTotal int             `json:"flows_total"`
	Stats      collector.Stats `json:"stats"`
}

// Namespace is one namespace's totals, per interface.
type Namespace struct {
	Name       string      `json:"name"`
	Inode      uint64      `json:"inode"`
	Interfaces []Interface `json:"interfaces"`
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
}

// Flow is one flow at one observation point.
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
}

// NewTrace builds a Trace from the snapshot taken at its end. topFlows limits
// the flows kept (largest by bytes first); 0 keeps all.
func NewTrace(snap *collector.Snapshot, start time.Time, mode string, topFlows int) *Trace {
	t := &Trace{
		Start:      start,
		End:        snap.Time,
		Duration:   snap.Time.Sub(start).Seconds(),
		AttachMode: mode,
		Namespaces: []Namespace{},
		Flows:      []Flow{},
		FlowsTotal: len(snap.Flows),
		Stats:      snap.Stats,
	}
	for _, ns := range snap.Namespaces {
		n := Namespace{Name: ns.Name, Inode: ns.Inode, Interfaces: []Interface{}}
		for _, i := range ns.Interfaces {
			n.Interfaces = append(n.Interfaces, Interface{
				Name: i.Name, Ifindex: i.Index, State: string(i.State),
				RXPackets: i.RX.Packets, TXPackets: i.TX.Packets,
				RXBytes: i.RX.Bytes, TXBytes: i.TX.Bytes,
			})
		}
		t.Namespaces = append(t.Namespaces, n)
	}
	for i, f := range snap.Flows {
		if topFlows > 0 && i >= topFlows {
			break
		}
		t.Flows = append(t.Flows, Flow{
			Netns: f.Netns, Interface: f.Interface, Direction: string(f.Direction),
			Protocol: f.Protocol.String(), Src: f.Src, Dst: f.Dst,
			SrcPort: f.SrcPort, DstPort: f.DstPort, Packets: f.Packets, Bytes: f.Bytes,
			TCPFlags: f.TCPFlags.String(), FirstSeen: f.FirstSeen, LastSeen: f.LastSeen,
		})
	}
	t.FlowsShown = len(t.Flows)
	return t
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
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintf(tw, "NETNS\tINODE\tINTERFACE\tRX PACKETS\tRX BYTES\tTX PACKETS\tTX BYTES\t\n")
	for _, ns := range t.Namespaces {
		for _, i := range ns.Interfaces {
			fmt.Fprintf(tw, "%s\t%d\t%s\t%d\t%s\t%d\t%s\t\n", ns.Name, ns.Inode, i.Name,
				i.RXPackets, Bytes(i.RXBytes), i.TXPackets, Bytes(i.TXBytes))
		}
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	fmt.Fprintf(w, "\nFLOWS (%d of %d, by bytes)\n", t.FlowsShown, t.FlowsTotal)
	if len(t.Flows) == 0 {
		_, err := fmt.Fprintln(w, "(none)")
		return err
	}
	tw = tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintf(tw, "NETNS\tINTERFACE\tDIR\tPROTO\tSOURCE\tDESTINATION\tPACKETS\tBYTES\tFLAGS\n")
	for _, f := range t.Flows {
		flags := f.TCPFlags
		if f.Protocol == "icmp" || f.Protocol == "icmpv6" {
			flags = fmt.Sprintf("type %d code %d", f.SrcPort, f.DstPort)
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%d\t%s\t%s\n", f.Netns, f.Interface, f.Direction,
			f.Protocol, endpoint(f.Src, f.SrcPort, f.Protocol), endpoint(f.Dst, f.DstPort, f.Protocol),
			f.Packets, Bytes(f.Bytes), flags)
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

// endpoint formats an address and port; ICMP "ports" are type and code.
func endpoint(a netip.Addr, port uint16, proto string) string {
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
