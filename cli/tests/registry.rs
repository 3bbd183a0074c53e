//! The registry and networked stations as separate processes on loopback: `amicus registry
//! serve` over SQLite, `amicus station serve` per station directory, and the researcher's,
//! data owner's and auditor's commands, exactly as people use them.

mod common;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use common::*;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A registry, its people and some stations, each its own process.
struct Net {
    tmp: tempfile::TempDir,
    port: u16,
    registry: Option<Child>,
    daemons: Vec<(String, Child)>,
    /// The registry terminates TLS with a certificate of this CA; clients pin it.
    tls: Option<amicus_testkit::TestCa>,
    /// The database every registry process uses (default: SQLite in the test's directory).
    db_url: Option<String>,
    /// More registry processes on the same database: their ports and processes.
    replicas: Vec<(u16, Option<Child>)>,
    /// Where people and stations reach the registry, when not the first process directly
    /// (a load balancer in front of the replicas).
    via: Option<String>,
    /// The first registry process serves metrics on this port.
    metrics_port: Option<u16>,
}

impl Drop for Net {
    fn drop(&mut self) {
        for (_, c) in &mut self.daemons {
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Some(c) = &mut self.registry {
            let _ = c.kill();
            let _ = c.wait();
        }
        for (_, c) in &mut self.replicas {
            if let Some(c) = c {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

impl Net {
    fn new() -> Net {
        Self::build(false)
    }

    /// A registry serving `https://` with a certificate from a CA made for the test.
    fn with_tls() -> Net {
        Self::build(true)
    }

    fn build(tls: bool) -> Net {
        Self::build_on(tls, None)
    }

    /// A registry whose database is `db_url` (PostgreSQL, for replicas).
    fn on_database(db_url: &str) -> Net {
        Self::build_on(false, Some(db_url.to_string()))
    }

    fn build_on(tls: bool, db_url: Option<String>) -> Net {
        let tmp = tempfile::tempdir().unwrap();
        let tls = tls.then(|| amicus_testkit::TestCa::new(tmp.path(), "registry"));
        let mut net = Net {
            tmp,
            port: free_port(),
            registry: None,
            daemons: Vec::new(),
            tls,
            db_url,
            replicas: Vec::new(),
            via: None,
            metrics_port: None,
        };
        ok(&["keygen", "--out", s(&net.path("alice-sign.key"))]);
        ok(&["keygen", "--x25519", "--out", s(&net.path("alice.key"))]);
        let db = net.db();
        ok(&[
            "registry",
            "user",
            "add",
            "--db",
            &db,
            "--name",
            "root",
            "--role",
            "admin",
            "--token-out",
            s(&net.path("root.token")),
        ]);
        ok(&[
            "registry",
            "user",
            "add",
            "--db",
            &db,
            "--name",
            "alice",
            "--role",
            "researcher",
            "--enc-key",
            s(&net.path("alice.pub")),
            "--token-out",
            s(&net.path("alice.token")),
        ]);
        ok(&[
            "registry",
            "user",
            "add",
            "--db",
            &db,
            "--name",
            "audrey",
            "--role",
            "auditor",
            "--token-out",
            s(&net.path("audrey.token")),
        ]);
        net.start_registry();
        net
    }

    fn path(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }

    fn db(&self) -> String {
        match &self.db_url {
            Some(u) => u.clone(),
            None => format!("sqlite://{}", self.path("registry.db").display()),
        }
    }

    fn url(&self) -> String {
        if let Some(v) = &self.via {
            return v.clone();
        }
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    fn log(&self, name: &str) -> std::fs::File {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.path(&format!("{name}.log")))
            .unwrap()
    }

    fn start_registry(&mut self) {
        let mut child = self.registry_process(self.port, "registry");
        if let Some(m) = self.metrics_port {
            let _ = child.kill();
            let _ = child.wait();
            child = self.registry_process_with(
                self.port,
                "registry",
                &["--metrics-listen".into(), format!("127.0.0.1:{m}")],
            );
        }
        self.registry = Some(child);
    }

    /// Another registry process on the same database; its port.
    fn start_replica(&mut self) -> u16 {
        let port = free_port();
        let child = self.registry_process(port, &format!("replica-{port}"));
        self.replicas.push((port, Some(child)));
        port
    }

    fn registry_process(&self, port: u16, log: &str) -> Child {
        self.registry_process_with(port, log, &[])
    }

    fn registry_process_with(&self, port: u16, log: &str, more: &[String]) -> Child {
        let mut args = vec![
            "registry".to_string(),
            "serve".into(),
            "--listen".into(),
            format!("127.0.0.1:{port}"),
        ];
        args.extend(more.iter().cloned());
        if let Some(ca) = &self.tls {
            args.extend([
                "--tls-cert".into(),
                ca.cert_pem.display().to_string(),
                "--tls-key".into(),
                ca.key_pem.display().to_string(),
            ]);
        }
        // The database URL (a password, with PostgreSQL) in the environment, not in argv.
        let child = command()
            .args(&args)
            .env("AMICUS_DB_URL", self.db())
            .stdout(self.log(log))
            .stderr(self.log(log))
            .spawn()
            .unwrap();
        let t0 = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "registry did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        child
    }

    fn kill_registry(&mut self) {
        let mut c = self.registry.take().expect("registry running");
        c.kill().unwrap();
        c.wait().unwrap();
    }

    /// `amicus ARGS` as a person holding `who`'s token.
    fn person(&self, who: &str, args: &[&str]) -> Out {
        let token = self.path(&format!("{who}.token"));
        let url = self.url();
        let mut full: Vec<&str> = args.to_vec();
        full.extend(["--registry", &url, "--token-file", s(&token)]);
        if let Some(ca) = &self.tls {
            full.extend(["--ca-file", s(&ca.ca_pem)]);
        }
        // alice signs what she asks of stations, naming the key results are sealed to.
        let (sign, recipient) = (self.path("alice-sign.key"), self.path("alice.key"));
        let env: &[(&str, &str)] = if who == "alice" {
            &[
                ("AMICUS_SIGN_KEY", s(&sign)),
                ("AMICUS_RECIPIENT_KEY", s(&recipient)),
            ]
        } else {
            &[]
        };
        amicus_env(&full, env)
    }

    fn person_ok(&self, who: &str, args: &[&str]) -> Out {
        let out = self.person(who, args);
        assert!(out.ok, "{who}: amicus {args:?} failed:\n{}", out.text());
        out
    }

    fn station_dir(&self, name: &str) -> PathBuf {
        self.path(name)
    }

    /// A station with a synthetic archive, indexed, trusting alice, registered by root.
    fn add_station(&self, name: &str, profile: &str, seed: u64) {
        let archive = self.path(&format!("{name}-archive"));
        let dir = self.station_dir(name);
        ok(&[
            "synth",
            "--out",
            s(&archive),
            "--site",
            name,
            "--patients",
            "12",
            "--seed",
            &seed.to_string(),
            "--profile",
            profile,
        ]);
        ok(&[
            "station",
            "init",
            "--dir",
            s(&dir),
            "--archive",
            s(&archive),
            "--name",
            name,
        ]);
        ok(&[
            "station",
            "trust",
            "--dir",
            s(&dir),
            s(&self.path("alice-sign.pub")),
        ]);
        ok(&[
            "station",
            "trust",
            "--researcher",
            "--name",
            "alice",
            "--dir",
            s(&dir),
            s(&self.path("alice-sign.pub")),
        ]);
        ok(&["station", "index", "--dir", s(&dir)]);
        self.person_ok(
            "root",
            &[
                "registry",
                "station",
                "add",
                "--name",
                name,
                "--key",
                s(&dir.join("station.pub")),
            ],
        );
    }

    fn start_daemon(&mut self, name: &str) {
        self.start_daemon_with(name, &["--poll-wait", "2"]);
    }

    fn start_daemon_with(&mut self, name: &str, more: &[&str]) {
        let dir = self.station_dir(name);
        let mut args = vec!["station", "serve", "--dir", s(&dir)];
        args.extend(more);
        let url = self.url();
        // With TLS, the station's network.toml says where and how (written by the test).
        if self.tls.is_none() {
            args.extend(["--registry", &url]);
        }
        let child = command()
            .args(&args)
            .stdout(self.log(name))
            .stderr(self.log(name))
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        self.daemons.push((name.to_string(), child));
    }

    /// SIGTERM to a station daemon (what podman, systemd and Kubernetes send); how it exited,
    /// and how long that took.
    fn stop_daemon(&mut self, name: &str, limit: Duration) -> (std::process::ExitStatus, Duration) {
        let i = self.daemons.iter().position(|(n, _)| n == name).unwrap();
        let (_, mut c) = self.daemons.remove(i);
        let t0 = Instant::now();
        let sent = std::process::Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status()
            .unwrap();
        assert!(sent.success());
        loop {
            if let Some(status) = c.try_wait().unwrap() {
                return (status, t0.elapsed());
            }
            if t0.elapsed() > limit {
                let _ = c.kill();
                let _ = c.wait();
                panic!(
                    "{name} did not stop within {limit:?} of SIGTERM\n{}",
                    self.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn kill_daemon(&mut self, name: &str) {
        let i = self.daemons.iter().position(|(n, _)| n == name).unwrap();
        let (_, mut c) = self.daemons.remove(i);
        c.kill().unwrap();
        c.wait().unwrap();
    }

    /// A signed copy of `trains/<rel>`, pushed; returns its path.
    fn push(&self, rel: &str) -> PathBuf {
        let copy = self.path(&format!("{}.train", rel.replace('/', "-")));
        std::fs::copy(bundle(rel), &copy).unwrap();
        ok(&[
            "train",
            "sign",
            s(&copy),
            "--key",
            s(&self.path("alice-sign.key")),
        ]);
        self.person_ok("alice", &["train", "push", s(&copy)]);
        copy
    }

    fn task(&self, bundle: &Path, stations: &[&str], params: &str) -> serde_json::Value {
        let p = self.path("params.json");
        std::fs::write(&p, params).unwrap();
        let mut args = vec![
            "task",
            "create",
            "--train",
            s(bundle),
            "--params",
            s(&p),
            "--json",
        ];
        for st in stations {
            args.extend(["--station", st]);
        }
        serde_json::from_str(&self.person_ok("alice", &args).stdout).unwrap()
    }

    fn show(&self, task: &str) -> serde_json::Value {
        serde_json::from_str(
            &self
                .person_ok("alice", &["task", "show", task, "--json"])
                .stdout,
        )
        .unwrap()
    }

    fn wait_finished(&self, task: &str, limit: Duration) -> serde_json::Value {
        let out = self.person(
            "alice",
            &[
                "task",
                "show",
                task,
                "--json",
                "--wait",
                &format!("{}s", limit.as_secs()),
            ],
        );
        assert!(
            out.ok,
            "task {task} did not finish:\n{}\n{}",
            out.text(),
            self.logs()
        );
        serde_json::from_str(&out.stdout).unwrap()
    }

    fn wait_state(&self, task: &str, station: &str, state: &str, limit: Duration) {
        let t0 = Instant::now();
        loop {
            let t = self.show(task);
            if run_of(&t, station)["state"] == state {
                return;
            }
            assert!(
                t0.elapsed() < limit,
                "{station} never reached {state}: {t}\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn logs(&self) -> String {
        let mut out = String::new();
        for e in std::fs::read_dir(self.tmp.path()).unwrap().flatten() {
            let p = e.path();
            if p.extension().is_some_and(|x| x == "log") {
                out += &format!(
                    "--- {}\n{}\n",
                    p.display(),
                    std::fs::read_to_string(&p).unwrap_or_default()
                );
            }
        }
        out
    }

    fn pending(&self, station: &str) -> Vec<serde_json::Value> {
        let out = ok(&[
            "station",
            "pending",
            "--dir",
            s(&self.station_dir(station)),
            "--json",
        ]);
        serde_json::from_str(&out.stdout).unwrap()
    }

    fn wait_pending(&self, station: &str) -> String {
        let t0 = Instant::now();
        loop {
            if let Some(p) = self.pending(station).first() {
                return p["item"]["run"].as_str().unwrap().to_string();
            }
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "nothing pending at {station}\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn run_of<'a>(task: &'a serde_json::Value, station: &str) -> &'a serde_json::Value {
    task["runs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["station"] == station)
        .unwrap()
}

fn released_file(station_dir: &Path, name: &str) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for run in std::fs::read_dir(station_dir.join("runs"))
        .unwrap()
        .flatten()
    {
        if let Ok(b) = std::fs::read(run.path().join("outputs").join(name)) {
            out.push(b);
        }
    }
    out
}

#[test]
fn three_stations_run_a_task_and_sealed_results_come_back() {
    let mut net = Net::new();
    for (name, profile, seed) in [
        ("st1", "academic", 1),
        ("st2", "community", 2),
        ("st3", "legacy", 3),
    ] {
        net.add_station(name, profile, seed);
    }
    let cohort = net.push("cohort-stats");
    let listed = net.person_ok("audrey", &["train", "list"]).stdout;
    assert!(
        listed.contains("cohort-stats@0.1.0")
            && listed.contains("(author)")
            && listed.contains("[cohort]"),
        "{listed}"
    );
    for st in ["st1", "st2"] {
        ok(&[
            "station",
            "approve",
            "--dir",
            s(&net.station_dir(st)),
            s(&cohort),
        ]);
    }
    for st in ["st1", "st2", "st3"] {
        net.start_daemon(st);
    }
    let task = net.task(&cohort, &["st1", "st2", "st3"], "{}");
    let id = task["id"].as_str().unwrap().to_string();
    // st3's data owner has not approved this train: the daemon holds it and says so.
    let held = net.wait_pending("st3");
    net.wait_state(&id, "st3", "delivered", Duration::from_secs(30));
    assert_eq!(
        run_of(&net.show(&id), "st3")["reason"],
        "awaiting the data owner's approval"
    );
    ok(&[
        "station",
        "approve",
        "--dir",
        s(&net.station_dir("st3")),
        &held,
    ]);
    let done = net.wait_finished(&id, Duration::from_secs(120));
    for st in ["st1", "st2", "st3"] {
        assert_eq!(run_of(&done, st)["state"], "done", "{done}");
    }
    // The researcher opens the results; they are exactly what each station released.
    let out = net.path("results");
    net.person_ok(
        "alice",
        &[
            "task",
            "results",
            &id,
            "--key",
            s(&net.path("alice.key")),
            "--out",
            s(&out),
        ],
    );
    let mut plaintexts = Vec::new();
    for st in ["st1", "st2", "st3"] {
        let got = std::fs::read(out.join(st).join("summary.json")).unwrap();
        let summary: serde_json::Value = serde_json::from_slice(&got).unwrap();
        assert_eq!(summary["train"], "cohort-stats");
        assert!(released_file(&net.station_dir(st), "summary.json").contains(&got));
        plaintexts.push(got);
    }
    // Another key cannot open them.
    ok(&["keygen", "--x25519", "--out", s(&net.path("mallory.key"))]);
    let stolen = net.person(
        "alice",
        &[
            "task",
            "results",
            &id,
            "--key",
            s(&net.path("mallory.key")),
            "--out",
            s(&net.path("stolen")),
        ],
    );
    assert!(
        !stolen.ok && stolen.text().contains("does not open"),
        "{}",
        stolen.text()
    );

    // A data owner refuses a train from the station side.
    let slow = net.push("testing/slow");
    let refused_task = net.task(&slow, &["st1"], r#"{"rounds": 1}"#);
    let rid = refused_task["id"].as_str().unwrap().to_string();
    let run = net.wait_pending("st1");
    ok(&[
        "station",
        "refuse",
        "--dir",
        s(&net.station_dir("st1")),
        &run,
        "--reason",
        "not during the audit",
    ]);
    let t = net.wait_finished(&rid, Duration::from_secs(60));
    assert_eq!(run_of(&t, "st1")["state"], "refused");
    assert_eq!(
        run_of(&t, "st1")["reason"],
        "refused by the data owner: not during the audit"
    );
    let events = ok(&[
        "audit",
        "show",
        "--dir",
        s(&net.station_dir("st1")),
        "--json",
    ])
    .stdout;
    assert!(events.contains("refused by the data owner: not during the audit"));

    // The auditor verifies every station's chain through the registry, pinned to the
    // station's key; the copy includes the owner's refusal.
    std::thread::sleep(Duration::from_secs(3));
    for st in ["st1", "st2", "st3"] {
        let key = net.station_dir(st).join("station.pub");
        let v = net.person_ok(
            "audrey",
            &[
                "audit",
                "verify",
                "--station",
                st,
                "--key",
                s(&key),
                "--json",
            ],
        );
        let report: serde_json::Value = serde_json::from_str(&v.stdout).unwrap();
        assert!(report["problem"].is_null(), "{report}");
        assert!(report["valid_entries"].as_u64().unwrap() >= 5);
    }
    // A researcher may not read station logs; the registry's own trail verifies.
    assert!(
        !net.person("alice", &["audit", "verify", "--station", "st1"])
            .ok
    );
    net.person_ok("audrey", &["registry", "audit"]);

    // Confidentiality: neither the registry's database nor its log holds a result's plaintext.
    for f in std::fs::read_dir(net.tmp.path()).unwrap().flatten() {
        let name = f.file_name().to_string_lossy().into_owned();
        if name.starts_with("registry") {
            let bytes = std::fs::read(f.path()).unwrap();
            for p in &plaintexts {
                assert!(
                    !bytes.windows(p.len()).any(|w| w == &p[..]),
                    "{name} holds a plaintext result"
                );
            }
            assert!(
                !bytes.windows(14).any(|w| w == b"\"requested\": ["),
                "{name} holds result text"
            );
        }
    }
}

#[test]
fn registry_restart_and_station_crash_lose_nothing() {
    let mut net = Net::new();
    for (name, seed) in [("st1", 1), ("st2", 2)] {
        net.add_station(name, "academic", seed);
    }
    let slow = net.push("testing/slow");
    for st in ["st1", "st2"] {
        ok(&[
            "station",
            "approve",
            "--dir",
            s(&net.station_dir(st)),
            s(&slow),
        ]);
        net.start_daemon(st);
    }
    let task = net.task(&slow, &["st1", "st2"], r#"{"rounds": 150}"#);
    let id = task["id"].as_str().unwrap().to_string();
    net.wait_state(&id, "st1", "running", Duration::from_secs(60));
    net.wait_state(&id, "st2", "running", Duration::from_secs(60));
    // Running at the station itself, not only announced.
    let t0 = Instant::now();
    while !ok(&[
        "audit",
        "show",
        "--dir",
        s(&net.station_dir("st1")),
        "--json",
    ])
    .stdout
    .contains("\"run-started\"")
    {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "st1 never started the run"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // st1 dies mid-run; then the registry dies while st2 is still computing.
    net.kill_daemon("st1");
    net.kill_registry();
    std::thread::sleep(Duration::from_secs(6));
    net.start_registry();
    // st2 finished while the registry was down; it reconnects and delivers.
    // st1 restarts: its run is reported failed, and not run again.
    net.start_daemon("st1");
    let t = net.wait_finished(&id, Duration::from_secs(120));
    assert_eq!(run_of(&t, "st2")["state"], "done", "{t}");
    assert_eq!(run_of(&t, "st1")["state"], "failed", "{t}");
    let reason = run_of(&t, "st1")["reason"].as_str().unwrap();
    assert!(reason.contains("stopped during the run"), "{reason}");
    // The station's own log says the run was interrupted, and only one run was started.
    let events = ok(&[
        "audit",
        "show",
        "--dir",
        s(&net.station_dir("st1")),
        "--json",
    ])
    .stdout;
    let events: Vec<serde_json::Value> = serde_json::from_str(&events).unwrap();
    let started = events
        .iter()
        .filter(|e| e["entry"]["event"] == "run-started")
        .count();
    assert_eq!(started, 1);
    assert!(
        events.iter().any(
            |e| e["entry"]["event"] == "run-finished" && e["entry"]["outcome"] == "interrupted"
        )
    );
    let out = net.path("results");
    net.person_ok(
        "alice",
        &[
            "task",
            "results",
            &id,
            "--key",
            s(&net.path("alice.key")),
            "--out",
            s(&out),
        ],
    );
    let r: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("st2/result.json")).unwrap()).unwrap();
    assert!(r["checksum"].is_u64());
    assert!(!out.join("st1").exists());
    // New work still flows to both after the restarts.
    let again = net.task(&slow, &["st1", "st2"], r#"{"rounds": 1}"#);
    let t = net.wait_finished(again["id"].as_str().unwrap(), Duration::from_secs(60));
    for st in ["st1", "st2"] {
        assert_eq!(run_of(&t, st)["state"], "done", "{t}");
    }
    for st in ["st1", "st2"] {
        ok(&["audit", "verify", "--dir", s(&net.station_dir(st))]);
    }
}

/// Waits until the station's own log shows a run started.
fn wait_run_started(net: &Net, station: &str) {
    let t0 = Instant::now();
    while !ok(&[
        "audit",
        "show",
        "--dir",
        s(&net.station_dir(station)),
        "--json",
    ])
    .stdout
    .contains("\"run-started\"")
    {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "{station} never started the run\n{}",
            net.logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// SIGTERM (a service manager's or container runtime's stop): the daemon takes no new work,
/// lets a run in flight finish within its grace or stops it (`interrupted`, audited, and
/// reported as such: never left `running`), and exits 0. Idle, it stops at once, long poll
/// or not.
#[test]
fn sigterm_stops_a_station_cleanly_finishing_or_interrupting_its_run() {
    let mut net = Net::new();
    for (name, seed) in [("st1", 1), ("st2", 2)] {
        net.add_station(name, "academic", seed);
    }
    let slow = net.push("testing/slow");
    for st in ["st1", "st2"] {
        ok(&[
            "station",
            "approve",
            "--dir",
            s(&net.station_dir(st)),
            s(&slow),
        ]);
    }
    // st1 gives a run one second; st2 waits for it.
    net.start_daemon_with("st1", &["--poll-wait", "2", "--stop-grace", "1"]);
    net.start_daemon_with("st2", &["--poll-wait", "2", "--stop-grace", "300"]);
    let task = net.task(&slow, &["st1", "st2"], r#"{"rounds": 150}"#);
    let id = task["id"].as_str().unwrap().to_string();
    wait_run_started(&net, "st1");
    wait_run_started(&net, "st2");
    let (status, took) = net.stop_daemon("st1", Duration::from_secs(30));
    assert!(status.success(), "st1 exited {status}\n{}", net.logs());
    assert!(took < Duration::from_secs(20), "st1 took {took:?}");
    let (status, _) = net.stop_daemon("st2", Duration::from_secs(300));
    assert!(status.success(), "st2 exited {status}\n{}", net.logs());
    // Both outcomes reached the registry before the daemons exited: nothing left running.
    let t = net.show(&id);
    assert_eq!(run_of(&t, "st2")["state"], "done", "{t}\n{}", net.logs());
    assert_eq!(run_of(&t, "st1")["state"], "failed", "{t}\n{}", net.logs());
    let reason = run_of(&t, "st1")["reason"].as_str().unwrap();
    assert!(
        reason.starts_with("interrupted: the station shut down during the run"),
        "{reason}"
    );
    let events: Vec<serde_json::Value> = serde_json::from_str(
        &ok(&[
            "audit",
            "show",
            "--dir",
            s(&net.station_dir("st1")),
            "--json",
        ])
        .stdout,
    )
    .unwrap();
    let finished: Vec<&serde_json::Value> = events
        .iter()
        .filter(|e| e["entry"]["event"] == "run-finished")
        .collect();
    assert_eq!(finished.len(), 1, "{finished:?}");
    assert_eq!(finished[0]["entry"]["outcome"], "interrupted");
    // The registry's copy of st1's log has the interruption too (uploaded before exiting).
    let remote = net.person("audrey", &["audit", "verify", "--station", "st1", "--json"]);
    assert!(remote.ok, "{}", remote.text());
    let local = ok(&[
        "audit",
        "verify",
        "--dir",
        s(&net.station_dir("st1")),
        "--json",
    ]);
    let field = |text: &str, name: &str| -> u64 {
        let v: serde_json::Value = serde_json::from_str(text).unwrap();
        v[name].as_u64().unwrap_or_else(|| panic!("{v}"))
    };
    // The registry holds the public chain: all of it, the interruption included.
    assert_eq!(
        field(&remote.stdout, "valid_entries"),
        field(&local.stdout, "public_entries"),
        "remote {} local {}",
        remote.stdout,
        local.stdout
    );
    for st in ["st1", "st2"] {
        ok(&["audit", "verify", "--dir", s(&net.station_dir(st))]);
    }
    // Idle, in the middle of a 20 s long poll: it stops at once.
    net.start_daemon_with("st1", &["--poll-wait", "20"]);
    std::thread::sleep(Duration::from_secs(3));
    let (status, took) = net.stop_daemon("st1", Duration::from_secs(10));
    assert!(status.success(), "{status}\n{}", net.logs());
    assert!(took < Duration::from_secs(3), "idle stop took {took:?}");
    // A restarted station takes new work (nothing stuck in its journal).
    net.start_daemon("st1");
    let again = net.task(&slow, &["st1"], r#"{"rounds": 1}"#);
    let t = net.wait_finished(again["id"].as_str().unwrap(), Duration::from_secs(60));
    assert_eq!(run_of(&t, "st1")["state"], "done", "{t}");
}

#[test]
fn nothing_a_run_influenced_reaches_the_registry() {
    let mut net = Net::new();
    let dir = imaging_station(&net, "st1", 1, 1);
    let hog = net.push("testing/host-hog");
    ok(&["station", "approve", "--dir", s(&dir), s(&hog)]);
    net.start_daemon("st1");
    let marker = "MARKER-7c1e-pseudonym-sex-F-age-63";
    // Text the train makes at run time (it decodes it from hex parameters: the parameters are
    // the researcher's and the registry holds them; the decoded text must not get there), in
    // every place a run can put it: a query's comment and literal, a "series" that comes back
    // in the error the train returns, a model name it asks for.
    let hex = |t: &str| t.bytes().map(|b| format!("{b:02x}")).collect::<String>();
    let cases = [
        serde_json::json!({"do": "select", "query_hex": hex(&format!("# {marker}\nSELECT ?s WHERE {{ ?s ?p \"{marker}\" }}"))}),
        serde_json::json!({"do": "load-series", "series_hex": hex(marker)}),
        serde_json::json!({"do": "open", "model_hex": hex(&format!("models/{marker}.onnx"))}),
    ];
    for params in &cases {
        let task = net.task(&hog, &["st1"], &params.to_string());
        let t = net.wait_finished(task["id"].as_str().unwrap(), Duration::from_secs(60));
        let run = run_of(&t, "st1");
        assert_eq!(run["state"], "failed", "{t}");
        let reason = run["reason"].as_str().unwrap();
        assert!(
            reason.starts_with("failed: "),
            "the researcher sees a class: {reason}"
        );
        assert!(!reason.contains(marker), "{reason}");
    }
    // The station keeps the text; its uploaded copy does not have it.
    let local = std::fs::read_to_string(dir.join("audit.log")).unwrap();
    assert!(local.contains(marker));
    let public = std::fs::read_to_string(dir.join("audit-public.log")).unwrap();
    assert!(!public.contains(marker));
    assert!(!public.contains("capability-call"));
    // Wait until the registry holds the whole public copy, then search everything it keeps.
    let t0 = Instant::now();
    loop {
        let out = net.person_ok("audrey", &["audit", "verify", "--station", "st1", "--json"]);
        let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
        if v["valid_entries"].as_u64() == Some(public.lines().count() as u64) {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the copy never caught up: {v}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    for e in std::fs::read_dir(net.tmp.path()).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if name.starts_with("registry.db") || name == "registry.log" {
            let bytes = std::fs::read(e.path()).unwrap_or_default();
            assert!(
                !bytes.windows(marker.len()).any(|w| w == marker.as_bytes()),
                "{name} holds the marker"
            );
        }
    }
    ok(&["audit", "verify", "--dir", s(&dir)]);
}

/// The station's runs whose outputs wait for the data owner (`station held --json`), waited
/// for (bounded).
fn wait_held(dir: &Path) -> String {
    let t0 = Instant::now();
    loop {
        let out = ok(&["station", "held", "--dir", s(dir), "--json"]);
        let v: Vec<serde_json::Value> = serde_json::from_str(&out.stdout).unwrap();
        if let Some(r) = v.first() {
            return r["run_id"].as_str().unwrap().to_string();
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "no run's outputs were held"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn held_outputs_leave_only_when_the_data_owner_releases_them() {
    let mut net = Net::new();
    net.add_station("st1", "academic", 1);
    let dir = net.station_dir("st1");
    edit_policy(&dir, "hold_for_release = false", "hold_for_release = true");
    let cohort = net.push("cohort-stats");
    ok(&["station", "approve", "--dir", s(&dir), s(&cohort)]);
    net.start_daemon("st1");

    // Released: the run waits (running at the registry, nothing sent) until the data owner
    // releases; then the researcher gets exactly the released bytes.
    let task = net.task(&cohort, &["st1"], "{}");
    let id = task["id"].as_str().unwrap().to_string();
    let local = wait_held(&dir);
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(run_of(&net.show(&id), "st1")["state"], "running");
    assert!(released_file(&dir, "summary.json").is_empty());
    let pending = ok(&["station", "pending", "--dir", s(&dir)]).stdout;
    assert!(pending.contains("held for your release"), "{pending}");
    ok(&["station", "release", "--dir", s(&dir), &local]);
    let done = net.wait_finished(&id, Duration::from_secs(60));
    assert_eq!(run_of(&done, "st1")["state"], "done", "{done}");
    let out = net.path("results");
    net.person_ok(
        "alice",
        &[
            "task",
            "results",
            &id,
            "--key",
            s(&net.path("alice.key")),
            "--out",
            s(&out),
        ],
    );
    let got = std::fs::read(out.join("st1").join("summary.json")).unwrap();
    assert_eq!(released_file(&dir, "summary.json"), vec![got]);

    // Withheld: the researcher learns only that; the owner's words stay at the station.
    let task = net.task(&cohort, &["st1"], "{}");
    let id = task["id"].as_str().unwrap().to_string();
    let local = wait_held(&dir);
    let marker = "OWNER-REASON-3f9a";
    ok(&[
        "station",
        "withhold",
        "--dir",
        s(&dir),
        &local,
        "--reason",
        marker,
    ]);
    let done = net.wait_finished(&id, Duration::from_secs(60));
    let run = run_of(&done, "st1");
    assert_eq!(run["state"], "failed", "{done}");
    assert!(
        run["reason"].as_str().unwrap().starts_with("withheld"),
        "{done}"
    );
    assert!(!dir.join("runs").join(&local).join("held").exists());
    assert!(
        std::fs::read_to_string(dir.join("audit.log"))
            .unwrap()
            .contains(marker)
    );
    let public = std::fs::read_to_string(dir.join("audit-public.log")).unwrap();
    assert!(public.contains("held-outputs-decided") && !public.contains(marker));
    for e in std::fs::read_dir(net.tmp.path()).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if name.starts_with("registry.db") {
            let bytes = std::fs::read(e.path()).unwrap_or_default();
            assert!(
                !bytes.windows(marker.len()).any(|w| w == marker.as_bytes()),
                "{name} holds the owner's reason"
            );
        }
    }
    ok(&["audit", "verify", "--dir", s(&dir)]);
}

/// Run SQL against the registry's database behind its back: the registry turned hostile.
fn tamper(net: &Net, sql: &'static str, binds: &[&str]) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let db = amicus_registry::db::Db::connect(&net.db()).await.unwrap();
        let mut q = sqlx::query(sql);
        for b in binds {
            q = q.bind(b.to_string());
        }
        let done = q.execute(&db.pool).await.unwrap();
        assert!(done.rows_affected() > 0, "{sql}: no row changed");
    });
}

/// One value from the registry's database, read behind its back.
fn peek(net: &Net, sql: &'static str, bind: &str) -> String {
    use sqlx::Row as _;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let db = amicus_registry::db::Db::connect(&net.db()).await.unwrap();
        let row = sqlx::query(sql)
            .bind(bind.to_string())
            .fetch_one(&db.pool)
            .await
            .unwrap();
        row.try_get::<String, _>(0).unwrap()
    })
}

/// A registry that changes what alice asked for (parameters, train, the key results are sealed
/// to), drops her signature or replays an old request: the station refuses the run before
/// anything runs and audits why. A registry that forges or renames results: `task results`
/// refuses what the station did not sign and names that would leave `--out`.
#[test]
fn a_registry_cannot_change_requests_or_forge_results() {
    let mut net = Net::new();
    net.add_station("st1", "academic", 1);
    let cohort = net.push("cohort-stats");
    let slow = net.push("testing/slow");
    ok(&[
        "station",
        "approve",
        "--dir",
        s(&net.station_dir("st1")),
        s(&cohort),
    ]);
    net.start_daemon("st1");
    let honest = net.task(&cohort, &["st1"], "{}")["id"]
        .as_str()
        .unwrap()
        .to_string();
    let t = net.wait_finished(&honest, Duration::from_secs(120));
    assert_eq!(run_of(&t, "st1")["state"], "done", "{t}");
    let pin = format!("st1={}", s(&net.station_dir("st1").join("station.pub")));
    let results = |net: &Net, out: &str, pin: &str| {
        net.person(
            "alice",
            &[
                "task",
                "results",
                &honest,
                "--key",
                s(&net.path("alice.key")),
                "--out",
                s(&net.path(out)),
                "--station-key",
                pin,
            ],
        )
    };
    let good = results(&net, "good", &pin);
    assert!(good.ok, "{}", good.text());
    assert!(net.path("good/st1/summary.json").is_file());

    // The daemon is stopped while the registry's database is edited under each new task.
    net.kill_daemon("st1");
    // A task whose run never reaches a station: the registry will show another's results as its.
    let other = net.task(&cohort, &["st1"], "{}")["id"]
        .as_str()
        .unwrap()
        .to_string();
    tamper(&net, "DELETE FROM runs WHERE task = $1", &[&other]);
    ok(&["keygen", "--x25519", "--out", s(&net.path("mallory.key"))]);
    let mallory = std::fs::read_to_string(net.path("mallory.pub")).unwrap();
    let slow_json: serde_json::Value =
        serde_json::from_str(&ok(&["train", "inspect", s(&slow), "--json"]).stdout).unwrap();
    let slow_digest = slow_json["digest"].as_str().unwrap().to_string();
    // The honest request, re-formatted: another envelope around the same signed payload.
    let statement = peek(&net, "SELECT statement FROM tasks WHERE id = $1", &honest);
    let reformatted = serde_json::to_string_pretty(
        &serde_json::from_str::<serde_json::Value>(&statement).unwrap(),
    )
    .unwrap();
    assert_ne!(reformatted, statement);
    let cases: Vec<(&str, &'static str, Vec<&str>)> = vec![
        (
            "the parameters: not what the researcher signed",
            "UPDATE tasks SET params = '{\"patient\":\"7\"}' WHERE id = $1",
            vec![],
        ),
        (
            "the key results are sealed to: not what the researcher signed",
            "UPDATE tasks SET recipient_key = $2 WHERE id = $1",
            vec![&mallory],
        ),
        (
            "the train: not what the researcher signed",
            "UPDATE tasks SET train = $2 WHERE id = $1",
            vec![&slow_digest],
        ),
        (
            "the request is not signed",
            "UPDATE tasks SET statement = NULL WHERE id = $1",
            vec![],
        ),
        (
            "a replay",
            "UPDATE tasks SET statement = (SELECT statement FROM tasks WHERE id = $2) WHERE id = $1",
            vec![&honest],
        ),
        (
            "a replay",
            "UPDATE tasks SET statement = $2 WHERE id = $1",
            vec![&reformatted],
        ),
    ];
    let mut tasks = Vec::new();
    for (reason, sql, extra) in &cases {
        let id = net.task(&cohort, &["st1"], "{}")["id"]
            .as_str()
            .unwrap()
            .to_string();
        let mut binds = vec![id.as_str()];
        binds.extend(extra.iter().copied());
        tamper(&net, sql, &binds);
        tasks.push((id, *reason));
    }
    net.start_daemon("st1");
    for (id, reason) in &tasks {
        let t = net.wait_finished(id, Duration::from_secs(120));
        let run = run_of(&t, "st1");
        assert_eq!(run["state"], "refused", "{reason}: {t}");
        let said = run["reason"].as_str().unwrap();
        assert!(
            said.starts_with("request: ") && said.contains(reason),
            "{reason}: {said}"
        );
    }
    // Each refusal is in the station's audit log, and nothing ran for them.
    let events = ok(&[
        "audit",
        "show",
        "--dir",
        s(&net.station_dir("st1")),
        "--json",
    ])
    .stdout;
    let events: Vec<serde_json::Value> = serde_json::from_str(&events).unwrap();
    let count = |kind: &str, stage: Option<&str>| {
        events
            .iter()
            .filter(|e| e["entry"]["event"] == kind)
            .filter(|e| stage.is_none_or(|st| e["entry"]["stage"] == st))
            .count()
    };
    assert_eq!(
        count("train-refused", Some("request")),
        cases.len(),
        "{events:?}"
    );
    assert_eq!(count("request-verified", None), 1, "{events:?}");
    assert_eq!(count("run-started", None), 1, "{events:?}");

    // Results: checked against a key that is not the station's, they are refused.
    ok(&["keygen", "--out", s(&net.path("mallory-sign.key"))]);
    let wrong = format!("st1={}", s(&net.path("mallory-sign.pub")));
    let out = results(&net, "wrong", &wrong);
    assert!(
        !out.ok
            && out
                .text()
                .contains("does not carry the station's signature"),
        "{}",
        out.text()
    );
    // The results of another task, shown as this one's: the station signed them for the task
    // they answer.
    tamper(
        &net,
        "UPDATE runs SET task = $2 WHERE task = $1",
        &[&honest, &other],
    );
    let out = net.person(
        "alice",
        &[
            "task",
            "results",
            &other,
            "--key",
            s(&net.path("alice.key")),
            "--out",
            s(&net.path("moved")),
            "--station-key",
            &pin,
        ],
    );
    assert!(
        !out.ok
            && out
                .text()
                .contains("does not carry the station's signature"),
        "{}",
        out.text()
    );
    tamper(
        &net,
        "UPDATE runs SET task = $2 WHERE task = $1",
        &[&other, &honest],
    );
    // A name that would leave --out is refused before anything is written.
    tamper(
        &net,
        "UPDATE results SET name = '../../escaped.json' WHERE name = 'summary.json'",
        &[],
    );
    let out = results(&net, "hostile/out", &pin);
    assert!(
        !out.ok && out.text().contains("not a plain name"),
        "{}",
        out.text()
    );
    assert!(!net.path("escaped.json").exists() && !net.path("hostile/escaped.json").exists());
    // Results without the station's signature (a registry sealing its own to alice's key,
    // which HPKE lets anyone do) are refused.
    tamper(
        &net,
        "UPDATE results SET name = 'summary.json', signature = NULL WHERE name = '../../escaped.json'",
        &[],
    );
    let out = results(&net, "unsigned", &pin);
    assert!(
        !out.ok && out.text().contains("not signed by the station"),
        "{}",
        out.text()
    );
    assert!(!net.path("unsigned/st1/summary.json").exists());

    // Tokens: alice rotates hers over the old file; the old token stops working at once.
    let old = std::fs::read_to_string(net.path("alice.token")).unwrap();
    std::fs::write(net.path("alice-old.token"), &old).unwrap();
    let out = net.person_ok(
        "alice",
        &[
            "registry",
            "token",
            "rotate",
            "--token-out",
            s(&net.path("alice.token")),
            "--expires-in",
            "1h",
        ],
    );
    assert!(
        out.stdout.contains("the old one no longer works"),
        "{}",
        out.text()
    );
    assert_ne!(
        std::fs::read_to_string(net.path("alice.token")).unwrap(),
        old
    );
    net.person_ok("alice", &["task", "list"]);
    let stale = net.person("alice-old", &["task", "list"]);
    assert!(
        !stale.ok && stale.text().contains("unknown token"),
        "{}",
        stale.text()
    );
    // An admin revokes it; only a rotation brings alice back.
    net.person_ok("root", &["registry", "token", "revoke", "--name", "alice"]);
    let revoked = net.person("alice", &["task", "list"]);
    assert!(
        !revoked.ok && revoked.text().contains("revoked"),
        "{}",
        revoked.text()
    );
    // Nobody else may touch her token.
    let audrey = net.person(
        "audrey",
        &["registry", "token", "revoke", "--name", "alice"],
    );
    assert!(
        !audrey.ok && audrey.text().contains("forbidden"),
        "{}",
        audrey.text()
    );
}

fn edit_policy(dir: &Path, from: &str, to: &str) {
    let path = dir.join("policy.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains(from), "policy has no {from:?}:\n{text}");
    std::fs::write(&path, text.replacen(from, to, 1)).unwrap();
}

fn metrics(dir: &Path, round: u32, station: &str) -> serde_json::Value {
    let p = dir
        .join(format!("round-{round:03}"))
        .join(station)
        .join("metrics.json");
    serde_json::from_slice(&std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display())))
        .unwrap()
}

/// Three stations st1–st3 (academic profile, one synthetic seed each) whose policies allow
/// fed-seg's capabilities, further edited by `policy(name, dir)`; fed-seg pushed and approved
/// everywhere, daemons running. Returns the bundle.
/// A station (as `add_station`) whose policy also allows imaging and kernels and cohorts of
/// `min_patients`; its directory.
fn imaging_station(net: &Net, name: &str, seed: u64, min_patients: u32) -> PathBuf {
    net.add_station(name, "academic", seed);
    let dir = net.station_dir(name);
    edit_policy(
        &dir,
        "allowed_capabilities = [\"cohort\"]",
        "allowed_capabilities = [\"cohort\", \"imaging\", \"kernels\"]",
    );
    edit_policy(
        &dir,
        "min_patients = 10",
        &format!("min_patients = {min_patients}"),
    );
    dir
}

fn fl_stations(net: &mut Net, seeds: [u64; 3], policy: impl Fn(&str, &Path)) -> PathBuf {
    for (name, seed) in ["st1", "st2", "st3"].into_iter().zip(seeds) {
        let dir = imaging_station(net, name, seed, 3);
        policy(name, &dir);
    }
    let fed = net.push("fed-seg");
    for st in ["st1", "st2", "st3"] {
        ok(&[
            "station",
            "approve",
            "--dir",
            s(&net.station_dir(st)),
            s(&fed),
        ]);
        net.start_daemon(st);
    }
    fed
}

/// alice's fed-seg job over `stations` with this plan and these train parameters (and any
/// `more` arguments); its id.
fn create_job(
    net: &Net,
    fed: &Path,
    stations: &[&str],
    plan: &str,
    params: &str,
    more: &[&str],
) -> Result<String, String> {
    let (plan_path, params_path) = (net.path("plan.json"), net.path("fl-params.json"));
    std::fs::write(&plan_path, plan).unwrap();
    std::fs::write(&params_path, params).unwrap();
    let mut args = vec!["job", "create", "--train", s(fed)];
    for st in stations {
        args.extend(["--station", st]);
    }
    args.extend([
        "--plan",
        s(&plan_path),
        "--params",
        s(&params_path),
        "--json",
    ]);
    args.extend(more);
    let out = net.person("alice", &args);
    if !out.ok {
        return Err(out.text());
    }
    let job: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    Ok(job["id"].as_str().unwrap().to_string())
}

/// A federated job across three station processes: the U-Net of `trains/fed-seg` learns
/// (Dice of the final global weights on each site's own test series), updates travel 8-bit,
/// stations add noise and count privacy, one station's budget runs out (its later rounds are
/// refused and audited, the rounds go on with the quorum), and the registry is killed and
/// restarted mid-job and resumes from its checkpoint.
#[test]
fn federated_job_learns_across_three_stations() {
    let mut net = Net::new();
    let sigma = 1e-4;
    // One noised release with σ costs this much; st3 may afford one, not two.
    let one = amicus_fl::rdp::Accountant::default()
        .epsilon_after(1.0, sigma, 1, 1e-5)
        .unwrap();
    let fed = fl_stations(&mut net, [11, 12, 13], |name, dir| {
        let budget = if name == "st3" { 1.5 * one } else { 1e15 };
        edit_policy(
            dir,
            "default_epsilon = 10.0",
            &format!("default_epsilon = {budget:e}"),
        );
    });
    let id = create_job(
        &net,
        &fed,
        &["st1", "st2", "st3"],
        r#"{"rounds": 3, "min_stations": 2, "round_seconds": 120, "encoding": "q8",
            "dp": {"clip_norm": 20.0, "noise_multiplier": 0.0001}, "evaluate_final": true}"#,
        r#"{"local_steps": 12, "batch": 8, "test_series": 1}"#,
        &[],
    )
    .unwrap();
    let show = |net: &Net| -> serde_json::Value {
        serde_json::from_str(
            &net.person_ok("alice", &["job", "show", &id, "--json"])
                .stdout,
        )
        .unwrap()
    };
    // Kill the registry once round 1 is aggregated; it resumes from the checkpoint.
    let t0 = Instant::now();
    while show(&net)["round"].as_u64().unwrap() < 2 {
        assert!(
            t0.elapsed() < Duration::from_secs(300),
            "round 1 never ended\n{}",
            net.logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    net.kill_registry();
    std::thread::sleep(Duration::from_secs(3));
    net.start_registry();
    let out = net.person("alice", &["job", "show", &id, "--json", "--wait", "900s"]);
    assert!(
        out.ok,
        "job did not finish:\n{}\n{}",
        out.text(),
        net.logs()
    );
    let job: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(job["state"], "done", "{job}\n{}", net.logs());
    let rounds = job["rounds"].as_array().unwrap();
    assert_eq!(
        rounds.len(),
        4,
        "three training rounds and the evaluation round"
    );
    for (i, r) in rounds.iter().take(3).enumerate() {
        let summary = &r["summary"];
        let used: Vec<&str> = summary["stations"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|x| x["status"] == "used")
            .map(|x| x["station"].as_str().unwrap())
            .collect();
        // st3 spent its budget in round 1: refused from then on.
        let expected: &[&str] = if i == 0 {
            &["st1", "st2", "st3"]
        } else {
            &["st1", "st2"]
        };
        assert_eq!(used, expected, "round {}: {summary}", i + 1);
        for x in summary["stations"].as_array().unwrap() {
            if x["status"] == "used" {
                // 8-bit updates: about a quarter of fp32.
                let values = 29_321.0;
                let bytes = x["bytes"].as_f64().unwrap();
                assert!(bytes < 0.27 * 4.0 * values, "{bytes} bytes");
            }
        }
    }
    let st3_round2 = rounds[1]["runs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["station"] == "st3")
        .unwrap();
    assert_eq!(st3_round2["state"], "refused", "{st3_round2}");
    assert!(
        st3_round2["reason"]
            .as_str()
            .unwrap()
            .contains("privacy budget exhausted")
    );
    let st3_events: Vec<serde_json::Value> = serde_json::from_str(
        &ok(&[
            "audit",
            "show",
            "--dir",
            s(&net.station_dir("st3")),
            "--json",
        ])
        .stdout,
    )
    .unwrap();
    let event = |kind: &str| {
        st3_events
            .iter()
            .filter(|e| e["entry"]["event"] == kind)
            .map(|e| e["entry"].clone())
            .collect::<Vec<_>>()
    };
    assert!(
        event("train-refused")
            .iter()
            .any(|e| e["stage"] == "privacy"),
        "{st3_events:?}"
    );
    assert_eq!(
        event("update-submitted").len(),
        1,
        "st3 released exactly one update"
    );
    let ledger: serde_json::Value = serde_json::from_slice(
        &std::fs::read(
            std::fs::read_dir(net.station_dir("st3").join("privacy"))
                .unwrap()
                .map(|e| e.unwrap().path())
                .find(|p| p.extension().is_some_and(|x| x == "json"))
                .expect("a ledger"),
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(ledger["releases"], 1);

    // The model learned: the final global weights (evaluation round) against the initial ones
    // (round 1 measures the weights it starts from), on each site's own test series.
    let report = net.path("report");
    net.person_ok(
        "alice",
        &[
            "job",
            "report",
            &id,
            "--key",
            s(&net.path("alice.key")),
            "--out",
            s(&report),
        ],
    );
    let html = std::fs::read_to_string(report.join("report.html")).unwrap();
    assert!(html.contains("<svg") && html.contains("st3"));
    let mut finals = Vec::new();
    for st in ["st1", "st2", "st3"] {
        let before = metrics(&report, 1, st)["test_dice_global"]
            .as_f64()
            .unwrap();
        let after = metrics(&report, 4, st)["test_dice_global"]
            .as_f64()
            .unwrap();
        eprintln!("{st}: test Dice {before:.3} → {after:.3}");
        finals.push(after);
        assert!(after > before, "{st}: {before} → {after}");
    }
    let mean = finals.iter().sum::<f64>() / finals.len() as f64;
    assert!(mean > 0.3, "final global Dice {mean}");
    let weights = net.path("final.weights");
    net.person_ok("alice", &["job", "weights", &id, "--out", s(&weights)]);
    let w = amicus_fl::wire::Weights::decode(&std::fs::read(&weights).unwrap()).unwrap();
    assert_eq!(w.len(), 29_321);
    for st in ["st1", "st2", "st3"] {
        let key = net.station_dir(st).join("station.pub");
        net.person_ok(
            "audrey",
            &["audit", "verify", "--station", st, "--key", s(&key)],
        );
    }
    let trail = net.person_ok("audrey", &["registry", "audit"]).stdout;
    assert!(trail.contains("job-round"), "{trail}");
}

/// A station process killed in the middle of a federated round: its run never reports, the
/// round ends at its deadline on the other two (the quorum), the dead station is recorded as
/// missing, and the job still runs every round.
#[test]
fn a_station_killed_mid_round_is_missing_and_the_job_completes_on_the_quorum() {
    let mut net = Net::new();
    // Enough local work that the round is still running when st3 is killed.
    let fed = fl_stations(&mut net, [21, 22, 23], |_, _| {});
    let id = create_job(
        &net,
        &fed,
        &["st1", "st2", "st3"],
        r#"{"rounds": 2, "min_stations": 2, "round_seconds": 45}"#,
        r#"{"local_steps": 40, "batch": 8, "test_series": 1}"#,
        &[],
    )
    .unwrap();
    // Kill st3's daemon while its round-1 run is running.
    let t0 = Instant::now();
    loop {
        let job: serde_json::Value = serde_json::from_str(
            &net.person_ok("alice", &["job", "show", &id, "--json"])
                .stdout,
        )
        .unwrap();
        let running = job["rounds"][0]["runs"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|r| r["station"] == "st3" && r["state"] == "running");
        if running {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "st3 never started round 1: {job}\n{}",
            net.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    net.kill_daemon("st3");
    let out = net.person("alice", &["job", "show", &id, "--json", "--wait", "600s"]);
    assert!(
        out.ok,
        "job did not finish:\n{}\n{}",
        out.text(),
        net.logs()
    );
    let job: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(job["state"], "done", "{job}\n{}", net.logs());
    let rounds = job["rounds"].as_array().unwrap();
    assert_eq!(rounds.len(), 2, "every round ran: {job}");
    for (i, r) in rounds.iter().enumerate() {
        let status = |st: &str| {
            r["summary"]["stations"]
                .as_array()
                .unwrap()
                .iter()
                .find(|x| x["station"] == st)
                .map(|x| x["status"].as_str().unwrap().to_string())
        };
        assert_eq!(
            status("st1").as_deref(),
            Some("used"),
            "round {}: {r}",
            i + 1
        );
        assert_eq!(
            status("st2").as_deref(),
            Some("used"),
            "round {}: {r}",
            i + 1
        );
        assert_eq!(
            status("st3").as_deref(),
            Some("missing"),
            "round {}: {r}",
            i + 1
        );
    }
    // A checkpoint per round: the final weights are round 2's.
    let weights = net.path("final.weights");
    net.person_ok("alice", &["job", "weights", &id, "--out", s(&weights)]);
    let last = amicus_fl::wire::Weights::decode(&std::fs::read(&weights).unwrap()).unwrap();
    assert_eq!(last.len(), 29_321);
    // A new job goes on from there (as after a job that failed): its round-0 checkpoint is
    // exactly these weights. Weights of another shape are refused before anything is created.
    let plan = r#"{"rounds": 1, "min_stations": 2, "round_seconds": 120}"#;
    let params = r#"{"local_steps": 4, "batch": 8, "test_series": 1}"#;
    let wrong = net.path("wrong.weights");
    let mut other = last.clone();
    other.tensors.pop();
    std::fs::write(&wrong, other.encode()).unwrap();
    let refused = create_job(
        &net,
        &fed,
        &["st1", "st2"],
        plan,
        params,
        &["--initial-weights", s(&wrong)],
    );
    assert!(
        refused
            .unwrap_err()
            .contains("does not hold the model's weights")
    );
    let next = create_job(
        &net,
        &fed,
        &["st1", "st2"],
        plan,
        params,
        &["--initial-weights", s(&weights)],
    )
    .unwrap();
    let start = net.path("next-start.weights");
    net.person_ok(
        "alice",
        &["job", "weights", &next, "--round", "0", "--out", s(&start)],
    );
    assert_eq!(
        amicus_fl::wire::Weights::decode(&std::fs::read(&start).unwrap()).unwrap(),
        last
    );
    let out = net.person("alice", &["job", "show", &next, "--json", "--wait", "300s"]);
    assert!(out.ok, "{}\n{}", out.text(), net.logs());
    // The killed station's audit log is intact up to where it stopped.
    ok(&["audit", "verify", "--dir", s(&net.station_dir("st3"))]);
}

/// Round `round`'s global update (checkpoint `round` − checkpoint `round − 1`).
fn round_step(net: &Net, job: &str, round: u32) -> Vec<f32> {
    let at = |r: u32| {
        let p = net.path(&format!("{job}-{r}.weights"));
        net.person_ok(
            "alice",
            &[
                "job",
                "weights",
                job,
                "--round",
                &r.to_string(),
                "--out",
                s(&p),
            ],
        );
        amicus_fl::wire::Weights::decode(&std::fs::read(&p).unwrap())
            .unwrap()
            .flat()
    };
    let (before, after) = (at(round - 1), at(round));
    after.iter().zip(&before).map(|(a, b)| a - b).collect()
}

/// Secure aggregation with three station processes training fed-seg: st3's daemon is
/// killed mid-training after it shared its secrets, so its pairwise masks are in the others'
/// updates and must be removed with their shares. The registry's aggregate equals the plain
/// FedAvg of the updates the stations kept, the registry database and every log hold none
/// of those updates, the next round goes on without st3 (its keys never come), and a job
/// whose threshold the survivors cannot meet fails with nothing unmasked.
#[test]
fn secure_aggregation_sums_masked_updates_and_survives_a_station_killed_after_sharing() {
    let mut net = Net::new();
    let fed = fl_stations(&mut net, [31, 32, 33], |_, _| {});
    let plan = |threshold: u32, rounds: u32| {
        format!(
            r#"{{"rounds": {rounds}, "min_stations": 2, "round_seconds": 60,
                "secure_aggregation": {{"threshold": {threshold}, "exchange_seconds": 10}}}}"#
        )
    };
    let params = r#"{"local_steps": 30, "batch": 8, "test_series": 1}"#;
    let stations = ["st1", "st2", "st3"];
    let shared_count = |net: &Net| {
        std::fs::read_to_string(net.path("st3.log"))
            .unwrap_or_default()
            .matches("keys and shares exchanged")
            .count()
    };
    let kill_st3_after_sharing = |net: &mut Net, before: usize| {
        let t0 = Instant::now();
        while shared_count(net) == before {
            assert!(
                t0.elapsed() < Duration::from_secs(120),
                "st3 never shared\n{}",
                net.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        net.kill_daemon("st3");
    };

    let id = create_job(&net, &fed, &stations, &plan(2, 2), params, &[]).unwrap();
    kill_st3_after_sharing(&mut net, 0);
    let out = net.person("alice", &["job", "show", &id, "--json", "--wait", "600s"]);
    assert!(out.ok, "{}\n{}", out.text(), net.logs());
    let job: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(job["state"], "done", "{job}\n{}", net.logs());
    let part = |round: usize, st: &str| {
        job["rounds"][round]["summary"]["stations"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["station"] == st)
            .cloned()
            .unwrap()
    };
    for round in [0, 1] {
        for st in ["st1", "st2"] {
            assert_eq!(part(round, st)["status"], "used", "{job}");
            assert!(part(round, st)["norm"].is_null(), "no individual norm");
        }
        assert_eq!(part(round, "st3")["status"], "missing", "{job}");
    }
    assert!(
        part(0, "st3")["reason"]
            .as_str()
            .unwrap()
            .contains("dropped after sharing"),
        "{job}"
    );
    assert!(
        part(1, "st3")["reason"]
            .as_str()
            .unwrap()
            .contains("no round keys"),
        "{job}"
    );

    // Each round's global step is the samples-weighted mean of one plain update each of
    // st1 and st2, as the stations kept them.
    let updates = |st: &str| -> Vec<amicus_fl::wire::Update> {
        released_file(&net.station_dir(st), "update")
            .iter()
            .map(|b| amicus_fl::wire::Update::decode(b).unwrap().0)
            .collect()
    };
    let (u1, u2) = (updates("st1"), updates("st2"));
    assert_eq!((u1.len(), u2.len()), (2, 2));
    for round in [1, 2] {
        let step = round_step(&net, &id, round);
        let matches = u1.iter().any(|a| {
            u2.iter().any(|b| {
                let n = (a.samples + b.samples) as f32;
                step.iter().enumerate().all(|(k, g)| {
                    let want = (a.delta[k] * a.samples as f32 + b.delta[k] * b.samples as f32) / n;
                    (g - want).abs() <= 1e-5 + 1e-4 * want.abs()
                })
            })
        });
        assert!(
            matches,
            "round {round}: the aggregate is not the plain FedAvg"
        );
    }
    // No plain update, nor any slice of one, in the registry's database or any log.
    let mut stored = Vec::new();
    for e in std::fs::read_dir(net.tmp.path()).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if name.starts_with("registry.db") || name.ends_with(".log") {
            stored.extend(std::fs::read(e.path()).unwrap());
        }
    }
    for st in ["st1", "st2"] {
        for plain in released_file(&net.station_dir(st), "update") {
            // Slices that say something (zero runs of untouched parameters are everywhere).
            let telling: Vec<&[u8]> = plain[64..]
                .chunks(48)
                .step_by(97)
                .filter(|c| {
                    c.len() == 48 && c.iter().collect::<std::collections::BTreeSet<_>>().len() > 32
                })
                .take(12)
                .collect();
            assert!(telling.len() >= 8, "{st}: the update is mostly constant");
            for slice in telling {
                let at = stored.windows(48).position(|w| w == slice);
                assert!(at.is_none(), "{st}: plain update bytes {slice:?} stored");
                let b64 = B64.encode(slice);
                assert!(!stored.windows(40).any(|w| w == &b64.as_bytes()[..40]));
            }
        }
    }

    // Each station's own log says what left masked and what it revealed.
    let logs: Vec<PathBuf> = ["st1", "st2"]
        .iter()
        .map(|st| net.station_dir(st).join("audit.log"))
        .collect();
    let events = |st: &str, kind: &str| {
        std::fs::read_to_string(&logs[if st == "st1" { 0 } else { 1 }])
            .unwrap()
            .matches(&format!("\"event\":\"{kind}\""))
            .count()
    };
    for st in ["st1", "st2"] {
        assert_eq!(events(st, "update-masked"), 2, "{st}");
        assert_eq!(events(st, "shares-revealed"), 2, "{st}");
    }

    // Threshold 3 of 3 and st3 dies again after sharing: two masked updates arrive, fewer
    // than the threshold, so the job fails and nothing is revealed.
    net.start_daemon("st3");
    let before = shared_count(&net);
    let id = create_job(&net, &fed, &stations, &plan(3, 1), params, &[]).unwrap();
    kill_st3_after_sharing(&mut net, before);
    let out = net.person("alice", &["job", "show", &id, "--json", "--wait", "300s"]);
    let job: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(job["state"], "failed", "{job}\n{}", net.logs());
    assert!(
        job["reason"]
            .as_str()
            .unwrap()
            .contains("masked updates from 2 station(s), the threshold is 3; nothing was unmasked"),
        "{job}"
    );
    let none = net.path("none.weights");
    let fetched = net.person(
        "alice",
        &["job", "weights", &id, "--round", "1", "--out", s(&none)],
    );
    assert!(!fetched.ok, "no checkpoint after a failed masked round");
    for st in ["st1", "st2"] {
        assert_eq!(events(st, "update-masked"), 3, "{st}");
        assert_eq!(
            events(st, "shares-revealed"),
            2,
            "{st}: revealed nothing this time"
        );
    }
    for st in ["st1", "st2", "st3"] {
        ok(&["audit", "verify", "--dir", s(&net.station_dir(st))]);
    }
}

#[test]
fn over_tls_through_the_hospitals_proxy_with_a_pinned_ca() {
    let mut net = Net::with_tls();
    let ca = net.tls.as_ref().unwrap().ca_pem.clone();
    let url = net.url();
    assert!(url.starts_with("https://"));
    net.add_station("st1", "academic", 1);
    let dir = net.station_dir("st1");
    let proxy = amicus_testkit::proxy::Proxy::start();
    // Hospital IT sets the registry, its CA and the proxy once, in the station's directory.
    std::fs::copy(&ca, dir.join("registry-ca.pem")).unwrap();
    std::fs::write(
        dir.join("network.toml"),
        format!(
            "registry = \"{url}\"\nca_file = \"registry-ca.pem\"\nproxy = \"{}\"\n",
            proxy.url()
        ),
    )
    .unwrap();
    let cohort = net.push("cohort-stats");
    ok(&["station", "approve", "--dir", s(&dir), s(&cohort)]);
    net.start_daemon("st1");
    let task = net.task(&cohort, &["st1"], "{}");
    let done = net.wait_finished(task["id"].as_str().unwrap(), Duration::from_secs(90));
    assert_eq!(run_of(&done, "st1")["state"], "done", "{done}");
    // The station went through the proxy, tunnelling TLS to the registry.
    let port = url.rsplit(':').next().unwrap().to_string();
    let seen = proxy.seen();
    assert!(
        seen.iter()
            .any(|l| l.starts_with(&format!("CONNECT 127.0.0.1:{port}"))),
        "{seen:?}"
    );
    // People through the proxy by the usual variable, too.
    let token = net.path("alice.token");
    let before = proxy.seen().len();
    let out = amicus_env(
        &[
            "task",
            "list",
            "--registry",
            &url,
            "--token-file",
            s(&token),
            "--ca-file",
            s(&ca),
        ],
        &[("HTTPS_PROXY", &proxy.url())],
    );
    assert!(out.ok, "{}", out.text());
    assert!(proxy.seen().len() > before);

    // A certificate from a CA the client does not pin is refused, and so is a registry the
    // public roots do not vouch for.
    let other = amicus_testkit::TestCa::new(&net.path("other"), "other");
    for extra in [vec!["--ca-file", s(&other.ca_pem)], vec![]] {
        let mut args = vec![
            "task",
            "list",
            "--registry",
            &url,
            "--token-file",
            s(&token),
        ];
        args.extend(extra);
        let out = amicus(&args);
        assert!(!out.ok);
        assert!(
            out.text().contains("cannot reach the registry"),
            "{}",
            out.text()
        );
    }
    // A CA file that holds no certificate is an error of its own, not a silent fallback.
    std::fs::write(net.path("empty.pem"), "not a certificate\n").unwrap();
    let out = amicus(&[
        "task",
        "list",
        "--registry",
        &url,
        "--token-file",
        s(&token),
        "--ca-file",
        s(&net.path("empty.pem")),
    ]);
    assert!(!out.ok);
    assert!(out.text().contains("no CA certificate"), "{}", out.text());
    // Plain HTTP to the TLS port gets nowhere.
    let plain = url.replace("https://", "http://");
    let out = amicus(&[
        "task",
        "list",
        "--registry",
        &plain,
        "--token-file",
        s(&token),
    ]);
    assert!(!out.ok);
}

/// Whether the station keeps any retired secret key (the daemon deletes them once the
/// registry has the rotation).
fn retired_secrets(dir: &Path) -> usize {
    std::fs::read_dir(dir.join("retired"))
        .map(|d| {
            d.flatten()
                .filter(|e| e.path().extension().is_some_and(|x| x == "key"))
                .count()
        })
        .unwrap_or(0)
}

#[test]
fn a_station_rotates_its_key_and_the_registry_researchers_and_auditors_follow() {
    let mut net = Net::new();
    net.add_station("st1", "academic", 1);
    let dir = net.station_dir("st1");
    let old_pub = net.path("st1-old.pub");
    std::fs::copy(dir.join("station.pub"), &old_pub).unwrap();
    // Before the daemon has uploaded anything, the registry's copy proves nothing: refused.
    let empty = net.person("audrey", &["audit", "verify", "--station", "st1"]);
    assert!(
        !empty.ok && empty.text().contains("holds none"),
        "{}",
        empty.text()
    );
    let cohort = net.push("cohort-stats");
    ok(&["station", "approve", "--dir", s(&dir), s(&cohort)]);
    net.start_daemon("st1");
    let first = net.task(&cohort, &["st1"], "{}")["id"]
        .as_str()
        .unwrap()
        .to_string();
    net.wait_finished(&first, Duration::from_secs(120));

    // The data owner rotates the key while the daemon runs.
    let out = ok(&["station", "rekey", "--dir", s(&dir)]);
    assert!(out.stdout.contains("handed over to key"), "{}", out.text());
    let new_pub = net.path("st1-new.pub");
    std::fs::copy(dir.join("station.pub"), &new_pub).unwrap();
    assert_ne!(
        std::fs::read(&old_pub).unwrap(),
        std::fs::read(&new_pub).unwrap()
    );
    assert_eq!(retired_secrets(&dir), 1);
    // The daemon hands the registry the rotation with the old key, then deletes that key.
    let t0 = Instant::now();
    while retired_secrets(&dir) > 0 {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "the daemon never handed over the rotation\n{}",
            net.logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let listed = net
        .person_ok("root", &["registry", "station", "list"])
        .stdout;
    assert!(listed.contains("1 retired key"), "{listed}");
    // Work goes on under the new key.
    let second = net.task(&cohort, &["st1"], "{}")["id"]
        .as_str()
        .unwrap()
        .to_string();
    let done = net.wait_finished(&second, Duration::from_secs(120));
    assert_eq!(run_of(&done, "st1")["state"], "done", "{done}");

    // Results made before and after the rotation verify against the keys the registry lists.
    let results = |task: &str, out: &str, pins: &[&Path]| {
        let key = net.path("alice.key");
        let out = net.path(out);
        let pins: Vec<String> = pins
            .iter()
            .map(|p| format!("st1={}", p.display()))
            .collect();
        let mut args = vec!["task", "results", task, "--key", s(&key), "--out", s(&out)];
        for p in &pins {
            args.extend(["--station-key", p.as_str()]);
        }
        net.person("alice", &args)
    };
    for (i, task) in [&first, &second].into_iter().enumerate() {
        let r = results(task, &format!("unpinned-{i}"), &[]);
        assert!(r.ok, "{}", r.text());
    }
    // Pinned to the old key only, the new result is refused; pinned to both, taken.
    let r = results(&first, "old-pin-first", &[&old_pub]);
    assert!(r.ok, "{}", r.text());
    let r = results(&second, "old-pin-second", &[&old_pub]);
    assert!(!r.ok && r.text().contains("rotated to"), "{}", r.text());
    let r = results(&second, "both-pins", &[&old_pub, &new_pub]);
    assert!(r.ok, "{}", r.text());

    // The auditor verifies the station's copy pinned to either key: one chain, two keys.
    let t0 = Instant::now();
    for key in [&old_pub, &new_pub] {
        loop {
            let v = net.person(
                "audrey",
                &[
                    "audit",
                    "verify",
                    "--station",
                    "st1",
                    "--key",
                    s(key),
                    "--json",
                ],
            );
            let report: serde_json::Value = serde_json::from_str(&v.stdout).unwrap_or_default();
            if v.ok && report["keys"].as_array().is_some_and(|k| k.len() == 2) {
                break;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "{}\n{}",
                v.text(),
                net.logs()
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }
    // And the data owner's own log, pinned to the old key; a stranger's key is refused.
    let local = ok(&["audit", "verify", "--dir", s(&dir), "--key", s(&old_pub)]);
    assert!(local.stdout.contains("signed by key"), "{}", local.text());
    ok(&["keygen", "--out", s(&net.path("stranger.key"))]);
    let stranger = amicus(&[
        "audit",
        "verify",
        "--dir",
        s(&dir),
        "--key",
        s(&net.path("stranger.pub")),
    ]);
    assert!(!stranger.ok, "{}", stranger.text());
}

/// A registry that hands the stations other starting weights than those the researcher
/// signed for (here: one value changed in the job's stored checkpoint 0): the station
/// refuses round 1 before training and audits why.
#[test]
fn a_registry_cannot_substitute_the_weights_a_job_starts_from() {
    let mut net = Net::new();
    let dir = imaging_station(&net, "st1", 21, 3);
    let fed = net.push("fed-seg");
    ok(&["station", "approve", "--dir", s(&dir), s(&fed)]);
    let id = create_job(
        &net,
        &fed,
        &["st1"],
        r#"{"rounds": 1, "min_stations": 1, "round_seconds": 120}"#,
        "{}",
        &[],
    )
    .unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        use sqlx::Row as _;
        let db = amicus_registry::db::Db::connect(&net.db()).await.unwrap();
        let row = sqlx::query("SELECT weights FROM checkpoints WHERE job = $1 AND round = 0")
            .bind(&id)
            .fetch_one(&db.pool)
            .await
            .unwrap();
        let bytes: Vec<u8> = row.try_get(0).unwrap();
        let mut w = amicus_fl::wire::Weights::decode(&bytes).unwrap();
        w.tensors[0].data[0] += 0.5;
        let done = sqlx::query("UPDATE checkpoints SET weights = $1 WHERE job = $2 AND round = 0")
            .bind(w.encode())
            .bind(&id)
            .execute(&db.pool)
            .await
            .unwrap();
        assert_eq!(done.rows_affected(), 1);
    });
    net.start_daemon("st1");
    let t0 = Instant::now();
    loop {
        let events = ok(&["audit", "show", "--dir", s(&dir), "--json"]).stdout;
        if events.contains("are not those the researcher signed for") {
            assert!(!events.contains("\"run-started\""), "nothing ran: {events}");
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(90),
            "the station took the substituted weights\n{}",
            net.logs()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    let job: serde_json::Value = serde_json::from_str(
        &net.person_ok("alice", &["job", "show", &id, "--json"])
            .stdout,
    )
    .unwrap();
    let run = &job["rounds"][0]["runs"][0];
    assert_eq!(run["state"], "refused", "{job}");
}

/// A throwaway PostgreSQL server (scripts/postgres.sh), stopped when dropped.
struct Postgres {
    dir: tempfile::TempDir,
    url: String,
}

impl Postgres {
    fn start() -> Postgres {
        let dir = tempfile::tempdir().unwrap();
        // PostgreSQL runs as its own user: it must reach its directory.
        let _ = std::process::Command::new("chmod")
            .args(["755", s(dir.path())])
            .status();
        let out = std::process::Command::new("bash")
            .arg(repo_root().join("scripts/postgres.sh"))
            .args([
                "start",
                s(&dir.path().join("data")),
                &free_port().to_string(),
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "PostgreSQL (scripts/setup.sh --test installs it): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let url = String::from_utf8_lossy(&out.stdout).trim().to_string();
        Postgres { dir, url }
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = std::process::Command::new("bash")
            .arg(repo_root().join("scripts/postgres.sh"))
            .args(["stop", s(&self.dir.path().join("data"))])
            .output();
    }
}

/// Three registry processes on one PostgreSQL behind a load balancer; stations and people
/// reach whichever replica the balancer picks, and one replica is killed mid-job. Every round
/// ends exactly once, no run is delivered (or started) twice, the trail's hash chain stays
/// whole with three writers, and the job completes.
#[test]
fn three_registry_replicas_on_one_postgres_survive_losing_one_mid_job() {
    let pg = Postgres::start();
    let mut net = Net::on_database(&pg.url);
    let (p2, p3) = (net.start_replica(), net.start_replica());
    let backends: Vec<std::net::SocketAddr> = [net.port, p2, p3]
        .iter()
        .map(|p| format!("127.0.0.1:{p}").parse().unwrap())
        .collect();
    let balancer = amicus_testkit::balancer::Balancer::start(backends);
    net.via = Some(balancer.url());
    let fed = fl_stations(&mut net, [31, 32, 33], |_, _| {});
    let id = create_job(
        &net,
        &fed,
        &["st1", "st2", "st3"],
        r#"{"rounds": 3, "min_stations": 2, "round_seconds": 300}"#,
        r#"{"local_steps": 3, "batch": 4, "test_series": 1}"#,
        &[],
    )
    .unwrap();
    let round = |net: &Net| -> u64 {
        let out = net.person("alice", &["job", "show", &id, "--json"]);
        if !out.ok {
            return 0; // the balancer's pick was the replica just killed: ask again
        }
        let j: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
        j["round"].as_u64().unwrap_or(0)
    };
    let t0 = Instant::now();
    while round(&net) < 2 {
        assert!(
            t0.elapsed() < Duration::from_secs(300),
            "round 1 never ended\n{}",
            net.logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // One replica dies (SIGKILL: no clean shutdown) with round 2 under way.
    net.kill_registry();
    let out = net.person("alice", &["job", "show", &id, "--json", "--wait", "900s"]);
    assert!(
        out.ok,
        "job did not finish:\n{}\n{}",
        out.text(),
        net.logs()
    );
    let job: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(job["state"], "done", "{job}\n{}", net.logs());
    assert_eq!(job["rounds"].as_array().unwrap().len(), 3, "{job}");
    let served = balancer.served();
    assert!(
        served.iter().all(|&n| n > 0),
        "every replica served: {served:?}"
    );

    // The trail, from the replicas still running: whole, one end per round, one delivery
    // per run.
    let out = net.person_ok("audrey", &["registry", "audit", "--json"]);
    let trail: Vec<serde_json::Value> = serde_json::from_str(&out.stdout).unwrap();
    let mut ends: Vec<u64> = trail
        .iter()
        .filter(|e| e["action"] == "job-round" && e["target"] == id.as_str())
        .map(|e| {
            let outcome = e["outcome"].as_str().unwrap();
            outcome
                .strip_prefix("ok round ")
                .and_then(|r| r.split(' ').next())
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("{outcome}"))
        })
        .collect();
    ends.sort_unstable();
    assert_eq!(ends, vec![1, 2, 3], "each round ends exactly once");
    let delivered: Vec<(&str, &str)> = trail
        .iter()
        .filter(|e| e["action"] == "run-delivered")
        .map(|e| (e["actor"].as_str().unwrap(), e["target"].as_str().unwrap()))
        .collect();
    let mut runs: Vec<&str> = delivered.iter().map(|(_, r)| *r).collect();
    runs.sort_unstable();
    let before = runs.len();
    runs.dedup();
    assert_eq!(
        runs.len(),
        before,
        "a run was delivered twice: {delivered:?}"
    );
    assert!(before >= 6, "{delivered:?}");
    for st in ["st1", "st2", "st3"] {
        let events: Vec<serde_json::Value> = serde_json::from_str(
            &ok(&["audit", "show", "--dir", s(&net.station_dir(st)), "--json"]).stdout,
        )
        .unwrap();
        let started = events
            .iter()
            .filter(|e| e["entry"]["event"] == "run-started")
            .count();
        let handed = delivered
            .iter()
            .filter(|(actor, _)| *actor == format!("station:{st}"))
            .count();
        assert!(
            started <= handed && handed > 0,
            "{st} started {started} runs, was handed {handed}"
        );
        ok(&["audit", "verify", "--dir", s(&net.station_dir(st))]);
    }
}

/// `GET path` on 127.0.0.1:port, the whole answer.
fn http_get(port: u16, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// Metric samples as Prometheus' own OpenMetrics parser (the `prometheus-client` Python
/// package) reads them: (sample name, labels, value).
fn parse_metrics(text: &str) -> Vec<(String, serde_json::Value, f64)> {
    let py = python().expect("the test venv (scripts/setup.sh --test) has prometheus-client");
    let script = [
        "import sys, json",
        "from prometheus_client.openmetrics.parser import text_string_to_metric_families",
        "out = []",
        "for fam in text_string_to_metric_families(sys.stdin.read()):",
        "    for s in fam.samples:",
        "        out.append([s.name, s.labels, s.value])",
        "print(json.dumps(out))",
    ]
    .join("\n");
    let mut child = std::process::Command::new(py)
        .args(["-c", &script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the OpenMetrics parser refused:\n{}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Vec<(String, serde_json::Value, f64)> = serde_json::from_slice(&out.stdout).unwrap();
    assert!(!v.is_empty(), "{text}");
    v
}

fn sample(
    samples: &[(String, serde_json::Value, f64)],
    name: &str,
    labels: &[(&str, &str)],
) -> Option<f64> {
    samples
        .iter()
        .filter(|(n, l, _)| n == name && labels.iter().all(|(k, v)| l[*k] == *v))
        .map(|(_, _, v)| *v)
        .reduce(|a, b| a + b)
}

/// The registry's metrics listener and the station daemon's metrics file, read with
/// Prometheus' own parser after a task: requests and refusals counted, runs by state, the
/// station seen; the daemon's runs, run time, queue, last poll and audit log size.
#[test]
fn registry_and_station_metrics_parse_and_count_what_happened() {
    let mut net = Net::new();
    let metrics_port = free_port();
    net.kill_registry();
    net.metrics_port = Some(metrics_port);
    net.start_registry();
    net.add_station("st1", "academic", 5);
    let stats = net.push("cohort-stats");
    ok(&[
        "station",
        "approve",
        "--dir",
        s(&net.station_dir("st1")),
        s(&stats),
    ]);
    net.start_daemon("st1");
    let task = net.task(&stats, &["st1"], "{}");
    let t = net.wait_finished(task["id"].as_str().unwrap(), Duration::from_secs(120));
    assert_eq!(run_of(&t, "st1")["state"], "done", "{t}");
    // A refusal: no credentials.
    assert!(http_get(net.port, "/v1/me").starts_with("HTTP/1.1 401"));
    // Metrics are not on the API's port.
    assert!(http_get(net.port, "/metrics").starts_with("HTTP/1.1 404"));

    let answer = http_get(metrics_port, "/metrics");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("application/openmetrics-text"), "{answer}");
    let body = answer.split("\r\n\r\n").nth(1).unwrap_or("");
    let reg = parse_metrics(body);
    let ok_requests = sample(&reg, "amicus_registry_requests_total", &[("status", "200")]);
    assert!(ok_requests.is_some_and(|n| n >= 5.0), "{body}");
    assert!(
        sample(
            &reg,
            "amicus_registry_requests_total",
            &[("action", "me"), ("status", "401")]
        )
        .is_some_and(|n| n >= 1.0),
        "{body}"
    );
    assert!(
        sample(
            &reg,
            "amicus_registry_refusals_total",
            &[("code", "unauthenticated")]
        )
        .is_some_and(|n| n >= 1.0),
        "{body}"
    );
    assert_eq!(
        sample(&reg, "amicus_registry_runs", &[("state", "done")]),
        Some(1.0),
        "{body}"
    );
    assert_eq!(
        sample(&reg, "amicus_registry_stations", &[]),
        Some(1.0),
        "{body}"
    );
    assert_eq!(
        sample(&reg, "amicus_registry_stations_seen_5m", &[]),
        Some(1.0),
        "{body}"
    );
    assert!(
        sample(&reg, "amicus_registry_request_duration_seconds_count", &[])
            .is_some_and(|n| n >= 5.0),
        "{body}"
    );

    // The daemon writes its file after every pass.
    let file = net.station_dir("st1").join("registry/metrics.prom");
    let t0 = Instant::now();
    let station = loop {
        let text = std::fs::read_to_string(&file).unwrap_or_default();
        if text.contains("amicus_station_runs_total{outcome=\"done\"} 1") {
            break text;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "{}:\n{text}",
            file.display()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let st = parse_metrics(&station);
    assert_eq!(
        sample(&st, "amicus_station_runs_total", &[("outcome", "done")]),
        Some(1.0)
    );
    assert_eq!(
        sample(&st, "amicus_station_run_duration_seconds_count", &[]),
        Some(1.0)
    );
    assert!(
        sample(
            &st,
            "amicus_station_last_successful_poll_timestamp_seconds",
            &[]
        )
        .is_some_and(|t| t > 1.7e9)
    );
    assert!(sample(&st, "amicus_station_audit_log_bytes", &[]).is_some_and(|b| b > 1000.0));
    assert_eq!(
        sample(&st, "amicus_station_queue", &[("stage", "started")]),
        Some(0.0)
    );
}
