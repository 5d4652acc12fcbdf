//! Credentials of the internal protocols (DESIGN §16): the snapshot
//! endpoint and the coalesced-audit endpoint (`Authorization: Bearer
//! <snapshot secret>`), and the gRPC rate-limit and access-log services
//! (`authorization: Bearer <gRPC secret>` metadata, which Envoy sends as
//! `initial_metadata` and the filter with `dispatch_grpc_call`). Anyone who
//! could reach the gRPC listener could otherwise spend another user's
//! budget or forge audit rows and gaps.
//!
//! Secrets are compared in constant time (SHA-256 of both sides) and never
//! logged; refusals are counted per service in
//! `mcp_internal_unauthenticated_total{service}`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use sha2::{Digest, Sha256};

/// A bearer secret, kept as its digest.
#[derive(Clone)]
pub struct BearerSecret {
    digest: [u8; 32],
}

impl std::fmt::Debug for BearerSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BearerSecret(…)")
    }
}

impl BearerSecret {
    pub fn new(secret: &str) -> Self {
        Self { digest: Sha256::digest(secret.as_bytes()).into() }
    }

    /// Whether `value` (an `Authorization` header or metadata value) is
    /// `Bearer <secret>`, the scheme in any case.
    pub fn admits(&self, value: Option<&str>) -> bool {
        let Some((scheme, presented)) = value.map(str::trim).and_then(|v| v.split_once(' ')) else { return false };
        if !scheme.eq_ignore_ascii_case("bearer") {
            return false;
        }
        let presented: [u8; 32] = Sha256::digest(presented.trim().as_bytes()).into();
        presented.iter().zip(self.digest.iter()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
    }

    /// A tonic interceptor that refuses calls without the secret as
    /// `UNAUTHENTICATED`, counting them under `service`.
    pub fn interceptor(
        &self,
        metrics: Arc<InternalAuthMetrics>,
        service: Service,
    ) -> impl FnMut(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> + Clone {
        let secret = self.clone();
        move |req: tonic::Request<()>| {
            let value = req.metadata().get("authorization").and_then(|v| v.to_str().ok());
            if secret.admits(value) {
                Ok(req)
            } else {
                metrics.refused(service);
                Err(tonic::Status::unauthenticated("this service needs the gateway's internal credential"))
            }
        }
    }
}

/// The internal services that check a credential.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    RateLimit,
    AccessLog,
    Snapshot,
    AuditSummaries,
}

impl Service {
    const ALL: [Service; 4] = [Service::RateLimit, Service::AccessLog, Service::Snapshot, Service::AuditSummaries];

    fn label(self) -> &'static str {
        match self {
            Service::RateLimit => "ratelimit",
            Service::AccessLog => "accesslog",
            Service::Snapshot => "snapshot",
            Service::AuditSummaries => "audit_summaries",
        }
    }
}

/// Refused calls per service.
#[derive(Debug, Default)]
pub struct InternalAuthMetrics {
    refused: [AtomicU64; 4],
}

impl InternalAuthMetrics {
    pub fn refused(&self, service: Service) {
        if let Some(c) = self.refused.get(service as usize) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn count(&self, service: Service) -> u64 {
        self.refused.get(service as usize).map_or(0, |c| c.load(Ordering::Relaxed))
    }

    /// Prometheus text.
    pub fn render(&self, out: &mut String) {
        out.push_str("# HELP mcp_internal_unauthenticated_total Internal calls refused for a missing or wrong credential.\n");
        out.push_str("# TYPE mcp_internal_unauthenticated_total counter\n");
        for s in Service::ALL {
            out.push_str(&format!("mcp_internal_unauthenticated_total{{service=\"{}\"}} {}\n", s.label(), self.count(s)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_exact_secret_is_admitted() {
        let s = BearerSecret::new("0123456789abcdef-secret");
        assert!(s.admits(Some("Bearer 0123456789abcdef-secret")));
        assert!(s.admits(Some("bearer  0123456789abcdef-secret ")));
        for bad in ["", "Bearer", "Bearer ", "Basic 0123456789abcdef-secret", "Bearer 0123456789abcdef-secreT", "0123456789abcdef-secret"] {
            assert!(!s.admits(Some(bad)), "{bad}");
        }
        assert!(!s.admits(None));
        assert!(!format!("{s:?}").contains("secret"));
    }

    #[test]
    fn the_interceptor_refuses_and_counts() {
        let metrics = Arc::new(InternalAuthMetrics::default());
        let mut check = BearerSecret::new("0123456789abcdef-secret").interceptor(metrics.clone(), Service::RateLimit);
        let mut ok = tonic::Request::new(());
        if let Ok(v) = "Bearer 0123456789abcdef-secret".parse() {
            ok.metadata_mut().insert("authorization", v);
        }
        assert!(check(ok).is_ok());
        let refused = check(tonic::Request::new(()));
        assert_eq!(refused.map_err(|s| s.code()).err(), Some(tonic::Code::Unauthenticated));
        assert_eq!((metrics.count(Service::RateLimit), metrics.count(Service::AccessLog)), (1, 0));
        let mut text = String::new();
        metrics.render(&mut text);
        assert!(text.contains("mcp_internal_unauthenticated_total{service=\"ratelimit\"} 1"));
    }
}
