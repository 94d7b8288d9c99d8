package cri

import (
	"context"
	"fmt"
	"net"
	"path/filepath"
	"testing"

	"google.golang.org/grpc"

	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/nsflow/nsflow/collector/cgroup"
	"github.com/nsflow/nsflow/collector/flow"
)

// fakeContainers is a fakeRuntime that also lists containers.
type fakeContainers struct {
	fakeRuntime
	ctrs     []*runtimeapi.Container
	pids     map[string]int
	statuses int
}

func (f *fakeContainers) ListContainers(context.Context, *runtimeapi.ListContainersRequest) (*runtimeapi.ListContainersResponse, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return &runtimeapi.ListContainersResponse{Containers: f.ctrs}, nil
}

func (f *fakeContainers) ContainerStatus(_ context.Context, r *runtimeapi.ContainerStatusRequest) (*runtimeapi.ContainerStatusResponse, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.statuses++
	if !r.Verbose {
		return nil, fmt.Errorf("not verbose")
	}
	return &runtimeapi.ContainerStatusResponse{Info: map[string]string{"info": fmt.Sprintf(`{"pid":%d,"sandboxID":"x"}`, f.pids[r.ContainerId])}}, nil
}

func TestListContainers(t *testing.T) {
	f := &fakeContainers{pids: map[string]int{"c1": 101, "c2": 102}}
	f.set(sandbox{id: "s1", name: "web-0", ns: "shop", ready: true, info: "{}"})
	run := runtimeapi.ContainerState_CONTAINER_RUNNING
	f.ctrs = []*runtimeapi.Container{
		{Id: "c1", PodSandboxId: "s1", State: run, Metadata: &runtimeapi.ContainerMetadata{Name: "web"}},
		{Id: "c2", PodSandboxId: "s1", State: run, Metadata: &runtimeapi.ContainerMetadata{Name: "sidecar"}},
		{Id: "c3", PodSandboxId: "gone", State: runtimeapi.ContainerState_CONTAINER_EXITED, Metadata: &runtimeapi.ContainerMetadata{Name: "init"},
			Labels: map[string]string{"io.kubernetes.pod.name": "old", "io.kubernetes.pod.namespace": "shop"}},
	}
	ep := serveContainers(t, f)
	l := NewLister(ep)
	defer l.Close()
	var _ cgroup.Lister = l
	for round := 0; round < 2; round++ {
		got, err := l.ListContainers(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		pod := flow.PodInfo{Name: "web-0", Namespace: "shop", UID: "uid-s1"}
		want := []cgroup.Container{
			{ID: "c1", Name: "web", Pod: pod, Pid: 101},
			{ID: "c2", Name: "sidecar", Pod: pod, Pid: 102},
			{ID: "c3", Name: "init", Pod: flow.PodInfo{Name: "old", Namespace: "shop"}},
		}
		if fmt.Sprint(got) != fmt.Sprint(want) {
			t.Errorf("round %d:\n got %+v\nwant %+v", round, got, want)
		}
	}
	// ContainerStatus once per running container, not per listing.
	if f.statuses != 2 {
		t.Errorf("ContainerStatus called %d times, want 2", f.statuses)
	}
}

func serveContainers(t *testing.T, f *fakeContainers) string {
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
	return "unix://" + sock
}
