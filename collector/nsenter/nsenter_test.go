package nsenter

import (
	"errors"
	"os"
	"runtime"
	"testing"

	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/nsflow/nsflow/test/testenv"
)

func threadNetns(t *testing.T) string {
	t.Helper()
	l, err := os.Readlink("/proc/thread-self/ns/net")
	if err != nil {
		t.Fatal(err)
	}
	return l
}

// Run enters a new namespace on its own thread only: the caller's thread
// and the process keep theirs, and errors from fn come back.
func TestRun(t *testing.T) {
	testenv.RequireRoot(t)
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	before := threadNetns(t)
	var inside string
	var ns netns.NsHandle
	boom := errors.New("boom")
	err := Run(func() error { return unix.Unshare(unix.CLONE_NEWNET) }, func() error {
		inside = threadNetns(t)
		var err error
		ns, err = netns.Get()
		if err != nil {
			return err
		}
		return boom
	})
	if !errors.Is(err, boom) {
		t.Fatalf("Run: %v, want fn's error", err)
	}
	defer ns.Close()
	if inside == before {
		t.Fatal("fn ran in the caller's namespace")
	}
	if threadNetns(t) != before {
		t.Fatal("the caller's thread changed namespace")
	}
	// NewNetns makes another one, held by its handle, without entering it.
	other, err := NewNetns()
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	var in string
	if err := Do(other, func() error { in = threadNetns(t); return nil }); err != nil {
		t.Fatal(err)
	}
	if in == before || in == inside || threadNetns(t) != before {
		t.Errorf("NewNetns: %s, want a namespace other than %s and %s, the caller's thread unchanged", in, before, inside)
	}
	// Do enters an existing namespace.
	var again string
	if err := Do(ns, func() error { again = threadNetns(t); return nil }); err != nil {
		t.Fatal(err)
	}
	if again != inside {
		t.Errorf("Do ran in %s, want %s", again, inside)
	}
}
