//! `InfraBoxClient`: the two calls the control plane makes to InfraBox's
//! real API on a user's behalf, with that user's session JWT:
//! `POST /api/v1/user/global-tokens` and `DELETE /api/v1/user/global-tokens/{id}`.
//!
//! Errors name the call and the status, never a session or a token.

use std::time::Duration;

use serde_json::{json, Value};
use uuid::Uuid;

use super::CredentialKind;

/// A global token InfraBox minted.
pub struct GlobalToken {
    pub id: Uuid,
    /// The JWT. Never logged.
    pub token: String,
}

impl std::fmt::Debug for GlobalToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GlobalToken").field("id", &self.id).finish_non_exhaustive()
    }
}

/// Why an InfraBox call failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfraBoxError(pub String);

impl std::fmt::Display for InfraBoxError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for InfraBoxError {}

/// HTTP client of one InfraBox API base URL.
#[derive(Clone)]
pub struct InfraBoxClient {
    base: String,
    http: reqwest::Client,
}

impl InfraBoxClient {
    /// `base` is InfraBox's URL, e.g. `http://infrabox-api.infrabox-system:8080`.
    pub fn new(base: &str, timeout: Duration) -> Result<Self, InfraBoxError> {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| InfraBoxError(format!("cannot build the InfraBox HTTP client: {e}")))?;
        Ok(Self { base: base.trim_end_matches('/').to_string(), http })
    }

    /// Mints a global token for the session's user.
    pub async fn create_global_token(
        &self,
        session: &str,
        kind: CredentialKind,
        expires_days: i64,
    ) -> Result<GlobalToken, InfraBoxError> {
        let body = json!({
            "description": format!("MCP gateway {} credential (managed; do not delete)", kind.as_str()),
            "scope_push": kind.scope_push(),
            "scope_pull": true,
            "expires_days": expires_days,
        });
        let resp = self
            .http
            .post(format!("{}/api/v1/user/global-tokens", self.base))
            .bearer_auth(session)
            .json(&body)
            .send()
            .await
            .map_err(|e| InfraBoxError(format!("creating an InfraBox global token failed: {}", transport(&e))))?;
        let status = resp.status();
        if !status.is_success() {
            return Err(InfraBoxError(format!("InfraBox refused to create a global token (HTTP {})", status.as_u16())));
        }
        let v: Value = resp
            .json()
            .await
            .map_err(|_| InfraBoxError("InfraBox answered the global-token creation with a body that is not JSON".into()))?;
        // InfraBox answers the fields at top level; some versions wrap them in `data`.
        let v = if v.get("token").is_some() { &v } else { v.get("data").unwrap_or(&v) };
        let id = v.get("id").and_then(Value::as_str).and_then(|s| Uuid::parse_str(s).ok());
        let token = v.get("token").and_then(Value::as_str).filter(|t| !t.is_empty());
        match (id, token) {
            (Some(id), Some(token)) => Ok(GlobalToken { id, token: token.to_string() }),
            _ => Err(InfraBoxError("InfraBox's global-token answer has no id or token".into())),
        }
    }

    /// Deletes a global token of the session's user; an unknown id is fine.
    pub async fn delete_global_token(&self, session: &str, id: Uuid) -> Result<(), InfraBoxError> {
        let resp = self
            .http
            .delete(format!("{}/api/v1/user/global-tokens/{id}", self.base))
            .bearer_auth(session)
            .send()
            .await
            .map_err(|e| InfraBoxError(format!("deleting InfraBox global token {id} failed: {}", transport(&e))))?;
        let status = resp.status();
        if status.is_success() || status.as_u16() == 404 {
            Ok(())
        } else {
            Err(InfraBoxError(format!("InfraBox refused to delete global token {id} (HTTP {})", status.as_u16())))
        }
    }
}

/// A transport error without the URL's query or any header.
fn transport(e: &reqwest::Error) -> &'static str {
    if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "cannot connect"
    } else {
        "transport error"
    }
}
