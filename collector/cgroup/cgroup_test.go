package cgroup

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
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
// MinRefresh, not one per Resolve.
func TestRefreshBounded(t *testing.T) {
	_, dir := testRoot(t)
	l := &fakeLister{}
	r, err := New(Config{Lister: l, MinRefresh: 300 * time.Millisecond})
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
	r, err := New(Config{Lister: l, MinRefresh: time.Millisecond})
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
