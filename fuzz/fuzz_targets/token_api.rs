//! The token API's JSON bodies and query strings: any bytes as a create
//! or update body, as an access-log query and as a cursor.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mcp_control_plane::token_api::{access_log, validation};

fuzz_target!(|data: &[u8]| {
    if let Ok(body) = serde_json::from_slice::<serde_json::Value>(data) {
        if let Ok(c) = validation::parse_create(&body, 365) {
            assert!(c.expires_days >= 1 && c.expires_days <= 365);
        }
        let _ = validation::parse_update(&body, 365);
    }
    let text = String::from_utf8_lossy(data);
    let _ = access_log::parse_query(Some(&text));
    let _ = access_log::Cursor::decode(&text);
});
