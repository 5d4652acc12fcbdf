//! `envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit`: a thin
//! shell that reads the filter's request (domain `infrabox-mcp`), decides
//! every descriptor independently and answers one status per descriptor,
//! in order:
//!
//! - a **limit** descriptor `[("user", id), ("class", class)]` (optional
//!   `("window_seconds", n)`) with a `limit` override, asked of the
//!   [`WindowStore`] (the limit travels with each request; the service
//!   holds no limit configuration). The first descriptor is always one;
//! - an **ownership** descriptor `[("project", p), ("build", b)?,
//!   ("job", j)?]` ([`mcp_filter_core::rls`]), asked of the
//!   [`OwnershipLookup`]: `OK` when the ids belong to the project,
//!   `OVER_LIMIT` when they do not (or do not exist), `UNKNOWN` when the
//!   lookup failed.
//!
//! The decisions of one call run concurrently. Errors are gRPC statuses: a
//! malformed request is `INVALID_ARGUMENT`, a store failure `UNAVAILABLE`
//! (the filter then decides locally). The caller's credential is checked
//! by the interceptor ([`crate::internal_auth`]) before any of this.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::rate_limit::Unit;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::{Code, DescriptorStatus, RateLimit};
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_server::{
    RateLimitService, RateLimitServiceServer,
};
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use envoy_types::pb::google::protobuf::Duration as ProtoDuration;
use mcp_filter_core::rls;
use tonic::{Request, Response, Status};
use uuid::Uuid;

use super::metrics::RateLimitMetrics;
use super::store::{Decision, Limit, WindowKey, WindowStore};
use crate::ownership::{OwnershipClaim, OwnershipLookup};

/// Most descriptors one call may carry.
pub const MAX_DESCRIPTORS: usize = 64;

/// The gRPC service over a store and an ownership lookup.
pub struct RateLimitGrpc<S, O> {
    store: S,
    ownership: O,
    metrics: Arc<RateLimitMetrics>,
    /// Unix second of the last store-failure warning (one per second at most).
    last_warning: AtomicU64,
}

impl<S: WindowStore, O: OwnershipLookup> RateLimitGrpc<S, O> {
    pub fn new(store: S, ownership: O, metrics: Arc<RateLimitMetrics>) -> Self {
        Self { store, ownership, metrics, last_warning: AtomicU64::new(0) }
    }

    /// The tonic service to add to the gRPC listener.
    pub fn into_server(self) -> RateLimitServiceServer<Self> {
        RateLimitServiceServer::new(self)
    }

    fn warn_once_a_second(&self, what: &str, error: &dyn std::fmt::Display) {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        if self.last_warning.swap(now, Ordering::Relaxed) != now {
            tracing::warn!(%error, "{what}");
        }
    }

    /// One descriptor's status; `Err` when its store failed.
    async fn decide(&self, ask: &Ask) -> Result<DescriptorStatus, Status> {
        match ask {
            Ask::Limit(query) => {
                let key = WindowKey { user: &query.user, class: &query.class };
                match self.store.admit(&key, query.limit).await {
                    Ok(d) => {
                        self.metrics.decided(d.allowed);
                        Ok(limit_status(query, &d))
                    }
                    Err(e) => {
                        self.metrics.unavailable();
                        self.warn_once_a_second("rate-limit decision failed (counted in mcp_ratelimit_errors_total)", &e);
                        Err(Status::unavailable("the rate-limit store is unavailable"))
                    }
                }
            }
            Ask::Ownership(claim) => {
                let code = match self.ownership.check(*claim).await {
                    Ok(true) => Code::Ok,
                    Ok(false) => Code::OverLimit,
                    Err(e) => {
                        self.warn_once_a_second("ownership check failed (counted in mcp_ownership_checks_total)", &e);
                        Code::Unknown
                    }
                };
                Ok(DescriptorStatus { code: code as i32, ..Default::default() })
            }
        }
    }
}

/// One validated limit descriptor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    pub user: String,
    pub class: String,
    pub limit: Limit,
    /// The override as sent, echoed in `current_limit`.
    pub requests_per_unit: u32,
    pub unit: i32,
}

/// One decision a call asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ask {
    Limit(Query),
    Ownership(OwnershipClaim),
}

/// Reads and validates the filter's request: one [`Ask`] per descriptor,
/// the first a limit.
pub fn parse(req: &RateLimitRequest) -> Result<Vec<Ask>, &'static str> {
    if req.domain != rls::DOMAIN {
        return Err("unknown domain");
    }
    if req.hits_addend > 1 {
        return Err("hits_addend above 1 is not supported");
    }
    if req.descriptors.is_empty() || req.descriptors.len() > MAX_DESCRIPTORS {
        return Err("between 1 and 64 descriptors are expected");
    }
    let asks = req.descriptors.iter().map(parse_descriptor).collect::<Result<Vec<_>, _>>()?;
    if !matches!(asks.first(), Some(Ask::Limit(_))) {
        return Err("the first descriptor must be a limit");
    }
    Ok(asks)
}

fn parse_descriptor(descriptor: &RateLimitDescriptor) -> Result<Ask, &'static str> {
    if descriptor.hits_addend.as_ref().is_some_and(|h| h.value > 1) {
        return Err("hits_addend above 1 is not supported");
    }
    if descriptor.entries.first().is_some_and(|e| e.key == rls::OWNERSHIP_PROJECT) {
        return parse_ownership(descriptor).map(Ask::Ownership);
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
    Ok(Ask::Limit(Query {
        user: user.to_string(),
        class: class.to_string(),
        limit: Limit { requests: over.requests_per_unit, window: Duration::from_secs(u64::from(window_seconds)) },
        requests_per_unit: over.requests_per_unit,
        unit: over.unit,
    }))
}

/// `[("project", p), ("build", b)?, ("job", j)?]`, lowercase UUIDs, each
/// key at most once, a build or a job at least.
fn parse_ownership(descriptor: &RateLimitDescriptor) -> Result<OwnershipClaim, &'static str> {
    if descriptor.limit.is_some() {
        return Err("an ownership descriptor has no limit");
    }
    let (mut project, mut build, mut job) = (None, None, None);
    for entry in &descriptor.entries {
        let slot = match entry.key.as_str() {
            rls::OWNERSHIP_PROJECT => &mut project,
            rls::OWNERSHIP_BUILD => &mut build,
            rls::OWNERSHIP_JOB => &mut job,
            _ => return Err("unknown ownership entry"),
        };
        if !mcp_filter_core::path::is_uuid(&entry.value) {
            return Err("ownership ids must be lowercase UUIDs");
        }
        let id = Uuid::parse_str(&entry.value).map_err(|_| "ownership ids must be lowercase UUIDs")?;
        if slot.replace(id).is_some() {
            return Err("repeated ownership entry");
        }
    }
    let project = project.ok_or("ownership descriptor has no project")?;
    if build.is_none() && job.is_none() {
        return Err("ownership descriptor names no build or job");
    }
    Ok(OwnershipClaim { project, build, job })
}

/// The status of one limit decision. `duration_until_reset` is rounded up
/// to whole milliseconds, so a client reading milliseconds never resets early.
pub fn limit_status(query: &Query, d: &Decision) -> DescriptorStatus {
    let code = if d.allowed { Code::Ok } else { Code::OverLimit } as i32;
    let reset_ms = u64::try_from(d.reset.as_nanos().div_ceil(1_000_000)).unwrap_or(u64::MAX);
    let reset = ProtoDuration {
        seconds: i64::try_from(reset_ms / 1000).unwrap_or(i64::MAX),
        nanos: i32::try_from((reset_ms % 1000) * 1_000_000).unwrap_or(0),
    };
    DescriptorStatus {
        code,
        current_limit: Some(RateLimit {
            name: format!("{}/{}s", query.class, query.limit.window.as_secs()),
            requests_per_unit: query.requests_per_unit,
            unit: Unit::try_from(query.unit).unwrap_or(Unit::Unknown) as i32,
        }),
        limit_remaining: d.remaining,
        duration_until_reset: Some(reset),
        ..Default::default()
    }
}

/// The response for these statuses: `OVER_LIMIT` overall when any is.
pub fn respond(statuses: Vec<DescriptorStatus>) -> RateLimitResponse {
    let over = statuses.iter().any(|s| s.code == Code::OverLimit as i32);
    RateLimitResponse {
        overall_code: if over { Code::OverLimit } else { Code::Ok } as i32,
        statuses,
        ..Default::default()
    }
}

#[tonic::async_trait]
impl<S: WindowStore, O: OwnershipLookup> RateLimitService for RateLimitGrpc<S, O> {
    async fn should_rate_limit(&self, request: Request<RateLimitRequest>) -> Result<Response<RateLimitResponse>, Status> {
        let asks = parse(request.get_ref()).map_err(|why| {
            self.metrics.invalid();
            Status::invalid_argument(why)
        })?;
        let results = match asks.as_slice() {
            // The usual call: one limit, or a limit and one ownership claim.
            [one] => vec![self.decide(one).await],
            [a, b] => {
                let (a, b) = tokio::join!(self.decide(a), self.decide(b));
                vec![a, b]
            }
            many => {
                let mut out = Vec::with_capacity(many.len());
                for ask in many {
                    out.push(self.decide(ask).await);
                }
                out
            }
        };
        // A failed decision is UNKNOWN; only when nothing could be decided
        // is the whole call UNAVAILABLE (the filter then decides locally).
        if let Some(Err(e)) = results.iter().find(|r| r.is_err()).filter(|_| results.iter().all(Result::is_err)) {
            return Err(e.clone());
        }
        let statuses = results
            .into_iter()
            .map(|r| r.unwrap_or_else(|_| DescriptorStatus { code: Code::Unknown as i32, ..Default::default() }))
            .collect();
        Ok(Response::new(respond(statuses)))
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

    fn limit(asks: &[Ask]) -> Result<&Query, String> {
        match asks.first() {
            Some(Ask::Limit(q)) => Ok(q),
            other => Err(format!("not a limit first: {other:?}")),
        }
    }

    fn one_limit(req: &RateLimitRequest) -> Result<Query, String> {
        let asks = parse(req).map_err(str::to_string)?;
        limit(&asks).cloned()
    }

    #[test]
    fn reads_what_the_filter_encodes() -> TestResult {
        for (window, expect) in [(60, 60), (5, 5), (1, 1), (3600, 3600)] {
            let bytes = rls::encode_request("u-1", "log", 10, window, None);
            let req = RateLimitRequest::decode(bytes.as_slice())?;
            let q = one_limit(&req)?;
            assert_eq!((q.user.as_str(), q.class.as_str()), ("u-1", "log"));
            assert_eq!(q.limit, Limit { requests: 10, window: Duration::from_secs(expect) });
        }
        let p = Uuid::new_v4();
        let j = Uuid::new_v4();
        let claim = mcp_filter_core::ownership::Claim { project: p.to_string(), build: None, job: Some(j.to_string()) };
        let req = RateLimitRequest::decode(rls::encode_request("u-1", "log", 10, 60, Some(&claim)).as_slice())?;
        let asks = parse(&req)?;
        assert_eq!(asks.get(1), Some(&Ask::Ownership(OwnershipClaim { project: p, build: None, job: Some(j) })));
        Ok(())
    }

    #[test]
    fn refuses_malformed_ownership_descriptors() {
        let ok = [("user", "u"), ("class", "log")];
        let p = "0b7a4c2e-1f3d-4c5b-9a8e-7d6c5b4a3f21";
        let j = "1b7a4c2e-1f3d-4c5b-9a8e-7d6c5b4a3f21";
        let with = |entries: &[(&str, &str)]| {
            let mut r = request(&ok, Some((5, Unit::Minute as i32)));
            r.descriptors.push(RateLimitDescriptor {
                entries: entries.iter().map(|(k, v)| Entry { key: k.to_string(), value: v.to_string() }).collect(),
                ..Default::default()
            });
            r
        };
        assert!(parse(&with(&[("project", p), ("job", j)])).is_ok());
        assert!(parse(&with(&[("project", p), ("build", j), ("job", j)])).is_ok());
        for bad in [
            vec![("project", p)],
            vec![("project", p), ("job", &j.to_uppercase())],
            vec![("project", "not-a-uuid"), ("job", j)],
            vec![("project", p), ("job", j), ("job", j)],
            vec![("project", p), ("x", j)],
        ] {
            assert!(parse(&with(&bad)).is_err(), "{bad:?}");
        }
        // Ownership alone, without the limit first, is refused.
        let mut r = with(&[("project", p), ("job", j)]);
        r.descriptors.remove(0);
        assert!(parse(&r).is_err());
    }

    #[test]
    fn refuses_malformed_requests() {
        use std::result::Result as R;
        let parse = |r: &RateLimitRequest| -> R<Query, String> { one_limit(r) };
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
        use mcp_filter_core::ownership::Ownership;
        let q = one_limit(&request(&[("user", "u"), ("class", "log")], Some((10, 2))))?;
        let d = Decision { allowed: false, remaining: 0, reset: Duration::from_micros(2_500_001), at_us: 0 };
        let resp = respond(vec![limit_status(&q, &d)]);
        assert_eq!(resp.overall_code, Code::OverLimit as i32);
        let a = rls::decode_response(&resp.encode_to_vec())?;
        assert_eq!(a.limit, Some(rls::Verdict { over_limit: true, remaining: 0, reset_ms: 2501 }));
        let d = Decision { allowed: true, remaining: 7, reset: Duration::from_millis(60_000), at_us: 0 };
        let a = rls::decode_response(&respond(vec![limit_status(&q, &d)]).encode_to_vec())?;
        assert_eq!(a.limit, Some(rls::Verdict { over_limit: false, remaining: 7, reset_ms: 60_000 }));
        // A refuted ownership makes the call OVER_LIMIT overall, not the limit.
        let not_owned = DescriptorStatus { code: Code::OverLimit as i32, ..Default::default() };
        let resp = respond(vec![limit_status(&q, &d), not_owned]);
        assert_eq!(resp.overall_code, Code::OverLimit as i32);
        let a = rls::decode_response(&resp.encode_to_vec())?;
        assert_eq!((a.limit.map(|l| l.over_limit), a.ownership), (Some(false), Ownership::Refuted));
        let unknown = DescriptorStatus { code: Code::Unknown as i32, ..Default::default() };
        let resp = respond(vec![limit_status(&q, &d), unknown.clone()]);
        assert_eq!(resp.overall_code, Code::Ok as i32);
        assert_eq!(rls::decode_response(&resp.encode_to_vec())?.ownership, Ownership::Unknown);
        // The store failed, the ownership was answered: the filter decides
        // the limit locally and keeps the verdict.
        let owned = DescriptorStatus { code: Code::Ok as i32, ..Default::default() };
        let a = rls::decode_response(&respond(vec![unknown, owned]).encode_to_vec())?;
        assert_eq!((a.limit, a.ownership), (None, Ownership::Confirmed));
        Ok(())
    }
}
