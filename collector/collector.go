// Package collector is nsflow's engine: it loads the BPF programs, keeps
// the registry of observed network namespaces and their interfaces
// (attaching through collector/attach, following link events through
// collector/linkwatch), and reads the maps into snapshots (collector/flow)
// and flow events. collector/discovery decides which namespaces it observes.
package collector

import (
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
	noTCX        bool // under ModeAuto: an attach found the kernel without TCX
	tcx, clsact  attach.Attacher
	hostNlMu     sync.Mutex      // a netlink handle serves one request at a time
	hostNl       *netlink.Handle // in the host namespace: nsids of the others (nsidOf)
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

	// Attach work (queue.go).
	queue         queue
	work          *sync.Cond // a namespace queued, or Close
	nsDone        *sync.Cond // a worker finished a namespace's batch
	slotsInFlight int        // slots taken by attaches in progress
	workersDone   sync.WaitGroup
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
	class  Class
	mode   attach.Mode // Config.Mode.For this namespace (modeOf)

	// Attach work (queue.go), guarded by Collector.mu.
	pending       []work
	resync        bool // a full listing is due (the first pass, events lost)
	queued        bool
	urgent        bool
	busy          bool   // a worker works on it
	batches       uint64 // batches of its work done (WaitIdle)
	users         int    // workers and lookups using its handles
	leaving       bool   // being removed: its host ends are observed again
	inflight      int    // attaches in progress (the interface cap)
	first         chan struct{}
	settled       chan struct{} // nil, or closed once the host placed its ends after the first pass
	firstDone     bool
	firstErr      error
	refusedLogged bool
	// The host's ends whose peer's namespace has attach work under way:
	// placed once it is done, rather than attached and left out again.
	waiting map[int]waitingEnd
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
	refusedFor          string // StateRefused: its reason
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
	c.tcx, c.clsact = attach.NewTCX(pins), attach.NewClsact(owner)
	if self, err := netns.Get(); err == nil {
		c.hostIno, _ = inode(self)
		if c.hostNl, err = netlink.NewHandleAt(self, unix.NETLINK_ROUTE); err != nil {
			c.hostNl = nil
		}
		self.Close()
	}
	c.work, c.nsDone = sync.NewCond(&c.mu), sync.NewCond(&c.mu)
	for range workers {
		c.workersDone.Add(1)
		go c.worker()
	}
	return c, nil
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

// Mode returns the attach mechanism in use as it always has: under
// ModeAuto ModeTCX (the host's, attach.Mode.For) until an attach finds the
// kernel without TCX, then ModeClsact. ModeFor tells the mechanism of the
// host's namespace and of the others apart (auto: clsact in the others).
func (c *Collector) Mode() attach.Mode { return c.ModeFor(true) }

// ModeFor returns the attach mechanism in use in the host's namespace
// (host) or the others: Config.Mode.For(host), ModeClsact instead of
// ModeTCX once an attach found the kernel without TCX under ModeAuto.
func (c *Collector) ModeFor(host bool) attach.Mode {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.modeOfLocked(&namespace{mode: c.cfg.Mode.For(host)})
}

// AddAsync starts observing the namespace t refers to: it registers it and
// queues its attach work by t.Class (every interface in it now, and every
// interface that appears later), and returns its inode at once; WaitIdle
// waits for the work. Observing a namespace twice (under two names or
// paths) is a no-op, except that the lower of the two classes is kept.
func (c *Collector) AddAsync(t Target) (uint64, error) {
	ns, _, err := c.register(t)
	if err != nil {
		return 0, err
	}
	return ns.inode, nil
}

// Add is AddAsync, then waits until the namespace's first attach pass is
// done: it returns the namespace inode, and the errors of that pass (an
// error for one interface does not stop the others; all are returned).
func (c *Collector) Add(t Target) (uint64, error) {
	ns, created, err := c.register(t)
	if err != nil {
		return 0, err
	}
	<-ns.first
	c.mu.Lock()
	settled := ns.settled
	c.mu.Unlock()
	if settled != nil {
		<-settled // the host's ends of its interfaces placed
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if !created {
		return ns.inode, nil // the Add that registered it reports its errors
	}
	return ns.inode, ns.firstErr
}

// register opens the namespace t refers to (outside the lock: the handle,
// its cookie, a netlink handle in it, its link events subscribed before
// anything is listed) and registers it, or returns the one registered
// under its inode.
func (c *Collector) register(t Target) (*namespace, bool, error) {
	path := t.Path
	if path == "/proc/self/ns/net" {
		// The main thread's: it may be inside another namespace at this
		// instant (a worker's attach switched the thread it runs on). An
		// unlocked goroutine's own thread is never in one.
		path = "/proc/thread-self/ns/net"
	}
	h, err := netns.GetFromPath(path)
	if err != nil {
		if errors.Is(err, unix.ENOENT) {
			return nil, false, fmt.Errorf("netns %s: %w", t.Name, ErrNamespaceNotFound)
		}
		return nil, false, fmt.Errorf("open netns %s: %w", t.Name, err)
	}
	ino, err := inode(h)
	if err != nil {
		h.Close()
		return nil, false, fmt.Errorf("stat netns %s: %w", t.Name, err)
	}
	if ns := c.registered(ino, t.Class); ns != nil {
		h.Close()
		return ns, false, nil
	}
	cookie, err := netnsCookie(h)
	if err != nil {
		h.Close()
		return nil, false, fmt.Errorf("netns %s: %w", t.Name, err)
	}
	nl, err := netlink.NewHandleAt(h, unix.NETLINK_ROUTE)
	if err != nil {
		h.Close()
		return nil, false, fmt.Errorf("netlink in netns %s: %w", t.Name, err)
	}
	// Subscribe before listing, so that no interface added in between is missed.
	w, err := linkwatch.Open(h)
	if err != nil {
		nl.Close()
		h.Close()
		return nil, false, fmt.Errorf("subscribe to link events in netns %s: %w", t.Name, err)
	}
	nsid := -1
	if ino != c.hostIno {
		nsid = c.nsidOf(h)
	}
	drop := func() {
		w.Close()
		nl.Close()
		h.Close()
	}

	c.mu.Lock()
	for {
		if c.closed {
			c.mu.Unlock()
			drop()
			return nil, false, errors.New("collector closed")
		}
		old, ok := c.namespaces[ino]
		if !ok {
			break
		}
		if old.gone.IsZero() {
			// Registered meanwhile (a concurrent Add of the same inode).
			c.upgradeLocked(old, t.Class)
			c.mu.Unlock()
			drop()
			return old, false, nil
		}
		// The kernel reused the inode of a namespace removed earlier: its
		// counters must not carry over into the new one.
		delete(c.namespaces, ino)
		c.mu.Unlock()
		err := c.forget(func(netns, _ uint32) bool { return netns == uint32(ino) })
		if err != nil {
			c.log.Warn("forget reused namespace inode", "inode", ino, "err", err)
		}
		c.mu.Lock() // and check again: another Add may have registered it
	}
	c.adds++
	host := ino == c.hostIno
	ns := &namespace{
		name: t.Name, path: t.Path, inode: ino, cookie: cookie, handle: h, nl: nl, watch: w, seq: c.adds, nsid: nsid,
		ifaces: map[int]*iface{}, stop: make(chan struct{}), done: make(chan struct{}), first: make(chan struct{}),
		class: t.Class, mode: c.cfg.Mode.For(host), resync: true, waiting: map[int]waitingEnd{},
	}
	c.namespaces[ino] = ns
	c.scheduleLocked(ns, false)
	onAdd := c.onAdd
	c.mu.Unlock()
	go c.follow(ns)
	if onAdd != nil {
		go onAdd()
	}
	return ns, true, nil
}

// registered returns the live namespace of that inode, if any, keeping the
// lower of its class and class.
func (c *Collector) registered(ino uint64, class Class) *namespace {
	c.mu.Lock()
	defer c.mu.Unlock()
	ns := c.namespaces[ino]
	if ns == nil || !ns.gone.IsZero() {
		return nil
	}
	c.upgradeLocked(ns, class)
	return ns
}

// upgradeLocked moves ns to a lower (earlier) class, e.g. a process's
// namespace that got bind-mounted, or that the runtime knows.
func (c *Collector) upgradeLocked(ns *namespace, class Class) {
	if class >= ns.class {
		return
	}
	ns.class = class
	if ns.queued && !ns.urgent {
		c.queue.remove(ns)
		c.queue.push(ns, false)
	}
}

// resync attaches to every interface of ns not yet attached and releases
// those that are gone (first: the namespace's first pass). It returns the
// number of interfaces and whether any was attached.
func (c *Collector) resync(ns *namespace, first bool) (int, bool, error) {
	if first {
		c.releaseOtherNamespaces(ns.inode, ns.cookie)
	}
	links, err := linkwatch.List(ns.nl)
	if err != nil {
		return 0, false, fmt.Errorf("list interfaces in netns %s: %w", ns.name, err)
	}
	var errs []error
	attached := false
	present := map[int]bool{}
	for _, l := range links {
		present[l.Attrs().Index] = true
		a, err := c.place(ns, l)
		attached = attached || a
		if err != nil {
			if vanished(ns.nl, l.Attrs().Index) {
				// Deleted between the listing and the attach (pods come
				// and go): its RTM_DELLINK marks it gone; not an error.
				c.log.Debug("interface vanished while attaching", "netns", ns.name, "interface", l.Attrs().Name, "err", err)
				continue
			}
			errs = append(errs, err)
		}
	}
	var gone []int
	c.mu.Lock()
	for idx, i := range ns.ifaces {
		if !present[idx] && i.gone.IsZero() {
			gone = append(gone, idx)
		}
	}
	for idx := range ns.waiting {
		if !present[idx] {
			delete(ns.waiting, idx)
		}
	}
	c.mu.Unlock()
	for _, idx := range gone {
		c.detach(ns, idx, "interface gone", true)
	}
	return len(links), attached, errors.Join(errs...)
}

// vanished reports whether the interface of that index no longer exists.
func vanished(nl *netlink.Handle, index int) bool {
	_, err := nl.LinkByIndex(index)
	var nf netlink.LinkNotFoundError
	return errors.As(err, &nf)
}

// follow queues the link events of one namespace until it is removed. If
// the subscription fails (events lost to a full socket buffer), it
// subscribes again and queues a resynchronization from a full listing.
func (c *Collector) follow(ns *namespace) {
	defer close(ns.done)
	c.mu.Lock()
	w := ns.watch
	c.mu.Unlock()
	backoff := 10 * time.Millisecond
	for {
		err := w.Run(func(u netlink.LinkUpdate) {
			c.mu.Lock()
			c.pushLocked(ns, work{kind: workLink, u: u})
			c.mu.Unlock()
		})
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
		ns.resync = true
		c.scheduleLocked(ns, false)
		c.mu.Unlock()
	}
}

// applyLink applies one link event of ns; it reports whether an interface
// was attached.
func (c *Collector) applyLink(ns *namespace, u netlink.LinkUpdate) bool {
	a := u.Link.Attrs()
	switch u.Header.Type {
	case unix.RTM_NEWLINK:
		l := u.Link
		if ns.inode == c.hostIno && l.Type() == "device" {
			// Some notifications carry no IFLA_LINKINFO (nor the peer's
			// nsid): a veth's host end then reads as a plain device with
			// no peer, and would be attached again. A fresh look has
			// them (seen on 6.18 under TCX attach churn).
			if fresh, err := ns.nl.LinkByIndex(a.Index); err == nil {
				l = fresh
			}
		}
		attached, err := c.place(ns, l)
		if err != nil {
			if errors.Is(err, unix.EEXIST) {
				// An interface moved in from another observed namespace
				// still carries the links attached there until that
				// namespace's DELLINK is handled: try again shortly.
				c.retryLater(ns, work{kind: workRetry, index: a.Index, name: a.Name, try: 0})
				return attached
			}
			if vanished(ns.nl, a.Index) {
				// Deleted before its queued NEWLINK was handled (pods come
				// and go): its DELLINK follows; not an error.
				c.log.Debug("interface vanished while attaching", "netns", ns.name, "interface", a.Name, "err", err)
				return attached
			}
			c.log.Warn("attach", "err", err)
		}
		return attached
	case unix.RTM_DELLINK:
		c.detach(ns, a.Index, "interface removed", true)
		c.linkGone(ns, u.Link)
	}
	return false
}

// retryLater queues w on ns after a delay that doubles with each try.
func (c *Collector) retryLater(ns *namespace, w work) {
	time.AfterFunc(retryDelay<<w.try, func() {
		c.mu.Lock()
		defer c.mu.Unlock()
		c.pushLocked(ns, w)
	})
}

// retry attaches again an interface that failed with EEXIST, unless it
// was attached meanwhile or is gone; it reports whether it attached.
func (c *Collector) retry(ns *namespace, w work) bool {
	c.mu.Lock()
	i, ok := ns.ifaces[w.index]
	still := ok && i.state == flow.StateFailed && i.name == w.name && i.gone.IsZero()
	c.mu.Unlock()
	if !still {
		return false
	}
	attached, err := c.attach(ns, w.index, w.name, nil)
	if err == nil {
		if ns.inode == c.hostIno {
			c.replace(ns, w.index) // moved into the host: its peer may count it
		}
		return attached
	}
	if w.try+1 < 8 {
		w.try++
		c.retryLater(ns, w)
		return false
	}
	c.log.Warn("attach", "err", err)
	return false
}

// modeOf returns the attach mechanism of ns: Config.Mode for its kind of
// namespace (attach.Mode.For), clsact once TCX proved missing under auto.
func (c *Collector) modeOf(ns *namespace) attach.Mode {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.modeOfLocked(ns)
}

func (c *Collector) modeOfLocked(ns *namespace) attach.Mode {
	if ns.mode == attach.ModeTCX && c.cfg.Mode == attach.ModeAuto && c.noTCX {
		return attach.ModeClsact
	}
	return ns.mode
}

func (c *Collector) attacher(m attach.Mode) attach.Attacher {
	if m == attach.ModeClsact {
		return c.clsact
	}
	return c.tcx
}

// maxInterfaces is the cap of attached interfaces per namespace.
func (c *Collector) maxInterfaces() int {
	if c.cfg.MaxInterfaces > 0 {
		return c.cfg.MaxInterfaces
	}
	return DefaultMaxInterfaces
}

// reservedPoints is how many slots only named and host namespaces take.
func (c *Collector) reservedPoints() int {
	switch r := c.cfg.ReservedPoints; {
	case r < 0:
		return 0
	case r > 0:
		return r
	}
	return int(c.objs.Totals.MaxEntries()) / 8
}

// refuseLocked marks an interface refused (reason: RefusedReasons), counted
// once per interface, logged once per namespace.
func (c *Collector) refuseLocked(ns *namespace, index int, name, reason string) {
	if i := ns.ifaces[index]; i != nil && i.state == flow.StateRefused && i.gone.IsZero() {
		i.name = name
		return
	}
	ns.ifaces[index] = &iface{index: index, name: name, state: flow.StateRefused, refusedFor: reason}
	c.refused[reason]++
	if !ns.refusedLogged {
		ns.refusedLogged = true
		switch reason {
		case "interfaces":
			c.log.Warn("interfaces over the per-namespace cap are not observed (counted in nsflow_attach_refused_total; logged once per namespace)",
				"netns", ns.name, "max_interfaces", c.maxInterfaces(), "first_refused", name)
		default:
			c.log.Warn("totals slots reserved for named namespaces: a process namespace's interfaces are not observed (counted in nsflow_attach_refused_total; logged once per namespace)",
				"netns", ns.name, "reserved", c.reservedPoints(), "first_refused", name)
		}
	}
}

// attach attaches to one interface unless already attached (a renamed
// interface keeps its attachment under the new name), or refuses it (the
// interface cap, the slot reserve). l is the interface if known (for its
// link layer). It reports whether it attached.
func (c *Collector) attach(ns *namespace, index int, name string, l netlink.Link) (bool, error) {
	c.mu.Lock()
	if !ns.gone.IsZero() || c.closed {
		c.mu.Unlock()
		return false, nil
	}
	if i, ok := ns.ifaces[index]; ok && i.state == flow.StateAttached {
		i.name = name
		c.mu.Unlock()
		return false, nil
	}
	if ns.inode != c.hostIno {
		n := ns.inflight
		for _, i := range ns.ifaces {
			if i.state == flow.StateAttached && i.gone.IsZero() {
				n++
			}
		}
		if n >= c.maxInterfaces() {
			c.refuseLocked(ns, index, name, "interfaces")
			c.mu.Unlock()
			return false, nil
		}
	}
	// New slots this attach takes (a point that had one keeps it); the
	// slots of the attaches in progress count as taken. Counted exactly
	// only where the reserve applies.
	need := 2
	if ns.class == ClassProcess && c.reservedPoints() > 0 {
		need = 0
		slots := c.objs.Slots()
		for _, dir := range []bpf.Direction{bpf.RX, bpf.TX} {
			if _, ok := slots[bpf.NsflowObsKey{Netns: uint32(ns.inode), Ifindex: uint32(index), Dir: uint8(dir)}]; !ok {
				need++
			}
		}
		free := int(c.objs.Totals.MaxEntries()) - len(slots) - c.slotsInFlight
		if ns.class == ClassProcess && need > 0 && free-need < c.reservedPoints() {
			c.refuseLocked(ns, index, name, "reserve")
			c.mu.Unlock()
			return false, nil
		}
	}
	c.slotsInFlight += need
	ns.inflight++
	mode := c.modeOfLocked(ns)
	c.mu.Unlock()

	// What the interface's frames start with (an Ethernet header or the
	// network header): the stubs hand it to the parser.
	link := bpf.LinkEther
	if l == nil {
		l, _ = ns.nl.LinkByIndex(index)
	}
	if l != nil {
		link = bpf.LinkOf(l.Attrs().EncapType)
	}
	progs, ids, keys, err := c.stubs(ns.inode, ns.cookie, index, link)
	var att attach.Attachment
	if err == nil {
		att, err = c.attacher(mode).Attach(ns.handle, ns.nl, ns.cookie, index, progs)
		if err != nil && mode == attach.ModeTCX && c.cfg.Mode == attach.ModeAuto && errors.Is(err, ebpf.ErrNotSupported) {
			c.mu.Lock()
			if !c.noTCX {
				c.log.Info("kernel without TCX: falling back to clsact + cls_bpf")
				c.noTCX = true
			}
			c.mu.Unlock()
			att, err = c.attacher(attach.ModeClsact).Attach(ns.handle, ns.nl, ns.cookie, index, progs)
		}
		// Attached, the kernel holds the stubs; this process needs no fd.
		progs.Ingress.Close()
		progs.Egress.Close()
	}

	c.mu.Lock()
	c.slotsInFlight -= need
	ns.inflight--
	for _, k := range keys {
		delete(c.orphans, k) // claimed again
	}
	if !ns.gone.IsZero() || c.closed {
		// Removed meanwhile: what was just attached goes again; at a
		// pinned Close it stays, for the next process to adopt (--pin).
		keep := c.closed && c.pins != nil && ns.gone.IsZero()
		c.mu.Unlock()
		if att != nil && keep {
			if rerr := att.Release(); rerr != nil {
				c.log.Warn("release", "netns", ns.name, "interface", name, "err", rerr)
			}
		} else if att != nil {
			if cerr := att.Close(); cerr != nil {
				c.log.Warn("detach", "netns", ns.name, "interface", name, "err", cerr)
			}
		}
		return false, nil
	}
	i := &iface{index: index, name: name, state: flow.StateAttached, att: att, progIDs: ids}
	if err != nil {
		i.state, i.err, i.att, i.progIDs = flow.StateFailed, err, nil, nil
		c.attachErrors[errorReason(err)]++
		ns.ifaces[index] = i
		c.mu.Unlock()
		return false, fmt.Errorf("attach to %s in netns %s: %w", name, ns.name, err)
	}
	ns.ifaces[index] = i
	c.mu.Unlock()
	c.log.Debug("attached", "netns", ns.name, "interface", name, "ifindex", index)
	return true, nil
}

// stubs loads the stubs for the two hooks of one interface, each counting
// into its own observation point's slot of totals (a pinned one only when
// recorded for the same namespace: cookie).
func (c *Collector) stubs(inode, cookie uint64, index int, link bpf.Link) (attach.Programs, []ebpf.ProgramID, []bpf.NsflowObsKey, error) {
	var progs [2]*ebpf.Program
	var ids []ebpf.ProgramID
	var keys []bpf.NsflowObsKey
	for _, dir := range []bpf.Direction{bpf.RX, bpf.TX} {
		key := bpf.NsflowObsKey{Netns: uint32(inode), Ifindex: uint32(index), Dir: uint8(dir)}
		p, err := c.objs.StubFor(bpf.Hook{Point: key, Cookie: cookie, Link: link})
		if err != nil {
			if progs[bpf.RX] != nil {
				progs[bpf.RX].Close()
			}
			return attach.Programs{}, nil, keys, err
		}
		keys = append(keys, key)
		progs[dir] = p
		if info, err := p.Info(); err == nil {
			if id, ok := info.ID(); ok {
				ids = append(ids, id)
			}
		}
	}
	return attach.Programs{Ingress: progs[bpf.RX], Egress: progs[bpf.TX]}, ids, keys, nil
}

// detach takes the programs off one interface of ns (outside the lock);
// gone marks the interface removed.
func (c *Collector) detach(ns *namespace, index int, why string, gone bool) {
	c.mu.Lock()
	if gone {
		delete(ns.waiting, index)
	}
	i, ok := ns.ifaces[index]
	if !ok {
		c.mu.Unlock()
		return
	}
	att := c.takeLocked(i)
	if gone && i.gone.IsZero() {
		i.gone = time.Now()
		if c.refusedIn(ns) {
			// A place under the cap may be free: the refused ones are
			// tried again from a listing.
			ns.resync = true
			c.scheduleLocked(ns, false)
		}
	}
	c.mu.Unlock()
	c.closeAttachment(ns, i.name, att)
	c.log.Debug("detached", "netns", ns.name, "interface", i.name, "reason", why)
}

// refusedIn reports whether ns has interfaces refused for its cap.
func (c *Collector) refusedIn(ns *namespace) bool {
	for _, i := range ns.ifaces {
		if i.state == flow.StateRefused && i.refusedFor == "interfaces" && i.gone.IsZero() {
			return true
		}
	}
	return false
}

// takeLocked takes an interface's attachment out of the registry (the
// caller closes it, outside the lock).
func (c *Collector) takeLocked(i *iface) attach.Attachment {
	att := i.att
	i.att, i.progIDs = nil, nil
	if i.state == flow.StateAttached {
		i.state = flow.StateDetached
	}
	return att
}

func (c *Collector) closeAttachment(ns *namespace, name string, att attach.Attachment) {
	if att == nil {
		return
	}
	if err := att.Close(); err != nil {
		c.log.Warn("detach", "netns", ns.name, "interface", name, "err", err)
	}
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
	if !ok || !ns.gone.IsZero() || ns.leaving {
		// Gone, or being removed by another call (Close beside Remove):
		// one remove closes its channels and handles.
		c.mu.Unlock()
		return
	}
	// Host ends back before ns's ends go: the host's worker observes them
	// again (urgent), and this waits for it. From now on no host end is
	// left out for ns, nor waits for it.
	ns.leaving = true
	var back chan struct{}
	if host := c.hostLocked(); !keep && !c.closed && !c.cfg.HostVeths && host != nil && host != ns && ns.nsid >= 0 && host.leftOutFor(ns.nsid) {
		back = make(chan struct{})
		c.pushLocked(host, work{kind: workPeerGone, nsid: ns.nsid, done: back})
	}
	c.mu.Unlock()
	if back != nil {
		<-back
	}
	c.mu.Lock()
	ns.gone = time.Now()
	c.unqueueLocked(ns)
	c.nsDone.Broadcast() // WaitIdle waits for it no longer
	c.finishFirstLocked(ns, nil)
	type held struct {
		name string
		att  attach.Attachment
	}
	var atts []held
	for _, i := range ns.ifaces {
		if i.att == nil {
			if i.state == flow.StateAttached {
				i.state = flow.StateDetached
			}
			continue
		}
		name := i.name
		atts = append(atts, held{name, c.takeLocked(i)})
	}
	close(ns.stop)
	ns.watch.Close() // unblocks follow()
	// No worker uses its handles any more (one finishing an attach sees it
	// gone and detaches that again) before they detach (a clsact
	// attachment works through the namespace's netlink handle, which
	// serves one request at a time).
	for ns.users > 0 {
		c.nsDone.Wait()
	}
	c.mu.Unlock()
	for _, h := range atts {
		if keep {
			if err := h.att.Release(); err != nil {
				c.log.Warn("release", "netns", ns.name, "interface", h.name, "err", err)
			}
			continue
		}
		c.closeAttachment(ns, h.name, h.att)
	}
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
	c.work.Broadcast()   // the workers stop after their batch
	c.nsDone.Broadcast() // WaitIdle returns
	var live []uint64
	for ino, ns := range c.namespaces {
		if ns.gone.IsZero() {
			live = append(live, ino)
		}
	}
	c.mu.Unlock()
	// Several at once: each waits for netlink round trips (a node's
	// hundreds of pods took tens of seconds one after another).
	var wg sync.WaitGroup
	sem := make(chan struct{}, 8)
	for _, ino := range live {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			c.remove(ino, c.pins != nil)
			<-sem
		}()
	}
	wg.Wait()
	c.workersDone.Wait()
	c.hostNlMu.Lock()
	if c.hostNl != nil {
		c.hostNl.Close()
		c.hostNl = nil
	}
	c.hostNlMu.Unlock()
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
