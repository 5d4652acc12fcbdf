//! The few messages of `envoy.service.ratelimit.v3.RateLimitService` the
//! filter sends and reads (DESIGN §9), encoded by hand: the wasm filter
//! cannot link Envoy's generated types, and these messages are tiny.
//!
//! Request: domain, one descriptor `[("user", id), ("class", class)]` (plus
//! `("window_seconds", n)` when the window is not a whole protobuf unit) and
//! a `limit` override. Response: overall code, and from the first status
//! `limit_remaining` and `duration_until_reset`.

/// gRPC service and method names.
pub const SERVICE: &str = "envoy.service.ratelimit.v3.RateLimitService";
pub const METHOD: &str = "ShouldRateLimit";
/// Rate-limit domain of the gateway.
pub const DOMAIN: &str = "infrabox-mcp";

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

/// Encodes a `RateLimitRequest` for one (user, class) with its limit.
pub fn encode_request(user: &str, class: &str, limit: u32, window_seconds: u32) -> Vec<u8> {
    let mut descriptor = Vec::with_capacity(96);
    let entry = |k: &str, v: &str, out: &mut Vec<u8>| {
        let mut e = Vec::with_capacity(k.len() + v.len() + 4);
        put_bytes(&mut e, 1, k.as_bytes());
        put_bytes(&mut e, 2, v.as_bytes());
        put_bytes(out, 1, &e);
    };
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

    let mut req = Vec::with_capacity(descriptor.len() + 24);
    put_bytes(&mut req, 1, DOMAIN.as_bytes());
    put_bytes(&mut req, 2, &descriptor);
    put_varint_field(&mut req, 3, 1);
    req
}

/// What the rate-limit service answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    pub over_limit: bool,
    pub remaining: u32,
    /// Milliseconds until the oldest counted request leaves the window.
    pub reset_ms: u64,
}

/// Decodes a `RateLimitResponse`. An `UNKNOWN` overall code is an error.
pub fn decode_response(buf: &[u8]) -> Result<Verdict, &'static str> {
    let mut code = 0u64;
    let mut remaining = 0u64;
    let mut reset_ms = 0u64;
    let mut first_status = true;
    let mut r = Reader { buf, pos: 0 };
    while let Some((field, wire)) = r.key()? {
        match (field, wire) {
            (1, 0) => code = r.varint()?,
            (2, 2) => {
                let status = r.bytes()?;
                if first_status {
                    first_status = false;
                    let mut s = Reader { buf: status, pos: 0 };
                    while let Some((f, w)) = s.key()? {
                        match (f, w) {
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
                }
            }
            _ => r.skip(wire)?,
        }
    }
    match code {
        1 => Ok(Verdict { over_limit: false, remaining: remaining.min(u64::from(u32::MAX)) as u32, reset_ms }),
        2 => Ok(Verdict { over_limit: true, remaining: 0, reset_ms }),
        _ => Err("rate-limit response has no OK/OVER_LIMIT code"),
    }
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

    type TestResult<T = ()> = Result<T, Box<dyn std::error::Error>>;

    fn response(code: u64, remaining: u64, secs: u64, nanos: u64) -> Vec<u8> {
        let mut dur = Vec::new();
        put_varint_field(&mut dur, 1, secs);
        put_varint_field(&mut dur, 2, nanos);
        let mut status = Vec::new();
        put_varint_field(&mut status, 1, code);
        put_varint_field(&mut status, 3, remaining);
        put_bytes(&mut status, 4, &dur);
        let mut out = Vec::new();
        put_varint_field(&mut out, 1, code);
        put_bytes(&mut out, 2, &status);
        put_bytes(&mut out, 5, b"ignored raw body");
        out
    }

    #[test]
    fn decodes_ok_and_over_limit() -> TestResult {
        assert_eq!(
            decode_response(&response(1, 7, 2, 500_000_000))?,
            Verdict { over_limit: false, remaining: 7, reset_ms: 2500 }
        );
        assert_eq!(
            decode_response(&response(2, 0, 0, 1_000_000))?,
            Verdict { over_limit: true, remaining: 0, reset_ms: 1 }
        );
        assert!(decode_response(&response(0, 0, 0, 0)).is_err());
        assert!(decode_response(&[]).is_err());
        assert!(decode_response(&[0x12, 0x05, 0x01]).is_err());
        assert!(decode_response(&[0xff; 12]).is_err());
        Ok(())
    }

    #[test]
    fn encodes_the_descriptor() -> TestResult {
        let req = encode_request("u-1", "log", 10, 60);
        let text = String::from_utf8_lossy(&req);
        assert!(text.contains("infrabox-mcp") && text.contains("user") && text.contains("u-1") && text.contains("log"));
        assert!(!text.contains("window_seconds"));
        let req = encode_request("u-1", "log", 10, 5);
        assert!(String::from_utf8_lossy(&req).contains("window_seconds"));
        Ok(())
    }

    proptest::proptest! {
        #[test]
        fn decoder_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..64)) {
            let _ = decode_response(&bytes);
        }
    }
}
