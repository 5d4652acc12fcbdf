//! A Docker Engine API version adapter for testcontainers.
//!
//! testcontainers 0.27 talks to the engine through bollard 0.20, which puts
//! its own API version (1.52) into every request path (`/v1.52/...`) and
//! never negotiates. An engine older than that refuses every such request
//! ("client version 1.52 is too new"); Debian's Docker Engine 20.10, for
//! one, speaks at most 1.41. This adapter listens on a Unix socket, rewrites
//! the version in each request line to the engine's own and passes
//! everything else through byte for byte. It is started only when the engine
//! is older than bollard (see `engine.rs`); the requests testcontainers makes
//! for this harness (create, copy, start, logs, inspect, stop, remove) have
//! the same shape in both versions.
//!
//! Every request gets `Connection: close`, so each connection carries one
//! request and only its head needs parsing. Upgraded connections (attach,
//! exec) keep their `Connection: Upgrade` and are spliced as they are.

use std::path::Path;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixListener, UnixStream};

/// Where the real engine listens.
#[derive(Debug, Clone)]
pub enum Upstream {
    Unix(String),
    Tcp(String),
}

/// Longest request head accepted (Docker request heads are small).
const MAX_HEAD: usize = 64 * 1024;

/// Binds `socket` and serves until the process exits (spawned on the
/// harness's Docker runtime).
pub fn start(socket: &Path, upstream: Upstream, engine_api: String) -> std::io::Result<()> {
    let _ = std::fs::remove_file(socket);
    let listener = UnixListener::bind(socket)?;
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let upstream = upstream.clone();
            let api = engine_api.clone();
            tokio::spawn(async move {
                let _ = relay(client, upstream, api).await;
            });
        }
    });
    Ok(())
}

async fn relay(mut client: UnixStream, upstream: Upstream, api: String) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(4096);
    let head_end = loop {
        if let Some(i) = find(&buf, b"\r\n\r\n") {
            break i + 4;
        }
        if buf.len() > MAX_HEAD {
            return Err(std::io::Error::other("request head too long"));
        }
        let mut chunk = [0u8; 4096];
        let n = client.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = std::str::from_utf8(&buf[..head_end]).map_err(std::io::Error::other)?;
    let head = rewrite_head(head, &api);
    let rest = buf[head_end..].to_vec();
    match upstream {
        Upstream::Unix(path) => splice(client, UnixStream::connect(path).await?, head, rest).await,
        Upstream::Tcp(addr) => splice(client, TcpStream::connect(addr).await?, head, rest).await,
    }
}

async fn splice<S>(mut client: UnixStream, mut engine: S, head: String, rest: Vec<u8>) -> std::io::Result<()>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    engine.write_all(head.as_bytes()).await?;
    engine.write_all(&rest).await?;
    tokio::io::copy_bidirectional(&mut client, &mut engine).await?;
    Ok(())
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Rewrites `/vX.Y/` at the start of the request target to `/v{api}/` and,
/// unless the request upgrades the connection, replaces its
/// `Connection`/`Keep-Alive` headers with `Connection: close`.
pub fn rewrite_head(head: &str, api: &str) -> String {
    let mut lines = head.split("\r\n");
    let request_line = lines.next().unwrap_or_default();
    let mut parts = request_line.splitn(3, ' ');
    let (method, target, version) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let target = match versioned(target) {
        Some(rest) => format!("/v{api}{rest}"),
        None => target.to_string(),
    };
    let headers: Vec<&str> = lines.filter(|l| !l.is_empty()).collect();
    let upgrade = headers.iter().any(|h| header_name_is(h, "upgrade"));
    let mut out = format!("{method} {target} {version}\r\n");
    for h in headers {
        if !upgrade && (header_name_is(h, "connection") || header_name_is(h, "keep-alive")) {
            continue;
        }
        out.push_str(h);
        out.push_str("\r\n");
    }
    if !upgrade {
        out.push_str("Connection: close\r\n");
    }
    out.push_str("\r\n");
    out
}

/// `/v1.52/containers/json` → `Some("/containers/json")`.
fn versioned(target: &str) -> Option<&str> {
    let rest = target.strip_prefix("/v")?;
    let slash = rest.find('/')?;
    let (major, minor) = rest[..slash].split_once('.')?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    (digits(major) && digits(minor)).then(|| &rest[slash..])
}

fn header_name_is(line: &str, name: &str) -> bool {
    line.split_once(':').is_some_and(|(k, _)| k.trim().eq_ignore_ascii_case(name))
}

#[cfg(test)]
mod tests {
    use super::rewrite_head;

    #[test]
    fn rewrites_the_version_and_closes_the_connection() {
        let head = "POST /v1.52/containers/create?name=x HTTP/1.1\r\nHost: docker\r\nconnection: keep-alive\r\nContent-Length: 2\r\n\r\n";
        assert_eq!(
            rewrite_head(head, "1.41"),
            "POST /v1.41/containers/create?name=x HTTP/1.1\r\nHost: docker\r\nContent-Length: 2\r\nConnection: close\r\n\r\n"
        );
    }

    #[test]
    fn leaves_unversioned_paths_and_upgrades_alone() {
        let head = "GET /_ping HTTP/1.1\r\nHost: docker\r\n\r\n";
        assert_eq!(rewrite_head(head, "1.41"), "GET /_ping HTTP/1.1\r\nHost: docker\r\nConnection: close\r\n\r\n");
        let head = "POST /v1.52/exec/abc/start HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: tcp\r\n\r\n";
        assert_eq!(
            rewrite_head(head, "1.41"),
            "POST /v1.41/exec/abc/start HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: tcp\r\n\r\n"
        );
        let head = "GET /vnext/x HTTP/1.1\r\n\r\n";
        assert!(rewrite_head(head, "1.41").starts_with("GET /vnext/x HTTP/1.1\r\n"));
    }
}
