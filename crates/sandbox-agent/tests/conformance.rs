//! The backend conformance suite against the agent running as a normal process (Unix socket).
//! Runs anywhere: no VM, no root. One named test per check (`harness = false`, see
//! `sandbox_core::conformance::Suite`).

mod common;

fn main() {
    sandbox_core::conformance::main(common::LocalHarness::new, |_| Vec::new())
}
