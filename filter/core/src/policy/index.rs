//! [`TokenIndex`]: token hash → grant, as an open-addressing table of `u32`
//! grant indices (4 bytes per slot, at most half full).
//!
//! The keys are SHA-256 digests, uniformly spread, so the first eight bytes
//! are the bucket hash and linear probing stays short whatever the number of
//! tokens; a slot matches only when the grant's whole hash is equal.

use super::Grant;
use crate::token::TokenHash;

const EMPTY: u32 = u32::MAX;

/// Open-addressing index over a grant list.
#[derive(Debug, Clone, Default)]
pub struct TokenIndex {
    slots: Vec<u32>,
}

/// Two grants with the same token hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DuplicateHash(pub u32);

fn bucket(hash: &TokenHash) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(hash.get(..8).unwrap_or(&[0; 8]));
    u64::from_le_bytes(b)
}

impl TokenIndex {
    /// Indexes `grants`; refuses a hash that appears twice (names the later grant).
    pub fn build(grants: &[Grant]) -> Result<Self, DuplicateHash> {
        if grants.is_empty() {
            return Ok(Self::default());
        }
        let size = (grants.len() * 2).next_power_of_two().max(8);
        let mask = size - 1;
        let mut slots = vec![EMPTY; size];
        for (ix, grant) in grants.iter().enumerate() {
            let mut i = bucket(&grant.hash) as usize & mask;
            loop {
                match slots.get(i).copied() {
                    Some(EMPTY) => break,
                    Some(other) if grants.get(other as usize).is_some_and(|g| g.hash == grant.hash) => {
                        return Err(DuplicateHash(ix as u32));
                    }
                    _ => i = (i + 1) & mask,
                }
            }
            if let Some(slot) = slots.get_mut(i) {
                *slot = ix as u32;
            }
        }
        Ok(Self { slots })
    }

    /// The grant (and its index) whose hash is `hash`.
    pub fn find<'g>(&self, hash: &TokenHash, grants: &'g [Grant]) -> Option<(u32, &'g Grant)> {
        if self.slots.is_empty() {
            return None;
        }
        let mask = self.slots.len() - 1;
        let mut i = bucket(hash) as usize & mask;
        // At most half full: an empty slot is always reached.
        loop {
            let ix = *self.slots.get(i)?;
            if ix == EMPTY {
                return None;
            }
            let grant = grants.get(ix as usize)?;
            if grant.hash == *hash {
                return Some((ix, grant));
            }
            i = (i + 1) & mask;
        }
    }

    pub fn heap_bytes(&self) -> usize {
        self.slots.capacity() * std::mem::size_of::<u32>()
    }

    /// Longest probe sequence (for tests: stays short).
    pub fn longest_probe(&self, grants: &[Grant]) -> usize {
        let mask = self.slots.len().saturating_sub(1);
        let mut longest = 0;
        for (pos, ix) in self.slots.iter().enumerate() {
            if let Some(g) = grants.get(*ix as usize) {
                let home = bucket(&g.hash) as usize & mask;
                longest = longest.max((pos + self.slots.len() - home) & mask);
            }
        }
        longest + 1
    }
}
