//! The InfraBox host(s) the filter acts for (DESIGN §3): an Istio
//! `WasmPlugin` applies to every host its gateway serves, so the plugin
//! configuration names InfraBox's, and only there does an MCP path mean
//! the MCP surface. On any other host an MCP path gets 404 and no
//! credential is ever added; `ib_mcp_` credentials are refused everywhere.
//!
//! Matching is on the host part of `:authority`: ASCII case-insensitive, a
//! port and one trailing dot ignored (`InfraBox.example.com.:443` is
//! `infrabox.example.com`). Anything that is not a plain host name or IP
//! literal (userinfo, a path, spaces, an empty host) matches nothing.

/// The configured InfraBox hosts, normalized.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hosts(Vec<String>);

impl Hosts {
    /// Validates configured host names: non-empty, no scheme, port, path or
    /// wildcard. Returns the reason a name is refused.
    pub fn parse(names: &[String]) -> Result<Self, String> {
        if names.is_empty() {
            return Err("hosts must name at least one InfraBox host".into());
        }
        let mut out = Vec::with_capacity(names.len());
        for name in names {
            match host_of(name) {
                Some(h) if h.len() == name.trim_end_matches('.').len() => out.push(h),
                _ => return Err(format!("hosts: {name:?} is not a host name (no scheme, port, path or wildcard)")),
            }
        }
        Ok(Self(out))
    }

    /// Whether `authority` (a request's `:authority`) is one of the hosts.
    /// Allocates nothing when it is (the hot path).
    pub fn matches(&self, authority: &str) -> bool {
        let candidate = authority.strip_suffix('.').unwrap_or(authority);
        // The common case, a configured name as sent (any case, with or
        // without a port): no parsing beyond the split.
        let bare = match candidate.rsplit_once(':') {
            Some((h, port)) if !h.contains(':') && port_ok(port) => h.strip_suffix('.').unwrap_or(h),
            _ => candidate,
        };
        // A configured name was validated when the configuration loaded.
        if !bare.starts_with('[') && self.0.iter().any(|h| h.eq_ignore_ascii_case(bare)) {
            return true;
        }
        host_of(authority).is_some_and(|h| self.0.contains(&h))
    }

    pub fn names(&self) -> &[String] {
        &self.0
    }
}

/// The lowercase host of an authority (`host`, `host:port`, `[v6]`,
/// `[v6]:port`), without one trailing dot; `None` if it is not one.
fn host_of(authority: &str) -> Option<String> {
    let host = if let Some(rest) = authority.strip_prefix('[') {
        let (inside, after) = rest.split_once(']')?;
        if !(after.is_empty() || port_ok(after.strip_prefix(':')?)) {
            return None;
        }
        if inside.is_empty() || !inside.bytes().all(|b| b.is_ascii_hexdigit() || b == b':' || b == b'.') {
            return None;
        }
        return Some(format!("[{}]", inside.to_ascii_lowercase()));
    } else {
        match authority.rsplit_once(':') {
            Some((h, port)) if port_ok(port) => h,
            Some(_) => return None,
            None => authority,
        }
    };
    let host = host.strip_suffix('.').unwrap_or(host);
    let ok = !host.is_empty()
        && host.len() <= 253
        && host.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
        && !host.starts_with('.')
        && !host.contains("..");
    ok.then(|| host.to_ascii_lowercase())
}

fn port_ok(port: &str) -> bool {
    !port.is_empty() && port.len() <= 5 && port.bytes().all(|b| b.is_ascii_digit())
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(all(target_family = "wasm", target_os = "unknown"))]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    fn hosts() -> Result<Hosts, String> {
        Hosts::parse(&["infrabox.example.com".into(), "127.0.0.1".into(), "[::1]".into()])
    }

    #[test]
    fn the_configured_hosts_match_in_any_spelling() -> Result<(), String> {
        let h = hosts()?;
        for a in ["infrabox.example.com", "INFRABOX.Example.COM", "infrabox.example.com:443", "infrabox.example.com.", "infrabox.example.com.:8080", "127.0.0.1:8080", "127.0.0.1.", "[::1]:80", "[::1]"] {
            assert!(h.matches(a), "{a}");
        }
        Ok(())
    }

    #[test]
    fn other_hosts_and_tricks_do_not() -> Result<(), String> {
        let h = hosts()?;
        for a in [
            "", "evil.example.com", "infrabox.example.com.evil.test", "evil.test.infrabox.example.com",
            "infrabox.example.com@evil.test", "evil.test@infrabox.example.com", "infrabox.example.com:",
            "infrabox.example.com:443:443", "infrabox.example.com:http", "infrabox.example.com..",
            "infrabox.example.com/x", "infrabox.example.com ", " infrabox.example.com", "infrabox%2eexample.com",
            "127.0.0.2", "[::2]", "[::1", "::1", "infrabox.example.com\u{0}",
        ] {
            assert!(!h.matches(a), "{a:?}");
        }
        Ok(())
    }

    #[test]
    fn configured_names_are_validated() {
        for bad in ["", "https://infrabox.example.com", "infrabox.example.com:443", "*.example.com", "a/b", "a b"] {
            assert!(Hosts::parse(&[bad.to_string()]).is_err(), "{bad}");
        }
        assert!(Hosts::parse(&[]).is_err());
        assert!(Hosts::parse(&["InfraBox.Example.com".into()]).is_ok_and(|h| h.matches("infrabox.example.com")));
    }
}
