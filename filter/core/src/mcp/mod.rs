//! The MCP endpoint (DESIGN §15): `POST /api/v1/mcp`, Streamable HTTP with
//! JSON responses, stateless, in both protocol revisions clients speak:
//!
//! - **2026-07-28**: every request carries its protocol version and client
//!   capabilities in `params._meta`, and mirrors its method (and a tool
//!   call's name) in the `MCP-Protocol-Version`/`Mcp-Method`/`Mcp-Name`
//!   headers, which an intermediary must check against the body: the
//!   gateway refuses a mismatch (-32020). `server/discover` describes the
//!   server; there is no handshake.
//! - **2025-11-25** (and the handshake revisions before it): `initialize`,
//!   then `notifications/initialized`; no session id is issued, since every
//!   request stands alone.
//!
//! [`jsonrpc`] parses the body strictly, [`tools`] derives the tools from
//! the route table, [`dispatch`] answers everything but `tools/call` at
//! once, and [`render`] turns an upstream answer or a gateway denial into a
//! tool result. The tool call itself runs the REST pipeline
//! ([`crate::exchange`]).

pub mod jsonrpc;
pub mod render;
pub mod tools;

use serde_json::{json, Map, Value};

use crate::config::PluginConfig;
use jsonrpc::{Id, Message, RpcError, HEADER_MISMATCH, INVALID_PARAMS, METHOD_NOT_FOUND, UNSUPPORTED_PROTOCOL_VERSION};
pub use tools::RestCall;

/// The endpoint's path.
pub const ENDPOINT: &str = "/api/v1/mcp";
/// RFC 9728 metadata of the endpoint (well-known suffix before the path).
pub const METADATA_PATH: &str = "/.well-known/oauth-protected-resource/api/v1/mcp";
/// The per-request-envelope revision.
pub const MODERN_VERSION: &str = "2026-07-28";
/// Handshake revisions served, newest first.
/// (2025-03-26 is not among them: it requires JSON-RPC batches, which this
/// server refuses; a client asking for it is offered 2025-11-25.)
pub const HANDSHAKE_VERSIONS: [&str; 2] = ["2025-11-25", "2025-06-18"];
const META_VERSION: &str = "io.modelcontextprotocol/protocolVersion";
const META_CAPABILITIES: &str = "io.modelcontextprotocol/clientCapabilities";
const META_SERVER_INFO: &str = "io.modelcontextprotocol/serverInfo";
const INSTRUCTIONS: &str = "InfraBox CI through the MCP gateway. Every tool acts with your own InfraBox permissions, \
limited to the projects this token was granted; write tools (trigger, abort) appear only for tokens with the trigger \
grant. Rate limits are per user; a limited call says when to retry.";

/// Which revision a request speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Era {
    /// 2026-07-28: results carry `resultType`.
    Modern,
    Handshake,
}

/// The routing headers of a request, as sent.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RoutingHeaders {
    pub protocol_version: Vec<String>,
    pub method: Vec<String>,
    pub name: Vec<String>,
}

impl RoutingHeaders {
    /// Reads them from (lowercase name, value) pairs.
    pub fn of(headers: &[(String, String)]) -> Self {
        let mut out = Self::default();
        for (k, v) in headers {
            match k.as_str() {
                "mcp-protocol-version" => out.protocol_version.push(v.clone()),
                "mcp-method" => out.method.push(v.clone()),
                "mcp-name" => out.name.push(v.clone()),
                _ => {}
            }
        }
        out
    }
}

/// What the endpoint does with one message.
#[derive(Debug, Clone, PartialEq)]
pub enum Dispatch {
    /// Answer with this result.
    Answer { id: Id, result: Value, method: String },
    /// A notification: 202, no body.
    Accepted { method: String },
    /// A valid tool call: run its REST request through the pipeline.
    Call { id: Id, era: Era, tool: String, arguments: Value, call: RestCall },
    /// A JSON-RPC error; `era` when the envelope was read.
    Error { error: RpcError, method: Option<String>, era: Option<Era> },
}

/// Decides on one parsed message of a token with (or without) the trigger grant.
pub fn dispatch(message: Message, headers: &RoutingHeaders, allow_trigger: bool, config: &PluginConfig) -> Dispatch {
    let Message { id, method, params } = message;
    let era = match check_envelope(id.as_ref(), &method, &params, headers) {
        Ok(era) => era,
        Err(error) => return Dispatch::Error { error, method: Some(method.clone()), era: None },
    };
    let fail = |error: RpcError| Dispatch::Error { error, method: Some(method.clone()), era: Some(era) };
    let Some(id) = id else {
        return Dispatch::Accepted { method };
    };
    let err = |code, m: &str| fail(RpcError::new(Some(id.clone()), code, m));
    let answer = |result: Value| Dispatch::Answer { id: id.clone(), result: complete(result, era), method: method.clone() };
    match (method.as_str(), era) {
        ("initialize", Era::Handshake) => {
            let requested = params.get("protocolVersion").and_then(Value::as_str).unwrap_or_default();
            let version = HANDSHAKE_VERSIONS.iter().find(|v| **v == requested).copied().unwrap_or(HANDSHAKE_VERSIONS[0]);
            answer(json!({
                "protocolVersion": version,
                "capabilities": {"tools": {"listChanged": false}},
                "serverInfo": server_info(),
                "instructions": INSTRUCTIONS,
            }))
        }
        ("initialize", Era::Modern) => err(METHOD_NOT_FOUND, "2026-07-28 has no initialize: use server/discover"),
        ("server/discover", _) => {
            let mut versions = vec![MODERN_VERSION];
            versions.extend(HANDSHAKE_VERSIONS);
            answer(json!({
                "supportedVersions": versions,
                "capabilities": {"tools": {"listChanged": false}},
                "instructions": INSTRUCTIONS,
                "ttlMs": 0,
                "cacheScope": "private",
                "_meta": {META_SERVER_INFO: server_info()},
            }))
        }
        ("ping", Era::Handshake) => Dispatch::Answer { id: id.clone(), result: json!({}), method: method.clone() },
        ("tools/list", _) => {
            let mut result = json!({"tools": tools::list(&config.routes, allow_trigger, config.max_log_bytes)});
            if let (Era::Modern, Some(o)) = (era, result.as_object_mut()) {
                o.insert("ttlMs".into(), json!(0));
                o.insert("cacheScope".into(), json!("private"));
            }
            answer(result)
        }
        ("tools/call", _) => {
            let Some(Value::String(name)) = params.get("name") else { return err(INVALID_PARAMS, "tools/call needs a string name") };
            let arguments = match params.get("arguments") {
                None | Some(Value::Null) => Map::new(),
                Some(Value::Object(a)) => a.clone(),
                Some(_) => return err(INVALID_PARAMS, "arguments must be an object"),
            };
            if params.keys().any(|k| !["name", "arguments", "_meta"].contains(&k.as_str())) {
                return err(INVALID_PARAMS, "tools/call takes name, arguments and _meta");
            }
            match tools::call(&config.routes, name, &arguments, &id, config.max_log_bytes) {
                Ok(call) => Dispatch::Call { id, era, tool: name.clone(), arguments: Value::Object(arguments), call },
                Err(e) => fail(e),
            }
        }
        _ => err(METHOD_NOT_FOUND, "method not found: this server offers tools (tools/list, tools/call)"),
    }
}

/// Checks the revision's envelope; returns the era.
fn check_envelope(id: Option<&Id>, method: &str, params: &Map<String, Value>, headers: &RoutingHeaders) -> Result<Era, RpcError> {
    let mismatch = |m: &str| RpcError::new(id.cloned(), HEADER_MISMATCH, m);
    if headers.protocol_version.len() > 1 || headers.method.len() > 1 || headers.name.len() > 1 {
        return Err(mismatch("a routing header (MCP-Protocol-Version, Mcp-Method, Mcp-Name) appears more than once"));
    }
    let header_version = headers.protocol_version.first().map(String::as_str);
    // The headers an intermediary routes on must say what the body says,
    // in every revision that sends them.
    if let Some(h) = headers.method.first() {
        if h != method {
            return Err(mismatch("the Mcp-Method header does not match the body's method"));
        }
    }
    if let (Some(h), "tools/call") = (headers.name.first(), method) {
        let named = params.get("name").and_then(Value::as_str);
        if decode_header(h).is_none() || named != decode_header(h).as_deref() {
            return Err(mismatch("the Mcp-Name header does not match the body's tool name"));
        }
    }
    let meta = params.get("_meta").and_then(Value::as_object);
    let body_version = meta.and_then(|m| m.get(META_VERSION));
    let modern = body_version.is_some() || header_version == Some(MODERN_VERSION);
    if !modern {
        return match header_version {
            Some(v) if !HANDSHAKE_VERSIONS.contains(&v) && method != "initialize" => Err(RpcError {
                data: Some(json!({"supported": supported(), "requested": v})),
                ..RpcError::new(id.cloned(), UNSUPPORTED_PROTOCOL_VERSION, "unsupported MCP-Protocol-Version")
            }),
            _ => Ok(Era::Handshake),
        };
    }
    let Some(meta) = meta.filter(|m| m.contains_key(META_VERSION) && m.contains_key(META_CAPABILITIES)) else {
        return Err(RpcError::new(
            id.cloned(),
            INVALID_PARAMS,
            "a 2026-07-28 request carries params._meta with protocolVersion and clientCapabilities",
        ));
    };
    let version = meta.get(META_VERSION);
    if header_version.is_none() || version.and_then(Value::as_str) != header_version {
        return Err(mismatch("the MCP-Protocol-Version header does not match the request's protocol version"));
    }
    if headers.method.is_empty() {
        return Err(mismatch("a 2026-07-28 request carries its method in the Mcp-Method header"));
    }
    if method == "tools/call" && headers.name.is_empty() {
        return Err(mismatch("a 2026-07-28 tools/call carries the tool name in the Mcp-Name header"));
    }
    match version.and_then(Value::as_str) {
        Some(MODERN_VERSION) => Ok(Era::Modern),
        other => Err(RpcError {
            data: Some(json!({"supported": supported(), "requested": other.unwrap_or_default()})),
            ..RpcError::new(id.cloned(), UNSUPPORTED_PROTOCOL_VERSION, "unsupported protocol version")
        }),
    }
}

fn supported() -> Vec<&'static str> {
    let mut v = vec![MODERN_VERSION];
    v.extend(HANDSHAKE_VERSIONS);
    v
}

/// A header value in the 2026-07-28 `=?base64?…?=` form, decoded; other
/// values as they are. `None`: a malformed sentinel (never matches).
fn decode_header(value: &str) -> Option<String> {
    use base64::Engine;
    let Some(payload) = value.strip_prefix("=?base64?").and_then(|r| r.strip_suffix("?=")) else {
        return Some(value.to_string());
    };
    let engine = &base64::engine::general_purpose::STANDARD;
    let bytes = engine.decode(payload).ok()?;
    // Only the canonical encoding matches (no stray padding bits).
    (engine.encode(&bytes) == payload).then_some(())?;
    String::from_utf8(bytes).ok()
}

fn server_info() -> Value {
    json!({"name": "infrabox-mcp-gateway", "title": "InfraBox", "version": env!("CARGO_PKG_VERSION")})
}

/// A result in its era's shape (2026-07-28 requires `resultType`).
pub fn complete(mut result: Value, era: Era) -> Value {
    if era == Era::Modern {
        if let Some(o) = result.as_object_mut() {
            o.insert("resultType".into(), json!("complete"));
        }
    }
    result
}

/// The RFC 9728 metadata of the endpoint at `origin` (`https://host`).
pub fn resource_metadata(origin: &str, config: &PluginConfig) -> Vec<u8> {
    let mut meta = json!({
        "resource": format!("{origin}{ENDPOINT}"),
        "resource_name": "InfraBox MCP gateway",
        "bearer_methods_supported": ["header"],
    });
    if let (Some(doc), Some(o)) = (&config.documentation_url, meta.as_object_mut()) {
        o.insert("resource_documentation".into(), json!(doc));
    }
    serde_json::to_vec(&meta).unwrap_or_default()
}

/// The `WWW-Authenticate` value of a 401 on the endpoint.
pub fn www_authenticate(origin: &str, token_presented: bool) -> String {
    let error = if token_presented { ", error=\"invalid_token\"" } else { "" };
    format!("Bearer realm=\"infrabox-mcp\", resource_metadata=\"{origin}{METADATA_PATH}\"{error}")
}

#[cfg(test)]
mod tests;
