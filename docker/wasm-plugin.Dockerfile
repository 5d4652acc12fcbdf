# mcp_filter.wasm as an OCI image in the "compat" layout that Istio's
# WasmPlugin (`url: oci://...`) accepts: exactly one layer, holding
# plugin.wasm at its root. Built by Docker, the layer has the media type
# application/vnd.docker.image.rootfs.diff.tar.gzip once pushed, for which
# the compat specification needs no manifest annotation.
#
# Keep exactly one COPY: every further filesystem instruction would add a
# layer and the image would no longer be a compat image.
FROM scratch
COPY plugin.wasm ./plugin.wasm
