//! The wasmtime sandbox a train runs in.
//!
//! This module owns the engine configuration, the check of a component's imports against the
//! contract and the WASI allow-list, the compiled-module cache, the three limits (fuel, memory,
//! wall clock) and the host side of the `amicus:train` contract. It enforces output rules at the
//! moment of `emit`. It does not read policy files or bundles, and does not write the audit log
//! or any output: it returns a [`RunReport`] and the station decides what to keep.
//!
//! Defence in depth: a component is refused before instantiation if it imports anything outside
//! the contract and the WASI allow-list, or a capability interface that was not granted; WASI is
//! linked all the same with no preopened directories, sockets denied, no environment or
//! arguments, a fixed clock and seeded randomness; the host implementation of each capability
//! checks the grant again on every call.

use amicus_bundle::{Capability, Digest, Manifest, sha256};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use wasmtime::component::{Component, HasSelf, Linker, Resource, ResourceTable};
use wasmtime::{Config, Engine, ResourceLimiter, Store, Trap};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

mod bindings {
    wasmtime::component::bindgen!({
        world: "train",
        path: "../wit",
        imports: {
            "amicus:train/output.emit": trappable,
        },
        with: {
            "amicus:train/tensors.tensor": super::HostTensor,
            "amicus:train/kernels.model": super::ModelHandle,
            "amicus:train/kernels.trainer": super::TrainerHandle,
        },
    });
}

use bindings::amicus::train::{cohort, federated, imaging, kernels, output, tensors, types};

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

/// Host-side tensor data behind a `tensor` handle.
#[derive(Debug)]
pub struct HostTensor {
    shape: Vec<u32>,
    data: Vec<f32>,
}

/// A `kernels.model` handle: a bundle model loaded into ONNX Runtime for inference.
pub struct ModelHandle {
    file: String,
    session: amicus_kernels::Session,
}

/// A `kernels.trainer` handle: weights and optimizer state of one training, on the host.
pub struct TrainerHandle {
    file: String,
    trainer: amicus_kernels::trainer::Trainer,
}

/// A model the bundle declares (its bytes verified against the signed manifest).
#[derive(Clone)]
pub struct DeclaredModel {
    pub trainable: bool,
    /// The manifest's loss (`ce`, `0.5*bce+0.5*dice`, …), for trainable models.
    pub loss: Option<String>,
    pub bytes: Arc<Vec<u8>>,
}

/// What the `kernels` capability may open: only the bundle's declared models.
#[derive(Clone)]
pub struct KernelAccess {
    pub models: std::collections::BTreeMap<String, DeclaredModel>,
    /// ONNX Runtime intra-op threads per session.
    pub threads: usize,
    /// Where ONNX Runtime runs (the station's policy).
    pub device: amicus_kernels::Device,
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

    /// Compile `wasm` (or load the station's own cached compilation of it).
    pub fn compile(&self, wasm: &[u8]) -> Result<(Component, CompileSource), SandboxError> {
        let Some(dir) = &self.cache_dir else {
            let c = Component::new(&self.engine, wasm)
                .map_err(|e| SandboxError::InvalidComponent(format!("{e:#}")))?;
            return Ok((c, CompileSource::Compiled));
        };
        let path = dir.join(format!(
            "{}-{}.cwasm",
            sha256(wasm),
            self.engine_fingerprint()
        ));
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
            calls: Vec::new(),
            progress: req.progress,
            cohort: req.cohort,
            imaging: req.imaging,
            kernels: req.kernels,
            federated: req.federated,
            federated_trainer: None,
            submitted: None,
            deadline: Instant::now() + req.wall,
            deadline_hit: false,
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
        let state = store.into_data();
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
        Ok(RunReport {
            outcome,
            fuel_used,
            peak_memory_bytes: state.memory.peak as u64,
            wall,
            outputs,
            log,
            calls: state.calls,
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

/// The output a federated round's update leaves as; only `federated.submit` writes it.
pub const UPDATE_OUTPUT: &str = "update";

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

/// What `federated.submit` released, for the audit log and the run record.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SubmittedUpdate {
    pub samples: u64,
    pub values: u64,
    /// L2 norm of the update before clipping.
    pub norm: f64,
    pub clipped: bool,
    pub noised: bool,
    pub bytes: u64,
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
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
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
    /// The update `federated.submit` released (only when the run succeeded).
    pub update: Option<SubmittedUpdate>,
}

/// One capability call, for the audit log.
#[derive(Debug, Clone)]
pub struct CallRecord {
    pub capability: String,
    pub call: String,
    pub detail: String,
    pub rows: Option<u64>,
    pub outcome: String,
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
    fn new(cap: usize) -> RunLog {
        RunLog {
            cap,
            ..Default::default()
        }
    }

    fn push(&mut self, level: &str, message: &str) {
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

/// Linear memories plus host tensors, against one cap. Tracks the peak.
struct MemoryBudget {
    cap: usize,
    linear: usize,
    host: usize,
    peak: usize,
    refused: Option<String>,
}

impl MemoryBudget {
    fn new(cap: usize) -> MemoryBudget {
        MemoryBudget {
            cap,
            linear: 0,
            host: 0,
            peak: 0,
            refused: None,
        }
    }

    fn reserve_host(&mut self, bytes: usize) -> bool {
        if self.linear + self.host + bytes > self.cap {
            self.refused = Some(format!(
                "host tensor of {bytes} bytes would exceed the {} byte limit",
                self.cap
            ));
            return false;
        }
        self.host += bytes;
        self.peak = self.peak.max(self.linear + self.host);
        true
    }

    fn release_host(&mut self, bytes: usize) {
        self.host = self.host.saturating_sub(bytes);
    }
}

impl ResourceLimiter for MemoryBudget {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let grow = desired.saturating_sub(current);
        if self.linear + self.host + grow > self.cap {
            self.refused = Some(format!(
                "memory growth to {} bytes refused (limit {} bytes)",
                self.linear + self.host + grow,
                self.cap
            ));
            return Ok(false);
        }
        self.linear += grow;
        self.peak = self.peak.max(self.linear + self.host);
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 100_000)
    }

    fn instances(&self) -> usize {
        64
    }
    fn tables(&self) -> usize {
        64
    }
    fn memories(&self) -> usize {
        16
    }
}

/// Applies the output rules at the moment of `emit`.
struct OutputGate {
    declared: BTreeMap<String, u64>,
    max_total: u64,
    total: u64,
    emitted: Vec<(String, Vec<u8>)>,
    violation: Option<String>,
}

impl OutputGate {
    fn new(manifest: &Manifest, policy_max: u64, max_total: u64) -> OutputGate {
        OutputGate {
            declared: manifest
                .outputs
                .iter()
                .map(|o| (o.name.clone(), o.max_bytes.min(policy_max)))
                .collect(),
            max_total,
            total: 0,
            emitted: Vec::new(),
            violation: None,
        }
    }

    fn emit(&mut self, name: &str, data: Vec<u8>) -> Result<(), String> {
        if name == UPDATE_OUTPUT {
            return Err(format!(
                "output {UPDATE_OUTPUT:?} is written by the station (federated.submit), not by emit"
            ));
        }
        self.emit_checked(name, data)
    }

    /// `emit` without the reserved-name rule: the station's own outputs.
    fn emit_checked(&mut self, name: &str, data: Vec<u8>) -> Result<(), String> {
        let shown: String = name.chars().take(128).collect();
        let Some((declared, max)) = self.declared.get_key_value(name) else {
            return Err(format!("output {shown:?} is not declared in the manifest"));
        };
        if self.emitted.iter().any(|(n, _)| n == name) {
            return Err(format!("output {shown:?} emitted twice"));
        }
        let len = data.len() as u64;
        if len > *max {
            return Err(format!(
                "output {shown:?} is {len} bytes, its limit is {max} bytes"
            ));
        }
        if self.total + len > self.max_total {
            return Err(format!(
                "outputs total {} bytes, the station releases at most {} per run",
                self.total + len,
                self.max_total
            ));
        }
        self.total += len;
        self.emitted.push((declared.clone(), data));
        Ok(())
    }
}

struct HostState {
    wasi: WasiCtx,
    table: ResourceTable,
    memory: MemoryBudget,
    outputs: OutputGate,
    log: RunLog,
    granted: BTreeSet<Capability>,
    calls: Vec<CallRecord>,
    progress: ProgressSink,
    cohort: Option<CohortAccess>,
    imaging: Option<Arc<amicus_index::scan::ArchiveState>>,
    kernels: Option<KernelAccess>,
    federated: Option<FederatedRound>,
    /// The trainer (its table index) that `load-global` set up.
    federated_trainer: Option<u32>,
    submitted: Option<SubmittedUpdate>,
    /// The run's time limit as an instant: ONNX Runtime calls stop there.
    deadline: Instant,
    /// An ONNX Runtime call was stopped by the time limit.
    deadline_hit: bool,
}

impl HostState {
    fn require(&mut self, cap: Capability, call: &str) -> Result<(), types::Error> {
        if self.granted.contains(&cap) {
            return Ok(());
        }
        self.calls.push(CallRecord {
            capability: cap.name().into(),
            call: call.into(),
            detail: String::new(),
            rows: None,
            outcome: "denied".into(),
        });
        Err(types::Error::Denied(format!(
            "capability {cap} is not granted"
        )))
    }

    fn not_available(
        &mut self,
        cap: Capability,
        call: &str,
        detail: String,
        what: &str,
    ) -> types::Error {
        self.calls.push(CallRecord {
            capability: cap.name().into(),
            call: call.into(),
            detail,
            rows: None,
            outcome: "not-available".into(),
        });
        types::Error::NotAvailable(format!(
            "capability {cap} is not available on this station: {what}"
        ))
    }

    /// Record a capability call for the audit log: `ok`, or the error's kind and message.
    fn record<T>(
        &mut self,
        cap: Capability,
        call: &str,
        detail: String,
        rows: Option<u64>,
        answer: Result<T, types::Error>,
    ) -> Result<T, types::Error> {
        let outcome = match &answer {
            Ok(_) => "ok".to_string(),
            Err(e) => {
                let (label, reason) = match e {
                    types::Error::NotAvailable(m) => ("not-available", m),
                    types::Error::Denied(m) => ("denied", m),
                    types::Error::InvalidArgument(m) => ("invalid-argument", m),
                    types::Error::LimitExceeded(m) => ("limit-exceeded", m),
                    types::Error::Failed(m) => ("failed", m),
                };
                format!("{label}: {reason}")
            }
        };
        self.calls.push(CallRecord {
            capability: cap.name().into(),
            call: call.into(),
            detail,
            rows,
            outcome,
        });
        answer
    }
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl types::Host for HostState {}

impl output::Host for HostState {
    fn log(&mut self, level: output::Level, message: String) {
        let level = match level {
            output::Level::Trace => "trace",
            output::Level::Debug => "debug",
            output::Level::Info => "info",
            output::Level::Warn => "warn",
            output::Level::Error => "error",
        };
        self.log.push(level, &message);
    }

    fn progress(&mut self, fraction: f32, message: String) {
        let fraction = if fraction.is_finite() {
            fraction.clamp(0.0, 1.0)
        } else {
            0.0
        };
        let message: String = guest_text(&message).chars().take(200).collect();
        (self.progress)(fraction, &message);
    }

    fn emit(&mut self, name: String, data: Vec<u8>) -> wasmtime::Result<()> {
        if let Err(violation) = self.outputs.emit(&name, data) {
            self.outputs.violation = Some(violation.clone());
            return Err(wasmtime::Error::msg(violation));
        }
        Ok(())
    }
}

impl HostState {
    /// Run a guarded index query for the guest, and record it for the audit log: the query's
    /// hash and text (capped), the row count, and the outcome with its reason.
    fn cohort_query<T>(
        &mut self,
        call: &str,
        sparql: String,
        query: impl FnOnce(
            &amicus_index::Index,
            &str,
            &amicus_index::QueryLimits,
        ) -> Result<T, amicus_index::QueryError>,
        rows: impl FnOnce(&T) -> u64,
    ) -> Result<T, types::Error> {
        self.require(Capability::Cohort, call)?;
        let mut detail = format!("sha256:{} ", sha256(sparql.as_bytes()));
        detail.extend(guest_text(&sparql).chars().take(4096));
        let Some(access) = self.cohort.clone() else {
            return Err(self.not_available(
                Capability::Cohort,
                call,
                detail,
                "this station has not indexed its archive (amicus station index)",
            ));
        };
        let result = query(&access.index, &sparql, &access.limits);
        let rows_seen = result.as_ref().ok().map(rows);
        let answer = result.map_err(|e| {
            use amicus_index::QueryError as Q;
            let reason = e.to_string();
            match e {
                Q::TooLong { .. } | Q::TooManyRows(_) | Q::Timeout(_) => {
                    types::Error::LimitExceeded(reason)
                }
                Q::Syntax(_) => types::Error::InvalidArgument(reason),
                Q::Evaluation(_) => types::Error::Failed(reason),
                Q::Update
                | Q::Service
                | Q::NotSelect(_)
                | Q::NotAttributable(_)
                | Q::BelowMinimum(_) => types::Error::Denied(reason),
            }
        });
        self.record(Capability::Cohort, call, detail, rows_seen, answer)
    }
}

fn wit_term(cell: amicus_index::Cell) -> cohort::Term {
    match cell {
        amicus_index::Cell::Iri { value } => cohort::Term::Iri(value),
        amicus_index::Cell::BlankNode { value } => cohort::Term::BlankNode(value),
        amicus_index::Cell::Literal {
            value,
            datatype,
            language,
        } => cohort::Term::Literal(cohort::Literal {
            value,
            datatype,
            language,
        }),
    }
}

impl cohort::Host for HostState {
    fn select(&mut self, sparql: String) -> Result<cohort::Solutions, types::Error> {
        let solutions = self.cohort_query("select", sparql, amicus_index::query::select, |s| {
            s.rows.len() as u64
        })?;
        Ok(cohort::Solutions {
            variables: solutions.variables,
            rows: solutions
                .rows
                .into_iter()
                .map(|row| row.into_iter().map(|c| c.map(wit_term)).collect())
                .collect(),
        })
    }

    fn tally(&mut self, sparql: String) -> Result<cohort::TallyResult, types::Error> {
        let tally = self.cohort_query("tally", sparql, amicus_index::query::tally, |t| {
            t.cells.len() as u64
        })?;
        Ok(cohort::TallyResult {
            columns: tally.columns,
            cells: tally
                .cells
                .into_iter()
                .map(|c| cohort::TallyCell {
                    key: c.key,
                    patients: c.patients,
                    items: c.items,
                })
                .collect(),
            suppressed: tally.suppressed,
            min_patients: tally.min_patients,
        })
    }
}

impl tensors::Host for HostState {}

impl tensors::HostTensor for HostState {
    fn create(
        &mut self,
        shape: Vec<u32>,
        data: Vec<f32>,
    ) -> Result<Resource<HostTensor>, types::Error> {
        if !(self.granted.contains(&Capability::Imaging)
            || self.granted.contains(&Capability::Kernels))
        {
            return Err(types::Error::Denied(
                "tensors need capability imaging or kernels".into(),
            ));
        }
        let elements = shape
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d as usize));
        if elements != Some(data.len()) || shape.len() > 8 {
            return Err(types::Error::InvalidArgument(format!(
                "shape {shape:?} does not hold {} elements",
                data.len()
            )));
        }
        let bytes = data.len() * 4;
        if !self.memory.reserve_host(bytes) {
            return Err(types::Error::LimitExceeded(format!(
                "a tensor of {bytes} bytes would exceed the run's memory limit"
            )));
        }
        self.table
            .push(HostTensor { shape, data })
            .map_err(|e| types::Error::Failed(e.to_string()))
    }

    fn shape(&mut self, t: Resource<HostTensor>) -> Vec<u32> {
        self.table
            .get(&t)
            .map(|t| t.shape.clone())
            .unwrap_or_default()
    }

    fn read(&mut self, t: Resource<HostTensor>) -> Vec<f32> {
        self.table
            .get(&t)
            .map(|t| t.data.clone())
            .unwrap_or_default()
    }

    fn drop(&mut self, t: Resource<HostTensor>) -> wasmtime::Result<()> {
        let t = self.table.delete(t)?;
        self.memory.release_host(t.data.len() * 4);
        Ok(())
    }
}

impl HostState {
    /// Bytes left in the run's memory budget for host tensors.
    fn memory_left(&self) -> u64 {
        (self
            .memory
            .cap
            .saturating_sub(self.memory.linear + self.memory.host)) as u64
    }

    /// Record an imaging call for the audit log and turn an imaging error into the contract's.
    fn imaging_call<T>(
        &mut self,
        call: &str,
        detail: String,
        result: Result<T, amicus_imaging::ImagingError>,
    ) -> Result<T, types::Error> {
        use amicus_imaging::ImagingError as E;
        let answer = result.map_err(|e| {
            let reason = e.to_string();
            match e {
                E::TooLarge { .. } => types::Error::LimitExceeded(reason),
                E::Unsupported(_) => types::Error::NotAvailable(reason),
                E::UnknownSeries(_) | E::NoLabel(_) | E::InvalidRequest(_) => {
                    types::Error::InvalidArgument(reason)
                }
                E::BadFile { .. } | E::Inconsistent(_) => types::Error::Failed(reason),
            }
        });
        self.record(Capability::Imaging, call, detail, None, answer)
    }

    /// Apply the load options the contract offers to a volume of series `series_uid`, in the
    /// documented order: resample, keep slices, crop/pad, window, z-score.
    fn apply_options(
        &self,
        series_uid: &str,
        mut volume: amicus_imaging::Volume,
        options: &imaging::LoadOptions,
        is_mask: bool,
    ) -> Result<amicus_imaging::Volume, amicus_imaging::ImagingError> {
        use amicus_imaging::ImagingError as E;
        // The series' own grid, on which labels are drawn.
        let series_grid = volume.geometry.clone();
        if let Some((x, y, z)) = options.spacing {
            volume = amicus_imaging::resample(&volume, [x, y, z], is_mask, self.memory_left())?;
        }
        if let Some(r) = options.slices {
            volume = amicus_imaging::select_slices(&volume, r.first as usize, r.count as usize)?;
        }
        match (options.size, &options.centre) {
            (None, None) => {}
            (None, Some(_)) => {
                return Err(E::InvalidRequest("a crop centre needs a size".into()));
            }
            (Some((x, y, z)), centre) => {
                let size = [x as usize, y as usize, z as usize];
                let fill = if is_mask {
                    0.0
                } else {
                    volume.data.iter().copied().fold(f32::INFINITY, f32::min)
                };
                volume = match centre {
                    None => amicus_imaging::crop_or_pad(&volume, size, fill, self.memory_left())?,
                    Some(c) => {
                        let point = match c {
                            imaging::CropCentre::Point((x, y, z)) => [*x, *y, *z],
                            imaging::CropCentre::LabelBox(label) => {
                                let mask = self.label_mask(series_uid, label, &series_grid)?;
                                let centre =
                                    amicus_imaging::label_box_centre(&mask).ok_or_else(|| {
                                        E::NoLabel(format!(
                                            "{}: the label is empty on this series",
                                            label_text(label)
                                        ))
                                    })?;
                                mask.geometry.to_patient(centre)
                            }
                        };
                        let centre = volume.geometry.to_voxel(point);
                        amicus_imaging::crop_or_pad_around(
                            &volume,
                            size,
                            centre,
                            fill,
                            self.memory_left(),
                        )?
                    }
                };
            }
        }
        if let (Some(w), false) = (options.window, is_mask) {
            amicus_imaging::apply_window(
                &mut volume,
                amicus_imaging::Window {
                    center: w.center,
                    width: w.width,
                },
            )?;
        }
        if options.z_score && !is_mask {
            amicus_imaging::z_score(&mut volume);
        }
        Ok(volume)
    }

    /// Hand `data` with `shape` to the guest as a tensor, within the run's memory.
    fn push_tensor(
        &mut self,
        shape: Vec<u32>,
        data: Vec<f32>,
    ) -> Result<Resource<HostTensor>, amicus_imaging::ImagingError> {
        use amicus_imaging::ImagingError as E;
        let bytes = data.len() * 4;
        if !self.memory.reserve_host(bytes) {
            return Err(E::TooLarge {
                needed: bytes as u64,
                available: self.memory_left(),
            });
        }
        self.table
            .push(HostTensor { shape, data })
            .map_err(|e| E::Unsupported(format!("tensor table: {e}")))
    }

    /// Apply the options, then hand the volume over as a tensor.
    fn deliver(
        &mut self,
        series_uid: &str,
        volume: amicus_imaging::Volume,
        options: &imaging::LoadOptions,
        is_mask: bool,
    ) -> Result<imaging::Volume, amicus_imaging::ImagingError> {
        let volume = self.apply_options(series_uid, volume, options, is_mask)?;
        let [z, y, x] = volume.shape();
        let g = volume.geometry;
        let tensor = self.push_tensor(vec![z as u32, y as u32, x as u32], volume.data)?;
        Ok(imaging::Volume {
            data: tensor,
            geometry: imaging::Geometry {
                origin: (g.origin[0], g.origin[1], g.origin[2]),
                spacing: (g.spacing[0], g.spacing[1], g.spacing[2]),
                direction: g.direction.iter().flatten().copied().collect(),
            },
        })
    }

    /// The mask of `label` on `geometry`, the grid of series `series_uid`, from the RTSTRUCT
    /// or SEG that references the series (matched through the index, never by guesswork).
    fn label_mask(
        &self,
        series_uid: &str,
        label: &imaging::LabelSource,
        geometry: &amicus_imaging::Geometry,
    ) -> Result<amicus_imaging::Volume, amicus_imaging::ImagingError> {
        let state = self.imaging.as_ref().expect("checked by the caller");
        let (modality, name) = match label {
            imaging::LabelSource::RtstructRoi(n) => ("RTSTRUCT", n),
            imaging::LabelSource::SegSegment(n) => ("SEG", n),
        };
        let candidates = state.referencing(series_uid, modality);
        let holder = candidates.iter().find(|(_, f)| {
            if modality == "RTSTRUCT" {
                f.roi_names.contains(name)
            } else {
                f.segment_labels.contains(name)
            }
        });
        let Some((path, _)) = holder else {
            return Err(amicus_imaging::ImagingError::NoLabel(format!(
                "{:?} in any {modality} referencing series {}",
                guest_text(name),
                guest_text(series_uid)
            )));
        };
        let needed = geometry.voxels() as u64 * 4;
        if needed > self.memory_left() {
            return Err(amicus_imaging::ImagingError::TooLarge {
                needed,
                available: self.memory_left(),
            });
        }
        if modality == "RTSTRUCT" {
            amicus_imaging::rtstruct::load_roi_mask(path, name, geometry)
        } else {
            amicus_imaging::seg::load_segment_mask(path, name, geometry)
        }
    }

    fn series_files(
        &self,
        uid: &str,
    ) -> Result<Vec<std::path::PathBuf>, amicus_imaging::ImagingError> {
        let state = self.imaging.as_ref().expect("checked by the caller");
        let files = state.series_files(uid);
        if files.is_empty() {
            return Err(amicus_imaging::ImagingError::UnknownSeries(guest_text(uid)));
        }
        Ok(files)
    }
}

fn options_text(o: &imaging::LoadOptions) -> String {
    let centre = match &o.centre {
        None => "-".to_string(),
        Some(imaging::CropCentre::Point(p)) => format!("{p:?}"),
        Some(imaging::CropCentre::LabelBox(l)) => label_text(l),
    };
    format!(
        "spacing={:?} slices={:?} size={:?} centre={centre} window={:?} z-score={}",
        o.spacing,
        o.slices.map(|r| (r.first, r.count)),
        o.size,
        o.window.map(|w| (w.center, w.width)),
        o.z_score
    )
}

/// A label source for the audit log.
fn label_text(label: &imaging::LabelSource) -> String {
    match label {
        imaging::LabelSource::RtstructRoi(n) => format!("RTSTRUCT {:?}", guest_text(n)),
        imaging::LabelSource::SegSegment(n) => format!("SEG {:?}", guest_text(n)),
    }
}

impl imaging::Host for HostState {
    fn load_series(
        &mut self,
        series_uid: String,
        options: imaging::LoadOptions,
    ) -> Result<imaging::Volume, types::Error> {
        self.require(Capability::Imaging, "load-series")?;
        let detail = format!("{} {}", guest_text(&series_uid), options_text(&options));
        if self.imaging.is_none() {
            return Err(self.not_available(
                Capability::Imaging,
                "load-series",
                detail,
                "this station has not indexed its archive (amicus station index)",
            ));
        }
        let result = self
            .series_files(&series_uid)
            .and_then(|files| amicus_imaging::load_series(&files, self.memory_left()))
            .and_then(|volume| self.deliver(&series_uid, volume, &options, false));
        self.imaging_call("load-series", detail, result)
    }

    fn load_mask(
        &mut self,
        series_uid: String,
        label: imaging::LabelSource,
        options: imaging::LoadOptions,
    ) -> Result<imaging::Volume, types::Error> {
        self.require(Capability::Imaging, "load-mask")?;
        let detail = format!(
            "{} {} {}",
            guest_text(&series_uid),
            label_text(&label),
            options_text(&options)
        );
        if self.imaging.is_none() {
            return Err(self.not_available(
                Capability::Imaging,
                "load-mask",
                detail,
                "this station has not indexed its archive (amicus station index)",
            ));
        }
        let result = self
            .series_files(&series_uid)
            .and_then(|files| amicus_imaging::series_geometry(&files))
            .and_then(|grid| self.label_mask(&series_uid, &label, &grid))
            .and_then(|mask| self.deliver(&series_uid, mask, &options, true));
        self.imaging_call("load-mask", detail, result)
    }

    fn sample_patches(
        &mut self,
        series_uid: String,
        label: imaging::LabelSource,
        options: imaging::LoadOptions,
        request: imaging::PatchRequest,
    ) -> Result<imaging::Patches, types::Error> {
        use amicus_imaging::ImagingError as E;
        self.require(Capability::Imaging, "sample-patches")?;
        let (x, y, z) = request.size;
        let detail = format!(
            "{} {} {} size=({x}, {y}, {z}) count={} foreground={} seed={}",
            guest_text(&series_uid),
            label_text(&label),
            options_text(&options),
            request.count,
            request.foreground_fraction,
            request.seed
        );
        if self.imaging.is_none() {
            return Err(self.not_available(
                Capability::Imaging,
                "sample-patches",
                detail,
                "this station has not indexed its archive (amicus station index)",
            ));
        }
        let result = (|| {
            if options.slices.is_some() || options.size.is_some() || options.centre.is_some() {
                return Err(E::InvalidRequest(
                    "sample-patches takes the patch size from the request; leave the options' \
                     slices, size and centre unset"
                        .into(),
                ));
            }
            let files = self.series_files(&series_uid)?;
            let image = amicus_imaging::load_series(&files, self.memory_left())?;
            // The mask is drawn on the image's own grid: no second pass over the headers.
            let mask = self.label_mask(&series_uid, &label, &image.geometry)?;
            let image = self.apply_options(&series_uid, image, &options, false)?;
            let mask = self.apply_options(&series_uid, mask, &options, true)?;
            let fill = image.data.iter().copied().fold(f32::INFINITY, f32::min);
            let wanted = amicus_imaging::PatchRequest {
                size: [x as usize, y as usize, z as usize],
                count: request.count as usize,
                foreground_fraction: request.foreground_fraction,
                seed: request.seed,
            };
            let p =
                amicus_imaging::sample_patches(&image, &mask, &wanted, fill, self.memory_left())?;
            drop((image, mask));
            // Both tensors or neither: a refused second one must not strand the first.
            let needed = ((p.images.len() + p.masks.len()) * 4) as u64;
            if needed > self.memory_left() {
                return Err(E::TooLarge {
                    needed,
                    available: self.memory_left(),
                });
            }
            let shape = vec![request.count, z, y, x];
            let images = self.push_tensor(shape.clone(), p.images)?;
            let masks = self.push_tensor(shape, p.masks)?;
            Ok(imaging::Patches {
                images,
                masks,
                centres: p
                    .centres
                    .iter()
                    .map(|(c, foreground)| imaging::PatchCentre {
                        voxel: (c[0] as u32, c[1] as u32, c[2] as u32),
                        foreground: *foreground,
                    })
                    .collect(),
            })
        })();
        self.imaging_call("sample-patches", detail, result)
    }
}

impl kernels::Host for HostState {}

/// A host tensor as the kernels take it.
fn kernel_tensor(t: &HostTensor) -> amicus_kernels::Tensor {
    amicus_kernels::Tensor::new(
        t.shape.iter().map(|d| *d as usize).collect(),
        t.data.clone(),
    )
}

impl HostState {
    /// Record a kernels call for the audit log (consecutive successful steps of one trainer
    /// as one entry with their count) and turn a kernel error into the contract's.
    fn kernels_call<T>(
        &mut self,
        call: &str,
        detail: String,
        result: Result<T, amicus_kernels::KernelError>,
    ) -> Result<T, types::Error> {
        use amicus_kernels::KernelError as K;
        let answer = result.map_err(|e| {
            let reason = e.to_string();
            match e {
                K::LibraryMissing(_) | K::LibraryUnloadable { .. } | K::DeviceUnavailable(_) => {
                    types::Error::NotAvailable(reason)
                }
                K::Model(_) | K::Input(_) | K::Tensor { .. } => {
                    types::Error::InvalidArgument(reason)
                }
                K::Run(_) => types::Error::Failed(reason),
                K::Deadline => {
                    self.deadline_hit = true;
                    types::Error::LimitExceeded(reason)
                }
            }
        });
        let step = call == "trainer.step" && answer.is_ok();
        if step
            && let Some(last) = self.calls.last_mut()
            && last.call == call
            && last.detail == detail
            && last.outcome == "ok"
        {
            last.rows = Some(last.rows.unwrap_or(1) + 1);
            return answer;
        }
        self.record(Capability::Kernels, call, detail, step.then_some(1), answer)
    }

    /// The declared model `file`, or why it cannot be opened.
    fn declared_model(&mut self, call: &str, file: &str) -> Result<DeclaredModel, types::Error> {
        let Some(access) = &self.kernels else {
            return Err(self.not_available(
                Capability::Kernels,
                call,
                guest_text(file),
                "no models were handed to this run",
            ));
        };
        match access.models.get(file) {
            Some(m) => Ok(m.clone()),
            None => {
                let declared: Vec<String> = access.models.keys().cloned().collect();
                let reason = format!(
                    "{:?} is not a model the bundle declares (it declares {declared:?})",
                    guest_text(file)
                );
                self.record(
                    Capability::Kernels,
                    call,
                    guest_text(file),
                    None,
                    Err(types::Error::InvalidArgument(reason)),
                )
            }
        }
    }

    fn tensor_of(
        &self,
        t: &Resource<HostTensor>,
    ) -> Result<amicus_kernels::Tensor, amicus_kernels::KernelError> {
        self.table
            .get(t)
            .map(kernel_tensor)
            .map_err(|e| amicus_kernels::KernelError::Input(format!("tensor handle: {e}")))
    }
}

fn parse_model(
    bytes: &[u8],
) -> Result<amicus_autodiff::onnx::ModelProto, amicus_kernels::KernelError> {
    amicus_autodiff::onnx::ModelProto::from_bytes(bytes)
        .map_err(|e| amicus_kernels::KernelError::Model(e.to_string()))
}

impl kernels::HostModel for HostState {
    fn open(&mut self, file: String) -> Result<Resource<ModelHandle>, types::Error> {
        self.require(Capability::Kernels, "model.open")?;
        let model = self.declared_model("model.open", &file)?;
        let threads = self.kernels.as_ref().map_or(1, |k| k.threads);
        let device = self
            .kernels
            .as_ref()
            .map_or_else(Default::default, |k| k.device);
        let result = amicus_kernels::Session::from_bytes_on(&model.bytes, threads, device);
        let session = self.kernels_call("model.open", guest_text(&file), result)?;
        self.table
            .push(ModelHandle { file, session })
            .map_err(|e| types::Error::Failed(e.to_string()))
    }

    fn infer(
        &mut self,
        m: Resource<ModelHandle>,
        inputs: Vec<(String, Resource<HostTensor>)>,
    ) -> Result<Vec<(String, Resource<HostTensor>)>, types::Error> {
        self.require(Capability::Kernels, "model.infer")?;
        let mut tensors = Vec::with_capacity(inputs.len());
        for (name, t) in &inputs {
            let t = self.tensor_of(t);
            let t = self.kernels_call("model.infer", guest_text(name), t)?;
            if t.data.iter().any(|v| !v.is_finite()) {
                return self.kernels_call(
                    "model.infer",
                    guest_text(name),
                    Err(amicus_kernels::KernelError::Input(format!(
                        "input {:?} holds NaN or infinity",
                        guest_text(name)
                    ))),
                );
            }
            tensors.push((name.clone(), t));
        }
        let handle = self
            .table
            .get_mut(&m)
            .map_err(|e| types::Error::Failed(e.to_string()))?;
        let detail = handle.file.clone();
        let feeds: Vec<(&str, &amicus_kernels::Tensor)> =
            tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
        let result = handle.session.run_until(&feeds, &[], Some(self.deadline));
        let outputs = self.kernels_call("model.infer", detail, result)?;
        let mut handles = Vec::with_capacity(outputs.len());
        for (name, t) in outputs {
            let bytes = t.data.len() * 4;
            if !self.memory.reserve_host(bytes) {
                return Err(types::Error::LimitExceeded(format!(
                    "output {name:?} of {bytes} bytes would exceed the run's memory limit"
                )));
            }
            let shape = t.shape.iter().map(|d| *d as u32).collect();
            let r = self
                .table
                .push(HostTensor {
                    shape,
                    data: t.data,
                })
                .map_err(|e| types::Error::Failed(e.to_string()))?;
            handles.push((name, r));
        }
        Ok(handles)
    }

    fn drop(&mut self, m: Resource<ModelHandle>) -> wasmtime::Result<()> {
        self.table.delete(m)?;
        Ok(())
    }
}

/// The contract's optimizer as the kernels take it.
fn optimizer_of(o: &kernels::Optimizer) -> amicus_kernels::optim::Optimizer {
    match o {
        kernels::Optimizer::Sgd(s) => amicus_kernels::optim::Optimizer::Sgd {
            learning_rate: s.learning_rate,
            momentum: s.momentum,
            nesterov: s.nesterov,
            weight_decay: s.weight_decay,
        },
        kernels::Optimizer::Adam(a) => amicus_kernels::optim::Optimizer::Adam {
            learning_rate: a.learning_rate,
            beta1: a.beta1,
            beta2: a.beta2,
            epsilon: a.epsilon,
            weight_decay: a.weight_decay,
            decoupled: a.decoupled,
        },
    }
}

impl kernels::HostTrainer for HostState {
    fn open(
        &mut self,
        file: String,
        options: kernels::TrainerOptions,
    ) -> Result<Resource<TrainerHandle>, types::Error> {
        self.require(Capability::Kernels, "trainer.open")?;
        let model = self.declared_model("trainer.open", &file)?;
        let threads = self.kernels.as_ref().map_or(1, |k| k.threads);
        let device = self
            .kernels
            .as_ref()
            .map_or_else(Default::default, |k| k.device);
        let detail = format!("{} {:?}", guest_text(&file), options.optimizer);
        let result = (|| {
            use amicus_kernels::KernelError as K;
            if !model.trainable {
                return Err(K::Model(format!(
                    "{file:?} is declared frozen; only models declared trainable train"
                )));
            }
            let loss = model
                .loss
                .as_deref()
                .ok_or_else(|| K::Model(format!("{file:?} declares no loss")))
                .and_then(|l| amicus_autodiff::Loss::parse(l).map_err(K::Model))?;
            let forward = parse_model(&model.bytes)?;
            amicus_kernels::trainer::Trainer::new(
                &forward,
                amicus_kernels::trainer::TrainerOptions {
                    loss,
                    trainable: None,
                    optimizer: optimizer_of(&options.optimizer),
                    schedule: amicus_kernels::optim::Schedule::Constant,
                    clip_norm: options.clip_norm,
                    threads,
                    seed: options.seed,
                    device,
                },
            )
        })();
        // The training graph's digest goes into the audit log: auditors can re-derive it with
        // `amicus model grad` and know exactly which gradient code ran.
        let detail = match &result {
            Ok(t) => format!(
                "{detail} training-graph sha256:{} on {:?}",
                t.graph_digest(),
                t.device()
            ),
            Err(_) => detail,
        };
        let mut trainer = self.kernels_call("trainer.open", detail, result)?;
        trainer.set_deadline(Some(self.deadline));
        self.table
            .push(TrainerHandle { file, trainer })
            .map_err(|e| types::Error::Failed(e.to_string()))
    }

    fn step(
        &mut self,
        t: Resource<TrainerHandle>,
        x: Resource<HostTensor>,
        y: Resource<HostTensor>,
    ) -> Result<f32, types::Error> {
        self.require(Capability::Kernels, "trainer.step")?;
        let batch = self
            .tensor_of(&x)
            .and_then(|x| Ok((x, self.tensor_of(&y)?)));
        let handle = self
            .table
            .get_mut(&t)
            .map_err(|e| types::Error::Failed(e.to_string()))?;
        let detail = handle.file.clone();
        let result = batch.and_then(|(x, y)| handle.trainer.step(&x, &y));
        self.kernels_call("trainer.step", detail, result)
    }

    fn evaluate(
        &mut self,
        t: Resource<TrainerHandle>,
        x: Resource<HostTensor>,
        y: Resource<HostTensor>,
    ) -> Result<f32, types::Error> {
        self.require(Capability::Kernels, "trainer.evaluate")?;
        let batch = self
            .tensor_of(&x)
            .and_then(|x| Ok((x, self.tensor_of(&y)?)));
        let handle = self
            .table
            .get_mut(&t)
            .map_err(|e| types::Error::Failed(e.to_string()))?;
        let detail = handle.file.clone();
        let result = batch.and_then(|(x, y)| handle.trainer.evaluate(&x, &y).map(|(l, _)| l));
        self.kernels_call("trainer.evaluate", detail, result)
    }

    fn predict(
        &mut self,
        t: Resource<TrainerHandle>,
        x: Resource<HostTensor>,
    ) -> Result<Resource<HostTensor>, types::Error> {
        self.require(Capability::Kernels, "trainer.predict")?;
        let x = self.tensor_of(&x);
        let handle = self
            .table
            .get_mut(&t)
            .map_err(|e| types::Error::Failed(e.to_string()))?;
        let detail = handle.file.clone();
        let result = x.and_then(|x| handle.trainer.infer(&x));
        let out = self.kernels_call("trainer.predict", detail, result)?;
        let bytes = out.data.len() * 4;
        if !self.memory.reserve_host(bytes) {
            return Err(types::Error::LimitExceeded(format!(
                "a prediction of {bytes} bytes would exceed the run's memory limit"
            )));
        }
        self.table
            .push(HostTensor {
                shape: out.shape.iter().map(|d| *d as u32).collect(),
                data: out.data,
            })
            .map_err(|e| types::Error::Failed(e.to_string()))
    }

    fn set_schedule(
        &mut self,
        t: Resource<TrainerHandle>,
        schedule: kernels::Schedule,
    ) -> Result<(), types::Error> {
        self.require(Capability::Kernels, "trainer.set-schedule")?;
        use amicus_kernels::optim::Schedule;
        let host = match schedule {
            kernels::Schedule::Constant => Schedule::Constant,
            kernels::Schedule::StepDecay(d) => Schedule::Step {
                every: d.every,
                factor: d.factor,
            },
            kernels::Schedule::CosineDecay(d) => Schedule::Cosine {
                steps: d.steps,
                floor: d.floor,
            },
            kernels::Schedule::Warmup(steps) => Schedule::Warmup { steps },
        };
        let handle = self
            .table
            .get_mut(&t)
            .map_err(|e| types::Error::Failed(e.to_string()))?;
        let detail = format!("{} {host:?}", handle.file);
        let result = handle.trainer.set_schedule(host);
        self.kernels_call("trainer.set-schedule", detail, result)
    }

    fn get_weights(
        &mut self,
        t: Resource<TrainerHandle>,
    ) -> Result<Vec<kernels::NamedWeights>, types::Error> {
        self.require(Capability::Kernels, "trainer.get-weights")?;
        let handle = self
            .table
            .get(&t)
            .map_err(|e| types::Error::Failed(e.to_string()))?;
        let detail = handle.file.clone();
        let weights = handle
            .trainer
            .weights()
            .into_iter()
            .map(|w| kernels::NamedWeights {
                name: w.name,
                shape: w.shape.iter().map(|d| *d as u32).collect(),
                data: w.data,
            })
            .collect();
        self.kernels_call("trainer.get-weights", detail, Ok(weights))
    }

    fn set_weights(
        &mut self,
        t: Resource<TrainerHandle>,
        weights: Vec<kernels::NamedWeights>,
    ) -> Result<(), types::Error> {
        self.require(Capability::Kernels, "trainer.set-weights")?;
        let handle = self
            .table
            .get_mut(&t)
            .map_err(|e| types::Error::Failed(e.to_string()))?;
        let detail = handle.file.clone();
        let new: Vec<amicus_kernels::trainer::NamedWeights> = weights
            .into_iter()
            .map(|w| amicus_kernels::trainer::NamedWeights {
                name: w.name,
                shape: w.shape.iter().map(|d| *d as usize).collect(),
                data: w.data,
            })
            .collect();
        let result = handle.trainer.set_weights(&new);
        self.kernels_call("trainer.set-weights", detail, result)
    }

    fn drop(&mut self, t: Resource<TrainerHandle>) -> wasmtime::Result<()> {
        self.table.delete(t)?;
        Ok(())
    }
}

impl HostState {
    /// The run's round, for a `federated` call: the capability must be granted and the run
    /// must be part of a job.
    fn federated_round(&mut self, call: &str) -> Result<FederatedRound, types::Error> {
        self.require(Capability::Kernels, call)?;
        match &self.federated {
            Some(r) => Ok(r.clone()),
            None => Err(self.not_available(
                Capability::Kernels,
                call,
                String::new(),
                "this run is not part of a federated job",
            )),
        }
    }
}

impl federated::Host for HostState {
    fn current(&mut self) -> Result<federated::Round, types::Error> {
        let r = self.federated_round("federated.current")?;
        Ok(federated::Round {
            job: r.job,
            number: r.number,
            rounds: r.rounds,
            proximal_mu: r.proximal_mu,
        })
    }

    fn load_global(&mut self, t: Resource<TrainerHandle>) -> Result<(), types::Error> {
        const CALL: &str = "federated.load-global";
        let round = self.federated_round(CALL)?;
        let rep = t.rep();
        let handle = self
            .table
            .get_mut(&t)
            .map_err(|e| types::Error::Failed(e.to_string()))?;
        let detail = format!(
            "{} job {} round {}/{} ({} values)",
            handle.file,
            guest_text(&round.job),
            round.number,
            round.rounds,
            round.global.len()
        );
        let weights: Vec<amicus_kernels::trainer::NamedWeights> = round
            .global
            .tensors
            .iter()
            .map(|w| amicus_kernels::trainer::NamedWeights {
                name: w.name.clone(),
                shape: w.shape.clone(),
                data: w.data.clone(),
            })
            .collect();
        let result = handle
            .trainer
            .set_weights(&weights)
            .and_then(|()| handle.trainer.anchor_proximal(round.proximal_mu));
        let answer = self.kernels_call(CALL, detail, result);
        if answer.is_ok() {
            self.federated_trainer = Some(rep);
        }
        answer
    }

    fn submit(&mut self, t: Resource<TrainerHandle>, samples: u32) -> Result<(), types::Error> {
        const CALL: &str = "federated.submit";
        let round = self.federated_round(CALL)?;
        let detail = format!("samples {samples}");
        let refuse = |s: &mut HostState, e: types::Error| {
            s.record(
                Capability::Kernels,
                CALL,
                detail.clone(),
                None,
                Err::<(), _>(e),
            )
        };
        if self.submitted.is_some() {
            return refuse(
                self,
                types::Error::InvalidArgument("the update was already submitted".into()),
            );
        }
        if round.number > round.rounds {
            return refuse(
                self,
                types::Error::InvalidArgument(
                    "this is the job's evaluation round: it takes no update".into(),
                ),
            );
        }
        if self.federated_trainer != Some(t.rep()) {
            return refuse(
                self,
                types::Error::InvalidArgument(
                    "submit the trainer that load-global set to the round's global weights".into(),
                ),
            );
        }
        if samples == 0 {
            return refuse(
                self,
                types::Error::InvalidArgument("an update needs at least one sample".into()),
            );
        }
        let local = match self.table.get(&t) {
            Ok(h) => h.trainer.weights(),
            Err(e) => return refuse(self, types::Error::Failed(e.to_string())),
        };
        let mut delta = Vec::with_capacity(round.global.len());
        for g in &round.global.tensors {
            match local.iter().find(|w| w.name == g.name) {
                Some(w) if w.shape == g.shape => {
                    delta.extend(w.data.iter().zip(&g.data).map(|(l, g)| l - g));
                }
                _ => {
                    return refuse(
                        self,
                        types::Error::InvalidArgument(format!(
                            "the trainer has no weight {:?} of shape {:?}",
                            g.name, g.shape
                        )),
                    );
                }
            }
        }
        let privatised = match privatise(&mut delta, round.clip_norm, round.noise_multiplier) {
            Ok(p) => p,
            Err(e) => return refuse(self, types::Error::Failed(e)),
        };
        let update = amicus_fl::wire::Update {
            samples: u64::from(samples),
            delta,
        };
        let bytes = match update.encode(round.encoding) {
            Ok(b) => b,
            Err(e) => return refuse(self, types::Error::Failed(format!("update: {e}"))),
        };
        let submitted = SubmittedUpdate {
            samples: u64::from(samples),
            values: update.delta.len() as u64,
            norm: privatised.0,
            clipped: privatised.1,
            noised: round.noise_multiplier.is_some(),
            bytes: bytes.len() as u64,
        };
        if let Err(violation) = self.outputs.emit_checked(UPDATE_OUTPUT, bytes) {
            return refuse(self, types::Error::LimitExceeded(violation));
        }
        let detail = format!(
            "samples {samples}, {} values, norm {:.4}{}{}, {} bytes ({:?})",
            submitted.values,
            submitted.norm,
            if submitted.clipped { ", clipped" } else { "" },
            if submitted.noised { ", noised" } else { "" },
            submitted.bytes,
            round.encoding
        );
        self.submitted = Some(submitted);
        self.record(Capability::Kernels, CALL, detail, None, Ok(()))
    }
}

/// Clip `delta` to `clip_norm` and add Gaussian noise of standard deviation
/// `noise_multiplier · clip_norm` (from OS randomness). Returns the norm before clipping and
/// whether it was clipped.
pub fn privatise(
    delta: &mut [f32],
    clip_norm: Option<f64>,
    noise_multiplier: Option<f64>,
) -> Result<(f64, bool), String> {
    let norm = amicus_fl::aggregate::l2_norm(delta);
    if !norm.is_finite() {
        return Err("the update is not finite".into());
    }
    let clipped = match clip_norm {
        Some(c) if c.is_finite() && c > 0.0 => {
            amicus_fl::aggregate::clip_norm(delta, c);
            norm > c
        }
        Some(c) => return Err(format!("clip norm {c} is not a positive number")),
        None => false,
    };
    if let Some(sigma) = noise_multiplier {
        let Some(c) = clip_norm else {
            return Err("noise needs a clip norm (the sensitivity)".into());
        };
        if !(sigma.is_finite() && sigma > 0.0) {
            return Err(format!("noise multiplier {sigma} is not a positive number"));
        }
        let mut rng = os_rng().map_err(|e| format!("operating system randomness: {e}"))?;
        let std = sigma * c;
        for x in delta.iter_mut() {
            *x = (f64::from(*x) + std * gaussian(&mut rng)) as f32;
        }
    }
    Ok((norm, clipped))
}

fn os_rng() -> Result<rand::rngs::StdRng, getrandom::Error> {
    use rand::SeedableRng;
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed)?;
    Ok(rand::rngs::StdRng::from_seed(seed))
}

/// A standard normal draw (Box–Muller).
fn gaussian(rng: &mut rand::rngs::StdRng) -> f64 {
    use rand::Rng;
    let unit = |rng: &mut rand::rngs::StdRng| (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
    let u1 = 1.0 - unit(rng); // (0, 1]
    let u2 = unit(rng);
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// WASI for a train: no preopens, no environment or arguments, no network, empty stdin,
/// stdout/stderr into a capped in-memory buffer, a fixed clock and randomness seeded from
/// `seed` (so a run is reproducible from its audit entry).
fn locked_down_wasi(seed: &[u8; 32], stdout: &CappedPipe) -> WasiCtx {
    use rand::SeedableRng;
    let mut secure_seed = *seed;
    secure_seed[0] ^= 1;
    let mut insecure_seed = *seed;
    insecure_seed[0] ^= 2;
    let mut b = wasmtime_wasi::WasiCtxBuilder::new();
    b.allow_tcp(false)
        .allow_udp(false)
        .allow_ip_name_lookup(false)
        .socket_addr_check(|_, _| Box::pin(async { false }))
        .stdout(stdout.clone())
        .stderr(stdout.clone())
        .secure_random(rand::rngs::StdRng::from_seed(secure_seed))
        .insecure_random(rand::rngs::StdRng::from_seed(insecure_seed))
        .insecure_random_seed(u128::from_le_bytes(
            seed[..16].try_into().expect("16 bytes"),
        ))
        .wall_clock(FixedWallClock)
        .monotonic_clock(StepMonotonicClock::default());
    b.build()
}

/// 2000-01-01T00:00:00Z for every call: a guest cannot time anything with it.
struct FixedWallClock;

impl wasmtime_wasi::HostWallClock for FixedWallClock {
    fn resolution(&self) -> Duration {
        Duration::from_secs(1)
    }
    fn now(&self) -> Duration {
        Duration::from_secs(946_684_800)
    }
}

/// Advances 1 µs per reading, independent of real time.
#[derive(Default)]
struct StepMonotonicClock(AtomicU64);

impl wasmtime_wasi::HostMonotonicClock for StepMonotonicClock {
    fn resolution(&self) -> u64 {
        1_000
    }
    fn now(&self) -> u64 {
        self.0.fetch_add(1_000, Ordering::Relaxed)
    }
}

/// stdout/stderr of a guest: kept up to `cap` bytes, the rest silently dropped (a guest must
/// not be able to fail or stall the station by printing).
#[derive(Clone)]
struct CappedPipe {
    buf: Arc<Mutex<Vec<u8>>>,
    cap: usize,
}

impl CappedPipe {
    fn new(cap: usize) -> CappedPipe {
        CappedPipe {
            buf: Arc::new(Mutex::new(Vec::new())),
            cap,
        }
    }

    fn push(&self, bytes: &[u8]) {
        let mut buf = self.buf.lock().unwrap_or_else(|p| p.into_inner());
        let room = self.cap.saturating_sub(buf.len());
        buf.extend_from_slice(&bytes[..bytes.len().min(room)]);
    }

    fn contents(&self) -> Vec<u8> {
        self.buf.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl wasmtime_wasi::cli::IsTerminal for CappedPipe {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl wasmtime_wasi::cli::StdoutStream for CappedPipe {
    fn p2_stream(&self) -> Box<dyn wasmtime_wasi::p2::OutputStream> {
        Box::new(self.clone())
    }
    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

#[wasmtime_wasi::async_trait]
impl wasmtime_wasi::p2::Pollable for CappedPipe {
    async fn ready(&mut self) {}
}

impl wasmtime_wasi::p2::OutputStream for CappedPipe {
    fn write(&mut self, bytes: bytes::Bytes) -> wasmtime_wasi::p2::StreamResult<()> {
        self.push(&bytes);
        Ok(())
    }
    fn flush(&mut self) -> wasmtime_wasi::p2::StreamResult<()> {
        Ok(())
    }
    fn check_write(&mut self) -> wasmtime_wasi::p2::StreamResult<usize> {
        Ok(64 * 1024)
    }
}

impl tokio::io::AsyncWrite for CappedPipe {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.push(buf);
        std::task::Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

/// Text that came from a guest, made safe to show and store: control characters (terminal
/// escape sequences among them) are escaped, except newline and tab, and the length is capped.
pub fn guest_text(s: &str) -> String {
    let mut out = String::with_capacity(s.len().min(crate::audit::MAX_TEXT));
    for c in s.chars() {
        if c.is_control() && c != '\n' && c != '\t' {
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
    fn memory_budget_counts_host_and_linear() {
        let mut m = MemoryBudget::new(1000);
        assert!(m.memory_growing(0, 600, None).unwrap());
        assert!(m.reserve_host(300));
        assert!(!m.reserve_host(200));
        assert!(m.refused.is_some());
        m.release_host(300);
        assert!(m.memory_growing(600, 1000, None).unwrap());
        assert!(!m.memory_growing(1000, 1001, None).unwrap());
        assert_eq!(m.peak, 1000);
    }

    #[test]
    fn output_gate_rules() {
        let manifest = Manifest::parse_source(
            r#"
[train]
name = "t"
version = "1"
[limits]
fuel = 1
memory_mib = 1
wall_seconds = 1
[[outputs]]
name = "a.json"
kind = "statistics"
max_bytes = 10
[[outputs]]
name = "b.json"
kind = "metrics"
max_bytes = 100
"#,
        )
        .unwrap();
        let mut g = OutputGate::new(&manifest, 50, 60);
        assert!(g.emit("a.json", vec![0; 10]).is_ok());
        assert!(g.emit("a.json", vec![0; 1]).unwrap_err().contains("twice"));
        assert!(
            g.emit("c.json", vec![0; 1])
                .unwrap_err()
                .contains("not declared")
        );
        // b.json is capped by the policy (50), not its declaration (100).
        assert!(
            g.emit("b.json", vec![0; 51])
                .unwrap_err()
                .contains("limit is 50")
        );
        let mut g = OutputGate::new(&manifest, 50, 55);
        assert!(g.emit("a.json", vec![0; 10]).is_ok());
        assert!(
            g.emit("b.json", vec![0; 50])
                .unwrap_err()
                .contains("at most 55")
        );
    }

    #[test]
    fn denied_capability_calls_fail_cleanly() {
        let stdout = CappedPipe::new(10);
        let manifest = Manifest::parse_source(
            "[train]\nname = \"t\"\nversion = \"1\"\n[limits]\nfuel = 1\nmemory_mib = 1\nwall_seconds = 1\n",
        )
        .unwrap();
        let mut s = HostState {
            wasi: locked_down_wasi(&[0; 32], &stdout),
            table: ResourceTable::new(),
            memory: MemoryBudget::new(1 << 20),
            outputs: OutputGate::new(&manifest, 1, 1),
            log: RunLog::new(100),
            granted: BTreeSet::new(),
            calls: Vec::new(),
            progress: Box::new(|_, _| {}),
            cohort: None,
            imaging: None,
            kernels: None,
            federated: None,
            federated_trainer: None,
            submitted: None,
            deadline: Instant::now() + Duration::from_secs(1),
            deadline_hit: false,
        };
        let e = cohort::Host::select(&mut s, "SELECT * {}".into()).unwrap_err();
        assert!(matches!(e, types::Error::Denied(_)));
        let e = tensors::HostTensor::create(&mut s, vec![1], vec![0.0]).unwrap_err();
        assert!(matches!(e, types::Error::Denied(_)));
        assert_eq!(s.calls.len(), 1);
        assert_eq!(s.calls[0].outcome, "denied");

        s.granted.insert(Capability::Cohort);
        let e = cohort::Host::select(&mut s, "SELECT * {}".into()).unwrap_err();
        assert!(matches!(e, types::Error::NotAvailable(ref m) if m.contains("not indexed")));

        // Kernels: not granted is denied; granted without models handed over is not available.
        let e = kernels::HostModel::open(&mut s, "models/m.onnx".into()).unwrap_err();
        assert!(matches!(e, types::Error::Denied(_)));
        s.granted.insert(Capability::Kernels);
        let e = kernels::HostModel::open(&mut s, "models/m.onnx".into()).unwrap_err();
        assert!(matches!(e, types::Error::NotAvailable(_)));
    }

    #[test]
    fn guest_text_escapes_control_characters() {
        assert_eq!(guest_text("ok\nline\ttab"), "ok\nline\ttab");
        assert_eq!(guest_text("\u{1b}[2J"), "\\u{1b}[2J");
        assert!(guest_text(&"x".repeat(10_000)).len() <= crate::audit::MAX_TEXT + 3);
    }

    #[test]
    fn capped_pipe_drops_beyond_cap() {
        let p = CappedPipe::new(5);
        p.push(b"abc");
        p.push(b"defgh");
        assert_eq!(p.contents(), b"abcde");
    }
}
