//! `make run`: the whole gateway on this machine, in one of two modes.
//!
//! - **Demo** (no `INFRABOX_URL`): Postgres and Redis in `.run/`, the control
//!   plane, a FAKE InfraBox as upstream with a demo user and projects, and
//!   Envoy with the filter on `127.0.0.1:8080` (`MCP_GATEWAY_PORT`). Writes
//!   `.run/demo.env` for the README's quickstart.
//! - **In front of an existing InfraBox** (`INFRABOX_URL=http://host:port`):
//!   the control plane on InfraBox's own database (`DATABASE_URL`, InfraBox
//!   at migration 00047 or later) with InfraBox's public key
//!   (`INFRABOX_PUBLIC_KEY_PATH`), Redis in `.run/`, and Envoy in front of
//!   that InfraBox; nothing is created in InfraBox's tables. Sign in to
//!   InfraBox and check it with `scripts/verify-gateway.sh`.
//!
//! `MCP_RUN_DIR` moves `.run/`; `MCP_GATEWAY_HOSTS` (comma-separated) names
//! the InfraBox hosts (default `127.0.0.1,localhost`). Ctrl-C stops
//! everything it started.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use mcp_gateway_tests::control_plane::{ControlPlane, ControlPlaneOptions};
use mcp_gateway_tests::envoy::{repo_root, Envoy, EnvoyOptions};
use mcp_gateway_tests::fake_infrabox::{FakeInfraBox, FakeInfraBoxConfig};
use mcp_gateway_tests::infrabox_db;
use mcp_gateway_tests::postgres::PostgresServer;
use mcp_gateway_tests::redis::RedisServer;
use mcp_gateway_tests::session::SigningKey;
use serde_json::json;
use sqlx::postgres::PgPoolOptions;

/// What `make run` needs to stand in front of an existing InfraBox.
const EXISTING_NEEDS: &str = "in front of an existing InfraBox (INFRABOX_URL set), make run needs:\n  \
     DATABASE_URL=postgres://…  InfraBox's own database (InfraBox at migration 00047 or later); the gateway adds its tables there\n  \
     INFRABOX_PUBLIC_KEY_PATH=…  InfraBox's RSA public key (PEM or ssh-rsa; the public half of the infrabox-rsa secret)";

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

#[tokio::main]
async fn main() -> Result<()> {
    let existing = env("INFRABOX_URL");
    if existing.is_some() && (env("DATABASE_URL").is_none() || env("INFRABOX_PUBLIC_KEY_PATH").is_none()) {
        eprintln!("[run] {EXISTING_NEEDS}");
        std::process::exit(2);
    }
    let run = env("MCP_RUN_DIR").map(PathBuf::from).unwrap_or_else(|| repo_root().join(".run"));
    if run.exists() {
        std::fs::remove_dir_all(&run).context("clearing the run directory")?;
    }
    std::fs::create_dir_all(&run)?;
    set_mode(&run, 0o755);
    let snapshot_secret = format!("demo-{}", uuid::Uuid::new_v4().simple());
    let grpc_secret = format!("demo-grpc-{}", uuid::Uuid::new_v4().simple());
    // The InfraBox host names the gateway answers MCP for (DESIGN §3).
    let hosts: Vec<String> = env("MCP_GATEWAY_HOSTS")
        .unwrap_or_else(|| "127.0.0.1,localhost".into())
        .split(',')
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .collect();
    eprintln!("[run] starting Redis in {}", run.display());
    let redis = RedisServer::start(&run.join("redis"))?;

    // Where the database, the key and the upstream come from.
    let mut pg = None;
    let mut fake = None;
    let mut demo = None;
    let (database_url, public_key_path, infrabox_host, infrabox_port) = match &existing {
        Some(url) => {
            let (host, port) = parse_http_url(url)?;
            eprintln!("[run] in front of the InfraBox at {url}, on its database (DATABASE_URL)");
            (env("DATABASE_URL").unwrap_or_default(), PathBuf::from(env("INFRABOX_PUBLIC_KEY_PATH").unwrap_or_default()), host, port)
        }
        None => {
            eprintln!("[run] starting Postgres in {}", run.display());
            let server = PostgresServer::start(&run.join("postgres"))?;
            let database_url = server.create_database("mcp_demo").await?;
            pg = Some(server);
            let db = PgPoolOptions::new().max_connections(2).connect(&database_url).await?;
            infrabox_db::load_infrabox_schema(&db).await?;
            let user = infrabox_db::create_user(&db, "demo").await?;
            let project = infrabox_db::create_project(&db, "demo-project", "upload", false).await?;
            infrabox_db::add_collaborator(&db, user, project, "Owner").await?;
            let other = infrabox_db::create_project(&db, "someone-elses-project", "upload", false).await?;
            let key = SigningKey::generate(&run.join("keys"))?;
            let server = FakeInfraBox::start(FakeInfraBoxConfig {
                database_url: database_url.clone(),
                public_key_pem: key.public_pem().to_string(),
                bind: SocketAddr::from(([127, 0, 0, 1], 0)),
                enforce_auth: true,
            })
            .await?;
            server.add_build(project).await?;
            eprintln!(
                "[run] upstream: FAKE InfraBox (demo only) on {}; its request recorder on {} (not reachable through the gateway)",
                server.addr(),
                server.recorder_addr()
            );
            let port = server.addr().port();
            fake = Some(server);
            demo = Some((key.sign_user_session(user), project, other));
            (database_url, key.public_path().to_path_buf(), "127.0.0.1".to_string(), port)
        }
    };

    let control_plane = ControlPlane::start(ControlPlaneOptions {
        database_url: database_url.clone(),
        public_key_path,
        snapshot_secret: snapshot_secret.clone(),
        env: vec![
            ("REDIS_URL".into(), redis.url()),
            ("INFRABOX_URL".into(), format!("http://{infrabox_host}:{infrabox_port}")),
            ("MCP_CREDENTIAL_KEY".into(), env("MCP_CREDENTIAL_KEY").unwrap_or_else(mcp_gateway_tests::stack::random_key_hex)),
            ("MCP_GRPC_SECRET".into(), grpc_secret.clone()),
        ],
    })
    .map_err(|e| {
        eprintln!("[run] the control plane did not start; its first error says why (README \"In front of an existing InfraBox\")");
        e
    })?;
    let port: u16 = env("MCP_GATEWAY_PORT").and_then(|p| p.parse().ok()).unwrap_or(8080);
    let envoy = Envoy::start(&EnvoyOptions {
        node_id: "demo".into(),
        infrabox_host,
        infrabox_port,
        cp_http_port: control_plane.http_port(),
        cp_internal_port: control_plane.internal_port(),
        cp_grpc_port: control_plane.grpc_port(),
        rls_target: Default::default(),
        plugin_config: json!({"snapshot_secret": snapshot_secret, "grpc_secret": grpc_secret, "hosts": hosts}),
        grpc_secret: grpc_secret.clone(),
        xff_trusted_hops: 0,
        listen_port: Some(port),
        concurrency: 2,
        hot_restart: false,
            replicas: Vec::new(),
    })?;
    envoy.wait_stat("wasmcustom.mcp_snapshot_updates", 1, Duration::from_secs(20))?;

    let env_file = run.join("demo.env");
    let mut lines = format!("MCP_GATEWAY_URL=http://{}\nREDIS_URL={}\n", envoy.addr(), redis.url());
    if let Some((session, project, other)) = &demo {
        lines.push_str(&format!(
            "DATABASE_URL={database_url}\nDEMO_SESSION_JWT={session}\nDEMO_PROJECT_ID={project}\nDEMO_OTHER_PROJECT_ID={other}\n"
        ));
    }
    std::fs::write(&env_file, lines)?;
    eprintln!(
        "[run] gateway on http://{} (Envoy admin http://{}); control plane log {}",
        envoy.addr(),
        envoy.admin_addr(),
        "see .run/ and target/e2e/"
    );
    match &demo {
        Some(_) => eprintln!("[run] wrote {} — try the README quickstart. Ctrl-C stops everything.", env_file.display()),
        None => eprintln!(
            "[run] wrote {}; sign in to InfraBox, then: MCP_VERIFY_SESSION=<your token cookie> scripts/verify-gateway.sh http://{} <project id>. Ctrl-C stops everything.",
            env_file.display(),
            envoy.addr()
        ),
    }
    tokio::signal::ctrl_c().await?;
    eprintln!("[run] stopping");
    drop(envoy);
    drop(control_plane);
    drop(fake);
    redis.stop()?;
    if let Some(pg) = pg {
        pg.stop()?;
    }
    Ok(())
}

fn parse_http_url(url: &str) -> Result<(String, u16)> {
    let Some(rest) = url.strip_prefix("http://") else {
        bail!("INFRABOX_URL must be http://host[:port] (TLS upstreams: configure the infrabox cluster in envoy/)");
    };
    let authority = rest.split('/').next().unwrap_or_default();
    match authority.rsplit_once(':') {
        Some((h, p)) => Ok((h.to_string(), p.parse().context("INFRABOX_URL port")?)),
        None => Ok((authority.to_string(), 80)),
    }
}

fn set_mode(path: &std::path::Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode));
}
