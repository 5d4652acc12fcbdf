//! The change log behind delta snapshots (DESIGN §8): what each published
//! version changed from the one before, for the last [`MAX_VERSIONS`]
//! versions. From it the publisher renders, once per new version, the delta
//! from every version still in the log to the new one, so serving a delta is
//! as cheap as serving the full body. A VM whose version is not in the log
//! (too old, another replica's history, a restart) gets the full snapshot.
//!
//! Versions are content hashes, the same on every replica for the same
//! rows, so a delta from any replica applies to a policy from any other.

use std::collections::{HashMap, VecDeque};

use axum::body::Bytes;
use mcp_filter_core::snapshot::Limits;

use super::build::{Change, Model};

/// Versions a delta can start from.
pub const MAX_VERSIONS: usize = 64;

/// Bytes of deltas kept per published version; older versions past it get
/// the full snapshot.
pub const MAX_DELTA_BYTES: usize = 8 << 20;

/// A delta body and its signature.
#[derive(Debug, Clone)]
pub struct SignedDelta {
    pub body: Bytes,
    /// HMAC-SHA256 of `body` ([`mcp_filter_core::signature`]), hex.
    pub signature: String,
}

/// `(version, what the next version changed)`, oldest first; the last
/// entry's change leads to the version published now.
#[derive(Debug, Default)]
pub struct ChangeLog {
    steps: VecDeque<(String, Change)>,
    /// A change was never published (its build could not be rendered): the
    /// next step does not say all that changed since the version before.
    gap: bool,
}

impl ChangeLog {
    /// A new version was published after `from` with `change`; `None` for
    /// either (the first build, or a change not known) starts the log over.
    pub fn record(&mut self, from: Option<&str>, change: Option<Change>) {
        if std::mem::take(&mut self.gap) {
            self.steps.clear();
            return;
        }
        match (from, change) {
            (Some(from), Some(change)) => {
                self.steps.push_back((from.to_owned(), change));
                while self.steps.len() > MAX_VERSIONS {
                    self.steps.pop_front();
                }
            }
            _ => self.steps.clear(),
        }
    }

    /// A change was lost (not published): no delta may span it.
    pub fn lose_change(&mut self) {
        self.steps.clear();
        self.gap = true;
    }

    /// The delta from every version in the log to `model` (of `version`),
    /// newest first, each signed with `key`. Stops where a delta would name
    /// more than half the tokens (the full snapshot is then as good) or the
    /// bodies would pass [`MAX_DELTA_BYTES`]. A version met twice keeps the
    /// delta from its latest time (the same content, a smaller delta).
    pub fn deltas(&self, model: &Model, limits: &Limits, version: &str, generated_at: i64, key: &[u8; 32]) -> HashMap<String, SignedDelta> {
        let mut out = HashMap::new();
        let mut since = Change::default();
        let mut bytes = 0usize;
        let most = (model.token_count() / 2).max(64);
        for (from, change) in self.steps.iter().rev() {
            // A step that alone names too many tokens ends the walk before
            // its ids are copied (a bulk load's step names nearly all).
            if change.tokens.len() > most {
                break;
            }
            since.extend(change);
            if from == version || out.contains_key(from) {
                continue;
            }
            if since.tokens.len() > most {
                break;
            }
            let delta = model.delta(limits, &since, from, version, generated_at);
            let Ok(body) = serde_json::to_vec(&delta) else { break };
            bytes += body.len();
            if bytes > MAX_DELTA_BYTES {
                break;
            }
            let signature = mcp_filter_core::signature::sign(key, &body);
            out.insert(from.clone(), SignedDelta { body: Bytes::from(body), signature });
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{HashMap, HashSet};

    use mcp_filter_core::policy::Policy;
    use mcp_filter_core::snapshot::SnapshotUser;
    use mcp_filter_core::token;
    use uuid::Uuid;

    use super::*;
    use crate::snapshot::build::{Fingerprint, LiveToken, Loaded};

    const USER_A: &str = "11111111-1111-4111-8111-111111111111";
    const USER_B: &str = "22222222-2222-4222-8222-222222222222";
    const PROJECT: &str = "33333333-3333-4333-8333-333333333333";

    fn row(id: u32, user: &str, trigger: bool) -> LiveToken {
        LiveToken {
            token_id: format!("{id:016x}"),
            token_hash: token::hash_hex(&format!("t{id}")),
            user_id: Uuid::parse_str(user).unwrap(),
            enabled_projects: None,
            allow_trigger: trigger,
            expires_at: 2_000_000_000,
        }
    }

    fn model(rows: Vec<LiveToken>, cred_b: &str) -> Model {
        let collab: HashSet<Uuid> = [Uuid::parse_str(PROJECT).unwrap()].into();
        let collaborators = [USER_A, USER_B].iter().map(|u| (Uuid::parse_str(u).unwrap(), collab.clone())).collect();
        let creds = HashMap::from([
            (Uuid::parse_str(USER_A).unwrap(), SnapshotUser { read_credential: Some("ra".into()), write_credential: Some("wa".into()) }),
            (Uuid::parse_str(USER_B).unwrap(), SnapshotUser { read_credential: Some(cred_b.into()), write_credential: None }),
        ]);
        Model::assemble(Loaded { tokens: rows, collaborators, credentials: Vec::new() }, &creds)
    }

    /// A run of full builds: every delta the log renders, applied to the
    /// full snapshot of its base, is the full snapshot of the new version —
    /// checked by content version and by the policy it gives.
    #[test]
    fn every_logged_delta_applied_to_its_base_is_the_full_build() {
        let key = [7u8; 32];
        let limits = Limits::default();
        let steps: Vec<Model> = vec![
            model(vec![row(1, USER_A, false), row(2, USER_B, false)], "rb"),
            model(vec![row(1, USER_A, true), row(2, USER_B, false)], "rb"),
            model(vec![row(1, USER_A, true), row(2, USER_B, false), row(3, USER_B, true)], "rb"),
            model(vec![row(1, USER_A, true), row(2, USER_B, false), row(3, USER_B, true)], "rb-rotated"),
            model(vec![row(1, USER_A, true)], "rb-rotated"),
            // Back to the first content: its version is met again.
            model(vec![row(1, USER_A, false), row(2, USER_B, false)], "rb"),
        ];
        let mut log = ChangeLog::default();
        let mut bodies: HashMap<String, Vec<u8>> = HashMap::new();
        let mut last: Option<(String, Fingerprint)> = None;
        for (n, m) in steps.iter().enumerate() {
            let (version, body) = m.render(&limits, 10 + n as i64).unwrap();
            bodies.insert(version.clone(), body.clone());
            let fp = Fingerprint::of(m);
            log.record(last.as_ref().map(|(v, _)| v.as_str()), last.as_ref().map(|(_, f)| f.diff(&fp)));
            let deltas = log.deltas(m, &limits, &version, 10 + n as i64, &key);
            assert_eq!(deltas.len(), bodies.len() - 1, "step {n}: a delta from every earlier version");
            let full = Policy::from_json(&body).unwrap();
            for (base, delta) in &deltas {
                assert_eq!(mcp_filter_core::signature::sign(&key, &delta.body), delta.signature);
                let applied = Policy::from_json(&bodies[base]).unwrap().apply_delta(&delta.body[..]).unwrap();
                assert_eq!(applied.version, version, "step {n} from {base}");
                assert_eq!(applied.to_snapshot(), full.to_snapshot(), "step {n} from {base}");
                assert!(delta.body.len() < body.len() + 200);
            }
            last = Some((version, fp));
        }
        // A change not known starts over: only full snapshots until the next.
        log.record(None, None);
        let m = steps.last().unwrap();
        let (version, _) = m.render(&limits, 99).unwrap();
        assert!(log.deltas(m, &limits, &version, 99, &key).is_empty());
        // A change lost before publishing: the next step cannot span it either.
        log.record(Some("a"), Some(Change::default()));
        log.lose_change();
        log.record(Some("b"), Some(Change::default()));
        assert!(log.deltas(m, &limits, &version, 99, &key).is_empty());
        log.record(Some("c"), Some(Change::default()));
        assert_eq!(log.deltas(m, &limits, &version, 99, &key).len(), 1);
    }

    #[test]
    fn a_patch_names_only_what_it_touched_and_the_log_is_bounded() {
        let limits = Limits::default();
        let mut log = ChangeLog::default();
        let m = model((0..200).map(|i| row(i, USER_A, false)).collect(), "rb");
        let (version, body) = m.render(&limits, 1).unwrap();
        for i in 0..MAX_VERSIONS + 10 {
            let change = Change { tokens: [format!("{i:016x}")].into(), users: Default::default() };
            log.record(Some(&format!("v{i}")), Some(change));
        }
        let deltas = log.deltas(&m, &limits, &version, 1, &[1; 32]);
        // Half the 200 tokens is where deltas stop; the log holds 64.
        assert_eq!(deltas.len(), MAX_VERSIONS);
        let newest = &deltas[&format!("v{}", MAX_VERSIONS + 9)];
        assert!(newest.body.len() * 20 < body.len(), "one token's delta is {} bytes of a {}-byte snapshot", newest.body.len(), body.len());
        let m2 = model((0..20).map(|i| row(i, USER_A, false)).collect(), "rb");
        let (v2, _) = m2.render(&limits, 1).unwrap();
        // With 20 tokens a delta may still name up to 64 ids, as the oldest here does.
        assert_eq!(log.deltas(&m2, &limits, &v2, 1, &[1; 32]).len(), MAX_VERSIONS);
    }
}
