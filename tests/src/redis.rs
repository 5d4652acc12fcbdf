//! A throw-away Redis server for tests, on a fixed free port so it can be
//! stopped and restarted mid-test (fault tests) at the same address.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use anyhow::{anyhow, Context, Result};

use crate::ports::free_port;
use crate::process::{spawn_on_owner_thread, ManagedProcess};

/// A Redis server; killed on drop.
#[derive(Debug)]
pub struct RedisServer {
    port: u16,
    dir: PathBuf,
    process: Mutex<Option<ManagedProcess>>,
}

impl RedisServer {
    /// Starts `redis-server` with no persistence, working directory `dir`.
    pub fn start(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let server = Self { port: free_port(), dir: dir.to_path_buf(), process: Mutex::new(None) };
        server.launch()?;
        Ok(server)
    }

    /// The process-wide server under `target/e2e/<pid>/redis`. Tests that
    /// stop or restart Redis must use their own instance, not this one.
    pub fn shared() -> &'static RedisServer {
        static SHARED: OnceLock<RedisServer> = OnceLock::new();
        SHARED.get_or_init(|| {
            RedisServer::start(&crate::scratch::process_dir().join("redis"))
                .expect("starting the shared Redis server")
        })
    }

    fn launch(&self) -> Result<()> {
        let mut cmd = Command::new("redis-server");
        cmd.args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&self.dir);
        let log = self.dir.join("redis.log");
        let mut process = spawn_on_owner_thread(move || ManagedProcess::spawn("redis-server", cmd, &log))
            .context("spawning redis-server (is it installed?)")?;
        let skip = process.log_contents().matches("Ready to accept connections").count();
        // The log is appended across restarts: wait for one more "ready" line.
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            if process.log_contents().matches("Ready to accept connections").count() > skip
                || std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok()
            {
                break;
            }
            if !process.is_running() || std::time::Instant::now() > deadline {
                return Err(anyhow!("redis-server did not start:\n{}", process.log_contents()));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        *self.process.lock().map_err(|_| anyhow!("lock poisoned"))? = Some(process);
        Ok(())
    }

    /// The server's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.process.lock().ok().and_then(|p| p.as_ref().map(|p| p.pid()))
    }

    /// The port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:<port>/`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Stops the server (SIGTERM, then SIGKILL); the port stays reserved.
    pub fn stop(&self) -> Result<()> {
        let process = self.process.lock().map_err(|_| anyhow!("lock poisoned"))?.take();
        if let Some(mut p) = process {
            p.stop_with_grace(Duration::from_secs(2))?;
        }
        Ok(())
    }

    /// SIGKILL (a crash); the port stays reserved for [`restart`](Self::restart).
    pub fn kill(&self) -> Result<()> {
        let process = self.process.lock().map_err(|_| anyhow!("lock poisoned"))?.take();
        if let Some(mut p) = process {
            p.kill()?;
        }
        Ok(())
    }

    /// Whether a server process is currently running.
    pub fn is_running(&self) -> bool {
        self.process.lock().ok().and_then(|mut p| p.as_mut().map(|p| p.is_running())).unwrap_or(false)
    }

    /// Stops (if running) and starts again on the same port, with an empty dataset.
    pub fn restart(&self) -> Result<()> {
        self.stop()?;
        self.launch()
    }

    /// The server's log (all runs).
    pub fn log_contents(&self) -> String {
        std::fs::read_to_string(self.dir.join("redis.log")).unwrap_or_default()
    }
}
