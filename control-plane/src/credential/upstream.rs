//! `UpstreamCredentials`: when a user's InfraBox credentials are minted,
//! replaced and retired (DESIGN §7), kept in `mcp_upstream_credential`.
//!
//! - [`ensure`](UpstreamCredentials::ensure) runs before a token action that
//!   needs a credential (create and extend need `read`; granting trigger,
//!   or extending a token that may trigger, needs `write`). It mints a new
//!   credential when there is none or when the stored one would expire
//!   before `until`, then deletes the replaced one in InfraBox.
//! - [`retire_unneeded`](UpstreamCredentials::retire_unneeded) runs after
//!   revoke and withdraw: a credential no live token needs any more is
//!   deleted in InfraBox first and only then forgotten here, so a failed
//!   delete is retried by the next token action instead of leaking.
//!
//! Each runs under a per-user advisory lock, so concurrent actions of one
//! user never mint twice.
//!
//! InfraBox's own audit: `global_token_access_log` rows reference their
//! global token `ON DELETE CASCADE`, so deleting a credential would delete
//! InfraBox's record of every request made with it. Before a credential is
//! deleted, its rows are copied into `mcp_access_log` (same ids, so a
//! retried deletion copies nothing twice; action
//! `infrabox.global_token_access`), where the gateway's retention applies.
//! If the copy fails, the credential is not deleted (the next token action
//! retries both).

use std::sync::Arc;

use chrono::{DateTime, Duration as ChronoDuration, Utc};
use sqlx::{PgConnection, PgPool, Row};
use uuid::Uuid;

use super::cipher::{CipherError, CredentialCipher};
use super::infrabox::{InfraBoxClient, InfraBoxError};
use super::CredentialKind;

/// A credential must outlive the token it serves by at least this much.
const MARGIN_HOURS: i64 = 1;
/// InfraBox's longest global-token lifetime.
const MAX_DAYS: i64 = 3650;

/// Why a credential could not be provisioned.
#[derive(Debug)]
pub enum CredentialError {
    InfraBox(InfraBoxError),
    Cipher(CipherError),
    Db(sqlx::Error),
}

impl std::fmt::Display for CredentialError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CredentialError::InfraBox(e) => write!(f, "{e}"),
            CredentialError::Cipher(e) => write!(f, "credential encryption: {e}"),
            CredentialError::Db(e) => write!(f, "database: {e}"),
        }
    }
}

impl std::error::Error for CredentialError {}

impl From<sqlx::Error> for CredentialError {
    fn from(e: sqlx::Error) -> Self {
        CredentialError::Db(e)
    }
}

/// A stored, still encrypted credential.
#[derive(Clone)]
pub struct SealedCredential {
    pub user_id: Uuid,
    pub kind: CredentialKind,
    pub ciphertext: Vec<u8>,
}

/// Provisioning of upstream credentials.
#[derive(Clone)]
pub struct UpstreamCredentials {
    pool: PgPool,
    cipher: Arc<CredentialCipher>,
    infrabox: InfraBoxClient,
}

fn columns(kind: CredentialKind) -> (&'static str, &'static str, &'static str) {
    match kind {
        CredentialKind::Read => ("read_ciphertext", "read_token_id", "read_expires_at"),
        CredentialKind::Write => ("write_ciphertext", "write_token_id", "write_expires_at"),
    }
}

/// Whole days InfraBox must grant so that a credential minted now outlives `until`.
pub fn days_to_cover(now: DateTime<Utc>, until: DateTime<Utc>) -> i64 {
    let needed = (until - now).num_seconds().max(0) + MARGIN_HOURS * 3600;
    (needed.div_euclid(86_400) + 1).clamp(1, MAX_DAYS)
}

async fn lock_user(conn: &mut PgConnection, user: Uuid) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext('mcp_upstream_credential'), hashtext($1::text))")
        .bind(user)
        .execute(conn)
        .await?;
    Ok(())
}

impl UpstreamCredentials {
    pub fn new(pool: PgPool, cipher: Arc<CredentialCipher>, infrabox: InfraBoxClient) -> Self {
        Self { pool, cipher, infrabox }
    }

    pub fn cipher(&self) -> &CredentialCipher {
        &self.cipher
    }

    /// Makes sure the user's `kind` credential exists and lasts until `until`.
    pub async fn ensure(
        &self,
        user: Uuid,
        session: &str,
        kind: CredentialKind,
        until: DateTime<Utc>,
    ) -> Result<(), CredentialError> {
        let (ct, id_col, exp_col) = columns(kind);
        let mut tx = self.pool.begin().await?;
        lock_user(&mut tx, user).await?;
        let row = sqlx::query(&format!(
            "SELECT {id_col} AS id, {exp_col} AS expires_at, {ct} IS NOT NULL AS present \
             FROM mcp_upstream_credential WHERE user_id = $1"
        ))
        .bind(user)
        .fetch_optional(&mut *tx)
        .await?;
        let (old_id, old_expiry, present) = match &row {
            Some(r) => (
                r.try_get::<Option<Uuid>, _>("id")?,
                r.try_get::<Option<DateTime<Utc>>, _>("expires_at")?,
                r.try_get::<bool, _>("present")?,
            ),
            None => (None, None, false),
        };
        let margin = ChronoDuration::hours(MARGIN_HOURS);
        if present && old_expiry.is_some_and(|e| e >= until + margin) {
            return Ok(());
        }
        let now = Utc::now();
        let days = days_to_cover(now, until);
        let minted = self.infrabox.create_global_token(session, kind, days).await.map_err(CredentialError::InfraBox)?;
        let sealed = self.cipher.encrypt(user, kind, &minted.token).map_err(CredentialError::Cipher)?;
        // InfraBox counts from its own clock, a moment later than ours.
        let expires_at = now + ChronoDuration::days(days);
        sqlx::query(&format!(
            "INSERT INTO mcp_upstream_credential (user_id, {ct}, {id_col}, {exp_col}, updated_at) \
             VALUES ($1, $2, $3, $4, now()) \
             ON CONFLICT (user_id) DO UPDATE SET {ct} = $2, {id_col} = $3, {exp_col} = $4, updated_at = now()"
        ))
        .bind(user)
        .bind(&sealed)
        .bind(minted.id)
        .bind(expires_at)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        tracing::info!(%user, kind = kind.as_str(), credential_id = %minted.id, days, "upstream credential provisioned");
        if let Some(old) = old_id.filter(|o| *o != minted.id) {
            match self.preserve_infrabox_audit(user, kind, old).await {
                Ok(_) => {
                    if let Err(e) = self.infrabox.delete_global_token(session, old).await {
                        tracing::warn!(%user, kind = kind.as_str(), error = %e, "could not delete the replaced upstream credential");
                    }
                }
                Err(e) => tracing::warn!(%user, kind = kind.as_str(), error = %e, "kept the replaced upstream credential: its InfraBox audit rows could not be copied"),
            }
        }
        Ok(())
    }

    /// Copies InfraBox's access-log rows of credential `id` into
    /// `mcp_access_log` (see the module documentation); returns how many
    /// were new. An InfraBox without the table has nothing to copy.
    pub async fn preserve_infrabox_audit(&self, user: Uuid, kind: CredentialKind, id: Uuid) -> Result<u64, sqlx::Error> {
        let copied = sqlx::query(
            "INSERT INTO mcp_access_log (id, user_id, action, outcome, details, accessed_at, method, path, status_code) \
             SELECT l.id, $2, 'infrabox.global_token_access', \
                    CASE WHEN l.status_code IS NULL THEN 'upstream_error' WHEN l.status_code < 400 THEN 'success' \
                         WHEN l.status_code = 401 THEN 'unauthorized' WHEN l.status_code = 403 THEN 'forbidden' \
                         WHEN l.status_code IN (404, 405) THEN 'not_found' WHEN l.status_code = 429 THEN 'rate_limited' \
                         WHEN l.status_code < 500 THEN 'bad_request' ELSE 'upstream_error' END, \
                    jsonb_build_object('source', 'global_token_access_log', 'global_token_id', l.token_id, 'credential', $3::text), \
                    l.accessed_at, left(l.method, 16), left(l.path, 512), l.status_code \
             FROM global_token_access_log l WHERE l.token_id = $1 \
             ON CONFLICT (id) DO NOTHING",
        )
        .bind(id)
        .bind(user)
        .bind(kind.as_str())
        .execute(&self.pool)
        .await;
        match copied {
            Ok(done) => {
                if done.rows_affected() > 0 {
                    tracing::info!(%user, kind = kind.as_str(), credential_id = %id, rows = done.rows_affected(), "copied InfraBox's audit rows of an upstream credential before deleting it");
                }
                Ok(done.rows_affected())
            }
            // 42P01 undefined_table: an InfraBox without global_token_access_log.
            Err(sqlx::Error::Database(d)) if d.code().as_deref() == Some("42P01") => Ok(0),
            Err(e) => Err(e),
        }
    }

    /// Mints the credentials the user's live tokens need and the user does
    /// not have (tokens created by InfraBox's own token API, before the
    /// gateway): run at every session-authenticated token-API request, so
    /// the owner's next visit to the token page (or `GET
    /// /api/v1/mcp/tokens`) makes such tokens work. Returns the kinds minted.
    pub async fn provision_missing(&self, user: Uuid, session: &str) -> Result<Vec<CredentialKind>, CredentialError> {
        let row = sqlx::query(
            "SELECT max(t.expires_at) AS read_until, max(t.expires_at) FILTER (WHERE t.allow_trigger) AS write_until, \
                    coalesce(bool_or(c.read_ciphertext IS NULL), false) AS read_missing, \
                    coalesce(bool_or(t.allow_trigger AND c.write_ciphertext IS NULL), false) AS write_missing \
             FROM mcp_token t LEFT JOIN mcp_upstream_credential c ON c.user_id = t.user_id \
             WHERE t.user_id = $1 AND t.revoked_at IS NULL AND t.expires_at > (now() AT TIME ZONE 'utc')",
        )
        .bind(user)
        .fetch_one(&self.pool)
        .await?;
        let until = |col: &str| -> Result<Option<DateTime<Utc>>, sqlx::Error> {
            Ok(row.try_get::<Option<chrono::NaiveDateTime>, _>(col)?.map(|t| t.and_utc()))
        };
        let mut minted = Vec::new();
        for (kind, missing, until) in [
            (CredentialKind::Read, row.try_get::<bool, _>("read_missing")?, until("read_until")?),
            (CredentialKind::Write, row.try_get::<bool, _>("write_missing")?, until("write_until")?),
        ] {
            if let (true, Some(until)) = (missing, until) {
                self.ensure(user, session, kind, until).await?;
                minted.push(kind);
            }
        }
        Ok(minted)
    }

    /// Deletes (in InfraBox, then here) every credential of `user` that no
    /// live token needs: both when none is live, `write` when none may trigger.
    pub async fn retire_unneeded(&self, user: Uuid, session: &str) -> Result<(), CredentialError> {
        let mut tx = self.pool.begin().await?;
        lock_user(&mut tx, user).await?;
        let need = sqlx::query(
            "SELECT count(*) AS live, coalesce(bool_or(allow_trigger), false) AS trigger FROM mcp_token \
             WHERE user_id = $1 AND revoked_at IS NULL AND expires_at > (now() AT TIME ZONE 'utc')",
        )
        .bind(user)
        .fetch_one(&mut *tx)
        .await?;
        let live: i64 = need.try_get("live")?;
        let trigger: bool = need.try_get("trigger")?;
        let Some(row) = sqlx::query("SELECT read_token_id, write_token_id FROM mcp_upstream_credential WHERE user_id = $1")
            .bind(user)
            .fetch_optional(&mut *tx)
            .await?
        else {
            return Ok(());
        };
        let mut first_error = None;
        for kind in CredentialKind::ALL {
            let needed = match kind {
                CredentialKind::Read => live > 0,
                CredentialKind::Write => live > 0 && trigger,
            };
            let (ct, id_col, exp_col) = columns(kind);
            let Some(id) = row.try_get::<Option<Uuid>, _>(id_col)? else { continue };
            if needed {
                continue;
            }
            if let Err(e) = self.preserve_infrabox_audit(user, kind, id).await {
                tracing::warn!(%user, kind = kind.as_str(), error = %e, "kept an upstream credential: its InfraBox audit rows could not be copied; will retry");
                first_error.get_or_insert(CredentialError::Db(e));
                continue;
            }
            match self.infrabox.delete_global_token(session, id).await {
                Ok(()) => {
                    sqlx::query(&format!(
                        "UPDATE mcp_upstream_credential SET {ct} = NULL, {id_col} = NULL, {exp_col} = NULL, updated_at = now() \
                         WHERE user_id = $1"
                    ))
                    .bind(user)
                    .execute(&mut *tx)
                    .await?;
                    tracing::info!(%user, kind = kind.as_str(), credential_id = %id, "upstream credential retired");
                }
                Err(e) => {
                    tracing::warn!(%user, kind = kind.as_str(), error = %e, "could not retire an upstream credential; will retry");
                    first_error.get_or_insert(CredentialError::InfraBox(e));
                }
            }
        }
        sqlx::query("DELETE FROM mcp_upstream_credential WHERE user_id = $1 AND read_token_id IS NULL AND write_token_id IS NULL")
            .bind(user)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        first_error.map_or(Ok(()), Err)
    }
}

/// Stored credentials of every user who has a live token (for the snapshot),
/// or of those in `only` among them (for a patch).
pub async fn load_sealed(conn: &mut PgConnection, only: Option<&[Uuid]>) -> Result<Vec<SealedCredential>, sqlx::Error> {
    let select = "SELECT user_id, read_ciphertext, write_ciphertext FROM mcp_upstream_credential c \
         WHERE EXISTS (SELECT 1 FROM mcp_token t WHERE t.user_id = c.user_id AND t.revoked_at IS NULL \
                       AND t.expires_at > (now() AT TIME ZONE 'utc'))";
    let rows = match only {
        None => sqlx::query(select).fetch_all(conn).await?,
        Some(users) => sqlx::query(&format!("{select} AND c.user_id = ANY($1)")).bind(users).fetch_all(conn).await?,
    };
    let mut out = Vec::with_capacity(rows.len() * 2);
    for r in &rows {
        let user_id: Uuid = r.try_get("user_id")?;
        for (kind, col) in [(CredentialKind::Read, "read_ciphertext"), (CredentialKind::Write, "write_ciphertext")] {
            if let Some(ciphertext) = r.try_get::<Option<Vec<u8>>, _>(col)? {
                out.push(SealedCredential { user_id, kind, ciphertext });
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn days_cover_the_token_with_margin() {
        let now = Utc::now();
        assert_eq!(days_to_cover(now, now), 1);
        assert_eq!(days_to_cover(now, now + ChronoDuration::days(30)), 31);
        assert_eq!(days_to_cover(now, now + ChronoDuration::days(30) - ChronoDuration::hours(2)), 30);
        assert_eq!(days_to_cover(now, now - ChronoDuration::days(3)), 1);
        assert_eq!(days_to_cover(now, now + ChronoDuration::days(9000)), MAX_DAYS);
        // The minted credential (now + days) is always past until + margin.
        for h in [0i64, 1, 23, 24, 25, 24 * 365] {
            let until = now + ChronoDuration::hours(h);
            let d = days_to_cover(now, until);
            assert!(now + ChronoDuration::days(d) >= until + ChronoDuration::hours(MARGIN_HOURS), "{h}");
        }
    }
}
