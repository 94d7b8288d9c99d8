package bench

import (
	"encoding/json"
	"fmt"
	"os/exec"
	"sort"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nsflow/nsflow/collector"
	"github.com/nsflow/nsflow/test/podns"
	"github.com/nsflow/nsflow/test/testenv"
)

// observer is one way of watching the two pods' traffic: nothing, nsflow,
// or the tools users reach for instead.
type observer struct {
	name  string
	start func(b *testing.B, pods []*podns.Pod) (stop func())
}

// inPods starts the command line cmd (one per pod) inside each pod.
func inPods(b *testing.B, pods []*podns.Pod, argv ...string) func() {
	var cmds []*exec.Cmd
	for _, p := range pods {
		cmd := exec.Command(argv[0], argv[1:]...)
		if err := p.Start(cmd); err != nil {
			b.Fatalf("%v: %v", argv, err)
		}
		cmds = append(cmds, cmd)
	}
	time.Sleep(300 * time.Millisecond) // let the capture start (these tools report no readiness)
	return func() {
		for _, c := range cmds {
			c.Process.Signal(syscall.SIGTERM)
			done := make(chan struct{})
			go func() { c.Wait(); close(done) }()
			select {
			case <-done:
			case <-time.After(3 * time.Second):
				c.Process.Kill()
				<-done
			}
		}
	}
}

// iperf runs one iperf3 test from pod a to pod b and returns packets/s
// (UDP) or bits/s (TCP) as the receiver measured them.
func iperf(b *testing.B, a, bb *podns.Pod, udp bool) float64 {
	srv := exec.Command("iperf3", "--server", "--one-off", "--bind", bb.IPv4.String(), "--port", "5301")
	if err := bb.Start(srv); err != nil {
		b.Fatal(err)
	}
	defer func() { srv.Process.Kill(); srv.Wait() }()
	time.Sleep(200 * time.Millisecond)
	args := []string{"--client", bb.IPv4.String(), "--port", "5301", "--time", "2", "--json"}
	if udp {
		args = append(args, "--udp", "--length", "64", "--bitrate", "0")
	}
	cl := exec.Command("iperf3", args...)
	var out strings.Builder
	cl.Stdout = &out
	if err := a.Start(cl); err != nil {
		b.Fatal(err)
	}
	if err := cl.Wait(); err != nil {
		b.Fatalf("iperf3: %v\n%s", err, out.String())
	}
	var r struct {
		End struct {
			Sum struct {
				Packets     float64 `json:"packets"`
				LostPackets float64 `json:"lost_packets"`
				Seconds     float64 `json:"seconds"`
			} `json:"sum"`
			SumReceived struct {
				BitsPerSecond float64 `json:"bits_per_second"`
			} `json:"sum_received"`
		} `json:"end"`
	}
	if err := json.Unmarshal([]byte(out.String()), &r); err != nil {
		b.Fatalf("iperf3 output: %v", err)
	}
	if udp {
		return (r.End.Sum.Packets - r.End.Sum.LostPackets) / r.End.Sum.Seconds
	}
	return r.End.SumReceived.BitsPerSecond
}

// BenchmarkThroughput: small-packet UDP (64-byte payload, packets/s
// received) and TCP bulk (bits/s) between two pods over the bridge, with
// each observer watching both pods, interleaved over rounds; each figure is
// the median of its rounds, reported as a ratio to no observer.
func BenchmarkThroughput(b *testing.B) {
	testenv.RequireRoot(b)
	for _, tool := range []string{"iperf3", "tcpdump", "softflowd", "pmacctd"} {
		if _, err := exec.LookPath(tool); err != nil {
			b.Fatalf("%s not installed (make bench-deps)", tool)
		}
	}
	pods := newPods(b, "10.213.151.0/24", "bench-tp-a", "bench-tp-b")
	observers := []observer{
		{"none", func(*testing.B, []*podns.Pod) func() { return func() {} }},
		{"nsflow", func(b *testing.B, pods []*podns.Pod) func() {
			c, err := collector.New(collector.Config{})
			if err != nil {
				b.Fatal(err)
			}
			for _, p := range pods {
				if _, err := c.Add(collector.Target{Name: p.Name, Path: p.NetnsPath}); err != nil {
					b.Fatal(err)
				}
			}
			return func() { c.Close() }
		}},
		{"tcpdump", func(b *testing.B, pods []*podns.Pod) func() {
			return inPods(b, pods, "tcpdump", "-i", "eth0", "-w", "/dev/null", "-s", "96", "-q")
		}},
		{"softflowd", func(b *testing.B, pods []*podns.Pod) func() {
			return inPods(b, pods, "softflowd", "-d", "-i", "eth0", "-n", "127.0.0.1:9995")
		}},
		{"pmacctd", func(b *testing.B, pods []*podns.Pod) func() {
			return inPods(b, pods, "pmacctd", "-i", "eth0", "-c", "src_host,dst_host,proto,src_port,dst_port", "-P", "memory")
		}},
	}
	results := map[string][]float64{}
	for r := 0; r < 5; r++ {
		for k := range observers {
			o := observers[(k+r)%len(observers)]
			stop := o.start(b, pods)
			results[o.name+"/udp64_pps"] = append(results[o.name+"/udp64_pps"], iperf(b, pods[0], pods[1], true))
			results[o.name+"/tcp_bps"] = append(results[o.name+"/tcp_bps"], iperf(b, pods[0], pods[1], false))
			stop()
		}
	}
	med := func(v []float64) float64 {
		s := append([]float64(nil), v...)
		sort.Float64s(s)
		return s[len(s)/2]
	}
	for _, test := range []string{"udp64_pps", "tcp_bps"} {
		base := med(results["none/"+test])
		b.ReportMetric(base, "none_"+test)
		for _, o := range observers[1:] {
			b.ReportMetric(100*med(results[o.name+"/"+test])/base, "%kept_"+o.name+"_"+test)
		}
	}
	fmt.Printf("throughput rounds: %v\n", results)
}
