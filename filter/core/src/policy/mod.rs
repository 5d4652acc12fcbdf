//! [`Policy`]: the compiled snapshot the filter keeps per VM, built straight
//! from the snapshot body by [`parse`] (no intermediate [`Snapshot`]), sized
//! for 100 000 tokens in well under 32 MiB:
//!
//! - grants live in one `Vec` of fixed-size records (hash, id, user, expiry,
//!   a slice of the shared project arena);
//! - [`index::TokenIndex`] maps a token hash to its grant with one `u32` slot
//!   per bucket (lookup cost independent of the number of tokens);
//! - user and project ids are interned once.
//!
//! [`Snapshot`]: crate::snapshot::Snapshot

use std::collections::HashMap;

use crate::route::Class;
use crate::snapshot::{Limits, Snapshot, SnapshotError};
use crate::token::{self, TokenHash};

pub mod cursor;
pub mod index;
pub mod parse;

use index::TokenIndex;

/// Index of an interned user id in [`Policy`].
pub type UserIx = u32;

/// A live token as the filter keeps it: 64 bytes.
#[derive(Debug, Clone)]
pub struct Grant {
    pub hash: TokenHash,
    token_id: [u8; token::TOKEN_ID_LEN],
    /// Unix seconds, clamped to `u32` (until 2106).
    expires_at: u32,
    pub user: UserIx,
    /// Its slice of [`Policy::scopes`]: (project, expiry or `i64::MAX`),
    /// sorted by project index.
    scope_start: u32,
    /// Bit 31: may trigger builds; bits 0-30: length of the scope slice.
    trigger_and_scope_len: u32,
}

const TRIGGER_BIT: u32 = 1 << 31;

impl Grant {
    pub fn token_id(&self) -> &str {
        std::str::from_utf8(&self.token_id).unwrap_or_default()
    }

    /// Unix seconds.
    pub fn expires_at(&self) -> i64 {
        i64::from(self.expires_at)
    }

    /// Whether this token may trigger builds (write routes).
    pub fn allow_trigger(&self) -> bool {
        self.trigger_and_scope_len & TRIGGER_BIT != 0
    }

    fn scope_len(&self) -> usize {
        (self.trigger_and_scope_len & !TRIGGER_BIT) as usize
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
    index: TokenIndex,
    /// Every grant's (project, expiry) pairs, back to back.
    scopes: Vec<(u32, i64)>,
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
    /// Parses and validates a whole snapshot body.
    pub fn from_json(body: &[u8]) -> Result<Self, SnapshotError> {
        parse::from_slice(body)
    }

    /// Parses and validates a snapshot read piece by piece (the filter reads
    /// the response body from the host in chunks, never all of it at once).
    pub fn from_reader<R: std::io::Read>(body: R) -> Result<Self, SnapshotError> {
        parse::from_reader(body)
    }

    /// The policy a [`SnapshotDelta`](crate::snapshot::SnapshotDelta) body
    /// makes of this one (its `base`); this one is left as it is. Work and
    /// memory are one pass over the tables held, whatever the delta's size.
    pub fn apply_delta<R: std::io::Read>(&self, body: R) -> Result<Self, SnapshotError> {
        parse::apply_delta(self, body)
    }

    /// Whether this policy may replace `held`: only if it was generated no
    /// earlier. A body the control plane signed stays genuine forever, so a
    /// replayed old snapshot (or old delta: content versions can repeat)
    /// would verify and bring back tokens revoked since; a replica that has
    /// not caught up yet would do the same for a moment.
    pub fn may_replace(&self, held: &Policy) -> Result<(), SnapshotError> {
        if self.generated_at < held.generated_at {
            return Err(SnapshotError(format!(
                "generated {} s before the policy held: a replayed snapshot or a control plane behind",
                held.generated_at - self.generated_at
            )));
        }
        Ok(())
    }

    /// The policy as a snapshot value: tokens sorted by id, users that a
    /// token refers to. Two policies that enforce the same are equal in this
    /// form however they were built (tests compare deltas with full builds).
    pub fn to_snapshot(&self) -> Snapshot {
        let mut tokens: Vec<crate::snapshot::SnapshotToken> = self
            .grants
            .iter()
            .map(|g| crate::snapshot::SnapshotToken {
                token_id: g.token_id().to_owned(),
                token_hash: hex::encode(g.hash),
                user_id: self.user(g.user).map(|u| u.id.to_string()).unwrap_or_default(),
                expires_at: g.expires_at(),
                allow_trigger: g.allow_trigger(),
                projects: self
                    .scope(g)
                    .iter()
                    .filter_map(|(p, exp)| self.projects.get(*p as usize).map(|p| (p.to_string(), Some(*exp).filter(|e| *e != i64::MAX))))
                    .collect(),
            })
            .collect();
        tokens.sort_by(|a, b| a.token_id.cmp(&b.token_id));
        let users = self
            .grants
            .iter()
            .filter_map(|g| self.user(g.user))
            .map(|u| {
                let creds = crate::snapshot::SnapshotUser {
                    read_credential: u.read_credential.as_deref().map(str::to_owned),
                    write_credential: u.write_credential.as_deref().map(str::to_owned),
                };
                (u.id.to_string(), creds)
            })
            .collect();
        Snapshot {
            schema: crate::snapshot::SCHEMA,
            version: self.version.clone(),
            generated_at: self.generated_at,
            limits: self.limits.clone(),
            tokens,
            users,
        }
    }

    /// Validates and compiles a snapshot value (tests and tools; the filter
    /// parses bodies).
    pub fn compile(snap: &Snapshot) -> Result<Self, SnapshotError> {
        let body = serde_json::to_vec(snap).map_err(|e| SnapshotError(format!("cannot serialize: {e}")))?;
        Self::from_json(&body)
    }

    /// The grant whose token hashes to `hash`, with its index.
    pub fn grant_by_hash(&self, hash: &TokenHash) -> Option<(u32, &Grant)> {
        self.index.find(hash, &self.grants)
    }

    pub fn grant(&self, ix: u32) -> Option<&Grant> {
        self.grants.get(ix as usize)
    }

    pub fn user(&self, ix: UserIx) -> Option<&User> {
        self.users.get(ix as usize)
    }

    fn scope(&self, grant: &Grant) -> &[(u32, i64)] {
        let start = grant.scope_start as usize;
        self.scopes.get(start..start + grant.scope_len()).unwrap_or_default()
    }

    /// Expiry of `project` for `grant` (`i64::MAX` = none), if in scope.
    pub fn project_expiry(&self, grant: &Grant, project: &str) -> Option<i64> {
        let ix = *self.project_ix.get(project)?;
        let scope = self.scope(grant);
        scope.binary_search_by_key(&ix, |(p, _)| *p).ok().and_then(|i| scope.get(i)).map(|(_, exp)| *exp)
    }

    /// Project ids of `grant` that are in scope at `now`.
    pub fn projects_in_scope<'a>(&'a self, grant: &'a Grant, now: i64) -> impl Iterator<Item = &'a str> + 'a {
        self.scope(grant)
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

    /// Bytes held by this policy's tables (capacity, not length), without
    /// allocator overhead: what one more snapshot costs a VM.
    pub fn heap_bytes(&self) -> usize {
        use std::mem::size_of;
        let strings: usize = self.users.iter().map(|u| {
            u.id.len() + u.read_credential.as_ref().map_or(0, |c| c.len()) + u.write_credential.as_ref().map_or(0, |c| c.len())
        }).sum::<usize>()
            + 2 * self.projects.iter().map(|p| p.len()).sum::<usize>();
        self.grants.capacity() * size_of::<Grant>()
            + self.index.heap_bytes()
            + self.scopes.capacity() * size_of::<(u32, i64)>()
            + self.users.capacity() * size_of::<User>()
            + self.projects.capacity() * size_of::<Box<str>>()
            + self.project_ix.capacity() * (size_of::<Box<str>>() + size_of::<u32>() + 1)
            + strings
    }
}

#[cfg(test)]
mod tests;
