//! Exposed ports: a listener in the runtime's netns forwarding TCP to a guest port.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::{JoinHandle, JoinSet};

use crate::netns::in_netns;
use crate::{NetError, Result};

/// How long connecting to the guest may take before the client is dropped.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// One exposed port. Dropping it stops the listener and closes its connections (the accept
/// task owns the connection tasks in a `JoinSet`, which aborts them when dropped).
#[derive(Debug)]
pub(crate) struct Exposure {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for Exposure {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Exposure {
    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Binds `bind:0` and starts forwarding to `guest` through sockets made in `netns`.
    pub(crate) async fn start(
        bind: IpAddr,
        netns: PathBuf,
        guest: SocketAddr,
        max: usize,
    ) -> Result<Self> {
        let listener = TcpListener::bind(SocketAddr::new(bind, 0))
            .await
            .map_err(|source| NetError::Io {
                what: "bind the exposed port",
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| NetError::Io {
            what: "read the exposed port's address",
            source,
        })?;
        let task = tokio::spawn(accept_loop(
            listener,
            netns,
            guest,
            Arc::new(Semaphore::new(max)),
        ));
        tracing::info!(%addr, %guest, "port exposed");
        Ok(Exposure { addr, task })
    }
}

async fn accept_loop(
    listener: TcpListener,
    netns: PathBuf,
    guest: SocketAddr,
    limit: Arc<Semaphore>,
) {
    let mut conns = JoinSet::new();
    loop {
        // Wait for a free connection slot before accepting: excess clients queue in the backlog.
        let Ok(permit) = limit.clone().acquire_owned().await else {
            return;
        };
        while conns.try_join_next().is_some() {}
        let client = match listener.accept().await {
            Ok((client, _)) => client,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(error = %e, "accept on an exposed port failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let netns = netns.clone();
        conns.spawn(async move {
            if let Err(e) = forward(client, netns, guest).await {
                tracing::debug!(error = %e, %guest, "exposed connection ended with an error");
            }
            drop(permit);
        });
    }
}

async fn forward(mut client: TcpStream, netns: PathBuf, guest: SocketAddr) -> Result<()> {
    let fd = in_netns(Some(netns), move || {
        let family = if guest.is_ipv4() {
            AddressFamily::Inet
        } else {
            AddressFamily::Inet6
        };
        socket(
            family,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            None,
        )
        .map_err(|e| NetError::Io {
            what: "create a socket in the sandbox netns",
            source: e.into(),
        })
    })
    .await?;
    let upstream = TcpSocket::from_std_stream(std::net::TcpStream::from(fd));
    let mut upstream = tokio::time::timeout(CONNECT_TIMEOUT, upstream.connect(guest))
        .await
        .map_err(|_| NetError::Io {
            what: "connect to the guest",
            source: std::io::ErrorKind::TimedOut.into(),
        })?
        .map_err(|source| NetError::Io {
            what: "connect to the guest",
            source,
        })?;
    tokio::io::copy_bidirectional(&mut client, &mut upstream)
        .await
        .map_err(|source| NetError::Io {
            what: "forward an exposed connection",
            source,
        })?;
    Ok(())
}
