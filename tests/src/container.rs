//! The container runtime of the end-to-end harness: which runtime Envoy
//! runs in (`MCP_E2E_RUNTIME`), the image names, and containers started with
//! testcontainers from images `make images` built (nothing is ever pulled).
//!
//! Containers use the host network, so Envoy in a container reaches the
//! control plane, Postgres, Redis and the fake InfraBox that tests run as
//! processes on 127.0.0.1, and tests reach Envoy on 127.0.0.1 as before.
//! Every container is labelled with the owning test process's pid and is
//! removed when its handle drops; containers of test processes that died
//! are removed by the next test process.
//!
//! Only Envoy (and, in tests/containers.rs, the control-plane image) runs
//! in containers: Postgres and Redis stay the harness's managed processes,
//! which no image of this project would make more real.

mod api_shim;
pub mod engine;

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use testcontainers::core::logs::LogFrame;
use testcontainers::{ContainerAsync, CopyTargetOptions, GenericImage, ImageExt};

pub use engine::{engine, Engine};

/// Where Envoy runs during a test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Runtime {
    /// A child process of the test (`.tools/envoy-<version>`).
    Process,
    /// A container of [`envoy_image`], on the host network.
    Container,
}

impl Runtime {
    /// The runtime `MCP_E2E_RUNTIME` asks for: `process`, `container`, or
    /// `auto` (the default): a container when a Docker engine answers and
    /// the Envoy image is present, else a process. Decided once per test
    /// process; the decision and its reason go to stderr.
    pub fn selected() -> Runtime {
        static SELECTED: OnceLock<Runtime> = OnceLock::new();
        *SELECTED.get_or_init(|| {
            let (runtime, why) = decide();
            eprintln!("[e2e] Envoy runtime: {runtime:?} ({why})");
            runtime
        })
    }

    /// Whether `MCP_E2E_RUNTIME=container` was asked for explicitly (then a
    /// missing engine is an error, never a skip).
    pub fn container_required() -> bool {
        std::env::var("MCP_E2E_RUNTIME").is_ok_and(|v| v.trim().eq_ignore_ascii_case("container"))
    }
}

fn decide() -> (Runtime, String) {
    let asked = std::env::var("MCP_E2E_RUNTIME").unwrap_or_default().trim().to_ascii_lowercase();
    match asked.as_str() {
        "process" => (Runtime::Process, "MCP_E2E_RUNTIME=process".into()),
        "container" => (Runtime::Container, "MCP_E2E_RUNTIME=container".into()),
        "" | "auto" => match unavailable_reason(&envoy_image()) {
            None => (Runtime::Container, format!("auto: Docker answers and {} is present", envoy_image())),
            Some(why) => (Runtime::Process, format!("auto: no container runtime: {why}")),
        },
        other => panic!("MCP_E2E_RUNTIME={other:?}: expected process, container or auto"),
    }
}

fn image_prefix() -> String {
    std::env::var("MCP_IMAGE_PREFIX").ok().filter(|p| !p.is_empty()).unwrap_or_else(|| "infrabox-mcp".into())
}

fn image_from(var: &str, default: String) -> String {
    std::env::var(var).ok().map(|v| v.trim().to_string()).filter(|v| !v.is_empty()).unwrap_or(default)
}

/// The Envoy image: `$MCP_ENVOY_IMAGE` (e.g. `envoyproxy/envoy:v1.40.0`),
/// else `infrabox-mcp/envoy:$ENVOY_VERSION` as `make images` builds it.
pub fn envoy_image() -> String {
    let version = std::env::var("ENVOY_VERSION").ok().filter(|v| !v.is_empty()).unwrap_or_else(|| "1.40.0".into());
    image_from("MCP_ENVOY_IMAGE", format!("{}/envoy:{version}", image_prefix()))
}

/// The control-plane image: `$MCP_CONTROL_PLANE_IMAGE`, else
/// `infrabox-mcp/control-plane:local`.
pub fn control_plane_image() -> String {
    image_from("MCP_CONTROL_PLANE_IMAGE", format!("{}/control-plane:local", image_prefix()))
}

/// The filter as an Istio Wasm image: `$MCP_WASM_PLUGIN_IMAGE`, else
/// `infrabox-mcp/mcp-filter:local`.
pub fn wasm_plugin_image() -> String {
    image_from("MCP_WASM_PLUGIN_IMAGE", format!("{}/mcp-filter:local", image_prefix()))
}

/// Why a container of `image` cannot run here (no engine, or the image was
/// not built), or `None` when it can.
pub fn unavailable_reason(image: &str) -> Option<String> {
    if let Err(e) = engine::engine() {
        return Some(e);
    }
    match engine::image_present(image) {
        Ok(true) => None,
        Ok(false) => Some(format!("image {image} is not present (build it with `make images`; nothing is pulled)")),
        Err(e) => Some(format!("cannot inspect image {image}: {e:#}")),
    }
}

/// What to run in a container.
#[derive(Debug, Clone)]
pub struct ContainerSpec {
    /// A short name for labels and messages (`envoy`, `control-plane`).
    pub role: String,
    /// `name:tag`.
    pub image: String,
    /// The command (the image's entrypoint, if any, stays).
    pub cmd: Vec<String>,
    pub env: Vec<(String, String)>,
    /// Files copied in before start: (absolute path, content, mode).
    pub files: Vec<(String, Vec<u8>, u32)>,
}

/// A running container; removed when dropped. Its output is appended to a
/// log file on the host as it is produced.
pub struct RunningContainer {
    container: Option<Arc<ContainerAsync<GenericImage>>>,
    id: String,
    image: String,
    log_path: PathBuf,
}

/// `registry:5000/ns/name:tag` → (`registry:5000/ns/name`, `tag`).
fn split_image(image: &str) -> (String, String) {
    match image.rsplit_once(':') {
        Some((name, tag)) if !tag.contains('/') => (name.to_string(), tag.to_string()),
        _ => (image.to_string(), "latest".to_string()),
    }
}

impl RunningContainer {
    /// Starts `spec` on the host network. Fails, without pulling, if the
    /// engine is missing or does not have the image.
    pub fn start(spec: ContainerSpec, log_path: &Path) -> Result<Self> {
        engine::engine().map_err(|e| anyhow!("the container runtime needs a Docker engine: {e}"))?;
        engine::prune_orphans();
        if !engine::image_present(&spec.image)? {
            bail!("image {} is not present: build it with `make images` (the harness never pulls)", spec.image);
        }
        if let Some(parent) = log_path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let log = Arc::new(Mutex::new(
            OpenOptions::new().create(true).append(true).open(log_path).with_context(|| format!("opening {}", log_path.display()))?,
        ));
        let (name, tag) = split_image(&spec.image);
        let mut request = GenericImage::new(name, tag)
            .with_network("host")
            .with_label(engine::OWNER_LABEL, std::process::id().to_string())
            .with_label("io.infrabox-mcp.e2e-role", spec.role.clone())
            .with_startup_timeout(Duration::from_secs(60))
            .with_log_consumer(move |frame: &LogFrame| {
                if let Ok(mut f) = log.lock() {
                    let _ = f.write_all(frame.bytes());
                }
            });
        if !spec.cmd.is_empty() {
            request = request.with_cmd(spec.cmd.clone());
        }
        for (k, v) in &spec.env {
            request = request.with_env_var(k.clone(), v.clone());
        }
        for (target, content, mode) in &spec.files {
            request = request.with_copy_to(CopyTargetOptions::new(target.clone()).with_mode(*mode), content.clone());
        }
        let container = engine::block_on(async move {
            use testcontainers::runners::AsyncRunner;
            request.start().await
        })
        .with_context(|| format!("starting a {} container from {}", spec.role, spec.image))?;
        let id = container.id().to_string();
        Ok(Self { container: Some(Arc::new(container)), id, image: spec.image, log_path: log_path.to_path_buf() })
    }

    /// The container id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The image it runs.
    pub fn image(&self) -> &str {
        &self.image
    }

    /// Whether its main process still runs.
    pub fn is_running(&self) -> bool {
        let Some(c) = self.container.clone() else { return false };
        engine::block_on(async move { c.is_running().await.unwrap_or(false) })
    }

    /// The host pid of its main process, while it runs.
    pub fn host_pid(&self) -> Result<Option<u32>> {
        engine::container_pid(&self.id)
    }

    /// Everything it wrote to stdout and stderr so far (lossy UTF-8).
    pub fn log_contents(&self) -> String {
        std::fs::read(&self.log_path).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default()
    }

    /// Stops it (SIGTERM, `grace`, then SIGKILL); its log stays readable.
    pub fn stop(&mut self, grace: Duration) -> Result<()> {
        let Some(c) = self.container.clone() else { return Ok(()) };
        let secs = grace.as_secs().max(1) as i32;
        engine::block_on(async move { c.stop_with_timeout(Some(secs)).await }).map_err(|e| anyhow!(e))
    }
}

impl Drop for RunningContainer {
    fn drop(&mut self) {
        let Some(c) = self.container.take() else { return };
        let id = self.id.clone();
        engine::block_on(async move {
            match Arc::try_unwrap(c) {
                Ok(c) => {
                    let _ = c.rm().await;
                }
                Err(c) => {
                    // Still shared by a task: remove by id; the handle is
                    // then dropped on this runtime.
                    if let Ok(e) = engine::engine() {
                        let rm = testcontainers::bollard::query_parameters::RemoveContainerOptionsBuilder::new().force(true).v(true).build();
                        let _ = e.client().remove_container(&id, Some(rm)).await;
                    }
                    drop(c);
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::split_image;

    #[test]
    fn image_references_split_at_the_tag() {
        assert_eq!(split_image("infrabox-mcp/envoy:1.40.0"), ("infrabox-mcp/envoy".into(), "1.40.0".into()));
        assert_eq!(split_image("registry:5000/ns/envoy:v1"), ("registry:5000/ns/envoy".into(), "v1".into()));
        assert_eq!(split_image("registry:5000/ns/envoy"), ("registry:5000/ns/envoy".into(), "latest".into()));
        assert_eq!(split_image("envoy"), ("envoy".into(), "latest".into()));
    }
}
