package attach_test

import (
	"testing"

	"github.com/nsflow/nsflow/collector/attach"
)

func TestParseMode(t *testing.T) {
	for _, s := range []string{"auto", "tcx", "clsact", "TCX"} {
		if _, err := attach.ParseMode(s); err != nil {
			t.Errorf("%s: %v", s, err)
		}
	}
	if _, err := attach.ParseMode("xdp"); err == nil {
		t.Error("xdp accepted")
	}
}
