package deploytest

import (
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
)

// counterKey names one nsflow_packets_total series of a pod, as the
// kernel's counters do: the namespace, the interface and the direction.
type counterKey struct{ netns, iface, dir string }

func (k counterKey) String() string { return k.netns + "/" + k.iface + "/" + k.dir }

// kernelPackets reads the packet counters of every interface of a named
// network namespace through netlink, in that namespace.
func kernelPackets(name string) (map[counterKey]uint64, error) {
	ns, err := netns.GetFromPath(filepath.Join("/run/netns", name))
	if err != nil {
		return nil, err
	}
	defer ns.Close()
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		return nil, err
	}
	defer h.Close()
	links, err := h.LinkList()
	if err != nil {
		return nil, err
	}
	out := map[counterKey]uint64{}
	for _, l := range links {
		a := l.Attrs()
		if a.Statistics == nil {
			return nil, fmt.Errorf("%s: no statistics", a.Name)
		}
		out[counterKey{name, a.Name, "rx"}] = a.Statistics.RxPackets
		out[counterKey{name, a.Name, "tx"}] = a.Statistics.TxPackets
	}
	return out, nil
}

// exported is one nsflow_packets_total series of the test's pods.
type exported struct {
	value         float64
	pod, podNS    string
	duplicateSeen bool // more than one series for the key
}

// scrapePackets scrapes url and returns the nsflow_packets_total series of
// the given namespaces (other tests' namespaces are ignored).
func scrapePackets(url string, names []string) (map[counterKey]exported, error) {
	code, body := httpGet(url)
	if code != 200 {
		return nil, fmt.Errorf("scrape: status %d: %.300s", code, body)
	}
	parser := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := parser.TextToMetricFamilies(strings.NewReader(body))
	if err != nil {
		return nil, fmt.Errorf("scrape does not parse: %v", err)
	}
	out := map[counterKey]exported{}
	f := fams["nsflow_packets_total"]
	if f == nil {
		return out, nil
	}
	for _, m := range f.Metric {
		l := map[string]string{}
		for _, p := range m.Label {
			l[p.GetName()] = p.GetValue()
		}
		if !slices.Contains(names, l["netns"]) {
			continue
		}
		k := counterKey{l["netns"], l["interface"], l["direction"]}
		e, dup := out[k]
		e.duplicateSeen = e.duplicateSeen || dup
		e.value += m.GetCounter().GetValue()
		e.pod, e.podNS = l["pod"], l["namespace"]
		out[k] = e
	}
	return out, nil
}

// The container image, run as deploy/kubernetes/daemonset.yaml runs it (its
// mounts, hostPID, hostNetwork, capabilities, user, seccomp, resources and
// arguments, translated by translate), observes pod sandboxes made through
// a real containerd's CRI with the CNI bridge plugin: every pod's
// nsflow_packets_total carries its pod and namespace labels, and each of
// its interfaces' counts equals the kernel's (lo: since the sandbox was
// made; every interface: over a window of traffic inside the sandboxes, to
// 127.0.0.1 and between them).
func TestDaemonSetAsDeployed(t *testing.T) {
	requireRoot(t)
	start := time.Now()
	phase := func(what string) { t.Logf("%5.1fs %s", time.Since(start).Seconds(), what) }
	need(t, "nsenter")
	need(t, "ping")
	b, err := os.ReadFile(filepath.Join(k8sDir, "daemonset.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	d, bad := translate(b)
	if len(bad) > 0 {
		t.Fatalf("daemonset.yaml cannot be run as deployed:\n%s", strings.Join(bad, "\n"))
	}

	for _, p := range d.create {
		if _, err := os.Stat(p); err == nil {
			continue
		}
		if err := os.MkdirAll(p, 0o755); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { os.Remove(p) }) // if still empty
	}
	for _, p := range d.mustExist {
		if st, err := os.Stat(p); err != nil || !st.IsDir() {
			t.Fatalf("the DaemonSet mounts %s, of type Directory, but it is no directory here: %v", p, err)
		}
	}

	// The test's containerd listens where a node's does, under
	// /run/containerd, in a directory of its own; the exporter reaches it
	// through the manifest's mount of that directory, or not at all.
	tag := fmt.Sprintf("nsflow-deploytest-%d", os.Getpid())
	sockDir := filepath.Join("/run/containerd", tag)
	inContainer := d.containerPath(sockDir)
	if inContainer == "" {
		t.Fatalf("the DaemonSet mounts no directory holding /run/containerd: the exporter cannot reach containerd's CRI socket (mounts %v)", d.mounts)
	}
	// A node's containerd makes its state directory /run/containerd with
	// mode 0711; a shim started by a containerd whose state is elsewhere
	// (as other tests' are) makes it 0600, which uid 0 without
	// CAP_DAC_OVERRIDE cannot search. Give it the mode a node has.
	if st, err := os.Stat("/run/containerd"); err == nil && st.Mode().Perm()&0o100 == 0 {
		t.Logf("/run/containerd has mode %v (made by a shim, not by a containerd): setting 0711, as containerd makes it", st.Mode().Perm())
		if err := os.Chmod("/run/containerd", st.Mode().Perm()|0o711); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { os.Chmod("/run/containerd", st.Mode().Perm()) })
	}
	pinPath := "/sys/fs/bpf/" + tag
	args := slices.Clone(d.args)
	port := freePort(t)
	args[d.listenFlag] = "--web.listen-address=127.0.0.1:" + strconv.Itoa(port)
	args = append(args, "--netns.include=^cni-", "--netns.host=false",
		"--cri.endpoint=unix://"+filepath.Join(inContainer, "containerd.sock"))
	if slices.Contains(args, "--pin") {
		if d.containerPath(pinPath) != pinPath {
			t.Fatalf("--pin, but the DaemonSet does not mount the bpffs at /sys/fs/bpf (mounts %v)", d.mounts)
		}
		args = append(args, "--pin.path="+pinPath)
	}

	docker := privateDocker(t)
	bin := buildNsflow(t)
	ctxDir := t.TempDir()
	if err := os.Rename(bin, filepath.Join(ctxDir, "nsflow")); err != nil {
		t.Fatal(err)
	}
	if out, err := docker("build", "-q", "-f", "../Dockerfile", "-t", d.image, ctxDir); err != nil {
		t.Fatalf("docker build: %v\n%s", err, out)
	}
	phase("image built, dockerd up")

	ctd := startContainerd(t, sockDir, "nsfdsd0", "10.213.175.0/24")
	pods := []sandbox{
		ctd.runSandbox(t, "dsd-shop", "web-a", tag+"-a"),
		ctd.runSandbox(t, "dsd-bank", "api-b", tag+"-b"),
	}
	phase("containerd up, two sandboxes")

	name := d.name + "-asdeployed"
	run := append(append([]string{"run", "-d", "--name", name}, d.runFlags...), d.image)
	run = append(run, args...)
	t.Cleanup(func() {
		// Pinned links outlive the container: removing the pins detaches them.
		if err := os.RemoveAll(pinPath); err != nil {
			t.Errorf("remove pins: %v", err)
		}
	})
	t.Cleanup(func() {
		if t.Failed() {
			logs, _ := docker("logs", "--tail", "60", name)
			t.Logf("docker %s\nexporter log (end):\n%s", strings.Join(run, " "), logs)
		}
		docker("stop", "-t", "10", name)
		docker("rm", "-f", name)
	})
	if out, err := docker(run...); err != nil {
		t.Fatalf("docker %s: %v\n%s", strings.Join(run, " "), err, out)
	}
	base := "http://127.0.0.1:" + strconv.Itoa(port)
	waitFor(t, 30*time.Second, "the kubelet's probes to answer 200", func() string {
		for _, p := range d.probes {
			if code, body := httpGet(base + p); code != 200 {
				return fmt.Sprintf("%s: %d %.200s", p, code, body)
			}
		}
		return ""
	})
	phase("exporter ready")

	// The process runs with exactly what the manifest grants.
	pid, err := docker("inspect", "-f", "{{.State.Pid}}", name)
	if err != nil {
		t.Fatalf("docker inspect: %v %s", err, pid)
	}
	st, err := procStatus(strings.TrimSpace(pid))
	if err != nil {
		t.Fatal(err)
	}
	if got := capNames(st["CapEff"]); !slices.Equal(got, d.capsEffective) {
		t.Errorf("the exporter's effective capabilities are %v, the manifest grants %v", got, d.capsEffective)
	}
	if bnd := capNames(st["CapBnd"]); !slices.Equal(bnd, d.capsEffective) {
		t.Errorf("the exporter's bounding set is %v, the manifest grants %v", bnd, d.capsEffective)
	}
	if want := map[bool]string{true: "1", false: "0"}[d.noNewPrivs]; st["NoNewPrivs"] != want {
		t.Errorf("NoNewPrivs %s, want %s", st["NoNewPrivs"], want)
	}
	if want := map[bool]string{true: "2", false: "0"}[d.seccompFilter]; st["Seccomp"] != want {
		t.Errorf("Seccomp mode %s, want %s", st["Seccomp"], want)
	}
	if environ, err := os.ReadFile("/proc/" + strings.TrimSpace(pid) + "/environ"); err != nil {
		t.Error(err)
	} else {
		for _, e := range d.env {
			if !slices.Contains(strings.Split(string(environ), "\x00"), e) {
				t.Errorf("the exporter's environment lacks %s", e)
			}
		}
	}
	for _, c := range checkMounts(strings.TrimSpace(pid), d) {
		t.Error(c)
	}
	if uid := strings.Fields(st["Uid"]); d.uid >= 0 && (len(uid) == 0 || uid[0] != strconv.Itoa(d.uid)) {
		t.Errorf("uid %v, the manifest says %d", uid, d.uid)
	}

	// A pod made while the exporter runs: its namespace reaches the
	// container through the mount's propagation.
	pods = append(pods, ctd.runSandbox(t, "dsd-shop", "worker-c", tag+"-c"))
	var names []string
	for _, p := range pods {
		names = append(names, p.netns)
		t.Logf("pod %s/%s: netns %s, %s", p.namespace, p.name, p.netns, p.ip)
	}
	phase("third sandbox")

	// Every pod's lo and eth0 are exported, both directions.
	var exp map[counterKey]exported
	waitFor(t, 30*time.Second, "every pod's lo and eth0 exported", func() string {
		if exp, err = scrapePackets(base+"/metrics", names); err != nil {
			return err.Error()
		}
		for _, n := range names {
			for _, k := range []counterKey{{n, "lo", "rx"}, {n, "lo", "tx"}, {n, "eth0", "rx"}, {n, "eth0", "tx"}} {
				if _, ok := exp[k]; !ok {
					return "no series " + k.String()
				}
			}
		}
		return ""
	})
	phase("every pod's interfaces exported")

	// snapshot reads the kernel's counters, the exporter's, and the
	// kernel's again, until nothing moved in the kernel meanwhile.
	snapshot := func() (map[counterKey]uint64, map[counterKey]exported) {
		t.Helper()
		deadline := time.Now().Add(10 * time.Second)
		for {
			k1, k2 := map[counterKey]uint64{}, map[counterKey]uint64{}
			for _, n := range names {
				k, err := kernelPackets(n)
				if err != nil {
					t.Fatal(err)
				}
				maps.Copy(k1, k)
			}
			e, err := scrapePackets(base+"/metrics", names)
			if err != nil {
				t.Fatal(err)
			}
			for _, n := range names {
				k, _ := kernelPackets(n)
				maps.Copy(k2, k)
			}
			if maps.Equal(k1, k2) || time.Now().After(deadline) {
				return k2, e
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	kBase, eBase := snapshot()

	// Bounded traffic inside each sandbox: to 127.0.0.1, and to the next
	// pod (on the test's own bridge).
	for i, p := range pods {
		ns := "--net=/run/netns/" + p.netns
		if out, err := runOut("nsenter", ns, "ping", "-q", "-c", "20", "-i", "0.01", "-w", "5", "127.0.0.1"); err != nil {
			t.Fatalf("ping 127.0.0.1 in %s: %v\n%s", p.name, err, out)
		}
		peer := pods[(i+1)%len(pods)]
		if out, err := runOut("nsenter", ns, "ping", "-q", "-c", "10", "-i", "0.01", "-w", "5", peer.ip); err != nil {
			t.Errorf("ping from %s to %s (%s) on the test's bridge: %v\n%s", p.name, peer.name, peer.ip, err, out)
		}
	}
	phase("traffic sent")

	// The exporter's counts equal the kernel's: lo's since the sandbox
	// was made (nothing crosses lo before the exporter attaches), every
	// interface's over the window of traffic.
	var kEnd map[counterKey]uint64
	var eEnd map[counterKey]exported
	var mismatches []string
	deadline := time.Now().Add(10 * time.Second)
	for {
		kEnd, eEnd = snapshot()
		mismatches = nil
		for k, kv := range kEnd {
			e, ok := eEnd[k]
			if !ok {
				if kv != kBase[k] {
					mismatches = append(mismatches, fmt.Sprintf("%s: not exported, kernel counted %d in the window", k, kv-kBase[k]))
				}
				continue
			}
			if e.duplicateSeen {
				mismatches = append(mismatches, fmt.Sprintf("%s: more than one series", k))
			}
			if got, want := e.value-eBase[k].value, float64(kv-kBase[k]); got != want {
				mismatches = append(mismatches, fmt.Sprintf("%s: exported %v in the window, kernel %v", k, got, want))
			}
			if k.iface == "lo" && e.value != float64(kv) {
				mismatches = append(mismatches, fmt.Sprintf("%s: exported %v in all, kernel %d", k, e.value, kv))
			}
		}
		if len(mismatches) == 0 || time.Now().After(deadline) {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	slices.Sort(mismatches)
	if len(mismatches) > 0 {
		t.Errorf("the exporter's nsflow_packets_total differs from the kernel's counters:\n%s", strings.Join(mismatches, "\n"))
	}
	for _, n := range names {
		for _, iface := range []string{"lo", "eth0"} {
			if d := kEnd[counterKey{n, iface, "tx"}] - kBase[counterKey{n, iface, "tx"}]; d < 20 {
				t.Errorf("%s %s: only %d packets sent in the window: the traffic did not happen", n, iface, d)
			}
		}
	}
	for _, p := range pods {
		var figures []string
		for _, iface := range []string{"lo", "eth0"} {
			for _, dir := range []string{"rx", "tx"} {
				k := counterKey{p.netns, iface, dir}
				figures = append(figures, fmt.Sprintf("%s %s %v/%d (all %v/%d)", iface, dir,
					eEnd[k].value-eBase[k].value, kEnd[k]-kBase[k], eEnd[k].value, kEnd[k]))
			}
		}
		t.Logf("%s/%s, exported/kernel packets in the window: %s", p.namespace, p.name, strings.Join(figures, ", "))
	}
	phase("counts equal to the kernel's")

	// Every pod's series carry its pod and namespace.
	var unlabelled, firstMiss []string
	labelled := time.Now()
	waitFor0(20*time.Second, func() bool {
		if firstMiss == nil && unlabelled != nil {
			firstMiss = unlabelled
		}
		e, err := scrapePackets(base+"/metrics", names)
		if err != nil {
			unlabelled = []string{err.Error()}
			return false
		}
		unlabelled = nil
		for _, p := range pods {
			n := 0
			for k, s := range e {
				if k.netns != p.netns {
					continue
				}
				n++
				if s.pod != p.name || s.podNS != p.namespace {
					unlabelled = append(unlabelled, fmt.Sprintf("%s: pod=%q namespace=%q, want %q %q", k, s.pod, s.podNS, p.name, p.namespace))
				}
			}
			if n < 4 {
				unlabelled = append(unlabelled, fmt.Sprintf("%s: %d series, want lo and eth0 both ways", p.netns, n))
			}
		}
		return len(unlabelled) == 0
	})
	if len(firstMiss) > 0 && len(unlabelled) == 0 {
		slices.Sort(firstMiss)
		t.Logf("labelled after %.1fs; at first:\n%s", time.Since(labelled).Seconds(), strings.Join(firstMiss, "\n"))
	}
	if len(unlabelled) > 0 {
		slices.Sort(unlabelled)
		t.Errorf("series without their pod's labels:\n%s", strings.Join(unlabelled, "\n"))
	}
	phase("pod labels")
}

// checkMounts compares what the process pid sees with what the manifest
// says: its root read-only or not, each volume mount read-only or not and
// with its propagation (a slave of the host's mount for HostToContainer),
// and its network and PID namespaces the host's (this test's) when
// hostNetwork and hostPID.
func checkMounts(pid string, d *deployment) []string {
	var bad []string
	b, err := os.ReadFile("/proc/" + pid + "/mountinfo")
	if err != nil {
		return []string{err.Error()}
	}
	type mi struct {
		ro       bool
		optional []string
	}
	mounts := map[string]mi{}
	for _, l := range strings.Split(string(b), "\n") {
		f := strings.Fields(l)
		if len(f) < 7 {
			continue
		}
		m := mi{ro: slices.Contains(strings.Split(f[5], ","), "ro")}
		for _, o := range f[6:] {
			if o == "-" {
				break
			}
			m.optional = append(m.optional, o)
		}
		mounts[f[4]] = m // the last one mounted at a path is the one seen
	}
	if root, ok := mounts["/"]; !ok || root.ro != d.readOnlyRoot {
		bad = append(bad, fmt.Sprintf("the exporter's root is read-only=%v, the manifest says %v", root.ro, d.readOnlyRoot))
	}
	for _, bd := range d.binds {
		m, ok := mounts[bd.path]
		if !ok {
			bad = append(bad, fmt.Sprintf("%s is not mounted in the exporter's container", bd.path))
			continue
		}
		if m.ro != bd.readOnly {
			bad = append(bad, fmt.Sprintf("%s is mounted read-only=%v, the manifest says %v", bd.path, m.ro, bd.readOnly))
		}
		has := func(prefix string) bool {
			return slices.ContainsFunc(m.optional, func(o string) bool { return strings.HasPrefix(o, prefix+":") })
		}
		switch {
		case bd.propagation == "master" && !has("master"):
			bad = append(bad, fmt.Sprintf("%s receives no mounts from the host (%v), the manifest says HostToContainer", bd.path, m.optional))
		case bd.propagation == "shared" && !has("shared"):
			bad = append(bad, fmt.Sprintf("%s is not shared (%v), the manifest says Bidirectional", bd.path, m.optional))
		case bd.propagation == "" && (has("master") || has("shared")):
			bad = append(bad, fmt.Sprintf("%s propagates (%v), the manifest says None", bd.path, m.optional))
		}
	}
	for _, ns := range []struct {
		name string
		host bool
	}{{"net", d.hostNetwork}, {"pid", d.hostPID}} {
		theirs, err1 := os.Readlink("/proc/" + pid + "/ns/" + ns.name)
		ours, err2 := os.Readlink("/proc/self/ns/" + ns.name)
		if err1 != nil || err2 != nil {
			bad = append(bad, fmt.Sprintf("ns/%s: %v %v", ns.name, err1, err2))
		} else if (theirs == ours) != ns.host {
			bad = append(bad, fmt.Sprintf("the exporter's %s namespace is %s, the host's %s: the manifest says host=%v", ns.name, theirs, ours, ns.host))
		}
	}
	return bad
}

// waitFor polls cond until it returns "" and fails with its last answer at
// the timeout.
func waitFor(t *testing.T, timeout time.Duration, what string, cond func() string) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		why := cond()
		if why == "" {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("waiting %v for %s: %s", timeout, what, why)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// waitFor0 polls cond until it is true or the timeout passes.
func waitFor0(timeout time.Duration, cond func() bool) bool {
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(200 * time.Millisecond)
	}
	return true
}
