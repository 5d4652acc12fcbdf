//! `RetentionTask`: deletes audit rows older than the configured number of
//! days (default 90) in batches, so no single statement holds locks for
//! long; also old gap rows, and streams that went quiet that long ago with
//! nothing left to settle.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::metrics::AuditMetrics;

/// The periodic pruner.
pub struct RetentionTask {
    pool: sqlx::PgPool,
    metrics: Arc<AuditMetrics>,
    days: u32,
    batch: i64,
}

impl RetentionTask {
    pub fn new(pool: sqlx::PgPool, metrics: Arc<AuditMetrics>, days: u32, batch: u32) -> Self {
        Self { pool, metrics, days, batch: i64::from(batch.max(1)) }
    }

    /// Prunes now and then every `interval` until shutdown.
    pub async fn run(self, interval: Duration, mut shutdown: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.wait_for(|stop| *stop) => return,
            }
            match self.prune(&shutdown).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(rows = n, days = self.days, "audit retention deleted old rows"),
                Err(e) => tracing::warn!(error = %e, "audit retention failed; retrying at the next interval"),
            }
        }
    }

    /// Deletes everything past retention; returns the access-log rows deleted.
    pub async fn prune(&self, shutdown: &watch::Receiver<bool>) -> Result<u64, sqlx::Error> {
        let days = i32::try_from(self.days).unwrap_or(i32::MAX);
        let mut total = 0;
        loop {
            // accessed_at is naive UTC (InfraBox's convention).
            let n = sqlx::query(
                "DELETE FROM mcp_access_log WHERE id IN ( \
                     SELECT id FROM mcp_access_log \
                     WHERE accessed_at < (now() AT TIME ZONE 'utc') - make_interval(days => $1) LIMIT $2)",
            )
            .bind(days)
            .bind(self.batch)
            .execute(&self.pool)
            .await?
            .rows_affected();
            total += n;
            AuditMetrics::add(&self.metrics.retention_deleted, n);
            if n < self.batch as u64 || *shutdown.borrow() {
                break;
            }
            tokio::task::yield_now().await;
        }
        sqlx::query("DELETE FROM mcp_audit_gap WHERE detected_at < now() - make_interval(days => $1)")
            .bind(days)
            .execute(&self.pool)
            .await?;
        sqlx::query(
            "DELETE FROM mcp_audit_stream WHERE last_seen_at < now() - make_interval(days => $1) AND checked_seq >= high_seq",
        )
        .bind(days)
        .execute(&self.pool)
        .await?;
        Ok(total)
    }
}
