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
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	versioncollector "github.com/prometheus/client_golang/prometheus/collectors/version"
	"github.com/prometheus/common/version"
	"github.com/prometheus/exporter-toolkit/web"
	"github.com/spf13/cobra"

	"github.com/nsflow/nsflow/collector"
	"github.com/nsflow/nsflow/collector/attach"
	"github.com/nsflow/nsflow/collector/session"
	"github.com/nsflow/nsflow/exporter"
)

// serveFlags are serve's command line.
type serveFlags struct {
	listen        []string
	telemetryPath string
	webConfig     string
	pprof         bool
	web           exporter.WebFlags
	netns         netnsFlags
	grace         time.Duration
	resync        time.Duration
	attach        attachFlags
	flows         bool
	maxFlowSeries int
	containers    bool
	maxCtrSeries  int
	log           logFlags
	pin           bool
	pinPath       string
	cri           criFlags
}

func newServeCmd() *cobra.Command {
	var f serveFlags
	var sc serveConfig
	cmd := &cobra.Command{
		Use:   "serve",
		Short: "Run the node exporter: observe every namespace, serve /metrics",
		Long: `serve discovers every network namespace on the node (ip netns / CNI bind
mounts, process namespaces under /proc, and the host's own), attaches to every
interface of each as they come and go, and serves Prometheus metrics read from
the BPF maps at scrape time. SIGTERM or Ctrl-C detaches everything and exits.`,
		Example: `  nsflow serve
  nsflow serve --web.listen-address=:9990 --netns.exclude='^cni-test'
  nsflow serve --web.config.file=web.yml --flows --flows.max-series=500
  nsflow serve --containers`,
		Args: checkArgs(cobra.NoArgs),
		PreRunE: func(*cobra.Command, []string) (err error) {
			sc, err = f.validate()
			return err
		},
		RunE: func(cmd *cobra.Command, _ []string) error { return runServe(cmd.Context(), f, sc) },
	}
	fl := cmd.Flags()
	fl.StringArrayVar(&f.listen, "web.listen-address", []string{":9990"}, "address to listen on for metrics (repeatable)")
	fl.StringVar(&f.telemetryPath, "web.telemetry-path", "/metrics", "path under which to expose metrics")
	fl.StringVar(&f.webConfig, "web.config.file", "", "exporter-toolkit web configuration file (TLS, basic auth)")
	fl.BoolVar(&f.pprof, "web.enable-pprof", false, "serve Go profiling endpoints under /debug/pprof/ (off by default: they expose internals)")
	f.web.Register(fl)
	f.netns.register(fl)
	fl.DurationVar(&f.grace, "netns.grace-period", 5*time.Minute, "keep the series of a deleted namespace this long, so its last increments are scraped")
	fl.DurationVar(&f.resync, "netns.resync-interval", 30*time.Second, "safety-net full rescan interval (discovery is event driven)")
	f.attach.register(fl)
	fl.BoolVar(&f.flows, "flows", false, "account and export per-flow series (nsflow_flow_*_total); off, only the exact per-interface totals are counted")
	fl.IntVar(&f.maxFlowSeries, "flows.max-series", 1000, "at most this many flow series: a flow keeps its series while it is in the flow map, new flows take free places largest first; the rest of each interface's traffic is in its protocol=\"other\" series, so that the flow series add up to the totals (docs/OUTPUT.md)")
	fl.BoolVar(&f.containers, "containers", false, "account and export per-container totals (nsflow_container_*_total): what each container (cgroup) sent and received in each namespace, hostNetwork pods and host processes included (accounts flows in the kernel, as --flows does)")
	fl.IntVar(&f.maxCtrSeries, "containers.max-series", 1000, "at most this many container series (kept while their container is in the map, new ones take free places largest first); the rest of each namespace's traffic is in its container=\"\" series (docs/OUTPUT.md)")
	f.log.register(fl)
	f.cri.register(fl, true)
	fl.BoolVar(&f.pin, "pin", false, "pin maps and links on the bpffs: counting goes on while nsflow restarts or upgrades, and the next serve adopts them")
	fl.StringVar(&f.pinPath, "pin.path", attach.DefaultPinPath, "bpffs directory for --pin (bpffs is mounted at /sys/fs/bpf if absent)")
	return cmd
}

// serveConfig is a validated serve command line.
type serveConfig struct {
	session session.Config
	level   slog.Level
}

func (f *serveFlags) validate() (serveConfig, error) {
	var sc serveConfig
	var err error
	if sc.level, err = f.log.validate(); err != nil {
		return sc, err
	}
	if len(f.listen) == 0 {
		return sc, usagef("--web.listen-address: at least one address is needed")
	}
	if f.telemetryPath == "" || f.telemetryPath[0] != '/' || f.telemetryPath == "/" {
		return sc, usagef("--web.telemetry-path must start with / and not be /, got %q", f.telemetryPath)
	}
	if err := f.web.Validate(); err != nil {
		return sc, usagef("%v", err)
	}
	if f.webConfig != "" {
		if err := web.Validate(f.webConfig); err != nil {
			return sc, usagef("--web.config.file %s: %v", f.webConfig, err)
		}
	}
	if f.grace < 0 {
		return sc, usagef("--netns.grace-period must not be negative")
	}
	if f.resync <= 0 {
		return sc, usagef("--netns.resync-interval must be positive")
	}
	mode, err := f.attach.validate()
	if err != nil {
		return sc, err
	}
	if err := f.cri.validate(); err != nil {
		return sc, err
	}
	if f.pin && !strings.HasPrefix(filepath.Clean(f.pinPath), "/sys/fs/bpf/") {
		return sc, usagef("--pin.path must be a directory under /sys/fs/bpf, got %q", f.pinPath)
	}
	if f.maxFlowSeries < 0 {
		return sc, usagef("--flows.max-series must not be negative")
	}
	if f.maxCtrSeries < 0 {
		return sc, usagef("--containers.max-series must not be negative")
	}
	dc, err := f.netns.validate()
	if err != nil {
		return sc, err
	}
	dc.Resync = f.resync
	sc.session = session.Config{
		// Without --flows no flow is exported, so none is accounted: the
		// stubs count the totals alone (docs/BENCHMARKS.md, issue 17).
		// Per-container totals need the flow path (collector.Config).
		Collector: f.attach.config(collector.Config{Mode: mode, HostVeths: dc.HostVeths, NoFlows: !f.flows && !f.containers,
			Containers: f.containers}),
		Discovery:   &dc,
		CRIInterval: f.cri.interval,
		Prune:       true,
		Grace:       f.grace,
		SweepStale:  true,
	}
	if f.pin {
		sc.session.Collector.PinPath = f.pinPath
	}
	return sc, nil
}

func runServe(ctx context.Context, f serveFlags, sc serveConfig) (err error) {
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: sc.level}))
	sc.session.Logger = log
	sc.session.CRIEndpoint = f.cri.resolve()
	if sc.session.CRIEndpoint == "" && f.cri.endpoint == "auto" {
		log.Info("no container runtime socket found: namespaces are not labelled with pods")
	}
	sess, err := session.Open(ctx, sc.session)
	if err != nil {
		return fmt.Errorf("start: %w", err)
	}
	defer func() {
		err = errors.Join(err, sess.Close())
		if f.pin {
			log.Info("left programs attached and maps pinned for the next serve", "path", f.pinPath)
		} else {
			log.Info("detached everything, exiting")
		}
	}()
	if sc.session.CRIEndpoint != "" {
		log.Info("labelling namespaces with pods", "cri", sc.session.CRIEndpoint)
	}
	c := sess.Collector()
	if f.containers {
		// Containers are named from their cgroups while these exist: a
		// read every 2 s names those that start and end between two
		// scrapes (names are cached by cgroup id).
		ctx, cancel := context.WithCancel(ctx)
		var wg sync.WaitGroup
		defer wg.Wait()
		defer cancel()
		wg.Add(1)
		go func() {
			defer wg.Done()
			t := time.NewTicker(2 * time.Second)
			defer t.Stop()
			for {
				select {
				case <-ctx.Done():
					return
				case <-t.C:
					c.Totals()
				}
			}
		}()
	}

	reg := prometheus.NewRegistry()
	reg.MustRegister(
		exporter.New(c, exporter.Config{Flows: f.flows, MaxFlowSeries: f.maxFlowSeries, Containers: f.containers, MaxContainerSeries: f.maxCtrSeries}),
		exporter.NewPodIdentity(sess),
		exporter.NewSkipped(sess),
		versioncollector.NewCollector("nsflow"),
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
	)
	mux := http.NewServeMux()
	mux.Handle(f.telemetryPath, exporter.NewHandler(reg, f.web, log))
	// Healthy: discovery runs and the BPF maps answer.
	mux.HandleFunc("/-/healthy", func(w http.ResponseWriter, _ *http.Request) {
		if !sess.Discovering() {
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
		case <-sess.Ready():
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
	case err := <-sess.Done():
		if err != nil {
			return fmt.Errorf("discovery: %w", err)
		}
	}
	// In-flight requests get a bound to finish; then what is still open is
	// closed. A connection that never sent a request (a TCP probe, a
	// client's spare dial) counts as busy for 5 s in net/http, so a bound
	// hit is no failure of serve's: it exits 0 all the same
	// (e2e TestShutdownWithSilentConnection).
	shutdown, cancelShutdown := context.WithTimeout(context.Background(), shutdownGrace)
	defer cancelShutdown()
	if err := srv.Shutdown(shutdown); err != nil {
		log.Warn("closing connections still open at shutdown", "after", shutdownGrace, "err", err)
		return srv.Close()
	}
	return nil
}

// shutdownGrace bounds how long serve waits for in-flight requests on
// SIGTERM.
const shutdownGrace = 5 * time.Second
