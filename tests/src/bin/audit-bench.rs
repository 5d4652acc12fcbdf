//! `audit-bench`: audit ingest throughput into real Postgres (DESIGN §14:
//! ≥ 20 000 rows/s on a 2-core machine). Not a test.
//!
//! Starts Postgres (temporary) and the control plane, opens `STREAMS`
//! access-log streams to its gRPC listener, as Envoy workers would, and
//! sends `ROWS` entries in messages of `PER_MESSAGE`, each with a filter
//! audit record. Reports rows/s from the first message sent until the last
//! row is committed (the control plane's `mcp_audit_rows_written_total`),
//! and the audit queue's peak.
//!
//! ```sh
//! cargo build --release -p mcp-control-plane -p mcp-gateway-tests --bins
//! MCP_CONTROL_PLANE_BIN=target/release/mcp-control-plane target/release/audit-bench
//! ```
//! Environment: `AUDIT_BENCH_ROWS` (200000), `AUDIT_BENCH_STREAMS` (4).
//! Flags: `--smoke` (5000 rows, for CI), `--json` (last line is JSON; `make
//! bench` reads `rows_per_second`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use envoy_types::pb::envoy::data::accesslog::v3::{AccessLogCommon, HttpAccessLogEntry, HttpRequestProperties, HttpResponseProperties};
use envoy_types::pb::envoy::service::accesslog::v3::access_log_service_client::AccessLogServiceClient;
use envoy_types::pb::envoy::service::accesslog::v3::stream_access_logs_message::{HttpAccessLogEntries, LogEntries};
use envoy_types::pb::envoy::service::accesslog::v3::StreamAccessLogsMessage;
use envoy_types::pb::google::protobuf::{Any, BytesValue, Duration as ProtoDuration, Timestamp, UInt32Value};
use mcp_filter_core::audit::{AuditRecord, Decision, FILTER_STATE_KEY};
use mcp_filter_core::route::Class;
use mcp_gateway_tests::control_plane::{ControlPlane, ControlPlaneOptions};
use mcp_gateway_tests::http::RawRequest;
use mcp_gateway_tests::infrabox_db;
use mcp_gateway_tests::postgres::PostgresServer;
use mcp_gateway_tests::session::SigningKey;
use prost::Message;
use sqlx::postgres::PgPoolOptions;

const PER_MESSAGE: usize = 100;

fn env_number(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// One entry like the filter and Envoy produce for an allowed request.
fn entry(vm: &str, seq: u64, start_us: i64) -> HttpAccessLogEntry {
    let record = AuditRecord {
        schema: 1,
        node_id: "bench-node".into(),
        vm_id: vm.into(),
        seq,
        token_id: Some("0123456789abcdef".into()),
        user_id: Some("5b0e1a8c-9a51-4a86-9d8c-0c6a1b2c3d4e".into()),
        project: Some("0b7a4c2e-1f3d-4c5b-9a8e-7d6c5b4a3f21".into()),
        route: Some("builds.list".into()),
        class: Some(Class::Default),
        decision: Decision::Allow,
        reason: None,
        rate_limit_remaining: Some(17),
        method: "GET".into(),
        path: "/api/v1/mcp/projects/0b7a4c2e-1f3d-4c5b-9a8e-7d6c5b4a3f21/builds".into(),
        mcp: None,
    };
    let mut fs = HashMap::new();
    fs.insert(
        FILTER_STATE_KEY.to_string(),
        Any { type_url: "type.googleapis.com/google.protobuf.BytesValue".into(), value: BytesValue { value: record.to_json() }.encode_to_vec() },
    );
    HttpAccessLogEntry {
        common_properties: Some(AccessLogCommon {
            filter_state_objects: fs,
            start_time: Some(Timestamp { seconds: start_us / 1_000_000, nanos: (start_us % 1_000_000) as i32 * 1000 }),
            duration: Some(ProtoDuration { seconds: 0, nanos: 850_000 }),
            ..Default::default()
        }),
        request: Some(HttpRequestProperties {
            request_id: uuid::Uuid::new_v4().to_string(),
            request_headers_bytes: 180,
            ..Default::default()
        }),
        response: Some(HttpResponseProperties {
            response_code: Some(UInt32Value { value: 200 }),
            response_headers_bytes: 120,
            response_body_bytes: 2048,
            ..Default::default()
        }),
        ..Default::default()
    }
}

async fn rows_written(internal: SocketAddr) -> Result<(u64, u64)> {
    let text = RawRequest::get("/metrics").send(internal, Duration::from_secs(5)).await?.text();
    let get = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(' ')))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    Ok((get("mcp_audit_rows_written_total"), get("mcp_audit_queue_peak")))
}

#[tokio::main]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let smoke = args.iter().any(|a| a == "--smoke");
    let as_json = args.iter().any(|a| a == "--json");
    let total = if smoke { 5_000 } else { env_number("AUDIT_BENCH_ROWS", 200_000) };
    let streams = env_number("AUDIT_BENCH_STREAMS", 4).max(1);
    let pg = PostgresServer::shared();
    let database_url = pg.create_unique_database("auditbench").await?;
    let db = PgPoolOptions::new().max_connections(2).connect(&database_url).await?;
    infrabox_db::load_infrabox_schema(&db).await?;
    let key = SigningKey::shared();
    // Also the gRPC listener's credential (MCP_GRPC_SECRET defaults to it).
    let secret = format!("bench-{}", uuid::Uuid::new_v4().simple());
    let mut cp = ControlPlane::start(ControlPlaneOptions {
        database_url: database_url.clone(),
        public_key_path: key.public_path().to_path_buf(),
        snapshot_secret: secret.clone(),
        env: vec![
            ("INFRABOX_URL".into(), "http://127.0.0.1:9".into()),
            ("MCP_CREDENTIAL_KEY".into(), mcp_gateway_tests::stack::random_key_hex()),
            ("RUST_LOG".into(), "warn".into()),
        ],
    })?;
    let grpc = SocketAddr::from(([127, 0, 0, 1], cp.grpc_port()));
    let internal = cp.internal_addr();
    // Requests start 50 µs apart per stream, like steady traffic.
    let now_us = chrono::Utc::now().timestamp_micros();
    let per_stream = total / streams;
    // Messages are built before the clock starts.
    let mut work = Vec::new();
    for s in 0..streams {
        let vm = format!("bench-vm-{s}");
        let messages: Vec<StreamAccessLogsMessage> = (0..per_stream)
            .collect::<Vec<_>>()
            .chunks(PER_MESSAGE)
            .map(|chunk| StreamAccessLogsMessage {
                identifier: None,
                log_entries: Some(LogEntries::HttpLogs(HttpAccessLogEntries {
                    log_entry: chunk.iter().map(|i| entry(&vm, *i as u64 + 1, now_us + *i as i64 * 50)).collect(),
                })),
            })
            .collect();
        work.push(messages);
    }
    let expected = (per_stream * streams) as u64;
    let bytes: usize = work.iter().flatten().map(|m| m.encoded_len()).sum();
    eprintln!(
        "[bench] {expected} entries ({} bytes/entry on the wire) over {streams} streams, {PER_MESSAGE} per message",
        bytes / expected.max(1) as usize
    );
    let started = Instant::now();
    let mut senders = Vec::new();
    let bearer: tonic::metadata::MetadataValue<tonic::metadata::Ascii> = format!("Bearer {secret}").parse().context("the secret as metadata")?;
    for messages in work {
        let bearer = bearer.clone();
        senders.push(tokio::spawn(async move {
            let mut client = AccessLogServiceClient::connect(format!("http://{grpc}")).await?;
            let mut request = tonic::Request::new(tonic::codegen::tokio_stream::iter(messages));
            request.metadata_mut().insert("authorization", bearer);
            client.stream_access_logs(request).await?;
            anyhow::Ok(())
        }));
    }
    for s in senders {
        s.await?.context("stream")?;
    }
    let sent = started.elapsed();
    let deadline = Instant::now() + Duration::from_secs(300);
    let (written, peak) = loop {
        let (w, peak) = rows_written(internal).await?;
        if w >= expected {
            break (w, peak);
        }
        if Instant::now() > deadline {
            bail!("only {w} of {expected} rows written");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let took = started.elapsed();
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM mcp_access_log").fetch_one(&db).await?;
    println!(
        "audit ingest: {written} rows in {:.2}s = {:.0} rows/s (stream sent in {:.2}s); rows in table {rows}; queue peak {peak}",
        took.as_secs_f64(),
        written as f64 / took.as_secs_f64(),
        sent.as_secs_f64()
    );
    cp.stop()?;
    if rows as u64 != expected {
        bail!("table has {rows} rows, expected {expected}");
    }
    if as_json {
        println!(
            "{}",
            serde_json::json!({
                "rows": written,
                "seconds": took.as_secs_f64(),
                "rows_per_second": written as f64 / took.as_secs_f64(),
                "streams": streams,
                "entries_per_message": PER_MESSAGE,
                "queue_peak": peak,
            })
        );
    }
    Ok(())
}
