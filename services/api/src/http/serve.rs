//! The HTTP server: accepts connections and serves the router on each, with
//! the limits of CONTRACT.md rule 14 that `axum::serve` does not set.
//!
//! - **Headers**: a request's headers must be complete within
//!   [`Limits::header_timeout`] (hyper's header-read timer). The timer runs
//!   whenever the server waits for headers, so it also closes a kept-alive
//!   connection that sends no next request in that time.
//! - **Bodies**: a request body that sends nothing for
//!   [`Limits::body_idle_timeout`] while it is read fails the read. The
//!   handler sees an error like any broken body: the upload path removes what
//!   it stored (the S3 store aborts its multipart upload, the directory store
//!   removes its temporary file) and nothing is recorded. The answer says so,
//!   and hyper closes the connection after it, since the rest of the body
//!   was never read.
//! - **Connections**: at most [`Limits::max_connections`] are served at once.
//!   Beyond that the loop stops accepting, so new clients wait in the
//!   kernel's listen backlog (and, once that is full, the kernel refuses
//!   them) until a connection closes. Waiting rather than accepting and
//!   closing at once: a burst of honest clients is slowed down, not failed,
//!   and the timeouts above keep idle or stalled clients from holding a slot
//!   for long.
//!
//! Shutdown is graceful: the loop stops accepting, idle connections close,
//! and each busy one closes once its answer is written.

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use dossier_runtime::config::Settings;
use dossier_runtime::retry::Backoff;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tower::ServiceExt as _;
use tower_http::timeout::TimeoutBody;

/// How long the loop waits after a failed `accept` (out of file descriptors,
/// say) before it tries again: short, since connections close all the time.
const ACCEPT_BACKOFF: Backoff = Backoff {
    initial: Duration::from_millis(10),
    max: Duration::from_secs(1),
};

/// The limits the server holds every client to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// How long a request's headers may take (`DOSSIER_HTTP_HEADER_TIMEOUT_SECS`).
    pub header_timeout: Duration,
    /// How long a request body may send nothing while it is read
    /// (`DOSSIER_HTTP_BODY_IDLE_TIMEOUT_SECS`).
    pub body_idle_timeout: Duration,
    /// How many connections are served at once (`DOSSIER_HTTP_MAX_CONNECTIONS`).
    pub max_connections: usize,
}

impl Limits {
    /// The limits the settings name.
    pub fn from_settings(settings: &Settings) -> Self {
        Self {
            header_timeout: settings.http_header_timeout,
            body_idle_timeout: settings.http_body_idle_timeout,
            max_connections: settings.http_max_connections,
        }
    }
}

/// Serves `router` on `listener` under `limits` until `stop` resolves, then
/// shuts down gracefully (see the module docs). Answers an error only when
/// accepting cannot go on at all.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    stop: impl Future<Output = ()>,
) -> io::Result<()> {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let graceful = GracefulShutdown::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    let mut stop = std::pin::pin!(stop);
    let mut failed_accepts: u32 = 0;

    loop {
        // A slot first, then a connection: beyond the bound, clients wait in
        // the listen backlog instead of being accepted and left unserved.
        if slots.available_permits() == 0 {
            metrics::counter!("dossier_http_connection_limit_reached_total").increment(1);
            tracing::debug!(
                max_connections = limits.max_connections,
                "every HTTP connection slot is taken; new clients wait until one closes"
            );
        }
        let slot = tokio::select! {
            slot = Arc::clone(&slots).acquire_owned() => slot,
            () = &mut stop => break,
        };
        let Ok(slot) = slot else {
            // Only a closed semaphore fails, and this one is never closed.
            return Err(io::Error::other("the connection slots were closed"));
        };
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut stop => break,
        };
        let stream = match accepted {
            Ok((stream, _peer)) => {
                failed_accepts = 0;
                stream
            }
            // The client gave up before we took its connection: nothing to do.
            Err(error) if is_connection_error(&error) => continue,
            Err(error) => {
                // Out of file descriptors or memory: wait a little, connections close.
                let delay = ACCEPT_BACKOFF.delay(failed_accepts);
                failed_accepts = failed_accepts.saturating_add(1);
                tracing::warn!(
                    error = %error,
                    retry_in_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
                    "accepting an HTTP connection failed; new clients wait until it works again"
                );
                drop(slot);
                tokio::select! {
                    () = tokio::time::sleep(delay) => continue,
                    () = &mut stop => break,
                }
            }
        };
        let _ = stream.set_nodelay(true);

        let router = router.clone();
        let body_idle_timeout = limits.body_idle_timeout;
        let service = hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
            let request = request.map(|body| Body::new(TimeoutBody::new(body_idle_timeout, body)));
            router.clone().oneshot(request)
        });
        let connection = graceful.watch(http.serve_connection(TokioIo::new(stream), service));
        let open = OpenConnection::counted();
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                // A header timeout, a client that went away, a malformed request:
                // the client's business, not the operator's.
                tracing::debug!(error = %error, "an HTTP connection ended with an error");
            }
            drop((slot, open));
        });
    }

    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

/// One served connection in `dossier_http_open_connections`, until it ends
/// (however it ends: the task may also be dropped at shutdown).
struct OpenConnection;

impl OpenConnection {
    fn counted() -> Self {
        metrics::gauge!("dossier_http_open_connections").increment(1.0);
        Self
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        metrics::gauge!("dossier_http_open_connections").decrement(1.0);
    }
}

/// An `accept` error that concerns one connection only (it was reset before
/// it was taken), not the listener.
fn is_connection_error(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}
