//! `AuditSink`: the bounded queue between the gRPC ingest and the batch
//! writer. [`AuditSink::submit`] waits while the queue is full, so a slow
//! database slows the ingest stream down; Envoy's HTTP/2 flow control then
//! pushes back to its access logger, which drops entries above its buffer
//! limit — entries the sequence tracking reports as gaps. Memory stays
//! bounded at every step; nothing is lost silently.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::sync::mpsc;

use super::metrics::AuditMetrics;
use super::row::AuditRow;

/// The sending side; clone it per ingest stream.
#[derive(Clone)]
pub struct AuditSink {
    tx: mpsc::Sender<AuditRow>,
    metrics: Arc<AuditMetrics>,
}

/// The receiving side, owned by the batch writer.
pub struct AuditQueue {
    rx: mpsc::Receiver<AuditRow>,
    metrics: Arc<AuditMetrics>,
}

/// The writer is gone; nothing can be queued any more.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SinkClosed;

/// A queue of at most `capacity` rows.
pub fn bounded(capacity: usize, metrics: Arc<AuditMetrics>) -> (AuditSink, AuditQueue) {
    let (tx, rx) = mpsc::channel(capacity.max(1));
    metrics.queue_capacity.store(capacity.max(1) as u64, Ordering::Relaxed);
    (AuditSink { tx, metrics: metrics.clone() }, AuditQueue { rx, metrics })
}

impl AuditSink {
    /// Queues a row, waiting while the queue is full (back-pressure).
    pub async fn submit(&self, row: AuditRow) -> Result<(), SinkClosed> {
        // Waiting for a slot is cancel-safe; the slot is then filled at once.
        let permit = self.tx.reserve().await.map_err(|_| SinkClosed)?;
        // Counted before the row is visible, so the writer's decrement
        // never underflows.
        let depth = self.metrics.queue_depth.fetch_add(1, Ordering::Relaxed) + 1;
        permit.send(row);
        self.metrics.queue_peak.fetch_max(depth.min(self.tx.max_capacity() as u64), Ordering::Relaxed);
        Ok(())
    }
}

impl AuditQueue {
    /// Waits for at least one row and takes up to `max` queued rows into
    /// `buf`; 0 once every sink is dropped and the queue is empty.
    pub async fn next_batch(&mut self, buf: &mut Vec<AuditRow>, max: usize) -> usize {
        let n = self.rx.recv_many(buf, max.max(1)).await;
        self.metrics.queue_depth.fetch_sub(n as u64, Ordering::Relaxed);
        n
    }

    /// Rows currently queued.
    pub fn len(&self) -> usize {
        self.rx.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rx.is_empty()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::time::Duration;

    use super::super::row::tests::{entry, record};
    use super::*;

    fn row(seq: u64) -> AuditRow {
        AuditRow::from_entry(&entry(Some(&record(seq)), 200)).unwrap()
    }

    #[tokio::test]
    async fn a_full_queue_makes_the_sender_wait_and_the_peak_is_bounded() {
        let metrics = Arc::new(AuditMetrics::default());
        let (sink, mut queue) = bounded(4, metrics.clone());
        for i in 1..=4 {
            sink.submit(row(i)).await.unwrap();
        }
        // The fifth waits until the writer takes rows.
        let blocked = tokio::time::timeout(Duration::from_millis(50), sink.submit(row(5))).await;
        assert!(blocked.is_err(), "submit must wait while the queue is full");
        let mut buf = Vec::new();
        assert_eq!(queue.next_batch(&mut buf, 3).await, 3);
        sink.submit(row(6)).await.unwrap();
        assert_eq!(AuditMetrics::get(&metrics.queue_peak), 4);
        assert_eq!(AuditMetrics::get(&metrics.queue_depth), 2);
        assert_eq!(queue.len(), 2);
        drop(sink);
        buf.clear();
        assert_eq!(queue.next_batch(&mut buf, 10).await, 2);
        assert_eq!(buf.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![4, 6]);
        assert_eq!(queue.next_batch(&mut buf, 10).await, 0);
        assert_eq!(AuditMetrics::get(&metrics.queue_depth), 0);
    }
}
