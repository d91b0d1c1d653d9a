//! The main job: an agent's verification loop in a throwaway micro-VM, on a real project.
//!
//! 1. On the host, create a small real project: a git repository with a SQLite database
//!    (`data/app.db`, real rows), a schema migration (`migrations/002_add_created_at.sql`, applied
//!    by `migrate.sh`) and the migration's tests (python3 `unittest`).
//! 2. Boot a sandbox (`KvmRuntime`: one `sandbox-vmm` process, the agent as the guest's PID 1)
//!    and copy the project in (a tar stream through `exec` stdin).
//! 3. Inside: `git log`, run the migration, run the tests.
//! 4. Then the destructive mistakes an agent makes: `DROP TABLE users`, `rm -rf data`, and
//!    finally `rm -rf --no-preserve-root /`. The sandbox's broken state is shown next to the
//!    host's untouched copy.
//! 5. Destroy the sandbox and show that nothing remains: no VMM process, no state directory.
//!
//! Needs `SANDBOX_KERNEL`, `SANDBOX_ROOTFS` (`cargo xtask guest`) and `SANDBOX_VMM`, a `/dev/kvm`
//! that boots Linux, and `git` + `sqlite3` on the host. `cargo xtask demo` sets all of that up
//! and runs this, inside a nested test host where the local KVM cannot boot Linux.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use sandbox_core::{ExecOutput, ExecRequest, FileOptions, Sandbox};
use sandbox_kvm::runtime::{KvmRuntime, KvmRuntimeConfig, KvmSandbox};

/// Where the project lives inside the sandbox.
const GUEST_PROJECT: &str = "/work/project";

const SCHEMA_001: &str = "\
-- 001: the initial schema.
CREATE TABLE users (
    id    INTEGER PRIMARY KEY,
    name  TEXT NOT NULL,
    email TEXT NOT NULL UNIQUE
);
CREATE TABLE orders (
    id       INTEGER PRIMARY KEY,
    user_id  INTEGER NOT NULL REFERENCES users(id),
    total_ct INTEGER NOT NULL
);
CREATE TABLE schema_version (version INTEGER NOT NULL);
INSERT INTO schema_version VALUES (1);
";

const ROWS: &str = "\
INSERT INTO users (name, email) VALUES
    ('Ada Lovelace',     'ada@example.org'),
    ('Grace Hopper',     'grace@example.org'),
    ('Alan Turing',      'alan@example.org'),
    ('Barbara Liskov',   'barbara@example.org'),
    ('Edsger Dijkstra',  'edsger@example.org'),
    ('Frances Allen',    'frances@example.org'),
    ('Ken Thompson',     'ken@example.org');
INSERT INTO orders (user_id, total_ct) VALUES
    (1, 1250), (1, 399), (2, 4999), (3, 120), (4, 880), (5, 15000), (6, 42), (7, 777);
";

const MIGRATION_002: &str = "\
-- 002: every user gets a creation date; existing users are backfilled.
BEGIN;
ALTER TABLE users ADD COLUMN created_at TEXT NOT NULL DEFAULT '1970-01-01';
UPDATE users SET created_at = '2024-01-0' || id;
CREATE INDEX users_created_at ON users(created_at);
UPDATE schema_version SET version = 2;
COMMIT;
";

const MIGRATE_SH: &str = r#"#!/bin/sh
# Applies every migration newer than the database's schema_version, in order.
set -eu
db=data/app.db
current=$(sqlite3 "$db" 'SELECT version FROM schema_version')
for f in migrations/[0-9][0-9][0-9]_*.sql; do
    n=$(basename "$f" | cut -c1-3 | sed 's/^0*//')
    if [ "$n" -gt "$current" ]; then
        echo "applying $f"
        sqlite3 -bail "$db" < "$f"
    fi
done
echo "schema version: $(sqlite3 "$db" 'SELECT version FROM schema_version')"
"#;

const TESTS: &str = r#"import sqlite3
import unittest

DB = "data/app.db"


class Migration002Test(unittest.TestCase):
    def setUp(self):
        self.db = sqlite3.connect(DB)

    def tearDown(self):
        self.db.close()

    def test_schema_version_is_2(self):
        (v,) = self.db.execute("SELECT version FROM schema_version").fetchone()
        self.assertEqual(v, 2)

    def test_created_at_column_exists(self):
        cols = [r[1] for r in self.db.execute("PRAGMA table_info(users)")]
        self.assertIn("created_at", cols)

    def test_no_user_was_lost(self):
        (n,) = self.db.execute("SELECT count(*) FROM users").fetchone()
        self.assertEqual(n, 7)

    def test_existing_users_are_backfilled(self):
        rows = self.db.execute("SELECT created_at FROM users").fetchall()
        self.assertTrue(all(r[0].startswith("2024-") for r in rows))

    def test_orders_still_join_their_users(self):
        (n,) = self.db.execute(
            "SELECT count(*) FROM orders JOIN users ON users.id = orders.user_id"
        ).fetchone()
        self.assertEqual(n, 8)


if __name__ == "__main__":
    unittest.main()
"#;

/// Prints numbered steps with their duration.
struct Steps {
    start: Instant,
    n: u32,
}

impl Steps {
    fn new() -> Self {
        Steps {
            start: Instant::now(),
            n: 0,
        }
    }

    fn begin(&mut self, title: &str) -> Instant {
        self.n += 1;
        println!("\n[{:>2}] {title}", self.n);
        Instant::now()
    }

    fn done(&self, t: Instant, note: &str) {
        println!(
            "     ✓ {note} ({} ms; {} ms since start)",
            t.elapsed().as_millis(),
            self.start.elapsed().as_millis()
        );
    }
}

/// Prints a command's output, indented, at most `max` lines per stream.
fn show(out: &ExecOutput, max: usize) {
    for (label, text) in [("out", out.stdout_str()), ("err", out.stderr_str())] {
        let lines: Vec<&str> = text.lines().collect();
        for l in lines.iter().take(max) {
            println!("     │ {label}: {l}");
        }
        if lines.len() > max {
            println!("     │ {label}: … ({} more lines)", lines.len() - max);
        }
    }
    let s = &out.status;
    let how = match (s.code, s.signal) {
        (Some(c), _) => format!("exit {c}"),
        (None, Some(sig)) => format!("killed by signal {sig}"),
        (None, None) => "ended".into(),
    };
    println!(
        "     └ {how}{} in {} ms",
        if s.timed_out { " (timed out)" } else { "" },
        s.duration.as_millis()
    );
}

async fn sh(sb: &KvmSandbox, script: &str) -> Result<ExecOutput> {
    println!("     $ {script}");
    let out = sb
        .exec(
            ExecRequest::shell(script)
                .cwd(GUEST_PROJECT)
                .timeout(Duration::from_secs(300)),
        )
        .await
        .with_context(|| format!("exec {script:?}"))?;
    show(&out, 20);
    Ok(out)
}

fn host(dir: &Path, program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .current_dir(dir)
        .output()
        .with_context(|| format!("running {program} on the host (is it installed?)"))?;
    ensure!(
        out.status.success(),
        "{program} {args:?} failed on the host: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `program` on the host with `input` on its stdin.
fn host_stdin(dir: &Path, program: &str, args: &[&str], input: &str) -> Result<String> {
    use std::io::Write;
    let mut child = Command::new(program)
        .args(args)
        .current_dir(dir)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("running {program} on the host (is it installed?)"))?;
    child
        .stdin
        .take()
        .context("stdin is piped")?
        .write_all(input.as_bytes())?;
    let out = child.wait_with_output()?;
    ensure!(
        out.status.success(),
        "{program} {args:?} failed on the host: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn host_sqlite(dir: &Path, sql: &str) -> Result<String> {
    Ok(host(dir, "sqlite3", &["data/app.db", sql])?
        .trim()
        .to_string())
}

/// The project, created for real on the host: files, database, two git commits.
fn create_project(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir.join("data"))?;
    std::fs::create_dir_all(dir.join("migrations"))?;
    std::fs::create_dir_all(dir.join("tests"))?;
    std::fs::write(dir.join("migrations/001_init.sql"), SCHEMA_001)?;
    std::fs::write(
        dir.join("README.md"),
        "# shop\n\nA tiny shop database. Run `./migrate.sh`, then `python3 -m unittest -v`.\n",
    )?;
    std::fs::write(dir.join(".gitignore"), "__pycache__/\n")?;
    host_stdin(
        dir,
        "sqlite3",
        &["-bail", "data/app.db"],
        &format!("{SCHEMA_001}{ROWS}"),
    )?;
    let git = |args: &[&str]| {
        let mut full = vec![
            "-c",
            "user.name=Demo Agent",
            "-c",
            "user.email=agent@example.org",
            "-c",
            "init.defaultBranch=main",
        ];
        full.extend_from_slice(args);
        host(dir, "git", &full)
    };
    git(&["init", "-q"])?;
    git(&["add", "."])?;
    git(&["commit", "-q", "-m", "Initial schema and seed data"])?;
    std::fs::write(dir.join("migrations/002_add_created_at.sql"), MIGRATION_002)?;
    std::fs::write(dir.join("migrate.sh"), MIGRATE_SH)?;
    std::fs::set_permissions(
        dir.join("migrate.sh"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )?;
    std::fs::write(dir.join("tests/__init__.py"), "")?;
    std::fs::write(dir.join("tests/test_migration_002.py"), TESTS)?;
    git(&["add", "."])?;
    git(&[
        "commit",
        "-q",
        "-m",
        "Migration 002: users.created_at, with tests",
    ])?;
    Ok(())
}

/// Every file under `dir` (relative), sorted, without `.git/`.
fn list_files(dir: &Path) -> Result<Vec<String>> {
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        for e in std::fs::read_dir(dir.join(&rel))? {
            let e = e?;
            let r = rel.join(e.file_name());
            if r == Path::new(".git") {
                continue;
            }
            if e.file_type()?.is_dir() {
                stack.push(r);
            } else {
                out.push(r.display().to_string());
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Processes whose command line mentions `needle` (the sandbox id is in the VMM's config path).
fn processes_mentioning(needle: &str) -> Vec<u32> {
    let mut pids = Vec::new();
    let me = std::process::id();
    if let Ok(rd) = std::fs::read_dir("/proc") {
        for e in rd.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            if pid == me {
                continue;
            }
            if let Ok(cmd) = std::fs::read(e.path().join("cmdline")) {
                if String::from_utf8_lossy(&cmd).contains(needle) {
                    pids.push(pid);
                }
            }
        }
    }
    pids
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let mut steps = Steps::new();
    println!("An agent task in a throwaway micro-VM: migrate a database, test it, then break it.");

    // 1. The project, on the host.
    let t = steps.begin("Create a real project on the host (git + SQLite + migration + tests)");
    let work = tempfile::Builder::new().prefix("agent-task-").tempdir()?;
    let project = work.path().join("shop");
    create_project(&project)?;
    let users_before = host_sqlite(&project, "SELECT count(*) FROM users")?;
    let log = host(&project, "git", &["log", "--oneline"])?;
    for l in log.lines() {
        println!("     │ git: {l}");
    }
    println!(
        "     │ host: {} ({users_before} users, schema v1)",
        project.display()
    );
    steps.done(t, "project committed");

    // 2. The runtime and one sandbox.
    let t = steps.begin("Start the KVM runtime and boot a sandbox");
    let runtime = KvmRuntime::new(KvmRuntimeConfig::default()).context(
        "KvmRuntime::new (run this through `cargo xtask demo`, which builds and sets up everything)",
    )?;
    let spec = runtime
        .spec_builder()
        .vcpus(1)
        .memory_mib(512)
        .ttl(Duration::from_secs(1800))
        .env("HOME", "/root")
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .build()?;
    let boot = Instant::now();
    let sb = runtime.create_sandbox(spec).await?;
    let id = sb.id().to_string();
    println!(
        "     │ sandbox {id}: sandbox-vmm pid {}, state dir {}",
        sb.vmm_pid(),
        sb.dir().display()
    );
    println!(
        "     │ boot to agent handshake: {} ms",
        boot.elapsed().as_millis()
    );
    let uname = sb.exec(ExecRequest::new(["uname", "-sr"])).await?;
    println!("     │ guest kernel: {}", uname.stdout_str().trim());
    steps.done(t, "sandbox running");

    // 3. Copy the project in.
    let t = steps.begin("Copy the project into the sandbox (tar stream through exec stdin)");
    let tar = Command::new("tar")
        .args(["-C"])
        .arg(&project)
        .args(["-cf", "-", "."])
        .output()
        .context("tar on the host")?;
    ensure!(tar.status.success(), "tar failed on the host");
    let out = sb
        .exec(
            ExecRequest::shell(format!(
                "mkdir -p {GUEST_PROJECT} && tar --no-same-owner -C {GUEST_PROJECT} -xf - && \
                 git config --global --add safe.directory '*' && du -sh {GUEST_PROJECT}"
            ))
            .stdin(tar.stdout.clone()),
        )
        .await?;
    show(&out, 5);
    ensure!(out.status.success(), "copying the project in failed");
    // And one file the file API's way, to show it too.
    sb.write_file(
        &format!("{GUEST_PROJECT}/AGENT_TASK.txt"),
        b"Task: apply migration 002 and make the tests pass.\n",
        &FileOptions::new(),
    )
    .await?;
    steps.done(t, &format!("{} KiB of tar in", tar.stdout.len() / 1024));

    // 4. Look around, migrate, test.
    let t = steps.begin("Inspect the repository");
    sh(&sb, "git log --oneline && git status --short && ls -la").await?;
    steps.done(t, "repository intact");

    let t = steps.begin("Run the migration");
    let out = sh(&sb, "./migrate.sh").await?;
    ensure!(out.status.success(), "the migration failed");
    steps.done(t, "migration applied in the sandbox");

    let t = steps.begin("Run the migration's tests");
    let out = sh(&sb, "python3 -m unittest -v 2>&1").await?;
    ensure!(out.status.success(), "the tests failed after the migration");
    sh(
        &sb,
        "sqlite3 -header -column data/app.db 'SELECT id, name, created_at FROM users LIMIT 3'",
    )
    .await?;
    steps.done(t, "tests pass");

    // 5. The mistakes.
    let t = steps.begin("Mistake 1: the agent drops the users table");
    sh(
        &sb,
        "sqlite3 data/app.db 'DROP TABLE users' && sqlite3 data/app.db .tables",
    )
    .await?;
    // The summary only, with the tests' own exit status (a pipe into `tail` would show tail's 0).
    let out = sh(
        &sb,
        "python3 -m unittest > /tmp/unittest.log 2>&1; s=$?; tail -n 4 /tmp/unittest.log; exit $s",
    )
    .await?;
    ensure!(
        !out.status.success() && out.stdout_str().contains("FAILED"),
        "the tests should fail once the table is gone"
    );
    steps.done(t, "sandbox database broken");

    let t = steps.begin("Mistake 2: the agent deletes the data directory");
    sh(&sb, "rm -rf data && ls -la && git status --short").await?;
    steps.done(t, "sandbox data gone");

    let t = steps.begin("Mistake 3: rm -rf --no-preserve-root / (it is a throwaway VM)");
    let out = sh(
        &sb,
        "rm -rf --no-preserve-root / 2>/dev/null; echo rm exited $?",
    )
    .await;
    if let Err(e) = &out {
        println!("     │ the command's connection ended: {e:#}");
    }
    let still = sb.exec(ExecRequest::new(["/bin/ls", "/"])).await;
    match &still {
        Ok(o) => println!(
            "     │ sandbox still answers exec: /bin/ls → {} (binary gone: {})",
            o.status
                .code
                .map_or("no exit code".to_string(), |c| format!("exit {c}")),
            o.status.code == Some(127)
        ),
        Err(e) => println!("     │ sandbox no longer answers exec: {e}"),
    }
    match sb.list("/", &FileOptions::new()).await {
        Ok(l) => println!(
            "     │ what is left of / (the agent's own file API): {:?}",
            l.entries
                .iter()
                .map(|e| e.name.as_str())
                .collect::<Vec<_>>()
        ),
        Err(e) => println!("     │ list / failed: {e}"),
    }
    match sb
        .read_file(&format!("{GUEST_PROJECT}/data/app.db"), &FileOptions::new())
        .await
    {
        Ok(b) => println!("     │ sandbox app.db: still {} bytes?!", b.len()),
        Err(e) => println!("     │ sandbox app.db: {} ({})", e.kind(), e.message()),
    }
    steps.done(t, "the sandbox is wrecked");

    // 6. The host copy.
    let t = steps.begin("Meanwhile, on the host: the original project is untouched");
    let users_after = host_sqlite(&project, "SELECT count(*) FROM users")?;
    let version = host_sqlite(&project, "SELECT version FROM schema_version")?;
    println!("     │ host app.db: {users_after} users (before: {users_before}), schema v{version}");
    println!("     │ host files: {}", list_files(&project)?.join(", "));
    let status = host(&project, "git", &["status", "--short"])?;
    println!(
        "     │ host git status: {}",
        if status.trim().is_empty() {
            "clean"
        } else {
            status.trim()
        }
    );
    ensure!(users_after == users_before, "the host database changed");
    ensure!(
        Path::new("/bin/ls").exists(),
        "the host's /bin/ls is gone: this must never happen"
    );
    steps.done(t, "host copy intact");

    // 7. Destroy, and look for leftovers.
    let t = steps.begin("Destroy the sandbox and check nothing remains");
    let (pid, dir) = (sb.vmm_pid(), sb.dir().to_path_buf());
    sb.destroy().await?;
    let procs = processes_mentioning(&id);
    println!(
        "     │ sandbox-vmm pid {pid}: {}",
        if Path::new(&format!("/proc/{pid}")).exists() {
            "STILL THERE"
        } else {
            "gone"
        }
    );
    println!("     │ processes mentioning {id}: {procs:?}");
    println!(
        "     │ {}: {}",
        dir.display(),
        if dir.exists() { "STILL THERE" } else { "gone" }
    );
    let left: Vec<_> = std::fs::read_dir(runtime.state_dir())?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(&id))
        .collect();
    if !procs.is_empty() || dir.exists() || !left.is_empty() {
        bail!("leftovers after destroy: processes {procs:?}, files {left:?}");
    }
    steps.done(t, "no process, no file");

    println!(
        "\nDone in {} ms: the migration and its tests ran in a real Linux guest, the agent's \
         mistakes stayed there, and the sandbox left nothing behind.",
        steps.start.elapsed().as_millis()
    );
    Ok(())
}
