//! Configuration of the control plane, read once from environment variables.
//!
//! Every error names the offending variable and never contains its value,
//! so secrets (database URL, snapshot secret) are never echoed.

use std::net::SocketAddr;
use std::time::Duration;

use mcp_filter_core::route::Class;
use mcp_filter_core::snapshot::Limits;

/// Everything the control plane needs to run.
#[derive(Clone)]
pub struct Config {
    pub database_url: String,
    pub http_addr: SocketAddr,
    pub internal_addr: SocketAddr,
    /// gRPC listener: the rate-limit service (and other Envoy services).
    pub grpc_addr: SocketAddr,
    /// Redis of the rate-limit windows. Never logged (may hold a password).
    /// `REDIS_URL`: one URL, or the comma-separated seed nodes of a cluster.
    pub redis_url: String,
    /// Whether `redis_url` names a Redis Cluster.
    pub redis_cluster: bool,
    /// Longest one rate-limit decision may wait for Redis.
    pub redis_timeout: Duration,
    pub snapshot_secret: String,
    /// Credential Envoy and the filter present on the gRPC listener
    /// (`MCP_GRPC_SECRET`, default: the snapshot secret). Never logged.
    pub grpc_secret: String,
    /// InfraBox's RSA public key (PEM), verifies session JWTs.
    pub infrabox_public_key_pem: Vec<u8>,
    pub limits: Limits,
    pub scope_refresh: Duration,
    pub max_tokens_per_user: i64,
    pub max_expiry_days: i64,
    /// InfraBox's API base URL (upstream credentials are minted there).
    pub infrabox_url: String,
    /// AES-256-GCM key of stored upstream credentials, and the previous
    /// one during a key rotation. Never logged.
    pub credential_key: [u8; 32],
    pub credential_key_previous: Option<[u8; 32]>,
    /// The audit sink: queue, batches, gap detection, retention.
    pub audit: crate::audit::AuditConfig,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("http_addr", &self.http_addr)
            .field("internal_addr", &self.internal_addr)
            .field("grpc_addr", &self.grpc_addr)
            .field("redis_timeout", &self.redis_timeout)
            .field("limits", &self.limits)
            .field("scope_refresh", &self.scope_refresh)
            .field("max_tokens_per_user", &self.max_tokens_per_user)
            .field("max_expiry_days", &self.max_expiry_days)
            .field("infrabox_url", &self.infrabox_url)
            .field("audit", &self.audit)
            .finish_non_exhaustive()
    }
}

/// A configuration problem; the text names the variable, never its value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError(pub String);

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

impl Config {
    /// Reads the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    /// Reads configuration through `get` (the environment, or a map in tests).
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let get = |k: &str| get(k).filter(|v| !v.trim().is_empty());
        let database_url = get("DATABASE_URL").ok_or_else(|| missing("DATABASE_URL"))?;
        let http_addr = addr(get("MCP_HTTP_ADDR"), "MCP_HTTP_ADDR", "127.0.0.1:9000")?;
        let internal_addr = addr(get("MCP_INTERNAL_ADDR"), "MCP_INTERNAL_ADDR", "127.0.0.1:9001")?;
        let grpc_addr = addr(get("MCP_GRPC_ADDR"), "MCP_GRPC_ADDR", "127.0.0.1:9002")?;
        let redis_url = get("REDIS_URL").unwrap_or_else(|| "redis://127.0.0.1:6379/".into()).trim().to_string();
        // Several comma-separated URLs (or MCP_REDIS_CLUSTER=true) name the
        // seed nodes of a Redis Cluster.
        let seeds: Vec<&str> = redis_url.split(',').map(str::trim).collect();
        let redis_cluster = seeds.len() > 1 || flag(get("MCP_REDIS_CLUSTER"), "MCP_REDIS_CLUSTER")?;
        let schemes: &[&str] = if redis_cluster { &["redis://", "rediss://"] } else { &["redis://", "rediss://", "redis+unix://", "unix://"] };
        if !seeds.iter().all(|u| schemes.iter().any(|s| u.starts_with(s))) {
            return Err(ConfigError(if redis_cluster {
                "REDIS_URL must list redis:// or rediss:// URLs of cluster nodes, separated by commas".into()
            } else {
                "REDIS_URL must be a redis://, rediss:// or unix:// URL".into()
            }));
        }
        let redis_timeout = number(get("MCP_REDIS_TIMEOUT_MS"), "MCP_REDIS_TIMEOUT_MS", 250, 1, 60_000)?;
        let snapshot_secret = get("MCP_SNAPSHOT_SECRET").ok_or_else(|| missing("MCP_SNAPSHOT_SECRET"))?;
        if snapshot_secret.chars().count() < 16 {
            return Err(ConfigError("MCP_SNAPSHOT_SECRET must be at least 16 characters".into()));
        }
        let grpc_secret = get("MCP_GRPC_SECRET").unwrap_or_else(|| snapshot_secret.clone());
        if grpc_secret.chars().count() < 16 {
            return Err(ConfigError("MCP_GRPC_SECRET must be at least 16 characters".into()));
        }
        let infrabox_public_key_pem = match (get("INFRABOX_PUBLIC_KEY"), get("INFRABOX_PUBLIC_KEY_PATH")) {
            (Some(pem), _) => pem.into_bytes(),
            (None, Some(path)) => std::fs::read(&path).map_err(|e| {
                ConfigError(format!("INFRABOX_PUBLIC_KEY_PATH: cannot read the file: {}", e.kind()))
            })?,
            (None, None) => {
                return Err(ConfigError("INFRABOX_PUBLIC_KEY or INFRABOX_PUBLIC_KEY_PATH is required".into()))
            }
        };
        let window_seconds = number(get("MCP_LIMIT_WINDOW_SECONDS"), "MCP_LIMIT_WINDOW_SECONDS", 60, 1, 86_400)?;
        let mut classes = std::collections::BTreeMap::new();
        for (class, var, default) in [
            (Class::Log, "MCP_LIMIT_LOG", 10),
            (Class::Artifact, "MCP_LIMIT_ARTIFACT", 10),
            (Class::Write, "MCP_LIMIT_WRITE", 5),
            (Class::Default, "MCP_LIMIT_DEFAULT", 30),
        ] {
            classes.insert(class, number(get(var), var, default, 0, 1_000_000)? as u32);
        }
        let scope_refresh = number(get("MCP_SCOPE_REFRESH_SECONDS"), "MCP_SCOPE_REFRESH_SECONDS", 30, 1, 86_400)?;
        let max_tokens_per_user = number(get("MCP_MAX_TOKENS_PER_USER"), "MCP_MAX_TOKENS_PER_USER", 20, 1, 10_000)?;
        let max_expiry_days = number(get("MCP_MAX_EXPIRY_DAYS"), "MCP_MAX_EXPIRY_DAYS", 365, 1, 3650)?;
        let infrabox_url = get("INFRABOX_URL").ok_or_else(|| missing("INFRABOX_URL"))?;
        let infrabox_url = infrabox_url.trim().trim_end_matches('/').to_string();
        if !(infrabox_url.starts_with("http://") || infrabox_url.starts_with("https://")) || infrabox_url.contains(['?', '#', '@']) {
            return Err(ConfigError("INFRABOX_URL must be an http:// or https:// base URL without credentials or query".into()));
        }
        let credential_key = key(get("MCP_CREDENTIAL_KEY"), get("MCP_CREDENTIAL_KEY_PATH"), "MCP_CREDENTIAL_KEY")?
            .ok_or_else(|| missing("MCP_CREDENTIAL_KEY (or MCP_CREDENTIAL_KEY_PATH)"))?;
        let credential_key_previous =
            key(get("MCP_CREDENTIAL_KEY_PREVIOUS"), get("MCP_CREDENTIAL_KEY_PREVIOUS_PATH"), "MCP_CREDENTIAL_KEY_PREVIOUS")?;
        Ok(Self {
            database_url,
            http_addr,
            internal_addr,
            grpc_addr,
            redis_url,
            redis_cluster,
            redis_timeout: Duration::from_millis(redis_timeout),
            snapshot_secret,
            grpc_secret,
            infrabox_public_key_pem,
            limits: Limits { window_seconds: window_seconds as u32, classes },
            scope_refresh: Duration::from_secs(scope_refresh),
            max_tokens_per_user: max_tokens_per_user as i64,
            max_expiry_days: max_expiry_days as i64,
            infrabox_url,
            credential_key,
            credential_key_previous,
            audit: crate::audit::AuditConfig::from_lookup(get)?,
        })
    }
}

/// A 32-byte key as 64 hex characters, inline or in a file.
fn key(inline: Option<String>, path: Option<String>, var: &str) -> Result<Option<[u8; 32]>, ConfigError> {
    let text = match (inline, path) {
        (Some(v), _) => v,
        (None, Some(p)) => std::fs::read_to_string(&p)
            .map_err(|e| ConfigError(format!("{var}_PATH: cannot read the file: {}", e.kind())))?,
        (None, None) => return Ok(None),
    };
    crate::credential::cipher::parse_key(&text)
        .map(Some)
        .ok_or_else(|| ConfigError(format!("{var} must be 64 hex characters (32 bytes)")))
}

fn flag(value: Option<String>, var: &str) -> Result<bool, ConfigError> {
    match value.as_deref().map(str::trim) {
        None => Ok(false),
        Some("1" | "true" | "yes") => Ok(true),
        Some("0" | "false" | "no") => Ok(false),
        Some(_) => Err(ConfigError(format!("{var} must be true or false"))),
    }
}

fn missing(var: &str) -> ConfigError {
    ConfigError(format!("{var} is required"))
}

fn addr(value: Option<String>, var: &str, default: &str) -> Result<SocketAddr, ConfigError> {
    value
        .as_deref()
        .unwrap_or(default)
        .trim()
        .parse()
        .map_err(|_| ConfigError(format!("{var} must be a socket address such as {default}")))
}

fn number(value: Option<String>, var: &str, default: u64, min: u64, max: u64) -> Result<u64, ConfigError> {
    let Some(v) = value else { return Ok(default) };
    match v.trim().parse::<u64>() {
        Ok(n) if (min..=max).contains(&n) => Ok(n),
        _ => Err(ConfigError(format!("{var} must be an integer between {min} and {max}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn base() -> HashMap<&'static str, String> {
        HashMap::from([
            ("DATABASE_URL", "postgres://u:pw@h/db".to_string()),
            ("MCP_SNAPSHOT_SECRET", "0123456789abcdef-secret".to_string()),
            ("INFRABOX_PUBLIC_KEY", "-----BEGIN PUBLIC KEY-----".to_string()),
            ("INFRABOX_URL", "http://infrabox-api:8080/".to_string()),
            ("MCP_CREDENTIAL_KEY", "0f".repeat(32)),
        ])
    }

    fn load(m: &HashMap<&'static str, String>) -> Result<Config, ConfigError> {
        Config::from_lookup(|k| m.get(k).cloned())
    }

    #[test]
    fn the_grpc_secret_defaults_to_the_snapshot_secret() {
        let c = load(&base()).unwrap();
        assert_eq!(c.grpc_secret, c.snapshot_secret);
        let mut m = base();
        m.insert("MCP_GRPC_SECRET", "another-secret-of-enough-length".into());
        assert_eq!(load(&m).unwrap().grpc_secret, "another-secret-of-enough-length");
        m.insert("MCP_GRPC_SECRET", "short".into());
        let e = load(&m).unwrap_err();
        assert!(e.0.contains("MCP_GRPC_SECRET") && !e.0.contains("short"), "{e}");
    }

    #[test]
    fn defaults() {
        let c = load(&base()).unwrap();
        assert_eq!(c.http_addr.to_string(), "127.0.0.1:9000");
        assert_eq!(c.internal_addr.to_string(), "127.0.0.1:9001");
        assert_eq!(c.grpc_addr.to_string(), "127.0.0.1:9002");
        assert_eq!(c.redis_url, "redis://127.0.0.1:6379/");
        assert_eq!(c.redis_timeout, Duration::from_millis(250));
        assert_eq!(c.limits, Limits::default());
        assert_eq!(c.max_tokens_per_user, 20);
        assert_eq!(c.max_expiry_days, 365);
        assert!(!format!("{c:?}").contains("secret"));
        assert!(!format!("{c:?}").contains(&"0f".repeat(32)));
        assert_eq!(c.infrabox_url, "http://infrabox-api:8080");
        assert_eq!(c.credential_key, [0x0f; 32]);
        assert_eq!(c.credential_key_previous, None);
    }

    #[test]
    fn several_redis_urls_name_a_cluster() {
        let mut m = base();
        m.insert("REDIS_URL", "redis://10.0.0.1:7000, redis://10.0.0.2:7000".into());
        let c = load(&m).unwrap();
        assert!(c.redis_cluster);
        m.insert("REDIS_URL", "redis://10.0.0.1:7000".into());
        assert!(!load(&m).unwrap().redis_cluster);
        m.insert("MCP_REDIS_CLUSTER", "true".into());
        assert!(load(&m).unwrap().redis_cluster);
        m.insert("MCP_REDIS_CLUSTER", "maybe".into());
        assert!(load(&m).unwrap_err().0.contains("MCP_REDIS_CLUSTER"));
        m.remove("MCP_REDIS_CLUSTER");
        m.insert("REDIS_URL", "redis://:pw-secret@a:7000,unix:///tmp/r.sock".into());
        let e = load(&m).unwrap_err().0;
        assert!(e.contains("cluster nodes") && !e.contains("pw-secret"), "{e}");
    }

    #[test]
    fn redis_url_is_checked_and_never_shown() {
        let mut m = base();
        m.insert("REDIS_URL", "redis://:hunter2-pw@cache:6379/0".into());
        let c = load(&m).unwrap();
        assert!(!format!("{c:?}").contains("hunter2"));
        m.insert("REDIS_URL", "http://:hunter2-pw@cache".into());
        let e = load(&m).unwrap_err().0;
        assert!(e.contains("REDIS_URL") && !e.contains("hunter2"), "{e}");
        m.insert("REDIS_URL", "redis://cache".into());
        m.insert("MCP_GRPC_ADDR", "nope".into());
        assert!(load(&m).unwrap_err().0.contains("MCP_GRPC_ADDR"));
    }

    #[test]
    fn errors_name_the_variable_not_the_value() {
        let mut m = base();
        m.insert("MCP_SNAPSHOT_SECRET", "short-pw".into());
        let e = load(&m).unwrap_err().0;
        assert!(e.contains("MCP_SNAPSHOT_SECRET") && !e.contains("short-pw"));
        let mut m = base();
        m.remove("DATABASE_URL");
        assert!(load(&m).unwrap_err().0.contains("DATABASE_URL"));
        let mut m = base();
        m.insert("MCP_LIMIT_WRITE", "x".into());
        assert!(load(&m).unwrap_err().0.contains("MCP_LIMIT_WRITE"));
        let mut m = base();
        m.remove("INFRABOX_PUBLIC_KEY");
        assert!(load(&m).unwrap_err().0.contains("INFRABOX_PUBLIC_KEY"));
        let mut m = base();
        m.insert("MCP_CREDENTIAL_KEY", "0f".repeat(31));
        let e = load(&m).unwrap_err().0;
        assert!(e.contains("MCP_CREDENTIAL_KEY") && !e.contains(&"0f".repeat(31)));
        let mut m = base();
        m.remove("MCP_CREDENTIAL_KEY");
        assert!(load(&m).unwrap_err().0.contains("MCP_CREDENTIAL_KEY"));
        let mut m = base();
        m.insert("INFRABOX_URL", "ftp://x".into());
        assert!(load(&m).unwrap_err().0.contains("INFRABOX_URL"));
        let mut m = base();
        m.insert("MCP_HTTP_ADDR", "nope".into());
        assert!(load(&m).unwrap_err().0.contains("MCP_HTTP_ADDR"));
    }
}
