//! The state machine against a mock host: REST and MCP requests through
//! every state, and the table test that both surfaces reach the same
//! decision for the same request.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};

use serde_json::{json, Value};

use super::*;
#[cfg(all(target_family = "wasm", target_os = "unknown"))]
use wasm_bindgen_test::wasm_bindgen_test as test;
use crate::snapshot::{Limits, Snapshot, SnapshotToken, SnapshotUser, SCHEMA};
use crate::token;
use crate::window::SlidingWindow;

const PA: &str = "0b7a4c2e-1f3d-4c5b-9a8e-7d6c5b4a3f21";
const PB: &str = "1b7a4c2e-1f3d-4c5b-9a8e-7d6c5b4a3f21";
const PX: &str = "9b7a4c2e-1f3d-4c5b-9a8e-7d6c5b4a3f21";
const J1: &str = "3b7a4c2e-1f3d-4c5b-9a8e-7d6c5b4a3f21";
const B1: &str = "2b7a4c2e-1f3d-4c5b-9a8e-7d6c5b4a3f21";
const HOST: &str = "infrabox.test";
const NOW_MS: i64 = 100_000;

type Outcome<T = ()> = Result<T, String>;

struct MockHost {
    windows: RefCell<HashMap<String, SlidingWindow>>,
    request_body: Vec<u8>,
    response_body: RefCell<Vec<u8>>,
}

impl MockHost {
    fn new(request_body: &[u8]) -> Self {
        Self { windows: RefCell::default(), request_body: request_body.to_vec(), response_body: RefCell::default() }
    }
}

impl Host for MockHost {
    fn now_ms(&self) -> i64 {
        NOW_MS
    }
    fn client_address(&self) -> String {
        "192.0.2.1".into()
    }
    fn local_window(&self, key: &str, limit: u32, window_seconds: u32, now_ms: i64) -> Decision {
        let mut windows = self.windows.borrow_mut();
        let w = windows.entry(key.to_string()).or_default();
        w.decide(now_ms as u64, limit, u64::from(window_seconds) * 1000)
    }
    fn request_body(&self, len: usize) -> Vec<u8> {
        self.request_body.get(..len).unwrap_or(&self.request_body).to_vec()
    }
    fn response_body(&self, len: usize) -> Vec<u8> {
        let b = self.response_body.borrow();
        b.get(..len).unwrap_or(&b).to_vec()
    }
}

fn tok(n: u8) -> String {
    token::mint(&[n; 24])
}

fn grant(n: u8, trigger: bool, projects: BTreeMap<String, Option<i64>>) -> SnapshotToken {
    SnapshotToken {
        token_id: tok(n)[7..23].to_string(),
        token_hash: token::hash_hex(&tok(n)),
        user_id: "u1".into(),
        expires_at: 1_000_000,
        allow_trigger: trigger,
        projects,
    }
}

/// Token 1 reads PA and PB (PB's grant expired), token 2 may trigger on PA,
/// token 3 may trigger but its user has no write credential.
fn policy() -> Outcome<Rc<Policy>> {
    let mut tokens = vec![
        grant(1, false, BTreeMap::from([(PA.into(), None), (PB.into(), Some(50))])),
        grant(2, true, BTreeMap::from([(PA.into(), None)])),
        grant(3, true, BTreeMap::from([(PA.into(), None)])),
    ];
    tokens[2].user_id = "u2".into();
    Policy::compile(&Snapshot {
        schema: SCHEMA,
        version: "v".into(),
        generated_at: 0,
        limits: Limits::default(),
        tokens,
        users: BTreeMap::from([
            ("u1".into(), SnapshotUser { read_credential: Some("R".into()), write_credential: Some("W".into()) }),
            ("u2".into(), SnapshotUser { read_credential: Some("R2".into()), write_credential: None }),
        ]),
    })
    .map(Rc::new)
    .map_err(|e| e.to_string())
}

fn config() -> Outcome<Rc<PluginConfig>> {
    PluginConfig::parse(br#"{"snapshot_secret":"0123456789abcdef","hosts":["infrabox.test"],"mcp_max_body_bytes":2048}"#)
        .map(Rc::new)
        .map_err(|e| e.to_string())
}

struct Rig {
    policy: Option<Rc<Policy>>,
    policy_age_ms: i64,
    config: Rc<PluginConfig>,
    ownership: OwnershipCache,
    coalescer: Coalescer,
}

impl Rig {
    fn new() -> Outcome<Self> {
        Ok(Self { policy: Some(policy()?), policy_age_ms: 0, config: config()?, ownership: OwnershipCache::new(16), coalescer: Coalescer::new(0) })
    }

    fn vm(&mut self) -> Vm<'_> {
        Vm {
            config: Some(self.config.clone()),
            policy: self.policy.clone(),
            policy_age_ms: self.policy_age_ms,
            ownership: &mut self.ownership,
            coalescer: &mut self.coalescer,
        }
    }
}

fn headers(method: &str, path: &str, others: &[(&str, &str)]) -> Vec<(String, String)> {
    pipeline::request_headers(method, path, HOST, others)
}

/// What a request came to, on either surface.
#[derive(Debug, Clone, PartialEq, Eq)]
enum End {
    Forward { method: String, path: String, credential: String },
    Deny(String),
}

fn reply(step: &Step) -> Option<(u32, Vec<(String, String)>, Value)> {
    step.effects.iter().find_map(|e| match e {
        Effect::Reply { status, headers, body } => {
            Some((*status, headers.clone(), serde_json::from_slice(body).unwrap_or(Value::Null)))
        }
        _ => None,
    })
}

fn ask(step: &Step) -> Option<LimitKey> {
    step.effects.iter().find_map(|e| match e {
        Effect::AskLimit { key, .. } => Some(key.clone()),
        _ => None,
    })
}

fn end_of(step: &Step, tool: bool) -> Outcome<End> {
    if let Some((status, _, body)) = reply(step) {
        if tool {
            if status != 200 {
                return Err(format!("tool call answered HTTP {status}"));
            }
            let r = &body["result"];
            if r["isError"] != true {
                return Err(format!("not a tool error: {body}"));
            }
            return Ok(End::Deny(r["structuredContent"]["error"].as_str().unwrap_or("?").to_string()));
        }
        return Ok(End::Deny(body["error"].as_str().unwrap_or("?").to_string()));
    }
    let set = |name: &str| {
        step.effects.iter().find_map(|e| match e {
            Effect::SetRequestHeader(k, v) if k == name => Some(v.clone()),
            _ => None,
        })
    };
    match (set(":method"), set(":path"), set("authorization")) {
        (Some(method), Some(path), Some(credential)) => Ok(End::Forward { method, path, credential }),
        _ => Err(format!("neither forwarded nor denied: {:?}", step.effects)),
    }
}

/// A REST request to its end, with this rate-limit answer.
fn rest(rig: &mut Rig, method: &str, path: &str, token: &str, answer: &LimitAnswer) -> Outcome<(Option<LimitKey>, End)> {
    let host = MockHost::new(b"");
    let mut ex = Exchange::new();
    let auth = format!("Bearer {token}");
    let step = ex.on_request_headers(headers(method, path, &[("authorization", &auth)]), true, &mut rig.vm(), &host);
    let Some(key) = ask(&step) else { return Ok((None, end_of(&step, false)?)) };
    let step = ex.on_limit(answer.clone(), &mut rig.vm(), &host);
    Ok((Some(key), end_of(&step, false)?))
}

fn call_body(tool: &str, arguments: Value) -> Vec<u8> {
    serde_json::to_vec(&json!({"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": {"name": tool, "arguments": arguments}}))
        .unwrap_or_default()
}

/// An MCP message through the endpoint: the step after its body.
fn mcp_step(rig: &mut Rig, ex: &mut Exchange, token: &str, body: &[u8], extra: &[(&str, &str)]) -> Step {
    let host = MockHost::new(body);
    let auth = format!("Bearer {token}");
    let len = body.len().to_string();
    let mut others = vec![("authorization", auth.as_str()), ("content-type", "application/json"), ("content-length", len.as_str())];
    others.extend_from_slice(extra);
    let step = ex.on_request_headers(headers("POST", "/api/v1/mcp", &others), false, &mut rig.vm(), &host);
    if step.flow == Flow::Continue || reply(&step).is_some() {
        return step;
    }
    ex.on_request_body(body.len(), true, &mut rig.vm(), &host)
}

/// A tool call to its end, with this rate-limit answer.
fn tool(rig: &mut Rig, token: &str, name: &str, arguments: Value, answer: &LimitAnswer) -> Outcome<(Option<LimitKey>, End)> {
    let mut ex = Exchange::new();
    let body = call_body(name, arguments);
    let step = mcp_step(rig, &mut ex, token, &body, &[]);
    let Some(key) = ask(&step) else { return Ok((None, end_of(&step, true)?)) };
    if !step.effects.iter().any(|e| matches!(e, Effect::ReplaceRequestBody(_))) {
        return Err("the tool call's body was not replaced by the upstream body".into());
    }
    let step = ex.on_limit(answer.clone(), &mut rig.vm(), &MockHost::new(b""));
    Ok((Some(key), end_of(&step, true)?))
}

fn allowed() -> Decision {
    Decision { allowed: true, remaining: 5, reset_ms: 1000 }
}

#[test]
fn rest_and_mcp_reach_the_same_decisions() -> Outcome {
    let limited = Decision { allowed: false, remaining: 0, reset_ms: 7000 };
    let ok = LimitAnswer::Decided(allowed(), Ownership::Confirmed);
    let job = |p: &str| json!({"project_id": p, "job_id": J1});
    // (what, token, REST method + path, tool + arguments, rate-limit answer)
    let cases: Vec<(&str, String, &str, String, &str, Value, LimitAnswer)> = vec![
        ("allowed read", tok(1), "GET", format!("/api/v1/mcp/projects/{PA}/builds/{B1}"), "get_build", json!({"project_id": PA, "build_id": B1}), ok.clone()),
        ("project list", tok(1), "GET", "/api/v1/mcp/projects".into(), "list_projects", json!({}), ok.clone()),
        ("outside the scope", tok(1), "GET", format!("/api/v1/mcp/projects/{PX}"), "get_project", json!({"project_id": PX}), ok.clone()),
        ("expired project grant", tok(1), "GET", format!("/api/v1/mcp/projects/{PB}"), "get_project", json!({"project_id": PB}), ok.clone()),
        ("write without the grant", tok(1), "POST", format!("/api/v1/mcp/projects/{PA}/trigger"), "trigger_build", json!({"project_id": PA, "branch_or_sha": "main"}), ok.clone()),
        ("write with the grant", tok(2), "POST", format!("/api/v1/mcp/projects/{PA}/trigger"), "trigger_build", json!({"project_id": PA, "branch_or_sha": "main"}), ok.clone()),
        ("abort with the grant", tok(2), "POST", format!("/api/v1/mcp/projects/{PA}/jobs/{J1}/abort"), "abort_job", job(PA), ok.clone()),
        ("no write credential", tok(3), "POST", format!("/api/v1/mcp/projects/{PA}/jobs/{J1}/abort"), "abort_job", job(PA), ok.clone()),
        ("rate limited", tok(1), "GET", format!("/api/v1/mcp/projects/{PA}/jobs/{J1}/log"), "get_job_log", job(PA), LimitAnswer::Decided(limited, Ownership::Confirmed)),
        ("foreign job", tok(1), "GET", format!("/api/v1/mcp/projects/{PA}/jobs/{J1}/log"), "get_job_log", job(PA), LimitAnswer::Decided(allowed(), Ownership::Refuted)),
        ("ownership unknown", tok(1), "GET", format!("/api/v1/mcp/projects/{PA}/jobs/{J1}/output"), "get_job_output", job(PA), LimitAnswer::StoreFailed(Ownership::Unknown)),
        ("service away, no job", tok(1), "GET", format!("/api/v1/mcp/projects/{PA}/builds"), "list_builds", json!({"project_id": PA}), LimitAnswer::Failed("down".into())),
        ("service away, a job", tok(1), "GET", format!("/api/v1/mcp/projects/{PA}/jobs/{J1}/stats"), "get_job_stats", job(PA), LimitAnswer::Failed("down".into())),
    ];
    for (what, token, method, path, name, arguments, answer) in cases {
        let (rest_key, rest_end) = rest(&mut Rig::new()?, method, &path, &token, &answer)?;
        let (tool_key, tool_end) = tool(&mut Rig::new()?, &token, name, arguments, &answer)?;
        assert_eq!(rest_end, tool_end, "{what}: REST and MCP decided differently");
        assert_eq!(rest_key, tool_key, "{what}: not the same rate-limit budget");
    }
    // The expected ends, so that "both equally wrong" cannot pass.
    let (_, end) = rest(&mut Rig::new()?, "GET", &format!("/api/v1/mcp/projects/{PX}"), &tok(1), &ok)?;
    assert_eq!(end, End::Deny("project_forbidden".into()));
    let (_, end) = tool(&mut Rig::new()?, &tok(2), "abort_job", job(PA), &ok)?;
    assert_eq!(end, End::Forward { method: "GET".into(), path: format!("/api/v1/projects/{PA}/jobs/{J1}/abort"), credential: "Bearer W".into() });
    let (_, end) = tool(&mut Rig::new()?, &tok(1), "get_job_log", job(PA), &LimitAnswer::Decided(allowed(), Ownership::Refuted))?;
    assert_eq!(end, End::Deny("unknown_endpoint".into()));
    let (_, end) = tool(&mut Rig::new()?, &tok(1), "get_job_stats", job(PA), &LimitAnswer::Failed("down".into()))?;
    assert_eq!(end, End::Deny("ownership_unavailable".into()));
    let (_, end) = tool(&mut Rig::new()?, &tok(3), "abort_job", job(PA), &ok)?;
    assert_eq!(end, End::Deny("upstream_credential_missing".into()));
    Ok(())
}

#[test]
fn one_budget_across_rest_and_mcp() -> Outcome {
    // With the service away, both surfaces count against the same local window.
    let mut rig = Rig::new()?;
    let host = MockHost::new(b"");
    let down = LimitAnswer::Failed("down".into());
    let mut denied = 0;
    for i in 0..12 {
        let mut ex = Exchange::new();
        let end = if i % 2 == 0 {
            let auth = format!("Bearer {}", tok(1));
            let step = ex.on_request_headers(headers("GET", &format!("/api/v1/mcp/projects/{PA}/jobs/{J1}/log"), &[("authorization", &auth)]), true, &mut rig.vm(), &host);
            ask(&step).ok_or("no limit asked")?;
            rig.ownership.confirm(&Claim::of(&crate::route::Params { project: Some(PA.into()), build: None, job: Some(J1.into()) }).ok_or("claim")?);
            let step = ex.on_limit(down.clone(), &mut rig.vm(), &host);
            end_of(&step, false)?
        } else {
            let body = call_body("get_job_log", json!({"project_id": PA, "job_id": J1}));
            let h = MockHost { windows: RefCell::new(host.windows.borrow().clone()), ..MockHost::new(&body) };
            let step = mcp_step(&mut rig, &mut ex, &tok(1), &body, &[]);
            ask(&step).ok_or("no limit asked")?;
            let step = ex.on_limit(down.clone(), &mut rig.vm(), &h);
            *host.windows.borrow_mut() = h.windows.borrow().clone();
            end_of(&step, true)?
        };
        if end == End::Deny("rate_limited".into()) {
            denied += 1;
        }
    }
    assert_eq!(denied, 2, "the log class allows 10 per window across both surfaces");
    Ok(())
}

#[test]
fn endpoint_head_checks() -> Outcome {
    let mut rig = Rig::new()?;
    let host = MockHost::new(b"");
    let good = format!("Bearer {}", tok(1));
    let run = |rig: &mut Rig, method: &str, path: &str, others: &[(&str, &str)]| {
        Exchange::new().on_request_headers(headers(method, path, others), false, &mut rig.vm(), &host)
    };
    for method in ["GET", "DELETE", "PUT"] {
        let (status, h, _) = reply(&run(&mut rig, method, "/api/v1/mcp", &[("authorization", &good)])).ok_or("no reply")?;
        assert_eq!(status, 405, "{method}");
        assert!(h.contains(&("allow".into(), "POST".into())));
    }
    let (status, h, body) = reply(&run(&mut rig, "POST", "/api/v1/mcp", &[("content-type", "application/json")])).ok_or("no reply")?;
    assert_eq!((status, body["error"].as_str()), (401, Some("invalid_token")));
    let www = h.iter().find(|(k, _)| k == "www-authenticate").map(|(_, v)| v.clone()).unwrap_or_default();
    assert!(www.contains("resource_metadata=\"https://infrabox.test/.well-known/oauth-protected-resource/api/v1/mcp\""), "{www}");
    assert!(!www.contains("error="), "no token presented: no error attribute");
    let bad = format!("Bearer {}", tok(9));
    let (status, h, _) = reply(&run(&mut rig, "POST", "/api/v1/mcp", &[("authorization", &bad), (":scheme", "http")])).ok_or("no reply")?;
    assert_eq!(status, 401);
    assert!(h.iter().any(|(k, v)| k == "www-authenticate" && v.contains("error=\"invalid_token\"") && v.contains("http://infrabox.test/")));
    let (status, _, _) = reply(&run(&mut rig, "POST", "/api/v1/mcp", &[("authorization", &good), ("content-type", "application/json"), ("content-length", "4096")])).ok_or("no reply")?;
    assert_eq!(status, 413);
    let (status, _, _) = reply(&run(&mut rig, "POST", "/api/v1/mcp", &[("authorization", &good), ("content-type", "text/plain")])).ok_or("no reply")?;
    assert_eq!(status, 415);
    let (status, _, _) = reply(&run(&mut rig, "POST", "/api/v1/mcp", &[("authorization", &good), ("content-type", "application/json"), ("x-token", &tok(1))])).ok_or("no reply")?;
    assert_eq!(status, 400, "a second copy of the secret elsewhere is refused");
    let (status, _, _) = reply(&run(&mut rig, "POST", "/api/v1/mcp/", &[("authorization", &good)])).ok_or("no reply")?;
    assert_eq!(status, 400, "a trailing slash is no endpoint (empty segment)");
    let ok = run(&mut rig, "POST", "/api/v1/mcp", &[("authorization", &good), ("content-type", "application/json; charset=utf-8")]);
    assert_eq!((ok.flow, reply(&ok).is_none()), (Flow::Pause, true), "waits for the body");
    // Another host has no endpoint, and refuses the token there.
    let other = Exchange::new().on_request_headers(pipeline::request_headers("POST", "/api/v1/mcp", "evil.test", &[("authorization", &good)]), false, &mut rig.vm(), &host);
    assert_eq!(reply(&other).map(|r| (r.0, r.2["error"].clone())), Some((403, json!("mcp_token_not_accepted"))));
    let other = Exchange::new().on_request_headers(pipeline::request_headers("POST", "/api/v1/mcp", "evil.test", &[]), false, &mut rig.vm(), &host);
    assert_eq!(reply(&other).map(|r| r.0), Some(404));
    // The body is bounded as it arrives, whatever Content-Length said.
    let mut ex = Exchange::new();
    ex.on_request_headers(headers("POST", "/api/v1/mcp", &[("authorization", &good), ("content-type", "application/json")]), false, &mut rig.vm(), &host);
    let step = ex.on_request_body(2049, false, &mut rig.vm(), &host);
    assert_eq!(reply(&step).map(|r| r.0), Some(413));
    // The metadata.
    let step = run(&mut rig, "GET", "/.well-known/oauth-protected-resource/api/v1/mcp", &[]);
    let (status, _, body) = reply(&step).ok_or("no reply")?;
    assert_eq!((status, body["resource"].as_str()), (200, Some("https://infrabox.test/api/v1/mcp")));
    assert_eq!(body["bearer_methods_supported"], json!(["header"]));
    Ok(())
}

#[test]
fn protocol_answers_and_errors() -> Outcome {
    let mut rig = Rig::new()?;
    let send = |rig: &mut Rig, token: u8, body: &[u8], extra: &[(&str, &str)]| {
        let step = mcp_step(rig, &mut Exchange::new(), &tok(token), body, extra);
        reply(&step).map(|(s, _, b)| (s, b))
    };
    let (s, b) = send(&mut rig, 1, br#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-11-25","capabilities":{},"clientInfo":{"name":"t","version":"1"}}}"#, &[]).ok_or("no reply")?;
    assert_eq!((s, b["result"]["protocolVersion"].as_str()), (200, Some("2025-11-25")));
    let (s, _) = send(&mut rig, 1, br#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#, &[("mcp-protocol-version", "2025-11-25")]).ok_or("no reply")?;
    assert_eq!(s, 202);
    let names = |b: &Value| b["result"]["tools"].as_array().map(|t| t.iter().filter_map(|x| x["name"].as_str().map(String::from)).collect::<Vec<_>>()).unwrap_or_default();
    let (_, b) = send(&mut rig, 1, br#"{"jsonrpc":"2.0","id":2,"method":"tools/list"}"#, &[]).ok_or("no reply")?;
    assert!(names(&b).contains(&"get_job_log".into()) && !names(&b).contains(&"trigger_build".into()));
    let (_, b) = send(&mut rig, 2, br#"{"jsonrpc":"2.0","id":2,"method":"tools/list"}"#, &[]).ok_or("no reply")?;
    assert!(names(&b).contains(&"trigger_build".into()));
    let modern = |method: &str, extra: &str| {
        format!(r#"{{"jsonrpc":"2.0","id":3,"method":"{method}","params":{{{extra}"_meta":{{"io.modelcontextprotocol/protocolVersion":"2026-07-28","io.modelcontextprotocol/clientCapabilities":{{}}}}}}}}"#)
    };
    let v = [("mcp-protocol-version", "2026-07-28")];
    let (s, b) = send(&mut rig, 1, modern("server/discover", "").as_bytes(), &[v[0], ("mcp-method", "server/discover")]).ok_or("no reply")?;
    assert_eq!((s, b["result"]["resultType"].as_str()), (200, Some("complete")));
    assert!(b["result"]["supportedVersions"].as_array().is_some_and(|a| a.contains(&json!("2026-07-28"))));
    // Mismatched and missing routing headers.
    for (body, headers) in [
        (modern("tools/list", ""), vec![v[0], ("mcp-method", "tools/call")]),
        (modern("tools/list", ""), vec![v[0]]),
        (modern("tools/list", ""), vec![("mcp-protocol-version", "2025-11-25"), ("mcp-method", "tools/list")]),
        (modern("tools/list", ""), vec![v[0], ("mcp-method", "tools/list"), ("mcp-method", "tools/list")]),
        (modern("tools/call", r#""name":"get_project","arguments":{"project_id":"0b7a4c2e-1f3d-4c5b-9a8e-7d6c5b4a3f21"},"#), vec![v[0], ("mcp-method", "tools/call"), ("mcp-name", "abort_job")]),
        (modern("tools/call", r#""name":"get_project","arguments":{},"#), vec![v[0], ("mcp-method", "tools/call")]),
        (modern("tools/call", r#""name":"get_project","arguments":{},"#), vec![v[0], ("mcp-method", "tools/call"), ("mcp-name", "=?base64?Z2V0X3Byb2plY3Q?=")]),
    ] {
        let (s, b) = send(&mut rig, 1, body.as_bytes(), &headers).ok_or("no reply")?;
        assert_eq!((s, b["error"]["code"].as_i64()), (400, Some(jsonrpc::HEADER_MISMATCH)), "{headers:?}");
    }
    // The base64 form of Mcp-Name is accepted when canonical.
    let body = modern("tools/call", &format!(r#""name":"get_project","arguments":{{"project_id":"{PA}"}},"#));
    let step = mcp_step(&mut rig, &mut Exchange::new(), &tok(1), body.as_bytes(), &[v[0], ("mcp-method", "tools/call"), ("mcp-name", "=?base64?Z2V0X3Byb2plY3Q=?=")]);
    assert!(ask(&step).is_some(), "a matching base64 Mcp-Name goes on: {:?}", reply(&step));
    // 2026-07-28 errors carry the transport's statuses.
    let (s, b) = send(&mut rig, 1, modern("resources/list", "").as_bytes(), &[v[0], ("mcp-method", "resources/list")]).ok_or("no reply")?;
    assert_eq!((s, b["error"]["code"].as_i64()), (404, Some(jsonrpc::METHOD_NOT_FOUND)));
    let (s, b) = send(&mut rig, 1, modern("tools/list", "").replace("2026-07-28", "2099-01-01").as_bytes(), &[("mcp-protocol-version", "2099-01-01"), ("mcp-method", "tools/list")]).ok_or("no reply")?;
    assert_eq!((s, b["error"]["code"].as_i64()), (400, Some(jsonrpc::UNSUPPORTED_PROTOCOL_VERSION)));
    assert!(b["error"]["data"]["supported"].as_array().is_some_and(|a| a.contains(&json!("2026-07-28"))));
    for (body, status, code) in [
        (&b"{"[..], 400, jsonrpc::PARSE_ERROR),
        (br#"{"jsonrpc":"2.0","id":1,"method":"tools/list","method":"tools/call"}"#, 400, jsonrpc::PARSE_ERROR),
        (br#"[]"#, 400, jsonrpc::INVALID_REQUEST),
        // Handshake-era errors travel with 200 (its clients read 404 as a lost session).
        (br#"{"jsonrpc":"2.0","id":1,"method":"resources/list"}"#, 200, jsonrpc::METHOD_NOT_FOUND),
        (br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"no_such"}}"#, 200, jsonrpc::INVALID_PARAMS),
        (br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"get_project","arguments":[]}}"#, 200, jsonrpc::INVALID_PARAMS),
        (br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"get_project","arguments":{"project_id":"x"}}}"#, 200, jsonrpc::INVALID_PARAMS),
    ] {
        let (s, b) = send(&mut rig, 1, body, &[]).ok_or("no reply")?;
        assert_eq!((s, b["error"]["code"].as_i64()), (status, Some(code)), "{}", String::from_utf8_lossy(body));
    }
    Ok(())
}

#[test]
fn tool_answers_are_shaped_into_results() -> Outcome {
    let mut rig = Rig::new()?;
    let ok = LimitAnswer::Decided(allowed(), Ownership::Confirmed);
    // The log: tail-limited to max_bytes as it arrives.
    let mut ex = Exchange::new();
    let body = call_body("get_job_log", json!({"project_id": PA, "job_id": J1, "max_bytes": 4}));
    mcp_step(&mut rig, &mut ex, &tok(1), &body, &[]);
    let host = MockHost::new(b"");
    end_of(&ex.on_limit(ok.clone(), &mut rig.vm(), &host), true)?;
    let step = ex.on_response_headers(Some("200"), Some(10), Some("text/plain"), false);
    assert!(step.effects.contains(&Effect::SetResponseHeader("content-length".into(), None)));
    assert!(step.effects.contains(&Effect::AuditResult { upstream_status: 200 }));
    *host.response_body.borrow_mut() = b"0123456".to_vec();
    let step = ex.on_response_body(7, false, &host);
    assert_eq!((step.flow, step.effects.clone()), (Flow::Pause, vec![Effect::ReplaceResponseBody { start: 0, len: 3, bytes: vec![] }]));
    *host.response_body.borrow_mut() = b"3456789".to_vec();
    let step = ex.on_response_body(7, true, &host);
    let out = step.effects.iter().find_map(|e| match e {
        Effect::ReplaceResponseBody { bytes, .. } if !bytes.is_empty() => serde_json::from_slice::<Value>(bytes).ok(),
        _ => None,
    });
    let out = out.ok_or("no result")?;
    assert_eq!(out["result"]["content"][0]["text"], "6789");
    assert!(out["result"]["content"][1]["text"].as_str().unwrap_or_default().contains("last 4 of 10 bytes"));
    // The project list: only the token's projects, also over MCP.
    let mut ex = Exchange::new();
    mcp_step(&mut rig, &mut ex, &tok(1), &call_body("list_projects", json!({})), &[]);
    end_of(&ex.on_limit(ok.clone(), &mut rig.vm(), &host), true)?;
    ex.on_response_headers(Some("200"), None, Some("application/json"), false);
    let list = format!(r#"[{{"id":"{PA}","name":"a"}},{{"id":"{PX}","name":"x"}}]"#);
    *host.response_body.borrow_mut() = list.clone().into_bytes();
    let step = ex.on_response_body(list.len(), true, &host);
    let out = step.effects.iter().find_map(|e| match e {
        Effect::ReplaceResponseBody { bytes, .. } => serde_json::from_slice::<Value>(bytes).ok(),
        _ => None,
    });
    let items = out.ok_or("no result")?["result"]["structuredContent"]["result"].clone();
    assert_eq!(items, json!([{"id": PA, "name": "a"}]), "a project outside the scope never reaches the agent");
    // An upstream failure is a tool error; an oversized answer is refused.
    let mut ex = Exchange::new();
    mcp_step(&mut rig, &mut ex, &tok(1), &call_body("get_project", json!({"project_id": PA})), &[]);
    end_of(&ex.on_limit(ok, &mut rig.vm(), &host), true)?;
    ex.on_response_headers(Some("500"), None, Some("application/json"), false);
    *host.response_body.borrow_mut() = br#"{"message":"boom"}"#.to_vec();
    let step = ex.on_response_body(18, true, &host);
    let text = step.effects.iter().find_map(|e| match e {
        Effect::ReplaceResponseBody { bytes, .. } => serde_json::from_slice::<Value>(bytes).ok(),
        _ => None,
    });
    let text = text.ok_or("no result")?;
    assert_eq!(text["result"]["isError"], true);
    assert_eq!(text["result"]["content"][0]["text"], "InfraBox answered HTTP 500: boom; retrying later may help");
    Ok(())
}

#[test]
fn tool_call_audit_keeps_a_digest_never_the_arguments() -> Outcome {
    let mut rig = Rig::new()?;
    let mut ex = Exchange::new();
    let secret = "s3cret-value-of-a-variable";
    let body = call_body("trigger_build", json!({"project_id": PA, "branch_or_sha": "main", "env": [{"name": "TOKEN", "value": secret}]}));
    mcp_step(&mut rig, &mut ex, &tok(2), &body, &[]);
    let step = ex.on_limit(LimitAnswer::Decided(allowed(), Ownership::Confirmed), &mut rig.vm(), &MockHost::new(b""));
    let facts = step.effects.iter().find_map(|e| match e {
        Effect::Audit { facts, reason: None, .. } => Some(facts.clone()),
        _ => None,
    });
    let facts = facts.ok_or("not audited")?;
    let mcp = facts.mcp.clone().ok_or("no MCP facts")?;
    assert_eq!((mcp.method.as_str(), mcp.tool.as_deref()), ("tools/call", Some("trigger_build")));
    assert_eq!(mcp.arguments_hmac.as_deref().map(str::len), Some(64));
    // Keyed: the plain SHA-256 of the arguments is not what is stored.
    let args = json!({"project_id": PA, "branch_or_sha": "main", "env": [{"name": "TOKEN", "value": secret}]});
    let plain = {
        use sha2::{Digest, Sha256};
        hex::encode(Sha256::digest(crate::mcp::jsonrpc::canonical(&args).as_bytes()))
    };
    assert_ne!(mcp.arguments_hmac.as_deref(), Some(plain.as_str()));
    let keyed = hex::encode(crate::audit::hmac_sha256(&rig.config.arguments_key, crate::mcp::jsonrpc::canonical(&args).as_bytes()));
    assert_eq!(mcp.arguments_hmac.as_deref(), Some(keyed.as_str()));
    assert_eq!((facts.route.as_deref(), facts.project.as_deref()), (Some("projects.trigger"), Some(PA)));
    let record = facts.record_reason(&crate::audit::VmOrigin::default(), 1, None, None).to_json();
    assert!(!String::from_utf8_lossy(&record).contains(secret), "an argument value reached the audit record");
    Ok(())
}

#[test]
fn a_rest_body_waits_with_its_head_for_the_limit() -> Outcome {
    let mut rig = Rig::new()?;
    let host = MockHost::new(b"");
    let mut ex = Exchange::new();
    let auth = format!("Bearer {}", tok(1));
    let step = ex.on_request_headers(headers("POST", &format!("/api/v1/mcp/projects/{PA}/trigger"), &[("authorization", &auth)]), false, &mut rig.vm(), &host);
    assert_eq!((step.flow, ask(&step).is_some()), (Flow::Pause, true));
    // Envoy delivers the body while the head is stopped: it must not go on.
    for eos in [false, true] {
        let body = ex.on_request_body(10, eos, &mut rig.vm(), &host);
        assert_eq!(body.flow, Flow::Pause, "the body went on before the rate-limit decision");
    }
    let step = ex.on_limit(LimitAnswer::Decided(allowed(), Ownership::Confirmed), &mut rig.vm(), &host);
    assert_eq!(end_of(&step, false)?, End::Deny("write_forbidden".into()));
    Ok(())
}

#[test]
fn a_secret_in_the_body_is_refused_in_every_spelling() -> Outcome {
    let mut rig = Rig::new()?;
    let secret = tok(1);
    let escaped = secret.replacen('_', "\\u005f", 1);
    for value in [secret.clone(), secret.to_uppercase(), escaped] {
        let body = format!(
            r#"{{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{{"name":"trigger_build","arguments":{{"project_id":"{PA}","branch_or_sha":"m","env":[{{"name":"T","value":"{value}"}}]}}}}}}"#
        );
        let step = mcp_step(&mut rig, &mut Exchange::new(), &tok(2), body.as_bytes(), &[]);
        let (status, _, b) = reply(&step).ok_or("no reply")?;
        assert_eq!((status, b["error"].as_str()), (400, Some("credential_misplaced")), "{body}");
        assert!(ask(&step).is_none(), "nothing goes on");
    }
    Ok(())
}

mod never_panics {
    use proptest::prelude::*;
    #[cfg(all(target_family = "wasm", target_os = "unknown"))]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    use super::*;

    /// JSON-RPC-shaped bodies built from the parts an attacker varies.
    fn message() -> impl Strategy<Value = Vec<u8>> {
        let name = prop_oneof![
            Just("get_job_log".to_string()),
            Just("trigger_build".to_string()),
            Just("download_job_artifacts".to_string()),
            "[a-z_]{0,12}",
        ];
        let value = prop_oneof![
            Just(json!(PA)),
            Just(json!(J1)),
            Just(json!(null)),
            any::<i64>().prop_map(|n| json!(n)),
            any::<f64>().prop_map(|f| json!(f)),
            ".{0,40}".prop_map(|s| json!(s)),
            Just(json!([{"name": "A", "value": "b"}])),
            Just(json!({"nested": [1, {"x": "y"}]})),
        ];
        let key = prop_oneof![
            Just("project_id".to_string()),
            Just("job_id".to_string()),
            Just("max_bytes".to_string()),
            Just("filename".to_string()),
            Just("branch_or_sha".to_string()),
            Just("env".to_string()),
            "[a-z_]{1,8}",
        ];
        let method = prop_oneof![
            Just("tools/call"),
            Just("tools/list"),
            Just("initialize"),
            Just("server/discover"),
            Just("ping"),
            Just("notifications/initialized"),
            Just("x"),
        ];
        (method, name, proptest::collection::btree_map(key, value, 0..6), any::<bool>(), any::<bool>()).prop_map(
            |(method, name, args, with_id, modern)| {
                let mut params = json!({"name": name, "arguments": args});
                if modern {
                    params["_meta"] = json!({"io.modelcontextprotocol/protocolVersion": "2026-07-28", "io.modelcontextprotocol/clientCapabilities": {}});
                }
                let mut m = json!({"jsonrpc": "2.0", "method": method, "params": params});
                if with_id {
                    m["id"] = json!(1);
                }
                serde_json::to_vec(&m).unwrap_or_default()
            },
        )
    }

    fn body() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![message(), proptest::collection::vec(any::<u8>(), 0..300)]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 600, ..ProptestConfig::default() })]

        /// Any body, any answer, any response: every step ends the request
        /// (a reply) or waits for something that will come; nothing panics.
        #[test]
        fn any_body_through_every_state(
            body in body(),
            trigger in any::<bool>(),
            answer in 0u8..4,
            status in prop_oneof![Just("200"), Just("404"), Just("500"), Just("abc")],
            upstream in proptest::collection::vec(any::<u8>(), 0..5000),
            split in 0usize..5000,
        ) {
            let mut rig = Rig::new().map_err(TestCaseError::fail)?;
            let mut ex = Exchange::new();
            let token = if trigger { tok(2) } else { tok(1) };
            let step = mcp_step(&mut rig, &mut ex, &token, &body, &[("mcp-protocol-version", "2026-07-28")]);
            if ask(&step).is_none() {
                prop_assert!(reply(&step).is_some() || step.effects.iter().any(|e| matches!(e, Effect::Reply { .. })), "neither a reply nor a callout: {:?}", step);
                return Ok(());
            }
            let answer = match answer {
                0 => LimitAnswer::Decided(allowed(), Ownership::Confirmed),
                1 => LimitAnswer::Decided(Decision { allowed: false, remaining: 0, reset_ms: 10 }, Ownership::Confirmed),
                2 => LimitAnswer::StoreFailed(Ownership::Refuted),
                _ => LimitAnswer::Failed("x".into()),
            };
            let host = MockHost::new(b"");
            let step = ex.on_limit(answer, &mut rig.vm(), &host);
            if reply(&step).is_some() {
                return Ok(());
            }
            prop_assert_eq!(step.flow, Flow::Continue);
            ex.on_response_headers(Some(status), Some(upstream.len() as u64), Some("application/json"), false);
            let cut = split.min(upstream.len());
            *host.response_body.borrow_mut() = upstream[..cut].to_vec();
            let first = ex.on_response_body(cut, false, &host);
            let kept: usize = cut - first.effects.iter().map(|e| match e { Effect::ReplaceResponseBody { len, .. } => *len, _ => 0 }).sum::<usize>();
            let mut rest = host.response_body.borrow()[..0].to_vec();
            rest.extend_from_slice(&upstream[cut - kept.min(cut)..]);
            let size = rest.len();
            *host.response_body.borrow_mut() = rest;
            let last = ex.on_response_body(size, true, &host);
            let result = last.effects.iter().find_map(|e| match e {
                Effect::ReplaceResponseBody { bytes, .. } if !bytes.is_empty() => serde_json::from_slice::<Value>(bytes).ok(),
                _ => None,
            });
            let result = result.ok_or_else(|| TestCaseError::fail("no tool result"))?;
            prop_assert_eq!(&result["jsonrpc"], "2.0");
            prop_assert!(result["result"]["isError"].is_boolean(), "{}", result);
        }
    }
}

#[test]
fn a_stale_policy_fails_mcp_closed_and_leaves_the_rest_alone() -> Outcome {
    let mut rig = Rig::new()?;
    let host = MockHost::new(b"");
    let auth = format!("Bearer {}", tok(1));
    let max_ms = i64::from(rig.config.max_policy_age_seconds) * 1000;
    rig.policy_age_ms = max_ms;
    let path = format!("/api/v1/mcp/projects/{PA}");
    let step = Exchange::new().on_request_headers(headers("GET", &path, &[("authorization", &auth)]), true, &mut rig.vm(), &host);
    assert!(ask(&step).is_some(), "at the maximum age the policy still holds");
    rig.policy_age_ms = max_ms + 1;
    let step = Exchange::new().on_request_headers(headers("GET", &path, &[("authorization", &auth)]), true, &mut rig.vm(), &host);
    assert_eq!(reply(&step).map(|r| (r.0, r.2["error"].clone())), Some((503, json!("policy_stale"))));
    let step = mcp_step(&mut rig, &mut Exchange::new(), &tok(1), br#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#, &[]);
    assert_eq!(reply(&step).map(|r| (r.0, r.2["error"].clone())), Some((503, json!("policy_stale"))));
    // The decision order holds: a bad path is still a bad path.
    let step = Exchange::new().on_request_headers(headers("GET", "/api/v1/mcp/projects/%2e", &[("authorization", &auth)]), true, &mut rig.vm(), &host);
    assert_eq!(reply(&step).map(|r| r.0), Some(400));
    // Non-MCP traffic passes; a token elsewhere is still refused.
    let step = Exchange::new().on_request_headers(headers("GET", "/api/v1/projects", &[("authorization", "Bearer eyJ")]), true, &mut rig.vm(), &host);
    assert_eq!((step.flow, reply(&step).is_none()), (Flow::Continue, true));
    let step = Exchange::new().on_request_headers(headers("GET", "/api/v1/projects", &[("authorization", &auth)]), true, &mut rig.vm(), &host);
    assert_eq!(reply(&step).map(|r| r.0), Some(403));
    Ok(())
}

#[test]
fn trailers_end_a_body_and_never_let_a_waiting_head_go_on() -> Outcome {
    let mut rig = Rig::new()?;
    let good = format!("Bearer {}", tok(1));
    // REST: a body and trailers while the rate-limit answer is pending.
    let host = MockHost::new(b"");
    let mut ex = Exchange::new();
    let step = ex.on_request_headers(headers("POST", &format!("/api/v1/mcp/projects/{PA}/trigger"), &[("authorization", &good)]), false, &mut rig.vm(), &host);
    assert!(ask(&step).is_some());
    assert_eq!(ex.on_request_body(20, false, &mut rig.vm(), &host).flow, Flow::Pause);
    assert_eq!(ex.on_request_trailers(&mut rig.vm(), &host).flow, Flow::Pause, "trailers let an undecided request go on");
    // The endpoint: trailers end the body, which is then read.
    let body = br#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#;
    let host = MockHost::new(body);
    let mut ex = Exchange::new();
    let step = ex.on_request_headers(headers("POST", "/api/v1/mcp", &[("authorization", &good), ("content-type", "application/json")]), false, &mut rig.vm(), &host);
    assert_eq!(step.flow, Flow::Pause);
    assert_eq!(ex.on_request_body(body.len(), false, &mut rig.vm(), &host).flow, Flow::Pause);
    let step = ex.on_request_trailers(&mut rig.vm(), &host);
    let (status, _, b) = reply(&step).ok_or("trailers did not end the body")?;
    assert_eq!((status, b["result"]["tools"].is_array()), (200, true));
    // A shaped response ends at its trailers too: the project list is
    // filtered, never passed on raw.
    let mut ex = Exchange::new();
    let h = MockHost::new(b"");
    ex.on_request_headers(headers("GET", "/api/v1/mcp/projects", &[("authorization", &good)]), true, &mut rig.vm(), &h);
    end_of(&ex.on_limit(LimitAnswer::Decided(allowed(), Ownership::Confirmed), &mut rig.vm(), &h), false)?;
    ex.on_response_headers(Some("200"), None, Some("application/json"), false);
    let list = format!(r#"[{{"id":"{PA}"}},{{"id":"{PX}"}}]"#);
    *h.response_body.borrow_mut() = list.clone().into_bytes();
    assert_eq!(ex.on_response_body(list.len(), false, &h).flow, Flow::Pause);
    let step = ex.on_response_trailers(&h);
    let out = step.effects.iter().find_map(|e| match e {
        Effect::ReplaceResponseBody { bytes, .. } => serde_json::from_slice::<Value>(bytes).ok(),
        _ => None,
    });
    assert_eq!(out, Some(json!([{"id": PA}])));
    Ok(())
}

#[test]
fn the_endpoint_refuses_other_origins_encoded_bodies_and_floods() -> Outcome {
    let mut rig = Rig::new()?;
    let host = MockHost::new(b"");
    let good = format!("Bearer {}", tok(1));
    let head = |extra: &[(&str, &str)]| {
        let mut h = vec![("authorization", good.as_str()), ("content-type", "application/json")];
        h.extend_from_slice(extra);
        headers("POST", "/api/v1/mcp", &h)
    };
    for (origin, ok) in [("https://infrabox.test", true), ("http://infrabox.test:8443", true), ("https://evil.test", false), ("null", false), ("https://infrabox.test.evil.test", false)] {
        let step = Exchange::new().on_request_headers(head(&[("origin", origin)]), false, &mut rig.vm(), &host);
        let refused = reply(&step).map(|r| (r.0, r.2["error"].clone()));
        assert_eq!(refused.is_none(), ok, "{origin}: {refused:?}");
        if !ok {
            assert_eq!(refused, Some((403, json!("origin_forbidden"))));
        }
    }
    let step = Exchange::new().on_request_headers(head(&[("content-encoding", "gzip")]), false, &mut rig.vm(), &host);
    assert_eq!(reply(&step).map(|r| r.0), Some(415));
    // Messages other than tool calls: twice the default limit (30) per window.
    let body = br#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#;
    let host = MockHost::new(body);
    let mut statuses = Vec::new();
    for _ in 0..62 {
        let mut ex = Exchange::new();
        let len = body.len().to_string();
        ex.on_request_headers(head(&[("content-length", &len)]), false, &mut rig.vm(), &host);
        let step = ex.on_request_body(body.len(), true, &mut rig.vm(), &host);
        statuses.push(reply(&step).map(|r| r.0).unwrap_or(0));
    }
    assert!(statuses[..60].iter().all(|s| *s == 200), "{statuses:?}");
    assert_eq!(&statuses[60..], &[429, 429]);
    Ok(())
}

/// What admission found gives the audit the same facts a fresh
/// description of the request does (the hot path skips the second one).
#[test]
fn facts_of_an_admitted_request_equal_its_description() -> Outcome {
    let rig = Rig::new()?;
    let policy = rig.policy.clone().ok_or("policy")?;
    for (token, method, path) in [
        (tok(1), "GET", format!("/api/v1/mcp/projects/{PA}/builds/{B1}?size=5")),
        (tok(1), "GET", "/api/v1/mcp/projects".to_string()),
        (tok(2), "POST", format!("/api/v1/mcp/projects/{PA}/jobs/{J1}/abort")),
        (tok(1), "GET", format!("/api/v1/mcp/projects/{PX}/jobs/{J1}/log")),
    ] {
        let auth = format!("Bearer {token}");
        let h = headers(method, &path, &[("authorization", &auth), ("x-other", "1")]);
        let head = RequestHead::new(&h);
        let Admission::Admitted(a) = pipeline::admit(&head, Some(&policy), &rig.config, NOW_MS / 1000) else {
            return Err(format!("{path} not admitted"));
        };
        assert_eq!(
            RequestFacts::of_admitted(&head, &policy, &rig.config.routes, &a),
            RequestFacts::describe(&head, Some(&policy), &rig.config.routes, true),
            "{path}"
        );
    }
    Ok(())
}

#[test]
fn before_the_first_policy_mcp_requests_wait_for_it_once() -> Outcome {
    let mut rig = Rig::new()?;
    let first = rig.policy.take();
    let host = MockHost::new(b"");
    let auth = format!("Bearer {}", tok(1));
    let path = format!("/api/v1/mcp/projects/{PA}/builds/{B1}");
    // A REST read: held, nothing answered, nothing audited.
    let mut ex = Exchange::new();
    let step = ex.on_request_headers(headers("GET", &path, &[("authorization", &auth)]), true, &mut rig.vm(), &host);
    assert_eq!(step, Step { effects: vec![Effect::AwaitPolicy], flow: Flow::Pause });
    // The policy came: decided as if the request had just come.
    rig.policy = first.clone();
    let step = ex.on_policy(&mut rig.vm(), &host);
    assert!(ask(&step).is_some(), "{:?}", step.effects);
    let step = ex.on_limit(LimitAnswer::Decided(allowed(), Ownership::Confirmed), &mut rig.vm(), &host);
    assert!(matches!(end_of(&step, false)?, End::Forward { .. }));

    // A tool call whose body ended while it waited: read after the wait.
    rig.policy = None;
    let body = call_body("get_build", json!({"project_id": PA, "build_id": B1}));
    let host = MockHost::new(&body);
    let len = body.len().to_string();
    let others = [("authorization", auth.as_str()), ("content-type", "application/json"), ("content-length", len.as_str())];
    let mut ex = Exchange::new();
    let step = ex.on_request_headers(headers("POST", "/api/v1/mcp", &others), false, &mut rig.vm(), &host);
    assert_eq!(step.effects, vec![Effect::AwaitPolicy]);
    let step = ex.on_request_body(body.len(), true, &mut rig.vm(), &host);
    assert_eq!(step, Step { effects: Vec::new(), flow: Flow::Pause }, "the body waits with its head");
    rig.policy = first.clone();
    let step = ex.on_policy(&mut rig.vm(), &host);
    assert!(ask(&step).is_some(), "the tool call went on to its limit: {:?}", step.effects);
    assert!(step.effects.iter().any(|e| matches!(e, Effect::ReplaceRequestBody(_))));

    // Still no policy when the wait is over: 503 as before, and only once.
    rig.policy = None;
    let mut ex = Exchange::new();
    let step = ex.on_request_headers(headers("GET", &path, &[("authorization", &auth)]), true, &mut rig.vm(), &host);
    assert_eq!(step.effects, vec![Effect::AwaitPolicy]);
    let step = ex.on_policy(&mut rig.vm(), &host);
    assert_eq!(end_of(&step, false)?, End::Deny("policy_unavailable".into()));
    // Traffic that needs no policy never waits, and neither does a stale one.
    let mut ex = Exchange::new();
    let step = ex.on_request_headers(headers("GET", "/api/v1/settings", &[]), true, &mut rig.vm(), &host);
    assert_eq!(step, Step::go());
    let mut ex = Exchange::new();
    let step = ex.on_request_headers(headers("GET", "/api/v1/settings", &[("authorization", &auth)]), true, &mut rig.vm(), &host);
    assert_eq!(end_of(&step, false)?, End::Deny("mcp_token_not_accepted".into()));
    rig.policy = first;
    rig.policy_age_ms = i64::MAX / 2;
    let mut ex = Exchange::new();
    let step = ex.on_request_headers(headers("GET", &path, &[("authorization", &auth)]), true, &mut rig.vm(), &host);
    assert_eq!(end_of(&step, false)?, End::Deny("policy_stale".into()));
    // Calling on_policy on a request that never waited changes nothing.
    assert_eq!(Exchange::new().on_policy(&mut rig.vm(), &host), Step::go());
    Ok(())
}
