//! `sandbox-vmm`: runs one VM from a JSON config and exits with a status that says why it ended.
//!
//! ```text
//! sandbox-vmm --config vm.json      # or: sandbox-vmm vm.json, or the JSON on stdin
//! ```
//!
//! Exit status: 0 guest poweroff, 3 guest reset, 4 triple fault, 5 KVM internal error,
//! 6 stopped by the host, 1 VMM error (bad config, /dev/kvm, kernel load...), 2 usage error.
//! Logs go to stderr (`RUST_LOG=debug` for details), at most `--log-cap-bytes` of them (default
//! 16 MiB; past the cap one marker line is written and later log events are dropped, so a guest
//! cannot grow the log without bound); the final "VM ended" report is always written. The console
//! goes where the config says.

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Mutex;

use anyhow::Context;
use clap::Parser;
use sandbox_vmm::logging::{CappedLog, DEFAULT_LOG_CAP_BYTES};
use sandbox_vmm::seccomp::ThreadKind;
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
    /// Most bytes of log output on stderr; later log events are dropped after one marker line.
    #[arg(long, default_value_t = DEFAULT_LOG_CAP_BYTES)]
    log_cap_bytes: u64,
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
    warn_if_larger_than_host(&resources);
    let seccomp = resources.seccomp;
    let mut vm = build(resources).context("building the VM")?;
    vm.start().context("starting the VM")?;
    // The vCPU and device threads filtered themselves; this thread only waits and tears down
    // from here on (docs/jail.md).
    sandbox_vmm::seccomp::apply(ThreadKind::Main, seccomp)
        .context("installing the seccomp filter")?;
    Ok(vm.wait())
}

/// A VM may be larger than its host (guest RAM is mapped without reserve, vCPUs are threads),
/// but then it runs slowly or is killed for memory later: say so up front.
fn warn_if_larger_than_host(resources: &VmResources) {
    let host_ram = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
        m.lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kib| kib * 1024)
    });
    if let Some(host) = host_ram.filter(|&h| resources.memory_bytes > h) {
        tracing::warn!(
            guest_mib = resources.memory_bytes >> 20,
            host_mib = host >> 20,
            "guest RAM is larger than the host's RAM"
        );
    }
    if let Ok(cpus) = std::thread::available_parallelism() {
        if usize::from(resources.vcpus) > cpus.get() {
            tracing::warn!(
                vcpus = resources.vcpus,
                host_cpus = cpus.get(),
                "more vCPUs than host CPUs this process may use"
            );
        }
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    // Every log event goes through one capped writer (the Mutex serializes the vCPU and device
    // threads, and each event is one write, so the cut falls between lines).
    tracing_subscriber::fmt()
        .with_writer(Mutex::new(CappedLog::new(
            std::io::stderr(),
            args.log_cap_bytes,
        )))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
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
