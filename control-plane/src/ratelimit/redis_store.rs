//! [`WindowStore`] in Redis: one `EVALSHA` of `sliding_window.lua` per
//! decision (reloaded with `SCRIPT LOAD` on `NOSCRIPT`), over a sorted set
//! per (user, class), clocked by Redis `TIME`.
//!
//! The connection is one [`ConnectionManager`] created lazily, so the control
//! plane starts while Redis is down and reconnects by itself; every call is
//! bounded by a timeout, and any failure is a [`StoreError`], never a guess.
//!
//! A Redis Cluster works the same way ([`RedisWindows::new_cluster`]): the
//! keys are hash-tagged by user, so one decision touches one slot; the
//! cluster client follows `MOVED`/`ASK` and slot changes after a failover,
//! and a `NOSCRIPT` from any node loads the script on every primary.
//!
//! One multiplexed connection, not a pool: it pipelines, so Redis reads a
//! dozen queued `EVALSHA`s per `read` under load. A pool of 4 (8) cut that
//! to about 4 (3), raising system calls per decision on both sides, and on a
//! 2-core machine, where the benchmark is CPU-bound, that cost throughput.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
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
    conn: Backend,
    sha: String,
    /// Random per process: members stay unique across control-plane replicas.
    nonce_prefix: String,
    counter: Arc<AtomicU64>,
    timeout: Duration,
    metrics: Arc<RateLimitMetrics>,
}

/// One Redis, or a cluster (its connection made on first use and again
/// after it failed to be made, so the control plane starts without it).
#[derive(Clone)]
enum Backend {
    Single(ConnectionManager),
    Cluster { client: ClusterClient, conn: Arc<tokio::sync::Mutex<Option<ClusterConnection>>> },
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
        if url.contains(',') {
            let seeds: Vec<&str> = url.split(',').map(str::trim).collect();
            return Self::new_cluster(&seeds, timeout, metrics);
        }
        let client = redis::Client::open(url).map_err(|_| StoreError("not a valid redis:// URL".into()))?;
        // No response timeout here: `admit` bounds the whole call, waiting
        // for a connection included, with one timer rather than two.
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            // Fail fast while Redis is away; the next call tries again.
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(10))
            .set_max_delay(Duration::from_millis(100));
        let conn = ConnectionManager::new_lazy_with_config(client, config)
            .map_err(|e| StoreError(format!("cannot prepare the Redis connection: {}", describe(&e))))?;
        Self::with(Backend::Single(conn), timeout, metrics)
    }

    /// Sliding windows in a Redis Cluster reached through `seeds` (any of its
    /// nodes; the client learns the rest). Connects on first use.
    pub fn new_cluster(seeds: &[&str], timeout: Duration, metrics: Arc<RateLimitMetrics>) -> Result<Self, StoreError> {
        let client = ClusterClient::builder(seeds.iter().map(|s| s.to_string()))
            .connection_timeout(timeout)
            .response_timeout(timeout)
            // Follow MOVED/ASK and a failover's slot changes a few times
            // within the call's own timeout.
            .retries(3)
            .min_retry_wait(10)
            .max_retry_wait(100)
            .build()
            .map_err(|_| StoreError("not a valid list of redis:// cluster node URLs".into()))?;
        Self::with(Backend::Cluster { client, conn: Arc::default() }, timeout, metrics)
    }

    fn with(conn: Backend, timeout: Duration, metrics: Arc<RateLimitMetrics>) -> Result<Self, StoreError> {
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
        match &self.conn {
            Backend::Single(conn) => self.evalsha_on(&mut conn.clone(), key, limit, window_ms, nonce).await,
            Backend::Cluster { client, conn } => {
                let mut c = {
                    let mut slot = conn.lock().await;
                    match slot.as_ref() {
                        Some(c) => c.clone(),
                        None => {
                            let c = client.get_async_connection().await?;
                            *slot = Some(c.clone());
                            c
                        }
                    }
                };
                self.evalsha_on(&mut c, key, limit, window_ms, nonce).await
            }
        }
    }

    /// One decision on `conn`; on `NOSCRIPT` the script is loaded (on every
    /// primary of a cluster) and the call made again.
    async fn evalsha_on<C: ConnectionLike + Send>(&self, conn: &mut C, key: &str, limit: u32, window_ms: u64, nonce: &str) -> Result<[i64; 4], RedisError> {
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(&self.sha).arg(1).arg(key).arg(limit).arg(window_ms).arg(nonce);
        match cmd.query_async::<Vec<i64>>(conn).await {
            Err(e) if e.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
                self.metrics.script_reloaded();
                let loaded: String = redis::cmd("SCRIPT").arg("LOAD").arg(SCRIPT).query_async(conn).await?;
                if loaded != self.sha {
                    return Err(RedisError::from((ErrorKind::Client, "SCRIPT LOAD returned an unexpected SHA")));
                }
                cmd.query_async::<Vec<i64>>(conn).await.and_then(reply)
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

#[cfg(test)]
mod tests {
    use std::io::{BufRead, BufReader, Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::sync::Mutex;

    use super::*;

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    /// A stand-in for Redis that answers `EVALSHA` with a fixed decision
    /// (or never, when `mute`) and anything else (the client's `CLIENT
    /// SETINFO` on connect) with `+OK`, counting `EVALSHA`s per accepted
    /// connection.
    struct FakeRedis {
        port: u16,
        evalsha_per_connection: Arc<Mutex<Vec<usize>>>,
    }

    impl FakeRedis {
        fn start(mute: bool) -> std::io::Result<Self> {
            let listener = TcpListener::bind("127.0.0.1:0")?;
            let port = listener.local_addr()?.port();
            let counts = Arc::new(Mutex::new(Vec::new()));
            let evalsha_per_connection = counts.clone();
            std::thread::spawn(move || {
                for stream in listener.incoming() {
                    let (Ok(stream), Ok(mut c)) = (stream, counts.lock()) else { return };
                    c.push(0);
                    let id = c.len() - 1;
                    drop(c);
                    let counts = counts.clone();
                    std::thread::spawn(move || serve(stream, id, &counts, mute));
                }
            });
            Ok(Self { port, evalsha_per_connection })
        }

        fn url(&self) -> String {
            format!("redis://127.0.0.1:{}/", self.port)
        }

        /// `EVALSHA`s each connection carried.
        fn counts(&self) -> Vec<usize> {
            self.evalsha_per_connection.lock().map(|c| c.clone()).unwrap_or_default()
        }
    }

    fn serve(stream: TcpStream, id: usize, counts: &Mutex<Vec<usize>>, mute: bool) {
        let Ok(mut out) = stream.try_clone() else { return };
        let mut input = BufReader::new(stream);
        while let Some(args) = read_command(&mut input) {
            let reply: &[u8] = if args.first().is_some_and(|a| a.eq_ignore_ascii_case(b"EVALSHA")) {
                if let Some(n) = counts.lock().ok().as_mut().and_then(|c| c.get_mut(id)) {
                    *n += 1;
                }
                if mute {
                    continue;
                }
                b"*4\r\n:1\r\n:29\r\n:60000000\r\n:1700000000000000\r\n"
            } else {
                b"+OK\r\n"
            };
            if out.write_all(reply).is_err() {
                return;
            }
        }
    }

    /// One RESP command (an array of bulk strings), or `None` at the end.
    fn read_command(input: &mut BufReader<TcpStream>) -> Option<Vec<Vec<u8>>> {
        let mut line = String::new();
        if input.read_line(&mut line).ok()? == 0 {
            return None;
        }
        let n: usize = line.trim_end().strip_prefix('*')?.parse().ok()?;
        let mut args = Vec::with_capacity(n);
        for _ in 0..n {
            line.clear();
            input.read_line(&mut line).ok()?;
            let len: usize = line.trim_end().strip_prefix('$')?.parse().ok()?;
            let mut arg = vec![0; len + 2];
            input.read_exact(&mut arg).ok()?;
            arg.truncate(len);
            args.push(arg);
        }
        Some(args)
    }

    fn store(url: &str, timeout: Duration) -> Result<RedisWindows, StoreError> {
        RedisWindows::new(url, timeout, Arc::new(RateLimitMetrics::default()))
    }

    const KEY: WindowKey<'static> = WindowKey { user: "u-1", class: "log" };
    const LIMIT: Limit = Limit { requests: 30, window: Duration::from_secs(60) };

    #[tokio::test]
    async fn decides_from_the_script_reply_over_one_connection() -> TestResult {
        let redis = FakeRedis::start(false)?;
        let windows = store(&redis.url(), Duration::from_secs(5))?;
        for _ in 0..8 {
            let d = windows.admit(&KEY, LIMIT).await?;
            assert_eq!(
                d,
                Decision { allowed: true, remaining: 29, reset: Duration::from_secs(60), at_us: 1_700_000_000_000_000 }
            );
        }
        assert_eq!(redis.counts(), vec![8], "one connection, one round trip per decision");
        Ok(())
    }

    #[tokio::test]
    async fn a_silent_redis_costs_one_timeout_per_call() -> TestResult {
        let redis = FakeRedis::start(true)?;
        let windows = store(&redis.url(), Duration::from_millis(100))?;
        for _ in 0..2 {
            let started = Instant::now();
            let result = tokio::time::timeout(Duration::from_secs(5), windows.admit(&KEY, LIMIT)).await?;
            let took = started.elapsed();
            assert_eq!(result, Err(StoreError("redis: timed out".into())));
            assert!(took >= Duration::from_millis(100) && took < Duration::from_secs(2), "{took:?}");
        }
        assert_eq!(redis.counts(), vec![2], "each call reached Redis once, on one connection");
        Ok(())
    }

    #[tokio::test]
    async fn starts_without_redis_fails_fast_and_never_shows_the_url() -> TestResult {
        // A port nobody listens on.
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let url = format!("redis://:hunter2-pw@127.0.0.1:{port}/");
        let windows = store(&url, Duration::from_secs(5))?;
        for _ in 0..4 {
            let started = Instant::now();
            let Err(e) = windows.admit(&KEY, LIMIT).await else { return Err("admitted without Redis".into()) };
            assert!(started.elapsed() < Duration::from_secs(2), "fails fast, not after the timeout");
            assert!(e.0.starts_with("redis: "), "{e}");
            assert!(!e.0.contains("hunter2") && !e.0.contains(&port.to_string()), "{e}");
        }
        let Err(bad) = store("redis://:hunter2-pw@[::1", Duration::from_secs(1)) else {
            return Err("a malformed URL was accepted".into());
        };
        assert!(!bad.0.contains("hunter2"), "{bad}");
        Ok(())
    }
}
