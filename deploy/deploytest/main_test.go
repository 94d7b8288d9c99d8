package deploytest

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
)

// built holds the binaries the tests build from the main module: each is
// built once per package run (the first test that needs it pays) and
// removed by TestMain.
var built struct {
	mu   sync.Mutex
	dir  string
	bins map[string]string
}

func TestMain(m *testing.M) {
	code := m.Run()
	if built.dir != "" {
		os.RemoveAll(built.dir)
	}
	os.Exit(code)
}

// buildOnce builds the main module's package pkg (static, -trimpath, as
// `make build` builds nsflow) once per package run and returns the binary,
// which callers must not modify (copy it).
func buildOnce(t *testing.T, name, pkg string) string {
	t.Helper()
	built.mu.Lock()
	defer built.mu.Unlock()
	if bin, ok := built.bins[name]; ok {
		return bin
	}
	if built.dir == "" {
		d, err := os.MkdirTemp("", "nsflow-deploytest-bin-")
		if err != nil {
			t.Fatal(err)
		}
		built.dir, built.bins = d, map[string]string{}
	}
	bin := filepath.Join(built.dir, name)
	cmd := exec.Command("go", "build", "-trimpath", "-o", bin, pkg)
	cmd.Dir = "../.."
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0") // static, as `make build` and the image want
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("build %s: %v\n%s", pkg, err, out)
	}
	built.bins[name] = bin
	return bin
}

// copyOf copies the file src to dir/name, executable.
func copyOf(t *testing.T, src, dir, name string) string {
	t.Helper()
	b, err := os.ReadFile(src)
	if err != nil {
		t.Fatal(err)
	}
	dst := filepath.Join(dir, name)
	if err := os.WriteFile(dst, b, 0o755); err != nil {
		t.Fatal(err)
	}
	return dst
}

// netnsShared makes /run/netns a shared mount, as `ip netns add` leaves
// it on any host where it ran (and as every mount is on a node whose init
// is systemd), unless it is one already: the namespaces a runtime mounts
// there later then propagate into a container that mounts /run/netns with
// HostToContainer, through a Docker daemon started after this. It does what
// iproute2 does, by running it: a namespace of a unique name, added and
// deleted.
func netnsShared(t *testing.T) {
	t.Helper()
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(string(b), "\n") {
		f := strings.Fields(l)
		if len(f) < 7 || f[4] != "/run/netns" {
			continue
		}
		for _, o := range f[6:] {
			if o == "-" {
				break
			}
			if strings.HasPrefix(o, "shared:") {
				return
			}
		}
	}
	name := fmt.Sprintf("nsflow-deploytest-prep-%d", os.Getpid())
	if out, err := exec.Command("ip", "netns", "add", name).CombinedOutput(); err != nil {
		t.Fatalf("ip netns add (to make /run/netns a shared mount): %v\n%s", err, out)
	}
	if out, err := exec.Command("ip", "netns", "del", name).CombinedOutput(); err != nil {
		t.Fatalf("ip netns del %s: %v\n%s", name, err, out)
	}
	t.Log("/run/netns made a shared mount (by ip netns add), as on a node")
}
