//! A station directory and the flow that runs a train in it.
//!
//! ```text
//! st1/
//!   station.toml              name, archive path, contract
//!   station.key, station.pub  the station's Ed25519 identity (signs the audit log)
//!   policy.toml               the data owner's policy (see `policy`)
//!   audit.log, audit.head     the signed audit trail (see `audit`)
//!   cache/                    the station's own compilations of components
//!   runs/<run-id>/            run.json, log.txt and outputs/ of every run
//! ```
//!
//! `run` is the only path from a bundle file to released outputs: read and integrity-check →
//! audit "received" → admit by policy → check imports → run in the sandbox → audit every
//! capability call and output → write outputs → audit "finished". A refusal at any step is
//! audited with its stage and reason, and nothing is released. Output file names come from the
//! manifest's declarations and run ids from the station, never from the guest.

use crate::audit::{AuditError, AuditLog, Event};
use crate::policy::{Policy, PolicyError, Refusal};
use crate::privacy::Ledger;
use crate::sandbox::{
    CohortAccess, CompileSource, DeclaredModel, FederatedRound, KernelAccess, Outcome,
    ProgressSink, RunRequest, Sandbox, SandboxError, run_seed,
};
use amicus_bundle::{Bundle, Capability, Digest, KeyError, PublicKey, SecretKey, sha256};
use serde::{Deserialize, Serialize};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub const STATION_FILE: &str = "station.toml";
pub const KEY_FILE: &str = "station.key";
pub const RUNS_DIR: &str = "runs";
pub const CACHE_DIR: &str = "cache";
/// Largest parameter document a run accepts.
pub const MAX_PARAMS_BYTES: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum StationError {
    #[error("{0}")]
    Refused(Refusal),
    #[error("run {run_id} {}: {reason}", outcome)]
    RunFailed {
        run_id: String,
        outcome: String,
        reason: String,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Audit(#[from] AuditError),
    #[error("{0}")]
    Policy(#[from] PolicyError),
    #[error("{0}")]
    Key(#[from] KeyError),
    #[error("{0}")]
    Sandbox(#[from] SandboxError),
    #[error("{path}: not a station directory ({reason})")]
    NotAStation { path: PathBuf, reason: String },
    #[error("{0} exists and is not empty; choose a new directory for the station")]
    DirNotEmpty(PathBuf),
    #[error("archive {0} is not a directory")]
    BadArchive(PathBuf),
    #[error("indexing the archive: {0}")]
    Index(#[from] amicus_index::ScanError),
    #[error("the station's index cannot be loaded: {0}")]
    IndexDamaged(#[from] amicus_index::LoadError),
    #[error("{0}")]
    Query(#[from] amicus_index::QueryError),
    #[error("{0}")]
    Catalog(#[from] amicus_index::catalog::CatalogError),
    #[error("{0}")]
    Privacy(#[from] crate::privacy::PrivacyError),
}

/// The index's query limits from the policy's `[cohort]` section.
pub fn query_limits(c: &crate::policy::CohortPolicy) -> amicus_index::QueryLimits {
    amicus_index::QueryLimits {
        max_query_bytes: usize::try_from(c.max_query_bytes).unwrap_or(usize::MAX),
        max_rows: usize::try_from(c.max_rows).unwrap_or(usize::MAX),
        timeout: Duration::from_millis(c.timeout_ms),
        min_patients: c.min_patients,
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StationError + '_ {
    move |source| StationError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// `station.toml`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StationConfig {
    pub name: String,
    /// The DICOM archive this station serves (a folder).
    pub archive: PathBuf,
    pub contract: String,
}

/// An opened station directory.
pub struct Station {
    dir: PathBuf,
    config: StationConfig,
}

/// What a successful run released.
#[derive(Debug, Clone, Serialize)]
pub struct ReleasedOutput {
    pub name: String,
    pub bytes: u64,
    pub sha256: Digest,
    pub path: PathBuf,
}

/// The record of a run (`runs/<id>/run.json`).
#[derive(Debug, Clone, Serialize)]
pub struct RunRecord {
    pub run_id: String,
    pub train: String,
    pub version: String,
    pub digest: Digest,
    pub outcome: String,
    pub reason: Option<String>,
    pub fuel_used: u64,
    pub peak_memory_bytes: u64,
    pub wall_us: u64,
    pub compile: String,
    pub outputs: Vec<ReleasedOutput>,
    pub dir: PathBuf,
}

impl Station {
    /// Create a new station in `dir` (which must not exist or be empty).
    pub fn init(dir: &Path, archive: &Path, name: Option<&str>) -> Result<Station, StationError> {
        if !archive.is_dir() {
            return Err(StationError::BadArchive(archive.to_path_buf()));
        }
        let archive = archive.canonicalize().map_err(io(archive))?;
        if dir.exists() {
            let mut entries = std::fs::read_dir(dir).map_err(io(dir))?;
            if entries.next().is_some() {
                return Err(StationError::DirNotEmpty(dir.to_path_buf()));
            }
        }
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                .map_err(io(dir))?;
        }
        let name = name.map(str::to_string).unwrap_or_else(|| {
            dir.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "station".into())
        });
        let config = StationConfig {
            name,
            archive: archive.clone(),
            contract: amicus_bundle::CONTRACT.to_string(),
        };
        let key = SecretKey::generate()?;
        key.write_pair(&dir.join(KEY_FILE))?;
        let path = dir.join(STATION_FILE);
        std::fs::write(&path, toml::to_string(&config).expect("config serialises"))
            .map_err(io(&path))?;
        Policy::default().save(dir)?;
        std::fs::create_dir_all(dir.join(RUNS_DIR)).map_err(io(dir))?;
        let station_key = key.public().id().to_string();
        let log = AuditLog::new(dir, key);
        log.create()?;
        log.append(Event::StationInitialised {
            station_key,
            archive: archive.display().to_string(),
        })?;
        Ok(Station {
            dir: dir.to_path_buf(),
            config,
        })
    }

    pub fn open(dir: &Path) -> Result<Station, StationError> {
        let path = dir.join(STATION_FILE);
        let text = std::fs::read_to_string(&path).map_err(|e| StationError::NotAStation {
            path: dir.to_path_buf(),
            reason: format!("{STATION_FILE}: {e}"),
        })?;
        let config: StationConfig =
            toml::from_str(&text).map_err(|e| StationError::NotAStation {
                path: dir.to_path_buf(),
                reason: format!("{STATION_FILE}: {}", e.message()),
            })?;
        Ok(Station {
            dir: dir.to_path_buf(),
            config,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn config(&self) -> &StationConfig {
        &self.config
    }

    pub fn public_key(&self) -> Result<PublicKey, StationError> {
        Ok(PublicKey::read(&amicus_bundle::keys::public_key_path(
            &self.dir.join(KEY_FILE),
        ))?)
    }

    fn audit(&self) -> Result<AuditLog, StationError> {
        Ok(AuditLog::new(
            &self.dir,
            SecretKey::read(&self.dir.join(KEY_FILE))?,
        ))
    }

    /// The index and the policy's query limits, if the archive has been indexed.
    fn cohort_access(&self, policy: &Policy) -> Result<Option<CohortAccess>, StationError> {
        let graph = amicus_index::index_dir(&self.dir).join(amicus_index::scan::GRAPH_FILE);
        if !graph.exists() {
            return Ok(None);
        }
        let index = amicus_index::Index::load(&graph)?;
        Ok(Some(CohortAccess {
            index: std::sync::Arc::new(index),
            limits: query_limits(&policy.cohort),
        }))
    }

    /// Scan the station's archive into its index (incrementally) and audit the result.
    pub fn index(
        &self,
        progress: impl FnMut(amicus_index::Progress<'_>),
    ) -> Result<amicus_index::IndexReport, StationError> {
        let audit = self.audit()?;
        let report = amicus_index::scan(
            &self.config.archive,
            &amicus_index::index_dir(&self.dir),
            progress,
        )?;
        audit.append(Event::ArchiveIndexed {
            files_seen: report.files_seen,
            indexed: report.indexed,
            new: report.new,
            changed: report.changed,
            removed: report.removed,
            quarantined: report.quarantined.len() as u64,
            patients: report.counts.patients,
            studies: report.counts.studies,
            series: report.counts.series,
            triples: report.counts.triples,
            graph_sha256: report.graph_sha256.clone(),
        })?;
        Ok(report)
    }

    /// The data owner's read-only query on the index (audited: hash and outcome).
    pub fn query(
        &self,
        sparql: &str,
        format: amicus_index::OwnerFormat,
    ) -> Result<Vec<u8>, StationError> {
        let policy = self.policy()?;
        let audit = self.audit()?;
        let index = amicus_index::open(&self.dir)?;
        let timeout = Duration::from_millis(policy.cohort.timeout_ms);
        let result = amicus_index::query::owner_query(&index, sparql, timeout, format);
        audit.append(Event::IndexQueried {
            query_sha256: sha256(sparql.as_bytes()),
            outcome: match &result {
                Ok(bytes) => format!("ok: {} bytes", bytes.len()),
                Err(e) => format!("refused: {e}"),
            },
        })?;
        Ok(result?)
    }

    /// The station's public DCAT catalog as Turtle (aggregate counts only).
    pub fn catalog(&self) -> Result<String, StationError> {
        let policy = self.policy()?;
        let index = amicus_index::open(&self.dir)?;
        let report = amicus_index::scan::last_report(&amicus_index::index_dir(&self.dir));
        let base = format!("urn:amicus:station:{}", self.public_key()?.id());
        let info = amicus_index::CatalogInfo {
            base: &base,
            title: policy.catalog.title.as_deref().unwrap_or(&self.config.name),
            publisher: policy
                .catalog
                .publisher
                .as_deref()
                .unwrap_or(&self.config.name),
            license: &policy.catalog.license,
            min_patients: policy.cohort.min_patients,
        };
        let turtle = amicus_index::catalog_turtle(&index, &info, report.as_ref())?;
        self.audit()?.append(Event::CatalogPublished {
            sha256: sha256(turtle.as_bytes()),
            bytes: turtle.len() as u64,
        })?;
        Ok(turtle)
    }

    pub fn policy(&self) -> Result<Policy, StationError> {
        Ok(Policy::load(&self.dir)?)
    }

    /// Data owner: trust a signer's public key under `name`.
    pub fn trust(&self, name: &str, key: &PublicKey) -> Result<(), StationError> {
        let audit = self.audit()?;
        let mut policy = self.policy()?;
        policy.trust(name, key)?;
        policy.save(&self.dir)?;
        audit.append(Event::SignerTrusted {
            name: name.to_string(),
            keyid: key.id().to_string(),
        })?;
        Ok(())
    }

    /// Data owner: approve a bundle digest. Returns false when it was already approved.
    pub fn approve(&self, digest: Digest, train: Option<String>) -> Result<bool, StationError> {
        let audit = self.audit()?;
        let mut policy = self.policy()?;
        if !policy.approve(digest, train.clone()) {
            return Ok(false);
        }
        policy.save(&self.dir)?;
        audit.append(Event::DigestApproved { digest, train })?;
        Ok(true)
    }

    /// Record that a securely aggregated round's update left masked (the daemon masks it
    /// after the run; see `amicus_registry::station_secagg`).
    pub fn record_masked_update(
        &self,
        run_id: &str,
        job: &str,
        round: u32,
        sharers: u32,
        threshold: u32,
        masked: &[u8],
    ) -> Result<(), StationError> {
        self.audit()?.append(Event::UpdateMasked {
            run_id: run_id.to_string(),
            job: job.to_string(),
            round,
            sharers,
            threshold,
            bytes: masked.len() as u64,
            sha256: sha256(masked),
        })?;
        Ok(())
    }

    /// Record the shares revealed for unmasking a securely aggregated round's sum.
    pub fn record_shares_revealed(
        &self,
        job: &str,
        round: u32,
        survivors: u32,
        dropped: u32,
    ) -> Result<(), StationError> {
        self.audit()?.append(Event::SharesRevealed {
            job: job.to_string(),
            round,
            survivors,
            dropped,
        })?;
        Ok(())
    }

    /// Record a refusal decided outside `run` (the data owner refused a train the registry
    /// delivered, or the registry sent a bundle other than the one it named).
    pub fn record_refusal(
        &self,
        digest: Option<Digest>,
        bundle_sha256: Digest,
        stage: &str,
        reason: &str,
    ) -> Result<(), StationError> {
        self.audit()?.append(Event::TrainRefused {
            digest,
            bundle_sha256,
            stage: stage.to_string(),
            reason: reason.to_string(),
        })?;
        Ok(())
    }

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
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            for (prefix, list) in [(".partial-", &mut partial), (".active-", &mut abandoned)] {
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
                audit.append(Event::TrainRefused {
                    digest: None,
                    bundle_sha256: file_sha256,
                    stage: refusal.stage.clone(),
                    reason: refusal.reason.clone(),
                })?;
                return Err(StationError::Refused(refusal));
            }
        };
        let bundle_sha256 = sha256(&raw);
        let bundle_bytes = raw.len() as u64;
        let refuse = |digest: Option<Digest>, refusal: Refusal| -> StationError {
            match audit.append(Event::TrainRefused {
                digest,
                bundle_sha256,
                stage: refusal.stage.clone(),
                reason: refusal.reason.clone(),
            }) {
                Ok(_) => StationError::Refused(refusal),
                Err(e) => e.into(),
            }
        };
        let bundle = match Bundle::from_reader(&raw[..]) {
            Ok(b) => b,
            Err(e) => return Err(refuse(None, Refusal::new("bundle", e.to_string()))),
        };
        drop(raw);
        let digest = bundle.digest();
        let manifest = bundle.manifest();
        audit.append(Event::TrainReceived {
            digest,
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

        let policy = self.policy()?;
        let admission = policy.admit(&bundle).map_err(|r| refuse(Some(digest), r))?;

        let params = params.unwrap_or("{}").to_string();
        if params.len() > MAX_PARAMS_BYTES {
            return Err(refuse(
                Some(digest),
                Refusal::new(
                    "params",
                    format!("parameters exceed {MAX_PARAMS_BYTES} bytes"),
                ),
            ));
        }
        if let Err(e) = serde_json::from_str::<serde_json::Value>(&params) {
            return Err(refuse(
                Some(digest),
                Refusal::new("params", format!("parameters are not JSON: {e}")),
            ));
        }

        // A federated round must fit the digest's privacy budget before anything runs.
        // The evaluation round after the last releases no update (`submit` refuses there).
        if let Some(round) = &federated
            && round.number <= round.rounds
        {
            let ledger = Ledger::load(&self.dir, &digest)?;
            if let Err(reason) = crate::privacy::admit_round(
                &policy.privacy,
                &ledger,
                &digest,
                round.noise_multiplier,
            ) {
                return Err(refuse(Some(digest), Refusal::new("privacy", reason)));
            }
        }

        let sandbox = Sandbox::new(Some(&self.dir.join(CACHE_DIR)))?;
        let (component, source) = match sandbox.compile(bundle.component()) {
            Ok(c) => c,
            Err(SandboxError::InvalidComponent(e)) => {
                return Err(refuse(Some(digest), Refusal::new("component", e)));
            }
            Err(e) => return Err(e.into()),
        };
        let granted = manifest.capabilities.iter().copied().collect();
        if let Err(e) = sandbox.check_imports(&component, &granted) {
            return Err(refuse(Some(digest), Refusal::new("imports", e.to_string())));
        }

        let cohort = if granted.contains(&Capability::Cohort) {
            match self.cohort_access(&policy) {
                Ok(access) => access,
                Err(e) => return Err(refuse(Some(digest), Refusal::new("index", e.to_string()))),
            }
        } else {
            None
        };
        let imaging = if granted.contains(&Capability::Imaging) {
            amicus_index::scan::archive_state(&amicus_index::index_dir(&self.dir))
                .map(std::sync::Arc::new)
        } else {
            None
        };
        let kernels = granted
            .contains(&Capability::Kernels)
            .then(|| KernelAccess {
                models: manifest
                    .models
                    .iter()
                    .filter_map(|m| {
                        // The bundle verified every file against the signed manifest.
                        let bytes = bundle.file(&m.file)?;
                        Some((
                            m.file.clone(),
                            DeclaredModel {
                                trainable: m.role == amicus_bundle::manifest::ModelRole::Trainable,
                                loss: m.loss.clone(),
                                bytes: std::sync::Arc::new(bytes.to_vec()),
                            },
                        ))
                    })
                    .collect(),
                threads: std::thread::available_parallelism()
                    .map_or(1, |n| n.get())
                    .min(4),
                device: policy.kernels.device.kernels(),
            });
        let run_id = new_run_id();
        let seed = run_seed(&digest, &params, &run_id);
        let limits = admission.limits;
        // Held (locked) for the whole run: a recovery that finds this file unlocked knows
        // the process that ran it is gone.
        let _active = ActiveRun::begin(&self.dir.join(RUNS_DIR), &run_id)?;
        audit.append(Event::RunStarted {
            run_id: run_id.clone(),
            digest,
            params_sha256: sha256(params.as_bytes()),
            fuel: limits.fuel,
            memory_bytes: u64::from(limits.memory_mib) << 20,
            wall_ms: u64::from(limits.wall_seconds) * 1000,
            seed: hex::encode(seed),
        })?;

        let report = sandbox.run(
            &component,
            RunRequest {
                manifest,
                granted,
                params,
                fuel: limits.fuel,
                memory_bytes: (limits.memory_mib as usize) << 20,
                wall: Duration::from_secs(limits.wall_seconds.into()),
                output_max_bytes: policy.outputs.max_bytes,
                output_max_total: policy.outputs.max_total_bytes,
                log_cap: policy.outputs.max_log_bytes as usize,
                seed,
                progress,
                cohort,
                imaging,
                kernels,
                federated: federated.clone(),
            },
        );
        let report = match report {
            Ok(r) => r,
            Err(e) => {
                let reason = e.to_string();
                audit.append(Event::RunFinished {
                    run_id: run_id.clone(),
                    outcome: "not-a-train".into(),
                    reason: Some(reason.clone()),
                    fuel_used: 0,
                    peak_memory_bytes: 0,
                    wall_us: 0,
                    outputs_released: 0,
                })?;
                return Err(StationError::RunFailed {
                    run_id,
                    outcome: "not-a-train".into(),
                    reason,
                });
            }
        };

        for c in &report.calls {
            audit.append(Event::CapabilityCall {
                run_id: run_id.clone(),
                capability: c.capability.clone(),
                call: c.call.clone(),
                detail: c.detail.clone(),
                rows: c.rows,
                outcome: c.outcome.clone(),
            })?;
        }

        // Spend the privacy before the update can leave (a crash after this point
        // over-counts, never under-counts), checked again under the ledger's lock: another
        // run of this digest may have spent meanwhile. Over the budget now: nothing leaves.
        let mut report = report;
        if let (Some(update), Some(round)) = (report.update.clone(), &federated)
            && report.outcome == Outcome::Succeeded
        {
            let spent = match round.noise_multiplier {
                Some(sigma) => {
                    match crate::privacy::spend(&self.dir, &digest, &policy.privacy, sigma)? {
                        Ok(epsilon) => Some(epsilon),
                        Err(reason) => {
                            report.outcome = Outcome::PolicyViolation(format!("privacy: {reason}"));
                            report.outputs.clear();
                            None
                        }
                    }
                }
                None => None,
            };
            if report.outcome == Outcome::Succeeded {
                audit.append(Event::UpdateSubmitted {
                    run_id: run_id.clone(),
                    job: round.job.clone(),
                    round: round.number,
                    samples: update.samples,
                    values: update.values,
                    bytes: update.bytes,
                    clip_norm: round.clip_norm,
                    noise_multiplier: round.noise_multiplier,
                    epsilon: spent,
                    delta: round.noise_multiplier.map(|_| policy.privacy.delta),
                })?;
            }
        }

        let runs = self.dir.join(RUNS_DIR);
        let partial = runs.join(format!(".partial-{run_id}"));
        let final_dir = runs.join(&run_id);
        std::fs::create_dir_all(&partial).map_err(io(&partial))?;
        let mut released = Vec::new();
        if report.outcome == Outcome::Succeeded && !report.outputs.is_empty() {
            let out_dir = partial.join("outputs");
            std::fs::create_dir_all(&out_dir).map_err(io(&out_dir))?;
            for (name, data) in &report.outputs {
                // `name` is the manifest's declaration (validated plain file name), chosen by
                // the output gate from the declared set, not the guest's string.
                let path = out_dir.join(name);
                amicus_bundle::bundle::write_atomic(&path, data).map_err(io(&path))?;
                released.push(ReleasedOutput {
                    name: name.clone(),
                    bytes: data.len() as u64,
                    sha256: sha256(data),
                    path: final_dir.join("outputs").join(name),
                });
            }
            for r in &released {
                audit.append(Event::OutputReleased {
                    run_id: run_id.clone(),
                    name: r.name.clone(),
                    bytes: r.bytes,
                    sha256: r.sha256,
                })?;
            }
        }

        let record = RunRecord {
            run_id: run_id.clone(),
            train: manifest.train.name.clone(),
            version: manifest.train.version.clone(),
            digest,
            outcome: report.outcome.label().to_string(),
            reason: report.outcome.reason(),
            fuel_used: report.fuel_used,
            peak_memory_bytes: report.peak_memory_bytes,
            wall_us: report.wall.as_micros() as u64,
            compile: match source {
                CompileSource::Compiled => "compiled",
                CompileSource::Cache => "cache",
            }
            .to_string(),
            outputs: released,
            dir: final_dir.clone(),
        };
        let mut log_text = String::new();
        for (level, line) in &report.log.lines {
            log_text.push_str(&format!("[{level}] {line}\n"));
        }
        if report.log.dropped_lines > 0 {
            log_text.push_str(&format!(
                "[station] {} log lines dropped (log limit)\n",
                report.log.dropped_lines
            ));
        }
        if !report.log.stdout.is_empty() {
            log_text.push_str("[station] captured stdout/stderr follows\n");
            log_text.push_str(&String::from_utf8_lossy(&report.log.stdout));
        }
        let log_path = partial.join("log.txt");
        std::fs::write(&log_path, log_text).map_err(io(&log_path))?;
        let record_path = partial.join("run.json");
        std::fs::write(
            &record_path,
            serde_json::to_vec_pretty(&record).expect("a run record serialises"),
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

        match report.outcome {
            Outcome::Succeeded => Ok(record),
            other => Err(StationError::RunFailed {
                run_id,
                outcome: other.label().to_string(),
                reason: other.reason().unwrap_or_default(),
            }),
        }
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
