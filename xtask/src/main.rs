//! `cargo xtask`: guest artifacts, tests across tiers, the demo and benchmarks.
//!
//! One binary, one file per task (the rust-analyzer `xtask` pattern). Slow artifacts live in a
//! cache outside the checkout (see [`util::cache_dir`]), keyed by a hash of their inputs.

mod bench;
mod demo;
mod guest;
mod run;
mod test;
mod testhost;
mod util;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "Project automation for the sandbox SDK")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build the guest artifacts (kernel, rootfs; both if no subcommand); cached by a hash of
    /// their inputs.
    Guest {
        #[command(subcommand)]
        what: Option<guest::GuestCmd>,
    },
    /// Run every test tier this machine can (plain, privileged, KVM; see docs/testing.md).
    Test(test::TestArgs),
    /// Run the main job: an agent task in a throwaway micro-VM (examples/agent_task.rs), in the
    /// nested test host where this machine's /dev/kvm cannot boot Linux (see docs/demo.md).
    Demo(demo::DemoArgs),
    /// Run an example (`--example quickstart`) or any program (`-- ./my-program args`) that
    /// creates sandboxes: directly where /dev/kvm boots Linux, else in the nested test host,
    /// with sandbox-vmm and the guest artifacts in SANDBOX_VMM, SANDBOX_KERNEL, SANDBOX_ROOTFS.
    Run(run::RunArgs),
    /// Benchmarks (docs/bench.md): `bench boot` runs our VMM and QEMU microvm side by side.
    Bench {
        #[command(subcommand)]
        what: bench::BenchCmd,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Guest { what } => guest::run(what),
        Cmd::Test(args) => test::run(args),
        Cmd::Bench { what } => bench::run(what),
        Cmd::Demo(args) => demo::run(args),
        Cmd::Run(args) => run::run(args),
    }
}
