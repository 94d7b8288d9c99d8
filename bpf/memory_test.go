package bpf

import (
	"bytes"
	"fmt"
	"os"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/btf"
)

// The formula of MapMemory agrees with the kernel's own accounting of the
// maps a Load creates (memlock, from map_mem_usage) on this machine, to
// within each map's struct (1 KiB) for the maps the budgets are about.
//
// Kernels before 6.4 have no map_mem_usage: their memlock is an estimate
// (key and value sizes times entries, in pages), not what the maps cost;
// there is nothing to compare with there.
func TestMapMemoryMatchesKernel(t *testing.T) {
	if kspec, err := btf.LoadKernelSpec(); err == nil {
		var fn *btf.Func
		if kspec.TypeByName("htab_map_mem_usage", &fn) != nil {
			t.Skip("the kernel has no map_mem_usage (before 6.4): its memlock is an estimate")
		}
	}
	objs := load(t, Options{Events: true})
	ncpu := ebpf.MustPossibleCPU()
	want, err := KernelMemory(Options{Events: true}, ncpu)
	if err != nil {
		t.Fatal(err)
	}
	for name, m := range map[string]*ebpf.Map{NsflowMapTotals: objs.Totals, NsflowMapPoints: objs.Points,
		NsflowMapFlows: objs.Flows, NsflowMapStats: objs.Stats, NsflowMapAccountProgs: objs.AccountProgs,
		NsflowMapFlowEvents: objs.FlowEvents, CookiesMap: objs.slots.cookies} {
		info, err := m.Info()
		if err != nil {
			t.Fatal(err)
		}
		got, ok := info.Memlock()
		if !ok {
			t.Skip("kernel reports no memlock")
		}
		// The kernel adds its struct bpf_map and friends: at most ~1 KiB
		// here; a ring buffer's pages are accounted a little differently.
		slack := uint64(1024)
		if name == NsflowMapFlowEvents {
			slack = 16 * 1024
		}
		if got < want[name] || got-want[name] > slack {
			t.Errorf("map %s: the kernel accounts %d bytes, the formula %d", name, got, want[name])
		}
	}
}

// At defaults, the maps' kernel memory stays within the budgets whatever
// the CPU count: ≤ 64 MiB on a 64-CPU node (docs/DEPLOY.md derives the
// DaemonSet's memory from this).
func TestKernelMemory(t *testing.T) {
	for _, c := range []struct {
		ncpu   int
		points uint32
		flows  uint32
	}{{2, 65536, 65536}, {64, 16384, 65536}, {256, 4096, 65536}} {
		t.Run(fmt.Sprint(c.ncpu), func(t *testing.T) {
			if p, f := DefaultMaxPoints(c.ncpu), DefaultFlowEntries(c.ncpu); p != c.points || f != c.flows {
				t.Errorf("defaults at %d CPUs: %d points, %d flows; want %d, %d", c.ncpu, p, f, c.points, c.flows)
			}
			for _, events := range []bool{false, true} {
				m, err := KernelMemory(Options{Events: events}, c.ncpu)
				if err != nil {
					t.Fatal(err)
				}
				var total uint64
				for _, v := range m {
					total += v
				}
				t.Logf("%d CPUs, events %v: %.1f MiB %v", c.ncpu, events, float64(total)/(1<<20), m)
				if m[NsflowMapTotals] > TotalsBudget || m[NsflowMapFlows] > FlowsBudget {
					t.Errorf("over budget: totals %d, flows %d", m[NsflowMapTotals], m[NsflowMapFlows])
				}
				if total > 64<<20 {
					t.Errorf("%d CPUs: %d bytes, over 64 MiB", c.ncpu, total)
				}
			}
		})
	}
	// Whatever the CPU count: the totals within their budget, the flows
	// within theirs, all of it within 43 MiB (docs/DEPLOY.md).
	for ncpu := 1; ncpu <= 1024; ncpu++ {
		m, err := KernelMemory(Options{Events: true}, ncpu)
		if err != nil {
			t.Fatal(err)
		}
		var total uint64
		for _, v := range m {
			total += v
		}
		if m[NsflowMapTotals] > TotalsBudget || m[NsflowMapFlows] > FlowsBudget || total > 43<<20 {
			t.Fatalf("%d CPUs: totals %d, flows %d, all %d bytes", ncpu, m[NsflowMapTotals], m[NsflowMapFlows], total)
		}
	}
}

// On a PREEMPT_RT kernel (its version says so) the loaded programs add
// their per-CPU counters atomically (atomic_counts set in .rodata);
// elsewhere they do not. make test-kernels runs this on 6.1 PREEMPT_RT.
func TestAtomicCountsOnRT(t *testing.T) {
	objs := load(t, Options{})
	spec, err := LoadNsflow()
	if err != nil {
		t.Fatal(err)
	}
	v := spec.Variables[NsflowVarAtomicCounts]
	rodata := make([]byte, objs.Rodata.ValueSize())
	if err := objs.Rodata.Lookup(uint32(0), &rodata); err != nil {
		t.Fatal(err)
	}
	got := rodata[v.Offset] == 1
	version, _ := os.ReadFile("/proc/sys/kernel/version")
	rt := bytes.Contains(version, []byte("PREEMPT_RT"))
	t.Logf("kernel %q: PREEMPT_RT %v, atomic counts %v", bytes.TrimSpace(version), rt, got)
	if got != preemptRT() || (rt && !got) {
		t.Errorf("atomic_counts %v on a kernel whose version is %q", got, version)
	}
}
