//! A TCP load balancer on loopback, as a registry operator puts in front of replicas: each
//! new connection goes to the next backend in turn, skipping any that refuse it (a replica
//! that died). It counts connections per backend, so a test can prove every replica served.
//! Threads, bounded: it stops when dropped.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub struct Balancer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    served: Arc<Mutex<Vec<usize>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Balancer {
    /// A balancer on 127.0.0.1 (a free port) over these backends.
    pub fn start(backends: Vec<SocketAddr>) -> Balancer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("balancer listens");
        let addr = listener.local_addr().expect("balancer address");
        let stop = Arc::new(AtomicBool::new(false));
        let served = Arc::new(Mutex::new(vec![0usize; backends.len()]));
        let (stop2, served2) = (stop.clone(), served.clone());
        let next = Arc::new(AtomicUsize::new(0));
        let thread = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stop2.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(client) = conn else { continue };
                let (backends, served, next) = (backends.clone(), served2.clone(), next.clone());
                std::thread::spawn(move || {
                    let n = backends.len();
                    let first = next.fetch_add(1, Ordering::SeqCst);
                    for i in 0..n {
                        let k = (first + i) % n;
                        let Ok(upstream) =
                            TcpStream::connect_timeout(&backends[k], Duration::from_secs(2))
                        else {
                            continue;
                        };
                        if let Ok(mut s) = served.lock() {
                            s[k] += 1;
                        }
                        pipe(client, upstream);
                        return;
                    }
                });
            }
        });
        Balancer {
            addr,
            stop,
            served,
            thread: Some(thread),
        }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Connections handed to each backend so far.
    pub fn served(&self) -> Vec<usize> {
        self.served.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Copy both ways until either side closes.
fn pipe(client: TcpStream, upstream: TcpStream) {
    let (Ok(mut c2), Ok(mut u2)) = (client.try_clone(), upstream.try_clone()) else {
        return;
    };
    let up = std::thread::spawn(move || {
        let mut client = client;
        let mut upstream = upstream;
        let _ = copy(&mut client, &mut upstream);
        let _ = upstream.shutdown(Shutdown::Write);
    });
    let _ = copy(&mut u2, &mut c2);
    let _ = c2.shutdown(Shutdown::Both);
    let _ = up.join();
}

fn copy(from: &mut TcpStream, to: &mut TcpStream) -> std::io::Result<()> {
    let mut buf = [0u8; 16 << 10];
    loop {
        let n = from.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        to.write_all(&buf[..n])?;
    }
}
