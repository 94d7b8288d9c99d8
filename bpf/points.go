package bpf

import (
	"errors"
	"fmt"
	"math/bits"
	"sync"

	"github.com/cilium/ebpf"
)

// ErrTotalsFull is returned when every slot of the totals map is taken.
var ErrTotalsFull = errors.New("totals map full: no free slot for another observation point")

// slots assigns the slots of the totals array to observation points. The
// assignment lives in the points map too, so that a process adopting pinned
// maps knows what each slot counts. Free slots are handed out lowest first,
// so that the taken ones stay packed at the start of the array and a read
// of the totals stops at high.
type slots struct {
	totals, points *ebpf.Map
	ncpu           int

	mu     sync.Mutex
	bySlot map[uint32]NsflowObsKey
	byKey  map[NsflowObsKey]uint32
	used   []uint64 // bitmap of taken slots
	high   uint32   // 1 + the highest taken slot
}

func (s *slots) init(totals, points *ebpf.Map) error {
	ncpu, err := ebpf.PossibleCPU()
	if err != nil {
		return err
	}
	*s = slots{totals: totals, points: points, ncpu: ncpu,
		bySlot: map[uint32]NsflowObsKey{}, byKey: map[NsflowObsKey]uint32{},
		used: make([]uint64, (totals.MaxEntries()+63)/64)}
	// A pinned points map names the slots a previous process assigned.
	var cursor ebpf.MapBatchCursor
	keys := make([]uint32, 1024)
	vals := make([]NsflowObsKey, 1024)
	for {
		n, err := points.BatchLookup(&cursor, keys, vals, nil)
		for i := 0; i < n; i++ {
			if vals[i].Netns != 0 {
				s.take(keys[i], vals[i])
			}
		}
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			return nil
		}
		if err != nil {
			return fmt.Errorf("read points: %w", err)
		}
	}
}

func (s *slots) take(slot uint32, key NsflowObsKey) {
	s.bySlot[slot] = key
	s.byKey[key] = slot
	s.used[slot/64] |= 1 << (slot % 64)
	s.high = max(s.high, slot+1)
}

// assign returns key's slot, taking the lowest free one (its counters
// zeroed) when key has none.
func (s *slots) assign(key NsflowObsKey) (uint32, error) {
	if key.Netns == 0 {
		return 0, errors.New("observation point without a namespace")
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if slot, ok := s.byKey[key]; ok {
		return slot, nil
	}
	slot, ok := uint32(0), false
	for w, word := range s.used {
		if word != ^uint64(0) {
			slot, ok = uint32(w*64+bits.TrailingZeros64(^word)), true
			break
		}
	}
	if !ok || slot >= s.totals.MaxEntries() {
		return 0, ErrTotalsFull
	}
	// Zero first: no stub counts into a free slot, but a process that died
	// between clearing a point and zeroing its counters leaves them behind.
	if err := s.totals.Update(slot, make([]NsflowCounters, s.ncpu), ebpf.UpdateAny); err != nil {
		return 0, fmt.Errorf("zero totals slot %d: %w", slot, err)
	}
	if err := s.points.Update(slot, key, ebpf.UpdateAny); err != nil {
		return 0, fmt.Errorf("record point of slot %d: %w", slot, err)
	}
	s.take(slot, key)
	return slot, nil
}

// release frees the slots of the matching points: their points entries are
// cleared and their counters zeroed. Only call it once no stub counts into
// them any more (their hooks are detached).
func (s *slots) release(match func(NsflowObsKey) bool) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	var errs []error
	n := 0
	for slot, key := range s.bySlot {
		if !match(key) {
			continue
		}
		if err := s.points.Update(slot, NsflowObsKey{}, ebpf.UpdateAny); err != nil {
			errs = append(errs, fmt.Errorf("clear point of slot %d: %w", slot, err))
			continue
		}
		if err := s.totals.Update(slot, make([]NsflowCounters, s.ncpu), ebpf.UpdateAny); err != nil {
			errs = append(errs, fmt.Errorf("zero totals slot %d: %w", slot, err))
		}
		delete(s.bySlot, slot)
		delete(s.byKey, key)
		s.used[slot/64] &^= 1 << (slot % 64)
		n++
	}
	for s.high > 0 && s.used[(s.high-1)/64]&(1<<((s.high-1)%64)) == 0 {
		s.high--
	}
	return n, errors.Join(errs...)
}

// ReleasePoints frees the totals slots of the observation points that
// match: their counters are gone. Only call it once their hooks are
// detached. It returns how many it freed.
func (o *Objects) ReleasePoints(match func(NsflowObsKey) bool) (int, error) {
	return o.slots.release(match)
}

// Slots returns every observation point that has a slot, with its slot.
func (o *Objects) Slots() map[NsflowObsKey]uint32 {
	s := &o.slots
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make(map[NsflowObsKey]uint32, len(s.byKey))
	for k, v := range s.byKey {
		out[k] = v
	}
	return out
}

// totalsChunk is how many slots one BPF_MAP_LOOKUP_BATCH call reads: the
// 4,000 observation points of 1,000 pods take 16 system calls.
const totalsChunk = 256

// ReadTotals calls fn with the counters of every observation point that
// has a slot, one value per possible CPU. It reads the taken part of the
// totals array in batches; no slot changes hands meanwhile, so that the
// counts of one point are never read under another's name.
func (o *Objects) ReadTotals(fn func(key NsflowObsKey, perCPU []NsflowCounters)) error {
	s := &o.slots
	s.mu.Lock()
	defer s.mu.Unlock()
	high, points := s.high, s.bySlot
	if high == 0 {
		return nil
	}
	keys := make([]uint32, totalsChunk)
	vals := make([]NsflowCounters, totalsChunk*s.ncpu)
	var cursor ebpf.MapBatchCursor
	for read := uint32(0); read < high; {
		n, err := o.Totals.BatchLookup(&cursor, keys, vals, nil)
		for i := 0; i < n; i++ {
			if key, ok := points[keys[i]]; ok {
				fn(key, vals[i*s.ncpu:(i+1)*s.ncpu])
			}
		}
		read += uint32(n)
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			return nil
		}
		if errors.Is(err, ebpf.ErrNotSupported) {
			return o.readTotalsByKey(points, fn)
		}
		if err != nil {
			return fmt.Errorf("read totals: %w", err)
		}
	}
	return nil
}

// readTotalsByKey reads slot by slot, on kernels without batch operations.
func (o *Objects) readTotalsByKey(points map[uint32]NsflowObsKey, fn func(NsflowObsKey, []NsflowCounters)) error {
	var vals []NsflowCounters
	for slot, key := range points {
		if err := o.Totals.Lookup(slot, &vals); err != nil {
			return fmt.Errorf("read totals slot %d: %w", slot, err)
		}
		fn(key, vals)
	}
	return nil
}
