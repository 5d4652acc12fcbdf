//! The local sliding window (DESIGN §9, degraded mode): an exact sliding log
//! of admission times for one (user, class), kept per Envoy instance when
//! the rate-limit service cannot answer. Host-agnostic: the proxy-wasm
//! adapter stores [`SlidingWindow::encode`]d bytes in shared data and
//! updates them with compare-and-swap.
//!
//! Also [`Decision`], the outcome of one rate-limit step whichever side made
//! it, and the `RateLimit-*` / `Retry-After` headers it produces.

use crate::rls::Verdict;

/// The outcome of one rate-limit step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// Requests left in the window after this one (0 when denied).
    pub remaining: u32,
    /// Milliseconds until the oldest counted request leaves the window
    /// (the whole window when nothing is counted).
    pub reset_ms: u64,
}

impl From<Verdict> for Decision {
    fn from(v: Verdict) -> Self {
        Self { allowed: !v.over_limit, remaining: v.remaining, reset_ms: v.reset_ms }
    }
}

impl Decision {
    /// `RateLimit-Reset`: whole seconds until the oldest request leaves, rounded up.
    pub fn reset_seconds(&self) -> u64 {
        self.reset_ms.div_ceil(1000)
    }

    /// `Retry-After` of a denial: whole seconds, rounded up, at least 1.
    pub fn retry_after(&self) -> u64 {
        self.reset_seconds().max(1)
    }

    /// The `RateLimit-*` headers of every MCP response whose limit was
    /// evaluated, plus `Retry-After` on a denial.
    pub fn headers(&self, limit: u32) -> Vec<(&'static str, String)> {
        let mut h = vec![
            ("ratelimit-limit", limit.to_string()),
            ("ratelimit-remaining", self.remaining.to_string()),
            ("ratelimit-reset", self.reset_seconds().to_string()),
        ];
        if !self.allowed {
            h.push(("retry-after", self.retry_after().to_string()));
        }
        h
    }
}

/// Admission times (milliseconds, ascending) of one (user, class).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SlidingWindow {
    times: Vec<u64>,
}

/// Bytes per stored admission time.
const ENTRY: usize = 8;

impl SlidingWindow {
    /// Reads stored bytes. Tolerant: a trailing partial entry is dropped and
    /// the times are sorted, so corrupt shared data cannot break a request.
    pub fn decode(bytes: &[u8]) -> Self {
        let mut times: Vec<u64> = bytes
            .chunks_exact(ENTRY)
            .map(|c| {
                let mut b = [0u8; ENTRY];
                b.copy_from_slice(c);
                u64::from_le_bytes(b)
            })
            .collect();
        times.sort_unstable();
        Self { times }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.times.len() * ENTRY);
        for t in &self.times {
            out.extend_from_slice(&t.to_le_bytes());
        }
        out
    }

    /// Requests counted in the window (after the last [`decide`](Self::decide)).
    pub fn len(&self) -> usize {
        self.times.len()
    }

    pub fn is_empty(&self) -> bool {
        self.times.is_empty()
    }

    /// Decides one request at `now_ms`: drops times older than the window
    /// (a request at `t` counts while `now - t < window`), admits only under
    /// `limit` and records only admissions.
    pub fn decide(&mut self, now_ms: u64, limit: u32, window_ms: u64) -> Decision {
        let cutoff = now_ms.saturating_sub(window_ms);
        // Keep t > now - window; when now < window nothing can be that old.
        let keep_from = if now_ms >= window_ms { self.times.partition_point(|t| *t <= cutoff) } else { 0 };
        self.times.drain(..keep_from);
        let count = self.times.len();
        let allowed = count < limit as usize;
        if allowed {
            // Times stay sorted even if the host clock steps back.
            let at = self.times.partition_point(|t| *t <= now_ms);
            self.times.insert(at, now_ms);
        }
        let reset_ms = match self.times.first() {
            Some(oldest) => oldest.saturating_add(window_ms).saturating_sub(now_ms),
            None => window_ms,
        };
        let remaining = if allowed { (limit as usize).saturating_sub(count + 1) } else { 0 };
        Decision { allowed, remaining: u32::try_from(remaining).unwrap_or(u32::MAX), reset_ms }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The reference: a plain list of admission times, scanned in full.
    #[derive(Default)]
    struct SlidingLog {
        admitted: Vec<u64>,
    }

    impl SlidingLog {
        fn decide(&mut self, now: u64, limit: u32, window: u64) -> Decision {
            let live: Vec<u64> = self.admitted.iter().copied().filter(|t| now < window || now - window < *t).collect();
            let allowed = (live.len() as u64) < u64::from(limit);
            let mut counted = live.clone();
            if allowed {
                self.admitted.push(now);
                counted.push(now);
            }
            let oldest = counted.iter().min().copied();
            Decision {
                allowed,
                remaining: if allowed { limit - live.len() as u32 - 1 } else { 0 },
                reset_ms: oldest.map(|o| o + window - now).unwrap_or(window),
            }
        }
    }

    #[test]
    fn admits_up_to_the_limit_then_frees_one_slot_per_expiry() {
        let mut w = SlidingWindow::default();
        for i in 0..10 {
            let d = w.decide(1_000 + i * 10, 10, 60_000);
            assert!(d.allowed);
            assert_eq!(d.remaining, 9 - i as u32);
            assert_eq!(d.reset_ms, 60_000 - i * 10);
        }
        let d = w.decide(2_000, 10, 60_000);
        assert_eq!(d, Decision { allowed: false, remaining: 0, reset_ms: 59_000 });
        assert_eq!(d.retry_after(), 59);
        // Denials are not recorded: the oldest leaves at 61 000 exactly.
        assert!(!w.decide(60_999, 10, 60_000).allowed);
        assert!(w.decide(61_000, 10, 60_000).allowed);
        assert!(!w.decide(61_000, 10, 60_000).allowed);
        assert_eq!(w.len(), 10);
    }

    #[test]
    fn zero_limit_denies_with_a_whole_window() {
        let mut w = SlidingWindow::default();
        assert_eq!(w.decide(5, 0, 2_000), Decision { allowed: false, remaining: 0, reset_ms: 2_000 });
    }

    #[test]
    fn headers_round_up_and_carry_retry_after_on_denial() {
        let d = Decision { allowed: false, remaining: 0, reset_ms: 2_001 };
        assert_eq!(
            d.headers(10),
            vec![
                ("ratelimit-limit", "10".to_string()),
                ("ratelimit-remaining", "0".to_string()),
                ("ratelimit-reset", "3".to_string()),
                ("retry-after", "3".to_string()),
            ]
        );
        let ok = Decision { allowed: true, remaining: 4, reset_ms: 0 };
        assert_eq!(ok.headers(5).len(), 3);
        assert_eq!(Decision { allowed: false, remaining: 0, reset_ms: 0 }.retry_after(), 1);
    }

    #[test]
    fn decode_tolerates_garbage() {
        assert!(SlidingWindow::decode(&[1, 2, 3]).is_empty());
        let mut w = SlidingWindow::decode(&[0xff; 20]);
        assert_eq!(w.len(), 2);
        // u64::MAX times from garbage are "in the future": still counted, no panic.
        let _ = w.decide(10, 3, 1_000);
    }

    proptest! {
        /// Random arrivals (gaps, limits, windows), with the state passed
        /// through encode/decode between requests like shared data does:
        /// exactly the reference model's decisions.
        #[test]
        fn matches_the_sliding_log_model(
            limit in 0u32..6,
            window in 1u64..3_000,
            start in 0u64..5_000,
            gaps in proptest::collection::vec(0u64..1_500, 1..60),
        ) {
            let mut bytes = Vec::new();
            let mut model = SlidingLog::default();
            let mut now = start;
            for gap in gaps {
                now += gap;
                let mut w = SlidingWindow::decode(&bytes);
                let got = w.decide(now, limit, window);
                bytes = w.encode();
                prop_assert_eq!(got, model.decide(now, limit, window), "at {}", now);
                prop_assert!(w.len() <= limit as usize);
            }
        }

        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..80), now in any::<u64>()) {
            let mut w = SlidingWindow::decode(&bytes);
            let _ = w.decide(now, 3, 60_000);
            let _ = SlidingWindow::decode(&w.encode());
        }
    }
}
