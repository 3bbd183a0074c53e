//! The station policy (`policy.toml`): the data owner's decisions, and the checks that apply
//! them to a bundle before anything runs.
//!
//! Deny by default: a new station trusts no signer, approves no digest, grants only the
//! `cohort` capability, and needs one trusted signature. This module reads, validates, edits
//! (atomically) and applies the policy; it never runs a train or writes the audit log.

use amicus_bundle::{Bundle, Capability, Digest, Limits, PublicKey, TrustedKey};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

pub const POLICY_FILE: &str = "policy.toml";

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a valid station policy: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("signer key {0} is already trusted")]
    AlreadyTrusted(String),
    #[error("a trusted signer is already named {0:?}")]
    NameTaken(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Signer {
    pub name: String,
    /// SubjectPublicKeyInfo PEM.
    pub key: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Approval {
    pub digest: Digest,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub train: Option<String>,
    /// Which runs of the digest the approval admits. Approvals written before scopes existed
    /// admit any parameters (what the data owner approved then).
    #[serde(default)]
    pub scope: ApprovalScope,
    /// With scope `exact`: the SHA-256 of each parameter document approved.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub params: Vec<Digest>,
}

/// What an approval of a digest admits: parameters change what a train does at run time.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ApprovalScope {
    /// Any parameters.
    #[default]
    Any,
    /// Parameters that match the JSON Schema the train declares (`[params] schema`), which the
    /// data owner saw at review. The default for new approvals.
    Schema,
    /// Exactly the parameter documents approved (by SHA-256).
    Exact,
}

impl ApprovalScope {
    pub fn name(self) -> &'static str {
        match self {
            ApprovalScope::Any => "any",
            ApprovalScope::Schema => "schema",
            ApprovalScope::Exact => "exact",
        }
    }

    pub fn parse(s: &str) -> Option<ApprovalScope> {
        match s {
            "any" => Some(ApprovalScope::Any),
            "schema" => Some(ApprovalScope::Schema),
            "exact" => Some(ApprovalScope::Exact),
            _ => None,
        }
    }
}

/// How trains' models run on this station (capability `kernels`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KernelsPolicy {
    /// `cpu` (the default), `cuda` (ONNX Runtime's CUDA execution provider; kernels calls are
    /// refused `not-available` when the station's ONNX Runtime library has none), or `auto`
    /// (CUDA when the library has it, else the CPU).
    #[serde(default)]
    pub device: KernelDevice,
    /// Largest model file a bundle may declare.
    #[serde(default = "default_max_model_bytes")]
    pub max_model_bytes: u64,
    /// Most nodes a model may have, counted over all its graphs and functions.
    #[serde(default = "default_max_nodes")]
    pub max_nodes: u64,
}

fn default_max_model_bytes() -> u64 {
    256 << 20
}

fn default_max_nodes() -> u64 {
    100_000
}

impl Default for KernelsPolicy {
    fn default() -> Self {
        KernelsPolicy {
            device: KernelDevice::default(),
            max_model_bytes: default_max_model_bytes(),
            max_nodes: default_max_nodes(),
        }
    }
}

impl KernelsPolicy {
    pub fn model_caps(&self) -> amicus_autodiff::loadable::Caps {
        amicus_autodiff::loadable::Caps {
            max_bytes: self.max_model_bytes,
            max_nodes: self.max_nodes,
        }
    }
}

/// The run worker each train runs in (`[worker]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerPolicy {
    /// Refuse to run trains when the kernel cannot fully confine the worker (Landlock with
    /// network and signal rules, seccomp); otherwise they run best effort and the audit log
    /// says what held.
    #[serde(default)]
    pub require_confinement: bool,
    /// Memory the worker may use beyond its baseline and the train's `memory_mib` (thread
    /// stacks, allocator arenas, the engine's bookkeeping).
    #[serde(default = "default_slack")]
    pub memory_slack_mib: u32,
    /// Longest the worker may take to start and load the index before the train runs.
    #[serde(default = "default_setup_seconds")]
    pub setup_seconds: u32,
    /// Largest WebAssembly component the station compiles.
    #[serde(default = "default_max_component_mib")]
    pub max_component_mib: u32,
    /// Longest a component's compilation may take (in a compile worker, before the run).
    #[serde(default = "default_compile_seconds")]
    pub compile_seconds: u32,
    /// Memory a component's compilation may use.
    #[serde(default = "default_compile_memory_mib")]
    pub compile_memory_mib: u32,
}

fn default_max_component_mib() -> u32 {
    64
}

fn default_compile_seconds() -> u32 {
    60
}

fn default_compile_memory_mib() -> u32 {
    1024
}

fn default_slack() -> u32 {
    64
}

fn default_setup_seconds() -> u32 {
    120
}

impl Default for WorkerPolicy {
    fn default() -> Self {
        WorkerPolicy {
            require_confinement: false,
            memory_slack_mib: default_slack(),
            setup_seconds: default_setup_seconds(),
            max_component_mib: default_max_component_mib(),
            compile_seconds: default_compile_seconds(),
            compile_memory_mib: default_compile_memory_mib(),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KernelDevice {
    #[default]
    Cpu,
    Cuda,
    Auto,
}

impl KernelDevice {
    pub fn kernels(self) -> amicus_kernels::Device {
        match self {
            KernelDevice::Cpu => amicus_kernels::Device::Cpu,
            KernelDevice::Cuda => amicus_kernels::Device::Cuda,
            KernelDevice::Auto => amicus_kernels::Device::Auto,
        }
    }
}

/// Upper bounds on what any train may ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResourceCaps {
    pub fuel: u64,
    pub memory_mib: u32,
    pub wall_seconds: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputCaps {
    /// Largest single output.
    pub max_bytes: u64,
    /// Largest sum of a run's outputs.
    pub max_total_bytes: u64,
    /// Largest run log (train log lines plus captured stdout/stderr) kept at the station.
    pub max_log_bytes: u64,
    /// Most bytes of audit entries (capability calls) one run may cause; a run that goes
    /// over is stopped `limit-exceeded`.
    #[serde(default = "default_max_audit_bytes")]
    pub max_audit_bytes: u64,
    /// Whether the outputs of runs outside federated rounds wait at the station for the data
    /// owner's decision (`amicus station release RUN` / `withhold RUN`) before they count as
    /// released. Federated updates are not held (they are clipped, noised or masked).
    #[serde(default)]
    pub hold_for_release: bool,
}

fn default_true() -> bool {
    true
}

fn default_max_audit_bytes() -> u64 {
    1 << 20
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// Distinct trusted signatures a bundle needs (at least 1).
    pub required_signatures: usize,
    /// Whether the data owner must approve each bundle digest before it may run.
    pub require_approval: bool,
    /// Whether work from a registry (tasks, rounds of jobs) must carry the request of a
    /// researcher in `trusted_researchers`, signed, asking for exactly what the registry
    /// delivered. On by default: without it the station trusts the registry with what runs.
    #[serde(default = "default_true")]
    pub require_signed_requests: bool,
    /// Capabilities trains may use on this station.
    pub allowed_capabilities: Vec<Capability>,
    pub caps: ResourceCaps,
    pub outputs: OutputCaps,
    #[serde(default)]
    pub cohort: CohortPolicy,
    #[serde(default)]
    pub catalog: CatalogPolicy,
    #[serde(default)]
    pub privacy: PrivacyPolicy,
    #[serde(default)]
    pub kernels: KernelsPolicy,
    #[serde(default)]
    pub worker: WorkerPolicy,
    #[serde(default)]
    pub trusted_signers: Vec<Signer>,
    /// Researchers whose signed requests this station acts on.
    #[serde(default)]
    pub trusted_researchers: Vec<Signer>,
    #[serde(default)]
    pub approved: Vec<Approval>,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            required_signatures: 1,
            require_approval: true,
            require_signed_requests: true,
            allowed_capabilities: vec![Capability::Cohort],
            caps: ResourceCaps {
                fuel: 50_000_000_000,
                memory_mib: 1024,
                wall_seconds: 3600,
            },
            outputs: OutputCaps {
                max_bytes: 16 << 20,
                max_total_bytes: 64 << 20,
                max_log_bytes: 1 << 20,
                max_audit_bytes: default_max_audit_bytes(),
                hold_for_release: false,
            },
            cohort: CohortPolicy::default(),
            catalog: CatalogPolicy::default(),
            privacy: PrivacyPolicy::default(),
            kernels: KernelsPolicy::default(),
            worker: WorkerPolicy::default(),
            trusted_signers: Vec::new(),
            trusted_researchers: Vec::new(),
            approved: Vec::new(),
        }
    }
}

/// Limits on the cohort queries of trains (`[cohort]`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CohortPolicy {
    /// Smallest number of distinct patients a query result (or a tally cell) may cover.
    pub min_patients: u32,
    /// Largest number of rows a query may return.
    pub max_rows: u64,
    /// Longest a query may run.
    pub timeout_ms: u64,
    /// Longest query text.
    pub max_query_bytes: u64,
    /// Most solutions one part of a query may hold in memory while it is evaluated (what is
    /// sorted, grouped, made distinct, or built for a join).
    #[serde(default = "default_max_intermediate_rows")]
    pub max_intermediate_rows: u64,
    /// Most cohort queries (`select` and `tally`) one run may make.
    #[serde(default = "default_max_queries_per_run")]
    pub max_queries_per_run: u64,
    /// Most cohort queries one train digest may make on this station, over all its runs: many
    /// queries are how a train differences cohorts down to one person.
    #[serde(default = "default_max_queries_per_digest")]
    pub max_queries_per_digest: u64,
    /// ε of the noise on each `tally` (two-sided geometric, charged to the digest's privacy
    /// budget of `[privacy]`); 0 for exact counts.
    #[serde(default)]
    pub tally_epsilon: f64,
    /// With noise: how many cells of one tally a patient may count in.
    #[serde(default = "default_tally_cells_per_patient")]
    pub tally_cells_per_patient: u32,
}

fn default_max_queries_per_run() -> u64 {
    1000
}

fn default_max_queries_per_digest() -> u64 {
    100_000
}

fn default_tally_cells_per_patient() -> u32 {
    1
}

fn default_max_intermediate_rows() -> u64 {
    amicus_index::query::DEFAULT_MAX_INTERMEDIATE as u64
}

impl Default for CohortPolicy {
    fn default() -> Self {
        CohortPolicy {
            min_patients: 10,
            max_rows: 100_000,
            timeout_ms: 10_000,
            max_query_bytes: 16 << 10,
            max_intermediate_rows: default_max_intermediate_rows(),
            max_queries_per_run: default_max_queries_per_run(),
            max_queries_per_digest: default_max_queries_per_digest(),
            tally_epsilon: 0.0,
            tally_cells_per_patient: default_tally_cells_per_patient(),
        }
    }
}

/// Differential privacy of the updates of federated rounds (`[privacy]`). The station clips
/// each update and adds Gaussian noise as the job's plan says, and counts the privacy each train
/// digest has spent here with an RDP accountant (one Gaussian mechanism per round: the whole
/// update, sensitivity the clip norm). A round that would take a digest over its budget is
/// refused before it runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrivacyPolicy {
    /// Refuse rounds whose plan adds no noise.
    pub require_noise: bool,
    /// The δ of the (ε, δ) that budgets are stated in.
    pub delta: f64,
    /// Largest ε a train digest may spend on this station, unless `budgets` names it.
    pub default_epsilon: f64,
    #[serde(default)]
    pub budgets: Vec<PrivacyBudget>,
}

/// The ε one train digest may spend.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrivacyBudget {
    pub digest: Digest,
    pub epsilon: f64,
}

impl Default for PrivacyPolicy {
    fn default() -> Self {
        PrivacyPolicy {
            require_noise: false,
            delta: 1e-5,
            default_epsilon: 10.0,
            budgets: Vec::new(),
        }
    }
}

impl PrivacyPolicy {
    /// The ε `digest` may spend here.
    pub fn budget(&self, digest: &Digest) -> f64 {
        self.budgets
            .iter()
            .find(|b| b.digest == *digest)
            .map_or(self.default_epsilon, |b| b.epsilon)
    }
}

/// What `amicus station catalog` publishes about the station (`[catalog]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CatalogPolicy {
    /// Defaults to the station's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    /// Defaults to the station's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub publisher: Option<String>,
    /// License IRI of the catalog record (the images themselves are never published).
    pub license: String,
}

impl Default for CatalogPolicy {
    fn default() -> Self {
        CatalogPolicy {
            title: None,
            publisher: None,
            license: "https://creativecommons.org/publicdomain/zero/1.0/".into(),
        }
    }
}

const HEADER: &str = "\
# amicus station policy: the data owner's decisions. Deny by default.
# Edit with `amicus station trust` / `amicus station approve`, or by hand (then check with
# `amicus station policy --dir DIR`).
";

impl Policy {
    pub fn path(station_dir: &Path) -> PathBuf {
        station_dir.join(POLICY_FILE)
    }

    pub fn load(station_dir: &Path) -> Result<Policy, PolicyError> {
        let path = Self::path(station_dir);
        let text = std::fs::read_to_string(&path).map_err(|source| PolicyError::Io {
            path: path.clone(),
            source,
        })?;
        let policy: Policy = toml::from_str(&text).map_err(|e| PolicyError::Invalid {
            path: path.clone(),
            reason: e.message().to_string(),
        })?;
        policy
            .validate()
            .map_err(|reason| PolicyError::Invalid { path, reason })?;
        Ok(policy)
    }

    /// Write atomically.
    pub fn save(&self, station_dir: &Path) -> Result<(), PolicyError> {
        let path = Self::path(station_dir);
        let text = format!(
            "{HEADER}{}",
            toml::to_string(self).expect("a policy always serialises")
        );
        amicus_bundle::bundle::write_atomic(&path, text.as_bytes())
            .map_err(|source| PolicyError::Io { path, source })
    }

    fn validate(&self) -> Result<(), String> {
        if self.required_signatures == 0 {
            return Err("required_signatures must be at least 1".into());
        }
        if self.caps.fuel == 0 || self.caps.memory_mib == 0 || self.caps.wall_seconds == 0 {
            return Err("caps must be positive".into());
        }
        if self.outputs.max_bytes == 0 || self.outputs.max_total_bytes == 0 {
            return Err("output caps must be positive".into());
        }
        if self.kernels.max_model_bytes == 0 || self.kernels.max_nodes == 0 {
            return Err("kernels.max_model_bytes and kernels.max_nodes must be positive".into());
        }
        let w = &self.worker;
        if w.setup_seconds == 0
            || w.max_component_mib == 0
            || w.compile_seconds == 0
            || w.compile_memory_mib == 0
        {
            return Err(
                "worker.setup_seconds, max_component_mib, compile_seconds and compile_memory_mib must be positive"
                    .into(),
            );
        }
        let c = &self.cohort;
        if c.min_patients == 0 {
            return Err("cohort.min_patients must be at least 1".into());
        }
        if !(c.tally_epsilon.is_finite() && c.tally_epsilon >= 0.0) {
            return Err("cohort.tally_epsilon must be a finite ε ≥ 0".into());
        }
        if c.max_rows == 0
            || c.timeout_ms == 0
            || c.max_query_bytes == 0
            || c.max_intermediate_rows == 0
            || c.tally_cells_per_patient == 0
        {
            return Err("cohort limits must be positive".into());
        }
        if !self.catalog.license.contains(':') || self.catalog.license.contains(char::is_whitespace)
        {
            return Err("catalog.license must be an IRI".into());
        }
        let p = &self.privacy;
        if !(p.delta > 0.0 && p.delta < 1.0) {
            return Err("privacy.delta must be between 0 and 1".into());
        }
        let eps = std::iter::once(p.default_epsilon).chain(p.budgets.iter().map(|b| b.epsilon));
        for e in eps {
            if !(e.is_finite() && e >= 0.0) {
                return Err(format!("privacy budget {e} is not a finite ε ≥ 0"));
            }
        }
        for s in &self.trusted_signers {
            PublicKey::from_pem(&s.key, &s.name).map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    pub fn trusted_keys(&self) -> Vec<TrustedKey> {
        keys_of(&self.trusted_signers)
    }

    /// The researchers whose signed requests this station acts on.
    pub fn researcher_keys(&self) -> Vec<TrustedKey> {
        keys_of(&self.trusted_researchers)
    }

    /// Act on requests signed by `key`, known as `name`.
    pub fn trust_researcher(&mut self, name: &str, key: &PublicKey) -> Result<(), PolicyError> {
        add_key(&mut self.trusted_researchers, name, key)
    }

    /// Trust `key` under `name`.
    pub fn trust(&mut self, name: &str, key: &PublicKey) -> Result<(), PolicyError> {
        add_key(&mut self.trusted_signers, name, key)
    }

    /// Approve `digest` for any parameters (an approval without a scope). Returns whether
    /// the policy changed.
    pub fn approve(&mut self, digest: Digest, train: Option<String>) -> bool {
        self.approve_scoped(digest, train, ApprovalScope::Any, None)
    }

    /// Approve `digest` with `scope` (with `Exact`, adding the parameters `params`). Returns
    /// whether the policy changed.
    pub fn approve_scoped(
        &mut self,
        digest: Digest,
        train: Option<String>,
        scope: ApprovalScope,
        params: Option<Digest>,
    ) -> bool {
        if let Some(a) = self.approved.iter_mut().find(|a| a.digest == digest) {
            let mut changed = a.scope != scope;
            a.scope = scope;
            if scope == ApprovalScope::Exact {
                if let Some(p) = params
                    && !a.params.contains(&p)
                {
                    a.params.push(p);
                    changed = true;
                }
            } else if !a.params.is_empty() {
                a.params.clear();
                changed = true;
            }
            return changed;
        }
        self.approved.push(Approval {
            digest,
            train,
            scope,
            params: params
                .into_iter()
                .filter(|_| scope == ApprovalScope::Exact)
                .collect(),
        });
        true
    }

    /// The approval of `digest`, if any.
    pub fn approval(&self, digest: &Digest) -> Option<&Approval> {
        self.approved.iter().find(|a| a.digest == *digest)
    }

    /// Whether the approval that admitted a bundle also admits these parameters; the scope's
    /// name when it does (`not required` without approvals), the refusal when not.
    pub fn admit_params(&self, bundle: &Bundle, params: &str) -> Result<&'static str, Refusal> {
        if !self.require_approval {
            return Ok("not required");
        }
        let Some(approval) = self.approval(&bundle.digest()) else {
            return Err(Refusal::new("approval", "the digest is not approved"));
        };
        match approval.scope {
            ApprovalScope::Any => Ok("any"),
            ApprovalScope::Exact => {
                let hash = amicus_bundle::sha256(params.as_bytes());
                if approval.params.contains(&hash) {
                    Ok("exact")
                } else {
                    Err(Refusal::new(
                        "approval",
                        format!(
                            "the data owner approved this digest for particular parameters only, and not these (sha256 {hash}; amicus station approve --dir DIR {} --scope exact --params FILE)",
                            bundle.digest()
                        ),
                    ))
                }
            }
            ApprovalScope::Schema => {
                let Some(declared) = &bundle.manifest().params else {
                    return Err(Refusal::new(
                        "approval",
                        "the data owner approved parameters that match the train's schema, and the train declares none (approve with --scope exact or --scope any)",
                    ));
                };
                let schema = declared
                    .schema_json()
                    .map_err(|e| Refusal::new("params", format!("the train's schema: {e}")))?;
                let value: serde_json::Value = serde_json::from_str(params)
                    .map_err(|e| Refusal::new("params", format!("parameters are not JSON: {e}")))?;
                amicus_bundle::params::validate(&schema, &value).map_err(|e| {
                    Refusal::new(
                        "params",
                        format!("the parameters do not match the train's declared schema: {e}"),
                    )
                })?;
                Ok("schema")
            }
        }
    }

    pub fn is_approved(&self, digest: &Digest) -> bool {
        self.approved.iter().any(|a| a.digest == *digest)
    }

    /// Every check a bundle must pass before it may run, in order. The first failure is the
    /// refusal, with its stage name.
    pub fn admit(&self, bundle: &Bundle) -> Result<Admission, Refusal> {
        let m = bundle.manifest();
        let sigs = bundle.check_signatures(&self.trusted_keys(), self.required_signatures);
        if let Some(reason) = sigs.refusal() {
            return Err(Refusal::new("signatures", reason));
        }
        if self.require_approval && !self.is_approved(&bundle.digest()) {
            return Err(Refusal::new(
                "approval",
                format!(
                    "digest {} is not approved by the data owner (amicus station approve --dir DIR {})",
                    bundle.digest(),
                    bundle.digest()
                ),
            ));
        }
        for c in &m.capabilities {
            if !self.allowed_capabilities.contains(c) {
                return Err(Refusal::new(
                    "capabilities",
                    format!("capability {c} is not allowed by this station's policy"),
                ));
            }
        }
        let limits = self.check_limits(&m.limits)?;
        let caps = self.kernels.model_caps();
        let models_bytes: u64 = m
            .models
            .iter()
            .filter_map(|model| bundle.file(&model.file))
            .map(|b| b.len() as u64)
            .sum();
        if models_bytes > u64::from(limits.memory_mib) << 20 {
            return Err(Refusal::new(
                "limits",
                format!(
                    "the bundle's models take {models_bytes} bytes, more than the {} MiB of memory the train asks for (models count against it)",
                    limits.memory_mib
                ),
            ));
        }
        for model in &m.models {
            let Some(bytes) = bundle.file(&model.file) else {
                continue;
            };
            if let Err(e) = amicus_autodiff::loadable::check(bytes, &caps) {
                return Err(Refusal::new("models", format!("{}: {e}", model.file)));
            }
        }
        for o in &m.outputs {
            if o.max_bytes > self.outputs.max_bytes {
                return Err(Refusal::new(
                    "outputs",
                    format!(
                        "output {:?} declares up to {} bytes; this station releases at most {} per output",
                        o.name, o.max_bytes, self.outputs.max_bytes
                    ),
                ));
            }
        }
        Ok(Admission {
            signers: sigs
                .signers
                .iter()
                .filter(|s| s.valid)
                .map(|s| s.keyid.clone())
                .collect(),
            limits,
        })
    }

    fn check_limits(&self, l: &Limits) -> Result<Limits, Refusal> {
        let c = &self.caps;
        let over = |what: &str, asked: u64, cap: u64| {
            Refusal::new(
                "limits",
                format!("train asks for {what} {asked}, this station allows at most {cap}"),
            )
        };
        if l.fuel > c.fuel {
            return Err(over("fuel", l.fuel, c.fuel));
        }
        if l.memory_mib > c.memory_mib {
            return Err(over("memory_mib", l.memory_mib.into(), c.memory_mib.into()));
        }
        if l.wall_seconds > c.wall_seconds {
            return Err(over(
                "wall_seconds",
                l.wall_seconds.into(),
                c.wall_seconds.into(),
            ));
        }
        Ok(*l)
    }
}

/// What passed admission: the signers that counted and the limits the run gets.
#[derive(Debug, Clone)]
pub struct Admission {
    pub signers: Vec<String>,
    pub limits: Limits,
}

/// Why a bundle may not run: the stage that refused it and a reason for humans.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub stage: String,
    pub reason: String,
}

impl Refusal {
    pub fn new(stage: &str, reason: impl Into<String>) -> Refusal {
        Refusal {
            stage: stage.to_string(),
            reason: reason.into(),
        }
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "refused ({}): {}", self.stage, self.reason)
    }
}

/// The keys of a list of named keys that parse (a damaged entry trusts no one).
fn keys_of(list: &[Signer]) -> Vec<TrustedKey> {
    list.iter()
        .filter_map(|s| {
            PublicKey::from_pem(&s.key, &s.name)
                .ok()
                .map(|key| TrustedKey {
                    name: s.name.clone(),
                    key,
                })
        })
        .collect()
}

/// Add `key` as `name` to a list of named keys: neither the key nor the name twice.
fn add_key(list: &mut Vec<Signer>, name: &str, key: &PublicKey) -> Result<(), PolicyError> {
    for t in keys_of(list) {
        if t.key == *key {
            return Err(PolicyError::AlreadyTrusted(key.id().to_string()));
        }
        if t.name == name {
            return Err(PolicyError::NameTaken(name.to_string()));
        }
    }
    list.push(Signer {
        name: name.to_string(),
        key: key.to_pem(),
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_policy_round_trips_and_denies() {
        let dir = tempfile::tempdir().unwrap();
        let p = Policy::default();
        p.save(dir.path()).unwrap();
        let back = Policy::load(dir.path()).unwrap();
        assert_eq!(back, p);
        assert!(back.trusted_signers.is_empty());
        assert!(back.require_approval);
        assert_eq!(back.allowed_capabilities, vec![Capability::Cohort]);
    }

    #[test]
    fn invalid_policies_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let text = toml::to_string(&Policy::default()).unwrap();
        for (from, to) in [
            ("required_signatures = 1", "required_signatures = 0"),
            (
                "require_approval = true",
                "require_approval = true\nbackdoor = 1",
            ),
            (
                "allowed_capabilities = [\"cohort\"]",
                "allowed_capabilities = [\"root\"]",
            ),
        ] {
            let bad = text.replace(from, to);
            assert_ne!(bad, text);
            std::fs::write(dir.path().join(POLICY_FILE), bad).unwrap();
            assert!(Policy::load(dir.path()).is_err(), "accepted {to}");
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(200))]

        /// A policy file edited by hand (or damaged) is refused, never a panic.
        #[test]
        fn hostile_policy_files_never_panic(at in proptest::prelude::any::<usize>(), with in ".{0,24}") {
            let dir = tempfile::tempdir().unwrap();
            let mut text = toml::to_string(&Policy::default()).unwrap();
            let mut i = at % text.len();
            while !text.is_char_boundary(i) {
                i -= 1;
            }
            text.insert_str(i, &with);
            std::fs::write(dir.path().join(POLICY_FILE), text).unwrap();
            let _ = Policy::load(dir.path());
        }
    }

    #[test]
    fn trust_refuses_duplicates() {
        let mut p = Policy::default();
        let k = amicus_bundle::SecretKey::generate().unwrap().public();
        p.trust("alice", &k).unwrap();
        assert!(matches!(
            p.trust("alice2", &k),
            Err(PolicyError::AlreadyTrusted(_))
        ));
        let k2 = amicus_bundle::SecretKey::generate().unwrap().public();
        assert!(matches!(
            p.trust("alice", &k2),
            Err(PolicyError::NameTaken(_))
        ));
        assert!(p.approve(amicus_bundle::sha256(b"x"), None));
        assert!(!p.approve(amicus_bundle::sha256(b"x"), None));
    }
}
