//! `amicus bench`: the measurements (not tests) and their shared helpers. Each bench is a file
//! of its own: `bench start` in `bench_start.rs`, `bench index` in `bench_index.rs`,
//! `bench imaging` in `bench_imaging.rs`, `bench registry`, `bench fl`, `bench train`.

use anyhow::{Result, bail};
use std::path::PathBuf;

#[derive(clap::Subcommand)]
pub enum BenchCommand {
    /// A train's start and run on a real station (the run worker included), warm and cold,
    /// against the same run in-process.
    Start(crate::bench_start::StartArgs),
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
        BenchCommand::Start(args) => crate::bench_start::run(args),
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
