//! The rate limiter's counters (decisions, errors, Redis round-trip time),
//! kept in atomics and rendered as Prometheus text on the internal
//! listener's `/metrics`.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds (seconds) of the Redis latency histogram.
const BUCKETS: [f64; 10] = [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 1.0];

#[derive(Debug, Default)]
pub struct RateLimitMetrics {
    allowed: AtomicU64,
    over_limit: AtomicU64,
    /// Requests the service refused as malformed (INVALID_ARGUMENT).
    invalid: AtomicU64,
    /// Decisions the store could not make (UNAVAILABLE).
    unavailable: AtomicU64,
    redis_buckets: [AtomicU64; BUCKETS.len()],
    redis_count: AtomicU64,
    redis_sum_us: AtomicU64,
    script_reloads: AtomicU64,
}

impl RateLimitMetrics {
    pub fn decided(&self, allowed: bool) {
        let c = if allowed { &self.allowed } else { &self.over_limit };
        c.fetch_add(1, Ordering::Relaxed);
    }

    pub fn invalid(&self) {
        self.invalid.fetch_add(1, Ordering::Relaxed);
    }

    pub fn unavailable(&self) {
        self.unavailable.fetch_add(1, Ordering::Relaxed);
    }

    pub fn script_reloaded(&self) {
        self.script_reloads.fetch_add(1, Ordering::Relaxed);
    }

    /// Records one Redis round trip (successful or not).
    pub fn redis_round_trip(&self, took: Duration) {
        let secs = took.as_secs_f64();
        for (bound, bucket) in BUCKETS.iter().zip(&self.redis_buckets) {
            if secs <= *bound {
                bucket.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.redis_count.fetch_add(1, Ordering::Relaxed);
        self.redis_sum_us.fetch_add(u64::try_from(took.as_micros()).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    /// Allowed and over-limit decisions so far.
    pub fn decisions(&self) -> (u64, u64) {
        (self.allowed.load(Ordering::Relaxed), self.over_limit.load(Ordering::Relaxed))
    }

    /// Appends the Prometheus text exposition of these metrics.
    pub fn render(&self, out: &mut String) {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let _ = writeln!(out, "# HELP mcp_ratelimit_decisions_total Rate-limit decisions answered, by result.");
        let _ = writeln!(out, "# TYPE mcp_ratelimit_decisions_total counter");
        let _ = writeln!(out, "mcp_ratelimit_decisions_total{{result=\"ok\"}} {}", get(&self.allowed));
        let _ = writeln!(out, "mcp_ratelimit_decisions_total{{result=\"over_limit\"}} {}", get(&self.over_limit));
        let _ = writeln!(out, "# HELP mcp_ratelimit_errors_total Rate-limit requests answered with a gRPC error, by kind.");
        let _ = writeln!(out, "# TYPE mcp_ratelimit_errors_total counter");
        let _ = writeln!(out, "mcp_ratelimit_errors_total{{kind=\"invalid_argument\"}} {}", get(&self.invalid));
        let _ = writeln!(out, "mcp_ratelimit_errors_total{{kind=\"unavailable\"}} {}", get(&self.unavailable));
        let _ = writeln!(out, "# HELP mcp_ratelimit_script_reloads_total Lua script reloads after NOSCRIPT.");
        let _ = writeln!(out, "# TYPE mcp_ratelimit_script_reloads_total counter");
        let _ = writeln!(out, "mcp_ratelimit_script_reloads_total {}", get(&self.script_reloads));
        let _ = writeln!(out, "# HELP mcp_ratelimit_redis_seconds Redis round-trip time of one decision.");
        let _ = writeln!(out, "# TYPE mcp_ratelimit_redis_seconds histogram");
        for (bound, bucket) in BUCKETS.iter().zip(&self.redis_buckets) {
            let _ = writeln!(out, "mcp_ratelimit_redis_seconds_bucket{{le=\"{bound}\"}} {}", get(bucket));
        }
        let count = get(&self.redis_count);
        let _ = writeln!(out, "mcp_ratelimit_redis_seconds_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(out, "mcp_ratelimit_redis_seconds_sum {}", get(&self.redis_sum_us) as f64 / 1e6);
        let _ = writeln!(out, "mcp_ratelimit_redis_seconds_count {count}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_cumulative_buckets() {
        let m = RateLimitMetrics::default();
        m.decided(true);
        m.decided(false);
        m.redis_round_trip(Duration::from_micros(300));
        m.redis_round_trip(Duration::from_millis(2));
        let mut out = String::new();
        m.render(&mut out);
        assert!(out.contains("mcp_ratelimit_decisions_total{result=\"ok\"} 1\n"), "{out}");
        assert!(out.contains("mcp_ratelimit_redis_seconds_bucket{le=\"0.00025\"} 0\n"), "{out}");
        assert!(out.contains("mcp_ratelimit_redis_seconds_bucket{le=\"0.0005\"} 1\n"), "{out}");
        assert!(out.contains("mcp_ratelimit_redis_seconds_bucket{le=\"0.0025\"} 2\n"), "{out}");
        assert!(out.contains("mcp_ratelimit_redis_seconds_count 2\n"), "{out}");
        assert!(out.contains("mcp_ratelimit_redis_seconds_sum 0.0023\n"), "{out}");
    }
}
