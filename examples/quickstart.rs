use sandbox_core::{ExecRequest, FileOptions, Runtime};
use sandbox_kvm::runtime::{KvmRuntime, KvmRuntimeConfig};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // Finds sandbox-vmm and the guest artifacts via SANDBOX_VMM, SANDBOX_KERNEL, SANDBOX_ROOTFS.
    let runtime = KvmRuntime::new(KvmRuntimeConfig::default())?;
    let sb = runtime
        .create(runtime.spec_builder().memory_mib(256).build()?)
        .await?;
    let out = sb
        .exec(ExecRequest::shell("echo hello from $(uname -n)"))
        .await?;
    print!("{}", out.stdout_str());
    sb.write_file("/tmp/notes.txt", b"agent was here\n", &FileOptions::new())
        .await?;
    let back = sb.read_file("/tmp/notes.txt", &FileOptions::new()).await?;
    assert_eq!(back, b"agent was here\n");
    sb.destroy().await?; // the VMM process and every file it had are gone
    Ok(())
}
