//! `make run`: the whole gateway on this machine — Postgres and Redis in
//! `.run/`, the control plane, a FAKE InfraBox as demo upstream (or a real
//! one with `INFRABOX_URL=http://host:port`), and Envoy with the filter on
//! `127.0.0.1:8080` (`MCP_GATEWAY_PORT` to change). Writes `.run/demo.env`
//! for the README's quickstart; Ctrl-C stops everything it started.

use std::net::SocketAddr;
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

#[tokio::main]
async fn main() -> Result<()> {
    let run = repo_root().join(".run");
    if run.exists() {
        std::fs::remove_dir_all(&run).context("clearing .run/")?;
    }
    std::fs::create_dir_all(&run)?;
    set_mode(&run, 0o755);

    eprintln!("[run] starting Postgres and Redis in {}", run.display());
    let pg = PostgresServer::start(&run.join("postgres"))?;
    let redis = RedisServer::start(&run.join("redis"))?;
    let database_url = pg.create_database("mcp_demo").await?;
    let db = PgPoolOptions::new().max_connections(2).connect(&database_url).await?;
    infrabox_db::load_infrabox_schema(&db).await?;
    let user = infrabox_db::create_user(&db, "demo").await?;
    let project = infrabox_db::create_project(&db, "demo-project", "upload", false).await?;
    infrabox_db::add_collaborator(&db, user, project, "Owner").await?;
    let other = infrabox_db::create_project(&db, "someone-elses-project", "upload", false).await?;

    let key = SigningKey::generate(&run.join("keys"))?;
    let snapshot_secret = format!("demo-{}", uuid::Uuid::new_v4().simple());
    let grpc_secret = format!("demo-grpc-{}", uuid::Uuid::new_v4().simple());
    // The InfraBox host names the gateway answers MCP for (DESIGN §3).
    let hosts: Vec<String> = std::env::var("MCP_GATEWAY_HOSTS")
        .unwrap_or_else(|_| "127.0.0.1,localhost".into())
        .split(',')
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .collect();

    let (infrabox_host, infrabox_port, fake) = match std::env::var("INFRABOX_URL") {
        Ok(url) if !url.is_empty() => {
            let (host, port) = parse_http_url(&url)?;
            eprintln!("[run] upstream: the real InfraBox at {url}");
            (host, port, None)
        }
        _ => {
            let fake = FakeInfraBox::start(FakeInfraBoxConfig {
                database_url: database_url.clone(),
                public_key_pem: key.public_pem().to_string(),
                bind: SocketAddr::from(([127, 0, 0, 1], 0)),
                enforce_auth: true,
            })
            .await?;
            fake.add_build(project).await?;
            eprintln!(
                "[run] upstream: FAKE InfraBox (demo only) on {}; its request recorder on {} (not reachable through the gateway)",
                fake.addr(),
                fake.recorder_addr()
            );
            ("127.0.0.1".to_string(), fake.addr().port(), Some(fake))
        }
    };

    let control_plane = ControlPlane::start(ControlPlaneOptions {
        database_url: database_url.clone(),
        public_key_path: key.public_path().to_path_buf(),
        snapshot_secret: snapshot_secret.clone(),
        env: vec![
            ("REDIS_URL".into(), redis.url()),
            ("INFRABOX_URL".into(), format!("http://{infrabox_host}:{infrabox_port}")),
            ("MCP_CREDENTIAL_KEY".into(), mcp_gateway_tests::stack::random_key_hex()),
            ("MCP_GRPC_SECRET".into(), grpc_secret.clone()),
        ],
    })?;
    let port: u16 = std::env::var("MCP_GATEWAY_PORT").ok().and_then(|p| p.parse().ok()).unwrap_or(8080);
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
    })?;
    envoy.wait_stat("wasmcustom.mcp_snapshot_updates", 1, Duration::from_secs(20))?;

    let env_file = run.join("demo.env");
    std::fs::write(
        &env_file,
        format!(
            "MCP_GATEWAY_URL=http://{}\nDATABASE_URL={database_url}\nREDIS_URL={}\nDEMO_SESSION_JWT={}\nDEMO_PROJECT_ID={project}\nDEMO_OTHER_PROJECT_ID={other}\n",
            envoy.addr(),
            redis.url(),
            key.sign_user_session(user),
        ),
    )?;
    eprintln!(
        "[run] gateway on http://{} (Envoy admin http://{}); control plane log {}",
        envoy.addr(),
        envoy.admin_addr(),
        "see .run/ and target/e2e/"
    );
    eprintln!("[run] wrote {} — try the README quickstart. Ctrl-C stops everything.", env_file.display());
    tokio::signal::ctrl_c().await?;
    eprintln!("[run] stopping");
    drop(envoy);
    drop(control_plane);
    drop(fake);
    drop(db);
    redis.stop()?;
    pg.stop()?;
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
