package cri

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"sync"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/nsflow/nsflow/collector/cgroup"
	"github.com/nsflow/nsflow/collector/flow"
)

// Lister lists the runtime's containers for collector/cgroup: each with its
// name, its pod (its sandbox's metadata) and its main process's pid (from
// the verbose ContainerStatus, asked once per container: a container's pid
// does not change while it runs).
type Lister struct {
	endpoint string

	mu   sync.Mutex
	conn *grpc.ClientConn
	pids map[string]int // container id -> pid, of running containers
}

// NewLister returns a lister of the runtime at endpoint (unix:///path).
func NewLister(endpoint string) *Lister {
	return &Lister{endpoint: endpoint, pids: map[string]int{}}
}

// Close closes the connection.
func (l *Lister) Close() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.conn != nil {
		err := l.conn.Close()
		l.conn = nil
		return err
	}
	return nil
}

func (l *Lister) client() (runtimeapi.RuntimeServiceClient, error) {
	if l.conn == nil {
		if !strings.HasPrefix(l.endpoint, "unix://") {
			return nil, fmt.Errorf("CRI endpoint %q: want unix:///path", l.endpoint)
		}
		conn, err := grpc.NewClient(l.endpoint, grpc.WithTransportCredentials(insecure.NewCredentials()))
		if err != nil {
			return nil, fmt.Errorf("CRI endpoint %s: %w", l.endpoint, err)
		}
		l.conn = conn
	}
	return runtimeapi.NewRuntimeServiceClient(l.conn), nil
}

// ListContainers implements cgroup.Lister: ListPodSandbox (the pods),
// ListContainers, and ContainerStatus (verbose) for each running container
// not seen before.
func (l *Lister) ListContainers(ctx context.Context) ([]cgroup.Container, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	client, err := l.client()
	if err != nil {
		return nil, err
	}
	sbs, err := client.ListPodSandbox(ctx, &runtimeapi.ListPodSandboxRequest{})
	if err != nil {
		return nil, fmt.Errorf("list pod sandboxes: %w", err)
	}
	pods := make(map[string]flow.PodInfo, len(sbs.Items))
	for _, sb := range sbs.Items {
		md := sb.GetMetadata()
		pods[sb.Id] = flow.PodInfo{Name: md.GetName(), Namespace: md.GetNamespace(), UID: md.GetUid()}
	}
	list, err := client.ListContainers(ctx, &runtimeapi.ListContainersRequest{})
	if err != nil {
		return nil, fmt.Errorf("list containers: %w", err)
	}
	out := make([]cgroup.Container, 0, len(list.Containers))
	live := make(map[string]bool, len(list.Containers))
	for _, c := range list.Containers {
		ct := cgroup.Container{ID: c.Id, Name: c.GetMetadata().GetName(), Pod: pods[c.PodSandboxId]}
		if ct.Pod.Name == "" {
			// Kubelet's labels, for a sandbox not listed (racing).
			ct.Pod = flow.PodInfo{Name: c.Labels["io.kubernetes.pod.name"], Namespace: c.Labels["io.kubernetes.pod.namespace"], UID: c.Labels["io.kubernetes.pod.uid"]}
		}
		if c.State == runtimeapi.ContainerState_CONTAINER_RUNNING {
			live[c.Id] = true
			pid, ok := l.pids[c.Id]
			if !ok {
				st, err := client.ContainerStatus(ctx, &runtimeapi.ContainerStatusRequest{ContainerId: c.Id, Verbose: true})
				if err == nil {
					pid = containerPid(st.Info["info"])
					if pid > 0 {
						l.pids[c.Id] = pid
					}
				}
			}
			ct.Pid = pid
		}
		out = append(out, ct)
	}
	for id := range l.pids {
		if !live[id] {
			delete(l.pids, id)
		}
	}
	return out, nil
}

// containerPid reads the pid from a verbose ContainerStatus's "info"
// (containerd's and CRI-O's both have "pid").
func containerPid(raw string) int {
	var info struct {
		Pid int `json:"pid"`
	}
	if raw == "" || json.Unmarshal([]byte(raw), &info) != nil {
		return 0
	}
	return info.Pid
}
