package bpf

import (
	"errors"
	"fmt"

	"github.com/cilium/ebpf"
)

// Direction of an observation point, from the namespace's own view.
type Direction = NsflowDirection

const (
	// RX is the ingress hook of an interface: the namespace receives.
	RX = NsflowDirectionDIR_RX
	// TX is the egress hook of an interface: the namespace sends.
	TX = NsflowDirectionDIR_TX
)

// DefaultFlowEntries is the default capacity of the flow map.
const DefaultFlowEntries = 65536

// Options configure the objects before they are loaded.
type Options struct {
	// FlowEntries is the flow map's capacity; 0 means DefaultFlowEntries.
	FlowEntries uint32
	// NoFlows disables per-flow accounting: only the exact totals are kept.
	NoFlows bool
	// Events streams every new flow through the flow_events ring buffer;
	// the caller must read it (a full buffer drops events, counted in
	// STAT_EVENTS_LOST).
	Events bool
}

// Load loads nsflow's programs and maps into the kernel. The caller owns the
// returned objects and must Close them.
func Load(opts Options) (*NsflowObjects, error) {
	spec, err := LoadNsflow()
	if err != nil {
		return nil, err
	}
	if opts.FlowEntries == 0 {
		opts.FlowEntries = DefaultFlowEntries
	}
	spec.Maps[NsflowMapFlows].MaxEntries = opts.FlowEntries
	if opts.NoFlows {
		if err := spec.Variables[NsflowVarFlowsEnabled].Set(uint8(0)); err != nil {
			return nil, fmt.Errorf("set %s: %w", NsflowVarFlowsEnabled, err)
		}
	}
	if opts.Events {
		if err := spec.Variables[NsflowVarEventsEnabled].Set(uint8(1)); err != nil {
			return nil, fmt.Errorf("set %s: %w", NsflowVarEventsEnabled, err)
		}
	}
	var objs NsflowObjects
	if err := spec.LoadAndAssign(&objs, nil); err != nil {
		var verr *ebpf.VerifierError
		if errors.As(err, &verr) {
			return nil, fmt.Errorf("load nsflow programs: %w\n%+v", err, verr)
		}
		return nil, fmt.Errorf("load nsflow programs: %w", err)
	}
	return &objs, nil
}
