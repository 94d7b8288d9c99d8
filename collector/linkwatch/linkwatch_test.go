package linkwatch_test

import (
	"net/netip"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/nsflow/nsflow/collector/linkwatch"
	"github.com/nsflow/nsflow/test/podns"
	"github.com/nsflow/nsflow/test/testenv"
)

// A watch opened in a namespace reports the interfaces created and deleted
// there, and Run returns once the watch is closed.
func TestWatchReportsLinkEvents(t *testing.T) {
	testenv.RequireRoot(t)
	const name = "lw-watch"
	p, err := podns.Create(podns.Config{}, name, podns.Options{Subnet: netip.MustParsePrefix("10.213.191.0/24")})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { podns.Delete(podns.Config{}, name) })
	h, err := p.Handle()
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	w, err := linkwatch.Open(h)
	if err != nil {
		t.Fatal(err)
	}
	events := make(chan netlink.LinkUpdate, 64)
	done := make(chan error, 1)
	go func() {
		done <- w.Run(func(u netlink.LinkUpdate) {
			select {
			case events <- u:
			default: // the test reads what it needs; never block the watch
			}
		})
	}()

	nl, err := p.Netlink()
	if err != nil {
		t.Fatal(err)
	}
	defer nl.Close()
	veth := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "lwveth0"}, PeerName: "lwveth1"}
	if err := nl.LinkAdd(veth); err != nil {
		t.Fatal(err)
	}
	expect := func(typ uint16, what string) {
		t.Helper()
		timeout := time.After(5 * time.Second)
		for {
			select {
			case u := <-events:
				if u.Header.Type == typ && u.Link.Attrs().Name == "lwveth0" {
					return
				}
			case <-timeout:
				t.Fatalf("no %s event for lwveth0", what)
			}
		}
	}
	expect(unix.RTM_NEWLINK, "RTM_NEWLINK")
	if err := nl.LinkDel(veth); err != nil {
		t.Fatal(err)
	}
	expect(unix.RTM_DELLINK, "RTM_DELLINK")

	w.Close()
	select {
	case err := <-done:
		if err == nil {
			t.Error("Run returned nil after Close, want the read error")
		}
	case <-time.After(2 * time.Second):
		t.Fatal("Run still blocked 2s after Close")
	}
}
