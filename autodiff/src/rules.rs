//! Backward rules: for one forward node and the gradients of its outputs, the nodes that
//! compute the gradients of its inputs — standard ONNX ops only, so the training graph runs on
//! any ONNX Runtime build. Each rule is checked against finite differences
//! (`kernels/tests/gradcheck.rs`).

use crate::emit::Emitter;
use crate::onnx::{AttributeProto, Dim, FLOAT, NodeProto, TensorProto};
use crate::resize;
use crate::shapes::{Consts, Shape, Window, axis, known, reduce_axes, slice_ranges};
use std::collections::HashMap;

/// The ops with a backward rule.
pub const DIFFERENTIABLE: &[&str] = &[
    "Add",
    "AveragePool",
    "BatchNormalization",
    "Concat",
    "Conv",
    "ConvTranspose",
    "Div",
    "Dropout",
    "Exp",
    "Flatten",
    "Gemm",
    "GlobalAveragePool",
    "Identity",
    "InstanceNormalization",
    "LeakyRelu",
    "Log",
    "LogSoftmax",
    "MatMul",
    "MaxPool",
    "Mul",
    "Neg",
    "ReduceMean",
    "ReduceSum",
    "Relu",
    "Reshape",
    "Resize",
    "Sigmoid",
    "Softmax",
    "Softplus",
    "Slice",
    "Split",
    "Sqrt",
    "Squeeze",
    "Sub",
    "Tanh",
    "Transpose",
    "Unsqueeze",
];

/// Which inputs of a node gradients flow into (the others are shapes, axes and the like).
pub(crate) fn differentiable_inputs(node: &NodeProto) -> Vec<usize> {
    match node.op() {
        "Add" | "Sub" | "Mul" | "Div" | "MatMul" => vec![0, 1],
        "Gemm" | "Conv" | "ConvTranspose" => (0..node.input.len().min(3)).collect(),
        // Rewritten into differentiable ops (`norm`); running statistics are not differentiated.
        "BatchNormalization" | "InstanceNormalization" => vec![0, 1, 2],
        "Concat" => (0..node.input.len()).collect(),
        "Constant" => vec![],
        _ => vec![0],
    }
}

pub(crate) struct Ctx<'a> {
    pub e: &'a mut Emitter,
    pub shapes: &'a HashMap<String, Shape>,
    pub consts: &'a Consts,
}

impl Ctx<'_> {
    fn shape(&self, name: &str) -> Result<&Shape, String> {
        self.shapes
            .get(name)
            .ok_or_else(|| format!("no shape known for {name}"))
    }

    fn known(&self, name: &str, what: &str) -> Result<Vec<i64>, String> {
        known(self.shape(name)?).ok_or_else(|| format!("{what} must have a static shape"))
    }

    /// The spatial sizes (axes 2…) of `name`, which must be static; batch and channels may
    /// be named.
    fn spatial(&self, name: &str, what: &str) -> Result<Vec<i64>, String> {
        let s = self.shape(name)?;
        known(s.get(2..).unwrap_or(&[]))
            .ok_or_else(|| format!("{what} must have static spatial sizes"))
    }

    /// `g` (shaped like the broadcast output `out`) summed down to the shape of input `x`.
    fn unbroadcast(&mut self, g: &str, x: &str, out: &str) -> Result<String, String> {
        let (xs, ys) = (self.shape(x)?.clone(), self.shape(out)?.clone());
        let lead = ys.len() - xs.len().min(ys.len());
        let mut axes: Vec<i64> = (0..lead as i64).collect();
        for (i, d) in xs.iter().enumerate() {
            if *d == Dim::Known(1) && ys[lead + i] != Dim::Known(1) {
                axes.push((lead + i) as i64);
            }
        }
        if axes.is_empty() {
            return Ok(g.to_string());
        }
        let summed = self.e.reduce_sum(g, &axes, true);
        if lead == 0 {
            return Ok(summed);
        }
        let shape = self.e.node("Shape", &[x], vec![]);
        Ok(self.e.node("Reshape", &[&summed, &shape], vec![]))
    }

    fn like(&mut self, g: &str, x: &str) -> String {
        let shape = self.e.node("Shape", &[x], vec![]);
        self.e.node("Reshape", &[g, &shape], vec![])
    }

    /// Float ratio |small| / |large| of two tensors' element counts (for means).
    fn count_ratio(&mut self, small: &str, large: &str) -> String {
        let to_float = || vec![AttributeProto::int("to", FLOAT as i64)];
        let a = self.e.node("Size", &[small], vec![]);
        let a = self.e.node("Cast", &[&a], to_float());
        let b = self.e.node("Size", &[large], vec![]);
        let b = self.e.node("Cast", &[&b], to_float());
        self.e.node("Div", &[&a, &b], vec![])
    }
}

/// The drop probability of a Dropout node: its constant `ratio` input, 0.5 when omitted.
pub(crate) fn dropout_ratio(node: &NodeProto, consts: &Consts) -> Result<f32, String> {
    let ratio = match node.input.get(1).filter(|n| !n.is_empty()) {
        None => 0.5,
        Some(_) => match consts.floats_of(node, 1).map(Vec::as_slice) {
            Some([r]) => *r,
            _ => return Err("Dropout ratio must be a constant scalar".into()),
        },
    };
    if !(0.0..1.0).contains(&ratio) {
        return Err(format!("Dropout ratio {ratio} is outside [0, 1)"));
    }
    Ok(ratio)
}

/// A row-major `rows × cols` matrix transposed.
fn transposed(m: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0.0; m.len()];
    for r in 0..rows {
        for k in 0..cols {
            t[k * rows + r] = m[r * cols + k];
        }
    }
    t
}

fn input(node: &NodeProto, i: usize) -> &str {
    node.input.get(i).map(String::as_str).unwrap_or("")
}

/// Gradients of the inputs of `node` (one per input; `None` where not needed or not
/// differentiable) from `gy`, the gradients of its outputs. `needs[i]` says whether input i
/// needs one.
pub(crate) fn backward(
    c: &mut Ctx<'_>,
    node: &NodeProto,
    gy: &[Option<String>],
    needs: &[bool],
) -> Result<Vec<Option<String>>, String> {
    let need = |i: usize| needs.get(i).copied().unwrap_or(false);
    let mut out: Vec<Option<String>> = vec![None; node.input.len()];
    if node.op() == "Split" {
        // Any of the parts may carry a gradient; the others contribute zeros.
        let x = input(node, 0);
        let rank = c.shape(x)?.len();
        let a = axis(node.attr_int("axis").unwrap_or(0), rank)?;
        let parts: Vec<String> = node
            .output
            .iter()
            .zip(gy)
            .map(|(part, g)| match g {
                Some(g) => g.clone(),
                None => {
                    let shape = c.e.node("Shape", &[part], vec![]);
                    c.e.node(
                        "ConstantOfShape",
                        &[&shape],
                        vec![AttributeProto::tensor(
                            "value",
                            TensorProto::floats("zero", &[1], &[0.0]),
                        )],
                    )
                }
            })
            .collect();
        let refs: Vec<&str> = parts.iter().map(String::as_str).collect();
        out[0] = Some(c.e.node("Concat", &refs, vec![AttributeProto::int("axis", a as i64)]));
        return Ok(out);
    }
    let Some(g) = gy.first().cloned().flatten() else {
        // Only a secondary output (MaxPool's indices) has a gradient: nothing flows back.
        return Ok(out);
    };
    let g = g.as_str();
    let x = input(node, 0);
    let y = node.output[0].as_str();
    let op = node.op();
    match op {
        "Identity" => out[0] = Some(c.e.node("Identity", &[g], vec![])),
        "Neg" => out[0] = Some(c.e.node("Neg", &[g], vec![])),
        "Add" | "Sub" | "Mul" | "Div" => {
            let (a, b) = (input(node, 0), input(node, 1));
            if need(0) {
                let ga = match op {
                    "Mul" => c.e.mul(g, b),
                    "Div" => c.e.node("Div", &[g, b], vec![]),
                    _ => g.to_string(),
                };
                out[0] = Some(c.unbroadcast(&ga, a, y)?);
            }
            if need(1) {
                let gb = match op {
                    "Add" => g.to_string(),
                    "Sub" => c.e.node("Neg", &[g], vec![]),
                    "Mul" => c.e.mul(g, a),
                    _ => {
                        let gy_ = c.e.mul(g, y);
                        let q = c.e.node("Div", &[&gy_, b], vec![]);
                        c.e.node("Neg", &[&q], vec![])
                    }
                };
                out[1] = Some(c.unbroadcast(&gb, b, y)?);
            }
        }
        "Relu" => {
            let zero = c.e.scalar(0.0);
            let positive = c.e.node("Greater", &[y, &zero], vec![]);
            let mask = c.e.node(
                "Cast",
                &[&positive],
                vec![AttributeProto::int("to", FLOAT as i64)],
            );
            out[0] = Some(c.e.mul(g, &mask));
        }
        "LeakyRelu" => {
            let alpha = node.attr_float("alpha").unwrap_or(0.01);
            let zero = c.e.scalar(0.0);
            let (one, alpha) = (c.e.scalar(1.0), c.e.scalar(alpha));
            let positive = c.e.node("Greater", &[x, &zero], vec![]);
            let slope = c.e.node("Where", &[&positive, &one, &alpha], vec![]);
            out[0] = Some(c.e.mul(g, &slope));
        }
        "Sigmoid" => {
            let one = c.e.scalar(1.0);
            let rest = c.e.node("Sub", &[&one, y], vec![]);
            let d = c.e.mul(y, &rest);
            out[0] = Some(c.e.mul(g, &d));
        }
        "Tanh" => {
            let one = c.e.scalar(1.0);
            let sq = c.e.mul(y, y);
            let d = c.e.node("Sub", &[&one, &sq], vec![]);
            out[0] = Some(c.e.mul(g, &d));
        }
        "Exp" => out[0] = Some(c.e.mul(g, y)),
        "Log" => out[0] = Some(c.e.node("Div", &[g, x], vec![])),
        "Sqrt" => {
            let half = c.e.scalar(0.5);
            let h = c.e.mul(g, &half);
            out[0] = Some(c.e.node("Div", &[&h, y], vec![]));
        }
        "Softplus" => {
            let s = c.e.node("Sigmoid", &[x], vec![]);
            out[0] = Some(c.e.mul(g, &s));
        }
        "Softmax" | "LogSoftmax" => {
            let rank = c.shape(x)?.len();
            let a = axis(node.attr_int("axis").unwrap_or(-1), rank)? as i64;
            if op == "Softmax" {
                let gy_ = c.e.mul(g, y);
                let s = c.e.reduce_sum(&gy_, &[a], true);
                let d = c.e.node("Sub", &[g, &s], vec![]);
                out[0] = Some(c.e.mul(y, &d));
            } else {
                let s = c.e.reduce_sum(g, &[a], true);
                let p = c.e.node("Exp", &[y], vec![]);
                let ps = c.e.mul(&p, &s);
                out[0] = Some(c.e.node("Sub", &[g, &ps], vec![]));
            }
        }
        "MatMul" => {
            let (a, b) = (input(node, 0), input(node, 1));
            if need(0) {
                let bt = c.e.transpose(b, &[1, 0]);
                out[0] = Some(c.e.node("MatMul", &[g, &bt], vec![]));
            }
            if need(1) {
                let bs = c.known(b, "MatMul's right operand")?;
                let (k, n) = (bs[0], bs[1]);
                let (a2, g2) = if c.shape(a)?.len() == 2 {
                    (a.to_string(), g.to_string())
                } else {
                    (c.e.reshape(a, &[-1, k]), c.e.reshape(g, &[-1, n]))
                };
                out[1] =
                    Some(c.e.node("Gemm", &[&a2, &g2], vec![AttributeProto::int("transA", 1)]));
            }
        }
        "Gemm" => {
            let (a, b) = (input(node, 0), input(node, 1));
            let alpha = node.attr_float("alpha").unwrap_or(1.0);
            let beta = node.attr_float("beta").unwrap_or(1.0);
            let ta = node.attr_int("transA").unwrap_or(0) != 0;
            let tb = node.attr_int("transB").unwrap_or(0) != 0;
            let gemm = |c: &mut Ctx<'_>, p: &str, q: &str, t1: bool, t2: bool| {
                c.e.node(
                    "Gemm",
                    &[p, q],
                    vec![
                        AttributeProto::float("alpha", alpha),
                        AttributeProto::int("transA", t1 as i64),
                        AttributeProto::int("transB", t2 as i64),
                    ],
                )
            };
            if need(0) {
                out[0] = Some(match (ta, tb) {
                    (false, false) => gemm(c, g, b, false, true),
                    (false, true) => gemm(c, g, b, false, false),
                    (true, false) => gemm(c, b, g, false, true),
                    (true, true) => gemm(c, b, g, true, true),
                });
            }
            if need(1) {
                out[1] = Some(match (ta, tb) {
                    (false, false) => gemm(c, a, g, true, false),
                    (true, false) => gemm(c, a, g, false, false),
                    (false, true) => gemm(c, g, a, true, false),
                    (true, true) => gemm(c, g, a, true, true),
                });
            }
            if need(2) {
                let bias = input(node, 2);
                let scaled = if beta == 1.0 {
                    g.to_string()
                } else {
                    let b_ = c.e.scalar(beta);
                    c.e.mul(g, &b_)
                };
                out[2] = Some(c.unbroadcast(&scaled, bias, y)?);
            }
        }
        "Conv" | "ConvTranspose" => conv_backward(c, node, g, needs, &mut out)?,
        "MaxPool" => {
            let indices = node
                .output
                .get(1)
                .filter(|s| !s.is_empty())
                .ok_or("MaxPool needs its Indices output for the gradient")?;
            let dilated = node
                .attr_ints("dilations")
                .is_some_and(|d| d.iter().any(|v| *v != 1));
            if dilated || node.attr_int("storage_order").unwrap_or(0) != 0 {
                return Err("MaxPool with dilations or column-major storage order".into());
            }
            let size = c.e.node("Size", &[x], vec![]);
            let one = c.e.ints(&[1]);
            let size = c.e.node("Reshape", &[&size, &one], vec![]);
            let zeros = c.e.node(
                "ConstantOfShape",
                &[&size],
                vec![AttributeProto::tensor(
                    "value",
                    TensorProto::floats("zero", &[1], &[0.0]),
                )],
            );
            let idx = c.e.reshape(indices, &[-1]);
            let flat_g = c.e.reshape(g, &[-1]);
            let scattered = c.e.node(
                "ScatterElements",
                &[&zeros, &idx, &flat_g],
                vec![
                    AttributeProto::int("axis", 0),
                    AttributeProto::string("reduction", "add"),
                ],
            );
            out[0] = Some(c.like(&scattered, x));
        }
        "AveragePool" => {
            let xs = c.spatial(x, "AveragePool's input")?;
            let kernel = node.attr_ints("kernel_shape").unwrap_or(&[]).to_vec();
            let win = Window::of(node, kernel.clone())?;
            if win.strides != kernel || win.pads.iter().any(|p| *p != 0) {
                return Err(
                    "AveragePool gradient needs strides equal to the kernel and no pads".into(),
                );
            }
            let ys = c.spatial(y, "AveragePool's output")?;
            let spatial = kernel.len();
            let mut split = vec![0, 0];
            let mut tiled = vec![1, 1];
            let mut merged = vec![0, 0];
            for i in 0..spatial {
                split.extend([ys[i], 1]);
                tiled.extend([ys[i], kernel[i]]);
                merged.push(ys[i] * kernel[i]);
            }
            let s = c.e.reshape(g, &split);
            let t = c.e.ints(&tiled);
            let e = c.e.node("Expand", &[&s, &t], vec![]);
            let m = c.e.reshape(&e, &merged);
            let rest: Vec<i64> = (0..spatial).map(|i| xs[i] - ys[i] * kernel[i]).collect();
            let padded = if rest.iter().any(|r| *r > 0) {
                let mut pads = vec![0; 2 + spatial];
                pads.extend([0, 0]);
                pads.extend(&rest);
                let p = c.e.ints(&pads);
                c.e.node("Pad", &[&m, &p], vec![])
            } else {
                m
            };
            let scale = c.e.scalar(1.0 / kernel.iter().product::<i64>() as f32);
            out[0] = Some(c.e.mul(&padded, &scale));
        }
        "GlobalAveragePool" | "ReduceMean" | "ReduceSum" => {
            let grown = if op == "GlobalAveragePool" || node.attr_int("keepdims").unwrap_or(1) != 0
            {
                g.to_string()
            } else {
                let rank = c.shape(x)?.len();
                let axes: Vec<i64> = reduce_axes(node, rank, c.consts)?
                    .into_iter()
                    .map(|a| a as i64)
                    .collect();
                let a = c.e.ints(&axes);
                c.e.node("Unsqueeze", &[g, &a], vec![])
            };
            let shape = c.e.node("Shape", &[x], vec![]);
            let expanded = c.e.node("Expand", &[&grown, &shape], vec![]);
            out[0] = Some(if op == "ReduceSum" {
                expanded
            } else {
                let ratio = c.count_ratio(y, x);
                c.e.mul(&expanded, &ratio)
            });
        }
        "Flatten" | "Reshape" | "Squeeze" | "Unsqueeze" => out[0] = Some(c.like(g, x)),
        "Transpose" => {
            let rank = c.shape(x)?.len();
            let perm: Vec<i64> = match node.attr_ints("perm") {
                Some(p) => p.to_vec(),
                None => (0..rank as i64).rev().collect(),
            };
            let mut inverse = vec![0i64; perm.len()];
            for (i, &p) in perm.iter().enumerate() {
                inverse[p as usize] = i as i64;
            }
            out[0] = Some(c.e.transpose(g, &inverse));
        }
        "Concat" => {
            let rank = c.shape(x)?.len();
            let a = axis(node.attr_int("axis").unwrap_or(0), rank)?;
            let sizes = node
                .input
                .iter()
                .map(|i| match c.shape(i)?.get(a) {
                    Some(Dim::Known(v)) => Ok(*v),
                    _ => Err("Concat inputs need static sizes along the axis".to_string()),
                })
                .collect::<Result<Vec<i64>, String>>()?;
            let split = c.e.ints(&sizes);
            let parts = c.e.node_n(
                "Split",
                &[g, &split],
                sizes.len(),
                vec![AttributeProto::int("axis", a as i64)],
            );
            for (i, p) in parts.into_iter().enumerate() {
                if need(i) {
                    out[i] = Some(p);
                }
            }
        }
        "Slice" => {
            let ranges = slice_ranges(node, c.shape(x)?, c.consts)?;
            let rank = c.shape(x)?.len();
            if ranges.iter().any(|r| r.step != 1) {
                return Err("Slice gradient needs steps of 1".into());
            }
            // Put the slice back where it came from, zeros around it.
            let mut pads = vec![0i64; 2 * rank];
            for r in &ranges {
                let len = r.len();
                pads[r.axis] = if len == 0 { r.size } else { r.start };
                pads[rank + r.axis] = r.size - pads[r.axis] - len;
            }
            let p = c.e.ints(&pads);
            out[0] = Some(c.e.node("Pad", &[g, &p], vec![]));
        }
        "Resize" => {
            let rank = c.shape(x)?.len();
            let maps = resize::axis_maps(node, c.shape(x)?, c.consts)?;
            let mut grad = g.to_string();
            for m in maps {
                let (o, i) = (m.output as i64, m.input as i64);
                grad = if m.axis + 1 == rank {
                    // [.., out] · [out, in]
                    let w = c.e.floats(&[o, i], &m.weights);
                    c.e.node("MatMul", &[&grad, &w], vec![])
                } else if m.axis + 2 == rank {
                    // [in, out] · [.., out, k]
                    let wt = transposed(&m.weights, m.output, m.input);
                    let w = c.e.floats(&[i, o], &wt);
                    c.e.node("MatMul", &[&w, &grad], vec![])
                } else {
                    // Move the axis last, apply, move it back.
                    let mut perm: Vec<i64> =
                        (0..rank as i64).filter(|a| *a != m.axis as i64).collect();
                    perm.push(m.axis as i64);
                    let mut inverse = vec![0i64; rank];
                    for (k, &p) in perm.iter().enumerate() {
                        inverse[p as usize] = k as i64;
                    }
                    let moved = c.e.transpose(&grad, &perm);
                    let w = c.e.floats(&[o, i], &m.weights);
                    let applied = c.e.node("MatMul", &[&moved, &w], vec![]);
                    c.e.transpose(&applied, &inverse)
                };
            }
            out[0] = Some(grad);
        }
        "Dropout" => {
            // The derivation turned the node into training mode with its mask as a second
            // output: the gradient passes where the mask kept the value, scaled alike.
            let mask = node
                .output
                .get(1)
                .filter(|s| !s.is_empty())
                .ok_or("Dropout needs its mask output for the gradient")?;
            let ratio = dropout_ratio(node, c.consts)?;
            let kept = c.e.node(
                "Cast",
                &[mask],
                vec![AttributeProto::int("to", FLOAT as i64)],
            );
            let scale = c.e.scalar(1.0 / (1.0 - ratio));
            let scaled = c.e.mul(&kept, &scale);
            out[0] = Some(c.e.mul(g, &scaled));
        }
        other => return Err(format!("no gradient rule for {other}")),
    }
    Ok(out)
}

fn conv_backward(
    c: &mut Ctx<'_>,
    node: &NodeProto,
    g: &str,
    needs: &[bool],
    out: &mut [Option<String>],
) -> Result<(), String> {
    let need = |i: usize| needs.get(i).copied().unwrap_or(false);
    let transposed = node.op() == "ConvTranspose";
    let (x, w) = (input(node, 0), input(node, 1));
    let y = node.output[0].as_str();
    let ws = c.known(w, "the convolution weight")?;
    let spatial = ws.len() - 2;
    let kernel = ws[2..].to_vec();
    let win = Window::of(node, kernel.clone())?;
    let group = node.attr_int("group").unwrap_or(1);
    let window_attrs = |strides: &[i64], dilations: &[i64], pads: &[i64]| {
        vec![
            AttributeProto::ints("strides", strides),
            AttributeProto::ints("dilations", dilations),
            AttributeProto::ints("pads", pads),
            AttributeProto::int("group", group),
        ]
    };
    if need(0) {
        if transposed {
            // The adjoint of a transposed convolution is the convolution.
            out[0] = Some(c.e.node(
                "Conv",
                &[g, w],
                window_attrs(&win.strides, &win.dilations, &win.pads),
            ));
        } else if group == 1
            && win.strides.iter().all(|s| *s == 1)
            && (0..spatial).all(|i| {
                let reach = win.dilations[i] * (kernel[i] - 1);
                win.pads[i] <= reach && win.pads[spatial + i] <= reach
            })
        {
            // Stride 1: the adjoint is itself a convolution, with the kernel flipped and its
            // channel axes swapped, padded by what the forward pass did not pad. ONNX Runtime
            // runs Conv much faster than ConvTranspose.
            let axes: Vec<i64> = (2..spatial as i64 + 2).collect();
            let (st, en, ax, sp) = (
                c.e.ints(&vec![-1; spatial]),
                c.e.ints(&vec![i64::MIN; spatial]),
                c.e.ints(&axes),
                c.e.ints(&vec![-1; spatial]),
            );
            let flipped = c.e.node("Slice", &[w, &st, &en, &ax, &sp], vec![]);
            let mut swap: Vec<i64> = vec![1, 0];
            swap.extend(2..(spatial as i64 + 2));
            let adjoint = c.e.transpose(&flipped, &swap);
            let pads: Vec<i64> = (0..2 * spatial)
                .map(|j| win.dilations[j % spatial] * (kernel[j % spatial] - 1) - win.pads[j])
                .collect();
            out[0] = Some(c.e.node(
                "Conv",
                &[g, &adjoint],
                window_attrs(&win.strides, &win.dilations, &pads),
            ));
        } else {
            // The adjoint of a convolution is the transposed convolution; output_padding
            // restores input positions the strided forward pass never reached.
            let xs = c.spatial(x, "the convolution input")?;
            let ys = c.spatial(y, "the convolution output")?;
            let output_padding: Vec<i64> = (0..spatial)
                .map(|i| {
                    let reached =
                        win.strides[i] * (ys[i] - 1) + win.dilations[i] * (kernel[i] - 1) + 1
                            - win.pads[i]
                            - win.pads[spatial + i];
                    xs[i] - reached
                })
                .collect();
            let mut attrs = window_attrs(&win.strides, &win.dilations, &win.pads);
            attrs.push(AttributeProto::ints("output_padding", &output_padding));
            out[0] = Some(c.e.node("ConvTranspose", &[g, w], attrs));
        }
    }
    if need(1) {
        // The weight gradient as one batched matrix product per group (im2col): the windows
        // of the convolution's input (of the output gradient, for a transposed convolution)
        // at every kernel offset, against the other operand. ONNX Runtime runs it as GEMMs;
        // the textbook alternative, a correlation with batch and channel axes swapped, has a
        // kernel as large as the image and measured several times slower.
        let xs_ = c.spatial(x, "the convolution input")?;
        let ys_ = c.spatial(y, "the convolution output")?;
        let channels = |c: &mut Ctx<'_>, t: &str, what: &str| match c.shape(t)?.get(1) {
            Some(Dim::Known(v)) if v % group == 0 => Ok(*v / group),
            _ => Err(format!(
                "{what} needs a static channel count divisible by the groups"
            )),
        };
        let (cx, cy) = (
            channels(c, x, "the convolution input")?,
            channels(c, y, "the convolution output")?,
        );
        let split = |c: &mut Ctx<'_>, t: &str, per_group: i64| {
            if group == 1 {
                return vec![t.to_string()];
            }
            let sizes = c.e.ints(&vec![per_group; group as usize]);
            c.e.node_n(
                "Split",
                &[t, &sizes],
                group as usize,
                vec![AttributeProto::int("axis", 1)],
            )
        };
        let (xparts, gparts) = (split(c, x, cx), split(c, g, cy));
        let mut per_group = Vec::with_capacity(xparts.len());
        for (xp, gp) in xparts.iter().zip(&gparts) {
            // Conv: w[o, i, k] = Σ g[n, o, p] · x_pad[n, i, s·p + d·k].
            // ConvTranspose: w[i, o, k] = Σ x[n, i, p] · g_pad[n, o, s·p + d·k].
            let (left, a, src, b, grid) = if transposed {
                (xp, cx, gp, cy, &xs_)
            } else {
                (gp, cy, xp, cx, &ys_)
            };
            let prod = window_product(c, left, a, src, b, grid, &kernel, &win);
            let mut dims = vec![a, b];
            dims.extend(&kernel);
            per_group.push(c.e.reshape(&prod, &dims));
        }
        out[1] = Some(if per_group.len() == 1 {
            per_group.remove(0)
        } else {
            let refs: Vec<&str> = per_group.iter().map(String::as_str).collect();
            c.e.node("Concat", &refs, vec![AttributeProto::int("axis", 0)])
        });
    }
    if need(2) {
        let axes: Vec<i64> = std::iter::once(0).chain(2..spatial as i64 + 2).collect();
        out[2] = Some(c.e.reduce_sum(g, &axes, false));
    }
    Ok(())
}

/// `w[a, b, k] = Σ_n Σ_p left[n, a, p] · window_k(src)[n, b, p]` as `[a, b, K]`: `left` is
/// `[N, a, grid…]`; the window of kernel offset k is the part of `src` (`[N, b, …]`, padded by
/// the window's pads) that offset sees across the grid (start `d·k`, step `s`). One batched
/// MatMul per offset straight on the strided slice (no im2col buffer), summed over samples.
#[allow(clippy::too_many_arguments)]
fn window_product(
    c: &mut Ctx<'_>,
    left: &str,
    a: i64,
    src: &str,
    b: i64,
    grid: &[i64],
    kernel: &[i64],
    win: &Window,
) -> String {
    let spatial = kernel.len();
    let cells: i64 = grid.iter().product();
    let offsets: Vec<Vec<i64>> = kernel.iter().fold(vec![vec![]], |acc, &k| {
        acc.into_iter()
            .flat_map(|prefix| {
                (0..k).map(move |o| {
                    let mut v = prefix.clone();
                    v.push(o);
                    v
                })
            })
            .collect()
    });
    let padded = if win.pads.iter().any(|p| *p != 0) {
        let mut pads = vec![0i64, 0];
        pads.extend(&win.pads[..spatial]);
        pads.extend([0, 0]);
        pads.extend(&win.pads[spatial..]);
        let p = c.e.ints(&pads);
        c.e.node("Pad", &[src, &p], vec![])
    } else {
        src.to_string()
    };
    let l = c.e.reshape(left, &[0, a, cells]);
    let axes: Vec<i64> = (2..spatial as i64 + 2).collect();
    let (axes, steps) = (c.e.ints(&axes), c.e.ints(&win.strides));
    let per_offset: Vec<String> = offsets
        .iter()
        .map(|off| {
            let starts: Vec<i64> = (0..spatial).map(|i| win.dilations[i] * off[i]).collect();
            let ends: Vec<i64> = (0..spatial)
                .map(|i| starts[i] + win.strides[i] * (grid[i] - 1) + 1)
                .collect();
            let whole = (0..spatial).all(|i| starts[i] == 0 && win.strides[i] == 1)
                && c.shape(src).ok().and_then(|s| known(&s[2..])).as_deref() == Some(grid);
            let window = if whole && padded == src {
                padded.clone()
            } else {
                let (st, en) = (c.e.ints(&starts), c.e.ints(&ends));
                c.e.node("Slice", &[&padded, &st, &en, &axes, &steps], vec![])
            };
            let cols = c.e.reshape(&window, &[0, b, cells]);
            let ct = c.e.transpose(&cols, &[0, 2, 1]);
            let per_sample = c.e.node("MatMul", &[&l, &ct], vec![]);
            // [a, b, 1]
            let summed = c.e.reduce_sum(&per_sample, &[0], false);
            c.e.reshape(&summed, &[a, b, 1])
        })
        .collect();
    if per_offset.len() == 1 {
        return per_offset[0].clone();
    }
    let refs: Vec<&str> = per_offset.iter().map(String::as_str).collect();
    c.e.node("Concat", &refs, vec![AttributeProto::int("axis", 2)])
}
