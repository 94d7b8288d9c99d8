package e2e

import (
	"bufio"
	"bytes"
	"encoding/json"
	"io"
	"net/netip"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/santhosh-tekuri/jsonschema/v6"

	"github.com/nsflow/nsflow/exporter/report"
	"github.com/nsflow/nsflow/test/testenv"
)

// tracer is a running `nsflow trace`.
type tracer struct {
	cmd    *exec.Cmd
	stdout bytes.Buffer
	log    *strings.Builder
}

// startTrace runs `nsflow trace --verbose ARGS` and returns once it has
// attached to `namespaces` namespaces.
func startTrace(t *testing.T, namespaces int, args ...string) *tracer {
	t.Helper()
	tr := &tracer{log: &strings.Builder{}}
	tr.cmd = exec.Command(nsflowBin, append([]string{"trace", "--verbose"}, args...)...)
	tr.cmd.Stdout = &tr.stdout
	stderr, err := tr.cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := tr.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if tr.cmd.ProcessState == nil {
			tr.cmd.Process.Kill()
			tr.cmd.Wait()
		}
	})
	lines := bufio.NewScanner(stderr)
	seen := 0
	for seen < namespaces && lines.Scan() {
		tr.log.WriteString(lines.Text() + "\n")
		if strings.Contains(lines.Text(), "observing netns") {
			seen++
		}
	}
	if seen < namespaces {
		t.Fatalf("trace %v attached to %d of %d namespaces:\n%s", args, seen, namespaces, tr.log)
	}
	go io.Copy(io.Discard, stderr)
	return tr
}

// stop ends the trace with SIGTERM and returns what it printed.
func (tr *tracer) stop(t *testing.T) []byte {
	t.Helper()
	tr.cmd.Process.Signal(syscall.SIGTERM)
	done := make(chan error, 1)
	go func() { done <- tr.cmd.Wait() }()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("trace exited with %v:\n%s", err, tr.log)
		}
	case <-time.After(15 * time.Second):
		t.Fatal("trace did not exit on SIGTERM")
	}
	return tr.stdout.Bytes()
}

var schemas = map[string]*jsonschema.Schema{}

// validate checks a JSON value against a schema in docs/schema.
func validate(t *testing.T, schema string, doc []byte) {
	t.Helper()
	sch, ok := schemas[schema]
	if !ok {
		_, file, _, _ := runtime.Caller(0)
		path := filepath.Join(filepath.Dir(file), "..", "..", "docs", "schema", schema)
		var err error
		if sch, err = jsonschema.NewCompiler().Compile(path); err != nil {
			t.Fatalf("compile %s: %v", schema, err)
		}
		schemas[schema] = sch
	}
	v, err := jsonschema.UnmarshalJSON(bytes.NewReader(doc))
	if err != nil {
		t.Fatalf("not JSON: %v\n%s", err, doc)
	}
	if err := sch.Validate(v); err != nil {
		t.Errorf("output does not match %s: %v\n%s", schema, err, doc)
	}
}

// Several traces with different filters watch the same traffic at once;
// each shows exactly the flows its filter matches, with exact counts.
func TestTraceFilters(t *testing.T) {
	testenv.RequireRoot(t)
	pods := newPods(t, "10.213.122.0/24", "e2e-tf-a", "e2e-tf-b")
	a, b := pods[0], pods[1]
	filters := []string{"udp and dst port 9501", "icmp or icmp6", "tcp", "src host " + a.IPv4.String() + " and udp", "not (tcp or udp or icmp or icmp6)"}
	var traces []*tracer
	for _, f := range filters {
		traces = append(traces, startTrace(t, 2, "--netns", a.Name, "--netns", b.Name, "--output", "json", f))
	}

	udpExchange(t, a, b, netip.AddrPortFrom(b.IPv4, 9501), 30, 100)
	udpExchange(t, a, b, netip.AddrPortFrom(b.IPv4, 9502), 20, 100)
	tcpExchange(t, a, a, netip.MustParseAddrPort("127.0.0.1:9503"), 64<<10)
	run(t, a, exec.Command("ping", "-c", "4", "-i", "0.05", "-W", "2", b.IPv4.String()))
	run(t, a, exec.Command("ping", "-6", "-c", "3", "-i", "0.05", "-W", "2", b.IPv6.String()))

	results := map[string]report.Trace{}
	for i, tr := range traces {
		out := tr.stop(t)
		validate(t, "trace.schema.json", out)
		var r report.Trace
		if err := json.Unmarshal(out, &r); err != nil {
			t.Fatal(err)
		}
		if r.Filter != filters[i] {
			t.Errorf("filter %q reported as %q", filters[i], r.Filter)
		}
		results[filters[i]] = r
	}
	type fk struct{ netns, iface, dir, proto, src, dst, sport, dport string }
	flows := func(r report.Trace) map[fk]uint64 {
		m := map[fk]uint64{}
		for _, f := range r.Flows {
			m[fk{f.Netns, f.Interface, f.Direction, f.Protocol, f.Src.String(), f.Dst.String(), strconv.Itoa(int(f.SrcPort)), strconv.Itoa(int(f.DstPort))}] = f.Packets
		}
		return m
	}

	// Exactly the UDP flow to port 9501, on both ends, 30 datagrams each.
	got := flows(results[filters[0]])
	if len(got) != 2 {
		t.Errorf("%q: %d flows, want 2: %v", filters[0], len(got), got)
	}
	for k, n := range got {
		if k.proto != "udp" || k.dport != "9501" || n != 30 || !(k.netns == a.Name && k.dir == "tx" || k.netns == b.Name && k.dir == "rx") {
			t.Errorf("%q: flow %+v with %d packets", filters[0], k, n)
		}
	}
	// Only ICMP; the echo requests exactly as sent.
	var req4, req6 uint64
	for k, n := range flows(results[filters[1]]) {
		if k.proto != "icmp" && k.proto != "icmpv6" {
			t.Errorf("%q: flow %+v", filters[1], k)
		}
		if k.netns == a.Name && k.iface == "eth0" && k.dir == "tx" && k.sport == "8" {
			req4 += n
		}
		if k.netns == a.Name && k.iface == "eth0" && k.dir == "tx" && k.sport == "128" {
			req6 += n
		}
	}
	if req4 != 4 || req6 != 3 {
		t.Errorf("%q: %d echo requests, %d ICMPv6 echo requests; want 4 and 3", filters[1], req4, req6)
	}
	// Only TCP, and the loopback stream between a's containers is among it.
	lo := false
	for k := range flows(results[filters[2]]) {
		if k.proto != "tcp" {
			t.Errorf("%q: flow %+v", filters[2], k)
		}
		if k.netns == a.Name && k.iface == "lo" && k.dport == "9503" {
			lo = true
		}
	}
	if !lo {
		t.Errorf("%q: no loopback flow to 9503", filters[2])
	}
	// Both UDP flows from a, on both ends, with exact counts.
	got = flows(results[filters[3]])
	want := map[string]uint64{"9501": 30, "9502": 20}
	if len(got) != 4 {
		t.Errorf("%q: %d flows, want 4: %v", filters[3], len(got), got)
	}
	for k, n := range got {
		if k.src != a.IPv4.String() || k.proto != "udp" || want[k.dport] != n {
			t.Errorf("%q: flow %+v with %d packets", filters[3], k, n)
		}
	}
	// Nothing of the above passes "not (...)" (ARP is no flow at all).
	if got := flows(results[filters[4]]); len(got) != 0 {
		t.Errorf("%q: %v", filters[4], got)
	}
	// Filters never touch the totals: every trace counted at least all
	// the packets b received from the test (traces stop at different
	// instants, so stray ARP/ND packets may differ).
	for _, f := range filters {
		for _, ns := range results[f].Namespaces {
			for _, it := range ns.Interfaces {
				if ns.Name == b.Name && it.Name == "eth0" && it.RXPackets < 30+20+4+3 {
					t.Errorf("%q: b eth0 rx %d packets, fewer than the test sent", f, it.RXPackets)
				}
			}
		}
	}
}

// Every new flow is reported once, in the order the flows started, with
// its 5-tuple, as JSON Lines that match the documented schema.
func TestTraceEvents(t *testing.T) {
	testenv.RequireRoot(t)
	pods := newPods(t, "10.213.123.0/24", "e2e-te-a", "e2e-te-b")
	a, b := pods[0], pods[1]
	tr := startTrace(t, 1, "--netns", a.Name, "--events", "--output", "jsonl", "udp and dst portrange 9600-9609")
	for i := 0; i < 10; i++ {
		// Two datagrams per flow: the second must not be a new event.
		udpExchange(t, a, b, netip.AddrPortFrom(b.IPv4, uint16(9600+i)), 2, 10)
	}
	out := tr.stop(t)

	lines := bytes.Split(bytes.TrimSpace(out), []byte("\n"))
	var ports []int
	for i, l := range lines {
		var rec struct {
			Type      string
			Interface string
			Direction string
			Protocol  string
			Src, Dst  string
			DstPort   int `json:"dst_port"`
			Time      time.Time
		}
		if err := json.Unmarshal(l, &rec); err != nil {
			t.Fatalf("line %d: %v: %s", i, err, l)
		}
		switch rec.Type {
		case "flow_start":
			validate(t, "flow_start.schema.json", l)
			if rec.Interface != "eth0" || rec.Direction != "tx" || rec.Protocol != "udp" || rec.Src != a.IPv4.String() || rec.Dst != b.IPv4.String() {
				t.Errorf("event %s", l)
			}
			ports = append(ports, rec.DstPort)
		case "summary":
			if i != len(lines)-1 {
				t.Errorf("summary is line %d of %d", i+1, len(lines))
			}
			validate(t, "trace.schema.json", l)
		default:
			t.Errorf("record type %q", rec.Type)
		}
	}
	if len(ports) != 10 {
		t.Fatalf("%d flow_start events, want 10: %v", len(ports), ports)
	}
	for i, p := range ports {
		if p != 9600+i {
			t.Errorf("events out of order: %v", ports)
			break
		}
	}
}

// --all and glob patterns select namespaces by name, --exclude leaves some
// out.
func TestTraceSelection(t *testing.T) {
	testenv.RequireRoot(t)
	newPods(t, "10.213.134.0/24", "e2e-sel-a", "e2e-sel-b", "e2e-sel-c")
	names := func(args ...string) map[string]bool {
		out, err := exec.Command(nsflowBin, append([]string{"trace", "--duration", "300ms", "--output", "json", "--cri.endpoint", "none"}, args...)...).Output()
		if err != nil {
			t.Fatalf("trace %v: %v", args, err)
		}
		var tr report.Trace
		if err := json.Unmarshal(out, &tr); err != nil {
			t.Fatal(err)
		}
		m := map[string]bool{}
		for _, ns := range tr.Namespaces {
			m[ns.Name] = true
		}
		return m
	}
	if got := names("--netns", "e2e-sel-*"); !got["e2e-sel-a"] || !got["e2e-sel-b"] || got["host"] {
		t.Errorf("pattern e2e-sel-*: %v", got)
	}
	if got := names("--all", "--exclude", "e2e-sel-b", "--exclude", "pid:*"); !got["e2e-sel-a"] || got["e2e-sel-b"] || !got["host"] {
		t.Errorf("--all --exclude e2e-sel-b: %v", got)
	}
	if got := names("--netns", "e2e-sel-?", "--exclude", "*-a"); got["e2e-sel-a"] || !got["e2e-sel-b"] {
		t.Errorf("pattern minus *-a: %v", got)
	}
	// Brackets mean what path.Match says: a class of characters.
	if got := names("--netns", "e2e-sel-[ab]"); !got["e2e-sel-a"] || !got["e2e-sel-b"] || got["e2e-sel-c"] || got["host"] {
		t.Errorf("pattern e2e-sel-[ab]: %v", got)
	}
	if got := names("--netns", "e2e-sel-*", "--exclude", "e2e-sel-[^c]"); got["e2e-sel-a"] || got["e2e-sel-b"] || !got["e2e-sel-c"] {
		t.Errorf("pattern e2e-sel-* minus e2e-sel-[^c]: %v", got)
	}
	// No selection at all is every namespace, as --all.
	if got := names("--exclude", "pid:*"); !got["e2e-sel-a"] || !got["e2e-sel-c"] || !got["host"] {
		t.Errorf("no selection: %v", got)
	}
}
