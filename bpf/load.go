package bpf

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/btf"
	"golang.org/x/sys/unix"
)

// Direction of an observation point, from the namespace's own view.
type Direction = NsflowDirection

const (
	// RX is the ingress hook of an interface: the namespace receives.
	RX = NsflowDirectionDIR_RX
	// TX is the egress hook of an interface: the namespace sends.
	TX = NsflowDirectionDIR_TX
)

// Link is what the frames of a hook start with (the stub hands it to the
// parser, which needs it to find the network header).
type Link = NsflowLink

const (
	// LinkEther: an Ethernet header (veth, bridge, lo, vxlan, macvlan, ...).
	LinkEther = NsflowLinkLINK_ETHER
	// LinkNone: the network header itself (tun, wireguard, ip tunnels).
	LinkNone = NsflowLinkLINK_NONE
)

// LinkOf returns the link layer of a device of that netlink encapsulation
// type (LinkAttrs.EncapType, from the device's ARPHRD_* type): Ethernet
// and loopback devices have an Ethernet header at the TC hooks; every other
// type is taken to start at the network header.
func LinkOf(encapType string) Link {
	switch encapType {
	case "ether", "loopback", "":
		return LinkEther
	}
	return LinkNone
}

// MaxPointsLimit is the most observation points the totals can have: a
// flow key names its point by a 16-bit slot.
const MaxPointsLimit = int(NsflowConstsMAX_SLOTS)

// Options configure the objects before they are loaded.
type Options struct {
	// FlowEntries is the flow map's capacity; 0 means DefaultFlowEntries
	// for the node's possible CPUs.
	FlowEntries uint32
	// MaxPoints is how many observation points (hooks) the totals can
	// count, at most MaxPointsLimit; 0 means DefaultMaxPoints for the
	// node's possible CPUs.
	MaxPoints uint32
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
	// ProbeReads loads the egress parser that reads the kernel's sk_buff
	// through bpf_probe_read_kernel, as on kernels without the
	// bpf_cast_to_kern_ctx kfunc, where the kernel has it too (tests,
	// benchmarks).
	ProbeReads bool
	// NoCommonLRU creates the flow map with BPF_F_NO_COMMON_LRU: an LRU
	// list per CPU instead of a common one (no shared lock on inserts,
	// but each CPU holds only FlowEntries / CPUs of the flows it creates).
	// A benchmark variant (docs/BENCHMARKS.md).
	NoCommonLRU bool
	// Attribution records in each egress flow the cgroup v2 id of its
	// sending socket (NsflowFlowVal.Cgroup; bpf_skb_cgroup_id): at the
	// flow's insert, or at a later packet while it is 0. Ignored with
	// NoFlows.
	Attribution bool
	// SocketLookup records in each ingress flow the cgroup v2 id of the
	// socket that receives it in the namespace (bpf_sk_lookup_tcp/udp at
	// the flow's first packet; TCP and UDP only). Ignored with NoFlows.
	SocketLookup bool
	// ContainerEntries > 0 keeps per (observation point, cgroup) totals
	// in a map of that many entries (ReadContainers): egress packets under
	// their socket's cgroup, ingress ones under their flow's (SocketLookup),
	// 0 when unknown. It needs the flows (an error with NoFlows).
	ContainerEntries uint32
}

// PinnedMaps are the maps pinned with Options.PinPath: the counters, what
// their slots count, and what the stubs of a previous process need to keep
// counting until a new process adopts them (the parser they tail-call and
// the slot they hand it). The containers map is pinned too when it is on
// (Options.ContainerEntries); a process with it off removes a pinned one,
// whose counts it would not keep up to date when it frees slots.
var PinnedMaps = []string{NsflowMapTotals, NsflowMapPoints, NsflowMapFlows, NsflowMapStats,
	NsflowMapAccountProgs}

// objects are the loaded programs and maps shared by every hook: every map,
// the parsers (not the stubs: they are loaded per hook, by Stub) and the
// .rodata the stubs read their configuration from.
type objects struct {
	NsflowMaps
	NsflowIngress *ebpf.Program `ebpf:"nsflow_ingress"`
	NsflowEgress  *ebpf.Program `ebpf:"nsflow_egress"`
	Rodata        *ebpf.Map     `ebpf:".rodata"`
}

// Objects are nsflow's loaded BPF objects: the parser programs and maps,
// shared by every hook, and what it takes to load a stub for one hook
// (Stub). The caller must Close them.
type Objects struct {
	objects
	// KernCtx says which egress parser was loaded: true, the one that
	// reads the GSO replay's kernel fields through bpf_cast_to_kern_ctx
	// (the kernel has it: 6.3+); false, through bpf_probe_read_kernel.
	KernCtx bool
	stubs   [2]*ebpf.ProgramSpec // by Direction, with map references resolved
	slots   slots
}

// Load loads nsflow's programs and maps into the kernel. The caller owns the
// returned objects and must Close them.
func Load(opts Options) (*Objects, error) {
	spec, err := LoadNsflow()
	if err != nil {
		return nil, err
	}
	ncpu, err := ebpf.PossibleCPU()
	if err != nil {
		return nil, err
	}
	if opts.FlowEntries == 0 {
		opts.FlowEntries = DefaultFlowEntries(ncpu)
	}
	spec.Maps[NsflowMapFlows].MaxEntries = opts.FlowEntries
	if opts.NoCommonLRU {
		spec.Maps[NsflowMapFlows].Flags |= unix.BPF_F_NO_COMMON_LRU
	}
	if opts.MaxPoints == 0 {
		opts.MaxPoints = DefaultMaxPoints(ncpu)
	}
	if opts.MaxPoints > uint32(MaxPointsLimit) {
		return nil, fmt.Errorf("%d observation points: at most %d", opts.MaxPoints, MaxPointsLimit)
	}
	spec.Maps[NsflowMapTotals].MaxEntries = opts.MaxPoints
	spec.Maps[NsflowMapPoints].MaxEntries = opts.MaxPoints
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
	if opts.ContainerEntries > 0 && opts.NoFlows {
		return nil, errors.New("per-container totals need the flows: ContainerEntries with NoFlows")
	}
	// The containers map is created in any case (the parser references
	// it), of one entry when off: the programs never touch it then.
	spec.Maps[NsflowMapContainers].MaxEntries = max(opts.ContainerEntries, 1)
	for name, on := range map[string]bool{NsflowVarAttribution: opts.Attribution && !opts.NoFlows,
		NsflowVarSkLookup: opts.SocketLookup && !opts.NoFlows, NsflowVarContainersEnabled: opts.ContainerEntries > 0} {
		if !on {
			continue
		}
		if err := spec.Variables[name].Set(uint8(1)); err != nil {
			return nil, fmt.Errorf("set %s: %w", name, err)
		}
	}
	if preemptRT() {
		if err := spec.Variables[NsflowVarAtomicCounts].Set(uint8(1)); err != nil {
			return nil, fmt.Errorf("set %s: %w", NsflowVarAtomicCounts, err)
		}
	}
	// GRO's sk_buffs carry a NAPI ID; below it, the field holds a sender
	// CPU + 1 (rx_segments in nsflow.c).
	if err := spec.Variables[NsflowVarNapiIdMin].Set(uint32(ncpu + 1)); err != nil {
		return nil, fmt.Errorf("set %s: %w", NsflowVarNapiIdMin, err)
	}
	var copts *ebpf.CollectionOptions
	if opts.PinPath != "" {
		pinned := PinnedMaps
		if opts.ContainerEntries > 0 {
			pinned = append(slices.Clip(pinned), NsflowMapContainers)
		} else if err := os.Remove(filepath.Join(opts.PinPath, NsflowMapContainers)); err != nil && !errors.Is(err, os.ErrNotExist) {
			return nil, fmt.Errorf("remove pinned map %s: %w", NsflowMapContainers, err)
		}
		for _, name := range pinned {
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
	// The egress parser: with bpf_cast_to_kern_ctx where the kernel's BTF
	// has it (a feature probe, not a version), else with probe reads. The
	// parsers with the per-container attribution only where it is on:
	// without it, the parsers are those from before it, unchanged.
	o := &Objects{KernCtx: !opts.ProbeReads && haveKernCtx()}
	ingress, egress, egressK := NsflowProgNsflowIngress, NsflowProgNsflowEgress, NsflowProgNsflowEgressK
	if opts.ContainerEntries > 0 || !opts.NoFlows && (opts.Attribution || opts.SocketLookup) {
		ingress, egress, egressK = NsflowProgNsflowAttrIn, NsflowProgNsflowAttrEg, NsflowProgNsflowAttrEgk
	}
	if o.KernCtx {
		egress = egressK
	}
	ing, egr := spec.Programs[ingress], spec.Programs[egress]
	for _, name := range []string{NsflowProgNsflowIngress, NsflowProgNsflowEgress, NsflowProgNsflowEgressK,
		NsflowProgNsflowAttrIn, NsflowProgNsflowAttrEg, NsflowProgNsflowAttrEgk} {
		delete(spec.Programs, name)
	}
	spec.Programs[NsflowProgNsflowIngress], spec.Programs[NsflowProgNsflowEgress] = ing, egr
	if err := spec.LoadAndAssign(&o.objects, copts); err != nil {
		var verr *ebpf.VerifierError
		if errors.As(err, &verr) {
			return nil, fmt.Errorf("load nsflow programs: %w\n%+v", err, verr)
		}
		return nil, fmt.Errorf("load nsflow programs: %w", err)
	}
	if err := o.init(spec, opts.PinPath, opts.OnReplace, opts.ContainerEntries > 0); err != nil {
		o.Close()
		return nil, err
	}
	return o, nil
}

// init readies the stub templates, puts the parsers where the stubs
// tail-call them (replacing those of a previous process in a pinned
// account_progs) and reads which slots are taken.
func (o *Objects) init(spec *ebpf.CollectionSpec, pinPath string, onReplace func(string, error), containers bool) error {
	maps := map[string]*ebpf.Map{
		NsflowMapTotals: o.Totals, NsflowMapStats: o.Stats, NsflowMapAccountProgs: o.AccountProgs,
		".rodata": o.Rodata,
	}
	for dir, name := range map[Direction]string{RX: NsflowProgNsflowStubIngress, TX: NsflowProgNsflowStubEgress} {
		ps := spec.Programs[name].Copy()
		templates := map[NsflowConsts]int{}
		for i := range ps.Instructions {
			ins := &ps.Instructions[i]
			if t, ok := template(ins); ok {
				templates[t]++
			}
			if !ins.IsLoadFromMap() {
				continue
			}
			m, ok := maps[ins.Reference()]
			if !ok {
				return fmt.Errorf("stub %s references map %q, which it may not", name, ins.Reference())
			}
			if err := ins.AssociateMap(m); err != nil {
				return fmt.Errorf("stub %s: %w", name, err)
			}
		}
		for _, t := range []NsflowConsts{NsflowConstsSLOT_TEMPLATE, NsflowConstsLINK_TEMPLATE} {
			if templates[t] != 1 {
				return fmt.Errorf("stub %s: %d templates %#x, want 1", name, templates[t], t)
			}
		}
		o.stubs[dir] = ps
	}
	if err := o.AccountProgs.Put(uint32(RX), o.NsflowIngress); err != nil {
		return fmt.Errorf("set the ingress parser: %w", err)
	}
	if err := o.AccountProgs.Put(uint32(TX), o.NsflowEgress); err != nil {
		return fmt.Errorf("set the egress parser: %w", err)
	}
	cookies, err := loadCookies(o.Totals.MaxEntries(), pinPath, onReplace)
	if err != nil {
		return err
	}
	var cm *ebpf.Map // the containers map, when the programs write it
	if containers {
		cm = o.Containers
	}
	return o.slots.init(o.Totals, o.Points, cookies, o.Flows, cm)
}

// template says which template immediate ins moves, if any.
func template(ins *asm.Instruction) (NsflowConsts, bool) {
	if ins.OpCode.Class() != asm.ALU64Class || ins.OpCode.ALUOp() != asm.Mov || ins.OpCode.Source() != asm.ImmSource {
		return 0, false
	}
	switch t := NsflowConsts(ins.Constant); t {
	case NsflowConstsSLOT_TEMPLATE, NsflowConstsLINK_TEMPLATE:
		return t, true
	}
	return 0, false
}

// Hook is what a stub is loaded for.
type Hook struct {
	// Point is the observation point (namespace inode, ifindex, direction).
	Point NsflowObsKey
	// Cookie is the namespace's cookie (SO_NETNS_COOKIE; 0: unknown): a
	// slot recorded for Point under another cookie (an earlier namespace
	// with the same inode) is zeroed and handed over, never adopted.
	Cookie uint64
	// Link is what the interface's frames start with (LinkOf).
	Link Link
}

// Stub loads the program for one hook of an Ethernet-like interface: it
// counts into the slot of totals that key (its Dir included) names,
// assigned if it has none yet, and tail-calls the parser for flows and GSO
// segments. Loading it takes microseconds: it is a dozen instructions. The
// caller owns the program.
func (o *Objects) Stub(key NsflowObsKey) (*ebpf.Program, error) {
	return o.StubFor(Hook{Point: key, Link: LinkEther})
}

// StubIn is Stub for the namespace of that cookie (Hook.Cookie).
func (o *Objects) StubIn(key NsflowObsKey, cookie uint64) (*ebpf.Program, error) {
	return o.StubFor(Hook{Point: key, Cookie: cookie, Link: LinkEther})
}

// StubFor loads the stub of hook h (Stub).
func (o *Objects) StubFor(h Hook) (*ebpf.Program, error) {
	key := h.Point
	if key.Dir > uint8(TX) {
		return nil, fmt.Errorf("stub for direction %d", key.Dir)
	}
	if h.Link != LinkEther && h.Link != LinkNone {
		return nil, fmt.Errorf("stub for link layer %d", h.Link)
	}
	slot, err := o.slots.assign(key, h.Cookie)
	if err != nil {
		return nil, err
	}
	ps := o.stubs[key.Dir].Copy()
	for i := range ps.Instructions {
		ins := &ps.Instructions[i]
		switch t, _ := template(ins); t {
		case NsflowConstsSLOT_TEMPLATE:
			ins.Constant = int64(slot)
		case NsflowConstsLINK_TEMPLATE:
			ins.Constant = int64(h.Link)
		}
	}
	prog, err := ebpf.NewProgram(ps)
	if err != nil {
		return nil, fmt.Errorf("load stub for slot %d: %w", slot, err)
	}
	return prog, nil
}

// Close releases the objects (pinned maps stay pinned).
func (o *Objects) Close() error {
	// Close is a no-op on the nil objects of a failed Load.
	return errors.Join(o.NsflowIngress.Close(), o.NsflowEgress.Close(), o.Rodata.Close(), o.NsflowMaps.Close(), o.slots.cookies.Close())
}

// preemptRT says whether the running kernel is PREEMPT_RT (its TC programs
// are preemptible: nsflow.c adds its counters atomically there). The
// kernel says so in /sys/kernel/realtime (RT patch sets and mainline since
// 6.12) and in its version string (uname -v: "PREEMPT_RT").
func preemptRT() bool {
	if b, err := os.ReadFile("/sys/kernel/realtime"); err == nil && bytes.Equal(bytes.TrimSpace(b), []byte("1")) {
		return true
	}
	b, err := os.ReadFile("/proc/sys/kernel/version")
	return err == nil && bytes.Contains(b, []byte("PREEMPT_RT"))
}

// haveKernCtx says whether the running kernel has the bpf_cast_to_kern_ctx
// kfunc (6.3+), from its BTF.
func haveKernCtx() bool {
	spec, err := btf.LoadKernelSpec()
	if err != nil {
		return false
	}
	var fn *btf.Func
	return spec.TypeByName("bpf_cast_to_kern_ctx", &fn) == nil
}
