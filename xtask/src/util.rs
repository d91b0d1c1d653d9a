//! Helpers shared by the xtask tasks: paths, the artifact cache, running commands, apt.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

/// The workspace root (the parent of `xtask/`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one level below the workspace root")
        .to_path_buf()
}

/// The artifact cache, outside the checkout so that a fresh clone (CI) reuses it.
///
/// `$SANDBOX_CACHE_DIR` if set, else `$XDG_CACHE_HOME/sandbox-sdk`, else `~/.cache/sandbox-sdk`.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("SANDBOX_CACHE_DIR") {
        return PathBuf::from(dir);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/var/cache"));
    base.join("sandbox-sdk")
}

/// `text` with this machine's paths made portable for committed files: the cache directory
/// becomes `<cache>`, the workspace root `<checkout>`, the home directory `~`.
pub fn portable_paths(text: &str) -> String {
    let mut out = replace_path(text, &cache_dir().to_string_lossy(), "<cache>");
    out = replace_path(&out, &workspace_root().to_string_lossy(), "<checkout>");
    if let Some(home) = std::env::var_os("HOME").filter(|h| h.len() > 1) {
        out = replace_path(&out, &home.to_string_lossy(), "~");
    }
    out
}

/// `text` with every occurrence of the path `from` that is a whole path prefix (followed by
/// `/`, a space, punctuation or the end, not by more name characters) replaced by `to`.
fn replace_path(text: &str, from: &str, to: &str) -> String {
    if from.is_empty() {
        return text.to_string();
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find(from) {
        let after = &rest[i + from.len()..];
        let whole = after
            .chars()
            .next()
            .is_none_or(|c| !(c.is_alphanumeric() || c == '_' || c == '-' || c == '.'));
        out.push_str(&rest[..i]);
        out.push_str(if whole { to } else { from });
        rest = after;
    }
    out.push_str(rest);
    out
}

/// `doc` (a markdown file) with the text from `begin` through `end` replaced by `section`
/// (which carries the markers itself), or, if `doc` has no such pair, `section` appended under a
/// new `## {heading}`.
pub fn replace_section(doc: &str, begin: &str, end: &str, heading: &str, section: &str) -> String {
    if let Some(a) = doc.find(begin) {
        if let Some(b) = doc[a..].find(end) {
            let b = a + b + end.len();
            return format!("{}{section}{}", &doc[..a], &doc[b..]);
        }
    }
    format!("{}\n\n## {heading}\n\n{section}\n", doc.trim_end())
}

/// The output of `git describe --always --dirty` in the workspace, or `unknown`.
pub fn git_describe() -> String {
    output(
        Command::new("git")
            .args(["describe", "--always", "--dirty"])
            .current_dir(workspace_root()),
    )
    .map(|s| s.trim().to_string())
    .unwrap_or_else(|_| "unknown".into())
}

/// Hex SHA-256 of a sequence of byte strings, each length-prefixed so that the parts cannot run
/// into each other.
pub fn hash_parts<I, B>(parts: I) -> String
where
    I: IntoIterator<Item = B>,
    B: AsRef<[u8]>,
{
    let mut h = Sha256::new();
    for p in parts {
        let p = p.as_ref();
        h.update((p.len() as u64).to_le_bytes());
        h.update(p);
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// Hex SHA-256 of a file's contents.
pub fn hash_file(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(hash_parts([bytes]))
}

/// Runs a command to completion, inheriting stdio; fails on a non-zero exit.
pub fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("starting {:?}", cmd.get_program()))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

/// Runs a command and returns its stdout as a string; fails on a non-zero exit.
pub fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("starting {:?}", cmd.get_program()))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8(out.stdout)?)
}

/// Installs the Debian packages that are not installed yet (`apt-get update` first, once).
pub fn apt_install(packages: &[&str]) -> Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| {
            !Command::new("dpkg-query")
                .args(["-W", "-f=${Status}", p])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
                .unwrap_or(false)
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("xtask: installing {}", missing.join(" "));
    run(Command::new("apt-get").arg("update").arg("-q"))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

/// How many lines of a failed command's log [`run_logged`] puts into its error.
const LOG_TAIL_LINES: usize = 40;

/// Runs a long command while showing a spinner with the elapsed time and the command's latest
/// output line; its full stdout and stderr go to `log` (created or truncated).
///
/// When stderr is not a terminal (CI), a progress line is printed every 30 s instead. On a
/// non-zero exit the error names the log and carries its last lines.
pub fn run_logged(cmd: &mut Command, label: &str, log: &Path) -> Result<()> {
    use std::io::{IsTerminal, Write};
    use std::process::Stdio;
    use std::sync::mpsc;
    use std::time::{Duration, Instant};

    if let Some(dir) = log.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let mut log_file = std::fs::File::create(log)
        .with_context(|| format!("creating log file {}", log.display()))?;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {:?}", cmd.get_program()))?;

    // One reader thread per pipe; lines meet in a channel so the log keeps their arrival order.
    let (tx, rx) = mpsc::channel::<String>();
    let stdout = child.stdout.take().expect("stdout was set to piped");
    let stderr = child.stderr.take().expect("stderr was set to piped");
    let readers = [
        spawn_line_reader(Box::new(stdout), tx.clone()),
        spawn_line_reader(Box::new(stderr), tx),
    ];

    let started = Instant::now();
    let interactive = std::io::stderr().is_terminal();
    let bar = if interactive {
        let bar = indicatif::ProgressBar::new_spinner();
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {prefix}: {wide_msg}",
            )
            .expect("the progress template is valid"),
        );
        bar.set_prefix(label.to_string());
        bar.enable_steady_tick(Duration::from_millis(200));
        bar
    } else {
        eprintln!("xtask: {label}: started (log: {})", log.display());
        indicatif::ProgressBar::hidden()
    };
    let mut last_report = Instant::now();
    let mut last_line = String::new();
    for line in rx {
        writeln!(log_file, "{line}").with_context(|| format!("writing {}", log.display()))?;
        let trimmed = line.trim();
        if !trimmed.is_empty() {
            last_line = trimmed.chars().take(160).collect();
            bar.set_message(last_line.clone());
        }
        if !interactive && last_report.elapsed() >= Duration::from_secs(30) {
            last_report = Instant::now();
            eprintln!(
                "xtask: {label}: {}s: {last_line}",
                started.elapsed().as_secs()
            );
        }
    }
    for r in readers {
        // A reader thread only ends when its pipe closes; a panic there is a bug worth surfacing.
        r.join().expect("the line reader thread does not panic");
    }
    let status = child.wait().context("waiting for the command")?;
    bar.finish_and_clear();
    let secs = started.elapsed().as_secs_f64();
    if !status.success() {
        let tail = tail_lines(log, LOG_TAIL_LINES);
        bail!(
            "{label} failed ({status}) after {secs:.0} s; full log: {}\n--- last lines ---\n{tail}",
            log.display()
        );
    }
    eprintln!("xtask: {label}: done in {secs:.0} s");
    Ok(())
}

fn spawn_line_reader(
    pipe: Box<dyn std::io::Read + Send>,
    tx: std::sync::mpsc::Sender<String>,
) -> std::thread::JoinHandle<()> {
    use std::io::BufRead;
    std::thread::spawn(move || {
        let mut reader = std::io::BufReader::new(pipe);
        let mut buf = Vec::new();
        // Lines are read as bytes: build tools print whatever bytes they like.
        while matches!(reader.read_until(b'\n', &mut buf), Ok(n) if n > 0) {
            let line = String::from_utf8_lossy(&buf)
                .trim_end_matches(['\n', '\r'])
                .to_string();
            if tx.send(line).is_err() {
                return;
            }
            buf.clear();
        }
    })
}

/// The last `n` lines of a text file, or a note saying why it could not be read.
pub fn tail_lines(path: &Path, n: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(n)..].join("\n")
        }
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}

/// Hex SHA-256 of a (possibly large) file, by coreutils `sha256sum`: streaming, and fast even in
/// xtask's unoptimised debug build, where hashing a 1 GiB image in Rust takes tens of seconds.
pub fn sha256_file(path: &Path) -> Result<String> {
    let out = output(Command::new("sha256sum").arg("--binary").arg(path))?;
    match out.split_whitespace().next() {
        Some(hex) if hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()) => {
            Ok(hex.to_ascii_lowercase())
        }
        _ => bail!(
            "unexpected sha256sum output for {}: {out:?}",
            path.display()
        ),
    }
}

#[cfg(test)]
mod section_tests {
    use super::replace_section;

    const B: &str = "<!-- x: begin -->";
    const E: &str = "<!-- x: end -->";

    #[test]
    fn the_section_is_appended_then_replaced_in_place() {
        let first = replace_section("# Spec\n", B, E, "X", &format!("{B}\none\n{E}"));
        assert_eq!(first, format!("# Spec\n\n## X\n\n{B}\none\n{E}\n"));
        let doc = format!("{first}\n## After\n\ntail\n");
        let second = replace_section(&doc, B, E, "X", &format!("{B}\ntwo\n{E}"));
        assert_eq!(
            second,
            format!("# Spec\n\n## X\n\n{B}\ntwo\n{E}\n\n## After\n\ntail\n")
        );
        assert_eq!(second.matches("## X").count(), 1);
    }

    #[test]
    fn other_sections_and_stray_markers_are_kept() {
        // Another section's markers are left alone.
        let doc = format!("a\n<!-- y: begin -->\ny\n<!-- y: end -->\n{B}\nold\n{E}\nz\n");
        let out = replace_section(&doc, B, E, "X", &format!("{B}\nnew\n{E}"));
        assert_eq!(
            out,
            format!("a\n<!-- y: begin -->\ny\n<!-- y: end -->\n{B}\nnew\n{E}\nz\n")
        );
        // An end marker before the begin marker does not count; a begin without an end appends.
        let stray = format!("{E}\n{B}\nno end\n");
        let out = replace_section(&stray, B, E, "X", &format!("{B}\nnew\n{E}"));
        assert!(out.starts_with(&stray.trim_end().to_string()), "{out}");
        assert!(out.ends_with(&format!("## X\n\n{B}\nnew\n{E}\n")), "{out}");
    }
}

#[cfg(test)]
mod path_tests {
    #[test]
    fn only_whole_path_prefixes_are_replaced() {
        let r = super::replace_path;
        assert_eq!(
            r("/root/.cache/x and /root", "/root", "~"),
            "~/.cache/x and ~"
        );
        assert_eq!(
            r("<cache>/guest/rootfs-1/rootfs.ext4", "/root", "~"),
            "<cache>/guest/rootfs-1/rootfs.ext4"
        );
        assert_eq!(
            r("/w/a (/w/a)", "/w/a", "<checkout>"),
            "<checkout> (<checkout>)"
        );
    }
}
