//! Native timing of snapshot parsing at scale (a profiling aid; `make bench`
//! measures the same inside Envoy):
//! `cargo run --release -p mcp-filter-core --example snapshot_apply -- 100000`

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
            (Ok(a), Ok(b)) if a.token_count() == b.token_count() => println!(
                "round {round}: {n} tokens, body {} bytes, from_json {slice_ms:.1} ms, from_reader {reader_ms:.1} ms, tables {} bytes",
                body.len(),
                a.heap_bytes()
            ),
            (a, b) => {
                eprintln!("parse failed: {:?} / {:?}", a.err(), b.err());
                std::process::exit(1);
            }
        }
    }
}
