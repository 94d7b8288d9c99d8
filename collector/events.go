package collector

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"time"

	"github.com/cilium/ebpf/ringbuf"
	"golang.org/x/sys/unix"

	"github.com/nsflow/nsflow/bpf"
)

// ErrNoEvents is returned by FlowEvents when the collector was made without
// Config.Events.
var ErrNoEvents = errors.New("collector made without flow events (Config.Events)")

// FlowEvent is the start of a flow at an observation point: the first
// packet the flow map saw of it.
type FlowEvent struct {
	Time       time.Time  `json:"time"`
	Netns      string     `json:"netns"`
	NetnsInode uint64     `json:"netns_inode"`
	Interface  string     `json:"interface"`
	Ifindex    int        `json:"ifindex"`
	Direction  Direction  `json:"direction"`
	Protocol   Protocol   `json:"protocol"`
	Src        netip.Addr `json:"src"`
	Dst        netip.Addr `json:"dst"`
	SrcPort    uint16     `json:"src_port"`
	DstPort    uint16     `json:"dst_port"`
}

// Flow returns the event as a flow without counts, e.g. for filters.
func (e *FlowEvent) Flow() Flow {
	return Flow{Netns: e.Netns, NetnsInode: e.NetnsInode, Interface: e.Interface, Ifindex: e.Ifindex,
		Direction: e.Direction, Protocol: e.Protocol, Src: e.Src, Dst: e.Dst, SrcPort: e.SrcPort, DstPort: e.DstPort}
}

// EventReader streams flow events from the kernel's ring buffer.
type EventReader struct {
	c      *Collector
	rd     *ringbuf.Reader
	offset time.Duration // wall clock - CLOCK_MONOTONIC
}

// FlowEvents opens the stream of new-flow events. Events are lost (and
// counted in Stats.EventsLost) when the reader falls behind.
func (c *Collector) FlowEvents() (*EventReader, error) {
	if !c.cfg.Events {
		return nil, ErrNoEvents
	}
	rd, err := ringbuf.NewReader(c.objs.FlowEvents)
	if err != nil {
		return nil, fmt.Errorf("open flow events: %w", err)
	}
	var mono unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &mono); err != nil {
		rd.Close()
		return nil, err
	}
	return &EventReader{c: c, rd: rd, offset: time.Duration(time.Now().UnixNano() - mono.Nano())}, nil
}

// Read blocks until the next event; after Close it returns an error
// matching os.ErrClosed.
func (r *EventReader) Read() (FlowEvent, error) {
	rec, err := r.rd.Read()
	if err != nil {
		return FlowEvent{}, err
	}
	var ev bpf.NsflowFlowEvent
	if err := binary.Read(bytes.NewReader(rec.RawSample), binary.NativeEndian, &ev); err != nil {
		return FlowEvent{}, fmt.Errorf("decode flow event: %w", err)
	}
	f := decodeFlowKey(&ev.Key)
	f.Netns, f.Interface = r.c.names(f.NetnsInode, f.Ifindex)
	return FlowEvent{
		Time: time.Unix(0, int64(ev.TsNs)+int64(r.offset)), Netns: f.Netns, NetnsInode: f.NetnsInode,
		Interface: f.Interface, Ifindex: f.Ifindex, Direction: f.Direction, Protocol: f.Protocol,
		Src: f.Src, Dst: f.Dst, SrcPort: f.SrcPort, DstPort: f.DstPort,
	}, nil
}

// Close ends the stream; a blocked Read returns.
func (r *EventReader) Close() error { return r.rd.Close() }

// names returns the names of a namespace and an interface from the registry.
func (c *Collector) names(ino uint64, idx int) (string, string) {
	nsName, ifName := fmt.Sprintf("netns:%d", ino), fmt.Sprintf("if%d", idx)
	c.mu.Lock()
	defer c.mu.Unlock()
	if ns := c.namespaces[ino]; ns != nil {
		nsName = ns.name
		if i := ns.ifaces[idx]; i != nil {
			ifName = i.name
		}
	}
	return nsName, ifName
}

// decodeFlowKey turns a map key into a Flow without names or counts.
func decodeFlowKey(k *bpf.NsflowFlowKey) Flow {
	f := Flow{
		NetnsInode: uint64(k.Netns),
		Ifindex:    int(k.Ifindex),
		Direction:  direction(k.Dir),
		Protocol:   Protocol(k.Proto),
		SrcPort:    k.Sport,
		DstPort:    k.Dport,
	}
	if k.Family == 4 {
		f.Src = netip.AddrFrom4([4]byte(k.Saddr[:4]))
		f.Dst = netip.AddrFrom4([4]byte(k.Daddr[:4]))
	} else {
		f.Src = netip.AddrFrom16(k.Saddr)
		f.Dst = netip.AddrFrom16(k.Daddr)
	}
	return f
}
