package collector_test

import (
	"bufio"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/nsflow/nsflow/collector"
	"github.com/nsflow/nsflow/collector/cgroup"
	"github.com/nsflow/nsflow/collector/flow"
	"github.com/nsflow/nsflow/test/podns"
	"github.com/nsflow/nsflow/test/testenv"
)

// The helper process of TestContainerAttribution: this test binary run
// again as a pod's container (NSFLOW_ATTR_ROLE set), so that its sockets
// are made in the container's cgroup.
func TestAttributionHelper(t *testing.T) {
	role := os.Getenv("NSFLOW_ATTR_ROLE")
	if role == "" {
		return // not a helper: nothing to do
	}
	addr := os.Getenv("NSFLOW_ATTR_ADDR")
	rounds, _ := strconv.Atoi(os.Getenv("NSFLOW_ATTR_ROUNDS"))
	fail := func(err error) { fmt.Println("error:", err); os.Exit(1) }
	msg := make([]byte, 100)
	switch role {
	case "server": // TCP and UDP echo on addr
		ln, err := net.Listen("tcp", addr)
		if err != nil {
			fail(err)
		}
		uc, err := net.ListenPacket("udp", addr)
		if err != nil {
			fail(err)
		}
		go func() {
			buf := make([]byte, 2048)
			for {
				n, from, err := uc.ReadFrom(buf)
				if err != nil {
					return
				}
				uc.WriteTo(buf[:n], from)
			}
		}()
		fmt.Println("ready")
		for {
			c, err := ln.Accept()
			if err != nil {
				fail(err)
			}
			go func() {
				buf := make([]byte, len(msg))
				for {
					if _, err := io.ReadFull(c, buf); err != nil {
						return
					}
					c.Write(buf)
				}
			}()
		}
	case "client": // rounds TCP and UDP round trips, then hold the connection
		c, err := net.Dial("tcp", addr)
		if err != nil {
			fail(err)
		}
		u, err := net.Dial("udp", addr)
		if err != nil {
			fail(err)
		}
		buf := make([]byte, len(msg))
		for i := 0; i < rounds; i++ {
			c.SetDeadline(time.Now().Add(5 * time.Second))
			if _, err := c.Write(msg); err != nil {
				fail(err)
			}
			if _, err := io.ReadFull(c, buf); err != nil {
				fail(err)
			}
			u.SetDeadline(time.Now().Add(5 * time.Second))
			if _, err := u.Write(msg); err != nil {
				fail(err)
			}
			if _, err := u.Read(buf); err != nil {
				fail(err)
			}
		}
		fmt.Printf("done %s %s\n", c.LocalAddr(), u.LocalAddr())
		io.Copy(io.Discard, os.Stdin) // hold the sockets until told
		os.Exit(0)
	}
}

// startHelper starts this binary as container c of pod p and returns its
// first output line; it is killed in Cleanup.
func startHelper(t *testing.T, p *podns.Pod, c, role, addr string, rounds int) (string, io.Closer) {
	t.Helper()
	return startHelperWith(t, func(cmd *exec.Cmd) error { return p.StartContainer(c, cmd) }, c, role, addr, rounds)
}

// startHelperWith is startHelper with the way to start it.
func startHelperWith(t *testing.T, start func(*exec.Cmd) error, c, role, addr string, rounds int) (string, io.Closer) {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^TestAttributionHelper$")
	cmd.Env = append(os.Environ(), "NSFLOW_ATTR_ROLE="+role, "NSFLOW_ATTR_ADDR="+addr, "NSFLOW_ATTR_ROUNDS="+strconv.Itoa(rounds))
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := start(cmd); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	lines := make(chan string, 1)
	go func() {
		l, _ := bufio.NewReader(out).ReadString('\n')
		lines <- l
	}()
	select {
	case l := <-lines:
		return l, stdin
	case <-time.After(20 * time.Second):
		t.Fatalf("%s %s: no output", c, role)
	}
	return "", nil
}

// capture counts the packets sent on a pod's interface, by tuple, with a
// packet socket in the pod: the oracle for the flows' counts.
type capture struct {
	fd    int
	mu    sync.Mutex
	count map[string]uint64 // "proto src:sport>dst:dport"
	done  chan struct{}
}

func startCapture(t *testing.T, p *podns.Pod, ifname string) *capture {
	t.Helper()
	return startCaptureIn(t, p.Do, ifname)
}

// startCaptureIn is startCapture with the packet socket made by do (in a
// namespace).
func startCaptureIn(t *testing.T, do func(func() error) error, ifname string) *capture {
	t.Helper()
	c := &capture{count: map[string]uint64{}, done: make(chan struct{})}
	err := do(func() error {
		ifi, err := net.InterfaceByName(ifname)
		if err != nil {
			return err
		}
		fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, int(htons(unix.ETH_P_ALL)))
		if err != nil {
			return err
		}
		c.fd = fd
		unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &unix.Timeval{Usec: 100000})
		unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUF, 4<<20)
		return unix.Bind(fd, &unix.SockaddrLinklayer{Protocol: htons(unix.ETH_P_ALL), Ifindex: ifi.Index})
	})
	if err != nil {
		t.Fatal(err)
	}
	stop := make(chan struct{})
	go func() {
		defer close(c.done)
		buf := make([]byte, 65536)
		for {
			select {
			case <-stop:
				return
			default:
			}
			n, from, err := unix.Recvfrom(c.fd, buf, 0)
			if err != nil {
				continue
			}
			if ll, ok := from.(*unix.SockaddrLinklayer); !ok || ll.Pkttype != unix.PACKET_OUTGOING {
				continue
			}
			if k := tupleKey(buf[:n]); k != "" {
				c.mu.Lock()
				c.count[k]++
				c.mu.Unlock()
			}
		}
	}()
	t.Cleanup(func() {
		close(stop)
		<-c.done
		unix.Close(c.fd)
	})
	return c
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }

// tupleKey parses an Ethernet frame with IPv4 and TCP or UDP.
func tupleKey(b []byte) string {
	if len(b) < 14+20+4 || binary.BigEndian.Uint16(b[12:]) != unix.ETH_P_IP {
		return ""
	}
	ip := b[14:]
	ihl := int(ip[0]&0xf) * 4
	proto := ip[9]
	if proto != unix.IPPROTO_TCP && proto != unix.IPPROTO_UDP || len(ip) < ihl+4 {
		return ""
	}
	src, dst := netip.AddrFrom4([4]byte(ip[12:16])), netip.AddrFrom4([4]byte(ip[16:20]))
	l4 := ip[ihl:]
	return fmt.Sprintf("%s %s:%d>%s:%d", flow.Protocol(proto), src, binary.BigEndian.Uint16(l4), dst, binary.BigEndian.Uint16(l4[2:]))
}

func (c *capture) get(k string) uint64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.count[k]
}

// sumAtLeast returns the count of the keys once it reaches n, or after 10
// s: the capture's reader may lag behind the snapshot on a loaded machine
// (no traffic of the test's tuples follows the snapshot, so the count
// settles at the packets sent).
func (c *capture) sumAtLeast(n uint64, keys ...string) uint64 {
	sum := func() (s uint64) {
		for _, k := range keys {
			s += c.get(k)
		}
		return s
	}
	deadline := time.Now().Add(10 * time.Second)
	for sum() < n && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	return sum()
}

// mergeFlows sums flows of one key (a point counted under two slots
// meanwhile, re-attached, shows a flow twice), keeping the first's names.
func mergeFlows(flows []flow.Flow) []flow.Flow {
	at := map[flow.Key]int{}
	var out []flow.Flow
	for _, f := range flows {
		if i, ok := at[f.Key]; ok {
			out[i].Packets += f.Packets
			out[i].Bytes += f.Bytes
			continue
		}
		at[f.Key] = len(out)
		out = append(out, f)
	}
	return out
}

func flowKey(f *flow.Flow) string {
	return fmt.Sprintf("%s %s:%d>%s:%d", f.Protocol, f.Src, f.SrcPort, f.Dst, f.DstPort)
}

// TestContainerAttribution: two containers of one pod (podns containers:
// processes in cgroups of their own) talk TCP and UDP over lo, and one of
// them to a container of another pod over eth0. Every flow names its
// sending and receiving container; its packets equal a packet capture's;
// the per-container totals equal the capture's sums.
func TestContainerAttribution(t *testing.T) {
	testenv.RequireRoot(t)
	for _, cfg := range []collector.Config{
		{Containers: true},  // attribution, ingress socket lookup, per-container totals
		{Attribution: true}, // a receiver is the sender of the reverse flow
	} {
		t.Run(fmt.Sprintf("containers=%v", cfg.Containers), func(t *testing.T) { testAttribution(t, cfg) })
	}
}

func testAttribution(t *testing.T, cfg collector.Config) {
	subnet := netip.MustParsePrefix("10.213.205.0/24")
	var pods []*podns.Pod
	for _, name := range []string{"h5attr-a", "h5attr-b"} {
		p, err := podns.Create(podns.Config{}, name, podns.Options{Subnet: subnet})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { podns.Delete(podns.Config{}, name) })
		pods = append(pods, p)
	}
	a, b := pods[0], pods[1]
	c, err := collector.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	r, err := cgroup.New(cgroup.Config{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.Close() })
	c.SetResolver(r)
	for _, p := range pods {
		if _, err := c.Add(collector.Target{Name: p.Name, Path: p.NetnsPath}); err != nil {
			t.Fatal(err)
		}
	}
	capLo, capEth := startCapture(t, a, "lo"), startCapture(t, a, "eth0")

	const rounds = 20
	if l, _ := startHelper(t, a, "sidecar", "server", "127.0.0.1:7070", 0); l != "ready\n" {
		t.Fatalf("sidecar: %q", l)
	}
	if l, _ := startHelper(t, b, "db", "server", netip.AddrPortFrom(b.IPv4, 7071).String(), 0); l != "ready\n" {
		t.Fatalf("db: %q", l)
	}
	var holds []io.Closer
	for _, addr := range []string{"127.0.0.1:7070", netip.AddrPortFrom(b.IPv4, 7071).String()} {
		l, hold := startHelper(t, a, "web", "client", addr, rounds)
		if len(l) < 4 || l[:4] != "done" {
			t.Fatalf("web to %s: %q", addr, l)
		}
		holds = append(holds, hold)
	}
	time.Sleep(300 * time.Millisecond) // the capture's reader catches up (and delayed ACKs go out)
	// (The capture reads until Cleanup: a late packet would make its count
	// differ from the flow's, read before it.)

	want := map[string][2]string{ // by server port: the client's and the server's container
		"7070": {"web", "sidecar"},
		"7071": {"web", "db"},
	}
	ino := func(p *podns.Pod) uint64 {
		var st unix.Stat_t
		unix.Stat(p.NetnsPath, &st)
		return st.Ino
	}
	inoA, inoB := ino(a), ino(b)
	// The snapshot once the test's egress flows of pod a equal the
	// capture (up to 10 s: on a loaded machine an ACK may go out after
	// the pause above; a packet nsflow missed never converges and is
	// reported below).
	var snap *flow.Snapshot
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(200 * time.Millisecond) {
		var err error
		if snap, err = c.Snapshot(); err != nil {
			t.Fatal(err)
		}
		equal := true
		for _, f := range mergeFlows(snap.Flows) {
			_, d := want[strconv.Itoa(int(f.DstPort))]
			_, s := want[strconv.Itoa(int(f.SrcPort))]
			if f.NetnsInode != inoA || f.Direction != flow.TX || !(d || s) {
				continue
			}
			cp := capLo
			if f.Interface == "eth0" {
				cp = capEth
			}
			if cp.get(flowKey(&f)) != f.Packets {
				equal = false
			}
		}
		if equal || time.Now().After(deadline) {
			break
		}
	}
	// The connections stay open until the checks are done: their FINs
	// would reach the capture, not the snapshot.
	defer func() {
		for _, h := range holds {
			h.Close()
		}
	}()
	checked := map[string]int{}
	sent := map[[3]string]uint64{} // interface, direction, container -> packets (the capture's)
	flows := mergeFlows(snap.Flows)
	for i := range flows {
		f := &flows[i]
		if f.NetnsInode != inoA && f.NetnsInode != inoB {
			continue
		}
		var ends [2]string
		var toServer bool
		if w, ok := want[strconv.Itoa(int(f.DstPort))]; ok {
			ends, toServer = w, true
		} else if w, ok := want[strconv.Itoa(int(f.SrcPort))]; ok {
			ends = w
		} else {
			continue // not ours (e.g. IPv6 neighbour discovery)
		}
		src, dst := ends[0], ends[1]
		if !toServer {
			src, dst = dst, src
		}
		where := fmt.Sprintf("%s %s/%s %s", flowKey(f), f.Netns, f.Interface, f.Direction)
		if f.SrcContainer != src || f.DstContainer != dst {
			t.Errorf("%s: containers %q -> %q (cgroups %d -> %d), want %q -> %q", where, f.SrcContainer, f.DstContainer, f.SrcCgroup, f.DstCgroup, src, dst)
		}
		if f.SrcPod != "" || f.DstPod != "" {
			t.Errorf("%s: pods %q %q, want none (no container runtime)", where, f.SrcPod, f.DstPod)
		}
		checked[fmt.Sprintf("%s %s %s", f.Netns, f.Interface, f.Direction)]++
		if f.NetnsInode == inoA && f.Direction == flow.TX {
			cp := capLo
			if f.Interface == "eth0" {
				cp = capEth
			}
			if got := cp.sumAtLeast(f.Packets, flowKey(f)); got != f.Packets {
				t.Errorf("%s: %d packets, capture %d", where, f.Packets, got)
			}
			sent[[3]string{f.Interface, "tx", src}] += cp.get(flowKey(f))
			if f.Interface == "lo" {
				// On lo what one container sends the other receives.
				sent[[3]string{"lo", "rx", dst}] += cp.get(flowKey(f))
			}
		}
	}
	// TCP and UDP each way: at lo tx and rx; at a's eth0 tx and rx, b's eth0 tx and rx.
	for _, k := range []string{"h5attr-a lo tx", "h5attr-a lo rx", "h5attr-a eth0 tx", "h5attr-a eth0 rx", "h5attr-b eth0 tx", "h5attr-b eth0 rx"} {
		n := 4
		if k[len("h5attr-a "):] != "lo tx" && k[len("h5attr-a "):] != "lo rx" {
			n = 2 // one conversation crosses eth0: TCP and UDP, one way each
		}
		if checked[k] != n {
			t.Errorf("%s: %d flows checked, want %d", k, checked[k], n)
		}
	}
	if !cfg.Containers {
		if len(snap.Containers) != 0 {
			t.Errorf("%d per-container totals without Containers", len(snap.Containers))
		}
		return
	}
	// Per-container totals of pod a equal the capture's sums.
	for _, cs := range snap.Containers {
		if cs.NetnsInode != inoA || cs.Interface != "lo" {
			continue
		}
		k := [3]string{cs.Interface, string(cs.Direction), cs.Container}
		if cs.Container == "" {
			continue
		}
		if cs.Packets != sent[k] {
			t.Errorf("container %s at %s %s: %d packets, capture %d", cs.Container, cs.Interface, cs.Direction, cs.Packets, sent[k])
		}
		delete(sent, k)
	}
	for k, v := range sent {
		if k[0] == "lo" && v > 0 {
			t.Errorf("no per-container totals for %v (%d packets)", k, v)
		}
	}
}

// TestHostNetworkAttribution: processes of the host's namespace (as a
// hostNetwork pod's) in cgroups of their own, made by the test, talking
// over the host's lo: their flows and per-container totals appear under
// their cgroups' names, packets equal to a capture's. Other tests' and
// the host's own traffic share that lo: only this test's tuples and
// cgroups are asserted.
func TestHostNetworkAttribution(t *testing.T) {
	testenv.RequireRoot(t)
	root, err := cgroup.Mount("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	dir := filepath.Join(root, fmt.Sprintf("nsflow-h5hostnet-%d", os.Getpid()))
	t.Cleanup(func() {
		ents, _ := os.ReadDir(dir)
		for _, e := range ents {
			if e.IsDir() {
				os.Remove(filepath.Join(dir, e.Name()))
			}
		}
		os.Remove(dir)
	})
	inCgroup := func(name string) func(*exec.Cmd) error {
		return func(cmd *exec.Cmd) error {
			d := filepath.Join(dir, name)
			if err := os.MkdirAll(d, 0o755); err != nil {
				return err
			}
			f, err := os.Open(d)
			if err != nil {
				return err
			}
			defer f.Close()
			cmd.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: int(f.Fd())}
			return cmd.Start()
		}
	}
	c, err := collector.New(collector.Config{Containers: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	r, err := cgroup.New(cgroup.Config{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.Close() })
	c.SetResolver(r)
	host, err := collector.ParseTarget("host")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.Add(host); err != nil {
		t.Fatal(err)
	}
	capLo := startCaptureIn(t, func(fn func() error) error { return fn() }, "lo")

	// A port of this test's own: free now on the host's lo.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	const rounds = 20
	if l, _ := startHelperWith(t, inCgroup("h5-server.scope"), "server", "server", addr, 0); l != "ready\n" {
		t.Fatalf("server: %q", l)
	}
	l, hold := startHelperWith(t, inCgroup("h5-client.scope"), "client", "client", addr, rounds)
	if len(l) < 4 || l[:4] != "done" {
		t.Fatalf("client: %q", l)
	}
	defer hold.Close()
	time.Sleep(300 * time.Millisecond)
	snap, err := c.Snapshot()
	if err != nil {
		t.Fatal(err)
	}
	var st unix.Stat_t
	if err := unix.Stat("/proc/self/ns/net", &st); err != nil {
		t.Fatal(err)
	}
	_, port, _ := net.SplitHostPort(addr)
	// The capture's counts by container, from the client's tuples (l:
	// "done TCPADDR UDPADDR"), whatever the flow map kept.
	var tcpAddr, udpAddr string
	if _, err := fmt.Sscanf(l, "done %s %s", &tcpAddr, &udpAddr); err != nil {
		t.Fatalf("client said %q: %v", l, err)
	}
	var up, down []string // the capture's keys: client to server, server to client
	for _, c := range []struct{ proto, local string }{{"tcp", tcpAddr}, {"udp", udpAddr}} {
		up = append(up, fmt.Sprintf("%s %s>%s", c.proto, c.local, addr))
		down = append(down, fmt.Sprintf("%s %s>%s", c.proto, addr, c.local))
	}
	keys := map[[2]string][]string{ // direction, container -> its packets' keys
		{"tx", "h5-client.scope"}: up, {"rx", "h5-server.scope"}: up,
		{"tx", "h5-server.scope"}: down, {"rx", "h5-client.scope"}: down,
	}
	n := 0
	flows := mergeFlows(snap.Flows)
	for i := range flows {
		f := &flows[i]
		if f.NetnsInode != st.Ino || f.Interface != "lo" {
			continue
		}
		src, dst := "h5-client.scope", "h5-server.scope"
		switch port {
		case strconv.Itoa(int(f.DstPort)):
		case strconv.Itoa(int(f.SrcPort)):
			src, dst = dst, src
		default:
			continue
		}
		n++
		where := fmt.Sprintf("%s lo %s", flowKey(f), f.Direction)
		if f.SrcContainer != src || f.DstContainer != dst {
			t.Errorf("%s: containers %q -> %q, want %q -> %q", where, f.SrcContainer, f.DstContainer, src, dst)
		}
		if f.Protocol == flow.Protocol(unix.IPPROTO_UDP) && f.Packets != rounds {
			t.Errorf("%s: %d datagrams, want %d", where, f.Packets, rounds)
		}
		if f.Direction == flow.TX {
			if got := capLo.sumAtLeast(f.Packets, flowKey(f)); got != f.Packets {
				t.Errorf("%s: %d packets, capture %d", where, f.Packets, got)
			}
		}
	}
	// TCP and UDP, each way, tx and rx. The host's flow map is shared with
	// every other test's traffic on this host: a flow storm elsewhere may
	// evict some (counted); the per-container totals below are a map of
	// their own.
	if n != 8 && snap.Stats.FlowsEvicted == 0 {
		t.Errorf("%d flows of the test's tuples at the host's lo, want 8 (TCP and UDP, each way, tx and rx), none evicted", n)
	} else if n != 8 {
		t.Logf("%d flows of the test's tuples at the host's lo (8 sent), %d flows evicted by other traffic", n, snap.Stats.FlowsEvicted)
	}
	for _, cs := range snap.Containers {
		if cs.NetnsInode != st.Ino || cs.Interface != "lo" || (cs.Container != "h5-client.scope" && cs.Container != "h5-server.scope") {
			continue
		}
		k := [2]string{string(cs.Direction), cs.Container}
		if got := capLo.sumAtLeast(cs.Packets, keys[k]...); cs.Packets != got {
			t.Errorf("container %s at lo %s: %d packets, capture %d", cs.Container, cs.Direction, cs.Packets, got)
		}
		delete(keys, k)
	}
	for k, ks := range keys {
		t.Errorf("no per-container totals for %v (capture: %d packets)", k, capLo.sumAtLeast(0, ks...))
	}
}
