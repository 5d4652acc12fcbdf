//! Dispatch of the protocol methods, per revision.

use serde_json::json;

use super::jsonrpc::{parse, METHOD_NOT_FOUND};
use super::*;
#[cfg(all(target_family = "wasm", target_os = "unknown"))]
use wasm_bindgen_test::wasm_bindgen_test as test;

fn config() -> Result<PluginConfig, String> {
    PluginConfig::parse(br#"{"snapshot_secret":"0123456789abcdef","hosts":["infrabox.test"]}"#).map_err(|e| e.to_string())
}

fn run(body: &str, headers: &RoutingHeaders) -> Result<Dispatch, String> {
    Ok(dispatch(parse(body.as_bytes()).map_err(|e| e.message)?, headers, false, &config()?))
}

#[test]
fn handshake_negotiates_a_served_version() -> Result<(), String> {
    for (asked, got) in [("2025-11-25", "2025-11-25"), ("2025-06-18", "2025-06-18"), ("2024-11-05", "2025-11-25")] {
        let body = format!(r#"{{"jsonrpc":"2.0","id":1,"method":"initialize","params":{{"protocolVersion":"{asked}","capabilities":{{}}}}}}"#);
        let Dispatch::Answer { result, .. } = run(&body, &RoutingHeaders::default())? else { return Err(format!("{asked}: no answer")) };
        assert_eq!(result["protocolVersion"], json!(got), "{asked}");
        assert!(result.get("resultType").is_none(), "handshake results have no resultType");
    }
    let Dispatch::Answer { result, .. } = run(r#"{"jsonrpc":"2.0","id":"p","method":"ping"}"#, &RoutingHeaders::default())? else {
        return Err("ping".into());
    };
    assert_eq!(result, json!({}));
    Ok(())
}

#[test]
fn modern_requests_have_no_handshake_and_no_ping() -> Result<(), String> {
    let meta = r#""_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28","io.modelcontextprotocol/clientCapabilities":{}}"#;
    for method in ["initialize", "ping"] {
        let headers = RoutingHeaders { protocol_version: vec![MODERN_VERSION.into()], method: vec![method.into()], name: vec![] };
        let body = format!(r#"{{"jsonrpc":"2.0","id":1,"method":"{method}","params":{{{meta}}}}}"#);
        let Dispatch::Error { error, .. } = run(&body, &headers)? else { return Err(format!("{method} answered")) };
        assert_eq!(error.code, METHOD_NOT_FOUND, "{method}");
    }
    // A modern envelope without its capabilities is invalid params.
    let headers = RoutingHeaders { protocol_version: vec![MODERN_VERSION.into()], method: vec!["tools/list".into()], name: vec![] };
    let body = r#"{"jsonrpc":"2.0","id":1,"method":"tools/list","params":{"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28"}}}"#;
    let Dispatch::Error { error, .. } = run(body, &headers)? else { return Err("accepted".into()) };
    assert_eq!(error.code, jsonrpc::INVALID_PARAMS);
    Ok(())
}

#[test]
fn header_values_decode_only_canonical_base64() {
    assert_eq!(decode_header("get_build").as_deref(), Some("get_build"));
    assert_eq!(decode_header("=?base64?Z2V0X2J1aWxk?=").as_deref(), Some("get_build"));
    assert_eq!(decode_header("=?base64?Z2V0X2J1aWxl?="), Some("get_buile".into()));
    assert_eq!(decode_header("=?base64?Z2V0X2J1aWxk=?="), None, "stray padding");
    assert_eq!(decode_header("=?base64?!!?="), None);
}
