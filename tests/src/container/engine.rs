//! The Docker engine the container runtime uses: found through `DOCKER_HOST`
//! (default `unix:///var/run/docker.sock`), probed once per test process,
//! with a bollard client at the engine's own API version and a dedicated
//! Tokio runtime that every Docker call of the harness runs on.
//!
//! All Docker work runs on that one runtime, not on the runtime of the test
//! that happens to start a container: a `#[tokio::test]` runtime ends with
//! its test, and would take log followers and client connections of shared
//! clients with it.

use std::future::Future;
use std::io::{Read, Write};
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use testcontainers::bollard::{self, ClientVersion, Docker};

use super::api_shim;

/// A Docker engine that answered.
#[derive(Debug)]
pub struct Engine {
    /// `DOCKER_HOST` as found (before any adapter was put in front of it).
    pub host: String,
    /// The engine's API version, e.g. `1.41`.
    pub api_version: String,
    /// The engine's own version, e.g. `20.10.24+dfsg1`.
    pub version: String,
    /// Whether testcontainers goes through [`api_shim`] (engine older than
    /// the API version testcontainers speaks).
    pub adapted: bool,
    client: Docker,
}

impl Engine {
    /// A bollard client at the engine's API version.
    pub fn client(&self) -> &Docker {
        &self.client
    }
}

/// The runtime all Docker calls run on.
fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("e2e-docker")
            .enable_all()
            .build()
            .expect("building the Docker runtime")
    })
}

/// Runs `fut` on the Docker runtime and waits for it; callable from any
/// thread, inside or outside another Tokio runtime (it blocks the caller,
/// like the process runtime's waits do).
pub fn block_on<F>(fut: F) -> F::Output
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    let (tx, rx) = std::sync::mpsc::channel();
    runtime().spawn(async move {
        let _ = tx.send(fut.await);
    });
    rx.recv().expect("the Docker runtime dropped a task")
}

/// The engine, or why there is none (the reason names the host and the
/// error). Probed once per process.
pub fn engine() -> std::result::Result<&'static Engine, String> {
    static ENGINE: OnceLock<std::result::Result<Engine, String>> = OnceLock::new();
    ENGINE.get_or_init(|| probe().map_err(|e| format!("{e:#}"))).as_ref().map_err(Clone::clone)
}

fn docker_host() -> String {
    std::env::var("DOCKER_HOST")
        .ok()
        .filter(|h| !h.trim().is_empty())
        .unwrap_or_else(|| "unix:///var/run/docker.sock".into())
}

fn probe() -> Result<Engine> {
    let host = docker_host();
    let upstream = if let Some(path) = host.strip_prefix("unix://") {
        api_shim::Upstream::Unix(path.to_string())
    } else if let Some(addr) = host.strip_prefix("tcp://").or_else(|| host.strip_prefix("http://")) {
        if std::env::var("DOCKER_TLS_VERIFY").is_ok_and(|v| !v.is_empty() && v != "0") {
            bail!("DOCKER_HOST={host} with TLS is not supported by the harness");
        }
        api_shim::Upstream::Tcp(addr.trim_end_matches('/').to_string())
    } else {
        bail!("DOCKER_HOST={host}: only unix:// and tcp:// engines are supported");
    };
    let body = raw_get(&upstream, "/version").with_context(|| format!("no Docker engine answers at {host}"))?;
    let v: serde_json::Value = serde_json::from_str(&body).with_context(|| format!("{host} answered /version with {body:?}"))?;
    let api_version = v["ApiVersion"].as_str().context("no ApiVersion in /version")?.to_string();
    let version = v["Version"].as_str().unwrap_or("?").to_string();
    let engine_api = parse_api(&api_version).with_context(|| format!("engine API version {api_version:?}"))?;
    let ours = bollard::API_DEFAULT_VERSION;
    let client_version = if engine_api < (ours.major_version, ours.minor_version) {
        ClientVersion { major_version: engine_api.0, minor_version: engine_api.1 }
    } else {
        ClientVersion { major_version: ours.major_version, minor_version: ours.minor_version }
    };
    let adapted = engine_api < (ours.major_version, ours.minor_version);
    let client = match &upstream {
        api_shim::Upstream::Unix(path) => Docker::connect_with_unix(path, 120, &client_version)?,
        api_shim::Upstream::Tcp(addr) => Docker::connect_with_http(&format!("tcp://{addr}"), 120, &client_version)?,
    };
    if adapted {
        // testcontainers reads DOCKER_HOST when it first creates its client,
        // which is after this (every container start goes through here
        // first). std serializes its own environment access; nothing else in
        // the harness writes the environment.
        let socket = std::env::temp_dir().join(format!("mcp-e2e-docker-{}.sock", std::process::id()));
        let (s, up, api) = (socket.clone(), upstream.clone(), api_version.clone());
        block_on(async move { api_shim::start(&s, up, api) }).context("starting the Docker API adapter")?;
        std::env::set_var("DOCKER_HOST", format!("unix://{}", socket.display()));
    }
    Ok(Engine { host, api_version, version, adapted, client })
}

fn parse_api(v: &str) -> Option<(usize, usize)> {
    let (a, b) = v.split_once('.')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

/// A blocking unversioned GET (works on every engine version): the body.
fn raw_get(upstream: &api_shim::Upstream, path: &str) -> Result<String> {
    let request = format!("GET {path} HTTP/1.0\r\nHost: docker\r\n\r\n");
    let mut raw = Vec::new();
    match upstream {
        api_shim::Upstream::Unix(p) => {
            let mut s = std::os::unix::net::UnixStream::connect(p).with_context(|| format!("connecting to {p}"))?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            s.write_all(request.as_bytes())?;
            s.read_to_end(&mut raw)?;
        }
        api_shim::Upstream::Tcp(a) => {
            let addr = std::net::ToSocketAddrs::to_socket_addrs(a)?.next().ok_or_else(|| anyhow!("cannot resolve {a}"))?;
            let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            s.write_all(request.as_bytes())?;
            s.read_to_end(&mut raw)?;
        }
    }
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(|| anyhow!("not an HTTP answer"))?;
    if !head.starts_with("HTTP/1.") || head.get(9..12) != Some("200") {
        bail!("engine answered {}", head.lines().next().unwrap_or(""));
    }
    Ok(body.to_string())
}

/// Whether the engine has `image` (never pulls).
pub fn image_present(image: &str) -> Result<bool> {
    let engine = engine().map_err(|e| anyhow!(e))?;
    let client = engine.client.clone();
    let image = image.to_string();
    block_on(async move {
        match client.inspect_image(&image).await {
            Ok(_) => Ok(true),
            Err(bollard::errors::Error::DockerResponseServerError { status_code: 404, .. }) => Ok(false),
            Err(e) => Err(anyhow!(e)),
        }
    })
}

/// `docker save` of one image: the tar archive.
pub fn save_image(image: &str) -> Result<Vec<u8>> {
    use futures_util::StreamExt;
    let engine = engine().map_err(|e| anyhow!(e))?;
    let client = engine.client.clone();
    let image = image.to_string();
    block_on(async move {
        let mut out = Vec::new();
        let mut stream = client.export_image(&image);
        while let Some(chunk) = stream.next().await {
            out.extend_from_slice(&chunk?);
        }
        Ok(out)
    })
}

/// The host pid of a running container's main process.
pub fn container_pid(id: &str) -> Result<Option<u32>> {
    let engine = engine().map_err(|e| anyhow!(e))?;
    let client = engine.client.clone();
    let id = id.to_string();
    block_on(async move {
        let info = client.inspect_container(&id, None).await?;
        Ok(info.state.and_then(|s| if s.running == Some(true) { s.pid } else { None }).map(|p| p as u32))
    })
}

/// The label that names the test process owning a container.
pub const OWNER_LABEL: &str = "io.infrabox-mcp.e2e-owner-pid";

/// Removes containers left by test processes that are gone (a test process
/// killed with SIGKILL cannot remove its own). Once per process.
pub fn prune_orphans() {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        let Ok(engine) = engine() else { return };
        let client = engine.client.clone();
        block_on(async move {
            use std::collections::HashMap;
            let filters = HashMap::from([("label", vec![OWNER_LABEL])]);
            let opts = bollard::query_parameters::ListContainersOptionsBuilder::new().all(true).filters(&filters).build();
            let Ok(list) = client.list_containers(Some(opts)).await else { return };
            for c in list {
                let owner = c.labels.as_ref().and_then(|l| l.get(OWNER_LABEL)).and_then(|p| p.parse::<u32>().ok());
                if let (Some(owner), Some(id)) = (owner, c.id) {
                    if owner != std::process::id() && !crate::process::pid_alive(owner) {
                        let rm = bollard::query_parameters::RemoveContainerOptionsBuilder::new().force(true).v(true).build();
                        let _ = client.remove_container(&id, Some(rm)).await;
                    }
                }
            }
        });
    });
}
