package podns

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/nsflow/nsflow/collector/cgroup"
	"github.com/nsflow/nsflow/test/testenv"
)

func statIno(t *testing.T, path string) uint64 {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	return st.Ino
}

// TestContainers: processes started as a pod's containers run in its
// namespace and in their own cgroups, which the resolver names by the
// container; Delete kills them and removes the cgroups.
func TestContainers(t *testing.T) {
	testenv.RequireRoot(t)
	cfg := testConfig(t)
	p := create(t, cfg, "h5ct-a", Options{Subnet: netip.MustParsePrefix("10.213.202.0/24")})
	pods, err := PodCgroup(p.Name)
	if err != nil {
		t.Fatal(err)
	}
	root, err := cgroupRoot()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { removePodCgroups(p.Name) })

	ids := map[string]uint64{}
	var waits []chan struct{}
	for _, c := range []string{"web", "sidecar"} {
		cmd := exec.Command("sleep", "60")
		if err := p.StartContainer(c, cmd); err != nil {
			t.Fatal(err)
		}
		waited := make(chan struct{})
		go func() { cmd.Wait(); close(waited) }()
		waits = append(waits, waited)
		t.Cleanup(func() { cmd.Process.Kill(); <-waited })
		// In the container's cgroup, by /proc (the kernel's view).
		path, err := cgroup.ProcPath("/proc", cmd.Process.Pid)
		if err != nil {
			t.Fatal(err)
		}
		if want := strings.TrimPrefix(filepath.Join(pods, c), root); path != want {
			t.Errorf("container %s: process in cgroup %s, want %s", c, path, want)
		}
		// In the pod's network namespace.
		if got, want := statIno(t, fmt.Sprintf("/proc/%d/ns/net", cmd.Process.Pid)), statIno(t, p.NetnsPath); got != want {
			t.Errorf("container %s: netns %d, want the pod's %d", c, got, want)
		}
		if ids[c], err = cgroup.ID(filepath.Join(pods, c)); err != nil {
			t.Fatal(err)
		}
	}
	r, err := cgroup.New(cgroup.Config{})
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	names := r.Resolve(t.Context(), []uint64{ids["web"], ids["sidecar"]})
	for c, id := range ids {
		if n := names[id]; n.Container != c || n.Pod != nil {
			t.Errorf("cgroup of %s named %+v", c, n)
		}
	}
	// A container still running keeps its cgroup.
	if busy, err := RemoveContainer(p.Name, "web"); !busy || err != nil {
		t.Errorf("RemoveContainer(web) while running: busy %v, %v", busy, err)
	}
	// Delete kills the containers and removes the cgroups.
	if _, err := Delete(cfg, p.Name); err != nil {
		t.Fatal(err)
	}
	for i, w := range waits {
		select {
		case <-w:
		case <-time.After(5 * time.Second):
			t.Errorf("container %d still running after Delete", i)
		}
	}
	if _, err := os.Stat(pods); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("pod cgroup %s after Delete: %v", pods, err)
	}
}

// TestRemoveContainer: a container whose processes are gone has its
// cgroup removed.
func TestRemoveContainer(t *testing.T) {
	testenv.RequireRoot(t)
	cfg := testConfig(t)
	p := create(t, cfg, "h5ct-b", Options{Subnet: netip.MustParsePrefix("10.213.203.0/24")})
	t.Cleanup(func() { removePodCgroups(p.Name) })
	cmd := exec.Command("true")
	if err := p.StartContainer("job", cmd); err != nil {
		t.Fatal(err)
	}
	if err := cmd.Wait(); err != nil {
		t.Fatal(err)
	}
	dir, _ := ContainerCgroup(p.Name, "job")
	if busy, err := RemoveContainer(p.Name, "job"); busy || err != nil {
		t.Fatalf("RemoveContainer: busy %v, %v", busy, err)
	}
	if _, err := os.Stat(dir); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("cgroup %s after RemoveContainer: %v", dir, err)
	}
	if _, err := ContainerCgroup(p.Name, "Bad_Name"); !errors.Is(err, ErrInvalidContainer) {
		t.Errorf("ContainerCgroup(Bad_Name): %v", err)
	}
}
