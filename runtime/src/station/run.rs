//! A run, stage by stage: **verify** (read the bundle within its size cap, check its
//! integrity, audit `train-received`) → **admit** (policy, parameters, a federated round's
//! privacy budget) → **prepare** (compile into the station's cache, check imports, gather what
//! the run may use into the worker's job) → **execute** (in a run worker process: audit
//! `run-started`, `worker-started` and every capability call as it is reported) → **release**
//! (the station applies the output rules again to what the worker handed back, clips, noises
//! and encodes a federated update and spends its privacy, writes the outputs, the run record
//! and `run-finished`). A refusal at any stage is audited with its stage and reason, and
//! nothing is released. Output file names come from the manifest's declarations and run ids
//! from the station, never from the guest or the worker.

use super::{
    CACHE_DIR, HELD_DIR, MAX_PARAMS_BYTES, OUTPUTS_DIR, RUNS_DIR, ReleasedOutput, RunRecord,
    Station, StationError, io, query_limits,
};
use crate::audit::{AuditLog, Event};
use crate::policy::{Admission, Policy, Refusal};
use crate::privacy::Ledger;
use crate::sandbox::gate::OutputGate;
use crate::sandbox::{
    CompileSource, FederatedRound, Outcome, ProgressSink, Sandbox, SandboxError, UPDATE_OUTPUT,
    run_seed,
};
use crate::worker::WorkerCommand;
use crate::worker::protocol::{
    CohortJob, CompileJob, ImagingJob, Job, KernelsJob, ModelJob, Request, RoundJob, WorkerLimits,
};
use crate::worker::supervise::{self, Spawn, Step, WorkerEnd};
use amicus_bundle::{Bundle, Capability, Digest, sha256};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// A bundle that passed verification.
struct Received {
    bundle: Bundle,
    bundle_sha256: Digest,
}

/// A bundle the policy admitted, with its run's parameters.
struct Admitted {
    received: Received,
    policy: Policy,
    admission: Admission,
    params: String,
    /// The approval scope that admitted the run.
    approval_scope: &'static str,
}

/// Everything the worker needs, and what the station keeps to release the run.
struct Prepared {
    admitted: Admitted,
    source: CompileSource,
    job: Job,
    blobs: Vec<Arc<Vec<u8>>>,
    run_id: String,
    /// Largest update the worker may hand back: fp32 of every value of the round's weights.
    update_max: u64,
}

/// What the worker did, as the station will record it.
struct Executed {
    outcome: Outcome,
    fuel_used: u64,
    peak_memory_bytes: u64,
    budget_peak_bytes: u64,
    wall_us: u64,
    outputs: Vec<(String, Vec<u8>)>,
    /// The update the worker handed back (or why it is not one).
    update: Option<Result<amicus_fl::wire::Update, String>>,
    log_text: String,
    worker: WorkerSummary,
}

/// The worker's part of a run record: how it was confined and what it cost.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct WorkerSummary {
    pub landlock: String,
    pub seccomp: String,
    pub memory_limit_bytes: u64,
    pub cpu_limit_seconds: u64,
    pub gaps: Vec<String>,
    /// Start to ready: process start, the job, the index, confinement.
    pub setup_us: u64,
    /// Ready to end.
    pub run_us: u64,
    pub cpu_us: u64,
}

impl Station {
    /// [`Station::recover_interrupted_runs`] with the station's own log: what a daemon does
    /// when it starts, so a run cut short by a crash is on record before anything else.
    pub fn recover(&self) -> Result<usize, StationError> {
        let audit = self.audit()?;
        self.recover_interrupted_runs(&audit)
    }

    /// Finish what a station that stopped mid-run left in `runs/.partial-<id>/`: the directory is
    /// moved to `runs/<id>/` (with a note), and a run the log never saw finish gets a
    /// `run-finished` entry with outcome `interrupted`. Outputs stay exactly as audited: files are
    /// never deleted, and the log says which were released.
    pub fn recover_interrupted_runs(&self, audit: &AuditLog) -> Result<usize, StationError> {
        let runs = self.dir.join(RUNS_DIR);
        let Ok(entries) = std::fs::read_dir(&runs) else {
            return Ok(0);
        };
        let mut partial: Vec<(String, PathBuf)> = Vec::new();
        let mut abandoned: Vec<(String, PathBuf)> = Vec::new();
        let mut workdirs: Vec<(String, PathBuf)> = Vec::new();
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            for (prefix, list) in [
                (".partial-", &mut partial),
                (".active-", &mut abandoned),
                (".work-", &mut workdirs),
            ] {
                // Run ids are the station's own (time-random); ignore anything else.
                if let Some(id) = name.strip_prefix(prefix)
                    && !id.is_empty()
                    && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                {
                    list.push((id.to_string(), e.path()));
                }
            }
        }
        // A run whose process still holds its lock is running, not interrupted.
        let still_running = |id: &str| ActiveRun::held(&runs, id);
        partial.retain(|(id, _)| !still_running(id));
        abandoned.retain(|(id, _)| !still_running(id));
        // A worker's private directory is empty unless something went badly wrong; it is the
        // station's own scratch space either way.
        for (id, path) in &workdirs {
            if !still_running(id) {
                let _ = std::fs::remove_dir_all(path);
            }
        }
        if partial.is_empty() && abandoned.is_empty() {
            return Ok(0);
        }
        let log = crate::audit::read_entries(&self.dir)?;
        let finished = |id: &str| {
            log.iter()
                .any(|e| e.entry["event"] == "run-finished" && e.entry["run_id"] == id)
        };
        let released = |id: &str| {
            log.iter()
                .filter(|e| e.entry["event"] == "output-released" && e.entry["run_id"] == id)
                .count() as u64
        };
        for (id, path) in &partial {
            if !finished(id) {
                audit.append(interrupted(id, released(id)))?;
            }
            let note = path.join("RECOVERED.txt");
            std::fs::write(
                &note,
                "This run's directory was completed after the station stopped during the run.\n\
                 The audit log says which outputs were released.\n",
            )
            .map_err(io(&note))?;
            let final_dir = runs.join(id);
            std::fs::rename(path, &final_dir).map_err(io(&final_dir))?;
        }
        // Runs stopped before they had a directory: only the log and the lock file show them.
        let mut recovered = partial.len();
        for (id, path) in &abandoned {
            if !finished(id) && !partial.iter().any(|(p, _)| p == id) {
                audit.append(interrupted(id, 0))?;
                recovered += 1;
            }
            std::fs::remove_file(path).map_err(io(path))?;
        }
        Ok(recovered)
    }

    /// Verify, admit and run the bundle at `bundle_path`. Outputs are written to
    /// `runs/<run-id>/outputs/` only if the run succeeds.
    pub fn run(
        &self,
        bundle_path: &Path,
        params: Option<&str>,
        progress: ProgressSink,
    ) -> Result<RunRecord, StationError> {
        self.run_with(bundle_path, params, None, progress)
    }

    /// [`Station::run`] as one round of a federated job: the train gets the round's global
    /// weights, and its update (clipped, noised and counted against the digest's privacy
    /// budget as the round and the policy say) is released as the output `update`.
    pub fn run_round(
        &self,
        bundle_path: &Path,
        params: Option<&str>,
        round: FederatedRound,
        progress: ProgressSink,
    ) -> Result<RunRecord, StationError> {
        self.run_with(bundle_path, params, Some(round), progress)
    }

    fn run_with(
        &self,
        bundle_path: &Path,
        params: Option<&str>,
        federated: Option<FederatedRound>,
        progress: ProgressSink,
    ) -> Result<RunRecord, StationError> {
        let audit = self.audit()?;
        self.recover_interrupted_runs(&audit)?;
        let received = self.verify(&audit, bundle_path)?;
        let admitted = self.admit(&audit, received, params, federated.as_ref())?;
        let prepared = self.prepare(&audit, admitted, federated.as_ref())?;
        let run_id = prepared.run_id.clone();
        // Held (locked) for the whole run: a recovery that finds this file unlocked knows
        // the process that ran it is gone.
        let _active = ActiveRun::begin(&self.dir.join(RUNS_DIR), &run_id)?;
        let (prepared, executed) = self.execute(&audit, prepared, progress)?;
        self.release(&audit, prepared, executed, federated.as_ref())
    }

    /// Read the bundle (within the size cap) and check its integrity; audit its receipt.
    fn verify(&self, audit: &AuditLog, bundle_path: &Path) -> Result<Received, StationError> {
        let raw = match read_capped(bundle_path, amicus_bundle::bundle::MAX_BUNDLE_BYTES)? {
            Ok(raw) => raw,
            Err(file_sha256) => {
                let refusal = Refusal::new(
                    "bundle",
                    format!(
                        "bundle file is larger than {} bytes",
                        amicus_bundle::bundle::MAX_BUNDLE_BYTES
                    ),
                );
                return Err(refuse(audit, None, file_sha256, refusal));
            }
        };
        let bundle_sha256 = sha256(&raw);
        let bundle_bytes = raw.len() as u64;
        let bundle = match Bundle::from_reader(&raw[..]) {
            Ok(b) => b,
            Err(e) => {
                return Err(refuse(
                    audit,
                    None,
                    bundle_sha256,
                    Refusal::new("bundle", e.to_string()),
                ));
            }
        };
        drop(raw);
        let manifest = bundle.manifest();
        audit.append(Event::TrainReceived {
            digest: bundle.digest(),
            train: manifest.train.name.clone(),
            version: manifest.train.version.clone(),
            bundle_sha256,
            bundle_bytes,
            signers: bundle
                .signatures()
                .iter()
                .flat_map(|e| e.signatures.iter().map(|s| s.keyid.clone()))
                .collect(),
        })?;
        Ok(Received {
            bundle,
            bundle_sha256,
        })
    }

    /// The policy's checks, the parameters, a federated round's privacy budget, and whether
    /// the worker can be confined as the policy requires.
    fn admit(
        &self,
        audit: &AuditLog,
        received: Received,
        params: Option<&str>,
        federated: Option<&FederatedRound>,
    ) -> Result<Admitted, StationError> {
        let digest = received.bundle.digest();
        let no = |refusal: Refusal| refuse(audit, Some(digest), received.bundle_sha256, refusal);
        let policy = self.policy()?;
        let admission = policy.admit(&received.bundle).map_err(&no)?;
        let params = params.unwrap_or("{}").to_string();
        if params.len() > MAX_PARAMS_BYTES {
            return Err(no(Refusal::new(
                "params",
                format!("parameters exceed {MAX_PARAMS_BYTES} bytes"),
            )));
        }
        if let Err(e) = serde_json::from_str::<serde_json::Value>(&params) {
            return Err(no(Refusal::new(
                "params",
                format!("parameters are not JSON: {e}"),
            )));
        }
        // The approval binds what runs: any parameters, those matching the train's declared
        // schema, or exactly the approved ones.
        let approval_scope = policy
            .admit_params(&received.bundle, &params)
            .map_err(&no)?;
        // A federated round must fit the digest's privacy budget before anything runs.
        // The evaluation round after the last releases no update (`submit` refuses there).
        if let Some(round) = federated
            && round.number <= round.rounds
        {
            let ledger = Ledger::load(&self.dir, &digest)?;
            if let Err(reason) = crate::privacy::admit_round(
                &policy.privacy,
                &ledger,
                &digest,
                round.noise_multiplier,
            ) {
                return Err(no(Refusal::new("privacy", reason)));
            }
        }
        if policy.worker.require_confinement {
            let kernel = crate::worker::confine::describe_kernel();
            if !kernel.landlock.starts_with("available") || kernel.seccomp != "available" {
                return Err(no(Refusal::new(
                    "confinement",
                    format!(
                        "the policy requires a fully confined run worker, and this kernel offers Landlock {} and seccomp {}",
                        kernel.landlock, kernel.seccomp
                    ),
                )));
            }
        }
        Ok(Admitted {
            received,
            policy,
            admission,
            params,
            approval_scope,
        })
    }

    /// Compile (or take from the cache), check the imports, and gather the worker's job.
    fn prepare(
        &self,
        audit: &AuditLog,
        admitted: Admitted,
        federated: Option<&FederatedRound>,
    ) -> Result<Prepared, StationError> {
        let bundle = &admitted.received.bundle;
        let digest = bundle.digest();
        let no = |refusal: Refusal| {
            refuse(
                audit,
                Some(digest),
                admitted.received.bundle_sha256,
                refusal,
            )
        };
        let manifest = bundle.manifest();
        let policy = &admitted.policy;
        // The station process never compiles or loads a train's code: it reads the imports
        // from the bytes, and a compile worker (confined and bounded like a run) compiles.
        let wasm = bundle.component();
        let max_component = u64::from(policy.worker.max_component_mib) << 20;
        if wasm.len() as u64 > max_component {
            return Err(no(Refusal::new(
                "component",
                format!(
                    "the component is {} bytes; the station compiles at most {max_component} (policy worker.max_component_mib)",
                    wasm.len()
                ),
            )));
        }
        let imports = match crate::sandbox::component_imports(wasm) {
            Ok(i) => i,
            Err(e) => return Err(no(Refusal::new("component", e))),
        };
        let granted: Vec<Capability> = manifest.capabilities.clone();
        let granted_set = granted.iter().copied().collect();
        for import in &imports {
            if let Err(e) = crate::sandbox::check_import(import, &granted_set) {
                return Err(no(Refusal::new("imports", e.to_string())));
            }
        }
        // The engine here only names the cache entry (its compatibility hash).
        let sandbox = Sandbox::new(Some(&self.dir.join(CACHE_DIR)))?;
        let component_path = sandbox
            .cache_path(wasm)
            .ok_or_else(|| SandboxError::Setup("the station has no compile cache".into()))?;
        let source = if component_path.is_file() {
            CompileSource::Cache
        } else {
            match self.compile_in_worker(wasm, policy)? {
                Ok(bytes) => {
                    let dir = self.dir.join(CACHE_DIR);
                    std::fs::create_dir_all(&dir).map_err(io(&dir))?;
                    amicus_bundle::bundle::write_atomic(&component_path, &bytes)
                        .map_err(io(&component_path))?;
                    CompileSource::Compiled
                }
                Err(reason) => return Err(no(Refusal::new("component", reason))),
            }
        };

        // The worker starts in a directory of its own: every path it gets is absolute.
        let component_path = std::path::absolute(&component_path).map_err(io(&component_path))?;
        let index_dir = amicus_index::index_dir(&self.dir);
        let index_dir = std::path::absolute(&index_dir).map_err(io(&index_dir))?;
        let cohort = if granted.contains(&Capability::Cohort) {
            let graph = index_dir.join(amicus_index::scan::GRAPH_FILE);
            // The worker loads only the graph the station's last scan wrote.
            if graph.exists()
                && let Err(e) = amicus_index::scan::check_graph(&index_dir)
            {
                return Err(no(Refusal::new(
                    "index",
                    format!("the station's index cannot be loaded: {e}"),
                )));
            }
            if graph.exists() {
                let limits = query_limits(&policy.cohort);
                let c = &policy.cohort;
                // What the digest may still ask here: queries, and noisy tallies its privacy
                // budget still covers.
                let ledger = Ledger::load(&self.dir, &digest)?;
                let queries_left = c
                    .max_queries_per_run
                    .min(c.max_queries_per_digest.saturating_sub(ledger.queries));
                let max_noisy_tallies = if c.tally_epsilon > 0.0 {
                    let left =
                        policy.privacy.budget(&digest) - ledger.epsilon(policy.privacy.delta);
                    (left / c.tally_epsilon).floor().clamp(0.0, 1e12) as u64
                } else {
                    u64::MAX
                };
                Some(CohortJob {
                    graph,
                    max_query_bytes: limits.max_query_bytes as u64,
                    max_rows: limits.max_rows as u64,
                    timeout_ms: c.timeout_ms,
                    min_patients: limits.min_patients,
                    max_intermediate: limits.max_intermediate as u64,
                    max_queries: queries_left,
                    tally_epsilon: c.tally_epsilon,
                    tally_cells_per_patient: c.tally_cells_per_patient,
                    max_noisy_tallies,
                })
            } else {
                None
            }
        } else {
            None
        };
        let imaging = if granted.contains(&Capability::Imaging) {
            let state = index_dir.join(amicus_index::scan::STATE_FILE);
            state.exists().then(|| ImagingJob {
                state,
                archive: self.config.archive.clone(),
            })
        } else {
            None
        };
        let mut blobs: Vec<Arc<Vec<u8>>> = Vec::new();
        let threads = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(4);
        let kernels = granted.contains(&Capability::Kernels).then(|| {
            let mut models = Vec::new();
            for m in &manifest.models {
                // The bundle verified every file against the signed manifest.
                if let Some(bytes) = bundle.file(&m.file) {
                    models.push(ModelJob {
                        file: m.file.clone(),
                        trainable: m.role == amicus_bundle::manifest::ModelRole::Trainable,
                        loss: m.loss.clone(),
                    });
                    blobs.push(Arc::new(bytes.to_vec()));
                }
            }
            KernelsJob {
                models,
                threads,
                device: match policy.kernels.device {
                    crate::policy::KernelDevice::Cpu => "cpu",
                    crate::policy::KernelDevice::Cuda => "cuda",
                    crate::policy::KernelDevice::Auto => "auto",
                }
                .into(),
                max_model_bytes: policy.kernels.max_model_bytes,
                max_nodes: policy.kernels.max_nodes,
            }
        });
        let round = federated.map(|r| {
            blobs.push(Arc::new(r.global.encode()));
            RoundJob {
                job: r.job.clone(),
                number: r.number,
                rounds: r.rounds,
                proximal_mu: r.proximal_mu,
                encoding: r.encoding,
            }
        });
        let run_id = new_run_id();
        let seed = run_seed(&digest, &admitted.params, &run_id);
        let limits = admitted.admission.limits;
        let job = Job {
            run_id: run_id.clone(),
            component: component_path,
            manifest: manifest.to_canonical(),
            granted,
            params: admitted.params.clone(),
            fuel: limits.fuel,
            memory_bytes: u64::from(limits.memory_mib) << 20,
            wall_ms: u64::from(limits.wall_seconds) * 1000,
            output_max_bytes: policy.outputs.max_bytes,
            output_max_total: policy.outputs.max_total_bytes,
            log_cap: policy.outputs.max_log_bytes,
            seed: hex::encode(seed),
            cohort,
            imaging,
            kernels,
            federated: round,
            limits: WorkerLimits::for_run(
                u64::from(limits.wall_seconds),
                threads as u64 + 1,
                u64::from(policy.worker.memory_slack_mib) << 20,
                u64::from(policy.worker.setup_seconds),
            ),
        };
        let update_max = federated.map_or(0, |r| {
            (r.global.len() as u64).saturating_mul(4).saturating_add(64)
        });
        Ok(Prepared {
            admitted,
            source,
            job,
            blobs,
            run_id,
            update_max,
        })
    }

    /// Compile `wasm` in a compile worker: the compilation, or why there is none (not a valid
    /// component, or over the policy's compile time or memory).
    fn compile_in_worker(
        &self,
        wasm: &[u8],
        policy: &Policy,
    ) -> Result<Result<Vec<u8>, String>, StationError> {
        let w = &policy.worker;
        let request = Request::Compile(CompileJob {
            memory_bytes: u64::from(w.compile_memory_mib) << 20,
            limits: WorkerLimits::for_run(
                u64::from(w.compile_seconds),
                std::thread::available_parallelism().map_or(1, |n| n.get()) as u64,
                u64::from(w.memory_slack_mib) << 20,
                u64::from(w.setup_seconds),
            ),
        });
        let workdir = self
            .dir
            .join(RUNS_DIR)
            .join(format!(".work-compile-{}", new_run_id()));
        std::fs::create_dir_all(&workdir).map_err(io(&workdir))?;
        let command = self
            .worker
            .clone()
            .map_or_else(WorkerCommand::current, Ok)?;
        let wall = Duration::from_secs(w.compile_seconds.into());
        let end = supervise::supervise(
            Spawn {
                command: &command,
                request: &request,
                blobs: vec![Arc::new(wasm.to_vec())],
                workdir: &workdir,
                setup: Duration::from_secs(w.setup_seconds.into()),
                wall,
                log_cap: 1 << 20,
                output_total: 0,
                update_max: 0,
                compiled_max: (wasm.len() as u64).saturating_mul(32).max(256 << 20),
            },
            &mut |_| Ok(()),
        );
        let _ = std::fs::remove_dir_all(&workdir);
        let end = end?;
        if let Some(bytes) = end.compiled {
            return Ok(Ok(bytes));
        }
        if let Some(reason) = end.refused {
            return Ok(Err(crate::sandbox::guest_text(&reason)));
        }
        Ok(Err(match supervise::outcome_of_failure(&end, wall) {
            Outcome::WallClockExceeded(_) => format!(
                "compiling it took longer than {} s (policy worker.compile_seconds)",
                w.compile_seconds
            ),
            Outcome::MemoryLimit(_) => format!(
                "compiling it needed more than {} MiB (policy worker.compile_memory_mib)",
                w.compile_memory_mib
            ),
            other => other.reason().unwrap_or_default(),
        }))
    }

    /// Run the job in a worker process, auditing `run-started`, how the worker is confined,
    /// and every capability call as the worker reports it.
    fn execute(
        &self,
        audit: &AuditLog,
        prepared: Prepared,
        mut progress: ProgressSink,
    ) -> Result<(Prepared, Executed), StationError> {
        let run_id = prepared.run_id.clone();
        let digest = prepared.admitted.received.bundle.digest();
        let job = &prepared.job;
        let policy = &prepared.admitted.policy;
        audit.append(Event::RunStarted {
            run_id: run_id.clone(),
            digest,
            params_sha256: sha256(prepared.admitted.params.as_bytes()),
            fuel: job.fuel,
            memory_bytes: job.memory_bytes,
            wall_ms: job.wall_ms,
            seed: job.seed.clone(),
            approval: Some(prepared.admitted.approval_scope.to_string()),
        })?;
        let workdir = self.dir.join(RUNS_DIR).join(format!(".work-{run_id}"));
        std::fs::create_dir_all(&workdir).map_err(io(&workdir))?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&workdir, std::fs::Permissions::from_mode(0o700))
                .map_err(io(&workdir))?;
        }
        let wall = Duration::from_millis(job.wall_ms);
        let command = self
            .worker
            .clone()
            .map_or_else(WorkerCommand::current, Ok)?;
        let update_max = prepared.update_max;
        let mut recorder = Recorder {
            audit,
            run_id: &run_id,
            pending: None,
            in_flight: None,
            bytes: 0,
            max_bytes: policy.outputs.max_audit_bytes,
            error: None,
            queries: 0,
            tallies: 0,
        };
        let require_confinement = policy.worker.require_confinement;
        let mut on_step = |step: Step| -> Result<(), String> {
            match step {
                Step::Progress(fraction, message) => {
                    let fraction = if fraction.is_finite() {
                        fraction.clamp(0.0, 1.0)
                    } else {
                        0.0
                    };
                    let message: String = crate::sandbox::guest_text(&message)
                        .chars()
                        .take(200)
                        .collect();
                    progress(fraction, &message);
                    Ok(())
                }
                Step::Ready(c) => {
                    let complete = c.complete();
                    recorder.append(Event::WorkerStarted {
                        run_id: run_id.clone(),
                        landlock: crate::sandbox::guest_text(&c.landlock),
                        seccomp: crate::sandbox::guest_text(&c.seccomp),
                        memory_limit_bytes: c.memory_limit_bytes,
                        cpu_limit_seconds: c.cpu_limit_seconds,
                        capabilities_dropped: c.capabilities_dropped,
                        gaps: c
                            .gaps
                            .iter()
                            .map(|g| crate::sandbox::guest_text(g))
                            .collect(),
                    })?;
                    if require_confinement && !complete {
                        return Err(
                            "the policy requires a fully confined worker, and the confinement is incomplete"
                                .into(),
                        );
                    }
                    Ok(())
                }
                Step::Calling(capability, call, detail) => {
                    if capability == "cohort" {
                        recorder.queries += 1;
                        if call == "tally" {
                            recorder.tallies += 1;
                        }
                    }
                    recorder.in_flight = Some((capability, call, detail));
                    Ok(())
                }
                Step::Call(c) => {
                    recorder.in_flight = None;
                    recorder.call(c)
                }
            }
        };
        let end = supervise::supervise(
            Spawn {
                command: &command,
                request: &Request::Run(Box::new(job.clone())),
                blobs: prepared.blobs.clone(),
                workdir: &workdir,
                setup: Duration::from_secs(policy.worker.setup_seconds.into()),
                wall,
                log_cap: policy.outputs.max_log_bytes,
                output_total: policy.outputs.max_total_bytes,
                update_max,
                compiled_max: 0,
            },
            &mut on_step,
        );
        let _ = std::fs::remove_dir_all(&workdir);
        let end = end?;
        if end
            .setup_failed
            .as_deref()
            .is_some_and(|r| r.starts_with(crate::worker::child::CACHE_UNLOADABLE))
        {
            // A damaged cache entry: gone, so the next run compiles again.
            let _ = std::fs::remove_file(&job.component);
        }
        let executed = executed(end, wall);
        // The calls the worker reported, the last one too; and the call it was in when it
        // was stopped or died, with how the run ended.
        let _ = recorder.flush();
        if let Some((capability, call, detail)) = recorder.in_flight.take()
            && executed.outcome != Outcome::Succeeded
        {
            let _ = recorder.call(crate::sandbox::CallRecord {
                capability,
                call,
                detail,
                rows: None,
                outcome: format!("interrupted: the run ended {}", executed.outcome.label()),
                count: 1,
            });
            let _ = recorder.flush();
        }
        if let Some(e) = recorder.error {
            return Err(e);
        }
        if recorder.queries > 0 {
            let eps = if policy.cohort.tally_epsilon > 0.0 {
                policy.cohort.tally_epsilon * recorder.tallies as f64
            } else {
                0.0
            };
            let ledger = crate::privacy::spend_queries(&self.dir, &digest, recorder.queries, eps)?;
            audit.append(Event::CohortQueriesCounted {
                run_id: run_id.clone(),
                queries: recorder.queries,
                tally_epsilon: eps,
                digest_queries: ledger.queries,
                digest_epsilon: ledger.epsilon(policy.privacy.delta),
            })?;
        }
        Ok((prepared, executed))
    }

    /// Apply the output rules again, privatise the update, write what may leave and the run's
    /// record, and finish the audit trail of the run.
    fn release(
        &self,
        audit: &AuditLog,
        prepared: Prepared,
        mut executed: Executed,
        federated: Option<&FederatedRound>,
    ) -> Result<RunRecord, StationError> {
        let run_id = prepared.run_id.clone();
        let bundle = &prepared.admitted.received.bundle;
        let digest = bundle.digest();
        let manifest = bundle.manifest();
        let policy = &prepared.admitted.policy;

        if let Outcome::NotATrain(reason) = &executed.outcome {
            let reason = reason.clone();
            audit.append(Event::RunFinished {
                run_id: run_id.clone(),
                outcome: "not-a-train".into(),
                reason: Some(reason.clone()),
                fuel_used: 0,
                peak_memory_bytes: executed.peak_memory_bytes,
                wall_us: 0,
                outputs_released: 0,
            })?;
            return Err(StationError::RunFailed {
                run_id,
                outcome: "not-a-train".into(),
                reason,
            });
        }

        // The worker is not trusted with the output rules: the gate runs again here.
        let mut gate = OutputGate::new(
            manifest,
            policy.outputs.max_bytes,
            policy.outputs.max_total_bytes,
        );
        if executed.outcome == Outcome::Succeeded {
            for (name, data) in std::mem::take(&mut executed.outputs) {
                if let Err(v) = gate.emit(&name, data) {
                    executed.outcome = Outcome::PolicyViolation(v);
                    break;
                }
            }
        }
        // A federated update: the station clips it, adds noise and encodes it, checks it
        // against the output rules, and spends the privacy before it can leave (a crash after
        // this point over-counts, never under-counts), under the ledger's lock: another run of
        // this digest may have spent meanwhile. Over the budget now: nothing leaves.
        let update = match (executed.update.take(), federated) {
            (None, _) => None,
            (Some(_), None) => {
                executed.outcome =
                    Outcome::PolicyViolation("an update outside a federated round".into());
                None
            }
            (Some(Err(v)), Some(_)) => {
                executed.outcome = Outcome::PolicyViolation(v);
                None
            }
            (Some(Ok(u)), Some(_)) => Some(u),
        };
        let mut submitted = None;
        if executed.outcome == Outcome::Succeeded
            && let (Some(update), Some(round)) = (update, federated)
        {
            match self.privatised_update(&run_id, update, round, &mut gate, policy, &digest) {
                Ok(Ok(s)) => submitted = Some(s),
                Ok(Err(violation)) => executed.outcome = Outcome::PolicyViolation(violation),
                Err(e) => return Err(e),
            }
        }
        if executed.outcome != Outcome::Succeeded {
            gate.emitted.clear();
            submitted = None;
        }
        if let Some(event) = submitted {
            audit.append(event)?;
        }

        let runs = self.dir.join(RUNS_DIR);
        let partial = runs.join(format!(".partial-{run_id}"));
        let final_dir = runs.join(&run_id);
        std::fs::create_dir_all(&partial).map_err(io(&partial))?;
        let mut written = Vec::new();
        let outputs = std::mem::take(&mut gate.emitted);
        // Outside a federated round the data owner may want to see outputs before they leave:
        // they wait in `held/` (see `held.rs`).
        let hold = policy.outputs.hold_for_release && federated.is_none();
        let sub = if hold { HELD_DIR } else { OUTPUTS_DIR };
        if executed.outcome == Outcome::Succeeded && !outputs.is_empty() {
            let out_dir = partial.join(sub);
            std::fs::create_dir_all(&out_dir).map_err(io(&out_dir))?;
            for (name, data) in &outputs {
                // `name` is the manifest's declaration (validated plain file name), chosen by
                // the output gate from the declared set, not the guest's or worker's string.
                let path = out_dir.join(name);
                amicus_bundle::bundle::write_atomic(&path, data).map_err(io(&path))?;
                written.push(ReleasedOutput {
                    name: name.clone(),
                    bytes: data.len() as u64,
                    sha256: sha256(data),
                    path: final_dir.join(sub).join(name),
                });
            }
            for r in &written {
                let (run_id, name, bytes, sha256) =
                    (run_id.clone(), r.name.clone(), r.bytes, r.sha256);
                audit.append(if hold {
                    Event::OutputHeld {
                        run_id,
                        name,
                        bytes,
                        sha256,
                    }
                } else {
                    Event::OutputReleased {
                        run_id,
                        name,
                        bytes,
                        sha256,
                    }
                })?;
            }
        }
        let (released, held) = if hold {
            (Vec::new(), written)
        } else {
            (written, Vec::new())
        };

        let record = RunRecord {
            run_id: run_id.clone(),
            train: manifest.train.name.clone(),
            version: manifest.train.version.clone(),
            digest,
            outcome: executed.outcome.label().to_string(),
            reason: executed.outcome.reason(),
            fuel_used: executed.fuel_used,
            peak_memory_bytes: executed.peak_memory_bytes,
            budget_peak_bytes: executed.budget_peak_bytes,
            wall_us: executed.wall_us,
            compile: match prepared.source {
                CompileSource::Compiled => "compiled",
                CompileSource::Cache => "cache",
            }
            .to_string(),
            outputs: released,
            held,
            decision: None,
            worker: executed.worker.clone(),
            dir: final_dir.clone(),
        };
        let log_path = partial.join("log.txt");
        std::fs::write(&log_path, &executed.log_text).map_err(io(&log_path))?;
        let record_path = partial.join("run.json");
        std::fs::write(
            &record_path,
            serde_json::to_vec_pretty(&record).unwrap_or_default(),
        )
        .map_err(io(&record_path))?;

        audit.append(Event::RunFinished {
            run_id: run_id.clone(),
            outcome: record.outcome.clone(),
            reason: record.reason.clone(),
            fuel_used: record.fuel_used,
            peak_memory_bytes: record.peak_memory_bytes,
            wall_us: record.wall_us,
            outputs_released: record.outputs.len() as u64,
        })?;
        std::fs::rename(&partial, &final_dir).map_err(io(&final_dir))?;

        match executed.outcome {
            Outcome::Succeeded => Ok(record),
            other => Err(StationError::RunFailed {
                run_id,
                outcome: other.label().to_string(),
                reason: other.reason().unwrap_or_default(),
            }),
        }
    }

    /// The round's update as it may leave: checked against the round, clipped and noised as
    /// the plan says, encoded, through the output gate, its privacy spent. The inner error is
    /// a policy violation (nothing leaves).
    fn privatised_update(
        &self,
        run_id: &str,
        update: amicus_fl::wire::Update,
        round: &FederatedRound,
        gate: &mut OutputGate,
        policy: &Policy,
        digest: &Digest,
    ) -> Result<Result<Event, String>, StationError> {
        if round.number > round.rounds {
            return Ok(Err("an update in the job's evaluation round".into()));
        }
        if update.delta.len() != round.global.len() || update.samples == 0 {
            return Ok(Err(format!(
                "the update has {} values and {} samples; the round's weights have {}",
                update.delta.len(),
                update.samples,
                round.global.len()
            )));
        }
        let mut delta = update.delta;
        if let Err(e) = crate::noise::privatise(&mut delta, round.clip_norm, round.noise_multiplier)
        {
            return Ok(Err(format!("update: {e}")));
        }
        let values = delta.len() as u64;
        let bytes = match (amicus_fl::wire::Update {
            samples: update.samples,
            delta,
        })
        .encode(round.encoding)
        {
            Ok(b) => b,
            Err(e) => return Ok(Err(format!("update: {e}"))),
        };
        let len = bytes.len() as u64;
        if let Err(v) = gate.emit_checked(UPDATE_OUTPUT, bytes) {
            return Ok(Err(v));
        }
        let epsilon = match round.noise_multiplier {
            Some(sigma) => {
                match crate::privacy::spend(&self.dir, digest, &policy.privacy, sigma)? {
                    Ok(epsilon) => Some(epsilon),
                    Err(reason) => return Ok(Err(format!("privacy: {reason}"))),
                }
            }
            None => None,
        };
        let event = Event::UpdateSubmitted {
            run_id: run_id.to_string(),
            job: round.job.clone(),
            round: round.number,
            samples: update.samples,
            values,
            bytes: len,
            clip_norm: round.clip_norm,
            noise_multiplier: round.noise_multiplier,
            epsilon,
            delta: round.noise_multiplier.map(|_| policy.privacy.delta),
        };
        Ok(Ok(event))
    }
}

/// Writes a run's audit entries as the worker reports them: repeats of a capability call are
/// coalesced into one entry with their count, and the bytes a run adds are counted against the
/// policy's cap.
struct Recorder<'a> {
    audit: &'a AuditLog,
    run_id: &'a str,
    pending: Option<crate::sandbox::CallRecord>,
    /// The call the worker said it started and has not reported back.
    in_flight: Option<(String, String, String)>,
    bytes: u64,
    max_bytes: u64,
    error: Option<StationError>,
    /// Cohort queries the worker said it started (and tallies among them): charged to the
    /// digest, whatever became of them.
    queries: u64,
    tallies: u64,
}

impl Recorder<'_> {
    fn call(&mut self, c: crate::sandbox::CallRecord) -> Result<(), String> {
        if let Some(p) = &mut self.pending
            && p.same_call(&c)
        {
            p.count = p.count.saturating_add(c.count.max(1));
            return Ok(());
        }
        self.flush()?;
        self.pending = Some(c);
        Ok(())
    }

    fn flush(&mut self) -> Result<(), String> {
        let Some(c) = self.pending.take() else {
            return Ok(());
        };
        let text = crate::sandbox::guest_text;
        self.append(Event::CapabilityCall {
            run_id: self.run_id.to_string(),
            capability: text(&c.capability),
            call: text(&c.call),
            detail: text(&c.detail),
            rows: c.rows,
            outcome: text(&c.outcome),
            count: (c.count > 1).then_some(c.count),
        })
    }

    fn append(&mut self, event: Event) -> Result<(), String> {
        let event = event.bounded();
        self.bytes = self.bytes.saturating_add(event_bytes(&event));
        if let Err(e) = self.audit.append(event) {
            self.error = Some(e.into());
            return Err("the audit log could not be appended".into());
        }
        if self.bytes > self.max_bytes {
            return Err(format!(
                "the run's audit entries exceeded {} bytes (policy outputs.max_audit_bytes)",
                self.max_bytes
            ));
        }
        Ok(())
    }
}

/// Audit a refusal and turn it into the error the caller returns (or the audit's own error).
fn refuse(
    audit: &AuditLog,
    digest: Option<Digest>,
    bundle_sha256: Digest,
    refusal: Refusal,
) -> StationError {
    match audit.append(Event::TrainRefused {
        digest,
        bundle_sha256,
        stage: refusal.stage.clone(),
        reason: refusal.reason.clone(),
    }) {
        Ok(_) => StationError::Refused(refusal),
        Err(e) => e.into(),
    }
}

/// Bytes an event takes in the log (approximately: its JSON).
fn event_bytes(event: &Event) -> u64 {
    serde_json::to_vec(event).map_or(0, |v| v.len() as u64)
}

/// Bytes a run produced, as lines of the run's log: each prefixed (so none reads as a station
/// line), every control and bidirectional-format character escaped.
fn quoted(bytes: &[u8], prefix: &str) -> String {
    let text = String::from_utf8_lossy(bytes);
    let mut out = String::with_capacity(text.len() + 64);
    for line in text.lines() {
        out.push_str(prefix);
        out.push_str(&crate::sandbox::guest_line(line));
        out.push('\n');
    }
    out
}

/// The station's account of a worker's end.
fn executed(end: WorkerEnd, wall: Duration) -> Executed {
    let worker = WorkerSummary {
        landlock: end
            .confinement
            .as_ref()
            .map_or_else(|| "not reached".into(), |c| c.landlock.clone()),
        seccomp: end
            .confinement
            .as_ref()
            .map_or_else(|| "not reached".into(), |c| c.seccomp.clone()),
        memory_limit_bytes: end.confinement.as_ref().map_or(0, |c| c.memory_limit_bytes),
        cpu_limit_seconds: end.confinement.as_ref().map_or(0, |c| c.cpu_limit_seconds),
        gaps: end
            .confinement
            .as_ref()
            .map_or_else(Vec::new, |c| c.gaps.clone()),
        setup_us: end.setup_time.as_micros() as u64,
        run_us: end.run_time.as_micros() as u64,
        cpu_us: end.cpu.as_micros() as u64,
    };
    let mut log_text = String::new();
    let stderr = end.stderr.clone();
    let peak = end.peak_rss_bytes;
    let failure = supervise::outcome_of_failure(&end, wall);
    let (outcome, fuel_used, budget_peak_bytes, wall_us, outputs, update) =
        if let Some(reason) = &end.refused {
            (
                Outcome::NotATrain(reason.clone()),
                0,
                0,
                0,
                Vec::new(),
                None,
            )
        } else {
            match (end.finished, end.stopped.is_some()) {
                (Some(f), false) => {
                    for (level, line) in &f.report.log_lines {
                        // One line per message: a newline in it cannot forge a station line.
                        log_text.push_str(&format!(
                            "[{}] {}\n",
                            crate::sandbox::guest_line(level),
                            crate::sandbox::guest_line(line)
                        ));
                    }
                    if f.report.dropped_lines > 0 {
                        log_text.push_str(&format!(
                            "[station] {} log lines dropped (log limit)\n",
                            f.report.dropped_lines
                        ));
                    }
                    if !f.stdout.is_empty() {
                        log_text.push_str("[station] captured stdout/stderr follows\n");
                        log_text.push_str(&quoted(&f.stdout, "| "));
                    }
                    let update = match (&f.report.update, &f.update) {
                        (Some(meta), Some(bytes)) => match amicus_fl::wire::Update::decode(bytes) {
                            Ok((u, _)) if u.samples == meta.samples => Some(Ok(u)),
                            Ok(_) => Some(Err("the update does not match its report".into())),
                            Err(e) => Some(Err(format!("the update: {e}"))),
                        },
                        (None, None) => None,
                        _ => Some(Err("an update without its report".into())),
                    };
                    let outcome = f.report.outcome.clone();
                    // The worker's own wall-clock verdict uses the run's limit.
                    let outcome = match outcome {
                        Outcome::WallClockExceeded(_) => Outcome::WallClockExceeded(wall),
                        Outcome::Crashed(_)
                        | Outcome::CpuTimeExceeded
                        | Outcome::LimitExceeded(_)
                        | Outcome::Interrupted(_)
                        | Outcome::NotATrain(_) => Outcome::Crashed(
                            "the worker reported an outcome only the station decides".into(),
                        ),
                        other => other,
                    };
                    (
                        outcome,
                        f.report.fuel_used,
                        f.report.budget_peak_bytes,
                        f.report.wall_us,
                        f.outputs,
                        update,
                    )
                }
                (_, _) => (
                    failure,
                    0,
                    0,
                    end.run_time.as_micros() as u64,
                    Vec::new(),
                    None,
                ),
            }
        };
    if !stderr.is_empty() {
        log_text.push_str("[station] the run worker's stderr follows\n");
        log_text.push_str(&quoted(&stderr, "! "));
    }
    Executed {
        outcome,
        fuel_used,
        peak_memory_bytes: peak,
        budget_peak_bytes,
        wall_us,
        outputs,
        update,
        log_text,
        worker,
    }
}

/// The `run-finished` entry of a run the station stopped during.
fn interrupted(run_id: &str, outputs_released: u64) -> Event {
    Event::RunFinished {
        run_id: run_id.to_string(),
        outcome: "interrupted".into(),
        reason: Some("the station stopped during the run".into()),
        fuel_used: 0,
        peak_memory_bytes: 0,
        wall_us: 0,
        outputs_released,
    }
}

/// `runs/.active-<id>`: exists, locked, while a run is in progress; removed when it ends.
struct ActiveRun {
    path: PathBuf,
    _file: std::fs::File,
}

impl ActiveRun {
    fn begin(runs: &Path, run_id: &str) -> Result<ActiveRun, StationError> {
        std::fs::create_dir_all(runs).map_err(io(runs))?;
        let path = runs.join(format!(".active-{run_id}"));
        let file = std::fs::File::create(&path).map_err(io(&path))?;
        file.lock().map_err(io(&path))?;
        Ok(ActiveRun { path, _file: file })
    }

    /// Whether a live process holds run `id`'s lock.
    fn held(runs: &Path, id: &str) -> bool {
        let Ok(f) = std::fs::File::open(runs.join(format!(".active-{id}"))) else {
            return false;
        };
        matches!(f.try_lock(), Err(std::fs::TryLockError::WouldBlock))
    }
}

impl Drop for ActiveRun {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A run id: UTC time plus 32 random bits, e.g. `20261127T214500Z-9f2c61d0`.
fn new_run_id() -> String {
    let now = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    let stamp: String = now.chars().filter(|c| c.is_ascii_alphanumeric()).collect();
    let mut r = [0u8; 4];
    // Uniqueness, not secrecy: fall back to the process id if the OS has no randomness.
    if getrandom::fill(&mut r).is_err() {
        r = std::process::id().to_le_bytes();
    }
    format!("{stamp}-{}", hex::encode(r))
}

/// The file's bytes, or — when it is larger than `cap` — its SHA-256 (streamed, for the audit
/// entry of the refusal).
fn read_capped(path: &Path, cap: u64) -> Result<Result<Vec<u8>, Digest>, StationError> {
    use sha2::Digest as _;
    let mut f = std::fs::File::open(path).map_err(io(path))?;
    let mut h = sha2::Sha256::new();
    let declared = f.metadata().map_err(io(path))?.len();
    if declared <= cap {
        let mut data = Vec::with_capacity(declared as usize);
        (&mut f)
            .take(cap + 1)
            .read_to_end(&mut data)
            .map_err(io(path))?;
        if data.len() as u64 <= cap {
            return Ok(Ok(data));
        }
        h.update(&data); // the file grew while being read
    }
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(io(path))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(Err(Digest(h.finalize().into())))
}
