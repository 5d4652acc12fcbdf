//! Rate limiting (DESIGN §9): exact sliding windows per (user, class) in
//! Redis, answered to Envoy's rate-limit protocol.
//!
//! A library with its storage behind a trait, and a thin gRPC shell:
//!
//! - [`store`] — the [`WindowStore`](store::WindowStore) contract, keys,
//!   limits and decisions;
//! - [`redis_store`] — the Redis store (Lua script, `EVALSHA`, Redis `TIME`);
//! - [`service`] — `envoy.service.ratelimit.v3.RateLimitService`;
//! - [`metrics`] — decision and Redis latency counters for `/metrics`;
//! - [`coalesce`] — batched writes on the gRPC listener (fewer system calls
//!   per answer under load).

pub mod coalesce;
pub mod metrics;
pub mod redis_store;
pub mod service;
pub mod store;
