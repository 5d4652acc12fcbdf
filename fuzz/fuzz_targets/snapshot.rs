//! The snapshot parser (streaming and whole-body) and the delta applier:
//! any bytes. A snapshot both parsers accept compiles to the same policy;
//! any body applied as a delta to a fixed policy either is refused or gives
//! a policy whose every token resolves by its hash, read whole or in
//! 3-byte pieces alike.
#![no_main]

use std::io::Read;

use libfuzzer_sys::fuzz_target;
use mcp_filter_core::policy::Policy;

/// The base the deltas apply to: two tokens of two users.
const BASE: &[u8] = br#"{"version":"base","generated_at":1,"limits":{"window_seconds":60,"classes":{"log":10,"artifact":10,"write":5,"default":30}},"token_count":2,"tokens":[["0000000000000001","4bf5122f344554c53bde2ebb8cd2b7e3d1600ad631c385a5d7cce23c7785459a","u1",2000000000,true,{"p1":null}],["0000000000000002","dbc1b4c900ffe48d575b5da5c638040125f65db0fe3e24494b76ea986457d986","u2",2000000000,false,{"p1":100,"p2":null}]],"users":{"u1":{"read_credential":"r1"},"u2":{}}}"#;

/// Hands out three bytes per read.
struct Trickle<'a>(&'a [u8]);

impl Read for Trickle<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.0.len().min(buf.len()).min(3);
        let (head, rest) = self.0.split_at(n);
        buf[..n].copy_from_slice(head);
        self.0 = rest;
        Ok(n)
    }
}

fuzz_target!(|data: &[u8]| {
    let streamed = Policy::from_reader(data);
    let whole = Policy::from_json(data);
    if let (Ok(a), Ok(b)) = (&streamed, &whole) {
        assert_eq!(a.version, b.version);
        assert_eq!(a.token_count(), b.token_count());
    }
    let Ok(base) = Policy::from_json(BASE) else { return };
    let whole = base.apply_delta(data);
    let trickled = base.apply_delta(Trickle(data));
    assert_eq!(whole.is_ok(), trickled.is_ok());
    if let (Ok(a), Ok(b)) = (whole, trickled) {
        assert_eq!(a.to_snapshot(), b.to_snapshot());
        for t in a.to_snapshot().tokens {
            // The canonical form gives the 16 bytes of the hash a grant keeps.
            let mut hash = [0u8; 32];
            for (i, byte) in hash.iter_mut().take(16).enumerate() {
                *byte = t.token_hash.get(2 * i..2 * i + 2).and_then(|h| u8::from_str_radix(h, 16).ok()).unwrap_or_default();
            }
            let found = a.grant_by_hash(&hash).map(|(_, g)| g.token_id().to_owned());
            assert_eq!(found.as_deref(), Some(t.token_id.as_str()));
        }
    }
});
