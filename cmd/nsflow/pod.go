package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"os/signal"
	"runtime"
	"syscall"
	"text/tabwriter"

	"github.com/spf13/cobra"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/nsflow/nsflow/test/podns"
)

func newPodCmd() *cobra.Command {
	var cfg podns.Config
	cmd := &cobra.Command{
		Use:   "pod",
		Short: "Create, list, enter and delete pod-like namespaces for tests and demos",
		Long: `pod builds network namespaces the way a container runtime and the CNI
bridge plugin do: a bind-mounted netns (visible to ip netns), a host bridge
with the gateway, a veth pair whose pod end is eth0 with an IPv4 and an IPv6
address, lo up, default routes. Processes started with "pod exec" are the
pod's containers: they share its loopback. Nothing is routed or NATed off
the machine.`,
	}
	cmd.PersistentFlags().StringVar(&cfg.StateDir, "state-dir", podns.DefaultStateDir, "directory of the pods' state files")
	cmd.AddCommand(newPodCreateCmd(&cfg), newPodDeleteCmd(&cfg), newPodListCmd(&cfg), newPodExecCmd(&cfg))
	return cmd
}

// podError turns the pod builder's input errors into usage errors.
func podError(err error) error {
	for _, e := range []error{podns.ErrInvalidName, podns.ErrInvalidSubnet, podns.ErrInvalidIP} {
		if errors.Is(err, e) {
			return usageError{err}
		}
	}
	return err
}

func newPodCreateCmd(cfg *podns.Config) *cobra.Command {
	var subnet, ip string
	var opts podns.Options
	cmd := &cobra.Command{
		Use:   "create NAME [--subnet CIDR] [--ip ADDR]",
		Short: "Create a pod",
		Example: `  nsflow pod create web
  nsflow pod create db --subnet 10.213.7.0/24 --ip 10.213.7.10`,
		Args: checkArgs(cobra.ExactArgs(1)),
		PreRunE: func(_ *cobra.Command, args []string) error {
			if err := podns.ValidateName(args[0]); err != nil {
				return usageError{err}
			}
			if subnet != "" {
				p, err := podns.ParseSubnet(subnet)
				if err != nil {
					return usageError{fmt.Errorf("--subnet: %w", err)}
				}
				opts.Subnet = p
			}
			if ip != "" {
				a, err := netip.ParseAddr(ip)
				if err != nil {
					return usagef("--ip %q: not an IP address", ip)
				}
				opts.IP = a
			}
			return nil
		},
		RunE: func(cmd *cobra.Command, args []string) error {
			p, err := podns.Create(*cfg, args[0], opts)
			if err != nil {
				return podError(err)
			}
			printPods(cmd, []*podns.Pod{p})
			return nil
		},
	}
	cmd.Flags().StringVar(&subnet, "subnet", "", "pod subnet, IPv4 /16 to /30 (default "+podns.DefaultSubnet.String()+")")
	cmd.Flags().StringVar(&ip, "ip", "", "pod IPv4 address (default: the lowest free one)")
	return cmd
}

func newPodDeleteCmd(cfg *podns.Config) *cobra.Command {
	return &cobra.Command{
		Use:   "delete NAME...",
		Short: "Delete pods (deleting a missing pod is not an error)",
		Args:  checkArgs(cobra.MinimumNArgs(1)),
		PreRunE: func(_ *cobra.Command, args []string) error {
			for _, name := range args {
				if err := podns.ValidateName(name); err != nil {
					return usageError{err}
				}
			}
			return nil
		},
		RunE: func(cmd *cobra.Command, args []string) error {
			var errs []error
			for _, name := range args {
				existed, err := podns.Delete(*cfg, name)
				switch {
				case err != nil:
					errs = append(errs, err)
				case !existed:
					fmt.Fprintf(cmd.ErrOrStderr(), "pod %s not found, nothing to delete\n", name)
				}
			}
			return errors.Join(errs...)
		},
	}
}

func newPodListCmd(cfg *podns.Config) *cobra.Command {
	var output string
	cmd := &cobra.Command{
		Use:   "list",
		Short: "List pods",
		Args:  checkArgs(cobra.NoArgs),
		PreRunE: func(*cobra.Command, []string) error {
			if output != "table" && output != "json" {
				return usagef("--output must be table or json, got %q", output)
			}
			return nil
		},
		RunE: func(cmd *cobra.Command, _ []string) error {
			pods, err := podns.List(*cfg)
			if err != nil {
				return err
			}
			if output == "json" {
				if pods == nil {
					pods = []*podns.Pod{}
				}
				enc := json.NewEncoder(cmd.OutOrStdout())
				enc.SetIndent("", "  ")
				return enc.Encode(pods)
			}
			printPods(cmd, pods)
			return nil
		},
	}
	cmd.Flags().StringVarP(&output, "output", "o", "table", "output format: table or json")
	return cmd
}

func printPods(cmd *cobra.Command, pods []*podns.Pod) {
	tw := tabwriter.NewWriter(cmd.OutOrStdout(), 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "NAME\tNETNS\tIPV4\tIPV6\tGATEWAY\tBRIDGE\tHOST VETH")
	for _, p := range pods {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\n", p.Name, p.NetnsPath,
			netip.PrefixFrom(p.IPv4, p.Subnet.Bits()), p.IPv6, p.Gateway4, p.Bridge, p.HostVeth)
	}
	tw.Flush()
}

func newPodExecCmd(cfg *podns.Config) *cobra.Command {
	var container string
	cmd := &cobra.Command{
		Use:   "exec NAME [--container C] -- CMD [ARGS...]",
		Short: "Run a command inside a pod (one of its containers)",
		Long: `exec runs a command in a pod's network namespace. Without --container,
nsflow replaces itself with the command. With --container C, the command
starts in the pod's namespace and in the cgroup of container C,
<cgroup v2 mount>/nsflow-pods/NAME/C (made on demand), so that its sockets
carry that cgroup's id and nsflow's attribution names its traffic C;
nsflow waits for it, passes signals on and exits with its status. The
cgroup stays while the pod lives, as a pod's container does, so that a
trace still names traffic of a command that has exited ("pod delete" kills
what still runs in the pod's containers and removes their cgroups).`,
		Example: `  nsflow pod exec web -- ping -c 3 127.0.0.1
  nsflow pod exec web --container server -- iperf3 --server
  nsflow pod exec web --container client -- iperf3 -c 127.0.0.1`,
		Args: checkArgs(cobra.MinimumNArgs(2)),
		PreRunE: func(cmd *cobra.Command, args []string) error {
			if cmd.ArgsLenAtDash() != 1 {
				return usagef("usage: nsflow pod exec NAME [--container C] -- CMD [ARGS...]")
			}
			if err := podns.ValidateName(args[0]); err != nil {
				return usageError{err}
			}
			if cmd.Flags().Changed("container") {
				if err := podns.ValidateContainerName(container); err != nil {
					return usageError{fmt.Errorf("--container: %w", err)}
				}
			}
			return nil
		},
		RunE: func(cmd *cobra.Command, args []string) error {
			p, err := podns.Get(*cfg, args[0])
			if err != nil {
				return err
			}
			path, err := exec.LookPath(args[1])
			if err != nil {
				return fmt.Errorf("%s: %w", args[1], err)
			}
			if container != "" {
				return runContainer(p, container, path, args[1:])
			}
			ns, err := netns.GetFromPath(p.NetnsPath)
			if err != nil {
				return fmt.Errorf("pod %s: %w", p.Name, err)
			}
			// The exec'ing thread's namespace is the one the command gets;
			// the process image is replaced, so this thread is never reused.
			runtime.LockOSThread()
			if err := netns.Set(ns); err != nil {
				return fmt.Errorf("enter pod %s: %w", p.Name, err)
			}
			ns.Close()
			return fmt.Errorf("exec %s: %w", path, unix.Exec(path, args[1:], os.Environ()))
		},
	}
	cmd.Flags().StringVar(&container, "container", "", "run in this container's own cgroup (for per-container attribution)")
	return cmd
}

// runContainer runs the command as container c of pod p, waits for it
// (passing signals on) and exits with the command's status; the
// container's cgroup stays until the pod is deleted (a cgroup removed
// cannot be named any more: traffic of a command that has exited would
// lose its container's name).
func runContainer(p *podns.Pod, c, path string, argv []string) error {
	cmd := &exec.Cmd{Path: path, Args: argv, Stdin: os.Stdin, Stdout: os.Stdout, Stderr: os.Stderr}
	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, unix.SIGINT, unix.SIGTERM, unix.SIGHUP, unix.SIGQUIT, unix.SIGUSR1, unix.SIGUSR2)
	defer signal.Stop(sigs)
	if err := p.StartContainer(c, cmd); err != nil {
		podns.RemoveContainer(p.Name, c)
		return fmt.Errorf("start %s in container %s of pod %s: %w", path, c, p.Name, err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	var werr error
wait:
	for {
		select {
		case s := <-sigs:
			cmd.Process.Signal(s)
		case werr = <-done:
			break wait
		}
	}
	var ee *exec.ExitError
	if errors.As(werr, &ee) {
		code := ee.ExitCode()
		if ws, ok := ee.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
			code = 128 + int(ws.Signal())
		}
		os.Exit(code)
	}
	return werr
}
