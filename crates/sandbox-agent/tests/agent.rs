//! Agent behaviours beyond the conformance suite, against the agent running as a normal process
//! on a Unix socket: disconnects mid-command, signals, abandoned streams, handshake refusals,
//! users, working directories, listings, power-off.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{connect, start_agent, LocalHarness};
use sandbox_core::client::{AgentClient, ClientError};
use sandbox_core::conformance::{self, Harness};
use sandbox_core::protocol::{Hello, ProtocolError, Role, PROTOCOL_VERSION};
use sandbox_core::{ErrorKind, ExecEvent, ExecRequest, FileOptions, Sandbox};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

/// Polls (bounded) until `pid` no longer exists or is not our zombie; returns whether it is gone.
async fn gone(pid: u32) -> bool {
    for _ in 0..100 {
        if !Path::new(&format!("/proc/{pid}")).exists() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

fn agent_sock(dir: &tempfile::TempDir) -> std::path::PathBuf {
    dir.path().join("agent.sock")
}

#[tokio::test]
async fn client_disconnect_mid_command_kills_its_group_and_agent_keeps_serving() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = agent_sock(&dir);
    let _agent = start_agent(&sock).await;
    let mut client = connect(&sock).await.expect("connect");
    // The background sleep holds stdout open and is in the same group.
    let mut session = client
        .exec_start(&ExecRequest::shell("sleep 1000 & echo $!; sleep 1000"))
        .await
        .expect("start");
    let leader = session.pid();
    let bg = match session.next_event().await.expect("event") {
        Some(ExecEvent::Stdout(b)) => String::from_utf8_lossy(&b)
            .trim()
            .parse::<u32>()
            .expect("pid"),
        other => panic!("expected the background pid, got {other:?}"),
    };
    // The session (and its borrow of the client) ends here; closing the client is the disconnect.
    drop(client);
    assert!(
        gone(leader).await,
        "the command {leader} outlived its client"
    );
    assert!(
        gone(bg).await,
        "the background child {bg} outlived its client"
    );
    let mut again = connect(&sock).await.expect("reconnect");
    let out = again
        .exec(&ExecRequest::shell("echo still here"))
        .await
        .expect("exec");
    assert_eq!(out.stdout, b"still here\n");
}

#[tokio::test]
async fn abandoned_session_is_killed_before_the_next_request() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = agent_sock(&dir);
    let _agent = start_agent(&sock).await;
    let mut client = connect(&sock).await.expect("connect");
    let pid = client
        .exec_start(&ExecRequest::new(["sleep", "1000"]))
        .await
        .expect("start")
        .pid();
    // Same connection: the client must settle the old command first.
    let info = client.ping().await.expect("ping after an abandoned exec");
    assert!(info.pid > 1);
    assert!(gone(pid).await, "the abandoned command {pid} still runs");
}

#[tokio::test]
async fn dropping_an_exec_stream_kills_the_command() {
    let h = LocalHarness::new();
    let sb = conformance::create(&h).await;
    let mut stream = sb
        .exec_stream(ExecRequest::shell("echo $$; exec sleep 1000"))
        .await
        .expect("stream");
    let pid = match stream.next().await {
        Some(Ok(ExecEvent::Stdout(b))) => String::from_utf8_lossy(&b)
            .trim()
            .parse::<u32>()
            .expect("pid"),
        other => panic!("expected the pid, got {other:?}"),
    };
    drop(stream);
    assert!(
        gone(pid).await,
        "the command {pid} outlived its dropped stream"
    );
    conformance::destroy(&h, sb).await;
}

#[tokio::test]
async fn signals_reach_the_group() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = agent_sock(&dir);
    let _agent = start_agent(&sock).await;
    let mut client = connect(&sock).await.expect("connect");
    let mut s = client
        .exec_start(&ExecRequest::new(["sleep", "1000"]))
        .await
        .expect("start");
    s.signal(15).await.expect("signal");
    let mut status = None;
    while let Some(ev) = s.next_event().await.expect("event") {
        if let ExecEvent::Exit(st) = ev {
            status = Some(st);
        }
    }
    let st = status.expect("an exit status");
    assert_eq!((st.signal, st.timed_out), (Some(15), false));
}

#[tokio::test]
async fn concurrent_connections_run_in_parallel() {
    let h = LocalHarness::new();
    let sb = conformance::create(&h).await;
    // Four commands that each wait for a file only the last one creates: they must overlap.
    let mut tasks = Vec::new();
    let sb: std::sync::Arc<dyn Sandbox> = std::sync::Arc::from(sb);
    for i in 0..4 {
        let sb = sb.clone();
        tasks.push(tokio::spawn(async move {
            let script = if i == 3 {
                "touch /tmp/sbx-gate-$PPID; echo go".to_owned()
            } else {
                "for n in $(seq 1 200); do [ -e /tmp/sbx-gate-$PPID ] && { echo go; exit 0; }; sleep 0.05; done; exit 1".to_owned()
            };
            sb.exec(ExecRequest::shell(script)).await.expect("exec")
        }));
    }
    for t in tasks {
        let out = t.await.expect("task");
        assert_eq!(
            (out.status.code, out.stdout_str()),
            (Some(0), "go\n".to_owned())
        );
    }
    sb.exec(ExecRequest::shell("rm -f /tmp/sbx-gate-$PPID"))
        .await
        .expect("cleanup");
    sb.destroy().await.expect("destroy");
}

#[tokio::test]
async fn cwd_env_and_spec_env() {
    let h = LocalHarness::new();
    let sb = conformance::create(&h).await;
    let out = sb
        .exec(
            ExecRequest::shell("pwd; echo $FOO; echo $SANDBOX_TEST; echo $HOME")
                .cwd("/tmp")
                .env("FOO", "bar"),
        )
        .await
        .expect("exec");
    assert_eq!(out.stdout_str(), "/tmp\nbar\n1\n/root\n");
    let overridden = sb
        .exec(ExecRequest::shell("echo $SANDBOX_TEST").env("SANDBOX_TEST", "mine"))
        .await
        .expect("exec");
    assert_eq!(
        overridden.stdout_str(),
        "mine\n",
        "the request's env wins over the spec's"
    );
    let err = sb
        .exec(ExecRequest::new(["true"]).cwd("/no/such/dir"))
        .await
        .expect_err("missing cwd");
    assert_eq!(err.kind(), ErrorKind::NotFound);
    let err = sb
        .exec(ExecRequest::new(["true"]).user("no-such-user-xyz"))
        .await
        .expect_err("unknown user");
    assert_eq!(err.kind(), ErrorKind::InvalidRequest);
    let err = sb
        .exec(ExecRequest::new(Vec::<String>::new()))
        .await
        .expect_err("empty argv");
    assert_eq!(err.kind(), ErrorKind::InvalidRequest);
    conformance::destroy(&h, sb).await;
}

#[tokio::test]
async fn runs_as_another_user() {
    let h = LocalHarness::new();
    let sb = conformance::create(&h).await;
    let out = sb
        .exec(ExecRequest::new(["id", "-u"]).user("65534"))
        .await
        .expect("exec");
    if nix::unistd::geteuid().is_root() {
        assert_eq!(
            (out.status.code, out.stdout_str()),
            (Some(0), "65534\n".to_owned())
        );
    } else {
        // Only root can switch users; the child says so and exits 126.
        assert_eq!(out.status.code, Some(126), "{}", out.stderr_str());
    }
    conformance::destroy(&h, sb).await;
}

#[tokio::test]
async fn listing_is_capped_and_proc_files_are_readable() {
    let h = LocalHarness::new();
    let sb = conformance::create(&h).await;
    let dir = h.runtime.base.path().join("many");
    let mk = format!(
        "mkdir {d} && cd {d} && for i in $(seq 1 2100); do : > f$i; done",
        d = dir.display()
    );
    assert_eq!(
        sb.exec(ExecRequest::shell(mk))
            .await
            .expect("exec")
            .status
            .code,
        Some(0)
    );
    let listing = sb
        .list(&dir.to_string_lossy(), &FileOptions::new())
        .await
        .expect("list");
    assert!(listing.truncated);
    assert_eq!(listing.entries.len(), sandbox_core::file::MAX_LIST_ENTRIES);
    std::fs::remove_dir_all(&dir).expect("cleanup");
    let status = sb
        .read_file("/proc/self/status", &FileOptions::new())
        .await
        .expect("read /proc");
    assert!(
        String::from_utf8_lossy(&status).contains("Name:"),
        "a size-0 /proc file is read whole"
    );
    let err = sb
        .read_file("/tmp", &FileOptions::new())
        .await
        .expect_err("directory");
    assert_eq!(err.kind(), ErrorKind::InvalidRequest);
    conformance::destroy(&h, sb).await;
}

#[tokio::test]
async fn power_off_outside_a_vm_exits_the_agent() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = agent_sock(&dir);
    let mut agent = start_agent(&sock).await;
    let mut client = connect(&sock).await.expect("connect");
    client.power_off().await.expect("power off");
    let status = tokio::time::timeout(Duration::from_secs(10), agent.wait())
        .await
        .expect("agent exits")
        .expect("wait");
    assert_eq!(status.code(), Some(0));
}

#[tokio::test]
async fn bad_magic_gets_no_reply() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = agent_sock(&dir);
    let _agent = start_agent(&sock).await;
    let mut s = UnixStream::connect(&sock).await.expect("connect");
    s.write_all(b"GET / HTTP/1.0\r\n\r\n").await.expect("write");
    let mut buf = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(15), s.read_to_end(&mut buf))
        .await
        .expect("closed");
    // Closing with our unread bytes in its buffer makes the kernel send a reset instead of EOF.
    let closed = match n {
        Ok(0) => true,
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
        Ok(_) => false,
    };
    assert!(closed && buf.is_empty(), "no bytes for a stranger: {buf:?}");
}

#[tokio::test]
async fn client_reports_version_mismatch_and_silent_agents() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("fake.sock");
    let listener = UnixListener::bind(&path).expect("bind");
    tokio::spawn(async move {
        // First connection: a future agent. Second: a silent one.
        let (mut s, _) = listener.accept().await.expect("accept");
        let mut hello = [0u8; 8];
        s.read_exact(&mut hello).await.expect("hello");
        let future = Hello {
            version: PROTOCOL_VERSION + 1,
            role: Role::Agent,
        }
        .encode();
        s.write_all(&future).await.expect("reply");
        let (_silent, _) = listener.accept().await.expect("accept");
        tokio::time::sleep(Duration::from_secs(60)).await;
    });
    let s = UnixStream::connect(&path).await.expect("connect");
    let err = AgentClient::handshake(s, Duration::from_secs(5))
        .await
        .expect_err("mismatch");
    assert!(
        matches!(
            err,
            ClientError::Handshake(ProtocolError::VersionMismatch {
                ours: PROTOCOL_VERSION,
                ..
            })
        ),
        "{err:?}"
    );
    assert_eq!(err.kind(), ErrorKind::Protocol);
    let s = UnixStream::connect(&path).await.expect("connect");
    let err = AgentClient::handshake(s, Duration::from_millis(300))
        .await
        .expect_err("silent");
    assert_eq!(err.kind(), ErrorKind::AgentUnreachable);
}

#[tokio::test]
async fn inventory_returns_to_empty_after_destroy() {
    let h = LocalHarness::new();
    let before = h.inventory().await.expect("inventory");
    let sb = conformance::create(&h).await;
    let during = h.inventory().await.expect("inventory");
    assert!(
        during.len() > before.len(),
        "the inventory sees the running agent: {during:?}"
    );
    conformance::destroy(&h, sb).await;
    assert_eq!(h.inventory().await.expect("inventory"), before);
}

#[tokio::test]
async fn exit_is_reported_while_a_background_job_still_holds_stdout() {
    let h = LocalHarness::new();
    let sb = conformance::create(&h).await;
    let out = sb
        .exec(ExecRequest::shell("sleep 30 & echo $!"))
        .await
        .expect("exec");
    assert_eq!(out.status.code, Some(0));
    let bg: u32 = out.stdout_str().trim().parse().expect("background pid");
    // We got the answer while the background job (which holds stdout) still runs.
    assert!(
        Path::new(&format!("/proc/{bg}")).exists(),
        "the exit waited for the background job"
    );
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(bg as i32),
        nix::sys::signal::Signal::SIGKILL,
    );
    assert!(gone(bg).await);
    conformance::destroy(&h, sb).await;
}
