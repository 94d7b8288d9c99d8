package e2e

import (
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
)

// freePort returns a TCP port on 127.0.0.1 that was free a moment ago.
func freePort(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// server is a running `nsflow serve`.
type server struct {
	cmd    *exec.Cmd
	url    string
	client *http.Client
	user   string
	pass   string
	log    *os.File
}

// startServe runs `nsflow serve` on a free loopback port with extra flags,
// waits until it is ready and stops it (SIGTERM, which must exit 0) when the
// test ends.
func startServe(t *testing.T, scheme string, args ...string) *server {
	t.Helper()
	return startServeWithin(t, 20*time.Second, scheme, args...)
}

// startServeWithin is startServe waiting up to ready for readiness (serve
// observing every namespace of a node busy with other tests' pods).
func startServeWithin(t *testing.T, ready time.Duration, scheme string, args ...string) *server {
	t.Helper()
	port := freePort(t)
	logf, err := os.Create(filepath.Join(t.TempDir(), "serve.log"))
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(nsflowBin, append([]string{"serve", "--web.listen-address", "127.0.0.1:" + strconv.Itoa(port), "--log.level", "debug"}, args...)...)
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	s := &server{cmd: cmd, url: fmt.Sprintf("%s://127.0.0.1:%d", scheme, port), log: logf, client: startServeClient()}
	t.Cleanup(func() { s.stop(t) })
	waitUntil(t, ready, "serve ready", func() bool {
		code, _ := s.get("/-/ready")
		return code == http.StatusOK
	})
	return s
}

func (s *server) stop(t *testing.T) {
	t.Helper()
	if s.cmd.ProcessState != nil {
		return
	}
	s.cmd.Process.Signal(syscall.SIGTERM)
	done := make(chan error, 1)
	go func() { done <- s.cmd.Wait() }()
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("serve exited with %v on SIGTERM; log:\n%s", err, s.logText())
		}
	case <-time.After(15 * time.Second):
		s.cmd.Process.Kill()
		<-done
		t.Errorf("serve did not exit on SIGTERM; log:\n%s", s.logText())
	}
}

func (s *server) logText() string {
	b, _ := os.ReadFile(s.log.Name())
	return string(b)
}

func (s *server) get(path string) (int, string) {
	req, _ := http.NewRequest(http.MethodGet, s.url+path, nil)
	if s.user != "" {
		req.SetBasicAuth(s.user, s.pass)
	}
	resp, err := s.client.Do(req)
	if err != nil {
		return 0, err.Error()
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// samples is a scrape: series (name{labels} in Prometheus' canonical form)
// to value.
type samples map[string]float64

func (s *server) scrape(t *testing.T) (samples, string) {
	t.Helper()
	out, body := s.scrape0()
	if out == nil {
		t.Fatalf("scrape failed: %s", body)
	}
	return out, body
}

// scrape0 scrapes; it returns nil samples (and the reason) when the server
// does not answer or answers garbage.
func (s *server) scrape0() (samples, string) {
	code, body := s.get("/metrics")
	if code != http.StatusOK {
		return nil, fmt.Sprintf("status %d: %s", code, body)
	}
	p := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := p.TextToMetricFamilies(strings.NewReader(body))
	if err != nil {
		return nil, err.Error()
	}
	out := samples{}
	for name, f := range fams {
		for _, m := range f.Metric {
			out[series(name, m)] = value(m)
		}
	}
	return out, body
}

func series(name string, m *dto.Metric) string {
	ls := model.LabelSet{}
	for _, l := range m.Label {
		if l.GetValue() != "" { // an empty label is no label (Prometheus drops it)
			ls[model.LabelName(l.GetName())] = model.LabelValue(l.GetValue())
		}
	}
	return name + ls.String()
}

func value(m *dto.Metric) float64 {
	switch {
	case m.Counter != nil:
		return m.Counter.GetValue()
	case m.Gauge != nil:
		return m.Gauge.GetValue()
	case m.Untyped != nil:
		return m.Untyped.GetValue()
	}
	return 0
}

// pointSeries is the series of one observation point's counter.
func pointSeries(metric, netns, iface, dir string) string {
	return metric + model.LabelSet{"direction": model.LabelValue(dir), "interface": model.LabelValue(iface), "netns": model.LabelValue(netns)}.String()
}

// waitUntil polls cond (the state of a process under test, not the kernel's
// timing) until it holds or the timeout passes.
func waitUntil(t *testing.T, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", timeout, what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// fds lists the targets of a process's open file descriptors.
func fds(t *testing.T, pid int) []string {
	t.Helper()
	dir := fmt.Sprintf("/proc/%d/fd", pid)
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, e := range ents {
		if target, err := os.Readlink(filepath.Join(dir, e.Name())); err == nil {
			out = append(out, target)
		}
	}
	return out
}

func countFDs(list []string, substr string) int {
	n := 0
	for _, f := range list {
		if strings.Contains(f, substr) {
			n++
		}
	}
	return n
}

// startServeClient is an HTTP client for the test's own self-signed server.
func startServeClient() *http.Client {
	return &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}}}
}
