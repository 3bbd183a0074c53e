//! The container images as a hospital and a registry operator run them: `bash
//! deploy/images.sh` builds both (and their offline archives); PostgreSQL on loopback; the
//! registry and two stations as locked-down containers (read-only root filesystem, no
//! capabilities, no new privileges, user 10001, the archive mounted read-only, only the state
//! directory writable); a task and a 2-round federated job driven by the CLI outside the
//! containers; and `podman stop` (SIGTERM) ending every container with exit code 0.
//!
//! Needs podman (scripts/setup.sh --test installs it). Where podman cannot run containers the
//! test says so and is counted as skipped; with CI=true that is a failure.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

fn containers_conf() -> PathBuf {
    repo_root().join("deploy/containers.conf")
}

fn podman(args: &[&str]) -> std::process::Output {
    Command::new("podman")
        .args(args)
        .env("CONTAINERS_CONF", containers_conf())
        .output()
        .unwrap_or_else(|e| panic!("podman {args:?}: {e}"))
}

fn podman_ok(args: &[&str]) -> String {
    let out = podman(args);
    assert!(
        out.status.success(),
        "podman {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Whether podman can run a container here; if not, why.
fn podman_usable() -> Result<(), String> {
    let out = Command::new("podman")
        .args(["info", "--format", "{{.Host.OCIRuntime.Name}}"])
        .env("CONTAINERS_CONF", containers_conf())
        .output()
        .map_err(|e| format!("podman is not installed ({e}); run scripts/setup.sh --test"))?;
    if !out.status.success() {
        return Err(format!(
            "podman info failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(())
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn version() -> String {
    let text = std::fs::read_to_string(repo_root().join("Cargo.toml")).unwrap();
    let line = text.lines().find(|l| l.starts_with("version = ")).unwrap();
    line.trim_start_matches("version = ")
        .trim_matches('"')
        .to_string()
}

/// Containers, a PostgreSQL server and files of one test; all removed at the end.
struct Site {
    tmp: tempfile::TempDir,
    prefix: String,
    containers: Vec<String>,
    pg: PathBuf,
}

impl Drop for Site {
    fn drop(&mut self) {
        for c in &self.containers {
            let _ = podman(&["rm", "-f", "-t", "0", c]);
        }
        let _ = Command::new("bash")
            .arg(repo_root().join("scripts/postgres.sh"))
            .args(["stop", s(&self.pg)])
            .output();
    }
}

impl Site {
    fn path(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }

    /// A directory the containers' user (10001) may write.
    fn writable_dir(&self, name: &str) -> PathBuf {
        let p = self.path(name);
        std::fs::create_dir_all(&p).unwrap();
        let _ = Command::new("chown").args(["10001:10001", s(&p)]).status();
        p
    }

    /// `podman run` with the lock-down every amicus container gets.
    fn run_args(&self, name: Option<&str>, detach: bool) -> Vec<String> {
        let mut a: Vec<String> = vec!["run".into()];
        if detach {
            a.push("-d".into());
        } else {
            a.push("--rm".into());
        }
        if let Some(n) = name {
            a.extend(["--name".into(), n.into()]);
        }
        a.extend(
            [
                "--network",
                "host",
                "--read-only",
                "--cap-drop",
                "all",
                "--security-opt",
                "no-new-privileges",
                "--user",
                "10001:10001",
            ]
            .map(String::from),
        );
        a
    }

    fn logs(&self) -> String {
        let mut out = String::new();
        for c in &self.containers {
            let o = podman(&["logs", c]);
            out += &format!(
                "--- {c}\n{}{}\n",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
        }
        out
    }
}

fn edit(path: &Path, from: &str, to: &str) {
    let text = std::fs::read_to_string(path).unwrap();
    assert!(text.contains(from), "{} has no {from:?}", path.display());
    std::fs::write(path, text.replacen(from, to, 1)).unwrap();
}

/// `bash deploy/images.sh`, once per test process (the tests here share its images); the
/// station's and the registry's image names.
fn images() -> (String, String) {
    static BUILT: std::sync::Mutex<Option<(String, String)>> = std::sync::Mutex::new(None);
    let mut built = BUILT.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(b) = built.as_ref() {
        return b.clone();
    }
    let v = version();
    let names = (
        format!("localhost/amicus-station:{v}"),
        format!("localhost/amicus-registry:{v}"),
    );
    let out = Command::new("bash")
        .arg(repo_root().join("deploy/images.sh"))
        .env("CONTAINERS_CONF", containers_conf())
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "deploy/images.sh failed:\n{text}");
    eprintln!("{text}");
    *built = Some(names.clone());
    names
}

#[test]
fn images_run_a_task_and_a_federated_job_locked_down() {
    if let Err(why) = podman_usable() {
        assert!(
            std::env::var_os("CI").is_none(),
            "containers cannot run here: {why}"
        );
        eprintln!("SKIPPED (counted): containers cannot run here: {why}");
        return;
    }
    let (station_image, registry_image) = images();
    let v = version();
    for (image, limit_mb) in [(&registry_image, 40u64), (&station_image, 150)] {
        let size: u64 = podman_ok(&["image", "inspect", "--format", "{{.Size}}", image])
            .trim()
            .parse()
            .unwrap();
        assert!(
            size <= limit_mb * 1_000_000,
            "{image} is {size} bytes (goal ≤ {limit_mb} MB)"
        );
        let user = podman_ok(&["image", "inspect", "--format", "{{.Config.User}}", image]);
        assert_eq!(user.trim(), "10001:10001", "{image} runs as {user}");
    }
    for name in ["station", "registry"] {
        let archive = repo_root().join(format!("target/images/amicus-{name}-{v}.oci.tar"));
        let listing = Command::new("tar")
            .arg("tf")
            .arg(&archive)
            .output()
            .unwrap();
        assert!(listing.status.success(), "{}", archive.display());
        let listing = String::from_utf8_lossy(&listing.stdout);
        assert!(
            listing
                .lines()
                .any(|l| l == "index.json" || l == "./index.json")
                && listing.contains("oci-layout"),
            "{} is not an OCI archive:\n{listing}",
            archive.display()
        );
    }
    // The registry's image has nothing of the station in it.
    let files = podman_ok(&[
        "run",
        "--rm",
        "--entrypoint",
        "/usr/local/bin/amicus-registry",
        &registry_image,
        "--version",
    ]);
    assert!(files.contains("amicus-registry"), "{files}");
    let no_amicus = podman(&[
        "run",
        "--rm",
        "--entrypoint",
        "/usr/local/bin/amicus",
        &registry_image,
        "--version",
    ]);
    assert!(
        !no_amicus.status.success(),
        "the registry image carries `amicus`"
    );

    let tmp = tempfile::tempdir().unwrap();
    let pg = tmp.path().join("pg");
    let mut site = Site {
        prefix: format!("amicus-test-{}", std::process::id()),
        containers: Vec::new(),
        pg: pg.clone(),
        tmp,
    };
    // PostgreSQL runs as its own user: it must reach its directory.
    let _ = Command::new("chmod")
        .args(["755", s(site.tmp.path())])
        .status();
    let pg_port = free_port();
    let out = Command::new("bash")
        .arg(repo_root().join("scripts/postgres.sh"))
        .args(["start", s(&pg), &pg_port.to_string()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "PostgreSQL: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let db = String::from_utf8_lossy(&out.stdout).trim().to_string();

    // The first admin, added with the registry image (the database URL in the environment).
    let mut args = site.run_args(None, false);
    args.extend([
        "-e".into(),
        format!("AMICUS_DB_URL={db}"),
        registry_image.clone(),
    ]);
    args.extend(["user", "add", "--name", "root", "--role", "admin"].map(String::from));
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let added = podman_ok(&argv);
    let root_token = site.path("root.token");
    std::fs::write(&root_token, added.lines().last().unwrap().trim()).unwrap();

    // The registry.
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let reg_name = format!("{}-registry", site.prefix);
    let mut args = site.run_args(Some(&reg_name), true);
    args.extend([
        "-e".into(),
        format!("AMICUS_DB_URL={db}"),
        "-e".into(),
        format!("AMICUS_LISTEN=127.0.0.1:{port}"),
        registry_image.clone(),
    ]);
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    podman_ok(&argv);
    site.containers.push(reg_name.clone());
    let t0 = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the registry container did not start\n{}",
            site.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // People, with the CLI outside the containers.
    let person = |token: &Path, args: &[&str], env: &[(&str, &str)]| -> Out {
        let mut full = args.to_vec();
        full.extend(["--registry", &url, "--token-file", s(token)]);
        amicus_env(&full, env)
    };
    ok(&["keygen", "--out", s(&site.path("alice-sign.key"))]);
    ok(&["keygen", "--x25519", "--out", s(&site.path("alice.key"))]);
    // alice, added the same way (her sealing key mounted read-only).
    let inputs = site.path("in");
    std::fs::create_dir_all(&inputs).unwrap();
    std::fs::copy(site.path("alice.pub"), inputs.join("alice.pub")).unwrap();
    std::fs::copy(site.path("alice-sign.pub"), inputs.join("alice-sign.pub")).unwrap();
    let _ = Command::new("chmod")
        .args(["-R", "a+rX", s(&inputs)])
        .status();
    let mut args = site.run_args(None, false);
    args.extend([
        "-e".into(),
        format!("AMICUS_DB_URL={db}"),
        "-v".into(),
        format!("{}:/in:ro", inputs.display()),
        registry_image.clone(),
    ]);
    args.extend(
        [
            "user",
            "add",
            "--name",
            "alice",
            "--role",
            "researcher",
            "--enc-key",
            "/in/alice.pub",
        ]
        .map(String::from),
    );
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let added = podman_ok(&argv);
    let alice_token = site.path("alice.token");
    std::fs::write(&alice_token, added.lines().last().unwrap().trim()).unwrap();
    let alice_env = [
        (
            "AMICUS_SIGN_KEY",
            s(&site.path("alice-sign.key")).to_string(),
        ),
        (
            "AMICUS_RECIPIENT_KEY",
            s(&site.path("alice.key")).to_string(),
        ),
    ];
    let alice_env: Vec<(&str, &str)> = alice_env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let alice = |args: &[&str]| -> Out {
        let out = person(&alice_token, args, &alice_env);
        assert!(out.ok, "alice: amicus {args:?}:\n{}", out.text());
        out
    };

    // Trains, built and signed outside, pushed.
    let mut trains = Vec::new();
    for rel in ["cohort-stats", "fed-seg"] {
        let copy = inputs.join(format!("{rel}.train"));
        std::fs::copy(bundle(rel), &copy).unwrap();
        ok(&[
            "train",
            "sign",
            s(&copy),
            "--key",
            s(&site.path("alice-sign.key")),
        ]);
        alice(&["train", "push", s(&copy)]);
        trains.push(copy);
    }
    let _ = Command::new("chmod")
        .args(["-R", "a+rX", s(&inputs)])
        .status();

    // Two stations: synthetic archives (read-only in the container), state set up with the
    // station image, registered by root.
    for (name, seed) in [("st1", 21u64), ("st2", 22)] {
        let archive = site.path(&format!("{name}-archive"));
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
            "academic",
        ]);
        let _ = Command::new("chmod")
            .args(["-R", "a+rX", s(&archive)])
            .status();
        let state = site.writable_dir(&format!("{name}-state"));
        let mounts = [
            "-v".to_string(),
            format!("{}:/var/lib/amicus", state.display()),
            "-v".into(),
            format!("{}:/archive:ro", archive.display()),
            "-v".into(),
            format!("{}:/in:ro", inputs.display()),
        ];
        let in_station = |cmd: &[&str]| {
            let mut args = site.run_args(None, false);
            args.extend(mounts.iter().cloned());
            args.push(station_image.clone());
            args.extend(cmd.iter().map(|c| c.to_string()));
            let argv: Vec<&str> = args.iter().map(String::as_str).collect();
            podman_ok(&argv)
        };
        let dir = "/var/lib/amicus/station";
        in_station(&[
            "station",
            "init",
            "--dir",
            dir,
            "--archive",
            "/archive",
            "--name",
            name,
        ]);
        in_station(&["station", "trust", "--dir", dir, "/in/alice-sign.pub"]);
        in_station(&[
            "station",
            "trust",
            "--researcher",
            "--name",
            "alice",
            "--dir",
            dir,
            "/in/alice-sign.pub",
        ]);
        in_station(&["station", "index", "--dir", dir]);
        let policy = state.join("station/policy.toml");
        edit(
            &policy,
            "allowed_capabilities = [\"cohort\"]",
            "allowed_capabilities = [\"cohort\", \"imaging\", \"kernels\"]",
        );
        edit(&policy, "min_patients = 10", "min_patients = 3");
        for t in ["cohort-stats", "fed-seg"] {
            in_station(&[
                "station",
                "approve",
                "--dir",
                dir,
                &format!("/in/{t}.train"),
            ]);
        }
        let out = person(
            &root_token,
            &[
                "registry",
                "station",
                "add",
                "--name",
                name,
                "--key",
                s(&state.join("station/station.pub")),
            ],
            &[],
        );
        assert!(out.ok, "{}", out.text());
        // The daemon.
        let cname = format!("{}-{name}", site.prefix);
        let mut args = site.run_args(Some(&cname), true);
        args.extend(mounts.iter().cloned());
        args.push(station_image.clone());
        args.extend(
            [
                "station",
                "serve",
                "--dir",
                dir,
                "--registry",
                &url,
                "--poll-wait",
                "2",
            ]
            .map(String::from),
        );
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        podman_ok(&argv);
        site.containers.push(cname);
    }

    // A task on both stations; sealed results opened outside.
    let out = alice(&[
        "task",
        "create",
        "--train",
        s(&trains[0]),
        "--station",
        "st1",
        "--station",
        "st2",
        "--json",
    ]);
    let task: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    let id = task["id"].as_str().unwrap().to_string();
    let out = person(
        &alice_token,
        &["task", "show", &id, "--json", "--wait", "180s"],
        &alice_env,
    );
    assert!(out.ok, "task: {}\n{}", out.text(), site.logs());
    let shown: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    for r in shown["runs"].as_array().unwrap() {
        assert_eq!(r["state"], "done", "{shown}\n{}", site.logs());
    }
    let results = site.path("results");
    alice(&[
        "task",
        "results",
        &id,
        "--key",
        s(&site.path("alice.key")),
        "--out",
        s(&results),
    ]);
    for st in ["st1", "st2"] {
        let dir = results.join(st);
        let n = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .count();
        assert!(n > 0, "no results from {st}");
    }

    // A 2-round federated job.
    std::fs::write(
        site.path("plan.json"),
        r#"{"rounds": 2, "min_stations": 2, "round_seconds": 300}"#,
    )
    .unwrap();
    std::fs::write(
        site.path("params.json"),
        r#"{"local_steps": 3, "batch": 4, "test_series": 1}"#,
    )
    .unwrap();
    let out = alice(&[
        "job",
        "create",
        "--train",
        s(&trains[1]),
        "--station",
        "st1",
        "--station",
        "st2",
        "--plan",
        s(&site.path("plan.json")),
        "--params",
        s(&site.path("params.json")),
        "--json",
    ]);
    let job: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    let job_id = job["id"].as_str().unwrap().to_string();
    let out = person(
        &alice_token,
        &["job", "show", &job_id, "--json", "--wait", "900s"],
        &alice_env,
    );
    assert!(out.ok, "job: {}\n{}", out.text(), site.logs());
    let job: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(job["state"], "done", "{job}\n{}", site.logs());
    let rounds = job["rounds"].as_array().unwrap();
    assert_eq!(rounds.len(), 2, "{job}");
    for r in rounds {
        let used = r["summary"]["stations"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|x| x["status"] == "used")
            .count();
        assert_eq!(used, 2, "{r}");
    }

    // The stations' logs verify where they are, and as the registry holds them.
    for st in ["st1", "st2"] {
        ok(&[
            "audit",
            "verify",
            "--dir",
            s(&site.path(&format!("{st}-state")).join("station")),
        ]);
    }

    // `podman stop` sends SIGTERM: every container ends with exit code 0.
    for c in site.containers.clone() {
        podman_ok(&["stop", "-t", "20", &c]);
        let code = podman_ok(&["inspect", "--format", "{{.State.ExitCode}}", &c]);
        assert_eq!(code.trim(), "0", "{c} exited {code}\n{}", site.logs());
    }
}

/// Every document of a YAML file, as JSON (PyYAML, in the test venv).
fn yaml_docs(path: &Path) -> Vec<serde_json::Value> {
    let py = python().expect("the test venv (scripts/setup.sh --test)");
    let out = Command::new(py)
        .args([
            "-c",
            "import sys, json, yaml; print(json.dumps([d for d in yaml.safe_load_all(open(sys.argv[1])) if d]))",
            s(path),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn http_status(port: u16, path: &str) -> Option<u16> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    out.get(9..12)?.parse().ok()
}

/// The Kubernetes manifests: every workload locked down (non-root, read-only root, no
/// privilege escalation, all capabilities dropped), the registry with two or more replicas and
/// probes on routes it has, the station's archive read-only. Then, as far as `podman kube
/// play` supports them: the registry's Deployment and Secret (podman runs one replica) on
/// PostgreSQL, ready and serving metrics; the station's StatefulSet pod template as a Pod (podman
/// has no StatefulSet) whose init container makes the station and whose daemon reaches that
/// registry.
#[test]
fn kubernetes_manifests_are_locked_down_and_play_in_podman() {
    let dir = repo_root().join("deploy/kubernetes");
    let mut workloads = 0;
    let mut docs_of = std::collections::HashMap::new();
    for name in ["registry.yaml", "postgres.yaml", "station.yaml"] {
        let docs = yaml_docs(&dir.join(name));
        for d in &docs {
            let kind = d["kind"].as_str().unwrap_or("");
            if !matches!(kind, "Deployment" | "StatefulSet") {
                continue;
            }
            workloads += 1;
            let pod = &d["spec"]["template"]["spec"];
            let who = format!("{name} {kind} {}", d["metadata"]["name"]);
            assert_eq!(pod["securityContext"]["runAsNonRoot"], true, "{who}");
            assert_eq!(pod["automountServiceAccountToken"], false, "{who}");
            let containers = pod["containers"]
                .as_array()
                .unwrap()
                .iter()
                .chain(pod["initContainers"].as_array().into_iter().flatten());
            for c in containers {
                let sc = &c["securityContext"];
                assert_eq!(sc["allowPrivilegeEscalation"], false, "{who}");
                assert_eq!(
                    sc["capabilities"]["drop"],
                    serde_json::json!(["ALL"]),
                    "{who}"
                );
                if !c["image"].as_str().unwrap_or("").contains("postgres") {
                    assert_eq!(sc["readOnlyRootFilesystem"], true, "{who}");
                }
            }
        }
        docs_of.insert(name, docs);
    }
    assert_eq!(workloads, 3);
    let registry_docs = &docs_of["registry.yaml"];
    let deployment = registry_docs
        .iter()
        .find(|d| d["kind"] == "Deployment")
        .unwrap();
    assert!(deployment["spec"]["replicas"].as_u64().unwrap() >= 2);
    let probes = &deployment["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(probes["readinessProbe"]["httpGet"]["path"], "/v1/ready");
    assert_eq!(probes["livenessProbe"]["httpGet"]["path"], "/v1/health");
    let station_set = docs_of["station.yaml"]
        .iter()
        .find(|d| d["kind"] == "StatefulSet")
        .unwrap()
        .clone();
    let archive_mount = station_set["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "archive")
        .unwrap()
        .clone();
    assert_eq!(archive_mount["readOnly"], true);

    if let Err(why) = podman_usable() {
        assert!(
            std::env::var_os("CI").is_none(),
            "containers cannot run here: {why}"
        );
        eprintln!("SKIPPED (counted): podman kube play cannot run here: {why}");
        return;
    }
    images();
    let tmp = tempfile::tempdir().unwrap();
    let _ = Command::new("chmod").args(["755", s(tmp.path())]).status();
    let pg = tmp.path().join("pg");
    let out = Command::new("bash")
        .arg(repo_root().join("scripts/postgres.sh"))
        .args(["start", s(&pg), &free_port().to_string()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let db = String::from_utf8_lossy(&out.stdout).trim().to_string();
    struct Down(Vec<PathBuf>, PathBuf, Vec<String>);
    impl Drop for Down {
        fn drop(&mut self) {
            for f in &self.0 {
                let _ = podman(&["kube", "down", s(f)]);
            }
            for secret in &self.2 {
                let _ = podman(&["secret", "rm", secret]);
            }
            let _ = Command::new("bash")
                .arg(repo_root().join("scripts/postgres.sh"))
                .args(["stop", s(&self.1)])
                .output();
        }
    }
    let mut down = Down(Vec::new(), pg.clone(), Vec::new());

    // The registry's manifest, pointed at this PostgreSQL and at loopback ports. On the host's
    // network podman takes no port declarations: they go, and the probes name the port.
    let (port, metrics) = (free_port(), free_port());
    let mut played_docs = Vec::new();
    for mut d in registry_docs.clone() {
        match d["kind"].as_str() {
            Some("Secret") => {
                // podman 4.3 stores a played Secret as its YAML but reads a referenced one as
                // a JSON map of base64 values: make the secret here, under the manifest's name.
                use base64::Engine as _;
                let name = d["metadata"]["name"].as_str().unwrap().to_string();
                let secret = serde_json::json!({
                    "url": base64::engine::general_purpose::STANDARD.encode(&db),
                });
                let file = tmp.path().join("secret.json");
                std::fs::write(&file, secret.to_string()).unwrap();
                let _ = podman(&["secret", "rm", &name]);
                podman_ok(&["secret", "create", &name, s(&file)]);
                down.2.push(name);
                continue;
            }
            Some("Deployment") => {
                d["metadata"]["name"] = format!("amicus-registry-{port}").into();
                // podman plays each replica as a pod: on the host's network they would share
                // one port. Replicas are tested with processes (cli/tests/registry.rs).
                d["spec"]["replicas"] = 1.into();
                let c = &mut d["spec"]["template"]["spec"]["containers"][0];
                for e in c["env"].as_array_mut().unwrap() {
                    match e["name"].as_str() {
                        Some("AMICUS_LISTEN") => e["value"] = format!("127.0.0.1:{port}").into(),
                        Some("AMICUS_METRICS_LISTEN") => {
                            e["value"] = format!("127.0.0.1:{metrics}").into()
                        }
                        _ => {}
                    }
                }
                c.as_object_mut().unwrap().remove("ports");
                c["readinessProbe"]["httpGet"]["port"] = port.into();
                c["livenessProbe"]["httpGet"]["port"] = port.into();
            }
            _ => continue, // Services: podman has none
        }
        played_docs.push(serde_json::to_string_pretty(&d).unwrap());
    }
    let played = tmp.path().join("registry.yaml");
    std::fs::write(&played, played_docs.join("\n---\n")).unwrap();
    podman_ok(&["kube", "play", "--network", "host", s(&played)]);
    down.0.push(played);
    let t0 = Instant::now();
    while http_status(port, "/v1/ready") != Some(200) {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "the registry pod never got ready"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(http_status(metrics, "/metrics"), Some(200));

    // The station's pod template as a Pod, its volumes as host directories.
    let archive = tmp.path().join("archive");
    ok(&[
        "synth",
        "--out",
        s(&archive),
        "--site",
        "k8s",
        "--patients",
        "3",
        "--seed",
        "7",
    ]);
    let _ = Command::new("chmod")
        .args(["-R", "a+rX", s(&archive)])
        .status();
    let state = tmp.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let _ = Command::new("chown")
        .args(["10001:10001", s(&state)])
        .status();
    let mut spec = station_set["spec"]["template"]["spec"].clone();
    spec["volumes"] = serde_json::json!([
        {"name": "state", "hostPath": {"path": s(&state), "type": "Directory"}},
        {"name": "archive", "hostPath": {"path": s(&archive), "type": "Directory"}},
    ]);
    spec["containers"][0]["env"][0]["value"] = format!("http://127.0.0.1:{port}").into();
    let pod_name = format!("amicus-station-{port}");
    // podman 4.3 races with its own init containers ("cannot remove container ... as it is
    // running"): the init container runs as a pod of its own first, with the same spec.
    let mut init_spec = spec.clone();
    let init = init_spec["initContainers"][0].clone();
    init_spec["containers"] = serde_json::json!([init]);
    init_spec.as_object_mut().unwrap().remove("initContainers");
    init_spec["restartPolicy"] = "Never".into();
    spec.as_object_mut().unwrap().remove("initContainers");
    let labels = station_set["spec"]["template"]["metadata"]["labels"].clone();
    for (name, spec, file) in [
        (format!("{pod_name}-init"), init_spec, "station-init.yaml"),
        (pod_name.clone(), spec, "station.yaml"),
    ] {
        // podman does not expand Kubernetes' `$(VAR)` in arguments: do it as Kubernetes
        // would (STATION_NAME is the pod's name).
        let mut spec = spec;
        let url = format!("http://127.0.0.1:{port}");
        if let Some(args) = spec["containers"][0]["args"].as_array_mut() {
            for a in args {
                let expanded = a
                    .as_str()
                    .unwrap_or("")
                    .replace("$(STATION_NAME)", &pod_name)
                    .replace("$(AMICUS_REGISTRY)", &url);
                *a = expanded.into();
            }
        }
        let pod = serde_json::json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "labels": labels},
            "spec": spec,
        });
        let played = tmp.path().join(file);
        std::fs::write(&played, serde_json::to_string_pretty(&pod).unwrap()).unwrap();
        podman_ok(&["kube", "play", "--network", "host", s(&played)]);
        down.0.push(played);
        if file == "station-init.yaml" {
            let toml = state.join("station/station.toml");
            let t0 = Instant::now();
            while !toml.exists() {
                assert!(
                    t0.elapsed() < Duration::from_secs(60),
                    "the init container made no station"
                );
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
    // The init container made the station, named after the pod.
    let toml = state.join("station/station.toml");
    let made = std::fs::read_to_string(&toml).unwrap();
    assert!(made.contains(&pod_name), "{made}");
    // Registered by an admin, its daemon reaches the registry (a signed poll).
    let token = tmp.path().join("root.token");
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
        s(&token),
    ]);
    let url = format!("http://127.0.0.1:{port}");
    let conn = ["--registry", url.as_str(), "--token-file", s(&token)];
    let mut add = vec!["registry", "station", "add", "--name", &pod_name, "--key"];
    let key = state.join("station/station.pub");
    add.push(s(&key));
    add.extend(conn);
    ok(&add);
    let t0 = Instant::now();
    loop {
        let mut list = vec!["registry", "station", "list"];
        list.extend(conn);
        let out = ok(&list);
        if out.stdout.contains(&pod_name) && !out.stdout.contains("never") {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "the station pod never polled:\n{}\n{}",
            out.stdout,
            String::from_utf8_lossy(&podman(&["pod", "logs", &pod_name]).stderr)
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}
