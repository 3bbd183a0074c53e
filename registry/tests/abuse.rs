//! The registry as an internet-facing service under abuse, on loopback: bodies announced but
//! never sent, headers sent a byte at a time, connections opened and left idle past the cap,
//! floods of refused requests, callers over their rate. Every loop here is bounded.
//!
//! The service is real (the same accept loop and router as `amicus registry serve`), over
//! SQLite: what is tested is connection and request handling, not the database.

use amicus_registry::client::{ClientError, PersonClient};
use amicus_registry::db::Db;
use amicus_registry::server::{self, App, Limits, RateLimits, ServeOptions};
use amicus_registry::wire::*;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

struct Service {
    addr: String,
    db: Db,
    app: App,
    admin_token: String,
    _dir: tempfile::TempDir,
    _stop: tokio::sync::oneshot::Sender<()>,
}

async fn start(limits: Limits, opts: ServeOptions) -> Service {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("registry.db").display());
    let db = Db::connect(&url).await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let app = App::new(db.clone(), limits);
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let served = app.clone();
    tokio::spawn(async move {
        server::serve_with(listener, served, opts, async {
            let _ = rx.await;
        })
        .await
        .unwrap();
    });
    let admin_token = server::add_user(
        &db,
        &NewUser {
            token_expires_in_s: None,
            name: "root".into(),
            role: Role::Admin,
            station: None,
            enc_public_key: None,
        },
    )
    .await
    .unwrap()
    .token;
    Service {
        addr,
        db,
        app,
        admin_token,
        _dir: dir,
        _stop: tx,
    }
}

impl Service {
    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// Send `head` on a fresh connection (no body) and read what comes back within `limit`.
fn head_only(addr: &str, head: &str, limit: Duration) -> (String, Duration) {
    let mut tcp = TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(limit)).unwrap();
    let t0 = Instant::now();
    tcp.write_all(head.as_bytes()).unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tcp.read(&mut buf).unwrap_or(0);
    (
        String::from_utf8_lossy(&buf[..n]).into_owned(),
        t0.elapsed(),
    )
}

/// Whether the server closed `tcp` (EOF or reset) within `limit`.
fn closed_within(tcp: &mut TcpStream, limit: Duration) -> bool {
    tcp.set_read_timeout(Some(limit)).unwrap();
    let mut b = [0u8; 512];
    loop {
        match tcp.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return false,
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => return false,
            Err(_) => return true,
        }
    }
}

fn quick() -> ServeOptions {
    ServeOptions {
        max_connections: 64,
        header_read_timeout: Duration::from_secs(1),
        idle_timeout: Duration::from_secs(2),
        tls: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_of_callers_not_known_are_never_read() {
    let s = start(Limits::default(), quick()).await;
    let addr = s.addr.clone();
    tokio::task::spawn_blocking(move || {
        // No credentials at all, 200 MB announced: refused before a byte of it is sent.
        for head in [
            "PUT /v1/trains HTTP/1.1\r\nHost: x\r\nContent-Length: 200000000\r\n\r\n".to_string(),
            "PUT /v1/trains HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer amicus_nope\r\nContent-Length: 200000000\r\n\r\n".to_string(),
            // A "station" whose key the registry does not know.
            format!(
                "POST /v1/station/audit HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000\r\nSignature-Input: sig1=(\"@method\" \"@authority\" \"@path\" \"@query\" \"content-digest\");created={};nonce=\"{}\";keyid=\"{}\";alg=\"ed25519\"\r\nSignature: sig1=:AAAA:\r\nContent-Digest: sha-256=:AAAA:\r\n\r\n",
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_secs(),
                "00".repeat(16),
                "ab".repeat(16)
            ),
        ] {
            let (answer, took) = head_only(&addr, &head, Duration::from_secs(5));
            assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
            assert!(took < Duration::from_secs(2), "{took:?}");
        }
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_idle_connections_are_cut_and_the_cap_holds() {
    let opts = ServeOptions {
        max_connections: 16,
        ..quick()
    };
    let s = start(Limits::default(), opts).await;
    let addr = s.addr.clone();
    tokio::task::spawn_blocking(move || {
        // A header sent a byte at a time is cut off at the header timeout.
        let mut tcp = TcpStream::connect(&addr).unwrap();
        let t0 = Instant::now();
        let mut cut = false;
        for b in b"GET /v1/health HTTP/1.1\r\nHost: x\r\nX-Slow: "
            .iter()
            .cycle()
            .take(40)
        {
            if tcp.write_all(&[*b]).is_err() {
                cut = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(150));
            if t0.elapsed() > Duration::from_secs(3) {
                break;
            }
        }
        cut = cut || closed_within(&mut tcp, Duration::from_millis(500));
        assert!(cut, "a trickled header kept its connection");
        assert!(t0.elapsed() < Duration::from_secs(4), "{:?}", t0.elapsed());

        // Forty idle connections against a cap of sixteen: those over the cap are closed at
        // once, the rest at the header timeout; the service answers again right after.
        let mut idle: Vec<TcpStream> = (0..40)
            .map(|_| TcpStream::connect(&addr).unwrap())
            .collect();
        std::thread::sleep(Duration::from_millis(300));
        let t0 = Instant::now();
        let all_closed = idle
            .iter_mut()
            .all(|c| closed_within(c, Duration::from_secs(3)));
        assert!(all_closed, "idle connections were kept");
        assert!(t0.elapsed() < Duration::from_secs(4));
        drop(idle);
        let (answer, _) = head_only(
            &addr,
            "GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n",
            Duration::from_secs(5),
        );
        assert!(answer.starts_with("HTTP/1.1 200"), "health after: {answer}");

        // A keep-alive connection left idle after its request is closed (hyper restarts the
        // header timeout while it waits for the next request; the idle timeout backs it).
        let mut tcp = TcpStream::connect(&addr).unwrap();
        tcp.write_all(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut buf = [0u8; 1024];
        let n = tcp.read(&mut buf).unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
        let t0 = Instant::now();
        assert!(closed_within(&mut tcp, Duration::from_secs(6)));
        let waited = t0.elapsed();
        assert!(
            waited >= Duration::from_millis(500) && waited < Duration::from_secs(5),
            "{waited:?}"
        );
    })
    .await
    .unwrap();
    // The connections refused at the cap are counted in the trail.
    s.app.flush_trail().await;
    let trail = s.db.audit_entries().await.unwrap();
    assert!(
        trail
            .iter()
            .any(|e| e.action == "connect" && e.outcome.contains("at the connection cap")),
        "{trail:?}"
    );
    // And the service is fine.
    let admin = PersonClient::new(&s.url(), &s.admin_token).unwrap();
    admin.me().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_over_their_rate_wait_and_others_do_not() {
    let limits = Limits {
        rates: RateLimits {
            per_address: 1000,
            address_burst: 1000,
            per_identity: 1,
            identity_burst: 3,
        },
        ..Limits::default()
    };
    let s = start(limits, quick()).await;
    let admin = PersonClient::new(&s.url(), &s.admin_token).unwrap();
    let bob = admin
        .add_user(&NewUser {
            token_expires_in_s: None,
            name: "bob".into(),
            role: Role::Auditor,
            station: None,
            enc_public_key: None,
        })
        .await
        .unwrap();
    let bob = PersonClient::new(&s.url(), &bob.token).unwrap();
    let mut limited = None;
    for _ in 0..5 {
        if let Err(e) = admin.me().await {
            limited = Some(e);
            break;
        }
    }
    match limited {
        Some(ClientError::Api { status, code, .. }) => {
            assert_eq!((status, code.as_str()), (429, "rate_limited"))
        }
        other => panic!("no 429 for the admin: {other:?}"),
    }
    // Another identity from the same address is not held up.
    bob.me().await.unwrap();
    // The answer says when to come back.
    let r = amicus_registry::client::http(Duration::from_secs(10))
        .get(format!("{}/v1/me", s.url()))
        .bearer_auth(&s.admin_token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    let after: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=3).contains(&after), "{after}");
    tokio::time::sleep(Duration::from_secs(after)).await;
    admin.me().await.unwrap();

    // Per address: a flood from one address is answered 429 without reaching a handler.
    let limits = Limits {
        rates: RateLimits {
            per_address: 5,
            address_burst: 10,
            per_identity: 1000,
            identity_burst: 1000,
        },
        ..Limits::default()
    };
    let s = start(limits, quick()).await;
    let client = amicus_registry::client::http(Duration::from_secs(10));
    let mut statuses = Vec::new();
    for _ in 0..30 {
        let r = client
            .get(format!("{}/v1/health", s.url()))
            .send()
            .await
            .unwrap();
        statuses.push(r.status().as_u16());
    }
    assert!(statuses[..10].iter().all(|s| *s == 200), "{statuses:?}");
    assert!(statuses.contains(&429), "{statuses:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_refusals_costs_the_trail_a_bounded_number_of_rows() {
    let s = start(Limits::default(), quick()).await;
    let before = s.db.audit_entries().await.unwrap().len();
    let client = amicus_registry::client::http(Duration::from_secs(10));
    let n = 300u64;
    for i in 0..n {
        let r = client
            .get(format!("{}/v1/tasks/{i}", s.url()))
            .bearer_auth("amicus_not-a-token")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401);
    }
    let rows = s.db.audit_entries().await.unwrap();
    let written = rows.len() - before;
    assert!(
        written as u32 <= 2 * server::ROWS_PER_MINUTE,
        "{written} rows for {n} refusals"
    );
    // Nothing is lost: what was not written one by one is counted once the minute is over.
    s.app.flush_trail().await;
    let rows = s.db.audit_entries().await.unwrap();
    let mut accounted = 0u64;
    for e in &rows[before..] {
        if let Some(rest) = e.outcome.strip_prefix("refused ")
            && let Some((count, _)) = rest.split_once(" more time(s)")
        {
            accounted += count.parse::<u64>().unwrap();
        } else if e.outcome.starts_with("refused 401") {
            accounted += 1;
        }
    }
    assert_eq!(accounted, n, "{:?}", &rows[before..]);
    amicus_registry::db::verify_registry_trail(&rows).unwrap();
}
