//! Fixed request replay through the core pipeline, for instruction counts
//! under `valgrind --tool=callgrind` (`make bench` runs it twice per case
//! with different repeat counts; the difference divided by the extra
//! requests is the filter core's instructions per request, free of setup
//! and of timing noise).
//!
//! Usage: `replay <allowed|bad-token|unknown-token|passthrough|blocked> <requests> [tokens]`

use std::collections::BTreeMap;
use std::hint::black_box;

use mcp_filter_core::config::PluginConfig;
use mcp_filter_core::ownership::Ownership;
use mcp_filter_core::pipeline::{admit, authorize, request_headers, Admission, RequestHead};
use mcp_filter_core::policy::Policy;
use mcp_filter_core::snapshot::{Limits, Snapshot, SnapshotToken, SnapshotUser, SCHEMA};
use mcp_filter_core::token;

const PROJECT: &str = "0b7a4c2e-1f3d-4c5b-9a8e-7d6c5b4a3f21";

fn secret(i: u32) -> String {
    let mut random = [0u8; 24];
    random[..4].copy_from_slice(&i.to_be_bytes());
    random[4..8].copy_from_slice(&i.wrapping_mul(2_654_435_761).to_be_bytes());
    token::mint(&random)
}

fn policy(tokens: u32) -> Policy {
    let snapshot = Snapshot {
        schema: SCHEMA,
        version: "replay".into(),
        generated_at: 0,
        limits: Limits::default(),
        tokens: (0..tokens)
            .map(|i| {
                let s = secret(i);
                SnapshotToken {
                    token_id: s[7..23].to_string(),
                    token_hash: token::hash_hex(&s),
                    user_id: format!("user-{}", i % 1000),
                    expires_at: i64::MAX,
                    allow_trigger: false,
                    projects: BTreeMap::from([(PROJECT.to_string(), None)]),
                }
            })
            .collect(),
        users: (0..tokens.min(1000))
            .map(|u| (format!("user-{u}"), SnapshotUser { read_credential: Some(format!("cred-{u}")), write_credential: None }))
            .collect(),
    };
    match Policy::compile(&snapshot) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let kind = args.get(1).map(String::as_str).unwrap_or("allowed");
    let n: u32 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(1000);
    let tokens: u32 = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(100);
    let policy = policy(tokens);
    let config = match PluginConfig::parse(br#"{"snapshot_secret":"0123456789abcdef","hosts":["infrabox.test"]}"#) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    let good = format!("Bearer {}", secret(tokens / 2));
    let unknown = format!("Bearer {}", secret(tokens + 7));
    let malformed = format!("Bearer {}0", secret(1));
    let cookie = format!("theme=dark; token={}", secret(1));
    let mcp_path = format!("/api/v1/mcp/projects/{PROJECT}/builds?page=1");
    let (path, auth, cookies): (&str, Vec<&str>, Vec<&str>) = match kind {
        "allowed" => (&mcp_path, vec![&good], vec![]),
        "bad-token" => (&mcp_path, vec![&malformed], vec![]),
        "unknown-token" => (&mcp_path, vec![&unknown], vec![]),
        "passthrough" => ("/api/v1/projects/x/builds/", vec!["Bearer eyJhbGciOiJSUzI1NiJ9.e30.c2ln"], vec!["theme=dark"]),
        "blocked" => ("/api/v1/projects/x/builds/", vec![], vec![&cookie]),
        other => {
            eprintln!("unknown case {other}");
            std::process::exit(2);
        }
    };
    // What a typical client sends besides its credential.
    let mut others: Vec<(&str, &str)> = vec![
        ("user-agent", "python-httpx/0.28.1"),
        ("accept", "application/json"),
        ("x-forwarded-proto", "https"),
        ("x-request-id", "4c6f0e1e-8f7a-4b1e-9d55-2f1c3b7a9e10"),
    ];
    others.extend(auth.iter().map(|a| ("authorization", *a)));
    others.extend(cookies.iter().map(|c| ("cookie", *c)));
    let headers = request_headers("GET", path, "infrabox.test", &others);
    let mut forwarded = 0u32;
    for _ in 0..n {
        let head = RequestHead::new(black_box(&headers));
        match admit(&head, Some(&policy), &config, 1_000) {
            Admission::Admitted(a) => {
                if authorize(&a, &policy, &config.routes, 1_000, Ownership::Confirmed).is_ok() {
                    forwarded += 1;
                }
            }
            other => {
                black_box(other);
            }
        }
    }
    println!("{kind}: {n} requests, {forwarded} forwarded");
}
