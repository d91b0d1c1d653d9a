//! The guest agent: PID 1 inside every sandbox. **Not implemented yet.**
//!
//! It will mount the pseudo file systems, reap orphans, listen on vsock and run commands for the
//! host over the agent wire protocol defined in `sandbox-core`.

fn main() {
    eprintln!("sandbox-agent: not implemented yet");
    std::process::exit(1);
}
