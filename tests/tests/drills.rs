//! The failure drills in their short form (tests/src/drills.rs; `make
//! drills` runs the long one into bench/drills.md): under a steady mixed
//! load through real Envoy, Redis, the control plane, Postgres and the
//! upstream are each killed with SIGKILL and started again, Redis and the
//! control plane together, and Envoy is hot-restarted. Every promise is
//! checked from measurements.

use mcp_gateway_tests::drills::{self, Fault, Settings};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_promise_holds_through_kills_and_restarts_under_load() {
    let settings = Settings::short();
    let faults = settings.faults.clone();
    let report = drills::run(settings).await.expect("the drills ran");
    println!("{}", report.markdown("cargo test --test drills"));
    let faults: Vec<Fault> = match std::env::var("MCP_DRILLS_ONLY") {
        Ok(only) => faults.into_iter().enumerate().filter(|(i, _)| only.split(',').any(|n| n.trim() == i.to_string())).map(|(_, f)| f).collect(),
        Err(_) => faults,
    };
    assert_eq!(report.drills.len(), faults.len());
    for (d, fault) in report.drills.iter().zip(&faults) {
        // The load was real: requests flowed, the limits were reached,
        // and the denials and passthrough answered.
        assert!(d.requests > 100, "{}: only {} requests", d.name, d.requests);
        assert!(d.statuses.get(&429).copied().unwrap_or(0) > 0, "{}: the load never reached a limit: {:?}", d.name, d.statuses);
        assert!(d.statuses.get(&401).copied().unwrap_or(0) > 0, "{}: no unknown-token denials: {:?}", d.name, d.statuses);
        if let Fault::Kill(parts) = fault {
            if parts.contains(&drills::Part::Redis) || parts.contains(&drills::Part::ControlPlane) {
                assert!(d.degraded_decisions > 0, "{}: the limiter was away but nothing was decided locally", d.name);
            }
        }
    }
    let problems = report.problems();
    assert!(problems.is_empty(), "promises broken:\n{}", problems.join("\n"));
}
