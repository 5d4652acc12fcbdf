//! The few messages of `envoy.service.ratelimit.v3.RateLimitService` the
//! filter sends and reads (DESIGN §9), encoded by hand: the wasm filter
//! cannot link Envoy's generated types, and these messages are tiny.
//!
//! Request: domain, one descriptor `[("user", id), ("class", class)]` (plus
//! `("window_seconds", n)` when the window is not a whole protobuf unit) and
//! a `limit` override, and, for a path naming builds or jobs, the ownership
//! descriptor (DESIGN §4 step 5, [`crate::ownership`]). Response: from the
//! first status the limit's code, `limit_remaining` and
//! `duration_until_reset`; from the second the ownership verdict.
//!
//! The call carries the gRPC secret as `authorization: Bearer <secret>`
//! metadata ([`METADATA_KEY`], DESIGN §16).

/// gRPC service and method names.
pub const SERVICE: &str = "envoy.service.ratelimit.v3.RateLimitService";
pub const METHOD: &str = "ShouldRateLimit";
/// Rate-limit domain of the gateway.
pub const DOMAIN: &str = "infrabox-mcp";
/// The metadata key of the internal gRPC credential (DESIGN §16).
pub const METADATA_KEY: &str = "authorization";

use crate::ownership::{Claim, Ownership};

/// `RateLimitResponse.RateLimit.Unit` values.
pub mod unit {
    pub const SECOND: u64 = 1;
    pub const MINUTE: u64 = 2;
    pub const HOUR: u64 = 3;
    pub const DAY: u64 = 4;
}

/// The protobuf unit for a window, if the window is exactly one unit.
pub fn unit_for_window(window_seconds: u32) -> Option<u64> {
    match window_seconds {
        1 => Some(unit::SECOND),
        60 => Some(unit::MINUTE),
        3600 => Some(unit::HOUR),
        86400 => Some(unit::DAY),
        _ => None,
    }
}

/// Window length a unit stands for.
pub fn window_for_unit(unit: u64) -> Option<u32> {
    match unit {
        unit::SECOND => Some(1),
        unit::MINUTE => Some(60),
        unit::HOUR => Some(3600),
        unit::DAY => Some(86400),
        _ => None,
    }
}

/// Encodes a `RateLimitRequest`: the (user, class) descriptor with its
/// limit and, when the request names builds or jobs, the ownership
/// descriptor `[("project", p), ("build", b)?, ("job", j)?]` (no limit:
/// the service answers it from InfraBox's database, see [`Answer`]).
pub fn encode_request(user: &str, class: &str, limit: u32, window_seconds: u32, claim: Option<&Claim>) -> Vec<u8> {
    let entry = |k: &str, v: &str, out: &mut Vec<u8>| {
        let mut e = Vec::with_capacity(k.len() + v.len() + 4);
        put_bytes(&mut e, 1, k.as_bytes());
        put_bytes(&mut e, 2, v.as_bytes());
        put_bytes(out, 1, &e);
    };
    let mut descriptor = Vec::with_capacity(96);
    entry("user", user, &mut descriptor);
    entry("class", class, &mut descriptor);
    let unit = unit_for_window(window_seconds);
    if unit.is_none() {
        entry("window_seconds", &window_seconds.to_string(), &mut descriptor);
    }
    let mut over = Vec::with_capacity(8);
    put_varint_field(&mut over, 1, u64::from(limit));
    put_varint_field(&mut over, 2, unit.unwrap_or(unit::SECOND));
    put_bytes(&mut descriptor, 2, &over);

    let mut req = Vec::with_capacity(descriptor.len() + 160);
    put_bytes(&mut req, 1, DOMAIN.as_bytes());
    put_bytes(&mut req, 2, &descriptor);
    if let Some(claim) = claim {
        let mut ownership = Vec::with_capacity(160);
        entry(OWNERSHIP_PROJECT, &claim.project, &mut ownership);
        if let Some(b) = &claim.build {
            entry(OWNERSHIP_BUILD, b, &mut ownership);
        }
        if let Some(j) = &claim.job {
            entry(OWNERSHIP_JOB, j, &mut ownership);
        }
        put_bytes(&mut req, 2, &ownership);
    }
    put_varint_field(&mut req, 3, 1);
    req
}

/// Entry keys of the ownership descriptor.
pub const OWNERSHIP_PROJECT: &str = "project";
pub const OWNERSHIP_BUILD: &str = "build";
pub const OWNERSHIP_JOB: &str = "job";

/// What the rate-limit service answered about the limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    pub over_limit: bool,
    pub remaining: u32,
    /// Milliseconds until the oldest counted request leaves the window.
    pub reset_ms: u64,
}

/// The whole answer: the limit (first descriptor status; `None` when the
/// service could not decide it, `UNKNOWN`: its store failed, while it still
/// answered the ownership) and, when an ownership descriptor was sent, its
/// status: `OK` the ids belong to the project, `OVER_LIMIT` they do not (or
/// do not exist), `UNKNOWN` (or no status) the service could not tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Answer {
    pub limit: Option<Verdict>,
    pub ownership: Ownership,
}

/// Decodes a `RateLimitResponse`. A response without statuses is an error.
pub fn decode_response(buf: &[u8]) -> Result<Answer, &'static str> {
    let mut statuses = Vec::with_capacity(2);
    let mut r = Reader { buf, pos: 0 };
    while let Some((field, wire)) = r.key()? {
        match (field, wire) {
            (2, 2) => {
                let status = r.bytes()?;
                if statuses.len() < 2 {
                    statuses.push(decode_status(status)?);
                }
            }
            _ => r.skip(wire)?,
        }
    }
    let limit = match statuses.first() {
        Some(&(1, remaining, reset_ms)) => Some(Verdict { over_limit: false, remaining: remaining.min(u64::from(u32::MAX)) as u32, reset_ms }),
        Some(&(2, _, reset_ms)) => Some(Verdict { over_limit: true, remaining: 0, reset_ms }),
        Some(_) => None,
        None => return Err("rate-limit response has no status"),
    };
    let ownership = match statuses.get(1) {
        Some((1, _, _)) => Ownership::Confirmed,
        Some((2, _, _)) => Ownership::Refuted,
        _ => Ownership::Unknown,
    };
    Ok(Answer { limit, ownership })
}

/// (code, limit_remaining, duration_until_reset in ms) of a `DescriptorStatus`.
fn decode_status(status: &[u8]) -> Result<(u64, u64, u64), &'static str> {
    let (mut code, mut remaining, mut reset_ms) = (0u64, 0u64, 0u64);
    let mut s = Reader { buf: status, pos: 0 };
    while let Some((f, w)) = s.key()? {
        match (f, w) {
            (1, 0) => code = s.varint()?,
            (3, 0) => remaining = s.varint()?,
            (4, 2) => {
                let d = s.bytes()?;
                let mut dr = Reader { buf: d, pos: 0 };
                let (mut secs, mut nanos) = (0u64, 0u64);
                while let Some((df, dw)) = dr.key()? {
                    match (df, dw) {
                        (1, 0) => secs = dr.varint()?,
                        (2, 0) => nanos = dr.varint()?,
                        _ => dr.skip(dw)?,
                    }
                }
                reset_ms = secs.saturating_mul(1000).saturating_add(nanos / 1_000_000);
            }
            _ => s.skip(w)?,
        }
    }
    Ok((code, remaining, reset_ms))
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_varint_field(out: &mut Vec<u8>, field: u32, v: u64) {
    put_varint(out, u64::from(field) << 3);
    put_varint(out, v);
}

fn put_bytes(out: &mut Vec<u8>, field: u32, b: &[u8]) {
    put_varint(out, (u64::from(field) << 3) | 2);
    put_varint(out, b.len() as u64);
    out.extend_from_slice(b);
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn key(&mut self) -> Result<Option<(u64, u64)>, &'static str> {
        if self.pos >= self.buf.len() {
            return Ok(None);
        }
        let k = self.varint()?;
        Ok(Some((k >> 3, k & 7)))
    }

    fn varint(&mut self) -> Result<u64, &'static str> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = *self.buf.get(self.pos).ok_or("truncated varint")?;
            self.pos += 1;
            v |= u64::from(b & 0x7f) << shift;
            if b < 0x80 {
                return Ok(v);
            }
        }
        Err("overlong varint")
    }

    fn bytes(&mut self) -> Result<&'a [u8], &'static str> {
        let len = usize::try_from(self.varint()?).map_err(|_| "length overflow")?;
        let end = self.pos.checked_add(len).ok_or("length overflow")?;
        let b = self.buf.get(self.pos..end).ok_or("truncated field")?;
        self.pos = end;
        Ok(b)
    }

    fn skip(&mut self, wire: u64) -> Result<(), &'static str> {
        match wire {
            0 => self.varint().map(|_| ()),
            1 => self.advance(8),
            2 => self.bytes().map(|_| ()),
            5 => self.advance(4),
            _ => Err("unsupported wire type"),
        }
    }

    fn advance(&mut self, n: usize) -> Result<(), &'static str> {
        let end = self.pos.checked_add(n).ok_or("overflow")?;
        if end > self.buf.len() {
            return Err("truncated field");
        }
        self.pos = end;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(all(target_family = "wasm", target_os = "unknown"))]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    type TestResult<T = ()> = Result<T, Box<dyn std::error::Error>>;

    fn status(code: u64, remaining: u64, secs: u64, nanos: u64) -> Vec<u8> {
        let mut dur = Vec::new();
        put_varint_field(&mut dur, 1, secs);
        put_varint_field(&mut dur, 2, nanos);
        let mut status = Vec::new();
        put_varint_field(&mut status, 1, code);
        put_varint_field(&mut status, 3, remaining);
        put_bytes(&mut status, 4, &dur);
        status
    }

    fn response(overall: u64, statuses: &[Vec<u8>]) -> Vec<u8> {
        let mut out = Vec::new();
        put_varint_field(&mut out, 1, overall);
        for s in statuses {
            put_bytes(&mut out, 2, s);
        }
        put_bytes(&mut out, 5, b"ignored raw body");
        out
    }

    #[test]
    fn decodes_ok_and_over_limit() -> TestResult {
        let ok = |v| Answer { limit: Some(v), ownership: Ownership::Unknown };
        assert_eq!(
            decode_response(&response(1, &[status(1, 7, 2, 500_000_000)]))?,
            ok(Verdict { over_limit: false, remaining: 7, reset_ms: 2500 })
        );
        assert_eq!(
            decode_response(&response(2, &[status(2, 0, 0, 1_000_000)]))?,
            ok(Verdict { over_limit: true, remaining: 0, reset_ms: 1 })
        );
        // An undecided limit is no decision (the filter decides locally).
        assert_eq!(decode_response(&response(0, &[status(0, 0, 0, 0)]))?.limit, None);
        assert!(decode_response(&response(1, &[])).is_err());
        assert!(decode_response(&[]).is_err());
        assert!(decode_response(&[0x12, 0x05, 0x01]).is_err());
        assert!(decode_response(&[0xff; 12]).is_err());
        Ok(())
    }

    #[test]
    fn the_second_status_is_the_ownership_verdict() -> TestResult {
        // Not owned: the overall code is OVER_LIMIT, the limit itself is not.
        let a = decode_response(&response(2, &[status(1, 4, 1, 0), status(2, 0, 0, 0)]))?;
        assert_eq!(a.limit, Some(Verdict { over_limit: false, remaining: 4, reset_ms: 1000 }));
        assert_eq!(a.ownership, Ownership::Refuted);
        let a = decode_response(&response(1, &[status(1, 4, 1, 0), status(1, 0, 0, 0)]))?;
        assert_eq!(a.ownership, Ownership::Confirmed);
        let a = decode_response(&response(1, &[status(1, 4, 1, 0), status(0, 0, 0, 0)]))?;
        assert_eq!(a.ownership, Ownership::Unknown);
        let a = decode_response(&response(2, &[status(2, 0, 3, 0), status(1, 0, 0, 0)]))?;
        assert!(a.limit.is_some_and(|l| l.over_limit));
        // The store failed but the ownership was answered.
        let a = decode_response(&response(1, &[status(0, 0, 0, 0), status(1, 0, 0, 0)]))?;
        assert_eq!((a.limit, a.ownership), (None, Ownership::Confirmed));
        Ok(())
    }

    #[test]
    fn encodes_the_descriptors() -> TestResult {
        let req = encode_request("u-1", "log", 10, 60, None);
        let text = String::from_utf8_lossy(&req);
        assert!(text.contains("infrabox-mcp") && text.contains("user") && text.contains("u-1") && text.contains("log"));
        assert!(!text.contains("window_seconds") && !text.contains("project"));
        let req = encode_request("u-1", "log", 10, 5, None);
        assert!(String::from_utf8_lossy(&req).contains("window_seconds"));
        let claim = Claim { project: "p-1".into(), build: None, job: Some("j-1".into()) };
        let text = String::from_utf8_lossy(&encode_request("u-1", "log", 10, 60, Some(&claim))).into_owned();
        assert!(text.contains("project") && text.contains("p-1") && text.contains("j-1") && !text.contains("build"));
        Ok(())
    }

    proptest::proptest! {
        #[test]
        fn decoder_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..64)) {
            let _ = decode_response(&bytes);
        }
    }
}
