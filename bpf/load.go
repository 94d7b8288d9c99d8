package bpf

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"

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
	// PinPath, when set, is a directory on a bpffs where the counting maps
	// (totals, flows, stats) are pinned, and reused when they are already
	// there and compatible, so counts survive the process.
	PinPath string
	// OnReplace is told about a pinned map that is incompatible with this
	// version (another key/value layout or size) and is being replaced.
	OnReplace func(name string, why error)
}

// PinnedMaps are the maps pinned with Options.PinPath.
var PinnedMaps = []string{NsflowMapTotals, NsflowMapFlows, NsflowMapStats}

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
	var copts *ebpf.CollectionOptions
	if opts.PinPath != "" {
		for _, name := range PinnedMaps {
			ms := spec.Maps[name]
			ms.Pinning = ebpf.PinByName
			path := filepath.Join(opts.PinPath, name)
			m, err := ebpf.LoadPinnedMap(path, nil)
			if errors.Is(err, os.ErrNotExist) {
				continue
			}
			if err == nil {
				err = ms.Compatible(m)
				m.Close()
			}
			if err != nil {
				if opts.OnReplace != nil {
					opts.OnReplace(name, err)
				}
				if err := os.Remove(path); err != nil {
					return nil, fmt.Errorf("replace pinned map %s: %w", path, err)
				}
			}
		}
		copts = &ebpf.CollectionOptions{Maps: ebpf.MapOptions{PinPath: opts.PinPath}}
	}
	var objs NsflowObjects
	if err := spec.LoadAndAssign(&objs, copts); err != nil {
		var verr *ebpf.VerifierError
		if errors.As(err, &verr) {
			return nil, fmt.Errorf("load nsflow programs: %w\n%+v", err, verr)
		}
		return nil, fmt.Errorf("load nsflow programs: %w", err)
	}
	return &objs, nil
}
