package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/nsflow/nsflow/test/testenv"
)

const pauseImage = "docker.io/library/nsflow-pause:test"

// pauseArchive builds a docker-archive image holding a static pause
// binary (no registry is reachable: the image is made here).
func pauseArchive(t *testing.T, dir string) string {
	t.Helper()
	return imageArchive(t, dir, "./testdata/pause", pauseImage, "pause")
}

// containerd is a containerd with its CRI plugin and the CNI bridge plugin,
// started for the test with its own roots, socket and CNI network.
type containerd struct {
	dir, sock string
	cmd       *exec.Cmd
}

func (c *containerd) start(t *testing.T) {
	t.Helper()
	c.cmd = exec.Command("containerd", "--config", filepath.Join(c.dir, "config.toml"))
	logf, _ := os.OpenFile(filepath.Join(c.dir, "containerd.log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	c.cmd.Stdout, c.cmd.Stderr = logf, logf
	if err := c.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, 30*time.Second, "containerd up", func() bool {
		return exec.Command("ctr", "-a", c.sock, "version").Run() == nil
	})
}

func (c *containerd) stop() {
	if c.cmd == nil || c.cmd.ProcessState != nil {
		return
	}
	c.cmd.Process.Signal(syscall.SIGTERM)
	done := make(chan struct{})
	go func() { c.cmd.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(20 * time.Second):
		c.cmd.Process.Kill()
		<-done
	}
}

func startContainerd(t *testing.T) *containerd {
	t.Helper()
	return startContainerdNet(t, "nsfcni0", "10.213.170.0/24")
}

// startContainerdNet starts a containerd whose CNI network is a bridge of
// that name on that subnet (tests that may run at once use their own).
func startContainerdNet(t *testing.T, bridge, subnet string) *containerd {
	t.Helper()
	for _, tool := range []string{"containerd", "ctr", "runc", "/usr/lib/cni/bridge"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Fatalf("%s not installed (make deps): %v", tool, err)
		}
	}
	dir, err := os.MkdirTemp("", "nsflow-ctd-")
	if err != nil {
		t.Fatal(err)
	}
	c := &containerd{dir: dir, sock: filepath.Join(dir, "containerd.sock")}
	for _, d := range []string{"root", "state", "cni", "ipam"} {
		os.MkdirAll(filepath.Join(dir, d), 0o700)
	}
	def, err := exec.Command("containerd", "config", "default").Output()
	if err != nil {
		t.Fatal(err)
	}
	cfg := string(def)
	cfg = strings.Replace(cfg, `root = "/var/lib/containerd"`, fmt.Sprintf("root = %q", filepath.Join(dir, "root")), 1)
	cfg = strings.Replace(cfg, `state = "/run/containerd"`, fmt.Sprintf("state = %q", filepath.Join(dir, "state")), 1)
	cfg = regexp.MustCompile(`(\[grpc\]\n(?:.*\n)*?\s*address = )"[^"]*"`).ReplaceAllString(cfg, fmt.Sprintf("${1}%q", c.sock))
	cfg = regexp.MustCompile(`sandbox_image = "[^"]*"`).ReplaceAllString(cfg, fmt.Sprintf("sandbox_image = %q", pauseImage))
	cfg = regexp.MustCompile(`bin_dir = "[^"]*"`).ReplaceAllString(cfg, `bin_dir = "/usr/lib/cni"`)
	// Sandboxes ask for oom_score_adj -998, which needs CAP_SYS_RESOURCE:
	// this machine's bounding set lacks it, so clamp instead.
	cfg = strings.Replace(cfg, "restrict_oom_score_adj = false", "restrict_oom_score_adj = true", 1)
	cfg = regexp.MustCompile(`conf_dir = "[^"]*"`).ReplaceAllString(cfg, fmt.Sprintf("conf_dir = %q", filepath.Join(dir, "cni")))
	if err := os.WriteFile(filepath.Join(dir, "config.toml"), []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	// The CNI bridge plugin, with a subnet only this test uses; no NAT.
	conflist := fmt.Sprintf(`{"cniVersion": "1.0.0", "name": "nsflow-e2e", "plugins": [
  {"type": "bridge", "bridge": %q, "isGateway": true, "ipMasq": false,
   "ipam": {"type": "host-local", "ranges": [[{"subnet": %q}]], "dataDir": %q}}]}`, bridge, subnet, filepath.Join(dir, "ipam"))
	if err := os.WriteFile(filepath.Join(dir, "cni", "10-nsflow.conflist"), []byte(conflist), 0o600); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		c.stop()
		if t.Failed() {
			log, _ := os.ReadFile(filepath.Join(dir, "containerd.log"))
			t.Logf("containerd log (end):\n%s", log[max(0, len(log)-4000):])
		}
		exec.Command("ip", "link", "del", bridge).Run()
		// Shims outlive containerd: end any of this test's that remain.
		procs, _ := filepath.Glob("/proc/[0-9]*/cmdline")
		for _, p := range procs {
			if b, err := os.ReadFile(p); err == nil && strings.Contains(string(b), dir) && strings.Contains(string(b), "containerd-shim") {
				var pid int
				fmt.Sscanf(p, "/proc/%d/cmdline", &pid)
				syscall.Kill(pid, syscall.SIGKILL)
			}
		}
		mounts, _ := os.ReadFile("/proc/self/mounts")
		for _, l := range strings.Split(string(mounts), "\n") {
			if f := strings.Fields(l); len(f) > 1 && strings.HasPrefix(f[1], dir+"/") {
				syscall.Unmount(f[1], syscall.MNT_DETACH)
			}
		}
		os.RemoveAll(dir)
	})
	c.start(t)
	archive := pauseArchive(t, dir)
	if out, err := exec.Command("ctr", "-a", c.sock, "-n", "k8s.io", "images", "import", archive).CombinedOutput(); err != nil {
		t.Fatalf("import pause image: %v\n%s", err, out)
	}
	return c
}

// A pod sandbox created through CRI on a real containerd, its network
// wired by the real CNI bridge plugin: nsflow labels its traffic with the
// pod's name and namespace, with exact counts, and keeps exporting while
// the runtime is down.
func TestCRIPodIdentity(t *testing.T) {
	testenv.RequireRoot(t)
	ctd := startContainerd(t)
	conn, err := grpc.NewClient("unix://"+ctd.sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() }) // after the sandbox is removed (cleanups run last-in first-out)
	rt := runtimeapi.NewRuntimeServiceClient(conn)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	sb, _, nsName, nsIno := runSandbox(t, ctx, ctd, rt, &runtimeapi.PodSandboxConfig{
		Metadata:     &runtimeapi.PodSandboxMetadata{Name: "web-7d4f", Namespace: "shop", Uid: "e2e-uid-1"},
		Hostname:     "web",
		LogDirectory: filepath.Join(ctd.dir, "logs"),
		Linux:        &runtimeapi.LinuxPodSandboxConfig{},
	})
	srv := startServe(t, "http", "--cri.endpoint", "unix://"+ctd.sock, "--cri.interval", "1s",
		"--netns.host=false", "--netns.proc=false", "--netns.include", "^"+regexp.QuoteMeta(nsName)+"$")
	series := func(metric, iface string) string {
		return metric + fmt.Sprintf(`{direction="tx", interface=%q, namespace="shop", netns=%q, pod="web-7d4f"}`, iface, nsName)
	}
	waitUntil(t, 20*time.Second, "the sandbox's series labelled with its pod", func() bool {
		s, _ := srv.scrape(t)
		_, ok := s[series("nsflow_packets_total", "lo")]
		return ok
	})
	if out, err := exec.Command("ip", "netns", "exec", nsName, "ping", "-c", "3", "-i", "0.05", "127.0.0.1").CombinedOutput(); err != nil {
		t.Fatalf("ping in the sandbox: %v\n%s", err, out)
	}
	var kernel struct {
		Stats64 struct {
			Tx struct{ Packets float64 } `json:"tx"`
		} `json:"stats64"`
	}
	out, err := exec.Command("ip", "-n", nsName, "-s", "-j", "link", "show", "lo").Output()
	if err != nil {
		t.Fatal(err)
	}
	var links []json.RawMessage
	json.Unmarshal(out, &links)
	json.Unmarshal(links[0], &kernel)
	waitUntil(t, 5*time.Second, "the pod's lo count equal to the kernel's", func() bool {
		s, _ := srv.scrape(t)
		return s[series("nsflow_packets_total", "lo")] == kernel.Stats64.Tx.Packets
	})
	t.Logf("pod shop/web-7d4f (netns %s): lo tx %v packets, equal to the kernel's", nsName, kernel.Stats64.Tx.Packets)
	s0, _ := srv.scrape(t)
	if v, ok := s0["nsflow_cri_unresolved_sandboxes{}"]; !ok || v != 0 {
		t.Errorf("nsflow_cri_unresolved_sandboxes %v (present %v), want 0", v, ok)
	}

	// trace names the pod too.
	out, err = exec.Command(nsflowBin, "trace", "--netns", nsName, "--cri.endpoint", "unix://"+ctd.sock,
		"--duration", "1500ms", "--output", "json").Output()
	if err != nil {
		t.Fatalf("trace: %v", err)
	}
	var tr struct {
		Namespaces []struct {
			Pod *struct{ Name, Namespace string }
		}
	}
	if err := json.Unmarshal(out, &tr); err != nil || len(tr.Namespaces) != 1 || tr.Namespaces[0].Pod == nil ||
		tr.Namespaces[0].Pod.Name != "web-7d4f" || tr.Namespaces[0].Pod.Namespace != "shop" {
		t.Errorf("trace does not name the pod: %v\n%s", err, out)
	}
	validate(t, "trace.schema.json", out)
	// So does list.
	out, err = exec.Command(nsflowBin, "list", "-o", "json", "--cri.endpoint", "unix://"+ctd.sock,
		"--netns.host=false", "--netns.include", "^"+regexp.QuoteMeta(nsName)+"$").Output()
	if err != nil {
		t.Fatalf("list: %v", err)
	}
	var listed []struct {
		Name string
		Pod  *struct{ Name, Namespace string }
	}
	if err := json.Unmarshal(out, &listed); err != nil || len(listed) != 1 || listed[0].Pod == nil || listed[0].Pod.Name != "web-7d4f" {
		t.Errorf("list does not name the pod: %v\n%s", err, out)
	}

	// As in the image (FROM scratch: no /var), containerd's
	// /var/run/netns/... is found under /run/netns; the sandbox's pid is
	// out of sight (a pid namespace of its own with its /proc), so only
	// that can name the pod. With /run/netns hidden too, the sandbox's pid
	// does (/proc/PID/ns/net; the namespace is found through /proc).
	for _, c := range []struct {
		name string
		args []string
	}{
		{"no /var, no sandbox pid", []string{"--mount", "--propagation", "private", "--pid", "--fork", "--mount-proc", "sh", "-c", `mount -t tmpfs nsflow-novar /var && exec "$0" "$@"`}},
		{"no /var, no /run/netns", []string{"--mount", "--propagation", "private", "sh", "-c", `mount -t tmpfs nsflow-novar /var && mount -t tmpfs nsflow-nonetns /run/netns && exec "$0" "$@"`}},
	} {
		args := append(c.args, nsflowBin, "list", "-o", "json", "--cri.endpoint", "unix://"+ctd.sock, "--netns.host=false")
		out, err := exec.Command("unshare", args...).Output()
		if err != nil {
			t.Fatalf("%s: list: %v\n%s", c.name, err, out)
		}
		var listed []struct {
			Name  string
			Inode uint64
			Pod   *struct{ Name, Namespace string }
		}
		if err := json.Unmarshal(out, &listed); err != nil {
			t.Fatalf("%s: %v\n%s", c.name, err, out)
		}
		named := false
		for _, l := range listed {
			if l.Inode == nsIno {
				named = l.Pod != nil && l.Pod.Name == "web-7d4f" && l.Pod.Namespace == "shop"
				t.Logf("%s: the sandbox's namespace listed as %s, pod %+v", c.name, l.Name, l.Pod)
			}
		}
		if !named {
			t.Errorf("%s: the pod is not named:\n%s", c.name, out)
		}
	}

	// The runtime goes down: metrics go on; it comes back: labels stay.
	ctd.stop()
	waitUntil(t, 10*time.Second, "the exporter to notice the runtime is down", func() bool {
		return strings.Contains(srv.logText(), "pod identity from the container runtime")
	})
	s, _ := srv.scrape(t)
	if _, ok := s[series("nsflow_packets_total", "lo")]; !ok {
		t.Error("series lost while the runtime is down")
	}
	ctd.start(t)
	waitUntil(t, 20*time.Second, "labels after the runtime is back", func() bool {
		s, _ := srv.scrape(t)
		_, ok := s[series("nsflow_packets_total", "lo")]
		return ok
	})

	// The pod stops: its sandbox is no longer ready and containerd removes
	// its namespace; the namespace's last counts keep their pod labels
	// while it awaits its grace period, over several syncs.
	if _, err := rt.StopPodSandbox(ctx, &runtimeapi.StopPodSandboxRequest{PodSandboxId: sb.PodSandboxId}); err != nil {
		t.Fatalf("StopPodSandbox: %v", err)
	}
	waitUntil(t, 20*time.Second, "the stopped pod's namespace gone", func() bool {
		s, _ := srv.scrape(t)
		return s[`nsflow_namespaces{state="gone"}`] == 1
	})
	for deadline := time.Now().Add(3500 * time.Millisecond); time.Now().Before(deadline); time.Sleep(250 * time.Millisecond) {
		s, _ := srv.scrape(t)
		if v, ok := s[series("nsflow_packets_total", "lo")]; !ok || v != kernel.Stats64.Tx.Packets {
			t.Fatalf("after the pod stopped: its lo series %v (present %v), want %v with its pod labels", v, ok, kernel.Stats64.Tx.Packets)
		}
	}
}

func inodeOfPath(t *testing.T, path string) uint64 {
	t.Helper()
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	return st.Ino
}

// runSandbox runs a pod sandbox through the runtime and returns it with its
// network namespace (path, name, inode), read from the sandbox's verbose
// status. Cleanup stops and removes it (retrying while the runtime may be
// restarting), then whatever the runtime could not remove: processes still
// in the sandbox's namespace (a pause orphaned by a failed stop), the
// namespace, CNI's cache.
func runSandbox(t *testing.T, ctx context.Context, ctd *containerd, rt runtimeapi.RuntimeServiceClient, cfg *runtimeapi.PodSandboxConfig) (sb *runtimeapi.RunPodSandboxResponse, nsPath, nsName string, nsIno uint64) {
	t.Helper()
	sb, err := rt.RunPodSandbox(ctx, &runtimeapi.RunPodSandboxRequest{Config: cfg})
	if err != nil {
		log, _ := os.ReadFile(filepath.Join(ctd.dir, "containerd.log"))
		t.Fatalf("RunPodSandbox: %v\n%s", err, log)
	}
	t.Cleanup(func() {
		deadline := time.Now().Add(30 * time.Second)
		for {
			c, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			_, err := rt.StopPodSandbox(c, &runtimeapi.StopPodSandboxRequest{PodSandboxId: sb.PodSandboxId})
			if err == nil {
				_, err = rt.RemovePodSandbox(c, &runtimeapi.RemovePodSandboxRequest{PodSandboxId: sb.PodSandboxId})
			}
			cancel()
			if err == nil {
				return
			}
			if time.Now().After(deadline) {
				t.Errorf("remove pod sandbox: %v", err)
				return
			}
			time.Sleep(200 * time.Millisecond)
		}
	})
	st, err := rt.PodSandboxStatus(ctx, &runtimeapi.PodSandboxStatusRequest{PodSandboxId: sb.PodSandboxId, Verbose: true})
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`"type":"network","path":"([^"]+)"`).FindStringSubmatch(st.Info["info"])
	if m == nil {
		t.Fatalf("no network namespace in the sandbox status: %s", st.Info["info"])
	}
	nsPath, nsName = m[1], filepath.Base(m[1])
	nsIno = inodeOfPath(t, nsPath)
	t.Cleanup(func() {
		procs, _ := filepath.Glob("/proc/[0-9]*/ns/net")
		for _, p := range procs {
			var st syscall.Stat_t
			if syscall.Stat(p, &st) == nil && st.Ino == nsIno {
				var pid int
				fmt.Sscanf(p, "/proc/%d/", &pid)
				syscall.Kill(pid, syscall.SIGKILL)
			}
		}
		exec.Command("ip", "netns", "del", nsName).Run()
		cached, _ := filepath.Glob("/var/lib/cni/results/*" + sb.PodSandboxId + "*")
		for _, f := range cached {
			os.Remove(f)
		}
	})
	return sb, nsPath, nsName, nsIno
}
