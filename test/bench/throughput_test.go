package bench

import (
	"bufio"
	"fmt"
	"math"
	"math/rand"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/link"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/nsflow/nsflow/test/podns"
	"github.com/nsflow/nsflow/test/testenv"
)

// The throughput benchmark (issue 17): what an observer of two pods costs
// per packet at a fixed offered load below saturation, and how much of the
// bare small-packet rate it keeps at saturation, for nsflow serve (defaults
// and --flows) next to the tools users reach for instead. Method and
// figures: docs/BENCHMARKS.md, "CPU per packet and throughput, as deployed".
//
// Placement on the 2-CPU machine: the sender (pod a) runs on CPU 0, where
// the whole kernel path of its packets runs too (veth transmit, the
// backlog's softirq at the end of the send, the bridge, the peer veth, the
// TC hooks, UDP delivery into pod b's socket); the receiver (pod b) and the
// observer's processes run on CPU 1. CPU time is counted on both CPUs.

// tpConfig sizes one run.
type tpConfig struct {
	rounds int           // every variant once per round, in a random order
	pps    int           // the fixed offered load, datagrams per second
	nap    time.Duration // the paced sender's sleep between batches (0: 20µs)
	// bracket: each observer's saturation window between two without
	// any observer (tpMeasure.SatBare)
	bracket bool
	window  time.Duration // fixed-load measurement window
	sat     time.Duration // saturation measurement window
	warm    time.Duration // traffic before each window starts
	seed    int64         // the rounds' orders and the bootstrap
	subnet  string
	prefix  string // pod name prefix (serve observes the host and ^prefix)
}

const (
	tpSendCPU = 0 // sender, and the kernel path its sends run
	tpRecvCPU = 1 // receiver and observers
	tpPayload = 64
	tpPort    = 5301
)

// tpMeasure is one variant's measurement in one round: a line of the raw
// output ("tp key=value ...").
type tpMeasure struct {
	Round, Pos int
	Variant    string
	Offered    int     // fixed load, datagrams/s
	WindowS    float64 // fixed-load window, seconds (wall)
	Sent       uint64  // datagrams sent in the fixed-load window
	Delivered  uint64  // datagrams received in it
	BusyS      float64 // CPU seconds, all CPUs: wall - idle - iowait - steal
	UserS      float64 // tick-sampled breakdown of BusyS, for reading only
	SysS       float64
	SoftirqS   float64
	StealS     float64
	NsPerPkt   float64 // BusyS / Delivered
	SatS       float64 // saturation window, seconds (wall)
	SatSent    uint64
	SatDeliv   uint64
	SatPPS     float64 // SatDeliv / SatS
	// SatBare is the saturation rate with no observer in windows right
	// before the variant's observer started and right after it stopped
	// (their mean; 0 when not measured): its saturation rate is divided
	// by this, seconds away, rather than by none's of the round, minutes
	// away (the rate drifts by ±10 % over a run on this VM).
	SatBare     float64
	Load1       float64 // load average when the variant started
	PodProgs    int     // TC programs/filters on the pods' eth0 (both hooks)
	HostProgs   int     // on the pods' host-side veths
	PodSockets  int     // packet sockets in the pods
	HostSockets int     // in the host namespace
	Foreign     string  // "": only the variant's own observers were seen
}

func (m tpMeasure) line() string {
	f := func(v float64) string { return strconv.FormatFloat(v, 'f', -1, 64) }
	foreign := m.Foreign
	if foreign == "" {
		foreign = "-"
	}
	bare := ""
	if m.SatBare > 0 {
		bare = " sat_bare_pps=" + f(math.Round(m.SatBare))
	}
	return fmt.Sprintf("tp round=%d pos=%d variant=%s offered_pps=%d window_s=%s sent=%d delivered=%d busy_s=%s user_s=%s sys_s=%s softirq_s=%s steal_s=%s ns_per_pkt=%s sat_s=%s sat_sent=%d sat_delivered=%d sat_pps=%s load1=%s pod_progs=%d host_progs=%d pod_sockets=%d host_sockets=%d foreign=%s%s",
		m.Round, m.Pos, m.Variant, m.Offered, f(m.WindowS), m.Sent, m.Delivered, f(m.BusyS), f(m.UserS), f(m.SysS), f(m.SoftirqS), f(m.StealS),
		f(math.Round(m.NsPerPkt*10)/10), f(m.SatS), m.SatSent, m.SatDeliv, f(math.Round(m.SatPPS)), f(m.Load1),
		m.PodProgs, m.HostProgs, m.PodSockets, m.HostSockets, foreign, bare)
}

// parseTPLine reads a line of the raw output back (tpAnalyze's input, so
// that the table can be recomputed from a committed raw file).
func parseTPLine(s string) (tpMeasure, bool) {
	if !strings.HasPrefix(s, "tp ") {
		return tpMeasure{}, false
	}
	var m tpMeasure
	for _, kv := range strings.Fields(s[3:]) {
		k, v, _ := strings.Cut(kv, "=")
		fl, _ := strconv.ParseFloat(v, 64)
		u, _ := strconv.ParseUint(v, 10, 64)
		i := int(fl)
		switch k {
		case "round":
			m.Round = i
		case "pos":
			m.Pos = i
		case "variant":
			m.Variant = v
		case "offered_pps":
			m.Offered = i
		case "window_s":
			m.WindowS = fl
		case "sent":
			m.Sent = u
		case "delivered":
			m.Delivered = u
		case "busy_s":
			m.BusyS = fl
		case "user_s":
			m.UserS = fl
		case "sys_s":
			m.SysS = fl
		case "softirq_s":
			m.SoftirqS = fl
		case "steal_s":
			m.StealS = fl
		case "sat_bare_pps":
			m.SatBare = fl
		case "ns_per_pkt":
			m.NsPerPkt = fl
		case "sat_s":
			m.SatS = fl
		case "sat_sent":
			m.SatSent = u
		case "sat_delivered":
			m.SatDeliv = u
		case "sat_pps":
			m.SatPPS = fl
		case "load1":
			m.Load1 = fl
		case "pod_progs":
			m.PodProgs = i
		case "host_progs":
			m.HostProgs = i
		case "pod_sockets":
			m.PodSockets = i
		case "host_sockets":
			m.HostSockets = i
		case "foreign":
			if v != "-" {
				m.Foreign = v
			}
		}
	}
	return m, m.Variant != ""
}

// cpuStat is the aggregate "cpu" line of /proc/stat (seconds) and when it
// was read. Under NO_HZ the idle time is the kernel's exact idle time
// (get_cpu_idle_time_us), printed in 10 ms units; user, system and softirq
// are sampled at the tick (HZ) and serve only as a breakdown.
type cpuStat struct {
	at                                                    time.Time
	user, nice, system, idle, iowait, irq, softirq, steal float64
	ncpu                                                  int
}

func readCPUStat(tb testing.TB) cpuStat {
	raw, err := os.ReadFile("/proc/stat")
	if err != nil {
		tb.Fatal(err)
	}
	s := cpuStat{at: time.Now()}
	for _, l := range strings.Split(string(raw), "\n") {
		f := strings.Fields(l)
		if len(f) < 9 || !strings.HasPrefix(f[0], "cpu") {
			continue
		}
		if f[0] != "cpu" {
			s.ncpu++
			continue
		}
		v := make([]float64, 8)
		for i := range v {
			x, _ := strconv.ParseFloat(f[i+1], 64)
			v[i] = x / 100 // USER_HZ
		}
		s.user, s.nice, s.system, s.idle, s.iowait, s.irq, s.softirq, s.steal = v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7]
	}
	return s
}

// busy is the CPU time used on all CPUs between two reads.
func (s cpuStat) busy(to cpuStat) float64 {
	wall := to.at.Sub(s.at).Seconds() * float64(s.ncpu)
	return wall - (to.idle - s.idle) - (to.iowait - s.iowait) - (to.steal - s.steal)
}

func load1() float64 {
	raw, _ := os.ReadFile("/proc/loadavg")
	f := strings.Fields(string(raw))
	if len(f) == 0 {
		return -1
	}
	v, _ := strconv.ParseFloat(f[0], 64)
	return v
}

// pinThread locks the calling goroutine to its OS thread and that thread to
// one CPU.
func pinThread(cpu int) error {
	runtime.LockOSThread()
	var set unix.CPUSet
	set.Set(cpu)
	return unix.SchedSetaffinity(0, &set)
}

// mmsghdr is struct mmsghdr (x/sys/unix has no sendmmsg/recvmmsg).
type mmsghdr struct {
	hdr unix.Msghdr
	n   uint32
	_   [4]byte
}

// tpTraffic is the UDP load between the pods: a sender in pod a (CPU 0)
// and a receiver in pod b (CPU 1), both blocking sockets driven by raw
// system calls from pinned threads, in this process.
type tpTraffic struct {
	sfd, rfd int
	received atomic.Uint64
	sent     atomic.Uint64
	stopRecv atomic.Bool
	recvDone chan error
	// nap is the paced sender's sleep between batches: it sends what is
	// due by the clock, at most 32 at a time, then sleeps this long.
	nap time.Duration
}

func startTraffic(tb testing.TB, a, b *podns.Pod) *tpTraffic {
	t := &tpTraffic{recvDone: make(chan error, 1)}
	dst := &unix.SockaddrInet4{Port: tpPort, Addr: b.IPv4.As4()}
	if err := b.Do(func() (err error) {
		if t.rfd, err = unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0); err != nil {
			return err
		}
		if err := unix.SetsockoptInt(t.rfd, unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, 32<<20); err != nil {
			return err
		}
		tv := unix.NsecToTimeval(int64(50 * time.Millisecond))
		if err := unix.SetsockoptTimeval(t.rfd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv); err != nil {
			return err
		}
		return unix.Bind(t.rfd, dst)
	}); err != nil {
		tb.Fatalf("receiver: %v", err)
	}
	if err := a.Do(func() (err error) {
		if t.sfd, err = unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0); err != nil {
			return err
		}
		return unix.Connect(t.sfd, dst)
	}); err != nil {
		tb.Fatalf("sender: %v", err)
	}
	go t.receive()
	tb.Cleanup(func() {
		t.stopRecv.Store(true)
		<-t.recvDone
		unix.Close(t.sfd)
		unix.Close(t.rfd)
	})
	return t
}

// receive counts datagrams with recvmmsg (MSG_WAITFORONE: whatever is
// queued once the first one is there) until stopRecv.
func (t *tpTraffic) receive() {
	if err := pinThread(tpRecvCPU); err != nil {
		t.recvDone <- err
		return
	}
	const batch = 64
	bufs := make([]byte, batch*2048)
	iov := make([]unix.Iovec, batch)
	msgs := make([]mmsghdr, batch)
	for i := range msgs {
		iov[i].Base = &bufs[i*2048]
		iov[i].SetLen(2048)
		msgs[i].hdr.Iov = &iov[i]
		msgs[i].hdr.SetIovlen(1)
	}
	for !t.stopRecv.Load() {
		n, _, errno := unix.Syscall6(unix.SYS_RECVMMSG, uintptr(t.rfd), uintptr(unsafe.Pointer(&msgs[0])), batch, unix.MSG_WAITFORONE, 0, 0)
		switch errno {
		case 0:
			t.received.Add(uint64(n))
		case unix.EAGAIN, unix.EINTR:
		default:
			t.recvDone <- errno
			return
		}
	}
	t.recvDone <- nil
}

// send sends datagrams of tpPayload bytes at pps per second (0: as fast as
// it can) until stop, in sendmmsg batches of at most 32.
func (t *tpTraffic) send(pps int, stop *atomic.Bool) error {
	if err := pinThread(tpSendCPU); err != nil {
		return err
	}
	const batch = 32
	payload := make([]byte, tpPayload)
	iov := unix.Iovec{Base: &payload[0]}
	iov.SetLen(len(payload))
	msgs := make([]mmsghdr, batch)
	for i := range msgs {
		msgs[i].hdr.Iov = &iov
		msgs[i].hdr.SetIovlen(1)
	}
	start := time.Now()
	var sent int64
	nap := unix.NsecToTimespec(t.nap.Nanoseconds())
	for !stop.Load() {
		n := int64(batch)
		if pps > 0 {
			due := int64(time.Since(start).Seconds() * float64(pps))
			if n = min(due-sent, batch); n <= 0 {
				unix.Nanosleep(&nap, nil)
				continue
			}
		}
		k, _, errno := unix.Syscall6(unix.SYS_SENDMMSG, uintptr(t.sfd), uintptr(unsafe.Pointer(&msgs[0])), uintptr(n), 0, 0, 0)
		switch errno {
		case 0:
			sent += int64(k)
			t.sent.Add(uint64(k))
		case unix.ENOBUFS, unix.EAGAIN, unix.EINTR:
		default:
			return errno
		}
	}
	return nil
}

// tpWindow runs the sender at pps, waits warm, then measures for d: the
// datagrams sent and received in the window and the CPU time used.
func (t *tpTraffic) window(tb testing.TB, pps int, warm, d time.Duration) (sent, received uint64, c0, c1 cpuStat) {
	var stop atomic.Bool
	done := make(chan error, 1)
	go func() { done <- t.send(pps, &stop) }()
	time.Sleep(warm)
	x0, r0 := t.sent.Load(), t.received.Load()
	c0 = readCPUStat(tb)
	time.Sleep(d)
	c1 = readCPUStat(tb)
	x1, r1 := t.sent.Load(), t.received.Load()
	stop.Store(true)
	if err := <-done; err != nil {
		tb.Fatalf("sender: %v", err)
	}
	// Let the receiver drain before the next window.
	for last := t.received.Load(); ; {
		time.Sleep(50 * time.Millisecond)
		if now := t.received.Load(); now == last {
			break
		} else {
			last = now
		}
	}
	return x1 - x0, r1 - r0, c0, c1
}

// tpObserver is a running observer of the two pods.
type tpObserver struct {
	cmds      []*exec.Cmd
	logs      []string
	podProgs  int  // TC programs it attaches to the pods' eth0
	podSocket bool // it opens packet sockets in the pods
	stop      func()
}

func (o *tpObserver) alive() error {
	for i, c := range o.cmds {
		if err := syscall.Kill(c.Process.Pid, 0); err != nil || c.ProcessState != nil {
			raw, _ := os.ReadFile(o.logs[i])
			return fmt.Errorf("%s exited: %s", c.Path, tailOf(string(raw), 500))
		}
	}
	return nil
}

func tailOf(s string, n int) string {
	if len(s) > n {
		return s[len(s)-n:]
	}
	return s
}

type tpEnv struct {
	pods []*podns.Pod
	bin  string
	tmp  string
	cfg  tpConfig
}

// startCmd starts argv pinned to the observers' CPU, in pod p (nil: the
// host), in a process group of its own, output to a log file.
func (e *tpEnv) startCmd(tb testing.TB, o *tpObserver, p *podns.Pod, argv ...string) {
	logf, err := os.CreateTemp(e.tmp, filepath.Base(argv[0])+"-*.log")
	if err != nil {
		tb.Fatal(err)
	}
	defer logf.Close()
	cmd := exec.Command("taskset", append([]string{"-c", strconv.Itoa(tpRecvCPU)}, argv...)...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if p != nil {
		err = p.Start(cmd)
	} else {
		err = cmd.Start()
	}
	if err != nil {
		tb.Fatalf("%v: %v", argv, err)
	}
	o.cmds = append(o.cmds, cmd)
	o.logs = append(o.logs, logf.Name())
}

// stopCmds ends the observer's processes (their process groups: pmacctd
// forks its plugins), SIGTERM first.
func stopCmds(o *tpObserver) {
	for _, c := range o.cmds {
		syscall.Kill(-c.Process.Pid, syscall.SIGTERM)
	}
	for _, c := range o.cmds {
		done := make(chan struct{})
		go func() { c.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			syscall.Kill(-c.Process.Pid, syscall.SIGKILL)
			<-done
		}
	}
}

// tpVariant is one way of observing the pods.
type tpVariant struct {
	name  string
	start func(tb testing.TB, e *tpEnv) *tpObserver
}

func tpVariants() []tpVariant {
	serve := func(extra ...string) func(testing.TB, *tpEnv) *tpObserver {
		return func(tb testing.TB, e *tpEnv) *tpObserver {
			o := &tpObserver{podProgs: 4}
			port := tpFreePort(tb)
			// As the DaemonSet runs it (the host namespace observed, every
			// default), on a node whose only pods are the two of the test.
			args := append([]string{e.bin, "serve", "--web.listen-address", "127.0.0.1:" + strconv.Itoa(port),
				"--netns.include", "^(host|" + e.cfg.prefix + ".*)$", "--log.level", "warn"}, extra...)
			e.startCmd(tb, o, nil, args...)
			o.stop = func() { stopCmds(o) }
			url := fmt.Sprintf("http://127.0.0.1:%d/-/ready", port)
			for t0 := time.Now(); ; time.Sleep(20 * time.Millisecond) {
				if resp, err := http.Get(url); err == nil {
					resp.Body.Close()
					if resp.StatusCode == http.StatusOK {
						break
					}
				}
				if err := o.alive(); err != nil || time.Since(t0) > time.Minute {
					o.stop()
					tb.Fatalf("serve never ready: %v", err)
				}
			}
			return o
		}
	}
	pcap := func(argv func(e *tpEnv, p *podns.Pod) []string) func(testing.TB, *tpEnv) *tpObserver {
		return func(tb testing.TB, e *tpEnv) *tpObserver {
			o := &tpObserver{podSocket: true}
			o.stop = func() { stopCmds(o) }
			for _, p := range e.pods {
				e.startCmd(tb, o, p, argv(e, p)...)
			}
			// These tools report no readiness: wait for their packet
			// sockets, then a little for their rings and filters.
			for t0 := time.Now(); ; time.Sleep(20 * time.Millisecond) {
				ok := true
				for _, p := range e.pods {
					ok = ok && packetSockets(tb, p) > 0
				}
				if ok {
					break
				}
				if err := o.alive(); err != nil || time.Since(t0) > 10*time.Second {
					o.stop()
					var logs []string
					for _, l := range o.logs {
						raw, _ := os.ReadFile(l)
						logs = append(logs, tailOf(string(raw), 300))
					}
					tb.Logf("%v: no packet socket in the pods (%v): %q", argv(e, e.pods[0]), err, logs)
					return nil
				}
			}
			time.Sleep(300 * time.Millisecond)
			return o
		}
	}
	// Diagnostic variants (NSFLOW_BENCH_TP_VARIANTS), measured in addition
	// to the six: where serve's cost comes from.
	stopped := func(tb testing.TB, e *tpEnv) *tpObserver {
		// serve's hooks in place, its process frozen: the kernel's part.
		o := serve()(tb, e)
		for _, c := range o.cmds {
			syscall.Kill(-c.Process.Pid, syscall.SIGSTOP)
		}
		stop := o.stop
		o.stop = func() {
			for _, c := range o.cmds {
				syscall.Kill(-c.Process.Pid, syscall.SIGCONT)
			}
			stop()
		}
		return o
	}
	extra := map[string]func(testing.TB, *tpEnv) *tpObserver{
		"serve-stopped": stopped,
		"serve-nohost":  serve("--netns.host=false"),
		"tc-empty":      tcEmpty,
	}
	all := []tpVariant{
		{"none", func(testing.TB, *tpEnv) *tpObserver { return &tpObserver{stop: func() {}} }},
		{"serve", serve()},
		{"serve-flows", serve("--flows")},
		{"tcpdump", pcap(func(*tpEnv, *podns.Pod) []string {
			return []string{"tcpdump", "-i", "eth0", "-w", "/dev/null", "-s", "96"}
		})},
		{"softflowd", pcap(func(e *tpEnv, p *podns.Pod) []string {
			// A control socket per instance: the default one
			// (/var/run/softflowd.ctl) is shared by the pods' instances
			// (one mount namespace), so the second failed, and it stayed
			// behind after the run.
			return []string{"softflowd", "-d", "-i", "eth0", "-n", "127.0.0.1:9995",
				"-c", filepath.Join(e.tmp, p.Name+".softflowd.ctl")}
		})},
		{"pmacctd", pcap(func(e *tpEnv, p *podns.Pod) []string {
			return []string{"pmacctd", "-i", "eth0", "-c", "src_host,dst_host,proto,src_port,dst_port", "-P", "memory",
				"-p", filepath.Join(e.tmp, p.Name+".pipe")}
		})},
	}
	want := os.Getenv("NSFLOW_BENCH_TP_VARIANTS")
	if want == "" {
		return all
	}
	var out []tpVariant
	for _, name := range strings.Split(want, ",") {
		found := false
		for _, v := range all {
			if v.name == name {
				out, found = append(out, v), true
			}
		}
		if f, ok := extra[name]; ok {
			out, found = append(out, tpVariant{name, f}), true
		}
		if !found {
			panic("NSFLOW_BENCH_TP_VARIANTS: no variant " + name)
		}
	}
	return out
}

// tcEmpty attaches an empty program (TC_ACT_UNSPEC: the next one decides)
// on both hooks of both pods' eth0, through clsact as serve does in pods:
// what any TC observer costs before its program does anything.
func tcEmpty(tb testing.TB, e *tpEnv) *tpObserver {
	prog, err := ebpf.NewProgram(&ebpf.ProgramSpec{Type: ebpf.SchedCLS, License: "GPL",
		Instructions: asm.Instructions{asm.Mov.Imm(asm.R0, -1), asm.Return()}})
	if err != nil {
		tb.Fatal(err)
	}
	o := &tpObserver{podProgs: 4}
	var undo []func()
	o.stop = func() {
		for _, u := range undo {
			u()
		}
		prog.Close()
	}
	for _, p := range e.pods {
		nl, err := p.Netlink()
		if err != nil {
			o.stop()
			tb.Fatal(err)
		}
		l, err := nl.LinkByName("eth0")
		if err == nil {
			q := &netlink.GenericQdisc{QdiscAttrs: netlink.QdiscAttrs{LinkIndex: l.Attrs().Index,
				Handle: netlink.MakeHandle(0xffff, 0), Parent: netlink.HANDLE_CLSACT}, QdiscType: "clsact"}
			if err = nl.QdiscAdd(q); err == nil {
				undo = append(undo, func() { nl.QdiscDel(q); nl.Close() })
				for _, parent := range []uint32{netlink.HANDLE_MIN_INGRESS, netlink.HANDLE_MIN_EGRESS} {
					f := &netlink.BpfFilter{FilterAttrs: netlink.FilterAttrs{LinkIndex: l.Attrs().Index, Parent: parent,
						Handle: 1, Protocol: unix.ETH_P_ALL, Priority: 1}, Fd: prog.FD(), Name: "tp-empty", DirectAction: true}
					if err = nl.FilterAdd(f); err != nil {
						break
					}
				}
			} else {
				nl.Close()
			}
		}
		if err != nil {
			o.stop()
			tb.Fatalf("tc-empty in %s: %v", p.Name, err)
		}
	}
	return o
}

func tpFreePort(tb testing.TB) int {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		tb.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// packetSockets counts the packet sockets of pod p's namespace (nil: the
// host's), from /proc/net/packet as a thread inside it sees it.
func packetSockets(tb testing.TB, p *podns.Pod) int {
	read := func() (n int, err error) {
		raw, err := os.ReadFile("/proc/thread-self/net/packet")
		if err != nil {
			return 0, err
		}
		return max(0, len(strings.Split(strings.TrimSpace(string(raw)), "\n"))-1), nil
	}
	if p == nil {
		raw, err := os.ReadFile("/proc/1/net/packet")
		if err != nil {
			tb.Fatal(err)
		}
		return max(0, len(strings.Split(strings.TrimSpace(string(raw)), "\n"))-1)
	}
	var n int
	if err := p.Do(func() (err error) { n, err = read(); return err }); err != nil {
		tb.Fatal(err)
	}
	return n
}

// hookPrograms counts what is attached to both TC hooks of an interface:
// TCX programs and clsact filters. nl nil: the host's namespace.
func hookPrograms(nl *netlink.Handle, iface string) int {
	if nl == nil {
		nl = &netlink.Handle{}
	}
	l, err := nl.LinkByName(iface)
	if err != nil {
		return 0
	}
	n := 0
	for _, at := range []ebpf.AttachType{ebpf.AttachTCXIngress, ebpf.AttachTCXEgress} {
		if r, err := link.QueryPrograms(link.QueryOptions{Target: l.Attrs().Index, Attach: at}); err == nil {
			n += len(r.Programs)
		}
	}
	for _, parent := range []uint32{netlink.HANDLE_MIN_INGRESS, netlink.HANDLE_MIN_EGRESS} {
		if fs, err := nl.FilterList(l, parent); err == nil {
			n += len(fs)
		}
	}
	return n
}

// observed takes stock of what observes the pods' traffic: programs on the
// pods' eth0 and on their host ends, packet sockets in the pods and the
// host; and says what is not the variant's own.
func (e *tpEnv) observed(tb testing.TB, o *tpObserver, m *tpMeasure) {
	m.PodProgs, m.HostProgs, m.PodSockets = 0, 0, 0
	for _, p := range e.pods {
		nl, err := p.Netlink()
		if err != nil {
			tb.Fatal(err)
		}
		// TCX queries name the device by ifindex in the caller's
		// namespace: query from inside the pod.
		p.Do(func() error { m.PodProgs += hookPrograms(nl, "eth0"); return nil })
		nl.Close()
		m.HostProgs += hookPrograms(nil, p.HostVeth)
		m.PodSockets += packetSockets(tb, p)
	}
	m.HostSockets = packetSockets(tb, nil)
	var why []string
	if m.PodProgs != o.podProgs {
		why = append(why, fmt.Sprintf("pod-progs:%d/%d", m.PodProgs, o.podProgs))
	}
	if m.HostProgs != 0 {
		why = append(why, fmt.Sprintf("host-progs:%d", m.HostProgs))
	}
	if (m.PodSockets > 0) != o.podSocket || (o.podSocket && m.PodSockets != len(e.pods)) {
		why = append(why, fmt.Sprintf("pod-sockets:%d", m.PodSockets))
	}
	if m.HostSockets != 0 {
		why = append(why, fmt.Sprintf("host-sockets:%d", m.HostSockets))
	}
	if err := o.alive(); err != nil {
		tb.Fatalf("%s: %v", m.Variant, err)
	}
	if len(why) > 0 && m.Foreign == "" {
		m.Foreign = strings.Join(why, ",")
	}
}

// measure runs one variant: its observer started, the fixed load, then
// saturation, then the observer stopped.
func (e *tpEnv) measure(tb testing.TB, tr *tpTraffic, v tpVariant, round, pos int) tpMeasure {
	m := tpMeasure{Round: round, Pos: pos, Variant: v.name, Offered: e.cfg.pps, Load1: load1()}
	bare := func() float64 {
		_, deliv, c0, c1 := tr.window(tb, 0, e.cfg.warm/2, e.cfg.sat)
		return float64(deliv) / c1.at.Sub(c0.at).Seconds()
	}
	var before float64
	if e.cfg.bracket {
		before = bare()
	}
	o := v.start(tb, e)
	for try := 1; o == nil; try++ {
		if try == 3 {
			tb.Fatalf("%s did not start", v.name)
		}
		o = v.start(tb, e)
	}
	defer func() { o.stop() }() // o.stop as it is then (a bracket stops it earlier)
	e.observed(tb, o, &m)
	var c0, c1 cpuStat
	m.Sent, m.Delivered, c0, c1 = tr.window(tb, e.cfg.pps, e.cfg.warm, e.cfg.window)
	m.WindowS = c1.at.Sub(c0.at).Seconds()
	m.BusyS = c0.busy(c1)
	m.UserS = c1.user + c1.nice - c0.user - c0.nice
	m.SysS = c1.system - c0.system
	m.SoftirqS = c1.softirq + c1.irq - c0.softirq - c0.irq
	m.StealS = c1.steal - c0.steal
	if m.Delivered > 0 {
		m.NsPerPkt = m.BusyS * 1e9 / float64(m.Delivered)
	}
	m.SatSent, m.SatDeliv, c0, c1 = tr.window(tb, 0, e.cfg.warm/2, e.cfg.sat)
	m.SatS = c1.at.Sub(c0.at).Seconds()
	m.SatPPS = float64(m.SatDeliv) / m.SatS
	e.observed(tb, o, &m)
	if e.cfg.bracket {
		o.stop()
		o.stop = func() {}
		m.SatBare = (before + bare()) / 2
	}
	return m
}

// runThroughput creates the pods and runs cfg.rounds rounds of every
// variant, each round in its own random order; it returns the
// measurements and prints each as a raw line.
func runThroughput(tb testing.TB, cfg tpConfig, out func(string)) []tpMeasure {
	testenv.RequireRoot(tb)
	for _, tool := range []string{"taskset", "tcpdump", "softflowd", "pmacctd"} {
		if _, err := exec.LookPath(tool); err != nil {
			tb.Fatalf("%s not installed (make bench-deps)", tool)
		}
	}
	if runtime.NumCPU() < 2 {
		tb.Fatal("the placement needs 2 CPUs")
	}
	e := &tpEnv{bin: nsflowBinary(tb), tmp: tb.TempDir(), cfg: cfg}
	for _, n := range []string{cfg.prefix + "a", cfg.prefix + "b"} {
		p, err := podns.Create(podns.Config{}, n, podns.Options{Subnet: netip.MustParsePrefix(cfg.subnet)})
		if err != nil {
			tb.Fatal(err)
		}
		tb.Cleanup(func() { podns.Delete(podns.Config{}, n) })
		e.pods = append(e.pods, p)
	}
	tr := startTraffic(tb, e.pods[0], e.pods[1])
	tr.nap = cfg.nap
	if tr.nap <= 0 {
		tr.nap = 20 * time.Microsecond
	}
	host, _ := os.Hostname()
	kernel, _ := os.ReadFile("/proc/sys/kernel/osrelease")
	out(fmt.Sprintf("# throughput: %s, kernel %s, %d CPUs; sender on CPU %d, receiver and observers on CPU %d; %d rounds, fixed load %d datagrams/s of %d bytes (sender sleeps %s between batches) for %s, saturation for %s, seed %d",
		host, strings.TrimSpace(string(kernel)), runtime.NumCPU(), tpSendCPU, tpRecvCPU, cfg.rounds, cfg.pps, tpPayload, tr.nap, cfg.window, cfg.sat, cfg.seed))
	vs := tpVariants()
	rng := rand.New(rand.NewSource(cfg.seed))
	var ms []tpMeasure
	for r := 0; r < cfg.rounds; r++ {
		for pos, k := range rng.Perm(len(vs)) {
			m := e.measure(tb, tr, vs[k], r, pos)
			out(m.line())
			ms = append(ms, m)
		}
	}
	return ms
}

// Statistics.

func tpMedian(v []float64) float64 {
	if len(v) == 0 {
		return math.NaN()
	}
	s := append([]float64(nil), v...)
	sort.Float64s(s)
	if n := len(s); n%2 == 1 {
		return s[n/2]
	} else {
		return (s[n/2-1] + s[n/2]) / 2
	}
}

// quantile of sorted s (linear interpolation).
func quantile(s []float64, q float64) float64 {
	if len(s) == 0 {
		return math.NaN()
	}
	x := q * float64(len(s)-1)
	i := int(x)
	if i+1 >= len(s) {
		return s[len(s)-1]
	}
	return s[i] + (x-float64(i))*(s[i+1]-s[i])
}

// bootstrap resamples the n rounds with replacement b times and returns
// stat's 2.5 % and 97.5 % quantiles over the resamples (a percentile
// bootstrap 95 % interval). stat sees the resampled round indices.
func bootstrap(n, b int, seed int64, stat func(idx []int) float64) (lo, hi float64) {
	rng := rand.New(rand.NewSource(seed))
	idx := make([]int, n)
	vals := make([]float64, 0, b)
	for i := 0; i < b; i++ {
		for j := range idx {
			idx[j] = rng.Intn(n)
		}
		if v := stat(idx); !math.IsNaN(v) {
			vals = append(vals, v)
		}
	}
	sort.Float64s(vals)
	return quantile(vals, 0.025), quantile(vals, 0.975)
}

// tpResult is a variant's figures against none in the same rounds.
type tpResult struct {
	variant              string
	rounds               int
	nsPerPkt             float64 // median
	cost, costLo, costHi float64 // CPU per packet / none's, median of the rounds' ratios and its interval
	sat, satLo, satHi    float64 // saturation rate / none's
	satPPS               float64 // median
	delivered            float64 // fixed load: delivered / sent, worst round
}

// tpTarget is an issue-17 target and whether the interval clears it.
type tpTarget struct {
	what        string
	med, lo, hi float64
	limit       string
	met         bool
}

// tpAnalyze pairs each variant's measurement with none's of the same round
// (rounds where a foreign observer was not the same in every variant are
// left out) and
// computes the medians and bootstrap intervals, and the targets.
func tpAnalyze(ms []tpMeasure, seed int64) (res []tpResult, targets []tpTarget, kept, dropped, constForeign int) {
	byRound := map[int]map[string]tpMeasure{}
	var order []string
	seen := map[string]bool{}
	for _, m := range ms {
		if byRound[m.Round] == nil {
			byRound[m.Round] = map[string]tpMeasure{}
		}
		byRound[m.Round][m.Variant] = m
		if !seen[m.Variant] {
			seen[m.Variant] = true
			order = append(order, m.Variant)
		}
	}
	sort.Slice(order, func(i, j int) bool {
		rank := map[string]int{"none": 0, "serve": 1, "serve-stopped": 2, "serve-nohost": 3, "tc-empty": 4, "serve-flows": 5, "tcpdump": 6, "softflowd": 7, "pmacctd": 8}
		ri, oki := rank[order[i]]
		rj, okj := rank[order[j]]
		if oki != okj {
			return oki
		}
		if ri != rj {
			return ri < rj
		}
		return order[i] < order[j]
	})
	var rounds []map[string]tpMeasure
	var keys []int
	for r := range byRound {
		keys = append(keys, r)
	}
	sort.Ints(keys)
	for _, r := range keys {
		// A foreign observer present alike in every variant of the round
		// (the same programs and sockets from start to end) weighs on
		// none as on the others and the pairing keeps it out of the
		// ratios; one that came, went or differed is not: its round is
		// left out.
		vs := byRound[r]
		ok := len(vs) == len(order) && vs["none"].NsPerPkt > 0
		for _, m := range vs {
			ok = ok && m.Foreign == vs["none"].Foreign && m.NsPerPkt > 0 && m.SatPPS > 0
		}
		if ok && vs["none"].Foreign != "" {
			constForeign++
		}
		if ok {
			rounds = append(rounds, vs)
		} else {
			dropped++
		}
	}
	kept = len(rounds)
	if kept == 0 {
		return nil, nil, 0, dropped, constForeign
	}
	ratio := func(v string, f func(tpMeasure) float64) []float64 {
		out := make([]float64, kept)
		for i, r := range rounds {
			out[i] = f(r[v]) / f(r["none"])
		}
		return out
	}
	pick := func(v []float64, idx []int) []float64 {
		out := make([]float64, len(idx))
		for i, j := range idx {
			out[i] = v[j]
		}
		return out
	}
	const B = 10000
	cpp := func(m tpMeasure) float64 { return m.NsPerPkt }
	sat := func(m tpMeasure) float64 { return m.SatPPS }
	costs := map[string][]float64{}
	for _, v := range order {
		var ns, pps []float64
		worst := math.Inf(1)
		for _, r := range rounds {
			ns = append(ns, r[v].NsPerPkt)
			pps = append(pps, r[v].SatPPS)
			if r[v].Sent > 0 {
				worst = min(worst, float64(r[v].Delivered)/float64(r[v].Sent))
			}
		}
		c, s := ratio(v, cpp), ratio(v, sat)
		for i, r := range rounds {
			if r[v].SatBare > 0 {
				s[i] = r[v].SatPPS / r[v].SatBare
			}
		}
		costs[v] = c
		t := tpResult{variant: v, rounds: kept, nsPerPkt: tpMedian(ns), satPPS: tpMedian(pps), delivered: worst,
			cost: tpMedian(c), sat: tpMedian(s)}
		t.costLo, t.costHi = bootstrap(kept, B, seed, func(idx []int) float64 { return tpMedian(pick(c, idx)) })
		t.satLo, t.satHi = bootstrap(kept, B, seed+1, func(idx []int) float64 { return tpMedian(pick(s, idx)) })
		res = append(res, t)
	}
	for _, t := range res {
		if t.variant == "serve" {
			targets = append(targets, tpTarget{"serve (defaults) adds ≤ 3 % CPU per packet", 100 * (t.cost - 1), 100 * (t.costLo - 1), 100 * (t.costHi - 1), "upper bound < 3 %", t.costHi-1 < 0.03})
			targets = append(targets, tpTarget{"serve (defaults) keeps ≥ 97 % of the saturation rate", 100 * t.sat, 100 * t.satLo, 100 * t.satHi, "lower bound ≥ 97 %", t.satLo >= 0.97})
		}
	}
	if serve, ok := costs["serve"]; ok {
		for _, other := range []string{"tcpdump", "softflowd"} {
			oc, ok := costs[other]
			if !ok {
				continue
			}
			// What serve adds over what the other adds; +Inf when the
			// other adds nothing (no fraction of nothing is established).
			q := func(idx []int) float64 {
				o := tpMedian(pick(oc, idx)) - 1
				if o <= 0 {
					return math.Inf(1)
				}
				return (tpMedian(pick(serve, idx)) - 1) / o
			}
			all := make([]int, kept)
			for i := range all {
				all[i] = i
			}
			lo, hi := bootstrap(kept, B, seed+2, q)
			targets = append(targets, tpTarget{"serve (defaults) adds ≤ 1/3 of what " + other + " adds", q(all), lo, hi, "upper bound ≤ 0.333", hi <= 1.0/3})
		}
	}
	return res, targets, kept, dropped, constForeign
}

// tpTable formats the analysis as the Markdown tables of docs/BENCHMARKS.md.
func tpTable(ms []tpMeasure, seed int64) string {
	res, targets, kept, dropped, constForeign := tpAnalyze(ms, seed)
	var b strings.Builder
	fmt.Fprintf(&b, "%d rounds paired with none (%d of them with the same foreign observer in every variant); %d left out: a foreign observer that came, went or differed, or a failed window\n\n", kept, constForeign, dropped)
	b.WriteString("| observer | CPU per packet (median) | CPU per packet vs none: median [95 % CI] | saturation rate (median) | kept vs none: median [95 % CI] | fixed load delivered (worst round) |\n|---|---|---|---|---|---|\n")
	for _, t := range res {
		if t.variant == "none" {
			fmt.Fprintf(&b, "| none | %.0f ns | — | %.0f pkt/s | — | %.2f %% |\n", t.nsPerPkt, t.satPPS, 100*t.delivered)
			continue
		}
		fmt.Fprintf(&b, "| %s | %.0f ns | %+.1f %% [%+.1f, %+.1f] | %.0f pkt/s | %.1f %% [%.1f, %.1f] | %.2f %% |\n",
			t.variant, t.nsPerPkt, 100*(t.cost-1), 100*(t.costLo-1), 100*(t.costHi-1), t.satPPS, 100*t.sat, 100*t.satLo, 100*t.satHi, 100*t.delivered)
	}
	b.WriteString("\n| target (issue 17) | median | 95 % CI | met when | met |\n|---|---|---|---|---|\n")
	for _, t := range targets {
		met := "**no**"
		if t.met {
			met = "**yes**"
		}
		fmt.Fprintf(&b, "| %s | %.3g | [%.3g, %.3g] | %s | %s |\n", t.what, t.med, t.lo, t.hi, t.limit, met)
	}
	return b.String()
}

func envInt(name string, def int) int {
	if v, err := strconv.Atoi(os.Getenv(name)); err == nil && v > 0 {
		return v
	}
	return def
}

func envDuration(name string, def time.Duration) time.Duration {
	if v, err := time.ParseDuration(os.Getenv(name)); err == nil && v > 0 {
		return v
	}
	return def
}

// BenchmarkThroughput: the long form (make bench-throughput). Environment:
// NSFLOW_BENCH_TP_ROUNDS (20), NSFLOW_BENCH_TP_PPS (fixed load, 40000),
// NSFLOW_BENCH_TP_NAP (the paced sender's sleep between batches, 20µs),
// NSFLOW_BENCH_TP_BRACKET=1 (each saturation window between two with no
// observer, the ratio taken to their mean),
// NSFLOW_BENCH_TP_WINDOW (4s), NSFLOW_BENCH_TP_SAT (2s),
// NSFLOW_BENCH_TP_SEED (the time), NSFLOW_BENCH_TP_VARIANTS (a comma list of
// variants, diagnostic ones among them: serve-stopped, serve-nohost,
// tc-empty; default the six), NSFLOW_BENCH_TP_ANALYZE (a raw file:
// recompute its table, measure nothing).
func BenchmarkThroughput(b *testing.B) {
	seed := int64(envInt("NSFLOW_BENCH_TP_SEED", int(time.Now().Unix())))
	if f := os.Getenv("NSFLOW_BENCH_TP_ANALYZE"); f != "" {
		raw, err := os.Open(f)
		if err != nil {
			b.Fatal(err)
		}
		defer raw.Close()
		var ms []tpMeasure
		sc := bufio.NewScanner(raw)
		for sc.Scan() {
			if m, ok := parseTPLine(sc.Text()); ok {
				ms = append(ms, m)
			}
		}
		fmt.Print(tpTable(ms, seed))
		return
	}
	cfg := tpConfig{
		rounds:  envInt("NSFLOW_BENCH_TP_ROUNDS", 20),
		pps:     envInt("NSFLOW_BENCH_TP_PPS", 40000),
		nap:     envDuration("NSFLOW_BENCH_TP_NAP", 20*time.Microsecond),
		bracket: os.Getenv("NSFLOW_BENCH_TP_BRACKET") == "1",
		window:  envDuration("NSFLOW_BENCH_TP_WINDOW", 4*time.Second),
		sat:     envDuration("NSFLOW_BENCH_TP_SAT", 2*time.Second),
		warm:    time.Second,
		seed:    seed,
		subnet:  "10.213.151.0/24",
		prefix:  "bench-tp-",
	}
	ms := runThroughput(b, cfg, func(s string) { fmt.Println(s) })
	fmt.Print(tpTable(ms, seed))
	for _, t := range tpAnalyzeTargets(ms, seed) {
		b.Logf("%s: %.3g [%.3g, %.3g] (%s): met %v", t.what, t.med, t.lo, t.hi, t.limit, t.met)
	}
}

func tpAnalyzeTargets(ms []tpMeasure, seed int64) []tpTarget {
	_, t, _, _, _ := tpAnalyze(ms, seed)
	return t
}

// TestThroughputSmoke runs the throughput harness for one short round (part
// of make test): every variant starts, is seen attached (serve: its stubs
// on both pods' eth0 hooks and none on their host ends; the capture tools:
// a packet socket in each pod), traffic flows in both windows, CPU time is
// measured, and the raw lines parse back into the table. It asserts the
// harness, not the figures nor the targets.
func TestThroughputSmoke(t *testing.T) {
	cfg := tpConfig{rounds: 1, pps: 5000, window: 500 * time.Millisecond, sat: 300 * time.Millisecond,
		warm: 200 * time.Millisecond, seed: 1, subnet: "10.213.152.0/24", prefix: "bench-tps-", bracket: true}
	var lines []string
	ms := runThroughput(t, cfg, func(s string) { lines = append(lines, s); t.Log(s) })
	if len(ms) != len(tpVariants()) {
		t.Fatalf("%d measurements, want %d", len(ms), len(tpVariants()))
	}
	for _, m := range ms {
		// Measured figures, not asserted beyond being there: on a busy
		// machine the fixed load is not always delivered in full.
		if m.Sent == 0 || m.Delivered == 0 || m.SatDeliv == 0 {
			t.Errorf("%s: no traffic: fixed load %d sent, %d delivered; saturation %d delivered", m.Variant, m.Sent, m.Delivered, m.SatDeliv)
		}
		if m.SatBare <= 0 {
			t.Errorf("%s: no saturation rate measured without an observer around it", m.Variant)
		}
		if m.BusyS <= 0 || m.NsPerPkt <= 0 {
			t.Errorf("%s: no CPU time measured (%v s)", m.Variant, m.BusyS)
		}
		// The variant's own observers, as the harness counts them (a
		// foreign one, from a concurrent test, is reported, not failed).
		own := map[string]int{"serve": 4, "serve-flows": 4}[m.Variant]
		if m.Foreign == "" && m.PodProgs != own {
			t.Errorf("%s: %d programs on the pods' eth0, want %d", m.Variant, m.PodProgs, own)
		}
		if p, ok := parseTPLine(m.line()); !ok || p.line() != m.line() {
			t.Errorf("raw line does not parse back:\n%s\n%s", m.line(), p.line())
		}
	}
	// The table of these lines (a foreign observer, which the long form
	// leaves out, is kept here: the harness is checked, not the figures).
	var own []tpMeasure
	for _, l := range lines {
		if m, ok := parseTPLine(l); ok {
			m.Foreign = ""
			own = append(own, m)
		}
	}
	table := tpTable(own, 1)
	t.Log("\n" + table)
	if !strings.Contains(table, "| serve |") || !strings.Contains(table, "| pmacctd |") {
		t.Errorf("table without every variant:\n%s", table)
	}
}
