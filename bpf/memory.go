package bpf

import (
	"fmt"
	"sync"

	"github.com/cilium/ebpf"
)

// Kernel memory. Per-CPU maps cost their values once per *possible* CPU,
// charged to the memory cgroup of the process that creates them: at
// 65,536 points the totals cost 1 MiB per CPU, 64 MiB on a 64-CPU node.
// The default capacities are therefore derived from the node's possible
// CPUs so that the maps stay within a fixed budget whatever the CPU count
// (TestKernelMemory): the totals within TotalsBudget, the flows (shared
// values, not per-CPU: 9.5 MiB at 65,536 on any node) within FlowsBudget.
const (
	// TotalsBudget bounds the default totals map (per-CPU array).
	TotalsBudget = 32 << 20
	// FlowsBudget bounds the default flow map (LRU hash).
	FlowsBudget = 32 << 20
	// defaultCap is the largest default capacity of either map.
	defaultCap = 65536
	// minCap is the smallest: a node with more CPUs than the budgets
	// allow for (over 2,000 for the totals) still gets this many.
	minCap = 1024
)

// DefaultMaxPoints is the totals' capacity for a node of ncpu possible
// CPUs: the most observation points (a power of two, at most 65,536) whose
// per-CPU counters fit TotalsBudget: 65,536 at 2 CPUs, 16,384 (8,192
// interfaces) at 64, 4,096 at 256 (TestKernelMemory).
func DefaultMaxPoints(ncpu int) uint32 {
	n := uint32(defaultCap)
	for n > minCap && MapMemory(totalsShape(n), ncpu) > TotalsBudget {
		n /= 2
	}
	return n
}

// DefaultFlowEntries is the flow map's capacity for a node of ncpu possible
// CPUs: the most flows (a multiple of 1,024, at most 65,536) that fit
// FlowsBudget: 65,536 on any node of up to ~700,000 CPUs (only the bucket
// locks grow with the CPUs; TestKernelMemory).
func DefaultFlowEntries(ncpu int) uint32 {
	n := uint32(defaultCap)
	for n > minCap && MapMemory(flowsShape(n), ncpu) > FlowsBudget {
		n -= 1024
	}
	return n
}

// MapShape is what a map's kernel memory depends on.
type MapShape struct {
	Type       ebpf.MapType
	KeySize    uint32
	ValueSize  uint32
	MaxEntries uint32
}

func totalsShape(n uint32) MapShape {
	return MapShape{ebpf.PerCPUArray, 4, 16, n}
}

func flowsShape(n uint32) MapShape {
	return MapShape{ebpf.LRUHash, 40, 48, n}
}

func roundUp8(n uint64) uint64 { return (n + 7) &^ 7 }

func pow2(n uint64) uint64 {
	p := uint64(1)
	for p < n {
		p <<= 1
	}
	return p
}

// MapMemory is the kernel memory of a map of that shape on a node of ncpu
// possible CPUs, by the kernel's own accounting of its maps (the
// map_mem_usage of kernel/bpf/arraymap.c, hashtab.c and ringbuf.c, 6.4+,
// which /proc/PID/fdinfo reports as memlock), to within the size of the
// map's own struct (a few hundred bytes, left out):
//
//   - array: entries × round8(value); per-CPU array: entries × (8 +
//     round8(value) × ncpu); program array: entries × 8;
//   - hash (preallocated): buckets (the next power of two of entries) ×
//     16 + ncpu × 32 (bucket locks) + entries × elem, elem = 48 +
//     round8(key) + round8(value); per-CPU (LRU) hash: elem = 48 +
//     round8(key) + 8, plus entries × round8(value) × ncpu;
//   - ring buffer: its size plus a page per 512 pages of it (the page
//     array), two pages of header.
func MapMemory(m MapShape, ncpu int) uint64 {
	n, c := uint64(m.MaxEntries), uint64(ncpu)
	val := roundUp8(uint64(m.ValueSize))
	switch m.Type {
	case ebpf.Array:
		return n * val
	case ebpf.PerCPUArray:
		return n*8 + n*val*c
	case ebpf.ProgramArray:
		return n * 8
	case ebpf.Hash, ebpf.LRUHash:
		return pow2(n)*16 + c*32 + n*(48+roundUp8(uint64(m.KeySize))+val)
	case ebpf.PerCPUHash, ebpf.LRUCPUHash:
		return pow2(n)*16 + c*32 + n*(48+roundUp8(uint64(m.KeySize))+8) + n*val*c
	case ebpf.RingBuf:
		pages := n / 4096
		return n + (pages+2)*8 + 2*4096
	}
	return 0
}

// KernelMemory is the kernel memory of the maps a Load with opts creates
// on a node of ncpu possible CPUs (MapMemory of each, the cookies map
// included; the flow events ring buffer only with Events), by map name.
func KernelMemory(opts Options, ncpu int) (map[string]uint64, error) {
	spec, err := mapSpecs()
	if err != nil {
		return nil, err
	}
	if opts.FlowEntries == 0 {
		opts.FlowEntries = DefaultFlowEntries(ncpu)
	}
	if opts.MaxPoints == 0 {
		opts.MaxPoints = DefaultMaxPoints(ncpu)
	}
	out := map[string]uint64{}
	for name, ms := range spec.Maps {
		if ms.Type == ebpf.Array && (name == ".rodata" || name == ".bss" || name == ".data") {
			continue
		}
		if ms.Type == ebpf.RingBuf && !opts.Events {
			continue
		}
		s := MapShape{ms.Type, ms.KeySize, ms.ValueSize, ms.MaxEntries}
		switch name {
		case NsflowMapFlows:
			s.MaxEntries = opts.FlowEntries
		case NsflowMapTotals, NsflowMapPoints:
			s.MaxEntries = opts.MaxPoints
		case NsflowMapContainers:
			s.MaxEntries = max(opts.ContainerEntries, 1)
		}
		if s.KeySize == 0 && ms.Key != nil {
			return nil, fmt.Errorf("map %s: key size unknown", name)
		}
		out[name] = MapMemory(s, ncpu)
	}
	cs := cookiesSpec(opts.MaxPoints)
	out[CookiesMap] = MapMemory(MapShape{cs.Type, cs.KeySize, cs.ValueSize, cs.MaxEntries}, ncpu)
	return out, nil
}

// mapSpecs is the ELF's collection spec, parsed once: KernelMemory only
// reads its maps (a test calls it for every CPU count up to 1,024).
var mapSpecs = sync.OnceValues(LoadNsflow)
