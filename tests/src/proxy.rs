//! A TCP proxy a test can cut: between Dossier and a backing service (S3,
//! RabbitMQ), so that a fault test makes the service unreachable for a while
//! and brings it back without touching the machine's shared servers.
//!
//! While cut, every open connection is dropped and every new one is closed
//! right after it is accepted, which is what a client sees of a server that
//! went away: a reset or an early end of stream, never a hang.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Mutex;
use tokio::task::JoinSet;

/// A running proxy from [`FaultyProxy::address`] to its target.
#[derive(Debug)]
pub struct FaultyProxy {
    address: SocketAddr,
    shared: Arc<Shared>,
    accept: tokio::task::JoinHandle<()>,
}

#[derive(Debug, Default)]
struct Shared {
    cut: AtomicBool,
    accepted: AtomicU64,
    connections: Mutex<JoinSet<()>>,
}

impl FaultyProxy {
    /// Listens on a free port of 127.0.0.1 and forwards to `target`.
    pub async fn start(target: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
        let address = listener.local_addr()?;
        let shared = Arc::new(Shared::default());
        let accept = tokio::spawn(accept_loop(listener, target, shared.clone()));
        Ok(Self {
            address,
            shared,
            accept,
        })
    }

    /// Where clients connect instead of the target.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// Drops every open connection and refuses new ones until [`Self::restore`].
    pub async fn cut(&self) {
        self.shared.cut.store(true, Ordering::SeqCst);
        let mut connections = self.shared.connections.lock().await;
        connections.abort_all();
        while connections.join_next().await.is_some() {}
    }

    /// Lets connections through again.
    pub fn restore(&self) {
        self.shared.cut.store(false, Ordering::SeqCst);
    }

    /// How many connections were accepted so far (cut or not).
    pub fn accepted(&self) -> u64 {
        self.shared.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for FaultyProxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

async fn accept_loop(listener: TcpListener, target: SocketAddr, shared: Arc<Shared>) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            continue;
        };
        shared.accepted.fetch_add(1, Ordering::SeqCst);
        if shared.cut.load(Ordering::SeqCst) {
            drop(client);
            continue;
        }
        let mut connections = shared.connections.lock().await;
        // Reap the finished ones so the set does not grow with every request.
        while connections.try_join_next().is_some() {}
        connections.spawn(forward(client, target));
    }
}

async fn forward(mut client: TcpStream, target: SocketAddr) {
    let Ok(mut server) = TcpStream::connect(target).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
}
