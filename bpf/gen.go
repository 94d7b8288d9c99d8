// Package bpf holds nsflow's TC programs (nsflow.c) and the Go bindings that
// bpf2go generates for them. The generated nsflow_bpfel.go and nsflow_bpfel.o
// are committed, so building nsflow needs no clang; `make generate` rebuilds
// them.
package bpf

//go:generate go tool bpf2go -tags linux -target bpfel -type obs_key -type counters -type flow_key -type flow_val -type flow_event -type direction -type stat Nsflow nsflow.c -- -I./include -I/usr/include/x86_64-linux-gnu -I/usr/include/aarch64-linux-gnu -O2 -g -Wall -Werror
