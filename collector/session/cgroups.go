package session

import (
	"github.com/nsflow/nsflow/collector/cgroup"
	"github.com/nsflow/nsflow/collector/cri"
)

// openResolver returns what names the cgroup ids of flows and containers
// when attribution is on (nil otherwise, or when the cgroup v2 mount is
// not found: flows then keep their ids, unnamed, and a warning says why):
// the runtime's containers with CRIEndpoint, else cgroup paths.
func openResolver(cfg Config) *cgroup.Resolver {
	cc := cfg.Collector
	if !cc.Attribution && !cc.SocketLookup && !cc.Containers {
		return nil
	}
	rc := cgroup.Config{Logger: cfg.Logger}
	if cfg.CRIEndpoint != "" {
		rc.Lister = cri.NewLister(cfg.CRIEndpoint)
	}
	r, err := cgroup.New(rc)
	if err != nil {
		cfg.Logger.Warn("container names unavailable (flows keep their cgroup ids)", "err", err)
		return nil
	}
	return r
}
