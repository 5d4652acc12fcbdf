//! `envoy.service.accesslog.v3.AccessLogService/StreamAccessLogs`: Envoy's
//! gRPC access logger streams batches of HTTP entries; every entry that
//! carries the filter's audit record becomes one [`AuditRow`] in the
//! [`AuditSink`] (waiting while the queue is full). Entries without a record
//! are counted and dropped — Envoy's access-log filter should not send them.
//!
//! A stream ends when Envoy closes it, on a protocol error, or on shutdown
//! (so the server can stop and the writer drain; Envoy reconnects to
//! another replica or to this one when it is back).

use std::sync::Arc;

use envoy_types::pb::envoy::service::accesslog::v3::access_log_service_server::{
    AccessLogService, AccessLogServiceServer,
};
use envoy_types::pb::envoy::service::accesslog::v3::stream_access_logs_message::LogEntries;
use envoy_types::pb::envoy::service::accesslog::v3::{StreamAccessLogsMessage, StreamAccessLogsResponse};
use tokio::sync::watch;
use tonic::{Request, Response, Status, Streaming};

use super::metrics::AuditMetrics;
use super::row::{AuditRow, Skip};
use super::sink::AuditSink;

/// Largest accepted message (a batch of entries), bytes.
const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

/// The gRPC service.
pub struct AccessLogIngest {
    sink: AuditSink,
    metrics: Arc<AuditMetrics>,
    shutdown: watch::Receiver<bool>,
}

impl AccessLogIngest {
    pub fn new(sink: AuditSink, metrics: Arc<AuditMetrics>, shutdown: watch::Receiver<bool>) -> Self {
        Self { sink, metrics, shutdown }
    }

    /// The tonic service to add to the gRPC listener.
    pub fn into_server(self) -> AccessLogServiceServer<Self> {
        AccessLogServiceServer::new(self).max_decoding_message_size(MAX_MESSAGE_BYTES)
    }

    /// Queues the rows of one message; `Err` when the writer is gone.
    async fn take(&self, message: StreamAccessLogsMessage) -> Result<(), Status> {
        let Some(LogEntries::HttpLogs(http)) = message.log_entries else { return Ok(()) };
        AuditMetrics::add(&self.metrics.entries_received, http.log_entry.len() as u64);
        for entry in &http.log_entry {
            match AuditRow::from_entry(entry) {
                Ok(row) => self.sink.submit(row).await.map_err(|_| Status::unavailable("the audit writer is stopping"))?,
                Err(Skip::NoRecord) => AuditMetrics::add(&self.metrics.entries_without_record, 1),
                Err(Skip::Invalid(why)) => {
                    AuditMetrics::add(&self.metrics.invalid_records, 1);
                    tracing::warn!(%why, "dropped an access-log entry with an unreadable audit record");
                }
            }
        }
        Ok(())
    }
}

/// Counts an open stream for as long as it lives.
struct OpenStream(Arc<AuditMetrics>);

impl OpenStream {
    fn new(metrics: &Arc<AuditMetrics>) -> Self {
        AuditMetrics::add(&metrics.streams_open, 1);
        Self(metrics.clone())
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.0.streams_open.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

#[tonic::async_trait]
impl AccessLogService for AccessLogIngest {
    async fn stream_access_logs(
        &self,
        request: Request<Streaming<StreamAccessLogsMessage>>,
    ) -> Result<Response<StreamAccessLogsResponse>, Status> {
        let _open = OpenStream::new(&self.metrics);
        let mut stream = request.into_inner();
        let mut shutdown = self.shutdown.clone();
        loop {
            let next = tokio::select! {
                next = stream.message() => next,
                _ = shutdown.wait_for(|stop| *stop) => break,
            };
            match next {
                Ok(Some(message)) => self.take(message).await?,
                Ok(None) => break,
                Err(status) => {
                    tracing::debug!(code = ?status.code(), "access-log stream ended with an error");
                    break;
                }
            }
        }
        Ok(Response::new(StreamAccessLogsResponse {}))
    }
}
