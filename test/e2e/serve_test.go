package e2e

import (
	"fmt"
	"net/http"
	"net/netip"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"

	"github.com/nsflow/nsflow/collector/flow"
	"github.com/nsflow/nsflow/test/podns"
	"github.com/nsflow/nsflow/test/testenv"
)

// scrapeCounts reads the pods' counters from a scrape, as counts.
func scrapeCounts(s samples, pods map[uint64]*podns.Pod, ifaces []string) counts {
	out := counts{}
	for ino, p := range pods {
		for _, i := range ifaces {
			for _, d := range []flow.Direction{flow.RX, flow.TX} {
				pk, ok1 := s[pointSeries("nsflow_packets_total", p.Name, i, string(d))]
				by, ok2 := s[pointSeries("nsflow_bytes_total", p.Name, i, string(d))]
				if ok1 && ok2 {
					out[point{ino, i, d}] = flow.Counters{Packets: uint64(pk), Bytes: uint64(by)}
				}
			}
		}
	}
	return out
}

// quiescentScrape scrapes between two reads of the kernel's counters, until
// both reads agree: the scrape then saw the same instant as the kernel.
func quiescentScrape(t *testing.T, srv *server, pods map[uint64]*podns.Pod) (kernel, scraped counts, raw string) {
	t.Helper()
	paths := map[uint64]string{}
	for ino, p := range pods {
		paths[ino] = p.NetnsPath
	}
	for try := 0; try < 100; try++ {
		before := kernelCounts(t, paths)
		s, body := srv.scrape(t)
		after := kernelCounts(t, paths)
		if equalCounts(before, after) {
			return after, scrapeCounts(s, pods, []string{"lo", "eth0"}), body
		}
	}
	t.Fatal("interfaces never quiet for one scrape")
	return nil, nil, ""
}

func TestServe(t *testing.T) {
	testenv.RequireRoot(t)
	srv := startServe(t, "http", "--netns.host=false", "--netns.include", "^e2e-sv-", "--netns.grace-period", "2s")
	pods := newPods(t, "10.213.120.0/24", "e2e-sv-a", "e2e-sv-b")
	a, b := pods[0], pods[1]
	byIno := map[uint64]*podns.Pod{inodeOf(t, a): a, inodeOf(t, b): b}

	// Pods created after serve started are discovered (inotify) and attached.
	waitUntil(t, 10*time.Second, "both pods' eth0 and lo in /metrics", func() bool {
		s, _ := srv.scrape(t)
		for _, p := range pods {
			for _, i := range []string{"lo", "eth0"} {
				if _, ok := s[pointSeries("nsflow_packets_total", p.Name, i, "tx")]; !ok {
					return false
				}
			}
		}
		return true
	})

	k0, s0, _ := quiescentScrape(t, srv, byIno)
	run(t, a, exec.Command("ping", "-c", "3", "-i", "0.05", "-W", "2", b.IPv4.String()))
	udpExchange(t, a, b, netip.AddrPortFrom(b.IPv6, 9200), 25, 120)
	tcpExchange(t, a, a, netip.MustParseAddrPort("127.0.0.1:9201"), 128<<10)
	udpExchange(t, a, a, netip.MustParseAddrPort("127.0.0.1:9202"), 17, 50)
	k1, s1, body := quiescentScrape(t, srv, byIno)

	kd, sd := delta(k0, k1), delta(s0, s1)
	for p, want := range kd {
		if got, ok := sd[p]; !ok || got != want {
			t.Errorf("%s: /metrics %+v, kernel %+v", p, got, want)
		}
	}
	inoA := inodeOf(t, a)
	if kd[point{inoA, "lo", flow.TX}].Packets == 0 || kd[point{inoA, "eth0", flow.TX}].Packets == 0 {
		t.Errorf("no traffic measured: %+v", kd)
	}
	t.Logf("scraped deltas equal to the kernel's: a lo tx %+v, a eth0 tx %+v, b eth0 rx %+v",
		sd[point{inoA, "lo", flow.TX}], sd[point{inoA, "eth0", flow.TX}], sd[point{inodeOf(t, b), "eth0", flow.RX}])

	if code, body := srv.get("/-/healthy"); code != 200 || body != "ok\n" {
		t.Errorf("/-/healthy: %d %q", code, body)
	}
	if code, body := srv.get("/"); code != 200 || !strings.Contains(body, "/metrics") {
		t.Errorf("landing page: %d, no link to /metrics", code)
	}
	if code, _ := srv.get("/debug/pprof/"); code != http.StatusNotFound {
		t.Errorf("/debug/pprof/ without --web.enable-pprof: status %d, want 404", code)
	}
	// The exposition passes promtool's lint.
	check := exec.Command("promtool", "check", "metrics")
	check.Stdin = strings.NewReader(body)
	if out, err := check.CombinedOutput(); err != nil || len(strings.TrimSpace(string(out))) > 0 {
		t.Errorf("promtool check metrics: %v\n%s", err, out)
	}

	// Deleting pod b: its programs, links and fds are released at once;
	// its series stay for the grace period, then vanish.
	pid := srv.cmd.Process.Pid
	inoB := inodeOf(t, b)
	linksBefore := countFDs(fds(t, pid), "bpf_link")
	// serve holds an fd per TCX link of pod b (auto attaches pods with
	// clsact: then none, and its filters go with the namespace).
	filtersB := 0
	for _, c := range bpfFilters(t, b.NetnsPath) {
		filtersB += c
	}
	tcxB := hookPrograms(t, b) - filtersB
	// The time reference is the moment Delete starts, not the moment it
	// returns: serve sees pod b's eth0 and namespace vanish during Delete
	// (it deletes the veth, then the bind mount, then the bridge, which can
	// take a while), so their grace periods start at deleting or later,
	// never earlier. Every check below
	// compares the time at which a scrape has returned (when the series'
	// state it saw was already true) with deleting + grace, so a correct
	// serve cannot fail it, however slow Delete or the machine is.
	const grace = 2 * time.Second
	deleting := time.Now()
	if _, err := podns.Delete(podns.Config{}, b.Name); err != nil {
		t.Fatal(err)
	}
	t.Logf("podns.Delete took %s", time.Since(deleting).Round(time.Millisecond))
	waitUntil(t, 10*time.Second, "pod b's links and netns fds released", func() bool {
		f := fds(t, pid)
		return countFDs(f, fmt.Sprintf("net:[%d]", inoB)) == 0 && countFDs(f, "bpf_link") == linksBefore-tcxB
	})
	// A scrape that has returned before deleting + grace read the maps
	// before the earliest moment the series may go: they must be there.
	if s, _ := srv.scrape(t); time.Since(deleting) < grace {
		if _, ok := s[pointSeries("nsflow_packets_total", b.Name, "eth0", "rx")]; !ok {
			t.Errorf("pod b's series vanished %s after Delete started, before the %s grace period", time.Since(deleting), grace)
		}
	} else {
		t.Logf("the release took until %s after Delete started: no scrape inside the grace period to check", time.Since(deleting))
	}
	waitUntil(t, 15*time.Second, "pod b's series removed after the grace period", func() bool {
		s, _ := srv.scrape(t)
		_, ok := s[pointSeries("nsflow_packets_total", b.Name, "eth0", "rx")]
		return !ok
	})
	// The first scrape without them returned at least this long after
	// Delete started; they cannot have gone before deleting + grace.
	if gone := time.Since(deleting); gone < grace {
		t.Errorf("series removed %s after Delete started, before the %s grace period", gone, grace)
	}
	s, _ := srv.scrape(t)
	if _, ok := s[pointSeries("nsflow_packets_total", a.Name, "lo", "tx")]; !ok {
		t.Errorf("pod a's series went with pod b's")
	}

	// SIGTERM detaches everything from pod a.
	srv.stop(t)
	if n := hookPrograms(t, a); n != 0 {
		t.Errorf("%d programs left on pod a's hooks after serve exited", n)
	}
}

// Namespaces made by other tools are discovered too: `ip netns add` with a
// veth moved in afterwards, as a CNI plugin does, and a process that
// unshared its network namespace without any bind mount.
func TestServeForeignNamespaces(t *testing.T) {
	testenv.RequireRoot(t)
	unshared := exec.Command("unshare", "-n", "sleep", "60")
	if err := unshared.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unshared.Process.Kill(); unshared.Wait() })
	procName := fmt.Sprintf("pid:%d", unshared.Process.Pid)

	srv := startServe(t, "http", "--netns.host=false", "--netns.include", "^(e2e-fn-|"+procName+"$)", "--netns.grace-period", "1s")
	// Found by the first scan (it started before serve).
	waitUntil(t, 10*time.Second, procName+" lo in /metrics", func() bool {
		s, _ := srv.scrape(t)
		_, ok := s[pointSeries("nsflow_packets_total", procName, "lo", "rx")]
		return ok
	})

	const name = "e2e-fn-ipnetns"
	if out, err := exec.Command("ip", "netns", "add", name).CombinedOutput(); err != nil {
		t.Fatalf("ip netns add: %v %s", err, out)
	}
	t.Cleanup(func() { exec.Command("ip", "netns", "del", name).Run() })
	waitUntil(t, 10*time.Second, name+" lo in /metrics", func() bool {
		s, _ := srv.scrape(t)
		_, ok := s[pointSeries("nsflow_packets_total", name, "lo", "rx")]
		return ok
	})
	// A veth moved in after the namespace exists (what CNI does).
	veth := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "e2efn0"}, PeerName: "e2efn1"}
	if err := netlink.LinkAdd(veth); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { netlink.LinkDel(veth) })
	peer, err := netlink.LinkByName("e2efn1")
	if err != nil {
		t.Fatal(err)
	}
	h, err := netns.GetFromName(name)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	if err := netlink.LinkSetNsFd(peer, int(h)); err != nil {
		t.Fatal(err)
	}
	moved := time.Now()
	waitUntil(t, 10*time.Second, "moved veth in /metrics", func() bool {
		s, _ := srv.scrape(t)
		_, ok := s[pointSeries("nsflow_packets_total", name, "e2efn1", "rx")]
		return ok
	})
	t.Logf("veth moved into %s observed within %s (including scrape polling)", name, time.Since(moved))

	// The unshared process exits: its namespace's series go after the grace period.
	unshared.Process.Kill()
	unshared.Wait()
	waitUntil(t, 15*time.Second, procName+" removed after its process exited", func() bool {
		s, _ := srv.scrape(t)
		_, ok := s[pointSeries("nsflow_packets_total", procName, "lo", "rx")]
		return !ok
	})
}
