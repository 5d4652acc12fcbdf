//! Audit end to end (issue "Audit"): every MCP request and every blocked
//! `ib_mcp_` use elsewhere goes through real Envoy (the filter's
//! `wasm.mcp_audit` filter state, Envoy's gRPC access log) into the control
//! plane and one `mcp_access_log` row in real Postgres; loss is detected as
//! sequence gaps; retention and the access-log API.
//!
//! Tests wait for the flush by polling the table, never by a blind sleep.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use envoy_types::pb::envoy::data::accesslog::v3::{AccessLogCommon, HttpAccessLogEntry, HttpResponseProperties};
use envoy_types::pb::envoy::service::accesslog::v3::access_log_service_client::AccessLogServiceClient;
use envoy_types::pb::envoy::service::accesslog::v3::stream_access_logs_message::{HttpAccessLogEntries, LogEntries};
use envoy_types::pb::envoy::service::accesslog::v3::StreamAccessLogsMessage;
use envoy_types::pb::google::protobuf::{Any, BytesValue, Timestamp, UInt32Value};
use mcp_filter_core::audit::{AuditRecord, Decision, FILTER_STATE_KEY};
use mcp_gateway_tests::http::{RawRequest, RawResponse};
use mcp_gateway_tests::stack::{Stack, StackOptions};
use prost::Message;
use serde_json::{json, Value};
use sqlx::{PgPool, Row};
use uuid::Uuid;

/// Gap detection settles after 1 s in these tests (production: 300 s).
const FAST_GAPS: [(&str, &str); 2] = [("MCP_AUDIT_GAP_GRACE_SECONDS", "1"), ("MCP_AUDIT_GAP_CHECK_SECONDS", "1")];

/// These suites test the transport of one record per request: identical
/// denials are not coalesced here and the address's failed-authentication
/// budget is out of reach (both are tested in tests/attacks.rs).
async fn stack(env: &[(&str, &str)]) -> Stack {
    Stack::start(StackOptions {
        control_plane_env: env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        plugin: json!({"audit_coalesce_seconds": 0, "auth_failure_limit": 1_000_000}),
        ..StackOptions::default()
    })
    .await
    .expect("stack")
}

/// Records the filter has set so far (the Envoy counter of its VMs).
fn records_set(s: &Stack) -> u64 {
    s.envoy.stat("wasmcustom.mcp_audit_records").unwrap_or(0)
}

/// Rows that came through Envoy (the token API's own rows have no sequence).
async fn audited_count(db: &PgPool) -> i64 {
    sqlx::query("SELECT count(*) AS n FROM mcp_access_log WHERE seq IS NOT NULL")
        .fetch_one(db)
        .await
        .unwrap()
        .get("n")
}

/// Polls until `audited_count == n`; fails if it exceeds `n` or times out.
async fn wait_audited(s: &Stack, n: i64, timeout: Duration) {
    let start = Instant::now();
    loop {
        let got = audited_count(&s.db).await;
        assert!(got <= n, "more audit rows ({got}) than audited requests ({n})");
        if got == n {
            return;
        }
        assert!(
            start.elapsed() < timeout,
            "only {got} of {n} audit rows after {timeout:?}; control-plane log:\n{}",
            tail(&s.control_plane.log_contents(), 3000)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn tail(s: &str, n: usize) -> &str {
    let mut start = s.len().saturating_sub(n);
    while !s.is_char_boundary(start) {
        start += 1;
    }
    &s[start..]
}

/// The control plane's Prometheus text.
async fn metrics(s: &Stack) -> String {
    let r = RawRequest::get("/metrics").send(s.control_plane.internal_addr(), Duration::from_secs(5)).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    r.text()
}

fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("metric {name} missing in:\n{text}"))
}

/// Polls `/metrics` until `name` reads `value` (counters move right after
/// the commit that made the rows visible) and returns the whole text.
async fn wait_metric(s: &Stack, name: &str, value: u64) -> String {
    let start = Instant::now();
    loop {
        let text = metrics(s).await;
        let now = metric(&text, name);
        if now == value {
            return text;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "{name} is {now}, expected {value}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn bearer(req: RawRequest, token: &str) -> RawRequest {
    req.header("Authorization", &format!("Bearer {token}"))
}

/// What a test compares of a row.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Seen {
    method: String,
    path: String,
    status: Option<i16>,
    outcome: String,
    error: Option<String>,
    token_id: Option<String>,
    user_id: Option<Uuid>,
    project_id: Option<Uuid>,
    route: Option<String>,
}

async fn seen_after(db: &PgPool, seq_above: i64) -> Vec<Seen> {
    let rows = sqlx::query(
        "SELECT method, path, status_code, outcome, error, token_id, user_id, project_id, route \
         FROM mcp_access_log WHERE seq > $1 ORDER BY seq",
    )
    .bind(seq_above)
    .fetch_all(db)
    .await
    .unwrap();
    rows.iter()
        .map(|r| Seen {
            method: r.get("method"),
            path: r.get("path"),
            status: r.get("status_code"),
            outcome: r.get("outcome"),
            error: r.get("error"),
            token_id: r.get("token_id"),
            user_id: r.get("user_id"),
            project_id: r.get("project_id"),
            route: r.get("route"),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_decision_through_envoy_becomes_exactly_one_row() {
    let s = stack(&FAST_GAPS).await;
    let (user, projects) = s.user_with_projects("alice", 2).await.unwrap();
    let (p0, p1) = (projects[0], projects[1]);
    let (tid, token) = s.create_token(user, json!({ p0.to_string(): null }), 30).await.unwrap();
    s.wait_until_status(&token, &format!("/api/v1/mcp/projects/{p0}"), 200).await;
    let base = records_set(&s);
    let unknown = format!("ib_mcp_{}", "ab".repeat(24));
    let mcp = |rest: &str| format!("/api/v1/mcp/projects/{rest}");

    // (request, status, outcome, error, attributed, project, route)
    type Case = (RawRequest, u16, &'static str, Option<&'static str>, bool, Option<Uuid>, Option<&'static str>);
    let cases: Vec<Case> = vec![
        (bearer(RawRequest::get(&mcp(&p0.to_string())), &token), 200, "success", None, true, Some(p0), Some("projects.get")),
        (bearer(RawRequest::get(&format!("{}/builds?size=5", mcp(&p0.to_string()))), &token), 200, "success", None, true, Some(p0), Some("builds.list")),
        (RawRequest::get(&mcp(&p0.to_string())), 401, "unauthorized", Some("invalid_token"), false, Some(p0), Some("projects.get")),
        (bearer(RawRequest::get(&mcp(&p0.to_string())), &unknown), 401, "unauthorized", Some("invalid_token"), false, Some(p0), Some("projects.get")),
        (bearer(RawRequest::get(&mcp(&p1.to_string())), &token), 403, "forbidden", Some("project_forbidden"), true, Some(p1), Some("projects.get")),
        (bearer(RawRequest::post(&format!("{}/trigger", mcp(&p0.to_string()))), &token).body("{}"), 403, "forbidden", Some("write_forbidden"), true, Some(p0), Some("projects.trigger")),
        (bearer(RawRequest::get(&format!("{}/nope", mcp(&p0.to_string()))), &token), 404, "not_found", Some("unknown_endpoint"), true, Some(p0), None),
        (bearer(RawRequest::new("DELETE", &mcp(&p0.to_string())), &token), 405, "not_found", Some("method_not_allowed"), true, Some(p0), None),
        (bearer(RawRequest::get(&mcp("NOT-A-UUID")), &token), 400, "bad_request", Some("bad_path"), true, None, None),
        (RawRequest::get(&format!("/api/v1/projects/{p0}")).header("Authorization", &format!("bearer {token}")), 403, "forbidden", Some("mcp_token_not_accepted"), true, None, None),
        (RawRequest::get(&format!("/api/v1/projects/{p0}")).header("Cookie", &format!("theme=dark; token={token}")), 403, "forbidden", Some("mcp_token_not_accepted"), true, None, None),
    ];
    let mut expected = Vec::new();
    let mut denial_ids = Vec::new();
    for (req, status, outcome, error, attributed, project, route) in cases {
        let path = req.path.split('?').next().unwrap().to_string();
        let method = req.method.clone();
        let resp = s.send(req).await.unwrap();
        assert_eq!(resp.status, status, "{method} {path}: {}", resp.text());
        if status != 200 {
            let id = resp.json().unwrap()["request_id"].as_str().unwrap().to_string();
            denial_ids.push((id, outcome));
        }
        expected.push(Seen {
            method,
            path,
            status: Some(status as i16),
            outcome: outcome.into(),
            error: error.map(Into::into),
            token_id: attributed.then(|| tid.clone()),
            user_id: attributed.then_some(user),
            project_id: project,
            route: route.map(Into::into),
        });
    }
    // Not audited: a request without an MCP credential elsewhere, and the token API.
    let resp = s.send(RawRequest::get(&format!("/api/v1/projects/{p0}"))).await.unwrap();
    assert_ne!(resp.status, 403, "{}", resp.text());
    assert_eq!(s.token_api(user, "GET", "/api/v1/mcp/tokens", None).await.unwrap().status, 200);

    let n = expected.len() as u64;
    assert_eq!(records_set(&s), base + n, "the filter set one record per audited request");
    wait_audited(&s, (base + n) as i64, Duration::from_secs(15)).await;
    let mut got = seen_after(&s.db, base as i64).await;
    got.sort();
    expected.sort();
    assert_eq!(got, expected);

    // One VM (concurrency 1): sequence numbers 1..=N without holes, from this node.
    let rows = sqlx::query(
        "SELECT node_id, vm_id, seq, request_id, outcome, duration_us, bytes_in, bytes_out, ip, details FROM mcp_access_log \
         WHERE seq IS NOT NULL ORDER BY seq",
    )
    .fetch_all(&s.db)
    .await
    .unwrap();
    let seqs: Vec<i64> = rows.iter().map(|r| r.get("seq")).collect();
    assert_eq!(seqs, (1..=(base + n) as i64).collect::<Vec<_>>());
    let vms: BTreeSet<String> = rows.iter().map(|r| r.get::<String, _>("vm_id")).collect();
    assert_eq!(vms.len(), 1, "{vms:?}");
    assert!(rows.iter().all(|r| r.get::<String, _>("node_id").starts_with("test-")));
    for r in &rows {
        assert!(r.get::<Option<i64>, _>("duration_us").is_some_and(|d| d >= 0));
        assert!(r.get::<i64, _>("bytes_out") > 0 && r.get::<i64, _>("bytes_in") > 0);
        assert_eq!(r.get::<Option<String>, _>("ip").as_deref(), Some("127.0.0.1"));
        assert!(r.get::<Value, _>("details")["decision"].is_string());
    }
    // The request id the client saw in each denial is the row's.
    for (id, outcome) in &denial_ids {
        let hit = rows.iter().find(|r| r.get::<Option<String>, _>("request_id").as_deref() == Some(id.as_str()));
        assert_eq!(hit.map(|r| r.get::<String, _>("outcome")).as_deref(), Some(*outcome), "request id {id}");
    }
    // last_used_at comes from audit (written right after the rows' commit).
    let last_used = || async {
        let used: Option<chrono::NaiveDateTime> = sqlx::query("SELECT last_used_at FROM mcp_token WHERE token_id = $1")
            .bind(&tid)
            .fetch_one(&s.db)
            .await?
            .get("last_used_at");
        Ok::<_, anyhow::Error>(used)
    };
    let set = s.wait_until(Duration::from_secs(5), || async { Ok(last_used().await?.is_some()) }).await;
    assert!(set.is_ok(), "last_used_at was not set from audit");
    let used = last_used().await.unwrap();
    // ... and moves at most once a minute: another use now leaves it as is.
    let r = s.send(bearer(RawRequest::get(&mcp(&p0.to_string())), &token)).await.unwrap();
    assert_eq!(r.status, 200);
    wait_audited(&s, (base + n + 1) as i64, Duration::from_secs(15)).await;
    let later = last_used().await.unwrap();
    assert_eq!(later, used, "last_used_at moved twice within a minute");
    // Nothing was lost.
    let m = wait_metric(&s, "mcp_audit_rows_written_total", base + n + 1).await;
    assert_eq!(metric(&m, "mcp_audit_gaps_total"), 0);
    assert_eq!(metric(&m, "mcp_audit_entries_without_record_total"), 0, "Envoy sent entries without a record");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_row_or_log_line_contains_a_token_secret_or_an_upstream_credential() {
    let s = stack(&FAST_GAPS).await;
    let (user, projects) = s.user_with_projects("bob", 1).await.unwrap();
    let p = projects[0];
    let path = format!("/api/v1/mcp/projects/{p}");
    let (id, token) = s.create_token(user, json!({}), 30).await.unwrap();
    s.wait_until_status(&token, &path, 200).await;
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("infrabox:{token}"));
    // The secret in every place a client could put it.
    let requests = vec![
        bearer(RawRequest::get(&format!("{path}?token={token}&x=1")), &token),
        bearer(RawRequest::get(&format!("/api/v1/mcp/{token}")), &token),
        bearer(RawRequest::get(&format!("/api/v1/mcp/projects/{}", &token[7..])), &token),
        bearer(RawRequest::get(&path), &token).header("x-request-id", &token),
        bearer(RawRequest::get(&path), &token).header("Cookie", &format!("token={token}")),
        RawRequest::get(&format!("/api/v1/projects/{p}?t={token}")).header("Authorization", &format!("Basic {basic}")),
        RawRequest::get("/api/v1/mcp/tokens").header("Authorization", &format!("token {token}")),
        bearer(RawRequest::get(&path), &format!("{token}0")),
    ];
    for req in requests {
        s.send(req).await.unwrap();
    }
    let del = s.token_api(user, "DELETE", &format!("/api/v1/mcp/tokens/{id}"), None).await.unwrap();
    assert_eq!(del.status, 200, "{}", del.text());
    let audited = records_set(&s);
    wait_audited(&s, audited as i64, Duration::from_secs(15)).await;

    let secret = &token[7..];
    let credentials: BTreeSet<String> = s
        .infrabox
        .requests()
        .iter()
        .flat_map(|r| r.header_all("authorization").into_iter().map(|v| v.trim_start_matches("Bearer ").to_string()))
        .filter(|v| v.len() > 20)
        .collect();
    assert!(!credentials.is_empty(), "no upstream credential was used");
    let mut needles: Vec<(&str, String)> = vec![("token secret", secret.to_string()), ("token secret tail", token[23..].to_string())];
    needles.extend(credentials.iter().map(|c| ("upstream credential", c.clone())));
    needles.push(("snapshot secret", s.snapshot_secret.clone()));
    let dump: Vec<String> = sqlx::query(
        "SELECT a::text AS t FROM mcp_access_log a UNION ALL SELECT g::text FROM mcp_audit_gap g \
         UNION ALL SELECT st::text FROM mcp_audit_stream st",
    )
    .fetch_all(&s.db)
    .await
    .unwrap()
    .iter()
    .map(|r| r.get("t"))
    .collect();
    assert!(dump.len() > 8, "{dump:?}");
    let logs = [("control-plane log", s.control_plane.log_contents()), ("envoy log", s.envoy.log_contents())];
    for (what, needle) in &needles {
        for row in &dump {
            assert!(!row.contains(needle.as_str()), "an audit row contains the {what}");
        }
        for (log, text) in &logs {
            assert!(!text.contains(needle.as_str()), "the {log} contains the {what}");
        }
    }
    // The masked path is still recorded, as is the attribution.
    let masked: i64 = sqlx::query("SELECT count(*) AS n FROM mcp_access_log WHERE path LIKE '%[redacted]%' AND token_id = $1")
        .bind(&id)
        .fetch_one(&s.db)
        .await
        .unwrap()
        .get("n");
    assert_eq!(masked, 2);
    let m = metrics(&s).await;
    for (what, needle) in &needles {
        assert!(!m.contains(needle.as_str()), "/metrics contains the {what}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_control_plane_restart_under_traffic_leaves_every_lost_entry_in_a_gap() {
    let s = stack(&FAST_GAPS).await;
    let (user, projects) = s.user_with_projects("carol", 1).await.unwrap();
    let path = format!("/api/v1/mcp/projects/{}/nope", projects[0]);
    let (_, token) = s.create_token(user, json!({}), 30).await.unwrap();
    s.wait_until_status(&token, &path, 404).await;
    let base = records_set(&s);

    // Traffic: a steady stream of audited (404) requests from two clients.
    let gateway = s.gateway();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let mut clients = Vec::new();
    for _ in 0..2 {
        let (stop, sent, token, path) = (stop.clone(), sent.clone(), token.clone(), path.clone());
        clients.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let r = bearer(RawRequest::get(&path), &token).send(gateway, Duration::from_secs(10)).await.unwrap();
                assert_eq!(r.status, 404, "{}", r.text());
                sent.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }));
    }
    let mut s = s;
    tokio::time::sleep(Duration::from_millis(800)).await;
    s.control_plane.stop().unwrap();
    let during = sent.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    s.control_plane.restart().unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }
    let total = records_set(&s);
    assert!(sent.load(Ordering::Relaxed) > during, "traffic flowed across the restart");
    assert_eq!(total, base + sent.load(Ordering::Relaxed), "one record per request the clients sent");

    // Every record is a row or inside a gap, and the stream is settled.
    let start = Instant::now();
    let (rows, missing, recovered) = loop {
        let r = sqlx::query(
            "SELECT (SELECT count(*) FROM mcp_access_log WHERE seq IS NOT NULL) AS rows, \
                    (SELECT COALESCE(sum(missing), 0)::int8 FROM mcp_audit_gap) AS missing, \
                    (SELECT COALESCE(sum(recovered), 0)::int8 FROM mcp_audit_gap) AS recovered, \
                    (SELECT bool_and(checked_seq = high_seq) FROM mcp_audit_stream) AS settled, \
                    (SELECT max(high_seq) FROM mcp_audit_stream) AS high",
        )
        .fetch_one(&s.db)
        .await
        .unwrap();
        let (rows, missing, recovered): (i64, i64, i64) = (r.get("rows"), r.get("missing"), r.get("recovered"));
        let settled: Option<bool> = r.get("settled");
        let high: Option<i64> = r.get("high");
        if settled == Some(true) && high == Some(total as i64) && rows + missing - recovered == total as i64 {
            break (rows, missing, recovered);
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "not settled: {total} records set, {rows} rows, {missing} missing, {recovered} recovered, high {high:?}, settled {settled:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(missing > 0, "entries sent while the control plane was down must be lost, and found");
    // The gaps are the numbers without a row, exactly.
    let holes: i64 = sqlx::query(
        "SELECT count(*) AS n FROM generate_series(1, $1::int8) g(s) \
         WHERE NOT EXISTS (SELECT 1 FROM mcp_access_log WHERE seq = g.s) \
           AND NOT EXISTS (SELECT 1 FROM mcp_audit_gap WHERE g.s BETWEEN first_seq AND last_seq)",
    )
    .bind(total as i64)
    .fetch_one(&s.db)
    .await
    .unwrap()
    .get("n");
    assert_eq!(holes, 0, "a sequence number is neither a row nor in a gap");
    // The counter of the (restarted) control plane reports the same loss.
    let m = wait_metric(&s, "mcp_audit_missing_entries_total", missing as u64).await;
    let gaps: i64 = sqlx::query("SELECT count(*) AS n FROM mcp_audit_gap").fetch_one(&s.db).await.unwrap().get("n");
    assert_eq!(metric(&m, "mcp_audit_gaps_total") as i64, gaps);
    println!("restart: {total} records, {rows} rows, {missing} missing in {gaps} gap(s), {recovered} recovered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_1000_requests_all_arrive_through_a_bounded_queue() {
    // A queue far smaller than the burst, so ingest really waits on it.
    const QUEUE: u64 = 32;
    let s = stack(&[("MCP_AUDIT_QUEUE_CAPACITY", "32"), ("MCP_AUDIT_BATCH_ROWS", "16"), FAST_GAPS[0], FAST_GAPS[1]]).await;
    let (user, projects) = s.user_with_projects("dave", 1).await.unwrap();
    let path = format!("/api/v1/mcp/projects/{}/nope", projects[0]);
    let (_, token) = s.create_token(user, json!({}), 30).await.unwrap();
    s.wait_until_status(&token, &path, 404).await;
    let base = records_set(&s);

    let gateway = s.gateway();
    let started = Instant::now();
    let mut clients = Vec::new();
    for c in 0..50 {
        let (token, path) = (token.clone(), path.clone());
        clients.push(tokio::spawn(async move {
            for _ in 0..20 {
                let r = bearer(RawRequest::get(&path), &token).send(gateway, Duration::from_secs(20)).await.unwrap();
                assert_eq!(r.status, 404, "client {c}: {}", r.text());
            }
        }));
    }
    for c in clients {
        c.await.unwrap();
    }
    let sent_in = started.elapsed();
    assert_eq!(records_set(&s), base + 1000);
    wait_audited(&s, (base + 1000) as i64, Duration::from_secs(30)).await;
    let all_in = started.elapsed();
    let m = wait_metric(&s, "mcp_audit_rows_written_total", base + 1000).await;
    let peak = metric(&m, "mcp_audit_queue_peak");
    assert!(peak <= QUEUE, "queue peak {peak} above its capacity {QUEUE}");
    assert_eq!(metric(&m, "mcp_audit_queue_capacity"), QUEUE);
    assert_eq!(metric(&m, "mcp_audit_duplicates_total"), 0);
    let seqs: Vec<i64> = sqlx::query("SELECT seq FROM mcp_access_log WHERE seq IS NOT NULL ORDER BY seq")
        .fetch_all(&s.db)
        .await
        .unwrap()
        .iter()
        .map(|r| r.get("seq"))
        .collect();
    assert_eq!(seqs, (1..=(base + 1000) as i64).collect::<Vec<_>>());
    println!(
        "burst: 1000 requests sent in {sent_in:?}, all rows in {all_in:?}; queue peak {peak}/{QUEUE}, {} batches",
        metric(&m, "mcp_audit_batches_total")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_deletes_exactly_the_rows_older_than_the_configured_days() {
    let s = stack(&[
        ("MCP_AUDIT_RETENTION_DAYS", "30"),
        ("MCP_AUDIT_RETENTION_INTERVAL_SECONDS", "1"),
        ("MCP_AUDIT_RETENTION_BATCH", "7"),
    ])
    .await;
    // 40 rows just past retention and 25 just inside, written as old rows
    // would have been; plus an old gap.
    let old: Vec<Uuid> = (0..40).map(|_| Uuid::new_v4()).collect();
    let young: Vec<Uuid> = (0..25).map(|_| Uuid::new_v4()).collect();
    for (ids, age) in [(&old, "30 days 1 hour"), (&young, "29 days 23 hours")] {
        sqlx::query(
            "INSERT INTO mcp_access_log (id, action, outcome, accessed_at) \
             SELECT id, 'projects.get', 'success', (now() AT TIME ZONE 'utc') - $2::interval FROM UNNEST($1::uuid[]) id",
        )
        .bind(ids)
        .bind(age)
        .execute(&s.db)
        .await
        .unwrap();
    }
    sqlx::query(
        "INSERT INTO mcp_audit_gap (node_id, vm_id, first_seq, last_seq, missing, detected_at) \
         VALUES ('n', 'v', 1, 2, 2, now() - interval '31 days'), ('n', 'v', 5, 5, 1, now())",
    )
    .execute(&s.db)
    .await
    .unwrap();
    let start = Instant::now();
    loop {
        let left: i64 = sqlx::query("SELECT count(*) AS n FROM mcp_access_log WHERE id = ANY($1)")
            .bind(&old)
            .fetch_one(&s.db)
            .await
            .unwrap()
            .get("n");
        if left == 0 {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(20), "{left} old rows still there");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let kept: BTreeSet<Uuid> = sqlx::query("SELECT id FROM mcp_access_log")
        .fetch_all(&s.db)
        .await
        .unwrap()
        .iter()
        .map(|r| r.get("id"))
        .collect();
    assert_eq!(kept, young.iter().copied().collect::<BTreeSet<_>>(), "exactly the young rows are kept");
    let gaps: Vec<i64> = sqlx::query("SELECT first_seq FROM mcp_audit_gap").fetch_all(&s.db).await.unwrap().iter().map(|r| r.get("first_seq")).collect();
    assert_eq!(gaps, vec![5]);
    let start = Instant::now();
    while metric(&metrics(&s).await, "mcp_audit_retention_deleted_total") < 40 {
        assert!(start.elapsed() < Duration::from_secs(10), "retention deletes not counted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_access_log_api_shows_only_the_callers_rows_newest_first_in_pages() {
    let s = stack(&FAST_GAPS).await;
    let (alice, a_projects) = s.user_with_projects("erin", 1).await.unwrap();
    let (bob, b_projects) = s.user_with_projects("frank", 1).await.unwrap();
    let (a_id, a_token) = s.create_token(alice, json!({}), 30).await.unwrap();
    let (b_id, b_token) = s.create_token(bob, json!({}), 30).await.unwrap();
    let a_path = format!("/api/v1/mcp/projects/{}", a_projects[0]);
    let b_path = format!("/api/v1/mcp/projects/{}", b_projects[0]);
    s.wait_until_status(&a_token, &a_path, 200).await;
    s.wait_until_status(&b_token, &b_path, 200).await;
    for i in 0..6 {
        let p = if i % 2 == 0 { a_path.clone() } else { format!("{a_path}/nope") };
        s.mcp_get(&a_token, &p).await.unwrap();
    }
    for _ in 0..3 {
        s.mcp_get(&b_token, &b_path).await.unwrap();
    }
    let grant = s.token_api(alice, "POST", &format!("/api/v1/mcp/tokens/{a_id}/trigger"), None).await.unwrap();
    assert_eq!(grant.status, 200, "{}", grant.text());
    let withdraw = s.token_api(alice, "DELETE", &format!("/api/v1/mcp/tokens/{a_id}/trigger"), None).await.unwrap();
    assert_eq!(withdraw.status, 200, "{}", withdraw.text());
    let rename = s.token_api(alice, "PATCH", &format!("/api/v1/mcp/tokens/{a_id}"), Some(json!({"name": "renamed"}))).await.unwrap();
    assert_eq!(rename.status, 200, "{}", rename.text());
    wait_audited(&s, records_set(&s) as i64, Duration::from_secs(15)).await;

    let expected: Vec<Uuid> = sqlx::query(
        "SELECT id FROM mcp_access_log WHERE token_id = $1 ORDER BY accessed_at DESC, id DESC",
    )
    .bind(&a_id)
    .fetch_all(&s.db)
    .await
    .unwrap()
    .iter()
    .map(|r| r.get("id"))
    .collect();
    assert!(expected.len() >= 11, "6 requests, the warm-up, create, grant, withdraw, update: {}", expected.len());

    // Alice pages through her token's log, 4 at a time.
    let mut got: Vec<Uuid> = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let q = match &cursor {
            Some(c) => format!("?limit=4&cursor={c}"),
            None => "?limit=4".to_string(),
        };
        let r = s.token_api(alice, "GET", &format!("/api/v1/mcp/tokens/{a_id}/access-log{q}"), None).await.unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        let v = r.json().unwrap();
        let items = v["items"].as_array().unwrap();
        assert!(items.len() <= 4);
        assert_eq!(v["limit"], 4);
        for it in items {
            got.push(it["id"].as_str().unwrap().parse().unwrap());
            assert!(it["outcome"].is_string() && it["action"].is_string() && it["accessed_at"].is_string(), "{it}");
            assert!(!it.to_string().contains(&a_token[23..]));
        }
        pages += 1;
        match v["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
    }
    assert_eq!(got, expected, "every row of the token once, newest first");
    assert_eq!(pages, expected.len().div_ceil(4));
    // The request rows carry what the gateway saw; the token API's rows are there too.
    let r = s.token_api(alice, "GET", &format!("/api/v1/mcp/tokens/{a_id}/access-log?limit=500"), None).await.unwrap();
    let items = r.json().unwrap()["items"].as_array().unwrap().clone();
    let actions: Vec<&str> = items.iter().map(|i| i["action"].as_str().unwrap()).collect();
    for action in ["token.create", "token.trigger.grant", "token.trigger.withdraw", "token.update"] {
        assert!(actions.contains(&action), "{action} missing in {actions:?}");
    }
    assert!(items.iter().filter(|i| i["action"].as_str().is_some_and(|a| a.starts_with("token."))).all(|i| i["outcome"] == "success"));
    assert!(items.iter().any(|i| i["outcome"] == "not_found" && i["status_code"] == 404 && i["method"] == "GET"));
    assert!(items.iter().any(|i| i["outcome"] == "success" && i["route"] == "projects.get" && i["duration_ms"].is_number()));
    assert!(items.iter().all(|i| i["request_id"].is_string()), "every row has Envoy's request id");

    // Bob's token is "no such token" for Alice, and the other way round.
    let r = s.token_api(alice, "GET", &format!("/api/v1/mcp/tokens/{b_id}/access-log"), None).await.unwrap();
    assert_eq!((r.status, r.json().unwrap()["error"].clone()), (404, json!("not_found")));
    let r = s.token_api(bob, "GET", &format!("/api/v1/mcp/tokens/{a_id}/access-log"), None).await.unwrap();
    assert_eq!(r.status, 404);
    let r = s.token_api(bob, "GET", &format!("/api/v1/mcp/tokens/{b_id}/access-log"), None).await.unwrap();
    let bob_items = r.json().unwrap()["items"].as_array().unwrap().clone();
    assert!(bob_items.len() >= 4);
    let bob_ids: BTreeSet<&str> = bob_items.iter().map(|i| i["id"].as_str().unwrap()).collect();
    assert!(got.iter().all(|id| !bob_ids.contains(id.to_string().as_str())));
    // No session, a bad cursor, a bad limit.
    let r = s.send(RawRequest::get(&format!("/api/v1/mcp/tokens/{a_id}/access-log"))).await.unwrap();
    assert_eq!(r.status, 401);
    for q in ["?cursor=nope", "?limit=0", "?limit=501"] {
        let r = s.token_api(alice, "GET", &format!("/api/v1/mcp/tokens/{a_id}/access-log{q}"), None).await.unwrap();
        assert_eq!(r.status, 400, "{q}: {}", r.text());
    }
    // A revoked token's log stays readable by its owner.
    assert_eq!(s.token_api(alice, "DELETE", &format!("/api/v1/mcp/tokens/{a_id}"), None).await.unwrap().status, 200);
    let r = s.token_api(alice, "GET", &format!("/api/v1/mcp/tokens/{a_id}/access-log?limit=1"), None).await.unwrap();
    let v = r.json().unwrap();
    assert_eq!(v["items"][0]["action"], "token.revoke", "{v}");
}

/// An access-log entry as Envoy sends it, for a record of `node`/`vm`.
fn entry(node: &str, vm: &str, seq: u64, start: chrono::DateTime<chrono::Utc>) -> HttpAccessLogEntry {
    let record = AuditRecord {
        schema: 1,
        node_id: node.into(),
        vm_id: vm.into(),
        seq,
        token_id: None,
        user_id: None,
        project: None,
        route: Some("projects.list".into()),
        class: None,
        decision: Decision::Deny,
        reason: Some("invalid_token".into()),
        rate_limit_remaining: None,
        method: "GET".into(),
        path: "/api/v1/mcp/projects".into(),
        mcp: None,
    };
    let mut fs = std::collections::HashMap::new();
    fs.insert(
        FILTER_STATE_KEY.to_string(),
        Any {
            type_url: "type.googleapis.com/google.protobuf.BytesValue".into(),
            value: BytesValue { value: record.to_json() }.encode_to_vec(),
        },
    );
    HttpAccessLogEntry {
        common_properties: Some(AccessLogCommon {
            filter_state_objects: fs,
            start_time: Some(Timestamp { seconds: start.timestamp(), nanos: 0 }),
            ..Default::default()
        }),
        response: Some(HttpResponseProperties { response_code: Some(UInt32Value { value: 401 }), ..Default::default() }),
        ..Default::default()
    }
}

/// Streams `entries` to the control plane's AccessLogService in one stream,
/// with the internal credential Envoy sends.
async fn stream_entries(addr: SocketAddr, secret: &str, batches: Vec<Vec<HttpAccessLogEntry>>) {
    let mut client = AccessLogServiceClient::connect(format!("http://{addr}")).await.unwrap();
    let messages: Vec<StreamAccessLogsMessage> = batches
        .into_iter()
        .map(|b| StreamAccessLogsMessage {
            identifier: None,
            log_entries: Some(LogEntries::HttpLogs(HttpAccessLogEntries { log_entry: b })),
        })
        .collect();
    let mut request = tonic::Request::new(tonic::codegen::tokio_stream::iter(messages));
    request.metadata_mut().insert("authorization", format!("Bearer {secret}").parse().unwrap());
    client.stream_access_logs(request).await.unwrap();
}

async fn gaps_of(db: &PgPool, vm: &str) -> Vec<(i64, i64, i64, i64)> {
    sqlx::query("SELECT first_seq, last_seq, missing, recovered FROM mcp_audit_gap WHERE vm_id = $1 ORDER BY first_seq")
        .bind(vm)
        .fetch_all(db)
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get("first_seq"), r.get("last_seq"), r.get("missing"), r.get("recovered")))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gaps_late_entries_and_duplicates_on_the_wire() {
    let s = stack(&FAST_GAPS).await;
    let addr = SocketAddr::from(([127, 0, 0, 1], s.control_plane.grpc_port()));
    let now = chrono::Utc::now();
    let vm = format!("vm-{}", Uuid::new_v4().simple());
    // 1, 2, 3, 6, 7, 10 arrive (and an entry without a record); 4-5 and 8-9 do not.
    let mut first: Vec<HttpAccessLogEntry> = [1, 2, 3, 6, 7, 10].iter().map(|n| entry("node-x", &vm, *n, now)).collect();
    first.push(HttpAccessLogEntry::default());
    stream_entries(addr, &s.grpc_secret, vec![first]).await;
    let start = Instant::now();
    while gaps_of(&s.db, &vm).await.len() < 2 {
        assert!(start.elapsed() < Duration::from_secs(15), "gaps not recorded");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(gaps_of(&s.db, &vm).await, vec![(4, 5, 2, 0), (8, 9, 2, 0)]);
    // 5 arrives late, 2 again (a duplicate), then 11 follows on time.
    stream_entries(addr, &s.grpc_secret, vec![vec![entry("node-x", &vm, 5, now), entry("node-x", &vm, 2, now)], vec![entry("node-x", &vm, 11, now)]]).await;
    let start = Instant::now();
    loop {
        let rows: i64 = sqlx::query("SELECT count(*) AS n FROM mcp_access_log WHERE vm_id = $1")
            .bind(&vm)
            .fetch_one(&s.db)
            .await
            .unwrap()
            .get("n");
        if rows == 8 {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(15), "{rows} rows");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(gaps_of(&s.db, &vm).await, vec![(4, 5, 2, 1), (8, 9, 2, 0)]);
    let m = wait_metric(&s, "mcp_audit_rows_written_total", 8).await;
    assert_eq!(metric(&m, "mcp_audit_late_entries_total"), 1);
    assert_eq!(metric(&m, "mcp_audit_duplicates_total"), 1);
    assert_eq!(metric(&m, "mcp_audit_gaps_total"), 2);
    assert_eq!(metric(&m, "mcp_audit_missing_entries_total"), 4);
    assert_eq!(metric(&m, "mcp_audit_entries_without_record_total"), 1);
    // Rows plus unrecovered gaps cover 1..=11 exactly.
    let seqs: BTreeSet<i64> = sqlx::query("SELECT seq FROM mcp_access_log WHERE vm_id = $1")
        .bind(&vm)
        .fetch_all(&s.db)
        .await
        .unwrap()
        .iter()
        .map(|r| r.get("seq"))
        .collect();
    assert_eq!(seqs, [1, 2, 3, 5, 6, 7, 10, 11].into_iter().collect());
}

/// 429 audit: enabled once rate limiting (issue 4) is in the filter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limited_requests_are_audited_with_the_remaining_budget() {
    let s = stack(&[("MCP_LIMIT_DEFAULT", "3"), FAST_GAPS[0], FAST_GAPS[1]]).await;
    let (user, projects) = s.user_with_projects("grace", 1).await.unwrap();
    let path = format!("/api/v1/mcp/projects/{}", projects[0]);
    let (tid, token) = s.create_token(user, json!({}), 30).await.unwrap();
    s.wait_until_status(&token, &path, 200).await;
    let mut statuses = Vec::new();
    for _ in 0..4 {
        let r: RawResponse = s.mcp_get(&token, &path).await.unwrap();
        statuses.push(r.status);
    }
    assert_eq!(statuses.last(), Some(&429), "{statuses:?}");
    wait_audited(&s, records_set(&s) as i64, Duration::from_secs(15)).await;
    let rows = sqlx::query("SELECT status_code, outcome, error, token_id, details FROM mcp_access_log WHERE seq IS NOT NULL ORDER BY seq DESC LIMIT 1")
        .fetch_all(&s.db)
        .await
        .unwrap();
    let last = &rows[0];
    assert_eq!(last.get::<Option<i16>, _>("status_code"), Some(429));
    assert_eq!(last.get::<String, _>("outcome"), "rate_limited");
    assert_eq!(last.get::<Option<String>, _>("error").as_deref(), Some("rate_limited"));
    assert_eq!(last.get::<Option<String>, _>("token_id"), Some(tid));
    assert_eq!(last.get::<Value, _>("details")["rate_limit_remaining"], 0);
}
