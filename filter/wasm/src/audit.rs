//! Audit hand-off (DESIGN §10): at the point a request's decision is final,
//! [`record`] sets the filter state `wasm.mcp_audit` to the core's
//! [`AuditRecord`] JSON; Envoy's gRPC access logger ships it to the control
//! plane with the status, duration and bytes of the request.
//!
//! Per VM it keeps the origin (Envoy `node.id` and a random VM id drawn at
//! first use, so a restarted Envoy or another worker never reuses one) and a
//! sequence number that advances only when the filter state was really set:
//! every number the control plane does not see is a lost entry.
//!
//! The [`RequestFacts`] are described once, when the request arrives, and
//! travel with it: nothing re-reads the request here.

use std::cell::RefCell;
use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};

use mcp_filter_core::audit::{AuditRecord, RequestFacts, VmOrigin, PROPERTY, RESULT_PROPERTY};
use proxy_wasm::hostcalls;
use proxy_wasm::types::MetricType;

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
            .find_map(|path| host::property(&path).filter(|b| !b.is_empty()))
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

/// This VM's origin (node id, VM id).
pub fn origin() -> VmOrigin {
    STATE.with(|cell| cell.borrow_mut().get_or_insert_with(AuditState::new).origin.clone())
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

/// Records the final decision on the current request (`reason`: `None`
/// for a forwarded or answered request, else the denial's code).
pub fn record(facts: &RequestFacts, reason: Option<&str>, rate_limit_remaining: Option<u32>) {
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
    STATE.with(|cell| {
        let mut guard = cell.borrow_mut();
        let state = guard.get_or_insert_with(AuditState::new);
        let record: AuditRecord = facts.record_reason(&state.origin, state.next_seq, reason, rate_limit_remaining);
        match host::set_filter_state(PROPERTY, &record.to_json()) {
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

/// Records the upstream status of a tool call (the client got 200 and a
/// tool result); the control plane takes the row's outcome from it.
pub fn record_result(upstream_status: u32) {
    let json = format!("{{\"upstream_status\":{upstream_status}}}");
    if let Err(status) = host::set_filter_state(RESULT_PROPERTY, json.as_bytes()) {
        log::warn!("cannot set the tool result filter state (status {status})");
    }
}

fn increment(id: u32) {
    if id != 0 {
        let _ = hostcalls::increment_metric(id, 1);
    }
}

/// Whether this stream already carries an audit record (Envoy answers a
/// property path that is no attribute from the `wasm.`-prefixed filter state).
fn already_recorded() -> bool {
    host::property(&[PROPERTY]).is_some_and(|v| !v.is_empty())
}
