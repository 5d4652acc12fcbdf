//! Finding MCP credentials in request headers (DESIGN §3).
//!
//! On MCP paths only `Authorization: Bearer <token>` (scheme case-insensitive)
//! is accepted. On every other path an `ib_mcp_` value anywhere InfraBox
//! would read a credential — `Authorization` under any scheme and case,
//! `Basic base64(user:ib_mcp_…)`, or a cookie — means the request is refused,
//! so InfraBox's own (bypassable) MCP layer is never reached.

use base64::Engine;

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

/// Whether any `Authorization` or `Cookie` header carries an `ib_mcp_` value
/// in any form InfraBox (or a lenient parser) could pick up.
pub fn carries_mcp_credential(authorization: &[&str], cookie: &[&str]) -> bool {
    authorization.iter().any(|v| authorization_has_mcp(v)) || cookie.iter().any(|v| contains_marker(v))
}

fn authorization_has_mcp(value: &str) -> bool {
    if contains_marker(value) {
        return true;
    }
    // `Basic base64("infrabox:ib_mcp_…")` hides the marker; decode any value
    // after a Basic scheme (any case), padded or not.
    let value = value.trim();
    let Some((scheme, rest)) = value.split_once(' ') else {
        return false;
    };
    if !scheme.eq_ignore_ascii_case("basic") {
        return false;
    }
    let rest = rest.trim();
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(rest)
        .or_else(|_| base64::engine::general_purpose::STANDARD_NO_PAD.decode(rest))
        .or_else(|_| base64::engine::general_purpose::URL_SAFE.decode(rest))
        .or_else(|_| base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(rest));
    match decoded {
        Ok(bytes) => contains_marker(&String::from_utf8_lossy(&bytes)),
        Err(_) => false,
    }
}

/// Case-insensitive search for `ib_mcp_`.
fn contains_marker(s: &str) -> bool {
    const MARKER: &[u8] = b"ib_mcp_";
    s.as_bytes()
        .windows(MARKER.len())
        .any(|w| w.eq_ignore_ascii_case(MARKER))
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: &str = "ib_mcp_0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn bearer_forms() {
        assert_eq!(bearer(&[]), Bearer::Missing);
        assert_eq!(bearer(&["Bearer abc"]), Bearer::Value("abc"));
        assert_eq!(bearer(&["bearer  abc "]), Bearer::Value("abc"));
        assert_eq!(bearer(&["BEARER abc"]), Bearer::Value("abc"));
        assert_eq!(bearer(&["token abc"]), Bearer::NotBearer);
        assert_eq!(bearer(&["Bearer"]), Bearer::NotBearer);
        assert_eq!(bearer(&["Bearer "]), Bearer::NotBearer);
        assert_eq!(bearer(&["Bearer a", "Bearer b"]), Bearer::Ambiguous);
    }

    #[test]
    fn every_form_of_mcp_credential_is_seen() {
        let basic = base64::engine::general_purpose::STANDARD.encode(format!("infrabox:{T}"));
        let basic_nopad = base64::engine::general_purpose::STANDARD_NO_PAD.encode(format!("x:{T}"));
        for auth in [
            format!("Bearer {T}"),
            format!("bearer {T}"),
            format!("token {T}"),
            format!("Basic {basic}"),
            format!("basic {basic_nopad}"),
            format!("Bearer IB_MCP_{}", &T[7..]),
            T.to_string(),
        ] {
            assert!(carries_mcp_credential(&[&auth], &[]), "{auth}");
        }
        for cookie in [format!("token={T}"), format!("a=b; token=\"{T}\""), format!("other={T}")] {
            assert!(carries_mcp_credential(&[], &[&cookie]), "{cookie}");
        }
    }

    #[test]
    fn ordinary_credentials_are_not_mcp() {
        let basic = base64::engine::general_purpose::STANDARD.encode("infrabox:eyJhbGciOi");
        assert!(!carries_mcp_credential(
            &["Bearer eyJhbGciOiJSUzI1NiJ9.e30.sig", &format!("Basic {basic}"), "Basic !!!"],
            &["token=eyJhbGciOi; session=abc"]
        ));
    }
}
