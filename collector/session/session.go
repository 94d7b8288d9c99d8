// Package session runs a collector with everything that keeps it current:
// the namespaces it was asked for, discovery that follows namespaces as they
// come and go, the container runtime that names their pods, and pruning of
// what is gone. serve, trace, top all open one; Close stops every goroutine
// the session started, waits for them, and then closes the collector.
package session

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nsflow/nsflow/collector"
	"github.com/nsflow/nsflow/collector/cgroup"
	"github.com/nsflow/nsflow/collector/cri"
	"github.com/nsflow/nsflow/collector/discovery"
)

// Config configures a Session.
type Config struct {
	// Collector configures the BPF programs and maps.
	Collector collector.Config
	// Targets are observed from the start; an error for one fails Open.
	Targets []collector.Target
	// Discovery, when set, finds namespaces as they come and go.
	Discovery *discovery.Config
	// WaitReady makes Open return only once discovery's first scan has
	// attached everything it found (or ctx is done).
	WaitReady bool
	// CRIEndpoint, when set, labels namespaces with their pods (unix:///path).
	CRIEndpoint string
	// CRIInterval is the runtime's resync period; 0 means cri's default.
	CRIInterval time.Duration
	// CRILogger receives the runtime's log lines; nil means Logger.
	CRILogger *slog.Logger
	// Prune forgets namespaces and interfaces Grace after they are gone;
	// without it they are kept until Close (a trace reports them).
	Prune bool
	Grace time.Duration
	// SweepStale removes, once discovery's first scan is done, the clsact
	// filters nobody will adopt or remove from the namespaces discovery
	// does not select (collector.SweepStaleFilters): those of dead nsflow
	// processes and, with a pin path, those of the previous process.
	SweepStale bool
	// Logger receives lifecycle lines; nil discards them.
	Logger *slog.Logger
}

// Session is a running collector and its helpers.
type Session struct {
	c      *collector.Collector
	d      *discovery.Discovery // nil without discovery
	pods   *cri.Enricher        // nil without a container runtime
	names  *cgroup.Resolver     // nil without attribution (cgroups.go)
	log    *slog.Logger
	cancel context.CancelFunc
	wg     sync.WaitGroup
	errc   chan error // discovery's end, once
	ready  chan struct{}
	// running is set while discovery runs.
	running atomic.Bool

	once sync.Once
	err  error
}

// Open loads the collector and starts everything cfg asks for. On error,
// nothing is left attached or running.
func Open(ctx context.Context, cfg Config) (*Session, error) {
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.Collector.Logger == nil {
		cfg.Collector.Logger = cfg.Logger
	}
	c, err := collector.New(cfg.Collector)
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithCancel(ctx)
	s := &Session{c: c, log: cfg.Logger, cancel: cancel, errc: make(chan error, 1), ready: make(chan struct{})}
	if s.names = openResolver(cfg); s.names != nil {
		c.SetResolver(s.names)
	}
	for _, t := range cfg.Targets {
		if _, err := c.Add(t); err != nil {
			return nil, errors.Join(err, s.Close())
		}
	}
	var enricher *cri.Enricher
	if cfg.CRIEndpoint != "" {
		l := cfg.CRILogger
		if l == nil {
			l = cfg.Logger
		}
		enricher = cri.New(c, cri.Config{Endpoint: cfg.CRIEndpoint, Interval: cfg.CRIInterval, Logger: l})
		c.OnAdd(enricher.Kick)
		s.pods = enricher
	}
	// startCRI names the pods; with WaitReady, once before Open returns
	// (bounded: a runtime that does not answer leaves them unnamed until
	// it does), so that a short trace shows them.
	startCRI := func() {
		if enricher == nil {
			return
		}
		if cfg.WaitReady {
			sctx, cancel := context.WithTimeout(ctx, initialSyncTimeout)
			if err := enricher.Sync(sctx); err != nil {
				s.log.Debug("first pod sync", "err", err)
			}
			cancel()
		}
		s.goroutine(func() { enricher.Run(ctx) })
	}
	if cfg.Prune {
		s.goroutine(func() { s.prune(ctx, cfg.Grace) })
	}
	if cfg.Discovery == nil {
		close(s.ready)
		startCRI()
		return s, nil
	}
	dc := *cfg.Discovery
	if dc.Logger == nil {
		dc.Logger = cfg.Logger
	}
	if s.d, err = discovery.New(c, dc); err != nil {
		return nil, errors.Join(err, s.Close())
	}
	s.running.Store(true)
	s.goroutine(func() {
		err := s.d.Run(ctx)
		s.running.Store(false)
		s.errc <- err
	})
	s.goroutine(func() {
		select {
		case <-s.d.Ready():
			// With pins, links of a previous process that nothing
			// claimed in the first full scan are released now.
			if cfg.Collector.PinPath != "" {
				c.DropStalePins()
			}
			if cfg.SweepStale {
				s.sweep(dc)
			}
			close(s.ready)
		case <-ctx.Done():
		}
	})
	if cfg.WaitReady {
		select {
		case <-s.ready:
		case err := <-s.errc:
			if err == nil { // stopped by ctx
				break
			}
			// Discovery failed before its first scan was done (e.g. no
			// inotify instance left): say so rather than wait forever.
			return nil, errors.Join(fmt.Errorf("discovery: %w", err), s.Close())
		case <-ctx.Done():
		}
	}
	startCRI()
	return s, nil
}

// sweep removes stale clsact filters from the namespaces discovery found
// but does not select.
func (s *Session) sweep(dc discovery.Config) {
	all := dc
	all.Host, all.Include, all.Exclude = true, nil, nil
	all.UserNamespaces = true // an earlier --netns.userns process may have left filters there
	found, err := discovery.Scan(all)
	if err != nil {
		s.log.Warn("scan namespaces for stale clsact filters", "err", err)
		return
	}
	targets := make([]collector.Target, len(found))
	for i, f := range found {
		targets[i] = f.Target
	}
	if n := s.c.SweepStaleFilters(targets); n > 0 {
		s.log.Info("removed clsact filters nobody adopts", "filters", n)
	}
}

// initialSyncTimeout bounds the first pod sync of a session that waits
// until it is ready.
const initialSyncTimeout = 3 * time.Second

func (s *Session) goroutine(fn func()) {
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		fn()
	}()
}

// Collector is the session's collector.
func (s *Session) Collector() *collector.Collector { return s.c }

// Ready is closed once everything present at start is observed: at once
// without discovery, after its first full scan with it.
func (s *Session) Ready() <-chan struct{} { return s.ready }

// Done delivers discovery's end (nil when stopped by Close or the context,
// an error when it failed); it never delivers without discovery.
func (s *Session) Done() <-chan error { return s.errc }

// UnresolvedSandboxes returns how many of the runtime's ready pod
// sandboxes have a network namespace nsflow cannot find (their pods are
// unnamed); 0 without a runtime.
func (s *Session) UnresolvedSandboxes() int {
	if s.pods == nil {
		return 0
	}
	return s.pods.Unresolved()
}

// NamespacesSkipped returns how many namespaces (or references to one)
// discovery could not observe, by reason (discovery.SkipReasons, every one
// present; all 0 without discovery).
func (s *Session) NamespacesSkipped() map[string]uint64 {
	if s.d == nil {
		out := map[string]uint64{}
		for _, r := range discovery.SkipReasons {
			out[r] = 0
		}
		return out
	}
	return s.d.Skipped()
}

// Discovering reports whether discovery runs (false without discovery).
func (s *Session) Discovering() bool { return s.running.Load() }

// prune forgets removed namespaces once their grace period has passed.
func (s *Session) prune(ctx context.Context, grace time.Duration) {
	every := min(max(grace/4, 100*time.Millisecond), 10*time.Second)
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			if err := s.c.Prune(time.Now().Add(-grace)); err != nil {
				s.log.Warn("prune", "err", err)
			}
		}
	}
}

// Close stops discovery, the runtime client and pruning, waits for them,
// and closes the collector (which detaches everything, or leaves it pinned).
// It may be called more than once.
func (s *Session) Close() error {
	s.once.Do(func() {
		s.cancel()
		s.wg.Wait()
		s.err = s.c.Close()
		if s.names != nil {
			s.names.Close()
		}
	})
	return s.err
}
