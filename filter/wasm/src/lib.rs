//! proxy-wasm adapter: registers the root context with Envoy. Every decision
//! is made by `mcp_filter_core`; the modules here only move bytes between
//! Envoy's host calls and the core.
//!
//! - [`host`]: fallible wrappers around the host calls (the SDK's trait
//!   methods unwrap, which would abort the VM on odd input).
//! - [`feed`]: the root context, which pulls the policy snapshot.
//! - [`request`]: the per-request context that runs the pipeline.
//! - [`metrics`]: the filter's Envoy counters and gauges.

mod feed;
mod host;
mod metrics;
mod request;

use proxy_wasm::types::LogLevel;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn proxy_wasm::traits::RootContext> {
        Box::new(feed::Root::new())
    });
}}
