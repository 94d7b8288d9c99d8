package exporter

import (
	"bytes"
	"flag"
	"net/netip"
	"os"
	"os/exec"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/prometheus/common/expfmt"

	"github.com/nsflow/nsflow/collector"
	"github.com/nsflow/nsflow/collector/attach"
	"github.com/nsflow/nsflow/collector/flow"
	"github.com/nsflow/nsflow/test/testenv"
)

var update = flag.Bool("update", false, "rewrite the golden files")

type fakeSource struct{ snap *flow.Snapshot }

func (f fakeSource) Snapshot() (*flow.Snapshot, error) { return f.snap, nil }
func (f fakeSource) Totals() (*flow.Snapshot, error) {
	s := *f.snap
	s.Flows = nil
	return &s, nil
}
func (f fakeSource) Mode() attach.Mode { return attach.ModeTCX }
func (f fakeSource) AttachErrors() map[string]uint64 {
	m := map[string]uint64{}
	for _, r := range flow.AttachErrorReasons {
		m[r] = 0
	}
	m["gone"] = 2
	return m
}
func (f fakeSource) Interfaces() []collector.NamespaceInfo {
	var out []collector.NamespaceInfo
	for _, ns := range f.snap.Namespaces {
		ni := collector.NamespaceInfo{Name: ns.Name, Inode: ns.Inode, Gone: ns.Gone}
		for _, i := range ns.Interfaces {
			ni.Interfaces = append(ni.Interfaces, collector.InterfaceInfo{Name: i.Name, Index: i.Index, State: i.State})
		}
		out = append(out, ni)
	}
	return out
}

func fixture() *flow.Snapshot {
	a, b := netip.MustParseAddr("10.213.0.2"), netip.MustParseAddr("10.213.0.3")
	return &flow.Snapshot{
		Time: time.Date(2026, 11, 24, 12, 0, 0, 0, time.UTC),
		Namespaces: []flow.NamespaceStats{
			{Name: "host", Inode: 4026531833, Interfaces: []flow.InterfaceStats{
				{Name: "lo", Index: 1, State: flow.StateAttached, RX: flow.Counters{Packets: 10, Bytes: 1000}, TX: flow.Counters{Packets: 10, Bytes: 1000}},
			}},
			{Name: "web", Inode: 4026532200, Pod: &flow.PodInfo{Name: "web-7d4f", Namespace: "shop"}, Interfaces: []flow.InterfaceStats{
				{Name: "lo", Index: 1, State: flow.StateAttached, RX: flow.Counters{Packets: 40, Bytes: 4000}, TX: flow.Counters{Packets: 40, Bytes: 4000}},
				{Name: "eth0", Index: 2, State: flow.StateAttached, RX: flow.Counters{Packets: 5, Bytes: 490}, TX: flow.Counters{Packets: 6, Bytes: 588}},
			}},
			{Name: "old", Inode: 4026532300, Gone: true, Interfaces: []flow.InterfaceStats{
				{Name: "eth0", Index: 2, State: flow.StateDetached, RX: flow.Counters{Packets: 1, Bytes: 60}},
			}},
		},
		Flows: []flow.Flow{
			{Key: flow.Key{Netns: "web", NetnsInode: 4026532200, Interface: "eth0", Ifindex: 2, Direction: flow.TX, Protocol: 6, Src: a, Dst: b, SrcPort: 40000, DstPort: 80}, Packets: 4, Bytes: 400},
			{Key: flow.Key{Netns: "web", NetnsInode: 4026532200, Interface: "eth0", Ifindex: 2, Direction: flow.TX, Protocol: 17, Src: a, Dst: b, SrcPort: 5353, DstPort: 53}, Packets: 2, Bytes: 188},
			{Key: flow.Key{Netns: "web", NetnsInode: 4026532200, Interface: "lo", Ifindex: 1, Direction: flow.TX, Protocol: 1, Src: a, Dst: a, SrcPort: 8}, Packets: 1, Bytes: 98},
		},
		// Per container, summed over interfaces by the exporter: web sent
		// 38 packets over lo and 6 over eth0, the sidecar 2 over lo; the
		// rest (and all that was received) is in container="".
		Containers: []flow.ContainerStats{
			{Netns: "web", NetnsInode: 4026532200, Interface: "lo", Direction: flow.TX, Cgroup: 7001, Container: "web", Pod: &flow.PodInfo{Name: "web-7d4f", Namespace: "shop"}, Counters: flow.Counters{Packets: 38, Bytes: 3800}},
			{Netns: "web", NetnsInode: 4026532200, Interface: "eth0", Direction: flow.TX, Cgroup: 7001, Container: "web", Pod: &flow.PodInfo{Name: "web-7d4f", Namespace: "shop"}, Counters: flow.Counters{Packets: 6, Bytes: 588}},
			{Netns: "web", NetnsInode: 4026532200, Interface: "lo", Direction: flow.TX, Cgroup: 7002, Container: "side\x1bcar", Pod: &flow.PodInfo{Name: "web-7d4f", Namespace: "shop"}, Counters: flow.Counters{Packets: 2, Bytes: 200}},
			{Netns: "host", NetnsInode: 4026531833, Interface: "lo", Direction: flow.TX, Cgroup: 9, Container: "sshd.service", Counters: flow.Counters{Packets: 4, Bytes: 400}},
			{Netns: "host", NetnsInode: 4026531833, Interface: "lo", Direction: flow.RX, Cgroup: 0, Counters: flow.Counters{Packets: 10, Bytes: 1000}},
		},
		Stats: flow.Stats{FlowEntries: 3, FlowCapacity: 65536, FlowsCreated: 5, FlowsEvicted: 0, NonIP: 7},
	}
}

func scrape(t *testing.T, e *Exporter) []byte {
	t.Helper()
	reg := prometheus.NewPedanticRegistry()
	reg.MustRegister(e)
	fams, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var buf bytes.Buffer
	enc := expfmt.NewEncoder(&buf, expfmt.NewFormat(expfmt.TypeTextPlain))
	for _, f := range fams {
		if err := enc.Encode(f); err != nil {
			t.Fatal(err)
		}
	}
	return buf.Bytes()
}

func golden(t *testing.T, name string, got []byte) {
	t.Helper()
	if *update {
		if err := os.WriteFile("testdata/"+name, got, 0o644); err != nil {
			t.Fatalf("-update: %v", err)
		}
	}
	want, err := os.ReadFile("testdata/" + name)
	if err != nil {
		t.Fatalf("%v (go test -update creates it)", err)
	}
	if !bytes.Equal(got, want) {
		t.Errorf("%s changed (review, then go test -update):\n%s", name, got)
	}
}

// The exposition format is reviewed through golden files, and linted.
func TestMetricsGolden(t *testing.T) {
	for _, tc := range []struct {
		file string
		cfg  Config
	}{
		{"metrics.txt", Config{}},
		{"metrics_flows_capped.txt", Config{Flows: true, MaxFlowSeries: 2}},
		{"metrics_containers.txt", Config{Containers: true, MaxContainerSeries: 1000}},
		{"metrics_containers_capped.txt", Config{Containers: true, MaxContainerSeries: 1}},
	} {
		e := New(fakeSource{fixture()}, tc.cfg)
		out := scrape(t, e)
		golden(t, tc.file, out)
		problems, err := testutil.CollectAndLint(New(fakeSource{fixture()}, tc.cfg))
		if err != nil || len(problems) > 0 {
			t.Errorf("%s: lint: %v %v", tc.file, err, problems)
		}
		// promtool is the independent linter: CI (make deps installs it)
		// must run it, a developer without it still gets client_golang's.
		path, err := exec.LookPath("promtool")
		if err != nil {
			if testenv.InCI() {
				t.Fatalf("promtool not installed (make deps), and CI=true forbids skipping its check: %v", err)
			}
			t.Logf("promtool not installed: promtool check metrics not run")
			continue
		}
		cmd := exec.Command(path, "check", "metrics")
		cmd.Stdin = bytes.NewReader(out)
		if msg, err := cmd.CombinedOutput(); err != nil || len(bytes.TrimSpace(msg)) > 0 {
			t.Errorf("%s: promtool check metrics: %v %s", tc.file, err, msg)
		}
	}
}

// The flow cap counts what it left out, cumulatively over scrapes.
func TestFlowCapCounter(t *testing.T) {
	e := New(fakeSource{fixture()}, Config{Flows: true, MaxFlowSeries: 1})
	scrape(t, e)
	out := string(scrape(t, e))
	if !bytes.Contains([]byte(out), []byte("nsflow_flow_series_dropped_total 4")) {
		t.Errorf("after two scrapes leaving out 2 flows each, want 4 dropped:\n%s", out)
	}
}
