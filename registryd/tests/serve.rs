//! `amicus-registry` as an operator runs it: settings from a configuration file and the
//! environment (no password in argv), the first admin added with the database named by the
//! environment, a clean stop on SIGTERM; and the binary's dependencies free of station code.

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_amicus-registry");

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn get(port: u16, path: &str) -> Option<String> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}

fn registry(args: &[&str], env: &[(&str, &str)], dir: &Path) -> Command {
    let mut c = Command::new(BIN);
    c.args(args)
        .current_dir(dir)
        .env_remove("AMICUS_DB_URL")
        .env_remove("AMICUS_LISTEN")
        .env_remove("AMICUS_REGISTRY_CONFIG");
    for (k, v) in env {
        c.env(k, v);
    }
    c
}

#[test]
fn configured_by_file_and_environment_and_stopped_by_sigterm() {
    let tmp = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", tmp.path().join("reg.db").display());
    let port = free_port();
    let config = tmp.path().join("registry.toml");
    std::fs::write(
        &config,
        format!("listen = \"127.0.0.1:{port}\"\nrate_per_address = 1000\n"),
    )
    .unwrap();

    // The first admin, with the database from the environment.
    let out = registry(
        &["user", "add", "--name", "root", "--role", "admin"],
        &[("AMICUS_DB_URL", &db)],
        tmp.path(),
    )
    .output()
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let token = stdout.lines().last().unwrap().trim().to_string();
    assert!(stdout.contains("user root (admin) added"), "{stdout}");
    assert!(token.len() >= 32, "{stdout}");

    // The service: the listening address from the file (named by the environment), the
    // database from the environment.
    let mut child = registry(
        &["serve"],
        &[
            ("AMICUS_DB_URL", &db),
            ("AMICUS_REGISTRY_CONFIG", config.to_str().unwrap()),
        ],
        tmp.path(),
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let t0 = Instant::now();
    let health = loop {
        if let Some(r) = get(port, "/v1/health") {
            break r;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "registry did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    let me = {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        write!(
            s,
            "GET /v1/me HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    };
    assert!(
        me.starts_with("HTTP/1.1 200") && me.contains("\"root\""),
        "{me}"
    );

    let sent = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "no exit within 15 s of SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(status.success(), "{status}: {stderr}");
    assert!(stderr.contains("registry stopped"), "{stderr}");
    assert!(get(port, "/v1/health").is_none(), "still listening");
}

#[test]
fn passwords_stay_out_of_messages_and_bad_configuration_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    // Nothing listens on this port: the connection fails, and the message must not carry the
    // password (it does warn that argv is the wrong place for it).
    let port = free_port();
    let url = format!("postgres://amicus:hunter2secret@127.0.0.1:{port}/amicus");
    let out = registry(
        &[
            "user", "add", "--db", &url, "--name", "x", "--role", "admin",
        ],
        &[],
        tmp.path(),
    )
    .output()
    .unwrap();
    assert!(!out.status.success());
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!text.contains("hunter2secret"), "{text}");
    assert!(text.contains("amicus:***@"), "{text}");
    assert!(text.contains("AMICUS_DB_URL"), "{text}");

    // A misspelt setting is an error, not a silent default.
    let config = tmp.path().join("r.toml");
    std::fs::write(&config, "listen = \"127.0.0.1:0\"\nmax_conections = 5\n").unwrap();
    let out = registry(
        &["serve", "--config", config.to_str().unwrap()],
        &[],
        tmp.path(),
    )
    .output()
    .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("max_conections"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // No database anywhere for `user add`: said so.
    let out = registry(
        &["user", "add", "--name", "x", "--role", "admin"],
        &[],
        tmp.path(),
    )
    .output()
    .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no database"));
}

/// The registry's binary (and so its image) carries no station code: no WebAssembly engine,
/// ONNX Runtime, RDF store or DICOM parser.
#[test]
fn the_registry_binary_depends_on_no_station_code() {
    let out = Command::new(env!("CARGO"))
        .args([
            "tree",
            "--offline",
            "-q",
            "-e",
            "normal",
            "-p",
            "amicus-registryd",
            "--prefix",
            "none",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tree = String::from_utf8_lossy(&out.stdout);
    assert!(tree.contains("amicus-registry v"), "{tree}");
    for line in tree.lines() {
        let name = line.split(' ').next().unwrap_or("");
        for banned in [
            "amicus-runtime",
            "amicus-daemon",
            "amicus-kernels",
            "amicus-index",
            "amicus-imaging",
            "wasmtime",
            "ort",
            "ort-sys",
            "oxigraph",
        ] {
            assert_ne!(name, banned, "the registry depends on {banned}");
        }
        assert!(
            !name.starts_with("dicom-"),
            "the registry depends on {name}"
        );
    }
}

fn postgres(args: &[&str]) -> Result<String, String> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/postgres.sh");
    let out = Command::new("bash")
        .arg(script)
        .args(args)
        .output()
        .map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn status_of(port: u16, path: &str) -> Option<u16> {
    let r = get(port, path)?;
    r.get(9..12)?.parse().ok()
}

fn wait_status(port: u16, path: &str, want: u16, limit: Duration) -> bool {
    let t0 = Instant::now();
    while t0.elapsed() < limit {
        if status_of(port, path) == Some(want) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    false
}

/// Readiness follows the database: 503 while PostgreSQL is down (liveness stays 200), 200
/// again when it is back, with the same process.
#[test]
fn readiness_follows_the_database() {
    let tmp = tempfile::tempdir().unwrap();
    let _ = Command::new("chmod")
        .args(["755", tmp.path().to_str().unwrap()])
        .status();
    let data = tmp.path().join("pg");
    let data = data.to_str().unwrap();
    let pg_port = free_port().to_string();
    let url = match postgres(&["start", data, &pg_port]) {
        Ok(u) => u,
        Err(e) => {
            assert!(
                std::env::var_os("CI").is_none(),
                "PostgreSQL cannot start here: {e}"
            );
            eprintln!("SKIPPED (counted): PostgreSQL cannot start here: {e}");
            return;
        }
    };
    struct Stop<'a>(&'a str);
    impl Drop for Stop<'_> {
        fn drop(&mut self) {
            let _ = postgres(&["stop", self.0]);
        }
    }
    let _stop = Stop(data);
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut child = registry(
        &["serve"],
        &[("AMICUS_DB_URL", &url), ("AMICUS_LISTEN", &listen)],
        tmp.path(),
    )
    .stdout(Stdio::null())
    .stderr(Stdio::null())
    .spawn()
    .unwrap();
    let ok = wait_status(port, "/v1/ready", 200, Duration::from_secs(30));
    let down = ok && {
        postgres(&["stop", data]).unwrap();
        wait_status(port, "/v1/ready", 503, Duration::from_secs(20))
    };
    let alive = status_of(port, "/v1/health");
    let back = down && {
        postgres(&["start", data, &pg_port]).unwrap();
        wait_status(port, "/v1/ready", 200, Duration::from_secs(30))
    };
    let _ = child.kill();
    let _ = child.wait();
    assert!(ok, "never ready");
    assert!(down, "still ready with the database down");
    assert_eq!(alive, Some(200), "liveness must not follow the database");
    assert!(back, "not ready again after the database came back");
}
