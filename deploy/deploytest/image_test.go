package deploytest

import (
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	"sigs.k8s.io/yaml"
)

// privateDocker starts a Docker daemon of the test's own (its own data
// root and socket; iptables untouched, no bridge: the container uses the
// host's network as the DaemonSet does) and stops it at the end.
//
// It runs in a mount namespace of its own whose mounts are all shared, as
// on a node whose init is systemd: Docker (like containerd's CRI) refuses a
// HostToContainer (rslave) mount whose source is on a private mount, and a
// test machine's root may be private. The host's mounts are untouched but
// /run/netns, made a shared mount first as `ip netns` makes it
// (netnsShared), which keeps propagating from the host into the daemon's
// containers.
func privateDocker(t *testing.T) (docker func(args ...string) (string, error)) {
	t.Helper()
	need(t, "dockerd")
	need(t, "unshare")
	client := need(t, "docker")
	netnsShared(t) // before the daemon's mount namespace is made
	dir, err := os.MkdirTemp("", "nsflow-docker-")
	if err != nil {
		t.Fatal(err)
	}
	sock := "unix://" + filepath.Join(dir, "docker.sock")
	d := exec.Command("unshare", "--mount", "--propagation", "unchanged", "--",
		"sh", "-c", `mount --make-rshared / && exec dockerd "$@"`, "dockerd",
		"--iptables=false", "--ip6tables=false", "--bridge=none",
		"--data-root", filepath.Join(dir, "data"), "--exec-root", filepath.Join(dir, "exec"),
		"--pidfile", filepath.Join(dir, "docker.pid"), "-H", sock)
	logf, _ := os.Create(filepath.Join(dir, "dockerd.log"))
	d.Stdout, d.Stderr = logf, logf
	if err := d.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		d.Process.Signal(os.Interrupt)
		done := make(chan struct{})
		go func() { d.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(20 * time.Second):
			d.Process.Kill()
			<-done
		}
		// dockerd leaves mounts under its roots (e.g. exec/netns/default).
		mounts, _ := os.ReadFile("/proc/self/mounts")
		for _, l := range strings.Split(string(mounts), "\n") {
			if f := strings.Fields(l); len(f) > 1 && strings.HasPrefix(f[1], dir+"/") {
				syscall.Unmount(f[1], syscall.MNT_DETACH)
			}
		}
		os.RemoveAll(dir)
	})
	docker = func(args ...string) (string, error) {
		out, err := exec.Command(client, append([]string{"-H", sock}, args...)...).CombinedOutput()
		return string(out), err
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		if _, err := docker("version"); err == nil {
			return docker
		}
		if time.Now().After(deadline) {
			log, _ := os.ReadFile(filepath.Join(dir, "dockerd.log"))
			t.Fatalf("dockerd did not start:\n%s", log)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// The image, built from deploy/Dockerfile, runs with the DaemonSet's
// security settings (translated to docker flags from daemonset.yaml) and
// exports exact counts of a pod on the host.
func TestImageWithDaemonSetSettings(t *testing.T) {
	requireRoot(t)
	iptablesBefore, _ := exec.Command("iptables", "-S", "FORWARD").CombinedOutput()
	docker := privateDocker(t)
	bin := buildNsflow(t)
	ctx := t.TempDir()
	if err := os.Rename(bin, filepath.Join(ctx, "nsflow")); err != nil {
		t.Fatal(err)
	}
	if out, err := docker("build", "-q", "-f", "../Dockerfile", "-t", "nsflow:deploytest", ctx); err != nil {
		t.Fatalf("docker build: %v\n%s", err, out)
	}

	var ds appsv1.DaemonSet
	b, err := os.ReadFile(filepath.Join(k8sDir, "daemonset.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	if err := yaml.UnmarshalStrict(b, &ds); err != nil {
		t.Fatal(err)
	}
	spec := ds.Spec.Template.Spec
	c := spec.Containers[0]
	args := []string{"run", "-d", "--name", "nsflow-deploytest"}
	if spec.HostNetwork {
		args = append(args, "--network", "host")
	}
	if spec.HostPID {
		args = append(args, "--pid", "host")
	}
	for _, cp := range c.SecurityContext.Capabilities.Drop {
		args = append(args, "--cap-drop", string(cp))
	}
	for _, cp := range c.SecurityContext.Capabilities.Add {
		args = append(args, "--cap-add", string(cp))
	}
	if *c.SecurityContext.ReadOnlyRootFilesystem {
		args = append(args, "--read-only")
	}
	if !*c.SecurityContext.AllowPrivilegeEscalation {
		args = append(args, "--security-opt", "no-new-privileges")
	}
	hostPaths := map[string]string{}
	for _, v := range spec.Volumes {
		hostPaths[v.Name] = v.HostPath.Path
		// docker run -v creates a missing source directory: remove it
		// afterwards (if still empty), as the machine is reused.
		if _, err := os.Stat(v.HostPath.Path); err != nil {
			p := v.HostPath.Path
			t.Cleanup(func() { os.Remove(p) })
		}
	}
	for _, m := range c.VolumeMounts {
		opt := "rw"
		if m.ReadOnly {
			opt = "ro"
		}
		if m.MountPropagation != nil && *m.MountPropagation == "HostToContainer" {
			opt += ",rslave"
		}
		args = append(args, "-v", hostPaths[m.Name]+":"+m.MountPath+":"+opt)
	}
	const pod = "deploy-img"
	podBin := filepath.Join(ctx, "nsflow")
	if out, err := exec.Command(podBin, "pod", "create", pod, "--subnet", "10.213.161.0/24").CombinedOutput(); err != nil {
		t.Fatalf("pod create: %v\n%s", err, out)
	}
	t.Cleanup(func() { exec.Command(podBin, "pod", "delete", pod).Run() })
	port := freePort(t)
	// The DaemonSet's arguments, on a test port and limited to the test's pod.
	args = append(args, "nsflow:deploytest", "serve", "--web.listen-address", "127.0.0.1:"+strconv.Itoa(port),
		"--netns.host=false", "--netns.include", "^"+pod+"$")
	if out, err := docker(args...); err != nil {
		t.Fatalf("docker run: %v\n%s", err, out)
	}
	t.Cleanup(func() { docker("rm", "-f", "nsflow-deploytest") })

	series := fmt.Sprintf(`nsflow_packets_total{direction="tx",interface="lo",namespace="",netns=%q,pod=""}`, pod)
	value := func() string {
		resp, err := http.Get(fmt.Sprintf("http://127.0.0.1:%d/metrics", port))
		if err != nil {
			return ""
		}
		defer resp.Body.Close()
		var sb strings.Builder
		buf := make([]byte, 32<<10)
		for {
			n, err := resp.Body.Read(buf)
			sb.Write(buf[:n])
			if err != nil {
				break
			}
		}
		for _, l := range strings.Split(sb.String(), "\n") {
			if v, ok := strings.CutPrefix(l, series+" "); ok {
				return v
			}
		}
		return ""
	}
	deadline := time.Now().Add(30 * time.Second)
	for value() == "" {
		if time.Now().After(deadline) {
			logs, _ := docker("logs", "nsflow-deploytest")
			ps, _ := docker("ps", "-a")
			t.Fatalf("the container never exported the pod (run with %v):\n%s\n%s", args, ps, logs)
		}
		time.Sleep(50 * time.Millisecond)
	}
	if out, err := exec.Command(podBin, "pod", "exec", pod, "--", "ping", "-c", "3", "-i", "0.05", "127.0.0.1").CombinedOutput(); err != nil {
		t.Fatalf("ping: %v\n%s", err, out)
	}
	want := strconv.FormatUint(loTx(t, pod), 10)
	deadline = time.Now().Add(5 * time.Second)
	for value() != want && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	if got := value(); got != want {
		t.Errorf("lo tx from the container: %s, kernel %s", got, want)
	}
	if out, err := docker("rm", "-f", "nsflow-deploytest"); err != nil {
		t.Errorf("docker rm: %v %s", err, out)
	}
	if after, _ := exec.Command("iptables", "-S", "FORWARD").CombinedOutput(); string(after) != string(iptablesBefore) {
		t.Errorf("the iptables FORWARD chain changed:\n%s\n%s", iptablesBefore, after)
	}
}
