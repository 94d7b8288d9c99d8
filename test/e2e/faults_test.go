package e2e

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"

	"github.com/nsflow/nsflow/collector"
	"github.com/nsflow/nsflow/collector/attach"
	"github.com/nsflow/nsflow/collector/flow"
	"github.com/nsflow/nsflow/test/podns"
	"github.com/nsflow/nsflow/test/testenv"
)

// Without one of the capabilities it needs, nsflow fails at once with a
// message naming it.
func TestFaultMissingCapability(t *testing.T) {
	testenv.RequireRoot(t)
	if _, err := exec.LookPath("capsh"); err != nil {
		t.Fatalf("capsh not installed (make deps): %v", err)
	}
	for _, tc := range []struct{ drop, want string }{
		{"cap_net_admin", "missing capabilities: CAP_NET_ADMIN "},
		{"cap_sys_admin", "missing capabilities: CAP_SYS_ADMIN "},
		{"cap_sys_admin,cap_bpf", "missing capabilities: CAP_BPF, CAP_SYS_ADMIN "},
		{"cap_sys_admin,cap_perfmon,cap_net_admin", "missing capabilities: CAP_NET_ADMIN, CAP_PERFMON, CAP_SYS_ADMIN "},
	} {
		t.Run(tc.drop, func(t *testing.T) {
			cmd := exec.Command("capsh", "--drop="+tc.drop, "--", "-c",
				nsflowBin+" serve --web.listen-address 127.0.0.1:"+strconv.Itoa(freePort(t)))
			out, err := cmd.CombinedOutput()
			var ee *exec.ExitError
			if !errors.As(err, &ee) || ee.ExitCode() != 1 {
				t.Fatalf("serve without %s: %v\n%s", tc.drop, err, out)
			}
			if !strings.Contains(string(out), tc.want) {
				t.Errorf("message does not say %q:\n%s", tc.want, out)
			}
		})
	}
	// CAP_SYS_ADMIN stands in for CAP_BPF and CAP_PERFMON, as in the kernel.
	out, err := exec.Command("capsh", "--drop=cap_bpf,cap_perfmon", "--", "-c", nsflowBin+" trace --netns host --duration 100ms").CombinedOutput()
	if err != nil {
		t.Errorf("without CAP_BPF and CAP_PERFMON but with CAP_SYS_ADMIN: %v\n%s", err, out)
	}
}

// A kernel without TCX (simulated) makes auto mode fall back to clsact,
// with exact counts. Auto tries TCX only in the host namespace (pods get
// clsact anyway: attach.Mode.For), so the host is observed here.
func TestFaultNoTCXFallsBack(t *testing.T) {
	testenv.RequireRoot(t)
	os.Setenv("NSFLOW_FAULT_NO_TCX", "1")
	defer os.Unsetenv("NSFLOW_FAULT_NO_TCX")
	pods := newPods(t, "10.213.131.0/24", "e2e-ft-a")
	a := pods[0]
	srv := startServe(t, "http", "--netns.proc=false", "--netns.include", "^(e2e-ft-a|host)$")
	waitUntil(t, 10*time.Second, "pod a in /metrics", func() bool {
		s, _ := srv.scrape(t)
		_, ok := s[pointSeries("nsflow_packets_total", a.Name, "lo", "tx")]
		return ok
	})
	byIno := map[uint64]*podns.Pod{inodeOf(t, a): a}
	k0, s0, _ := quiescentScrape(t, srv, byIno)
	udpExchange(t, a, a, netip.MustParseAddrPort("127.0.0.1:9800"), 12, 30)
	k1, s1, body := quiescentScrape(t, srv, byIno)
	for p, want := range delta(k0, k1) {
		if got := delta(s0, s1)[p]; got != want {
			t.Errorf("%s: %+v, kernel %+v", p, got, want)
		}
	}
	for _, scope := range []string{"host", "other"} {
		if !strings.Contains(body, `nsflow_attach_mode_info{mode="clsact",scope="`+scope+`"} 1`) {
			t.Errorf("attach mode is not clsact in scope %s:\n%s", scope, body)
		}
	}
	if !strings.Contains(srv.logText(), "falling back to clsact") {
		t.Errorf("no log of the fallback:\n%s", srv.logText())
	}
	srv.stop(t)
	assertNoClsact(t, a)
}

// With bpffs not mounted, --pin mounts it (in a private mount namespace
// here, so the machine's own bpffs is untouched).
func TestFaultBPFFSMissing(t *testing.T) {
	testenv.RequireRoot(t)
	pods := newPods(t, "10.213.132.0/24", "e2e-fb-a")
	port := freePort(t)
	script := fmt.Sprintf("umount /sys/fs/bpf 2>/dev/null; exec %s serve --pin --web.listen-address 127.0.0.1:%d --netns.host=false --netns.proc=false --netns.include '^e2e-fb-a$'", nsflowBin, port)
	cmd := exec.Command("unshare", "--mount", "--propagation", "private", "sh", "-c", script)
	var out lockedBuffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	srv := &server{cmd: cmd, url: fmt.Sprintf("http://127.0.0.1:%d", port), client: startServeClient()}
	srv.log, _ = os.CreateTemp(t.TempDir(), "log")
	t.Cleanup(func() { srv.stop(t) })
	waitUntil(t, 15*time.Second, "pod in /metrics", func() bool {
		s, _ := srv.scrape0()
		_, ok := s[pointSeries("nsflow_packets_total", pods[0].Name, "lo", "tx")]
		return ok
	})
	if !strings.Contains(out.String(), "mounted bpffs") {
		t.Errorf("no log of the bpffs mount:\n%s", out.String())
	}
}

// An interface renamed keeps its counters under the new name; an
// interface moved to another observed namespace is released in the first
// and attached in the second.
func TestFaultRenameAndMove(t *testing.T) {
	testenv.RequireRoot(t)
	pods := newPods(t, "10.213.133.0/24", "e2e-fr-a", "e2e-fr-b")
	a, b := pods[0], pods[1]
	c := observe(t, attach.ModeTCX, a, b)
	inoA, inoB := inodeOf(t, a), inodeOf(t, b)

	nl, err := a.Netlink()
	if err != nil {
		t.Fatal(err)
	}
	defer nl.Close()

	run(t, b, exec.Command("ping", "-c", "2", "-i", "0.05", a.IPv4.String()))
	before := rxPackets(t, c, a)
	eth0, err := nl.LinkByName("eth0")
	if err != nil {
		t.Fatal(err)
	}
	if err := nl.LinkSetDown(eth0); err != nil {
		t.Fatal(err)
	}
	if err := nl.LinkSetName(eth0, "eth9"); err != nil {
		t.Fatal(err)
	}
	if err := nl.LinkSetUp(eth0); err != nil {
		t.Fatal(err)
	}
	nl.RouteAdd(&netlink.Route{LinkIndex: eth0.Attrs().Index, Gw: a.Gateway4.AsSlice()})
	waitUntil(t, 5*time.Second, "the rename", func() bool { return ifaceName(c, inoA, eth0.Attrs().Index) == "eth9" })
	run(t, b, exec.Command("ping", "-c", "3", "-i", "0.05", a.IPv4.String()))
	snap, err := c.Snapshot()
	if err != nil {
		t.Fatal(err)
	}
	got := nsflowCounts(snap, map[uint64]string{inoA: a.NetnsPath})[point{inoA, "eth9", flow.RX}].Packets
	if got < before+3 {
		t.Errorf("eth9 (was eth0) rx %d packets, want its old %d plus at least 3", got, before)
	}

	// Move one end of a new veth pair from a to b.
	veth := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "mv0"}, PeerName: "mv1"}
	if err := nl.LinkAdd(veth); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, 5*time.Second, "mv1 attached in a", func() bool { return ifaceState(c, inoA, "mv1") == flow.StateAttached })
	mv1, err := nl.LinkByName("mv1")
	if err != nil {
		t.Fatal(err)
	}
	hb, err := netns.GetFromPath(b.NetnsPath)
	if err != nil {
		t.Fatal(err)
	}
	defer hb.Close()
	if err := nl.LinkSetNsFd(mv1, int(hb)); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, 5*time.Second, "mv1 released in a and attached in b", func() bool {
		return ifaceState(c, inoA, "mv1") == flow.StateDetached && ifaceState(c, inoB, "mv1") == flow.StateAttached
	})
	if n := hookPrograms(t, b); n != 6 { // lo, eth0, mv1
		t.Errorf("%d programs on the hooks of b, want 6", n)
	}
}

func ifaceName(c *collector.Collector, ino uint64, idx int) string {
	for _, ns := range c.Interfaces() {
		if ns.Inode == ino {
			for _, i := range ns.Interfaces {
				if i.Index == idx {
					return i.Name
				}
			}
		}
	}
	return ""
}

func ifaceState(c *collector.Collector, ino uint64, name string) flow.AttachState {
	for _, ns := range c.Interfaces() {
		if ns.Inode == ino {
			for _, i := range ns.Interfaces {
				if i.Name == name {
					return i.State
				}
			}
		}
	}
	return ""
}
