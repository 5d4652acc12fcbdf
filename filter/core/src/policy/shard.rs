//! [`Shard`]: the grants whose token hash starts with one byte, sorted by
//! hash, and their scopes. A policy has [`SHARDS`] of them; a delta
//! rebuilds only those it touches. A lookup reads one entry of the shard's
//! directory (where each run of grants sharing the next bits of the hash
//! starts, about four grants a run whatever the size) and scans that run:
//! two or three cache lines for a hundred tokens or a million.

use super::{Grant, HashPrefix, TRIGGER_BIT};
use crate::snapshot::SnapshotError;

/// Shards per policy: one per value of a hash's first byte.
pub const SHARDS: usize = 256;

/// Most grants one shard may hold (a grant's place keeps 24 bits for it).
pub const MAX_SHARD_GRANTS: usize = 1 << 24;

/// A project index and the scope's expiry (unix seconds, or [`NO_EXPIRY`]).
pub type Scope = (u32, u32);

/// The expiry of a scope without one.
pub const NO_EXPIRY: u32 = u32::MAX;

/// A snapshot's expiry as a scope keeps it: none, or clamped below
/// [`NO_EXPIRY`] (until 2106).
pub fn scope_expiry(expiry: Option<i64>) -> u32 {
    match expiry {
        None => NO_EXPIRY,
        Some(e) => e.clamp(0, i64::from(NO_EXPIRY - 1)) as u32,
    }
}

/// One shard's grants (sorted by hash) and their scope arena.
#[derive(Debug, Clone, Default)]
pub struct Shard {
    pub(super) grants: Vec<Grant>,
    pub(super) scopes: Vec<Scope>,
    /// Where the grants whose hash bytes 1-4 start with each value of the
    /// top `bits` bits begin (one more entry for the end); empty before
    /// [`seal`](Self::seal).
    directory: Vec<u32>,
    bits: u32,
}

/// Grants per directory run the directory is sized for.
const RUN: usize = 4;

/// The bits of a hash (after the shard byte) the directory is keyed by.
fn key(prefix: &HashPrefix) -> u32 {
    let mut k = [0u8; 4];
    k.copy_from_slice(prefix.get(1..5).unwrap_or(&[0; 4]));
    u32::from_be_bytes(k)
}

fn run_of(key: u32, bits: u32) -> usize {
    if bits == 0 {
        0
    } else {
        (key >> (32 - bits)) as usize
    }
}

impl Shard {
    pub(super) fn with_room(grants: usize) -> Self {
        Self { grants: Vec::with_capacity(grants), ..Self::default() }
    }

    pub(super) fn find(&self, prefix: &HashPrefix) -> Option<(u32, &Grant)> {
        let run = run_of(key(prefix), self.bits);
        let (start, end) = (*self.directory.get(run)? as usize, *self.directory.get(run + 1)? as usize);
        let grants = self.grants.get(start..end)?;
        let at = grants.iter().position(|g| g.hash == *prefix)?;
        Some(((start + at) as u32, grants.get(at)?))
    }

    pub(super) fn scope(&self, grant: &Grant) -> &[Scope] {
        let start = grant.scope_start as usize;
        self.scopes.get(start..start + grant.scope_len()).unwrap_or_default()
    }

    /// Appends `grant` with `scope` (sorted here) as its scope slice.
    pub(super) fn push(&mut self, mut grant: Grant, scope: &[Scope]) -> Result<(), SnapshotError> {
        let too_many = || SnapshotError("too many projects".into());
        let start = u32::try_from(self.scopes.len()).map_err(|_| too_many())?;
        let len = u32::try_from(scope.len()).ok().filter(|l| l & TRIGGER_BIT == 0).ok_or_else(too_many)?;
        if self.grants.len() >= MAX_SHARD_GRANTS {
            return Err(SnapshotError("too many tokens".into()));
        }
        self.scopes.extend_from_slice(scope);
        if let Some(added) = self.scopes.get_mut(start as usize..) {
            added.sort_unstable();
        }
        grant.scope_start = start;
        grant.trigger_and_scope_len = (grant.trigger_and_scope_len & TRIGGER_BIT) | len;
        self.grants.push(grant);
        Ok(())
    }

    /// Sorts the grants by hash and gives back spare capacity; refuses two
    /// grants with the same hash.
    pub(super) fn seal(&mut self) -> Result<(), SnapshotError> {
        self.grants.sort_unstable_by_key(|g| g.hash);
        if self.grants.windows(2).any(|w| w.first().map(|g| g.hash) == w.get(1).map(|g| g.hash)) {
            return Err(SnapshotError("two tokens have the same token_hash".into()));
        }
        self.grants.shrink_to_fit();
        self.scopes.shrink_to_fit();
        let runs = (self.grants.len() / RUN).max(1);
        self.bits = runs.next_power_of_two().trailing_zeros().min(20);
        let mut directory = Vec::with_capacity((1 << self.bits) + 1);
        let mut at = 0usize;
        for run in 0..(1usize << self.bits) {
            while self.grants.get(at).is_some_and(|g| run_of(key(&g.hash), self.bits) < run) {
                at += 1;
            }
            directory.push(at as u32);
        }
        directory.push(self.grants.len() as u32);
        self.directory = directory;
        Ok(())
    }

    pub(super) fn heap_bytes(&self) -> usize {
        self.grants.capacity() * std::mem::size_of::<Grant>()
            + self.scopes.capacity() * std::mem::size_of::<Scope>()
            + self.directory.capacity() * std::mem::size_of::<u32>()
    }

    /// Grants in this shard.
    pub fn len(&self) -> usize {
        self.grants.len()
    }

    pub fn is_empty(&self) -> bool {
        self.grants.is_empty()
    }

    /// Longest run of grants one lookup scans (for tests: stays short).
    pub fn longest_run(&self) -> usize {
        self.directory.windows(2).map(|w| w.get(1).zip(w.first()).map_or(0, |(b, a)| (b - a) as usize)).max().unwrap_or(0)
    }
}
