package collector

// Attach work runs outside the registry lock (c.mu): a load, an attach, a
// detach (a TCX one waits for an RCU grace period under RTNL), a netlink
// dump never holds it, so that a scrape, a health check and the other
// namespaces' link events never wait behind the kernel.
//
// Each namespace has a list of pending work (its first full listing, link
// events in the order they came, re-evaluations of host ends); a namespace
// with pending work waits in the ready queue of its Class (named, then
// host, then process; first come first served within a class), and a
// small pool of workers takes the first one. One namespace is worked on by
// one worker at a time, so that its link events are applied in order; the
// kernel serializes TCX attaches on RTNL anyway, but stub loads and clsact
// netlink work of different namespaces overlap.
//
// An attach is decided under the lock (the state, the interface cap, the
// slot reserve: slots in flight are counted), done without it, and
// committed under it again: a namespace removed (or a collector closed)
// meanwhile gets what was just attached detached again, outside the lock.
// An attachment is owned by whoever took it out of the registry under the
// lock, so that nothing is detached twice or left behind.

import (
	"context"
	"time"

	"github.com/vishvananda/netlink"
)

// workers is how many namespaces are worked on at once.
const workers = 4

// maxPending bounds a namespace's list of link events: beyond it the list
// is dropped for one full listing (a namespace that churns interfaces
// faster than they are attached costs memory no more than the listing).
const maxPending = 1024

type workKind int

const (
	workLink     workKind = iota // a link event of the namespace
	workPlace                    // host: apply the rule again to one interface (fresh look)
	workPeers                    // host: the host ends whose peer is in namespace inode
	workPeerGone                 // host: the host ends left out for nsid, whose namespace goes; done closed after
	workRetry                    // attach again an interface that failed with EEXIST
)

type work struct {
	kind  workKind
	u     netlink.LinkUpdate
	index int
	name  string
	inode uint64
	nsid  int
	try   int
	done  chan struct{}
}

// queue holds the namespaces with pending work, by class; urgent first
// (the host, when a Remove waits for its host ends).
type queue struct {
	urgent  []*namespace
	byClass [ClassProcess + 1][]*namespace
}

func (q *queue) push(ns *namespace, urgent bool) {
	if urgent {
		q.urgent = append(q.urgent, ns)
		return
	}
	c := min(max(ns.class, ClassNamed), ClassProcess)
	q.byClass[c] = append(q.byClass[c], ns)
}

func (q *queue) pop() *namespace {
	if len(q.urgent) > 0 {
		ns := q.urgent[0]
		q.urgent = q.urgent[1:]
		return ns
	}
	for c := range q.byClass {
		if l := q.byClass[c]; len(l) > 0 {
			q.byClass[c] = l[1:]
			return l[0]
		}
	}
	return nil
}

func (q *queue) remove(ns *namespace) {
	del := func(l []*namespace) []*namespace {
		for i, x := range l {
			if x == ns {
				return append(l[:i:i], l[i+1:]...)
			}
		}
		return l
	}
	q.urgent = del(q.urgent)
	for c := range q.byClass {
		q.byClass[c] = del(q.byClass[c])
	}
}

// pushLocked appends work for ns and schedules it.
func (c *Collector) pushLocked(ns *namespace, w work) {
	if !ns.gone.IsZero() || c.closed {
		if w.done != nil {
			close(w.done)
		}
		return
	}
	if len(ns.pending) >= maxPending && w.kind == workLink {
		// Too many events: one listing settles them all.
		keep := ns.pending[:0]
		for _, p := range ns.pending {
			if p.kind != workLink {
				keep = append(keep, p)
			}
		}
		ns.pending = keep
		ns.resync = true
	} else {
		ns.pending = append(ns.pending, w)
	}
	c.scheduleLocked(ns, w.kind == workPeerGone)
}

// scheduleLocked puts ns in the ready queue unless it is there already or
// being worked on (its worker queues it again when done).
func (c *Collector) scheduleLocked(ns *namespace, urgent bool) {
	if !ns.gone.IsZero() || c.closed {
		return
	}
	if ns.busy {
		ns.urgent = ns.urgent || urgent
		return
	}
	if ns.queued {
		if urgent && !ns.urgent {
			c.queue.remove(ns)
			c.queue.push(ns, true)
			ns.urgent = true
		}
		return
	}
	ns.queued, ns.urgent = true, urgent
	c.queue.push(ns, urgent)
	c.work.Signal()
}

// unqueueLocked takes a removed namespace out of the ready queue; its
// pending work is dropped (the done channels closed).
func (c *Collector) unqueueLocked(ns *namespace) {
	if ns.queued {
		c.queue.remove(ns)
		ns.queued = false
	}
	for _, w := range ns.pending {
		if w.done != nil {
			close(w.done)
		}
	}
	ns.pending, ns.resync = nil, false
}

// worker works on the namespace first in the ready queue, until Close.
func (c *Collector) worker() {
	defer c.workersDone.Done()
	c.mu.Lock()
	defer c.mu.Unlock()
	for {
		var ns *namespace
		for !c.closed {
			if ns = c.queue.pop(); ns != nil {
				break
			}
			c.work.Wait()
		}
		if c.closed {
			return
		}
		ns.queued, ns.urgent, ns.busy = false, false, true
		ns.users++
		resync, items, first := ns.resync, ns.pending, !ns.firstDone
		ns.resync, ns.pending = false, nil
		c.mu.Unlock()

		attached, firstErr := c.process(ns, resync, first, items)

		c.mu.Lock()
		// The host's ends of ns's interfaces: left out now that their
		// peers count them, or placed after waiting for ns's work (checked
		// as ns stops being busy: a host end that chose to wait before
		// this sees the notice). Add returns once the host has done that
		// after the first pass.
		var settled chan struct{}
		if host := c.hostLocked(); host != nil && host != ns && !c.cfg.HostVeths && (attached || host.waitingFor(ns)) {
			if first && resync {
				settled = make(chan struct{})
			}
			c.pushLocked(host, work{kind: workPeers, inode: ns.inode, done: settled})
		}
		if first && resync {
			ns.settled = settled
			c.finishFirstLocked(ns, firstErr)
		}
		ns.busy = false
		ns.users--
		ns.batches++
		c.nsDone.Broadcast()
		if ns.gone.IsZero() && !c.closed && (ns.resync || len(ns.pending) > 0) {
			ns.queued = true
			c.queue.push(ns, ns.urgent)
			c.work.Signal()
		}
	}
}

// process does one batch of a namespace's work, without the lock; it
// reports whether an interface was attached, and the errors of the first
// pass (first: the namespace's first listing is due).
func (c *Collector) process(ns *namespace, resync, first bool, items []work) (attached bool, firstErr error) {
	if resync {
		n, a, err := c.resync(ns, first)
		attached = attached || a
		if first {
			c.log.Info("observing netns", "netns", ns.name, "inode", ns.inode, "interfaces", n, "mode", c.modeOf(ns), "class", ns.class)
			firstErr = err
		} else if err != nil {
			c.log.Warn("resync", "netns", ns.name, "err", err)
		}
	}
	for _, w := range items {
		if c.stale(ns) {
			if w.done != nil {
				close(w.done)
			}
			continue
		}
		switch w.kind {
		case workLink:
			attached = c.applyLink(ns, w.u) || attached
		case workPlace:
			c.replace(ns, w.index)
		case workPeers:
			c.peersOf(ns, w.inode, -1)
			if w.done != nil {
				close(w.done)
			}
		case workPeerGone:
			c.peersOf(ns, 0, w.nsid)
			close(w.done)
		case workRetry:
			attached = c.retry(ns, w) || attached
		}
	}
	return attached, firstErr
}

// stale reports whether ns's work is to be dropped (removed, closed).
func (c *Collector) stale(ns *namespace) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return !ns.gone.IsZero() || c.closed
}

// finishFirstLocked ends a namespace's first pass: Add returns.
func (c *Collector) finishFirstLocked(ns *namespace, err error) {
	if ns.firstDone {
		return
	}
	ns.firstDone, ns.firstErr = true, err
	close(ns.first)
}

// WaitIdle returns once the attach work queued or running when it was
// called is done (the namespaces' first passes, their link events so far),
// or ctx is done (its error then). Work queued later is not waited for: on
// a node where pods keep coming, the queue may never be empty.
func (c *Collector) WaitIdle(ctx context.Context) error {
	type mark struct {
		ns    *namespace
		until uint64 // its batches once the work it has now is done
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	var marks []mark
	for _, ns := range c.namespaces {
		switch {
		case !ns.gone.IsZero():
		case ns.busy && (ns.resync || len(ns.pending) > 0):
			marks = append(marks, mark{ns, ns.batches + 2}) // the batch after the running one
		case ns.busy || ns.queued:
			marks = append(marks, mark{ns, ns.batches + 1})
		}
	}
	stop := context.AfterFunc(ctx, func() {
		c.mu.Lock()
		c.nsDone.Broadcast()
		c.mu.Unlock()
	})
	defer stop()
	for _, m := range marks {
		for m.ns.gone.IsZero() && !c.closed && m.ns.batches < m.until {
			if err := ctx.Err(); err != nil {
				return err
			}
			c.nsDone.Wait()
		}
	}
	return nil
}

// retryDelay is the first delay before an attach that failed with EEXIST
// (an interface moved in from another observed namespace, still carrying
// the links attached there) is tried again; it doubles, 8 times.
const retryDelay = 5 * time.Millisecond
