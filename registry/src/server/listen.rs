//! Serving: the accept loop and the housekeeping tick.
//!
//! The registry faces the internet, so it does not leave connection handling to defaults: a cap
//! on open connections below the process's open-files limit (more are closed as they are
//! accepted, and counted), a timeout on reading a request's head (from the moment a connection
//! opens: a client that sends nothing, or a header a byte at a time, is cut off), an idle
//! timeout between requests, optional TLS (rustls) with a handshake timeout, and a graceful
//! shutdown that lets requests in flight finish. HTTP/1.1 only (the clients speak nothing
//! else).
//!
//! Owns sockets and connections. Must not look at requests: that is the router's.

use super::*;
use axum::extract::ConnectInfo;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Instant;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{Semaphore, watch};
use tower::ServiceExt as _;

/// How the registry serves connections.
#[derive(Clone)]
pub struct ServeOptions {
    /// Most connections open at once; one more is closed as soon as it is accepted.
    pub max_connections: usize,
    /// Longest a client may take to send a request's head (and a TLS handshake).
    pub header_read_timeout: Duration,
    /// A connection with no request in flight and no bytes moving for this long is closed.
    pub idle_timeout: Duration,
    /// TLS, when the registry terminates it itself (`registry serve --tls-cert --tls-key`).
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            max_connections: default_max_connections(),
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            tls: None,
        }
    }
}

/// Three quarters of the open-files limit left after the database and the process's own
/// files, between 16 and 10 000.
pub fn default_max_connections() -> usize {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    let soft = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 {
        lim.rlim_cur
    } else {
        1024
    };
    let usable = soft.saturating_sub(128).saturating_mul(3) / 4;
    usable.clamp(16, 10_000) as usize
}

/// The TLS configuration of `registry serve --tls-cert CERT --tls-key KEY` (PEM files: the
/// certificate chain, leaf first, and its private key).
pub fn tls_server_config(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> Result<Arc<rustls::ServerConfig>, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| format!("{}: {e}", cert.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: {e}", cert.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no certificate", cert.display()));
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| format!("{}: {e}", key.display()))?;
    // ring: see `client::tls_config`.
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| format!("certificate and key: {e}"))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Serve until `shutdown` resolves, with the default [`ServeOptions`].
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: App,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_with(listener, app, ServeOptions::default(), shutdown).await
}

/// Serve until `shutdown` resolves. In the background: prune old nonces, expire overdue runs,
/// move jobs on, write the trail's refusal counts.
pub async fn serve_with(
    listener: tokio::net::TcpListener,
    app: App,
    opts: ServeOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let housekeeping = tokio::spawn(housekeeping(app.clone()));
    let router = router(app.clone());
    let max = opts.max_connections.max(1);
    let slots = Arc::new(Semaphore::new(max));
    let (close_tx, close_rx) = watch::channel(false);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            _ = &mut shutdown => break,
            a = listener.accept() => a,
        };
        let (tcp, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors or a connection reset before it was accepted: wait
                // a moment instead of spinning.
                eprintln!("registry: accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            app.refusals.connection_refused(peer.ip());
            drop(tcp);
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let (router, opts, close) = (router.clone(), opts.clone(), close_rx.clone());
        tokio::spawn(async move {
            connection(tcp, peer, router, opts, close).await;
            drop(slot);
        });
    }
    // Stop: no new connections; idle ones close now, busy ones after their request.
    let _ = close_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(10), slots.acquire_many(max as u32)).await;
    housekeeping.abort();
    Ok(())
}

async fn housekeeping(app: App) {
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    let mut n: u64 = 0;
    loop {
        tick.tick().await;
        n += 1;
        app.refusals.flush(&app.db, false).await;
        if n.is_multiple_of(60) {
            app.throttle.forget_quiet();
        }
        if n.is_multiple_of(2) {
            continue;
        }
        let db = &app.db;
        let cutoff = now_ms() / 1000 - 2 * httpsig::MAX_SKEW_S;
        if let Err(e) = db.prune_nonces(cutoff).await {
            eprintln!("registry: pruning nonces: {e}");
        }
        if let Err(e) = db.prune_idempotency(now_ms() - 86_400_000).await {
            eprintln!("registry: pruning idempotency keys: {e}");
        }
        if let Err(e) = db.expire_overdue().await {
            eprintln!("registry: expiring runs: {e}");
        }
        if let Err(e) = advance_all_jobs(db, &app.notify).await {
            eprintln!("registry: advancing jobs: {e}");
        }
    }
}

async fn connection(
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    router: Router,
    opts: ServeOptions,
    close: watch::Receiver<bool>,
) {
    let activity = Arc::new(Activity::new());
    match &opts.tls {
        Some(config) => {
            let acceptor = tokio_rustls::TlsAcceptor::from(config.clone());
            let handshake =
                tokio::time::timeout(opts.header_read_timeout, acceptor.accept(tcp)).await;
            let Ok(Ok(stream)) = handshake else {
                return;
            };
            let io = Tracked {
                io: stream,
                activity: activity.clone(),
            };
            drive(io, peer, router, &opts, activity, close).await
        }
        None => {
            let io = Tracked {
                io: tcp,
                activity: activity.clone(),
            };
            drive(io, peer, router, &opts, activity, close).await
        }
    }
}

/// Serve one connection's requests until it closes, idles out or the registry stops.
async fn drive<IO>(
    io: IO,
    peer: SocketAddr,
    router: Router,
    opts: &ServeOptions,
    activity: Arc<Activity>,
    mut close: watch::Receiver<bool>,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let in_flight = activity.clone();
    let service =
        hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
            req.extensions_mut().insert(ConnectInfo(peer));
            let busy = Busy::start(in_flight.clone());
            let router = router.clone();
            async move {
                let response = router.oneshot(req.map(Body::new)).await;
                drop(busy);
                response
            }
        });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(opts.header_read_timeout)
        .max_buf_size(64 << 10);
    let conn = builder.serve_connection(TokioIo::new(io), service);
    let mut conn = std::pin::pin!(conn);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut closing_since: Option<Instant> = None;
    loop {
        tokio::select! {
            _ = conn.as_mut() => break,
            _ = tick.tick() => {
                let idle = activity.idle_for();
                if closing_since.is_none() && activity.busy() == 0 && idle >= opts.idle_timeout {
                    conn.as_mut().graceful_shutdown();
                    closing_since = Some(Instant::now());
                }
                // A client that stopped reading its response holds the connection: drop it.
                if closing_since.is_some_and(|t| t.elapsed() >= opts.idle_timeout)
                    || (activity.busy() == 0 && idle >= opts.idle_timeout * 2)
                {
                    break;
                }
            }
            changed = close.changed(), if closing_since.is_none() => {
                if changed.is_err() || *close.borrow() {
                    conn.as_mut().graceful_shutdown();
                    closing_since = Some(Instant::now());
                }
            }
        }
    }
}

/// When a connection last moved bytes, and how many of its requests are being handled.
struct Activity {
    start: Instant,
    last_ms: AtomicU64,
    busy: AtomicUsize,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
            busy: AtomicUsize::new(0),
        }
    }
    fn touch(&self) {
        let ms = self.start.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }
    fn idle_for(&self) -> Duration {
        let now = self.start.elapsed().as_millis() as u64;
        Duration::from_millis(now.saturating_sub(self.last_ms.load(Ordering::Relaxed)))
    }
    fn busy(&self) -> usize {
        self.busy.load(Ordering::Relaxed)
    }
}

/// A request being handled (a long-poll moves no bytes for up to `max_wait`).
struct Busy(Arc<Activity>);

impl Busy {
    fn start(a: Arc<Activity>) -> Busy {
        a.busy.fetch_add(1, Ordering::Relaxed);
        a.touch();
        Busy(a)
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.busy.fetch_sub(1, Ordering::Relaxed);
        self.0.touch();
    }
}

/// A socket (or TLS stream) that notes when bytes move.
struct Tracked<IO> {
    io: IO,
    activity: Arc<Activity>,
}

impl<IO: AsyncRead + Unpin> AsyncRead for Tracked<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.touch();
        }
        r
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Tracked<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        r
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
