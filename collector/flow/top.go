package flow

// Top keeps the n largest flows by bytes of those offered to it, in a
// bounded heap: choosing n of m flows holds n flows, not m. Of flows with
// equal bytes, the one offered first is kept. A negative n keeps them all.
// The exporter's --flows.max-series reads the flow map through it.
type Top struct {
	n       int
	offered int
	h       topHeap
}

// NewTop returns a Top of n flows.
func NewTop(n int) *Top {
	t := &Top{n: n}
	if n > 0 {
		t.h = make(topHeap, 0, min(n, 4096))
	}
	return t
}

// Offer considers f; it is copied if kept.
func (t *Top) Offer(f *Flow) {
	seq := t.offered
	t.offered++
	switch {
	case t.n < 0 || len(t.h) < t.n:
		t.h = append(t.h, topEntry{*f, seq})
		t.h.up(len(t.h) - 1)
	case t.n == 0:
	case f.Bytes > t.h[0].f.Bytes: // the smallest kept, offered last of its size
		t.h[0] = topEntry{*f, seq}
		t.h.down(0)
	}
}

// Offered returns how many flows were offered.
func (t *Top) Offered() int { return t.offered }

// Flows returns the kept flows, largest first (equal bytes: in the order
// offered). The Top is empty afterwards.
func (t *Top) Flows() []Flow {
	out := make([]Flow, len(t.h))
	for i := len(out) - 1; i >= 0; i-- {
		out[i] = t.h[0].f
		last := len(t.h) - 1
		t.h[0] = t.h[last]
		t.h = t.h[:last]
		t.h.down(0)
	}
	return out
}

type topEntry struct {
	f   Flow
	seq int
}

// topHeap is a min-heap: its root is the flow to drop first, the smallest,
// and of equal ones the last offered.
type topHeap []topEntry

func (h topHeap) less(a, b int) bool {
	if h[a].f.Bytes != h[b].f.Bytes {
		return h[a].f.Bytes < h[b].f.Bytes
	}
	return h[a].seq > h[b].seq
}

func (h topHeap) up(i int) {
	for i > 0 {
		p := (i - 1) / 2
		if !h.less(i, p) {
			return
		}
		h[i], h[p] = h[p], h[i]
		i = p
	}
}

func (h topHeap) down(i int) {
	for {
		l := 2*i + 1
		if l >= len(h) {
			return
		}
		c := l
		if r := l + 1; r < len(h) && h.less(r, l) {
			c = r
		}
		if !h.less(c, i) {
			return
		}
		h[i], h[c] = h[c], h[i]
		i = c
	}
}
