//! The backend conformance suite against the agent running as a normal process (Unix socket).
//! Runs anywhere: no VM, no root.

mod common;

use sandbox_core::conformance;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn process_backend_passes_the_conformance_suite() {
    let h = common::LocalHarness::new();
    conformance::run_all(&h).await;
}
