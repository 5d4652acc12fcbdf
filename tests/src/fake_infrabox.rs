//! The fake InfraBox API upstream — the only mock in the system — and as
//! lenient as the real one wherever the gateway relies on it
//! (`../shared/INFRABOX_API.md` §2, §8):
//!
//! - It serves the upstream paths of the gateway's route table with the JSON
//!   shapes of InfraBox master, reads users, projects, collaborators and
//!   global tokens from the database the way InfraBox does, and enforces
//!   collaborator membership and `scope_push` per request.
//! - It reads credentials like InfraBox's `get_token` behind eventlet
//!   (`mcp_filter_core::credential::reference`): repeated headers joined with
//!   `,`, `Authorization` before the cookie, `Basic` decoded by CPython's
//!   lenient base64, cookies unquoted by Werkzeug 1.0.
//! - Job resources are looked up the way InfraBox's handlers do: a console
//!   of a running job, a job's output and a job abort by job id alone
//!   (whatever project the path names); archives, test runs, tabs and badges
//!   answer `[]` and a build of another project an empty list; a build abort
//!   of another project's build is "Aborted all jobs" with nothing aborted.
//! - Build restart, job restart and job rerun answer 500 to a global token
//!   (InfraBox master treats it as a project token and fails).
//!
//! Builds and jobs live in a small in-memory model, and their ids, projects
//! and builds also in InfraBox's `build` and `job` tables (the control
//! plane's ownership check reads those). Every request is recorded before it
//! is handled; the recorder is served on a listener of its own
//! ([`FakeInfraBox::recorder_addr`]), never on the API's.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use axum::body::{Body, Bytes};
use axum::http::{header, HeaderMap, Method, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sqlx::postgres::PgPoolOptions;
use sqlx::{PgPool, Row};
use uuid::Uuid;

/// Status InfraBox answers when OPA denies a request.
pub const OPA_DENY_STATUS: u16 = 401;
/// Status the fake answers when a global token lacks `scope_push` for a write.
pub const SCOPE_DENY_STATUS: u16 = 403;

/// How to run the fake.
#[derive(Debug, Clone)]
pub struct FakeInfraBoxConfig {
    /// Database holding InfraBox's "user", project, collaborator, global_token.
    pub database_url: String,
    /// InfraBox's RSA public key (PEM) to verify JWTs. The matching private
    /// key (needed to issue global tokens) is found automatically when the
    /// pair came from [`crate::session::SigningKey`] in this process, or is
    /// passed to [`FakeInfraBox::start_with_private_key`].
    pub public_key_pem: String,
    /// Where to listen (port 0 picks one).
    pub bind: SocketAddr,
    /// Enforce authentication and authorization like InfraBox; when false
    /// every listed endpoint answers without looking at credentials.
    pub enforce_auth: bool,
}

/// One request as received.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RecordedRequest {
    /// HTTP method.
    pub method: String,
    /// Path including the query string, as received.
    pub path: String,
    /// All headers in order (values lossy UTF-8).
    pub headers: Vec<(String, String)>,
    /// Body bytes (base64 in the JSON form).
    #[serde(with = "body_base64")]
    pub body: Vec<u8>,
    /// When it was received, milliseconds since the Unix epoch.
    pub received_at_ms: u128,
}

impl RecordedRequest {
    /// Whether anything in this request could reveal an MCP secret to
    /// InfraBox: any header value or the URL holding `ib_mcp_` as sent,
    /// percent-decoded, cookie-unquoted or base64-decoded, or what
    /// InfraBox's own parsers recover from its credential headers.
    pub fn reveals_mcp_secret(&self) -> bool {
        use mcp_filter_core::credential::{self as c, reference};
        let all = |name: &str| self.header_all(name);
        c::url_reveals(self.path.as_bytes())
            || self.headers.iter().any(|(_, v)| c::contains_marker(v.as_bytes()))
            || c::authorization_reveals(all("authorization").into_iter())
            || c::authorization_reveals(all("proxy-authorization").into_iter())
            || c::cookie_reveals(all("cookie").into_iter())
            || reference::infrabox_views(&all("authorization"), &all("cookie")).iter().any(|v| c::contains_marker(v))
    }

    /// The first header named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// Every header named `name` (case-insensitive).
    pub fn header_all(&self, name: &str) -> Vec<&str> {
        self.headers.iter().filter(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str()).collect()
    }

    /// The received time as a `SystemTime`.
    pub fn received_at(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(self.received_at_ms as u64)
    }
}

mod body_base64 {
    use base64::Engine;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(body: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(body))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(d)?;
        base64::engine::general_purpose::STANDARD.decode(text).map_err(serde::de::Error::custom)
    }
}

/// A build in the in-memory model.
#[derive(Debug, Clone)]
struct BuildRecord {
    project: Uuid,
    build_number: i64,
    restart_counter: i64,
    jobs: Vec<Uuid>,
}

/// A job in the in-memory model.
#[derive(Debug, Clone)]
struct JobRecord {
    project: Uuid,
    name: String,
    state: String,
    /// The `job.console` column (a finished job's log).
    console: Option<Bytes>,
    /// Rows of the `console` table (a running job's log so far).
    live_console: Option<Bytes>,
    archive: Vec<(String, Bytes)>,
    output: Option<Bytes>,
}

#[derive(Debug, Default)]
struct Model {
    builds: HashMap<Uuid, BuildRecord>,
    /// Each project's builds by (build_number, restart_counter): what
    /// InfraBox's `ORDER BY … LIMIT` reads through an index, so a list stays
    /// as cheap with thousands of builds (a soak triggers many).
    by_project: HashMap<Uuid, std::collections::BTreeMap<(i64, i64), Uuid>>,
    jobs: HashMap<Uuid, JobRecord>,
    /// Job ids an abort was inserted for, in order (InfraBox's `abort` table).
    aborts: Vec<Uuid>,
}

/// Rows a new build adds to InfraBox's tables.
struct NewRows {
    build: Uuid,
    project: Uuid,
    build_number: i64,
    restart_counter: i64,
    jobs: Vec<(Uuid, String)>,
}

impl JobRecord {
    fn finished(job: Uuid, project: Uuid, name: String) -> Self {
        Self {
            project,
            name,
            state: "finished".into(),
            console: None,
            live_console: None,
            archive: vec![("report.xml".to_string(), Bytes::from(format!("<testsuite name=\"{job}\" tests=\"1\"/>\n")))],
            output: None,
        }
    }
}

impl Model {
    /// The builds and jobs already in InfraBox's tables (a restarted
    /// InfraBox serves what its database holds), as finished jobs.
    async fn load(pool: &PgPool) -> Self {
        let mut model = Self::default();
        let builds = sqlx::query("SELECT id, build_number, restart_counter, project_id FROM build").fetch_all(pool).await.unwrap_or_default();
        for b in builds {
            let record = BuildRecord {
                project: b.get("project_id"),
                build_number: i64::from(b.get::<i32, _>("build_number")),
                restart_counter: i64::from(b.get::<i32, _>("restart_counter")),
                jobs: Vec::new(),
            };
            model.by_project.entry(record.project).or_default().insert((record.build_number, record.restart_counter), b.get("id"));
            model.builds.insert(b.get("id"), record);
        }
        let jobs = sqlx::query("SELECT id, build_id, name, project_id FROM job ORDER BY name DESC").fetch_all(pool).await.unwrap_or_default();
        for j in jobs {
            let (id, build, project): (Uuid, Uuid, Uuid) = (j.get("id"), j.get("build_id"), j.get("project_id"));
            model.jobs.insert(id, JobRecord::finished(id, project, j.get("name")));
            if let Some(b) = model.builds.get_mut(&build) {
                b.jobs.push(id);
            }
        }
        model
    }

    fn add_build(&mut self, project: Uuid, restart_of: Option<(i64, i64)>) -> NewRows {
        let (build_number, restart_counter) = match restart_of {
            Some((number, counter)) => (number, counter + 1),
            None => {
                let next = self.by_project.get(&project).and_then(|m| m.keys().next_back()).map(|(n, _)| *n);
                (next.unwrap_or(0) + 1, 1)
            }
        };
        let build = Uuid::new_v4();
        let jobs: Vec<Uuid> = (0..2).map(|_| Uuid::new_v4()).collect();
        for (i, job) in jobs.iter().enumerate() {
            let name = if i == 0 { "Create Jobs".to_string() } else { "build".to_string() };
            self.jobs.insert(*job, JobRecord::finished(*job, project, name));
        }
        self.by_project.entry(project).or_default().insert((build_number, restart_counter), build);
        self.builds.insert(build, BuildRecord { project, build_number, restart_counter, jobs: jobs.clone() });
        let names = jobs.iter().map(|j| (*j, self.jobs.get(j).map(|r| r.name.clone()).unwrap_or_default())).collect();
        NewRows { build, project, build_number, restart_counter, jobs: names }
    }
}

/// Writes a new build's rows into InfraBox's `build` and `job` tables.
/// A project's builds, newest first.
fn newest_builds(model: &Model, project: Uuid) -> impl Iterator<Item = (&Uuid, &BuildRecord)> {
    model
        .by_project
        .get(&project)
        .into_iter()
        .flat_map(|m| m.values().rev())
        .filter_map(move |id| model.builds.get_key_value(id))
}

async fn insert_rows(pool: &PgPool, rows: &NewRows) -> Result<()> {
    sqlx::query("INSERT INTO build (id, build_number, restart_counter, project_id) VALUES ($1, $2, $3, $4)")
        .bind(rows.build)
        .bind(rows.build_number as i32)
        .bind(rows.restart_counter as i32)
        .bind(rows.project)
        .execute(pool)
        .await
        .context("inserting build")?;
    for (job, name) in &rows.jobs {
        sqlx::query(
            "INSERT INTO job (id, state, build_id, type, name, project_id, definition) \
             VALUES ($1, 'finished', $2, 'run_project_container', $3, $4, '{}'::jsonb)",
        )
        .bind(job)
        .bind(rows.build)
        .bind(name)
        .bind(rows.project)
        .execute(pool)
        .await
        .context("inserting job")?;
    }
    Ok(())
}

struct Shared {
    config: FakeInfraBoxConfig,
    pool: PgPool,
    decoding: DecodingKey,
    encoding: Option<EncodingKey>,
    /// The newest [`MAX_RECORDS`] requests (a soak sends millions).
    records: Mutex<std::collections::VecDeque<RecordedRequest>>,
    model: Mutex<Model>,
}

/// Requests the recorder keeps (the oldest go first).
const MAX_RECORDS: usize = 100_000;

/// A running fake InfraBox; the server stops when this is dropped.
pub struct FakeInfraBox {
    addr: SocketAddr,
    recorder_addr: SocketAddr,
    shared: Arc<Shared>,
    server: tokio::task::JoinHandle<()>,
    recorder: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for FakeInfraBox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeInfraBox").field("addr", &self.addr).finish_non_exhaustive()
    }
}

impl Drop for FakeInfraBox {
    fn drop(&mut self) {
        self.server.abort();
        self.recorder.abort();
    }
}

impl FakeInfraBox {
    /// Connects to the database, binds, and serves on the current tokio
    /// runtime. Global tokens are signed with the private key matching
    /// `config.public_key_pem` if a `SigningKey` of this process has it.
    pub async fn start(config: FakeInfraBoxConfig) -> Result<Self> {
        let private = crate::session::private_pem_for(&config.public_key_pem);
        Self::start_with_private_key(config, private).await
    }

    /// Like [`FakeInfraBox::start`] with an explicit private key (PEM);
    /// without one, POST /api/v1/user/global-tokens answers 500.
    pub async fn start_with_private_key(config: FakeInfraBoxConfig, private_key_pem: Option<String>) -> Result<Self> {
        let pool = PgPoolOptions::new()
            .max_connections(8)
            // InfraBox itself fails at once when its database refuses
            // connections (psycopg2); the drills set a short wait to match.
            .acquire_timeout(Duration::from_millis(
                std::env::var("FAKE_INFRABOX_DB_ACQUIRE_MS").ok().and_then(|v| v.parse().ok()).unwrap_or(10_000),
            ))
            .connect(&config.database_url)
            .await
            .context("fake InfraBox: connecting to the database")?;
        let decoding = DecodingKey::from_rsa_pem(config.public_key_pem.as_bytes()).context("parsing the public key")?;
        let encoding = match &private_key_pem {
            Some(pem) => Some(EncodingKey::from_rsa_pem(pem.as_bytes()).context("parsing the private key")?),
            None => None,
        };
        let listener = tokio::net::TcpListener::bind(config.bind)
            .await
            .with_context(|| format!("fake InfraBox: binding {}", config.bind))?;
        let addr = listener.local_addr()?;
        let model = Model::load(&pool).await;
        let shared = Arc::new(Shared {
            config,
            pool,
            decoding,
            encoding,
            records: Mutex::new(std::collections::VecDeque::new()),
            model: Mutex::new(model),
        });
        let state = shared.clone();
        let app = axum::Router::new().fallback(move |req: Request<Body>| {
            let state = state.clone();
            async move { handle(state, req).await }
        });
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        // The recorder: loopback only, never the API's port (what a gateway
        // in front could route to).
        let recorder_listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
        let recorder_addr = recorder_listener.local_addr()?;
        let state = shared.clone();
        let recorder_app = axum::Router::new().fallback(move |req: Request<Body>| {
            let state = state.clone();
            async move { recorder(state, req) }
        });
        let recorder = tokio::spawn(async move {
            let _ = axum::serve(recorder_listener, recorder_app).await;
        });
        Ok(Self { addr, recorder_addr, shared, server, recorder })
    }

    /// Where `GET`/`DELETE /__fake/requests` are served (not the API's port).
    pub fn recorder_addr(&self) -> SocketAddr {
        self.recorder_addr
    }

    /// Job ids an abort was inserted for, in order.
    pub fn aborted_jobs(&self) -> Vec<Uuid> {
        lock(&self.shared.model).aborts.clone()
    }

    /// Makes a job running with `log` so far in the `console` table (which
    /// InfraBox serves by job id alone).
    pub fn set_running_console(&self, job: Uuid, log: impl Into<Bytes>) -> bool {
        match lock(&self.shared.model).jobs.get_mut(&job) {
            Some(j) => {
                j.state = "running".into();
                j.console = None;
                j.live_console = Some(log.into());
                true
            }
            None => false,
        }
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://<addr>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every recorded request, oldest first.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        lock(&self.shared.records).iter().cloned().collect()
    }

    /// Recorded requests whose path (with query) starts with `path_prefix`.
    pub fn requests_matching(&self, path_prefix: &str) -> Vec<RecordedRequest> {
        lock(&self.shared.records).iter().filter(|r| r.path.starts_with(path_prefix)).cloned().collect()
    }

    /// Forgets the recorded requests.
    pub fn clear(&self) {
        lock(&self.shared.records).clear();
    }

    /// Adds a build with two finished jobs ("Create Jobs", "build") to
    /// `project` (which must exist in the database), in the model and in
    /// InfraBox's `build` and `job` tables; returns the ids.
    pub async fn add_build(&self, project: Uuid) -> Result<(Uuid, Vec<Uuid>)> {
        let rows = lock(&self.shared.model).add_build(project, None);
        insert_rows(&self.shared.pool, &rows).await?;
        Ok((rows.build, rows.jobs.into_iter().map(|(j, _)| j).collect()))
    }

    /// Replaces a job's console log (e.g. 20 MiB to test truncation).
    /// Returns false if the job does not exist.
    pub fn set_console(&self, job: Uuid, console: impl Into<Bytes>) -> bool {
        match lock(&self.shared.model).jobs.get_mut(&job) {
            Some(j) => {
                j.console = Some(console.into());
                true
            }
            None => false,
        }
    }

    /// Replaces a job's archive files. Returns false if the job does not exist.
    pub fn set_archive(&self, job: Uuid, files: Vec<(String, Vec<u8>)>) -> bool {
        match lock(&self.shared.model).jobs.get_mut(&job) {
            Some(j) => {
                j.archive = files.into_iter().map(|(n, b)| (n, Bytes::from(b))).collect();
                true
            }
            None => false,
        }
    }

    /// Replaces a job's output tarball. Returns false if the job does not exist.
    pub fn set_output(&self, job: Uuid, output: impl Into<Bytes>) -> bool {
        match lock(&self.shared.model).jobs.get_mut(&job) {
            Some(j) => {
                j.output = Some(output.into());
                true
            }
            None => false,
        }
    }

    /// The console a job serves (default text if none was set).
    pub fn console_of(&self, job: Uuid) -> Option<Bytes> {
        lock(&self.shared.model).jobs.get(&job).map(|j| console_bytes(job, j))
    }

    /// Builds of `project` as `(build_id, build_number, restart_counter)`, newest first.
    pub fn builds_of(&self, project: Uuid) -> Vec<(Uuid, i64, i64)> {
        let model = lock(&self.shared.model);
        let mut builds: Vec<_> = model
            .builds
            .iter()
            .filter(|(_, b)| b.project == project)
            .map(|(id, b)| (*id, b.build_number, b.restart_counter))
            .collect();
        builds.sort_by(|a, b| (b.1, b.2).cmp(&(a.1, a.2)));
        builds
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn console_bytes(job: Uuid, j: &JobRecord) -> Bytes {
    j.console.clone().unwrap_or_else(|| {
        Bytes::from(
            (1..=20).map(|i| format!("[{}] job {job} console line {i}\n", j.name)).collect::<String>(),
        )
    })
}

fn output_bytes(job: Uuid, j: &JobRecord) -> Bytes {
    j.output.clone().unwrap_or_else(|| {
        let mut bytes = vec![0x1f, 0x8b, 0x08, 0x00];
        bytes.extend_from_slice(job.as_bytes());
        bytes.extend((0u8..=255).cycle().take(1024));
        Bytes::from(bytes)
    })
}

// ---------------------------------------------------------------------------
// Request handling

fn now_ms() -> u128 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0)
}

fn message(status: u16, text: &str) -> Response {
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (code, axum::Json(json!({"message": text, "status": status}))).into_response()
}

fn ok(text: &str, data: Option<Value>) -> Response {
    let mut body = json!({"message": text, "status": 200});
    if let Some(data) = data {
        body["data"] = data;
    }
    axum::Json(body).into_response()
}

fn not_found() -> Response {
    message(404, "The requested URL was not found on the server. If you entered the URL manually please check your spelling and try again.")
}

fn binary(content_type: &'static str, bytes: Bytes) -> Response {
    ([(header::CONTENT_TYPE, content_type)], bytes).into_response()
}

/// The recorder listener: `GET`/`DELETE /__fake/requests`.
fn recorder(state: Arc<Shared>, req: Request<Body>) -> Response {
    if req.uri().path() != "/__fake/requests" {
        return not_found();
    }
    match *req.method() {
        Method::GET => axum::Json(lock(&state.records).clone()).into_response(),
        Method::DELETE => {
            lock(&state.records).clear();
            StatusCode::NO_CONTENT.into_response()
        }
        _ => message(405, "The method is not allowed for the requested URL."),
    }
}

async fn handle(state: Arc<Shared>, req: Request<Body>) -> Response {
    let (parts, body) = req.into_parts();
    let body = axum::body::to_bytes(body, usize::MAX).await.unwrap_or_default();
    let path = parts.uri.path().to_string();
    let path_and_query = parts.uri.path_and_query().map(|p| p.as_str().to_string()).unwrap_or_else(|| path.clone());

    {
        let mut records = lock(&state.records);
        if records.len() >= MAX_RECORDS {
            records.pop_front();
        }
        records.push_back(RecordedRequest {
            method: parts.method.to_string(),
            path: path_and_query.clone(),
            headers: parts
                .headers
                .iter()
                .map(|(n, v)| (n.as_str().to_string(), String::from_utf8_lossy(v.as_bytes()).into_owned()))
                .collect(),
            body: body.to_vec(),
            received_at_ms: now_ms(),
        });
    }

    let query: HashMap<String, String> = parts
        .uri
        .query()
        .map(|q| {
            q.split('&')
                .filter(|kv| !kv.is_empty())
                .map(|kv| {
                    let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                    (percent_decode(k), percent_decode(v))
                })
                .collect()
        })
        .unwrap_or_default();

    let response = match route(&state, &parts.method, &path, &parts.headers, &query, &body).await {
        Ok(resp) => resp,
        Err(err) => message(500, &format!("fake InfraBox internal error: {err:#}")),
    };
    // InfraBox's after_request hook: every request made with a global
    // token is written to global_token_access_log.
    if let Ok(Caller::Global { id, .. }) = authenticate(&state, &parts.headers).await {
        let _ = sqlx::query("INSERT INTO global_token_access_log (token_id, path, method, status_code) VALUES ($1, $2, $3, $4)")
            .bind(id)
            .bind(&path)
            .bind(parts.method.as_str())
            .bind(response.status().as_u16() as i16)
            .execute(&state.pool)
            .await;
    }
    response
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok()).and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'+', _) => out.push(b' '),
            (b'%', Some(b)) => {
                out.push(b);
                i += 2;
            }
            (b, _) => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A caller after token normalisation.
#[derive(Debug, Clone)]
enum Caller {
    Anonymous,
    User { id: Uuid, system_role: String },
    Global { id: Uuid, owner: Uuid, scope_push: bool },
    /// An `ib_mcp_` value: InfraBox's placeholder `{"type":"mcp"}`.
    Mcp,
}

impl Caller {
    fn user_id(&self) -> Option<Uuid> {
        match self {
            Caller::User { id, .. } => Some(*id),
            Caller::Global { owner, .. } => Some(*owner),
            _ => None,
        }
    }

    fn is_system_admin(&self) -> bool {
        matches!(self, Caller::User { system_role, .. } if system_role == "admin" || system_role == "devops")
    }
}

/// The credential headers as the WSGI server hands them to InfraBox.
fn header_values<'a>(headers: &'a HeaderMap, name: header::HeaderName) -> Vec<String> {
    headers.get_all(name).iter().map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned()).collect()
}

/// InfraBox's `get_token`: the raw credential (see
/// [`mcp_filter_core::credential::reference::infrabox_get_token`]) and
/// whether it came with a `token`/`bearer`/`Bearer` scheme (the only place
/// InfraBox turns an `ib_mcp_` value into its MCP placeholder).
fn extract_token(headers: &HeaderMap) -> Option<(String, bool)> {
    let auth = header_values(headers, header::AUTHORIZATION);
    let cookie = header_values(headers, header::COOKIE);
    let auth: Vec<&str> = auth.iter().map(String::as_str).collect();
    let cookie: Vec<&str> = cookie.iter().map(String::as_str).collect();
    let raw = mcp_filter_core::credential::reference::infrabox_get_token(&auth, &cookie)?;
    let joined = auth.join(",");
    let bearer_scheme = ["token ", "bearer ", "Bearer "].iter().any(|s| joined.starts_with(s));
    Some((String::from_utf8_lossy(&raw).into_owned(), bearer_scheme))
}

/// InfraBox's `normalize_token`.
async fn authenticate(state: &Shared, headers: &HeaderMap) -> Result<Caller> {
    let Some((token, bearer_scheme)) = extract_token(headers) else { return Ok(Caller::Anonymous) };
    if bearer_scheme && token.starts_with("ib_mcp_") {
        return Ok(Caller::Mcp);
    }
    let mut validation = Validation::new(Algorithm::RS256);
    validation.required_spec_claims.clear();
    validation.validate_exp = false;
    validation.validate_aud = false;
    let Ok(data) = jsonwebtoken::decode::<Value>(&token, &state.decoding, &validation) else {
        return Ok(Caller::Anonymous);
    };
    let claims = data.claims;
    match claims["type"].as_str() {
        Some("user") => {
            let Some(id) = claims["user"]["id"].as_str().and_then(|s| Uuid::parse_str(s).ok()) else {
                return Ok(Caller::Anonymous);
            };
            let row = sqlx::query(r#"SELECT to_jsonb(u)->>'role' AS role FROM "user" u WHERE id = $1"#)
                .bind(id)
                .fetch_optional(&state.pool)
                .await?;
            Ok(match row {
                Some(row) => Caller::User {
                    id,
                    system_role: row.try_get::<Option<String>, _>("role")?.unwrap_or_else(|| "user".into()),
                },
                None => Caller::Anonymous,
            })
        }
        Some("global") => {
            let Some(id) = claims["id"].as_str().and_then(|s| Uuid::parse_str(s).ok()) else {
                return Ok(Caller::Anonymous);
            };
            let row = sqlx::query("SELECT user_id, scope_push FROM global_token WHERE id = $1 AND expires_at > now()")
                .bind(id)
                .fetch_optional(&state.pool)
                .await?;
            Ok(match row {
                Some(row) => Caller::Global { id, owner: row.try_get("user_id")?, scope_push: row.try_get("scope_push")? },
                None => Caller::Anonymous,
            })
        }
        _ => Ok(Caller::Anonymous),
    }
}

#[derive(Debug, Clone)]
struct ProjectRow {
    id: Uuid,
    name: String,
    project_type: String,
    public: bool,
}

async fn load_project(pool: &PgPool, id: Uuid) -> Result<Option<ProjectRow>> {
    let row = sqlx::query("SELECT id, name, type::text AS type, public FROM project WHERE id = $1")
        .bind(id)
        .fetch_optional(pool)
        .await?;
    row.map(|r| {
        Ok(ProjectRow { id: r.try_get("id")?, name: r.try_get("name")?, project_type: r.try_get("type")?, public: r.try_get("public")? })
    })
    .transpose()
}

async fn collaborator_role(pool: &PgPool, user: Uuid, project: Uuid) -> Result<Option<String>> {
    let row = sqlx::query("SELECT role::text AS role FROM collaborator WHERE user_id = $1 AND project_id = $2")
        .bind(user)
        .bind(project)
        .fetch_optional(pool)
        .await?;
    Ok(match row {
        Some(r) => Some(r.try_get("role")?),
        None => None,
    })
}

fn project_json(p: &ProjectRow, role: Option<&str>) -> Value {
    let mut v = json!({"id": p.id, "name": p.name, "type": p.project_type, "public": p.public});
    if let Some(role) = role {
        v["userrole"] = json!(role);
    }
    v
}

/// Endpoint shapes under `/api/v1/projects/<pid>/`.
#[derive(Debug, Clone, PartialEq)]
enum ProjectEndpoint {
    Project,
    Builds,
    Build(Uuid),
    BuildJobs(Uuid),
    BuildAction(Uuid, &'static str),
    Jobs,
    JobData(Uuid, &'static str),
    ArchiveDownload(Uuid),
    JobAction(Uuid, &'static str),
    Trigger,
}

impl ProjectEndpoint {
    fn method(&self) -> Method {
        if *self == ProjectEndpoint::Trigger { Method::POST } else { Method::GET }
    }

    fn is_write(&self) -> bool {
        matches!(self, ProjectEndpoint::Trigger | ProjectEndpoint::BuildAction(..) | ProjectEndpoint::JobAction(..))
    }
}

/// `Some(Err(()))` = the shape of a project endpoint with a non-UUID id (404).
fn classify(rest: &[&str]) -> Option<Result<ProjectEndpoint, ()>> {
    let id = |s: &str| Uuid::parse_str(s).map_err(|_| ());
    let pick = |s: &str, names: &[&'static str]| names.iter().copied().find(|n| *n == s);
    Some(match rest {
        [] => Ok(ProjectEndpoint::Project),
        ["builds"] => Ok(ProjectEndpoint::Builds),
        ["builds", b] => id(b).map(ProjectEndpoint::Build),
        ["builds", b, "jobs"] => id(b).map(ProjectEndpoint::BuildJobs),
        ["builds", b, a] => {
            let action = pick(a, &["restart", "abort"])?;
            id(b).map(|b| ProjectEndpoint::BuildAction(b, action))
        }
        ["jobs"] => Ok(ProjectEndpoint::Jobs),
        ["jobs", j, "archive", "download"] => id(j).map(ProjectEndpoint::ArchiveDownload),
        ["jobs", j, what] => {
            if let Some(action) = pick(what, &["restart", "rerun", "abort"]) {
                id(j).map(|j| ProjectEndpoint::JobAction(j, action))
            } else {
                let data = pick(what, &["console", "archive", "output", "testruns", "stats", "tabs", "badges"])?;
                id(j).map(|j| ProjectEndpoint::JobData(j, data))
            }
        }
        ["trigger"] => Ok(ProjectEndpoint::Trigger),
        _ => return None,
    })
}

async fn route(
    state: &Arc<Shared>,
    method: &Method,
    path: &str,
    headers: &HeaderMap,
    query: &HashMap<String, String>,
    body: &Bytes,
) -> Result<Response> {
    let trimmed = path.trim_end_matches('/');
    let segments: Vec<&str> = trimmed.split('/').skip(1).collect();
    let enforce = state.config.enforce_auth;

    match segments.as_slice() {
        ["api", "v1", "projects"] => {
            if *method != Method::GET {
                return Ok(catch_all(method, path));
            }
            let caller = authenticate(state, headers).await?;
            let Some(user) = caller.user_id() else {
                return Ok(message(OPA_DENY_STATUS, "Unauthorized"));
            };
            let rows = sqlx::query(
                "SELECT p.id, p.name, p.type::text AS type, p.public, c.role::text AS role
                 FROM project p JOIN collaborator c ON c.project_id = p.id
                 WHERE c.user_id = $1 ORDER BY p.name",
            )
            .bind(user)
            .fetch_all(&state.pool)
            .await?;
            let mut list = Vec::new();
            for r in rows {
                let p = ProjectRow {
                    id: r.try_get("id")?,
                    name: r.try_get("name")?,
                    project_type: r.try_get("type")?,
                    public: r.try_get("public")?,
                };
                let role: String = r.try_get("role")?;
                list.push(project_json(&p, Some(&role)));
            }
            Ok(axum::Json(Value::Array(list)).into_response())
        }
        ["api", "v1", "projects", pid, rest @ ..] => {
            let Some(endpoint) = classify(rest) else { return Ok(catch_all(method, path)) };
            let (Ok(endpoint), Ok(pid)) = (endpoint, Uuid::parse_str(pid)) else { return Ok(not_found()) };
            if *method != endpoint.method() {
                return Ok(message(405, "The method is not allowed for the requested URL."));
            }
            project_endpoint(state, pid, endpoint, headers, query, body, enforce).await
        }
        ["api", "v1", "user", "global-tokens"] if *method == Method::POST => create_global_token(state, headers, body).await,
        ["api", "v1", "user", "global-tokens", id] if *method == Method::DELETE => {
            delete_global_token(state, headers, id).await
        }
        _ => Ok(catch_all(method, path)),
    }
}

fn catch_all(method: &Method, path: &str) -> Response {
    axum::Json(json!({"fake": "infrabox", "method": method.as_str(), "path": path})).into_response()
}

async fn project_endpoint(
    state: &Arc<Shared>,
    pid: Uuid,
    endpoint: ProjectEndpoint,
    headers: &HeaderMap,
    query: &HashMap<String, String>,
    body: &Bytes,
    enforce: bool,
) -> Result<Response> {
    let caller = authenticate(state, headers).await?;
    let project = load_project(&state.pool, pid).await?;
    let role = match caller.user_id() {
        Some(user) => collaborator_role(&state.pool, user, pid).await?,
        None => None,
    };

    if enforce && !caller.is_system_admin() {
        // OPA emulation (projects_*.rego): collaborators, or anyone on a public
        // project for reads; writes need a collaborator and, for a global
        // token, scope_push.
        let collaborator = role.is_some() && matches!(caller, Caller::User { .. } | Caller::Global { .. });
        let public = project.as_ref().is_some_and(|p| p.public);
        let allowed = if endpoint.is_write() {
            collaborator
        } else {
            match (&caller, &endpoint) {
                // builds/ and builds/<id>: project and global tokens only; a
                // plain user session is refused, builds/<id> is not public.
                (Caller::User { .. }, ProjectEndpoint::Builds | ProjectEndpoint::Build(_)) => false,
                (_, ProjectEndpoint::Build(_)) => collaborator,
                _ => collaborator || public,
            }
        };
        if !allowed {
            return Ok(message(OPA_DENY_STATUS, "Unauthorized"));
        }
        // OPA's `builds,_,_` rule also matches builds/<id>/abort, so a
        // global token without scope_push may abort a build (§8).
        let needs_push = endpoint.is_write() && !matches!(endpoint, ProjectEndpoint::BuildAction(_, "abort"));
        if needs_push {
            if let Caller::Global { scope_push: false, .. } = caller {
                return Ok(message(SCOPE_DENY_STATUS, "Forbidden: global token has no push scope"));
            }
        }
    }

    // Build restart and job restart/rerun treat every non-user token as a
    // project token (KeyError, or no auth_token row: TypeError) — a 500.
    if matches!(endpoint, ProjectEndpoint::BuildAction(_, "restart") | ProjectEndpoint::JobAction(_, "restart" | "rerun"))
        && matches!(caller, Caller::Global { .. })
    {
        return Ok(message(500, "Internal Server Error"));
    }

    let Some(project) = project else { return Ok(message(404, "Project not found")) };
    let (response, new_rows) = {
        let mut model = lock(&state.model);
        answer(&mut model, &project, role.as_deref(), endpoint, query, body)
    };
    if let Some(rows) = new_rows {
        insert_rows(&state.pool, &rows).await?;
    }
    Ok(response)
}

/// InfraBox's answer to a project endpoint (authorization done), and the
/// rows a new build adds.
fn answer(
    model: &mut Model,
    project: &ProjectRow,
    role: Option<&str>,
    endpoint: ProjectEndpoint,
    query: &HashMap<String, String>,
    body: &Bytes,
) -> (Response, Option<NewRows>) {
    let pid = project.id;
    let build_of = |model: &Model, bid: Uuid| model.builds.get(&bid).filter(|b| b.project == pid).cloned();
    let job_of = |model: &Model, jid: Uuid| model.jobs.get(&jid).filter(|j| j.project == pid).cloned();
    let mut new_rows = None;

    let response = match endpoint {
        ProjectEndpoint::Project => axum::Json(project_json(project, role)).into_response(),
        ProjectEndpoint::Builds => {
            let list: Vec<Value> = newest_builds(model, pid)
                .take(50)
                .map(|(id, b)| json!({"id": id, "build_number": b.build_number, "restart_counter": b.restart_counter}))
                .collect();
            axum::Json(list).into_response()
        }
        // `WHERE project_id = %s AND id = %s`: another project's build (or
        // none) is an empty list.
        ProjectEndpoint::Build(bid) => match build_of(model, bid) {
            Some(b) => axum::Json(json!([{"id": bid, "build_number": b.build_number, "restart_counter": b.restart_counter}]))
                .into_response(),
            None => axum::Json(json!([])).into_response(),
        },
        ProjectEndpoint::BuildJobs(bid) => match build_of(model, bid) {
            Some(b) => {
                let jobs: Vec<Value> = b
                    .jobs
                    .iter()
                    .filter_map(|jid| model.jobs.get(jid).map(|j| (jid, j)))
                    .map(|(jid, j)| job_model_json(*jid, j, &b))
                    .collect();
                axum::Json(jobs).into_response()
            }
            None => axum::Json(json!([])).into_response(),
        },
        ProjectEndpoint::Jobs => {
            let mut list = Vec::new();
            for (bid, b) in newest_builds(model, pid).take(10) {
                for jid in &b.jobs {
                    if let Some(j) = model.jobs.get(jid) {
                        list.push(json!({
                            "build": {"id": bid, "build_number": b.build_number, "restart_counter": b.restart_counter, "is_cronjob": false},
                            "project": {"id": project.id, "name": project.name, "type": project.project_type},
                            "commit": null,
                            "pull_request": null,
                            "source_upload": null,
                            "job": {
                                "id": jid, "state": j.state, "start_date": "2026-01-01T00:00:00+00:00",
                                "end_date": "2026-01-01T00:01:00+00:00", "name": j.name, "cluster_name": "master",
                                "dependencies": [], "created_at": "2026-01-01T00:00:00+00:00", "message": null,
                                "definition": {"name": j.name, "type": "docker"}, "node_name": "node-1",
                                "avg_cpu": 0.5, "restarted": false
                            }
                        }));
                    }
                }
            }
            axum::Json(list).into_response()
        }
        ProjectEndpoint::JobData(jid, what) => {
            let own = job_of(model, jid);
            match (what, own) {
                // console: job.console within the project, else the console
                // table by job id alone.
                ("console", Some(j)) if j.console.is_some() || j.live_console.is_none() => {
                    binary("text/plain; charset=utf-8", console_bytes(jid, &j))
                }
                ("console", _) => match model.jobs.get(&jid).and_then(|j| j.live_console.clone()) {
                    Some(log) => binary("text/plain; charset=utf-8", log),
                    None => axum::Json(json!("")).into_response(),
                },
                // output: storage by job id alone.
                ("output", _) => match model.jobs.get(&jid) {
                    Some(j) => binary("application/gzip", output_bytes(jid, j)),
                    None => not_found(),
                },
                ("stats", None) => not_found(),
                // archive, testruns, tabs, badges: `WHERE id AND project_id`.
                (_, None) => axum::Json(json!([])).into_response(),
                ("archive", Some(j)) => axum::Json(
                    j.archive.iter().map(|(name, b)| json!({"filename": name, "size": b.len()})).collect::<Vec<_>>(),
                )
                .into_response(),
                ("testruns", Some(_)) => axum::Json(json!([
                    {"state": "ok", "name": "test_login", "suite": "auth", "duration": 12, "message": "", "stack": "", "timestamp": "2026-01-01T00:00:30+00:00"},
                    {"state": "failure", "name": "test_logout", "suite": "auth", "duration": 7, "message": "assert", "stack": "Traceback", "timestamp": "2026-01-01T00:00:31+00:00"}
                ]))
                .into_response(),
                ("stats", Some(j)) => axum::Json(json!({j.name.clone(): [
                    {"cpu": 12.5, "mem": 104857600, "date": 1767225600},
                    {"cpu": 40.0, "mem": 209715200, "date": 1767225610}
                ]}))
                .into_response(),
                ("tabs", Some(_)) => axum::Json(json!([{"name": "Summary", "data": "{\"type\":\"group\",\"elements\":[]}", "type": "markup"}]))
                    .into_response(),
                ("badges", Some(_)) => axum::Json(json!([{"subject": "coverage", "status": "87%", "color": "green"}])).into_response(),
                _ => not_found(),
            }
        }
        ProjectEndpoint::ArchiveDownload(jid) => match (job_of(model, jid), query.get("filename")) {
            (_, None) | (None, _) => not_found(),
            (Some(j), Some(filename)) => match j.archive.iter().find(|(n, _)| n == filename) {
                Some((_, bytes)) => binary("application/octet-stream", bytes.clone()),
                None => not_found(),
            },
        },
        ProjectEndpoint::Trigger => {
            let parsed: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
            if parsed.get("branch_or_sha").and_then(Value::as_str).is_none() {
                return (message(400, "Input payload validation failed: 'branch_or_sha' is a required property"), None);
            }
            let rows = model.add_build(pid, None);
            let response = ok("Build triggered", Some(json!({"build": {"id": rows.build, "build_number": rows.build_number, "restartCounter": 1}})));
            new_rows = Some(rows);
            response
        }
        // Abort: `SELECT id FROM job WHERE build_id AND project_id`, one
        // abort per job found: another project's build aborts nothing.
        ProjectEndpoint::BuildAction(bid, "abort") => {
            if let Some(b) = build_of(model, bid) {
                for jid in &b.jobs {
                    if let Some(j) = model.jobs.get_mut(jid) {
                        j.state = "killed".into();
                    }
                    model.aborts.push(*jid);
                }
            }
            ok("Aborted all jobs", None)
        }
        ProjectEndpoint::BuildAction(bid, action) => {
            let Some(b) = build_of(model, bid) else { return (not_found(), None) };
            match action {
                "restart" => {
                    let counter = model
                        .builds
                        .values()
                        .filter(|x| x.project == pid && x.build_number == b.build_number)
                        .map(|x| x.restart_counter)
                        .max()
                        .unwrap_or(b.restart_counter);
                    let rows = model.add_build(pid, Some((b.build_number, counter)));
                    let response = ok("Restarted", Some(json!({"build": {"id": rows.build, "restartCounter": counter + 1}})));
                    new_rows = Some(rows);
                    response
                }
                _ => not_found(),
            }
        }
        // Abort: `INSERT INTO abort(job_id, …)` for any job id, whatever
        // project the path names.
        ProjectEndpoint::JobAction(jid, "abort") => {
            if let Some(j) = model.jobs.get_mut(&jid) {
                j.state = "killed".into();
            }
            model.aborts.push(jid);
            ok("Successfully aborted job", None)
        }
        ProjectEndpoint::JobAction(jid, action) => {
            if job_of(model, jid).is_none() {
                return (not_found(), None);
            }
            if let Some(j) = model.jobs.get_mut(&jid) {
                j.state = "queued".into();
            }
            match action {
                "restart" => ok("Successfully restarted job", None),
                _ => ok("Successfully started rerun", None),
            }
        }
    };
    (response, new_rows)
}

fn job_model_json(jid: Uuid, j: &JobRecord, b: &BuildRecord) -> Value {
    let depends_on: Vec<Value> = if j.name == "Create Jobs" {
        vec![]
    } else {
        b.jobs
            .first()
            .map(|first| vec![json!({"on": ["finished"], "job": "Create Jobs", "job-id": first})])
            .unwrap_or_default()
    };
    json!({
        "id": jid, "name": j.name, "type": "run_project_container", "state": j.state,
        "start_date": "2026-01-01T00:00:00+00:00", "end_date": "2026-01-01T00:01:00+00:00",
        "resources": {"limits": {"cpu": 1, "memory": 1024}}, "message": null,
        "docker_file": "Dockerfile", "depends_on": depends_on
    })
}

#[derive(Deserialize)]
struct GlobalTokenRequest {
    description: Option<String>,
    scope_push: Option<bool>,
    scope_pull: Option<bool>,
    expires_days: Option<i64>,
}

async fn session_user(state: &Shared, headers: &HeaderMap) -> Result<Option<(Uuid, String)>> {
    Ok(match authenticate(state, headers).await? {
        Caller::User { id, system_role } => Some((id, system_role)),
        _ => None,
    })
}

async fn create_global_token(state: &Arc<Shared>, headers: &HeaderMap, body: &Bytes) -> Result<Response> {
    let Some((user, _role)) = session_user(state, headers).await? else {
        return Ok(message(OPA_DENY_STATUS, "Unauthorized"));
    };
    let Ok(req) = serde_json::from_slice::<GlobalTokenRequest>(body) else {
        return Ok(message(400, "Input payload validation failed"));
    };
    let Some(description) = req.description.filter(|d| !d.trim().is_empty()) else {
        return Ok(message(400, "description is required"));
    };
    let expires_days = req.expires_days.unwrap_or(365);
    if !(1..=3650).contains(&expires_days) {
        return Ok(message(400, "expires_days must be between 1 and 3650"));
    }
    let Some(encoding) = &state.encoding else {
        return Ok(message(500, "fake InfraBox has no private key configured"));
    };
    let scope_push = req.scope_push.unwrap_or(false);
    let scope_pull = req.scope_pull.unwrap_or(true);
    let id = Uuid::new_v4();
    sqlx::query(
        "INSERT INTO global_token (id, description, scope_push, scope_pull, user_id, expires_at)
         VALUES ($1, $2, $3, $4, $5, now() + make_interval(days => $6))",
    )
    .bind(id)
    .bind(&description)
    .bind(scope_push)
    .bind(scope_pull)
    .bind(user)
    .bind(expires_days as i32)
    .execute(&state.pool)
    .await?;
    let token = jsonwebtoken::encode(
        &Header::new(Algorithm::RS256),
        &json!({"id": id.to_string(), "type": "global"}),
        encoding,
    )?;
    Ok(axum::Json(json!({
        "id": id, "token": token, "description": description,
        "scope_push": scope_push, "scope_pull": scope_pull, "expires_days": expires_days
    }))
    .into_response())
}

async fn delete_global_token(state: &Arc<Shared>, headers: &HeaderMap, id: &str) -> Result<Response> {
    let Some((user, _)) = session_user(state, headers).await? else {
        return Ok(message(OPA_DENY_STATUS, "Unauthorized"));
    };
    let Ok(id) = Uuid::parse_str(id) else { return Ok(message(404, "Token not found")) };
    let done = sqlx::query("DELETE FROM global_token WHERE id = $1 AND user_id = $2")
        .bind(id)
        .bind(user)
        .execute(&state.pool)
        .await?;
    Ok(if done.rows_affected() == 1 { ok("Token deleted", None) } else { message(404, "Token not found") })
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (n, v) in pairs {
            h.append(*n, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    fn token(h: &HeaderMap) -> Option<String> {
        extract_token(h).map(|(t, _)| t)
    }

    #[test]
    fn token_extraction_follows_infrabox() {
        use base64::Engine;
        let basic = base64::engine::general_purpose::STANDARD.encode("infrabox:jwt1");
        assert_eq!(token(&headers(&[("authorization", &format!("Basic {basic}"))])).as_deref(), Some("jwt1"));
        // Lenient like CPython's b64decode: junk skipped, padding optional
        // after a complete quad, trailing input after the pad ignored.
        let junk: String = basic.chars().flat_map(|c| [c, '!']).collect();
        assert_eq!(token(&headers(&[("authorization", &format!("Basic {junk}"))])).as_deref(), Some("jwt1"));
        assert_eq!(token(&headers(&[("authorization", "token a")])).as_deref(), Some("a"));
        assert_eq!(token(&headers(&[("authorization", "bearer b")])).as_deref(), Some("b"));
        assert_eq!(token(&headers(&[("authorization", "Bearer c")])).as_deref(), Some("c"));
        assert_eq!(token(&headers(&[("authorization", "BEARER c")])), None);
        // Repeated headers are joined with "," as eventlet does.
        assert_eq!(token(&headers(&[("authorization", "Bearer c"), ("authorization", "Bearer d")])).as_deref(), Some("c,Bearer"));
        // The cookie only counts when Authorization is absent.
        assert_eq!(token(&headers(&[("authorization", "Digest x"), ("cookie", "token=k")])), None);
        assert_eq!(token(&headers(&[("cookie", "a=1; token=k; b=2")])).as_deref(), Some("k"));
        // Werkzeug unquotes a quoted cookie value.
        assert_eq!(token(&headers(&[("cookie", r#"token="k\145y""#)])).as_deref(), Some("key"));
        assert_eq!(extract_token(&headers(&[("authorization", "bearer ib_mcp_x")])).map(|(_, b)| b), Some(true));
    }

    #[test]
    fn classifies_project_paths() {
        let j = Uuid::new_v4();
        let js = j.to_string();
        assert_eq!(classify(&[]), Some(Ok(ProjectEndpoint::Project)));
        assert_eq!(classify(&["jobs", &js, "rerun"]), Some(Ok(ProjectEndpoint::JobAction(j, "rerun"))));
        assert_eq!(classify(&["jobs", &js, "archive", "download"]), Some(Ok(ProjectEndpoint::ArchiveDownload(j))));
        assert_eq!(classify(&["jobs", "nope", "console"]), Some(Err(())));
        assert_eq!(classify(&["cronjobs"]), None);
        assert!(ProjectEndpoint::BuildAction(j, "abort").is_write());
        assert_eq!(ProjectEndpoint::Trigger.method(), Method::POST);
    }

    #[test]
    fn decodes_query_values() {
        assert_eq!(percent_decode("a%20b+c%2Fd"), "a b c/d");
        assert_eq!(percent_decode("100%"), "100%");
    }
}
