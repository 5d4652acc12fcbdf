//! `AuditMetrics`: the audit pipeline's counters and gauges (atomics),
//! rendered as Prometheus text on the internal listener's `/metrics`.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

/// Counters and gauges of ingest, queue, writer, gap detection and retention.
#[derive(Debug, Default)]
pub struct AuditMetrics {
    /// Access-log entries received from Envoy.
    pub entries_received: AtomicU64,
    /// Entries without the `wasm.mcp_audit` filter state (not audited).
    pub entries_without_record: AtomicU64,
    /// Entries whose record could not be parsed.
    pub invalid_records: AtomicU64,
    /// Rows committed to `mcp_access_log` by the batch writer.
    pub rows_written: AtomicU64,
    /// Records delivered again (already stored).
    pub duplicates: AtomicU64,
    /// Batches committed.
    pub batches: AtomicU64,
    /// Failed batch writes (retried).
    pub write_errors: AtomicU64,
    /// Rows abandoned at shutdown because the database stayed unavailable.
    pub rows_abandoned: AtomicU64,
    /// Rows currently queued, and the most ever queued.
    pub queue_depth: AtomicU64,
    pub queue_peak: AtomicU64,
    /// Capacity of the queue (constant).
    pub queue_capacity: AtomicU64,
    /// Gap ranges recorded, and the entries in them.
    pub gaps: AtomicU64,
    pub missing_entries: AtomicU64,
    /// Entries that arrived after their gap was recorded.
    pub late_entries: AtomicU64,
    /// Open ingest streams.
    pub streams_open: AtomicU64,
    /// Rows deleted by retention.
    pub retention_deleted: AtomicU64,
    /// `last_used_at` updates sent.
    pub last_used_updates: AtomicU64,
    /// Coalesced denial rows written, and the denials they stand for.
    pub coalesced_rows: AtomicU64,
    pub coalesced_requests: AtomicU64,
}

impl AuditMetrics {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    /// Appends the Prometheus text exposition.
    pub fn render(&self, out: &mut String) {
        let mut metric = |name: &str, kind: &str, help: &str, value: &AtomicU64| {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
            let _ = writeln!(out, "{name} {}", Self::get(value));
        };
        metric("mcp_audit_entries_received_total", "counter", "Access-log entries received from Envoy.", &self.entries_received);
        metric("mcp_audit_coalesced_rows_total", "counter", "Rows standing for several identical denials.", &self.coalesced_rows);
        metric(
            "mcp_audit_coalesced_requests_total",
            "counter",
            "Denials counted into coalesced rows.",
            &self.coalesced_requests,
        );
        metric(
            "mcp_audit_entries_without_record_total",
            "counter",
            "Access-log entries without the wasm.mcp_audit filter state (not audited).",
            &self.entries_without_record,
        );
        metric("mcp_audit_invalid_records_total", "counter", "Audit records that could not be parsed.", &self.invalid_records);
        metric("mcp_audit_rows_written_total", "counter", "Rows committed to mcp_access_log from Envoy.", &self.rows_written);
        metric("mcp_audit_duplicates_total", "counter", "Audit records delivered more than once (stored once).", &self.duplicates);
        metric("mcp_audit_batches_total", "counter", "Batches committed by the audit writer.", &self.batches);
        metric("mcp_audit_write_errors_total", "counter", "Failed (retried) batch writes.", &self.write_errors);
        metric(
            "mcp_audit_rows_abandoned_total",
            "counter",
            "Queued rows dropped at shutdown because the database stayed unavailable.",
            &self.rows_abandoned,
        );
        metric("mcp_audit_queue_depth", "gauge", "Rows waiting in the bounded audit queue.", &self.queue_depth);
        metric("mcp_audit_queue_peak", "gauge", "Most rows ever waiting in the audit queue.", &self.queue_peak);
        metric("mcp_audit_queue_capacity", "gauge", "Capacity of the bounded audit queue.", &self.queue_capacity);
        metric("mcp_audit_gaps_total", "counter", "Sequence gaps (lost audit entries) recorded.", &self.gaps);
        metric("mcp_audit_missing_entries_total", "counter", "Audit entries inside recorded gaps.", &self.missing_entries);
        metric("mcp_audit_late_entries_total", "counter", "Audit entries that arrived after their gap was recorded.", &self.late_entries);
        metric("mcp_audit_streams_open", "gauge", "Open access-log streams from Envoy.", &self.streams_open);
        metric("mcp_audit_retention_deleted_total", "counter", "Audit rows deleted by retention.", &self.retention_deleted);
        metric("mcp_audit_last_used_updates_total", "counter", "Token last_used_at updates sent from audit.", &self.last_used_updates);
    }
}

/// Reads one value from a Prometheus text exposition (tests and tools).
pub fn scrape(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_metric_once() {
        let m = AuditMetrics::default();
        AuditMetrics::add(&m.gaps, 2);
        AuditMetrics::add(&m.missing_entries, 7);
        let mut out = String::new();
        m.render(&mut out);
        assert_eq!(scrape(&out, "mcp_audit_gaps_total"), Some(2));
        assert_eq!(scrape(&out, "mcp_audit_missing_entries_total"), Some(7));
        assert_eq!(scrape(&out, "mcp_audit_queue_peak"), Some(0));
        assert_eq!(out.matches("# TYPE").count(), out.lines().filter(|l| !l.starts_with('#')).count());
    }
}
