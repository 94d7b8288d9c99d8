package collector

import (
	"fmt"
	"strings"

	"golang.org/x/sys/unix"
)

// RequiredCapabilities are the capabilities nsflow uses, and why:
//
//	CAP_BPF       create maps, load programs, create BPF links
//	CAP_PERFMON   programs that read kernel memory (skb->dev->nd_net, CO-RE)
//	CAP_NET_ADMIN attach TC programs (TCX, clsact), netlink in namespaces
//	CAP_SYS_ADMIN enter other network namespaces (setns), mount bpffs
//	              (--pin), the proc connector
//
// CAP_SYS_ADMIN, which nsflow cannot do without, also grants what CAP_BPF
// and CAP_PERFMON grant: the least set is CAP_SYS_ADMIN and CAP_NET_ADMIN.
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

// CheckCapabilities fails with a message naming every missing capability.
func CheckCapabilities() error {
	missing, err := MissingCapabilities()
	if err != nil {
		return err
	}
	if len(missing) > 0 {
		return fmt.Errorf("missing capabilities: %s (nsflow needs CAP_SYS_ADMIN, which also covers CAP_BPF and CAP_PERFMON, and CAP_NET_ADMIN; run it as root or grant them, e.g. AmbientCapabilities in a systemd unit or securityContext.capabilities.add in Kubernetes)",
			strings.Join(missing, ", "))
	}
	return nil
}
