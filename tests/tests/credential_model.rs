//! The reference models of InfraBox's credential parsing
//! (`mcp_filter_core::credential::reference`, which the detector's property
//! tests and the fake InfraBox rely on) against the real thing: Werkzeug
//! 1.0.1 (what Flask 1.1.4 runs on) and CPython's `base64`, installed by
//! `scripts/install-deps.sh` into `.tools/pyref`. Thousands of generated
//! cookie headers, base64 strings and `Authorization` values go through
//! both; every answer must be the same, byte for byte. A transcript of
//! InfraBox's `get_token` (`src/pyinfraboxutils/ibflask.py`, master, with
//! the JWT decoding left out) runs on the real libraries.

use std::process::Command;

use base64::Engine;
use mcp_filter_core::credential::reference::{cpython_b64decode, infrabox_get_token, werkzeug_parse_cookie};
use mcp_gateway_tests::envoy::repo_root;
use serde_json::{json, Value};

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

const SCRIPT: &str = r#"
import base64, binascii, json, sys
from werkzeug._internal import _cookie_parse_impl
from werkzeug.http import parse_cookie

def get_token(auth, cookie_header):
    # InfraBox's get_token, JWT decoding left out: the raw credential.
    cookie = parse_cookie(cookie_header).get('token', None)
    if auth:
        if auth.startswith("Basic "):
            auth = auth.split(" ")[1]
            try:
                decoded = base64.b64decode(auth).decode()
            except Exception:
                return None
            s = decoded.split('infrabox:')
            if len(s) != 2:
                return None
            return s[1]
        elif auth.startswith("token ") or auth.startswith("bearer ") or auth.startswith("Bearer "):
            return auth.split(" ")[1]
        else:
            return None
    elif cookie:
        return cookie
    return None

cases = json.load(open(sys.argv[1]))
out = {"cookies": [], "b64": [], "tokens": []}
for c in cases["cookies"]:
    raw = c.encode("latin1")
    pairs = [[base64.b64encode(k).decode(), base64.b64encode(v).decode()] for k, v in _cookie_parse_impl(raw) if k]
    out["cookies"].append(pairs)
for s in cases["b64"]:
    try:
        out["b64"].append(base64.b64encode(base64.b64decode(s)).decode())
    except (binascii.Error, ValueError):
        out["b64"].append(None)
for auth, cookie in cases["tokens"]:
    out["tokens"].append(get_token(auth, cookie))
json.dump(out, sys.stdout)
"#;

/// A small deterministic generator (xorshift64*).
struct Gen(u64);

impl Gen {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    /// A string of `pieces` drawn from `alphabet`.
    fn string(&mut self, alphabet: &[&str], max_pieces: usize) -> String {
        let n = self.below(max_pieces + 1);
        (0..n).map(|_| alphabet[self.below(alphabet.len())]).collect()
    }
}

const COOKIE_PIECES: &[&str] = &[
    "token", "=", ";", "; ", " ", ",", "\"", "\\", "\\\"", "\\\\", "\\137", "\\151", "\\377", "\\0", "\\1", "\\12", "\\8", "a", "b", "x",
    "0", "3", "7", "9", "ib_mcp_", "ib", "_", "\t", "tok\\145n", "\"token\"", "==",
];

const B64_PIECES: &[&str] = &[
    "A", "Q", "g", "w", "/", "+", "-", "_", "=", "==", "!", " ", ",", ":", "aW5m", "cmFi", "b3g6", "aWJf", "bWNw", "Xw", "YQ", "YR", "Zm9v", "\t",
];

const AUTH_PREFIXES: &[&str] = &["Basic ", "basic ", "Basic  ", "Bearer ", "bearer ", "token ", "BEARER ", "Digest ", "", " "];

fn python() -> std::path::PathBuf {
    let p = repo_root().join(".tools/pyref/bin/python");
    assert!(p.exists(), "{} is missing: run scripts/install-deps.sh (it installs Werkzeug 1.0.1 there)", p.display());
    p
}

#[test]
fn the_reference_models_read_credentials_exactly_like_werkzeug_and_cpython() {
    let mut g = Gen(0x9e37_79b9_7f4a_7c15);
    let cookies: Vec<String> = (0..4000).map(|_| g.string(COOKIE_PIECES, 16)).collect();
    let mut b64: Vec<String> = (0..4000).map(|_| g.string(B64_PIECES, 14)).collect();
    // Real encodings, mangled.
    for i in 0..1000 {
        let payload = format!("infrabox:ib_mcp_{i:048x}");
        let mut text = B64.encode(payload);
        match i % 4 {
            0 => text = text.trim_end_matches('=').to_string(),
            1 => text.push_str("==junk"),
            2 => text = text.chars().flat_map(|c| [c, '!']).collect(),
            _ => text.insert(g.below(text.len()), ' '),
        }
        b64.push(text);
    }
    let tokens: Vec<(String, String)> = (0..3000)
        .map(|i| {
            let auth = if i % 3 == 0 {
                String::new()
            } else {
                let prefix = AUTH_PREFIXES[g.below(AUTH_PREFIXES.len())];
                let rest = if g.below(2) == 0 { b64[g.below(b64.len())].clone() } else { g.string(COOKIE_PIECES, 6) };
                let second = if g.below(4) == 0 { format!(",{}", g.string(B64_PIECES, 4)) } else { String::new() };
                format!("{prefix}{rest}{second}")
            };
            (auth, cookies[g.below(cookies.len())].clone())
        })
        .collect();

    let dir = mcp_gateway_tests::scratch::fresh_dir("credential-model");
    let input = dir.join("cases.json");
    std::fs::write(&input, json!({"cookies": cookies, "b64": b64, "tokens": tokens}).to_string()).unwrap();
    let script = dir.join("model.py");
    std::fs::write(&script, SCRIPT).unwrap();
    let out = Command::new(python()).arg(&script).arg(&input).output().unwrap();
    assert!(out.status.success(), "python failed: {}", String::from_utf8_lossy(&out.stderr));
    let real: Value = serde_json::from_slice(&out.stdout).unwrap();

    let mut mismatches = Vec::new();
    for (i, c) in cookies.iter().enumerate() {
        let mine: Vec<Value> = werkzeug_parse_cookie(c.as_bytes()).into_iter().map(|(k, v)| json!([B64.encode(k), B64.encode(v)])).collect();
        if Value::Array(mine.clone()) != real["cookies"][i] {
            mismatches.push(format!("cookie {c:?}: model {mine:?}, Werkzeug {}", real["cookies"][i]));
        }
    }
    for (i, s) in b64.iter().enumerate() {
        let mine = cpython_b64decode(s.as_bytes()).ok().map(|b| B64.encode(b));
        if json!(mine) != real["b64"][i] {
            mismatches.push(format!("b64 {s:?}: model {mine:?}, CPython {}", real["b64"][i]));
        }
    }
    let mut recovered = 0;
    for (i, (auth, cookie)) in tokens.iter().enumerate() {
        let auth_values: Vec<&str> = if auth.is_empty() { vec![] } else { vec![auth.as_str()] };
        let mine = infrabox_get_token(&auth_values, &[cookie.as_str()]).map(|b| String::from_utf8_lossy(&b).into_owned());
        recovered += usize::from(mine.is_some());
        if json!(mine) != real["tokens"][i] {
            mismatches.push(format!("get_token({auth:?}, {cookie:?}): model {mine:?}, InfraBox {}", real["tokens"][i]));
        }
    }
    assert!(mismatches.is_empty(), "{} of {} cases differ, e.g.:\n{}", mismatches.len(), cookies.len() + b64.len() + tokens.len(), mismatches[..mismatches.len().min(10)].join("\n"));
    // The generated cases exercise what matters: quoted values, decodable
    // base64, credentials recovered.
    let quoted = real["cookies"].as_array().unwrap().iter().flat_map(|p| p.as_array().unwrap()).count();
    let decoded = real["b64"].as_array().unwrap().iter().filter(|v| !v.is_null()).count();
    println!("{} cookies ({quoted} pairs), {} base64 strings ({decoded} decodable), {} get_token calls ({recovered} recovered): all equal", cookies.len(), b64.len(), tokens.len());
    assert!(quoted > 4000 && decoded > 1500 && recovered > 400, "{quoted} {decoded} {recovered}");
}
