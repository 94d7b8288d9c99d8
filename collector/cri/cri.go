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

// KnownEndpoints are tried, in order, when the endpoint is "auto". They are
// spelled under /run, not /var/run (a symlink to it on every current
// distribution): the image has no /var, and the DaemonSet mounts /run's
// sockets.
var KnownEndpoints = []string{
	"unix:///run/containerd/containerd.sock",
	"unix:///run/crio/crio.sock",
	"unix:///run/cri-dockerd.sock",
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
	// PodGeneration grows whenever the setter starts observing a
	// namespace; the enricher reads it before asking the runtime.
	PodGeneration() uint64
	// SetPods names namespaces by inode; gen is PodGeneration before the
	// runtime was asked (collector.Collector.SetPods).
	SetPods(pods map[uint64]flow.PodInfo, gen uint64)
}

// PathRewrite maps a prefix of the paths the runtime reports to where this
// process sees them.
type PathRewrite struct{ From, To string }

// DefaultRewrites are tried when a sandbox's namespace path does not exist
// as reported: containerd and CRI-O report /var/run/netns/..., and an image
// FROM scratch has no /var/run (on the host, /var/run is a symlink to /run);
// the DaemonSet mounts the host's /run/netns at /run/netns.
var DefaultRewrites = []PathRewrite{{From: "/var/run/", To: "/run/"}}

// Config configures an Enricher.
type Config struct {
	// Endpoint is the runtime's CRI socket, unix:///path.
	Endpoint string
	// Interval is the resync period (new namespaces also trigger a sync:
	// Kick); 0 means 10 s.
	Interval time.Duration
	// Rewrites are tried in order after a sandbox's namespace path as
	// reported; nil means DefaultRewrites.
	Rewrites []PathRewrite
	// Proc is the proc filesystem a ready sandbox's process is looked up in
	// last (/proc/PID/ns/net: the host's processes need hostPID); "" means
	// /proc.
	Proc   string
	Logger *slog.Logger
}

// Enricher keeps a Setter's pod map current.
type Enricher struct {
	cfg  Config
	set  Setter
	log  *slog.Logger
	kick chan struct{}

	mu         sync.Mutex
	conn       *grpc.ClientConn
	up         bool
	syncs      uint64
	nsfs       uint64          // device of the namespace filesystem (nsfs)
	logged     map[string]bool // ready sandboxes whose namespace was not found, logged once
	unresolved int
}

// New returns an enricher; Run starts it.
func New(set Setter, cfg Config) *Enricher {
	if cfg.Interval <= 0 {
		cfg.Interval = 10 * time.Second
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.Rewrites == nil {
		cfg.Rewrites = DefaultRewrites
	}
	if cfg.Proc == "" {
		cfg.Proc = "/proc"
	}
	return &Enricher{cfg: cfg, set: set, log: cfg.Logger, kick: make(chan struct{}, 1), logged: map[string]bool{}}
}

// Kick asks for a sync soon (e.g. a namespace appeared).
func (e *Enricher) Kick() {
	select {
	case e.kick <- struct{}{}:
	default:
	}
}

// Unresolved returns how many ready sandboxes with a network namespace of
// their own the last sync could not find (their pods are unnamed).
func (e *Enricher) Unresolved() int {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.unresolved
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
	var followUps []time.Duration // syncs still due after a kick
	for {
		err := e.Sync(ctx)
		wait := e.cfg.Interval
		if len(followUps) > 0 {
			wait, followUps = min(wait, followUps[0]), followUps[1:]
		}
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
			followUps = append(followUps[:0], KickFollowUps...)
		case <-time.After(wait):
		}
	}
}

// KickFollowUps are the delays of the syncs that follow a kick's own. A
// namespace appears while its sandbox is being made: containerd records
// the sandbox (and lists it) only once RunPodSandbox has set up its
// network, after the namespace exists, so the kick's own sync often misses
// it; these name the pod within about a second instead of a resync
// interval later.
var KickFollowUps = []time.Duration{250 * time.Millisecond, time.Second, 3 * time.Second}

// Sync asks the runtime once for every pod sandbox (ready, and not ready
// while its namespace still exists: a stopping pod) and finds its network
// namespace: the path the runtime reports, the same path rewritten
// (Rewrites: /var/run is /run), or, for a ready sandbox, its process's
// /proc/PID/ns/net. A ready sandbox whose namespace is found nowhere is
// logged once and counted (Unresolved).
func (e *Enricher) Sync(ctx context.Context) error {
	client, err := e.client()
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	gen := e.set.PodGeneration()
	list, err := client.ListPodSandbox(ctx, &runtimeapi.ListPodSandboxRequest{})
	if err != nil {
		e.setUp(false)
		return fmt.Errorf("list pod sandboxes: %w", err)
	}
	nsfs, err := e.nsfsDev()
	if err != nil {
		return err
	}
	pods := map[uint64]flow.PodInfo{}
	readyIno := map[uint64]bool{}
	type miss struct {
		sb  *runtimeapi.PodSandbox
		err error
	}
	var misses []miss
	listed := map[string]bool{}
	for _, sb := range list.Items {
		ready := sb.State == runtimeapi.PodSandboxState_SANDBOX_READY
		listed[sb.Id] = true
		st, err := client.PodSandboxStatus(ctx, &runtimeapi.PodSandboxStatusRequest{PodSandboxId: sb.Id, Verbose: true})
		if err != nil {
			continue // gone meanwhile
		}
		ino, err := e.resolve(st, ready, nsfs)
		if errors.Is(err, errNoNamespace) {
			continue // host network, or not (yet, any more) reported
		}
		if err != nil {
			if ready {
				misses = append(misses, miss{sb, err})
			}
			continue // a stopped sandbox's namespace is gone
		}
		if readyIno[ino] && !ready {
			continue // a ready sandbox's claim wins
		}
		md := sb.Metadata
		pods[ino] = flow.PodInfo{Name: md.GetName(), Namespace: md.GetNamespace(), UID: md.GetUid()}
		readyIno[ino] = ready
	}
	e.mu.Lock()
	for id := range e.logged {
		if !listed[id] {
			delete(e.logged, id)
		}
	}
	for _, m := range misses {
		if e.logged[m.sb.Id] {
			continue
		}
		e.logged[m.sb.Id] = true
		md := m.sb.Metadata
		e.log.Warn("pod sandbox's network namespace not found: its pod stays unnamed (mount the host's /run/netns, or run with hostPID)",
			"pod", flow.SafeName(md.GetName()), "namespace", flow.SafeName(md.GetNamespace()), "sandbox", m.sb.Id, "err", m.err)
	}
	e.unresolved = len(misses)
	e.up = true
	e.syncs++
	e.mu.Unlock()
	e.set.SetPods(pods, gen)
	return nil
}

// errNoNamespace: the sandbox has no network namespace of its own (host
// network), or the runtime does not (yet, or any more) report one.
var errNoNamespace = errors.New("no network namespace of its own")

// nsfsDev returns the device of the namespace filesystem: a path that
// stats on another device is not a namespace (e.g. a file left where a
// namespace was bind-mounted).
func (e *Enricher) nsfsDev() (uint64, error) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.nsfs == 0 {
		var st unix.Stat_t
		if err := unix.Stat("/proc/self/ns/net", &st); err != nil {
			return 0, fmt.Errorf("stat own network namespace: %w", err)
		}
		e.nsfs = st.Dev
	}
	return e.nsfs, nil
}

// resolve returns the inode of a sandbox's network namespace, trying the
// path the runtime reports, its rewrites, and (ready sandboxes only: a
// stopped one's pid may be another process's now) /proc/PID/ns/net.
func (e *Enricher) resolve(st *runtimeapi.PodSandboxStatusResponse, ready bool, nsfs uint64) (uint64, error) {
	if st.GetStatus().GetLinux().GetNamespaces().GetOptions().GetNetwork() == runtimeapi.NamespaceMode_NODE {
		return 0, errNoNamespace
	}
	si, err := parseInfo(st)
	if err != nil {
		return 0, errNoNamespace
	}
	if !si.own || si.closed {
		return 0, errNoNamespace
	}
	var tried []string // "path: why not"
	try := func(p string) (uint64, bool) {
		var s unix.Stat_t
		if err := unix.Stat(p, &s); err != nil {
			tried = append(tried, fmt.Sprintf("%s: %v", p, err))
			return 0, false
		}
		if s.Dev != nsfs {
			tried = append(tried, p+": not a namespace")
			return 0, false
		}
		return s.Ino, true
	}
	if si.path != "" {
		if ino, ok := try(si.path); ok {
			return ino, nil
		}
		for _, p := range rewrite(si.path, e.cfg.Rewrites) {
			if ino, ok := try(p); ok {
				return ino, nil
			}
		}
	}
	if ready && si.pid > 0 {
		if ino, ok := try(fmt.Sprintf("%s/%d/ns/net", e.cfg.Proc, si.pid)); ok {
			return ino, nil
		}
	}
	if len(tried) == 0 {
		return 0, errors.New("neither a path nor a process reported")
	}
	return 0, errors.New(strings.Join(tried, "; "))
}

// rewrite returns path under every rewrite whose prefix it has.
func rewrite(path string, rw []PathRewrite) []string {
	var out []string
	for _, r := range rw {
		if rest, ok := strings.CutPrefix(path, r.From); ok {
			out = append(out, r.To+rest)
		}
	}
	return out
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

// sandboxInfo is what the verbose status tells about a sandbox's network
// namespace.
type sandboxInfo struct {
	own    bool   // a network namespace of its own (not the host's)
	path   string // where the runtime mounted it ("" when not pinned)
	pid    int    // the sandbox's process (0 when not reported)
	closed bool   // the runtime says the namespace is gone
}

// parseInfo reads the verbose status's "info": containerd's SandboxInfo
// (pid, netNamespaceClosed, runtimeSpec, sandboxMetadata.NetNSPath) and
// CRI-O's (pid, runtimeSpec; only runtimeSpec when the infra container is
// dropped). The OCI runtime spec's network namespace entry tells whether
// the sandbox has a namespace of its own; its path is where the runtime
// mounted it (none when the namespace is the process's own).
func parseInfo(st *runtimeapi.PodSandboxStatusResponse) (sandboxInfo, error) {
	raw, ok := st.Info["info"]
	if !ok {
		return sandboxInfo{}, errors.New("no verbose info")
	}
	var info struct {
		Pid         int  `json:"pid"`
		NetNSClosed bool `json:"netNamespaceClosed"`
		RuntimeSpec *struct {
			Linux struct {
				Namespaces []struct {
					Type string `json:"type"`
					Path string `json:"path"`
				} `json:"namespaces"`
			} `json:"linux"`
		} `json:"runtimeSpec"`
		Metadata struct {
			Metadata struct {
				NetNSPath string
			}
		} `json:"sandboxMetadata"` // versioned: {"Version":"v1","Metadata":{...}}
	}
	if err := json.Unmarshal([]byte(raw), &info); err != nil {
		return sandboxInfo{}, err
	}
	si := sandboxInfo{pid: info.Pid, closed: info.NetNSClosed}
	if info.RuntimeSpec != nil {
		for _, ns := range info.RuntimeSpec.Linux.Namespaces {
			if ns.Type == "network" {
				si.own, si.path = true, ns.Path
			}
		}
	}
	if p := info.Metadata.Metadata.NetNSPath; si.path == "" && p != "" {
		// containerd before the sandbox's container is fully created.
		si.own, si.path = true, p
	}
	return si, nil
}
