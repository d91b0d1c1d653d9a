//! The state directory and the sandbox directories, held open and used through their fds.
//!
//! The state directory is trusted only when it is ours ([`StateDir::open`]): a directory (not a
//! symlink) owned by our effective uid, not writable by group or others, under ancestors that
//! only root or we can modify (a sticky world-writable ancestor such as `/tmp` is fine). Every
//! per-sandbox file is then created relative to the sandbox directory's fd with
//! `O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC` ([`SandboxDir::create_file`]), so renaming the
//! directory or swapping it for a symlink while `create()` runs cannot redirect a write: the fd
//! names the directory we made, whatever its path names now.

use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nix::fcntl::{openat, AtFlags, OFlag};
use nix::sys::stat::{fstat, fstatat, mkdirat, Mode};
use nix::unistd::{unlinkat, UnlinkatFlags};

/// Why a state directory is not trusted. Each names the fix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Distrust {
    /// The path is a symlink.
    Symlink,
    /// Not a directory.
    NotADirectory,
    /// Owned by another uid.
    Owner { uid: u32, ours: u32 },
    /// Group or world writable.
    Writable { mode: u32 },
    /// An ancestor another non-root user could modify.
    Ancestor { path: PathBuf, uid: u32, mode: u32 },
}

impl Distrust {
    /// What is wrong, for the error message.
    pub fn problem(&self) -> String {
        match self {
            Distrust::Symlink => "is a symlink".into(),
            Distrust::NotADirectory => "is not a directory".into(),
            Distrust::Owner { uid, ours } => {
                format!("is owned by uid {uid}, not by us (uid {ours})")
            }
            Distrust::Writable { mode } => format!("is group or world writable (mode {mode:o})"),
            Distrust::Ancestor { path, uid, mode } => format!(
                "lies under {} (uid {uid}, mode {mode:o}), which another user can modify",
                path.display()
            ),
        }
    }

    /// How to fix it.
    pub fn fix(&self) -> &'static str {
        match self {
            Distrust::Symlink | Distrust::NotADirectory | Distrust::Ancestor { .. } => {
                "point KvmRuntimeConfig.state_dir (or SANDBOX_STATE_DIR) at a real directory \
                 of your own on a disk, for example under $XDG_STATE_HOME"
            }
            Distrust::Owner { .. } => {
                "remove it, or point KvmRuntimeConfig.state_dir at a directory you own"
            }
            Distrust::Writable { .. } => "run `chmod 700` on it",
        }
    }
}

/// Opens an existing directory without following a final symlink.
fn open_dir_at(dir: BorrowedFd<'_>, name: &Path) -> io::Result<OwnedFd> {
    Ok(openat(
        dir,
        name,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?)
}

/// The runtime's state directory, checked and held open.
#[derive(Debug)]
pub(crate) struct StateDir {
    path: PathBuf,
    fd: OwnedFd,
}

/// Either a typed refusal or an I/O failure while checking.
#[derive(Debug)]
pub(crate) enum OpenError {
    Distrust(Distrust),
    Io(io::Error),
}

impl From<io::Error> for OpenError {
    fn from(e: io::Error) -> Self {
        OpenError::Io(e)
    }
}

impl StateDir {
    /// Creates `path` (mode 0700, parents as needed) if missing, then opens and checks it: see
    /// the module doc. `euid` is our effective uid.
    pub fn open(path: &Path, euid: u32) -> Result<Self, OpenError> {
        use std::os::unix::fs::DirBuilderExt;
        // Ancestors first (those that exist), so a refused path gets nothing made under it.
        check_ancestors(path, euid)?;
        // A symlink at the final component is refused before anything follows it.
        match std::fs::symlink_metadata(path) {
            Ok(m) if m.file_type().is_symlink() => {
                return Err(OpenError::Distrust(Distrust::Symlink))
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(path)?,
            Err(e) => return Err(e.into()),
        }
        let fd = match open_dir_at(nix::fcntl::AT_FDCWD, path) {
            Ok(fd) => fd,
            Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
                return Err(OpenError::Distrust(Distrust::Symlink))
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => {
                return Err(OpenError::Distrust(Distrust::NotADirectory))
            }
            Err(e) => return Err(e.into()),
        };
        // Checked on the fd we keep, so the answer is about the directory we will use.
        let st = fstat(&fd).map_err(io::Error::from)?;
        if st.st_uid != euid {
            return Err(OpenError::Distrust(Distrust::Owner {
                uid: st.st_uid,
                ours: euid,
            }));
        }
        let mode = st.st_mode & 0o7777;
        if mode & 0o022 != 0 {
            return Err(OpenError::Distrust(Distrust::Writable { mode }));
        }
        check_ancestors(path, euid)?;
        Ok(Self {
            path: path.to_path_buf(),
            fd,
        })
    }

    /// The directory's path (for messages and the public API; the runtime uses the fd).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The directory's fd.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// Every ancestor must be owned by root or us, and not be writable by others unless it is
/// sticky (then others cannot rename or remove our entry in it).
fn check_ancestors(path: &Path, euid: u32) -> Result<(), OpenError> {
    let Some(parent) = path.parent() else {
        return Ok(());
    };
    for a in parent.ancestors().filter(|a| !a.as_os_str().is_empty()) {
        let st = match fstatat(nix::fcntl::AT_FDCWD, a, AtFlags::empty()) {
            Ok(st) => st,
            // Not made yet: `create_dir_all` makes it ours, and the second check sees it.
            Err(nix::errno::Errno::ENOENT) => continue,
            Err(e) => return Err(io::Error::from(e).into()),
        };
        let mode = st.st_mode & 0o7777;
        let sticky = mode & libc::S_ISVTX != 0;
        let others_write = mode & 0o022 != 0;
        if (st.st_uid != 0 && st.st_uid != euid) || (others_write && !sticky) {
            return Err(OpenError::Distrust(Distrust::Ancestor {
                path: a.to_path_buf(),
                uid: st.st_uid,
                mode,
            }));
        }
    }
    Ok(())
}

/// One sandbox directory, held open. Files in it are reached only through the fd.
#[derive(Debug)]
pub(crate) struct SandboxDir {
    state: Arc<StateDir>,
    name: String,
    path: PathBuf,
    fd: OwnedFd,
}

impl SandboxDir {
    /// Makes `<state>/<name>` (mode 0700; it must not exist) and opens it.
    pub fn create(state: Arc<StateDir>, name: &str) -> io::Result<Self> {
        mkdirat(state.fd(), name, Mode::from_bits_truncate(0o700))?;
        Self::open(state, name)
    }

    /// Opens the existing directory `<state>/<name>` (not through a symlink).
    pub fn open(state: Arc<StateDir>, name: &str) -> io::Result<Self> {
        let fd = open_dir_at(state.fd(), Path::new(name))?;
        Ok(Self {
            path: state.path().join(name),
            name: name.to_owned(),
            state,
            fd,
        })
    }

    /// The directory's path when it was made (for messages and the public API).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The directory's fd (for example to `fchdir` a child into it).
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// The absolute path `name` had in the directory when it was made.
    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// A path to `name` that resolves through the held fd (`/proc/self/fd/<fd>/<name>`), so it
    /// names a file of this directory even if the directory was renamed or swapped since; the
    /// plain path when `/proc` is not mounted. Short (well under the 108-byte `sun_path`), so
    /// also fit for connecting to a socket.
    pub fn fd_path(&self, name: &str) -> PathBuf {
        let proc = PathBuf::from(format!("/proc/self/fd/{}", self.fd.as_raw_fd()));
        if proc.is_dir() {
            proc.join(name)
        } else {
            self.join(name)
        }
    }

    /// Creates the new file `name` (mode `mode`) in the directory: `O_CREAT | O_EXCL |
    /// O_NOFOLLOW | O_CLOEXEC`, read-write.
    ///
    /// # Errors
    /// `AlreadyExists` (also for a planted symlink), other `openat` errors.
    pub fn create_file(&self, name: &str, mode: u32) -> io::Result<File> {
        let fd = openat(
            self.fd(),
            name,
            OFlag::O_RDWR | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(mode),
        )?;
        Ok(File::from(fd))
    }

    /// Opens the existing file `name` for reading, not through a symlink.
    pub fn open_read(&self, name: &str) -> io::Result<File> {
        let fd = openat(
            self.fd(),
            name,
            OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK,
            Mode::empty(),
        )?;
        let f = File::from(fd);
        if !f.metadata()?.is_file() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a regular file",
            ));
        }
        Ok(f)
    }

    /// Empties the directory through its fd, then removes its entry from the state directory
    /// if that entry still is this directory (a swapped-in impostor is left alone and reported).
    /// A subdirectory (the private root's, docs/jail.md) goes with `remove_dir_all`, which
    /// does not follow symlinks.
    ///
    /// # Errors
    /// I/O errors; `Other` when the state directory's entry is no longer this directory.
    pub fn remove_all(&self) -> io::Result<()> {
        let names: Vec<_> = match std::fs::read_dir(self.fd_path("")) {
            Ok(rd) => rd.filter_map(|e| e.ok().map(|e| e.file_name())).collect(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(e),
        };
        for n in &names {
            match unlinkat(self.fd(), n.as_os_str(), UnlinkatFlags::NoRemoveDir) {
                Ok(()) | Err(nix::errno::Errno::ENOENT) => {}
                Err(nix::errno::Errno::EISDIR) => {
                    let sub = self.fd_path("").join(n);
                    match std::fs::remove_dir_all(&sub) {
                        Ok(()) => {}
                        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                        Err(e) => return Err(e),
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
        let ours = fstat(&self.fd).map_err(io::Error::from)?;
        match fstatat(
            self.state.fd(),
            self.name.as_str(),
            AtFlags::AT_SYMLINK_NOFOLLOW,
        ) {
            Ok(st) if (st.st_dev, st.st_ino) == (ours.st_dev, ours.st_ino) => {
                match unlinkat(
                    self.state.fd(),
                    self.name.as_str(),
                    UnlinkatFlags::RemoveDir,
                ) {
                    Ok(()) | Err(nix::errno::Errno::ENOENT) => Ok(()),
                    Err(e) => Err(e.into()),
                }
            }
            // Already gone (renamed away or removed): nothing of ours to remove there.
            Err(nix::errno::Errno::ENOENT) => Ok(()),
            Ok(_) => Err(io::Error::other(format!(
                "{} was replaced by another file; left alone",
                self.path.display()
            ))),
            Err(e) => Err(e.into()),
        }
    }
}

/// Whether `path` (plus the NUL) fits the 108-byte `sun_path` of an AF_UNIX address.
pub(crate) fn fits_sun_path(path: &Path) -> bool {
    path_len(path.as_os_str()) < SUN_PATH_MAX
}

/// The byte length of a path.
pub(crate) fn path_len(p: &OsStr) -> usize {
    p.as_bytes().len()
}

/// `sizeof(sockaddr_un.sun_path)` on Linux, the terminating NUL included.
pub(crate) const SUN_PATH_MAX: usize = 108;

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    use super::*;

    fn state(dir: &Path) -> Arc<StateDir> {
        Arc::new(StateDir::open(&dir.join("state"), super::super::sys::euid()).expect("state dir"))
    }

    #[test]
    fn remove_all_takes_the_private_root_tree_too() {
        let root = tempfile::tempdir().expect("tempdir");
        let sb = SandboxDir::create(state(root.path()), "sbx-0a").expect("dir");
        sb.create_file("vm.json", 0o600).expect("file");
        let tree = sb.fd_path("root").join("usr/lib");
        std::fs::create_dir_all(&tree).expect("tree");
        std::fs::write(tree.join("libc.so.6"), b"").expect("mount point");
        sb.remove_all().expect("remove");
        assert!(!root.path().join("state").join("sbx-0a").exists());
    }

    #[test]
    fn a_new_state_dir_is_made_private() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = state(dir.path());
        let m = std::fs::metadata(s.path()).expect("meta");
        assert_eq!(m.mode() & 0o777, 0o700);
    }

    #[test]
    fn untrusted_state_dirs_are_refused_with_a_fix() {
        let dir = tempfile::tempdir().expect("tempdir");
        let euid = super::super::sys::euid();
        let real = dir.path().join("real");
        std::fs::create_dir(&real).expect("mkdir");
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&real, &link).expect("symlink");
        let err = |p: &Path| match StateDir::open(p, euid) {
            Err(OpenError::Distrust(d)) => d,
            other => panic!("{p:?}: {other:?}"),
        };
        assert_eq!(err(&link), Distrust::Symlink);
        std::fs::set_permissions(&real, std::fs::Permissions::from_mode(0o770)).expect("chmod");
        let d = err(&real);
        assert_eq!(d, Distrust::Writable { mode: 0o770 });
        assert!(d.fix().contains("chmod 700"), "{}", d.fix());
        std::fs::set_permissions(&real, std::fs::Permissions::from_mode(0o700)).expect("chmod");
        // Someone else's directory: pretend to be another uid (no root needed), and, as root,
        // really chown it to nobody.
        assert!(matches!(
            StateDir::open(&real, euid.wrapping_add(1)),
            Err(OpenError::Distrust(Distrust::Owner { .. }))
        ));
        if euid == 0 {
            nix::unistd::chown(&real, Some(nix::unistd::Uid::from_raw(65534)), None)
                .expect("chown to nobody");
            let d = err(&real);
            assert_eq!(
                d,
                Distrust::Owner {
                    uid: 65534,
                    ours: 0
                }
            );
            assert!(d.problem().contains("65534"), "{}", d.problem());
        }
        // A file is not a state directory.
        let file = dir.path().join("file");
        std::fs::write(&file, b"x").expect("write");
        assert_eq!(err(&file), Distrust::NotADirectory);
        // Under a world-writable, non-sticky ancestor.
        let open = dir.path().join("open");
        std::fs::create_dir(&open).expect("mkdir");
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).expect("chmod");
        assert!(matches!(
            err(&open.join("state")),
            Distrust::Ancestor { .. }
        ));
        assert!(
            !open.join("state").exists(),
            "refused before anything was made"
        );
    }

    #[test]
    fn files_go_where_the_fd_points_even_after_a_swap() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = state(dir.path());
        let sb = SandboxDir::create(s.clone(), "sbx-01").expect("create");
        let mut a = sb.create_file("vm.json", 0o600).expect("first file");
        a.write_all(b"one").expect("write");
        // Swap: move the real directory away and put a symlink to a decoy in its place.
        let moved = dir.path().join("moved");
        std::fs::rename(sb.path(), &moved).expect("rename");
        let decoy = dir.path().join("decoy");
        std::fs::create_dir(&decoy).expect("decoy");
        std::os::unix::fs::symlink(&decoy, sb.path()).expect("symlink in its place");
        let mut b = sb.create_file("vmm.pid", 0o600).expect("second file");
        b.write_all(b"42").expect("write");
        assert!(
            moved.join("vmm.pid").exists(),
            "written into the real directory"
        );
        assert!(
            !decoy.join("vmm.pid").exists(),
            "not redirected through the symlink"
        );
        let mut text = String::new();
        sb.open_read("vmm.pid")
            .expect("read back")
            .read_to_string(&mut text)
            .expect("read");
        assert_eq!(text, "42");
        // An existing name (or a planted symlink) is never opened for writing.
        std::os::unix::fs::symlink(decoy.join("x"), moved.join("vmm.log")).expect("plant");
        assert_eq!(
            sb.create_file("vmm.log", 0o600).expect_err("exists").kind(),
            io::ErrorKind::AlreadyExists
        );
        assert!(!decoy.join("x").exists());
        // The state entry is now an impostor: emptied through the fd, the impostor left alone.
        assert!(sb.remove_all().is_err());
        assert!(decoy.exists() && std::fs::read_dir(&moved).expect("ls").next().is_none());
    }

    #[test]
    fn remove_all_removes_the_directory_and_sockets_connect_through_the_fd() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = state(dir.path());
        let sb = SandboxDir::create(s.clone(), "sbx-02").expect("create");
        let listener = std::os::unix::net::UnixListener::bind(sb.join("vsock.sock")).expect("bind");
        let via_fd = sb.fd_path("vsock.sock");
        assert!(fits_sun_path(&via_fd), "{via_fd:?}");
        std::os::unix::net::UnixStream::connect(&via_fd).expect("connect through the fd");
        drop(listener);
        let lock = sb.create_file("lock", 0o600).expect("lock");
        assert_eq!(lock.metadata().expect("meta").mode() & 0o777, 0o600);
        sb.remove_all().expect("remove");
        assert!(!sb.path().exists());
        // Idempotent.
        sb.remove_all().expect("again");
    }

    #[test]
    fn sun_path_limit() {
        assert!(fits_sun_path(Path::new(&"a".repeat(107))));
        assert!(!fits_sun_path(Path::new(&"a".repeat(108))));
    }
}
