package exporter

import (
	"slices"
	"sync"

	"github.com/nsflow/nsflow/collector/flow"
)

// capped turns counts read from the maps into at most max item series (flow
// series, container series) plus one remainder series per group (an
// observation point, a namespace and direction), such that in every scrape,
// for every group,
//
//	Σ item series of the group + its remainder == the group's total
//
// whenever the total was read after the items' packets were counted (traffic
// quiet), and every series is monotonic from scrape to scrape:
//
//   - An item keeps its series while it is in the maps (sticky: the cap does
//     not reshuffle series by size from one scrape to the next); new items
//     take free places, largest by bytes first.
//   - An item series adds the increments of the item's entries (a flow map
//     entry; a (point, cgroup) entry of the container map) since the last
//     scrape: an entry seen for the first time, or whose count went down (it
//     was evicted and re-created), adds its whole count. So its series never
//     decreases, whatever happens to its entries.
//   - A newly placed item starts from its whole count only if the remainder
//     can give that much up without decreasing below its last value (on the
//     first scrape it can: nothing was exported yet); otherwise it starts from
//     0 and its earlier packets stay in the remainder.
//   - The remainder is the group's total minus its item series, clamped so
//     that it never decreases. The collector reads the totals before the
//     items, so a read can only see more in the items than in the totals,
//     never less: the unclamped remainder is at most the true one, and the
//     clamp never holds it above the truth. When traffic is quiet the sum is
//     exact.
//   - An item that leaves the maps (evicted, its point pruned) loses its
//     series; its packets are in the total, so they move into the remainder,
//     which grows by as much.
//
// A group whose total decreased (its namespace or interface was re-created
// under its name: the totals' series restart) starts over.
type capped[G, I, E comparable] struct {
	mu     sync.Mutex
	max    int // < 0: no cap
	gen    uint64
	groups map[G]*cappedGroup
	items  map[I]*cappedItem[G, E]
}

type cappedGroup struct {
	total, rem flow.Counters
	// One scrape's scratch: its total as read, the sum of its item
	// series, what its remainder can give up, and the scrape it was read
	// in.
	next, sum, slack flow.Counters
	gen              uint64
}

type cappedItem[G, E comparable] struct {
	group G
	value flow.Counters
	last  []entryCount[E] // the entries' counts at the last scrape (mostly one)
}

type entryCount[E comparable] struct {
	id E
	c  flow.Counters
}

// observation is one entry's count read from the maps.
type observation[G, I, E comparable] struct {
	group G
	item  I
	entry E
	c     flow.Counters
}

func newCapped[G, I, E comparable](max int) *capped[G, I, E] {
	return &capped[G, I, E]{max: max, groups: map[G]*cappedGroup{}, items: map[I]*cappedItem[G, E]{}}
}

// free returns how many items may still get a series (-1: no cap).
func (c *capped[G, I, E]) free() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.max < 0 {
		return -1
	}
	return max(c.max-len(c.items), 0)
}

// entries returns the entries of the placed items (for a source that reads
// those and only the largest of the others).
func (c *capped[G, I, E]) entries() map[E]bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := make(map[E]bool, len(c.items))
	for _, it := range c.items {
		for _, e := range it.last {
			out[e.id] = true
		}
	}
	return out
}

// update takes one scrape's group totals (totals calls add for each group,
// any number of times: they are summed) and entry counts, passes the item
// series and the remainders to export to item and rem, and returns how many
// items were left without a series.
func (c *capped[G, I, E]) update(totals func(add func(G, flow.Counters)), obs []observation[G, I, E],
	item func(I, flow.Counters), rem func(G, flow.Counters)) (left int) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.gen++
	totals(func(g G, t flow.Counters) {
		st := c.groups[g]
		if st == nil {
			st = &cappedGroup{}
			c.groups[g] = st
		}
		if st.gen != c.gen {
			st.gen, st.next = c.gen, flow.Counters{}
		}
		st.next = add(st.next, t)
	})
	for g, st := range c.groups {
		if st.gen != c.gen {
			delete(c.groups, g)
			continue
		}
		if st.next.Packets < st.total.Packets || st.next.Bytes < st.total.Bytes {
			st.rem = flow.Counters{} // re-created under its name: start over
		}
		st.total, st.sum = st.next, flow.Counters{}
	}

	// The items read, in the order first seen (deterministic for a
	// deterministic source), each with its entries.
	type read struct {
		group G
		sum   flow.Counters
		n     int
		one   [1]entryCount[E] // the entry, when there is one
		more  []entryCount[E]  // the entries, when there are more
	}
	reads := make([]read, 0, len(obs))
	present := make(map[I]int, len(obs))
	var order []I
	for _, o := range obs {
		if c.groups[o.group] == nil {
			continue // not in the totals: nothing to add up to
		}
		j, ok := present[o.item]
		if !ok {
			j = len(reads)
			present[o.item] = j
			order = append(order, o.item)
			reads = append(reads, read{group: o.group})
		}
		r := &reads[j]
		r.sum = add(r.sum, o.c)
		ec := entryCount[E]{o.entry, o.c}
		switch r.n {
		case 0:
			r.one[0] = ec
		case 1:
			r.more = append(r.more, r.one[0], ec)
		default:
			r.more = append(r.more, ec)
		}
		r.n++
	}
	entries := func(r *read) []entryCount[E] {
		if r.n == 1 {
			return r.one[:]
		}
		return r.more
	}

	// Placed items: add their entries' increments; gone ones lose their
	// series.
	for id, it := range c.items {
		j, ok := present[id]
		if !ok || reads[j].group != it.group {
			delete(c.items, id)
			continue
		}
		es := entries(&reads[j])
		for _, e := range es {
			inc := e.c
			for _, p := range it.last {
				if p.id == e.id {
					if e.c.Packets >= p.c.Packets && e.c.Bytes >= p.c.Bytes {
						inc = sub(e.c, p.c)
					}
					break
				}
			}
			it.value = add(it.value, inc)
		}
		it.last = append(it.last[:0], es...)
		st := c.groups[it.group]
		st.sum = add(st.sum, it.value)
	}

	// What each group's remainder can give up to newly placed items.
	for _, st := range c.groups {
		st.slack = sub0(sub0(st.total, st.sum), st.rem)
	}

	// New items take the free places, largest first.
	var cands []I
	for _, id := range order {
		if c.items[id] == nil {
			cands = append(cands, id)
		}
	}
	free := len(cands)
	if c.max >= 0 {
		free = min(free, max(c.max-len(c.items), 0))
	}
	if free > 0 && free < len(cands) {
		// By bytes, equal ones in the order read, as flow.Top keeps them.
		slices.SortStableFunc(cands, func(a, b I) int { return cmpDesc(reads[present[a]].sum.Bytes, reads[present[b]].sum.Bytes) })
	}
	for _, id := range cands[:free] {
		r := &reads[present[id]]
		it := &cappedItem[G, E]{group: r.group, last: append([]entryCount[E](nil), entries(r)...)}
		st := c.groups[r.group]
		if r.sum.Packets <= st.slack.Packets && r.sum.Bytes <= st.slack.Bytes {
			it.value = r.sum
			st.slack = sub(st.slack, r.sum)
		}
		c.items[id] = it
		st.sum = add(st.sum, it.value)
	}

	for id, it := range c.items {
		item(id, it.value)
	}
	for g, st := range c.groups {
		r := sub0(st.total, st.sum)
		st.rem = flow.Counters{Packets: max(st.rem.Packets, r.Packets), Bytes: max(st.rem.Bytes, r.Bytes)}
		rem(g, st.rem)
	}
	return len(cands) - free
}

func add(a, b flow.Counters) flow.Counters {
	return flow.Counters{Packets: a.Packets + b.Packets, Bytes: a.Bytes + b.Bytes}
}

func sub(a, b flow.Counters) flow.Counters {
	return flow.Counters{Packets: a.Packets - b.Packets, Bytes: a.Bytes - b.Bytes}
}

// sub0 is a-b per component, 0 where b is larger.
func sub0(a, b flow.Counters) flow.Counters {
	var out flow.Counters
	if a.Packets > b.Packets {
		out.Packets = a.Packets - b.Packets
	}
	if a.Bytes > b.Bytes {
		out.Bytes = a.Bytes - b.Bytes
	}
	return out
}

func cmpDesc(a, b uint64) int {
	switch {
	case a > b:
		return -1
	case a < b:
		return 1
	}
	return 0
}
