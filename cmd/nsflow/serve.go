package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"net/http/pprof"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	versioncollector "github.com/prometheus/client_golang/prometheus/collectors/version"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/prometheus/common/version"
	"github.com/prometheus/exporter-toolkit/web"
	"github.com/spf13/cobra"

	"github.com/nsflow/nsflow/collector"
	"github.com/nsflow/nsflow/collector/attach"
	"github.com/nsflow/nsflow/collector/cri"
	"github.com/nsflow/nsflow/collector/discovery"
	"github.com/nsflow/nsflow/exporter"
)

type serveFlags struct {
	listen        []string
	telemetryPath string
	webConfig     string
	host          bool
	proc          bool
	include       string
	exclude       string
	grace         time.Duration
	resync        time.Duration
	attachMode    string
	flowEntries   uint32
	flows         bool
	maxFlowSeries int
	logLevel      string
	pin           bool
	pinPath       string
	pprof         bool
	criEndpoint   string
	criInterval   time.Duration
}

func newServeCmd() *cobra.Command {
	var f serveFlags
	cmd := &cobra.Command{
		Use:   "serve",
		Short: "Run the node exporter: observe every namespace, serve /metrics",
		Long: `serve discovers every network namespace on the node (ip netns / CNI bind
mounts, process namespaces under /proc, and the host's own), attaches to every
interface of each as they come and go, and serves Prometheus metrics read from
the BPF maps at scrape time. SIGTERM or Ctrl-C detaches everything and exits.`,
		Example: `  nsflow serve
  nsflow serve --web.listen-address=:9990 --netns.exclude='^cni-test'
  nsflow serve --web.config.file=web.yml --flows --flows.max-series=500`,
		Args: checkArgs(cobra.NoArgs),
		RunE: func(cmd *cobra.Command, _ []string) error { return runServe(cmd.Context(), f) },
	}
	fl := cmd.Flags()
	fl.StringArrayVar(&f.listen, "web.listen-address", []string{":9990"}, "address to listen on for metrics (repeatable)")
	fl.StringVar(&f.telemetryPath, "web.telemetry-path", "/metrics", "path under which to expose metrics")
	fl.StringVar(&f.webConfig, "web.config.file", "", "exporter-toolkit web configuration file (TLS, basic auth)")
	fl.BoolVar(&f.host, "netns.host", true, "observe the host's own network namespace (netns=\"host\")")
	fl.BoolVar(&f.proc, "netns.proc", true, "observe namespaces of processes under /proc (containers without a bind mount)")
	fl.StringVar(&f.include, "netns.include", "", "observe only namespaces whose name matches this regular expression")
	fl.StringVar(&f.exclude, "netns.exclude", "", "skip namespaces whose name matches this regular expression")
	fl.DurationVar(&f.grace, "netns.grace-period", 5*time.Minute, "keep the series of a deleted namespace this long, so its last increments are scraped")
	fl.DurationVar(&f.resync, "netns.resync-interval", 30*time.Second, "safety-net full rescan interval (discovery is event driven)")
	fl.StringVar(&f.attachMode, "attach-mode", string(attach.ModeAuto), "how to attach: auto, tcx or clsact")
	fl.Uint32Var(&f.flowEntries, "flow-entries", 65536, "capacity of the flow map")
	fl.BoolVar(&f.flows, "flows", false, "export per-flow series (nsflow_flow_*_total)")
	fl.IntVar(&f.maxFlowSeries, "flows.max-series", 1000, "at most this many flows per scrape, largest first")
	fl.StringVar(&f.logLevel, "log.level", "info", "log level: debug, info, warn or error")
	fl.StringVar(&f.criEndpoint, "cri.endpoint", "auto", "container runtime CRI socket (unix:///path) for pod names; auto: containerd's or CRI-O's if present; none: off")
	fl.DurationVar(&f.criInterval, "cri.interval", 10*time.Second, "resync period of pod identities (new namespaces trigger one at once)")
	fl.BoolVar(&f.pprof, "web.enable-pprof", false, "serve Go profiling endpoints under /debug/pprof/ (off by default: they expose internals)")
	fl.BoolVar(&f.pin, "pin", false, "pin maps and links on the bpffs: counting goes on while nsflow restarts or upgrades, and the next serve adopts them")
	fl.StringVar(&f.pinPath, "pin.path", attach.DefaultPinPath, "bpffs directory for --pin (bpffs is mounted at /sys/fs/bpf if absent)")
	return cmd
}

type serveConfig struct {
	mode      attach.Mode
	discovery discovery.Config
	level     slog.Level
}

func (f *serveFlags) validate() (serveConfig, error) {
	var sc serveConfig
	var err error
	if sc.mode, err = attach.ParseMode(f.attachMode); err != nil {
		return sc, usagef("--attach-mode: %v", err)
	}
	if err := sc.level.UnmarshalText([]byte(f.logLevel)); err != nil {
		return sc, usagef("--log.level must be debug, info, warn or error, got %q", f.logLevel)
	}
	if len(f.listen) == 0 {
		return sc, usagef("--web.listen-address: at least one address is needed")
	}
	if f.telemetryPath == "" || f.telemetryPath[0] != '/' || f.telemetryPath == "/" {
		return sc, usagef("--web.telemetry-path must start with / and not be /, got %q", f.telemetryPath)
	}
	if f.webConfig != "" {
		if err := web.Validate(f.webConfig); err != nil {
			return sc, usagef("--web.config.file %s: %v", f.webConfig, err)
		}
	}
	if f.grace < 0 || f.resync <= 0 {
		return sc, usagef("--netns.grace-period must not be negative and --netns.resync-interval must be positive")
	}
	if f.flowEntries == 0 {
		return sc, usagef("--flow-entries must be at least 1")
	}
	if f.criEndpoint != "auto" && f.criEndpoint != "none" && !strings.HasPrefix(f.criEndpoint, "unix://") {
		return sc, usagef("--cri.endpoint must be auto, none or unix:///path, got %q", f.criEndpoint)
	}
	if f.criInterval <= 0 {
		return sc, usagef("--cri.interval must be positive")
	}
	if f.pin && !strings.HasPrefix(filepath.Clean(f.pinPath), "/sys/fs/bpf/") {
		return sc, usagef("--pin.path must be a directory under /sys/fs/bpf, got %q", f.pinPath)
	}
	if f.maxFlowSeries < 0 {
		return sc, usagef("--flows.max-series must not be negative")
	}
	sc.discovery = discovery.Config{Host: f.host, Proc: f.proc, Resync: f.resync}
	for _, re := range []struct {
		flag, expr string
		dst        **regexp.Regexp
	}{{"--netns.include", f.include, &sc.discovery.Include}, {"--netns.exclude", f.exclude, &sc.discovery.Exclude}} {
		if re.expr == "" {
			continue
		}
		if *re.dst, err = regexp.Compile(re.expr); err != nil {
			return sc, usagef("%s: %v", re.flag, err)
		}
	}
	return sc, nil
}

func runServe(ctx context.Context, f serveFlags) (err error) {
	sc, err := f.validate()
	if err != nil {
		return err
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: sc.level}))
	sc.discovery.Logger = log

	pinPath := ""
	if f.pin {
		pinPath = f.pinPath
	}
	c, err := collector.New(collector.Config{Mode: sc.mode, FlowEntries: f.flowEntries, Logger: log, PinPath: pinPath})
	if err != nil {
		return fmt.Errorf("start: %w", err)
	}
	defer func() {
		err = errors.Join(err, c.Close())
		if f.pin {
			log.Info("left programs attached and maps pinned for the next serve", "path", f.pinPath)
		} else {
			log.Info("detached everything, exiting")
		}
	}()
	d, err := discovery.New(c, sc.discovery)
	if err != nil {
		return err
	}

	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	discErr := make(chan error, 1)
	var discovering atomic.Bool
	discovering.Store(true)
	go func() {
		err := d.Run(ctx)
		discovering.Store(false)
		discErr <- err
	}()
	go prune(ctx, c, f.grace, log)
	endpoint := f.criEndpoint
	if endpoint == "auto" {
		endpoint = cri.Detect()
		if endpoint == "" {
			log.Info("no container runtime socket found: namespaces are not labelled with pods")
		}
	}
	if endpoint != "" && endpoint != "none" {
		e := cri.New(c, cri.Config{Endpoint: endpoint, Interval: f.criInterval, Logger: log})
		c.OnAdd(e.Kick)
		go e.Run(ctx)
		log.Info("labelling namespaces with pods", "cri", endpoint)
	}
	if f.pin {
		go func() {
			select {
			case <-d.Ready():
				c.DropStalePins()
			case <-ctx.Done():
			}
		}()
	}

	reg := prometheus.NewRegistry()
	reg.MustRegister(
		exporter.New(c, exporter.Config{Flows: f.flows, MaxFlowSeries: f.maxFlowSeries}),
		versioncollector.NewCollector("nsflow"),
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
	)
	mux := http.NewServeMux()
	mux.Handle(f.telemetryPath, promhttp.HandlerFor(reg, promhttp.HandlerOpts{ErrorLog: slog.NewLogLogger(log.Handler(), slog.LevelError)}))
	// Healthy: discovery runs and the BPF maps answer.
	mux.HandleFunc("/-/healthy", func(w http.ResponseWriter, _ *http.Request) {
		if !discovering.Load() {
			http.Error(w, "discovery stopped", http.StatusServiceUnavailable)
			return
		}
		if err := c.Healthy(); err != nil {
			http.Error(w, err.Error(), http.StatusServiceUnavailable)
			return
		}
		fmt.Fprintln(w, "ok")
	})
	mux.HandleFunc("/-/ready", func(w http.ResponseWriter, _ *http.Request) {
		select {
		case <-d.Ready():
			fmt.Fprintln(w, "ready")
		default:
			http.Error(w, "discovering namespaces", http.StatusServiceUnavailable)
		}
	})
	landing, err := web.NewLandingPage(web.LandingConfig{
		Name:        "nsflow",
		Description: "eBPF traffic of every network namespace on this node",
		Version:     version.Info(),
		Links: []web.LandingLinks{
			{Address: f.telemetryPath, Text: "Metrics"},
			{Address: "/-/healthy", Text: "Health"},
			{Address: "/-/ready", Text: "Readiness"},
		},
	})
	if err != nil {
		return err
	}
	mux.Handle("/", landing)
	if f.pprof {
		mux.HandleFunc("/debug/pprof/", pprof.Index)
		mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
		mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
		mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	}

	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	webCfg := &web.FlagConfig{WebListenAddresses: &f.listen, WebConfigFile: &f.webConfig, WebSystemdSocket: new(bool)}
	srvErr := make(chan error, 1)
	go func() { srvErr <- web.ListenAndServe(srv, webCfg, log) }()
	log.Info("serving", "addresses", f.listen, "path", f.telemetryPath, "mode", c.Mode())

	select {
	case <-ctx.Done():
		log.Info("shutting down")
	case err := <-srvErr:
		return fmt.Errorf("web server: %w", err)
	case err := <-discErr:
		if err != nil {
			return fmt.Errorf("discovery: %w", err)
		}
	}
	shutdown, cancelShutdown := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancelShutdown()
	return srv.Shutdown(shutdown)
}

// prune forgets removed namespaces once their grace period has passed.
func prune(ctx context.Context, c *collector.Collector, grace time.Duration, log *slog.Logger) {
	every := max(grace/4, 100*time.Millisecond)
	t := time.NewTicker(min(every, 10*time.Second))
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			if err := c.Prune(time.Now().Add(-grace)); err != nil {
				log.Warn("prune", "err", err)
			}
		}
	}
}
