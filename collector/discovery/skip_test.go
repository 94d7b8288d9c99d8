package discovery

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"reflect"
	"strconv"
	"strings"
	"sync"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/nsflow/nsflow/collector"
)

// fakeProc is a /proc and a netns directory whose namespace files hold
// their inode, or the name of the errno that reading them fails with.
type fakeProc struct {
	t              *testing.T
	proc, netnsDir string
}

func newFakeProc(t *testing.T) *fakeProc {
	root := t.TempDir()
	return &fakeProc{t: t, proc: filepath.Join(root, "proc"), netnsDir: filepath.Join(root, "netns")}
}

func (f *fakeProc) write(path, content string) {
	f.t.Helper()
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		f.t.Fatal(err)
	}
	if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
		f.t.Fatal(err)
	}
}

// process adds a process whose ns/net holds ns; start "" leaves out its
// stat file (a process that exited while being read).
func (f *fakeProc) process(pid int, ns, start string, uid int, comm string) {
	dir := filepath.Join(f.proc, strconv.Itoa(pid))
	f.write(filepath.Join(dir, "ns/net"), ns)
	if start != "" {
		// comm with a space and a parenthesis, as a tenant may name it.
		f.write(filepath.Join(dir, "stat"), fmt.Sprintf("%d (%s) S 1 1 1 0 -1 4194560 1 0 0 0 0 0 0 0 20 0 1 0 %s 1000 100", pid, comm, start))
		f.write(filepath.Join(dir, "status"), fmt.Sprintf("Name:\t%s\nUid:\t%d\t%d\t%d\t%d\n", comm, uid, uid, uid, uid))
		f.write(filepath.Join(dir, "comm"), comm+"\n")
	}
}

// fakeInitUserns is the initial user namespace of a fakeProc.
const fakeInitUserns = 4026531837

// owned makes the namespace of process pid owned by user namespace owner
// (or fail with that errno's name: "EPERM").
func (f *fakeProc) owned(pid int, owner string) {
	f.write(filepath.Join(f.proc, strconv.Itoa(pid), "ns/netowner"), owner)
}

// nsOwner answers for a process's ns/net what owned said, else the
// initial user namespace.
func (f *fakeProc) nsOwner(path string) (uint64, error) {
	b, err := os.ReadFile(filepath.Join(filepath.Dir(path), "netowner"))
	if os.IsNotExist(err) {
		if _, err := os.Stat(path); err != nil {
			return 0, err
		}
		return fakeInitUserns, nil
	}
	if err != nil {
		return 0, err
	}
	v := strings.TrimSpace(string(b))
	if v == "EPERM" {
		return 0, unix.EPERM
	}
	return strconv.ParseUint(v, 10, 64)
}

// fake makes sc read this fake /proc.
func (f *fakeProc) fake(sc *scanner) {
	sc.nsInode, sc.nsOwner, sc.initUserns = f.nsInode, f.nsOwner, fakeInitUserns
}

func (f *fakeProc) nsInode(path string) (uint64, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0, err
	}
	switch v := strings.TrimSpace(string(b)); v {
	case "EACCES":
		return 0, unix.EACCES
	case "EPERM":
		return 0, unix.EPERM
	case "ENOENT":
		return 0, unix.ENOENT
	case "EIO":
		return 0, unix.EIO
	case "tmpfs":
		return 0, fmt.Errorf("%s: %w", path, errNotNamespace)
	default:
		return strconv.ParseUint(v, 10, 64)
	}
}

// A reference nsflow may not read is reported, with its process, once per
// process; a process that is gone, a file that is no namespace, are not.
func TestScanReportsUnreadableReferences(t *testing.T) {
	f := newFakeProc(t)
	f.process(20, "EACCES", "5000", 1001, "sl) eep")
	f.process(21, "EACCES", "", 0, "") // exited: the kernel says EACCES
	f.process(22, "ENOENT", "5002", 0, "zombie")
	f.process(23, "EIO", "5003", 0, "odd")
	f.process(24, "EPERM", "5004", 0, "lsm")
	f.process(25, "1001", "5005", 0, "ok")
	f.write(filepath.Join(f.netnsDir, "unmounted"), "tmpfs")
	f.write(filepath.Join(f.netnsDir, "denied"), "EACCES")
	f.write(filepath.Join(f.netnsDir, "web"), "1002")

	sc, err := newScanner(Config{Proc: true, ProcDir: f.proc, NetnsDirs: []string{f.netnsDir}})
	if err != nil {
		t.Fatal(err)
	}
	f.fake(sc)
	found, skipped := sc.scan()
	if len(found) != 2 || found[1001] == nil || found[1002] == nil {
		t.Errorf("found %+v, want inodes 1001 and 1002", found)
	}
	for i := range skipped {
		skipped[i].Err = ""
	}
	want := []Skipped{
		{Key: filepath.Join(f.netnsDir, "denied"), Path: filepath.Join(f.netnsDir, "denied"), Reason: SkipPermission},
		{Key: "pid:20@5000", Path: filepath.Join(f.proc, "20/ns/net"), Pid: 20, Uid: 1001, Comm: "sl) eep", Reason: SkipPermission},
		{Key: "pid:23@5003", Path: filepath.Join(f.proc, "23/ns/net"), Pid: 23, Uid: 0, Comm: "odd", Reason: SkipOther},
		{Key: "pid:24@5004", Path: filepath.Join(f.proc, "24/ns/net"), Pid: 24, Uid: 0, Comm: "lsm", Reason: SkipPermission},
	}
	if !reflect.DeepEqual(skipped, want) {
		t.Errorf("skipped:\n%+v\nwant\n%+v", skipped, want)
	}
}

// fakeObserver observes what it is given, except the inodes in fail, for
// which Add fails with that error.
type fakeObserver struct {
	mu   sync.Mutex
	fail map[uint64]error
	adds map[uint64]int
}

func (o *fakeObserver) AddAsync(t collector.Target) (uint64, error) {
	ino, err := (&fakeProc{}).nsInode(t.Path)
	if err != nil {
		return 0, err
	}
	o.mu.Lock()
	defer o.mu.Unlock()
	o.adds[ino]++
	if err := o.fail[ino]; err != nil {
		return 0, err
	}
	return ino, nil
}
func (o *fakeObserver) WaitIdle(context.Context) error { return nil }
func (o *fakeObserver) Remove(uint64)                  {}
func (o *fakeObserver) Rename(uint64, string)          {}

// Discovery counts each skipped namespace or reference once, however many
// scans find it again, every reason from the start; one that comes back
// after it was gone (a new process) is counted again.
func TestDiscoveryCountsSkipsOnce(t *testing.T) {
	f := newFakeProc(t)
	f.process(20, "EACCES", "5000", 1001, "sleep")
	f.write(filepath.Join(f.netnsDir, "vanishing"), "1005")
	f.write(filepath.Join(f.netnsDir, "broken"), "1006")
	f.write(filepath.Join(f.netnsDir, "fine"), "1007")
	o := &fakeObserver{adds: map[uint64]int{}, fail: map[uint64]error{
		1005: fmt.Errorf("netns vanishing: %w", collector.ErrNamespaceNotFound),
		1006: fmt.Errorf("netlink in netns broken: %w", unix.EMFILE),
	}}
	d, err := New(o, Config{Proc: true, ProcDir: f.proc, NetnsDirs: []string{f.netnsDir}})
	if err != nil {
		t.Fatal(err)
	}
	f.fake(d.sc)
	want := map[string]uint64{SkipPermission: 0, SkipGone: 0, SkipOther: 0, SkipUserns: 0}
	if got := d.Skipped(); !reflect.DeepEqual(got, want) {
		t.Fatalf("before any scan: %v, want every reason at 0", got)
	}
	check := func(when string, perm, gone, other uint64) {
		t.Helper()
		want := map[string]uint64{SkipPermission: perm, SkipGone: gone, SkipOther: other, SkipUserns: 0}
		if got := d.Skipped(); !reflect.DeepEqual(got, want) {
			t.Errorf("%s: %v, want %v", when, got, want)
		}
	}
	d.reconcile()
	check("first scan", 1, 1, 1)
	d.reconcile()
	d.reconcile()
	check("found again", 1, 1, 1)
	if o.adds[1005] != 3 || o.adds[1006] != 3 || o.adds[1007] != 1 {
		t.Errorf("adds %v: the skipped are retried at every scan, the observed added once", o.adds)
	}

	// The process exits, the broken namespace goes away: forgotten. The
	// same pid, a new process, is counted again; so is a namespace that
	// fails anew.
	if err := os.RemoveAll(filepath.Join(f.proc, "20")); err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(filepath.Join(f.netnsDir, "broken")); err != nil {
		t.Fatal(err)
	}
	d.reconcile()
	check("gone", 1, 1, 1)
	f.process(20, "EACCES", "7000", 1001, "sleep")
	f.write(filepath.Join(f.netnsDir, "broken"), "1006")
	d.reconcile()
	check("again", 2, 1, 2)
}

// Permission skips are logged once each: the first maxPermissionWarnings
// as warnings (the last of them says so), the rest at debug level; every
// one is counted.
func TestPermissionWarningsBounded(t *testing.T) {
	var buf strings.Builder
	log := slog.New(slog.NewTextHandler(&buf, &slog.HandlerOptions{Level: slog.LevelDebug}))
	k := newSkips()
	for i := range maxPermissionWarnings + 5 {
		s := Skipped{Key: fmt.Sprintf("pid:%d@1", i), Path: fmt.Sprintf("/proc/%d/ns/net", i), Pid: i, Reason: SkipPermission}
		k.record(s, 1, log)
		k.record(s, 2, log) // found again: neither logged nor counted
	}
	if k.counts[SkipPermission] != maxPermissionWarnings+5 {
		t.Errorf("counted %d, want %d", k.counts[SkipPermission], maxPermissionWarnings+5)
	}
	out := buf.String()
	if w, d := strings.Count(out, "level=WARN"), strings.Count(out, "level=DEBUG"); w != maxPermissionWarnings || d != 5 {
		t.Errorf("%d warnings and %d debug lines, want %d and 5:\n%s", w, d, maxPermissionWarnings, out)
	}
	if strings.Count(out, "further ones are logged at debug level") != 1 {
		t.Errorf("the last warning does not say the rest go to debug:\n%s", out)
	}
}
