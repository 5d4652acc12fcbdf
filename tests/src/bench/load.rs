//! One load run with `wrk` (Debian package): fixed connections, one thread,
//! fixed duration; throughput and latency percentiles parsed from
//! `wrk --latency`.

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::Serialize;

/// What one run measured.
#[derive(Debug, Clone, Copy, Serialize, Default)]
pub struct LoadResult {
    pub requests_per_second: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub requests: u64,
    /// Responses that were not 2xx/3xx (wrk's "Non-2xx or 3xx responses").
    pub non_2xx: u64,
}

/// A load shape.
#[derive(Debug, Clone, Copy)]
pub struct Load {
    pub connections: u32,
    pub duration: Duration,
}

/// Load kept up in the background until dropped (the wrk process is
/// killed then, not left running for its whole duration).
pub struct Background(std::process::Child);

impl Drop for Background {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Load {
    fn command(&self, addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Command {
        let mut cmd = Command::new("wrk");
        cmd.args(["-t1", "-c", &self.connections.to_string()])
            .args(["-d", &format!("{}s", self.duration.as_secs().max(1))])
            .arg("--latency");
        for (k, v) in headers {
            cmd.args(["-H", &format!("{k}: {v}")]);
        }
        cmd.arg(format!("http://{addr}{path}"));
        cmd
    }

    /// Starts this load (at most `duration`) until the returned guard is dropped.
    pub fn background(&self, addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Result<Background> {
        let child = self
            .command(addr, path, headers)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .context("running wrk (apt-get install wrk)")?;
        Ok(Background(child))
    }

    /// `GET path` with `headers` against `addr`.
    pub fn run(&self, addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Result<LoadResult> {
        self.finish(self.command(addr, path, headers))
    }

    /// `POST path` with `headers` and `body` against `addr` (a wrk script
    /// sets the method and body).
    pub fn run_post(&self, addr: SocketAddr, path: &str, headers: &[(&str, &str)], body: &str) -> Result<LoadResult> {
        if body.contains("]==]") {
            bail!("the body cannot be quoted in the wrk script");
        }
        let script = std::env::temp_dir().join(format!("mcp-bench-post-{}.lua", std::process::id()));
        std::fs::write(&script, format!("wrk.method = \"POST\"\nwrk.body = [==[{body}]==]\n"))?;
        let mut cmd = self.command(addr, path, headers);
        cmd.arg("-s").arg(&script);
        let result = self.finish(cmd);
        let _ = std::fs::remove_file(&script);
        result
    }

    fn finish(&self, mut cmd: Command) -> Result<LoadResult> {
        let out = cmd.output().context("running wrk (apt-get install wrk)")?;
        if !out.status.success() {
            bail!("wrk failed: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        }
        parse(&String::from_utf8_lossy(&out.stdout))
    }
}

/// Parses wrk's text output.
pub fn parse(text: &str) -> Result<LoadResult> {
    let mut r = LoadResult::default();
    let mut in_distribution = false;
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with("Latency Distribution") {
            in_distribution = true;
            continue;
        }
        if in_distribution {
            let mut parts = t.split_whitespace();
            match (parts.next(), parts.next()) {
                (Some("50%"), Some(v)) => r.p50_ms = duration_ms(v)?,
                (Some("99%"), Some(v)) => {
                    r.p99_ms = duration_ms(v)?;
                    in_distribution = false;
                }
                _ => {}
            }
        }
        if let Some(v) = t.strip_prefix("Requests/sec:") {
            r.requests_per_second = v.trim().parse().context("Requests/sec")?;
        }
        if let Some(v) = t.strip_prefix("Non-2xx or 3xx responses:") {
            r.non_2xx = v.trim().parse().context("Non-2xx")?;
        }
        if t.contains("requests in") {
            r.requests = t.split_whitespace().next().and_then(|n| n.parse().ok()).unwrap_or(0);
        }
    }
    if r.requests_per_second <= 0.0 || r.p50_ms <= 0.0 {
        bail!("wrk produced no measurements:\n{text}");
    }
    Ok(r)
}

fn duration_ms(v: &str) -> Result<f64> {
    let (num, unit) = v.split_at(v.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(v.len()));
    let n: f64 = num.parse().with_context(|| format!("latency {v}"))?;
    Ok(match unit {
        "us" => n / 1000.0,
        "ms" => n,
        "s" => n * 1000.0,
        "m" => n * 60_000.0,
        _ => bail!("unknown latency unit in {v}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_wrk_output() {
        let text = "Running 1s test @ http://127.0.0.1:1/x\n  1 threads and 8 connections\n  Thread Stats   Avg      Stdev     Max   +/- Stdev\n    Latency   210.50us   50.00us   2.00ms   90.00%\n  Latency Distribution\n     50%  190.00us\n     75%  220.00us\n     90%  260.00us\n     99%    1.20ms\n  41000 requests in 1.00s, 5.00MB read\n  Non-2xx or 3xx responses: 3\nRequests/sec:  40999.50\nTransfer/sec:      5.00MB\n";
        let r = parse(text).unwrap();
        assert_eq!(r.requests, 41000);
        assert_eq!(r.non_2xx, 3);
        assert!((r.requests_per_second - 40999.5).abs() < 1e-6);
        assert!((r.p50_ms - 0.19).abs() < 1e-9);
        assert!((r.p99_ms - 1.2).abs() < 1e-9);
        assert!(parse("nothing").is_err());
    }
}
