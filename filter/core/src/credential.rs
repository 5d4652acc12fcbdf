//! Finding MCP credentials in a request (DESIGN §3, §4).
//!
//! On MCP paths only `Authorization: Bearer <token>` (scheme
//! case-insensitive) is accepted ([`bearer`]); a secret anywhere else in the
//! request ([`misplaced_secret`]) is refused, so it never reaches InfraBox.
//! On every other path an `ib_mcp_` value in any form InfraBox's lenient
//! parsers — or another parser on the way — could recover
//! ([`secret_outside_mcp`]) means the request is refused, so InfraBox's own
//! (bypassable) MCP layer is never reached and no secret lands in its logs.
//!
//! The views, each a superset of what the real parser recovers, and each
//! linear in the input (an attacker chooses the bytes, up to Envoy's header
//! limit, so nothing here may be quadratic):
//!
//! - the bytes as sent, searched case-insensitively for `ib_mcp_`;
//! - **base64** as Python's `base64.b64decode` reads it (CPython's
//!   non-strict `binascii.a2b_base64`: bytes outside the alphabet skipped,
//!   `=` skipped or ending the input, non-canonical trailing bits and
//!   missing padding tolerated), decoded from every one of the four
//!   alignments a decoder can start in, over the comma-joined values (the
//!   WSGI server joins repeated headers with `,`), in the standard and the
//!   URL-safe alphabet. InfraBox decodes `Basic base64(infrabox:<token>)`;
//!   `Authorization` and `Proxy-Authorization` values are decoded here
//!   whenever any of them names `Basic` in any case, anywhere;
//! - **cookie unquoting** as Werkzeug 1.0 does it (`\ooo` octal escapes and
//!   `\x` escapes inside a quoted name or value), applied to the whole
//!   header, which yields every quoted part unquoted;
//! - **percent-decoding** of the URL, repeated while it changes (up to four
//!   rounds), with `+` as space.

use crate::pipeline::RequestHead;

/// What the `Authorization` headers of an MCP request carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bearer<'a> {
    /// No `Authorization` header.
    Missing,
    /// More than one `Authorization` header: ambiguous, refused.
    Ambiguous,
    /// A header with another scheme than `Bearer`, or no value.
    NotBearer,
    /// The value after `Bearer `, trimmed.
    Value(&'a str),
}

/// Extracts the bearer value from the request's `Authorization` headers.
pub fn bearer<'a>(authorization: &[&'a str]) -> Bearer<'a> {
    match authorization {
        [] => Bearer::Missing,
        [one] => {
            let one = one.trim();
            match one.split_once(' ') {
                Some((scheme, value)) if scheme.eq_ignore_ascii_case("bearer") => {
                    let value = value.trim();
                    if value.is_empty() {
                        Bearer::NotBearer
                    } else {
                        Bearer::Value(value)
                    }
                }
                _ => Bearer::NotBearer,
            }
        }
        _ => Bearer::Ambiguous,
    }
}

/// Where in a request an MCP secret was seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place {
    Authorization,
    ProxyAuthorization,
    Cookie,
    /// The path or the query string.
    Url,
    /// Any other header.
    Header,
}

impl Place {
    pub fn as_str(self) -> &'static str {
        match self {
            Place::Authorization => "the Authorization header",
            Place::ProxyAuthorization => "the Proxy-Authorization header",
            Place::Cookie => "a cookie",
            Place::Url => "the URL",
            Place::Header => "a request header",
        }
    }
}

/// Off the MCP surface: where the request carries an MCP secret in any form
/// InfraBox (or a lenient parser before it) could recover, if anywhere.
pub fn secret_outside_mcp(head: &RequestHead<'_>) -> Option<Place> {
    if authorization_reveals(head.values("authorization")) {
        return Some(Place::Authorization);
    }
    if authorization_reveals(head.values("proxy-authorization")) {
        return Some(Place::ProxyAuthorization);
    }
    if cookie_reveals(head.values("cookie")) {
        return Some(Place::Cookie);
    }
    if url_reveals(head.path.as_bytes()) {
        return Some(Place::Url);
    }
    None
}

/// On the MCP surface: where the request carries an MCP secret other than
/// in its `Authorization` header, if anywhere. The path before `?` is left
/// to the canonical-path rule (a token there is no route id).
pub fn misplaced_secret(head: &RequestHead<'_>) -> Option<Place> {
    if let Some((_, query)) = head.path.split_once('?') {
        if url_reveals(query.as_bytes()) {
            return Some(Place::Url);
        }
    }
    if authorization_reveals(head.values("proxy-authorization")) {
        return Some(Place::ProxyAuthorization);
    }
    if cookie_reveals(head.values("cookie")) {
        return Some(Place::Cookie);
    }
    let other = head
        .headers
        .iter()
        .filter(|(name, _)| !matches!(name.as_str(), "authorization" | ":path"))
        .any(|(_, value)| contains_marker(value.as_bytes()));
    other.then_some(Place::Header)
}

/// Whether `Authorization`-like values carry a secret: literally, or, when
/// any value names the `Basic` scheme (in any case, anywhere: the only one
/// InfraBox base64-decodes, and what the ingress routes into the filter),
/// in base64 at any alignment of the values joined as the WSGI server
/// joins them.
pub fn authorization_reveals<'a>(values: impl Iterator<Item = &'a str> + Clone) -> bool {
    if values.clone().any(|v| contains_marker(v.as_bytes())) {
        return true;
    }
    if !values.clone().any(names_basic) {
        return false;
    }
    let joined = || joined_bytes(values.clone(), b',');
    base64_reveals(joined, STANDARD) || base64_reveals(joined, URL_SAFE)
}

/// Whether a value contains `basic` in any case.
fn names_basic(value: &str) -> bool {
    value.as_bytes().windows(5).any(|w| w.eq_ignore_ascii_case(b"basic"))
}

/// Whether `Cookie` values carry a secret: literally, or once Werkzeug's
/// cookie unquoting ran over them (joined as the WSGI server joins them).
pub fn cookie_reveals<'a>(values: impl Iterator<Item = &'a str> + Clone) -> bool {
    if values.clone().any(|v| contains_marker(v.as_bytes())) {
        return true;
    }
    if !values.clone().any(|v| v.contains('\\')) {
        return false;
    }
    let mut m = Matcher::default();
    let mut found = false;
    unescape_cookie(joined_bytes(values, b','), |b| found |= m.feed(b));
    found
}

/// Whether a URL (or a query string) carries a secret, as sent or after up
/// to four rounds of percent-decoding.
pub fn url_reveals(url: &[u8]) -> bool {
    if contains_marker(url) {
        return true;
    }
    let mut current = url.to_vec();
    for _ in 0..4 {
        if !current.contains(&b'%') && !current.contains(&b'+') {
            return false;
        }
        let next = percent_decode(&current);
        if contains_marker(&next) {
            return true;
        }
        if next == current {
            return false;
        }
        current = next;
    }
    false
}

/// Case-insensitive search for `ib_mcp_`: from each `i`/`I` on (the
/// marker's first byte, and the only bytes `b | 0x20` maps to `i`).
pub fn contains_marker(bytes: &[u8]) -> bool {
    let mut rest = bytes;
    while rest.len() >= MARKER.len() {
        let Some(at) = rest.iter().position(|b| (b | 0x20) == b'i') else { return false };
        if rest.get(at..at + MARKER.len()).is_some_and(|w| w.eq_ignore_ascii_case(MARKER)) {
            return true;
        }
        rest = rest.get(at + 1..).unwrap_or_default();
    }
    false
}

const MARKER: &[u8; 7] = b"ib_mcp_";

/// Streaming case-insensitive matcher of [`MARKER`]. The marker has no
/// proper prefix that is also a suffix of a longer prefix ('i' occurs only
/// first), so a mismatch restarts at 0, or at 1 on an 'i'.
#[derive(Debug, Default, Clone, Copy)]
struct Matcher {
    matched: usize,
}

impl Matcher {
    /// Feeds one byte; true when the marker just completed.
    fn feed(&mut self, b: u8) -> bool {
        let b = b.to_ascii_lowercase();
        if MARKER.get(self.matched) == Some(&b) {
            self.matched += 1;
            if self.matched == MARKER.len() {
                self.matched = 0;
                return true;
            }
        } else {
            self.matched = usize::from(b == b'i');
        }
        false
    }
}

/// The bytes of `values`, `sep` between them.
fn joined_bytes<'a, I: Iterator<Item = &'a str>>(values: I, sep: u8) -> impl Iterator<Item = u8> + use<'a, I> {
    values.enumerate().flat_map(move |(i, v)| (i > 0).then_some(sep).into_iter().chain(v.bytes()))
}

/// A base64 alphabet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Alphabet {
    /// `+` and `/` (Python's default).
    Standard,
    /// `-` and `_`.
    UrlSafe,
}

const STANDARD: Alphabet = Alphabet::Standard;
const URL_SAFE: Alphabet = Alphabet::UrlSafe;

impl Alphabet {
    /// The 6-bit value of `b`, or `None` if `b` is not in the alphabet.
    fn sextet(self, b: u8) -> Option<u8> {
        match (b, self) {
            (b'A'..=b'Z', _) => Some(b - b'A'),
            (b'a'..=b'z', _) => Some(b - b'a' + 26),
            (b'0'..=b'9', _) => Some(b - b'0' + 52),
            (b'+', Alphabet::Standard) | (b'-', Alphabet::UrlSafe) => Some(62),
            (b'/', Alphabet::Standard) | (b'_', Alphabet::UrlSafe) => Some(63),
            _ => None,
        }
    }
}

/// Whether decoding the byte stream leniently, from any of the four
/// alignments, yields the marker. Bytes outside the alphabet (and `=`) are
/// skipped and the decoder never stops: what CPython's non-strict decoder
/// outputs from any start position is a prefix of one of these four
/// streams' outputs from that point on.
fn base64_reveals<I: Iterator<Item = u8>>(bytes: impl Fn() -> I, alphabet: Alphabet) -> bool {
    (0..4).any(|phase| {
        let mut m = Matcher::default();
        let mut skip = phase;
        let (mut quad, mut left) = (0u8, 0u8);
        for b in bytes() {
            let Some(v) = alphabet.sextet(b) else { continue };
            if skip > 0 {
                skip -= 1;
                continue;
            }
            let out = match quad {
                0 => {
                    left = v;
                    None
                }
                1 => {
                    let o = (left << 2) | (v >> 4);
                    left = v & 0x0f;
                    Some(o)
                }
                2 => {
                    let o = (left << 4) | (v >> 2);
                    left = v & 0x03;
                    Some(o)
                }
                _ => Some((left << 6) | v),
            };
            quad = (quad + 1) % 4;
            if out.is_some_and(|o| m.feed(o)) {
                return true;
            }
        }
        false
    })
}

/// Werkzeug 1.0's cookie unquoting (`_cookie_unquote`), applied to a whole
/// header: `\` + three octal digits (the first 0–3) is that byte, `\` + any
/// other byte is that byte. Inside a quoted cookie name or value this is
/// exactly Werkzeug's result; the scan cannot fall out of step at a quote,
/// because an escape consumes at most the three bytes after `\` and an
/// opening quote follows `=` or whitespace.
fn unescape_cookie(bytes: impl Iterator<Item = u8>, mut out: impl FnMut(u8)) {
    /// Where the scan is inside an escape.
    enum State {
        Plain,
        Backslash,
        /// `\` and one octal digit 0-3.
        Oct1(u8),
        /// `\` and two octal digits.
        Oct2(u8, u8),
    }
    let octal = |b: u8, max: u8| (b'0'..=max).contains(&b);
    let mut state = State::Plain;
    for b in bytes {
        state = match state {
            State::Plain if b == b'\\' => State::Backslash,
            State::Plain => {
                out(b);
                State::Plain
            }
            State::Backslash if octal(b, b'3') => State::Oct1(b),
            State::Backslash => {
                out(b);
                State::Plain
            }
            State::Oct1(d0) if octal(b, b'7') => State::Oct2(d0, b),
            // Not an octal escape: `\<d0>` was a one-byte escape, and `b`
            // is read afresh.
            State::Oct1(d0) => {
                out(d0);
                if b == b'\\' {
                    State::Backslash
                } else {
                    out(b);
                    State::Plain
                }
            }
            State::Oct2(d0, d1) if octal(b, b'7') => {
                out(((d0 - b'0') << 6) | ((d1 - b'0') << 3) | (b - b'0'));
                State::Plain
            }
            State::Oct2(d0, d1) => {
                out(d0);
                out(d1);
                if b == b'\\' {
                    State::Backslash
                } else {
                    out(b);
                    State::Plain
                }
            }
        };
    }
    match state {
        State::Oct1(d0) => out(d0),
        State::Oct2(d0, d1) => {
            out(d0);
            out(d1);
        }
        State::Plain | State::Backslash => {}
    }
}

/// One round of percent-decoding, `+` as space; invalid escapes stay.
fn percent_decode(s: &[u8]) -> Vec<u8> {
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while let Some(&b) = s.get(i) {
        match b {
            b'%' => match (s.get(i + 1).copied().and_then(hex), s.get(i + 2).copied().and_then(hex)) {
                (Some(h), Some(l)) => {
                    out.push((h << 4) | l);
                    i += 3;
                    continue;
                }
                _ => out.push(b),
            },
            b'+' => out.push(b' '),
            _ => out.push(b),
        }
        i += 1;
    }
    out
}

#[cfg(any(test, feature = "reference-models"))]
pub mod reference;
#[cfg(test)]
mod tests;
