package exporter

import "github.com/prometheus/client_golang/prometheus"

// PodSource reports how well namespaces are named with their pods: a
// *session.Session.
type PodSource interface {
	// UnresolvedSandboxes is the number of ready pod sandboxes whose
	// network namespace cannot be found (0 without a runtime).
	UnresolvedSandboxes() int
}

// podIdentity is the self-metric of pod identity, a prometheus.Collector.
type podIdentity struct {
	s          PodSource
	unresolved *prometheus.Desc
}

// NewPodIdentity returns the collector of nsflow_cri_unresolved_sandboxes:
// present from the first scrape (0 without a runtime, or before its first
// sync), so that an alert on it needs no absent().
func NewPodIdentity(s PodSource) prometheus.Collector {
	return &podIdentity{s: s, unresolved: prometheus.NewDesc(
		prometheus.BuildFQName(namespace, "cri", "unresolved_sandboxes"),
		"Ready pod sandboxes whose network namespace nsflow cannot find (not at the runtime's path, nor under /run for /var/run, nor at /proc/PID/ns/net): their series carry no pod labels. Each is logged once.",
		nil, nil)}
}

// Describe implements prometheus.Collector.
func (p *podIdentity) Describe(ch chan<- *prometheus.Desc) { ch <- p.unresolved }

// Collect implements prometheus.Collector.
func (p *podIdentity) Collect(ch chan<- prometheus.Metric) {
	ch <- prometheus.MustNewConstMetric(p.unresolved, prometheus.GaugeValue, float64(p.s.UnresolvedSandboxes()))
}
