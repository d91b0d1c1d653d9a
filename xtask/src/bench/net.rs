//! `cargo xtask bench net`: `examples/net_bench.rs` (a sandbox network's throughput, the
//! exposed-port round trip and the create time a network adds, each against the same without a
//! VM; an egress policy's connect and resolve + connect times against no policy, and its DNS
//! answer → pin-set time) where KVM boots Linux, directly or in the nested test host through [`crate::run::execute`];
//! its summary goes into `docs/SPEC.md`. Nothing asserts on time: the command fails only if the
//! runs fail.

use anyhow::{bail, Result};

use crate::run::RunnerArgs;

/// `cargo xtask bench net` options.
#[derive(Debug, clap::Args)]
pub struct NetArgs {
    /// MiB per throughput transfer (guest → a sink in another netns, and the same without a VM).
    #[arg(long, default_value_t = 32, value_name = "MIB")]
    mib: u32,
    /// Measured transfers each way, after one warm-up.
    #[arg(long, default_value_t = 3, value_name = "N")]
    transfers: usize,
    /// Measured round trips per kind (exposed port and host netns; new and open connection),
    /// and measured connects and resolve + connects per sandbox in the policy part.
    #[arg(long, default_value_t = 50, value_name = "N")]
    requests: usize,
    /// Measured create rounds (without a network, with egress, without egress), after a warm-up.
    #[arg(long, default_value_t = 5, value_name = "N")]
    rounds: usize,
    /// Do not rewrite docs/SPEC.md.
    #[arg(long)]
    no_spec: bool,
    #[command(flatten)]
    runner: RunnerArgs,
}

pub const BEGIN: &str = "<!-- bench-net: begin (written by `cargo xtask bench net`) -->";
pub const END: &str = "<!-- bench-net: end -->";
const HEADING: &str = "Networks: throughput, exposed ports and create cost";

impl NetArgs {
    /// The example's arguments.
    fn example_argv(&self) -> Result<Vec<String>> {
        if self.mib == 0 || self.transfers == 0 || self.requests == 0 || self.rounds == 0 {
            bail!("--mib, --transfers, --requests and --rounds must be at least 1");
        }
        Ok(vec![
            "--mib".into(),
            self.mib.to_string(),
            "--transfers".into(),
            self.transfers.to_string(),
            "--requests".into(),
            self.requests.to_string(),
            "--rounds".into(),
            self.rounds.to_string(),
        ])
    }

    /// How to run it again, as the report quotes it (defaults left out).
    fn command(&self) -> String {
        let mut c = String::from("cargo xtask bench net");
        for (flag, value, default) in [
            ("--mib", u64::from(self.mib), 32),
            ("--transfers", self.transfers as u64, 3),
            ("--requests", self.requests as u64, 50),
            ("--rounds", self.rounds as u64, 5),
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
    example: "net_bench",
    label: "bench-net",
    summary: "net.md",
    begin: BEGIN,
    end: END,
    heading: HEADING,
};

/// `cargo xtask bench net`.
pub fn run(args: NetArgs) -> Result<()> {
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
        args: NetArgs,
    }

    fn parse(argv: &[&str]) -> Result<NetArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("net").chain(argv.iter().copied())).map(|c| c.args)
    }

    #[test]
    fn defaults_and_flags_reach_the_example() {
        let a = parse(&[]).expect("defaults");
        assert_eq!(
            a.example_argv().expect("valid"),
            [
                "--mib",
                "32",
                "--transfers",
                "3",
                "--requests",
                "50",
                "--rounds",
                "5"
            ]
        );
        assert_eq!(a.command(), "cargo xtask bench net");
        assert!(!a.no_spec);
        let a = parse(&["--mib", "8", "--rounds", "2", "--no-spec"]).expect("flags");
        assert_eq!(
            a.example_argv().expect("valid"),
            [
                "--mib",
                "8",
                "--transfers",
                "3",
                "--requests",
                "50",
                "--rounds",
                "2"
            ]
        );
        assert_eq!(a.command(), "cargo xtask bench net --mib 8 --rounds 2");
        assert!(a.no_spec);
    }

    #[test]
    fn bad_counts_are_refused() {
        assert!(parse(&["--mib", "-1"]).is_err());
        assert!(parse(&["--requests", "many"]).is_err());
        for flag in ["--mib", "--transfers", "--requests", "--rounds"] {
            let a = parse(&[flag, "0"]).expect("parses");
            assert!(a.example_argv().is_err(), "{flag} 0 was accepted");
        }
    }

    #[test]
    fn the_section_carries_markers_commit_and_portable_paths() {
        let home = util::cache_dir();
        let s = BENCH.section(
            "cargo xtask bench net",
            "abc1234",
            &format!("| a | 1 MiB/s |\nrootfs in {}/guest\n\n", home.display()),
        );
        assert!(s.starts_with(BEGIN) && s.ends_with(END), "{s}");
        assert!(s.contains("at commit abc1234"), "{s}");
        assert!(s.contains("rootfs in <cache>/guest\n"), "{s}");
        let spec = util::replace_section("# Numeric promises\n", BEGIN, END, HEADING, &s);
        assert!(spec.contains(&format!("## {HEADING}\n\n{BEGIN}")), "{spec}");
        // A second run replaces the section instead of adding one.
        let again =
            util::replace_section(&spec, BEGIN, END, HEADING, &s.replace("abc1234", "def5678"));
        assert_eq!(again.matches(BEGIN).count(), 1, "{again}");
        assert!(
            again.contains("def5678") && !again.contains("abc1234"),
            "{again}"
        );
    }
}
