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
use sha2::{Digest as _, Sha256};
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
    /// Live tokens per user id: all of them, and those that may trigger.
    user_tokens: HashMap<String, (u32, u32)>,
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
                if let Some((n, triggers)) = self.user_tokens.get_mut(&old.user_id) {
                    *n = n.saturating_sub(1);
                    *triggers = triggers.saturating_sub(u32::from(old.allow_trigger));
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
            let (n, triggers) = self.user_tokens.entry(user_id.clone()).or_default();
            *n += 1;
            *triggers += u32::from(t.allow_trigger);
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
        // Per user, not per token: one pass over the users (every publish,
        // so a revocation among a million tokens does not walk them all).
        self.user_tokens
            .iter()
            .map(|(id, (n, triggers))| {
                let user = self.users.get(id);
                let read = user.is_some_and(|u| u.read_credential.is_some());
                let write = user.is_some_and(|u| u.write_credential.is_some());
                match (read, write) {
                    (false, _) => *n as usize,
                    (true, false) => *triggers as usize,
                    (true, true) => 0,
                }
            })
            .sum()
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
    /// version (tests and tools: the publisher keeps the [`Fingerprint`]
    /// and renders the body only when a VM asks for the whole snapshot).
    pub fn render(&self, limits: &Limits, generated_at: i64) -> Result<(String, Vec<u8>), serde_json::Error> {
        let version = Fingerprint::of(self).version(limits);
        let body = self.render_body(limits, &version, generated_at)?;
        Ok((version, body))
    }

    /// The full snapshot body of `version` (which [`Fingerprint::version`]
    /// gave for this content): tokens sorted by id, serialized once.
    pub fn render_body(&self, limits: &Limits, version: &str, generated_at: i64) -> Result<Vec<u8>, serde_json::Error> {
        use serde::Serializer as _;
        let mut body = Vec::with_capacity(160 * self.tokens.len() + 4096);
        let mut ser = serde_json::Serializer::new(&mut body);
        let mut m = (&mut ser).serialize_map(Some(7))?;
        m.serialize_entry("version", version)?;
        m.serialize_entry("generated_at", &generated_at)?;
        m.serialize_entry("schema", &SCHEMA)?;
        m.serialize_entry("limits", limits)?;
        m.serialize_entry("token_count", &self.tokens.len())?;
        m.serialize_entry("tokens", &Tokens(&self.tokens))?;
        m.serialize_entry("users", &self.users)?;
        m.end()?;
        Ok(body)
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

/// A digest of every token and user of a model (SHA-256 of each one's wire
/// form, the user's with its id): what a full build compares to know what
/// it changed, without keeping the previous model, and — through the sums
/// of those digests, kept as entries come and go — the content version,
/// so a patch among a million tokens does not hash them all again.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Fingerprint {
    tokens: HashMap<String, Digest256>,
    users: HashMap<String, Digest256>,
    token_sum: Sum256,
    user_sum: Sum256,
}

type Digest256 = [u8; 32];

/// A sum of digests modulo 2^256 (four little-endian 64-bit limbs): the
/// same whatever the order entries were added in.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Sum256([u64; 4]);

impl Sum256 {
    fn limbs(d: &Digest256) -> [u64; 4] {
        let mut l = [0u64; 4];
        for (limb, chunk) in l.iter_mut().zip(d.chunks_exact(8)) {
            let mut b = [0u8; 8];
            b.copy_from_slice(chunk);
            *limb = u64::from_le_bytes(b);
        }
        l
    }

    fn add(&mut self, d: &Digest256) {
        let mut carry = false;
        for (a, b) in self.0.iter_mut().zip(Self::limbs(d)) {
            let (x, c1) = a.overflowing_add(b);
            let (y, c2) = x.overflowing_add(u64::from(carry));
            *a = y;
            carry = c1 || c2;
        }
    }

    fn sub(&mut self, d: &Digest256) {
        let mut borrow = false;
        for (a, b) in self.0.iter_mut().zip(Self::limbs(d)) {
            let (x, b1) = a.overflowing_sub(b);
            let (y, b2) = x.overflowing_sub(u64::from(borrow));
            *a = y;
            borrow = b1 || b2;
        }
    }

    fn bytes(&self) -> [u8; 32] {
        let mut out = [0u8; 32];
        for (chunk, limb) in out.chunks_exact_mut(8).zip(self.0) {
            chunk.copy_from_slice(&limb.to_le_bytes());
        }
        out
    }
}

fn digest<T: serde::Serialize>(value: &T) -> Digest256 {
    serde_json::to_vec(value).map(|bytes| Sha256::digest(&bytes).into()).unwrap_or_default()
}

fn user_digest(id: &str, user: &SnapshotUser) -> Digest256 {
    digest(&(id, user))
}

impl Fingerprint {
    pub fn of(model: &Model) -> Self {
        let mut f = Self {
            tokens: model.tokens.iter().map(|(id, t)| (id.clone(), digest(t))).collect(),
            users: model.users.iter().map(|(id, u)| (id.clone(), user_digest(id, u))).collect(),
            ..Self::default()
        };
        for d in f.tokens.values() {
            f.token_sum.add(d);
        }
        for d in f.users.values() {
            f.user_sum.add(d);
        }
        f
    }

    /// Takes the entries `change` names from `model` again (after a patch).
    pub fn refresh(&mut self, model: &Model, change: &Change) {
        for id in &change.tokens {
            if let Some(old) = self.tokens.remove(id) {
                self.token_sum.sub(&old);
            }
            if let Some(t) = model.tokens.get(id) {
                let d = digest(t);
                self.token_sum.add(&d);
                self.tokens.insert(id.clone(), d);
            }
        }
        for id in &change.users {
            if let Some(old) = self.users.remove(id) {
                self.user_sum.sub(&old);
            }
            if let Some(u) = model.users.get(id) {
                let d = user_digest(id, u);
                self.user_sum.add(&d);
                self.users.insert(id.clone(), d);
            }
        }
    }

    /// The content version: the first 32 hex of SHA-256 over the schema,
    /// the limits, the number of tokens and the sums of the token and user
    /// digests. The same on every replica for the same rows, whether the
    /// model was patched or built whole; anything in a token or a user
    /// (a credential rotating included) changes it.
    pub fn version(&self, limits: &Limits) -> String {
        let mut h = Sha256::new();
        h.update(b"infrabox-mcp snapshot content v2\0");
        h.update(SCHEMA.to_le_bytes());
        h.update(serde_json::to_vec(limits).unwrap_or_default());
        h.update((self.tokens.len() as u64).to_le_bytes());
        h.update((self.users.len() as u64).to_le_bytes());
        h.update(self.token_sum.bytes());
        h.update(self.user_sum.bytes());
        let mut version = hex::encode(h.finalize());
        version.truncate(32);
        version
    }

    /// What differs between this content and `new`.
    pub fn diff(&self, new: &Fingerprint) -> Change {
        fn keys(old: &HashMap<String, Digest256>, new: &HashMap<String, Digest256>) -> BTreeSet<String> {
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
        let limits = Limits::default();
        // The fingerprint (and so the version) is kept up to date the way
        // the publisher does it, and must equal a full build's every time.
        let mut fp = Fingerprint::of(&model);
        let mut patch = |model: &mut Model, ids: &[&str], rows: Vec<LiveToken>| {
            let ids: Vec<String> = ids.iter().map(|s| s.to_string()).collect();
            let mut users = model.users_of(&ids);
            model.patch(&ids, loaded(rows, &c), &creds);
            users.extend(model.users_of(&ids));
            fp.refresh(model, &Change { tokens: ids.iter().cloned().collect(), users });
            assert_eq!(fp, Fingerprint::of(model));
            fp.version(&limits)
        };
        // Revoke bb: no live row comes back for it.
        let v1 = patch(&mut model, &["00000000000000bb"], vec![]);
        assert_eq!(model, full(vec![token_of("00000000000000aa", P3), token_of("00000000000000cc", P1)]));
        assert_eq!(v1, model.render(&limits, 1).unwrap().0);
        // Revoke P1's only token: its user (and credential) leave the snapshot.
        let v2 = patch(&mut model, &["00000000000000cc"], vec![]);
        assert_ne!(v1, v2);
        assert_eq!(model, full(vec![token_of("00000000000000aa", P3)]));
        assert_eq!(model.user_count(), 1);
        // A new token and a changed one in one patch.
        let mut changed = token_of("00000000000000aa", P3);
        changed.allow_trigger = true;
        let new = token_of("00000000000000dd", P1);
        let v3 = patch(&mut model, &["00000000000000aa", "00000000000000dd"], vec![changed.clone(), new.clone()]);
        let want = full(vec![changed, new]);
        assert_eq!(model, want);
        assert_eq!(v3, Fingerprint::of(&want).version(&limits));
        assert_eq!(model.render(&limits, 1).unwrap(), want.render(&limits, 1).unwrap());
        assert_eq!(model.snapshot(&limits, "v", 1).users[P1].read_credential.as_deref(), Some("r1"));
        // A patch naming an unknown token that is not live changes nothing.
        assert_eq!(patch(&mut model, &["00000000000000ee"], vec![]), v3);
        assert_eq!(model, want);
    }

    #[test]
    fn tokens_without_credential_count_per_token_need() {
        let c = HashMap::new();
        let user = |p: &str| Uuid::parse_str(p).unwrap();
        let creds = HashMap::from([
            (user(P1), SnapshotUser { read_credential: Some("r".into()), write_credential: None }),
            (user(P2), SnapshotUser { read_credential: Some("r".into()), write_credential: Some("w".into()) }),
        ]);
        let trig = |id: &str, u: &str| LiveToken { allow_trigger: true, ..token_of(id, u) };
        // P1: a reader (fine) and a trigger token (lacks write); P2: both
        // fine; P3: no credential at all, two tokens.
        let mut model = Model::assemble(
            loaded(vec![token_of("00000000000000a1", P1), trig("00000000000000a2", P1), trig("00000000000000b1", P2), token_of("00000000000000c1", P3), trig("00000000000000c2", P3)], &c),
            &creds,
        );
        assert_eq!(model.tokens_without_credential(), 3);
        model.patch(&["00000000000000a2".into(), "00000000000000c1".into()], loaded(vec![], &c), &creds);
        assert_eq!(model.tokens_without_credential(), 1);
    }

    #[test]
    fn digest_sums_are_order_free_and_undo_exactly() {
        let ds: Vec<Digest256> = (0..50u32).map(|i| Sha256::digest(i.to_le_bytes()).into()).collect();
        let (mut a, mut b) = (Sum256::default(), Sum256::default());
        ds.iter().for_each(|d| a.add(d));
        ds.iter().rev().for_each(|d| b.add(d));
        assert_eq!(a, b);
        // Carries across limbs: all-ones plus one wraps to zero.
        let mut c = Sum256::default();
        c.add(&[0xff; 32]);
        c.add(&{
            let mut one = [0u8; 32];
            one[0] = 1;
            one
        });
        assert_eq!(c, Sum256::default());
        for d in &ds[..25] {
            a.sub(d);
        }
        let mut half = Sum256::default();
        ds[25..].iter().for_each(|d| half.add(d));
        assert_eq!(a, half);
    }

    #[test]
    fn a_credential_change_alone_changes_the_version() {
        let c = HashMap::from([(Uuid::parse_str(P3).unwrap(), collab())]);
        let creds = |r: &str| HashMap::from([(Uuid::parse_str(P3).unwrap(), SnapshotUser { read_credential: Some(r.into()), write_credential: None })]);
        let limits = Limits::default();
        let a = Model::assemble(loaded(vec![token("00000000000000aa")], &c), &creds("one"));
        let b = Model::assemble(loaded(vec![token("00000000000000aa")], &c), &creds("two"));
        assert_ne!(Fingerprint::of(&a).version(&limits), Fingerprint::of(&b).version(&limits));
        let mut stricter = limits.clone();
        stricter.window_seconds += 1;
        assert_ne!(Fingerprint::of(&a).version(&limits), Fingerprint::of(&a).version(&stricter));
    }
}
