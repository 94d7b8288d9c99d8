package main

// Flag groups shared by the commands: each registers its flags on a command
// and validates them once, with messages that name the flag. A command is
// the sum of its groups plus a few flags of its own.

import (
	"fmt"
	"log/slog"
	"regexp"
	"strings"
	"time"

	"github.com/spf13/pflag"

	"github.com/nsflow/nsflow/bpf"
	"github.com/nsflow/nsflow/collector"
	"github.com/nsflow/nsflow/collector/attach"
	"github.com/nsflow/nsflow/collector/cri"
	"github.com/nsflow/nsflow/collector/discovery"
	"github.com/nsflow/nsflow/collector/filter"
)

// attachFlags choose how programs are attached and how large the flow map is.
type attachFlags struct {
	mode        string
	flowEntries uint32
	maxPoints   uint32
	maxIfaces   int
}

func (a *attachFlags) register(fs *pflag.FlagSet) {
	fs.StringVar(&a.mode, "attach-mode", string(attach.ModeAuto), "how to attach: auto (TCX in the host namespace, clsact + cls_bpf in every other and wherever the kernel has no TCX), tcx or clsact (that one everywhere)")
	fs.Uint32Var(&a.flowEntries, "flow-entries", 0, "capacity of the flow map (flows beyond it are evicted, totals stay exact); 0: sized for the node's CPUs, at most 65536 (docs/DEPLOY.md)")
	fs.IntVar(&a.maxIfaces, "max-interfaces", collector.DefaultMaxInterfaces, "interfaces attached per namespace, lo included (the host's namespace excepted): those beyond it are refused and counted in nsflow_attach_refused_total{reason=\"interfaces\"}, so that one pod cannot take the node's slots")
	fs.Uint32Var(&a.maxPoints, "max-hooks", 0, fmt.Sprintf("capacity of the totals in hooks, two per interface (interfaces beyond it are not attached); 0: sized for the node's CPUs; at most %d (docs/DEPLOY.md)", bpf.MaxPointsLimit))
}

// config returns the map sizes as collector settings.
func (a *attachFlags) config(c collector.Config) collector.Config {
	c.FlowEntries, c.MaxPoints, c.MaxInterfaces = a.flowEntries, a.maxPoints, a.maxIfaces
	return c
}

func (a *attachFlags) validate() (attach.Mode, error) {
	m, err := attach.ParseMode(a.mode)
	if err != nil {
		return "", usagef("--attach-mode: %v", err)
	}
	if a.maxIfaces < 1 {
		return "", usagef("--max-interfaces must be at least 1, got %d", a.maxIfaces)
	}
	if a.maxPoints > uint32(bpf.MaxPointsLimit) {
		return "", usagef("--max-hooks must be at most %d", bpf.MaxPointsLimit)
	}
	return m, nil
}

// criFlags name the container runtime that labels namespaces with pods.
type criFlags struct {
	endpoint string
	interval time.Duration
}

// register adds --cri.endpoint, and --cri.interval when withInterval.
func (c *criFlags) register(fs *pflag.FlagSet, withInterval bool) {
	fs.StringVar(&c.endpoint, "cri.endpoint", "auto", "container runtime CRI socket for pod names: unix:///path, auto (containerd's or CRI-O's if present) or none")
	c.interval = 10 * time.Second
	if withInterval {
		fs.DurationVar(&c.interval, "cri.interval", c.interval, "resync period of pod identities (new namespaces trigger one at once)")
	}
}

func (c *criFlags) validate() error {
	if c.endpoint != "auto" && c.endpoint != "none" && !strings.HasPrefix(c.endpoint, "unix://") {
		return usagef("--cri.endpoint must be auto, none or unix:///path, got %q", c.endpoint)
	}
	if c.interval <= 0 {
		return usagef("--cri.interval must be positive")
	}
	return nil
}

// resolve returns the socket to use: "" when off or, under auto, when no
// runtime socket is found.
func (c *criFlags) resolve() string {
	switch c.endpoint {
	case "none":
		return ""
	case "auto":
		return cri.Detect()
	}
	return c.endpoint
}

// netnsFlags select namespaces for discovery by regular expressions (serve,
// list).
type netnsFlags struct {
	host, proc, hostVeths, userns bool
	include, exclude              string
}

func (n *netnsFlags) register(fs *pflag.FlagSet) {
	fs.BoolVar(&n.host, "netns.host", true, "observe the host's own network namespace (netns=\"host\")")
	fs.BoolVar(&n.proc, "netns.proc", true, "observe namespaces of processes under /proc (containers without a bind mount)")
	fs.StringVar(&n.include, "netns.include", "", "observe only namespaces whose name matches this regular expression")
	fs.StringVar(&n.exclude, "netns.exclude", "", "skip namespaces whose name matches this regular expression")
	registerHostVeths(fs, &n.hostVeths)
	registerUserns(fs, &n.userns)
}

// registerUserns adds --netns.userns (serve, list, trace, top).
func registerUserns(fs *pflag.FlagSet, v *bool) {
	fs.BoolVar(v, "netns.userns", false, "also observe namespaces found only through a process and owned by a user namespace other than the initial one (any unprivileged user can create thousands with unshare -Urn; by default they are skipped and counted, reason \"userns\"); bind-mounted namespaces are observed whoever owns them")
}

// registerHostVeths adds --netns.host-veths (serve, list, trace, top).
func registerHostVeths(fs *pflag.FlagSet, v *bool) {
	fs.BoolVar(v, "netns.host-veths", false, "also observe the host end of a veth whose peer is in an observed namespace (by default the peer alone counts its packets: each packet once)")
}

func (n *netnsFlags) validate() (discovery.Config, error) {
	dc := discovery.Config{Host: n.host, Proc: n.proc, HostVeths: n.hostVeths, UserNamespaces: n.userns}
	for _, re := range []struct {
		flag, expr string
		dst        **regexp.Regexp
	}{{"--netns.include", n.include, &dc.Include}, {"--netns.exclude", n.exclude, &dc.Exclude}} {
		if re.expr == "" {
			continue
		}
		var err error
		if *re.dst, err = regexp.Compile(re.expr); err != nil {
			return dc, usagef("%s: %v", re.flag, err)
		}
	}
	return dc, nil
}

// selectFlags pick namespaces for trace and top: names, patterns, pids,
// paths, or everything.
type selectFlags struct {
	netns     []string
	exclude   []string
	all       bool
	hostVeths bool
	userns    bool
}

func (s *selectFlags) register(fs *pflag.FlagSet) {
	fs.StringArrayVarP(&s.netns, "netns", "n", nil, "namespace to observe: NAME, glob pattern, pid:PID, /path or host (repeatable; none: every namespace)")
	fs.BoolVarP(&s.all, "all", "A", false, "observe every namespace on the node, also those that appear meanwhile (the default when no --netns is given)")
	fs.StringArrayVarP(&s.exclude, "exclude", "x", nil, "with --all or patterns: skip namespaces whose name matches this glob pattern (repeatable)")
	registerHostVeths(fs, &s.hostVeths)
	registerUserns(fs, &s.userns)
}

// selection is what selectFlags resolve to: namespaces opened at start, and
// discovery that follows patterns (or everything) as namespaces come and go.
type selection struct {
	targets   []collector.Target
	discovery *discovery.Config // nil: only the targets
	hostVeths bool              // collector.Config.HostVeths
}

func (s *selectFlags) validate() (selection, error) {
	sel := selection{hostVeths: s.hostVeths}
	all := s.all || len(s.netns) == 0
	var patterns []string
	for _, arg := range s.netns {
		if isGlob(arg) && !strings.HasPrefix(arg, "/") {
			patterns = append(patterns, arg)
			continue
		}
		t, err := collector.ParseTarget(arg)
		if err != nil {
			return sel, usageError{fmt.Errorf("--netns %s: %w", arg, err)}
		}
		sel.targets = append(sel.targets, t)
	}
	if len(s.exclude) > 0 && !all && len(patterns) == 0 {
		return sel, usagef("--exclude applies to --all and --netns patterns")
	}
	if !all && len(patterns) == 0 {
		return sel, nil
	}
	dc := &discovery.Config{Host: all, Proc: true, UserNamespaces: s.userns}
	var err error
	if !all {
		if dc.Include, err = globsRegexp(patterns); err != nil {
			return sel, usagef("--netns: %v", err)
		}
	}
	if len(s.exclude) > 0 {
		if dc.Exclude, err = globsRegexp(s.exclude); err != nil {
			return sel, usagef("--exclude: %v", err)
		}
	}
	sel.discovery = dc
	return sel, nil
}

// filterFlags take the flow filter as --filter or as trailing arguments.
type filterFlags struct{ expr string }

func (f *filterFlags) register(fs *pflag.FlagSet) {
	fs.StringVarP(&f.expr, "filter", "f", "", "flow filter (pcap-filter subset; also accepted as trailing arguments)")
}

// validate folds the arguments into the filter and parses it.
func (f *filterFlags) validate(args []string) (*filter.Filter, error) {
	if len(args) > 0 {
		if f.expr != "" {
			return nil, usagef("give the filter either as arguments or with --filter, not both")
		}
		f.expr = strings.Join(args, " ")
	}
	flt, err := filter.Parse(f.expr)
	if err != nil {
		return nil, usageError{err}
	}
	return flt, nil
}

// logFlags set the log level of serve.
type logFlags struct{ level string }

func (l *logFlags) register(fs *pflag.FlagSet) {
	fs.StringVar(&l.level, "log.level", "info", "log level: debug, info, warn or error")
}

func (l *logFlags) validate() (slog.Level, error) {
	var lv slog.Level
	if err := lv.UnmarshalText([]byte(l.level)); err != nil {
		return lv, usagef("--log.level must be debug, info, warn or error, got %q", l.level)
	}
	return lv, nil
}
