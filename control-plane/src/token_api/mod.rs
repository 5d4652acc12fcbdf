//! The token API on the public listener (DESIGN §12), session-authenticated,
//! with InfraBox's request/response field names so its dashboard keeps working:
//!
//! - `GET    /api/v1/mcp/tokens`                     own non-revoked tokens
//! - `POST   /api/v1/mcp/tokens`                     create (201, secret shown once)
//! - `GET|PATCH|DELETE /api/v1/mcp/tokens/{id}`      read, update, revoke
//! - `POST|DELETE /api/v1/mcp/tokens/{id}/trigger`   grant/withdraw writes
//! - `GET    /api/v1/mcp/tokens/{id}/access-log`     audit rows, newest first, paginated
//!
//! Every path also answers with a trailing slash.

pub mod access_log;
pub mod store;
pub mod validation;

use std::sync::Arc;

use axum::extract::{FromRequest, FromRequestParts, Path, Request, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use mcp_filter_core::token::{self, PREFIX, TOKEN_ID_LEN};
use serde_json::{json, Value};

use crate::credential::upstream::{CredentialError, UpstreamCredentials};
use crate::credential::CredentialKind;
use crate::error::{ApiError, RequestId};
use crate::session::SessionVerifier;
use store::{Actor, NewToken, StoreError, TokenChanges, TokenStore};
use validation::{parse_create, parse_update, EnabledProjects};

/// Largest accepted request body.
const MAX_BODY_BYTES: usize = 64 * 1024;

/// Shared state of the token API.
#[derive(Clone)]
pub struct TokenApi {
    pub store: TokenStore,
    pub sessions: Arc<SessionVerifier>,
    pub max_expiry_days: i64,
    pub credentials: UpstreamCredentials,
}

/// The routes, with JSON fallbacks for unknown paths and methods.
pub fn router(api: TokenApi) -> Router {
    let collection = get(list_tokens).post(create_token);
    let item = get(get_token).patch(update_token).delete(revoke_token);
    let trigger = axum::routing::post(grant_trigger).delete(withdraw_trigger);
    Router::new()
        .route("/api/v1/mcp/tokens", collection.clone())
        .route("/api/v1/mcp/tokens/", collection)
        .route("/api/v1/mcp/tokens/{token_id}", item.clone())
        .route("/api/v1/mcp/tokens/{token_id}/", item)
        .route("/api/v1/mcp/tokens/{token_id}/trigger", trigger.clone())
        .route("/api/v1/mcp/tokens/{token_id}/trigger/", trigger)
        .route("/api/v1/mcp/tokens/{token_id}/access-log", get(access_log::list))
        .route("/api/v1/mcp/tokens/{token_id}/access-log/", get(access_log::list))
        .fallback(crate::error::route_not_found)
        .method_not_allowed_fallback(crate::error::method_not_allowed)
        .with_state(api)
}

/// The authenticated caller: a valid InfraBox session of an existing user.
pub struct Caller(pub Actor);

impl FromRequestParts<TokenApi> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, api: &TokenApi) -> Result<Self, ApiError> {
        let session = api.sessions.authenticate(&parts.headers)?;
        if session.from_cookie {
            same_origin(&parts.method, &parts.headers)?;
        }
        if !api.store.user_exists(session.user_id).await? {
            return Err(ApiError::unauthorized("unknown_user", "the session's user does not exist in InfraBox"));
        }
        // Tokens that predate the gateway (InfraBox's own token API) get the
        // credentials they need now: best effort, the request goes on.
        match api.credentials.provision_missing(session.user_id, session.jwt.expose()).await {
            Ok(minted) if !minted.is_empty() => {
                tracing::info!(user_id = %session.user_id, ?minted, "provisioned upstream credentials for tokens created before the gateway");
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(user_id = %session.user_id, error = %e, "could not provision missing upstream credentials; next request retries"),
        }
        let request_id = parts.extensions.get::<RequestId>().map(|r| r.0.clone()).unwrap_or_default();
        Ok(Caller(Actor { user_id: session.user_id, session: session.jwt, ip: client_ip(&parts.headers), request_id }))
    }
}

/// A change authenticated by the `token` cookie must come from InfraBox's
/// own pages: InfraBox sets that cookie without `SameSite`, so a browser
/// attaches it to a form another site posts. Such a POST can only carry a
/// form or plain-text content type, so a JSON one is required; a browser's
/// cross-site `Origin` or `Sec-Fetch-Site` is refused for every change
/// (PATCH and DELETE cannot be sent cross-site without a CORS preflight,
/// which this API never grants; the dashboard revokes with a bodiless
/// DELETE). Requests authenticated by an `Authorization` header are not
/// affected: no browser adds one on its own.
fn same_origin(method: &Method, headers: &HeaderMap) -> Result<(), ApiError> {
    if matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS) {
        return Ok(());
    }
    let refuse = |why: &str| {
        Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "cross_site_request",
            format!("a change authenticated by the session cookie must come from the InfraBox site itself ({why})"),
        ))
    };
    let text = |name: header::HeaderName| headers.get(name).map(|v| v.to_str().unwrap_or("\u{fffd}").trim().to_ascii_lowercase());
    if let Some(site) = headers.get("sec-fetch-site").map(|v| v.to_str().unwrap_or_default().trim().to_ascii_lowercase()) {
        if !matches!(site.as_str(), "same-origin" | "none") {
            return refuse("Sec-Fetch-Site is not same-origin");
        }
    }
    if let Some(origin) = text(header::ORIGIN) {
        let host = text(header::HOST).unwrap_or_default();
        let origin_host = origin.strip_prefix("https://").or_else(|| origin.strip_prefix("http://"));
        if origin_host != Some(host.as_str()) || host.is_empty() {
            return refuse("Origin is another site");
        }
    }
    if *method == Method::POST {
        let mime = text(header::CONTENT_TYPE).unwrap_or_default();
        let mime = mime.split(';').next().unwrap_or_default().trim();
        if !(mime == "application/json" || (mime.starts_with("application/") && mime.ends_with("+json"))) {
            return refuse("Content-Type must be application/json");
        }
    }
    Ok(())
}

/// A request body that must be a JSON value; every failure is a JSON 400.
pub struct JsonBody(pub Value);

impl<S: Send + Sync> FromRequest<S> for JsonBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, _: &S) -> Result<Self, ApiError> {
        if let Some(ct) = req.headers().get(header::CONTENT_TYPE) {
            let ct = ct.to_str().unwrap_or_default().to_ascii_lowercase();
            let mime = ct.split(';').next().unwrap_or_default().trim();
            if !(mime == "application/json" || mime.ends_with("+json")) {
                return Err(ApiError::bad_request("Content-Type must be application/json"));
            }
        }
        let bytes = axum::body::to_bytes(req.into_body(), MAX_BODY_BYTES)
            .await
            .map_err(|_| ApiError::bad_request(format!("the request body must be at most {MAX_BODY_BYTES} bytes")))?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Err(ApiError::bad_request("a JSON object body is required"));
        }
        serde_json::from_slice(&bytes)
            .map(JsonBody)
            .map_err(|e| ApiError::bad_request(format!("the request body is not valid JSON ({})", e.classify_name())))
    }
}

trait ClassifyName {
    fn classify_name(&self) -> &'static str;
}

impl ClassifyName for serde_json::Error {
    fn classify_name(&self) -> &'static str {
        match self.classify() {
            serde_json::error::Category::Io => "read error",
            serde_json::error::Category::Syntax => "syntax error",
            serde_json::error::Category::Data => "wrong data",
            serde_json::error::Category::Eof => "unexpected end",
        }
    }
}

/// The header the ingress sets to the client address Envoy established (its
/// peer, or the address `xff_num_trusted_hops` trusts), overwriting any a
/// client sent. Nothing the client chooses (`X-Forwarded-For`,
/// `X-Real-IP`) is read.
pub const CLIENT_ADDRESS_HEADER: &str = "x-mcp-client-address";

fn client_ip(headers: &HeaderMap) -> Option<String> {
    let v = headers.get(CLIENT_ADDRESS_HEADER)?.to_str().ok()?.trim();
    v.parse::<std::net::IpAddr>().ok().map(|ip| ip.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            if let (Ok(k), Ok(v)) = (header::HeaderName::from_bytes(k.as_bytes()), HeaderValue::from_str(v)) {
                h.append(k, v);
            }
        }
        h
    }

    #[test]
    fn cookie_sessions_must_come_from_the_same_site() {
        let json = ("content-type", "application/json");
        let host = ("host", "infrabox.example.com");
        let ok: Vec<(Method, Vec<(&str, &str)>)> = vec![
            (Method::GET, vec![]),
            (Method::POST, vec![json, host]),
            (Method::POST, vec![("content-type", "application/json; charset=utf-8"), host, ("origin", "https://infrabox.example.com")]),
            (Method::POST, vec![json, host, ("sec-fetch-site", "same-origin")]),
            (Method::DELETE, vec![host]),
            (Method::PATCH, vec![json, host, ("origin", "https://infrabox.example.com")]),
        ];
        for (m, h) in ok {
            assert!(same_origin(&m, &headers(&h)).is_ok(), "{m} {h:?}");
        }
        let refused: Vec<(Method, Vec<(&str, &str)>)> = vec![
            (Method::POST, vec![host]),
            (Method::POST, vec![("content-type", "application/x-www-form-urlencoded"), host]),
            (Method::POST, vec![("content-type", "text/plain"), host]),
            (Method::POST, vec![("content-type", "multipart/form-data; boundary=x"), host]),
            (Method::POST, vec![("content-type", "text/plain; application/json"), host]),
            (Method::POST, vec![json, host, ("origin", "https://evil.example")]),
            (Method::POST, vec![json, host, ("origin", "null")]),
            (Method::POST, vec![json, host, ("origin", "https://infrabox.example.com.evil.example")]),
            (Method::POST, vec![json, host, ("sec-fetch-site", "cross-site")]),
            (Method::POST, vec![json, host, ("sec-fetch-site", "same-site")]),
            (Method::DELETE, vec![host, ("origin", "https://evil.example")]),
            (Method::DELETE, vec![host, ("sec-fetch-site", "cross-site")]),
        ];
        for (m, h) in refused {
            let e = same_origin(&m, &headers(&h)).err();
            assert_eq!(e.map(|e| e.code), Some("cross_site_request"), "{m} {h:?}");
        }
    }

    #[test]
    fn the_client_address_is_the_one_envoy_set() {
        assert_eq!(client_ip(&headers(&[(CLIENT_ADDRESS_HEADER, "203.0.113.7")])).as_deref(), Some("203.0.113.7"));
        assert_eq!(client_ip(&headers(&[(CLIENT_ADDRESS_HEADER, "2001:db8::1")])).as_deref(), Some("2001:db8::1"));
        assert_eq!(client_ip(&headers(&[("x-forwarded-for", "6.6.6.6"), ("x-real-ip", "6.6.6.6")])), None);
        assert_eq!(client_ip(&headers(&[(CLIENT_ADDRESS_HEADER, "6.6.6.6, 1.1.1.1")])), None);
    }
}

fn checked_token_id(raw: &str) -> Result<&str, ApiError> {
    if token::is_token_id(raw) {
        Ok(raw)
    } else {
        Err(ApiError::not_found("no such token"))
    }
}

fn store_error(e: StoreError, max: i64) -> ApiError {
    match e {
        StoreError::NotFound => ApiError::not_found("no such token"),
        StoreError::TooManyTokens => ApiError::new(
            StatusCode::CONFLICT,
            "too_many_tokens",
            format!("at most {max} live MCP tokens per user; revoke one first"),
        ),
        StoreError::Db(e) => ApiError::database(e),
    }
}

/// Every listed project must be one the caller collaborates on.
async fn check_projects(api: &TokenApi, actor: &Actor, projects: &EnabledProjects) -> Result<(), ApiError> {
    if projects.0.is_empty() {
        return Ok(());
    }
    let mine = api.store.collaborator_projects(actor.user_id).await?;
    if let Some(p) = projects.0.keys().find(|p| !mine.contains(p)) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "project_forbidden",
            format!("you are not a collaborator on project {p}"),
        ));
    }
    Ok(())
}

fn credential_error(e: CredentialError) -> ApiError {
    match e {
        CredentialError::Db(e) => ApiError::database(e),
        CredentialError::Cipher(e) => {
            tracing::error!(error = %e, "upstream credential encryption failed");
            ApiError::internal()
        }
        CredentialError::InfraBox(e) => {
            tracing::warn!(error = %e, "upstream credential provisioning failed");
            ApiError::new(
                StatusCode::BAD_GATEWAY,
                "upstream_unavailable",
                format!("could not provision the InfraBox credential this token needs ({e}); nothing was changed, retry later"),
            )
        }
    }
}

/// Before an action that makes a token live until `until`: the user's
/// credentials of the needed kinds must last that long.
async fn ensure_credentials(api: &TokenApi, actor: &Actor, until: chrono::DateTime<chrono::Utc>, write: bool) -> Result<(), ApiError> {
    let kinds: &[CredentialKind] = if write { &CredentialKind::ALL } else { &[CredentialKind::Read] };
    for kind in kinds {
        api.credentials.ensure(actor.user_id, actor.session.expose(), *kind, until).await.map_err(credential_error)?;
    }
    Ok(())
}

/// After revoke or withdraw: credentials no live token needs are deleted in
/// InfraBox. A failure is logged and retried by the user's next action.
async fn retire_credentials(api: &TokenApi, actor: &Actor) {
    if let Err(e) = api.credentials.retire_unneeded(actor.user_id, actor.session.expose()).await {
        tracing::warn!(user_id = %actor.user_id, error = %e, "retiring upstream credentials failed; will retry");
    }
}

fn days_from_now(days: i64) -> chrono::DateTime<chrono::Utc> {
    chrono::Utc::now() + chrono::Duration::days(days)
}

fn no_store(mut res: Response) -> Response {
    res.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    res
}

fn ok_message(message: &str, data: Option<Value>) -> Response {
    let mut body = json!({"message": message, "status": 200});
    if let Some(d) = data {
        body["data"] = d;
    }
    no_store(Json(body).into_response())
}

async fn list_tokens(State(api): State<TokenApi>, Caller(actor): Caller) -> Result<Response, ApiError> {
    let tokens = api.store.list(actor.user_id).await?;
    Ok(no_store(Json(Value::Array(tokens.iter().map(|t| t.to_json()).collect())).into_response()))
}

async fn create_token(State(api): State<TokenApi>, Caller(actor): Caller, JsonBody(body): JsonBody) -> Result<Response, ApiError> {
    let req = parse_create(&body, api.max_expiry_days)?;
    check_projects(&api, &actor, &req.enabled_projects).await?;
    ensure_credentials(&api, &actor, days_from_now(req.expires_days), false).await?;
    let mut random = [0u8; 24];
    getrandom::fill(&mut random).map_err(|e| {
        tracing::error!(error = %e, "OS random generator failed");
        ApiError::internal()
    })?;
    let secret = token::mint(&random);
    let token_id = secret.get(PREFIX.len()..PREFIX.len() + TOKEN_ID_LEN).ok_or_else(ApiError::internal)?.to_owned();
    let enabled = req.enabled_projects.to_json();
    let rec = api
        .store
        .create(
            &actor,
            NewToken {
                token_id: &token_id,
                token_hash: &token::hash_hex(&secret),
                name: &req.name,
                enabled_projects: &enabled,
                expires_days: req.expires_days,
            },
        )
        .await
        .map_err(|e| store_error(e, api.store.max_live_per_user()))?;
    tracing::info!(user_id = %actor.user_id, token_id = %rec.token_id, "token created");
    let body = json!({
        "token_id": rec.token_id,
        "token": secret,
        "name": rec.name,
        "enabled_projects": rec.enabled_projects,
        "allow_trigger": rec.allow_trigger,
        "expires_at": crate::expiry::isoformat(rec.expires_at),
    });
    Ok(no_store((StatusCode::CREATED, Json(body)).into_response()))
}

async fn get_token(State(api): State<TokenApi>, Caller(actor): Caller, Path(token_id): Path<String>) -> Result<Response, ApiError> {
    let token_id = checked_token_id(&token_id)?;
    let rec = api.store.get(actor.user_id, token_id).await?.ok_or_else(|| ApiError::not_found("no such token"))?;
    Ok(no_store(Json(rec.to_json()).into_response()))
}

async fn update_token(
    State(api): State<TokenApi>,
    Caller(actor): Caller,
    Path(token_id): Path<String>,
    JsonBody(body): JsonBody,
) -> Result<Response, ApiError> {
    let token_id = checked_token_id(&token_id)?;
    let req = parse_update(&body, api.max_expiry_days)?;
    if let Some(p) = &req.enabled_projects {
        check_projects(&api, &actor, p).await?;
    }
    if let Some(days) = req.expires_days {
        let current = api.store.get(actor.user_id, token_id).await?.ok_or_else(|| ApiError::not_found("no such token"))?;
        ensure_credentials(&api, &actor, days_from_now(days), current.allow_trigger).await?;
    }
    let enabled = req.enabled_projects.as_ref().map(EnabledProjects::to_json);
    let rec = api
        .store
        .update(
            &actor,
            token_id,
            TokenChanges { name: req.name.as_deref(), enabled_projects: enabled.as_ref(), expires_days: req.expires_days },
        )
        .await
        .map_err(|e| store_error(e, api.store.max_live_per_user()))?;
    tracing::info!(user_id = %actor.user_id, token_id, "token updated");
    Ok(ok_message("token updated", Some(rec.to_json())))
}

async fn revoke_token(State(api): State<TokenApi>, Caller(actor): Caller, Path(token_id): Path<String>) -> Result<Response, ApiError> {
    let token_id = checked_token_id(&token_id)?;
    api.store.revoke(&actor, token_id).await.map_err(|e| store_error(e, api.store.max_live_per_user()))?;
    retire_credentials(&api, &actor).await;
    tracing::info!(user_id = %actor.user_id, token_id, "token revoked");
    Ok(ok_message("token revoked", None))
}

async fn grant_trigger(State(api): State<TokenApi>, Caller(actor): Caller, Path(token_id): Path<String>) -> Result<Response, ApiError> {
    set_trigger(api, actor, token_id, true).await
}

async fn withdraw_trigger(State(api): State<TokenApi>, Caller(actor): Caller, Path(token_id): Path<String>) -> Result<Response, ApiError> {
    set_trigger(api, actor, token_id, false).await
}

async fn set_trigger(api: TokenApi, actor: Actor, token_id: String, allow: bool) -> Result<Response, ApiError> {
    let token_id = checked_token_id(&token_id)?;
    if allow {
        let current = api.store.get(actor.user_id, token_id).await?.ok_or_else(|| ApiError::not_found("no such token"))?;
        if current.expires_at.and_utc() > chrono::Utc::now() {
            ensure_credentials(&api, &actor, current.expires_at.and_utc(), true).await?;
        }
    }
    let rec = api
        .store
        .set_trigger(&actor, token_id, allow)
        .await
        .map_err(|e| store_error(e, api.store.max_live_per_user()))?;
    if !allow {
        retire_credentials(&api, &actor).await;
    }
    tracing::info!(user_id = %actor.user_id, token_id, allow_trigger = allow, "token trigger permission changed");
    let msg = if allow { "trigger permission granted" } else { "trigger permission revoked" };
    Ok(ok_message(msg, Some(rec.to_json())))
}

