//! Reverse-mode autodiff for ONNX: a forward model and a loss become one training graph made
//! only of standard ONNX ops — inputs: the model's data inputs, `labels`, and every trainable
//! weight; outputs: `loss`, the prediction, and `<weight>.grad` for each weight — which the
//! stock ONNX Runtime inference build runs.
//!
//! The station derives this graph itself from the signed forward model, deterministically (the
//! same model and spec give the same bytes), so the gradient code is the station's, not the
//! train's. An op on the gradient path without a rule is refused by name.
//!
//! Owns the derivation (`derive`), the ONNX file format (`onnx`) and the check of what a model
//! must be before ONNX Runtime may load it (`loadable`); does not run graphs
//! (`amicus-kernels` does) and does not update weights.

mod emit;
pub mod loadable;
mod norm;
pub mod onnx;
mod resize;
mod rules;
mod shapes;
pub mod zoo;

use emit::Emitter;
use onnx::{Dim, FLOAT, GraphProto, ModelProto, NodeProto, TensorProto, ValueInfoProto};
use std::collections::{BTreeSet, HashMap, HashSet};

pub use rules::DIFFERENTIABLE;

/// Losses, comparing the prediction with `labels` of the same shape.
#[derive(Debug, Clone, PartialEq)]
pub enum Loss {
    /// Mean squared error over every element.
    Mse,
    /// Softmax cross-entropy over axis 1 against one-hot (or soft) labels, averaged over the
    /// other positions (samples, and pixels for segmentation).
    CrossEntropy,
    /// Sigmoid + binary cross-entropy on logits, averaged over every element.
    BceWithLogits,
    /// 1 - soft Dice of the sigmoid of the logits against the labels, over the whole batch
    /// (smoothed by 1).
    SoftDice,
    /// A weighted sum of losses.
    Sum(Vec<(f32, Loss)>),
}

impl Loss {
    /// Parse a loss as manifests and the CLI write it: `mse`, `ce`, `bce`, `dice`, or weighted
    /// terms joined by `+`, such as `0.7*ce+0.3*dice`.
    pub fn parse(text: &str) -> Result<Loss, String> {
        let one = |name: &str| -> Result<Loss, String> {
            Ok(match name.trim() {
                "mse" => Loss::Mse,
                "ce" | "cross-entropy" => Loss::CrossEntropy,
                "bce" | "bce-with-logits" => Loss::BceWithLogits,
                "dice" | "soft-dice" => Loss::SoftDice,
                other => return Err(format!("unknown loss {other:?} (mse, ce, bce, dice)")),
            })
        };
        if !text.contains('+') && !text.contains('*') {
            return one(text);
        }
        let parts = text
            .split('+')
            .map(|term| {
                let (w, name) = term.split_once('*').unwrap_or(("1", term));
                let w: f32 = w
                    .trim()
                    .parse()
                    .map_err(|_| format!("weight {w:?} in {text:?} is not a number"))?;
                if !w.is_finite() {
                    return Err(format!("weight {w} in {text:?} is not finite"));
                }
                Ok((w, one(name)?))
            })
            .collect::<Result<Vec<_>, String>>()?;
        Ok(Loss::Sum(parts))
    }
}

/// What to train and how.
#[derive(Debug, Clone, PartialEq)]
pub struct Spec {
    /// Initializers to train; `None`: every float initializer a gradient can reach.
    pub trainable: Option<Vec<String>>,
    /// The graph output the loss applies to; `None`: the first output.
    pub prediction: Option<String>,
    pub loss: Loss,
    /// Seeds the Dropout masks of the training graph (each Dropout node gets its own seed
    /// from this and its position); the same seed gives the same sequence of masks.
    pub seed: u64,
}

/// A trainable weight: its name (an input of the training graph) and initial value.
#[derive(Debug, Clone, PartialEq)]
pub struct Weight {
    pub name: String,
    pub shape: Vec<i64>,
    pub initial: Vec<f32>,
    /// Output of the training graph holding its gradient.
    pub grad: String,
}

/// State the training graph updates besides the weights (BatchNormalization's running mean
/// and variance): an input with its current value, and the output with the next one.
#[derive(Debug, Clone, PartialEq)]
pub struct State {
    pub name: String,
    pub shape: Vec<i64>,
    pub initial: Vec<f32>,
    pub updated: String,
}

/// A derived training graph and how to drive it.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainingGraph {
    pub model: ModelProto,
    /// The forward model's data inputs, in order.
    pub data_inputs: Vec<String>,
    pub labels: String,
    pub loss: String,
    pub prediction: String,
    pub weights: Vec<Weight>,
    /// Running statistics: fed in, and replaced by their outputs after each training step.
    pub state: Vec<State>,
    /// `Some(TRAINING_MODE)` when the graph has Dropout and so takes that input.
    pub training_mode: Option<String>,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum AutodiffError {
    #[error("invalid model: {0}")]
    Invalid(String),
    #[error("not supported: {0}")]
    Unsupported(String),
    #[error("op {op} (node {node:?}) has no gradient rule; supported: {}", DIFFERENTIABLE.join(", "))]
    NoRule { op: String, node: String },
    #[error("node {node:?} ({op}): {reason}")]
    Node {
        op: String,
        node: String,
        reason: String,
    },
}

/// The name of the labels input of every training graph.
pub const LABELS: &str = "labels";
/// The name of the loss output of every training graph.
pub const LOSS: &str = "loss";
/// The float scalar input of a training graph with Dropout: > 0.5 drops (a training step),
/// otherwise Dropout passes everything (evaluation).
pub const TRAINING_MODE: &str = "training_mode";

fn invalid(s: impl Into<String>) -> AutodiffError {
    AutodiffError::Invalid(s.into())
}

/// The default opset domain's version the model imports.
fn opset(model: &ModelProto) -> Result<i64, AutodiffError> {
    let mut version = None;
    for o in &model.opset_import {
        match o.domain.as_deref().unwrap_or("") {
            "" | "ai.onnx" => version = o.version,
            other => {
                return Err(AutodiffError::Unsupported(format!(
                    "operator set domain {other:?}"
                )));
            }
        }
    }
    let v = version.ok_or_else(|| invalid("no opset import for the default domain"))?;
    if !(13..=21).contains(&v) {
        return Err(AutodiffError::Unsupported(format!(
            "opset {v} (13 to 21 are supported; exporters write 17 or 18)"
        )));
    }
    Ok(v)
}

/// Derive the training graph of `model` for `spec`.
pub fn derive(model: &ModelProto, spec: &Spec) -> Result<TrainingGraph, AutodiffError> {
    if !model.functions.is_empty() || !model.training_info.is_empty() {
        return Err(AutodiffError::Unsupported(
            "models with local functions or training info".into(),
        ));
    }
    let graph = untie_running_stats(model.graph.as_ref().ok_or_else(|| invalid("no graph"))?)?;
    let graph = &graph;
    if !graph.sparse_initializer.is_empty() {
        return Err(AutodiffError::Unsupported("sparse initializers".into()));
    }
    let opset = opset(model)?;
    let node_name = |n: &NodeProto, i: usize| n.name.clone().unwrap_or_else(|| format!("#{i}"));
    for (i, n) in graph.node.iter().enumerate() {
        if !matches!(n.domain.as_deref().unwrap_or(""), "" | "ai.onnx") {
            return Err(AutodiffError::Unsupported(format!(
                "node {:?}: op {} of domain {:?}",
                node_name(n, i),
                n.op(),
                n.domain.as_deref().unwrap_or("")
            )));
        }
    }

    // Every name in use, so emitted names never collide.
    let mut taken: HashSet<String> = HashSet::new();
    for n in &graph.node {
        taken.extend(n.input.iter().chain(&n.output).cloned());
        taken.extend(n.name.clone());
    }
    taken.extend(graph.initializer.iter().map(|t| t.name().to_string()));
    taken.extend(graph.input.iter().map(|v| v.name().to_string()));
    taken.extend(graph.output.iter().map(|v| v.name().to_string()));
    for reserved in [LABELS, LOSS] {
        if taken.contains(reserved) {
            return Err(invalid(format!(
                "the model already uses the name {reserved:?}, which the training graph needs"
            )));
        }
    }
    let mut e = Emitter::new(taken, opset);

    // Shapes and constant integers.
    let initializers: HashMap<&str, &TensorProto> =
        graph.initializer.iter().map(|t| (t.name(), t)).collect();
    let mut shapes: HashMap<String, shapes::Shape> = HashMap::new();
    let mut consts = shapes::Consts::default();
    for t in &graph.initializer {
        if !t.external_data.is_empty() {
            return Err(AutodiffError::Unsupported(format!(
                "initializer {:?} stored outside the model file",
                t.name()
            )));
        }
        shapes.insert(
            t.name().to_string(),
            t.dims.iter().map(|d| Dim::Known(*d)).collect(),
        );
        consts.remember(t);
    }
    let mut data_inputs = Vec::new();
    for v in &graph.input {
        if initializers.contains_key(v.name()) {
            continue;
        }
        let (elem, dims) = v
            .tensor_shape()
            .ok_or_else(|| invalid(format!("input {:?} has no tensor shape", v.name())))?;
        if elem != FLOAT {
            return Err(AutodiffError::Unsupported(format!(
                "input {:?} is not float32",
                v.name()
            )));
        }
        shapes.insert(v.name().to_string(), dims);
        data_inputs.push(v.name().to_string());
    }
    let mut forward: Vec<NodeProto> = graph.node.clone();

    // What is trained.
    let float_initializer = |name: &str| {
        initializers
            .get(name)
            .is_some_and(|t| t.data_type == Some(FLOAT))
    };
    let trainable: BTreeSet<String> = match &spec.trainable {
        Some(names) => {
            for n in names {
                if !float_initializer(n) {
                    return Err(invalid(format!(
                        "{n:?} is not a float initializer of the model"
                    )));
                }
            }
            names.iter().cloned().collect()
        }
        None => forward
            .iter()
            .flat_map(|n| {
                rules::differentiable_inputs(n)
                    .into_iter()
                    .filter_map(|i| n.input.get(i).cloned())
                    .collect::<Vec<_>>()
            })
            .filter(|name| float_initializer(name))
            .collect(),
    };
    if trainable.is_empty() {
        return Err(invalid(
            "nothing to train: no float initializer reaches an op",
        ));
    }

    // A trained weight is not a constant, whatever its initial value.
    for name in &trainable {
        consts.ints.remove(name);
        consts.floats.remove(name);
    }

    // Which tensors depend on a trained weight.
    let mut requires = depending_on(&forward, &trainable);

    // Every op a gradient has to pass needs a rule: refuse now, by name.
    for (i, n) in forward.iter().enumerate() {
        let on_path = rules::differentiable_inputs(n)
            .into_iter()
            .any(|j| n.input.get(j).is_some_and(|name| requires.contains(name)));
        if on_path && !DIFFERENTIABLE.contains(&n.op()) {
            return Err(AutodiffError::NoRule {
                op: n.op().into(),
                node: node_name(n, i),
            });
        }
    }

    // Shapes, now that every op on the gradient path is known to have a rule.
    infer_shapes(&forward, &mut shapes, &mut consts)?;

    // Normalisation layers on the gradient path run in training mode: rewrite them into ops
    // with rules (batch statistics normalise; running statistics come out updated).
    let mut running: Vec<norm::RunningStat> = Vec::new();
    if forward
        .iter()
        .any(|n| matches!(n.op(), "BatchNormalization" | "InstanceNormalization"))
    {
        let mut rewritten = Vec::with_capacity(forward.len());
        for (i, n) in forward.iter().enumerate() {
            let on_path = rules::differentiable_inputs(n)
                .into_iter()
                .any(|j| n.input.get(j).is_some_and(|name| requires.contains(name)));
            if on_path && matches!(n.op(), "BatchNormalization" | "InstanceNormalization") {
                let rank = shapes.get(&n.input[0]).map_or(0, Vec::len);
                let start = e.nodes.len();
                let stats =
                    norm::decompose(&mut e, n, rank).map_err(|reason| AutodiffError::Node {
                        op: n.op().into(),
                        node: node_name(n, i),
                        reason,
                    })?;
                rewritten.extend(e.nodes.drain(start..));
                running.extend(stats);
            } else {
                rewritten.push(n.clone());
            }
        }
        forward = rewritten;
        register_constants(&e, &mut shapes, &mut consts);
        requires = depending_on(&forward, &trainable);
        infer_shapes(&forward, &mut shapes, &mut consts)?;
    }

    // MaxPool on the gradient path also returns the indices of its maxima. Every Dropout
    // returns its mask and is seeded; whether it drops is the graph's float input
    // `training_mode` (> 0.5: training), so one graph serves steps and evaluation.
    let mut dropout_mode: Option<(String, String)> = None;
    let mut dropout_mode_nodes: Vec<NodeProto> = Vec::new();
    for (i, n) in forward.iter_mut().enumerate() {
        let on_path = n.input.first().is_some_and(|x| requires.contains(x));
        if n.op() == "MaxPool" && on_path && n.output.len() < 2 {
            let indices = e.fresh("maxpool_indices");
            n.output.push(indices);
        }
        if n.op() == "Dropout" {
            let ratio = rules::dropout_ratio(n, &consts).map_err(|reason| AutodiffError::Node {
                op: n.op().into(),
                node: node_name(n, i),
                reason,
            })?;
            let ratio = e.scalar(ratio);
            let training = match &dropout_mode {
                Some((_, flag)) => flag.clone(),
                None => {
                    if !e.reserve(TRAINING_MODE) {
                        return Err(invalid(format!(
                            "the model already uses the name {TRAINING_MODE:?}, which the training graph needs"
                        )));
                    }
                    let half = e.scalar(0.5);
                    let flag = e.fresh("training_mode");
                    dropout_mode_nodes.push(NodeProto {
                        input: vec![TRAINING_MODE.into(), half],
                        output: vec![flag.clone()],
                        name: Some(e.fresh("Greater")),
                        op_type: Some("Greater".into()),
                        ..Default::default()
                    });
                    dropout_mode = Some((TRAINING_MODE.to_string(), flag.clone()));
                    flag
                }
            };
            let data = n
                .input
                .first()
                .cloned()
                .ok_or_else(|| AutodiffError::Node {
                    op: "Dropout".into(),
                    node: node_name(n, i),
                    reason: "no data input".into(),
                })?;
            n.input = vec![data, ratio, training];
            if n.output.len() < 2 || n.output[1].is_empty() {
                let mask = e.fresh("dropout_mask");
                n.output.truncate(1);
                n.output.push(mask);
            }
            n.attribute.retain(|a| a.name.as_deref() != Some("seed"));
            n.attribute.push(onnx::AttributeProto::int(
                "seed",
                dropout_seed(spec.seed, i),
            ));
        }
    }
    if !dropout_mode_nodes.is_empty() {
        shapes.insert(TRAINING_MODE.into(), vec![]);
        dropout_mode_nodes.extend(forward);
        forward = dropout_mode_nodes;
    }
    register_constants(&e, &mut shapes, &mut consts);

    // The loss, appended as ordinary nodes: its gradient comes from the same rules.
    let prediction = match &spec.prediction {
        Some(p) => p.clone(),
        None => graph
            .output
            .first()
            .map(|o| o.name().to_string())
            .ok_or_else(|| invalid("the graph has no output"))?,
    };
    let prediction_shape = shapes
        .get(&prediction)
        .cloned()
        .ok_or_else(|| invalid(format!("{prediction:?} is not a tensor of the graph")))?;
    if !requires.contains(&prediction) {
        return Err(invalid(format!(
            "{prediction:?} does not depend on any trained weight"
        )));
    }
    shapes.insert(LABELS.into(), prediction_shape.clone());
    let loss_start = e.nodes.len();
    let loss_value = emit_loss(&mut e, &spec.loss, &prediction, prediction_shape.len())?;
    e.node_into("Identity", &[&loss_value], LOSS, vec![]);
    let loss_nodes: Vec<NodeProto> = e.nodes.drain(loss_start..).collect();
    // The loss's constants (axes, scalars) are initializers; their shapes and values count.
    register_constants(&e, &mut shapes, &mut consts);
    for n in &loss_nodes {
        let inputs: Vec<Option<shapes::Shape>> = n
            .input
            .iter()
            .map(|name| shapes.get(name).cloned())
            .collect();
        let out = shapes::infer(n, &inputs, &consts).map_err(|reason| AutodiffError::Node {
            op: n.op().into(),
            node: "loss".into(),
            reason,
        })?;
        for (name, s) in n.output.iter().zip(out.unwrap_or_default()) {
            shapes.insert(name.clone(), s);
        }
        if rules::differentiable_inputs(n)
            .into_iter()
            .any(|i| n.input.get(i).is_some_and(|x| requires.contains(x)))
        {
            requires.extend(n.output.iter().cloned());
        }
    }

    // Backward, from d loss / d loss = 1.
    let mut grads: HashMap<String, Vec<String>> = HashMap::new();
    let seed = e.scalar(1.0);
    grads.insert(LOSS.into(), vec![seed]);
    let all: Vec<NodeProto> = forward.iter().chain(&loss_nodes).cloned().collect();
    for (i, n) in all.iter().enumerate().rev() {
        let gy: Vec<Option<String>> = n
            .output
            .iter()
            .map(|o| take_grad(&mut e, &mut grads, o))
            .collect();
        if gy.iter().all(Option::is_none) {
            continue;
        }
        let differentiable = rules::differentiable_inputs(n);
        let needs: Vec<bool> = (0..n.input.len())
            .map(|j| differentiable.contains(&j) && requires.contains(&n.input[j]))
            .collect();
        if !needs.iter().any(|b| *b) {
            continue;
        }
        if !DIFFERENTIABLE.contains(&n.op()) {
            return Err(AutodiffError::NoRule {
                op: n.op().into(),
                node: node_name(n, i),
            });
        }
        let mut ctx = rules::Ctx {
            e: &mut e,
            shapes: &shapes,
            consts: &consts,
        };
        let gx =
            rules::backward(&mut ctx, n, &gy, &needs).map_err(|reason| AutodiffError::Node {
                op: n.op().into(),
                node: node_name(n, i),
                reason,
            })?;
        for (j, g) in gx.into_iter().enumerate() {
            if let Some(g) = g
                && needs[j]
            {
                grads.entry(n.input[j].clone()).or_default().push(g);
                // The gradient may be asked for again (several consumers): keep it summed.
            }
        }
    }

    // Assemble the training graph.
    let mut weights = Vec::new();
    for name in &trainable {
        let t = initializers[name.as_str()];
        let initial = t
            .float_values()
            .ok_or_else(|| invalid(format!("initializer {name:?} has unreadable data")))?;
        let grad_name = format!("{name}.grad");
        if !e.reserve(&grad_name) {
            return Err(invalid(format!(
                "the model already uses the name {grad_name:?}"
            )));
        }
        match take_grad(&mut e, &mut grads, name) {
            Some(g) => e.node_into("Identity", &[&g], &grad_name, vec![]),
            None => {
                // The weight does not reach the loss: its gradient is zero.
                let zeros = e.floats(&t.dims, &vec![0.0; initial.len()]);
                e.node_into("Identity", &[&zeros], &grad_name, vec![]);
            }
        }
        weights.push(Weight {
            name: name.clone(),
            shape: t.dims.clone(),
            initial,
            grad: grad_name,
        });
    }
    let mut state = Vec::new();
    for r in &running {
        let t = initializers
            .get(r.input.as_str())
            .filter(|t| t.data_type == Some(FLOAT))
            .ok_or_else(|| {
                invalid(format!(
                    "running statistic {:?} is not a float initializer",
                    r.input
                ))
            })?;
        let initial = t
            .float_values()
            .ok_or_else(|| invalid(format!("initializer {:?} has unreadable data", r.input)))?;
        let out = format!("{}.updated", r.input);
        if !e.reserve(&out) {
            return Err(invalid(format!("the model already uses the name {out:?}")));
        }
        e.node_into("Identity", &[&r.updated], &out, vec![]);
        state.push(State {
            name: r.input.clone(),
            shape: t.dims.clone(),
            initial,
            updated: out,
        });
    }
    let backward_nodes = std::mem::take(&mut e.nodes);
    let mut nodes = forward;
    nodes.extend(loss_nodes);
    nodes.extend(backward_nodes);

    let value = |name: &str| {
        ValueInfoProto::tensor(
            name,
            FLOAT,
            shapes.get(name).map_or(&[][..], |s| s.as_slice()),
        )
    };
    let mut inputs: Vec<ValueInfoProto> = data_inputs.iter().map(|n| value(n)).collect();
    inputs.push(value(LABELS));
    if dropout_mode.is_some() {
        inputs.push(ValueInfoProto::tensor(TRAINING_MODE, FLOAT, &[]));
    }
    for w in &weights {
        inputs.push(ValueInfoProto::tensor(
            &w.name,
            FLOAT,
            &w.shape.iter().map(|d| Dim::Known(*d)).collect::<Vec<_>>(),
        ));
    }
    for st in &state {
        inputs.push(ValueInfoProto::tensor(
            &st.name,
            FLOAT,
            &st.shape.iter().map(|d| Dim::Known(*d)).collect::<Vec<_>>(),
        ));
    }
    let mut outputs = vec![ValueInfoProto::tensor(LOSS, FLOAT, &[])];
    outputs.push(value(&prediction));
    for w in &weights {
        outputs.push(ValueInfoProto::tensor(
            &w.grad,
            FLOAT,
            &w.shape.iter().map(|d| Dim::Known(*d)).collect::<Vec<_>>(),
        ));
    }
    for st in &state {
        outputs.push(ValueInfoProto::tensor(
            &st.updated,
            FLOAT,
            &st.shape.iter().map(|d| Dim::Known(*d)).collect::<Vec<_>>(),
        ));
    }
    let mut initializer: Vec<TensorProto> = graph
        .initializer
        .iter()
        .filter(|t| !trainable.contains(t.name()) && !state.iter().any(|st| st.name == t.name()))
        .cloned()
        .collect();
    initializer.extend(e.constants.iter().cloned());
    let training = ModelProto {
        ir_version: Some(model.ir_version.unwrap_or(8).min(10)),
        opset_import: model.opset_import.clone(),
        producer_name: Some("amicus-autodiff".into()),
        producer_version: Some(env!("CARGO_PKG_VERSION").into()),
        graph: Some(GraphProto {
            node: nodes,
            name: Some(format!(
                "{}-training",
                graph.name.as_deref().unwrap_or("model")
            )),
            initializer,
            input: inputs,
            output: outputs,
            ..Default::default()
        }),
        ..Default::default()
    };
    Ok(TrainingGraph {
        model: training,
        data_inputs,
        labels: LABELS.into(),
        loss: LOSS.into(),
        prediction,
        weights,
        state,
        training_mode: dropout_mode.map(|(input, _)| input),
    })
}

/// The seed of the Dropout node at `position`: ONNX Runtime seeds each node's generator once
/// per session, so distinct nodes need distinct seeds (SplitMix64 of both, kept positive).
fn dropout_seed(seed: u64, position: usize) -> i64 {
    let mut z = seed ^ (position as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    ((z ^ (z >> 31)) >> 33) as i64
}

/// The tensors that depend on `trainable` through differentiable inputs, in node order.
fn depending_on(nodes: &[NodeProto], trainable: &BTreeSet<String>) -> HashSet<String> {
    let mut requires: HashSet<String> = trainable.iter().cloned().collect();
    for n in nodes {
        let reached = rules::differentiable_inputs(n)
            .into_iter()
            .any(|i| n.input.get(i).is_some_and(|name| requires.contains(name)));
        if reached {
            requires.extend(n.output.iter().filter(|o| !o.is_empty()).cloned());
        }
    }
    requires
}

/// Shapes of every node output, in node order, and the values of constant int64 tensors.
fn infer_shapes(
    nodes: &[NodeProto],
    shapes: &mut HashMap<String, shapes::Shape>,
    consts: &mut shapes::Consts,
) -> Result<(), AutodiffError> {
    for (i, n) in nodes.iter().enumerate() {
        if n.op() == "Constant"
            && let Some(t) = n.attr("value").and_then(|a| a.t.as_ref())
        {
            consts.remember_as(&n.output[0], t);
        }
        let inputs: Vec<Option<shapes::Shape>> = n
            .input
            .iter()
            .map(|name| {
                if name.is_empty() {
                    None
                } else {
                    shapes.get(name).cloned()
                }
            })
            .collect();
        let out = shapes::infer(n, &inputs, consts).map_err(|reason| AutodiffError::Node {
            op: n.op().into(),
            node: n.name.clone().unwrap_or_else(|| format!("#{i}")),
            reason,
        })?;
        for (name, s) in n.output.iter().zip(out.unwrap_or_default()) {
            if !name.is_empty() {
                shapes.insert(name.clone(), s);
            }
        }
        consts.fold(n, &inputs);
    }

    Ok(())
}

/// Exporters deduplicate equal initializers: a fresh BatchNormalization's running variance
/// (ones) and mean (zeros) can come out of `torch.onnx.export` as Identity nodes of its scale
/// and bias. Running statistics are state of their own, so such an Identity becomes a copy of
/// the initializer under the statistic's name. An Identity output used elsewhere as well is
/// refused: copying it would untie a weight the model shares.
fn untie_running_stats(graph: &GraphProto) -> Result<GraphProto, AutodiffError> {
    let mut graph = graph.clone();
    let stats: HashSet<String> = graph
        .node
        .iter()
        .filter(|n| n.op() == "BatchNormalization")
        .flat_map(|n| n.input.iter().skip(3).take(2).cloned())
        .collect();
    let mut copies = Vec::new();
    let mut kept = Vec::with_capacity(graph.node.len());
    for n in std::mem::take(&mut graph.node) {
        let source = (n.op() == "Identity" && n.output.len() == 1 && stats.contains(&n.output[0]))
            .then(|| {
                graph
                    .initializer
                    .iter()
                    .find(|t| Some(t.name()) == n.input.first().map(String::as_str))
            })
            .flatten();
        match source {
            Some(t) => {
                let mut copy = t.clone();
                copy.name = Some(n.output[0].clone());
                copies.push(copy);
            }
            None => kept.push(n),
        }
    }
    for c in &copies {
        let elsewhere = kept.iter().any(|n| {
            n.input.iter().enumerate().any(|(i, x)| {
                x == c.name() && !(n.op() == "BatchNormalization" && (i == 3 || i == 4))
            })
        }) || graph.output.iter().any(|o| o.name() == c.name());
        if elsewhere {
            return Err(AutodiffError::Unsupported(format!(
                "{:?} is a BatchNormalization running statistic and also used elsewhere",
                c.name()
            )));
        }
    }
    graph.node = kept;
    graph.initializer.extend(copies);
    Ok(graph)
}

/// Shapes and int values of the constants the emitter has made so far.
fn register_constants(
    e: &Emitter,
    shapes: &mut HashMap<String, shapes::Shape>,
    consts: &mut shapes::Consts,
) {
    for t in &e.constants {
        consts.remember(t);
        shapes.insert(
            t.name().to_string(),
            t.dims.iter().map(|d| Dim::Known(*d)).collect(),
        );
    }
}

/// The forward model with the initializers `names` turned into graph inputs, so inference can
/// run with weights kept (and updated) outside the model.
pub fn with_weight_inputs(
    model: &ModelProto,
    names: &[String],
) -> Result<ModelProto, AutodiffError> {
    let mut m = model.clone();
    let graph = m.graph.as_mut().ok_or_else(|| invalid("no graph"))?;
    let mut moved = Vec::new();
    graph.initializer.retain(|t| {
        if names.iter().any(|n| n == t.name()) {
            moved.push(ValueInfoProto::tensor(
                t.name(),
                t.data_type.unwrap_or(FLOAT),
                &t.dims.iter().map(|d| Dim::Known(*d)).collect::<Vec<_>>(),
            ));
            false
        } else {
            true
        }
    });
    if moved.len() != names.len() {
        return Err(invalid(
            "a weight to move is not an initializer of the model",
        ));
    }
    graph.input.retain(|v| !names.iter().any(|n| n == v.name()));
    graph.input.extend(moved);
    Ok(m)
}

/// The accumulated gradient of `name` as one tensor (summing several contributions).
fn take_grad(
    e: &mut Emitter,
    grads: &mut HashMap<String, Vec<String>>,
    name: &str,
) -> Option<String> {
    let gs = grads.get_mut(name)?;
    if gs.len() > 1 {
        let refs: Vec<&str> = gs.iter().map(String::as_str).collect();
        let sum = e.node("Sum", &refs, vec![]);
        *gs = vec![sum];
    }
    gs.first().cloned()
}

/// Append the nodes of `loss` on `prediction` (rank `rank`) and `labels`; returns the scalar.
fn emit_loss(
    e: &mut Emitter,
    loss: &Loss,
    prediction: &str,
    rank: usize,
) -> Result<String, AutodiffError> {
    let all: Vec<i64> = (0..rank as i64).collect();
    Ok(match loss {
        Loss::Mse => {
            let d = e.node("Sub", &[prediction, LABELS], vec![]);
            let sq = e.mul(&d, &d);
            e.reduce_mean(&sq, &all, false)
        }
        Loss::CrossEntropy => {
            if rank < 2 {
                return Err(invalid("cross-entropy needs a class axis 1"));
            }
            let log_p = e.node(
                "LogSoftmax",
                &[prediction],
                vec![onnx::AttributeProto::int("axis", 1)],
            );
            let picked = e.mul(LABELS, &log_p);
            let per_position = e.reduce_sum(&picked, &[1], false);
            let others: Vec<i64> = (0..rank as i64 - 1).collect();
            let mean = e.reduce_mean(&per_position, &others, false);
            e.node("Neg", &[&mean], vec![])
        }
        Loss::BceWithLogits => {
            // softplus(x) - x·t = -[t·log σ(x) + (1-t)·log(1-σ(x))], stable for large |x|.
            let sp = e.node("Softplus", &[prediction], vec![]);
            let xt = e.mul(prediction, LABELS);
            let d = e.node("Sub", &[&sp, &xt], vec![]);
            e.reduce_mean(&d, &all, false)
        }
        Loss::SoftDice => {
            let p = e.node("Sigmoid", &[prediction], vec![]);
            let pt = e.mul(&p, LABELS);
            let inter = e.reduce_sum(&pt, &all, false);
            let sp = e.reduce_sum(&p, &all, false);
            let st = e.reduce_sum(LABELS, &all, false);
            let (one, two) = (e.scalar(1.0), e.scalar(2.0));
            let num = e.mul(&inter, &two);
            let num = e.node("Add", &[&num, &one], vec![]);
            let den = e.node("Add", &[&sp, &st], vec![]);
            let den = e.node("Add", &[&den, &one], vec![]);
            let dice = e.node("Div", &[&num, &den], vec![]);
            e.node("Sub", &[&one, &dice], vec![])
        }
        Loss::Sum(parts) => {
            if parts.is_empty() {
                return Err(invalid("an empty sum of losses"));
            }
            let mut total: Option<String> = None;
            for (w, l) in parts {
                let v = emit_loss(e, l, prediction, rank)?;
                let wc = e.scalar(*w);
                let term = e.mul(&v, &wc);
                total = Some(match total {
                    None => term,
                    Some(t) => e.node("Add", &[&t, &term], vec![]),
                });
            }
            total.expect("at least one part")
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use onnx::{AttributeProto, OperatorSetIdProto};

    fn model(nodes: Vec<NodeProto>, opset: i64) -> ModelProto {
        ModelProto {
            ir_version: Some(10),
            opset_import: vec![OperatorSetIdProto {
                domain: Some(String::new()),
                version: Some(opset),
            }],
            graph: Some(GraphProto {
                node: nodes,
                name: Some("m".into()),
                initializer: vec![
                    TensorProto::floats("w", &[2, 3], &[0.1, -0.2, 0.3, 0.4, -0.5, 0.6]),
                    TensorProto::floats("b", &[3], &[0.0, 0.1, 0.2]),
                ],
                input: vec![ValueInfoProto::tensor(
                    "x",
                    FLOAT,
                    &[Dim::Named("N".into()), Dim::Known(2)],
                )],
                output: vec![ValueInfoProto::tensor("y", FLOAT, &[])],
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn node(op: &str, inputs: &[&str], output: &str, attrs: Vec<AttributeProto>) -> NodeProto {
        NodeProto {
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![output.into()],
            name: Some(format!("{op}-node")),
            op_type: Some(op.into()),
            attribute: attrs,
            ..Default::default()
        }
    }

    fn spec() -> Spec {
        Spec {
            trainable: None,
            prediction: None,
            loss: Loss::CrossEntropy,
            seed: 0,
        }
    }

    fn linear() -> Vec<NodeProto> {
        vec![
            node("MatMul", &["x", "w"], "h", vec![]),
            node("Add", &["h", "b"], "y", vec![]),
        ]
    }

    #[test]
    fn derivation_is_deterministic_and_names_its_interface() {
        let m = model(linear(), 18);
        let a = derive(&m, &spec()).unwrap();
        let b = derive(&m, &spec()).unwrap();
        assert_eq!(a.model.to_bytes(), b.model.to_bytes());
        assert_eq!(a.data_inputs, ["x"]);
        let names: Vec<&str> = a.weights.iter().map(|w| w.name.as_str()).collect();
        assert_eq!(names, ["b", "w"]);
        assert_eq!(a.weights[1].grad, "w.grad");
        let g = a.model.graph.as_ref().unwrap();
        let inputs: Vec<&str> = g.input.iter().map(|v| v.name()).collect();
        assert_eq!(inputs, ["x", "labels", "b", "w"]);
        let outputs: Vec<&str> = g.output.iter().map(|v| v.name()).collect();
        assert_eq!(outputs, ["loss", "y", "b.grad", "w.grad"]);
        // Trained weights are inputs, not initializers, of the training graph.
        assert!(
            g.initializer
                .iter()
                .all(|t| t.name() != "w" && t.name() != "b")
        );
        // The bytes decode back to the same model.
        assert_eq!(
            ModelProto::from_bytes(&a.model.to_bytes()).unwrap(),
            a.model
        );
    }

    #[test]
    fn refusals_name_what_is_wrong() {
        // An op on the gradient path without a rule, named with its node.
        let mut nodes = linear();
        nodes[1] = node("Add", &["h", "b"], "z", vec![]);
        nodes.push(node("Erf", &["z"], "y", vec![]));
        let e = derive(&model(nodes, 18), &spec()).unwrap_err();
        assert!(
            matches!(&e, AutodiffError::NoRule { op, node } if op == "Erf" && node == "Erf-node"),
            "{e}"
        );
        assert!(e.to_string().contains("supported: Add"), "{e}");
        // An unknown trainable name.
        let wrong = Spec {
            trainable: Some(vec!["nope".into()]),
            ..spec()
        };
        assert!(matches!(
            derive(&model(linear(), 18), &wrong),
            Err(AutodiffError::Invalid(_))
        ));
        // Old opsets and foreign domains.
        assert!(matches!(
            derive(&model(linear(), 11), &spec()),
            Err(AutodiffError::Unsupported(_))
        ));
        let mut m = model(linear(), 18);
        m.graph.as_mut().unwrap().node[0].domain = Some("com.microsoft".into());
        assert!(matches!(
            derive(&m, &spec()),
            Err(AutodiffError::Unsupported(_))
        ));
        // Local functions are refused, not silently dropped.
        let mut m = model(linear(), 18);
        m.functions.push(vec![1, 2, 3]);
        assert!(matches!(
            derive(&m, &spec()),
            Err(AutodiffError::Unsupported(_))
        ));
        // A prediction that no weight reaches.
        let nodes = vec![node("Relu", &["x"], "y", vec![])];
        assert!(matches!(
            derive(&model(nodes, 18), &spec()),
            Err(AutodiffError::Invalid(_))
        ));
        // Attributes a rule cannot honour.
        let nodes = vec![
            node("MatMul", &["x", "w"], "h", vec![]),
            node(
                "Constant",
                &[],
                "shape",
                vec![AttributeProto::tensor(
                    "value",
                    TensorProto::ints("v", &[4], &[-1, 1, 1, 3]),
                )],
            ),
            node("Reshape", &["h", "shape"], "x4", vec![]),
            node(
                "MaxPool",
                &["x4"],
                "y",
                vec![
                    AttributeProto::ints("kernel_shape", &[2, 2]),
                    AttributeProto::int("ceil_mode", 1),
                ],
            ),
        ];
        let e = derive(&model(nodes, 18), &spec()).unwrap_err();
        assert!(
            matches!(&e, AutodiffError::Node { op, reason, .. } if op == "MaxPool" && reason.contains("ceil_mode")),
            "{e}"
        );
        // The new rules' limits, by name: strided Slice, cubic or run-time-sized Resize, a
        // Dropout ratio computed at run time.
        let with_consts = |tail: Vec<NodeProto>, consts: Vec<TensorProto>| {
            let mut nodes = vec![node("MatMul", &["x", "w"], "h", vec![])];
            nodes.extend(tail);
            let mut m = model(nodes, 18);
            let g = m.graph.as_mut().unwrap();
            g.initializer.extend(consts);
            g.input[0] = ValueInfoProto::tensor("x", FLOAT, &[Dim::Known(2), Dim::Known(2)]);
            derive(&m, &spec()).unwrap_err().to_string()
        };
        let e = with_consts(
            vec![node("Slice", &["h", "s", "e", "a", "st"], "y", vec![])],
            vec![
                TensorProto::ints("s", &[1], &[0]),
                TensorProto::ints("e", &[1], &[3]),
                TensorProto::ints("a", &[1], &[1]),
                TensorProto::ints("st", &[1], &[2]),
            ],
        );
        assert!(e.contains("steps of 1"), "{e}");
        let four = |n: &str| TensorProto::floats(n, &[2], &[1.0, 2.0]);
        let e = with_consts(
            vec![node(
                "Resize",
                &["h", "", "scales"],
                "y",
                vec![AttributeProto::string("mode", "cubic")],
            )],
            vec![four("scales")],
        );
        assert!(e.contains("mode cubic"), "{e}");
        let e = with_consts(
            vec![
                node("Relu", &["b"], "computed", vec![]),
                node("Resize", &["h", "", "computed"], "y", vec![]),
            ],
            vec![],
        );
        assert!(e.contains("scales must be constant"), "{e}");
        let e = with_consts(
            vec![
                node("ReduceMean", &["b"], "r", vec![]),
                node("Dropout", &["h", "r"], "y", vec![]),
            ],
            vec![],
        );
        assert!(e.contains("ratio must be a constant"), "{e}");
        let e = with_consts(
            vec![node("Dropout", &["h", "one"], "y", vec![])],
            vec![TensorProto::floats("one", &[], &[1.0])],
        );
        assert!(e.contains("outside [0, 1)"), "{e}");
        // The name the training graph needs is taken.
        let nodes = vec![
            node("MatMul", &["x", "w"], "loss", vec![]),
            node("Add", &["loss", "b"], "y", vec![]),
        ];
        assert!(matches!(
            derive(&model(nodes, 18), &spec()),
            Err(AutodiffError::Invalid(_))
        ));
    }

    /// torch.onnx.export deduplicates equal initializers: a fresh BatchNormalization's running
    /// variance and mean come out as Identity nodes of its scale (ones) and bias (zeros).
    #[test]
    fn running_statistics_tied_to_weights_by_the_exporter_are_untied() {
        let bn_model = |extra: Option<NodeProto>| {
            let mut nodes = vec![
                node("Identity", &["s"], "bn.running_var", vec![]),
                node("Identity", &["b"], "bn.running_mean", vec![]),
                node(
                    "BatchNormalization",
                    &["x", "s", "b", "bn.running_mean", "bn.running_var"],
                    "y",
                    vec![],
                ),
            ];
            nodes.extend(extra);
            let mut m = model(nodes, 17);
            let g = m.graph.as_mut().unwrap();
            g.initializer = vec![
                TensorProto::floats("s", &[2], &[1.0, 1.0]),
                TensorProto::floats("b", &[2], &[0.0, 0.0]),
            ];
            g.input[0] = ValueInfoProto::tensor(
                "x",
                FLOAT,
                &[Dim::Named("N".into()), Dim::Known(2), Dim::Known(3)],
            );
            m
        };
        let mse = Spec {
            loss: Loss::Mse,
            ..spec()
        };
        let tg = derive(&bn_model(None), &mse).unwrap();
        let state: Vec<&str> = tg.state.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(state, ["bn.running_mean", "bn.running_var"]);
        assert_eq!(tg.state[1].initial, [1.0, 1.0]);
        let weights: Vec<&str> = tg.weights.iter().map(|w| w.name.as_str()).collect();
        assert_eq!(weights, ["b", "s"]);
        // Used elsewhere too: untying would change the model, so it is refused.
        let e = derive(
            &bn_model(Some(node("Add", &["y", "bn.running_var"], "z", vec![]))),
            &mse,
        )
        .unwrap_err();
        assert!(e.to_string().contains("also used elsewhere"), "{e}");
    }

    #[test]
    fn losses_parse() {
        assert_eq!(Loss::parse("ce"), Ok(Loss::CrossEntropy));
        assert_eq!(
            Loss::parse("0.7*ce + 0.3*dice"),
            Ok(Loss::Sum(vec![
                (0.7, Loss::CrossEntropy),
                (0.3, Loss::SoftDice)
            ]))
        );
        assert!(Loss::parse("hinge").is_err());
        assert!(Loss::parse("x*ce").is_err());
        assert!(Loss::parse("inf*ce").is_err());
    }

    proptest::proptest! {
        /// Arbitrary bytes are an error or a model, never a panic.
        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            if let Ok(m) = ModelProto::from_bytes(&bytes) {
                let _ = derive(&m, &spec());
            }
        }
    }
}
