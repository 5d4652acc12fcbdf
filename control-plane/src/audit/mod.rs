//! The audit sink (DESIGN §10): Envoy's gRPC access log → bounded queue →
//! batched rows in `mcp_access_log`, with loss detection and retention.
//!
//! ```text
//! Envoy ALS stream ─▶ ingest (AccessLogService) ─▶ AuditSink ═(bounded)═▶ BatchWriter ─▶ Postgres
//!                                                                           │  └▶ mcp_token.last_used_at (≤ 1/min/token)
//!                     SequenceTracker (periodic) ── gaps per (node, VM) ─────┘
//!                     RetentionTask  (periodic) ── delete rows older than N days, in batches
//! ```
//!
//! - [`row`] — one entry → one row (pure).
//! - [`sink`] — the bounded queue with back-pressure.
//! - [`ingest`] — `envoy.service.accesslog.v3.AccessLogService`.
//! - [`writer`] — batched multi-row inserts, late entries, `last_used_at`.
//! - [`gaps`] — sequence tracking and gap rows.
//! - [`retention`] — pruning.
//! - [`metrics`] — counters and gauges for `/metrics`.

pub mod gaps;
pub mod ingest;
pub mod metrics;
pub mod retention;
pub mod row;
pub mod sink;
pub mod summaries;
pub mod writer;

use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::ConfigError;
use ingest::AccessLogIngest;
use metrics::AuditMetrics;

/// Audit settings (environment variables `MCP_AUDIT_*`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditConfig {
    /// Rows older than this many days are deleted (`MCP_AUDIT_RETENTION_DAYS`, 90).
    pub retention_days: u32,
    /// How often retention runs (`MCP_AUDIT_RETENTION_INTERVAL_SECONDS`, 3600).
    pub retention_interval: Duration,
    /// Rows per retention DELETE (`MCP_AUDIT_RETENTION_BATCH`, 5000).
    pub retention_batch: u32,
    /// Rows the queue holds before ingest waits (`MCP_AUDIT_QUEUE_CAPACITY`, 10000).
    pub queue_capacity: usize,
    /// Most rows per insert (`MCP_AUDIT_BATCH_ROWS`, 1000).
    pub batch_rows: usize,
    /// How long a missing sequence number may stay missing before it is a
    /// gap (`MCP_AUDIT_GAP_GRACE_SECONDS`, 300: longer than the 120 s route
    /// timeout plus Envoy's log flush interval).
    pub gap_grace: Duration,
    /// How often gaps are checked (`MCP_AUDIT_GAP_CHECK_SECONDS`, 5).
    pub gap_check_interval: Duration,
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self {
            retention_days: 90,
            retention_interval: Duration::from_secs(3600),
            retention_batch: 5000,
            queue_capacity: 10_000,
            batch_rows: 1000,
            gap_grace: Duration::from_secs(300),
            gap_check_interval: Duration::from_secs(5),
        }
    }
}

impl AuditConfig {
    /// Reads the `MCP_AUDIT_*` variables through `get` (blank means unset).
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let d = Self::default();
        let n = |var: &str, default: u64, min: u64, max: u64| -> Result<u64, ConfigError> {
            match get(var).filter(|v| !v.trim().is_empty()) {
                None => Ok(default),
                Some(v) => match v.trim().parse::<u64>() {
                    Ok(x) if (min..=max).contains(&x) => Ok(x),
                    _ => Err(ConfigError(format!("{var} must be an integer between {min} and {max}"))),
                },
            }
        };
        Ok(Self {
            retention_days: n("MCP_AUDIT_RETENTION_DAYS", d.retention_days.into(), 1, 3650)? as u32,
            retention_interval: Duration::from_secs(n(
                "MCP_AUDIT_RETENTION_INTERVAL_SECONDS",
                d.retention_interval.as_secs(),
                1,
                86_400,
            )?),
            retention_batch: n("MCP_AUDIT_RETENTION_BATCH", d.retention_batch.into(), 1, 1_000_000)? as u32,
            queue_capacity: n("MCP_AUDIT_QUEUE_CAPACITY", d.queue_capacity as u64, 1, 1_000_000)? as usize,
            batch_rows: n("MCP_AUDIT_BATCH_ROWS", d.batch_rows as u64, 1, 10_000)? as usize,
            gap_grace: Duration::from_secs(n("MCP_AUDIT_GAP_GRACE_SECONDS", d.gap_grace.as_secs(), 0, 86_400)?),
            gap_check_interval: Duration::from_secs(n(
                "MCP_AUDIT_GAP_CHECK_SECONDS",
                d.gap_check_interval.as_secs(),
                1,
                3600,
            )?),
        })
    }
}

/// The running background part: writer, gap detector, retention.
pub struct AuditTasks {
    writer: JoinHandle<()>,
    periodic: Vec<JoinHandle<()>>,
}

/// Starts the audit pipeline; returns the gRPC service to add to the
/// listener and the tasks to [`finish`](AuditTasks::finish) at shutdown.
pub fn start(
    pool: PgPool,
    config: &AuditConfig,
    metrics: Arc<AuditMetrics>,
    shutdown: watch::Receiver<bool>,
) -> (AccessLogIngest, AuditTasks) {
    let (sink, queue) = sink::bounded(config.queue_capacity, metrics.clone());
    let writer = writer::BatchWriter::new(pool.clone(), queue, metrics.clone(), config.batch_rows);
    let writer = tokio::spawn(writer.run(shutdown.clone()));
    let tracker = gaps::SequenceTracker::new(pool.clone(), metrics.clone(), config.gap_grace);
    let retention = retention::RetentionTask::new(pool, metrics.clone(), config.retention_days, config.retention_batch);
    let periodic = vec![
        tokio::spawn(tracker.run(config.gap_check_interval, shutdown.clone())),
        tokio::spawn(retention.run(config.retention_interval, shutdown.clone())),
    ];
    (AccessLogIngest::new(sink, metrics, shutdown), AuditTasks { writer, periodic })
}

impl AuditTasks {
    /// After the gRPC server stopped (its ingest streams, and so every
    /// sink, are gone): waits up to `timeout` for the writer to drain the
    /// queue, then stops the periodic tasks.
    pub async fn finish(self, timeout: Duration) {
        if tokio::time::timeout(timeout, self.writer).await.is_err() {
            tracing::warn!("audit writer did not drain in time; queued rows will show as gaps");
        }
        for task in self.periodic {
            task.abort();
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    #[test]
    fn config_defaults_and_errors() {
        let c = AuditConfig::from_lookup(|_| None).unwrap();
        assert_eq!(c, AuditConfig::default());
        assert_eq!(c.retention_days, 90);
        let m = HashMap::from([("MCP_AUDIT_RETENTION_DAYS", "7"), ("MCP_AUDIT_GAP_GRACE_SECONDS", "0")]);
        let c = AuditConfig::from_lookup(|k| m.get(k).map(|v| v.to_string())).unwrap();
        assert_eq!((c.retention_days, c.gap_grace), (7, Duration::ZERO));
        let e = AuditConfig::from_lookup(|k| (k == "MCP_AUDIT_QUEUE_CAPACITY").then(|| "0".to_string())).unwrap_err();
        assert!(e.0.contains("MCP_AUDIT_QUEUE_CAPACITY"));
    }
}
