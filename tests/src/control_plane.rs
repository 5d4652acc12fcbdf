//! The control-plane binary as a managed process, on fixed ports so it can
//! be stopped and started again behind the same Envoy.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Result};

use crate::envoy::repo_root;
use crate::ports::free_port;
use crate::process::ManagedProcess;
use crate::scratch::fresh_dir;

/// The binary: `$MCP_CONTROL_PLANE_BIN`, else `target/debug/mcp-control-plane`.
pub fn control_plane_bin() -> PathBuf {
    match std::env::var_os("MCP_CONTROL_PLANE_BIN").filter(|v| !v.is_empty()) {
        Some(p) => PathBuf::from(p),
        None => repo_root().join("target/debug/mcp-control-plane"),
    }
}

/// How to start the control plane.
#[derive(Debug, Clone)]
pub struct ControlPlaneOptions {
    pub database_url: String,
    pub public_key_path: PathBuf,
    pub snapshot_secret: String,
    /// Extra environment, e.g. `MCP_SCOPE_REFRESH_SECONDS`.
    pub env: Vec<(String, String)>,
}

pub struct ControlPlane {
    opts: ControlPlaneOptions,
    http_port: u16,
    internal_port: u16,
    grpc_port: u16,
    log_path: PathBuf,
    process: Option<ManagedProcess>,
}

impl ControlPlane {
    pub fn start(opts: ControlPlaneOptions) -> Result<Self> {
        let mut cp = Self {
            opts,
            http_port: free_port(),
            internal_port: free_port(),
            grpc_port: free_port(),
            log_path: fresh_dir("control-plane").join("control-plane.log"),
            process: None,
        };
        cp.restart()?;
        Ok(cp)
    }

    /// Starts the process (again) on the same ports; waits for its listeners.
    pub fn restart(&mut self) -> Result<()> {
        if self.process.is_some() {
            bail!("control plane is already running");
        }
        let bin = control_plane_bin();
        if !bin.exists() {
            bail!("{} is missing: run `make build`", bin.display());
        }
        let mut cmd = Command::new(bin);
        cmd.env("DATABASE_URL", &self.opts.database_url)
            .env("MCP_HTTP_ADDR", format!("127.0.0.1:{}", self.http_port))
            .env("MCP_INTERNAL_ADDR", format!("127.0.0.1:{}", self.internal_port))
            .env("MCP_GRPC_ADDR", format!("127.0.0.1:{}", self.grpc_port))
            .env("MCP_SNAPSHOT_SECRET", &self.opts.snapshot_secret)
            .env("INFRABOX_PUBLIC_KEY_PATH", &self.opts.public_key_path)
            .env("RUST_LOG", std::env::var("MCP_TEST_CP_LOG").unwrap_or_else(|_| "info".into()));
        for (k, v) in &self.opts.env {
            cmd.env(k, v);
        }
        let mut process = ManagedProcess::spawn("control-plane", cmd, &self.log_path)?;
        let line = process.wait_for_log("listening http=", Duration::from_secs(30))?;
        // `listening http=… internal=… grpc=…`
        let grpc = line.split_whitespace().find_map(|w| w.strip_prefix("grpc=")).unwrap_or_default();
        if grpc != format!("127.0.0.1:{}", self.grpc_port) {
            bail!("control plane announced grpc={grpc:?}, expected port {}: {line}", self.grpc_port);
        }
        self.process = Some(process);
        self.wait_healthy(Duration::from_secs(15))
    }

    fn wait_healthy(&self, timeout: Duration) -> Result<()> {
        let deadline = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < deadline {
            if let Ok(mut s) = std::net::TcpStream::connect(self.internal_addr()) {
                use std::io::{Read, Write};
                let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                let _ = s.write_all(b"GET /healthz HTTP/1.1\r\nHost: cp\r\nConnection: close\r\n\r\n");
                let mut out = Vec::new();
                let _ = s.read_to_end(&mut out);
                if out.starts_with(b"HTTP/1.1 200") {
                    return Ok(());
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("control plane did not become healthy; log:\n{}", self.log_contents())
    }

    /// Another control plane with the same configuration (database,
    /// secrets, keys, Redis) on ports of its own: a replica.
    pub fn replica(&self) -> Result<Self> {
        Self::start(self.opts.clone())
    }

    /// SIGKILL (a crash); ports stay reserved for [`restart`](Self::restart).
    pub fn kill(&mut self) -> Result<()> {
        if let Some(mut p) = self.process.take() {
            p.kill()?;
        }
        Ok(())
    }

    /// Whether the process is running.
    pub fn is_running(&mut self) -> bool {
        self.process.as_mut().is_some_and(|p| p.is_running())
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().map(|p| p.pid())
    }

    /// Stops the process (SIGTERM); ports stay reserved for [`restart`](Self::restart).
    pub fn stop(&mut self) -> Result<()> {
        if let Some(mut p) = self.process.take() {
            p.stop()?;
        }
        Ok(())
    }

    pub fn http_port(&self) -> u16 {
        self.http_port
    }
    pub fn internal_port(&self) -> u16 {
        self.internal_port
    }
    /// The gRPC listener (rate-limit service).
    pub fn grpc_port(&self) -> u16 {
        self.grpc_port
    }
    pub fn grpc_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.grpc_port))
    }
    pub fn http_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.http_port))
    }
    pub fn internal_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.internal_port))
    }
    pub fn log_contents(&self) -> String {
        std::fs::read(&self.log_path).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default()
    }
}
