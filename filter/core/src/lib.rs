//! Host-agnostic core of the InfraBox MCP gateway filter.
//!
//! Every decision the filter makes lives here, free of proxy-wasm, so it is
//! unit- and property-tested natively and reused by the control plane for
//! the wire contract (token format, snapshot, audit record, RLS messages).
//!
//! **The shape.** A request's whole life is one state machine,
//! [`exchange::Exchange`]: the proxy-wasm adapter (`filter/wasm`) feeds it
//! Envoy's events — request head, request body, the rate-limit answer,
//! response head, response body — and carries out the [`exchange::Effect`]s
//! each step returns (local replies, header and body rewrites, the
//! rate-limit callout, audit records, counters), in order. The adapter
//! decides nothing; what the machine must ask mid-decision (clock, client
//! address, the shared-memory local window, buffered bodies) goes through
//! the small [`exchange::Host`] trait, which the tests implement natively.
//! REST requests on `/api/v1/mcp/*` and MCP tool calls on `/api/v1/mcp`
//! take the same states and the same code ([`pipeline::admit`], the rate
//! limit, [`pipeline::authorize`]); an MCP call only enters through the body
//! ([`mcp`]) and leaves as a tool result.
//!
//! Layout, one concept per module:
//! - [`exchange`]: the state machine and its effects; [`pipeline`]: the
//!   pure decisions of DESIGN §4 (`admit`, `authorize`).
//! - [`mcp`]: the MCP endpoint — strict JSON-RPC, both protocol revisions,
//!   the tools derived from [`route`], tool results.
//! - [`authority`], [`path`], [`credential`], [`token`]: where a request is
//!   and what credential it carries; [`route`]: the route table.
//! - [`snapshot`], [`policy`]: the policy data and its compiled index.
//! - [`rls`], [`window`], [`ownership`]: the rate-limit protocol, the
//!   sliding window, ownership of builds and jobs.
//! - [`audit`], [`coalesce`], [`denial`], [`shaping`], [`config`].

pub mod authority;
pub mod credential;
pub mod ownership;
pub mod path;
pub mod route;
pub mod snapshot;
pub mod signature;
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
pub mod exchange;
pub mod mcp;
