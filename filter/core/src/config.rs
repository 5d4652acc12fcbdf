//! The filter's plugin configuration (the JSON string in Envoy's
//! `configuration`), validated when Envoy loads it: a configuration that
//! fails here is refused and a running filter keeps its previous one.

use serde::Deserialize;

use crate::authority::Hosts;
use crate::route::RouteTable;

/// Validated plugin configuration.
#[derive(Debug, Clone)]
pub struct PluginConfig {
    /// Envoy cluster of the control plane's internal listener.
    pub snapshot_cluster: String,
    pub snapshot_authority: String,
    pub snapshot_path: String,
    /// Bearer secret of the snapshot endpoint. Never logged.
    pub snapshot_secret: String,
    /// Long-poll wait the filter asks for.
    pub snapshot_wait_seconds: u32,
    pub max_log_bytes: u64,
    pub routes: RouteTable,
    /// Envoy cluster of the rate-limit service (DESIGN §9).
    pub ratelimit_cluster: String,
    /// How long a request waits for the rate-limit service before the
    /// local window decides (milliseconds).
    pub ratelimit_timeout_ms: u32,
    /// The InfraBox host(s): the only hosts with an MCP surface.
    pub hosts: Hosts,
    /// Credential of the gRPC calls to the control plane (DESIGN §16),
    /// sent as `authorization: Bearer …` metadata. Never logged. Defaults
    /// to the snapshot secret.
    pub grpc_secret: String,
    /// Failed authentications per client address and window after which
    /// further failures are answered 429 (per Envoy instance).
    pub auth_failure_limit: u32,
    pub auth_failure_window_seconds: u32,
    /// Identical denials from one address within this many seconds become
    /// one audit row with a count (0: every denial is its own row).
    pub audit_coalesce_seconds: u32,
    /// Confirmed build/job ownerships kept per VM.
    pub ownership_cache_entries: u32,
    /// The MCP endpoint (DESIGN §17): largest JSON-RPC request body (413 past it).
    pub mcp_max_body_bytes: u32,
    /// Largest upstream answer a tool result carries (a tool error past it).
    pub mcp_max_result_bytes: u32,
    /// Largest artifact a tool result embeds (base64; a tool error past it).
    pub mcp_max_artifact_bytes: u32,
    /// Documentation link of the RFC 9728 resource metadata, if any.
    pub documentation_url: Option<String>,
    /// Past this many seconds without the control plane confirming the
    /// snapshot, MCP requests fail closed (503 `policy_stale`): revocations
    /// cannot reach the edge while it is away.
    pub max_policy_age_seconds: u32,
    /// Take only snapshots and deltas whose signature verifies
    /// ([`crate::signature`]; default true). HMAC-SHA256 runs at about
    /// 30 MB/s in Envoy's V8: half a second on a full snapshot of 100 000
    /// tokens (bench/results.md), nothing on the deltas that carry changes.
    pub require_snapshot_signature: bool,
    /// Ask for deltas from the version held (`?delta=1`): a token change
    /// then costs a VM kilobytes, not the whole snapshot (default true).
    pub snapshot_deltas: bool,
    /// The key of the audit's argument digests ([`crate::audit::arguments_key`]
    /// of the gRPC secret). Never logged.
    pub arguments_key: [u8; 32],
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    #[serde(default = "d_cluster")]
    snapshot_cluster: String,
    #[serde(default = "d_authority")]
    snapshot_authority: String,
    #[serde(default = "d_path")]
    snapshot_path: String,
    snapshot_secret: String,
    #[serde(default = "d_wait")]
    snapshot_wait_seconds: u32,
    #[serde(default = "d_max_log")]
    max_log_bytes: u64,
    #[serde(default)]
    routes: Option<serde_json::Value>,
    /// Routes of the table to make available (an InfraBox that serves them).
    #[serde(default)]
    enable_routes: Vec<String>,
    #[serde(default = "d_rl_cluster")]
    ratelimit_cluster: String,
    #[serde(default = "d_rl_timeout")]
    ratelimit_timeout_ms: u32,
    hosts: Vec<String>,
    #[serde(default)]
    grpc_secret: Option<String>,
    #[serde(default = "d_auth_failures")]
    auth_failure_limit: u32,
    #[serde(default = "d_auth_window")]
    auth_failure_window_seconds: u32,
    #[serde(default = "d_coalesce")]
    audit_coalesce_seconds: u32,
    #[serde(default = "d_ownership_cache")]
    ownership_cache_entries: u32,
    #[serde(default = "d_mcp_body")]
    mcp_max_body_bytes: u32,
    #[serde(default = "d_mcp_result")]
    mcp_max_result_bytes: u32,
    #[serde(default = "d_mcp_artifact")]
    mcp_max_artifact_bytes: u32,
    #[serde(default)]
    documentation_url: Option<String>,
    #[serde(default)]
    max_policy_age_seconds: Option<u32>,
    #[serde(default = "d_true")]
    require_snapshot_signature: bool,
    #[serde(default = "d_true")]
    snapshot_deltas: bool,
}

fn d_true() -> bool {
    true
}

fn d_cluster() -> String {
    "mcp_control_plane_internal".into()
}
fn d_authority() -> String {
    "mcp-control-plane".into()
}
fn d_path() -> String {
    "/v1/snapshot".into()
}
fn d_wait() -> u32 {
    20
}
fn d_max_log() -> u64 {
    1 << 20
}
fn d_rl_cluster() -> String {
    "mcp_ratelimit".into()
}
fn d_rl_timeout() -> u32 {
    50
}
fn d_auth_failures() -> u32 {
    20
}
fn d_auth_window() -> u32 {
    60
}
fn d_coalesce() -> u32 {
    10
}
fn d_ownership_cache() -> u32 {
    16_384
}
/// The default maximum policy age: 5 minutes, or three long-poll rounds
/// if those are longer.
fn d_max_policy_age(snapshot_wait_seconds: u32) -> u32 {
    snapshot_wait_seconds.saturating_mul(3).max(300)
}
fn d_mcp_body() -> u32 {
    64 << 10
}
fn d_mcp_result() -> u32 {
    512 << 10
}
fn d_mcp_artifact() -> u32 {
    1 << 20
}

/// Why a configuration was refused. Never contains the snapshot secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError(pub String);

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "invalid plugin configuration: {}", self.0)
    }
}

impl std::error::Error for ConfigError {}

impl PluginConfig {
    pub fn parse(bytes: &[u8]) -> Result<Self, ConfigError> {
        let raw: Raw = serde_json::from_slice(bytes).map_err(|e| ConfigError(redact(e.to_string())))?;
        if raw.snapshot_secret.len() < 16 {
            return Err(ConfigError("snapshot_secret must be at least 16 characters".into()));
        }
        if raw.snapshot_cluster.is_empty() {
            return Err(ConfigError("snapshot_cluster must not be empty".into()));
        }
        if !raw.snapshot_path.starts_with('/') || raw.snapshot_path.contains('?') {
            return Err(ConfigError("snapshot_path must start with / and have no query".into()));
        }
        if raw.snapshot_wait_seconds > 300 {
            return Err(ConfigError("snapshot_wait_seconds must be at most 300".into()));
        }
        if raw.max_log_bytes == 0 {
            return Err(ConfigError("max_log_bytes must be positive".into()));
        }
        if raw.ratelimit_cluster.is_empty() {
            return Err(ConfigError("ratelimit_cluster must not be empty".into()));
        }
        if !(1..=10_000).contains(&raw.ratelimit_timeout_ms) {
            return Err(ConfigError("ratelimit_timeout_ms must be between 1 and 10000".into()));
        }
        let hosts = Hosts::parse(&raw.hosts).map_err(ConfigError)?;
        if raw.grpc_secret.as_ref().is_some_and(|s| s.len() < 16) {
            return Err(ConfigError("grpc_secret must be at least 16 characters".into()));
        }
        if raw.auth_failure_limit == 0 || !(1..=86_400).contains(&raw.auth_failure_window_seconds) {
            return Err(ConfigError(
                "auth_failure_limit must be positive and auth_failure_window_seconds between 1 and 86400".into(),
            ));
        }
        if raw.audit_coalesce_seconds > 3600 {
            return Err(ConfigError("audit_coalesce_seconds must be at most 3600".into()));
        }
        if !(16..=1_000_000).contains(&raw.ownership_cache_entries) {
            return Err(ConfigError("ownership_cache_entries must be between 16 and 1000000".into()));
        }
        if !(1024..=1 << 20).contains(&raw.mcp_max_body_bytes) {
            return Err(ConfigError("mcp_max_body_bytes must be between 1024 and 1048576".into()));
        }
        // Envoy buffers a tool's whole upstream answer and then its result
        // (about twice the answer, base64 4/3) within the connection's
        // buffer limit (4 MiB in the shipped configurations).
        if !(1024..=1 << 20).contains(&raw.mcp_max_result_bytes) || !(1024..=1 << 20).contains(&raw.mcp_max_artifact_bytes) {
            return Err(ConfigError("mcp_max_result_bytes and mcp_max_artifact_bytes must be between 1024 and 1048576".into()));
        }
        if raw.documentation_url.as_deref().is_some_and(|u| !(u.starts_with("https://") || u.starts_with("http://")) || u.len() > 512 || u.contains('"')) {
            return Err(ConfigError("documentation_url must be an http(s) URL of at most 512 bytes".into()));
        }
        // At least a few long-poll rounds, so one slow poll never trips it.
        let min_age = raw.snapshot_wait_seconds.saturating_mul(2).max(10);
        let max_policy_age_seconds = raw.max_policy_age_seconds.unwrap_or_else(|| d_max_policy_age(raw.snapshot_wait_seconds));
        if !(min_age..=86_400).contains(&max_policy_age_seconds) {
            return Err(ConfigError(format!(
                "max_policy_age_seconds must be between {min_age} (twice snapshot_wait_seconds, at least 10) and 86400"
            )));
        }
        let mut routes = match &raw.routes {
            None => RouteTable::default(),
            Some(v) => RouteTable::from_json(v).map_err(|e| ConfigError(e.to_string()))?,
        };
        routes.enable(&raw.enable_routes).map_err(|e| ConfigError(e.to_string()))?;
        let arguments_key = crate::audit::arguments_key(raw.grpc_secret.as_deref().unwrap_or(&raw.snapshot_secret));
        Ok(Self {
            arguments_key,
            snapshot_cluster: raw.snapshot_cluster,
            snapshot_authority: raw.snapshot_authority,
            snapshot_path: raw.snapshot_path,
            snapshot_secret: raw.snapshot_secret.clone(),
            snapshot_wait_seconds: raw.snapshot_wait_seconds,
            max_log_bytes: raw.max_log_bytes,
            routes,
            ratelimit_cluster: raw.ratelimit_cluster,
            ratelimit_timeout_ms: raw.ratelimit_timeout_ms,
            hosts,
            grpc_secret: raw.grpc_secret.unwrap_or_else(|| raw.snapshot_secret.clone()),
            auth_failure_limit: raw.auth_failure_limit,
            auth_failure_window_seconds: raw.auth_failure_window_seconds,
            audit_coalesce_seconds: raw.audit_coalesce_seconds,
            ownership_cache_entries: raw.ownership_cache_entries,
            mcp_max_body_bytes: raw.mcp_max_body_bytes,
            mcp_max_result_bytes: raw.mcp_max_result_bytes,
            mcp_max_artifact_bytes: raw.mcp_max_artifact_bytes,
            documentation_url: raw.documentation_url,
            max_policy_age_seconds,
            require_snapshot_signature: raw.require_snapshot_signature,
            snapshot_deltas: raw.snapshot_deltas,
        })
    }
}

/// serde_json errors quote offending values; keep only the location part.
fn redact(e: String) -> String {
    match e.find(" at line ") {
        Some(i) => {
            let kind = if e.starts_with("missing field") || e.starts_with("unknown field") {
                e.split('`').take(2).collect::<Vec<_>>().join("`") + "`"
            } else {
                "malformed JSON".to_string()
            };
            format!("{kind}{}", e.get(i..).unwrap_or_default())
        }
        None => "malformed JSON".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(all(target_family = "wasm", target_os = "unknown"))]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    type TestResult<T = ()> = Result<T, Box<dyn std::error::Error>>;

    #[test]
    fn minimal_and_invalid_configs() -> TestResult {
        let c = PluginConfig::parse(br#"{"snapshot_secret":"0123456789abcdef","hosts":["infrabox.test"]}"#)?;
        assert_eq!(c.snapshot_cluster, "mcp_control_plane_internal");
        assert_eq!(c.grpc_secret, "0123456789abcdef", "the gRPC secret defaults to the snapshot secret");
        assert!(c.hosts.matches("infrabox.test:443"));
        assert_eq!(c.routes.routes().len(), 20);
        assert_eq!((c.ratelimit_cluster.as_str(), c.ratelimit_timeout_ms), ("mcp_ratelimit", 50));
        let c = PluginConfig::parse(br#"{"snapshot_secret":"0123456789abcdef","hosts":["a"],"ratelimit_timeout_ms":250,"grpc_secret":"fedcba9876543210"}"#)?;
        assert_eq!(c.ratelimit_timeout_ms, 250);
        assert_eq!(c.grpc_secret, "fedcba9876543210");
        for bad in [
            &br#"{}"#[..],
            br#"{"snapshot_secret":"short"}"#,
            br#"{"snapshot_secret":"0123456789abcdef","hosts":["a"],"bogus":1}"#,
            br#"{"snapshot_secret":"0123456789abcdef","hosts":["a"],"routes":[]}"#,
            br#"{"snapshot_secret":"0123456789abcdef","hosts":["a"],"snapshot_wait_seconds":1000}"#,
            br#"{"snapshot_secret":"0123456789abcdef","hosts":["a"],"ratelimit_timeout_ms":0}"#,
            br#"{"snapshot_secret":"0123456789abcdef","hosts":["a"],"ratelimit_timeout_ms":60000}"#,
            br#"{"snapshot_secret":"0123456789abcdef","hosts":["a"],"ratelimit_cluster":""}"#,
            br#"{"snapshot_secret":"0123456789abcdef"}"#,
            br#"{"snapshot_secret":"0123456789abcdef","hosts":[]}"#,
            br#"{"snapshot_secret":"0123456789abcdef","hosts":["https://infrabox.test"]}"#,
            br#"{"snapshot_secret":"0123456789abcdef","hosts":["a"],"grpc_secret":"short"}"#,
            br#"{"snapshot_secret":"0123456789abcdef","hosts":["a"],"auth_failure_limit":0}"#,
            br#"{"snapshot_secret":"0123456789abcdef","hosts":["a"],"enable_routes":["no.such.route"]}"#,
            b"not json",
        ] {
            assert!(PluginConfig::parse(bad).is_err());
        }
        let Err(e) = PluginConfig::parse(br#"{"snapshot_secret":12345678901234567890}"#) else { return Err("accepted".into()) };
        assert!(!e.0.contains("12345678901234567890"), "{e}");
        let Err(e) = PluginConfig::parse(br#"{"snapshot_secret":"0123456789abcdef","hosts":["a"],"routes":[{"name":"x"}]}"#) else {
            return Err("accepted".into());
        };
        assert!(e.0.contains("route"), "{e}");
        Ok(())
    }
}
