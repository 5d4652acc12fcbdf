//! Two Envoys built from the project's own rendered configuration: one as
//! shipped (the filter on), one identical but without the filter (the
//! baseline), both pointed at the same fast upstream, one worker each.

use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::envoy::{admin_get, admin_stat, envoy_bin};
use crate::ports::free_port;
use crate::process::ManagedProcess;
use crate::scratch::fresh_dir;

/// One benchmark Envoy.
pub struct BenchEnvoy {
    pub listen: SocketAddr,
    pub admin: SocketAddr,
    process: ManagedProcess,
}

impl BenchEnvoy {
    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    pub fn log_contents(&self) -> String {
        self.process.log_contents()
    }
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
            process: process,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok((200, body)) = admin_get(e.admin, "/ready") {
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

    /// A stat by exact name, summed over its occurrences.
    pub fn stat(&self, name: &str) -> Option<u64> {
        admin_stat(self.admin, name)
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
