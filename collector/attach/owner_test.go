package attach

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"strings"
	"testing"

	"github.com/nsflow/nsflow/test/testenv"
)

// A live owner's filters are stale exactly once it is gone (its abstract
// socket released); pinned owners', other namespaces' and other tools'
// filters are never stale; nsflow's pre-v3 name only for a pinned owner
// that replaced a v2 layout.
func TestOwnerStale(t *testing.T) {
	a, err := NewOwner("", nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	b, err := NewOwner("", nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	if a.Name() == b.Name() || !strings.HasPrefix(a.Name(), "nsflow/") || !IsNsflowFilter(a.Name()) {
		t.Fatalf("owner names %q, %q: want distinct nsflow/ names", a.Name(), b.Name())
	}
	if b.stale(a.Name()) || a.stale(a.Name()) {
		t.Errorf("a live owner's filters are stale")
	}
	pinned, err := NewOwner("/sys/fs/bpf/nsflow/v3", nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	other := strings.Replace(a.Name(), fmt.Sprintf("%016x", a.cookie), fmt.Sprintf("%016x", a.cookie+1), 1)
	for _, name := range []string{pinned.Name(), other, "foreign", "nsflowx", "nsflow/zz/0123456789abcdef", "nsflow"} {
		if b.stale(name) {
			t.Errorf("%q judged stale", name)
		}
	}
	name := a.Name()
	a.Close()
	if !b.stale(name) {
		t.Errorf("%q not stale once its owner is gone", name)
	}
	if !b.stale(name) {
		t.Errorf("%q not stale on a second look (the check must release what it binds)", name)
	}
	if pinned.stale(name) != true || !pinned.Pinned() || b.Pinned() {
		t.Errorf("pinned owner: stale(%q) %v, Pinned %v", name, pinned.stale(name), pinned.Pinned())
	}
}

var discard = slog.New(slog.DiscardHandler)

// One process at a time uses a pin path: a second PreparePins fails with
// ErrPinsInUse until the first lets go.
func TestPinsLocked(t *testing.T) {
	testenv.RequireRoot(t)
	path := fmt.Sprintf("/sys/fs/bpf/nsflow-unit-lock-%d", os.Getpid())
	t.Cleanup(func() { os.RemoveAll(path) })
	_, lock, err := PreparePins(path, discard)
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := PreparePins(path, discard); !errors.Is(err, ErrPinsInUse) {
		t.Errorf("second PreparePins: %v, want ErrPinsInUse", err)
	}
	lock.Close()
	_, lock, err = PreparePins(path, discard)
	if err != nil {
		t.Fatalf("PreparePins once the first let go: %v", err)
	}
	o, err := NewOwner(path, lock, discard)
	if err != nil {
		t.Fatal(err)
	}
	if o.stale("nsflow") {
		t.Error("the pre-v3 name is stale for a serve whose pin path held no v2 layout")
	}
	o.Close()

	// A v2 layout replaced: its process's filters ("nsflow") are stale.
	if err := os.MkdirAll(path+"/v2", 0o700); err != nil {
		t.Fatal(err)
	}
	_, lock, err = PreparePins(path, discard)
	if err != nil {
		t.Fatal(err)
	}
	if o, err = NewOwner(path, lock, discard); err != nil {
		t.Fatal(err)
	}
	defer o.Close()
	if !o.stale("nsflow") {
		t.Error("the pre-v3 name is not stale for the serve that replaced a v2 layout")
	}
}
