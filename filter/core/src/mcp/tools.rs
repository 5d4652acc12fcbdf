//! The tool table (DESIGN §15): one tool per available route, derived from
//! the route table at every call, so a route added, removed or made
//! unavailable in the plugin configuration changes the tools with it.
//!
//! A tool's arguments are its route's path parameters (`project_id`,
//! `build_id`, `job_id`: lowercase UUIDs), plus `max_bytes` for the log and
//! InfraBox's trigger body for `trigger_build`. [`call`] validates them and
//! turns a call into the REST request of its route, which then runs the
//! same pipeline as any REST request.

use serde_json::{json, Map, Value};

use crate::path::{is_uuid, MCP_PREFIX};
use crate::route::{Kind, Route, RouteTable, Shaping};

use super::jsonrpc::{Id, RpcError, INVALID_PARAMS};

/// Longest `branch_or_sha`/`branch`/`infrabox_file` accepted.
const MAX_TEXT: usize = 256;
/// Most trigger environment variables.
const MAX_ENV: usize = 100;
/// Longest environment variable value.
const MAX_ENV_VALUE: usize = 4096;

/// What the catalogue says of a known route.
struct Known {
    route: &'static str,
    tool: &'static str,
    description: &'static str,
}

/// Names and descriptions for the default routes (DESIGN §5). A route the
/// configuration adds gets its name with `.` → `_` and a description from
/// its method and path.
const CATALOGUE: &[Known] = &[
    Known { route: "projects.list", tool: "list_projects", description: "List the InfraBox projects this token may access." },
    Known { route: "projects.get", tool: "get_project", description: "Get one InfraBox project: name, type, visibility." },
    Known { route: "builds.list", tool: "list_builds", description: "List the recent builds of a project, newest first." },
    Known { route: "builds.get", tool: "get_build", description: "Get one build of a project: number, state, commit and timing." },
    Known { route: "builds.jobs", tool: "list_build_jobs", description: "List the jobs of one build with their states." },
    Known { route: "jobs.list", tool: "list_jobs", description: "List the recent jobs of a project." },
    Known {
        route: "jobs.log",
        tool: "get_job_log",
        description: "Get the console log of a job: its last max_bytes bytes; the result says when the log was cut.",
    },
    Known { route: "jobs.artifacts", tool: "list_job_artifacts", description: "List the files a job archived." },
    Known {
        route: "jobs.artifacts.download",
        tool: "download_job_artifacts",
        description: "Download a job's archived files as one embedded resource (refused past the gateway's size limit).",
    },
    Known { route: "jobs.output", tool: "get_job_output", description: "Download a job's output archive as an embedded resource." },
    Known { route: "jobs.testruns", tool: "get_job_testruns", description: "Get the test results a job reported." },
    Known { route: "jobs.stats", tool: "get_job_stats", description: "Get the resource statistics a job reported." },
    Known { route: "jobs.tabs", tool: "get_job_tabs", description: "Get the custom tabs (markdown/json) a job published." },
    Known { route: "jobs.badges", tool: "get_job_badges", description: "Get the badges a job published." },
    Known {
        route: "projects.trigger",
        tool: "trigger_build",
        description: "Trigger a new build of a project for a branch or commit, optionally with environment variables.",
    },
    Known { route: "builds.restart", tool: "restart_build", description: "Restart a build (a new run of all its jobs)." },
    Known { route: "builds.abort", tool: "abort_build", description: "Abort a running build and all its jobs." },
    Known { route: "jobs.restart", tool: "restart_job", description: "Restart one job of a build." },
    Known { route: "jobs.rerun", tool: "rerun_job", description: "Rerun one job of a build." },
    Known { route: "jobs.abort", tool: "abort_job", description: "Abort one running job." },
];

/// The tool name of a route.
pub fn tool_name(route: &Route) -> String {
    CATALOGUE
        .iter()
        .find(|k| k.route == route.name())
        .map_or_else(|| route.name().replace('.', "_"), |k| k.tool.to_string())
}

fn description(route: &Route) -> String {
    CATALOGUE.iter().find(|k| k.route == route.name()).map_or_else(
        || format!("InfraBox: {} {}{}", route.spec.method, MCP_PREFIX, route.spec.path),
        |k| k.description.to_string(),
    )
}

/// The route of tool `name` among the available routes.
pub fn find<'a>(routes: &'a RouteTable, name: &str) -> Option<(usize, &'a Route)> {
    routes.routes().iter().enumerate().find(|(_, r)| r.unavailable().is_none() && tool_name(r) == name)
}

/// The path parameters of a route, as (placeholder, argument name).
fn params(route: &Route) -> impl Iterator<Item = (&'static str, &'static str)> + '_ {
    [("{project}", "project_id"), ("{build}", "build_id"), ("{job}", "job_id")]
        .into_iter()
        .filter(|(p, _)| route.spec.path.split('/').any(|s| s == *p))
}

fn uuid_schema(what: &str) -> Value {
    json!({
        "type": "string",
        "description": format!("The {what} id (a lowercase UUID)."),
        "pattern": "^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"
    })
}

/// The JSON Schema of a route's arguments.
fn input_schema(route: &Route, max_log_bytes: u64) -> Value {
    let mut properties = Map::new();
    let mut required = Vec::new();
    for (_, arg) in params(route) {
        properties.insert(arg.into(), uuid_schema(arg.trim_end_matches("_id")));
        required.push(Value::from(arg));
    }
    if route.shaping() == Shaping::LogTail {
        properties.insert(
            "max_bytes".into(),
            json!({
                "type": "integer",
                "minimum": 1,
                "maximum": max_log_bytes,
                "description": format!("How many bytes of the log's end to return (default and maximum {max_log_bytes})."),
            }),
        );
    }
    if takes_filename(route) {
        properties.insert(
            "filename".into(),
            json!({"type": "string", "minLength": 1, "maxLength": MAX_TEXT, "description": "The archived file to download (list_job_artifacts names them)."}),
        );
        required.push(Value::from("filename"));
    }
    if is_trigger(route) {
        properties.insert("branch_or_sha".into(), json!({"type": "string", "minLength": 1, "maxLength": MAX_TEXT, "description": "The branch name or commit SHA to build."}));
        properties.insert("branch".into(), json!({"type": "string", "maxLength": MAX_TEXT, "description": "The branch the commit belongs to, if branch_or_sha is a SHA."}));
        properties.insert("infrabox_file".into(), json!({"type": "string", "maxLength": MAX_TEXT, "description": "The build definition file (InfraBox's default: infrabox.json)."}));
        properties.insert(
            "env".into(),
            json!({
                "type": "array",
                "maxItems": MAX_ENV,
                "description": "Environment variables for the build. Their values are never audited.",
                "items": {
                    "type": "object",
                    "properties": {"name": {"type": "string", "minLength": 1, "maxLength": MAX_TEXT}, "value": {"type": "string", "maxLength": MAX_ENV_VALUE}},
                    "required": ["name", "value"],
                    "additionalProperties": false
                }
            }),
        );
        required.push(Value::from("branch_or_sha"));
    }
    json!({"type": "object", "properties": properties, "required": required, "additionalProperties": false})
}

/// A route answering one archived file, named by `?filename=`.
fn takes_filename(route: &Route) -> bool {
    route.spec.upstream_path.ends_with("/archive/download")
}

/// `s` percent-encoded for a query value (everything but unreserved).
fn query_value(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn is_trigger(route: &Route) -> bool {
    route.kind() == Kind::Write && route.spec.upstream_method == "POST"
}

/// The `tools/list` entry of a route.
pub fn describe(route: &Route, max_log_bytes: u64) -> Value {
    let read = route.kind() == Kind::Read;
    let aborts = route.name().ends_with("abort");
    json!({
        "name": tool_name(route),
        "title": tool_name(route).replace('_', " "),
        "description": description(route),
        "inputSchema": input_schema(route, max_log_bytes),
        "annotations": {
            "readOnlyHint": read,
            "destructiveHint": !read && aborts,
            "idempotentHint": read || aborts,
            "openWorldHint": false
        }
    })
}

/// The tools a token sees: every available route, write routes only with
/// `allow_trigger`.
pub fn list(routes: &RouteTable, allow_trigger: bool, max_log_bytes: u64) -> Vec<Value> {
    routes
        .routes()
        .iter()
        .filter(|r| r.unavailable().is_none() && (allow_trigger || r.kind() == Kind::Read))
        .map(|r| describe(r, max_log_bytes))
        .collect()
}

/// A validated tool call as the REST request of its route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestCall {
    pub route: usize,
    pub method: String,
    /// `/api/v1/mcp/...`, parameters filled in.
    pub path: String,
    /// The upstream body (the trigger's JSON), if the route takes one.
    pub body: Option<Vec<u8>>,
    /// `max_bytes` of a log call.
    pub max_bytes: Option<u64>,
}

/// Validates `arguments` of tool `name` and builds its REST request.
/// Unknown tool, unknown or ill-typed arguments: JSON-RPC invalid params.
pub fn call(routes: &RouteTable, name: &str, arguments: &Map<String, Value>, id: &Id, max_log_bytes: u64) -> Result<RestCall, RpcError> {
    let invalid = |m: String| RpcError::new(Some(id.clone()), INVALID_PARAMS, m);
    let Some((index, route)) = find(routes, name) else {
        return Err(invalid("unknown tool: tools/list names the tools this token may call".into()));
    };
    let trigger = is_trigger(route);
    let log = route.shaping() == Shaping::LogTail;
    let file = takes_filename(route);
    let mut path = format!("{MCP_PREFIX}{}", route.spec.path);
    for (placeholder, arg) in params(route) {
        match arguments.get(arg) {
            Some(Value::String(v)) if is_uuid(v) => path = path.replace(placeholder, v),
            Some(_) => return Err(invalid(format!("{arg} must be a lowercase UUID"))),
            None => return Err(invalid(format!("{arg} is required"))),
        }
    }
    for key in arguments.keys() {
        let known = params(route).any(|(_, a)| a == key)
            || (log && key == "max_bytes")
            || (file && key == "filename")
            || (trigger && ["branch_or_sha", "branch", "infrabox_file", "env"].contains(&key.as_str()));
        if !known {
            return Err(invalid(format!("{name} takes no argument {:?}", truncate(key, 64))));
        }
    }
    let max_bytes = match arguments.get("max_bytes") {
        None => None,
        Some(v) => match v.as_u64() {
            Some(n) if (1..=max_log_bytes).contains(&n) => Some(n),
            _ => return Err(invalid(format!("max_bytes must be an integer from 1 to {max_log_bytes}"))),
        },
    };
    if file {
        match arguments.get("filename") {
            Some(Value::String(f)) if !f.is_empty() && f.len() <= MAX_TEXT && !f.chars().any(char::is_control) => {
                path.push_str("?filename=");
                path.push_str(&query_value(f));
            }
            _ => return Err(invalid(format!("filename must be a string of 1 to {MAX_TEXT} bytes"))),
        }
    }
    let body = if trigger { Some(trigger_body(arguments).map_err(invalid)?) } else { None };
    Ok(RestCall { route: index, method: route.spec.method.clone(), path, body, max_bytes })
}

/// InfraBox's trigger body from the arguments (types and bounds checked).
fn trigger_body(arguments: &Map<String, Value>) -> Result<Vec<u8>, String> {
    let text = |key: &str, required: bool| -> Result<Option<String>, String> {
        match arguments.get(key) {
            None if required => Err(format!("{key} is required")),
            None => Ok(None),
            Some(Value::String(s)) if s.len() <= MAX_TEXT && !(required && s.is_empty()) => Ok(Some(s.clone())),
            Some(_) => Err(format!("{key} must be a string of {} to {MAX_TEXT} bytes", u8::from(required))),
        }
    };
    let mut body = Map::new();
    if let Some(v) = text("branch_or_sha", true)? {
        body.insert("branch_or_sha".into(), Value::from(v));
    }
    for key in ["branch", "infrabox_file"] {
        if let Some(v) = text(key, false)? {
            body.insert(key.into(), Value::from(v));
        }
    }
    let mut env = Vec::new();
    match arguments.get("env") {
        None => {}
        Some(Value::Array(items)) if items.len() <= MAX_ENV => {
            for item in items {
                let Some(obj) = item.as_object() else { return Err("env items must be objects {name, value}".into()) };
                let (Some(Value::String(n)), Some(Value::String(v))) = (obj.get("name"), obj.get("value")) else {
                    return Err("env items need a string name and a string value".into());
                };
                if obj.len() != 2 || n.is_empty() || n.len() > MAX_TEXT || v.len() > MAX_ENV_VALUE {
                    return Err(format!("env items are exactly {{name, value}}, name 1-{MAX_TEXT} bytes, value up to {MAX_ENV_VALUE}"));
                }
                env.push(json!({"name": n, "value": v}));
            }
        }
        Some(_) => return Err(format!("env must be an array of at most {MAX_ENV} items")),
    }
    body.insert("env".into(), Value::Array(env));
    serde_json::to_vec(&Value::Object(body)).map_err(|e| e.to_string())
}

fn truncate(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.get(..end).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(all(target_family = "wasm", target_os = "unknown"))]
    use wasm_bindgen_test::wasm_bindgen_test as test;
    use crate::route::default_specs;

    const P: &str = "0b7a4c2e-1f3d-4c5b-9a8e-7d6c5b4a3f21";
    const J: &str = "2b7a4c2e-1f3d-4c5b-9a8e-7d6c5b4a3f21";

    fn args(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap_or_default()
    }

    #[test]
    fn tools_follow_the_route_table() -> Result<(), String> {
        let routes = RouteTable::default();
        let names = |allow| list(&routes, allow, 1 << 20).iter().map(|t| t["name"].as_str().unwrap_or("?").to_string()).collect::<Vec<_>>();
        let read = names(false);
        assert!(read.contains(&"get_job_log".to_string()) && read.contains(&"list_projects".to_string()));
        assert!(!read.contains(&"trigger_build".to_string()), "no write tool without the grant");
        let all = names(true);
        assert!(all.contains(&"trigger_build".to_string()) && all.contains(&"abort_job".to_string()));
        assert!(!all.contains(&"restart_job".to_string()), "unavailable routes are no tools");
        assert_eq!(all.len(), routes.routes().iter().filter(|r| r.unavailable().is_none()).count());
        let mut routes = RouteTable::default();
        routes.enable(&["jobs.restart".to_string()]).map_err(|e| e.0)?;
        assert!(list(&routes, true, 1).iter().any(|t| t["name"] == "restart_job"), "enabling a route adds its tool");
        let mut specs = default_specs();
        specs.retain(|s| s.name != "jobs.log");
        specs.push(crate::route::RouteSpec { name: "jobs.log2".into(), ..default_specs().into_iter().find(|s| s.name == "jobs.log").ok_or("log")? });
        let routes = RouteTable::from_specs(specs).map_err(|e| e.0)?;
        let names: Vec<String> = list(&routes, false, 1).iter().map(|t| t["name"].as_str().unwrap_or("?").to_string()).collect();
        assert!(names.contains(&"jobs_log2".to_string()) && !names.contains(&"get_job_log".to_string()));
        Ok(())
    }

    #[test]
    fn calls_become_the_rest_request_of_their_route() -> Result<(), String> {
        let routes = RouteTable::default();
        let id = Id::Number(1);
        let c = call(&routes, "get_job_log", &args(json!({"project_id": P, "job_id": J, "max_bytes": 10})), &id, 100).map_err(|e| e.message)?;
        assert_eq!(c.path, format!("/api/v1/mcp/projects/{P}/jobs/{J}/log"));
        assert_eq!((c.method.as_str(), c.max_bytes, c.body), ("GET", Some(10), None));
        let c = call(&routes, "download_job_artifacts", &args(json!({"project_id": P, "job_id": J, "filename": "a b/ü&x=1"})), &id, 100).map_err(|e| e.message)?;
        assert_eq!(c.path, format!("/api/v1/mcp/projects/{P}/jobs/{J}/artifacts/download?filename=a%20b%2F%C3%BC%26x%3D1"));
        let c = call(&routes, "trigger_build", &args(json!({"project_id": P, "branch_or_sha": "main", "env": [{"name": "A", "value": "s"}]})), &id, 100).map_err(|e| e.message)?;
        let body: Value = serde_json::from_slice(c.body.as_deref().unwrap_or_default()).map_err(|e| e.to_string())?;
        assert_eq!(body, json!({"branch_or_sha": "main", "env": [{"name": "A", "value": "s"}]}));
        for (tool, a) in [
            ("no_such_tool", json!({})),
            ("restart_job", json!({"project_id": P, "job_id": J})),
            ("get_project", json!({})),
            ("get_project", json!({"project_id": P.to_uppercase()})),
            ("get_project", json!({"project_id": format!("{P}/../x")})),
            ("get_project", json!({"project_id": 7})),
            ("get_project", json!({"project_id": P, "extra": 1})),
            ("get_job_log", json!({"project_id": P, "job_id": J, "max_bytes": 0})),
            ("get_job_log", json!({"project_id": P, "job_id": J, "max_bytes": 101})),
            ("get_job_log", json!({"project_id": P, "job_id": J, "max_bytes": "5"})),
            ("get_job_log", json!({"project_id": P, "job_id": J, "max_bytes": 1.5})),
            ("download_job_artifacts", json!({"project_id": P, "job_id": J})),
            ("download_job_artifacts", json!({"project_id": P, "job_id": J, "filename": "a\nb"})),
            ("trigger_build", json!({"project_id": P})),
            ("trigger_build", json!({"project_id": P, "branch_or_sha": ""})),
            ("trigger_build", json!({"project_id": P, "branch_or_sha": 5})),
            ("trigger_build", json!({"project_id": P, "branch_or_sha": "m", "env": {"A": "b"}})),
            ("trigger_build", json!({"project_id": P, "branch_or_sha": "m", "env": [{"name": "A"}]})),
            ("trigger_build", json!({"project_id": P, "branch_or_sha": "m", "env": [{"name": "A", "value": "b", "x": 1}]})),
        ] {
            let got = call(&routes, tool, &args(a.clone()), &id, 100);
            assert_eq!(got.as_ref().map_err(|e| e.code), Err(INVALID_PARAMS), "{tool} {a}");
        }
        Ok(())
    }
}
