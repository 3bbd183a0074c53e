//! Training on the station: a forward model and a loss become a training graph
//! (`amicus-autodiff`), run by ONNX Runtime; weights and optimizer state stay here, updated by
//! `optim`. Also inference with the current weights.
//!
//! Owns the training loop's one step and the checks around it (shapes, NaN/Inf in inputs and
//! updates); it does not choose data or decide what may leave the station.

use crate::optim::{Optimizer, OptimizerState, Schedule};
use crate::{Device, KernelError, Session, Tensor};
use amicus_autodiff::onnx::{Dim, ModelProto};
use amicus_autodiff::{Loss, Spec, TrainingGraph};

/// How a trainer is set up.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainerOptions {
    pub loss: Loss,
    /// Initializers to train (`None`: every float initializer a gradient reaches).
    pub trainable: Option<Vec<String>>,
    pub optimizer: Optimizer,
    pub schedule: Schedule,
    pub clip_norm: Option<f32>,
    /// ONNX Runtime intra-op threads.
    pub threads: usize,
    /// Seeds the Dropout masks (the same seed, the same masks step after step).
    pub seed: u64,
    /// Where ONNX Runtime runs the training and inference graphs.
    pub device: Device,
}

/// A weight tensor by name.
#[derive(Debug, Clone, PartialEq)]
pub struct NamedWeights {
    pub name: String,
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

pub struct Trainer {
    graph: TrainingGraph,
    train: Session,
    infer: Session,
    input: String,
    input_shape: Vec<Dim>,
    /// The labels' declared shape (its batch axis is the input's).
    labels_shape: Vec<Dim>,
    weights: Vec<(String, Vec<f32>)>,
    shapes: Vec<Vec<usize>>,
    /// Running statistics (BatchNormalization), replaced after every step.
    running: Vec<(String, Tensor)>,
    state: OptimizerState,
    /// FedProx: `μ` and the anchor weights (same order as `weights`); each step adds
    /// `μ (w − anchor)` to the gradients.
    proximal: Option<(f32, Vec<Vec<f32>>)>,
    /// ONNX Runtime calls stop (`KernelError::Deadline`) once this passes.
    deadline: Option<std::time::Instant>,
    /// SHA-256 (hex) of the training graph ONNX Runtime runs.
    graph_digest: String,
}

fn input_error(reason: impl Into<String>) -> KernelError {
    KernelError::Input(reason.into())
}

impl Trainer {
    /// Derive the training graph of `forward` and load it (and an inference graph).
    pub fn new(forward: &ModelProto, options: TrainerOptions) -> Result<Trainer, KernelError> {
        let spec = Spec {
            trainable: options.trainable.clone(),
            prediction: None,
            loss: options.loss.clone(),
            seed: options.seed,
        };
        let graph = amicus_autodiff::derive(forward, &spec)
            .map_err(|e| KernelError::Model(e.to_string()))?;
        let [input] = graph.data_inputs.as_slice() else {
            return Err(KernelError::Model(format!(
                "a trained model takes exactly one data input; this one takes {:?}",
                graph.data_inputs
            )));
        };
        let input = input.clone();
        let input_shape = forward
            .graph
            .as_ref()
            .and_then(|g| g.input.iter().find(|v| v.name() == input))
            .and_then(|v| v.tensor_shape())
            .map(|(_, dims)| dims)
            .unwrap_or_default();
        let labels_shape = graph
            .model
            .graph
            .as_ref()
            .and_then(|g| g.input.iter().find(|v| v.name() == graph.labels))
            .and_then(|v| v.tensor_shape())
            .map(|(_, d)| d)
            .unwrap_or_default();
        let names: Vec<String> = graph
            .weights
            .iter()
            .map(|w| w.name.clone())
            .chain(graph.state.iter().map(|s| s.name.clone()))
            .collect();
        let inference = amicus_autodiff::with_weight_inputs(forward, &names)
            .map_err(|e| KernelError::Model(e.to_string()))?;
        let graph_bytes = graph.model.to_bytes();
        let graph_digest = {
            use sha2::Digest;
            sha2::Sha256::digest(&graph_bytes)
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
        };
        let train = Session::from_bytes_on(&graph_bytes, options.threads, options.device)?;
        let infer = Session::from_bytes_on(&inference.to_bytes(), options.threads, options.device)?;
        let weights: Vec<(String, Vec<f32>)> = graph
            .weights
            .iter()
            .map(|w| (w.name.clone(), w.initial.clone()))
            .collect();
        let shapes: Vec<Vec<usize>> = graph
            .weights
            .iter()
            .map(|w| w.shape.iter().map(|d| *d as usize).collect())
            .collect();
        let running = graph
            .state
            .iter()
            .map(|s| {
                (
                    s.name.clone(),
                    Tensor::new(
                        s.shape.iter().map(|d| *d as usize).collect(),
                        s.initial.clone(),
                    ),
                )
            })
            .collect();
        let sizes: Vec<usize> = weights.iter().map(|(_, w)| w.len()).collect();
        let state = OptimizerState::new(
            options.optimizer,
            options.schedule,
            options.clip_norm,
            &sizes,
        )
        .map_err(|e| input_error(e.to_string()))?;
        Ok(Trainer {
            graph,
            train,
            infer,
            input,
            input_shape,
            labels_shape,
            weights,
            shapes,
            running,
            state,
            proximal: None,
            deadline: None,
            graph_digest,
        })
    }

    /// Refuse a batch of the wrong shape or with NaN/Inf before ONNX Runtime sees it.
    fn check_input(&self, what: &str, t: &Tensor, shape: &[Dim]) -> Result<(), KernelError> {
        if t.shape.iter().product::<usize>() != t.data.len() {
            return Err(input_error(format!(
                "{what}: shape {:?} does not hold {} values",
                t.shape,
                t.data.len()
            )));
        }
        let fits = t.shape.len() == shape.len()
            && t.shape.iter().zip(shape).all(|(n, d)| match d {
                Dim::Known(k) => *n as i64 == *k,
                Dim::Named(_) => *n > 0,
            });
        if !fits {
            return Err(input_error(format!(
                "{what}: shape {:?} does not match the model's {shape:?}",
                t.shape
            )));
        }
        if let Some(i) = t.data.iter().position(|v| !v.is_finite()) {
            return Err(input_error(format!(
                "{what}: value {i} is {} (NaN or infinity)",
                t.data[i]
            )));
        }
        Ok(())
    }

    /// The labels' shape for a batch `x`: the declared one with the batch axis of `x`.
    fn labels_shape_for(&self, x: &Tensor) -> Vec<Dim> {
        self.labels_shape
            .iter()
            .enumerate()
            .map(|(i, d)| match (i, d) {
                (0, Dim::Named(_)) => Dim::Known(x.shape[0] as i64),
                (_, d) => d.clone(),
            })
            .collect()
    }

    fn run_training_graph(
        &mut self,
        x: &Tensor,
        y: &Tensor,
        with_grads: bool,
    ) -> Result<Vec<(String, Tensor)>, KernelError> {
        self.check_input("input", x, &self.input_shape)?;
        self.check_input("labels", y, &self.labels_shape_for(x))?;
        let weight_tensors = self.weight_tensors();
        let mut inputs: Vec<(&str, &Tensor)> =
            vec![(self.input.as_str(), x), (self.graph.labels.as_str(), y)];
        for ((name, _), t) in self.weights.iter().zip(&weight_tensors) {
            inputs.push((name.as_str(), t));
        }
        for (name, t) in &self.running {
            inputs.push((name.as_str(), t));
        }
        // Dropout drops in training steps only.
        let mode = Tensor::scalar(if with_grads { 1.0 } else { 0.0 });
        if let Some(name) = &self.graph.training_mode {
            inputs.push((name.as_str(), &mode));
        }
        let mut wanted = vec![self.graph.loss.as_str(), self.graph.prediction.as_str()];
        if with_grads {
            wanted.extend(self.graph.weights.iter().map(|w| w.grad.as_str()));
            wanted.extend(self.graph.state.iter().map(|s| s.updated.as_str()));
        }
        self.train.run_until(&inputs, &wanted, self.deadline)
    }

    /// The current weights as tensors, for a run's inputs.
    fn weight_tensors(&self) -> Vec<Tensor> {
        self.weights
            .iter()
            .zip(&self.shapes)
            .map(|((_, w), s)| Tensor::new(s.clone(), w.clone()))
            .collect()
    }

    /// One optimisation step on a batch; returns the loss before the update.
    pub fn step(&mut self, x: &Tensor, y: &Tensor) -> Result<f32, KernelError> {
        let out = self.run_training_graph(x, y, true)?;
        let loss = out[0].1.data[0];
        if !loss.is_finite() {
            return Err(KernelError::Run(format!(
                "the loss is {loss}; nothing was updated"
            )));
        }
        let mut rest = out.into_iter().skip(2);
        let grads: Vec<Vec<f32>> = rest
            .by_ref()
            .take(self.weights.len())
            .map(|(_, t)| t.data)
            .collect();
        let running: Vec<Tensor> = rest.map(|(_, t)| t).collect();
        if let Some(i) = running
            .iter()
            .position(|t| t.data.iter().any(|v| !v.is_finite()))
        {
            return Err(KernelError::Run(format!(
                "running statistic {} is not finite; nothing was updated",
                self.running[i].0
            )));
        }
        let mut grads = grads;
        if let Some((mu, anchor)) = &self.proximal {
            for ((g, (_, w)), a) in grads.iter_mut().zip(&self.weights).zip(anchor) {
                for ((g, w), a) in g.iter_mut().zip(w).zip(a) {
                    *g += mu * (w - a);
                }
            }
        }
        self.state
            .update(&mut self.weights, &grads)
            .map_err(|e| KernelError::Run(e.to_string()))?;
        for ((_, old), new) in self.running.iter_mut().zip(running) {
            *old = new;
        }
        Ok(loss)
    }

    /// The loss and the prediction on a batch, updating nothing (normalisation layers use the
    /// batch's statistics, as in training; Dropout drops nothing).
    pub fn evaluate(&mut self, x: &Tensor, y: &Tensor) -> Result<(f32, Tensor), KernelError> {
        let mut out = self.run_training_graph(x, y, false)?;
        let prediction = out.remove(1).1;
        Ok((out[0].1.data[0], prediction))
    }

    /// The model's output for a batch, with the current weights.
    pub fn infer(&mut self, x: &Tensor) -> Result<Tensor, KernelError> {
        self.check_input("input", x, &self.input_shape)?;
        let weight_tensors = self.weight_tensors();
        let mut inputs: Vec<(&str, &Tensor)> = vec![(self.input.as_str(), x)];
        for ((name, _), t) in self.weights.iter().zip(&weight_tensors) {
            inputs.push((name.as_str(), t));
        }
        for (name, t) in &self.running {
            inputs.push((name.as_str(), t));
        }
        let prediction = self.graph.prediction.clone();
        Ok(self
            .infer
            .run_until(&inputs, &[&prediction], self.deadline)?
            .remove(0)
            .1)
    }

    /// The trained weights, then the running statistics (BatchNormalization's mean and
    /// variance): everything that makes up the model, so that a copy of these (a federated
    /// average, a checkpoint) predicts as this trainer does.
    pub fn weights(&self) -> Vec<NamedWeights> {
        let mut all: Vec<NamedWeights> = self
            .weights
            .iter()
            .zip(&self.shapes)
            .map(|((name, data), shape)| NamedWeights {
                name: name.clone(),
                shape: shape.clone(),
                data: data.clone(),
            })
            .collect();
        all.extend(self.running_statistics());
        all
    }

    /// How many values are trained (running statistics are not).
    pub fn trained_parameters(&self) -> usize {
        self.weights.iter().map(|(_, w)| w.len()).sum()
    }

    /// Replace weights or running statistics by name (all or nothing): each must exist, have
    /// its shape, and be finite.
    pub fn set_weights(&mut self, new: &[NamedWeights]) -> Result<(), KernelError> {
        let mut staged = self.weights.clone();
        let mut running = self.running.clone();
        for w in new {
            let (shape, slot) = if let Some(i) = staged.iter().position(|(n, _)| *n == w.name) {
                (&self.shapes[i], &mut staged[i].1)
            } else if let Some(i) = running.iter().position(|(n, _)| *n == w.name) {
                let t = &mut running[i].1;
                (&t.shape, &mut t.data)
            } else {
                return Err(input_error(format!(
                    "no trained weight or running statistic named {:?}",
                    w.name
                )));
            };
            if w.shape != *shape || w.data.len() != slot.len() {
                return Err(input_error(format!(
                    "{}: shape {:?} with {} values, expected {:?}",
                    w.name,
                    w.shape,
                    w.data.len(),
                    shape
                )));
            }
            if w.data.iter().any(|v| !v.is_finite()) {
                return Err(input_error(format!("{}: NaN or infinity", w.name)));
            }
            *slot = w.data.clone();
        }
        self.weights = staged;
        self.running = running;
        Ok(())
    }

    /// Add FedProx's proximal term `μ/2 ‖w − anchor‖²` to the loss's gradients from now on,
    /// anchored at the current weights (`μ` 0 removes it).
    pub fn anchor_proximal(&mut self, mu: f32) -> Result<(), KernelError> {
        if !mu.is_finite() || mu < 0.0 {
            return Err(input_error(format!(
                "proximal μ must be finite and ≥ 0, not {mu}"
            )));
        }
        self.proximal =
            (mu > 0.0).then(|| (mu, self.weights.iter().map(|(_, w)| w.clone()).collect()));
        Ok(())
    }

    /// Where the training graph runs (`Cpu` or `Cuda`).
    pub fn device(&self) -> Device {
        self.train.device()
    }

    /// SHA-256 (hex) of the derived training graph: the derivation is deterministic, so this
    /// names exactly the gradient code that ran (`amicus model grad` writes the same bytes).
    pub fn graph_digest(&self) -> &str {
        &self.graph_digest
    }

    /// Stop every ONNX Runtime call that is still running when `deadline` passes (the run's
    /// time limit); `None`: no limit.
    pub fn set_deadline(&mut self, deadline: Option<std::time::Instant>) {
        self.deadline = deadline;
    }

    /// Use `schedule` from the next step on; the step count and the optimizer's moments stay.
    pub fn set_schedule(&mut self, schedule: Schedule) -> Result<(), KernelError> {
        schedule
            .validate()
            .map_err(|e| input_error(e.to_string()))?;
        self.state.schedule = schedule;
        Ok(())
    }

    pub fn steps(&self) -> u64 {
        self.state.steps()
    }

    /// The running statistics (BatchNormalization's mean and variance), by name.
    pub fn running_statistics(&self) -> Vec<NamedWeights> {
        self.running
            .iter()
            .map(|(name, t)| NamedWeights {
                name: name.clone(),
                shape: t.shape.clone(),
                data: t.data.clone(),
            })
            .collect()
    }
}
