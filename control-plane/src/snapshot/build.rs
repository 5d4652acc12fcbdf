//! Building the snapshot (DESIGN §8) from the database: live tokens, their
//! effective projects (enabled ∩ current collaborator projects), their
//! users' upstream credentials, and a content version that stays the same
//! while the policy does.
//!
//! [`Model`] is the snapshot's content as the publisher keeps it between
//! builds. A full build reads every live token (three queries, whatever the
//! number); a *patch* re-reads only the tokens a notification named, so a
//! revocation among 100 000 tokens costs milliseconds, not a full reload.
//! Either way the body is serialized once and its content hashed for the
//! version: a patched model and a full build of the same rows are equal.
//!
//! For delta snapshots a build also says what it changed ([`Change`]): a
//! patch, the tokens it named; a full build, what differs between the
//! [`Fingerprint`]s of the old and new content. [`Model::delta`] renders a
//! change as the [`SnapshotDelta`] a VM applies.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use mcp_filter_core::token;
use mcp_filter_core::snapshot::{Limits, Snapshot, SnapshotDelta, SnapshotToken, SnapshotUser, SCHEMA};
use serde::ser::SerializeMap;
use serde_json::Value;
use sha2::{Digest, Sha256};
use sqlx::{PgConnection, PgPool};
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
    /// `None` for `{}` (every collaborator project), the most common case,
    /// which then costs no JSON decoding.
    pub enabled_projects: Option<Value>,
    pub allow_trigger: bool,
    /// Unix seconds.
    pub expires_at: i64,
}

/// What a snapshot (or a patch of one) is built from.
pub struct Loaded {
    pub tokens: Vec<LiveToken>,
    pub collaborators: HashMap<Uuid, HashSet<Uuid>>,
    /// Encrypted upstream credentials of the users concerned.
    pub credentials: Vec<SealedCredential>,
}

const LIVE: &str = "revoked_at IS NULL AND expires_at > (now() AT TIME ZONE 'utc')";

/// Reads live tokens — all of them, or only those named in `only` — with
/// their users' collaborator projects and upstream credentials, in one
/// read-only, repeatable-read transaction.
pub async fn load(pool: &PgPool, only: Option<&[String]>) -> Result<Loaded, sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY").execute(&mut *tx).await?;
    let tokens = live_tokens(&mut tx, only).await?;
    let users: Vec<Uuid> = tokens.iter().map(|t| t.user_id).collect::<HashSet<_>>().into_iter().collect();
    let rows: Vec<(Uuid, Uuid)> = match only {
        None => {
            sqlx::query_as(&format!(
                "SELECT c.user_id, c.project_id FROM collaborator c \
                 WHERE c.user_id IN (SELECT DISTINCT user_id FROM mcp_token WHERE {LIVE})"
            ))
            .fetch_all(&mut *tx)
            .await?
        }
        Some(_) => {
            sqlx::query_as("SELECT user_id, project_id FROM collaborator WHERE user_id = ANY($1)")
                .bind(&users)
                .fetch_all(&mut *tx)
                .await?
        }
    };
    let mut collaborators: HashMap<Uuid, HashSet<Uuid>> = HashMap::new();
    for (user, project) in rows {
        collaborators.entry(user).or_default().insert(project);
    }
    let credentials = crate::credential::upstream::load_sealed(&mut tx, only.map(|_| users.as_slice())).await?;
    tx.commit().await?;
    Ok(Loaded { tokens, collaborators, credentials })
}

async fn live_tokens(conn: &mut PgConnection, only: Option<&[String]>) -> Result<Vec<LiveToken>, sqlx::Error> {
    // Columns decoded by position; `expires_at` (UTC) as epoch seconds.
    let select = format!(
        "SELECT token_id, token_hash, user_id, \
                CASE WHEN enabled_projects = '{{}}'::jsonb THEN NULL ELSE enabled_projects END, \
                allow_trigger, extract(epoch FROM expires_at)::bigint \
         FROM mcp_token WHERE {LIVE}"
    );
    type Row = (String, String, Uuid, Option<Value>, bool, i64);
    let rows: Vec<Row> = match only {
        None => sqlx::query_as(&select).fetch_all(conn).await?,
        Some(ids) => sqlx::query_as(&format!("{select} AND token_id = ANY($1)")).bind(ids).fetch_all(conn).await?,
    };
    Ok(rows
        .into_iter()
        .map(|(token_id, token_hash, user_id, enabled_projects, allow_trigger, expires_at)| LiveToken {
            token_id,
            token_hash,
            user_id,
            enabled_projects,
            allow_trigger,
            expires_at,
        })
        .collect())
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
pub fn effective_projects(enabled: Option<&Value>, collab: Option<&HashSet<Uuid>>) -> BTreeMap<String, Option<i64>> {
    let empty = HashSet::new();
    let collab = collab.unwrap_or(&empty);
    let every = serde_json::Map::new();
    let Some(enabled) = enabled.map_or(Some(&every), Value::as_object) else { return BTreeMap::new() };
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

/// The snapshot's content between builds.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Model {
    /// Live tokens by token id (so the body lists them sorted).
    tokens: BTreeMap<String, SnapshotToken>,
    /// Credentials of every user with a live token.
    users: BTreeMap<String, SnapshotUser>,
    /// Live tokens per user id.
    user_tokens: HashMap<String, u32>,
    /// Hashes of the live tokens (the filter refuses a snapshot with a
    /// hash twice).
    hashes: HashSet<String>,
}

impl Model {
    /// A model of every live token.
    pub fn assemble(loaded: Loaded, credentials: &HashMap<Uuid, SnapshotUser>) -> Self {
        let mut model = Self::default();
        model.add_all(loaded.tokens, &loaded.collaborators, credentials);
        model
    }

    /// Replaces the tokens named in `ids` with their rows in `loaded` (a
    /// token without a live row is dropped).
    pub fn patch(&mut self, ids: &[String], loaded: Loaded, credentials: &HashMap<Uuid, SnapshotUser>) {
        for id in ids {
            if let Some(old) = self.tokens.remove(id) {
                self.hashes.remove(&old.token_hash);
                if let Some(n) = self.user_tokens.get_mut(&old.user_id) {
                    *n = n.saturating_sub(1);
                    if *n == 0 {
                        self.user_tokens.remove(&old.user_id);
                        self.users.remove(&old.user_id);
                    }
                }
            }
        }
        // Credentials of the users concerned were read with the rows.
        for t in &loaded.tokens {
            let id = t.user_id.to_string();
            if self.users.contains_key(&id) {
                self.users.insert(id, credentials.get(&t.user_id).cloned().unwrap_or_default());
            }
        }
        let named: HashSet<&str> = ids.iter().map(String::as_str).collect();
        let rows = loaded.tokens.into_iter().filter(|t| named.contains(t.token_id.as_str())).collect();
        self.add_all(rows, &loaded.collaborators, credentials);
    }

    fn add_all(&mut self, tokens: Vec<LiveToken>, collab: &HashMap<Uuid, HashSet<Uuid>>, credentials: &HashMap<Uuid, SnapshotUser>) {
        let mut user_ids: HashMap<Uuid, String> = HashMap::new();
        for t in tokens {
            // The filter refuses a whole snapshot with one malformed row, so
            // leave such rows out (they could never authenticate anyway).
            let well_formed = token::is_token_id(&t.token_id) && token::parse_hash_hex(&t.token_hash).is_some();
            if !well_formed || self.tokens.contains_key(&t.token_id) || !self.hashes.insert(t.token_hash.clone()) {
                tracing::warn!(token_id = %t.token_id.chars().take(16).collect::<String>(), "skipping malformed or duplicate mcp_token row");
                continue;
            }
            let user_id = user_ids.entry(t.user_id).or_insert_with(|| t.user_id.to_string()).clone();
            if !self.users.contains_key(&user_id) {
                self.users.insert(user_id.clone(), credentials.get(&t.user_id).cloned().unwrap_or_default());
            }
            *self.user_tokens.entry(user_id.clone()).or_default() += 1;
            let token = SnapshotToken {
                projects: effective_projects(t.enabled_projects.as_ref(), collab.get(&t.user_id)),
                token_id: t.token_id,
                token_hash: t.token_hash,
                user_id,
                expires_at: t.expires_at,
                allow_trigger: t.allow_trigger,
            };
            self.tokens.insert(token.token_id.clone(), token);
        }
    }

    pub fn token_count(&self) -> usize {
        self.tokens.len()
    }

    /// The users of the tokens named in `ids` that this model holds.
    pub fn users_of(&self, ids: &[String]) -> BTreeSet<String> {
        ids.iter().filter_map(|id| self.tokens.get(id)).map(|t| t.user_id.clone()).collect()
    }

    /// `change` as a delta from `base` to this model (of version `version`):
    /// each named token as it is now, or removed; the credentials of the
    /// named users and of every user of those tokens.
    pub fn delta(&self, limits: &Limits, change: &Change, base: &str, version: &str, generated_at: i64) -> SnapshotDelta {
        let mut tokens = Vec::new();
        let mut removed = Vec::new();
        let mut users: BTreeSet<&str> = change.users.iter().map(String::as_str).collect();
        for id in &change.tokens {
            match self.tokens.get(id) {
                Some(t) => {
                    users.insert(&t.user_id);
                    tokens.push(t.clone());
                }
                None => removed.push(id.clone()),
            }
        }
        SnapshotDelta {
            schema: SCHEMA,
            version: version.to_owned(),
            base: base.to_owned(),
            generated_at,
            limits: limits.clone(),
            total: self.tokens.len(),
            tokens,
            removed,
            users: users.into_iter().filter_map(|u| self.users.get(u).map(|c| (u.to_owned(), c.clone()))).collect(),
        }
    }

    pub fn user_count(&self) -> usize {
        self.users.len()
    }

    /// Live tokens whose user has no upstream credential of a kind the
    /// token needs (read; write for a token that may trigger): tokens
    /// created before the gateway, until their owner's next
    /// session-authenticated token-API request mints it.
    pub fn tokens_without_credential(&self) -> usize {
        self.tokens
            .values()
            .filter(|t| {
                let user = self.users.get(&t.user_id);
                let read = user.is_some_and(|u| u.read_credential.is_some());
                let write = user.is_some_and(|u| u.write_credential.is_some());
                !read || (t.allow_trigger && !write)
            })
            .count()
    }

    /// The wire value (tests and tools; the publisher renders bodies).
    pub fn snapshot(&self, limits: &Limits, version: &str, generated_at: i64) -> Snapshot {
        Snapshot {
            schema: SCHEMA,
            version: version.to_owned(),
            generated_at,
            limits: limits.clone(),
            tokens: self.tokens.values().cloned().collect(),
            users: self.users.clone(),
        }
    }

    /// The body the filter gets (the [`Snapshot`] wire form) and its
    /// version: the first 32 hex of SHA-256 over everything but `version`
    /// and `generated_at`, so it stays the same while the policy does. The
    /// tokens are serialized once; the body is that content behind a header.
    pub fn render(&self, limits: &Limits, generated_at: i64) -> Result<(String, Vec<u8>), serde_json::Error> {
        use serde::Serializer as _;
        let mut content = Vec::with_capacity(160 * self.tokens.len() + 4096);
        let mut ser = serde_json::Serializer::new(&mut content);
        let mut m = (&mut ser).serialize_map(Some(5))?;
        m.serialize_entry("schema", &SCHEMA)?;
        m.serialize_entry("limits", limits)?;
        m.serialize_entry("token_count", &self.tokens.len())?;
        m.serialize_entry("tokens", &Tokens(&self.tokens))?;
        m.serialize_entry("users", &self.users)?;
        m.end()?;
        let mut version = hex::encode(Sha256::digest(&content));
        version.truncate(32);
        // `{"schema":1,…}` → `{"version":"…","generated_at":…,"schema":1,…}`
        let head = format!("{{\"version\":\"{version}\",\"generated_at\":{generated_at},");
        let mut body = Vec::with_capacity(head.len() + content.len());
        body.extend_from_slice(head.as_bytes());
        body.extend_from_slice(content.get(1..).unwrap_or_default());
        Ok((version, body))
    }
}

/// What one build changed: ids of tokens and users added, altered or gone.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Change {
    pub tokens: BTreeSet<String>,
    pub users: BTreeSet<String>,
}

impl Change {
    pub fn extend(&mut self, other: &Change) {
        self.tokens.extend(other.tokens.iter().cloned());
        self.users.extend(other.users.iter().cloned());
    }
}

/// A digest of every token and user of a model (128 bits of SHA-256 of each
/// one's wire form): what a full build compares to know what it changed,
/// without keeping the previous model.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Fingerprint {
    tokens: HashMap<String, [u8; 16]>,
    users: HashMap<String, [u8; 16]>,
}

fn digest<T: serde::Serialize>(value: &T) -> [u8; 16] {
    let mut out = [0u8; 16];
    if let Ok(bytes) = serde_json::to_vec(value) {
        out.copy_from_slice(&Sha256::digest(&bytes)[..16]);
    }
    out
}

impl Fingerprint {
    pub fn of(model: &Model) -> Self {
        Self {
            tokens: model.tokens.iter().map(|(id, t)| (id.clone(), digest(t))).collect(),
            users: model.users.iter().map(|(id, u)| (id.clone(), digest(u))).collect(),
        }
    }

    /// Takes the entries `change` names from `model` again (after a patch).
    pub fn refresh(&mut self, model: &Model, change: &Change) {
        for id in &change.tokens {
            match model.tokens.get(id) {
                Some(t) => self.tokens.insert(id.clone(), digest(t)),
                None => self.tokens.remove(id),
            };
        }
        for id in &change.users {
            match model.users.get(id) {
                Some(u) => self.users.insert(id.clone(), digest(u)),
                None => self.users.remove(id),
            };
        }
    }

    /// What differs between this content and `new`.
    pub fn diff(&self, new: &Fingerprint) -> Change {
        fn keys(old: &HashMap<String, [u8; 16]>, new: &HashMap<String, [u8; 16]>) -> BTreeSet<String> {
            let changed = new.iter().filter(|(k, d)| old.get(*k) != Some(*d)).map(|(k, _)| k.clone());
            let gone = old.keys().filter(|k| !new.contains_key(*k)).cloned();
            changed.chain(gone).collect()
        }
        Change { tokens: keys(&self.tokens, &new.tokens), users: keys(&self.users, &new.users) }
    }
}

/// The token map's values as a JSON array.
struct Tokens<'a>(&'a BTreeMap<String, SnapshotToken>);

impl serde::Serialize for Tokens<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.0.values())
    }
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
        let got = effective_projects(None, Some(&collab()));
        assert_eq!(got, BTreeMap::from([(P1.into(), None), (P2.into(), None)]));
        assert_eq!(effective_projects(Some(&json!({})), Some(&collab())), got);
        assert!(effective_projects(None, None).is_empty());
    }

    #[test]
    fn listed_projects_intersect_collaborators() {
        let got = effective_projects(
            Some(&json!({P1: "2026-12-01T00:00:00", P2.to_uppercase(): null, P3: null, "junk": null})),
            Some(&collab()),
        );
        assert_eq!(got, BTreeMap::from([(P1.into(), Some(1_796_083_200)), (P2.into(), None)]));
        // A malformed expiry denies the project.
        let got = effective_projects(Some(&json!({P1: "tomorrow", P2: 5})), Some(&collab()));
        assert!(got.is_empty());
        assert!(effective_projects(Some(&json!([P1])), Some(&collab())).is_empty());
    }

    fn token(id: &str) -> LiveToken {
        LiveToken {
            token_id: id.into(),
            token_hash: token::hash_hex(id),
            user_id: Uuid::parse_str(P3).unwrap(),
            enabled_projects: None,
            allow_trigger: false,
            expires_at: 2_000_000_000,
        }
    }

    fn loaded(tokens: Vec<LiveToken>, collab: &HashMap<Uuid, HashSet<Uuid>>) -> Loaded {
        Loaded { tokens, collaborators: collab.clone(), credentials: Vec::new() }
    }

    /// Assembles and renders: the snapshot (with its version) and its body.
    fn built(tokens: Vec<LiveToken>, collab: &HashMap<Uuid, HashSet<Uuid>>, generated_at: i64) -> (Snapshot, Vec<u8>) {
        let model = Model::assemble(loaded(tokens, collab), &HashMap::new());
        let limits = Limits::default();
        let (version, body) = model.render(&limits, generated_at).unwrap();
        (model.snapshot(&limits, &version, generated_at), body)
    }

    #[test]
    fn version_is_stable_and_content_sensitive() {
        let c = HashMap::from([(Uuid::parse_str(P3).unwrap(), collab())]);
        let (a, body) = built(vec![token("00000000000000bb"), token("00000000000000aa")], &c, 1);
        let (b, _) = built(vec![token("00000000000000aa"), token("00000000000000bb")], &c, 99);
        assert_eq!(a.version, b.version);
        assert_eq!(a.version.len(), 32);
        assert_eq!(a.tokens[0].token_id, "00000000000000aa");
        assert_eq!(a.users.len(), 1);
        assert_eq!(a.tokens[0].expires_at, 2_000_000_000);
        let mut t = token("00000000000000aa");
        t.allow_trigger = true;
        assert_ne!(built(vec![t], &c, 1).0.version, a.version);
        assert_ne!(built(vec![token("00000000000000aa"), token("00000000000000bb")], &HashMap::new(), 1).0.version, a.version);
        // The body is the snapshot, version included, and the filter accepts it.
        let parsed: Snapshot = serde_json::from_slice(&body).unwrap();
        assert_eq!(parsed, a);
        let policy = mcp_filter_core::policy::Policy::from_json(&body).unwrap();
        assert_eq!(policy.token_count(), 2);
        assert_eq!(policy.version, a.version);
        let (_, empty) = built(vec![], &HashMap::new(), 5);
        assert!(mcp_filter_core::policy::Policy::from_json(&empty).is_ok());
        // Malformed or duplicate rows are left out.
        let mut bad = token("00000000000000cc");
        bad.token_hash = "XYZ".into();
        let (s, _) = built(vec![token("00000000000000aa"), token("00000000000000aa"), bad, token("zz")], &c, 1);
        assert_eq!(s.tokens.len(), 1);
    }

    fn token_of(id: &str, user: &str) -> LiveToken {
        LiveToken { user_id: Uuid::parse_str(user).unwrap(), ..token(id) }
    }

    #[test]
    fn a_patch_equals_a_full_build_of_the_same_rows() {
        let c = HashMap::from([(Uuid::parse_str(P3).unwrap(), collab())]);
        let creds = HashMap::from([(Uuid::parse_str(P1).unwrap(), SnapshotUser { read_credential: Some("r1".into()), write_credential: None })]);
        let full = |tokens: Vec<LiveToken>| Model::assemble(loaded(tokens, &c), &creds);
        let mut model = full(vec![token_of("00000000000000aa", P3), token_of("00000000000000bb", P3), token_of("00000000000000cc", P1)]);
        // Revoke bb: no live row comes back for it.
        model.patch(&["00000000000000bb".into()], loaded(vec![], &c), &creds);
        assert_eq!(model, full(vec![token_of("00000000000000aa", P3), token_of("00000000000000cc", P1)]));
        // Revoke P1's only token: its user (and credential) leave the snapshot.
        model.patch(&["00000000000000cc".into()], loaded(vec![], &c), &creds);
        assert_eq!(model, full(vec![token_of("00000000000000aa", P3)]));
        assert_eq!(model.user_count(), 1);
        // A new token and a changed one in one patch.
        let mut changed = token_of("00000000000000aa", P3);
        changed.allow_trigger = true;
        let new = token_of("00000000000000dd", P1);
        model.patch(&["00000000000000aa".into(), "00000000000000dd".into()], loaded(vec![changed.clone(), new.clone()], &c), &creds);
        let want = full(vec![changed, new]);
        assert_eq!(model, want);
        let limits = Limits::default();
        assert_eq!(model.render(&limits, 1).unwrap(), want.render(&limits, 1).unwrap());
        assert_eq!(model.snapshot(&limits, "v", 1).users[P1].read_credential.as_deref(), Some("r1"));
        // A patch naming an unknown token that is not live changes nothing.
        model.patch(&["00000000000000ee".into()], loaded(vec![], &c), &creds);
        assert_eq!(model, want);
    }
}
