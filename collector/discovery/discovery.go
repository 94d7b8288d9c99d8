// Package discovery finds the network namespaces of a node as they come and
// go (bind mounts in the netns directories, processes under /proc, the
// host's own) and makes an Observer (a *collector.Collector) observe exactly
// those. Scan and List find them once, without a collector.
package discovery

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"regexp"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/fsnotify/fsnotify"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/nsflow/nsflow/collector"
)

// Config selects the namespaces a Discovery observes.
type Config struct {
	// Host observes the namespace nsflow itself runs in (the node's, for a
	// DaemonSet with hostNetwork). When false, processes in that namespace
	// (hostNetwork pods) are not observed either: they are not a namespace
	// of their own.
	Host bool
	// NetnsDirs are watched for `ip netns` / CNI / Docker bind mounts; nil
	// means collector.NetnsDirs. A directory that does not exist yet (Docker
	// not started) is watched from the first rescan after it appears.
	NetnsDirs []string
	// Proc observes the namespaces of processes found under ProcDir.
	Proc bool
	// ProcDir is /proc unless set.
	ProcDir string
	// Include, when set, observes only namespaces whose name matches;
	// Exclude skips those whose name matches. Names: the ip netns name,
	// pid:PID, or host.
	Include, Exclude *regexp.Regexp
	// UserNamespaces observes the namespaces found only through a process
	// (no bind mount) whose owning user namespace is not the initial one
	// (that of PID 1 under ProcDir). Without it they are skipped (reason
	// SkipUserns): any unprivileged user can create thousands
	// (`unshare -Urn`), each of which would take attach work and totals
	// slots before the pods'. Bind-mounted namespaces and the host's are
	// observed whoever owns them.
	UserNamespaces bool
	// HostVeths: the host ends of veths whose peer is in a selected
	// namespace are observed too (collector.Config.HostVeths); List shows
	// which ones are left out without it.
	HostVeths bool
	// Resync is the interval of the safety-net full rescan; 0 means 30s.
	// Namespaces are found through events (inotify, the proc connector),
	// not through this.
	Resync time.Duration
	Logger *slog.Logger
}

// Observer is what a Discovery drives: a *collector.Collector.
type Observer interface {
	// AddAsync starts observing a namespace: it registers it, queues its
	// attach work by Target.Class and returns its inode at once (0 when
	// it could not be opened). Adding a namespace again under a lower
	// class raises its priority.
	AddAsync(collector.Target) (uint64, error)
	// WaitIdle returns once no attach work is queued or running (or ctx
	// is done, with its error).
	WaitIdle(ctx context.Context) error
	// Remove stops observing the namespace of that inode.
	Remove(inode uint64)
	// Rename changes the name the namespace is reported under.
	Rename(inode uint64, name string)
}

// Discovery finds network namespaces as they come and go and makes an
// Observer observe them.
type Discovery struct {
	o   Observer
	sc  *scanner
	cfg Config
	log *slog.Logger

	kick  chan struct{}
	ready chan struct{}

	mu    sync.Mutex
	known map[uint64]string // inode → name it is observed under
	pids  map[int]uint64    // processes that keep a process-found namespace alive
	// userns are the namespaces the last scan skipped for their user
	// namespace: an exec in one is no news (their pids are in pids too,
	// so that an exit rescans: the inode may be reused).
	userns map[uint64]bool
	scans  uint64
	skips  skips

	// Only Run uses these.
	watched     map[dirID]bool
	watchWarned map[string]bool
}

// New prepares discovery for o (a *collector.Collector); Run starts it.
func New(o Observer, cfg Config) (*Discovery, error) {
	sc, err := newScanner(cfg)
	if err != nil {
		return nil, err
	}
	if sc.cfg.Proc {
		if ok, err := collector.HasCapability(unix.CAP_SYS_PTRACE); err == nil && !ok {
			sc.cfg.Logger.Warn("without " + collector.ObserveCapability + ", the namespaces of other users' processes cannot be read: each is logged and counted in nsflow_namespaces_skipped_total{reason=\"permission\"}, not observed (unless bind-mounted in a netns directory)")
		}
	}
	return &Discovery{
		o: o, sc: sc, cfg: sc.cfg, log: sc.cfg.Logger,
		kick: make(chan struct{}, 1), ready: make(chan struct{}),
		known: map[uint64]string{}, pids: map[int]uint64{}, userns: map[uint64]bool{},
		skips: newSkips(),
	}, nil
}

// Ready is closed once the first scan has added every namespace it found
// and the observer's attach work has drained (Observer.WaitIdle).
func (d *Discovery) Ready() <-chan struct{} { return d.ready }

// Scans returns how many full scans have run (for tests and metrics).
func (d *Discovery) Scans() uint64 {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.scans
}

// Run discovers until ctx is done. Namespaces appear through inotify events
// on the netns directories and exec events of the kernel's proc connector,
// and vanish on unlink and process exit; a full rescan every Resync is the
// safety net for anything those miss.
func (d *Discovery) Run(ctx context.Context) error {
	w, err := fsnotify.NewWatcher()
	if err != nil {
		return fmt.Errorf("inotify: %w", err)
	}
	defer w.Close()
	d.watched, d.watchWarned = map[dirID]bool{}, map[string]bool{}
	d.watchDirs(w)

	var procEvents chan netlink.ProcEvent
	if d.cfg.Proc {
		procEvents = make(chan netlink.ProcEvent, 1024)
		procErrs := make(chan error, 16)
		var wg sync.WaitGroup
		defer wg.Wait() // after close(done) below: defers run last first
		done := make(chan struct{})
		defer close(done)
		if err := netlink.ProcEventMonitor(procEvents, done, procErrs); err != nil {
			// Without the proc connector, process namespaces are found by
			// the periodic rescan only.
			d.log.Warn("proc connector unavailable: process namespaces found by rescan only", "err", err)
			procEvents = nil
		} else {
			// The monitor never closes procErrs: stop on done.
			wg.Add(1)
			go func() {
				defer wg.Done()
				for {
					select {
					case <-done:
						return
					case err := <-procErrs:
						d.log.Debug("proc events", "err", err)
						d.trigger() // events may be lost: rescan
					}
				}
			}()
		}
	}

	d.reconcile()
	// Ready once the first scan's attach work is done; meanwhile events
	// are handled (a pod that appears now is queued before the rest of a
	// flood of process namespaces).
	rctx, cancel := context.WithCancel(ctx)
	var readyWg sync.WaitGroup
	defer readyWg.Wait()
	defer cancel()
	readyWg.Add(1)
	go func() {
		defer readyWg.Done()
		if d.o.WaitIdle(rctx) == nil {
			close(d.ready)
		}
	}()

	// Namespaces bind-mounted in a watched directory, found by polling
	// the new file (awaitMount), are added here, in Run's goroutine like
	// every scan's.
	mounted := make(chan Found, 16)
	pollers := make(chan struct{}, maxMountPollers)
	var pollWg sync.WaitGroup
	defer pollWg.Wait()
	defer cancel() // stops the pollers before waiting for them

	rewatch := func() {
		if d.watchDirs(w) {
			d.trigger() // what the new directory held before the watch
		}
	}
	ticker := time.NewTicker(d.cfg.Resync)
	defer ticker.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case ev, ok := <-w.Events:
			if !ok {
				return errors.New("inotify watcher closed")
			}
			if !ev.Has(fsnotify.Create) {
				d.trigger()
				continue
			}
			// The file exists before it is bind-mounted (no event tells
			// when): it is polled until the mount is there, and the
			// namespace added at once, without a scan of /proc. Before
			// its veth appears, as a rule: a pod's veth whose namespace
			// is not observed yet has its host end attached (a TCX grace
			// period under RTNL, which the pod's setup and every attach
			// then wait for) and left out again right after.
			select {
			case pollers <- struct{}{}:
				pollWg.Add(1)
				go func() {
					defer pollWg.Done()
					defer func() { <-pollers }()
					d.awaitMount(rctx, ev.Name, mounted)
				}()
			default:
				// Many files at once: found by rescans.
				for _, delay := range []time.Duration{0, 10 * time.Millisecond, 100 * time.Millisecond, time.Second} {
					time.AfterFunc(delay, d.trigger)
				}
			}
		case f := <-mounted:
			d.mu.Lock()
			scan := d.scans
			d.mu.Unlock()
			d.add(&f, scan)
		case err := <-w.Errors:
			d.log.Warn("inotify", "err", err)
			d.trigger()
		case ev, ok := <-procEvents:
			if !ok {
				// The monitor stopped on a receive error (ENOBUFS under
				// an exec storm) and closed the channel: a closed channel
				// in this select would spin a core.
				d.log.Warn("proc connector stopped: process namespaces found by rescan only")
				procEvents = nil
				d.trigger()
				continue
			}
			d.procEvent(ev)
		case <-d.kick:
			d.reconcile()
			rewatch()
		case <-ticker.C:
			d.reconcile()
			rewatch()
		}
	}
}

// dirID identifies a directory: /run/netns and /var/run/netns are usually
// one.
type dirID struct{ dev, ino uint64 }

// watchDirs watches the netns directories not watched yet, and reports
// whether it added one: at start, and after each rescan, so that a
// directory created later (Docker's, when Docker starts after nsflow) or
// re-created is watched too. A directory that cannot be watched for another
// reason than not existing is logged once. Only Run calls it.
func (d *Discovery) watchDirs(w *fsnotify.Watcher) (added bool) {
	now := map[dirID]bool{}
	for _, dir := range d.cfg.NetnsDirs {
		var st unix.Stat_t
		if err := unix.Stat(dir, &st); err != nil {
			continue
		}
		id := dirID{st.Dev, st.Ino}
		if now[id] {
			continue // the same directory under another path
		}
		if !d.watched[id] {
			if err := w.Add(dir); err != nil {
				if !d.watchWarned[dir] {
					d.watchWarned[dir] = true
					d.log.Warn("watch netns directory: found by rescans only", "dir", dir, "err", err)
				}
				continue
			}
			added = true
		}
		now[id] = true
	}
	d.watched = now
	return added
}

// trigger asks for a rescan; triggers while one is pending coalesce.
func (d *Discovery) trigger() {
	select {
	case d.kick <- struct{}{}:
	default:
	}
}

func (d *Discovery) procEvent(ev netlink.ProcEvent) {
	switch m := ev.Msg.(type) {
	case *netlink.ExecProcEvent:
		// A process that unshared its network namespace (or was cloned
		// into one) and exec'd: a new namespace if its inode is unknown.
		pid := int(m.ProcessTgid)
		ino, err := d.sc.nsInode(filepath.Join(d.cfg.ProcDir, strconv.Itoa(pid), "ns/net"))
		if err != nil {
			// Counted now, not at the next rescan: a short-lived
			// process would be missed.
			if sk, ok := procSkip(d.cfg.ProcDir, pid, err); ok {
				d.mu.Lock()
				d.skips.record(sk, d.scans, d.log)
				d.mu.Unlock()
			}
			return
		}
		if ino == d.sc.hostIno {
			return
		}
		d.mu.Lock()
		_, known := d.known[ino]
		known = known || d.userns[ino]
		d.mu.Unlock()
		if known {
			return
		}
		if d.cfg.UserNamespaces || !d.sc.selected("pid:"+strconv.Itoa(pid)) {
			d.trigger()
			return
		}
		// A namespace of another user namespace is skipped here, without
		// a rescan: a flood of `unshare -Urn` costs one ioctl each, not a
		// scan of /proc each. (Bind-mounted since, it is found named by
		// the rescan its inotify event asks for, and observed.)
		sk, skip := d.sc.checkOwner(&Found{Inode: ino, Pids: []int{pid}})
		switch {
		case skip && sk.Reason == SkipUserns:
			d.mu.Lock()
			d.skips.record(sk, d.scans, d.log)
			d.userns[ino] = true
			d.pids[pid] = ino
			d.mu.Unlock()
		case skip && sk.Reason == "":
			// Gone already.
		default:
			d.trigger()
		}
	case *netlink.ExitProcEvent:
		if m.ProcessPid != m.ProcessTgid {
			return // a thread, not a process
		}
		d.mu.Lock()
		_, tracked := d.pids[int(m.ProcessTgid)]
		d.mu.Unlock()
		if tracked {
			d.trigger() // maybe the last process of its namespace
		}
	}
}

// Found is a namespace a scan found.
type Found struct {
	Target collector.Target
	Inode  uint64
	// Pids are the processes in the namespace (with Config.Proc), lowest
	// first; a namespace found only through them is named pid:LOWEST.
	Pids []int
}

// scanner lists the namespaces a configuration selects.
type scanner struct {
	cfg     Config
	hostIno uint64
	// initUserns is the inode of the initial user namespace (0 with
	// Config.UserNamespaces: not needed).
	initUserns uint64
	// nsInode is the package's nsInode, nsOwner its nsOwner; tests
	// replace them.
	nsInode func(path string) (uint64, error)
	nsOwner func(path string) (uint64, error)
}

func newScanner(cfg Config) (*scanner, error) {
	if cfg.NetnsDirs == nil {
		cfg.NetnsDirs = collector.NetnsDirs
	}
	if cfg.ProcDir == "" {
		cfg.ProcDir = "/proc"
	}
	if cfg.Resync <= 0 {
		cfg.Resync = 30 * time.Second
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	host, err := ownNetns()
	if err != nil {
		return nil, fmt.Errorf("own network namespace: %w", err)
	}
	sc := &scanner{cfg: cfg, hostIno: host, nsInode: nsInode, nsOwner: nsOwner}
	if cfg.Proc && !cfg.UserNamespaces {
		if sc.initUserns, err = initialUserns(cfg.ProcDir); err != nil {
			return nil, err
		}
	}
	return sc, nil
}

// initialUserns returns the inode of the initial user namespace: PID 1's
// under procDir, else (PID 1 not readable: nsflow without CAP_SYS_PTRACE,
// or a PID 1 it may not trace) nsflow's own, the initial one unless nsflow
// itself runs in a user namespace.
func initialUserns(procDir string) (uint64, error) {
	var st unix.Stat_t
	if err := unix.Stat(filepath.Join(procDir, "1/ns/user"), &st); err == nil {
		return st.Ino, nil
	}
	if err := unix.Stat("/proc/self/ns/user", &st); err != nil {
		return 0, fmt.Errorf("own user namespace: %w", err)
	}
	return st.Ino, nil
}

// Scan lists the namespaces cfg selects once, sorted by name, without
// observing them (what `nsflow list` shows).
func Scan(cfg Config) ([]Found, error) {
	sc, err := newScanner(cfg)
	if err != nil {
		return nil, err
	}
	m, _ := sc.scan()
	out := make([]Found, 0, len(m))
	for _, f := range m {
		out = append(out, *f)
	}
	sort.Slice(out, func(a, b int) bool { return out[a].Target.Name < out[b].Target.Name })
	return out, nil
}

// ScanSkipped is Scan, and also returns the namespace references it could
// not read (see SkipPermission), sorted by path.
func ScanSkipped(cfg Config) ([]Found, []Skipped, error) {
	sc, err := newScanner(cfg)
	if err != nil {
		return nil, nil, err
	}
	m, skipped := sc.scan()
	out := make([]Found, 0, len(m))
	for _, f := range m {
		out = append(out, *f)
	}
	sort.Slice(out, func(a, b int) bool { return out[a].Target.Name < out[b].Target.Name })
	sort.Slice(skipped, func(a, b int) bool { return skipped[a].Path < skipped[b].Path })
	return out, skipped, nil
}

// scan lists every namespace the configuration selects, keyed by inode,
// and the references to namespaces it could not read. Those cannot be
// selected by name (their namespace is unknown): they are all reported.
func (s *scanner) scan() (map[uint64]*Found, []Skipped) {
	out := map[uint64]*Found{}
	var skipped []Skipped
	if s.cfg.Host {
		out[s.hostIno] = &Found{Target: collector.Target{Name: collector.HostName, Path: "/proc/self/ns/net", Class: collector.ClassHost}, Inode: s.hostIno}
	}
	for _, dir := range s.cfg.NetnsDirs {
		ents, err := os.ReadDir(dir)
		if err != nil {
			continue
		}
		for _, e := range ents {
			p := filepath.Join(dir, e.Name())
			ino, err := s.nsInode(p)
			if err != nil {
				// Not (yet) a mounted namespace, or removed since the
				// listing; or one nsflow may not read.
				if r := refReason(err); r != "" {
					skipped = append(skipped, Skipped{Key: p, Path: p, Reason: r, Err: err.Error()})
				}
				continue
			}
			if ino == s.hostIno {
				continue
			}
			if _, ok := out[ino]; !ok {
				out[ino] = &Found{Target: collector.Target{Name: e.Name(), Path: p, Class: collector.ClassNamed}, Inode: ino}
			}
		}
	}
	if s.cfg.Proc {
		ents, _ := os.ReadDir(s.cfg.ProcDir)
		for _, e := range ents {
			pid, err := strconv.Atoi(e.Name())
			if err != nil {
				continue
			}
			ino, err := s.nsInode(filepath.Join(s.cfg.ProcDir, e.Name(), "ns/net"))
			if err != nil {
				// Gone (not a skip), or not ours to read.
				if sk, ok := procSkip(s.cfg.ProcDir, pid, err); ok {
					skipped = append(skipped, sk)
				}
				continue
			}
			if ino == s.hostIno {
				continue
			}
			f, ok := out[ino]
			if !ok {
				f = &Found{Inode: ino}
				out[ino] = f
			}
			f.Pids = append(f.Pids, pid)
		}
	}
	for ino, f := range out {
		// ReadDir sorts by name: "10" before "9". A namespace found only
		// through its processes is named after the lowest pid.
		sort.Ints(f.Pids)
		procOnly := f.Target.Name == ""
		if procOnly {
			pid := strconv.Itoa(f.Pids[0])
			f.Target = collector.Target{Name: "pid:" + pid, Path: filepath.Join(s.cfg.ProcDir, pid, "ns/net"), Class: collector.ClassProcess}
		}
		if !s.selected(f.Target.Name) {
			delete(out, ino)
			continue
		}
		if procOnly && !s.cfg.UserNamespaces {
			if sk, skip := s.checkOwner(f); skip {
				delete(out, ino)
				if sk.Reason != "" {
					skipped = append(skipped, sk)
				}
			}
		}
	}
	return out, skipped
}

// checkOwner reports whether a namespace found only through its processes
// is to be skipped for its owning user namespace, and, unless the processes
// are gone (Reason ""), what to report. The owner is asked through each
// process in turn until one answers (the lowest may have exited).
func (s *scanner) checkOwner(f *Found) (Skipped, bool) {
	for _, pid := range f.Pids {
		path := filepath.Join(s.cfg.ProcDir, strconv.Itoa(pid), "ns/net")
		own, err := s.nsOwner(path)
		if err == nil && own == s.initUserns {
			return Skipped{}, false
		}
		var reason, msg string
		switch {
		case err == nil:
			reason = SkipUserns
			msg = fmt.Sprintf("owned by user namespace %d, not the initial one (%d)", own, s.initUserns)
		case errors.Is(err, unix.EPERM):
			// The kernel's answer for an owner outside nsflow's own user
			// namespace: not the initial one either.
			reason, msg = SkipUserns, err.Error()
		default:
			if reason = refReason(err); reason == "" {
				continue // this process is gone
			}
			msg = err.Error()
		}
		uid, comm, start, ok := procInfo(s.cfg.ProcDir, pid)
		if !ok {
			continue
		}
		key := fmt.Sprintf("pid:%d@%s", pid, start)
		if reason == SkipUserns {
			key = "userns:" + strconv.FormatUint(f.Inode, 10)
		}
		return Skipped{Key: key, Path: path, Pid: pid, Uid: uid, Comm: comm, Inode: f.Inode, Reason: reason, Err: msg, pids: f.Pids}, true
	}
	// Every process is gone: so is the namespace, most likely; the next
	// scan settles it.
	return Skipped{}, true
}

func (s *scanner) selected(name string) bool {
	if s.cfg.Include != nil && !s.cfg.Include.MatchString(name) {
		return false
	}
	return s.cfg.Exclude == nil || !s.cfg.Exclude.MatchString(name)
}

// reconcile makes the observer observe exactly what a scan finds.
func (d *Discovery) reconcile() {
	now, skipped := d.sc.scan()
	d.mu.Lock()
	d.scans++
	scan := d.scans
	for _, sk := range skipped {
		d.skips.record(sk, scan, d.log)
	}
	d.pids = map[int]uint64{}
	for ino, f := range now {
		if strings.HasPrefix(f.Target.Name, "pid:") {
			for _, pid := range f.Pids {
				d.pids[pid] = ino
			}
		}
	}
	clear(d.userns)
	for _, sk := range skipped {
		if sk.Reason == SkipUserns {
			d.userns[sk.Inode] = true
			for _, pid := range sk.pids {
				d.pids[pid] = sk.Inode
			}
		}
	}
	var gone []uint64
	for ino := range d.known {
		if _, ok := now[ino]; !ok {
			gone = append(gone, ino)
			delete(d.known, ino)
		}
	}
	var added, promoted []*Found
	for ino, f := range now {
		name, ok := d.known[ino]
		switch {
		case !ok:
			added = append(added, f)
		case strings.HasPrefix(name, "pid:") && !strings.HasPrefix(f.Target.Name, "pid:"):
			// A process namespace that got a name (bind-mounted later):
			// renamed, and its attach work, if still queued, moves up
			// to its new class.
			d.o.Rename(ino, f.Target.Name)
			d.known[ino] = f.Target.Name
			promoted = append(promoted, f)
		}
	}
	d.mu.Unlock()
	for _, f := range promoted {
		d.o.AddAsync(f.Target)
	}
	// Named namespaces and the host's first: the observer queues by
	// class, but registering a flood of process namespaces before a pod's
	// would still delay the pod's.
	sort.SliceStable(added, func(a, b int) bool { return added[a].Target.Class < added[b].Target.Class })

	for _, ino := range gone {
		d.o.Remove(ino)
	}
	for _, f := range added {
		d.add(f, scan)
	}
	d.mu.Lock()
	d.skips.prune(scan)
	d.mu.Unlock()
}

// add makes the observer observe a namespace found by scan (or by
// awaitMount since), unless it is observed already under a name; one found
// through its processes before gets the name it is mounted under. Only Run
// calls it.
func (d *Discovery) add(f *Found, scan uint64) {
	d.mu.Lock()
	name, known := d.known[f.Inode]
	d.mu.Unlock()
	if known {
		if !strings.HasPrefix(name, "pid:") || strings.HasPrefix(f.Target.Name, "pid:") {
			return
		}
		d.o.Rename(f.Inode, f.Target.Name)
		d.mu.Lock()
		d.known[f.Inode] = f.Target.Name
		d.mu.Unlock()
		d.o.AddAsync(f.Target) // its attach work, if still queued, moves up
		return
	}
	ino, err := d.o.AddAsync(f.Target)
	if ino == 0 {
		// The namespace vanished between the scan and the attach, or
		// cannot be opened: counted once, and the next event or
		// rescan settles it.
		if err == nil {
			err = errors.New("not observed")
		}
		d.mu.Lock()
		d.skips.record(Skipped{Key: "inode:" + strconv.FormatUint(f.Inode, 10), Path: f.Target.Path, Inode: f.Inode,
			Reason: addReason(err), Err: err.Error()}, scan, d.log)
		d.mu.Unlock()
		return
	}
	if ino != f.Inode {
		// The path named another namespace by the time the observer
		// opened it: the process's (its main thread's) namespace
		// changed since the scan (a multi-threaded process that
		// switches namespaces, as Go programs do), or its pid was
		// reused. That namespace was not selected: undone, unless
		// observed for itself already; the next scan settles it.
		d.mu.Lock()
		_, known := d.known[ino]
		d.mu.Unlock()
		if !known {
			d.o.Remove(ino)
		}
		d.mu.Lock()
		d.skips.record(Skipped{Key: "inode:" + strconv.FormatUint(f.Inode, 10), Path: f.Target.Path, Inode: f.Inode,
			Reason: SkipGone, Err: fmt.Sprintf("%s refers to namespace %d since the scan found %d there", f.Target.Path, ino, f.Inode)}, scan, d.log)
		d.mu.Unlock()
		return
	}
	if err != nil {
		d.log.Warn("observe namespace", "netns", f.Target.Name, "err", err)
	}
	d.mu.Lock()
	d.known[ino] = f.Target.Name
	d.mu.Unlock()
}

// maxMountPollers bounds the files polled at once for their bind mount.
const maxMountPollers = 32

// mountPolls is when awaitMount looks at a new file again: often at first
// (runtimes mount within milliseconds of creating it), then less, for
// about a second in all.
var mountPolls = func() []time.Duration {
	var p []time.Duration
	for range 20 {
		p = append(p, time.Millisecond)
	}
	for range 16 {
		p = append(p, 5*time.Millisecond)
	}
	for range 18 {
		p = append(p, 50*time.Millisecond)
	}
	return p
}()

// awaitMount polls a file created in a netns directory until a network
// namespace is mounted on it, and sends it to found (unless it is the
// host's or not selected); then it asks for a rescan, which settles what
// the poll could not (a mount later than the poll, a file removed).
func (d *Discovery) awaitMount(ctx context.Context, path string, found chan<- Found) {
	defer d.trigger()
	name := filepath.Base(path)
	if !d.sc.selected(name) {
		return
	}
	for _, wait := range mountPolls {
		ino, err := d.sc.nsInode(path)
		if err == nil {
			if ino == d.sc.hostIno {
				return
			}
			select {
			case found <- Found{Target: collector.Target{Name: name, Path: path, Class: collector.ClassNamed}, Inode: ino}:
			case <-ctx.Done():
			}
			return
		}
		if !errors.Is(err, errNotNamespace) {
			return // removed, or not readable: the rescan reports it
		}
		select {
		case <-time.After(wait):
		case <-ctx.Done():
			return
		}
	}
}

// ownNetns returns the inode of nsflow's own network namespace. Not through
// /proc/self: that is the main thread's, which may be inside another
// namespace for a moment (collector/nsenter runs on locked threads, the
// main one among them); a thread this goroutine has locked is in the
// process's own (nsenter gives a thread back only once it has returned).
func ownNetns() (uint64, error) {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	return nsInode("/proc/thread-self/ns/net")
}

// errNotNamespace: a path that refers to no namespace.
var errNotNamespace = errors.New("not a namespace")

// nsfsMagic is the filesystem magic of namespace files (NSFS_MAGIC).
const nsfsMagic = 0x6e736673

// nsOwner returns the inode of the user namespace that owns the namespace
// path refers to (ioctl NS_GET_USERNS; EPERM when that user namespace is
// not nsflow's own or one of its descendants).
func nsOwner(path string) (uint64, error) {
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return 0, &os.PathError{Op: "open", Path: path, Err: err}
	}
	defer unix.Close(fd)
	u, err := unix.IoctlRetInt(fd, unix.NS_GET_USERNS)
	if err != nil {
		return 0, &os.PathError{Op: "NS_GET_USERNS", Path: path, Err: err}
	}
	defer unix.Close(u)
	var st unix.Stat_t
	if err := unix.Fstat(u, &st); err != nil {
		return 0, &os.PathError{Op: "stat user namespace of", Path: path, Err: err}
	}
	return st.Ino, nil
}

// nsInode returns the inode of the network namespace path refers to, or an
// error if it refers to none (an unmounted bind-mount target, a gone
// process).
func nsInode(path string) (uint64, error) {
	var fs unix.Statfs_t
	if err := unix.Statfs(path, &fs); err != nil {
		return 0, err
	}
	if fs.Type != nsfsMagic {
		return 0, fmt.Errorf("%s: %w", path, errNotNamespace)
	}
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return 0, err
	}
	return st.Ino, nil
}
