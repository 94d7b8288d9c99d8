package cgroup

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/nsflow/nsflow/collector/flow"
	"github.com/nsflow/nsflow/test/testenv"
)

func TestMount(t *testing.T) {
	for _, tc := range []struct {
		name, info, want string
	}{
		{"hybrid", `31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
`, "/sys/fs/cgroup/unified"},
		{"v2", `30 23 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate
`, "/sys/fs/cgroup"},
		// In a container with its own cgroup namespace: its own cgroup at
		// /sys/fs/cgroup, the host's mounted at /host/sys/fs/cgroup (its
		// root reads as above this namespace's).
		{"container", `700 690 0:26 / /sys/fs/cgroup ro,nosuid - cgroup2 cgroup rw
701 690 0:26 /../../.. /host/sys/fs/cgroup ro,nosuid - cgroup2 cgroup2 rw
`, "/host/sys/fs/cgroup"},
		// A subtree bind-mounted is not the hierarchy.
		{"subtree", `41 31 0:38 /kubepods /mnt/sub rw - cgroup2 cgroup2 rw
42 31 0:38 / /mnt/with\040space rw - cgroup2 cgroup2 rw
`, "/mnt/with space"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := filepath.Join(t.TempDir(), "mountinfo")
			if err := os.WriteFile(p, []byte(tc.info), 0o644); err != nil {
				t.Fatal(err)
			}
			got, err := Mount(p)
			if err != nil || got != tc.want {
				t.Errorf("Mount = %q, %v; want %q", got, err, tc.want)
			}
		})
	}
	p := filepath.Join(t.TempDir(), "mountinfo")
	os.WriteFile(p, []byte("31 23 0:28 / /sys/fs/cgroup rw - tmpfs tmpfs rw\n"), 0o644)
	if got, err := Mount(p); err == nil {
		t.Errorf("no cgroup2: Mount = %q, want an error", got)
	}
}

func TestContainerID(t *testing.T) {
	id := strings.Repeat("0123456789abcdef", 4)
	for in, want := range map[string]string{
		"cri-containerd-" + id + ".scope":       id,
		"crio-" + id + ".scope":                 id,
		"docker-" + id + ".scope":               id,
		id:                                      id,
		"sshd.service":                          "",
		"web":                                   "",
		"cri-containerd-" + id[:63] + "g.scope": "",
	} {
		if got := containerID(in); got != want {
			t.Errorf("containerID(%q) = %q, want %q", in, got, want)
		}
	}
}

// testRoot returns the cgroup v2 mount and a directory of the test's own
// under it, removed (with its children) in Cleanup.
func testRoot(t *testing.T) (string, string) {
	t.Helper()
	testenv.RequireRoot(t)
	root, err := Mount("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	dir := filepath.Join(root, fmt.Sprintf("nsflow-h5test-%d", os.Getpid()))
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { removeTree(t, dir) })
	return root, dir
}

// removeTree removes a cgroup tree, deepest first (its processes are gone).
func removeTree(t *testing.T, dir string) {
	ents, _ := os.ReadDir(dir)
	for _, e := range ents {
		if e.IsDir() {
			removeTree(t, filepath.Join(dir, e.Name()))
		}
	}
	if err := os.Remove(dir); err != nil && !os.IsNotExist(err) {
		t.Errorf("remove cgroup %s: %v", dir, err)
	}
}

// startIn starts a sleeping process in a new cgroup dir (created), killed
// and waited for in Cleanup; it returns its pid and the cgroup's id.
func startIn(t *testing.T, dir string) (int, uint64) {
	t.Helper()
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	cmd := exec.Command("sleep", "60")
	cmd.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: int(f.Fd())}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	id, err := ID(dir)
	if err != nil {
		t.Fatal(err)
	}
	return cmd.Process.Pid, id
}

type fakeLister struct {
	ctrs  []Container
	calls int
}

func (f *fakeLister) ListContainers(context.Context) ([]Container, error) {
	f.calls++
	return f.ctrs, nil
}

// TestResolve names real cgroups made by the test: a plain one by its
// last element, a CRI container's by the runtime (through its pid, and
// through its id in the cgroup's name), both with file handles and
// through /proc.
func TestResolve(t *testing.T) {
	root, dir := testRoot(t)
	for _, handles := range []bool{true, false} {
		t.Run(fmt.Sprintf("handles=%v", handles), func(t *testing.T) {
			sub := filepath.Join(dir, fmt.Sprint(handles))
			_, plain := startIn(t, filepath.Join(sub, "app.service"))
			cidPid := strings.Repeat("ab", 32)
			pid, byPid := startIn(t, filepath.Join(sub, "pod1", "cri-containerd-"+cidPid+".scope"))
			cidName := strings.Repeat("cd", 32)
			_, byName := startIn(t, filepath.Join(sub, "pod1", "cri-containerd-"+cidName+".scope"))
			pod := flow.PodInfo{Name: "p1", Namespace: "default", UID: "u1"}
			l := &fakeLister{ctrs: []Container{
				{ID: cidPid, Name: "web", Pod: pod, Pid: pid},
				{ID: cidName, Name: "sidecar", Pod: pod}, // no pid reported
			}}
			r, err := New(Config{Lister: l, MinRefresh: time.Hour})
			if err != nil {
				t.Fatal(err)
			}
			defer r.Close()
			if r.Root() != root {
				t.Errorf("Root = %s, want %s", r.Root(), root)
			}
			if !r.handles {
				t.Fatalf("open_by_handle_at does not work as root")
			}
			r.handles = handles
			got := r.Resolve(context.Background(), []uint64{plain, byPid, byName, 0})
			rel := func(p string) string { return strings.TrimPrefix(p, root) }
			want := map[uint64]Name{
				plain:  {Container: "app.service", Path: rel(filepath.Join(sub, "app.service"))},
				byPid:  {Container: "web", Pod: &pod, Path: rel(filepath.Join(sub, "pod1", "cri-containerd-"+cidPid+".scope"))},
				byName: {Container: "sidecar", Pod: &pod, Path: rel(filepath.Join(sub, "pod1", "cri-containerd-"+cidName+".scope"))},
			}
			if len(got) != len(want) {
				t.Errorf("got %d names, want %d: %v", len(got), len(want), got)
			}
			for id, w := range want {
				g := got[id]
				if g.Container != w.Container || g.Path != w.Path || g.PodString() != w.PodString() {
					t.Errorf("cgroup %d: got %+v (pod %q), want %+v (pod %q)", id, g, g.PodString(), w, w.PodString())
				}
			}
			if r.Refreshes() != 1 || l.calls != 1 {
				t.Errorf("refreshes %d, lister calls %d; want 1, 1", r.Refreshes(), l.calls)
			}
			// Cached: no refresh, even after MinRefresh.
			r.mu.Lock()
			r.last = time.Time{}
			r.mu.Unlock()
			if got := r.Resolve(context.Background(), []uint64{plain, byPid}); got[byPid].Container != "web" || r.Refreshes() != 1 {
				t.Errorf("cached: got %+v, refreshes %d", got, r.Refreshes())
			}
		})
	}
}

// TestRefreshBounded: an id nobody knows makes one refresh per
// MinRefresh, not one per Resolve (even with its back-off, TestMissBackoff,
// shorter than MinRefresh).
func TestRefreshBounded(t *testing.T) {
	_, dir := testRoot(t)
	l := &fakeLister{}
	r, err := New(Config{Lister: l, MinRefresh: 300 * time.Millisecond, MissBackoff: time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	const unknown = 1 << 62
	for i := 0; i < 20; i++ {
		if n := r.Resolve(context.Background(), []uint64{unknown}); n[unknown].Container != "" {
			t.Fatalf("unknown id named %+v", n[unknown])
		}
	}
	if r.Refreshes() != 1 || l.calls != 1 {
		t.Fatalf("20 resolves in a row: %d refreshes, %d lister calls; want 1", r.Refreshes(), l.calls)
	}
	// A cgroup made meanwhile is named at once by its handle (no refresh),
	time.Sleep(10 * time.Millisecond)
	_, id := startIn(t, filepath.Join(dir, "late.scope"))
	if n := r.Resolve(context.Background(), []uint64{id}); n[id].Container != "late.scope" || r.Refreshes() != 1 {
		t.Errorf("new cgroup within MinRefresh: %+v, %d refreshes", n[id], r.Refreshes())
	}
	// and the unknown one again after MinRefresh.
	time.Sleep(350 * time.Millisecond)
	r.Resolve(context.Background(), []uint64{unknown})
	if r.Refreshes() != 2 {
		t.Errorf("after MinRefresh: %d refreshes, want 2", r.Refreshes())
	}
}

// TestCgroupNSHelper is TestResolveInCgroupNamespace's child (run in a
// cgroup namespace of its own): it resolves the ids in NSFLOW_CGNS_IDS
// through /proc (no file handles) and prints the names.
func TestCgroupNSHelper(t *testing.T) {
	ids := os.Getenv("NSFLOW_CGNS_IDS")
	if ids == "" {
		return // not the child: nothing to do
	}
	var plain, ctr uint64
	var pid, ref int
	fmt.Sscan(ids, &plain, &ctr, &pid, &ref)
	r, err := New(Config{RefPid: ref, Lister: &fakeLister{ctrs: []Container{{ID: "c1", Name: "web", Pid: pid, Pod: flow.PodInfo{Name: "p", Namespace: "ns"}}}}})
	if err != nil {
		fmt.Println("error:", err)
		os.Exit(1)
	}
	r.handles = false
	if _, err := nsRoot("/proc", ref); err != nil {
		fmt.Println("nsRoot:", err)
	}
	got := r.Resolve(context.Background(), []uint64{plain, ctr})
	fmt.Printf("root=%s nsroot=%s plain=%s ctr=%s/%s\n", r.Root(), r.nsRoot, got[plain].Container, got[ctr].PodString(), got[ctr].Container)
	os.Exit(0)
}

// TestResolveInCgroupNamespace: run in a cgroup namespace of its own (as
// in a container), the resolver still names cgroups out of it through
// /proc, whose paths then read "/../..": from the namespace's root, found
// through the cgroup namespace of a process in the initial one (this
// test's; deployed, PID 1).
func TestResolveInCgroupNamespace(t *testing.T) {
	root, dir := testRoot(t)
	if _, err := exec.LookPath("unshare"); err != nil {
		t.Fatal("unshare (util-linux) is needed")
	}
	_, plain := startIn(t, filepath.Join(dir, "other", "app.service"))
	pid, ctr := startIn(t, filepath.Join(dir, "other", "ctr"))
	self := filepath.Join(dir, "self")
	if err := os.Mkdir(self, 0o755); err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(self)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	cmd := exec.Command("unshare", "--cgroup", os.Args[0], "-test.run=^TestCgroupNSHelper$")
	cmd.Env = append(os.Environ(), fmt.Sprintf("NSFLOW_CGNS_IDS=%d %d %d %d", plain, ctr, pid, os.Getpid()))
	cmd.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: int(f.Fd())}
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	want := fmt.Sprintf("root=%s nsroot=%s plain=app.service ctr=ns/p/web\n", root, strings.TrimPrefix(self, root))
	if !strings.Contains(string(out), want) {
		t.Errorf("child said %q, want %q", out, want)
	}
}

type failingLister struct{ calls int }

func (f *failingLister) ListContainers(context.Context) ([]Container, error) {
	f.calls++
	return nil, fmt.Errorf("runtime down")
}

// TestListerBackoff: a runtime that fails is not asked at every refresh.
func TestListerBackoff(t *testing.T) {
	testRoot(t)
	l := &failingLister{}
	r, err := New(Config{Lister: l, MinRefresh: time.Millisecond, MissBackoff: time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	for i := 0; i < 5; i++ {
		r.Resolve(context.Background(), []uint64{1 << 62})
		time.Sleep(2 * time.Millisecond)
	}
	if r.Refreshes() < 2 || l.calls != 1 {
		t.Errorf("%d refreshes asked a failing runtime %d times, want once", r.Refreshes(), l.calls)
	}
}

// removedCgroup makes a cgroup under dir and removes it: its id can never
// be named again (as a restarted container's old cgroup).
func removedCgroup(t *testing.T, dir string) uint64 {
	t.Helper()
	gone := filepath.Join(dir, "gone.scope")
	if err := os.MkdirAll(gone, 0o755); err != nil {
		t.Fatal(err)
	}
	id, err := ID(gone)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(gone); err != nil {
		t.Fatal(err)
	}
	return id
}

// TestMissBackoff: the id of a removed cgroup, asked at every read, makes
// one refresh per back-off (not one per MinRefresh), the back-off doubling
// up to its bound; a cgroup made afterwards is still named at its first
// Resolve (a never-tried id makes a refresh), without the removed id's
// back-off growing for it.
func TestMissBackoff(t *testing.T) {
	_, dir := testRoot(t)
	for _, handles := range []bool{true, false} {
		t.Run(fmt.Sprintf("handles=%v", handles), func(t *testing.T) {
			sub := filepath.Join(dir, "backoff", fmt.Sprint(handles))
			gone := removedCgroup(t, sub)
			l := &fakeLister{}
			r, err := New(Config{Lister: l, MinRefresh: time.Millisecond})
			if err != nil {
				t.Fatal(err)
			}
			defer r.Close()
			r.handles = handles
			for i := 0; i < 20; i++ {
				if n := r.Resolve(context.Background(), []uint64{gone}); n[gone] != (Name{}) {
					t.Fatalf("removed cgroup named %+v", n[gone])
				}
				time.Sleep(2 * time.Millisecond) // past MinRefresh
			}
			if r.Refreshes() != 1 || l.calls != 1 {
				t.Fatalf("removed cgroup asked 20 times past MinRefresh: %d refreshes, %d lister calls; want 1", r.Refreshes(), l.calls)
			}
			wait := func() time.Duration {
				r.mu.Lock()
				defer r.mu.Unlock()
				if m := r.misses[gone]; m != nil {
					return m.wait
				}
				return 0
			}
			if w := wait(); w != MissBackoff {
				t.Errorf("back-off %v, want %v", w, MissBackoff)
			}

			_, id := startIn(t, filepath.Join(sub, "new.scope"))
			time.Sleep(2 * time.Millisecond)
			n := r.Resolve(context.Background(), []uint64{gone, id})
			if n[id].Container != "new.scope" || n[gone] != (Name{}) || r.Refreshes() != 2 {
				t.Errorf("new cgroup after the removed one: %+v, removed %+v, %d refreshes; want new.scope, unnamed, 2", n[id], n[gone], r.Refreshes())
			}
			if w := wait(); w != MissBackoff {
				t.Errorf("back-off after a refresh for another id: %v, want still %v", w, MissBackoff)
			}
			for i := 0; i < 5; i++ {
				time.Sleep(2 * time.Millisecond)
				r.Resolve(context.Background(), []uint64{gone, id})
			}
			if r.Refreshes() != 2 {
				t.Errorf("named and backing-off ids: %d refreshes, want still 2", r.Refreshes())
			}

			// Past its back-off (made so): one refresh, then twice as long.
			for _, want := range []time.Duration{2 * time.Minute, 4 * time.Minute, 8 * time.Minute, MaxMissBackoff, MaxMissBackoff} {
				r.mu.Lock()
				r.misses[gone].next = time.Time{}
				r.last = time.Time{}
				r.mu.Unlock()
				before := r.Refreshes()
				r.Resolve(context.Background(), []uint64{gone})
				r.Resolve(context.Background(), []uint64{gone})
				if r.Refreshes() != before+1 || wait() != want {
					t.Errorf("past the back-off: %d refreshes (want 1), back-off %v (want %v)", r.Refreshes()-before, wait(), want)
				}
			}
		})
	}
}

// blockingLister blocks in ListContainers while block is set, until
// release is closed (past ListerTimeout: the refresh ends only then);
// entered is signalled at each blocked call.
type blockingLister struct {
	block   atomic.Bool
	entered chan struct{}
	release chan struct{}
	once    sync.Once
}

func (b *blockingLister) ListContainers(context.Context) ([]Container, error) {
	if b.block.Load() {
		b.entered <- struct{}{}
		<-b.release
	}
	return nil, nil
}

func (b *blockingLister) unblock() { b.once.Do(func() { close(b.release) }) }

// TestRefreshUnlocked: while a refresh waits for the runtime, a Resolve of
// cached or backing-off ids returns at once, and one with a never-tried id
// waits for that refresh and gets its name from it (through /proc).
func TestRefreshUnlocked(t *testing.T) {
	_, dir := testRoot(t)
	sub := filepath.Join(dir, "unlocked")
	_, a := startIn(t, filepath.Join(sub, "a.scope"))
	gone := removedCgroup(t, sub)
	l := &blockingLister{entered: make(chan struct{}, 4), release: make(chan struct{})}
	t.Cleanup(l.unblock)
	r, err := New(Config{Lister: l, MinRefresh: time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	defer l.unblock() // before Close, which waits for the refresh
	r.handles = false
	if n := r.Resolve(context.Background(), []uint64{a, gone}); n[a].Container != "a.scope" || r.Refreshes() != 1 {
		t.Fatalf("first resolve: %+v, %d refreshes", n, r.Refreshes())
	}

	l.block.Store(true)
	_, b := startIn(t, filepath.Join(sub, "b.scope"))
	time.Sleep(2 * time.Millisecond)
	resolve := func(ids ...uint64) chan map[uint64]Name {
		ch := make(chan map[uint64]Name, 1)
		go func() { ch <- r.Resolve(context.Background(), ids) }()
		return ch
	}
	doneB := resolve(b)
	select {
	case <-l.entered:
	case <-time.After(10 * time.Second):
		t.Fatal("no refresh for a new cgroup")
	}
	select {
	case n := <-resolve(a, gone):
		r.mu.Lock()
		under := r.inflight != nil
		r.mu.Unlock()
		if n[a].Container != "a.scope" || !under {
			t.Errorf("cached during a refresh: %+v; the refresh still under way: %v", n, under)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("a Resolve of cached and backing-off ids waited for the refresh")
	}
	_, c := startIn(t, filepath.Join(sub, "c.scope"))
	doneC := resolve(c)
	select {
	case n := <-doneC:
		t.Fatalf("a never-tried id did not wait for the refresh under way: %+v", n)
	case <-time.After(100 * time.Millisecond):
	}
	l.unblock()
	for id, ch := range map[uint64]chan map[uint64]Name{b: doneB, c: doneC} {
		select {
		case n := <-ch:
			if n[id].Container == "" {
				t.Errorf("cgroup %d unnamed after the refresh: %+v", id, n)
			}
		case <-time.After(10 * time.Second):
			t.Fatal("Resolve did not return after the refresh")
		}
	}
	if r.Refreshes() != 2 {
		t.Errorf("%d refreshes, want 2 (c named by the one under way)", r.Refreshes())
	}
}
