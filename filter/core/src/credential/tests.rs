//! The detector against the reference models of how InfraBox reads a
//! credential ([`super::reference`]). The property: whatever the models
//! recover that contains `ib_mcp_`, the detector flags.

use base64::Engine;
use proptest::prelude::*;

use super::*;
#[cfg(all(target_family = "wasm", target_os = "unknown"))]
use wasm_bindgen_test::wasm_bindgen_test as test;

const T: &str = "ib_mcp_0123456789abcdef0123456789abcdef0123456789abcdef";

type TestResult = Result<(), String>;

use super::reference::{cpython_b64decode, infrabox_views, werkzeug_parse_cookie};

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
        // Not only what InfraBox reads: whatever CPython decodes from a
        // value naming Basic (in any case: what the ingress routes into the
        // filter), from any word on, holding the marker, is seen.
        let joined = parts.join(",");
        let names_basic = joined.to_ascii_lowercase().contains("basic");
        for (i, _) in joined.match_indices(' ').chain([(0, "")]).filter(|_| names_basic) {
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

