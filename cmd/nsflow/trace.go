package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path"
	"regexp"
	"strings"
	"sync"
	"time"

	"github.com/spf13/cobra"
	"golang.org/x/term"

	"github.com/nsflow/nsflow/collector"
	"github.com/nsflow/nsflow/collector/attach"
	"github.com/nsflow/nsflow/collector/cri"
	"github.com/nsflow/nsflow/collector/discovery"
	"github.com/nsflow/nsflow/collector/filter"
	"github.com/nsflow/nsflow/collector/flow"
	"github.com/nsflow/nsflow/exporter/report"
)

type traceFlags struct {
	netns       []string
	exclude     []string
	all         bool
	duration    time.Duration
	interval    time.Duration
	output      string
	top         int
	sort        string
	filter      string
	events      bool
	attachMode  string
	flowEntries uint32
	verbose     bool
	criEndpoint string
}

func newTraceCmd() *cobra.Command {
	var f traceFlags
	cmd := &cobra.Command{
		Use:   "trace (--netns NS... | --all) [FILTER]",
		Short: "Count the traffic of namespaces for a while, then print it",
		Long: `trace attaches to every interface (lo included) of the selected network
namespaces, counts until --duration has passed or it is interrupted
(Ctrl-C, SIGTERM), prints per-interface totals and rates and the top flows,
and detaches everything.

Namespaces: --netns takes an ip netns name, a glob pattern of names
('web-*': namespaces that appear during the trace are followed too),
pid:PID, a path to a namespace file (/run/netns/NAME, /proc/PID/ns/net), or
"host". --all observes every namespace on the node.

FILTER selects flows with a subset of the pcap-filter (tcpdump) language:
tcp, udp, icmp, icmp6, sctp, ip, ip6, proto N, [src|dst] host ADDR,
[src|dst] net CIDR, [src|dst] port N, [src|dst] portrange A-B, rx, tx,
combined with and/&&, or/||, not/! and parentheses. The per-interface totals
are never filtered.`,
		Example: `  nsflow trace --netns web --netns db --duration 10s
  nsflow trace --netns 'web-*' tcp port 8080
  nsflow trace --all --interval 1s --top 5 'udp or icmp'
  nsflow trace --all --exclude host --exclude 'cni-test-*'
  nsflow trace --netns pid:4242 --output json
  nsflow trace --netns web --events --output jsonl 'not port 53'`,
		RunE: func(cmd *cobra.Command, args []string) error {
			if len(args) > 0 {
				if f.filter != "" {
					return usagef("give the filter either as arguments or with --filter, not both")
				}
				f.filter = strings.Join(args, " ")
			}
			return runTrace(cmd.Context(), f)
		},
	}
	fl := cmd.Flags()
	fl.StringArrayVarP(&f.netns, "netns", "n", nil, "namespace to observe: NAME, glob pattern, pid:PID, /path or host (repeatable)")
	fl.BoolVarP(&f.all, "all", "A", false, "observe every namespace on the node, including ones that appear during the trace")
	fl.StringArrayVarP(&f.exclude, "exclude", "x", nil, "with --all or patterns: skip namespaces whose name matches this glob pattern (repeatable)")
	fl.DurationVarP(&f.duration, "duration", "d", 0, "how long to trace (0: until Ctrl-C or SIGTERM)")
	fl.DurationVarP(&f.interval, "interval", "i", 0, "also print the traffic of every interval of this length")
	fl.StringVarP(&f.output, "output", "o", "table", "output format: table, json (one document at the end) or jsonl (one object per interval, event and the summary)")
	fl.IntVar(&f.top, "top", -1, "flows to print, largest first (0: all; default 20 in tables, all in JSON)")
	fl.StringVar(&f.sort, "sort", "bytes", "order flows by bytes or packets")
	fl.StringVarP(&f.filter, "filter", "f", "", "flow filter (pcap-filter subset; also accepted as trailing arguments)")
	fl.BoolVarP(&f.events, "events", "e", false, "print every new flow as it starts")
	fl.StringVar(&f.attachMode, "attach-mode", string(attach.ModeAuto), "how to attach: auto, tcx or clsact")
	fl.Uint32Var(&f.flowEntries, "flow-entries", 65536, "capacity of the flow map (flows beyond it are evicted, totals stay exact)")
	fl.BoolVarP(&f.verbose, "verbose", "v", false, "log attach events to stderr")
	fl.StringVar(&f.criEndpoint, "cri.endpoint", "auto", "container runtime CRI socket for pod names (auto, none or unix:///path)")
	return cmd
}

// traceConfig is a validated trace command line.
type traceConfig struct {
	targets   []collector.Target
	patterns  []string
	mode      attach.Mode
	filter    *filter.Filter
	sort      flow.SortKey
	top       int
	discovery *discovery.Config
}

func (f *traceFlags) validate() (*traceConfig, error) {
	tc := &traceConfig{}
	if len(f.netns) == 0 && !f.all {
		return nil, usagef("no namespace selected: give --netns NAME (see `ip netns list`), a pattern, pid:PID, a path, or --all")
	}
	if f.duration < 0 || f.interval < 0 {
		return nil, usagef("--duration and --interval must not be negative")
	}
	switch f.output {
	case "table", "jsonl":
	case "json":
		if f.interval > 0 || f.events {
			return nil, usagef("--output json prints one document at the end; use --output jsonl with --interval or --events")
		}
	default:
		return nil, usagef("--output must be table, json or jsonl, got %q", f.output)
	}
	if f.top < -1 {
		return nil, usagef("--top must be 0 (all) or more, got %d", f.top)
	}
	tc.top = f.top
	if tc.top == -1 {
		tc.top = 20
		if f.output != "table" {
			tc.top = 0
		}
	}
	switch flow.SortKey(f.sort) {
	case flow.SortBytes, flow.SortPackets:
		tc.sort = flow.SortKey(f.sort)
	default:
		return nil, usagef("--sort must be bytes or packets, got %q", f.sort)
	}
	if f.flowEntries == 0 {
		return nil, usagef("--flow-entries must be at least 1")
	}
	if f.criEndpoint != "" && f.criEndpoint != "auto" && f.criEndpoint != "none" && !strings.HasPrefix(f.criEndpoint, "unix://") {
		return nil, usagef("--cri.endpoint must be auto, none or unix:///path, got %q", f.criEndpoint)
	}
	var err error
	if tc.mode, err = attach.ParseMode(f.attachMode); err != nil {
		return nil, usagef("--attach-mode: %v", err)
	}
	if tc.filter, err = filter.Parse(f.filter); err != nil {
		return nil, usageError{err}
	}
	for _, sel := range f.netns {
		if strings.ContainsAny(sel, "*?[") && !strings.HasPrefix(sel, "/") {
			if _, err := path.Match(sel, ""); err != nil {
				return nil, usagef("--netns %s: bad pattern: %v", sel, err)
			}
			tc.patterns = append(tc.patterns, sel)
			continue
		}
		t, err := collector.ParseTarget(sel)
		if err != nil {
			return nil, usageError{fmt.Errorf("--netns %s: %w", sel, err)}
		}
		tc.targets = append(tc.targets, t)
	}
	for _, x := range f.exclude {
		if _, err := path.Match(x, ""); err != nil {
			return nil, usagef("--exclude %s: bad pattern: %v", x, err)
		}
	}
	if len(f.exclude) > 0 && !f.all && len(tc.patterns) == 0 {
		return nil, usagef("--exclude applies to --all and --netns patterns")
	}
	if f.all || len(tc.patterns) > 0 {
		dc := &discovery.Config{Host: f.all, Proc: true}
		if !f.all {
			dc.Include = globsRegexp(tc.patterns)
		}
		if len(f.exclude) > 0 {
			dc.Exclude = globsRegexp(f.exclude)
		}
		tc.discovery = dc
	}
	return tc, nil
}

// globsRegexp turns shell patterns on names into one anchored expression.
func globsRegexp(globs []string) *regexp.Regexp {
	var alts []string
	for _, g := range globs {
		var b strings.Builder
		for _, r := range g {
			switch r {
			case '*':
				b.WriteString(".*")
			case '?':
				b.WriteString(".")
			default:
				b.WriteString(regexp.QuoteMeta(string(r)))
			}
		}
		alts = append(alts, b.String())
	}
	return regexp.MustCompile("^(" + strings.Join(alts, "|") + ")$")
}

// jsonlRecord wraps each JSON Lines object with its type.
type jsonlRecord struct {
	Type string `json:"type"` // interval, flow_start, summary
	*report.Trace
	*flow.Event
}

func runTrace(ctx context.Context, f traceFlags) (err error) {
	tc, err := f.validate()
	if err != nil {
		return err
	}
	level := slog.LevelWarn
	if f.verbose {
		level = slog.LevelDebug
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))

	sess, err := openSession(ctx, tc, f, log)
	if err != nil {
		return err
	}
	c := sess.c
	// Everything attached is detached on every way out, signals included.
	defer func() { err = errors.Join(err, sess.Close()) }()
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var wg sync.WaitGroup
	defer wg.Wait()
	start := time.Now()

	out := &syncWriter{w: os.Stdout}
	opts := report.Options{AttachMode: string(c.Mode()), Filter: tc.filter, FilterText: tc.filter.String(), Sort: tc.sort, Top: tc.top}
	writeRecord := func(typ string, tr *report.Trace, ev *flow.Event) error {
		b, err := json.Marshal(jsonlRecord{Type: typ, Trace: tr, Event: ev})
		if err != nil {
			return err
		}
		_, err = out.Write(append(b, '\n'))
		return err
	}

	if f.events {
		rd, err := c.FlowEvents()
		if err != nil {
			return err
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-ctx.Done()
			rd.Close()
		}()
		wg.Add(1)
		go func() {
			defer wg.Done()
			streamEvents(rd, tc.filter, f.output, out, writeRecord)
		}()
	}

	wait := ctx
	if f.duration > 0 {
		var cancelWait context.CancelFunc
		wait, cancelWait = context.WithTimeout(ctx, f.duration)
		defer cancelWait()
	}
	var tick <-chan time.Time
	if f.interval > 0 {
		t := time.NewTicker(f.interval)
		defer t.Stop()
		tick = t.C
	}
	status := newStatus(f.interval == 0 && !f.events && f.output == "table")
	defer status.clear()
	statusTick := time.NewTicker(time.Second)
	defer statusTick.Stop()

	prev := &flow.Snapshot{Time: start}
loop:
	for {
		select {
		case <-wait.Done():
			break loop
		case <-statusTick.C:
			if status.enabled {
				if snap, err := c.Snapshot(); err == nil {
					status.show(snap, time.Since(start))
				}
			}
		case <-tick:
			snap, err := c.Snapshot()
			if err != nil {
				return err
			}
			tr := report.NewTrace(report.Delta(prev, snap), prev.Time, opts)
			prev = snap
			if f.output == "jsonl" {
				err = writeRecord("interval", tr, nil)
			} else {
				err = out.writeTable(tr)
			}
			if err != nil {
				return err
			}
		}
	}
	status.clear()

	snap, err := c.Snapshot()
	if err != nil {
		return err
	}
	tr := report.NewTrace(snap, start, opts)
	cancel() // stop the event stream before the summary
	wg.Wait()
	if err := sess.Close(); err != nil {
		return fmt.Errorf("detach: %w", err)
	}
	switch f.output {
	case "json":
		return tr.WriteJSON(out)
	case "jsonl":
		return writeRecord("summary", tr, nil)
	}
	if f.interval > 0 || f.events {
		fmt.Fprintln(out, "\n=== SUMMARY")
	}
	return out.writeTable(tr)
}

// streamEvents prints new flows as they start until the reader is closed.
func streamEvents(rd *collector.EventReader, flt *filter.Filter, output string, out *syncWriter,
	writeRecord func(string, *report.Trace, *flow.Event) error) {
	for {
		ev, err := rd.Read()
		if err != nil {
			return // closed
		}
		fl := ev.Flow()
		if !flt.Match(&fl) {
			continue
		}
		if output == "jsonl" {
			writeRecord("flow_start", nil, &ev)
			continue
		}
		fmt.Fprintf(out, "%s  NEW  %s %s %s  %s  %s > %s\n", ev.Time.Format("15:04:05.000000"), ev.Netns, ev.Interface,
			ev.Direction, ev.Protocol, report.Endpoint(ev.Src, ev.SrcPort, ev.Protocol.String()),
			report.Endpoint(ev.Dst, ev.DstPort, ev.Protocol.String()))
	}
}

// syncWriter serializes writes from the event stream and the main loop.
type syncWriter struct {
	mu sync.Mutex
	w  io.Writer
}

func (s *syncWriter) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.w.Write(p)
}

func (s *syncWriter) writeTable(tr *report.Trace) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := tr.WriteTable(s.w); err != nil {
		return err
	}
	_, err := fmt.Fprintln(s.w)
	return err
}

// status is a one-line progress display on stderr, only on a terminal.
type status struct{ enabled bool }

func newStatus(want bool) *status {
	return &status{enabled: want && term.IsTerminal(int(os.Stderr.Fd()))}
}

func (s *status) show(snap *flow.Snapshot, elapsed time.Duration) {
	var nss, ifs int
	var pk, by uint64
	for _, ns := range snap.Namespaces {
		nss++
		for _, i := range ns.Interfaces {
			ifs++
			pk += i.RX.Packets + i.TX.Packets
			by += i.RX.Bytes + i.TX.Bytes
		}
	}
	fmt.Fprintf(os.Stderr, "\r\033[Ktracing %d namespaces, %d interfaces: %s, %d packets, %s, %d flows (Ctrl-C to stop)",
		nss, ifs, elapsed.Truncate(time.Second), pk, report.Bytes(by), len(snap.Flows))
}

func (s *status) clear() {
	if s.enabled {
		fmt.Fprint(os.Stderr, "\r\033[K")
	}
}

// session is a collector observing a selection of namespaces; with
// patterns or --all, discovery keeps following them.
type session struct {
	c      *collector.Collector
	cancel context.CancelFunc
	wg     sync.WaitGroup
	once   sync.Once
	err    error
}

func openSession(ctx context.Context, tc *traceConfig, f traceFlags, log *slog.Logger) (*session, error) {
	c, err := collector.New(collector.Config{Mode: tc.mode, FlowEntries: f.flowEntries, Logger: log, Events: f.events})
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithCancel(ctx)
	s := &session{c: c, cancel: cancel}
	for _, t := range tc.targets {
		if _, err := c.Add(t); err != nil {
			return nil, errors.Join(err, s.Close())
		}
	}
	endpoint := f.criEndpoint
	if endpoint == "auto" || endpoint == "" {
		endpoint = cri.Detect()
	}
	if endpoint != "" && endpoint != "none" {
		elog := slog.New(slog.DiscardHandler) // a trace stays quiet about an absent runtime
		if f.verbose {
			elog = log
		}
		e := cri.New(c, cri.Config{Endpoint: endpoint, Interval: 5 * time.Second, Logger: elog})
		c.OnAdd(e.Kick)
		s.wg.Add(1)
		go func() { defer s.wg.Done(); e.Run(ctx) }()
	}
	if tc.discovery != nil {
		tc.discovery.Logger = log
		d, err := discovery.New(c, *tc.discovery)
		if err != nil {
			return nil, errors.Join(err, s.Close())
		}
		s.wg.Add(1)
		go func() { defer s.wg.Done(); d.Run(ctx) }()
		select {
		case <-d.Ready():
		case <-ctx.Done():
		}
	}
	return s, nil
}

// Close stops discovery and detaches everything; it may be called twice.
func (s *session) Close() error {
	s.once.Do(func() {
		s.cancel()
		s.wg.Wait()
		s.err = s.c.Close()
	})
	return s.err
}
