package podns

import (
	"bufio"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/vishvananda/netlink"

	"github.com/nsflow/nsflow/test/testenv"
)

var (
	subnetA = netip.MustParsePrefix("10.213.200.0/24")
	subnet4 = netip.MustParsePrefix("10.213.201.0/30") // one pod address: .2
)

// create makes a pod in a state dir of the test's own and deletes it at the
// end of the test, pass or fail.
func create(t *testing.T, cfg Config, name string, opts Options) *Pod {
	t.Helper()
	p, err := Create(cfg, name, opts)
	if err != nil {
		t.Fatalf("create %s: %v", name, err)
	}
	t.Cleanup(func() {
		if _, err := Delete(cfg, name); err != nil {
			t.Errorf("delete %s: %v", name, err)
		}
	})
	return p
}

func testConfig(t *testing.T) Config { return Config{StateDir: t.TempDir()} }

func linkExists(name string) bool {
	_, err := netlink.LinkByName(name)
	return err == nil
}

func runIn(t *testing.T, p *Pod, name string, args ...string) string {
	t.Helper()
	cmd := exec.Command(name, args...)
	var out strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := p.Start(cmd); err != nil {
		t.Fatal(err)
	}
	if err := cmd.Wait(); err != nil {
		t.Fatalf("%s %v in %s: %v\n%s", name, args, p.Name, err, out.String())
	}
	return out.String()
}

func TestPodsTalk(t *testing.T) {
	testenv.RequireRoot(t)
	cfg := testConfig(t)
	a := create(t, cfg, "pt-a", Options{Subnet: subnetA})
	b := create(t, cfg, "pt-b", Options{Subnet: subnetA, IP: netip.MustParseAddr("10.213.200.77")})

	if a.IPv4 != netip.MustParseAddr("10.213.200.2") || b.IPv4 != netip.MustParseAddr("10.213.200.77") {
		t.Errorf("addresses %s, %s; want the lowest free one and the requested one", a.IPv4, b.IPv4)
	}
	if b.IPv6 != netip.MustParseAddr("fd6e:7366:ad5:c800::4d") || a.Gateway4 != netip.MustParseAddr("10.213.200.1") {
		t.Errorf("IPv6 %s gateway %s", b.IPv6, a.Gateway4)
	}
	out, err := exec.Command("ip", "netns", "list").Output()
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range []string{"pt-a", "pt-b"} {
		if !strings.Contains(string(out), n) {
			t.Errorf("ip netns list does not show %s:\n%s", n, out)
		}
	}
	addrs := runIn(t, a, "ip", "-o", "addr", "show", "dev", "eth0")
	for _, want := range []string{"10.213.200.2/24", "fd6e:7366:ad5:c800::2/64"} {
		if !strings.Contains(addrs, want) {
			t.Errorf("eth0 of pt-a lacks %s:\n%s", want, addrs)
		}
	}
	for _, p := range [][2]*Pod{{a, b}, {b, a}} {
		runIn(t, p[0], "ping", "-c", "2", "-i", "0.05", "-W", "2", p[1].IPv4.String())
		runIn(t, p[0], "ping", "-6", "-c", "2", "-i", "0.05", "-W", "2", p[1].IPv6.String())
	}

	// Two "containers" of pod a over its loopback: this process listens
	// inside the pod, a process started in the pod connects.
	var ln net.Listener
	if err := a.Do(func() (err error) { ln, err = net.Listen("tcp", "127.0.0.1:0"); return err }); err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	port := ln.Addr().(*net.TCPAddr).Port
	client := exec.Command("bash", "-c", fmt.Sprintf("echo hello-from-container >/dev/tcp/127.0.0.1/%d", port))
	if err := a.Start(client); err != nil {
		t.Fatal(err)
	}
	conn, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	line, _ := bufio.NewReader(conn).ReadString('\n')
	conn.Close()
	if err := client.Wait(); err != nil || line != "hello-from-container\n" {
		t.Errorf("loopback between containers: %q, %v", line, err)
	}
	// The host's own loopback is another namespace's: the port is not there.
	if c, err := net.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", port)); err == nil {
		c.Close()
		t.Errorf("pod loopback port %d reachable from the host namespace", port)
	}

	// State is private to root.
	for _, path := range []string{cfg.dir(), filepath.Join(cfg.dir(), "pt-a.json")} {
		fi, err := os.Stat(path)
		if err != nil {
			t.Fatal(err)
		}
		if want := os.FileMode(0o600); fi.IsDir() && fi.Mode().Perm() != 0o700 || !fi.IsDir() && fi.Mode().Perm() != want {
			t.Errorf("%s has mode %v", path, fi.Mode().Perm())
		}
	}
	pods, err := List(cfg)
	if err != nil || len(pods) != 2 || pods[0].Name != "pt-a" || pods[1].Name != "pt-b" {
		t.Errorf("List: %v %v", pods, err)
	}
	if got, err := Get(cfg, "pt-b"); err != nil || got.IPv4 != b.IPv4 {
		t.Errorf("Get: %+v %v", got, err)
	}
}

func TestCreateErrors(t *testing.T) {
	testenv.RequireRoot(t)
	cfg := testConfig(t)
	create(t, cfg, "pt-dup", Options{Subnet: subnetA})
	for _, tc := range []struct {
		name string
		opts Options
		want error
	}{
		{"pt-dup", Options{Subnet: subnetA}, ErrExists},
		{"", Options{}, ErrInvalidName},
		{"Upper", Options{}, ErrInvalidName},
		{"-dash", Options{}, ErrInvalidName},
		{"dash-", Options{}, ErrInvalidName},
		{"under_score", Options{}, ErrInvalidName},
		{"a/b", Options{}, ErrInvalidName},
		{strings.Repeat("x", 33), Options{}, ErrInvalidName},
		{"pt-e1", Options{Subnet: netip.MustParsePrefix("10.213.200.1/24")}, ErrInvalidSubnet},
		{"pt-e2", Options{Subnet: netip.MustParsePrefix("fd00::/64")}, ErrInvalidSubnet},
		{"pt-e3", Options{Subnet: netip.MustParsePrefix("10.213.200.0/31")}, ErrInvalidSubnet},
		{"pt-e4", Options{Subnet: netip.MustParsePrefix("10.0.0.0/8")}, ErrInvalidSubnet},
		{"pt-e5", Options{Subnet: netip.MustParsePrefix("127.0.0.0/24")}, ErrInvalidSubnet},
		{"pt-e6", Options{Subnet: netip.MustParsePrefix("10.213.200.0/25")}, ErrInvalidSubnet}, // overlaps subnetA
		{"pt-e7", Options{Subnet: subnetA, IP: netip.MustParseAddr("10.213.9.9")}, ErrInvalidIP},
		{"pt-e8", Options{Subnet: subnetA, IP: netip.MustParseAddr("10.213.200.1")}, ErrInvalidIP},
		{"pt-e9", Options{Subnet: subnetA, IP: netip.MustParseAddr("10.213.200.255")}, ErrInvalidIP},
		{"pt-e10", Options{Subnet: subnetA, IP: netip.MustParseAddr("10.213.200.2")}, ErrInvalidIP}, // taken by pt-dup
	} {
		names := []string{tc.name}
		if ValidateName(tc.name) != nil {
			names = nil
		}
		subnets := []netip.Prefix{subnetA}
		if tc.opts.Subnet.IsValid() && tc.opts.Subnet.Addr().Is4() {
			subnets = append(subnets, tc.opts.Subnet.Masked())
		}
		before := snapshot(t, cfg, names, subnets...)
		_, err := Create(cfg, tc.name, tc.opts)
		if !errors.Is(err, tc.want) {
			t.Errorf("Create(%q, %+v): %v, want %v", tc.name, tc.opts, err, tc.want)
		}
		if after := snapshot(t, cfg, names, subnets...); after != before {
			t.Errorf("Create(%q) failed but left something:\n%s\n%s", tc.name, before, after)
		}
	}

	// A /30 holds one pod (.2): the second finds the subnet exhausted.
	create(t, cfg, "pt-small", Options{Subnet: subnet4})
	if _, err := Create(cfg, "pt-small2", Options{Subnet: subnet4}); !errors.Is(err, ErrSubnetExhausted) {
		t.Errorf("second pod in a /30: %v, want ErrSubnetExhausted", err)
	}
}

// snapshot summarizes what Create could leave behind for the given pod
// names and subnets (other tests create pods at the same time, so only
// these are looked at).
func snapshot(t *testing.T, cfg Config, names []string, subnets ...netip.Prefix) string {
	t.Helper()
	var found []string
	for _, n := range names {
		if _, err := os.Lstat(filepath.Join(NetnsDir, n)); err == nil {
			found = append(found, "netns:"+n)
		}
		if linkExists(HostVethName(n)) {
			found = append(found, "veth:"+HostVethName(n))
		}
		if _, err := os.Stat(filepath.Join(cfg.dir(), n+".json")); err == nil {
			found = append(found, "state:"+n)
		}
	}
	for _, s := range subnets {
		if linkExists(BridgeName(s)) {
			found = append(found, "bridge:"+BridgeName(s))
		}
	}
	return fmt.Sprint(found)
}

// A failure at any step of Create undoes every step before it.
func TestCreateRollback(t *testing.T) {
	testenv.RequireRoot(t)
	cfg := testConfig(t)
	subnet := netip.MustParsePrefix("10.213.202.0/24")
	for _, step := range []string{"bridge", "netns", "veth", "pod network", "state"} {
		t.Run(step, func(t *testing.T) {
			names := []string{"pt-rollback"}
			before := snapshot(t, cfg, names, subnet)
			failStep = step
			_, err := Create(cfg, "pt-rollback", Options{Subnet: subnet})
			failStep = ""
			if err == nil || !strings.Contains(err.Error(), "injected failure") {
				t.Fatalf("Create: %v, want the injected failure", err)
			}
			if after := snapshot(t, cfg, names, subnet); after != before {
				t.Errorf("rollback after %q left:\nbefore %s\nafter  %s", step, before, after)
			}
			if linkExists(BridgeName(subnet)) || linkExists(HostVethName("pt-rollback")) {
				t.Errorf("bridge or veth left after failing at %q", step)
			}
		})
	}
}

func TestDelete(t *testing.T) {
	testenv.RequireRoot(t)
	cfg := testConfig(t)
	subnet := netip.MustParsePrefix("10.213.203.0/24")
	a := create(t, cfg, "pt-del-a", Options{Subnet: subnet})
	create(t, cfg, "pt-del-b", Options{Subnet: subnet})

	existed, err := Delete(cfg, a.Name)
	if err != nil || !existed {
		t.Fatalf("Delete: %v %v", existed, err)
	}
	if linkExists(a.HostVeth) {
		t.Error("host veth left")
	}
	if _, err := os.Stat(a.NetnsPath); !errors.Is(err, os.ErrNotExist) {
		t.Error("netns bind mount left")
	}
	if !linkExists(BridgeName(subnet)) {
		t.Error("bridge removed while pt-del-b still uses it")
	}
	if existed, err := Delete(cfg, a.Name); err != nil || existed {
		t.Errorf("second Delete: existed=%v err=%v, want false, nil", existed, err)
	}
	if _, err := Get(cfg, a.Name); !errors.Is(err, ErrNotFound) {
		t.Errorf("Get after delete: %v", err)
	}
	if _, err := Delete(cfg, "pt-del-b"); err != nil {
		t.Fatal(err)
	}
	if linkExists(BridgeName(subnet)) {
		t.Error("bridge left after its last pod")
	}
}
