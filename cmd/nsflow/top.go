package main

import (
	"context"
	"errors"
	"log/slog"
	"os"
	"time"

	tea "github.com/charmbracelet/bubbletea"
	"github.com/spf13/cobra"
	"golang.org/x/term"

	"github.com/nsflow/nsflow/exporter/tui"
)

func newTopCmd() *cobra.Command {
	// top shares trace's selection, filter, attach and runtime flags; its
	// output is fixed.
	f := traceFlags{output: "table", sort: "bytes", top: -1}
	var tc *traceConfig
	cmd := &cobra.Command{
		Use:   "top [--netns NS... | --all] [FILTER]",
		Short: "A live view of namespaces and flows, with their current rates",
		Long: `top attaches like trace and shows, refreshed every --interval, each
namespace's interfaces with their current rates and totals, and the flows
sorted by current rate. Without --netns (or with --all) it shows every
namespace on the node, like top shows every process. Keys: s cycles the sort
(rate, packet rate, bytes, packets), / edits the flow filter (pcap-filter
subset, as in trace), p pauses, q quits. --containers and --aggregate-by
work as in trace. When standard output is not a
terminal it prints trace-style interval tables instead.`,
		Example: `  nsflow top
  nsflow top --netns 'web-*' tcp
  nsflow top --netns web --interval 2s
  nsflow top --netns web --aggregate-by container`,
		PreRunE: func(_ *cobra.Command, args []string) (err error) {
			if tc, err = f.validate(args); err != nil {
				return err
			}
			if tc.interval < 100*time.Millisecond {
				return usagef("--interval must be at least 100ms")
			}
			return nil
		},
		RunE: func(cmd *cobra.Command, _ []string) error {
			if !term.IsTerminal(int(os.Stdout.Fd())) {
				return runTrace(cmd.Context(), tc)
			}
			return runTop(cmd.Context(), tc, f.filter.expr)
		},
	}
	fl := cmd.Flags()
	f.sel.register(fl)
	f.filter.register(fl)
	f.attach.register(fl)
	f.cri.register(fl, false)
	fl.DurationVarP(&f.interval, "interval", "i", time.Second, "refresh interval")
	f.registerAttribution(fl)
	return cmd
}

func runTop(ctx context.Context, tc *traceConfig, filterText string) (err error) {
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelError}))
	sess, err := openSession(ctx, tc, log)
	if err != nil {
		return err
	}
	defer func() { err = errors.Join(err, sess.Close()) }()
	c := sess.Collector()
	m, err := tui.New(tui.Config{Snapshot: c.Snapshot, Interval: tc.interval, Filter: filterText, Mode: string(c.Mode()), AggregateBy: tc.aggregate})
	if err != nil {
		return usageError{err}
	}
	p := tea.NewProgram(m, tea.WithAltScreen(), tea.WithContext(ctx))
	_, err = p.Run()
	if errors.Is(err, tea.ErrProgramKilled) && ctx.Err() != nil {
		return nil // SIGTERM / SIGINT: a normal way out
	}
	return err
}
