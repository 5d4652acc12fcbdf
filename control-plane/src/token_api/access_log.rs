//! `GET /api/v1/mcp/tokens/{token_id}/access-log`: the audit rows of one of
//! the caller's own tokens (revoked ones included), newest first, in pages.
//!
//! Query: `limit` (1–500, default 50) and `cursor` (the previous page's
//! `next_cursor`, opaque). Keyset pagination on `(accessed_at, id)`: rows
//! arriving meanwhile never shift or repeat a page. Response:
//! `{"items": [...], "limit": n, "next_cursor": "..." | null}`.
//! A token of another user is "no such token", exactly like an unknown one.

use axum::extract::{Path, RawQuery, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{DateTime, NaiveDateTime};
use serde_json::{json, Value};
use sqlx::postgres::PgRow;
use sqlx::Row;
use uuid::Uuid;

use super::{checked_token_id, no_store, Caller, TokenApi};
use crate::error::ApiError;
use crate::expiry::isoformat;

/// Page size when `limit` is absent, and the largest accepted.
pub const DEFAULT_LIMIT: i64 = 50;
pub const MAX_LIMIT: i64 = 500;

/// Where the next page starts: strictly older than this row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    pub accessed_at: NaiveDateTime,
    pub id: Uuid,
}

impl Cursor {
    /// `<unix microseconds>_<row id>`.
    pub fn encode(&self) -> String {
        format!("{}_{}", self.accessed_at.and_utc().timestamp_micros(), self.id.simple())
    }

    pub fn decode(s: &str) -> Option<Self> {
        let (micros, id) = s.split_once('_')?;
        let accessed_at = DateTime::from_timestamp_micros(micros.parse().ok()?)?.naive_utc();
        Some(Self { accessed_at, id: Uuid::parse_str(id).ok()? })
    }
}

/// The validated query string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageQuery {
    pub limit: i64,
    pub cursor: Option<Cursor>,
}

/// Parses `limit` and `cursor`; anything else is ignored.
pub fn parse_query(query: Option<&str>) -> Result<PageQuery, ApiError> {
    let mut page = PageQuery { limit: DEFAULT_LIMIT, cursor: None };
    for pair in query.unwrap_or_default().split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match k {
            "limit" => {
                page.limit = v
                    .parse::<i64>()
                    .ok()
                    .filter(|n| (1..=MAX_LIMIT).contains(n))
                    .ok_or_else(|| ApiError::bad_request(format!("limit must be an integer between 1 and {MAX_LIMIT}")))?;
            }
            "cursor" if !v.is_empty() => {
                page.cursor = Some(Cursor::decode(v).ok_or_else(|| ApiError::bad_request("cursor is not one this API returned"))?);
            }
            _ => {}
        }
    }
    Ok(page)
}

/// The handler.
pub async fn list(
    State(api): State<TokenApi>,
    Caller(actor): Caller,
    Path(token_id): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let token_id = checked_token_id(&token_id)?;
    let page = parse_query(query.as_deref())?;
    let pool = api.store.pool();
    let owned = sqlx::query("SELECT 1 AS one FROM mcp_token WHERE token_id = $1 AND user_id = $2")
        .bind(token_id)
        .bind(actor.user_id)
        .fetch_optional(pool)
        .await?
        .is_some();
    if !owned {
        return Err(ApiError::not_found("no such token"));
    }
    let rows = sqlx::query(
        "SELECT id, accessed_at, action, outcome, method, path, status_code, duration_us, bytes_in, bytes_out, \
                project_id, route, class, error, ip, request_id, details, count \
         FROM mcp_access_log \
         WHERE token_id = $1 AND user_id = $2 \
           AND ($3::timestamp IS NULL OR (accessed_at, id) < ($3::timestamp, $4::uuid)) \
         ORDER BY accessed_at DESC, id DESC LIMIT $5",
    )
    .bind(token_id)
    .bind(actor.user_id)
    .bind(page.cursor.map(|c| c.accessed_at))
    .bind(page.cursor.map(|c| c.id))
    .bind(page.limit + 1)
    .fetch_all(pool)
    .await?;
    let more = rows.len() as i64 > page.limit;
    let shown = rows.get(..page.limit as usize).unwrap_or(&rows);
    let items = shown.iter().map(item).collect::<Result<Vec<_>, sqlx::Error>>()?;
    let next_cursor = match shown.last() {
        Some(last) if more => Some(Cursor { accessed_at: last.try_get("accessed_at")?, id: last.try_get("id")? }.encode()),
        _ => None,
    };
    Ok(no_store(Json(json!({"items": items, "limit": page.limit, "next_cursor": next_cursor})).into_response()))
}

/// One row as the API shows it.
fn item(r: &PgRow) -> Result<Value, sqlx::Error> {
    let accessed_at: NaiveDateTime = r.try_get("accessed_at")?;
    let duration_us: Option<i64> = r.try_get("duration_us")?;
    Ok(json!({
        "id": r.try_get::<Uuid, _>("id")?,
        "accessed_at": isoformat(accessed_at),
        "action": r.try_get::<String, _>("action")?,
        "outcome": r.try_get::<String, _>("outcome")?,
        "method": r.try_get::<Option<String>, _>("method")?,
        "path": r.try_get::<Option<String>, _>("path")?,
        "status_code": r.try_get::<Option<i16>, _>("status_code")?,
        "duration_ms": duration_us.map(|us| us as f64 / 1000.0),
        "bytes_in": r.try_get::<Option<i64>, _>("bytes_in")?,
        "bytes_out": r.try_get::<Option<i64>, _>("bytes_out")?,
        "project_id": r.try_get::<Option<Uuid>, _>("project_id")?,
        "route": r.try_get::<Option<String>, _>("route")?,
        "class": r.try_get::<Option<String>, _>("class")?,
        "error": r.try_get::<Option<String>, _>("error")?,
        "ip": r.try_get::<Option<String>, _>("ip")?,
        "request_id": r.try_get::<Option<String>, _>("request_id")?,
        "details": r.try_get::<Option<Value>, _>("details")?,
        // More than 1: identical denials coalesced into this row.
        "count": r.try_get::<i32, _>("count")?,
    }))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_garbage_is_refused() {
        let c = Cursor {
            accessed_at: DateTime::from_timestamp_micros(1_700_000_000_123_456).unwrap().naive_utc(),
            id: Uuid::new_v4(),
        };
        assert_eq!(Cursor::decode(&c.encode()), Some(c));
        for bad in ["", "x", "1_", "_x", "abc_0b7a4c2e-1f3d-4c5b-9a8e-7d6c5b4a3f21", "99999999999999999999_00000000-0000-0000-0000-000000000000"] {
            assert_eq!(Cursor::decode(bad), None, "{bad}");
        }
    }

    #[test]
    fn query_parsing() {
        assert_eq!(parse_query(None).unwrap(), PageQuery { limit: DEFAULT_LIMIT, cursor: None });
        assert_eq!(parse_query(Some("limit=7&x=1")).unwrap().limit, 7);
        for bad in ["limit=0", "limit=501", "limit=x", "cursor=zzz"] {
            assert!(parse_query(Some(bad)).is_err(), "{bad}");
        }
        assert_eq!(parse_query(Some("cursor=")).unwrap().cursor, None);
    }
}
