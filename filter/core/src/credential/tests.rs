//! The detector against reference models of how InfraBox reads a
//! credential: CPython's `base64.b64decode` (non-strict `a2b_base64`),
//! Werkzeug 1.0's `parse_cookie`, and InfraBox's `get_token`
//! (`src/pyinfraboxutils/ibflask.py`), behind eventlet's WSGI server, which
//! joins repeated headers with `,`. The models are checked against the real
//! Python libraries in `tests/tests/credential_model.rs`; here the property
//! is: whatever the models recover that contains `ib_mcp_`, the detector
//! flags.

use base64::Engine;
use proptest::prelude::*;

use super::*;

const T: &str = "ib_mcp_0123456789abcdef0123456789abcdef0123456789abcdef";

type TestResult = Result<(), String>;

// ---------------------------------------------------------------------------
// Reference models

/// CPython 3.11 `binascii.a2b_base64(s, strict_mode=False)`: `Err` where
/// Python raises `binascii.Error`.
pub(crate) fn cpython_b64decode(s: &[u8]) -> Result<Vec<u8>, &'static str> {
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
pub(crate) fn werkzeug_unquote(b: &[u8]) -> Vec<u8> {
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
pub(crate) fn werkzeug_parse_cookie(header: &[u8]) -> Vec<(Vec<u8>, Vec<u8>)> {
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
pub(crate) fn infrabox_views(authorization: &[&str], cookie: &[&str]) -> Vec<Vec<u8>> {
    let mut views = Vec::new();
    let auth = authorization.join(",");
    if !auth.is_empty() {
        if let Some(rest) = auth.strip_prefix("Basic ") {
            let piece = rest.split(' ').next().unwrap_or_default();
            if let Ok(decoded) = cpython_b64decode(piece.as_bytes()) {
                views.push(decoded.clone());
                if let Ok(text) = String::from_utf8(decoded) {
                    let parts: Vec<&str> = text.split("infrabox:").collect();
                    if let [_, token] = parts.as_slice() {
                        views.push(token.as_bytes().to_vec());
                    }
                }
            }
        } else if ["token ", "bearer ", "Bearer "].iter().any(|s| auth.starts_with(s)) {
            views.push(auth.split(' ').nth(1).unwrap_or_default().as_bytes().to_vec());
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

fn model_recovers_marker(authorization: &[&str], cookie: &[&str]) -> bool {
    infrabox_views(authorization, cookie).iter().any(|v| contains_marker(v))
}

fn detector(authorization: &[&str], cookie: &[&str]) -> bool {
    authorization_reveals(authorization.iter().copied()) || cookie_reveals(cookie.iter().copied())
}

// ---------------------------------------------------------------------------
// The models themselves (fixed cases, cross-checked against Python too)

#[test]
fn cpython_b64decode_model() -> TestResult {
    let ok = |s: &str| cpython_b64decode(s.as_bytes()).map_err(|e| format!("{s:?}: {e}"));
    assert_eq!(ok("aW5mcmFib3g6")?, b"infrabox:");
    assert_eq!(ok("aW5m cmFi!b3g6")?, b"infrabox:");
    assert_eq!(ok("YQ==")?, b"a");
    assert_eq!(ok("YR==")?, b"a", "non-canonical trailing bits are accepted");
    assert_eq!(ok("YQ==garbage")?, b"a", "input after a complete pad is ignored");
    assert_eq!(ok("Y=Q==")?, b"a", "a pad early in a quad is skipped");
    assert!(cpython_b64decode(b"YQ").is_err(), "missing padding");
    assert!(cpython_b64decode(b"Y").is_err());
    Ok(())
}

#[test]
fn werkzeug_model() {
    let parse = |s: &str| -> Vec<(String, String)> {
        werkzeug_parse_cookie(s.as_bytes())
            .into_iter()
            .map(|(k, v)| (String::from_utf8_lossy(&k).into_owned(), String::from_utf8_lossy(&v).into_owned()))
            .collect()
    };
    let pairs = |v: &[(&str, &str)]| -> Vec<(String, String)> { v.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect() };
    assert_eq!(parse("a=1; token=xyz"), pairs(&[("a", "1"), ("token", "xyz")]));
    assert_eq!(parse(r#"token="ib\137mcp""#), pairs(&[("token", "ib_mcp")]));
    assert_eq!(parse(r#"token="a\"b""#), pairs(&[("token", "a\"b")]));
    assert_eq!(parse(r#""tok\145n"=v"#), pairs(&[("token", "v")]));
    assert_eq!(parse(r#"token="a;b"x; c=d"#), pairs(&[("token", "\"a"), ("b\"x", ""), ("c", "d")]));
    assert_eq!(parse("  a = 1 ;;=b; c"), pairs(&[("a", "1"), ("b", ""), ("c", "")]));
}

// ---------------------------------------------------------------------------
// Fixed attack forms

fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

#[test]
fn every_form_infrabox_reads_is_seen() -> TestResult {
    let basic = b64(&format!("infrabox:{T}"));
    let url_safe = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("infrabox:{T}"));
    let spaced: String = basic.chars().flat_map(|c| [c, ' ']).collect();
    let junk: String = basic.chars().flat_map(|c| [c, '!']).collect();
    let (first, second) = basic.split_at(12);
    let authorizations: Vec<Vec<String>> = vec![
        vec![format!("Bearer {T}")],
        vec![format!("bearer {T}")],
        vec![format!("token {T}")],
        vec![format!("Bearer IB_MCP_{}", &T[7..])],
        vec![T.to_string()],
        vec![format!("Basic {basic}")],
        vec![format!("basic {basic}")],
        vec![format!("Basic {}", basic.trim_end_matches('='))],
        vec![format!("Basic {basic}===garbage")],
        vec![format!("Basic {url_safe}")],
        vec![format!("Basic {junk}")],
        vec![format!("Basic {spaced}")],
        vec![format!("Basic {}", b64(&format!("x{T}")))],
        vec![format!("Basic {}", b64(&format!("xy{T}")))],
        vec![format!("Basic {first}"), second.to_string()],
        vec!["Bearer eyJ.a.b".into(), format!("Basic {basic}")],
        vec![format!("Digest {basic}")],
    ];
    for auth in &authorizations {
        let a: Vec<&str> = auth.iter().map(String::as_str).collect();
        assert!(detector(&a, &[]), "{auth:?}");
    }
    let octal: String = T.bytes().map(|b| format!("\\{b:03o}")).collect();
    let escaped: String = T.chars().map(|c| format!("\\{c}")).collect();
    let cookies: Vec<Vec<String>> = vec![
        vec![format!("token={T}")],
        vec![format!("a=b; token=\"{T}\"")],
        vec![format!("other={T}")],
        vec![format!("token=\"{octal}\"")],
        vec![format!("token=\"{escaped}\"")],
        vec![format!("token=\"ib\\137mcp\\137{}\"", &T[7..])],
        vec![format!("\"tok\\145n\"=\"ib\\137mcp_{}\"", &T[7..])],
        vec!["a=1".into(), format!("token=\"IB\\137MCP_{}\"", &T[7..])],
    ];
    for cookie in &cookies {
        let c: Vec<&str> = cookie.iter().map(String::as_str).collect();
        assert!(detector(&[], &c), "{cookie:?}");
        assert!(model_recovers_marker(&[], &c), "model of {cookie:?}");
    }
    Ok(())
}

#[test]
fn urls_in_every_encoding() {
    for url in [
        format!("/api/v1/projects/?token={T}"),
        format!("/api/v1/projects/?t={}", T.replace('_', "%5F")),
        format!("/api/v1/projects/?t={}", T.replace('_', "%5f")),
        format!("/api/v1/projects/?t=%69%62%5f%6d%63%70%5f{}", &T[7..]),
        format!("/api/v1/projects/?t={}", T.replace('_', "%255F")),
        format!("/api/v1/projects/?t={}", T.replace('_', "%25255F")),
        format!("/api/v1/{T}/x"),
        format!("/api/v1/projects?IB_MCP_{}", &T[7..]),
    ] {
        assert!(url_reveals(url.as_bytes()), "{url}");
    }
    for url in ["/api/v1/projects/?q=%41%42", "/api/v1/projects/?q=ib_mc+p_", "/api/v1/%zz", "/%"] {
        assert!(!url_reveals(url.as_bytes()), "{url}");
    }
}

#[test]
fn ordinary_credentials_are_not_mcp() {
    let basic = b64("infrabox:eyJhbGciOiJSUzI1NiJ9.eyJ0eXBlIjoidXNlciJ9.c2ln");
    let jwt = "eyJhbGciOiJSUzI1NiIsInR5cCI6IkpXVCJ9.eyJ1c2VyIjp7ImlkIjoiMGI3YTRjMmUifSwidHlwZSI6InVzZXIifQ.\
               dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXkQ8t8kJdVvnXmvM4eYJzpNZrS";
    for auth in [format!("Bearer {jwt}"), format!("Basic {basic}"), "Basic !!!".into(), "Basic".into(), String::new()] {
        assert!(!authorization_reveals([auth.as_str()].into_iter()), "{auth}");
    }
    for cookie in [format!("token={jwt}; session=abc"), r#"a="x\"y"; b=\\"#.to_string(), "theme=dark".into()] {
        assert!(!cookie_reveals([cookie.as_str()].into_iter()), "{cookie}");
    }
}

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
fn long_hostile_headers_stay_linear() {
    // 64 KiB of backslashes, digits and base64: one pass per view, no
    // quadratic blowup (this would take minutes if it were quadratic).
    let big: String = "\\1\\23=aW5m ".repeat(6_000);
    assert!(!cookie_reveals([big.as_str()].into_iter()));
    assert!(!authorization_reveals([big.as_str(), big.as_str()].into_iter()));
    assert!(!url_reveals("%25".repeat(20_000).as_bytes()));
}

// ---------------------------------------------------------------------------
// Properties: the detector sees whatever the models recover

/// One character of a token in a form a cookie parser unquotes: as is,
/// `\x`, or `\ooo`.
fn cookie_spelling(c: char, form: u8) -> String {
    match form {
        0 => c.to_string(),
        1 => format!("\\{c}"),
        _ => format!("\\{:03o}", c as u32),
    }
}

fn filler() -> impl Strategy<Value = String> {
    r#"[a-zA-Z0-9=;,"\\ %+/!-]{0,12}"#
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    /// Cookies: a token spelled with any mix of Werkzeug escapes, quoted
    /// or not, under any name, amid arbitrary filler, across one or two
    /// headers.
    #[test]
    fn cookie_detector_covers_werkzeug(
        forms in proptest::collection::vec(0u8..3, T.len()),
        name in prop_oneof![Just("token".to_string()), Just("\"tok\\145n\"".to_string()), filler()],
        quoted in any::<bool>(),
        before in filler(),
        after in filler(),
        split in any::<bool>(),
    ) {
        let spelled: String = T.chars().zip(&forms).map(|(c, f)| cookie_spelling(c, *f)).collect();
        let value = if quoted { format!("\"{spelled}\"") } else { spelled };
        let header = format!("{before}; {name}={value}; {after}");
        let (a, b) = header.split_at(header.len() / 2);
        let cookies: Vec<&str> = if split { vec![a, b] } else { vec![header.as_str()] };
        if model_recovers_marker(&[], &cookies) {
            prop_assert!(detector(&[], &cookies), "{cookies:?}");
        }
    }

    /// Random cookie bytes: whenever Werkzeug's view holds the marker, so
    /// does the detector's.
    #[test]
    fn cookie_detector_on_random_headers(header in r#"([a-z_=;, "\\0-7]|ib_mcp_|\\137|\\151){0,40}"#) {
        if model_recovers_marker(&[], &[header.as_str()]) {
            prop_assert!(detector(&[], &[header.as_str()]), "{header:?}");
        }
    }

    /// Basic credentials: base64 of anything holding the token, mangled the
    /// ways CPython's decoder forgives (junk bytes, missing or extra
    /// padding, trailing bits, other alphabets), split across headers.
    #[test]
    fn authorization_detector_covers_cpython(
        prefix in "[ -~]{0,5}",
        suffix in "[ -~]{0,5}",
        junk in proptest::collection::vec((0usize..80, "[ !#$%&*,.:;<>?@^`|~-]"), 0..6),
        pad in 0usize..4,
        strip_pad in any::<bool>(),
        flip_last in any::<bool>(),
        split_at in proptest::option::of(1usize..70),
        url_safe in any::<bool>(),
        scheme in prop_oneof![Just("Basic "), Just("basic "), Just("Basic  "), Just("")],
    ) {
        let payload = format!("{prefix}infrabox:{T}{suffix}");
        let engine = if url_safe { &base64::engine::general_purpose::URL_SAFE } else { &base64::engine::general_purpose::STANDARD };
        let mut text = engine.encode(payload);
        if strip_pad {
            text = text.trim_end_matches('=').to_string();
        }
        text.push_str(&"=".repeat(pad));
        if flip_last {
            if let Some(last) = text.trim_end_matches('=').chars().last() {
                let i = text.trim_end_matches('=').len() - 1;
                let flipped = if last == 'A' { 'B' } else { 'A' };
                text.replace_range(i..=i, &flipped.to_string());
            }
        }
        for (at, j) in junk {
            let at = at.min(text.len());
            if text.is_char_boundary(at) {
                text.insert_str(at, &j);
            }
        }
        let header = format!("{scheme}{text}");
        let parts: Vec<&str> = match split_at {
            Some(i) if i < header.len() && header.is_char_boundary(i) => vec![&header[..i], &header[i..]],
            _ => vec![header.as_str()],
        };
        if model_recovers_marker(&parts, &[]) {
            prop_assert!(detector(&parts, &[]), "{parts:?}");
        }
        // Not only what InfraBox reads: whatever CPython decodes from the
        // value, from any word on, holding the marker, is seen.
        let joined = parts.join(",");
        for (i, _) in joined.match_indices(' ').chain([(0, "")]) {
            if let Ok(decoded) = cpython_b64decode(joined.get(i..).unwrap_or_default().as_bytes()) {
                if contains_marker(&decoded) {
                    prop_assert!(detector(&parts, &[]), "{parts:?}");
                }
            }
        }
    }

    /// Random Authorization values built of base64 pieces of the marker
    /// (at each alignment), padding and noise, against the model.
    #[test]
    fn authorization_detector_on_random_headers(
        header in "(Basic |bearer |Bearer |token )?(aWJfbWNwXw|eGliX21jcF8|eHlpYl9tY3Bf|MDEy|infrabox:|aW5mcmFib3g6|=|[A-Za-z0-9+/_ ,!-]){0,14}",
    ) {
        if model_recovers_marker(&[header.as_str()], &[]) {
            prop_assert!(detector(&[header.as_str()], &[]), "{header:?}");
        }
    }

    /// URLs: the token with any of its bytes percent-encoded once or twice.
    #[test]
    fn url_detector_covers_percent_encoding(forms in proptest::collection::vec(0u8..3, T.len()), upper in any::<bool>()) {
        let url: String = T.bytes().zip(&forms).map(|(b, f)| match f {
            0 => (b as char).to_string(),
            1 if upper => format!("%{b:02X}"),
            1 => format!("%{b:02x}"),
            _ => format!("%25{b:02x}"),
        }).collect();
        let url = format!("/api/v1/projects/?q={url}");
        prop_assert!(url_reveals(url.as_bytes()), "{}", url);
    }

    /// Nothing here panics or misreads, whatever the bytes.
    #[test]
    fn never_panics(s in "\\PC{0,64}") {
        let _ = authorization_reveals([s.as_str()].into_iter());
        let _ = cookie_reveals([s.as_str()].into_iter());
        let _ = url_reveals(s.as_bytes());
    }
}

