//! The MCP endpoint: any body through the whole request state machine
//! (JSON-RPC parsing, dispatch, tool arguments, the pipeline, the tool
//! result of any upstream answer), with a token that may trigger.
#![no_main]

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;

use libfuzzer_sys::fuzz_target;
use mcp_filter_core::coalesce::Coalescer;
use mcp_filter_core::config::PluginConfig;
use mcp_filter_core::exchange::{Effect, Exchange, Host, LimitAnswer, Vm};
use mcp_filter_core::ownership::{Ownership, OwnershipCache};
use mcp_filter_core::pipeline::request_headers;
use mcp_filter_core::policy::Policy;
use mcp_filter_core::snapshot::{Limits, Snapshot, SnapshotToken, SnapshotUser, SCHEMA};
use mcp_filter_core::token;
use mcp_filter_core::window::{Decision, SlidingWindow};

const PA: &str = "0b7a4c2e-1f3d-4c5b-9a8e-7d6c5b4a3f21";

struct FuzzHost {
    request: Vec<u8>,
    response: RefCell<Vec<u8>>,
}

impl Host for FuzzHost {
    fn now_ms(&self) -> i64 {
        100_000
    }
    fn client_address(&self) -> String {
        "192.0.2.9".into()
    }
    fn local_window(&self, _: &str, limit: u32, window_seconds: u32, now_ms: i64) -> Decision {
        SlidingWindow::default().decide(now_ms as u64, limit, u64::from(window_seconds) * 1000)
    }
    fn request_body(&self, len: usize) -> Vec<u8> {
        self.request.get(..len).unwrap_or(&self.request).to_vec()
    }
    fn response_body(&self, len: usize) -> Vec<u8> {
        let b = self.response.borrow();
        b.get(..len).unwrap_or(&b).to_vec()
    }
}

fn setup() -> (Rc<PluginConfig>, Rc<Policy>, String) {
    let secret = token::mint(&[7; 24]);
    let snap = Snapshot {
        schema: SCHEMA,
        version: "v".into(),
        generated_at: 0,
        limits: Limits::default(),
        tokens: vec![SnapshotToken {
            token_id: secret[7..23].to_string(),
            token_hash: token::hash_hex(&secret),
            user_id: "u".into(),
            expires_at: 10_000_000,
            allow_trigger: true,
            projects: BTreeMap::from([(PA.to_string(), None)]),
        }],
        users: BTreeMap::from([("u".into(), SnapshotUser { read_credential: Some("R".into()), write_credential: Some("W".into()) })]),
    };
    let config = PluginConfig::parse(br#"{"snapshot_secret":"0123456789abcdef","hosts":["infrabox.test"],"mcp_max_result_bytes":4096,"mcp_max_artifact_bytes":4096,"max_log_bytes":512}"#)
        .expect("config");
    (Rc::new(config), Rc::new(Policy::compile(&snap).expect("policy")), secret)
}

fuzz_target!(|data: &[u8]| {
    // The input: a body, then (after a 0xff byte, if any) an upstream answer.
    let (body, answer) = match data.iter().position(|b| *b == 0xff) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let (config, policy, secret) = setup();
    let (mut ownership, mut coalescer) = (OwnershipCache::new(16), Coalescer::new(0));
    let host = FuzzHost { request: body.to_vec(), response: RefCell::new(Vec::new()) };
    let auth = format!("Bearer {secret}");
    let len = body.len().to_string();
    let modern = body.first().is_some_and(|b| b % 2 == 0);
    let mut others = vec![("authorization", auth.as_str()), ("content-type", "application/json"), ("content-length", len.as_str())];
    if modern {
        others.push(("mcp-protocol-version", "2026-07-28"));
    }
    let mut ex = Exchange::new();
    let mut vm = Vm { config: Some(config), policy: Some(policy), policy_age_ms: 0, ownership: &mut ownership, coalescer: &mut coalescer };
    let step = ex.on_request_headers(request_headers("POST", "/api/v1/mcp", "infrabox.test", &others), false, &mut vm, &host);
    if step.effects.iter().any(|e| matches!(e, Effect::Reply { .. })) {
        return;
    }
    let step = ex.on_request_body(body.len(), true, &mut vm, &host);
    for e in &step.effects {
        if let Effect::Reply { body: out, .. } = e {
            assert!(!String::from_utf8_lossy(out).contains(&secret[7..]), "the token came back in an answer");
            return;
        }
    }
    if !step.effects.iter().any(|e| matches!(e, Effect::AskLimit { .. })) {
        return;
    }
    let step = ex.on_limit(LimitAnswer::Decided(Decision { allowed: true, remaining: 1, reset_ms: 1 }, Ownership::Confirmed), &mut vm, &host);
    if step.effects.iter().any(|e| matches!(e, Effect::Reply { .. })) {
        return;
    }
    let status = ["200", "404", "500"][answer.len() % 3];
    ex.on_response_headers(Some(status), Some(answer.len() as u64), Some("application/json"), false);
    *host.response.borrow_mut() = answer.to_vec();
    let last = ex.on_response_body(answer.len(), true, &host);
    let result = last.effects.iter().find_map(|e| match e {
        Effect::ReplaceResponseBody { bytes, .. } if !bytes.is_empty() => Some(bytes.clone()),
        _ => None,
    });
    if let Some(r) = result {
        let v: serde_json::Value = serde_json::from_slice(&r).expect("a tool result is JSON");
        assert!(v["result"]["isError"].is_boolean());
    }
});
