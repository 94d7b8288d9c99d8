# nsflow — see README.md. Targets that load BPF or create namespaces need root.

GO        ?= go
BIN       := bin/nsflow
PKGS      := ./...
# Debian packages the build, the tests and the demo need (clang only for `make generate`).
DEB_PKGS  := clang llvm libbpf-dev linux-libc-dev bpftool iproute2 iputils-ping iperf3 tcpdump prometheus procps tmux libcap2-bin util-linux systemd docker.io iptables containerd runc containernetworking-plugins
TEST_TIMEOUT ?= 25m

.PHONY: bench-deps all build generate check-generate deps lint test test-unit bench fuzz soak image demo clean

all: build

VERSION   ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
REVISION  ?= $(shell git rev-parse --short HEAD 2>/dev/null || echo unknown)
LDFLAGS   := -X github.com/prometheus/common/version.Version=$(VERSION) -X github.com/prometheus/common/version.Revision=$(REVISION)

## build: the static nsflow binary (no cgo, no clang: the BPF objects are committed)
build:
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags "$(LDFLAGS)" -o $(BIN) ./cmd/nsflow

## generate: recompile bpf/nsflow.c and regenerate its Go bindings with bpf2go
generate:
	$(GO) generate ./bpf/

## check-generate: fail if the committed bpf2go outputs are stale
check-generate: generate
	@git diff --exit-code -- bpf/ || { echo "bpf2go outputs are stale: run 'make generate' and commit them" >&2; exit 1; }

## deps: install the Debian packages that are missing (needs root and apt)
deps:
	@missing=""; for p in $(DEB_PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing:$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

## lint: go vet and gofmt (the main module and deploy/'s test module)
lint:
	$(GO) vet $(PKGS)
	cd deploy && $(GO) vet ./...
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt needed:\n$$out" >&2; exit 1; fi

## test: everything CI runs (as root): deps, fresh generated code, lint, all tests
test: deps check-generate lint
	$(GO) test -count=1 -timeout $(TEST_TIMEOUT) $(PKGS)
	cd deploy && $(GO) test -count=1 -timeout 10m ./...

## test-unit: the tests without the dependency and generate checks
test-unit:
	$(GO) test -count=1 -timeout $(TEST_TIMEOUT) $(PKGS)

## bench: the benchmarks (figures go to docs/BENCHMARKS.md)
## bench-deps: the tools the benchmarks compare nsflow with
bench-deps: deps
	@for p in softflowd pmacct gnuplot-nox; do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; fi

bench: bench-deps
	$(GO) test -run '^$$' -bench Program -benchtime 200000x -count 5 ./bpf/ | tee docs/bench/bpf.txt
	$(GO) test -run '^$$' -bench StubLoad -benchtime 2000x -count 5 ./bpf/ | tee -a docs/bench/bpf.txt
	$(GO) test -run '^$$' -bench . -benchtime 1x -timeout 60m ./test/bench/ | tee docs/bench/macro.txt
	./test/bench/plot.sh docs/bench/macro.txt docs/scale.png

## fuzz: bounded fuzzing of every parser (FUZZTIME per target; a count such
## as 100000x, because time budgets hit a race in Go 1.26's fuzz coordinator)
FUZZTIME ?= 100000x
fuzz:
	$(GO) test -run '^$$' -fuzz FuzzProgram -fuzztime $(FUZZTIME) ./bpf/
	$(GO) test -run '^$$' -fuzz FuzzParse -fuzztime $(FUZZTIME) ./collector/filter/
	$(GO) test -run '^$$' -fuzz FuzzParseTarget -fuzztime $(FUZZTIME) ./collector/
	$(GO) test -run '^$$' -fuzz FuzzDecodeFlowKey -fuzztime $(FUZZTIME) ./collector/

## image: the container image (needs a Docker engine)
image: build
	docker build -f deploy/Dockerfile -t nsflow:$(VERSION) -t nsflow:latest bin/

## demo: two pods, traffic between them and inside one of them, traced
demo: deps build
	./test/demo.sh $(BIN)

clean:
	rm -rf bin

## soak: the churn soak at length (SOAK_CYCLES pod create/delete cycles)
SOAK_CYCLES ?= 2000
soak:
	NSFLOW_SOAK_CYCLES=$(SOAK_CYCLES) $(GO) test -count=1 -run 'TestChurnSoak' -v -timeout 60m ./test/e2e/ | tee docs/bench/soak.txt
