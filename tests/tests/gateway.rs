//! End to end through real Envoy running `mcp_filter.wasm`, the control
//! plane, Postgres and the fake InfraBox: token auth, where MCP tokens are
//! accepted, the snapshot feed and the token API (issue "The gateway end
//! to end").

use std::time::{Duration, Instant};

use base64::Engine;
use mcp_gateway_tests::envoy::Envoy;
use mcp_gateway_tests::http::{RawRequest, RawResponse};
use mcp_gateway_tests::scratch::fresh_dir;
use mcp_gateway_tests::session::SigningKey;
use mcp_gateway_tests::stack::{Stack, StackOptions};
use serde_json::{json, Value};
use uuid::Uuid;

fn assert_error(resp: &RawResponse, status: u16, code: &str) {
    assert_eq!(resp.status, status, "body: {}", resp.text());
    assert_eq!(resp.header("content-type"), Some("application/json"), "{}", resp.text());
    let v: Value = resp.json().unwrap_or_else(|e| panic!("not JSON ({e}): {}", resp.text()));
    assert_eq!(v["error"], code, "{v}");
    assert!(v["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    assert!(v["request_id"].is_string(), "{v}");
}

fn assert_401(resp: &RawResponse) {
    assert_error(resp, 401, "invalid_token");
    assert_eq!(resp.header("www-authenticate"), Some(r#"Bearer realm="infrabox-mcp""#));
}

async fn stack() -> Stack {
    Stack::start(StackOptions::default()).await.expect("stack")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_from_the_api_authenticates_and_is_forwarded_without_client_credentials() {
    let s = stack().await;
    let (user, projects) = s.user_with_projects("alice", 1).await.unwrap();
    let (token_id, token) = s.create_token(user, json!({}), 30).await.unwrap();
    assert!(token.starts_with("ib_mcp_") && token.len() == 55);
    assert!(token[7..].starts_with(&token_id));

    let p = projects[0];
    let resp = s
        .wait_until_status(&token, &format!("/api/v1/mcp/projects/{p}"), 200)
        .await;
    let body = resp.json().unwrap();
    assert_eq!(body["id"], p.to_string(), "{body}");

    s.infrabox.clear();
    let resp = s
        .send(
            RawRequest::get(&format!("/api/v1/mcp/projects/{p}"))
                .header("Authorization", &format!("Bearer {token}"))
                .header("Cookie", "token=eyJsession; other=1"),
        )
        .await
        .unwrap();
    assert_eq!(resp.status, 200, "{}", resp.text());
    let seen = s.infrabox.requests();
    assert_eq!(seen.len(), 1, "{seen:?}");
    let r = &seen[0];
    assert_eq!(r.method, "GET");
    assert_eq!(r.path, format!("/api/v1/projects/{p}"));
    let header = |n: &str| r.headers.iter().filter(|(k, _)| k.eq_ignore_ascii_case(n)).map(|(_, v)| v.clone()).collect::<Vec<_>>();
    assert!(header("cookie").is_empty(), "cookie forwarded: {:?}", r.headers);
    assert!(header("authorization").iter().all(|v| !v.contains("ib_mcp_")), "{:?}", r.headers);
    assert!(r.headers.iter().all(|(_, v)| !v.contains(&token[7..])), "token forwarded: {:?}", r.headers);
    assert_eq!(header("x-mcp-token-id"), vec![token_id]);
    assert_eq!(header("x-mcp-user-id"), vec![user.to_string()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_malformed_unknown_revoked_and_expired_tokens_get_401() {
    let s = stack().await;
    let (user, projects) = s.user_with_projects("bob", 1).await.unwrap();
    let path = format!("/api/v1/mcp/projects/{}", projects[0]);
    let (_, good) = s.create_token(user, json!({}), 30).await.unwrap();
    s.wait_until_status(&good, &path, 200).await;
    s.infrabox.clear();

    // missing
    assert_401(&s.send(RawRequest::get(&path)).await.unwrap());
    // malformed: wrong length, upper-case hex, non-hex, extra suffix
    let hexpart = &good[7..];
    for bad in [
        good[..good.len() - 2].to_string(),
        format!("ib_mcp_{}", hexpart.to_uppercase()),
        format!("ib_mcp_{}zz", &hexpart[..46]),
        format!("{good}00"),
        format!("{good}-x"),
    ] {
        assert_401(&s.mcp_get(&bad, &path).await.unwrap());
    }
    // unknown (right shape, never issued)
    let unknown = format!("ib_mcp_{}", "0123456789abcdef".repeat(3));
    assert_401(&s.mcp_get(&unknown, &path).await.unwrap());

    // revoked through the API
    let (revoked_id, revoked) = s.create_token(user, json!({}), 30).await.unwrap();
    s.wait_until_status(&revoked, &path, 200).await;
    let del = s.token_api(user, "DELETE", &format!("/api/v1/mcp/tokens/{revoked_id}"), None).await.unwrap();
    assert!(del.status == 200 || del.status == 204, "{}", del.text());
    let r = s.wait_until_status(&revoked, &path, 401).await;
    assert_401(&r);

    // expired: valid in the snapshot, then expires by the filter's own clock
    let (exp_id, expiring) = s.create_token(user, json!({}), 30).await.unwrap();
    sqlx::query("UPDATE mcp_token SET expires_at = (now() AT TIME ZONE 'utc') + interval '3 seconds' WHERE token_id = $1")
        .bind(&exp_id)
        .execute(&s.db)
        .await
        .unwrap();
    s.wait_until_status(&expiring, &path, 200).await;
    tokio::time::sleep(Duration::from_millis(3500)).await;
    assert_401(&s.mcp_get(&expiring, &path).await.unwrap());

    let leaked: Vec<_> = s.infrabox.requests().into_iter().filter(|r| r.path != format!("/api/v1/projects/{}", projects[0])).collect();
    assert!(leaked.is_empty(), "unexpected upstream requests: {leaked:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mcp_credentials_on_other_paths_get_403_and_never_reach_infrabox() {
    let s = stack().await;
    let (user, projects) = s.user_with_projects("carol", 1).await.unwrap();
    let (_, token) = s.create_token(user, json!({}), 30).await.unwrap();
    let path = format!("/api/v1/projects/{}", projects[0]);
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("infrabox:{token}"));
    s.infrabox.clear();
    let forms: Vec<(&str, String)> = vec![
        ("Authorization", format!("Bearer {token}")),
        ("Authorization", format!("bearer {token}")),
        ("Authorization", format!("token {token}")),
        ("Authorization", format!("Basic {basic}")),
        ("Cookie", format!("token={token}")),
    ];
    for (name, value) in &forms {
        for p in [path.clone(), format!("{path}/builds/"), "/api/v1/mcp/tokens".to_string()] {
            let resp = s.send(RawRequest::get(&p).header(name, value)).await.unwrap();
            assert_error(&resp, 403, "mcp_token_not_accepted");
            assert!(!resp.text().contains(&token[7..]));
        }
    }
    assert!(s.infrabox.requests().is_empty(), "forwarded: {:?}", s.infrabox.requests());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_without_mcp_credentials_pass_through_unchanged() {
    let s = stack().await;
    s.infrabox.clear();
    let body = br#"{"branch_or_sha":"main","env":[{"name":"A","value":"b"}]}"#.to_vec();
    let path = "/api/v1/projects/5b0e1a8c-9a51-4a86-9d8c-0c6a1b2c3d4e/trigger?x=1&y=%2F";
    let resp = s
        .send(
            RawRequest::new("POST", path)
                .header("Authorization", "Bearer eyJhbGciOiJSUzI1NiJ9.eyJ0eXBlIjoidXNlciJ9.c2ln")
                .header("Cookie", "token=eyJhbGciOi; theme=dark")
                .header("X-Custom-Thing", "kept as is")
                .header("Content-Type", "application/json")
                .body(body.clone()),
        )
        .await
        .unwrap();
    assert!(resp.status < 500, "{} {}", resp.status, resp.text());
    let seen = s.infrabox.requests();
    assert_eq!(seen.len(), 1, "{seen:?}");
    let r = &seen[0];
    assert_eq!(r.method, "POST");
    assert_eq!(r.path, path);
    assert_eq!(r.body, body);
    let get = |n: &str| r.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(n)).map(|(_, v)| v.as_str());
    assert_eq!(get("authorization"), Some("Bearer eyJhbGciOiJSUzI1NiJ9.eyJ0eXBlIjoidXNlciJ9.c2ln"));
    assert_eq!(get("cookie"), Some("token=eyJhbGciOi; theme=dark"));
    assert_eq!(get("x-custom-thing"), Some("kept as is"));
    assert_eq!(get("content-type"), Some("application/json"));
    assert!(get("x-mcp-token-id").is_none() && get("x-mcp-user-id").is_none());

    // /internal is never routed.
    s.infrabox.clear();
    for p in ["/internal/api/projects/x/trigger", "/INTERNAL/api/job/consoleupdate", "/internal"] {
        let resp = s.send(RawRequest::post(p).body("{}")).await.unwrap();
        assert_eq!(resp.status, 404, "{p}");
    }
    assert!(s.infrabox.requests().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_reaches_the_edge_within_two_seconds() {
    let s = stack().await;
    let (user, projects) = s.user_with_projects("dave", 1).await.unwrap();
    let path = format!("/api/v1/mcp/projects/{}", projects[0]);
    let mut delays = Vec::new();
    for _ in 0..5 {
        let (id, token) = s.create_token(user, json!({}), 30).await.unwrap();
        s.wait_until_status(&token, &path, 200).await;
        let start = Instant::now();
        let del = s.token_api(user, "DELETE", &format!("/api/v1/mcp/tokens/{id}"), None).await.unwrap();
        assert!(del.status < 300, "{}", del.text());
        loop {
            let r = s.mcp_get(&token, &path).await.unwrap();
            if r.status == 401 {
                break;
            }
            assert_eq!(r.status, 200);
            assert!(start.elapsed() < Duration::from_secs(2), "revocation not enforced after {:?}", start.elapsed());
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        delays.push(start.elapsed());
    }
    delays.sort();
    println!("revocation delay (API call to first 401 at the edge), 5 runs: {delays:?}");
    assert!(delays[4] < Duration::from_secs(2));
}

/// `tokens` live tokens of `users` new users, in two statements (one
/// notification burst); `tag` keeps ids, names and hashes apart per test.
async fn insert_bulk_tokens(s: &Stack, tag: &str, users: i32, tokens: i32) {
    sqlx::query(
        r#"INSERT INTO "user" (id, username, email)
           SELECT md5($1 || 'user' || u)::uuid, $1 || '-' || u, $1 || '-' || u || '@example.test' FROM generate_series(0, $2 - 1) u"#,
    )
    .bind(tag)
    .bind(users)
    .execute(&s.db)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO mcp_token (token_id, token_hash, user_id, name, enabled_projects, expires_at)
         SELECT lpad(to_hex(g), 16, '0'), encode(sha256(convert_to($1 || g, 'UTF8')), 'hex'),
                md5($1 || 'user' || (g % $2))::uuid, 'bulk', '{}'::jsonb, (now() AT TIME ZONE 'utc') + interval '30 days'
         FROM generate_series(1, $3) g",
    )
    .bind(tag)
    .bind(users)
    .bind(tokens)
    .execute(&s.db)
    .await
    .unwrap();
}

/// The snapshot the control plane serves now: (version, token count).
async fn served_snapshot(s: &Stack) -> (String, u64) {
    let r = RawRequest::get("/v1/snapshot")
        .header("authorization", &format!("Bearer {}", s.snapshot_secret))
        .send(s.control_plane.internal_addr(), Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    let body: Value = serde_json::from_slice(&r.body).unwrap();
    (body["version"].as_str().unwrap().to_owned(), body["token_count"].as_u64().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_patches_the_snapshot_to_what_a_full_rebuild_gives() {
    // Full rebuilds every second, so one runs right after the patch.
    let s = Stack::start(StackOptions {
        control_plane_env: vec![
            ("MCP_SCOPE_REFRESH_SECONDS".into(), "1".into()),
            ("RUST_LOG".into(), "info,mcp_control_plane::snapshot=debug".into()),
        ],
        ..StackOptions::default()
    })
    .await
    .unwrap();
    let (user, projects) = s.user_with_projects("patty", 2).await.unwrap();
    let path = format!("/api/v1/mcp/projects/{}", projects[0]);
    // 300 tokens of 30 other users in one statement: more than a patch
    // takes, so a rebuild.
    insert_bulk_tokens(&s, "bulk", 30, 300).await;
    let (id, token) = s.create_token(user, json!({}), 30).await.unwrap();
    s.wait_until_status(&token, &path, 200).await;
    let (before, count) = served_snapshot(&s).await;
    assert_eq!(count, 301);

    let del = s.token_api(user, "DELETE", &format!("/api/v1/mcp/tokens/{id}"), None).await.unwrap();
    assert!(del.status < 300, "{}", del.text());
    s.wait_until_status(&token, &path, 401).await;
    let (patched, count) = served_snapshot(&s).await;
    assert_eq!(count, 300);
    assert_ne!(patched, before);
    let log = s.control_plane.log_contents();
    let patch_line = log
        .lines()
        .filter(|l| l.contains("snapshot published") && l.contains("how=\"patch\""))
        .find(|l| l.contains(&patched));
    assert!(patch_line.is_some(), "the revocation was not published as a patch:\n{log}");

    // Full rebuilds of the same rows come to the same content: nothing new is published.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(served_snapshot(&s).await, (patched.clone(), 300));
    let log = s.control_plane.log_contents();
    // (The patched content equals the 300 bulk tokens alone, so its version
    // was also published by the first rebuild: look after the patch.)
    let after_patch = log.rsplit(&format!("version={patched} how=\"patch\"")).next().unwrap_or_default();
    assert!(!after_patch.contains("snapshot published"), "a rebuild published different content:\n{after_patch}");
    assert!(after_patch.len() < log.len());
    assert!(after_patch.contains("snapshot unchanged") && after_patch.contains("how=\"rebuild\""), "no rebuild ran after the patch");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn last_good_snapshot_survives_a_control_plane_outage() {
    let mut s = Stack::start(StackOptions { snapshot_wait_seconds: 2, ..Default::default() }).await.unwrap();
    let (user, projects) = s.user_with_projects("erin", 1).await.unwrap();
    let path = format!("/api/v1/mcp/projects/{}", projects[0]);
    let (_, token) = s.create_token(user, json!({}), 30).await.unwrap();
    s.wait_until_status(&token, &path, 200).await;

    s.control_plane.stop().unwrap();
    let until = Instant::now() + Duration::from_secs(5);
    let mut n = 0;
    while Instant::now() < until {
        let r = s.mcp_get(&token, &path).await.unwrap();
        assert_eq!(r.status, 200, "request {n} during the outage: {}", r.text());
        n += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let errors = s.envoy.stat("wasmcustom.mcp_snapshot_errors").unwrap_or(0);
    assert!(errors >= 1, "the filter should have noticed the outage");
    s.control_plane.restart().unwrap();
    let r = s.mcp_get(&token, &path).await.unwrap();
    assert_eq!(r.status, 200);
    // A change after the restart is picked up again.
    let (_, token2) = s.create_token(user, json!({}), 30).await.unwrap();
    s.wait_until_status(&token2, &path, 200).await;
}

/// The maximum policy age: while the control plane is away the last good
/// snapshot serves until it is `max_policy_age_seconds` old, then MCP
/// requests (REST and the MCP endpoint) fail closed with 503
/// `policy_stale`; other traffic flows; the age is exported; recovery is
/// back within a poll of the control plane's return.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_older_than_its_maximum_age_fails_mcp_closed() {
    let mut s = Stack::start(StackOptions {
        snapshot_wait_seconds: 2,
        plugin: json!({"max_policy_age_seconds": 10}),
        ..Default::default()
    })
    .await
    .unwrap();
    let (user, projects) = s.user_with_projects("otto", 1).await.unwrap();
    let path = format!("/api/v1/mcp/projects/{}", projects[0]);
    let (_, token) = s.create_token(user, json!({}), 30).await.unwrap();
    s.wait_until_status(&token, &path, 200).await;

    s.control_plane.stop().unwrap();
    let stopped = Instant::now();
    let mut served = 0;
    let stale_after = loop {
        let r = s.mcp_get(&token, &path).await.unwrap();
        match r.status {
            200 => served += 1,
            503 => {
                assert_error(&r, 503, "policy_stale");
                break stopped.elapsed();
            }
            other => panic!("unexpected {other} during the outage: {}", r.text()),
        }
        assert!(stopped.elapsed() < Duration::from_secs(20), "still served after 20 s without the control plane");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    println!("served {served} requests, then policy_stale {stale_after:?} after the control plane stopped");
    assert!(stale_after >= Duration::from_secs(8), "stale too early: {stale_after:?}");
    assert!(served > 10, "the last good snapshot served meanwhile");
    // The gauge is whole seconds, set on the feed's next tick: the first
    // stale answer may come a moment before it reads 10.
    let age = s.envoy.wait_stat("wasmcustom.mcp_snapshot_age_seconds", 10, Duration::from_secs(3));
    assert!(age.is_ok(), "the age is exported: {age:?}");
    let r = s
        .send(
            RawRequest::post("/api/v1/mcp")
                .header("Authorization", &format!("Bearer {token}"))
                .header("Content-Type", "application/json")
                .body(r#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#),
        )
        .await
        .unwrap();
    assert_error(&r, 503, "policy_stale");
    s.infrabox.clear();
    let r = s.send(RawRequest::get("/api/v1/settings").header("Authorization", "Bearer eyJx")).await.unwrap();
    assert_eq!(r.status, 200, "non-MCP traffic is unaffected: {}", r.text());
    let r = s.send(RawRequest::get("/api/v1/settings").header("Authorization", &format!("Bearer {token}"))).await.unwrap();
    assert_error(&r, 403, "mcp_token_not_accepted");
    assert_eq!(s.infrabox.requests().len(), 1);

    s.control_plane.restart().unwrap();
    let back = Instant::now();
    s.wait_until_status(&token, &path, 200).await;
    println!("served again {:?} after the control plane restarted", back.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_any_snapshot_mcp_paths_get_503_and_other_traffic_flows() {
    let s = Stack::start(StackOptions { control_plane: false, ..Default::default() }).await.unwrap();
    let token = format!("ib_mcp_{}", "ab".repeat(24));
    // It waits for the first snapshot, then gives up.
    let asked = Instant::now();
    let r = s.mcp_get(&token, "/api/v1/mcp/projects").await.unwrap();
    assert_error(&r, 503, "policy_unavailable");
    let waited = asked.elapsed();
    let most = Duration::from_millis(mcp_filter_core::exchange::FIRST_POLICY_WAIT_MS as u64);
    assert!(waited >= most - Duration::from_millis(100) && waited < most * 2, "answered after {waited:?}");
    // Once per request: the next one waits again, and so does a tool call.
    let r = s.send(RawRequest::post("/api/v1/mcp").header("Authorization", &format!("Bearer {token}")).header("Content-Type", "application/json").body(b"{}".to_vec())).await.unwrap();
    assert_eq!(r.status, 503, "{}", r.text());
    s.infrabox.clear();
    let r = s.send(RawRequest::get("/api/v1/settings").header("Authorization", "Bearer eyJx")).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(s.infrabox.requests().len(), 1);
    // An MCP credential elsewhere is still refused without a snapshot.
    let r = s.send(RawRequest::get("/api/v1/settings").header("Authorization", &format!("Bearer {token}"))).await.unwrap();
    assert_error(&r, 403, "mcp_token_not_accepted");
    assert_eq!(s.infrabox.requests().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_api_refuses_bad_sessions_and_bad_requests() {
    let s = stack().await;
    let (user, projects) = s.user_with_projects("frank", 1).await.unwrap();
    let (_, other_projects) = s.user_with_projects("grace", 1).await.unwrap();
    let body = json!({"name": "agent", "enabled_projects": {}, "expires_days": 30});
    let post = |auth: String| {
        RawRequest::post("/api/v1/mcp/tokens").header("Authorization", &auth).json(&body)
    };

    // An MCP token as the session: refused at the edge and by the control plane.
    let (_, mcp) = s.create_token(user, json!({}), 30).await.unwrap();
    let r = s.send(post(format!("Bearer {mcp}"))).await.unwrap();
    assert!(r.status == 401 || r.status == 403, "{}", r.text());
    assert!(r.json().unwrap()["error"].is_string());
    let direct = post(format!("Bearer {mcp}")).send(s.control_plane.http_addr(), Duration::from_secs(5)).await.unwrap();
    assert_eq!(direct.status, 401, "{}", direct.text());
    assert!(direct.json().unwrap()["error"].is_string());
    assert!(!direct.text().contains(&mcp[7..]));

    // A JWT signed by another key.
    let other_key = SigningKey::generate(&fresh_dir("other-key")).unwrap();
    let r = s.send(post(format!("Bearer {}", other_key.sign_user_session(user)))).await.unwrap();
    assert_eq!(r.status, 401, "{}", r.text());
    // A non-user JWT (a global token) and garbage.
    let r = s.send(post(format!("Bearer {}", s.key.sign_global_token(Uuid::new_v4())))).await.unwrap();
    assert_eq!(r.status, 401, "{}", r.text());
    let r = s.send(post("Bearer not.a.jwt".into())).await.unwrap();
    assert_eq!(r.status, 401, "{}", r.text());
    // A user that does not exist.
    let r = s.send(post(format!("Bearer {}", s.session(Uuid::new_v4())))).await.unwrap();
    assert_eq!(r.status, 401, "{}", r.text());
    // No session at all.
    let r = s.send(RawRequest::post("/api/v1/mcp/tokens").json(&body)).await.unwrap();
    assert_eq!(r.status, 401, "{}", r.text());
    assert!(r.json().unwrap()["error"].is_string());

    // The session cookie works as InfraBox's dashboard sends it.
    let r = s
        .send(RawRequest::get("/api/v1/mcp/tokens").header("Cookie", &format!("token={}", s.session(user))))
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());

    // expires_days outside 1..=365, wrong types, malformed JSON.
    for bad in [json!(0), json!(366), json!(-1), json!("30"), json!(1.5)] {
        let r = s
            .token_api(user, "POST", "/api/v1/mcp/tokens", Some(json!({"name": "x", "enabled_projects": {}, "expires_days": bad})))
            .await
            .unwrap();
        assert_eq!(r.status, 400, "expires_days {bad}: {}", r.text());
        assert!(r.json().unwrap()["error"].is_string());
    }
    let r = s
        .send(
            RawRequest::post("/api/v1/mcp/tokens")
                .header("Authorization", &format!("Bearer {}", s.session(user)))
                .header("Content-Type", "application/json")
                .body("{not json"),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.json().unwrap()["error"].is_string());

    // A project the user does not collaborate on.
    let r = s
        .token_api(
            user,
            "POST",
            "/api/v1/mcp/tokens",
            Some(json!({"name": "x", "enabled_projects": {other_projects[0].to_string(): null}, "expires_days": 3})),
        )
        .await
        .unwrap();
    assert!(r.status == 400 || r.status == 403, "{}", r.text());
    assert!(r.json().unwrap()["error"].is_string());
    // ... while their own is fine.
    let r = s
        .token_api(
            user,
            "POST",
            "/api/v1/mcp/tokens",
            Some(json!({"name": "x", "enabled_projects": {projects[0].to_string(): null}, "expires_days": 3})),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 201, "{}", r.text());

    // At most 20 live tokens: this user has 2 now.
    for i in 2..20 {
        let r = s.token_api(user, "POST", "/api/v1/mcp/tokens", Some(json!({"name": format!("t{i}"), "enabled_projects": {}, "expires_days": 1}))).await.unwrap();
        assert_eq!(r.status, 201, "token {i}: {}", r.text());
    }
    let r = s.token_api(user, "POST", "/api/v1/mcp/tokens", Some(body.clone())).await.unwrap();
    assert!(r.status == 400 || r.status == 409 || r.status == 429, "{}", r.text());
    assert!(r.json().unwrap()["error"].is_string());
    let list = s.token_api(user, "GET", "/api/v1/mcp/tokens", None).await.unwrap();
    assert_eq!(list.status, 200);
    assert!(!list.text().contains("ib_mcp_"), "the list must never carry secrets");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_secrets_never_reach_logs_or_the_database() {
    let s = stack().await;
    let (user, projects) = s.user_with_projects("heidi", 1).await.unwrap();
    let path = format!("/api/v1/mcp/projects/{}", projects[0]);
    let (id, token) = s.create_token(user, json!({}), 30).await.unwrap();
    s.wait_until_status(&token, &path, 200).await;
    s.mcp_get(&format!("{token}0"), &path).await.unwrap();
    s.send(RawRequest::get("/api/v1/projects/").header("Authorization", &format!("bearer {token}"))).await.unwrap();
    s.token_api(user, "DELETE", &format!("/api/v1/mcp/tokens/{id}"), None).await.unwrap();
    s.wait_until_status(&token, &path, 401).await;

    let secret = &token[7..];
    let cp_log = s.control_plane.log_contents();
    let envoy_log = s.envoy.log_contents();
    assert!(!cp_log.is_empty() && !envoy_log.is_empty());
    assert!(!cp_log.contains(secret), "control-plane log contains the secret");
    assert!(!envoy_log.contains(secret), "envoy log contains the secret");
    let pg_log = mcp_gateway_tests::postgres::PostgresServer::shared().log_contents();
    assert!(!pg_log.contains(secret), "postgres log contains the secret");
    let dump: Vec<(String,)> = sqlx::query_as(
        "SELECT t::text FROM mcp_token t UNION ALL SELECT a::text FROM mcp_access_log a",
    )
    .fetch_all(&s.db)
    .await
    .unwrap();
    assert!(!dump.is_empty());
    for (row,) in &dump {
        assert!(!row.contains(secret), "a database row contains the secret: {row}");
    }
    let hash: (String,) = sqlx::query_as("SELECT token_hash FROM mcp_token WHERE token_id = $1").bind(&id).fetch_one(&s.db).await.unwrap();
    assert_eq!(hash.0, mcp_filter_core::token::hash_hex(&token));
}

/// What the snapshot stand-in serves (the control plane's real snapshot,
/// passed on or spoiled).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Serve {
    Genuine,
    Unsigned,
    /// One byte of the body changed, the genuine signature kept.
    Altered,
    /// Signed with a key derived from another secret.
    OtherKey,
    /// Another snapshot's signature.
    Replayed,
    /// The first genuine snapshot again, with its own signature: genuine,
    /// but older than what the VM holds (a rollback).
    Rollback,
    /// Nothing until the mode changes (a VM's first snapshot in coming).
    Hold,
}

/// A stand-in for the control plane's internal listener between Envoy and
/// the real one: it fetches the real snapshot and serves it as `mode` says
/// (`304` after a second when the VM already has that version).
async fn snapshot_stand_in(s: &Stack, mode: std::sync::Arc<std::sync::Mutex<Serve>>) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (real, secret) = (s.control_plane.internal_addr(), s.snapshot_secret.clone());
    tokio::spawn(async move {
        let mut first_signature: Option<String> = None;
        let mut first_full: Option<(Vec<u8>, String)> = None;
        while let Ok((mut conn, _)) = listener.accept().await {
            let mut head = Vec::new();
            let mut buf = [0u8; 4096];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                match conn.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => head.extend_from_slice(&buf[..n]),
                }
            }
            let head = String::from_utf8_lossy(&head).to_lowercase();
            let known = head.lines().find_map(|l| l.strip_prefix("if-none-match:")).map(|v| v.trim().trim_matches('"').to_string());
            // The VM's question, without the long-poll: a delta from its
            // version when it asks for one.
            let delta = head.lines().next().is_some_and(|l| l.contains(mcp_filter_core::snapshot::DELTA_QUERY));
            let mut ask = RawRequest::get(if delta { "/v1/snapshot?delta=1" } else { "/v1/snapshot" }).header("Authorization", &format!("Bearer {secret}"));
            if let Some(k) = &known {
                ask = ask.header("If-None-Match", &format!("\"{k}\""));
            }
            let r = ask.send(real, Duration::from_secs(5)).await.unwrap();
            let version = r.header("etag").unwrap_or_default().trim_matches('"').to_string();
            let signature = r.header(mcp_filter_core::signature::HEADER).unwrap_or_default().to_string();
            let base = r.header(mcp_filter_core::snapshot::DELTA_BASE_HEADER).map(str::to_owned);
            if r.status == 200 {
                first_signature.get_or_insert(signature.clone());
                if base.is_none() {
                    first_full.get_or_insert((r.body.clone(), signature.clone()));
                }
            }
            while *mode.lock().unwrap() == Serve::Hold {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            let m = *mode.lock().unwrap();
            let reply = if r.status == 304 {
                tokio::time::sleep(Duration::from_secs(1)).await;
                format!("HTTP/1.1 304 Not Modified\r\netag: \"{version}\"\r\ncontent-length: 0\r\n\r\n").into_bytes()
            } else {
                let mut body = r.body.clone();
                let mut base = base.clone();
                if let (Serve::Rollback, Some((old, _))) = (m, &first_full) {
                    body = old.clone();
                    base = None;
                }
                let signature = match m {
                    Serve::Genuine | Serve::Hold => Some(signature),
                    Serve::Unsigned => None,
                    Serve::Altered => {
                        // A digit of generated_at: still a valid snapshot.
                        let at = String::from_utf8_lossy(&body).find("\"generated_at\":").unwrap() + 16;
                        body[at] = if body[at] == b'1' { b'2' } else { b'1' };
                        Some(signature)
                    }
                    Serve::OtherKey => Some(mcp_filter_core::signature::sign(&mcp_filter_core::signature::signing_key("some-other-secret-0123"), &body)),
                    Serve::Replayed => first_signature.clone(),
                    Serve::Rollback => first_full.as_ref().map(|(_, sig)| sig.clone()),
                };
                let mut out = format!("HTTP/1.1 200 OK\r\ncontent-type: application/json\r\netag: \"{version}\"\r\ncontent-length: {}\r\n", body.len());
                if let Some(sig) = signature {
                    out.push_str(&format!("{}: {sig}\r\n", mcp_filter_core::signature::HEADER));
                }
                if let Some(base) = &base {
                    out.push_str(&format!("{}: {base}\r\n", mcp_filter_core::snapshot::DELTA_BASE_HEADER));
                }
                out.push_str("\r\n");
                let mut out = out.into_bytes();
                out.extend_from_slice(&body);
                out
            };
            let _ = conn.write_all(&reply).await;
            let _ = conn.shutdown().await;
        }
    });
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_refuses_a_snapshot_it_cannot_verify_and_keeps_the_last_good_one() {
    // Probing with tokens the VM must not know: no failed-authentication
    // budget in the way (tests/attacks.rs tests that budget).
    let s = Stack::start(StackOptions {
        plugin: json!({"auth_failure_limit": 1_000_000, "require_snapshot_signature": true}),
        ..StackOptions::default()
    })
    .await
    .unwrap();
    let (user, projects) = s.user_with_projects("signed", 1).await.unwrap();
    let path = format!("/api/v1/mcp/projects/{}", projects[0]);
    let (_, first) = s.create_token(user, json!({}), 30).await.unwrap();
    s.wait_until_status(&first, &path, 200).await;
    let mode = std::sync::Arc::new(std::sync::Mutex::new(Serve::Genuine));
    let mut opts = s.envoy_options.clone();
    opts.cp_internal_port = snapshot_stand_in(&s, mode.clone()).await;
    opts.node_id = format!("{}-stand-in", opts.node_id);
    let envoy = Envoy::start(&opts).unwrap();
    envoy.wait_stat("wasmcustom.mcp_snapshot_updates", 1, Duration::from_secs(20)).unwrap();
    let status = |token: String| {
        let addr = envoy.addr();
        let path = path.clone();
        async move { RawRequest::get(&path).header("Authorization", &format!("Bearer {token}")).send(addr, Duration::from_secs(5)).await.unwrap().status }
    };
    assert_eq!(status(first.clone()).await, 200, "the genuine, signed snapshot was applied");
    // Tokens of earlier rounds: not in the first snapshot, so a rollback to
    // it would refuse them.
    let mut earlier: Vec<String> = Vec::new();
    for spoiled in [Serve::Unsigned, Serve::Altered, Serve::OtherKey, Serve::Replayed, Serve::Rollback] {
        // A change on the control plane, served spoiled: refused, counted,
        // and the VM keeps what it had (the new token is unknown there).
        let (_, newer) = s.create_token(user, json!({}), 30).await.unwrap();
        s.wait_until_status(&newer, &path, 200).await;
        *mode.lock().unwrap() = spoiled;
        // Each of the two VMs refuses the delta it asked for, then the
        // whole snapshot it asks for next.
        let rejected = envoy.stat("wasmcustom.mcp_snapshot_rejected").unwrap_or(0);
        envoy.wait_stat("wasmcustom.mcp_snapshot_rejected", rejected + 4, Duration::from_secs(10)).unwrap();
        assert_eq!(status(newer.clone()).await, 401, "{spoiled:?}: the VM must not take that snapshot");
        assert_eq!(status(first.clone()).await, 200, "{spoiled:?}: the last good snapshot stays in force");
        for t in &earlier {
            assert_eq!(status(t.clone()).await, 200, "{spoiled:?}: a token of an earlier round was lost");
        }
        // Genuine again: taken at once.
        *mode.lock().unwrap() = Serve::Genuine;
        let start = Instant::now();
        while status(newer.clone()).await != 200 {
            assert!(start.elapsed() < Duration::from_secs(5), "{spoiled:?}: the genuine snapshot was not taken again");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        earlier.push(newer);
    }
    let log = envoy.log_contents();
    assert!(log.matches("rejected snapshot").count() >= 4, "the refusals are logged:\n{log}");
    assert!(log.contains("a replayed snapshot or a control plane behind"), "the rollback is refused as such:\n{log}");
    // Each change was first offered as a delta, spoiled the same way.
    assert!(log.matches("rejected delta").count() >= 4, "spoiled deltas are refused too:\n{log}");
}

/// A VM that has no snapshot yet (a new Envoy, a new epoch after a hot
/// restart) holds MCP requests until its first one arrives instead of
/// answering 503: a REST read and a tool call sent before it, and both
/// are decided with it (rate limit, audit, upstream) once it is there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_before_the_first_snapshot_wait_for_it() {
    let s = stack().await;
    let (user, projects) = s.user_with_projects("early", 1).await.unwrap();
    let path = format!("/api/v1/mcp/projects/{}", projects[0]);
    let (_, token) = s.create_token(user, json!({}), 30).await.unwrap();
    s.wait_until_status(&token, &path, 200).await;
    let mode = std::sync::Arc::new(std::sync::Mutex::new(Serve::Hold));
    let mut opts = s.envoy_options.clone();
    opts.cp_internal_port = snapshot_stand_in(&s, mode.clone()).await;
    opts.node_id = format!("{}-early", opts.node_id);
    let envoy = Envoy::start(&opts).unwrap();
    // The first snapshot is held back until the requests have waited a while.
    let release = {
        let mode = mode.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(600)).await;
            *mode.lock().unwrap() = Serve::Genuine;
            Instant::now()
        })
    };
    let rest = RawRequest::get(&path).header("Authorization", &format!("Bearer {token}"));
    let call = json!({"jsonrpc": "2.0", "id": 3, "method": "tools/call",
        "params": {"name": "get_project", "arguments": {"project_id": projects[0].to_string()},
                   "_meta": {"io.modelcontextprotocol/protocolVersion": "2026-07-28", "io.modelcontextprotocol/clientCapabilities": {}}}});
    let tool = RawRequest::post("/api/v1/mcp")
        .header("Authorization", &format!("Bearer {token}"))
        .header("Content-Type", "application/json")
        .header("Accept", "application/json, text/event-stream")
        .header("MCP-Protocol-Version", "2026-07-28")
        .header("Mcp-Method", "tools/call")
        .header("Mcp-Name", "get_project")
        .body(serde_json::to_vec(&call).unwrap());
    let sent = Instant::now();
    let (rest, tool) = tokio::join!(rest.send(envoy.addr(), Duration::from_secs(10)), tool.send(envoy.addr(), Duration::from_secs(10)));
    let answered = sent.elapsed();
    let released = release.await.unwrap();
    // Held until the snapshot came (not answered at once, not at the deadline).
    assert!(answered >= Duration::from_millis(400), "answered after {answered:?}, before the snapshot came");
    assert!(released.elapsed() < Duration::from_secs(1), "answered {:?} after the snapshot came", released.elapsed());
    let (rest, tool) = (rest.unwrap(), tool.unwrap());
    assert_eq!(rest.status, 200, "{}", rest.text());
    assert_eq!(tool.status, 200, "{}", tool.text());
    let result = tool.json().unwrap();
    assert_eq!(result["result"]["isError"], false, "{result}");
    assert!(envoy.stat("wasmcustom.mcp_snapshot_updates").unwrap_or(0) >= 1);
    // Both were rate-limited by the service, not decided locally.
    assert_eq!(envoy.stat("wasmcustom.mcp_ratelimit_allowed").unwrap_or(0), 2);
    assert_eq!(envoy.stat("wasmcustom.mcp_ratelimit_degraded").unwrap_or(0), 0);
}

/// Token changes reach a VM as deltas a fraction of the snapshot's size,
/// signed and verified, and the policy they build is the control plane's
/// current version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_changes_travel_as_signed_deltas_that_end_at_the_full_snapshot() {
    let s = Stack::start(StackOptions { plugin: json!({"require_snapshot_signature": true}), ..StackOptions::default() }).await.unwrap();
    let (user, projects) = s.user_with_projects("delta", 2).await.unwrap();
    let path = format!("/api/v1/mcp/projects/{}", projects[0]);
    // 200 tokens of 20 other users, so the full snapshot is tens of kilobytes.
    insert_bulk_tokens(&s, "delta", 20, 200).await;
    let (first_id, first) = s.create_token(user, json!({}), 30).await.unwrap();
    s.wait_until_status(&first, &path, 200).await;
    let full_bytes = RawRequest::get("/v1/snapshot")
        .header("authorization", &format!("Bearer {}", s.snapshot_secret))
        .send(s.control_plane.internal_addr(), Duration::from_secs(10))
        .await
        .unwrap()
        .body
        .len() as u64;
    let stat = |name: &str| s.envoy.stat(&format!("wasmcustom.{name}")).unwrap_or(0);
    let (deltas, bytes) = (stat("mcp_snapshot_deltas"), stat("mcp_snapshot_bytes"));
    // A token made, one scoped to the other project, one revoked.
    let (_, second) = s.create_token(user, json!({}), 30).await.unwrap();
    s.wait_until_status(&second, &path, 200).await;
    let (_, narrow) = s.create_token(user, json!({projects[1].to_string(): null}), 30).await.unwrap();
    s.wait_until_status(&narrow, &format!("/api/v1/mcp/projects/{}", projects[1]), 200).await;
    let del = s.token_api(user, "DELETE", &format!("/api/v1/mcp/tokens/{first_id}"), None).await.unwrap();
    assert!(del.status < 300, "{}", del.text());
    s.wait_until_status(&first, &path, 401).await;
    assert_eq!(s.mcp_get(&narrow, &path).await.unwrap().status, 403, "the narrow token is scoped to its project");
    let applied = stat("mcp_snapshot_deltas") - deltas;
    let per_change = (stat("mcp_snapshot_bytes") - bytes) / applied.max(1);
    println!("{applied} deltas, {per_change} bytes each on average; the full snapshot is {full_bytes} bytes");
    assert!(applied >= 3, "three changes, {applied} deltas");
    assert!(per_change * 10 < full_bytes, "a delta of {per_change} bytes against a {full_bytes}-byte snapshot");
    assert_eq!(stat("mcp_snapshot_rejected"), 0);
    // The VM's last version is the one the control plane serves.
    let (served, count) = served_snapshot(&s).await;
    assert_eq!(count, 202);
    let log = s.envoy.log_contents();
    let last = log.lines().filter(|l| l.contains("applied delta") || l.contains("applied snapshot")).last().unwrap_or_default();
    assert!(last.contains("applied delta") && last.contains(&format!("version={served}")), "last applied: {last}");
}
