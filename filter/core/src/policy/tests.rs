//! Policy parsing and lookup: both wire forms, chunked reading, refusals
//! that never quote a value, and the 100 000-token size budget.

use std::collections::BTreeMap;

use serde_json::json;

use super::*;
#[cfg(all(target_family = "wasm", target_os = "unknown"))]
use wasm_bindgen_test::wasm_bindgen_test as test;
use crate::snapshot::{SnapshotDelta, SnapshotToken, SnapshotUser, SCHEMA};

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
    assert!(refusal(twice)?.contains("two tokens have the same token_hash"));
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
    // Issue "Scale out", item 4: a million tokens in ≤ 64 MiB per VM, so
    // about 40 bytes a token plus its scope; a VM briefly holds two
    // policies, but they share every shard a delta leaves alone.
    let bytes = policy.heap_bytes();
    assert!(bytes < 100_000 * 56, "100 000 tokens take {bytes} bytes");
    for i in (0..100_000u32).step_by(997) {
        let (ix, g) = policy.grant_by_hash(&token::hash(&format!("{i}"))).ok_or("missing")?;
        assert_eq!(policy.grant(ix), Some(g));
        assert_eq!(g.token_id(), format!("{i:016x}").as_str());
        assert_eq!(g.allow_trigger(), i % 3 == 0);
        assert_eq!(policy.projects_in_scope(g, 0).count(), 1);
    }
    assert!(policy.grant_by_hash(&token::hash("not a token")).is_none());
    // A lookup searches one shard: about n / 256 grants, never many more.
    let largest = policy.shards.iter().map(|s| s.len()).max().unwrap_or(0);
    assert!(largest < 2 * 100_000 / 256, "largest shard {largest}");
    assert_eq!(policy.shards.iter().map(|s| s.len()).sum::<usize>(), 100_000);
    let run = policy.shards.iter().map(|s| s.longest_run()).max().unwrap_or(0);
    assert!(run < 40, "a lookup scans up to {run} grants");
    Ok(())
}

#[test]
fn a_grant_is_forty_bytes() {
    assert_eq!(std::mem::size_of::<Grant>(), 40);
}

#[test]
fn a_hash_that_shares_only_a_prefix_is_not_the_token() -> Outcome {
    let policy = Policy::compile(&sample())?;
    let mut hash = token::hash(&token::mint(&[1; 24]));
    assert!(policy.grant_by_hash(&hash).is_some());
    // The first 16 bytes are what a grant keeps: other bytes after them do
    // not matter, any change within them misses.
    hash[31] ^= 1;
    assert!(policy.grant_by_hash(&hash).is_some());
    for byte in [0, 1, 8, 15] {
        let mut h = token::hash(&token::mint(&[1; 24]));
        h[byte] ^= 0x80;
        assert!(policy.grant_by_hash(&h).is_none(), "byte {byte}");
    }
    Ok(())
}

#[test]
fn a_revocation_among_many_tokens_rebuilds_one_shard_and_frees_its_user() -> Outcome {
    let mut a = scale(10_000);
    a.version = "va".into();
    a.users = (0..500).map(|u| (format!("6f1c0a52-0000-4000-8000-{u:012x}"), SnapshotUser { read_credential: Some(format!("c{u}")), write_credential: None })).collect();
    let mut b = a.clone();
    b.version = "vb".into();
    // Revoke every token of user 7 (tokens 140..160) and one of user 8.
    b.tokens.retain(|t| !(140..161).contains(&u32::from_str_radix(&t.token_id, 16).unwrap_or(0)));
    b.users.remove("6f1c0a52-0000-4000-8000-000000000007");
    let held = Policy::compile(&a)?;
    let body = serde_json::to_vec(&delta_between(&a, &b))?;
    let p = held.apply_delta(body.as_slice())?;
    assert_eq!(p.to_snapshot(), Policy::compile(&b)?.to_snapshot());
    assert_eq!(p.token_count(), 10_000 - 21);
    let shared = p.shards.iter().zip(&held.shards).filter(|(x, y)| Arc::ptr_eq(x, y)).count();
    assert!(shared >= SHARDS_FOR_TEST - 21, "only {shared} shards shared");
    assert!(p.shared_bytes(&held) > p.heap_bytes() / 2);
    // User 7 lost its last token: its slot (and credential) is gone; the
    // next new user takes the slot.
    assert_eq!(p.users.slots.iter().flatten().count(), 499);
    assert!(p.users.slots.iter().flatten().all(|u| u.read_credential.as_deref() != Some("c7")));
    let mut c = b.clone();
    c.version = "vc".into();
    c.tokens.push(SnapshotToken { token_id: "00000000ffffffff".into(), token_hash: token::hash_hex("new"), user_id: "new-user".into(), expires_at: 2_000_000_000, allow_trigger: false, projects: BTreeMap::new() });
    c.users.insert("new-user".into(), SnapshotUser::default());
    c.tokens.sort_by(|x, y| x.token_id.cmp(&y.token_id));
    let q = p.apply_delta(serde_json::to_vec(&delta_between(&b, &c))?.as_slice())?;
    assert_eq!(q.to_snapshot(), Policy::compile(&c)?.to_snapshot());
    assert_eq!(q.users.slots.len(), p.users.slots.len(), "the free slot was not reused");
    // The policy held is unchanged by what was built from it.
    assert_eq!(held.to_snapshot(), Policy::compile(&a)?.to_snapshot());
    Ok(())
}

const SHARDS_FOR_TEST: usize = shard::SHARDS;

/// The delta from `a` to `b`, as the control plane computes it: tokens
/// that differ or are new, ids that went, and the users of the new tokens
/// plus every user whose credentials changed.
fn delta_between(a: &Snapshot, b: &Snapshot) -> SnapshotDelta {
    let old: BTreeMap<&str, &SnapshotToken> = a.tokens.iter().map(|t| (t.token_id.as_str(), t)).collect();
    let new: BTreeMap<&str, &SnapshotToken> = b.tokens.iter().map(|t| (t.token_id.as_str(), t)).collect();
    let tokens: Vec<SnapshotToken> = b.tokens.iter().filter(|t| old.get(t.token_id.as_str()) != Some(t)).cloned().collect();
    let removed = a.tokens.iter().filter(|t| !new.contains_key(t.token_id.as_str())).map(|t| t.token_id.clone()).collect();
    let users = b
        .users
        .iter()
        .filter(|(id, u)| a.users.get(*id) != Some(*u) || tokens.iter().any(|t| &t.user_id == *id))
        .map(|(id, u)| (id.clone(), u.clone()))
        .collect();
    SnapshotDelta {
        schema: SCHEMA,
        version: b.version.clone(),
        base: a.version.clone(),
        generated_at: b.generated_at,
        limits: b.limits.clone(),
        total: b.tokens.len(),
        tokens,
        removed,
        users,
    }
}

fn token_of(id: u8, user: u8, projects: &[(u8, Option<i64>)], trigger: bool) -> SnapshotToken {
    SnapshotToken {
        token_id: format!("{id:016x}"),
        token_hash: token::hash_hex(&format!("t{id}")),
        user_id: format!("u{user}"),
        expires_at: 2_000_000_000,
        allow_trigger: trigger,
        projects: projects.iter().map(|(p, e)| (format!("p{p}"), *e)).collect(),
    }
}

/// A snapshot of `tokens`, every user of them with credentials `creds[user]`.
fn snapshot_of(version: &str, tokens: Vec<SnapshotToken>, creds: &[Option<&str>]) -> Snapshot {
    let mut tokens = tokens;
    tokens.sort_by(|a, b| a.token_id.cmp(&b.token_id));
    tokens.dedup_by(|a, b| a.token_id == b.token_id);
    let users = tokens
        .iter()
        .map(|t| {
            let n: usize = t.user_id.trim_start_matches('u').parse().unwrap_or(0);
            let cred = creds.get(n).copied().flatten().map(str::to_owned);
            (t.user_id.clone(), SnapshotUser { read_credential: cred.clone(), write_credential: cred.map(|c| c + "-w") })
        })
        .collect();
    Snapshot { schema: SCHEMA, version: version.into(), generated_at: 7, limits: Limits::default(), tokens, users }
}

fn applied(base: &Snapshot, delta: &SnapshotDelta, step: usize) -> Result<Policy, Box<dyn std::error::Error>> {
    let body = serde_json::to_vec(delta)?;
    Ok(Policy::compile(base)?.apply_delta(Trickle { body: &body, step })?)
}

#[test]
fn a_delta_gives_exactly_the_full_snapshot_it_leads_to() -> Outcome {
    let a = snapshot_of(
        "va",
        vec![token_of(1, 1, &[(1, None), (2, Some(900))], true), token_of(2, 1, &[(1, None)], false), token_of(3, 2, &[(3, None)], false)],
        &[None, Some("c1"), Some("c2")],
    );
    // Token 1 loses a project, 2 is revoked, 4 is new (new user, new
    // project), user 2's credentials rotate; 3 is untouched.
    let b = snapshot_of(
        "vb",
        vec![token_of(1, 1, &[(1, None)], true), token_of(3, 2, &[(3, None)], false), token_of(4, 3, &[(4, Some(800)), (1, None)], false)],
        &[None, Some("c1"), Some("c2-rotated"), Some("c3")],
    );
    let delta = delta_between(&a, &b);
    assert_eq!(delta.tokens.len(), 2);
    assert_eq!(delta.removed, vec![format!("{:016x}", 2)]);
    for step in [1, 5, 1 << 16] {
        let p = applied(&a, &delta, step)?;
        assert_eq!(p.to_snapshot(), Policy::compile(&b)?.to_snapshot());
        assert_eq!(p.version, "vb");
        let (_, g) = p.grant_by_hash(&token::hash("t4")).ok_or("new token not found")?;
        assert_eq!(p.project_expiry(g, "p4"), Some(800));
        assert_eq!(p.user(g.user).and_then(|u| u.read_credential.as_deref()), Some("c3"));
        assert!(p.grant_by_hash(&token::hash("t2")).is_none(), "a revoked token stays");
    }
    // The user whose only token went is gone too.
    let c = snapshot_of("vc", vec![token_of(3, 2, &[(3, None)], false)], &[None, None, Some("c2")]);
    let p = applied(&b, &delta_between(&b, &c), 3)?;
    assert_eq!(p.to_snapshot(), Policy::compile(&c)?.to_snapshot());
    assert_eq!(p.users.slots.iter().flatten().count(), 1);
    Ok(())
}

fn delta_refusal(base: &Snapshot, delta: serde_json::Value) -> Result<String, Box<dyn std::error::Error>> {
    let policy = Policy::compile(base)?;
    match policy.apply_delta(serde_json::to_vec(&delta)?.as_slice()) {
        Ok(_) => Err("accepted".into()),
        Err(e) => Ok(e.0),
    }
}

#[test]
fn a_delta_that_does_not_add_up_is_refused_and_the_base_stays() -> Outcome {
    let a = snapshot_of("va", vec![token_of(1, 1, &[(1, None)], false), token_of(2, 2, &[(1, None)], false)], &[None, Some("SECRET-1"), Some("c2")]);
    let b = snapshot_of("vb", vec![token_of(1, 1, &[(1, None)], false), token_of(3, 2, &[(2, None)], false)], &[None, Some("SECRET-1"), Some("c2")]);
    let good = serde_json::to_value(delta_between(&a, &b))?;
    assert!(applied(&a, &delta_between(&a, &b), 64).is_ok());
    let with = |k: &str, v: serde_json::Value| {
        let mut d = good.clone();
        d[k] = v;
        d
    };
    assert!(delta_refusal(&a, with("base", json!("another")))?.contains("from version another"));
    assert!(delta_refusal(&a, with("total", json!(3)))?.contains("not the 3"));
    assert!(delta_refusal(&a, with("users", json!({})))?.contains("does not describe"));
    let t3 = good["tokens"][0].clone();
    assert!(delta_refusal(&a, with("tokens", json!([t3, t3])))?.contains("twice"));
    // A new token with the hash of one that stays.
    let mut clash = t3.clone();
    clash[1] = json!(token::hash_hex("t1"));
    assert!(delta_refusal(&a, with("tokens", json!([clash])))?.contains("token_hash"));
    assert!(delta_refusal(&a, with("removed", json!(["SECRET-XYZ"])))?.contains("removed"));
    let mut no_total = good.clone();
    if let Some(m) = no_total.as_object_mut() {
        m.remove("total");
    }
    assert!(delta_refusal(&a, no_total)?.contains("total is missing"));
    // A full snapshot is not a delta, and a delta is not a full snapshot.
    assert!(delta_refusal(&a, serde_json::to_value(&b)?)?.contains("base is missing"));
    assert!(Policy::from_json(&serde_json::to_vec(&good)?).is_err());
    for msg in [delta_refusal(&a, with("total", json!(9)))?, delta_refusal(&a, with("users", json!({"u2": "SECRET-1"})))?] {
        assert!(!msg.contains("SECRET"), "{msg}");
    }
    Ok(())
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { cases: 300, ..proptest::prelude::ProptestConfig::default() })]

    /// Any two snapshots over a small universe of ids, users and projects:
    /// the delta applied to the first equals the second, read in any chunks.
    #[test]
    fn any_delta_equals_the_full_build(
        a in proptest::collection::vec((0u8..12, 0u8..4, proptest::collection::vec((0u8..5, proptest::option::of(100i64..200)), 0..4), proptest::bool::ANY), 0..10),
        b in proptest::collection::vec((0u8..12, 0u8..4, proptest::collection::vec((0u8..5, proptest::option::of(100i64..200)), 0..4), proptest::bool::ANY), 0..10),
        creds_a in proptest::collection::vec(proptest::option::of(proptest::sample::select(vec!["x", "y"])), 4),
        creds_b in proptest::collection::vec(proptest::option::of(proptest::sample::select(vec!["x", "y"])), 4),
        step in 1usize..40,
    ) {
        let build = |v: &str, ts: &[(u8, u8, Vec<(u8, Option<i64>)>, bool)], creds: &[Option<&str>]| {
            snapshot_of(v, ts.iter().map(|(id, u, ps, tr)| token_of(*id, *u, ps, *tr)).collect(), creds)
        };
        let a = build("va", &a, &creds_a);
        let b = build("vb", &b, &creds_b);
        let p = applied(&a, &delta_between(&a, &b), step).map_err(|e| proptest::test_runner::TestCaseError::fail(e.to_string()))?;
        let full = Policy::compile(&b).map_err(|e| proptest::test_runner::TestCaseError::fail(e.to_string()))?;
        proptest::prop_assert_eq!(p.to_snapshot(), full.to_snapshot());
        for t in &b.tokens {
            let found = p.grant_by_hash(&token::parse_hash_hex(&t.token_hash).unwrap_or_default()).map(|(_, g)| g.token_id().to_string());
            proptest::prop_assert_eq!(found.as_deref(), Some(t.token_id.as_str()));
        }
    }
}

#[test]
fn an_older_policy_may_not_replace_a_newer_one() -> Outcome {
    let mut old = sample();
    old.generated_at = 100;
    let mut new = sample();
    new.generated_at = 101;
    let (old, new) = (Policy::compile(&old)?, Policy::compile(&new)?);
    assert!(new.may_replace(&old).is_ok());
    assert!(old.may_replace(&old).is_ok(), "the same second is not older");
    let e = old.may_replace(&new).err().ok_or("an older snapshot replaced a newer one")?;
    assert!(e.0.contains("1 s before"), "{e}");
    // A delta carries its own generation time, checked the same way.
    let a = snapshot_of("va", vec![token_of(1, 1, &[(1, None)], false)], &[None, Some("c")]);
    let mut b = snapshot_of("vb", vec![], &[]);
    b.generated_at = 3;
    let mut held = Policy::compile(&a)?;
    held.generated_at = 5;
    let replayed = applied(&a, &delta_between(&a, &b), 64)?;
    assert!(replayed.may_replace(&held).is_err());
    Ok(())
}
