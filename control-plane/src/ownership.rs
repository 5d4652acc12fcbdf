//! Ownership of builds and jobs (DESIGN §4 step 5), answered for the
//! filter's ownership descriptor in the rate-limit call: does every build
//! and job of a request belong to its project? InfraBox itself looks
//! several job resources up by job id alone, so the gateway must know.
//!
//! The control plane shares InfraBox's database and reads its `build` and
//! `job` tables (never writes them). A row's project (and a job's build)
//! never changes once the row exists, so every row found is cached for good
//! (bounded: the oldest half goes when full); an id not found is asked
//! again next time, since the row may be committed a moment later.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use sqlx::{PgPool, Row};
use uuid::Uuid;

/// What a request claims: its project and the build and/or job in its path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OwnershipClaim {
    pub project: Uuid,
    pub build: Option<Uuid>,
    pub job: Option<Uuid>,
}

/// The lookup failed (database unreachable, table missing); the text never
/// contains connection details.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnershipError(pub String);

impl std::fmt::Display for OwnershipError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for OwnershipError {}

/// Answers claims. `Ok(true)`: every id exists and belongs to the project
/// (a job also to the build, when both are named).
pub trait OwnershipLookup: Send + Sync + 'static {
    fn check(&self, claim: OwnershipClaim) -> impl Future<Output = Result<bool, OwnershipError>> + Send;
}

/// Where a row belongs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Owner {
    project: Uuid,
    /// A job's build.
    build: Option<Uuid>,
}

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct OwnershipMetrics {
    pub confirmed: AtomicU64,
    pub refuted: AtomicU64,
    pub errors: AtomicU64,
    pub cache_hits: AtomicU64,
    pub lookups: AtomicU64,
}

impl OwnershipMetrics {
    pub fn render(&self, out: &mut String) {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        out.push_str("# HELP mcp_ownership_checks_total Build/job ownership checks answered to the filter.\n");
        out.push_str("# TYPE mcp_ownership_checks_total counter\n");
        for (label, c) in [("confirmed", &self.confirmed), ("refuted", &self.refuted), ("error", &self.errors)] {
            out.push_str(&format!("mcp_ownership_checks_total{{result=\"{label}\"}} {}\n", get(c)));
        }
        out.push_str("# HELP mcp_ownership_lookups_total Rows read from InfraBox's build and job tables.\n");
        out.push_str("# TYPE mcp_ownership_lookups_total counter\n");
        out.push_str(&format!("mcp_ownership_lookups_total {}\n", get(&self.lookups)));
        out.push_str("# HELP mcp_ownership_cache_hits_total Ids answered from the cache.\n");
        out.push_str("# TYPE mcp_ownership_cache_hits_total counter\n");
        out.push_str(&format!("mcp_ownership_cache_hits_total {}\n", get(&self.cache_hits)));
    }
}

/// Rows seen, in two generations (a bounded cache without per-entry
/// bookkeeping).
#[derive(Debug, Default)]
struct Seen {
    current: HashMap<Uuid, Owner>,
    previous: HashMap<Uuid, Owner>,
}

/// Ownership from InfraBox's tables in Postgres.
#[derive(Clone)]
pub struct PgOwnership {
    pool: PgPool,
    seen: Arc<Mutex<Seen>>,
    capacity: usize,
    metrics: Arc<OwnershipMetrics>,
}

impl PgOwnership {
    pub fn new(pool: PgPool, capacity: usize, metrics: Arc<OwnershipMetrics>) -> Self {
        Self { pool, seen: Arc::default(), capacity: capacity.max(2), metrics }
    }

    fn cached(&self, id: Uuid) -> Option<Owner> {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(o) = seen.current.get(&id) {
            return Some(*o);
        }
        let o = *seen.previous.get(&id)?;
        Self::remember(&mut seen, self.capacity, id, o);
        Some(o)
    }

    fn remember(seen: &mut Seen, capacity: usize, id: Uuid, owner: Owner) {
        if seen.current.len() >= capacity / 2 {
            seen.previous = std::mem::take(&mut seen.current);
        }
        seen.current.insert(id, owner);
    }

    /// The owner of a build (`job` false) or a job, `None` if no such row.
    async fn owner(&self, id: Uuid, job: bool) -> Result<Option<Owner>, OwnershipError> {
        if let Some(o) = self.cached(id) {
            self.metrics.cache_hits.fetch_add(1, Ordering::Relaxed);
            return Ok(Some(o));
        }
        self.metrics.lookups.fetch_add(1, Ordering::Relaxed);
        let sql = if job {
            "SELECT project_id, build_id FROM job WHERE id = $1"
        } else {
            "SELECT project_id, NULL::uuid AS build_id FROM build WHERE id = $1"
        };
        let row = sqlx::query(sql)
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| OwnershipError(format!("reading InfraBox's {} table failed: {}", if job { "job" } else { "build" }, db_kind(&e))))?;
        let Some(row) = row else { return Ok(None) };
        let owner = Owner {
            project: row.try_get("project_id").map_err(|e| OwnershipError(format!("unexpected column: {}", db_kind(&e))))?,
            build: row.try_get("build_id").map_err(|e| OwnershipError(format!("unexpected column: {}", db_kind(&e))))?,
        };
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        Self::remember(&mut seen, self.capacity, id, owner);
        Ok(Some(owner))
    }
}

/// What kind of database error, without parameters or connection details.
fn db_kind(e: &sqlx::Error) -> String {
    match e {
        sqlx::Error::Database(d) => format!("database error {}", d.code().unwrap_or_default()),
        sqlx::Error::PoolTimedOut => "no database connection available".into(),
        sqlx::Error::Io(_) | sqlx::Error::Tls(_) => "database unreachable".into(),
        _ => "database error".into(),
    }
}

impl OwnershipLookup for PgOwnership {
    async fn check(&self, claim: OwnershipClaim) -> Result<bool, OwnershipError> {
        let result = async {
            if let Some(build) = claim.build {
                match self.owner(build, false).await? {
                    Some(o) if o.project == claim.project => {}
                    _ => return Ok(false),
                }
            }
            if let Some(job) = claim.job {
                match self.owner(job, true).await? {
                    Some(o) if o.project == claim.project && claim.build.is_none_or(|b| o.build == Some(b)) => {}
                    _ => return Ok(false),
                }
            }
            Ok(true)
        }
        .await;
        let counter = match &result {
            Ok(true) => &self.metrics.confirmed,
            Ok(false) => &self.metrics.refuted,
            Err(_) => &self.metrics.errors,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cache_is_bounded_and_keeps_hot_rows() {
        let mut seen = Seen::default();
        let owner = Owner { project: Uuid::nil(), build: None };
        let hot = Uuid::new_v4();
        PgOwnership::remember(&mut seen, 8, hot, owner);
        for _ in 0..100 {
            PgOwnership::remember(&mut seen, 8, Uuid::new_v4(), owner);
            if !seen.current.contains_key(&hot) {
                let o = seen.previous.get(&hot).copied();
                assert!(o.is_some(), "the hot row is in one generation or the other");
                PgOwnership::remember(&mut seen, 8, hot, owner);
            }
            assert!(seen.current.len() + seen.previous.len() <= 8);
        }
    }
}
