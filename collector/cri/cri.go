// Package cri labels network namespaces with the Kubernetes pods they
// belong to, by asking the container runtime over the Container Runtime
// Interface (gRPC on its unix socket), as crictl and the kubelet do:
// ListPodSandbox, then PodSandboxStatus for each sandbox's network
// namespace path.
package cri

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/nsflow/nsflow/collector/flow"
)

// KnownEndpoints are tried, in order, when the endpoint is "auto".
var KnownEndpoints = []string{
	"unix:///run/containerd/containerd.sock",
	"unix:///run/crio/crio.sock",
	"unix:///var/run/cri-dockerd.sock",
}

// Detect returns the first known runtime socket that exists, or "".
func Detect() string {
	for _, e := range KnownEndpoints {
		if _, err := os.Stat(strings.TrimPrefix(e, "unix://")); err == nil {
			return e
		}
	}
	return ""
}

// Setter is what the enricher feeds (a *collector.Collector): an interface,
// so that this package depends on the model (collector/flow), not the engine.
type Setter interface {
	SetPods(map[uint64]flow.PodInfo)
}

// Config configures an Enricher.
type Config struct {
	// Endpoint is the runtime's CRI socket, unix:///path.
	Endpoint string
	// Interval is the resync period (new namespaces also trigger a sync:
	// Kick); 0 means 10 s.
	Interval time.Duration
	Logger   *slog.Logger
}

// Enricher keeps a Setter's pod map current.
type Enricher struct {
	cfg  Config
	set  Setter
	log  *slog.Logger
	kick chan struct{}

	mu    sync.Mutex
	conn  *grpc.ClientConn
	pods  map[uint64]flow.PodInfo // last known: kept while the runtime is down
	up    bool
	syncs uint64
}

// New returns an enricher; Run starts it.
func New(set Setter, cfg Config) *Enricher {
	if cfg.Interval <= 0 {
		cfg.Interval = 10 * time.Second
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	return &Enricher{cfg: cfg, set: set, log: cfg.Logger, kick: make(chan struct{}, 1), pods: map[uint64]flow.PodInfo{}}
}

// Kick asks for a sync soon (e.g. a namespace appeared).
func (e *Enricher) Kick() {
	select {
	case e.kick <- struct{}{}:
	default:
	}
}

// Up reports whether the last sync reached the runtime.
func (e *Enricher) Up() bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.up
}

// Run syncs until ctx is done, backing off while the runtime is down (the
// last known pods stay labelled meanwhile).
func (e *Enricher) Run(ctx context.Context) {
	defer func() {
		e.mu.Lock()
		if e.conn != nil {
			e.conn.Close()
		}
		e.mu.Unlock()
	}()
	backoff := time.Second
	for {
		err := e.Sync(ctx)
		wait := e.cfg.Interval
		if err != nil {
			e.log.Warn("pod identity from the container runtime", "endpoint", e.cfg.Endpoint, "err", err, "retry_in", backoff)
			wait, backoff = backoff, min(2*backoff, time.Minute)
		} else {
			backoff = time.Second
		}
		select {
		case <-ctx.Done():
			return
		case <-e.kick:
		case <-time.After(wait):
		}
	}
}

// Sync asks the runtime for every ready pod sandbox and its network
// namespace once.
func (e *Enricher) Sync(ctx context.Context) error {
	client, err := e.client()
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	list, err := client.ListPodSandbox(ctx, &runtimeapi.ListPodSandboxRequest{
		Filter: &runtimeapi.PodSandboxFilter{State: &runtimeapi.PodSandboxStateValue{State: runtimeapi.PodSandboxState_SANDBOX_READY}},
	})
	if err != nil {
		e.setUp(false)
		return fmt.Errorf("list pod sandboxes: %w", err)
	}
	pods := map[uint64]flow.PodInfo{}
	for _, sb := range list.Items {
		st, err := client.PodSandboxStatus(ctx, &runtimeapi.PodSandboxStatusRequest{PodSandboxId: sb.Id, Verbose: true})
		if err != nil {
			continue // gone meanwhile
		}
		path, err := netnsPath(st)
		if err != nil || path == "" {
			continue // host network, or not reported
		}
		var s unix.Stat_t
		if err := unix.Stat(path, &s); err != nil {
			continue
		}
		md := sb.Metadata
		pods[s.Ino] = flow.PodInfo{Name: md.GetName(), Namespace: md.GetNamespace(), UID: md.GetUid()}
	}
	e.mu.Lock()
	e.pods, e.up = pods, true
	e.syncs++
	e.mu.Unlock()
	e.set.SetPods(pods)
	return nil
}

func (e *Enricher) setUp(up bool) {
	e.mu.Lock()
	e.up = up
	e.mu.Unlock()
}

func (e *Enricher) client() (runtimeapi.RuntimeServiceClient, error) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.conn == nil {
		if !strings.HasPrefix(e.cfg.Endpoint, "unix://") {
			return nil, fmt.Errorf("CRI endpoint %q: want unix:///path", e.cfg.Endpoint)
		}
		conn, err := grpc.NewClient(e.cfg.Endpoint, grpc.WithTransportCredentials(insecure.NewCredentials()))
		if err != nil {
			return nil, fmt.Errorf("CRI endpoint %s: %w", e.cfg.Endpoint, err)
		}
		e.conn = conn
	}
	return runtimeapi.NewRuntimeServiceClient(e.conn), nil
}

// netnsPath finds the sandbox's network namespace path in the verbose
// status: the OCI runtime spec containerd and CRI-O report under "info".
func netnsPath(st *runtimeapi.PodSandboxStatusResponse) (string, error) {
	raw, ok := st.Info["info"]
	if !ok {
		return "", errors.New("no verbose info")
	}
	var info struct {
		RuntimeSpec struct {
			Linux struct {
				Namespaces []struct {
					Type string `json:"type"`
					Path string `json:"path"`
				} `json:"namespaces"`
			} `json:"linux"`
		} `json:"runtimeSpec"`
	}
	if err := json.Unmarshal([]byte(raw), &info); err != nil {
		return "", err
	}
	for _, ns := range info.RuntimeSpec.Linux.Namespaces {
		if ns.Type == "network" {
			return ns.Path, nil
		}
	}
	return "", nil
}
