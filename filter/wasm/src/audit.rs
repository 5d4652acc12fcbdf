//! Audit hand-off (DESIGN §10): at the point a request's decision is final,
//! [`record`] sets the filter state `wasm.mcp_audit` to the core's
//! [`AuditRecord`] JSON; Envoy's gRPC access logger ships it to the control
//! plane with the status, duration and bytes of the request.
//!
//! Per VM it keeps the origin (Envoy `node.id` and a random VM id drawn at
//! first use, so a restarted Envoy or another worker never reuses one) and a
//! sequence number that advances only when the filter state was really set:
//! every number the control plane does not see is a lost entry.

use std::cell::RefCell;
use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};

use mcp_filter_core::audit::{AuditRecord, RequestFacts, Verdict, VmOrigin, PROPERTY};
use mcp_filter_core::pipeline::RequestHead;
use mcp_filter_core::route::RouteTable;
use proxy_wasm::hostcalls;
use proxy_wasm::types::MetricType;

use crate::feed::Shared;
use crate::host;

/// The VM's audit state.
struct AuditState {
    origin: VmOrigin,
    /// Sequence number of the next record (from 1).
    next_seq: u64,
    /// `wasmcustom.mcp_audit_records`: records set.
    records_metric: u32,
    /// `wasmcustom.mcp_audit_errors`: records the host refused.
    errors_metric: u32,
    /// `wasmcustom.mcp_audit_repeats`: second decisions on one request.
    repeats_metric: u32,
}

thread_local! {
    // One VM is single-threaded; this is per VM.
    static STATE: RefCell<Option<AuditState>> = const { RefCell::new(None) };
}

impl AuditState {
    fn new() -> Self {
        // Envoy 1.40 answers `xds.node.id`; older hosts `node.id`.
        let node_id = [vec!["xds", "node", "id"], vec!["node", "id"]]
            .into_iter()
            .find_map(|path| property(&path).filter(|b| !b.is_empty()))
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        let metric = |n: &str| hostcalls::define_metric(MetricType::Counter, n).unwrap_or(0);
        Self {
            origin: VmOrigin { node_id, vm_id: random_vm_id() },
            next_seq: 1,
            records_metric: metric("mcp_audit_records"),
            errors_metric: metric("mcp_audit_errors"),
            repeats_metric: metric("mcp_audit_repeats"),
        }
    }
}

/// 128 random bits as hex. `RandomState` draws its keys from the host's
/// `random_get` (WASI), which Envoy backs with its CSPRNG; no extra crate.
fn random_vm_id() -> String {
    let word = |salt: u64| {
        let mut h = RandomState::new().build_hasher();
        h.write_u64(salt);
        h.write_i64(host::now_unix_ms());
        h.finish()
    };
    format!("{:016x}{:016x}", word(1), word(2))
}

/// Records the final decision on the current request. Reads the request
/// head from the host, so call it before the request is rewritten.
pub fn record(shared: &Shared, verdict: Verdict<'_>, rate_limit_remaining: Option<u32>) {
    // One record per request: a second decision on the same stream would
    // overwrite the first record and leave its number missing (a false gap).
    if already_recorded() {
        STATE.with(|cell| {
            if let Some(state) = cell.borrow().as_ref() {
                increment(state.repeats_metric);
            }
        });
        log::warn!("a second decision on one request was not audited again");
        return;
    }
    let headers = host::request_headers();
    let value = |name: &str| headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
    let all = |name: &str| -> Vec<&str> { headers.iter().filter(|(k, _)| k == name).map(|(_, v)| v.as_str()).collect() };
    let authorization = all("authorization");
    let cookie = all("cookie");
    let head = RequestHead {
        method: value(":method").unwrap_or_default(),
        path: value(":path").unwrap_or_default(),
        authorization: &authorization,
        cookie: &cookie,
    };
    let config = shared.config();
    let default_routes;
    let routes = match &config {
        Some(c) => &c.routes,
        None => {
            default_routes = RouteTable::default();
            &default_routes
        }
    };
    let policy = shared.policy();
    let facts = RequestFacts::describe(&head, policy.as_deref(), routes);
    STATE.with(|cell| {
        let mut guard = cell.borrow_mut();
        let state = guard.get_or_insert_with(AuditState::new);
        let record: AuditRecord = facts.record(&state.origin, state.next_seq, verdict, rate_limit_remaining);
        match set_filter_state(PROPERTY, &record.to_json()) {
            Ok(()) => {
                state.next_seq += 1;
                increment(state.records_metric);
            }
            Err(status) => {
                increment(state.errors_metric);
                log::warn!("cannot set the audit filter state (status {status})");
            }
        }
    });
}

fn increment(id: u32) {
    if id != 0 {
        let _ = hostcalls::increment_metric(id, 1);
    }
}

#[link(wasm_import_module = "env")]
extern "C" {
    // Declared here rather than through `hostcalls::{set,get}_property`,
    // which panic (aborting the VM) on statuses they do not expect.
    #[allow(clashing_extern_declarations)]
    fn proxy_set_property(path_data: *const u8, path_size: usize, value_data: *const u8, value_size: usize) -> u32;
    #[allow(clashing_extern_declarations)]
    fn proxy_get_property(path_data: *const u8, path_size: usize, return_data: *mut *mut u8, return_size: *mut usize) -> u32;
}

/// Whether this stream already carries an audit record (Envoy answers a
/// property path that is no attribute from the `wasm.`-prefixed filter state).
fn already_recorded() -> bool {
    property(&[PROPERTY]).is_some_and(|v| !v.is_empty())
}

/// A host property, `None` on any status but Ok (never panics, unlike
/// `hostcalls::get_property` on statuses it does not expect).
fn property(path: &[&str]) -> Option<Vec<u8>> {
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
fn set_filter_state(name: &str, value: &[u8]) -> Result<(), u32> {
    // A one-element property path is the name itself (no separators).
    // SAFETY: both buffers outlive the call; the host copies them.
    let status = unsafe { proxy_set_property(name.as_ptr(), name.len(), value.as_ptr(), value.len()) };
    if status == 0 {
        Ok(())
    } else {
        Err(status)
    }
}
