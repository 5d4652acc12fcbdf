//! The limiter's storage contract: a [`WindowStore`] decides one request
//! for one (user, class) window atomically, against its own clock. The gRPC
//! service only translates; Redis ([`super::redis_store`]) is the store the
//! control plane runs with.

use std::future::Future;
use std::time::Duration;

/// Prefix of every key the limiter writes.
pub const KEY_PREFIX: &str = "ib_mcp_rl";

/// Whose budget a request counts against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowKey<'a> {
    pub user: &'a str,
    pub class: &'a str,
}

impl WindowKey<'_> {
    /// `ib_mcp_rl:{<user>}:<class>`: hash-tagged by user, so one user's
    /// windows live in one Redis Cluster slot.
    pub fn storage_key(&self) -> String {
        format!("{KEY_PREFIX}:{{{}}}:{}", self.user, self.class)
    }
}

/// A limit: `requests` per sliding `window`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    pub requests: u32,
    pub window: Duration,
}

/// One decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// Requests left in the window after this one (0 when denied).
    pub remaining: u32,
    /// Until the oldest counted request leaves the window (the whole window
    /// when none is counted).
    pub reset: Duration,
    /// The store's clock when it decided, microseconds since the epoch.
    pub at_us: u64,
}

/// The store could not decide (unreachable, timed out, bad reply). The
/// text never contains connection secrets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreError(pub String);

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for StoreError {}

/// Exact sliding windows, one atomic decision per call.
pub trait WindowStore: Send + Sync + 'static {
    /// Admits the request if fewer than `limit.requests` were admitted in
    /// the last `limit.window`, recording it; a denial records nothing.
    fn admit(&self, key: &WindowKey<'_>, limit: Limit) -> impl Future<Output = Result<Decision, StoreError>> + Send;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_hash_tagged_by_user() {
        let k = WindowKey { user: "6f1c0b1e-0000-4000-8000-000000000001", class: "log" };
        assert_eq!(k.storage_key(), "ib_mcp_rl:{6f1c0b1e-0000-4000-8000-000000000001}:log");
    }
}
