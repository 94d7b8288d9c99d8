package e2e

import (
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/nsflow/nsflow/collector/flow"
	"github.com/nsflow/nsflow/test/podns"
	"github.com/nsflow/nsflow/test/testenv"
)

// Names a tenant may choose: not UTF-8, terminal escapes. Interface names
// are at most 15 bytes and hold no '/', ':' or white space.
const (
	hostileA  = "e\xffx"            // not valid UTF-8
	hostileB  = "\x1b[31mred"       // an ANSI colour escape
	hostileNS = "e2e-hn\xfe\x1b[2J" // not UTF-8, and clears the screen
)

// Tenants' names never break a scrape, a terminal or a count: interfaces
// and a namespace with non-UTF-8 names and terminal escapes, and both
// deleted and re-created under the same name while serve (defaults) keeps
// the old ones for the grace period. Every scrape answers 200 and passes
// promtool; the series of a re-created name is the new interface's own
// count, exactly as the kernel counted it (a counter reset: the gone twin
// is not added, see exporter); trace, list and their JSON show the names
// without a control character.
func TestHostileNames(t *testing.T) {
	testenv.RequireRoot(t)
	if _, err := exec.LookPath("promtool"); err != nil {
		t.Fatalf("promtool not installed (make deps): %v", err)
	}
	pods := newPods(t, "10.213.190.0/24", "e2e-hn-a", "e2e-hn-b")
	a, b := pods[0], pods[1]
	srv := startServe(t, "http", "--cri.endpoint", "none")

	// A veth pair between the pods, both ends with hostile names, without
	// IPv6 (whose router solicitations would go on after the kernel's
	// counters are read).
	for _, p := range pods {
		if err := p.Do(func() error {
			return os.WriteFile("/proc/sys/net/ipv6/conf/default/disable_ipv6", []byte("1"), 0)
		}); err != nil {
			t.Fatal(err)
		}
	}
	vethUp := func() {
		t.Helper()
		nlA, err := a.Netlink()
		if err != nil {
			t.Fatal(err)
		}
		defer nlA.Close()
		nsB, err := b.Handle()
		if err != nil {
			t.Fatal(err)
		}
		defer nsB.Close()
		veth := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: hostileA}, PeerName: hostileB, PeerNamespace: netlink.NsFd(int(nsB))}
		if err := nlA.LinkAdd(veth); err != nil {
			t.Fatalf("add veth: %v", err)
		}
		setUp(t, a, hostileA, "10.213.191.1/30")
		setUp(t, b, hostileB, "10.213.191.2/30")
	}
	vethUp()
	t.Cleanup(func() { deleteLinkIn(a, hostileA) })

	// A namespace with a hostile name, lo up.
	nsPath := filepath.Join("/run/netns", hostileNS)
	newRawNetns(t, nsPath)

	pingIn := func(p *podns.Pod, n int, dst string) {
		t.Helper()
		cmd := exec.Command("ping", "-c", fmt.Sprint(n), "-i", "0.01", "-W", "1", dst)
		if err := p.Do(func() error { return cmd.Run() }); err != nil {
			t.Fatalf("ping %s in %s: %v", dst, p.Name, err)
		}
	}
	pingNS := func(n int) {
		t.Helper()
		if out, err := exec.Command("nsenter", "--net="+nsPath, "ping", "-c", fmt.Sprint(n), "-i", "0.01", "-W", "1", "127.0.0.1").CombinedOutput(); err != nil {
			t.Fatalf("ping in %q: %v\n%s", hostileNS, err, out)
		}
	}

	// Counts are exact from the moment both hooks are attached: the veth
	// and the namespace were made after serve started.
	waitHooks(t, a.NetnsPath, hostileA)
	waitHooks(t, b.NetnsPath, hostileB)
	waitHooks(t, nsPath, "lo")
	pingIn(a, 5, "10.213.191.2")
	pingNS(4)
	waitUntil(t, 10*time.Second, "serve to observe the hostile names", func() bool {
		s, _ := srv.scrape0()
		return s != nil && s[pointSeries("nsflow_packets_total", "e2e-hn-a", flow.SafeName(hostileA), "tx")] >= 5 &&
			s[pointSeries("nsflow_packets_total", flow.SafeName(hostileNS), "lo", "tx")] >= 8
	})
	lintScrape(t, srv)

	// Delete both and make them again under the same names; the old ones
	// stay in the collector for the grace period.
	deleteLinkIn(a, hostileA)
	removeRawNetns(t, nsPath)
	vethUp()
	newRawNetns(t, nsPath)
	// Counts are exact from the moment both hooks are attached: wait for
	// them (nsflow list reads them back from the kernel).
	waitHooks(t, a.NetnsPath, hostileA)
	waitHooks(t, b.NetnsPath, hostileB)
	waitHooks(t, nsPath, "lo")
	pingIn(a, 3, "10.213.191.2")
	pingNS(2)

	var got samples
	want := map[string]float64{}
	t.Cleanup(func() {
		if t.Failed() {
			for s, v := range want {
				t.Logf("%s = %v, want %v", s, got[s], v)
			}
		}
	})
	waitUntil(t, 10*time.Second, "the re-created names' series to equal the new interfaces' counts", func() bool {
		newA := kernelLink(t, a.NetnsPath, hostileA)
		newNS := kernelLink(t, nsPath, "lo")
		want[pointSeries("nsflow_packets_total", "e2e-hn-a", flow.SafeName(hostileA), "tx")] = float64(newA.TxPackets)
		want[pointSeries("nsflow_packets_total", "e2e-hn-a", flow.SafeName(hostileA), "rx")] = float64(newA.RxPackets)
		want[pointSeries("nsflow_packets_total", flow.SafeName(hostileNS), "lo", "tx")] = float64(newNS.TxPackets)
		want[pointSeries("nsflow_packets_total", flow.SafeName(hostileNS), "lo", "rx")] = float64(newNS.RxPackets)
		got, _ = srv.scrape0()
		if got == nil {
			return false
		}
		for s, v := range want {
			if got[s] != v {
				return false
			}
		}
		return true
	})
	lintScrape(t, srv)

	// The terminal never gets a control character; JSON stays valid.
	trace := exec.Command(nsflowBin, "trace", "--netns", "e2e-hn-a", "--netns", nsPath, "--duration", "300ms", "--cri.endpoint", "none")
	out, err := trace.Output()
	if err != nil {
		t.Fatalf("trace: %v\n%s", err, out)
	}
	assertPrintable(t, "trace", out)
	if !strings.Contains(string(out), flow.SafeName(hostileA)) || !strings.Contains(string(out), flow.SafeName(hostileNS)) {
		t.Errorf("trace does not show the escaped names:\n%s", out)
	}
	list, err := exec.Command(nsflowBin, "list", "--cri.endpoint", "none").Output()
	if err != nil {
		t.Fatalf("list: %v", err)
	}
	assertPrintable(t, "list", list)
	if !strings.Contains(string(list), flow.SafeName(hostileB)) {
		t.Errorf("list does not show %q:\n%s", flow.SafeName(hostileB), list)
	}
	js, err := exec.Command(nsflowBin, "trace", "--netns", "e2e-hn-b", "--duration", "200ms", "--output", "json", "--cri.endpoint", "none").Output()
	if err != nil {
		t.Fatalf("trace json: %v", err)
	}
	if !json.Valid(js) || !utf8.Valid(js) {
		t.Errorf("trace JSON not valid:\n%s", js)
	}
	var doc struct {
		Namespaces []struct {
			Interfaces []struct{ Name string } `json:"interfaces"`
		} `json:"namespaces"`
	}
	if err := json.Unmarshal(js, &doc); err != nil {
		t.Fatal(err)
	}
	found := false
	for _, ns := range doc.Namespaces {
		for _, i := range ns.Interfaces {
			found = found || i.Name == hostileB // valid UTF-8: exact
		}
	}
	if !found {
		t.Errorf("trace JSON lacks the exact name %q:\n%s", hostileB, js)
	}
}

// setUp brings a pod's link up with an address.
func setUp(t *testing.T, p *podns.Pod, name, cidr string) {
	t.Helper()
	nl, err := p.Netlink()
	if err != nil {
		t.Fatal(err)
	}
	defer nl.Close()
	l, err := nl.LinkByName(name)
	if err != nil {
		t.Fatalf("%s: %q: %v", p.Name, name, err)
	}
	addr, err := netlink.ParseAddr(cidr)
	if err != nil {
		t.Fatal(err)
	}
	if err := nl.AddrAdd(l, addr); err != nil {
		t.Fatalf("address %s on %q: %v", cidr, name, err)
	}
	if err := nl.LinkSetUp(l); err != nil {
		t.Fatalf("up %q: %v", name, err)
	}
}

// deleteLinkIn deletes a pod's link if it is there.
func deleteLinkIn(p *podns.Pod, name string) {
	nl, err := p.Netlink()
	if err != nil {
		return
	}
	defer nl.Close()
	if l, err := nl.LinkByName(name); err == nil {
		nl.LinkDel(l)
	}
}

// newRawNetns makes a bind-mounted namespace at path (any name, as a tenant
// or a runtime could), with lo up, and removes it when the test ends.
func newRawNetns(t *testing.T, path string) {
	t.Helper()
	if err := os.WriteFile(path, nil, 0o444); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { removeRawNetns(t, path) })
	if out, err := exec.Command("unshare", "--net="+path, "ip", "link", "set", "lo", "up").CombinedOutput(); err != nil {
		t.Fatalf("unshare --net=%q: %v\n%s", path, err, out)
	}
}

func removeRawNetns(t *testing.T, path string) {
	t.Helper()
	if _, err := os.Lstat(path); err != nil {
		return
	}
	if err := unix.Unmount(path, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) {
		t.Errorf("umount %q: %v", path, err)
	}
	if err := os.Remove(path); err != nil {
		t.Errorf("remove %q: %v", path, err)
	}
}

// waitHooks waits until both hooks of a namespace's interface hold an
// nsflow program, as `nsflow list` reads them back from the kernel
// (identified by inode and ifindex: JSON cannot carry a name that is not
// UTF-8 exactly).
func waitHooks(t *testing.T, nsPath, name string) {
	t.Helper()
	ino := nsInode(t, nsPath)
	nl := openNetlinkAt(t, nsPath)
	l, err := nl.LinkByName(name)
	nl.Close()
	if err != nil {
		t.Fatalf("%q in %q: %v", name, nsPath, err)
	}
	idx := l.Attrs().Index
	waitUntil(t, 20*time.Second, fmt.Sprintf("both hooks of %q attached", name), func() bool {
		out, err := exec.Command(nsflowBin, "list", "-o", "json", "--cri.endpoint", "none").Output()
		if err != nil {
			return false
		}
		var nss []struct {
			Inode      uint64 `json:"inode"`
			Interfaces []struct {
				Index   int    `json:"ifindex"`
				Attach  string `json:"attach"`
				Partial bool   `json:"partial"`
			} `json:"interfaces"`
		}
		if json.Unmarshal(out, &nss) != nil {
			return false
		}
		for _, ns := range nss {
			for _, i := range ns.Interfaces {
				if ns.Inode == ino && i.Index == idx {
					return i.Attach != "none" && !i.Partial
				}
			}
		}
		return false
	})
}

// openNetlinkAt opens a netlink handle (rtnetlink) inside the namespace at
// path; the caller closes it soon: its socket holds the namespace alive.
func openNetlinkAt(t *testing.T, path string) *netlink.Handle {
	t.Helper()
	h, err := netns.GetFromPath(path)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close() // the handle's socket stays in the namespace
	nl, err := netlink.NewHandleAt(h, unix.NETLINK_ROUTE)
	if err != nil {
		t.Fatalf("netlink in %s: %v", path, err)
	}
	return nl
}

// nsInode is the inode of a namespace file.
func nsInode(t *testing.T, path string) uint64 {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	return st.Ino
}

// kernelLink reads a link's own counters inside a namespace.
func kernelLink(t *testing.T, nsPath, name string) *netlink.LinkStatistics {
	t.Helper()
	nl := openNetlinkAt(t, nsPath)
	defer nl.Close()
	l, err := nl.LinkByName(name)
	if err != nil {
		t.Fatalf("%q in %q: %v", name, nsPath, err)
	}
	if l.Attrs().Flags&net.FlagLoopback != 0 && l.Attrs().Statistics.RxPackets != l.Attrs().Statistics.TxPackets {
		t.Fatalf("lo's rx and tx differ: %+v", l.Attrs().Statistics)
	}
	return l.Attrs().Statistics
}

// lintScrape scrapes once more: 200, and promtool finds nothing to say.
func lintScrape(t *testing.T, srv *server) {
	t.Helper()
	code, body := srv.get("/metrics")
	if code != 200 {
		t.Fatalf("scrape: status %d: %s", code, body)
	}
	check := exec.Command("promtool", "check", "metrics")
	check.Stdin = strings.NewReader(body)
	if out, err := check.CombinedOutput(); err != nil || strings.TrimSpace(string(out)) != "" {
		t.Errorf("promtool check metrics: %v\n%s", err, out)
	}
}

// assertPrintable fails on any byte a terminal would act on: control
// characters other than newline and tab, DEL, C1 controls, invalid UTF-8.
func assertPrintable(t *testing.T, what string, out []byte) {
	t.Helper()
	if !utf8.Valid(out) {
		t.Errorf("%s output is not valid UTF-8:\n%q", what, out)
	}
	for _, r := range string(out) {
		if (r < 0x20 && r != '\n' && r != '\t') || r == 0x7f || (r >= 0x80 && r <= 0x9f) {
			t.Errorf("%s output holds control character %U:\n%q", what, r, out)
			return
		}
	}
}
