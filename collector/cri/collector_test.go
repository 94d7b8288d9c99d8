package cri

import (
	"context"
	"testing"
	"time"

	"github.com/nsflow/nsflow/collector"
	"github.com/nsflow/nsflow/collector/flow"
)

// podOf returns the pod a collector's snapshot names the namespace of that
// inode with, and whether the namespace is in the snapshot at all.
func podOf(t *testing.T, c *collector.Collector, ino uint64) (*flow.PodInfo, bool) {
	t.Helper()
	snap, err := c.Totals()
	if err != nil {
		t.Fatal(err)
	}
	for _, ns := range snap.Namespaces {
		if ns.Inode == ino {
			return ns.Pod, true
		}
	}
	return nil, false
}

// TestCollectorPodLifetime, with a real collector (BPF, root) and a real
// namespace: a namespace keeps its pod while its sandbox stops (not ready),
// after the runtime stops listing it, and after it is removed (gone,
// awaiting its grace period) with the runtime down; registered again under
// its inode (what a recycled inode is to the registry) it has none, also
// while the runtime is down, and also when that happens while a sync is
// under way (the sync's answer may be about the inode's previous owner);
// the next sync names it; Prune forgets it with its pod.
func TestCollectorPodLifetime(t *testing.T) {
	pid, nsPath := childNetns(t)
	c, err := collector.New(collector.Config{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	target := collector.Target{Name: "nsflow-cripod", Path: nsPath}
	ino, err := c.Add(target)
	if err != nil {
		t.Fatal(err)
	}
	want := pod("a", "web-0", "shop")
	expect := func(step string, named bool) {
		t.Helper()
		p, ok := podOf(t, c, ino)
		switch {
		case !ok:
			t.Fatalf("%s: namespace %d not in the snapshot", step, ino)
		case named && (p == nil || *p != want):
			t.Fatalf("%s: pod %+v, want %+v", step, p, want)
		case !named && p != nil:
			t.Fatalf("%s: pod %+v, want none", step, *p)
		}
	}

	f := &fakeRuntime{}
	f.set(sandbox{id: "a", name: "web-0", ns: "shop", ready: true, info: containerdInfo(nsPath, pid)})
	ep, srv := serve(t, f)
	e := New(c, Config{Endpoint: ep})
	sync := func(step string, wantErr bool) {
		t.Helper()
		if err := e.Sync(context.Background()); (err != nil) != wantErr {
			t.Fatalf("%s: sync error %v, want an error: %v", step, err, wantErr)
		}
	}
	expect("before any sync", false)
	sync("ready", false)
	expect("ready", true)

	f.set(sandbox{id: "a", name: "web-0", ns: "shop", ready: false, info: containerdInfo(nsPath, pid)})
	sync("stopping", false)
	expect("stopping (not ready, namespace still there)", true)

	f.set()
	sync("no longer listed", false)
	expect("no longer listed", true)

	// The runtime goes down; the namespace goes (awaiting its grace period).
	srv.Stop()
	c.Remove(ino)
	sync("runtime down", true)
	expect("gone, runtime down", true)

	// Registered again under its inode while the runtime is down.
	if got, err := c.Add(target); err != nil || got != ino {
		t.Fatalf("re-add: inode %d err %v, want %d", got, err, ino)
	}
	expect("re-added, runtime down", false)
	sync("re-added, runtime down", true)
	expect("re-added, runtime down, after a failed sync", false)

	// The runtime is back; the namespace is registered again while a sync
	// is under way: that sync's answer does not name it, the next does.
	f2 := &fakeRuntime{}
	f2.set(sandbox{id: "a", name: "web-0", ns: "shop", ready: true, info: containerdInfo(nsPath, pid)})
	f2.onList = func() {
		c.Remove(ino)
		if _, err := c.Add(target); err != nil {
			t.Error(err)
		}
	}
	ep2, _ := serve(t, f2)
	e = New(c, Config{Endpoint: ep2})
	sync("re-added during the sync", false)
	expect("re-added during the sync", false)
	f2.mu.Lock()
	f2.onList = nil
	f2.mu.Unlock()
	sync("next sync", false)
	expect("next sync", true)

	// Pruned: forgotten, pod and all.
	c.Remove(ino)
	if err := c.Prune(time.Now().Add(time.Second)); err != nil {
		t.Fatal(err)
	}
	if p, ok := podOf(t, c, ino); ok {
		t.Fatalf("pruned namespace still in the snapshot (pod %+v)", p)
	}
}
