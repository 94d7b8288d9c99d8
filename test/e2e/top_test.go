package e2e

import (
	"bytes"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/nsflow/nsflow/test/testenv"
)

func tmux(t *testing.T, args ...string) string {
	t.Helper()
	out, err := exec.Command("tmux", args...).CombinedOutput()
	if err != nil {
		t.Fatalf("tmux %v: %v\n%s", args, err, out)
	}
	return string(out)
}

// `nsflow top` without arguments in a real terminal (tmux): it shows every
// namespace, the pods among them with their
// traffic, a key changes the sort, q quits and leaves nothing attached.
func TestTopInTerminal(t *testing.T) {
	testenv.RequireRoot(t)
	if _, err := exec.LookPath("tmux"); err != nil {
		t.Fatalf("tmux not installed (make deps): %v", err)
	}
	pods := newPods(t, "10.213.124.0/24", "e2e-tp-a", "e2e-tp-b")
	a, b := pods[0], pods[1]
	const session = "nsflow-e2e-top"
	exec.Command("tmux", "kill-session", "-t", session).Run()
	tmux(t, "new-session", "-d", "-s", session, "-x", "200", "-y", "50",
		nsflowBin+" top --interval 300ms") // no selection: every namespace
	t.Cleanup(func() { exec.Command("tmux", "kill-session", "-t", session).Run() })

	screen := ""
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("last screen:\n%s", screen)
		}
	})
	waitUntil(t, 30*time.Second, "top to show both pods", func() bool {
		screen = tmux(t, "capture-pane", "-p", "-t", session)
		return strings.Contains(screen, "e2e-tp-a") && strings.Contains(screen, "e2e-tp-b") && strings.Contains(screen, "sort: rate")
	})
	ping := exec.Command("ping", "-c", "150", "-i", "0.1", "-W", "1", b.IPv4.String())
	if err := a.Start(ping); err != nil {
		t.Fatal(err)
	}
	defer func() { ping.Process.Kill(); ping.Wait() }()
	// Every namespace is shown, so the node's own flows (anything on the
	// host's lo) compete for the screen: the filter key narrows the flows
	// to the ping.
	tmux(t, "send-keys", "-t", session, "/")
	tmux(t, "send-keys", "-t", session, "C-u", "icmp and host "+b.IPv4.String(), "Enter")
	waitUntil(t, 15*time.Second, "top to show the ping flow", func() bool {
		screen = tmux(t, "capture-pane", "-p", "-t", session)
		return strings.Contains(screen, a.IPv4.String()) && strings.Contains(screen, "icmp")
	})
	tmux(t, "send-keys", "-t", session, "s")
	waitUntil(t, 5*time.Second, "the sort to change", func() bool {
		screen = tmux(t, "capture-pane", "-p", "-t", session)
		return strings.Contains(screen, "sort: packet-rate")
	})
	if n := hookPrograms(t, a); n != 4 {
		t.Errorf("%d programs on pod a's hooks while top runs, want 4", n)
	}
	tmux(t, "send-keys", "-t", session, "q")
	waitUntil(t, 10*time.Second, "top to quit", func() bool {
		return exec.Command("tmux", "has-session", "-t", session).Run() != nil
	})
	if n := hookPrograms(t, a) + hookPrograms(t, b); n != 0 {
		t.Errorf("%d programs left on the hooks after q", n)
	}
}

// Without a terminal, top prints trace-style interval tables.
func TestTopWithoutTerminal(t *testing.T) {
	testenv.RequireRoot(t)
	pods := newPods(t, "10.213.125.0/24", "e2e-tn-a")
	cmd := exec.Command(nsflowBin, "top", "--netns", pods[0].Name, "--interval", "200ms")
	var out lockedBuffer
	cmd.Stdout = &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, 10*time.Second, "two interval tables", func() bool {
		return strings.Count(out.String(), "RX PACKETS") >= 2
	})
	cmd.Process.Signal(syscall.SIGTERM)
	if err := cmd.Wait(); err != nil {
		t.Fatalf("top: %v", err)
	}
	if !strings.Contains(out.String(), "e2e-tn-a") || strings.Contains(out.String(), "\x1b[") {
		t.Errorf("plain output expected:\n%s", out.String())
	}
}

// lockedBuffer is a bytes.Buffer safe to read while a process writes it.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}
