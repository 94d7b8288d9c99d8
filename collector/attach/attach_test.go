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

func TestModeFor(t *testing.T) {
	for _, c := range []struct {
		m    attach.Mode
		host bool
		want attach.Mode
	}{
		{attach.ModeAuto, true, attach.ModeTCX},
		{attach.ModeAuto, false, attach.ModeClsact},
		{attach.ModeTCX, true, attach.ModeTCX},
		{attach.ModeTCX, false, attach.ModeTCX},
		{attach.ModeClsact, true, attach.ModeClsact},
		{attach.ModeClsact, false, attach.ModeClsact},
	} {
		if got := c.m.For(c.host); got != c.want {
			t.Errorf("%s.For(host=%v) = %s, want %s", c.m, c.host, got, c.want)
		}
	}
}
