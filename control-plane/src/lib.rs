//! Control plane of the InfraBox MCP gateway: the session-authenticated
//! token API, the policy snapshot the Envoy filter pulls, and the schema
//! migrations. See `server` for how the pieces are wired.

pub mod audit;
pub mod config;
pub mod credential;
pub mod error;
pub mod expiry;
pub mod internal_auth;
pub mod migrate;
pub mod ownership;
pub mod ratelimit;
pub mod server;
pub mod session;
pub mod snapshot;
pub mod token_api;
