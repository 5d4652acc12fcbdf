//! Ownership of builds and jobs (DESIGN §4 step 5): every `{build}` and
//! `{job}` in an MCP path must belong to its `{project}`, checked by the
//! gateway itself, because InfraBox looks several job resources up by job
//! id alone (console of a running job, output, abort).
//!
//! The control plane answers from InfraBox's database, folded into the
//! rate-limit call the request makes anyway (an extra descriptor, see
//! [`crate::rls`]): no additional round trip. Ownership never changes once
//! a row exists, so confirmed answers are kept at the edge
//! ([`OwnershipCache`]) and a request whose ids are all confirmed asks
//! nothing. Only confirmations are cached: an id that does not exist yet
//! (a build being created) may exist a moment later.

use std::collections::HashMap;

use crate::route::Params;

/// What an admitted request claims: its project and the builds/jobs that
/// must belong to it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Claim {
    pub project: String,
    pub build: Option<String>,
    pub job: Option<String>,
}

impl Claim {
    /// The claim of a matched route's parameters; `None` when the path
    /// names no build or job (nothing to check).
    pub fn of(params: &Params) -> Option<Self> {
        if params.build.is_none() && params.job.is_none() {
            return None;
        }
        Some(Self { project: params.project.clone()?, build: params.build.clone(), job: params.job.clone() })
    }
}

/// The verdict on a claim.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ownership {
    /// Nothing to check, or every id belongs to the project.
    Confirmed,
    /// Some id does not exist or belongs to another project.
    Refuted,
    /// It could not be checked (the control plane or its database is away
    /// and the edge has no confirmation).
    Unknown,
}

/// Confirmed (id → project) pairs of one VM, bounded: when full, the
/// oldest half goes (a generation swap; no per-entry bookkeeping).
#[derive(Debug, Clone)]
pub struct OwnershipCache {
    current: HashMap<u128, u128>,
    previous: HashMap<u128, u128>,
    capacity: usize,
}

impl OwnershipCache {
    pub fn new(capacity: usize) -> Self {
        Self { current: HashMap::new(), previous: HashMap::new(), capacity: capacity.max(2) }
    }

    /// Whether every id of `claim` is confirmed to belong to its project.
    pub fn confirms(&mut self, claim: &Claim) -> bool {
        let Some(project) = uuid_bits(&claim.project) else { return false };
        claim.ids().all(|id| uuid_bits(id).is_some_and(|id| self.lookup(id) == Some(project)))
    }

    /// Records that every id of `claim` belongs to its project.
    pub fn confirm(&mut self, claim: &Claim) {
        let Some(project) = uuid_bits(&claim.project) else { return };
        for id in claim.ids().filter_map(uuid_bits) {
            self.insert(id, project);
        }
    }

    pub fn len(&self) -> usize {
        self.current.len() + self.previous.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lookup(&mut self, id: u128) -> Option<u128> {
        if let Some(p) = self.current.get(&id) {
            return Some(*p);
        }
        let p = *self.previous.get(&id)?;
        // Still in use: keep it across the next swap.
        self.insert(id, p);
        Some(p)
    }

    fn insert(&mut self, id: u128, project: u128) {
        if self.current.len() >= self.capacity / 2 {
            self.previous = std::mem::take(&mut self.current);
        }
        self.current.insert(id, project);
    }
}

impl Claim {
    fn ids(&self) -> impl Iterator<Item = &str> {
        self.build.as_deref().into_iter().chain(self.job.as_deref())
    }
}

/// The 128 bits of a lowercase hyphenated UUID.
fn uuid_bits(s: &str) -> Option<u128> {
    if !crate::path::is_uuid(s) {
        return None;
    }
    s.bytes().filter(|b| *b != b'-').try_fold(0u128, |acc, b| {
        let d = (b as char).to_digit(16)?;
        Some((acc << 4) | u128::from(d))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(all(target_family = "wasm", target_os = "unknown"))]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    const P: &str = "0b7a4c2e-1f3d-4c5b-9a8e-7d6c5b4a3f21";
    const Q: &str = "1b7a4c2e-1f3d-4c5b-9a8e-7d6c5b4a3f21";
    const J: &str = "2b7a4c2e-1f3d-4c5b-9a8e-7d6c5b4a3f21";

    fn claim(project: &str, job: &str) -> Claim {
        Claim { project: project.into(), build: None, job: Some(job.into()) }
    }

    #[test]
    fn only_paths_with_builds_or_jobs_claim_anything() {
        let p = Params { project: Some(P.into()), build: None, job: None };
        assert_eq!(Claim::of(&p), None);
        let p = Params { project: Some(P.into()), build: None, job: Some(J.into()) };
        assert_eq!(Claim::of(&p), Some(claim(P, J)));
        assert_eq!(Claim::of(&Params { project: None, build: Some(J.into()), job: None }), None);
    }

    #[test]
    fn a_confirmation_is_for_its_project_only() {
        let mut c = OwnershipCache::new(16);
        assert!(!c.confirms(&claim(P, J)));
        c.confirm(&claim(P, J));
        assert!(c.confirms(&claim(P, J)));
        assert!(!c.confirms(&claim(Q, J)), "a job of P is not confirmed under Q");
        let both = Claim { project: P.into(), build: Some(Q.into()), job: Some(J.into()) };
        assert!(!c.confirms(&both), "every id must be confirmed");
        assert!(!c.confirms(&claim(P, "not-a-uuid")));
    }

    #[test]
    fn the_cache_stays_bounded_and_keeps_what_is_used() {
        let mut c = OwnershipCache::new(8);
        let id = |n: u32| format!("{n:08x}-1f3d-4c5b-9a8e-7d6c5b4a3f21");
        c.confirm(&claim(P, &id(0)));
        for n in 1..1000 {
            c.confirm(&claim(P, &id(n)));
            assert!(c.confirms(&claim(P, &id(0))), "a hot entry survives the swaps");
            assert!(c.len() <= 9, "{}", c.len());
        }
        assert!(!c.confirms(&claim(P, &id(1))), "cold entries are evicted");
    }

    #[test]
    fn uuid_bits_are_exact() {
        assert_eq!(uuid_bits("00000000-0000-0000-0000-0000000000ff"), Some(255));
        assert_eq!(uuid_bits("ffffffff-ffff-ffff-ffff-ffffffffffff"), Some(u128::MAX));
        assert_eq!(uuid_bits("FFFFFFFF-ffff-ffff-ffff-ffffffffffff"), None);
    }
}
