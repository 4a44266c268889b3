//! Graceful shutdown: every long-running task holds a `watch::Receiver<bool>`
//! that turns `true` when the process is asked to stop.

use std::time::Duration;

use tokio::sync::watch;

/// Resolves once shutdown was requested (`true` sent) or the sender is gone.
pub async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    // An error means the sender was dropped: nobody can ask us to keep running.
    let _ = shutdown.wait_for(|stop| *stop).await;
}

/// Sleeps for `delay` unless shutdown comes first; answers whether it did.
pub async fn sleep_or_stop(delay: Duration, shutdown: &mut watch::Receiver<bool>) -> bool {
    tokio::select! {
        () = tokio::time::sleep(delay) => false,
        () = stopped(shutdown) => true,
    }
}

/// Whether shutdown was requested, or nobody is left who could ask.
pub fn is_stopping(shutdown: &watch::Receiver<bool>) -> bool {
    *shutdown.borrow() || shutdown.has_changed().is_err()
}

/// Resolves on Ctrl-C or SIGTERM: the start of a graceful shutdown.
pub async fn signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
    tracing::info!("shutdown requested: no new work is taken; finishing what is in flight");
}
