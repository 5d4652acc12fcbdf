//! Two Envoys built from the project's own rendered configuration: one as
//! shipped (the filter on), one identical but without the filter (the
//! baseline), both pointed at the same fast upstream, one worker each.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::envoy::{dechunk, envoy_bin};
use crate::ports::free_port;
use crate::process::ManagedProcess;
use crate::scratch::fresh_dir;

/// One benchmark Envoy.
pub struct BenchEnvoy {
    pub listen: SocketAddr,
    pub admin: SocketAddr,
    _process: ManagedProcess,
}

/// Ports of the configuration the harness rendered.
pub struct RenderedPorts {
    pub listen: u16,
    pub admin: u16,
    pub upstream: u16,
}

/// The rendered configuration with its listener, admin and upstream ports
/// moved, and (for the baseline) the filter removed.
pub fn derive(config: &str, from: &RenderedPorts, upstream: u16, with_filter: bool) -> Result<(String, u16, u16)> {
    let (listen, admin) = (free_port(), free_port());
    let mut out = String::with_capacity(config.len());
    let mut skipping_filter = false;
    let mut skipping_per_route = false;
    for line in config.lines() {
        let trimmed = line.trim_start();
        let indent = line.len() - trimmed.len();
        if !with_filter {
            if trimmed == "- name: mcp_gateway" {
                skipping_filter = true;
                continue;
            }
            if skipping_filter {
                if trimmed.starts_with("- name: ") {
                    skipping_filter = false;
                } else {
                    continue;
                }
            }
            if trimmed == "typed_per_filter_config:" {
                skipping_per_route = true;
                continue;
            }
            if skipping_per_route {
                if indent > 16 {
                    continue;
                }
                skipping_per_route = false;
            }
        }
        out.push_str(line);
        out.push('\n');
    }
    let swap = |text: String, from: u16, to: u16| text.replace(&format!("port_value: {from} "), &format!("port_value: {to} "));
    let out = swap(swap(swap(out, from.listen, listen), from.admin, admin), from.upstream, upstream);
    if with_filter != out.contains("mcp_gateway") {
        bail!("could not derive the {} configuration", if with_filter { "filter" } else { "baseline" });
    }
    Ok((out, listen, admin))
}

impl BenchEnvoy {
    /// Starts Envoy with `config` and waits until it is ready.
    pub fn start(name: &str, config: &str, listen: u16, admin: u16) -> Result<Self> {
        let dir = fresh_dir(name);
        let path = dir.join("envoy.yaml");
        std::fs::write(&path, config)?;
        let mut cmd = Command::new(envoy_bin());
        cmd.arg("-c")
            .arg(&path)
            .args(["--concurrency", "1", "--disable-hot-restart", "-l", "warning"]);
        let process = ManagedProcess::spawn(name, cmd, &dir.join("envoy.log"))?;
        let e = Self {
            listen: SocketAddr::from(([127, 0, 0, 1], listen)),
            admin: SocketAddr::from(([127, 0, 0, 1], admin)),
            _process: process,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok((200, body)) = e.admin_get("/ready") {
                if body.contains("LIVE") && TcpStream::connect(e.listen).is_ok() {
                    return Ok(e);
                }
            }
            if Instant::now() > deadline {
                bail!("{name} did not become ready: see {}", dir.join("envoy.log").display());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// GET on the admin listener.
    pub fn admin_get(&self, path: &str) -> Result<(u16, String)> {
        let mut s = TcpStream::connect_timeout(&self.admin, Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        write!(s, "GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n")?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw)?;
        let text = String::from_utf8_lossy(&raw);
        let status = text.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let chunked = head.to_ascii_lowercase().contains("transfer-encoding: chunked");
        Ok((status, if chunked { dechunk(body) } else { body.to_string() }))
    }

    /// A stat by exact name, summed over its occurrences.
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

    /// Waits until `check(stat)` holds.
    pub fn wait_stat(&self, name: &str, timeout: Duration, check: impl Fn(u64) -> bool) -> Result<u64> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(v) = self.stat(name).filter(|v| check(*v)) {
                return Ok(v);
            }
            if Instant::now() > deadline {
                bail!("stat {name} did not reach the expected value (now {:?})", self.stat(name));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Reads the harness's rendered configuration.
pub fn read_config(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str = "\
    - filters:
          route_config:
              routes:
              - match: { prefix: \"/\" }
                route: { cluster: infrabox, timeout: 120s }
                typed_per_filter_config:
                  mcp_gateway:
                    \"@type\": type.googleapis.com/envoy.config.route.v3.FilterConfig
                    disabled: true
          http_filters:
          - name: mcp_gateway
            typed_config:
              config:
                name: mcp_gateway
          - name: envoy.filters.http.router
  - socket_address: { address: 127.0.0.1, port_value: 1111 }
  - socket_address: { address: 127.0.0.1, port_value: 2222 }
  - endpoint: { address: { socket_address: { address: \"127.0.0.1\", port_value: 3333 } } }
";

    #[test]
    fn derives_the_baseline_without_the_filter() {
        let ports = RenderedPorts { listen: 1111, admin: 2222, upstream: 3333 };
        let (base, l, a) = derive(CONFIG, &ports, 4444, false).unwrap();
        assert!(!base.contains("mcp_gateway") && !base.contains("FilterConfig"), "{base}");
        assert!(base.contains("envoy.filters.http.router") && base.contains("route: { cluster: infrabox"));
        assert!(base.contains(&format!("port_value: {l} ")) && base.contains(&format!("port_value: {a} ")));
        assert!(base.contains("port_value: 4444 ") && !base.contains("3333"));
        let (with, _, _) = derive(CONFIG, &ports, 4444, true).unwrap();
        assert!(with.contains("- name: mcp_gateway") && with.contains("disabled: true"));
    }
}
