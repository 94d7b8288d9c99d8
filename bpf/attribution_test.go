package bpf

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/nsflow/nsflow/collector/nsenter"
	"github.com/nsflow/nsflow/test/testenv"
)

// A pinned flow map of the layout before the flow value had its cgroup
// (40-byte values) is replaced, OnReplace told, never read with the new
// layout; a pinned containers map is adopted by a process that keeps one,
// and removed by a process that does not (it would not keep it in step
// with the slots it frees).
func TestPinnedLayoutReplaced(t *testing.T) {
	testenv.RequireRoot(t)
	dir := privateBPFFS(t)
	old, err := ebpf.NewMap(&ebpf.MapSpec{Name: NsflowMapFlows, Type: ebpf.LRUHash, KeySize: 40, ValueSize: 40,
		MaxEntries: DefaultFlowEntries(ebpf.MustPossibleCPU())})
	if err != nil {
		t.Fatal(err)
	}
	if err := old.Pin(filepath.Join(dir, NsflowMapFlows)); err != nil {
		t.Fatal(err)
	}
	old.Close()
	replaced := map[string]error{}
	objs, err := Load(Options{PinPath: dir, ContainerEntries: 100, OnReplace: func(name string, why error) { replaced[name] = why }})
	if err != nil {
		t.Fatal(err)
	}
	if len(replaced) != 1 || replaced[NsflowMapFlows] == nil {
		t.Errorf("replaced %v, want only %s", replaced, NsflowMapFlows)
	}
	if vs := objs.Flows.ValueSize(); vs != 48 {
		t.Errorf("flows value size %d, want 48", vs)
	}
	if err := objs.Containers.Put(NsflowContainerKey{Cgroup: 7, Slot: 3}, NsflowCounters{Packets: 5}); err != nil {
		t.Fatal(err)
	}
	objs.Close()

	// Adopted, with its entry.
	replaced = map[string]error{}
	objs, err = Load(Options{PinPath: dir, ContainerEntries: 100, OnReplace: func(name string, why error) { replaced[name] = why }})
	if err != nil {
		t.Fatal(err)
	}
	var c NsflowCounters
	if err := objs.Containers.Lookup(NsflowContainerKey{Cgroup: 7, Slot: 3}, &c); err != nil || c.Packets != 5 || len(replaced) != 0 {
		t.Errorf("pinned containers entry: %+v, %v; replaced %v", c, err, replaced)
	}
	objs.Close()

	// Off: the pin is gone.
	objs, err = Load(Options{PinPath: dir})
	if err != nil {
		t.Fatal(err)
	}
	objs.Close()
	if _, err := os.Stat(filepath.Join(dir, NsflowMapContainers)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("pinned containers map with containers off: %v", err)
	}
}

// peerEnv names the role of a peer process the attribution test starts
// (TestMain runs it instead of the tests).
const peerEnv = "NSFLOW_BPF_ATTRIBUTION_PEER"

// The ports of the attribution test's exchange, in its own namespace.
const (
	serverTCP = 7001 // 127.0.0.1
	serverUDP = 7002 // [::1]
	clientTCP = 7101
	clientUDP = 7102
	// exchanges is how many request/response pairs go over each socket
	// pair; each message is msgSize bytes.
	exchanges = 20
	msgSize   = 200
)

func TestMain(m *testing.M) {
	if role := os.Getenv(peerEnv); role != "" {
		if err := runPeer(role); err != nil {
			fmt.Fprintf(os.Stderr, "peer %s: %v\n", role, err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// runPeer is one side of the attribution test's exchange, in the namespace
// and cgroup it was started in: the server answers every TCP message and
// UDP datagram of the client with one of the same size; the client sends
// them and reads the answers. TCP closes cleanly (the client shuts its
// side down, the server closes on EOF), so that every packet of the
// exchange leaves from the full socket of the process that owns it. Bounded:
// it gives up after 20 s.
func runPeer(role string) error {
	deadline := time.Now().Add(20 * time.Second)
	lo4, lo6 := net.IPv4(127, 0, 0, 1), net.IPv6loopback
	buf := make([]byte, msgSize)
	switch role {
	case "server":
		tl, err := net.ListenTCP("tcp4", &net.TCPAddr{IP: lo4, Port: serverTCP})
		if err != nil {
			return err
		}
		defer tl.Close()
		ul, err := net.ListenUDP("udp6", &net.UDPAddr{IP: lo6, Port: serverUDP})
		if err != nil {
			return err
		}
		defer ul.Close()
		fmt.Println("ready")
		tl.SetDeadline(deadline)
		ul.SetDeadline(deadline)
		udpDone := make(chan error, 1)
		go func() {
			for i := 0; i < exchanges; i++ {
				n, from, err := ul.ReadFromUDP(buf)
				if err != nil {
					udpDone <- err
					return
				}
				if _, err := ul.WriteToUDP(make([]byte, n), from); err != nil {
					udpDone <- err
					return
				}
			}
			udpDone <- nil
		}()
		c, err := tl.AcceptTCP()
		if err != nil {
			return err
		}
		c.SetDeadline(deadline)
		msg := make([]byte, msgSize)
		for {
			if _, err := io.ReadFull(c, msg); err == io.EOF {
				break
			} else if err != nil {
				return err
			}
			if _, err := c.Write(msg); err != nil {
				return err
			}
		}
		if err := c.Close(); err != nil {
			return err
		}
		return <-udpDone
	case "client":
		c, err := net.DialTCP("tcp4", &net.TCPAddr{IP: lo4, Port: clientTCP}, &net.TCPAddr{IP: lo4, Port: serverTCP})
		if err != nil {
			return err
		}
		defer c.Close()
		c.SetDeadline(deadline)
		u, err := net.DialUDP("udp6", &net.UDPAddr{IP: lo6, Port: clientUDP}, &net.UDPAddr{IP: lo6, Port: serverUDP})
		if err != nil {
			return err
		}
		defer u.Close()
		u.SetDeadline(deadline)
		for i := 0; i < exchanges; i++ {
			if _, err := c.Write(buf); err != nil {
				return err
			}
			if _, err := io.ReadFull(c, buf); err != nil {
				return err
			}
			if _, err := u.Write(buf); err != nil {
				return err
			}
			if _, err := u.Read(buf); err != nil {
				return err
			}
		}
		if err := c.CloseWrite(); err != nil {
			return err
		}
		if _, err := c.Read(buf); err != io.EOF {
			return fmt.Errorf("after shutdown: %v, want EOF", err)
		}
		return nil
	case "listener":
		// Any address (IPv6 and IPv4: one dual-stack socket), port
		// forwardPort (TestForwardedNotAttributed): accepts connections and
		// reads each to EOF, until killed or 20 s.
		l, err := net.ListenTCP("tcp", &net.TCPAddr{Port: forwardPort})
		if err != nil {
			return err
		}
		defer l.Close()
		fmt.Println("ready")
		l.SetDeadline(deadline)
		for {
			c, err := l.AcceptTCP()
			if err != nil {
				return err
			}
			c.SetDeadline(deadline)
			io.Copy(io.Discard, c)
			c.Close()
		}
	}
	return fmt.Errorf("unknown role %q", role)
}

// testCgroup is a cgroup v2 directory a test made, and its id.
type testCgroup struct {
	path string
	id   uint64
}

// cgroup2Mount returns where the cgroup v2 hierarchy is mounted (its root;
// on a hybrid layout /sys/fs/cgroup/unified), from /proc/self/mountinfo,
// mounting one on a temporary directory when the system has none (a
// minimal VM).
func cgroup2Mount(t *testing.T) string {
	t.Helper()
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		pre, post, ok := strings.Cut(line, " - ")
		f, g := strings.Fields(pre), strings.Fields(post)
		if ok && len(f) >= 5 && len(g) >= 1 && g[0] == "cgroup2" && f[3] == "/" {
			return f[4]
		}
	}
	dir := t.TempDir()
	if err := unix.Mount("none", dir, "cgroup2", 0, ""); err != nil {
		t.Fatalf("no cgroup2 mount, and mounting one: %v", err)
	}
	t.Cleanup(func() { unix.Unmount(dir, unix.MNT_DETACH) })
	return dir
}

// newCgroup makes a cgroup under the v2 root, removed when the test ends.
func newCgroup(t *testing.T, root, name string) testCgroup {
	t.Helper()
	path := filepath.Join(root, name)
	if err := os.Mkdir(path, 0o755); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		// Its processes have exited; a socket that outlives them does not
		// keep the directory.
		if err := os.Remove(path); err != nil {
			t.Errorf("remove cgroup: %v", err)
		}
	})
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	return testCgroup{path: path, id: st.Ino}
}

// startPeer starts the test binary as a peer of that role, in namespace ns
// and cgroup cg; with ready, it waits for the peer's "ready" line.
func startPeer(t *testing.T, ns netns.NsHandle, cg testCgroup, role string, ready bool) (*exec.Cmd, *bytes.Buffer) {
	t.Helper()
	dir, err := os.Open(cg.path)
	if err != nil {
		t.Fatal(err)
	}
	defer dir.Close()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), peerEnv+"="+role)
	cmd.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: int(dir.Fd()), Pdeathsig: syscall.SIGKILL}
	stderr := &bytes.Buffer{}
	cmd.Stderr = stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := nsenter.Do(ns, cmd.Start); err != nil {
		t.Fatalf("start %s: %v", role, err)
	}
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
	})
	if ready {
		line, err := bufio.NewReader(out).ReadString('\n')
		if err != nil || line != "ready\n" {
			t.Fatalf("%s: %q, %v; stderr: %s", role, line, err, stderr)
		}
	} else {
		go io.Copy(io.Discard, out)
	}
	return cmd, stderr
}

// waitPeer waits for a peer to exit, at most 30 s.
func waitPeer(t *testing.T, cmd *exec.Cmd, stderr *bytes.Buffer, role string) {
	t.Helper()
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("%s: %v; stderr: %s", role, err, stderr)
		}
	case <-time.After(30 * time.Second):
		cmd.Process.Kill()
		t.Fatalf("%s did not finish in 30 s", role)
	}
}

// attachLo makes a new namespace with lo up and the stubs of objs on lo's
// ingress and egress (clsact: on every kernel); it returns the namespace
// and the two observation points.
func attachLo(t *testing.T, objs *Objects) (ns netns.NsHandle, rx, tx NsflowObsKey, lo netlink.Link, h *netlink.Handle) {
	t.Helper()
	err := nsenter.Run(func() error { return unix.Unshare(unix.CLONE_NEWNET) }, func() (err error) {
		ns, err = netns.Get()
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ns.Close() })
	var st unix.Stat_t
	if err := unix.Fstat(int(ns), &st); err != nil {
		t.Fatal(err)
	}
	if h, err = netlink.NewHandleAt(ns); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(h.Close)
	if lo, err = h.LinkByName("lo"); err != nil {
		t.Fatal(err)
	}
	if err := h.LinkSetUp(lo); err != nil {
		t.Fatal(err)
	}
	idx := lo.Attrs().Index
	if err := h.QdiscAdd(&netlink.GenericQdisc{QdiscType: "clsact", QdiscAttrs: netlink.QdiscAttrs{
		LinkIndex: idx, Handle: netlink.MakeHandle(0xffff, 0), Parent: netlink.HANDLE_CLSACT}}); err != nil {
		t.Fatal(err)
	}
	rx = NsflowObsKey{Netns: uint32(st.Ino), Ifindex: uint32(idx), Dir: uint8(RX)}
	tx = NsflowObsKey{Netns: uint32(st.Ino), Ifindex: uint32(idx), Dir: uint8(TX)}
	for _, p := range []struct {
		key    NsflowObsKey
		parent uint32
	}{{rx, netlink.HANDLE_MIN_INGRESS}, {tx, netlink.HANDLE_MIN_EGRESS}} {
		prog := stub(t, objs, p.key)
		if err := h.FilterAdd(&netlink.BpfFilter{FilterAttrs: netlink.FilterAttrs{LinkIndex: idx, Parent: p.parent,
			Handle: 1, Protocol: unix.ETH_P_ALL, Priority: 1}, Fd: prog.FD(), Name: "nsflow-test", DirectAction: true}); err != nil {
			t.Fatal(err)
		}
	}
	return ns, rx, tx, lo, h
}

// loPackets returns lo's packet count (the loopback device counts each
// packet once, as sent and as received), once it has not changed for
// 300 ms (at most 5 s): the exchange's last packets are through.
func loPackets(t *testing.T, h *netlink.Handle) uint64 {
	t.Helper()
	var last uint64
	stable := time.Now()
	for end := time.Now().Add(5 * time.Second); time.Now().Before(end); time.Sleep(50 * time.Millisecond) {
		lo, err := h.LinkByName("lo")
		if err != nil {
			t.Fatal(err)
		}
		n := lo.Attrs().Statistics.TxPackets
		if n != last {
			last, stable = n, time.Now()
		} else if time.Since(stable) > 300*time.Millisecond {
			break
		}
	}
	return last
}

// Two processes in two cgroups talk TCP (IPv4) and UDP (IPv6) over lo in a
// namespace of the test's own, the stubs on lo's hooks. With attribution,
// every egress flow carries the cgroup of the process that sent it (the
// cgroup directory's inode), every ingress flow with the socket lookup the
// cgroup of the process that receives it (0 without); the containers map
// counts, per hook and cgroup, exactly the packets of the flows of that
// process's sockets (the oracle: which ports are whose, not cgroups), and
// per hook as many as lo counted. All off: every cgroup is 0 and the
// containers map stays empty.
func TestAttribution(t *testing.T) {
	testenv.RequireRoot(t)
	root := cgroup2Mount(t)
	pre := fmt.Sprintf("nsflow-bpf-test-%d-", os.Getpid())
	server, client := newCgroup(t, root, pre+"server"), newCgroup(t, root, pre+"client")
	t.Logf("cgroup v2 at %s: server %d, client %d", root, server.id, client.id)
	for _, c := range []struct {
		name string
		opts Options
	}{
		{"all", Options{Attribution: true, SocketLookup: true, ContainerEntries: 64}},
		{"attribution", Options{Attribution: true}},
		{"off", Options{}},
	} {
		t.Run(c.name, func(t *testing.T) {
			objs := load(t, c.opts)
			// Off, the parsers are those without the attribution's code.
			wantIn, wantEg := "nsflow_attr_in", map[bool]string{false: "nsflow_attr_eg", true: "nsflow_attr_egk"}[objs.KernCtx]
			if c.name == "off" {
				wantIn, wantEg = "nsflow_ingress", map[bool]string{false: "nsflow_egress", true: "nsflow_egress_k"}[objs.KernCtx]
			}
			for p, want := range map[*ebpf.Program]string{objs.NsflowIngress: wantIn, objs.NsflowEgress: wantEg} {
				if info, err := p.Info(); err != nil || info.Name != want {
					t.Errorf("parser %+v (%v), want %s", info, err, want)
				}
			}
			ns, rx, tx, _, h := attachLo(t, objs)
			srv, srvErr := startPeer(t, ns, server, "server", true)
			cli, cliErr := startPeer(t, ns, client, "client", false)
			waitPeer(t, cli, cliErr, "client")
			waitPeer(t, srv, srvErr, "server")
			loPkts := loPackets(t, h)

			// Whose is a flow: by its ports, at its point.
			owner := func(dir uint8, k NsflowFlowKey) (testCgroup, bool) {
				port := k.Sport // egress: the sender's
				if dir == uint8(RX) {
					port = k.Dport // ingress: the receiver's
				}
				switch port {
				case serverTCP, serverUDP:
					return server, true
				case clientTCP, clientUDP:
					return client, true
				}
				return testCgroup{}, false
			}
			st := readMaps(t, objs)
			perOwner := map[NsflowContainerKey]uint64{} // packets by (slot, cgroup) of the flows
			sum := map[uint8]uint64{}
			slots := objs.Slots()
			for k, v := range st.flows {
				if k.Netns != tx.Netns {
					t.Errorf("flow of another namespace: %+v", k)
					continue
				}
				cg, ok := owner(k.Dir, k.NsflowFlowKey)
				if !ok {
					t.Errorf("flow %+v: no process of the test owns it", k)
					continue
				}
				want := uint64(0)
				if k.Dir == uint8(TX) && c.opts.Attribution || k.Dir == uint8(RX) && c.opts.SocketLookup {
					want = cg.id
				}
				if v.Cgroup != want {
					t.Errorf("%s flow, IPv%d proto %d, port %d > %d: cgroup %d, want %d", dirName(Direction(k.Dir)),
						k.Family, k.Proto, k.Sport, k.Dport, v.Cgroup, want)
				}
				slot := slots[NsflowObsKey{Netns: k.Netns, Ifindex: k.Ifindex, Dir: k.Dir}]
				perOwner[NsflowContainerKey{Slot: slot, Cgroup: cg.id}] += v.Packets
				sum[k.Dir] += v.Packets
			}
			// 4 flows per hook: TCP and UDP, each way.
			if len(st.flows) != 8 {
				t.Errorf("%d flows, want 8: %+v", len(st.flows), st.flows)
			}
			if sum[uint8(TX)] != loPkts || sum[uint8(RX)] != loPkts {
				t.Errorf("flows: %d packets sent, %d received; lo counted %d", sum[uint8(TX)], sum[uint8(RX)], loPkts)
			}
			if got := st.totals[tx].Packets; got != loPkts {
				t.Errorf("egress totals %d packets, lo counted %d", got, loPkts)
			}

			containers := map[NsflowContainerKey]uint64{}
			perSlot := map[uint32]uint64{}
			if err := objs.ReadContainers(func(slot uint32, key NsflowObsKey, cgroup uint64, cnt NsflowCounters) {
				if key != rx && key != tx {
					t.Errorf("containers entry of point %+v", key)
				}
				containers[NsflowContainerKey{Slot: slot, Cgroup: cgroup}] = cnt.Packets
				perSlot[slot] += cnt.Packets
			}); err != nil {
				t.Fatal(err)
			}
			var n int
			var ck NsflowContainerKey
			var cv NsflowCounters
			for it := objs.Containers.Iterate(); it.Next(&ck, &cv); {
				n++
			}
			if c.opts.ContainerEntries == 0 {
				if n != 0 {
					t.Errorf("containers off: %d entries in the map", n)
				}
				return
			}
			t.Logf("lo: %d packets; containers (slot, cgroup): packets %v", loPkts, containers)
			if !equalMaps(containers, perOwner) {
				t.Errorf("containers %v, want the packets of each process's flows %v", containers, perOwner)
			}
			for _, p := range []NsflowObsKey{rx, tx} {
				if got := perSlot[slots[p]]; got != loPkts {
					t.Errorf("containers of %s: %d packets, lo counted %d", dirName(Direction(p.Dir)), got, loPkts)
				}
			}
		})
	}
}

// Releasing a point's slot deletes its per-cgroup totals with its flows: a
// slot handed out again starts without them.
func TestReleaseDeletesContainers(t *testing.T) {
	objs := load(t, Options{ContainerEntries: 16})
	a := NsflowObsKey{Netns: 3001, Ifindex: 1, Dir: uint8(RX)}
	b := NsflowObsKey{Netns: 3002, Ifindex: 1, Dir: uint8(TX)}
	stub(t, objs, a)
	stub(t, objs, b)
	slots := objs.Slots()
	for _, k := range []NsflowObsKey{a, b} {
		for _, cg := range []uint64{0, 77} {
			if err := objs.Containers.Put(NsflowContainerKey{Cgroup: cg, Slot: slots[k]}, NsflowCounters{Packets: 1}); err != nil {
				t.Fatal(err)
			}
		}
	}
	if n, err := objs.ReleasePoints(func(k NsflowObsKey) bool { return k == a }); n != 1 || err != nil {
		t.Fatalf("released %d, %v", n, err)
	}
	got := map[NsflowContainerKey]bool{}
	var ck NsflowContainerKey
	var cv NsflowCounters
	for it := objs.Containers.Iterate(); it.Next(&ck, &cv); {
		got[ck] = true
	}
	want := map[NsflowContainerKey]bool{{Slot: slots[b]}: true, {Cgroup: 77, Slot: slots[b]}: true}
	if !equalMaps(got, want) {
		t.Errorf("containers after releasing a: %v, want only b's %v", got, want)
	}
}
