//! `cargo xtask demo`: the main job, end to end (`examples/agent_task.rs`, docs/demo.md).
//!
//! 1. Guest artifacts: [`crate::guest::ensure_artifacts`] (kernel, rootfs with the agent as
//!    `/sbin/init`), built if missing.
//! 2. Host tools the example uses on its side (`git`, `sqlite3`, `tar`), installed if missing.
//! 3. `sandbox-vmm` and the example, built with cargo.
//! 4. Where to run: [`crate::run::execute`], as `cargo xtask run --example agent_task` would:
//!    directly if this machine's `/dev/kvm` boots Linux (the probe `cargo xtask test` caches),
//!    else inside the nested test host ([`crate::testhost`]), whose exit status becomes the
//!    demo's.

use anyhow::Result;

use crate::run::{self, RunnerArgs};
use crate::util;

/// `cargo xtask demo` options.
#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    #[command(flatten)]
    runner: RunnerArgs,
}

/// `cargo xtask demo`: `cargo xtask run --example agent_task` with the host tools the example
/// uses on its side installed first.
pub fn run(args: DemoArgs) -> Result<()> {
    let missing: Vec<&str> = [("git", "git"), ("sqlite3", "sqlite3"), ("tar", "tar")]
        .into_iter()
        .filter(|(cmd, _)| !on_path(cmd))
        .map(|(_, pkg)| pkg)
        .collect();
    if !missing.is_empty() {
        util::apt_install(&missing)?;
    }
    let example = run::build_example(&util::workspace_root(), "agent_task")?;
    let scratch = run::execute("demo", &example, &[], &args.runner)?;
    let _ = std::fs::remove_dir_all(scratch);
    Ok(())
}

fn on_path(cmd: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(cmd).is_file()))
        .unwrap_or(false)
}
