package collector

import (
	"errors"

	"github.com/cilium/ebpf"
)

// batchChunk is how many entries one BPF_MAP_LOOKUP_BATCH call returns: a
// scrape of 1,000 pods' 4,000 observation points takes 16 system calls, not
// the 8,000 of a key-by-key walk.
const batchChunk = 256

// readPerCPU calls fn for every entry of a per-CPU map, with its values of
// every possible CPU (of any other map: with its one value). It reads in
// batches, and key by key on kernels without batch operations.
func readPerCPU[K, V any](m *ebpf.Map, fn func(k *K, vals []V)) error {
	ncpu, err := ebpf.PossibleCPU()
	if err != nil {
		return err
	}
	if !perCPU(m.Type()) {
		ncpu = 1 // one value shared by every CPU (the flows)
	}
	keys := make([]K, batchChunk)
	vals := make([]V, batchChunk*ncpu)
	var cursor ebpf.MapBatchCursor
	for {
		n, err := m.BatchLookup(&cursor, keys, vals, nil)
		for i := 0; i < n; i++ {
			fn(&keys[i], vals[i*ncpu:(i+1)*ncpu])
		}
		switch {
		case errors.Is(err, ebpf.ErrKeyNotExist):
			return nil
		case errors.Is(err, ebpf.ErrNotSupported):
			return iteratePerCPU(m, fn)
		case err != nil:
			return err
		}
	}
}

func iteratePerCPU[K, V any](m *ebpf.Map, fn func(k *K, vals []V)) error {
	var k K
	if !perCPU(m.Type()) {
		vals := make([]V, 1)
		it := m.Iterate()
		for it.Next(&k, &vals[0]) {
			fn(&k, vals)
		}
		return it.Err()
	}
	var vals []V
	it := m.Iterate()
	for it.Next(&k, &vals) {
		fn(&k, vals)
	}
	return it.Err()
}

// perCPU says whether maps of type t hold a value per possible CPU.
func perCPU(t ebpf.MapType) bool {
	switch t {
	case ebpf.PerCPUHash, ebpf.PerCPUArray, ebpf.LRUCPUHash, ebpf.PerCPUCGroupStorage:
		return true
	}
	return false
}
