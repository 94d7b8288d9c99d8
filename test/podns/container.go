package podns

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"time"

	"github.com/nsflow/nsflow/collector/cgroup"
)

// ErrInvalidContainer: a container name is not one (same rule as pods).
var ErrInvalidContainer = errors.New("invalid container name")

// ValidateContainerName checks a container name: lower-case letters,
// digits and dashes, 1 to 32 characters, starting and ending with a letter
// or digit (as pod names).
func ValidateContainerName(name string) error {
	if !nameRE.MatchString(name) {
		return fmt.Errorf("%w %q: use 1-32 lower-case letters, digits and dashes, starting and ending with a letter or digit", ErrInvalidContainer, name)
	}
	return nil
}

// cgroupRoot is the cgroup v2 mount (a test may point it elsewhere).
var cgroupRoot = func() (string, error) { return cgroup.Mount("/proc/self/mountinfo") }

// PodCgroup returns the cgroup directory of a pod's containers,
// <v2 mount>/nsflow-pods/<pod> (not created).
func PodCgroup(pod string) (string, error) {
	root, err := cgroupRoot()
	if err != nil {
		return "", err
	}
	return filepath.Join(root, cgroup.PodsDir, pod), nil
}

// ContainerCgroup returns the cgroup directory of one of a pod's
// containers, <v2 mount>/nsflow-pods/<pod>/<container>, creating it if
// needed. collector/cgroup names it by its last element: the container.
func ContainerCgroup(pod, container string) (string, error) {
	if err := ValidateName(pod); err != nil {
		return "", err
	}
	if err := ValidateContainerName(container); err != nil {
		return "", err
	}
	dir, err := PodCgroup(pod)
	if err != nil {
		return "", err
	}
	dir = filepath.Join(dir, container)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", fmt.Errorf("container %s of pod %s: cgroup: %w", container, pod, err)
	}
	return dir, nil
}

// StartContainer starts cmd as the container named container of the pod:
// in its network namespace and, from its first instruction, in the
// container's cgroup (clone3 CLONE_INTO_CGROUP: SysProcAttr.UseCgroupFD),
// so that every socket it opens carries that cgroup's id. cmd.SysProcAttr
// is set. The cgroup stays until RemoveContainer or Delete.
func (p *Pod) StartContainer(container string, cmd *exec.Cmd) error {
	dir, err := ContainerCgroup(p.Name, container)
	if err != nil {
		return err
	}
	f, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer f.Close()
	if cmd.SysProcAttr == nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{}
	}
	cmd.SysProcAttr.UseCgroupFD = true
	cmd.SysProcAttr.CgroupFD = int(f.Fd())
	return p.Start(cmd)
}

// RemoveContainer removes a container's cgroup once no process is left in
// it (busy reports one still is; that is not an error).
func RemoveContainer(pod, container string) (busy bool, err error) {
	dir, err := PodCgroup(pod)
	if err != nil {
		return false, err
	}
	err = os.Remove(filepath.Join(dir, container))
	switch {
	case err == nil, errors.Is(err, os.ErrNotExist):
		return false, nil
	case errors.Is(err, syscall.EBUSY):
		return true, nil
	}
	return false, err
}

// removePodCgroups kills what runs in a pod's containers (cgroup.kill) and
// removes their cgroups and the pod's. A pod never given a container has
// none: not an error.
func removePodCgroups(pod string) error {
	dir, err := PodCgroup(pod)
	if err != nil {
		return nil // no cgroup v2: no containers either
	}
	if _, err := os.Stat(dir); errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err := os.WriteFile(filepath.Join(dir, "cgroup.kill"), []byte("1"), 0); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("kill pod %s's containers: %w", pod, err)
	}
	// The killed processes leave their cgroups once reaped by their
	// parents: wait a bounded time for "populated 0".
	deadline := time.Now().Add(5 * time.Second)
	for {
		b, err := os.ReadFile(filepath.Join(dir, "cgroup.events"))
		if err != nil || bytes.Contains(b, []byte("populated 0")) || time.Now().After(deadline) {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	ents, err := os.ReadDir(dir)
	if err != nil {
		return err
	}
	var errs []error
	for _, e := range ents {
		if e.IsDir() {
			if err := os.Remove(filepath.Join(dir, e.Name())); err != nil && !errors.Is(err, os.ErrNotExist) {
				errs = append(errs, err)
			}
		}
	}
	if err := os.Remove(dir); err != nil && !errors.Is(err, os.ErrNotExist) {
		errs = append(errs, err)
	}
	// The parent, nsflow-pods, once no pod has containers any more (it
	// fails harmlessly while another pod's are there).
	os.Remove(filepath.Dir(dir))
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("pod %s's container cgroups: %w", pod, err)
	}
	return nil
}
