//! What `bench create` and `bench net` share: build an example, run it where KVM boots Linux
//! ([`crate::run::execute`]), and put the summary it wrote into `docs/SPEC.md` between its
//! markers.

use std::fs;

use anyhow::{Context, Result};

use crate::run::{self, RunnerArgs};
use crate::util;

/// One example-driven benchmark and where its report goes.
#[derive(Debug, Clone, Copy)]
pub struct ExampleBench {
    /// The example's name in `examples/`.
    pub example: &'static str,
    /// The label of its run's log lines and scratch directory (`bench-create`).
    pub label: &'static str,
    /// The summary file the example writes into `SANDBOX_SCRATCH`.
    pub summary: &'static str,
    /// The SPEC.md section's markers and heading.
    pub begin: &'static str,
    pub end: &'static str,
    pub heading: &'static str,
}

impl ExampleBench {
    /// The SPEC.md section around the example's summary.
    pub fn section(&self, command: &str, commit: &str, summary: &str) -> String {
        format!(
            "{}\n\nLast `{command}` (at commit {commit}):\n\n{}\n{}",
            self.begin,
            util::portable_paths(summary.trim_end()),
            self.end
        )
    }

    /// Builds and runs the example with `argv`; unless `no_spec`, writes its summary into
    /// docs/SPEC.md, quoting `command` as the way to run it again.
    pub fn run(
        &self,
        argv: &[String],
        command: &str,
        runner: &RunnerArgs,
        no_spec: bool,
    ) -> Result<()> {
        let root = util::workspace_root();
        let example = run::build_example(&root, self.example)?;
        let commit = util::git_describe();
        let scratch = run::execute(self.label, &example, argv, runner)?;
        let summary = fs::read_to_string(scratch.join(self.summary))
            .with_context(|| format!("reading the summary in {}", scratch.display()))?;
        if !no_spec {
            let spec_path = root.join("docs/SPEC.md");
            let spec = fs::read_to_string(&spec_path).context("reading docs/SPEC.md")?;
            let section = self.section(command, &commit, &summary);
            fs::write(
                &spec_path,
                util::replace_section(&spec, self.begin, self.end, self.heading, &section),
            )?;
            println!("xtask {}: wrote the summary into docs/SPEC.md", self.label);
        }
        let _ = fs::remove_dir_all(&scratch);
        Ok(())
    }
}
