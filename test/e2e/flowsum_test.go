package e2e

import (
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"

	"github.com/nsflow/nsflow/collector/nsenter"
	"github.com/nsflow/nsflow/test/podns"
	"github.com/nsflow/nsflow/test/testenv"
)

// labelled is one sample of a scrape with its labels.
type labelled struct {
	name   string
	labels map[string]string
	value  float64
}

// parseLabelled parses a scrape into samples with their labels.
func parseLabelled(t *testing.T, body string) []labelled {
	t.Helper()
	parser := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := parser.TextToMetricFamilies(strings.NewReader(body))
	if err != nil {
		t.Fatalf("parse scrape: %v", err)
	}
	var out []labelled
	for name, f := range fams {
		for _, m := range f.Metric {
			l := labelled{name: name, labels: map[string]string{}, value: value(m)}
			for _, lp := range m.Label {
				l.labels[lp.GetName()] = lp.GetValue()
			}
			out = append(out, l)
		}
	}
	return out
}

// quietScrape scrapes between two reads of the pods' kernel counters that
// agree: no packet crossed the pods' interfaces during the scrape, so the
// flow map and the totals it read are of one instant.
func quietScrape(t *testing.T, srv *server, pods ...*podns.Pod) string {
	t.Helper()
	paths := map[uint64]string{}
	for _, p := range pods {
		paths[inodeOf(t, p)] = p.NetnsPath
	}
	for try := 0; try < 100; try++ {
		before := kernelCounts(t, paths)
		_, body := srv.scrape(t)
		if equalCounts(before, kernelCounts(t, paths)) {
			return body
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Fatal("the pods' interfaces never quiet for one scrape")
	return ""
}

// udpBurst sends n datagrams to each port from a socket opened inside pod
// p (nothing needs to listen: a refusal is one more flow).
func udpBurst(t *testing.T, p *podns.Pod, dst netip.Addr, ports []int, n int) {
	t.Helper()
	for _, port := range ports {
		var c net.Conn
		if err := p.Do(func() (err error) {
			c, err = net.Dial("udp", netip.AddrPortFrom(dst, uint16(port)).String())
			return err
		}); err != nil {
			t.Fatal(err)
		}
		for i := 0; i < n; i++ {
			c.Write(make([]byte, 40)) // a refused port may fail the next write: sent or not, it is counted or not alike
			time.Sleep(time.Millisecond)
		}
		c.Close()
	}
}

// checkFlowSums: per observation point of the pods (eth0 and lo, each
// direction), the flow series, remainder included, add up to the point's
// totals exactly, packets and bytes; at most max flow series besides the
// remainders. It returns the remainder series seen.
func checkFlowSums(t *testing.T, what, body string, max int, pods ...*podns.Pod) int {
	t.Helper()
	type pt struct{ netns, iface, dir string }
	totals := map[string]map[pt]float64{}
	sums := map[string]map[pt]float64{}
	for _, m := range []string{"packets", "bytes"} {
		totals[m], sums[m] = map[pt]float64{}, map[pt]float64{}
	}
	flowSeries, remainders := 0, 0
	for _, s := range parseLabelled(t, body) {
		p := pt{s.labels["netns"], s.labels["interface"], s.labels["direction"]}
		switch s.name {
		case "nsflow_packets_total":
			totals["packets"][p] = s.value
		case "nsflow_bytes_total":
			totals["bytes"][p] = s.value
		case "nsflow_flow_packets_total", "nsflow_flow_bytes_total":
			m := strings.TrimSuffix(strings.TrimPrefix(s.name, "nsflow_flow_"), "_total")
			sums[m][p] += s.value
			if m == "packets" {
				if s.labels["protocol"] == "other" {
					remainders++
				} else {
					flowSeries++
				}
			}
		}
	}
	if flowSeries > max {
		t.Errorf("%s: %d flow series, more than --flows.max-series %d", what, flowSeries, max)
	}
	for _, p := range pods {
		for _, iface := range []string{"eth0", "lo"} {
			for _, dir := range []string{"rx", "tx"} {
				k := pt{p.Name, iface, dir}
				for _, m := range []string{"packets", "bytes"} {
					tot, ok := totals[m][k]
					if !ok {
						t.Errorf("%s: no nsflow_%s_total for %v", what, m, k)
						continue
					}
					if sums[m][k] != tot {
						t.Errorf("%s: %v: the flow series add up to %v %s, nsflow_%s_total is %v", what, k, sums[m][k], m, m, tot)
					}
				}
			}
		}
	}
	t.Logf("%s: %d flow series, %d remainder series; totals %v", what, flowSeries, remainders, totals["packets"])
	return remainders
}

// checkMonotonic: every counter of the earlier scrape is, in the later
// one, at least what it was (a series may have gone: a flow folded into
// its point's remainder).
func checkMonotonic(t *testing.T, before, after string) {
	t.Helper()
	later := map[string]float64{}
	for _, s := range parseLabelled(t, after) {
		later[seriesKey(s)] = s.value
	}
	n := 0
	for _, s := range parseLabelled(t, before) {
		if !strings.HasSuffix(s.name, "_total") {
			continue
		}
		v, ok := later[seriesKey(s)]
		if !ok {
			continue
		}
		n++
		if v < s.value {
			t.Errorf("counter %s went down: %v, then %v", seriesKey(s), s.value, v)
		}
	}
	t.Logf("%d counters in both scrapes, none went down", n)
}

func seriesKey(s labelled) string {
	keys := make([]string, 0, len(s.labels))
	for k, v := range s.labels {
		keys = append(keys, fmt.Sprintf("%s=%q", k, v))
	}
	sort.Strings(keys)
	return s.name + "{" + strings.Join(keys, ",") + "}"
}

// With --flows and a cap of 5 flow series, a pod with more than 20 flows
// on eth0 and lo: per observation point the flow series and the remainder
// series add up to nsflow_packets_total (and _bytes_total) exactly, once
// the traffic has stopped; every counter is monotonic across scrapes while
// new, larger flows push others out of the cap; promtool finds nothing.
func TestFlowSeriesSumToTotals(t *testing.T) {
	testenv.RequireRoot(t)
	if _, err := exec.LookPath("promtool"); err != nil {
		t.Fatalf("promtool not installed (make deps): %v", err)
	}
	pods := newPods(t, "10.213.248.0/24", "e2e-fsum-a", "e2e-fsum-b")
	a, b := pods[0], pods[1]
	quietIPv6(t, a, b)
	const max = 5
	srv := startServe(t, "http", "--flows", "--flows.max-series", fmt.Sprint(max), "--netns.host=false", "--netns.include", "^e2e-fsum-", "--cri.endpoint", "none")
	for _, p := range pods {
		waitOwnHooks(t, srv.cmd.Process.Pid, p.NetnsPath, "eth0", "lo")
	}
	waitUntil(t, 20*time.Second, "the pods' eth0 and lo in /metrics", func() bool {
		s, _ := srv.scrape0()
		for _, p := range pods {
			for _, iface := range []string{"eth0", "lo"} {
				if _, ok := s[pointSeries("nsflow_packets_total", p.Name, iface, "tx")]; !ok {
					return false
				}
			}
		}
		return true
	})

	// More than 20 flows: UDP from a to 12 ports of b and to 10 ports of
	// its own lo, pings both ways.
	var toB, toLo []int
	for i := 0; i < 12; i++ {
		toB = append(toB, 9800+i)
	}
	for i := 0; i < 10; i++ {
		toLo = append(toLo, 9850+i)
	}
	udpBurst(t, a, b.IPv4, toB, 3)
	udpBurst(t, a, netip.MustParseAddr("127.0.0.1"), toLo, 2)
	run(t, a, exec.Command("ping", "-c", "3", "-i", "0.05", "-W", "2", b.IPv4.String()))
	run(t, b, exec.Command("ping", "-c", "2", "-i", "0.05", "-W", "2", a.IPv4.String()))
	run(t, a, exec.Command("ping", "-c", "2", "-i", "0.05", "-W", "2", "127.0.0.1"))

	s1 := quietScrape(t, srv, a, b)
	if r := checkFlowSums(t, "first scrape", s1, max, a, b); r == 0 {
		t.Errorf("first scrape: no remainder series, with more flows than --flows.max-series")
	}
	lintScrape(t, srv)

	// Larger flows take the cap's places: the ones they push out fold
	// into the remainders, and nothing goes down.
	udpBurst(t, a, b.IPv4, []int{9900, 9901, 9902}, 30)
	udpBurst(t, a, netip.MustParseAddr("127.0.0.1"), []int{9950, 9951}, 30)
	s2 := quietScrape(t, srv, a, b)
	checkFlowSums(t, "second scrape", s2, max, a, b)
	checkMonotonic(t, s1, s2)
	// Quiet now: a third scrape, after an idle second, changes nothing of
	// the pods' counters.
	time.Sleep(time.Second)
	s3 := quietScrape(t, srv, a, b)
	checkFlowSums(t, "third scrape", s3, max, a, b)
	checkMonotonic(t, s2, s3)
	lintScrape(t, srv)
}

// quietIPv6 turns IPv6 off on the pods' eth0 and on their host veths and
// bridge (all this test's): no router solicitation or MLD report crosses
// an eth0 while counters are compared.
func quietIPv6(t *testing.T, pods ...*podns.Pod) {
	t.Helper()
	set := func(dev string) {
		if err := os.WriteFile("/proc/sys/net/ipv6/conf/"+dev+"/disable_ipv6", []byte("1"), 0); err != nil {
			t.Fatalf("disable IPv6 on %s: %v", dev, err)
		}
	}
	for _, p := range pods {
		set(p.HostVeth)
		set(p.Bridge)
		if err := p.Do(func() error {
			return os.WriteFile("/proc/sys/net/ipv6/conf/eth0/disable_ipv6", []byte("1"), 0)
		}); err != nil {
			t.Fatal(err)
		}
	}
}

// ownNames is the set of clsact filter names of nsflow process pid (see
// ownerNames), empty while it holds no @nsflow/ socket yet.
func ownNames(t *testing.T, pid int) map[string]bool {
	t.Helper()
	inodes := map[string]bool{}
	for _, target := range fds(t, pid) {
		if ino, ok := strings.CutPrefix(target, "socket:["); ok {
			inodes[strings.TrimSuffix(ino, "]")] = true
		}
	}
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/net/unix", pid))
	if err != nil {
		t.Fatal(err)
	}
	cookie := ownCookie(t)
	names := map[string]bool{}
	for _, l := range strings.Split(string(b), "\n") {
		f := strings.Fields(l)
		if len(f) < 8 || !inodes[f[6]] {
			continue
		}
		if id, ok := strings.CutPrefix(f[7], "@nsflow/"); ok {
			names[fmt.Sprintf("nsflow/%016x/%s", cookie, id)] = true
		}
	}
	return names
}

// waitOwnHooks waits until both hooks of each named interface of the
// namespace hold a program of nsflow process pid (a TCX link it holds, or
// a clsact filter named for it), as the kernel reports them: other nsflow
// instances on the machine may observe the same namespace, and `nsflow
// list` reads every namespace of a busy node.
func waitOwnHooks(t *testing.T, pid int, nsPath string, ifaces ...string) {
	t.Helper()
	h, err := netns.GetFromPath(nsPath)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	attached := func() bool {
		held := heldLinks(t, pid)
		names := ownNames(t, pid)
		nl := openNetlinkAt(t, nsPath)
		defer nl.Close()
		for _, name := range ifaces {
			l, err := nl.LinkByName(name)
			if err != nil {
				t.Fatalf("%s in %s: %v", name, nsPath, err)
			}
			for i, at := range []ebpf.AttachType{ebpf.AttachTCXIngress, ebpf.AttachTCXEgress} {
				found := false
				nsenter.Do(h, func() error {
					r, err := link.QueryPrograms(link.QueryOptions{Target: l.Attrs().Index, Attach: at})
					if err != nil {
						return err
					}
					for _, p := range r.Programs {
						if id, ok := p.LinkID(); ok && held[id] {
							found = true
						}
					}
					return nil
				})
				parent := []uint32{netlink.HANDLE_MIN_INGRESS, netlink.HANDLE_MIN_EGRESS}[i]
				if fs, err := nl.FilterList(l, parent); err == nil {
					for _, f := range fs {
						if bf, ok := f.(*netlink.BpfFilter); ok && names[bf.Name] {
							found = true
						}
					}
				}
				if !found {
					return false
				}
			}
		}
		return true
	}
	waitUntil(t, 30*time.Second, fmt.Sprintf("process %d's hooks on %v in %s", pid, ifaces, nsPath), attached)
}
