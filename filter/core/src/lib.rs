//! Host-agnostic core of the InfraBox MCP gateway filter.
//!
//! Every decision the filter makes lives here, free of proxy-wasm, so it is
//! unit- and property-tested natively and reused by the control plane for
//! the wire contract (token format, snapshot). The proxy-wasm adapter in
//! `filter/wasm` only moves bytes between Envoy and [`pipeline`].

pub mod authority;
pub mod credential;
pub mod ownership;
pub mod path;
pub mod route;
pub mod snapshot;
pub mod policy;
pub mod token;
pub mod denial;
pub mod pipeline;
pub mod config;
pub mod shaping;
pub mod rls;
pub mod window;
pub mod audit;
pub mod coalesce;
