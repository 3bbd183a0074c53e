//! A station daemon in front of a registry (or a hospital proxy) that answers with things it
//! cannot use: a captive portal's HTML page, a refusal, JSON of another shape. The daemon must
//! wait and ask again, never exit: only its own station directory failing stops it.

mod common;

use common::*;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Answer every request on a loopback port with `response` until `stop`; counts requests.
fn fake_registry(
    response: &'static str,
    stop: Arc<AtomicBool>,
    seen: Arc<AtomicUsize>,
) -> (String, std::thread::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let t = std::thread::spawn(move || {
        // Bounded: at most 500 connections or until told to stop.
        let mut served = 0;
        while !stop.load(Ordering::Relaxed) && served < 500 {
            match listener.accept() {
                Ok((mut c, _)) => {
                    c.set_nonblocking(false).unwrap();
                    c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                    let mut buf = [0u8; 8192];
                    let _ = c.read(&mut buf);
                    let _ = c.write_all(response.as_bytes());
                    served += 1;
                    seen.fetch_add(1, Ordering::Relaxed);
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    });
    (url, t)
}

#[test]
fn the_daemon_waits_out_answers_it_cannot_use() {
    let tmp = tempfile::tempdir().unwrap();
    let archive = tmp.path().join("archive");
    std::fs::create_dir_all(&archive).unwrap();
    let dir = tmp.path().join("st1");
    ok(&[
        "station",
        "init",
        "--dir",
        s(&dir),
        "--archive",
        s(&archive),
    ]);
    for (what, response) in [
        (
            "a captive portal",
            "HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: 27\r\nConnection: close\r\n\r\n<html>captive portal</html>",
        ),
        (
            "a refusal",
            "HTTP/1.1 403 Forbidden\r\nContent-Type: application/json\r\nContent-Length: 59\r\nConnection: close\r\n\r\n{\"error\":{\"code\":\"forbidden\",\"message\":\"go away, station\"}}",
        ),
        (
            "JSON of another shape",
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 26\r\nConnection: close\r\n\r\n{\"items\":[{\"state\":\"bogus\"",
        ),
    ] {
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(AtomicUsize::new(0));
        let (url, server) = fake_registry(response, stop.clone(), seen.clone());
        let log = tmp.path().join("daemon.log");
        let mut daemon = command()
            .args([
                "station",
                "serve",
                "--dir",
                s(&dir),
                "--registry",
                &url,
                "--poll-wait",
                "1",
            ])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        // Alive after it has been answered at least twice (it asked again after a pause).
        let t0 = Instant::now();
        while seen.load(Ordering::Relaxed) < 2 && t0.elapsed() < Duration::from_secs(30) {
            assert!(
                daemon.try_wait().unwrap().is_none(),
                "{what}: the daemon exited:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let alive = daemon.try_wait().unwrap().is_none();
        daemon.kill().unwrap();
        daemon.wait().unwrap();
        stop.store(true, Ordering::Relaxed);
        server.join().unwrap();
        let said = std::fs::read_to_string(&log).unwrap();
        assert!(alive, "{what}: the daemon exited:\n{said}");
        assert!(
            seen.load(Ordering::Relaxed) >= 2,
            "{what}: the daemon did not ask again:\n{said}"
        );
        assert!(said.contains("retrying in"), "{what}:\n{said}");
    }
}
