//! The pipe protocol between a station and its run worker.
//!
//! Both directions are a stream of frames: one tag byte (`J` for a JSON message, `B` for a blob
//! of bytes), a little-endian `u64` length, then that many bytes. The station writes one [`Job`]
//! and then the blobs it announces (the bundle's models, in order, and a federated round's
//! global weights) to the worker's stdin. The worker writes [`Report`]s to its event pipe (its
//! original stdout); a [`Report::Finished`] is followed by the blobs it announces (captured
//! stdout, the outputs in order, the update).
//!
//! The station reads what the worker writes as untrusted: frames are size-checked before they
//! are read, and every message is validated again by the station (see `supervise`).

use crate::sandbox::{CallRecord, Outcome};
use amicus_bundle::Capability;
use serde::{Deserialize, Serialize};
use std::io::{Read, Write};
use std::path::PathBuf;

/// Largest JSON frame either side accepts.
pub const MAX_JSON: u64 = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("pipe: {0}")]
    Io(#[from] std::io::Error),
    #[error("the other side closed the pipe")]
    Closed,
    #[error("frame of {len} bytes over the limit of {max}")]
    TooLarge { len: u64, max: u64 },
    #[error("expected a {expected} frame, got tag {got:#04x}")]
    UnexpectedTag { expected: &'static str, got: u8 },
    #[error("malformed message: {0}")]
    Malformed(String),
}

/// What the station asks a worker to do: compile a component, or run a train.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    /// Compile the component that follows as a blob; answered with `compiled` and the
    /// compilation as a blob (or `refused` when it is not a valid component).
    Compile(CompileJob),
    Run(Box<Job>),
}

/// Compiling a component: untrusted input to Cranelift, under the same confinement as a run.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompileJob {
    /// Memory the compiler may use beyond the worker's baseline (the component included).
    pub memory_bytes: u64,
    pub limits: WorkerLimits,
}

/// What the station asks the worker to run.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Job {
    pub run_id: String,
    /// The station's own compilation of the component (its cache file), read before the
    /// worker restricts itself.
    pub component: PathBuf,
    /// The bundle's canonical manifest.
    pub manifest: String,
    pub granted: Vec<Capability>,
    pub params: String,
    pub fuel: u64,
    /// The sandbox's budget (linear memories and host tensors); the worker's operating-system
    /// limit is this plus the station's baseline and `memory_slack_bytes`.
    pub memory_bytes: u64,
    pub wall_ms: u64,
    pub output_max_bytes: u64,
    pub output_max_total: u64,
    pub log_cap: u64,
    /// Hex of the 32-byte seed of the guest's randomness.
    pub seed: String,
    pub cohort: Option<CohortJob>,
    pub imaging: Option<ImagingJob>,
    pub kernels: Option<KernelsJob>,
    pub federated: Option<RoundJob>,
    pub limits: WorkerLimits,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CohortJob {
    /// `index/graph.nq`.
    pub graph: PathBuf,
    pub max_query_bytes: u64,
    pub max_rows: u64,
    pub timeout_ms: u64,
    pub min_patients: u32,
    pub max_intermediate: u64,
    pub max_queries: u64,
    /// ε of each tally's noise (0: exact counts).
    pub tally_epsilon: f64,
    pub tally_cells_per_patient: u32,
    pub max_noisy_tallies: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImagingJob {
    /// `index/files.jsonl`: which archive files belong to which series.
    pub state: PathBuf,
    /// The archive folder: the only part of the filesystem the worker may read once it runs
    /// the train.
    pub archive: PathBuf,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KernelsJob {
    /// The declared models; their bytes follow the job as blobs, in this order.
    pub models: Vec<ModelJob>,
    pub threads: usize,
    /// `cpu`, `cuda` or `auto`.
    pub device: String,
    pub max_model_bytes: u64,
    pub max_nodes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelJob {
    pub file: String,
    pub trainable: bool,
    pub loss: Option<String>,
}

/// A federated round; its global weights (`amicus_fl::wire` weight set) follow as a blob.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoundJob {
    pub job: String,
    pub number: u32,
    pub rounds: u32,
    pub proximal_mu: f32,
    /// How the update will travel (it decides the update's size, checked at `submit`).
    pub encoding: amicus_fl::wire::Encoding,
}

/// What the operating system bounds, besides the station's kill at the deadline.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerLimits {
    /// Added to the sandbox budget and the worker's baseline for its data-segment limit:
    /// thread stacks, allocator arenas and the engine's own bookkeeping.
    pub memory_slack_bytes: u64,
    /// CPU seconds (all threads) before the kernel stops the worker.
    pub cpu_seconds: u64,
}

/// What the worker reports, in order: `Ready`, then any number of `Progress`, `Calling` and
/// `Call`, then
/// `Finished` (or `Refused`); `SetupFailed` instead of all of them when it could not start.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "report", rename_all = "kebab-case")]
pub enum Report {
    /// Set up and confined; the train starts now.
    Ready {
        confinement: Confinement,
    },
    Progress {
        fraction: f32,
        message: String,
    },
    /// A capability call starts (its record follows when it returns).
    Calling {
        capability: String,
        call: String,
        detail: String,
    },
    /// A capability call's record, for the audit log (the station coalesces repeats).
    Call {
        call: CallRecord,
    },
    /// The component is not a train of this contract (nothing ran), or not a component.
    Refused {
        reason: String,
    },
    /// A compilation, which follows as a blob.
    Compiled,
    Finished(Finished),
    SetupFailed {
        reason: String,
    },
}

/// How the operating system confines the worker (the `worker-started` audit entry).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Confinement {
    /// `enforced (ABI N)`, `partially enforced (ABI N)` or `not enforced: why`.
    pub landlock: String,
    /// `enforced` or `not enforced: why`.
    pub seccomp: String,
    /// The data-segment limit (RLIMIT_DATA), bytes.
    pub memory_limit_bytes: u64,
    pub cpu_limit_seconds: u64,
    /// Threads that existed when the filesystem rules were applied (1 means every thread is
    /// confined; the rules bind only the thread that applies them and its later children).
    pub threads_at_restriction: u32,
    /// Whether every capability was dropped (only meaningful when the station runs as root).
    pub capabilities_dropped: bool,
    /// Where the limits of this worker fall short, for the data owner.
    #[serde(default)]
    pub gaps: Vec<String>,
}

impl Confinement {
    /// Filesystem rules and the syscall filter both hold for every thread.
    pub fn complete(&self) -> bool {
        self.landlock.starts_with("enforced")
            && self.seccomp == "enforced"
            && self.threads_at_restriction <= 1
    }
}

/// The end of a run, followed by blobs: the captured stdout/stderr, each output (in the order
/// of `outputs`), and the update's fp32 `amicus_fl::wire` encoding when `update` is set.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Finished {
    pub outcome: Outcome,
    pub fuel_used: u64,
    pub wall_us: u64,
    /// Peak of the sandbox budget (linear memories plus host tensors).
    pub budget_peak_bytes: u64,
    /// The worker's own peak resident set (VmHWM).
    pub peak_rss_bytes: u64,
    pub log_lines: Vec<(String, String)>,
    pub dropped_lines: u64,
    pub outputs: Vec<String>,
    pub update: Option<UpdateMeta>,
}

/// A federated round's raw update (the station clips, noises and encodes it).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateMeta {
    pub samples: u64,
    pub values: u64,
}

/// Write one JSON frame.
pub fn write_json<T: Serialize>(w: &mut impl Write, value: &T) -> Result<(), ProtocolError> {
    let bytes = serde_json::to_vec(value).map_err(|e| ProtocolError::Malformed(e.to_string()))?;
    write_frame(w, b'J', &bytes)
}

/// Write one blob frame.
pub fn write_blob(w: &mut impl Write, bytes: &[u8]) -> Result<(), ProtocolError> {
    write_frame(w, b'B', bytes)
}

fn write_frame(w: &mut impl Write, tag: u8, bytes: &[u8]) -> Result<(), ProtocolError> {
    let mut head = [0u8; 9];
    head[0] = tag;
    head[1..].copy_from_slice(&(bytes.len() as u64).to_le_bytes());
    w.write_all(&head)?;
    w.write_all(bytes)?;
    w.flush()?;
    Ok(())
}

/// Read one frame's tag and length; `Closed` at a clean end of stream.
fn read_head(r: &mut impl Read) -> Result<(u8, u64), ProtocolError> {
    let mut head = [0u8; 9];
    let mut got = 0;
    while got < head.len() {
        match r.read(&mut head[got..]) {
            Ok(0) if got == 0 => return Err(ProtocolError::Closed),
            Ok(0) => {
                return Err(ProtocolError::Malformed("truncated frame header".into()));
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let mut len = [0u8; 8];
    len.copy_from_slice(&head[1..]);
    Ok((head[0], u64::from_le_bytes(len)))
}

fn read_body(r: &mut impl Read, len: u64) -> Result<Vec<u8>, ProtocolError> {
    let mut out = Vec::new();
    r.take(len).read_to_end(&mut out)?;
    if (out.len() as u64) < len {
        return Err(ProtocolError::Malformed("truncated frame".into()));
    }
    Ok(out)
}

/// Read one JSON frame of at most `max` bytes.
pub fn read_json<T: serde::de::DeserializeOwned>(
    r: &mut impl Read,
    max: u64,
) -> Result<T, ProtocolError> {
    let (tag, len) = read_head(r)?;
    if tag != b'J' {
        return Err(ProtocolError::UnexpectedTag {
            expected: "JSON",
            got: tag,
        });
    }
    if len > max {
        return Err(ProtocolError::TooLarge { len, max });
    }
    let body = read_body(r, len)?;
    serde_json::from_slice(&body).map_err(|e| ProtocolError::Malformed(e.to_string()))
}

/// Read one blob frame of at most `max` bytes.
pub fn read_blob(r: &mut impl Read, max: u64) -> Result<Vec<u8>, ProtocolError> {
    let (tag, len) = read_head(r)?;
    if tag != b'B' {
        return Err(ProtocolError::UnexpectedTag {
            expected: "blob",
            got: tag,
        });
    }
    if len > max {
        return Err(ProtocolError::TooLarge { len, max });
    }
    read_body(r, len)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_limits_hold() {
        let mut buf = Vec::new();
        write_json(
            &mut buf,
            &Report::Progress {
                fraction: 0.5,
                message: "half".into(),
            },
        )
        .unwrap();
        write_blob(&mut buf, b"abc").unwrap();
        let mut r = &buf[..];
        let m: Report = read_json(&mut r, 1024).unwrap();
        assert!(matches!(m, Report::Progress { fraction, .. } if fraction == 0.5));
        assert_eq!(read_blob(&mut r, 3).unwrap(), b"abc");
        assert!(matches!(
            read_json::<Report>(&mut r, 1024),
            Err(ProtocolError::Closed)
        ));

        let mut r = &buf[..];
        assert!(matches!(
            read_json::<Report>(&mut r, 4),
            Err(ProtocolError::TooLarge { .. })
        ));
        let mut r = &buf[..];
        assert!(matches!(
            read_blob(&mut r, 1 << 20),
            Err(ProtocolError::UnexpectedTag { .. })
        ));
        // A huge announced length is refused before anything is allocated or read.
        let mut huge = vec![b'B'];
        huge.extend_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(
            read_blob(&mut &huge[..], 1 << 20),
            Err(ProtocolError::TooLarge { .. })
        ));
        // Truncated frames are errors, not panics.
        for cut in 0..buf.len() {
            let mut r = &buf[..cut];
            let _ = read_json::<Report>(&mut r, 1024);
        }
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256)) {
            let mut r = &bytes[..];
            let _ = read_json::<Report>(&mut r, 1024);
            let mut r = &bytes[..];
            let _ = read_blob(&mut r, 1024);
        }
    }
}
