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

	"github.com/nsflow/nsflow/collector/attach"
	"github.com/nsflow/nsflow/exporter/tui"
)

func newTopCmd() *cobra.Command {
	var f traceFlags
	cmd := &cobra.Command{
		Use:   "top (--netns NS... | --all) [FILTER]",
		Short: "A live view of namespaces and flows, with their current rates",
		Long: `top attaches like trace and shows, refreshed every --interval, each
namespace's interfaces with their current rates and totals, and the flows
sorted by current rate. Keys: s cycles the sort (rate, packet rate, bytes,
packets), / edits the flow filter (pcap-filter subset, as in trace), p
pauses, q quits. When standard output is not a terminal it prints
trace-style interval tables instead.`,
		Example: `  nsflow top --all
  nsflow top --netns 'web-*' tcp
  nsflow top --netns web --interval 2s`,
		RunE: func(cmd *cobra.Command, args []string) error {
			if len(args) > 0 {
				if f.filter != "" {
					return usagef("give the filter either as arguments or with --filter, not both")
				}
				f.filter = joinArgs(args)
			}
			if f.interval == 0 {
				f.interval = time.Second
			}
			if !term.IsTerminal(int(os.Stdout.Fd())) {
				return runTrace(cmd.Context(), f)
			}
			return runTop(cmd.Context(), f)
		},
	}
	fl := cmd.Flags()
	fl.StringArrayVarP(&f.netns, "netns", "n", nil, "namespace to observe: NAME, glob pattern, pid:PID, /path or host (repeatable)")
	fl.BoolVarP(&f.all, "all", "A", false, "observe every namespace on the node")
	fl.StringArrayVarP(&f.exclude, "exclude", "x", nil, "with --all or patterns: skip namespaces whose name matches this glob pattern (repeatable)")
	fl.DurationVarP(&f.interval, "interval", "i", time.Second, "refresh interval")
	fl.StringVarP(&f.filter, "filter", "f", "", "flow filter (pcap-filter subset; also accepted as trailing arguments)")
	fl.StringVar(&f.attachMode, "attach-mode", string(attach.ModeAuto), "how to attach: auto, tcx or clsact")
	fl.Uint32Var(&f.flowEntries, "flow-entries", 65536, "capacity of the flow map")
	fl.StringVar(&f.criEndpoint, "cri.endpoint", "auto", "container runtime CRI socket for pod names (auto, none or unix:///path)")
	f.output, f.sort, f.top = "table", "bytes", -1
	return cmd
}

func runTop(ctx context.Context, f traceFlags) (err error) {
	tc, err := f.validate()
	if err != nil {
		return err
	}
	if f.interval < 100*time.Millisecond {
		return usagef("--interval must be at least 100ms")
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelError}))
	sess, err := openSession(ctx, tc, f, log)
	if err != nil {
		return err
	}
	defer func() { err = errors.Join(err, sess.Close()) }()
	m, err := tui.New(tui.Config{Snapshot: sess.c.Snapshot, Interval: f.interval, Filter: f.filter, Mode: string(sess.c.Mode())})
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
