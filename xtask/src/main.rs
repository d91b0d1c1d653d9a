//! `cargo xtask`: guest artifacts, tests across tiers, the demo and benchmarks.
//!
//! One binary, one file per task (the rust-analyzer `xtask` pattern). Slow artifacts live in a
//! cache outside the checkout (see [`util::cache_dir`]), keyed by a hash of their inputs.

mod bench;
mod demo;
mod guest;
mod run;
mod soak;
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
    /// Soak (not part of `test`): create → exec → destroy cycles with kill -9 of the VMM or of
    /// the caller at random points, the host inventory checked after each (examples/soak.rs);
    /// the summary goes into docs/SPEC.md.
    Soak(soak::SoakArgs),
    /// Benchmarks (docs/bench.md): `bench boot` runs our VMM and QEMU microvm side by side;
    /// `bench create` measures overlay against copy create times and the exec round trip.
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
        Cmd::Soak(args) => soak::run(args),
    }
}

/// Committed docs stand alone: they cite only files in the repository and hold no path of one
/// machine (the issue of docs/testing.md's readers on another machine).
#[cfg(test)]
mod docs_tests {
    use std::path::Path;

    fn docs() -> Vec<(String, String)> {
        let root = crate::util::workspace_root();
        let mut files = vec![root.join("README.md")];
        for e in std::fs::read_dir(root.join("docs")).expect("docs/ exists") {
            let p = e.expect("readable docs/").path();
            if p.extension().is_some_and(|x| x == "md") {
                files.push(p);
            }
        }
        files
            .into_iter()
            .map(|p| {
                let text = std::fs::read_to_string(&p).expect("readable doc");
                (p.display().to_string(), text)
            })
            .collect()
    }

    #[test]
    fn docs_hold_no_machine_paths() {
        for (path, text) in docs() {
            for bad in ["/root/.cache", "/work/", "/home/", "../shared"] {
                assert!(
                    !text.contains(bad),
                    "{path} contains {bad:?}: write <cache>, <checkout> or a repo-relative path"
                );
            }
        }
    }

    /// Every request cap of the SDK (`pub const MAX_*` in sandbox-core's exec.rs and file.rs)
    /// is in the caps list of docs/embedding.md §5 (chunk sizes are not caps a request hits).
    #[test]
    fn embedding_md_lists_every_request_cap() {
        let root = crate::util::workspace_root();
        let guide =
            std::fs::read_to_string(root.join("docs/embedding.md")).expect("docs/embedding.md");
        for file in ["exec.rs", "file.rs"] {
            let src = std::fs::read_to_string(root.join("crates/sandbox-core/src").join(file))
                .expect("sandbox-core source");
            for line in src.lines() {
                let Some(rest) = line.strip_prefix("pub const MAX_") else {
                    continue;
                };
                let name = format!("MAX_{}", rest.split(':').next().unwrap_or_default());
                if name.ends_with("_CHUNK_BYTES") {
                    continue;
                }
                assert!(
                    guide.contains(&format!("`{name}`")),
                    "docs/embedding.md §5 does not list the cap {name} ({file})"
                );
            }
        }
    }

    /// Every field of `KvmRuntimeConfig` has a row in docs/runtime.md's configuration table.
    #[test]
    fn runtime_md_lists_every_config_field() {
        let root = crate::util::workspace_root();
        let doc = std::fs::read_to_string(root.join("docs/runtime.md")).expect("docs/runtime.md");
        let table: Vec<&str> = doc.lines().filter(|l| l.starts_with("| `")).collect();
        let src = std::fs::read_to_string(root.join("crates/sandbox-kvm/src/runtime/config.rs"))
            .expect("config.rs");
        let body = src
            .split_once("pub struct KvmRuntimeConfig {")
            .and_then(|(_, rest)| rest.split_once("\n}"))
            .map(|(body, _)| body)
            .expect("the struct");
        let fields: Vec<&str> = body
            .lines()
            .filter_map(|l| l.trim().strip_prefix("pub "))
            .filter_map(|l| l.split_once(':').map(|(name, _)| name))
            .collect();
        assert!(fields.len() > 5, "{fields:?}");
        for f in fields {
            let cell = format!("`{f}`");
            assert!(
                table
                    .iter()
                    .any(|row| row.split('|').nth(1).is_some_and(|c| c.contains(&cell))),
                "docs/runtime.md's configuration table has no row for {f}"
            );
        }
    }

    #[test]
    fn docs_cite_only_files_in_the_repository() {
        let root = crate::util::workspace_root();
        for (path, text) in docs() {
            for word in text.split(|c: char| !(c.is_ascii_alphanumeric() || "_./-".contains(c))) {
                let Some(name) = word.strip_suffix(".md") else {
                    continue;
                };
                if name.is_empty() || word.starts_with("//") {
                    continue;
                }
                let found = [root.as_path(), &root.join("docs")]
                    .iter()
                    .any(|dir| dir.join(word).is_file())
                    || Path::new(word).is_file();
                assert!(found, "{path} cites {word}, which is not in the repository");
            }
        }
    }
}
