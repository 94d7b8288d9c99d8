package exporter

import "github.com/prometheus/client_golang/prometheus"

// SkipSource reports the namespaces discovery could not observe: a
// *session.Session.
type SkipSource interface {
	// NamespacesSkipped is how many namespaces (or references to one)
	// were skipped, by reason: permission, gone, other, userns (every reason
	// present, at 0 until one happens).
	NamespacesSkipped() map[string]uint64
}

// skippedNamespaces is the self-metric of what discovery could not
// observe, a prometheus.Collector.
type skippedNamespaces struct {
	s       SkipSource
	skipped *prometheus.Desc
}

// NewSkipped returns the collector of nsflow_namespaces_skipped_total
// {reason}: present from the first scrape, every reason at 0 until one
// happens, so that an alert on it needs no absent().
func NewSkipped(s SkipSource) prometheus.Collector {
	return &skippedNamespaces{s: s, skipped: prometheus.NewDesc(
		prometheus.BuildFQName(namespace, "", "namespaces_skipped_total"),
		"Network namespaces not observed, by reason: permission (a process's /proc/PID/ns/net or a bind mount nsflow may not read: another user's process without CAP_SYS_PTRACE, or an LSM; counted per process or mount, as the namespace behind it is unknown), gone (found, but vanished before it could be observed), userns (found only through a process and owned by a user namespace other than the initial one, without --netns.userns), other (any other error). Each is counted and logged once.",
		[]string{"reason"}, nil)}
}

// Describe implements prometheus.Collector.
func (k *skippedNamespaces) Describe(ch chan<- *prometheus.Desc) { ch <- k.skipped }

// Collect implements prometheus.Collector.
func (k *skippedNamespaces) Collect(ch chan<- prometheus.Metric) {
	for reason, n := range k.s.NamespacesSkipped() {
		ch <- prometheus.MustNewConstMetric(k.skipped, prometheus.CounterValue, float64(n), reason)
	}
}
