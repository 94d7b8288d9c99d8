package collector

import (
	"errors"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/nsflow/nsflow/bpf"
)

// AttachErrorReasons are the values of the attach-errors metric's reason
// label: a small, fixed set, so that every series exists from the start.
var AttachErrorReasons = []string{"not_supported", "permission", "gone", "exists", "totals_full", "other"}

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
	out := make(map[string]uint64, len(AttachErrorReasons))
	for _, r := range AttachErrorReasons {
		out[r] = c.attachErrors[r]
	}
	return out
}
