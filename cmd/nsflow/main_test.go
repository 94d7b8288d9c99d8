package main

import (
	"context"
	"path"
	"strings"
	"testing"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"
)

// run executes the command line with every command's RunE replaced, so
// that only parsing and validation (cobra's and PreRunE) happen: no root,
// no BPF, no namespace is touched. It returns the exit status and message.
func run(t *testing.T, args ...string) (int, string) {
	t.Helper()
	root := newRootCmd()
	var walk func(*cobra.Command)
	walk = func(c *cobra.Command) {
		if c.RunE != nil {
			c.RunE = func(*cobra.Command, []string) error { return nil }
		}
		for _, sub := range c.Commands() {
			walk(sub)
		}
	}
	walk(root)
	root.SetArgs(args)
	var out strings.Builder
	root.SetOut(&out)
	root.SetErr(&out)
	err := root.ExecuteContext(context.Background())
	msg := ""
	if err != nil {
		msg = err.Error()
	}
	return exitStatus(err), msg
}

// Every command's validation: the exit status (0 valid, 2 usage error) and
// a word of the message that names the problem.
func TestValidation(t *testing.T) {
	for _, tc := range []struct {
		args []string
		code int
		want string
	}{
		// trace and top: selection
		{[]string{"trace"}, 0, ""}, // no selection: every namespace
		{[]string{"top"}, 0, ""},
		{[]string{"trace", "--all"}, 0, ""},
		{[]string{"trace", "--netns", "host"}, 0, ""},
		{[]string{"trace", "--netns", "web-[ab]"}, 0, ""},
		{[]string{"trace", "--netns", "web-*", "--exclude", "web-[!x]"}, 0, ""},
		{[]string{"trace", "--exclude", "cni-*"}, 0, ""},
		{[]string{"trace", "--netns", "nsflow-unit-does-not-exist"}, 2, "not found"},
		{[]string{"trace", "--netns", "pid:abc"}, 2, "pid:PID"},
		{[]string{"trace", "--netns", "pid:999999999"}, 2, "not found"},
		{[]string{"trace", "--netns", "/etc/hostname"}, 2, "namespace"},
		{[]string{"trace", "--netns", "a/b"}, 2, "not a valid ip netns name"},
		{[]string{"trace", "--netns", "web-["}, 2, "bad pattern"},
		{[]string{"trace", "--netns", "web-[z-a]"}, 2, "empty"},
		{[]string{"trace", "--netns", "host", "--exclude", "x"}, 2, "--exclude applies"},
		{[]string{"trace", "--all", "--exclude", "["}, 2, "bad pattern"},
		{[]string{"top", "--exclude", "web-[b-"}, 2, "bad pattern"},
		// trace: output
		{[]string{"trace", "--output", "json"}, 0, ""},
		{[]string{"trace", "--output", "jsonl", "--interval", "1s", "--events"}, 0, ""},
		{[]string{"trace", "--output", "xml"}, 2, "--output"},
		{[]string{"trace", "--output", "json", "--interval", "1s"}, 2, "jsonl"},
		{[]string{"trace", "--output", "json", "--events"}, 2, "jsonl"},
		{[]string{"trace", "--duration", "-1s"}, 2, "--duration"},
		{[]string{"trace", "--interval", "-1s"}, 2, "--interval"},
		{[]string{"trace", "--duration", "soon"}, 2, "invalid argument"},
		{[]string{"trace", "--top", "-5"}, 2, "--top"},
		{[]string{"trace", "--top", "0"}, 0, ""},
		{[]string{"trace", "--sort", "packets"}, 0, ""},
		{[]string{"trace", "--sort", "flows"}, 2, "--sort"},
		// trace and top: containers (issue 15)
		{[]string{"trace", "--containers"}, 0, ""},
		{[]string{"trace", "--aggregate-by", "container"}, 0, ""},
		{[]string{"trace", "--aggregate-by", "pod", "-o", "json"}, 0, ""},
		{[]string{"trace", "--aggregate-by", "netns"}, 0, ""},
		{[]string{"trace", "--aggregate-by", "cgroup"}, 2, "--aggregate-by"},
		{[]string{"top", "--aggregate-by", "container", "--containers"}, 0, ""},
		{[]string{"top", "--aggregate-by", "5tuple"}, 2, "--aggregate-by"},
		{[]string{"trace", "--containers=false"}, 0, ""},
		{[]string{"trace", "--containers=false", "--aggregate-by", "netns"}, 0, ""},
		{[]string{"trace", "--containers=false", "--aggregate-by", "container"}, 2, "needs --containers"},
		{[]string{"top", "--containers=false", "--aggregate-by", "pod"}, 2, "needs --containers"},
		// trace and top: filter
		{[]string{"trace", "tcp", "port", "80"}, 0, ""},
		{[]string{"trace", "--filter", "udp"}, 0, ""},
		{[]string{"trace", "--filter", "tcp", "udp"}, 2, "not both"},
		{[]string{"trace", "extra-arg"}, 2, "unknown primitive"},
		{[]string{"trace", "port", "99999"}, 2, "port wants"},
		{[]string{"top", "--filter", "tcp", "udp"}, 2, "not both"},
		{[]string{"top", "udp", "or"}, 2, ""},
		// trace, top, serve: attach and runtime
		{[]string{"trace", "--attach-mode", "clsact"}, 0, ""},
		{[]string{"trace", "--attach-mode", "xdp"}, 2, "attach mode"},
		{[]string{"top", "--attach-mode", "xdp"}, 2, "attach mode"},
		{[]string{"serve", "--attach-mode", "xdp"}, 2, "attach mode"},
		{[]string{"trace", "--max-hooks", "65537"}, 2, "--max-hooks"},
		{[]string{"serve", "--max-hooks", "65537"}, 2, "--max-hooks"},
		{[]string{"top", "--max-hooks", "70000"}, 2, "--max-hooks"},
		{[]string{"serve", "--max-interfaces", "0"}, 2, "--max-interfaces"},
		{[]string{"trace", "--max-interfaces", "-1"}, 2, "--max-interfaces"},
		{[]string{"top", "--max-interfaces", "x"}, 2, "max-interfaces"},
		{[]string{"trace", "--cri.endpoint", "containerd"}, 2, "--cri.endpoint"},
		{[]string{"top", "--cri.endpoint", "containerd"}, 2, "--cri.endpoint"},
		{[]string{"list", "--cri.endpoint", "containerd"}, 2, "--cri.endpoint"},
		{[]string{"serve", "--cri.endpoint", "tcp://x:1"}, 2, "--cri.endpoint"},
		{[]string{"trace", "--cri.endpoint", "none"}, 0, ""},
		{[]string{"serve", "--cri.endpoint", "unix:///run/containerd/containerd.sock"}, 0, ""},
		{[]string{"serve", "--cri.interval", "0s"}, 2, "--cri.interval"},
		{[]string{"trace", "--cri.interval", "1s"}, 2, "unknown flag"},
		// top
		{[]string{"top", "--interval", "10ms"}, 2, "--interval"},
		{[]string{"top", "--output", "json"}, 2, "unknown flag"},
		// serve
		{[]string{"serve"}, 0, ""},
		{[]string{"serve", "--containers"}, 0, ""},
		{[]string{"serve", "--containers", "--containers.max-series", "0"}, 0, ""},
		{[]string{"serve", "--containers.max-series", "-1"}, 2, "--containers.max-series"},
		{[]string{"serve", "--flows", "--flows.max-series", "0"}, 0, ""},
		// host ends of veths whose peer is observed (issue 17)
		{[]string{"serve", "--netns.host-veths"}, 0, ""},
		{[]string{"serve", "--netns.host-veths=false", "--netns.host=false"}, 0, ""},
		{[]string{"serve", "--netns.host-veths=both"}, 2, "invalid argument"},
		{[]string{"list", "--netns.host-veths"}, 0, ""},
		{[]string{"trace", "--netns.host-veths"}, 0, ""},
		{[]string{"trace", "--netns", "host", "--netns.host-veths"}, 0, ""},
		{[]string{"top", "--all", "--netns.host-veths=true"}, 0, ""},
		{[]string{"top", "--netns.host-veths=yes"}, 2, "invalid argument"},
		{[]string{"serve", "--netns.userns"}, 0, ""},
		{[]string{"list", "--netns.userns"}, 0, ""},
		{[]string{"trace", "--netns.userns"}, 0, ""},
		{[]string{"top", "--all", "--netns.userns=true"}, 0, ""},
		{[]string{"serve", "--netns.userns=all"}, 2, "invalid argument"},
		{[]string{"serve", "--log.level", "loud"}, 2, "--log.level"},
		{[]string{"serve", "--log.level", "debug"}, 0, ""},
		{[]string{"serve", "--web.telemetry-path", "metrics"}, 2, "--web.telemetry-path"},
		{[]string{"serve", "--web.telemetry-path", "/"}, 2, "--web.telemetry-path"},
		{[]string{"serve", "--web.config.file", "/nonexistent/web.yml"}, 2, "--web.config.file"},
		{[]string{"serve", "--netns.include", "("}, 2, "--netns.include"},
		{[]string{"serve", "--netns.exclude", "^cni-"}, 0, ""},
		{[]string{"serve", "--flows.max-series", "-1"}, 2, "--flows.max-series"},
		{[]string{"serve", "--netns.resync-interval", "0s"}, 2, "resync-interval"},
		{[]string{"serve", "--netns.grace-period", "-1s"}, 2, "grace-period"},
		{[]string{"serve", "--netns.grace-period", "0s"}, 0, ""},
		{[]string{"serve", "extra"}, 2, "unknown command"},
		{[]string{"serve", "--pin", "--pin.path", "/tmp/x"}, 2, "--pin.path"},
		{[]string{"serve", "--pin", "--pin.path", "/sys/fs/bpf/x"}, 0, ""},
		{[]string{"serve", "--web.max-requests", "0"}, 0, ""},
		{[]string{"serve", "--web.max-requests", "-1"}, 2, "--web.max-requests"},
		{[]string{"serve", "--web.scrape-timeout", "-1s"}, 2, "--web.scrape-timeout"},
		{[]string{"serve", "--web.scrape-timeout", "0s"}, 0, ""},
		// list
		{[]string{"list"}, 0, ""},
		{[]string{"list", "-o", "yaml"}, 2, "--output"},
		{[]string{"list", "--netns.exclude", "["}, 2, "--netns.exclude"},
		// pod
		{[]string{"pod", "create", "web"}, 0, ""},
		{[]string{"pod", "create", "Bad_Name"}, 2, "invalid pod name"},
		{[]string{"pod", "create"}, 2, "accepts 1 arg"},
		{[]string{"pod", "create", "x", "--subnet", "10.0.0.0/8"}, 2, "between /16 and /30"},
		{[]string{"pod", "create", "x", "--subnet", "10.213.5.1/24"}, 2, "network address"},
		{[]string{"pod", "create", "x", "--subnet", "fd00::/64"}, 2, "IPv4 only"},
		{[]string{"pod", "create", "x", "--subnet", "nonsense"}, 2, "not a CIDR"},
		{[]string{"pod", "create", "x", "--ip", "nonsense"}, 2, "not an IP"},
		{[]string{"pod", "delete", "Bad_Name"}, 2, "invalid pod name"},
		{[]string{"pod", "delete"}, 2, "requires at least 1"},
		{[]string{"pod", "exec", "web"}, 2, "requires at least 2"},
		{[]string{"pod", "exec", "web", "true"}, 2, "usage"},
		{[]string{"pod", "exec", "Bad_Name", "--", "true"}, 2, "invalid pod name"},
		{[]string{"pod", "exec", "web", "--container", "sidecar", "--", "true"}, 0, ""},
		{[]string{"pod", "exec", "web", "--container", "Bad_C", "--", "true"}, 2, "invalid container name"},
		{[]string{"pod", "exec", "web", "--container", "", "--", "true"}, 2, "invalid container name"},
		{[]string{"pod", "list", "-o", "xml"}, 2, "--output"},
		// the root
		{[]string{"frobnicate"}, 2, "unknown command"},
		{[]string{"trace", "--bogus"}, 2, "unknown flag"},
	} {
		t.Run(strings.Join(tc.args, "_"), func(t *testing.T) {
			code, msg := run(t, tc.args...)
			if code != tc.code {
				t.Fatalf("exit status %d, want %d (%s)", code, tc.code, msg)
			}
			if !strings.Contains(msg, tc.want) {
				t.Errorf("message %q does not mention %q", msg, tc.want)
			}
		})
	}
}

// The selection a trace resolves to: names, patterns and the default.
func TestSelection(t *testing.T) {
	for _, tc := range []struct {
		netns, exclude []string
		all            bool
		host           bool // discovery observes the host
		match, skip    []string
		noDiscovery    bool
	}{
		{all: false, host: true, match: []string{"web", "host", "pid:1"}},
		{all: true, host: true, match: []string{"web"}},
		{exclude: []string{"cni-*"}, host: true, match: []string{"web"}, skip: []string{"cni-1"}},
		{netns: []string{"x-[ab]"}, match: []string{"x-a", "x-b"}, skip: []string{"x-c", "x-ab", "x-", "y-a"}},
		{netns: []string{"x-[^ab]"}, match: []string{"x-c"}, skip: []string{"x-a", "x-b"}},
		{netns: []string{"x-?"}, match: []string{"x-1"}, skip: []string{"x-12"}},
		{netns: []string{`x-\*`}, match: []string{"x-*"}, skip: []string{"x-a"}},
		{netns: []string{"web-*"}, exclude: []string{"web-[0-4]"}, match: []string{"web-5", "web-a"}, skip: []string{"web-3"}},
		{netns: []string{"host"}, noDiscovery: true},
	} {
		s := selectFlags{netns: tc.netns, exclude: tc.exclude, all: tc.all}
		sel, err := s.validate()
		if err != nil {
			t.Fatalf("%+v: %v", tc, err)
		}
		if tc.noDiscovery {
			if sel.discovery != nil {
				t.Errorf("%+v: discovery without patterns", tc)
			}
			continue
		}
		d := sel.discovery
		if d == nil {
			t.Fatalf("%+v: no discovery", tc)
		}
		if d.Host != tc.host {
			t.Errorf("%+v: host %v, want %v", tc, d.Host, tc.host)
		}
		selected := func(name string) bool {
			return (d.Include == nil || d.Include.MatchString(name)) && (d.Exclude == nil || !d.Exclude.MatchString(name))
		}
		for _, n := range tc.match {
			if !selected(n) {
				t.Errorf("%+v: %q not selected", tc, n)
			}
		}
		for _, n := range tc.skip {
			if selected(n) {
				t.Errorf("%+v: %q selected", tc, n)
			}
		}
	}
}

// globsRegexp means what path.Match means, on patterns and names made of
// the characters that matter.
func TestGlobMatchesPathMatch(t *testing.T) {
	alphabet := []string{"a", "b", "-", "*", "?", "[", "]", "^", `\`, "x"}
	names := []string{"", "a", "b", "ab", "ba", "a-b", "x", "*", "[", "]", "^", `\`, "-", "aa", "abx", "a*", "xa"}
	var gen func(prefix string, n int)
	checked := 0
	gen = func(prefix string, n int) {
		if n == 0 {
			_, perr := path.Match(prefix, "")
			re, err := globsRegexp([]string{prefix})
			if perr != nil {
				if err == nil {
					t.Errorf("pattern %q: path.Match refuses it (%v), globsRegexp accepts it", prefix, perr)
				}
				return
			}
			if err != nil {
				// Only reversed ranges are refused beyond path.Match.
				if !strings.Contains(err.Error(), "empty") {
					t.Errorf("pattern %q: %v", prefix, err)
				}
				return
			}
			for _, name := range names {
				want, _ := path.Match(prefix, name)
				if got := re.MatchString(name); got != want {
					t.Errorf("pattern %q on %q: regexp %v, path.Match %v", prefix, name, got, want)
				}
			}
			checked++
			return
		}
		for _, c := range alphabet {
			gen(prefix+c, n-1)
		}
	}
	for n := 1; n <= 4; n++ {
		gen("", n)
	}
	if checked < 1000 {
		t.Fatalf("only %d valid patterns checked", checked)
	}
}

// --netns.host-veths reaches the configuration each command builds: the
// discovery config (serve, list: serve passes it to the collector) and
// trace/top's selection; off by default.
func TestHostVethsFlag(t *testing.T) {
	for _, args := range [][]string{nil, {"--netns.host-veths"}} {
		want := len(args) > 0
		var n netnsFlags
		fs := pflag.NewFlagSet("serve", pflag.ContinueOnError)
		n.register(fs)
		if err := fs.Parse(args); err != nil {
			t.Fatal(err)
		}
		dc, err := n.validate()
		if err != nil || dc.HostVeths != want {
			t.Errorf("netnsFlags %v: HostVeths %v (err %v), want %v", args, dc.HostVeths, err, want)
		}
		var s selectFlags
		fs = pflag.NewFlagSet("trace", pflag.ContinueOnError)
		s.register(fs)
		if err := fs.Parse(args); err != nil {
			t.Fatal(err)
		}
		sel, err := s.validate()
		if err != nil || sel.hostVeths != want {
			t.Errorf("selectFlags %v: hostVeths %v (err %v), want %v", args, sel.hostVeths, err, want)
		}
	}
}
