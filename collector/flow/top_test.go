package flow

import (
	"math/rand/v2"
	"reflect"
	"sort"
	"testing"
)

// Top keeps what a stable sort by bytes, largest first, cut at n keeps.
func TestTop(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	for _, m := range []int{0, 1, 5, 100, 3000} {
		for _, n := range []int{-1, 0, 1, 7, 100, 5000} {
			flows := make([]Flow, m)
			for i := range flows {
				flows[i].Bytes = uint64(r.IntN(50)) // many ties
				flows[i].SrcPort = uint16(i)
			}
			top := NewTop(n)
			for i := range flows {
				top.Offer(&flows[i])
			}
			want := append([]Flow(nil), flows...)
			sort.SliceStable(want, func(a, b int) bool { return want[a].Bytes > want[b].Bytes })
			if n >= 0 && len(want) > n {
				want = want[:n]
			}
			got := top.Flows()
			if top.Offered() != m || len(got) != len(want) || (len(want) > 0 && !reflect.DeepEqual(got, want)) {
				t.Errorf("%d flows, top %d: got %d flows (offered %d), want %d; first difference at %d", m, n, len(got), top.Offered(), len(want), firstDiff(got, want))
			}
		}
	}
}

func firstDiff(a, b []Flow) int {
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			return i
		}
	}
	return min(len(a), len(b))
}

// Choosing 1,000 of 65,536 flows allocates for 1,000.
func BenchmarkTop(b *testing.B) {
	flows := make([]Flow, 65536)
	for i := range flows {
		flows[i].Bytes = uint64(i * 7919 % 65536)
	}
	b.ReportAllocs()
	for b.Loop() {
		top := NewTop(1000)
		for i := range flows {
			top.Offer(&flows[i])
		}
		_ = top.Flows()
	}
}
