//! Runs the fake InfraBox upstream as a standalone process (demo and manual
//! testing). Configuration from arguments `--addr`, `--database-url`,
//! `--public-key`, `--private-key`, `--no-auth`, or the environment
//! `FAKE_INFRABOX_ADDR`, `DATABASE_URL`, `INFRABOX_PUBLIC_KEY_PATH`,
//! `INFRABOX_PRIVATE_KEY_PATH`, `FAKE_INFRABOX_ENFORCE_AUTH=false`.

use std::net::SocketAddr;

use anyhow::{bail, Context, Result};
use mcp_gateway_tests::fake_infrabox::{FakeInfraBox, FakeInfraBoxConfig};

fn usage() -> &'static str {
    "usage: fake-infrabox [--addr HOST:PORT] [--database-url URL] [--public-key PEM_PATH] \
     [--private-key PEM_PATH] [--no-auth]\n\
     env: FAKE_INFRABOX_ADDR (default 127.0.0.1:8080), DATABASE_URL, INFRABOX_PUBLIC_KEY_PATH, \
     INFRABOX_PRIVATE_KEY_PATH (optional; needed for POST /api/v1/user/global-tokens), \
     FAKE_INFRABOX_ENFORCE_AUTH (default true)"
}

#[tokio::main]
async fn main() -> Result<()> {
    let mut addr = std::env::var("FAKE_INFRABOX_ADDR").unwrap_or_else(|_| "127.0.0.1:8080".into());
    let mut database_url = std::env::var("DATABASE_URL").ok();
    let mut public_key = std::env::var("INFRABOX_PUBLIC_KEY_PATH").ok();
    let mut private_key = std::env::var("INFRABOX_PRIVATE_KEY_PATH").ok().filter(|s| !s.is_empty());
    let mut enforce_auth = std::env::var("FAKE_INFRABOX_ENFORCE_AUTH").map(|v| v != "false" && v != "0").unwrap_or(true);

    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| args.next().with_context(|| format!("{name} needs a value\n{}", usage()));
        match arg.as_str() {
            "--addr" => addr = value("--addr")?,
            "--database-url" => database_url = Some(value("--database-url")?),
            "--public-key" => public_key = Some(value("--public-key")?),
            "--private-key" => private_key = Some(value("--private-key")?),
            "--no-auth" => enforce_auth = false,
            "-h" | "--help" => {
                println!("{}", usage());
                return Ok(());
            }
            other => bail!("unknown argument {other:?}\n{}", usage()),
        }
    }
    let database_url = database_url.with_context(|| format!("DATABASE_URL is required\n{}", usage()))?;
    let public_key = public_key.with_context(|| format!("INFRABOX_PUBLIC_KEY_PATH is required\n{}", usage()))?;
    let public_key_pem = std::fs::read_to_string(&public_key).with_context(|| format!("reading {public_key}"))?;
    let private_key_pem = match &private_key {
        Some(path) => Some(std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?),
        None => None,
    };
    let bind: SocketAddr = addr.parse().with_context(|| format!("bad address {addr:?}"))?;

    let fake = FakeInfraBox::start_with_private_key(
        FakeInfraBoxConfig { database_url, public_key_pem, bind, enforce_auth },
        private_key_pem,
    )
    .await?;

    eprintln!("==================================================================");
    eprintln!(" THIS IS A FAKE InfraBox API — a demo/test upstream, not InfraBox.");
    eprintln!(" Builds and jobs are in-memory; users, projects, collaborators and");
    eprintln!(" global tokens are read from the database.");
    eprintln!(" auth enforcement: {}", if enforce_auth { "on" } else { "OFF (everything allowed)" });
    eprintln!(" inspect: GET/DELETE http://{}/__fake/requests (a listener of its own, never the API's)", fake.recorder_addr());
    eprintln!("==================================================================");
    println!("fake-infrabox listening on {}", fake.addr());

    tokio::signal::ctrl_c().await.ok();
    Ok(())
}
