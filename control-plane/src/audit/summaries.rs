//! `POST /v1/audit/coalesced` on the internal listener: the filter's
//! coalesced denial rows ([`mcp_filter_core::coalesce`]). Each summary
//! becomes one `mcp_access_log` row whose `count` is the number of
//! identical denials (same client address, reason and token) it stands for;
//! the first denial of each interval has its own row, as usual.
//!
//! The caller is the filter (snapshot secret, [`crate::internal_auth`]).
//! Still, nothing is stored unchecked: the address must be an IP address,
//! the reason a known error code, ids well formed, and the path is
//! sanitized again.

use std::net::IpAddr;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use chrono::DateTime;
use mcp_filter_core::audit::{self, Outcome};
use mcp_filter_core::coalesce::{Summary, SummaryBatch, MAX_PENDING};
use mcp_filter_core::path::{self as mcp_path, Area};
use serde_json::json;
use sqlx::PgPool;
use uuid::Uuid;

use super::metrics::AuditMetrics;
use super::row::cut;
use crate::error::ApiError;
use crate::internal_auth::{BearerSecret, InternalAuthMetrics, Service};

/// Largest batch body, bytes.
const MAX_BODY_BYTES: usize = 1024 * 1024;

/// State of the endpoint.
#[derive(Clone)]
pub struct Summaries {
    pool: PgPool,
    secret: BearerSecret,
    metrics: Arc<AuditMetrics>,
    auth_metrics: Arc<InternalAuthMetrics>,
}

impl Summaries {
    pub fn new(pool: PgPool, secret: &str, metrics: Arc<AuditMetrics>, auth_metrics: Arc<InternalAuthMetrics>) -> Self {
        Self { pool, secret: BearerSecret::new(secret), metrics, auth_metrics }
    }
}

/// The route, to merge into the internal router.
pub fn router(state: Summaries) -> Router {
    Router::new().route("/v1/audit/coalesced", post(receive)).with_state(state)
}

/// A summary as a row, or why it is not one.
#[derive(Debug, Clone, PartialEq)]
pub struct SummaryRow {
    pub token_id: Option<String>,
    pub user_id: Option<Uuid>,
    pub action: String,
    pub outcome: Outcome,
    pub reason: String,
    pub ip: String,
    pub accessed_at: chrono::NaiveDateTime,
    pub method: String,
    pub path: String,
    pub status_code: Option<i16>,
    pub project_id: Option<Uuid>,
    pub route: Option<String>,
    pub count: i32,
    pub first_ms: i64,
    pub last_ms: i64,
}

impl SummaryRow {
    pub fn from_summary(s: &Summary) -> Result<Self, &'static str> {
        let ip: IpAddr = s.address.parse().map_err(|_| "address is not an IP address")?;
        let outcome = audit::reason_outcome(&s.reason).ok_or("unknown denial reason")?;
        if s.count == 0 || s.count > 1_000_000_000 {
            return Err("count out of range");
        }
        if s.last_ms < s.first_ms {
            return Err("last_ms before first_ms");
        }
        let accessed_at = DateTime::from_timestamp_millis(s.first_ms).ok_or("first_ms out of range")?.naive_utc();
        let path = audit::sanitize_path(&s.sample.path);
        let action = match (&s.sample.route, mcp_path::area(&path)) {
            (Some(route), _) => cut(route, 64),
            (None, Area::Mcp { .. }) => "mcp.unmatched".to_string(),
            (None, _) => "mcp.token_elsewhere".to_string(),
        };
        Ok(Self {
            token_id: s.token_id.clone().filter(|t| mcp_filter_core::token::is_token_id(t)),
            user_id: s.sample.user_id.as_deref().and_then(|u| Uuid::parse_str(u).ok()),
            action,
            outcome,
            reason: cut(&s.reason, 64),
            ip: ip.to_string(),
            accessed_at,
            method: cut(&s.sample.method, audit::MAX_METHOD_BYTES),
            path: cut(&path, audit::MAX_PATH_BYTES),
            status_code: i16::try_from(s.sample.status).ok().filter(|c| *c > 0),
            project_id: s.sample.project.as_deref().and_then(|p| Uuid::parse_str(p).ok()),
            route: s.sample.route.as_ref().map(|r| cut(r, 64)),
            count: i32::try_from(s.count).map_err(|_| "count out of range")?,
            first_ms: s.first_ms,
            last_ms: s.last_ms,
        })
    }
}

async fn receive(State(state): State<Summaries>, headers: HeaderMap, body: axum::body::Bytes) -> Result<Response, ApiError> {
    if !state.secret.admits(headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok())) {
        state.auth_metrics.refused(Service::AuditSummaries);
        return Err(ApiError::unauthorized("unauthorized", "a valid internal bearer secret is required"));
    }
    if body.len() > MAX_BODY_BYTES {
        return Err(ApiError::bad_request("the batch is too large"));
    }
    let batch: SummaryBatch =
        serde_json::from_slice(&body).map_err(|e| ApiError::bad_request(format!("not a batch of coalesced rows ({:?})", e.classify())))?;
    if batch.summaries.len() > MAX_PENDING {
        return Err(ApiError::bad_request(format!("at most {MAX_PENDING} rows per batch")));
    }
    let node_id = cut(&batch.node_id, 256);
    let vm_id = cut(&batch.vm_id, 64);
    let mut rows = Vec::with_capacity(batch.summaries.len());
    for s in &batch.summaries {
        match SummaryRow::from_summary(s) {
            Ok(r) => rows.push(r),
            Err(why) => {
                AuditMetrics::add(&state.metrics.invalid_records, 1);
                tracing::warn!(why, "dropped a coalesced audit row");
            }
        }
    }
    insert(&state.pool, &node_id, &vm_id, &rows).await.map_err(ApiError::database)?;
    AuditMetrics::add(&state.metrics.coalesced_rows, rows.len() as u64);
    AuditMetrics::add(&state.metrics.coalesced_requests, rows.iter().map(|r| r.count as u64).sum());
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn insert(pool: &PgPool, node_id: &str, vm_id: &str, rows: &[SummaryRow]) -> Result<(), sqlx::Error> {
    if rows.is_empty() {
        return Ok(());
    }
    let mut tx = pool.begin().await?;
    for r in rows {
        let details = json!({
            "decision": "deny",
            "coalesced": true,
            "first_at_ms": r.first_ms,
            "last_at_ms": r.last_ms,
        });
        sqlx::query(
            "INSERT INTO mcp_access_log \
             (id, token_id, user_id, action, outcome, details, error, ip, accessed_at, method, path, status_code, \
              project_id, route, node_id, vm_id, count) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17)",
        )
        .bind(Uuid::now_v7())
        .bind(&r.token_id)
        .bind(r.user_id)
        .bind(&r.action)
        .bind(r.outcome.as_str())
        .bind(details)
        .bind(&r.reason)
        .bind(&r.ip)
        .bind(r.accessed_at)
        .bind(&r.method)
        .bind(&r.path)
        .bind(r.status_code)
        .bind(r.project_id)
        .bind(&r.route)
        .bind(node_id)
        .bind(vm_id)
        .bind(r.count)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await
}

#[cfg(test)]
mod tests {
    use mcp_filter_core::coalesce::Sample;

    use super::*;

    fn summary() -> Summary {
        Summary {
            address: "10.1.2.3".into(),
            reason: "invalid_token".into(),
            token_id: None,
            sample: Sample { method: "GET".into(), path: "/api/v1/mcp/projects".into(), status: 401, ..Sample::default() },
            count: 41,
            first_ms: 1_767_225_600_000,
            last_ms: 1_767_225_609_000,
        }
    }

    #[test]
    fn a_summary_becomes_a_checked_row() -> Result<(), &'static str> {
        let r = SummaryRow::from_summary(&summary())?;
        assert_eq!((r.count, r.outcome, r.ip.as_str(), r.action.as_str()), (41, Outcome::Unauthorized, "10.1.2.3", "mcp.unmatched"));
        assert_eq!(r.status_code, Some(401));
        let mut s = summary();
        s.sample.path = format!("/api/v1/projects/x/ib_mcp_{}", "a".repeat(48));
        assert!(!SummaryRow::from_summary(&s)?.path.contains("ib_mcp_"));
        for bad in [
            Summary { address: "10.1.2.3, 1.1.1.1".into(), ..summary() },
            Summary { address: "".into(), ..summary() },
            Summary { reason: "made_up".into(), ..summary() },
            Summary { count: 0, ..summary() },
            Summary { last_ms: 0, ..summary() },
        ] {
            assert!(SummaryRow::from_summary(&bad).is_err(), "{bad:?}");
        }
        let s = Summary { token_id: Some("not-a-token-id".into()), ..summary() };
        assert_eq!(SummaryRow::from_summary(&s)?.token_id, None);
        Ok(())
    }
}
