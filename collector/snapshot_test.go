package collector_test

import (
	"maps"
	"testing"

	"github.com/nsflow/nsflow/collector"
	"github.com/nsflow/nsflow/collector/flow"
	"github.com/nsflow/nsflow/test/testenv"
)

// AttachStates counts what counting Interfaces does (the exporter's
// nsflow_attachments reads it instead): 64 interfaces attached and 6
// refused in a namespace of 70 (the default cap), lo attached in another,
// and none of a removed namespace.
func TestAttachStates(t *testing.T) {
	testenv.RequireRoot(t)
	many, one, gone := newAnonNetns(t), newAnonNetns(t), newAnonNetns(t)
	many.addDummies(t, 69)
	gone.addDummies(t, 2)
	c, err := collector.New(collector.Config{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	var goneIno uint64
	for i, n := range []*anonNetns{many, one, gone} {
		ino, err := c.Add(collector.Target{Name: []string{"many", "one", "gone"}[i], Path: n.Path, Class: collector.ClassProcess})
		if err != nil {
			t.Fatal(err)
		}
		goneIno = ino
	}
	c.Remove(goneIno)
	counted := func() map[flow.AttachState]int {
		out := map[flow.AttachState]int{}
		for _, ns := range c.Interfaces() {
			if ns.Gone {
				continue
			}
			for _, i := range ns.Interfaces {
				out[i.State]++
			}
		}
		return out
	}
	want := map[flow.AttachState]int{flow.StateAttached: collector.DefaultMaxInterfaces + 1, flow.StateRefused: 70 - collector.DefaultMaxInterfaces}
	if got := counted(); !maps.Equal(got, want) {
		t.Fatalf("Interfaces counts %v, want %v", got, want)
	}
	if got := c.AttachStates(); !maps.Equal(got, want) {
		t.Errorf("AttachStates() = %v, want %v (what Interfaces counts)", got, want)
	}
}
