//! `amicus:train/kernels`: the bundle's declared models in ONNX Runtime (inference sessions and
//! trainers), every model checked to be self-contained before it is loaded.

use super::bindings::amicus::train::{kernels, types};
use super::{DeclaredModel, HostState, HostTensor, ModelHandle, TrainerHandle};
use crate::sandbox::guest_text;
use amicus_bundle::Capability;
use wasmtime::component::Resource;

impl kernels::Host for HostState {}

/// A host tensor as the kernels take it.
fn kernel_tensor(t: &HostTensor) -> amicus_kernels::Tensor {
    amicus_kernels::Tensor::new(
        t.shape.iter().map(|d| *d as usize).collect(),
        t.data.clone(),
    )
}

impl HostState {
    /// Record a kernels call for the audit log and turn a kernel error into the contract's.
    pub(super) fn kernels_call<T>(
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
                // An allocation the worker's memory limit refused inside ONNX Runtime: the
                // run ends at its memory limit, whatever the train does with the error.
                K::Run(m) | K::Model(m) if allocation_failed(&m) => {
                    self.memory_hit = Some(format!(
                        "ONNX Runtime could not allocate within the run's memory: {}",
                        m.chars().take(300).collect::<String>()
                    ));
                    types::Error::LimitExceeded(reason)
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
        // Consecutive identical calls (a training loop's steps) become one record with their
        // count (`CallLog`).
        self.record(Capability::Kernels, call, detail, None, answer)
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
        let caps = self
            .kernels
            .as_ref()
            .map_or(amicus_autodiff::loadable::Caps::CEILING, |k| k.caps);
        // Loaded from bytes only, after the check that it names no file (external data).
        self.begin(Capability::Kernels, "model.open", &guest_text(&file));
        let result =
            amicus_kernels::Session::from_bytes_capped(&model.bytes, threads, device, &caps);
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
        self.calls
            .begin(Capability::Kernels.name(), "model.infer", &detail);
        let handle = self
            .table
            .get_mut(&m)
            .map_err(|e| types::Error::Failed(e.to_string()))?;
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
        let caps = self
            .kernels
            .as_ref()
            .map_or(amicus_autodiff::loadable::Caps::CEILING, |k| k.caps);
        let threads = self.kernels.as_ref().map_or(1, |k| k.threads);
        let device = self
            .kernels
            .as_ref()
            .map_or_else(Default::default, |k| k.device);
        let detail = format!("{} {:?}", guest_text(&file), options.optimizer);
        self.begin(Capability::Kernels, "trainer.open", &detail);
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
            // The bundle's bytes pass the same check as a model opened for inference (the
            // derived graph is checked again when it is loaded).
            amicus_autodiff::loadable::check(&model.bytes, &caps)
                .map_err(|e| K::Model(e.to_string()))?;
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
        self.calls
            .begin(Capability::Kernels.name(), "trainer.step", &detail);
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
        self.calls
            .begin(Capability::Kernels.name(), "trainer.evaluate", &detail);
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
        self.calls
            .begin(Capability::Kernels.name(), "trainer.predict", &detail);
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

/// Whether ONNX Runtime's error says an allocation failed (its allocator's and the C++
/// library's wording).
fn allocation_failed(message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    m.contains("failed to allocate") || m.contains("bad_alloc") || m.contains("bad allocation")
}
