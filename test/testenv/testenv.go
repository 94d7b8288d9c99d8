// Package testenv gates tests on the privileges and kernel features they need.
//
// A privileged test may skip only where it cannot run (not root). Under CI
// (CI=true) a skip would hide a missing capability, so it fails instead: CI
// runs as root and must run every privileged test.
package testenv

import (
	"os"
	"testing"
)

// InCI reports whether the tests run under CI (CI=true).
func InCI() bool { return os.Getenv("CI") == "true" }

// RequireRoot skips t unless it runs as root; under CI it fails instead.
func RequireRoot(tb testing.TB) {
	tb.Helper()
	if os.Geteuid() == 0 {
		return
	}
	if InCI() {
		tb.Fatal("privileged test needs root, and CI=true forbids skipping it")
	}
	tb.Skip("needs root (BPF, network namespaces)")
}
