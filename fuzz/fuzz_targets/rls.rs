//! The rate-limit protocol on both sides: the filter's decoding of any
//! answer, the control plane's reading of any request, and the round trip
//! of what the filter encodes.
#![no_main]

use envoy_types::pb::envoy::service::ratelimit::v3::RateLimitRequest;
use libfuzzer_sys::fuzz_target;
use mcp_control_plane::ratelimit::service;
use mcp_filter_core::rls;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    let _ = rls::decode_response(data);
    if let Ok(req) = RateLimitRequest::decode(data) {
        let _ = service::parse(&req);
    }
    // What the filter sends is always what the service reads.
    let text = String::from_utf8_lossy(data);
    let mut parts = text.splitn(3, '\n');
    let (user, class) = (parts.next().unwrap_or(""), parts.next().unwrap_or("default"));
    let limit = data.first().copied().map_or(1, u32::from);
    let encoded = rls::encode_request(user, class, limit, 60, None);
    let req = RateLimitRequest::decode(encoded.as_slice()).expect("the filter encodes valid protobuf");
    let _ = service::parse(&req);
});
