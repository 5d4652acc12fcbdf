//! Rate limiting (issue "Rate limiting", DESIGN §9) with real parts: the
//! sliding-window script against real Redis (property test against a
//! reference sliding log, clocked by Redis TIME), the control plane's
//! `envoy.service.ratelimit.v3` service, and real Envoy running the filter —
//! global limits across Envoys, degraded mode when Redis or the service is
//! away, and the watchdog deadline.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::{Entry, RateLimitOverride};
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use mcp_control_plane::ratelimit::metrics::RateLimitMetrics;
use mcp_control_plane::ratelimit::redis_store::RedisWindows;
use mcp_control_plane::ratelimit::store::{Limit, WindowKey, WindowStore};
use mcp_gateway_tests::envoy::{Envoy, RlsTarget};
use mcp_gateway_tests::http::{RawRequest, RawResponse};
use mcp_gateway_tests::ports::free_port;
use mcp_gateway_tests::ratelimit_model::SlidingLog;
use mcp_gateway_tests::redis::RedisServer;
use mcp_gateway_tests::scratch::fresh_dir;
use mcp_gateway_tests::stack::{Stack, StackOptions};
use proptest::prelude::*;
use serde_json::{json, Value};
use uuid::Uuid;

// ---------------------------------------------------------------------------
// The limiter against real Redis

fn private_redis(name: &str) -> RedisServer {
    RedisServer::start(&fresh_dir(name)).expect("redis-server")
}

fn windows(redis: &RedisServer) -> (RedisWindows, Arc<RateLimitMetrics>) {
    let metrics = Arc::new(RateLimitMetrics::default());
    let w = RedisWindows::new(&redis.url(), Duration::from_millis(500), metrics.clone()).expect("store");
    (w, metrics)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, max_shrink_iters: 8, ..ProptestConfig::default() })]

    /// Random arrival sequences over two keys (one user, two classes) with
    /// a 1–1.5 s window: every decision the script makes with Redis TIME is
    /// exactly the reference model's decision at the time Redis reports,
    /// remaining and reset included. Denials never consume budget (the
    /// model does not record them).
    #[test]
    fn sliding_window_script_matches_the_reference_model_on_real_redis(
        limit in 1u32..5,
        window_ms in prop_oneof![Just(1_000u64), Just(1_500u64)],
        arrivals in proptest::collection::vec((0u64..300, 0usize..2), 4..16),
    ) {
        static REDIS: std::sync::OnceLock<RedisServer> = std::sync::OnceLock::new();
        let redis = REDIS.get_or_init(|| private_redis("ratelimit-prop"));
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let user = Uuid::new_v4().to_string();
        let classes = ["log", "default"];
        let result: Result<(), TestCaseError> = rt.block_on(async {
            let (store, _) = windows(redis);
            let mut models: HashMap<usize, SlidingLog> = HashMap::new();
            let mut last_at = 0u64;
            for (n, (gap, which)) in arrivals.iter().enumerate() {
                tokio::time::sleep(Duration::from_millis(*gap)).await;
                let key = WindowKey { user: &user, class: classes[*which] };
                let d = store
                    .admit(&key, Limit { requests: limit, window: Duration::from_millis(window_ms) })
                    .await
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                prop_assert!(d.at_us > last_at, "Redis TIME went backwards");
                last_at = d.at_us;
                let (allowed, remaining, reset_us) = models.entry(*which).or_default().decide(d.at_us, limit, window_ms * 1000);
                prop_assert_eq!(
                    (d.allowed, d.remaining, d.reset.as_micros() as u64),
                    (allowed, remaining, reset_us),
                    "arrival {} ({}) at {} µs", n, classes[*which], d.at_us
                );
            }
            Ok(())
        });
        result?;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn script_reloads_after_noscript_and_windows_expire_after_one_window() {
    let redis = private_redis("ratelimit-script");
    let (store, metrics) = windows(&redis);
    let user = Uuid::new_v4().to_string();
    let key = WindowKey { user: &user, class: "write" };
    let limit = Limit { requests: 2, window: Duration::from_secs(3) };
    let mut conn = redis::Client::open(redis.url()).unwrap().get_multiplexed_async_connection().await.unwrap();

    // First use: Redis has never seen the script.
    let d = store.admit(&key, limit).await.unwrap();
    assert!(d.allowed && d.remaining == 1, "{d:?}");
    let storage_key = format!("ib_mcp_rl:{{{user}}}:write");
    let ttl: i64 = redis::cmd("PTTL").arg(&storage_key).query_async(&mut conn).await.unwrap();
    assert!((1..=3000).contains(&ttl), "TTL of one window, got {ttl} ms");
    assert_eq!(metrics.decisions(), (0, 0), "the store itself does not count service decisions");
    let reloads_after_first = render(&metrics);

    redis::cmd("SCRIPT").arg("FLUSH").query_async::<()>(&mut conn).await.unwrap();
    let d = store.admit(&key, limit).await.unwrap();
    assert!(d.allowed && d.remaining == 0, "{d:?}");
    let d = store.admit(&key, limit).await.unwrap();
    assert!(!d.allowed && d.remaining == 0, "{d:?}");
    assert!(d.reset <= Duration::from_secs(3) && d.reset > Duration::from_millis(2_500), "{d:?}");
    let members: i64 = redis::cmd("ZCARD").arg(&storage_key).query_async(&mut conn).await.unwrap();
    assert_eq!(members, 2, "a denial is not recorded");
    assert!(reloads_after_first.contains("mcp_ratelimit_script_reloads_total 1\n"), "{reloads_after_first}");
    assert!(render(&metrics).contains("mcp_ratelimit_script_reloads_total 2\n"));

    // The key disappears with its newest entry.
    tokio::time::sleep(Duration::from_millis(3_100)).await;
    let exists: i64 = redis::cmd("EXISTS").arg(&storage_key).query_async(&mut conn).await.unwrap();
    assert_eq!(exists, 0);
}

fn render(m: &RateLimitMetrics) -> String {
    let mut out = String::new();
    m.render(&mut out);
    out
}

// ---------------------------------------------------------------------------
// Helpers for the end-to-end tests

/// The class limits (the product defaults) with a short window.
fn limits_env(window_seconds: u32) -> Vec<(String, String)> {
    [
        ("MCP_LIMIT_WINDOW_SECONDS", window_seconds.to_string()),
        ("MCP_LIMIT_LOG", "10".into()),
        ("MCP_LIMIT_ARTIFACT", "10".into()),
        ("MCP_LIMIT_WRITE", "5".into()),
        ("MCP_LIMIT_DEFAULT", "30".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

/// A stack whose filter waits long enough for the service that, on this
/// 2-core machine, every decision in these tests is the service's.
async fn stack_with(window_seconds: u32, extra_env: Vec<(String, String)>, rls_timeout_ms: u32) -> Stack {
    Stack::start(StackOptions {
        control_plane_env: [limits_env(window_seconds), extra_env].concat(),
        plugin: json!({ "ratelimit_timeout_ms": rls_timeout_ms }),
        ..Default::default()
    })
    .await
    .expect("stack")
}

/// A user with one project with one build; returns (user, project, job).
async fn user_with_job(s: &Stack, name: &str) -> (Uuid, Uuid, Uuid) {
    let (user, projects) = s.user_with_projects(name, 1).await.unwrap();
    let (_, jobs) = s.infrabox.add_build(projects[0]).await.unwrap();
    (user, projects[0], jobs[0])
}

/// A token whose snapshot has reached the edge (waits with a request in
/// the `default` class).
async fn live_token(s: &Stack, user: Uuid, project: Uuid) -> String {
    let (_, token) = s.create_token(user, json!({}), 30).await.unwrap();
    s.wait_until_status(&token, &format!("/api/v1/mcp/projects/{project}"), 200).await;
    token
}

fn log_path(project: Uuid, job: Uuid) -> String {
    format!("/api/v1/mcp/projects/{project}/jobs/{job}/log")
}

fn header_u64(r: &RawResponse, name: &str) -> u64 {
    r.header(name)
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("{name} missing or not a number: {:?} {}", r.headers, r.text()))
}

fn assert_rate_limited(r: &RawResponse, limit: u64) {
    assert_eq!(r.status, 429, "{}", r.text());
    let v: Value = r.json().unwrap();
    assert_eq!(v["error"], "rate_limited", "{v}");
    assert!(v["request_id"].is_string(), "{v}");
    assert_eq!(header_u64(r, "ratelimit-limit"), limit);
    assert_eq!(header_u64(r, "ratelimit-remaining"), 0);
    assert!(header_u64(r, "retry-after") >= 1);
    assert_eq!(header_u64(r, "retry-after"), header_u64(r, "ratelimit-reset"));
}

fn stat(envoy: &Envoy, name: &str) -> u64 {
    envoy.stat(&format!("wasmcustom.{name}")).unwrap_or(0)
}

async fn get_on(addr: SocketAddr, token: &str, path: &str) -> RawResponse {
    RawRequest::get(path)
        .header("Authorization", &format!("Bearer {token}"))
        .send(addr, Duration::from_secs(20))
        .await
        .expect("request through the gateway")
}

/// The control plane's Prometheus text (internal listener).
async fn control_plane_metrics(s: &Stack) -> String {
    let r = RawRequest::get("/metrics").send(s.control_plane.internal_addr(), Duration::from_secs(5)).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    r.text()
}

/// `ShouldRateLimit` straight to the control plane's gRPC listener.
/// One `ShouldRateLimit` call with the internal credential `secret`.
async fn should_rate_limit(addr: SocketAddr, secret: &str, user: &str, class: &str, limit: u32) -> Result<RateLimitResponse, tonic::Status> {
    let mut client = RateLimitServiceClient::connect(format!("http://{addr}"))
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let request = RateLimitRequest {
        domain: "infrabox-mcp".into(),
        descriptors: vec![RateLimitDescriptor {
            entries: vec![
                Entry { key: "user".into(), value: user.into() },
                Entry { key: "class".into(), value: class.into() },
            ],
            limit: Some(RateLimitOverride { requests_per_unit: limit, unit: 2 }),
            ..Default::default()
        }],
        hits_addend: 1,
    };
    let mut request = tonic::Request::new(request);
    request.metadata_mut().insert("authorization", format!("Bearer {secret}").parse().map_err(|_| tonic::Status::internal("metadata"))?);
    client.should_rate_limit(request).await.map(|r| r.into_inner())
}

// ---------------------------------------------------------------------------
// End to end through real Envoy

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eleventh_log_request_is_429_and_one_more_is_admitted_when_the_oldest_leaves() {
    const WINDOW: Duration = Duration::from_secs(4);
    let s = stack_with(4, vec![], 1_000).await;
    let (user, project, job) = user_with_job(&s, "lena").await;
    let token = live_token(&s, user, project).await;
    let path = log_path(project, job);

    let sent1 = Instant::now();
    let r = s.mcp_get(&token, &path).await.unwrap();
    let recv1 = Instant::now();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!((header_u64(&r, "ratelimit-limit"), header_u64(&r, "ratelimit-remaining")), (10, 9));
    assert!((1..=4).contains(&header_u64(&r, "ratelimit-reset")));
    // The oldest request stands apart from the next nine.
    tokio::time::sleep(Duration::from_millis(600)).await;
    for n in 2..=10 {
        let r = s.mcp_get(&token, &path).await.unwrap();
        assert_eq!(r.status, 200, "request {n}: {}", r.text());
        assert_eq!(header_u64(&r, "ratelimit-remaining"), 10 - n);
    }
    let sent11 = Instant::now();
    let r = s.mcp_get(&token, &path).await.unwrap();
    let recv11 = Instant::now();
    assert_rate_limited(&r, 10);
    // Retry-After = the oldest admission + window − now, rounded up; the
    // admission and the decision happened inside their request's round trip.
    let ceil = |d: Duration| d.as_millis().div_ceil(1000) as u64;
    let (lo, hi) = (ceil((sent1 + WINDOW).saturating_duration_since(recv11)), ceil((recv1 + WINDOW) - sent11));
    let retry_after = header_u64(&r, "retry-after");
    println!("11th request: Retry-After {retry_after} s (allowed range {lo}..={hi})");
    assert!((lo..=hi).contains(&retry_after), "Retry-After {retry_after} not in {lo}..={hi}");
    assert_rate_limited(&s.mcp_get(&token, &path).await.unwrap(), 10);

    // The oldest has left (its admission was before recv1); the second
    // (sent ≥ 600 ms later) has not: exactly one more is admitted.
    tokio::time::sleep((recv1 + WINDOW + Duration::from_millis(150)).saturating_duration_since(Instant::now())).await;
    let r = s.mcp_get(&token, &path).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(header_u64(&r, "ratelimit-remaining"), 0);
    let r = s.mcp_get(&token, &path).await.unwrap();
    assert_rate_limited(&r, 10);
    assert!(recv1.elapsed() < WINDOW + Duration::from_millis(600), "test too slow to show the window");

    assert_eq!(stat(&s.envoy, "mcp_ratelimit_degraded"), 0, "every decision was the service's");
    assert_eq!(stat(&s.envoy, "mcp_ratelimit_limited"), 3);
    let metrics = control_plane_metrics(&s).await;
    assert!(metrics.contains("mcp_ratelimit_decisions_total{result=\"over_limit\"} 3\n"), "{metrics}");
    assert!(metrics.contains("mcp_ratelimit_redis_seconds_count "), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn classes_are_independent_and_one_users_tokens_share_one_budget() {
    let s = stack_with(60, vec![], 1_000).await;
    let (alice, project, job) = user_with_job(&s, "alice").await;
    let (bob, bob_project, bob_job) = user_with_job(&s, "bob").await;
    let t1 = live_token(&s, alice, project).await;
    let t2 = live_token(&s, alice, project).await;
    let tb = live_token(&s, bob, bob_project).await;
    let path = log_path(project, job);

    for n in 0..10 {
        let token = if n % 2 == 0 { &t1 } else { &t2 };
        let r = s.mcp_get(token, &path).await.unwrap();
        assert_eq!(r.status, 200, "log request {n}: {}", r.text());
        assert_eq!(header_u64(&r, "ratelimit-remaining"), 9 - n);
    }
    // Minting another token does not multiply the budget.
    assert_rate_limited(&s.mcp_get(&t1, &path).await.unwrap(), 10);
    assert_rate_limited(&s.mcp_get(&t2, &path).await.unwrap(), 10);
    let t3 = live_token(&s, alice, project).await;
    assert_rate_limited(&s.mcp_get(&t3, &path).await.unwrap(), 10);

    // Other classes of the same user have their own budgets.
    let r = s.mcp_get(&t1, &format!("/api/v1/mcp/projects/{project}/jobs/{job}/artifacts")).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!((header_u64(&r, "ratelimit-limit"), header_u64(&r, "ratelimit-remaining")), (10, 9));
    let r = s.mcp_get(&t1, &format!("/api/v1/mcp/projects/{project}/builds")).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(header_u64(&r, "ratelimit-limit"), 30);

    // Another user's log budget is untouched.
    let r = s.mcp_get(&tb, &log_path(bob_project, bob_job)).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(header_u64(&r, "ratelimit-remaining"), 9);

    // Limit headers also ride on denials after the limit step.
    let other = Uuid::new_v4();
    let r = s.mcp_get(&tb, &format!("/api/v1/mcp/projects/{other}/builds")).await.unwrap();
    assert_eq!(r.status, 403, "{}", r.text());
    assert_eq!(header_u64(&r, "ratelimit-limit"), 30);
    assert!(r.header("ratelimit-remaining").is_some() && r.header("ratelimit-reset").is_some());
    assert_eq!(stat(&s.envoy, "mcp_ratelimit_degraded"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_envoys_against_one_redis_enforce_one_global_limit() {
    let s = stack_with(60, vec![], 1_000).await;
    let mut opts = s.envoy_options.clone();
    opts.node_id = format!("second-{}", Uuid::new_v4().simple());
    let second = Envoy::start(&opts).unwrap();
    second.wait_stat("wasmcustom.mcp_snapshot_updates", 1, Duration::from_secs(20)).unwrap();
    let (a, b) = (s.gateway(), second.addr());

    // A concurrent burst on both: exactly the limit is admitted in total.
    let (user, project, job) = user_with_job(&s, "burst").await;
    let token = live_token(&s, user, project).await;
    let path = log_path(project, job);
    let mut tasks = Vec::new();
    for n in 0..24 {
        let (token, path) = (token.clone(), path.clone());
        let addr = if n % 2 == 0 { a } else { b };
        tasks.push(tokio::spawn(async move { (addr, get_on(addr, &token, &path).await.status) }));
    }
    let mut admitted: HashMap<SocketAddr, usize> = HashMap::new();
    let mut limited = 0;
    for t in tasks {
        match t.await.unwrap() {
            (addr, 200) => *admitted.entry(addr).or_default() += 1,
            (_, 429) => limited += 1,
            (_, other) => panic!("unexpected status {other}"),
        }
    }
    println!("concurrent burst of 24 over two Envoys: admitted {admitted:?}, limited {limited}");
    assert_eq!(admitted.values().sum::<usize>(), 10, "{admitted:?}");
    assert_eq!(limited, 14);

    // Alternating: five on each, then the 11th on either is refused.
    let (user, project, job) = user_with_job(&s, "alternating").await;
    let token = live_token(&s, user, project).await;
    let path = log_path(project, job);
    for n in 0..10 {
        let r = get_on(if n % 2 == 0 { a } else { b }, &token, &path).await;
        assert_eq!(r.status, 200, "request {n}: {}", r.text());
        assert_eq!(header_u64(&r, "ratelimit-remaining"), 9 - n as u64);
    }
    assert_rate_limited(&get_on(a, &token, &path).await, 10);
    assert_rate_limited(&get_on(b, &token, &path).await, 10);
    assert_eq!(stat(&s.envoy, "mcp_ratelimit_degraded") + stat(&second, "mcp_ratelimit_degraded"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_stopped_mid_test_degrades_to_local_limits_and_recovers() {
    let redis = private_redis("ratelimit-outage");
    let s = stack_with(60, vec![("REDIS_URL".into(), redis.url())], 1_000).await;
    let (user, project, job) = user_with_job(&s, "outage").await;
    let token = live_token(&s, user, project).await;
    let path = log_path(project, job);
    for n in 0..3 {
        let r = s.mcp_get(&token, &path).await.unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(header_u64(&r, "ratelimit-remaining"), 9 - n);
    }
    assert_eq!(stat(&s.envoy, "mcp_ratelimit_degraded"), 0);

    redis.stop().unwrap();
    let mut statuses = Vec::new();
    for _ in 0..15 {
        let r = s.mcp_get(&token, &path).await.unwrap();
        if r.status == 429 {
            assert_rate_limited(&r, 10);
        }
        statuses.push(r.status);
    }
    let ok = statuses.iter().filter(|s| **s == 200).count();
    println!("with Redis stopped: {statuses:?}");
    // The local window of this Envoy decides with the same limit: not unlimited.
    assert_eq!(ok, 10, "{statuses:?}");
    assert!(statuses[10..].iter().all(|s| *s == 429), "{statuses:?}");
    let degraded = stat(&s.envoy, "mcp_ratelimit_degraded");
    assert_eq!(degraded, 15);
    assert!(stat(&s.envoy, "mcp_ratelimit_rls_errors") >= 15);
    let metrics = control_plane_metrics(&s).await;
    assert!(!metrics.contains("mcp_ratelimit_errors_total{kind=\"unavailable\"} 0\n"), "{metrics}");

    redis.restart().unwrap();
    // Recovered once a request is decided by the service again.
    let started = Instant::now();
    let builds = format!("/api/v1/mcp/projects/{project}/builds");
    loop {
        let before = stat(&s.envoy, "mcp_ratelimit_degraded");
        let r = s.mcp_get(&token, &builds).await.unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        if stat(&s.envoy, "mcp_ratelimit_degraded") == before {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(15), "the service did not recover");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!("service deciding again {:?} after Redis restarted", started.elapsed());
    // Redis restarted empty: the log class is admitted again by the service,
    // although the local window is exhausted.
    let before = stat(&s.envoy, "mcp_ratelimit_degraded");
    let r = s.mcp_get(&token, &path).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(header_u64(&r, "ratelimit-remaining"), 9);
    assert_eq!(stat(&s.envoy, "mcp_ratelimit_degraded"), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_plane_starts_without_redis_and_answers_unavailable_until_it_is_back() {
    let redis = private_redis("ratelimit-late");
    redis.stop().unwrap();
    let s = stack_with(60, vec![("REDIS_URL".into(), redis.url())], 1_000).await;
    let user = Uuid::new_v4().to_string();
    let grpc = s.control_plane.grpc_addr();
    // Without the internal credential nothing is decided at all.
    let e = should_rate_limit(grpc, "not-the-secret-0123456789", &user, "log", 10).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
    let e = should_rate_limit(grpc, &s.grpc_secret, &user, "log", 10).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
    assert!(!e.message().contains(&redis.url()), "{e:?}");
    // Malformed requests are refused as such.
    let e = should_rate_limit(grpc, &s.grpc_secret, "a}b", "log", 10).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");

    // Through Envoy, MCP requests are decided locally meanwhile — and the
    // job's ownership is still checked by the service (from the database).
    let (u, project, job) = user_with_job(&s, "late").await;
    let token = live_token(&s, u, project).await;
    assert_eq!(s.mcp_get(&token, &log_path(project, job)).await.unwrap().status, 200);
    assert!(stat(&s.envoy, "mcp_ratelimit_degraded") >= 2);
    let (_, other_project, foreign_job) = user_with_job(&s, "late-other").await;
    assert_ne!(other_project, project);
    let r = s.mcp_get(&token, &log_path(project, foreign_job)).await.unwrap();
    assert_eq!((r.status, r.json().unwrap()["error"].as_str().map(str::to_string)), (404, Some("unknown_endpoint".into())));

    redis.restart().unwrap();
    let started = Instant::now();
    let answer = loop {
        match should_rate_limit(grpc, &s.grpc_secret, &user, "log", 10).await {
            Ok(a) => break a,
            Err(e) => {
                assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
                assert!(started.elapsed() < Duration::from_secs(15), "no recovery: {e:?}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    assert_eq!(answer.overall_code, 1, "{answer:?}");
    assert_eq!(answer.statuses[0].limit_remaining, 9);
    let reset = answer.statuses[0].duration_until_reset.unwrap();
    assert_eq!((reset.seconds, reset.nanos), (60, 0), "a fresh window resets after a whole window");
}

/// A listener that accepts connections and never answers.
async fn black_hole() -> (u16, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((conn, _)) = listener.accept().await {
            held.push(conn);
        }
    });
    (port, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_rate_limit_service_is_decided_within_twice_the_deadline() {
    const DEADLINE_MS: u64 = 50; // the plugin default
    let (hole, hole_task) = black_hole().await;
    for (name, target) in [
        ("no listener", RlsTarget::Port(free_port())),
        ("no healthy endpoint", RlsTarget::Unhealthy),
        ("listener that never answers", RlsTarget::Port(hole)),
    ] {
        let s = Stack::start(StackOptions {
            control_plane_env: limits_env(60),
            rls_target: target,
            ..Default::default()
        })
        .await
        .expect("stack");
        let (user, project, job) = user_with_job(&s, "deadline").await;
        let (_, token) = s.create_token(user, json!({}), 30).await.unwrap();
        // The snapshot with the token (decided locally, like everything here).
        s.wait_until_status(&token, &format!("/api/v1/mcp/projects/{project}"), 200).await;
        let path = log_path(project, job);
        let mut took = Vec::new();
        let mut statuses = Vec::new();
        for _ in 0..12 {
            let started = Instant::now();
            let r = s.mcp_get(&token, &path).await.unwrap();
            took.push(started.elapsed());
            statuses.push(r.status);
            assert!(r.header("ratelimit-limit").is_some(), "{:?}", r.headers);
        }
        took.sort();
        println!(
            "{name}: 12 MCP requests decided locally in min {:?} / median {:?} / max {:?} (deadline {DEADLINE_MS} ms)",
            took[0], took[6], took[11]
        );
        assert!(took[11] < Duration::from_millis(2 * DEADLINE_MS), "{name}: slowest {:?}", took[11]);
        // The local window admits exactly the limit; with no service that
        // ever answered, whether the job belongs to the project cannot be
        // checked, so the admitted ones are refused safely (503, never
        // forwarded) and the rest are 429.
        assert_eq!(statuses.iter().filter(|s| **s == 503).count(), 10, "{name}: {statuses:?}");
        assert_eq!(statuses.iter().filter(|s| **s == 429).count(), 2, "{name}: {statuses:?}");
        assert!(stat(&s.envoy, "mcp_ratelimit_degraded") >= 12, "{name}");
        let r = s.mcp_get(&token, &path).await.unwrap();
        assert!(matches!(r.json().unwrap()["error"].as_str(), Some("rate_limited")), "{}", r.text());
        assert!(s.infrabox.requests_matching(&format!("/api/v1/projects/{project}/jobs/")).is_empty(), "{name}: forwarded unchecked");
        // A route without builds or jobs is forwarded on the local decision.
        let r = s.mcp_get(&token, &format!("/api/v1/mcp/projects/{project}/builds")).await.unwrap();
        assert_eq!(r.status, 200, "{name}: {}", r.text());
    }
    hole_task.abort();
}
