//! `amicus bench start`: how long a station takes to get a train going and through, on the
//! real path: verify, admit, compile (cold) or take the station's cached compilation (warm),
//! start the run worker (process, job over the pipe, index, Landlock, limits, seccomp), run,
//! release and audit. The same bundle also runs in-process (the sandbox without a worker) with
//! the same inputs, so the worker's own cost is measured in the same run. Writes JSON; the last
//! line states the headline against the goals (warm ≤ 20 ms, cold ≤ 1 s).

use amicus_bundle::{Bundle, Capability, SecretKey};
use amicus_runtime::sandbox::{CohortAccess, DeclaredModel, KernelAccess, RunRequest, Sandbox};
use amicus_runtime::station::Station;
use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(clap::Args)]
pub struct StartArgs {
    /// The train bundle (unsigned is fine: the bench signs a copy with a throw-away key).
    bundle: PathBuf,
    /// Parameters for the run (a JSON file).
    #[arg(long)]
    params: Option<PathBuf>,
    #[arg(long, default_value_t = 15)]
    iterations: usize,
    /// Patients in the synthetic archive the station indexes.
    #[arg(long, default_value_t = 12)]
    patients: usize,
    #[arg(long, default_value = "bench-start.json")]
    out: PathBuf,
}

/// Median, minimum and maximum of milliseconds.
fn spread(mut v: Vec<f64>) -> serde_json::Value {
    v.sort_by(f64::total_cmp);
    let median = v.get(v.len() / 2).copied().unwrap_or(0.0);
    serde_json::json!({
        "median": median,
        "min": v.first().copied().unwrap_or(0.0),
        "max": v.last().copied().unwrap_or(0.0),
        "n": v.len(),
    })
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

pub fn run(args: StartArgs) -> Result<()> {
    let iterations = args.iterations.max(1);
    let params = args
        .params
        .as_ref()
        .map(|p| std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display())))
        .transpose()?;
    let tmp = tempfile::tempdir()?;
    let key = SecretKey::generate()?;
    let mut bundle = Bundle::read(&args.bundle)?;
    bundle.sign(&key, "author");
    let signed = tmp.path().join("signed.train");
    bundle.write(&signed)?;

    eprintln!(
        "bench start: a synthetic archive of {} patients, indexed",
        args.patients
    );
    let archive = tmp.path().join("archive");
    amicus_synth::generate(&archive, "bench", args.patients, 1, "academic", |_, _| {})?;
    let dir = tmp.path().join("station");
    let st = Station::init(&dir, &archive, Some("bench"))?;
    st.index(|_| {})?;
    let mut policy = st.policy()?;
    policy.allowed_capabilities =
        vec![Capability::Cohort, Capability::Imaging, Capability::Kernels];
    policy.cohort.min_patients = 1;
    policy.save(&dir)?;
    st.trust("bench", &key.public())?;
    st.approve(bundle.digest(), None)?;

    let cache = dir.join("cache");
    let run_once = |cold: bool| -> Result<(Duration, amicus_runtime::station::RunRecord)> {
        if cold {
            let _ = std::fs::remove_dir_all(&cache);
        }
        let t = Instant::now();
        let record = st
            .run(&signed, params.as_deref(), Box::new(|_, _| {}))
            .context("the benchmark run failed")?;
        Ok((t.elapsed(), record))
    };
    // Warm up (page cache, the compiled module), then interleave cold and warm runs so load
    // on the machine affects both alike.
    run_once(false)?;
    let cold_iterations = iterations.min(5);
    let (mut warm, mut cold, mut setup, mut guest, mut worker_run) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut peak = 0u64;
    let mut confinement = serde_json::Value::Null;
    for i in 0..iterations {
        if i < cold_iterations {
            let (d, r) = run_once(true)?;
            if r.compile != "compiled" {
                bail!("a cold run did not compile");
            }
            cold.push(ms(d));
        }
        let (d, r) = run_once(false)?;
        if r.compile != "cache" {
            bail!("a warm run did not use the cache");
        }
        warm.push(ms(d));
        setup.push(r.worker.setup_us as f64 / 1000.0);
        worker_run.push(r.worker.run_us as f64 / 1000.0);
        guest.push(r.wall_us as f64 / 1000.0);
        peak = peak.max(r.peak_memory_bytes);
        confinement = serde_json::json!({
            "landlock": r.worker.landlock,
            "seccomp": r.worker.seccomp,
            "memory_limit_bytes": r.worker.memory_limit_bytes,
            "gaps": r.worker.gaps,
        });
    }

    // The same run without a worker: the sandbox in this process, the same inputs.
    let in_process = in_process(&bundle, &dir, &archive, params.as_deref(), iterations)?;

    let warm_s = spread(warm);
    let cold_s = spread(cold);
    let warm_ms = warm_s["median"].as_f64().unwrap_or(0.0);
    let cold_ms = cold_s["median"].as_f64().unwrap_or(0.0);
    let report = serde_json::json!({
        "bench": "start",
        "train": bundle.subject_name(),
        "iterations": iterations,
        "patients": args.patients,
        "station_run_ms": {
            "warm": warm_s,
            "cold": cold_s,
        },
        "worker_ms": {
            "setup": spread(setup),
            "run": spread(worker_run),
            "guest": spread(guest),
        },
        "in_process_run_ms": in_process,
        "worker_peak_rss_bytes": peak,
        "confinement": confinement,
        "goals": {
            "warm_ms": 20,
            "cold_ms": 1000,
            "warm_met": warm_ms <= 20.0,
            "cold_met": cold_ms <= 1000.0,
        },
    });
    let text = serde_json::to_string_pretty(&report)?;
    std::fs::write(&args.out, &text).with_context(|| format!("writing {}", args.out.display()))?;
    println!("{text}");
    eprintln!("wrote {}", args.out.display());
    println!("start: warm {warm_ms:.1} ms, cold {cold_ms:.0} ms (goals 20 ms, 1000 ms)");
    Ok(())
}

/// Median (and spread) of the bundle's run in this process: compile from the cache and run
/// with the index, archive and models handed over directly, no worker.
fn in_process(
    bundle: &Bundle,
    station: &Path,
    archive: &Path,
    params: Option<&str>,
    iterations: usize,
) -> Result<serde_json::Value> {
    let m = bundle.manifest();
    let sandbox = Sandbox::new(Some(&station.join("cache")))?;
    let index_dir = amicus_index::index_dir(station);
    let index = Arc::new(amicus_index::Index::load(
        &index_dir.join(amicus_index::scan::GRAPH_FILE),
    )?);
    let mut state = amicus_index::scan::archive_state(&index_dir);
    if let Some(s) = &mut state {
        s.archive = archive.to_path_buf();
    }
    let state = state.map(Arc::new);
    let policy = amicus_runtime::policy::Policy::load(station)?;
    let mut times = Vec::new();
    for _ in 0..iterations {
        let t = Instant::now();
        let (component, _) = sandbox.compile(bundle.component())?;
        let granted: std::collections::BTreeSet<Capability> =
            m.capabilities.iter().copied().collect();
        let kernels = granted
            .contains(&Capability::Kernels)
            .then(|| KernelAccess {
                models: m
                    .models
                    .iter()
                    .filter_map(|d| {
                        Some((
                            d.file.clone(),
                            DeclaredModel {
                                trainable: d.role == amicus_bundle::manifest::ModelRole::Trainable,
                                loss: d.loss.clone(),
                                bytes: Arc::new(bundle.file(&d.file)?.to_vec()),
                            },
                        ))
                    })
                    .collect(),
                threads: std::thread::available_parallelism()
                    .map_or(1, |n| n.get())
                    .min(4),
                device: policy.kernels.device.kernels(),
                caps: policy.kernels.model_caps(),
            });
        let report = sandbox.run(
            &component,
            RunRequest {
                manifest: m,
                granted: granted.clone(),
                params: params.unwrap_or("{}").to_string(),
                fuel: m.limits.fuel,
                memory_bytes: (m.limits.memory_mib as usize) << 20,
                wall: Duration::from_secs(m.limits.wall_seconds.into()),
                output_max_bytes: policy.outputs.max_bytes,
                output_max_total: policy.outputs.max_total_bytes,
                log_cap: 1 << 20,
                seed: [0; 32],
                progress: Box::new(|_, _| {}),
                on_call: None,
                cohort: granted.contains(&Capability::Cohort).then(|| CohortAccess {
                    index: index.clone(),
                    limits: amicus_runtime::station::query_limits(&policy.cohort),
                    queries_left: policy.cohort.max_queries_per_run,
                    noisy_tallies_left: u64::MAX,
                }),
                imaging: if granted.contains(&Capability::Imaging) {
                    state.clone()
                } else {
                    None
                },
                kernels,
                federated: None,
            },
        )?;
        if report.outcome != amicus_runtime::sandbox::Outcome::Succeeded {
            bail!("the in-process run did not succeed: {:?}", report.outcome);
        }
        times.push(ms(t.elapsed()));
    }
    Ok(spread(times))
}
