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
	mu    sync.Mutex
	added []collector.Target
	idle  chan struct{}
}

func (o *orderObserver) AddAsync(t collector.Target) (uint64, error) {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.added = append(o.added, t)
	return uint64(len(o.added)), nil
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
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- d.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Error(err)
		}
	})
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
