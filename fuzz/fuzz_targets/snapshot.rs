//! The snapshot parser (streaming and whole-body): any bytes. A snapshot
//! both parsers accept compiles to the same policy.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mcp_filter_core::policy::Policy;

fuzz_target!(|data: &[u8]| {
    let streamed = Policy::from_reader(data);
    let whole = Policy::from_json(data);
    if let (Ok(a), Ok(b)) = (&streamed, &whole) {
        assert_eq!(a.version, b.version);
        assert_eq!(a.token_count(), b.token_count());
    }
});
