//! A throw-away PostgreSQL server (the distribution's binaries) for tests:
//! `initdb` into a scratch directory, run on a free loopback port with
//! durability switched off, create one database per test.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use sqlx::Connection;

use crate::ports::free_port;
use crate::process::{spawn_on_owner_thread, ManagedProcess};

/// A running Postgres; stopped (and its process killed) on drop.
#[derive(Debug)]
pub struct PostgresServer {
    port: u16,
    data_dir: PathBuf,
    base_dir: PathBuf,
    /// The unprivileged user it runs as, when the tests run as root.
    owner: Option<(u32, u32)>,
    crash_safe_commits: bool,
    process: Mutex<Option<ManagedProcess>>,
}

/// The `bin` directory of the newest `/usr/lib/postgresql/<version>`.
pub fn postgres_bin_dir() -> Result<PathBuf> {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .context("listing /usr/lib/postgresql (is PostgreSQL installed?)")?
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("postgres").exists().then_some((v, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin).context("no /usr/lib/postgresql/*/bin/postgres found")
}

/// uid/gid of the `postgres` system user, when this process runs as root.
fn unprivileged_owner() -> Result<Option<(u32, u32)>> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(None);
    }
    let name = std::ffi::CString::new("postgres")?;
    // SAFETY: getpwnam returns a pointer into static storage or null; we copy out at once.
    let pw = unsafe { libc::getpwnam(name.as_ptr()) };
    if pw.is_null() {
        bail!("running as root but there is no `postgres` user to run the server as");
    }
    // SAFETY: non-null result of getpwnam.
    let (uid, gid) = unsafe { ((*pw).pw_uid, (*pw).pw_gid) };
    Ok(Some((uid, gid)))
}

/// Whether every existing directory above `path` lets other users through.
fn traversable_by_others(path: &Path) -> bool {
    path.ancestors().skip(1).filter_map(|a| std::fs::metadata(a).ok()).all(|m| m.permissions().mode() & 0o001 != 0)
}

fn as_owner(command: &mut Command, owner: Option<(u32, u32)>) {
    if let Some((uid, gid)) = owner {
        command.uid(uid).gid(gid);
    }
}

impl PostgresServer {
    /// Initialises a cluster in `base_dir/data` and starts it. The process is
    /// spawned from the process-owner thread, so it lives until dropped or
    /// until the test process exits.
    pub fn start(base_dir: &Path) -> Result<Self> {
        Self::start_with(base_dir, false)
    }

    /// [`start`](Self::start), with `synchronous_commit` on when
    /// `crash_safe_commits`: a commit then survives a SIGKILL of the server
    /// (fsync stays off: the machine does not crash, only the process).
    /// For fault drills, where a commit lost to the harness's own speed-up
    /// would look like the gateway's loss.
    pub fn start_with(base_dir: &Path, crash_safe_commits: bool) -> Result<Self> {
        let bin = postgres_bin_dir()?;
        let owner = unprivileged_owner()?;
        std::fs::create_dir_all(base_dir)?;
        std::fs::set_permissions(base_dir, std::fs::Permissions::from_mode(0o755))?;
        let data_dir = base_dir.join("data");
        std::fs::create_dir_all(&data_dir)?;
        std::fs::set_permissions(&data_dir, std::fs::Permissions::from_mode(0o700))?;
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(&data_dir, Some(uid), Some(gid))
                .with_context(|| format!("chown {}", data_dir.display()))?;
        }

        let mut initdb = Command::new(bin.join("initdb"));
        initdb
            .arg("-D")
            .arg(&data_dir)
            .args(["-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8", "--locale=C"])
            .current_dir(base_dir)
            .env("LC_ALL", "C");
        as_owner(&mut initdb, owner);
        let out = initdb.output().context("running initdb")?;
        if !out.status.success() {
            bail!(
                "initdb failed ({}):\n{}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }

        let port = free_port();
        let server = Self { port, data_dir, base_dir: base_dir.to_path_buf(), owner, crash_safe_commits, process: Mutex::new(None) };
        let mut process = server.spawn()?;
        process.wait_for_log("database system is ready to accept connections", Duration::from_secs(60))?;
        *server.process.lock().map_err(|_| anyhow::anyhow!("lock poisoned"))? = Some(process);
        Ok(server)
    }

    fn spawn(&self) -> Result<ManagedProcess> {
        let bin = postgres_bin_dir()?;
        let mut postgres = Command::new(bin.join("postgres"));
        postgres
            .arg("-D")
            .arg(&self.data_dir)
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-k")
            .arg(&self.data_dir)
            .args([
                "-c", "listen_addresses=127.0.0.1",
                "-c", "fsync=off",
                "-c", if self.crash_safe_commits { "synchronous_commit=on" } else { "synchronous_commit=off" },
                "-c", "full_page_writes=off",
                "-c", "max_connections=300",
            ])
            .current_dir(&self.base_dir)
            .env("LC_ALL", "C");
        as_owner(&mut postgres, self.owner);
        let log = self.base_dir.join("postgres.log");
        spawn_on_owner_thread(move || ManagedProcess::spawn("postgres", postgres, &log))
    }

    /// SIGKILL to the postmaster (a crash, for fault drills: the next start
    /// runs crash recovery). Its backends exit once they notice it is gone.
    pub fn kill(&self) -> Result<()> {
        let process = self.process.lock().map_err(|_| anyhow::anyhow!("lock poisoned"))?.take();
        if let Some(mut p) = process {
            p.kill()?;
        }
        // Orphaned backends still hold the shared memory and the port for a
        // moment; the postmaster's pid file goes when they are gone.
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Starts the server again (after [`kill`](Self::kill) or [`stop`](Self::stop))
    /// on the same port and data; waits until it accepts queries.
    pub async fn restart(&self) -> Result<()> {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        let mut process = loop {
            let mut p = self.spawn()?;
            tokio::time::sleep(Duration::from_millis(200)).await;
            if p.is_running() {
                break p;
            }
            // A backend of the killed server may still hold the lock file.
            if std::time::Instant::now() > deadline {
                bail!("postgres did not start again:\n{}", p.log_contents());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        loop {
            if let Ok(mut c) = sqlx::PgConnection::connect(&self.admin_url()).await {
                if sqlx::query("SELECT 1").execute(&mut c).await.is_ok() {
                    break;
                }
            }
            if !process.is_running() || std::time::Instant::now() > deadline {
                bail!("postgres did not accept queries again:\n{}", process.log_contents());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        *self.process.lock().map_err(|_| anyhow::anyhow!("lock poisoned"))? = Some(process);
        Ok(())
    }

    /// The process-wide server under `target/e2e/<pid>/postgres`, started on
    /// first use. When the server runs as the `postgres` user and a
    /// directory above that is closed to others (a checkout under a
    /// `mktemp -d` directory, mode 0700), it lives under the system's
    /// temporary directory instead.
    pub fn shared() -> &'static PostgresServer {
        static SHARED: OnceLock<PostgresServer> = OnceLock::new();
        SHARED.get_or_init(|| {
            PostgresServer::start(&Self::base_dir_for("postgres")).expect("starting the shared Postgres server")
        })
    }

    /// Where a server named `name` can keep its data: under
    /// `target/e2e/<pid>/`, unless the server runs as the `postgres` user
    /// and a directory above that is closed to others (a checkout under a
    /// `mktemp -d` directory, mode 0700): then under the system's
    /// temporary directory.
    pub fn base_dir_for(name: &str) -> PathBuf {
        let base = crate::scratch::process_dir().join(name);
        if unprivileged_owner().ok().flatten().is_some() && !traversable_by_others(&base) {
            return std::env::temp_dir().join(format!("mcp-e2e-{}", std::process::id())).join(name);
        }
        base
    }

    /// The postmaster's process id, while it runs (its backends are its
    /// children).
    pub fn pid(&self) -> Option<u32> {
        self.process.lock().ok().and_then(|p| p.as_ref().map(|p| p.pid()))
    }

    /// The TCP port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The cluster's data directory (also holds the Unix socket).
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// URL of the `postgres` database as the superuser `postgres`.
    pub fn admin_url(&self) -> String {
        self.url_for("postgres")
    }

    /// URL of database `name` as the superuser `postgres`.
    pub fn url_for(&self, name: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{}", self.port, name)
    }

    /// Creates database `name` (`[a-z0-9_]`, at most 63 bytes) and returns its URL.
    pub async fn create_database(&self, name: &str) -> Result<String> {
        if name.is_empty()
            || name.len() > 63
            || !name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        {
            bail!("invalid database name {name:?}");
        }
        let mut conn = sqlx::PgConnection::connect(&self.admin_url())
            .await
            .context("connecting to the admin database")?;
        sqlx::query(&format!("CREATE DATABASE \"{name}\""))
            .execute(&mut conn)
            .await
            .with_context(|| format!("CREATE DATABASE {name}"))?;
        conn.close().await.ok();
        Ok(self.url_for(name))
    }

    /// Creates a database with a unique name starting with `prefix`.
    pub async fn create_unique_database(&self, prefix: &str) -> Result<String> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let prefix: String = prefix
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '_' })
            .take(40)
            .collect();
        let name = format!("{prefix}_{}_{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
        self.create_database(&name).await
    }

    /// The server's log so far.
    pub fn log_contents(&self) -> String {
        std::fs::read_to_string(self.base_dir.join("postgres.log")).unwrap_or_default()
    }

    /// Stops the server (SIGTERM = smart shutdown, then SIGKILL).
    pub fn stop(&self) -> Result<()> {
        match self.process.lock().map_err(|_| anyhow::anyhow!("lock poisoned"))?.as_mut() {
            Some(p) => p.stop_with_grace(Duration::from_secs(5)),
            None => Ok(()),
        }
    }
}
