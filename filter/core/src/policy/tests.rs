//! Policy parsing and lookup: both wire forms, chunked reading, refusals
//! that never quote a value, and the 100 000-token size budget.

use std::collections::BTreeMap;

use serde_json::json;

use super::*;
#[cfg(all(target_family = "wasm", target_os = "unknown"))]
use wasm_bindgen_test::wasm_bindgen_test as test;
use crate::snapshot::{SnapshotToken, SnapshotUser, SCHEMA};

type Outcome = Result<(), Box<dyn std::error::Error>>;

fn sample() -> Snapshot {
    Snapshot {
        schema: SCHEMA,
        version: "v1".into(),
        generated_at: 100,
        limits: Limits::default(),
        tokens: vec![SnapshotToken {
            token_id: "0101010101010101".into(),
            token_hash: token::hash_hex(&token::mint(&[1; 24])),
            user_id: "u1".into(),
            expires_at: 1000,
            allow_trigger: false,
            projects: BTreeMap::from([("p2".into(), Some(500)), ("p1".into(), None)]),
        }],
        users: BTreeMap::from([("u1".into(), SnapshotUser { read_credential: Some("secret-r".into()), write_credential: None })]),
    }
}

fn check_sample(p: &Policy) -> Outcome {
    let (_, g) = p.grant_by_hash(&token::hash(&token::mint(&[1; 24]))).ok_or("token not found")?;
    assert_eq!(g.token_id(), "0101010101010101");
    assert_eq!(p.project_expiry(g, "p1"), Some(i64::MAX));
    assert_eq!(p.project_expiry(g, "p2"), Some(500));
    assert_eq!(p.project_expiry(g, "p3"), None);
    assert_eq!(p.projects_in_scope(g, 600).collect::<Vec<_>>(), vec!["p1"]);
    assert_eq!(p.user(g.user).ok_or("no user")?.read_credential.as_deref(), Some("secret-r"));
    assert_eq!(p.limit(Class::Write), 5);
    assert!(p.grant_by_hash(&token::hash(&token::mint(&[2; 24]))).is_none());
    assert!(!format!("{p:?}").contains("secret-r"));
    Ok(())
}

#[test]
fn compact_form_round_trips() -> Outcome {
    check_sample(&Policy::compile(&sample())?)
}

#[test]
fn object_form_and_any_key_order_parse_the_same() -> Outcome {
    let s = sample();
    let t = &s.tokens[0];
    // users before tokens, limits last, token keys shuffled, an unknown key.
    let body = json!({
        "users": {"u1": {"read_credential": "secret-r"}},
        "version": "v1", "generated_at": 100, "future": [1, 2],
        "tokens": [{"projects": t.projects, "user_id": "u1", "allow_trigger": false,
                    "token_hash": t.token_hash, "expires_at": 1000, "token_id": t.token_id, "extra": 1}],
        "limits": s.limits,
    });
    check_sample(&Policy::from_json(&serde_json::to_vec(&body)?)?)
}

/// Hands out at most `step` bytes per read, like the host's chunks.
struct Trickle<'a> {
    body: &'a [u8],
    step: usize,
}

impl std::io::Read for Trickle<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.step.min(buf.len()).min(self.body.len());
        let (head, rest) = self.body.split_at(n);
        buf.get_mut(..n).ok_or(std::io::ErrorKind::InvalidInput)?.copy_from_slice(head);
        self.body = rest;
        Ok(n)
    }
}

#[test]
fn chunked_reading_equals_whole_body() -> Outcome {
    let body = serde_json::to_vec(&sample())?;
    for step in [1, 7, 64, 1 << 20] {
        check_sample(&Policy::from_reader(Trickle { body: &body, step })?)?;
    }
    let bad = br#"{"version":"v1","generated_at":1,"limits":{"window_seconds":60,"classes":{}},"tokens":[],"users":{}}"#;
    assert!(Policy::from_reader(Trickle { body: bad, step: 3 }).is_err());
    assert!(Policy::from_reader(Trickle { body: b"{\"version\": ", step: 3 }).is_err());
    Ok(())
}

fn refusal(body: serde_json::Value) -> Result<String, Box<dyn std::error::Error>> {
    match Policy::from_json(&serde_json::to_vec(&body)?) {
        Ok(_) => Err("accepted".into()),
        Err(e) => Ok(e.0),
    }
}

#[test]
fn bad_snapshots_are_refused_without_quoting_values() -> Outcome {
    assert!(Policy::from_json(b"{").is_err());
    assert!(Policy::from_json(b"[]").is_err());
    assert!(Policy::from_json(b"{} trailing").is_err());
    let good = serde_json::to_value(sample())?;
    let with = |path: &[&str], v: serde_json::Value| {
        let mut b = good.clone();
        let mut at = &mut b;
        for k in path {
            at = if let Ok(i) = k.parse::<usize>() { &mut at[i] } else { &mut at[*k] };
        }
        *at = v;
        b
    };
    let msg = refusal(with(&["tokens", "0", "1"], json!("SECRETXYZ")))?;
    assert!(msg.contains("tokens[0]: token_hash"), "{msg}");
    let msg = refusal(with(&["tokens", "0", "0"], json!("short")))?;
    assert!(msg.contains("tokens[0]: token_id"), "{msg}");
    let mut twice = good.clone();
    twice["tokens"] = json!([good["tokens"][0], good["tokens"][0]]);
    assert!(refusal(twice)?.contains("tokens[1]: token_hash appears twice"));
    let msg = refusal(with(&["tokens", "0"], json!(["0101010101010101"])))?;
    assert!(msg.contains("tokens[0]: token_hash is missing"), "{msg}");
    let msg = refusal(with(&["users", "u1", "write_credential"], json!(["SECRETXYZ"])))?;
    assert!(!msg.contains("SECRETXYZ"), "{msg}");
    let msg = refusal(with(&["users", "u1"], json!("SECRETXYZ")))?;
    assert!(!msg.contains("SECRETXYZ"), "{msg}");
    assert!(refusal(with(&["limits", "classes"], json!({"log": 1})))?.contains("classes has no"));
    assert!(refusal(with(&["limits", "window_seconds"], json!(0)))?.contains("window_seconds"));
    assert!(refusal(with(&["schema"], json!(2)))?.contains("unsupported schema 2"));
    assert!(refusal(with(&["version"], json!("")))?.contains("version"));
    let mut missing = good.clone();
    if let Some(m) = missing.as_object_mut() {
        m.remove("users");
    }
    assert!(refusal(missing)?.contains("users"));
    // A token_count hint that is wrong either way is only a hint.
    let p = Policy::from_json(&serde_json::to_vec(&with(&["token_count"], json!(u64::MAX)))?)?;
    assert_eq!(p.token_count(), 1);
    let p = Policy::from_json(&serde_json::to_vec(&with(&["token_count"], json!(0)))?)?;
    assert_eq!(p.token_count(), 1);
    Ok(())
}

/// A synthetic snapshot of `n` tokens over `n / 20` users, one project each.
pub(crate) fn scale(n: u32) -> Snapshot {
    let tokens = (0..n)
        .map(|i| SnapshotToken {
            token_id: format!("{i:016x}"),
            token_hash: token::hash_hex(&format!("{i}")),
            user_id: format!("6f1c0a52-0000-4000-8000-{:012x}", i / 20),
            expires_at: 2_000_000_000,
            allow_trigger: i % 3 == 0,
            projects: BTreeMap::from([(format!("7e2d0b63-0000-4000-8000-{:012x}", i % 50), None)]),
        })
        .collect();
    Snapshot { schema: SCHEMA, version: "scale".into(), generated_at: 1, limits: Limits::default(), tokens, users: BTreeMap::new() }
}

#[test]
fn hundred_thousand_tokens_fit_the_budget_and_all_resolve() -> Outcome {
    let policy = Policy::compile(&scale(100_000))?;
    assert_eq!(policy.token_count(), 100_000);
    // DESIGN §14: ≤ 32 MiB per VM, and a VM briefly holds two policies
    // (the current one and the one being parsed).
    let bytes = policy.heap_bytes();
    assert!(bytes < 12 << 20, "100 000 tokens take {bytes} bytes");
    for i in (0..100_000u32).step_by(997) {
        let (ix, g) = policy.grant_by_hash(&token::hash(&format!("{i}"))).ok_or("missing")?;
        assert_eq!(ix, i);
        assert_eq!(g.token_id(), format!("{i:016x}"));
        assert_eq!(g.allow_trigger(), i % 3 == 0);
        assert_eq!(policy.projects_in_scope(g, 0).count(), 1);
    }
    assert!(policy.grant_by_hash(&token::hash("not a token")).is_none());
    let probe = policy.index.longest_probe(&policy.grants);
    assert!(probe < 64, "longest probe {probe}");
    Ok(())
}

#[test]
fn a_grant_is_one_cache_line() {
    assert_eq!(std::mem::size_of::<Grant>(), 64);
}
