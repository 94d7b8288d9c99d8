// Package collector is nsflow's engine: it loads the BPF programs, keeps
// the registry of observed network namespaces and their interfaces
// (attaching through collector/attach, following link events through
// collector/linkwatch), and reads the maps into snapshots (collector/flow)
// and flow events. collector/discovery decides which namespaces it observes.
package collector

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"path/filepath"
	"sort"
	"sync"
	"time"

	"github.com/cilium/ebpf"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/nsflow/nsflow/bpf"
	"github.com/nsflow/nsflow/collector/attach"
	"github.com/nsflow/nsflow/collector/flow"
	"github.com/nsflow/nsflow/collector/linkwatch"
)

// Config configures a Collector.
type Config struct {
	// Mode selects the attach mechanism; empty means attach.ModeAuto.
	Mode attach.Mode
	// FlowEntries is the flow map's capacity; 0 means
	// bpf.DefaultFlowEntries for the node's CPUs.
	FlowEntries uint32
	// MaxPoints is how many hooks (two per interface) the totals can
	// count, at most bpf.MaxPointsLimit; 0 means bpf.DefaultMaxPoints for
	// the node's CPUs.
	MaxPoints uint32
	// NoFlows keeps only the exact per-interface totals.
	NoFlows bool
	// Events streams new flows (FlowEvents); the stream must then be read.
	Events bool
	// PinPath, when set, pins the maps and the TCX links there (on a bpffs,
	// mounted if absent): they outlive the process, which then leaves
	// everything attached on Close, and the next Collector with the same
	// PinPath adopts them, so that no packet goes uncounted across a
	// restart. Without it, Close detaches everything.
	PinPath string
	// HostVeths observes the host ends of veth (and netkit) pairs whose
	// peer is attached in another observed namespace, too. By default they
	// are left out (state peer-observed), so that each packet between pods
	// is counted once, on the pod side (see hostveth.go).
	HostVeths bool
	// MaxInterfaces is how many interfaces of one namespace (the host's
	// excepted) are attached; 0 means DefaultMaxInterfaces. Those over it
	// are not attached (state refused) and counted (Refused).
	MaxInterfaces int
	// ReservedPoints is how many slots of the totals only ClassNamed and
	// ClassHost namespaces may take; 0 means MaxPoints/8, < 0 none.
	ReservedPoints int
	// Attribution records in each egress flow the cgroup v2 id of its
	// sending socket (Flow.SrcCgroup; with the reverse flow's, DstCgroup),
	// named through the resolver (SetResolver). Ignored with NoFlows.
	Attribution bool
	// SocketLookup records in each ingress TCP and UDP flow the cgroup of
	// the socket that receives it (Flow.DstCgroup), looked up at the flow's
	// first packet. Ignored with NoFlows.
	SocketLookup bool
	// Containers keeps per (observation point, cgroup) totals
	// (Snapshot.Containers, DefaultContainerEntries of them); it implies
	// Attribution and SocketLookup, and needs the flows.
	Containers bool
	// Logger receives one line per lifecycle event; nil discards them.
	Logger *slog.Logger
}

// DefaultMaxInterfaces is Config.MaxInterfaces's default.
const DefaultMaxInterfaces = 64

// Collector owns the loaded BPF objects and everything attached with them.
// It is safe for concurrent use.
type Collector struct {
	objs *bpf.Objects
	log  *slog.Logger
	cfg  Config

	mu           sync.Mutex
	mode         attach.Mode // resolved: ModeTCX or ModeClsact
	att          attach.Attacher
	namespaces   map[uint64]*namespace
	hostIno      uint64 // the namespace nsflow runs in (HostVeths)
	closed       bool
	attachErrors map[string]uint64
	refused      map[string]uint64 // by RefusedReasons
	pins         *attach.Pins      // nil without PinPath
	owner        *attach.Owner     // names its clsact filters; holds the pin path's lock
	lastFlows    int               // flows in the last snapshot: the next one's capacity
	// adds counts the namespaces Add registered: each one's seq (pod
	// identities are only taken by namespaces registered before the
	// runtime was asked, PodGeneration).
	adds  uint64
	onAdd func()
	// orphans are observation points a previous process left counted
	// (pinned) that no observed interface claimed, since when: Prune
	// forgets them like the points of a removed interface.
	orphans map[bpf.NsflowObsKey]time.Time
	// resolver names cgroup ids in snapshots (SetResolver); nil: none.
	resolver CgroupResolver
}

// PodGeneration returns a number that grows whenever Add registers a
// namespace: take it before asking the container runtime, and pass it to
// SetPods.
func (c *Collector) PodGeneration() uint64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.adds
}

// SetPods names observed namespaces (by inode) with the pods the runtime
// reported. A namespace keeps its pod until it is forgotten (Prune), also
// when the runtime no longer lists it (a stopping pod's last increments
// stay labelled) or is down; one registered again under its inode (the
// kernel reused it, or it was removed and added back) starts without one.
// gen is PodGeneration before the runtime was asked: a namespace registered
// since takes nothing from pods (its inode may have been another's when the
// runtime's path was resolved), nor does one already gone.
func (c *Collector) SetPods(pods map[uint64]flow.PodInfo, gen uint64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for ino, ns := range c.namespaces {
		if p, ok := pods[ino]; ok && ns.gone.IsZero() && ns.seq <= gen {
			ns.pod = &p
		}
	}
}

// OnAdd registers a function called (in its own goroutine) whenever a
// namespace starts being observed, e.g. to look up its pod at once.
func (c *Collector) OnAdd(fn func()) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.onAdd = fn
}

type namespace struct {
	name   string
	path   string
	inode  uint64
	cookie uint64 // SO_NETNS_COOKIE: names its pinned state
	handle netns.NsHandle
	nl     *netlink.Handle
	ifaces map[int]*iface
	watch  *linkwatch.Watch // guarded by Collector.mu
	stop   chan struct{}
	done   chan struct{}
	gone   time.Time
	seq    uint64        // registration order (Collector.adds)
	pod    *flow.PodInfo // last known; nil until the runtime names it
	nsid   int           // the host's nsid for it; -1 until known (hostveth.go)
}

type iface struct {
	index   int
	name    string
	state   flow.AttachState
	err     error
	att     attach.Attachment
	progIDs []ebpf.ProgramID // of its stubs, while attached
	gone    time.Time        // when the interface was deleted; zero while it exists
	// A host end of a pair: its peer's nsid and ifindex (peerIndex 0: not
	// one); left out (StatePeerObserved) since skipped, its counters
	// forgotten once Prune has passed that.
	peerNsid, peerIndex int
	peer                string // the peer, as netns/interface, while left out
	skipped             time.Time
	forgotten           bool
}

// New loads the BPF programs and maps; nothing is attached yet.
func New(cfg Config) (*Collector, error) {
	if cfg.Mode == "" {
		cfg.Mode = attach.ModeAuto
	}
	if _, err := attach.ParseMode(string(cfg.Mode)); err != nil {
		return nil, err
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if err := CheckCapabilities(); err != nil {
		return nil, err
	}
	opts := bpf.Options{FlowEntries: cfg.FlowEntries, MaxPoints: cfg.MaxPoints, NoFlows: cfg.NoFlows, Events: cfg.Events}
	if cfg.Containers {
		cfg.Attribution, cfg.SocketLookup = true, true
		opts.ContainerEntries = DefaultContainerEntries
	}
	opts.Attribution, opts.SocketLookup = cfg.Attribution, cfg.SocketLookup
	var pins *attach.Pins
	var owner *attach.Owner
	if cfg.PinPath != "" {
		dir, lock, err := attach.PreparePins(cfg.PinPath, cfg.Logger)
		if err != nil {
			return nil, err
		}
		if owner, err = attach.NewOwner(dir, lock, cfg.Logger); err != nil {
			lock.Close()
			return nil, err
		}
		opts.PinPath = dir
		opts.OnReplace = func(name string, why error) {
			cfg.Logger.Warn("pinned map incompatible with this version: replacing it (its counts restart)", "map", name, "reason", why)
		}
		if pins, err = attach.LoadPins(filepath.Join(dir, "links"), cfg.Logger); err != nil {
			owner.Close()
			return nil, err
		}
	} else {
		var err error
		if owner, err = attach.NewOwner("", nil, cfg.Logger); err != nil {
			return nil, err
		}
	}
	objs, err := bpf.Load(opts)
	if err != nil {
		pins.ReleasePending()
		owner.Close()
		return nil, fmt.Errorf("%w (nsflow needs Linux 6.1+ with BTF)", err)
	}
	c := &Collector{
		objs:         objs,
		log:          cfg.Logger,
		cfg:          cfg,
		pins:         pins,
		owner:        owner,
		namespaces:   map[uint64]*namespace{},
		attachErrors: map[string]uint64{},
		refused:      map[string]uint64{},
		orphans:      map[bpf.NsflowObsKey]time.Time{},
	}
	c.setMode(cfg.Mode)
	if self, err := netns.Get(); err == nil {
		c.hostIno, _ = inode(self)
		self.Close()
	}
	return c, nil
}

func (c *Collector) setMode(m attach.Mode) {
	c.mode = m
	if m == attach.ModeClsact {
		c.att = attach.NewClsact(c.owner)
	} else {
		c.att = attach.NewTCX(c.pins)
	}
}

// DropStalePins releases the pinned links of a previous process that no
// observed interface claimed (their namespace or interface is gone), and
// marks the observation points they counted as gone: Prune forgets them
// after the grace period, like those of an interface removed while this
// process runs. Call it once discovery has observed everything.
func (c *Collector) DropStalePins() int {
	n := c.pins.DropPending()
	if n > 0 {
		c.log.Info("released stale pinned links", "links", n)
	}
	now := time.Now()
	c.mu.Lock()
	defer c.mu.Unlock()
	orphans := 0
	for k := range c.objs.Slots() {
		ns := c.namespaces[uint64(k.Netns)]
		if ns != nil && ns.gone.IsZero() {
			if i := ns.ifaces[int(k.Ifindex)]; i != nil && i.gone.IsZero() {
				continue
			}
		}
		if _, ok := c.orphans[k]; !ok {
			c.orphans[k] = now
			orphans++
		}
	}
	if orphans > 0 {
		c.log.Info("counters of a previous process for interfaces that are gone: kept for the grace period", "points", orphans)
	}
	return n
}

// Mode returns the attach mechanism in use. Under ModeAuto it is ModeTCX
// until an attach finds the kernel without TCX, then ModeClsact.
func (c *Collector) Mode() attach.Mode {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.mode == attach.ModeAuto {
		return attach.ModeTCX
	}
	return c.mode
}

// AddAsync registers the namespace t refers to and queues its attach work
// by t.Class; it returns its inode at once (WaitIdle waits for the work).
func (c *Collector) AddAsync(t Target) (uint64, error) {
	return c.Add(t) // TODO(H1): queued work
}

// WaitIdle returns once no attach work is queued or running, or ctx is
// done (its error then).
func (c *Collector) WaitIdle(ctx context.Context) error {
	return ctx.Err()
}

// Add starts observing the namespace t refers to: every interface in it now,
// and every interface that appears later. Observing a namespace twice (under
// two names or paths) is a no-op. It returns the namespace inode. An error
// for one interface does not stop the others; all such errors are returned.
func (c *Collector) Add(t Target) (uint64, error) {
	h, err := netns.GetFromPath(t.Path)
	if err != nil {
		if errors.Is(err, unix.ENOENT) {
			return 0, fmt.Errorf("netns %s: %w", t.Name, ErrNamespaceNotFound)
		}
		return 0, fmt.Errorf("open netns %s: %w", t.Name, err)
	}
	ino, err := inode(h)
	if err != nil {
		h.Close()
		return 0, fmt.Errorf("stat netns %s: %w", t.Name, err)
	}
	cookie, err := netnsCookie(h)
	if err != nil {
		h.Close()
		return 0, fmt.Errorf("netns %s: %w", t.Name, err)
	}

	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		h.Close()
		return 0, errors.New("collector closed")
	}
	if ns, ok := c.namespaces[ino]; ok {
		if ns.gone.IsZero() {
			h.Close()
			return ino, nil
		}
		// The kernel reused the inode of a namespace removed earlier: its
		// counters must not carry over into the new one.
		delete(c.namespaces, ino)
		c.mu.Unlock()
		err := c.forget(func(netns, _ uint32) bool { return netns == uint32(ino) })
		c.mu.Lock()
		if err != nil {
			c.log.Warn("forget reused namespace inode", "inode", ino, "err", err)
		}
	}
	c.releaseOtherNamespacesLocked(ino, cookie)
	nl, err := netlink.NewHandleAt(h, unix.NETLINK_ROUTE)
	if err != nil {
		h.Close()
		return 0, fmt.Errorf("netlink in netns %s: %w", t.Name, err)
	}
	c.adds++
	ns := &namespace{
		name: t.Name, path: t.Path, inode: ino, cookie: cookie, handle: h, nl: nl, seq: c.adds, nsid: -1,
		ifaces: map[int]*iface{}, stop: make(chan struct{}), done: make(chan struct{}),
	}
	// Subscribe before listing, so that no interface added in between is missed.
	if ns.watch, err = linkwatch.Open(h); err != nil {
		nl.Close()
		h.Close()
		return 0, fmt.Errorf("subscribe to link events in netns %s: %w", t.Name, err)
	}
	c.namespaces[ino] = ns
	go c.follow(ns)

	links, errs := c.resyncLocked(ns)
	c.log.Info("observing netns", "netns", t.Name, "inode", ino, "interfaces", links, "mode", c.mode)
	if c.onAdd != nil {
		go c.onAdd()
	}
	return ino, errs
}

// resyncLocked attaches to every interface of ns not yet attached and
// releases those that are gone. It returns the number of interfaces.
func (c *Collector) resyncLocked(ns *namespace) (int, error) {
	links, err := linkwatch.List(ns.nl)
	if err != nil {
		return 0, fmt.Errorf("list interfaces in netns %s: %w", ns.name, err)
	}
	var errs []error
	present := map[int]bool{}
	for _, l := range links {
		present[l.Attrs().Index] = true
		if err := c.placeLocked(ns, l); err != nil {
			if vanished(ns.nl, l.Attrs().Index) {
				// Deleted between the listing and the attach (pods come
				// and go): its RTM_DELLINK marks it gone; not an error.
				c.log.Debug("interface vanished while attaching", "netns", ns.name, "interface", l.Attrs().Name, "err", err)
				continue
			}
			errs = append(errs, err)
		}
	}
	for idx, i := range ns.ifaces {
		if !present[idx] && i.gone.IsZero() {
			c.detachLocked(ns, idx, "interface gone")
			i.gone = time.Now()
		}
	}
	return len(links), errors.Join(errs...)
}

// vanished reports whether the interface of that index no longer exists.
func vanished(nl *netlink.Handle, index int) bool {
	_, err := nl.LinkByIndex(index)
	var nf netlink.LinkNotFoundError
	return errors.As(err, &nf)
}

// follow applies the link events of one namespace until it is removed. If
// the subscription fails (events lost to a full socket buffer), it
// subscribes again and resynchronizes from a full listing.
func (c *Collector) follow(ns *namespace) {
	defer close(ns.done)
	c.mu.Lock()
	w := ns.watch
	c.mu.Unlock()
	backoff := 10 * time.Millisecond
	for {
		err := w.Run(func(u netlink.LinkUpdate) { c.apply(ns, u) })
		select {
		case <-ns.stop:
			return
		default:
		}
		c.log.Warn("link events", "netns", ns.name, "err", err)
		w.Close()
		for {
			if w, err = linkwatch.Open(ns.handle); err == nil {
				break
			}
			c.log.Warn("resubscribe to link events", "netns", ns.name, "err", err, "retry_in", backoff)
			select {
			case <-ns.stop:
				return
			case <-time.After(backoff):
			}
			backoff = min(2*backoff, 5*time.Second)
		}
		backoff = 10 * time.Millisecond
		c.mu.Lock()
		if !ns.gone.IsZero() { // removed while resubscribing
			c.mu.Unlock()
			w.Close()
			return
		}
		ns.watch = w
		if _, err := c.resyncLocked(ns); err != nil {
			c.log.Warn("resync", "netns", ns.name, "err", err)
		}
		c.mu.Unlock()
	}
}

func (c *Collector) apply(ns *namespace, u netlink.LinkUpdate) {
	a := u.Link.Attrs()
	c.mu.Lock()
	defer c.mu.Unlock()
	if !ns.gone.IsZero() {
		return // drain until the subscription closes the channel
	}
	switch u.Header.Type {
	case unix.RTM_NEWLINK:
		if err := c.placeLocked(ns, u.Link); err != nil {
			if errors.Is(err, unix.EEXIST) {
				// An interface moved in from another observed namespace
				// still carries the links attached there until that
				// namespace's DELLINK is handled: try again shortly.
				go c.retryAttach(ns, a.Index, a.Name)
				return
			}
			c.log.Warn("attach", "err", err)
		}
	case unix.RTM_DELLINK:
		c.detachLocked(ns, a.Index, "interface removed")
		if i, ok := ns.ifaces[a.Index]; ok {
			i.gone = time.Now()
		}
		c.linkGoneLocked(ns, u.Link)
	}
}

// retryAttach retries a failed attach a few times, with backoff.
func (c *Collector) retryAttach(ns *namespace, index int, name string) {
	delay := 5 * time.Millisecond
	var err error
	for try := 0; try < 8; try++ {
		time.Sleep(delay)
		delay *= 2
		c.mu.Lock()
		if !ns.gone.IsZero() || c.closed {
			c.mu.Unlock()
			return
		}
		i, ok := ns.ifaces[index]
		if !ok || i.state != flow.StateFailed || i.name != name {
			c.mu.Unlock()
			return // attached meanwhile, or gone
		}
		err = c.attachLocked(ns, index, name)
		if err == nil {
			if ns.inode == c.hostIno {
				c.replaceLocked(ns, index) // moved into the host: its peer may count it
			} else {
				c.peerAttachedLocked(ns, index)
			}
		}
		c.mu.Unlock()
		if err == nil {
			return
		}
	}
	c.log.Warn("attach", "err", err)
}

// attachLocked attaches to one interface unless already attached; a renamed
// interface keeps its attachment under the new name.
func (c *Collector) attachLocked(ns *namespace, index int, name string) error {
	if i, ok := ns.ifaces[index]; ok && i.state == flow.StateAttached {
		i.name = name
		return nil
	}
	// What the interface's frames start with (an Ethernet header or the
	// network header): the stubs hand it to the parser.
	link := bpf.LinkEther
	if l, lerr := ns.nl.LinkByIndex(index); lerr == nil {
		link = bpf.LinkOf(l.Attrs().EncapType)
	}
	progs, ids, err := c.stubsLocked(ns.inode, ns.cookie, index, link)
	var att attach.Attachment
	if err == nil {
		att, err = c.att.Attach(ns.handle, ns.nl, ns.cookie, index, progs)
		if err != nil && c.mode == attach.ModeAuto && errors.Is(err, ebpf.ErrNotSupported) {
			c.log.Info("kernel without TCX: falling back to clsact + cls_bpf")
			c.setMode(attach.ModeClsact)
			att, err = c.att.Attach(ns.handle, ns.nl, ns.cookie, index, progs)
		}
		// Attached, the kernel holds the stubs; this process needs no fd.
		progs.Ingress.Close()
		progs.Egress.Close()
	}
	i := &iface{index: index, name: name, state: flow.StateAttached, att: att, progIDs: ids}
	if err != nil {
		i.state, i.err, i.att, i.progIDs = flow.StateFailed, err, nil, nil
		c.attachErrors[errorReason(err)]++
		ns.ifaces[index] = i
		return fmt.Errorf("attach to %s in netns %s: %w", name, ns.name, err)
	}
	ns.ifaces[index] = i
	c.log.Debug("attached", "netns", ns.name, "interface", name, "ifindex", index)
	return nil
}

// stubsLocked loads the stubs for the two hooks of one interface, each
// counting into its own observation point's slot of totals (a pinned one
// only when recorded for the same namespace: cookie).
func (c *Collector) stubsLocked(inode, cookie uint64, index int, link bpf.Link) (attach.Programs, []ebpf.ProgramID, error) {
	var progs [2]*ebpf.Program
	var ids []ebpf.ProgramID
	for _, dir := range []bpf.Direction{bpf.RX, bpf.TX} {
		key := bpf.NsflowObsKey{Netns: uint32(inode), Ifindex: uint32(index), Dir: uint8(dir)}
		p, err := c.objs.StubFor(bpf.Hook{Point: key, Cookie: cookie, Link: link})
		if err != nil {
			if progs[bpf.RX] != nil {
				progs[bpf.RX].Close()
			}
			return attach.Programs{}, nil, err
		}
		delete(c.orphans, key) // claimed again
		progs[dir] = p
		if info, err := p.Info(); err == nil {
			if id, ok := info.ID(); ok {
				ids = append(ids, id)
			}
		}
	}
	return attach.Programs{Ingress: progs[bpf.RX], Egress: progs[bpf.TX]}, ids, nil
}

func (c *Collector) detachLocked(ns *namespace, index int, why string) {
	i, ok := ns.ifaces[index]
	if !ok {
		return
	}
	if i.att != nil {
		if err := i.att.Close(); err != nil {
			c.log.Warn("detach", "netns", ns.name, "interface", i.name, "err", err)
		}
		i.att = nil
	}
	i.progIDs = nil
	if i.state == flow.StateAttached {
		i.state = flow.StateDetached
	}
	c.log.Debug("detached", "netns", ns.name, "interface", i.name, "reason", why)
}

// Remove stops observing a namespace: its interfaces are detached and every
// handle into it is closed, so the kernel can free it. Its counters stay
// readable (marked gone) until Prune forgets them.
func (c *Collector) Remove(inode uint64) { c.remove(inode, false) }

// remove stops observing a namespace; keep leaves its attachments in the
// kernel (pinned) for the next process.
func (c *Collector) remove(inode uint64, keep bool) {
	c.mu.Lock()
	ns, ok := c.namespaces[inode]
	if !ok || !ns.gone.IsZero() {
		c.mu.Unlock()
		return
	}
	ns.gone = time.Now()
	if !keep && !c.closed {
		c.peerLostLocked(ns, -1) // host ends back before ns's ends go
	}
	for idx, i := range ns.ifaces {
		if keep && i.att != nil {
			if err := i.att.Release(); err != nil {
				c.log.Warn("release", "netns", ns.name, "interface", i.name, "err", err)
			}
			i.att = nil
			continue
		}
		c.detachLocked(ns, idx, "namespace removed")
	}
	close(ns.stop)
	ns.watch.Close() // unblocks follow()
	c.mu.Unlock()
	<-ns.done // follow() has returned: the subscription socket is closed
	ns.nl.Close()
	ns.handle.Close()
	c.log.Info("stopped observing netns", "netns", ns.name, "inode", inode)
}

// Prune forgets namespaces and interfaces removed before the given time,
// deleting their counters and flows from the maps.
func (c *Collector) Prune(before time.Time) error {
	type ifKey struct{ netns, ifindex uint32 }
	nsGone := map[uint32]bool{}
	ifGone := map[ifKey]bool{}
	orphans := map[bpf.NsflowObsKey]bool{}
	c.mu.Lock()
	for k, since := range c.orphans {
		if since.Before(before) {
			orphans[k] = true
			delete(c.orphans, k)
		}
	}
	for ino, ns := range c.namespaces {
		if !ns.gone.IsZero() && ns.gone.Before(before) {
			nsGone[uint32(ino)] = true
			delete(c.namespaces, ino)
			continue
		}
		for idx, i := range ns.ifaces {
			if !i.gone.IsZero() && i.gone.Before(before) {
				ifGone[ifKey{uint32(ino), uint32(idx)}] = true
				delete(ns.ifaces, idx)
			} else if i.state == flow.StatePeerObserved && !i.forgotten && i.skipped.Before(before) {
				ifGone[ifKey{uint32(ino), uint32(idx)}] = true
				i.forgotten = true
			}
		}
	}
	c.mu.Unlock()
	if len(nsGone) == 0 && len(ifGone) == 0 && len(orphans) == 0 {
		return nil
	}
	err := c.forget(func(netns, ifindex uint32) bool { return nsGone[netns] || ifGone[ifKey{netns, ifindex}] })
	if len(orphans) > 0 {
		_, oerr := c.objs.ReleasePoints(func(k bpf.NsflowObsKey) bool { return orphans[k] })
		err = errors.Join(err, oerr)
	}
	return err
}

// forget deletes the counters and flows of the matching observation points
// from the maps.
func (c *Collector) forget(match func(netns, ifindex uint32) bool) error {
	// Releasing a point deletes its flows too (bpf.Objects.FlowsDeleted
	// counts them), before its slot can be handed to another point.
	_, err := c.objs.ReleasePoints(func(k bpf.NsflowObsKey) bool { return match(k.Netns, k.Ifindex) })
	return err
}

// Rename changes the name a namespace is reported under.
func (c *Collector) Rename(inode uint64, name string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if ns, ok := c.namespaces[inode]; ok {
		c.log.Info("namespace renamed", "inode", inode, "from", ns.name, "to", name)
		ns.name = name
	}
}

// Close detaches everything and releases the BPF objects. With PinPath, it
// leaves the programs attached and the maps pinned instead, for the next
// process to adopt.
func (c *Collector) Close() error {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return nil
	}
	c.closed = true
	var live []uint64
	for ino, ns := range c.namespaces {
		if ns.gone.IsZero() {
			live = append(live, ino)
		}
	}
	c.mu.Unlock()
	for _, ino := range live {
		c.remove(ino, c.pins != nil)
	}
	c.pins.ReleasePending()
	err := c.objs.Close()
	// Last: a pinned owner's lock on the pin path, a live one's liveness.
	return errors.Join(err, c.owner.Close())
}

// Interfaces describes the observed namespaces, their interfaces and the
// attach state of each, sorted by namespace name and ifindex.
func (c *Collector) Interfaces() []NamespaceInfo {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := make([]NamespaceInfo, 0, len(c.namespaces))
	for _, ns := range c.namespaces {
		ni := NamespaceInfo{Name: ns.name, Path: ns.path, Inode: ns.inode, Gone: !ns.gone.IsZero()}
		for _, i := range ns.ifaces {
			ii := InterfaceInfo{Name: i.name, Index: i.index, State: i.state, Peer: i.peer}
			if i.err != nil {
				ii.Error = i.err.Error()
			}
			ni.Interfaces = append(ni.Interfaces, ii)
		}
		sort.Slice(ni.Interfaces, func(a, b int) bool { return ni.Interfaces[a].Index < ni.Interfaces[b].Index })
		out = append(out, ni)
	}
	sort.Slice(out, func(a, b int) bool { return out[a].Name < out[b].Name })
	return out
}

// NamespaceInfo describes an observed namespace.
type NamespaceInfo struct {
	Name       string          `json:"name"`
	Path       string          `json:"path"`
	Inode      uint64          `json:"inode"`
	Gone       bool            `json:"gone,omitempty"`
	Interfaces []InterfaceInfo `json:"interfaces"`
}

// InterfaceInfo describes one interface and nsflow's programs on it.
type InterfaceInfo struct {
	Name  string           `json:"name"`
	Index int              `json:"ifindex"`
	State flow.AttachState `json:"state"`
	Error string           `json:"error,omitempty"`
	// Peer is the peer (netns/interface) that counts a host end left out
	// (StatePeerObserved).
	Peer string `json:"peer,omitempty"`
}

// ProgramIDs returns the kernel IDs of the loaded programs: the parsers
// (ingress, egress) and the stubs attached now, e.g. to check with the
// kernel that they are gone after Close.
func (c *Collector) ProgramIDs() []ebpf.ProgramID {
	var ids []ebpf.ProgramID
	for _, p := range []*ebpf.Program{c.objs.NsflowIngress, c.objs.NsflowEgress} {
		if info, err := p.Info(); err == nil {
			if id, ok := info.ID(); ok {
				ids = append(ids, id)
			}
		}
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, ns := range c.namespaces {
		for _, i := range ns.ifaces {
			ids = append(ids, i.progIDs...)
		}
	}
	return ids
}

// Healthy reports whether the BPF objects are loaded and the maps answer.
func (c *Collector) Healthy() error {
	c.mu.Lock()
	closed := c.closed
	c.mu.Unlock()
	if closed {
		return errors.New("collector closed")
	}
	var vals []uint64
	if err := c.objs.Stats.Lookup(uint32(0), &vals); err != nil {
		return fmt.Errorf("read stats map: %w", err)
	}
	return nil
}
