//! A raw HTTP/1.1 client for attack tests: the request goes on the wire
//! byte for byte as built (verbatim path, duplicate or odd headers), one
//! request per connection, and the response is parsed minimally
//! (Content-Length, chunked, or read to close).

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A request assembled from exact parts.
#[derive(Debug, Clone)]
pub struct RawRequest {
    /// Request method, sent verbatim.
    pub method: String,
    /// Request target, sent verbatim (no normalisation or escaping).
    pub path: String,
    /// Headers in order, duplicates kept, names and values verbatim.
    pub headers: Vec<(String, String)>,
    /// Body bytes.
    pub body: Vec<u8>,
    /// Add `Host`, `Content-Length` (when there is a body) and
    /// `Connection: close` if the caller did not set them. On by default.
    pub auto_headers: bool,
}

impl RawRequest {
    /// A request with no headers and no body.
    pub fn new(method: &str, path: &str) -> Self {
        Self { method: method.into(), path: path.into(), headers: Vec::new(), body: Vec::new(), auto_headers: true }
    }

    /// `GET path`.
    pub fn get(path: &str) -> Self {
        Self::new("GET", path)
    }

    /// `POST path`.
    pub fn post(path: &str) -> Self {
        Self::new("POST", path)
    }

    /// Appends a header (never replaces one with the same name).
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// Sets the body.
    pub fn body(mut self, body: impl Into<Vec<u8>>) -> Self {
        self.body = body.into();
        self
    }

    /// Sets a JSON body and `Content-Type: application/json`.
    pub fn json(self, value: &serde_json::Value) -> Self {
        self.header("Content-Type", "application/json").body(value.to_string())
    }

    /// Disables the automatic `Host`/`Content-Length`/`Connection` headers.
    pub fn without_auto_headers(mut self) -> Self {
        self.auto_headers = false;
        self
    }

    fn has_header(&self, name: &str) -> bool {
        self.headers.iter().any(|(n, _)| n.eq_ignore_ascii_case(name))
    }

    /// The exact bytes that [`RawRequest::send`] writes, `host` used for an automatic `Host`.
    pub fn to_bytes(&self, host: &str) -> Vec<u8> {
        let mut out = format!("{} {} HTTP/1.1\r\n", self.method, self.path).into_bytes();
        if self.auto_headers && !self.has_header("host") {
            out.extend_from_slice(format!("Host: {host}\r\n").as_bytes());
        }
        for (name, value) in &self.headers {
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(value.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        if self.auto_headers {
            if !self.body.is_empty() && !self.has_header("content-length") && !self.has_header("transfer-encoding") {
                out.extend_from_slice(format!("Content-Length: {}\r\n", self.body.len()).as_bytes());
            }
            if !self.has_header("connection") {
                out.extend_from_slice(b"Connection: close\r\n");
            }
        }
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(&self.body);
        out
    }

    /// Sends the request to `addr` and reads the response.
    pub async fn send(&self, addr: SocketAddr, timeout: Duration) -> Result<RawResponse> {
        let bytes = self.to_bytes(&addr.to_string());
        send(addr, &bytes, timeout).await
    }
}

/// A parsed response.
#[derive(Debug, Clone)]
pub struct RawResponse {
    /// Status code.
    pub status: u16,
    /// Headers in order as received.
    pub headers: Vec<(String, String)>,
    /// Body, de-chunked.
    pub body: Vec<u8>,
}

impl RawResponse {
    /// The first header named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// Every header named `name` (case-insensitive), in order.
    pub fn header_all(&self, name: &str) -> Vec<&str> {
        self.headers.iter().filter(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str()).collect()
    }

    /// The body as (lossy) UTF-8.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body parsed as JSON.
    pub fn json(&self) -> Result<serde_json::Value> {
        serde_json::from_slice(&self.body).with_context(|| format!("response body is not JSON: {}", self.text()))
    }
}

/// Writes `request` verbatim to a new connection to `addr` and reads one
/// response. The whole exchange must finish within `timeout`.
pub async fn send(addr: SocketAddr, request: &[u8], timeout: Duration) -> Result<RawResponse> {
    tokio::time::timeout(timeout, Box::pin(exchange(addr, request, false)))
        .await
        .map_err(|_| anyhow!("no complete response from {addr} within {timeout:?}"))?
}

/// Like [`send`] for a `HEAD` request (no body is read).
pub async fn send_head(addr: SocketAddr, request: &[u8], timeout: Duration) -> Result<RawResponse> {
    tokio::time::timeout(timeout, Box::pin(exchange(addr, request, true)))
        .await
        .map_err(|_| anyhow!("no complete response from {addr} within {timeout:?}"))?
}

async fn exchange(addr: SocketAddr, request: &[u8], head: bool) -> Result<RawResponse> {
    let mut stream = TcpStream::connect(addr).await.with_context(|| format!("connecting to {addr}"))?;
    stream.set_nodelay(true).ok();
    stream.write_all(request).await?;
    stream.flush().await?;
    let mut reader = Reader { stream, buf: Vec::new(), eof: false };

    // Skip interim 1xx responses.
    let (status, headers) = loop {
        let head_end = reader.fill_until_crlfcrlf().await?;
        let head_bytes = reader.take(head_end + 4);
        let (status, headers) = parse_head(&head_bytes[..head_end])?;
        if !(100..200).contains(&status) || status == 101 {
            break (status, headers);
        }
    };
    let find = |name: &str| headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.clone());
    let body = if head || status == 204 || status == 304 || (100..200).contains(&status) {
        Vec::new()
    } else if find("transfer-encoding").is_some_and(|v| v.to_ascii_lowercase().contains("chunked")) {
        read_chunked(&mut reader).await?
    } else if let Some(len) = find("content-length") {
        let len: usize = len.trim().parse().with_context(|| format!("bad Content-Length {len:?}"))?;
        reader.fill_to(len).await?;
        reader.take(len)
    } else {
        reader.read_to_end().await?;
        std::mem::take(&mut reader.buf)
    };
    Ok(RawResponse { status, headers, body })
}

struct Reader {
    stream: TcpStream,
    buf: Vec<u8>,
    eof: bool,
}

impl Reader {
    async fn more(&mut self) -> Result<()> {
        if self.eof {
            bail!("connection closed before the response was complete ({} bytes buffered)", self.buf.len());
        }
        self.buf.reserve(64 * 1024);
        let n = self.stream.read_buf(&mut self.buf).await?;
        if n == 0 {
            self.eof = true;
        }
        Ok(())
    }

    async fn fill_until_crlfcrlf(&mut self) -> Result<usize> {
        loop {
            if let Some(i) = find(&self.buf, b"\r\n\r\n") {
                return Ok(i);
            }
            if self.eof && self.buf.is_empty() {
                bail!("connection closed without a response");
            }
            self.more().await?;
        }
    }

    async fn fill_until_crlf(&mut self) -> Result<usize> {
        loop {
            if let Some(i) = find(&self.buf, b"\r\n") {
                return Ok(i);
            }
            self.more().await?;
        }
    }

    async fn fill_to(&mut self, len: usize) -> Result<()> {
        while self.buf.len() < len {
            self.more().await?;
        }
        Ok(())
    }

    async fn read_to_end(&mut self) -> Result<()> {
        while !self.eof {
            self.buf.reserve(64 * 1024);
            if self.stream.read_buf(&mut self.buf).await? == 0 {
                self.eof = true;
            }
        }
        Ok(())
    }

    fn take(&mut self, n: usize) -> Vec<u8> {
        let rest = self.buf.split_off(n);
        std::mem::replace(&mut self.buf, rest)
    }
}

async fn read_chunked(reader: &mut Reader) -> Result<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let line_end = reader.fill_until_crlf().await?;
        let line = reader.take(line_end + 2);
        let size_text = String::from_utf8_lossy(&line[..line_end]);
        let size_text = size_text.split(';').next().unwrap_or("").trim().to_string();
        let size = usize::from_str_radix(&size_text, 16).with_context(|| format!("bad chunk size {size_text:?}"))?;
        if size == 0 {
            // Trailers until an empty line.
            loop {
                let end = reader.fill_until_crlf().await?;
                reader.take(end + 2);
                if end == 0 {
                    return Ok(body);
                }
            }
        }
        reader.fill_to(size + 2).await?;
        let chunk = reader.take(size + 2);
        body.extend_from_slice(&chunk[..size]);
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn parse_head(head: &[u8]) -> Result<(u16, Vec<(String, String)>)> {
    let text = String::from_utf8_lossy(head);
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    if !version.starts_with("HTTP/") {
        bail!("not an HTTP response: {status_line:?}");
    }
    let status: u16 = parts.next().unwrap_or_default().parse().with_context(|| format!("bad status line {status_line:?}"))?;
    let headers = lines
        .filter(|l| !l.is_empty())
        .map(|l| match l.split_once(':') {
            Some((n, v)) => (n.trim().to_string(), v.trim().to_string()),
            None => (l.to_string(), String::new()),
        })
        .collect();
    Ok((status, headers))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    /// Serves one connection: records the request head+body, answers `reply`.
    async fn one_shot(reply: &'static [u8]) -> (SocketAddr, tokio::task::JoinHandle<Vec<u8>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut got = Vec::new();
            let mut buf = [0u8; 4096];
            loop {
                let n = s.read(&mut buf).await.unwrap();
                got.extend_from_slice(&buf[..n]);
                if n == 0 || got.windows(4).any(|w| w == b"\r\n\r\n") {
                    break;
                }
            }
            // Give a body (if any) a moment to arrive.
            tokio::time::sleep(Duration::from_millis(50)).await;
            if let Ok(Ok(n)) = tokio::time::timeout(Duration::from_millis(50), s.read(&mut buf)).await {
                got.extend_from_slice(&buf[..n]);
            }
            s.write_all(reply).await.unwrap();
            s.shutdown().await.ok();
            got
        });
        (addr, task)
    }

    #[tokio::test]
    async fn sends_bytes_verbatim_and_parses_content_length() {
        let (addr, server) =
            one_shot(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: 1\r\nx-a: 2\r\n\r\nhelloEXTRA").await;
        let req = RawRequest::get("/api/v1/mcp/../projects?x=%2F")
            .header("Authorization", "bearer ib_mcp_x")
            .header("authorization", "Bearer second")
            .body("abc");
        let resp = req.send(addr, Duration::from_secs(5)).await.unwrap();
        assert_eq!(resp.status, 200);
        assert_eq!(resp.body, b"hello");
        assert_eq!(resp.header("x-a"), Some("1"));
        assert_eq!(resp.header_all("X-A"), vec!["1", "2"]);
        let got = String::from_utf8(server.await.unwrap()).unwrap();
        assert!(got.starts_with("GET /api/v1/mcp/../projects?x=%2F HTTP/1.1\r\n"), "{got}");
        assert!(got.contains("Authorization: bearer ib_mcp_x\r\nauthorization: Bearer second\r\n"), "{got}");
        assert!(got.contains("Content-Length: 3\r\n"));
        assert!(got.contains("Connection: close\r\n"));
        assert!(got.ends_with("\r\n\r\nabc"), "{got}");
    }

    #[tokio::test]
    async fn decodes_chunked_bodies_with_trailers_and_skips_100_continue() {
        let (addr, _server) = one_shot(
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n4;ext=1\r\nWiki\r\n5\r\npedia\r\n0\r\nX-T: y\r\n\r\n",
        )
        .await;
        let resp = RawRequest::post("/x").send(addr, Duration::from_secs(5)).await.unwrap();
        assert_eq!(resp.status, 201);
        assert_eq!(resp.text(), "Wikipedia");
    }

    #[tokio::test]
    async fn reads_to_close_without_length_and_verbatim_mode_adds_nothing() {
        let (addr, server) = one_shot(b"HTTP/1.0 404 Not Found\r\nServer: t\r\n\r\n{\"a\":1}").await;
        let req = RawRequest::get("*").header("Host", "evil").without_auto_headers();
        assert_eq!(req.to_bytes("ignored"), b"GET * HTTP/1.1\r\nHost: evil\r\n\r\n");
        let resp = req.send(addr, Duration::from_secs(5)).await.unwrap();
        assert_eq!(resp.status, 404);
        assert_eq!(resp.json().unwrap()["a"], 1);
        assert_eq!(server.await.unwrap(), b"GET * HTTP/1.1\r\nHost: evil\r\n\r\n");
    }

    #[tokio::test]
    async fn times_out_on_a_silent_server() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let _hold = tokio::spawn(async move {
            let (_s, _) = listener.accept().await.unwrap();
            tokio::time::sleep(Duration::from_secs(10)).await;
        });
        let err = RawRequest::get("/").send(addr, Duration::from_millis(300)).await.unwrap_err();
        assert!(err.to_string().contains("within"), "{err}");
    }
}
