//! Schema migrations (`migrations/*.sql` at the repository root, embedded).
//!
//! Bookkeeping lives in the gateway's own `mcp_gateway_schema_migrations`
//! table (never InfraBox's). All pending files are applied in one
//! transaction under a transaction-scoped advisory lock, so replicas that
//! start together apply each migration exactly once.
//!
//! Install order (`INFRABOX_API.md` §8): InfraBox's own migration 00047
//! creates `mcp_token` and `mcp_access_log` with a plain `CREATE TABLE`, so
//! if the gateway created them first, InfraBox's next upgrade would fail
//! and be blocked. InfraBox keeps its schema version in the one-row table
//! `infrabox` (`src/db/migrate.py`). The gateway therefore creates its
//! tables only where InfraBox already has them (version 47 or later: its
//! `CREATE … IF NOT EXISTS` are no-ops) or where InfraBox will never have
//! them (no `infrabox` table: not an InfraBox database), and refuses to
//! start on an InfraBox below 00047 ([`check_infrabox_schema`]).

use sqlx::{PgPool, Row};

/// (version, name, SQL), in order.
pub const MIGRATIONS: &[(i32, &str, &str)] = &[
    (1, "0001_mcp_tables", include_str!("../../migrations/0001_mcp_tables.sql")),
    (2, "0002_upstream_credentials", include_str!("../../migrations/0002_upstream_credentials.sql")),
    (3, "0003_audit", include_str!("../../migrations/0003_audit.sql")),
    (4, "0004_token_change_payload", include_str!("../../migrations/0004_token_change_payload.sql")),
    (5, "0005_coalesced_denials", include_str!("../../migrations/0005_coalesced_denials.sql")),
];

/// Advisory lock key: "mcpmigr" in ASCII.
const LOCK_KEY: i64 = 0x006d_6370_6d69_6772;

/// InfraBox's migration that creates `mcp_token` and `mcp_access_log`.
pub const INFRABOX_MCP_MIGRATION: i64 = 47;

/// Why the gateway may not migrate this database.
#[derive(Debug)]
pub enum MigrateError {
    /// InfraBox's schema is older than 00047.
    InfraBoxTooOld(i64),
    Db(sqlx::Error),
}

impl std::fmt::Display for MigrateError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MigrateError::InfraBoxTooOld(v) => write!(
                f,
                "InfraBox's database schema is at version {v}, below 00047, which creates mcp_token and mcp_access_log: \
                 upgrade InfraBox to 00047 first (if the gateway created those tables, InfraBox's own upgrade would fail), \
                 then start the gateway"
            ),
            MigrateError::Db(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for MigrateError {}

impl From<sqlx::Error> for MigrateError {
    fn from(e: sqlx::Error) -> Self {
        MigrateError::Db(e)
    }
}

/// InfraBox's schema version (`SELECT schema_version FROM infrabox`), or
/// `None` when the database has no InfraBox bookkeeping.
pub async fn infrabox_schema_version(conn: &mut sqlx::PgConnection) -> Result<Option<i64>, sqlx::Error> {
    let has_table: bool = sqlx::query(
        "SELECT EXISTS (SELECT 1 FROM information_schema.tables WHERE table_name = 'infrabox' AND table_schema = current_schema()) AS e",
    )
    .fetch_one(&mut *conn)
    .await?
    .try_get("e")?;
    if !has_table {
        return Ok(None);
    }
    let row = sqlx::query("SELECT schema_version::int8 AS v FROM infrabox LIMIT 1").fetch_optional(&mut *conn).await?;
    Ok(Some(match row {
        Some(r) => r.try_get::<Option<i64>, _>("v")?.unwrap_or(0),
        None => 0,
    }))
}

/// Refuses an InfraBox schema below 00047 (see the module documentation).
pub async fn check_infrabox_schema(conn: &mut sqlx::PgConnection) -> Result<Option<i64>, MigrateError> {
    match infrabox_schema_version(conn).await? {
        Some(v) if v < INFRABOX_MCP_MIGRATION => Err(MigrateError::InfraBoxTooOld(v)),
        other => Ok(other),
    }
}

/// Applies every pending migration; returns the versions applied now.
pub async fn run(pool: &PgPool) -> Result<Vec<i32>, MigrateError> {
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)").bind(LOCK_KEY).execute(&mut *tx).await?;
    let infrabox = check_infrabox_schema(&mut tx).await?;
    tracing::info!(infrabox_schema = ?infrabox, "database checked");
    sqlx::raw_sql(
        "CREATE TABLE IF NOT EXISTS mcp_gateway_schema_migrations (
             version    int PRIMARY KEY,
             name       text NOT NULL,
             applied_at timestamptz NOT NULL DEFAULT now())",
    )
    .execute(&mut *tx)
    .await?;
    let done: Vec<i32> = sqlx::query("SELECT version FROM mcp_gateway_schema_migrations")
        .fetch_all(&mut *tx)
        .await?
        .iter()
        .map(|r| r.try_get("version"))
        .collect::<Result<_, _>>()?;
    let mut applied = Vec::new();
    for (version, name, sql) in MIGRATIONS {
        if done.contains(version) {
            continue;
        }
        sqlx::raw_sql(sql).execute(&mut *tx).await?;
        sqlx::query("INSERT INTO mcp_gateway_schema_migrations (version, name) VALUES ($1, $2)")
            .bind(version)
            .bind(name)
            .execute(&mut *tx)
            .await?;
        applied.push(*version);
    }
    tx.commit().await?;
    Ok(applied)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_increasing_and_named() {
        for w in MIGRATIONS.windows(2) {
            assert!(w[0].0 < w[1].0);
        }
        for (v, name, sql) in MIGRATIONS {
            assert!(name.starts_with(&format!("{v:04}_")));
            assert!(!sql.trim().is_empty());
        }
    }
}
