//! `SnapshotPublisher`: keeps the current snapshot in a `watch` channel
//! (pre-serialized, so serving is a cheap clone) and updates it on every
//! Postgres `NOTIFY mcp_snapshot_changed` and every refresh interval
//! (collaborator drift). A notification that names tokens (`token:<id>`)
//! patches just those; any other, a burst of more than [`MAX_PATCH`]
//! tokens, a reconnect and the refresh interval rebuild everything. A new
//! value is published only when the content version changes, which wakes
//! the long-polls. Each new value also carries the deltas from the versions
//! in the [`ChangeLog`] to it, rendered and signed once. The full body is
//! rendered only when a VM asks for it (a VM starting, or one too far
//! behind for a delta), once per version: a revocation among a million
//! tokens then costs the delta and the version, not a 150 MB body.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, OnceLock};
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
    pub generated_at: i64,
    pub token_count: usize,
    /// Live tokens whose user lacks an upstream credential they need.
    pub without_credential: usize,
    /// The delta to this version from each earlier version still known.
    pub deltas: HashMap<String, SignedDelta>,
    /// The full body, rendered by the first request for it.
    full: OnceLock<Option<SignedDelta>>,
    source: Arc<Source>,
}

impl Published {
    /// The full snapshot body of this version and its signature, rendered
    /// on the first call (blocking: run it off the async workers). `None`
    /// when the content has moved on to a newer version meanwhile: serve
    /// that one instead.
    pub fn full_body(&self) -> Option<SignedDelta> {
        self.full
            .get_or_init(|| {
                let built = self.source.built.lock().ok()?;
                let built = built.as_ref().filter(|b| b.version == self.version)?;
                let started = Instant::now();
                let body = built.model.render_body(&self.source.limits, &self.version, self.generated_at).ok()?;
                let signature = mcp_filter_core::signature::sign(&self.source.signing_key, &body);
                tracing::info!(version = %self.version, bytes = body.len(), ms = started.elapsed().as_millis() as u64, "full snapshot rendered");
                Some(SignedDelta { body: Bytes::from(body), signature })
            })
            .clone()
    }
}

/// The content last built, shared by the publisher and what it published.
#[derive(Debug)]
struct Source {
    limits: Limits,
    /// Signs every body (derived from the snapshot secret VMs share).
    signing_key: [u8; 32],
    /// `None` before the first full build.
    built: Mutex<Option<Built>>,
}

/// A model, its fingerprint (what the next full build is compared with,
/// and the version) and that version.
#[derive(Debug)]
struct Built {
    model: build::Model,
    fingerprint: Fingerprint,
    version: String,
}

/// The current snapshot; `None` until the first build succeeds.
pub type Current = watch::Receiver<Option<Arc<Published>>>;

/// Builds and publishes snapshots.
pub struct SnapshotPublisher {
    pool: PgPool,
    cipher: Arc<CredentialCipher>,
    tx: watch::Sender<Option<Arc<Published>>>,
    source: Arc<Source>,
    /// What each recent version changed.
    log: Mutex<ChangeLog>,
}

impl SnapshotPublisher {
    pub fn new(pool: PgPool, limits: Limits, cipher: Arc<CredentialCipher>, snapshot_secret: &str) -> (Self, Current) {
        let (tx, rx) = watch::channel(None);
        let signing_key = mcp_filter_core::signature::signing_key(snapshot_secret);
        let source = Arc::new(Source { limits, signing_key, built: Mutex::new(None) });
        (Self { pool, cipher, tx, source, log: Mutex::default() }, rx)
    }

    fn lock_built(&self) -> Result<std::sync::MutexGuard<'_, Option<Built>>, sqlx::Error> {
        self.source.built.lock().map_err(|_| sqlx::Error::Protocol("snapshot model lock poisoned".into()))
    }

    /// Rebuilds from the database; publishes if the version changed.
    pub async fn rebuild(&self) -> Result<(), sqlx::Error> {
        let prepared = prepare(self.pool.clone(), Arc::clone(&self.cipher)).await?;
        self.install(prepared, &[]).await
    }

    /// Installs a full build. `since`: the tokens patched after its read
    /// began, read again now and patched into it, so the build (the rows
    /// as they were when it started) never brings back a token revoked
    /// meanwhile, not even for one published version.
    async fn install(&self, prepared: Prepared, since: &[String]) -> Result<(), sqlx::Error> {
        let Prepared { mut model, mut fingerprint, started, loaded_ms } = prepared;
        if !since.is_empty() {
            let loaded = build::load(&self.pool, Some(since)).await?;
            let credentials = build::open_credentials(&loaded.credentials, &self.cipher);
            let mut users = model.users_of(since);
            model.patch(since, loaded, &credentials);
            users.extend(model.users_of(since));
            fingerprint.refresh(&model, &Change { tokens: since.iter().cloned().collect(), users });
        }
        let version = fingerprint.version(&self.source.limits);
        // Installed and published under the lock: a full body is always
        // rendered from the content of the version it is served as.
        let mut guard = self.lock_built()?;
        let change = guard.as_ref().map(|old| old.fingerprint.diff(&fingerprint));
        let built = guard.insert(Built { model, fingerprint, version });
        self.publish(built, change, "rebuild", started, loaded_ms)
    }

    /// Re-reads only the tokens in `ids` and patches the last build; a full
    /// rebuild when there is none yet.
    pub async fn patch(&self, ids: &[String]) -> Result<(), sqlx::Error> {
        let built = self.lock_built()?.is_some();
        if !built {
            return self.rebuild().await;
        }
        let started = Instant::now();
        let loaded = build::load(&self.pool, Some(ids)).await?;
        let loaded_ms = started.elapsed().as_millis() as u64;
        let credentials = build::open_credentials(&loaded.credentials, &self.cipher);
        let mut guard = self.lock_built()?;
        let Some(built) = guard.as_mut() else { return Ok(()) };
        // The named tokens, and their users before and after.
        let mut users = built.model.users_of(ids);
        built.model.patch(ids, loaded, &credentials);
        users.extend(built.model.users_of(ids));
        let change = Change { tokens: ids.iter().cloned().collect(), users };
        built.fingerprint.refresh(&built.model, &change);
        built.version = built.fingerprint.version(&self.source.limits);
        self.publish(built, Some(change), "patch", started, loaded_ms)
    }

    /// Publishes `built` if its version is new; `change`: what it changed
    /// since the version published now (`None`: not known).
    fn publish(&self, built: &Built, change: Option<Change>, how: &'static str, started: Instant, loaded_ms: u64) -> Result<(), sqlx::Error> {
        let generated_at = chrono::Utc::now().timestamp();
        let mut log = self.log.lock().map_err(|_| sqlx::Error::Protocol("snapshot change log lock poisoned".into()))?;
        let version = built.version.clone();
        let previous = self.tx.borrow().as_ref().map(|p| p.version.clone());
        if previous.as_deref() == Some(version.as_str()) {
            tracing::debug!(%version, how, "snapshot unchanged");
            return Ok(());
        }
        log.record(previous.as_deref(), change);
        let deltas = log.deltas(&built.model, &self.source.limits, &version, generated_at, &self.source.signing_key);
        drop(log);
        let published = Published {
            version,
            generated_at,
            token_count: built.model.token_count(),
            without_credential: built.model.tokens_without_credential(),
            deltas,
            full: OnceLock::new(),
            source: Arc::clone(&self.source),
        };
        tracing::info!(
            version = %published.version,
            how,
            tokens = published.token_count,
            users = built.model.user_count(),
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
        // A full build runs beside the loop (it reads and digests every
        // live token: seconds at a million), so patches go out meanwhile.
        let mut building: Option<tokio::task::JoinHandle<Result<Prepared, sqlx::Error>>> = None;
        // Tokens patched since the running build began reading.
        let mut since: BTreeSet<String> = BTreeSet::new();
        // A full build was asked for while one ran (its read may predate it).
        let mut again = false;
        loop {
            let retry = async {
                if failing {
                    tokio::time::sleep(Duration::from_secs(1)).await
                } else {
                    std::future::pending::<()>().await
                }
            };
            let built = async {
                match building.as_mut() {
                    Some(task) => task.await,
                    None => std::future::pending().await,
                }
            };
            let woke = tokio::select! {
                _ = wake.notified() => Woke::Changed { full: false },
                _ = tick.tick() => Woke::Changed { full: true },
                _ = retry => Woke::Changed { full: true },
                done = built => Woke::Built(done),
                _ = shutdown.changed() => break,
            };
            if *shutdown.borrow() {
                break;
            }
            let mut result = Ok(());
            let mut full = match woke {
                Woke::Changed { full } => full,
                Woke::Built(done) => {
                    building = None;
                    let ids: Vec<String> = std::mem::take(&mut since).into_iter().collect();
                    result = match done {
                        Ok(Ok(prepared)) => self.install(prepared, &ids).await,
                        Ok(Err(e)) => Err(e),
                        Err(e) => Err(sqlx::Error::Protocol(format!("snapshot build task: {e}"))),
                    };
                    std::mem::take(&mut again) || result.is_err()
                }
            };
            let asked = pending.lock().map(|mut p| std::mem::take(&mut *p)).unwrap_or_default();
            full |= asked.full || asked.tokens.len() > MAX_PATCH;
            if !asked.tokens.is_empty() && asked.tokens.len() <= MAX_PATCH {
                // The named tokens at once (a revocation is out in
                // milliseconds), whatever else is being rebuilt.
                let ids: Vec<String> = asked.tokens.into_iter().collect();
                let patched = self.patch(&ids).await;
                full |= patched.is_err();
                if building.is_some() {
                    since.extend(ids);
                }
                if patched.is_err() {
                    result = patched;
                }
            }
            if full {
                if building.is_some() {
                    again = true;
                } else {
                    since.clear();
                    building = Some(tokio::spawn(prepare(self.pool.clone(), Arc::clone(&self.cipher))));
                }
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
        if let Some(task) = building {
            task.abort();
        }
        listener.abort();
        let _ = listener.await;
    }
}

/// What woke the publisher's loop.
enum Woke {
    Changed { full: bool },
    Built(Result<Result<Prepared, sqlx::Error>, tokio::task::JoinError>),
}

/// A full build, made from the rows as one transaction read them.
struct Prepared {
    model: build::Model,
    fingerprint: Fingerprint,
    started: Instant,
    loaded_ms: u64,
}

/// Reads every live token and builds the model and its fingerprint (the
/// digesting off the async workers).
async fn prepare(pool: PgPool, cipher: Arc<CredentialCipher>) -> Result<Prepared, sqlx::Error> {
    let started = Instant::now();
    let loaded = build::load(&pool, None).await?;
    let loaded_ms = started.elapsed().as_millis() as u64;
    tokio::task::spawn_blocking(move || {
        let credentials = build::open_credentials(&loaded.credentials, &cipher);
        let model = build::Model::assemble(loaded, &credentials);
        let fingerprint = Fingerprint::of(&model);
        Prepared { model, fingerprint, started, loaded_ms }
    })
    .await
    .map_err(|e| sqlx::Error::Protocol(format!("snapshot build task: {e}")))
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
