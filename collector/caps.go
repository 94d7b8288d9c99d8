package collector

import (
	"fmt"
	"strings"

	"golang.org/x/sys/unix"
)

// RequiredCapabilities are the capabilities nsflow cannot start without,
// and why:
//
//	CAP_BPF       create maps, load programs, create BPF links
//	CAP_PERFMON   programs that read kernel memory (skb->dev->nd_net, CO-RE)
//	CAP_NET_ADMIN attach TC programs (TCX, clsact), netlink in namespaces
//	CAP_SYS_ADMIN enter other network namespaces (setns), mount bpffs
//	              (--pin), the proc connector
//
// CAP_SYS_ADMIN, which nsflow cannot do without, also grants what CAP_BPF
// and CAP_PERFMON grant: the least set to start is CAP_SYS_ADMIN and
// CAP_NET_ADMIN. To see every namespace of the node, nsflow also needs
// CAP_SYS_PTRACE (see ObserveCapability).
var RequiredCapabilities = map[string]int{
	"CAP_BPF":       unix.CAP_BPF,
	"CAP_PERFMON":   unix.CAP_PERFMON,
	"CAP_NET_ADMIN": unix.CAP_NET_ADMIN,
	"CAP_SYS_ADMIN": unix.CAP_SYS_ADMIN,
}

// MissingCapabilities returns the required capabilities the process does
// not have in its effective set, sorted by name. As in the kernel
// (bpf_capable, perfmon_capable), CAP_SYS_ADMIN stands in for CAP_BPF and
// CAP_PERFMON: container runtimes older than those capabilities grant only
// CAP_SYS_ADMIN.
func MissingCapabilities() ([]string, error) {
	hdr := unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}
	var data [2]unix.CapUserData
	if err := unix.Capget(&hdr, &data[0]); err != nil {
		return nil, fmt.Errorf("read capabilities: %w", err)
	}
	has := func(c int) bool { return data[c/32].Effective&(1<<(uint(c)%32)) != 0 }
	sysAdmin := has(unix.CAP_SYS_ADMIN)
	var missing []string
	for _, name := range []string{"CAP_BPF", "CAP_NET_ADMIN", "CAP_PERFMON", "CAP_SYS_ADMIN"} {
		c := RequiredCapabilities[name]
		if has(c) || (sysAdmin && (name == "CAP_BPF" || name == "CAP_PERFMON")) {
			continue
		}
		missing = append(missing, name)
	}
	return missing, nil
}

// ObserveCapability is what nsflow needs, besides RequiredCapabilities, to
// observe the namespace of every process: the kernel lets a process open
// /proc/PID/ns/net only if it may ptrace-read PID (proc_ns_get_link:
// ptrace_may_access(PTRACE_MODE_READ_FSCREDS)), which takes CAP_SYS_PTRACE
// in that process's user namespace (or an ancestor: the node's) for a
// process of another uid, a non-dumpable one, and, through the capability
// LSM (cap_ptrace_access_check), any process whose permitted capabilities
// are not a subset of nsflow's: with a reduced set, every root process and
// kernel thread, every container that kept a capability nsflow lacks.
// Without it nsflow
// starts, but those namespaces, unless bind-mounted in a NetnsDirs
// directory, are skipped: counted in nsflow_namespaces_skipped_total
// {reason="permission"} and logged. It grants nothing nsflow could not
// already do with CAP_SYS_ADMIN, whose BPF tracing programs read and write
// any process's memory (bpf_probe_read_user, bpf_probe_write_user).
const ObserveCapability = "CAP_SYS_PTRACE"

// HasCapability reports whether the process has capability c in its
// effective set.
func HasCapability(c int) (bool, error) {
	hdr := unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}
	var data [2]unix.CapUserData
	if err := unix.Capget(&hdr, &data[0]); err != nil {
		return false, fmt.Errorf("read capabilities: %w", err)
	}
	return data[c/32].Effective&(1<<(uint(c)%32)) != 0, nil
}

// CheckCapabilities fails with a message naming every missing capability.
func CheckCapabilities() error {
	missing, err := MissingCapabilities()
	if err != nil {
		return err
	}
	if len(missing) > 0 {
		return fmt.Errorf("missing capabilities: %s (nsflow needs CAP_SYS_ADMIN, which also covers CAP_BPF and CAP_PERFMON, and CAP_NET_ADMIN, and CAP_SYS_PTRACE to observe the namespaces of other users' processes; run it as root or grant them, e.g. AmbientCapabilities in a systemd unit or securityContext.capabilities.add in Kubernetes)",
			strings.Join(missing, ", "))
	}
	return nil
}
