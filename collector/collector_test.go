package collector_test

import (
	"errors"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/nsflow/nsflow/collector"
	"github.com/nsflow/nsflow/collector/attach"
	"github.com/nsflow/nsflow/collector/flow"
	"github.com/nsflow/nsflow/test/podns"
	"github.com/nsflow/nsflow/test/testenv"
)

func TestParseTarget(t *testing.T) {
	dir := t.TempDir()
	plain := filepath.Join(dir, "plain")
	if err := os.WriteFile(plain, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		sel  string
		name string
		err  error
	}{
		{"", "", collector.ErrBadSelector},
		{"pid:", "", collector.ErrBadSelector},
		{"pid:-3", "", collector.ErrBadSelector},
		{"pid:x", "", collector.ErrBadSelector},
		{"pid:999999999", "", collector.ErrNamespaceNotFound},
		{"a/b", "", collector.ErrBadSelector},
		{"..", "", collector.ErrBadSelector},
		{"no-such-netns-here", "", collector.ErrNamespaceNotFound},
		{filepath.Join(dir, "missing"), "", collector.ErrNamespaceNotFound},
		{"pid:" + strconv.Itoa(os.Getpid()), "pid:" + strconv.Itoa(os.Getpid()), nil},
		{"/proc/self/ns/net", "/proc/self/ns/net", nil},
		{"host", "host", nil},
	} {
		t.Run(tc.sel, func(t *testing.T) {
			tg, err := collector.ParseTarget(tc.sel)
			if tc.err != nil {
				if !errors.Is(err, tc.err) {
					t.Fatalf("error %v, want %v", err, tc.err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if tg.Name != tc.name {
				t.Errorf("name %q, want %q", tg.Name, tc.name)
			}
		})
	}
	if _, err := collector.ParseTarget(plain); !errors.Is(err, collector.ErrBadSelector) {
		t.Errorf("plain file: %v, want ErrBadSelector", err)
	}
}

// waitFor polls a condition on the collector's own state (no sleeping for
// the kernel): the attach happens on a netlink event, asynchronously.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(time.Millisecond)
	}
}

func ifaceState(c *collector.Collector, name string) flow.AttachState {
	for _, ns := range c.Interfaces() {
		for _, i := range ns.Interfaces {
			if i.Name == name {
				return i.State
			}
		}
	}
	return ""
}

// An interface that appears after the namespace is observed (as when a CNI
// plugin moves a veth in) is attached on its netlink event, and released
// when it goes.
func TestFollowsInterfaces(t *testing.T) {
	testenv.RequireRoot(t)
	for _, mode := range []attach.Mode{attach.ModeTCX, attach.ModeClsact} {
		t.Run(string(mode), func(t *testing.T) {
			name := "col-follow-" + string(mode)
			p, err := podns.Create(podns.Config{}, name, podns.Options{Subnet: netip.MustParsePrefix("10.213.110.0/24")})
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { podns.Delete(podns.Config{}, name) })
			c, err := collector.New(collector.Config{Mode: mode})
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { c.Close() })
			if _, err := c.Add(collector.Target{Name: name, Path: p.NetnsPath}); err != nil {
				t.Fatal(err)
			}
			if s := ifaceState(c, "eth0"); s != flow.StateAttached {
				t.Fatalf("eth0 %q after Add", s)
			}

			nl, err := p.Netlink()
			if err != nil {
				t.Fatal(err)
			}
			defer nl.Close()
			start := time.Now()
			veth := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "late0"}, PeerName: "late1"}
			if err := nl.LinkAdd(veth); err != nil {
				t.Fatal(err)
			}
			waitFor(t, "late0 and late1 attached", func() bool {
				return ifaceState(c, "late0") == flow.StateAttached && ifaceState(c, "late1") == flow.StateAttached
			})
			t.Logf("%s: new interfaces attached %v after creation", mode, time.Since(start))

			if err := nl.LinkDel(veth); err != nil {
				t.Fatal(err)
			}
			waitFor(t, "late0 detached", func() bool { return ifaceState(c, "late0") == flow.StateDetached })
			if s := ifaceState(c, "eth0"); s != flow.StateAttached {
				t.Errorf("eth0 %q after an unrelated interface went", s)
			}
		})
	}
}

// Selectors come from the command line: no input panics, and every error
// is one of the documented kinds or an OS error about the path.
func FuzzParseTarget(f *testing.F) {
	for _, s := range []string{"host", "pid:1", "pid:", "/proc/self/ns/net", "web", "a/b", "..", "pid:-1", "./x"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, sel string) {
		tg, err := collector.ParseTarget(sel)
		if err == nil && (tg.Path == "" || tg.Name == "") {
			t.Fatalf("%q: accepted without a path or name: %+v", sel, tg)
		}
	})
}
