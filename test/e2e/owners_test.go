package e2e

import (
	"bufio"
	"fmt"
	"hash/fnv"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/nsflow/nsflow/collector/nsenter"
)

// Other tests (and other runs of this suite on the same machine) may run
// nsflow instances that observe every namespace, these tests' pods
// included: what a test asserts about the programs on its pods is about
// the programs of its own processes, told apart by what each holds.

// heldLinks returns the IDs of the BPF links process pid holds a
// descriptor of (its TCX links; adopted pinned ones included).
func heldLinks(t *testing.T, pid int) map[link.ID]bool {
	t.Helper()
	dir := fmt.Sprintf("/proc/%d/fdinfo", pid)
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	out := map[link.ID]bool{}
	for _, e := range ents {
		b, err := os.ReadFile(filepath.Join(dir, e.Name()))
		if err != nil {
			continue // closed meanwhile
		}
		for _, line := range strings.Split(string(b), "\n") {
			if v, ok := strings.CutPrefix(line, "link_id:"); ok {
				if id, err := strconv.ParseUint(strings.TrimSpace(v), 10, 32); err == nil {
					out[link.ID(id)] = true
				}
			}
		}
	}
	return out
}

// tcxLinks returns the IDs of the links of the programs attached with TCX
// to every interface of the namespace at path.
func tcxLinks(t *testing.T, path string) map[link.ID]bool {
	t.Helper()
	h, err := netns.GetFromPath(path)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	out := map[link.ID]bool{}
	err = nsenter.Do(h, func() error {
		ifs, err := net.Interfaces()
		if err != nil {
			return err
		}
		for _, i := range ifs {
			for _, at := range []ebpf.AttachType{ebpf.AttachTCXIngress, ebpf.AttachTCXEgress} {
				r, err := link.QueryPrograms(link.QueryOptions{Target: i.Index, Attach: at})
				if err != nil {
					return err
				}
				for _, p := range r.Programs {
					if id, ok := p.LinkID(); ok {
						out[id] = true
					}
				}
			}
		}
		return nil
	})
	if err != nil {
		t.Fatalf("query tcx links in %s: %v", path, err)
	}
	return out
}

// common counts the IDs in both sets.
func common(a, b map[link.ID]bool) int {
	n := 0
	for id := range a {
		if b[id] {
			n++
		}
	}
	return n
}

// ownerNames returns the names of the clsact filters of nsflow process
// pid: nsflow/COOKIE/ID for each abstract socket @nsflow/ID it holds,
// COOKIE that of this process's network namespace (the test and the
// processes it starts share it).
func ownerNames(t *testing.T, pid int) []string {
	t.Helper()
	inodes := map[string]bool{}
	dir := fmt.Sprintf("/proc/%d/fd", pid)
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range ents {
		if target, err := os.Readlink(filepath.Join(dir, e.Name())); err == nil {
			if ino, ok := strings.CutPrefix(target, "socket:["); ok {
				inodes[strings.TrimSuffix(ino, "]")] = true
			}
		}
	}
	f, err := os.Open(fmt.Sprintf("/proc/%d/net/unix", pid))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	cookie := ownCookie(t)
	var names []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		// Num RefCount Protocol Flags Type St Inode Path
		fields := strings.Fields(sc.Text())
		if len(fields) < 8 || !inodes[fields[6]] {
			continue
		}
		if id, ok := strings.CutPrefix(fields[7], "@nsflow/"); ok {
			names = append(names, fmt.Sprintf("nsflow/%016x/%s", cookie, id))
		}
	}
	if len(names) == 0 {
		t.Fatalf("process %d holds no @nsflow/ socket", pid)
	}
	return names
}

func ownCookie(t *testing.T) uint64 {
	t.Helper()
	// The same call nsflow makes on its own socket.
	c, err := netnsCookieOfSelf()
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// pinnedName is the name of the clsact filters a serve with that --pin.path
// leaves for the next one.
func pinnedName(pinPath, layout string) string {
	h := fnv.New32a()
	h.Write([]byte(filepath.Join(pinPath, layout)))
	return fmt.Sprintf("nsflow/pin/%08x", h.Sum32())
}

func netnsCookieOfSelf() (uint64, error) {
	fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return 0, err
	}
	defer unix.Close(fd)
	return unix.GetsockoptUint64(fd, unix.SOL_SOCKET, unix.SO_NETNS_COOKIE)
}
