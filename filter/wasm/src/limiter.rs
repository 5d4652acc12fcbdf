//! The rate-limit step (DESIGN §9) on the host side: the callout to the
//! rate-limit service and the bookkeeping of requests paused on it, and the
//! local sliding window in proxy-wasm shared data that decides when the
//! service cannot (error, timeout, no healthy endpoint).
//!
//! Shared data belongs to the VM id, so every worker of one Envoy shares the
//! local windows; updates use compare-and-swap. The same windows count
//! failed authentications per client address (the core asks through its `Host`).
//!
//! The callout also carries the ownership check of the request's builds and
//! jobs ([`mcp_filter_core::ownership`]); in degraded mode ownership is
//! unknown unless this VM confirmed it before.

use std::collections::HashMap;
use std::time::Duration;

use mcp_filter_core::config::PluginConfig;
use mcp_filter_core::exchange::{LimitAnswer, LimitKey};
use mcp_filter_core::ownership::Claim;
use mcp_filter_core::rls;
use mcp_filter_core::window::{Decision, SlidingWindow};
use proxy_wasm::hostcalls;
use proxy_wasm::types::{BufferType, Status};


/// Starts the `ShouldRateLimit` callout (with the ownership descriptor when
/// `claim` is given); the answer arrives in the request context's
/// `on_grpc_call_response` under the returned token.
pub fn ask_service(config: &PluginConfig, key: &LimitKey, claim: Option<&Claim>) -> Result<u32, Status> {
    let message = rls::encode_request(&key.user, key.class.as_str(), key.limit, key.window_seconds, claim);
    let bearer = format!("Bearer {}", config.grpc_secret);
    hostcalls::dispatch_grpc_call(
        &config.ratelimit_cluster,
        rls::SERVICE,
        rls::METHOD,
        vec![(rls::METADATA_KEY, bearer.as_bytes())],
        Some(&message),
        Duration::from_millis(u64::from(config.ratelimit_timeout_ms)),
    )
}

/// Reads the service's answer to a finished callout: the limit decision
/// (`None`: the service could not decide it) and the ownership verdict.
pub fn read_answer(status_code: u32, response_size: usize) -> LimitAnswer {
    if status_code != 0 {
        return LimitAnswer::Failed(format!("rate-limit service answered gRPC status {status_code}"));
    }
    let body = hostcalls::get_buffer(BufferType::GrpcReceiveBuffer, 0, response_size)
        .ok()
        .flatten()
        .unwrap_or_default();
    match rls::decode_response(&body) {
        Ok(a) => match a.limit {
            Some(v) => LimitAnswer::Decided(Decision::from(v), a.ownership),
            None => LimitAnswer::StoreFailed(a.ownership),
        },
        Err(e) => LimitAnswer::Failed(format!("unreadable rate-limit answer: {e}")),
    }
}

/// Compare-and-swap attempts before the last computed decision stands.
const CAS_ATTEMPTS: usize = 16;

/// One decision of a local sliding window in shared data under `name`.
pub fn local_window(name: &str, limit: u32, window_seconds: u32, now_ms: i64) -> Decision {
    let now = u64::try_from(now_ms).unwrap_or(0);
    let window_ms = u64::from(window_seconds).saturating_mul(1000);
    let mut last = Decision { allowed: true, remaining: 0, reset_ms: window_ms };
    for _ in 0..CAS_ATTEMPTS {
        let (bytes, cas) = match hostcalls::get_shared_data(name) {
            Ok(v) => v,
            Err(e) => {
                log::warn!("cannot read the local rate-limit window: {e:?}");
                (None, None)
            }
        };
        let mut window = SlidingWindow::decode(bytes.as_deref().unwrap_or_default());
        last = window.decide(now, limit, window_ms);
        if !last.allowed {
            // A denial records nothing.
            return last;
        }
        // A key nobody wrote yet has no CAS; two workers creating it at the
        // same instant may both admit (at most one extra, once per key).
        match hostcalls::set_shared_data(name, Some(&window.encode()), cas) {
            Ok(()) => return last,
            Err(Status::CasMismatch) => continue,
            Err(e) => {
                log::warn!("cannot store the local rate-limit window: {e:?}");
                return last;
            }
        }
    }
    log::warn!("local rate-limit window stayed contended; admitting without recording");
    last
}

/// A request paused on its callout.
struct Waiting<T> {
    token: u32,
    since_ms: i64,
    request: T,
}

/// Requests of one VM paused on a rate-limit callout, by context id. Whoever
/// takes a request out first (the answer, or the watchdog) decides it.
pub struct Callouts<T> {
    waiting: HashMap<u32, Waiting<T>>,
}

impl<T> Default for Callouts<T> {
    fn default() -> Self {
        Self { waiting: HashMap::new() }
    }
}

impl<T> Callouts<T> {
    pub fn hold(&mut self, context_id: u32, token: u32, since_ms: i64, request: T) {
        self.waiting.insert(context_id, Waiting { token, since_ms, request });
    }

    /// The request waiting on `token` in `context_id`, if still undecided.
    pub fn take(&mut self, context_id: u32, token: u32) -> Option<T> {
        match self.waiting.get(&context_id) {
            Some(w) if w.token == token => self.waiting.remove(&context_id).map(|w| w.request),
            _ => None,
        }
    }

    /// The request waiting on `token`, whichever context it is in (a
    /// callout started from the root context's callback is answered there).
    pub fn take_token(&mut self, token: u32) -> Option<(u32, T)> {
        let id = self.waiting.iter().find(|(_, w)| w.token == token).map(|(id, _)| *id)?;
        self.waiting.remove(&id).map(|w| (id, w.request))
    }

    /// Removes and returns every request paused for `deadline_ms` or longer.
    pub fn overdue(&mut self, now_ms: i64, deadline_ms: i64) -> Vec<(u32, T)> {
        let due: Vec<u32> = self
            .waiting
            .iter()
            .filter(|(_, w)| now_ms.saturating_sub(w.since_ms) >= deadline_ms)
            .map(|(id, _)| *id)
            .collect();
        due.into_iter().filter_map(|id| self.waiting.remove(&id).map(|w| (id, w.request))).collect()
    }

    /// Drops a request whose context ended.
    pub fn forget(&mut self, context_id: u32) {
        self.waiting.remove(&context_id);
    }

    pub fn is_empty(&self) -> bool {
        self.waiting.is_empty()
    }
}

/// The root context's tick period for a callout deadline: at most half the
/// deadline, so the watchdog decides a stuck request within 1.5 deadlines.
pub fn watchdog_tick(timeout_ms: u32) -> Duration {
    Duration::from_millis(u64::from(timeout_ms / 2).clamp(10, 200))
}
