//! The per-request context: a translator between Envoy's stream events and
//! the core's request state machine ([`mcp_filter_core::exchange`]). It
//! feeds each event to the [`Exchange`], then carries out the effects the
//! step returns, in order: local replies, header and body rewrites, the
//! rate-limit callout, audit records and counters. It decides nothing.
//!
//! A request paused on its rate-limit callout is kept in the VM's
//! [`Callouts`](crate::limiter::Callouts) and finished by the answer
//! ([`Context::on_grpc_call_response`]) or by the root context's watchdog
//! ([`finish_overdue`]) — whichever takes it out first.

use std::cell::{Cell, RefCell};
use std::rc::Rc;

use mcp_filter_core::exchange::{Counter, Effect, Exchange, Flow, Host, LimitAnswer, Step, Vm};
use mcp_filter_core::window::Decision;
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::{Action, BufferType};

use crate::feed::Shared;
use crate::host;
use crate::limiter;
use crate::metrics::Metrics;

/// A request's exchange, shared with the callout bookkeeping while it waits.
pub type SharedExchange = Rc<RefCell<Exchange>>;

pub struct McpRequest {
    context_id: u32,
    shared: Rc<Shared>,
    exchange: SharedExchange,
}

/// The core's [`Host`] on proxy-wasm.
struct WasmHost;

impl Host for WasmHost {
    fn now_ms(&self) -> i64 {
        host::now_unix_ms()
    }
    fn client_address(&self) -> String {
        host::client_address()
    }
    fn local_window(&self, key: &str, limit: u32, window_seconds: u32, now_ms: i64) -> Decision {
        limiter::local_window(key, limit, window_seconds, now_ms)
    }
    fn request_body(&self, len: usize) -> Vec<u8> {
        body(BufferType::HttpRequestBody, len)
    }
    fn response_body(&self, len: usize) -> Vec<u8> {
        body(BufferType::HttpResponseBody, len)
    }
}

fn body(buffer: BufferType, len: usize) -> Vec<u8> {
    if len == 0 {
        return Vec::new();
    }
    hostcalls::get_buffer(buffer, 0, len).ok().flatten().unwrap_or_default()
}

impl McpRequest {
    pub fn new(context_id: u32, shared: Rc<Shared>) -> Self {
        Self { context_id, shared, exchange: Rc::new(RefCell::new(Exchange::new())) }
    }

    fn drive(&self, event: impl FnOnce(&mut Exchange, &mut Vm<'_>, &WasmHost) -> Step) -> Action {
        drive(&self.shared, self.context_id, &self.exchange, false, event)
    }
}

/// Feeds one event to the exchange and carries out its step. `resumed`:
/// the event came while the stream was paused (callout answer, watchdog),
/// so going on means resuming it.
fn drive(
    shared: &Shared,
    context_id: u32,
    exchange: &SharedExchange,
    resumed: bool,
    event: impl FnOnce(&mut Exchange, &mut Vm<'_>, &WasmHost) -> Step,
) -> Action {
    let step = with_vm(shared, |vm| event(&mut exchange.borrow_mut(), vm, &WasmHost));
    let Some(step) = step else {
        fail_closed("the VM state is busy");
        return Action::Pause;
    };
    let flow = carry_out(shared, context_id, exchange, step);
    match flow {
        Flow::Continue => {
            if resumed {
                if let Err(e) = hostcalls::resume_http_request() {
                    log::warn!("cannot resume the request: {e:?}");
                }
            }
            Action::Continue
        }
        Flow::Pause => Action::Pause,
    }
}

fn with_vm<T>(shared: &Shared, f: impl FnOnce(&mut Vm<'_>) -> T) -> Option<T> {
    let mut ownership = shared.ownership.try_borrow_mut().ok()?;
    let mut coalescer = shared.coalescer.try_borrow_mut().ok()?;
    let contact = shared.last_contact_ms.get();
    let policy_age_ms = if contact > 0 { (host::now_unix_ms() - contact).max(0) } else { 0 };
    let mut vm = Vm { config: shared.config(), policy: shared.policy(), policy_age_ms, ownership: &mut ownership, coalescer: &mut coalescer };
    Some(f(&mut vm))
}

/// Carries out a step's effects; returns the flow that stands (a callout
/// that cannot start is answered at once, and its step decides). A rewrite
/// of the request the host refuses fails the request closed (500): it
/// would otherwise go on half rewritten.
fn carry_out(shared: &Shared, context_id: u32, exchange: &SharedExchange, step: Step) -> Flow {
    let metrics = shared.metrics();
    let mut broken = false;
    for effect in step.effects {
        match effect {
            Effect::Reply { status, headers, body } => {
                let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
                host::send_response(status, headers, &body);
            }
            Effect::AskLimit { key, claim } => {
                let started = shared.config().map(|config| limiter::ask_service(&config, &key, claim.as_ref()));
                let held = match started {
                    Some(Ok(token)) => match shared.callouts.try_borrow_mut() {
                        Ok(mut callouts) => {
                            callouts.hold(context_id, token, host::now_unix_ms(), exchange.clone());
                            Ok(())
                        }
                        Err(_) => Err("callout bookkeeping busy".to_string()),
                    },
                    Some(Err(e)) => Err(format!("callout failed: {e:?}")),
                    None => Err("no configuration".to_string()),
                };
                if let Err(why) = held {
                    // The local window decides now; never a request left waiting.
                    let next = with_vm(shared, |vm| exchange.borrow_mut().on_limit(LimitAnswer::Failed(why), vm, &WasmHost));
                    return match next {
                        Some(next) => carry_out(shared, context_id, exchange, next),
                        None => fail_closed("the VM state is busy"),
                    };
                }
            }
            Effect::AwaitPolicy => {
                let held = shared.early.try_borrow_mut().map(|mut early| early.push((context_id, exchange.clone(), host::now_unix_ms())));
                if held.is_err() {
                    // Never a request left waiting: decided now, without a policy.
                    let next = with_vm(shared, |vm| exchange.borrow_mut().on_policy(vm, &WasmHost));
                    return match next {
                        Some(next) => carry_out(shared, context_id, exchange, next),
                        None => fail_closed("the VM state is busy"),
                    };
                }
            }
            Effect::Degraded { why } => degraded(&metrics, &why),
            Effect::Audit { facts, reason, remaining } => crate::audit::record(&facts, reason.as_deref(), remaining),
            Effect::AuditResult { upstream_status } => crate::audit::record_result(upstream_status),
            Effect::Count(c) => Metrics::inc(match c {
                Counter::RequestsAllowed => metrics.requests_allowed,
                Counter::RequestsDenied => metrics.requests_denied,
                Counter::AuditCoalesced => metrics.audit_coalesced,
                Counter::AuthFailuresLimited => metrics.auth_failures_limited,
                Counter::RateLimitAllowed => metrics.ratelimit_allowed,
                Counter::RateLimitLimited => metrics.ratelimit_limited,
                Counter::OwnershipRefuted => metrics.ownership_refuted,
                Counter::McpMessages => metrics.mcp_messages,
            }),
            Effect::RemoveRequestHeader(name) => broken |= host::remove_request_header(&name).is_err(),
            Effect::SetRequestHeader(name, value) => broken |= host::set_request_header(&name, Some(&value)).is_err(),
            Effect::ReplaceRequestBody(bytes) => broken |= host::replace_request_body(&bytes).is_err(),
            Effect::SetResponseHeader(name, value) => host::set_response_header(&name, value.as_deref()),
            Effect::ReplaceResponseBody { start, len, bytes } => host::set_response_body(start, len, &bytes),
        }
    }
    if broken && step.flow == Flow::Continue {
        return fail_closed("the host refused a rewrite of the request");
    }
    step.flow
}

/// Answers 500 instead of letting a request go on that the filter could
/// not finish deciding or rewriting.
fn fail_closed(why: &str) -> Flow {
    log::error!("request refused: {why}");
    host::send_response(
        500,
        vec![("content-type", "application/json"), ("cache-control", "no-store")],
        br#"{"error":"gateway_error","message":"the gateway could not complete this request; retry"}"#,
    );
    Flow::Pause
}

/// Counts a decision the local window made and warns, at most once per
/// second per VM.
fn degraded(metrics: &Metrics, why: &str) {
    thread_local! {
        static LAST_WARNING_MS: Cell<i64> = const { Cell::new(i64::MIN) };
    }
    let now_ms = host::now_unix_ms();
    LAST_WARNING_MS.with(|last| {
        if now_ms.saturating_sub(last.get()) >= 1000 {
            last.set(now_ms);
            log::warn!("rate-limit service unavailable ({why}); deciding locally (counted in mcp_ratelimit_degraded)");
        }
    });
    Metrics::inc(metrics.ratelimit_rls_errors);
    Metrics::inc(metrics.ratelimit_degraded);
}

/// A request that waited for the VM's first policy goes on (the policy
/// came, or the wait is over), in that request's (effective) context.
pub fn finish_early(shared: &Shared, context_id: u32, exchange: &SharedExchange) {
    drive(shared, context_id, exchange, true, |ex, vm, h| ex.on_policy(vm, h));
}

/// The answer to a rate-limit callout, for the request waiting on it (if
/// the watchdog has not decided it already), in its (effective) context.
pub fn answered(shared: &Shared, context_id: u32, exchange: &SharedExchange, status_code: u32, response_size: usize) {
    let answer = limiter::read_answer(status_code, response_size);
    drive(shared, context_id, exchange, true, |ex, vm, h| ex.on_limit(answer, vm, h));
}

/// The watchdog's verdict on a request whose callout did not answer in
/// time, in that request's (effective) context.
pub fn finish_overdue(shared: &Shared, context_id: u32, exchange: &SharedExchange) {
    drive(shared, context_id, exchange, true, |ex, vm, h| {
        ex.on_limit(LimitAnswer::Failed("no answer before the deadline".into()), vm, h)
    });
}

impl Context for McpRequest {
    fn on_grpc_call_response(&mut self, token_id: u32, status_code: u32, response_size: usize) {
        // None: the watchdog decided this request already.
        let Some(exchange) = self.shared.callouts.borrow_mut().take(self.context_id, token_id) else { return };
        answered(&self.shared, self.context_id, &exchange, status_code, response_size);
    }
}

impl Drop for McpRequest {
    fn drop(&mut self) {
        if let Ok(mut callouts) = self.shared.callouts.try_borrow_mut() {
            callouts.forget(self.context_id);
        }
        if let Ok(mut early) = self.shared.early.try_borrow_mut() {
            early.retain(|(id, _, _)| *id != self.context_id);
        }
    }
}

impl HttpContext for McpRequest {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        let headers = host::request_headers();
        self.drive(|ex, vm, h| ex.on_request_headers(headers, end_of_stream, vm, h))
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        self.drive(|ex, vm, h| ex.on_request_body(body_size, end_of_stream, vm, h))
    }

    // With `allow_on_headers_stop_iteration`, a paused head is only a
    // stopped head: trailers (HTTP/2) must not let it go on undecided.
    fn on_http_request_trailers(&mut self, _num_trailers: usize) -> Action {
        self.drive(|ex, vm, h| ex.on_request_trailers(vm, h))
    }

    fn on_http_response_trailers(&mut self, _num_trailers: usize) -> Action {
        self.drive(|ex, _, h| ex.on_response_trailers(h))
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        let status = host::response_header(":status");
        let length = host::response_header("content-length").and_then(|v| v.trim().parse::<u64>().ok());
        let content_type = host::response_header("content-type");
        self.drive(|ex, _, _| ex.on_response_headers(status.as_deref(), length, content_type.as_deref(), end_of_stream))
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        self.drive(|ex, _, h| ex.on_response_body(body_size, end_of_stream, h))
    }
}
