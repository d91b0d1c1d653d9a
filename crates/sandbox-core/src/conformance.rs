//! The backend conformance suite: one async function per promised behaviour, and [`Suite`], which
//! turns them into one named test per check.
//!
//! Backends call these from their own test files (feature `conformance`). Each check panics with
//! a message naming the behaviour when the backend does not hold it, like an `assert!` would.
//! A backend's conformance test is a `harness = false` test target whose `main` hands the
//! suite's trials to [`run_trials`], so `cargo test` lists and reports every check by name
//! (`test create ... ok`, `test exit_codes ... FAILED`) and a failure names its check:
//!
//! ```no_run
//! # use sandbox_core::conformance::{self, Harness, Suite};
//! # fn t<H: Harness + 'static>(h: H) {
//! let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
//! let suite = Suite::new(move || h, rt.handle().clone());
//! let mut trials = suite.checks(); // create, the shared-sandbox checks, destroy, unreachable agent
//! // ... backend-specific trials here ...
//! trials.push(suite.leaves_nothing_behind());
//! let conclusion = conformance::run_trials(trials);
//! suite.finish(); // destroys the shared sandbox if a filtered run left it
//! conclusion.exit();
//! # }
//! ```
//!
//! Checks that need one sandbox take `&dyn Sandbox`, so the suite shares one sandbox (one VM for
//! the KVM backend) between them; the checks about creation, raw frames and teardown take the
//! backend's [`Harness`]. The trials run one at a time, in order: they share that sandbox, and the
//! last one compares the host inventory with the one taken before the first.

use std::collections::BTreeSet;
use std::future::Future;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
pub use libtest_mimic::{Conclusion, Failed, Trial};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::error::{ErrorKind, Result};
use crate::exec::{ExecEvent, ExecRequest};
use crate::file::{FileKind, FileOptions, MAX_FILE_BYTES};
use crate::protocol::{self, asynch, AgentFrame, AgentMessage, Hello, Role, MAX_FRAME_BYTES};
use crate::sandbox::{Runtime, Sandbox};
use crate::spec::SandboxSpec;
use crate::state::SandboxState;

/// A raw byte stream to an agent, before the handshake.
pub trait RawStream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> RawStream for T {}

/// What a backend supplies to be tested.
#[async_trait]
pub trait Harness: Send + Sync {
    /// The runtime under test.
    fn runtime(&self) -> &dyn Runtime;

    /// A spec that boots a working sandbox.
    fn spec(&self) -> SandboxSpec;

    /// A new raw, un-handshaken stream to `sandbox`'s agent (for the KVM backend: the vsock Unix
    /// socket after `CONNECT 1024`).
    async fn raw_agent_stream(&self, sandbox: &dyn Sandbox) -> Result<Box<dyn RawStream>>;

    /// Creates a sandbox whose agent never answers (for example a guest whose init is not the
    /// agent); the backend must fail with `AgentUnreachable` (or `Timeout`) by
    /// [`Harness::unreachable_deadline`].
    async fn create_unreachable(&self) -> Result<Box<dyn Sandbox>>;

    /// The handshake deadline the backend promises for [`Harness::create_unreachable`].
    fn unreachable_deadline(&self) -> Duration;

    /// Everything on the host the backend could leave behind (processes, files, sockets), as
    /// comparable strings. Compared before create and after destroy.
    async fn inventory(&self) -> Result<BTreeSet<String>>;
}

/// Creates a sandbox from the harness spec and checks it is running.
pub async fn create(h: &dyn Harness) -> Box<dyn Sandbox> {
    let sb = h
        .runtime()
        .create(h.spec())
        .await
        .expect("create() of a valid spec must succeed");
    assert_eq!(
        sb.state(),
        SandboxState::Running,
        "a created sandbox must be Running"
    );
    sb
}

/// A check that runs against the suite's shared sandbox.
type SharedCheck = for<'a> fn(&'a dyn Harness, &'a dyn Sandbox) -> BoxFuture<'a>;
type BoxFuture<'a> = std::pin::Pin<Box<dyn Future<Output = ()> + Send + 'a>>;

/// The checks that share one sandbox, in the order they run, by name.
const SHARED_CHECKS: &[(&str, SharedCheck)] = &[
    ("exit_codes", |_, sb| Box::pin(exit_codes(sb))),
    ("stdout_stderr_separate_and_ordered", |_, sb| {
        Box::pin(stdout_stderr_separate_and_ordered(sb))
    }),
    ("stream_10_mib", |_, sb| Box::pin(stream_10_mib(sb))),
    ("stdin_round_trip", |_, sb| Box::pin(stdin_round_trip(sb))),
    ("timeout_kills_process_group", |_, sb| {
        Box::pin(timeout_kills_process_group(sb))
    }),
    ("no_zombies_after_1000_execs", |_, sb| {
        Box::pin(no_zombies_after_1000_execs(sb))
    }),
    ("dropped_stream_kills_command", |_, sb| {
        Box::pin(dropped_stream_kills_command(sb))
    }),
    ("concurrent_execs", |_, sb| Box::pin(concurrent_execs(sb))),
    ("file_round_trip", |_, sb| Box::pin(file_round_trip(sb))),
    ("confined_root_blocks_escapes", |_, sb| {
        Box::pin(confined_root_blocks_escapes(sb))
    }),
    ("oversized_frames_refused", |h, sb| {
        Box::pin(oversized_frames_refused(h, sb))
    }),
];

/// The conformance suite as named trials over one backend, sharing one sandbox.
///
/// Built from a function that makes the backend's [`Harness`] and the handle of a tokio runtime
/// that outlives every trial (the shared sandbox's background tasks live on it). The harness is
/// made, and the host inventory taken, when the first trial runs, so listing the trials
/// (`--list`) touches nothing. [`Suite::leaves_nothing_behind`] compares against that inventory.
pub struct Suite<H: Harness + 'static> {
    inner: Arc<SuiteInner<H>>,
}

impl<H: Harness + 'static> Clone for Suite<H> {
    fn clone(&self) -> Self {
        Suite {
            inner: self.inner.clone(),
        }
    }
}

type MakeHarness<H> = Box<dyn FnOnce() -> H + Send>;

struct SuiteInner<H> {
    make: Mutex<Option<MakeHarness<H>>>,
    /// The harness and the host inventory before the first trial.
    started: OnceLock<(Arc<H>, BTreeSet<String>)>,
    rt: tokio::runtime::Handle,
    /// The shared sandbox: `None` before `create` and after `destroy`.
    shared: tokio::sync::Mutex<Option<Box<dyn Sandbox>>>,
    /// Set once the shared sandbox was destroyed, so later checks fail instead of re-creating it.
    destroyed: Mutex<bool>,
    /// How long each passed trial took, printed by [`Suite::finish`].
    times: Mutex<Vec<(String, Duration)>>,
}

impl<H: Harness + 'static> std::fmt::Debug for Suite<H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Suite")
            .field("started", &self.inner.started.get().is_some())
            .finish_non_exhaustive()
    }
}

impl<H: Harness + 'static> Suite<H> {
    /// A suite over the harness `make` returns; `make` runs on the first trial, inside `rt`.
    pub fn new(make: impl FnOnce() -> H + Send + 'static, rt: tokio::runtime::Handle) -> Self {
        Suite {
            inner: Arc::new(SuiteInner {
                make: Mutex::new(Some(Box::new(make))),
                started: OnceLock::new(),
                rt,
                shared: tokio::sync::Mutex::new(None),
                destroyed: Mutex::new(false),
                times: Mutex::new(Vec::new()),
            }),
        }
    }

    /// A trial named `name` that runs `f` on the suite's runtime with the harness; a panic is
    /// the trial's failure.
    pub fn trial<F, Fut>(&self, name: &str, f: F) -> Trial
    where
        F: FnOnce(Arc<H>) -> Fut + Send + 'static,
        Fut: Future<Output = ()>,
    {
        let inner = self.inner.clone();
        let name_owned = name.to_string();
        Trial::test(name, move || {
            let h = inner.harness();
            let started = Instant::now();
            inner.rt.block_on(f(h));
            inner.record(name_owned, started);
            Ok(())
        })
    }

    /// `create`, every shared-sandbox check, `destroy`, then `unreachable_agent_is_typed`.
    pub fn checks(&self) -> Vec<Trial> {
        let mut trials = Vec::new();
        let inner = self.inner.clone();
        trials.push(Trial::test("create", move || {
            let h = inner.harness();
            let started = Instant::now();
            drop(inner.rt.block_on(inner.shared_sandbox(&h))?);
            inner.record("create".into(), started);
            Ok(())
        }));
        for &(name, check) in SHARED_CHECKS {
            let inner = self.inner.clone();
            trials.push(Trial::test(name, move || {
                let h = inner.harness();
                inner.rt.block_on(async {
                    let started = Instant::now();
                    let guard = inner.shared_sandbox(&h).await?;
                    let sb = guard.as_deref().ok_or("the shared sandbox is gone")?;
                    check(h.as_ref(), sb).await;
                    inner.record(name.to_string(), started);
                    Ok::<(), Failed>(())
                })
            }));
        }
        let inner = self.inner.clone();
        trials.push(Trial::test("destroy", move || {
            let h = inner.harness();
            inner.rt.block_on(async {
                // Created here if a filtered run skipped `create`, so `destroy` is always tested.
                let sb = inner.shared_sandbox(&h).await?.take();
                *inner.destroyed.lock().expect("not poisoned") = true;
                let sb = sb.ok_or("the shared sandbox is gone")?;
                destroy(h.as_ref(), sb).await;
                Ok::<(), Failed>(())
            })
        }));
        trials.push(self.trial("unreachable_agent_is_typed", |h| async move {
            unreachable_agent_is_typed(h.as_ref()).await
        }));
        trials
    }

    /// The last trial: the host inventory is what it was before the first (no process, file,
    /// socket or fd left by anything the trials created).
    pub fn leaves_nothing_behind(&self) -> Trial {
        let inner = self.inner.clone();
        Trial::test("leaves_nothing_behind", move || {
            let h = inner.harness();
            inner.rt.block_on(async {
                if let Some(sb) = inner.shared.lock().await.take() {
                    let _ = sb.destroy().await;
                }
                let before = &inner.started.get().expect("harness() ran").1;
                let after = h.inventory().await.expect("inventory");
                let gone: Vec<_> = before.difference(&after).collect();
                let added: Vec<_> = after.difference(before).collect();
                if gone.is_empty() && added.is_empty() {
                    Ok(())
                } else {
                    Err(format!(
                        "the host inventory changed: left behind {added:?}, missing {gone:?}"
                    )
                    .into())
                }
            })
        })
    }

    /// Destroys the shared sandbox if it still exists (a filtered run that skipped `destroy`)
    /// and prints how long each passed trial took.
    pub fn finish(&self) {
        let inner = self.inner.clone();
        inner.rt.block_on(async {
            if let Some(sb) = inner.shared.lock().await.take() {
                let _ = sb.destroy().await;
            }
        });
        let times = inner.times.lock().expect("not poisoned");
        if !times.is_empty() {
            let list: Vec<String> = times
                .iter()
                .map(|(n, d)| format!("{n} {} ms", d.as_millis()))
                .collect();
            println!("conformance times: {}", list.join(", "));
        }
    }
}

impl<H: Harness + 'static> SuiteInner<H> {
    /// The harness, made on first use, with the host inventory taken right after (panics if
    /// it cannot be listed: the suite cannot judge teardown without it).
    fn harness(&self) -> Arc<H> {
        self.started
            .get_or_init(|| {
                let make = self
                    .make
                    .lock()
                    .expect("not poisoned")
                    .take()
                    .expect("the harness is made once");
                let h = {
                    // A harness may need the runtime (to spawn, or for tokio types).
                    let _enter = self.rt.enter();
                    Arc::new(make())
                };
                let before = self
                    .rt
                    .block_on(h.inventory())
                    .expect("the harness lists the host inventory");
                (h, before)
            })
            .0
            .clone()
    }

    fn record(&self, name: String, started: Instant) {
        self.times
            .lock()
            .expect("not poisoned")
            .push((name, started.elapsed()));
    }

    /// The shared sandbox, created on first use.
    async fn shared_sandbox(
        &self,
        h: &H,
    ) -> std::result::Result<tokio::sync::MutexGuard<'_, Option<Box<dyn Sandbox>>>, Failed> {
        let mut guard = self.shared.lock().await;
        if guard.is_none() {
            if *self.destroyed.lock().expect("not poisoned") {
                return Err("the shared sandbox was destroyed by an earlier trial".into());
            }
            *guard = Some(create(h).await);
        }
        Ok(guard)
    }
}

/// The `main` of a backend's conformance test target (`harness = false`): a multi-threaded
/// tokio runtime, the [`Suite`] over the harness `make` returns, its [`Suite::checks`], then the
/// backend's own trials from `extra`, then [`Suite::leaves_nothing_behind`]; exits with the
/// harness's status.
pub fn main<H: Harness + 'static>(
    make: impl FnOnce() -> H + Send + 'static,
    extra: impl FnOnce(&Suite<H>) -> Vec<Trial>,
) -> ! {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let suite = Suite::new(make, rt.handle().clone());
    let mut trials = suite.checks();
    trials.extend(extra(&suite));
    trials.push(suite.leaves_nothing_behind());
    let conclusion = run_trials(trials);
    suite.finish();
    // Drops the harness (and whatever it owns, such as a state directory) before exiting.
    drop(suite);
    drop(rt);
    conclusion.exit()
}

/// Every check in one call, in [`Suite`]'s order, sharing one sandbox; for a backend that wants
/// the whole suite as a single test (a failure then names its check in the panic message only).
pub async fn run_all(h: &dyn Harness) {
    let before = h.inventory().await.expect("inventory");
    let sb = create(h).await;
    for &(_, check) in SHARED_CHECKS {
        check(h, sb.as_ref()).await;
    }
    destroy(h, sb).await;
    let after = h.inventory().await.expect("inventory");
    assert_eq!(
        before, after,
        "destroy must leave the host inventory as it was"
    );
    unreachable_agent_is_typed(h).await;
}

/// Runs `trials` like the built-in test harness (`--list`, `--exact`, name filters,
/// `--format terse`, `--nocapture` accepted), one at a time and in order.
///
/// Unlike `libtest_mimic::Arguments`, any number of name filters is accepted, as libtest does
/// (`cargo xtask test` passes the exact names of the tests it selected).
pub fn run_trials(trials: Vec<Trial>) -> Conclusion {
    run_trials_with(std::env::args().skip(1).collect(), trials)
}

/// [`run_trials`] with explicit arguments (without the program name).
pub fn run_trials_with(args: Vec<String>, trials: Vec<Trial>) -> Conclusion {
    let (flags, filters) = split_args(args);
    let mut parsed = libtest_mimic::Arguments::from_iter(
        std::iter::once("conformance".to_string()).chain(flags),
    );
    // The trials share one sandbox and end with an inventory check: one at a time, in order.
    parsed.test_threads = Some(1);
    let trials = if filters.len() > 1 {
        select(trials, &filters, parsed.exact)
    } else {
        parsed.filter = filters.into_iter().next();
        trials
    };
    libtest_mimic::run(&parsed, trials)
}

/// Splits libtest arguments into flags (with their values) and positional name filters.
fn split_args(args: Vec<String>) -> (Vec<String>, Vec<String>) {
    // Options of libtest that take a value as the next argument.
    const WITH_VALUE: &[&str] = &[
        "--format",
        "--test-threads",
        "--skip",
        "--color",
        "--logfile",
        "-Z",
    ];
    let mut flags = Vec::new();
    let mut filters = Vec::new();
    let mut it = args.into_iter();
    while let Some(a) = it.next() {
        if WITH_VALUE.contains(&a.as_str()) {
            flags.push(a);
            flags.extend(it.next());
        } else if a.starts_with('-') {
            flags.push(a);
        } else {
            filters.push(a);
        }
    }
    (flags, filters)
}

/// The trials any filter matches (by name, or by substring unless `exact`), in their order.
fn select(mut trials: Vec<Trial>, filters: &[String], exact: bool) -> Vec<Trial> {
    trials.retain(|t| {
        filters.iter().any(|f| {
            if exact {
                t.name() == f
            } else {
                t.name().contains(f.as_str())
            }
        })
    });
    trials
}

async fn sh(sb: &dyn Sandbox, script: &str) -> crate::ExecOutput {
    sb.exec(ExecRequest::shell(script))
        .await
        .expect("exec must succeed")
}

/// Exit codes 0, 1 and 127 (unknown command, both through a shell and directly), death by
/// signal, and the agent's reason in a refusal (missing cwd, unknown user).
pub async fn exit_codes(sb: &dyn Sandbox) {
    assert_eq!(sh(sb, "exit 0").await.status.code, Some(0), "exit 0");
    assert_eq!(sh(sb, "exit 1").await.status.code, Some(1), "exit 1");
    assert_eq!(
        sh(sb, "no-such-command-xyz").await.status.code,
        Some(127),
        "shell: not found"
    );
    let direct = sb
        .exec(ExecRequest::new(["/no/such/binary"]))
        .await
        .expect("exec");
    assert_eq!(
        direct.status.code,
        Some(127),
        "direct exec of a missing binary: {direct:?}"
    );
    let killed = sh(sb, "kill -9 $$").await;
    assert_eq!(
        (killed.status.code, killed.status.signal),
        (None, Some(9)),
        "death by SIGKILL"
    );
    assert!(!killed.status.timed_out);
    let term = sh(sb, "kill -15 $$").await;
    assert_eq!(term.status.signal, Some(15), "death by SIGTERM");
    // A refused request carries the agent's reason, not just its kind.
    let err = sb
        .exec(ExecRequest::shell("pwd").cwd("/no-such-dir-xyz"))
        .await
        .expect_err("missing cwd");
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
    assert!(err.message().contains("/no-such-dir-xyz"), "{err}");
    let err = sb
        .exec(ExecRequest::shell("id").user("no-such-user-xyz"))
        .await
        .expect_err("unknown user");
    assert_eq!(err.kind(), ErrorKind::InvalidRequest, "{err}");
    assert!(err.message().contains("no-such-user-xyz"), "{err}");
}

/// Stdout and stderr arrive on their own streams, each in order.
pub async fn stdout_stderr_separate_and_ordered(sb: &dyn Sandbox) {
    let out = sh(
        sb,
        "for i in 1 2 3 4 5; do echo out$i; echo err$i >&2; done",
    )
    .await;
    assert_eq!(out.stdout_str(), "out1\nout2\nout3\nout4\nout5\n");
    assert_eq!(out.stderr_str(), "err1\nerr2\nerr3\nerr4\nerr5\n");
    assert_eq!(out.status.code, Some(0));
}

/// 10 MiB of stdout, streamed, arrive complete and in order.
pub async fn stream_10_mib(sb: &dyn Sandbox) {
    const TOTAL: usize = 10 * 1024 * 1024;
    // Each line is "NNNNNNN\n": its own number, so loss or reordering shows.
    let script = "i=0; while [ $i -lt 1310720 ]; do printf '%07d\\n' $i; i=$((i+1)); done";
    let fast = "seq -w 0 1310719";
    let req = ExecRequest::shell(format!(
        "command -v seq >/dev/null && {fast} || {{ {script}; }}"
    ));
    let mut stream = sb.exec_stream(req).await.expect("exec_stream");
    let mut buf = Vec::with_capacity(TOTAL);
    let mut status = None;
    while let Some(ev) = stream.next().await {
        match ev.expect("stream event") {
            ExecEvent::Stdout(b) => buf.extend_from_slice(&b),
            ExecEvent::Stderr(b) => panic!("unexpected stderr: {}", String::from_utf8_lossy(&b)),
            ExecEvent::Exit(s) => status = Some(s),
        }
    }
    assert_eq!(status.map(|s| s.code), Some(Some(0)));
    assert_eq!(buf.len(), TOTAL, "10 MiB must arrive without loss");
    for (i, line) in buf.chunks(8).enumerate() {
        let expect = format!("{i:07}\n");
        assert_eq!(
            line,
            expect.as_bytes(),
            "line {i} out of order or corrupted"
        );
    }
}

/// Stdin (binary, 256 KiB) comes back unchanged through `cat`.
pub async fn stdin_round_trip(sb: &dyn Sandbox) {
    let data: Vec<u8> = (0..256 * 1024).map(|i| (i % 251) as u8).collect();
    let out = sb
        .exec(ExecRequest::new(["cat"]).stdin(data.clone()))
        .await
        .expect("exec");
    assert_eq!(out.status.code, Some(0));
    assert!(
        out.stdout == data,
        "stdin round trip changed the data ({} bytes back)",
        out.stdout.len()
    );
    let empty = sb.exec(ExecRequest::new(["cat"])).await.expect("exec");
    assert_eq!(
        (empty.status.code, empty.stdout.len()),
        (Some(0), 0),
        "empty stdin is closed"
    );
}

/// A timeout kills the whole process group, including a backgrounded `sleep`.
pub async fn timeout_kills_process_group(sb: &dyn Sandbox) {
    // Generous: under nested emulation the shell must get to its `echo` before the deadline.
    let req = ExecRequest::shell("sleep 1000 & echo $!; wait").timeout(Duration::from_secs(3));
    let out = sb.exec(req).await.expect("exec");
    assert!(
        out.status.timed_out,
        "timed_out must be set: {:?}",
        out.status
    );
    assert_eq!(
        out.status.signal,
        Some(9),
        "the group leader dies by SIGKILL"
    );
    let bg: u32 = out
        .stdout_str()
        .trim()
        .parse()
        .expect("the background pid was printed");
    // The killed sleep is reaped by the agent; poll briefly for it to vanish.
    let check = format!(
        "for i in $(seq 1 100 2>/dev/null || echo 1 2 3 4 5 6 7 8 9 10); do \
           [ -e /proc/{bg} ] || exit 0; \
           s=$(cat /proc/{bg}/stat 2>/dev/null) || exit 0; s=${{s##*) }}; \
           [ \"${{s%% *}}\" = Z ] && exit 3; sleep 0.1; \
         done; exit 4"
    );
    let gone = sh(sb, &check).await;
    assert_eq!(
        gone.status.code,
        Some(0),
        "the backgrounded sleep {bg} survived the timeout (3: zombie, 4: alive)"
    );
}

/// Polls (bounded) inside the guest until `pid` is gone (reaped, not a zombie).
async fn wait_gone(sb: &dyn Sandbox, pid: u32) -> bool {
    let check = format!(
        "for i in $(seq 1 100 2>/dev/null || echo 1 2 3 4 5 6 7 8 9 10); do \
           [ -e /proc/{pid} ] || exit 0; sleep 0.1; \
         done; exit 4"
    );
    sh(sb, &check).await.status.code == Some(0)
}

/// Dropping an [`ExecStream`](crate::ExecStream) kills the command, even a silent one.
pub async fn dropped_stream_kills_command(sb: &dyn Sandbox) {
    let mut stream = sb
        .exec_stream(ExecRequest::shell("echo $$; exec sleep 1000"))
        .await
        .expect("exec_stream");
    let pid = match stream.next().await {
        Some(Ok(ExecEvent::Stdout(b))) => String::from_utf8_lossy(&b)
            .trim()
            .parse::<u32>()
            .expect("pid"),
        other => panic!("expected the command's pid on stdout, got {other:?}"),
    };
    drop(stream);
    assert!(
        wait_gone(sb, pid).await,
        "command {pid} outlived its dropped stream"
    );
}

/// Four commands run at the same time on one sandbox: each waits for a file only the last creates.
pub async fn concurrent_execs(sb: &dyn Sandbox) {
    let gate = "/tmp/conformance-gate";
    let waiter = format!(
        "for n in $(seq 1 600); do [ -e {gate} ] && {{ echo go; exit 0; }}; sleep 0.05; done; exit 1"
    );
    let _ = sh(sb, &format!("rm -f {gate}")).await;
    let w = || sb.exec(ExecRequest::shell(waiter.clone()));
    let opener = async {
        // Let the waiters start first; they poll, so the order does not matter for correctness.
        tokio::time::sleep(Duration::from_millis(200)).await;
        sb.exec(ExecRequest::shell(format!("touch {gate}; echo go")))
            .await
    };
    let (a, b, c, d) = tokio::join!(w(), w(), w(), opener);
    for out in [a, b, c, d] {
        let out = out.expect("exec");
        assert_eq!(
            (out.status.code, out.stdout_str()),
            (Some(0), "go\n".to_owned()),
            "concurrent exec"
        );
    }
    let _ = sh(sb, &format!("rm -f {gate}")).await;
}

/// Counts zombie children of the agent (the parent of the shell running the script).
const COUNT_ZOMBIES: &str =
    "n=0; for f in /proc/[0-9]*/stat; do s=$(cat $f 2>/dev/null) || continue; \
    s=${s##*) }; set -- $s; [ \"$1\" = Z ] && [ \"$2\" = \"$PPID\" ] && n=$((n+1)); done; echo $n";

/// 1000 short commands (and orphans they leave) leave no zombies behind.
pub async fn no_zombies_after_1000_execs(sb: &dyn Sandbox) {
    for i in 0..1000 {
        let req = if i % 10 == 0 {
            // An orphan: the shell exits, its background child is reparented to the agent.
            ExecRequest::shell("(sleep 0.01; true) & exit 0")
        } else {
            ExecRequest::new(["true"])
        };
        let out = sb.exec(req).await.expect("exec");
        assert_eq!(out.status.code, Some(0), "exec {i}");
    }
    let mut last = String::new();
    for _ in 0..50 {
        last = sh(sb, COUNT_ZOMBIES).await.stdout_str();
        if last.trim() == "0" {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("zombies remain after 1000 execs: {}", last.trim());
}

/// Binary files round-trip (several chunks), listing shows them, remove removes them, caps hold.
pub async fn file_round_trip(sb: &dyn Sandbox) {
    let dir = "/tmp/conformance-files";
    let path = "/tmp/conformance-files/sub/blob.bin";
    let data: Vec<u8> = (0..3 * 1024 * 1024 + 17)
        .map(|i: u32| (i.wrapping_mul(2654435761) >> 24) as u8)
        .collect();
    let opts = FileOptions::new().create_parents(true).mode(0o600);
    sb.write_file(path, &data, &opts).await.expect("write_file");
    let back = sb
        .read_file(path, &FileOptions::new())
        .await
        .expect("read_file");
    assert!(
        back == data,
        "read_file returned {} bytes, different from the {} written",
        back.len(),
        data.len()
    );
    let listing = sb
        .list("/tmp/conformance-files/sub", &FileOptions::new())
        .await
        .expect("list");
    let e = listing
        .entries
        .iter()
        .find(|e| e.name == "blob.bin")
        .expect("listed");
    assert_eq!(
        (e.kind, e.size, e.mode),
        (FileKind::File, data.len() as u64, 0o600)
    );
    sb.write_file("/tmp/conformance-files/empty", b"", &FileOptions::new())
        .await
        .expect("empty file");
    assert_eq!(
        sb.read_file("/tmp/conformance-files/empty", &FileOptions::new())
            .await
            .expect("read"),
        b""
    );
    sb.remove(path, &FileOptions::new()).await.expect("remove");
    let err = sb
        .read_file(path, &FileOptions::new())
        .await
        .expect_err("removed file");
    assert_eq!(err.kind(), ErrorKind::NotFound);
    let too_big = vec![0u8; MAX_FILE_BYTES as usize + 1];
    let err = sb
        .write_file(path, &too_big, &FileOptions::new())
        .await
        .expect_err("over the cap");
    assert_eq!(err.kind(), ErrorKind::TooLarge);
    let err = sb
        .read_file("relative/path", &FileOptions::new())
        .await
        .expect_err("relative");
    assert_eq!(err.kind(), ErrorKind::InvalidRequest);
    sb.remove("/tmp/conformance-files/empty", &FileOptions::new())
        .await
        .expect("remove");
    sb.remove("/tmp/conformance-files/sub", &FileOptions::new())
        .await
        .expect("remove dir");
    sb.remove(dir, &FileOptions::new())
        .await
        .expect("remove dir");
}

/// With a confined root, `..` and symlinks (absolute, relative, through `/proc`) cannot leave it,
/// for reads, writes, lists and removes; symlinks inside the root still work.
pub async fn confined_root_blocks_escapes(sb: &dyn Sandbox) {
    let setup = sh(
        sb,
        "set -e; rm -rf /tmp/jail /tmp/outside; mkdir -p /tmp/jail/d /tmp/outside; \
         echo secret > /tmp/outside/secret; echo inside > /tmp/jail/d/ok; \
         ln -s /tmp/outside /tmp/jail/abs; ln -s ../outside /tmp/jail/rel; \
         ln -s /tmp/outside/secret /tmp/jail/file; ln -s d/ok /tmp/jail/good; \
         ln -s /proc/self/root/tmp/outside /tmp/jail/magic",
    )
    .await;
    assert_eq!(setup.status.code, Some(0), "setup: {}", setup.stderr_str());
    let jail = FileOptions::new().confined_to("/tmp/jail");
    for p in [
        "abs/secret",
        "rel/secret",
        "file",
        "../outside/secret",
        "/../outside/secret",
        "magic/secret",
    ] {
        let err = sb.read_file(p, &jail).await.expect_err(p);
        assert_eq!(err.kind(), ErrorKind::PermissionDenied, "read {p}: {err}");
        let err = sb.write_file(p, b"pwned", &jail).await.expect_err(p);
        assert_eq!(err.kind(), ErrorKind::PermissionDenied, "write {p}: {err}");
    }
    for p in ["abs", "rel", "magic"] {
        let err = sb.list(p, &jail).await.expect_err(p);
        assert_eq!(err.kind(), ErrorKind::PermissionDenied, "list {p}: {err}");
    }
    let err = sb
        .remove("abs/secret", &jail)
        .await
        .expect_err("remove through symlink");
    assert_eq!(err.kind(), ErrorKind::PermissionDenied);
    assert_eq!(
        sb.read_file("d/ok", &jail).await.expect("inside"),
        b"inside\n"
    );
    assert_eq!(
        sb.read_file("/d/ok", &jail).await.expect("leading slash"),
        b"inside\n"
    );
    let good = sb.read_file("good", &jail).await;
    assert_eq!(good.expect("an inside symlink"), b"inside\n");
    // Removing a symlink removes the link, never its target.
    sb.remove("file", &jail).await.expect("remove the link");
    let secret = sb
        .read_file("/tmp/outside/secret", &FileOptions::new())
        .await
        .expect("target intact");
    assert_eq!(secret, b"secret\n");
    let created = FileOptions::new()
        .confined_to("/tmp/jail")
        .create_parents(true);
    sb.write_file("new/dir/f", b"x", &created)
        .await
        .expect("create parents inside");
    let err = sb
        .write_file("abs/new/f", b"x", &created)
        .await
        .expect_err("create parents through a link");
    assert_eq!(err.kind(), ErrorKind::PermissionDenied);
    assert_eq!(
        sh(sb, "ls /tmp/outside").await.stdout_str(),
        "secret\n",
        "nothing was created outside"
    );
    sh(sb, "rm -rf /tmp/jail /tmp/outside").await;
}

async fn raw_handshake(h: &dyn Harness, sb: &dyn Sandbox) -> Box<dyn RawStream> {
    let mut s = h.raw_agent_stream(sb).await.expect("raw agent stream");
    asynch::write_hello(&mut s, Role::Host)
        .await
        .expect("hello");
    let hello = asynch::read_hello_bytes(&mut s).await.expect("agent hello");
    Hello::check(hello, Role::Agent).expect("agent hello is valid");
    s
}

/// Reads until the agent closes the stream, allowing one `Error` frame first (bounded wait).
async fn expect_closed(s: &mut Box<dyn RawStream>, what: &str) {
    let closed = async {
        loop {
            match asynch::read_frame::<AgentFrame, _>(s).await {
                Ok(Some(AgentFrame {
                    body: AgentMessage::Error(e),
                    ..
                })) => {
                    assert_eq!(e.kind, protocol::AgentErrorKind::Protocol, "{what}: {e:?}");
                }
                Ok(Some(f)) => panic!("{what}: unexpected frame {f:?}"),
                Ok(None) | Err(_) => return,
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(30), closed)
        .await
        .unwrap_or_else(|_| panic!("{what}: the agent kept the connection open"));
}

/// Oversized and garbage frames are refused and the connection closed; a wrong magic or version
/// gets no service; the agent keeps serving new connections.
pub async fn oversized_frames_refused(h: &dyn Harness, sb: &dyn Sandbox) {
    let mut s = raw_handshake(h, sb).await;
    s.write_all(&(MAX_FRAME_BYTES + 1).to_be_bytes())
        .await
        .expect("write header");
    let _ = s.write_all(&[0u8; 4096]).await;
    expect_closed(&mut s, "oversized frame").await;

    let mut s = raw_handshake(h, sb).await;
    s.write_all(&[0, 0, 0, 3, 0xff, 0xff, 0xff])
        .await
        .expect("write garbage");
    expect_closed(&mut s, "undecodable frame").await;

    let mut s = h.raw_agent_stream(sb).await.expect("raw agent stream");
    let mut bad = Hello::ours(Role::Host).encode();
    bad[4..6].copy_from_slice(&(protocol::PROTOCOL_VERSION + 1).to_be_bytes());
    s.write_all(&bad).await.expect("write hello");
    let reply = asynch::read_hello_bytes(&mut s).await;
    if let Ok(reply) = reply {
        Hello::check(reply, Role::Agent).expect("the agent replies with its own valid hello");
    }
    let mut rest = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut rest)).await;
    assert!(
        matches!(n, Ok(Ok(0)) | Ok(Err(_))),
        "a version mismatch must close the connection: {n:?}"
    );

    // Still serving.
    assert_eq!(sh(sb, "echo alive").await.stdout_str(), "alive\n");
}

/// An agent that never answers gives `AgentUnreachable` (or `Timeout`) within the deadline.
pub async fn unreachable_agent_is_typed(h: &dyn Harness) {
    let deadline = h.unreachable_deadline();
    let slack = deadline / 2 + Duration::from_secs(10);
    let r = tokio::time::timeout(deadline + slack, h.create_unreachable())
        .await
        .unwrap_or_else(|_| {
            panic!(
                "create() with an unreachable agent did not fail within {:?}",
                deadline + slack
            )
        });
    match r {
        Ok(sb) => {
            let _ = sb.destroy().await;
            panic!("create() with an unreachable agent succeeded");
        }
        Err(e) => assert!(
            matches!(e.kind(), ErrorKind::AgentUnreachable | ErrorKind::Timeout),
            "unreachable agent gave {e}"
        ),
    }
}

/// Destroys `sb`, checks the state machine and that further calls fail with `InvalidState`.
/// Compare [`Harness::inventory`] before create and after this (as [`Suite`] does).
pub async fn destroy(_h: &dyn Harness, sb: Box<dyn Sandbox>) {
    sb.destroy().await.expect("destroy");
    assert_eq!(sb.state(), SandboxState::Destroyed);
    let err = sb
        .exec(ExecRequest::new(["true"]))
        .await
        .expect_err("exec after destroy");
    assert_eq!(err.kind(), ErrorKind::InvalidState);
    sb.destroy().await.expect("a second destroy is a no-op");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    fn names(trials: &[Trial]) -> Vec<&str> {
        trials.iter().map(Trial::name).collect()
    }

    fn trials() -> Vec<Trial> {
        ["create", "exit_codes", "destroy"]
            .into_iter()
            .map(|n| Trial::test(n, || Ok(())))
            .collect()
    }

    #[test]
    fn flags_keep_their_values_and_the_rest_are_filters() {
        let (flags, filters) = split_args(strings(&[
            "--exact",
            "destroy",
            "--format",
            "terse",
            "create",
            "--test-threads",
            "2",
            "--nocapture",
        ]));
        assert_eq!(
            flags,
            strings(&[
                "--exact",
                "--format",
                "terse",
                "--test-threads",
                "2",
                "--nocapture"
            ])
        );
        assert_eq!(filters, strings(&["destroy", "create"]));
    }

    #[test]
    fn several_filters_select_in_trial_order() {
        let f = strings(&["destroy", "create"]);
        assert_eq!(names(&select(trials(), &f, true)), ["create", "destroy"]);
        assert_eq!(
            names(&select(trials(), &strings(&["e"]), true)),
            Vec::<&str>::new()
        );
        assert_eq!(
            names(&select(trials(), &strings(&["e", "x"]), false)),
            ["create", "exit_codes", "destroy"]
        );
    }
}
