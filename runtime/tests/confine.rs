//! The run worker's confinement against the real kernel: Landlock lets a confined thread read
//! what it was granted and nothing else, write nothing and connect nowhere; the seccomp filter
//! (in a child process, since it binds the whole process) refuses sockets, new processes and
//! raising limits, while threads still start. Where the kernel lacks a feature the test says
//! so loudly; in CI that is a failure.

use amicus_runtime::worker::confine::{self, FsGrants};
use std::io::Write;
use std::time::Duration;

fn skip(what: &str) {
    let message = format!("SKIPPED (counted): {what}");
    assert!(std::env::var_os("CI").is_none(), "{message}");
    eprintln!("{message}");
}

#[test]
fn landlock_confines_a_thread_to_its_grants() {
    if confine::landlock_abi() < 6 {
        skip(&format!(
            "the kernel's Landlock ABI is {} (6 needed for files, TCP and signals)",
            confine::landlock_abi()
        ));
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let allowed = dir.path().join("archive");
    std::fs::create_dir(&allowed).unwrap();
    std::fs::write(allowed.join("image.dcm"), b"pixels").unwrap();
    std::fs::write(dir.path().join("station.key"), b"secret").unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    // Another process, outside the sandbox (the station, say).
    let mut other = std::process::Command::new("sleep")
        .arg("30")
        .spawn()
        .unwrap();
    let other_pid = other.id();
    let root = dir.path().to_path_buf();
    let confined = std::thread::spawn(move || {
        let status = confine::landlock(&FsGrants {
            read: vec![allowed.clone()],
            ..FsGrants::default()
        });
        let granted = std::fs::read(allowed.join("image.dcm"));
        let key = std::fs::read(root.join("station.key"));
        let listing = std::fs::read_dir(&root).map(|d| d.count());
        let etc = std::fs::read("/etc/hostname").or_else(|_| std::fs::read("/etc/passwd"));
        let write = std::fs::write(allowed.join("new.txt"), b"x");
        let tcp = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2));
        let bind = std::net::TcpListener::bind("127.0.0.1:0");
        // SAFETY: signal 0 only checks whether the signal could be sent.
        let signal = unsafe { libc::kill(other_pid as libc::pid_t, 0) };
        (status, granted, key, listing, etc, write, tcp, bind, signal)
    });
    let (status, granted, key, listing, etc, write, tcp, bind, signal) = confined.join().unwrap();
    assert!(status.starts_with("enforced"), "{status}");
    assert_eq!(granted.unwrap(), b"pixels");
    for (what, denied) in [
        ("the station key", key.is_err()),
        ("listing the station", listing.is_err()),
        ("/etc", etc.is_err()),
        ("a write in the archive", write.is_err()),
        ("a TCP connection", tcp.is_err()),
        ("a TCP bind", bind.is_err()),
    ] {
        assert!(denied, "{what} was allowed");
    }
    let _ = other.kill();
    let _ = other.wait();
    assert_eq!(signal, -1, "signalling another process was allowed");
    // This thread was never confined.
    assert_eq!(
        std::fs::read(dir.path().join("station.key")).unwrap(),
        b"secret"
    );
}

/// The child half of `seccomp_refuses_what_a_worker_never_needs`: runs only in the child.
#[test]
fn seccomp_child() {
    if std::env::var_os("AMICUS_SECCOMP_CHILD").is_none() {
        return;
    }
    let status = confine::seccomp();
    let mut out = std::fs::OpenOptions::new()
        .append(true)
        .open(std::env::var("AMICUS_SECCOMP_REPORT").unwrap())
        .unwrap();
    let mut say = |line: String| {
        writeln!(out, "{line}").unwrap();
    };
    say(format!("status {status}"));
    say(format!(
        "udp {}",
        std::net::UdpSocket::bind("127.0.0.1:0").is_ok()
    ));
    say(format!(
        "tcp {}",
        std::net::TcpListener::bind("127.0.0.1:0").is_ok()
    ));
    say(format!(
        "exec {}",
        std::process::Command::new("/bin/true").status().is_ok()
    ));
    // SAFETY: fork in a test child that only exits in the new process.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        unsafe { libc::_exit(0) };
    }
    say(format!("fork {}", pid > 0));
    let limit = libc::rlimit {
        rlim_cur: 1 << 20,
        rlim_max: 1 << 20,
    };
    // SAFETY: setrlimit with a valid struct.
    say(format!(
        "setrlimit {}",
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } == 0
    ));
    let mut current = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit fills the struct.
    say(format!(
        "getrlimit {}",
        unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut current) } == 0
    ));
    say(format!(
        "kill-parent {}",
        unsafe { libc::kill(libc::getppid(), 0) } == 0
    ));
    say(format!(
        "thread {}",
        std::thread::spawn(|| 7)
            .join()
            .map(|v| v == 7)
            .unwrap_or(false)
    ));
    say(format!(
        "socketpair {}",
        std::os::unix::net::UnixStream::pair().is_ok()
    ));
}

#[test]
fn seccomp_refuses_what_a_worker_never_needs() {
    if !cfg!(target_os = "linux") {
        skip("seccomp is Linux only");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("report.txt");
    std::fs::write(&report, "").unwrap();
    let status = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "seccomp_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("AMICUS_SECCOMP_CHILD", "1")
        .env("AMICUS_SECCOMP_REPORT", &report)
        .status()
        .unwrap();
    assert!(status.success());
    let text = std::fs::read_to_string(&report).unwrap();
    let get = |k: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{k} ")))
            .unwrap_or_else(|| panic!("no {k} in {text}"))
            .to_string()
    };
    if get("status") != "enforced" {
        skip(&format!("seccomp: {}", get("status")));
        return;
    }
    for refused in ["udp", "tcp", "exec", "fork", "setrlimit", "kill-parent"] {
        assert_eq!(get(refused), "false", "{refused} was allowed:\n{text}");
    }
    for allowed in ["getrlimit", "thread", "socketpair"] {
        assert_eq!(get(allowed), "true", "{allowed} was refused:\n{text}");
    }
}
