//! The per-request context: reads the request head, runs the core pipeline
//! and carries out its decision — pass through, local JSON reply, or a
//! rewritten request with the user's upstream credential.
//!
//! An admitted request pauses on its rate-limit callout ([`crate::limiter`],
//! which also carries the ownership check of its builds and jobs) and is
//! finished by [`finish`] when the answer arrives, or by the root context's
//! watchdog when it does not arrive in time. A failed authentication counts
//! against the client address's local budget (429 past it), and repeated
//! identical denials are coalesced ([`mcp_filter_core::coalesce`]).

use std::cell::RefCell;
use std::rc::Rc;

use mcp_filter_core::audit::{RequestFacts, Verdict};
use mcp_filter_core::coalesce::{Audit, Key, Sample};
use mcp_filter_core::config::PluginConfig;
use mcp_filter_core::denial::{Denial, ErrorCode};
use mcp_filter_core::ownership::{Claim, Ownership};
use mcp_filter_core::pipeline::{self, Admission, Admitted, Forward, RequestHead};
use mcp_filter_core::route::Shaping;
use mcp_filter_core::shaping;
use mcp_filter_core::policy::Policy;
use mcp_filter_core::window::Decision;
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::Action;

use crate::feed::Shared;
use crate::host;
use crate::limiter::{self, LimitKey};
use crate::metrics::Metrics;

pub struct McpRequest {
    context_id: u32,
    shared: Rc<Shared>,
    /// Set when the forwarded route's response must be shaped.
    shaping: Option<ResponseShaping>,
    /// What the request phase decided for the response phase; written by
    /// [`finish`], possibly from the root context.
    plan: Rc<RefCell<ResponsePlan>>,
}

/// The request phase's instructions to the response phase.
#[derive(Default)]
struct ResponsePlan {
    shaping: Option<ResponseShaping>,
    /// `RateLimit-*` headers, once a limit was evaluated.
    ratelimit: Vec<(&'static str, String)>,
}

/// What a decision on a request needs besides the decision.
struct Described {
    request_id: String,
    facts: RequestFacts,
}

/// An admitted request between the rate-limit step and `authorize`.
pub struct HeldRequest {
    pub key: LimitKey,
    admitted: Admitted,
    /// The claim asked of the service: `None` when the path names no build
    /// or job, or this VM confirmed it before.
    asked: Option<Claim>,
    policy: Rc<Policy>,
    config: Rc<PluginConfig>,
    headers: Vec<(String, String)>,
    described: Described,
    plan: Rc<RefCell<ResponsePlan>>,
}

/// State of a response being shaped.
struct ResponseShaping {
    kind: Shaping,
    policy: Rc<Policy>,
    grant: u32,
    max_log_bytes: u64,
    /// Log tail: the upstream's Content-Length (streamed, nothing buffered),
    /// or `None` (buffered and trimmed as it arrives).
    total: Option<u64>,
    /// Log tail: body bytes seen so far.
    seen: u64,
}

impl McpRequest {
    pub fn new(context_id: u32, shared: Rc<Shared>) -> Self {
        Self { context_id, shared, shaping: None, plan: Rc::default() }
    }

    /// Step 4: asks the rate-limit service and pauses; if the callout cannot
    /// even start, the local window decides at once.
    fn rate_limit(&mut self, held: HeldRequest) -> Action {
        let now = host::now_unix_ms();
        match limiter::ask_service(&held.config, &held.key, held.asked.as_ref()) {
            Ok(token) => {
                self.shared.callouts.borrow_mut().hold(self.context_id, token, now, held);
                Action::Pause
            }
            Err(e) => {
                let (decision, ownership) =
                    limiter::degrade(&self.shared.metrics(), &held.key, now, &format!("callout failed: {e:?}"));
                finish(&self.shared, held, decision, ownership, false)
            }
        }
    }

    /// A failed authentication: 401 while the client address has budget,
    /// then 429 until its window frees a slot.
    fn authentication_failed(&self, config: &PluginConfig, denial: Denial) -> Denial {
        let decision = limiter::auth_failure(config, &host::client_address(), host::now_unix_ms());
        if decision.allowed {
            return denial;
        }
        Metrics::inc(self.shared.metrics().auth_failures_limited);
        let mut limited = Denial::new(
            ErrorCode::RateLimited,
            format!(
                "more than {} failed authentications from this address in {} s; retry in {} s",
                config.auth_failure_limit,
                config.auth_failure_window_seconds,
                decision.retry_after()
            ),
        );
        limited.headers.push(("retry-after", decision.retry_after().to_string()));
        limited
    }
}

/// Answers a denial locally; audits it, or counts it into a coalesced row.
fn deny(shared: &Shared, denial: &Denial, described: &Described, remaining: Option<u32>) -> Action {
    let facts = &described.facts;
    let key = Key { address: host::client_address(), reason: denial.code.as_str().to_string(), token_id: facts.token_id.clone() };
    let sample = || Sample {
        method: facts.method.clone(),
        path: facts.path.clone(),
        route: facts.route.clone(),
        project: facts.project.clone(),
        user_id: facts.user_id.clone(),
        status: denial.status(),
    };
    match shared.coalescer.borrow_mut().observe(key, sample, host::now_unix_ms()) {
        Audit::Record => crate::audit::record(facts, Verdict::Deny(denial), remaining),
        Audit::Counted => Metrics::inc(shared.metrics().audit_coalesced),
    }
    Metrics::inc(shared.metrics().requests_denied);
    let body = denial.body(&described.request_id);
    let mut headers: Vec<(&str, &str)> = vec![("content-type", "application/json"), ("cache-control", "no-store")];
    headers.extend(denial.headers.iter().map(|(k, v)| (*k, v.as_str())));
    host::send_response(denial.status(), headers, body.as_bytes());
    Action::Pause
}

fn forward(fwd: &Forward, headers: &[(String, String)], facts: &RequestFacts, ids: (&str, &str), remaining: Option<u32>) -> Action {
    let (token_id, user_id) = ids;
    crate::audit::record(facts, Verdict::Forward, remaining);
    for (name, _) in headers {
        if pipeline::is_stripped_header(name) {
            host::remove_request_header(name);
        }
    }
    host::set_request_header(":method", Some(&fwd.method));
    host::set_request_header(":path", Some(&fwd.path));
    host::set_request_header("authorization", Some(&format!("Bearer {}", fwd.credential)));
    host::set_request_header("x-mcp-token-id", Some(token_id));
    host::set_request_header("x-mcp-user-id", Some(user_id));
    Action::Continue
}

/// Steps 4–7 once the limit is decided, in the request's (effective)
/// context: 429 when over the limit, else `authorize` and forward or deny.
/// `ownership`: the service's verdict on the claim it was asked (Unknown
/// in degraded mode). `resume`: the request is paused and must be resumed
/// after forwarding.
pub fn finish(shared: &Shared, held: HeldRequest, decision: Decision, ownership: Ownership, resume: bool) -> Action {
    let HeldRequest { key, admitted, asked, policy, config, headers, described, plan } = held;
    let metrics = shared.metrics();
    Metrics::inc(if decision.allowed { metrics.ratelimit_allowed } else { metrics.ratelimit_limited });
    let ratelimit = decision.headers(key.limit);
    plan.borrow_mut().ratelimit = ratelimit.clone();
    let remaining = Some(decision.remaining);
    if !decision.allowed {
        let mut denial = Denial::new(
            ErrorCode::RateLimited,
            format!(
                "more than {} {} requests in {} s; retry in {} s",
                key.limit,
                key.class.as_str(),
                key.window_seconds,
                decision.retry_after()
            ),
        );
        denial.headers.extend(ratelimit);
        return deny(shared, &denial, &described, remaining);
    }
    let ownership = match &asked {
        // Nothing to check, or confirmed by this VM before.
        None => Ownership::Confirmed,
        Some(claim) => {
            let mut cache = shared.ownership.borrow_mut();
            match ownership {
                Ownership::Confirmed => {
                    cache.confirm(claim);
                    Ownership::Confirmed
                }
                // Another request may have confirmed it meanwhile.
                Ownership::Unknown if cache.confirms(claim) => Ownership::Confirmed,
                other => other,
            }
        }
    };
    if ownership == Ownership::Refuted {
        Metrics::inc(metrics.ownership_refuted);
    }
    match pipeline::authorize(&admitted, &policy, &config.routes, host::now_unix(), ownership) {
        Ok(fwd) => {
            if fwd.shaping != Shaping::None {
                plan.borrow_mut().shaping = Some(ResponseShaping {
                    kind: fwd.shaping,
                    policy: policy.clone(),
                    grant: admitted.grant,
                    max_log_bytes: config.max_log_bytes,
                    total: None,
                    seen: 0,
                });
            }
            let grant = policy.grant(admitted.grant);
            let token_id = grant.map(|g| g.token_id()).unwrap_or_default();
            let user_id = grant.and_then(|g| policy.user(g.user)).map(|u| &*u.id).unwrap_or_default();
            Metrics::inc(metrics.requests_allowed);
            let action = forward(&fwd, &headers, &described.facts, (token_id, user_id), remaining);
            if resume {
                if let Err(e) = proxy_wasm::hostcalls::resume_http_request() {
                    log::warn!("cannot resume the request: {e:?}");
                }
            }
            action
        }
        Err(mut denial) => {
            denial.headers.extend(ratelimit);
            deny(shared, &denial, &described, remaining)
        }
    }
}

impl Context for McpRequest {
    fn on_grpc_call_response(&mut self, token_id: u32, status_code: u32, response_size: usize) {
        // None: the watchdog decided this request already.
        let Some(held) = self.shared.callouts.borrow_mut().take(self.context_id, token_id) else { return };
        let now = host::now_unix_ms();
        let (decision, ownership) = match limiter::read_answer(status_code, response_size) {
            Ok((Some(decision), ownership)) => (decision, ownership),
            // The service's store failed; it still answered the ownership.
            Ok((None, ownership)) => (limiter::degrade(&self.shared.metrics(), &held.key, now, "the limit store failed").0, ownership),
            Err(why) => limiter::degrade(&self.shared.metrics(), &held.key, now, &why),
        };
        finish(&self.shared, held, decision, ownership, true);
    }
}

impl Drop for McpRequest {
    fn drop(&mut self) {
        if let Ok(mut callouts) = self.shared.callouts.try_borrow_mut() {
            callouts.forget(self.context_id);
        }
    }
}

impl HttpContext for McpRequest {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let headers = host::request_headers();
        let head = RequestHead::new(&headers);
        let request_id = head.values("x-request-id").next().unwrap_or_default().to_string();
        let Some(config) = self.shared.config() else {
            let described = Described { request_id, facts: RequestFacts::default() };
            let denial = Denial::new(ErrorCode::PolicyUnavailable, "the gateway is not configured");
            return deny(&self.shared, &denial, &described, None);
        };
        let policy = self.shared.policy();
        let admission = pipeline::admit(&head, policy.as_deref(), &config, host::now_unix());
        if admission == Admission::PassThrough {
            return Action::Continue;
        }
        let facts = RequestFacts::describe(&head, policy.as_deref(), &config.routes, head.on_infrabox(&config));
        let described = Described { request_id, facts };
        match admission {
            Admission::PassThrough => Action::Continue,
            Admission::Deny(d) if d.code == ErrorCode::InvalidToken => {
                let d = self.authentication_failed(&config, d);
                deny(&self.shared, &d, &described, None)
            }
            Admission::Deny(d) => deny(&self.shared, &d, &described, None),
            Admission::Admitted(admitted) => {
                // admit() only admits with a policy present.
                let Some(policy) = policy else { return Action::Continue };
                let Some(key) = LimitKey::of(&admitted, &policy, &config.routes) else {
                    let d = Denial::new(ErrorCode::InvalidToken, "unknown or revoked token");
                    return deny(&self.shared, &d, &described, None);
                };
                let asked = admitted.claim.clone().filter(|c| !self.shared.ownership.borrow_mut().confirms(c));
                let held = HeldRequest { key, admitted, asked, policy, config, headers, described, plan: self.plan.clone() };
                self.rate_limit(held)
            }
        }
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        let plan = std::mem::take(&mut *self.plan.borrow_mut());
        for (name, value) in &plan.ratelimit {
            host::set_response_header(name, Some(value));
        }
        if plan.shaping.is_some() {
            self.shaping = plan.shaping;
        }
        let Some(sh) = self.shaping.as_mut() else { return Action::Continue };
        let ok = host::response_header(":status").as_deref() == Some("200");
        if !ok || end_of_stream {
            self.shaping = None;
            return Action::Continue;
        }
        // Envoy's proxy-wasm host turns a paused header callback into
        // StopAllIteration, so the body would never arrive: the headers go
        // on now and everything about the shaped body is decided here.
        let length = host::response_header("content-length").and_then(|v| v.trim().parse::<u64>().ok());
        match sh.kind {
            Shaping::LogTail => {
                host::set_response_header("x-mcp-log-max-bytes", Some(&sh.max_log_bytes.to_string()));
                match length {
                    Some(n) => {
                        let truncated = n > sh.max_log_bytes;
                        host::set_response_header("x-mcp-log-truncated", Some(if truncated { "true" } else { "false" }));
                        host::set_response_header("x-mcp-log-original-length", Some(&n.to_string()));
                        if !truncated {
                            self.shaping = None;
                            return Action::Continue;
                        }
                        host::set_response_header("content-length", Some(&sh.max_log_bytes.to_string()));
                        sh.total = Some(n);
                    }
                    None => {
                        // A streamed console of unknown length: its tail is
                        // still cut to max_log_bytes.
                        host::set_response_header("x-mcp-log-truncated", Some("unknown"));
                        host::set_response_header("content-length", None);
                    }
                }
            }
            Shaping::ProjectList => host::set_response_header("content-length", None),
            Shaping::None => {}
        }
        Action::Continue
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        let Some(sh) = self.shaping.as_mut() else { return Action::Continue };
        match sh.kind {
            Shaping::LogTail if sh.total.is_some() => {
                let total = sh.total.unwrap_or_default();
                let drop = shaping::tail_drop(total, sh.max_log_bytes, sh.seen, body_size);
                sh.seen += body_size as u64;
                if drop > 0 {
                    host::set_response_body(0, drop, b"");
                }
                if !end_of_stream {
                    return Action::Continue;
                }
            }
            Shaping::LogTail => {
                let excess = shaping::tail_excess(body_size, sh.max_log_bytes);
                if excess > 0 {
                    host::set_response_body(0, excess, b"");
                }
                if !end_of_stream {
                    return Action::Pause;
                }
            }
            Shaping::ProjectList => {
                if !end_of_stream {
                    return Action::Pause;
                }
                let body = host::response_body(body_size).unwrap_or_default();
                let policy = &sh.policy;
                let now = host::now_unix();
                let shaped = policy.grant(sh.grant).map(|g| {
                    let scope: Vec<&str> = policy.projects_in_scope(g, now).collect();
                    shaping::filter_project_list(&body, |id| scope.contains(&id))
                });
                let out = match shaped {
                    Some(Ok(out)) => out,
                    Some(Err(e)) => {
                        // The status is already on its way; fail closed on
                        // the content: an empty list, never an unfiltered one.
                        log::warn!("cannot filter the project list, answering an empty list: {e}");
                        b"[]".to_vec()
                    }
                    None => b"[]".to_vec(),
                };
                host::set_response_body(0, body_size, &out);
            }
            Shaping::None => {}
        }
        self.shaping = None;
        Action::Continue
    }
}
