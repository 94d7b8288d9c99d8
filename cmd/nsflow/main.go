// Command nsflow observes the traffic of network namespaces with eBPF.
package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"strings"
	"syscall"

	"github.com/spf13/cobra"
)

// Exit codes, decided in one place.
const (
	exitOK    = 0
	exitError = 1
	exitUsage = 2
)

// usageError marks an error caused by the command line: bad flags, bad
// arguments, values out of range. It exits with status 2.
type usageError struct{ err error }

func (e usageError) Error() string { return e.err.Error() }
func (e usageError) Unwrap() error { return e.err }

// usagef returns a usageError with a formatted message.
func usagef(format string, args ...any) error {
	return usageError{fmt.Errorf(format, args...)}
}

func newRootCmd() *cobra.Command {
	root := &cobra.Command{
		Use:   "nsflow",
		Short: "Observe the traffic of every network namespace with eBPF",
		Long: `nsflow counts packets and bytes per network namespace, interface and
direction (including pod-local loopback traffic on lo) and per flow, with TC
eBPF programs attached to every interface of the observed namespaces.`,
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	root.SetFlagErrorFunc(func(_ *cobra.Command, err error) error { return usageError{err} })
	root.AddCommand(newServeCmd(), newTraceCmd(), newTopCmd(), newListCmd(), newPodCmd())
	return root
}

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := newRootCmd().ExecuteContext(ctx)
	stop()
	os.Exit(exitCode(err))
}

// exitCode prints err and maps it to the process's exit status.
func exitCode(err error) int {
	if err != nil {
		fmt.Fprintln(os.Stderr, "nsflow:", err)
	}
	return exitStatus(err)
}

// exitStatus maps an error to the process's exit status.
func exitStatus(err error) int {
	if err == nil {
		return exitOK
	}
	var ue usageError
	if errors.As(err, &ue) || isCobraUsageError(err) {
		return exitUsage
	}
	return exitError
}

// isCobraUsageError recognizes the errors cobra itself returns for a command
// line it cannot parse (it has no typed errors for them).
func isCobraUsageError(err error) bool {
	msg := err.Error()
	for _, p := range []string{"unknown command", "unknown flag", "unknown shorthand flag", "invalid argument", "flag needs an argument"} {
		if strings.HasPrefix(msg, p) {
			return true
		}
	}
	return false
}

// checkArgs wraps a cobra argument validator so that its failures are usage
// errors (exit status 2).
func checkArgs(v cobra.PositionalArgs) cobra.PositionalArgs {
	return func(cmd *cobra.Command, args []string) error {
		if err := v(cmd, args); err != nil {
			return usageError{err}
		}
		return nil
	}
}
