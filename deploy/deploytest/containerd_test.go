package deploytest

// A containerd with its CRI plugin and the CNI bridge plugin, started by a
// test with its own roots, network and socket (after test/e2e/cri_test.go,
// which this module cannot import).

import (
	"archive/tar"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
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
)

const pauseImage = "docker.io/library/nsflow-pause:deploytest"

// pauseArchive makes a docker-archive image holding a static pause
// binary (test/e2e/testdata/pause; no registry is reachable) in dir.
func pauseArchive(t *testing.T, dir string) string {
	t.Helper()
	pause, err := os.ReadFile(buildOnce(t, "pause", "./test/e2e/testdata/pause"))
	if err != nil {
		t.Fatal(err)
	}
	var layer bytes.Buffer
	lw := tar.NewWriter(&layer)
	lw.WriteHeader(&tar.Header{Name: "pause", Mode: 0o755, Size: int64(len(pause)), ModTime: time.Unix(0, 0)})
	lw.Write(pause)
	lw.Close()
	diffID := sha256.Sum256(layer.Bytes())
	config, _ := json.Marshal(map[string]any{
		"architecture": "amd64", "os": "linux",
		"config": map[string]any{"Entrypoint": []string{"/pause"}},
		"rootfs": map[string]any{"type": "layers", "diff_ids": []string{"sha256:" + hex.EncodeToString(diffID[:])}},
	})
	cfgSum := sha256.Sum256(config)
	cfgName := hex.EncodeToString(cfgSum[:]) + ".json"
	manifest, _ := json.Marshal([]map[string]any{{"Config": cfgName, "RepoTags": []string{pauseImage}, "Layers": []string{"layer.tar"}}})
	archive := filepath.Join(dir, "pause.tar")
	f, err := os.Create(archive)
	if err != nil {
		t.Fatal(err)
	}
	tw := tar.NewWriter(f)
	for _, e := range []struct {
		name string
		data []byte
	}{{"layer.tar", layer.Bytes()}, {cfgName, config}, {"manifest.json", manifest}} {
		tw.WriteHeader(&tar.Header{Name: e.name, Mode: 0o644, Size: int64(len(e.data)), ModTime: time.Unix(0, 0)})
		tw.Write(e.data)
	}
	tw.Close()
	f.Close()
	return archive
}

// containerd is the test's containerd; rt its CRI runtime service.
type containerd struct {
	dir, sock string
	rt        runtimeapi.RuntimeServiceClient
}

// sandbox is a pod sandbox made through CRI.
type sandbox struct {
	id, name, namespace string
	netns               string // the namespace's name under /run/netns
	ip                  string
}

// startContainerd starts a containerd whose socket is sockDir/containerd.sock
// and whose CNI network is the bridge plugin on bridge with subnet; all is
// removed in t.Cleanup.
func startContainerd(t *testing.T, sockDir, bridge, subnet string) *containerd {
	t.Helper()
	for _, tool := range []string{"containerd", "ctr", "runc", "containerd-shim-runc-v2", "/usr/lib/cni/bridge", "/usr/lib/cni/host-local", "/usr/lib/cni/loopback"} {
		need(t, tool)
	}
	dir, err := os.MkdirTemp("", "nsflow-deploy-ctd-")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(sockDir, 0o700); err != nil {
		t.Fatal(err)
	}
	c := &containerd{dir: dir, sock: filepath.Join(sockDir, "containerd.sock")}
	for _, d := range []string{"root", "state", "cni", "ipam", "logs"} {
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
	// Sandboxes ask for oom_score_adj -998, which needs CAP_SYS_RESOURCE,
	// which a test machine's bounding set may lack: clamp instead.
	cfg = strings.Replace(cfg, "restrict_oom_score_adj = false", "restrict_oom_score_adj = true", 1)
	cfg = regexp.MustCompile(`conf_dir = "[^"]*"`).ReplaceAllString(cfg, fmt.Sprintf("conf_dir = %q", filepath.Join(dir, "cni")))
	if !strings.Contains(cfg, c.sock) || !strings.Contains(cfg, pauseImage) {
		t.Fatalf("containerd's default config did not take the test's socket and sandbox image:\n%s", cfg)
	}
	if err := os.WriteFile(filepath.Join(dir, "config.toml"), []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	// The CNI bridge plugin on a bridge and subnet of this test's only: no
	// gateway (no address on the host, no forwarding), no NAT; the pods
	// reach each other on the bridge.
	conflist := fmt.Sprintf(`{"cniVersion": "1.0.0", "name": "nsflow-deploytest", "plugins": [
  {"type": "bridge", "bridge": %q, "isGateway": false, "ipMasq": false,
   "ipam": {"type": "host-local", "ranges": [[{"subnet": %q}]], "dataDir": %q}}]}`, bridge, subnet, filepath.Join(dir, "ipam"))
	if err := os.WriteFile(filepath.Join(dir, "cni", "10-nsflow.conflist"), []byte(conflist), 0o600); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("containerd", "--config", filepath.Join(dir, "config.toml"))
	logf, _ := os.Create(filepath.Join(dir, "containerd.log"))
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Signal(syscall.SIGTERM)
		done := make(chan struct{})
		go func() { cmd.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(20 * time.Second):
			cmd.Process.Kill()
			<-done
		}
		if t.Failed() {
			log, _ := os.ReadFile(filepath.Join(dir, "containerd.log"))
			t.Logf("containerd log (end):\n%s", log[max(0, len(log)-3000):])
		}
		exec.Command("ip", "link", "del", bridge).Run()
		// Shims outlive containerd: end any of this test's that remain.
		procs, _ := filepath.Glob("/proc/[0-9]*/cmdline")
		for _, p := range procs {
			if b, err := os.ReadFile(p); err == nil && strings.Contains(string(b), "containerd-shim") &&
				(strings.Contains(string(b), dir) || strings.Contains(string(b), sockDir)) {
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
		os.RemoveAll(sockDir)
	})
	deadline := time.Now().Add(30 * time.Second)
	for exec.Command("ctr", "-a", c.sock, "version").Run() != nil {
		if time.Now().After(deadline) {
			log, _ := os.ReadFile(filepath.Join(dir, "containerd.log"))
			t.Fatalf("containerd did not start:\n%s", log)
		}
		time.Sleep(100 * time.Millisecond)
	}
	if out, err := exec.Command("ctr", "-a", c.sock, "-n", "k8s.io", "images", "import", pauseArchive(t, dir)).CombinedOutput(); err != nil {
		t.Fatalf("import pause image: %v\n%s", err, out)
	}
	conn, err := grpc.NewClient("unix://"+c.sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() }) // after the sandboxes are removed (cleanups run last-in first-out)
	c.rt = runtimeapi.NewRuntimeServiceClient(conn)
	return c
}

var nsPathRe = regexp.MustCompile(`"type":"network","path":"([^"]+)"`)

// runSandbox creates a pod sandbox through CRI (its network by the CNI
// plugin) and removes it, and whatever the runtime leaves of it, in t.Cleanup.
func (c *containerd) runSandbox(t *testing.T, namespace, name, uid string) sandbox {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	resp, err := c.rt.RunPodSandbox(ctx, &runtimeapi.RunPodSandboxRequest{Config: &runtimeapi.PodSandboxConfig{
		Metadata:     &runtimeapi.PodSandboxMetadata{Name: name, Namespace: namespace, Uid: uid},
		Hostname:     name,
		LogDirectory: filepath.Join(c.dir, "logs"),
		Linux:        &runtimeapi.LinuxPodSandboxConfig{},
	}})
	if err != nil {
		log, _ := os.ReadFile(filepath.Join(c.dir, "containerd.log"))
		t.Fatalf("RunPodSandbox %s/%s: %v\n%s", namespace, name, err, log[max(0, len(log)-3000):])
	}
	sb := sandbox{id: resp.PodSandboxId, name: name, namespace: namespace}
	t.Cleanup(func() {
		// A stop may fail once when the sandbox's shim went away under
		// the runtime ("ttrpc: closed"); the runtime then cleans it up and
		// the next attempt succeeds. What is left after 10 s is removed by
		// the cleanup below (processes, namespace, CNI cache).
		deadline := time.Now().Add(10 * time.Second)
		for {
			cctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			_, err := c.rt.StopPodSandbox(cctx, &runtimeapi.StopPodSandboxRequest{PodSandboxId: sb.id})
			if err == nil {
				_, err = c.rt.RemovePodSandbox(cctx, &runtimeapi.RemovePodSandboxRequest{PodSandboxId: sb.id})
			}
			cancel()
			if err == nil {
				return
			}
			if time.Now().After(deadline) {
				t.Logf("remove pod sandbox %s/%s through CRI: %v (removing what is left directly)", namespace, name, err)
				return
			}
			time.Sleep(200 * time.Millisecond)
		}
	})
	st, err := c.rt.PodSandboxStatus(ctx, &runtimeapi.PodSandboxStatusRequest{PodSandboxId: sb.id, Verbose: true})
	if err != nil {
		t.Fatal(err)
	}
	m := nsPathRe.FindStringSubmatch(st.Info["info"])
	if m == nil {
		t.Fatalf("no network namespace in the sandbox status: %s", st.Info["info"])
	}
	sb.netns = filepath.Base(m[1])
	if st.Status.GetNetwork() != nil {
		sb.ip = st.Status.Network.Ip
	}
	var ino uint64
	var fst syscall.Stat_t
	if syscall.Stat(m[1], &fst) == nil {
		ino = fst.Ino
	}
	t.Cleanup(func() {
		// Whatever the runtime could not remove: processes still in the
		// sandbox's namespace, the namespace, CNI's cache.
		procs, _ := filepath.Glob("/proc/[0-9]*/ns/net")
		for _, p := range procs {
			var st syscall.Stat_t
			if ino != 0 && syscall.Stat(p, &st) == nil && st.Ino == ino {
				var pid int
				fmt.Sscanf(p, "/proc/%d/", &pid)
				syscall.Kill(pid, syscall.SIGKILL)
			}
		}
		exec.Command("ip", "netns", "del", sb.netns).Run()
		cached, _ := filepath.Glob("/var/lib/cni/results/*" + sb.id + "*")
		for _, f := range cached {
			os.Remove(f)
		}
	})
	return sb
}
