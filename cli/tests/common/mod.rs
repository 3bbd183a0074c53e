//! Shared helpers for the integration tests: run the real `amicus` binary, build the example
//! and hostile trains as real WebAssembly components (once per test process), and set up
//! stations in temporary directories.

#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("cli/ has a parent")
        .to_path_buf()
}

#[derive(Debug)]
pub struct Out {
    pub ok: bool,
    pub stdout: String,
    pub stderr: String,
}

impl Out {
    pub fn text(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }
}

/// `amicus`, without the proxy settings of whoever runs the tests (clients honour them; a
/// test that wants a proxy sets one).
pub fn command() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_amicus"));
    for v in [
        "HTTPS_PROXY",
        "https_proxy",
        "HTTP_PROXY",
        "http_proxy",
        "ALL_PROXY",
        "all_proxy",
        "NO_PROXY",
        "no_proxy",
        "AMICUS_PROXY",
        "AMICUS_CA_FILE",
        "AMICUS_SIGN_KEY",
        "AMICUS_RECIPIENT_KEY",
        "AMICUS_DB_URL",
        "AMICUS_LISTEN",
        "AMICUS_REGISTRY_CONFIG",
    ] {
        c.env_remove(v);
    }
    c
}

pub fn amicus(args: &[&str]) -> Out {
    amicus_env(args, &[])
}

/// `amicus ARGS` with extra environment variables.
pub fn amicus_env(args: &[&str], env: &[(&str, &str)]) -> Out {
    let out = command()
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("amicus runs");
    Out {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// `amicus ARGS` that must succeed.
pub fn ok(args: &[&str]) -> Out {
    let out = amicus(args);
    assert!(out.ok, "amicus {args:?} failed:\n{}", out.text());
    out
}

/// `amicus ARGS` that must fail; returns its output.
pub fn fails(args: &[&str]) -> Out {
    let out = amicus(args);
    assert!(
        !out.ok,
        "amicus {args:?} should have failed:\n{}",
        out.text()
    );
    out
}

pub fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// An unsigned bundle of `trains/<rel>`, built once per test process with `amicus train build`.
pub fn bundle(rel: &str) -> PathBuf {
    static BUILT: OnceLock<Mutex<HashMap<String, PathBuf>>> = OnceLock::new();
    let map = BUILT.get_or_init(Default::default);
    let mut map = map.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(p) = map.get(rel) {
        return p.clone();
    }
    let dir =
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("bundles-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join(format!("{}.train", rel.replace('/', "-")));
    let crate_dir = repo_root().join("trains").join(rel);
    ok(&["train", "build", s(&crate_dir), "--out", s(&out)]);
    map.insert(rel.to_string(), out.clone());
    out
}

/// A station with a trusted signer "alice", in a temporary directory.
pub struct Fixture {
    pub tmp: tempfile::TempDir,
}

impl Fixture {
    pub fn new() -> Fixture {
        let tmp = tempfile::tempdir().unwrap();
        let f = Fixture { tmp };
        std::fs::create_dir(f.path("archive")).unwrap();
        ok(&["keygen", "--out", s(&f.path("alice.key"))]);
        ok(&["keygen", "--out", s(&f.path("bob.key"))]);
        ok(&["keygen", "--out", s(&f.path("mallory.key"))]);
        ok(&[
            "station",
            "init",
            "--dir",
            s(&f.station()),
            "--archive",
            s(&f.path("archive")),
        ]);
        ok(&[
            "station",
            "trust",
            "--dir",
            s(&f.station()),
            s(&f.path("alice.pub")),
        ]);
        f
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }

    pub fn station(&self) -> PathBuf {
        self.path("st1")
    }

    /// A copy of the bundle of `trains/<rel>` signed by `signers` (key names in the fixture).
    pub fn signed(&self, rel: &str, signers: &[&str]) -> PathBuf {
        let copy = self.path(&format!("{}.train", rel.replace('/', "-")));
        std::fs::copy(bundle(rel), &copy).unwrap();
        for k in signers {
            ok(&[
                "train",
                "sign",
                s(&copy),
                "--key",
                s(&self.path(&format!("{k}.key"))),
            ]);
        }
        copy
    }

    pub fn approve(&self, bundle: &Path) {
        ok(&["station", "approve", "--dir", s(&self.station()), s(bundle)]);
    }

    /// Signed by alice and approved.
    pub fn ready(&self, rel: &str) -> PathBuf {
        let b = self.signed(rel, &["alice"]);
        self.approve(&b);
        b
    }

    pub fn run(&self, bundle: &Path, params: Option<&str>) -> Out {
        let station = self.station();
        let params_path = self.path("params.json");
        let mut args = vec!["station", "run", "--dir", s(&station)];
        if let Some(p) = params {
            std::fs::write(&params_path, p).unwrap();
            args.extend(["--params", s(&params_path)]);
        }
        args.push(s(bundle));
        amicus(&args)
    }

    pub fn policy_edit(&self, from: &str, to: &str) {
        let path = self.station().join("policy.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains(from), "policy has no {from:?}:\n{text}");
        std::fs::write(&path, text.replacen(from, to, 1)).unwrap();
    }

    /// Every audit entry, as JSON.
    pub fn events(&self) -> Vec<serde_json::Value> {
        let out = ok(&["audit", "show", "--dir", s(&self.station()), "--json"]);
        let v: Vec<serde_json::Value> = serde_json::from_str(&out.stdout).unwrap();
        v.into_iter().map(|e| e["entry"].clone()).collect()
    }

    pub fn last_event(&self, kind: &str) -> serde_json::Value {
        self.events()
            .into_iter()
            .rev()
            .find(|e| e["event"] == kind)
            .unwrap_or_else(|| panic!("no {kind} event"))
    }

    /// Paths of every released output file in the station.
    pub fn released(&self) -> Vec<PathBuf> {
        let mut out = Vec::new();
        let runs = self.station().join("runs");
        for run in std::fs::read_dir(runs).unwrap() {
            let outputs = run.unwrap().path().join("outputs");
            if let Ok(entries) = std::fs::read_dir(outputs) {
                out.extend(entries.map(|e| e.unwrap().path()));
            }
        }
        out
    }

    /// Fill the (empty) archive with `patients` synthetic patients of `profile`.
    pub fn synth_archive(&self, profile: &str, patients: usize, seed: u64) {
        ok(&[
            "synth",
            "--out",
            s(&self.path("archive")),
            "--site",
            &format!("{profile} hospital"),
            "--patients",
            &patients.to_string(),
            "--seed",
            &seed.to_string(),
            "--profile",
            profile,
        ]);
    }

    /// The ground truth synth wrote next to the archive.
    pub fn ground_truth(&self) -> serde_json::Value {
        let path = self.path("archive").join("ground-truth.json");
        serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
    }

    /// The last capability call's audit entry, whose outcome must start with `prefix`.
    pub fn last_call_outcome(&self, prefix: &str) -> serde_json::Value {
        let call = self.last_event("capability-call");
        let outcome = call["outcome"].as_str().unwrap_or("");
        assert!(outcome.starts_with(prefix), "expected {prefix:?}: {call}");
        call
    }

    pub fn audit_verifies(&self) {
        ok(&["audit", "verify", "--dir", s(&self.station())]);
    }
}

/// The station in `dir`, opened in this (test) process, whose run workers are the real
/// `amicus __run-worker` (not this test binary).
pub fn station(dir: &Path) -> amicus_runtime::station::Station {
    amicus_runtime::station::Station::open(dir)
        .expect("a station")
        .with_worker(amicus_runtime::worker::WorkerCommand {
            program: PathBuf::from(env!("CARGO_BIN_EXE_amicus")),
            args: vec![amicus_runtime::worker::SUBCOMMAND.into()],
        })
}

/// The Python of the venv `scripts/setup.sh` makes (pydicom, numpy, rdflib), or `AMICUS_PYTHON`.
pub fn python() -> Option<PathBuf> {
    let p = std::env::var_os("AMICUS_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(&std::env::var("HOME").unwrap_or_default())
                .join(".cache/amicus/venv/bin/python")
        });
    p.is_file().then_some(p)
}
