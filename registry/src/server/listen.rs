//! Serving: the listener and the housekeeping tick.

use super::*;

/// Serve until `shutdown` resolves. Prunes old nonces and expires overdue runs in the
/// background.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: App,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let db = app.db.clone();
    let notify = app.notify.clone();
    let housekeeping = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(10));
        loop {
            tick.tick().await;
            let cutoff = now_ms() / 1000 - 2 * httpsig::MAX_SKEW_S;
            if let Err(e) = db.prune_nonces(cutoff).await {
                eprintln!("registry: pruning nonces: {e}");
            }
            if let Err(e) = db.expire_overdue().await {
                eprintln!("registry: expiring runs: {e}");
            }
            if let Err(e) = advance_all_jobs(&db, &notify).await {
                eprintln!("registry: advancing jobs: {e}");
            }
        }
    });
    let result = axum::serve(listener, router(app))
        .with_graceful_shutdown(shutdown)
        .await;
    housekeeping.abort();
    result
}
