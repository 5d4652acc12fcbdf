# InfraBox MCP gateway. `make run` starts the whole system locally;
# `make test` runs every test. Both install what they need first.
SHELL := /bin/bash
CARGO ?= cargo
ENVOY_VERSION ?= 1.40.0
WASM := target/wasm32-wasip1/release/mcp_filter.wasm
export ENVOY_VERSION
export MCP_FILTER_WASM := $(CURDIR)/$(WASM)
export MCP_CONTROL_PLANE_BIN := $(CURDIR)/target/debug/mcp-control-plane

.PHONY: deps wasm build test test-unit test-e2e run lint clean bench bench-smoke

deps:
	@bash scripts/install-deps.sh

wasm: deps
	$(CARGO) build -p mcp-filter --target wasm32-wasip1 --release
	@ls -l $(WASM) | awk '{print "mcp_filter.wasm: " $$5 " bytes"}'

build: wasm
	$(CARGO) build -p mcp-control-plane -p mcp-gateway-tests --bins

lint:
	$(CARGO) clippy -p mcp-filter-core -p mcp-filter --target wasm32-wasip1 -- -D warnings

# Unit tests first (fast), then the end-to-end suite against real Envoy,
# Postgres and Redis started by the harness on free ports.
test: build
	$(CARGO) test -p mcp-filter-core -p mcp-control-plane
	$(CARGO) test -p mcp-gateway-tests -- --test-threads=4

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
	$(CARGO) build -p mcp-filter-core --example replay
	MCP_BENCH_PROFILE=debug $(CURDIR)/target/debug/mcp-bench --smoke

run: build
	$(CARGO) run -q -p mcp-gateway-tests --bin mcp-gateway-demo

clean:
	$(CARGO) clean
	rm -rf .run
