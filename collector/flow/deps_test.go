package flow_test

import (
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
)

const module = "github.com/nsflow/nsflow/"

// The model and its clients stay free of the engine: the filter parser, the
// pod enricher and the renderers build without cilium/ebpf, and the model
// without any kernel library. The collector's parts (attach, linkwatch,
// nsenter) never import the collector: only its clients (discovery, session)
// do. `go list -deps` is the oracle: what it lists is what
// the linker links.
func TestDependencies(t *testing.T) {
	ebpf := "github.com/cilium/ebpf"
	kernel := []string{ebpf, "github.com/vishvananda/netlink", "github.com/vishvananda/netns", "github.com/fsnotify/fsnotify", "golang.org/x/sys"}
	collector, bpf := module+"collector", module+"bpf"
	forbidden := map[string][]string{
		"collector/flow":      append(kernel, collector, bpf),
		"collector/filter":    {ebpf, collector, bpf},
		"collector/cri":       {ebpf, collector, bpf},
		"exporter/report":     {ebpf, collector, bpf},
		"exporter/tui":        {ebpf, collector, bpf},
		"collector/nsenter":   {ebpf, collector},
		"collector/attach":    {collector},
		"collector/linkwatch": {ebpf, collector, bpf},
	}
	var pkgs []string
	for p := range forbidden {
		pkgs = append(pkgs, module+p)
	}
	goTool, err := exec.LookPath("go")
	if err != nil {
		goTool = filepath.Join(runtime.GOROOT(), "bin", "go")
	}
	out, err := exec.Command(goTool, append([]string{"list", "-f", "{{.ImportPath}}{{range .Deps}} {{.}}{{end}}"}, pkgs...)...).Output()
	if err != nil {
		if ee, ok := err.(*exec.ExitError); ok {
			t.Fatalf("go list: %v\n%s", err, ee.Stderr)
		}
		t.Fatalf("go list: %v", err)
	}
	seen := 0
	for _, line := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		f := strings.Fields(line)
		pkg := strings.TrimPrefix(f[0], module)
		bad, ok := forbidden[pkg]
		if !ok {
			t.Fatalf("go list answered for %s", f[0])
		}
		seen++
		for _, dep := range f[1:] {
			for _, b := range bad {
				// A module path names one package; another path its tree.
				if dep == b || (!strings.HasPrefix(b, module) && strings.HasPrefix(dep, b+"/")) {
					t.Errorf("%s depends on %s (forbidden: %s)", pkg, dep, b)
				}
			}
		}
		t.Logf("%s: %d dependencies", pkg, len(f)-1)
	}
	if seen != len(forbidden) {
		t.Fatalf("go list answered for %d packages, want %d", seen, len(forbidden))
	}
}
