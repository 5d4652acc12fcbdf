# The gateway's control plane: the `mcp-control-plane` binary with the few
# shared libraries it links (libc, libm, libgcc_s and the loader), an
# /etc/passwd entry for its non-root user and nothing else: no shell, no
# package manager. scripts/build-images.sh stages rootfs/ (the binary is
# stripped; `CONTROL_PLANE_PROFILE=release` packages an optimized build).
#
# Configuration comes from the environment (README "Control-plane
# configuration"); secrets belong in a Kubernetes Secret, mounted as files
# (`*_PATH` variables) or injected as env, never in this image. The three
# listeners default to all interfaces here; the internal one (snapshot,
# /healthz, /metrics) and the gRPC one must only be reachable by the
# ingress gateway (envoy/istio/control-plane.yaml has the NetworkPolicy).
FROM scratch
COPY rootfs/ /
ENV MCP_HTTP_ADDR=0.0.0.0:9000 \
    MCP_INTERNAL_ADDR=0.0.0.0:9001 \
    MCP_GRPC_ADDR=0.0.0.0:9002
EXPOSE 9000 9001 9002
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/mcp-control-plane"]
