//! `TokenStore`: the token API's reads and writes of `mcp_token`,
//! `mcp_access_log` and InfraBox's `"user"`/`collaborator` tables (read only).
//!
//! Only `token_id` and the SHA-256 `token_hash` are stored — never the
//! secret. Every write runs in one transaction together with its audit row;
//! the `mcp_token` trigger then notifies every replica to rebuild its snapshot.

use std::collections::HashSet;

use chrono::NaiveDateTime;
use serde_json::{json, Value};
use sqlx::postgres::PgRow;
use sqlx::{PgConnection, PgPool, Row};
use uuid::Uuid;

use crate::error::ApiError;
use crate::expiry::isoformat;

const NOW_UTC: &str = "(now() AT TIME ZONE 'utc')";

/// A token as the API shows it (no hash, no secret).
#[derive(Debug, Clone)]
pub struct TokenRecord {
    pub token_id: String,
    pub name: String,
    pub enabled_projects: Value,
    pub allow_trigger: bool,
    pub expires_at: NaiveDateTime,
    pub created_at: NaiveDateTime,
    pub last_used_at: Option<NaiveDateTime>,
}

impl TokenRecord {
    fn from_row(row: &PgRow) -> Result<Self, sqlx::Error> {
        Ok(Self {
            token_id: row.try_get("token_id")?,
            name: row.try_get("name")?,
            enabled_projects: row.try_get("enabled_projects")?,
            allow_trigger: row.try_get("allow_trigger")?,
            expires_at: row.try_get("expires_at")?,
            created_at: row.try_get("created_at")?,
            last_used_at: row.try_get("last_used_at")?,
        })
    }

    /// InfraBox's `_serialize` shape.
    pub fn to_json(&self) -> Value {
        json!({
            "token_id": self.token_id,
            "name": self.name,
            "enabled_projects": self.enabled_projects,
            "allow_trigger": self.allow_trigger,
            "expires_at": isoformat(self.expires_at),
            "created_at": isoformat(self.created_at),
            "last_used_at": self.last_used_at.map(isoformat),
        })
    }
}

const COLUMNS: &str = "token_id, name, enabled_projects, allow_trigger, expires_at, created_at, last_used_at";

/// What a token action is, for the audit row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenAction {
    Create,
    Update,
    Revoke,
    TriggerGrant,
    TriggerWithdraw,
}

impl TokenAction {
    pub fn as_str(self) -> &'static str {
        match self {
            TokenAction::Create => "token.create",
            TokenAction::Update => "token.update",
            TokenAction::Revoke => "token.revoke",
            TokenAction::TriggerGrant => "token.trigger.grant",
            TokenAction::TriggerWithdraw => "token.trigger.withdraw",
        }
    }
}

/// Who did it and from where (for the audit row).
#[derive(Debug, Clone)]
pub struct Actor {
    pub user_id: Uuid,
    /// The caller's session, to mint and retire upstream credentials.
    pub session: crate::session::SessionJwt,
    pub ip: Option<String>,
    pub request_id: String,
}

/// A new token to insert.
pub struct NewToken<'a> {
    pub token_id: &'a str,
    pub token_hash: &'a str,
    pub name: &'a str,
    pub enabled_projects: &'a Value,
    pub expires_days: i64,
}

/// Changes to an existing token.
pub struct TokenChanges<'a> {
    pub name: Option<&'a str>,
    pub enabled_projects: Option<&'a Value>,
    pub expires_days: Option<i64>,
}

/// Why a write was refused.
#[derive(Debug)]
pub enum StoreError {
    NotFound,
    TooManyTokens,
    Db(sqlx::Error),
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        StoreError::Db(e)
    }
}

/// Database access for the token API.
#[derive(Clone)]
pub struct TokenStore {
    pool: PgPool,
    max_live_per_user: i64,
}

impl TokenStore {
    pub fn new(pool: PgPool, max_live_per_user: i64) -> Self {
        Self { pool, max_live_per_user }
    }

    /// The pool (for the access-log reads of `token_api::access_log`).
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    pub fn max_live_per_user(&self) -> i64 {
        self.max_live_per_user
    }

    /// Whether the InfraBox user exists.
    pub async fn user_exists(&self, user_id: Uuid) -> Result<bool, ApiError> {
        let row = sqlx::query(r#"SELECT 1 AS one FROM "user" WHERE id = $1"#)
            .bind(user_id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.is_some())
    }

    /// Projects the user currently collaborates on.
    pub async fn collaborator_projects(&self, user_id: Uuid) -> Result<HashSet<Uuid>, ApiError> {
        let rows = sqlx::query("SELECT project_id FROM collaborator WHERE user_id = $1")
            .bind(user_id)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(|r| r.try_get::<Uuid, _>("project_id")).collect::<Result<_, _>>().map_err(Into::into)
    }

    /// The user's tokens that are not revoked (expired ones included, as InfraBox does), newest first.
    pub async fn list(&self, user_id: Uuid) -> Result<Vec<TokenRecord>, ApiError> {
        let rows = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM mcp_token WHERE user_id = $1 AND revoked_at IS NULL ORDER BY created_at DESC, token_id"
        ))
        .bind(user_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(TokenRecord::from_row).collect::<Result<_, _>>().map_err(Into::into)
    }

    /// One of the user's non-revoked tokens.
    pub async fn get(&self, user_id: Uuid, token_id: &str) -> Result<Option<TokenRecord>, ApiError> {
        let row = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM mcp_token WHERE token_id = $1 AND user_id = $2 AND revoked_at IS NULL"
        ))
        .bind(token_id)
        .bind(user_id)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(TokenRecord::from_row).transpose().map_err(Into::into)
    }

    /// Inserts a token unless the user already has the maximum of live tokens.
    pub async fn create(&self, actor: &Actor, new: NewToken<'_>) -> Result<TokenRecord, StoreError> {
        let mut tx = self.pool.begin().await?;
        lock_user(&mut tx, actor.user_id).await?;
        if live_count(&mut tx, actor.user_id).await? >= self.max_live_per_user {
            return Err(StoreError::TooManyTokens);
        }
        let row = sqlx::query(&format!(
            "INSERT INTO mcp_token (token_id, token_hash, user_id, name, enabled_projects, allow_trigger, expires_at, created_at) \
             VALUES ($1, $2, $3, $4, $5, FALSE, {NOW_UTC} + make_interval(days => $6::int), {NOW_UTC}) RETURNING {COLUMNS}"
        ))
        .bind(new.token_id)
        .bind(new.token_hash)
        .bind(actor.user_id)
        .bind(new.name)
        .bind(new.enabled_projects)
        .bind(new.expires_days as i32)
        .fetch_one(&mut *tx)
        .await?;
        let rec = TokenRecord::from_row(&row)?;
        let details = json!({"name": rec.name, "enabled_projects": rec.enabled_projects, "expires_at": isoformat(rec.expires_at)});
        audit(&mut tx, actor, TokenAction::Create, &rec.token_id, details).await?;
        tx.commit().await?;
        Ok(rec)
    }

    /// Applies changes to one of the user's non-revoked tokens.
    pub async fn update(&self, actor: &Actor, token_id: &str, ch: TokenChanges<'_>) -> Result<TokenRecord, StoreError> {
        let mut tx = self.pool.begin().await?;
        lock_user(&mut tx, actor.user_id).await?;
        let live: Option<bool> = sqlx::query(&format!(
            "SELECT expires_at > {NOW_UTC} AS live FROM mcp_token WHERE token_id = $1 AND user_id = $2 AND revoked_at IS NULL FOR UPDATE"
        ))
        .bind(token_id)
        .bind(actor.user_id)
        .fetch_optional(&mut *tx)
        .await?
        .map(|r| r.try_get("live"))
        .transpose()?;
        let Some(live) = live else { return Err(StoreError::NotFound) };
        // Extending an expired token makes it live again: respect the limit.
        if !live && ch.expires_days.is_some() && live_count(&mut tx, actor.user_id).await? >= self.max_live_per_user {
            return Err(StoreError::TooManyTokens);
        }
        let row = sqlx::query(&format!(
            "UPDATE mcp_token SET name = COALESCE($3, name), enabled_projects = COALESCE($4, enabled_projects), \
             expires_at = COALESCE({NOW_UTC} + make_interval(days => $5::int), expires_at) \
             WHERE token_id = $1 AND user_id = $2 AND revoked_at IS NULL RETURNING {COLUMNS}"
        ))
        .bind(token_id)
        .bind(actor.user_id)
        .bind(ch.name)
        .bind(ch.enabled_projects)
        .bind(ch.expires_days.map(|d| d as i32))
        .fetch_one(&mut *tx)
        .await?;
        let rec = TokenRecord::from_row(&row)?;
        let mut details = serde_json::Map::new();
        if ch.name.is_some() {
            details.insert("name".into(), json!(rec.name));
        }
        if ch.enabled_projects.is_some() {
            details.insert("enabled_projects".into(), rec.enabled_projects.clone());
        }
        if ch.expires_days.is_some() {
            details.insert("expires_at".into(), json!(isoformat(rec.expires_at)));
        }
        audit(&mut tx, actor, TokenAction::Update, token_id, Value::Object(details)).await?;
        tx.commit().await?;
        Ok(rec)
    }

    /// Revokes one of the user's non-revoked tokens.
    pub async fn revoke(&self, actor: &Actor, token_id: &str) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        let done = sqlx::query(&format!(
            "UPDATE mcp_token SET revoked_at = {NOW_UTC} WHERE token_id = $1 AND user_id = $2 AND revoked_at IS NULL"
        ))
        .bind(token_id)
        .bind(actor.user_id)
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound);
        }
        audit(&mut tx, actor, TokenAction::Revoke, token_id, json!({})).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Grants or withdraws writes (trigger, restart, abort…) for one token.
    pub async fn set_trigger(&self, actor: &Actor, token_id: &str, allow: bool) -> Result<TokenRecord, StoreError> {
        let mut tx = self.pool.begin().await?;
        let row = sqlx::query(&format!(
            "UPDATE mcp_token SET allow_trigger = $3 WHERE token_id = $1 AND user_id = $2 AND revoked_at IS NULL RETURNING {COLUMNS}"
        ))
        .bind(token_id)
        .bind(actor.user_id)
        .bind(allow)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else { return Err(StoreError::NotFound) };
        let rec = TokenRecord::from_row(&row)?;
        let action = if allow { TokenAction::TriggerGrant } else { TokenAction::TriggerWithdraw };
        audit(&mut tx, actor, action, token_id, json!({"allow_trigger": allow})).await?;
        tx.commit().await?;
        Ok(rec)
    }
}

/// Serializes token writes of one user (the live-token limit is per user).
async fn lock_user(conn: &mut PgConnection, user_id: Uuid) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended('mcp_token_user:' || $1::text, 0))")
        .bind(user_id)
        .execute(conn)
        .await?;
    Ok(())
}

async fn live_count(conn: &mut PgConnection, user_id: Uuid) -> Result<i64, sqlx::Error> {
    sqlx::query(&format!(
        "SELECT count(*) AS n FROM mcp_token WHERE user_id = $1 AND revoked_at IS NULL AND expires_at > {NOW_UTC}"
    ))
    .bind(user_id)
    .fetch_one(conn)
    .await?
    .try_get("n")
}

async fn audit(conn: &mut PgConnection, actor: &Actor, action: TokenAction, token_id: &str, mut details: Value) -> Result<(), sqlx::Error> {
    // Client-supplied: kept only when it is a plain id (never a token).
    let request_id = crate::audit::row::clean_request_id(&actor.request_id);
    if let Value::Object(m) = &mut details {
        m.insert("request_id".into(), json!(request_id));
    }
    sqlx::query(&format!(
        "INSERT INTO mcp_access_log (id, token_id, user_id, action, outcome, details, ip, accessed_at, request_id) \
         VALUES ($1, $2, $3, $4, 'success', $5, $6, {NOW_UTC}, $7)"
    ))
    .bind(Uuid::new_v4())
    .bind(token_id)
    .bind(actor.user_id)
    .bind(action.as_str())
    .bind(details)
    .bind(actor.ip.as_deref().filter(|ip| ip.parse::<std::net::IpAddr>().is_ok()))
    .bind(request_id)
    .execute(conn)
    .await?;
    Ok(())
}
