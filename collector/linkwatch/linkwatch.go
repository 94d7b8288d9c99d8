// Package linkwatch follows the interfaces of one network namespace: a
// netlink socket created inside it, subscribed to its link events
// (RTM_NEWLINK, RTM_DELLINK) and read through Go's netpoller.
package linkwatch

import (
	"errors"
	"fmt"
	"os"
	"sync"
	"syscall"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netlink/nl"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/nsflow/nsflow/collector/nsenter"
)

// recvBuffers are shared by every namespace's link-event socket: a buffer is
// held only while a message is being read, not while a socket waits, so
// watching 1,000 namespaces does not pin 1,000 buffers (the netlink
// library's own subscription keeps a 64 KiB buffer, a channel and two
// goroutines per waiting socket; this is one goroutine and no buffer).
var recvBuffers = sync.Pool{New: func() any { b := make([]byte, 64<<10); return &b }}

// Watch is a netlink socket subscribed to the link events (RTNLGRP_LINK)
// of one namespace, read through Go's netpoller.
type Watch struct {
	f  *os.File
	rc syscall.RawConn
}

// Open subscribes to the link events of a namespace. Subscribe before
// listing the interfaces, so that none added in between is missed.
func Open(ns netns.NsHandle) (*Watch, error) {
	var fd int
	// A netlink socket belongs to the namespace it is created in.
	err := nsenter.Do(ns, func() error {
		var err error
		fd, err = unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC|unix.SOCK_NONBLOCK, unix.NETLINK_ROUTE)
		if err != nil {
			return err
		}
		if err := unix.Bind(fd, &unix.SockaddrNetlink{Family: unix.AF_NETLINK, Groups: unix.RTMGRP_LINK}); err != nil {
			unix.Close(fd)
			return err
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("netlink socket: %w", err)
	}
	f := os.NewFile(uintptr(fd), "netlink-link-events")
	rc, err := f.SyscallConn()
	if err != nil {
		f.Close()
		return nil, err
	}
	return &Watch{f: f, rc: rc}, nil
}

// Close ends the watch; a blocked Run returns.
func (w *Watch) Close() error { return w.f.Close() }

// Run calls fn for every link event until the watch is closed or fails
// (ENOBUFS: events were lost, the caller resynchronizes).
func (w *Watch) Run(fn func(netlink.LinkUpdate)) error {
	for {
		var msgs []syscall.NetlinkMessage
		var rerr error
		err := w.rc.Read(func(fd uintptr) bool {
			bp := recvBuffers.Get().(*[]byte)
			defer recvBuffers.Put(bp)
			n, _, err := unix.Recvfrom(int(fd), *bp, 0)
			if errors.Is(err, unix.EAGAIN) {
				return false // wait in the netpoller, holding no buffer
			}
			if err != nil {
				rerr = err
				return true
			}
			// The messages are read after the buffer went back to the
			// pool (another namespace's watch may receive into it at once),
			// and the links decoded from them keep slices of their bytes:
			// parse a copy of what arrived.
			msgs, rerr = syscall.ParseNetlinkMessage(append([]byte(nil), (*bp)[:n]...))
			return true
		})
		if err == nil {
			err = rerr
		}
		if err != nil {
			return fmt.Errorf("receive link events: %w", err)
		}
		for _, m := range msgs {
			if m.Header.Type != unix.RTM_NEWLINK && m.Header.Type != unix.RTM_DELLINK {
				continue
			}
			hdr := unix.NlMsghdr(m.Header)
			l, err := netlink.LinkDeserialize(&hdr, m.Data)
			if err != nil {
				continue
			}
			fn(netlink.LinkUpdate{IfInfomsg: *nl.DeserializeIfInfomsg(m.Data), Header: hdr, Link: l})
		}
	}
}

// List lists the links of the namespace nl works in. A dump that the kernel
// reports as interrupted (links changed while it was read: pods come and go)
// is read again, a few times, rather than failing or returning a list
// that may miss an interface.
func List(nl *netlink.Handle) ([]netlink.Link, error) {
	var links []netlink.Link
	var err error
	for range 10 {
		links, err = nl.LinkList()
		if !errors.Is(err, netlink.ErrDumpInterrupted) {
			return links, err
		}
	}
	return links, err
}
