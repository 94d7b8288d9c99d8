package collector

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// ErrNamespaceNotFound is returned when a namespace selector names nothing.
var ErrNamespaceNotFound = errors.New("network namespace not found")

// ErrBadSelector is returned for a namespace selector that cannot be parsed.
var ErrBadSelector = errors.New("bad namespace selector")

// NetnsDirs are the directories where `ip netns` and CNI plugins bind-mount
// named namespaces, and Docker those of its containers (named after the
// sandbox: the first 12 hex digits of its id, as `docker inspect
// -f '{{.NetworkSettings.SandboxKey}}'` shows), in lookup order.
var NetnsDirs = []string{"/run/netns", "/var/run/netns", "/run/docker/netns", "/var/run/docker/netns"}

// HostName is the name under which the host's own namespace is reported.
const HostName = "host"

// Target is a network namespace to observe: a file that refers to it (a bind
// mount or /proc/PID/ns/net) and the human name it is reported under.
type Target struct {
	Name string
	Path string
	// Class orders the namespace's attach work (zero: ClassNamed).
	Class Class
}

// Class orders attach work: lower first. Namespaces of one class are
// attached in the order they were added.
type Class int

const (
	// ClassNamed: an explicit selection (trace --netns, Targets), a
	// bind-mounted namespace (ip netns, CNI, Docker) or one the container
	// runtime knows.
	ClassNamed Class = iota
	// ClassHost: the host's own namespace.
	ClassHost
	// ClassProcess: a namespace found only through a process
	// (/proc/PID/ns/net); it may not take the reserved slots
	// (Config.ReservedPoints).
	ClassProcess
)

// String names the class in logs.
func (c Class) String() string {
	switch c {
	case ClassNamed:
		return "named"
	case ClassHost:
		return "host"
	case ClassProcess:
		return "process"
	}
	return fmt.Sprintf("class(%d)", int(c))
}

// ParseTarget resolves a namespace selector:
//
//	NAME        an `ip netns` name (/run/netns/NAME), or a Docker sandbox's
//	            (/run/docker/netns/NAME); the first of NetnsDirs that has it
//	pid:PID     the namespace of a process
//	/PATH       any file that refers to a namespace (bind mount, /proc/PID/ns/net)
//	host        the namespace nsflow runs in (the node's, for a DaemonSet
//	            with hostNetwork)
func ParseTarget(sel string) (Target, error) {
	switch {
	case sel == "":
		return Target{}, fmt.Errorf("%w: empty", ErrBadSelector)
	case sel == HostName:
		return Target{Name: HostName, Path: "/proc/self/ns/net"}, checkNetns("/proc/self/ns/net")
	case strings.HasPrefix(sel, "pid:"):
		pid, err := strconv.Atoi(strings.TrimPrefix(sel, "pid:"))
		if err != nil || pid <= 0 {
			return Target{}, fmt.Errorf("%w: %q: want pid:PID with a positive process id", ErrBadSelector, sel)
		}
		p := fmt.Sprintf("/proc/%d/ns/net", pid)
		return Target{Name: sel, Path: p}, checkNetns(p)
	case strings.HasPrefix(sel, "/") || strings.HasPrefix(sel, "."):
		p := filepath.Clean(sel)
		name := p
		for _, d := range NetnsDirs {
			if filepath.Dir(p) == d {
				name = filepath.Base(p)
			}
		}
		return Target{Name: name, Path: p}, checkNetns(p)
	case strings.ContainsAny(sel, "/\x00") || sel == "." || sel == "..":
		return Target{}, fmt.Errorf("%w: %q is not a valid ip netns name", ErrBadSelector, sel)
	}
	for _, d := range NetnsDirs {
		p := filepath.Join(d, sel)
		if _, err := os.Stat(p); err == nil {
			return Target{Name: sel, Path: p}, checkNetns(p)
		}
	}
	return Target{}, fmt.Errorf("%w: no %q in %s (see `ip netns list`)", ErrNamespaceNotFound, sel, strings.Join(NetnsDirs, ", "))
}

// checkNetns verifies that path refers to a network namespace.
func checkNetns(path string) error {
	h, err := netns.GetFromPath(path)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) || errors.Is(err, unix.ESRCH) {
			return fmt.Errorf("%w: %s", ErrNamespaceNotFound, path)
		}
		return fmt.Errorf("open %s: %w", path, err)
	}
	defer h.Close()
	ns, err := unix.IoctlRetInt(int(h), unix.NS_GET_NSTYPE)
	if err != nil {
		return fmt.Errorf("%w: %s is not a namespace file (%v)", ErrBadSelector, path, err)
	}
	if ns != unix.CLONE_NEWNET {
		return fmt.Errorf("%w: %s is not a network namespace", ErrBadSelector, path)
	}
	return nil
}

// inode returns the namespace inode a handle refers to: its identity, the
// number the BPF programs key their counters by.
func inode(h netns.NsHandle) (uint64, error) {
	var st unix.Stat_t
	if err := unix.Fstat(int(h), &st); err != nil {
		return 0, err
	}
	return st.Ino, nil
}
