//! Reference models of how InfraBox reads a credential, for tests (the
//! detector's property tests here, and the fake InfraBox of the end-to-end
//! suites, which must be as lenient as the real one):
//!
//! - CPython 3.11's `base64.b64decode` (non-strict `binascii.a2b_base64`);
//! - Werkzeug 1.0's cookie parsing (`_cookie_parse_impl`, `_cookie_unquote`);
//! - InfraBox's `get_token` (`src/pyinfraboxutils/ibflask.py`, master),
//!   behind eventlet's WSGI server, which joins repeated headers with `,`.
//!
//! `tests/tests/credential_model.rs` checks these against the real Python
//! libraries (Werkzeug 1.0.1 and CPython's `base64`) on generated inputs.
//! Compiled for tests and with the `reference-models` feature only: the
//! filter never runs them.

/// CPython 3.11 `binascii.a2b_base64(s, strict_mode=False)`: `Err` where
/// Python raises `binascii.Error`.
pub fn cpython_b64decode(s: &[u8]) -> Result<Vec<u8>, &'static str> {
    let value = |c: u8| -> Option<u8> {
        match c {
            b'A'..=b'Z' => Some(c - b'A'),
            b'a'..=b'z' => Some(c - b'a' + 26),
            b'0'..=b'9' => Some(c - b'0' + 52),
            b'+' => Some(62),
            b'/' => Some(63),
            _ => None,
        }
    };
    let (mut out, mut quad, mut left, mut pads) = (Vec::new(), 0u8, 0u8, 0u8);
    for &c in s {
        if c == b'=' {
            pads = pads.saturating_add(1);
            if quad >= 2 && quad + pads >= 4 {
                return Ok(out);
            }
            continue;
        }
        let Some(v) = value(c) else { continue };
        pads = 0;
        match quad {
            0 => left = v,
            1 => {
                out.push((left << 2) | (v >> 4));
                left = v & 0x0f;
            }
            2 => {
                out.push((left << 4) | (v >> 2));
                left = v & 0x03;
            }
            _ => out.push((left << 6) | v),
        }
        quad = (quad + 1) % 4;
    }
    match quad {
        0 => Ok(out),
        1 => Err("number of data characters cannot be 1 more than a multiple of 4"),
        _ => Err("Incorrect padding"),
    }
}

fn is_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c)
}

fn strip(b: &[u8]) -> &[u8] {
    let start = b.iter().position(|c| !is_space(*c)).unwrap_or(b.len());
    let end = b.iter().rposition(|c| !is_space(*c)).map_or(start, |e| e + 1);
    b.get(start..end.max(start)).unwrap_or_default()
}

/// Werkzeug 1.0 `_cookie_unquote`.
pub fn werkzeug_unquote(b: &[u8]) -> Vec<u8> {
    if b.len() < 2 || b.first() != Some(&b'"') || b.last() != Some(&b'"') {
        return b.to_vec();
    }
    let inner = b.get(1..b.len() - 1).unwrap_or_default();
    let octal_at = |i: usize| {
        matches!(
            (inner.get(i), inner.get(i + 1), inner.get(i + 2), inner.get(i + 3)),
            (Some(b'\\'), Some(b'0'..=b'3'), Some(b'0'..=b'7'), Some(b'0'..=b'7'))
        )
    };
    let quote_at = |i: usize| inner.get(i) == Some(&b'\\') && inner.get(i + 1).is_some_and(|c| *c != b'\n');
    let (mut out, mut i) = (Vec::new(), 0);
    while i < inner.len() {
        let o = (i..inner.len()).find(|j| octal_at(*j));
        let q = (i..inner.len()).find(|k| quote_at(*k));
        match (o, q) {
            (None, None) => {
                out.extend_from_slice(inner.get(i..).unwrap_or_default());
                break;
            }
            (o, Some(k)) if o.is_none_or(|j| k < j) => {
                out.extend_from_slice(inner.get(i..k).unwrap_or_default());
                out.extend(inner.get(k + 1).copied());
                i = k + 2;
            }
            (Some(j), _) => {
                out.extend_from_slice(inner.get(i..j).unwrap_or_default());
                let d = |n: usize| inner.get(j + n).map_or(0, |c| c - b'0');
                out.push((d(1) << 6) | (d(2) << 3) | d(3));
                i = j + 4;
            }
            (None, Some(_)) => break,
        }
    }
    out
}

/// Werkzeug 1.0 `_cookie_parse_impl` (the regex `_cookie_re` searched over
/// `header + b";"`), then `parse_cookie`'s skipping of empty names. Inputs
/// hold no line breaks (Envoy refuses them in header values).
pub fn werkzeug_parse_cookie(header: &[u8]) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut b = header.to_vec();
    b.push(b';');
    let mut pairs = Vec::new();
    let mut i = 0;
    while i < header.len() {
        // The leftmost match: a key starts at a byte that is neither = nor ;.
        let Some(start) = (i..b.len()).find(|p| !matches!(b.get(*p), Some(b'=' | b';'))) else { break };
        let key_end = (start..b.len()).find(|p| matches!(b.get(*p), Some(b'=' | b';'))).unwrap_or(b.len());
        let key = b.get(start..key_end).unwrap_or_default();
        let (value, end): (&[u8], usize) = if b.get(key_end) == Some(&b'=') {
            let mut v = key_end + 1;
            while b.get(v).is_some_and(|c| is_space(*c)) {
                v += 1;
            }
            let semicolon_after = |from: usize| {
                let mut p = from;
                while b.get(p).is_some_and(|c| is_space(*c)) {
                    p += 1;
                }
                (b.get(p) == Some(&b';')).then_some(p + 1)
            };
            let quoted = if b.get(v) == Some(&b'"') {
                let mut p = v + 1;
                loop {
                    match b.get(p) {
                        Some(b'\\') if b.get(p + 1).is_some_and(|c| *c != b'\n') => p += 2,
                        Some(b'"') => break Some(p + 1),
                        Some(_) => p += 1,
                        None => break None,
                    }
                }
            } else {
                None
            };
            match quoted.and_then(|close| semicolon_after(close).map(|end| (close, end))) {
                Some((close, end)) => (b.get(v..close).unwrap_or_default(), end),
                None => {
                    let first_semi = (v..b.len()).find(|p| b.get(*p) == Some(&b';')).unwrap_or(b.len() - 1);
                    let mut k = first_semi;
                    while k > v && b.get(k - 1).is_some_and(|c| is_space(*c)) {
                        k -= 1;
                    }
                    (b.get(v..k).unwrap_or_default(), first_semi + 1)
                }
            }
        } else {
            (&b""[..], key_end + 1)
        };
        let key = werkzeug_unquote(strip(key));
        if !key.is_empty() {
            pairs.push((key, werkzeug_unquote(value)));
        }
        i = end;
    }
    pairs
}

/// Everything InfraBox's `get_token` (and the parsers under it) recover
/// from these headers: the credential it goes on to read, the base64
/// payload it decodes, and every cookie name and value Werkzeug parses
/// (with the repeated headers joined either way).
pub fn infrabox_views(authorization: &[&str], cookie: &[&str]) -> Vec<Vec<u8>> {
    let mut views: Vec<Vec<u8>> = infrabox_get_token(authorization, cookie).into_iter().collect();
    let auth = authorization.join(",");
    if let Some(rest) = auth.strip_prefix("Basic ") {
        if let Ok(decoded) = cpython_b64decode(rest.split(' ').next().unwrap_or_default().as_bytes()) {
            views.push(decoded);
        }
    }
    // eventlet joins repeated headers with ","; an HTTP/2 hop before it
    // joins cookies with "; ".
    for sep in [",", "; "] {
        for (k, v) in werkzeug_parse_cookie(cookie.join(sep).as_bytes()) {
            views.push(k);
            views.push(v);
        }
    }
    views
}

/// InfraBox's `get_token`: the raw credential it goes on to decode, from
/// the `Authorization` values (joined with `,` as eventlet does) or, when
/// there is none, the first `token` cookie; `None` where it finds none.
pub fn infrabox_get_token(authorization: &[&str], cookie: &[&str]) -> Option<Vec<u8>> {
    let auth = authorization.join(",");
    if !auth.is_empty() {
        if let Some(rest) = auth.strip_prefix("Basic ") {
            let piece = rest.split(' ').next().unwrap_or_default();
            let decoded = String::from_utf8(cpython_b64decode(piece.as_bytes()).ok()?).ok()?;
            let parts: Vec<&str> = decoded.split("infrabox:").collect();
            return match parts.as_slice() {
                [_, token] => Some(token.as_bytes().to_vec()),
                _ => None,
            };
        }
        if ["token ", "bearer ", "Bearer "].iter().any(|s| auth.starts_with(s)) {
            return Some(auth.split(' ').nth(1).unwrap_or_default().as_bytes().to_vec());
        }
        return None;
    }
    werkzeug_parse_cookie(cookie.join(",").as_bytes())
        .into_iter()
        .find(|(k, _)| k == b"token")
        .map(|(_, v)| v)
        .filter(|v| !v.is_empty())
}
