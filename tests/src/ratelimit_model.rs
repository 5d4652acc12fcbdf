//! The reference model of the limiter (DESIGN §9): every admission time,
//! scanned in full — what the Redis script must decide, on one Redis or a
//! cluster.

/// Admission times in µs.
#[derive(Debug, Default)]
pub struct SlidingLog {
    admitted: Vec<u64>,
}

impl SlidingLog {
    /// (allowed, remaining, µs until the oldest counted request leaves).
    pub fn decide(&mut self, now: u64, limit: u32, window: u64) -> (bool, u32, u64) {
        let live: Vec<u64> = self.admitted.iter().copied().filter(|t| now.saturating_sub(window) < *t).collect();
        let allowed = live.len() < limit as usize;
        let mut counted = live.clone();
        if allowed {
            self.admitted.push(now);
            counted.push(now);
        }
        let reset = counted.iter().min().map(|oldest| oldest + window - now).unwrap_or(window);
        (allowed, if allowed { limit - live.len() as u32 - 1 } else { 0 }, reset)
    }
}
