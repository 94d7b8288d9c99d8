// Package e2e holds nsflow's end-to-end tests: pods created with the
// project's own pod builder (test/podns), real traffic between and inside
// them, and nsflow's counts compared exactly with independent oracles (the
// kernel's interface counters, the traffic the test itself sent).
package e2e

import (
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// nsflowBin is the nsflow binary built once for the CLI tests.
var nsflowBin string

// Environment variables that turn the test binary into a helper process: a
// "container" started inside a pod namespace (see helperMain).
const (
	roleEnv = "NSFLOW_E2E_ROLE"
	argsEnv = "NSFLOW_E2E_ARGS"
)

func TestMain(m *testing.M) {
	if role := os.Getenv(roleEnv); role != "" {
		os.Exit(helperMain(role, os.Getenv(argsEnv)))
	}
	dir, err := os.MkdirTemp("", "nsflow-e2e-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	nsflowBin = filepath.Join(dir, "nsflow")
	out, err := exec.Command("go", "build", "-o", nsflowBin, "github.com/nsflow/nsflow/cmd/nsflow").CombinedOutput()
	if err != nil {
		fmt.Fprintf(os.Stderr, "build nsflow: %v\n%s", err, out)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// helperCmd returns a command that runs this test binary as a helper process.
func helperCmd(role string, args ...string) *exec.Cmd {
	cmd := exec.Command(os.Args[0])
	cmd.Env = append(os.Environ(), roleEnv+"="+role, argsEnv+"="+strings.Join(args, " "))
	cmd.Stderr = os.Stderr
	return cmd
}

// helperMain runs one helper role and returns the process's exit status.
//
//	tcp-sink ADDR          accept one connection on ADDR, read to EOF, print the byte count
//	tcp-send ADDR BYTES    connect to ADDR, write BYTES bytes, close
//	udp-send ADDR N SIZE   send N datagrams of SIZE bytes to ADDR, 2 ms apart
func helperMain(role, argstr string) int {
	args := strings.Fields(argstr)
	fail := func(err error) int {
		fmt.Fprintf(os.Stderr, "helper %s: %v\n", role, err)
		return 1
	}
	deadline := time.Now().Add(20 * time.Second) // every helper is bounded in time
	switch role {
	case "tcp-sink":
		ln, err := net.Listen("tcp", args[0])
		if err != nil {
			return fail(err)
		}
		fmt.Println("listening") // the parent waits for this line
		ln.(*net.TCPListener).SetDeadline(deadline)
		c, err := ln.Accept()
		if err != nil {
			return fail(err)
		}
		c.SetDeadline(deadline)
		buf := make([]byte, 64<<10)
		var n int64
		for {
			k, err := c.Read(buf)
			n += int64(k)
			if err != nil {
				break
			}
		}
		c.Close()
		fmt.Println(n)
		return 0
	case "tcp-send":
		total, _ := strconv.Atoi(args[1])
		c, err := net.DialTimeout("tcp", args[0], 5*time.Second)
		if err != nil {
			return fail(err)
		}
		c.SetDeadline(deadline)
		buf := make([]byte, 32<<10)
		for total > 0 {
			k := min(total, len(buf))
			if _, err := c.Write(buf[:k]); err != nil {
				return fail(err)
			}
			total -= k
		}
		if err := c.Close(); err != nil {
			return fail(err)
		}
		return 0
	case "udp-send":
		n, _ := strconv.Atoi(args[1])
		size, _ := strconv.Atoi(args[2])
		c, err := net.Dial("udp", args[0])
		if err != nil {
			return fail(err)
		}
		payload := make([]byte, size)
		for i := 0; i < n && time.Now().Before(deadline); i++ {
			if _, err := c.Write(payload); err != nil {
				return fail(err)
			}
			time.Sleep(2 * time.Millisecond)
		}
		return 0
	}
	if fn, ok := extraRoles[role]; ok {
		return fn(args)
	}
	return fail(fmt.Errorf("unknown role"))
}
