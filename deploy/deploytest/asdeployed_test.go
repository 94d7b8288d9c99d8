package deploytest

// TestDaemonSetAsDeployed: the image as the DaemonSet runs it (every field
// of daemonset.yaml translated to a docker run of a private daemon, or the
// test fails on it as unsupported), observing pod sandboxes made through
// the CRI of a real containerd with the CNI bridge plugin.

import (
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	"sigs.k8s.io/yaml"
)

// manifestFields is every field daemonset.yaml may set, and what the test
// makes of it. A field not listed fails the test as unsupported, so the
// test cannot drift from the manifest: a new field is either translated to
// the docker run below or listed here as outside a container runtime's
// reach, with the reason. "[]" stands for any list index, "*" for any label
// key.
var manifestFields = map[string]string{
	"apiVersion": "checked: apps/v1",
	"kind":       "checked: DaemonSet",

	// The API object and the controller: nothing a node runs.
	"metadata.name":                                    "API object name",
	"metadata.labels.*":                                "API object labels",
	"spec.selector.matchLabels.*":                      "controller selector",
	"spec.updateStrategy.type":                         "controller rollout",
	"spec.updateStrategy.rollingUpdate.maxUnavailable": "controller rollout",
	"spec.template.metadata.labels.*":                  "pod labels (selector)",

	// The pod.
	"spec.template.spec.serviceAccountName":           "API identity: with automountServiceAccountToken false nothing of it reaches the container",
	"spec.template.spec.automountServiceAccountToken": "translated: must be false (no token volume to mount)",
	"spec.template.spec.hostNetwork":                  "translated: --network=host",
	"spec.template.spec.hostPID":                      "translated: --pid=host",
	"spec.template.spec.dnsPolicy":                    "resolver configuration: nsflow resolves no names",
	"spec.template.spec.priorityClassName":            "scheduling and eviction order",
	"spec.template.spec.tolerations[].key":            "scheduling",
	"spec.template.spec.tolerations[].operator":       "scheduling",
	"spec.template.spec.tolerations[].value":          "scheduling",
	"spec.template.spec.tolerations[].effect":         "scheduling",
	"spec.template.spec.volumes[].name":               "translated: the mounts that name it",
	"spec.template.spec.volumes[].hostPath.path":      "translated: bind mount source",
	"spec.template.spec.volumes[].hostPath.type":      "translated: Directory must exist, DirectoryOrCreate is created (as the kubelet does)",

	// The container.
	"spec.template.spec.containers[].name":                                     "translated: the container's name",
	"spec.template.spec.containers[].image":                                    "translated: the image built from deploy/Dockerfile is tagged with this name",
	"spec.template.spec.containers[].env[].name":                               "translated: --env NAME=VALUE",
	"spec.template.spec.containers[].env[].value":                              "translated: --env NAME=VALUE (valueFrom is not supported)",
	"spec.template.spec.containers[].args[]":                                   "translated: the container's arguments (the listen address on a free port, and the test's scope flags added)",
	"spec.template.spec.containers[].ports[].name":                             "translated: the probes' named port",
	"spec.template.spec.containers[].ports[].containerPort":                    "checked: the port of --web.listen-address (the test listens on a free one)",
	"spec.template.spec.containers[].ports[].protocol":                         "checked: TCP",
	"spec.template.spec.containers[].securityContext.privileged":               "translated: --privileged when true",
	"spec.template.spec.containers[].securityContext.allowPrivilegeEscalation": "translated: no-new-privileges when false (checked: NoNewPrivs in /proc)",
	"spec.template.spec.containers[].securityContext.readOnlyRootFilesystem":   "translated: --read-only",
	"spec.template.spec.containers[].securityContext.runAsUser":                "translated: --user (checked: the process's uid)",
	"spec.template.spec.containers[].securityContext.runAsGroup":               "translated: --user UID:GID",
	"spec.template.spec.containers[].securityContext.capabilities.drop[]":      "translated: --cap-drop (checked: CapEff in /proc)",
	"spec.template.spec.containers[].securityContext.capabilities.add[]":       "translated: --cap-add (checked: CapEff in /proc)",
	"spec.template.spec.containers[].securityContext.seccompProfile.type":      "translated: RuntimeDefault is the runtime's default profile (checked: Seccomp filter mode in /proc), Unconfined is seccomp=unconfined",
	"spec.template.spec.containers[].livenessProbe.httpGet.path":               "translated: probed, must answer 200",
	"spec.template.spec.containers[].livenessProbe.httpGet.port":               "translated: the named port",
	"spec.template.spec.containers[].livenessProbe.periodSeconds":              "the kubelet's probe schedule",
	"spec.template.spec.containers[].readinessProbe.httpGet.path":              "translated: probed, must answer 200",
	"spec.template.spec.containers[].readinessProbe.httpGet.port":              "translated: the named port",
	"spec.template.spec.containers[].readinessProbe.periodSeconds":             "the kubelet's probe schedule",
	"spec.template.spec.containers[].resources.requests.cpu":                   "translated: --cpu-shares as the kubelet computes them (milli-CPU x 1024 / 1000)",
	"spec.template.spec.containers[].resources.requests.memory":                "scheduling only: the kubelet sets no cgroup value for a memory request",
	"spec.template.spec.containers[].resources.limits.memory":                  "translated: --memory (BPF maps are charged to this cgroup too)",
	"spec.template.spec.containers[].resources.limits.cpu":                     "translated: --cpus",
	"spec.template.spec.containers[].volumeMounts[].name":                      "translated: the volume's hostPath",
	"spec.template.spec.containers[].volumeMounts[].mountPath":                 "translated: bind mount target",
	"spec.template.spec.containers[].volumeMounts[].readOnly":                  "translated: readonly bind",
	"spec.template.spec.containers[].volumeMounts[].mountPropagation":          "translated: HostToContainer is rslave, Bidirectional rshared, None rprivate",
}

// fieldPaths lists the leaves of a decoded YAML document as dotted paths
// ("[]" for list indices, "*" for the keys of label maps).
func fieldPaths(prefix string, v any, out *[]string) {
	switch v := v.(type) {
	case map[string]any:
		if len(v) == 0 {
			*out = append(*out, prefix)
		}
		for k, e := range v {
			if strings.HasSuffix(prefix, ".labels") || strings.HasSuffix(prefix, ".matchLabels") || prefix == "labels" {
				k = "*"
			}
			p := k
			if prefix != "" {
				p = prefix + "." + k
			}
			fieldPaths(p, e, out)
		}
	case []any:
		if len(v) == 0 {
			*out = append(*out, prefix+"[]")
		}
		for _, e := range v {
			fieldPaths(prefix+"[]", e, out)
		}
	default:
		*out = append(*out, prefix)
	}
}

// deployment is daemonset.yaml translated to a docker run.
type deployment struct {
	name, image   string
	runFlags      []string          // docker run flags
	args          []string          // the container's arguments from the manifest
	listenFlag    int               // index in args of --web.listen-address (-1: none)
	port          int               // the container port the probes and the listen address use
	probes        []string          // HTTP paths the kubelet probes
	mounts        map[string]string // host path: container path
	create        []string          // hostPath DirectoryOrCreate: made before the run, as the kubelet does
	mustExist     []string          // hostPath Directory: the run fails unless it exists
	capsEffective []string          // the capabilities the process must hold (CAP_ names)
	uid           int
	env           []string // NAME=VALUE the process must have
	readOnlyRoot  bool
	hostPID       bool
	hostNetwork   bool
	binds         []bind // the mounts as the process must see them
	noNewPrivs    bool
	seccompFilter bool
}

// bind is a volume mount as the container's process must see it in its
// mountinfo.
type bind struct {
	path        string
	readOnly    bool
	propagation string // "master" (HostToContainer), "shared" (Bidirectional) or ""
}

// containerPath maps a host path to where the manifest's mounts show it in
// the container ("" if no mount does).
func (d *deployment) containerPath(host string) string {
	best, bestHost := "", ""
	for h, c := range d.mounts {
		if (host == h || strings.HasPrefix(host, h+"/")) && len(h) > len(bestHost) {
			best, bestHost = c+strings.TrimPrefix(host, h), h
		}
	}
	return best
}

// allCaps are the Linux capabilities by number (capability.h).
var allCaps = []string{"CHOWN", "DAC_OVERRIDE", "DAC_READ_SEARCH", "FOWNER", "FSETID", "KILL", "SETGID",
	"SETUID", "SETPCAP", "LINUX_IMMUTABLE", "NET_BIND_SERVICE", "NET_BROADCAST", "NET_ADMIN", "NET_RAW",
	"IPC_LOCK", "IPC_OWNER", "SYS_MODULE", "SYS_RAWIO", "SYS_CHROOT", "SYS_PTRACE", "SYS_PACCT", "SYS_ADMIN",
	"SYS_BOOT", "SYS_NICE", "SYS_RESOURCE", "SYS_TIME", "SYS_TTY_CONFIG", "MKNOD", "LEASE", "AUDIT_WRITE",
	"AUDIT_CONTROL", "SETFCAP", "MAC_OVERRIDE", "MAC_ADMIN", "SYSLOG", "WAKE_ALARM", "BLOCK_SUSPEND",
	"AUDIT_READ", "PERFMON", "BPF", "CHECKPOINT_RESTORE"}

// dockerDefaultCaps is Docker's default capability set (what --cap-drop
// starts from).
var dockerDefaultCaps = []string{"CHOWN", "DAC_OVERRIDE", "FSETID", "FOWNER", "MKNOD", "NET_RAW", "SETGID",
	"SETUID", "SETFCAP", "SETPCAP", "NET_BIND_SERVICE", "SYS_CHROOT", "KILL", "AUDIT_WRITE"}

// translate reads daemonset.yaml and returns it as a docker run, or the
// reasons it cannot (each "unsupported field ..." or "unsupported value ...").
func translate(manifest []byte) (*deployment, []string) {
	var bad []string
	var generic map[string]any
	if err := yaml.Unmarshal(manifest, &generic); err != nil {
		return nil, []string{err.Error()}
	}
	var paths []string
	fieldPaths("", generic, &paths)
	slices.Sort(paths)
	for _, p := range paths {
		if _, ok := manifestFields[p]; !ok {
			bad = append(bad, fmt.Sprintf("unsupported field %s: TestDaemonSetAsDeployed does not know how to honour it (translate it, or list it in manifestFields with the reason it does not apply)", p))
		}
	}
	var ds appsv1.DaemonSet
	if err := yaml.UnmarshalStrict(manifest, &ds); err != nil {
		return nil, append(bad, err.Error())
	}
	if ds.APIVersion != "apps/v1" || ds.Kind != "DaemonSet" {
		bad = append(bad, fmt.Sprintf("unsupported value: %s %s, want apps/v1 DaemonSet", ds.APIVersion, ds.Kind))
	}
	spec := ds.Spec.Template.Spec
	if len(spec.Containers) != 1 {
		return nil, append(bad, fmt.Sprintf("unsupported value: %d containers, the test runs one", len(spec.Containers)))
	}
	c := spec.Containers[0]
	d := &deployment{name: c.Name, image: c.Image, listenFlag: -1, mounts: map[string]string{}, uid: -1}
	if spec.AutomountServiceAccountToken == nil || *spec.AutomountServiceAccountToken {
		bad = append(bad, "unsupported value: automountServiceAccountToken must be false (the test mounts no token)")
	}
	d.hostNetwork, d.hostPID = spec.HostNetwork, spec.HostPID
	if spec.HostNetwork {
		d.runFlags = append(d.runFlags, "--network=host")
	} else {
		bad = append(bad, "unsupported value: hostNetwork false (the test's private dockerd has no bridge)")
	}
	if spec.HostPID {
		d.runFlags = append(d.runFlags, "--pid=host")
	}

	// Ports and probes.
	named := map[string]int{}
	for _, p := range c.Ports {
		if p.Protocol != "" && p.Protocol != corev1.ProtocolTCP {
			bad = append(bad, fmt.Sprintf("unsupported value: port %s protocol %s", p.Name, p.Protocol))
		}
		named[p.Name] = int(p.ContainerPort)
		d.port = int(p.ContainerPort)
	}
	if len(c.Ports) != 1 {
		bad = append(bad, fmt.Sprintf("unsupported value: %d container ports, the test maps one", len(c.Ports)))
	}
	for _, pr := range []*corev1.Probe{c.LivenessProbe, c.ReadinessProbe} {
		if pr == nil {
			continue
		}
		if pr.HTTPGet == nil {
			bad = append(bad, "unsupported value: a probe that is not httpGet")
			continue
		}
		port := pr.HTTPGet.Port.IntValue()
		if pr.HTTPGet.Port.StrVal != "" {
			port = named[pr.HTTPGet.Port.StrVal]
		}
		if port != d.port {
			bad = append(bad, fmt.Sprintf("unsupported value: probe port %s is not the container port %d", pr.HTTPGet.Port.String(), d.port))
		}
		d.probes = append(d.probes, pr.HTTPGet.Path)
	}

	for _, e := range c.Env {
		if e.ValueFrom != nil {
			bad = append(bad, fmt.Sprintf("unsupported value: env %s from valueFrom", e.Name)) // also caught as a field
			continue
		}
		d.runFlags = append(d.runFlags, "--env="+e.Name+"="+e.Value)
		d.env = append(d.env, e.Name+"="+e.Value)
	}

	// Arguments: the manifest's, with the flags the test replaces found.
	d.args = slices.Clone(c.Args)
	for i, a := range d.args {
		if v, ok := strings.CutPrefix(a, "--web.listen-address="); ok {
			d.listenFlag = i
			if !strings.HasSuffix(v, ":"+strconv.Itoa(d.port)) {
				bad = append(bad, fmt.Sprintf("unsupported value: --web.listen-address %q is not on the container port %d", v, d.port))
			}
		} else if a == "--web.listen-address" {
			bad = append(bad, "unsupported value: write --web.listen-address=ADDR as one argument")
		}
		for _, f := range testFlags {
			if a == f || strings.HasPrefix(a, f+"=") {
				bad = append(bad, fmt.Sprintf("unsupported value: the manifest sets %s, which the test sets to stay on its own pods", f))
			}
		}
	}
	if len(d.args) == 0 || d.args[0] != "serve" {
		bad = append(bad, fmt.Sprintf("unsupported value: args %q do not run serve", d.args))
	}
	if d.listenFlag < 0 {
		bad = append(bad, "unsupported value: no --web.listen-address= in args")
	}

	// Security context.
	sc := c.SecurityContext
	if sc == nil {
		sc = &corev1.SecurityContext{}
	}
	caps := slices.Clone(dockerDefaultCaps)
	if sc.Privileged != nil && *sc.Privileged {
		d.runFlags = append(d.runFlags, "--privileged")
		caps = slices.Clone(allCaps)
	}
	d.noNewPrivs = sc.AllowPrivilegeEscalation != nil && !*sc.AllowPrivilegeEscalation
	if d.noNewPrivs {
		d.runFlags = append(d.runFlags, "--security-opt=no-new-privileges")
	}
	d.readOnlyRoot = sc.ReadOnlyRootFilesystem != nil && *sc.ReadOnlyRootFilesystem
	if d.readOnlyRoot {
		d.runFlags = append(d.runFlags, "--read-only")
	}
	if sc.RunAsUser != nil {
		d.uid = int(*sc.RunAsUser)
		u := strconv.FormatInt(*sc.RunAsUser, 10)
		if sc.RunAsGroup != nil {
			u += ":" + strconv.FormatInt(*sc.RunAsGroup, 10)
		}
		d.runFlags = append(d.runFlags, "--user="+u)
	} else if sc.RunAsGroup != nil {
		bad = append(bad, "unsupported value: runAsGroup without runAsUser")
	}
	if sc.Capabilities != nil {
		for _, cp := range sc.Capabilities.Drop {
			d.runFlags = append(d.runFlags, "--cap-drop="+string(cp))
			if cp == "ALL" {
				caps = nil
			} else {
				caps = slices.DeleteFunc(caps, func(s string) bool { return s == strings.TrimPrefix(string(cp), "CAP_") })
			}
		}
		for _, cp := range sc.Capabilities.Add {
			name := strings.TrimPrefix(string(cp), "CAP_")
			if !slices.Contains(allCaps, name) {
				bad = append(bad, fmt.Sprintf("unsupported value: capability %s", cp))
			}
			d.runFlags = append(d.runFlags, "--cap-add="+string(cp))
			if !slices.Contains(caps, name) {
				caps = append(caps, name)
			}
		}
	}
	for _, cp := range caps {
		d.capsEffective = append(d.capsEffective, "CAP_"+cp)
	}
	slices.Sort(d.capsEffective)
	d.seccompFilter = true // Docker's default profile: the runtime's default
	if sp := sc.SeccompProfile; sp != nil {
		switch sp.Type {
		case corev1.SeccompProfileTypeRuntimeDefault:
		case corev1.SeccompProfileTypeUnconfined:
			d.runFlags = append(d.runFlags, "--security-opt=seccomp=unconfined")
			d.seccompFilter = false
		default:
			bad = append(bad, fmt.Sprintf("unsupported value: seccompProfile %s", sp.Type))
		}
	}
	if d.seccompFilter && sc.Privileged != nil && *sc.Privileged {
		d.seccompFilter = false // Docker runs privileged containers unconfined
	}

	// Resources, as the kubelet sets the cgroup.
	if q, ok := c.Resources.Requests[corev1.ResourceCPU]; ok {
		d.runFlags = append(d.runFlags, "--cpu-shares="+strconv.FormatInt(max(2, q.MilliValue()*1024/1000), 10))
	}
	if q, ok := c.Resources.Limits[corev1.ResourceMemory]; ok {
		d.runFlags = append(d.runFlags, "--memory="+strconv.FormatInt(q.Value(), 10))
	}
	if q, ok := c.Resources.Limits[corev1.ResourceCPU]; ok {
		d.runFlags = append(d.runFlags, fmt.Sprintf("--cpus=%.3f", float64(q.MilliValue())/1000))
	}

	// Volumes.
	vols := map[string]corev1.Volume{}
	for _, v := range spec.Volumes {
		if v.HostPath == nil {
			bad = append(bad, fmt.Sprintf("unsupported value: volume %s is not a hostPath", v.Name))
			continue
		}
		vols[v.Name] = v
	}
	for _, m := range c.VolumeMounts {
		v, ok := vols[m.Name]
		if !ok {
			bad = append(bad, fmt.Sprintf("unsupported value: mount %s of no hostPath volume", m.Name))
			continue
		}
		if v.HostPath.Type != nil {
			switch *v.HostPath.Type {
			case corev1.HostPathDirectoryOrCreate:
				d.create = append(d.create, v.HostPath.Path)
			case corev1.HostPathDirectory:
				d.mustExist = append(d.mustExist, v.HostPath.Path)
			case corev1.HostPathUnset:
			default:
				bad = append(bad, fmt.Sprintf("unsupported value: hostPath type %s", *v.HostPath.Type))
			}
		}
		mount := "type=bind,src=" + v.HostPath.Path + ",dst=" + m.MountPath
		b := bind{path: m.MountPath, readOnly: m.ReadOnly}
		if m.ReadOnly {
			mount += ",readonly"
		}
		if m.MountPropagation != nil {
			switch *m.MountPropagation {
			case corev1.MountPropagationHostToContainer:
				mount += ",bind-propagation=rslave"
				b.propagation = "master"
			case corev1.MountPropagationBidirectional:
				mount += ",bind-propagation=rshared"
				b.propagation = "shared"
			case corev1.MountPropagationNone:
				mount += ",bind-propagation=rprivate"
			default:
				bad = append(bad, fmt.Sprintf("unsupported value: mountPropagation %s", *m.MountPropagation))
			}
		}
		if m.SubPath != "" || m.SubPathExpr != "" {
			bad = append(bad, "unsupported value: subPath") // also caught as a field
		}
		d.runFlags = append(d.runFlags, "--mount="+mount)
		d.binds = append(d.binds, b)
		d.mounts[v.HostPath.Path] = m.MountPath
	}
	return d, bad
}

// testFlags are the serve flags the test adds to the manifest's arguments,
// so that the exporter keeps to the test's own pods on a machine shared
// with other tests: it observes the CNI namespaces only, talks to the
// test's containerd (through the manifest's runtime mount), and pins under
// a directory of its own.
var testFlags = []string{"--netns.include", "--netns.host", "--cri.endpoint", "--pin.path"}

// The manifest's own fields are all honoured (or listed with a reason), and
// a field the test does not know fails it.
func TestDaemonSetTranslation(t *testing.T) {
	b, err := os.ReadFile(filepath.Join(k8sDir, "daemonset.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	if _, bad := translate(b); len(bad) > 0 {
		t.Fatalf("daemonset.yaml cannot be run as deployed:\n%s", strings.Join(bad, "\n"))
	}
	// A field the table does not know, anywhere, is refused.
	for _, extra := range []string{
		"      hostIPC: true\n",
		"      initContainers: []\n",
		"      nodeSelector:\n        kubernetes.io/os: linux\n",
	} {
		m := strings.Replace(string(b), "      hostPID: true\n", "      hostPID: true\n"+extra, 1)
		if _, bad := translate([]byte(m)); len(bad) == 0 || !strings.Contains(strings.Join(bad, "\n"), "unsupported field") {
			t.Errorf("adding %q: not refused as unsupported: %v", extra, bad)
		}
	}
	m := strings.Replace(string(b), "readOnly: true\n", "readOnly: true\n              subPath: x\n", 1)
	if _, bad := translate([]byte(m)); !strings.Contains(strings.Join(bad, "\n"), "unsupported field spec.template.spec.containers[].volumeMounts[].subPath") {
		t.Errorf("a subPath is not refused: %v", bad)
	}
}

// scrapeText GETs url and returns the status and body.
func httpGet(url string) (int, string) {
	c := http.Client{Timeout: 5 * time.Second}
	resp, err := c.Get(url)
	if err != nil {
		return 0, err.Error()
	}
	defer resp.Body.Close()
	var sb strings.Builder
	buf := make([]byte, 64<<10)
	for {
		n, err := resp.Body.Read(buf)
		sb.Write(buf[:n])
		if err != nil {
			break
		}
	}
	return resp.StatusCode, sb.String()
}

var statusLine = regexp.MustCompile(`(?m)^(\w+):\s*(.*)$`)

// procStatus reads /proc/PID/status as a map.
func procStatus(pid string) (map[string]string, error) {
	b, err := os.ReadFile("/proc/" + pid + "/status")
	if err != nil {
		return nil, err
	}
	m := map[string]string{}
	for _, s := range statusLine.FindAllStringSubmatch(string(b), -1) {
		m[s[1]] = strings.TrimSpace(s[2])
	}
	return m, nil
}

// capNames decodes a CapEff mask.
func capNames(mask string) []string {
	v, err := strconv.ParseUint(mask, 16, 64)
	if err != nil {
		return []string{"bad mask " + mask}
	}
	var out []string
	for i := range 64 {
		if v&(1<<i) == 0 {
			continue
		}
		if i < len(allCaps) {
			out = append(out, "CAP_"+allCaps[i])
		} else {
			out = append(out, "cap"+strconv.Itoa(i))
		}
	}
	slices.Sort(out)
	return out
}

func runOut(name string, args ...string) (string, error) {
	out, err := exec.Command(name, args...).CombinedOutput()
	return string(out), err
}
