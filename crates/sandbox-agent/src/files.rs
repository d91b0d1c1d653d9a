//! File operations with size caps and path checks.
//!
//! Without a confined root, paths are absolute and resolved normally. With `FileOptions::root`,
//! every path is resolved beneath the root with `openat2(RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)`:
//! the kernel refuses `..`, absolute symlinks and `/proc` magic links that would leave it. Kernels
//! without `openat2` (before 5.6) get a component-by-component `O_NOFOLLOW` walk that refuses every
//! symlink and every `..`.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;

use bytes::Bytes;
use nix::dir::Dir;
use nix::errno::Errno;
use nix::fcntl::{openat, openat2, AtFlags, OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::{fstatat, mkdirat, Mode, SFlag};
use nix::unistd::{unlinkat, UnlinkatFlags};
use sandbox_core::file::{
    DirEntry, FileKind, FileOptions, Listing, FILE_CHUNK_BYTES, MAX_FILE_BYTES, MAX_LIST_ENTRIES,
};
use sandbox_core::protocol::{AgentError, AgentErrorKind, AgentMessage, HostMessage};

use crate::conn::{protocol_error, Ctx, Event, Next};

type Result<T> = std::result::Result<T, AgentError>;

fn errno_error(e: Errno, confined: bool, what: &str) -> AgentError {
    let kind = match e {
        Errno::ENOENT | Errno::ENOTDIR => AgentErrorKind::NotFound,
        Errno::EACCES | Errno::EPERM | Errno::EROFS => AgentErrorKind::PermissionDenied,
        Errno::EXDEV | Errno::ELOOP if confined => AgentErrorKind::Escape,
        Errno::EFBIG | Errno::ENOSPC => AgentErrorKind::TooLarge,
        Errno::EISDIR | Errno::ENOTEMPTY | Errno::EINVAL | Errno::EEXIST => {
            AgentErrorKind::InvalidRequest
        }
        _ => AgentErrorKind::Io,
    };
    let msg = if kind == AgentErrorKind::Escape {
        format!("Cannot {what}: the path leads out of the confined root.")
    } else {
        format!("Cannot {what}: {}.", e.desc())
    };
    AgentError::new(kind, msg)
}

fn io_error(e: io::Error, confined: bool, what: &str) -> AgentError {
    match e.raw_os_error() {
        Some(n) => errno_error(Errno::from_raw(n), confined, what),
        None => AgentError::new(AgentErrorKind::Io, format!("Cannot {what}: {e}.")),
    }
}

/// A path as the agent resolves it: absolute, or relative beneath an open root directory.
enum Resolved {
    Absolute(String),
    Beneath { root: OwnedFd, rel: String },
}

impl Resolved {
    fn new(path: &str, opts: &FileOptions) -> Result<Resolved> {
        if path.is_empty() || path.contains('\0') {
            return Err(AgentError::new(
                AgentErrorKind::InvalidRequest,
                "The path is empty or contains NUL.",
            ));
        }
        match &opts.root {
            None if path.starts_with('/') => Ok(Resolved::Absolute(path.to_owned())),
            None => Err(AgentError::new(
                AgentErrorKind::InvalidRequest,
                "The path must be absolute.",
            )),
            Some(root) => {
                // The root itself is trusted caller input: it may be reached through symlinks.
                let fd = nix::fcntl::open(
                    root.as_str(),
                    OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
                    Mode::empty(),
                )
                .map_err(|e| errno_error(e, false, "open the confined root"))?;
                let rel = path.trim_start_matches('/');
                let rel = if rel.is_empty() {
                    ".".to_owned()
                } else {
                    rel.to_owned()
                };
                Ok(Resolved::Beneath { root: fd, rel })
            }
        }
    }

    fn confined(&self) -> bool {
        matches!(self, Resolved::Beneath { .. })
    }

    /// Opens the path itself with `flags`.
    fn open(&self, flags: OFlag, mode: Mode, what: &str) -> Result<OwnedFd> {
        let flags = flags | OFlag::O_CLOEXEC;
        match self {
            Resolved::Absolute(p) => {
                nix::fcntl::open(p.as_str(), flags, mode).map_err(|e| errno_error(e, false, what))
            }
            Resolved::Beneath { root, rel } => {
                open_beneath(root, rel, flags, mode).map_err(|e| errno_error(e, true, what))
            }
        }
    }

    /// Opens the parent directory (`O_PATH`) and returns it with the last component.
    fn parent(&self, what: &str) -> Result<(OwnedFd, String)> {
        let full = match self {
            Resolved::Absolute(p) => p.as_str(),
            Resolved::Beneath { rel, .. } => rel.as_str(),
        };
        let trimmed = full.trim_end_matches('/');
        let (dir, name) = match trimmed.rfind('/') {
            Some(i) => (&trimmed[..i], &trimmed[i + 1..]),
            None => (".", trimmed),
        };
        if name.is_empty() || name == "." || name == ".." {
            return Err(AgentError::new(
                AgentErrorKind::InvalidRequest,
                format!("Cannot {what}: the path has no file name."),
            ));
        }
        let dir = if dir.is_empty() { "/" } else { dir };
        let flags = OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC;
        let fd = match self {
            Resolved::Absolute(_) => nix::fcntl::open(dir, flags, Mode::empty())
                .map_err(|e| errno_error(e, false, what))?,
            Resolved::Beneath { root, .. } => open_beneath(root, dir, flags, Mode::empty())
                .map_err(|e| errno_error(e, true, what))?,
        };
        Ok((fd, name.to_owned()))
    }
}

/// `openat2` beneath `root`, or the `O_NOFOLLOW` walk where `openat2` does not exist.
pub fn open_beneath(root: &OwnedFd, rel: &str, flags: OFlag, mode: Mode) -> nix::Result<OwnedFd> {
    let how = OpenHow::new()
        .flags(flags)
        .mode(if flags.contains(OFlag::O_CREAT) {
            mode
        } else {
            Mode::empty()
        })
        .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_MAGICLINKS);
    match openat2(root.as_fd(), rel, how) {
        Err(Errno::ENOSYS) => open_beneath_walk(root, rel, flags, mode),
        r => r,
    }
}

/// The fallback: walk one component at a time with `O_NOFOLLOW`, refusing symlinks and `..`
/// (stricter than `openat2`, which allows symlinks that stay inside).
pub fn open_beneath_walk(
    root: &OwnedFd,
    rel: &str,
    flags: OFlag,
    mode: Mode,
) -> nix::Result<OwnedFd> {
    let comps: Vec<&str> = rel
        .split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .collect();
    if comps.contains(&"..") {
        return Err(Errno::EXDEV);
    }
    let Some((last, dirs)) = comps.split_last() else {
        return openat(root.as_fd(), ".", flags, mode);
    };
    let mut cur = openat(
        root.as_fd(),
        ".",
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    for c in dirs {
        // O_NOFOLLOW with O_PATH opens a symlink itself; O_DIRECTORY then fails with ENOTDIR,
        // so check explicitly to report an escape attempt rather than "not found".
        let next = openat(
            cur.as_fd(),
            *c,
            OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )?;
        let st = nix::sys::stat::fstat(next.as_fd())?;
        match SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT {
            SFlag::S_IFLNK => return Err(Errno::ELOOP),
            SFlag::S_IFDIR => cur = next,
            _ => return Err(Errno::ENOTDIR),
        }
    }
    openat(cur.as_fd(), *last, flags | OFlag::O_NOFOLLOW, mode)
}

/// `ReadFile`: `FileStart`, `FileData`*, `Done`, or `Error`.
pub fn read(ctx: &Ctx, id: u64, path: &str, opts: &FileOptions) {
    if let Err(e) = read_inner(ctx, id, path, opts) {
        ctx.writer.send(id, AgentMessage::Error(e));
    }
}

fn read_inner(ctx: &Ctx, id: u64, path: &str, opts: &FileOptions) -> Result<()> {
    let r = Resolved::new(path, opts)?;
    let fd = r.open(OFlag::O_RDONLY, Mode::empty(), "read the file")?;
    let mut f = File::from(fd);
    let meta = f
        .metadata()
        .map_err(|e| io_error(e, r.confined(), "read the file"))?;
    if meta.is_dir() {
        return Err(AgentError::new(
            AgentErrorKind::InvalidRequest,
            "Cannot read a directory.",
        ));
    }
    let too_large = || {
        AgentError::new(
            AgentErrorKind::TooLarge,
            format!("The file is over {MAX_FILE_BYTES} bytes."),
        )
    };
    if meta.len() > MAX_FILE_BYTES {
        return Err(too_large());
    }
    if meta.is_file() && meta.len() > 0 {
        // Stream a regular file: announce its size, then send exactly that many bytes.
        let size = meta.len();
        ctx.writer.send(id, AgentMessage::FileStart { size });
        let mut buf = vec![0u8; FILE_CHUNK_BYTES];
        let mut left = size;
        while left > 0 {
            let want = (left as usize).min(buf.len());
            let n = f
                .read(&mut buf[..want])
                .map_err(|e| io_error(e, false, "read the file"))?;
            if n == 0 {
                return Err(AgentError::new(
                    AgentErrorKind::Io,
                    "The file shrank while being read.",
                ));
            }
            ctx.writer.send(
                id,
                AgentMessage::FileData(Bytes::copy_from_slice(&buf[..n])),
            );
            left -= n as u64;
        }
    } else {
        // /proc files and devices report size 0: read them whole, up to the cap.
        let mut data = Vec::new();
        (&mut f)
            .take(MAX_FILE_BYTES + 1)
            .read_to_end(&mut data)
            .map_err(|e| io_error(e, false, "read the file"))?;
        if data.len() as u64 > MAX_FILE_BYTES {
            return Err(too_large());
        }
        ctx.writer.send(
            id,
            AgentMessage::FileStart {
                size: data.len() as u64,
            },
        );
        for chunk in data.chunks(FILE_CHUNK_BYTES) {
            ctx.writer
                .send(id, AgentMessage::FileData(Bytes::copy_from_slice(chunk)));
        }
    }
    ctx.writer.send(id, AgentMessage::Done);
    Ok(())
}

fn create_parents(r: &Resolved) -> Result<()> {
    let (full, base): (&str, Option<&OwnedFd>) = match r {
        Resolved::Absolute(p) => (p.as_str(), None),
        Resolved::Beneath { root, rel } => (rel.as_str(), Some(root)),
    };
    let comps: Vec<&str> = full.split('/').filter(|c| !c.is_empty()).collect();
    let Some((_, dirs)) = comps.split_last() else {
        return Ok(());
    };
    let mut prefix = String::new();
    for c in dirs {
        match base {
            None => {
                prefix.push('/');
                prefix.push_str(c);
                match std::fs::create_dir(&prefix) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                    Err(e) => return Err(io_error(e, false, "create the parent directories")),
                }
            }
            Some(root) => {
                // Resolve the parent beneath the root, then create one name in it.
                let parent_path = if prefix.is_empty() {
                    "."
                } else {
                    prefix.as_str()
                };
                let parent = open_beneath(
                    root,
                    parent_path,
                    OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
                    Mode::empty(),
                )
                .map_err(|e| errno_error(e, true, "create the parent directories"))?;
                match mkdirat(parent.as_fd(), *c, Mode::from_bits_truncate(0o755)) {
                    Ok(()) | Err(Errno::EEXIST) => {}
                    Err(e) => return Err(errno_error(e, true, "create the parent directories")),
                }
                if !prefix.is_empty() {
                    prefix.push('/');
                }
                prefix.push_str(c);
            }
        }
    }
    Ok(())
}

/// `WriteFile`: `Ready` or `Error`; then the data; then `Done` or `Error`.
pub fn write(ctx: &Ctx, id: u64, path: &str, opts: &FileOptions, size: u64) -> Next {
    let opened = (|| -> Result<(File, bool)> {
        if size > MAX_FILE_BYTES {
            return Err(AgentError::new(
                AgentErrorKind::TooLarge,
                format!("The file is over {MAX_FILE_BYTES} bytes."),
            ));
        }
        let r = Resolved::new(path, opts)?;
        if opts.create_parents {
            create_parents(&r)?;
        }
        let mode = Mode::from_bits_truncate(opts.mode.unwrap_or(0o644) & 0o7777);
        let flags = OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_TRUNC;
        let file = match &r {
            // Unconfined writes follow symlinks like any program would.
            Resolved::Absolute(p) => std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(mode.bits())
                .open(p)
                .map_err(|e| io_error(e, false, "write the file"))?,
            Resolved::Beneath { .. } => File::from(r.open(flags, mode, "write the file")?),
        };
        Ok((file, r.confined()))
    })();
    let (mut file, confined) = match opened {
        Ok(f) => f,
        Err(e) => {
            ctx.writer.send(id, AgentMessage::Error(e));
            return Next::Continue;
        }
    };
    ctx.writer.send(id, AgentMessage::Ready);
    let mut received = 0u64;
    let mut failure: Option<AgentError> = None;
    while received < size {
        match ctx.rx.recv() {
            Ok(Event::Frame(f)) if f.id == id => match f.body {
                HostMessage::FileData(chunk) => {
                    received = received.saturating_add(chunk.len() as u64);
                    if received > size {
                        protocol_error(ctx, id, "More file data than announced.");
                        return Next::Close;
                    }
                    // After a write error keep consuming the data, so frames stay in step.
                    if failure.is_none() {
                        if let Err(e) = file.write_all(&chunk) {
                            failure = Some(io_error(e, confined, "write the file"));
                        }
                    }
                }
                _ => {
                    protocol_error(ctx, id, "Only FileData may follow WriteFile.");
                    return Next::Close;
                }
            },
            Ok(Event::Frame(f)) => {
                protocol_error(ctx, f.id, "A new request arrived during a file write.");
                return Next::Close;
            }
            Ok(Event::Exited(_) | Event::PipeDone(_)) => {}
            Ok(Event::Closed(_)) | Err(_) => return Next::Close,
        }
    }
    match failure {
        Some(e) => ctx.writer.send(id, AgentMessage::Error(e)),
        None => ctx.writer.send(id, AgentMessage::Done),
    }
    Next::Continue
}

/// Removes a file, a symlink (never its target) or an empty directory.
pub fn remove(path: &str, opts: &FileOptions) -> Result<()> {
    let r = Resolved::new(path, opts)?;
    let (parent, name) = r.parent("remove")?;
    match unlinkat(parent.as_fd(), name.as_str(), UnlinkatFlags::NoRemoveDir) {
        Ok(()) => Ok(()),
        Err(Errno::EISDIR) => unlinkat(parent.as_fd(), name.as_str(), UnlinkatFlags::RemoveDir)
            .map_err(|e| errno_error(e, r.confined(), "remove")),
        Err(e) => Err(errno_error(e, r.confined(), "remove")),
    }
}

/// Lists a directory, sorted by name, capped at `MAX_LIST_ENTRIES`.
pub fn list(path: &str, opts: &FileOptions) -> Result<Listing> {
    let r = Resolved::new(path, opts)?;
    let fd = r.open(
        OFlag::O_RDONLY | OFlag::O_DIRECTORY,
        Mode::empty(),
        "list the directory",
    )?;
    let dup = fd
        .try_clone()
        .map_err(|e| io_error(e, false, "list the directory"))?;
    let mut dir = Dir::from_fd(dup).map_err(|e| errno_error(e, false, "list the directory"))?;
    let mut entries = Vec::new();
    let mut truncated = false;
    for ent in dir.iter() {
        let ent = ent.map_err(|e| errno_error(e, false, "list the directory"))?;
        let name_c = ent.file_name();
        let bytes = name_c.to_bytes();
        if bytes == b"." || bytes == b".." {
            continue;
        }
        if entries.len() >= MAX_LIST_ENTRIES {
            truncated = true;
            break;
        }
        let name = String::from_utf8_lossy(bytes).into_owned();
        let (kind, size, mode) = match fstatat(fd.as_fd(), name_c, AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(st) => {
                let kind = match SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT {
                    SFlag::S_IFREG => FileKind::File,
                    SFlag::S_IFDIR => FileKind::Dir,
                    SFlag::S_IFLNK => FileKind::Symlink,
                    _ => FileKind::Other,
                };
                (kind, st.st_size.max(0) as u64, st.st_mode & 0o7777)
            }
            // Removed while listing.
            Err(_) => continue,
        };
        entries.push(DirEntry::new(name, kind, size, mode));
    }
    entries.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(Listing::new(entries, truncated))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::*;

    fn jail() -> (tempfile::TempDir, OwnedFd) {
        let t = tempfile::tempdir().expect("tempdir");
        let root = t.path().join("root");
        std::fs::create_dir_all(root.join("d")).expect("mkdir");
        std::fs::write(root.join("d/ok"), b"ok").expect("write");
        std::fs::write(t.path().join("secret"), b"secret").expect("write");
        symlink(t.path().join("secret"), root.join("abs")).expect("symlink");
        symlink("../secret", root.join("rel")).expect("symlink");
        symlink("d", root.join("inner")).expect("symlink");
        let fd = nix::fcntl::open(
            &root,
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .expect("open root");
        (t, fd)
    }

    fn read_all(fd: OwnedFd) -> Vec<u8> {
        let mut v = Vec::new();
        File::from(fd).read_to_end(&mut v).expect("read");
        v
    }

    /// The fallback walk refuses every symlink and `..`, and still opens plain paths.
    #[test]
    fn walk_refuses_symlinks_and_dotdot() {
        let (_t, root) = jail();
        let ro = OFlag::O_RDONLY | OFlag::O_CLOEXEC;
        assert_eq!(
            read_all(open_beneath_walk(&root, "d/ok", ro, Mode::empty()).expect("plain")),
            b"ok"
        );
        assert_eq!(
            read_all(open_beneath_walk(&root, "./d//ok", ro, Mode::empty()).expect("dots")),
            b"ok"
        );
        for p in ["abs", "rel", "inner/ok", "../secret", "d/../../secret"] {
            let r = open_beneath_walk(&root, p, ro, Mode::empty());
            assert!(matches!(r, Err(Errno::ELOOP | Errno::EXDEV)), "{p}: {r:?}");
        }
    }

    /// `openat2` refuses escapes but follows symlinks that stay inside.
    #[test]
    fn openat2_beneath_confines() {
        let (_t, root) = jail();
        let ro = OFlag::O_RDONLY | OFlag::O_CLOEXEC;
        assert_eq!(
            read_all(open_beneath(&root, "inner/ok", ro, Mode::empty()).expect("inside link")),
            b"ok"
        );
        for p in ["abs", "rel", "../secret", "/etc/passwd"] {
            let r = open_beneath(&root, p, ro, Mode::empty());
            assert!(matches!(r, Err(Errno::EXDEV | Errno::ELOOP)), "{p}: {r:?}");
            assert_eq!(
                errno_error(r.expect_err("refused"), true, "read").kind,
                AgentErrorKind::Escape
            );
        }
    }

    #[test]
    fn remove_and_list_confined() {
        let (t, _root) = jail();
        let opts = FileOptions::new().confined_to(t.path().join("root").to_string_lossy());
        let l = list("/", &opts).expect("list root");
        let names: Vec<&str> = l.entries.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["abs", "d", "inner", "rel"]);
        assert_eq!(l.entries[0].kind, FileKind::Symlink);
        assert_eq!(
            remove("abs/x", &opts).map_err(|e| e.kind),
            Err(AgentErrorKind::Escape)
        );
        remove("abs", &opts).expect("remove the link itself");
        assert!(
            t.path().join("secret").exists(),
            "the link's target survives"
        );
        assert_eq!(
            remove("..", &opts).map_err(|e| e.kind),
            Err(AgentErrorKind::InvalidRequest)
        );
        assert_eq!(
            list("rel", &opts).map_err(|e| e.kind),
            Err(AgentErrorKind::Escape)
        );
    }
}
