package exporter

import (
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

type unresolved int

func (u unresolved) UnresolvedSandboxes() int { return int(u) }

// TestPodIdentityMetric: nsflow_cri_unresolved_sandboxes is one gauge with
// the source's value, present at 0, lint-clean.
func TestPodIdentityMetric(t *testing.T) {
	for _, n := range []int{0, 3} {
		c := NewPodIdentity(unresolved(n))
		if got := testutil.CollectAndCount(c, "nsflow_cri_unresolved_sandboxes"); got != 1 {
			t.Fatalf("%d series, want 1", got)
		}
		if got := testutil.ToFloat64(c); got != float64(n) {
			t.Errorf("value %v, want %d", got, n)
		}
	}
	reg := prometheus.NewPedanticRegistry()
	reg.MustRegister(NewPodIdentity(unresolved(1)))
	mfs, err := reg.Gather()
	if err != nil || len(mfs) != 1 || mfs[0].GetType().String() != "GAUGE" {
		t.Fatalf("gather: %v %v", mfs, err)
	}
	if problems, err := testutil.CollectAndLint(NewPodIdentity(unresolved(1))); err != nil || len(problems) > 0 {
		t.Errorf("lint: %v %v", problems, err)
	}
}
