//! The agent as PID 1 (privileged tier: needs root for the namespaces): each "sandbox" is the
//! agent started by `unshare --pid --fork --mount --uts --net` so it mounts /proc, /sys, /dev,
//! /tmp and /run, sets its hostname and reaps as init would, all inside its own namespaces. The
//! whole conformance suite must pass there too, and power-off must end the namespace.
#![cfg(sandbox_privileged)]

mod common;

use sandbox_core::conformance;
use sandbox_core::ExecRequest;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pid1_agent_passes_the_conformance_suite() {
    let h = common::LocalHarness::pid1();
    conformance::run_all(&h).await;
}

#[tokio::test]
async fn pid1_agent_sets_up_the_system() {
    let h = common::LocalHarness::pid1();
    let sb = conformance::create(&h).await;
    let script = "cat /proc/1/comm; hostname; \
        for m in /proc /sys /dev /tmp /run; do grep -q \" $m \" /proc/self/mountinfo && echo $m; done; \
        cat /sys/class/net/lo/operstate 2>/dev/null || echo no-lo";
    let out = sb.exec(ExecRequest::shell(script)).await.expect("exec");
    let text = out.stdout_str();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        &lines[..7],
        [
            "sandbox-agent",
            "sandbox",
            "/proc",
            "/sys",
            "/dev",
            "/tmp",
            "/run"
        ],
        "{text}"
    );
    // A fresh netns's lo reports "unknown" once up, "down" otherwise.
    assert_ne!(lines.get(7), Some(&"down"), "lo must be up: {text}");
    conformance::destroy(&h, sb).await;
}
