# InfraBox MCP gateway. `make run` starts the whole system locally;
# `make test` runs every test. Both install what they need first.
SHELL := /bin/bash
CARGO ?= cargo
ENVOY_VERSION ?= 1.40.0
# The oldest supported Envoy (README "Supported versions"): installed too,
# and the gateway and surface suites run against it as well.
ENVOY_OLDEST ?= 1.36.2
WASM := target/wasm32-wasip1/release/mcp_filter.wasm
export ENVOY_VERSION
export EXTRA_ENVOY_VERSIONS ?= $(ENVOY_OLDEST)
# Where the end-to-end suites run Envoy: process, container or auto
# (tests/src/container.rs). The container variant of the core scenarios is
# tests/tests/containers.rs, which always uses containers when Docker answers.
export MCP_E2E_RUNTIME ?= process
export MCP_FILTER_WASM := $(CURDIR)/$(WASM)
export MCP_CONTROL_PLANE_BIN := $(CURDIR)/target/debug/mcp-control-plane

.PHONY: deps wasm build images validate test test-wasm drills soak test-unit test-e2e run lint clean bench bench-smoke fuzz

deps:
	@bash scripts/install-deps.sh

wasm: deps
	$(CARGO) build -p mcp-filter --target wasm32-wasip1 --release
	@ls -l $(WASM) | awk '{print "mcp_filter.wasm: " $$5 " bytes"}'

build: wasm
	$(CARGO) build -p mcp-control-plane -p mcp-gateway-tests --bins

lint:
	$(CARGO) clippy -p mcp-filter-core -p mcp-filter --target wasm32-wasip1 -- -D warnings

# Container images built from the binaries above, without a registry
# (docker/, scripts/build-images.sh): Envoy per tested version, the control
# plane, the filter as an Istio Wasm image.
images: build
	@ENVOY_IMAGE_VERSIONS="$(ENVOY_VERSION) $(ENVOY_OLDEST)" bash scripts/build-images.sh

# The wasm test layer (DESIGN §13.2): the core's tests on
# wasm32-unknown-unknown under Node; every native test must pass there too.
test-wasm: deps
	bash scripts/test-wasm.sh

# envoy --mode validate on every shipped/generated Envoy config, schema and
# cross-checks of the Istio manifests (also part of `make test`).
validate: build
	$(CARGO) test -p mcp-gateway-tests --test configs

# Unit tests first (fast; the core's also on wasm32 under Node), then the end-to-end suite against real Envoy,
# Postgres and Redis started by the harness on free ports — with the core
# scenarios also in containers when a Docker engine answers — then the
# gateway and surface suites against the oldest supported Envoy.
CONTAINER_NOTE := target/container-variant.txt
test: build
	$(CARGO) test -p mcp-filter-core -p mcp-control-plane
	bash scripts/test-wasm.sh
	@if v=$$(docker version --format '{{.Server.Version}}' 2>&1); then \
	  echo "[test] container variant: tests/tests/containers.rs runs auth, isolation, forward and revoke with Envoy $(ENVOY_VERSION) in a container (Docker Engine $$v)" > $(CONTAINER_NOTE); \
	  ENVOY_IMAGE_VERSIONS="$(ENVOY_VERSION) $(ENVOY_OLDEST)" bash scripts/build-images.sh; \
	else \
	  echo "[test] container variant SKIPPED: no Docker engine answers ($$(printf '%s' "$$v" | tail -n1)); the end-to-end suites run with Envoy as a process only" > $(CONTAINER_NOTE); \
	fi && cat $(CONTAINER_NOTE)
	$(CARGO) test -p mcp-gateway-tests -- --test-threads=4
	@echo "[test] Envoy $(ENVOY_OLDEST), the oldest supported: gateway, surface, attacks and MCP endpoint suites"
	ENVOY_VERSION=$(ENVOY_OLDEST) $(CARGO) test -p mcp-gateway-tests --test gateway --test surface --test attacks --test mcp_endpoint -- --test-threads=4
	@cat $(CONTAINER_NOTE)

# DESIGN §14, measured in one run: writes bench/results.md and .json.
# Optimized binaries throughout (the control plane's RLS and audit included).
bench: wasm
	@bash scripts/install-deps.sh bench
	$(CARGO) build --profile perf -p mcp-control-plane -p mcp-gateway-tests --bins
	$(CARGO) build --profile perf -p mcp-filter-core --example replay
	MCP_CONTROL_PLANE_BIN=$(CURDIR)/target/perf/mcp-control-plane MCP_BENCH_PROFILE=perf \
	  $(CURDIR)/target/perf/mcp-bench

# A few seconds per case with debug binaries: keeps the benchmark code
# working in CI; asserts only that every case produced numbers.
bench-smoke: build
	@bash scripts/install-deps.sh bench
	$(CARGO) build --profile perf -p mcp-filter-core --example replay
	MCP_BENCH_PROFILE=perf $(CURDIR)/target/debug/mcp-bench --smoke

# Failure drills under load (tests/src/drills.rs): every part killed with
# SIGKILL alone and in pairs, and an Envoy hot restart, while a mixed load
# runs; writes bench/drills.md, fails if a promise broke. `make test` runs
# the short form (tests/tests/drills.rs).
drills: build
	$(CURDIR)/target/debug/mcp-drills $(DRILLS_ARGS)

# A steady mixed load with token churn and collaborator drift, no faults
# (SOAK_SECONDS, default one hour; not in CI): bench/soak.md, .csv, .png.
SOAK_SECONDS ?= 3600
soak: build
	@bash scripts/install-deps.sh soak
	SOAK_SECONDS=$(SOAK_SECONDS) $(CURDIR)/target/debug/mcp-soak
	.tools/plot/bin/python scripts/plot-soak.py bench/soak.csv

# cargo-fuzz targets (fuzz/, nightly): each runs FUZZ_SECONDS (default 60)
# from its seeds; writes bench/fuzz.md. CI runs them a few seconds each so
# they keep building.
FUZZ_SECONDS ?= 60
fuzz:
	@bash scripts/install-deps.sh fuzz
	FUZZ_SECONDS=$(FUZZ_SECONDS) bash scripts/fuzz.sh

run: build
	$(CARGO) run -q -p mcp-gateway-tests --bin mcp-gateway-demo

clean:
	$(CARGO) clean
	rm -rf .run
