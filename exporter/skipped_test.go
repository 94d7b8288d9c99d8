package exporter

import (
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

type skipCounts map[string]uint64

func (s skipCounts) NamespacesSkipped() map[string]uint64 { return s }

// TestSkippedMetric: nsflow_namespaces_skipped_total is one counter per
// reason the source reports (every reason at 0 included), with its values,
// lint-clean under a pedantic registry.
func TestSkippedMetric(t *testing.T) {
	reg := prometheus.NewPedanticRegistry()
	reg.MustRegister(NewSkipped(skipCounts{"permission": 2, "gone": 0, "other": 1}))
	want := `# HELP nsflow_namespaces_skipped_total ` + "x" + `
# TYPE nsflow_namespaces_skipped_total counter
nsflow_namespaces_skipped_total{reason="gone"} 0
nsflow_namespaces_skipped_total{reason="other"} 1
nsflow_namespaces_skipped_total{reason="permission"} 2
`
	mfs, err := reg.Gather()
	if err != nil || len(mfs) != 1 {
		t.Fatalf("gather: %v %v", mfs, err)
	}
	help := mfs[0].GetHelp()
	want = strings.Replace(want, "x", help, 1)
	if err := testutil.GatherAndCompare(reg, strings.NewReader(want), "nsflow_namespaces_skipped_total"); err != nil {
		t.Error(err)
	}
	if problems, err := testutil.CollectAndLint(NewSkipped(skipCounts{"permission": 0, "gone": 0, "other": 0})); err != nil || len(problems) > 0 {
		t.Errorf("lint: %v %v", problems, err)
	}
}
