//! Agent behaviours beyond the conformance suite, against the agent running as a normal process
//! on a Unix socket: disconnects mid-command, signals, abandoned streams, handshake refusals,
//! users, working directories, listings, power-off.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{connect, start_agent, LocalHarness};
use sandbox_core::client::{AgentClient, ClientError};
use sandbox_core::conformance::{self, Harness};
use sandbox_core::protocol::{
    asynch, AgentErrorKind, AgentFrame, AgentMessage, Hello, HostFrame, HostMessage, ProtocolError,
    Role, PROTOCOL_VERSION,
};
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

/// A handshaken raw connection, for requests the client would not send (or would finish).
async fn raw(sock: &Path) -> UnixStream {
    let mut s = UnixStream::connect(sock).await.expect("connect");
    asynch::write_hello(&mut s, Role::Host)
        .await
        .expect("hello");
    let hello = asynch::read_hello_bytes(&mut s).await.expect("agent hello");
    Hello::check(hello, Role::Agent).expect("agent hello is valid");
    s
}

async fn send(s: &mut UnixStream, id: u64, body: HostMessage) {
    asynch::write_frame(s, &HostFrame { id, body })
        .await
        .expect("send");
}

/// The next frame, within a bounded wait.
async fn recv(s: &mut UnixStream) -> Option<AgentFrame> {
    tokio::time::timeout(Duration::from_secs(10), asynch::read_frame(s))
        .await
        .expect("an answer within 10 s")
        .expect("a readable frame")
}

/// A FIFO (no writer, no reader), a bound Unix socket, a directory and, if this process may
/// create one, a character device node, in `dir`; the listener keeps the socket alive.
fn make_specials(dir: &Path) -> (std::os::unix::net::UnixListener, Vec<&'static str>) {
    use nix::sys::stat::{makedev, mknod, Mode, SFlag};
    nix::unistd::mkfifo(&dir.join("fifo"), Mode::from_bits_truncate(0o644)).expect("mkfifo");
    let l = std::os::unix::net::UnixListener::bind(dir.join("sock")).expect("bind");
    std::fs::create_dir(dir.join("dir")).expect("mkdir");
    let mut names = vec!["fifo", "sock", "dir"];
    // 1:3 is /dev/null; only root may create device nodes.
    if mknod(
        &dir.join("null"),
        SFlag::S_IFCHR,
        Mode::from_bits_truncate(0o666),
        makedev(1, 3),
    )
    .is_ok()
    {
        names.push("null");
    }
    (l, names)
}

/// Names in `dir` that look like `write_file`'s temporary files.
fn temp_files(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .expect("read_dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".sandbox-write."))
        .collect()
}

#[tokio::test]
async fn special_files_are_refused_at_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = agent_sock(&dir);
    let _agent = start_agent(&sock).await;
    let files = dir.path().join("files");
    std::fs::create_dir(&files).expect("mkdir");
    let (_listener, names) = make_specials(&files);
    let confined = FileOptions::new().confined_to(files.to_string_lossy());
    let mut cases = vec![("/dev/null".to_owned(), FileOptions::new())];
    for n in &names {
        cases.push((
            files.join(n).to_string_lossy().into_owned(),
            FileOptions::new(),
        ));
        cases.push(((*n).to_owned(), confined.clone()));
    }
    for (path, opts) in &cases {
        let mut c = connect(&sock).await.expect("connect");
        let bounded = Duration::from_secs(5);
        let err = tokio::time::timeout(bounded, c.read_file(path, opts))
            .await
            .unwrap_or_else(|_| panic!("read_file {path} blocked"))
            .expect_err("read refused");
        assert_eq!(
            sandbox_core::Error::from(err).kind(),
            ErrorKind::InvalidRequest,
            "read {path}"
        );
        let err = tokio::time::timeout(bounded, c.write_file(path, b"data", opts))
            .await
            .unwrap_or_else(|_| panic!("write_file {path} blocked"))
            .expect_err("write refused");
        let err = sandbox_core::Error::from(err);
        assert_eq!(err.kind(), ErrorKind::InvalidRequest, "write {path}: {err}");
        assert!(
            err.to_string().contains("not a regular file"),
            "the message names the type: {err}"
        );
    }
    use std::os::unix::fs::FileTypeExt;
    let ft = std::fs::symlink_metadata(files.join("fifo"))
        .expect("stat")
        .file_type();
    assert!(ft.is_fifo(), "the FIFO was not replaced");
    assert!(temp_files(&files).is_empty());
}

#[tokio::test]
async fn more_abandoned_fifo_reads_than_connection_slots_leave_the_agent_reachable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = agent_sock(&dir);
    let _agent = start_agent(&sock).await;
    let fifo = dir.path().join("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o644)).expect("mkfifo");
    let fifo = fifo.to_string_lossy().into_owned();
    // 64 slots (MAX_CONNECTIONS): each request on its own connection, dropped unanswered. A read
    // that blocked in open() would hold its slot for good.
    for i in 0..80u64 {
        let mut s = raw(&sock).await;
        let body = if i % 2 == 0 {
            HostMessage::ReadFile {
                path: fifo.clone(),
                opts: FileOptions::new(),
            }
        } else {
            HostMessage::WriteFile {
                path: fifo.clone(),
                opts: FileOptions::new(),
                size: 4,
            }
        };
        send(&mut s, 1, body).await;
        if i % 4 == 0 {
            // Some wait for the answer: an immediate typed refusal.
            match recv(&mut s).await {
                Some(AgentFrame {
                    id: 1,
                    body: AgentMessage::Error(e),
                }) => assert_eq!(e.kind, AgentErrorKind::InvalidRequest, "{e:?}"),
                other => panic!("expected a refusal, got {other:?}"),
            }
        }
    }
    // Slots come back as the agent notices the closed connections: allow a bounded moment.
    let mut last = None;
    for _ in 0..50 {
        match connect(&sock).await {
            Ok(mut c) => match c.exec(&ExecRequest::shell("echo alive")).await {
                Ok(out) => {
                    assert_eq!(out.stdout, b"alive\n");
                    let data = c
                        .read_file("/proc/self/status", &FileOptions::new())
                        .await
                        .expect("read");
                    assert!(String::from_utf8_lossy(&data).contains("Name:"));
                    return;
                }
                Err(e) => last = Some(format!("{e}")),
            },
            Err(e) => last = Some(format!("{e}")),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the agent stayed unreachable: {last:?}");
}

#[tokio::test]
async fn interrupted_writes_leave_the_old_content_and_no_temp_file() {
    use sandbox_core::file::FILE_CHUNK_BYTES;
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = agent_sock(&dir);
    let _agent = start_agent(&sock).await;
    let files = dir.path().join("files");
    std::fs::create_dir(&files).expect("mkdir");
    let target = files.join("f");
    let old: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(&target, &old).expect("write");
    let path = target.to_string_lossy().into_owned();
    let wait_no_temp = || async {
        for _ in 0..100 {
            if temp_files(&files).is_empty() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("temporary files left: {:?}", temp_files(&files));
    };

    // 1. The connection drops after the first of two chunks.
    let mut s = raw(&sock).await;
    let size = 2 * FILE_CHUNK_BYTES as u64;
    send(
        &mut s,
        1,
        HostMessage::WriteFile {
            path: path.clone(),
            opts: FileOptions::new(),
            size,
        },
    )
    .await;
    assert!(matches!(
        recv(&mut s).await,
        Some(AgentFrame {
            body: AgentMessage::Ready,
            ..
        })
    ));
    send(
        &mut s,
        1,
        HostMessage::FileData(vec![0xAA; FILE_CHUNK_BYTES].into()),
    )
    .await;
    // The first chunk lands in a temporary file; the target is untouched meanwhile.
    let mut seen_temp = false;
    for _ in 0..100 {
        if !temp_files(&files).is_empty() {
            seen_temp = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        seen_temp,
        "the data goes to a temporary file next to the target"
    );
    assert_eq!(std::fs::read(&target).expect("read"), old);
    drop(s);
    wait_no_temp().await;
    assert_eq!(std::fs::read(&target).expect("read"), old, "dropped write");

    // 2. More data than announced: a protocol error, the connection closes.
    let mut s = raw(&sock).await;
    send(
        &mut s,
        1,
        HostMessage::WriteFile {
            path: path.clone(),
            opts: FileOptions::new(),
            size: 10,
        },
    )
    .await;
    assert!(matches!(
        recv(&mut s).await,
        Some(AgentFrame {
            body: AgentMessage::Ready,
            ..
        })
    ));
    send(&mut s, 1, HostMessage::FileData(vec![0xBB; 20].into())).await;
    match recv(&mut s).await {
        Some(AgentFrame {
            body: AgentMessage::Error(e),
            ..
        }) => assert_eq!(e.kind, AgentErrorKind::Protocol),
        other => panic!("expected a protocol error, got {other:?}"),
    }
    assert!(
        recv(&mut s).await.is_none(),
        "the agent closes the connection"
    );
    wait_no_temp().await;
    assert_eq!(std::fs::read(&target).expect("read"), old, "overlong write");

    // 3. Over the size cap: refused before any data, nothing created.
    let mut c = connect(&sock).await.expect("connect");
    let mut s = raw(&sock).await;
    send(
        &mut s,
        1,
        HostMessage::WriteFile {
            path: path.clone(),
            opts: FileOptions::new(),
            size: sandbox_core::file::MAX_FILE_BYTES + 1,
        },
    )
    .await;
    match recv(&mut s).await {
        Some(AgentFrame {
            body: AgentMessage::Error(e),
            ..
        }) => assert_eq!(e.kind, AgentErrorKind::TooLarge),
        other => panic!("expected TooLarge, got {other:?}"),
    }
    assert!(temp_files(&files).is_empty());
    assert_eq!(
        std::fs::read(&target).expect("read"),
        old,
        "oversized write"
    );

    // 4. A normal overwrite replaces it whole; the mode of the old file stays.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o640)).expect("chmod");
    let new = vec![0x5Au8; 3 * FILE_CHUNK_BYTES + 7];
    c.write_file(&path, &new, &FileOptions::new().mode(0o600))
        .await
        .expect("overwrite");
    assert_eq!(std::fs::read(&target).expect("read"), new);
    let mode = std::fs::metadata(&target)
        .expect("stat")
        .permissions()
        .mode()
        & 0o7777;
    assert_eq!(mode, 0o640, "an existing file keeps its mode");
    // A new file gets exactly the requested mode.
    let fresh = files.join("fresh").to_string_lossy().into_owned();
    c.write_file(&fresh, b"x", &FileOptions::new().mode(0o666))
        .await
        .expect("create");
    let mode = std::fs::metadata(&fresh)
        .expect("stat")
        .permissions()
        .mode()
        & 0o7777;
    assert_eq!(mode, 0o666, "the umask does not apply");
    assert!(temp_files(&files).is_empty());
}
