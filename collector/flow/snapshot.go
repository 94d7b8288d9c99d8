package flow

import "time"

// Snapshot is the state of the maps at one instant. Namespaces are sorted by
// name, interfaces by index; flows are in map order.
type Snapshot struct {
	Time       time.Time        `json:"time"`
	Namespaces []NamespaceStats `json:"namespaces"`
	Flows      []Flow           `json:"flows"`
	// Containers are the totals per observation point and sending or
	// receiving cgroup, with collector.Config.Containers only.
	Containers []ContainerStats `json:"containers,omitempty"`
	Stats      Stats            `json:"stats"`
}

// ContainerStats are the totals of one cgroup (a container, or a host
// process's cgroup) at one observation point: at tx the packets its sockets
// sent, at rx those its sockets received (ingress socket lookup).
type ContainerStats struct {
	Netns      string    `json:"netns"`
	NetnsInode uint64    `json:"netns_inode"`
	Interface  string    `json:"interface"`
	Direction  Direction `json:"direction"`
	Cgroup     uint64    `json:"cgroup"`
	// Container names the cgroup as Flow.SrcContainer does ("" unknown).
	Container string   `json:"container"`
	Pod       *PodInfo `json:"pod,omitempty"`
	Counters
}

// NamespaceStats are the totals of one namespace, per interface.
type NamespaceStats struct {
	Name       string           `json:"name"`
	Inode      uint64           `json:"inode"`
	Pod        *PodInfo         `json:"pod,omitempty"`
	Gone       bool             `json:"gone,omitempty"`
	Interfaces []InterfaceStats `json:"interfaces"`
}

// InterfaceStats are the exact totals of one interface, per direction.
type InterfaceStats struct {
	Name  string      `json:"name"`
	Index int         `json:"ifindex"`
	State AttachState `json:"state,omitempty"`
	RX    Counters    `json:"rx"`
	TX    Counters    `json:"tx"`
}

// Stats are the programs' own event counters and the flow map's fill.
type Stats struct {
	FlowEntries  uint64 `json:"flow_entries"`
	FlowCapacity uint64 `json:"flow_capacity"`
	// FlowsCreated counts flows the programs created; FlowsEvicted those
	// the LRU map evicted to make room (their packets remain in the totals);
	// FlowInsertErrors new flows that could not be recorded at all.
	FlowsCreated     uint64 `json:"flows_created"`
	FlowsEvicted     uint64 `json:"flows_evicted"`
	FlowInsertErrors uint64 `json:"flow_insert_errors"`
	// TotalsFull counts packets the programs could not count into a slot
	// of the totals (none in normal operation: every hook has its slot).
	TotalsFull uint64 `json:"totals_full"`
	NonIP      uint64 `json:"non_ip_packets"`
	Truncated  uint64 `json:"truncated_packets"`
	NoDevice   uint64 `json:"no_device_packets"`
	// EventsLost counts new-flow events dropped because the reader fell
	// behind (only with flow events).
	EventsLost uint64 `json:"events_lost,omitempty"`
}
