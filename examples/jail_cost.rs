//! What the VMM's jail costs at create time (docs/jail.md): `create()` to the agent's handshake
//! with the default jail and with `JailConfig::off()`, alternating, then the medians.
//!
//! `cargo xtask run --example jail_cost -- [rounds]` (default 5 rounds of one sandbox each way).

use std::time::{Duration, Instant};

use sandbox_core::{RootMode, Sandbox};
use sandbox_kvm::runtime::jail::JailConfig;
use sandbox_kvm::runtime::{KvmRuntime, KvmRuntimeConfig};

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let rounds: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(5);
    let state = tempfile::Builder::new().prefix("sbx-jail-").tempdir()?;
    let runtime = |jail: JailConfig| -> anyhow::Result<KvmRuntime> {
        Ok(KvmRuntime::new(
            KvmRuntimeConfig::builder()
                .state_dir(state.path())
                .create_deadline(Duration::from_secs(300))
                .jail(jail)
                .build()?,
        )?)
    };
    let jailed = runtime(JailConfig::default())?;
    let bare = runtime(JailConfig::off())?;
    let (mut with, mut without) = (Vec::new(), Vec::new());
    for round in 0..=rounds {
        for (rt, times) in [(&jailed, &mut with), (&bare, &mut without)] {
            // A read-only root: no disk copy, so the time is spawn, jail, boot and handshake.
            let spec = rt
                .spec_builder()
                .memory_mib(128)
                .root(RootMode::ReadOnly)
                .build()?;
            let t = Instant::now();
            let sb = rt.create_sandbox(spec).await?;
            let took = t.elapsed();
            sb.destroy().await?;
            // Round 0 warms the page cache and is not counted.
            if round > 0 {
                times.push(took);
            }
        }
    }
    let (w, o) = (median(with.clone()), median(without.clone()));
    println!("create() with the jail:    median {w:?} over {with:?}");
    println!("create() without the jail: median {o:?} over {without:?}");
    println!(
        "jail cost: {:+.0} ms ({:.2}x)",
        w.as_secs_f64() * 1000.0 - o.as_secs_f64() * 1000.0,
        w.as_secs_f64() / o.as_secs_f64()
    );
    Ok(())
}
