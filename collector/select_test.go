package collector_test

import (
	"fmt"
	"net"
	"net/netip"
	"os"
	"sort"
	"testing"
	"time"

	"github.com/nsflow/nsflow/collector"
	"github.com/nsflow/nsflow/collector/flow"
	"github.com/nsflow/nsflow/test/podns"
	"github.com/nsflow/nsflow/test/testenv"
)

// SnapshotSelect reads the flows keep accepts and the n largest others,
// with the counts Snapshot reads: datagrams from the host to a pod (no
// listener: it answers ICMP), 6, 4, 2 and 1 of them from four source
// ports, read at the pod's eth0.
func TestSnapshotSelect(t *testing.T) {
	testenv.RequireRoot(t)
	name := fmt.Sprintf("h6sel-%d", os.Getpid()%100000)
	p, err := podns.Create(podns.Config{}, name, podns.Options{Subnet: netip.MustParsePrefix("10.213.219.0/24")})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { podns.Delete(podns.Config{}, name) })
	c, err := collector.New(collector.Config{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	ino, err := c.Add(collector.Target{Name: p.Name, Path: p.NetnsPath})
	if err != nil {
		t.Fatal(err)
	}
	// One datagram first resolves the pod's address (datagrams sent
	// meanwhile would wait in a short queue, and some be dropped).
	warm, err := net.DialUDP("udp4", &net.UDPAddr{IP: net.IPv4(10, 213, 219, 1)}, &net.UDPAddr{IP: p.IPv4.AsSlice(), Port: 8})
	if err != nil {
		t.Fatal(err)
	}
	warm.Write([]byte("x"))
	warm.Close()
	waitFor(t, "the pod's address resolved", func() bool {
		snap, _ := c.Snapshot()
		for _, f := range snap.Flows {
			if f.NetnsInode == ino && f.Protocol == 17 && f.DstPort == 8 {
				return true
			}
		}
		return false
	})
	ports := map[uint16]int{}
	for i, n := range []int{6, 4, 2, 1} {
		// Not connected: the pod's ICMP answers do not fail the writes.
		conn, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(10, 213, 219, 1)})
		if err != nil {
			t.Fatal(err)
		}
		ports[uint16(conn.LocalAddr().(*net.UDPAddr).Port)] = n
		for k := 0; k < n; k++ {
			if _, err := conn.WriteToUDP(make([]byte, 100*(i+1)), &net.UDPAddr{IP: p.IPv4.AsSlice(), Port: 9 + i}); err != nil {
				t.Fatal(err)
			}
		}
		conn.Close()
	}
	ours := func(f *flow.Flow) bool {
		_, ok := ports[f.SrcPort]
		return f.NetnsInode == ino && f.Interface == "eth0" && f.Direction == flow.RX && f.Protocol == 17 && ok
	}
	var all int
	waitFor(t, "the datagrams' flows", func() bool {
		snap, err := c.Snapshot()
		if err != nil {
			t.Fatal(err)
		}
		all = 0
		for i := range snap.Flows {
			if f := &snap.Flows[i]; ours(f) && int(f.Packets) == ports[f.SrcPort] {
				all++
			}
		}
		return all == 4
	})
	time.Sleep(100 * time.Millisecond)
	// Keep the flow of 2 datagrams: SnapshotSelect(n) holds it and the n
	// largest of the other flows (the pod's ICMP answers among them) that
	// Snapshot holds, with the same counts. (Read again if a flow came
	// between the two reads, e.g. IPv6 neighbour discovery.)
	var keepPort uint16
	for port, n := range ports {
		if n == 2 {
			keepPort = port
		}
	}
	keep := func(f *flow.Flow) bool { return ours(f) && f.SrcPort == keepPort }
	id := func(f *flow.Flow) string {
		return fmt.Sprintf("%d/%d/%s/%s %s:%d>%s:%d %d/%d", f.NetnsInode, f.Ifindex, f.Direction, f.Protocol, f.Src, f.SrcPort, f.Dst, f.DstPort, f.Packets, f.Bytes)
	}
	for _, n := range []int{0, 1, 2, 5, -1} {
		var got, want []string
		for attempt := 0; attempt < 5; attempt++ {
			full, err := c.Snapshot()
			if err != nil {
				t.Fatal(err)
			}
			sel, err := c.SnapshotSelect(n, keep)
			if err != nil {
				t.Fatal(err)
			}
			var kept, others []flow.Flow
			for _, f := range full.Flows {
				if keep(&f) {
					kept = append(kept, f)
				} else {
					others = append(others, f)
				}
			}
			if len(kept) != 1 {
				t.Fatalf("%d flows kept, want 1", len(kept))
			}
			sort.SliceStable(others, func(a, b int) bool { return others[a].Bytes > others[b].Bytes })
			if n >= 0 && len(others) > n {
				// Of equal sizes at the cut, any may be chosen.
				if n > 0 && others[n-1].Bytes == others[n].Bytes {
					continue
				}
				others = others[:n]
			}
			want, got = nil, nil
			for _, f := range append(kept, others...) {
				want = append(want, id(&f))
			}
			for _, f := range sel.Flows {
				got = append(got, id(&f))
			}
			sort.Strings(want)
			sort.Strings(got)
			if fmt.Sprint(got) == fmt.Sprint(want) && sel.Stats.FlowEntries == full.Stats.FlowEntries {
				break
			}
		}
		if fmt.Sprint(got) != fmt.Sprint(want) {
			t.Errorf("SnapshotSelect(%d):\n got %v\nwant %v", n, got, want)
		}
	}
}
