package discovery

import (
	"context"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/nsflow/nsflow/collector"
)

// orderObserver records the targets it is given, in order; its WaitIdle
// blocks until idle is closed.
type orderObserver struct {
	mu      sync.Mutex
	added   []collector.Target
	idle    chan struct{}
	inodeOf func(collector.Target) uint64
}

func (o *orderObserver) AddAsync(t collector.Target) (uint64, error) {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.added = append(o.added, t)
	return o.inodeOf(t), nil
}

func (o *orderObserver) WaitIdle(ctx context.Context) error {
	select {
	case <-o.idle:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}
func (o *orderObserver) Remove(uint64)         {}
func (o *orderObserver) Rename(uint64, string) {}

// Each namespace is added with its class (the host's, bind-mounted ones
// named, those found through a process alone), the named and the host's
// before any process namespace; Ready waits for the observer to be idle
// after the first scan, not just for the adds.
func TestClassesAndReady(t *testing.T) {
	f := newFakeProc(t)
	for pid, ns := range map[int]string{3: "1003", 4: "1004", 5: "1005", 6: "1006"} {
		f.process(pid, ns, "500"+ns, 0, "p")
	}
	f.write(filepath.Join(f.netnsDir, "web"), "1005")
	f.write(filepath.Join(f.netnsDir, "db"), "1007")
	o := &orderObserver{idle: make(chan struct{})}
	d, err := New(o, Config{Host: true, Proc: true, ProcDir: f.proc, NetnsDirs: []string{f.netnsDir}, Resync: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	f.fake(d.sc)
	o.inodeOf = func(t collector.Target) uint64 {
		if t.Name == collector.HostName {
			return d.sc.hostIno
		}
		ino, _ := f.nsInode(t.Path)
		return ino
	}
	runDiscovery(t, d)
	wait(t, "the first scan's adds", func() bool {
		o.mu.Lock()
		defer o.mu.Unlock()
		return len(o.added) == 6
	})
	select {
	case <-d.Ready():
		t.Fatal("ready while the observer still has attach work")
	case <-time.After(100 * time.Millisecond):
	}
	close(o.idle)
	select {
	case <-d.Ready():
	case <-time.After(5 * time.Second):
		t.Fatal("not ready once the observer is idle")
	}

	o.mu.Lock()
	defer o.mu.Unlock()
	want := map[string]collector.Class{
		collector.HostName: collector.ClassHost, "web": collector.ClassNamed, "db": collector.ClassNamed,
		"pid:3": collector.ClassProcess, "pid:4": collector.ClassProcess, "pid:6": collector.ClassProcess,
	}
	for i, a := range o.added {
		if c, ok := want[a.Name]; !ok || c != a.Class {
			t.Errorf("added %s as %s, want %s (known: %t)", a.Name, a.Class, c, ok)
		}
		if i > 0 && o.added[i-1].Class == collector.ClassProcess && a.Class != collector.ClassProcess {
			t.Errorf("%s (%s) added after a process namespace: %+v", a.Name, a.Class, o.added)
		}
	}
}

// swapObserver opens, for some inodes, another namespace than the scan
// found (a process that switched namespaces in between); it records what
// it is asked to remove.
type swapObserver struct {
	fakeObserver
	swap    map[uint64]uint64
	removed []uint64
}

func (o *swapObserver) AddAsync(t collector.Target) (uint64, error) {
	ino, err := o.fakeObserver.AddAsync(t)
	if to, ok := o.swap[ino]; ok {
		return to, err
	}
	return ino, err
}
func (o *swapObserver) Remove(ino uint64) { o.removed = append(o.removed, ino) }

// A path that names another namespace when the observer opens it than when
// the scan read it is not observed under the scan's name: the namespace
// the observer got is removed again (unless discovery observes it for
// itself), the one the scan found counts as gone once, and is added again
// at the next scan.
func TestAddOfChangedNamespaceUndone(t *testing.T) {
	f := newFakeProc(t)
	f.process(30, "1001", "5030", 0, "steady")
	f.process(31, "1002", "5031", 0, "switcher") // opened as 1009: unselected
	o := &swapObserver{fakeObserver: fakeObserver{adds: map[uint64]int{}}, swap: map[uint64]uint64{1002: 1009}}
	d, err := New(o, Config{Proc: true, ProcDir: f.proc, NetnsDirs: []string{f.netnsDir}})
	if err != nil {
		t.Fatal(err)
	}
	f.fake(d.sc)
	d.reconcile()
	if len(o.removed) != 1 || o.removed[0] != 1009 {
		t.Errorf("removed %v, want [1009]: the namespace opened instead of 1002", o.removed)
	}
	if _, ok := d.known[1009]; ok {
		t.Error("the namespace opened instead is taken as observed")
	}
	if n := d.Skipped()[SkipGone]; n != 1 {
		t.Errorf("gone: %d, want 1 (1002)", n)
	}
	// A new process, whose namespace is opened as 1001: observed already.
	f.process(32, "1003", "5032", 0, "switcher")
	o.swap = map[uint64]uint64{1003: 1001}
	o.removed = nil
	d.reconcile()
	if len(o.removed) != 0 {
		t.Errorf("removed %v: 1001 is observed for itself", o.removed)
	}
	if _, ok := d.known[1003]; ok || o.adds[1003] != 1 {
		t.Errorf("1003, opened as 1001: known %t, added %d times, want not known, added once", ok, o.adds[1003])
	}
	if n := d.Skipped()[SkipGone]; n != 2 {
		t.Errorf("gone: %d, want 2 (1002 once, 1003)", n)
	}
	if _, ok := d.known[1002]; !ok {
		t.Error("1002 not added at the next scan")
	}
	if o.adds[1002] != 2 {
		t.Errorf("1002 added %d times, want 2", o.adds[1002])
	}
}
