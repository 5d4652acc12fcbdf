//! Tool results (DESIGN §15): an upstream answer or a gateway denial as the
//! `result` of a `tools/call`. JSON answers become `structuredContent` with a
//! text rendering, the log is text with its cut stated, binary answers an
//! embedded resource up to the configured size; denials and upstream
//! failures are results with `isError: true` and a message an agent can act
//! on — never JSON-RPC errors, which are for protocol faults.

use base64::Engine;
use serde_json::{json, Value};

use crate::denial::Denial;

use super::{complete, Era};

/// How a route's answer is rendered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Form {
    /// The console log: text, tail-limited.
    Log,
    /// By the answer's content type: JSON, text, or an embedded resource.
    ByType,
}

/// An upstream answer, as buffered for a tool result.
#[derive(Debug, Clone)]
pub struct Answer<'a> {
    pub status: u32,
    pub content_type: &'a str,
    /// What was kept of the body (the log's tail, or all of it).
    pub body: &'a [u8],
    /// Bytes the upstream sent in all.
    pub total: u64,
    /// Bytes past which the body was not kept (`total > limit`: refused,
    /// except for the log, which keeps its tail).
    pub limit: u64,
    /// The resource URI of an embedded answer.
    pub uri: &'a str,
}

fn text(t: impl Into<String>) -> Value {
    json!({"type": "text", "text": t.into()})
}

/// The tool result of an upstream answer.
pub fn answer(a: &Answer<'_>, form: Form, era: Era) -> Value {
    let fail = |message: String| complete(json!({"content": [text(message)], "isError": true}), era);
    if !(200..300).contains(&a.status) {
        return fail(upstream_failure(a));
    }
    if form == Form::Log {
        let mut content = vec![text(String::from_utf8_lossy(a.body).into_owned())];
        if a.total > a.body.len() as u64 {
            content.push(text(format!(
                "[log cut: showing the last {} of {} bytes; ask with a smaller max_bytes for less]",
                a.body.len(),
                a.total
            )));
        }
        return complete(json!({"content": content, "isError": false}), era);
    }
    if a.total > a.limit {
        return fail(format!(
            "the answer is {} bytes, more than the {} bytes the gateway puts into one tool result; \
             use the REST route or ask the operator to raise mcp_max_result_bytes / mcp_max_artifact_bytes",
            a.total, a.limit
        ));
    }
    let ct = a.content_type.to_ascii_lowercase();
    if ct.contains("json") {
        if let (Ok(v), Ok(raw)) = (serde_json::from_slice::<Value>(a.body), std::str::from_utf8(a.body)) {
            // The text block is the body as InfraBox sent it (no second
            // rendering of a large document in the VM's memory).
            let structured = if v.is_object() { v } else { json!({"result": v}) };
            return complete(json!({"content": [text(raw)], "structuredContent": structured, "isError": false}), era);
        }
    }
    if ct.starts_with("text/") || (ct.contains("json") && std::str::from_utf8(a.body).is_ok()) {
        return complete(json!({"content": [text(String::from_utf8_lossy(a.body).into_owned())], "isError": false}), era);
    }
    let mime = if ct.is_empty() { "application/octet-stream" } else { a.content_type };
    let blob = base64::engine::general_purpose::STANDARD.encode(a.body);
    complete(
        json!({
            "content": [{"type": "resource", "resource": {"uri": a.uri, "mimeType": mime, "blob": blob}}],
            "isError": false
        }),
        era,
    )
}

/// What an agent is told of a non-2xx upstream answer: InfraBox's own
/// message when it sent one.
fn upstream_failure(a: &Answer<'_>) -> String {
    // InfraBox's error shape `{"message": …}`; never raw body bytes (a
    // failed answer of a filtered route must not leak what it filters).
    let message = serde_json::from_slice::<Value>(a.body)
        .ok()
        .and_then(|v| v.get("message").and_then(Value::as_str).map(|m| m.chars().take(256).collect::<String>()))
        .map(|m| m.chars().map(|c| if c.is_control() { ' ' } else { c }).collect::<String>().trim().to_string())
        .unwrap_or_default();
    let what = match a.status {
        0 => "InfraBox did not answer".to_string(),
        s => format!("InfraBox answered HTTP {s}"),
    };
    let retry = if a.status >= 500 || a.status == 0 { "; retrying later may help" } else { "" };
    if message.is_empty() {
        format!("{what}{retry}")
    } else {
        format!("{what}: {message}{retry}")
    }
}

/// The tool result of a gateway denial. `hint`: what the agent can do
/// (e.g. the projects the token may access).
pub fn denial(d: &Denial, hint: Option<&str>, era: Era) -> Value {
    let mut message = format!("{}: {}", d.code.as_str(), d.message);
    if let Some(h) = hint {
        message.push_str("; ");
        message.push_str(h);
    }
    let mut structured = json!({"error": d.code.as_str(), "message": d.message, "status": d.status()});
    if let Some((_, v)) = d.headers.iter().find(|(k, _)| *k == "retry-after") {
        if let Ok(n) = v.parse::<u64>() {
            if let Some(o) = structured.as_object_mut() {
                o.insert("retry_after_seconds".into(), json!(n));
            }
        }
    }
    complete(json!({"content": [text(message)], "structuredContent": structured, "isError": true}), era)
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(all(target_family = "wasm", target_os = "unknown"))]
    use wasm_bindgen_test::wasm_bindgen_test as test;
    use crate::denial::ErrorCode;

    fn a<'a>(status: u32, ct: &'a str, body: &'a [u8], total: u64) -> Answer<'a> {
        Answer { status, content_type: ct, body, total, limit: 100, uri: "infrabox://x" }
    }

    #[test]
    fn answers_become_results_an_agent_can_read() {
        let r = answer(&a(200, "application/json", br#"[{"id":"p"}]"#, 12), Form::ByType, Era::Modern);
        assert_eq!(r["structuredContent"], json!({"result": [{"id": "p"}]}));
        assert_eq!((r["isError"].clone(), r["resultType"].clone()), (json!(false), json!("complete")));
        let r = answer(&a(200, "application/json", br#"{"id":"b"}"#, 10), Form::ByType, Era::Handshake);
        assert_eq!(r["structuredContent"], json!({"id": "b"}));
        assert!(r.get("resultType").is_none());
        let r = answer(&a(200, "text/plain", b"tail", 1000), Form::Log, Era::Handshake);
        assert_eq!(r["content"][0]["text"], "tail");
        assert!(r["content"][1]["text"].as_str().unwrap_or_default().contains("last 4 of 1000 bytes"));
        let r = answer(&a(200, "application/octet-stream", b"\x00\x01", 2), Form::ByType, Era::Handshake);
        assert_eq!(r["content"][0]["resource"]["blob"], "AAE=");
        let r = answer(&a(200, "application/octet-stream", b"", 5000), Form::ByType, Era::Handshake);
        assert_eq!(r["isError"], true);
        assert!(r["content"][0]["text"].as_str().unwrap_or_default().contains("5000 bytes"));
        let r = answer(&a(404, "application/json", br#"{"message":"Build not found","status":404}"#, 40), Form::ByType, Era::Handshake);
        assert_eq!(r["content"][0]["text"], "InfraBox answered HTTP 404: Build not found");
        let r = answer(&a(502, "text/html", b"<html>\n\x07bad gateway", 20), Form::Log, Era::Handshake);
        assert_eq!(r["isError"], true);
        assert_eq!(r["content"][0]["text"], "InfraBox answered HTTP 502; retrying later may help", "no raw body bytes");
        let r = answer(&a(403, "application/json", br#"[{"id":"p-secret"}]"#, 20), Form::ByType, Era::Handshake);
        assert_eq!(r["content"][0]["text"], "InfraBox answered HTTP 403", "a list body is never echoed");
    }

    #[test]
    fn denials_say_what_to_do() {
        let d = Denial::new(ErrorCode::RateLimited, "more than 10 log requests in 60 s; retry in 7 s").with_header("retry-after", "7".into());
        let r = denial(&d, None, Era::Modern);
        assert_eq!((r["isError"].clone(), r["structuredContent"]["retry_after_seconds"].clone()), (json!(true), json!(7)));
        let d = Denial::new(ErrorCode::ProjectForbidden, "this token may not access this project");
        let r = denial(&d, Some("it may access: p1"), Era::Handshake);
        assert_eq!(r["content"][0]["text"], "project_forbidden: this token may not access this project; it may access: p1");
    }
}
