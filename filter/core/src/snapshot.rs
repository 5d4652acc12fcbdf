//! The policy snapshot (DESIGN §8): the wire format the control plane serves
//! on `GET /v1/snapshot`, and [`Policy`], the compiled form the filter keeps.
//!
//! One definition for both sides: the control plane serializes
//! [`Snapshot`], the filter parses it with [`Policy::from_json`].

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

use crate::route::Class;
use crate::token::{self, TokenHash};

/// Current snapshot schema version.
pub const SCHEMA: u32 = 1;

/// The wire format.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    #[serde(default = "schema_default")]
    pub schema: u32,
    /// Content version (also the ETag, quoted).
    pub version: String,
    /// Unix seconds when the control plane built it.
    pub generated_at: i64,
    pub limits: Limits,
    /// Live tokens (not revoked, not yet expired when built).
    pub tokens: Vec<SnapshotToken>,
    /// Upstream credentials per user id.
    pub users: BTreeMap<String, SnapshotUser>,
}

fn schema_default() -> u32 {
    SCHEMA
}

/// Rate limits per class (DESIGN §9).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Sliding window length in seconds.
    pub window_seconds: u32,
    /// Requests per window per user, by class.
    pub classes: BTreeMap<Class, u32>,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            window_seconds: 60,
            classes: BTreeMap::from([(Class::Log, 10), (Class::Artifact, 10), (Class::Write, 5), (Class::Default, 30)]),
        }
    }
}

/// One live token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotToken {
    pub token_id: String,
    /// Lowercase hex SHA-256 of the whole token string.
    pub token_hash: String,
    pub user_id: String,
    /// Unix seconds.
    pub expires_at: i64,
    pub allow_trigger: bool,
    /// Effective projects (enabled ∩ collaborator, computed by the control
    /// plane) with their per-project expiry in unix seconds, `null` for none.
    pub projects: BTreeMap<String, Option<i64>>,
}

/// A user's upstream InfraBox credentials. Never logged.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct SnapshotUser {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_credential: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub write_credential: Option<String>,
}

impl std::fmt::Debug for SnapshotUser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapshotUser")
            .field("read_credential", &self.read_credential.as_ref().map(|_| "<redacted>"))
            .field("write_credential", &self.write_credential.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// Why a snapshot was refused (the previous one stays in force).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotError(pub String);

impl std::fmt::Display for SnapshotError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "invalid snapshot: {}", self.0)
    }
}

impl std::error::Error for SnapshotError {}

/// Index of an interned user id in [`Policy`].
pub type UserIx = u32;

/// A live token as the filter keeps it.
#[derive(Debug, Clone)]
pub struct Grant {
    pub token_id: [u8; token::TOKEN_ID_LEN],
    pub user: UserIx,
    pub expires_at: i64,
    pub allow_trigger: bool,
    /// (interned project, expiry or `i64::MAX`), sorted by project index.
    pub projects: Box<[(u32, i64)]>,
}

impl Grant {
    pub fn token_id(&self) -> &str {
        std::str::from_utf8(&self.token_id).unwrap_or_default()
    }
}

/// A user as the filter keeps it.
#[derive(Clone, Default)]
pub struct User {
    pub id: Box<str>,
    pub read_credential: Option<Box<str>>,
    pub write_credential: Option<Box<str>>,
}

/// The compiled snapshot: O(1) lookup by token hash.
#[derive(Clone, Default)]
pub struct Policy {
    pub version: String,
    pub generated_at: i64,
    pub limits: Limits,
    grants: Vec<Grant>,
    by_hash: HashMap<TokenHash, u32>,
    users: Vec<User>,
    projects: Vec<Box<str>>,
    project_ix: HashMap<Box<str>, u32>,
}

impl std::fmt::Debug for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Policy")
            .field("version", &self.version)
            .field("tokens", &self.grants.len())
            .field("users", &self.users.len())
            .finish()
    }
}

impl Policy {
    /// Parses and validates a snapshot body.
    pub fn from_json(body: &[u8]) -> Result<Self, SnapshotError> {
        let snap: Snapshot = serde_json::from_slice(body).map_err(|e| {
            // serde_json quotes offending values (which may be credentials):
            // keep its message only when it quotes nothing.
            let msg = e.to_string();
            if msg.contains('"') {
                SnapshotError(format!("{:?} error at line {} column {}", e.classify(), e.line(), e.column()))
            } else {
                SnapshotError(msg)
            }
        })?;
        Self::compile(snap)
    }

    /// Validates and compiles a parsed snapshot.
    pub fn compile(snap: Snapshot) -> Result<Self, SnapshotError> {
        if snap.schema != SCHEMA {
            return Err(SnapshotError(format!("unsupported schema {}", snap.schema)));
        }
        if snap.version.is_empty() || snap.version.len() > 128 || snap.version.contains('"') {
            return Err(SnapshotError("version must be 1-128 characters without quotes".into()));
        }
        if snap.limits.window_seconds == 0 {
            return Err(SnapshotError("limits.window_seconds must be positive".into()));
        }
        for class in Class::ALL {
            if !snap.limits.classes.contains_key(&class) {
                return Err(SnapshotError(format!("limits.classes has no {:?} entry", class.as_str())));
            }
        }
        let mut policy = Policy {
            version: snap.version,
            generated_at: snap.generated_at,
            limits: snap.limits,
            grants: Vec::with_capacity(snap.tokens.len()),
            by_hash: HashMap::with_capacity(snap.tokens.len()),
            ..Default::default()
        };
        let mut user_ix: HashMap<String, UserIx> = HashMap::new();
        for (id, u) in snap.users {
            let ix = policy.users.len() as UserIx;
            policy.users.push(User {
                id: id.as_str().into(),
                read_credential: u.read_credential.map(Into::into),
                write_credential: u.write_credential.map(Into::into),
            });
            user_ix.insert(id, ix);
        }
        for (n, t) in snap.tokens.into_iter().enumerate() {
            let bad = |m: &str| SnapshotError(format!("tokens[{n}]: {m}"));
            if !token::is_token_id(&t.token_id) {
                return Err(bad("token_id is not 16 lowercase hex"));
            }
            let hash = token::parse_hash_hex(&t.token_hash).ok_or_else(|| bad("token_hash is not 64 lowercase hex"))?;
            let user = match user_ix.get(&t.user_id) {
                Some(ix) => *ix,
                None => {
                    let ix = policy.users.len() as UserIx;
                    policy.users.push(User { id: t.user_id.as_str().into(), ..Default::default() });
                    user_ix.insert(t.user_id.clone(), ix);
                    ix
                }
            };
            let mut projects: Vec<(u32, i64)> = t
                .projects
                .into_iter()
                .map(|(p, exp)| (policy.intern_project(p), exp.unwrap_or(i64::MAX)))
                .collect();
            projects.sort_unstable();
            let mut token_id = [0u8; token::TOKEN_ID_LEN];
            token_id.copy_from_slice(t.token_id.as_bytes());
            let ix = policy.grants.len() as u32;
            if policy.by_hash.insert(hash, ix).is_some() {
                return Err(bad("token_hash appears twice"));
            }
            policy.grants.push(Grant {
                token_id,
                user,
                expires_at: t.expires_at,
                allow_trigger: t.allow_trigger,
                projects: projects.into_boxed_slice(),
            });
        }
        Ok(policy)
    }

    fn intern_project(&mut self, p: String) -> u32 {
        if let Some(ix) = self.project_ix.get(p.as_str()) {
            return *ix;
        }
        let ix = self.projects.len() as u32;
        let p: Box<str> = p.into();
        self.projects.push(p.clone());
        self.project_ix.insert(p, ix);
        ix
    }

    /// The grant whose token hashes to `hash`, with its index.
    pub fn grant_by_hash(&self, hash: &TokenHash) -> Option<(u32, &Grant)> {
        let ix = *self.by_hash.get(hash)?;
        Some((ix, self.grants.get(ix as usize)?))
    }

    pub fn grant(&self, ix: u32) -> Option<&Grant> {
        self.grants.get(ix as usize)
    }

    pub fn user(&self, ix: UserIx) -> Option<&User> {
        self.users.get(ix as usize)
    }

    /// Expiry of `project` for `grant` (`i64::MAX` = none), if in scope.
    pub fn project_expiry(&self, grant: &Grant, project: &str) -> Option<i64> {
        let ix = *self.project_ix.get(project)?;
        grant
            .projects
            .binary_search_by_key(&ix, |(p, _)| *p)
            .ok()
            .and_then(|i| grant.projects.get(i))
            .map(|(_, exp)| *exp)
    }

    /// Project ids of `grant` that are in scope at `now`.
    pub fn projects_in_scope<'a>(&'a self, grant: &'a Grant, now: i64) -> impl Iterator<Item = &'a str> + 'a {
        grant
            .projects
            .iter()
            .filter(move |(_, exp)| *exp > now)
            .filter_map(|(p, _)| self.projects.get(*p as usize).map(|s| &**s))
    }

    pub fn limit(&self, class: Class) -> u32 {
        self.limits.classes.get(&class).copied().unwrap_or(0)
    }

    pub fn token_count(&self) -> usize {
        self.grants.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample() -> Snapshot {
        let tok = token::mint(&[1; 24]);
        Snapshot {
            schema: SCHEMA,
            version: "v1".into(),
            generated_at: 100,
            limits: Limits::default(),
            tokens: vec![SnapshotToken {
                token_id: "0101010101010101".into(),
                token_hash: token::hash_hex(&tok),
                user_id: "u1".into(),
                expires_at: 1000,
                allow_trigger: false,
                projects: BTreeMap::from([("p1".into(), None), ("p2".into(), Some(500))]),
            }],
            users: BTreeMap::from([("u1".into(), SnapshotUser { read_credential: Some("secret-r".into()), write_credential: None })]),
        }
    }

    #[test]
    fn round_trip_and_lookup() {
        let json = serde_json::to_vec(&sample()).unwrap();
        let p = Policy::from_json(&json).unwrap();
        let (_, g) = p.grant_by_hash(&token::hash(&token::mint(&[1; 24]))).unwrap();
        assert_eq!(g.token_id(), "0101010101010101");
        assert_eq!(p.project_expiry(g, "p1"), Some(i64::MAX));
        assert_eq!(p.project_expiry(g, "p2"), Some(500));
        assert_eq!(p.project_expiry(g, "p3"), None);
        assert_eq!(p.projects_in_scope(g, 600).collect::<Vec<_>>(), vec!["p1"]);
        assert_eq!(p.user(g.user).unwrap().read_credential.as_deref(), Some("secret-r"));
        assert_eq!(p.limit(Class::Write), 5);
        assert!(!format!("{p:?} {:?}", sample().users).contains("secret-r"));
    }

    #[test]
    fn bad_snapshots_are_refused() {
        assert!(Policy::from_json(b"{").is_err());
        assert!(Policy::from_json(b"[]").is_err());
        let mut s = sample();
        s.tokens[0].token_hash = "XYZ".into();
        assert!(Policy::compile(s).unwrap_err().0.contains("token_hash"));
        let mut s = sample();
        s.tokens[0].token_id = "short".into();
        assert!(Policy::compile(s).is_err());
        let mut s = sample();
        s.tokens.push(s.tokens[0].clone());
        assert!(Policy::compile(s).unwrap_err().0.contains("twice"));
        let mut s = sample();
        s.limits.classes.remove(&Class::Log);
        assert!(Policy::compile(s).is_err());
        let mut s = sample();
        s.schema = 2;
        assert!(Policy::compile(s).is_err());
    }
}
