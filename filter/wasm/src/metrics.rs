//! The filter's Envoy metrics (exported by Envoy under `wasmcustom.`).

use proxy_wasm::hostcalls;
use proxy_wasm::types::MetricType;

/// Metric ids, defined once per VM; 0 means "could not define" and is
/// skipped silently.
#[derive(Debug, Clone, Copy, Default)]
pub struct Metrics {
    pub snapshot_updates: u32,
    pub snapshot_errors: u32,
    pub snapshot_rejected: u32,
    pub snapshot_age_seconds: u32,
    pub snapshot_tokens: u32,
    /// How long compiling the last applied snapshot took, in ms.
    pub snapshot_apply_ms: u32,
    /// Snapshots applied as deltas, and the bytes of every snapshot and
    /// delta body this VM took (what a token change costs it).
    pub snapshot_deltas: u32,
    pub snapshot_bytes: u32,
    /// This VM's linear memory, in bytes.
    pub vm_memory_bytes: u32,
    pub requests_allowed: u32,
    pub requests_denied: u32,
    /// Rate-limit decisions: admitted, refused (429), made by the local
    /// window because the service could not answer, and service failures.
    pub ratelimit_allowed: u32,
    pub ratelimit_limited: u32,
    pub ratelimit_degraded: u32,
    pub ratelimit_rls_errors: u32,
    /// Failed authentications answered 429 (the address's budget was spent).
    pub auth_failures_limited: u32,
    /// Denials counted into a coalesced audit row instead of their own.
    pub audit_coalesced: u32,
    /// Coalesced rows sent to the control plane, and dropped unsent.
    pub audit_summaries_sent: u32,
    pub audit_summaries_dropped: u32,
    /// Requests whose build or job belongs to another project (or none).
    pub ownership_refuted: u32,
    /// JSON-RPC messages the MCP endpoint read.
    pub mcp_messages: u32,
}

impl Metrics {
    pub fn define() -> Self {
        let c = |n: &str| hostcalls::define_metric(MetricType::Counter, n).unwrap_or(0);
        let g = |n: &str| hostcalls::define_metric(MetricType::Gauge, n).unwrap_or(0);
        Self {
            snapshot_updates: c("mcp_snapshot_updates"),
            snapshot_errors: c("mcp_snapshot_errors"),
            snapshot_rejected: c("mcp_snapshot_rejected"),
            snapshot_age_seconds: g("mcp_snapshot_age_seconds"),
            snapshot_tokens: g("mcp_snapshot_tokens"),
            snapshot_apply_ms: g("mcp_snapshot_apply_ms"),
            snapshot_deltas: c("mcp_snapshot_deltas"),
            snapshot_bytes: c("mcp_snapshot_bytes"),
            vm_memory_bytes: g("mcp_vm_memory_bytes"),
            requests_allowed: c("mcp_requests_allowed"),
            requests_denied: c("mcp_requests_denied"),
            ratelimit_allowed: c("mcp_ratelimit_allowed"),
            ratelimit_limited: c("mcp_ratelimit_limited"),
            ratelimit_degraded: c("mcp_ratelimit_degraded"),
            ratelimit_rls_errors: c("mcp_ratelimit_rls_errors"),
            auth_failures_limited: c("mcp_auth_failures_limited"),
            audit_coalesced: c("mcp_audit_coalesced"),
            audit_summaries_sent: c("mcp_audit_summaries_sent"),
            audit_summaries_dropped: c("mcp_audit_summaries_dropped"),
            ownership_refuted: c("mcp_ownership_refuted"),
            mcp_messages: c("mcp_endpoint_messages"),
        }
    }

    pub fn inc(id: u32) {
        Self::add(id, 1);
    }

    pub fn add(id: u32, n: i64) {
        if id != 0 && n != 0 {
            let _ = hostcalls::increment_metric(id, n);
        }
    }

    /// Records the VM's current linear memory size.
    pub fn record_memory(self) {
        #[cfg(target_arch = "wasm32")]
        Self::set(self.vm_memory_bytes, (core::arch::wasm32::memory_size(0) as u64) * 65_536);
    }

    pub fn set(id: u32, value: u64) {
        if id != 0 {
            let _ = hostcalls::record_metric(id, value);
        }
    }
}
