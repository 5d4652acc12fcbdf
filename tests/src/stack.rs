//! A whole gateway for one test: its own database (on the shared Postgres),
//! the control plane, the fake InfraBox and Envoy running the filter, plus
//! the calls tests make against them.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;
use uuid::Uuid;

use crate::control_plane::{ControlPlane, ControlPlaneOptions};
use crate::container::Runtime;
use crate::envoy::{Envoy, EnvoyOptions, RlsTarget};
use crate::fake_infrabox::{FakeInfraBox, FakeInfraBoxConfig};
use crate::http::{RawRequest, RawResponse};
use crate::infrabox_db;
use crate::postgres::PostgresServer;
use crate::redis::RedisServer;
use crate::session::SigningKey;

/// What differs between stacks.
#[derive(Debug, Clone)]
pub struct StackOptions {
    /// Start the control plane (false: Envoy never gets a snapshot).
    pub control_plane: bool,
    /// The fake InfraBox checks credentials like InfraBox does.
    pub enforce_auth: bool,
    pub envoy_concurrency: u32,
    /// Long-poll wait the filter asks for.
    pub snapshot_wait_seconds: u32,
    /// Extra control-plane environment.
    pub control_plane_env: Vec<(String, String)>,
    /// Extra plugin-configuration fields.
    pub plugin: Value,
    /// Where Envoy's rate-limit cluster points.
    pub rls_target: RlsTarget,
    /// Where Envoy runs; `None`: as `MCP_E2E_RUNTIME` selects.
    pub envoy_runtime: Option<Runtime>,
    /// Envoy's `xff_num_trusted_hops`.
    pub xff_trusted_hops: u32,
}

/// The InfraBox hosts of the test gateway: what the raw client sends by
/// default (`127.0.0.1:<port>`), and a name tests set explicitly.
pub const INFRABOX_HOSTS: [&str; 2] = ["127.0.0.1", "infrabox.test"];

impl Default for StackOptions {
    fn default() -> Self {
        Self {
            control_plane: true,
            enforce_auth: false,
            envoy_concurrency: 1,
            snapshot_wait_seconds: 20,
            control_plane_env: Vec::new(),
            plugin: json!({}),
            rls_target: RlsTarget::ControlPlane,
            envoy_runtime: None,
            xff_trusted_hops: 0,
        }
    }
}

pub struct Stack {
    pub db: PgPool,
    pub database_url: String,
    pub key: &'static SigningKey,
    pub snapshot_secret: String,
    pub grpc_secret: String,
    pub infrabox: FakeInfraBox,
    pub control_plane: ControlPlane,
    pub envoy: Envoy,
    /// How `envoy` was started (to start another Envoy like it).
    pub envoy_options: EnvoyOptions,
}

impl Stack {
    pub async fn start(opts: StackOptions) -> Result<Self> {
        let pg = PostgresServer::shared();
        let database_url = pg.create_unique_database("gw").await?;
        let db = PgPoolOptions::new().max_connections(5).connect(&database_url).await?;
        infrabox_db::load_infrabox_schema(&db).await?;
        let key = SigningKey::shared();
        let snapshot_secret = format!("snap-{}", Uuid::new_v4().simple());
        // A secret of its own for the gRPC listener, so a wiring that sends
        // the wrong one fails.
        let grpc_secret = format!("grpc-{}", Uuid::new_v4().simple());
        let infrabox = FakeInfraBox::start(FakeInfraBoxConfig {
            database_url: database_url.clone(),
            public_key_pem: key.public_pem().to_string(),
            bind: SocketAddr::from(([127, 0, 0, 1], 0)),
            enforce_auth: opts.enforce_auth,
        })
        .await?;
        let mut control_plane = ControlPlane::start(ControlPlaneOptions {
            database_url: database_url.clone(),
            public_key_path: key.public_path().to_path_buf(),
            snapshot_secret: snapshot_secret.clone(),
            // Later entries win: a test's own environment overrides these.
            env: [
                vec![
                    // Keys are per user (unique per test): one Redis serves all.
                    ("REDIS_URL".to_string(), RedisServer::shared().url()),
                    // Budgets no functional test runs into; the rate-limit
                    // suite (tests/ratelimit.rs) sets the limits it tests.
                    ("MCP_LIMIT_LOG".to_string(), "10000".to_string()),
                    ("MCP_LIMIT_ARTIFACT".to_string(), "10000".to_string()),
                    ("MCP_LIMIT_WRITE".to_string(), "10000".to_string()),
                    ("MCP_LIMIT_DEFAULT".to_string(), "10000".to_string()),
                    ("INFRABOX_URL".to_string(), infrabox.url()),
                    ("MCP_CREDENTIAL_KEY".to_string(), random_key_hex()),
                    ("MCP_GRPC_SECRET".to_string(), grpc_secret.clone()),
                ],
                opts.control_plane_env.clone(),
            ]
            .concat(),
        })?;
        if !opts.control_plane {
            control_plane.stop()?;
        }
        let mut plugin = json!({
            "snapshot_secret": snapshot_secret,
            "grpc_secret": grpc_secret,
            "hosts": INFRABOX_HOSTS,
            "snapshot_wait_seconds": opts.snapshot_wait_seconds,
        });
        if let (Some(p), Some(extra)) = (plugin.as_object_mut(), opts.plugin.as_object()) {
            p.extend(extra.clone());
        }
        let envoy_options = EnvoyOptions {
            node_id: format!("test-{}", Uuid::new_v4().simple()),
            infrabox_host: "127.0.0.1".into(),
            infrabox_port: infrabox.addr().port(),
            cp_http_port: control_plane.http_port(),
            cp_internal_port: control_plane.internal_port(),
            cp_grpc_port: control_plane.grpc_port(),
            rls_target: opts.rls_target,
            plugin_config: plugin,
            grpc_secret: grpc_secret.clone(),
            xff_trusted_hops: opts.xff_trusted_hops,
            listen_port: None,
            concurrency: opts.envoy_concurrency,
            hot_restart: false,
            replicas: Vec::new(),
        };
        let envoy = Envoy::start_in(&envoy_options, opts.envoy_runtime.unwrap_or_else(Runtime::selected))?;
        if opts.control_plane {
            envoy
                .wait_stat("wasmcustom.mcp_snapshot_updates", u64::from(opts.envoy_concurrency), Duration::from_secs(20))
                .context("waiting for the first snapshot")?;
        }
        Ok(Self { db, database_url, key, snapshot_secret, grpc_secret, infrabox, control_plane, envoy, envoy_options })
    }

    /// The ingress.
    pub fn gateway(&self) -> SocketAddr {
        self.envoy.addr()
    }

    /// Sends a request through Envoy.
    pub async fn send(&self, req: RawRequest) -> Result<RawResponse> {
        req.send(self.gateway(), Duration::from_secs(20)).await
    }

    /// A user who collaborates on `projects` new projects; returns (user, projects).
    pub async fn user_with_projects(&self, name: &str, projects: usize) -> Result<(Uuid, Vec<Uuid>)> {
        let user = infrabox_db::create_user(&self.db, &format!("{name}-{}", Uuid::new_v4().simple())).await?;
        let mut ids = Vec::new();
        for i in 0..projects {
            let p = infrabox_db::create_project(&self.db, &format!("{name}-project-{i}"), "upload", false).await?;
            infrabox_db::add_collaborator(&self.db, user, p, "Developer").await?;
            self.infrabox.add_build(p).await?;
            ids.push(p);
        }
        Ok((user, ids))
    }

    /// The user's InfraBox session JWT.
    pub fn session(&self, user: Uuid) -> String {
        self.key.sign_user_session(user)
    }

    /// Calls the token API through Envoy with the user's session.
    pub async fn token_api(&self, user: Uuid, method: &str, path: &str, body: Option<Value>) -> Result<RawResponse> {
        let mut req = RawRequest::new(method, path).header("Authorization", &format!("Bearer {}", self.session(user)));
        if let Some(b) = body {
            req = req.json(&b);
        }
        self.send(req).await
    }

    /// Creates a token through the API; returns (token_id, secret).
    pub async fn create_token(&self, user: Uuid, enabled_projects: Value, expires_days: i64) -> Result<(String, String)> {
        let resp = self
            .token_api(
                user,
                "POST",
                "/api/v1/mcp/tokens",
                Some(json!({"name": "agent", "enabled_projects": enabled_projects, "expires_days": expires_days})),
            )
            .await?;
        if resp.status != 201 {
            bail!("token creation answered {}: {}", resp.status, resp.text());
        }
        let v = resp.json()?;
        let id = v["token_id"].as_str().context("token_id")?.to_string();
        let secret = v["token"].as_str().context("token")?.to_string();
        Ok((id, secret))
    }

    /// GET through the gateway with `Authorization: Bearer <token>`.
    pub async fn mcp_get(&self, token: &str, path: &str) -> Result<RawResponse> {
        self.send(RawRequest::get(path).header("Authorization", &format!("Bearer {token}"))).await
    }

    /// Repeats an MCP GET until it answers `status` (at most 5 s; the
    /// snapshot may still be on its way) and returns that response.
    pub async fn wait_until_status(&self, token: &str, path: &str, status: u16) -> RawResponse {
        let start = Instant::now();
        loop {
            let r = self.mcp_get(token, path).await.expect("request through the gateway");
            if r.status == status {
                return r;
            }
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "{path} still answers {} instead of {status}: {}",
                r.status,
                r.text()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Polls `f` every 10 ms until it returns true; returns the time it took.
    pub async fn wait_until<F, Fut>(&self, timeout: Duration, mut f: F) -> Result<Duration>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<bool>>,
    {
        let start = Instant::now();
        loop {
            if f().await? {
                return Ok(start.elapsed());
            }
            if start.elapsed() > timeout {
                bail!("condition not met within {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// A fresh 32-byte key as 64 hex characters (upstream-credential encryption).
pub fn random_key_hex() -> String {
    use rand::RngCore;
    let mut key = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut key);
    key.iter().map(|b| format!("{b:02x}")).collect()
}
