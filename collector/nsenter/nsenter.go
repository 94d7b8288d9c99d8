// Package nsenter runs code inside another network namespace. Only a
// dedicated, locked OS thread ever changes namespace; if it cannot switch
// back it is never unlocked, so the Go runtime discards it instead of
// reusing a thread in the wrong namespace.
package nsenter

import (
	"errors"
	"fmt"
	"runtime"

	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// Do runs fn inside the namespace ns. Sockets fn opens stay in ns after it
// returns; processes it starts (exec.Cmd.Start) are created there.
func Do(ns netns.NsHandle, fn func() error) error {
	return Run(func() error { return netns.Set(ns) }, fn)
}

// NewNetns makes a network namespace held only by the handle it returns (no
// bind mount, no process in it: no discovery finds it); closing the handle
// lets the kernel free it.
func NewNetns() (netns.NsHandle, error) {
	ns := netns.None()
	err := Run(func() error { return unix.Unshare(unix.CLONE_NEWNET) }, func() error {
		var err error
		ns, err = netns.Get()
		return err
	})
	return ns, err
}

// Run runs enter, then fn, on a locked OS thread, and returns the thread
// to its original network namespace afterwards. enter switches the thread
// (netns.Set, or unshare(CLONE_NEWNET) for a new namespace).
func Run(enter, fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("get current netns: %w", err)
			return
		}
		defer orig.Close()
		if err := enter(); err != nil {
			// The thread may be half-switched: never reuse it.
			if netns.Set(orig) == nil {
				runtime.UnlockOSThread()
			}
			errc <- fmt.Errorf("enter netns: %w", err)
			return
		}
		ferr := fn()
		if err := netns.Set(orig); err != nil {
			errc <- errors.Join(ferr, fmt.Errorf("return to original netns: %w", err))
			return // the thread stays locked and dies with this goroutine
		}
		runtime.UnlockOSThread()
		errc <- ferr
	}()
	return <-errc
}
