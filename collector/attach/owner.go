package attach

import (
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/fnv"
	"io"
	"log/slog"
	"strconv"
	"strings"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// Several nsflow processes (a serve, traces, tops) may hold cls_bpf filters
// on the same clsact hook at once. Each filter is named after its owner
// (TCA_BPF_NAME) and has a handle of its own, so that every process
// replaces and deletes only its own filters, and a process can tell a dead
// one's filters from a live one's:
//
//	nsflow/pin/HASH          the filters a serve --pin leaves for the next
//	                         serve with the same pin path (HASH: of the
//	                         path); that serve adopts them (replaces their
//	                         program in place), and removes those it does
//	                         not adopt. Only one process uses a pin path at
//	                         a time (a lock on the directory).
//	nsflow/COOKIE/ID         the filters of any other process: ID is random,
//	                         and the process holds the abstract unix socket
//	                         "@nsflow/ID" in its network namespace (of that
//	                         COOKIE) for as long as it lives; the kernel
//	                         releases it when the process dies, however it
//	                         dies. A process in the same network namespace
//	                         that can bind that name knows the owner is dead.
//	nsflow                   the filters of nsflow before instances were told
//	                         apart (pin layout v2 and before). A process of
//	                         that version may still run: only a serve whose
//	                         pin path held a v2 layout (its previous process
//	                         was such a serve) removes them.
//
// Filters of owners in another network namespace (another COOKIE), of
// another pin path, and of other tools are never touched.
const (
	filterPrefix    = "nsflow"
	pinnedPrefix    = "nsflow/pin/"
	legacyName      = "nsflow" // pin layout v2 and before
	abstractPrefix  = "@nsflow/"
	maxHandleChoice = 16
)

// IsNsflowFilter reports whether a cls_bpf filter name is one of nsflow's,
// whichever process attached it.
func IsNsflowFilter(name string) bool {
	return name == legacyName || strings.HasPrefix(name, filterPrefix+"/")
}

// Owner is the identity of one nsflow process's clsact filters (see
// above). Close it when the process no longer holds any filter.
type Owner struct {
	name   string
	pinned bool
	cookie uint64 // of the process's own network namespace
	log    *slog.Logger
	live   int       // the abstract socket of a live owner, -1 when pinned
	lock   io.Closer // the pin directory's lock of a pinned owner
	legacy bool      // filters named "nsflow" are stale (see above)
}

// NewOwner returns the identity of this process's filters: with a pin
// directory (whose lock the owner keeps, closing it on Close), the pinned
// one the next process with that directory adopts; without, a live owner
// of its own.
func NewOwner(pinDir string, lock io.Closer, log *slog.Logger) (*Owner, error) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	o := &Owner{log: log, live: -1, lock: lock}
	if pl, ok := lock.(*pinLock); ok {
		o.legacy = pl.legacy
	}
	if pinDir != "" {
		h := fnv.New32a()
		h.Write([]byte(pinDir))
		o.name, o.pinned = fmt.Sprintf("%s%08x", pinnedPrefix, h.Sum32()), true
		c, err := ownCookie()
		if err != nil {
			return nil, err
		}
		o.cookie = c
		return o, nil
	}
	for try := 0; ; try++ {
		var b [8]byte
		rand.Read(b[:])
		id := fmt.Sprintf("%016x", b)
		fd, err := bindAbstract(id)
		if errors.Is(err, unix.EADDRINUSE) && try < 8 {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("bind %s%s (the liveness of this process's clsact filters): %w", abstractPrefix, id, err)
		}
		c, err := unix.GetsockoptUint64(fd, unix.SOL_SOCKET, unix.SO_NETNS_COOKIE)
		if err != nil {
			unix.Close(fd)
			return nil, fmt.Errorf("own network namespace cookie: %w", err)
		}
		o.live, o.cookie = fd, c
		o.name = fmt.Sprintf("%s/%016x/%s", filterPrefix, c, id)
		return o, nil
	}
}

// Name is the name of the owner's filters.
func (o *Owner) Name() string { return o.name }

// Pinned reports whether the owner's filters stay for the next process.
func (o *Owner) Pinned() bool { return o.pinned }

// Close lets go of the owner's identity (its filters then count as a dead
// process's, or the pin directory is unlocked).
func (o *Owner) Close() error {
	if o == nil {
		return nil
	}
	var err error
	if o.live >= 0 {
		err = unix.Close(o.live)
		o.live = -1
	}
	if o.lock != nil {
		err = errors.Join(err, o.lock.Close())
		o.lock = nil
	}
	return err
}

func bindAbstract(id string) (int, error) {
	fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return -1, err
	}
	// A leading NUL names the socket in the abstract namespace.
	if err := unix.Bind(fd, &unix.SockaddrUnix{Name: "\x00" + abstractPrefix[1:] + id}); err != nil {
		unix.Close(fd)
		return -1, err
	}
	return fd, nil
}

func ownCookie() (uint64, error) {
	fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return 0, err
	}
	defer unix.Close(fd)
	c, err := unix.GetsockoptUint64(fd, unix.SOL_SOCKET, unix.SO_NETNS_COOKIE)
	if err != nil {
		return 0, fmt.Errorf("own network namespace cookie: %w", err)
	}
	return c, nil
}

// stale reports whether a filter of that name belongs to nobody that will
// ever remove it: a dead process of this network namespace, or with a
// pinned owner that replaced a v2 layout, its previous process. The
// owner's own name is not stale.
func (o *Owner) stale(name string) bool {
	if name == legacyName {
		return o.legacy
	}
	rest, ok := strings.CutPrefix(name, filterPrefix+"/")
	if !ok || strings.HasPrefix(name, pinnedPrefix) || name == o.name {
		return false
	}
	cookie, id, ok := strings.Cut(rest, "/")
	if !ok || len(id) != 16 {
		return false
	}
	if c, err := strconv.ParseUint(cookie, 16, 64); err != nil || c != o.cookie {
		return false // another namespace's abstract sockets: cannot tell
	}
	if _, err := strconv.ParseUint(id, 16, 64); err != nil {
		return false
	}
	fd, err := bindAbstract(id)
	if err != nil {
		return false // EADDRINUSE: the owner lives
	}
	unix.Close(fd)
	return true
}

// Sweep removes, from every interface of the namespace nl is in, the
// clsact filters nobody will adopt or remove: those of dead processes, and
// with a pinned owner its own (call it on namespaces it does not observe:
// their filters would keep counting into slots that are handed to others).
// It returns how many it removed.
func (o *Owner) Sweep(nl *netlink.Handle) (int, error) {
	links, err := nl.LinkList()
	if err != nil {
		return 0, err
	}
	n := 0
	var errs []error
	for _, l := range links {
		for _, parent := range []uint32{netlink.HANDLE_MIN_INGRESS, netlink.HANDLE_MIN_EGRESS} {
			fs, err := nl.FilterList(l, parent)
			if err != nil {
				continue // no clsact qdisc
			}
			for _, f := range fs {
				bf, ok := f.(*netlink.BpfFilter)
				if !ok || !(o.stale(bf.Name) || (o.pinned && bf.Name == o.name)) {
					continue
				}
				if err := nl.FilterDel(bf); err != nil && !gone(err) {
					errs = append(errs, fmt.Errorf("remove stale filter %s on %s: %w", bf.Name, l.Attrs().Name, err))
					continue
				}
				o.log.Info("removed a clsact filter nobody adopts", "filter", bf.Name, "interface", l.Attrs().Name)
				n++
			}
		}
	}
	return n, errors.Join(errs...)
}

// randomHandle is a cls_bpf handle for a new filter: any but 0 (the kernel
// would pick one nsflow cannot know without reading it back).
func randomHandle() uint32 {
	for {
		var b [4]byte
		rand.Read(b[:])
		if h := binary.LittleEndian.Uint32(b[:]); h != 0 {
			return h
		}
	}
}
