//! Building a [`Snapshot`] from the database (DESIGN §8): live tokens,
//! their effective projects (enabled ∩ current collaborator projects) and
//! a content version that stays the same while the policy does.
//!
//! Two queries per build, whatever the number of tokens.

use std::collections::{BTreeMap, HashMap, HashSet};

use chrono::NaiveDateTime;
use mcp_filter_core::token;
use mcp_filter_core::snapshot::{Limits, Snapshot, SnapshotToken, SnapshotUser, SCHEMA};
use serde_json::Value;
use sha2::{Digest, Sha256};
use sqlx::{PgPool, Row};
use uuid::Uuid;

use crate::credential::cipher::CredentialCipher;
use crate::credential::upstream::SealedCredential;
use crate::credential::CredentialKind;
use crate::expiry::parse_expiry;

/// A live `mcp_token` row.
#[derive(Debug, Clone)]
pub struct LiveToken {
    pub token_id: String,
    pub token_hash: String,
    pub user_id: Uuid,
    pub enabled_projects: Value,
    pub allow_trigger: bool,
    pub expires_at: NaiveDateTime,
}

/// What a snapshot is built from.
pub struct Loaded {
    pub tokens: Vec<LiveToken>,
    pub collaborators: HashMap<Uuid, HashSet<Uuid>>,
    /// Encrypted upstream credentials of users with live tokens.
    pub credentials: Vec<SealedCredential>,
}

/// Reads live tokens, their users' collaborator projects and upstream
/// credentials in one read-only, repeatable-read transaction.
pub async fn load(pool: &PgPool) -> Result<Loaded, sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY").execute(&mut *tx).await?;
    let live = "revoked_at IS NULL AND expires_at > (now() AT TIME ZONE 'utc')";
    let rows = sqlx::query(&format!(
        "SELECT token_id, token_hash, user_id, enabled_projects, allow_trigger, expires_at \
         FROM mcp_token WHERE {live} ORDER BY token_id"
    ))
    .fetch_all(&mut *tx)
    .await?;
    let mut tokens = Vec::with_capacity(rows.len());
    for r in &rows {
        tokens.push(LiveToken {
            token_id: r.try_get("token_id")?,
            token_hash: r.try_get("token_hash")?,
            user_id: r.try_get("user_id")?,
            enabled_projects: r.try_get("enabled_projects")?,
            allow_trigger: r.try_get("allow_trigger")?,
            expires_at: r.try_get("expires_at")?,
        });
    }
    let rows = sqlx::query(&format!(
        "SELECT c.user_id, c.project_id FROM collaborator c \
         WHERE c.user_id IN (SELECT DISTINCT user_id FROM mcp_token WHERE {live})"
    ))
    .fetch_all(&mut *tx)
    .await?;
    let mut collab: HashMap<Uuid, HashSet<Uuid>> = HashMap::new();
    for r in &rows {
        collab.entry(r.try_get("user_id")?).or_default().insert(r.try_get("project_id")?);
    }
    let credentials = crate::credential::upstream::load_sealed(&mut tx).await?;
    tx.commit().await?;
    Ok(Loaded { tokens, collaborators: collab, credentials })
}

/// Decrypts the credentials for the snapshot. One that does not decrypt is
/// left out (the filter then answers 503 `upstream_credential_missing` for
/// that user) and logged without its content.
pub fn open_credentials(sealed: &[SealedCredential], cipher: &CredentialCipher) -> HashMap<Uuid, SnapshotUser> {
    let mut users: HashMap<Uuid, SnapshotUser> = HashMap::new();
    for c in sealed {
        match cipher.decrypt(c.user_id, c.kind, &c.ciphertext) {
            Ok(plain) => {
                let u = users.entry(c.user_id).or_default();
                match c.kind {
                    CredentialKind::Read => u.read_credential = Some(plain),
                    CredentialKind::Write => u.write_credential = Some(plain),
                }
            }
            Err(e) => tracing::warn!(user = %c.user_id, kind = c.kind.as_str(), error = %e, "upstream credential left out of the snapshot"),
        }
    }
    users
}

/// Effective projects of one token: `{}` → every collaborator project without
/// expiry; otherwise each listed project the user collaborates on, with its
/// expiry. Malformed ids or expiries leave the project out (denied).
pub fn effective_projects(enabled: &Value, collab: Option<&HashSet<Uuid>>) -> BTreeMap<String, Option<i64>> {
    let empty = HashSet::new();
    let collab = collab.unwrap_or(&empty);
    let Some(enabled) = enabled.as_object() else { return BTreeMap::new() };
    if enabled.is_empty() {
        return collab.iter().map(|p| (p.to_string(), None)).collect();
    }
    let mut out = BTreeMap::new();
    for (key, expiry) in enabled {
        let Ok(project) = Uuid::parse_str(key) else { continue };
        if !collab.contains(&project) {
            continue;
        }
        let expiry = match expiry {
            Value::Null => None,
            Value::String(s) => match parse_expiry(s) {
                Some(t) => Some(t),
                None => continue,
            },
            _ => continue,
        };
        out.insert(project.to_string(), expiry);
    }
    out
}

/// Assembles the snapshot (pure).
pub fn assemble(
    tokens: &[LiveToken],
    collab: &HashMap<Uuid, HashSet<Uuid>>,
    credentials: &HashMap<Uuid, SnapshotUser>,
    limits: &Limits,
    generated_at: i64,
) -> Snapshot {
    let mut users = BTreeMap::new();
    let mut out = Vec::with_capacity(tokens.len());
    let mut hashes = HashSet::new();
    for t in tokens {
        // The filter refuses a whole snapshot with one malformed row, so
        // leave such rows out (they could never authenticate anyway).
        if !token::is_token_id(&t.token_id) || token::parse_hash_hex(&t.token_hash).is_none() || !hashes.insert(&t.token_hash) {
            tracing::warn!(token_id = %t.token_id.chars().take(16).collect::<String>(), "skipping malformed or duplicate mcp_token row");
            continue;
        }
        let user_id = t.user_id.to_string();
        users.entry(user_id.clone()).or_insert_with(|| credentials.get(&t.user_id).cloned().unwrap_or_default());
        out.push(SnapshotToken {
            token_id: t.token_id.clone(),
            token_hash: t.token_hash.clone(),
            user_id,
            expires_at: t.expires_at.and_utc().timestamp(),
            allow_trigger: t.allow_trigger,
            projects: effective_projects(&t.enabled_projects, collab.get(&t.user_id)),
        });
    }
    out.sort_by(|a, b| a.token_id.cmp(&b.token_id));
    let mut snap = Snapshot { schema: SCHEMA, version: String::new(), generated_at, limits: limits.clone(), tokens: out, users };
    snap.version = content_version(&snap);
    snap
}

/// First 32 hex of SHA-256 over the snapshot without `version` and `generated_at`.
pub fn content_version(snap: &Snapshot) -> String {
    let mut content = snap.clone();
    content.version = String::new();
    content.generated_at = 0;
    let bytes = serde_json::to_vec(&content).unwrap_or_default();
    let mut v = hex::encode(Sha256::digest(&bytes));
    v.truncate(32);
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const P1: &str = "11111111-1111-4111-8111-111111111111";
    const P2: &str = "22222222-2222-4222-8222-222222222222";
    const P3: &str = "33333333-3333-4333-8333-333333333333";

    fn collab() -> HashSet<Uuid> {
        [P1, P2].iter().map(|p| Uuid::parse_str(p).unwrap()).collect()
    }

    #[test]
    fn empty_means_all_collaborator_projects() {
        let got = effective_projects(&json!({}), Some(&collab()));
        assert_eq!(got, BTreeMap::from([(P1.into(), None), (P2.into(), None)]));
        assert!(effective_projects(&json!({}), None).is_empty());
    }

    #[test]
    fn listed_projects_intersect_collaborators() {
        let got = effective_projects(
            &json!({P1: "2026-12-01T00:00:00", P2.to_uppercase(): null, P3: null, "junk": null}),
            Some(&collab()),
        );
        assert_eq!(got, BTreeMap::from([(P1.into(), Some(1_796_083_200)), (P2.into(), None)]));
        // A malformed expiry denies the project.
        let got = effective_projects(&json!({P1: "tomorrow", P2: 5}), Some(&collab()));
        assert!(got.is_empty());
        assert!(effective_projects(&json!([P1]), Some(&collab())).is_empty());
    }

    fn token(id: &str) -> LiveToken {
        LiveToken {
            token_id: id.into(),
            token_hash: token::hash_hex(id),
            user_id: Uuid::parse_str(P3).unwrap(),
            enabled_projects: json!({}),
            allow_trigger: false,
            expires_at: chrono::DateTime::from_timestamp(2_000_000_000, 0).unwrap().naive_utc(),
        }
    }

    #[test]
    fn version_is_stable_and_content_sensitive() {
        let limits = Limits::default();
        let c = HashMap::from([(Uuid::parse_str(P3).unwrap(), collab())]);
        let a = assemble(&[token("00000000000000bb"), token("00000000000000aa")], &c, &HashMap::new(), &limits, 1);
        let b = assemble(&[token("00000000000000aa"), token("00000000000000bb")], &c, &HashMap::new(), &limits, 99);
        assert_eq!(a.version, b.version);
        assert_eq!(a.version.len(), 32);
        assert_eq!(a.tokens[0].token_id, "00000000000000aa");
        assert_eq!(a.users.len(), 1);
        assert_eq!(a.tokens[0].expires_at, 2_000_000_000);
        let mut t = token("00000000000000aa");
        t.allow_trigger = true;
        assert_ne!(assemble(&[t], &c, &HashMap::new(), &limits, 1).version, a.version);
        assert_ne!(assemble(&[token("00000000000000aa"), token("00000000000000bb")], &HashMap::new(), &HashMap::new(), &limits, 1).version, a.version);
        // The filter accepts what we build.
        let json = serde_json::to_vec(&a).unwrap();
        let policy = mcp_filter_core::snapshot::Policy::from_json(&json).unwrap();
        assert_eq!(policy.token_count(), 2);
        let empty = assemble(&[], &HashMap::new(), &HashMap::new(), &limits, 5);
        assert!(mcp_filter_core::snapshot::Policy::from_json(&serde_json::to_vec(&empty).unwrap()).is_ok());
        // Malformed or duplicate rows are left out.
        let mut bad = token("00000000000000cc");
        bad.token_hash = "XYZ".into();
        let s = assemble(&[token("00000000000000aa"), token("00000000000000aa"), bad, token("zz")], &c, &HashMap::new(), &limits, 1);
        assert_eq!(s.tokens.len(), 1);
    }
}
