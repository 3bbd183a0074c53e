//! `amicus bench start`: how long it takes a station to get a train going (`bench index` is
//! in `bench_index.rs`, `bench imaging` in `bench_imaging.rs`).
//!
//! Measures, for one bundle: signature verification (read + hash + check), a cold compile,
//! loading the station's cached compilation, and a full run with the cached module
//! (instantiate + run). Writes JSON; asserts nothing. Figures are medians over iterations, with
//! ratios against the cold compile measured in the same run.

use amicus_bundle::{Bundle, SecretKey, TrustedKey};
use amicus_runtime::sandbox::{RunRequest, Sandbox};
use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[derive(clap::Subcommand)]
pub enum BenchCommand {
    /// Start-up costs of a train: verify, compile, cached load, run.
    Start {
        bundle: PathBuf,
        #[arg(long, default_value_t = 15)]
        iterations: usize,
        #[arg(long, default_value = "bench-start.json")]
        out: PathBuf,
    },
    /// Header indexing against pydicom, and cohort query latency on a large real index.
    Index(crate::bench_index::IndexArgs),
    /// Series → volume throughput against pydicom.
    Imaging(crate::bench_imaging::ImagingArgs),
    /// Registry request latency and throughput with many polling stations; task round trip.
    Registry(crate::bench_registry::RegistryArgs),
    /// Federated against centralised and local-only training: Dice, update bytes, time.
    Fl(crate::bench_fl::FlArgs),
    /// Training and inference samples/s of the U-Net and CNN against PyTorch CPU.
    Train(crate::bench_train::TrainArgs),
}

pub fn run(c: BenchCommand) -> Result<()> {
    match c {
        BenchCommand::Start {
            bundle,
            iterations,
            out,
        } => start(&bundle, iterations.max(1), &out),
        BenchCommand::Index(args) => crate::bench_index::run(args),
        BenchCommand::Imaging(args) => crate::bench_imaging::run(args),
        BenchCommand::Registry(args) => crate::bench_registry::run(args),
        BenchCommand::Fl(args) => crate::bench_fl::run(args),
        BenchCommand::Train(args) => crate::bench_train::run(args),
    }
}

/// `$HOME`.
pub(crate) fn home() -> PathBuf {
    PathBuf::from(std::env::var("HOME").unwrap_or_default())
}

/// The test venv's python (`scripts/setup.sh --test`), or `$AMICUS_PYTHON`, if present.
pub(crate) fn venv_python() -> Option<PathBuf> {
    let p = std::env::var_os("AMICUS_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| home().join(".cache/amicus/venv/bin/python"));
    p.is_file().then_some(p)
}

/// Median of seconds.
pub(crate) fn median_secs(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Run a Python baseline `script` that reads `input` (a file path, argv[1]) and a repetition
/// count (argv[2]) and prints its median seconds. `None` when there is no venv python.
pub(crate) fn python_baseline(script: &str, input: &str, reps: usize) -> Result<Option<f64>> {
    let Some(python) = venv_python() else {
        eprintln!("bench: no venv python (run scripts/setup.sh --test): pydicom baseline skipped");
        return Ok(None);
    };
    let list = tempfile::NamedTempFile::new()?;
    std::fs::write(list.path(), input)?;
    let out = std::process::Command::new(python)
        .args(["-c", script])
        .arg(list.path())
        .arg(reps.to_string())
        .output()?;
    if !out.status.success() {
        bail!(
            "python baseline failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(Some(String::from_utf8_lossy(&out.stdout).trim().parse()?))
}

fn median(mut v: Vec<Duration>) -> f64 {
    v.sort();
    v[v.len() / 2].as_secs_f64() * 1000.0
}

fn time<T>(f: impl FnOnce() -> Result<T>) -> Result<(Duration, T)> {
    let t = Instant::now();
    let r = f()?;
    Ok((t.elapsed(), r))
}

fn start(bundle_path: &Path, iterations: usize, out: &Path) -> Result<()> {
    let bundle_bytes = std::fs::metadata(bundle_path)?.len();
    // A throw-away signer, so verification does the real work.
    let key = SecretKey::generate()?;
    let mut signed = Bundle::read(bundle_path)?;
    signed.sign(&key, "author");
    let tmp = tempfile::tempdir()?;
    let signed_path = tmp.path().join("signed.train");
    signed.write(&signed_path)?;
    let trusted = [TrustedKey {
        name: "bench".into(),
        key: key.public(),
    }];

    let mut verify = Vec::new();
    for _ in 0..iterations {
        let (d, ok) = time(|| {
            let b = Bundle::read(&signed_path)?;
            Ok(b.check_signatures(&trusted, 1).satisfied())
        })?;
        if !ok {
            bail!("benchmark bundle did not verify");
        }
        verify.push(d);
    }

    let wasm = signed.component().to_vec();
    let no_cache = Sandbox::new(None)?;
    let cold_iters = iterations.min(5);
    let mut cold = Vec::new();
    for _ in 0..cold_iters {
        cold.push(time(|| Ok(no_cache.compile(&wasm)?))?.0);
    }

    let cache_dir = tmp.path().join("cache");
    let cached = Sandbox::new(Some(&cache_dir))?;
    cached.compile(&wasm)?; // populate
    let mut load = Vec::new();
    let mut runs = Vec::new();
    let manifest = signed.manifest().clone();
    let mut outcome = String::new();
    for _ in 0..iterations {
        let (d, (component, _)) = time(|| Ok(cached.compile(&wasm)?))?;
        load.push(d);
        let (d, report) = time(|| {
            Ok(cached.run(
                &component,
                RunRequest {
                    manifest: &manifest,
                    granted: manifest.capabilities.iter().copied().collect(),
                    params: "{}".into(),
                    fuel: manifest.limits.fuel,
                    memory_bytes: (manifest.limits.memory_mib as usize) << 20,
                    wall: Duration::from_secs(manifest.limits.wall_seconds.into()),
                    output_max_bytes: 16 << 20,
                    output_max_total: 64 << 20,
                    log_cap: 1 << 20,
                    seed: [0; 32],
                    progress: Box::new(|_, _| {}),
                    cohort: None,
                    imaging: None,
                    kernels: None,
                    federated: None,
                },
            )?)
        })?;
        outcome = report.outcome.label().to_string();
        runs.push(d);
    }

    let verify_ms = median(verify);
    let cold_ms = median(cold);
    let load_ms = median(load);
    let run_ms = median(runs);
    let cold_start_ms = verify_ms + cold_ms + run_ms;
    let warm_start_ms = verify_ms + load_ms + run_ms;
    let report = serde_json::json!({
        "bench": "start",
        "train": signed.subject_name(),
        "iterations": iterations,
        "bundle_bytes": bundle_bytes,
        "component_bytes": wasm.len(),
        "run_outcome": outcome,
        "median_ms": {
            "verify": verify_ms,
            "compile_cold": cold_ms,
            "load_cached": load_ms,
            "instantiate_and_run": run_ms,
            "cold_start": cold_start_ms,
            "warm_start": warm_start_ms,
        },
        "ratios": {
            "warm_start_over_cold_start": warm_start_ms / cold_start_ms,
            "load_cached_over_compile_cold": load_ms / cold_ms,
        },
        "goals": {
            "cold_start_under_1s": cold_start_ms < 1000.0,
            "warm_start_under_50ms": warm_start_ms < 50.0,
            "bundle_under_5MB": bundle_bytes < 5_000_000,
        },
    });
    let text = serde_json::to_string_pretty(&report)?;
    std::fs::write(out, &text).with_context(|| format!("writing {}", out.display()))?;
    println!("{text}");
    eprintln!("wrote {}", out.display());
    Ok(())
}
