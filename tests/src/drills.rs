//! Failure drills under load (DESIGN §13.4, the gateway's promises under
//! failure): a whole gateway of its own — Postgres, Redis, the control
//! plane, the fake InfraBox as a process, Envoy with hot restart — driven by
//! a steady mix of MCP traffic while parts are killed with SIGKILL and
//! started again, one at a time and two together, and Envoy is restarted
//! gracefully. Every figure of a drill is measured, at the client, in the
//! database and at Envoy's admin endpoint:
//!
//! - the longest client wait and the number of requests over twice their
//!   deadline; client connections reset or closed without an answer;
//! - admitted requests per (user, class) in any window, as proven from the
//!   client side (a decision lies between a request's send and its answer),
//!   against the limit while the rate-limit service is up and against the
//!   degraded bound around an outage;
//! - audit: rows + recorded missing − recovered against the records the
//!   load generator caused, once the streams settle;
//! - a token created and one revoked during the outage: how long after
//!   recovery the edge knows;
//! - Envoy's wasm failure counters, and its memory before and after.
//!
//! `make drills` runs the long form and writes `bench/drills.md`
//! (`mcp-drills`); `tests/tests/drills.rs` runs the short form in `make test`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use sqlx::postgres::PgPoolOptions;
use sqlx::{PgPool, Row};
use uuid::Uuid;

use crate::control_plane::{control_plane_bin, ControlPlane, ControlPlaneOptions};
use crate::envoy::{admin_get, Envoy, EnvoyOptions, RlsTarget};
use crate::http::{RawRequest, RawResponse};
use crate::infrabox_db;
use crate::ports::free_port;
use crate::postgres::PostgresServer;
use crate::process::ManagedProcess;
use crate::redis::RedisServer;
use crate::scratch::fresh_dir;
use crate::session::SigningKey;
use crate::stack::random_key_hex;

/// A part a drill kills.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Part {
    Redis,
    ControlPlane,
    Postgres,
    Upstream,
}

impl Part {
    fn name(self) -> &'static str {
        match self {
            Part::Redis => "Redis",
            Part::ControlPlane => "control plane",
            Part::Postgres => "Postgres",
            Part::Upstream => "upstream",
        }
    }
}

/// One drill.
#[derive(Debug, Clone)]
pub enum Fault {
    /// SIGKILL these parts together, wait the outage, start them again.
    Kill(Vec<Part>),
    /// Envoy's hot restart: a new epoch takes the sockets, the old drains.
    EnvoyRestart,
}

impl Fault {
    pub fn name(&self) -> String {
        match self {
            Fault::Kill(parts) => format!("kill {}", parts.iter().map(|p| p.name()).collect::<Vec<_>>().join(" + ")),
            Fault::EnvoyRestart => "Envoy hot restart".into(),
        }
    }

    /// Whether the rate-limit service is away during the fault (decisions
    /// are then the local window's: degraded).
    fn takes_the_limiter(&self) -> bool {
        matches!(self, Fault::Kill(p) if p.contains(&Part::Redis) || p.contains(&Part::ControlPlane))
    }
}

/// How hard and how long.
#[derive(Debug, Clone)]
pub struct Settings {
    pub users: usize,
    /// Client tasks per user (each loops over the mix).
    pub clients_per_user: usize,
    /// Pause between a client's requests.
    pub pause: Duration,
    /// Load before the first drill (the baseline) and between drills.
    pub calm: Duration,
    pub outage: Duration,
    pub faults: Vec<Fault>,
}

impl Settings {
    /// `make test`: every part once, two together once, an Envoy restart.
    pub fn short() -> Self {
        Self {
            users: 2,
            clients_per_user: 2,
            pause: Duration::from_millis(15),
            calm: Duration::from_secs(3),
            outage: Duration::from_millis(2500),
            faults: vec![
                Fault::Kill(vec![Part::Redis]),
                Fault::Kill(vec![Part::ControlPlane]),
                Fault::Kill(vec![Part::Postgres]),
                Fault::Kill(vec![Part::Upstream]),
                Fault::Kill(vec![Part::Redis, Part::ControlPlane]),
                Fault::EnvoyRestart,
            ],
        }
    }

    /// `make drills`: longer outages, more load, every pair that matters.
    pub fn long() -> Self {
        Self {
            users: 3,
            clients_per_user: 3,
            pause: Duration::from_millis(10),
            calm: Duration::from_secs(6),
            outage: Duration::from_secs(8),
            faults: {
                // The short form's drills, and the other pairs that matter
                // before the Envoy restart.
                let mut faults = Settings::short().faults;
                let restart = faults.pop();
                faults.extend([
                    Fault::Kill(vec![Part::ControlPlane, Part::Postgres]),
                    Fault::Kill(vec![Part::Postgres, Part::Upstream]),
                    Fault::Kill(vec![Part::Redis, Part::Upstream]),
                ]);
                faults.extend(restart);
                faults
            },
        }
    }
}

/// The rate-limit window of the drills and its limits per class: small, so
/// the load runs into them all the time.
pub const WINDOW_SECONDS: u64 = 2;
pub const LIMITS: [(&str, u32); 4] = [("default", 40), ("log", 8), ("artifact", 8), ("write", 4)];
/// What a client waits for an answer before it gives up (twice the
/// deadline below).
pub const DEADLINE: Duration = Duration::from_secs(1);

fn limit_of(class: &str) -> u32 {
    LIMITS.iter().find(|(c, _)| *c == class).map_or(0, |(_, l)| *l)
}

/// What a drill measured.
#[derive(Debug, Clone, Default)]
pub struct DrillReport {
    pub name: String,
    pub requests: u64,
    pub statuses: BTreeMap<u16, u64>,
    pub longest_ms: u64,
    pub p99_ms: u64,
    /// Answers later than twice [`DEADLINE`] (the client gave up).
    pub over_twice_deadline: u64,
    /// Connections reset or closed without an answer.
    pub resets: u64,
    /// The most admissions proven in one window of one (user, class), as a
    /// fraction of its limit: windows clear of the fault, and windows
    /// touching it.
    pub steady_max: f64,
    pub around_max: f64,
    /// The bound the windows touching this fault must keep.
    pub around_bound: f64,
    pub degraded_decisions: u64,
    /// 5xx answers by their error code.
    pub reasons: BTreeMap<String, u64>,
    /// Requests slower than the deadline, by kind.
    pub slow: BTreeMap<&'static str, u64>,
    /// Audit after recovery (cumulative).
    pub records: i64,
    pub rows: i64,
    pub missing: i64,
    pub recovered: i64,
    pub audit_settled_ms: u64,
    /// How long after recovery the edge knew the token created and the one
    /// revoked during the outage; how they were made.
    pub created_known_ms: u64,
    pub revoked_known_ms: u64,
    pub token_path: String,
    pub wasm_failures: u64,
    pub envoy_rss_kib: u64,
}

/// The whole run.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub settings: String,
    pub baseline_p99_ms: u64,
    pub drills: Vec<DrillReport>,
    pub envoy_rss_start_kib: u64,
    pub envoy_rss_end_kib: u64,
}

/// The fake InfraBox as a process of its own (so SIGKILL is a real crash:
/// Envoy's pooled connections to it are reset).
struct Upstream {
    port: u16,
    args: Vec<String>,
    log: PathBuf,
    process: Option<ManagedProcess>,
}

impl Upstream {
    fn start(database_url: &str, key: &SigningKey) -> Result<Self> {
        let port = free_port();
        let args = vec![
            "--addr".into(),
            format!("127.0.0.1:{port}"),
            "--database-url".into(),
            database_url.into(),
            "--public-key".into(),
            key.public_path().display().to_string(),
            "--private-key".into(),
            key.private_path().display().to_string(),
            "--no-auth".into(),
        ];
        let mut up = Self { port, args, log: fresh_dir("drill-upstream").join("fake-infrabox.log"), process: None };
        up.restart()?;
        Ok(up)
    }

    fn restart(&mut self) -> Result<()> {
        let bin = control_plane_bin().with_file_name("fake-infrabox");
        let mut cmd = Command::new(&bin);
        cmd.args(&self.args).env("FAKE_INFRABOX_DB_ACQUIRE_MS", "500");
        let mut p = ManagedProcess::spawn("fake-infrabox", cmd, &self.log).with_context(|| format!("{}", bin.display()))?;
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if !p.is_running() || Instant::now() > deadline {
                bail!("fake InfraBox did not start:\n{}", p.log_contents());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.process = Some(p);
        Ok(())
    }

    fn kill(&mut self) -> Result<()> {
        match self.process.take() {
            Some(mut p) => p.kill(),
            None => Ok(()),
        }
    }
}

/// One user of the load: a token in one project, a job in it, a project
/// outside its scope, a spare token revoked by a drill.
#[derive(Debug, Clone)]
struct User {
    id: Uuid,
    token: String,
    project: Uuid,
    job: Uuid,
    other_project: Uuid,
}

/// One answered (or failed) request of the load.
#[derive(Debug, Clone)]
struct Sample {
    kind: &'static str,
    user: usize,
    class: &'static str,
    sent_ms: u64,
    answered_ms: u64,
    status: u16,
    /// Went through the filter (one audit record).
    audited: bool,
    /// Passed the rate-limit step.
    admitted: bool,
    /// A 5xx's `error` code (the gateway's own answers carry one).
    reason: Option<String>,
}

struct World {
    pg: &'static PostgresServer,
    redis: RedisServer,
    cp: ControlPlane,
    upstream: Upstream,
    envoy: Envoy,
    database_url: String,
    key: &'static SigningKey,
    users: Vec<User>,
    /// Requests through the filter the harness sent outside the load.
    extra_records: AtomicU64,
    epoch: Instant,
}

impl World {
    async fn start(settings: &Settings) -> Result<Self> {
        let pg: &'static PostgresServer = Box::leak(Box::new(PostgresServer::start_with(&PostgresServer::base_dir_for("drill-postgres"), true)?));
        let database_url = pg.create_database("drills").await?;
        let db = pool(&database_url).await?;
        infrabox_db::load_infrabox_schema(&db).await?;
        let redis = RedisServer::start(&fresh_dir("drill-redis"))?;
        let key = SigningKey::shared();
        let upstream = Upstream::start(&database_url, key)?;
        let snapshot_secret = format!("snap-{}", Uuid::new_v4().simple());
        let grpc_secret = format!("grpc-{}", Uuid::new_v4().simple());
        let mut env = vec![
            ("REDIS_URL".to_string(), redis.url()),
            ("INFRABOX_URL".to_string(), format!("http://127.0.0.1:{}", upstream.port)),
            ("MCP_CREDENTIAL_KEY".to_string(), random_key_hex()),
            ("MCP_GRPC_SECRET".to_string(), grpc_secret.clone()),
            ("MCP_LIMIT_WINDOW_SECONDS".to_string(), WINDOW_SECONDS.to_string()),
            ("MCP_AUDIT_GAP_GRACE_SECONDS".to_string(), "1".into()),
            ("MCP_AUDIT_GAP_CHECK_SECONDS".to_string(), "1".into()),
        ];
        for (class, limit) in LIMITS {
            env.push((format!("MCP_LIMIT_{}", class.to_uppercase()), limit.to_string()));
        }
        let cp = ControlPlane::start(ControlPlaneOptions {
            database_url: database_url.clone(),
            public_key_path: key.public_path().to_path_buf(),
            snapshot_secret: snapshot_secret.clone(),
            env,
        })?;
        let envoy = Envoy::start_in(
            &EnvoyOptions {
                node_id: format!("drill-{}", Uuid::new_v4().simple()),
                infrabox_host: "127.0.0.1".into(),
                infrabox_port: upstream.port,
                cp_http_port: cp.http_port(),
                cp_internal_port: cp.internal_port(),
                cp_grpc_port: cp.grpc_port(),
                rls_target: RlsTarget::ControlPlane,
                plugin_config: json!({
                    "snapshot_secret": snapshot_secret,
                    "grpc_secret": grpc_secret,
                    "hosts": crate::stack::INFRABOX_HOSTS,
                    "snapshot_wait_seconds": 20,
                    "audit_coalesce_seconds": 0,
                    "auth_failure_limit": 1_000_000,
                    // While the service is up its answers arrive well within
                    // this on a loaded 2-core machine, so local decisions
                    // come only from the faults (a dead service answers at
                    // once: refused, or UNAVAILABLE).
                    "ratelimit_timeout_ms": 250,
                }),
                grpc_secret,
                xff_trusted_hops: 0,
                listen_port: None,
                concurrency: 1,
                hot_restart: true,
                replicas: Vec::new(),
            },
            crate::container::Runtime::Process,
        )?;
        envoy.wait_stat("wasmcustom.mcp_snapshot_updates", 1, Duration::from_secs(20))?;
        let mut world = Self {
            pg,
            redis,
            cp,
            upstream,
            envoy,
            database_url,
            key,
            users: Vec::new(),
            extra_records: AtomicU64::new(0),
            epoch: Instant::now(),
        };
        for i in 0..settings.users {
            let user = world.make_user(&db, i).await?;
            world.users.push(user);
        }
        db.close().await;
        Ok(world)
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    async fn make_user(&self, db: &PgPool, i: usize) -> Result<User> {
        let id = infrabox_db::create_user(db, &format!("drill-{i}-{}", Uuid::new_v4().simple())).await?;
        let project = infrabox_db::create_project(db, &format!("drill-{i}"), "upload", false).await?;
        infrabox_db::add_collaborator(db, id, project, "Developer").await?;
        let other_project = infrabox_db::create_project(db, &format!("drill-{i}-other"), "upload", false).await?;
        infrabox_db::add_collaborator(db, id, other_project, "Developer").await?;
        let (token_id, token) = self.create_token(id, json!({project.to_string(): null})).await?;
        let grant = self.token_api(id, "POST", &format!("/api/v1/mcp/tokens/{token_id}/trigger"), None).await?;
        if !(200..300).contains(&grant.status) {
            bail!("granting trigger answered {}: {}", grant.status, grant.text());
        }
        // A build (and its jobs) through the gateway itself.
        let path = format!("/api/v1/mcp/projects/{project}/trigger");
        let deadline = Instant::now() + Duration::from_secs(10);
        let build = loop {
            let r = self.counted(bearer(RawRequest::post(&path).json(&json!({"branch_or_sha": "main"})), &token)).await?;
            if r.status == 200 {
                let v = r.json()?;
                break v["data"]["build"]["id"].as_str().and_then(|s| Uuid::parse_str(s).ok()).context("build id")?;
            }
            if Instant::now() > deadline {
                bail!("trigger answered {}: {}", r.status, r.text());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let job: Uuid = sqlx::query("SELECT id FROM job WHERE build_id = $1 ORDER BY name DESC LIMIT 1")
            .bind(build)
            .fetch_one(db)
            .await?
            .get("id");
        Ok(User { id, token, project, job, other_project })
    }

    async fn token_api(&self, user: Uuid, method: &str, path: &str, body: Option<Value>) -> Result<RawResponse> {
        let mut req = RawRequest::new(method, path).header("Authorization", &format!("Bearer {}", self.key.sign_user_session(user)));
        if let Some(b) = body {
            req = req.json(&b);
        }
        req.send(self.envoy.addr(), Duration::from_secs(10)).await
    }

    async fn create_token(&self, user: Uuid, projects: Value) -> Result<(String, String)> {
        let r = self
            .token_api(user, "POST", "/api/v1/mcp/tokens", Some(json!({"name": "drill", "enabled_projects": projects, "expires_days": 30})))
            .await?;
        if r.status != 201 {
            bail!("token creation answered {}: {}", r.status, r.text());
        }
        let v = r.json()?;
        Ok((v["token_id"].as_str().context("token_id")?.into(), v["token"].as_str().context("token")?.into()))
    }

    /// A request through the filter outside the load (counted as a record).
    async fn counted(&self, req: RawRequest) -> Result<RawResponse> {
        self.extra_records.fetch_add(1, Ordering::Relaxed);
        req.send(self.envoy.addr(), Duration::from_secs(10)).await
    }

    async fn kill(&mut self, part: Part) -> Result<()> {
        match part {
            Part::Redis => self.redis.kill(),
            Part::ControlPlane => self.cp.kill(),
            Part::Postgres => self.pg.kill(),
            Part::Upstream => self.upstream.kill(),
        }
    }

    async fn restart(&mut self, part: Part) -> Result<()> {
        match part {
            Part::Redis => self.redis.restart(),
            Part::ControlPlane => self.cp.restart(),
            Part::Postgres => self.pg.restart().await,
            Part::Upstream => self.upstream.restart(),
        }
    }

    fn wasm_failures(&self) -> u64 {
        // Envoy's counters of failed or reloaded (after a crash) VMs and
        // plugins, whatever their prefix, plus panics and traps in its log.
        let (_, text) = admin_get(self.envoy.admin_addr(), "/stats?filter=wasm").unwrap_or_default();
        let counted: u64 = text
            .lines()
            .filter(|l| {
                let name = l.split(':').next().unwrap_or_default();
                !name.starts_with("wasmcustom.")
                    && (name.contains("fail") || name.contains("crash") || name.ends_with("vm_reload") || name.ends_with("vm_reload_success"))
            })
            .filter_map(|l| l.rsplit(':').next().and_then(|v| v.trim().parse::<u64>().ok()))
            .sum();
        let log = self.envoy.log_contents();
        let trapped = log.lines().filter(|l| l.contains("panicked at") || l.contains("Uncaught") || l.contains("RuntimeError")).count() as u64;
        counted + trapped
    }

    fn envoy_rss_kib(&self) -> u64 {
        let Some(pid) = self.envoy.pid() else { return 0 };
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()
            .and_then(|s| s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok()))
            .unwrap_or(0)
    }
}

async fn pool(url: &str) -> Result<PgPool> {
    Ok(PgPoolOptions::new().max_connections(2).acquire_timeout(Duration::from_secs(3)).connect(url).await?)
}

fn bearer(req: RawRequest, token: &str) -> RawRequest {
    req.header("Authorization", &format!("Bearer {token}"))
}

/// What each step of the mix is.
const KINDS: [&str; 10] = [
    "REST read", "tool call", "REST log", "artifact tool call", "trigger", "REST read", "out of scope", "unknown token", "passthrough", "passthrough",
];

/// The mix, one step per request: (class, audited, request).
fn mix(user: &User, step: usize) -> (&'static str, bool, RawRequest) {
    let (p, j) = (user.project, user.job);
    let tool = |name: &str, args: Value| {
        let body = json!({"jsonrpc": "2.0", "id": step, "method": "tools/call", "params": {"name": name, "arguments": args}});
        bearer(
            RawRequest::post("/api/v1/mcp")
                .header("Accept", "application/json, text/event-stream")
                .header("MCP-Protocol-Version", "2025-11-25")
                .json(&body),
            &user.token,
        )
    };
    match step % 10 {
        0 | 5 => ("default", true, bearer(RawRequest::get(&format!("/api/v1/mcp/projects/{p}/builds")), &user.token)),
        1 => ("default", true, tool("get_project", json!({"project_id": p.to_string()}))),
        2 => ("log", true, bearer(RawRequest::get(&format!("/api/v1/mcp/projects/{p}/jobs/{j}/log")), &user.token)),
        3 => ("artifact", true, tool("list_job_artifacts", json!({"project_id": p.to_string(), "job_id": j.to_string()}))),
        4 => ("write", true, bearer(RawRequest::post(&format!("/api/v1/mcp/projects/{p}/trigger")).json(&json!({"branch_or_sha": "main"})), &user.token)),
        // Denials: out of scope (after the limit step), an unknown token.
        6 => ("default", true, bearer(RawRequest::get(&format!("/api/v1/mcp/projects/{}/builds", user.other_project)), &user.token)),
        7 => {
            let fake = format!("ib_mcp_{}", "0".repeat(48));
            ("none", true, bearer(RawRequest::get(&format!("/api/v1/mcp/projects/{p}")), &fake))
        }
        // Passthrough: InfraBox's own API with its own credential.
        _ => ("none", false, RawRequest::get(&format!("/api/v1/projects/{p}/builds/")).header("Authorization", "Bearer infrabox-session")),
    }
}

/// Classifies an answer of the mix: (admitted by the limit step, degraded).
fn classify(class: &str, r: &RawResponse) -> bool {
    if class == "none" {
        return false;
    }
    let limited = r.status == 429 || (r.status == 200 && r.text().contains("rate_limited"));
    let evaluated = r.header("ratelimit-limit").is_some() || r.status == 200 || r.status == 403;
    evaluated && !limited && r.status != 401
}

struct Load {
    samples: Arc<Mutex<Vec<Sample>>>,
    resets: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(world: &World, settings: &Settings) -> Self {
        let samples = Arc::new(Mutex::new(Vec::new()));
        let resets = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();
        for (ui, user) in world.users.iter().enumerate() {
            for c in 0..settings.clients_per_user {
                let (user, samples, resets, stop) = (user.clone(), samples.clone(), resets.clone(), stop.clone());
                let (addr, epoch, pause) = (world.envoy.addr(), world.epoch, settings.pause);
                tasks.push(tokio::spawn(async move {
                    let mut step = c * 3;
                    while !stop.load(Ordering::Relaxed) {
                        let (class, audited, req) = mix(&user, step);
                        let kind = KINDS.get(step % 10).copied().unwrap_or("?");
                        step += 1;
                        let sent_ms = epoch.elapsed().as_millis() as u64;
                        let result = req.send(addr, DEADLINE * 2).await;
                        let answered_ms = epoch.elapsed().as_millis() as u64;
                        let sample = match result {
                            Ok(r) => Sample {
                                kind,
                                user: ui,
                                class,
                                sent_ms,
                                answered_ms,
                                status: r.status,
                                audited,
                                admitted: classify(class, &r),
                                reason: (r.status >= 500).then(|| {
                                    r.json().ok().and_then(|v| v["error"].as_str().map(String::from)).unwrap_or_else(|| "(upstream or Envoy)".into())
                                }),
                            },
                            Err(e) => {
                                let timed_out = format!("{e:#}").contains("timed out") || answered_ms - sent_ms >= (DEADLINE * 2).as_millis() as u64;
                                if !timed_out {
                                    resets.fetch_add(1, Ordering::Relaxed);
                                }
                                Sample { kind, user: ui, class, sent_ms, answered_ms, status: 0, audited, admitted: false, reason: None }
                            }
                        };
                        if let Ok(mut s) = samples.lock() {
                            s.push(sample);
                        }
                        tokio::time::sleep(pause).await;
                    }
                }));
            }
        }
        Self { samples, resets, stop, tasks }
    }

    async fn finish(self) -> (Vec<Sample>, u64) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            let _ = t.await;
        }
        let samples = self.samples.lock().map(|s| s.clone()).unwrap_or_default();
        (samples, self.resets.load(Ordering::Relaxed))
    }

    fn snapshot(&self) -> (Vec<Sample>, u64) {
        (self.samples.lock().map(|s| s.clone()).unwrap_or_default(), self.resets.load(Ordering::Relaxed))
    }
}

/// The most admissions of one (user, class) proven inside one window whose
/// start passes `pick`, as a fraction of the limit: for each admitted
/// request i, those sent at or after it and answered before its send plus
/// the window were certainly decided inside [s_i, s_i + W).
fn max_in_window(samples: &[&Sample], pick: impl Fn(u64) -> bool) -> f64 {
    let w = WINDOW_SECONDS * 1000;
    let mut by_key: BTreeMap<(usize, &str), Vec<(u64, u64)>> = BTreeMap::new();
    for s in samples.iter().filter(|s| s.admitted) {
        by_key.entry((s.user, s.class)).or_default().push((s.sent_ms, s.answered_ms));
    }
    let mut worst: f64 = 0.0;
    for ((_, class), mut v) in by_key {
        v.sort_unstable();
        let limit = f64::from(limit_of(class).max(1));
        for (i, (start, _)) in v.iter().enumerate() {
            if !pick(*start) {
                continue;
            }
            let n = v.iter().skip(i).take_while(|(s, _)| *s < start + w).filter(|(_, a)| *a < start + w).count();
            worst = worst.max(n as f64 / limit);
        }
    }
    worst
}

fn percentile(mut v: Vec<u64>, p: f64) -> u64 {
    if v.is_empty() {
        return 0;
    }
    v.sort_unstable();
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v.get(i).copied().unwrap_or(0)
}

/// Runs every drill of `settings` and reports.
pub async fn run(mut settings: Settings) -> Result<Report> {
    // MCP_DRILLS_ONLY=2,4 runs only those drills (by index), to chase one.
    if let Ok(only) = std::env::var("MCP_DRILLS_ONLY") {
        let keep: Vec<usize> = only.split(',').filter_map(|n| n.trim().parse().ok()).collect();
        settings.faults = settings.faults.into_iter().enumerate().filter(|(i, _)| keep.contains(i)).map(|(_, f)| f).collect();
    }
    let mut world = World::start(&settings).await?;
    let mut report = Report {
        settings: format!(
            "{} users × {} clients, {} ms pause; outages of {:.1} s; window {} s, limits {}; deadline {} ms",
            settings.users,
            settings.clients_per_user,
            settings.pause.as_millis(),
            settings.outage.as_secs_f64(),
            WINDOW_SECONDS,
            LIMITS.iter().map(|(c, l)| format!("{c} {l}")).collect::<Vec<_>>().join(", "),
            DEADLINE.as_millis()
        ),
        ..Report::default()
    };
    let load = Load::start(&world, &settings);
    tokio::time::sleep(settings.calm).await;
    report.envoy_rss_start_kib = world.envoy_rss_kib();
    {
        let (samples, _) = load.snapshot();
        report.baseline_p99_ms = percentile(samples.iter().map(|s| s.answered_ms - s.sent_ms).collect(), 0.99);
    }
    let db_url = world.database_url.clone();
    let mut fault_spans: Vec<(u64, u64, bool)> = Vec::new();
    let mut drills = Vec::new();
    for (n, fault) in settings.faults.iter().enumerate() {
        let (before, resets_before) = load.snapshot();
        let from_ms = world.now_ms();
        let degraded_before = world.envoy.stat("wasmcustom.mcp_ratelimit_degraded").unwrap_or(0);
        let spare_user = world.users.get(n % world.users.len()).map(|u| u.id).context("no users")?;
        let (spare_id, spare) = world.create_token(spare_user, json!({})).await?;
        wait_status(&world, &spare, |s| s != 401, Duration::from_secs(5)).await.context("the spare token never arrived")?;
        let down_ms = world.now_ms();
        let mut made: (Option<String>, &str);
        match fault {
            Fault::Kill(parts) => {
                for p in parts {
                    world.kill(*p).await?;
                }
                tokio::time::sleep(settings.outage / 3).await;
                // A token made and one revoked while the parts are away:
                // through the token API when it can answer, else as
                // InfraBox's own token routes would (the same table).
                let api_up = !parts.contains(&Part::ControlPlane) && !parts.contains(&Part::Postgres);
                if api_up {
                    let (_, secret) = world.create_token(spare_user, json!({})).await?;
                    let del = world.token_api(spare_user, "DELETE", &format!("/api/v1/mcp/tokens/{spare_id}"), None).await?;
                    if !(200..300).contains(&del.status) {
                        bail!("revoking answered {}", del.status);
                    }
                    made = (Some(secret), "token API during the outage");
                } else if !parts.contains(&Part::Postgres) {
                    let db = pool(&db_url).await?;
                    made = (Some(insert_token(&db, spare_user).await?), "database during the outage");
                    sqlx::query("UPDATE mcp_token SET revoked_at = (now() AT TIME ZONE 'utc') WHERE token_id = $1").bind(&spare_id).execute(&db).await?;
                    db.close().await;
                } else {
                    // The database is what is away: nothing can be made;
                    // the token API must say so at once, not hang.
                    let t = Instant::now();
                    let r = world.token_api(spare_user, "POST", "/api/v1/mcp/tokens", Some(json!({"name": "x", "enabled_projects": {}, "expires_days": 1}))).await;
                    let status = r.map(|r| r.status).unwrap_or(0);
                    if (200..300).contains(&status) || t.elapsed() > DEADLINE * 10 {
                        bail!("the token API answered {status} after {:?} without its database", t.elapsed());
                    }
                    made = (None, "after recovery (the database was away)");
                }
                tokio::time::sleep(settings.outage - settings.outage / 3).await;
                // What the control plane needs first (it waits for its
                // database before it reports healthy).
                let mut order = parts.clone();
                order.sort_by_key(|p| *p == Part::ControlPlane);
                for p in order {
                    world.restart(p).await?;
                }
            }
            Fault::EnvoyRestart => {
                let (_, secret) = world.create_token(spare_user, json!({})).await?;
                let del = world.token_api(spare_user, "DELETE", &format!("/api/v1/mcp/tokens/{spare_id}"), None).await?;
                if !(200..300).contains(&del.status) {
                    bail!("revoking answered {}", del.status);
                }
                made = (Some(secret), "token API during the restart");
                world.envoy.hot_restart()?;
                world.envoy.wait_drained(Duration::from_secs(20))?;
            }
        }
        let up_ms = world.now_ms();
        let recovered = Instant::now();
        // Tokens: what was made during the outage (or now, if nothing could be).
        let created = match made.0.take() {
            Some(s) => s,
            None => {
                let (_, s) = world.create_token(spare_user, json!({})).await?;
                let del = world.token_api(spare_user, "DELETE", &format!("/api/v1/mcp/tokens/{spare_id}"), None).await?;
                if !(200..300).contains(&del.status) {
                    bail!("revoking after recovery answered {}: {}", del.status, del.text());
                }
                s
            }
        };
        wait_status(&world, &created, |s| s != 401, Duration::from_secs(30)).await.context("the created token never arrived")?;
        let created_known = recovered.elapsed();
        wait_status(&world, &spare, |s| s == 401, Duration::from_secs(30)).await.context("the revoked token still works")?;
        let revoked_known = recovered.elapsed();
        tokio::time::sleep(settings.calm).await;
        let (after, resets_after) = load.snapshot();
        let to_ms = world.now_ms();
        let drill: Vec<&Sample> = after.iter().skip(before.len()).collect();
        // A hot restart starts the counter again at 0.
        let degraded = world.envoy.stat("wasmcustom.mcp_ratelimit_degraded").unwrap_or(0).saturating_sub(degraded_before);
        let waits: Vec<u64> = drill.iter().map(|s| s.answered_ms - s.sent_ms).collect();
        let mut statuses = BTreeMap::new();
        let mut slow = BTreeMap::new();
        let mut reasons = BTreeMap::new();
        for s in &drill {
            *statuses.entry(s.status).or_insert(0) += 1;
            if let Some(r) = &s.reason {
                *reasons.entry(r.clone()).or_insert(0) += 1;
            }
            if s.answered_ms - s.sent_ms >= DEADLINE.as_millis() as u64 {
                *slow.entry(s.kind).or_insert(0) += 1;
            }
        }
        // Windows touching the fault: from the kill to one window after
        // recovery (Redis comes back empty; the service does not know what
        // the local windows admitted).
        let w = WINDOW_SECONDS * 1000;
        let touches = |start: u64| start + w > down_ms && start < up_ms + w;
        fault_spans.push((down_ms, up_ms, fault.takes_the_limiter()));
        let all: Vec<&Sample> = after.iter().filter(|s| s.sent_ms >= from_ms && s.sent_ms < to_ms).collect();
        let spans = fault_spans.clone();
        let clear = |start: u64| spans.iter().all(|(d, u, _)| !(start + w > *d && start < u + w));
        drills.push(DrillReport {
            name: fault.name(),
            requests: drill.len() as u64,
            statuses,
            longest_ms: waits.iter().copied().max().unwrap_or(0),
            p99_ms: percentile(waits.clone(), 0.99),
            over_twice_deadline: waits.iter().filter(|w| **w >= (DEADLINE * 2).as_millis() as u64).count() as u64,
            resets: resets_after - resets_before,
            steady_max: max_in_window(&all, clear),
            around_max: max_in_window(&all, touches),
            // With the limiter away: the local window's limit on top of
            // what the service admitted (one Envoy). Otherwise the limit.
            // (Or any drill in which some decisions were local after all.)
            around_bound: if fault.takes_the_limiter() || degraded > 0 { 2.0 } else { 1.0 },
            slow,
            reasons,
            degraded_decisions: degraded,
            created_known_ms: created_known.as_millis() as u64,
            revoked_known_ms: revoked_known.as_millis() as u64,
            token_path: made.1.to_string(),
            wasm_failures: world.wasm_failures(),
            envoy_rss_kib: world.envoy_rss_kib(),
            ..DrillReport::default()
        });
    }
    let (samples, _) = load.finish().await;
    // Audit, once every stream has settled: one record per filtered request.
    // (The harness's own probes, wait_status, are counted in extra_records.)
    let records = samples.iter().filter(|s| s.audited).count() as i64 + world.extra_records.load(Ordering::Relaxed) as i64;
    let db = pool(&db_url).await?;
    let t = Instant::now();
    let (rows, missing, recovered) = loop {
        let (rows, missing, recovered, settled) = audit_totals(&db).await?;
        if settled && rows + missing - recovered == records {
            break (rows, missing, recovered);
        }
        if t.elapsed() > Duration::from_secs(30) {
            break (rows, missing, recovered);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let settled_ms = t.elapsed().as_millis() as u64;
    for d in &mut drills {
        d.records = records;
        d.rows = rows;
        d.missing = missing;
        d.recovered = recovered;
        d.audit_settled_ms = settled_ms;
    }
    db.close().await;
    report.envoy_rss_end_kib = world.envoy_rss_kib();
    report.drills = drills;
    world.cp.stop().ok();
    world.envoy.stop().ok();
    world.upstream.kill().ok();
    world.redis.stop().ok();
    world.pg.stop().ok();
    Ok(report)
}

/// (rows with a sequence number, recorded missing, recovered, every stream
/// checked up to its highest number).
async fn audit_totals(db: &PgPool) -> Result<(i64, i64, i64, bool)> {
    let r = sqlx::query(
        "SELECT (SELECT count(*) FROM mcp_access_log WHERE seq IS NOT NULL) AS rows, \
                (SELECT COALESCE(sum(missing), 0)::int8 FROM mcp_audit_gap) AS missing, \
                (SELECT COALESCE(sum(recovered), 0)::int8 FROM mcp_audit_gap) AS recovered, \
                (SELECT bool_and(checked_seq = high_seq) FROM mcp_audit_stream) AS settled",
    )
    .fetch_one(db)
    .await?;
    let settled: Option<bool> = r.get("settled");
    Ok((r.get("rows"), r.get("missing"), r.get("recovered"), settled == Some(true)))
}

/// Inserts a token as InfraBox's own token routes would; returns its secret.
async fn insert_token(db: &PgPool, user: Uuid) -> Result<String> {
    use rand::RngCore;
    let mut random = [0u8; 24];
    rand::thread_rng().fill_bytes(&mut random);
    let secret = mcp_filter_core::token::mint(&random);
    sqlx::query(
        "INSERT INTO mcp_token (token_id, token_hash, user_id, name, enabled_projects, allow_trigger, expires_at) \
         VALUES ($1, $2, $3, 'made during a drill', '{}', false, (now() AT TIME ZONE 'utc') + interval '7 days')",
    )
    .bind(secret.get(7..23).context("token id")?)
    .bind(mcp_filter_core::token::hash_hex(&secret))
    .bind(user)
    .execute(db)
    .await?;
    Ok(secret)
}

/// Polls `GET /api/v1/mcp/projects` with `token` until its status passes.
async fn wait_status(world: &World, token: &str, ok: impl Fn(u16) -> bool, timeout: Duration) -> Result<()> {
    let start = Instant::now();
    loop {
        let r = world.counted(bearer(RawRequest::get("/api/v1/mcp/projects"), token)).await;
        if let Ok(r) = &r {
            if ok(r.status) {
                return Ok(());
            }
        }
        if start.elapsed() > timeout {
            bail!("still {:?} after {timeout:?}", r.map(|r| r.status));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

impl Report {
    /// What every drill must show; the problems found, empty if none.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        for d in &self.drills {
            let mut bad = |what: String| out.push(format!("{}: {what}", d.name));
            if d.over_twice_deadline > 0 {
                bad(format!("{} requests waited twice the deadline or more (longest {} ms)", d.over_twice_deadline, d.longest_ms));
            }
            if d.resets > 0 {
                bad(format!("{} client connections reset or closed without an answer", d.resets));
            }
            if d.steady_max > 1.0 {
                bad(format!("{:.2}× the limit admitted in a window clear of any fault", d.steady_max));
            }
            if d.around_max > d.around_bound {
                bad(format!("{:.2}× the limit admitted in a window touching the fault (bound {:.0}×)", d.around_max, d.around_bound));
            }
            if d.rows + d.missing - d.recovered != d.records {
                bad(format!("audit: {} rows + {} missing − {} recovered ≠ {} records", d.rows, d.missing, d.recovered, d.records));
            }
            if d.wasm_failures > 0 {
                bad(format!("{} wasm failures", d.wasm_failures));
            }
            // A VM without a policy yet (a hot restart's new epoch) waits for
            // its first snapshot; the control plane answers in milliseconds.
            if let Some(n) = d.reasons.get("policy_unavailable").filter(|n| **n > 0) {
                bad(format!("{n} answers 503 policy_unavailable"));
            }
            if d.created_known_ms > 1000 || d.revoked_known_ms > 1000 {
                bad(format!("tokens known {} / {} ms after recovery (budget 1000)", d.created_known_ms, d.revoked_known_ms));
            }
        }
        out
    }

    /// `bench/drills.md`.
    pub fn markdown(&self, command: &str) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "# Failure drills under load\n");
        let _ = writeln!(s, "Generated by `{command}` (tests/src/drills.rs). Load held through every drill: {}.", self.settings);
        let _ = writeln!(s, "The mix per user: REST and MCP tool-call reads (default class), a log read, an artifact tool call, a trigger (write), an out-of-scope read (403 after the limit step), an unknown token (401) and non-MCP passthrough; one Envoy (one worker), SIGKILL for every kill. Baseline p99 before the first drill: {} ms.\n", self.baseline_p99_ms);
        let _ = writeln!(s, "| drill | requests | statuses | p99 / longest wait (ms) | over 2× deadline | resets | admitted / limit, clear windows | around the fault (bound) | 5xx by error | degraded answers | slower than the deadline | created / revoked token known after recovery (ms) | tokens made | wasm failures | Envoy RSS (MiB) |");
        let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
        for d in &self.drills {
            let statuses = d.statuses.iter().map(|(k, v)| format!("{}: {v}", if *k == 0 { "none".to_string() } else { k.to_string() })).collect::<Vec<_>>().join(", ");
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} / {} | {} | {} | {:.2} | {:.2} ({:.0}×) | {} | {} | {} | {} / {} | {} | {} | {:.1} |",
                d.name, d.requests, statuses, d.p99_ms, d.longest_ms, d.over_twice_deadline, d.resets, d.steady_max, d.around_max, d.around_bound,
                if d.reasons.is_empty() { "—".to_string() } else { d.reasons.iter().map(|(k, v)| format!("{k}: {v}")).collect::<Vec<_>>().join(", ") },
                d.degraded_decisions,
                if d.slow.is_empty() { "none".to_string() } else { d.slow.iter().map(|(k, v)| format!("{k}: {v}")).collect::<Vec<_>>().join(", ") },
                d.created_known_ms, d.revoked_known_ms, d.token_path, d.wasm_failures, d.envoy_rss_kib as f64 / 1024.0
            );
        }
        if let Some(d) = self.drills.last() {
            let _ = writeln!(
                s,
                "\nAudit after the last recovery (every stream settled in {} ms): {} rows + {} recorded missing − {} recovered = {} — records caused by the load and the harness: {} ({}).",
                d.audit_settled_ms,
                d.rows,
                d.missing,
                d.recovered,
                d.rows + d.missing - d.recovered,
                d.records,
                if d.rows + d.missing - d.recovered == d.records { "equal: nothing lost silently" } else { "NOT EQUAL" }
            );
        }
        let _ = writeln!(s, "\nEnvoy RSS: {:.1} MiB after the first calm phase, {:.1} MiB at the end.", self.envoy_rss_start_kib as f64 / 1024.0, self.envoy_rss_end_kib as f64 / 1024.0);
        let problems = self.problems();
        let _ = writeln!(s, "\nPromises broken: {}", if problems.is_empty() { "none.".to_string() } else { format!("\n\n- {}", problems.join("\n- ")) });
        let _ = writeln!(s, "\nHow to read it: a decision lies between a request's send and its answer, so \"admitted / limit\" counts only admissions proven to fall in one window of one (user, class); clear windows are those at least one window away from any fault, and around the fault the bound is the limit, or twice it while the rate-limit service is away (its admissions before the outage plus the local window's during it; README, \"Degraded mode\").");
        s
    }
}


// ---------------------------------------------------------------------------
// Soak (`make soak`): the same world and load, no faults, token churn and
// collaborator drift, sampled at a fixed interval.

/// One sample of a soak.
#[derive(Debug, Clone, Default)]
pub struct SoakSample {
    pub at_s: u64,
    pub requests_per_s: f64,
    pub p99_ms: u64,
    pub envoy_rss_kib: u64,
    /// Envoy's own heap (`server.memory_allocated`), which holds the VM.
    pub envoy_heap_kib: u64,
    pub control_plane_rss_kib: u64,
    pub redis_keys: u64,
    pub audit_queue: u64,
    pub tokens_live: i64,
}

/// The soak's samples and churn.
#[derive(Debug, Clone, Default)]
pub struct SoakReport {
    pub seconds: u64,
    pub samples: Vec<SoakSample>,
    pub tokens_created: u64,
    pub tokens_revoked: u64,
    pub drifts: u64,
    pub requests: u64,
    pub resets: u64,
    pub audit_equal: bool,
    pub audit_line: String,
}

fn rss_kib(pid: Option<u32>) -> u64 {
    let Some(pid) = pid else { return 0 };
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok()))
        .unwrap_or(0)
}

async fn cp_metric(world: &World, name: &str) -> u64 {
    let Ok(r) = RawRequest::get("/metrics").send(world.cp.internal_addr(), Duration::from_secs(5)).await else { return 0 };
    r.text()
        .lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(' ')))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

async fn redis_keys(world: &World) -> u64 {
    let Ok(client) = redis::Client::open(world.redis.url()) else { return 0 };
    let Ok(mut c) = client.get_multiplexed_async_connection().await else { return 0 };
    redis::cmd("DBSIZE").query_async::<u64>(&mut c).await.unwrap_or(0)
}

/// Runs the load for `seconds` with churn, sampling every `every`.
pub async fn soak(seconds: u64, every: Duration) -> Result<SoakReport> {
    let settings = Settings { faults: Vec::new(), calm: Duration::ZERO, ..Settings::long() };
    let world = World::start(&settings).await?;
    let load = Load::start(&world, &settings);
    let db = pool(&world.database_url).await?;
    let mut report = SoakReport { seconds, ..SoakReport::default() };
    let start = Instant::now();
    let mut last_len = 0usize;
    let mut last_at = Instant::now();
    let mut next_sample = Instant::now() + every;
    let mut live: Vec<(Uuid, String)> = Vec::new();
    let mut round = 0u64;
    while start.elapsed() < Duration::from_secs(seconds) {
        // Churn every 2 s: a token made (with a trigger grant), the oldest
        // of a user's five revoked; every 10 s a collaborator drifts.
        round += 1;
        let user = world.users.get(round as usize % world.users.len()).context("users")?.clone();
        let (id, _) = world.create_token(user.id, json!({user.project.to_string(): null})).await?;
        let grant = world.token_api(user.id, "POST", &format!("/api/v1/mcp/tokens/{id}/trigger"), None).await?;
        if (200..300).contains(&grant.status) {
            report.tokens_created += 1;
        }
        live.push((user.id, id));
        if live.iter().filter(|(u, _)| *u == user.id).count() > 5 {
            if let Some(pos) = live.iter().position(|(u, _)| *u == user.id) {
                let (u, old) = live.remove(pos);
                let del = world.token_api(u, "DELETE", &format!("/api/v1/mcp/tokens/{old}"), None).await?;
                if (200..300).contains(&del.status) {
                    report.tokens_revoked += 1;
                }
            }
        }
        if round % 5 == 0 {
            // The user leaves and rejoins the out-of-scope project.
            if round % 10 == 0 {
                infrabox_db::add_collaborator(&db, user.id, user.other_project, "Developer").await?;
            } else {
                infrabox_db::remove_collaborator(&db, user.id, user.other_project).await?;
            }
            report.drifts += 1;
        }
        if Instant::now() >= next_sample {
            next_sample += every;
            let (samples, _) = load.snapshot();
            let fresh = samples.get(last_len..).unwrap_or_default();
            let rate = fresh.len() as f64 / last_at.elapsed().as_secs_f64().max(0.001);
            let p99 = percentile(fresh.iter().map(|s| s.answered_ms - s.sent_ms).collect(), 0.99);
            last_len = samples.len();
            last_at = Instant::now();
            let tokens_live: i64 = sqlx::query("SELECT count(*) AS n FROM mcp_token WHERE revoked_at IS NULL").fetch_one(&db).await?.get("n");
            let sample = SoakSample {
                at_s: start.elapsed().as_secs(),
                requests_per_s: rate,
                p99_ms: p99,
                envoy_rss_kib: world.envoy_rss_kib(),
                envoy_heap_kib: world.envoy.stat("server.memory_allocated").unwrap_or(0) / 1024,
                control_plane_rss_kib: rss_kib(world.cp.pid()),
                redis_keys: redis_keys(&world).await,
                audit_queue: cp_metric(&world, "mcp_audit_queue_depth").await,
                tokens_live,
            };
            println!("{sample:?}");
            report.samples.push(sample);
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let (samples, resets) = load.finish().await;
    report.requests = samples.len() as u64;
    report.resets = resets;
    let records = samples.iter().filter(|s| s.audited).count() as i64 + world.extra_records.load(Ordering::Relaxed) as i64;
    let t = Instant::now();
    loop {
        let (rows, missing, recovered, _) = audit_totals(&db).await?;
        report.audit_equal = rows + missing - recovered == records;
        report.audit_line = format!("{rows} rows + {missing} missing − {recovered} recovered; {records} records caused");
        if report.audit_equal || t.elapsed() > Duration::from_secs(30) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    db.close().await;
    Ok(report)
}

impl SoakReport {
    /// The samples as CSV (for the plot).
    pub fn csv(&self) -> String {
        let mut s = String::from("at_s,requests_per_s,p99_ms,envoy_rss_mib,envoy_heap_mib,control_plane_rss_mib,redis_keys,audit_queue,tokens_live\n");
        for x in &self.samples {
            let _ = writeln!(
                s,
                "{},{:.1},{},{:.1},{:.1},{:.1},{},{},{}",
                x.at_s,
                x.requests_per_s,
                x.p99_ms,
                x.envoy_rss_kib as f64 / 1024.0,
                x.envoy_heap_kib as f64 / 1024.0,
                x.control_plane_rss_kib as f64 / 1024.0,
                x.redis_keys,
                x.audit_queue,
                x.tokens_live
            );
        }
        s
    }

    /// Growth of a figure from the first quarter of the run to the last
    /// (medians): how "flat" is judged.
    fn growth(&self, f: impl Fn(&SoakSample) -> f64) -> (f64, f64) {
        let n = self.samples.len();
        let q = (n / 4).max(1);
        let med = |v: &[SoakSample]| {
            let mut x: Vec<f64> = v.iter().map(&f).collect();
            x.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
            x.get(x.len() / 2).copied().unwrap_or(0.0)
        };
        (med(self.samples.get(..q).unwrap_or_default()), med(self.samples.get(n.saturating_sub(q)..).unwrap_or_default()))
    }

    /// `bench/soak.md`.
    pub fn markdown(&self, command: &str) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "# Soak\n");
        let _ = writeln!(
            s,
            "Generated by `{command}` (tests/src/drills.rs, `soak`): {} s of the drills' mixed load (3 users × 3 clients; window {} s) with token churn — {} tokens created with a trigger grant, {} revoked (five live per user), {} collaborator changes — and no faults. {} requests, {} connections reset. Audit: {} ({}).\n",
            self.seconds, WINDOW_SECONDS, self.tokens_created, self.tokens_revoked, self.drifts, self.requests, self.resets, self.audit_line,
            if self.audit_equal { "equal" } else { "NOT EQUAL" }
        );
        let _ = writeln!(s, "![soak](soak.png)\n");
        let _ = writeln!(s, "| figure | first quarter (median) | last quarter (median) |");
        let _ = writeln!(s, "|---|---|---|");
        let rows: [(&str, Box<dyn Fn(&SoakSample) -> f64>); 7] = [
            ("requests/s", Box::new(|x| x.requests_per_s)),
            ("p99 (ms)", Box::new(|x| x.p99_ms as f64)),
            ("Envoy RSS (MiB)", Box::new(|x| x.envoy_rss_kib as f64 / 1024.0)),
            ("Envoy heap incl. the VM (MiB)", Box::new(|x| x.envoy_heap_kib as f64 / 1024.0)),
            ("control plane RSS (MiB)", Box::new(|x| x.control_plane_rss_kib as f64 / 1024.0)),
            ("Redis keys", Box::new(|x| x.redis_keys as f64)),
            ("audit queue (rows)", Box::new(|x| x.audit_queue as f64)),
        ];
        for (name, f) in rows {
            let (a, b) = self.growth(f);
            let _ = writeln!(s, "| {name} | {a:.1} | {b:.1} |");
        }
        let _ = writeln!(s, "\nSamples: `bench/soak.csv` ({} rows).", self.samples.len());
        s
    }
}
