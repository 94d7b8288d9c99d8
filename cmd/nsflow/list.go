package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
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
	var output string
	var netns netnsFlags
	var criF criFlags
	var cfg discovery.Config
	cmd := &cobra.Command{
		Use:   "list",
		Short: "List the network namespaces on this node, their interfaces and nsflow's attachments",
		Example: `  nsflow list
  nsflow list -o json --netns.include '^web'`,
		Args: checkArgs(cobra.NoArgs),
		PreRunE: func(*cobra.Command, []string) (err error) {
			if output != "table" && output != "json" {
				return usagef("--output must be table or json, got %q", output)
			}
			if cfg, err = netns.validate(); err != nil {
				return err
			}
			return criF.validate()
		},
		RunE: func(cmd *cobra.Command, _ []string) error {
			pods := podsOnce(cmd.Context(), criF.resolve())
			nss, skipped, err := discovery.ListSkipped(cfg, pods)
			if err != nil {
				return err
			}
			reportSkipped(cmd.ErrOrStderr(), skipped)
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
						label += "(" + flow.SafeName(ns.Commands[i]) + ")"
					}
					pids = append(pids, label)
				}
				pod := "-"
				if ns.Pod != nil {
					pod = flow.SafeName(ns.Pod.Namespace + "/" + ns.Pod.Name)
				}
				if ns.Error != "" {
					fmt.Fprintf(tw, "%s\t%s\t%d\t%s\t(error: %s)\t\t\t\t\n", flow.SafeName(ns.Name), pod, ns.Inode, strings.Join(pids, ","), flow.SafeName(ns.Error))
				}
				for _, i := range ns.Interfaces {
					fmt.Fprintf(tw, "%s\t%s\t%d\t%s\t%s\t%d\t%s\t%v\t%s\n", flow.SafeName(ns.Name), pod, ns.Inode, strings.Join(pids, ","),
						flow.SafeName(i.Name), i.Index, flow.SafeName(i.Type), i.Up, nsflowCell(i))
				}
			}
			return tw.Flush()
		},
	}
	fl := cmd.Flags()
	fl.StringVarP(&output, "output", "o", "table", "output format: table or json")
	netns.register(fl)
	criF.register(fl, false)
	return cmd
}

// nsflowCell is the NSFLOW column: the programs on the interface, and for
// a host end whose peer is listed, that peer and whether nsflow leaves this
// end out (peer-observed: the peer counts its packets).
func nsflowCell(i discovery.ListedIface) string {
	switch {
	case i.State != "":
		return fmt.Sprintf("%s (%s: %s)", i.Attach, i.State, flow.SafeName(i.Peer))
	case i.Peer != "":
		return fmt.Sprintf("%s (peer %s)", i.Attach, flow.SafeName(i.Peer))
	}
	return i.Attach
}

// reportSkipped tells, on stderr, which namespaces the list does not show:
// those skipped for their user namespace, and the references it could not
// read (names escaped: a tenant picks them).
func reportSkipped(w io.Writer, skipped []discovery.Skipped) {
	var unread, userns []discovery.Skipped
	for _, s := range skipped {
		if s.Reason == discovery.SkipUserns {
			userns = append(userns, s)
		} else {
			unread = append(unread, s)
		}
	}
	if len(userns) > 0 {
		fmt.Fprintf(w, "nsflow: %d namespace(s) found only through a process and owned by a user namespace other than the initial one are not listed (--netns.userns lists them):\n", len(userns))
		for _, s := range userns {
			fmt.Fprintf(w, "  %s: pid %d uid %d (%s): %s: inode %d: %s\n", s.Reason, s.Pid, s.Uid, flow.SafeName(s.Comm), flow.SafeName(s.Path), s.Inode, flow.SafeName(s.Err))
		}
	}
	if len(unread) == 0 {
		return
	}
	fmt.Fprintf(w, "nsflow: %d namespace reference(s) could not be read, their namespaces are not listed (a process of another user, or with capabilities nsflow lacks, needs CAP_SYS_PTRACE; otherwise an LSM denies it):\n", len(unread))
	for _, s := range unread {
		if s.Pid != 0 {
			fmt.Fprintf(w, "  %s: pid %d uid %d (%s): %s: %s\n", s.Reason, s.Pid, s.Uid, flow.SafeName(s.Comm), flow.SafeName(s.Path), flow.SafeName(s.Err))
		} else {
			fmt.Fprintf(w, "  %s: %s: %s\n", s.Reason, flow.SafeName(s.Path), flow.SafeName(s.Err))
		}
	}
}

// podMap captures what an enricher finds.
type podMap map[uint64]flow.PodInfo

func (m *podMap) SetPods(p map[uint64]flow.PodInfo, _ uint64) { *m = p }

func (m *podMap) PodGeneration() uint64 { return 0 }

// podsOnce asks the container runtime once for the pods of the namespaces
// (nil when there is no runtime or it does not answer).
func podsOnce(ctx context.Context, endpoint string) map[uint64]flow.PodInfo {
	if endpoint == "" {
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
