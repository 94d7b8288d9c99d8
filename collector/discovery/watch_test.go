package discovery

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/nsflow/nsflow/collector"
	"github.com/nsflow/nsflow/test/testenv"
)

// addRecorder observes every namespace it is given.
type addRecorder struct {
	mu    sync.Mutex
	added map[string]uint64 // name → inode
}

func (o *addRecorder) AddAsync(t collector.Target) (uint64, error) {
	ino, err := nsInode(t.Path)
	if err != nil {
		return 0, err
	}
	o.mu.Lock()
	defer o.mu.Unlock()
	o.added[t.Name] = ino
	return ino, nil
}
func (o *addRecorder) WaitIdle(context.Context) error { return nil }
func (o *addRecorder) Remove(uint64)                  {}
func (o *addRecorder) Rename(uint64, string)          {}

func (o *addRecorder) has(name string) bool {
	o.mu.Lock()
	defer o.mu.Unlock()
	_, ok := o.added[name]
	return ok
}

// A netns directory that does not exist when discovery starts (Docker
// started after nsflow) is watched from the first rescan after it appears
// (here one asked for, as a process's exec event asks): a namespace
// bind-mounted in it afterwards is found through inotify, with no periodic
// rescan (the interval is an hour).
func TestWatchesNetnsDirCreatedLater(t *testing.T) {
	testenv.RequireRoot(t)
	root := t.TempDir()
	dir, unwatched := filepath.Join(root, "docker-netns"), filepath.Join(root, "later")
	o := &addRecorder{added: map[string]uint64{}}
	d, err := New(o, Config{NetnsDirs: []string{dir, unwatched}, Resync: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	runDiscovery(t, d)
	<-d.Ready()

	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	d.trigger()
	// The asked-for rescan, and the one the new watch asks for.
	wait(t, "the directory watched", func() bool { return d.Scans() >= 3 })

	// The control: a directory made now, with no rescan after it, is not
	// watched: a namespace in it is not found (until a rescan).
	if err := os.Mkdir(unwatched, 0o755); err != nil {
		t.Fatal(err)
	}
	bindNetns(t, filepath.Join(unwatched, "def456"))
	time.Sleep(500 * time.Millisecond)
	if o.has("def456") {
		t.Fatal("found a namespace in a directory not watched yet, with no rescan: the test proves nothing")
	}

	bindNetns(t, filepath.Join(dir, "abc123"))
	wait(t, "the namespace found", func() bool { return o.has("abc123") })
}

// bindNetns bind-mounts a new network namespace at path.
func bindNetns(t *testing.T, path string) {
	t.Helper()
	if err := os.WriteFile(path, nil, 0o444); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		unix.Unmount(path, unix.MNT_DETACH)
		os.Remove(path)
	})
	if out, err := exec.Command("unshare", "--net="+path, "true").CombinedOutput(); err != nil {
		t.Fatalf("unshare --net=%s: %v\n%s", path, err, out)
	}
}

// runDiscovery runs d until the test ends, and fails the test if Run
// returns an error.
func runDiscovery(t *testing.T, d *Discovery) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- d.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Error(err)
		}
	})
}

func wait(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// scanCounter records how many full scans had run when each namespace was
// added.
type scanCounter struct {
	addRecorder
	d       *Discovery
	scansAt map[string]uint64
}

func (o *scanCounter) AddAsync(t collector.Target) (uint64, error) {
	ino, err := o.addRecorder.AddAsync(t)
	o.mu.Lock()
	defer o.mu.Unlock()
	o.scansAt[t.Name] = o.d.Scans()
	return ino, err
}

// A namespace bind-mounted on a file some time after the file was created
// (the file's inotify event says nothing of the mount) is added as soon as
// a poll of that file finds the mount, without waiting for a full scan of
// the netns directories and /proc: a pod's namespace is observed before
// its veth appears, as a rule.
func TestMountFoundWithoutScan(t *testing.T) {
	testenv.RequireRoot(t)
	dir := t.TempDir()
	o := &scanCounter{addRecorder: addRecorder{added: map[string]uint64{}}, scansAt: map[string]uint64{}}
	d, err := New(o, Config{NetnsDirs: []string{dir}, Resync: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	o.d = d
	runDiscovery(t, d)
	<-d.Ready()
	before := d.Scans()

	path := filepath.Join(dir, "pod-late-mount")
	if err := os.WriteFile(path, nil, 0o444); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		unix.Unmount(path, unix.MNT_DETACH)
		os.Remove(path)
	})
	time.Sleep(30 * time.Millisecond) // polled, not mounted yet
	if out, err := exec.Command("unshare", "--net="+path, "true").CombinedOutput(); err != nil {
		t.Fatalf("unshare --net=%s: %v\n%s", path, err, out)
	}
	wait(t, "the namespace found", func() bool { return o.has("pod-late-mount") })
	o.mu.Lock()
	at := o.scansAt["pod-late-mount"]
	o.mu.Unlock()
	if at != before {
		t.Errorf("added after %d full scans since the file appeared, want none (found by polling the file)", at-before)
	}
	ino, err := nsInode(path)
	if err != nil {
		t.Fatal(err)
	}
	o.mu.Lock()
	got := o.added["pod-late-mount"]
	o.mu.Unlock()
	if got != ino {
		t.Errorf("added inode %d, the mount is %d", got, ino)
	}
}
