//! The run worker process: `amicus __run-worker`, started by the station for one run.
//!
//! It reads its [`Job`] and blobs from stdin, opens the few files it needs (the station's
//! compilation of the component, the index), confines itself (see `confine`), sets up the
//! sandbox and runs the train, streaming progress and capability calls to the station and
//! finishing with the outputs. It never sees a key: the station's signing key, the
//! pseudonymisation key and the policy stay with the station, which writes the audit log from
//! these reports.

use super::confine::{self, FsGrants};
use super::protocol::{
    self, CompileJob, Confinement, Finished, Job, KernelsJob, MAX_JSON, Report, Request,
    UpdateMeta, WorkerLimits,
};
use crate::sandbox::{
    CallEvent, CohortAccess, DeclaredModel, FederatedRound, KernelAccess, RunRequest, Sandbox,
    SandboxError,
};
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Exit status of a worker that could not set up (the reason went to the station).
const EXIT_SETUP: i32 = 3;

/// The start of the set-up failure of a cache entry that does not load: the station removes
/// the entry, and the next run compiles again.
pub const CACHE_UNLOADABLE: &str = "the compiled component does not load";

/// The event pipe (the worker's original stdout), shared by the run's callbacks.
#[derive(Clone)]
struct Events(Arc<Mutex<File>>);

impl Events {
    fn send(&self, report: &Report) {
        let mut f = self.0.lock().unwrap_or_else(|p| p.into_inner());
        // A station that stopped listening kills the worker; nothing to do about an error here.
        let _ = protocol::write_json(&mut *f, report);
    }

    fn send_blobs(&self, report: &Report, blobs: &[&[u8]]) {
        let mut f = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if protocol::write_json(&mut *f, report).is_err() {
            return;
        }
        for b in blobs {
            if protocol::write_blob(&mut *f, b).is_err() {
                return;
            }
        }
    }
}

/// The worker's `main`: never returns.
pub fn main() -> ! {
    let events = match take_event_pipe() {
        Ok(f) => Events(Arc::new(Mutex::new(f))),
        Err(e) => {
            eprintln!("amicus run worker: {e}");
            std::process::exit(EXIT_SETUP);
        }
    };
    match run(&events) {
        Ok(()) => std::process::exit(0),
        Err(reason) => {
            events.send(&Report::SetupFailed {
                reason: reason.clone(),
            });
            eprintln!("amicus run worker: {reason}");
            std::process::exit(EXIT_SETUP);
        }
    }
}

/// Move the event pipe off fd 1 (and make fd 1 the captured stderr), so nothing a library
/// prints can corrupt the protocol; die with the station.
fn take_event_pipe() -> Result<File, String> {
    #[cfg(unix)]
    {
        use std::os::fd::FromRawFd;
        // SAFETY: plain fd and prctl calls on this process's own descriptors.
        unsafe {
            #[cfg(target_os = "linux")]
            {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
                // The station died before the line above: the worker was re-parented. The
                // station names its own pid (it is pid 1 itself as a container's entry point).
                let station = std::env::args()
                    .find_map(|a| {
                        a.strip_prefix(super::supervise::PARENT_ARG)
                            .map(str::to_string)
                    })
                    .and_then(|p| p.parse::<libc::pid_t>().ok());
                let parent = libc::getppid();
                if station.map_or(parent == 1, |s| s != parent) {
                    return Err("the station is gone".into());
                }
            }
            let fd = libc::fcntl(1, libc::F_DUPFD_CLOEXEC, 3);
            if fd < 0 {
                return Err(format!("event pipe: {}", std::io::Error::last_os_error()));
            }
            if libc::dup2(2, 1) < 0 {
                return Err(format!("stdout: {}", std::io::Error::last_os_error()));
            }
            Ok(File::from_raw_fd(fd))
        }
    }
    #[cfg(not(unix))]
    {
        Err("the run worker needs a Unix system".into())
    }
}

fn run(events: &Events) -> Result<(), String> {
    let mut stdin = std::io::stdin().lock();
    let request: Request =
        protocol::read_json(&mut stdin, MAX_JSON).map_err(|e| format!("request: {e}"))?;
    match request {
        Request::Compile(job) => compile(events, &job, &mut stdin),
        Request::Run(job) => run_train(events, &job, &mut stdin),
    }
}

/// Compile a component the station could not yet trust: Cranelift on untrusted input, under
/// the same rules as a run (nothing readable), with the compiler's own memory limit.
fn compile(events: &Events, job: &CompileJob, stdin: &mut impl Read) -> Result<(), String> {
    let wasm = protocol::read_blob(stdin, amicus_bundle::bundle::MAX_BUNDLE_BYTES)
        .map_err(|e| format!("component: {e}"))?;
    let mut status = File::open("/proc/self/status").ok();
    let sandbox = Sandbox::new(None).map_err(|e| e.to_string())?;
    // Nothing to read: the component is in memory.
    let (landlock, threads) = restrict_files(&FsGrants::default());
    let confinement = confine_rest(
        landlock,
        threads,
        &mut status,
        job.memory_bytes,
        &job.limits,
    );
    events.send(&Report::Ready { confinement });
    match sandbox.precompile(&wasm) {
        Ok(bytes) => events.send_blobs(&Report::Compiled, &[&bytes]),
        Err(e) => events.send(&Report::Refused {
            reason: e.to_string(),
        }),
    }
    Ok(())
}

/// The filesystem rules (Landlock), applied while the worker has one thread: their status and
/// the thread count.
fn restrict_files(grants: &FsGrants) -> (String, u32) {
    let threads = confine::threads();
    if threads > 1 {
        eprintln!(
            "amicus run worker: threads before confinement: {}",
            confine::thread_names().join(", ")
        );
    }
    (confine::landlock(grants), threads)
}

/// The rest, in order (see `confine`): resource limits over the baseline now, capabilities,
/// seccomp. Returns what held, with the filesystem rules' status.
fn confine_rest(
    landlock: String,
    threads_at_restriction: u32,
    status: &mut Option<File>,
    memory_bytes: u64,
    limits: &WorkerLimits,
) -> Confinement {
    let baseline = read_status(status)
        .and_then(|s| confine::status_field(&s, "VmData:"))
        .unwrap_or(0);
    let memory_limit = baseline
        .saturating_add(memory_bytes)
        .saturating_add(limits.memory_slack_bytes);
    let mut gaps = Vec::new();
    let (memory_limit_bytes, cpu_limit_seconds) =
        match confine::set_limits(memory_limit, limits.cpu_seconds) {
            Ok(()) => (memory_limit, limits.cpu_seconds),
            Err(e) => {
                gaps.push(format!("resource limits not set: {e}"));
                (0, 0)
            }
        };
    let capabilities_dropped = confine::drop_capabilities();
    let seccomp = confine::seccomp();
    with_gaps(Confinement {
        landlock,
        seccomp,
        memory_limit_bytes,
        cpu_limit_seconds,
        threads_at_restriction,
        capabilities_dropped,
        gaps,
    })
}

fn run_train(events: &Events, job: &Job, stdin: &mut impl Read) -> Result<(), String> {
    let manifest = amicus_bundle::Manifest::parse_canonical(job.manifest.as_bytes())
        .map_err(|e| format!("manifest: {e}"))?;
    let mut models = Vec::new();
    if let Some(k) = &job.kernels {
        for m in &k.models {
            let bytes = protocol::read_blob(stdin, k.max_model_bytes)
                .map_err(|e| format!("model {}: {e}", m.file))?;
            models.push(bytes);
        }
    }
    let global = match &job.federated {
        Some(_) => {
            let bytes = protocol::read_blob(stdin, u64::from(u32::MAX))
                .map_err(|e| format!("global weights: {e}"))?;
            Some(
                amicus_fl::wire::Weights::decode(&bytes)
                    .map_err(|e| format!("global weights: {e}"))?,
            )
        }
        None => None,
    };

    // Everything read from the station's directory is opened now, before the rules apply.
    let component =
        std::fs::read(&job.component).map_err(|e| format!("{}: {e}", job.component.display()))?;
    let graph = job
        .cohort
        .as_ref()
        .map(|c| File::open(&c.graph).map_err(|e| format!("{}: {e}", c.graph.display())))
        .transpose()?;
    let state = job
        .imaging
        .as_ref()
        .map(|i| File::open(&i.state).map_err(|e| format!("{}: {e}", i.state.display())))
        .transpose()?;
    let mut status = File::open("/proc/self/status").ok();
    // ONNX Runtime's library is loaded at the train's first kernels call, after the rules
    // apply (which let the loader read it and the system's libraries), so that every thread it
    // starts is confined too.
    let device = job.kernels.as_ref().map(|k| device_of(&k.device));

    let grants = grants(job);
    // The rules bind from here on (the files above stay open); set-up is done under them.
    let (landlock, threads_at_restriction) = restrict_files(&grants);

    // Set up the run: parse the index, load the component, hand the models over.
    let sandbox = Sandbox::new(None).map_err(|e| e.to_string())?;
    // SAFETY: `job.component` is the station's own cache entry for this component, written by
    // the station from a compile worker of this binary (`Sandbox::precompile`); the worker read
    // it before anything of the train ran, and is confined like the train if it is not.
    let component = unsafe { sandbox.load_compiled(&component) }
        .map_err(|e| format!("{CACHE_UNLOADABLE}: {e}"))?;
    let cohort = match (graph, &job.cohort) {
        (Some(file), Some(c)) => Some(CohortAccess {
            index: Arc::new(
                amicus_index::Index::from_reader(BufReader::new(file))
                    .map_err(|e| format!("the index: {e}"))?,
            ),
            limits: amicus_index::QueryLimits {
                max_query_bytes: usize::try_from(c.max_query_bytes).unwrap_or(usize::MAX),
                max_rows: usize::try_from(c.max_rows).unwrap_or(usize::MAX),
                timeout: Duration::from_millis(c.timeout_ms),
                min_patients: c.min_patients,
                max_intermediate: usize::try_from(c.max_intermediate).unwrap_or(usize::MAX),
                tally_noise: (c.tally_epsilon > 0.0).then_some(amicus_index::query::TallyNoise {
                    epsilon: c.tally_epsilon,
                    cells_per_patient: c.tally_cells_per_patient,
                }),
            },
            queries_left: c.max_queries,
            noisy_tallies_left: c.max_noisy_tallies,
        }),
        _ => None,
    };
    let imaging = match (state, &job.imaging) {
        (Some(file), Some(i)) => {
            amicus_index::scan::archive_state_from(BufReader::new(file)).map(|mut s| {
                s.archive = i.archive.clone();
                Arc::new(s)
            })
        }
        _ => None,
    };
    let kernels = job
        .kernels
        .as_ref()
        .map(|k| kernel_access(k, models, device));
    let federated = match (&job.federated, global) {
        (Some(r), Some(global)) => Some(FederatedRound {
            job: r.job.clone(),
            number: r.number,
            rounds: r.rounds,
            proximal_mu: r.proximal_mu,
            global: Arc::new(global),
            // The station encodes, clips and noises; the worker only sizes the update.
            encoding: r.encoding,
            clip_norm: None,
            noise_multiplier: None,
        }),
        _ => None,
    };

    // Limits: the baseline now (the engine, the index, the component) plus the run's memory.
    // The models count against the run's own memory: they were read into this baseline.
    let models_bytes: u64 = kernels
        .as_ref()
        .map_or(0, |k| k.models.values().map(|m| m.bytes.len() as u64).sum());
    let confinement = confine_rest(
        landlock,
        threads_at_restriction,
        &mut status,
        job.memory_bytes.saturating_sub(models_bytes),
        &job.limits,
    );
    events.send(&Report::Ready { confinement });

    let seed = decode_seed(&job.seed)?;
    let progress_events = events.clone();
    let call_events = events.clone();
    let result = sandbox.run(
        &component,
        RunRequest {
            manifest: &manifest,
            granted: job.granted.iter().copied().collect(),
            params: job.params.clone(),
            fuel: job.fuel,
            memory_bytes: usize::try_from(job.memory_bytes).unwrap_or(usize::MAX),
            wall: Duration::from_millis(job.wall_ms),
            output_max_bytes: job.output_max_bytes,
            output_max_total: job.output_max_total,
            log_cap: usize::try_from(job.log_cap).unwrap_or(usize::MAX),
            seed,
            progress: Box::new(move |fraction, message| {
                progress_events.send(&Report::Progress {
                    fraction,
                    message: message.to_string(),
                })
            }),
            on_call: Some(Box::new(move |event| match event {
                CallEvent::Begin {
                    capability,
                    call,
                    detail,
                } => call_events.send(&Report::Calling {
                    capability: capability.to_string(),
                    call: call.to_string(),
                    detail: detail.to_string(),
                }),
                CallEvent::Done(call) => call_events.send(&Report::Call { call: call.clone() }),
            })),
            cohort,
            imaging,
            kernels,
            federated,
        },
    );
    let report = match result {
        Ok(r) => r,
        Err(SandboxError::NotATrain(reason) | SandboxError::ForbiddenImport { reason, .. }) => {
            events.send(&Report::Refused { reason });
            return Ok(());
        }
        Err(e) => return Err(e.to_string()),
    };
    let peak_rss_bytes = read_status(&mut status)
        .and_then(|s| confine::status_field(&s, "VmHWM:"))
        .unwrap_or(0);
    let update_bytes = report.update.as_ref().map(|u| {
        amicus_fl::wire::Update {
            samples: u.samples,
            delta: u.delta.clone(),
        }
        .encode(amicus_fl::wire::Encoding::Fp32)
    });
    let update_bytes = match update_bytes {
        Some(Ok(b)) => Some(b),
        Some(Err(e)) => return Err(format!("the update: {e}")),
        None => None,
    };
    let finished = Finished {
        outcome: report.outcome,
        fuel_used: report.fuel_used,
        wall_us: u64::try_from(report.wall.as_micros()).unwrap_or(u64::MAX),
        budget_peak_bytes: report.peak_memory_bytes,
        peak_rss_bytes,
        log_lines: report.log.lines,
        dropped_lines: report.log.dropped_lines,
        outputs: report.outputs.iter().map(|(n, _)| n.clone()).collect(),
        update: report.update.as_ref().map(|u| UpdateMeta {
            samples: u.samples,
            values: u.delta.len() as u64,
        }),
    };
    let mut blobs: Vec<&[u8]> = vec![&report.log.stdout];
    blobs.extend(report.outputs.iter().map(|(_, d)| d.as_slice()));
    if let Some(b) = &update_bytes {
        blobs.push(b);
    }
    events.send_blobs(&Report::Finished(finished), &blobs);
    Ok(())
}

/// Re-read `/proc/self/status` through the descriptor opened before the rules applied.
fn read_status(status: &mut Option<File>) -> Option<String> {
    use std::io::Seek;
    let f = status.as_mut()?;
    f.rewind().ok()?;
    let mut text = String::new();
    f.read_to_string(&mut text).ok()?;
    Some(text)
}

/// What the worker may read once the train runs.
fn grants(job: &Job) -> FsGrants {
    let mut g = FsGrants::default();
    if let Some(i) = &job.imaging {
        g.read.push(i.archive.clone());
    }
    if let Some(k) = &job.kernels {
        if let Some(dir) = amicus_kernels::library_path().parent() {
            g.read_exec.push(dir.to_path_buf());
        }
        // The dynamic loader resolves ONNX Runtime's dependencies (libstdc++, libm, …) from
        // the system's library folders through its cache.
        for p in [
            "/lib",
            "/lib64",
            "/usr/lib",
            "/usr/lib64",
            "/etc/ld.so.cache",
        ] {
            g.read_exec.push(PathBuf::from(p));
        }
        // ONNX Runtime reads the processor's description to size its thread pools.
        g.read.push(PathBuf::from("/proc/cpuinfo"));
        g.read.push(PathBuf::from("/sys/devices/system/cpu"));
        if k.device != "cpu" {
            // The CUDA provider is a library ONNX Runtime loads when a session asks for it,
            // with the CUDA libraries and the driver's device files.
            g.read_exec.push(PathBuf::from("/usr/local/cuda"));
            if let Ok(dir) = std::fs::read_dir("/dev") {
                for e in dir.flatten() {
                    if e.file_name().to_string_lossy().starts_with("nvidia") {
                        g.devices.push(e.path());
                    }
                }
            }
            g.read.push(PathBuf::from("/proc/driver/nvidia"));
        }
    }
    g
}

fn with_gaps(mut c: Confinement) -> Confinement {
    if !c.landlock.starts_with("enforced") {
        c.gaps
            .push("filesystem and network rules (Landlock) do not fully hold".into());
    }
    if c.seccomp != "enforced" {
        c.gaps.push("no syscall filter (seccomp)".into());
    }
    if c.threads_at_restriction > 1 {
        c.gaps.push(format!(
            "{} threads existed when the filesystem rules applied; only one is bound",
            c.threads_at_restriction
        ));
    }
    c
}

fn device_of(name: &str) -> amicus_kernels::Device {
    match name {
        "cuda" => amicus_kernels::Device::Cuda,
        "auto" => amicus_kernels::Device::Auto,
        _ => amicus_kernels::Device::Cpu,
    }
}

fn kernel_access(
    k: &KernelsJob,
    models: Vec<Vec<u8>>,
    device: Option<amicus_kernels::Device>,
) -> KernelAccess {
    KernelAccess {
        models: k
            .models
            .iter()
            .zip(models)
            .map(|(m, bytes)| {
                (
                    m.file.clone(),
                    DeclaredModel {
                        trainable: m.trainable,
                        loss: m.loss.clone(),
                        bytes: Arc::new(bytes),
                    },
                )
            })
            .collect(),
        threads: k.threads.max(1),
        device: device.unwrap_or_default(),
        caps: amicus_autodiff::loadable::Caps {
            max_bytes: k.max_model_bytes,
            max_nodes: k.max_nodes,
        },
    }
}

fn decode_seed(hex_seed: &str) -> Result<[u8; 32], String> {
    let bytes = hex::decode(hex_seed).map_err(|e| format!("seed: {e}"))?;
    bytes
        .try_into()
        .map_err(|_| "seed: not 32 bytes".to_string())
}

impl WorkerLimits {
    /// Limits for a run of `wall` seconds with `threads` ONNX Runtime threads.
    pub fn for_run(wall_seconds: u64, threads: u64, slack_bytes: u64, setup_seconds: u64) -> Self {
        WorkerLimits {
            memory_slack_bytes: slack_bytes,
            cpu_seconds: wall_seconds
                .saturating_mul(threads.max(1))
                .saturating_add(setup_seconds),
        }
    }
}
