//! The MCP endpoint (DESIGN §15) end to end: the official MCP Python SDK
//! (`.tools/mcp-client`, installed by `scripts/install-deps.sh`) drives
//! `POST /api/v1/mcp` through real Envoy running the filter, in both
//! protocol revisions, against the fake InfraBox; raw HTTP covers what no
//! conforming client sends (mismatched routing headers, malformed and
//! oversized bodies).

use std::process::Stdio;
use std::time::Duration;

use mcp_gateway_tests::envoy::repo_root;
use mcp_gateway_tests::http::{RawRequest, RawResponse};
use mcp_gateway_tests::stack::{Stack, StackOptions};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use sqlx::Row;
use tokio::io::AsyncWriteExt;
use uuid::Uuid;

async fn stack() -> Stack {
    Stack::start(StackOptions::default()).await.expect("stack")
}

/// Runs `tests/mcp/client.py` with this plan; returns what the SDK saw.
async fn sdk(s: &Stack, mode: &str, token: &str, steps: Value) -> Value {
    let python = repo_root().join(".tools/mcp-client/bin/python");
    assert!(python.exists(), "{} missing: run scripts/install-deps.sh", python.display());
    let plan = json!({
        "url": format!("http://127.0.0.1:{}/api/v1/mcp", s.gateway().port()),
        "mode": mode,
        "token": token,
        "steps": steps,
    });
    let mut child = tokio::process::Command::new(python)
        .arg(repo_root().join("tests/mcp/client.py"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python");
    let mut stdin = child.stdin.take().expect("stdin");
    stdin.write_all(plan.to_string().as_bytes()).await.expect("plan");
    drop(stdin);
    let out = tokio::time::timeout(Duration::from_secs(120), child.wait_with_output()).await.expect("SDK run timed out").expect("SDK run");
    let stderr = String::from_utf8_lossy(&out.stderr).replace(token, "[token]");
    let seen: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("SDK output is no JSON ({e}); stderr:\n{stderr}"));
    assert!(seen.get("failed").is_none(), "the SDK failed: {}\nstderr:\n{stderr}", seen["failed"]);
    assert!(!seen.to_string().contains(&token[7..]), "the token came back in a result");
    seen
}

fn call(tool: &str, args: Value) -> Value {
    json!({"op": "call", "tool": tool, "args": args})
}

fn text(step: &Value) -> String {
    step["content"].as_array().map(|c| c.iter().filter_map(|i| i["text"].as_str()).collect::<Vec<_>>().join("\n")).unwrap_or_default()
}

/// Alice with projects p0 (in the token's scope) and p1 (not), a build of
/// p0 with a job whose console, archive and output are set.
struct World {
    alice: Uuid,
    p0: Uuid,
    p1: Uuid,
    build: Uuid,
    job: Uuid,
    console: Vec<u8>,
}

async fn world(s: &Stack) -> World {
    let (alice, projects) = s.user_with_projects("alice", 2).await.unwrap();
    let (p0, p1) = (projects[0], projects[1]);
    let (build, jobs) = s.infrabox.add_build(p0).await.unwrap();
    let job = jobs[0];
    let console: Vec<u8> = (0..300).flat_map(|i| format!("step {i:04} done\n").into_bytes()).collect();
    assert!(s.infrabox.set_console(job, console.clone()));
    assert!(s.infrabox.set_archive(job, vec![("report.txt".into(), b"all green".to_vec())]));
    World { alice, p0, p1, build, job, console }
}

async fn token(s: &Stack, w: &World, trigger: bool) -> (String, String) {
    let (id, token) = s.create_token(w.alice, json!({ w.p0.to_string(): null }), 30).await.unwrap();
    if trigger {
        let r = s.token_api(w.alice, "POST", &format!("/api/v1/mcp/tokens/{id}/trigger"), None).await.unwrap();
        assert!(r.status < 300, "{}", r.text());
    }
    s.wait_until_status(&token, &format!("/api/v1/mcp/projects/{}", w.p0), 200).await;
    if trigger {
        // The grant reaches the edge with the next snapshot.
        let probe = format!("/api/v1/mcp/projects/{}/jobs/{}/abort", w.p0, Uuid::new_v4());
        s.wait_until(Duration::from_secs(5), || async {
            let r = s.send(RawRequest::post(&probe).header("Authorization", &format!("Bearer {token}")).body("")).await?;
            Ok(r.status != 403)
        })
        .await
        .unwrap();
    }
    (id, token)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_revisions_list_and_call_every_read_tool() {
    let s = stack().await;
    let w = world(&s).await;
    let (_, token) = token(&s, &w, false).await;
    let (p0, job, build) = (w.p0.to_string(), w.job.to_string(), w.build.to_string());
    let j = json!({"project_id": p0, "job_id": job});
    let reads = vec![
        ("list_projects", json!({})),
        ("get_project", json!({"project_id": p0})),
        ("list_builds", json!({"project_id": p0})),
        ("get_build", json!({"project_id": p0, "build_id": build})),
        ("list_build_jobs", json!({"project_id": p0, "build_id": build})),
        ("list_jobs", json!({"project_id": p0})),
        ("get_job_log", json!({"project_id": p0, "job_id": job, "max_bytes": 100})),
        ("list_job_artifacts", j.clone()),
        ("download_job_artifacts", json!({"project_id": p0, "job_id": job, "filename": "report.txt"})),
        ("get_job_output", j.clone()),
        ("get_job_testruns", j.clone()),
        ("get_job_stats", j.clone()),
        ("get_job_tabs", j.clone()),
        ("get_job_badges", j.clone()),
    ];
    for (mode, version) in [("auto", "2026-07-28"), ("legacy", "2025-11-25")] {
        s.infrabox.clear();
        let mut steps = vec![json!({"op": "tools"})];
        steps.extend(reads.iter().map(|(t, a)| call(t, a.clone())));
        steps.push(call("trigger_build", json!({"project_id": p0, "branch_or_sha": "main"})));
        steps.push(call("get_project", json!({"project_id": w.p1.to_string()})));
        steps.push(call("get_project", json!({"project_id": "not-a-uuid"})));
        steps.push(call("no_such_tool", json!({})));
        let seen = sdk(&s, mode, &token, json!(steps)).await;
        assert_eq!(seen["protocol_version"], version, "{mode}");
        assert_eq!(seen["server_name"], "infrabox-mcp-gateway");
        let steps = seen["steps"].as_array().unwrap();
        let tools = steps[0]["tools"].as_array().unwrap();
        let names: Vec<&str> = tools.iter().filter_map(|t| t["name"].as_str()).collect();
        for (t, _) in &reads {
            assert!(names.contains(t), "{mode}: {t} missing from {names:?}");
        }
        assert!(!names.iter().any(|n| ["trigger_build", "abort_job", "abort_build", "restart_job"].contains(n)), "{mode}: write tools without the grant: {names:?}");
        let log_tool = tools.iter().find(|t| t["name"] == "get_job_log").unwrap();
        assert_eq!(log_tool["annotations"]["readOnlyHint"], true, "{log_tool}");
        assert_eq!(log_tool["inputSchema"]["properties"]["max_bytes"]["maximum"], 1 << 20, "{log_tool}");
        for (i, (t, _)) in reads.iter().enumerate() {
            let r = &steps[i + 1];
            assert_eq!(r["is_error"], false, "{mode}: {t} failed: {r}");
        }
        let by = |t: &str| &steps[1 + reads.iter().position(|(n, _)| *n == t).unwrap()];
        // Only the token's projects, though alice collaborates on p1 too.
        let listed: Vec<&str> = by("list_projects")["structured"]["result"].as_array().unwrap().iter().filter_map(|p| p["id"].as_str()).collect();
        assert_eq!(listed, vec![p0.as_str()], "{mode}");
        assert_eq!(by("get_project")["structured"]["id"], p0);
        // The log's last 100 bytes, and the cut stated.
        let log = by("get_job_log");
        let tail = String::from_utf8_lossy(&w.console[w.console.len() - 100..]).to_string();
        assert_eq!(log["content"][0]["text"], tail, "{mode}");
        assert!(text(log).contains(&format!("last 100 of {} bytes", w.console.len())), "{mode}: {log}");
        let file = &by("download_job_artifacts")["content"][0];
        assert_eq!((file["type"].as_str(), file["blob_b64"].as_str()), (Some("resource"), Some("YWxsIGdyZWVu")), "{mode}: {file}");
        assert_eq!(by("get_job_output")["content"][0]["mimeType"], "application/gzip");
        assert_eq!(by("get_job_testruns")["structured"]["result"][1]["state"], "failure");
        let n = reads.len();
        let write = &steps[n + 1];
        assert_eq!((write["is_error"].as_bool(), write["structured"]["error"].as_str()), (Some(true), Some("write_forbidden")), "{mode}: {write}");
        let foreign = &steps[n + 2];
        assert_eq!(foreign["structured"]["error"], "project_forbidden", "{mode}: {foreign}");
        assert!(text(foreign).contains(&p0), "the error names the project the token may access: {foreign}");
        assert_eq!(steps[n + 3]["rpc_error"]["code"], -32602, "{mode}: invalid arguments are a protocol error");
        assert_eq!(steps[n + 4]["rpc_error"]["code"], -32602, "{mode}: an unknown tool is a protocol error");
        // What reached InfraBox: the user's own credential, never the token;
        // nothing for the denied calls.
        let seen = s.infrabox.requests();
        assert_eq!(seen.len(), reads.len(), "{mode}: {:?}", seen.iter().map(|r| &r.path).collect::<Vec<_>>());
        for r in &seen {
            assert!(!r.reveals_mcp_secret(), "{mode}: the token reached InfraBox on {}", r.path);
            assert!(r.header("authorization").is_some_and(|a| a.starts_with("Bearer ")), "{mode}: {}", r.path);
            assert!(!r.path.contains(&w.p1.to_string()));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_tools_need_the_grant_and_their_arguments_are_audited_as_a_digest() {
    let s = stack().await;
    let w = world(&s).await;
    let (token_id, token) = token(&s, &w, true).await;
    let p0 = w.p0.to_string();
    let secret_value = format!("hunter2-{}", Uuid::new_v4().simple());
    let args = json!({"project_id": p0, "branch_or_sha": "main", "env": [{"name": "DEPLOY_KEY", "value": secret_value}]});
    // Both revisions: each lists the write tools and triggers once.
    for (round, mode) in ["auto", "legacy"].into_iter().enumerate() {
        s.infrabox.clear();
        let before = s.infrabox.builds_of(w.p0).len();
        let seen = sdk(&s, mode, &token, json!([{"op": "tools"}, call("trigger_build", args.clone()), call("abort_job", json!({"project_id": p0, "job_id": w.job.to_string()}))])).await;
        let steps = seen["steps"].as_array().unwrap();
        let tools = steps[0]["tools"].as_array().unwrap();
        let abort = tools.iter().find(|t| t["name"] == "abort_job").expect("abort_job listed with the grant");
        assert_eq!((abort["annotations"]["destructiveHint"].as_bool(), abort["annotations"]["readOnlyHint"].as_bool()), (Some(true), Some(false)), "{mode}");
        assert!(tools.iter().any(|t| t["name"] == "trigger_build"), "{mode}");
        assert_eq!(steps[1]["is_error"], false, "{mode}: {}", steps[1]);
        assert_eq!(steps[1]["structured"]["message"], "Build triggered", "{mode}: {}", steps[1]);
        assert_eq!(s.infrabox.builds_of(w.p0).len(), before + 1, "{mode}: the trigger reached InfraBox");
        let trig = s.infrabox.requests_matching(&format!("/api/v1/projects/{p0}/trigger"));
        assert_eq!(trig.len(), 1, "{mode}");
        let body: Value = serde_json::from_slice(&trig[0].body).unwrap();
        assert_eq!(body, json!({"branch_or_sha": "main", "env": [{"name": "DEPLOY_KEY", "value": secret_value}]}), "{mode}: InfraBox got exactly the trigger body");
        assert_eq!(steps[2]["is_error"], false, "{mode}: {}", steps[2]);
        assert_eq!(s.infrabox.aborted_jobs(), vec![w.job; round + 1], "{mode}");
    }

    // One row per call: tool, method, digest of the canonical arguments,
    // outcome and status; never an argument's value.
    // The keyed digest (HMAC-SHA256 under a key derived from the internal
    // secret), not the plain hash anyone could test guesses against.
    let canonical = serde_json::to_string(&args).unwrap();
    let key = mcp_filter_core::audit::arguments_key(&s.grpc_secret);
    let digest = hex::encode(mcp_filter_core::audit::hmac_sha256(&key, canonical.as_bytes()));
    assert_ne!(digest, hex::encode(Sha256::digest(&canonical)));
    let row = s
        .wait_until(Duration::from_secs(10), || async {
            Ok(sqlx::query("SELECT 1 FROM mcp_access_log WHERE token_id = $1 AND details->'mcp'->>'tool' = 'abort_job'")
                .bind(&token_id)
                .fetch_optional(&s.db)
                .await?
                .is_some())
        })
        .await;
    assert!(row.is_ok(), "no audit row for the abort");
    let rows = sqlx::query(
        "SELECT action, outcome, status_code, route, details, project_id FROM mcp_access_log \
         WHERE token_id = $1 AND details ? 'mcp' ORDER BY accessed_at",
    )
    .bind(&token_id)
    .fetch_all(&s.db)
    .await
    .unwrap();
    let trigger_row = rows.iter().find(|r| r.get::<Value, _>("details")["mcp"]["tool"] == "trigger_build").expect("a row for the trigger");
    let details: Value = trigger_row.get("details");
    assert_eq!(details["mcp"]["method"], "tools/call");
    assert_eq!(details["mcp"]["arguments_hmac"], digest, "{details}");
    assert_eq!(details["mcp"]["upstream_status"], 200);
    assert_eq!((trigger_row.get::<String, _>("action"), trigger_row.get::<String, _>("outcome")), ("projects.trigger".into(), "success".into()));
    assert_eq!(trigger_row.get::<Option<i16>, _>("status_code"), Some(200));
    assert_eq!(trigger_row.get::<Option<Uuid>, _>("project_id"), Some(w.p0));
    let all: Vec<String> = sqlx::query("SELECT row_to_json(l)::text AS j FROM mcp_access_log l").fetch_all(&s.db).await.unwrap().iter().map(|r| r.get("j")).collect();
    assert!(!all.iter().any(|r| r.contains(&secret_value)), "an argument value reached the audit table");
    // The token's access-log API shows the tool calls.
    let r = s.token_api(w.alice, "GET", &format!("/api/v1/mcp/tokens/{token_id}/access-log?limit=100"), None).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let items = r.json().unwrap()["items"].as_array().unwrap().clone();
    assert!(items.iter().any(|i| i["details"]["mcp"]["tool"] == "abort_job"), "{items:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rate_limit_is_one_budget_across_rest_and_mcp_and_a_tool_error_with_a_retry_time() {
    // A deadline no debug build misses: every decision is the service's.
    // The design's log limit (the harness's default stack sets them high).
    let limits = [("MCP_LIMIT_WINDOW_SECONDS", "60"), ("MCP_LIMIT_LOG", "10")].map(|(k, v)| (k.to_string(), v.to_string()));
    let s = Stack::start(StackOptions { plugin: json!({"ratelimit_timeout_ms": 2000}), control_plane_env: limits.to_vec(), ..Default::default() })
        .await
        .expect("stack");
    let w = world(&s).await;
    let (_, token) = token(&s, &w, false).await;
    let rest = format!("/api/v1/mcp/projects/{}/jobs/{}/log", w.p0, w.job);
    // The log class allows 10 per minute per user: 4 over REST …
    for _ in 0..4 {
        assert_eq!(s.mcp_get(&token, &rest).await.unwrap().status, 200);
    }
    // … and 6 more over MCP, then the 7th is limited.
    let log = call("get_job_log", json!({"project_id": w.p0.to_string(), "job_id": w.job.to_string(), "max_bytes": 10}));
    let seen = sdk(&s, "legacy", &token, json!(vec![log; 7])).await;
    let steps = seen["steps"].as_array().unwrap();
    for (i, st) in steps.iter().take(6).enumerate() {
        assert_eq!(st["is_error"], false, "call {i}: {st}");
    }
    let limited = &steps[6];
    assert_eq!((limited["is_error"].as_bool(), limited["structured"]["error"].as_str()), (Some(true), Some("rate_limited")), "{limited}");
    let retry = limited["structured"]["retry_after_seconds"].as_u64().expect("a retry time");
    assert!((1..=60).contains(&retry), "{limited}");
    assert!(text(limited).contains(&format!("retry in {retry} s")), "{limited}");
    // And REST sees the same spent budget.
    assert_eq!(s.mcp_get(&token, &rest).await.unwrap().status, 429);
    assert_eq!(s.envoy.stat("wasmcustom.mcp_ratelimit_degraded").unwrap_or(0), 0, "a decision was made locally");
}

fn rpc(id: u32, method: &str, params: Value) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params})
}

fn post(token: Option<&str>, body: &[u8]) -> RawRequest {
    let mut r = RawRequest::post("/api/v1/mcp").header("Content-Type", "application/json").header("Accept", "application/json, text/event-stream");
    if let Some(t) = token {
        r = r.header("Authorization", &format!("Bearer {t}"));
    }
    r.body(body.to_vec())
}

fn rpc_code(r: &RawResponse) -> Option<i64> {
    r.json().ok().and_then(|v| v["error"]["code"].as_i64())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_faults_and_discovery_through_envoy() {
    let s = stack().await;
    let w = world(&s).await;
    let (_, token) = token(&s, &w, false).await;
    let port = s.gateway().port();
    s.infrabox.clear();

    // 401 with the resource metadata; the metadata itself.
    let r = s.send(post(None, br#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#)).await.unwrap();
    assert_eq!(r.status, 401, "{}", r.text());
    let www = r.header("www-authenticate").unwrap_or_default().to_string();
    let meta_url = format!("http://127.0.0.1:{port}/.well-known/oauth-protected-resource/api/v1/mcp");
    assert!(www.contains(&format!("resource_metadata=\"{meta_url}\"")), "{www}");
    let r = s.send(post(Some("ib_mcp_0000000000000000000000000000000000000000000000000"), b"{}")).await.unwrap();
    assert_eq!(r.status, 401);
    assert!(r.header("www-authenticate").unwrap_or_default().contains("error=\"invalid_token\""));
    let r = s.send(RawRequest::get("/.well-known/oauth-protected-resource/api/v1/mcp")).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let meta = r.json().unwrap();
    assert_eq!(meta["resource"], format!("http://127.0.0.1:{port}/api/v1/mcp"));
    assert_eq!(meta["bearer_methods_supported"], json!(["header"]));

    // No streams, no sessions.
    for method in ["GET", "DELETE"] {
        let r = s.send(RawRequest::new(method, "/api/v1/mcp").header("Authorization", &format!("Bearer {token}"))).await.unwrap();
        assert_eq!((r.status, r.header("allow")), (405, Some("POST")), "{method}: {}", r.text());
    }

    let modern = |method: &str, mut params: Value| {
        params["_meta"] = json!({"io.modelcontextprotocol/protocolVersion": "2026-07-28", "io.modelcontextprotocol/clientCapabilities": {}});
        serde_json::to_vec(&rpc(5, method, params)).unwrap()
    };
    let get_project = json!({"name": "get_project", "arguments": {"project_id": w.p0.to_string()}});
    let send_modern = |name: &'static str| {
        post(Some(&token), &modern("tools/call", get_project.clone()))
            .header("MCP-Protocol-Version", "2026-07-28")
            .header("Mcp-Method", "tools/call")
            .header("Mcp-Name", name)
    };
    // A matching Mcp-Name goes through; a mismatched one (an intermediary
    // routing on "list_projects" while the body calls get_project) is refused.
    let r = match s.send(send_modern("get_project")).await {
        Ok(r) => r,
        Err(e) => panic!("{e}: {}", s.envoy.log_contents().chars().rev().take(6000).collect::<String>().chars().rev().collect::<String>()),
    };
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json().unwrap()["result"]["resultType"], "complete");
    let r = s.send(send_modern("list_projects")).await.unwrap();
    assert_eq!((r.status, rpc_code(&r)), (400, Some(-32020)), "{}", r.text());
    let r = s
        .send(post(Some(&token), &modern("tools/list", json!({}))).header("MCP-Protocol-Version", "2026-07-28").header("Mcp-Method", "tools/call"))
        .await
        .unwrap();
    assert_eq!((r.status, rpc_code(&r)), (400, Some(-32020)), "{}", r.text());
    let r = s
        .send(post(Some(&token), &modern("tools/list", json!({}))).header("MCP-Protocol-Version", "2026-07-28").header("Mcp-Method", "tools/list").header("Mcp-Method", "tools/list"))
        .await
        .unwrap();
    assert_eq!((r.status, rpc_code(&r)), (400, Some(-32020)), "a duplicated routing header: {}", r.text());

    // Malformed, ambiguous, batched, unknown.
    for (body, status, code) in [
        (&b"{\"jsonrpc\":\"2.0\",\"id\":1,"[..], 400, -32700),
        (b"\xff\xfe\x00", 400, -32700),
        (br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"get_project","name":"trigger_build"}}"#, 400, -32700),
        (br#"[{"jsonrpc":"2.0","id":1,"method":"tools/list"}]"#, 400, -32600),
        (br#"{"jsonrpc":"2.0","id":1,"method":"tools/list","extra":true}"#, 400, -32600),
        // 2025-11-25 clients read a 404 as a lost session: its errors travel with 200.
        (br#"{"jsonrpc":"2.0","id":1,"method":"prompts/list"}"#, 200, -32601),
    ] {
        let r = s.send(post(Some(&token), body)).await.unwrap();
        assert_eq!((r.status, rpc_code(&r)), (status, Some(code)), "{}: {}", String::from_utf8_lossy(body), r.text());
    }
    // A notification is accepted without a body.
    let r = s.send(post(Some(&token), br#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#)).await.unwrap();
    assert_eq!((r.status, r.body.len()), (202, 0), "{}", r.text());

    // Oversized: by Content-Length at once, and by what arrives when chunked.
    let big = serde_json::to_vec(&rpc(1, "tools/list", json!({"pad": "x".repeat(70 * 1024)}))).unwrap();
    let r = s.send(post(Some(&token), &big)).await.unwrap();
    assert_eq!(r.status, 413, "{}", r.text());
    let mut chunked = Vec::new();
    for part in big.chunks(16 * 1024) {
        chunked.extend(format!("{:x}\r\n", part.len()).into_bytes());
        chunked.extend(part);
        chunked.extend(b"\r\n");
    }
    chunked.extend(b"0\r\n\r\n");
    let r = s
        .send(
            RawRequest::post("/api/v1/mcp")
                .header("Authorization", &format!("Bearer {token}"))
                .header("Content-Type", "application/json")
                .header("Transfer-Encoding", "chunked")
                .body(chunked),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 413, "{}", r.text());
    let r = s
        .send(RawRequest::post("/api/v1/mcp").header("Authorization", &format!("Bearer {token}")).header("Content-Type", "text/plain").body("{}"))
        .await
        .unwrap();
    assert_eq!(r.status, 415, "{}", r.text());

    // An MCP secret in the body, even behind a JSON escape, goes nowhere.
    let escaped = token.replacen('_', "\\u005f", 1);
    let body = format!(r#"{{"jsonrpc":"2.0","id":9,"method":"tools/call","params":{{"name":"get_project","arguments":{{"project_id":"{}"}},"note":"{escaped}"}}}}"#, w.p0);
    let r = s.send(post(Some(&token), body.as_bytes())).await.unwrap();
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(r.json().unwrap()["error"], "credential_misplaced");

    // Only the one valid call reached InfraBox.
    let seen = s.infrabox.requests();
    assert_eq!(seen.len(), 1, "{:?}", seen.iter().map(|r| &r.path).collect::<Vec<_>>());
    assert_eq!(seen[0].path, format!("/api/v1/projects/{}", w.p0));
}

/// HTTP/2 request trailers: with `allow_on_headers_stop_iteration` a paused
/// head is only a stopped head, so trailers must not let a request go on
/// before it is decided — neither a REST write waiting for its rate-limit
/// answer (it must end 403 with nothing forwarded), nor a tool call whose
/// body ends with trailers (it is read and answered).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_trailers_never_forward_an_undecided_request() {
    let s = stack().await;
    let w = world(&s).await;
    let (_, token) = token(&s, &w, false).await;
    s.infrabox.clear();

    async fn h2_post(s: &Stack, path: &str, token: &str, body: &'static [u8], content_type: &str) -> (u16, Vec<u8>) {
        let tcp = tokio::net::TcpStream::connect(s.gateway()).await.unwrap();
        let (client, conn) = h2::client::handshake(tcp).await.unwrap();
        tokio::spawn(conn);
        let mut client = client.ready().await.unwrap();
        let req = http::Request::post(format!("http://127.0.0.1:{}{path}", s.gateway().port()))
            // Lower-case "bearer": what InfraBox's own MCP layer would wave through.
            .header("authorization", format!("bearer {token}"))
            .header("content-type", content_type)
            .body(())
            .unwrap();
        let (response, mut stream) = client.send_request(req, false).unwrap();
        stream.send_data(bytes::Bytes::from_static(body), false).unwrap();
        let mut trailers = http::HeaderMap::new();
        trailers.insert("x-trailer", http::HeaderValue::from_static("1"));
        stream.send_trailers(trailers).unwrap();
        let response = tokio::time::timeout(Duration::from_secs(20), response).await.expect("an answer").unwrap();
        let status = response.status().as_u16();
        let mut body = response.into_body();
        let mut out = Vec::new();
        while let Some(chunk) = body.data().await {
            let chunk = chunk.unwrap();
            let _ = body.flow_control().release_capacity(chunk.len());
            out.extend_from_slice(&chunk);
        }
        (status, out)
    }

    // A write with a read-only token: denied after the rate-limit answer,
    // whatever the trailers did meanwhile.
    let trigger = format!("/api/v1/mcp/projects/{}/trigger", w.p0);
    let (status, body) = h2_post(&s, &trigger, &token, br#"{"branch_or_sha":"main"}"#, "application/json").await;
    assert_eq!(status, 403, "{}", String::from_utf8_lossy(&body));
    assert_eq!(serde_json::from_slice::<Value>(&body).unwrap()["error"], "write_forbidden");
    // The endpoint: the body ends with the trailers and is answered.
    let (status, body) = h2_post(&s, "/api/v1/mcp", &token, br#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#, "application/json").await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert!(serde_json::from_slice::<Value>(&body).unwrap()["result"]["tools"].is_array());
    let (status, body) = h2_post(
        &s,
        "/api/v1/mcp",
        &token,
        br#"{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"trigger_build","arguments":{"project_id":"00000000-0000-4000-8000-000000000000","branch_or_sha":"main"}}}"#,
        "application/json",
    )
    .await;
    assert_eq!(status, 200);
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["result"]["isError"], true, "{v}");
    // Nothing reached InfraBox.
    let seen = s.infrabox.requests();
    assert!(seen.is_empty(), "{:?}", seen.iter().map(|r| (&r.method, &r.path)).collect::<Vec<_>>());
}
