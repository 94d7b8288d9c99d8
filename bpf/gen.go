// Package bpf holds nsflow's TC programs (nsflow.c) and the Go bindings that
// bpf2go generates for them. The generated nsflow_bpfel.go and nsflow_bpfel.o
// are committed, so building nsflow needs no clang; `make generate` rebuilds
// them with the compiler $BPF_CLANG names (the Makefile pins it: clang-14,
// Debian 12's 14.0.6); an unset BPF_CLANG fails with "no compiler specified"
// rather than compiling with whatever clang is first on the PATH.
package bpf

//go:generate go tool bpf2go -cc $BPF_CLANG -tags linux -target bpfel -type obs_key -type counters -type flow_key -type flow_val -type container_key -type flow_event -type direction -type link -type stat -type parse_result -type consts Nsflow nsflow.c -- -I./include -I/usr/include/x86_64-linux-gnu -I/usr/include/aarch64-linux-gnu -O2 -g -Wall -Werror
