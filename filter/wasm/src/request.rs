//! The per-request context: reads the request head, runs the core pipeline
//! and carries out its decision — pass through, local JSON reply, or a
//! rewritten request with the user's upstream credential.
//!
//! An admitted request pauses on its rate-limit callout ([`crate::limiter`])
//! and is finished by [`finish`] when the answer arrives, or by the root
//! context's watchdog when it does not arrive in time.

use std::cell::RefCell;
use std::rc::Rc;

use mcp_filter_core::audit::Verdict;
use mcp_filter_core::config::PluginConfig;
use mcp_filter_core::denial::{Denial, ErrorCode};
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

/// Client headers that never reach the upstream on an MCP request (plus
/// every `x-mcp-*`).
const STRIPPED: [&str; 3] = ["authorization", "cookie", "x-original-method"];

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

/// An admitted request between the rate-limit step and `authorize`.
pub struct HeldRequest {
    pub key: LimitKey,
    admitted: Admitted,
    policy: Rc<Policy>,
    config: Rc<PluginConfig>,
    headers: Vec<(String, String)>,
    request_id: String,
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

    fn deny(&self, denial: &Denial, request_id: &str) -> Action {
        deny(&self.shared, denial, request_id, None)
    }

    /// Step 4: asks the rate-limit service and pauses; if the callout cannot
    /// even start, the local window decides at once.
    fn rate_limit(&mut self, held: HeldRequest) -> Action {
        let now = host::now_unix_ms();
        match limiter::ask_service(&held.config, &held.key) {
            Ok(token) => {
                self.shared.callouts.borrow_mut().hold(self.context_id, token, now, held);
                Action::Pause
            }
            Err(e) => {
                let decision = limiter::degrade(&self.shared.metrics(), &held.key, now, &format!("callout failed: {e:?}"));
                finish(&self.shared, held, decision, false)
            }
        }
    }
}

fn deny(shared: &Shared, denial: &Denial, request_id: &str, remaining: Option<u32>) -> Action {
    crate::audit::record(shared, Verdict::Deny(denial), remaining);
    Metrics::inc(shared.metrics().requests_denied);
    let body = denial.body(request_id);
    let mut headers: Vec<(&str, &str)> = vec![("content-type", "application/json"), ("cache-control", "no-store")];
    headers.extend(denial.headers.iter().map(|(k, v)| (*k, v.as_str())));
    host::send_response(denial.status(), headers, body.as_bytes());
    Action::Pause
}

fn forward(shared: &Shared, fwd: &Forward, headers: &[(String, String)], ids: (&str, &str), remaining: Option<u32>) -> Action {
    let (token_id, user_id) = ids;
    crate::audit::record(shared, Verdict::Forward, remaining);
    Metrics::inc(shared.metrics().requests_allowed);
    for (name, _) in headers {
        if STRIPPED.contains(&name.as_str()) || name.starts_with("x-mcp-") {
            host::remove_request_header(name);
        }
    }
    host::set_request_header(":method", Some(&fwd.method));
    host::set_request_header(":path", Some(&fwd.path));
    if let Some(cred) = &fwd.credential {
        host::set_request_header("authorization", Some(&format!("Bearer {cred}")));
    }
    host::set_request_header("x-mcp-token-id", Some(token_id));
    host::set_request_header("x-mcp-user-id", Some(user_id));
    Action::Continue
}

/// Steps 4–7 once the limit is decided, in the request's (effective)
/// context: 429 when over the limit, else `authorize` and forward or deny.
/// `resume`: the request is paused and must be resumed after forwarding.
pub fn finish(shared: &Shared, held: HeldRequest, decision: Decision, resume: bool) -> Action {
    let HeldRequest { key, admitted, policy, config, headers, request_id, plan } = held;
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
        return deny(shared, &denial, &request_id, remaining);
    }
    match pipeline::authorize(&admitted, &policy, &config.routes, host::now_unix()) {
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
            let action = forward(shared, &fwd, &headers, (token_id, user_id), remaining);
            if resume {
                if let Err(e) = proxy_wasm::hostcalls::resume_http_request() {
                    log::warn!("cannot resume the request: {e:?}");
                }
            }
            action
        }
        Err(mut denial) => {
            denial.headers.extend(ratelimit);
            deny(shared, &denial, &request_id, remaining)
        }
    }
}

impl Context for McpRequest {
    fn on_grpc_call_response(&mut self, token_id: u32, status_code: u32, response_size: usize) {
        // None: the watchdog decided this request already.
        let Some(held) = self.shared.callouts.borrow_mut().take(self.context_id, token_id) else { return };
        let decision = limiter::read_answer(status_code, response_size).unwrap_or_else(|why| {
            limiter::degrade(&self.shared.metrics(), &held.key, host::now_unix_ms(), &why)
        });
        finish(&self.shared, held, decision, true);
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
        let value = |name: &str| headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
        let all = |name: &str| -> Vec<&str> { headers.iter().filter(|(k, _)| k == name).map(|(_, v)| v.as_str()).collect() };
        let authorization = all("authorization");
        let cookie = all("cookie");
        let request_id = value("x-request-id").unwrap_or_default();
        let head = RequestHead {
            method: value(":method").unwrap_or_default(),
            path: value(":path").unwrap_or_default(),
            authorization: &authorization,
            cookie: &cookie,
        };
        let Some(config) = self.shared.config() else {
            return self.deny(
                &Denial::new(mcp_filter_core::denial::ErrorCode::PolicyUnavailable, "the gateway is not configured"),
                request_id,
            );
        };
        let policy = self.shared.policy();
        let now = host::now_unix();
        match pipeline::admit(&head, policy.as_deref(), &config.routes, now) {
            Admission::PassThrough => Action::Continue,
            Admission::Deny(d) => self.deny(&d, request_id),
            Admission::Admitted(admitted) => {
                // admit() only admits with a policy present.
                let Some(policy) = policy else { return Action::Continue };
                let Some(key) = LimitKey::of(&admitted, &policy, &config.routes) else {
                    return self.deny(&Denial::new(ErrorCode::InvalidToken, "unknown or revoked token"), request_id);
                };
                let request_id = request_id.to_string();
                let held = HeldRequest { key, admitted, policy, config, headers, request_id, plan: self.plan.clone() };
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
