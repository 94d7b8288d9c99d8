package discovery

import (
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/nsflow/nsflow/collector"
)

// Why a namespace was not observed (Skipped.Reason, the reason label of
// nsflow_namespaces_skipped_total).
const (
	// SkipPermission: a reference to a namespace (a process's
	// /proc/PID/ns/net, a bind mount) that nsflow may not open. For a
	// process of another uid, a non-dumpable one, or one whose permitted
	// capabilities are not a subset of nsflow's (any root process, when
	// nsflow runs with a reduced set), that is CAP_SYS_PTRACE missing
	// (collector.ObserveCapability); otherwise an LSM (AppArmor, SELinux)
	// denying it. The namespace behind it is
	// unknown, so it is counted once per reference: per process, per
	// bind mount.
	SkipPermission = "permission"
	// SkipGone: a namespace found that vanished before it could be
	// observed (its traffic, while it lived, was not seen).
	SkipGone = "gone"
	// SkipOther: any other error opening a namespace or a reference to one.
	SkipOther = "other"
	// SkipUserns: a namespace found only through its processes, owned by
	// a user namespace other than the initial one (Config.UserNamespaces
	// observes it), counted once per namespace.
	SkipUserns = "userns"
)

// SkipReasons are the reasons, in the order they are reported.
var SkipReasons = []string{SkipPermission, SkipGone, SkipOther, SkipUserns}

// Skipped is a namespace, or a reference to one, that could not be
// observed.
type Skipped struct {
	// Key identifies what is counted once: "pid:PID@START" for a process
	// (START: its start time, so that a reused pid counts again), the path
	// for a bind mount, "inode:N" for a namespace found.
	Key    string `json:"-"`
	Path   string `json:"path"`
	Pid    int    `json:"pid,omitempty"`
	Uid    int    `json:"uid,omitempty"` // real uid of Pid (-1: unknown)
	Comm   string `json:"comm,omitempty"`
	Inode  uint64 `json:"inode,omitempty"` // when known
	Reason string `json:"reason"`
	Err    string `json:"error"`

	pids []int // SkipUserns: every process of the namespace
}

func (s Skipped) logAttrs() []any {
	a := []any{"reason", s.Reason, "path", s.Path, "err", s.Err}
	if s.Pid != 0 {
		a = append(a, "pid", s.Pid, "uid", s.Uid, "comm", s.Comm)
	}
	if s.Inode != 0 {
		a = append(a, "inode", s.Inode)
	}
	return a
}

// refReason classifies an error reading a namespace reference; "" when it
// is not a skip: the reference is gone (a process that exited, a bind mount
// removed: nothing was known of a namespace behind it) or is not a
// namespace (a bind-mount target not mounted yet, or left behind).
func refReason(err error) string {
	switch {
	case err == nil, errors.Is(err, fs.ErrNotExist), errors.Is(err, unix.ESRCH), errors.Is(err, errNotNamespace):
		return ""
	case errors.Is(err, fs.ErrPermission):
		return SkipPermission
	}
	return SkipOther
}

// addReason classifies an error of Observer.Add for a namespace a scan
// found.
func addReason(err error) string {
	switch {
	case errors.Is(err, collector.ErrNamespaceNotFound), errors.Is(err, fs.ErrNotExist), errors.Is(err, unix.ESRCH):
		return SkipGone
	case errors.Is(err, fs.ErrPermission):
		return SkipPermission
	}
	return SkipOther
}

// procSkip describes a process whose namespace could not be read, or
// returns ok false when there is nothing to report: the process is gone
// (the kernel answers EACCES, not ENOENT, for a process that exits while
// its ns link is followed), or the error is not a skip.
func procSkip(procDir string, pid int, err error) (Skipped, bool) {
	reason := refReason(err)
	if reason == "" {
		return Skipped{}, false
	}
	uid, comm, start, ok := procInfo(procDir, pid)
	if !ok {
		return Skipped{}, false // gone
	}
	return Skipped{
		Key:  fmt.Sprintf("pid:%d@%s", pid, start),
		Path: filepath.Join(procDir, strconv.Itoa(pid), "ns/net"), Pid: pid, Uid: uid,
		Comm: comm, Reason: reason, Err: err.Error(),
	}, true
}

// procInfo returns a process's real uid, command and start time, or ok
// false when it is gone.
func procInfo(procDir string, pid int) (uid int, comm, start string, ok bool) {
	dir := filepath.Join(procDir, strconv.Itoa(pid))
	if start, ok = procStart(dir); !ok {
		return 0, "", "", false
	}
	b, _ := os.ReadFile(filepath.Join(dir, "comm"))
	return procUid(dir), strings.TrimSpace(string(b)), start, true
}

// procStart returns a process's start time (field 22 of /proc/PID/stat,
// readable whoever owns the process), or ok false when it is gone.
func procStart(dir string) (string, bool) {
	b, err := os.ReadFile(filepath.Join(dir, "stat"))
	if err != nil {
		return "", false
	}
	// comm, in parentheses, may hold spaces and parentheses: the fields
	// follow the last ')'.
	i := strings.LastIndexByte(string(b), ')')
	if i < 0 {
		return "", false
	}
	f := strings.Fields(string(b[i+1:]))
	if len(f) < 20 {
		return "", false
	}
	return f[19], true // field 22: state is field 3, f[0]
}

// procUid returns the real uid of a process (/proc/PID/status), -1 when
// it cannot be read.
func procUid(dir string) int {
	b, err := os.ReadFile(filepath.Join(dir, "status"))
	if err != nil {
		return -1
	}
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, "Uid:"); ok {
			if f := strings.Fields(v); len(f) > 0 {
				if uid, err := strconv.Atoi(f[0]); err == nil {
					return uid
				}
			}
		}
	}
	return -1
}

// skips counts what discovery could not observe, each namespace or
// reference once for as long as scans keep finding it.
type skips struct {
	counts map[string]uint64
	seen   map[string]uint64 // key → the last scan that found it
	warned int               // permission skips logged as warnings
	userns int               // user-namespace skips logged
}

// maxPermissionWarnings bounds the warnings about references nsflow may not
// read: without CAP_SYS_PTRACE every process with capabilities nsflow lacks
// is one (every root process and kernel thread of the node); after these,
// each is logged at debug level.
const maxPermissionWarnings = 20

func newSkips() skips {
	c := map[string]uint64{}
	for _, r := range SkipReasons {
		c[r] = 0
	}
	return skips{counts: c, seen: map[string]uint64{}}
}

// record counts s unless it was already counted, and logs it the first
// time (permission and other as warnings: nsflow is blind to something;
// gone at debug level: a namespace too short-lived to observe). scan is
// the current scan's number. The caller holds the Discovery's lock.
func (k *skips) record(s Skipped, scan uint64, log *slog.Logger) {
	if _, ok := k.seen[s.Key]; ok {
		k.seen[s.Key] = scan
		return
	}
	k.seen[s.Key] = scan
	k.counts[s.Reason]++
	switch s.Reason {
	case SkipGone:
		log.Debug("namespace vanished before it could be observed", s.logAttrs()...)
	case SkipPermission:
		const msg = "namespace not observed: permission denied (a process of another user, or with capabilities nsflow lacks, needs CAP_SYS_PTRACE; otherwise an LSM denies it)"
		k.warned++
		switch {
		case k.warned < maxPermissionWarnings:
			log.Warn(msg, s.logAttrs()...)
		case k.warned == maxPermissionWarnings:
			log.Warn(msg+"; further ones are logged at debug level only, and counted", s.logAttrs()...)
		default:
			log.Debug(msg, s.logAttrs()...)
		}
	case SkipUserns:
		// Any user can make thousands: one line says what happens to
		// them all, the rest are counted (and logged at debug level).
		k.userns++
		if k.userns == 1 {
			log.Warn("namespace not observed: owned by a user namespace other than the initial one, as any unprivileged user can create thousands (unshare -Urn); --netns.userns observes them; this one and every further one are counted in nsflow_namespaces_skipped_total{reason=\"userns\"} and logged at debug level only", s.logAttrs()...)
		} else {
			log.Debug("namespace not observed: owned by another user namespace", s.logAttrs()...)
		}
	default:
		log.Warn("namespace not observed", s.logAttrs()...)
	}
}

// prune forgets what the scan numbered scan did not find again.
func (k *skips) prune(scan uint64) {
	for key, last := range k.seen {
		if last < scan {
			delete(k.seen, key)
		}
	}
}

// Skipped returns how many namespaces (or references to one, see
// SkipPermission) discovery could not observe, by reason; every reason is
// present, at 0 until one happens.
func (d *Discovery) Skipped() map[string]uint64 {
	d.mu.Lock()
	defer d.mu.Unlock()
	out := make(map[string]uint64, len(d.skips.counts))
	for r, n := range d.skips.counts {
		out[r] = n
	}
	return out
}
