package cri

import (
	"context"
	"net"
	"path/filepath"
	"sync"
	"testing"

	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/nsflow/nsflow/collector/flow"
)

// fakeRuntime is a CRI server with one ready sandbox whose network
// namespace is this process's own (a real path with a real inode).
type fakeRuntime struct {
	runtimeapi.UnimplementedRuntimeServiceServer
}

func (fakeRuntime) ListPodSandbox(context.Context, *runtimeapi.ListPodSandboxRequest) (*runtimeapi.ListPodSandboxResponse, error) {
	return &runtimeapi.ListPodSandboxResponse{Items: []*runtimeapi.PodSandbox{
		{Id: "sb1", State: runtimeapi.PodSandboxState_SANDBOX_READY,
			Metadata: &runtimeapi.PodSandboxMetadata{Name: "web-1", Namespace: "shop", Uid: "u1"}},
		{Id: "hostnet", State: runtimeapi.PodSandboxState_SANDBOX_READY,
			Metadata: &runtimeapi.PodSandboxMetadata{Name: "node-agent", Namespace: "kube-system"}},
	}}, nil
}

func (fakeRuntime) PodSandboxStatus(_ context.Context, r *runtimeapi.PodSandboxStatusRequest) (*runtimeapi.PodSandboxStatusResponse, error) {
	info := `{"runtimeSpec":{"linux":{"namespaces":[{"type":"pid"},{"type":"network","path":"/proc/self/ns/net"}]}}}`
	if r.PodSandboxId == "hostnet" {
		info = `{"runtimeSpec":{"linux":{"namespaces":[{"type":"pid"}]}}}` // hostNetwork: no namespace of its own
	}
	return &runtimeapi.PodSandboxStatusResponse{Info: map[string]string{"info": info}}, nil
}

type captured struct {
	mu   sync.Mutex
	pods map[uint64]flow.PodInfo
}

func (c *captured) SetPods(p map[uint64]flow.PodInfo) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.pods = p
}

func TestSync(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "cri.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	srv := grpc.NewServer()
	runtimeapi.RegisterRuntimeServiceServer(srv, &fakeRuntime{})
	go srv.Serve(l)

	var got captured
	e := New(&got, Config{Endpoint: "unix://" + sock})
	if err := e.Sync(context.Background()); err != nil {
		t.Fatal(err)
	}
	var st unix.Stat_t
	if err := unix.Stat("/proc/self/ns/net", &st); err != nil {
		t.Fatal(err)
	}
	want := flow.PodInfo{Name: "web-1", Namespace: "shop", UID: "u1"}
	if len(got.pods) != 1 || got.pods[st.Ino] != want {
		t.Fatalf("pods %+v, want only {%d: %+v} (a hostNetwork pod has no namespace of its own)", got.pods, st.Ino, want)
	}
	if !e.Up() {
		t.Error("Up after a successful sync")
	}

	// The runtime goes away: Sync fails, the last pods stay set.
	srv.Stop()
	if err := e.Sync(context.Background()); err == nil {
		t.Fatal("Sync succeeded with the runtime down")
	}
	if e.Up() || len(got.pods) != 1 {
		t.Errorf("after the runtime went down: up=%v pods=%v", e.Up(), got.pods)
	}
}

func TestEndpointValidation(t *testing.T) {
	e := New(&captured{}, Config{Endpoint: "tcp://127.0.0.1:1"})
	if err := e.Sync(context.Background()); err == nil {
		t.Error("a tcp endpoint was accepted")
	}
}
