//! The audit record (DESIGN §10): what the filter hands Envoy's gRPC access
//! log for every MCP request and every blocked `ib_mcp_` use elsewhere, as
//! versioned JSON in the filter state `wasm.mcp_audit`.
//!
//! Host-agnostic: the wasm adapter supplies the node id, VM id and sequence
//! number; the control plane parses the same [`AuditRecord`] back and turns
//! it, with the status, duration and bytes of the access-log entry, into one
//! `mcp_access_log` row ([`outcome`] is the shared mapping).
//!
//! No record ever carries a secret: the token is reduced to its `token_id`
//! (and only when the request presented the full secret of a token in the
//! policy — a stranger cannot attribute requests to someone else's token),
//! the path loses its query string, and [`sanitize_path`] masks anything in
//! the path that looks like a token.

use serde::{Deserialize, Serialize};

use crate::denial::{Denial, ErrorCode};
use crate::path::{self, Area};
use crate::pipeline::RequestHead;
use crate::route::{Class, Lookup, RouteTable};
use crate::policy::Policy;
use crate::token::{Token, PREFIX, SECRET_HEX_LEN};

/// Current schema version of [`AuditRecord`].
pub const SCHEMA: u32 = 1;
/// The property name the filter sets (`set_property(["mcp_audit"])`).
/// Envoy prefixes wasm-set filter state with `wasm.`.
pub const PROPERTY: &str = "mcp_audit";
/// The filter-state key Envoy logs (`filter_state_objects_to_log`).
pub const FILTER_STATE_KEY: &str = "wasm.mcp_audit";
/// Longest path kept in a record, in bytes.
pub const MAX_PATH_BYTES: usize = 512;
/// Longest method kept in a record, in bytes.
pub const MAX_METHOD_BYTES: usize = 16;
/// A run of this many hex digits in a path is masked: token secrets are 48
/// hex, UUIDs only have runs of at most 12.
const HEX_RUN_MASK: usize = 32;
/// What replaces a masked part of a path.
const MASK: &str = "[redacted]";

/// What the filter decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    /// Forwarded upstream (the outcome then depends on the response).
    Allow,
    /// Refused locally with the `reason` error code.
    Deny,
}

/// One audit record, as JSON in the filter state. Field names are part of
/// the wire contract between filter and control plane; add fields, never
/// rename them, and bump [`SCHEMA`] on an incompatible change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// [`SCHEMA`] of the writer.
    pub schema: u32,
    /// Envoy's `node.id`.
    pub node_id: String,
    /// Unique per VM instance (a VM is per Envoy worker and per restart).
    pub vm_id: String,
    /// Per-VM sequence number, from 1, without holes on the filter side.
    pub seq: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project: Option<String>,
    /// Name of the matched route.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class: Option<Class>,
    pub decision: Decision,
    /// The error code of a denial.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Requests left in the user's window for this class, when evaluated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit_remaining: Option<u32>,
    /// The client's method (before any rewrite).
    pub method: String,
    /// The client's path without query, sanitized (before any rewrite).
    pub path: String,
    /// On the MCP endpoint: the JSON-RPC method, tool and argument digest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mcp: Option<McpFacts>,
}

/// What the audit keeps of an MCP endpoint request (DESIGN §15): never an
/// argument's value (trigger variables may be secrets), only a keyed digest
/// of the arguments' canonical JSON — HMAC-SHA256 under a key derived from
/// the gateway's internal secret ([`arguments_key`]), so a reader of the
/// audit table cannot confirm a guessed secret offline, while the same
/// arguments always give the same digest.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct McpFacts {
    /// The JSON-RPC method (at most [`MAX_RPC_METHOD_BYTES`]).
    pub method: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool: Option<String>,
    /// Hex HMAC-SHA256 of the canonical arguments.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arguments_hmac: Option<String>,
}

/// Longest JSON-RPC method or tool name kept in a record, in bytes.
pub const MAX_RPC_METHOD_BYTES: usize = 64;

impl McpFacts {
    /// The facts of a message: method, and for a tool call its name and the
    /// digest of its arguments under `key`.
    pub fn of(method: &str, tool: Option<&str>, arguments: Option<&serde_json::Value>, key: &[u8; 32]) -> Self {
        let clean = |s: &str| truncate(s, MAX_RPC_METHOD_BYTES).chars().map(|c| if c.is_control() { '?' } else { c }).collect::<String>();
        Self {
            method: clean(method),
            tool: tool.map(clean),
            arguments_hmac: arguments.map(|a| hex::encode(hmac_sha256(key, crate::mcp::jsonrpc::canonical(a).as_bytes()))),
        }
    }
}

/// The key of the argument digests: SHA-256 of a label and the gateway's
/// internal secret (never stored or logged itself).
pub fn arguments_key(secret: &str) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(b"infrabox-mcp-gateway/audit-arguments/v1\0");
    h.update(secret.as_bytes());
    h.finalize().into()
}

/// HMAC-SHA256 (RFC 2104) with a 32-byte key.
pub fn hmac_sha256(key: &[u8; 32], message: &[u8]) -> [u8; 32] {
    let mut mac = crate::signature::Mac::new(key);
    mac.update(message);
    mac.finish()
}

/// The filter state the filter sets when a tool call's upstream answer
/// arrives: the status InfraBox answered (the client gets 200 and a tool
/// result). Envoy logs it as `wasm.mcp_result`.
pub const RESULT_PROPERTY: &str = "mcp_result";
pub const RESULT_FILTER_STATE_KEY: &str = "wasm.mcp_result";

impl AuditRecord {
    /// The JSON the filter sets as filter state.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Parses a record; the error text never quotes the input.
    pub fn from_json(bytes: &[u8]) -> Result<Self, AuditRecordError> {
        let record: Self = serde_json::from_slice(bytes)
            .map_err(|e| AuditRecordError(format!("not an audit record ({:?} at column {})", e.classify(), e.column())))?;
        if record.schema == 0 {
            return Err(AuditRecordError("schema must be positive".into()));
        }
        if record.seq == 0 {
            return Err(AuditRecordError("seq must be positive".into()));
        }
        Ok(record)
    }
}

/// Why bytes are not an [`AuditRecord`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditRecordError(pub String);

impl std::fmt::Display for AuditRecordError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for AuditRecordError {}

/// Where a record comes from: the Envoy node and the VM instance.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct VmOrigin {
    pub node_id: String,
    pub vm_id: String,
}

/// The final decision on a request, as the adapter carries it out.
#[derive(Debug, Clone, Copy)]
pub enum Verdict<'a> {
    Forward,
    Deny(&'a Denial),
}

/// What the audit knows of a request before the verdict: derived from the
/// request head and the policy, never holding the secret.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RequestFacts {
    pub method: String,
    pub path: String,
    pub route: Option<String>,
    pub class: Option<Class>,
    pub project: Option<String>,
    pub token_id: Option<String>,
    pub user_id: Option<String>,
    pub mcp: Option<McpFacts>,
}

impl RequestFacts {
    /// Describes a request: client method and sanitized path, the matched
    /// route (name, class, project) on the MCP surface, and the token and
    /// user when the request carries the full secret of a token in `policy`.
    /// `on_infrabox`: the request is for an InfraBox host (elsewhere no
    /// path is an MCP route).
    pub fn describe(head: &RequestHead<'_>, policy: Option<&Policy>, routes: &RouteTable, on_infrabox: bool) -> Self {
        let before_query = head.path.split_once('?').map_or(head.path, |(p, _)| p);
        let mut facts = Self {
            method: truncate(head.method, MAX_METHOD_BYTES).to_string(),
            path: sanitize_path(before_query),
            ..Self::default()
        };
        if let (Area::Mcp { rest, .. }, true) = (path::area(head.path), on_infrabox) {
            if path::check_canonical(rest).is_ok() {
                if let Lookup::Found { route, params } = routes.lookup(head.method, rest) {
                    if let Some(r) = routes.get(route) {
                        facts.route = Some(r.name().to_string());
                        facts.class = Some(r.class());
                    }
                    facts.project = params.project;
                }
                if facts.project.is_none() {
                    facts.project = project_in(rest).map(str::to_string);
                }
            }
        }
        if let Some(policy) = policy {
            let authorization: Vec<&str> = head.values("authorization").collect();
            let cookie: Vec<&str> = head.values("cookie").collect();
            if let Some((token_id, user_id)) = attribute(&authorization, &cookie, policy) {
                facts.token_id = Some(token_id);
                facts.user_id = user_id;
            }
        }
        facts
    }

    /// The facts of a request `admit` admitted: the same as
    /// [`describe`](Self::describe) gives (the authenticated token is the
    /// only MCP secret an admitted request can carry), from what admission
    /// already found — no second route lookup, no second token hash.
    pub fn of_admitted(head: &RequestHead<'_>, policy: &Policy, routes: &RouteTable, admitted: &crate::pipeline::Admitted) -> Self {
        let before_query = head.path.split_once('?').map_or(head.path, |(p, _)| p);
        let route = routes.get(admitted.route);
        let grant = policy.grant(admitted.grant);
        Self {
            method: truncate(head.method, MAX_METHOD_BYTES).to_string(),
            path: sanitize_path(before_query),
            route: route.map(|r| r.name().to_string()),
            class: route.map(|r| r.class()),
            project: admitted.params.project.clone(),
            token_id: grant.map(|g| g.token_id().to_string()),
            user_id: grant.and_then(|g| policy.user(g.user)).map(|u| u.id.to_string()),
            mcp: None,
        }
    }

    /// The record for this request with its verdict.
    pub fn record(&self, origin: &VmOrigin, seq: u64, verdict: Verdict<'_>, rate_limit_remaining: Option<u32>) -> AuditRecord {
        let reason = match verdict {
            Verdict::Forward => None,
            Verdict::Deny(d) => Some(d.code.as_str()),
        };
        self.record_reason(origin, seq, reason, rate_limit_remaining)
    }

    /// The record for this request: allowed (`reason` `None`) or denied
    /// with the error code or JSON-RPC error name `reason`.
    pub fn record_reason(&self, origin: &VmOrigin, seq: u64, reason: Option<&str>, rate_limit_remaining: Option<u32>) -> AuditRecord {
        let decision = if reason.is_some() { Decision::Deny } else { Decision::Allow };
        let reason = reason.map(str::to_string);
        AuditRecord {
            schema: SCHEMA,
            node_id: origin.node_id.clone(),
            vm_id: origin.vm_id.clone(),
            seq,
            token_id: self.token_id.clone(),
            user_id: self.user_id.clone(),
            project: self.project.clone(),
            route: self.route.clone(),
            class: self.class,
            decision,
            reason,
            rate_limit_remaining,
            method: self.method.clone(),
            path: self.path.clone(),
            mcp: self.mcp.clone(),
        }
    }
}

/// `{project}` of a path shaped `/projects/<uuid>[/…]` (also for 404/405,
/// where no route matched).
fn project_in(rest: &str) -> Option<&str> {
    let mut segs = rest.split('/').skip(1);
    match (segs.next(), segs.next()) {
        (Some("projects"), Some(p)) if path::is_uuid(p) => Some(p),
        _ => None,
    }
}

/// The token (and its user) whose full secret the request presents in any
/// `Authorization` form or cookie, if that token is in the policy. Proof of
/// possession, not authentication: a 401 for an expired token is still
/// attributed to it, a made-up token with someone's `token_id` is not.
fn attribute(authorization: &[&str], cookie: &[&str], policy: &Policy) -> Option<(String, Option<String>)> {
    let mut decoded = Vec::new();
    for value in authorization {
        if let Some(d) = basic_decoded(value) {
            decoded.push(d);
        }
    }
    let values = authorization.iter().copied().chain(cookie.iter().copied()).chain(decoded.iter().map(String::as_str));
    for value in values {
        for candidate in token_candidates(value) {
            let Ok(token) = Token::parse(candidate) else { continue };
            if let Some((_, grant)) = policy.grant_by_hash(&token.hash()) {
                if grant.token_id() == token.token_id() {
                    let user = policy.user(grant.user).map(|u| u.id.to_string());
                    return Some((grant.token_id().to_string(), user));
                }
            }
        }
    }
    None
}

/// The decoded credentials of a `Basic` header, if any.
fn basic_decoded(value: &str) -> Option<String> {
    use base64::Engine;
    let (scheme, rest) = value.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let rest = rest.trim();
    let e = &base64::engine::general_purpose::STANDARD;
    let bytes = e
        .decode(rest)
        .or_else(|_| base64::engine::general_purpose::STANDARD_NO_PAD.decode(rest))
        .or_else(|_| base64::engine::general_purpose::URL_SAFE.decode(rest))
        .or_else(|_| base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(rest))
        .ok()?;
    String::from_utf8(bytes).ok()
}

/// Every token-length slice of `value` that starts with the exact prefix.
fn token_candidates(value: &str) -> impl Iterator<Item = &str> {
    value
        .match_indices(PREFIX)
        .filter_map(move |(i, _)| value.get(i..i + PREFIX.len() + SECRET_HEX_LEN))
}

/// The path as recorded: at most [`MAX_PATH_BYTES`], anything that may be a
/// token (an `ib_mcp_` marker in any case and what follows it, or a long run
/// of hex digits) masked, and control characters replaced.
pub fn sanitize_path(path: &str) -> String {
    let mut out = String::with_capacity(path.len().min(MAX_PATH_BYTES));
    let mut rest = path;
    while !rest.is_empty() {
        if starts_with_marker(rest) {
            out.push_str(MASK);
            let skip = PREFIX.len()
                + rest
                    .get(PREFIX.len()..)
                    .map_or(0, |r| r.bytes().take_while(|b| b.is_ascii_alphanumeric()).count());
            rest = rest.get(skip..).unwrap_or_default();
            continue;
        }
        let hex_run = rest.bytes().take_while(u8::is_ascii_hexdigit).count();
        if hex_run >= HEX_RUN_MASK {
            out.push_str(MASK);
            rest = rest.get(hex_run..).unwrap_or_default();
            continue;
        }
        let step = hex_run.max(1);
        let (head, tail) = match rest.char_indices().nth(step) {
            Some((i, _)) => (rest.get(..i).unwrap_or(rest), rest.get(i..).unwrap_or_default()),
            None => (rest, ""),
        };
        out.extend(head.chars().map(|c| if c.is_control() { '?' } else { c }));
        rest = tail;
    }
    if out.len() > MAX_PATH_BYTES {
        let cut = truncate(&out, MAX_PATH_BYTES).len();
        out.truncate(cut);
    }
    out
}

fn starts_with_marker(s: &str) -> bool {
    s.as_bytes().get(..PREFIX.len()).is_some_and(|b| b.eq_ignore_ascii_case(PREFIX.as_bytes()))
}

/// The longest prefix of `s` of at most `max` bytes that ends on a char boundary.
fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.get(..end).unwrap_or_default()
}

/// The `mcp_access_log.outcome` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Success,
    Unauthorized,
    Forbidden,
    RateLimited,
    NotFound,
    BadRequest,
    UpstreamError,
    PolicyUnavailable,
}

impl Outcome {
    pub const ALL: [Outcome; 8] = [
        Outcome::Success,
        Outcome::Unauthorized,
        Outcome::Forbidden,
        Outcome::RateLimited,
        Outcome::NotFound,
        Outcome::BadRequest,
        Outcome::UpstreamError,
        Outcome::PolicyUnavailable,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::Unauthorized => "unauthorized",
            Outcome::Forbidden => "forbidden",
            Outcome::RateLimited => "rate_limited",
            Outcome::NotFound => "not_found",
            Outcome::BadRequest => "bad_request",
            Outcome::UpstreamError => "upstream_error",
            Outcome::PolicyUnavailable => "policy_unavailable",
        }
    }

    fn from_str(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|o| o.as_str() == s)
    }

    /// The outcome of a response status (no status, 0, means the upstream
    /// never answered).
    pub fn of_status(status: u32) -> Self {
        match status {
            100..=399 => Outcome::Success,
            401 => Outcome::Unauthorized,
            403 => Outcome::Forbidden,
            404 | 405 => Outcome::NotFound,
            429 => Outcome::RateLimited,
            400..=499 => Outcome::BadRequest,
            _ => Outcome::UpstreamError,
        }
    }
}

/// The outcome of a logged request: a denial by its reason, a forwarded
/// request by the status the client got.
pub fn outcome(record: &AuditRecord, status: u32) -> Outcome {
    match record.decision {
        Decision::Allow => Outcome::of_status(status),
        Decision::Deny => record
            .reason
            .as_deref()
            .and_then(reason_outcome)
            .unwrap_or_else(|| Outcome::of_status(status)),
    }
}

/// The outcome of a denial reason (an [`ErrorCode`] string).
pub fn reason_outcome(reason: &str) -> Option<Outcome> {
    ErrorCode::ALL.into_iter().find(|c| c.as_str() == reason).and_then(|c| Outcome::from_str(c.outcome()))
}

#[cfg(test)]
mod hmac_tests {
    use super::*;
    #[cfg(all(target_family = "wasm", target_os = "unknown"))]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn hmac_matches_rfc_4231_with_a_32_byte_key() {
        // RFC 4231 test case 2 uses a short key; pad it as HMAC does (keys
        // shorter than the block are zero-padded), so a 32-byte zero-padded
        // "Jefe" gives the same MAC.
        let mut key = [0u8; 32];
        key[..4].copy_from_slice(b"Jefe");
        assert_eq!(
            hex::encode(hmac_sha256(&key, b"what do ya want for nothing?")),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    #[cfg(all(target_family = "wasm", target_os = "unknown"))]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    use super::*;
    use crate::snapshot::{Limits, Snapshot, SnapshotToken, SnapshotUser, SCHEMA as SNAPSHOT_SCHEMA};
    use crate::token;

    type TestResult<T = ()> = Result<T, Box<dyn std::error::Error>>;

    const PA: &str = "0b7a4c2e-1f3d-4c5b-9a8e-7d6c5b4a3f21";
    const B1: &str = "2b7a4c2e-1f3d-4c5b-9a8e-7d6c5b4a3f21";

    fn tok(n: u8) -> String {
        token::mint(&[n; 24])
    }

    fn policy() -> TestResult<Policy> {
        Ok(Policy::compile(&Snapshot {
            schema: SNAPSHOT_SCHEMA,
            version: "v".into(),
            generated_at: 0,
            limits: Limits::default(),
            tokens: vec![SnapshotToken {
                token_id: tok(1)[7..23].to_string(),
                token_hash: token::hash_hex(&tok(1)),
                user_id: "u1".into(),
                expires_at: 1_000,
                allow_trigger: false,
                projects: BTreeMap::from([(PA.into(), None)]),
            }],
            users: BTreeMap::from([(
                "u1".into(),
                SnapshotUser { read_credential: Some("READCRED".into()), write_credential: None },
            )]),
        })?)
    }

    fn facts(method: &str, path: &str, auth: &[&str], cookie: &[&str]) -> TestResult<RequestFacts> {
        let others: Vec<(&str, &str)> =
            auth.iter().map(|a| ("authorization", *a)).chain(cookie.iter().map(|c| ("cookie", *c))).collect();
        let headers = crate::pipeline::request_headers(method, path, "infrabox.test", &others);
        Ok(RequestFacts::describe(&RequestHead::new(&headers), Some(&policy()?), &RouteTable::default(), true))
    }

    fn origin() -> VmOrigin {
        VmOrigin { node_id: "node-1".into(), vm_id: "vm-a".into() }
    }

    #[test]
    fn allowed_request_is_attributed_and_routed() -> TestResult {
        let auth = format!("Bearer {}", tok(1));
        let f = facts("GET", &format!("/api/v1/mcp/projects/{PA}/builds?size=5&x={}", tok(1)), &[&auth], &[])?;
        assert_eq!(f.route.as_deref(), Some("builds.list"));
        assert_eq!(f.class, Some(Class::Default));
        assert_eq!(f.project.as_deref(), Some(PA));
        assert_eq!(f.token_id.as_deref(), Some(&tok(1)[7..23]));
        assert_eq!(f.user_id.as_deref(), Some("u1"));
        assert_eq!(f.path, format!("/api/v1/mcp/projects/{PA}/builds"));
        let r = f.record(&origin(), 7, Verdict::Forward, Some(29));
        assert_eq!(r.decision, Decision::Allow);
        assert_eq!(r.reason, None);
        assert_eq!(r.seq, 7);
        let json = String::from_utf8(r.to_json())?;
        assert!(!json.contains(&tok(1)[23..]), "{json}");
        assert!(!json.contains("READCRED"), "{json}");
        assert_eq!(AuditRecord::from_json(json.as_bytes())?, r);
        let v: serde_json::Value = serde_json::from_str(&json)?;
        assert_eq!(v["schema"], SCHEMA);
        assert_eq!(v["node_id"], "node-1");
        assert_eq!(v["vm_id"], "vm-a");
        assert_eq!(v["class"], "default");
        assert_eq!(v["decision"], "allow");
        assert_eq!(v["rate_limit_remaining"], 29);
        Ok(())
    }

    #[test]
    fn denials_carry_the_reason_and_what_is_known() -> TestResult {
        let auth = format!("Bearer {}", tok(1));
        let d = Denial::new(ErrorCode::WriteForbidden, "no");
        let f = facts("POST", &format!("/api/v1/mcp/projects/{PA}/trigger"), &[&auth], &[])?;
        let r = f.record(&origin(), 1, Verdict::Deny(&d), None);
        assert_eq!((r.decision, r.reason.as_deref()), (Decision::Deny, Some("write_forbidden")));
        assert_eq!(r.route.as_deref(), Some("projects.trigger"));
        assert_eq!(r.class, Some(Class::Write));
        // 404 and 405 still name the project and the token.
        let f = facts("GET", &format!("/api/v1/mcp/projects/{PA}/nope"), &[&auth], &[])?;
        assert_eq!((f.route.as_deref(), f.project.as_deref()), (None, Some(PA)));
        assert!(f.token_id.is_some());
        let f = facts("DELETE", &format!("/api/v1/mcp/projects/{PA}/builds/{B1}"), &[&auth], &[])?;
        assert_eq!((f.route.as_deref(), f.project.as_deref()), (None, Some(PA)));
        Ok(())
    }

    #[test]
    fn only_a_presented_secret_attributes() -> TestResult {
        // Unknown token with a real token_id: not attributed.
        let forged = format!("ib_mcp_{}{}", &tok(1)[7..23], "0".repeat(32));
        let f = facts("GET", "/api/v1/mcp/projects", &[&format!("Bearer {forged}")], &[])?;
        assert_eq!((f.token_id, f.user_id), (None, None));
        // Malformed: nothing.
        let f = facts("GET", "/api/v1/mcp/projects", &["Bearer ib_mcp_zz"], &[])?;
        assert_eq!(f.token_id, None);
        // Elsewhere, any form: lowercase bearer, Basic, cookie.
        use base64::Engine;
        let basic = base64::engine::general_purpose::STANDARD.encode(format!("infrabox:{}", tok(1)));
        for (a, c) in [
            (vec![format!("bearer {}", tok(1))], vec![]),
            (vec![format!("Basic {basic}")], vec![]),
            (vec![], vec![format!("theme=dark; token={}", tok(1))]),
        ] {
            let a: Vec<&str> = a.iter().map(String::as_str).collect();
            let c: Vec<&str> = c.iter().map(String::as_str).collect();
            let f = facts("GET", &format!("/api/v1/projects/{PA}"), &a, &c)?;
            assert_eq!(f.token_id.as_deref(), Some(&tok(1)[7..23]));
            assert_eq!((f.route, f.project), (None, None));
        }
        // No policy: no attribution.
        let auth = format!("Bearer {}", tok(1));
        let headers = crate::pipeline::request_headers("GET", "/api/v1/mcp/projects", "infrabox.test", &[("authorization", &auth)]);
        let head = RequestHead::new(&headers);
        assert_eq!(RequestFacts::describe(&head, None, &RouteTable::default(), true).token_id, None);
        // Another host has no MCP routes.
        let f = RequestFacts::describe(&head, Some(&policy()?), &RouteTable::default(), false);
        assert_eq!((f.route, f.token_id.is_some()), (None, true));
        Ok(())
    }

    #[test]
    fn paths_never_keep_anything_token_like() -> TestResult {
        let t = tok(7);
        assert_eq!(sanitize_path(&format!("/api/v1/mcp/{t}/x")), "/api/v1/mcp/[redacted]/x");
        assert_eq!(sanitize_path(&format!("/a/{}", t.to_uppercase())), "/a/[redacted]");
        assert_eq!(sanitize_path(&format!("/a/{}", &t[7..])), "/a/[redacted]");
        assert_eq!(sanitize_path(&format!("/p/{PA}")), format!("/p/{PA}"));
        assert_eq!(sanitize_path("/a\u{1}b\nc"), "/a?b?c");
        assert_eq!(sanitize_path("/ünï/ib_mcp_"), "/ünï/[redacted]");
        let long = format!("/{}", "é".repeat(600));
        let s = sanitize_path(&long);
        assert!(s.len() <= MAX_PATH_BYTES && s.starts_with("/é"));
        Ok(())
    }

    #[test]
    fn outcomes() -> TestResult {
        let mut r = facts("GET", "/api/v1/mcp/projects", &[], &[])?.record(&origin(), 1, Verdict::Forward, None);
        for (status, o) in [
            (200, Outcome::Success),
            (302, Outcome::Success),
            (401, Outcome::Unauthorized),
            (403, Outcome::Forbidden),
            (404, Outcome::NotFound),
            (429, Outcome::RateLimited),
            (400, Outcome::BadRequest),
            (500, Outcome::UpstreamError),
            (0, Outcome::UpstreamError),
        ] {
            assert_eq!(outcome(&r, status), o, "{status}");
        }
        r.decision = Decision::Deny;
        for (code, o) in [
            (ErrorCode::BadPath, Outcome::BadRequest),
            (ErrorCode::InvalidToken, Outcome::Unauthorized),
            (ErrorCode::UnknownEndpoint, Outcome::NotFound),
            (ErrorCode::MethodNotAllowed, Outcome::NotFound),
            (ErrorCode::RateLimited, Outcome::RateLimited),
            (ErrorCode::ProjectForbidden, Outcome::Forbidden),
            (ErrorCode::WriteForbidden, Outcome::Forbidden),
            (ErrorCode::McpTokenNotAccepted, Outcome::Forbidden),
            (ErrorCode::PolicyUnavailable, Outcome::PolicyUnavailable),
            (ErrorCode::UpstreamCredentialMissing, Outcome::UpstreamError),
            (ErrorCode::CredentialMisplaced, Outcome::BadRequest),
            (ErrorCode::OwnershipUnavailable, Outcome::PolicyUnavailable),
            (ErrorCode::NotSupportedUpstream, Outcome::UpstreamError),
        ] {
            r.reason = Some(code.as_str().into());
            assert_eq!(outcome(&r, code.status()), o, "{code:?}");
        }
        r.reason = Some("something_new".into());
        assert_eq!(outcome(&r, 403), Outcome::Forbidden);
        Ok(())
    }

    #[test]
    fn bad_records_are_refused_without_echo() -> TestResult {
        assert!(AuditRecord::from_json(b"{}").is_err());
        let Err(e) = AuditRecord::from_json(br#"{"schema":1,"secret":"ib_mcp_x""#) else { return Err("accepted".into()) };
        assert!(!e.0.contains("ib_mcp"));
        let mut r = facts("GET", "/x", &[], &[])?.record(&origin(), 1, Verdict::Forward, None);
        r.seq = 0;
        assert!(AuditRecord::from_json(&r.to_json()).is_err());
        // Unknown fields (a newer writer) are accepted.
        let mut v: serde_json::Value = serde_json::from_slice(&facts("GET", "/x", &[], &[])?.record(&origin(), 3, Verdict::Forward, None).to_json())?;
        v["new_field"] = serde_json::json!(1);
        assert_eq!(AuditRecord::from_json(v.to_string().as_bytes())?.seq, 3);
        Ok(())
    }
}
