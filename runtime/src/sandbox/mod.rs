//! The wasmtime sandbox a train runs in.
//!
//! This module owns the engine configuration, the check of a component's imports against the
//! contract and the WASI allow-list, the compiled-module cache, the three limits (fuel, memory,
//! wall clock: [`limits`]), the locked-down WASI ([`wasi`]) and the output rules at the moment
//! of `emit` ([`gate`]). The host side of the contract is [`crate::host`], one file per
//! interface. The sandbox does not read policy files or bundles, and does not write the audit
//! log or any output: it returns a [`RunReport`] and the station decides what to keep. On a
//! station it runs inside the run worker process ([`crate::worker`]), whose limits the operating
//! system enforces.
//!
//! Defence in depth: a component is refused before instantiation if it imports anything outside
//! the contract and the WASI allow-list, or a capability interface that was not granted; WASI is
//! linked all the same with no preopened directories, sockets denied, no environment or
//! arguments, a fixed clock and seeded randomness; the host implementation of each capability
//! checks the grant again on every call.

pub mod gate;
pub mod limits;
pub mod wasi;

use crate::host::{HostState, bindings};
use amicus_bundle::{Capability, Digest, Manifest, sha256};
use gate::OutputGate;
use limits::MemoryBudget;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use wasi::{CappedPipe, locked_down_wasi};
use wasmtime::component::{Component, HasSelf, Linker, ResourceTable};
use wasmtime::{Config, Engine, Store, Trap};

pub use crate::host::{DeclaredModel, KernelAccess};
pub use gate::UPDATE_OUTPUT;

/// The contract package and version this station implements.
pub const CONTRACT_PACKAGE: &str = "amicus:train";
pub const CONTRACT_VERSION: &str = "0.1.0";

/// WASI interfaces a train may import (package/interface prefixes, any 0.2.x version).
/// Filesystem, sockets, HTTP and everything else are refused.
const WASI_ALLOWED: &[&str] = &["wasi:io/", "wasi:clocks/", "wasi:random/", "wasi:cli/"];

/// Epoch tick used for the wall-clock deadline.
const TICK: Duration = Duration::from_millis(20);

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("component is not valid WebAssembly: {0}")]
    InvalidComponent(String),
    #[error("component imports {import}: {reason}")]
    ForbiddenImport { import: String, reason: String },
    #[error("component does not implement {CONTRACT_PACKAGE}@{CONTRACT_VERSION}: {0}")]
    NotATrain(String),
    #[error("sandbox set-up failed: {0}")]
    Setup(String),
}

/// The station's wasmtime engine: deterministic, fuel- and epoch-instrumented.
#[derive(Clone)]
pub struct Sandbox {
    engine: Engine,
    cache_dir: Option<PathBuf>,
}

impl Sandbox {
    /// An engine; compiled components are cached under `cache_dir` when given.
    pub fn new(cache_dir: Option<&Path>) -> Result<Sandbox, SandboxError> {
        let mut c = Config::new();
        c.consume_fuel(true);
        c.epoch_interruption(true);
        c.cranelift_nan_canonicalization(true);
        c.wasm_relaxed_simd(false);
        c.relaxed_simd_deterministic(true);
        c.parallel_compilation(true);
        let engine = Engine::new(&c).map_err(|e| SandboxError::Setup(e.to_string()))?;
        Ok(Sandbox {
            engine,
            cache_dir: cache_dir.map(Path::to_path_buf),
        })
    }

    /// Where the compilation of `wasm` is cached (`None` without a cache directory).
    pub fn cache_path(&self, wasm: &[u8]) -> Option<PathBuf> {
        let dir = self.cache_dir.as_ref()?;
        Some(dir.join(format!(
            "{}-{}.cwasm",
            sha256(wasm),
            self.engine_fingerprint()
        )))
    }

    /// A component from the bytes of a compilation this station cached ([`Sandbox::compile`]).
    ///
    /// # Safety
    /// `bytes` must come from this station's cache directory, which only ever receives the
    /// output of `Engine::precompile_component` of this same binary (the run worker reads the
    /// file the station names, before it runs anything a train controls).
    pub unsafe fn load_compiled(&self, bytes: &[u8]) -> Result<Component, SandboxError> {
        // SAFETY: the caller guarantees the bytes are this engine's own compilation.
        unsafe { Component::deserialize(&self.engine, bytes) }
            .map_err(|e| SandboxError::Setup(format!("the compiled component: {e:#}")))
    }

    /// Compile `wasm` to this engine's serialized form (what the cache holds); nothing is
    /// loaded. The station runs this in a compile worker, never in its own process.
    pub fn precompile(&self, wasm: &[u8]) -> Result<Vec<u8>, SandboxError> {
        self.engine
            .precompile_component(wasm)
            .map_err(|e| SandboxError::InvalidComponent(format!("{e:#}")))
    }

    /// Compile `wasm` (or load the station's own cached compilation of it).
    pub fn compile(&self, wasm: &[u8]) -> Result<(Component, CompileSource), SandboxError> {
        let Some(path) = self.cache_path(wasm) else {
            let c = Component::new(&self.engine, wasm)
                .map_err(|e| SandboxError::InvalidComponent(format!("{e:#}")))?;
            return Ok((c, CompileSource::Compiled));
        };
        let dir = path.parent().unwrap_or(Path::new("."));
        if path.is_file() {
            // SAFETY: the cache directory belongs to the station and only ever receives files
            // this function wrote from `Engine::precompile_component`; the file name binds the
            // source hash and the engine's compatibility hash.
            if let Ok(c) = unsafe { Component::deserialize_file(&self.engine, &path) } {
                return Ok((c, CompileSource::Cache));
            }
        }
        let bytes = self
            .engine
            .precompile_component(wasm)
            .map_err(|e| SandboxError::InvalidComponent(format!("{e:#}")))?;
        std::fs::create_dir_all(dir).map_err(|e| SandboxError::Setup(e.to_string()))?;
        amicus_bundle::bundle::write_atomic(&path, &bytes)
            .map_err(|e| SandboxError::Setup(format!("{}: {e}", path.display())))?;
        // SAFETY: as above; these are the bytes just produced by this engine.
        let c = unsafe { Component::deserialize(&self.engine, &bytes) }
            .map_err(|e| SandboxError::Setup(e.to_string()))?;
        Ok((c, CompileSource::Compiled))
    }

    fn engine_fingerprint(&self) -> String {
        use std::hash::{Hash, Hasher};
        let mut h = std::hash::DefaultHasher::new();
        self.engine.precompile_compatibility_hash().hash(&mut h);
        format!("{:016x}", h.finish())
    }

    /// Every import of `component`, as `package/interface@version` (or a bare function name).
    pub fn imports(&self, component: &Component) -> Vec<String> {
        component
            .component_type()
            .imports(&self.engine)
            .map(|(name, _)| name.to_string())
            .collect()
    }

    /// Refuse a component that imports anything but the contract's granted interfaces and the
    /// WASI allow-list.
    pub fn check_imports(
        &self,
        component: &Component,
        granted: &BTreeSet<Capability>,
    ) -> Result<(), SandboxError> {
        for import in self.imports(component) {
            check_import(&import, granted)?;
        }
        Ok(())
    }

    /// Run a train. Refusals before the guest starts are errors; everything that happens once
    /// it started (including traps and limit hits) is in the report.
    pub fn run(&self, component: &Component, req: RunRequest) -> Result<RunReport, SandboxError> {
        self.check_imports(component, &req.granted)?;
        let mut linker: Linker<HostState> = Linker::new(&self.engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker)
            .map_err(|e| SandboxError::Setup(e.to_string()))?;
        bindings::Train::add_to_linker::<_, HasSelf<_>>(&mut linker, |s| s)
            .map_err(|e| SandboxError::Setup(e.to_string()))?;

        let memory_cap = req.memory_bytes;
        let wall_limit = req.wall;
        let stdout = CappedPipe::new(req.log_cap);
        let state = HostState {
            wasi: locked_down_wasi(&req.seed, &stdout),
            table: ResourceTable::new(),
            memory: MemoryBudget::new(memory_cap),
            outputs: OutputGate::new(req.manifest, req.output_max_bytes, req.output_max_total),
            log: RunLog::new(req.log_cap),
            granted: req.granted,
            calls: CallLog::new(req.on_call),
            progress: req.progress,
            cohort: req.cohort,
            imaging: req.imaging,
            kernels: req.kernels,
            federated: req.federated,
            federated_trainer: None,
            submitted: None,
            deadline: Instant::now() + req.wall,
            deadline_hit: false,
            memory_hit: None,
        };
        let mut store = Store::new(&self.engine, state);
        store.limiter(|s| &mut s.memory);
        store
            .set_fuel(req.fuel)
            .map_err(|e| SandboxError::Setup(e.to_string()))?;
        let ticks = (req.wall.as_millis() / TICK.as_millis()).max(1) as u64;
        store.set_epoch_deadline(ticks);
        store.epoch_deadline_trap();

        let started = Instant::now();
        let stop = Arc::new(AtomicBool::new(false));
        let ticker = {
            let engine = self.engine.clone();
            let stop = stop.clone();
            std::thread::spawn(move || {
                // park_timeout, not sleep: the run's end unparks the ticker so it exits at once.
                while !stop.load(Ordering::Acquire) {
                    std::thread::park_timeout(TICK);
                    engine.increment_epoch();
                }
            })
        };

        let result = (|| {
            let train = bindings::Train::instantiate(&mut store, component, &linker)
                .map_err(|e| Err(SandboxError::NotATrain(format!("{e:#}"))))?;
            train.call_run(&mut store, &req.params).map_err(Ok)
        })();
        stop.store(true, Ordering::Release);
        ticker.thread().unpark();
        let _ = ticker.join();
        let wall = started.elapsed();

        let fuel_used = req.fuel.saturating_sub(store.get_fuel().unwrap_or(0));
        let mut state = store.into_data();
        state.calls.flush();
        let outcome = match result {
            Err(Err(refusal)) => return Err(refusal),
            Ok(Ok(())) => match &state.outputs.violation {
                // Cannot happen (a violation traps), but never release on a violation.
                Some(v) => Outcome::PolicyViolation(v.clone()),
                None => Outcome::Succeeded,
            },
            Ok(Err(msg)) => Outcome::Failed(guest_text(&msg)),
            Err(Ok(trap)) => match classify_trap(&trap, &state) {
                Outcome::WallClockExceeded(_) => Outcome::WallClockExceeded(wall_limit),
                other => other,
            },
        };
        // An ONNX Runtime call stopped by the time limit ends the run as the limit (nothing is
        // released), whatever the train made of the error it got.
        let outcome = if state.deadline_hit {
            Outcome::WallClockExceeded(wall_limit)
        } else if let Some(m) = &state.memory_hit {
            Outcome::MemoryLimit(m.clone())
        } else {
            outcome
        };
        let mut log = state.log;
        log.stdout = stdout.contents();
        let (outputs, update) = if outcome == Outcome::Succeeded {
            (state.outputs.emitted, state.submitted)
        } else {
            (Vec::new(), None)
        };
        let calls = std::mem::take(&mut state.calls.done);
        Ok(RunReport {
            outcome,
            fuel_used,
            peak_memory_bytes: state.memory.peak as u64,
            wall,
            outputs,
            log,
            calls,
            update,
        })
    }
}

/// Whether [`Sandbox::compile`] compiled or loaded from the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompileSource {
    Compiled,
    Cache,
}

/// The top-level imports of a component, read from its bytes without compiling it (the
/// station checks them before anything compiles the component).
pub fn component_imports(wasm: &[u8]) -> Result<Vec<String>, String> {
    use wasmparser::{Encoding, Parser, Payload};
    let mut imports = Vec::new();
    let mut depth = 0usize;
    let mut component = false;
    for payload in Parser::new(0).parse_all(wasm) {
        match payload.map_err(|e| format!("not a valid component: {e}"))? {
            Payload::Version { encoding, .. } if depth == 0 => {
                component = encoding == Encoding::Component;
                if !component {
                    return Err("a core module, not a component".into());
                }
            }
            Payload::ModuleSection { .. } | Payload::ComponentSection { .. } => depth += 1,
            Payload::End(_) => {
                if depth == 0 {
                    break;
                }
                depth -= 1;
            }
            Payload::ComponentImportSection(reader) if depth == 0 => {
                for import in reader {
                    let import = import.map_err(|e| format!("not a valid component: {e}"))?;
                    let mut name = import.name.name.to_string();
                    if let Some(v) = import.name.version_suffix {
                        name.push_str(v);
                    }
                    imports.push(name);
                }
            }
            _ => {}
        }
    }
    if !component {
        return Err("not a component".into());
    }
    Ok(imports)
}

/// Check one import name against the contract and the WASI allow-list.
pub fn check_import(import: &str, granted: &BTreeSet<Capability>) -> Result<(), SandboxError> {
    let refuse = |reason: String| {
        Err(SandboxError::ForbiddenImport {
            import: import.to_string(),
            reason,
        })
    };
    let (path, version) = import.split_once('@').unwrap_or((import, ""));
    if let Some(interface) = path
        .strip_prefix(CONTRACT_PACKAGE)
        .and_then(|r| r.strip_prefix('/'))
    {
        if version != CONTRACT_VERSION {
            return refuse(format!(
                "contract version {version:?} is not implemented (this station implements {CONTRACT_VERSION})"
            ));
        }
        return match interface {
            "output" | "types" => Ok(()),
            other => {
                let needed: Vec<Capability> = Capability::ALL
                    .into_iter()
                    .filter(|c| c.interfaces().contains(&other))
                    .collect();
                if needed.is_empty() {
                    return refuse("not an interface of the contract".into());
                }
                if needed.iter().any(|c| granted.contains(c)) {
                    Ok(())
                } else {
                    let names: Vec<&str> = needed.iter().map(|c| c.name()).collect();
                    refuse(format!(
                        "needs capability {}, which the manifest does not declare or the station does not grant",
                        names.join(" or ")
                    ))
                }
            }
        };
    }
    if import.starts_with("wasi:") {
        if WASI_ALLOWED.iter().any(|p| import.starts_with(p)) && version.starts_with("0.2.") {
            return Ok(());
        }
        return refuse("WASI interface outside the allow-list (io, clocks, random, cli)".into());
    }
    refuse("neither the amicus:train contract nor allowed WASI".into())
}

/// One round of a federated job, as the station runs it.
#[derive(Clone)]
pub struct FederatedRound {
    pub job: String,
    /// 1 for the first round.
    pub number: u32,
    pub rounds: u32,
    pub proximal_mu: f32,
    /// The round's global weights.
    pub global: Arc<amicus_fl::wire::Weights>,
    pub encoding: amicus_fl::wire::Encoding,
    /// Clip the update to this L2 norm (required when `noise_multiplier` is set).
    pub clip_norm: Option<f64>,
    /// Add Gaussian noise of standard deviation `noise_multiplier · clip_norm` to every value,
    /// drawn from the operating system's randomness (never from the run's recorded seed: whoever
    /// knows the seed could subtract the noise).
    pub noise_multiplier: Option<f64>,
}

/// What `federated.submit` handed over: the round's raw update. The station clips it, adds
/// noise and encodes it (`crate::release`) before anything can leave; the sandbox never
/// releases it itself.
#[derive(Debug, Clone, PartialEq)]
pub struct RawUpdate {
    pub samples: u64,
    /// Local weights minus the round's global weights, in the global weights' order.
    pub delta: Vec<f32>,
}

/// Receives the train's progress reports: fraction in [0, 1] and a short message.
pub type ProgressSink = Box<dyn FnMut(f32, &str) + Send>;

/// What a run may use and emit.
pub struct RunRequest<'a> {
    pub manifest: &'a Manifest,
    /// Capabilities the manifest declares and the policy grants.
    pub granted: BTreeSet<Capability>,
    pub params: String,
    pub fuel: u64,
    pub memory_bytes: usize,
    pub wall: Duration,
    pub output_max_bytes: u64,
    pub output_max_total: u64,
    pub log_cap: usize,
    /// Seeds the guest's WASI randomness (recorded in the audit log).
    pub seed: [u8; 32],
    pub progress: ProgressSink,
    /// Receives each capability call as it starts and ends; without it the calls are returned,
    /// repeats coalesced, in [`RunReport::calls`].
    pub on_call: Option<CallSink>,
    /// The station's FAIR index and query limits; `None` when the archive is not indexed.
    pub cohort: Option<CohortAccess>,
    /// The indexed archive, for `imaging`; `None` when the archive is not indexed.
    pub imaging: Option<Arc<amicus_index::scan::ArchiveState>>,
    /// The bundle's models, for `kernels`; `None` when the capability is not granted.
    pub kernels: Option<KernelAccess>,
    /// The round, when this run is part of a federated job.
    pub federated: Option<FederatedRound>,
}

/// What the `cohort` capability queries, under which limits.
#[derive(Clone)]
pub struct CohortAccess {
    pub index: Arc<amicus_index::Index>,
    pub limits: amicus_index::QueryLimits,
    /// Queries this run may still make (the per-run cap, or what is left of the digest's).
    pub queries_left: u64,
    /// Noisy tallies the digest's privacy budget still allows (with tally noise on).
    pub noisy_tallies_left: u64,
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "outcome", content = "detail", rename_all = "kebab-case")]
pub enum Outcome {
    Succeeded,
    /// The train returned an error.
    Failed(String),
    /// The train broke an output rule (undeclared name, too large, emitted twice).
    PolicyViolation(String),
    OutOfFuel,
    WallClockExceeded(Duration),
    MemoryLimit(String),
    /// Any other trap, e.g. a panic (`unreachable`).
    Trapped(String),
    /// The run's worker process died or misbehaved (crash, abort, a signal, the
    /// out-of-memory killer, a broken protocol): the reason, for the station's log.
    Crashed(String),
    /// The kernel stopped the worker at its CPU-time limit.
    CpuTimeExceeded,
    /// The station stopped the run at one of its own limits (the audit volume of a run).
    LimitExceeded(String),
    /// The component does not implement the contract (nothing of the train ran).
    NotATrain(String),
    /// The station stopped the run because it was shutting down (SIGTERM past its grace).
    Interrupted(String),
}

impl Outcome {
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Succeeded => "succeeded",
            Outcome::Failed(_) => "failed",
            Outcome::PolicyViolation(_) => "policy-violation",
            Outcome::OutOfFuel => "out-of-fuel",
            Outcome::WallClockExceeded(_) => "wall-clock-exceeded",
            Outcome::MemoryLimit(_) => "memory-limit",
            Outcome::Trapped(_) => "trapped",
            Outcome::Crashed(_) => "failed",
            Outcome::CpuTimeExceeded => "cpu-time-exceeded",
            Outcome::LimitExceeded(_) => "limit-exceeded",
            Outcome::Interrupted(_) => "interrupted",
            Outcome::NotATrain(_) => "not-a-train",
        }
    }

    pub fn reason(&self) -> Option<String> {
        match self {
            Outcome::Succeeded => None,
            Outcome::Failed(m) => Some(format!("train returned an error: {m}")),
            Outcome::PolicyViolation(m) => Some(format!("output policy violated: {m}")),
            Outcome::OutOfFuel => Some("stopped: fuel exhausted (CPU limit)".into()),
            Outcome::WallClockExceeded(d) => Some(format!(
                "stopped: wall-clock limit of {} s exceeded",
                d.as_secs()
            )),
            Outcome::MemoryLimit(m) => Some(format!("stopped: memory limit: {m}")),
            Outcome::Trapped(m) => Some(format!("train trapped: {m}")),
            Outcome::Crashed(m) => Some(format!("the run's worker process failed: {m}")),
            Outcome::CpuTimeExceeded => Some("stopped: CPU time limit exceeded".into()),
            Outcome::LimitExceeded(m) => Some(format!("stopped: {m}")),
            Outcome::NotATrain(m) => Some(m.clone()),
            Outcome::Interrupted(m) => Some(format!("interrupted: {m}")),
        }
    }
}

/// Everything a run produced. `outputs` is empty unless the run succeeded.
#[derive(Debug)]
pub struct RunReport {
    pub outcome: Outcome,
    pub fuel_used: u64,
    pub peak_memory_bytes: u64,
    pub wall: Duration,
    /// Declared name → bytes, in emit order.
    pub outputs: Vec<(String, Vec<u8>)>,
    pub log: RunLog,
    pub calls: Vec<CallRecord>,
    /// The update `federated.submit` handed over (only when the run succeeded).
    pub update: Option<RawUpdate>,
}

/// One capability call, for the audit log: `count` consecutive identical calls (same
/// capability, call, detail and outcome) are one record.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CallRecord {
    pub capability: String,
    pub call: String,
    pub detail: String,
    pub rows: Option<u64>,
    pub outcome: String,
    #[serde(default = "one")]
    pub count: u64,
}

fn one() -> u64 {
    1
}

/// What a call sink hears: a capability call starting (the host code it runs may not return:
/// a station that loses the worker then knows what it was doing), and each call's record.
#[derive(Debug, Clone, Copy)]
pub enum CallEvent<'a> {
    Begin {
        capability: &'a str,
        call: &'a str,
        detail: &'a str,
    },
    Done(&'a CallRecord),
}

/// Receives capability calls as they start and end.
pub type CallSink = Box<dyn FnMut(CallEvent<'_>) + Send>;

/// The calls of a run. With a sink, every event goes to it at once (the station coalesces);
/// without one, a repeat of the last call (same capability, call, detail, outcome and rows)
/// only raises its count, and the records are kept in `done`.
pub(crate) struct CallLog {
    pending: Option<CallRecord>,
    pub(crate) done: Vec<CallRecord>,
    sink: Option<CallSink>,
}

impl CallLog {
    pub(crate) fn new(sink: Option<CallSink>) -> CallLog {
        CallLog {
            pending: None,
            done: Vec::new(),
            sink,
        }
    }

    pub(crate) fn begin(&mut self, capability: &str, call: &str, detail: &str) {
        if let Some(sink) = &mut self.sink {
            sink(CallEvent::Begin {
                capability,
                call,
                detail,
            });
        }
    }

    pub(crate) fn push(&mut self, record: CallRecord) {
        if let Some(sink) = &mut self.sink {
            sink(CallEvent::Done(&record));
            return;
        }
        if let Some(p) = &mut self.pending
            && p.same_call(&record)
        {
            p.count = p.count.saturating_add(record.count);
            return;
        }
        self.flush();
        self.pending = Some(record);
    }

    /// Make the pending call final.
    pub(crate) fn flush(&mut self) {
        if let Some(p) = self.pending.take() {
            self.done.push(p);
        }
    }
}

impl CallRecord {
    /// Whether `other` repeats this call (it would be coalesced with it).
    pub fn same_call(&self, other: &CallRecord) -> bool {
        self.capability == other.capability
            && self.call == other.call
            && self.detail == other.detail
            && self.outcome == other.outcome
            && self.rows == other.rows
    }
}

/// The train's log lines and captured stdout/stderr, capped.
#[derive(Debug, Default)]
pub struct RunLog {
    pub lines: Vec<(String, String)>,
    pub stdout: Vec<u8>,
    pub dropped_lines: u64,
    bytes: usize,
    cap: usize,
}

impl RunLog {
    pub(crate) fn new(cap: usize) -> RunLog {
        RunLog {
            cap,
            ..Default::default()
        }
    }

    pub(crate) fn push(&mut self, level: &str, message: &str) {
        let m = guest_text(message);
        if self.bytes + m.len() > self.cap {
            self.dropped_lines += 1;
            return;
        }
        self.bytes += m.len();
        self.lines.push((level.to_string(), m));
    }

    pub fn last_error(&self) -> Option<&str> {
        self.lines
            .iter()
            .rev()
            .find(|(l, _)| l == "error")
            .map(|(_, m)| m.as_str())
    }
}

fn classify_trap(err: &wasmtime::Error, state: &HostState) -> Outcome {
    if let Some(v) = &state.outputs.violation {
        return Outcome::PolicyViolation(v.clone());
    }
    if let Some(m) = &state.memory.refused {
        return Outcome::MemoryLimit(m.clone());
    }
    match err.downcast_ref::<Trap>() {
        Some(Trap::OutOfFuel) => Outcome::OutOfFuel,
        Some(Trap::Interrupt) => Outcome::WallClockExceeded(Duration::ZERO),
        Some(t) => {
            let mut m = t.to_string();
            if let Some(panic) = state.log.last_error() {
                m = format!("{m} ({panic})");
            }
            Outcome::Trapped(m)
        }
        None => Outcome::Trapped(format!("{err:#}")),
    }
}

/// Text that came from a guest, made safe to show and store: control characters (terminal
/// escape sequences among them) and bidirectional-format characters (which reorder what a
/// reader sees) are escaped, except newline and tab, and the length is capped.
pub fn guest_text(s: &str) -> String {
    escaped(s, true)
}

/// [`guest_text`] for one line of a log: newlines and tabs escaped too.
pub fn guest_line(s: &str) -> String {
    escaped(s, false)
}

fn escaped(s: &str, keep_newlines: bool) -> String {
    let mut out = String::with_capacity(s.len().min(crate::audit::MAX_TEXT));
    for c in s.chars() {
        let kept = keep_newlines && (c == '\n' || c == '\t');
        if (c.is_control() && !kept) || amicus_bundle::text::is_bidi(c) {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
        if out.len() >= crate::audit::MAX_TEXT {
            break;
        }
    }
    crate::audit::cut(&mut out);
    out
}

/// A seed for a run's randomness: SHA-256 over the bundle digest, the parameters and the run id.
pub fn run_seed(digest: &Digest, params: &str, run_id: &str) -> [u8; 32] {
    let mut m = Vec::new();
    m.extend_from_slice(digest.as_bytes());
    m.extend_from_slice(&sha256(params.as_bytes()).0);
    m.extend_from_slice(run_id.as_bytes());
    sha256(&m).0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caps(c: &[Capability]) -> BTreeSet<Capability> {
        c.iter().copied().collect()
    }

    #[test]
    fn import_allow_list() {
        let none = caps(&[]);
        assert!(check_import("amicus:train/output@0.1.0", &none).is_ok());
        assert!(check_import("wasi:io/streams@0.2.6", &none).is_ok());
        assert!(check_import("wasi:cli/environment@0.2.3", &none).is_ok());
        for bad in [
            "wasi:filesystem/preopens@0.2.6",
            "wasi:sockets/tcp@0.2.6",
            "wasi:http/outgoing-handler@0.2.6",
            "wasi:io/streams@0.3.0",
            "amicus:train/output@0.2.0",
            "amicus:train/backdoor@0.1.0",
            "evil:exfil/upload@1.0.0",
            "upload",
        ] {
            assert!(check_import(bad, &none).is_err(), "allowed {bad}");
        }
        assert!(check_import("amicus:train/cohort@0.1.0", &none).is_err());
        assert!(check_import("amicus:train/cohort@0.1.0", &caps(&[Capability::Cohort])).is_ok());
        assert!(check_import("amicus:train/tensors@0.1.0", &caps(&[Capability::Cohort])).is_err());
        assert!(check_import("amicus:train/tensors@0.1.0", &caps(&[Capability::Kernels])).is_ok());
    }

    #[test]
    fn guest_text_escapes_control_characters() {
        assert_eq!(guest_text("ok\nline\ttab"), "ok\nline\ttab");
        assert_eq!(guest_text("\u{1b}[2J"), "\\u{1b}[2J");
        assert!(guest_text(&"x".repeat(10_000)).len() <= crate::audit::MAX_TEXT + 3);
    }
}
