package discovery

import (
	"os"
	"path/filepath"
	"reflect"
	"strconv"
	"strings"
	"testing"

	"github.com/nsflow/nsflow/collector"
)

// A namespace found through its processes is named after the numerically
// lowest pid (pid:9, not pid:10 that /proc lists first), with that
// process's path, and lists its pids in numeric order; a namespace that
// also has a bind mount keeps the mount's name. Their attach classes:
// process, and named for the bind-mounted one. The namespace files are
// fakes holding their inode, so the test runs without root.
func TestScanNamesProcessNamespaceByLowestPid(t *testing.T) {
	root := t.TempDir()
	proc, netnsDir := filepath.Join(root, "proc"), filepath.Join(root, "netns")
	write := func(path string, ino uint64) {
		t.Helper()
		if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(path, []byte(strconv.FormatUint(ino, 10)), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	for pid, ino := range map[int]uint64{10: 1001, 9: 1001, 100: 1001, 1000: 1001, 70: 1002, 8: 1002, 5: 1003} {
		write(filepath.Join(proc, strconv.Itoa(pid), "ns/net"), ino)
	}
	write(filepath.Join(proc, "self/ns/net"), 1001) // not a pid: ignored
	write(filepath.Join(netnsDir, "web"), 1003)

	sc, err := newScanner(Config{Proc: true, ProcDir: proc, NetnsDirs: []string{netnsDir}})
	if err != nil {
		t.Fatal(err)
	}
	sc.nsInode = func(path string) (uint64, error) {
		b, err := os.ReadFile(path)
		if err != nil {
			return 0, err
		}
		return strconv.ParseUint(strings.TrimSpace(string(b)), 10, 64)
	}
	sc.nsOwner = func(string) (uint64, error) { return sc.initUserns, nil }
	got, skipped := sc.scan()
	if len(skipped) != 0 {
		t.Errorf("skipped: %+v", skipped)
	}
	want := map[uint64]Found{
		1001: {Inode: 1001, Pids: []int{9, 10, 100, 1000}},
		1002: {Inode: 1002, Pids: []int{8, 70}},
		1003: {Inode: 1003, Pids: []int{5}},
	}
	want[1001] = withTarget(want[1001], "pid:9", filepath.Join(proc, "9/ns/net"), collector.ClassProcess)
	want[1002] = withTarget(want[1002], "pid:8", filepath.Join(proc, "8/ns/net"), collector.ClassProcess)
	want[1003] = withTarget(want[1003], "web", filepath.Join(netnsDir, "web"), collector.ClassNamed)
	if len(got) != len(want) {
		t.Fatalf("found %d namespaces, want %d: %+v", len(got), len(want), got)
	}
	for ino, w := range want {
		if g := got[ino]; g == nil || !reflect.DeepEqual(*g, w) {
			t.Errorf("inode %d: %+v, want %+v", ino, g, w)
		}
	}
}

func withTarget(f Found, name, path string, class collector.Class) Found {
	f.Target.Name, f.Target.Path, f.Target.Class = name, path, class
	return f
}
