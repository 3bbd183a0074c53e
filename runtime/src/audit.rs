//! The station's tamper-evident audit log.
//!
//! `audit.log` holds one JSON line per event: `{"entry":{...},"sig":"<base64>"}`. The entry
//! carries its sequence number, time, the SHA-256 of the previous entry's exact bytes (`prev`)
//! and the event. `sig` is the station's Ed25519 signature over `DOMAIN || entry bytes`, so an
//! edited, deleted, reordered or inserted entry breaks the chain or a signature.
//!
//! `audit.head` records the last entry's sequence number and hash, signed, rewritten atomically
//! after every append. It catches truncation of whole lines, which a hash chain alone cannot.
//!
//! Crash safety: an entry is appended with one `write` and synced before the head is updated.
//! A crash mid-append leaves a torn last line; the next writer moves those bytes to
//! `audit.torn-<offset>` and records a `torn-tail-recovered` event, and `verify` reports a torn
//! tail without failing the entries before it. Appends from several processes are serialised
//! with an exclusive lock on `audit.lock`.
//!
//! **What leaves.** Every entry is also projected (see [`crate::disclosure`]) onto a second chain,
//! `audit-public.log` with `audit-public.head`, signed by the same key under its own domain:
//! the copy that leaves the station (uploaded to the registry, exported as PROV-O). It carries
//! no text a run influenced and no capability call (their order alone would be a channel), run
//! figures coarsened, times to the second; each public entry names the local entry it projects
//! (`local_seq`). `verify` checks both chains and that the public one is exactly the projection
//! of the local one. A crash between the two appends is repaired by the next append.
//!
//! This module owns those files and nothing else; it never decides *what* to log.

use crate::disclosure::{PublicEvent, public};
pub use amicus_bundle::audit_chain::{
    Chain, Checked, GENESIS, HEAD_FILE, HeadFile, KeySpan, LOCAL, LOG_FILE, PUBLIC,
    PUBLIC_HEAD_FILE, PUBLIC_LOG_FILE, VerifyReport, check_line, rekey_message, verify_lines,
};
use amicus_bundle::audit_chain::{
    EntryHeader, HANDOVER_EVENT, HandOverFields, Head, LineIn, head_message,
};
use amicus_bundle::{Digest, PublicKey, SecretKey, sha256};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// Longest line an append may write; events truncate their free-text fields well below this.
const MAX_LINE: usize = 256 * 1024;
/// Longest free-text field (reasons, queries) kept in an event.
pub const MAX_TEXT: usize = 4096;

const LOCK_FILE: &str = "audit.lock";

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "audit log {path} is damaged ({reason}); the station refuses to run until `amicus audit verify` passes"
    )]
    Damaged { path: PathBuf, reason: String },
    #[error("{0}")]
    Key(#[from] amicus_bundle::KeyError),
}

/// What happened. Free-text fields are cut to [`MAX_TEXT`] bytes by [`Event::bounded`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum Event {
    StationInitialised {
        station_key: String,
        archive: String,
    },
    SignerTrusted {
        name: String,
        keyid: String,
    },
    /// The data owner trusts a researcher's key for signed requests.
    ResearcherTrusted {
        name: String,
        keyid: String,
    },
    /// A request from the registry carried a trusted researcher's signature and asks for
    /// exactly what the registry delivered (`amicus_registry::request`).
    RequestVerified {
        /// The registry's run id.
        registry_run: String,
        task: String,
        job: Option<String>,
        round: Option<u32>,
        researcher: String,
        keyid: String,
        statement_sha256: Digest,
    },
    /// The global weights a round of a federated job starts from, as received.
    GlobalWeightsReceived {
        job: String,
        round: u32,
        bytes: u64,
        sha256: Digest,
    },
    DigestApproved {
        digest: Digest,
        train: Option<String>,
        /// What the approval admits (`any`, `schema`, `exact`); absent: any (before scopes).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        scope: Option<String>,
        /// With scope `exact`: the parameters approved by this entry.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        params_sha256: Option<Digest>,
    },
    TrainReceived {
        digest: Digest,
        train: String,
        version: String,
        bundle_sha256: Digest,
        bundle_bytes: u64,
        signers: Vec<String>,
    },
    /// A bundle or run request the station refused before running anything.
    TrainRefused {
        digest: Option<Digest>,
        bundle_sha256: Digest,
        stage: String,
        reason: String,
    },
    RunStarted {
        run_id: String,
        digest: Digest,
        params_sha256: Digest,
        fuel: u64,
        memory_bytes: u64,
        wall_ms: u64,
        seed: String,
        /// The approval scope that admitted the run (`any`, `schema`, `exact`, `not required`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        approval: Option<String>,
    },
    CapabilityCall {
        run_id: String,
        capability: String,
        call: String,
        detail: String,
        rows: Option<u64>,
        outcome: String,
        /// Consecutive identical calls this entry stands for (absent: one).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        count: Option<u64>,
    },
    /// The cohort queries a run made (and the ε of its noisy tallies), counted against its
    /// digest's budgets on this station.
    CohortQueriesCounted {
        run_id: String,
        queries: u64,
        tally_epsilon: f64,
        /// The digest's totals after this run.
        digest_queries: u64,
        digest_epsilon: f64,
    },
    /// The run's worker process is set up and confined as described; the train starts.
    WorkerStarted {
        run_id: String,
        /// `enforced (ABI N)`, `partially enforced (ABI N)` or `not enforced: why`.
        landlock: String,
        seccomp: String,
        memory_limit_bytes: u64,
        cpu_limit_seconds: u64,
        capabilities_dropped: bool,
        /// Where the confinement falls short (empty when complete).
        gaps: Vec<String>,
    },
    OutputReleased {
        run_id: String,
        name: String,
        bytes: u64,
        sha256: Digest,
    },
    /// A run's output passed the output rules and waits at the station for the data owner's
    /// decision (`[outputs] hold_for_release`).
    OutputHeld {
        run_id: String,
        name: String,
        bytes: u64,
        sha256: Digest,
    },
    /// The data owner decided on a run's held outputs: `released` (each output then has its
    /// `output-released` entry) or `withheld` (the outputs were deleted).
    HeldOutputsDecided {
        run_id: String,
        decision: String,
        outputs: u64,
        /// The data owner's own words, kept at the station.
        reason: Option<String>,
    },
    /// A federated round's update passed the station's privacy step (clipping, noise, the
    /// budget) and will leave as the output `update` when the run finishes.
    UpdateSubmitted {
        run_id: String,
        job: String,
        round: u32,
        samples: u64,
        values: u64,
        bytes: u64,
        clip_norm: Option<f64>,
        noise_multiplier: Option<f64>,
        /// ε the train's digest has spent here after this update, at `delta`.
        epsilon: Option<f64>,
        delta: Option<f64>,
    },
    /// A securely aggregated round's update left the station masked; the plain `update`
    /// output stayed here. `sha256` and `bytes` are of what was sent.
    UpdateMasked {
        run_id: String,
        job: String,
        round: u32,
        /// Stations whose pairwise masks are in it (this one included).
        sharers: u32,
        threshold: u32,
        bytes: u64,
        sha256: Digest,
    },
    /// The station revealed shares for unmasking a round's sum: self-seed shares of the
    /// `survivors`, mask-key shares of the `dropped` (never both for one station).
    SharesRevealed {
        job: String,
        round: u32,
        survivors: u32,
        dropped: u32,
    },
    RunFinished {
        run_id: String,
        outcome: String,
        reason: Option<String>,
        fuel_used: u64,
        peak_memory_bytes: u64,
        wall_us: u64,
        outputs_released: u64,
    },
    TornTailRecovered {
        offset: u64,
        bytes: u64,
        moved_to: String,
    },
    /// The archive was (re-)indexed. Counts only; quarantined paths stay in the index report.
    ArchiveIndexed {
        files_seen: u64,
        indexed: u64,
        new: u64,
        changed: u64,
        removed: u64,
        quarantined: u64,
        patients: u64,
        studies: u64,
        series: u64,
        triples: u64,
        graph_sha256: String,
    },
    /// The station's public catalog was produced (`amicus station catalog`): what was
    /// disclosed can be matched by its hash.
    CatalogPublished {
        sha256: Digest,
        bytes: u64,
    },
    /// The data owner queried the index (`amicus station query`).
    IndexQueried {
        query_sha256: Digest,
        outcome: String,
    },
    /// The station handed the signing of this log to a new key (`amicus station rekey`).
    /// Signed by the old key; every later entry and the head are signed by the new one.
    /// `proof` is the new key's signature over [`rekey_message`]: the log shows that the new
    /// key's holder took the hand-over. Both keys are public (PEM).
    StationKeyRotated {
        old_key: String,
        new_key: String,
        proof: String,
    },
}

impl Event {
    /// The same event with every free-text field cut to [`MAX_TEXT`] bytes.
    pub fn bounded(mut self) -> Event {
        match &mut self {
            Event::TrainRefused { reason, .. } => cut(reason),
            Event::CapabilityCall {
                detail, outcome, ..
            } => {
                cut(detail);
                cut(outcome);
            }
            Event::RunFinished {
                reason: Some(r), ..
            } => cut(r),
            Event::StationInitialised { archive, .. } => cut(archive),
            Event::UpdateSubmitted { job, .. }
            | Event::UpdateMasked { job, .. }
            | Event::SharesRevealed { job, .. } => cut(job),
            Event::IndexQueried { outcome, .. } => cut(outcome),
            Event::RequestVerified {
                registry_run,
                task,
                job,
                researcher,
                ..
            } => {
                cut(registry_run);
                cut(task);
                cut(researcher);
                if let Some(j) = job {
                    cut(j);
                }
            }
            Event::GlobalWeightsReceived { job, .. } => cut(job),
            Event::HeldOutputsDecided {
                reason: Some(r), ..
            } => cut(r),
            _ => {}
        }
        self
    }
}

/// Cut `s` to at most [`MAX_TEXT`] bytes on a character boundary.
pub fn cut(s: &mut String) {
    if s.len() > MAX_TEXT {
        let mut end = MAX_TEXT;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push('…');
    }
}

#[derive(Serialize, Deserialize)]
struct Entry<E> {
    seq: u64,
    time: String,
    prev: Digest,
    #[serde(flatten)]
    event: E,
}

#[derive(Serialize)]
struct LineOut<'a> {
    entry: &'a RawValue,
    sig: String,
}

/// A public entry: the projection of local entry `local_seq`.
#[derive(Serialize)]
struct PublicEntry<'a> {
    seq: u64,
    time: &'a str,
    prev: Digest,
    local_seq: u64,
    #[serde(flatten)]
    event: &'a PublicEvent,
}

/// Appends signed events to a station's audit log.
pub struct AuditLog {
    dir: PathBuf,
    key: SigningKey,
}

/// Where the key that signs the log comes from.
enum SigningKey {
    /// Given (a new station, tests).
    Held(SecretKey),
    /// The station's key file, read under the log's lock at every append: a rotation by
    /// another process (`amicus station rekey`) is then never raced by an append signed with
    /// the key it retired.
    File(PathBuf),
}

impl AuditLog {
    /// The log in station directory `dir`, signed with `key`.
    pub fn new(dir: &Path, key: SecretKey) -> AuditLog {
        AuditLog {
            dir: dir.to_path_buf(),
            key: SigningKey::Held(key),
        }
    }

    /// The log in station directory `dir`, signed with the key in `key_file`, read at each
    /// append (see [`crate::rekey`] for its rotation).
    pub fn for_station(dir: &Path, key_file: &Path) -> AuditLog {
        AuditLog {
            dir: dir.to_path_buf(),
            key: SigningKey::File(key_file.to_path_buf()),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Hold the log's lock (appends from several processes are serialised by it).
    pub(crate) fn lock(&self) -> Result<File, AuditError> {
        let lock_path = self.dir.join(LOCK_FILE);
        let io = |source| AuditError::Io {
            path: lock_path.clone(),
            source,
        };
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io)?;
        lock.lock().map_err(io)?;
        Ok(lock)
    }

    /// The key that signs the next entry; call with the lock held. A key file's staged
    /// rotation that a crash interrupted is finished first.
    fn signing_key(&self) -> Result<SecretKey, AuditError> {
        match &self.key {
            SigningKey::Held(k) => Ok(k.clone()),
            SigningKey::File(path) => {
                crate::rekey::finish_staged(self, path)?;
                Ok(SecretKey::read(path)?)
            }
        }
    }

    pub fn path(&self) -> PathBuf {
        self.dir.join(LOG_FILE)
    }

    /// Create an empty log and head (a new station). Fails if a log already exists.
    pub fn create(&self) -> Result<(), AuditError> {
        let path = self.path();
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|source| AuditError::Io { path, source })?;
        Ok(())
    }

    /// Append one event, durably. Returns its sequence number.
    pub fn append(&self, event: Event) -> Result<u64, AuditError> {
        let lock = self.lock()?;
        let key = self.signing_key()?;
        let seq = self.append_locked(&key, event)?;
        drop(lock);
        Ok(seq)
    }

    /// Append with the lock held, signed by `key`. Refuses when the log's last entry handed
    /// the log to another key (a process holding a retired key).
    pub(crate) fn append_locked(&self, key: &SecretKey, event: Event) -> Result<u64, AuditError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| AuditError::Io { path, source }
        };
        let path = self.path();
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .open(&path)
            .map_err(io(&path))?;
        let (tail, torn) = read_tail(&mut file, &path)?;
        if let Some(to) = tail.as_ref().and_then(|t| t.handed_to)
            && to != key.public().id()
        {
            return Err(AuditError::Damaged {
                path,
                reason: format!(
                    "the log was handed over to key {to} but this process signs with key {}; run `amicus station rekey` to finish the rotation",
                    key.public().id()
                ),
            });
        }
        let mut tail = tail.map(|t| (t.seq, t.hash));
        let mut written: Vec<(u64, String, Event)> = Vec::new();
        if let Some((offset, bytes)) = torn {
            let moved = self.dir.join(format!("audit.torn-{offset}"));
            std::fs::write(&moved, &bytes).map_err(io(&moved))?;
            file.set_len(offset).map_err(io(&path))?;
            file.sync_all().map_err(io(&path))?;
            let recovered = Event::TornTailRecovered {
                offset,
                bytes: bytes.len() as u64,
                moved_to: moved
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
            };
            let (seq, hash, time) = self.write_entry(key, &mut file, &path, tail, &recovered)?;
            tail = Some((seq, hash));
            written.push((seq, time, recovered));
        }
        let event = event.bounded();
        let (seq, hash, time) = self.write_entry(key, &mut file, &path, tail, &event)?;
        self.write_head(key, LOCAL, seq, hash)?;
        written.push((seq, time, event));
        self.sync_public(key, &written)?;
        Ok(seq)
    }

    /// Sign both chains' heads again with `key` (the last step of a rotation: the head always
    /// carries the signature of the key that signs the next entry). Call with the lock held.
    pub(crate) fn resign_heads(&self, key: &SecretKey) -> Result<(), AuditError> {
        for chain in [LOCAL, PUBLIC] {
            let path = self.dir.join(chain.log);
            let mut file = match File::open(&path) {
                Ok(f) => f,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(source) => return Err(AuditError::Io { path, source }),
            };
            if let (Some(tail), _) = read_tail(&mut file, &path)? {
                self.write_head(key, chain, tail.seq, tail.hash)?;
            }
        }
        Ok(())
    }

    /// The key the log's last entry handed the log to, if it is a hand-over. Call with the
    /// lock held.
    pub(crate) fn handed_to(&self) -> Result<Option<amicus_bundle::KeyId>, AuditError> {
        let path = self.path();
        let mut file = File::open(&path).map_err(|source| AuditError::Io {
            path: path.clone(),
            source,
        })?;
        Ok(read_tail(&mut file, &path)?.0.and_then(|t| t.handed_to))
    }

    /// Bring the public chain up to the local entries just `written` (and any a crash left
    /// out before them): append the projection of each that has one.
    fn sync_public(
        &self,
        key: &SecretKey,
        written: &[(u64, String, Event)],
    ) -> Result<(), AuditError> {
        let Some(first) = written.first().map(|(seq, _, _)| *seq) else {
            return Ok(());
        };
        let path = self.dir.join(PUBLIC_LOG_FILE);
        let exists = path.exists();
        if exists && written.iter().all(|(_, _, e)| public(e).is_none()) {
            return Ok(());
        }
        let io = |source| AuditError::Io {
            path: path.clone(),
            source,
        };
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&path)
            .map_err(io)?;
        let (tail, torn) = read_tail(&mut file, &path)?;
        if let Some((offset, bytes)) = torn {
            let moved = self.dir.join(format!("audit-public.torn-{offset}"));
            std::fs::write(&moved, &bytes).map_err(|source| AuditError::Io {
                path: moved.clone(),
                source,
            })?;
            file.set_len(offset).map_err(io)?;
        }
        let seen = tail.as_ref().and_then(|t| t.local_seq);
        // Local entries the public chain has not seen yet, before the ones just written: a
        // crash between the two appends (or a log from before the public chain).
        let mut pending: Vec<(u64, String, Event)> = if seen.map_or(first > 0, |s| s + 1 < first) {
            read_local_after(&self.dir, seen)?
                .into_iter()
                .filter(|(seq, _, _)| *seq < first)
                .collect()
        } else {
            Vec::new()
        };
        pending.extend(written.iter().cloned());
        let mut chain = tail.map(|t| (t.seq, t.hash));
        let mut last = None;
        for (local_seq, time, event) in &pending {
            if seen.is_some_and(|s| *local_seq <= s) {
                continue;
            }
            let Some(projected) = public(event) else {
                continue;
            };
            let (seq, prev) = match chain {
                Some((seq, hash)) => (seq + 1, hash),
                None => (0, GENESIS),
            };
            let entry = PublicEntry {
                seq,
                time: &coarse_time(time),
                prev,
                local_seq: *local_seq,
                event: &projected,
            };
            let hash = self.write_signed(key, &mut file, &path, PUBLIC, &entry)?;
            chain = Some((seq, hash));
            last = chain;
        }
        if let Some((seq, hash)) = last {
            self.write_head(key, PUBLIC, seq, hash)?;
        }
        Ok(())
    }

    /// Write a local entry; returns its seq, hash and time.
    fn write_entry(
        &self,
        key: &SecretKey,
        file: &mut File,
        path: &Path,
        tail: Option<(u64, Digest)>,
        event: &Event,
    ) -> Result<(u64, Digest, String), AuditError> {
        let (seq, prev) = match tail {
            Some((seq, hash)) => (seq + 1, hash),
            None => (0, GENESIS),
        };
        let time = humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string();
        let entry = Entry {
            seq,
            time: time.clone(),
            prev,
            event,
        };
        let hash = self.write_signed(key, file, path, LOCAL, &entry)?;
        Ok((seq, hash, time))
    }

    /// Sign `entry` under `chain`'s domain and append it as one line, durably; returns the
    /// entry's hash.
    fn write_signed(
        &self,
        key: &SecretKey,
        file: &mut File,
        path: &Path,
        chain: Chain,
        entry: &impl Serialize,
    ) -> Result<Digest, AuditError> {
        let entry_json = serde_json::to_string(entry).map_err(|e| AuditError::Damaged {
            path: path.into(),
            reason: format!("an entry did not serialise: {e}"),
        })?;
        let raw = RawValue::from_string(entry_json).map_err(|e| AuditError::Damaged {
            path: path.into(),
            reason: format!("an entry did not serialise: {e}"),
        })?;
        let mut signed = chain.domain.to_vec();
        signed.extend_from_slice(raw.get().as_bytes());
        let line = LineOut {
            entry: &raw,
            sig: B64.encode(key.sign(&signed)),
        };
        let mut bytes = serde_json::to_vec(&line).map_err(|e| AuditError::Damaged {
            path: path.into(),
            reason: format!("a line did not serialise: {e}"),
        })?;
        bytes.push(b'\n');
        if bytes.len() > MAX_LINE {
            return Err(AuditError::Damaged {
                path: path.into(),
                reason: "refusing to write an oversized entry".into(),
            });
        }
        let io = |source| AuditError::Io {
            path: path.into(),
            source,
        };
        file.write_all(&bytes).map_err(io)?;
        file.sync_data().map_err(io)?;
        Ok(sha256(raw.get().as_bytes()))
    }

    fn write_head(
        &self,
        key: &SecretKey,
        chain: Chain,
        seq: u64,
        hash: Digest,
    ) -> Result<(), AuditError> {
        let head = Head {
            seq,
            hash,
            sig: B64.encode(key.sign(&head_message(chain, seq, &hash))),
        };
        let path = self.dir.join(chain.head);
        let bytes = serde_json::to_vec(&head).map_err(|e| AuditError::Damaged {
            path: path.clone(),
            reason: format!("the head did not serialise: {e}"),
        })?;
        amicus_bundle::bundle::write_atomic(&path, &bytes)
            .map_err(|source| AuditError::Io { path, source })
    }
}

/// The last complete entry of a chain.
struct Tail {
    seq: u64,
    hash: Digest,
    /// Public entries: the local entry it projects.
    local_seq: Option<u64>,
    /// A hand-over: the key it hands the log to (unverified; appends only compare).
    handed_to: Option<amicus_bundle::KeyId>,
}

/// The last complete entry, and a torn tail (offset, bytes) if the file does not end with a
/// newline.
#[allow(clippy::type_complexity)]
fn read_tail(
    file: &mut File,
    path: &Path,
) -> Result<(Option<Tail>, Option<(u64, Vec<u8>)>), AuditError> {
    let io = |source| AuditError::Io {
        path: path.into(),
        source,
    };
    let len = file.metadata().map_err(io)?.len();
    if len == 0 {
        return Ok((None, None));
    }
    let window = len.min(2 * MAX_LINE as u64 + 1);
    file.seek(SeekFrom::Start(len - window)).map_err(io)?;
    let mut buf = Vec::with_capacity(window as usize);
    Read::by_ref(file)
        .take(window)
        .read_to_end(&mut buf)
        .map_err(io)?;
    let complete_end = match buf.iter().rposition(|&b| b == b'\n') {
        Some(i) => i + 1,
        None if window == len => 0,
        None => {
            return Err(AuditError::Damaged {
                path: path.into(),
                reason: "last line is longer than any entry".into(),
            });
        }
    };
    let torn = (complete_end < buf.len()).then(|| {
        (
            (len - window) + complete_end as u64,
            buf[complete_end..].to_vec(),
        )
    });
    let body = &buf[..complete_end];
    if body.is_empty() {
        return Ok((None, torn));
    }
    let last_start = body[..body.len() - 1]
        .iter()
        .rposition(|&b| b == b'\n')
        .map(|i| i + 1)
        .unwrap_or(0);
    let last = &body[last_start..body.len() - 1];
    let damaged = |reason: &str| AuditError::Damaged {
        path: path.into(),
        reason: reason.into(),
    };
    let line: LineIn =
        serde_json::from_slice(last).map_err(|_| damaged("last entry is not JSON"))?;
    let header: EntryHeader = serde_json::from_str(line.entry.get())
        .map_err(|_| damaged("last entry has no sequence number"))?;
    let handed_to = serde_json::from_str::<HandOverFields>(line.entry.get())
        .ok()
        .filter(|h| h.event == HANDOVER_EVENT)
        .and_then(|h| PublicKey::from_pem(&h.new_key, "hand-over").ok())
        .map(|k| k.id());
    Ok((
        Some(Tail {
            seq: header.seq,
            hash: sha256(line.entry.get().as_bytes()),
            local_seq: header.local_seq,
            handed_to,
        }),
        torn,
    ))
}

/// The local entries after `after` (all of them for `None`), reading the log from its end
/// back only as far as needed.
fn read_local_after(
    dir: &Path,
    after: Option<u64>,
) -> Result<Vec<(u64, String, Event)>, AuditError> {
    let path = dir.join(LOG_FILE);
    let io = |source| AuditError::Io {
        path: path.clone(),
        source,
    };
    let mut file = File::open(&path).map_err(io)?;
    let len = file.metadata().map_err(io)?.len();
    let mut out = Vec::new();
    let mut end = len;
    let mut carry: Vec<u8> = Vec::new();
    const CHUNK: u64 = 1 << 20;
    'read: while end > 0 {
        let start = end.saturating_sub(CHUNK);
        file.seek(SeekFrom::Start(start)).map_err(io)?;
        let mut chunk = vec![0u8; (end - start) as usize];
        file.read_exact(&mut chunk).map_err(io)?;
        chunk.extend_from_slice(&carry);
        // Lines complete in this window (the first may be cut unless the window starts the file).
        let mut lines: Vec<&[u8]> = chunk.split(|&b| b == b'\n').collect();
        let first_partial = if start > 0 && !lines.is_empty() {
            Some(lines.remove(0).to_vec())
        } else {
            None
        };
        for line in lines.iter().rev() {
            if line.is_empty() {
                continue;
            }
            let Ok(parsed) = serde_json::from_slice::<LineIn>(line) else {
                continue;
            };
            let Ok(entry) = serde_json::from_str::<Entry<Event>>(parsed.entry.get()) else {
                continue;
            };
            if after.is_some_and(|a| entry.seq <= a) {
                break 'read;
            }
            out.push((entry.seq, entry.time, entry.event));
        }
        carry = first_partial.unwrap_or_default();
        end = start;
    }
    out.reverse();
    Ok(out)
}

/// A local time (RFC 3339 with milliseconds) cut to the second for the public chain.
fn coarse_time(time: &str) -> String {
    match time.split_once('.') {
        Some((seconds, rest)) if rest.ends_with('Z') => format!("{seconds}Z"),
        _ => time.to_string(),
    }
}

/// Verify the log in station directory `dir` against the station's public key: the local
/// chain, the public chain, and that the public chain is exactly the projection of the local
/// one (a public chain one or more entries behind at its end is what a crash between the two
/// appends leaves; the next append repairs it).
pub fn verify(dir: &Path, key: &PublicKey) -> Result<VerifyReport, AuditError> {
    let (data, complete_end) = read_log(&dir.join(LOG_FILE))?;
    let lines = split_lines(&data[..complete_end]);
    let mut report = verify_lines(&lines, read_head(&dir.join(HEAD_FILE)), key, LOCAL);
    if complete_end < data.len() {
        report.torn_tail_bytes = Some((data.len() - complete_end) as u64);
    }
    if report.problem.is_some() {
        return Ok(report);
    }
    let public_path = dir.join(PUBLIC_LOG_FILE);
    if !public_path.exists() {
        // A log from before the public chain: the next append writes it.
        report.public_lags = lines.iter().filter(|l| project_line(l).is_some()).count() as u64;
        return Ok(report);
    }
    let (public_data, public_end) = read_log(&public_path)?;
    let public_lines = split_lines(&public_data[..public_end]);
    let public_report = verify_lines(
        &public_lines,
        read_head(&dir.join(PUBLIC_HEAD_FILE)),
        key,
        PUBLIC,
    );
    report.public_entries = public_report.valid_entries;
    if let Some(p) = public_report.problem {
        report.problem = Some(format!("{PUBLIC_LOG_FILE}: {p}"));
        return Ok(report);
    }
    // The projection of every local entry, in order, against the public entries.
    let mut public_iter = public_lines.iter().enumerate();
    for line in &lines {
        let Some((local_seq, time, projected)) = project_line(line) else {
            continue;
        };
        let Some((i, public_line)) = public_iter.next() else {
            report.public_lags += 1;
            continue;
        };
        if report.public_lags > 0 {
            report.problem = Some(format!(
                "{PUBLIC_LOG_FILE}: a projection is missing before line {}",
                i + 1
            ));
            return Ok(report);
        }
        let entry: serde_json::Value = serde_json::from_slice::<LineIn>(public_line)
            .ok()
            .and_then(|l| serde_json::from_str(l.entry.get()).ok())
            .unwrap_or_default();
        let mut event = entry.clone();
        if let Some(o) = event.as_object_mut() {
            for k in ["seq", "time", "prev", "local_seq"] {
                o.remove(k);
            }
        }
        let expected = serde_json::to_value(&projected).unwrap_or_default();
        if entry["local_seq"].as_u64() != Some(local_seq)
            || entry["time"].as_str() != Some(coarse_time(&time).as_str())
            || event != expected
        {
            report.problem = Some(format!(
                "{PUBLIC_LOG_FILE} line {} is not the projection of local entry seq {local_seq}",
                i + 1
            ));
            return Ok(report);
        }
    }
    if let Some((i, _)) = public_iter.next() {
        report.problem = Some(format!(
            "{PUBLIC_LOG_FILE} line {} projects no local entry",
            i + 1
        ));
    }
    Ok(report)
}

/// A log file's bytes and where its complete lines end.
fn read_log(path: &Path) -> Result<(Vec<u8>, usize), AuditError> {
    let data = std::fs::read(path).map_err(|source| AuditError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let complete_end = data.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    Ok((data, complete_end))
}

fn split_lines(body: &[u8]) -> Vec<&[u8]> {
    let body = body.strip_suffix(b"\n").unwrap_or(body);
    if body.is_empty() {
        Vec::new()
    } else {
        body.split(|&b| b == b'\n').collect()
    }
}

fn read_head(path: &Path) -> HeadFile {
    match std::fs::read(path) {
        Ok(bytes) => HeadFile::Bytes(bytes),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => HeadFile::Missing,
        Err(e) => HeadFile::Unreadable(e.to_string()),
    }
}

/// A local line's seq, time and public projection (`None`: not projected, or unreadable).
fn project_line(line: &[u8]) -> Option<(u64, String, PublicEvent)> {
    let parsed = serde_json::from_slice::<LineIn>(line).ok()?;
    let entry = serde_json::from_str::<Entry<Event>>(parsed.entry.get()).ok()?;
    Some((entry.seq, entry.time, public(&entry.event)?))
}

/// One entry as `audit show` prints it.
#[derive(Debug, Clone, Serialize)]
pub struct ShownEntry {
    pub line: usize,
    pub entry: serde_json::Value,
}

/// Read every complete entry (unverified; use [`verify`] for proof).
pub fn read_entries(dir: &Path) -> Result<Vec<ShownEntry>, AuditError> {
    read_chain_entries(dir, LOCAL)
}

/// Read every complete entry of the public chain: what leaves the station.
pub fn read_public_entries(dir: &Path) -> Result<Vec<ShownEntry>, AuditError> {
    read_chain_entries(dir, PUBLIC)
}

fn read_chain_entries(dir: &Path, chain: Chain) -> Result<Vec<ShownEntry>, AuditError> {
    let path = dir.join(chain.log);
    let data = std::fs::read(&path).map_err(|source| AuditError::Io {
        path: path.clone(),
        source,
    })?;
    let mut out = Vec::new();
    for (i, line) in data.split(|&b| b == b'\n').enumerate() {
        if line.is_empty() {
            continue;
        }
        let entry = serde_json::from_slice::<LineIn>(line)
            .ok()
            .and_then(|l| serde_json::from_str(l.entry.get()).ok())
            .unwrap_or_else(|| serde_json::json!({ "unreadable": String::from_utf8_lossy(line) }));
        out.push(ShownEntry { line: i + 1, entry });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log_with(n: u64) -> (tempfile::TempDir, PublicKey) {
        let dir = tempfile::tempdir().unwrap();
        let key = SecretKey::generate().unwrap();
        let public = key.public();
        let log = AuditLog::new(dir.path(), key);
        log.create().unwrap();
        for i in 0..n {
            log.append(Event::SignerTrusted {
                name: format!("signer-{i}"),
                keyid: "k".repeat(8),
            })
            .unwrap();
        }
        (dir, public)
    }

    fn lines(dir: &Path) -> Vec<String> {
        std::fs::read_to_string(dir.join(LOG_FILE))
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect()
    }

    fn write_lines(dir: &Path, lines: &[String]) {
        let mut text = lines.join("\n");
        text.push('\n');
        std::fs::write(dir.join(LOG_FILE), text).unwrap();
    }

    fn problem(dir: &Path, key: &PublicKey) -> String {
        let r = verify(dir, key).unwrap();
        r.problem.expect("verification should fail")
    }

    #[test]
    fn intact_log_verifies() {
        let (dir, key) = log_with(5);
        let r = verify(dir.path(), &key).unwrap();
        assert!(r.ok(), "{r:?}");
        assert_eq!(r.valid_entries, 5);
        assert!(r.torn_tail_bytes.is_none());
        let shown = read_entries(dir.path()).unwrap();
        assert_eq!(shown.len(), 5);
        assert_eq!(shown[2].entry["event"], "signer-trusted");
    }

    #[test]
    fn empty_log_verifies() {
        let (dir, key) = log_with(0);
        assert!(verify(dir.path(), &key).unwrap().ok());
    }

    #[test]
    fn edited_entry_is_named() {
        let (dir, key) = log_with(5);
        let mut l = lines(dir.path());
        l[2] = l[2].replace("signer-2", "signer-X");
        write_lines(dir.path(), &l);
        let p = problem(dir.path(), &key);
        assert!(p.starts_with("line 3 "), "{p}");
        assert!(p.contains("signature"), "{p}");
    }

    #[test]
    fn deleted_entry_is_named() {
        let (dir, key) = log_with(5);
        let mut l = lines(dir.path());
        l.remove(1);
        write_lines(dir.path(), &l);
        let p = problem(dir.path(), &key);
        assert!(p.starts_with("line 2 (expected seq 1)"), "{p}");
    }

    #[test]
    fn reordered_entries_are_named() {
        let (dir, key) = log_with(5);
        let mut l = lines(dir.path());
        l.swap(3, 4);
        write_lines(dir.path(), &l);
        let p = problem(dir.path(), &key);
        assert!(p.starts_with("line 4 (expected seq 3)"), "{p}");
    }

    #[test]
    fn truncated_log_is_detected() {
        let (dir, key) = log_with(5);
        let mut l = lines(dir.path());
        l.truncate(3);
        write_lines(dir.path(), &l);
        let p = problem(dir.path(), &key);
        assert!(p.contains("truncated") && p.contains("seq 4"), "{p}");
    }

    #[test]
    fn replaced_last_entry_is_detected() {
        // Re-signing is impossible without the key, but replaying an old valid line is not.
        let (dir, key) = log_with(3);
        let mut l = lines(dir.path());
        l[2] = l[1].clone();
        write_lines(dir.path(), &l);
        assert!(problem(dir.path(), &key).starts_with("line 3"));
    }

    #[test]
    fn forged_head_is_detected() {
        let (dir, key) = log_with(3);
        let head = std::fs::read_to_string(dir.path().join(HEAD_FILE)).unwrap();
        std::fs::write(
            dir.path().join(HEAD_FILE),
            head.replace("\"seq\":2", "\"seq\":1"),
        )
        .unwrap();
        assert!(problem(dir.path(), &key).contains("head signature"));
    }

    #[test]
    fn torn_tail_is_reported_and_recovered() {
        let (dir, key) = log_with(3);
        let mut data = std::fs::read(dir.path().join(LOG_FILE)).unwrap();
        data.extend_from_slice(b"{\"entry\":{\"seq\":3,\"ti");
        std::fs::write(dir.path().join(LOG_FILE), &data).unwrap();
        let r = verify(dir.path(), &key).unwrap();
        assert!(r.ok(), "{r:?}");
        assert_eq!(r.valid_entries, 3);
        assert_eq!(r.torn_tail_bytes, Some(21));
    }

    #[test]
    fn append_after_torn_tail_moves_it_aside() {
        let dir = tempfile::tempdir().unwrap();
        let key = SecretKey::generate().unwrap();
        let public = key.public();
        let log = AuditLog::new(dir.path(), key);
        log.create().unwrap();
        log.append(Event::SignerTrusted {
            name: "a".into(),
            keyid: "k".into(),
        })
        .unwrap();
        let mut data = std::fs::read(dir.path().join(LOG_FILE)).unwrap();
        let torn_at = data.len();
        data.extend_from_slice(b"{\"entry\":");
        std::fs::write(dir.path().join(LOG_FILE), &data).unwrap();
        log.append(Event::SignerTrusted {
            name: "b".into(),
            keyid: "k".into(),
        })
        .unwrap();
        let r = verify(dir.path(), &public).unwrap();
        assert!(r.ok(), "{r:?}");
        assert_eq!(r.valid_entries, 3);
        assert!(r.torn_tail_bytes.is_none());
        let moved = dir.path().join(format!("audit.torn-{torn_at}"));
        assert_eq!(std::fs::read(moved).unwrap(), b"{\"entry\":");
        let shown = read_entries(dir.path()).unwrap();
        assert_eq!(shown[1].entry["event"], "torn-tail-recovered");
    }

    #[test]
    fn head_lagging_by_one_is_tolerated() {
        // A crash after an append but before the head update leaves the head one behind.
        let dir = tempfile::tempdir().unwrap();
        let key = SecretKey::generate().unwrap();
        let public = key.public();
        let log = AuditLog::new(dir.path(), key);
        log.create().unwrap();
        let ev = |n: &str| Event::SignerTrusted {
            name: n.into(),
            keyid: "k".into(),
        };
        log.append(ev("a")).unwrap();
        log.append(ev("b")).unwrap();
        let old_head = std::fs::read(dir.path().join(HEAD_FILE)).unwrap();
        log.append(ev("c")).unwrap();
        std::fs::write(dir.path().join(HEAD_FILE), &old_head).unwrap();
        let r = verify(dir.path(), &public).unwrap();
        assert!(r.ok() && r.head_lags, "{r:?}");
        // Two behind cannot come from one crash: an old head was put back.
        log.append(ev("d")).unwrap();
        std::fs::write(dir.path().join(HEAD_FILE), &old_head).unwrap();
        assert!(problem(dir.path(), &public).contains("replaced by an old copy"));
    }

    #[test]
    fn damaged_last_line_blocks_appends() {
        let (dir, _key) = log_with(2);
        let mut l = lines(dir.path());
        l[1] = "garbage".into();
        write_lines(dir.path(), &l);
        let log = AuditLog::new(dir.path(), SecretKey::generate().unwrap());
        assert!(matches!(
            log.append(Event::SignerTrusted {
                name: "x".into(),
                keyid: "k".into()
            }),
            Err(AuditError::Damaged { .. })
        ));
    }

    fn call(detail: &str) -> Event {
        Event::CapabilityCall {
            run_id: "r1".into(),
            capability: "cohort".into(),
            call: "select".into(),
            detail: detail.into(),
            rows: Some(3),
            outcome: "ok".into(),
            count: None,
        }
    }

    fn finished(reason: &str) -> Event {
        Event::RunFinished {
            run_id: "r1".into(),
            outcome: "failed".into(),
            reason: Some(reason.into()),
            fuel_used: 1000,
            peak_memory_bytes: 5_000_000,
            wall_us: 1_234,
            outputs_released: 0,
        }
    }

    #[test]
    fn the_public_chain_is_the_projection_and_holds_no_run_text() {
        let secret = "SECRET-pseudonym-4f2a sex F age 63";
        let signer = SecretKey::generate().unwrap();
        let public_key = signer.public();
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::new(dir.path(), signer);
        log.create().unwrap();
        log.append(Event::SignerTrusted {
            name: "a".into(),
            keyid: "k".into(),
        })
        .unwrap();
        for i in 0..5 {
            log.append(call(&format!("{secret} {i}"))).unwrap();
        }
        log.append(finished(&format!("train returned an error: {secret}")))
            .unwrap();
        let r = verify(dir.path(), &public_key).unwrap();
        assert!(r.ok(), "{r:?}");
        assert_eq!(
            (r.valid_entries, r.public_entries, r.public_lags),
            (7, 2, 0)
        );
        let public_text = std::fs::read_to_string(dir.path().join(PUBLIC_LOG_FILE)).unwrap();
        assert!(!public_text.contains("SECRET"), "{public_text}");
        assert!(public_text.contains("\"local_seq\":6"), "{public_text}");
        // The registry's check of uploaded lines: the public domain, not the local one.
        let lines: Vec<&[u8]> = public_text.lines().map(str::as_bytes).collect();
        let head = std::fs::read(dir.path().join(PUBLIC_HEAD_FILE)).unwrap();
        let r = verify_lines(&lines, HeadFile::Bytes(head.clone()), &public_key, PUBLIC);
        assert!(r.ok(), "{r:?}");
        assert!(!verify_lines(&lines, HeadFile::Bytes(head), &public_key, LOCAL).ok());
    }

    #[test]
    fn a_public_chain_behind_is_repaired_and_a_forged_one_is_caught() {
        let signer = SecretKey::generate().unwrap();
        let public_key = signer.public();
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::new(dir.path(), signer);
        log.create().unwrap();
        let path = dir.path().join(PUBLIC_LOG_FILE);
        let head_path = dir.path().join(PUBLIC_HEAD_FILE);
        let mut saved = None;
        for n in ["a", "b", "c"] {
            if n == "c" {
                saved = Some((
                    std::fs::read(&path).unwrap(),
                    std::fs::read(&head_path).unwrap(),
                ));
            }
            log.append(Event::SignerTrusted {
                name: n.into(),
                keyid: "k".into(),
            })
            .unwrap();
        }
        // A crash between the two appends: the public chain lacks the last projection.
        let (old_log, old_head) = saved.unwrap();
        std::fs::write(&path, old_log).unwrap();
        std::fs::write(&head_path, old_head).unwrap();
        let r = verify(dir.path(), &public_key).unwrap();
        assert_eq!(r.public_lags, 1, "{r:?}");
        log.append(call("x")).unwrap();
        log.append(Event::SignerTrusted {
            name: "d".into(),
            keyid: "k".into(),
        })
        .unwrap();
        let r = verify(dir.path(), &public_key).unwrap();
        assert!(
            r.ok() && r.public_lags == 0 && r.public_entries == 4,
            "{r:?}"
        );
        // A public line that does not project its local entry: caught, even signed right.
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, text.replacen("\"name\":\"a\"", "\"name\":\"z\"", 1)).unwrap();
        assert!(problem(dir.path(), &public_key).contains(PUBLIC_LOG_FILE));
        // A log from before the public chain gets one at its next append.
        std::fs::remove_file(&path).unwrap();
        std::fs::remove_file(&head_path).unwrap();
        assert_eq!(verify(dir.path(), &public_key).unwrap().public_lags, 4);
        log.append(call("y")).unwrap();
        let r = verify(dir.path(), &public_key).unwrap();
        assert!(r.ok() && r.public_entries == 4, "{r:?}");
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(200))]

        /// Uploaded lines reach `check_line` in the registry: garbage and mutations of real
        /// lines are refused, never a panic, on both chains.
        #[test]
        fn hostile_lines_never_panic(
            garbage in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512),
            flips in proptest::collection::vec((proptest::prelude::any::<usize>(), proptest::prelude::any::<u8>()), 1..6),
        ) {
            let (dir, key) = log_with(3);
            let _ = check_line(&garbage, &key, 0, &GENESIS, LOCAL);
            let _ = check_line(&garbage, &key, 0, &GENESIS, PUBLIC);
            let mut bytes = std::fs::read(dir.path().join(LOG_FILE)).unwrap();
            for (at, b) in flips {
                let i = at % bytes.len();
                bytes[i] = b;
            }
            std::fs::write(dir.path().join(LOG_FILE), &bytes).unwrap();
            let _ = verify(dir.path(), &key);
            let _ = read_entries(dir.path());
            let lines: Vec<&[u8]> = bytes.split(|b| *b == b'\n').collect();
            let _ = verify_lines(&lines, HeadFile::Bytes(garbage.clone()), &key, PUBLIC);
        }
    }

    #[test]
    fn long_text_is_cut() {
        let e = Event::TrainRefused {
            digest: None,
            bundle_sha256: GENESIS,
            stage: "x".into(),
            reason: "é".repeat(MAX_TEXT),
        }
        .bounded();
        let Event::TrainRefused { reason, .. } = e else {
            unreachable!()
        };
        assert!(reason.len() <= MAX_TEXT + 3);
    }
}
