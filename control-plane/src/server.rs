//! Wiring: database pool, migrations, snapshot publisher, the rate limiter,
//! and the three listeners (public token API, internal snapshot/health/
//! metrics, gRPC for Envoy), with graceful shutdown on SIGINT/SIGTERM.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::serve::ListenerExt;
use axum::Router;
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::audit::ingest::AccessLogIngest;
use crate::audit::metrics::AuditMetrics;
use crate::config::Config;
use crate::internal_auth::{BearerSecret, InternalAuthMetrics, Service};
use crate::ownership::{OwnershipMetrics, PgOwnership};
use crate::ratelimit::coalesce::Coalescing;
use crate::ratelimit::metrics::RateLimitMetrics;
use crate::ratelimit::redis_store::RedisWindows;
use crate::ratelimit::service::RateLimitGrpc;
use crate::credential::cipher::CredentialCipher;
use crate::credential::infrabox::InfraBoxClient;
use crate::credential::upstream::UpstreamCredentials;
use crate::session::SessionVerifier;
use crate::snapshot::publisher::SnapshotPublisher;
use crate::snapshot::serve::SnapshotService;
use crate::token_api::store::TokenStore;
use crate::token_api::TokenApi;

/// A fatal startup problem, printed as one line.
#[derive(Debug)]
pub struct StartupError(pub String);

impl std::fmt::Display for StartupError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for StartupError {}

/// Connects, migrates, binds and serves until `shutdown` turns true.
pub async fn run(config: Config, shutdown: watch::Receiver<bool>) -> Result<(), StartupError> {
    let sessions = SessionVerifier::from_public_key(&config.infrabox_public_key_pem)
        .map_err(|why| StartupError(format!("INFRABOX_PUBLIC_KEY / INFRABOX_PUBLIC_KEY_PATH: {why}")))?;
    let pool = connect(&config.database_url).await?;
    let applied = crate::migrate::run(&pool).await.map_err(|e| match e {
        crate::migrate::MigrateError::InfraBoxTooOld(_) => StartupError(e.to_string()),
        crate::migrate::MigrateError::Db(_) => StartupError(format!("database migration failed: {e}")),
    })?;
    tracing::info!(?applied, "migrations up to date");

    let cipher = Arc::new(CredentialCipher::new(&config.credential_key, config.credential_key_previous.as_ref()));
    let infrabox = InfraBoxClient::new(&config.infrabox_url, Duration::from_secs(10))
        .map_err(|e| StartupError(format!("INFRABOX_URL: {e}")))?;
    let credentials = UpstreamCredentials::new(pool.clone(), cipher.clone(), infrabox);
    let (publisher, current) = SnapshotPublisher::new(pool.clone(), config.limits.clone(), cipher, &config.snapshot_secret);
    if let Err(e) = publisher.rebuild().await {
        tracing::warn!(error = %e, "first snapshot build failed; retrying in the background");
    }
    let publisher_task = tokio::spawn(publisher.run(config.scope_refresh, shutdown.clone()));

    let api = TokenApi {
        store: TokenStore::new(pool.clone(), config.max_tokens_per_user),
        sessions: Arc::new(sessions),
        max_expiry_days: config.max_expiry_days,
        credentials,
    };
    let public = with_common_layers(crate::token_api::router(api));
    let metrics = Metrics { snapshot: Some(current.clone()), ..Metrics::default() };
    let (audit_ingest, audit_tasks) =
        crate::audit::start(pool.clone(), &config.audit, metrics.audit.clone(), shutdown.clone());
    let summaries = crate::audit::summaries::Summaries::new(
        pool.clone(),
        &config.snapshot_secret,
        metrics.audit.clone(),
        metrics.internal_auth.clone(),
    );
    let internal = with_common_layers(
        crate::snapshot::serve::router(SnapshotService::new(
            &config.snapshot_secret,
            current,
            shutdown.clone(),
            metrics.internal_auth.clone(),
        ))
        .merge(crate::audit::summaries::router(summaries))
        .merge(metrics_router(metrics.clone())),
    );
    // Lazy: Redis may be down now; decisions answer UNAVAILABLE until it is back.
    let windows = if config.redis_cluster {
        let seeds: Vec<&str> = config.redis_url.split(',').map(str::trim).collect();
        RedisWindows::new_cluster(&seeds, config.redis_timeout, metrics.ratelimit.clone())
    } else {
        RedisWindows::new(&config.redis_url, config.redis_timeout, metrics.ratelimit.clone())
    }
    .map_err(|e| StartupError(format!("REDIS_URL: {e}")))?;
    let ownership = PgOwnership::new(pool.clone(), OWNERSHIP_CACHE_ROWS, metrics.ownership.clone());
    let grpc = grpc_router(
        RateLimitGrpc::new(windows, ownership, metrics.ratelimit.clone()),
        audit_ingest,
        &BearerSecret::new(&config.grpc_secret),
        metrics.internal_auth.clone(),
    );

    let http = bind(config.http_addr, "MCP_HTTP_ADDR").await?;
    let internal_listener = bind(config.internal_addr, "MCP_INTERNAL_ADDR").await?;
    let grpc_listener = bind(config.grpc_addr, "MCP_GRPC_ADDR").await?;
    let http_addr = http.local_addr().map_err(|e| StartupError(format!("MCP_HTTP_ADDR: {e}")))?;
    let internal_addr = internal_listener.local_addr().map_err(|e| StartupError(format!("MCP_INTERNAL_ADDR: {e}")))?;
    let grpc_addr = grpc_listener.local_addr().map_err(|e| StartupError(format!("MCP_GRPC_ADDR: {e}")))?;
    println!("listening http={http_addr} internal={internal_addr} grpc={grpc_addr}");
    tracing::info!(%http_addr, %internal_addr, %grpc_addr, "control plane ready");

    let a = serve(http, public, shutdown.clone());
    let b = serve(internal_listener, internal, shutdown.clone());
    let c = serve_grpc(grpc_listener, grpc, shutdown.clone());
    let (ra, rb, rc) = tokio::join!(a, b, c);
    let ra = ra.and(rc);
    // The ingest streams ended with the gRPC server: drain the audit queue.
    audit_tasks.finish(Duration::from_secs(5)).await;
    // The publisher stops on the same signal; give it a moment, then close the pool.
    let _ = tokio::time::timeout(Duration::from_secs(2), publisher_task).await;
    let _ = tokio::time::timeout(Duration::from_secs(2), pool.close()).await;
    tracing::info!("stopped");
    ra.and(rb).map_err(|e| StartupError(format!("server error: {e}")))
}

/// Build/job rows the ownership cache keeps (about 64 bytes each).
const OWNERSHIP_CACHE_ROWS: usize = 200_000;

/// Every counter the internal listener's `/metrics` renders.
#[derive(Clone, Default)]
struct Metrics {
    ratelimit: Arc<RateLimitMetrics>,
    audit: Arc<AuditMetrics>,
    ownership: Arc<OwnershipMetrics>,
    internal_auth: Arc<InternalAuthMetrics>,
    /// The snapshot in force (its gauges).
    snapshot: Option<crate::snapshot::publisher::Current>,
}

/// The gRPC services Envoy calls, on one listener (`MCP_GRPC_ADDR`), each
/// behind the internal credential check; another service is one more
/// `.add_service(...)`.
pub fn grpc_router(
    ratelimit: RateLimitGrpc<RedisWindows, PgOwnership>,
    audit: AccessLogIngest,
    secret: &BearerSecret,
    auth_metrics: Arc<InternalAuthMetrics>,
) -> tonic::transport::server::Router {
    use tonic::service::interceptor::InterceptedService;
    tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .add_service(InterceptedService::new(ratelimit.into_server(), secret.interceptor(auth_metrics.clone(), Service::RateLimit)))
        .add_service(InterceptedService::new(audit.into_server(), secret.interceptor(auth_metrics, Service::AccessLog)))
}

/// `GET /metrics` on the internal listener: Prometheus text.
fn metrics_router(metrics: Metrics) -> Router {
    Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let m = metrics.clone();
            async move {
                let mut out = String::new();
                m.ratelimit.render(&mut out);
                m.audit.render(&mut out);
                m.ownership.render(&mut out);
                m.internal_auth.render(&mut out);
                let published = m.snapshot.as_ref().and_then(|c| c.borrow().clone());
                if let Some(p) = published {
                    out.push_str("# HELP mcp_tokens_without_upstream_credential Live tokens whose user has no InfraBox credential they need yet (created before the gateway; minted at the owner's next token-API request).\n");
                    out.push_str("# TYPE mcp_tokens_without_upstream_credential gauge\n");
                    out.push_str(&format!("mcp_tokens_without_upstream_credential {}\n", p.without_credential));
                }
                ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], out)
            }
        }),
    )
}

/// Serves the gRPC router with `TCP_NODELAY` on every accepted connection,
/// its writes batched by [`Coalescing`].
async fn serve_grpc(
    listener: TcpListener,
    router: tonic::transport::server::Router,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    use tonic::codegen::tokio_stream::StreamExt;
    let incoming = tonic::transport::server::TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .map(|accepted| accepted.map(Coalescing::new));
    router
        .serve_with_incoming_shutdown(incoming, async move {
            let _ = shutdown.wait_for(|stop| *stop).await;
        })
        .await
        .map_err(std::io::Error::other)
}

fn with_common_layers(router: Router) -> Router {
    router
        .layer(axum::middleware::from_fn(crate::error::request_id))
        .layer(axum::extract::DefaultBodyLimit::max(64 * 1024))
}

async fn connect(url: &str) -> Result<PgPool, StartupError> {
    let options = PgPoolOptions::new().max_connections(10).acquire_timeout(Duration::from_secs(5));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        match options.clone().connect(url).await {
            Ok(pool) => return Ok(pool),
            Err(sqlx::Error::Configuration(_)) => {
                return Err(StartupError("DATABASE_URL: not a valid PostgreSQL connection URL".into()))
            }
            Err(e) if tokio::time::Instant::now() >= deadline => {
                return Err(StartupError(format!("cannot connect to the database at DATABASE_URL: {e}")))
            }
            Err(e) => {
                tracing::warn!(error = %e, "database not reachable yet; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}

async fn bind(addr: SocketAddr, var: &str) -> Result<TcpListener, StartupError> {
    TcpListener::bind(addr).await.map_err(|e| StartupError(format!("{var}: cannot listen on {addr}: {e}")))
}

async fn serve(listener: TcpListener, app: Router, mut shutdown: watch::Receiver<bool>) -> std::io::Result<()> {
    let listener = listener.tap_io(|s| {
        let _ = s.set_nodelay(true);
    });
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            let _ = shutdown.wait_for(|stop| *stop).await;
        })
        .await
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}
