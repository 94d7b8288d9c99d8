package bpf

import (
	"fmt"
	"io"
	"net"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/nsflow/nsflow/collector/nsenter"
	"github.com/nsflow/nsflow/test/testenv"
)

// forwardPort is the port both listeners of TestForwardedNotAttributed
// bind (on any address, IPv4 and IPv6), in the test's own namespaces.
const forwardPort = 7201

// newNetns makes an anonymous network namespace with lo up, closed when the
// test ends (gone with its last reference: the peers it started are killed
// by then), and a netlink handle in it.
func newNetns(t *testing.T) (netns.NsHandle, *netlink.Handle) {
	t.Helper()
	var ns netns.NsHandle
	err := nsenter.Run(func() error { return unix.Unshare(unix.CLONE_NEWNET) }, func() (err error) {
		ns, err = netns.Get()
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ns.Close() })
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(h.Close)
	lo, err := h.LinkByName("lo")
	if err != nil {
		t.Fatal(err)
	}
	if err := h.LinkSetUp(lo); err != nil {
		t.Fatal(err)
	}
	return ns, h
}

// vethTo makes a veth pair, name in the namespace of h with addresses
// addrs, its peer "eth0" in the namespace peer with addresses peerAddrs
// (the same families, in the same order) and default routes through addrs;
// both up, no duplicate address detection. It returns the local end.
func vethTo(t *testing.T, h *netlink.Handle, name string, addrs []string, peer netns.NsHandle, ph *netlink.Handle, peerAddrs []string) netlink.Link {
	t.Helper()
	v := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: name}, PeerName: "eth0", PeerNamespace: netlink.NsFd(peer)}
	if err := h.LinkAdd(v); err != nil {
		t.Fatal(err)
	}
	l, err := h.LinkByName(name)
	if err != nil {
		t.Fatal(err)
	}
	pl, err := ph.LinkByName("eth0")
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range []struct {
		h     *netlink.Handle
		l     netlink.Link
		addrs []string
	}{{h, l, addrs}, {ph, pl, peerAddrs}} {
		for _, s := range e.addrs {
			a, err := netlink.ParseAddr(s)
			if err != nil {
				t.Fatal(err)
			}
			a.Flags = unix.IFA_F_NODAD
			if err := e.h.AddrAdd(e.l, a); err != nil {
				t.Fatal(err)
			}
		}
		if err := e.h.LinkSetUp(e.l); err != nil {
			t.Fatal(err)
		}
	}
	for _, s := range addrs {
		gw, _, _ := strings.Cut(s, "/")
		if err := ph.RouteAdd(&netlink.Route{LinkIndex: pl.Attrs().Index, Gw: net.ParseIP(gw)}); err != nil {
			t.Fatal(err)
		}
	}
	return l
}

// nsSysctl reads or (with value) writes the sysctl at path under
// /proc/sys/net of namespace ns: a file under /proc/sys/net opened by a
// thread names the thread's namespace's setting.
func nsSysctl(t *testing.T, ns netns.NsHandle, path, value string) string {
	t.Helper()
	var got []byte
	err := nsenter.Do(ns, func() (err error) {
		p := "/proc/sys/net/" + path
		if value != "" {
			if err := os.WriteFile(p, []byte(value), 0o644); err != nil {
				return err
			}
		}
		got, err = os.ReadFile(p)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	return strings.TrimSpace(string(got))
}

// A namespace that forwards (a node's host namespace under a routed CNI) is
// no receiver of the packets it forwards, even with a socket that would
// match them. Three namespaces of the test's own: client and server, each
// with a veth to the router, which forwards (its own ip_forward and IPv6
// forwarding; the host's untouched) and routes between them. A process in
// the router listens on any address, port P (one dual-stack socket), one in
// the server too; the parsers with the socket lookup on the ingress of the
// router's client-side veth and of the server's eth0. Over IPv4 and IPv6,
// the client connects to server:P through the router: that flow's cgroup
// at the router is 0 (a socket lookup alone finds the router's listener),
// at the server the server listener's (a namespace that does not forward:
// the FIB says so before any route); and to the router's own address:P:
// its flow carries the router listener's cgroup.
func TestForwardedNotAttributed(t *testing.T) {
	testenv.RequireRoot(t)
	root := cgroup2Mount(t)
	pre := fmt.Sprintf("nsflow-bpf-fwd-%d-", os.Getpid())
	routerCg, serverCg := newCgroup(t, root, pre+"router"), newCgroup(t, root, pre+"server")

	router, rh := newNetns(t)
	client, ch := newNetns(t)
	server, sh := newNetns(t)
	hostFwd, err := os.ReadFile("/proc/sys/net/ipv4/ip_forward") // the test's own namespace's
	if err != nil {
		t.Fatal(err)
	}
	for ns, v := range map[netns.NsHandle]string{router: "1", server: "0"} {
		for _, path := range []string{"ipv4/ip_forward", "ipv6/conf/all/forwarding"} {
			if got := nsSysctl(t, ns, path, v); got != v {
				t.Fatalf("%s %q, want %s", path, got, v)
			}
		}
	}
	toClient := vethTo(t, rh, "fwc", []string{"10.231.1.1/24", "fd00:231:1::1/64"}, client, ch, []string{"10.231.1.2/24", "fd00:231:1::2/64"})
	vethTo(t, rh, "fws", []string{"10.231.2.1/24", "fd00:231:2::1/64"}, server, sh, []string{"10.231.2.2/24", "fd00:231:2::2/64"})

	objs := load(t, Options{Attribution: true, SocketLookup: true, ContainerEntries: 64})
	rx := attachIngress(t, objs, router, rh, toClient)
	srvRx := attachIngress(t, objs, server, sh, nil)

	startPeer(t, router, routerCg, "listener", true)
	startPeer(t, server, serverCg, "listener", true)
	// One connection from the client to each: a message, then EOF both ways.
	dial := func(dst string) uint16 {
		var port uint16
		err := nsenter.Do(client, func() error {
			c, err := net.DialTimeout("tcp", net.JoinHostPort(dst, fmt.Sprint(forwardPort)), 5*time.Second)
			if err != nil {
				return err
			}
			defer c.Close()
			c.SetDeadline(time.Now().Add(10 * time.Second))
			port = uint16(c.LocalAddr().(*net.TCPAddr).Port)
			if _, err := c.Write(make([]byte, msgSize)); err != nil {
				return err
			}
			if err := c.(*net.TCPConn).CloseWrite(); err != nil {
				return err
			}
			if _, err := io.Copy(io.Discard, c); err != nil {
				return err
			}
			return nil
		})
		if err != nil {
			t.Fatalf("client to %s: %v", dst, err)
		}
		return port
	}
	type want struct {
		point NsflowObsKey
		sport uint16
		dst   string
		cg    uint64
	}
	var wants []want
	for _, a := range []struct{ server, router string }{{"10.231.2.2", "10.231.1.1"}, {"fd00:231:2::2", "fd00:231:1::1"}} {
		fwdPort, localPort := dial(a.server), dial(a.router)
		wants = append(wants,
			want{rx, fwdPort, a.server, 0},              // forwarded: the router's listener is not its receiver
			want{rx, localPort, a.router, routerCg.id},  // the router's own
			want{srvRx, fwdPort, a.server, serverCg.id}, // arrived: the server's
		)
	}
	if now, err := os.ReadFile("/proc/sys/net/ipv4/ip_forward"); err != nil || string(now) != string(hostFwd) {
		t.Fatalf("the test's namespace's ip_forward: %q, %v; was %q", now, err, hostFwd)
	}

	flows := readMaps(t, objs).flows
	for _, w := range wants {
		found := false
		for k, v := range flows {
			if k.Netns != w.point.Netns || k.Ifindex != w.point.Ifindex || k.Dir != w.point.Dir ||
				k.Proto != unix.IPPROTO_TCP || k.Sport != w.sport || k.Dport != forwardPort {
				continue
			}
			dst := net.IP(k.Daddr[:]).String()
			if k.Family == 4 {
				dst = net.IP(k.Daddr[:4]).String()
			}
			if dst != w.dst {
				continue // another connection that got the same ephemeral port (the other family's)
			}
			found = true
			t.Logf("ingress at %+v: to %s:%d, %d packets, cgroup %d (router %d, server %d)",
				w.point, w.dst, forwardPort, v.Packets, v.Cgroup, routerCg.id, serverCg.id)
			if v.Cgroup != w.cg {
				t.Errorf("flow at %+v to %s:%d: cgroup %d, want %d", w.point, w.dst, forwardPort, v.Cgroup, w.cg)
			}
		}
		if !found {
			t.Errorf("no flow at %+v to %s:%d from port %d", w.point, w.dst, forwardPort, w.sport)
		}
	}
}

// attachIngress puts the stub of objs on the ingress of link l of namespace
// ns (h: its handle; nil: eth0), under a clsact qdisc, and returns its
// observation point.
func attachIngress(t *testing.T, objs *Objects, ns netns.NsHandle, h *netlink.Handle, l netlink.Link) NsflowObsKey {
	t.Helper()
	if l == nil {
		var err error
		if l, err = h.LinkByName("eth0"); err != nil {
			t.Fatal(err)
		}
	}
	var st unix.Stat_t
	if err := unix.Fstat(int(ns), &st); err != nil {
		t.Fatal(err)
	}
	idx := l.Attrs().Index
	key := NsflowObsKey{Netns: uint32(st.Ino), Ifindex: uint32(idx), Dir: uint8(RX)}
	if err := h.QdiscAdd(&netlink.GenericQdisc{QdiscType: "clsact", QdiscAttrs: netlink.QdiscAttrs{
		LinkIndex: idx, Handle: netlink.MakeHandle(0xffff, 0), Parent: netlink.HANDLE_CLSACT}}); err != nil {
		t.Fatal(err)
	}
	if err := h.FilterAdd(&netlink.BpfFilter{FilterAttrs: netlink.FilterAttrs{LinkIndex: idx, Parent: netlink.HANDLE_MIN_INGRESS,
		Handle: 1, Protocol: unix.ETH_P_ALL, Priority: 1}, Fd: stub(t, objs, key).FD(), Name: "nsflow-test", DirectAction: true}); err != nil {
		t.Fatal(err)
	}
	return key
}
