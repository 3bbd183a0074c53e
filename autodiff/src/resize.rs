//! ONNX `Resize` (nearest and linear) as what it is along each axis: a fixed linear map, an
//! `out × in` matrix of interpolation weights. The gradient rule multiplies the output gradient
//! by the transposed matrices, so it honours every coordinate transformation and rounding mode
//! the forward op uses; the finite-difference check compares it with ONNX Runtime's own
//! forward pass.
//!
//! Owns the reading of Resize's inputs and attributes and the weights; emits no nodes.

use crate::onnx::{Dim, NodeProto};
use crate::shapes::{Consts, Shape};

/// One resized axis: `weights[o * input + i]` is how much input position `i` contributes to
/// output position `o`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct AxisMap {
    pub axis: usize,
    pub input: usize,
    pub output: usize,
    pub weights: Vec<f32>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Mode {
    Nearest,
    Linear,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Transform {
    HalfPixel,
    PytorchHalfPixel,
    AlignCorners,
    Asymmetric,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Rounding {
    RoundPreferFloor,
    RoundPreferCeil,
    Floor,
    Ceil,
}

/// Output shape and per-axis scales (as ONNX Runtime computes them, in f32).
fn resolve(node: &NodeProto, x: &[Dim], consts: &Consts) -> Result<(Shape, Vec<f32>), String> {
    let rank = x.len();
    let axes: Vec<usize> = match node.attr_ints("axes") {
        Some(a) => a
            .iter()
            .map(|&v| crate::shapes::axis(v, rank))
            .collect::<Result<_, _>>()?,
        None => (0..rank).collect(),
    };
    if node
        .attr_string("keep_aspect_ratio_policy")
        .is_some_and(|p| p != "stretch")
    {
        return Err("Resize keep_aspect_ratio_policy other than stretch".into());
    }
    // An input may be omitted (empty name) or an empty constant; anything else must be a
    // constant the derivation can read.
    let given = |i: usize| node.input.get(i).is_some_and(|n| !n.is_empty());
    let scales = if given(2) {
        let s = consts
            .floats_of(node, 2)
            .ok_or("Resize scales must be constant")?;
        (!s.is_empty()).then_some(s)
    } else {
        None
    };
    let sizes = if given(3) {
        let s = consts
            .ints_of(node, 3)
            .ok_or("Resize sizes must be constant")?;
        (!s.is_empty()).then_some(s)
    } else {
        None
    };
    let mut out: Shape = x.to_vec();
    let mut per_axis = vec![1.0f32; rank];
    match (scales, sizes) {
        (Some(s), None) => {
            if s.len() != axes.len() {
                return Err(format!(
                    "Resize has {} scales for {} axes",
                    s.len(),
                    axes.len()
                ));
            }
            for (&a, &scale) in axes.iter().zip(s) {
                if !(scale.is_finite() && scale > 0.0) {
                    return Err(format!("Resize scale {scale} is not positive"));
                }
                per_axis[a] = scale;
                if scale != 1.0 {
                    let Dim::Known(d) = x[a] else {
                        return Err(format!("Resize needs a static size along axis {a}"));
                    };
                    out[a] = Dim::Known((d as f32 * scale).floor() as i64);
                }
            }
        }
        (None, Some(z)) => {
            if z.len() != axes.len() {
                return Err(format!(
                    "Resize has {} sizes for {} axes",
                    z.len(),
                    axes.len()
                ));
            }
            for (&a, &size) in axes.iter().zip(z) {
                if size < 1 {
                    return Err(format!("Resize size {size} is not positive"));
                }
                match x[a] {
                    Dim::Known(d) => {
                        per_axis[a] = size as f32 / d as f32;
                        out[a] = Dim::Known(size);
                    }
                    Dim::Named(_) => {
                        return Err(format!("Resize needs a static size along axis {a}"));
                    }
                }
            }
        }
        (Some(_), Some(_)) => return Err("Resize with both scales and sizes".into()),
        (None, None) => return Err("Resize without scales or sizes".into()),
    }
    if out.iter().any(|d| matches!(d, Dim::Known(v) if *v < 1)) {
        return Err("Resize to an empty tensor".into());
    }
    Ok((out, per_axis))
}

/// The output shape of a Resize node.
pub(crate) fn output_sizes(node: &NodeProto, x: &[Dim], consts: &Consts) -> Result<Shape, String> {
    resolve(node, x, consts).map(|(out, _)| out)
}

/// The interpolation matrix of every axis the node changes (identity axes are left out).
pub(crate) fn axis_maps(
    node: &NodeProto,
    x: &[Dim],
    consts: &Consts,
) -> Result<Vec<AxisMap>, String> {
    let mode = match node.attr_string("mode").as_deref().unwrap_or("nearest") {
        "nearest" => Mode::Nearest,
        "linear" => Mode::Linear,
        other => return Err(format!("Resize mode {other}")),
    };
    let transform = match node
        .attr_string("coordinate_transformation_mode")
        .as_deref()
        .unwrap_or("half_pixel")
    {
        "half_pixel" => Transform::HalfPixel,
        "pytorch_half_pixel" => Transform::PytorchHalfPixel,
        "align_corners" => Transform::AlignCorners,
        "asymmetric" => Transform::Asymmetric,
        other => return Err(format!("Resize coordinate_transformation_mode {other}")),
    };
    let rounding = match node
        .attr_string("nearest_mode")
        .as_deref()
        .unwrap_or("round_prefer_floor")
    {
        "round_prefer_floor" => Rounding::RoundPreferFloor,
        "round_prefer_ceil" => Rounding::RoundPreferCeil,
        "floor" => Rounding::Floor,
        "ceil" => Rounding::Ceil,
        other => return Err(format!("Resize nearest_mode {other}")),
    };
    if node.attr_int("antialias").unwrap_or(0) != 0 {
        return Err("Resize with antialias".into());
    }
    let (out, scales) = resolve(node, x, consts)?;
    let mut maps = Vec::new();
    for a in 0..x.len() {
        let (Dim::Known(input), Dim::Known(output)) = (&x[a], &out[a]) else {
            continue; // a named axis keeps its size (scale 1): the identity
        };
        let (input, output) = (*input as usize, *output as usize);
        let weights = axis_weights(mode, transform, rounding, scales[a], input, output);
        let identity = input == output
            && (0..output).all(|o| {
                (0..input).all(|i| weights[o * input + i] == if o == i { 1.0 } else { 0.0 })
            });
        if !identity {
            maps.push(AxisMap {
                axis: a,
                input,
                output,
                weights,
            });
        }
    }
    Ok(maps)
}

/// Weights of one axis, following the ONNX specification (and ONNX Runtime's f32
/// arithmetic): the output position is mapped back to an input coordinate, clamped to the
/// input, then rounded (nearest) or split between its two neighbours (linear).
fn axis_weights(
    mode: Mode,
    transform: Transform,
    rounding: Rounding,
    scale: f32,
    input: usize,
    output: usize,
) -> Vec<f32> {
    let mut w = vec![0.0f32; output * input];
    let last = (input - 1) as f32;
    for o in 0..output {
        let xo = o as f32;
        let xi = match transform {
            Transform::HalfPixel => (xo + 0.5) / scale - 0.5,
            Transform::PytorchHalfPixel => {
                if output > 1 {
                    (xo + 0.5) / scale - 0.5
                } else {
                    0.0
                }
            }
            Transform::AlignCorners => {
                if output == 1 {
                    0.0
                } else {
                    xo * last / (output - 1) as f32
                }
            }
            Transform::Asymmetric => xo / scale,
        };
        match mode {
            Mode::Nearest => {
                let r = match rounding {
                    Rounding::RoundPreferFloor => {
                        if xi == xi.floor() + 0.5 {
                            xi.floor()
                        } else {
                            xi.round()
                        }
                    }
                    Rounding::RoundPreferCeil => {
                        if xi == xi.floor() + 0.5 {
                            xi.ceil()
                        } else {
                            xi.round()
                        }
                    }
                    Rounding::Floor => xi.floor(),
                    Rounding::Ceil => xi.ceil(),
                };
                let i = r.clamp(0.0, last) as usize;
                w[o * input + i] = 1.0;
            }
            Mode::Linear => {
                let xc = xi.clamp(0.0, last);
                let lo = (xc as usize).min(input - 1);
                let hi = (lo + 1).min(input - 1);
                let frac = xc - lo as f32;
                w[o * input + lo] += 1.0 - frac;
                w[o * input + hi] += frac;
            }
        }
    }
    w
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(w: &[f32], input: usize) -> Vec<Vec<f32>> {
        w.chunks(input).map(<[f32]>::to_vec).collect()
    }

    #[test]
    fn nearest_doubling_repeats_each_position() {
        for (t, r) in [
            (Transform::Asymmetric, Rounding::Floor),
            (Transform::HalfPixel, Rounding::RoundPreferFloor),
        ] {
            let w = axis_weights(Mode::Nearest, t, r, 2.0, 3, 6);
            let picked: Vec<usize> = rows(&w, 3)
                .iter()
                .map(|row| row.iter().position(|v| *v == 1.0).unwrap())
                .collect();
            assert_eq!(picked, vec![0, 0, 1, 1, 2, 2], "{t:?} {r:?}");
        }
    }

    #[test]
    fn linear_rows_sum_to_one_and_match_hand_values() {
        // half_pixel, 2 -> 4: coordinates -0.25, 0.25, 0.75, 1.25 clamp to 0, 0.25, 0.75, 1.
        let w = axis_weights(
            Mode::Linear,
            Transform::HalfPixel,
            Rounding::RoundPreferFloor,
            2.0,
            2,
            4,
        );
        assert_eq!(
            rows(&w, 2),
            vec![
                vec![1.0, 0.0],
                vec![0.75, 0.25],
                vec![0.25, 0.75],
                vec![0.0, 1.0]
            ]
        );
        // align_corners, 3 -> 5: coordinates 0, 0.5, 1, 1.5, 2.
        let w = axis_weights(
            Mode::Linear,
            Transform::AlignCorners,
            Rounding::RoundPreferFloor,
            5.0 / 3.0,
            3,
            5,
        );
        for row in rows(&w, 3) {
            assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        }
        assert_eq!(rows(&w, 3)[1], vec![0.5, 0.5, 0.0]);
    }
}
