//! The credential detector against the reference models of how InfraBox
//! reads a credential: whatever InfraBox could recover that holds an MCP
//! secret, the gateway flags (headers from the input: one value per line,
//! `a:` Authorization, `c:` Cookie, `u:` the URL).
#![no_main]

use libfuzzer_sys::fuzz_target;
use mcp_filter_core::credential::{self, reference};
use mcp_filter_core::pipeline::{request_headers, RequestHead};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let (mut auth, mut cookie, mut url) = (Vec::new(), Vec::new(), String::from("/api/v1/projects"));
    for line in text.lines() {
        match line.split_once(':') {
            Some(("a", v)) => auth.push(v.to_string()),
            Some(("c", v)) => cookie.push(v.to_string()),
            Some(("u", v)) => url = v.to_string(),
            _ => auth.push(line.to_string()),
        }
    }
    let a: Vec<&str> = auth.iter().map(String::as_str).collect();
    let c: Vec<&str> = cookie.iter().map(String::as_str).collect();
    let recovered = reference::infrabox_views(&a, &c).iter().any(|v| credential::contains_marker(v));
    let flagged = credential::authorization_reveals(a.iter().copied()) || credential::cookie_reveals(c.iter().copied());
    assert!(!recovered || flagged, "InfraBox could read an MCP secret the detector missed");
    // The whole request as the pipeline sees it: an MCP secret anywhere a
    // parser could find it is never passed through silently.
    let mut others: Vec<(&str, &str)> = a.iter().map(|v| ("authorization", *v)).collect();
    others.extend(c.iter().map(|v| ("cookie", *v)));
    let headers = request_headers("GET", &url, "infrabox.test", &others);
    let head = RequestHead::new(&headers);
    let outside = credential::secret_outside_mcp(&head);
    let misplaced = credential::misplaced_secret(&head);
    if recovered && !url.starts_with("/api/v1/mcp") {
        assert!(outside.is_some(), "an MCP secret outside the MCP surface was not refused");
    }
    let _ = (misplaced, credential::url_reveals(url.as_bytes()), credential::bearer(&a));
});
