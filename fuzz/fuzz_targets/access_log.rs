//! The audit sink's reading of Envoy's access-log messages: any bytes as
//! a stream message and as one HTTP entry; a row is built or refused, and
//! never quotes the filter state it could not read.
#![no_main]

use envoy_types::pb::envoy::data::accesslog::v3::HttpAccessLogEntry;
use envoy_types::pb::envoy::service::accesslog::v3::StreamAccessLogsMessage;
use libfuzzer_sys::fuzz_target;
use mcp_control_plane::audit::row::{AuditRow, Skip};
use prost::Message;

fn check(entry: &HttpAccessLogEntry) {
    match AuditRow::from_entry(entry) {
        Ok(row) => {
            assert!(row.path.len() <= mcp_filter_core::audit::MAX_PATH_BYTES);
            assert!(!row.path.to_ascii_lowercase().contains("ib_mcp_"), "a token-like path reached a row");
        }
        Err(Skip::Invalid(why)) => assert!(why.len() < 400),
        Err(Skip::NoRecord) => {}
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok(entry) = HttpAccessLogEntry::decode(data) {
        check(&entry);
    }
    if let Ok(msg) = StreamAccessLogsMessage::decode(data) {
        if let Some(envoy_types::pb::envoy::service::accesslog::v3::stream_access_logs_message::LogEntries::HttpLogs(logs)) = msg.log_entries {
            for e in &logs.log_entry {
                check(e);
            }
        }
    }
    // The filter state itself, wrapped as Envoy does.
    let mut entry = HttpAccessLogEntry::default();
    let mut common = envoy_types::pb::envoy::data::accesslog::v3::AccessLogCommon::default();
    common.filter_state_objects.insert(
        mcp_filter_core::audit::FILTER_STATE_KEY.to_string(),
        envoy_types::pb::google::protobuf::Any {
            type_url: "type.googleapis.com/google.protobuf.BytesValue".into(),
            value: envoy_types::pb::google::protobuf::BytesValue { value: data.to_vec() }.encode_to_vec(),
        },
    );
    entry.common_properties = Some(common);
    check(&entry);
});
