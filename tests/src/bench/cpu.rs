//! CPU time by process over a load run (issue "The allowed path": where a
//! request's cost goes), from `/proc/<pid>/stat` (utime + stime) before and
//! after. A server that forks workers (Postgres) counts with its children.

use std::time::Duration;

/// Clock ticks per second of `/proc` times.
fn ticks_per_second() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as u64
    } else {
        100
    }
}

/// (ppid, utime + stime) of `pid`.
fn stat(pid: u32) -> Option<(u32, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold spaces: fields after it.
    let rest = text.get(text.rfind(')')? + 2..)?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ppid = f.get(1)?.parse().ok()?;
    let (utime, stime): (u64, u64) = (f.get(11)?.parse().ok()?, f.get(12)?.parse().ok()?);
    Some((ppid, utime + stime))
}

/// CPU time of `pid` and, with `children`, of the processes it started.
pub fn cpu_time(pid: u32, children: bool) -> Duration {
    let mut ticks = stat(pid).map_or(0, |(_, t)| t);
    if children {
        if let Ok(dir) = std::fs::read_dir("/proc") {
            for entry in dir.flatten() {
                let Some(child) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
                if let Some((ppid, t)) = stat(child) {
                    if ppid == pid {
                        ticks += t;
                    }
                }
            }
        }
    }
    Duration::from_micros(ticks * 1_000_000 / ticks_per_second())
}

/// The processes of one measurement: (name, pid, with children).
pub type Processes = Vec<(String, u32, bool)>;

/// CPU µs per request of each process while `run` drives `requests()`
/// requests (what `run` returns).
pub fn per_request<T>(processes: &Processes, run: impl FnOnce() -> anyhow::Result<(T, u64)>) -> anyhow::Result<(T, Vec<(String, f64)>)> {
    let before: Vec<Duration> = processes.iter().map(|(_, pid, c)| cpu_time(*pid, *c)).collect();
    let (out, requests) = run()?;
    let n = requests.max(1) as f64;
    let costs = processes
        .iter()
        .zip(before)
        .map(|((name, pid, c), b)| (name.clone(), cpu_time(*pid, *c).saturating_sub(b).as_secs_f64() * 1e6 / n))
        .collect();
    Ok((out, costs))
}
