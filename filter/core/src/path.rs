//! Where a request path falls (DESIGN §3) and the canonical-path rule for MCP
//! paths (DESIGN §4 step 1).

/// Prefix of the MCP surface.
pub const MCP_PREFIX: &str = "/api/v1/mcp";
/// The control plane's session-authenticated token API, under the MCP prefix.
pub const TOKEN_API: &str = "/api/v1/mcp/tokens";
/// Longest MCP path (before `?`) the gateway accepts.
pub const MAX_PATH_LEN: usize = 1024;

/// Which part of the surface a request path belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Area<'a> {
    /// Under `/api/v1/mcp/` (not the token API): `rest` is the path after the
    /// prefix (starting with `/`, or empty), `query` what follows `?`.
    Mcp { rest: &'a str, query: Option<&'a str> },
    /// `/api/v1/mcp/tokens*`: the control plane's own API.
    TokenApi,
    /// Anything else: InfraBox's own API and dashboard.
    Other,
}

/// Splits `path` (as Envoy's `:path`, query included) into its area.
pub fn area(path: &str) -> Area<'_> {
    let (before_query, query) = match path.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (path, None),
    };
    // A fragment never reaches a server from a conforming client; treat it as
    // part of the path so the canonical check rejects it.
    let Some(rest) = before_query.strip_prefix(MCP_PREFIX) else {
        return Area::Other;
    };
    if !(rest.is_empty() || rest.starts_with('/')) {
        return Area::Other;
    }
    if let Some(after) = before_query.strip_prefix(TOKEN_API) {
        if after.is_empty() || after.starts_with('/') {
            return Area::TokenApi;
        }
    }
    Area::Mcp { rest, query }
}

/// Checks the canonical-path rule on the part after the MCP prefix: only
/// `[A-Za-z0-9._~/-]`, no `%`, no `.`/`..` segment, no empty segment.
/// Returns the human-readable reason on failure (never echoing the path).
pub fn check_canonical(rest: &str) -> Result<(), &'static str> {
    if rest.len() + MCP_PREFIX.len() > MAX_PATH_LEN {
        return Err("path is too long");
    }
    if rest.is_empty() {
        return Ok(());
    }
    if let Some(b) = rest.bytes().find(|b| !is_path_char(*b)) {
        return Err(if b == b'%' {
            "percent-encoding is not allowed in MCP paths"
        } else {
            "path contains a character outside [A-Za-z0-9._~/-]"
        });
    }
    // `rest` starts with '/', so the first split element is always empty.
    for segment in rest.split('/').skip(1) {
        match segment {
            "" => return Err("path contains an empty segment"),
            "." | ".." => return Err("path contains a dot segment"),
            _ => {}
        }
    }
    Ok(())
}

fn is_path_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'~' | b'/' | b'-')
}

/// Whether `s` is a lowercase hyphenated UUID (8-4-4-4-12).
pub fn is_uuid(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 36
        && b.iter().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => *c == b'-',
            _ => c.is_ascii_digit() || (b'a'..=b'f').contains(c),
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(all(target_family = "wasm", target_os = "unknown"))]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn areas() {
        assert_eq!(area("/api/v1/mcp/projects?x=1"), Area::Mcp { rest: "/projects", query: Some("x=1") });
        assert_eq!(area("/api/v1/mcp"), Area::Mcp { rest: "", query: None });
        assert_eq!(area("/api/v1/mcp/tokens"), Area::TokenApi);
        assert_eq!(area("/api/v1/mcp/tokens/abc/trigger"), Area::TokenApi);
        assert_eq!(area("/api/v1/mcp/tokens?x"), Area::TokenApi);
        assert_eq!(area("/api/v1/mcp/tokensx"), Area::Mcp { rest: "/tokensx", query: None });
        assert_eq!(area("/api/v1/mcpx/projects"), Area::Other);
        assert_eq!(area("/API/v1/mcp/projects"), Area::Other);
        assert_eq!(area("/api/v1/projects/"), Area::Other);
        assert_eq!(area(""), Area::Other);
    }

    #[test]
    fn canonical_rule() {
        assert!(check_canonical("/projects/abc-DEF_1.x~y").is_ok());
        assert!(check_canonical("").is_ok());
        for bad in ["/projects/", "//projects", "/projects/./x", "/projects/../x", "/a%2fb", "/a;b", "/a#b", "/a b", "/proj\u{0435}cts", "/a\\b", "/a:b", "/.."] {
            assert!(check_canonical(bad).is_err(), "{bad}");
        }
        assert!(check_canonical(&"/a".repeat(600)).is_err());
    }

    #[test]
    fn uuids() {
        assert!(is_uuid("0b7a4c2e-1f3d-4c5b-9a8e-7d6c5b4a3f21"));
        assert!(!is_uuid("0B7A4C2E-1F3D-4C5B-9A8E-7D6C5B4A3F21"));
        assert!(!is_uuid("0b7a4c2e1f3d4c5b9a8e7d6c5b4a3f21"));
        assert!(!is_uuid("0b7a4c2e-1f3d-4c5b-9a8e-7d6c5b4a3f211"));
        assert!(!is_uuid("zb7a4c2e-1f3d-4c5b-9a8e-7d6c5b4a3f21"));
    }
}
