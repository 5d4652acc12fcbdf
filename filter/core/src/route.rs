//! The route table (DESIGN §5): which MCP requests exist and what InfraBox
//! request each becomes. Data, not code: [`RouteTable::default`] is the
//! compiled-in table and [`RouteTable::from_specs`] validates an override
//! from the plugin configuration.

use serde::{Deserialize, Serialize};

use crate::path::is_uuid;

/// Rate-limit class of a route (DESIGN §9).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum Class {
    Log,
    Artifact,
    Write,
    Default,
}

impl Class {
    pub const ALL: [Class; 4] = [Class::Log, Class::Artifact, Class::Write, Class::Default];

    pub fn as_str(self) -> &'static str {
        match self {
            Class::Log => "log",
            Class::Artifact => "artifact",
            Class::Write => "write",
            Class::Default => "default",
        }
    }
}

/// Whether a route reads or changes InfraBox state; `write` routes need
/// `allow_trigger` and use the user's write credential.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Read,
    Write,
}

/// How the upstream response is shaped before it reaches the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Shaping {
    #[default]
    None,
    /// Keep only the token's effective projects in the JSON list.
    ProjectList,
    /// Return at most `max_log_bytes` from the end.
    LogTail,
}

/// One row of the table as written in configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteSpec {
    pub name: String,
    pub method: String,
    /// Relative to `/api/v1/mcp`, with `{project}`, `{build}`, `{job}`.
    pub path: String,
    pub upstream_method: String,
    /// Absolute upstream path with the same placeholders.
    pub upstream_path: String,
    pub class: Class,
    pub kind: Kind,
    #[serde(default)]
    pub shaping: Shaping,
    /// Why InfraBox cannot serve this route with any credential the gateway
    /// may hold; such a route answers 501 `not_supported_upstream` with this
    /// text, nothing forwarded. `None`: available.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unavailable: Option<String>,
}

/// A path parameter. Every one is a lowercase UUID.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Param {
    Project,
    Build,
    Job,
}

impl Param {
    fn parse(s: &str) -> Option<Self> {
        match s {
            "{project}" => Some(Param::Project),
            "{build}" => Some(Param::Build),
            "{job}" => Some(Param::Job),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    Param(Param),
}

/// Values of the path parameters of a matched request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Params {
    pub project: Option<String>,
    pub build: Option<String>,
    pub job: Option<String>,
}

impl Params {
    fn get(&self, p: Param) -> Option<&str> {
        match p {
            Param::Project => self.project.as_deref(),
            Param::Build => self.build.as_deref(),
            Param::Job => self.job.as_deref(),
        }
    }

    fn set(&mut self, p: Param, v: &str) {
        let slot = match p {
            Param::Project => &mut self.project,
            Param::Build => &mut self.build,
            Param::Job => &mut self.job,
        };
        *slot = Some(v.to_string());
    }
}

/// A validated route.
#[derive(Debug, Clone)]
pub struct Route {
    pub spec: RouteSpec,
    segments: Vec<Segment>,
    upstream: Vec<Segment>,
}

impl Route {
    pub fn name(&self) -> &str {
        &self.spec.name
    }
    pub fn class(&self) -> Class {
        self.spec.class
    }
    pub fn kind(&self) -> Kind {
        self.spec.kind
    }
    pub fn shaping(&self) -> Shaping {
        self.spec.shaping
    }
    /// Why InfraBox cannot serve it, if it cannot.
    pub fn unavailable(&self) -> Option<&str> {
        self.spec.unavailable.as_deref()
    }
    pub fn upstream_method(&self) -> &str {
        &self.spec.upstream_method
    }

    /// The upstream path for `params`, with `query` appended on read routes.
    pub fn upstream_path(&self, params: &Params, query: Option<&str>) -> String {
        let mut out = String::with_capacity(self.spec.upstream_path.len() + 80);
        for seg in &self.upstream {
            out.push('/');
            match seg {
                Segment::Literal(l) => out.push_str(l),
                Segment::Param(p) => out.push_str(params.get(*p).unwrap_or_default()),
            }
        }
        if self.spec.upstream_path.ends_with('/') && self.spec.upstream_path.len() > 1 {
            out.push('/');
        }
        if self.spec.kind == Kind::Read {
            if let Some(q) = query.filter(|q| !q.is_empty()) {
                out.push('?');
                out.push_str(q);
            }
        }
        out
    }

    fn matches(&self, segs: &[&str]) -> bool {
        self.segments.len() == segs.len()
            && self.segments.iter().zip(segs).all(|(s, v)| match s {
                Segment::Literal(l) => l == v,
                Segment::Param(_) => true,
            })
    }
}

/// Why a route table was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteTableError(pub String);

impl std::fmt::Display for RouteTableError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "invalid route table: {}", self.0)
    }
}

impl std::error::Error for RouteTableError {}

/// The result of looking a request up in the table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// The route at this index, with its parameters.
    Found { route: usize, params: Params },
    /// The path exists, but not for this method; `allow` lists the methods.
    MethodNotAllowed { allow: String },
    /// No route has this path.
    NotFound,
    /// A route has this path but a parameter is not a lowercase UUID.
    BadId(&'static str),
}

/// The table of MCP routes.
#[derive(Debug, Clone)]
pub struct RouteTable {
    routes: Vec<Route>,
}

impl Default for RouteTable {
    fn default() -> Self {
        // The default rows are validated by a unit test; should they ever be
        // invalid, an empty table (every MCP path 404) is the safe result.
        Self::from_specs(default_specs()).unwrap_or(Self { routes: Vec::new() })
    }
}

impl RouteTable {
    /// Validates and compiles a table.
    pub fn from_specs(specs: Vec<RouteSpec>) -> Result<Self, RouteTableError> {
        if specs.is_empty() {
            return Err(RouteTableError("the table has no routes".into()));
        }
        let mut routes: Vec<Route> = Vec::with_capacity(specs.len());
        for spec in specs {
            let route = compile(spec)?;
            if let Some(other) = routes.iter().find(|r| r.spec.name == route.spec.name) {
                return Err(RouteTableError(format!("route name {:?} is used twice", other.spec.name)));
            }
            if let Some(other) = routes
                .iter()
                .find(|r| r.spec.method == route.spec.method && r.segments == route.segments)
            {
                return Err(RouteTableError(format!(
                    "routes {:?} and {:?} have the same method and path",
                    other.spec.name, route.spec.name
                )));
            }
            routes.push(route);
        }
        Ok(Self { routes })
    }

    /// Makes the named routes available (an operator whose InfraBox serves
    /// them); an unknown name is refused.
    pub fn enable(&mut self, names: &[String]) -> Result<(), RouteTableError> {
        for name in names {
            let route = self
                .routes
                .iter_mut()
                .find(|r| r.spec.name == *name)
                .ok_or_else(|| RouteTableError(format!("enable_routes names no route {name:?}")))?;
            route.spec.unavailable = None;
        }
        Ok(())
    }

    /// Parses a JSON array of [`RouteSpec`] and validates it.
    pub fn from_json(json: &serde_json::Value) -> Result<Self, RouteTableError> {
        let specs: Vec<RouteSpec> =
            serde_json::from_value(json.clone()).map_err(|e| RouteTableError(e.to_string()))?;
        Self::from_specs(specs)
    }

    pub fn get(&self, index: usize) -> Option<&Route> {
        self.routes.get(index)
    }

    pub fn routes(&self) -> &[Route] {
        &self.routes
    }

    /// Looks up `method` and `rest` (the canonical path after `/api/v1/mcp`).
    pub fn lookup(&self, method: &str, rest: &str) -> Lookup {
        let segs: Vec<&str> = rest.split('/').skip(1).collect();
        let mut allow: Vec<&str> = Vec::new();
        let mut found = None;
        for (i, r) in self.routes.iter().enumerate() {
            if !r.matches(&segs) {
                continue;
            }
            for (s, v) in r.segments.iter().zip(&segs) {
                if matches!(s, Segment::Param(_)) && !is_uuid(v) {
                    return Lookup::BadId("path ids must be lowercase UUIDs");
                }
            }
            if r.spec.method == method {
                found.get_or_insert(i);
            } else if !allow.contains(&r.spec.method.as_str()) {
                allow.push(&r.spec.method);
            }
        }
        match found.and_then(|i| self.routes.get(i).map(|r| (i, r))) {
            Some((route, r)) => {
                let mut params = Params::default();
                for (s, v) in r.segments.iter().zip(&segs) {
                    if let Segment::Param(p) = s {
                        params.set(*p, v);
                    }
                }
                Lookup::Found { route, params }
            }
            None if allow.is_empty() => Lookup::NotFound,
            None => {
                allow.sort_unstable();
                Lookup::MethodNotAllowed { allow: allow.join(", ") }
            }
        }
    }
}

fn compile(spec: RouteSpec) -> Result<Route, RouteTableError> {
    let err = |m: String| RouteTableError(format!("route {:?}: {m}", spec.name));
    if spec.name.is_empty() || !spec.name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.') {
        return Err(err("name must be non-empty [A-Za-z0-9_.]".into()));
    }
    for m in [&spec.method, &spec.upstream_method] {
        if !matches!(m.as_str(), "GET" | "POST" | "PUT" | "PATCH" | "DELETE" | "HEAD") {
            return Err(err(format!("unsupported method {m:?}")));
        }
    }
    let segments = parse_segments(&spec.path).map_err(|m| err(format!("path: {m}")))?;
    if !spec.upstream_path.starts_with("/api/") {
        return Err(err("upstream_path must start with /api/".into()));
    }
    let upstream = parse_segments(spec.upstream_path.trim_end_matches('/')).map_err(|m| err(format!("upstream_path: {m}")))?;
    let params: Vec<Param> = segments.iter().filter_map(param_of).collect();
    for (i, p) in params.iter().enumerate() {
        if params.iter().skip(i + 1).any(|q| q == p) {
            return Err(err(format!("parameter {p:?} appears twice")));
        }
    }
    if (params.contains(&Param::Build) || params.contains(&Param::Job)) && !params.contains(&Param::Project) {
        return Err(err("a build or job route must also name {project}".into()));
    }
    for p in upstream.iter().filter_map(param_of) {
        if !params.contains(&p) {
            return Err(err(format!("upstream uses {p:?}, which the path does not bind")));
        }
    }
    if spec.kind == Kind::Write && spec.method == "GET" {
        return Err(err("a write route must not be a GET on the MCP surface".into()));
    }
    if spec.unavailable.as_deref().is_some_and(|u| u.trim().is_empty() || u.len() > 512) {
        return Err(err("unavailable must say in 1-512 bytes what InfraBox lacks".into()));
    }
    Ok(Route { spec, segments, upstream })
}

fn param_of(s: &Segment) -> Option<Param> {
    match s {
        Segment::Param(p) => Some(*p),
        Segment::Literal(_) => None,
    }
}

fn parse_segments(path: &str) -> Result<Vec<Segment>, String> {
    let Some(rest) = path.strip_prefix('/') else {
        return Err("must start with /".into());
    };
    rest.split('/')
        .map(|s| {
            if let Some(p) = Param::parse(s) {
                Ok(Segment::Param(p))
            } else if s.is_empty() || s.contains(['{', '}']) || crate::path::check_canonical(&format!("/{s}")).is_err() {
                Err(format!("invalid segment {s:?}"))
            } else {
                Ok(Segment::Literal(s.to_string()))
            }
        })
        .collect()
}

/// The rows of DESIGN §5.
pub fn default_specs() -> Vec<RouteSpec> {
    use Class::{Artifact, Default, Log};
    use Kind::Read;
    const P: &str = "/api/v1/projects";
    /// (name, method, path, upstream method, upstream path, class, kind, shaping)
    type Row = (String, &'static str, String, &'static str, String, Class, Kind, Shaping);
    let mut rows: Vec<Row> = vec![
        ("projects.list".into(), "GET", "/projects".into(), "GET", format!("{P}/"), Default, Read, Shaping::ProjectList),
        ("projects.get".into(), "GET", "/projects/{project}".into(), "GET", format!("{P}/{{project}}"), Default, Read, Shaping::None),
        ("builds.list".into(), "GET", "/projects/{project}/builds".into(), "GET", format!("{P}/{{project}}/builds/"), Default, Read, Shaping::None),
        ("builds.get".into(), "GET", "/projects/{project}/builds/{build}".into(), "GET", format!("{P}/{{project}}/builds/{{build}}"), Default, Read, Shaping::None),
        ("builds.jobs".into(), "GET", "/projects/{project}/builds/{build}/jobs".into(), "GET", format!("{P}/{{project}}/builds/{{build}}/jobs"), Default, Read, Shaping::None),
        ("jobs.list".into(), "GET", "/projects/{project}/jobs".into(), "GET", format!("{P}/{{project}}/jobs/"), Default, Read, Shaping::None),
        ("jobs.log".into(), "GET", "/projects/{project}/jobs/{job}/log".into(), "GET", format!("{P}/{{project}}/jobs/{{job}}/console"), Log, Read, Shaping::LogTail),
        ("jobs.artifacts".into(), "GET", "/projects/{project}/jobs/{job}/artifacts".into(), "GET", format!("{P}/{{project}}/jobs/{{job}}/archive"), Artifact, Read, Shaping::None),
        ("jobs.artifacts.download".into(), "GET", "/projects/{project}/jobs/{job}/artifacts/download".into(), "GET", format!("{P}/{{project}}/jobs/{{job}}/archive/download"), Artifact, Read, Shaping::None),
        ("jobs.output".into(), "GET", "/projects/{project}/jobs/{job}/output".into(), "GET", format!("{P}/{{project}}/jobs/{{job}}/output"), Artifact, Read, Shaping::None),
        ("projects.trigger".into(), "POST", "/projects/{project}/trigger".into(), "POST", format!("{P}/{{project}}/trigger"), Class::Write, Kind::Write, Shaping::None),
    ];
    for leaf in ["testruns", "stats", "tabs", "badges"] {
        rows.push((format!("jobs.{leaf}"), "GET", format!("/projects/{{project}}/jobs/{{job}}/{leaf}"), "GET", format!("{P}/{{project}}/jobs/{{job}}/{leaf}"), Default, Read, Shaping::None));
    }
    for action in ["restart", "abort"] {
        rows.push((format!("builds.{action}"), "POST", format!("/projects/{{project}}/builds/{{build}}/{action}"), "GET", format!("{P}/{{project}}/builds/{{build}}/{action}"), Class::Write, Kind::Write, Shaping::None));
    }
    for action in ["restart", "rerun", "abort"] {
        rows.push((format!("jobs.{action}"), "POST", format!("/projects/{{project}}/jobs/{{job}}/{action}"), "GET", format!("{P}/{{project}}/jobs/{{job}}/{action}"), Class::Write, Kind::Write, Shaping::None));
    }
    rows.into_iter()
        .map(|(name, method, path, upstream_method, upstream_path, class, kind, shaping)| RouteSpec {
            unavailable: unavailable_upstream(&name).map(str::to_string),
            name,
            method: method.into(),
            path,
            upstream_method: upstream_method.into(),
            upstream_path,
            class,
            kind,
            shaping,
        })
        .collect()
}

/// What InfraBox master lacks for the routes it cannot serve with a
/// global token (`INFRABOX_API.md` §8: HTTP 500 to every global token;
/// only a user's session works, which the gateway never holds).
fn unavailable_upstream(name: &str) -> Option<&'static str> {
    match name {
        "builds.restart" => Some(
            "InfraBox cannot restart a build for the gateway: its build restart handler (projects/build.py) treats every \
             token but a user session as a project token and fails (HTTP 500) for the per-user global token the gateway \
             uses. Restart the build from the InfraBox dashboard, or trigger a new build.",
        ),
        "jobs.restart" | "jobs.rerun" => Some(
            "InfraBox cannot restart or rerun a job for the gateway: its job restart/rerun handlers (projects/jobs.py) look \
             the caller up as a project token and fail (HTTP 500) for the per-user global token the gateway uses. Restart \
             the job from the InfraBox dashboard, or trigger a new build.",
        ),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(all(target_family = "wasm", target_os = "unknown"))]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    const PID: &str = "0b7a4c2e-1f3d-4c5b-9a8e-7d6c5b4a3f21";
    const JID: &str = "1b7a4c2e-1f3d-4c5b-9a8e-7d6c5b4a3f21";

    type TestResult<T = ()> = Result<T, Box<dyn std::error::Error>>;

    /// Why a table was refused (an error if it was accepted).
    fn refusal(specs: Vec<RouteSpec>) -> TestResult<String> {
        match RouteTable::from_specs(specs) {
            Ok(_) => Err("accepted".into()),
            Err(e) => Ok(e.0),
        }
    }

    #[test]
    fn default_table_is_valid_and_complete() -> TestResult {
        let specs = default_specs();
        assert_eq!(specs.len(), 20);
        let unavailable: Vec<&str> = specs.iter().filter(|s| s.unavailable.is_some()).map(|s| s.name.as_str()).collect();
        assert_eq!(unavailable, ["builds.restart", "jobs.restart", "jobs.rerun"]);
        let t = RouteTable::from_specs(specs)?;
        assert_eq!(RouteTable::default().routes().len(), 20);
        assert!(t.routes().iter().filter(|r| r.kind() == Kind::Write).all(|r| r.class() == Class::Write));
        Ok(())
    }

    #[test]
    fn lookup_maps_paths() -> TestResult {
        let t = RouteTable::default();
        let Lookup::Found { route, params } = t.lookup("GET", &format!("/projects/{PID}/jobs/{JID}/log")) else {
            return Err("jobs.log not found".into());
        };
        let r = t.get(route).ok_or("no such route")?;
        assert_eq!(r.name(), "jobs.log");
        assert_eq!(r.upstream_path(&params, Some("a=1")), format!("/api/v1/projects/{PID}/jobs/{JID}/console?a=1"));
        let Lookup::Found { route, params } = t.lookup("GET", "/projects") else { return Err("projects not found".into()) };
        assert_eq!(t.get(route).ok_or("no such route")?.upstream_path(&params, None), "/api/v1/projects/");
        let Lookup::Found { route, params } = t.lookup("POST", &format!("/projects/{PID}/jobs/{JID}/rerun")) else {
            return Err("rerun not found".into());
        };
        let r = t.get(route).ok_or("no such route")?;
        assert_eq!(r.upstream_method(), "GET");
        assert_eq!(r.upstream_path(&params, Some("x=1")), format!("/api/v1/projects/{PID}/jobs/{JID}/rerun"));
        Ok(())
    }

    #[test]
    fn lookup_errors() -> TestResult {
        let t = RouteTable::default();
        assert_eq!(
            t.lookup("GET", &format!("/projects/{PID}/trigger")),
            Lookup::MethodNotAllowed { allow: "POST".into() }
        );
        assert_eq!(
            t.lookup("DELETE", &format!("/projects/{PID}")),
            Lookup::MethodNotAllowed { allow: "GET".into() }
        );
        assert_eq!(t.lookup("GET", "/nope"), Lookup::NotFound);
        assert_eq!(t.lookup("GET", ""), Lookup::NotFound);
        assert!(matches!(t.lookup("GET", "/projects/not-a-uuid"), Lookup::BadId(_)));
        assert!(matches!(t.lookup("GET", &format!("/projects/{}", PID.to_uppercase())), Lookup::BadId(_)));
        Ok(())
    }

    #[test]
    fn invalid_tables_are_refused_with_a_reason() -> TestResult {
        let mut dup = default_specs();
        dup.push(dup[0].clone());
        assert!(refusal(dup)?.contains("twice"));
        let mut bad = default_specs();
        bad[1].upstream_path = "/api/v1/projects/{job}".into();
        assert!(refusal(bad)?.contains("does not bind"));
        let mut bad = default_specs();
        bad[1].path = "projects".into();
        assert!(RouteTable::from_specs(bad).is_err());
        assert!(RouteTable::from_specs(vec![]).is_err());
        assert!(RouteTable::from_json(&serde_json::json!([{"name": "x"}])).is_err());
        let json = serde_json::to_value(default_specs())?;
        assert_eq!(RouteTable::from_json(&json)?.routes().len(), 20);
        let mut bad = default_specs();
        bad[0].unavailable = Some("  ".into());
        assert!(refusal(bad)?.contains("unavailable"));
        Ok(())
    }

    #[test]
    fn routes_are_switched_on_by_name() -> TestResult {
        let mut t = RouteTable::default();
        t.enable(&["jobs.rerun".to_string()])?;
        let by = |t: &RouteTable, n: &str| t.routes().iter().find(|r| r.name() == n).and_then(|r| r.unavailable().map(str::to_string));
        assert_eq!(by(&t, "jobs.rerun"), None);
        assert!(by(&t, "jobs.restart").is_some_and(|m| m.contains("dashboard")));
        assert!(t.enable(&["jobs.nope".to_string()]).is_err());
        Ok(())
    }
}
