//! The limiter on a real Redis Cluster (issue "Scale out", item 1; DESIGN
//! §9): three primaries with a replica each on loopback. Users' windows
//! spread over every primary and decide exactly as the reference model,
//! the script is loaded on whichever node misses it, a killed primary is
//! failed over to its replica with the decisions made meanwhile counted,
//! and the whole gateway runs on the cluster end to end.

use std::sync::Arc;
use std::time::{Duration, Instant};

use mcp_control_plane::ratelimit::metrics::RateLimitMetrics;
use mcp_control_plane::ratelimit::redis_store::RedisWindows;
use mcp_control_plane::ratelimit::store::{Limit, WindowKey, WindowStore};
use mcp_gateway_tests::http::RawRequest;
use mcp_gateway_tests::ratelimit_model::SlidingLog;
use mcp_gateway_tests::redis_cluster::{RedisCluster, NODE_TIMEOUT_MS};
use mcp_gateway_tests::scratch::fresh_dir;
use mcp_gateway_tests::stack::{Stack, StackOptions};
use rand::{Rng, SeedableRng};
use serde_json::json;
use uuid::Uuid;

fn store(cluster: &RedisCluster) -> (RedisWindows, Arc<RateLimitMetrics>) {
    let metrics = Arc::new(RateLimitMetrics::default());
    // The seeds as an operator writes them: REDIS_URL with several nodes.
    let w = RedisWindows::new(&cluster.redis_url(), Duration::from_millis(500), metrics.clone()).expect("cluster store");
    (w, metrics)
}

fn storage_key(user: &str, class: &str) -> String {
    WindowKey { user, class }.storage_key()
}

/// Users until their windows are on every primary (hash tags by user).
fn users_on_every_primary(cluster: &RedisCluster) -> Vec<(String, usize)> {
    let mut seen = std::collections::BTreeMap::new();
    while seen.len() < 3 {
        let user = Uuid::new_v4().to_string();
        let primary = cluster.primary_for(&storage_key(&user, "log")).expect("primary");
        assert_eq!(cluster.primary_for(&storage_key(&user, "default")).expect("primary"), primary, "one user's windows share a slot");
        seen.entry(primary).or_insert(user);
    }
    seen.into_iter().map(|(p, u)| (u, p)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn windows_on_every_primary_decide_exactly_like_the_model_and_scripts_reload_everywhere() {
    let cluster = RedisCluster::start(&fresh_dir("rl-cluster-exact"), 3).expect("cluster");
    let (windows, metrics) = store(&cluster);
    let users = users_on_every_primary(&cluster);
    let mut models: Vec<[SlidingLog; 2]> = users.iter().map(|_| Default::default()).collect();
    let classes = ["log", "default"];
    let mut rng = rand::rngs::StdRng::seed_from_u64(15);
    let (limit, window_us) = (3u32, 1_000_000u64);
    let mut decided = 0;
    for n in 0..150 {
        if n == 75 {
            // Every node forgets the script: whichever primary a key lives
            // on, the next call loads it there and decides.
            cluster.flush_scripts().expect("SCRIPT FLUSH");
        }
        tokio::time::sleep(Duration::from_millis(rng.gen_range(0..40))).await;
        let (u, c) = (rng.gen_range(0..users.len()), rng.gen_range(0..2));
        let key = WindowKey { user: &users[u].0, class: classes[c] };
        let d = windows.admit(&key, Limit { requests: limit, window: Duration::from_micros(window_us) }).await.expect("decision");
        let model = models[u][c].decide(d.at_us, limit, window_us);
        assert_eq!((d.allowed, d.remaining, d.reset.as_micros() as u64), model, "decision {n} for user on primary {}", users[u].1);
        decided += 1;
    }
    let text = {
        let mut out = String::new();
        metrics.render(&mut out);
        out
    };
    let reloads: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("mcp_ratelimit_script_reloads_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    assert!(reloads >= 2, "the script was loaded at first use and after the flush: {reloads}\n{text}");
    let per_primary = cluster.keys_per_primary();
    assert_eq!(per_primary.len(), 3);
    assert!(per_primary.iter().all(|(_, keys)| *keys > 0), "windows on every primary: {per_primary:?}");
    println!("{decided} decisions on 3 primaries {per_primary:?}, {reloads} script loads");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_primary_fails_over_to_its_replica_and_decisions_resume_exact() {
    let mut cluster = RedisCluster::start(&fresh_dir("rl-cluster-failover"), 3).expect("cluster");
    let (windows, _) = store(&cluster);
    let user = Uuid::new_v4().to_string();
    let primary = cluster.primary_for(&storage_key(&user, "log")).expect("primary");
    let key = WindowKey { user: &user, class: "log" };
    let limit = Limit { requests: 5, window: Duration::from_secs(1) };
    // Steady decisions, the primary killed after a second.
    let start = Instant::now();
    let (mut before, mut errors, mut after) = (0u32, 0u32, Vec::new());
    let mut killed_at = None;
    let mut resumed_at = None;
    let mut last_error = String::new();
    while start.elapsed() < Duration::from_secs(20) {
        if killed_at.is_none() && start.elapsed() > Duration::from_secs(1) {
            cluster.kill(primary).expect("kill");
            killed_at = Some(Instant::now());
        }
        let t = Instant::now();
        let r = windows.admit(&key, limit).await;
        assert!(t.elapsed() < Duration::from_millis(1_000), "a decision took {:?} (timeout 500 ms)", t.elapsed());
        match (r, killed_at) {
            (Ok(_), None) => before += 1,
            (Err(e), Some(_)) => {
                errors += 1;
                last_error = e.0.clone();
                assert!(e.0.starts_with("redis:"), "a store error, never a guess: {e}");
            }
            (Err(e), None) => panic!("error before the kill: {e}"),
            (Ok(d), Some(k)) => {
                resumed_at.get_or_insert_with(|| k.elapsed());
                after.push(d);
                if after.len() >= 40 {
                    break;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let Some(resumed) = resumed_at else {
        let other = (primary + 1) % cluster.nodes.len();
        panic!(
            "decisions never resumed after the failover ({errors} errors, last: {last_error}); the cluster:\n{}",
            cluster.nodes[other].cli(&["CLUSTER", "NODES"]).unwrap_or_default()
        );
    };
    // The replica took the slots: the key's primary is another node now.
    let now_primary = cluster.primary_for(&storage_key(&user, "log")).expect("primary");
    assert_ne!(now_primary, primary);
    // Admissions per window after the failover: replication is
    // asynchronous, so what the old primary admitted last may be missing on
    // the new one — counted here, never more than the limit once the first
    // window after the failover has passed.
    let over = |ds: &[mcp_control_plane::ratelimit::store::Decision]| {
        let allowed: Vec<u64> = ds.iter().filter(|d| d.allowed).map(|d| d.at_us).collect();
        allowed.iter().map(|t| allowed.iter().filter(|u| **u >= *t && **u < t + 1_000_000).count()).max().unwrap_or(0)
    };
    assert!(over(&after) <= limit.requests as usize, "more than the limit in one window on the new primary: {}", over(&after));
    // Exact again against a fresh model once a window has passed.
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let mut model = SlidingLog::default();
    for _ in 0..12 {
        let d = windows.admit(&key, limit).await.expect("decision after the failover");
        assert_eq!((d.allowed, d.remaining, d.reset.as_micros() as u64), model.decide(d.at_us, 5, 1_000_000));
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    // The old primary comes back as a replica; the cluster is whole again.
    cluster.restart(primary).expect("restart");
    cluster.wait_ok(Duration::from_secs(30)).expect("cluster ok");
    println!(
        "failover: {before} decisions before the kill, {errors} store errors while the replica took over \
         (node timeout {NODE_TIMEOUT_MS} ms), decisions resumed {resumed:?} after the kill"
    );
    assert!(errors > 0, "the kill was noticed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_limits_on_a_cluster_end_to_end() {
    let cluster = RedisCluster::start(&fresh_dir("rl-cluster-e2e"), 3).expect("cluster");
    let s = Stack::start(StackOptions {
        control_plane_env: vec![
            ("REDIS_URL".into(), cluster.redis_url()),
            ("MCP_LIMIT_LOG".into(), "3".into()),
            ("MCP_LIMIT_WINDOW_SECONDS".into(), "60".into()),
        ],
        plugin: json!({"ratelimit_timeout_ms": 2000}),
        ..StackOptions::default()
    })
    .await
    .expect("stack");
    let (user, projects) = s.user_with_projects("cluster", 1).await.unwrap();
    let (build, jobs) = s.infrabox.add_build(projects[0]).await.unwrap();
    let _ = build;
    let (_, token) = s.create_token(user, json!({}), 30).await.unwrap();
    let path = format!("/api/v1/mcp/projects/{}/jobs/{}/log", projects[0], jobs[0]);
    s.wait_until_status(&token, &format!("/api/v1/mcp/projects/{}", projects[0]), 200).await;
    let mut statuses = Vec::new();
    for _ in 0..4 {
        let r = s.send(RawRequest::get(&path).header("Authorization", &format!("Bearer {token}"))).await.unwrap();
        statuses.push(r.status);
    }
    assert_eq!(statuses, vec![200, 200, 200, 429], "three log reads per window, decided on the cluster");
    let degraded = s.envoy.stat("wasmcustom.mcp_ratelimit_degraded").unwrap_or(0);
    assert_eq!(degraded, 0, "every decision came from the service on the cluster");
    let key = storage_key(&user.to_string(), "log");
    let primary = cluster.primary_for(&key).unwrap();
    let n = cluster.nodes[primary].cli(&["ZCARD", &key]).unwrap();
    assert_eq!(n.trim(), "3", "the window lives on the primary of its slot");
}
