//! `make soak`: the soak of tests/src/drills.rs (`SOAK_SECONDS`, default one
//! hour; a sample every `SOAK_SAMPLE_SECONDS`, default 30); writes
//! bench/soak.md and bench/soak.csv (scripts/plot-soak.py draws soak.png).

use std::time::Duration;

use anyhow::Result;
use mcp_gateway_tests::drills;

#[tokio::main(flavor = "multi_thread", worker_threads = 4)]
async fn main() -> Result<()> {
    let var = |k: &str, d: u64| std::env::var(k).ok().and_then(|v| v.parse().ok()).unwrap_or(d);
    let seconds = var("SOAK_SECONDS", 3600);
    let every = Duration::from_secs(var("SOAK_SAMPLE_SECONDS", 30));
    let report = drills::soak(seconds, every).await?;
    let dir = mcp_gateway_tests::envoy::repo_root().join("bench");
    std::fs::write(dir.join("soak.csv"), report.csv())?;
    let md = report.markdown(&format!("make soak SOAK_SECONDS={seconds}"));
    std::fs::write(dir.join("soak.md"), &md)?;
    println!("{md}");
    Ok(())
}
