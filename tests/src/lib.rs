//! End-to-end test harness of the InfraBox MCP gateway: managed child
//! processes (Postgres, Redis, and later Envoy and the control plane), free
//! ports, InfraBox session/global-token signing, InfraBox's own tables, a
//! fake InfraBox upstream and a raw HTTP/1.1 client for attack tests.

pub mod bench;
pub mod drills;
pub mod fake_infrabox;
pub mod http;
pub mod infrabox_db;
pub mod ports;
pub mod postgres;
pub mod process;
pub mod ratelimit_model;
pub mod redis;
pub mod redis_cluster;
pub mod scratch;
pub mod session;
pub mod control_plane;
pub mod container;
pub mod envoy;
pub mod stack;
