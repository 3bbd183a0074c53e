//! `amicus demo`: the federated demo in one command. Three synthetic hospitals (non-IID:
//! profiles academic, community, legacy) become stations with FAIR indexes; a registry
//! (SQLite) and three station daemons start on loopback; a researcher signs the `fed-seg`
//! train, each data owner approves it, and a federated job trains one lesion-segmentation
//! U-Net; the demo ends with the per-round curves and final Dice in an HTML report, the bytes
//! each station sent, the privacy spent, and `audit verify` of every station through the
//! registry.
//!
//! Every step is the `amicus` command a person would type (this binary, run as a child
//! process), so the demo shows the real interfaces. Owns only the orchestration.

use crate::job::Report;
use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[derive(clap::Args)]
pub struct DemoArgs {
    /// Where everything goes (created; an earlier demo's directory is replaced).
    #[arg(long, default_value = "demo-fl")]
    out: PathBuf,
    /// A smoke run (12 patients per hospital, 3 short rounds): under 2 minutes.
    #[arg(long)]
    quick: bool,
    /// The fed-seg bundle (default: built from the repository's trains/fed-seg).
    #[arg(long)]
    train: Option<PathBuf>,
    /// Training rounds (default 12; 3 with --quick).
    #[arg(long)]
    rounds: Option<u32>,
    /// Mask every update (secure aggregation, threshold 2 of 3): the registry learns only
    /// each round's sum. Updates then travel fp32 (masking needs fixed point), not 8-bit.
    #[arg(long)]
    secure_aggregation: bool,
}

const MARKER: &str = ".amicus-demo";
const SITES: [(&str, &str, u64); 3] = [
    ("st1", "academic", 1),
    ("st2", "community", 2),
    ("st3", "legacy", 3),
];

/// Child processes (registry, daemons), stopped when the demo ends however it ends.
struct Children(Vec<Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn step(text: &str) {
    println!("\n\x1b[1m== {text}\x1b[0m");
}

struct Demo {
    exe: PathBuf,
    dir: PathBuf,
    url: String,
}

impl Demo {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// `amicus ARGS` in the demo directory, with the demo's registry and no input.
    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.exe);
        c.args(args)
            .current_dir(&self.dir)
            .env("AMICUS_REGISTRY", &self.url)
            .stdin(Stdio::null());
        c
    }

    /// `amicus ARGS` in the demo directory; its output shown, failure an error.
    fn run(&self, args: &[&str]) -> Result<()> {
        let status = self
            .command(args)
            .status()
            .with_context(|| format!("starting amicus {}", args.join(" ")))?;
        if !status.success() {
            bail!("`amicus {}` failed ({status})", args.join(" "));
        }
        Ok(())
    }

    /// `amicus ARGS`, quietly, returning stdout.
    fn output(&self, args: &[&str]) -> Result<String> {
        let out = self
            .command(args)
            .output()
            .with_context(|| format!("starting amicus {}", args.join(" ")))?;
        if !out.status.success() {
            bail!(
                "`amicus {}` failed:\n{}{}",
                args.join(" "),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn spawn(&self, args: &[&str], log: &str) -> Result<Child> {
        let log = std::fs::File::create(self.path(log))?;
        Ok(self
            .command(args)
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?)
    }
}

fn edit_policy(station: &Path, from: &str, to: &str) -> Result<()> {
    let path = station.join("policy.toml");
    let text = std::fs::read_to_string(&path)?;
    if !text.contains(from) {
        bail!("{} has no {from:?}", path.display());
    }
    std::fs::write(&path, text.replacen(from, to, 1))?;
    Ok(())
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Make `out` an empty directory we own: refuse to replace anything an earlier demo did not
/// write.
fn prepare(out: &Path) -> Result<PathBuf> {
    if out.exists() {
        let empty = std::fs::read_dir(out)?.next().is_none();
        if !empty && !out.join(MARKER).exists() {
            bail!(
                "{} exists and is not an earlier demo's directory; choose another --out",
                out.display()
            );
        }
        std::fs::remove_dir_all(out)?;
    }
    std::fs::create_dir_all(out)?;
    std::fs::write(out.join(MARKER), "written by amicus demo\n")?;
    Ok(std::fs::canonicalize(out)?)
}

pub fn run(args: DemoArgs) -> Result<()> {
    let started = Instant::now();
    amicus_kernels::available()
        .context("the demo trains on the stations with ONNX Runtime (run scripts/setup.sh)")?;
    let dir = prepare(&args.out)?;
    let port = free_port()?;
    let d = Demo {
        exe: std::env::current_exe()?,
        dir: dir.clone(),
        url: format!("http://127.0.0.1:{port}"),
    };
    let patients = if args.quick { "12" } else { "24" };
    let rounds = args.rounds.unwrap_or(if args.quick { 3 } else { 12 });
    let (local_steps, test_series) = if args.quick { (20, 1) } else { (8, 3) };

    step("researcher: keys and the signed fed-seg train");
    d.run(&["keygen", "--out", "alice.key"])?;
    d.run(&["keygen", "--x25519", "--out", "alice-results.key"])?;
    let bundle = d.path("fed-seg.train");
    match &args.train {
        Some(b) => {
            std::fs::copy(b, &bundle).with_context(|| format!("copying {}", b.display()))?;
        }
        None => {
            let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("../trains/fed-seg");
            if !source.join("train.toml").exists() {
                bail!("trains/fed-seg is not here; pass --train with a built fed-seg bundle");
            }
            d.run(&[
                "train",
                "build",
                &source.to_string_lossy(),
                "--out",
                "fed-seg.train",
            ])?;
        }
    }
    d.run(&[
        "train",
        "sign",
        "fed-seg.train",
        "--key",
        "alice.key",
        "--role",
        "author",
    ])?;

    step(&format!(
        "three hospitals ({patients} synthetic patients each, profiles academic, community, legacy): stations and FAIR indexes"
    ));
    for (name, profile, seed) in SITES {
        let archive = format!("archive-{name}");
        d.output(&[
            "synth",
            "--out",
            &archive,
            "--site",
            &format!("{name} hospital"),
            "--patients",
            patients,
            "--seed",
            &seed.to_string(),
            "--profile",
            profile,
        ])?;
        d.output(&[
            "station",
            "init",
            "--dir",
            name,
            "--archive",
            &archive,
            "--name",
            name,
        ])?;
        d.output(&["station", "index", "--dir", name])?;
        let st = d.path(name);
        edit_policy(
            &st,
            "allowed_capabilities = [\"cohort\"]",
            "allowed_capabilities = [\"cohort\", \"imaging\", \"kernels\"]",
        )?;
        if args.quick {
            // Twelve patients: the data owners accept cohorts of three for the smoke run.
            edit_policy(&st, "min_patients = 10", "min_patients = 3")?;
        }
        d.output(&["station", "trust", "--dir", name, "alice.pub"])?;
        // The same key signs alice's requests; the data owner trusts her as a researcher.
        d.output(&[
            "station",
            "trust",
            "--researcher",
            "--name",
            "alice",
            "--dir",
            name,
            "alice.pub",
        ])?;
        d.output(&["station", "approve", "--dir", name, "fed-seg.train"])?;
        println!(
            "{name}: {profile} hospital indexed; the data owner allowed imaging and training and approved fed-seg"
        );
    }

    step(&format!(
        "registry on {} (SQLite) and three station daemons (they only connect out)",
        d.url
    ));
    let db = "sqlite://registry.db";
    d.output(&[
        "registry",
        "user",
        "add",
        "--db",
        db,
        "--name",
        "root",
        "--role",
        "admin",
        "--token-out",
        "root.token",
    ])?;
    d.output(&[
        "registry",
        "user",
        "add",
        "--db",
        db,
        "--name",
        "alice",
        "--role",
        "researcher",
        "--enc-key",
        "alice-results.pub",
        "--token-out",
        "alice.token",
    ])?;
    d.output(&[
        "registry",
        "user",
        "add",
        "--db",
        db,
        "--name",
        "audrey",
        "--role",
        "auditor",
        "--token-out",
        "audrey.token",
    ])?;
    let mut children = Children(Vec::new());
    children.0.push(d.spawn(
        &[
            "registry",
            "serve",
            "--db",
            db,
            "--listen",
            &format!("127.0.0.1:{port}"),
        ],
        "registry.log",
    )?);
    let t0 = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if t0.elapsed() > Duration::from_secs(30) {
            bail!(
                "the registry did not start; see {}",
                d.path("registry.log").display()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    for (name, _, _) in SITES {
        d.output(&[
            "registry",
            "station",
            "add",
            "--token-file",
            "root.token",
            "--name",
            name,
            "--key",
            &format!("{name}/station.pub"),
        ])?;
        children.0.push(d.spawn(
            &[
                "station",
                "serve",
                "--dir",
                name,
                "--registry",
                &d.url,
                "--poll-wait",
                "2",
            ],
            &format!("daemon-{name}.log"),
        )?);
    }

    let (updates, plan_extra) = if args.secure_aggregation {
        (
            "masked updates (secure aggregation, threshold 2)",
            "\"encoding\": \"fp32\", \"secure_aggregation\": {\"threshold\": 2, \"exchange_seconds\": 60}",
        )
    } else {
        ("8-bit updates", "\"encoding\": \"q8\"")
    };
    step(&format!(
        "researcher: a federated job, {rounds} rounds, {updates}, quorum 2 of 3"
    ));
    d.run(&[
        "train",
        "push",
        "--token-file",
        "alice.token",
        "fed-seg.train",
    ])?;
    std::fs::write(
        d.path("plan.json"),
        format!(
            "{{\"rounds\": {rounds}, \"min_stations\": 2, \"round_seconds\": 900, \"strategy\": {{\"kind\": \"fed-avg\"}}, {plan_extra}, \"evaluate_final\": true}}\n"
        ),
    )?;
    std::fs::write(
        d.path("params.json"),
        format!(
            "{{\"local_steps\": {local_steps}, \"batch\": 8, \"test_series\": {test_series}}}\n"
        ),
    )?;
    let job: serde_json::Value = serde_json::from_str(&d.output(&[
        "job",
        "create",
        "--token-file",
        "alice.token",
        "--train",
        "fed-seg.train",
        "--station",
        "st1",
        "--station",
        "st2",
        "--station",
        "st3",
        "--plan",
        "plan.json",
        "--params",
        "params.json",
        "--sign-key",
        "alice.key",
        "--recipient-key",
        "alice-results.pub",
        "--json",
    ])?)?;
    let id = job["id"].as_str().context("job id")?.to_string();
    println!("job {id}");
    d.run(&[
        "job",
        "show",
        "--token-file",
        "alice.token",
        &id,
        "--wait",
        "60m",
    ])?;

    step("researcher: open every round's sealed metrics; the HTML report; the final weights");
    d.run(&[
        "job",
        "report",
        "--token-file",
        "alice.token",
        &id,
        "--key",
        "alice-results.key",
        "--out",
        "report",
    ])?;
    d.run(&[
        "job",
        "weights",
        "--token-file",
        "alice.token",
        &id,
        "--out",
        "final.weights",
    ])?;

    step("auditor: every station's log, verified through the registry (keys pinned)");
    for (name, _, _) in SITES {
        d.run(&[
            "audit",
            "verify",
            "--token-file",
            "audrey.token",
            "--station",
            name,
            "--key",
            &format!("{name}/station.pub"),
        ])?;
    }
    d.output(&["registry", "audit", "--token-file", "audrey.token"])
        .map(|trail| std::fs::write(d.path("registry-trail.txt"), trail))??;
    drop(children);

    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(d.path("report/report.json"))?)?;
    summary(&report, rounds, started.elapsed())?;
    if args.secure_aggregation {
        println!(
            "every update left its station masked: the registry unmasked only each round's sum (registry-trail.txt has the exchanges)"
        );
    }
    println!("\nreport: {}", d.path("report/report.html").display());
    Ok(())
}

/// The closing table: per site, the test Dice of the initial and the final global weights,
/// the bytes sent and the privacy spent.
fn summary(report: &serde_json::Value, rounds: u32, wall: Duration) -> Result<()> {
    let r: Report = serde_json::from_value(report.clone())?;
    let dice = |station: &str, round: u32| {
        r.per_round
            .iter()
            .find(|p| p.station == station && p.round == round)
            .and_then(|p| p.metrics.as_ref()?.get("test_dice_global")?.as_f64())
    };
    println!(
        "\n{:<6} {:>13} {:>13} {:>14} {:>18}",
        "site", "Dice before", "Dice after", "bytes sent", "privacy"
    );
    let mut after = Vec::new();
    for s in &r.stations {
        let bytes = r.bytes_sent.iter().find(|(n, _)| n == s).map_or(0, |x| x.1);
        let privacy = match &r.privacy {
            None => "no noise in plan".to_string(),
            Some(v) => v
                .iter()
                .find(|(n, _, _)| n == s)
                .map(|(_, e, d)| format!("ε {e:.2} (δ {d})"))
                .unwrap_or_default(),
        };
        let fmt = |x: Option<f64>| x.map_or("–".to_string(), |v| format!("{v:.3}"));
        let a = dice(s, rounds + 1);
        after.extend(a);
        println!(
            "{:<6} {:>13} {:>13} {:>14} {:>18}",
            s,
            fmt(dice(s, 1)),
            fmt(a),
            bytes,
            privacy
        );
    }
    let mean = after.iter().sum::<f64>() / after.len().max(1) as f64;
    println!(
        "\nfederated U-Net: mean test Dice {mean:.3} over {} site(s) after {rounds} round(s); demo took {:.0} s",
        after.len(),
        wall.as_secs_f64()
    );
    Ok(())
}
