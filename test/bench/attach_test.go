package bench

import (
	"os"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/nsflow/nsflow/bpf"
	"github.com/nsflow/nsflow/collector/attach"
	"github.com/nsflow/nsflow/collector/nsenter"
	"github.com/nsflow/nsflow/test/testenv"
)

func rcuExpedited() string {
	exp, _ := os.ReadFile("/sys/kernel/rcu_expedited")
	return strings.TrimSpace(string(exp))
}

// BenchmarkAttach measures what attaching one interface's two hooks costs,
// by mechanism, at the kernel's RCU mode (/sys/kernel/rcu_expedited,
// logged; the benchmark never changes it):
//
//   - TCX (BPF_LINK_CREATE) of each kind of program nsflow could attach: an
//     empty program, the shared parser and a fresh stub (tcx/KIND). Each
//     attach swaps the hook's program list under RTNL and waits for an RCU
//     grace period (kernel/bpf/tcx.c tcx_link_attach → tcx_entry_sync →
//     synchronize_rcu), whatever the program.
//   - The steps of the clsact path, each timed alone on a fresh interface
//     state: creating the clsact qdisc, dumping one hook's filters (the old
//     path dumped both before adding), adding the ingress cls_bpf filter,
//     adding the egress one, and deleting the qdisc (which drops both).
//   - Both hooks through nsflow's attachers as the collector calls them
//     (pair/tcx, pair/clsact on a fresh interface, pair/clsact-existing on
//     an interface whose clsact qdisc exists: two dumps more), with the gap
//     between the first hook attached and the second (the window in which
//     one direction is counted and the other not): for the raw steps the
//     egress add's duration, for TCX the second attach's.
//   - Loading one stub (bpf's BenchmarkStubLoad measures it alone too).
//
// The kinds are interleaved over rounds; each figure is the median. The
// interface is a veth in a namespace that no nsflow can find (no bind mount,
// no process: held by this process's handle alone), so that a concurrent
// serve observing every namespace does not attach to it meanwhile.
func BenchmarkAttach(b *testing.B) {
	testenv.RequireRoot(b)
	ns, nl := hiddenNamespace(b)
	objs, err := bpf.Load(bpf.Options{})
	if err != nil {
		b.Fatal(err)
	}
	defer objs.Close()
	empty := emptyProgram(b)
	owner, err := attach.NewOwner("", nil, nil)
	if err != nil {
		b.Fatal(err)
	}
	defer owner.Close()
	eth0, err := nl.LinkByName("eth0")
	if err != nil {
		b.Fatal(err)
	}
	ifindex := eth0.Attrs().Index
	dummy := &netlink.Dummy{LinkAttrs: netlink.LinkAttrs{Index: ifindex}}
	qdisc := &netlink.GenericQdisc{QdiscAttrs: netlink.QdiscAttrs{LinkIndex: ifindex,
		Handle: netlink.MakeHandle(0xffff, 0), Parent: netlink.HANDLE_CLSACT}, QdiscType: "clsact"}
	filter := func(parent uint32, p *ebpf.Program) *netlink.BpfFilter {
		return &netlink.BpfFilter{FilterAttrs: netlink.FilterAttrs{LinkIndex: ifindex, Parent: parent,
			Priority: 1, Protocol: unix.ETH_P_ALL, Handle: 1}, Fd: p.FD(), Name: owner.Name(), DirectAction: true}
	}
	slot := uint32(0)
	stubs := func() attach.Programs {
		var ps [2]*ebpf.Program
		for i, dir := range []bpf.Direction{bpf.RX, bpf.TX} {
			slot++
			t := time.Now()
			p, err := objs.Stub(bpf.NsflowObsKey{Netns: 1, Ifindex: slot, Dir: uint8(dir)})
			if err != nil {
				b.Fatal(err)
			}
			add("stub-load", time.Since(t))
			ps[i] = p
		}
		return attach.Programs{Ingress: ps[0], Egress: ps[1]}
	}
	timed := func(name string, fn func() error) {
		t := time.Now()
		err := fn()
		add(name, time.Since(t))
		if err != nil {
			b.Fatalf("%s: %v", name, err)
		}
	}
	kinds := []string{"tcx/empty", "tcx/parser", "tcx/stub", "clsact/steps", "pair/tcx", "pair/clsact", "pair/clsact-existing"}
	rounds := 10
	if b.N > rounds {
		rounds = b.N
	}
	for r := 0; r < rounds; r++ {
		for k := range kinds {
			switch kind := kinds[(k+r)%len(kinds)]; kind {
			case "tcx/empty", "tcx/parser", "tcx/stub":
				p := empty
				switch kind {
				case "tcx/parser":
					p = objs.NsflowIngress
				case "tcx/stub":
					ps := stubs()
					ps.Egress.Close()
					p = ps.Ingress
				}
				var l link.Link
				err := nsenter.Do(ns, func() error {
					var err error
					t0 := time.Now()
					l, err = link.AttachTCX(link.TCXOptions{Interface: ifindex, Program: p, Attach: ebpf.AttachTCXIngress, Anchor: link.Head()})
					add(kind, time.Since(t0))
					return err
				})
				if kind == "tcx/stub" {
					p.Close()
				}
				if err != nil {
					b.Fatal(err)
				}
				l.Close()
			case "clsact/steps":
				ps := stubs()
				timed("clsact/qdisc-create", func() error { return nl.QdiscAdd(qdisc) })
				timed("clsact/filter-dump", func() error { _, err := nl.FilterList(dummy, netlink.HANDLE_MIN_INGRESS); return err })
				timed("clsact/filter-ingress", func() error { return nl.FilterAdd(filter(netlink.HANDLE_MIN_INGRESS, ps.Ingress)) })
				timed("clsact/filter-egress", func() error { return nl.FilterAdd(filter(netlink.HANDLE_MIN_EGRESS, ps.Egress)) })
				timed("clsact/qdisc-delete", func() error { return nl.QdiscDel(qdisc) })
				ps.Ingress.Close()
				ps.Egress.Close()
			case "pair/tcx", "pair/clsact", "pair/clsact-existing":
				var a attach.Attacher
				switch kind {
				case "pair/tcx":
					a = attach.NewTCX(nil)
				case "pair/clsact-existing":
					if err := nl.QdiscAdd(qdisc); err != nil {
						b.Fatal(err)
					}
					fallthrough
				default:
					a = attach.NewClsact(owner)
				}
				ps := stubs()
				var att attach.Attachment
				timed(kind, func() (err error) { att, err = a.Attach(ns, nl, 1, ifindex, ps); return err })
				ps.Ingress.Close()
				ps.Egress.Close()
				timed(kind+"/detach", att.Close)
				if kind == "pair/clsact-existing" {
					if err := nl.QdiscDel(qdisc); err != nil {
						b.Fatal(err)
					}
				}
			}
		}
	}
	// The gap between the first hook and the second: the second's attach.
	samples["gap/clsact"] = samples["clsact/filter-egress"]
	samples["gap/tcx"] = samples["tcx/stub"]
	names := make([]string, 0, len(samples))
	for k := range samples {
		names = append(names, k)
	}
	sort.Strings(names)
	for _, k := range names {
		b.ReportMetric(median(samples[k]), "µs/"+k)
	}
	b.Logf("rcu_expedited=%s (the kernel's mode, not changed); µs by round: %v", rcuExpedited(), samples)
	samples = map[string][]float64{}
}

// samples holds BenchmarkAttach's timings by step, in µs.
var samples = map[string][]float64{}

func add(name string, d time.Duration) {
	samples[name] = append(samples[name], float64(d.Nanoseconds())/1000)
}

// hiddenNamespace makes a network namespace held only by its handle (not
// bind-mounted, no process in it: discovery cannot find it) with a veth
// pair eth0/peer0, both up, and returns it with a netlink handle in it.
func hiddenNamespace(b *testing.B) (netns.NsHandle, *netlink.Handle) {
	var ns netns.NsHandle
	err := nsenter.Run(func() error {
		var err error
		ns, err = netns.New() // unshare(CLONE_NEWNET) on the locked thread
		return err
	}, func() error { return nil })
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { ns.Close() })
	nl, err := netlink.NewHandleAt(ns, unix.NETLINK_ROUTE)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(nl.Close)
	veth := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "eth0"}, PeerName: "peer0"}
	if err := nl.LinkAdd(veth); err != nil {
		b.Fatal(err)
	}
	for _, n := range []string{"eth0", "peer0"} {
		l, err := nl.LinkByName(n)
		if err == nil {
			err = nl.LinkSetUp(l)
		}
		if err != nil {
			b.Fatal(err)
		}
	}
	return ns, nl
}
