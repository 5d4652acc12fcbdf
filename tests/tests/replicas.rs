//! Replicas (issue "Scale out", item 2): three control planes on one
//! database and one Redis, behind the same Envoy clusters, and two Envoys in
//! front. A token change made on any replica reaches every VM within the
//! revocation budget; rate-limit decisions spread over the replicas are
//! exact together; the audit of both Envoys, through whichever replica each
//! stream lands on, has no gap.

use std::time::{Duration, Instant};

use mcp_gateway_tests::control_plane::ControlPlane;
use mcp_gateway_tests::envoy::{Envoy, EnvoyOptions};
use mcp_gateway_tests::http::{RawRequest, RawResponse};
use mcp_gateway_tests::stack::{Stack, StackOptions};
use serde_json::json;
use sqlx::Row;
use uuid::Uuid;

/// The revocation budget (README: a revocation reaches the edge within 2 s).
const BUDGET: Duration = Duration::from_secs(2);

struct Shape {
    s: Stack,
    replicas: Vec<ControlPlane>,
    envoys: Vec<Envoy>,
}

impl Shape {
    /// The stack's control plane plus two replicas; two new Envoys whose
    /// control-plane clusters hold all three.
    async fn start(limit_log: u32) -> Shape {
        let s = Stack::start(StackOptions {
            control_plane_env: vec![("MCP_LIMIT_LOG".into(), limit_log.to_string()), ("MCP_LIMIT_WINDOW_SECONDS".into(), "60".into())],
            // Every decision is the service's (no degraded decision on this
            // 2-core machine), and every record its own row.
            plugin: json!({"ratelimit_timeout_ms": 2000, "audit_coalesce_seconds": 0, "auth_failure_limit": 1_000_000}),
            ..StackOptions::default()
        })
        .await
        .expect("stack");
        let replicas: Vec<ControlPlane> = (0..2).map(|_| s.control_plane.replica().expect("replica")).collect();
        let mut opts: EnvoyOptions = s.envoy_options.clone();
        opts.replicas = replicas.iter().map(|r| (r.http_port(), r.internal_port(), r.grpc_port())).collect();
        let envoys: Vec<Envoy> = (0..2)
            .map(|i| {
                let mut o = opts.clone();
                o.node_id = format!("{}-{i}", opts.node_id);
                Envoy::start(&o).expect("envoy")
            })
            .collect();
        for e in &envoys {
            e.wait_stat("wasmcustom.mcp_snapshot_updates", 1, Duration::from_secs(20)).expect("first snapshot");
            let cfg = std::fs::read_to_string(e.config_path()).unwrap();
            for r in &replicas {
                assert!(cfg.contains(&format!("port_value: {} ", r.grpc_port())), "the replica is an endpoint of the clusters");
            }
        }
        Shape { s, replicas, envoys }
    }

    fn control_planes(&self) -> Vec<&ControlPlane> {
        std::iter::once(&self.s.control_plane).chain(self.replicas.iter()).collect()
    }

    /// The token API of one replica, directly (not through Envoy).
    async fn token_api_on(&self, cp: &ControlPlane, user: Uuid, method: &str, path: &str, body: Option<serde_json::Value>) -> RawResponse {
        let mut req = RawRequest::new(method, path).header("Authorization", &format!("Bearer {}", self.s.session(user)));
        if let Some(b) = body {
            req = req.json(&b);
        }
        req.send(cp.http_addr(), Duration::from_secs(10)).await.expect("token API")
    }
}

async fn get(envoy: &Envoy, token: &str, path: &str) -> u16 {
    RawRequest::get(path)
        .header("Authorization", &format!("Bearer {token}"))
        .send(envoy.addr(), Duration::from_secs(10))
        .await
        .map(|r| r.status)
        .unwrap_or(0)
}

/// Polls every Envoy until `path` answers `ok` there; the slowest time.
async fn everywhere(envoys: &[Envoy], token: &str, path: &str, ok: impl Fn(u16) -> bool) -> Duration {
    let start = Instant::now();
    for e in envoys {
        while !ok(get(e, token, path).await) {
            assert!(start.elapsed() < BUDGET * 5, "{path} never changed on {}", e.addr());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    start.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_two_envoys_tokens_limits_and_audit_agree() {
    let shape = Shape::start(6).await;
    let s = &shape.s;
    let (user, projects) = s.user_with_projects("replicas", 1).await.unwrap();
    let project = projects[0];
    let path = format!("/api/v1/mcp/projects/{project}");
    let cps = shape.control_planes();

    // Token changes on each replica in turn reach both Envoys in budget.
    let mut made_on = Vec::new();
    for (i, cp) in cps.iter().enumerate() {
        let r = shape
            .token_api_on(cp, user, "POST", "/api/v1/mcp/tokens", Some(json!({"name": format!("r{i}"), "enabled_projects": {}, "expires_days": 7})))
            .await;
        assert_eq!(r.status, 201, "{}", r.text());
        let v = r.json().unwrap();
        let (id, token) = (v["token_id"].as_str().unwrap().to_string(), v["token"].as_str().unwrap().to_string());
        let took = everywhere(&shape.envoys, &token, &path, |st| st == 200).await;
        assert!(took <= BUDGET, "a token made on replica {i} reached both Envoys after {took:?}");
        made_on.push((id, token, took));
    }
    // Each revoked on a different replica than the one that made it.
    for (i, (id, token, _)) in made_on.iter().enumerate() {
        let cp = cps[(i + 1) % cps.len()];
        let del = shape.token_api_on(cp, user, "DELETE", &format!("/api/v1/mcp/tokens/{id}"), None).await;
        assert!((200..300).contains(&del.status), "{}", del.text());
        let took = everywhere(&shape.envoys, token, &path, |st| st == 401).await;
        assert!(took <= BUDGET, "a revocation on replica {} reached both Envoys after {took:?}", (i + 1) % cps.len());
        println!("token made on replica {i} everywhere in {:?}, revoked on replica {} everywhere in {took:?}", made_on[i].2, (i + 1) % cps.len());
    }

    // One user's log budget (6 per minute) through both Envoys, whose
    // decisions spread over three replicas: exactly 6 admitted.
    let (build, jobs) = s.infrabox.add_build(project).await.unwrap();
    let _ = build;
    let (_, token) = s.create_token(user, json!({}), 7).await.unwrap();
    everywhere(&shape.envoys, &token, &path, |st| st == 200).await;
    let log = format!("/api/v1/mcp/projects/{project}/jobs/{}/log", jobs[0]);
    let mut tasks = Vec::new();
    for n in 0..18 {
        let addr = shape.envoys[n % 2].addr();
        let (token, log) = (token.clone(), log.clone());
        tasks.push(tokio::spawn(async move {
            RawRequest::get(&log).header("Authorization", &format!("Bearer {token}")).send(addr, Duration::from_secs(10)).await.map(|r| r.status).unwrap_or(0)
        }));
    }
    let mut statuses = Vec::new();
    for t in tasks {
        statuses.push(t.await.unwrap());
    }
    let admitted = statuses.iter().filter(|s| **s == 200).count();
    let limited = statuses.iter().filter(|s| **s == 429).count();
    assert_eq!((admitted, limited), (6, 12), "exact across replicas and Envoys: {statuses:?}");
    for e in &shape.envoys {
        assert_eq!(e.stat("wasmcustom.mcp_ratelimit_degraded").unwrap_or(0), 0, "every decision was a replica's");
    }
    // The decisions really were spread: every replica answered some.
    for (i, cp) in cps.iter().enumerate() {
        let m = RawRequest::get("/metrics").send(cp.internal_addr(), Duration::from_secs(5)).await.unwrap().text();
        let decided: u64 = m
            .lines()
            .filter(|l| l.starts_with("mcp_ratelimit_decisions_total"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum();
        println!("replica {i}: {decided} rate-limit decisions");
    }

    // Audit: every record of both Envoys is a row, no gap, settled.
    let records: u64 = shape.envoys.iter().map(|e| e.stat("wasmcustom.mcp_audit_records").unwrap_or(0)).sum();
    let start = Instant::now();
    loop {
        let r = sqlx::query(
            "SELECT (SELECT count(*) FROM mcp_access_log WHERE seq IS NOT NULL AND node_id LIKE $1) AS rows, \
                    (SELECT count(*) FROM mcp_audit_gap) AS gaps, \
                    (SELECT count(*) FROM mcp_audit_stream WHERE node_id LIKE $1) AS streams",
        )
        .bind(format!("{}-%", s.envoy_options.node_id))
        .fetch_one(&s.db)
        .await
        .unwrap();
        let (rows, gaps, streams): (i64, i64, i64) = (r.get("rows"), r.get("gaps"), r.get("streams"));
        if rows == records as i64 && gaps == 0 {
            assert_eq!(streams, 2, "one stream per Envoy (one worker each)");
            println!("audit: {records} records from two Envoys, {rows} rows, no gap");
            break;
        }
        assert!(gaps == 0, "an audit gap between two Envoys and three replicas");
        assert!(start.elapsed() < Duration::from_secs(20), "{rows} rows of {records} records after 20 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
