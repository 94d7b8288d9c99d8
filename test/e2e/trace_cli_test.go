package e2e

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"

	"github.com/nsflow/nsflow/exporter/report"
	"github.com/nsflow/nsflow/test/podns"
	"github.com/nsflow/nsflow/test/testenv"
)

// hookPrograms counts the programs on the pod's hooks, as the kernel reports
// them: TCX programs (BPF_PROG_QUERY) and cls_bpf filters on clsact (auto
// attaches pods with clsact, attach.Mode.For): an oracle independent of
// nsflow's own bookkeeping.
func hookPrograms(t *testing.T, p *podns.Pod) int {
	t.Helper()
	n := 0
	err := p.Do(func() error {
		ifs, err := net.Interfaces()
		if err != nil {
			return err
		}
		for _, i := range ifs {
			for _, at := range []ebpf.AttachType{ebpf.AttachTCXIngress, ebpf.AttachTCXEgress} {
				r, err := link.QueryPrograms(link.QueryOptions{Target: i.Index, Attach: at})
				if err != nil {
					return err
				}
				n += len(r.Programs)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatalf("query tcx programs in %s: %v", p.Name, err)
	}
	for _, c := range bpfFilters(t, p.NetnsPath) {
		n += c
	}
	return n
}

func TestTraceCLI(t *testing.T) {
	testenv.RequireRoot(t)
	pods := newPods(t, "10.213.101.0/24", "e2e-tc-a", "e2e-tc-b")
	a, b := pods[0], pods[1]

	for _, mode := range []string{"tcx", "clsact"} {
		t.Run(mode, func(t *testing.T) {
			// a by name, b by path: two of the selector forms.
			cmd := exec.Command(nsflowBin, "trace", "--netns", a.Name, "--netns", b.NetnsPath,
				"--output", "json", "--verbose", "--attach-mode", mode)
			var stdout bytes.Buffer
			cmd.Stdout = &stdout
			stderr, err := cmd.StderrPipe()
			if err != nil {
				t.Fatal(err)
			}
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
			// Wait until both namespaces are observed (a condition, not a sleep).
			lines := bufio.NewScanner(stderr)
			observed := 0
			var log strings.Builder
			for observed < 2 && lines.Scan() {
				log.WriteString(lines.Text() + "\n")
				if strings.Contains(lines.Text(), "observing netns") {
					observed++
				}
			}
			if observed < 2 {
				t.Fatalf("trace did not attach:\n%s", log.String())
			}
			go func() {
				for lines.Scan() {
				}
			}()
			if mode == "tcx" {
				if n := hookPrograms(t, a); n != 4 { // lo and eth0, ingress and egress
					t.Fatalf("pod a has %d programs on its hooks while tracing, want 4", n)
				}
			}

			run(t, a, exec.Command("ping", "-c", "4", "-i", "0.05", "-W", "2", b.IPv4.String()))

			// SIGTERM ends the trace: it prints its result and detaches.
			if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
				t.Fatal(err)
			}
			done := make(chan error, 1)
			go func() { done <- cmd.Wait() }()
			select {
			case err := <-done:
				if err != nil {
					t.Fatalf("trace exited with %v\n%s", err, log.String())
				}
			case <-time.After(10 * time.Second):
				t.Fatal("trace did not exit on SIGTERM")
			}

			var tr report.Trace
			if err := json.Unmarshal(stdout.Bytes(), &tr); err != nil {
				t.Fatalf("trace output is not JSON: %v\n%s", err, stdout.String())
			}
			if tr.AttachMode != mode {
				t.Errorf("attach_mode %q, want %q", tr.AttachMode, mode)
			}
			if len(tr.Namespaces) != 2 {
				t.Fatalf("%d namespaces in trace, want 2: %+v", len(tr.Namespaces), tr.Namespaces)
			}
			for _, p := range []*podns.Pod{a, b} {
				var st unix.Stat_t
				if err := unix.Stat(p.NetnsPath, &st); err != nil {
					t.Fatal(err)
				}
				var ns *report.Namespace
				for i := range tr.Namespaces {
					if tr.Namespaces[i].Name == p.Name {
						ns = &tr.Namespaces[i]
					}
				}
				if ns == nil || ns.Inode != st.Ino {
					t.Fatalf("namespace %s (inode %d) missing or wrong: %+v", p.Name, st.Ino, tr.Namespaces)
				}
				names := map[string]report.Interface{}
				for _, i := range ns.Interfaces {
					names[i.Name] = i
				}
				if _, ok := names["lo"]; !ok {
					t.Errorf("%s: lo missing from %+v", p.Name, ns.Interfaces)
				}
				if e := names["eth0"]; e.TXPackets < 4 || e.RXPackets < 4 {
					t.Errorf("%s eth0: %+v, want at least the 4 pings each way", p.Name, e)
				}
			}
			count := func(netns, iface, dir, proto string, src, dst netip.Addr, typ uint16) uint64 {
				for _, f := range tr.Flows {
					if f.Netns == netns && f.Interface == iface && f.Direction == dir && f.Protocol == proto &&
						f.Src == src && f.Dst == dst && f.SrcPort == typ {
						return f.Packets
					}
				}
				return 0
			}
			if n := count(a.Name, "eth0", "tx", "icmp", a.IPv4, b.IPv4, 8); n != 4 {
				t.Errorf("echo requests leaving a: %d, want 4", n)
			}
			if n := count(b.Name, "eth0", "rx", "icmp", a.IPv4, b.IPv4, 8); n != 4 {
				t.Errorf("echo requests reaching b: %d, want 4", n)
			}
			if n := count(a.Name, "eth0", "rx", "icmp", b.IPv4, a.IPv4, 0); n != 4 {
				t.Errorf("echo replies reaching a: %d, want 4", n)
			}
			// Nothing is left attached.
			if n := hookPrograms(t, a) + hookPrograms(t, b); n != 0 {
				t.Errorf("%d programs left on the hooks after trace exited", n)
			}
			assertNoClsact(t, a)
			assertNoClsact(t, b)
		})
	}
}

// Bad input to every subcommand: a message naming the problem, exit
// status 2 (usage) or 1 (a runtime failure), and nothing left behind.
func TestCLIBadInput(t *testing.T) {
	testenv.RequireRoot(t)
	before := leftovers(t)
	for _, tc := range []struct {
		args []string
		want string
		code int
	}{
		{[]string{"trace", "--netns", "e2e-does-not-exist"}, "not found", 2},
		{[]string{"trace", "--netns", "pid:abc"}, "pid:PID", 2},
		{[]string{"trace", "--netns", "pid:999999999"}, "not found", 2},
		{[]string{"trace", "--netns", "/etc/hostname"}, "namespace", 2},
		{[]string{"trace", "--netns", "host", "--output", "xml"}, "--output", 2},
		{[]string{"trace", "--netns", "host", "--duration", "-1s"}, "--duration", 2},
		{[]string{"trace", "--netns", "host", "--duration", "soon"}, "invalid argument", 2},
		{[]string{"trace", "--netns", "host", "--attach-mode", "xdp"}, "attach mode", 2},
		{[]string{"trace", "--netns", "host", "--top", "-5"}, "--top", 2},
		{[]string{"trace", "--netns", "host", "--max-hooks", "65537"}, "--max-hooks", 2},
		{[]string{"trace", "--bogus"}, "unknown flag", 2},
		{[]string{"trace", "extra-arg", "--netns", "host"}, "unknown primitive", 2},
		{[]string{"trace", "--netns", "host", "--filter", "tcp", "udp"}, "not both", 2},
		{[]string{"trace", "--netns", "host", "port", "99999"}, "port wants", 2},
		{[]string{"trace", "--netns", "host", "--sort", "flows"}, "--sort", 2},
		{[]string{"trace", "--netns", "web-[", "tcp"}, "bad pattern", 2},
		{[]string{"trace", "--netns", "host", "--output", "json", "--interval", "1s"}, "jsonl", 2},
		{[]string{"frobnicate"}, "unknown command", 2},
		{[]string{"serve", "--attach-mode", "xdp"}, "attach mode", 2},
		{[]string{"serve", "--log.level", "loud"}, "--log.level", 2},
		{[]string{"serve", "--web.telemetry-path", "metrics"}, "--web.telemetry-path", 2},
		{[]string{"serve", "--web.config.file", "/nonexistent/web.yml"}, "--web.config.file", 2},
		{[]string{"serve", "--netns.include", "("}, "--netns.include", 2},
		{[]string{"serve", "--flows.max-series", "-1"}, "--flows.max-series", 2},
		{[]string{"serve", "--netns.resync-interval", "0s"}, "resync-interval", 2},
		{[]string{"serve", "extra"}, "unknown command", 2},
		{[]string{"serve", "--cri.endpoint", "tcp://x:1"}, "--cri.endpoint", 2},
		{[]string{"serve", "--cri.interval", "0s"}, "--cri.interval", 2},
		{[]string{"serve", "--pin", "--pin.path", "/tmp/x"}, "--pin.path", 2},
		{[]string{"trace", "--netns", "host", "--cri.endpoint", "containerd"}, "--cri.endpoint", 2},
		{[]string{"trace", "--netns", "host", "--exclude", "x"}, "--exclude applies", 2},
		{[]string{"trace", "--all", "--exclude", "["}, "bad pattern", 2},
		{[]string{"list", "-o", "yaml"}, "--output", 2},
		{[]string{"list", "--netns.exclude", "["}, "--netns.exclude", 2},
		{[]string{"pod", "create", "Bad_Name"}, "invalid pod name", 2},
		{[]string{"pod", "create"}, "accepts 1 arg", 2},
		{[]string{"pod", "create", "e2e-bad", "--subnet", "10.0.0.0/8"}, "between /16 and /30", 2},
		{[]string{"pod", "create", "e2e-bad", "--subnet", "10.213.5.1/24"}, "network address", 2},
		{[]string{"pod", "create", "e2e-bad", "--subnet", "fd00::/64"}, "IPv4 only", 2},
		{[]string{"pod", "create", "e2e-bad", "--subnet", "nonsense"}, "not a CIDR", 2},
		{[]string{"pod", "create", "e2e-bad", "--ip", "nonsense"}, "not an IP", 2},
		{[]string{"pod", "create", "e2e-bad", "--subnet", "10.213.230.0/24", "--ip", "10.213.231.5"}, "not in subnet", 2},
		{[]string{"pod", "create", "e2e-bad", "--subnet", "10.213.230.0/24", "--ip", "10.213.230.1"}, "reserved", 2},
		{[]string{"pod", "create", "e2e-bad", "--subnet", "127.0.0.0/24"}, "overlaps", 2},
		{[]string{"pod", "delete", "Bad_Name"}, "invalid pod name", 2},
		{[]string{"pod", "exec", "e2e-no-such-pod", "--", "true"}, "pod not found", 1},
		{[]string{"pod", "exec", "e2e-no-such-pod"}, "requires at least 2", 2},
		{[]string{"pod", "list", "-o", "xml"}, "--output", 2},
	} {
		if tc.code == 0 {
			tc.code = 2
		}
		t.Run(strings.Join(tc.args, "_"), func(t *testing.T) {
			// Bounded: a case that is accepted by mistake would trace until
			// interrupted.
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			out, err := exec.CommandContext(ctx, nsflowBin, tc.args...).CombinedOutput()
			var ee *exec.ExitError
			if !errors.As(err, &ee) || ee.ExitCode() != tc.code {
				t.Fatalf("exit %v, want status %d\n%s", err, tc.code, out)
			}
			if !strings.Contains(string(out), tc.want) {
				t.Errorf("message %q does not mention %q", out, tc.want)
			}
		})
	}
	if after := leftovers(t); after != before {
		t.Errorf("bad input left something behind:\nbefore: %s\nafter:  %s", before, after)
	}
}

// leftovers summarizes what a failed `pod create e2e-bad` could leave
// behind: its namespace, host veth, state file, and the bridges of the
// subnets the cases name (other tests' pods are not looked at).
func leftovers(t *testing.T) string {
	t.Helper()
	var found []string
	if _, err := os.Lstat("/run/netns/e2e-bad"); err == nil {
		found = append(found, "netns")
	}
	if _, err := os.Stat("/run/nsflow/pods/e2e-bad.json"); err == nil {
		found = append(found, "state")
	}
	for _, l := range []string{podns.HostVethName("e2e-bad"), podns.BridgeName(netip.MustParsePrefix("10.213.230.0/24")),
		podns.BridgeName(netip.MustParsePrefix("127.0.0.0/24"))} {
		if _, err := net.InterfaceByName(l); err == nil {
			found = append(found, "link:"+l)
		}
	}
	return fmt.Sprint(found)
}
