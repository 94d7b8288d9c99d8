package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"regexp"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/nsflow/nsflow/collector/cri"
	"github.com/nsflow/nsflow/collector/discovery"
	"github.com/nsflow/nsflow/collector/flow"
)

func newListCmd() *cobra.Command {
	var output, include, exclude string
	var host, proc bool
	var criEndpoint string
	cmd := &cobra.Command{
		Use:   "list",
		Short: "List the network namespaces on this node, their interfaces and nsflow's attachments",
		Example: `  nsflow list
  nsflow list -o json --netns.include '^web'`,
		Args: checkArgs(cobra.NoArgs),
		RunE: func(cmd *cobra.Command, _ []string) error {
			if output != "table" && output != "json" {
				return usagef("--output must be table or json, got %q", output)
			}
			cfg := discovery.Config{Host: host, Proc: proc}
			var err error
			if include != "" {
				if cfg.Include, err = regexp.Compile(include); err != nil {
					return usagef("--netns.include: %v", err)
				}
			}
			if exclude != "" {
				if cfg.Exclude, err = regexp.Compile(exclude); err != nil {
					return usagef("--netns.exclude: %v", err)
				}
			}
			pods := podsOnce(cmd.Context(), criEndpoint)
			nss, err := discovery.List(cfg, pods)
			if err != nil {
				return err
			}
			if output == "json" {
				enc := json.NewEncoder(cmd.OutOrStdout())
				enc.SetIndent("", "  ")
				return enc.Encode(nss)
			}
			tw := tabwriter.NewWriter(cmd.OutOrStdout(), 0, 0, 2, ' ', 0)
			fmt.Fprintln(tw, "NETNS\tPOD\tINODE\tPIDS\tINTERFACE\tIFINDEX\tTYPE\tUP\tNSFLOW")
			for _, ns := range nss {
				pids := make([]string, 0, len(ns.Pids))
				for i, p := range ns.Pids {
					if i == 3 {
						pids = append(pids, fmt.Sprintf("+%d", len(ns.Pids)-3))
						break
					}
					label := strconv.Itoa(p)
					if i < len(ns.Commands) && ns.Commands[i] != "" {
						label += "(" + ns.Commands[i] + ")"
					}
					pids = append(pids, label)
				}
				pod := "-"
				if ns.Pod != nil {
					pod = ns.Pod.Namespace + "/" + ns.Pod.Name
				}
				if ns.Error != "" {
					fmt.Fprintf(tw, "%s\t%s\t%d\t%s\t(error: %s)\t\t\t\t\n", ns.Name, pod, ns.Inode, strings.Join(pids, ","), ns.Error)
				}
				for _, i := range ns.Interfaces {
					fmt.Fprintf(tw, "%s\t%s\t%d\t%s\t%s\t%d\t%s\t%v\t%s\n", ns.Name, pod, ns.Inode, strings.Join(pids, ","),
						i.Name, i.Index, i.Type, i.Up, i.Attach)
				}
			}
			return tw.Flush()
		},
	}
	fl := cmd.Flags()
	fl.StringVarP(&output, "output", "o", "table", "output format: table or json")
	fl.BoolVar(&host, "netns.host", true, "include the host's own namespace")
	fl.BoolVar(&proc, "netns.proc", true, "include namespaces of processes under /proc")
	fl.StringVar(&include, "netns.include", "", "only namespaces whose name matches this regular expression")
	fl.StringVar(&exclude, "netns.exclude", "", "skip namespaces whose name matches this regular expression")
	fl.StringVar(&criEndpoint, "cri.endpoint", "auto", "container runtime CRI socket for pod names (auto, none or unix:///path)")
	return cmd
}

// podMap captures what an enricher finds.
type podMap map[uint64]flow.PodInfo

func (m *podMap) SetPods(p map[uint64]flow.PodInfo) { *m = p }

// podsOnce asks the container runtime once for the pods of the namespaces
// (nil when there is no runtime or it does not answer).
func podsOnce(ctx context.Context, endpoint string) map[uint64]flow.PodInfo {
	if endpoint == "auto" {
		endpoint = cri.Detect()
	}
	if endpoint == "" || endpoint == "none" {
		return nil
	}
	var pods podMap
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	if err := cri.New(&pods, cri.Config{Endpoint: endpoint}).Sync(ctx); err != nil {
		fmt.Fprintln(os.Stderr, "nsflow: no pod names:", err)
	}
	return pods
}
