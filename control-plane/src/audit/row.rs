//! `AuditRow`: one `mcp_access_log` row made from one Envoy access-log entry
//! — the filter's [`AuditRecord`] (who, what, decision, sequence) plus what
//! only Envoy knows at the end of the stream (status, duration, bytes,
//! request id, client address).
//!
//! Nothing client-controlled is copied unchecked: the path comes from the
//! record (query dropped, token-like parts masked by the filter), Envoy's own
//! path and headers are never stored, and a request id that is not a plain
//! token of at most 128 characters (or that looks like an MCP token) is
//! dropped.

use chrono::{DateTime, NaiveDateTime, Utc};
use envoy_types::pb::envoy::data::accesslog::v3::HttpAccessLogEntry;
use mcp_filter_core::audit::{self, AuditRecord, Decision, Outcome, FILTER_STATE_KEY, RESULT_FILTER_STATE_KEY};
use mcp_filter_core::path::{self, Area};
use prost::Message;
use serde_json::{json, Value};
use uuid::Uuid;

/// Column limits of migration 0003 (and 00047's `ip`).
const MAX_NODE: usize = 256;
const MAX_VM: usize = 64;
const MAX_ROUTE: usize = 64;
const MAX_REQUEST_ID: usize = 128;
const MAX_IP: usize = 64;

/// One row for `mcp_access_log`.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditRow {
    pub id: Uuid,
    pub token_id: Option<String>,
    pub user_id: Option<Uuid>,
    pub action: String,
    pub outcome: Outcome,
    pub details: Value,
    /// The denial reason (error code), if any.
    pub error: Option<String>,
    pub ip: Option<String>,
    /// Request start, naive UTC (as InfraBox stores timestamps).
    pub accessed_at: NaiveDateTime,
    pub method: String,
    pub path: String,
    pub status_code: Option<i16>,
    pub duration_us: Option<i64>,
    pub bytes_in: i64,
    pub bytes_out: i64,
    pub project_id: Option<Uuid>,
    pub request_id: Option<String>,
    pub route: Option<String>,
    pub class: Option<String>,
    pub node_id: String,
    pub vm_id: String,
    pub seq: i64,
}

/// Why an entry makes no row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Skip {
    /// The entry has no `wasm.mcp_audit` filter state: not an audited request.
    NoRecord,
    /// The filter state is not a readable record (the text never quotes it).
    Invalid(String),
}

impl AuditRow {
    /// Builds the row of one HTTP access-log entry.
    pub fn from_entry(entry: &HttpAccessLogEntry) -> Result<Self, Skip> {
        let common = entry.common_properties.as_ref().ok_or(Skip::NoRecord)?;
        let any = common.filter_state_objects.get(FILTER_STATE_KEY).ok_or(Skip::NoRecord)?;
        let bytes = filter_state_bytes(any)?;
        let record = AuditRecord::from_json(&bytes).map_err(|e| Skip::Invalid(e.0))?;
        // A tool call's upstream status (the client got 200 and a tool result).
        let upstream_status = common
            .filter_state_objects
            .get(RESULT_FILTER_STATE_KEY)
            .and_then(|any| filter_state_bytes(any).ok())
            .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
            .and_then(|v| v.get("upstream_status").and_then(Value::as_u64))
            .and_then(|s| u32::try_from(s).ok());
        let seq = i64::try_from(record.seq).map_err(|_| Skip::Invalid("seq out of range".into()))?;
        let request = entry.request.as_ref();
        let response = entry.response.as_ref();
        let status = response.and_then(|r| r.response_code.as_ref()).map_or(0, |c| c.value);
        let outcome = match (record.decision, upstream_status) {
            (Decision::Allow, Some(upstream)) => Outcome::of_status(upstream),
            _ => audit::outcome(&record, status),
        };
        let accessed_at = common
            .start_time
            .as_ref()
            .and_then(|t| DateTime::<Utc>::from_timestamp(t.seconds, u32::try_from(t.nanos).unwrap_or(0)))
            .unwrap_or_else(Utc::now)
            .naive_utc();
        let duration_us = common
            .duration
            .as_ref()
            .or(common.time_to_last_downstream_tx_byte.as_ref())
            .map(|d| d.seconds.saturating_mul(1_000_000).saturating_add(i64::from(d.nanos / 1_000)));
        let bytes_in = request.map_or(0, |r| r.request_headers_bytes.saturating_add(r.request_body_bytes));
        let bytes_out = response.map_or(0, |r| r.response_headers_bytes.saturating_add(r.response_body_bytes));
        let ip = common
            .downstream_remote_address
            .as_ref()
            .and_then(|a| a.address.as_ref())
            .and_then(|a| match a {
                envoy_types::pb::envoy::config::core::v3::address::Address::SocketAddress(s) => Some(s.address.clone()),
                _ => None,
            })
            .filter(|s| !s.is_empty())
            .map(|s| cut(&s, MAX_IP));
        let action = match (&record.route, path::area(&record.path)) {
            (Some(route), _) => cut(route, MAX_ROUTE),
            (None, _) if record.mcp.is_some() => {
                cut(&format!("mcp.{}", record.mcp.as_ref().map_or("", |m| m.method.as_str())), MAX_ROUTE)
            }
            (None, Area::Mcp { .. }) => "mcp.unmatched".to_string(),
            (None, _) => "mcp.token_elsewhere".to_string(),
        };
        let mut details = json!({
            "schema": record.schema,
            "decision": match record.decision { Decision::Allow => "allow", Decision::Deny => "deny" },
        });
        if let Some(n) = record.rate_limit_remaining {
            details["rate_limit_remaining"] = json!(n);
        }
        if let Some(m) = &record.mcp {
            // The digest only: argument values may be secrets.
            let digest = m.arguments_hmac.as_deref().filter(|d| d.len() == 64 && d.bytes().all(|b| b.is_ascii_hexdigit()));
            details["mcp"] = json!({
                "method": cut(&m.method, audit::MAX_RPC_METHOD_BYTES),
                "tool": m.tool.as_deref().map(|t| cut(t, audit::MAX_RPC_METHOD_BYTES)),
                "arguments_hmac": digest,
                "upstream_status": upstream_status,
            });
        }
        if let Some(d) = response.map(|r| r.response_code_details.as_str()).filter(|d| !d.is_empty()) {
            details["response_code_details"] = json!(cut(d, 128));
        }
        Ok(Self {
            // Time-ordered (v7): appends to the primary-key index instead of
            // scattering random v4 keys through it (about twice the insert rate).
            id: Uuid::now_v7(),
            token_id: record.token_id.filter(|t| mcp_filter_core::token::is_token_id(t)),
            user_id: record.user_id.as_deref().and_then(|u| Uuid::parse_str(u).ok()),
            action,
            outcome,
            details,
            error: record.reason.map(|r| cut(&r, 64)),
            ip,
            accessed_at,
            method: cut(&record.method, audit::MAX_METHOD_BYTES),
            // Masked again here: the sink never trusts the writer to have.
            path: cut(&audit::sanitize_path(&record.path), audit::MAX_PATH_BYTES),
            status_code: i16::try_from(status).ok().filter(|s| *s > 0),
            duration_us,
            bytes_in: i64::try_from(bytes_in).unwrap_or(i64::MAX),
            bytes_out: i64::try_from(bytes_out).unwrap_or(i64::MAX),
            project_id: record.project.as_deref().and_then(|p| Uuid::parse_str(p).ok()),
            request_id: request.map(|r| r.request_id.as_str()).and_then(clean_request_id),
            route: record.route.map(|r| cut(&r, MAX_ROUTE)),
            class: record.class.map(|c| c.as_str().to_string()),
            node_id: cut(&record.node_id, MAX_NODE),
            vm_id: cut(&record.vm_id, MAX_VM),
            seq,
        })
    }
}

/// The JSON of a wasm filter state. Envoy packs it as
/// google.protobuf.BytesValue (StringValue has the same wire shape): field
/// 1 holds the bytes.
fn filter_state_bytes(any: &envoy_types::pb::google::protobuf::Any) -> Result<Vec<u8>, Skip> {
    envoy_types::pb::google::protobuf::BytesValue::decode(any.value.as_slice())
        .map(|b| b.value)
        .map_err(|_| Skip::Invalid(format!("filter state of type {:?} is not a bytes value", type_name(&any.type_url))))
}

/// The last part of a type URL, for messages.
fn type_name(url: &str) -> String {
    cut(url.rsplit('/').next().unwrap_or_default(), 64)
}

/// A request id worth storing: 1–128 visible ASCII characters from a safe
/// set, and nothing that looks like an MCP token.
pub fn clean_request_id(id: &str) -> Option<String> {
    let ok = !id.is_empty()
        && id.len() <= MAX_REQUEST_ID
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
        && !id.to_ascii_lowercase().contains(mcp_filter_core::token::PREFIX);
    ok.then(|| id.to_string())
}

/// At most `max` bytes of `s`, cut on a character boundary.
pub fn cut(s: &str, max: usize) -> String {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.get(..end).unwrap_or_default().to_string()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
pub(crate) mod tests {
    use std::collections::HashMap;

    use envoy_types::pb::envoy::config::core::v3::{address, Address, SocketAddress};
    use envoy_types::pb::envoy::data::accesslog::v3::{AccessLogCommon, HttpRequestProperties, HttpResponseProperties};
    use envoy_types::pb::google::protobuf::{Any, BytesValue, Duration, Timestamp, UInt32Value};
    use mcp_filter_core::route::Class;

    use super::*;

    pub(crate) fn record(seq: u64) -> AuditRecord {
        AuditRecord {
            schema: 1,
            node_id: "node-1".into(),
            vm_id: "vm-1".into(),
            seq,
            token_id: Some("0123456789abcdef".into()),
            user_id: Some("5b0e1a8c-9a51-4a86-9d8c-0c6a1b2c3d4e".into()),
            project: Some("0b7a4c2e-1f3d-4c5b-9a8e-7d6c5b4a3f21".into()),
            route: Some("projects.get".into()),
            class: Some(Class::Default),
            decision: Decision::Allow,
            reason: None,
            rate_limit_remaining: Some(29),
            method: "GET".into(),
            path: "/api/v1/mcp/projects/0b7a4c2e-1f3d-4c5b-9a8e-7d6c5b4a3f21".into(),
            mcp: None,
        }
    }

    /// An entry as Envoy sends it for `record` with response `status`.
    pub(crate) fn entry(record: Option<&AuditRecord>, status: u32) -> HttpAccessLogEntry {
        let mut fs = HashMap::new();
        if let Some(r) = record {
            fs.insert(
                FILTER_STATE_KEY.to_string(),
                Any {
                    type_url: "type.googleapis.com/google.protobuf.BytesValue".into(),
                    value: BytesValue { value: r.to_json() }.encode_to_vec(),
                },
            );
        }
        HttpAccessLogEntry {
            common_properties: Some(AccessLogCommon {
                filter_state_objects: fs,
                start_time: Some(Timestamp { seconds: 1_700_000_000, nanos: 500_000_000 }),
                duration: Some(Duration { seconds: 0, nanos: 1_250_000 }),
                downstream_remote_address: Some(Address {
                    address: Some(address::Address::SocketAddress(SocketAddress { address: "10.1.2.3".into(), ..Default::default() })),
                }),
                ..Default::default()
            }),
            request: Some(HttpRequestProperties {
                path: "/api/v1/projects/x?token=ib_mcp_leak".into(),
                request_id: "req-1".into(),
                request_headers_bytes: 100,
                request_body_bytes: 20,
                ..Default::default()
            }),
            response: Some(HttpResponseProperties {
                response_code: Some(UInt32Value { value: status }),
                response_headers_bytes: 50,
                response_body_bytes: 500,
                response_code_details: "via_upstream".into(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// Found by the `access_log` fuzz target: the row's path is masked by
    /// the sink too, whatever the record says.
    #[test]
    fn a_token_like_path_in_a_record_is_masked_in_the_row() {
        let mut r = record(6);
        r.path = "/api/v1/mcp/IB_MCP_0123456789abcdef0123456789abcdef0123456789abcdef/x".into();
        let row = AuditRow::from_entry(&entry(Some(&r), 401)).unwrap();
        assert!(!row.path.to_ascii_lowercase().contains("ib_mcp_"), "{}", row.path);
        assert!(row.path.contains("[redacted]"), "{}", row.path);
    }

    /// A tool call's row: outcome from InfraBox's status, the MCP facts in
    /// `details`, only a well-formed digest kept.
    #[test]
    fn a_tool_call_row_takes_its_outcome_from_the_upstream_status() {
        let mut r = record(7);
        r.mcp = Some(mcp_filter_core::audit::McpFacts {
            method: "tools/call".into(),
            tool: Some("get_build".into()),
            arguments_hmac: Some("ab".repeat(32)),
        });
        let mut e = entry(Some(&r), 200);
        if let Some(c) = e.common_properties.as_mut() {
            c.filter_state_objects.insert(
                RESULT_FILTER_STATE_KEY.to_string(),
                Any {
                    type_url: "type.googleapis.com/google.protobuf.BytesValue".into(),
                    value: BytesValue { value: br#"{"upstream_status":404}"#.to_vec() }.encode_to_vec(),
                },
            );
        }
        let row = AuditRow::from_entry(&e).unwrap();
        assert_eq!((row.outcome, row.status_code), (Outcome::NotFound, Some(200)));
        assert_eq!(row.details["mcp"]["tool"], "get_build");
        assert_eq!(row.details["mcp"]["upstream_status"], 404);
        assert_eq!(row.details["mcp"]["arguments_hmac"], "ab".repeat(32));
        r.mcp = Some(mcp_filter_core::audit::McpFacts { method: "tools/list".into(), tool: None, arguments_hmac: Some("not hex; a value".into()) });
        r.route = None;
        let row = AuditRow::from_entry(&entry(Some(&r), 200)).unwrap();
        assert_eq!(row.action, "mcp.tools/list");
        assert!(row.details["mcp"]["arguments_hmac"].is_null(), "only a digest is ever kept");
    }

    #[test]
    fn an_entry_becomes_a_row() {
        let row = AuditRow::from_entry(&entry(Some(&record(5)), 200)).unwrap();
        assert_eq!(row.outcome, Outcome::Success);
        assert_eq!(row.action, "projects.get");
        assert_eq!(row.status_code, Some(200));
        assert_eq!(row.duration_us, Some(1250));
        assert_eq!((row.bytes_in, row.bytes_out), (120, 550));
        assert_eq!(row.ip.as_deref(), Some("10.1.2.3"));
        assert_eq!(row.request_id.as_deref(), Some("req-1"));
        assert_eq!(row.seq, 5);
        assert_eq!(row.accessed_at.and_utc().timestamp_millis(), 1_700_000_000_500);
        assert_eq!(row.path, record(5).path, "the record's path, never Envoy's");
        assert_eq!(row.details["rate_limit_remaining"], 29);
        assert_eq!(row.class.as_deref(), Some("default"));
        assert!(row.project_id.is_some() && row.user_id.is_some());
    }

    #[test]
    fn denials_and_upstream_failures() {
        let mut r = record(1);
        r.decision = Decision::Deny;
        r.reason = Some("project_forbidden".into());
        let row = AuditRow::from_entry(&entry(Some(&r), 403)).unwrap();
        assert_eq!((row.outcome, row.error.as_deref()), (Outcome::Forbidden, Some("project_forbidden")));
        let row = AuditRow::from_entry(&entry(Some(&record(2)), 503)).unwrap();
        assert_eq!(row.outcome, Outcome::UpstreamError);
        let mut e = entry(Some(&record(3)), 0);
        e.response = None;
        let row = AuditRow::from_entry(&e).unwrap();
        assert_eq!((row.outcome, row.status_code), (Outcome::UpstreamError, None));
        let mut r = record(4);
        r.route = None;
        r.path = "/api/v1/projects/x".into();
        assert_eq!(AuditRow::from_entry(&entry(Some(&r), 403)).unwrap().action, "mcp.token_elsewhere");
        r.path = "/api/v1/mcp/nope".into();
        assert_eq!(AuditRow::from_entry(&entry(Some(&r), 404)).unwrap().action, "mcp.unmatched");
    }

    #[test]
    fn entries_without_a_record_or_with_garbage_are_skipped() {
        assert_eq!(AuditRow::from_entry(&entry(None, 200)), Err(Skip::NoRecord));
        assert_eq!(AuditRow::from_entry(&HttpAccessLogEntry::default()), Err(Skip::NoRecord));
        let mut e = entry(Some(&record(1)), 200);
        let any = e.common_properties.as_mut().unwrap().filter_state_objects.get_mut(FILTER_STATE_KEY).unwrap();
        any.value = BytesValue { value: b"{\"secret\":\"ib_mcp_x\"".to_vec() }.encode_to_vec();
        match AuditRow::from_entry(&e) {
            Err(Skip::Invalid(m)) => assert!(!m.contains("ib_mcp"), "{m}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn client_controlled_values_are_checked() {
        let mut e = entry(Some(&record(1)), 200);
        for bad in ["ib_mcp_0123456789abcdef", "has space", &"x".repeat(129), "a\"b"] {
            e.request.as_mut().unwrap().request_id = bad.to_string();
            assert_eq!(AuditRow::from_entry(&e).unwrap().request_id, None, "{bad}");
        }
        let mut r = record(1);
        r.token_id = Some("not-a-token-id".into());
        r.user_id = Some("nope".into());
        r.project = Some("nope".into());
        let row = AuditRow::from_entry(&entry(Some(&r), 200)).unwrap();
        assert_eq!((row.token_id, row.user_id, row.project_id), (None, None, None));
        assert_eq!(cut("ééé", 3), "é");
    }
}
