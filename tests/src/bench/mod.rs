//! `make bench`: the numbers of DESIGN §14, measured in one run on this
//! machine and written to `bench/results.md` and `bench/results.json`.
//! Every speed is a ratio against a baseline measured in the same run
//! (the same Envoy without the filter), never an absolute threshold.
//!
//! - [`load`]: one `wrk` run and its parsed throughput and latencies.
//! - [`upstream`]: a trivially fast upstream, so Envoy and the filter are
//!   what is measured.
//! - [`envoy_pair`]: two Envoys from the project's own configuration, with
//!   and without the filter, side by side.
//! - [`report`]: the results table and JSON.
//! - [`cpu`]: CPU time per request by process over a run.

pub mod cpu;
pub mod envoy_pair;
pub mod load;
pub mod report;
pub mod upstream;
