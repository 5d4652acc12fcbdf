//! `BatchWriter`: takes up to `batch_rows` queued rows at a time (whatever
//! accumulated while the previous batch was written) and stores them in one
//! transaction:
//!
//! 1. per (node, VM) stream: raise `high_seq` and lock the stream row (keys
//!    sorted, so writers of several replicas never deadlock); this returns
//!    `checked_seq`, the number up to which the gap detector has settled;
//! 2. one multi-row `INSERT … SELECT FROM UNNEST(…)` of the batch (a record
//!    delivered twice is stored once);
//! 3. a row at or below `checked_seq` arrived after its gap was recorded:
//!    it is stored and counted as `recovered` in that gap, so rows plus
//!    unrecovered gaps always equal what the filter sent.
//!
//! A failed batch is retried with backoff, the queue meanwhile fills and
//! pushes back on the ingest. After the commit, `last_used_at` of the
//! batch's tokens is raised (see [`LastUsedThrottle`]).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::NaiveDateTime;
use serde_json::Value;
use sqlx::{PgConnection, PgPool, Row};
use tokio::sync::watch;
use uuid::Uuid;

use super::metrics::AuditMetrics;
use super::row::AuditRow;
use super::sink::AuditQueue;

/// How often at most `last_used_at` of one token is written.
pub const LAST_USED_EVERY: Duration = Duration::from_secs(60);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Failed attempts after which a batch is given up once shutdown began.
const ATTEMPTS_AT_SHUTDOWN: u32 = 3;

/// What one committed batch did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BatchOutcome {
    pub inserted: u64,
    pub duplicates: u64,
    /// Rows that filled part of a recorded gap.
    pub late: u64,
}

/// The consumer of the audit queue.
pub struct BatchWriter {
    pool: PgPool,
    queue: AuditQueue,
    metrics: Arc<AuditMetrics>,
    batch_rows: usize,
    last_used: LastUsedThrottle,
}

impl BatchWriter {
    pub fn new(pool: PgPool, queue: AuditQueue, metrics: Arc<AuditMetrics>, batch_rows: usize) -> Self {
        Self { pool, queue, metrics, batch_rows: batch_rows.max(1), last_used: LastUsedThrottle::default() }
    }

    /// Writes until every sink is dropped and the queue is drained.
    pub async fn run(mut self, shutdown: watch::Receiver<bool>) {
        let mut batch = Vec::with_capacity(self.batch_rows);
        loop {
            batch.clear();
            if self.queue.next_batch(&mut batch, self.batch_rows).await == 0 {
                break;
            }
            self.write_with_retry(&batch, &shutdown).await;
        }
        tracing::debug!("audit writer drained");
    }

    async fn write_with_retry(&mut self, batch: &[AuditRow], shutdown: &watch::Receiver<bool>) {
        let mut backoff = BACKOFF_MIN;
        let mut failures_at_shutdown = 0;
        loop {
            match write_batch(&self.pool, batch).await {
                Ok(done) => {
                    AuditMetrics::add(&self.metrics.rows_written, done.inserted);
                    AuditMetrics::add(&self.metrics.duplicates, done.duplicates);
                    AuditMetrics::add(&self.metrics.late_entries, done.late);
                    AuditMetrics::add(&self.metrics.batches, 1);
                    self.touch_tokens(batch).await;
                    return;
                }
                Err(e) => {
                    AuditMetrics::add(&self.metrics.write_errors, 1);
                    tracing::warn!(error = %e, rows = batch.len(), "audit batch write failed; retrying");
                    if *shutdown.borrow() {
                        failures_at_shutdown += 1;
                        if failures_at_shutdown >= ATTEMPTS_AT_SHUTDOWN {
                            AuditMetrics::add(&self.metrics.rows_abandoned, batch.len() as u64);
                            tracing::error!(rows = batch.len(), "audit rows abandoned at shutdown (they will show as gaps)");
                            return;
                        }
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
    }

    /// Raises `last_used_at` of the batch's tokens, each at most once a minute.
    async fn touch_tokens(&mut self, batch: &[AuditRow]) {
        let mut latest: HashMap<&str, NaiveDateTime> = HashMap::new();
        for row in batch {
            if let Some(t) = row.token_id.as_deref() {
                let at = latest.entry(t).or_insert(row.accessed_at);
                *at = (*at).max(row.accessed_at);
            }
        }
        let now = Instant::now();
        let due: Vec<(String, NaiveDateTime)> = latest
            .into_iter()
            .filter(|(t, _)| self.last_used.due(t, now))
            .map(|(t, at)| (t.to_string(), at))
            .collect();
        if due.is_empty() {
            return;
        }
        let (ids, ats): (Vec<String>, Vec<NaiveDateTime>) = due.into_iter().unzip();
        let result = sqlx::query(
            "UPDATE mcp_token t SET last_used_at = u.at \
             FROM UNNEST($1::varchar[], $2::timestamp[]) AS u(token_id, at) \
             WHERE t.token_id = u.token_id \
               AND (t.last_used_at IS NULL OR t.last_used_at <= u.at - interval '1 minute')",
        )
        .bind(&ids)
        .bind(&ats)
        .execute(&self.pool)
        .await;
        match result {
            Ok(done) => AuditMetrics::add(&self.metrics.last_used_updates, done.rows_affected()),
            Err(e) => {
                tracing::warn!(error = %e, "cannot update last_used_at");
                for id in &ids {
                    self.last_used.forget(id);
                }
            }
        }
    }
}

/// Stores one batch (see the module documentation).
pub async fn write_batch(pool: &PgPool, batch: &[AuditRow]) -> Result<BatchOutcome, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let mut highs: BTreeMap<(&str, &str), i64> = BTreeMap::new();
    for row in batch {
        let h = highs.entry((row.node_id.as_str(), row.vm_id.as_str())).or_insert(row.seq);
        *h = (*h).max(row.seq);
    }
    let (nodes, rest): (Vec<&str>, Vec<(&str, i64)>) = highs.iter().map(|((n, v), h)| (*n, (*v, *h))).unzip();
    let (vms, seqs): (Vec<&str>, Vec<i64>) = rest.into_iter().unzip();
    let returned: HashMap<(String, String), i64> = sqlx::query(
        "INSERT INTO mcp_audit_stream AS s (node_id, vm_id, high_seq) \
         SELECT * FROM UNNEST($1::varchar[], $2::varchar[], $3::int8[]) \
         ON CONFLICT (node_id, vm_id) DO UPDATE \
         SET high_seq = GREATEST(s.high_seq, EXCLUDED.high_seq), last_seen_at = now() \
         RETURNING node_id, vm_id, checked_seq",
    )
    .bind(&nodes)
    .bind(&vms)
    .bind(&seqs)
    .fetch_all(&mut *tx)
    .await?
    .iter()
    .map(|r| Ok(((r.try_get("node_id")?, r.try_get("vm_id")?), r.try_get("checked_seq")?)))
    .collect::<Result<_, sqlx::Error>>()?;
    // Keyed by the batch's own strings: no allocation per row below.
    let checked: HashMap<(&str, &str), i64> = highs
        .keys()
        .filter_map(|(n, v)| returned.get(&(n.to_string(), v.to_string())).map(|c| ((*n, *v), *c)))
        .collect();
    let is_late = |row: &AuditRow| checked.get(&(row.node_id.as_str(), row.vm_id.as_str())).is_some_and(|c| row.seq <= *c);
    let (late, on_time): (Vec<&AuditRow>, Vec<&AuditRow>) = batch.iter().partition(|r| is_late(r));
    let inserted = insert_rows(&mut tx, &on_time).await?;
    let mut recovered = 0;
    if !late.is_empty() {
        recovered = recover_late(&mut tx, &late).await?;
    }
    tx.commit().await?;
    let stored = inserted + recovered;
    Ok(BatchOutcome { inserted: stored, duplicates: batch.len() as u64 - stored, late: recovered })
}

/// The column vectors of a batch, bound as arrays.
#[derive(Default)]
struct Columns {
    id: Vec<Uuid>,
    token_id: Vec<Option<String>>,
    user_id: Vec<Option<Uuid>>,
    action: Vec<String>,
    outcome: Vec<&'static str>,
    details: Vec<Value>,
    error: Vec<Option<String>>,
    ip: Vec<Option<String>>,
    accessed_at: Vec<NaiveDateTime>,
    method: Vec<String>,
    path: Vec<String>,
    status_code: Vec<Option<i16>>,
    duration_us: Vec<Option<i64>>,
    bytes_in: Vec<i64>,
    bytes_out: Vec<i64>,
    project_id: Vec<Option<Uuid>>,
    request_id: Vec<Option<String>>,
    route: Vec<Option<String>>,
    class: Vec<Option<String>>,
    node_id: Vec<String>,
    vm_id: Vec<String>,
    seq: Vec<i64>,
}

impl Columns {
    fn of(rows: &[&AuditRow]) -> Self {
        let mut c = Self::with_capacity(rows.len());
        for r in rows {
            c.id.push(r.id);
            c.token_id.push(r.token_id.clone());
            c.user_id.push(r.user_id);
            c.action.push(r.action.clone());
            c.outcome.push(r.outcome.as_str());
            c.details.push(r.details.clone());
            c.error.push(r.error.clone());
            c.ip.push(r.ip.clone());
            c.accessed_at.push(r.accessed_at);
            c.method.push(r.method.clone());
            c.path.push(r.path.clone());
            c.status_code.push(r.status_code);
            c.duration_us.push(r.duration_us);
            c.bytes_in.push(r.bytes_in);
            c.bytes_out.push(r.bytes_out);
            c.project_id.push(r.project_id);
            c.request_id.push(r.request_id.clone());
            c.route.push(r.route.clone());
            c.class.push(r.class.clone());
            c.node_id.push(r.node_id.clone());
            c.vm_id.push(r.vm_id.clone());
            c.seq.push(r.seq);
        }
        c
    }

    fn with_capacity(n: usize) -> Self {
        Self {
            id: Vec::with_capacity(n),
            token_id: Vec::with_capacity(n),
            user_id: Vec::with_capacity(n),
            action: Vec::with_capacity(n),
            outcome: Vec::with_capacity(n),
            details: Vec::with_capacity(n),
            error: Vec::with_capacity(n),
            ip: Vec::with_capacity(n),
            accessed_at: Vec::with_capacity(n),
            method: Vec::with_capacity(n),
            path: Vec::with_capacity(n),
            status_code: Vec::with_capacity(n),
            duration_us: Vec::with_capacity(n),
            bytes_in: Vec::with_capacity(n),
            bytes_out: Vec::with_capacity(n),
            project_id: Vec::with_capacity(n),
            request_id: Vec::with_capacity(n),
            route: Vec::with_capacity(n),
            class: Vec::with_capacity(n),
            node_id: Vec::with_capacity(n),
            vm_id: Vec::with_capacity(n),
            seq: Vec::with_capacity(n),
        }
    }
}

const INSERT_ROWS: &str = "INSERT INTO mcp_access_log \
    (id, token_id, user_id, action, outcome, details, error, ip, accessed_at, \
     method, path, status_code, duration_us, bytes_in, bytes_out, project_id, request_id, route, class, node_id, vm_id, seq) \
    SELECT * FROM UNNEST($1::uuid[], $2::varchar[], $3::uuid[], $4::varchar[], $5::varchar[], $6::jsonb[], $7::text[], \
     $8::varchar[], $9::timestamp[], $10::varchar[], $11::varchar[], $12::int2[], $13::int8[], $14::int8[], $15::int8[], \
     $16::uuid[], $17::varchar[], $18::varchar[], $19::varchar[], $20::varchar[], $21::varchar[], $22::int8[]) \
    ON CONFLICT (node_id, vm_id, seq) WHERE seq IS NOT NULL DO NOTHING";

fn bind_columns<'q>(
    q: sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
    c: Columns,
) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
    q.bind(c.id)
        .bind(c.token_id)
        .bind(c.user_id)
        .bind(c.action)
        .bind(c.outcome)
        .bind(c.details)
        .bind(c.error)
        .bind(c.ip)
        .bind(c.accessed_at)
        .bind(c.method)
        .bind(c.path)
        .bind(c.status_code)
        .bind(c.duration_us)
        .bind(c.bytes_in)
        .bind(c.bytes_out)
        .bind(c.project_id)
        .bind(c.request_id)
        .bind(c.route)
        .bind(c.class)
        .bind(c.node_id)
        .bind(c.vm_id)
        .bind(c.seq)
}

/// Inserts rows; returns how many were new.
async fn insert_rows(conn: &mut PgConnection, rows: &[&AuditRow]) -> Result<u64, sqlx::Error> {
    if rows.is_empty() {
        return Ok(0);
    }
    Ok(bind_columns(sqlx::query(INSERT_ROWS), Columns::of(rows)).execute(conn).await?.rows_affected())
}

/// Inserts rows that arrived after their gap was recorded and counts each
/// new one as recovered in its gap; returns how many were new.
async fn recover_late(conn: &mut PgConnection, rows: &[&AuditRow]) -> Result<u64, sqlx::Error> {
    let returning = format!("{INSERT_ROWS} RETURNING node_id, vm_id, seq");
    let stored = bind_columns(sqlx::query(&returning), Columns::of(rows)).fetch_all(&mut *conn).await?;
    if stored.is_empty() {
        return Ok(0);
    }
    let mut nodes = Vec::with_capacity(stored.len());
    let mut vms = Vec::with_capacity(stored.len());
    let mut seqs = Vec::with_capacity(stored.len());
    for r in &stored {
        nodes.push(r.try_get::<String, _>("node_id")?);
        vms.push(r.try_get::<String, _>("vm_id")?);
        seqs.push(r.try_get::<i64, _>("seq")?);
    }
    sqlx::query(
        "UPDATE mcp_audit_gap g SET recovered = g.recovered + x.n \
         FROM (SELECT g2.id, count(*) AS n FROM mcp_audit_gap g2 \
               JOIN UNNEST($1::varchar[], $2::varchar[], $3::int8[]) AS l(node_id, vm_id, seq) \
                 ON g2.node_id = l.node_id AND g2.vm_id = l.vm_id AND l.seq BETWEEN g2.first_seq AND g2.last_seq \
               GROUP BY g2.id) x \
         WHERE g.id = x.id",
    )
    .bind(&nodes)
    .bind(&vms)
    .bind(&seqs)
    .execute(&mut *conn)
    .await?;
    tracing::info!(rows = stored.len(), "audit entries arrived after their gap was recorded");
    Ok(stored.len() as u64)
}

/// Remembers when `last_used_at` of each token was last written by this
/// process, so a busy token costs one UPDATE a minute, not one per batch.
/// The UPDATE itself also only moves `last_used_at` by a minute or more, so
/// replicas together stay within once a minute too. Bounded: entries older
/// than the interval are dropped when the map grows.
#[derive(Debug, Default)]
pub struct LastUsedThrottle {
    written: HashMap<String, Instant>,
}

impl LastUsedThrottle {
    const PRUNE_ABOVE: usize = 100_000;

    /// Whether `token` is due at `now`; if so, marks it written.
    pub fn due(&mut self, token: &str, now: Instant) -> bool {
        if let Some(at) = self.written.get(token) {
            if now.saturating_duration_since(*at) < LAST_USED_EVERY {
                return false;
            }
        }
        if self.written.len() >= Self::PRUNE_ABOVE {
            self.written.retain(|_, at| now.saturating_duration_since(*at) < LAST_USED_EVERY);
        }
        self.written.insert(token.to_string(), now);
        true
    }

    /// Forgets a token (its write failed), so the next batch retries it.
    pub fn forget(&mut self, token: &str) {
        self.written.remove(token);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn last_used_is_due_once_a_minute() {
        let mut t = LastUsedThrottle::default();
        let t0 = Instant::now();
        assert!(t.due("a", t0));
        assert!(!t.due("a", t0 + Duration::from_secs(59)));
        assert!(t.due("b", t0 + Duration::from_secs(1)));
        assert!(t.due("a", t0 + Duration::from_secs(60)));
        t.forget("b");
        assert!(t.due("b", t0 + Duration::from_secs(2)));
    }
}
