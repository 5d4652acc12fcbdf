//! Schema migrations (`migrations/*.sql` at the repository root, embedded).
//!
//! Bookkeeping lives in the gateway's own `mcp_gateway_schema_migrations`
//! table (never InfraBox's). All pending files are applied in one
//! transaction under a transaction-scoped advisory lock, so replicas that
//! start together apply each migration exactly once.

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

/// Applies every pending migration; returns the versions applied now.
pub async fn run(pool: &PgPool) -> Result<Vec<i32>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)").bind(LOCK_KEY).execute(&mut *tx).await?;
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
