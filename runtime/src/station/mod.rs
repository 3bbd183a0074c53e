//! A station directory and the flow that runs a train in it.
//!
//! ```text
//! st1/
//!   station.toml              name, archive path, contract
//!   station.key, station.pub  the station's Ed25519 identity (signs the audit log)
//!   policy.toml               the data owner's policy (see `policy`)
//!   audit.log, audit.head     the signed audit trail (see `audit`)
//!   cache/                    the station's own compilations of components
//!   runs/<run-id>/            run.json, log.txt and outputs/ (or held/) of every run
//! ```
//!
//! `run` is the only path from a bundle file to released outputs: read and integrity-check →
//! audit "received" → admit by policy → check imports → run in the sandbox → audit every
//! capability call and output → write outputs → audit "finished". A refusal at any step is
//! audited with its stage and reason, and nothing is released. Output file names come from the
//! manifest's declarations and run ids from the station, never from the guest.

mod held;
mod run;

pub use held::HeldState;
pub use run::WorkerSummary;

use crate::audit::{AuditError, AuditLog, Event};
use crate::policy::{Policy, PolicyError, Refusal};
use crate::sandbox::SandboxError;
use crate::worker::WorkerCommand;
use amicus_bundle::{Digest, KeyError, PublicKey, SecretKey, sha256};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Duration;

pub const STATION_FILE: &str = "station.toml";
pub const KEY_FILE: &str = "station.key";
pub const RUNS_DIR: &str = "runs";
/// A run's released outputs, under `runs/<id>/`.
pub const OUTPUTS_DIR: &str = "outputs";
/// A run's outputs waiting for the data owner, under `runs/<id>/`.
pub const HELD_DIR: &str = "held";
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
    #[error("{0}")]
    Worker(#[from] crate::worker::supervise::WorkerError),
    #[error("run {run_id}: {why}")]
    NotHeld { run_id: String, why: String },
}

/// The index's query limits from the policy's `[cohort]` section.
pub fn query_limits(c: &crate::policy::CohortPolicy) -> amicus_index::QueryLimits {
    amicus_index::QueryLimits {
        max_query_bytes: usize::try_from(c.max_query_bytes).unwrap_or(usize::MAX),
        max_rows: usize::try_from(c.max_rows).unwrap_or(usize::MAX),
        timeout: Duration::from_millis(c.timeout_ms),
        min_patients: c.min_patients,
        max_intermediate: usize::try_from(c.max_intermediate_rows).unwrap_or(usize::MAX),
        tally_noise: (c.tally_epsilon > 0.0).then_some(amicus_index::query::TallyNoise {
            epsilon: c.tally_epsilon,
            cells_per_patient: c.tally_cells_per_patient,
        }),
    }
}

pub(crate) fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StationError + '_ {
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
    /// How run workers start (this executable's hidden subcommand unless set).
    worker: Option<WorkerCommand>,
}

/// An output of a successful run: released, or held for the data owner.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReleasedOutput {
    pub name: String,
    pub bytes: u64,
    pub sha256: Digest,
    pub path: PathBuf,
}

/// The record of a run (`runs/<id>/run.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunRecord {
    pub run_id: String,
    pub train: String,
    pub version: String,
    pub digest: Digest,
    pub outcome: String,
    pub reason: Option<String>,
    pub fuel_used: u64,
    /// The run worker's peak resident set: everything the run used, host libraries included.
    pub peak_memory_bytes: u64,
    /// Peak of the sandbox's own budget (linear memories and host tensors).
    pub budget_peak_bytes: u64,
    pub wall_us: u64,
    pub compile: String,
    /// Released outputs (in `outputs/`).
    pub outputs: Vec<ReleasedOutput>,
    /// Outputs waiting for the data owner's decision (in `held/`; policy
    /// `[outputs] hold_for_release`).
    #[serde(default)]
    pub held: Vec<ReleasedOutput>,
    /// The data owner's decision on held outputs: `released` or `withheld`.
    #[serde(default)]
    pub decision: Option<String>,
    /// How the run's worker was confined and what it cost.
    pub worker: WorkerSummary,
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
            worker: None,
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
            worker: None,
        })
    }

    /// Start run workers with `command` instead of this executable's hidden subcommand (for
    /// programs other than `amicus` that embed a station, and tests).
    pub fn with_worker(mut self, command: WorkerCommand) -> Station {
        self.worker = Some(command);
        self
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
        Ok(AuditLog::for_station(&self.dir, &self.dir.join(KEY_FILE)))
    }

    /// Rotate the station's key (see [`crate::rekey`]). `keep_old_secret`: a registry knows
    /// this station by the old key; its daemon announces the hand-over with it, then deletes it.
    pub fn rekey(&self, keep_old_secret: bool) -> Result<crate::rekey::Rotated, StationError> {
        Ok(crate::rekey::rotate(
            &self.audit()?,
            &self.dir.join(KEY_FILE),
            keep_old_secret,
        )?)
    }

    /// Finish a key rotation a crash interrupted (see [`crate::rekey::finish_interrupted`]).
    pub fn finish_rekey(&self) -> Result<(), StationError> {
        Ok(crate::rekey::finish_interrupted(
            &self.audit()?,
            &self.dir.join(KEY_FILE),
        )?)
    }

    /// The ids of every key this station has signed with: the current one first, then the
    /// retired ones.
    pub fn key_ids(&self) -> Result<Vec<String>, StationError> {
        let mut ids = vec![self.public_key()?.id().to_string()];
        for k in crate::rekey::retired_keys(&self.dir)? {
            ids.push(k.public.id().to_string());
        }
        Ok(ids)
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

    /// Data owner: act on requests signed by this researcher's key.
    pub fn trust_researcher(&self, name: &str, key: &PublicKey) -> Result<(), StationError> {
        let audit = self.audit()?;
        let mut policy = self.policy()?;
        policy.trust_researcher(name, key)?;
        policy.save(&self.dir)?;
        audit.append(Event::ResearcherTrusted {
            name: name.to_string(),
            keyid: key.id().to_string(),
        })?;
        Ok(())
    }

    /// Record an event the station's daemon observed (a verified request, the weights a round
    /// starts from).
    pub fn record(&self, event: Event) -> Result<(), StationError> {
        self.audit()?.append(event.bounded())?;
        Ok(())
    }

    /// Data owner: approve a bundle digest for any parameters. Returns false when nothing
    /// changed.
    pub fn approve(&self, digest: Digest, train: Option<String>) -> Result<bool, StationError> {
        self.approve_scoped(digest, train, crate::policy::ApprovalScope::Any, None)
    }

    /// Data owner: approve a bundle digest with a scope (with `Exact`, for the parameter
    /// document whose SHA-256 is `params`). Returns false when nothing changed.
    pub fn approve_scoped(
        &self,
        digest: Digest,
        train: Option<String>,
        scope: crate::policy::ApprovalScope,
        params: Option<Digest>,
    ) -> Result<bool, StationError> {
        let audit = self.audit()?;
        let mut policy = self.policy()?;
        if !policy.approve_scoped(digest, train.clone(), scope, params) {
            return Ok(false);
        }
        policy.save(&self.dir)?;
        audit.append(Event::DigestApproved {
            digest,
            train,
            scope: Some(scope.name().to_string()),
            params_sha256: params.filter(|_| scope == crate::policy::ApprovalScope::Exact),
        })?;
        Ok(true)
    }

    /// Record that a securely aggregated round's update left masked (the daemon masks it
    /// after the run; see `amicus_daemon::secagg`).
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
}
