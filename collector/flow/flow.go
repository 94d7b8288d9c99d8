// Package flow is nsflow's data model: flow keys, flows, flow events,
// counters and snapshots, as the collector reports them and the filter, the
// pod enricher and the renderers consume them. It has no kernel
// dependencies (no BPF, no netlink), so its clients build and test without
// them; collector/deps_test.go checks it.
package flow

import (
	"net/netip"
	"time"
)

// Key identifies a flow at one observation point: a namespace's interface,
// in one direction.
type Key struct {
	Netns      string     `json:"netns"`
	NetnsInode uint64     `json:"netns_inode"`
	Interface  string     `json:"interface"`
	Ifindex    int        `json:"ifindex"`
	Direction  Direction  `json:"direction"`
	Protocol   Protocol   `json:"protocol"`
	Src        netip.Addr `json:"src"`
	Dst        netip.Addr `json:"dst"`
	// SrcPort and DstPort carry the ICMP type and code for ICMP and ICMPv6.
	SrcPort uint16 `json:"src_port"`
	DstPort uint16 `json:"dst_port"`
}

// Flow is the traffic of one flow at one observation point.
type Flow struct {
	Key
	Packets   uint64    `json:"packets"`
	Bytes     uint64    `json:"bytes"`
	TCPFlags  TCPFlags  `json:"tcp_flags,omitempty"`
	FirstSeen time.Time `json:"first_seen"`
	LastSeen  time.Time `json:"last_seen"`
	// SrcCgroup and DstCgroup are the cgroup v2 ids of the sending and the
	// receiving socket (0 unknown), filled only with attribution on
	// (collector.Config.Attribution): the sender's from the flow's egress
	// hooks, the receiver's from the ingress socket lookup or the reverse
	// flow's sender (collector/snapshot.go, joinCgroups).
	SrcCgroup uint64 `json:"src_cgroup,omitempty"`
	DstCgroup uint64 `json:"dst_cgroup,omitempty"`
	// SrcContainer and DstContainer name those cgroups (collector/cgroup):
	// a CRI container's name, else the cgroup path's last element (e.g.
	// "sshd.service", or "web" for `nsflow pod exec --container web`); ""
	// unknown. Renderers pass them through SafeName.
	SrcContainer string `json:"src_container"`
	DstContainer string `json:"dst_container"`
	// SrcPod and DstPod are "namespace/name" of the Kubernetes pod of that
	// container (CRI only), "" otherwise.
	SrcPod string `json:"src_pod,omitempty"`
	DstPod string `json:"dst_pod,omitempty"`
}

// Event is the start of a flow at an observation point: the first packet
// the flow map saw of it.
type Event struct {
	Time time.Time `json:"time"`
	Key
}

// Flow returns the event as a flow without counts, e.g. for filters.
func (e *Event) Flow() Flow { return Flow{Key: e.Key} }

// Direction is the direction of traffic at an observation point, from the
// namespace's own view.
type Direction string

const (
	RX Direction = "rx" // received: the interface's ingress hook
	TX Direction = "tx" // sent: the interface's egress hook
)

// Counters are packets and bytes. Bytes are frame lengths as the TC hook sees
// them (skb->len), the 14-byte Ethernet header included, as veth's own
// counters and packet captures count them. The kernel's counters of lo
// exclude that header.
type Counters struct {
	Packets uint64 `json:"packets"`
	Bytes   uint64 `json:"bytes"`
}

// PodInfo is the Kubernetes pod a network namespace belongs to, as the
// container runtime reports it (collector/cri).
type PodInfo struct {
	Name      string `json:"name"`
	Namespace string `json:"namespace"`
	UID       string `json:"uid,omitempty"`
}

// AttachState is the state of nsflow's programs on one interface.
type AttachState string

const (
	StateAttached AttachState = "attached"
	StateFailed   AttachState = "failed"
	StateDetached AttachState = "detached"
	// StatePeerObserved: a veth's host end left out because its peer is
	// attached in an observed namespace, where each packet is counted
	// once (collector.Config.HostVeths).
	StatePeerObserved AttachState = "peer-observed"
	// StateRefused: not attached, over a limit (collector.Config
	// MaxInterfaces, ReservedPoints).
	StateRefused AttachState = "refused"
)

// AttachErrorReasons are the values of the attach-errors metric's reason
// label: a small, fixed set, so that every series exists from the start.
var AttachErrorReasons = []string{"not_supported", "permission", "gone", "exists", "totals_full", "other"}
