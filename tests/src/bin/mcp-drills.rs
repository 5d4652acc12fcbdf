//! `make drills`: the failure drills of tests/src/drills.rs in their long
//! form (every part killed alone, the pairs that matter, an Envoy hot
//! restart, under load); writes `bench/drills.md` and exits non-zero if a
//! promise broke. `--short` runs the form `make test` runs.

use anyhow::{bail, Result};
use mcp_gateway_tests::drills::{self, Settings};

#[tokio::main(flavor = "multi_thread", worker_threads = 4)]
async fn main() -> Result<()> {
    let short = std::env::args().any(|a| a == "--short");
    let settings = if short { Settings::short() } else { Settings::long() };
    let report = drills::run(settings).await?;
    let command = if short { "make drills DRILLS_ARGS=--short" } else { "make drills" };
    let md = report.markdown(command);
    let out = mcp_gateway_tests::envoy::repo_root().join("bench/drills.md");
    std::fs::write(&out, &md)?;
    println!("{md}");
    println!("wrote {}", out.display());
    let problems = report.problems();
    if !problems.is_empty() {
        bail!("{} promise(s) broken:\n{}", problems.len(), problems.join("\n"));
    }
    Ok(())
}
