// Package podns builds pod-like network namespaces the way a container
// runtime and the CNI bridge plugin do: a bind-mounted namespace that
// `ip netns` sees, a host bridge holding the gateway addresses, a veth pair
// whose pod end is eth0 with an IPv4 and an IPv6 address, lo up and default
// routes. Several processes started in one pod are its "containers" and
// share its loopback. `nsflow pod` and the end-to-end tests share it.
//
// Nothing is routed or NATed off the machine: the default subnet is used
// only by these namespaces, and a subnet that overlaps anything else on the
// host is refused.
package podns

import (
	"encoding/json"
	"errors"
	"fmt"
	"hash/fnv"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/nsflow/nsflow/collector/nsenter"
)

// Errors callers can test with errors.Is.
var (
	ErrExists          = errors.New("pod already exists")
	ErrNotFound        = errors.New("pod not found")
	ErrInvalidName     = errors.New("invalid pod name")
	ErrInvalidSubnet   = errors.New("invalid subnet")
	ErrSubnetExhausted = errors.New("subnet exhausted")
	ErrInvalidIP       = errors.New("invalid pod address")
)

// Defaults.
const (
	DefaultStateDir = "/run/nsflow/pods"
	DefaultBridge   = "nsflow0"
	NetnsDir        = "/run/netns"
)

// DefaultSubnet is the subnet pods get unless told otherwise.
var DefaultSubnet = netip.MustParsePrefix("10.213.0.0/24")

var nameRE = regexp.MustCompile(`^[a-z0-9]([a-z0-9-]{0,30}[a-z0-9])?$`)

// Config locates the pods' state.
type Config struct {
	// StateDir holds one JSON file per pod; empty means DefaultStateDir.
	StateDir string
}

func (c Config) dir() string {
	if c.StateDir == "" {
		return DefaultStateDir
	}
	return c.StateDir
}

// Options shape a new pod.
type Options struct {
	// Subnet is the pod network (IPv4, /16 to /30); zero means DefaultSubnet.
	Subnet netip.Prefix
	// IP is the pod's IPv4 address; zero means the lowest free one.
	IP netip.Addr
}

// Pod is a pod-like network namespace.
type Pod struct {
	Name      string       `json:"name"`
	NetnsPath string       `json:"netns_path"`
	Bridge    string       `json:"bridge"`
	HostVeth  string       `json:"host_veth"`
	Subnet    netip.Prefix `json:"subnet"`
	IPv4      netip.Addr   `json:"ipv4"`
	IPv6      netip.Addr   `json:"ipv6"`
	Gateway4  netip.Addr   `json:"gateway4"`
	Gateway6  netip.Addr   `json:"gateway6"`
	Created   time.Time    `json:"created"`
}

// ValidateName checks a pod name: lower-case letters, digits and dashes,
// 1 to 32 characters, starting and ending with a letter or digit.
func ValidateName(name string) error {
	if !nameRE.MatchString(name) {
		return fmt.Errorf("%w %q: use 1-32 lower-case letters, digits and dashes, starting and ending with a letter or digit", ErrInvalidName, name)
	}
	return nil
}

// hash8 returns 8 hex digits of the FNV-32a hash of s.
func hash8(s string) string {
	h := fnv.New32a()
	h.Write([]byte(s))
	return fmt.Sprintf("%08x", h.Sum32())
}

// HostVethName is the host end of a pod's veth: derived from the name, so
// Delete finds it even without the state file.
func HostVethName(pod string) string { return "nsf" + hash8(pod) }

// BridgeName is the host bridge of a subnet.
func BridgeName(subnet netip.Prefix) string {
	if subnet == DefaultSubnet {
		return DefaultBridge
	}
	return "nsf-" + hash8(subnet.String())
}

// ipv6Prefix maps an IPv4 subnet to the pods' ULA /64: fd6e:7366:AABB:CCDD::/64
// where AA.BB.CC.DD is the subnet's network address.
func ipv6Prefix(subnet netip.Prefix) netip.Prefix {
	v4 := subnet.Masked().Addr().As4()
	var a [16]byte
	copy(a[:], []byte{0xfd, 0x6e, 0x73, 0x66, v4[0], v4[1], v4[2], v4[3]})
	return netip.PrefixFrom(netip.AddrFrom16(a), 64)
}

// offset returns ip's host number within subnet.
func offset(subnet netip.Prefix, ip netip.Addr) uint32 {
	a, n := ip.As4(), subnet.Masked().Addr().As4()
	return be32(a) - be32(n)
}

func be32(b [4]byte) uint32 {
	return uint32(b[0])<<24 | uint32(b[1])<<16 | uint32(b[2])<<8 | uint32(b[3])
}

func addrAt(subnet netip.Prefix, off uint32) netip.Addr {
	v := be32(subnet.Masked().Addr().As4()) + off
	return netip.AddrFrom4([4]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)})
}

func ipv6At(subnet netip.Prefix, off uint32) netip.Addr {
	a := ipv6Prefix(subnet).Addr().As16()
	a[12], a[13], a[14], a[15] = byte(off>>24), byte(off>>16), byte(off>>8), byte(off)
	return netip.AddrFrom16(a)
}

// ParseSubnet parses and validates a pod subnet (syntax and range only; that
// it is unused on the host is checked by Create).
func ParseSubnet(s string) (netip.Prefix, error) {
	p, err := netip.ParsePrefix(s)
	if err != nil {
		return netip.Prefix{}, fmt.Errorf("%w %q: not a CIDR prefix", ErrInvalidSubnet, s)
	}
	return p, validateSubnet(p)
}

func validateSubnet(p netip.Prefix) error {
	switch {
	case !p.Addr().Is4():
		return fmt.Errorf("%w %s: IPv4 only (each pod also gets an IPv6 address derived from it)", ErrInvalidSubnet, p)
	case p.Bits() < 16 || p.Bits() > 30:
		return fmt.Errorf("%w %s: prefix length must be between /16 and /30", ErrInvalidSubnet, p)
	case p.Masked() != p:
		return fmt.Errorf("%w %s: not the network address (did you mean %s?)", ErrInvalidSubnet, p, p.Masked())
	}
	return nil
}

// Create builds a pod. On any failure, every step already taken is undone.
func Create(cfg Config, name string, opts Options) (pod *Pod, err error) {
	if err := ValidateName(name); err != nil {
		return nil, err
	}
	if !opts.Subnet.IsValid() {
		opts.Subnet = DefaultSubnet
	}
	if err := validateSubnet(opts.Subnet); err != nil {
		return nil, err
	}
	unlock, err := lock(cfg)
	if err != nil {
		return nil, err
	}
	defer unlock()

	if _, err := os.Stat(statePath(cfg, name)); err == nil {
		return nil, fmt.Errorf("%w: %s (delete it with: nsflow pod delete %s)", ErrExists, name, name)
	}
	nsPath := filepath.Join(NetnsDir, name)
	if _, err := os.Lstat(nsPath); err == nil {
		return nil, fmt.Errorf("%w: %s is taken by another network namespace (ip netns list)", ErrExists, nsPath)
	}
	pods, err := list(cfg)
	if err != nil {
		return nil, err
	}
	if err := checkSubnetFree(opts.Subnet, pods); err != nil {
		return nil, err
	}
	ip, err := allocate(opts.Subnet, opts.IP, pods)
	if err != nil {
		return nil, err
	}
	off := offset(opts.Subnet, ip)
	p := &Pod{
		Name: name, NetnsPath: nsPath, Bridge: BridgeName(opts.Subnet), HostVeth: HostVethName(name),
		Subnet: opts.Subnet, IPv4: ip, IPv6: ipv6At(opts.Subnet, off),
		Gateway4: addrAt(opts.Subnet, 1), Gateway6: ipv6At(opts.Subnet, 1), Created: time.Now().UTC(),
	}

	var undo []func()
	defer func() {
		if err != nil {
			for i := len(undo) - 1; i >= 0; i-- {
				undo[i]()
			}
		}
	}()
	step := func(what string, do func() error, rollback func()) error {
		if failStep == what {
			return fmt.Errorf("create pod %s: %s: injected failure", name, what)
		}
		if err := do(); err != nil {
			return fmt.Errorf("create pod %s: %s: %w", name, what, err)
		}
		if rollback != nil {
			undo = append(undo, rollback)
		}
		return nil
	}

	var br netlink.Link
	if err := step("bridge", func() (err error) {
		var created bool
		br, created, err = ensureBridge(p)
		if created {
			undo = append(undo, func() { deleteBridgeIfUnused(cfg, p.Bridge, name) })
		}
		return err
	}, nil); err != nil {
		return nil, err
	}
	if err := step("netns", func() error { return newNamedNetns(nsPath) }, func() { deleteNamedNetns(nsPath) }); err != nil {
		return nil, err
	}
	ns, err := netns.GetFromPath(nsPath)
	if err != nil {
		return nil, fmt.Errorf("create pod %s: open netns: %w", name, err)
	}
	defer ns.Close()
	if err := step("veth", func() error {
		veth := &netlink.Veth{
			LinkAttrs:     netlink.LinkAttrs{Name: p.HostVeth, MasterIndex: br.Attrs().Index},
			PeerName:      "eth0",
			PeerNamespace: netlink.NsFd(int(ns)),
		}
		if err := netlink.LinkAdd(veth); err != nil {
			return err
		}
		// IPv6 stays off on the host end: the pod's traffic is the pod's.
		_ = os.WriteFile("/proc/sys/net/ipv6/conf/"+p.HostVeth+"/disable_ipv6", []byte("1"), 0o644)
		return netlink.LinkSetUp(veth)
	}, func() { deleteLink(p.HostVeth) }); err != nil {
		return nil, err
	}
	if err := step("pod network", func() error { return setupPodSide(p, ns) }, nil); err != nil {
		return nil, err
	}
	if err := step("state", func() error { return writeState(cfg, p) }, func() { os.Remove(statePath(cfg, name)) }); err != nil {
		return nil, err
	}
	return p, nil
}

// failStep, when set by a test, makes Create fail at that step, to test
// the rollback.
var failStep string

// setupPodSide configures the pod end: quiet IPv6 autoconfiguration (so
// interface counters move only with the pod's own traffic), lo and eth0 up,
// addresses without duplicate address detection, default routes.
func setupPodSide(p *Pod, ns netns.NsHandle) error {
	err := p.doIn(ns, func() error {
		for _, f := range []string{"all/accept_ra", "default/accept_ra", "eth0/accept_ra",
			"all/router_solicitations", "default/router_solicitations", "eth0/router_solicitations"} {
			if err := os.WriteFile("/proc/sys/net/ipv6/conf/"+f, []byte("0"), 0o644); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("sysctl: %w", err)
	}
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		return err
	}
	defer h.Close()
	lo, err := h.LinkByName("lo")
	if err != nil {
		return err
	}
	if err := h.LinkSetUp(lo); err != nil {
		return err
	}
	eth0, err := h.LinkByName("eth0")
	if err != nil {
		return err
	}
	for _, a := range []*netlink.Addr{
		{IPNet: ipnet(netip.PrefixFrom(p.IPv4, p.Subnet.Bits()))},
		{IPNet: ipnet(netip.PrefixFrom(p.IPv6, 64)), Flags: unix.IFA_F_NODAD},
	} {
		if err := h.AddrAdd(eth0, a); err != nil {
			return fmt.Errorf("address %s: %w", a.IPNet, err)
		}
	}
	if err := h.LinkSetUp(eth0); err != nil {
		return err
	}
	for _, gw := range []netip.Addr{p.Gateway4, p.Gateway6} {
		r := &netlink.Route{LinkIndex: eth0.Attrs().Index, Gw: gw.AsSlice()}
		if err := h.RouteAdd(r); err != nil {
			return fmt.Errorf("default route via %s: %w", gw, err)
		}
	}
	return nil
}

func ipnet(p netip.Prefix) *net.IPNet {
	return &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}

// ensureBridge returns the subnet's bridge, creating it with the gateway
// addresses if needed.
func ensureBridge(p *Pod) (netlink.Link, bool, error) {
	if l, err := netlink.LinkByName(p.Bridge); err == nil {
		return l, false, nil
	}
	br := &netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: p.Bridge}}
	if err := netlink.LinkAdd(br); err != nil {
		return nil, false, err
	}
	for _, f := range []string{"accept_ra", "router_solicitations"} {
		_ = os.WriteFile("/proc/sys/net/ipv6/conf/"+p.Bridge+"/"+f, []byte("0"), 0o644)
	}
	for _, a := range []*netlink.Addr{
		{IPNet: ipnet(netip.PrefixFrom(p.Gateway4, p.Subnet.Bits()))},
		{IPNet: ipnet(netip.PrefixFrom(p.Gateway6, 64)), Flags: unix.IFA_F_NODAD},
	} {
		if err := netlink.AddrAdd(br, a); err != nil {
			return br, true, fmt.Errorf("gateway address %s: %w", a.IPNet, err)
		}
	}
	if err := netlink.LinkSetUp(br); err != nil {
		return br, true, err
	}
	l, err := netlink.LinkByName(p.Bridge)
	return l, true, err
}

// checkSubnetFree refuses a subnet that overlaps an address or route on the
// host other than the pods' own bridge for that very subnet, or another pod
// subnet: pods must never capture a real network's traffic.
func checkSubnetFree(subnet netip.Prefix, pods []*Pod) error {
	for _, p := range pods {
		if p.Subnet != subnet && p.Subnet.Overlaps(subnet) {
			return fmt.Errorf("%w %s: overlaps pod subnet %s (pod %s)", ErrInvalidSubnet, subnet, p.Subnet, p.Name)
		}
	}
	own := BridgeName(subnet)
	routes, err := netlink.RouteListFiltered(netlink.FAMILY_V4, &netlink.Route{Table: unix.RT_TABLE_UNSPEC}, netlink.RT_FILTER_TABLE)
	if err != nil {
		return fmt.Errorf("list host routes: %w", err)
	}
	for _, r := range routes {
		if r.Dst == nil {
			continue // default route (it overlaps everything)
		}
		dst, ok := netip.AddrFromSlice(r.Dst.IP)
		if !ok {
			continue
		}
		ones, _ := r.Dst.Mask.Size()
		rp := netip.PrefixFrom(dst.Unmap(), ones)
		if ones == 0 || !rp.Overlaps(subnet) {
			continue
		}
		if l, err := netlink.LinkByIndex(r.LinkIndex); err == nil && l.Attrs().Name == own {
			continue
		}
		return fmt.Errorf("%w %s: overlaps %s already routed on this host", ErrInvalidSubnet, subnet, rp)
	}
	return nil
}

// allocate checks a requested address or picks the lowest free one.
func allocate(subnet netip.Prefix, want netip.Addr, pods []*Pod) (netip.Addr, error) {
	used := map[netip.Addr]string{}
	for _, p := range pods {
		if p.Subnet == subnet {
			used[p.IPv4] = p.Name
		}
	}
	size := uint32(1) << (32 - subnet.Bits())
	if want.IsValid() {
		switch {
		case !want.Is4() || !subnet.Contains(want):
			return netip.Addr{}, fmt.Errorf("%w %s: not in subnet %s", ErrInvalidIP, want, subnet)
		case offset(subnet, want) < 2 || offset(subnet, want) == size-1:
			return netip.Addr{}, fmt.Errorf("%w %s: the network, gateway (.1) and broadcast addresses are reserved", ErrInvalidIP, want)
		case used[want] != "":
			return netip.Addr{}, fmt.Errorf("%w %s: taken by pod %s", ErrInvalidIP, want, used[want])
		}
		return want, nil
	}
	for off := uint32(2); off < size-1; off++ {
		if a := addrAt(subnet, off); used[a] == "" {
			return a, nil
		}
	}
	return netip.Addr{}, fmt.Errorf("%w: all %d addresses of %s are taken; delete a pod or use --subnet", ErrSubnetExhausted, size-3, subnet)
}

// newNamedNetns creates a network namespace bind-mounted at path, on a locked
// thread that never returns to the pool if it cannot switch back.
func newNamedNetns(path string) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return err
	}
	f, err := os.OpenFile(path, os.O_CREATE|os.O_EXCL|os.O_RDONLY, 0o444)
	if err != nil {
		return err
	}
	f.Close()
	err = nsenter.Run(func() error { return unix.Unshare(unix.CLONE_NEWNET) }, func() error {
		self := fmt.Sprintf("/proc/self/task/%d/ns/net", unix.Gettid())
		if err := unix.Mount(self, path, "none", unix.MS_BIND, ""); err != nil {
			return fmt.Errorf("bind mount %s: %w", path, err)
		}
		return nil
	})
	if err != nil {
		os.Remove(path)
		return err
	}
	return nil
}

func deleteNamedNetns(path string) error {
	if err := unix.Unmount(path, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
		return fmt.Errorf("unmount %s: %w", path, err)
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	return nil
}

func deleteLink(name string) error {
	l, err := netlink.LinkByName(name)
	if err != nil {
		var nf netlink.LinkNotFoundError
		if errors.As(err, &nf) {
			return nil
		}
		return err
	}
	return netlink.LinkDel(l)
}

// deleteBridgeIfUnused removes a pod bridge no other pod than except uses.
func deleteBridgeIfUnused(cfg Config, bridge, except string) error {
	pods, err := list(cfg)
	if err != nil {
		return err
	}
	for _, p := range pods {
		if p.Bridge == bridge && p.Name != except {
			return nil
		}
	}
	return deleteLink(bridge)
}

// Delete removes a pod: its containers' processes (killed) and cgroups,
// veth, namespace, state, and its bridge when no other pod uses it. A missing pod is not an error (existed reports it). Without a
// state file, the deterministic names of a half-created pod are cleaned up.
func Delete(cfg Config, name string) (existed bool, err error) {
	if err := ValidateName(name); err != nil {
		return false, err
	}
	unlock, err := lock(cfg)
	if err != nil {
		return false, err
	}
	defer unlock()
	p, err := get(cfg, name)
	if err != nil && !errors.Is(err, ErrNotFound) {
		return false, err
	}
	existed = p != nil
	var errs []error
	// Its containers first (`pod exec --container`): killed, their
	// cgroups removed.
	errs = append(errs, removePodCgroups(name))
	hostVeth := HostVethName(name)
	if _, lerr := netlink.LinkByName(hostVeth); lerr == nil {
		existed = true
	}
	errs = append(errs, deleteLink(hostVeth))
	nsPath := filepath.Join(NetnsDir, name)
	if p != nil {
		nsPath = p.NetnsPath
	}
	if p != nil || existed {
		if _, serr := os.Lstat(nsPath); serr == nil {
			errs = append(errs, deleteNamedNetns(nsPath))
		}
	}
	if p != nil {
		if rerr := os.Remove(statePath(cfg, name)); rerr != nil && !errors.Is(rerr, os.ErrNotExist) {
			errs = append(errs, rerr)
		}
		errs = append(errs, deleteBridgeIfUnused(cfg, p.Bridge, name))
	}
	if err := errors.Join(errs...); err != nil {
		return existed, fmt.Errorf("delete pod %s: %w", name, err)
	}
	return existed, nil
}

// Get returns a pod by name.
func Get(cfg Config, name string) (*Pod, error) {
	if err := ValidateName(name); err != nil {
		return nil, err
	}
	return get(cfg, name)
}

func get(cfg Config, name string) (*Pod, error) {
	b, err := os.ReadFile(statePath(cfg, name))
	if errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("%w: %s (see: nsflow pod list)", ErrNotFound, name)
	}
	if err != nil {
		return nil, err
	}
	var p Pod
	if err := json.Unmarshal(b, &p); err != nil {
		return nil, fmt.Errorf("read pod %s: %w", name, err)
	}
	return &p, nil
}

// List returns every pod, sorted by name.
func List(cfg Config) ([]*Pod, error) { return list(cfg) }

func list(cfg Config) ([]*Pod, error) {
	ents, err := os.ReadDir(cfg.dir())
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var pods []*Pod
	for _, e := range ents {
		name, ok := strings.CutSuffix(e.Name(), ".json")
		if !ok || ValidateName(name) != nil {
			continue
		}
		p, err := get(cfg, name)
		if err != nil {
			continue // deleted meanwhile
		}
		pods = append(pods, p)
	}
	sort.Slice(pods, func(a, b int) bool { return pods[a].Name < pods[b].Name })
	return pods, nil
}

func statePath(cfg Config, name string) string { return filepath.Join(cfg.dir(), name+".json") }

func writeState(cfg Config, p *Pod) error {
	b, err := json.MarshalIndent(p, "", "  ")
	if err != nil {
		return err
	}
	tmp, err := os.CreateTemp(cfg.dir(), ".pod-*") // mode 0600
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name())
	if _, err := tmp.Write(b); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	return os.Rename(tmp.Name(), statePath(cfg, p.Name))
}

// lock serializes pod creation and deletion across processes.
func lock(cfg Config) (func(), error) {
	if err := os.MkdirAll(cfg.dir(), 0o700); err != nil {
		return nil, fmt.Errorf("pod state dir: %w", err)
	}
	// The state is root's alone, whoever made the directory.
	if err := os.Chmod(cfg.dir(), 0o700); err != nil {
		return nil, fmt.Errorf("pod state dir: %w", err)
	}
	f, err := os.OpenFile(filepath.Join(cfg.dir(), ".lock"), os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return nil, err
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX); err != nil {
		f.Close()
		return nil, err
	}
	return func() { unix.Flock(int(f.Fd()), unix.LOCK_UN); f.Close() }, nil
}

// Handle opens the pod's namespace; the caller closes it.
func (p *Pod) Handle() (netns.NsHandle, error) { return netns.GetFromPath(p.NetnsPath) }

// Netlink opens a netlink handle inside the pod's namespace; the caller
// closes it.
func (p *Pod) Netlink() (*netlink.Handle, error) {
	ns, err := p.Handle()
	if err != nil {
		return nil, fmt.Errorf("pod %s: %w", p.Name, err)
	}
	defer ns.Close() // the handle's sockets stay in the namespace
	nl, err := netlink.NewHandleAt(ns)
	if err != nil {
		return nil, fmt.Errorf("pod %s: netlink: %w", p.Name, err)
	}
	return nl, nil
}

// Do runs fn on a locked OS thread inside the pod's namespace. Sockets fn
// opens stay in the pod after it returns; processes it forks start there.
func (p *Pod) Do(fn func() error) error {
	ns, err := p.Handle()
	if err != nil {
		return fmt.Errorf("pod %s: %w", p.Name, err)
	}
	defer ns.Close()
	return p.doIn(ns, fn)
}

func (p *Pod) doIn(ns netns.NsHandle, fn func() error) error {
	if err := nsenter.Do(ns, fn); err != nil {
		return fmt.Errorf("pod %s: %w", p.Name, err)
	}
	return nil
}

// Start starts cmd as a "container" of the pod: a process in its namespace.
func (p *Pod) Start(cmd *exec.Cmd) error { return p.Do(cmd.Start) }
