//! proxy-wasm adapter: registers the root context with Envoy. Every decision
//! is made by `mcp_filter_core`; the modules here only move bytes between
//! Envoy's host calls and the core.
//!
//! - [`host`]: fallible wrappers around the host calls (the SDK's trait
//!   methods unwrap, which would abort the VM on odd input).
//! - [`feed`]: the root context, which pulls the policy snapshot.
//! - [`request`]: the per-request context that runs the pipeline.
//! - [`metrics`]: the filter's Envoy counters and gauges.
//! - [`limiter`]: the rate-limit callout and the local window of degraded mode.
//! - [`audit`]: the audit record of each final decision, as filter state.

mod audit;
mod feed;
mod host;
mod limiter;
mod metrics;
mod request;

use proxy_wasm::types::LogLevel;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|context_id| -> Box<dyn proxy_wasm::traits::RootContext> {
        Box::new(feed::Root::new(context_id))
    });
}}
