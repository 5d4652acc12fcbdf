#!/usr/bin/env bash
# The wasm test layer (DESIGN §13.2): the filter core's unit and property
# tests compiled for wasm32-unknown-unknown (32-bit usize, wasm arithmetic,
# the same sha2/serde code paths as the shipped filter) and run under Node by
# wasm-bindgen-test-runner. Fails unless every test that runs natively also
# ran, and passed, in wasm: a test cannot silently drop out of this layer.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.tools/wasm-bindgen/bin:$PATH"
native=$(cargo test -q -p mcp-filter-core --lib -- --list 2>/dev/null | grep -c ': test$')
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test -p mcp-filter-core --lib --target wasm32-unknown-unknown 2>&1 | tee "$log" | grep -E '^(test result|running|error)' || true
passed=$(grep -oE 'test result: ok\. [0-9]+ passed' "$log" | grep -oE '[0-9]+' | head -n1 || true)
if [ "${passed:-0}" != "$native" ]; then
  echo "[test-wasm] FAILED: ${passed:-0} of $native core tests passed on wasm32-unknown-unknown" >&2
  tail -n 40 "$log" >&2
  exit 1
fi
echo "[test-wasm] $passed of $native core tests passed on wasm32-unknown-unknown under Node $(node --version)"
