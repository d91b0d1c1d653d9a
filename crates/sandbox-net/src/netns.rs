//! Named network namespaces, made the way `ip netns add` makes them, and the thread that runs
//! work inside one.
//!
//! Runtime threads never change netns. Work that must happen inside a netns (opening a netlink
//! socket, a tap, a TCP socket, running `nft`, writing a per-netns sysctl) runs on a fresh OS
//! thread that enters the netns, does the work, hands the result (often an fd) back and exits.
//! Sockets and taps keep the netns they were created in, so tokio drives them from anywhere.

use std::fs;
use std::io;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{setns, unshare, CloneFlags};

use crate::{NetError, Result};

/// Where named netns live (as for `ip netns`).
pub const NETNS_DIR: &str = "/run/netns";

/// The bind-mount file of netns `name`.
pub fn netns_path(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

/// Runs `f` on a new OS thread inside netns `netns` (a path like [`netns_path`]); `None` runs
/// it in the process's own netns. The calling thread (a tokio worker) keeps its netns and only
/// awaits the result.
pub(crate) async fn in_netns<T, F>(netns: Option<PathBuf>, f: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T> + Send + 'static,
{
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("sbx-netns".into())
        .spawn(move || {
            let r = enter(netns.as_deref()).and_then(|()| f());
            let _ = tx.send(r);
        })
        .map_err(|source| NetError::Io {
            what: "spawn the netns thread",
            source,
        })?;
    rx.await.map_err(|_| NetError::Io {
        what: "run work in a netns",
        source: io::Error::other("the netns thread panicked"),
    })?
}

fn enter(netns: Option<&Path>) -> Result<()> {
    let Some(path) = netns else { return Ok(()) };
    let file = fs::File::open(path).map_err(|source| NetError::NetnsOpen {
        path: path.to_path_buf(),
        source,
    })?;
    setns(file.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|e| NetError::Io {
        what: "setns into the netns",
        source: e.into(),
    })
}

/// Creates netns `name` as `ip netns add` does: `/run/netns` is made a shared mount (bound onto
/// itself first if it is not a mount point), then a thread `unshare`s a new netns and
/// bind-mounts its `/proc/thread-self/ns/net` onto `/run/netns/<name>`. Fails with
/// [`NetError::NetnsExists`] if the file exists. Blocking; call it from [`in_netns`].
pub(crate) fn create_named(name: &str) -> Result<()> {
    let io = |what| {
        move |e: nix::Error| NetError::Io {
            what,
            source: e.into(),
        }
    };
    fs::create_dir_all(NETNS_DIR).map_err(|source| NetError::Io {
        what: "create /run/netns",
        source,
    })?;
    let shared = || {
        mount(
            None::<&str>,
            NETNS_DIR,
            None::<&str>,
            MsFlags::MS_SHARED | MsFlags::MS_REC,
            None::<&str>,
        )
    };
    if shared().is_err() {
        mount(
            Some(NETNS_DIR),
            NETNS_DIR,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
        .map_err(io("bind /run/netns onto itself"))?;
        shared().map_err(io("make /run/netns a shared mount"))?;
    }
    let path = netns_path(name);
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(|source| {
            if source.kind() == io::ErrorKind::AlreadyExists {
                NetError::NetnsExists {
                    name: name.to_string(),
                }
            } else {
                NetError::Io {
                    what: "create the netns mount point",
                    source,
                }
            }
        })?;
    let target = path.clone();
    let made = std::thread::Builder::new()
        .name("sbx-netns-new".into())
        .spawn(move || -> Result<()> {
            unshare(CloneFlags::CLONE_NEWNET).map_err(io("unshare a new netns"))?;
            mount(
                Some("/proc/thread-self/ns/net"),
                &target,
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )
            .map_err(io("bind-mount the new netns"))
        })
        .map_err(|source| NetError::Io {
            what: "spawn the netns thread",
            source,
        })?
        .join()
        .unwrap_or_else(|_| {
            Err(NetError::Io {
                what: "create a netns",
                source: io::Error::other("the netns thread panicked"),
            })
        });
    if made.is_err() {
        let _ = fs::remove_file(&path);
    }
    made
}

/// Deletes netns `name` (lazy unmount, then the file). Already gone is success. The netns dies
/// with its last user: its links (the tap's kernel side, the sandbox veth end and so its peer),
/// addresses, routes, nft tables and conntrack entries go with it.
pub(crate) fn delete_named(name: &str) -> Result<()> {
    let path = netns_path(name);
    match umount2(&path, MntFlags::MNT_DETACH) {
        Ok(()) | Err(nix::Error::EINVAL) | Err(nix::Error::ENOENT) => {}
        Err(e) => {
            return Err(NetError::Io {
                what: "unmount the netns",
                source: e.into(),
            })
        }
    }
    match fs::remove_file(&path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(NetError::Io {
            what: "remove the netns mount point",
            source,
        }),
    }
}

/// Names under `/run/netns` that start with `prefix`.
pub(crate) fn list_named(prefix: &str) -> Result<Vec<String>> {
    let dir = match fs::read_dir(NETNS_DIR) {
        Ok(d) => d,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(NetError::Io {
                what: "list /run/netns",
                source,
            })
        }
    };
    let mut out = Vec::new();
    for entry in dir {
        let entry = entry.map_err(|source| NetError::Io {
            what: "list /run/netns",
            source,
        })?;
        if let Some(name) = entry.file_name().to_str() {
            if name.starts_with(prefix) {
                out.push(name.to_string());
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Writes `value` to the sysctl file `/proc/sys/<key>` (`net/ipv4/ip_forward`) of the calling
/// thread's netns. Call it on a netns thread.
pub(crate) fn write_sysctl(key: &str, value: &str) -> Result<()> {
    fs::write(Path::new("/proc/sys").join(key), value).map_err(|source| NetError::Sysctl {
        key: key.to_string(),
        source,
    })
}
