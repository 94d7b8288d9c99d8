package discovery_test

import (
	"net/netip"
	"os/exec"
	"regexp"
	"slices"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/nsflow/nsflow/collector"
	"github.com/nsflow/nsflow/collector/attach"
	"github.com/nsflow/nsflow/collector/discovery"
	"github.com/nsflow/nsflow/collector/flow"
	"github.com/nsflow/nsflow/test/podns"
	"github.com/nsflow/nsflow/test/testenv"
)

// List, without a collector, finds a pod's namespace under its ip netns
// name with its inode, its processes and their commands, the pod it is
// given, and, from the kernel, which of its interfaces hold nsflow's TCX
// programs.
func TestListFindsNamespaceAndAttachments(t *testing.T) {
	testenv.RequireRoot(t)
	const name = "dsc-list"
	p, err := podns.Create(podns.Config{}, name, podns.Options{Subnet: netip.MustParsePrefix("10.213.190.0/24")})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { podns.Delete(podns.Config{}, name) })
	var st unix.Stat_t
	if err := unix.Stat(p.NetnsPath, &st); err != nil {
		t.Fatal(err)
	}
	sleeper := exec.Command("nsenter", "--net="+p.NetnsPath, "sleep", "30")
	if err := sleeper.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { sleeper.Process.Kill(); sleeper.Wait() })

	cfg := discovery.Config{Proc: true, Include: regexp.MustCompile("^" + name + "$")}
	pods := map[uint64]flow.PodInfo{st.Ino: {Name: "web-0", Namespace: "shop"}}
	list := func() discovery.ListedNamespace {
		t.Helper()
		// nsenter execs sleep: wait until the process is in the namespace.
		deadline := time.Now().Add(5 * time.Second)
		for {
			ls, err := discovery.List(cfg, pods)
			if err != nil {
				t.Fatal(err)
			}
			if len(ls) == 1 && slices.Contains(ls[0].Pids, sleeper.Process.Pid) && slices.Contains(ls[0].Commands, "sleep") {
				return ls[0]
			}
			if time.Now().After(deadline) {
				t.Fatalf("List: %+v, want %s with pid %d (sleep)", ls, name, sleeper.Process.Pid)
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	eth0 := func(ln discovery.ListedNamespace) discovery.ListedIface {
		t.Helper()
		for _, i := range ln.Interfaces {
			if i.Name == "eth0" {
				return i
			}
		}
		t.Fatalf("no eth0 in %+v", ln.Interfaces)
		return discovery.ListedIface{}
	}

	ln := list()
	if ln.Name != name || ln.Path != p.NetnsPath || ln.Inode != st.Ino || ln.Error != "" {
		t.Errorf("listed %+v, want name %s, path %s, inode %d", ln, name, p.NetnsPath, st.Ino)
	}
	if ln.Pod == nil || *ln.Pod != pods[st.Ino] {
		t.Errorf("pod %+v, want %+v", ln.Pod, pods[st.Ino])
	}

	c, err := collector.New(collector.Config{Mode: attach.ModeTCX})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	if _, err := c.Add(collector.Target{Name: name, Path: p.NetnsPath}); err != nil {
		t.Fatal(err)
	}
	if i := eth0(list()); i.Attach != "tcx" || i.Partial {
		t.Errorf("eth0 with nsflow attached: %+v, want attach tcx on both hooks", i)
	}
}
