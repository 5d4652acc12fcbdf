//! Fallible host calls. The SDK's trait methods `unwrap` host errors and
//! decode header values as UTF-8 with `unwrap`; these wrappers return
//! `Option`/`Result` and decode lossily, so no request can abort the VM.

use std::time::UNIX_EPOCH;

use proxy_wasm::hostcalls;
use proxy_wasm::types::{Bytes, MapType};

/// Request headers as (lowercase name, value), non-UTF-8 bytes replaced.
pub fn request_headers() -> Vec<(String, String)> {
    hostcalls::get_map_bytes(MapType::HttpRequestHeaders)
        .map(|m| m.into_iter().map(|(k, v)| (k, lossy(v))).collect())
        .unwrap_or_default()
}

pub fn set_request_header(name: &str, value: Option<&str>) {
    if let Err(e) = hostcalls::set_map_value(MapType::HttpRequestHeaders, name, value) {
        log::warn!("cannot set request header {name}: {e:?}");
    }
}

pub fn remove_request_header(name: &str) {
    if let Err(e) = hostcalls::remove_map_value(MapType::HttpRequestHeaders, name) {
        log::warn!("cannot remove request header {name}: {e:?}");
    }
}

pub fn http_call_response_header(name: &str) -> Option<String> {
    hostcalls::get_map_value_bytes(MapType::HttpCallResponseHeaders, name)
        .ok()
        .flatten()
        .map(lossy)
}

/// The current HTTP call's response body, read from the host piece by
/// piece: the VM never holds more of it than the reader's buffer.
pub struct HttpCallBody {
    offset: usize,
    size: usize,
}

impl HttpCallBody {
    pub fn new(size: usize) -> Self {
        Self { offset: 0, size }
    }
}

impl std::io::Read for HttpCallBody {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let want = buf.len().min(self.size.saturating_sub(self.offset));
        if want == 0 {
            return Ok(0);
        }
        let chunk = hostcalls::get_buffer(proxy_wasm::types::BufferType::HttpCallResponseBody, self.offset, want)
            .map_err(|e| std::io::Error::other(format!("cannot read the response body: {e:?}")))?
            .unwrap_or_default();
        let n = chunk.len().min(want);
        if n == 0 {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "response body ended early"));
        }
        buf.get_mut(..n).ok_or(std::io::ErrorKind::InvalidInput)?.copy_from_slice(chunk.get(..n).unwrap_or_default());
        self.offset += n;
        Ok(n)
    }
}

/// Sends a local reply; failures are logged (the stream is then reset by Envoy).
pub fn send_response(status: u32, headers: Vec<(&str, &str)>, body: &[u8]) {
    if let Err(e) = hostcalls::send_http_response(status, headers, Some(body)) {
        log::warn!("cannot send local reply: {e:?}");
    }
}

/// Host clock in unix seconds (0 if the host cannot tell, which denies by
/// expiry nothing and is logged).
pub fn now_unix() -> i64 {
    now_unix_ms() / 1000
}

pub fn now_unix_ms() -> i64 {
    match hostcalls::get_current_time() {
        Ok(t) => t.duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0),
        Err(e) => {
            log::error!("host clock unavailable: {e:?}");
            0
        }
    }
}

fn lossy(v: Bytes) -> String {
    match String::from_utf8(v) {
        Ok(s) => s,
        Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
    }
}

pub fn response_header(name: &str) -> Option<String> {
    hostcalls::get_map_value_bytes(MapType::HttpResponseHeaders, name)
        .ok()
        .flatten()
        .map(lossy)
}

pub fn set_response_header(name: &str, value: Option<&str>) {
    if let Err(e) = hostcalls::set_map_value(MapType::HttpResponseHeaders, name, value) {
        log::warn!("cannot set response header {name}: {e:?}");
    }
}

pub fn response_body(size: usize) -> Option<Bytes> {
    hostcalls::get_buffer(proxy_wasm::types::BufferType::HttpResponseBody, 0, size)
        .ok()
        .flatten()
}

/// Replaces `size` bytes at `start` of the buffered response body.
pub fn set_response_body(start: usize, size: usize, value: &[u8]) {
    if let Err(e) = hostcalls::set_buffer(proxy_wasm::types::BufferType::HttpResponseBody, start, size, value) {
        log::warn!("cannot set response body: {e:?}");
    }
}
