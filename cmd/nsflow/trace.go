package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"sync"
	"time"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"
	"golang.org/x/term"

	"github.com/nsflow/nsflow/collector"
	"github.com/nsflow/nsflow/collector/attach"
	"github.com/nsflow/nsflow/collector/filter"
	"github.com/nsflow/nsflow/collector/flow"
	"github.com/nsflow/nsflow/collector/session"
	"github.com/nsflow/nsflow/exporter/report"
)

// traceFlags are trace's command line; top registers a subset of them.
type traceFlags struct {
	sel      selectFlags
	filter   filterFlags
	attach   attachFlags
	cri      criFlags
	duration time.Duration
	interval time.Duration
	output   string
	top      int
	sort     string
	events   bool
	verbose  bool
	// aggregate and containers: what flows are summed by, and whether
	// they carry their containers (attribution).
	aggregate  string
	containers bool
}

// registerAttribution adds --aggregate-by and --containers (trace, top).
func (f *traceFlags) registerAttribution(fl *pflag.FlagSet) {
	fl.StringVar(&f.aggregate, "aggregate-by", string(report.ByFlow), "show flows (flow), or sum them per observation point by source and destination container, by pod, or by netns (docs/OUTPUT.md)")
	fl.BoolVar(&f.containers, "containers", true, "name each flow's source and destination container (the sending and the receiving socket's cgroup, named by the container runtime or the cgroup path); false leaves the flow path as it is without attribution (--aggregate-by container or pod needs it)")
}

func newTraceCmd() *cobra.Command {
	var f traceFlags
	var tc *traceConfig
	cmd := &cobra.Command{
		Use:   "trace [--netns NS... | --all] [FILTER]",
		Short: "Count the traffic of namespaces for a while, then print it",
		Long: `trace attaches to every interface (lo included) of the selected network
namespaces, counts until --duration has passed or it is interrupted
(Ctrl-C, SIGTERM), prints per-interface totals and rates and the top flows,
and detaches everything.

Namespaces: --netns takes an ip netns name, a glob pattern of names
('web-*', 'web-[ab]': path.Match syntax; namespaces that appear during the
trace are followed too), pid:PID, a path to a namespace file
(/run/netns/NAME, /proc/PID/ns/net), or "host". Without --netns (or with
--all) every namespace on the node is observed.

FILTER selects flows with a subset of the pcap-filter (tcpdump) language:
tcp, udp, icmp, icmp6, sctp, ip, ip6, proto N, [src|dst] host ADDR,
[src|dst] net CIDR, [src|dst] port N, [src|dst] portrange A-B, rx, tx,
combined with and/&&, or/||, not/! and parentheses. The per-interface totals
are never filtered.

Each flow names its source and destination container (columns SRC
CONTAINER and DST CONTAINER when any flow has one; JSON src_container,
dst_container; --containers=false turns this off). --aggregate-by container
sums the flows per observation point by source and destination container
(pod: by pod; netns: per observation point); flows received on lo are left
out there, as each was counted when sent on lo.`,
		Example: `  nsflow trace --duration 10s
  nsflow trace --netns web --netns db --duration 10s
  nsflow trace --netns 'web-*' tcp port 8080
  nsflow trace --interval 1s --top 5 'udp or icmp'
  nsflow trace --exclude host --exclude 'cni-test-*'
  nsflow trace --netns pid:4242 --output json
  nsflow trace --netns web --events --output jsonl 'not port 53'
  nsflow trace --netns web --aggregate-by container --duration 30s`,
		PreRunE: func(_ *cobra.Command, args []string) (err error) {
			tc, err = f.validate(args)
			return err
		},
		RunE: func(cmd *cobra.Command, _ []string) error { return runTrace(cmd.Context(), tc) },
	}
	fl := cmd.Flags()
	f.sel.register(fl)
	f.filter.register(fl)
	f.attach.register(fl)
	f.cri.register(fl, false)
	fl.DurationVarP(&f.duration, "duration", "d", 0, "how long to trace (0: until Ctrl-C or SIGTERM)")
	fl.DurationVarP(&f.interval, "interval", "i", 0, "also print the traffic of every interval of this length")
	fl.StringVarP(&f.output, "output", "o", "table", "output format: table, json (one document at the end) or jsonl (one object per interval, event and the summary)")
	fl.IntVar(&f.top, "top", -1, "flows to print, largest first (0: all; default 20 in tables, all in JSON)")
	fl.StringVar(&f.sort, "sort", "bytes", "order flows by bytes or packets")
	fl.BoolVarP(&f.events, "events", "e", false, "print every new flow as it starts")
	fl.BoolVarP(&f.verbose, "verbose", "v", false, "log attach events to stderr")
	f.registerAttribution(fl)
	return cmd
}

// traceConfig is a validated trace (or top) command line.
type traceConfig struct {
	sel         selection
	mode        attach.Mode
	flowEntries uint32
	maxPoints   uint32
	maxIfaces   int
	criEndpoint string
	filter      *filter.Filter
	sort        flow.SortKey
	top         int
	duration    time.Duration
	interval    time.Duration
	output      string
	events      bool
	verbose     bool
	aggregate   report.AggregateBy
	attribution bool // flows carry their containers
}

// validate checks the command line; args are the trailing filter words.
func (f *traceFlags) validate(args []string) (*traceConfig, error) {
	tc := &traceConfig{duration: f.duration, interval: f.interval, output: f.output, events: f.events, verbose: f.verbose}
	var err error
	if tc.filter, err = f.filter.validate(args); err != nil {
		return nil, err
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
	if tc.mode, err = f.attach.validate(); err != nil {
		return nil, err
	}
	tc.flowEntries, tc.maxPoints, tc.maxIfaces = f.attach.flowEntries, f.attach.maxPoints, f.attach.maxIfaces
	if err := f.cri.validate(); err != nil {
		return nil, err
	}
	if tc.sel, err = f.sel.validate(); err != nil {
		return nil, err
	}
	tc.criEndpoint = f.cri.endpoint
	if f.aggregate == "" {
		f.aggregate = string(report.ByFlow)
	}
	if tc.aggregate, err = report.ParseAggregateBy(f.aggregate); err != nil {
		return nil, usagef("--aggregate-by %v", err)
	}
	if tc.aggregate.Attributed() && !f.containers {
		return nil, usagef("--aggregate-by %s needs --containers", tc.aggregate)
	}
	tc.attribution = f.containers
	return tc, nil
}

// openSession attaches to the selection; with patterns or --all it returns
// once discovery's first scan has attached everything present.
func openSession(ctx context.Context, tc *traceConfig, log *slog.Logger) (*session.Session, error) {
	criLog := slog.New(slog.DiscardHandler) // a trace stays quiet about an absent runtime
	if tc.verbose {
		criLog = log
	}
	endpoint := (&criFlags{endpoint: tc.criEndpoint}).resolve()
	return session.Open(ctx, session.Config{
		Collector: collector.Config{Mode: tc.mode, FlowEntries: tc.flowEntries, MaxPoints: tc.maxPoints, MaxInterfaces: tc.maxIfaces, Logger: log, Events: tc.events, HostVeths: tc.sel.hostVeths,
			Attribution: tc.attribution, SocketLookup: tc.attribution},
		Targets:     tc.sel.targets,
		Discovery:   tc.sel.discovery,
		WaitReady:   true,
		CRIEndpoint: endpoint,
		CRIInterval: 5 * time.Second,
		CRILogger:   criLog,
		Logger:      log,
	})
}

// jsonlRecord wraps each JSON Lines object with its type.
type jsonlRecord struct {
	Type string `json:"type"` // interval, flow_start, summary
	*report.Trace
	*flow.Event
}

func runTrace(ctx context.Context, tc *traceConfig) (err error) {
	level := slog.LevelWarn
	if tc.verbose {
		level = slog.LevelDebug
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))

	sess, err := openSession(ctx, tc, log)
	if err != nil {
		return err
	}
	c := sess.Collector()
	// Everything attached is detached on every way out, signals included.
	defer func() { err = errors.Join(err, sess.Close()) }()
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var wg sync.WaitGroup
	defer wg.Wait()
	start := time.Now()

	out := &syncWriter{w: os.Stdout}
	opts := report.Options{AttachMode: string(c.Mode()), Filter: tc.filter, FilterText: tc.filter.String(), Sort: tc.sort, Top: tc.top, AggregateBy: tc.aggregate}
	writeRecord := func(typ string, tr *report.Trace, ev *flow.Event) error {
		b, err := json.Marshal(jsonlRecord{Type: typ, Trace: tr, Event: ev})
		if err != nil {
			return err
		}
		_, err = out.Write(append(b, '\n'))
		return err
	}

	if tc.events {
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
			streamEvents(rd, tc.filter, tc.output, out, writeRecord)
		}()
	}

	wait := ctx
	if tc.duration > 0 {
		var cancelWait context.CancelFunc
		wait, cancelWait = context.WithTimeout(ctx, tc.duration)
		defer cancelWait()
	}
	var tick <-chan time.Time
	if tc.interval > 0 {
		t := time.NewTicker(tc.interval)
		defer t.Stop()
		tick = t.C
	}
	status := newStatus(tc.interval == 0 && !tc.events && tc.output == "table")
	defer status.clear()
	statusTick := time.NewTicker(time.Second)
	defer statusTick.Stop()

	prev := &flow.Snapshot{Time: start}
loop:
	for {
		select {
		case <-wait.Done():
			break loop
		case err := <-sess.Done():
			if err != nil {
				return fmt.Errorf("discovery: %w", err)
			}
		case <-statusTick.C:
			// With attribution, a snapshot every second also names the
			// flows' cgroups while they exist (the resolver caches names;
			// a container that exits before the trace ends is gone then).
			if status.enabled || tc.attribution {
				if snap, err := c.Snapshot(); err == nil && status.enabled {
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
			if tc.output == "jsonl" {
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
	switch tc.output {
	case "json":
		return tr.WriteJSON(out)
	case "jsonl":
		return writeRecord("summary", tr, nil)
	}
	if tc.interval > 0 || tc.events {
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
		fmt.Fprintf(out, "%s  NEW  %s %s %s  %s  %s > %s\n", ev.Time.Format("15:04:05.000000"), flow.SafeName(ev.Netns), flow.SafeName(ev.Interface),
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
