//! `sandbox-vmm`: runs one VM from a JSON config and exits with a status that says why it ended.
//!
//! ```text
//! sandbox-vmm --config vm.json      # or: sandbox-vmm vm.json, or the JSON on stdin
//! ```
//!
//! Exit status: 0 guest poweroff, 3 guest reset, 4 triple fault, 5 KVM internal error,
//! 6 stopped by the host, 1 VMM error (bad config, /dev/kvm, kernel load...), 2 usage error.
//! Logs go to stderr (`RUST_LOG=debug` for details); the console goes where the config says.

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use sandbox_vmm::vmm::{build, ExitReason, VmConfig, VmResources};

/// Runs one micro-VM from a JSON config.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// VM config file (JSON); `-` or absent reads it from stdin.
    #[arg(long = "config", short = 'c')]
    config: Option<PathBuf>,
    /// VM config file, as a positional argument.
    #[arg(conflicts_with = "config")]
    config_path: Option<PathBuf>,
}

fn read_config(path: Option<PathBuf>) -> anyhow::Result<VmConfig> {
    let text = match path {
        Some(p) if p.as_os_str() != "-" => std::fs::read_to_string(&p)
            .with_context(|| format!("reading the VM config {}", p.display()))?,
        _ => {
            let mut s = String::new();
            std::io::stdin()
                .read_to_string(&mut s)
                .context("reading the VM config from stdin")?;
            s
        }
    };
    Ok(VmConfig::from_json(&text)?)
}

fn run(args: Args) -> anyhow::Result<ExitReason> {
    let config = read_config(args.config.or(args.config_path))?;
    let resources = VmResources::try_from(config)?;
    let mut vm = build(resources).context("building the VM")?;
    vm.start().context("starting the VM")?;
    Ok(vm.wait())
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let args = Args::parse();
    match run(args) {
        Ok(reason) => {
            if let ExitReason::InternalError(info) = &reason {
                eprintln!("sandbox-vmm: {info}");
            }
            eprintln!("sandbox-vmm: VM ended: {reason}");
            ExitCode::from(reason.exit_code())
        }
        Err(err) => {
            eprintln!("sandbox-vmm: error: {err:#}");
            ExitCode::from(1)
        }
    }
}
