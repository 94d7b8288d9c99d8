package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"time"

	"github.com/spf13/cobra"

	"github.com/nsflow/nsflow/collector"
	"github.com/nsflow/nsflow/exporter/report"
)

type traceFlags struct {
	netns       []string
	duration    time.Duration
	output      string
	top         int
	attachMode  string
	flowEntries uint32
	verbose     bool
}

func newTraceCmd() *cobra.Command {
	var f traceFlags
	cmd := &cobra.Command{
		Use:   "trace --netns NS [--netns NS...] [--duration D]",
		Short: "Count the traffic of namespaces for a while, then print it",
		Long: `trace attaches to every interface (lo included) of the selected network
namespaces, counts until --duration has passed or it is interrupted
(Ctrl-C, SIGTERM), prints per-interface totals and the top flows, and detaches.

A namespace is selected by its ip netns name, by pid:PID, by a path to a
namespace file (/run/netns/NAME, /proc/PID/ns/net), or as "host".`,
		Example: `  nsflow trace --netns web --netns db --duration 10s
  nsflow trace --netns pid:4242 --output json
  nsflow trace --netns /proc/self/ns/net --duration 5s --top 5`,
		Args: checkArgs(cobra.NoArgs),
		RunE: func(cmd *cobra.Command, _ []string) error {
			return runTrace(cmd.Context(), f)
		},
	}
	fl := cmd.Flags()
	fl.StringArrayVarP(&f.netns, "netns", "n", nil, "namespace to observe: NAME, pid:PID, /path or host (repeatable)")
	fl.DurationVarP(&f.duration, "duration", "d", 0, "how long to trace (0: until Ctrl-C or SIGTERM)")
	fl.StringVarP(&f.output, "output", "o", "table", "output format: table or json")
	fl.IntVar(&f.top, "top", -1, "flows to print, largest first (0: all; default 20 in tables, all in JSON)")
	fl.StringVar(&f.attachMode, "attach-mode", string(collector.ModeAuto), "how to attach: auto, tcx or clsact")
	fl.Uint32Var(&f.flowEntries, "flow-entries", 65536, "capacity of the flow map (flows beyond it are evicted, totals stay exact)")
	fl.BoolVarP(&f.verbose, "verbose", "v", false, "log attach events to stderr")
	return cmd
}

func (f *traceFlags) validate() ([]collector.Target, collector.Mode, error) {
	if len(f.netns) == 0 {
		return nil, "", usagef("no namespace selected: give --netns NAME (see `ip netns list`), pid:PID or a path")
	}
	if f.duration < 0 {
		return nil, "", usagef("--duration must not be negative, got %s", f.duration)
	}
	if f.output != "table" && f.output != "json" {
		return nil, "", usagef("--output must be table or json, got %q", f.output)
	}
	if f.top < -1 {
		return nil, "", usagef("--top must be 0 (all) or more, got %d", f.top)
	}
	if f.flowEntries == 0 {
		return nil, "", usagef("--flow-entries must be at least 1")
	}
	mode, err := collector.ParseMode(f.attachMode)
	if err != nil {
		return nil, "", usagef("--attach-mode: %v", err)
	}
	var targets []collector.Target
	for _, sel := range f.netns {
		t, err := collector.ParseTarget(sel)
		if err != nil {
			return nil, "", usageError{fmt.Errorf("--netns %s: %w", sel, err)}
		}
		targets = append(targets, t)
	}
	return targets, mode, nil
}

func runTrace(ctx context.Context, f traceFlags) (err error) {
	targets, mode, err := f.validate()
	if err != nil {
		return err
	}
	level := slog.LevelWarn
	if f.verbose {
		level = slog.LevelDebug
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))

	c, err := collector.New(collector.Config{Mode: mode, FlowEntries: f.flowEntries, Logger: log})
	if err != nil {
		return fmt.Errorf("%w (nsflow needs root or CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN, CAP_PERFMON and kernel 6.3+)", err)
	}
	// Everything attached is detached on every way out, signals included.
	defer func() { err = errors.Join(err, c.Close()) }()
	for _, t := range targets {
		if _, err := c.Add(t); err != nil {
			return err
		}
	}
	start := time.Now()

	wait := ctx
	if f.duration > 0 {
		var cancel context.CancelFunc
		wait, cancel = context.WithTimeout(ctx, f.duration)
		defer cancel()
	}
	<-wait.Done()

	snap, err := c.Snapshot()
	if err != nil {
		return err
	}
	top := f.top
	if top == -1 {
		top = 20
		if f.output == "json" {
			top = 0
		}
	}
	tr := report.NewTrace(snap, start, string(c.Mode()), top)
	if err := c.Close(); err != nil {
		return fmt.Errorf("detach: %w", err)
	}
	if f.output == "json" {
		return tr.WriteJSON(os.Stdout)
	}
	return tr.WriteTable(os.Stdout)
}
