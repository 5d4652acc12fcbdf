//! Refusals and their JSON error bodies (DESIGN §4):
//! `{"error":"<code>","message":"<human text>","request_id":"..."}`.

use serde::Serialize;

/// The error codes the gateway answers with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    BadPath,
    InvalidToken,
    UnknownEndpoint,
    MethodNotAllowed,
    RateLimited,
    ProjectForbidden,
    WriteForbidden,
    /// An `ib_mcp_` credential on a path outside the MCP surface.
    McpTokenNotAccepted,
    /// No policy snapshot yet (fail closed).
    PolicyUnavailable,
    /// The user has no upstream credential of the needed kind yet.
    UpstreamCredentialMissing,
    /// An MCP secret somewhere else than the `Authorization` header of an
    /// MCP request (query string, cookie, another header).
    CredentialMisplaced,
    /// Whether a build or job belongs to the project could not be checked.
    OwnershipUnavailable,
    /// InfraBox cannot perform this route for the gateway (501).
    NotSupportedUpstream,
    /// The policy is older than `max_policy_age_seconds` (control plane away).
    PolicyStale,
    /// An MCP endpoint request from a browser page of another origin.
    OriginForbidden,
    /// An MCP endpoint body over `mcp_max_body_bytes` (413).
    RequestTooLarge,
    /// An MCP endpoint body that is not `application/json` (415).
    UnsupportedMediaType,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 17] = [
        ErrorCode::BadPath,
        ErrorCode::InvalidToken,
        ErrorCode::UnknownEndpoint,
        ErrorCode::MethodNotAllowed,
        ErrorCode::RateLimited,
        ErrorCode::ProjectForbidden,
        ErrorCode::WriteForbidden,
        ErrorCode::McpTokenNotAccepted,
        ErrorCode::PolicyUnavailable,
        ErrorCode::UpstreamCredentialMissing,
        ErrorCode::CredentialMisplaced,
        ErrorCode::OwnershipUnavailable,
        ErrorCode::NotSupportedUpstream,
        ErrorCode::PolicyStale,
        ErrorCode::OriginForbidden,
        ErrorCode::RequestTooLarge,
        ErrorCode::UnsupportedMediaType,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadPath => "bad_path",
            ErrorCode::InvalidToken => "invalid_token",
            ErrorCode::UnknownEndpoint => "unknown_endpoint",
            ErrorCode::MethodNotAllowed => "method_not_allowed",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::ProjectForbidden => "project_forbidden",
            ErrorCode::WriteForbidden => "write_forbidden",
            ErrorCode::McpTokenNotAccepted => "mcp_token_not_accepted",
            ErrorCode::PolicyUnavailable => "policy_unavailable",
            ErrorCode::UpstreamCredentialMissing => "upstream_credential_missing",
            ErrorCode::CredentialMisplaced => "credential_misplaced",
            ErrorCode::OwnershipUnavailable => "ownership_unavailable",
            ErrorCode::NotSupportedUpstream => "not_supported_upstream",
            ErrorCode::PolicyStale => "policy_stale",
            ErrorCode::OriginForbidden => "origin_forbidden",
            ErrorCode::RequestTooLarge => "request_too_large",
            ErrorCode::UnsupportedMediaType => "unsupported_media_type",
        }
    }

    pub fn status(self) -> u32 {
        match self {
            ErrorCode::BadPath | ErrorCode::CredentialMisplaced => 400,
            ErrorCode::InvalidToken => 401,
            ErrorCode::UnknownEndpoint => 404,
            ErrorCode::MethodNotAllowed => 405,
            ErrorCode::RateLimited => 429,
            ErrorCode::ProjectForbidden | ErrorCode::WriteForbidden | ErrorCode::McpTokenNotAccepted | ErrorCode::OriginForbidden => 403,
            ErrorCode::PolicyUnavailable
            | ErrorCode::PolicyStale
            | ErrorCode::UpstreamCredentialMissing
            | ErrorCode::OwnershipUnavailable => 503,
            ErrorCode::NotSupportedUpstream => 501,
            ErrorCode::RequestTooLarge => 413,
            ErrorCode::UnsupportedMediaType => 415,
        }
    }

    /// Audit outcome (DESIGN §10 / issue "Audit").
    pub fn outcome(self) -> &'static str {
        match self {
            ErrorCode::BadPath
            | ErrorCode::CredentialMisplaced
            | ErrorCode::RequestTooLarge
            | ErrorCode::UnsupportedMediaType => "bad_request",
            ErrorCode::InvalidToken => "unauthorized",
            ErrorCode::UnknownEndpoint | ErrorCode::MethodNotAllowed => "not_found",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::ProjectForbidden | ErrorCode::WriteForbidden | ErrorCode::McpTokenNotAccepted | ErrorCode::OriginForbidden => {
                "forbidden"
            }
            ErrorCode::PolicyUnavailable | ErrorCode::PolicyStale | ErrorCode::OwnershipUnavailable => "policy_unavailable",
            ErrorCode::UpstreamCredentialMissing | ErrorCode::NotSupportedUpstream => "upstream_error",
        }
    }
}

/// A final refusal: status, code, message and extra response headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial {
    pub code: ErrorCode,
    pub message: String,
    pub headers: Vec<(&'static str, String)>,
}

#[derive(Serialize)]
struct Body<'a> {
    error: &'static str,
    message: &'a str,
    request_id: &'a str,
}

impl Denial {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        let mut headers = Vec::new();
        if code == ErrorCode::InvalidToken {
            headers.push(("www-authenticate", r#"Bearer realm="infrabox-mcp""#.to_string()));
        }
        Self { code, message: message.into(), headers }
    }

    pub fn with_header(mut self, name: &'static str, value: String) -> Self {
        self.headers.push((name, value));
        self
    }

    pub fn status(&self) -> u32 {
        self.code.status()
    }

    /// The JSON body for this refusal.
    pub fn body(&self, request_id: &str) -> String {
        serde_json::to_string(&Body { error: self.code.as_str(), message: &self.message, request_id })
            .unwrap_or_else(|_| format!(r#"{{"error":"{}"}}"#, self.code.as_str()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(all(target_family = "wasm", target_os = "unknown"))]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn body_is_json_with_escaping() -> Result<(), serde_json::Error> {
        let d = Denial::new(ErrorCode::InvalidToken, "bad \"token\"");
        let v: serde_json::Value = serde_json::from_str(&d.body("r\n1"))?;
        assert_eq!(v["error"], "invalid_token");
        assert_eq!(v["message"], "bad \"token\"");
        assert_eq!(v["request_id"], "r\n1");
        assert_eq!(d.status(), 401);
        assert_eq!(d.headers.first().map(|h| h.0), Some("www-authenticate"));
        Ok(())
    }
}
