//! The host side of the `amicus:train` contract: one [`HostState`] per run, and one file per
//! WIT interface implementing it (`output`, `cohort`, `tensors`, `imaging`, `kernels`,
//! `federated`), like wasmtime-wasi's `p2/host/`. Every capability call checks its grant again
//! and is recorded for the audit log (the station writes it); nothing here reads policy or
//! writes files.

mod cohort;
mod federated;
mod imaging;
mod kernels;
mod output;
mod tensors;

use crate::sandbox::gate::OutputGate;
use crate::sandbox::limits::MemoryBudget;
use crate::sandbox::{
    CallLog, CallRecord, CohortAccess, FederatedRound, ProgressSink, RawUpdate, RunLog,
};
use amicus_bundle::Capability;
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Instant;
use wasmtime::component::ResourceTable;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

pub(crate) mod bindings {
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

use bindings::amicus::train::types;

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
    /// The station's caps on a model's size and node count (policy `[kernels]`).
    pub caps: amicus_autodiff::loadable::Caps,
}

pub(crate) struct HostState {
    pub(crate) wasi: WasiCtx,
    pub(crate) table: ResourceTable,
    pub(crate) memory: MemoryBudget,
    pub(crate) outputs: OutputGate,
    pub(crate) log: RunLog,
    pub(crate) granted: BTreeSet<Capability>,
    pub(crate) calls: CallLog,
    pub(crate) progress: ProgressSink,
    pub(crate) cohort: Option<CohortAccess>,
    pub(crate) imaging: Option<Arc<amicus_index::scan::ArchiveState>>,
    pub(crate) kernels: Option<KernelAccess>,
    pub(crate) federated: Option<FederatedRound>,
    /// The trainer (its table index) that `load-global` set up.
    pub(crate) federated_trainer: Option<u32>,
    pub(crate) submitted: Option<RawUpdate>,
    /// The run's time limit as an instant: ONNX Runtime calls stop there.
    pub(crate) deadline: Instant,
    /// An ONNX Runtime call was stopped by the time limit.
    pub(crate) deadline_hit: bool,
    /// An allocation inside host code (ONNX Runtime) failed at the worker's memory limit.
    pub(crate) memory_hit: Option<String>,
}

impl HostState {
    pub(crate) fn require(&mut self, cap: Capability, call: &str) -> Result<(), types::Error> {
        if self.granted.contains(&cap) {
            return Ok(());
        }
        self.calls.push(CallRecord {
            capability: cap.name().into(),
            call: call.into(),
            detail: String::new(),
            rows: None,
            outcome: "denied".into(),
            count: 1,
        });
        Err(types::Error::Denied(format!(
            "capability {cap} is not granted"
        )))
    }

    pub(crate) fn not_available(
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
            count: 1,
        });
        types::Error::NotAvailable(format!(
            "capability {cap} is not available on this station: {what}"
        ))
    }

    /// A capability call that may take time starts (see [`crate::sandbox::CallEvent`]).
    pub(crate) fn begin(&mut self, cap: Capability, call: &str, detail: &str) {
        self.calls.begin(cap.name(), call, detail);
    }

    /// Record a capability call for the audit log: `ok`, or the error's kind and message.
    pub(crate) fn record<T>(
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
            count: 1,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sandbox::wasi::{CappedPipe, locked_down_wasi};
    use amicus_bundle::Manifest;
    use bindings::amicus::train::{cohort, kernels, tensors};
    use std::time::Duration;

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
            calls: CallLog::new(None),
            progress: Box::new(|_, _| {}),
            cohort: None,
            imaging: None,
            kernels: None,
            federated: None,
            federated_trainer: None,
            submitted: None,
            deadline: Instant::now() + Duration::from_secs(1),
            deadline_hit: false,
            memory_hit: None,
        };
        let e = cohort::Host::select(&mut s, "SELECT * {}".into()).unwrap_err();
        assert!(matches!(e, types::Error::Denied(_)));
        let e = tensors::HostTensor::create(&mut s, vec![1], vec![0.0]).unwrap_err();
        assert!(matches!(e, types::Error::Denied(_)));
        s.calls.flush();
        assert_eq!(s.calls.done.len(), 1);
        assert_eq!(s.calls.done[0].outcome, "denied");

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
}
