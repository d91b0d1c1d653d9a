//! The device event-loop thread: an epoll set of eventfds (virtio queue ioeventfds, backend fds)
//! and a handler per fd, run on one dedicated OS thread.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::thread::JoinHandle;

use crate::seccomp::{SeccompMode, ThreadKind};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Errors from the event loop.
#[derive(Debug, thiserror::Error)]
pub enum EventLoopError {
    /// An epoll or eventfd call failed.
    #[error("event loop {op} failed")]
    Sys {
        /// The operation.
        op: &'static str,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The seccomp filter cannot be built.
    #[error("cannot set up the device thread's seccomp filter")]
    Seccomp(#[from] crate::seccomp::SeccompError),
}

/// A local `Result` for this module.
pub type Result<T> = std::result::Result<T, EventLoopError>;

/// Called when its fd is readable. It must consume the readiness (read the eventfd) and must keep
/// the fd open for as long as it is registered (typically by owning, through an `Arc`, the object
/// that owns the fd).
pub type Handler = Box<dyn FnMut() + Send>;

/// Events handled per `epoll_wait`, bounding one loop turn.
const MAX_EVENTS: usize = 32;
/// The token of the stop eventfd.
const STOP_TOKEN: u64 = u64::MAX;

/// An event loop being assembled (before its thread starts).
pub struct EventLoop {
    epoll: Epoll,
    handlers: HashMap<u64, Handler>,
    stop: EventFd,
}

impl std::fmt::Debug for EventLoop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventLoop")
            .field("handlers", &self.handlers.len())
            .finish_non_exhaustive()
    }
}

/// The running loop's thread and its stop switch.
#[derive(Debug)]
pub struct EventLoopHandle {
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl EventLoop {
    /// An empty loop.
    ///
    /// # Errors
    /// [`EventLoopError::Sys`].
    pub fn new() -> Result<Self> {
        let epoll = Epoll::new().map_err(|source| EventLoopError::Sys {
            op: "epoll_create",
            source,
        })?;
        let stop = EventFd::new(EFD_NONBLOCK).map_err(|source| EventLoopError::Sys {
            op: "eventfd",
            source,
        })?;
        epoll
            .ctl(
                ControlOperation::Add,
                stop.as_raw_fd(),
                EpollEvent::new(EventSet::IN, STOP_TOKEN),
            )
            .map_err(|source| EventLoopError::Sys {
                op: "epoll_ctl",
                source,
            })?;
        Ok(Self {
            epoll,
            handlers: HashMap::new(),
            stop,
        })
    }

    /// Calls `handler` on the loop thread whenever `fd` is readable.
    ///
    /// # Errors
    /// [`EventLoopError::Sys`].
    pub fn add(&mut self, fd: RawFd, handler: Handler) -> Result<()> {
        let token = self.handlers.len() as u64;
        self.epoll
            .ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, token),
            )
            .map_err(|source| EventLoopError::Sys {
                op: "epoll_ctl",
                source,
            })?;
        self.handlers.insert(token, handler);
        Ok(())
    }

    /// Starts the loop thread, unfiltered.
    ///
    /// # Errors
    /// [`EventLoopError::Sys`] if the thread cannot start.
    pub fn spawn(self) -> Result<EventLoopHandle> {
        self.spawn_filtered(SeccompMode::Off, false)
    }

    /// Starts the loop thread, which first installs the devices seccomp filter in `mode`
    /// (docs/jail.md). With `forbidden_probe` (a test hook) it then makes a forbidden call.
    ///
    /// # Errors
    /// [`EventLoopError::Sys`] if the thread cannot start; [`EventLoopError::Seccomp`] if the
    /// filter cannot be installed.
    pub fn spawn_filtered(
        self,
        mode: SeccompMode,
        forbidden_probe: bool,
    ) -> Result<EventLoopHandle> {
        // Build the program here, so that a bad list is an error of the build, not of the thread.
        let _ = crate::seccomp::filter(ThreadKind::Devices, mode)?;
        let stop = self
            .stop
            .try_clone()
            .map_err(|source| EventLoopError::Sys {
                op: "eventfd dup",
                source,
            })?;
        let thread = std::thread::Builder::new()
            .name("devices".into())
            .spawn(move || {
                if let Err(err) = crate::seccomp::apply(ThreadKind::Devices, mode) {
                    // Without its filter the loop must not serve a guest.
                    tracing::error!(error = %err, "device event loop not started");
                    return;
                }
                if forbidden_probe {
                    crate::seccomp::forbidden_call_for_tests();
                }
                self.run();
            })
            .map_err(|source| EventLoopError::Sys {
                op: "spawn",
                source,
            })?;
        Ok(EventLoopHandle {
            stop,
            thread: Some(thread),
        })
    }

    fn run(mut self) {
        let mut events = vec![EpollEvent::default(); MAX_EVENTS];
        loop {
            let n = match self.epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(err) => {
                    tracing::error!(%err, "epoll_wait failed; device event loop ends");
                    return;
                }
            };
            for event in &events[..n] {
                if event.data() == STOP_TOKEN {
                    return;
                }
                if let Some(handler) = self.handlers.get_mut(&event.data()) {
                    handler();
                }
            }
        }
    }
}

impl EventLoopHandle {
    /// Stops the loop and joins its thread. Returns `false` if the thread could not be told to
    /// stop and still runs (it may still touch guest memory).
    pub fn stop(&mut self) -> bool {
        if let Some(t) = self.thread.take() {
            if let Err(err) = self.stop.write(1) {
                tracing::warn!(%err, "cannot signal the event loop to stop");
                self.thread = Some(t);
                return false; // joining would hang
            }
            if t.join().is_err() {
                tracing::warn!("device event loop panicked");
            }
        }
        true
    }
}

impl Drop for EventLoopHandle {
    fn drop(&mut self) {
        if !self.stop() {
            // Detach: joining would hang.
            drop(self.thread.take());
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;

    #[test]
    fn handlers_run_on_readiness_and_stop_ends_the_thread() {
        let mut ev = EventLoop::new().expect("loop");
        let fd = Arc::new(EventFd::new(EFD_NONBLOCK).expect("eventfd"));
        let (tx, rx) = mpsc::channel();
        let fd2 = fd.clone();
        ev.add(
            fd.as_raw_fd(),
            Box::new(move || {
                let v = fd2.read().expect("read");
                tx.send(v).expect("send");
            }),
        )
        .expect("add");
        let mut handle = ev.spawn().expect("spawn");
        fd.write(3).expect("write");
        assert_eq!(rx.recv_timeout(Duration::from_secs(60)), Ok(3));
        handle.stop();
        assert!(handle.thread.is_none());
    }
}
