//! Coalescing repeated denials (DESIGN §10): a flood of bad tokens from one
//! address must neither fill `mcp_access_log` (kept for 90 days) nor cost
//! the audit stream one entry per request.
//!
//! Per VM, denials are keyed by (client address, reason, token id). The
//! first of a key in each interval is audited as usual (its own row, with
//! status and duration); the identical ones after it within the interval
//! are only counted. When the interval is over, the count becomes one
//! [`Summary`] — one row with `count` — which the root context sends to the
//! control plane. Every denial is thus in exactly one row: its own or a
//! summary's count. Keys are bounded ([`MAX_KEYS`]): past that, denials of
//! new keys are audited one by one, never dropped.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

/// Most keys a VM tracks at once.
pub const MAX_KEYS: usize = 4096;
/// Most summaries waiting to be sent; older ones are dropped (and counted)
/// past this, should the control plane stay away.
pub const MAX_PENDING: usize = 1024;

/// What makes two denials identical.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Key {
    pub address: String,
    pub reason: String,
    pub token_id: Option<String>,
}

/// What is kept of the first denial of an interval for its summary.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Sample {
    pub method: String,
    pub path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
    pub status: u32,
}

/// Denials counted but not audited one by one: one row with `count`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Summary {
    pub address: String,
    pub reason: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_id: Option<String>,
    #[serde(flatten)]
    pub sample: Sample,
    pub count: u32,
    /// Unix milliseconds of the first and the last counted denial.
    pub first_ms: i64,
    pub last_ms: i64,
}

/// The batch the root context posts to the control plane.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SummaryBatch {
    pub node_id: String,
    pub vm_id: String,
    pub summaries: Vec<Summary>,
}

/// Whether a denial is audited on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Audit {
    /// Audit it as usual.
    Record,
    /// Counted into the key's next summary.
    Counted,
}

#[derive(Debug, Clone)]
struct Interval {
    started_ms: i64,
    sample: Sample,
    count: u32,
    first_ms: i64,
    last_ms: i64,
}

/// The coalescing state of one VM.
#[derive(Debug, Clone)]
pub struct Coalescer {
    interval_ms: i64,
    open: HashMap<Key, Interval>,
    pending: Vec<Summary>,
    /// Summaries dropped because too many were waiting.
    pub dropped: u64,
}

impl Coalescer {
    /// `interval_seconds` 0 turns coalescing off (every denial recorded).
    pub fn new(interval_seconds: u32) -> Self {
        Self { interval_ms: i64::from(interval_seconds) * 1000, open: HashMap::new(), pending: Vec::new(), dropped: 0 }
    }

    /// One denial at `now_ms`: audit it, or count it.
    pub fn observe(&mut self, key: Key, sample: impl FnOnce() -> Sample, now_ms: i64) -> Audit {
        if self.interval_ms == 0 {
            return Audit::Record;
        }
        match self.open.get_mut(&key) {
            Some(i) if now_ms.saturating_sub(i.started_ms) < self.interval_ms => {
                if i.count == 0 {
                    i.first_ms = now_ms;
                }
                i.count = i.count.saturating_add(1);
                i.last_ms = now_ms;
                Audit::Counted
            }
            Some(i) => {
                let ended = std::mem::replace(i, Interval::start(sample(), now_ms));
                self.close(&key, ended);
                Audit::Record
            }
            None => {
                if self.open.len() < MAX_KEYS {
                    self.open.insert(key, Interval::start(sample(), now_ms));
                }
                Audit::Record
            }
        }
    }

    /// The summaries of every interval over by `now_ms` (and of any closed
    /// earlier), oldest first; they leave the coalescer.
    pub fn drain(&mut self, now_ms: i64) -> Vec<Summary> {
        let over: Vec<Key> = self
            .open
            .iter()
            .filter(|(_, i)| now_ms.saturating_sub(i.started_ms) >= self.interval_ms)
            .map(|(k, _)| k.clone())
            .collect();
        for key in over {
            if let Some(i) = self.open.remove(&key) {
                self.close(&key, i);
            }
        }
        let mut out = std::mem::take(&mut self.pending);
        out.sort_by_key(|s| s.first_ms);
        out
    }

    /// Puts summaries that could not be sent back, to go with the next batch.
    pub fn requeue(&mut self, mut summaries: Vec<Summary>) {
        summaries.append(&mut self.pending);
        self.pending = summaries;
        self.trim();
    }

    /// Whether anything is waiting to be drained at some point.
    pub fn is_idle(&self) -> bool {
        self.open.is_empty() && self.pending.is_empty()
    }

    fn close(&mut self, key: &Key, i: Interval) {
        if i.count > 0 {
            self.pending.push(Summary {
                address: key.address.clone(),
                reason: key.reason.clone(),
                token_id: key.token_id.clone(),
                sample: i.sample,
                count: i.count,
                first_ms: i.first_ms,
                last_ms: i.last_ms,
            });
            self.trim();
        }
    }

    fn trim(&mut self) {
        if self.pending.len() > MAX_PENDING {
            let excess = self.pending.len() - MAX_PENDING;
            self.pending.drain(..excess);
            self.dropped += excess as u64;
        }
    }
}

impl Interval {
    fn start(sample: Sample, now_ms: i64) -> Self {
        Self { started_ms: now_ms, sample, count: 0, first_ms: now_ms, last_ms: now_ms }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(all(target_family = "wasm", target_os = "unknown"))]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    fn key(address: &str, reason: &str) -> Key {
        Key { address: address.into(), reason: reason.into(), token_id: None }
    }

    fn sample() -> Sample {
        Sample { method: "GET".into(), path: "/api/v1/mcp/projects".into(), status: 401, ..Sample::default() }
    }

    #[test]
    fn every_denial_is_in_exactly_one_row() {
        let mut c = Coalescer::new(10);
        let mut recorded = 0u32;
        let mut counted = 0u32;
        // 1 000 denials over 35 s from one address, plus a few from another.
        for i in 0..1000i64 {
            let now = i * 35;
            match c.observe(key("10.0.0.1", "invalid_token"), sample, now) {
                Audit::Record => recorded += 1,
                Audit::Counted => {}
            }
            if i % 300 == 0 {
                // Another address, once per 10.5 s: always its own row.
                assert_eq!(c.observe(key("10.0.0.2", "invalid_token"), sample, now), Audit::Record);
            }
            if i % 50 == 0 {
                counted += c.drain(now).iter().filter(|s| s.address == "10.0.0.1").map(|s| s.count).sum::<u32>();
            }
        }
        counted += c.drain(1_000_000).iter().filter(|s| s.address == "10.0.0.1").map(|s| s.count).sum::<u32>();
        assert_eq!(recorded + counted, 1000);
        assert_eq!(recorded, 4, "one row per 10 s interval");
        assert!(c.is_idle());
    }

    #[test]
    fn different_reasons_addresses_and_tokens_are_not_identical() {
        let mut c = Coalescer::new(10);
        assert_eq!(c.observe(key("a", "invalid_token"), sample, 0), Audit::Record);
        assert_eq!(c.observe(key("a", "invalid_token"), sample, 1), Audit::Counted);
        assert_eq!(c.observe(key("a", "rate_limited"), sample, 2), Audit::Record);
        assert_eq!(c.observe(key("b", "invalid_token"), sample, 3), Audit::Record);
        let mut t = key("a", "invalid_token");
        t.token_id = Some("0123456789abcdef".into());
        assert_eq!(c.observe(t, sample, 4), Audit::Record);
        let s = c.drain(10_000);
        assert_eq!(s.len(), 1);
        assert_eq!((s[0].count, s[0].first_ms, s[0].last_ms), (1, 1, 1));
    }

    #[test]
    fn off_records_everything_and_keys_stay_bounded() {
        let mut off = Coalescer::new(0);
        assert!((0..10).all(|i| off.observe(key("a", "x"), sample, i) == Audit::Record));
        let mut c = Coalescer::new(10);
        for i in 0..(MAX_KEYS + 100) {
            assert_eq!(c.observe(key(&format!("10.0.{}.{}", i / 256, i % 256), "x"), sample, 0), Audit::Record);
        }
        assert_eq!(c.open.len(), MAX_KEYS);
        // Untracked keys are recorded every time: never lost.
        let last = format!("10.0.{}.{}", (MAX_KEYS + 50) / 256, (MAX_KEYS + 50) % 256);
        assert_eq!(c.observe(key(&last, "x"), sample, 1), Audit::Record);
    }

    #[test]
    fn unsent_summaries_wait_for_the_next_batch_within_a_bound() {
        let mut c = Coalescer::new(1);
        c.observe(key("a", "x"), sample, 0);
        c.observe(key("a", "x"), sample, 1);
        let batch = c.drain(5_000);
        assert_eq!(batch.len(), 1);
        c.requeue(batch);
        assert_eq!(c.drain(5_000).len(), 1);
        c.requeue((0..MAX_PENDING + 7).map(|i| Summary {
            address: i.to_string(), reason: "x".into(), token_id: None, sample: sample(), count: 1, first_ms: 0, last_ms: 0,
        }).collect());
        assert_eq!(c.dropped, 7);
        assert_eq!(c.drain(5_000).len(), MAX_PENDING);
    }

    #[test]
    fn the_batch_is_json_the_control_plane_reads() -> Result<(), serde_json::Error> {
        let mut c = Coalescer::new(1);
        c.observe(key("10.1.2.3", "invalid_token"), sample, 0);
        c.observe(key("10.1.2.3", "invalid_token"), sample, 500);
        let batch = SummaryBatch { node_id: "n".into(), vm_id: "v".into(), summaries: c.drain(2_000) };
        let json = serde_json::to_value(&batch)?;
        assert_eq!(json["summaries"][0]["count"], 1);
        assert_eq!(json["summaries"][0]["path"], "/api/v1/mcp/projects");
        assert_eq!(json["summaries"][0]["status"], 401);
        assert_eq!(serde_json::from_value::<SummaryBatch>(json)?, batch);
        Ok(())
    }
}
