//! The internal listener's routes: `GET /v1/snapshot` (bearer secret,
//! `If-None-Match`, `?wait=` long-poll, `?delta=1` for a delta from the
//! version named in `If-None-Match` when the change log has one) and
//! `GET /healthz`.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{RawQuery, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use tokio::sync::watch;

use super::publisher::{Current, Published};
use crate::error::ApiError;
use crate::internal_auth::{BearerSecret, InternalAuthMetrics, Service};

/// Longest long-poll, seconds.
pub const MAX_WAIT_SECONDS: u64 = 300;

/// State of the internal routes.
#[derive(Clone)]
pub struct SnapshotService {
    secret: BearerSecret,
    current: Current,
    shutdown: watch::Receiver<bool>,
    auth_metrics: Arc<InternalAuthMetrics>,
}

impl SnapshotService {
    pub fn new(secret: &str, current: Current, shutdown: watch::Receiver<bool>, auth_metrics: Arc<InternalAuthMetrics>) -> Self {
        Self { secret: BearerSecret::new(secret), current, shutdown, auth_metrics }
    }

    /// Constant-time check of `Authorization: Bearer <secret>`.
    fn authorized(&self, headers: &HeaderMap) -> bool {
        let ok = self.secret.admits(headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()));
        if !ok {
            self.auth_metrics.refused(Service::Snapshot);
        }
        ok
    }
}

/// The internal routes.
pub fn router(svc: SnapshotService) -> Router {
    Router::new()
        .route("/v1/snapshot", get(snapshot))
        .route("/healthz", get(healthz))
        .fallback(crate::error::route_not_found)
        .method_not_allowed_fallback(crate::error::method_not_allowed)
        .with_state(svc)
}

/// Versions named by `If-None-Match` (`"v"`, `W/"v"`, `v`, lists, `*`).
pub fn parse_if_none_match(value: &str) -> Vec<String> {
    value
        .split(',')
        .map(str::trim)
        .map(|t| t.strip_prefix("W/").or_else(|| t.strip_prefix("w/")).unwrap_or(t))
        .map(|t| t.trim_matches('"').to_owned())
        .filter(|t| !t.is_empty())
        .collect()
}

/// `wait` from the query string: 0 when absent, clamped to 0–300.
pub fn parse_wait(query: Option<&str>) -> Result<u64, ApiError> {
    let mut wait = 0;
    for pair in query.unwrap_or_default().split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        if k == "wait" {
            let n: i64 = v
                .parse()
                .map_err(|_| ApiError::bad_request(format!("wait must be an integer number of seconds (0-{MAX_WAIT_SECONDS})")))?;
            wait = n.clamp(0, MAX_WAIT_SECONDS as i64) as u64;
        }
    }
    Ok(wait)
}

/// Whether the query asks for a delta (`delta=1`).
pub fn wants_delta(query: Option<&str>) -> bool {
    query.unwrap_or_default().split('&').any(|p| p == mcp_filter_core::snapshot::DELTA_QUERY)
}

fn etag(version: &str) -> HeaderValue {
    HeaderValue::from_str(&format!("\"{version}\"")).unwrap_or_else(|_| HeaderValue::from_static("\"\""))
}

fn signed(version: &str, body: axum::body::Bytes, signature: &str) -> Response {
    (
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, HeaderValue::from_static("application/json")),
            (header::ETAG, etag(version)),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
            (
                header::HeaderName::from_static(mcp_filter_core::signature::HEADER),
                HeaderValue::from_str(signature).unwrap_or_else(|_| HeaderValue::from_static("")),
            ),
        ],
        body,
    )
        .into_response()
}

/// The new version for a client that holds one of `known`: the delta from
/// it when asked for and logged, else the whole snapshot (rendered on the
/// first request for this version, off the async workers; if the content
/// moved on meanwhile, the newer version's).
async fn answer(p: Arc<Published>, known: &[String], delta: bool, current: &Current) -> Response {
    let logged = known.iter().find_map(|k| p.deltas.get(k).map(|d| (k, d))).filter(|_| delta);
    if let Some((base, d)) = logged {
        let mut response = signed(&p.version, d.body.clone(), &d.signature);
        if let Ok(v) = HeaderValue::from_str(base) {
            response.headers_mut().insert(header::HeaderName::from_static(mcp_filter_core::snapshot::DELTA_BASE_HEADER), v);
        }
        return response;
    }
    let mut p = p;
    for _ in 0..8 {
        let rendering = Arc::clone(&p);
        if let Ok(Some(full)) = tokio::task::spawn_blocking(move || rendering.full_body()).await {
            return signed(&p.version, full.body, &full.signature);
        }
        let newer = current.borrow().clone();
        match newer {
            Some(newer) if newer.version != p.version => p = newer,
            _ => break,
        }
    }
    ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "snapshot_unavailable", "the snapshot changed while it was rendered; retry").into_response()
}

fn not_modified(version: &str) -> Response {
    (StatusCode::NOT_MODIFIED, [(header::ETAG, etag(version))]).into_response()
}

async fn snapshot(State(svc): State<SnapshotService>, headers: HeaderMap, RawQuery(query): RawQuery) -> Result<Response, ApiError> {
    if !svc.authorized(&headers) {
        return Err(ApiError::unauthorized("unauthorized", "a valid snapshot bearer secret is required"));
    }
    let wait = parse_wait(query.as_deref())?;
    let delta = wants_delta(query.as_deref());
    let known = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .map(parse_if_none_match)
        .unwrap_or_default();
    let mut current = svc.current.clone();
    let mut shutdown = svc.shutdown.clone();
    let unavailable = || ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "snapshot_unavailable", "no snapshot has been built yet");
    let now = current.borrow_and_update().clone().ok_or_else(unavailable)?;
    let matches = |p: &Published| known.iter().any(|k| k == "*" || *k == p.version);
    if !matches(&now) {
        return Ok(answer(now, &known, delta, &svc.current).await);
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(wait);
    let mut latest: Arc<Published> = now;
    // Answered after the `select!`, whose output holds a lock guard.
    let mut changed_to = false;
    loop {
        tokio::select! {
            changed = current.changed() => {
                if changed.is_err() {
                    break;
                }
                if let Some(p) = current.borrow_and_update().clone() {
                    latest = p;
                }
                if !matches(&latest) {
                    changed_to = true;
                    break;
                }
            }
            _ = tokio::time::sleep_until(deadline) => break,
            _ = shutdown.wait_for(|stop| *stop) => break,
        }
    }
    if changed_to {
        return Ok(answer(latest, &known, delta, &svc.current).await);
    }
    Ok(not_modified(&latest.version))
}

async fn healthz(State(svc): State<SnapshotService>) -> Response {
    if svc.current.borrow().is_some() {
        (StatusCode::OK, "ok").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "starting").into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn if_none_match_forms() {
        assert_eq!(parse_if_none_match("\"abc\""), vec!["abc"]);
        assert_eq!(parse_if_none_match("W/\"abc\""), vec!["abc"]);
        assert_eq!(parse_if_none_match("abc"), vec!["abc"]);
        assert_eq!(parse_if_none_match("\"a\", W/\"b\""), vec!["a", "b"]);
        assert!(parse_if_none_match("").is_empty());
    }

    #[test]
    fn wait_parsing() {
        assert_eq!(parse_wait(None).unwrap(), 0);
        assert_eq!(parse_wait(Some("wait=30")).unwrap(), 30);
        assert_eq!(parse_wait(Some("x=1&wait=9999")).unwrap(), 300);
        assert_eq!(parse_wait(Some("wait=-5")).unwrap(), 0);
        assert!(parse_wait(Some("wait=abc")).is_err());
        assert!(parse_wait(Some("wait=1.5")).is_err());
        assert!(parse_wait(Some("wait=")).is_err());
        assert!(wants_delta(Some("wait=20&delta=1")));
        assert!(wants_delta(Some("delta=1")));
        assert!(!wants_delta(Some("wait=20")));
        assert!(!wants_delta(Some("delta=0")));
        assert!(!wants_delta(Some("xdelta=1")));
        assert!(!wants_delta(None));
    }

    #[test]
    fn bearer_secret_check() {
        let (_tx, rx) = watch::channel(None);
        let (_s, srx) = watch::channel(false);
        let svc = SnapshotService::new("0123456789abcdef", rx, srx, Arc::default());
        let h = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::AUTHORIZATION, HeaderValue::from_str(v).unwrap());
            h
        };
        assert!(svc.authorized(&h("Bearer 0123456789abcdef")));
        assert!(svc.authorized(&h("bearer 0123456789abcdef")));
        assert!(!svc.authorized(&h("Bearer 0123456789abcdeX")));
        assert!(!svc.authorized(&h("Basic 0123456789abcdef")));
        assert!(!svc.authorized(&HeaderMap::new()));
    }
}
