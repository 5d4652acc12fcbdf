//! The root context: validates the plugin configuration and keeps the
//! policy snapshot fresh (DESIGN §8). It long-polls the control plane with
//! `If-None-Match`, applies a new snapshot atomically for this VM, keeps the
//! last good one on any error, and backs off with jitter while the control
//! plane is away. Until the first snapshot arrives `policy` is `None`, which
//! the pipeline answers with 503 `policy_unavailable`. Holding a policy, it
//! asks for a delta from its version (`snapshot_deltas`) and applies it to a
//! copy; a delta it cannot apply makes the next poll ask for everything.
//!
//! Its tick is also the rate-limit watchdog: a request still paused on its
//! rate-limit callout after the callout's deadline is decided by the local
//! window, so a callout Envoy keeps queued cannot hang a request; and it
//! sends the coalesced denial rows ([`mcp_filter_core::coalesce`]) to the
//! control plane's internal listener, one batch at a time.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::Duration;

use mcp_filter_core::coalesce::{Coalescer, Summary, SummaryBatch};
use mcp_filter_core::config::PluginConfig;
use mcp_filter_core::ownership::OwnershipCache;
use mcp_filter_core::policy::Policy;
use mcp_filter_core::signature;
use mcp_filter_core::snapshot;
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::ContextType;

use crate::host;
use crate::limiter::{self, Callouts};
use crate::metrics::Metrics;
use crate::request::{self, McpRequest, SharedExchange};

const BACKOFF_MIN_MS: i64 = 250;
/// How long after a callout's deadline the watchdog steps in.
const WATCHDOG_GRACE_MS: i64 = 5;
/// Longest wait between polls while the control plane is away: short, so a
/// revocation made while it was down reaches the edge within a second of its
/// return (tests/src/drills.rs measures it: wait at most 750 ms, then poll).
const BACKOFF_MAX_MS: i64 = 750;

/// Where the coalesced denial rows go on the control plane's internal
/// listener (same cluster and secret as the snapshot).
pub const SUMMARY_PATH: &str = "/v1/audit/coalesced";

/// State shared by the root context and every request context of a VM.
pub struct Shared {
    pub config: RefCell<Option<Rc<PluginConfig>>>,
    pub policy: RefCell<Option<Rc<Policy>>>,
    pub metrics: RefCell<Metrics>,
    /// Requests paused on their rate-limit callout.
    pub callouts: RefCell<Callouts<SharedExchange>>,
    /// Requests that came before the first policy, waiting for it (context
    /// id, exchange, since when in unix ms).
    pub early: RefCell<Vec<(u32, SharedExchange, i64)>>,
    /// Build/job ownership this VM has confirmed.
    pub ownership: RefCell<OwnershipCache>,
    /// Repeated denials being counted.
    pub coalescer: RefCell<Coalescer>,
    /// When the control plane last confirmed the policy (unix ms; 0: never).
    pub last_contact_ms: Cell<i64>,
}

impl Default for Shared {
    fn default() -> Self {
        Self {
            config: RefCell::default(),
            policy: RefCell::default(),
            metrics: RefCell::default(),
            callouts: RefCell::default(),
            early: RefCell::default(),
            ownership: RefCell::new(OwnershipCache::new(16)),
            coalescer: RefCell::new(Coalescer::new(0)),
            last_contact_ms: Cell::new(0),
        }
    }
}

impl Shared {
    pub fn config(&self) -> Option<Rc<PluginConfig>> {
        self.config.borrow().clone()
    }
    pub fn policy(&self) -> Option<Rc<Policy>> {
        self.policy.borrow().clone()
    }
    pub fn metrics(&self) -> Metrics {
        *self.metrics.borrow()
    }
}

/// The snapshot poll's state.
#[derive(Default)]
struct Poll {
    in_flight: Option<u32>,
    next_at_ms: i64,
    backoff_ms: i64,
    last_contact_ms: i64,
    rng: u64,
    /// The last delta could not be applied: ask for the whole snapshot.
    full_next: bool,
}

pub struct Root {
    context_id: u32,
    shared: Rc<Shared>,
    poll: Poll,
    /// The coalesced rows in flight to the control plane (call token).
    summaries_in_flight: Option<(u32, Vec<Summary>)>,
}

impl Root {
    pub fn new(context_id: u32) -> Self {
        Self { context_id, shared: Rc::new(Shared::default()), poll: Poll::default(), summaries_in_flight: None }
    }

    /// Sends the coalesced rows whose interval is over, if none are on
    /// their way; unsent rows wait for the next tick.
    fn send_summaries(&mut self) {
        if self.summaries_in_flight.is_some() {
            return;
        }
        let Some(cfg) = self.shared.config() else { return };
        let summaries = {
            let mut c = self.shared.coalescer.borrow_mut();
            if c.is_idle() {
                return;
            }
            c.drain(host::now_unix_ms())
        };
        if summaries.is_empty() {
            return;
        }
        let origin = crate::audit::origin();
        let batch = SummaryBatch { node_id: origin.node_id, vm_id: origin.vm_id, summaries };
        let body = match serde_json::to_vec(&batch) {
            Ok(b) => b,
            Err(e) => {
                log::warn!("cannot encode coalesced audit rows: {e}");
                return;
            }
        };
        let bearer = format!("Bearer {}", cfg.snapshot_secret);
        let headers = vec![
            (":method", "POST"),
            (":path", SUMMARY_PATH),
            (":authority", cfg.snapshot_authority.as_str()),
            ("authorization", bearer.as_str()),
            ("content-type", "application/json"),
        ];
        match hostcalls::dispatch_http_call(&cfg.snapshot_cluster, headers, Some(&body), vec![], Duration::from_secs(5)) {
            Ok(token) => self.summaries_in_flight = Some((token, batch.summaries)),
            Err(e) => {
                log::warn!("cannot send coalesced audit rows (kept for the next try): {e:?}");
                self.requeue(batch.summaries);
            }
        }
    }

    fn requeue(&self, summaries: Vec<Summary>) {
        let mut c = self.shared.coalescer.borrow_mut();
        let before = c.dropped;
        c.requeue(summaries);
        Metrics::add(self.shared.metrics().audit_summaries_dropped, (c.dropped - before) as i64);
    }

    /// The control plane's answer to a batch of coalesced rows.
    fn summaries_answered(&mut self, num_headers: usize) {
        let Some((_, summaries)) = self.summaries_in_flight.take() else { return };
        let status = if num_headers == 0 { None } else { host::http_call_response_header(":status") };
        match status.as_deref() {
            Some("204") | Some("200") => Metrics::add(self.shared.metrics().audit_summaries_sent, summaries.len() as i64),
            other => {
                log::warn!("coalesced audit rows not accepted ({}); kept for the next try", other.unwrap_or("no answer"));
                self.requeue(summaries);
            }
        }
    }

    /// Lets the requests waiting for the first policy go on: all of them
    /// (`None`: it came), or those that came before `before_ms`.
    fn release_early(&self, before_ms: Option<i64>) {
        let due: Vec<(u32, SharedExchange)> = match self.shared.early.try_borrow_mut() {
            Ok(mut early) if !early.is_empty() => {
                let (due, keep): (Vec<_>, Vec<_>) =
                    std::mem::take(&mut *early).into_iter().partition(|(_, _, since)| before_ms.is_none_or(|b| *since < b));
                *early = keep;
                due.into_iter().map(|(id, ex, _)| (id, ex)).collect()
            }
            _ => return,
        };
        self.in_their_contexts(due, request::finish_early);
    }

    /// Runs `finish` for each request in that request's (effective)
    /// context, then returns to this root context.
    fn in_their_contexts(&self, requests: Vec<(u32, SharedExchange)>, finish: fn(&Shared, u32, &SharedExchange)) {
        for (context_id, exchange) in requests {
            if hostcalls::set_effective_context(context_id).is_ok() {
                finish(&self.shared, context_id, &exchange);
            }
        }
        let _ = hostcalls::set_effective_context(self.context_id);
    }

    /// Decides every request paused past its callout's deadline with the
    /// local window, in that request's context.
    fn watchdog(&self) {
        let Some(cfg) = self.shared.config() else { return };
        let now = host::now_unix_ms();
        let overdue = match self.shared.callouts.try_borrow_mut() {
            // A little after the callout's own timeout, which normally
            // answers first (and so releases the callout in Envoy).
            Ok(mut c) if !c.is_empty() => c.overdue(now, i64::from(cfg.ratelimit_timeout_ms) + WATCHDOG_GRACE_MS),
            _ => return,
        };
        self.in_their_contexts(overdue, request::finish_overdue);
    }

    fn poll_now(&mut self) {
        let Some(cfg) = self.shared.config() else { return };
        if self.poll.in_flight.is_some() {
            return;
        }
        let version = self.shared.policy().map(|p| p.version.clone());
        let delta = if cfg.snapshot_deltas && !self.poll.full_next { format!("&{}", snapshot::DELTA_QUERY) } else { String::new() };
        let (path, timeout) = match &version {
            Some(_) => (
                format!("{}?wait={}{delta}", cfg.snapshot_path, cfg.snapshot_wait_seconds),
                Duration::from_secs(u64::from(cfg.snapshot_wait_seconds) + 10),
            ),
            None => (cfg.snapshot_path.clone(), Duration::from_secs(10)),
        };
        let bearer = format!("Bearer {}", cfg.snapshot_secret);
        let etag = version.map(|v| format!("\"{v}\""));
        let mut headers = vec![
            (":method", "GET"),
            (":path", path.as_str()),
            (":authority", cfg.snapshot_authority.as_str()),
            ("authorization", bearer.as_str()),
        ];
        if let Some(etag) = &etag {
            headers.push(("if-none-match", etag.as_str()));
        }
        match hostcalls::dispatch_http_call(&cfg.snapshot_cluster, headers, None, vec![], timeout) {
            Ok(token) => self.poll.in_flight = Some(token),
            Err(e) => {
                log::warn!("snapshot poll to cluster {} could not start: {e:?}", cfg.snapshot_cluster);
                self.failed();
            }
        }
    }

    fn failed(&mut self) {
        Metrics::inc(self.shared.metrics().snapshot_errors);
        let now = host::now_unix_ms();
        self.poll.backoff_ms = (self.poll.backoff_ms * 2).clamp(BACKOFF_MIN_MS, BACKOFF_MAX_MS);
        // xorshift jitter: wait between half and all of the backoff.
        let mut x = self.poll.rng ^ (now as u64) ^ 0x9e37_79b9_7f4a_7c15;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.poll.rng = x;
        let half = self.poll.backoff_ms / 2;
        self.poll.next_at_ms = now + half + (x % (half.max(1) as u64)) as i64;
    }

    fn succeeded(&mut self) {
        self.poll.backoff_ms = 0;
        self.poll.last_contact_ms = host::now_unix_ms();
        self.shared.last_contact_ms.set(self.poll.last_contact_ms);
        self.poll.next_at_ms = 0;
        self.report_age();
    }

    fn apply(&mut self, body_size: usize) {
        let metrics = self.shared.metrics();
        let started = host::now_unix_ms();
        // Read from the host a piece at a time while parsing: the VM holds
        // the policy in force, the one being built and a 64 KiB window. With
        // require_snapshot_signature the body is authenticated as it is read,
        // and the policy is taken only if the whole body verifies (DESIGN §7).
        let Some(config) = self.shared.config() else {
            return self.failed();
        };
        Metrics::add(metrics.snapshot_bytes, body_size as i64);
        // A delta applies to the policy held (its body names the base it
        // needs); without one held, a delta is refused like any bad body.
        let held = self.shared.policy();
        let delta = host::http_call_response_header(snapshot::DELTA_BASE_HEADER).is_some();
        let read = |body: &mut dyn std::io::Read| match (delta, &held) {
            (false, _) => Policy::from_reader(body),
            (true, Some(old)) => old.apply_delta(body),
            (true, None) => Err(snapshot::SnapshotError("a delta, and no policy to apply it to".into())),
        };
        let parsed = if config.require_snapshot_signature {
            let key = signature::signing_key(&config.snapshot_secret);
            let signed = host::http_call_response_header(signature::HEADER);
            let mut body = signature::VerifyingReader::new(host::HttpCallBody::new(body_size), &key);
            read(&mut body).and_then(|p| body.verify(signed.as_deref()).map(|()| p))
        } else {
            read(&mut host::HttpCallBody::new(body_size))
        };
        // Genuine but older than what is held: a replay, or a replica that
        // has not caught up; either would bring back what was revoked since.
        let parsed = parsed.and_then(|p| match &held {
            Some(old) => p.may_replace(old).map(|()| p),
            None => Ok(p),
        });
        drop(held);
        match parsed {
            Ok(policy) => {
                let took = (host::now_unix_ms() - started).max(0);
                let kind = if delta { "delta" } else { "snapshot" };
                log::info!("applied {kind} version={} tokens={} bytes={body_size} in {took} ms", policy.version, policy.token_count());
                if delta {
                    Metrics::inc(metrics.snapshot_deltas);
                }
                self.poll.full_next = false;
                Metrics::set(metrics.snapshot_tokens, policy.token_count() as u64);
                Metrics::set(metrics.snapshot_apply_ms, took as u64);
                // Replace (and free) the previous policy before the update
                // counter moves, so the memory gauge read after it is current.
                *self.shared.policy.borrow_mut() = Some(Rc::new(policy));
                metrics.record_memory();
                Metrics::inc(metrics.snapshot_updates);
                self.succeeded();
                self.release_early(None);
            }
            Err(e) => {
                log::warn!("rejected {}, keeping the previous policy: {e}", if delta { "delta" } else { "snapshot" });
                Metrics::inc(metrics.snapshot_rejected);
                // The whole snapshot next: a delta that does not apply
                // would not apply the next time either.
                self.poll.full_next |= delta;
                self.failed();
            }
        }
    }

    fn report_age(&self) {
        if self.poll.last_contact_ms > 0 {
            let age = (host::now_unix_ms() - self.poll.last_contact_ms).max(0) / 1000;
            Metrics::set(self.shared.metrics().snapshot_age_seconds, age as u64);
        }
    }
}

impl Context for Root {
    /// A rate-limit callout started while this root context's callback ran
    /// (a request let go by [`Root::release_early`]): its request's answer.
    fn on_grpc_call_response(&mut self, token_id: u32, status_code: u32, response_size: usize) {
        let taken = self.shared.callouts.try_borrow_mut().ok().and_then(|mut c| c.take_token(token_id));
        let Some((context_id, exchange)) = taken else { return };
        if hostcalls::set_effective_context(context_id).is_ok() {
            request::answered(&self.shared, context_id, &exchange, status_code, response_size);
        }
        let _ = hostcalls::set_effective_context(self.context_id);
    }

    fn on_http_call_response(&mut self, token_id: u32, num_headers: usize, body_size: usize, _trailers: usize) {
        if self.summaries_in_flight.as_ref().is_some_and(|(t, _)| *t == token_id) {
            return self.summaries_answered(num_headers);
        }
        if self.poll.in_flight != Some(token_id) {
            return;
        }
        self.poll.in_flight = None;
        if num_headers == 0 {
            log::warn!("snapshot poll failed (timeout or connection error)");
            return self.failed();
        }
        match host::http_call_response_header(":status").as_deref() {
            Some("200") => self.apply(body_size),
            Some("304") => self.succeeded(),
            other => {
                log::warn!("snapshot poll answered {}", other.unwrap_or("without status"));
                self.failed();
            }
        }
        if self.poll.next_at_ms <= host::now_unix_ms() {
            self.poll_now();
        }
    }
}

impl RootContext for Root {
    fn on_vm_start(&mut self, _size: usize) -> bool {
        *self.shared.metrics.borrow_mut() = Metrics::define();
        true
    }

    fn on_configure(&mut self, _size: usize) -> bool {
        let bytes = match hostcalls::get_buffer(proxy_wasm::types::BufferType::PluginConfiguration, 0, usize::MAX) {
            Ok(Some(b)) => b,
            Ok(None) => Vec::new(),
            Err(e) => {
                log::error!("cannot read plugin configuration: {e:?}");
                return false;
            }
        };
        match PluginConfig::parse(&bytes) {
            Ok(cfg) => {
                log::info!(
                    "configured: snapshot cluster {}, {} routes",
                    cfg.snapshot_cluster,
                    cfg.routes.routes().len()
                );
                *self.shared.ownership.borrow_mut() = OwnershipCache::new(cfg.ownership_cache_entries as usize);
                *self.shared.coalescer.borrow_mut() = Coalescer::new(cfg.audit_coalesce_seconds);
                *self.shared.config.borrow_mut() = Some(Rc::new(cfg));
            }
            Err(e) => {
                // Refusing makes Envoy reject this configuration; a running
                // filter keeps its previous one.
                log::error!("{e}");
                return false;
            }
        }
        let tick = self.shared.config().map(|c| limiter::watchdog_tick(c.ratelimit_timeout_ms)).unwrap_or(Duration::from_millis(200));
        if let Err(e) = hostcalls::set_tick_period(tick) {
            log::error!("cannot set tick period: {e:?}");
        }
        self.poll_now();
        true
    }

    fn on_tick(&mut self) {
        self.report_age();
        if self.poll.in_flight.is_none() && host::now_unix_ms() >= self.poll.next_at_ms {
            self.poll_now();
        }
        self.send_summaries();
        // Last: they switch the effective context to each request concerned.
        self.release_early(Some(host::now_unix_ms() - mcp_filter_core::exchange::FIRST_POLICY_WAIT_MS));
        self.watchdog();
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(McpRequest::new(context_id, self.shared.clone())))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}
