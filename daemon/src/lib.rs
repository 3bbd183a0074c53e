//! The station daemon (`amicus station serve`): a station's pull-only loop. It long-polls the registry for runs,
//! downloads and verifies bundles (cached by digest), holds trains that need the data owner's
//! approval, runs the rest through `amicus-runtime` (which verifies, admits, audits and runs),
//! seals outputs to the requesting researcher, and uploads results and the station's audit log.
//! The station never listens on a socket.
//!
//! Owns the daemon's journal (`<station>/registry/runs/<run>.json` while a run is open,
//! `registry/done/<run>.json` once the registry has its outcome), the bundle cache
//! (`<station>/registry/bundles/`), the owner's refusals (`<station>/registry/refusals/`) and
//! the masked updates of securely aggregated rounds (`<station>/registry/masked/`).
//! Must not check policy itself beyond asking whether a train awaits approval: admission is
//! the runtime's.
//!
//! Exactly-once rules: a run is journalled as started before the registry is told it runs and
//! before it runs; a daemon that finds a started run in its journal when it starts reports it
//! failed ("the station stopped during the run") and never runs it again. A run the registry
//! believes running that the journal does not know is reported failed too.
//!
//! Modules: [`request`] checks a delivered run against the researcher's signed request;
//! [`secagg`] is the station's part in a securely aggregated round. This crate is the station's
//! side of the registry protocol, outside the registry crate so that the registry does not
//! depend on the station runtime.

use amicus_registry::client::{ClientError, StationClient};
use amicus_registry::request::sign_output;
use amicus_registry::sealed::{RecipientPublicKey, SealContext, seal};
pub mod metrics;
pub mod request;
pub mod secagg;

use crate::request::{Admitted, Verified};
use amicus_bundle::{Bundle, SecretKey, sha256};
use amicus_registry::wire::{RoundWork, RunState, SealedOutput, WorkItem};
use amicus_runtime::sandbox::{FederatedRound, UPDATE_OUTPUT};
use amicus_runtime::station::{HeldState, KEY_FILE, Station, StationError};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Duration;

pub const DAEMON_DIR: &str = "registry";
const JOURNAL_DIR: &str = "runs";
const DONE_DIR: &str = "done";
const BUNDLE_DIR: &str = "bundles";
const REFUSAL_DIR: &str = "refusals";
const MASKED_DIR: &str = "masked";
/// Runs the daemon gave up on (`<run>.json` as it was, `<run>.reason`).
const PARKED_DIR: &str = "parked";
/// How often one run's processing may fail (not counting the registry being unreachable)
/// before the daemon parks it.
const MAX_ATTEMPTS: u32 = 3;
/// Passes in which the registry answered the daemon's poll but failed one run's step with a
/// "try again" (5xx, timeout) before that run is parked: a run the registry keeps failing
/// must not be retried for ever, nor hold up the station's other work.
const MAX_TRANSIENT_ATTEMPTS: u32 = 20;
/// Audit lines per upload, and bytes of them (well under the registry's body limit).
const AUDIT_BATCH: usize = 2000;
const AUDIT_BATCH_BYTES: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("{0}")]
    Station(#[from] StationError),
    #[error("{0}")]
    Key(#[from] amicus_bundle::KeyError),
    #[error("{0}")]
    Client(#[from] ClientError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}: corrupt journal entry")]
    Journal(PathBuf),
    #[error("no pending run {0} at this station")]
    NoSuchPending(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> DaemonError + '_ {
    move |source| DaemonError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What the station has done with a run, as the daemon journals it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "kebab-case", tag = "state")]
pub enum Progress {
    /// Seen; not started.
    Received,
    /// Waits for the data owner (`amicus station approve` / `refuse`).
    Held,
    /// Journalled before the registry is told and before the run: never run twice.
    Started,
    /// Ran; its outputs wait for the data owner's release (`[outputs] hold_for_release`,
    /// `amicus station release / withhold`). `local_run` is the station's run id.
    AwaitingRelease { local_run: String },
    /// Outcome known, not yet acknowledged by the registry.
    Finished { report: Report },
    /// The registry has the outcome.
    Reported { report: Report },
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "kebab-case", tag = "outcome")]
pub enum Report {
    /// Released outputs: (name, file) in the station's `runs/<local id>/outputs/`.
    Done {
        outputs: Vec<(String, PathBuf)>,
    },
    Refused {
        reason: String,
    },
    Failed {
        reason: String,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JournalEntry {
    pub item: WorkItem,
    pub progress: Progress,
    /// The train's name and version once the bundle was read.
    #[serde(default)]
    pub train_name: Option<String>,
}

fn plain_id(s: &str) -> bool {
    s.len() == 32 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn plain_digest(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn bundle_sha256(path: &Path) -> Result<amicus_bundle::Digest, DaemonError> {
    Ok(sha256(&std::fs::read(path).map_err(io(path))?))
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), DaemonError> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(io(parent))?;
    }
    amicus_bundle::bundle::write_atomic(path, bytes).map_err(io(path))
}

/// The daemon's files in a station directory.
pub struct Journal {
    dir: PathBuf,
}

impl Journal {
    pub fn new(station_dir: &Path) -> Journal {
        Journal {
            dir: station_dir.join(DAEMON_DIR),
        }
    }

    fn entry_path(&self, run: &str) -> PathBuf {
        self.dir.join(JOURNAL_DIR).join(format!("{run}.json"))
    }

    /// Where reported runs go, so each pass reads only the open ones.
    fn done_path(&self, run: &str) -> PathBuf {
        self.dir.join(DONE_DIR).join(format!("{run}.json"))
    }

    pub fn get(&self, run: &str) -> Result<Option<JournalEntry>, DaemonError> {
        for path in [self.entry_path(run), self.done_path(run)] {
            match std::fs::read(&path) {
                Ok(bytes) => {
                    return serde_json::from_slice(&bytes)
                        .map(Some)
                        .map_err(|_| DaemonError::Journal(path));
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io(&path)(e)),
            }
        }
        Ok(None)
    }

    /// Record a run's progress; a reported run moves to `registry/done/`.
    pub fn put(&self, e: &JournalEntry) -> Result<(), DaemonError> {
        let bytes = serde_json::to_vec_pretty(e).expect("journal entries serialise");
        if matches!(e.progress, Progress::Reported { .. }) {
            write_atomic(&self.done_path(&e.item.run), &bytes)?;
            let open = self.entry_path(&e.item.run);
            return match std::fs::remove_file(&open) {
                Err(err) if err.kind() != std::io::ErrorKind::NotFound => Err(io(&open)(err)),
                _ => Ok(()),
            };
        }
        write_atomic(&self.entry_path(&e.item.run), &bytes)
    }

    /// Every open entry. One that cannot be read is parked (with the reason), not fatal: one
    /// damaged entry must not stop the daemon, at every restart, from serving the others.
    pub fn all(&self) -> Result<Vec<JournalEntry>, DaemonError> {
        let dir = self.dir.join(JOURNAL_DIR);
        let Ok(rd) = std::fs::read_dir(&dir) else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(run) = name.strip_suffix(".json").filter(|r| plain_id(r)) else {
                continue;
            };
            match self.get(run) {
                Ok(Some(entry)) => out.push(entry),
                Ok(None) => {}
                Err(err) => {
                    say(&format!("run {run}: {err}; parked"));
                    self.park(run, &format!("unreadable journal entry: {err}"))?;
                }
            }
        }
        out.sort_by(|a, b| a.item.run.cmp(&b.item.run));
        Ok(out)
    }

    /// Count one failed attempt at `run`; returns how many there were.
    pub fn failed_attempt(&self, run: &str) -> Result<u32, DaemonError> {
        let path = self.dir.join(JOURNAL_DIR).join(format!("{run}.attempts"));
        let n = std::fs::read_to_string(&path)
            .ok()
            .and_then(|t| t.trim().parse::<u32>().ok())
            .unwrap_or(0)
            .saturating_add(1);
        write_atomic(&path, n.to_string().as_bytes())?;
        Ok(n)
    }

    /// Give up on `run`: its entry moves to `parked/` with the reason; the daemon leaves it.
    pub fn park(&self, run: &str, reason: &str) -> Result<(), DaemonError> {
        let dir = self.dir.join(PARKED_DIR);
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        let open = self.entry_path(run);
        let parked = dir.join(format!("{run}.json"));
        if open.exists() {
            std::fs::rename(&open, &parked).map_err(io(&parked))?;
        }
        let attempts = self.dir.join(JOURNAL_DIR).join(format!("{run}.attempts"));
        let _ = std::fs::remove_file(attempts);
        write_atomic(&dir.join(format!("{run}.reason")), reason.as_bytes())
    }

    /// Runs the daemon parked, with their reasons.
    pub fn parked(&self) -> Vec<(String, String)> {
        let dir = self.dir.join(PARKED_DIR);
        let Ok(rd) = std::fs::read_dir(&dir) else {
            return Vec::new();
        };
        let mut out: Vec<(String, String)> = rd
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                let run = name.strip_suffix(".reason")?.to_string();
                let reason = std::fs::read_to_string(e.path()).unwrap_or_default();
                Some((run, reason))
            })
            .collect();
        out.sort();
        out
    }

    /// A securely aggregated run's masked update, as it is sent.
    fn masked_path(&self, run: &str) -> PathBuf {
        self.dir.join(MASKED_DIR).join(format!("{run}.bin"))
    }

    /// Where the daemon caches the bundle of `digest` (verified when it was fetched).
    pub fn bundle_path(&self, digest: &str) -> PathBuf {
        self.dir.join(BUNDLE_DIR).join(format!("{digest}.train"))
    }

    fn refusal_path(&self, run: &str) -> PathBuf {
        self.dir.join(REFUSAL_DIR).join(run)
    }

    /// The data owner's refusal of a held run, if any.
    pub fn refusal(&self, run: &str) -> Option<String> {
        std::fs::read_to_string(self.refusal_path(run)).ok()
    }
}

/// The next lines to upload: at most `AUDIT_BATCH` lines and `AUDIT_BATCH_BYTES` bytes (at
/// least one line).
fn audit_batch(lines: &[&str]) -> Vec<String> {
    let mut bytes = 0usize;
    let mut out = Vec::new();
    for line in lines.iter().take(AUDIT_BATCH) {
        // A line goes out JSON-escaped: count it twice to be safe.
        let cost = line.len().saturating_mul(2).saturating_add(4);
        if !out.is_empty() && bytes.saturating_add(cost) > AUDIT_BATCH_BYTES {
            break;
        }
        bytes = bytes.saturating_add(cost);
        out.push(line.to_string());
    }
    out
}

/// Held runs, for `amicus station pending`.
pub fn pending(station_dir: &Path) -> Result<Vec<JournalEntry>, DaemonError> {
    Ok(Journal::new(station_dir)
        .all()?
        .into_iter()
        .filter(|e| e.progress == Progress::Held)
        .collect())
}

fn held(journal: &Journal, run: &str) -> Result<JournalEntry, DaemonError> {
    match journal.get(run)? {
        Some(e) if e.progress == Progress::Held => Ok(e),
        _ => Err(DaemonError::NoSuchPending(run.to_string())),
    }
}

/// `amicus station approve RUN`: approve the held run's bundle digest in the policy (audited
/// by the runtime). The daemon runs it on its next pass. Returns the digest.
pub fn approve(
    station_dir: &Path,
    run: &str,
    scope: amicus_runtime::policy::ApprovalScope,
) -> Result<String, DaemonError> {
    let entry = held(&Journal::new(station_dir), run)?;
    let st = Station::open(station_dir)?;
    let digest: amicus_bundle::Digest = entry
        .item
        .train
        .parse()
        .map_err(|_| DaemonError::Journal(Journal::new(station_dir).entry_path(run)))?;
    // `exact`: this run's parameters, as the registry delivered them.
    let params = (scope == amicus_runtime::policy::ApprovalScope::Exact)
        .then(|| sha256(entry.item.params.as_bytes()));
    st.approve_scoped(digest, entry.train_name.clone(), scope, params)?;
    Ok(entry.item.train)
}

/// `amicus station refuse RUN`: the daemon reports the run refused (and audits it) on its
/// next pass.
pub fn refuse(station_dir: &Path, run: &str, reason: &str) -> Result<(), DaemonError> {
    let journal = Journal::new(station_dir);
    held(&journal, run)?;
    let reason: String = reason
        .chars()
        .filter(|c| !c.is_control())
        .take(500)
        .collect();
    write_atomic(&journal.refusal_path(run), reason.as_bytes())
}

/// `<station>/network.toml`: how this station reaches its registry, kept with the station
/// so that hospital IT sets it once (command-line flags override it):
///
/// ```toml
/// registry = "https://registry.example.org"
/// ca_file = "registry-ca.pem"          # PEM; relative to the station directory
/// proxy = "http://proxy.hospital:3128"  # else HTTPS_PROXY / NO_PROXY
/// ```
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NetworkConfig {
    #[serde(default)]
    pub registry: Option<String>,
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    #[serde(default)]
    pub proxy: Option<String>,
}

pub const NETWORK_FILE: &str = "network.toml";

impl NetworkConfig {
    /// The station's file, or the empty configuration when it has none.
    pub fn read(station_dir: &Path) -> Result<NetworkConfig, DaemonError> {
        let path = station_dir.join(NETWORK_FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(e) => return Err(io(&path)(e)),
        };
        let mut c: NetworkConfig = toml::from_str(&text).map_err(|e| DaemonError::Io {
            path: path.clone(),
            source: std::io::Error::other(e.message().to_string()),
        })?;
        if let Some(ca) = &c.ca_file
            && ca.is_relative()
        {
            c.ca_file = Some(station_dir.join(ca));
        }
        Ok(c)
    }
}

/// How the daemon runs.
#[derive(Debug, Clone)]
pub struct DaemonOptions {
    pub dir: PathBuf,
    pub registry: String,
    /// TLS roots and proxy (see [`NetworkConfig`]).
    pub transport: amicus_registry::client::Transport,
    /// Long-poll length.
    pub poll_wait: Duration,
    /// Longest pause between attempts while the registry is unreachable.
    pub max_backoff: Duration,
    /// After a stop is asked for ([`Daemon::serve_until`]), how long a run in flight may go
    /// on before its worker is stopped and the run ends `interrupted`.
    pub stop_grace: Duration,
    /// Where the metrics file goes (default `<station>/registry/metrics.prom`).
    pub metrics_file: Option<PathBuf>,
}

/// A station's loop. Returns only on a local error the daemon cannot work around (station
/// directory unusable); registry outages are waited out.
pub struct Daemon {
    opts: DaemonOptions,
    client: StationClient,
    journal: Journal,
    /// The station's key: signs each sealed output so the researcher can tell this station's
    /// results from a registry's forgery.
    key: SecretKey,
    audit_next: Option<i64>,
    /// Length of `audit.log` when it was last uploaded in full: unchanged means nothing to send.
    audit_uploaded_len: Option<u64>,
    /// Becomes true when a stop is asked for: no new work from then on.
    stop: tokio::sync::watch::Receiver<bool>,
    metrics: metrics::Metrics,
}

fn say(msg: &str) {
    let t = humantime::format_rfc3339_seconds(std::time::SystemTime::now());
    eprintln!("{t} {msg}");
}

impl Daemon {
    pub fn new(opts: DaemonOptions) -> Result<Daemon, DaemonError> {
        let st = Station::open(&opts.dir)?;
        let key = SecretKey::read(&st.dir().join(KEY_FILE))?;
        let client = StationClient::with_transport(&opts.registry, key.clone(), &opts.transport)?;
        Ok(Daemon {
            journal: Journal::new(&opts.dir),
            key,
            opts,
            client,
            audit_next: None,
            audit_uploaded_len: None,
            stop: tokio::sync::watch::channel(false).1,
            metrics: metrics::Metrics::default(),
        })
    }

    /// Run until the process is killed.
    pub async fn serve(self) -> Result<(), DaemonError> {
        self.serve_until(std::future::pending()).await
    }

    /// Run until `stop` resolves (SIGTERM or SIGINT in `amicus station serve`), then stop
    /// cleanly: take no new work and stop waiting for it; let a run in flight finish within
    /// [`DaemonOptions::stop_grace`], after which its worker is stopped and the run ends
    /// `interrupted` (audited, and reported to the registry as such); send the reports and
    /// the audit log the registry can still take; return. Whatever is left (a report the
    /// registry did not take, work delivered but not started) is in the journal for the next
    /// start.
    pub async fn serve_until(
        mut self,
        stop: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Result<(), DaemonError> {
        let (tx, rx) = tokio::sync::watch::channel(false);
        self.stop = rx;
        let grace = self.opts.stop_grace;
        tokio::spawn(async move {
            stop.await;
            say(&format!(
                "stopping: no new work; a run in flight has {:.0} s to finish",
                grace.as_secs_f32()
            ));
            let _ = tx.send(true);
            tokio::time::sleep(grace).await;
            amicus_runtime::worker::supervise::interrupt_runs();
            // Keep the channel open: the daemon's receivers must not see it close.
            std::future::pending::<()>().await;
        });
        let result = self.serve_loop().await;
        self.write_metrics();
        if self.stopping() && result.is_ok() {
            // What the log gained during the last run, if the registry takes it quickly.
            if tokio::time::timeout(Duration::from_secs(5), self.upload_audit())
                .await
                .is_err()
            {
                say("stopping: the audit log upload did not finish; it is sent at the next start");
            }
            say("stopped");
        }
        result
    }

    /// Write the metrics file; a failure is said, never fatal.
    fn write_metrics(&self) {
        let path = self
            .opts
            .metrics_file
            .clone()
            .unwrap_or_else(|| self.opts.dir.join(DAEMON_DIR).join("metrics.prom"));
        let mut queue = [0i64; 5];
        if let Ok(entries) = self.journal.all() {
            for e in entries {
                let i = match e.progress {
                    Progress::Received => 0,
                    Progress::Held => 1,
                    Progress::Started => 2,
                    Progress::AwaitingRelease { .. } => 3,
                    Progress::Finished { .. } => 4,
                    Progress::Reported { .. } => continue,
                };
                queue[i] += 1;
            }
        }
        let audit_bytes = std::fs::metadata(self.opts.dir.join(amicus_runtime::audit::LOG_FILE))
            .map(|m| m.len())
            .unwrap_or(0);
        if let Err(e) = self.metrics.write(&path, queue, audit_bytes) {
            say(&format!(
                "cannot write the metrics file {}: {e}",
                path.display()
            ));
        }
    }

    /// Whether a stop was asked for.
    fn stopping(&self) -> bool {
        *self.stop.borrow()
    }

    /// Resolves once a stop is asked for (never, for [`Daemon::serve`]).
    fn stopped(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut rx = self.stop.clone();
        async move {
            if rx.wait_for(|s| *s).await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    /// Resolves a while after a stop is asked for: the grace for runs, and time to report
    /// them. A pass still going then is abandoned, as a crash would leave it (the journal
    /// is written before every step, so the next start takes up where it stopped).
    fn stopped_hard(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let stopped = self.stopped();
        let wait = self.opts.stop_grace + Duration::from_secs(10);
        async move {
            stopped.await;
            tokio::time::sleep(wait).await;
        }
    }

    async fn serve_loop(&mut self) -> Result<(), DaemonError> {
        let st = Station::open(&self.opts.dir)?;
        let recovered = st.recover()?;
        if recovered > 0 {
            say(&format!(
                "recovered {recovered} run(s) interrupted when the station stopped"
            ));
        }
        say(&format!(
            "station {} polls {} (no listening sockets)",
            st.config().name,
            self.opts.registry
        ));
        let mut backoff = Duration::from_secs(1);
        let mut reconciled = false;
        loop {
            if self.stopping() {
                return Ok(());
            }
            let hard = self.stopped_hard();
            let pass = async {
                self.take_up_rotation().await?;
                if !reconciled {
                    self.reconcile().await?;
                    reconciled = true;
                }
                self.pass().await
            };
            let pass = tokio::select! {
                r = pass => r,
                _ = hard => {
                    say("stopping: abandoning the work in progress; the next start takes it up");
                    return Ok(());
                }
            };
            self.write_metrics();
            match pass {
                Ok(()) => backoff = Duration::from_secs(1),
                // The registry (or a proxy in front of it) answered with something this station
                // cannot use, or not at all: wait and ask again. Only the station's own
                // directory failing stops the daemon.
                Err(DaemonError::Client(e)) => {
                    self.metrics.unreachable();
                    let mut jitter = [0u8; 1];
                    getrandom::fill(&mut jitter).ok();
                    if !e.is_transient() {
                        // A refusal is not cured by asking at once: wait longer.
                        backoff = backoff.max(Duration::from_secs(8));
                    }
                    let pause = backoff + Duration::from_millis(jitter[0] as u64 * 4);
                    say(&format!(
                        "registry unavailable or answering what this station cannot use ({}); retrying in {:.1} s",
                        amicus_bundle::text::shown(&e.to_string(), 300),
                        pause.as_secs_f32()
                    ));
                    tokio::select! {
                        _ = tokio::time::sleep(pause) => {}
                        _ = self.stopped() => return Ok(()),
                    }
                    backoff = (backoff * 2).min(self.opts.max_backoff);
                    // Our view of the registry's audit copy may be stale after an outage.
                    self.audit_next = None;
                    self.audit_uploaded_len = None;
                    // A work answer lost in the outage leaves a run `delivered` at the
                    // registry that this station never saw: reconcile again to pick it up.
                    reconciled = false;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Take up a rotation of the station's key (`amicus station rekey`, also while this daemon
    /// runs): sign with the current key from now on, and while the registry still knows the
    /// station by a retired key, upload the audit log through the hand-over with that key (the
    /// registry switches the station to the new key as it stores the hand-over); then delete
    /// the retired secrets. Until the registry has the hand-over the station takes no work.
    async fn take_up_rotation(&mut self) -> Result<(), DaemonError> {
        let dir = self.opts.dir.clone();
        // A rotation a crash interrupted is finished before anything is signed.
        Station::open(&dir)?.finish_rekey()?;
        let key_file = dir.join(KEY_FILE);
        let current =
            amicus_bundle::PublicKey::read(&amicus_bundle::keys::public_key_path(&key_file))?;
        if current != self.key.public() {
            let key = SecretKey::read(&key_file)?;
            if key.public() != current {
                // Another process is between the two renames of a rotation: take it up on the
                // next pass (the registry still knows the key this daemon holds).
                return Ok(());
            }
            self.key = key;
            self.client = self.client.with_key(self.key.clone());
            self.audit_next = None;
            self.audit_uploaded_len = None;
            say(&format!(
                "the station's key is now {} (amicus station rekey)",
                current.id()
            ));
        }
        let retired: Vec<SecretKey> = amicus_runtime::rekey::retired_keys(&dir)?
            .into_iter()
            .filter_map(|k| k.secret)
            .collect();
        if retired.is_empty() {
            return Ok(());
        }
        let known = |r: &Result<i64, ClientError>| match r {
            Ok(_) => Ok(true),
            Err(e) if e.code() == Some("unknown_station") => Ok(false),
            Err(_) => Err(()),
        };
        let mut answer = self.client.audit_next().await;
        if known(&answer) == Err(()) {
            return Err(answer
                .err()
                .map(DaemonError::from)
                .unwrap_or_else(|| DaemonError::Client(ClientError::Decode("no answer".into()))));
        }
        if known(&answer) == Ok(false) {
            for old in &retired {
                let client = self.client.with_key(old.clone());
                match client.audit_next().await {
                    Ok(next) => {
                        say(&format!(
                            "handing the registry the key rotation from key {} (in the audit log)",
                            old.public().id()
                        ));
                        self.audit_next = Some(next);
                        self.audit_uploaded_len = None;
                        self.upload_audit_with(&client).await?;
                        self.audit_next = None;
                        self.audit_uploaded_len = None;
                        break;
                    }
                    Err(e) if e.code() == Some("unknown_station") => continue,
                    Err(e) => return Err(e.into()),
                }
            }
            answer = self.client.audit_next().await;
        }
        match answer {
            Ok(_) => {
                let n = amicus_runtime::rekey::forget_retired_secrets(&dir)
                    .map_err(StationError::from)?;
                say(&format!(
                    "the registry knows this station by key {}; deleted {n} retired secret key(s)",
                    current.id()
                ));
                Ok(())
            }
            Err(e) => {
                say(&format!(
                    "the registry does not know this station's key {} yet and took no hand-over from a retired key ({}); the station takes no work until it does",
                    current.id(),
                    amicus_bundle::text::shown(&e.to_string(), 300)
                ));
                Err(e.into())
            }
        }
    }

    /// After a (re)start: settle every run the registry thinks is open here.
    async fn reconcile(&mut self) -> Result<(), DaemonError> {
        for item in self.client.open_runs().await? {
            let item = match item {
                Ok(item) => item,
                Err(e) => {
                    say(&format!(
                        "ignoring an open run this station cannot read: {e}"
                    ));
                    continue;
                }
            };
            if !plain_id(&item.run) {
                continue;
            }
            match self.journal.get(&item.run)? {
                None if item.state == RunState::Running => {
                    let report = Report::Failed {
                        reason: "the station has no record of starting this run (its state was lost); it was not run again".into(),
                    };
                    self.finish(item, None, report).await?;
                }
                // Delivered, but this station has no record (its journal was lost or the
                // daemon stopped before writing it): take it up now.
                None => self.journal.put(&JournalEntry {
                    item,
                    progress: Progress::Received,
                    train_name: None,
                })?,
                Some(e) => match e.progress {
                    Progress::Started => {
                        say(&format!(
                            "run {}: the station stopped during the run; reporting it failed",
                            item.run
                        ));
                        let report = Report::Failed {
                            reason: "the station stopped during the run; it was not run again"
                                .into(),
                        };
                        self.finish(item, e.train_name, report).await?;
                    }
                    Progress::Finished { .. }
                    | Progress::Received
                    | Progress::Held
                    | Progress::AwaitingRelease { .. } => {}
                    Progress::Reported { .. } => {}
                },
            }
        }
        // Started runs the registry no longer lists (expired meanwhile): close them locally.
        for e in self.journal.all()? {
            if e.progress == Progress::Started {
                let report = Report::Failed {
                    reason: "the station stopped during the run; it was not run again".into(),
                };
                self.finish(e.item, e.train_name, report).await?;
            }
        }
        Ok(())
    }

    /// One pass: send outstanding reports, settle held runs, wait for and do new work.
    async fn pass(&mut self) -> Result<(), DaemonError> {
        self.upload_audit().await?;
        let mut any_held = false;
        // Runs whose step failed with a transient error this pass: counted against them only
        // if the registry answers the poll below (otherwise it is simply unreachable).
        let mut stalled: Vec<(WorkItem, DaemonError)> = Vec::new();
        for e in self.journal.all()? {
            // Stopping: reports still go out, but nothing new starts.
            if self.stopping() && matches!(e.progress, Progress::Received | Progress::Held) {
                continue;
            }
            let item = e.item.clone();
            let result = match e.progress {
                Progress::Finished { report } => {
                    self.send_report(e.item, e.train_name, report).await
                }
                Progress::Received => self.process(e.item).await,
                Progress::Held => {
                    if let Some(reason) = self.journal.refusal(&e.item.run) {
                        self.owner_refused(e, &reason).await
                    } else {
                        match self.approved(&e.item) {
                            Ok(true) => {
                                say(&format!("run {}: approved by the data owner", e.item.run));
                                self.process(e.item).await
                            }
                            Ok(false) => {
                                any_held = true;
                                Ok(())
                            }
                            Err(err) => Err(err),
                        }
                    }
                }
                Progress::AwaitingRelease { local_run } => {
                    match self.owner_decided(e.item, e.train_name, &local_run).await {
                        Ok(true) => Ok(()),
                        Ok(false) => {
                            any_held = true;
                            Ok(())
                        }
                        Err(err) => Err(err),
                    }
                }
                Progress::Started | Progress::Reported { .. } => Ok(()),
            };
            match result {
                Ok(()) => {}
                Err(DaemonError::Client(e)) if e.is_transient() => {
                    stalled.push((item, DaemonError::Client(e)))
                }
                Err(err) => self.attempt_failed(item, err).await?,
            }
        }
        let wait = if any_held || !stalled.is_empty() {
            Duration::from_secs(2)
        } else {
            self.opts.poll_wait
        };
        if self.stopping() {
            return Ok(());
        }
        // A stop ends the long poll at once. A run the registry delivered in an answer dropped
        // here is taken up by the next start's reconciliation.
        let stopped = self.stopped();
        let polled = tokio::select! {
            r = self.client.work_items(wait.as_secs()) => r,
            _ = stopped => return Ok(()),
        };
        if polled.is_ok() {
            self.metrics.polled();
        }
        let items = match polled {
            Ok(items) => items,
            // The first stalled run's error says more than the poll's.
            Err(e) => return Err(stalled.into_iter().next().map_or(e.into(), |(_, err)| err)),
        };
        for (item, err) in stalled {
            self.stalled(item, err).await?;
        }
        for item in items {
            let item = match item {
                Ok(item) => item,
                Err(e) => {
                    say(&format!(
                        "ignoring a work item this station cannot read: {}",
                        amicus_bundle::text::shown(&e, 200)
                    ));
                    continue;
                }
            };
            if !plain_id(&item.run) || !plain_digest(&item.train) {
                say("ignoring a work item with a malformed run id or digest");
                continue;
            }
            if self.journal.get(&item.run)?.is_some() {
                continue;
            }
            if self.stopping() {
                // Delivered but not journalled: the next start's reconciliation takes it up.
                break;
            }
            say(&format!(
                "run {}: received (task {}, train {})",
                item.run,
                item.task,
                amicus_bundle::text::short(&item.train, 12)
            ));
            self.journal.put(&JournalEntry {
                item: item.clone(),
                progress: Progress::Received,
                train_name: None,
            })?;
            if let Err(err) = self.process(item.clone()).await {
                self.attempt_failed(item, err).await?;
            }
            self.upload_audit().await?;
        }
        Ok(())
    }

    /// One run's processing failed. The registry being unreachable is everyone's problem (the
    /// caller backs off); anything else is this run's: it is tried again on the next passes,
    /// and after `MAX_ATTEMPTS` failures parked, reported failed if the registry takes it,
    /// and left alone. The daemon goes on either way.
    async fn attempt_failed(
        &mut self,
        item: WorkItem,
        err: DaemonError,
    ) -> Result<(), DaemonError> {
        if let DaemonError::Client(e) = &err
            && e.is_transient()
        {
            return Err(err);
        }
        let run = item.run.clone();
        let n = self.journal.failed_attempt(&run)?;
        say(&format!("run {run}: attempt {n} failed: {err}"));
        if n < MAX_ATTEMPTS {
            return Ok(());
        }
        let reason = format!("the station gave up on this run after {n} attempts: {err}");
        self.journal.park(&run, &reason)?;
        say(&format!("run {run}: parked ({reason})"));
        let class =
            "failed: the station could not process this run; its data owner has the details";
        match self
            .client
            .report(&run, RunState::Failed, Some(class.into()))
            .await
        {
            Err(e) if e.is_transient() => Err(e.into()),
            _ => Ok(()),
        }
    }

    /// The registry answers, but failed this run's step with a transient error: count it, and
    /// park the run after `MAX_TRANSIENT_ATTEMPTS` such passes.
    async fn stalled(&mut self, item: WorkItem, err: DaemonError) -> Result<(), DaemonError> {
        let run = item.run.clone();
        let n = self.journal.failed_attempt(&format!("{run}.transient"))?;
        say(&format!(
            "run {run}: the registry failed this step ({n}): {err}"
        ));
        if n < MAX_TRANSIENT_ATTEMPTS {
            return Ok(());
        }
        let reason =
            format!("the registry failed this run's step {n} times while answering others: {err}");
        self.journal.park(&run, &reason)?;
        let _ = std::fs::remove_file(
            self.journal
                .dir
                .join(JOURNAL_DIR)
                .join(format!("{run}.transient.attempts")),
        );
        say(&format!("run {run}: parked ({reason})"));
        Ok(())
    }

    /// Whether the data owner's approval now covers this run (its digest, and its parameters
    /// under the approval's scope).
    fn approved(&self, item: &WorkItem) -> Result<bool, DaemonError> {
        let st = Station::open(&self.opts.dir)?;
        let policy = st.policy()?;
        let Ok(digest) = item.train.parse::<amicus_bundle::Digest>() else {
            return Ok(false);
        };
        if !policy.is_approved(&digest) {
            return Ok(false);
        }
        Ok(match Bundle::read(&self.journal.bundle_path(&item.train)) {
            Ok(b) => policy.admit_params(&b, &item.params).is_ok(),
            // Not cached: processing fetches it and decides.
            Err(_) => true,
        })
    }

    /// The bundle for `digest`, from the cache or the registry; verified to be that digest.
    async fn bundle(&self, digest: &str) -> Result<Result<(PathBuf, Bundle), Report>, DaemonError> {
        let path = self.journal.bundle_path(digest);
        if !path.exists() {
            let bytes = self.client.train(digest).await?;
            let parsed = match Bundle::from_reader(&bytes[..]) {
                Ok(b) => b,
                Err(e) => {
                    let st = Station::open(&self.opts.dir)?;
                    let reason = format!("the bundle the registry sent does not verify: {e}");
                    st.record_refusal(None, sha256(&bytes), "bundle", &reason)?;
                    return Ok(Err(Report::Refused { reason }));
                }
            };
            if parsed.digest().to_hex() != digest {
                let st = Station::open(&self.opts.dir)?;
                let reason = format!(
                    "the registry sent bundle {} for train {digest}",
                    parsed.digest().to_hex()
                );
                st.record_refusal(Some(parsed.digest()), sha256(&bytes), "bundle", &reason)?;
                return Ok(Err(Report::Refused { reason }));
            }
            write_atomic(&path, &bytes)?;
            return Ok(Ok((path, parsed)));
        }
        match Bundle::read(&path) {
            Ok(b) if b.digest().to_hex() == digest => Ok(Ok((path, b))),
            _ => {
                // A damaged cache entry: drop it and fetch again next pass.
                std::fs::remove_file(&path).map_err(io(&path))?;
                Err(DaemonError::Client(ClientError::Unreachable {
                    url: "bundle cache".into(),
                    reason: "cached bundle damaged; fetching again".into(),
                }))
            }
        }
    }

    async fn process(&mut self, mut item: WorkItem) -> Result<(), DaemonError> {
        let (path, bundle) = match self.bundle(&item.train).await? {
            Ok(b) => b,
            Err(report) => return self.finish(item, None, report).await,
        };
        let st = Station::open(&self.opts.dir)?;
        let policy = st.policy()?;
        // The researcher's signed request, checked before anything else is looked at.
        let verified = match self.check_request(&st, &policy, &item, &path)? {
            Ok(v) => v,
            Err(report) => return self.finish(item, None, report).await,
        };
        if let Some((_, round)) = &verified {
            item.job = round.as_deref().cloned();
        }
        let name = format!(
            "{}@{}",
            bundle.manifest().train.name,
            bundle.manifest().train.version
        );
        // Held for the data owner: a digest not approved, or approved for other parameters
        // than this run's (the owner can approve these exactly: `station approve RUN`).
        let admitted = policy.admit(&bundle).and_then(|_| {
            policy
                .admit_params(&bundle, &item.params)
                .map(|_| ())
                .map_err(|r| amicus_runtime::policy::Refusal::new("approval", r.reason))
        });
        if let Err(r) = admitted
            && r.stage == "approval"
        {
            let entry = JournalEntry {
                item: item.clone(),
                progress: Progress::Held,
                train_name: Some(bundle.manifest().train.name.clone()),
            };
            let was_held = self
                .journal
                .get(&item.run)?
                .is_some_and(|e| e.progress == Progress::Held);
            self.journal.put(&entry)?;
            if !was_held {
                say(&format!(
                    "run {}: {name} awaits the data owner's approval (amicus station pending / approve / refuse)",
                    item.run
                ));
                self.client
                    .report(
                        &item.run,
                        RunState::Delivered,
                        Some("awaiting the data owner's approval".into()),
                    )
                    .await?;
            }
            return Ok(());
        }
        let bundle_digest = Some(bundle.digest());
        drop(bundle);
        // A round of a federated job starts from the registry's global weights.
        let round = match &item.job {
            None => None,
            Some(job) => {
                let bytes = match self.client.round_weights(&job.job, job.round).await {
                    Ok(b) => b,
                    Err(e) if e.is_transient() => return Err(e.into()),
                    Err(e) => {
                        let reason = format!("the round's global weights: {e}");
                        return self
                            .finish(item, Some(name), Report::Failed { reason })
                            .await;
                    }
                };
                let digest = sha256(&bytes);
                // The first round starts from the weights the researcher signed for.
                let signed_initial = verified
                    .as_ref()
                    .and_then(|(v, _)| v.statement.initial_weights_sha256.clone());
                if job.round == 1
                    && let Some(signed) = signed_initial
                    && signed != digest.to_hex()
                {
                    let reason = format!(
                        "request: the request was changed on the way: the first round's weights ({}) are not those the researcher signed for",
                        digest.to_hex()
                    );
                    st.record_refusal(bundle_digest, bundle_sha256(&path)?, "request", &reason)?;
                    return self
                        .finish(item, Some(name), Report::Refused { reason })
                        .await;
                }
                st.record(amicus_runtime::audit::Event::GlobalWeightsReceived {
                    job: job.job.clone(),
                    round: job.round,
                    bytes: bytes.len() as u64,
                    sha256: digest,
                })?;
                match amicus_fl::wire::Weights::decode(&bytes) {
                    Ok(global) => Some(FederatedRound {
                        job: job.job.clone(),
                        number: job.round,
                        rounds: job.rounds,
                        proximal_mu: job.proximal_mu,
                        global: std::sync::Arc::new(global),
                        encoding: job.encoding,
                        clip_norm: job.dp.map(|d| d.clip_norm),
                        noise_multiplier: job.dp.map(|d| d.noise_multiplier),
                    }),
                    Err(e) => {
                        let reason = format!("the round's global weights do not decode: {e}");
                        return self
                            .finish(item, Some(name), Report::Failed { reason })
                            .await;
                    }
                }
            }
        };
        // Journal first: from here on this run is never started again.
        self.journal.put(&JournalEntry {
            item: item.clone(),
            progress: Progress::Started,
            train_name: Some(name.clone()),
        })?;
        if let Err(e) = self.client.report(&item.run, RunState::Running, None).await {
            // Not started: back to received, to try again (or to learn it expired).
            let conflict = e.code() == Some("conflict") || e.code() == Some("not_found");
            if conflict {
                say(&format!(
                    "run {}: the registry no longer expects it ({e})",
                    item.run
                ));
                self.journal.put(&JournalEntry {
                    item,
                    progress: Progress::Reported {
                        report: Report::Failed {
                            reason: format!("not started: {e}"),
                        },
                    },
                    train_name: Some(name),
                })?;
                return Ok(());
            }
            self.journal.put(&JournalEntry {
                item,
                progress: Progress::Received,
                train_name: Some(name),
            })?;
            return Err(e.into());
        }
        say(&format!("run {}: running {name}", item.run));
        // A securely aggregated round: keys and shares go out before training, so the masks
        // are fixed before anyone's update exists.
        let secagg = match item
            .job
            .as_ref()
            .and_then(|j| j.secure_aggregation.map(|p| (j, p)))
        {
            None => None,
            Some((job, plan)) => {
                let named = verified
                    .as_ref()
                    .map(|(v, _)| v.statement.station_keys.clone())
                    .unwrap_or_default();
                match secagg::join(
                    &self.client,
                    &self.key,
                    &item.station,
                    &named,
                    &job.job,
                    job.round,
                    plan,
                    item.expires_ms,
                )
                .await
                {
                    Ok(session) => {
                        say(&format!(
                            "run {}: secure aggregation: keys and shares exchanged",
                            item.run
                        ));
                        Some((session, plan))
                    }
                    Err(e) => {
                        let reason = e.to_string();
                        return self
                            .finish(item, Some(name), Report::Failed { reason })
                            .await;
                    }
                }
            }
        };
        let dir = self.opts.dir.clone();
        let params = item.params.clone();
        let run_started = std::time::Instant::now();
        let outcome = tokio::task::spawn_blocking(move || {
            let st = Station::open(&dir)?;
            match round {
                Some(round) => st.run_round(&path, Some(&params), round, Box::new(|_, _| {})),
                None => st.run(&path, Some(&params), Box::new(|_, _| {})),
            }
        })
        .await
        .unwrap_or_else(|e| {
            Err(StationError::RunFailed {
                run_id: String::new(),
                outcome: "crashed".into(),
                reason: e.to_string(),
            })
        });
        self.metrics.ran(run_started.elapsed());
        let local_run = outcome.as_ref().map(|r| r.run_id.clone()).ok();
        // Outputs held for the data owner: nothing is reported until they decide.
        if let Ok(record) = &outcome
            && !record.held.is_empty()
        {
            say(&format!(
                "run {}: {name} succeeded; its outputs are held for the data owner (amicus station held / release / withhold {})",
                item.run, record.run_id
            ));
            return self.journal.put(&JournalEntry {
                progress: Progress::AwaitingRelease {
                    local_run: record.run_id.clone(),
                },
                item,
                train_name: Some(name),
            });
        }
        let report = match outcome {
            Ok(record) => Report::Done {
                outputs: record
                    .outputs
                    .into_iter()
                    .map(|o| (o.name, o.path))
                    .collect(),
            },
            Err(StationError::Refused(r)) => Report::Refused {
                reason: format!("{}: {}", r.stage, r.reason),
            },
            Err(StationError::RunFailed { outcome, .. }) => {
                // Only the outcome's class leaves: the train's own text, the exact outcome and
                // figures stay at the station (amicus_runtime::disclosure).
                let class = amicus_runtime::disclosure::outcome_class(&outcome);
                Report::Failed {
                    reason: format!(
                        "{class}: {}",
                        amicus_runtime::disclosure::class_reason(class).unwrap_or_default()
                    ),
                }
            }
            Err(e) => Report::Failed {
                reason: format!("station error: {e}"),
            },
        };
        let Some((session, plan)) = secagg else {
            return self.finish(item, Some(name), report).await;
        };
        // Only the masked update leaves; the plain one stays in the run's outputs here.
        let report = match report {
            Report::Done { outputs } => {
                let local_run = local_run.unwrap_or_default();
                self.mask_update(&item.run, &local_run, &session, outputs)?
            }
            other => other,
        };
        let masked = matches!(report, Report::Done { .. });
        let run = item.run.clone();
        let reveal_by = item.expires_ms + (plan.exchange_seconds as i64 + 30) * 1000;
        self.finish(item, Some(name), report).await?;
        if masked {
            let (job, round) = (session.job().to_string(), session.round());
            match session.reveal(&self.client, reveal_by).await {
                Ok(None) => say(&format!(
                    "run {run}: secure aggregation: nothing to reveal (the round was not unmasked with this station)"
                )),
                Ok(Some((survivors, dropped))) => {
                    Station::open(&self.opts.dir)?.record_shares_revealed(
                        &job,
                        round,
                        survivors as u32,
                        dropped as u32,
                    )?;
                    say(&format!(
                        "run {run}: secure aggregation: revealed shares of {survivors} survivor(s) and {dropped} dropped station(s)"
                    ))
                }
                Err(e) => say(&format!("run {run}: {e}")),
            }
            self.upload_audit().await?;
        }
        Ok(())
    }

    /// Whether the registry delivered what the researcher signed for (`request`):
    /// `Ok(None)` when the policy does not require signed requests and none came, the verified
    /// request (and for a job round, the round rebuilt from the signed plan) otherwise, or the
    /// refusal to report. Refusals are audited.
    #[allow(clippy::type_complexity)]
    fn check_request(
        &self,
        st: &Station,
        policy: &amicus_runtime::policy::Policy,
        item: &WorkItem,
        bundle_path: &Path,
    ) -> Result<Result<Option<(Verified, Option<Box<RoundWork>>)>, Report>, DaemonError> {
        let admitted = request::admit(
            &self.opts.dir.join(DAEMON_DIR),
            &st.key_ids()?,
            &policy.researcher_keys(),
            policy.require_signed_requests,
            item,
            amicus_registry::db::now_ms(),
        );
        match admitted {
            Ok(Admitted::Unsigned) => Ok(Ok(None)),
            Ok(Admitted::Verified { verified, round }) => {
                if verified.first_time {
                    st.record(amicus_runtime::audit::Event::RequestVerified {
                        registry_run: item.run.clone(),
                        task: item.task.clone(),
                        job: item.job.as_ref().map(|j| j.job.clone()),
                        round: item.job.as_ref().map(|j| j.round),
                        researcher: verified.researcher.clone(),
                        keyid: verified.keyid.clone(),
                        statement_sha256: verified.statement_sha256,
                    })?;
                    say(&format!(
                        "run {}: request signed by researcher {} verified",
                        item.run, verified.researcher
                    ));
                }
                Ok(Ok(Some((*verified, round))))
            }
            Err(e) => {
                let reason = format!("request: {e}");
                st.record_refusal(
                    item.train.parse().ok(),
                    bundle_sha256(bundle_path)?,
                    "request",
                    &reason,
                )?;
                say(&format!("run {}: refused: {reason}", item.run));
                Ok(Err(Report::Refused { reason }))
            }
        }
    }

    /// Replace the run's update output by its masked form, written beside the journal.
    fn mask_update(
        &self,
        run: &str,
        local_run: &str,
        session: &secagg::SecAggSession,
        outputs: Vec<(String, PathBuf)>,
    ) -> Result<Report, DaemonError> {
        let mut masked_outputs = Vec::new();
        for (name, path) in outputs {
            if name != UPDATE_OUTPUT {
                masked_outputs.push((name, path));
                continue;
            }
            let plain = std::fs::read(&path).map_err(io(&path))?;
            let masked = match session.mask(&plain) {
                Ok(m) => m,
                Err(e) => {
                    return Ok(Report::Failed {
                        reason: e.to_string(),
                    });
                }
            };
            let masked_path = self.journal.masked_path(run);
            write_atomic(&masked_path, &masked)?;
            Station::open(&self.opts.dir)?.record_masked_update(
                local_run,
                session.job(),
                session.round(),
                session.sharers() as u32,
                session.threshold() as u32,
                &masked,
            )?;
            masked_outputs.push((name, masked_path));
        }
        Ok(Report::Done {
            outputs: masked_outputs,
        })
    }

    /// A run whose outputs were held: report it once the data owner decided. Returns whether
    /// they did.
    async fn owner_decided(
        &mut self,
        item: WorkItem,
        train_name: Option<String>,
        local_run: &str,
    ) -> Result<bool, DaemonError> {
        let st = Station::open(&self.opts.dir)?;
        let report = match st.held_state(local_run)? {
            HeldState::Waiting(_) => return Ok(false),
            HeldState::Released(record) => Report::Done {
                outputs: record
                    .outputs
                    .into_iter()
                    .map(|o| (o.name, o.path))
                    .collect(),
            },
            // The owner's reason stays at the station.
            HeldState::Withheld { .. } => Report::Failed {
                reason: "withheld: the station's data owner did not release the outputs".into(),
            },
            HeldState::NotHeld => Report::Failed {
                reason:
                    "failed: the station could not process this run; its data owner has the details"
                        .into(),
            },
        };
        self.finish(item, train_name, report).await?;
        Ok(true)
    }

    async fn owner_refused(&mut self, e: JournalEntry, reason: &str) -> Result<(), DaemonError> {
        let st = Station::open(&self.opts.dir)?;
        let path = self.journal.bundle_path(&e.item.train);
        let bytes = std::fs::read(&path).map_err(io(&path))?;
        let reason = format!("refused by the data owner: {reason}");
        st.record_refusal(e.item.train.parse().ok(), sha256(&bytes), "owner", &reason)?;
        say(&format!("run {}: {reason}", e.item.run));
        self.finish(e.item, e.train_name, Report::Refused { reason })
            .await
    }

    async fn finish(
        &mut self,
        item: WorkItem,
        train_name: Option<String>,
        report: Report,
    ) -> Result<(), DaemonError> {
        self.metrics.reported(match &report {
            Report::Done { .. } => "done",
            Report::Refused { .. } => "refused",
            Report::Failed { .. } => "failed",
        });
        self.journal.put(&JournalEntry {
            item: item.clone(),
            progress: Progress::Finished {
                report: report.clone(),
            },
            train_name: train_name.clone(),
        })?;
        self.upload_audit().await?;
        self.send_report(item, train_name, report).await
    }

    async fn send_report(
        &mut self,
        item: WorkItem,
        train_name: Option<String>,
        report: Report,
    ) -> Result<(), DaemonError> {
        let sent = match &report {
            Report::Done { outputs } => {
                let recipient =
                    RecipientPublicKey::from_pem(&item.recipient_key, "the task's recipient key");
                match recipient {
                    Ok(recipient) => {
                        let mut sealed = Vec::new();
                        let mut update = None;
                        for (name, path) in outputs {
                            if item.job.is_some() && name == UPDATE_OUTPUT {
                                // For the registry to aggregate: already clipped, noised and
                                // encoded by the station; not sealed to the researcher.
                                update = Some(std::fs::read(path).map_err(io(path))?);
                                continue;
                            }
                            let plain = std::fs::read(path).map_err(io(path))?;
                            let ctx = SealContext {
                                task: &item.task,
                                run: &item.run,
                                station: &item.station,
                                output: name,
                            };
                            let s =
                                seal(&recipient, &ctx, &plain).map_err(|e| DaemonError::Io {
                                    path: path.clone(),
                                    source: std::io::Error::other(e.to_string()),
                                })?;
                            let round = item.job.as_ref().map(|j| (j.job.as_str(), j.round));
                            let signature = sign_output(&self.key, &ctx, round, &s);
                            sealed.push(SealedOutput {
                                name: name.clone(),
                                sealed: B64.encode(s),
                                signature: Some(signature),
                            });
                        }
                        self.client
                            .result_with_update(&item.run, sealed, update.as_deref())
                            .await
                    }
                    Err(e) => {
                        self.client
                            .report(
                                &item.run,
                                RunState::Failed,
                                Some(format!("outputs not sent: {e}")),
                            )
                            .await
                    }
                }
            }
            Report::Refused { reason } => {
                self.client
                    .report(&item.run, RunState::Refused, Some(reason.clone()))
                    .await
            }
            Report::Failed { reason } => {
                self.client
                    .report(&item.run, RunState::Failed, Some(reason.clone()))
                    .await
            }
        };
        match sent {
            Ok(()) => {}
            Err(e) if e.is_transient() => return Err(e.into()),
            // The registry will never take it (expired meanwhile): keep the record, stop trying.
            Err(e) => say(&format!(
                "run {}: the registry did not take the report: {e}",
                item.run
            )),
        }
        let what = match &report {
            Report::Done { outputs } => format!("done, {} sealed output(s) sent", outputs.len()),
            Report::Refused { reason } => format!("refused: {reason}"),
            Report::Failed { reason } => format!("failed: {reason}"),
        };
        say(&format!("run {}: {what}", item.run));
        self.journal.put(&JournalEntry {
            item,
            progress: Progress::Reported { report },
            train_name,
        })
    }

    /// Send the audit lines the registry does not have yet, with the signed head.
    async fn upload_audit(&mut self) -> Result<(), DaemonError> {
        let client = self.client.clone();
        self.upload_audit_with(&client).await
    }

    /// Upload the public chain's new lines as `client` (the station's current key, or a
    /// retired one while the registry learns of a rotation).
    async fn upload_audit_with(&mut self, client: &StationClient) -> Result<(), DaemonError> {
        let next = match self.audit_next {
            Some(n) => n,
            None => client.audit_next().await?,
        };
        let dir = &self.opts.dir;
        let log = dir.join(amicus_runtime::audit::PUBLIC_LOG_FILE);
        // Each pass calls this; read the log only when it grew since the last full upload.
        let len = std::fs::metadata(&log).map(|m| m.len()).ok();
        if self.audit_next.is_some() && len.is_some() && len == self.audit_uploaded_len {
            return Ok(());
        }
        let data = match std::fs::read(&log) {
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(io(&log)(e)),
        };
        let complete = data.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        let text = String::from_utf8_lossy(&data[..complete]);
        let lines: Vec<&str> = text.lines().collect();
        let mut next = next.max(0) as usize;
        if next > lines.len() {
            // The registry has more than this log: never overwrite it; say so.
            say(&format!(
                "the registry holds {next} audit entries but this log has {}; not uploading",
                lines.len()
            ));
            self.audit_next = Some(next as i64);
            return Ok(());
        }
        while next < lines.len() {
            let batch = audit_batch(&lines[next..]);
            let last_seq = (next + batch.len()) as u64 - 1;
            // The signed head goes with the batch it describes (an entry appended since the
            // log was read would make it run ahead of the lines).
            let head_path = dir.join(amicus_runtime::audit::PUBLIC_HEAD_FILE);
            let head = std::fs::read_to_string(&head_path).ok().filter(|h| {
                serde_json::from_str::<serde_json::Value>(h)
                    .ok()
                    .and_then(|v| v["seq"].as_u64())
                    == Some(last_seq)
            });
            match client.upload_audit(batch, head).await {
                Ok(n) => next = n as usize,
                Err(e) if e.code() == Some("conflict") => {
                    next = client.audit_next().await? as usize;
                }
                Err(e) if e.is_transient() => return Err(e.into()),
                Err(e) => {
                    // The registry will not take these lines (it says why): not a reason to
                    // stop serving. Try again when the log has grown.
                    say(&format!("the registry did not take the audit log: {e}"));
                    self.audit_next = None;
                    self.audit_uploaded_len = Some(complete as u64);
                    return Ok(());
                }
            }
        }
        self.audit_next = Some(next as i64);
        self.audit_uploaded_len = Some(complete as u64);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn audit_batches_stay_under_the_body_limit() {
        let long = "x".repeat(4096);
        let lines: Vec<&str> = (0..2000).map(|_| long.as_str()).collect();
        let batch = audit_batch(&lines);
        assert!(!batch.is_empty());
        let bytes: usize = batch.iter().map(|l| l.len() * 2 + 4).sum();
        assert!(bytes <= AUDIT_BATCH_BYTES, "{bytes}");
        // A single line over the budget still goes (alone): progress is always made.
        let huge = "y".repeat(AUDIT_BATCH_BYTES);
        assert_eq!(audit_batch(&[huge.as_str(), "z"]).len(), 1);
        assert!(audit_batch(&[]).is_empty());
    }

    #[test]
    fn a_damaged_journal_entry_is_parked_not_fatal() {
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::new(dir.path());
        let run = "0123456789abcdef0123456789abcdef";
        let path = journal.entry_path(run);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, b"{ not json").unwrap();
        assert!(journal.all().unwrap().is_empty());
        assert!(!path.exists());
        let parked = journal.parked();
        assert_eq!(parked.len(), 1);
        assert_eq!(parked[0].0, run);
        assert!(parked[0].1.contains("unreadable"), "{parked:?}");
        assert_eq!(journal.failed_attempt(run).unwrap(), 1);
        assert_eq!(journal.failed_attempt(run).unwrap(), 2);
    }
}
