//! Native timing of snapshot parsing at scale (a profiling aid; `make bench`
//! measures the same inside Envoy):
//! `cargo run --release -p mcp-filter-core --example snapshot_apply -- 100000`
//! Also the lookup of a token by its hash (present and absent) at that size,
//! and the cost of verifying the body's signature.

use std::collections::BTreeMap;
use std::time::Instant;

use mcp_filter_core::policy::Policy;
use mcp_filter_core::snapshot::{Limits, Snapshot, SnapshotToken, SCHEMA};
use mcp_filter_core::token;

fn main() {
    let n: u32 = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(100_000);
    let tokens = (0..n)
        .map(|i| SnapshotToken {
            token_id: format!("{i:016x}"),
            token_hash: token::hash_hex(&format!("{i}")),
            user_id: format!("6f1c0a52-0000-4000-8000-{:012x}", i / 20),
            expires_at: 2_000_000_000,
            allow_trigger: i % 3 == 0,
            projects: BTreeMap::new(),
        })
        .collect();
    let snap = Snapshot { schema: SCHEMA, version: "scale".into(), generated_at: 1, limits: Limits::default(), tokens, users: BTreeMap::new() };
    let body = match serde_json::to_vec(&snap) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    for round in 0..3 {
        let t = Instant::now();
        let whole = Policy::from_json(&body);
        let slice_ms = t.elapsed().as_secs_f64() * 1e3;
        let t = Instant::now();
        let streamed = Policy::from_reader(&body[..]);
        let reader_ms = t.elapsed().as_secs_f64() * 1e3;
        match (whole, streamed) {
            (Ok(a), Ok(b)) if a.token_count() == b.token_count() => {
                println!(
                    "round {round}: {n} tokens, body {} bytes, from_json {slice_ms:.1} ms, from_reader {reader_ms:.1} ms, tables {} bytes",
                    body.len(),
                    a.heap_bytes()
                );
                if round == 2 {
                    lookups(&a, n);
                    let key = mcp_filter_core::signature::signing_key("a-snapshot-secret-0123");
                    let t = Instant::now();
                    let sig = mcp_filter_core::signature::sign(&key, &body);
                    println!("signature of the body: {:.1} ms ({sig:.8}…)", t.elapsed().as_secs_f64() * 1e3);
                }
            }
            (a, b) => {
                eprintln!("parse failed: {:?} / {:?}", a.err(), b.err());
                std::process::exit(1);
            }
        }
    }
}

/// ns per lookup of a present and of an absent token hash.
fn lookups(policy: &Policy, n: u32) {
    const ROUNDS: u32 = 200_000;
    let present: Vec<_> = (0..ROUNDS).map(|i| token::hash(&format!("{}", (i.wrapping_mul(2_654_435_761)) % n.max(1)))).collect();
    let absent: Vec<_> = (0..ROUNDS).map(|i| token::hash(&format!("absent-{i}"))).collect();
    for (name, hashes) in [("present", &present), ("absent", &absent)] {
        let t = Instant::now();
        let found = hashes.iter().filter(|h| policy.grant_by_hash(h).is_some()).count();
        let ns = t.elapsed().as_secs_f64() * 1e9 / f64::from(ROUNDS);
        println!("lookup by hash, {name}: {ns:.0} ns ({found} of {ROUNDS} found)");
    }
}
