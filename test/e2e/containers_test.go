package e2e

import (
	"archive/tar"
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/nsflow/nsflow/test/podns"
	"github.com/nsflow/nsflow/test/testenv"
)

// Per-container attribution (issue 15). Containers here are processes in
// cgroups of their own: `nsflow pod exec POD --container C` puts its
// command in <cgroup v2>/nsflow-pods/POD/C, and a test-made cgroup holds a
// host-network process. The oracles are independent of nsflow: a packet
// capture (tcpdump, Linux cooked v2 headers: interface and direction of
// every packet) for per-flow counts, the applications' own datagram counts,
// and the kernel's interface counters for totals. Every exchange is a
// ping-pong of small messages (TCP_NODELAY, Go's default), so no packet is
// a GSO aggregate and one captured packet is one counted packet.

// extraRoles are helper processes (see helperMain) for the container
// tests, each bounded in time like the others.
var extraRoles = map[string]func(args []string) int{
	"pp-server": ppServer,
	"pp-client": ppClient,
	"udp-pair":  udpPair,
}

// ppServer PROTO ADDR N: TCP: accept one connection and echo it to EOF;
// UDP: answer N datagrams (N = 0: receive N2 datagrams without answering,
// given as a negative N). Prints "listening", then the datagrams handled.
func ppServer(args []string) int {
	deadline := time.Now().Add(25 * time.Second)
	n, _ := strconv.Atoi(args[2])
	switch args[0] {
	case "tcp":
		ln, err := net.Listen("tcp", args[1])
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		fmt.Println("listening")
		ln.(*net.TCPListener).SetDeadline(deadline)
		c, err := ln.Accept()
		ln.Close()
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		c.SetDeadline(deadline)
		k, err := io.Copy(c, c)
		c.Close()
		fmt.Println(k)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		return 0
	case "udp":
		pc, err := net.ListenPacket("udp", args[1])
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		defer pc.Close()
		fmt.Println("listening")
		pc.SetDeadline(deadline)
		echo := n > 0
		if n < 0 {
			n = -n
		}
		buf := make([]byte, 65536)
		for i := 0; i < n; i++ {
			k, from, err := pc.ReadFrom(buf)
			if err != nil {
				fmt.Fprintf(os.Stderr, "after %d datagrams: %v\n", i, err)
				return 1
			}
			if echo {
				if _, err := pc.WriteTo(buf[:k], from); err != nil {
					fmt.Fprintln(os.Stderr, err)
					return 1
				}
			}
		}
		fmt.Println(n)
		return 0
	}
	return 1
}

// ppClient PROTO ADDR ROUNDS SIZE [oneway]: ROUNDS messages of SIZE bytes,
// each answered by the server (or not, with oneway: UDP only, 2 ms apart).
func ppClient(args []string) int {
	deadline := time.Now().Add(25 * time.Second)
	rounds, _ := strconv.Atoi(args[2])
	size, _ := strconv.Atoi(args[3])
	oneway := len(args) > 4 && args[4] == "oneway"
	c, err := net.DialTimeout(args[0], args[1], 5*time.Second)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	c.SetDeadline(deadline)
	msg := make([]byte, size)
	back := make([]byte, size)
	for i := 0; i < rounds; i++ {
		if _, err := c.Write(msg); err != nil {
			fmt.Fprintf(os.Stderr, "round %d: %v\n", i, err)
			return 1
		}
		if oneway {
			time.Sleep(2 * time.Millisecond)
			continue
		}
		if _, err := io.ReadFull(c, back); err != nil {
			fmt.Fprintf(os.Stderr, "round %d: %v\n", i, err)
			return 1
		}
	}
	if err := c.Close(); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	fmt.Println(rounds)
	return 0
}

// udpPair PORT ROUNDS SIZE: a client and a server socket of this one
// process on 127.0.0.1, ROUNDS requests each answered: the process sends
// and receives 2*ROUNDS datagrams. Prints the datagrams it sent.
func udpPair(args []string) int {
	deadline := time.Now().Add(25 * time.Second)
	rounds, _ := strconv.Atoi(args[1])
	size, _ := strconv.Atoi(args[2])
	srv, err := net.ListenPacket("udp", "127.0.0.1:"+args[0])
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer srv.Close()
	cl, err := net.Dial("udp", srv.LocalAddr().String())
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer cl.Close()
	srv.SetDeadline(deadline)
	cl.SetDeadline(deadline)
	buf := make([]byte, 65536)
	msg := make([]byte, size)
	sent := 0
	for i := 0; i < rounds; i++ {
		if _, err := cl.Write(msg); err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		sent++
		_, from, err := srv.ReadFrom(buf)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		if _, err := srv.WriteTo(msg, from); err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		sent++
		if _, err := cl.Read(buf); err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
	}
	fmt.Println(sent)
	return 0
}

// cgroup2Mount is where the cgroup v2 hierarchy is mounted (the unified
// one of a hybrid layout), from /proc/self/mountinfo.
func cgroup2Mount(t *testing.T) string {
	t.Helper()
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(string(b), "\n") {
		f := strings.Fields(l)
		for i, x := range f {
			if x == "-" && i+1 < len(f) && f[i+1] == "cgroup2" {
				return f[4]
			}
		}
	}
	t.Fatal("no cgroup2 mount")
	return ""
}

// helperExe is the test binary, for helpers started through `nsflow pod exec`.
func helperExe(t *testing.T) string {
	t.Helper()
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	return exe
}

// proc is a helper process whose first line of output was "listening"
// (servers) and whose last line is its result.
type proc struct {
	cmd  *exec.Cmd
	out  chan string // the lines after "listening"
	errb *strings.Builder
}

// startContainer runs a helper role as container c of pod p through
// `nsflow pod exec`; a server (wait) is returned once it listens.
func startContainer(t *testing.T, p *podns.Pod, c string, wait bool, role string, args ...string) *proc {
	t.Helper()
	cmd := exec.Command(nsflowBin, append([]string{"pod", "exec", p.Name, "--container", c, "--", helperExe(t)}, args...)...)
	cmd.Env = append(os.Environ(), roleEnv+"="+role, argsEnv+"="+strings.Join(args, " "))
	return startProc(t, cmd, wait)
}

func startProc(t *testing.T, cmd *exec.Cmd, wait bool) *proc {
	t.Helper()
	pr := &proc{cmd: cmd, out: make(chan string, 16), errb: &strings.Builder{}}
	cmd.Stderr = pr.errb
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatalf("start %v: %v", cmd.Args, err)
	}
	t.Cleanup(func() {
		if cmd.ProcessState == nil {
			cmd.Process.Kill()
			cmd.Wait()
		}
	})
	lines := bufio.NewScanner(stdout)
	if wait {
		if !lines.Scan() || lines.Text() != "listening" {
			cmd.Process.Kill()
			cmd.Wait()
			t.Fatalf("%v did not start: %s", cmd.Args, pr.errb)
		}
	}
	go func() {
		for lines.Scan() {
			pr.out <- lines.Text()
		}
		close(pr.out)
	}()
	return pr
}

// wait waits for the process (30 s at most) and returns its last line.
func (pr *proc) wait(t *testing.T) string {
	t.Helper()
	// Its output to the end first (Wait closes the pipe), then Wait.
	last := ""
	timeout := time.After(30 * time.Second)
	for open := true; open; {
		select {
		case l, ok := <-pr.out:
			if ok {
				last = l
			}
			open = ok
		case <-timeout:
			pr.cmd.Process.Kill()
			pr.cmd.Wait()
			t.Fatalf("%v did not end", pr.cmd.Args)
		}
	}
	if err := pr.cmd.Wait(); err != nil {
		t.Fatalf("%v: %v\n%s", pr.cmd.Args, err, pr.errb)
	}
	return last
}

// capKey is one direction of one flow at one interface, as captured.
type capKey struct {
	ifindex    int
	out        bool
	proto      string
	src, dst   string
	sport, dpt uint16
}

// capture is a running tcpdump on every interface of a namespace.
type capture struct {
	cmd     *exec.Cmd
	file    string
	errb    *strings.Builder
	errDone chan struct{} // closed when stderr is read to its end
}

// startCapture captures (headers only) on every interface of pod p, or of
// the host if p is nil, with a pcap filter; in Linux cooked v2 form, which
// records each packet's interface and whether it was sent or received.
func startCapture(t *testing.T, p *podns.Pod, filter string) *capture {
	t.Helper()
	c := &capture{file: filepath.Join(t.TempDir(), "cap.pcap"), errb: &strings.Builder{}}
	args := []string{"-i", "any", "-y", "LINUX_SLL2", "-nn", "-s", "128", "-B", "8192", "-U", "--immediate-mode", "-Z", "root", "-w", c.file}
	if filter != "" {
		args = append(args, filter)
	}
	c.cmd = exec.Command("tcpdump", args...)
	stderr, err := c.cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	start := c.cmd.Start
	if p != nil {
		start = func() error { return p.Start(c.cmd) }
	}
	if err := start(); err != nil {
		t.Fatalf("tcpdump: %v", err)
	}
	t.Cleanup(func() {
		if c.cmd.ProcessState == nil {
			c.cmd.Process.Kill()
			c.cmd.Wait()
		}
	})
	r := bufio.NewReader(stderr)
	for {
		l, err := r.ReadString('\n')
		c.errb.WriteString(l)
		if strings.Contains(l, "listening on") {
			break
		}
		if err != nil {
			c.cmd.Wait()
			t.Fatalf("tcpdump did not start: %s", c.errb)
		}
	}
	c.errDone = make(chan struct{})
	go func() {
		b, _ := io.ReadAll(r)
		c.errb.Write(b)
		close(c.errDone)
	}()
	return c
}

// stop ends the capture and counts its packets per flow, interface and
// direction; it fails if the kernel dropped any.
func (c *capture) stop(t *testing.T) map[capKey]uint64 {
	t.Helper()
	// tcpdump writes every packet as it gets it (immediate mode, -U) and
	// drops what it has not yet read when interrupted: let it catch up
	// first, until the file stops growing.
	size := int64(-1)
	for i := 0; i < 100; i++ {
		time.Sleep(200 * time.Millisecond)
		st, err := os.Stat(c.file)
		if err == nil && st.Size() == size {
			break
		}
		if err == nil {
			size = st.Size()
		}
	}
	c.cmd.Process.Signal(syscall.SIGINT)
	// Its statistics to the end of its stderr, then Wait (which closes
	// the pipe).
	select {
	case <-c.errDone:
	case <-time.After(10 * time.Second):
		c.cmd.Process.Kill()
		t.Errorf("tcpdump did not stop")
	}
	c.cmd.Wait()
	if !regexp.MustCompile(`(?m)^0 packets dropped by kernel`).MatchString(c.errb.String()) {
		t.Fatalf("tcpdump dropped packets: %s", c.errb)
	}
	b, err := os.ReadFile(c.file)
	if err != nil {
		t.Fatal(err)
	}
	counted := parsePcap(t, b)
	t.Logf("capture: %d bytes, %d flows; %s", len(b), len(counted), strings.TrimSpace(c.errb.String()))
	return counted
}

// parsePcap counts the IPv4 TCP and UDP packets of a pcap file with Linux
// cooked v2 headers (DLT_LINUX_SLL2).
func parsePcap(t *testing.T, b []byte) map[capKey]uint64 {
	t.Helper()
	if len(b) < 24 {
		t.Fatalf("pcap of %d bytes", len(b))
	}
	var bo binary.ByteOrder = binary.LittleEndian
	switch binary.LittleEndian.Uint32(b) {
	case 0xa1b2c3d4, 0xa1b23c4d:
	case 0xd4c3b2a1, 0x4d3cb2a1:
		bo = binary.BigEndian
	default:
		t.Fatalf("not a pcap file: % x", b[:4])
	}
	if lt := bo.Uint32(b[20:]); lt != 276 {
		t.Fatalf("pcap link type %d, want 276 (LINUX_SLL2)", lt)
	}
	out := map[capKey]uint64{}
	for off := 24; off+16 <= len(b); {
		incl := int(bo.Uint32(b[off+8:]))
		pkt := b[off+16 : min(off+16+incl, len(b))]
		off += 16 + incl
		if len(pkt) < 20+20 {
			continue
		}
		if binary.BigEndian.Uint16(pkt[0:]) != 0x0800 {
			continue
		}
		k := capKey{ifindex: int(binary.BigEndian.Uint32(pkt[4:])), out: pkt[10] == 4}
		ip := pkt[20:]
		ihl := int(ip[0]&0x0f) * 4
		if ip[0]>>4 != 4 || len(ip) < ihl+4 {
			continue
		}
		switch ip[9] {
		case 6:
			k.proto = "tcp"
		case 17:
			k.proto = "udp"
		default:
			continue
		}
		k.src = netip.AddrFrom4([4]byte(ip[12:16])).String()
		k.dst = netip.AddrFrom4([4]byte(ip[16:20])).String()
		k.sport = binary.BigEndian.Uint16(ip[ihl:])
		k.dpt = binary.BigEndian.Uint16(ip[ihl+2:])
		out[k]++
	}
	return out
}

// traceFlow is a flow of `nsflow trace -o json`, read independently of
// the report package; the container fields must always be present.
type traceFlow struct {
	Netns        string  `json:"netns"`
	Interface    string  `json:"interface"`
	Direction    string  `json:"direction"`
	Protocol     string  `json:"protocol"`
	Src          string  `json:"src"`
	Dst          string  `json:"dst"`
	SrcPort      uint16  `json:"src_port"`
	DstPort      uint16  `json:"dst_port"`
	Packets      uint64  `json:"packets"`
	Bytes        uint64  `json:"bytes"`
	SrcContainer *string `json:"src_container"`
	DstContainer *string `json:"dst_container"`
	SrcCgroup    uint64  `json:"src_cgroup"`
	DstCgroup    uint64  `json:"dst_cgroup"`
}

type traceDoc struct {
	Namespaces []struct {
		Name       string `json:"name"`
		Interfaces []struct {
			Name      string `json:"name"`
			RXPackets uint64 `json:"rx_packets"`
			TXPackets uint64 `json:"tx_packets"`
		} `json:"interfaces"`
	} `json:"namespaces"`
	Flows []traceFlow `json:"flows"`
}

func str(p *string) string {
	if p == nil {
		return "<absent>"
	}
	return *p
}

// ifindexes maps a namespace's interface indexes to names.
func ifindexes(t *testing.T, nsPath string) map[int]string {
	t.Helper()
	nl := openNetlinkAt(t, nsPath)
	defer nl.Close()
	links, err := nl.LinkList()
	if err != nil {
		t.Fatal(err)
	}
	m := map[int]string{}
	for _, l := range links {
		m[l.Attrs().Index] = l.Attrs().Name
	}
	return m
}

// quietCounts reads the kernel's counters of the namespaces (those that
// filter keeps, if any) until two reads 300 ms apart agree.
func quietCounts(t *testing.T, paths map[uint64]string, filter ...func(counts) counts) counts {
	t.Helper()
	read := func() counts {
		c := kernelCounts(t, paths)
		for _, f := range filter {
			c = f(c)
		}
		return c
	}
	prev := read()
	for try := 0; try < 50; try++ {
		time.Sleep(300 * time.Millisecond)
		cur := read()
		if equalCounts(prev, cur) {
			return cur
		}
		prev = cur
	}
	t.Fatal("the pods' interfaces never quiet")
	return nil
}

// Two containers of pod a (web and sidecar) talk over lo, TCP both ways
// and UDP request/response and one-way, and web talks TCP and one-way UDP
// to container srv of pod b over eth0; `nsflow trace` names each flow's
// source and destination container (a one-way flow's receiver at ingress,
// through the socket lookup), and counts exactly what the capture saw; its
// totals are the kernel's; `--aggregate-by container` rows are the sums of
// those flows.
func TestContainersOverLoAndEth0(t *testing.T) {
	testenv.RequireRoot(t)
	pods := newPods(t, "10.213.247.0/24", "e2e-ctr-a", "e2e-ctr-b")
	a, b := pods[0], pods[1]
	quietIPv6(t, a, b)
	paths := map[uint64]string{inodeOf(t, a): a.NetnsPath, inodeOf(t, b): b.NetnsPath}
	// Turning IPv6 off sends its last multicast reports (repeated about a
	// second later): let them pass before the traces start (kPre,
	// compared below with k0).
	time.Sleep(2 * time.Second)
	kPre := quietCounts(t, paths)

	const (
		tcpLo, udpLo, udpOneway, tcpEth, udpEthOneway = 9710, 9711, 9712, 9713, 9714
		rounds                                        = 40
	)
	// The aggregated view runs beside the per-flow one, over the same
	// traffic.
	trFlows := startTrace(t, 2, "--netns", a.Name, "--netns", b.Name, "--cri.endpoint", "none", "-o", "json", "--containers")
	trAgg := startTrace(t, 2, "--netns", a.Name, "--netns", b.Name, "--cri.endpoint", "none", "-o", "json", "--aggregate-by", "container")
	for _, tr := range []*tracer{trFlows, trAgg} {
		for _, p := range pods {
			waitOwnHooks(t, tr.cmd.Process.Pid, p.NetnsPath, "lo", "eth0")
		}
	}
	// Each container has a process that lasts until the traces have
	// stopped, as a real container's would: a container's cgroup goes
	// with its last process (`pod exec` removes it), and the names of the
	// flows' cgroups are read when the trace ends.
	var anchors []*exec.Cmd
	for _, c := range []struct {
		p    *podns.Pod
		name string
	}{{a, "web"}, {a, "sidecar"}, {b, "srv"}} {
		cmd := exec.Command(nsflowBin, "pod", "exec", c.p.Name, "--container", c.name, "--", "sleep", "60")
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() {
			if cmd.ProcessState == nil {
				cmd.Process.Kill() // and podns.Delete kills the sleep
				cmd.Wait()
			}
		})
		anchors = append(anchors, cmd)
	}
	capA := startCapture(t, a, "")
	capB := startCapture(t, b, "")
	k0 := quietCounts(t, paths)

	// Servers first (each prints "listening" once bound), then clients.
	loAddr := func(port int) string { return "127.0.0.1:" + strconv.Itoa(port) }
	bAddr := netip.AddrPortFrom(b.IPv4, tcpEth).String()
	bUDP := netip.AddrPortFrom(b.IPv4, udpEthOneway).String()
	servers := []*proc{
		startContainer(t, a, "sidecar", true, "pp-server", "tcp", loAddr(tcpLo), "0"),
		startContainer(t, a, "sidecar", true, "pp-server", "udp", loAddr(udpLo), strconv.Itoa(rounds)),
		startContainer(t, a, "sidecar", true, "pp-server", "udp", loAddr(udpOneway), strconv.Itoa(-rounds)),
		startContainer(t, b, "srv", true, "pp-server", "udp", bUDP, strconv.Itoa(-rounds)),
		startContainer(t, b, "srv", true, "pp-server", "tcp", bAddr, "0"),
	}
	clients := []*proc{
		startContainer(t, a, "web", false, "pp-client", "tcp", loAddr(tcpLo), strconv.Itoa(rounds), "100"),
		startContainer(t, a, "web", false, "pp-client", "udp", loAddr(udpLo), strconv.Itoa(rounds), "100"),
		startContainer(t, a, "web", false, "pp-client", "udp", loAddr(udpOneway), strconv.Itoa(rounds), "60", "oneway"),
		startContainer(t, a, "web", false, "pp-client", "udp", bUDP, strconv.Itoa(rounds), "60", "oneway"),
		startContainer(t, a, "web", false, "pp-client", "tcp", bAddr, strconv.Itoa(rounds), "200"),
	}
	for _, c := range clients {
		if got := c.wait(t); got != strconv.Itoa(rounds) {
			t.Fatalf("client %v: %q rounds", c.cmd.Args, got)
		}
	}
	for _, s := range servers {
		s.wait(t)
	}

	k1 := quietCounts(t, paths)
	flowsOut := trFlows.stop(t)
	aggOut := trAgg.stop(t)
	k2 := kernelCounts(t, paths)
	if !equalCounts(k1, k2) {
		t.Fatalf("traffic on the pods' interfaces while the traces stopped: the counts cannot be compared")
	}
	for _, cmd := range anchors {
		cmd.Process.Signal(syscall.SIGTERM) // passed on to sleep
		cmd.Wait()
	}
	idx := map[string]map[int]string{a.Name: ifindexes(t, a.NetnsPath), b.Name: ifindexes(t, b.NetnsPath)}
	captured := map[string]map[capKey]uint64{a.Name: capA.stop(t), b.Name: capB.stop(t)}

	var tr traceDoc
	if err := json.Unmarshal(flowsOut, &tr); err != nil {
		t.Fatalf("trace JSON: %v\n%s", err, flowsOut)
	}
	validate(t, "trace.schema.json", flowsOut)

	// Totals: the kernel's counters over the trace, exactly when nothing
	// crossed the interfaces while the traces attached (kPre == k0);
	// otherwise between the counts from k0 and from kPre (a stray packet
	// then may or may not have been seen).
	kd, kdMax := delta(k0, k2), delta(kPre, k2)
	if !equalCounts(kPre, k0) {
		t.Logf("packets crossed the pods' interfaces while the traces attached: totals checked within bounds")
	}
	for ino, path := range paths {
		name := a.Name
		if path == b.NetnsPath {
			name = b.Name
		}
		for _, ns := range tr.Namespaces {
			if ns.Name != name {
				continue
			}
			for _, it := range ns.Interfaces {
				if it.Name != "lo" && it.Name != "eth0" {
					continue
				}
				rx, tx := point{ino, it.Name, "rx"}, point{ino, it.Name, "tx"}
				if it.RXPackets < kd[rx].Packets || it.RXPackets > kdMax[rx].Packets || it.TXPackets < kd[tx].Packets || it.TXPackets > kdMax[tx].Packets {
					t.Errorf("%s %s: trace rx %d tx %d packets, the kernel %d..%d and %d..%d", name, it.Name, it.RXPackets, it.TXPackets,
						kd[rx].Packets, kdMax[rx].Packets, kd[tx].Packets, kdMax[tx].Packets)
				}
			}
		}
	}

	// Each flow of the test: its containers, and its packets as captured.
	// want maps a flow (by its server port and whether it goes to the
	// server) to the containers it must name.
	type role struct{ src, dst string }
	names := func(port uint16, toServer bool) (role, bool) {
		var r role
		switch port {
		case tcpLo, udpLo, udpOneway:
			r = role{"web", "sidecar"}
		case tcpEth, udpEthOneway:
			r = role{"web", "srv"}
		default:
			return r, false
		}
		if !toServer {
			r.src, r.dst = r.dst, r.src
		}
		return r, true
	}
	seen := map[capKey]bool{}
	sums := map[pair]uint64{} // per (src, dst) container: tx packets at a's points
	for _, f := range tr.Flows {
		if f.SrcContainer == nil || f.DstContainer == nil {
			t.Errorf("flow %+v lacks src_container or dst_container", f)
			continue
		}
		if f.Protocol != "tcp" && f.Protocol != "udp" {
			continue
		}
		port, toServer := f.DstPort, true
		if _, ok := names(f.SrcPort, false); ok {
			port, toServer = f.SrcPort, false
		}
		want, ok := names(port, toServer)
		if !ok {
			continue
		}
		if f.Netns == a.Name && f.Direction == "tx" {
			sums[pair{*f.SrcContainer, *f.DstContainer}] += f.Packets
		}
		if *f.SrcContainer != want.src || *f.DstContainer != want.dst {
			t.Errorf("%s %s %s %s %s:%d > %s:%d: containers %q > %q (cgroups %d > %d), want %q > %q", f.Netns, f.Interface, f.Direction, f.Protocol,
				f.Src, f.SrcPort, f.Dst, f.DstPort, *f.SrcContainer, *f.DstContainer, f.SrcCgroup, f.DstCgroup, want.src, want.dst)
		}
		// A capture on "any" sees a packet over lo once, as received:
		// that count is the flow's at lo's tx and rx alike.
		k := capKey{out: f.Direction == "tx" && f.Interface != "lo", proto: f.Protocol, src: f.Src, dst: f.Dst, sport: f.SrcPort, dpt: f.DstPort}
		for i, n := range idx[f.Netns] {
			if n == f.Interface {
				k.ifindex = i
			}
		}
		seen[k] = true
		if n := captured[f.Netns][k]; n != f.Packets {
			t.Errorf("%s %s %s %s %s:%d > %s:%d: %d packets, the capture saw %d", f.Netns, f.Interface, f.Direction, f.Protocol,
				f.Src, f.SrcPort, f.Dst, f.DstPort, f.Packets, n)
		}
	}
	// Every captured packet of the test's flows is in a flow of the trace.
	var nflows int
	for ns, m := range captured {
		for k, n := range m {
			_, s := names(k.sport, false)
			_, d := names(k.dpt, true)
			if !s && !d {
				continue
			}
			nflows++
			if !seen[k] {
				t.Errorf("%s: captured %d packets of %+v (%s), no such flow in the trace", ns, n, k, idx[ns][k.ifindex])
			}
		}
	}
	// 5 exchanges, both ways except the one-way ones: 8 directed flows,
	// 5 captured once on lo, 3 at a's and at b's eth0.
	if nflows != 11 {
		t.Errorf("%d flows captured at the pods' points, want 11: %v", nflows, captured)
	}
	t.Logf("flows of the test: %d; per container pair (a's tx): %v", nflows, sums)

	// The aggregated view: per source and destination container, the sum
	// of the flows' packets (a's transmissions).
	checkAggregate(t, aggOut, a.Name, sums)
}

// checkAggregate reads `trace --aggregate-by container` JSON: its flows'
// rows, keyed by source and destination container, hold the packets of
// the per-flow view's flows between those containers.
func checkAggregate(t *testing.T, out []byte, netns string, want map[pair]uint64) {
	t.Helper()
	var tr traceDoc
	if err := json.Unmarshal(out, &tr); err != nil {
		t.Fatalf("trace --aggregate-by container JSON: %v\n%s", err, out)
	}
	validate(t, "trace.schema.json", out)
	got := map[pair]uint64{}
	for _, f := range tr.Flows {
		if f.SrcContainer == nil || f.DstContainer == nil {
			t.Errorf("aggregated row %+v lacks src_container or dst_container", f)
			continue
		}
		if f.Netns == netns && f.Direction == "tx" {
			got[pair{*f.SrcContainer, *f.DstContainer}] += f.Packets
		}
	}
	for k, n := range want {
		if got[k] != n {
			t.Errorf("--aggregate-by container: %s tx %q > %q: %d packets, want %d (the flows' sum)\n%s", netns, k.src, k.dst, got[k], n, out)
		}
	}
	// And no row names the test's containers that the flows do not.
	for k, n := range got {
		if _, ok := want[k]; !ok && (k.src != "" || k.dst != "") {
			t.Errorf("--aggregate-by container: %s tx %q > %q: %d packets, in no flow of the per-flow view", netns, k.src, k.dst, n)
		}
	}
}

// pair is a source and a destination container.
type pair struct{ src, dst string }

const pingpongImage = "docker.io/library/nsflow-pingpong:test"

// imageArchive builds a docker-archive image of one static binary, built
// from the package pkg, as its entrypoint /NAME (no registry is reachable:
// the image is made here, as pauseArchive's).
func imageArchive(t *testing.T, dir, pkg, image, name string) string {
	t.Helper()
	bin := filepath.Join(dir, name)
	build := exec.Command("go", "build", "-o", bin, pkg)
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("build %s: %v\n%s", pkg, err, out)
	}
	data, err := os.ReadFile(bin)
	if err != nil {
		t.Fatal(err)
	}
	var layer bytes.Buffer
	lw := tar.NewWriter(&layer)
	lw.WriteHeader(&tar.Header{Name: name, Mode: 0o755, Size: int64(len(data)), ModTime: time.Unix(0, 0)})
	lw.Write(data)
	lw.Close()
	diffID := sha256.Sum256(layer.Bytes())
	config, _ := json.Marshal(map[string]any{
		"architecture": "amd64", "os": "linux",
		"config": map[string]any{"Entrypoint": []string{"/" + name}},
		"rootfs": map[string]any{"type": "layers", "diff_ids": []string{"sha256:" + hex.EncodeToString(diffID[:])}},
	})
	cfgSum := sha256.Sum256(config)
	cfgName := hex.EncodeToString(cfgSum[:]) + ".json"
	manifest, _ := json.Marshal([]map[string]any{{"Config": cfgName, "RepoTags": []string{image}, "Layers": []string{"layer.tar"}}})
	archive := filepath.Join(dir, name+".tar")
	f, err := os.Create(archive)
	if err != nil {
		t.Fatal(err)
	}
	tw := tar.NewWriter(f)
	for _, e := range []struct {
		name string
		data []byte
	}{{"layer.tar", layer.Bytes()}, {cfgName, config}, {"manifest.json", manifest}} {
		tw.WriteHeader(&tar.Header{Name: e.name, Mode: 0o644, Size: int64(len(e.data)), ModTime: time.Unix(0, 0)})
		tw.Write(e.data)
	}
	tw.Close()
	f.Close()
	return archive
}

// Two containers of one pod sandbox, created through CRI on a real
// containerd (runc, the CNI bridge plugin), talk TCP and UDP over the
// sandbox's lo: `nsflow trace --containers` names each flow's containers
// by their CRI names and their pod, and counts exactly what a capture in
// the sandbox's namespace saw; lo's totals are the kernel's.
func TestCRIContainers(t *testing.T) {
	testenv.RequireRoot(t)
	ctd := startContainerdNet(t, "nsfcni15", "10.213.249.0/24")
	archive := imageArchive(t, ctd.dir, "./testdata/pingpong", pingpongImage, "pingpong")
	if out, err := exec.Command("ctr", "-a", ctd.sock, "-n", "k8s.io", "images", "import", archive).CombinedOutput(); err != nil {
		t.Fatalf("import pingpong image: %v\n%s", err, out)
	}
	conn, err := grpc.NewClient("unix://"+ctd.sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	rt := runtimeapi.NewRuntimeServiceClient(conn)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	logs := filepath.Join(ctd.dir, "logs")
	sbCfg := &runtimeapi.PodSandboxConfig{
		Metadata:     &runtimeapi.PodSandboxMetadata{Name: "web-c15", Namespace: "shop", Uid: "e2e-uid-c15"},
		Hostname:     "web",
		LogDirectory: logs,
		Linux:        &runtimeapi.LinuxPodSandboxConfig{},
	}
	sb, nsPath, nsName, nsIno := runSandbox(t, ctx, ctd, rt, sbCfg)
	sandbox := &podns.Pod{Name: nsName, NetnsPath: nsPath}
	paths := map[uint64]string{nsIno: nsPath}
	// lo only: the CNI's eth0 has IPv6 and speaks it at will.
	lo := func(c counts) counts {
		return counts{point{nsIno, "lo", "rx"}: c[point{nsIno, "lo", "rx"}], point{nsIno, "lo", "tx"}: c[point{nsIno, "lo", "tx"}]}
	}

	tr := startTrace(t, 1, "--netns", nsName, "--cri.endpoint", "unix://"+ctd.sock, "--containers", "-o", "json")
	waitOwnHooks(t, tr.cmd.Process.Pid, nsPath, "lo")
	capt := startCapture(t, sandbox, "")
	k0 := quietCounts(t, paths, lo)

	const rounds = 40
	start := func(name string, args ...string) string {
		t.Helper()
		c, err := rt.CreateContainer(ctx, &runtimeapi.CreateContainerRequest{PodSandboxId: sb.PodSandboxId, SandboxConfig: sbCfg,
			Config: &runtimeapi.ContainerConfig{
				Metadata: &runtimeapi.ContainerMetadata{Name: name},
				Image:    &runtimeapi.ImageSpec{Image: pingpongImage},
				Args:     args,
				LogPath:  name + ".log",
				Linux:    &runtimeapi.LinuxContainerConfig{},
			}})
		if err != nil {
			t.Fatalf("CreateContainer %s: %v", name, err)
		}
		if _, err := rt.StartContainer(ctx, &runtimeapi.StartContainerRequest{ContainerId: c.ContainerId}); err != nil {
			t.Fatalf("StartContainer %s: %v", name, err)
		}
		return c.ContainerId
	}
	// waitLog waits for a line of the container's log (CRI log format).
	waitLog := func(name, line string) {
		t.Helper()
		waitUntil(t, 30*time.Second, fmt.Sprintf("%q in %s's log", line, name), func() bool {
			b, _ := os.ReadFile(filepath.Join(logs, name+".log"))
			if strings.Contains(string(b), "pingpong:") {
				t.Fatalf("container %s failed:\n%s", name, b)
			}
			return regexp.MustCompile(`(?m) F ` + line + `$`).Match(b)
		})
	}
	tcpAddr, udpAddr := "127.0.0.1:9720", "127.0.0.1:9721"
	start("sidecar", "server", tcpAddr, udpAddr, strconv.Itoa(rounds))
	waitLog("sidecar", "listening")
	start("web", "client", tcpAddr, udpAddr, strconv.Itoa(rounds), "100")
	waitLog("web", "done")
	waitLog("sidecar", "done")

	k1 := quietCounts(t, paths, lo)
	out := tr.stop(t)
	k2 := lo(kernelCounts(t, paths))
	if !equalCounts(k1, k2) {
		t.Fatalf("traffic on the sandbox's lo while the trace stopped: the counts cannot be compared")
	}
	captured := capt.stop(t)
	validate(t, "trace.schema.json", out)
	var doc struct {
		traceDoc
		Flows []struct {
			traceFlow
			SrcPod string `json:"src_pod"`
			DstPod string `json:"dst_pod"`
		} `json:"flows"`
	}
	if err := json.Unmarshal(out, &doc); err != nil {
		t.Fatalf("trace JSON: %v\n%s", err, out)
	}
	kd := delta(k0, k2)
	for _, ns := range doc.Namespaces {
		for _, it := range ns.Interfaces {
			if it.Name == "lo" && (it.TXPackets != kd[point{nsIno, "lo", "tx"}].Packets || it.RXPackets != kd[point{nsIno, "lo", "rx"}].Packets) {
				t.Errorf("lo: trace tx %d rx %d packets, the kernel %d and %d", it.TXPackets, it.RXPackets,
					kd[point{nsIno, "lo", "tx"}].Packets, kd[point{nsIno, "lo", "rx"}].Packets)
			}
		}
	}
	n := 0
	for _, f := range doc.Flows {
		if f.Interface != "lo" || (f.Protocol != "tcp" && f.Protocol != "udp") {
			continue
		}
		want := pair{"web", "sidecar"}
		switch {
		case f.DstPort == 9720 || f.DstPort == 9721:
		case f.SrcPort == 9720 || f.SrcPort == 9721:
			want = pair{"sidecar", "web"}
		default:
			continue
		}
		n++
		desc := fmt.Sprintf("lo %s %s %s:%d > %s:%d", f.Direction, f.Protocol, f.Src, f.SrcPort, f.Dst, f.DstPort)
		if str(f.SrcContainer) != want.src || str(f.DstContainer) != want.dst {
			t.Errorf("%s: containers %q > %q, want %q > %q", desc, str(f.SrcContainer), str(f.DstContainer), want.src, want.dst)
		}
		if f.SrcPod != "shop/web-c15" || f.DstPod != "shop/web-c15" {
			t.Errorf("%s: pods %q > %q, want shop/web-c15 both", desc, f.SrcPod, f.DstPod)
		}
		k := capKey{ifindex: 1, proto: f.Protocol, src: f.Src, dst: f.Dst, sport: f.SrcPort, dpt: f.DstPort}
		if captured[k] != f.Packets {
			t.Errorf("%s: %d packets, the capture saw %d", desc, f.Packets, captured[k])
		}
	}
	// TCP and UDP, both ways, at lo's tx and rx.
	if n != 8 {
		t.Errorf("%d flows of the containers on lo, want 8:\n%s", n, out)
	}
}

// containerSeries finds the one series of a per-container metric with
// these container and direction labels, and checks its netns label.
func containerSeries(t *testing.T, s samples, metric, netns, container, dir string) (string, float64, bool) {
	t.Helper()
	var name string
	var v float64
	for k, x := range s {
		if strings.HasPrefix(k, metric+"{") && strings.Contains(k, fmt.Sprintf("container=%q", container)) &&
			strings.Contains(k, fmt.Sprintf("direction=%q", dir)) {
			if name != "" {
				t.Fatalf("two series for container %q %s: %s and %s", container, dir, name, k)
			}
			name, v = k, x
		}
	}
	if name != "" && !strings.Contains(name, fmt.Sprintf("netns=%q", netns)) {
		t.Fatalf("series %s: want netns %q", name, netns)
	}
	return name, v, name != ""
}

// A host-network process in a cgroup of its own (made by the test) sends
// and answers UDP over 127.0.0.1: `serve --containers` exports its packets
// under the cgroup's name, exactly as many as it sent and received (the
// process's own count and a capture on lo agree), and the host namespace's
// lo totals still count them.
func TestHostNetworkContainer(t *testing.T) {
	testenv.RequireRoot(t)
	name := fmt.Sprintf("e2e-ctr-hostnet-%d", os.Getpid())
	cg := filepath.Join(cgroup2Mount(t), name)
	if err := os.Mkdir(cg, 0o755); err != nil {
		t.Fatalf("cgroup: %v", err)
	}
	t.Cleanup(func() {
		if err := syscall.Rmdir(cg); err != nil {
			t.Errorf("remove cgroup %s: %v", cg, err)
		}
	})
	// Defaults otherwise: every namespace observed (other tests' pods
	// too: ready may take a while), the host ends of the pods' veths left
	// to their peers.
	began := time.Now()
	srv := startServeWithin(t, 45*time.Second, "http", "--containers", "--cri.endpoint", "none")
	t.Logf("serve ready after %v", time.Since(began).Round(time.Millisecond))
	lo := func(dir string) string { return pointSeries("nsflow_packets_total", "host", "lo", dir) }
	waitUntil(t, 20*time.Second, "the host's lo in /metrics", func() bool {
		s, _ := srv.scrape0()
		_, ok := s[lo("tx")]
		return ok
	})
	s0, _ := srv.scrape(t)

	const rounds = 50
	port := freePort(t)
	capt := startCapture(t, nil, fmt.Sprintf("udp and port %d", port))
	fd, err := syscall.Open(cg, syscall.O_DIRECTORY|syscall.O_RDONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	cmd := helperCmd("udp-pair", strconv.Itoa(port), strconv.Itoa(rounds), "80")
	cmd.Stderr = nil
	cmd.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: fd}
	pr := startProc(t, cmd, false)
	syscall.Close(fd)
	sent, _ := strconv.Atoi(pr.wait(t))
	if sent != 2*rounds {
		t.Fatalf("the process sent %d datagrams, want %d", sent, 2*rounds)
	}
	// It sent and received them all over lo: each one crossed lo's tx and
	// rx once.
	var captured uint64
	for k, n := range capt.stop(t) {
		if k.proto == "udp" && (k.sport == uint16(port) || k.dpt == uint16(port)) {
			captured += n
		}
	}
	if captured != uint64(sent) {
		t.Fatalf("the capture on lo saw %d datagrams, the process sent %d", captured, sent)
	}

	var s1 samples
	waitUntil(t, 10*time.Second, "the container's series to count its datagrams", func() bool {
		s1, _ = srv.scrape(t)
		_, tx, ok1 := containerSeries(t, s1, "nsflow_container_packets_total", "host", name, "tx")
		_, rx, ok2 := containerSeries(t, s1, "nsflow_container_packets_total", "host", name, "rx")
		return ok1 && ok2 && tx >= float64(sent) && rx >= float64(sent)
	})
	// Nothing else of the process crosses any interface: once its series
	// reached the count, it stays there, exactly.
	time.Sleep(time.Second)
	s2, _ := srv.scrape(t)
	for _, dir := range []string{"tx", "rx"} {
		series, v, _ := containerSeries(t, s2, "nsflow_container_packets_total", "host", name, dir)
		if v != float64(sent) {
			t.Errorf("%s = %v, want %d (the process's datagrams)", series, v, sent)
		}
		series, v, ok := containerSeries(t, s2, "nsflow_container_bytes_total", "host", name, dir)
		if want := float64(sent * (80 + udpHeader + ipv4Header + ethHeader)); !ok || v != want {
			t.Errorf("%s = %v (present %v), want %v", series, v, ok, want)
		}
		// The host's lo totals still hold that traffic.
		if d := s2[lo(dir)] - s0[lo(dir)]; d < float64(sent) {
			t.Errorf("host lo %s counted %v packets meanwhile, fewer than the process's %d", dir, d, sent)
		}
	}
	lintScrape(t, srv)
	t.Logf("container %s: %d datagrams each way, as captured", name, sent)
}
