//! InfraBox's own tables ("user", project, collaborator, global_token) in a
//! test database: loading the schema fixture and seeding rows the way
//! InfraBox would have written them.

use std::path::PathBuf;

use anyhow::{Context, Result};
use sqlx::{Executor, PgPool};
use uuid::Uuid;

/// Path of the schema fixture `tests/fixtures/infrabox_schema.sql`.
pub fn schema_fixture_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures").join("infrabox_schema.sql")
}

/// Runs the schema fixture (idempotent).
pub async fn load_infrabox_schema(pool: &PgPool) -> Result<()> {
    let path = schema_fixture_path();
    let sql = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    pool.execute(sqlx::raw_sql(&sql)).await.with_context(|| format!("loading InfraBox schema ({})", path.display()))?;
    Ok(())
}

/// Inserts a `"user"` row (system role `user`) and returns its id.
pub async fn create_user(pool: &PgPool, username: &str) -> Result<Uuid> {
    let id = Uuid::new_v4();
    sqlx::query(r#"INSERT INTO "user" (id, username, name, email) VALUES ($1, $2, $2, $3)"#)
        .bind(id)
        .bind(username)
        .bind(format!("{username}-{id}@example.test"))
        .execute(pool)
        .await
        .context("inserting user")?;
    Ok(id)
}

/// Inserts a `project` row (`type` one of github, upload, test, gerrit) and returns its id.
pub async fn create_project(pool: &PgPool, name: &str, project_type: &str, public: bool) -> Result<Uuid> {
    let id = Uuid::new_v4();
    sqlx::query("INSERT INTO project (id, name, type, public) VALUES ($1, $2, $3::project_type, $4)")
        .bind(id)
        .bind(name)
        .bind(project_type)
        .bind(public)
        .execute(pool)
        .await
        .context("inserting project")?;
    Ok(id)
}

/// Makes `user` a collaborator of `project` with `role` (Developer, Administrator, Owner).
pub async fn add_collaborator(pool: &PgPool, user: Uuid, project: Uuid, role: &str) -> Result<()> {
    sqlx::query(
        "INSERT INTO collaborator (user_id, project_id, role) VALUES ($1, $2, $3::user_role)
         ON CONFLICT (user_id, project_id) DO UPDATE SET role = EXCLUDED.role",
    )
    .bind(user)
    .bind(project)
    .bind(role)
    .execute(pool)
    .await
    .context("inserting collaborator")?;
    Ok(())
}

/// Removes `user` from `project`'s collaborators.
pub async fn remove_collaborator(pool: &PgPool, user: Uuid, project: Uuid) -> Result<()> {
    sqlx::query("DELETE FROM collaborator WHERE user_id = $1 AND project_id = $2")
        .bind(user)
        .bind(project)
        .execute(pool)
        .await
        .context("deleting collaborator")?;
    Ok(())
}

/// Inserts a `global_token` row directly (what POST /api/v1/user/global-tokens
/// does) and returns its id; sign it with `SigningKey::sign_global_token`.
pub async fn create_global_token(
    pool: &PgPool,
    user: Uuid,
    description: &str,
    scope_push: bool,
    expires_days: i32,
) -> Result<Uuid> {
    let id = Uuid::new_v4();
    sqlx::query(
        "INSERT INTO global_token (id, description, scope_push, scope_pull, user_id, expires_at)
         VALUES ($1, $2, $3, true, $4, now() + make_interval(days => $5))",
    )
    .bind(id)
    .bind(description)
    .bind(scope_push)
    .bind(user)
    .bind(expires_days)
    .execute(pool)
    .await
    .context("inserting global_token")?;
    Ok(id)
}

/// InfraBox's schema bookkeeping (`src/db/migrate.py`): the one-row table
/// `infrabox` holding the schema version its migrations reached.
pub async fn set_infrabox_schema_version(pool: &PgPool, version: i32) -> Result<()> {
    sqlx::raw_sql("CREATE TABLE IF NOT EXISTS infrabox (schema_version integer NOT NULL)").execute(pool).await?;
    sqlx::query("DELETE FROM infrabox").execute(pool).await?;
    sqlx::query("INSERT INTO infrabox (schema_version) VALUES ($1)").bind(version).execute(pool).await?;
    Ok(())
}

/// Runs InfraBox's own 00047 statements for its MCP tables (the fixture
/// `tests/fixtures/infrabox_00047_mcp.sql`, as InfraBox runs them: plain
/// `CREATE TABLE`).
pub async fn apply_infrabox_00047(pool: &PgPool) -> Result<()> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures").join("infrabox_00047_mcp.sql");
    let sql = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    pool.execute(sqlx::raw_sql(&sql)).await.context("InfraBox's migration 00047")?;
    Ok(())
}
