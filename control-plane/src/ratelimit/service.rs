//! `envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit`: a thin
//! shell that reads the filter's request (domain `infrabox-mcp`, one
//! descriptor `[("user", id), ("class", class)]`, optional
//! `("window_seconds", n)`, and the `limit` override), asks the
//! [`WindowStore`] and answers in the RLS protocol. It holds no limit
//! configuration: the limit travels with each request.
//!
//! Errors are gRPC statuses: a malformed request is `INVALID_ARGUMENT`, a
//! store failure is `UNAVAILABLE` (the filter then decides locally).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::rate_limit::Unit;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::{Code, DescriptorStatus, RateLimit};
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_server::{
    RateLimitService, RateLimitServiceServer,
};
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use envoy_types::pb::google::protobuf::Duration as ProtoDuration;
use mcp_filter_core::rls;
use tonic::{Request, Response, Status};

use super::metrics::RateLimitMetrics;
use super::store::{Decision, Limit, WindowKey, WindowStore};

/// The gRPC service over a store.
pub struct RateLimitGrpc<S> {
    store: S,
    metrics: Arc<RateLimitMetrics>,
    /// Unix second of the last store-failure warning (one per second at most).
    last_warning: AtomicU64,
}

impl<S: WindowStore> RateLimitGrpc<S> {
    pub fn new(store: S, metrics: Arc<RateLimitMetrics>) -> Self {
        Self { store, metrics, last_warning: AtomicU64::new(0) }
    }

    /// The tonic service to add to the gRPC listener.
    pub fn into_server(self) -> RateLimitServiceServer<Self> {
        RateLimitServiceServer::new(self)
    }
}

/// A validated `ShouldRateLimit` request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    pub user: String,
    pub class: String,
    pub limit: Limit,
    /// The override as sent, echoed in `current_limit`.
    pub requests_per_unit: u32,
    pub unit: i32,
}

/// Reads and validates the filter's request.
pub fn parse(req: &RateLimitRequest) -> Result<Query, &'static str> {
    if req.domain != rls::DOMAIN {
        return Err("unknown domain");
    }
    if req.hits_addend > 1 {
        return Err("hits_addend above 1 is not supported");
    }
    let [descriptor] = req.descriptors.as_slice() else {
        return Err("exactly one descriptor is expected");
    };
    if descriptor.hits_addend.as_ref().is_some_and(|h| h.value > 1) {
        return Err("hits_addend above 1 is not supported");
    }
    let (mut user, mut class, mut window_seconds) = (None, None, None);
    for entry in &descriptor.entries {
        let slot = match entry.key.as_str() {
            "user" => &mut user,
            "class" => &mut class,
            "window_seconds" => &mut window_seconds,
            _ => return Err("unknown descriptor entry"),
        };
        if slot.replace(entry.value.as_str()).is_some() {
            return Err("repeated descriptor entry");
        }
    }
    let user = user.ok_or("descriptor has no user")?;
    if user.is_empty() || user.len() > 256 || user.chars().any(|c| c.is_control() || c == '{' || c == '}') {
        return Err("user must be 1-256 characters without braces or control characters");
    }
    let class = class.ok_or("descriptor has no class")?;
    if class.is_empty() || class.len() > 32 || !class.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_') {
        return Err("class must be 1-32 characters of [a-z0-9_]");
    }
    let over = descriptor.limit.as_ref().ok_or("descriptor has no limit override")?;
    let unit = u64::try_from(over.unit).map_err(|_| "unknown limit unit")?;
    let unit_seconds = rls::window_for_unit(unit).ok_or("unknown limit unit")?;
    let window_seconds = match window_seconds {
        None => unit_seconds,
        Some(v) => match v.parse::<u32>() {
            Ok(n) if (1..=86_400).contains(&n) => n,
            _ => return Err("window_seconds must be an integer between 1 and 86400"),
        },
    };
    Ok(Query {
        user: user.to_string(),
        class: class.to_string(),
        limit: Limit { requests: over.requests_per_unit, window: Duration::from_secs(u64::from(window_seconds)) },
        requests_per_unit: over.requests_per_unit,
        unit: over.unit,
    })
}

/// The RLS answer for one decision. `duration_until_reset` is rounded up
/// to whole milliseconds, so a client reading milliseconds never resets early.
pub fn respond(query: &Query, d: &Decision) -> RateLimitResponse {
    let code = if d.allowed { Code::Ok } else { Code::OverLimit } as i32;
    let reset_ms = u64::try_from(d.reset.as_nanos().div_ceil(1_000_000)).unwrap_or(u64::MAX);
    let reset = ProtoDuration {
        seconds: i64::try_from(reset_ms / 1000).unwrap_or(i64::MAX),
        nanos: i32::try_from((reset_ms % 1000) * 1_000_000).unwrap_or(0),
    };
    RateLimitResponse {
        overall_code: code,
        statuses: vec![DescriptorStatus {
            code,
            current_limit: Some(RateLimit {
                name: format!("{}/{}s", query.class, query.limit.window.as_secs()),
                requests_per_unit: query.requests_per_unit,
                unit: Unit::try_from(query.unit).unwrap_or(Unit::Unknown) as i32,
            }),
            limit_remaining: d.remaining,
            duration_until_reset: Some(reset),
            ..Default::default()
        }],
        ..Default::default()
    }
}

#[tonic::async_trait]
impl<S: WindowStore> RateLimitService for RateLimitGrpc<S> {
    async fn should_rate_limit(&self, request: Request<RateLimitRequest>) -> Result<Response<RateLimitResponse>, Status> {
        let query = parse(request.get_ref()).map_err(|why| {
            self.metrics.invalid();
            Status::invalid_argument(why)
        })?;
        let key = WindowKey { user: &query.user, class: &query.class };
        match self.store.admit(&key, query.limit).await {
            Ok(d) => {
                self.metrics.decided(d.allowed);
                Ok(Response::new(respond(&query, &d)))
            }
            Err(e) => {
                self.metrics.unavailable();
                let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
                if self.last_warning.swap(now, Ordering::Relaxed) != now {
                    tracing::warn!(error = %e, "rate-limit decision failed (counted in mcp_ratelimit_errors_total)");
                }
                Err(Status::unavailable("the rate-limit store is unavailable"))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::{Entry, RateLimitOverride};
    use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
    use prost::Message;

    use super::*;

    fn request(entries: &[(&str, &str)], limit: Option<(u32, i32)>) -> RateLimitRequest {
        RateLimitRequest {
            domain: rls::DOMAIN.into(),
            descriptors: vec![RateLimitDescriptor {
                entries: entries.iter().map(|(k, v)| Entry { key: k.to_string(), value: v.to_string() }).collect(),
                limit: limit.map(|(requests_per_unit, unit)| RateLimitOverride { requests_per_unit, unit }),
                ..Default::default()
            }],
            hits_addend: 1,
        }
    }

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    #[test]
    fn reads_what_the_filter_encodes() -> TestResult {
        for (window, expect) in [(60, 60), (5, 5), (1, 1), (3600, 3600)] {
            let bytes = rls::encode_request("u-1", "log", 10, window);
            let req = RateLimitRequest::decode(bytes.as_slice())?;
            let q = parse(&req)?;
            assert_eq!((q.user.as_str(), q.class.as_str()), ("u-1", "log"));
            assert_eq!(q.limit, Limit { requests: 10, window: Duration::from_secs(expect) });
        }
        Ok(())
    }

    #[test]
    fn refuses_malformed_requests() {
        let ok = [("user", "u"), ("class", "log")];
        assert!(parse(&request(&ok, Some((5, Unit::Minute as i32)))).is_ok());
        assert!(parse(&request(&ok, None)).is_err());
        assert!(parse(&request(&ok, Some((5, 0)))).is_err());
        assert!(parse(&request(&[("user", "u")], Some((5, 2)))).is_err());
        assert!(parse(&request(&[("user", "u"), ("class", "log"), ("user", "v")], Some((5, 2)))).is_err());
        assert!(parse(&request(&[("user", "a}b"), ("class", "log")], Some((5, 2)))).is_err());
        assert!(parse(&request(&[("user", "u"), ("class", "Log")], Some((5, 2)))).is_err());
        assert!(parse(&request(&[("user", "u"), ("class", "log"), ("window_seconds", "0")], Some((5, 1)))).is_err());
        assert!(parse(&request(&[("user", "u"), ("class", "log"), ("x", "1")], Some((5, 1)))).is_err());
        let mut r = request(&ok, Some((5, 2)));
        r.domain = "other".into();
        assert!(parse(&r).is_err());
        let mut r = request(&ok, Some((5, 2)));
        r.hits_addend = 3;
        assert!(parse(&r).is_err());
        r.descriptors.clear();
        r.hits_addend = 0;
        assert!(parse(&r).is_err());
    }

    #[test]
    fn answers_in_the_rls_protocol_the_filter_reads() -> TestResult {
        let q = parse(&request(&[("user", "u"), ("class", "log")], Some((10, 2))))?;
        let d = Decision { allowed: false, remaining: 0, reset: Duration::from_micros(2_500_001), at_us: 0 };
        let resp = respond(&q, &d);
        assert_eq!(resp.overall_code, Code::OverLimit as i32);
        let v = rls::decode_response(&resp.encode_to_vec());
        assert_eq!(v, Ok(rls::Verdict { over_limit: true, remaining: 0, reset_ms: 2501 }));
        let d = Decision { allowed: true, remaining: 7, reset: Duration::from_millis(60_000), at_us: 0 };
        let v = rls::decode_response(&respond(&q, &d).encode_to_vec());
        assert_eq!(v, Ok(rls::Verdict { over_limit: false, remaining: 7, reset_ms: 60_000 }));
        Ok(())
    }
}
