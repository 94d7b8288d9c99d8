// Package cgroup names cgroup v2 ids, the ids the BPF programs record per
// flow with attribution on (bpf_skb_cgroup_id: the id of the cgroup of the
// socket that sent a packet, the cgroup directory's inode number on the
// cgroup2 filesystem).
//
// A Resolver maps an id to a Name: a container of the container runtime
// (CRI: its name and its pod), else the last element of the cgroup's path
// (e.g. "sshd.service", or "web" for `nsflow pod exec --container web`,
// whose cgroup is <v2>/nsflow-pods/<pod>/web). Names are cached by id
// (cgroup ids are never reused while the system runs); an id not in the
// cache makes a refresh, at most one per MinRefresh (1 s), never a walk of
// the cgroup tree. An id a refresh could not name (a removed cgroup: a
// restarted container's old one, still in the containers map) is not a
// reason for another refresh before its back-off (MissBackoff, 60 s,
// doubling up to MaxMissBackoff, 10 min) has passed; a new id still is.
// A refresh runs without the lock on the cache: a Resolve whose ids are
// all cached, or all backing off, does not wait for it. The sources:
//
//   - the container runtime's containers (ListContainers, then
//     ContainerStatus once per new container for its pid): the pid's
//     /proc/PID/cgroup "0::/path", stat'ed under the v2 mount, is the
//     container's cgroup id;
//   - an id's own path through open_by_handle_at on the cgroup2 mount
//     (cgroup2 exports kernfs file handles; needs CAP_DAC_READ_SEARCH): a
//     path whose last element holds a listed container's id
//     (cri-containerd-ID.scope, crio-ID.scope, ID) is that container,
//     whatever cgroup namespace nsflow runs in;
//   - without CAP_DAC_READ_SEARCH: every process's /proc/PID/cgroup (one
//     small read per process, at most once per MinRefresh, only while an
//     id is unknown and not backing off), which names cgroups that still
//     hold a process.
//
// The v2 mount is found in /proc/self/mountinfo (fstype cgroup2: on this
// project's VM a hybrid layout, /sys/fs/cgroup/unified; on a pure v2 host
// /sys/fs/cgroup). Run in a container, nsflow needs the host's cgroup2
// filesystem mounted (the DaemonSet mounts the host's /sys/fs/cgroup at
// /host/sys/fs/cgroup): of several cgroup2 mounts the Resolver takes the
// one whose root is highest in the hierarchy (the host's, whose mountinfo
// root reads "/.." from inside the container's cgroup namespace), and
// paths /proc reports relative to nsflow's own cgroup namespace ("/../..")
// are not stat'ed (the file-handle path names those).
package cgroup

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/nsflow/nsflow/collector/flow"
)

// PodsDir is the directory under the v2 mount where `nsflow pod exec
// --container C` makes its containers' cgroups: PodsDir/<pod>/<C>.
const PodsDir = "nsflow-pods"

// ListerTimeout bounds one listing of the runtime's containers (a
// snapshot that meets an unknown cgroup waits for it); after a failure the
// runtime is not asked again for ListerBackoff.
const (
	ListerTimeout = 2 * time.Second
	ListerBackoff = 30 * time.Second
)

// An id a refresh did not name is retried (makes a refresh) only after
// MissBackoff, then twice as long each time up to MaxMissBackoff.
const (
	MissBackoff    = time.Minute
	MaxMissBackoff = 10 * time.Minute
)

// Name is what a cgroup id resolves to.
type Name struct {
	// Container is the CRI container's name, else the cgroup path's last
	// element ("" for the root cgroup and for unknown ids).
	Container string
	// Pod is the CRI container's pod; nil otherwise (plain cgroups, and
	// `nsflow pod exec --container` cgroups: no runtime knows those pods).
	Pod *flow.PodInfo
	// Path is the cgroup's path under the v2 mount ("" when unknown).
	Path string
}

// PodString returns "namespace/name" of the pod, or "".
func (n Name) PodString() string {
	if n.Pod == nil {
		return ""
	}
	return n.Pod.Namespace + "/" + n.Pod.Name
}

// Container is a container the runtime lists.
type Container struct {
	ID   string
	Name string
	Pod  flow.PodInfo
	// Pid is the container's main process (0 unknown or not running).
	Pid int
}

// Lister lists the runtime's containers (collector/cri.Lister).
type Lister interface {
	ListContainers(ctx context.Context) ([]Container, error)
}

// Config configures a Resolver.
type Config struct {
	// Root is the cgroup v2 mount; "" finds it in /proc/self/mountinfo.
	Root string
	// Proc is the proc filesystem; "" means /proc.
	Proc string
	// RefPid is a process in the initial cgroup namespace (with hostPID,
	// the host's init); 0 means 1. Run in a cgroup namespace of its own,
	// the resolver enters that process's to learn where its own has its
	// root (needs CAP_SYS_ADMIN and ptrace access to it).
	RefPid int
	// Lister, when set, names the runtime's containers.
	Lister Lister
	// MinRefresh is the least time between two refreshes; 0 means 1 s.
	MinRefresh time.Duration
	// MaxEntries bounds the cache; 0 means 65,536 (over it, the cache
	// starts afresh).
	MaxEntries int
	// MissBackoff and MaxMissBackoff: an id a refresh did not name makes
	// no refresh for MissBackoff, then twice as long after each refresh
	// that still does not name it, up to MaxMissBackoff; 0 means the
	// package's defaults (60 s, 10 min).
	MissBackoff    time.Duration
	MaxMissBackoff time.Duration
	Logger         *slog.Logger
}

// Resolver maps cgroup ids to names. It is safe for concurrent use.
//
// Locks: refMu (held through a refresh: the runtime's list, /proc reads)
// before mu (the cache, held only briefly). rootFd, byID, listRetry and
// warned are written with both held, so read with either.
type Resolver struct {
	cfg Config
	log *slog.Logger

	refMu sync.Mutex

	mu       sync.Mutex
	names    map[uint64]Name
	misses   map[uint64]*miss      // ids refreshes did not name
	last     time.Time             // of the last refresh
	inflight chan struct{}         // closed when the running refresh ends; nil when none
	rootFd   int                   // the v2 mount, for open_by_handle_at; -1 when unusable
	handles  bool                  // open_by_handle_at works
	byID     map[string]*Container // last listed, by container id
	nsRoot   string                // this cgroup namespace's root in the hierarchy ("" the same)
	refreshs uint64
	warned   bool
	// listRetry: the runtime failed; not asked again before then.
	listRetry time.Time
}

// miss is an id's back-off: no refresh for it before next.
type miss struct {
	next time.Time
	wait time.Duration
}

// New returns a resolver on the v2 mount (cfg.Root or found).
func New(cfg Config) (*Resolver, error) {
	if cfg.Proc == "" {
		cfg.Proc = "/proc"
	}
	if cfg.Root == "" {
		root, err := Mount(filepath.Join(cfg.Proc, "self/mountinfo"))
		if err != nil {
			return nil, err
		}
		cfg.Root = root
	}
	if cfg.RefPid <= 0 {
		cfg.RefPid = 1
	}
	if cfg.MinRefresh <= 0 {
		cfg.MinRefresh = time.Second
	}
	if cfg.MaxEntries <= 0 {
		cfg.MaxEntries = 65536
	}
	if cfg.MissBackoff <= 0 {
		cfg.MissBackoff = MissBackoff
	}
	if cfg.MaxMissBackoff <= 0 {
		cfg.MaxMissBackoff = MaxMissBackoff
	}
	cfg.MaxMissBackoff = max(cfg.MaxMissBackoff, cfg.MissBackoff)
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	var st unix.Statfs_t
	if err := unix.Statfs(cfg.Root, &st); err != nil {
		return nil, fmt.Errorf("cgroup v2 mount %s: %w", cfg.Root, err)
	}
	if st.Type != unix.CGROUP2_SUPER_MAGIC {
		return nil, fmt.Errorf("cgroup v2 mount %s: not a cgroup2 filesystem", cfg.Root)
	}
	r := &Resolver{cfg: cfg, log: cfg.Logger, names: map[uint64]Name{}, misses: map[uint64]*miss{}, byID: map[string]*Container{}, rootFd: -1}
	fd, err := unix.Open(cfg.Root, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("cgroup v2 mount %s: %w", cfg.Root, err)
	}
	r.rootFd = fd
	if r.nsRoot, err = nsRoot(cfg.Proc, cfg.RefPid); err != nil {
		r.log.Info("cgroup paths of processes outside nsflow's cgroup namespace unknown (they are named through file handles only)", "err", err)
	}
	// Probe file handles on the root itself.
	if id, err := ID(cfg.Root); err == nil {
		if _, err := r.pathByHandle(id); err == nil {
			r.handles = true
		} else {
			r.log.Info("cgroup ids resolved through /proc (open_by_handle_at refused: it needs CAP_DAC_READ_SEARCH)", "err", err)
		}
	}
	return r, nil
}

// Root returns the v2 mount the resolver uses.
func (r *Resolver) Root() string { return r.cfg.Root }

// Close releases the mount's descriptor, and the lister if it is an
// io.Closer.
func (r *Resolver) Close() error {
	r.refMu.Lock()
	defer r.refMu.Unlock()
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.rootFd >= 0 {
		unix.Close(r.rootFd)
		r.rootFd = -1
	}
	if c, ok := r.cfg.Lister.(io.Closer); ok {
		return c.Close()
	}
	return nil
}

// Refreshes returns how many refreshes the resolver made (tests: that a
// cached id costs none).
func (r *Resolver) Refreshes() uint64 {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.refreshs
}

// Resolve names the ids (0 is skipped): from the cache, after at most one
// refresh when some are not in it and were never tried or are past their
// back-off. It waits for a refresh under way only when that refresh could
// name some of its ids (some never tried or past their back-off).
func (r *Resolver) Resolve(ctx context.Context, ids []uint64) map[uint64]Name {
	out := make(map[uint64]Name, len(ids))
	var missing []uint64
	for _, id := range ids {
		if _, dup := out[id]; dup || id == 0 {
			continue
		}
		out[id] = Name{}
		missing = append(missing, id)
	}
	r.mu.Lock()
	missing = r.named(missing, out)
	if len(missing) > 0 && r.inflight != nil && r.due(missing, time.Now()) {
		// A refresh is under way (it may name these): wait for it.
		ch := r.inflight
		r.mu.Unlock()
		select {
		case <-ch:
		case <-ctx.Done():
		}
		r.mu.Lock()
		missing = r.named(missing, out)
	}
	if len(missing) == 0 || !r.due(missing, time.Now()) {
		// All named, or all unnamed by a refresh not long ago.
		r.mu.Unlock()
		return out
	}
	if r.inflight != nil || time.Since(r.last) < r.cfg.MinRefresh || ctx.Err() != nil {
		// Not yet: a new id's path is still worth a handle lookup (one
		// syscall), and what it names final is cached.
		for _, id := range missing {
			if r.misses[id] == nil {
				if n, ok := r.byHandle(id); ok {
					out[id] = n
					r.names[id] = n
				}
			}
		}
		r.mu.Unlock()
		return out
	}
	r.last = time.Now()
	r.refreshs++
	r.inflight = make(chan struct{})
	r.mu.Unlock()
	r.refresh(ctx, missing)
	r.mu.Lock()
	r.named(missing, out)
	r.mu.Unlock()
	return out
}

// named sets the cached names of ids in out and returns the others (in
// ids' array). r.mu is held.
func (r *Resolver) named(ids []uint64, out map[uint64]Name) []uint64 {
	left := ids[:0]
	for _, id := range ids {
		if n, ok := r.names[id]; ok {
			out[id] = n
		} else {
			left = append(left, id)
		}
	}
	return left
}

// due reports whether some of the unnamed ids is worth a refresh: never
// tried, or past its back-off. r.mu is held.
func (r *Resolver) due(missing []uint64, now time.Time) bool {
	for _, id := range missing {
		if m := r.misses[id]; m == nil || !now.Before(m.next) {
			return true
		}
	}
	return false
}

// refresh lists the runtime's containers and names the missing ids. It
// holds refMu throughout and r.mu only to store what it found: a Resolve
// of cached ids does not wait for the runtime or for /proc. It ends the
// refresh Resolve started (r.inflight).
func (r *Resolver) refresh(ctx context.Context, missing []uint64) {
	r.refMu.Lock()
	defer r.refMu.Unlock()
	ctrs := map[uint64]Name{}  // the runtime's containers: override
	other := map[uint64]Name{} // by handle or /proc: where not cached
	if r.cfg.Lister != nil && time.Now().After(r.listRetry) {
		// A snapshot waits for this: bounded, and a runtime that failed
		// is not asked again for ListerBackoff (its last list is kept).
		ctx, cancel := context.WithTimeout(ctx, ListerTimeout)
		list, err := r.cfg.Lister.ListContainers(ctx)
		cancel()
		r.mu.Lock()
		if err != nil {
			r.listRetry = time.Now().Add(ListerBackoff)
			if !r.warned {
				r.log.Warn("container names from the container runtime", "err", err, "retry_in", ListerBackoff)
				r.warned = true
			}
		} else {
			r.warned = false
			r.byID = make(map[string]*Container, len(list))
			for i := range list {
				r.byID[list[i].ID] = &list[i]
			}
		}
		r.mu.Unlock()
	}
	for _, c := range r.byID {
		if c.Pid <= 0 {
			continue
		}
		p, err := r.procPath(c.Pid)
		if err != nil {
			continue // gone, or outside this cgroup namespace: by handle
		}
		id, err := ID(filepath.Join(r.cfg.Root, p))
		if err != nil {
			continue
		}
		pod := c.Pod
		ctrs[id] = Name{Container: c.Name, Pod: &pod, Path: p}
	}
	need := false
	for _, id := range missing {
		if _, ok := ctrs[id]; ok {
			continue
		}
		if n, ok := r.byHandle(id); ok {
			other[id] = n
			continue
		}
		need = true
	}
	if need && !r.handles {
		r.walkProc(other)
	}

	r.mu.Lock()
	defer r.mu.Unlock()
	if len(r.names) > r.cfg.MaxEntries {
		r.names = map[uint64]Name{}
	}
	for id, n := range ctrs {
		r.names[id] = n
	}
	for id, n := range other {
		if _, ok := r.names[id]; !ok {
			r.names[id] = n
		}
	}
	// What this refresh did not name makes no refresh before its
	// back-off: started, or doubled when it had passed (an id still
	// backing off, tried because a new one came, keeps its time).
	now := time.Now()
	r.last = now // MinRefresh is also counted from a long refresh's end
	if len(r.misses) > r.cfg.MaxEntries {
		clear(r.misses)
	}
	for _, id := range missing {
		if _, ok := r.names[id]; ok {
			delete(r.misses, id)
			continue
		}
		switch m := r.misses[id]; {
		case m == nil:
			r.misses[id] = &miss{next: now.Add(r.cfg.MissBackoff), wait: r.cfg.MissBackoff}
		case !now.Before(m.next):
			m.wait = min(2*m.wait, r.cfg.MaxMissBackoff)
			m.next = now.Add(m.wait)
		}
	}
	if r.inflight != nil {
		close(r.inflight)
		r.inflight = nil
	}
}

// withContainer names a path whose last element holds a listed
// container's id as that container; ok is false when it holds an id the
// runtime did not list (yet): not to be cached.
func (r *Resolver) withContainer(n Name) (Name, bool) {
	cid := containerID(n.Container)
	if cid == "" {
		return n, true
	}
	if c := r.byID[cid]; c != nil {
		pod := c.Pod
		return Name{Container: c.Name, Pod: &pod, Path: n.Path}, true
	}
	return n, false
}

// containerID returns the 64-hex-digit container id a cgroup directory's
// name holds (cri-containerd-ID.scope, crio-ID.scope, docker-ID.scope, ID),
// or "".
func containerID(base string) string {
	s := strings.TrimSuffix(base, ".scope")
	if i := strings.LastIndexByte(s, '-'); i >= 0 {
		s = s[i+1:]
	}
	if len(s) != 64 {
		return ""
	}
	for _, c := range s {
		if !(c >= '0' && c <= '9' || c >= 'a' && c <= 'f') {
			return ""
		}
	}
	return s
}

// byHandle names an id from its path (open_by_handle_at); ok is false
// when it cannot, or when the name is not final (withContainer).
func (r *Resolver) byHandle(id uint64) (Name, bool) {
	if !r.handles {
		return Name{}, false
	}
	p, err := r.pathByHandle(id)
	if err != nil {
		return Name{}, false
	}
	return r.withContainer(Name{Container: base(p), Path: p})
}

// pathByHandle returns an id's path under the mount.
func (r *Resolver) pathByHandle(id uint64) (string, error) {
	if r.rootFd < 0 {
		return "", errors.New("closed")
	}
	b := make([]byte, 8)
	binary.NativeEndian.PutUint64(b, id)
	// FILEID_KERNFS: kernfs (cgroup2) handles are the node's 64-bit id.
	fd, err := unix.OpenByHandleAt(r.rootFd, unix.NewFileHandle(0xfe, b), unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC)
	if err != nil {
		return "", err
	}
	defer unix.Close(fd)
	p, err := os.Readlink(fmt.Sprintf("/proc/self/fd/%d", fd))
	if err != nil {
		return "", err
	}
	rel, err := filepath.Rel(r.cfg.Root, p)
	if err != nil || strings.HasPrefix(rel, "..") {
		return "", fmt.Errorf("cgroup %d: path %s not under %s", id, p, r.cfg.Root)
	}
	return "/" + strings.TrimPrefix(rel, "."), nil
}

// walkProc names the cgroups of every process (without file handles) in
// names. refMu is held.
func (r *Resolver) walkProc(names map[uint64]Name) {
	ents, err := os.ReadDir(r.cfg.Proc)
	if err != nil {
		return
	}
	seen := map[string]bool{}
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid <= 0 {
			continue
		}
		p, err := r.procPath(pid)
		if err != nil || seen[p] {
			continue
		}
		seen[p] = true
		id, err := ID(filepath.Join(r.cfg.Root, p))
		if err != nil {
			continue
		}
		if _, ok := names[id]; ok {
			continue
		}
		if n, ok := r.withContainer(Name{Container: base(p), Path: p}); ok {
			names[id] = n
		}
	}
}

// procPath returns a process's cgroup path in the hierarchy (under the v2
// mount): /proc reports it relative to the reader's cgroup namespace, so a
// path out of it ("/../x") is taken from this namespace's root (nsRoot).
func (r *Resolver) procPath(pid int) (string, error) {
	p, err := ProcPath(r.cfg.Proc, pid)
	if err != nil {
		return "", err
	}
	if !strings.HasPrefix(p, "/..") {
		return path.Join(r.nsRoot, p), nil
	}
	if r.nsRoot == "" {
		return "", fmt.Errorf("process %d: cgroup %s outside this cgroup namespace", pid, p)
	}
	return path.Join(r.nsRoot, p), nil
}

// nsRoot returns where this process's cgroup namespace has its root in the
// hierarchy: "" when it is the initial one's (the reference process's
// cgroup path is within it), else the path /proc reports for this process
// from the cgroup namespace of the reference process (PID 1 with hostPID:
// the host's), less the path it reports from its own. Entering that
// namespace (setns, on a thread that then ends) needs CAP_SYS_ADMIN.
func nsRoot(proc string, ref int) (string, error) {
	init, err := ProcPath(proc, ref)
	if err != nil {
		return "", err
	}
	if !strings.HasPrefix(init, "/..") {
		return "", nil
	}
	own, err := ProcPath(proc, os.Getpid())
	if err != nil {
		return "", err
	}
	type result struct {
		p   string
		err error
	}
	res := make(chan result, 1)
	go func() {
		// Never unlocked: the thread, in another cgroup namespace, ends
		// with the goroutine.
		runtime.LockOSThread()
		fd, err := unix.Open(filepath.Join(proc, strconv.Itoa(ref), "ns/cgroup"), unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			res <- result{err: err}
			return
		}
		defer unix.Close(fd)
		if err := unix.Setns(fd, unix.CLONE_NEWCGROUP); err != nil {
			res <- result{err: fmt.Errorf("enter process %d's cgroup namespace: %w", ref, err)}
			return
		}
		p, err := ProcPath(proc, os.Getpid())
		res <- result{p, err}
	}()
	r := <-res
	if r.err != nil {
		return "", r.err
	}
	root, ok := strings.CutSuffix(r.p, strings.TrimSuffix(own, "/"))
	if !ok || strings.HasPrefix(root, "/..") {
		return "", fmt.Errorf("cgroup %s from process %d's namespace, %s from its own: no common root", r.p, ref, own)
	}
	if root == "" {
		root = "/"
	}
	return root, nil
}

// base is a cgroup path's last element; "" for the root.
func base(p string) string {
	if p == "/" || p == "" {
		return ""
	}
	return path.Base(p)
}

// ID returns the cgroup id of a cgroup v2 directory: its inode number.
func ID(dir string) (uint64, error) {
	var st unix.Stat_t
	if err := unix.Stat(dir, &st); err != nil {
		return 0, err
	}
	return st.Ino, nil
}

// ProcPath returns a process's cgroup v2 path (its "0::" line), relative to
// the reader's cgroup namespace.
func ProcPath(proc string, pid int) (string, error) {
	b, err := os.ReadFile(filepath.Join(proc, strconv.Itoa(pid), "cgroup"))
	if err != nil {
		return "", err
	}
	for _, line := range strings.Split(string(b), "\n") {
		if p, ok := strings.CutPrefix(line, "0::"); ok {
			return strings.TrimSuffix(p, " (deleted)"), nil
		}
	}
	return "", fmt.Errorf("process %d: no cgroup v2 path", pid)
}

// Mount returns the cgroup v2 mount point in a mountinfo file: of several,
// the one whose root is highest in the hierarchy (the most leading "..":
// the host's, mounted into a container with a cgroup namespace of its
// own), the first of equals.
func Mount(mountinfo string) (string, error) {
	f, err := os.Open(mountinfo)
	if err != nil {
		return "", err
	}
	defer f.Close()
	best, bestUp := "", -1
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64*1024), 1024*1024)
	for sc.Scan() {
		// id parent major:minor root mountpoint options... - fstype source superopts
		fields := strings.Fields(sc.Text())
		sep := -1
		for i, f := range fields {
			if f == "-" {
				sep = i
				break
			}
		}
		if sep < 5 || sep+1 >= len(fields) || fields[sep+1] != "cgroup2" {
			continue
		}
		root, mnt := unescape(fields[3]), unescape(fields[4])
		up := 0
		for _, el := range strings.Split(strings.Trim(root, "/"), "/") {
			if el == ".." {
				up++
			}
		}
		if root != "/" && up == 0 {
			continue // a subtree bind-mounted: not the whole hierarchy
		}
		if up > bestUp {
			best, bestUp = mnt, up
		}
	}
	if err := sc.Err(); err != nil {
		return "", err
	}
	if best == "" {
		return "", fmt.Errorf("no cgroup v2 (cgroup2) mount in %s", mountinfo)
	}
	return best, nil
}

// unescape undoes mountinfo's octal escapes (\040 for a space).
func unescape(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+4 <= len(s) {
			if v, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(v))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}
