package attach

import (
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"sync"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"
)

// PinLayout names the layout of the pinned state (maps and links). A
// version whose map keys or values change bumps it; pinned state of another
// layout is removed at start, with a log line, never misread. v3: points
// carry their namespace's cookie (the cookies map), links are named after
// it, clsact filters after their owner. v4: flows keyed by slot, the
// stub hands the parser its slot in the packet's cb (no handoff map).
const PinLayout = "v4"

// DefaultPinPath is where --pin keeps nsflow's state on the bpffs.
const DefaultPinPath = "/sys/fs/bpf/nsflow"

const bpfFSMagic = 0xcafe4a11

// ensureBPFFS mounts a bpffs at /sys/fs/bpf when the pin path's filesystem
// is not one.
func ensureBPFFS(pinPath string, log *slog.Logger) error {
	root := "/sys/fs/bpf"
	var fs unix.Statfs_t
	if err := unix.Statfs(root, &fs); err == nil && fs.Type == bpfFSMagic {
		return nil
	}
	if err := os.MkdirAll(root, 0o700); err != nil {
		return fmt.Errorf("create %s: %w", root, err)
	}
	if err := unix.Mount("bpf", root, "bpf", 0, "mode=0700"); err != nil {
		return fmt.Errorf("mount bpffs at %s (needed by --pin): %w", root, err)
	}
	log.Info("mounted bpffs", "path", root)
	if err := unix.Statfs(filepath.Dir(pinPath), &fs); err != nil || fs.Type != bpfFSMagic {
		return fmt.Errorf("--pin path %s is not on a bpffs", pinPath)
	}
	return nil
}

var layoutRE = regexp.MustCompile(`^v[0-9]+$`)

// ErrPinsInUse is returned by PreparePins when another process uses the
// pin path.
var ErrPinsInUse = errors.New("another nsflow process uses this pin path")

// PreparePins makes pinPath/PinLayout (mode 0700), mounting a bpffs at
// /sys/fs/bpf if needed and removing the pinned state of other layouts, and
// returns the layout directory: the maps are pinned there, the links in its
// "links" subdirectory. It locks pinPath first (flock) and returns the lock,
// to close when the process no longer uses the pins: two processes sharing
// pinned maps would hand each other's slots out.
func PreparePins(pinPath string, log *slog.Logger) (string, io.Closer, error) {
	if err := ensureBPFFS(pinPath, log); err != nil {
		return "", nil, err
	}
	if err := os.MkdirAll(pinPath, 0o700); err != nil {
		return "", nil, fmt.Errorf("create pin directory: %w", err)
	}
	lock, err := os.Open(pinPath)
	if err != nil {
		return "", nil, fmt.Errorf("open pin directory: %w", err)
	}
	if err := unix.Flock(int(lock.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		lock.Close()
		if errors.Is(err, unix.EWOULDBLOCK) {
			return "", nil, fmt.Errorf("%s: %w", pinPath, ErrPinsInUse)
		}
		return "", nil, fmt.Errorf("lock pin directory %s: %w", pinPath, err)
	}
	pl := &pinLock{File: lock}
	dir, err := prepareLayout(pinPath, log, pl)
	if err != nil {
		lock.Close()
		return "", nil, err
	}
	return dir, pl, nil
}

// pinLock is the lock PreparePins returns; it tells NewOwner whether the
// pin path held the state of a layout whose clsact filters were named
// plainly "nsflow" (v2 and before): those on the interfaces it attaches to
// are its previous process's, and stale.
type pinLock struct {
	*os.File
	legacy bool
}

func prepareLayout(pinPath string, log *slog.Logger, pl *pinLock) (string, error) {
	ents, _ := os.ReadDir(pinPath)
	for _, e := range ents {
		if e.IsDir() && layoutRE.MatchString(e.Name()) && e.Name() != PinLayout {
			if n, err := strconv.Atoi(e.Name()[1:]); err == nil && n <= 2 {
				pl.legacy = true
			}
			log.Warn("removing pinned state of an incompatible layout (its counters restart)",
				"layout", e.Name(), "want", PinLayout, "path", filepath.Join(pinPath, e.Name()))
			if err := os.RemoveAll(filepath.Join(pinPath, e.Name())); err != nil {
				return "", fmt.Errorf("remove old pinned state: %w", err)
			}
		}
	}
	dir := filepath.Join(pinPath, PinLayout)
	if err := os.MkdirAll(filepath.Join(dir, "links"), 0o700); err != nil {
		return "", fmt.Errorf("create pin directory: %w", err)
	}
	return dir, nil
}

// Pins are the TCX links pinned by nsflow, by key (netns cookie, ifindex,
// hook); those found at start wait to be adopted by NewTCX's attacher. A nil
// *Pins (no --pin) has no links.
type Pins struct {
	dir string
	log *slog.Logger

	mu      sync.Mutex
	pending map[string]link.Link
}

func linkKey(cookie uint64, ifindex int, hook string) string {
	return fmt.Sprintf("%x_%d_%s", cookie, ifindex, hook)
}

func (p *Pins) path(key string) string { return filepath.Join(p.dir, key) }

// LoadPins opens the links a previous process left pinned in dir.
func LoadPins(dir string, log *slog.Logger) (*Pins, error) {
	p := &Pins{dir: dir, log: log, pending: map[string]link.Link{}}
	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil, err
	}
	for _, e := range ents {
		l, err := link.LoadPinnedLink(filepath.Join(dir, e.Name()), nil)
		if err != nil {
			log.Warn("dropping unreadable pinned link", "pin", e.Name(), "err", err)
			os.Remove(filepath.Join(dir, e.Name()))
			continue
		}
		p.pending[e.Name()] = l
	}
	if len(p.pending) > 0 {
		log.Info("found pinned links of a previous process", "links", len(p.pending))
	}
	return p, nil
}

// adopt takes over a pending link for key, replacing its program with prog
// (BPF_LINK_UPDATE: atomic, no packet between two programs). It returns nil
// when there is no such link or it cannot be updated (then it is dropped).
func (p *Pins) adopt(key string, prog *ebpf.Program) link.Link {
	if p == nil {
		return nil
	}
	p.mu.Lock()
	l, ok := p.pending[key]
	delete(p.pending, key)
	p.mu.Unlock()
	if !ok {
		return nil
	}
	if err := l.Update(prog); err != nil {
		// Detached (its interface went away while no process ran).
		p.log.Info("pinned link not adoptable, attaching anew", "pin", key, "err", err)
		l.Unpin()
		l.Close()
		return nil
	}
	p.log.Debug("adopted pinned link", "pin", key)
	return l
}

// DropPending unpins and closes every link no interface claimed: their
// namespace or interface is gone. It returns how many.
func (p *Pins) DropPending() int {
	if p == nil {
		return 0
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	n := len(p.pending)
	for key, l := range p.pending {
		if err := errors.Join(l.Unpin(), l.Close()); err != nil {
			p.log.Warn("drop stale pinned link", "pin", key, "err", err)
		}
		delete(p.pending, key)
	}
	return n
}

// ReleasePending closes the fds of the links no interface claimed, leaving
// them pinned (and attached) for the next process.
func (p *Pins) ReleasePending() {
	if p == nil {
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	for key, l := range p.pending {
		l.Close()
		delete(p.pending, key)
	}
}
