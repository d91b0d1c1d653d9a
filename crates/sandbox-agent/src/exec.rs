//! Running one command: spawn in its own process group, pump stdout/stderr as frames, feed stdin,
//! enforce the timeout by killing the whole group, and report the exit status.

use std::ffi::CString;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::sync::mpsc::RecvTimeoutError;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use nix::fcntl::OFlag;
use nix::sys::signal::{killpg, Signal};
use nix::sys::wait::WaitStatus;
use nix::unistd::{pipe2, Pid};
use sandbox_core::exec::{ExitStatus, MAX_OUTPUT_CHUNK_BYTES};
use sandbox_core::protocol::{AgentErrorKind, AgentMessage, ExecStart, HostMessage};

use crate::conn::{protocol_error, Ctx, Event, Next, Writer};
use crate::sys::{self, SpawnPlan};

/// After the command's main process exits while other members of its process group still run
/// (background jobs holding stdout/stderr open), how long to keep forwarding output before
/// reporting the exit. Those processes keep running; their later output is dropped.
const DRAIN_GRACE: Duration = Duration::from_millis(500);
/// After the main process exits with no group member left, how long at most to wait for the
/// pipes to drain (only a process that left the group can hold them open; normally the output
/// pumps just need to read what is buffered).
const DRAIN_CAP: Duration = Duration::from_secs(5);
/// The drain limits above are counted in turns of this length in which nothing arrived, not read
/// off the clock: a guest whose vCPUs the host stops for seconds (an overloaded host, nested
/// emulation) sees its clock jump past any deadline before the output pumps ran again, and an
/// exit reported then would lose output already written.
const DRAIN_TICK: Duration = Duration::from_millis(50);
/// Whatever the turns say, the drain ends this long after the exit (a stream of other events
/// could otherwise keep it going).
const DRAIN_WALL_CAP: Duration = Duration::from_secs(20);
/// After the host left and the command was killed, how long to wait for its exit status before
/// giving the connection up anyway (a process stuck in uninterruptible sleep cannot die at once,
/// and must not hold the connection's slot forever).
const EXIT_WAIT_CAP: Duration = Duration::from_secs(10);
/// Largest `/etc/passwd` read to resolve a user (the guest controls that file).
const MAX_PASSWD_BYTES: u64 = 4 * 1024 * 1024;
/// `PATH` for commands that do not set one.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// A user from `/etc/passwd` (parsed by hand: a static glibc cannot load NSS modules).
struct User {
    uid: u32,
    gid: u32,
    name: String,
    home: String,
}

fn lookup_user(spec: &str) -> Option<User> {
    // Guest-controlled: a FIFO there must not block the request, nor a huge file exhaust memory.
    let passwd = crate::files::read_regular("/etc/passwd", MAX_PASSWD_BYTES)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    let numeric: Option<u32> = spec.parse().ok();
    for line in passwd.lines() {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() < 7 {
            continue;
        }
        let (Ok(uid), Ok(gid)) = (f[2].parse::<u32>(), f[3].parse::<u32>()) else {
            continue;
        };
        if f[0] == spec || numeric == Some(uid) {
            return Some(User {
                uid,
                gid,
                name: f[0].to_owned(),
                home: f[5].to_owned(),
            });
        }
    }
    // A numeric uid without a passwd entry is still allowed, with its own gid.
    numeric.map(|uid| User {
        uid,
        gid: uid,
        name: uid.to_string(),
        home: "/".to_owned(),
    })
}

/// Finds `argv0` in `path` like `execvp` would, but before fork (so the child need not allocate).
fn resolve(argv0: &str, path: &str) -> String {
    if argv0.contains('/') {
        return argv0.to_owned();
    }
    use std::os::unix::fs::PermissionsExt;
    for dir in path.split(':').filter(|d| !d.is_empty()) {
        let candidate = Path::new(dir).join(argv0);
        if let Ok(m) = std::fs::metadata(&candidate) {
            if m.is_file() && m.permissions().mode() & 0o111 != 0 {
                return candidate.to_string_lossy().into_owned();
            }
        }
    }
    // Not found: an empty path makes execve fail with ENOENT, and the child reports 127.
    String::new()
}

fn cstring(s: &str) -> Result<CString, String> {
    CString::new(s).map_err(|_| "A string contains a NUL byte.".to_owned())
}

fn plan(start: &ExecStart) -> Result<SpawnPlan, (AgentErrorKind, String)> {
    let bad = |m: String| (AgentErrorKind::InvalidRequest, m);
    let argv0 = start
        .argv
        .first()
        .filter(|a| !a.is_empty())
        .ok_or_else(|| bad("argv is empty.".into()))?;
    let user = match &start.user {
        None => None,
        Some(u) => Some(lookup_user(u).ok_or_else(|| {
            bad(format!(
                "Unknown user {u:?}: no such name in the guest's /etc/passwd (a numeric uid is \
                 accepted as is)."
            ))
        })?),
    };
    // A home that does not exist (nobody's is /nonexistent) falls back to /, like login(1).
    let home = user
        .as_ref()
        .map_or("/root", |u| u.home.as_str())
        .to_owned();
    let home = if user.is_some() && !Path::new(&home).is_dir() {
        "/".to_owned()
    } else {
        home
    };
    let mut env: Vec<(String, String)> = vec![
        ("PATH".into(), DEFAULT_PATH.into()),
        ("HOME".into(), home.clone()),
        ("LANG".into(), "C.UTF-8".into()),
        ("TERM".into(), "dumb".into()),
    ];
    if let Some(u) = &user {
        env.push(("USER".into(), u.name.clone()));
        env.push(("LOGNAME".into(), u.name.clone()));
    }
    for (k, v) in &start.env {
        env.retain(|(ek, _)| ek != k);
        env.push((k.clone(), v.clone()));
    }
    let path_var = env
        .iter()
        .find(|(k, _)| k == "PATH")
        .map_or(DEFAULT_PATH, |(_, v)| v.as_str());
    let cwd = start
        .cwd
        .clone()
        .unwrap_or_else(|| if user.is_some() { home } else { "/".into() });
    if !Path::new(&cwd).is_dir() {
        let why = match std::fs::metadata(&cwd) {
            Ok(_) => "is not a directory",
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => "does not exist",
            Err(_) => "cannot be reached",
        };
        return Err((
            AgentErrorKind::NotFound,
            format!("The working directory {cwd} {why} in the guest."),
        ));
    }
    let argv = start
        .argv
        .iter()
        .map(|a| cstring(a))
        .collect::<Result<Vec<_>, _>>()
        .map_err(bad)?;
    let envp = env
        .iter()
        .map(|(k, v)| cstring(&format!("{k}={v}")))
        .collect::<Result<Vec<_>, _>>()
        .map_err(bad)?;
    Ok(SpawnPlan::new(
        cstring(&resolve(argv0, path_var)).map_err(bad)?,
        argv,
        envp,
        cstring(&cwd).map_err(bad)?,
        user.map(|u| (u.uid, u.gid)),
        argv0,
    ))
}

/// Runs `start` as request `id` and reports `Started`, output and `Exited` (or `Error`).
pub fn run(ctx: &Ctx, id: u64, start: ExecStart) -> Next {
    let plan = match plan(&start) {
        Ok(p) => p,
        Err((kind, msg)) => {
            ctx.writer.error(id, kind, msg);
            return Next::Continue;
        }
    };
    let pipes = (|| -> nix::Result<_> {
        Ok((
            pipe2(OFlag::O_CLOEXEC)?,
            pipe2(OFlag::O_CLOEXEC)?,
            pipe2(OFlag::O_CLOEXEC)?,
        ))
    })();
    let ((in_r, in_w), (out_r, out_w), (err_r, err_w)) = match pipes {
        Ok(p) => p,
        Err(e) => {
            ctx.writer
                .error(id, AgentErrorKind::Io, format!("Cannot create pipes: {e}."));
            return Next::Continue;
        }
    };
    // The guest's OOM kill count before the command, to tell an OOM kill from another SIGKILL.
    let oom_before = oom_kills();
    let started = Instant::now();
    let spawned = ctx.reaper.spawn_registered(ctx.tx.clone(), || {
        sys::spawn(
            &plan,
            in_r.as_raw_fd(),
            out_w.as_raw_fd(),
            err_w.as_raw_fd(),
        )
    });
    // The child has its copies; ours must close so EOF reaches the pumps when it exits.
    drop((in_r, out_w, err_w));
    let pid = match spawned {
        Ok(pid) => pid,
        Err(e) => {
            ctx.writer.error(id, AgentErrorKind::Io, fork_failure(e));
            return Next::Continue;
        }
    };
    ctx.writer.set_open_exec(Some(id));
    ctx.writer.send(
        id,
        AgentMessage::Started {
            pid: pid.as_raw().unsigned_abs(),
        },
    );
    crate::debug!("exec {id}: pid {pid} {:?}", start.argv);

    feed_stdin(in_w, start.stdin.clone());
    pump(ctx, id, out_r, AgentMessage::Stdout);
    pump(ctx, id, err_r, AgentMessage::Stderr);

    let deadline = start.timeout().map(|t| started + t);
    let mut status: Option<(WaitStatus, Duration)> = None;
    // When the main process exited, and how many quiet turns its pipes may still take to drain.
    let mut exited_at: Option<Instant> = None;
    let mut drain_ticks: Option<u32> = None;
    let mut pipes_open = 2u8;
    let mut timed_out = false;
    let mut client_gone = false;
    let mut next = Next::Continue;
    loop {
        let now = Instant::now();
        if let (Some(ticks), Some(at)) = (drain_ticks, exited_at) {
            if pipes_open == 0
                || client_gone
                || ticks == 0
                || now.duration_since(at) >= DRAIN_WALL_CAP
            {
                break;
            }
        }
        // Wake up for the timeout while the command runs, each drain turn after it exits.
        let wake = match (drain_ticks, deadline) {
            (Some(_), _) => Some(now + DRAIN_TICK),
            (None, Some(d)) if !timed_out => Some(d),
            _ => None,
        };
        let ev = match wake {
            Some(w) => ctx.rx.recv_timeout(w.saturating_duration_since(now)),
            None => ctx.rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
        };
        match ev {
            Err(RecvTimeoutError::Timeout) => {
                if let Some(ticks) = drain_ticks.as_mut() {
                    *ticks = ticks.saturating_sub(1);
                } else if exited_at.is_none() && !timed_out {
                    crate::debug!("exec {id}: timeout, killing group {pid}");
                    kill_command(pid, status.is_none());
                    timed_out = true;
                }
            }
            // Our own `tx` is in ctx, so the channel cannot disconnect; treat it as a lost client.
            Err(RecvTimeoutError::Disconnected) => client_gone = true,
            Ok(Event::Exited(ws)) if ws.pid() == Some(pid) => {
                status = Some((ws, started.elapsed()));
                let at = Instant::now();
                exited_at = Some(at);
                // Signal 0 probes whether anyone is left in the group.
                let group_alive = killpg(pid, None).is_ok();
                drain_ticks = Some(drain_turns(if group_alive {
                    DRAIN_GRACE
                } else {
                    DRAIN_CAP
                }));
            }
            Ok(Event::Exited(_)) => {}
            Ok(Event::PipeDone(pid_id)) if pid_id == id => {
                pipes_open = pipes_open.saturating_sub(1)
            }
            Ok(Event::PipeDone(_)) => {}
            Ok(Event::Frame(f)) if f.id == id => match f.body {
                HostMessage::Signal { signal } => match Signal::try_from(signal) {
                    Ok(sig) => kill_group(pid, sig),
                    Err(_) => crate::debug!("exec {id}: ignoring bad signal {signal}"),
                },
                _ => {
                    protocol_error(ctx, id, "Only Signal may be sent during an exec.");
                    kill_command(pid, status.is_none());
                    next = Next::Close;
                    client_gone = true;
                }
            },
            Ok(Event::Frame(f)) => {
                protocol_error(ctx, f.id, "A new request arrived during an exec.");
                kill_command(pid, status.is_none());
                next = Next::Close;
                client_gone = true;
            }
            Ok(Event::Closed(_)) => {
                // The host went away mid-command: nobody will read the output, so the command
                // must not outlive the request.
                crate::debug!("exec {id}: client gone, killing group {pid}");
                kill_command(pid, status.is_none());
                client_gone = true;
                next = Next::Close;
            }
        }
        if client_gone && status.is_none() {
            // Keep waiting for the reaper, but only for the exit.
            if let Some((ws, d)) = wait_exit(ctx, pid, started) {
                status = Some((ws, d));
            }
            break;
        }
    }
    ctx.writer.set_open_exec(None);
    if !client_gone {
        let exit = match status {
            Some((WaitStatus::Exited(_, code), d)) => {
                let mut s = ExitStatus::exited(code, d);
                s.timed_out = timed_out;
                // 137 = 128 + SIGKILL: how a shell reports a child the OOM killer ended (a
                // `sh -c` command's process is usually not the one that grew).
                s.oom_killed = code == 128 + Signal::SIGKILL as i32
                    && !timed_out
                    && matches!((oom_before, oom_kills()), (Some(a), Some(b)) if b > a);
                s
            }
            Some((WaitStatus::Signaled(_, sig, _), d)) => {
                let mut s = ExitStatus::signaled(sig as i32, timed_out, d);
                s.oom_killed = sig == Signal::SIGKILL
                    && !timed_out
                    && matches!((oom_before, oom_kills()), (Some(a), Some(b)) if b > a);
                s
            }
            _ => ExitStatus::signaled(Signal::SIGKILL as i32, timed_out, started.elapsed()),
        };
        ctx.writer.send(id, AgentMessage::Exited(exit));
    }
    next
}

/// How many [`DRAIN_TICK`] turns make `limit`.
fn drain_turns(limit: Duration) -> u32 {
    u32::try_from(limit.as_millis() / DRAIN_TICK.as_millis()).unwrap_or(u32::MAX)
}

/// The guest kernel's count of OOM kills (`oom_kill` in `/proc/vmstat`, Linux 4.13), or `None`
/// when it cannot be read. Reads at most 64 KiB.
fn oom_kills() -> Option<u64> {
    let mut text = String::new();
    std::fs::File::open("/proc/vmstat")
        .ok()?
        .take(64 * 1024)
        .read_to_string(&mut text)
        .ok()?;
    parse_oom_kills(&text)
}

/// The `oom_kill` line of a `/proc/vmstat` text.
fn parse_oom_kills(vmstat: &str) -> Option<u64> {
    vmstat
        .lines()
        .find_map(|l| l.strip_prefix("oom_kill "))
        .and_then(|n| n.trim().parse().ok())
}

/// After the client left: waits (at most [`EXIT_WAIT_CAP`]) for the reaper to report `pid`.
fn wait_exit(ctx: &Ctx, pid: Pid, started: Instant) -> Option<(WaitStatus, Duration)> {
    let until = Instant::now() + EXIT_WAIT_CAP;
    loop {
        let left = until.saturating_duration_since(Instant::now());
        match ctx.rx.recv_timeout(left) {
            Ok(Event::Exited(ws)) if ws.pid() == Some(pid) => return Some((ws, started.elapsed())),
            Ok(_) => {}
            Err(_) => {
                // The reaper still reaps it later; its status then goes nowhere.
                crate::debug!("command {pid} did not die within {EXIT_WAIT_CAP:?} of SIGKILL");
                return None;
            }
        }
    }
}

fn kill_group(pid: Pid, sig: Signal) {
    // ESRCH: the group is already gone.
    let _ = killpg(pid, sig);
}

/// `SIGKILL`s the command's group and, while it has not been reaped (`running`), the main
/// process itself: it may have moved to another process group with `setpgid`, out of reach of
/// `killpg`.
fn kill_command(pid: Pid, running: bool) {
    kill_group(pid, Signal::SIGKILL);
    if running {
        let _ = nix::sys::signal::kill(pid, Signal::SIGKILL);
    }
}

fn feed_stdin(fd: OwnedFd, data: Bytes) {
    let spawned = std::thread::Builder::new()
        .name("stdin".into())
        .spawn(move || {
            let mut f = std::fs::File::from(fd);
            // EPIPE when the command does not read its stdin is fine.
            let _ = f.write_all(&data);
        });
    if let Err(e) = spawned {
        crate::log!("cannot start stdin thread: {e}");
    }
}

fn pump(ctx: &Ctx, id: u64, fd: OwnedFd, wrap: fn(Bytes) -> AgentMessage) {
    let writer: Arc<Writer> = ctx.writer.clone();
    let tx = ctx.tx.clone();
    let spawned = std::thread::Builder::new()
        .name("pump".into())
        .spawn(move || {
            let mut f = std::fs::File::from(fd);
            let mut buf = vec![0u8; MAX_OUTPUT_CHUNK_BYTES];
            loop {
                match f.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => writer.send_output(id, wrap(Bytes::copy_from_slice(&buf[..n]))),
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(_) => break,
                }
            }
            let _ = tx.send(Event::PipeDone(id));
        });
    if let Err(e) = spawned {
        crate::log!("cannot start output thread: {e}");
        let _ = ctx.tx.send(Event::PipeDone(id));
    }
}

/// Why a command could not be started, with what to do when the guest is out of processes
/// or memory (a fork bomb leaves it so until its processes die).
fn fork_failure(e: std::io::Error) -> String {
    use nix::errno::Errno;
    let hint = match e.raw_os_error().map(Errno::from_raw) {
        Some(Errno::EAGAIN) => {
            " The guest has too many processes (its pid limit is reached): kill some \
             (`kill -9 -1` as their user) or destroy the sandbox."
        }
        Some(Errno::ENOMEM) => " The guest is out of memory: free some or destroy the sandbox.",
        _ => "",
    };
    format!("Cannot fork the command: {e}.{hint}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn start(cwd: Option<&str>, user: Option<&str>) -> ExecStart {
        ExecStart {
            argv: vec!["sh".into()],
            env: Vec::new(),
            cwd: cwd.map(Into::into),
            stdin: Default::default(),
            timeout_ms: None,
            user: user.map(Into::into),
        }
    }

    #[test]
    fn refusals_name_the_directory_and_the_user() {
        let Err((k, m)) = plan(&start(Some("/nonexistent-xyz"), None)) else {
            panic!("a missing cwd is refused");
        };
        assert_eq!(k, AgentErrorKind::NotFound);
        assert!(
            m.contains("/nonexistent-xyz") && m.contains("does not exist"),
            "{m}"
        );
        let Err((_, m)) = plan(&start(Some("/proc/self/status"), None)) else {
            panic!("a file cwd is refused");
        };
        assert!(m.contains("is not a directory"), "{m}");
        let Err((k, m)) = plan(&start(None, Some("nosuchuser"))) else {
            panic!("an unknown user is refused");
        };
        assert_eq!(k, AgentErrorKind::InvalidRequest);
        assert!(
            m.contains("\"nosuchuser\"") && m.contains("/etc/passwd"),
            "{m}"
        );
    }

    #[test]
    fn a_fork_failure_names_the_errno_and_the_fix() {
        let m = fork_failure(std::io::Error::from_raw_os_error(nix::libc::EAGAIN));
        assert!(
            m.contains("os error 11") && m.contains("too many processes"),
            "{m}"
        );
        let m = fork_failure(std::io::Error::from_raw_os_error(nix::libc::EPERM));
        assert!(m.contains("os error 1") && !m.contains("too many"), "{m}");
    }

    #[test]
    fn drain_limits_are_whole_turns() {
        assert_eq!(drain_turns(DRAIN_GRACE), 10);
        assert_eq!(drain_turns(DRAIN_CAP), 100);
        assert_eq!(drain_turns(Duration::ZERO), 0);
        assert!(DRAIN_WALL_CAP > DRAIN_CAP);
    }

    #[test]
    fn the_oom_kill_count_is_read_from_vmstat() {
        let vmstat = "pgfault 10\noom_kill 3\nnuma_hit 0\n";
        assert_eq!(parse_oom_kills(vmstat), Some(3));
        assert_eq!(parse_oom_kills("pgfault 10\n"), None);
        assert_eq!(parse_oom_kills("oom_kill x\n"), None);
        // This host's own file, when there is one, has the line (Linux 4.13 and later).
        if let Ok(text) = std::fs::read_to_string("/proc/vmstat") {
            assert!(
                parse_oom_kills(&text).is_some(),
                "no oom_kill in /proc/vmstat"
            );
        }
    }

    #[test]
    fn resolve_searches_path_like_execvp() {
        assert_eq!(resolve("./x", "/bin"), "./x");
        assert_eq!(resolve("/bin/sh", ""), "/bin/sh");
        let sh = resolve("sh", DEFAULT_PATH);
        assert!(sh.ends_with("/sh") && Path::new(&sh).is_file(), "{sh}");
        assert_eq!(resolve("no-such-program-xyz", DEFAULT_PATH), "");
    }

    #[test]
    fn numeric_users_without_passwd_entries_are_allowed() {
        let u = lookup_user("4242424").expect("numeric uid");
        assert_eq!((u.uid, u.gid, u.home.as_str()), (4242424, 4242424, "/"));
        assert!(lookup_user("no-such-user-xyz").is_none());
        assert_eq!(lookup_user("root").map(|u| u.uid), Some(0));
    }
}
