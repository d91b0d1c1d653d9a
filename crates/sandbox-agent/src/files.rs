//! File operations with size caps and path checks.
//!
//! Without a confined root, paths are absolute and resolved normally. With `FileOptions::root`,
//! every path is resolved beneath the root with `openat2(RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)`:
//! the kernel refuses `..`, absolute symlinks and `/proc` magic links that would leave it. Kernels
//! without `openat2` (before 5.6) get a component-by-component `O_NOFOLLOW` walk that refuses every
//! symlink and every `..`.
//!
//! `read_file` and `write_file` only ever touch regular files, and never block on the guest: the
//! path is first opened `O_PATH` (which opens nothing, so no FIFO wait and no device open),
//! checked with `fstat`, and FIFOs, sockets, devices and directories are refused at once with
//! `InvalidRequest`. `write_file` writes a temporary file next to the target and renames it over
//! the target once complete (see [`write()`]).

use std::fs::File;
use std::io::{self, Read, Seek, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::RecvTimeoutError;
use std::time::Duration;

use bytes::Bytes;
use nix::dir::Dir;
use nix::errno::Errno;
use nix::fcntl::{
    fcntl, openat, openat2, readlinkat, renameat, AtFlags, FcntlArg, OFlag, OpenHow, ResolveFlag,
};
use nix::sys::stat::{fchmod, fstat, fstatat, mkdirat, FileStat, Mode, SFlag};
use nix::unistd::{fchown, fsync, unlinkat, Gid, Uid, UnlinkatFlags};
use sandbox_core::file::{
    DirEntry, FileKind, FileOptions, Listing, FILE_CHUNK_BYTES, MAX_FILE_BYTES, MAX_LIST_ENTRIES,
};
use sandbox_core::protocol::{AgentError, AgentErrorKind, AgentMessage, HostMessage};

use crate::conn::{protocol_error, Ctx, Event, Next};

type Result<T> = std::result::Result<T, AgentError>;

/// How long a `write_file` waits for the next data frame before giving the connection up: a host
/// that announced a file and then went silent must not hold a connection slot forever.
const WRITE_IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// Most symlinks an unconfined `write_file` follows at the last component (Linux's own limit).
const MAX_SYMLINK_HOPS: usize = 40;
/// Names of `write_file`'s temporary files start with this (in the target's directory).
pub const TEMP_PREFIX: &str = ".sandbox-write.";
/// Makes temporary names unique within this agent process.
static TEMP_SEQ: AtomicU64 = AtomicU64::new(0);

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

/// What a file type is called in messages, for every type but a regular file.
fn non_regular_kind(st: &FileStat) -> Option<&'static str> {
    match SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT {
        SFlag::S_IFREG => None,
        SFlag::S_IFDIR => Some("a directory"),
        SFlag::S_IFIFO => Some("a FIFO (named pipe)"),
        SFlag::S_IFSOCK => Some("a socket"),
        SFlag::S_IFCHR => Some("a character device"),
        SFlag::S_IFBLK => Some("a block device"),
        SFlag::S_IFLNK => Some("a symbolic link"),
        _ => Some("of an unknown type"),
    }
}

/// Refuses anything but a regular file, naming what it is.
fn require_regular(st: &FileStat, what: &str) -> Result<()> {
    match non_regular_kind(st) {
        None => Ok(()),
        Some(kind) => Err(AgentError::new(
            AgentErrorKind::InvalidRequest,
            format!("Cannot {what}: the path is {kind}, not a regular file."),
        )),
    }
}

fn is_symlink(st: &FileStat) -> bool {
    SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFLNK
}

/// Clears `O_NONBLOCK` (set only so that opening could not block).
fn clear_nonblock(fd: &OwnedFd) -> nix::Result<()> {
    let flags = OFlag::from_bits_truncate(fcntl(fd.as_fd(), FcntlArg::F_GETFL)?);
    fcntl(fd.as_fd(), FcntlArg::F_SETFL(flags - OFlag::O_NONBLOCK)).map(drop)
}

/// Splits a path into its directory part (`"."` for a bare name, `"/"` at the top) and last
/// component, refusing paths without a usable file name.
fn split_last<'a>(full: &'a str, what: &str) -> Result<(&'a str, &'a str)> {
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
    Ok((if dir.is_empty() { "/" } else { dir }, name))
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

    /// Opens a regular file for reading without blocking and without opening anything else.
    ///
    /// The path is opened `O_PATH` first: that opens no file (no FIFO wait for a writer, no
    /// device `open` with its side effects, sockets too), so `fstat` can refuse every
    /// non-regular file. Then it is opened for reading with `O_NONBLOCK | O_NOCTTY` (should it
    /// have been swapped for a FIFO meanwhile, even that open returns at once) and must still be
    /// the same inode; `O_NONBLOCK` is cleared again afterwards.
    fn open_regular_read(&self, what: &str) -> Result<File> {
        let probe = self.open(OFlag::O_PATH, Mode::empty(), what)?;
        let st = fstat(probe.as_fd()).map_err(|e| errno_error(e, self.confined(), what))?;
        require_regular(&st, what)?;
        let fd = self.open(
            OFlag::O_RDONLY | OFlag::O_NONBLOCK | OFlag::O_NOCTTY,
            Mode::empty(),
            what,
        )?;
        let again = fstat(fd.as_fd()).map_err(|e| errno_error(e, self.confined(), what))?;
        require_regular(&again, what)?;
        if (again.st_dev, again.st_ino) != (st.st_dev, st.st_ino) {
            return Err(AgentError::new(
                AgentErrorKind::Io,
                format!("Cannot {what}: the file was replaced while being opened."),
            ));
        }
        clear_nonblock(&fd).map_err(|e| errno_error(e, self.confined(), what))?;
        Ok(File::from(fd))
    }

    /// Opens the parent directory (`O_PATH`) and returns it with the last component.
    fn parent(&self, what: &str) -> Result<(OwnedFd, String)> {
        let full = match self {
            Resolved::Absolute(p) => p.as_str(),
            Resolved::Beneath { rel, .. } => rel.as_str(),
        };
        let (dir, name) = split_last(full, what)?;
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
    let fd = openat(cur.as_fd(), *last, flags | OFlag::O_NOFOLLOW, mode)?;
    if flags.contains(OFlag::O_PATH) && is_symlink(&nix::sys::stat::fstat(fd.as_fd())?) {
        // `O_PATH | O_NOFOLLOW` opens a final symlink itself instead of failing with ELOOP.
        return Err(Errno::ELOOP);
    }
    Ok(fd)
}

/// `ReadFile`: `FileStart`, `FileData`*, `Done`, or `Error`.
pub fn read(ctx: &Ctx, id: u64, path: &str, opts: &FileOptions) {
    if let Err(e) = read_inner(ctx, id, path, opts) {
        ctx.writer.send(id, AgentMessage::Error(e));
    }
}

/// Reads a whole regular file at an absolute path for the agent itself (`/etc/passwd`), at most
/// `cap` bytes, with the same refusal of FIFOs, sockets and devices as `read_file`.
///
/// # Errors
/// As `read_file`; `TooLarge` over `cap`.
pub fn read_regular(path: &str, cap: u64) -> Result<Vec<u8>> {
    let r = Resolved::new(path, &FileOptions::default())?;
    let f = r.open_regular_read("read the file")?;
    let mut data = Vec::new();
    f.take(cap.saturating_add(1))
        .read_to_end(&mut data)
        .map_err(|e| io_error(e, false, "read the file"))?;
    if data.len() as u64 > cap {
        return Err(AgentError::new(
            AgentErrorKind::TooLarge,
            format!("The file is over {cap} bytes."),
        ));
    }
    Ok(data)
}

fn read_inner(ctx: &Ctx, id: u64, path: &str, opts: &FileOptions) -> Result<()> {
    let r = Resolved::new(path, opts)?;
    let mut f = r.open_regular_read("read the file")?;
    let meta = f
        .metadata()
        .map_err(|e| io_error(e, r.confined(), "read the file"))?;
    let too_large = || {
        AgentError::new(
            AgentErrorKind::TooLarge,
            format!("The file is over {MAX_FILE_BYTES} bytes."),
        )
    };
    if meta.len() > MAX_FILE_BYTES {
        return Err(too_large());
    }
    if meta.len() > 0 {
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
        // /proc files report size 0: read them whole, up to the cap.
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

const WRITE: &str = "write the file";

/// Finds where `write_file` puts its data: the directory (`O_PATH`), the name in it, and what is
/// there now (`None`: nothing).
///
/// A symlink at the last component is followed the way `open` would (at most
/// [`MAX_SYMLINK_HOPS`]): the file it names is replaced and the link stays. Confined, it is
/// followed only where opening it beneath the root is allowed (a link that leads out of the root
/// is an escape; the `O_NOFOLLOW` walk of old kernels refuses every link), and each hop is
/// resolved beneath the root again. Nothing is ever opened through the link: the final rename
/// acts on a name in a directory fd, so a link swapped in after the check is itself replaced.
fn write_target(r: &Resolved) -> Result<(OwnedFd, String, Option<FileStat>)> {
    let confined = r.confined();
    let mut path = match r {
        Resolved::Absolute(p) => p.clone(),
        Resolved::Beneath { rel, .. } => rel.clone(),
    };
    let dir_flags = OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC;
    for _ in 0..MAX_SYMLINK_HOPS {
        let (dir_path, name) = split_last(&path, WRITE)?;
        let (dir_path, name) = (dir_path.to_owned(), name.to_owned());
        let dir = match r {
            Resolved::Absolute(_) => nix::fcntl::open(dir_path.as_str(), dir_flags, Mode::empty()),
            Resolved::Beneath { root, .. } => {
                open_beneath(root, &dir_path, dir_flags, Mode::empty())
            }
        }
        .map_err(|e| errno_error(e, confined, WRITE))?;
        match lstat_at(&dir, &name, confined)? {
            Some(st) if is_symlink(&st) => {}
            st => return Ok((dir, name, st)),
        }
        if let Resolved::Beneath { root, .. } = r {
            // Would opening follow it? A dangling link that stays inside is fine (ENOENT).
            match open_beneath(root, &path, OFlag::O_PATH | OFlag::O_CLOEXEC, Mode::empty()) {
                Ok(_) | Err(Errno::ENOENT) => {}
                Err(e) => return Err(errno_error(e, true, WRITE)),
            }
        }
        let link = readlinkat(dir.as_fd(), name.as_str())
            .map_err(|e| errno_error(e, confined, WRITE))?
            .into_string()
            .map_err(|_| {
                AgentError::new(
                    AgentErrorKind::InvalidRequest,
                    "Cannot write the file: a symlink on the path is not UTF-8.",
                )
            })?;
        path = if link.starts_with('/') {
            if confined {
                // openat2 already refused it above; never resolve an absolute link confined.
                return Err(errno_error(Errno::EXDEV, true, WRITE));
            }
            link
        } else {
            format!("{dir_path}/{link}")
        };
    }
    Err(errno_error(Errno::ELOOP, confined, WRITE))
}

/// `lstat` of `name` in `dir`; `None` when it does not exist.
fn lstat_at(dir: &OwnedFd, name: &str, confined: bool) -> Result<Option<FileStat>> {
    match fstatat(dir.as_fd(), name, AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(st) => Ok(Some(st)),
        Err(Errno::ENOENT) => Ok(None),
        Err(e) => Err(errno_error(e, confined, WRITE)),
    }
}

/// A `write_file` in progress: the data goes to a temporary file in the target's directory, which
/// replaces the target only once complete. Dropped without [`PendingWrite::commit`] (an error, a
/// closed connection, a protocol error, a panic), it removes the temporary file, so the target
/// keeps its old content.
struct PendingWrite {
    dir: OwnedFd,
    name: String,
    temp: String,
    file: File,
    /// Permission bits the file ends with.
    mode: Mode,
    /// The replaced file's owner, kept when the agent may `chown` (as root).
    owner: Option<(Uid, Gid)>,
    confined: bool,
    /// The temporary name no longer exists (renamed over the target).
    done: bool,
}

impl PendingWrite {
    /// Checks the target and creates the temporary file (mode 0600 until committed).
    fn start(path: &str, opts: &FileOptions) -> Result<PendingWrite> {
        let r = Resolved::new(path, opts)?;
        let confined = r.confined();
        if opts.create_parents {
            create_parents(&r)?;
        }
        let (dir, name, existing) = write_target(&r)?;
        let requested = Mode::from_bits_truncate(opts.mode.unwrap_or(0o644) & 0o7777);
        let (mode, owner) = match existing {
            None => (requested, None),
            Some(st) => {
                require_regular(&st, WRITE)?;
                (
                    Mode::from_bits_truncate(st.st_mode & 0o7777),
                    Some((Uid::from_raw(st.st_uid), Gid::from_raw(st.st_gid))),
                )
            }
        };
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        for _ in 0..16 {
            let seq = TEMP_SEQ.fetch_add(1, Ordering::Relaxed);
            let temp = format!("{TEMP_PREFIX}{}.{seq}.{nanos:x}.tmp", std::process::id());
            let flags = OFlag::O_RDWR
                | OFlag::O_CREAT
                | OFlag::O_EXCL
                | OFlag::O_NOFOLLOW
                | OFlag::O_CLOEXEC;
            match openat(
                dir.as_fd(),
                temp.as_str(),
                flags,
                Mode::from_bits_truncate(0o600),
            ) {
                Ok(fd) => {
                    return Ok(PendingWrite {
                        dir,
                        name,
                        temp,
                        file: File::from(fd),
                        mode,
                        owner,
                        confined,
                        done: false,
                    })
                }
                // A leftover of an earlier agent, say: try the next name.
                Err(Errno::EEXIST) => {}
                Err(e) => return Err(errno_error(e, confined, WRITE)),
            }
        }
        Err(AgentError::new(
            AgentErrorKind::Io,
            "Cannot write the file: no unused temporary name in its directory.",
        ))
    }

    fn errno(&self, e: Errno) -> AgentError {
        errno_error(e, self.confined, WRITE)
    }

    /// Gives the temporary file its owner and mode, syncs it, and renames it over the target.
    fn commit(mut self) -> Result<()> {
        if let Some((uid, gid)) = self.owner {
            // Before fchmod: a chown clears set-id bits. Only root may give files away.
            match fchown(self.file.as_fd(), Some(uid), Some(gid)) {
                Ok(()) | Err(Errno::EPERM) => {}
                Err(e) => return Err(self.errno(e)),
            }
        }
        fchmod(self.file.as_fd(), self.mode).map_err(|e| self.errno(e))?;
        self.file
            .sync_all()
            .map_err(|e| io_error(e, self.confined, WRITE))?;
        match renameat(
            self.dir.as_fd(),
            self.temp.as_str(),
            self.dir.as_fd(),
            self.name.as_str(),
        ) {
            Ok(()) => self.done = true,
            // The target is a mount point (a bind-mounted file): it cannot be replaced.
            Err(Errno::EBUSY) => self.copy_into_target()?,
            Err(e) => return Err(self.errno(e)),
        }
        // Make the rename itself durable; the data already is.
        if let Ok(d) = openat(
            self.dir.as_fd(),
            ".",
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        ) {
            let _ = fsync(d.as_fd());
        }
        Ok(())
    }

    /// The fallback for a target that cannot be renamed over: copy the data into it in place
    /// (not atomic). The temporary file is removed on drop.
    fn copy_into_target(&mut self) -> Result<()> {
        let fd = openat(
            self.dir.as_fd(),
            self.name.as_str(),
            OFlag::O_WRONLY
                | OFlag::O_NONBLOCK
                | OFlag::O_NOCTTY
                | OFlag::O_NOFOLLOW
                | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| self.errno(e))?;
        require_regular(&fstat(fd.as_fd()).map_err(|e| self.errno(e))?, WRITE)?;
        clear_nonblock(&fd).map_err(|e| self.errno(e))?;
        let mut target = File::from(fd);
        let copied = (|| -> io::Result<()> {
            target.set_len(0)?;
            self.file.rewind()?;
            io::copy(&mut self.file, &mut target)?;
            target.sync_all()
        })();
        copied.map_err(|e| io_error(e, self.confined, WRITE))
    }
}

impl Drop for PendingWrite {
    fn drop(&mut self) {
        if !self.done {
            let _ = unlinkat(
                self.dir.as_fd(),
                self.temp.as_str(),
                UnlinkatFlags::NoRemoveDir,
            );
        }
    }
}

/// `WriteFile`: `Ready` or `Error`; then the data; then `Done` or `Error`.
///
/// The data goes to a temporary file `.sandbox-write.*.tmp` in the target's directory (created
/// `O_EXCL`, beneath the root when confined), which is synced and renamed over the target only
/// once all of it arrived and was written. An error, a dropped connection or a protocol error on
/// the way leaves the target as it was and removes the temporary file. A new file gets
/// `FileOptions::mode` (default 0644, exactly: the umask does not apply); a replaced file keeps
/// its permission bits and (as root) its owner.
pub fn write(ctx: &Ctx, id: u64, path: &str, opts: &FileOptions, size: u64) -> Next {
    let started = if size > MAX_FILE_BYTES {
        Err(AgentError::new(
            AgentErrorKind::TooLarge,
            format!("The file is over {MAX_FILE_BYTES} bytes."),
        ))
    } else {
        PendingWrite::start(path, opts)
    };
    let mut pending = match started {
        Ok(p) => p,
        Err(e) => {
            ctx.writer.send(id, AgentMessage::Error(e));
            return Next::Continue;
        }
    };
    ctx.writer.send(id, AgentMessage::Ready);
    let mut received = 0u64;
    let mut failure: Option<AgentError> = None;
    while received < size {
        match ctx.rx.recv_timeout(WRITE_IDLE_TIMEOUT) {
            Ok(Event::Frame(f)) if f.id == id => match f.body {
                HostMessage::FileData(chunk) => {
                    received = received.saturating_add(chunk.len() as u64);
                    if received > size {
                        protocol_error(ctx, id, "More file data than announced.");
                        return Next::Close;
                    }
                    // After a write error keep consuming the data, so frames stay in step.
                    if failure.is_none() {
                        if let Err(e) = pending.file.write_all(&chunk) {
                            failure = Some(io_error(e, pending.confined, WRITE));
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
            Err(RecvTimeoutError::Timeout) => {
                protocol_error(ctx, id, "No file data arrived for too long.");
                return Next::Close;
            }
            Ok(Event::Closed(_)) | Err(RecvTimeoutError::Disconnected) => return Next::Close,
        }
    }
    let result = match failure {
        Some(e) => Err(e),
        None => pending.commit(),
    };
    match result {
        Ok(()) => ctx.writer.send(id, AgentMessage::Done),
        Err(e) => ctx.writer.send(id, AgentMessage::Error(e)),
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

    /// A FIFO, a socket, a device node (if this process may create one) and `/dev/null`,
    /// in a fresh directory; the guard keeps the socket bound.
    fn specials() -> (
        tempfile::TempDir,
        std::os::unix::net::UnixListener,
        Vec<&'static str>,
    ) {
        let t = tempfile::tempdir().expect("tempdir");
        nix::unistd::mkfifo(&t.path().join("fifo"), Mode::from_bits_truncate(0o644))
            .expect("mkfifo");
        let sock = std::os::unix::net::UnixListener::bind(t.path().join("sock")).expect("bind");
        let mut names = vec!["fifo", "sock", "dir"];
        std::fs::create_dir(t.path().join("dir")).expect("mkdir");
        // 1:3 is /dev/null's device number; only root may create device nodes.
        let dev = nix::sys::stat::makedev(1, 3);
        if nix::sys::stat::mknod(
            &t.path().join("null"),
            SFlag::S_IFCHR,
            Mode::from_bits_truncate(0o666),
            dev,
        )
        .is_ok()
        {
            names.push("null");
        }
        (t, sock, names)
    }

    fn kind_of<T: std::fmt::Debug>(r: Result<T>) -> (AgentErrorKind, String) {
        let e = r.expect_err("refused");
        (e.kind, e.message)
    }

    /// Reads and writes of non-regular files are refused with `InvalidRequest` naming the type,
    /// unconfined, confined (openat2) and through the walk, and nothing is replaced. A blocking
    /// open would hang this test (the FIFO has no writer and no reader).
    #[test]
    fn special_files_are_refused_without_blocking() {
        let (t, _sock, names) = specials();
        let base = t.path().to_string_lossy().into_owned();
        let confined = FileOptions::new().confined_to(base.as_str());
        let expected = [
            ("fifo", "a FIFO (named pipe)"),
            ("sock", "a socket"),
            ("dir", "a directory"),
            ("null", "a character device"),
        ];
        let mut paths: Vec<(String, FileOptions, &str)> = vec![(
            "/dev/null".to_owned(),
            FileOptions::new(),
            "a character device",
        )];
        for name in &names {
            let kind = expected
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, k)| *k)
                .expect("known");
            paths.push((format!("{base}/{name}"), FileOptions::new(), kind));
            paths.push(((*name).to_owned(), confined.clone(), kind));
        }
        for (path, opts, kind) in &paths {
            let r = Resolved::new(path, opts).expect("resolves");
            let (k, msg) = kind_of(r.open_regular_read("read the file"));
            assert_eq!(k, AgentErrorKind::InvalidRequest, "read {path}: {msg}");
            assert!(msg.contains(kind), "read {path}: {msg}");
            let (k, msg) = kind_of(PendingWrite::start(path, opts).map(drop));
            assert_eq!(k, AgentErrorKind::InvalidRequest, "write {path}: {msg}");
            assert!(msg.contains(kind), "write {path}: {msg}");
        }
        // The walk of old kernels opens the last component the same way.
        let root = nix::fcntl::open(t.path(), OFlag::O_PATH | OFlag::O_DIRECTORY, Mode::empty())
            .expect("root");
        for name in &names {
            let fd =
                open_beneath_walk(&root, name, OFlag::O_PATH | OFlag::O_CLOEXEC, Mode::empty())
                    .expect("O_PATH opens anything");
            assert!(non_regular_kind(&fstat(fd.as_fd()).expect("fstat")).is_some());
        }
        let ft = std::fs::symlink_metadata(t.path().join("fifo")).expect("stat");
        assert!(
            std::os::unix::fs::FileTypeExt::is_fifo(&ft.file_type()),
            "the FIFO is still there"
        );
        assert_temp_free(t.path());
        // The agent's own reads (/etc/passwd) refuse them too, and cap the size.
        let (k, _) = kind_of(read_regular(&format!("{base}/fifo"), 100));
        assert_eq!(k, AgentErrorKind::InvalidRequest);
        std::fs::write(t.path().join("big"), [7u8; 101]).expect("write");
        let (k, _) = kind_of(read_regular(&format!("{base}/big"), 100));
        assert_eq!(k, AgentErrorKind::TooLarge);
        assert_eq!(
            read_regular(&format!("{base}/big"), 101).expect("at the cap"),
            [7u8; 101]
        );
    }

    fn assert_temp_free(dir: &std::path::Path) {
        for e in std::fs::read_dir(dir).expect("read_dir") {
            let name = e.expect("entry").file_name();
            assert!(
                !name.to_string_lossy().starts_with(TEMP_PREFIX),
                "a temporary file was left: {name:?}"
            );
        }
    }

    fn mode_of(p: &std::path::Path) -> u32 {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(p).expect("stat").permissions().mode() & 0o7777
    }

    fn write_all(path: &str, opts: &FileOptions, data: &[u8]) -> Result<()> {
        let mut w = PendingWrite::start(path, opts)?;
        w.file.write_all(data).expect("write");
        w.commit()
    }

    /// The target changes only on commit; a dropped write leaves it and no temporary file.
    #[test]
    fn writes_replace_the_target_only_on_commit() {
        let t = tempfile::tempdir().expect("tempdir");
        let target = t.path().join("f");
        let path = target.to_string_lossy().into_owned();
        std::fs::write(&target, b"old content").expect("write");
        let mut w = PendingWrite::start(&path, &FileOptions::new()).expect("start");
        w.file.write_all(b"half of the new").expect("write");
        assert_eq!(std::fs::read(&target).expect("read"), b"old content");
        assert!(t.path().join(&w.temp).exists(), "data goes to a temp file");
        drop(w);
        assert_eq!(std::fs::read(&target).expect("read"), b"old content");
        assert_temp_free(t.path());
        write_all(&path, &FileOptions::new(), b"new").expect("commit");
        assert_eq!(std::fs::read(&target).expect("read"), b"new");
        assert_temp_free(t.path());
    }

    /// New files get the requested mode exactly (no umask); replaced files keep theirs.
    #[test]
    fn modes_of_new_and_replaced_files() {
        use std::os::unix::fs::PermissionsExt;
        let t = tempfile::tempdir().expect("tempdir");
        let p = |n: &str| t.path().join(n);
        let s = |n: &str| p(n).to_string_lossy().into_owned();
        write_all(&s("default"), &FileOptions::new(), b"x").expect("write");
        assert_eq!(mode_of(&p("default")), 0o644);
        write_all(&s("wide"), &FileOptions::new().mode(0o666), b"x").expect("write");
        assert_eq!(mode_of(&p("wide")), 0o666, "the umask does not apply");
        std::fs::write(p("kept"), b"old").expect("write");
        std::fs::set_permissions(p("kept"), std::fs::Permissions::from_mode(0o751)).expect("chmod");
        write_all(&s("kept"), &FileOptions::new().mode(0o600), b"new").expect("write");
        assert_eq!(
            mode_of(&p("kept")),
            0o751,
            "an existing file keeps its mode"
        );
        assert_eq!(std::fs::read(p("kept")).expect("read"), b"new");
    }

    /// Symlinks at the target are followed to the file they name, which is replaced; the link
    /// stays. Confined, only as far as the root allows.
    #[test]
    fn writes_follow_symlinks_at_the_target_within_bounds() {
        let (t, _root) = jail();
        let root = t.path().join("root");
        // Unconfined: through an absolute link to outside the "root".
        let abs = root.join("abs").to_string_lossy().into_owned();
        write_all(&abs, &FileOptions::new(), b"via link").expect("write");
        assert_eq!(
            std::fs::read(t.path().join("secret")).expect("read"),
            b"via link"
        );
        assert!(std::fs::symlink_metadata(root.join("abs"))
            .expect("stat")
            .file_type()
            .is_symlink());
        // Confined: a link that stays inside is followed, a chain too.
        symlink("inner/ok", root.join("chain")).expect("symlink");
        let opts = FileOptions::new().confined_to(root.to_string_lossy());
        write_all("chain", &opts, b"inside").expect("write");
        assert_eq!(std::fs::read(root.join("d/ok")).expect("read"), b"inside");
        assert!(std::fs::symlink_metadata(root.join("chain"))
            .expect("stat")
            .file_type()
            .is_symlink());
        // A dangling link inside creates its target.
        symlink("d/new", root.join("dangling")).expect("symlink");
        write_all("dangling", &opts, b"created").expect("write");
        assert_eq!(std::fs::read(root.join("d/new")).expect("read"), b"created");
        // Links that leave are escapes; nothing outside changes.
        symlink("../outside-new", root.join("out")).expect("symlink");
        for p in ["abs", "rel", "out", "../secret"] {
            let (k, msg) = kind_of(PendingWrite::start(p, &opts).map(drop));
            assert_eq!(k, AgentErrorKind::Escape, "{p}: {msg}");
        }
        assert_eq!(
            std::fs::read(t.path().join("secret")).expect("read"),
            b"via link"
        );
        assert!(!t.path().join("outside-new").exists());
        assert_temp_free(&root);
        assert_temp_free(&root.join("d"));
    }

    /// A bind-mounted file cannot be renamed over (`EBUSY`): its content is replaced in place.
    #[cfg(sandbox_privileged)]
    #[test]
    fn a_bind_mounted_target_is_overwritten_in_place() {
        use nix::mount::{mount, umount, MsFlags};
        struct Unmount(std::path::PathBuf);
        impl Drop for Unmount {
            fn drop(&mut self) {
                let _ = umount(&self.0);
            }
        }
        let t = tempfile::tempdir().expect("tempdir");
        let (src, dst) = (t.path().join("src"), t.path().join("dst"));
        std::fs::write(&src, b"old").expect("write");
        std::fs::write(&dst, b"hidden").expect("write");
        mount(
            Some(&src),
            &dst,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .expect("bind mount (needs root)");
        let _unmount = Unmount(dst.clone());
        write_all(&dst.to_string_lossy(), &FileOptions::new(), b"new content").expect("write");
        assert_eq!(std::fs::read(&dst).expect("read"), b"new content");
        assert_eq!(
            std::fs::read(&src).expect("read"),
            b"new content",
            "in place"
        );
        assert_temp_free(t.path());
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
