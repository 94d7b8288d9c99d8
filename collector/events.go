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
	"github.com/nsflow/nsflow/collector/flow"
)

// ErrNoEvents is returned by FlowEvents when the collector was made without
// Config.Events.
var ErrNoEvents = errors.New("collector made without flow events (Config.Events)")

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
func (r *EventReader) Read() (flow.Event, error) {
	rec, err := r.rd.Read()
	if err != nil {
		return flow.Event{}, err
	}
	var ev bpf.NsflowFlowEvent
	if err := binary.Read(bytes.NewReader(rec.RawSample), binary.NativeEndian, &ev); err != nil {
		return flow.Event{}, fmt.Errorf("decode flow event: %w", err)
	}
	pt, _ := r.c.objs.Point(uint32(ev.Key.Slot))
	k := decodeKey(&ev.Key, pt)
	k.Netns, k.Interface = r.c.names(k.NetnsInode, k.Ifindex)
	return flow.Event{Time: time.Unix(0, int64(ev.TsNs)+int64(r.offset)), Key: k}, nil
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

// decodeKey turns a map key into a flow key without names; pt is the
// observation point its slot names (bpf.Objects.Point).
func decodeKey(k *bpf.NsflowFlowKey, pt bpf.NsflowObsKey) flow.Key {
	f := flow.Key{
		NetnsInode: uint64(pt.Netns),
		Ifindex:    int(pt.Ifindex),
		Direction:  direction(pt.Dir),
		Protocol:   flow.Protocol(k.Proto),
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
