package cri

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/nsflow/nsflow/collector/flow"
	"github.com/nsflow/nsflow/test/testenv"
)

// sandbox is one pod sandbox of a fakeRuntime: its listing and its verbose
// status's "info" (the JSON containerd and CRI-O report).
type sandbox struct {
	id, name, ns string
	ready        bool
	info         string
}

// fakeRuntime is an in-process CRI server over a unix socket.
type fakeRuntime struct {
	runtimeapi.UnimplementedRuntimeServiceServer
	mu        sync.Mutex
	sandboxes []sandbox
	onList    func() // called while answering ListPodSandbox
}

func (f *fakeRuntime) set(sbs ...sandbox) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.sandboxes = sbs
}

func (f *fakeRuntime) ListPodSandbox(_ context.Context, r *runtimeapi.ListPodSandboxRequest) (*runtimeapi.ListPodSandboxResponse, error) {
	f.mu.Lock()
	onList := f.onList
	var items []*runtimeapi.PodSandbox
	for _, s := range f.sandboxes {
		st := runtimeapi.PodSandboxState_SANDBOX_NOTREADY
		if s.ready {
			st = runtimeapi.PodSandboxState_SANDBOX_READY
		}
		if want := r.GetFilter().GetState(); want != nil && want.State != st {
			continue
		}
		items = append(items, &runtimeapi.PodSandbox{Id: s.id, State: st,
			Metadata: &runtimeapi.PodSandboxMetadata{Name: s.name, Namespace: s.ns, Uid: "uid-" + s.id}})
	}
	f.mu.Unlock()
	if onList != nil {
		onList()
	}
	return &runtimeapi.ListPodSandboxResponse{Items: items}, nil
}

func (f *fakeRuntime) PodSandboxStatus(_ context.Context, r *runtimeapi.PodSandboxStatusRequest) (*runtimeapi.PodSandboxStatusResponse, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, s := range f.sandboxes {
		if s.id == r.PodSandboxId {
			return &runtimeapi.PodSandboxStatusResponse{Info: map[string]string{"info": s.info}}, nil
		}
	}
	return nil, fmt.Errorf("sandbox %s not found", r.PodSandboxId)
}

// serve starts f on a socket in a temp dir; it returns the endpoint and the
// server (Stop takes the runtime down).
func serve(t *testing.T, f *fakeRuntime) (string, *grpc.Server) {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "cri.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	srv := grpc.NewServer()
	runtimeapi.RegisterRuntimeServiceServer(srv, f)
	go srv.Serve(l)
	t.Cleanup(srv.Stop)
	return "unix://" + sock, srv
}

// containerdInfo is containerd's verbose sandbox info (SandboxInfo): the
// sandbox's pid and its OCI spec, whose network namespace entry has the
// path containerd mounted it at. CRI-O's has the same keys.
func containerdInfo(path string, pid int) string {
	return fmt.Sprintf(`{"pid":%d,"processStatus":"running","netNamespaceClosed":false,"runtimeSpec":{"linux":{"namespaces":[{"type":"pid"},{"type":"ipc"},{"type":"network","path":%q}]}},"sandboxMetadata":{"Version":"v1","Metadata":{"ID":"x","NetNSPath":%q}}}`, pid, path, path)
}

// hostNetworkInfo: a hostNetwork pod has no network namespace entry.
const hostNetworkInfo = `{"pid":1,"runtimeSpec":{"linux":{"namespaces":[{"type":"pid"},{"type":"ipc"}]}},"sandboxMetadata":{"Version":"v1","Metadata":{"NetNSPath":""}}}`

// captured is a Setter that keeps what it was given.
type captured struct {
	mu   sync.Mutex
	pods map[uint64]flow.PodInfo
	gen  uint64
	sets int
}

func (c *captured) PodGeneration() uint64 { return 7 }

func (c *captured) SetPods(p map[uint64]flow.PodInfo, gen uint64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.pods, c.gen = p, gen
	c.sets++
}

func (c *captured) get() map[uint64]flow.PodInfo {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.pods
}

func inodeOf(t *testing.T, path string) uint64 {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	return st.Ino
}

func pod(id, name, ns string) flow.PodInfo {
	return flow.PodInfo{Name: name, Namespace: ns, UID: "uid-" + id}
}

// sameMap reports whether got holds exactly want.
func sameMap(got, want map[uint64]flow.PodInfo) bool {
	if len(got) != len(want) {
		return false
	}
	for k, v := range want {
		if got[k] != v {
			return false
		}
	}
	return true
}

// childNetns starts a process in a new network namespace (root) and
// returns its pid and /proc/PID/ns/net; the process is killed at cleanup.
func childNetns(t *testing.T) (int, string) {
	t.Helper()
	testenv.RequireRoot(t)
	cmd := exec.Command("sleep", "120")
	cmd.SysProcAttr = &syscall.SysProcAttr{Cloneflags: syscall.CLONE_NEWNET}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
	})
	return cmd.Process.Pid, fmt.Sprintf("/proc/%d/ns/net", cmd.Process.Pid)
}

func TestSync(t *testing.T) {
	f := &fakeRuntime{}
	f.set(
		sandbox{id: "sb1", name: "web-1", ns: "shop", ready: true, info: containerdInfo("/proc/self/ns/net", 0)},
		sandbox{id: "hostnet", name: "node-agent", ns: "kube-system", ready: true, info: hostNetworkInfo},
	)
	ep, srv := serve(t, f)
	var got captured
	e := New(&got, Config{Endpoint: ep})
	if err := e.Sync(context.Background()); err != nil {
		t.Fatal(err)
	}
	ino := inodeOf(t, "/proc/self/ns/net")
	want := map[uint64]flow.PodInfo{ino: pod("sb1", "web-1", "shop")}
	if !sameMap(got.get(), want) {
		t.Fatalf("pods %+v, want only %+v (a hostNetwork pod has no namespace of its own)", got.get(), want)
	}
	if got.gen != 7 {
		t.Errorf("SetPods got generation %d, want the setter's 7 read before the listing", got.gen)
	}
	if !e.Up() || e.Unresolved() != 0 {
		t.Errorf("after a successful sync: up=%v unresolved=%d", e.Up(), e.Unresolved())
	}

	// The runtime goes away: Sync fails and sets nothing (the setter keeps
	// what it knows).
	srv.Stop()
	if err := e.Sync(context.Background()); err == nil {
		t.Fatal("Sync succeeded with the runtime down")
	}
	if e.Up() || got.sets != 1 {
		t.Errorf("after the runtime went down: up=%v SetPods calls=%d, want 1", e.Up(), got.sets)
	}
}

// TestVarRunResolvedUnderRun: containerd and CRI-O report
// /var/run/netns/...; an image FROM scratch has no /var/run, and the
// DaemonSet mounts the host's /run/netns: the path is found rewritten
// (here under a temp root standing for /run), and not without the rewrite.
func TestVarRunResolvedUnderRun(t *testing.T) {
	if got := rewrite("/var/run/netns/cni-1234", DefaultRewrites); len(got) != 1 || got[0] != "/run/netns/cni-1234" {
		t.Fatalf("default rewrite of /var/run/netns/cni-1234: %q, want [/run/netns/cni-1234]", got)
	}
	if got := rewrite("/run/netns/cni-1234", DefaultRewrites); len(got) != 0 {
		t.Fatalf("a /run path rewritten: %q", got)
	}
	name := fmt.Sprintf("nsflow-crivr-%d", os.Getpid())
	runtimePath := "/var/run/netns/" + name
	if _, err := os.Lstat(runtimePath); err == nil {
		t.Fatalf("%s exists: the test needs a path that does not", runtimePath)
	}
	root := t.TempDir()
	if err := os.MkdirAll(filepath.Join(root, "run/netns"), 0o755); err != nil {
		t.Fatal(err)
	}
	// The namespace as the mount shows it: here a link to this process's.
	if err := os.Symlink("/proc/self/ns/net", filepath.Join(root, "run/netns", name)); err != nil {
		t.Fatal(err)
	}
	f := &fakeRuntime{}
	f.set(sandbox{id: "vr", name: "web-0", ns: "shop", ready: true, info: containerdInfo(runtimePath, 0)})
	ep, _ := serve(t, f)

	var got captured
	e := New(&got, Config{Endpoint: ep, Rewrites: []PathRewrite{{From: "/var/run/", To: root + "/run/"}}})
	if err := e.Sync(context.Background()); err != nil {
		t.Fatal(err)
	}
	want := map[uint64]flow.PodInfo{inodeOf(t, "/proc/self/ns/net"): pod("vr", "web-0", "shop")}
	if !sameMap(got.get(), want) || e.Unresolved() != 0 {
		t.Fatalf("with the rewrite: pods %+v unresolved %d, want %+v and 0", got.get(), e.Unresolved(), want)
	}

	var without captured
	e = New(&without, Config{Endpoint: ep, Rewrites: []PathRewrite{}})
	if err := e.Sync(context.Background()); err != nil {
		t.Fatal(err)
	}
	if len(without.get()) != 0 || e.Unresolved() != 1 {
		t.Fatalf("without a rewrite: pods %+v unresolved %d, want none and 1", without.get(), e.Unresolved())
	}
}

// TestResolvedThroughPid: a ready sandbox whose path cannot be found here
// (or that reports none: the namespace is its process's own) is found as
// /proc/PID/ns/net of the pid the runtime reports (hostPID); a stopped
// sandbox's pid is not trusted (it may be another process's by now).
func TestResolvedThroughPid(t *testing.T) {
	pid, nsPath := childNetns(t)
	want := inodeOf(t, nsPath)
	if want == inodeOf(t, "/proc/self/ns/net") {
		t.Fatal("the child shares this process's namespace")
	}
	f := &fakeRuntime{}
	ep, _ := serve(t, f)
	for _, tc := range []struct {
		name string
		info string
	}{
		{"path not visible", containerdInfo("/var/run/netns/nsflow-cripid-absent", pid)},
		{"no path (CRI-O without pinned namespaces)", fmt.Sprintf(`{"pid":%d,"runtimeSpec":{"linux":{"namespaces":[{"type":"network"}]}}}`, pid)},
	} {
		f.set(sandbox{id: "p", name: "api-0", ns: "shop", ready: true, info: tc.info})
		var got captured
		e := New(&got, Config{Endpoint: ep, Rewrites: []PathRewrite{}})
		if err := e.Sync(context.Background()); err != nil {
			t.Fatal(err)
		}
		if w := map[uint64]flow.PodInfo{want: pod("p", "api-0", "shop")}; !sameMap(got.get(), w) || e.Unresolved() != 0 {
			t.Errorf("%s: pods %+v unresolved %d, want %+v and 0", tc.name, got.get(), e.Unresolved(), w)
		}

		f.set(sandbox{id: "p", name: "api-0", ns: "shop", ready: false, info: tc.info})
		got = captured{}
		if err := e.Sync(context.Background()); err != nil {
			t.Fatal(err)
		}
		if len(got.get()) != 0 || e.Unresolved() != 0 {
			t.Errorf("%s, not ready: pods %+v unresolved %d, want none and 0 (a stopped sandbox's pid is not used, nor counted)", tc.name, got.get(), e.Unresolved())
		}
	}
}

// TestNotReadyKeepsPod: a stopping pod (sandbox not ready) whose namespace
// still exists keeps its name, its last increments are still scraped; one
// whose namespace is gone (or that containerd says is closed) is skipped
// without being counted; a ready sandbox's claim on an inode wins.
func TestNotReadyKeepsPod(t *testing.T) {
	_, stopping := childNetns(t)
	dir := t.TempDir()
	link := filepath.Join(dir, "cni-stopping")
	if err := os.Symlink(stopping, link); err != nil {
		t.Fatal(err)
	}
	closed := strings.Replace(containerdInfo(link, 0), `"netNamespaceClosed":false`, `"netNamespaceClosed":true`, 1)
	f := &fakeRuntime{}
	f.set(
		sandbox{id: "old", name: "web-1", ns: "shop", ready: false, info: containerdInfo("/proc/self/ns/net", 0)},
		sandbox{id: "stopping", name: "web-0", ns: "shop", ready: false, info: containerdInfo(link, 0)},
		sandbox{id: "gone", name: "web-9", ns: "shop", ready: false, info: containerdInfo(filepath.Join(dir, "cni-gone"), 0)},
		sandbox{id: "closed", name: "web-8", ns: "shop", ready: false, info: closed},
		sandbox{id: "new", name: "web-1", ns: "shop2", ready: true, info: containerdInfo("/proc/self/ns/net", 0)},
	)
	ep, _ := serve(t, f)
	var got captured
	e := New(&got, Config{Endpoint: ep})
	if err := e.Sync(context.Background()); err != nil {
		t.Fatal(err)
	}
	want := map[uint64]flow.PodInfo{
		inodeOf(t, stopping):            pod("stopping", "web-0", "shop"),
		inodeOf(t, "/proc/self/ns/net"): pod("new", "web-1", "shop2"),
	}
	if !sameMap(got.get(), want) || e.Unresolved() != 0 {
		t.Fatalf("pods %+v unresolved %d, want %+v and 0", got.get(), e.Unresolved(), want)
	}
}

// syncedBuffer is a goroutine-safe log sink.
type syncedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncedBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncedBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// TestUnresolvedLoggedOnceAndCounted: a ready sandbox whose namespace is
// found nowhere (its path absent, or a file that is not a namespace: what a
// bind mount leaves behind) is counted while it is listed and logged once,
// not at every sync.
func TestUnresolvedLoggedOnceAndCounted(t *testing.T) {
	dir := t.TempDir()
	notNs := filepath.Join(dir, "cni-leftover")
	if err := os.WriteFile(notNs, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	f := &fakeRuntime{}
	lost := []sandbox{
		{id: "lost1", name: "db-0", ns: "shop", ready: true, info: containerdInfo("/var/run/netns/nsflow-crilost-absent", 0)},
		{id: "lost2", name: "db-1", ns: "shop", ready: true, info: containerdInfo(notNs, 0)},
	}
	ok := sandbox{id: "ok", name: "web-1", ns: "shop", ready: true, info: containerdInfo("/proc/self/ns/net", 0)}
	f.set(append([]sandbox{ok}, lost...)...)
	ep, _ := serve(t, f)
	var logs syncedBuffer
	var got captured
	e := New(&got, Config{Endpoint: ep, Logger: slog.New(slog.NewTextHandler(&logs, nil))})
	if e.Unresolved() != 0 {
		t.Fatalf("unresolved %d before any sync", e.Unresolved())
	}
	for range 3 {
		if err := e.Sync(context.Background()); err != nil {
			t.Fatal(err)
		}
		if e.Unresolved() != 2 || len(got.get()) != 1 {
			t.Fatalf("unresolved %d pods %+v, want 2 and web-1 only", e.Unresolved(), got.get())
		}
	}
	for _, id := range []string{"lost1", "lost2"} {
		if n := strings.Count(logs.String(), "sandbox="+id); n != 1 {
			t.Errorf("sandbox %s logged %d times over 3 syncs, want once:\n%s", id, n, logs.String())
		}
	}
	if !strings.Contains(logs.String(), "not a namespace") {
		t.Errorf("the leftover file is not reported as not a namespace:\n%s", logs.String())
	}
	t.Logf("log:\n%s", logs.String())
	if strings.Contains(logs.String(), "sandbox=ok") {
		t.Errorf("a resolved sandbox was logged:\n%s", logs.String())
	}

	// They go: no longer counted.
	f.set(ok)
	if err := e.Sync(context.Background()); err != nil {
		t.Fatal(err)
	}
	if e.Unresolved() != 0 {
		t.Errorf("unresolved %d after the sandboxes went, want 0", e.Unresolved())
	}
}

func TestEndpointValidation(t *testing.T) {
	e := New(&captured{}, Config{Endpoint: "tcp://127.0.0.1:1"})
	if err := e.Sync(context.Background()); err == nil {
		t.Error("a tcp endpoint was accepted")
	}
}

// A kick (a new namespace) is followed by a few quick syncs: a sandbox that
// the runtime lists only a moment after its namespace appeared is named
// within about a second, not a resync interval later.
func TestKickFollowUps(t *testing.T) {
	f := &fakeRuntime{}
	ep, _ := serve(t, f)
	var got captured
	e := New(&got, Config{Endpoint: ep, Interval: time.Hour})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { e.Run(ctx); close(done) }()
	t.Cleanup(func() { cancel(); <-done })

	deadline := time.Now().Add(5 * time.Second)
	for got.get() == nil && time.Now().Before(deadline) { // the first sync: nothing listed
		time.Sleep(10 * time.Millisecond)
	}
	// The namespace appears (kick), its sandbox is listed 100 ms later.
	e.Kick()
	time.Sleep(100 * time.Millisecond)
	kicked := time.Now()
	f.set(sandbox{id: "sb1", name: "web-1", ns: "shop", ready: true, info: containerdInfo("/proc/self/ns/net", 0)})
	ino := inodeOf(t, "/proc/self/ns/net")
	for time.Since(kicked) < 3*time.Second {
		if p, ok := got.get()[ino]; ok && p.Name == "web-1" {
			t.Logf("named %v after the sandbox was listed", time.Since(kicked).Round(time.Millisecond))
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Fatalf("not named within 3 s of being listed (resync interval 1 h): %+v", got.get())
}
