package discovery

import (
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/nsflow/nsflow/test/testenv"
)

// A namespace found only through its processes and owned by a user
// namespace other than the initial one is skipped (reason userns), counted
// once however many processes it has and however many scans find it, and
// logged once as a warning (the rest at debug level); one the kernel will
// not name the owner of (EPERM: outside nsflow's user namespace) is too.
// One bind-mounted is observed whoever owns it, and so is one excluded by
// no flag: a namespace not selected is not counted. With UserNamespaces
// every one is observed.
func TestUsernsSkipped(t *testing.T) {
	f := newFakeProc(t)
	f.process(30, "1001", "5030", 0, "init-owned")
	f.process(31, "1002", "5031", 1000, "tenant")
	f.owned(31, "7001")
	f.process(32, "1003", "5032", 1000, "tenant2")
	f.owned(32, "7002")
	f.process(33, "1003", "5033", 1000, "tenant2")
	f.owned(33, "7002")
	f.process(34, "1004", "5034", 1000, "foreign")
	f.owned(34, "EPERM")
	f.process(35, "1005", "5035", 1000, "mounted")
	f.owned(35, "7003")
	f.write(filepath.Join(f.netnsDir, "web"), "1005")
	f.process(36, "1006", "5036", 1000, "unselected")
	f.owned(36, "7004")

	var buf strings.Builder
	log := slog.New(slog.NewTextHandler(&buf, &slog.HandlerOptions{Level: slog.LevelDebug}))
	cfg := Config{Proc: true, ProcDir: f.proc, NetnsDirs: []string{f.netnsDir}, Logger: log, Exclude: regexp.MustCompile(`^pid:36$`)}
	o := &fakeObserver{adds: map[uint64]int{}}
	d, err := New(o, cfg)
	if err != nil {
		t.Fatal(err)
	}
	f.fake(d.sc)
	d.reconcile()
	d.reconcile()
	if want := map[uint64]int{1001: 1, 1005: 1}; !reflect.DeepEqual(o.adds, want) {
		t.Errorf("added %v, want %v (the initial user namespace's and the bind-mounted one)", o.adds, want)
	}
	if want := map[string]uint64{SkipPermission: 0, SkipGone: 0, SkipOther: 0, SkipUserns: 3}; !reflect.DeepEqual(d.Skipped(), want) {
		t.Errorf("skipped %v, want %v", d.Skipped(), want)
	}
	out := buf.String()
	if w, dbg := strings.Count(out, "level=WARN"), strings.Count(out, "level=DEBUG msg=\"namespace not observed: owned by another user namespace\""); w != 1 || dbg != 2 {
		t.Errorf("%d warnings and %d debug lines, want 1 and 2:\n%s", w, dbg, out)
	}
	if !strings.Contains(out, "--netns.userns") || !strings.Contains(out, "uid=1000") {
		t.Errorf("the warning names neither the flag nor the user:\n%s", out)
	}
	// An exec in a skipped namespace is no news; its last process's exit
	// is (the inode may come back as another namespace).
	d.mu.Lock()
	skippedNs, tracked := d.userns[1003], d.pids[33] == 1003
	d.mu.Unlock()
	if !skippedNs || !tracked {
		t.Errorf("skipped namespace 1003 not remembered (%t) or its process 33 not tracked (%t)", skippedNs, tracked)
	}

	// The scan alone reports every one, with its process.
	_, skipped := d.sc.scan()
	var got []string
	for _, s := range skipped {
		got = append(got, fmt.Sprintf("%s pid=%d uid=%d inode=%d %s", s.Reason, s.Pid, s.Uid, s.Inode, s.Key))
	}
	slices.Sort(got)
	want := []string{
		"userns pid=31 uid=1000 inode=1002 userns:1002",
		"userns pid=32 uid=1000 inode=1003 userns:1003",
		"userns pid=34 uid=1000 inode=1004 userns:1004",
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("skipped %q, want %q", got, want)
	}

	cfg.UserNamespaces = true
	o = &fakeObserver{adds: map[uint64]int{}}
	if d, err = New(o, cfg); err != nil {
		t.Fatal(err)
	}
	f.fake(d.sc)
	d.reconcile()
	if want := map[uint64]int{1001: 1, 1002: 1, 1003: 1, 1004: 1, 1005: 1}; !reflect.DeepEqual(o.adds, want) {
		t.Errorf("with UserNamespaces: added %v, want %v", o.adds, want)
	}
	if n := d.Skipped()[SkipUserns]; n != 0 {
		t.Errorf("with UserNamespaces: %d skipped for their user namespace", n)
	}
}

// A process's exec in a namespace of another user namespace is counted at
// once, without a rescan (a flood of them costs no scans), and the next
// scan does not count it again; an exec in a new namespace of the initial
// user namespace asks for a rescan, as does one in a namespace not
// selected by name.
func TestUsernsExecNoRescan(t *testing.T) {
	f := newFakeProc(t)
	f.process(30, "1001", "5030", 0, "init-owned")
	d, err := New(&fakeObserver{adds: map[uint64]int{}}, Config{Proc: true, ProcDir: f.proc, NetnsDirs: []string{f.netnsDir},
		Exclude: regexp.MustCompile(`^pid:42$`)})
	if err != nil {
		t.Fatal(err)
	}
	f.fake(d.sc)
	d.reconcile()
	exec := func(pid int) (rescan bool) {
		d.procEvent(netlink.ProcEvent{Msg: &netlink.ExecProcEvent{ProcessPid: uint32(pid), ProcessTgid: uint32(pid)}})
		select {
		case <-d.kick:
			return true
		default:
			return false
		}
	}
	f.process(40, "1002", "5040", 65534, "sleep")
	f.owned(40, "7001")
	if exec(40) {
		t.Error("an exec in another user namespace's namespace asked for a rescan")
	}
	if n := d.Skipped()[SkipUserns]; n != 1 {
		t.Errorf("skipped for their user namespace: %d, want 1", n)
	}
	if exec(40) {
		t.Error("a second exec in the skipped namespace asked for a rescan")
	}
	d.reconcile()
	if n := d.Skipped()[SkipUserns]; n != 1 {
		t.Errorf("after a rescan: %d skipped for their user namespace, want 1 (counted once)", n)
	}
	f.process(41, "1003", "5041", 0, "root")
	if !exec(41) {
		t.Error("an exec in a new namespace of the initial user namespace asked for no rescan")
	}
	f.process(42, "1004", "5042", 65534, "sleep")
	f.owned(42, "7002")
	if !exec(42) {
		t.Error("an exec in a namespace not selected by name: no rescan (the rescan decides)")
	}
	if n := d.Skipped()[SkipUserns]; n != 1 {
		t.Errorf("the unselected namespace counted: %d skipped, want 1", n)
	}
}

// On the kernel: the namespace of `unshare -Urn` run by an unprivileged
// user (uid 65534) is skipped for its user namespace, with that process and
// uid; that of `unshare -n` run by root is observed; bind-mounted, the
// user's namespace is observed; with UserNamespaces, both are.
func TestUsernsClassification(t *testing.T) {
	testenv.RequireRoot(t)
	start := func(cred *syscall.Credential, args ...string) (int, uint64) {
		t.Helper()
		cmd := exec.Command("unshare", append(args, "sleep", "30")...)
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: cred}
		cmd.Stderr = os.Stderr
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
		pid := cmd.Process.Pid
		wait(t, "unshare to exec sleep", func() bool {
			comm, _ := os.ReadFile(fmt.Sprintf("/proc/%d/comm", pid))
			return strings.TrimSpace(string(comm)) == "sleep"
		})
		ino, err := nsInode(fmt.Sprintf("/proc/%d/ns/net", pid))
		if err != nil {
			t.Fatal(err)
		}
		return pid, ino
	}
	userPid, userIno := start(&syscall.Credential{Uid: 65534, Gid: 65534, Groups: []uint32{}}, "-Urn")
	rootPid, rootIno := start(nil, "-n")
	dir := t.TempDir()
	cfg := Config{Proc: true, NetnsDirs: []string{dir}, Include: regexp.MustCompile(fmt.Sprintf(`^(pid:(%d|%d)|userns-mounted)$`, userPid, rootPid))}

	found, skipped, err := ScanSkipped(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if len(found) != 1 || found[0].Inode != rootIno || found[0].Target.Name != "pid:"+strconv.Itoa(rootPid) {
		t.Errorf("found %+v, want only root's pid:%d (inode %d)", found, rootPid, rootIno)
	}
	var userns []Skipped
	for _, s := range skipped {
		if s.Reason == SkipUserns {
			userns = append(userns, s)
		}
	}
	if len(userns) != 1 || userns[0].Inode != userIno || userns[0].Pid != userPid || userns[0].Uid != 65534 || userns[0].Comm != "sleep" {
		t.Errorf("skipped for their user namespace: %+v, want the user's pid %d, uid 65534, inode %d", userns, userPid, userIno)
	}

	cfg.UserNamespaces = true
	if found, err = Scan(cfg); err != nil {
		t.Fatal(err)
	}
	if len(found) != 2 {
		t.Errorf("with UserNamespaces: found %+v, want both pid:%d and pid:%d", found, userPid, rootPid)
	}

	cfg.UserNamespaces = false
	mnt := filepath.Join(dir, "userns-mounted")
	if err := os.WriteFile(mnt, nil, 0o444); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount(fmt.Sprintf("/proc/%d/ns/net", userPid), mnt, "", unix.MS_BIND, ""); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Unmount(mnt, unix.MNT_DETACH) })
	found, skipped, err = ScanSkipped(cfg)
	if err != nil {
		t.Fatal(err)
	}
	names := map[string]uint64{}
	for _, f := range found {
		names[f.Target.Name] = f.Inode
	}
	if want := map[string]uint64{"userns-mounted": userIno, "pid:" + strconv.Itoa(rootPid): rootIno}; !reflect.DeepEqual(names, want) {
		t.Errorf("with the user's namespace bind-mounted: found %v, want %v", names, want)
	}
	for _, s := range skipped {
		if s.Reason == SkipUserns && s.Inode == userIno {
			t.Errorf("bind-mounted, still skipped: %+v", s)
		}
	}
}
