//! Path canonicalization and route lookup: any `:path` and method. A path
//! the canonical check accepts and the table routes becomes an upstream
//! path that stays under `/api/` and carries no dot segment or escape.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mcp_filter_core::path::{self, Area};
use mcp_filter_core::route::{Lookup, RouteTable};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let (method, raw) = text.split_once(' ').unwrap_or(("GET", &text));
    let routes = RouteTable::default();
    if let Area::Mcp { rest, query } = path::area(raw) {
        if path::check_canonical(rest).is_ok() {
            if let Lookup::Found { route, params } = routes.lookup(method, rest) {
                let r = routes.get(route).expect("a found route exists");
                let up = r.upstream_path(&params, query);
                let before_query = up.split('?').next().unwrap_or_default();
                assert!(before_query.starts_with("/api/"), "upstream path {up:?} left /api/");
                assert!(!before_query.contains('%') && !before_query.split('/').any(|s| s == ".." || s == "."), "upstream path {up:?}");
                for id in [&params.project, &params.build, &params.job].into_iter().flatten() {
                    assert!(path::is_uuid(id));
                }
            }
        }
    }
});
