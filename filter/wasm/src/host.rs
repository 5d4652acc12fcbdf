//! Fallible host calls. The SDK's trait methods `unwrap` host errors and
//! decode header values as UTF-8 with `unwrap`; these wrappers return
//! `Option`/`Result` and decode lossily, so no request can abort the VM.
//! Properties are read and written through the raw ABI for the same reason
//! (`hostcalls::{get,set}_property` panic on statuses they do not expect).

use std::time::UNIX_EPOCH;

use proxy_wasm::hostcalls;
use proxy_wasm::types::{Bytes, MapType};

/// Request headers as (lowercase name, value), non-UTF-8 bytes replaced.
pub fn request_headers() -> Vec<(String, String)> {
    hostcalls::get_map_bytes(MapType::HttpRequestHeaders)
        .map(|m| m.into_iter().map(|(k, v)| (k, lossy(v))).collect())
        .unwrap_or_default()
}

pub fn set_request_header(name: &str, value: Option<&str>) -> Result<(), proxy_wasm::types::Status> {
    hostcalls::set_map_value(MapType::HttpRequestHeaders, name, value).inspect_err(|e| log::warn!("cannot set request header {name}: {e:?}"))
}

pub fn remove_request_header(name: &str) -> Result<(), proxy_wasm::types::Status> {
    hostcalls::remove_map_value(MapType::HttpRequestHeaders, name).inspect_err(|e| log::warn!("cannot remove request header {name}: {e:?}"))
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

/// Host clock in unix milliseconds (0 if the host cannot tell, which
/// denies by expiry nothing and is logged).
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

/// Replaces the whole buffered request body.
pub fn replace_request_body(value: &[u8]) -> Result<(), proxy_wasm::types::Status> {
    // Envoy replaces the whole buffer for start 0 and a size at least its length.
    hostcalls::set_buffer(proxy_wasm::types::BufferType::HttpRequestBody, 0, u32::MAX as usize, value)
        .inspect_err(|e| log::warn!("cannot set request body: {e:?}"))
}

/// Replaces `size` bytes at `start` of the buffered response body.
pub fn set_response_body(start: usize, size: usize, value: &[u8]) {
    if let Err(e) = hostcalls::set_buffer(proxy_wasm::types::BufferType::HttpResponseBody, start, size, value) {
        log::warn!("cannot set response body: {e:?}");
    }
}

#[link(wasm_import_module = "env")]
extern "C" {
    #[allow(clashing_extern_declarations)]
    fn proxy_set_property(path_data: *const u8, path_size: usize, value_data: *const u8, value_size: usize) -> u32;
    #[allow(clashing_extern_declarations)]
    fn proxy_get_property(path_data: *const u8, path_size: usize, return_data: *mut *mut u8, return_size: *mut usize) -> u32;
}

/// A host property, `None` on any status but Ok.
pub fn property(path: &[&str]) -> Option<Vec<u8>> {
    let serialized = path.join("\0");
    let mut data: *mut u8 = std::ptr::null_mut();
    let mut size: usize = 0;
    // SAFETY: the host writes a buffer it allocated through this module's
    // `proxy_on_memory_allocate` (Rust's allocator); we take ownership of it.
    let status = unsafe { proxy_get_property(serialized.as_ptr(), serialized.len(), &mut data, &mut size) };
    if status != 0 || data.is_null() {
        return None;
    }
    // SAFETY: see above; `size` bytes were allocated and written at `data`.
    Some(unsafe { Vec::from_raw_parts(data, size, size) })
}

/// Sets `wasm.<name>` in the stream's filter state; the host status on failure.
pub fn set_filter_state(name: &str, value: &[u8]) -> Result<(), u32> {
    // A one-element property path is the name itself (no separators).
    // SAFETY: both buffers outlive the call; the host copies them.
    let status = unsafe { proxy_set_property(name.as_ptr(), name.len(), value.as_ptr(), value.len()) };
    if status == 0 {
        Ok(())
    } else {
        Err(status)
    }
}

/// The client's address as Envoy established it (`source.address`: the
/// peer, or the address `xff_num_trusted_hops` trusted), without the port.
/// Never a client header.
pub fn client_address() -> String {
    let raw = property(&["source", "address"]).map(lossy).unwrap_or_default();
    strip_port(&raw).to_string()
}

fn strip_port(addr: &str) -> &str {
    if let Some(rest) = addr.strip_prefix('[') {
        return rest.split_once(']').map_or(addr, |(ip, _)| ip);
    }
    match addr.rsplit_once(':') {
        Some((ip, port)) if !ip.contains(':') && port.bytes().all(|b| b.is_ascii_digit()) => ip,
        _ => addr,
    }
}
