// pingpong is the containers' image of the CRI container test: two
// containers of one pod sandbox exchange small messages over loopback, each
// one answered (no GSO aggregate: one packet per message or reply).
//
//	pingpong server TCPADDR UDPADDR N      echo one TCP connection to EOF and N UDP datagrams
//	pingpong client TCPADDR UDPADDR N SIZE N TCP rounds, then N UDP rounds, of SIZE bytes
//
// Every step is bounded in time (25 s); then it prints "done" and waits
// for SIGTERM (60 s at most: its cgroup stays while a tracer names it). The
// exit status says whether all rounds were answered.
package main

import (
	"fmt"
	"io"
	"net"
	"os"
	"os/signal"
	"strconv"
	"syscall"
	"time"
)

func main() {
	if err := run(os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, "pingpong:", err)
		os.Exit(1)
	}
	fmt.Println("done")
	c := make(chan os.Signal, 1)
	signal.Notify(c, syscall.SIGTERM, syscall.SIGINT)
	select {
	case <-c:
	case <-time.After(60 * time.Second):
	}
}

func run(args []string) error {
	if len(args) < 4 {
		return fmt.Errorf("usage: pingpong server|client TCPADDR UDPADDR N [SIZE]")
	}
	deadline := time.Now().Add(25 * time.Second)
	n, _ := strconv.Atoi(args[3])
	switch args[0] {
	case "server":
		ln, err := net.Listen("tcp", args[1])
		if err != nil {
			return err
		}
		pc, err := net.ListenPacket("udp", args[2])
		if err != nil {
			return err
		}
		fmt.Println("listening")
		ln.(*net.TCPListener).SetDeadline(deadline)
		c, err := ln.Accept()
		if err != nil {
			return err
		}
		c.SetDeadline(deadline)
		if _, err := io.Copy(c, c); err != nil {
			return err
		}
		c.Close()
		pc.SetDeadline(deadline)
		buf := make([]byte, 65536)
		for i := 0; i < n; i++ {
			k, from, err := pc.ReadFrom(buf)
			if err != nil {
				return fmt.Errorf("udp after %d datagrams: %w", i, err)
			}
			if _, err := pc.WriteTo(buf[:k], from); err != nil {
				return err
			}
		}
		return nil
	case "client":
		size, _ := strconv.Atoi(args[4])
		for _, proto := range []string{"tcp", "udp"} {
			addr := args[1]
			if proto == "udp" {
				addr = args[2]
			}
			c, err := net.DialTimeout(proto, addr, 5*time.Second)
			if err != nil {
				return err
			}
			c.SetDeadline(deadline)
			msg, back := make([]byte, size), make([]byte, size)
			for i := 0; i < n; i++ {
				if _, err := c.Write(msg); err != nil {
					return fmt.Errorf("%s round %d: %w", proto, i, err)
				}
				if _, err := io.ReadFull(c, back); err != nil {
					return fmt.Errorf("%s round %d: %w", proto, i, err)
				}
			}
			c.Close()
		}
		return nil
	}
	return fmt.Errorf("unknown mode %q", args[0])
}
