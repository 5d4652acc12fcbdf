//! `SequenceTracker`: loss detection per (node, VM) stream.
//!
//! The filter numbers its records without holes, but assigns the number when
//! it decides, while Envoy logs when the stream ends: a slow upstream
//! request is logged after faster ones with higher numbers. So a missing
//! number is only *lost* once it stayed missing for a grace period longer
//! than any request (route timeout plus Envoy's log flush interval).
//!
//! Every check samples each stream's `high_seq`. A number below the high
//! sampled at least `grace` ago was assigned before then; if it has no row
//! now, it is recorded in `mcp_audit_gap` and counted. `checked_seq` then
//! moves up to that high: every number at or below it is a row or in a gap.
//!
//! State lives in Postgres (the rows are the truth), so detection spans
//! control-plane restarts and replicas. After a restart, detection resumes
//! one grace period later. The stream row is locked while a stream is
//! settled, and the batch writer takes the same lock, so a row is either
//! seen here or counted as `recovered` in its gap — never both nor neither.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::{PgPool, Row};
use tokio::sync::watch;

use super::metrics::AuditMetrics;

/// Streams settled per check at most.
const STREAMS_PER_CHECK: i64 = 10_000;

/// One stream's key.
type StreamKey = (String, String);

/// A missing range of one stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gap {
    pub node_id: String,
    pub vm_id: String,
    pub first_seq: i64,
    pub last_seq: i64,
}

impl Gap {
    pub fn missing(&self) -> i64 {
        self.last_seq - self.first_seq + 1
    }
}

/// The periodic gap detector.
pub struct SequenceTracker {
    pool: PgPool,
    metrics: Arc<AuditMetrics>,
    grace: Duration,
    /// Samples of lagging streams' `high_seq`, oldest first.
    samples: VecDeque<(Instant, HashMap<StreamKey, i64>)>,
}

impl SequenceTracker {
    pub fn new(pool: PgPool, metrics: Arc<AuditMetrics>, grace: Duration) -> Self {
        Self { pool, metrics, grace, samples: VecDeque::new() }
    }

    /// Checks every `interval` until shutdown.
    pub async fn run(mut self, interval: Duration, mut shutdown: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.wait_for(|stop| *stop) => return,
            }
            if let Err(e) = self.check(Instant::now()).await {
                tracing::warn!(error = %e, "audit gap check failed");
            }
        }
    }

    /// Samples the streams and settles those whose sample is old enough;
    /// returns the gaps recorded.
    pub async fn check(&mut self, now: Instant) -> Result<Vec<Gap>, sqlx::Error> {
        let lagging: HashMap<StreamKey, i64> = sqlx::query(
            "SELECT node_id, vm_id, high_seq FROM mcp_audit_stream WHERE checked_seq < high_seq \
             ORDER BY last_seen_at LIMIT $1",
        )
        .bind(STREAMS_PER_CHECK)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(|r| Ok(((r.try_get("node_id")?, r.try_get("vm_id")?), r.try_get("high_seq")?)))
        .collect::<Result<_, sqlx::Error>>()?;
        self.samples.push_back((now, lagging));
        let Some(cutoff) = now.checked_sub(self.grace) else { return Ok(Vec::new()) };
        // Keep the newest sample at or before the cutoff and everything after.
        while self.samples.get(1).is_some_and(|(t, _)| *t <= cutoff) {
            self.samples.pop_front();
        }
        let due = match self.samples.front() {
            Some((t, s)) if *t <= cutoff => s.clone(),
            _ => return Ok(Vec::new()),
        };
        let mut found = Vec::new();
        for ((node, vm), upper) in due {
            found.extend(self.settle(&node, &vm, upper).await?);
        }
        Ok(found)
    }

    /// Records every number in (checked_seq, upper] without a row as a gap
    /// and moves `checked_seq` to `upper`.
    pub async fn settle(&self, node: &str, vm: &str, upper: i64) -> Result<Vec<Gap>, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        let checked: Option<i64> =
            sqlx::query("SELECT checked_seq FROM mcp_audit_stream WHERE node_id = $1 AND vm_id = $2 FOR UPDATE")
                .bind(node)
                .bind(vm)
                .fetch_optional(&mut *tx)
                .await?
                .map(|r| r.try_get("checked_seq"))
                .transpose()?;
        let Some(checked) = checked.filter(|c| *c < upper) else { return Ok(Vec::new()) };
        let gaps: Vec<Gap> = sqlx::query(
            "SELECT prev + 1 AS first_seq, seq - 1 AS last_seq FROM ( \
                 SELECT seq, lag(seq, 1, $3::int8) OVER (ORDER BY seq) AS prev FROM mcp_access_log \
                 WHERE node_id = $1 AND vm_id = $2 AND seq > $3 AND seq <= $4) s \
             WHERE seq > prev + 1 \
             UNION ALL \
             SELECT COALESCE(max(seq), $3) + 1, $4::int8 FROM mcp_access_log \
             WHERE node_id = $1 AND vm_id = $2 AND seq > $3 AND seq <= $4 \
             HAVING COALESCE(max(seq), $3) < $4 \
             ORDER BY 1",
        )
        .bind(node)
        .bind(vm)
        .bind(checked)
        .bind(upper)
        .fetch_all(&mut *tx)
        .await?
        .iter()
        .map(|r| {
            Ok(Gap {
                node_id: node.to_string(),
                vm_id: vm.to_string(),
                first_seq: r.try_get("first_seq")?,
                last_seq: r.try_get("last_seq")?,
            })
        })
        .collect::<Result<_, sqlx::Error>>()?;
        if !gaps.is_empty() {
            let firsts: Vec<i64> = gaps.iter().map(|g| g.first_seq).collect();
            let lasts: Vec<i64> = gaps.iter().map(|g| g.last_seq).collect();
            sqlx::query(
                "INSERT INTO mcp_audit_gap (node_id, vm_id, first_seq, last_seq, missing) \
                 SELECT $1, $2, f, l, l - f + 1 FROM UNNEST($3::int8[], $4::int8[]) AS g(f, l)",
            )
            .bind(node)
            .bind(vm)
            .bind(&firsts)
            .bind(&lasts)
            .execute(&mut *tx)
            .await?;
        }
        sqlx::query("UPDATE mcp_audit_stream SET checked_seq = $3 WHERE node_id = $1 AND vm_id = $2")
            .bind(node)
            .bind(vm)
            .bind(upper)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        for g in &gaps {
            AuditMetrics::add(&self.metrics.gaps, 1);
            AuditMetrics::add(&self.metrics.missing_entries, g.missing() as u64);
            tracing::warn!(
                node_id = %g.node_id, vm_id = %g.vm_id, first_seq = g.first_seq, last_seq = g.last_seq,
                "audit entries lost: sequence gap recorded"
            );
        }
        Ok(gaps)
    }
}
