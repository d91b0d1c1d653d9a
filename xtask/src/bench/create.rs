//! `cargo xtask bench create`: `examples/create_bench.rs` (a writable root as a qcow2 overlay
//! against a full copy, overlay creation alone, the warm exec round trip) where KVM boots Linux,
//! directly or in the nested test host through [`crate::run::execute`]; its summary goes into
//! `docs/SPEC.md`. Nothing asserts on time: the command fails only if the runs fail.

use anyhow::{bail, Result};

use crate::run::RunnerArgs;

/// `cargo xtask bench create` options.
#[derive(Debug, clap::Args)]
pub struct CreateArgs {
    /// Measured rounds (one sandbox of each kind per round), after one warm-up round.
    #[arg(long, default_value_t = 5, value_name = "N")]
    rounds: usize,
    /// Measured warm exec round trips (and local fork+execs), after 5 warm-ups.
    #[arg(long, default_value_t = 50, value_name = "N")]
    execs: usize,
    /// Virtual size of the grown base, MiB (the rootfs, extended sparse).
    #[arg(long, default_value_t = 4096, value_name = "MIB")]
    big_base_mib: u64,
    /// Do not rewrite docs/SPEC.md.
    #[arg(long)]
    no_spec: bool,
    #[command(flatten)]
    runner: RunnerArgs,
}

pub const BEGIN: &str = "<!-- bench-create: begin (written by `cargo xtask bench create`) -->";
pub const END: &str = "<!-- bench-create: end -->";
const HEADING: &str = "Create: writable root as an overlay against a copy";

impl CreateArgs {
    /// The example's arguments.
    fn example_argv(&self) -> Result<Vec<String>> {
        if self.rounds == 0 || self.execs == 0 {
            bail!("--rounds and --execs must be at least 1");
        }
        Ok(vec![
            "--rounds".into(),
            self.rounds.to_string(),
            "--execs".into(),
            self.execs.to_string(),
            "--big-base-mib".into(),
            self.big_base_mib.to_string(),
        ])
    }

    /// How to run it again, as the report quotes it (defaults left out).
    fn command(&self) -> String {
        let mut c = String::from("cargo xtask bench create");
        for (flag, value, default) in [
            ("--rounds", self.rounds as u64, 5),
            ("--execs", self.execs as u64, 50),
            ("--big-base-mib", self.big_base_mib, 4096),
        ] {
            if value != default {
                c.push_str(&format!(" {flag} {value}"));
            }
        }
        c
    }
}

/// This benchmark's example and report.
const BENCH: super::example::ExampleBench = super::example::ExampleBench {
    example: "create_bench",
    label: "bench-create",
    summary: "create.md",
    begin: BEGIN,
    end: END,
    heading: HEADING,
};

/// `cargo xtask bench create`.
pub fn run(args: CreateArgs) -> Result<()> {
    BENCH.run(
        &args.example_argv()?,
        &args.command(),
        &args.runner,
        args.no_spec,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: CreateArgs,
    }

    fn parse(argv: &[&str]) -> Result<CreateArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("create").chain(argv.iter().copied())).map(|c| c.args)
    }

    #[test]
    fn defaults_and_flags_reach_the_example() {
        let a = parse(&[]).expect("defaults");
        assert_eq!(
            a.example_argv().expect("valid"),
            ["--rounds", "5", "--execs", "50", "--big-base-mib", "4096"]
        );
        assert_eq!(a.command(), "cargo xtask bench create");
        assert!(!a.no_spec);
        let a = parse(&["--rounds", "3", "--big-base-mib", "8192", "--no-spec"]).expect("flags");
        assert_eq!(
            a.example_argv().expect("valid"),
            ["--rounds", "3", "--execs", "50", "--big-base-mib", "8192"]
        );
        assert_eq!(
            a.command(),
            "cargo xtask bench create --rounds 3 --big-base-mib 8192"
        );
        assert!(a.no_spec);
    }

    #[test]
    fn bad_counts_are_refused() {
        assert!(parse(&["--rounds", "x"]).is_err());
        assert!(parse(&["--rounds", "0"])
            .expect("parses")
            .example_argv()
            .is_err());
        assert!(parse(&["--execs", "0"])
            .expect("parses")
            .example_argv()
            .is_err());
    }

    #[test]
    fn the_section_carries_markers_commit_and_portable_paths() {
        let home = util::cache_dir();
        let s = BENCH.section(
            "cargo xtask bench create",
            "abc1234",
            &format!("| a | 1 ms |\nbase in {}/guest\n\n", home.display()),
        );
        assert!(s.starts_with(BEGIN) && s.ends_with(END), "{s}");
        assert!(s.contains("at commit abc1234"), "{s}");
        assert!(s.contains("base in <cache>/guest\n"), "{s}");
        let spec = util::replace_section("# Numeric promises\n", BEGIN, END, HEADING, &s);
        assert!(spec.contains(&format!("## {HEADING}\n\n{BEGIN}")), "{spec}");
    }
}
