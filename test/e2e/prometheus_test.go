package e2e

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/crypto/bcrypt"

	"github.com/nsflow/nsflow/collector/flow"
	"github.com/nsflow/nsflow/test/testenv"
)

// A real Prometheus server (Debian's) scrapes the exporter, and a PromQL
// query through its HTTP API returns the pod's exact loopback count.
func TestPrometheusScrapes(t *testing.T) {
	testenv.RequireRoot(t)
	if _, err := exec.LookPath("prometheus"); err != nil {
		t.Fatalf("prometheus not installed (make deps): %v", err)
	}
	srv := startServe(t, "http", "--netns.host=false", "--netns.include", "^e2e-pr-")
	pods := newPods(t, "10.213.121.0/24", "e2e-pr-a")
	a := pods[0]
	waitUntil(t, 10*time.Second, "pod in /metrics", func() bool {
		s, _ := srv.scrape(t)
		_, ok := s[pointSeries("nsflow_packets_total", a.Name, "lo", "tx")]
		return ok
	})
	udpExchange(t, a, a, netip.MustParseAddrPort("127.0.0.1:9300"), 42, 10)
	paths := map[uint64]string{inodeOf(t, a): a.NetnsPath}
	kernel := kernelCounts(t, paths)[point{inodeOf(t, a), "lo", flow.TX}]

	dir := t.TempDir()
	promPort := freePort(t)
	cfg := fmt.Sprintf(`global:
  scrape_interval: 1s
scrape_configs:
  - job_name: nsflow
    static_configs:
      - targets: [%q]
`, strings.TrimPrefix(srv.url, "http://"))
	if err := os.WriteFile(filepath.Join(dir, "prometheus.yml"), []byte(cfg), 0o644); err != nil {
		t.Fatal(err)
	}
	prom := exec.Command("prometheus", "--config.file", filepath.Join(dir, "prometheus.yml"),
		"--storage.tsdb.path", filepath.Join(dir, "data"), "--web.listen-address", "127.0.0.1:"+strconv.Itoa(promPort))
	logf, _ := os.Create(filepath.Join(dir, "prometheus.log"))
	prom.Stdout, prom.Stderr = logf, logf
	if err := prom.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { prom.Process.Kill(); prom.Wait() })

	query := fmt.Sprintf(`nsflow_packets_total{job="nsflow",netns=%q,interface="lo",direction="tx"}`, a.Name)
	var got string
	waitUntil(t, 60*time.Second, "Prometheus to return the pod's count", func() bool {
		resp, err := http.Get(fmt.Sprintf("http://127.0.0.1:%d/api/v1/query?query=%s", promPort, url.QueryEscape(query)))
		if err != nil {
			return false
		}
		defer resp.Body.Close()
		var r struct {
			Status string
			Data   struct {
				Result []struct {
					Value [2]any
				}
			}
		}
		if json.NewDecoder(resp.Body).Decode(&r) != nil || r.Status != "success" || len(r.Data.Result) != 1 {
			return false
		}
		got, _ = r.Data.Result[0].Value[1].(string)
		return got == strconv.FormatUint(kernel.Packets, 10)
	})
	t.Logf("PromQL %s = %s, kernel lo tx_packets = %d", query, got, kernel.Packets)
}

// With a web config file, scrapes need TLS and basic auth (exporter-toolkit).
func TestServeTLSBasicAuth(t *testing.T) {
	testenv.RequireRoot(t)
	dir := t.TempDir()
	certFile, keyFile := filepath.Join(dir, "tls.crt"), filepath.Join(dir, "tls.key")
	writeSelfSigned(t, certFile, keyFile)
	hash, err := bcrypt.GenerateFromPassword([]byte("s3cret"), bcrypt.MinCost)
	if err != nil {
		t.Fatal(err)
	}
	webCfg := filepath.Join(dir, "web.yml")
	if err := os.WriteFile(webCfg, []byte(fmt.Sprintf("tls_server_config:\n  cert_file: %s\n  key_file: %s\nbasic_auth_users:\n  prom: %s\n", certFile, keyFile, hash)), 0o600); err != nil {
		t.Fatal(err)
	}
	srv := startServeAuth(t, webCfg)

	srv.user, srv.pass = "", ""
	if code, _ := srv.get("/metrics"); code != http.StatusUnauthorized {
		t.Errorf("no credentials: status %d, want 401", code)
	}
	srv.user, srv.pass = "prom", "wrong"
	if code, _ := srv.get("/metrics"); code != http.StatusUnauthorized {
		t.Errorf("wrong password: status %d, want 401", code)
	}
	srv.user, srv.pass = "prom", "s3cret"
	code, body := srv.get("/metrics")
	if code != http.StatusOK || !strings.Contains(body, "nsflow_attachments") {
		t.Errorf("with credentials: status %d, body without nsflow metrics", code)
	}
	plain := &http.Client{Timeout: 5 * time.Second}
	if resp, err := plain.Get(strings.Replace(srv.url, "https://", "http://", 1) + "/metrics"); err == nil {
		if resp.StatusCode == http.StatusOK {
			t.Error("plain HTTP served metrics despite TLS")
		}
		resp.Body.Close()
	}
}

// startServeAuth starts serve with a web config and waits using credentials.
func startServeAuth(t *testing.T, webCfg string) *server {
	t.Helper()
	port := freePort(t)
	cmd := exec.Command(nsflowBin, "serve", "--web.listen-address", "127.0.0.1:"+strconv.Itoa(port),
		"--web.config.file", webCfg, "--netns.host=false", "--netns.proc=false", "--netns.include", "^e2e-none$")
	logf, _ := os.Create(filepath.Join(t.TempDir(), "serve.log"))
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	s := &server{cmd: cmd, url: fmt.Sprintf("https://127.0.0.1:%d", port), log: logf, user: "prom", pass: "s3cret",
		client: startServeClient()}
	t.Cleanup(func() { s.stop(t) })
	waitUntil(t, 20*time.Second, "serve ready over TLS", func() bool {
		code, _ := s.get("/-/ready")
		return code == http.StatusOK
	})
	return s
}

func writeSelfSigned(t *testing.T, certFile, keyFile string) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1),
		Subject:      pkix.Name{CommonName: "nsflow-test"},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(time.Hour),
		IPAddresses:  []net.IP{net.ParseIP("127.0.0.1")},
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	kb, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kb}), 0o600); err != nil {
		t.Fatal(err)
	}
}
