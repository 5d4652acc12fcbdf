//! [`Policy`]: the compiled snapshot the filter keeps per VM, built straight
//! from the snapshot body by [`parse`] (no intermediate [`Snapshot`]), sized
//! for a million tokens in well under 64 MiB (issue "Scale out", item 4):
//!
//! - a grant is a fixed 40-byte record: the first 16 bytes of its token's
//!   SHA-256 (128 bits: finding another token with the same prefix is
//!   still a 2^128 search), its id in binary, user, expiry and a slice of
//!   its shard's scope arena;
//! - grants live in [`SHARDS`] [`Shard`]s by the first byte of their hash,
//!   each sorted by hash: a lookup is one binary search in `n / 256`
//!   records, no index table at all;
//! - shards, users and projects are shared (`Arc`) between a policy and
//!   the next: a delta rebuilds only the shards whose tokens it touches, so
//!   a revocation among a million tokens copies one shard (about 4 000
//!   grants), and a VM holding two policies holds the untouched shards once.
//!
//! [`Snapshot`]: crate::snapshot::Snapshot
//! [`Shard`]: shard::Shard

use std::collections::HashMap;
use std::sync::Arc;

use crate::route::Class;
use crate::snapshot::{Limits, Snapshot, SnapshotError};
use crate::token::{self, TokenHash};

pub mod cursor;
pub mod parse;
pub mod shard;

use shard::{Scope, Shard};

/// Index of an interned user id in [`Policy`].
pub type UserIx = u32;

/// What a grant keeps of its token's SHA-256.
pub type HashPrefix = [u8; 16];

/// The prefix of a token hash a grant keeps.
pub fn hash_prefix(hash: &TokenHash) -> HashPrefix {
    let mut p = [0u8; 16];
    p.copy_from_slice(hash.get(..16).unwrap_or(&[0; 16]));
    p
}

/// A live token as the filter keeps it: 40 bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    hash: HashPrefix,
    /// The 16 hex digits of the id, as 8 bytes.
    token_id: [u8; 8],
    /// Unix seconds, clamped to `u32` (until 2106).
    expires_at: u32,
    pub user: UserIx,
    /// Its slice of its shard's scope arena, sorted by project index.
    scope_start: u32,
    /// Bit 31: may trigger builds; bits 0-30: length of the scope slice.
    trigger_and_scope_len: u32,
}

const TRIGGER_BIT: u32 = 1 << 31;

/// A token id as text (16 lowercase hex), without an allocation.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct TokenIdText([u8; token::TOKEN_ID_LEN]);

impl std::ops::Deref for TokenIdText {
    type Target = str;
    fn deref(&self) -> &str {
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

impl std::fmt::Display for TokenIdText {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self)
    }
}

impl std::fmt::Debug for TokenIdText {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self)
    }
}

impl PartialEq<str> for TokenIdText {
    fn eq(&self, other: &str) -> bool {
        **self == *other
    }
}

impl PartialEq<&str> for TokenIdText {
    fn eq(&self, other: &&str) -> bool {
        **self == **other
    }
}

/// `token_id` (16 lowercase hex, checked by the parser) as 8 bytes.
fn id_bytes(hex_id: &[u8; token::TOKEN_ID_LEN]) -> [u8; 8] {
    let mut out = [0u8; 8];
    let _ = hex::decode_to_slice(hex_id, &mut out);
    out
}

impl Grant {
    pub fn token_id(&self) -> TokenIdText {
        let mut text = [0u8; token::TOKEN_ID_LEN];
        let _ = hex::encode_to_slice(self.token_id, &mut text);
        TokenIdText(text)
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

    fn shard(&self) -> usize {
        usize::from(self.hash[0])
    }
}

/// A user as the filter keeps it.
#[derive(Clone, Default)]
pub struct User {
    pub id: Box<str>,
    pub read_credential: Option<Box<str>>,
    pub write_credential: Option<Box<str>>,
}

/// The users of a policy: a slot per user index (`None`: free, its user
/// lost its last token), and how many grants refer to each.
#[derive(Clone, Default)]
struct Users {
    slots: Vec<Option<Arc<User>>>,
    tokens: Vec<u32>,
    free: Vec<UserIx>,
}

impl Users {
    fn get(&self, ix: UserIx) -> Option<&User> {
        self.slots.get(ix as usize)?.as_deref()
    }

    /// A slot for `user` (a free one first).
    fn add(&mut self, user: Arc<User>) -> UserIx {
        if let Some(ix) = self.free.pop() {
            if let Some(slot) = self.slots.get_mut(ix as usize) {
                *slot = Some(user);
                return ix;
            }
        }
        self.slots.push(Some(user));
        self.tokens.push(0);
        (self.slots.len() - 1) as UserIx
    }

    /// Frees the slot of `ix` if no grant refers to it any more.
    fn release_if_unused(&mut self, ix: UserIx) {
        let unused = self.tokens.get(ix as usize).is_some_and(|n| *n == 0);
        if let Some(slot) = self.slots.get_mut(ix as usize).filter(|s| unused && s.is_some()) {
            *slot = None;
            self.free.push(ix);
        }
    }

    fn count(&mut self, ix: UserIx, up: bool) {
        if let Some(n) = self.tokens.get_mut(ix as usize) {
            *n = if up { n.saturating_add(1) } else { n.saturating_sub(1) };
        }
    }
}

/// Project ids, interned once.
#[derive(Clone, Default)]
struct Projects {
    names: Vec<Box<str>>,
    ix: HashMap<Box<str>, u32>,
}

impl Projects {
    fn intern(&mut self, id: &str) -> u32 {
        if let Some(ix) = self.ix.get(id) {
            return *ix;
        }
        let ix = self.names.len() as u32;
        self.names.push(id.into());
        self.ix.insert(id.into(), ix);
        ix
    }
}

/// The compiled snapshot: lookup by token hash in one shard.
#[derive(Clone, Default)]
pub struct Policy {
    pub version: String,
    pub generated_at: i64,
    pub limits: Limits,
    /// [`SHARDS`] of them (none in the empty default policy).
    shards: Vec<Arc<Shard>>,
    users: Arc<Users>,
    projects: Arc<Projects>,
    tokens: usize,
}

impl std::fmt::Debug for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Policy")
            .field("version", &self.version)
            .field("tokens", &self.tokens)
            .field("users", &self.users.slots.len())
            .finish()
    }
}

/// A grant's place in a policy: shard in the top 8 bits, position below.
const POSITION_BITS: u32 = 24;

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
    /// makes of this one (its `base`); this one is left as it is. The new
    /// policy shares every shard the delta does not touch with this one.
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

    fn all_grants(&self) -> impl Iterator<Item = (&Shard, &Grant)> + '_ {
        self.shards.iter().flat_map(|s| s.grants.iter().map(move |g| (&**s, g)))
    }

    /// The policy as a snapshot value: tokens sorted by id (with the hash
    /// prefix a grant keeps as `token_hash`), users that a token refers
    /// to. Two policies that enforce the same are equal in this form
    /// however they were built (tests compare deltas with full builds).
    pub fn to_snapshot(&self) -> Snapshot {
        let mut tokens: Vec<crate::snapshot::SnapshotToken> = self
            .all_grants()
            .map(|(shard, g)| crate::snapshot::SnapshotToken {
                token_id: g.token_id().to_string(),
                token_hash: hex::encode(g.hash),
                user_id: self.user(g.user).map(|u| u.id.to_string()).unwrap_or_default(),
                expires_at: g.expires_at(),
                allow_trigger: g.allow_trigger(),
                projects: shard
                    .scope(g)
                    .iter()
                    .filter_map(|(p, exp)| {
                        self.projects.names.get(*p as usize).map(|p| (p.to_string(), Some(i64::from(*exp)).filter(|e| *e != i64::from(shard::NO_EXPIRY))))
                    })
                    .collect(),
            })
            .collect();
        tokens.sort_by(|a, b| a.token_id.cmp(&b.token_id));
        let users = self
            .all_grants()
            .filter_map(|(_, g)| self.user(g.user))
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

    /// The grant whose token hashes to `hash`, with its place.
    pub fn grant_by_hash(&self, hash: &TokenHash) -> Option<(u32, &Grant)> {
        let prefix = hash_prefix(hash);
        let shard = self.shards.get(usize::from(prefix[0]))?;
        let (pos, grant) = shard.find(&prefix)?;
        Some(((u32::from(prefix[0]) << POSITION_BITS) | pos, grant))
    }

    /// The grant at a place [`grant_by_hash`](Self::grant_by_hash) gave.
    pub fn grant(&self, ix: u32) -> Option<&Grant> {
        let shard = self.shards.get((ix >> POSITION_BITS) as usize)?;
        shard.grants.get((ix & ((1 << POSITION_BITS) - 1)) as usize)
    }

    pub fn user(&self, ix: UserIx) -> Option<&User> {
        self.users.get(ix)
    }

    fn scope(&self, grant: &Grant) -> &[Scope] {
        self.shards.get(grant.shard()).map(|s| s.scope(grant)).unwrap_or_default()
    }

    /// Expiry of `project` for `grant` (`i64::MAX` = none), if in scope.
    pub fn project_expiry(&self, grant: &Grant, project: &str) -> Option<i64> {
        let ix = *self.projects.ix.get(project)?;
        let scope = self.scope(grant);
        let (_, exp) = scope.get(scope.binary_search_by_key(&ix, |(p, _)| *p).ok()?)?;
        Some(if *exp == shard::NO_EXPIRY { i64::MAX } else { i64::from(*exp) })
    }

    /// Project ids of `grant` that are in scope at `now`.
    pub fn projects_in_scope<'a>(&'a self, grant: &'a Grant, now: i64) -> impl Iterator<Item = &'a str> + 'a {
        self.scope(grant)
            .iter()
            .filter(move |(_, exp)| *exp == shard::NO_EXPIRY || i64::from(*exp) > now)
            .filter_map(|(p, _)| self.projects.names.get(*p as usize).map(|s| &**s))
    }

    pub fn limit(&self, class: Class) -> u32 {
        self.limits.classes.get(&class).copied().unwrap_or(0)
    }

    pub fn token_count(&self) -> usize {
        self.tokens
    }

    /// Bytes held by this policy's tables (capacity, not length), without
    /// allocator overhead, shared tables included: what a VM holding only
    /// this policy spends on it.
    pub fn heap_bytes(&self) -> usize {
        use std::mem::size_of;
        let users: usize = self
            .users
            .slots
            .iter()
            .flatten()
            .map(|u| {
                size_of::<User>()
                    + u.id.len()
                    + u.read_credential.as_ref().map_or(0, |c| c.len())
                    + u.write_credential.as_ref().map_or(0, |c| c.len())
            })
            .sum();
        self.shards.iter().map(|s| s.heap_bytes()).sum::<usize>()
            + self.shards.capacity() * size_of::<Arc<Shard>>()
            + users
            + self.users.slots.capacity() * size_of::<Option<Arc<User>>>()
            + self.users.tokens.capacity() * size_of::<u32>()
            + 2 * self.projects.names.iter().map(|p| p.len()).sum::<usize>()
            + self.projects.names.capacity() * size_of::<Box<str>>()
            + self.projects.ix.capacity() * (size_of::<Box<str>>() + size_of::<u32>() + 1)
    }

    /// Bytes of the shards this policy shares with `other` (the memory a
    /// VM holding both does not spend twice).
    pub fn shared_bytes(&self, other: &Policy) -> usize {
        self.shards.iter().zip(&other.shards).filter(|(a, b)| Arc::ptr_eq(a, b)).map(|(a, _)| a.heap_bytes()).sum()
    }
}

#[cfg(test)]
mod tests;
