//! Static shapes of the tensors of a graph, for the supported op set: sizes where the model
//! fixes them, names (`N`, the batch) where only the run does. Gradient rules need them to know
//! which axes were broadcast, how large a padded convolution input was, where a concatenation
//! splits.

use crate::onnx::{Dim, NodeProto, TensorProto};
use std::collections::HashMap;

pub(crate) type Shape = Vec<Dim>;

/// The values of constant tensors (initializers, `Constant` nodes, emitted constants) that
/// shapes and rules read: int64 shapes, axes and sizes; float scales and ratios.
#[derive(Debug, Default)]
pub(crate) struct Consts {
    pub ints: HashMap<String, Vec<i64>>,
    pub floats: HashMap<String, Vec<f32>>,
}

impl Consts {
    pub fn remember(&mut self, t: &TensorProto) {
        self.remember_as(t.name(), t);
    }

    pub fn remember_as(&mut self, name: &str, t: &TensorProto) {
        if let Some(v) = t.int_values() {
            self.ints.insert(name.to_string(), v);
        } else if let Some(v) = t.float_values() {
            // Only small constants matter here (scales, ratios); weights are not copied.
            if v.len() <= 16 {
                self.floats.insert(name.to_string(), v);
            }
        }
    }

    /// Values computed from constants by the few ops exporters use to assemble them (torch
    /// writes Resize's scales as a Concat of two Constants, Slice's bounds as Unsqueezed
    /// scalars): ops that only reshape (the values stay as they are, flat), and Concat of 1-D
    /// tensors (`inputs`: the input shapes).
    pub fn fold(&mut self, node: &NodeProto, inputs: &[Option<Shape>]) {
        let [out] = node.output.as_slice() else {
            return;
        };
        let parts: &[String] = match node.op() {
            "Identity" | "Unsqueeze" | "Squeeze" | "Reshape" | "Flatten" => {
                &node.input[..node.input.len().min(1)]
            }
            "Concat"
                if inputs
                    .iter()
                    .all(|s| s.as_ref().is_some_and(|s| s.len() == 1)) =>
            {
                &node.input
            }
            _ => return,
        };
        if parts.is_empty() {
            return;
        }
        let ints: Option<Vec<i64>> = parts
            .iter()
            .map(|i| self.ints.get(i).cloned())
            .collect::<Option<Vec<_>>>()
            .map(|v| v.concat());
        let floats: Option<Vec<f32>> = parts
            .iter()
            .map(|i| self.floats.get(i).cloned())
            .collect::<Option<Vec<_>>>()
            .map(|v| v.concat());
        if let Some(v) = ints {
            self.ints.insert(out.clone(), v);
        } else if let Some(v) = floats.filter(|v| v.len() <= 16) {
            self.floats.insert(out.clone(), v);
        }
    }

    /// The int64 values of input `i` of `node`, if it is given and constant.
    pub fn ints_of(&self, node: &NodeProto, i: usize) -> Option<&Vec<i64>> {
        node.input
            .get(i)
            .filter(|n| !n.is_empty())
            .and_then(|n| self.ints.get(n))
    }

    /// The float values of input `i` of `node`, if it is given and constant.
    pub fn floats_of(&self, node: &NodeProto, i: usize) -> Option<&Vec<f32>> {
        node.input
            .get(i)
            .filter(|n| !n.is_empty())
            .and_then(|n| self.floats.get(n))
    }
}

/// Sizes, if every one is known.
pub(crate) fn known(s: &[Dim]) -> Option<Vec<i64>> {
    s.iter()
        .map(|d| match d {
            Dim::Known(v) => Some(*v),
            Dim::Named(_) => None,
        })
        .collect()
}

fn one() -> Dim {
    Dim::Known(1)
}

/// Numpy-style broadcast of two shapes.
pub(crate) fn broadcast(a: &[Dim], b: &[Dim]) -> Result<Shape, String> {
    let n = a.len().max(b.len());
    let pad = |s: &[Dim]| {
        let mut v = vec![one(); n - s.len()];
        v.extend_from_slice(s);
        v
    };
    let (a, b) = (pad(a), pad(b));
    a.iter()
        .zip(&b)
        .map(|(x, y)| match (x, y) {
            (Dim::Known(1), other) | (other, Dim::Known(1)) => Ok(other.clone()),
            (Dim::Known(p), Dim::Known(q)) if p == q => Ok(Dim::Known(*p)),
            (Dim::Known(p), Dim::Known(q)) => Err(format!("cannot broadcast {p} against {q}")),
            (Dim::Known(k), Dim::Named(_)) | (Dim::Named(_), Dim::Known(k)) => Ok(Dim::Known(*k)),
            (Dim::Named(n), Dim::Named(_)) => Ok(Dim::Named(n.clone())),
        })
        .collect()
}

/// Normalise a possibly negative axis for a tensor of rank `rank`.
pub(crate) fn axis(a: i64, rank: usize) -> Result<usize, String> {
    let r = rank as i64;
    let v = if a < 0 { a + r } else { a };
    if (0..r).contains(&v) {
        Ok(v as usize)
    } else {
        Err(format!("axis {a} is outside a rank-{rank} tensor"))
    }
}

/// Spatial attributes of Conv, ConvTranspose and the pools, with ONNX's defaults.
#[derive(Debug, Clone)]
pub(crate) struct Window {
    pub kernel: Vec<i64>,
    pub strides: Vec<i64>,
    pub dilations: Vec<i64>,
    /// Begin pads then end pads, as ONNX orders them.
    pub pads: Vec<i64>,
}

impl Window {
    pub fn of(node: &NodeProto, kernel: Vec<i64>) -> Result<Window, String> {
        let n = kernel.len();
        if let Some(p) = node.attr_string("auto_pad")
            && p != "NOTSET"
        {
            return Err(format!("auto_pad {p} (give explicit pads)"));
        }
        if node.attr_int("ceil_mode").unwrap_or(0) != 0 {
            return Err("ceil_mode 1".into());
        }
        let get = |name: &str, default: i64, len: usize| -> Result<Vec<i64>, String> {
            match node.attr_ints(name) {
                Some(v) if v.len() == len => Ok(v.to_vec()),
                Some([]) => Ok(vec![default; len]),
                Some(v) => Err(format!(
                    "{name} has {} values for {n} spatial axes",
                    v.len()
                )),
                None => Ok(vec![default; len]),
            }
        };
        let w = Window {
            strides: get("strides", 1, n)?,
            dilations: get("dilations", 1, n)?,
            pads: get("pads", 0, 2 * n)?,
            kernel,
        };
        if w.strides
            .iter()
            .chain(&w.dilations)
            .chain(&w.kernel)
            .any(|v| *v < 1)
            || w.pads.iter().any(|v| *v < 0)
        {
            return Err("kernel, strides and dilations must be positive, pads not negative".into());
        }
        Ok(w)
    }

    /// Output size along spatial axis `i` for input size `d`.
    pub fn output(&self, i: usize, d: &Dim) -> Dim {
        match d {
            Dim::Known(v) => {
                let n = self.kernel.len();
                let span = self.dilations[i] * (self.kernel[i] - 1) + 1;
                Dim::Known((v + self.pads[i] + self.pads[n + i] - span) / self.strides[i] + 1)
            }
            Dim::Named(_) => Dim::Named("?".into()),
        }
    }
}

/// Output shapes of `node` from its input shapes (`None` for an omitted optional input) and
/// the values of constant int64 inputs (shapes, axes); `None` for an op without a shape rule
/// (fine off the gradient path; on it, the missing gradient rule is reported instead).
pub(crate) fn infer(
    node: &NodeProto,
    inputs: &[Option<Shape>],
    consts: &Consts,
) -> Result<Option<Vec<Shape>>, String> {
    infer_known(node, inputs, consts)
        .map(Some)
        .or_else(|e| if e == NO_RULE { Ok(None) } else { Err(e) })
}

const NO_RULE: &str = "no shape rule";

fn infer_known(
    node: &NodeProto,
    inputs: &[Option<Shape>],
    consts: &Consts,
) -> Result<Vec<Shape>, String> {
    let input = |i: usize| -> Result<&Shape, String> {
        inputs
            .get(i)
            .and_then(|s| s.as_ref())
            .ok_or_else(|| format!("input {i} has no known shape"))
    };
    let const_input = |i: usize| consts.ints_of(node, i);
    let op = node.op();
    let one_output = |s: Shape| Ok(vec![s]);
    match op {
        "Identity"
        | "Neg"
        | "Relu"
        | "LeakyRelu"
        | "Sigmoid"
        | "Tanh"
        | "Exp"
        | "Log"
        | "Sqrt"
        | "Softplus"
        | "Softmax"
        | "LogSoftmax"
        | "BatchNormalization"
        | "InstanceNormalization" => one_output(input(0)?.clone()),
        "Add" | "Sub" | "Mul" | "Div" => one_output(broadcast(input(0)?, input(1)?)?),
        "MatMul" => {
            let (a, b) = (input(0)?, input(1)?);
            if a.len() < 2 || b.len() != 2 {
                return Err(
                    "MatMul is supported for a rank ≥ 2 left and a rank-2 right operand".into(),
                );
            }
            let mut out = a[..a.len() - 1].to_vec();
            out.push(b[1].clone());
            one_output(out)
        }
        "Gemm" => {
            let (a, b) = (input(0)?, input(1)?);
            if a.len() != 2 || b.len() != 2 {
                return Err("Gemm operands must be rank 2".into());
            }
            let ta = node.attr_int("transA").unwrap_or(0) != 0;
            let tb = node.attr_int("transB").unwrap_or(0) != 0;
            let m = if ta { &a[1] } else { &a[0] };
            let n = if tb { &b[0] } else { &b[1] };
            one_output(vec![m.clone(), n.clone()])
        }
        "Conv" | "ConvTranspose" => {
            let (x, w) = (input(0)?, input(1)?);
            if x.len() < 3 || w.len() != x.len() {
                return Err(format!(
                    "{op} needs N, C and spatial axes, and a weight of the same rank"
                ));
            }
            let kernel = known(&w[2..]).ok_or("the kernel size must be known")?;
            let win = Window::of(node, kernel)?;
            let group = node.attr_int("group").unwrap_or(1);
            let mut out = vec![x[0].clone()];
            if op == "Conv" {
                out.push(w[0].clone());
                for (i, d) in x[2..].iter().enumerate() {
                    out.push(win.output(i, d));
                }
            } else {
                if node.attr_ints("output_shape").is_some() {
                    return Err("ConvTranspose output_shape (give pads and output_padding)".into());
                }
                let n = win.kernel.len();
                let output_padding = node.attr_ints("output_padding").unwrap_or(&[]).to_vec();
                let channels = match &w[1] {
                    Dim::Known(c) => Dim::Known(c * group),
                    d => d.clone(),
                };
                out.push(channels);
                for (i, d) in x[2..].iter().enumerate() {
                    out.push(match d {
                        Dim::Known(v) => Dim::Known(
                            win.strides[i] * (v - 1)
                                + output_padding.get(i).copied().unwrap_or(0)
                                + (win.kernel[i] - 1) * win.dilations[i]
                                + 1
                                - win.pads[i]
                                - win.pads[n + i],
                        ),
                        Dim::Named(_) => Dim::Named("?".into()),
                    });
                }
            }
            one_output(out)
        }
        "MaxPool" | "AveragePool" => {
            let x = input(0)?;
            let kernel = node
                .attr_ints("kernel_shape")
                .ok_or("kernel_shape missing")?
                .to_vec();
            if kernel.len() + 2 != x.len() {
                return Err("kernel_shape does not match the input's spatial axes".into());
            }
            let win = Window::of(node, kernel)?;
            let mut out = x[..2].to_vec();
            for (i, d) in x[2..].iter().enumerate() {
                out.push(win.output(i, d));
            }
            Ok(vec![out.clone(); node.output.len().max(1)])
        }
        "GlobalAveragePool" => {
            let x = input(0)?;
            let mut out = x[..2.min(x.len())].to_vec();
            out.extend(std::iter::repeat_n(one(), x.len().saturating_sub(2)));
            one_output(out)
        }
        "Flatten" => {
            let x = input(0)?;
            let a = axis(node.attr_int("axis").unwrap_or(1), x.len() + 1)?;
            let prod = |s: &[Dim]| match known(s) {
                Some(v) => Dim::Known(v.iter().product()),
                None => Dim::Named("?".into()),
            };
            one_output(vec![prod(&x[..a]), prod(&x[a..])])
        }
        "Reshape" => {
            let x = input(0)?;
            let target = const_input(1).ok_or("Reshape needs a constant shape")?;
            let allow_zero = node.attr_int("allowzero").unwrap_or(0) != 0;
            let mut out: Shape = target
                .iter()
                .enumerate()
                .map(|(i, &v)| match v {
                    0 if !allow_zero => x.get(i).cloned().unwrap_or(Dim::Known(0)),
                    -1 => Dim::Named("-1".into()),
                    v => Dim::Known(v),
                })
                .collect();
            if let Some(i) = out.iter().position(|d| *d == Dim::Named("-1".into())) {
                let rest: Option<Vec<i64>> = out
                    .iter()
                    .enumerate()
                    .filter(|(j, _)| *j != i)
                    .map(|(_, d)| match d {
                        Dim::Known(v) => Some(*v),
                        Dim::Named(_) => None,
                    })
                    .collect();
                out[i] = match (known(x), rest) {
                    (Some(all), Some(rest)) if rest.iter().product::<i64>() > 0 => {
                        Dim::Known(all.iter().product::<i64>() / rest.iter().product::<i64>())
                    }
                    _ => x.first().cloned().unwrap_or(Dim::Named("?".into())),
                };
            }
            one_output(out)
        }
        "Transpose" => {
            let x = input(0)?;
            let perm: Vec<i64> = match node.attr_ints("perm") {
                Some(p) => p.to_vec(),
                None => (0..x.len() as i64).rev().collect(),
            };
            let out = perm
                .iter()
                .map(|&p| x.get(p as usize).cloned().ok_or("perm out of range"))
                .collect::<Result<Shape, _>>()?;
            one_output(out)
        }
        "Squeeze" | "Unsqueeze" => {
            let x = input(0)?;
            let axes = const_input(1)
                .cloned()
                .or_else(|| node.attr_ints("axes").map(|a| a.to_vec()))
                .ok_or(format!("{op} needs constant axes"))?;
            if op == "Squeeze" {
                let axes: Vec<usize> = axes
                    .iter()
                    .map(|&a| axis(a, x.len()))
                    .collect::<Result<_, _>>()?;
                one_output(
                    x.iter()
                        .enumerate()
                        .filter(|(i, _)| !axes.contains(i))
                        .map(|(_, d)| d.clone())
                        .collect(),
                )
            } else {
                let rank = x.len() + axes.len();
                let axes: Vec<usize> = axes
                    .iter()
                    .map(|&a| axis(a, rank))
                    .collect::<Result<_, _>>()?;
                let mut rest = x.iter();
                one_output(
                    (0..rank)
                        .map(|i| {
                            if axes.contains(&i) {
                                one()
                            } else {
                                rest.next().cloned().unwrap_or(one())
                            }
                        })
                        .collect(),
                )
            }
        }
        "Concat" => {
            let first = input(0)?.clone();
            let a = axis(
                node.attr_int("axis").ok_or("Concat without axis")?,
                first.len(),
            )?;
            let mut total = Some(0i64);
            for i in 0..node.input.len() {
                match input(i)?.get(a) {
                    Some(Dim::Known(v)) => total = total.map(|t| t + v),
                    _ => total = None,
                }
            }
            let mut out = first;
            out[a] = total.map_or(Dim::Named("?".into()), Dim::Known);
            one_output(out)
        }
        "ReduceSum" | "ReduceMean" => {
            let x = input(0)?;
            let axes = reduce_axes(node, x.len(), consts)?;
            let keep = node.attr_int("keepdims").unwrap_or(1) != 0;
            one_output(
                x.iter()
                    .enumerate()
                    .filter_map(|(i, d)| match (axes.contains(&i), keep) {
                        (true, true) => Some(one()),
                        (true, false) => None,
                        (false, _) => Some(d.clone()),
                    })
                    .collect(),
            )
        }
        "Dropout" => {
            let x = input(0)?.clone();
            Ok(vec![x.clone(); node.output.len().max(1)])
        }
        "Split" => {
            let x = input(0)?.clone();
            let a = axis(node.attr_int("axis").unwrap_or(0), x.len())?;
            let sizes = split_sizes(node, &x, consts)?;
            Ok(sizes
                .into_iter()
                .map(|size| {
                    let mut s = x.clone();
                    s[a] = Dim::Known(size);
                    s
                })
                .collect())
        }
        "Slice" => {
            let x = input(0)?;
            let mut out = x.clone();
            for r in slice_ranges(node, x, consts)? {
                out[r.axis] = Dim::Known(r.len());
            }
            one_output(out)
        }
        "Resize" => {
            let x = input(0)?;
            let sizes = crate::resize::output_sizes(node, x, consts)?;
            one_output(sizes)
        }
        "Constant" => {
            let t = node
                .attr("value")
                .and_then(|a| a.t.as_ref())
                .ok_or("Constant without a tensor value")?;
            one_output(t.dims.iter().map(|d| Dim::Known(*d)).collect())
        }
        _ => Err(NO_RULE.into()),
    }
}

/// The axes a ReduceSum/ReduceMean node reduces, normalised.
pub(crate) fn reduce_axes(
    node: &NodeProto,
    rank: usize,
    consts: &Consts,
) -> Result<Vec<usize>, String> {
    let given = node
        .input
        .get(1)
        .filter(|n| !n.is_empty())
        .map(|n| {
            consts
                .ints
                .get(n)
                .cloned()
                .ok_or("reduction axes must be constant")
        })
        .transpose()?
        .or_else(|| node.attr_ints("axes").map(|a| a.to_vec()))
        .unwrap_or_default();
    if given.is_empty() {
        if node.attr_int("noop_with_empty_axes").unwrap_or(0) != 0 {
            return Ok(vec![]);
        }
        return Ok((0..rank).collect());
    }
    given.iter().map(|&a| axis(a, rank)).collect()
}

/// The sizes a Split node cuts its input into along its axis: the `split` input (opset 13+)
/// or attribute, else equal parts (one per output, or `num_outputs` from opset 18, the last
/// part smaller).
pub(crate) fn split_sizes(
    node: &NodeProto,
    x: &[Dim],
    consts: &Consts,
) -> Result<Vec<i64>, String> {
    let a = axis(node.attr_int("axis").unwrap_or(0), x.len())?;
    let given = if node.input.get(1).is_some_and(|n| !n.is_empty()) {
        Some(
            consts
                .ints_of(node, 1)
                .ok_or("Split sizes must be constant")?
                .clone(),
        )
    } else {
        node.attr_ints("split").map(<[i64]>::to_vec)
    };
    let Dim::Known(total) = x[a] else {
        return Err("Split needs a static size along its axis".into());
    };
    let sizes = match given {
        Some(v) => v,
        None => {
            let parts = node
                .attr_int("num_outputs")
                .unwrap_or(node.output.len() as i64);
            if parts < 1 {
                return Err("Split into no parts".into());
            }
            let chunk = (total + parts - 1) / parts;
            (0..parts)
                .map(|i| (total - i * chunk).clamp(0, chunk))
                .collect()
        }
    };
    if sizes.len() != node.output.len() || sizes.iter().any(|v| *v < 0) {
        return Err(format!(
            "Split sizes {sizes:?} do not match its {} outputs",
            node.output.len()
        ));
    }
    if sizes.iter().sum::<i64>() != total {
        return Err(format!("Split sizes {sizes:?} do not add up to {total}"));
    }
    Ok(sizes)
}

/// One sliced axis of a Slice node, clamped as ONNX specifies.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct SliceRange {
    pub axis: usize,
    pub start: i64,
    pub end: i64,
    pub step: i64,
    /// The input's size along the axis.
    pub size: i64,
}

impl SliceRange {
    pub fn len(&self) -> i64 {
        if self.step > 0 {
            ((self.end - self.start).max(0) + self.step - 1) / self.step
        } else {
            ((self.start - self.end).max(0) + (-self.step) - 1) / (-self.step)
        }
    }
}

/// The ranges a Slice node (opset 10+: starts, ends, axes, steps as constant inputs) takes;
/// every sliced axis needs a static size.
pub(crate) fn slice_ranges(
    node: &NodeProto,
    x: &[Dim],
    consts: &Consts,
) -> Result<Vec<SliceRange>, String> {
    let get = |i: usize, what: &str| -> Result<Option<Vec<i64>>, String> {
        if node.input.get(i).is_none_or(|n| n.is_empty()) {
            return Ok(None);
        }
        consts
            .ints_of(node, i)
            .cloned()
            .map(Some)
            .ok_or_else(|| format!("Slice {what} must be constant"))
    };
    let starts = get(1, "starts")?.ok_or("Slice without starts")?;
    let ends = get(2, "ends")?.ok_or("Slice without ends")?;
    let axes = get(3, "axes")?.unwrap_or_else(|| (0..starts.len() as i64).collect());
    let steps = get(4, "steps")?.unwrap_or_else(|| vec![1; starts.len()]);
    if ends.len() != starts.len() || axes.len() != starts.len() || steps.len() != starts.len() {
        return Err("Slice starts, ends, axes and steps differ in length".into());
    }
    let mut ranges: Vec<SliceRange> = Vec::new();
    for i in 0..starts.len() {
        let a = axis(axes[i], x.len())?;
        if ranges.iter().any(|r| r.axis == a) {
            return Err(format!("Slice names axis {a} twice"));
        }
        let Dim::Known(size) = x[a] else {
            return Err(format!("Slice needs a static size along axis {a}"));
        };
        let step = steps[i];
        if step == 0 {
            return Err("Slice step 0".into());
        }
        let resolve = |v: i64| if v < 0 { v.saturating_add(size) } else { v };
        let (start, end) = if step > 0 {
            (
                resolve(starts[i]).clamp(0, size),
                resolve(ends[i]).clamp(0, size),
            )
        } else {
            (
                resolve(starts[i]).clamp(0, size - 1),
                resolve(ends[i]).clamp(-1, size - 1),
            )
        };
        ranges.push(SliceRange {
            axis: a,
            start,
            end,
            step,
            size,
        });
    }
    Ok(ranges)
}
