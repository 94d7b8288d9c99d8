package main

import (
	"os"
	"strconv"
	"testing"

	"github.com/spf13/pflag"
)

// --netns.userns reaches the discovery configuration each command builds
// (serve and list through netnsFlags, trace and top through their
// selection); off by default. An explicit --netns pid:PID is observed
// whoever owns it: it is a target, not discovery.
func TestUsernsFlag(t *testing.T) {
	for _, args := range [][]string{nil, {"--netns.userns"}} {
		want := len(args) > 0
		var n netnsFlags
		fs := pflag.NewFlagSet("serve", pflag.ContinueOnError)
		n.register(fs)
		if err := fs.Parse(args); err != nil {
			t.Fatal(err)
		}
		dc, err := n.validate()
		if err != nil || dc.UserNamespaces != want {
			t.Errorf("netnsFlags %v: UserNamespaces %v (err %v), want %v", args, dc.UserNamespaces, err, want)
		}
		for _, sel := range [][]string{nil, {"--all"}, {"--netns", "web-*"}} {
			var s selectFlags
			fs = pflag.NewFlagSet("trace", pflag.ContinueOnError)
			s.register(fs)
			if err := fs.Parse(append(sel, args...)); err != nil {
				t.Fatal(err)
			}
			got, err := s.validate()
			if err != nil || got.discovery == nil || got.discovery.UserNamespaces != want {
				t.Errorf("selectFlags %v: discovery %+v (err %v), want UserNamespaces %v", append(sel, args...), got.discovery, err, want)
			}
		}
	}
	// pid:PID alone is a target, opened as given: no discovery, so no
	// user-namespace rule applies to it.
	var s selectFlags
	fs := pflag.NewFlagSet("trace", pflag.ContinueOnError)
	s.register(fs)
	if err := fs.Parse([]string{"--netns", "pid:" + strconv.Itoa(os.Getpid())}); err != nil {
		t.Fatal(err)
	}
	got, err := s.validate()
	if err != nil || got.discovery != nil || len(got.targets) != 1 {
		t.Errorf("--netns pid:%d: targets %+v, discovery %+v (err %v), want one target and no discovery", os.Getpid(), got.targets, got.discovery, err)
	}
}
