//! `SnapshotPublisher`: keeps the current snapshot in a `watch` channel
//! (pre-serialized, so serving is a cheap clone) and updates it on every
//! Postgres `NOTIFY mcp_snapshot_changed` and every refresh interval
//! (collaborator drift). A notification that names tokens (`token:<id>`)
//! patches just those; any other, a burst of more than [`MAX_PATCH`]
//! tokens, a reconnect and the refresh interval rebuild everything. A new
//! value is published only when the content version changes, which wakes
//! the long-polls. Each new value also carries the deltas from the versions
//! in the [`ChangeLog`] to it, rendered and signed once.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use mcp_filter_core::snapshot::Limits;
use sqlx::postgres::PgListener;
use sqlx::PgPool;
use tokio::sync::{watch, Notify};

use super::build::{self, Change, Fingerprint};
use super::changes::{ChangeLog, SignedDelta};
use crate::credential::cipher::CredentialCipher;

/// Postgres channel the `mcp_token` trigger notifies.
pub const CHANNEL: &str = "mcp_snapshot_changed";

/// Most tokens one notification burst may patch; more rebuild everything.
pub const MAX_PATCH: usize = 256;

/// What the notifications since the last build asked for.
#[derive(Debug, Default)]
struct Pending {
    full: bool,
    tokens: BTreeSet<String>,
}

impl Pending {
    fn note(&mut self, payload: &str) {
        match payload.strip_prefix("token:") {
            Some(id) if !id.is_empty() && self.tokens.len() <= MAX_PATCH => {
                self.tokens.insert(id.to_owned());
            }
            _ => self.full = true,
        }
    }
}

/// A built snapshot, ready to serve.
#[derive(Debug)]
pub struct Published {
    pub version: String,
    pub token_count: usize,
    /// Live tokens whose user lacks an upstream credential they need.
    pub without_credential: usize,
    /// `serde_json` of the [`mcp_filter_core::snapshot::Snapshot`].
    pub body: Bytes,
    /// HMAC-SHA256 of `body` ([`mcp_filter_core::signature`]), hex.
    pub signature: String,
    /// The delta to this version from each earlier version still known.
    pub deltas: HashMap<String, SignedDelta>,
}

/// The current snapshot; `None` until the first build succeeds.
pub type Current = watch::Receiver<Option<Arc<Published>>>;

/// Builds and publishes snapshots.
pub struct SnapshotPublisher {
    pool: PgPool,
    limits: Limits,
    cipher: Arc<CredentialCipher>,
    tx: watch::Sender<Option<Arc<Published>>>,
    /// Signs every body (derived from the snapshot secret VMs share).
    signing_key: [u8; 32],
    /// The content last built (what patches apply to) and its fingerprint
    /// (what the next full build is compared with); `None` before the first
    /// full build.
    model: Mutex<Option<(build::Model, Fingerprint)>>,
    /// What each recent version changed.
    log: Mutex<ChangeLog>,
}

impl SnapshotPublisher {
    pub fn new(pool: PgPool, limits: Limits, cipher: Arc<CredentialCipher>, snapshot_secret: &str) -> (Self, Current) {
        let (tx, rx) = watch::channel(None);
        let signing_key = mcp_filter_core::signature::signing_key(snapshot_secret);
        (Self { pool, limits, cipher, tx, signing_key, model: Mutex::new(None), log: Mutex::default() }, rx)
    }

    /// Rebuilds from the database; publishes if the version changed.
    pub async fn rebuild(&self) -> Result<(), sqlx::Error> {
        let started = Instant::now();
        let loaded = build::load(&self.pool, None).await?;
        let loaded_ms = started.elapsed().as_millis() as u64;
        let credentials = build::open_credentials(&loaded.credentials, &self.cipher);
        let model = build::Model::assemble(loaded, &credentials);
        let fingerprint = Fingerprint::of(&model);
        let change = self.model.lock().ok().and_then(|m| m.as_ref().map(|(_, old)| old.diff(&fingerprint)));
        let result = self.publish(&model, change, "rebuild", started, loaded_ms);
        if let Ok(mut m) = self.model.lock() {
            *m = Some((model, fingerprint));
        }
        result
    }

    /// Re-reads only the tokens in `ids` and patches the last build; a full
    /// rebuild when there is none yet.
    pub async fn patch(&self, ids: &[String]) -> Result<(), sqlx::Error> {
        let built = self.model.lock().map(|m| m.is_some()).unwrap_or(false);
        if !built {
            return self.rebuild().await;
        }
        let started = Instant::now();
        let loaded = build::load(&self.pool, Some(ids)).await?;
        let loaded_ms = started.elapsed().as_millis() as u64;
        let credentials = build::open_credentials(&loaded.credentials, &self.cipher);
        let mut guard = self.model.lock().map_err(|_| sqlx::Error::Protocol("snapshot model lock poisoned".into()))?;
        let Some((model, fingerprint)) = guard.as_mut() else { return Ok(()) };
        // The named tokens, and their users before and after.
        let mut users = model.users_of(ids);
        model.patch(ids, loaded, &credentials);
        users.extend(model.users_of(ids));
        let change = Change { tokens: ids.iter().cloned().collect(), users };
        fingerprint.refresh(model, &change);
        self.publish(model, Some(change), "patch", started, loaded_ms)
    }

    /// Publishes `model` if its version is new; `change`: what it changed
    /// since the version published now (`None`: not known).
    fn publish(&self, model: &build::Model, change: Option<Change>, how: &'static str, started: Instant, loaded_ms: u64) -> Result<(), sqlx::Error> {
        let generated_at = chrono::Utc::now().timestamp();
        let rendered = model.render(&self.limits, generated_at);
        let mut log = self.log.lock().map_err(|_| sqlx::Error::Protocol("snapshot change log lock poisoned".into()))?;
        let (version, body) = match rendered {
            Ok(r) => r,
            Err(e) => {
                // This change is then never published: no delta may skip it.
                log.lose_change();
                return Err(sqlx::Error::Protocol(format!("snapshot serialization: {e}")));
            }
        };
        let previous = self.tx.borrow().as_ref().map(|p| p.version.clone());
        if previous.as_deref() == Some(version.as_str()) {
            tracing::debug!(%version, how, "snapshot unchanged");
            return Ok(());
        }
        log.record(previous.as_deref(), change);
        let deltas = log.deltas(model, &self.limits, &version, generated_at, &self.signing_key);
        drop(log);
        let published = Published {
            version,
            token_count: model.token_count(),
            without_credential: model.tokens_without_credential(),
            signature: mcp_filter_core::signature::sign(&self.signing_key, &body),
            body: Bytes::from(body),
            deltas,
        };
        tracing::info!(
            version = %published.version,
            how,
            tokens = published.token_count,
            users = model.user_count(),
            bytes = published.body.len(),
            deltas = published.deltas.len(),
            loaded_ms,
            total_ms = started.elapsed().as_millis() as u64,
            "snapshot published"
        );
        self.tx.send_replace(Some(Arc::new(published)));
        Ok(())
    }

    /// Runs until `shutdown` turns true: rebuilds on notifications (bursts
    /// coalesce), after every (re)connect of the listener, and periodically.
    pub async fn run(self, refresh: Duration, mut shutdown: watch::Receiver<bool>) {
        let wake = Arc::new(Notify::new());
        let pending = Arc::new(Mutex::new(Pending::default()));
        let listener = tokio::spawn(listen(self.pool.clone(), wake.clone(), pending.clone(), shutdown.clone()));
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
            let mut full = tokio::select! {
                _ = wake.notified() => false,
                _ = tick.tick() => true,
                _ = retry => true,
                _ = shutdown.changed() => break,
            };
            if *shutdown.borrow() {
                break;
            }
            let asked = pending.lock().map(|mut p| std::mem::take(&mut *p)).unwrap_or_default();
            full |= asked.full || asked.tokens.len() > MAX_PATCH;
            let mut result = Ok(());
            if !asked.tokens.is_empty() && asked.tokens.len() <= MAX_PATCH {
                // The named tokens first (a revocation is out in
                // milliseconds), then the rest if anything else changed.
                let ids: Vec<String> = asked.tokens.into_iter().collect();
                result = self.patch(&ids).await;
                full |= result.is_err();
            }
            if full {
                result = self.rebuild().await;
            }
            match result {
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
async fn listen(pool: PgPool, wake: Arc<Notify>, pending: Arc<Mutex<Pending>>, mut shutdown: watch::Receiver<bool>) {
    let note = |payload: &str| {
        if let Ok(mut p) = pending.lock() {
            p.note(payload);
        }
    };
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
        note("");
        wake.notify_one();
        loop {
            tokio::select! {
                r = listener.try_recv() => match r {
                    Ok(Some(n)) => {
                        note(n.payload());
                        while let Some(n) = listener.next_buffered() {
                            note(n.payload());
                        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notifications_name_tokens_or_ask_for_everything() {
        let mut p = Pending::default();
        p.note("token:00000000000000aa");
        p.note("token:00000000000000aa");
        p.note("token:00000000000000bb");
        assert!(!p.full);
        assert_eq!(p.tokens.len(), 2);
        p.note("");
        assert!(p.full);
        let mut p = Pending::default();
        p.note("token:");
        assert!(p.full);
        // A burst past the patch limit stops collecting and rebuilds.
        let mut p = Pending::default();
        for i in 0..MAX_PATCH + 10 {
            p.note(&format!("token:{i:016x}"));
        }
        assert!(p.full);
        assert_eq!(p.tokens.len(), MAX_PATCH + 1);
    }
}
