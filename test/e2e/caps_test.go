package e2e

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/nsflow/nsflow/collector"
	"github.com/nsflow/nsflow/collector/flow"
	"github.com/nsflow/nsflow/test/testenv"
)

// documentedCaps is the capability set nsflow is deployed with: the systemd
// unit's (deploy/deploytest checks that the DaemonSet adds the same).
func documentedCaps(t *testing.T) []string {
	t.Helper()
	b, err := os.ReadFile("../../deploy/systemd/nsflow.service")
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`(?m)^CapabilityBoundingSet=(.*)$`).FindSubmatch(b)
	if m == nil {
		t.Fatal("no CapabilityBoundingSet in the unit")
	}
	return strings.Fields(string(m[1]))
}

func without(caps []string, c string) []string {
	return slices.DeleteFunc(slices.Clone(caps), func(x string) bool { return x == c })
}

// capsCmd runs nsflow as root with exactly caps: its bounding and
// inheritable sets reduced to them, as systemd's CapabilityBoundingSet does
// for a root service (a root process's permitted and effective sets are
// then exactly caps; the DaemonSet's container runs as root with the same).
func capsCmd(caps []string, args ...string) *exec.Cmd {
	set := "-all"
	for _, c := range caps {
		set += ",+" + strings.ToLower(strings.TrimPrefix(c, "CAP_"))
	}
	return exec.Command("setpriv", append([]string{"--bounding-set", set, "--inh-caps", set, nsflowBin}, args...)...)
}

// startServeCaps is startServe under exactly caps.
func startServeCaps(t *testing.T, caps []string, args ...string) *server {
	t.Helper()
	port := freePort(t)
	logf, err := os.Create(filepath.Join(t.TempDir(), "serve.log"))
	if err != nil {
		t.Fatal(err)
	}
	cmd := capsCmd(caps, append([]string{"serve", "--web.listen-address", "127.0.0.1:" + strconv.Itoa(port), "--log.level", "debug"}, args...)...)
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	s := &server{cmd: cmd, url: fmt.Sprintf("http://127.0.0.1:%d", port), log: logf, client: startServeClient()}
	t.Cleanup(func() { s.stop(t) })
	waitUntil(t, 20*time.Second, "serve ready", func() bool {
		code, _ := s.get("/-/ready")
		return code == 200
	})
	return s
}

// tenantUser creates a user for the test (another uid than nsflow's) and
// removes it when the test ends.
func tenantUser(t *testing.T) (uid, gid int) {
	t.Helper()
	name := fmt.Sprintf("nsfcap%d", os.Getpid()%100000)
	exec.Command("userdel", name).Run() // left by a killed run
	if out, err := exec.Command("useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", "--user-group", name).CombinedOutput(); err != nil {
		t.Fatalf("useradd: %v\n%s", err, out)
	}
	t.Cleanup(func() {
		if out, err := exec.Command("userdel", name).CombinedOutput(); err != nil {
			t.Errorf("userdel %s: %v\n%s", name, err, out)
		}
	})
	out, err := exec.Command("id", "-u", name).Output()
	if err != nil {
		t.Fatal(err)
	}
	uid, _ = strconv.Atoi(strings.TrimSpace(string(out)))
	out, err = exec.Command("id", "-g", name).Output()
	if err != nil {
		t.Fatal(err)
	}
	gid, _ = strconv.Atoi(strings.TrimSpace(string(out)))
	return uid, gid
}

// tenant is a process in a network namespace of its own (lo up, nothing
// else), as a tenant makes one: pid, and the namespace's path and inode.
type tenant struct {
	pid   int
	path  string
	inode uint64
}

// startTenant runs `unshare ARGS sleep 60` (bounded: killed when the test
// ends, and by itself after a minute) through prefix, which sets the user
// it runs as, and brings lo up in its namespace (as root, from outside).
func startTenant(t *testing.T, prefix []string, unshareArgs ...string) tenant {
	t.Helper()
	args := append(append(slices.Clone(prefix), "unshare"), unshareArgs...)
	cmd := exec.Command(args[0], append(args[1:], "sleep", "60")...)
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	pid := cmd.Process.Pid // setpriv and unshare exec in place
	self := nsInode(t, "/proc/self/ns/net")
	tn := tenant{pid: pid, path: fmt.Sprintf("/proc/%d/ns/net", pid)}
	waitUntil(t, 5*time.Second, "the tenant to exec sleep in its own namespace", func() bool {
		comm, _ := os.ReadFile(fmt.Sprintf("/proc/%d/comm", pid))
		return strings.TrimSpace(string(comm)) == "sleep"
	})
	if tn.inode = nsInode(t, tn.path); tn.inode == self {
		t.Fatal("the tenant is in the test's namespace")
	}
	if out, err := exec.Command("nsenter", "--net="+tn.path, "ip", "link", "set", "lo", "up").CombinedOutput(); err != nil {
		t.Fatalf("lo up: %v\n%s", err, out)
	}
	return tn
}

// readableByRoot reports whether the test (root with every capability its
// own bounding set has) can read a process's network namespace; false for
// a process gone since (a pid is not reused within seconds).
func readableByRoot(pid string) bool {
	_, err := os.Stat("/proc/" + pid + "/ns/net")
	return err == nil
}

// pingInside pings 127.0.0.1 n times inside the namespace at path.
func pingInside(t *testing.T, path string, n int) {
	t.Helper()
	if out, err := exec.Command("nsenter", "--net="+path, "ping", "-c", strconv.Itoa(n), "-i", "0.05", "-W", "2", "127.0.0.1").CombinedOutput(); err != nil {
		t.Fatalf("ping in %s: %v\n%s", path, err, out)
	}
}

// assertLoExact waits until the scraped lo counters of each namespace
// (netns name → path) equal the kernel's (nsflow observed them since lo
// carried nothing: every count is since the attach).
func assertLoExact(t *testing.T, srv *server, names map[string]string) {
	t.Helper()
	var last string
	deadline := time.Now().Add(10 * time.Second)
	for {
		last = ""
		s, _ := srv.scrape(t)
		for name, path := range names {
			ino := nsInode(t, path)
			k := kernelCounts(t, map[uint64]string{ino: path})
			for _, d := range []flow.Direction{flow.RX, flow.TX} {
				want := k[point{ino, "lo", d}]
				pk := s[pointSeries("nsflow_packets_total", name, "lo", string(d))]
				by := s[pointSeries("nsflow_bytes_total", name, "lo", string(d))]
				if want.Packets == 0 || uint64(pk) != want.Packets || uint64(by) != want.Bytes {
					last += fmt.Sprintf("%s lo %s: scraped %v packets %v bytes, kernel %+v\n", name, d, pk, by, want)
				}
			}
		}
		if last == "" {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("counts differ:\n%s", last)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func skippedSeries(reason string) string {
	return `nsflow_namespaces_skipped_total{reason="` + reason + `"}`
}

// listed runs `nsflow list -o json` under caps and returns the namespaces
// by name, and its stderr.
func listed(t *testing.T, caps []string, args ...string) (map[string]struct {
	Inode      uint64
	Path       string
	Interfaces []struct{ Name string }
}, string) {
	t.Helper()
	cmd := capsCmd(caps, append([]string{"list", "-o", "json", "--netns.host=false"}, args...)...)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("list: %v\n%s", err, stderr.String())
	}
	var nss []struct {
		Name       string
		Inode      uint64
		Path       string
		Interfaces []struct{ Name string }
	}
	if err := json.Unmarshal(out, &nss); err != nil {
		t.Fatalf("list json: %v\n%s", err, out)
	}
	m := map[string]struct {
		Inode      uint64
		Path       string
		Interfaces []struct{ Name string }
	}{}
	for _, ns := range nss {
		m[ns.Name] = struct {
			Inode      uint64
			Path       string
			Interfaces []struct{ Name string }
		}{ns.Inode, ns.Path, ns.Interfaces}
	}
	return m, stderr.String()
}

// Under exactly the documented capabilities (the systemd unit's, the
// DaemonSet's), nsflow lists and observes, exactly, the namespaces of a
// process of another uid in its own user and network namespace, and of a
// root process with every capability (which nsflow, with fewer, may read
// only with CAP_SYS_PTRACE: the kernel's cap_ptrace_access_check). Without
// CAP_SYS_PTRACE, neither is listed nor observed, and neither is silently
// missed: list names them on stderr, serve logs each (with its pid and
// uid) and counts it in nsflow_namespaces_skipped_total{reason="permission"},
// including one that starts after serve (the proc connector's exec event,
// not a rescan: the rescan interval is an hour). The other user's namespace
// is owned by its user namespace: --netns.userns observes it.
func TestCapsObserveOtherUser(t *testing.T) {
	testenv.RequireRoot(t)
	for _, tool := range []string{"setpriv", "useradd", "userdel", "unshare", "nsenter"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Fatalf("%s not installed: %v", tool, err)
		}
	}
	caps := documentedCaps(t)
	if !slices.Contains(caps, collector.ObserveCapability) {
		t.Fatalf("the documented set %v lacks %s", caps, collector.ObserveCapability)
	}
	uid, gid := tenantUser(t)
	asUser := []string{"setpriv", "--reuid", strconv.Itoa(uid), "--regid", strconv.Itoa(gid), "--clear-groups"}
	user := startTenant(t, asUser, "--user", "--map-root-user", "--net")
	root := startTenant(t, nil, "--net")
	names := map[string]string{
		"pid:" + strconv.Itoa(user.pid): user.path,
		"pid:" + strconv.Itoa(root.pid): root.path,
	}
	include := fmt.Sprintf("^pid:(%d|%d)$", user.pid, root.pid)

	t.Run("list", func(t *testing.T) {
		got, stderr := listed(t, caps, "--netns.userns", "--netns.include", include)
		for name, tn := range map[string]tenant{"pid:" + strconv.Itoa(user.pid): user, "pid:" + strconv.Itoa(root.pid): root} {
			ns, ok := got[name]
			if !ok || ns.Inode != tn.inode || len(ns.Interfaces) != 1 || ns.Interfaces[0].Name != "lo" {
				t.Errorf("%s: listed %+v (found %t), want inode %d with lo", name, ns, ok, tn.inode)
			}
		}
		for _, pid := range regexp.MustCompile(`permission: pid ([0-9]+) `).FindAllStringSubmatch(stderr, -1) {
			if readableByRoot(pid[1]) {
				t.Errorf("list under the documented set could not read pid %s, which root can:\n%s", pid[1], stderr)
			}
		}

		got, stderr = listed(t, without(caps, "CAP_SYS_PTRACE"), "--netns.userns", "--netns.include", include)
		if len(got) != 0 {
			t.Errorf("without CAP_SYS_PTRACE, list shows %v: the kernel should have refused", got)
		}
		for _, want := range []string{
			fmt.Sprintf("permission: pid %d uid %d (sleep): /proc/%d/ns/net", user.pid, uid, user.pid),
			fmt.Sprintf("permission: pid %d uid 0 (sleep): /proc/%d/ns/net", root.pid, root.pid),
			"CAP_SYS_PTRACE",
		} {
			if !strings.Contains(stderr, want) {
				t.Errorf("without CAP_SYS_PTRACE, list's stderr does not say %q:\n%s", want, stderr)
			}
		}
	})

	t.Run("serve", func(t *testing.T) {
		srv := startServeCaps(t, caps, "--netns.host=false", "--netns.userns", "--netns.include", include)
		waitUntil(t, 10*time.Second, "both tenants' lo in /metrics", func() bool {
			s, _ := srv.scrape(t)
			for name := range names {
				if _, ok := s[pointSeries("nsflow_packets_total", name, "lo", "tx")]; !ok {
					return false
				}
			}
			return true
		})
		pingInside(t, user.path, 5)
		pingInside(t, root.path, 3)
		assertLoExact(t, srv, names)
		s, _ := srv.scrape(t)
		for _, r := range []string{"permission", "gone", "other"} {
			if _, ok := s[skippedSeries(r)]; !ok {
				t.Errorf("%s missing from the scrape", skippedSeries(r))
			}
		}
		// Whatever serve could not read, root cannot either (an LSM that
		// confines the test too); on a plain node that is nothing.
		// Each is logged as it is counted: the count scraped lies between
		// the lines logged before and after the scrape.
		deniedRe := regexp.MustCompile(`reason=permission path=/proc/([0-9]+)/ns/net`)
		before := len(deniedRe.FindAllString(srv.logText(), -1))
		s, _ = srv.scrape(t)
		log := srv.logText()
		denied := deniedRe.FindAllStringSubmatch(log, -1)
		if n := s[skippedSeries("permission")]; n < float64(before) || n > float64(len(denied)) {
			t.Errorf("%s = %v, but %d to %d logged", skippedSeries("permission"), n, before, len(denied))
		}
		for _, pid := range denied {
			if readableByRoot(pid[1]) {
				t.Errorf("under the documented set, serve could not read pid %s, which root can:\n%s", pid[1], log)
			}
		}
	})

	t.Run("serve without CAP_SYS_PTRACE", func(t *testing.T) {
		srv := startServeCaps(t, without(caps, "CAP_SYS_PTRACE"), "--netns.host=false", "--netns.userns", "--netns.include", include,
			"--netns.resync-interval", "1h")
		s, _ := srv.scrape(t)
		before := s[skippedSeries("permission")]
		if before < 2 {
			t.Errorf("%s = %v, want at least the two tenants", skippedSeries("permission"), before)
		}
		// A tenant that starts now is counted at its exec, once.
		late := startTenant(t, asUser, "--user", "--map-root-user", "--net")
		lateLine := fmt.Sprintf("reason=permission path=/proc/%d/ns/net", late.pid)
		waitUntil(t, 5*time.Second, "the late tenant logged", func() bool {
			return strings.Contains(srv.logText(), lateLine)
		})
		pingInside(t, late.path, 2) // more execs in its namespace: counted once still
		s, _ = srv.scrape(t)
		if s[skippedSeries("permission")] <= before {
			t.Errorf("%s did not grow with the late tenant: %v", skippedSeries("permission"), s[skippedSeries("permission")])
		}
		log := srv.logText()
		for _, tn := range []tenant{user, root, late} {
			if _, ok := s[pointSeries("nsflow_packets_total", "pid:"+strconv.Itoa(tn.pid), "lo", "tx")]; ok {
				t.Errorf("pid %d observed without CAP_SYS_PTRACE: the kernel should have refused", tn.pid)
			}
			if n := strings.Count(log, fmt.Sprintf("reason=permission path=/proc/%d/ns/net", tn.pid)); n != 1 {
				t.Errorf("pid %d logged %d times as skipped for permission, want once", tn.pid, n)
			}
		}
		if !strings.Contains(log, "without CAP_SYS_PTRACE") {
			t.Errorf("serve does not say it runs without CAP_SYS_PTRACE:\n%s", log)
		}
		if !strings.Contains(log, fmt.Sprintf("pid=%d uid=%d comm=", user.pid, uid)) {
			t.Errorf("the log does not name the other user's process and uid:\n%s", log)
		}
	})
}

// A Docker-style namespace, bind-mounted in /run/docker/netns (where Docker
// keeps its containers'), is found by serve under the documented
// capabilities, present at start and made while it runs (inotify: the
// rescan interval is an hour), and counted exactly; `nsflow list` and
// namespace selectors know it by its file's name.
func TestCapsDockerNetns(t *testing.T) {
	testenv.RequireRoot(t)
	const dir = "/run/docker/netns"
	for _, d := range []string{"/run/docker", dir} {
		if _, err := os.Stat(d); errors.Is(err, os.ErrNotExist) {
			if err := os.Mkdir(d, 0o755); err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { os.Remove(d) }) // only if still empty
		}
	}
	a := fmt.Sprintf("nsfcap4-a-%d", os.Getpid())
	b := fmt.Sprintf("nsfcap4-b-%d", os.Getpid())
	pa, pb := filepath.Join(dir, a), filepath.Join(dir, b)
	newRawNetns(t, pa)

	tg, err := collector.ParseTarget(a)
	if err != nil || tg.Name != a || tg.Path != pa {
		t.Errorf("ParseTarget(%q) = %+v, %v; want %s at %s", a, tg, err, a, pa)
	}
	if tg, err := collector.ParseTarget(pa); err != nil || tg.Name != a {
		t.Errorf("ParseTarget(%q) = %+v, %v; want the name %s", pa, tg, err, a)
	}
	caps := documentedCaps(t)
	got, _ := listed(t, caps, "--netns.proc=false", "--netns.include", "^"+a+"$")
	if ns, ok := got[a]; !ok || ns.Path != pa || ns.Inode != nsInode(t, pa) {
		t.Errorf("list: %+v, want %s at %s", got, a, pa)
	}

	srv := startServeCaps(t, caps, "--netns.host=false", "--netns.proc=false", "--netns.resync-interval", "1h",
		"--netns.include", fmt.Sprintf("^nsfcap4-[ab]-%d$", os.Getpid()))
	newRawNetns(t, pb)
	waitUntil(t, 5*time.Second, "both Docker-style namespaces in /metrics", func() bool {
		s, _ := srv.scrape(t)
		_, okA := s[pointSeries("nsflow_packets_total", a, "lo", "tx")]
		_, okB := s[pointSeries("nsflow_packets_total", b, "lo", "tx")]
		return okA && okB
	})
	pingInside(t, pa, 4)
	pingInside(t, pb, 6)
	assertLoExact(t, srv, map[string]string{a: pa, b: pb})
}
