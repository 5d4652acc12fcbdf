//! The local sliding window (DESIGN §9, degraded mode) for one (user,
//! class), kept per Envoy instance when the rate-limit service cannot
//! answer: an exact sliding log for the usual limits, bucketed counts above
//! [`EXACT_MAX_LIMIT`], never over the limit and bounded in bytes and work
//! whatever the limit. Host-agnostic: the proxy-wasm
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

/// Bytes per stored admission time (the exact form).
const ENTRY: usize = 8;

/// Up to this limit the window is an exact log of admission times
/// (at most `EXACT_MAX_LIMIT` × 8 bytes); above it, counts per bucket.
pub const EXACT_MAX_LIMIT: u32 = 64;
/// Buckets per window in the counting form.
const BUCKETS: u64 = 20;
/// Slots kept: a window of `BUCKETS` buckets rounded up overlaps at most
/// one more.
const SLOTS: usize = BUCKETS as usize + 1;
/// First byte of the counting form (its length, 101, is no multiple of 8,
/// so it is never mistaken for a log).
const COUNTING_TAG: u8 = 0xB7;
/// Bytes of the counting form: tag, bucket width, newest bucket, counts.
pub const COUNTING_BYTES: usize = 1 + 8 + 8 + SLOTS * 4;

/// One (user, class) of the local window: never admits more than the limit
/// in any window, in a bounded number of bytes whatever the limit.
///
/// - Limits up to [`EXACT_MAX_LIMIT`]: the exact sliding log (admission
///   times, ascending) — the same decisions as the rate-limit service.
/// - Larger limits: admissions counted per bucket of 1/20 of the window;
///   a bucket counts for as long as any instant of it is inside the window
///   (as if every admission in it were at its end), so the count is never
///   below the true one: never over the limit, at worst one bucket width
///   late to free a slot. [`COUNTING_BYTES`] (101) bytes, O(21) per decision.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SlidingWindow {
    /// The exact form (sorted).
    times: Vec<u64>,
    /// The counting form, when in use.
    counting: Option<Counting>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Counting {
    bucket_ms: u64,
    /// Index (time / bucket_ms) of the newest bucket.
    newest: u64,
    /// Counts by bucket index modulo [`SLOTS`].
    counts: [u32; SLOTS],
}

impl Counting {
    fn new(bucket_ms: u64, newest: u64) -> Self {
        Self { bucket_ms, newest, counts: [0; SLOTS] }
    }

    fn slot(&mut self, bucket: u64) -> Option<&mut u32> {
        self.counts.get_mut(usize::try_from(bucket % SLOTS as u64).unwrap_or(0))
    }

    /// Moves the newest bucket forward to `bucket`, clearing what it passes.
    fn advance(&mut self, bucket: u64) {
        if bucket <= self.newest {
            return;
        }
        let steps = (bucket - self.newest).min(SLOTS as u64);
        for b in bucket + 1 - steps..=bucket {
            if let Some(c) = self.slot(b) {
                *c = 0;
            }
        }
        self.newest = bucket;
    }

    /// (admissions counted at `now`, the oldest counted bucket).
    fn count(&self, now_ms: u64, window_ms: u64) -> (u64, Option<u64>) {
        let first = self.newest.saturating_sub(SLOTS as u64 - 1);
        let mut total = 0u64;
        let mut oldest = None;
        for b in first..=self.newest {
            // Bucket b spans [b·w, (b+1)·w): it counts while its end is
            // past now - window.
            let end = b.saturating_add(1).saturating_mul(self.bucket_ms);
            if end.saturating_add(window_ms) <= now_ms {
                continue;
            }
            let n = self.counts.get(usize::try_from(b % SLOTS as u64).unwrap_or(0)).copied().unwrap_or(0);
            if n > 0 {
                total += u64::from(n);
                oldest.get_or_insert(b);
            }
        }
        (total, oldest)
    }
}

impl SlidingWindow {
    /// Reads stored bytes. Tolerant: a trailing partial entry is dropped and
    /// the times are sorted, so corrupt shared data cannot break a request.
    pub fn decode(bytes: &[u8]) -> Self {
        if bytes.len() == COUNTING_BYTES && bytes.first() == Some(&COUNTING_TAG) {
            let word = |at: usize| bytes.get(at..at + 8).and_then(|b| <[u8; 8]>::try_from(b).ok()).map_or(0, u64::from_le_bytes);
            let mut c = Counting::new(word(1).max(1), word(9));
            for (i, slot) in c.counts.iter_mut().enumerate() {
                let at = 17 + i * 4;
                *slot = bytes.get(at..at + 4).and_then(|b| <[u8; 4]>::try_from(b).ok()).map_or(0, u32::from_le_bytes);
            }
            return Self { times: Vec::new(), counting: Some(c) };
        }
        let mut times: Vec<u64> = bytes
            .chunks_exact(ENTRY)
            .map(|c| {
                let mut b = [0u8; ENTRY];
                b.copy_from_slice(c);
                u64::from_le_bytes(b)
            })
            .collect();
        times.sort_unstable();
        Self { times, counting: None }
    }

    pub fn encode(&self) -> Vec<u8> {
        if let Some(c) = &self.counting {
            let mut out = Vec::with_capacity(COUNTING_BYTES);
            out.push(COUNTING_TAG);
            out.extend_from_slice(&c.bucket_ms.to_le_bytes());
            out.extend_from_slice(&c.newest.to_le_bytes());
            for n in &c.counts {
                out.extend_from_slice(&n.to_le_bytes());
            }
            return out;
        }
        let mut out = Vec::with_capacity(self.times.len() * ENTRY);
        for t in &self.times {
            out.extend_from_slice(&t.to_le_bytes());
        }
        out
    }

    /// Requests counted in the window (after the last [`decide`](Self::decide)).
    pub fn len(&self) -> usize {
        match &self.counting {
            Some(c) => c.counts.iter().map(|n| *n as usize).sum(),
            None => self.times.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Decides one request at `now_ms`: admits only under `limit` in the
    /// window and records only admissions.
    pub fn decide(&mut self, now_ms: u64, limit: u32, window_ms: u64) -> Decision {
        if limit <= EXACT_MAX_LIMIT {
            if let Some(c) = self.counting.take() {
                self.times = log_of(&c, limit);
            }
            return self.decide_exact(now_ms, limit, window_ms);
        }
        let bucket_ms = window_ms.div_ceil(BUCKETS).max(1);
        let bucket = now_ms / bucket_ms;
        let mut c = match self.counting.take() {
            Some(c) if c.bucket_ms == bucket_ms => c,
            // Another window (or the exact form): everything counted so far
            // counts as admitted in the newest bucket, which never undercounts.
            other => {
                let carried = other.map_or(self.times.len() as u64, |c| c.counts.iter().map(|n| u64::from(*n)).sum());
                let newest = self.times.last().map_or(bucket, |t| (t / bucket_ms).max(bucket));
                let mut fresh = Counting::new(bucket_ms, newest);
                if let Some(slot) = fresh.slot(newest) {
                    *slot = u32::try_from(carried).unwrap_or(u32::MAX);
                }
                self.times.clear();
                fresh
            }
        };
        // A clock that steps back counts into the newest bucket.
        c.advance(bucket);
        let at = bucket.max(c.newest);
        let (count, _) = c.count(now_ms, window_ms);
        let allowed = count < u64::from(limit);
        if allowed {
            if let Some(slot) = c.slot(at) {
                *slot = slot.saturating_add(1);
            }
        }
        let (_, oldest) = c.count(now_ms, window_ms);
        let reset_ms = oldest.map_or(window_ms, |b| {
            b.saturating_add(1).saturating_mul(bucket_ms).saturating_add(window_ms).saturating_sub(now_ms)
        });
        let remaining = if allowed { u64::from(limit).saturating_sub(count + 1) } else { 0 };
        self.counting = Some(c);
        Decision { allowed, remaining: u32::try_from(remaining).unwrap_or(u32::MAX), reset_ms }
    }

    /// The exact sliding log: a request at `t` counts while `now - t < window`.
    fn decide_exact(&mut self, now_ms: u64, limit: u32, window_ms: u64) -> Decision {
        let cutoff = now_ms.saturating_sub(window_ms);
        // Keep t > now - window; when now < window nothing can be that old.
        let keep_from = if now_ms >= window_ms { self.times.partition_point(|t| *t <= cutoff) } else { 0 };
        self.times.drain(..keep_from);
        // Bounded whatever was stored: only the newest `limit` can matter.
        if self.times.len() > limit as usize {
            let excess = self.times.len() - limit as usize;
            self.times.drain(..excess);
        }
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

/// The counting form as a log for a small limit: each bucket's admissions
/// at the bucket's end (never earlier than they were), the newest `limit`.
fn log_of(c: &Counting, limit: u32) -> Vec<u64> {
    let mut times = Vec::new();
    let first = c.newest.saturating_sub(SLOTS as u64 - 1);
    for b in (first..=c.newest).rev() {
        let n = c.counts.get(usize::try_from(b % SLOTS as u64).unwrap_or(0)).copied().unwrap_or(0);
        let end = b.saturating_add(1).saturating_mul(c.bucket_ms).saturating_sub(1);
        for _ in 0..n.min(limit) {
            if times.len() >= limit as usize {
                break;
            }
            times.push(end);
        }
    }
    times.sort_unstable();
    times
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(all(target_family = "wasm", target_os = "unknown"))]
    use wasm_bindgen_test::wasm_bindgen_test as test;
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
    fn a_huge_limit_stays_small_and_frees_slots_within_a_bucket_of_exact() {
        let window = 60_000;
        let mut bytes = Vec::new();
        for i in 0..5_000u64 {
            let mut w = SlidingWindow::decode(&bytes);
            assert!(w.decide(1_000_000 + i, 1_000_000, window).allowed);
            bytes = w.encode();
            assert_eq!(bytes.len(), COUNTING_BYTES, "bytes grow with the limit");
        }
        // A limit of 100 over the counting form: full at 100, then freed no
        // later than a bucket (3 s) after the exact log would.
        let mut w = SlidingWindow::default();
        for i in 0..100 {
            assert!(w.decide(10_000 + i, 100, window).allowed, "request {i}");
        }
        assert!(!w.decide(20_000, 100, window).allowed);
        let exact_free = 10_000 + window;
        assert!(!w.decide(exact_free - 1, 100, window).allowed);
        assert!(w.decide(exact_free + 3_000, 100, window).allowed, "freed within one bucket of the exact time");
        // Denied answers say when to retry: never before a slot frees.
        let mut w = SlidingWindow::default();
        for i in 0..65 {
            w.decide(5_000 + i, 65, window);
        }
        let d = w.decide(6_000, 65, window);
        assert!(!d.allowed);
        assert!(d.reset_ms >= 5_000 + window - 6_000, "{d:?}");
        assert!(w.decide(6_000 + d.reset_ms, 65, window).allowed);
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

        /// Real clocks are epoch milliseconds (beyond 2^40), and the wasm
        /// build has a 32-bit `usize`: the same arrivals shifted to today's
        /// epoch get exactly the same decisions, in both forms (the exact
        /// log and the counting buckets, whose boundaries are multiples of
        /// the bucket width: the shift is one too), so no time arithmetic
        /// narrows.
        #[test]
        fn decisions_do_not_depend_on_the_epoch(
            limit in prop_oneof![1u32..8, 65u32..80, Just(1_000_000u32)],
            window in prop_oneof![1u64..3_000, Just(60_000u64), Just(3_600_000u64)],
            gaps in proptest::collection::vec(0u64..2_000, 1..120),
        ) {
            const EPOCH_MS: u64 = 1_764_547_200_000; // 2025-12-01, > 2^40
            let bucket_ms = window.div_ceil(BUCKETS);
            let shift = EPOCH_MS - EPOCH_MS % bucket_ms;
            let (mut near, mut far) = (Vec::new(), Vec::new());
            let mut t = 0u64;
            for gap in gaps {
                t += gap;
                let (mut a, mut b) = (SlidingWindow::decode(&near), SlidingWindow::decode(&far));
                let (da, db) = (a.decide(t, limit, window), b.decide(shift + t, limit, window));
                prop_assert_eq!((da.allowed, da.remaining, da.reset_seconds()), (db.allowed, db.remaining, db.reset_seconds()), "at +{}", t);
                near = a.encode();
                far = b.encode();
                prop_assert_eq!(near.len(), far.len());
            }
        }

        /// Large limits (the counting form), the state through shared-data
        /// bytes, the limit and window changing now and then: never more
        /// than the limit admitted in any window, and always the same
        /// number of bytes.
        #[test]
        fn counting_never_admits_over_the_limit(
            limits in proptest::collection::vec(prop_oneof![65u32..90, 1u32..64], 1..4),
            window in 20u64..3_000,
            gaps in proptest::collection::vec(0u64..120, 1..400),
        ) {
            let mut bytes = Vec::new();
            let mut admitted: Vec<(u64, u32)> = Vec::new();
            let mut now = 10_000u64;
            for (i, gap) in gaps.iter().enumerate() {
                now += gap;
                let limit = limits[(i / 100) % limits.len()];
                let mut w = SlidingWindow::decode(&bytes);
                let d = w.decide(now, limit, window);
                bytes = w.encode();
                if limit > EXACT_MAX_LIMIT {
                    prop_assert_eq!(bytes.len(), COUNTING_BYTES);
                } else {
                    prop_assert!(bytes.len() <= limit as usize * 8);
                }
                if d.allowed {
                    admitted.push((now, limit));
                    let in_window = admitted.iter().filter(|(t, _)| *t + window > now && *t <= now).count();
                    prop_assert!(in_window as u32 <= limit, "{} admitted in one window at {} (limit {})", in_window, now, limit);
                }
            }
        }

        /// A host clock that steps back: no panic, still bounded (whether a
        /// window was kept cannot be judged on a clock that moved back).
        #[test]
        fn a_clock_stepping_back_stays_bounded(
            limit in prop_oneof![1u32..64, 65u32..2_000_000],
            steps in proptest::collection::vec(-200i64..200, 1..200),
        ) {
            let mut bytes = Vec::new();
            let mut now = 100_000i64;
            for step in steps {
                now = (now + step).max(0);
                let mut w = SlidingWindow::decode(&bytes);
                let _ = w.decide(now as u64, limit, 1_000);
                bytes = w.encode();
                prop_assert!(bytes.len() <= COUNTING_BYTES.max(EXACT_MAX_LIMIT as usize * 8));
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
