//! `ApiError`: every error the control plane returns, rendered as
//! `{"error":"<code>","message":"<human text>","request_id":"..."}` — the
//! same shape as the filter's denials.
//!
//! Handlers return an [`ApiError`]; the [`request_id`] middleware fills in
//! the request id (the client's `x-request-id` or a generated one) and also
//! echoes it as a response header.

use axum::extract::Request;
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

/// An error response: HTTP status, stable machine code, human message.
/// The message never contains a credential.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self { status, code, message: message.into() }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    pub fn unauthorized(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, code, message)
    }

    pub fn internal() -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "internal error")
    }

    /// Logs a database failure (without parameters) and hides it from the client.
    pub fn database(err: sqlx::Error) -> Self {
        tracing::error!(error = %err, "database error");
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "database_unavailable", "the database is unavailable, try again")
    }

    pub fn body(&self, request_id: &str) -> String {
        #[derive(Serialize)]
        struct Body<'a> {
            error: &'a str,
            message: &'a str,
            request_id: &'a str,
        }
        serde_json::to_string(&Body { error: self.code, message: &self.message, request_id })
            .unwrap_or_else(|_| format!(r#"{{"error":"{}"}}"#, self.code))
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(err: sqlx::Error) -> Self {
        Self::database(err)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        // Rendered without a request id here; the middleware re-renders it.
        let mut res = (self.status, json_headers(), self.body("")).into_response();
        res.extensions_mut().insert(self);
        res
    }
}

fn json_headers() -> [(axum::http::header::HeaderName, HeaderValue); 2] {
    [
        (axum::http::header::CONTENT_TYPE, HeaderValue::from_static("application/json")),
        (axum::http::header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
    ]
}

/// The request id of the current request (an extension set by [`request_id`]).
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

/// Uses the client's `x-request-id` when it is sane, else a fresh UUID.
pub fn request_id_from(headers: &axum::http::HeaderMap) -> String {
    headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map(str::to_owned)
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string())
}

/// Middleware: assigns the request id and renders [`ApiError`] bodies with it.
pub async fn request_id(mut req: Request, next: Next) -> Response {
    let id = request_id_from(req.headers());
    req.extensions_mut().insert(RequestId(id.clone()));
    let mut res = next.run(req).await;
    if let Some(err) = res.extensions_mut().remove::<ApiError>() {
        let (mut parts, _) = res.into_parts();
        parts.headers.remove(axum::http::header::CONTENT_LENGTH);
        res = Response::from_parts(parts, axum::body::Body::from(err.body(&id)));
    }
    if let Ok(v) = HeaderValue::from_str(&id) {
        res.headers_mut().insert("x-request-id", v);
    }
    res
}

/// Fallback for unknown routes.
pub async fn route_not_found() -> ApiError {
    ApiError::not_found("no such route")
}

/// Fallback for a known route with the wrong method.
pub async fn method_not_allowed() -> ApiError {
    ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "method not allowed on this route")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_shape() {
        let e = ApiError::bad_request("name is \"required\"");
        let v: serde_json::Value = serde_json::from_str(&e.body("r1")).unwrap();
        assert_eq!(v["error"], "bad_request");
        assert_eq!(v["message"], "name is \"required\"");
        assert_eq!(v["request_id"], "r1");
    }

    #[test]
    fn request_id_is_sanitized() {
        let mut h = axum::http::HeaderMap::new();
        h.insert("x-request-id", HeaderValue::from_static("abc-123"));
        assert_eq!(request_id_from(&h), "abc-123");
        h.insert("x-request-id", HeaderValue::from_static("has space"));
        assert_ne!(request_id_from(&h), "has space");
        assert_eq!(request_id_from(&axum::http::HeaderMap::new()).len(), 36);
    }
}
