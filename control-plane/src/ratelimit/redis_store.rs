//! [`WindowStore`] in Redis: one `EVALSHA` of `sliding_window.lua` per
//! decision (reloaded with `SCRIPT LOAD` on `NOSCRIPT`), over a sorted set
//! per (user, class), clocked by Redis `TIME`.
//!
//! The connection is a [`ConnectionManager`] created lazily, so the control
//! plane starts while Redis is down and reconnects by itself; every call is
//! bounded by a timeout, and any failure is a [`StoreError`], never a guess.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{ErrorKind, RedisError, ServerErrorKind};

use super::metrics::RateLimitMetrics;
use super::store::{Decision, Limit, StoreError, WindowKey, WindowStore};

/// The script (also loaded by `redis-benchmark` in the benchmark).
pub const SCRIPT: &str = include_str!("sliding_window.lua");

/// Longest a decision may take before it is an error.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(250);

/// Sliding windows in one Redis (or one Redis Cluster slot per user).
#[derive(Clone)]
pub struct RedisWindows {
    conn: ConnectionManager,
    sha: String,
    /// Random per process: members stay unique across control-plane replicas.
    nonce_prefix: String,
    counter: Arc<AtomicU64>,
    timeout: Duration,
    metrics: Arc<RateLimitMetrics>,
}

impl std::fmt::Debug for RedisWindows {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisWindows").field("sha", &self.sha).field("timeout", &self.timeout).finish_non_exhaustive()
    }
}

impl RedisWindows {
    /// Prepares a connection to `url` without connecting (so Redis may be
    /// down at startup). Fails only on a malformed URL; the error never
    /// repeats the URL (it may hold a password).
    pub fn new(url: &str, timeout: Duration, metrics: Arc<RateLimitMetrics>) -> Result<Self, StoreError> {
        let client = redis::Client::open(url).map_err(|_| StoreError("not a valid redis:// URL".into()))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout))
            // Fail fast while Redis is away; the next call tries again.
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(10))
            .set_max_delay(Duration::from_millis(100));
        let conn = ConnectionManager::new_lazy_with_config(client, config)
            .map_err(|e| StoreError(format!("cannot prepare the Redis connection: {}", describe(&e))))?;
        let mut seed = [0u8; 8];
        getrandom::fill(&mut seed).map_err(|_| StoreError("no OS randomness".into()))?;
        Ok(Self {
            conn,
            sha: redis::Script::new(SCRIPT).get_hash().to_string(),
            nonce_prefix: hex::encode(seed),
            counter: Arc::new(AtomicU64::new(0)),
            timeout,
            metrics,
        })
    }

    /// SHA-1 of [`SCRIPT`] (what `EVALSHA` names).
    pub fn script_sha(&self) -> &str {
        &self.sha
    }

    async fn evalsha(&self, key: &str, limit: u32, window_ms: u64, nonce: &str) -> Result<[i64; 4], RedisError> {
        let mut conn = self.conn.clone();
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(&self.sha).arg(1).arg(key).arg(limit).arg(window_ms).arg(nonce);
        match cmd.query_async::<Vec<i64>>(&mut conn).await {
            Err(e) if e.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
                self.metrics.script_reloaded();
                let loaded: String = redis::cmd("SCRIPT").arg("LOAD").arg(SCRIPT).query_async(&mut conn).await?;
                if loaded != self.sha {
                    return Err(RedisError::from((ErrorKind::Client, "SCRIPT LOAD returned an unexpected SHA")));
                }
                cmd.query_async::<Vec<i64>>(&mut conn).await.and_then(reply)
            }
            other => other.and_then(reply),
        }
    }
}

fn reply(v: Vec<i64>) -> Result<[i64; 4], RedisError> {
    <[i64; 4]>::try_from(v).map_err(|_| RedisError::from((ErrorKind::Client, "unexpected script reply")))
}

/// A description that names the failure, never the URL or a password.
fn describe(e: &RedisError) -> String {
    if e.is_timeout() {
        "timed out".into()
    } else if e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal() {
        "connection failed".into()
    } else {
        format!("{:?}", e.kind())
    }
}

impl WindowStore for RedisWindows {
    async fn admit(&self, key: &WindowKey<'_>, limit: Limit) -> Result<Decision, StoreError> {
        let window_ms = u64::try_from(limit.window.as_millis()).unwrap_or(u64::MAX).max(1);
        let nonce = format!("{}{:x}", self.nonce_prefix, self.counter.fetch_add(1, Ordering::Relaxed));
        let storage_key = key.storage_key();
        let started = Instant::now();
        let result = tokio::time::timeout(self.timeout, self.evalsha(&storage_key, limit.requests, window_ms, &nonce)).await;
        self.metrics.redis_round_trip(started.elapsed());
        let [allowed, remaining, reset_us, now_us] = match result {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => return Err(StoreError(format!("redis: {}", describe(&e)))),
            Err(_) => return Err(StoreError("redis: timed out".into())),
        };
        Ok(Decision {
            allowed: allowed == 1,
            remaining: u32::try_from(remaining.max(0)).unwrap_or(u32::MAX),
            reset: Duration::from_micros(u64::try_from(reset_us.max(0)).unwrap_or(0)),
            at_us: u64::try_from(now_us.max(0)).unwrap_or(0),
        })
    }
}
