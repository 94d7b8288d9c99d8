package attach

import (
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/nsflow/nsflow/collector/nsenter"
	"github.com/nsflow/nsflow/test/testenv"
)

// Three nsflow processes attach to and detach from one interface over and
// over, through clsact. The one that created the qdisc deletes it when it
// detaches and finds it empty; another's filters, added between that
// check and the delete, would go with it. Under the qdisc lock they never
// do: every attach succeeds and every process's filters stay until it
// removes them itself.
func TestQdiscDeleteRace(t *testing.T) {
	testenv.RequireRoot(t)
	ns, setup, l := raceNetns(t)
	handle := func() *netlink.Handle {
		nl, err := netlink.NewHandleAt(ns, unix.NETLINK_ROUTE)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(nl.Close)
		return nl
	}
	progs := emptyProgs(t)
	// Three processes: each its own owner (filter names) and netlink socket.
	type process struct {
		name         string
		at           Attacher
		owner        *Owner
		nl           *netlink.Handle
		failed, lost int
		done         int
	}
	var ps []*process
	for _, name := range []string{"A", "B", "C"} {
		o, err := NewOwner("", nil, discard)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { o.Close() })
		ps = append(ps, &process{name: name, at: NewClsact(o), owner: o, nl: handle()})
	}

	const rounds = 5000
	deadline := time.Now().Add(30 * time.Second)
	var wg sync.WaitGroup
	for _, p := range ps {
		wg.Add(1)
		go func() { // attach, check, detach, as fast as it goes
			defer wg.Done()
			for i := 0; i < rounds && time.Now().Before(deadline); i++ {
				att, err := p.at.Attach(ns, p.nl, 0, l.Attrs().Index, progs)
				if err != nil {
					p.failed++
					continue
				}
				if n := ownFilters(t, p.nl, l, p.owner.Name()); n != 2 {
					p.lost++
				}
				if err := att.Close(); err != nil {
					t.Errorf("%s: detach %d: %v", p.name, i, err)
				}
				p.done++
			}
		}()
	}
	wg.Wait()
	for _, p := range ps {
		t.Logf("%s: %d rounds, attach failed %d times, its filters gone while it held them %d times", p.name, p.done, p.failed, p.lost)
		if p.failed > 0 || p.lost > 0 {
			t.Errorf("%s: attach failed %d times, filters deleted under it %d times (the other process's qdisc delete)", p.name, p.failed, p.lost)
		}
	}
	for _, p := range ps {
		if n := ownFilters(t, setup, l, p.owner.Name()); n != 0 {
			t.Errorf("%s: %d filters left behind", p.name, n)
		}
	}
}

// raceNetns makes a network namespace (held by an fd only) with a veth pair
// race0/race1; it returns the namespace, a netlink handle in it and race0.
func raceNetns(t *testing.T) (netns.NsHandle, *netlink.Handle, netlink.Link) {
	t.Helper()
	ns, err := nsenter.NewNetns()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ns.Close() })
	setup, err := netlink.NewHandleAt(ns, unix.NETLINK_ROUTE)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(setup.Close)
	if err := setup.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "race0"}, PeerName: "race1"}); err != nil {
		t.Fatal(err)
	}
	l, err := setup.LinkByName("race0")
	if err != nil {
		t.Fatal(err)
	}
	return ns, setup, l
}

// emptyProgs are programs that let every packet through to the next one.
func emptyProgs(t *testing.T) Programs {
	t.Helper()
	prog, err := ebpf.NewProgram(&ebpf.ProgramSpec{Type: ebpf.SchedCLS, License: "GPL",
		Instructions: asm.Instructions{asm.Mov.Imm(asm.R0, -1), asm.Return()}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { prog.Close() })
	return Programs{Ingress: prog, Egress: prog}
}

// A process of the namespace that holds the qdisc lock's name for itself
// (a tenant squatting it) cannot make nsflow delete another process's
// filters nor fail an attach: a detach that would delete the qdisc it
// created leaves it (empty) instead, and an attach to a qdisc that exists
// waits the lock's bound, then goes on.
func TestQdiscLockSquatted(t *testing.T) {
	testenv.RequireRoot(t)
	ns, setup, l := raceNetns(t)
	var squat int
	if err := nsenter.Do(ns, func() error {
		var err error
		if squat, err = unix.Socket(unix.AF_UNIX, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0); err != nil {
			return err
		}
		return unix.Bind(squat, &unix.SockaddrUnix{Name: fmt.Sprintf("\x00nsflow-clsact/%d", l.Attrs().Index)})
	}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(squat) })
	o, err := NewOwner("", nil, discard)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { o.Close() })
	at, progs := NewClsact(o), emptyProgs(t)
	hasQdisc := func() bool {
		qs, err := setup.QdiscList(l)
		if err != nil {
			t.Fatal(err)
		}
		for _, q := range qs {
			if q.Type() == "clsact" {
				return true
			}
		}
		return false
	}
	cycle := func(what string) time.Duration {
		start := time.Now()
		att, err := at.Attach(ns, setup, 0, l.Attrs().Index, progs)
		took := time.Since(start)
		if err != nil {
			t.Fatalf("%s: attach with the lock squatted: %v", what, err)
		}
		if n := ownFilters(t, setup, l, o.Name()); n != 2 {
			t.Errorf("%s: %d filters attached, want 2", what, n)
		}
		if err := att.Close(); err != nil {
			t.Fatal(err)
		}
		if n := ownFilters(t, setup, l, o.Name()); n != 0 {
			t.Errorf("%s: %d filters left after detach", what, n)
		}
		if !hasQdisc() {
			t.Errorf("%s: the clsact qdisc was deleted without the lock", what)
		}
		return took
	}
	cycle("a qdisc of its own")
	if took := cycle("an existing qdisc"); took < attachLockWait || took > attachLockWait+5*time.Second {
		t.Errorf("attach to an existing qdisc took %s with the lock squatted, want about %s", took, attachLockWait)
	}
}

// ownFilters counts the filters named name on both hooks of l.
func ownFilters(t *testing.T, nl *netlink.Handle, l netlink.Link, name string) int {
	t.Helper()
	n := 0
	for _, parent := range []uint32{netlink.HANDLE_MIN_INGRESS, netlink.HANDLE_MIN_EGRESS} {
		fs, err := nl.FilterList(l, parent)
		if err != nil {
			continue // the qdisc is gone: none
		}
		for _, f := range fs {
			if bf, ok := f.(*netlink.BpfFilter); ok && bf.Name == name {
				n++
			}
		}
	}
	return n
}
