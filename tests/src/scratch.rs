//! The per-process scratch directory `target/e2e/<pid>/` where servers keep
//! data and logs; directories left by test processes that are gone are
//! removed the first time it is used.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use crate::process::pid_alive;

/// `$CARGO_TARGET_DIR/e2e`, or the workspace `target/e2e`.
pub fn e2e_root() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir).join("e2e"),
        _ => Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join("target").join("e2e"),
    }
}

/// `target/e2e/<this pid>/`, created on first use (after pruning dead ones).
pub fn process_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let root = e2e_root();
        prune_dead(&root);
        let dir = root.join(std::process::id().to_string());
        std::fs::create_dir_all(&dir).expect("creating the e2e scratch directory");
        // Postgres runs as an unprivileged user when we are root; it must be
        // able to traverse this directory.
        let _ = set_mode(&dir, 0o755);
        let _ = set_mode(&root, 0o755);
        dir
    })
}

/// A fresh sub-directory of [`process_dir`] named `<prefix>-<n>`.
pub fn fresh_dir(prefix: &str) -> PathBuf {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let dir = process_dir().join(format!("{prefix}-{n}"));
    std::fs::create_dir_all(&dir).expect("creating a scratch sub-directory");
    let _ = set_mode(&dir, 0o755);
    dir
}

fn set_mode(path: &Path, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

fn prune_dead(root: &Path) {
    let Ok(entries) = std::fs::read_dir(root) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        if pid != std::process::id() && !pid_alive(pid) {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}
