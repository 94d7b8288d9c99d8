package bpf

import (
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/cilium/ebpf"

	"github.com/nsflow/nsflow/test/testenv"
)

// A pinned flow map of the layout before the flow value had its cgroup
// (40-byte values) is replaced, OnReplace told, never read with the new
// layout; a pinned containers map is adopted by a process that keeps one,
// and removed by a process that does not (it would not keep it in step
// with the slots it frees).
func TestPinnedLayoutReplaced(t *testing.T) {
	testenv.RequireRoot(t)
	dir := privateBPFFS(t)
	old, err := ebpf.NewMap(&ebpf.MapSpec{Name: NsflowMapFlows, Type: ebpf.LRUHash, KeySize: 40, ValueSize: 40,
		MaxEntries: DefaultFlowEntries(ebpf.MustPossibleCPU())})
	if err != nil {
		t.Fatal(err)
	}
	if err := old.Pin(filepath.Join(dir, NsflowMapFlows)); err != nil {
		t.Fatal(err)
	}
	old.Close()
	replaced := map[string]error{}
	objs, err := Load(Options{PinPath: dir, ContainerEntries: 100, OnReplace: func(name string, why error) { replaced[name] = why }})
	if err != nil {
		t.Fatal(err)
	}
	if len(replaced) != 1 || replaced[NsflowMapFlows] == nil {
		t.Errorf("replaced %v, want only %s", replaced, NsflowMapFlows)
	}
	if vs := objs.Flows.ValueSize(); vs != 48 {
		t.Errorf("flows value size %d, want 48", vs)
	}
	if err := objs.Containers.Put(NsflowContainerKey{Cgroup: 7, Slot: 3}, NsflowCounters{Packets: 5}); err != nil {
		t.Fatal(err)
	}
	objs.Close()

	// Adopted, with its entry.
	replaced = map[string]error{}
	objs, err = Load(Options{PinPath: dir, ContainerEntries: 100, OnReplace: func(name string, why error) { replaced[name] = why }})
	if err != nil {
		t.Fatal(err)
	}
	var c NsflowCounters
	if err := objs.Containers.Lookup(NsflowContainerKey{Cgroup: 7, Slot: 3}, &c); err != nil || c.Packets != 5 || len(replaced) != 0 {
		t.Errorf("pinned containers entry: %+v, %v; replaced %v", c, err, replaced)
	}
	objs.Close()

	// Off: the pin is gone.
	objs, err = Load(Options{PinPath: dir})
	if err != nil {
		t.Fatal(err)
	}
	objs.Close()
	if _, err := os.Stat(filepath.Join(dir, NsflowMapContainers)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("pinned containers map with containers off: %v", err)
	}
}
