package exporter

import (
	"bytes"
	"testing"

	"github.com/nsflow/nsflow/collector/flow"
)

// A scrape reuses the last scrape's layout while the namespaces and
// interfaces read are the same: every scrape of a sequence that adds,
// removes, renames and re-creates them, and changes only counters in
// between, exports what a new exporter's first scrape of the same
// snapshot does.
func TestLayoutReuse(t *testing.T) {
	c := func(p, b uint64) flow.Counters { return flow.Counters{Packets: p, Bytes: b} }
	at := flow.StateAttached
	base := func(n uint64) *flow.Snapshot {
		return &flow.Snapshot{Namespaces: []flow.NamespaceStats{
			{Name: "host", Inode: 1, Interfaces: []flow.InterfaceStats{
				{Name: "lo", Index: 1, State: at, RX: c(n, 100*n), TX: c(n, 100*n)},
				{Name: "nsf-1", Index: 5, State: at, RX: c(2*n, 200), TX: c(3, 300*n)},
			}},
			{Name: "web", Inode: 2, Pod: &flow.PodInfo{Name: "web-1", Namespace: "shop"}, Interfaces: []flow.InterfaceStats{
				{Name: "lo", Index: 1, State: at, RX: c(n+1, 10), TX: c(n+1, 10)},
				{Name: "eth0", Index: 2, State: at, RX: c(4, 40*n), TX: c(5*n, 50)},
			}},
		}}
	}
	var steps []*flow.Snapshot
	steps = append(steps, base(1), base(2)) // counters only
	s := base(3)                            // a pod added
	s.Namespaces = append(s.Namespaces, flow.NamespaceStats{Name: "db", Inode: 3, Pod: &flow.PodInfo{Name: "db-0", Namespace: "shop"},
		Interfaces: []flow.InterfaceStats{{Name: "eth0", Index: 2, State: at, RX: c(7, 70), TX: c(8, 80)}}})
	steps = append(steps, s)
	s = base(4) // its interface re-created under its name, the old one awaiting its grace period
	s.Namespaces[0].Interfaces = append(s.Namespaces[0].Interfaces, flow.InterfaceStats{Name: "nsf-1", Index: 9, State: at, RX: c(1, 1), TX: c(1, 1)})
	s.Namespaces[0].Interfaces[1].State = flow.StateDetached
	steps = append(steps, s)
	s = base(5) // the pod's namespace gone, its labels changed
	s.Namespaces[1].Gone = true
	s.Namespaces[1].Pod = &flow.PodInfo{Name: "web-2", Namespace: "shop"}
	steps = append(steps, s, base(6), base(7))
	s = base(8) // an interface renamed (a tenant's name: escaped)
	s.Namespaces[1].Interfaces[1].Name = "eth\x1b0"
	steps = append(steps, s, base(9))

	src := &fakeSource{}
	e := New(src, Config{})
	for i, snap := range steps {
		src.snap = snap
		got := scrape(t, e)
		want := scrape(t, New(fakeSource{snap}, Config{}))
		if !bytes.Equal(got, want) {
			t.Errorf("scrape %d:\n%s\nwant (a new exporter's):\n%s", i, got, want)
		}
	}
}
