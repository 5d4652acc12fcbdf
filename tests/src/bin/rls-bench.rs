//! `rls-bench`: rate-limit decisions per second against real Redis (DESIGN
//! §14: ≥ 20 000 decisions/s on a 2-core machine). Not a test.
//!
//! Starts Postgres (the control plane needs it), a private Redis and the
//! control-plane binary, then drives its gRPC listener with `CONNECTIONS` ×
//! `INFLIGHT` concurrent `ShouldRateLimit` calls (HTTP/2, like Envoy's
//! workers) over `USERS` users in the `default` class for `SECONDS`;
//! reports decisions/s and client-side latency. Then runs `redis-benchmark`
//! with `EVALSHA` of the same script on the same Redis, for the ceiling
//! Redis itself sets.
//!
//! ```sh
//! cargo build --profile perf -p mcp-control-plane -p mcp-gateway-tests --bins
//! MCP_CONTROL_PLANE_BIN=target/perf/mcp-control-plane target/perf/rls-bench
//! ```
//! Flags: `--smoke` (1 s, for CI), `--json` (last line is JSON).
//! Environment: `RLS_BENCH_SECONDS` (5), `RLS_BENCH_CONNECTIONS` (4),
//! `RLS_BENCH_INFLIGHT` (16 per connection), `RLS_BENCH_USERS` (50000).

use std::net::SocketAddr;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::{Entry, RateLimitOverride};
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use envoy_types::pb::envoy::service::ratelimit::v3::RateLimitRequest;
use mcp_control_plane::ratelimit::redis_store::SCRIPT;
use mcp_gateway_tests::control_plane::{ControlPlane, ControlPlaneOptions};
use mcp_gateway_tests::http::RawRequest;
use mcp_gateway_tests::infrabox_db;
use mcp_gateway_tests::postgres::PostgresServer;
use mcp_gateway_tests::redis::RedisServer;
use mcp_gateway_tests::scratch::fresh_dir;
use mcp_gateway_tests::session::SigningKey;
use serde_json::json;
use sqlx::postgres::PgPoolOptions;

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn request(user: u64) -> RateLimitRequest {
    RateLimitRequest {
        domain: "infrabox-mcp".into(),
        descriptors: vec![RateLimitDescriptor {
            entries: vec![
                Entry { key: "user".into(), value: format!("bench-user-{user}") },
                Entry { key: "class".into(), value: "default".into() },
            ],
            // The `default` class: 30 per minute.
            limit: Some(RateLimitOverride { requests_per_unit: 30, unit: 2 }),
            ..Default::default()
        }],
        hits_addend: 1,
    }
}

/// Client-side numbers of one run.
struct Run {
    decisions: u64,
    errors: u64,
    seconds: f64,
    latencies_us: Vec<u32>,
}

/// `secret`: the internal credential (the control plane's snapshot secret,
/// which the gRPC secret defaults to).
async fn drive(grpc: SocketAddr, secret: &str, seconds: u64, connections: u64, inflight: u64, users: u64) -> Result<Run> {
    let bearer: tonic::metadata::MetadataValue<tonic::metadata::Ascii> = format!("Bearer {secret}").parse().context("the secret as metadata")?;
    let done = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let latencies = Arc::new(Mutex::new(Vec::<u32>::new()));
    let mut channels = Vec::new();
    for _ in 0..connections {
        channels.push(
            tonic::transport::Endpoint::from_shared(format!("http://{grpc}"))?
                .tcp_nodelay(true)
                .connect()
                .await
                .context("connecting to the control plane's gRPC listener")?,
        );
    }
    let started = Instant::now();
    let until = started + Duration::from_secs(seconds);
    let mut tasks = Vec::new();
    for (c, channel) in channels.iter().enumerate() {
        for i in 0..inflight {
            let mut client = RateLimitServiceClient::new(channel.clone());
            let (done, errors, latencies, bearer) = (done.clone(), errors.clone(), latencies.clone(), bearer.clone());
            let mut n = (c as u64).wrapping_mul(7919).wrapping_add(i.wrapping_mul(104_729));
            tasks.push(tokio::spawn(async move {
                let mut mine = Vec::new();
                while Instant::now() < until {
                    n = n.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
                    let t0 = Instant::now();
                    let mut call = tonic::Request::new(request((n >> 33) % users));
                    call.metadata_mut().insert("authorization", bearer.clone());
                    match client.should_rate_limit(call).await {
                        Ok(_) => {
                            done.fetch_add(1, Ordering::Relaxed);
                            mine.push(t0.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
                        }
                        Err(_) => {
                            errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                if let Ok(mut all) = latencies.lock() {
                    all.extend(mine);
                }
            }));
        }
    }
    for t in tasks {
        t.await?;
    }
    let seconds = started.elapsed().as_secs_f64();
    let mut latencies_us = latencies.lock().map(|l| l.clone()).unwrap_or_default();
    latencies_us.sort_unstable();
    Ok(Run { decisions: done.load(Ordering::Relaxed), errors: errors.load(Ordering::Relaxed), seconds, latencies_us })
}

/// `redis-benchmark` running `EVALSHA` of the script: requests/s.
fn redis_benchmark(port: u16, sha: &str, requests: u64) -> Result<f64> {
    let o = Command::new("redis-benchmark")
        .args(["-p", &port.to_string(), "-n", &requests.to_string(), "-c", "50", "-r", "50000", "-q"])
        .args(["EVALSHA", sha, "1", "ib_mcp_rl:{__rand_int__}:default", "30", "60000", "__rand_int__"])
        .output()
        .context("running redis-benchmark")?;
    let text = String::from_utf8_lossy(&o.stdout);
    let last = text.rsplit('\r').next().unwrap_or(&text).trim().to_string();
    last.split(": ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("unexpected redis-benchmark output: {last:?}"))
}

#[tokio::main]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let smoke = args.iter().any(|a| a == "--smoke");
    let as_json = args.iter().any(|a| a == "--json");
    let seconds = if smoke { 1 } else { env_number("RLS_BENCH_SECONDS", 5) };
    let connections = env_number("RLS_BENCH_CONNECTIONS", 4).max(1);
    let inflight = env_number("RLS_BENCH_INFLIGHT", 16).max(1);
    let users = env_number("RLS_BENCH_USERS", 50_000).max(1);

    let redis = RedisServer::start(&fresh_dir("rls-bench-redis"))?;
    let pg = PostgresServer::shared();
    let database_url = pg.create_unique_database("rlsbench").await?;
    let db = PgPoolOptions::new().max_connections(2).connect(&database_url).await?;
    infrabox_db::load_infrabox_schema(&db).await?;
    let key = SigningKey::shared();
    let secret = format!("bench-{}", uuid::Uuid::new_v4().simple());
    let cp = ControlPlane::start(ControlPlaneOptions {
        database_url,
        public_key_path: key.public_path().to_path_buf(),
        snapshot_secret: secret.clone(),
        env: vec![
            ("REDIS_URL".into(), redis.url()),
            ("INFRABOX_URL".into(), "http://127.0.0.1:9".into()),
            ("MCP_CREDENTIAL_KEY".into(), mcp_gateway_tests::stack::random_key_hex()),
            ("RUST_LOG".into(), "warn".into()),
        ],
    })?;

    // Warm up: connection, script load.
    let warm = drive(cp.grpc_addr(), &secret, 1, 1, 1, users).await?;
    if warm.decisions == 0 {
        bail!("the rate-limit service answered nothing during warm-up; log:\n{}", cp.log_contents());
    }
    let run = drive(cp.grpc_addr(), &secret, seconds, connections, inflight, users).await?;
    let per_second = run.decisions as f64 / run.seconds;
    let pct = |p: f64| {
        let l = &run.latencies_us;
        l.get(((l.len() as f64 * p) as usize).min(l.len().saturating_sub(1))).copied().unwrap_or(0)
    };
    let metrics = RawRequest::get("/metrics").send(cp.internal_addr(), Duration::from_secs(5)).await?.text();
    let metric = |name: &str| {
        metrics.lines().find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(' '))).and_then(|v| v.trim().parse::<f64>().ok())
    };
    let redis_mean_us = match (metric("mcp_ratelimit_redis_seconds_sum"), metric("mcp_ratelimit_redis_seconds_count")) {
        (Some(sum), Some(count)) if count > 0.0 => sum / count * 1e6,
        _ => 0.0,
    };
    if run.errors > 0 {
        bail!("{} decisions failed; log:\n{}", run.errors, cp.log_contents());
    }

    let sha = {
        let mut conn = redis::Client::open(redis.url())?.get_multiplexed_async_connection().await?;
        redis::cmd("SCRIPT").arg("LOAD").arg(SCRIPT).query_async::<String>(&mut conn).await?
    };
    let redis_rps = redis_benchmark(redis.port(), &sha, if smoke { 20_000 } else { 200_000 })?;

    println!(
        "rate-limit service (control-plane process, {connections} HTTP/2 connections x {inflight} in flight, {users} users, {:.1} s): \
         {per_second:.0} decisions/s, latency p50 {} us p99 {} us, Redis round trip mean {redis_mean_us:.0} us",
        run.seconds,
        pct(0.50),
        pct(0.99),
    );
    println!("redis-benchmark EVALSHA sliding_window.lua (50 clients, 50000 keys): {redis_rps:.0} requests/s");
    if as_json {
        println!(
            "{}",
            json!({
                "decisions_per_second": per_second,
                "decisions": run.decisions,
                "seconds": run.seconds,
                "connections": connections,
                "inflight_per_connection": inflight,
                "p50_us": pct(0.50),
                "p99_us": pct(0.99),
                "redis_round_trip_mean_us": redis_mean_us,
                "redis_benchmark_evalsha_per_second": redis_rps,
            })
        );
    }
    drop(cp);
    redis.stop()?;
    Ok(())
}
