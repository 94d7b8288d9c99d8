package collector

import (
	"testing"

	"github.com/vishvananda/netlink"
)

// A host end's peer is known only for a veth or netkit end whose peer lies
// in another namespace (IFLA_LINK_NETNSID set) at a known ifindex.
func TestPairPeer(t *testing.T) {
	attrs := func(nsid, parent int) netlink.LinkAttrs {
		a := netlink.NewLinkAttrs()
		a.NetNsID, a.ParentIndex = nsid, parent
		return a
	}
	for _, tc := range []struct {
		what        string
		l           netlink.Link
		nsid, index int
		ok          bool
	}{
		{"veth, peer in nsid 3 at ifindex 2", &netlink.Veth{LinkAttrs: attrs(3, 2)}, 3, 2, true},
		{"veth, peer in nsid 0", &netlink.Veth{LinkAttrs: attrs(0, 9)}, 0, 9, true},
		{"netkit", &netlink.Netkit{LinkAttrs: attrs(1, 4)}, 1, 4, true},
		{"veth, peer in the same namespace", &netlink.Veth{LinkAttrs: attrs(-1, 5)}, -1, 0, false},
		{"veth, peer index unknown", &netlink.Veth{LinkAttrs: attrs(2, 0)}, -1, 0, false},
		{"vlan with a lower device elsewhere", &netlink.Vlan{LinkAttrs: attrs(2, 3)}, -1, 0, false},
		{"macvlan", &netlink.Macvlan{LinkAttrs: attrs(2, 3)}, -1, 0, false},
		{"device", &netlink.Device{LinkAttrs: attrs(2, 3)}, -1, 0, false},
	} {
		nsid, index, ok := pairPeer(tc.l)
		if nsid != tc.nsid || index != tc.index || ok != tc.ok {
			t.Errorf("%s: %d, %d, %v; want %d, %d, %v", tc.what, nsid, index, ok, tc.nsid, tc.index, tc.ok)
		}
	}
}
