//! `cargo xtask soak`: `examples/soak.rs` where KVM boots Linux (directly or in the nested test
//! host, through [`crate::run::execute`]), its summary written into `docs/SPEC.md`.
//!
//! Not part of `cargo xtask test`: it runs for about 20 minutes by default.

use std::fs;

use anyhow::{Context, Result};

use crate::run::{self, RunnerArgs};
use crate::util;

/// `cargo xtask soak` options.
#[derive(Debug, clap::Args)]
pub struct SoakArgs {
    /// Stop starting cycles after this many minutes.
    #[arg(long, default_value_t = 20, value_name = "MIN")]
    minutes: u64,
    /// At most this many cycles.
    #[arg(long, default_value_t = 1000, value_name = "N")]
    cycles: u32,
    /// Seed of the random choices (default: from the clock; printed either way).
    #[arg(long)]
    seed: Option<u64>,
    /// Do not rewrite docs/SPEC.md.
    #[arg(long)]
    no_spec: bool,
    #[command(flatten)]
    runner: RunnerArgs,
}

const BEGIN: &str = "<!-- soak: begin (written by `cargo xtask soak`) -->";
const END: &str = "<!-- soak: end -->";

/// `cargo xtask soak`.
pub fn run(mut args: SoakArgs) -> Result<()> {
    let root = util::workspace_root();
    let example = run::build_example(&root, "soak")?;
    let mut argv = vec![
        "--minutes".to_string(),
        args.minutes.to_string(),
        "--cycles".to_string(),
        args.cycles.to_string(),
    ];
    if let Some(seed) = args.seed {
        argv.extend(["--seed".to_string(), seed.to_string()]);
    }
    // The whole run must fit: the cycles, the test host's boot and one slow last cycle.
    args.runner.timeout = args.runner.timeout.max(args.minutes * 60 + 900);
    let result = run::execute("soak", &example, &argv, &args.runner);
    // The summary is written even when cycles failed or leaked: that is what a soak is for.
    let scratch = match &result {
        Ok(s) => s.clone(),
        Err(_) => util::workspace_root()
            .join("target/testhost")
            .join(format!("soak-{}", std::process::id())),
    };
    let summary = fs::read_to_string(scratch.join("soak.md"));
    if let (Ok(summary), false) = (&summary, args.no_spec) {
        let spec_path = root.join("docs/SPEC.md");
        let spec = fs::read_to_string(&spec_path).context("reading docs/SPEC.md")?;
        let where_ = match args.runner.runner {
            crate::test::KvmRunner::Direct => "directly on /dev/kvm",
            _ => "in the nested test host on our machines, directly where /dev/kvm boots Linux",
        };
        let section = format!(
            "{BEGIN}\n\nLast `cargo xtask soak` ({where_}, {} min budget, at commit {}):\n\n{}\n{END}",
            args.minutes,
            util::git_describe(),
            util::portable_paths(summary.trim_end()),
        );
        fs::write(
            &spec_path,
            util::replace_section(&spec, BEGIN, END, "Soak", &section),
        )?;
        println!("xtask soak: wrote the summary into docs/SPEC.md");
    }
    let _ = fs::remove_dir_all(&scratch);
    result.map(|_| ())
}
