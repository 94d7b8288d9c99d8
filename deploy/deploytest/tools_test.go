package deploytest

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"sigs.k8s.io/yaml"
)

// requireRoot: privileged tests skip without root, but fail under CI.
func requireRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() == 0 {
		return
	}
	if os.Getenv("CI") == "true" {
		t.Fatal("privileged test needs root, and CI=true forbids skipping it")
	}
	t.Skip("needs root")
}

func need(t *testing.T, tool string) string {
	t.Helper()
	p, err := exec.LookPath(tool)
	if err != nil {
		t.Fatalf("%s not installed (make deps): %v", tool, err)
	}
	return p
}

func TestPrometheusFiles(t *testing.T) {
	promtool := need(t, "promtool")
	for _, args := range [][]string{
		{"check", "rules", "../prometheus/rules.yml"},
		{"check", "config", "../prometheus/prometheus-static.yml"},
	} {
		if out, err := exec.Command(promtool, args...).CombinedOutput(); err != nil {
			t.Errorf("promtool %v: %v\n%s", args, err, out)
		}
	}
	// Debian's Prometheus is built without Kubernetes service discovery, so
	// its promtool cannot check kubernetes_sd_configs: check that file's
	// structure strictly, and its rule_files and relabelling with promtool
	// on a copy whose discovery is static.
	b, err := os.ReadFile("../prometheus/scrape-kubernetes.yml")
	if err != nil {
		t.Fatal(err)
	}
	var cfg struct {
		ScrapeConfigs []struct {
			JobName             string `json:"job_name"`
			HonorLabels         bool   `json:"honor_labels"`
			KubernetesSDConfigs []struct {
				Role string `json:"role"`
			} `json:"kubernetes_sd_configs"`
			RelabelConfigs []struct {
				SourceLabels []string `json:"source_labels"`
				Regex        string   `json:"regex"`
				Action       string   `json:"action"`
				TargetLabel  string   `json:"target_label"`
			} `json:"relabel_configs"`
		} `json:"scrape_configs"`
		RuleFiles []string `json:"rule_files"`
	}
	if err := yaml.UnmarshalStrict(b, &cfg); err != nil {
		t.Fatalf("scrape-kubernetes.yml: %v", err)
	}
	sc := cfg.ScrapeConfigs[0]
	if !sc.HonorLabels || len(sc.KubernetesSDConfigs) != 1 || sc.KubernetesSDConfigs[0].Role != "pod" {
		t.Errorf("scrape-kubernetes.yml: want honor_labels and pod discovery: %+v", sc)
	}
	static := strings.Replace(string(b), "kubernetes_sd_configs:\n      - role: pod", "static_configs:\n      - targets: [\"localhost:9990\"]", 1)
	path := filepath.Join("../prometheus", ".check-kubernetes.yml")
	if err := os.WriteFile(path, []byte(static), 0o644); err != nil {
		t.Fatal(err)
	}
	defer os.Remove(path)
	if out, err := exec.Command(promtool, "check", "config", path).CombinedOutput(); err != nil {
		t.Errorf("promtool check config (kubernetes file, static discovery): %v\n%s", err, out)
	}
}

// Every PromQL expression of the dashboard parses: each becomes a recording
// rule that promtool checks.
func TestDashboardQueries(t *testing.T) {
	promtool := need(t, "promtool")
	b, err := os.ReadFile("../grafana/nsflow-dashboard.json")
	if err != nil {
		t.Fatal(err)
	}
	var dash struct {
		Panels []struct {
			Title   string
			Targets []struct{ Expr string }
		}
	}
	if err := json.Unmarshal(b, &dash); err != nil {
		t.Fatal(err)
	}
	// Grafana variables are substituted as a regex would be.
	vars := strings.NewReplacer("$instance", ".*", "$netns", ".*")
	var rules strings.Builder
	rules.WriteString("groups:\n  - name: dashboard\n    rules:\n")
	n := 0
	for _, p := range dash.Panels {
		for _, tg := range p.Targets {
			n++
			q, _ := json.Marshal(vars.Replace(tg.Expr))
			fmt.Fprintf(&rules, "      - record: dashboard:query%d\n        expr: %s\n", n, q)
		}
	}
	if n < 5 {
		t.Fatalf("only %d queries in the dashboard", n)
	}
	path := filepath.Join(t.TempDir(), "dashboard-rules.yml")
	if err := os.WriteFile(path, []byte(rules.String()), 0o644); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command(promtool, "check", "rules", path).CombinedOutput(); err != nil {
		t.Errorf("dashboard queries do not parse: %v\n%s", err, out)
	}
}

// buildNsflow returns a copy of its own of the binary built from the
// repository's main module (built once per package run: buildOnce).
func buildNsflow(t *testing.T) string {
	t.Helper()
	return copyOf(t, buildOnce(t, "nsflow", "./cmd/nsflow"), t.TempDir(), "nsflow")
}

// unitCapabilities reads the capability set of the systemd unit.
func unitCapabilities(t *testing.T) []string {
	t.Helper()
	b, err := os.ReadFile("../systemd/nsflow.service")
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`(?m)^CapabilityBoundingSet=(.*)$`).FindSubmatch(b)
	if m == nil {
		t.Fatal("no CapabilityBoundingSet in the unit")
	}
	return strings.Fields(string(m[1]))
}

func TestSystemdUnitVerifies(t *testing.T) {
	analyze := need(t, "systemd-analyze")
	bin := buildNsflow(t)
	b, err := os.ReadFile("../systemd/nsflow.service")
	if err != nil {
		t.Fatal(err)
	}
	unit := filepath.Join(t.TempDir(), "nsflow.service")
	// The unit names /usr/local/bin/nsflow; verify it against the one built.
	if err := os.WriteFile(unit, []byte(strings.ReplaceAll(string(b), "/usr/local/bin/nsflow", bin)), 0o644); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command(analyze, "verify", "--man=no", unit).CombinedOutput()
	if err != nil || len(strings.TrimSpace(string(out))) > 0 {
		t.Errorf("systemd-analyze verify: %v\n%s", err, out)
	}
}

func freePort(t *testing.T) int {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// withCaps runs nsflow with exactly the given capabilities as its bounding
// set (as systemd's CapabilityBoundingSet does for a root service).
func withCaps(bin string, caps []string, args ...string) *exec.Cmd {
	var set []string
	for _, c := range caps {
		set = append(set, "+"+strings.ToLower(strings.TrimPrefix(c, "CAP_")))
	}
	bounding := "-all," + strings.Join(set, ",")
	return exec.Command("setpriv", append([]string{"--bounding-set", bounding, "--inh-caps", bounding, bin}, args...)...)
}

func loTx(t *testing.T, pod string) uint64 {
	t.Helper()
	out, err := exec.Command("ip", "-n", pod, "-s", "-j", "link", "show", "lo").Output()
	if err != nil {
		t.Fatal(err)
	}
	var l []struct {
		Stats64 struct {
			Tx struct{ Packets uint64 } `json:"tx"`
		} `json:"stats64"`
	}
	if err := json.Unmarshal(out, &l); err != nil || len(l) != 1 {
		t.Fatalf("ip -j: %v %s", err, out)
	}
	return l[0].Stats64.Tx.Packets
}

// nsflow runs under the unit's capability set, and exports exact counts;
// with one capability less it fails, naming it.
func TestRunsWithUnitCapabilities(t *testing.T) {
	requireRoot(t)
	need(t, "setpriv")
	bin := buildNsflow(t)
	caps := unitCapabilities(t)
	const pod = "deploy-caps"
	if out, err := exec.Command(bin, "pod", "create", pod, "--subnet", "10.213.160.0/24").CombinedOutput(); err != nil {
		t.Fatalf("pod create: %v\n%s", err, out)
	}
	t.Cleanup(func() { exec.Command(bin, "pod", "delete", pod).Run() })

	port := freePort(t)
	srv := withCaps(bin, caps, "serve", "--web.listen-address", "127.0.0.1:"+strconv.Itoa(port),
		"--netns.host=false", "--netns.proc=false", "--netns.include", "^"+pod+"$")
	srv.Stderr = os.Stderr
	if err := srv.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Process.Signal(syscall.SIGTERM); srv.Wait() })
	scrape := func() map[string]string {
		resp, err := http.Get(fmt.Sprintf("http://127.0.0.1:%d/metrics", port))
		if err != nil {
			return nil
		}
		defer resp.Body.Close()
		m := map[string]string{}
		s := bufio.NewScanner(resp.Body)
		s.Buffer(make([]byte, 1<<20), 1<<20)
		for s.Scan() {
			if i := strings.LastIndexByte(s.Text(), ' '); i > 0 && !strings.HasPrefix(s.Text(), "#") {
				m[s.Text()[:i]] = s.Text()[i+1:]
			}
		}
		return m
	}
	series := fmt.Sprintf(`nsflow_packets_total{direction="tx",interface="lo",namespace="",netns=%q,pod=""}`, pod)
	deadline := time.Now().Add(15 * time.Second)
	for scrape()[series] == "" {
		if time.Now().After(deadline) {
			t.Fatal("serve under the unit's capabilities never exported the pod")
		}
		time.Sleep(20 * time.Millisecond)
	}
	if out, err := exec.Command(bin, "pod", "exec", pod, "--", "ping", "-c", "3", "-i", "0.05", "127.0.0.1").CombinedOutput(); err != nil {
		t.Fatalf("ping: %v\n%s", err, out)
	}
	// lo is quiet otherwise: nsflow's count (attached since before the
	// pings) equals the kernel's, less what lo carried before the attach.
	var got string
	deadline = time.Now().Add(5 * time.Second)
	want := loTx(t, pod)
	for {
		got = scrape()[series]
		if got == strconv.FormatUint(want, 10) || time.Now().After(deadline) {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if got != strconv.FormatUint(want, 10) {
		t.Errorf("lo tx: /metrics %s, kernel %d", got, want)
	}

	for _, missing := range caps {
		var fewer []string
		for _, c := range caps {
			if c != missing {
				fewer = append(fewer, c)
			}
		}
		if missing == "CAP_SYS_PTRACE" {
			// Not needed to start: nsflow runs, says what it cannot read
			// without it, and counts it (test/e2e TestCapsObserveOtherUser
			// shows what it then misses).
			withoutPtrace(t, bin, fewer)
			continue
		}
		cmd := withCaps(bin, fewer, "serve", "--web.listen-address", "127.0.0.1:"+strconv.Itoa(freePort(t)))
		out, err := cmd.CombinedOutput()
		var ee *exec.ExitError
		if !errors.As(err, &ee) || !strings.Contains(string(out), missing) {
			t.Errorf("without %s: %v, message %q does not name it", missing, err, out)
		}
	}
}

// withoutPtrace runs serve with caps (the unit's without CAP_SYS_PTRACE):
// it starts, warns naming CAP_SYS_PTRACE, and counts the processes whose
// namespace it may not read (this test's own shell, root with every
// capability, is one) in nsflow_namespaces_skipped_total.
func withoutPtrace(t *testing.T, bin string, caps []string) {
	t.Helper()
	port := freePort(t)
	logf, err := os.Create(filepath.Join(t.TempDir(), "serve.log"))
	if err != nil {
		t.Fatal(err)
	}
	defer logf.Close()
	srv := withCaps(bin, caps, "serve", "--web.listen-address", "127.0.0.1:"+strconv.Itoa(port), "--netns.host=false")
	srv.Stdout, srv.Stderr = logf, logf
	if err := srv.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { srv.Process.Signal(syscall.SIGTERM); srv.Wait() }()
	re := regexp.MustCompile(`(?m)^nsflow_namespaces_skipped_total\{reason="permission"\} ([0-9]+)$`)
	deadline := time.Now().Add(15 * time.Second)
	for {
		var n int
		if resp, err := http.Get(fmt.Sprintf("http://127.0.0.1:%d/metrics", port)); err == nil {
			b := new(strings.Builder)
			_, _ = bufio.NewReader(resp.Body).WriteTo(b)
			resp.Body.Close()
			if m := re.FindStringSubmatch(b.String()); m != nil {
				n, _ = strconv.Atoi(m[1])
			}
		}
		if n > 0 {
			break
		}
		if time.Now().After(deadline) {
			log, _ := os.ReadFile(logf.Name())
			t.Fatalf("without CAP_SYS_PTRACE: no namespace counted as skipped for permission:\n%s", log)
		}
		time.Sleep(50 * time.Millisecond)
	}
	if log, _ := os.ReadFile(logf.Name()); !strings.Contains(string(log), "without CAP_SYS_PTRACE") {
		t.Errorf("without CAP_SYS_PTRACE: the log does not name it:\n%s", log)
	}
}
