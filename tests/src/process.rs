//! Child processes owned by a test: output captured to a log file, killed
//! when the handle drops, and killed by the kernel if the test process dies.
//!
//! Children are spawned with `prctl(PR_SET_PDEATHSIG, SIGKILL)`. Linux fires
//! that signal when the *thread* that spawned the child exits, not the
//! process. A child that must outlive the calling thread (a server shared by
//! every test in the binary) must therefore be spawned through
//! [`spawn_on_owner_thread`], which runs the spawn on one dedicated thread
//! that lives as long as the process.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Seek, SeekFrom};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

/// A running child process whose stdout and stderr are appended to a log file.
#[derive(Debug)]
pub struct ManagedProcess {
    name: String,
    child: Option<Child>,
    pid: u32,
    log_path: PathBuf,
}

impl ManagedProcess {
    /// Spawns `command` with stdout and stderr appended to `log_path`
    /// (created if missing) and stdin closed. The child gets SIGKILL when
    /// the spawning thread exits.
    pub fn spawn(name: &str, mut command: Command, log_path: &Path) -> Result<Self> {
        if let Some(parent) = log_path.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating log directory {}", parent.display()))?;
        }
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log_path)
            .with_context(|| format!("opening log file {}", log_path.display()))?;
        let log_err = log.try_clone()?;
        command.stdin(Stdio::null()).stdout(log).stderr(log_err);
        // SAFETY: prctl and getppid are async-signal-safe; nothing here allocates.
        unsafe {
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command
            .spawn()
            .with_context(|| format!("spawning {name}: {command:?}"))?;
        let pid = child.id();
        Ok(Self { name: name.to_string(), child: Some(child), pid, log_path: log_path.to_path_buf() })
    }

    /// The name given at spawn time (used in error messages).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The OS process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Where stdout and stderr go.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The whole log so far (lossy UTF-8).
    pub fn log_contents(&self) -> String {
        std::fs::read(&self.log_path)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// Whether the child is still running.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Waits until a log line contains `needle` and returns that line.
    /// Fails early if the process exits first, or after `timeout`.
    pub fn wait_for_log(&mut self, needle: &str, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        let mut offset = 0u64;
        let mut pending = String::new();
        loop {
            if let Ok(mut file) = File::open(&self.log_path) {
                file.seek(SeekFrom::Start(offset))?;
                let mut reader = BufReader::new(file);
                let mut buf = Vec::new();
                loop {
                    buf.clear();
                    let n = reader.read_until(b'\n', &mut buf)?;
                    if n == 0 {
                        break;
                    }
                    offset += n as u64;
                    pending.push_str(&String::from_utf8_lossy(&buf));
                    if pending.ends_with('\n') {
                        let line = std::mem::take(&mut pending);
                        if line.contains(needle) {
                            return Ok(line.trim_end().to_string());
                        }
                    }
                }
                if pending.contains(needle) {
                    return Ok(pending.trim_end().to_string());
                }
            }
            if !self.is_running() {
                bail!(
                    "{} (pid {}) exited before logging {needle:?}; log {}:\n{}",
                    self.name,
                    self.pid,
                    self.log_path.display(),
                    tail(&self.log_contents(), 4000)
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "{} (pid {}) did not log {needle:?} within {timeout:?}; log {}:\n{}",
                    self.name,
                    self.pid,
                    self.log_path.display(),
                    tail(&self.log_contents(), 4000)
                );
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// Sends `signal` to the child (no-op once it has been reaped).
    pub fn signal(&self, signal: i32) -> Result<()> {
        if self.child.is_none() {
            return Ok(());
        }
        // SAFETY: plain syscall on a pid we own and have not reaped.
        if unsafe { libc::kill(self.pid as libc::pid_t, signal) } != 0 {
            return Err(anyhow!(std::io::Error::last_os_error()));
        }
        Ok(())
    }

    /// SIGTERM, up to `grace` to exit, then SIGKILL; reaps the child.
    pub fn stop_with_grace(&mut self, grace: Duration) -> Result<()> {
        let Some(mut child) = self.child.take() else { return Ok(()) };
        if matches!(child.try_wait(), Ok(Some(_))) {
            return Ok(());
        }
        // SAFETY: the child is not reaped yet, so its pid is still ours.
        unsafe { libc::kill(self.pid as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = child.kill();
        child.wait().with_context(|| format!("waiting for {}", self.name))?;
        Ok(())
    }

    /// SIGKILL, no grace (a crash, for fault drills); reaps the child.
    pub fn kill(&mut self) -> Result<()> {
        let Some(mut child) = self.child.take() else { return Ok(()) };
        let _ = child.kill();
        child.wait().with_context(|| format!("waiting for {}", self.name))?;
        Ok(())
    }

    /// Stops the child (SIGTERM, 3 s grace, SIGKILL) and reaps it.
    pub fn stop(&mut self) -> Result<()> {
        self.stop_with_grace(Duration::from_secs(3))
    }
}

impl Drop for ManagedProcess {
    fn drop(&mut self) {
        let _ = self.stop_with_grace(Duration::from_secs(2));
    }
}

fn tail(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut start = text.len() - max;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    &text[start..]
}

type SpawnJob = Box<dyn FnOnce() + Send>;

/// Runs `spawn` on a dedicated thread that lives for the whole process, so
/// the parent-death signal of what it spawns fires only when the test
/// process itself exits. Use it for servers shared across tests.
pub fn spawn_on_owner_thread<T, F>(spawn: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T> + Send + 'static,
{
    static OWNER: OnceLock<Mutex<mpsc::Sender<SpawnJob>>> = OnceLock::new();
    let sender = OWNER
        .get_or_init(|| {
            let (tx, rx) = mpsc::channel::<SpawnJob>();
            std::thread::Builder::new()
                .name("e2e-process-owner".into())
                .spawn(move || {
                    // Never returns while the process lives: recv only fails
                    // once the sender (a static) is gone.
                    while let Ok(job) = rx.recv() {
                        job();
                    }
                    loop {
                        std::thread::park();
                    }
                })
                .expect("spawning the process-owner thread");
            Mutex::new(tx)
        })
        .lock()
        .map_err(|_| anyhow!("process-owner lock poisoned"))?
        .clone();
    let (result_tx, result_rx) = mpsc::channel();
    sender
        .send(Box::new(move || {
            let _ = result_tx.send(spawn());
        }))
        .map_err(|_| anyhow!("process-owner thread is gone"))?;
    result_rx.recv().map_err(|_| anyhow!("process-owner thread dropped the job"))?
}

/// Whether a process with this pid exists (signal 0 probe).
pub fn pid_alive(pid: u32) -> bool {
    // SAFETY: signal 0 only checks existence and permission.
    let rc = unsafe { libc::kill(pid as libc::pid_t, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn captures_output_and_stops() {
        let dir = tempfile::tempdir().unwrap();
        let mut cmd = Command::new("sh");
        cmd.arg("-c").arg("echo hello-start; echo err-line >&2; exec sleep 30");
        let mut p = ManagedProcess::spawn("sh", cmd, &dir.path().join("sh.log")).unwrap();
        let line = p.wait_for_log("hello-start", Duration::from_secs(5)).unwrap();
        assert_eq!(line, "hello-start");
        p.wait_for_log("err-line", Duration::from_secs(5)).unwrap();
        let pid = p.pid();
        assert!(pid_alive(pid));
        p.stop().unwrap();
        assert!(!pid_alive(pid));
    }

    #[test]
    fn wait_for_log_fails_when_process_exits() {
        let dir = tempfile::tempdir().unwrap();
        let mut cmd = Command::new("sh");
        cmd.arg("-c").arg("echo bye");
        let mut p = ManagedProcess::spawn("sh", cmd, &dir.path().join("sh.log")).unwrap();
        let err = p.wait_for_log("never", Duration::from_secs(5)).unwrap_err();
        assert!(err.to_string().contains("exited"), "{err}");
    }

    #[test]
    fn owner_thread_spawn_survives_calling_thread() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("sleep.log");
        let p = std::thread::spawn(move || {
            spawn_on_owner_thread(move || {
                let mut cmd = Command::new("sleep");
                cmd.arg("30");
                ManagedProcess::spawn("sleep", cmd, &log)
            })
        })
        .join()
        .unwrap()
        .unwrap();
        std::thread::sleep(Duration::from_millis(200));
        assert!(pid_alive(p.pid()));
        drop(p);
    }
}
