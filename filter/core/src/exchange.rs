//! The life of one request (DESIGN §4, §15) as a state machine: the adapter
//! feeds it Envoy's events (request head, request body, the rate-limit
//! answer, response head, response body) and carries out the [`Effect`]s of
//! each [`Step`] in order; the machine owns every decision, every reply and
//! every audit record. REST requests on `/api/v1/mcp/*` and MCP tool calls on
//! `/api/v1/mcp` run the same states and the same code:
//!
//! ```text
//!  head ──► admit ──────────────► Limit ──► authorize ──► Response ──► done
//!   │        (pipeline)   AskLimit  │  on_limit   │ forward    shaping
//!   │                               │             └─► deny (reply)
//!   └─► MCP endpoint: authenticate ─► Body ─► JSON-RPC ─► tools/call ─► admit …
//!                                            └─► initialize, discover, tools/list: reply
//! ```
//!
//! What the machine asks of its host while deciding — the clock, the
//! client's address, a local sliding window in shared memory, buffered
//! bodies — goes through the small [`Host`] trait; VM-wide caches come in
//! [`Vm`]. Everything is testable natively against a mock host.

use std::rc::Rc;

use crate::audit::{McpFacts, RequestFacts};
use crate::coalesce::{Audit, Coalescer, Key, Sample};
use crate::config::PluginConfig;
use crate::credential::{self};
use crate::denial::{Denial, ErrorCode};
use crate::mcp::jsonrpc::{self, Id, RpcError};
use crate::mcp::render::{self, Form};
use crate::mcp::{self, Dispatch, Era, RoutingHeaders};
use crate::ownership::{Claim, Ownership, OwnershipCache};
use crate::pipeline::{self, Admission, Admitted, RequestHead};
use crate::policy::Policy;
use crate::route::{Class, Shaping};
use crate::shaping;
use crate::window::Decision;

/// What the machine asks of its host.
pub trait Host {
    fn now_ms(&self) -> i64;
    /// The client's address as the proxy established it (never a header).
    fn client_address(&self) -> String;
    /// One decision of the local sliding window `key`, shared by the
    /// proxy's workers (degraded mode, failed authentications).
    fn local_window(&self, key: &str, limit: u32, window_seconds: u32, now_ms: i64) -> Decision;
    /// The first `len` bytes of the buffered request body.
    fn request_body(&self, len: usize) -> Vec<u8>;
    /// The first `len` bytes of the buffered response body.
    fn response_body(&self, len: usize) -> Vec<u8>;
}

/// VM-wide state a request reads and updates.
pub struct Vm<'a> {
    pub config: Option<Rc<PluginConfig>>,
    pub policy: Option<Rc<Policy>>,
    /// Milliseconds since the control plane last confirmed `policy`.
    pub policy_age_ms: i64,
    pub ownership: &'a mut OwnershipCache,
    pub coalescer: &'a mut Coalescer,
}

/// Counters the adapter keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counter {
    RequestsAllowed,
    RequestsDenied,
    AuditCoalesced,
    AuthFailuresLimited,
    RateLimitAllowed,
    RateLimitLimited,
    OwnershipRefuted,
    McpMessages,
}

/// One side effect, carried out by the adapter in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// A local reply; the request goes no further.
    Reply { status: u32, headers: Vec<(String, String)>, body: Vec<u8> },
    /// Hold the request until the VM's first policy arrives, or until the
    /// wait for it is over ([`FIRST_POLICY_WAIT_MS`]); then call
    /// [`Exchange::on_policy`].
    AwaitPolicy,
    /// Start the rate-limit callout (with the ownership claim, if any) and
    /// answer with [`Exchange::on_limit`] — at once with
    /// [`LimitAnswer::Failed`] if it cannot start.
    AskLimit { key: LimitKey, claim: Option<Claim> },
    /// The service could not decide; the local window did (counted, logged).
    Degraded { why: String },
    /// Set the audit record of this request (`reason`: `None` = allowed).
    Audit { facts: RequestFacts, reason: Option<String>, remaining: Option<u32> },
    /// Set the tool call's result filter state: the upstream status.
    AuditResult { upstream_status: u32 },
    Count(Counter),
    RemoveRequestHeader(String),
    SetRequestHeader(String, String),
    ReplaceRequestBody(Vec<u8>),
    /// Set (`Some`) or remove (`None`) a response header.
    SetResponseHeader(String, Option<String>),
    /// Replace `len` bytes at `start` of the buffered response body.
    ReplaceResponseBody { start: usize, len: usize, bytes: Vec<u8> },
}

/// Longest a request that came before the VM's first policy waits for it
/// before it is answered 503 `policy_unavailable` (a VM just started, e.g. a
/// new epoch after Envoy's hot restart, gets its first snapshot in
/// milliseconds while the control plane is up).
pub const FIRST_POLICY_WAIT_MS: i64 = 2000;

/// Whether the stream goes on or waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Continue,
    /// Wait: for the body, for the rate-limit answer, or (after a reply)
    /// for good.
    Pause,
}

/// What one event did.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    pub effects: Vec<Effect>,
    pub flow: Flow,
}

impl Step {
    fn go() -> Self {
        Self { effects: Vec::new(), flow: Flow::Continue }
    }
}

/// The rate-limit service's answer to [`Effect::AskLimit`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LimitAnswer {
    /// The limit decision and the ownership verdict.
    Decided(Decision, Ownership),
    /// The limit store failed; the ownership was still answered.
    StoreFailed(Ownership),
    /// No answer (error, timeout, no healthy endpoint): why.
    Failed(String),
}

/// Whose budget a request counts against, and the limit from the snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitKey {
    pub user: String,
    pub class: Class,
    pub limit: u32,
    pub window_seconds: u32,
}

impl LimitKey {
    /// The key of an admitted request (`None` if its grant or user is
    /// missing from the policy, which `admit` rules out).
    pub fn of(admitted: &Admitted, policy: &Policy, config: &PluginConfig) -> Option<Self> {
        let grant = policy.grant(admitted.grant)?;
        let user = policy.user(grant.user)?;
        let class = pipeline::class_of(admitted, &config.routes);
        Some(Self { user: user.id.to_string(), class, limit: policy.limit(class), window_seconds: policy.limits.window_seconds })
    }

    /// The local window's key in shared data.
    pub fn shared_data_key(&self) -> String {
        format!("mcp_rl:{{{}}}:{}", self.user, self.class.as_str())
    }
}

/// Who the answer is for.
#[derive(Debug, Clone, PartialEq)]
enum Client {
    /// A REST request: JSON error bodies with their HTTP status.
    Rest,
    /// A tool call: every answer is a JSON-RPC result with HTTP 200.
    Tool(ToolCall),
}

#[derive(Debug, Clone, PartialEq)]
struct ToolCall {
    id: Id,
    era: Era,
    /// `infrabox://` URI of the call (an embedded resource's name).
    uri: String,
    max_bytes: Option<u64>,
}

/// An admitted request paused on its rate-limit answer.
#[derive(Debug)]
struct Held {
    key: LimitKey,
    admitted: Admitted,
    /// The claim asked of the service: `None` when the path names no
    /// build or job, or this VM confirmed it before.
    asked: Option<Claim>,
    policy: Rc<Policy>,
    config: Rc<PluginConfig>,
    headers: Vec<(String, String)>,
}

/// An MCP endpoint request, authenticated, waiting for its body.
#[derive(Debug)]
struct Reading {
    policy: Rc<Policy>,
    config: Rc<PluginConfig>,
    grant: u32,
    headers: Vec<(String, String)>,
}

/// How the response is shaped.
#[derive(Debug)]
enum Shape {
    None,
    /// REST log: the upstream's Content-Length (streamed) or `None`
    /// (buffered and trimmed as it arrives).
    LogTail { max: u64, total: Option<u64>, seen: u64 },
    ProjectList { policy: Rc<Policy>, grant: u32 },
    /// A tool call's answer, buffered into a tool result.
    Tool(Box<ToolAnswer>),
}

#[derive(Debug)]
struct ToolAnswer {
    call: ToolCall,
    form: Form,
    /// Keep only the token's projects (the project list).
    projects: Option<(Rc<Policy>, u32)>,
    status: u32,
    content_type: String,
    /// Bytes kept (the log's tail) or refused.
    limit: u64,
    /// Bytes already dropped from the front of the buffer.
    dropped: u64,
}

/// A request that came before the VM's first policy: its head, and whether
/// its body has ended (the host buffers it meanwhile).
#[derive(Debug)]
struct Early {
    headers: Vec<(String, String)>,
    end_of_stream: bool,
    body_end: bool,
}

#[derive(Debug)]
enum State {
    Start,
    Early(Box<Early>),
    Reading(Box<Reading>),
    Limit(Box<Held>),
    Response { ratelimit: Vec<(&'static str, String)>, shape: Shape },
    Done,
}

/// One request's life.
#[derive(Debug)]
pub struct Exchange {
    request_id: String,
    facts: RequestFacts,
    client: Client,
    state: State,
    /// What the host holds of the request and response bodies, as of the
    /// last body event (trailers end a body without a size of their own).
    request_buffered: usize,
    response_buffered: usize,
    /// It waited for the VM's first policy once already.
    waited: bool,
}

impl Default for Exchange {
    fn default() -> Self {
        Self::new()
    }
}

impl Exchange {
    pub fn new() -> Self {
        Self {
            request_id: String::new(),
            facts: RequestFacts::default(),
            client: Client::Rest,
            state: State::Start,
            request_buffered: 0,
            response_buffered: 0,
            waited: false,
        }
    }

    /// Waits for the VM's first policy instead of refusing for lack of one.
    fn wait_for_policy(&mut self, headers: Vec<(String, String)>, end_of_stream: bool) -> Step {
        self.state = State::Early(Box::new(Early { headers, end_of_stream, body_end: end_of_stream }));
        Step { effects: vec![Effect::AwaitPolicy], flow: Flow::Pause }
    }

    /// The VM's first policy arrived, or the wait for it is over: the
    /// request is decided as if it had just come (its body, if it ended
    /// meanwhile, with it).
    pub fn on_policy(&mut self, vm: &mut Vm<'_>, host: &dyn Host) -> Step {
        let State::Early(early) = std::mem::replace(&mut self.state, State::Start) else {
            return Step::go();
        };
        self.waited = true;
        let Early { headers, end_of_stream, body_end } = *early;
        let step = self.on_request_headers(headers, end_of_stream, vm, host);
        if step.flow == Flow::Pause && body_end && !end_of_stream && matches!(self.state, State::Reading(_)) {
            let mut effects = step.effects;
            let rest = self.on_request_body(self.request_buffered, true, vm, host);
            effects.extend(rest.effects);
            return Step { effects, flow: rest.flow };
        }
        step
    }

    /// The request head arrived. `end_of_stream`: it has no body.
    pub fn on_request_headers(&mut self, headers: Vec<(String, String)>, end_of_stream: bool, vm: &mut Vm<'_>, host: &dyn Host) -> Step {
        let head = RequestHead::new(&headers);
        self.request_id = head.values("x-request-id").next().unwrap_or_default().to_string();
        let Some(config) = vm.config.clone() else {
            return self.deny(Denial::new(ErrorCode::PolicyUnavailable, "the gateway is not configured"), None, None, vm, host);
        };
        // A policy the control plane has not confirmed for too long is no
        // policy for MCP requests (the decision order stays admit's).
        let stale = vm.policy.is_some() && vm.policy_age_ms > i64::from(config.max_policy_age_seconds).saturating_mul(1000);
        let policy = if stale { None } else { vm.policy.clone() };
        let now = host.now_ms() / 1000;
        // Before the VM's first policy, what would be refused for lack of
        // one waits for it instead (once, and at most FIRST_POLICY_WAIT_MS).
        let early = vm.policy.is_none() && !self.waited;
        if head.on_infrabox(&config) {
            let before_query = head.path.split_once('?').map_or(head.path, |(p, _)| p);
            if before_query == mcp::METADATA_PATH {
                return self.metadata(&head, &config);
            }
            if before_query == mcp::ENDPOINT {
                if early {
                    return self.wait_for_policy(headers, end_of_stream);
                }
                return self.endpoint_head(&head, end_of_stream, policy, config, vm, host);
            }
        }
        let admission = pipeline::admit(&head, policy.as_deref(), &config, now);
        if early && matches!(&admission, Admission::Deny(d) if d.code == ErrorCode::PolicyUnavailable) {
            return self.wait_for_policy(headers, end_of_stream);
        }
        let admission = match admission {
            Admission::Deny(d) if stale && d.code == ErrorCode::PolicyUnavailable => Admission::Deny(policy_stale(&config, vm.policy_age_ms)),
            other => other,
        };
        if admission == Admission::PassThrough {
            self.state = State::Done;
            return Step::go();
        }
        self.facts = match (&admission, &policy) {
            (Admission::Admitted(a), Some(p)) => RequestFacts::of_admitted(&head, p, &config.routes, a),
            _ => RequestFacts::describe(&head, vm.policy.as_deref(), &config.routes, head.on_infrabox(&config)),
        };
        self.admitted(admission, policy, config, headers.clone(), vm, host)
    }

    /// Admission decided: deny, or ask the rate limit.
    fn admitted(
        &mut self,
        admission: Admission,
        policy: Option<Rc<Policy>>,
        config: Rc<PluginConfig>,
        headers: Vec<(String, String)>,
        vm: &mut Vm<'_>,
        host: &dyn Host,
    ) -> Step {
        match admission {
            Admission::PassThrough => {
                self.state = State::Done;
                Step::go()
            }
            Admission::Deny(d) if d.code == ErrorCode::InvalidToken => {
                let mut effects = Vec::new();
                let d = self.authentication_failed(&config, d, &mut effects, host);
                self.deny_with(d, None, None, effects, vm, host)
            }
            Admission::Deny(d) => self.deny(d, None, None, vm, host),
            Admission::Admitted(admitted) => {
                // admit() only admits with a policy present.
                let Some(policy) = policy else {
                    return self.deny(Denial::new(ErrorCode::PolicyUnavailable, "no policy"), None, None, vm, host);
                };
                let Some(key) = LimitKey::of(&admitted, &policy, &config) else {
                    return self.deny(Denial::new(ErrorCode::InvalidToken, "unknown or revoked token"), None, None, vm, host);
                };
                let asked = admitted.claim.clone().filter(|c| !vm.ownership.confirms(c));
                let effect = Effect::AskLimit { key: key.clone(), claim: asked.clone() };
                self.state = State::Limit(Box::new(Held { key, admitted, asked, policy, config, headers }));
                Step { effects: vec![effect], flow: Flow::Pause }
            }
        }
    }

    /// A failed authentication: the denial while the client address has
    /// budget, then 429 until its window frees a slot.
    fn authentication_failed(&self, config: &PluginConfig, denial: Denial, effects: &mut Vec<Effect>, host: &dyn Host) -> Denial {
        let decision = host.local_window(
            &format!("mcp_af:{}", host.client_address()),
            config.auth_failure_limit,
            config.auth_failure_window_seconds,
            host.now_ms(),
        );
        if decision.allowed {
            return denial;
        }
        effects.push(Effect::Count(Counter::AuthFailuresLimited));
        Denial::new(
            ErrorCode::RateLimited,
            format!(
                "more than {} failed authentications from this address in {} s; retry in {} s",
                config.auth_failure_limit,
                config.auth_failure_window_seconds,
                decision.retry_after()
            ),
        )
        .with_header("retry-after", decision.retry_after().to_string())
    }

    /// The rate-limit answer arrived (or never will: `Failed`).
    pub fn on_limit(&mut self, answer: LimitAnswer, vm: &mut Vm<'_>, host: &dyn Host) -> Step {
        let State::Limit(held) = std::mem::replace(&mut self.state, State::Done) else {
            return Step::go();
        };
        let Held { key, admitted, asked, policy, config, headers } = *held;
        let mut effects = Vec::new();
        let now_ms = host.now_ms();
        let degrade = |why: String, effects: &mut Vec<Effect>| {
            effects.push(Effect::Degraded { why });
            host.local_window(&key.shared_data_key(), key.limit, key.window_seconds, now_ms)
        };
        let (decision, ownership) = match answer {
            LimitAnswer::Decided(d, o) => (d, o),
            LimitAnswer::StoreFailed(o) => (degrade("the limit store failed".into(), &mut effects), o),
            LimitAnswer::Failed(why) => (degrade(why, &mut effects), Ownership::Unknown),
        };
        effects.push(Effect::Count(if decision.allowed { Counter::RateLimitAllowed } else { Counter::RateLimitLimited }));
        let ratelimit = decision.headers(key.limit);
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
            return self.deny_with(denial, remaining, None, effects, vm, host);
        }
        let ownership = match &asked {
            // Nothing to check, or confirmed by this VM before.
            None => Ownership::Confirmed,
            Some(claim) => match ownership {
                Ownership::Confirmed => {
                    vm.ownership.confirm(claim);
                    Ownership::Confirmed
                }
                // Another request may have confirmed it meanwhile.
                Ownership::Unknown if vm.ownership.confirms(claim) => Ownership::Confirmed,
                other => other,
            },
        };
        if ownership == Ownership::Refuted {
            effects.push(Effect::Count(Counter::OwnershipRefuted));
        }
        match pipeline::authorize(&admitted, &policy, &config.routes, now_ms / 1000, ownership) {
            Ok(fwd) => {
                let grant = policy.grant(admitted.grant);
                let token_id = grant.map(|g| g.token_id().to_string()).unwrap_or_default();
                let user_id = grant.and_then(|g| policy.user(g.user)).map(|u| u.id.to_string()).unwrap_or_default();
                effects.push(Effect::Count(Counter::RequestsAllowed));
                effects.push(Effect::Audit { facts: self.facts.clone(), reason: None, remaining });
                for (name, _) in &headers {
                    if pipeline::is_stripped_header(name) {
                        effects.push(Effect::RemoveRequestHeader(name.clone()));
                    }
                }
                effects.push(Effect::SetRequestHeader(":method".into(), fwd.method));
                effects.push(Effect::SetRequestHeader(":path".into(), fwd.path));
                effects.push(Effect::SetRequestHeader("authorization".into(), format!("Bearer {}", fwd.credential)));
                effects.push(Effect::SetRequestHeader("x-mcp-token-id".into(), token_id));
                effects.push(Effect::SetRequestHeader("x-mcp-user-id".into(), user_id));
                let shape = match (&self.client, fwd.shaping) {
                    (Client::Tool(call), shaping) => Shape::Tool(Box::new(ToolAnswer {
                        call: call.clone(),
                        form: if shaping == Shaping::LogTail { Form::Log } else { Form::ByType },
                        projects: (shaping == Shaping::ProjectList).then(|| (policy.clone(), admitted.grant)),
                        status: 0,
                        content_type: String::new(),
                        limit: match shaping {
                            Shaping::LogTail => call.max_bytes.unwrap_or(config.max_log_bytes).min(config.max_log_bytes),
                            _ if key.class == Class::Artifact => u64::from(config.mcp_max_artifact_bytes),
                            _ => u64::from(config.mcp_max_result_bytes),
                        },
                        dropped: 0,
                    })),
                    (Client::Rest, Shaping::LogTail) => Shape::LogTail { max: config.max_log_bytes, total: None, seen: 0 },
                    (Client::Rest, Shaping::ProjectList) => Shape::ProjectList { policy: policy.clone(), grant: admitted.grant },
                    (Client::Rest, Shaping::None) => Shape::None,
                };
                self.state = State::Response { ratelimit, shape };
                Step { effects, flow: Flow::Continue }
            }
            Err(mut denial) => {
                denial.headers.extend(ratelimit);
                let hint = (denial.code == ErrorCode::ProjectForbidden).then(|| scope_hint(&policy, admitted.grant, now_ms / 1000));
                self.deny_with(denial, remaining, hint.flatten(), effects, vm, host)
            }
        }
    }

    fn deny(&mut self, denial: Denial, remaining: Option<u32>, hint: Option<String>, vm: &mut Vm<'_>, host: &dyn Host) -> Step {
        self.deny_with(denial, remaining, hint, Vec::new(), vm, host)
    }

    /// Answers a denial locally; audits it, or counts it into a coalesced row.
    fn deny_with(
        &mut self,
        denial: Denial,
        remaining: Option<u32>,
        hint: Option<String>,
        mut effects: Vec<Effect>,
        vm: &mut Vm<'_>,
        host: &dyn Host,
    ) -> Step {
        self.state = State::Done;
        let facts = &self.facts;
        let key = Key { address: host.client_address(), reason: denial.code.as_str().to_string(), token_id: facts.token_id.clone() };
        let sample = || Sample {
            method: facts.method.clone(),
            path: facts.path.clone(),
            route: facts.route.clone(),
            project: facts.project.clone(),
            user_id: facts.user_id.clone(),
            status: denial.status(),
        };
        // A tool call's denial is told apart by its tool: never coalesced.
        let audit = match self.client {
            Client::Rest => vm.coalescer.observe(key, sample, host.now_ms()),
            Client::Tool(_) => Audit::Record,
        };
        match audit {
            Audit::Record => effects.push(Effect::Audit {
                facts: self.facts.clone(),
                reason: Some(denial.code.as_str().to_string()),
                remaining,
            }),
            Audit::Counted => effects.push(Effect::Count(Counter::AuditCoalesced)),
        }
        effects.push(Effect::Count(Counter::RequestsDenied));
        effects.push(match &self.client {
            Client::Tool(call) => {
                json_reply(200, jsonrpc::result_json(&call.id, render::denial(&denial, hint.as_deref(), call.era)), Vec::new())
            }
            Client::Rest => {
                let extra = denial.headers.iter().map(|(k, v)| (k.to_string(), v.clone())).collect();
                json_reply(denial.status(), denial.body(&self.request_id).into_bytes(), extra)
            }
        });
        Step { effects, flow: Flow::Pause }
    }

    /// `GET /.well-known/oauth-protected-resource/api/v1/mcp` (RFC 9728).
    fn metadata(&mut self, head: &RequestHead<'_>, config: &PluginConfig) -> Step {
        self.state = State::Done;
        let reply = if matches!(head.method, "GET" | "HEAD") {
            let mut r = json_reply(200, mcp::resource_metadata(&origin(head), config), Vec::new());
            if let Effect::Reply { headers, .. } = &mut r {
                headers.retain(|(k, _)| k != "cache-control");
                headers.push(("cache-control".into(), "public, max-age=3600".into()));
            }
            r
        } else {
            json_reply(405, br#"{"error":"method_not_allowed","message":"GET only"}"#.to_vec(), vec![("allow".into(), "GET, HEAD".into())])
        };
        Step { effects: vec![reply], flow: Flow::Pause }
    }

    /// The MCP endpoint's head: method, secret placement, policy,
    /// authentication, body size and type. Then the body.
    fn endpoint_head(
        &mut self,
        head: &RequestHead<'_>,
        end_of_stream: bool,
        policy: Option<Rc<Policy>>,
        config: Rc<PluginConfig>,
        vm: &mut Vm<'_>,
        host: &dyn Host,
    ) -> Step {
        self.facts = RequestFacts::describe(head, vm.policy.as_deref(), &config.routes, true);
        if head.method != "POST" {
            // No server-initiated streams (GET) and no sessions (DELETE).
            let d = Denial::new(ErrorCode::MethodNotAllowed, "the MCP endpoint takes POST (JSON responses; no streams, no sessions)")
                .with_header("allow", "POST".into());
            return self.deny(d, None, None, vm, host);
        }
        if let Some(place) = credential::misplaced_secret(head) {
            let d = Denial::new(
                ErrorCode::CredentialMisplaced,
                format!("an MCP token belongs only in the Authorization header (Bearer); this request carries one in {}", place.as_str()),
            );
            return self.deny(d, None, None, vm, host);
        }
        let Some(policy) = policy else {
            // No policy here but one in the VM: it is too old.
            let d = if vm.policy.is_some() {
                policy_stale(&config, vm.policy_age_ms)
            } else {
                Denial::new(ErrorCode::PolicyUnavailable, "the gateway has not received its policy yet; retry shortly")
            };
            return self.deny(d, None, None, vm, host);
        };
        let authorization: Vec<&str> = head.values("authorization").collect();
        let grant = match pipeline::authenticate(&authorization, &policy, host.now_ms() / 1000) {
            Ok(g) => g,
            Err(mut d) => {
                let presented = !authorization.is_empty();
                for (k, v) in &mut d.headers {
                    if *k == "www-authenticate" {
                        *v = mcp::www_authenticate(&origin(head), presented);
                    }
                }
                let mut effects = Vec::new();
                let d = self.authentication_failed(&config, d, &mut effects, host);
                return self.deny_with(d, None, None, effects, vm, host);
            }
        };
        let max = u64::from(config.mcp_max_body_bytes);
        if head.values("content-length").any(|v| v.trim().parse::<u64>().map_or(true, |n| n > max)) {
            return self.deny(too_large(max), None, None, vm, host);
        }
        let json = head.values("content-type").next().is_some_and(|ct| {
            let essence = ct.split(';').next().unwrap_or_default().trim();
            essence.eq_ignore_ascii_case("application/json")
        });
        if !json {
            let d = Denial::new(ErrorCode::UnsupportedMediaType, "the MCP endpoint takes a JSON-RPC message as application/json");
            return self.deny(d, None, None, vm, host);
        }
        // The body is read as sent: an encoded one would be parsed as one
        // thing and forwarded as another.
        if head.values("content-encoding").any(|v| !v.trim().eq_ignore_ascii_case("identity")) {
            let d = Denial::new(ErrorCode::UnsupportedMediaType, "the MCP endpoint takes an unencoded body (no Content-Encoding)");
            return self.deny(d, None, None, vm, host);
        }
        // 2025-11-25: a server validates Origin (DNS rebinding): a browser
        // page may only call from the InfraBox host itself.
        if head.values("origin").any(|o| !origin_allowed(o, &config)) {
            let d = Denial::new(ErrorCode::OriginForbidden, "requests from a browser page of another origin are refused");
            return self.deny(d, None, None, vm, host);
        }
        self.state = State::Reading(Box::new(Reading { policy, config, grant, headers: head.headers.to_vec() }));
        if end_of_stream {
            return self.on_request_body(0, true, vm, host);
        }
        Step { effects: Vec::new(), flow: Flow::Pause }
    }

    /// Request body bytes arrived (`size`: all buffered so far).
    pub fn on_request_body(&mut self, size: usize, end_of_stream: bool, vm: &mut Vm<'_>, host: &dyn Host) -> Step {
        self.request_buffered = size;
        if let State::Early(early) = &mut self.state {
            early.body_end |= end_of_stream;
            return Step { effects: Vec::new(), flow: Flow::Pause };
        }
        let reading = match &self.state {
            State::Reading(r) => r,
            // The head waits for its rate-limit answer: the body waits with
            // it (going on here would forward the request undecided).
            State::Limit(_) => return Step { effects: Vec::new(), flow: Flow::Pause },
            _ => return Step::go(),
        };
        let max = reading.config.mcp_max_body_bytes;
        if size as u64 > u64::from(max) {
            return self.deny(too_large(u64::from(max)), None, None, vm, host);
        }
        if !end_of_stream {
            return Step { effects: Vec::new(), flow: Flow::Pause };
        }
        let State::Reading(reading) = std::mem::replace(&mut self.state, State::Done) else { return Step::go() };
        let Reading { policy, config, grant, headers } = *reading;
        let body = host.request_body(size);
        let mut effects = vec![Effect::Count(Counter::McpMessages)];
        let key = config.arguments_key;
        let message = match jsonrpc::parse(&body) {
            Ok(m) => m,
            Err(e) => {
                if let Some(d) = protocol_budget(&policy, grant, host) {
                    return self.deny_with(d, None, None, effects, vm, host);
                }
                return self.rpc_error(e, None, None, &key, effects);
            }
        };
        // An MCP secret in the body (raw, or behind JSON escapes) would
        // travel on, e.g. as a trigger variable into InfraBox's builds.
        let decoded = jsonrpc::canonical(&serde_json::Value::Object(message.params.clone()));
        if credential::contains_marker(&body) || credential::contains_marker(decoded.as_bytes()) {
            self.facts.mcp = Some(McpFacts::of(&message.method, None, None, &key));
            let d = Denial::new(
                ErrorCode::CredentialMisplaced,
                "an MCP token belongs only in the Authorization header (Bearer); this request carries one in its body",
            );
            return self.deny_with(d, None, None, effects, vm, host);
        }
        let allow_trigger = policy.grant(grant).is_some_and(|g| g.allow_trigger());
        let dispatch = mcp::dispatch(message, &RoutingHeaders::of(&headers), allow_trigger, &config);
        // Everything but a tool call is answered here, bounded per token
        // (tool calls have the route's rate limit).
        if !matches!(dispatch, Dispatch::Call { .. }) {
            if let Some(d) = protocol_budget(&policy, grant, host) {
                return self.deny_with(d, None, None, effects, vm, host);
            }
        }
        match dispatch {
            Dispatch::Answer { id, result, method } => {
                self.facts.mcp = Some(McpFacts::of(&method, None, None, &key));
                effects.push(Effect::Audit { facts: self.facts.clone(), reason: None, remaining: None });
                effects.push(json_reply(200, jsonrpc::result_json(&id, result), Vec::new()));
                Step { effects, flow: Flow::Pause }
            }
            Dispatch::Accepted { method } => {
                self.facts.mcp = Some(McpFacts::of(&method, None, None, &key));
                effects.push(Effect::Audit { facts: self.facts.clone(), reason: None, remaining: None });
                effects.push(Effect::Reply { status: 202, headers: Vec::new(), body: Vec::new() });
                Step { effects, flow: Flow::Pause }
            }
            Dispatch::Error { error, method, era } => self.rpc_error(error, method, era, &key, effects),
            Dispatch::Call { id, era, tool, arguments, call } => {
                // The tool call's own request: the client's headers but for
                // what described its JSON-RPC body (length, encodings, the
                // MCP routing headers), which the upstream request replaces.
                let dropped = |k: &str| matches!(k, "accept-encoding" | "content-encoding") || k.starts_with("mcp-");
                let removed: Vec<String> = headers.iter().filter(|(k, _)| dropped(k)).map(|(k, _)| k.clone()).collect();
                let mut synthetic: Vec<(String, String)> = headers
                    .into_iter()
                    .filter(|(k, _)| !matches!(k.as_str(), ":method" | ":path" | "content-length") && !dropped(k))
                    .collect();
                synthetic.push((":method".into(), call.method.clone()));
                synthetic.push((":path".into(), call.path.clone()));
                let head = RequestHead::new(&synthetic);
                let mcp_facts = McpFacts::of("tools/call", Some(&tool), Some(&arguments), &key);
                let admission = pipeline::admit(&head, Some(&policy), &config, host.now_ms() / 1000);
                self.facts = match &admission {
                    Admission::Admitted(a) => RequestFacts::of_admitted(&head, &policy, &config.routes, a),
                    _ => RequestFacts::describe(&head, Some(&policy), &config.routes, true),
                };
                // The client's method and path stay those it sent.
                self.facts.method = "POST".into();
                self.facts.path = mcp::ENDPOINT.into();
                self.facts.mcp = Some(mcp_facts);
                self.client = Client::Tool(ToolCall {
                    id,
                    era,
                    uri: format!("infrabox:/{}", call.path.trim_start_matches(crate::path::MCP_PREFIX)),
                    max_bytes: call.max_bytes,
                });
                let upstream_body = call.body.unwrap_or_default();
                effects.push(Effect::ReplaceRequestBody(upstream_body.clone()));
                effects.push(Effect::SetRequestHeader("content-length".into(), upstream_body.len().to_string()));
                effects.extend(removed.into_iter().map(Effect::RemoveRequestHeader));
                let mut step = self.admitted(admission, Some(policy), config, synthetic, vm, host);
                effects.append(&mut step.effects);
                Step { effects, flow: step.flow }
            }
        }
    }

    /// Request trailers arrived: the body has ended. While the head waits
    /// (body, or rate-limit answer), nothing may go on — going on here would
    /// forward the request undecided.
    pub fn on_request_trailers(&mut self, vm: &mut Vm<'_>, host: &dyn Host) -> Step {
        match self.state {
            State::Reading(_) | State::Early(_) => self.on_request_body(self.request_buffered, true, vm, host),
            State::Limit(_) => Step { effects: Vec::new(), flow: Flow::Pause },
            _ => Step::go(),
        }
    }

    /// Response trailers arrived: a body being shaped ends here.
    pub fn on_response_trailers(&mut self, host: &dyn Host) -> Step {
        match &self.state {
            State::Response { shape: Shape::None, .. } | State::Response { shape: Shape::LogTail { total: Some(_), .. }, .. } => {
                Step::go()
            }
            State::Response { .. } => self.on_response_body(self.response_buffered, true, host),
            _ => Step::go(),
        }
    }

    /// A JSON-RPC error answer (audited as a denial named after its code).
    /// `era`: the revision, when the request got far enough to tell.
    fn rpc_error(&mut self, error: RpcError, method: Option<String>, era: Option<Era>, key: &[u8; 32], mut effects: Vec<Effect>) -> Step {
        self.state = State::Done;
        self.facts.mcp = Some(McpFacts::of(method.as_deref().unwrap_or("-"), None, None, key));
        effects.push(Effect::Audit { facts: self.facts.clone(), reason: Some(error.reason().into()), remaining: None });
        effects.push(Effect::Count(Counter::RequestsDenied));
        effects.push(json_reply(error.http_status(era), error.to_json(), Vec::new()));
        Step { effects, flow: Flow::Pause }
    }

    /// The response head arrived. `status`: `:status`.
    pub fn on_response_headers(&mut self, status: Option<&str>, content_length: Option<u64>, content_type: Option<&str>, end_of_stream: bool) -> Step {
        let State::Response { ratelimit, shape } = &mut self.state else { return Step::go() };
        let mut effects: Vec<Effect> =
            ratelimit.drain(..).map(|(k, v)| Effect::SetResponseHeader(k.to_string(), Some(v))).collect();
        let ok = status.and_then(|s| s.parse::<u16>().ok()).is_some_and(|s| (200..300).contains(&s));
        let set = |k: &str, v: Option<String>| Effect::SetResponseHeader(k.to_string(), v);
        // Envoy's proxy-wasm host turns a paused header callback into
        // StopAllIteration, so the body would never arrive: the headers go
        // on now and everything about the shaped body is decided here.
        match shape {
            Shape::Tool(answer) => {
                answer.status = status.and_then(|s| s.parse().ok()).unwrap_or(0);
                answer.content_type = content_type.unwrap_or_default().to_string();
                effects.push(Effect::AuditResult { upstream_status: answer.status });
                if end_of_stream {
                    // No body to replace: answer now (a local reply replaces the response).
                    let result = self.tool_result(&[], 0, 0);
                    self.state = State::Done;
                    effects.push(json_reply(200, result, Vec::new()));
                    return Step { effects, flow: Flow::Pause };
                }
                effects.push(set(":status", Some("200".into())));
                effects.push(set("content-type", Some("application/json".into())));
                effects.push(set("cache-control", Some("no-store".into())));
                for h in ["content-length", "content-disposition", "content-encoding", "etag", "last-modified", "set-cookie"] {
                    effects.push(set(h, None));
                }
            }
            _ if !ok || end_of_stream => *shape = Shape::None,
            Shape::LogTail { max, total, .. } => {
                effects.push(set("x-mcp-log-max-bytes", Some(max.to_string())));
                match content_length {
                    Some(n) => {
                        let truncated = n > *max;
                        effects.push(set("x-mcp-log-truncated", Some(truncated.to_string())));
                        effects.push(set("x-mcp-log-original-length", Some(n.to_string())));
                        if truncated {
                            effects.push(set("content-length", Some(max.to_string())));
                            *total = Some(n);
                        } else {
                            *shape = Shape::None;
                        }
                    }
                    None => {
                        // A streamed console of unknown length: its tail is
                        // still cut to max_log_bytes.
                        effects.push(set("x-mcp-log-truncated", Some("unknown".into())));
                        effects.push(set("content-length", None));
                    }
                }
            }
            Shape::ProjectList { .. } => effects.push(set("content-length", None)),
            Shape::None => {}
        }
        Step { effects, flow: Flow::Continue }
    }

    /// Response body bytes arrived (`size`: what the host holds now).
    pub fn on_response_body(&mut self, size: usize, end_of_stream: bool, host: &dyn Host) -> Step {
        self.response_buffered = size;
        let State::Response { shape, .. } = &mut self.state else { return Step::go() };
        let mut effects = Vec::new();
        let cut = |len: usize| Effect::ReplaceResponseBody { start: 0, len, bytes: Vec::new() };
        match shape {
            Shape::None => return Step::go(),
            Shape::LogTail { max, total: Some(total), seen } => {
                let drop = shaping::tail_drop(*total, *max, *seen, size);
                *seen += size as u64;
                if drop > 0 {
                    effects.push(cut(drop));
                }
                if !end_of_stream {
                    return Step { effects, flow: Flow::Continue };
                }
            }
            Shape::LogTail { max, total: None, .. } => {
                let excess = shaping::tail_excess(size, *max);
                if excess > 0 {
                    effects.push(cut(excess));
                }
                if !end_of_stream {
                    return Step { effects, flow: Flow::Pause };
                }
            }
            Shape::ProjectList { policy, grant } => {
                if !end_of_stream {
                    return Step { effects, flow: Flow::Pause };
                }
                let body = host.response_body(size);
                let out = filter_projects(policy, *grant, &body, host.now_ms() / 1000);
                effects.push(Effect::ReplaceResponseBody { start: 0, len: size, bytes: out });
            }
            Shape::Tool(answer) => {
                // Keep the log's tail; past the limit, keep nothing else.
                let excess = if answer.form == Form::Log {
                    shaping::tail_excess(size, answer.limit)
                } else if size as u64 > answer.limit {
                    size
                } else {
                    0
                };
                if excess > 0 {
                    answer.dropped += excess as u64;
                    effects.push(cut(excess));
                }
                if !end_of_stream {
                    return Step { effects, flow: Flow::Pause };
                }
                let kept = size.saturating_sub(excess);
                let body = if kept > 0 { host.response_body(size).get(excess..).map(<[u8]>::to_vec).unwrap_or_default() } else { Vec::new() };
                let result = self.tool_result(&body, kept, host.now_ms() / 1000);
                effects.push(Effect::ReplaceResponseBody { start: 0, len: kept, bytes: result });
            }
        }
        self.state = State::Done;
        Step { effects, flow: Flow::Continue }
    }

    /// The JSON-RPC answer of a finished tool call with `body` kept.
    fn tool_result(&self, body: &[u8], kept: usize, now: i64) -> Vec<u8> {
        let State::Response { shape: Shape::Tool(a), .. } = &self.state else { return Vec::new() };
        let filtered;
        let body = match &a.projects {
            Some((policy, grant)) if (200..300).contains(&a.status) && a.dropped == 0 => {
                filtered = filter_projects(policy, *grant, body, now);
                filtered.as_slice()
            }
            _ => body,
        };
        let answer = render::Answer {
            status: a.status,
            content_type: &a.content_type,
            body,
            total: a.dropped + kept as u64,
            limit: a.limit,
            uri: &a.call.uri,
        };
        jsonrpc::result_json(&a.call.id, render::answer(&answer, a.form, a.call.era))
    }
}

/// The project list with only the token's projects; an empty list when it
/// cannot be read (fail closed on content: never an unfiltered list).
fn filter_projects(policy: &Policy, grant: u32, body: &[u8], now: i64) -> Vec<u8> {
    let shaped = policy.grant(grant).map(|g| {
        let scope: Vec<&str> = policy.projects_in_scope(g, now).collect();
        shaping::filter_project_list(body, |id| scope.contains(&id))
    });
    match shaped {
        Some(Ok(out)) => out,
        _ => b"[]".to_vec(),
    }
}

/// What a tool call outside the token's scope is told it may access.
fn scope_hint(policy: &Policy, grant: u32, now: i64) -> Option<String> {
    let g = policy.grant(grant)?;
    let projects: Vec<&str> = policy.projects_in_scope(g, now).take(20).collect();
    Some(if projects.is_empty() {
        "this token may access no project now (list_projects shows them)".to_string()
    } else {
        format!("this token may access projects {} (list_projects shows them)", projects.join(", "))
    })
}

/// The bound on what a token sends the endpoint besides tool calls
/// (initialize, discover, tools/list, notifications, malformed messages):
/// twice its user's `default` limit per window, per Envoy instance, kept in
/// the local window — every such message is an audit row, and none has a
/// route to rate-limit it. `None`: within the bound.
fn protocol_budget(policy: &Policy, grant: u32, host: &dyn Host) -> Option<Denial> {
    let g = policy.grant(grant)?;
    let limit = policy.limit(Class::Default).saturating_mul(2).max(10);
    let window = policy.limits.window_seconds;
    let d = host.local_window(&format!("mcp_pm:{}", g.token_id()), limit, window, host.now_ms());
    if d.allowed {
        return None;
    }
    Some(
        Denial::new(
            ErrorCode::RateLimited,
            format!(
                "more than {limit} MCP messages other than tool calls in {window} s from this token; retry in {} s",
                d.retry_after()
            ),
        )
        .with_header("retry-after", d.retry_after().to_string()),
    )
}

fn policy_stale(config: &PluginConfig, age_ms: i64) -> Denial {
    Denial::new(
        ErrorCode::PolicyStale,
        format!(
            "the gateway has not heard from its control plane for {} s (more than {} s), so revocations may be missing; \
             MCP requests are refused until it is back — retry shortly",
            age_ms / 1000,
            config.max_policy_age_seconds
        ),
    )
}

fn too_large(max: u64) -> Denial {
    Denial::new(ErrorCode::RequestTooLarge, format!("an MCP request body is at most {max} bytes"))
}

fn json_reply(status: u32, body: Vec<u8>, mut headers: Vec<(String, String)>) -> Effect {
    headers.insert(0, ("content-type".into(), "application/json".into()));
    headers.insert(1, ("cache-control".into(), "no-store".into()));
    Effect::Reply { status, headers, body }
}

/// Whether an `Origin` header names an InfraBox host (`scheme://host[:port]`).
fn origin_allowed(origin: &str, config: &PluginConfig) -> bool {
    let Some((scheme, authority)) = origin.trim().split_once("://") else { return false };
    matches!(scheme, "http" | "https") && !authority.contains('/') && config.hosts.matches(authority)
}

/// `scheme://authority` of a request, for the URLs the endpoint names.
fn origin(head: &RequestHead<'_>) -> String {
    let scheme = head
        .values("x-forwarded-proto")
        .next()
        .or_else(|| head.values(":scheme").next())
        .filter(|s| matches!(*s, "http" | "https"))
        .unwrap_or("https");
    let authority: String = head.authority.chars().filter(|c| c.is_ascii_graphic() && !matches!(c, '"' | '\\')).collect();
    format!("{scheme}://{authority}")
}

#[cfg(test)]
mod tests;
