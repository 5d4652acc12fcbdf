//! The per-request context: reads the request head, runs the core pipeline
//! and carries out its decision — pass through, local JSON reply, or a
//! rewritten request with the user's upstream credential.

use std::rc::Rc;

use mcp_filter_core::denial::Denial;
use mcp_filter_core::pipeline::{self, Admission, Forward, RequestHead};
use mcp_filter_core::route::Shaping;
use mcp_filter_core::shaping;
use mcp_filter_core::snapshot::Policy;
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::Action;

use crate::feed::Shared;
use crate::host;
use crate::metrics::Metrics;

/// Client headers that never reach the upstream on an MCP request (plus
/// every `x-mcp-*`).
const STRIPPED: [&str; 3] = ["authorization", "cookie", "x-original-method"];

pub struct McpRequest {
    _context_id: u32,
    shared: Rc<Shared>,
    /// Set when the forwarded route's response must be shaped.
    shaping: Option<ResponseShaping>,
}

/// State of a response being shaped.
struct ResponseShaping {
    kind: Shaping,
    policy: Rc<Policy>,
    grant: u32,
    max_log_bytes: u64,
    /// Bytes currently buffered after trimming.
    buffered: usize,
    /// Bytes the upstream sent so far.
    original: u64,
}

impl McpRequest {
    pub fn new(context_id: u32, shared: Rc<Shared>) -> Self {
        Self { _context_id: context_id, shared, shaping: None }
    }

    fn deny(&self, denial: &Denial, request_id: &str) -> Action {
        Metrics::inc(self.shared.metrics().requests_denied);
        let body = denial.body(request_id);
        let mut headers: Vec<(&str, &str)> = vec![("content-type", "application/json"), ("cache-control", "no-store")];
        headers.extend(denial.headers.iter().map(|(k, v)| (*k, v.as_str())));
        host::send_response(denial.status(), headers, body.as_bytes());
        Action::Pause
    }

    fn forward(&self, fwd: &Forward, headers: &[(String, String)], token_id: &str, user_id: &str) -> Action {
        Metrics::inc(self.shared.metrics().requests_allowed);
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
}

impl Context for McpRequest {}

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
                match pipeline::authorize(&admitted, &policy, &config.routes, now) {
                    Ok(fwd) => {
                        if fwd.shaping != Shaping::None {
                            self.shaping = Some(ResponseShaping {
                                kind: fwd.shaping,
                                policy: policy.clone(),
                                grant: admitted.grant,
                                max_log_bytes: config.max_log_bytes,
                                buffered: 0,
                                original: 0,
                            });
                        }
                        let grant = policy.grant(admitted.grant);
                        let token_id = grant.map(|g| g.token_id()).unwrap_or_default();
                        let user_id = grant.and_then(|g| policy.user(g.user)).map(|u| &*u.id).unwrap_or_default();
                        self.forward(&fwd, &headers, token_id, user_id)
                    }
                    Err(d) => self.deny(&d, request_id),
                }
            }
        }
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        let Some(_) = &self.shaping else { return Action::Continue };
        let ok = host::response_header(":status").as_deref() == Some("200");
        if !ok || end_of_stream {
            self.shaping = None;
            return Action::Continue;
        }
        // Hold the headers until the body is complete, so content-length
        // and the truncation headers can be set.
        Action::Pause
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        let Some(sh) = self.shaping.as_mut() else { return Action::Continue };
        match sh.kind {
            Shaping::LogTail => {
                sh.original += body_size.saturating_sub(sh.buffered) as u64;
                let excess = shaping::tail_excess(body_size, sh.max_log_bytes);
                if excess > 0 {
                    host::set_response_body(0, excess, b"");
                }
                sh.buffered = body_size - excess;
                if !end_of_stream {
                    return Action::Pause;
                }
                let truncated = sh.original > sh.max_log_bytes;
                host::set_response_header("content-length", Some(&sh.buffered.to_string()));
                host::set_response_header("x-mcp-log-truncated", Some(if truncated { "true" } else { "false" }));
                host::set_response_header("x-mcp-log-original-length", Some(&sh.original.to_string()));
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
                        log::warn!("cannot filter the project list: {e}");
                        host::set_response_header(":status", Some("502"));
                        host::set_response_header("content-type", Some("application/json"));
                        br#"{"error":"upstream_error","message":"InfraBox returned a project list the gateway cannot read"}"#.to_vec()
                    }
                    None => b"[]".to_vec(),
                };
                host::set_response_body(0, body_size, &out);
                host::set_response_header("content-length", Some(&out.len().to_string()));
            }
            Shaping::None => {}
        }
        self.shaping = None;
        Action::Continue
    }
}
