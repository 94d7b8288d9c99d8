package collector_test

import (
	"fmt"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/nsflow/nsflow/collector"
	"github.com/nsflow/nsflow/collector/attach"
	"github.com/nsflow/nsflow/test/podns"
	"github.com/nsflow/nsflow/test/testenv"
)

// Interfaces deleted between Add's listing and its attach (a node where
// pods come and go) are not attach errors: Add succeeds while veth pairs
// churn in the namespace, many times over.
func TestAddWhileInterfacesVanish(t *testing.T) {
	testenv.RequireRoot(t)
	const name = "col-vanish"
	p, err := podns.Create(podns.Config{}, name, podns.Options{Subnet: netip.MustParsePrefix("10.213.192.0/24")})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { podns.Delete(podns.Config{}, name) })
	nl, err := p.Netlink()
	if err != nil {
		t.Fatal(err)
	}
	defer nl.Close()
	c, err := collector.New(collector.Config{Mode: attach.ModeTCX})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })

	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { // bounded: at most 2,000 pairs, stopped with the test
		defer wg.Done()
		for i := 0; i < 2000; i++ {
			select {
			case <-stop:
				return
			default:
			}
			v := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: fmt.Sprintf("vn%d", i%8)}, PeerName: fmt.Sprintf("vp%d", i%8)}
			if err := nl.LinkAdd(v); err == nil {
				nl.LinkDel(v)
			}
		}
	}()
	defer func() { close(stop); wg.Wait() }()

	start := time.Now()
	n := 0
	// Bounded by count, not by a time a loaded machine may not meet.
	for ; n < 20 && time.Since(start) < 30*time.Second; n++ {
		ino, err := c.Add(collector.Target{Name: name, Path: p.NetnsPath})
		if err != nil {
			t.Fatalf("Add #%d, %v into the churn: %v", n, time.Since(start), err)
		}
		c.Remove(ino)
	}
	if n < 20 {
		t.Fatalf("only %d Adds in %v", n, time.Since(start))
	}
}
