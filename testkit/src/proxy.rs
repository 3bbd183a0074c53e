//! An HTTP proxy on loopback, as a hospital runs one: `CONNECT host:port` tunnels (what an
//! `https://` client uses) and absolute-form requests forwarded to their origin (what an
//! `http://` client sends through a proxy). It records every request line it saw, so a test
//! can prove traffic went through it. Threads, bounded: it stops when dropped.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub struct Proxy {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Vec<String>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Proxy {
    /// A proxy listening on 127.0.0.1 (a free port).
    pub fn start() -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("proxy listens");
        let addr = listener.local_addr().expect("proxy address");
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (stop2, seen2) = (stop.clone(), seen.clone());
        let thread = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stop2.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let seen = seen2.clone();
                std::thread::spawn(move || {
                    let _ = serve(conn, &seen);
                });
            }
        });
        Proxy {
            addr,
            stop,
            seen,
            thread: Some(thread),
        }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The request lines it handled (`CONNECT 127.0.0.1:7700 HTTP/1.1`, …).
    pub fn seen(&self) -> Vec<String> {
        self.seen.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(client: TcpStream, seen: &Mutex<Vec<String>>) -> std::io::Result<()> {
    client.set_read_timeout(Some(Duration::from_secs(120)))?;
    let mut reader = BufReader::new(client.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let request = line.trim_end().to_string();
    let mut head = Vec::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h == "\r\n" || h == "\n" {
            break;
        }
        head.push(h);
    }
    if let Ok(mut s) = seen.lock() {
        s.push(request.clone());
    }
    let mut parts = request.split(' ');
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let mut client_w = client.try_clone()?;
    if method == "CONNECT" {
        let Ok(upstream) = TcpStream::connect(target) else {
            client_w.write_all(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")?;
            return Ok(());
        };
        client_w.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")?;
        return pipe(reader, client_w, upstream);
    }
    // Absolute form: http://host:port/path → connect to host:port, send origin form.
    let Some(rest) = target.strip_prefix("http://") else {
        client_w.write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")?;
        return Ok(());
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let Ok(mut upstream) = TcpStream::connect(authority) else {
        client_w.write_all(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")?;
        return Ok(());
    };
    let version = parts.next().unwrap_or("HTTP/1.1");
    let mut out = format!("{method} {path} {version}\r\n");
    for h in &head {
        if !h.to_ascii_lowercase().starts_with("proxy-") {
            out.push_str(h);
        }
    }
    out.push_str("\r\n");
    upstream.write_all(out.as_bytes())?;
    pipe(reader, client_w, upstream)
}

/// Copy both ways until either side closes.
fn pipe(
    mut from_client: BufReader<TcpStream>,
    mut to_client: TcpStream,
    upstream: TcpStream,
) -> std::io::Result<()> {
    let mut up_w = upstream.try_clone()?;
    let mut up_r = upstream;
    let back = std::thread::spawn(move || {
        let _ = std::io::copy(&mut up_r, &mut to_client);
        let _ = to_client.shutdown(Shutdown::Write);
    });
    // What the reader buffered past the head belongs upstream.
    let buffered = from_client.buffer().to_vec();
    up_w.write_all(&buffered)?;
    from_client.consume(buffered.len());
    let mut buf = [0u8; 16 << 10];
    loop {
        let n = match from_client.get_mut().read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if up_w.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = up_w.shutdown(Shutdown::Write);
    let _ = back.join();
    Ok(())
}
