# nsflow — see README.md. Targets that load BPF or create namespaces need root.

GO        ?= go
BIN       := bin/nsflow
PKGS      := ./...
# The BPF compiler `make generate` uses, pinned: the committed nsflow_bpfel.o is
# byte-for-byte what this clang makes of bpf/nsflow.c, and check-generate compares
# bytes. Debian 12's clang-14 (14.0.6); bpf2go strips with the matching
# llvm-strip-14 (from llvm-14). bpf/gen.go passes $BPF_CLANG to bpf2go's -cc.
BPF_CLANG         ?= clang-14
BPF_CLANG_VERSION ?= 14.0.6
BPF_STRIP         := $(patsubst clang%,llvm-strip%,$(BPF_CLANG))
export BPF_CLANG
# bpf2go's own variable for its compiler, in case a -cc flag is missing.
export BPF2GO_CC := $(BPF_CLANG)
# Debian packages the build, the tests and the demo need (clang-14 and llvm-14
# only for `make generate`: exactly the pinned compiler, not Debian's default clang).
DEB_PKGS  := clang-14 llvm-14 libbpf-dev linux-libc-dev bpftool iproute2 iputils-ping iperf3 tcpdump prometheus procps tmux libcap2-bin util-linux systemd docker.io iptables containerd runc containernetworking-plugins
TEST_TIMEOUT ?= 25m

.PHONY: bench-deps all build bpf-clang generate check-generate deps lint test test-unit bench fuzz soak image demo clean

all: build

VERSION   ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
REVISION  ?= $(shell git rev-parse --short HEAD 2>/dev/null || echo unknown)
LDFLAGS   := -X github.com/prometheus/common/version.Version=$(VERSION) -X github.com/prometheus/common/version.Revision=$(REVISION)

## build: the static nsflow binary (no cgo, no clang: the BPF objects are committed)
build:
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags "$(LDFLAGS)" -o $(BIN) ./cmd/nsflow

## bpf-clang: fail unless $(BPF_CLANG) is installed and is version $(BPF_CLANG_VERSION)
bpf-clang:
	@command -v $(BPF_CLANG) >/dev/null || { echo "$(BPF_CLANG) not found: 'make generate' needs clang $(BPF_CLANG_VERSION) as $(BPF_CLANG) (Debian 12: apt-get install clang-14 llvm-14, or 'make deps')" >&2; exit 1; }
	@command -v $(BPF_STRIP) >/dev/null || { echo "$(BPF_STRIP) not found: bpf2go strips with the llvm-strip that matches $(BPF_CLANG) (Debian 12: apt-get install llvm-14)" >&2; exit 1; }
	@v=$$($(BPF_CLANG) --version | head -n1); case "$$v" in \
		*"clang version $(BPF_CLANG_VERSION)"|*"clang version $(BPF_CLANG_VERSION) "*|*"clang version $(BPF_CLANG_VERSION)-"*) ;; \
		*) echo "$(BPF_CLANG) is \"$$v\", but the committed BPF objects are built with clang $(BPF_CLANG_VERSION): install it, or override BPF_CLANG=... BPF_CLANG_VERSION=... knowing that the regenerated objects will differ from the committed ones" >&2; exit 1;; \
	esac

## generate: recompile bpf/nsflow.c and regenerate its Go bindings with bpf2go,
## with the pinned $(BPF_CLANG)
generate: bpf-clang
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
