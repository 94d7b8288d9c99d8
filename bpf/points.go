package bpf

import (
	"errors"
	"fmt"
	"maps"
	"math/bits"
	"os"
	"path/filepath"
	"sync"

	"github.com/cilium/ebpf"
)

// ErrTotalsFull is returned when every slot of the totals map is taken.
var ErrTotalsFull = errors.New("totals map full: no free slot for another observation point")

// CookiesMap is the name of the map that records, per slot of totals, the
// cookie of the network namespace the slot counts (0: unknown). The BPF
// programs never read it: it is user-space state, pinned with the others,
// so that a process adopting pinned maps can tell a namespace from a later
// one that got the same inode (the kernel reuses nsfs inodes; it never
// reuses a namespace cookie within a boot).
const CookiesMap = "cookies"

// cookiesSpec is the cookies map for maxPoints slots: slot → cookie.
func cookiesSpec(maxPoints uint32) *ebpf.MapSpec {
	return &ebpf.MapSpec{Name: CookiesMap, Type: ebpf.Array, KeySize: 4, ValueSize: 8, MaxEntries: maxPoints}
}

// loadCookies creates the cookies map, or with a pin path reuses the pinned
// one when it is compatible (replacing it, with onReplace told, when not).
func loadCookies(maxPoints uint32, pinPath string, onReplace func(string, error)) (*ebpf.Map, error) {
	spec := cookiesSpec(maxPoints)
	if pinPath == "" {
		return ebpf.NewMap(spec)
	}
	path := filepath.Join(pinPath, CookiesMap)
	m, err := ebpf.LoadPinnedMap(path, nil)
	if err == nil {
		if err = spec.Compatible(m); err == nil {
			return m, nil
		}
		m.Close()
	}
	if !errors.Is(err, os.ErrNotExist) {
		if onReplace != nil {
			onReplace(CookiesMap, err)
		}
		if err := os.Remove(path); err != nil {
			return nil, fmt.Errorf("replace pinned map %s: %w", path, err)
		}
	}
	if m, err = ebpf.NewMap(spec); err != nil {
		return nil, fmt.Errorf("create %s map: %w", CookiesMap, err)
	}
	if err := m.Pin(path); err != nil {
		m.Close()
		return nil, fmt.Errorf("pin %s map: %w", CookiesMap, err)
	}
	return m, nil
}

// slots assigns the slots of the totals array to observation points. The
// assignment lives in the points map too (and the namespace's cookie in the
// cookies map), so that a process adopting pinned maps knows what each slot
// counts. Free slots are handed out lowest first, so that the taken ones
// stay packed at the start of the array and a read of the totals stops at
// high.
type slots struct {
	totals, points, cookies, flows *ebpf.Map
	containers                     *ebpf.Map // per (slot, cgroup); nil when off
	ncpu                           int

	mu       sync.Mutex
	bySlot   map[uint32]NsflowObsKey
	byKey    map[NsflowObsKey]uint32
	cookieOf map[uint32]uint64 // by slot; absent: 0, unknown
	used     []uint64          // bitmap of taken slots
	high     uint32            // 1 + the highest taken slot

	flowsDeleted uint64 // flows deleted with their points
}

func (s *slots) init(totals, points, cookies, flows, containers *ebpf.Map) error {
	ncpu, err := ebpf.PossibleCPU()
	if err != nil {
		return err
	}
	*s = slots{totals: totals, points: points, cookies: cookies, flows: flows, containers: containers, ncpu: ncpu,
		bySlot: map[uint32]NsflowObsKey{}, byKey: map[NsflowObsKey]uint32{}, cookieOf: map[uint32]uint64{},
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
			break
		}
		if err != nil {
			return fmt.Errorf("read points: %w", err)
		}
	}
	for slot := range s.bySlot {
		var c uint64
		if err := cookies.Lookup(slot, &c); err != nil {
			return fmt.Errorf("read cookie of slot %d: %w", slot, err)
		}
		if c != 0 {
			s.cookieOf[slot] = c
		}
	}
	return nil
}

func (s *slots) take(slot uint32, key NsflowObsKey) {
	s.bySlot[slot] = key
	s.byKey[key] = slot
	s.used[slot/64] |= 1 << (slot % 64)
	s.high = max(s.high, slot+1)
}

// assign returns key's slot, taking the lowest free one (its counters
// zeroed) when key has none. A slot that counted key for a namespace of
// another cookie (an earlier namespace that had the same inode: it is gone,
// since the kernel gave its inode to another) is zeroed and handed to the
// new one: its counts never carry over.
func (s *slots) assign(key NsflowObsKey, cookie uint64) (uint32, error) {
	if key.Netns == 0 {
		return 0, errors.New("observation point without a namespace")
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if slot, ok := s.byKey[key]; ok {
		if s.cookieOf[slot] == cookie {
			return slot, nil
		}
		if err := s.deleteFlows(map[uint32]NsflowObsKey{slot: key}); err != nil {
			return 0, err
		}
		if err := s.totals.Update(slot, make([]NsflowCounters, s.ncpu), ebpf.UpdateAny); err != nil {
			return 0, fmt.Errorf("zero totals slot %d: %w", slot, err)
		}
		if err := s.setCookie(slot, cookie); err != nil {
			return 0, err
		}
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
	// The cookie first: a points entry is never without its namespace's.
	if err := s.setCookie(slot, cookie); err != nil {
		return 0, err
	}
	if err := s.points.Update(slot, key, ebpf.UpdateAny); err != nil {
		return 0, fmt.Errorf("record point of slot %d: %w", slot, err)
	}
	s.take(slot, key)
	return slot, nil
}

func (s *slots) setCookie(slot uint32, cookie uint64) error {
	if err := s.cookies.Update(slot, cookie, ebpf.UpdateAny); err != nil {
		return fmt.Errorf("record cookie of slot %d: %w", slot, err)
	}
	if cookie == 0 {
		delete(s.cookieOf, slot)
	} else {
		s.cookieOf[slot] = cookie
	}
	return nil
}

// release frees the slots of the matching points: their flows are
// deleted, their points entries cleared and their counters zeroed. Only
// call it once no stub counts into them any more (their hooks are
// detached).
func (s *slots) release(match func(NsflowObsKey) bool) (int, error) {
	return s.releaseWhere(func(_ uint32, key NsflowObsKey) bool { return match(key) })
}

// releaseWhere is release with a match that also sees the slot; it runs
// with s.mu held.
func (s *slots) releaseWhere(match func(slot uint32, key NsflowObsKey) bool) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	var errs []error
	free := map[uint32]NsflowObsKey{}
	for slot, key := range s.bySlot {
		if match(slot, key) {
			free[slot] = key
		}
	}
	if len(free) == 0 {
		return 0, nil
	}
	// The flows first, while the slots are still taken: a flow key names
	// its point by slot, and a slot handed out again must start without
	// the flows of the point it counted before.
	if err := s.deleteFlows(free); err != nil {
		errs = append(errs, err)
	}
	n := 0
	for slot, key := range free {
		if err := s.points.Update(slot, NsflowObsKey{}, ebpf.UpdateAny); err != nil {
			errs = append(errs, fmt.Errorf("clear point of slot %d: %w", slot, err))
			continue
		}
		if err := s.totals.Update(slot, make([]NsflowCounters, s.ncpu), ebpf.UpdateAny); err != nil {
			errs = append(errs, fmt.Errorf("zero totals slot %d: %w", slot, err))
		}
		if err := s.setCookie(slot, 0); err != nil {
			errs = append(errs, err)
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

// deleteFlows deletes the flows of the slots in free from the flow map,
// counting them in flowsDeleted, and their per-cgroup totals from the
// containers map.
func (s *slots) deleteFlows(free map[uint32]NsflowObsKey) error {
	var fk NsflowFlowKey
	var fv NsflowFlowVal
	var del []NsflowFlowKey
	it := s.flows.Iterate()
	for it.Next(&fk, &fv) {
		if _, ok := free[uint32(fk.Slot)]; ok {
			del = append(del, fk)
		}
	}
	err := it.Err()
	for _, k := range del {
		if s.flows.Delete(k) == nil {
			s.flowsDeleted++
		}
	}
	if err != nil {
		return fmt.Errorf("read flows: %w", err)
	}
	if s.containers == nil {
		return nil // off: the programs write nothing there
	}
	var ck NsflowContainerKey
	var cv NsflowCounters
	var cdel []NsflowContainerKey
	cit := s.containers.Iterate()
	for cit.Next(&ck, &cv) {
		if _, ok := free[ck.Slot]; ok {
			cdel = append(cdel, ck)
		}
	}
	for _, k := range cdel {
		s.containers.Delete(k)
	}
	if err := cit.Err(); err != nil {
		return fmt.Errorf("read containers: %w", err)
	}
	return nil
}

// FlowsDeleted is how many flows releasing points deleted so far (what a
// count of evictions must leave out: created - live - deleted).
func (o *Objects) FlowsDeleted() uint64 {
	s := &o.slots
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.flowsDeleted
}

// PointsBySlot returns every observation point that has a slot, by slot:
// what a flow key's slot names.
func (o *Objects) PointsBySlot() map[uint32]NsflowObsKey {
	s := &o.slots
	s.mu.Lock()
	defer s.mu.Unlock()
	return maps.Clone(s.bySlot)
}

// Point returns the observation point of a slot.
func (o *Objects) Point(slot uint32) (NsflowObsKey, bool) {
	s := &o.slots
	s.mu.Lock()
	defer s.mu.Unlock()
	k, ok := s.bySlot[slot]
	return k, ok
}

// ReleasePoints frees the totals slots of the observation points that
// match: their counters and flows are gone. Only call it once their hooks are
// detached. It returns how many it freed.
func (o *Objects) ReleasePoints(match func(NsflowObsKey) bool) (int, error) {
	return o.slots.release(match)
}

// ReleaseOtherNamespaces frees the slots of the observation points of
// inode netns that belong to a namespace other than the one of that cookie:
// an earlier namespace whose inode the kernel gave to the namespace of the
// cookie (so it is gone, and so are its hooks). It returns how many.
func (o *Objects) ReleaseOtherNamespaces(netns uint32, cookie uint64) (int, error) {
	s := &o.slots
	return s.releaseWhere(func(slot uint32, key NsflowObsKey) bool {
		return key.Netns == netns && s.cookieOf[slot] != cookie
	})
}

// PointCookies returns the namespace cookie recorded for every observation
// point that has a slot (0: unknown, e.g. points assigned by Stub).
func (o *Objects) PointCookies() map[NsflowObsKey]uint64 {
	s := &o.slots
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make(map[NsflowObsKey]uint64, len(s.byKey))
	for k, slot := range s.byKey {
		out[k] = s.cookieOf[slot]
	}
	return out
}

// Slots returns every observation point that has a slot, with its slot.
func (o *Objects) Slots() map[NsflowObsKey]uint32 {
	s := &o.slots
	s.mu.Lock()
	defer s.mu.Unlock()
	return maps.Clone(s.byKey)
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

// ReadContainers calls fn with the per-cgroup totals of every observation
// point that has a slot (Options.ContainerEntries): cgroup is the cgroup v2
// id (0: no socket, or unknown), c the packets and bytes counted under it
// (one value shared by every CPU). No slot changes hands meanwhile. With
// the map off it calls fn for nothing.
func (o *Objects) ReadContainers(fn func(slot uint32, key NsflowObsKey, cgroup uint64, c NsflowCounters)) error {
	s := &o.slots
	s.mu.Lock()
	defer s.mu.Unlock()
	var k NsflowContainerKey
	var v NsflowCounters
	it := o.Containers.Iterate()
	for it.Next(&k, &v) {
		if key, ok := s.bySlot[k.Slot]; ok {
			fn(k.Slot, key, k.Cgroup, v)
		}
	}
	if err := it.Err(); err != nil {
		return fmt.Errorf("read containers: %w", err)
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
