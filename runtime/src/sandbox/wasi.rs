//! WASI as a train sees it: no preopens, no environment or arguments, no network, empty stdin,
//! stdout/stderr into a capped buffer, a fixed wall clock, a stepping monotonic clock and
//! seeded randomness.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use wasmtime_wasi::WasiCtx;

/// WASI for a train: no preopens, no environment or arguments, no network, empty stdin,
/// stdout/stderr into a capped in-memory buffer, a fixed clock and randomness seeded from
/// `seed` (so a run is reproducible from its audit entry).
pub(crate) fn locked_down_wasi(seed: &[u8; 32], stdout: &CappedPipe) -> WasiCtx {
    use rand::SeedableRng;
    let mut secure_seed = *seed;
    secure_seed[0] ^= 1;
    let mut insecure_seed = *seed;
    insecure_seed[0] ^= 2;
    let mut b = wasmtime_wasi::WasiCtxBuilder::new();
    b.allow_tcp(false)
        .allow_udp(false)
        .allow_ip_name_lookup(false)
        .socket_addr_check(|_, _| Box::pin(async { false }))
        .stdout(stdout.clone())
        .stderr(stdout.clone())
        .secure_random(rand::rngs::StdRng::from_seed(secure_seed))
        .insecure_random(rand::rngs::StdRng::from_seed(insecure_seed))
        .insecure_random_seed(u128::from_le_bytes(
            seed[..16].try_into().expect("16 bytes"),
        ))
        .wall_clock(FixedWallClock)
        .monotonic_clock(StepMonotonicClock::default());
    b.build()
}

/// 2000-01-01T00:00:00Z for every call: a guest cannot time anything with it.
struct FixedWallClock;

impl wasmtime_wasi::HostWallClock for FixedWallClock {
    fn resolution(&self) -> Duration {
        Duration::from_secs(1)
    }
    fn now(&self) -> Duration {
        Duration::from_secs(946_684_800)
    }
}

/// Advances 1 µs per reading, independent of real time.
#[derive(Default)]
struct StepMonotonicClock(AtomicU64);

impl wasmtime_wasi::HostMonotonicClock for StepMonotonicClock {
    fn resolution(&self) -> u64 {
        1_000
    }
    fn now(&self) -> u64 {
        self.0.fetch_add(1_000, Ordering::Relaxed)
    }
}

/// stdout/stderr of a guest: kept up to `cap` bytes, the rest silently dropped (a guest must
/// not be able to fail or stall the station by printing).
#[derive(Clone)]
pub(crate) struct CappedPipe {
    buf: Arc<Mutex<Vec<u8>>>,
    cap: usize,
}

impl CappedPipe {
    pub(crate) fn new(cap: usize) -> CappedPipe {
        CappedPipe {
            buf: Arc::new(Mutex::new(Vec::new())),
            cap,
        }
    }

    pub(crate) fn push(&self, bytes: &[u8]) {
        let mut buf = self.buf.lock().unwrap_or_else(|p| p.into_inner());
        let room = self.cap.saturating_sub(buf.len());
        buf.extend_from_slice(&bytes[..bytes.len().min(room)]);
    }

    pub(crate) fn contents(&self) -> Vec<u8> {
        self.buf.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl wasmtime_wasi::cli::IsTerminal for CappedPipe {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl wasmtime_wasi::cli::StdoutStream for CappedPipe {
    fn p2_stream(&self) -> Box<dyn wasmtime_wasi::p2::OutputStream> {
        Box::new(self.clone())
    }
    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

#[wasmtime_wasi::async_trait]
impl wasmtime_wasi::p2::Pollable for CappedPipe {
    async fn ready(&mut self) {}
}

impl wasmtime_wasi::p2::OutputStream for CappedPipe {
    fn write(&mut self, bytes: bytes::Bytes) -> wasmtime_wasi::p2::StreamResult<()> {
        self.push(&bytes);
        Ok(())
    }
    fn flush(&mut self) -> wasmtime_wasi::p2::StreamResult<()> {
        Ok(())
    }
    fn check_write(&mut self) -> wasmtime_wasi::p2::StreamResult<usize> {
        Ok(64 * 1024)
    }
}

impl tokio::io::AsyncWrite for CappedPipe {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.push(buf);
        std::task::Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capped_pipe_drops_beyond_cap() {
        let p = CappedPipe::new(5);
        p.push(b"abc");
        p.push(b"defgh");
        assert_eq!(p.contents(), b"abcde");
    }
}
