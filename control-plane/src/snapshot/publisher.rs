//! `SnapshotPublisher`: keeps the current snapshot in a `watch` channel
//! (pre-serialized, so serving is a cheap clone) and rebuilds it on every
//! Postgres `NOTIFY mcp_snapshot_changed` and every refresh interval
//! (collaborator drift). A new value is published only when the content
//! version changes, which wakes the long-polls.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use mcp_filter_core::snapshot::Limits;
use sqlx::postgres::PgListener;
use sqlx::PgPool;
use tokio::sync::{watch, Notify};

use super::build;
use crate::credential::cipher::CredentialCipher;

/// Postgres channel the `mcp_token` trigger notifies.
pub const CHANNEL: &str = "mcp_snapshot_changed";

/// A built snapshot, ready to serve.
#[derive(Debug)]
pub struct Published {
    pub version: String,
    pub token_count: usize,
    /// `serde_json` of the [`mcp_filter_core::snapshot::Snapshot`].
    pub body: Bytes,
}

/// The current snapshot; `None` until the first build succeeds.
pub type Current = watch::Receiver<Option<Arc<Published>>>;

/// Builds and publishes snapshots.
pub struct SnapshotPublisher {
    pool: PgPool,
    limits: Limits,
    cipher: Arc<CredentialCipher>,
    tx: watch::Sender<Option<Arc<Published>>>,
}

impl SnapshotPublisher {
    pub fn new(pool: PgPool, limits: Limits, cipher: Arc<CredentialCipher>) -> (Self, Current) {
        let (tx, rx) = watch::channel(None);
        (Self { pool, limits, cipher, tx }, rx)
    }

    /// Rebuilds from the database; publishes if the version changed.
    pub async fn rebuild(&self) -> Result<(), sqlx::Error> {
        let loaded = build::load(&self.pool).await?;
        let credentials = build::open_credentials(&loaded.credentials, &self.cipher);
        let snap = build::assemble(
            &loaded.tokens,
            &loaded.collaborators,
            &credentials,
            &self.limits,
            chrono::Utc::now().timestamp(),
        );
        let unchanged = self.tx.borrow().as_ref().is_some_and(|p| p.version == snap.version);
        if unchanged {
            tracing::debug!(version = %snap.version, "snapshot unchanged");
            return Ok(());
        }
        let body = serde_json::to_vec(&snap).map_err(|e| sqlx::Error::Protocol(format!("snapshot serialization: {e}")))?;
        let published = Published { version: snap.version, token_count: snap.tokens.len(), body: Bytes::from(body) };
        tracing::info!(version = %published.version, tokens = published.token_count, users = snap.users.len(), "snapshot published");
        self.tx.send_replace(Some(Arc::new(published)));
        Ok(())
    }

    /// Runs until `shutdown` turns true: rebuilds on notifications (bursts
    /// coalesce), after every (re)connect of the listener, and periodically.
    pub async fn run(self, refresh: Duration, mut shutdown: watch::Receiver<bool>) {
        let wake = Arc::new(Notify::new());
        let listener = tokio::spawn(listen(self.pool.clone(), wake.clone(), shutdown.clone()));
        let mut tick = tokio::time::interval(refresh);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failing = false;
        loop {
            let retry = async {
                if failing {
                    tokio::time::sleep(Duration::from_secs(1)).await
                } else {
                    std::future::pending::<()>().await
                }
            };
            tokio::select! {
                _ = wake.notified() => {}
                _ = tick.tick() => {}
                _ = retry => {}
                _ = shutdown.changed() => break,
            }
            if *shutdown.borrow() {
                break;
            }
            match self.rebuild().await {
                Ok(()) => failing = false,
                Err(e) => {
                    if !failing {
                        tracing::warn!(error = %e, "snapshot rebuild failed; serving the previous snapshot");
                    }
                    failing = true;
                }
            }
        }
        listener.abort();
        let _ = listener.await;
    }
}

/// Listens for notifications; reconnects with backoff. Each notification
/// (after draining any already buffered) and each (re)connect wakes the builder.
async fn listen(pool: PgPool, wake: Arc<Notify>, mut shutdown: watch::Receiver<bool>) {
    let mut backoff = Duration::from_millis(200);
    loop {
        let connected = async {
            let mut l = PgListener::connect_with(&pool).await?;
            l.listen(CHANNEL).await?;
            Ok::<_, sqlx::Error>(l)
        };
        let mut listener = tokio::select! {
            r = connected => match r {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot LISTEN {CHANNEL}; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = shutdown.changed() => return,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        tracing::info!("listening for {CHANNEL}");
        backoff = Duration::from_millis(200);
        // Changes made while we were not listening are picked up now.
        wake.notify_one();
        loop {
            tokio::select! {
                r = listener.try_recv() => match r {
                    Ok(Some(_)) => {
                        while listener.next_buffered().is_some() {}
                        wake.notify_one();
                    }
                    Ok(None) => {
                        tracing::warn!("LISTEN connection lost; reconnecting");
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "LISTEN connection failed; reconnecting");
                        break;
                    }
                },
                _ = shutdown.changed() => return,
            }
        }
    }
}
