package collector

import (
	"fmt"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/nsflow/nsflow/collector/attach"
	"github.com/nsflow/nsflow/collector/nsenter"
)

// netnsCookie returns the cookie of the namespace h refers to
// (SO_NETNS_COOKIE, Linux 5.14+): unlike its inode, the kernel never gives
// it to another namespace within a boot, so that pinned state keyed by it
// is never inherited by a namespace that got a dead one's inode.
func netnsCookie(h netns.NsHandle) (uint64, error) {
	var cookie uint64
	err := nsenter.Do(h, func() error {
		fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			return err
		}
		defer unix.Close(fd)
		cookie, err = unix.GetsockoptUint64(fd, unix.SOL_SOCKET, unix.SO_NETNS_COOKIE)
		return err
	})
	if err != nil {
		return 0, fmt.Errorf("namespace cookie: %w", err)
	}
	return cookie, nil
}

// releaseOtherNamespaces drops the pinned points (and their flows) of an
// earlier namespace that had ino, the inode of the namespace of cookie now
// being added: the kernel reused the inode, so that namespace is gone (and
// its hooks with it) while no nsflow process ran. Called without c.mu
// (map work), before the namespace's first stub is loaded.
func (c *Collector) releaseOtherNamespaces(ino, cookie uint64) {
	n, err := c.objs.ReleaseOtherNamespaces(uint32(ino), cookie)
	if err != nil {
		c.log.Warn("release the points of a gone namespace", "inode", ino, "err", err)
	}
	if n == 0 {
		return
	}
	c.mu.Lock()
	for k := range c.orphans {
		if uint64(k.Netns) == ino {
			delete(c.orphans, k)
		}
	}
	c.log.Info("a namespace got the inode of one that went while no nsflow ran: the gone one's pinned counts are dropped, the new one's start at zero",
		"inode", ino, "points", n)
	c.mu.Unlock()
	for k := range c.objs.Slots() {
		if uint64(k.Netns) == ino {
			return // points of this namespace: its flows cannot be told apart
		}
	}
	err = c.forget(func(netns, _ uint32) bool { return uint64(netns) == ino })
	if err != nil {
		c.log.Warn("forget the flows of a gone namespace", "inode", ino, "err", err)
	}
}

// SweepStaleFilters removes the clsact filters nobody will adopt or remove
// from the namespaces of targets that this collector does not observe:
// those of dead nsflow processes, and with PinPath those a previous process
// with the same pin path left there (they would count into slots that are
// handed to other points). With clsact, the namespaces it observes are
// swept as their interfaces are attached; with TCX they are swept here too
// (a previous process with the same pin path that used clsact would
// otherwise count twice into the same slots). Filters of live nsflow
// processes and of other tools are left alone. It returns how many it
// removed.
func (c *Collector) SweepStaleFilters(targets []Target) int {
	n := 0
	for _, t := range targets {
		h, err := netns.GetFromPath(t.Path)
		if err != nil {
			continue
		}
		ino, err := inode(h)
		if err == nil {
			c.mu.Lock()
			ns := c.namespaces[ino]
			observed := ns != nil && ns.gone.IsZero()
			sweepObserved := observed && c.modeOfLocked(ns) == attach.ModeTCX
			c.mu.Unlock()
			if !observed || sweepObserved {
				if nl, err := netlink.NewHandleAt(h, unix.NETLINK_ROUTE); err == nil {
					k, err := c.owner.Sweep(nl)
					if err != nil {
						c.log.Warn("remove stale clsact filters", "netns", t.Name, "err", err)
					}
					n += k
					nl.Close()
				}
			}
		}
		h.Close()
	}
	return n
}
