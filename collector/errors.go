package collector

import (
	"errors"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/nsflow/nsflow/bpf"
	"github.com/nsflow/nsflow/collector/flow"
)

// errorReason classifies an attach error into one of AttachErrorReasons.
func errorReason(err error) string {
	switch {
	case errors.Is(err, ebpf.ErrNotSupported):
		return "not_supported"
	case errors.Is(err, unix.EPERM), errors.Is(err, unix.EACCES):
		return "permission"
	case errors.Is(err, unix.ENODEV), errors.Is(err, unix.ENOENT), errors.Is(err, unix.ENXIO):
		return "gone"
	case errors.Is(err, unix.EEXIST):
		return "exists"
	case errors.Is(err, bpf.ErrTotalsFull):
		return "totals_full"
	}
	return "other"
}

// AttachErrors returns the attach errors so far, by reason.
func (c *Collector) AttachErrors() map[string]uint64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := make(map[string]uint64, len(flow.AttachErrorReasons))
	for _, r := range flow.AttachErrorReasons {
		out[r] = c.attachErrors[r]
	}
	return out
}

// RefusedReasons are the values of the attach-refused metric's reason
// label: "interfaces" (over Config.MaxInterfaces in one namespace),
// "reserve" (a ClassProcess namespace at the reserved slots).
var RefusedReasons = []string{"interfaces", "reserve"}

// Refused returns how many interfaces were refused so far, by reason
// (RefusedReasons, every one present).
func (c *Collector) Refused() map[string]uint64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := make(map[string]uint64, len(RefusedReasons))
	for _, r := range RefusedReasons {
		out[r] = c.refused[r]
	}
	return out
}
