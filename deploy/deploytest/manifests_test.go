// Package deploytest checks every file in deploy/: the Kubernetes manifests
// decode strictly into the official API types, the Prometheus files pass
// promtool, the dashboard's queries parse, and the systemd unit verifies
// and really runs nsflow with exactly its capability set. It is a module of
// its own, so that k8s.io/api stays out of the nsflow binary's module.
package deploytest

import (
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	"sigs.k8s.io/yaml"
)

const k8sDir = "../kubernetes"

func strict(t *testing.T, file string, into any) {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(k8sDir, file))
	if err != nil {
		t.Fatal(err)
	}
	if err := yaml.UnmarshalStrict(b, into); err != nil {
		t.Fatalf("%s does not decode strictly: %v", file, err)
	}
}

// serviceMonitor is the part of monitoring.coreos.com/v1 ServiceMonitor the
// manifest uses; unknown fields fail.
type serviceMonitor struct {
	APIVersion string `json:"apiVersion"`
	Kind       string `json:"kind"`
	Metadata   struct {
		Name   string            `json:"name"`
		Labels map[string]string `json:"labels"`
	} `json:"metadata"`
	Spec struct {
		Selector struct {
			MatchLabels map[string]string `json:"matchLabels"`
		} `json:"selector"`
		Endpoints []struct {
			Port        string `json:"port"`
			Interval    string `json:"interval"`
			HonorLabels bool   `json:"honorLabels"`
			Relabelings []struct {
				Action string `json:"action"`
				Regex  string `json:"regex"`
			} `json:"relabelings"`
		} `json:"endpoints"`
	} `json:"spec"`
}

type kustomization struct {
	APIVersion string   `json:"apiVersion"`
	Kind       string   `json:"kind"`
	Resources  []string `json:"resources"`
}

func TestManifests(t *testing.T) {
	var k kustomization
	strict(t, "kustomization.yaml", &k)
	ents, err := os.ReadDir(k8sDir)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range ents {
		if e.Name() != "kustomization.yaml" && !slices.Contains(k.Resources, e.Name()) {
			t.Errorf("%s is not listed in kustomization.yaml", e.Name())
		}
	}

	var sa corev1.ServiceAccount
	strict(t, "serviceaccount.yaml", &sa)
	var svc corev1.Service
	strict(t, "service.yaml", &svc)
	var ds appsv1.DaemonSet
	strict(t, "daemonset.yaml", &ds)
	var sm serviceMonitor
	strict(t, "servicemonitor.yaml", &sm)

	if svc.Spec.ClusterIP != "None" || svc.Spec.Ports[0].Name != "metrics" {
		t.Errorf("service: want headless with a metrics port: %+v", svc.Spec)
	}
	if sm.Kind != "ServiceMonitor" || len(sm.Spec.Endpoints) != 1 || !sm.Spec.Endpoints[0].HonorLabels || sm.Spec.Endpoints[0].Port != "metrics" {
		t.Errorf("service monitor: want honorLabels on the metrics port: %+v", sm.Spec)
	}
	if r := sm.Spec.Endpoints[0].Relabelings; len(r) != 1 || r[0].Action != "labeldrop" || r[0].Regex != "pod|namespace" {
		t.Errorf("service monitor: the exporter pod's own pod/namespace target labels must be dropped: %+v", r)
	}
	for k, v := range sm.Spec.Selector.MatchLabels {
		if svc.Labels[k] != v {
			t.Errorf("service monitor selects %s=%s, the service does not have it", k, v)
		}
	}

	// Least privilege: exactly the two capabilities, nothing privileged.
	pod := ds.Spec.Template.Spec
	if !pod.HostNetwork || !pod.HostPID {
		t.Error("the DaemonSet needs the host's network (netns=host) and PID namespace (/proc discovery)")
	}
	if len(pod.Containers) != 1 {
		t.Fatalf("%d containers", len(pod.Containers))
	}
	c := pod.Containers[0]
	sc := c.SecurityContext
	if sc == nil || sc.Privileged == nil || *sc.Privileged || sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation {
		t.Error("the container must not be privileged nor escalate")
	}
	if sc.ReadOnlyRootFilesystem == nil || !*sc.ReadOnlyRootFilesystem {
		t.Error("root filesystem must be read-only")
	}
	var add []string
	for _, c := range sc.Capabilities.Add {
		add = append(add, string(c))
	}
	slices.Sort(add)
	if strings.Join(add, ",") != "NET_ADMIN,SYS_ADMIN,SYS_PTRACE" || len(sc.Capabilities.Drop) != 1 || sc.Capabilities.Drop[0] != "ALL" {
		t.Errorf("capabilities: drop %v add %v, want drop ALL add NET_ADMIN, SYS_ADMIN, SYS_PTRACE", sc.Capabilities.Drop, add)
	}
	// The same set as the systemd unit's (test/e2e TestCapsObserveOtherUser
	// runs nsflow under exactly that set).
	var unit []string
	for _, c := range unitCapabilities(t) {
		unit = append(unit, strings.TrimPrefix(c, "CAP_"))
	}
	slices.Sort(unit)
	if !slices.Equal(unit, add) {
		t.Errorf("the DaemonSet adds %v, the systemd unit grants %v", add, unit)
	}
	if c.LivenessProbe == nil || c.LivenessProbe.HTTPGet.Path != "/-/healthy" || c.ReadinessProbe == nil || c.ReadinessProbe.HTTPGet.Path != "/-/ready" {
		t.Error("probes must use /-/healthy and /-/ready")
	}
	if c.Resources.Requests.Memory().IsZero() || c.Resources.Limits.Memory().IsZero() {
		t.Error("memory request and limit are required")
	}
	mounts := map[string]corev1.VolumeMount{}
	for _, m := range c.VolumeMounts {
		mounts[m.MountPath] = m
	}
	for _, p := range []string{"/run/netns", "/run/docker/netns"} {
		if m, ok := mounts[p]; !ok || m.MountPropagation == nil || *m.MountPropagation != corev1.MountPropagationHostToContainer || !m.ReadOnly {
			t.Errorf("%s must be mounted read-only with HostToContainer propagation, to see namespaces created later", p)
		}
	}
	for _, p := range []string{"/sys/fs/bpf", "/sys/kernel/btf"} {
		if _, ok := mounts[p]; !ok {
			t.Errorf("%s not mounted", p)
		}
	}
	if m, ok := mounts["/run/containerd"]; !ok || !m.ReadOnly {
		t.Error("the container runtime's socket directory must be mounted read-only")
	}
	if !slices.Contains(c.Args, "serve") {
		t.Errorf("args %v do not run serve", c.Args)
	}
}
