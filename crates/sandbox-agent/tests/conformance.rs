//! The backend conformance suite against the agent running as a normal process (Unix socket).
//! Runs anywhere: no VM, no root. One named test per check (`harness = false`, see
//! `sandbox_core::conformance::Suite`).

mod common;

use sandbox_core::conformance::{self, Suite};

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let suite = Suite::new(common::LocalHarness::new, rt.handle().clone());
    let mut trials = suite.checks();
    trials.push(suite.leaves_nothing_behind());
    let conclusion = conformance::run_trials(trials);
    suite.finish();
    conclusion.exit();
}
