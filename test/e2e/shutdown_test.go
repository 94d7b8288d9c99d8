package e2e

import (
	"net"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nsflow/nsflow/test/testenv"
)

// A client that connected and never finished a request (a TCP probe, an
// HTTP client's spare dial, a slow client) is open when serve gets
// SIGTERM: serve still exits 0, within its shutdown bound, having logged
// that it closed the connection. (net/http counts a connection that sent
// nothing busy for 5 s, which once made serve exit 1 at the end of
// TestFlood.)
func TestShutdownWithSilentConnection(t *testing.T) {
	testenv.RequireRoot(t)
	srv := startServe(t, "http", "--netns.host=false", "--netns.proc=false", "--netns.include", "^e2e-none$")
	conn, err := net.Dial("tcp", strings.TrimPrefix(srv.url, "http://"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	// Half a request: the connection is busy (net/http counts one that
	// sent nothing as idle once it is 5-6 s old, which could come first).
	if _, err := conn.Write([]byte("GET /metrics HTTP/1.1\r\n")); err != nil {
		t.Fatal(err)
	}
	time.Sleep(100 * time.Millisecond) // accepted and read by serve
	begin := time.Now()
	srv.cmd.Process.Signal(syscall.SIGTERM)
	done := make(chan error, 1)
	go func() { done <- srv.cmd.Wait() }()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("serve exited with %v on SIGTERM with a silent connection open; log:\n%s", err, srv.logText())
		}
	case <-time.After(15 * time.Second):
		srv.cmd.Process.Kill()
		<-done
		t.Fatalf("serve did not exit 15s after SIGTERM; log:\n%s", srv.logText())
	}
	t.Logf("serve exited 0 %s after SIGTERM", time.Since(begin).Round(time.Millisecond))
	if !strings.Contains(srv.logText(), "closing connections still open at shutdown") {
		t.Errorf("serve did not log the connection it closed; log:\n%s", srv.logText())
	}
	// The connection was closed by serve, not left to the test.
	conn.SetReadDeadline(time.Now().Add(2 * time.Second))
	if n, err := conn.Read(make([]byte, 1)); err == nil {
		t.Errorf("the silent connection still open after serve exited (read %d bytes)", n)
	}
}
