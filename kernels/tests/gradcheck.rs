//! Finite-difference checks of every backward rule and every loss: small graphs whose operands
//! are all trainable weights, random shapes and attributes from fixed seeds, the derived
//! training graph run by ONNX Runtime, and each gradient element compared with the central
//! difference of the loss the same graph computes (float32, step 1e-2).
//!
//! Tolerance: the largest element error must stay under 2% of the largest gradient element
//! (float32 central differences at this step are good to about 1e-4 relative here; a wrong
//! rule is off by O(1)). Operands of kinked ops (Relu, MaxPool) are kept away from their kinks
//! by construction so the difference never straddles one.
//!
//! Needs ONNX Runtime (`scripts/setup.sh`); without it the tests fail under CI and are
//! skipped locally.

use amicus_autodiff::onnx::{
    AttributeProto, Dim, FLOAT, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, TensorProto,
    ValueInfoProto,
};
use amicus_autodiff::{Loss, Spec, derive};
use amicus_kernels::{Session, Tensor};

/// SplitMix64 for reproducible test data.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn uniform(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32
    }

    /// Roughly N(0, 1).
    fn normal(&mut self) -> f32 {
        (0..4).map(|_| self.uniform()).sum::<f32>() * 1.732 - 3.464
    }

    fn below(&mut self, n: u64) -> i64 {
        (self.next() % n) as i64
    }

    fn values(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.normal()).collect()
    }

    /// Values at least 0.1 away from 0 (for kinks at 0).
    fn away_from_zero(&mut self, n: usize) -> Vec<f32> {
        (0..n)
            .map(|_| {
                let v = self.normal();
                if v.abs() < 0.1 {
                    v.signum() * (0.1 + v.abs())
                } else {
                    v
                }
            })
            .collect()
    }

    /// Distinct values 0.1 apart, shuffled (no ties for max pooling).
    fn distinct(&mut self, n: usize) -> Vec<f32> {
        let mut v: Vec<f32> = (0..n).map(|i| i as f32 * 0.1 - n as f32 * 0.05).collect();
        for i in (1..n).rev() {
            v.swap(i, self.below(i as u64 + 1) as usize);
        }
        v
    }
}

fn ready() -> bool {
    match amicus_kernels::available() {
        Ok(()) => true,
        Err(e) => {
            assert!(std::env::var_os("CI").is_none(), "{e}");
            eprintln!("skipped: {e}");
            false
        }
    }
}

/// A model whose graph is `nodes`, with `weights` as float initializers and `output`.
struct Graph {
    nodes: Vec<NodeProto>,
    initializers: Vec<TensorProto>,
    output: String,
}

impl Graph {
    fn new() -> Graph {
        Graph {
            nodes: Vec::new(),
            initializers: Vec::new(),
            output: String::new(),
        }
    }

    fn weight(&mut self, name: &str, dims: &[i64], values: Vec<f32>) -> String {
        assert_eq!(dims.iter().product::<i64>() as usize, values.len());
        self.initializers
            .push(TensorProto::floats(name, dims, &values));
        name.to_string()
    }

    fn ints(&mut self, name: &str, values: &[i64]) -> String {
        self.initializers
            .push(TensorProto::ints(name, &[values.len() as i64], values));
        name.to_string()
    }

    fn node(&mut self, op: &str, inputs: &[&str], attrs: Vec<AttributeProto>) -> String {
        let out = format!("{op}_{}", self.nodes.len());
        self.nodes.push(NodeProto {
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![out.clone()],
            name: Some(format!("n{}", self.nodes.len())),
            op_type: Some(op.into()),
            attribute: attrs,
            ..Default::default()
        });
        self.output = out.clone();
        out
    }

    /// A float constant (scales, ratios): an initializer no gradient reaches, so not trained.
    fn floats(&mut self, name: &str, dims: &[i64], values: &[f32]) -> String {
        self.initializers
            .push(TensorProto::floats(name, dims, values));
        name.to_string()
    }

    /// A node with `n` outputs; the last becomes the graph's output.
    fn node_n(
        &mut self,
        op: &str,
        inputs: &[&str],
        n: usize,
        attrs: Vec<AttributeProto>,
    ) -> Vec<String> {
        let outs: Vec<String> = (0..n)
            .map(|i| format!("{op}_{}_{i}", self.nodes.len()))
            .collect();
        self.nodes.push(NodeProto {
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: outs.clone(),
            name: Some(format!("n{}", self.nodes.len())),
            op_type: Some(op.into()),
            attribute: attrs,
            ..Default::default()
        });
        self.output = outs[n - 1].clone();
        outs
    }

    fn model(&self) -> ModelProto {
        ModelProto {
            ir_version: Some(10),
            opset_import: vec![OperatorSetIdProto {
                domain: Some(String::new()),
                version: Some(18),
            }],
            graph: Some(GraphProto {
                node: self.nodes.clone(),
                name: Some("test".into()),
                initializer: self.initializers.clone(),
                input: vec![],
                output: vec![ValueInfoProto::tensor(
                    &self.output,
                    FLOAT,
                    &[Dim::Named("?".into())],
                )],
                ..Default::default()
            }),
            ..Default::default()
        }
    }
}

/// Derive the training graph of `g` for `loss`, run it, and compare every weight's gradient
/// with central differences. Returns the worst relative error.
fn check(what: &str, g: &Graph, loss: Loss, seed: u64) -> f64 {
    let model = g.model();
    let spec = Spec {
        trainable: None,
        prediction: None,
        loss,
        seed: 0,
    };
    let tg = derive(&model, &spec).unwrap_or_else(|e| panic!("{what}: {e}"));
    let bytes = tg.model.to_bytes();
    let mut session = Session::from_bytes(&bytes, 1).unwrap_or_else(|e| panic!("{what}: {e}"));
    // The prediction's shape gives the labels' shape.
    let mut feeds: Vec<(String, Tensor)> = tg
        .weights
        .iter()
        .map(|w| {
            (
                w.name.clone(),
                Tensor::new(
                    w.shape.iter().map(|d| *d as usize).collect(),
                    w.initial.clone(),
                ),
            )
        })
        .collect();
    // Running statistics are fed as they are (never perturbed: they are not differentiated).
    feeds.extend(tg.state.iter().map(|st| {
        (
            st.name.clone(),
            Tensor::new(
                st.shape.iter().map(|d| *d as usize).collect(),
                st.initial.clone(),
            ),
        )
    }));
    // The forward model (weights as initializers, no inputs) gives the labels' shape.
    let prediction_shape = {
        let mut forward = Session::from_bytes(&model.to_bytes(), 1).unwrap();
        let out = forward
            .run(&[], &[])
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        out[0].1.shape.clone()
    };
    let mut rng = Rng(seed ^ 0xABCD);
    let n: usize = prediction_shape.iter().product();
    let labels = match &spec.loss {
        Loss::CrossEntropy => {
            // One-hot along axis 1.
            let classes = prediction_shape[1];
            let inner: usize = prediction_shape[2..].iter().product();
            let mut t = vec![0.0; n];
            for outer in 0..prediction_shape[0] {
                for i in 0..inner {
                    let k = rng.below(classes as u64) as usize;
                    t[(outer * classes + k) * inner + i] = 1.0;
                }
            }
            t
        }
        Loss::BceWithLogits | Loss::SoftDice => {
            (0..n).map(|_| (rng.uniform() > 0.5) as u8 as f32).collect()
        }
        _ => rng.values(n),
    };
    let labels = Tensor::new(prediction_shape, labels);
    let loss_of = |session: &mut Session, feeds: &[(String, Tensor)]| -> f64 {
        let mut inputs: Vec<(&str, &Tensor)> = feeds.iter().map(|(n, t)| (n.as_str(), t)).collect();
        inputs.push(("labels", &labels));
        f64::from(session.run(&inputs, &["loss"]).unwrap()[0].1.data[0])
    };
    let mut inputs: Vec<(&str, &Tensor)> = feeds.iter().map(|(n, t)| (n.as_str(), t)).collect();
    inputs.push(("labels", &labels));
    let wanted: Vec<&str> = tg.weights.iter().map(|w| w.grad.as_str()).collect();
    let grads = session
        .run(&inputs, &wanted)
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    let eps = 1e-2f32;
    let mut worst = 0.0f64;
    for (wi, w) in tg.weights.iter().enumerate() {
        let analytic = &grads[wi].1.data;
        let mut numeric = vec![0.0f64; analytic.len()];
        for (i, fd) in numeric.iter_mut().enumerate() {
            let old = feeds[wi].1.data[i];
            feeds[wi].1.data[i] = old + eps;
            let plus = loss_of(&mut session, &feeds);
            feeds[wi].1.data[i] = old - eps;
            let minus = loss_of(&mut session, &feeds);
            feeds[wi].1.data[i] = old;
            *fd = (plus - minus) / (2.0 * f64::from(eps));
        }
        let scale = numeric.iter().fold(1e-6f64, |m, v| m.max(v.abs()));
        let err = analytic
            .iter()
            .zip(&numeric)
            .map(|(a, n)| (f64::from(*a) - n).abs() / scale)
            .fold(0.0, f64::max);
        assert!(
            err < 2e-2,
            "{what}: gradient of {} off by {err:.2e} of its scale {scale:.2e}\nanalytic {analytic:?}\nnumeric  {numeric:?}",
            w.name
        );
        worst = worst.max(err);
    }
    eprintln!("{what}: worst element error {worst:.1e} of the gradient's scale");
    worst
}

fn dims(v: &[i64]) -> usize {
    v.iter().product::<i64>() as usize
}

#[test]
fn elementwise_rules_with_broadcasting() {
    if !ready() {
        return;
    }
    for seed in 0..4u64 {
        let mut rng = Rng(seed);
        // Random shapes: b broadcasts against a along a random subset of axes, and may have
        // fewer dims.
        let rank = 1 + rng.below(3) as usize;
        let a_dims: Vec<i64> = (0..rank).map(|_| 1 + rng.below(4)).collect();
        let mut b_dims: Vec<i64> = a_dims
            .iter()
            .map(|d| if rng.below(2) == 0 { 1 } else { *d })
            .collect();
        if rng.below(2) == 0 && b_dims.len() > 1 {
            b_dims.remove(0);
        }
        for op in ["Add", "Sub", "Mul", "Div"] {
            let mut g = Graph::new();
            let a = g.weight("a", &a_dims, rng.values(dims(&a_dims)));
            let b_values = if op == "Div" {
                rng.values(dims(&b_dims))
                    .iter()
                    .map(|v| v.signum() * (1.0 + v.abs()))
                    .collect()
            } else {
                rng.values(dims(&b_dims))
            };
            let b = g.weight("b", &b_dims, b_values);
            g.node(op, &[&a, &b], vec![]);
            check(&format!("{op} {a_dims:?} {b_dims:?}"), &g, Loss::Mse, seed);
        }
    }
}

#[test]
fn unary_rules() {
    if !ready() {
        return;
    }
    for seed in 0..2u64 {
        let mut rng = Rng(seed + 10);
        let shape = [2, 1 + rng.below(3), 1 + rng.below(4)];
        let n = dims(&shape);
        for op in [
            "Identity",
            "Neg",
            "Relu",
            "LeakyRelu",
            "Sigmoid",
            "Tanh",
            "Exp",
            "Log",
            "Sqrt",
            "Softplus",
        ] {
            let mut g = Graph::new();
            let values = match op {
                "Log" | "Sqrt" => rng.values(n).iter().map(|v| 0.5 + v.abs()).collect(),
                _ => rng.away_from_zero(n),
            };
            let x = g.weight("x", &shape, values);
            let attrs = if op == "LeakyRelu" {
                vec![AttributeProto::float("alpha", 0.2)]
            } else {
                vec![]
            };
            g.node(op, &[&x], attrs);
            check(&format!("{op} {shape:?}"), &g, Loss::Mse, seed);
        }
    }
}

#[test]
fn softmax_rules_on_every_axis() {
    if !ready() {
        return;
    }
    let mut rng = Rng(20);
    let shape = [2, 3, 4];
    for op in ["Softmax", "LogSoftmax"] {
        for axis in [-1i64, 0, 1, 2] {
            let mut g = Graph::new();
            let x = g.weight("x", &shape, rng.values(24));
            g.node(op, &[&x], vec![AttributeProto::int("axis", axis)]);
            check(&format!("{op} axis {axis}"), &g, Loss::Mse, 20);
        }
    }
}

#[test]
fn matmul_and_gemm_rules() {
    if !ready() {
        return;
    }
    for seed in 0..4u64 {
        let mut rng = Rng(seed + 30);
        let (m, k, n) = (1 + rng.below(3), 1 + rng.below(4), 1 + rng.below(3));
        // MatMul, rank 2 and rank 3 on the left.
        for batched in [false, true] {
            let mut g = Graph::new();
            let a_dims: Vec<i64> = if batched { vec![2, m, k] } else { vec![m, k] };
            let a = g.weight("a", &a_dims, rng.values(dims(&a_dims)));
            let b = g.weight("b", &[k, n], rng.values(dims(&[k, n])));
            g.node("MatMul", &[&a, &b], vec![]);
            check(
                &format!("MatMul {a_dims:?} x [{k}, {n}]"),
                &g,
                Loss::Mse,
                seed,
            );
        }
        // Gemm with every transposition, alpha, beta and a broadcast bias.
        for (ta, tb) in [(0, 0), (0, 1), (1, 0), (1, 1)] {
            let mut g = Graph::new();
            let a_dims = if ta == 1 { [k, m] } else { [m, k] };
            let b_dims = if tb == 1 { [n, k] } else { [k, n] };
            let a = g.weight("a", &a_dims, rng.values(dims(&a_dims)));
            let b = g.weight("b", &b_dims, rng.values(dims(&b_dims)));
            let c = g.weight("c", &[n], rng.values(n as usize));
            g.node(
                "Gemm",
                &[&a, &b, &c],
                vec![
                    AttributeProto::int("transA", ta),
                    AttributeProto::int("transB", tb),
                    AttributeProto::float("alpha", 0.7),
                    AttributeProto::float("beta", 1.3),
                ],
            );
            check(
                &format!("Gemm transA={ta} transB={tb}"),
                &g,
                Loss::Mse,
                seed,
            );
        }
    }
}

#[test]
fn convolution_rules_with_strides_pads_and_dilations() {
    if !ready() {
        return;
    }
    for seed in 0..6u64 {
        let mut rng = Rng(seed + 40);
        let spatial = if seed % 3 == 2 { 1 } else { 2 };
        let (n, c, m) = (1 + rng.below(2), 1 + rng.below(2), 1 + rng.below(3));
        let kernel: Vec<i64> = (0..spatial).map(|_| 1 + rng.below(3)).collect();
        let strides: Vec<i64> = (0..spatial).map(|_| 1 + rng.below(2)).collect();
        let dilations: Vec<i64> = (0..spatial).map(|_| 1 + rng.below(2)).collect();
        let pads: Vec<i64> = (0..2 * spatial).map(|_| rng.below(2)).collect();
        let size: Vec<i64> = (0..spatial).map(|_| 5 + rng.below(3)).collect();
        let attrs = || {
            vec![
                AttributeProto::ints("strides", &strides),
                AttributeProto::ints("dilations", &dilations),
                AttributeProto::ints("pads", &pads),
            ]
        };
        let what = format!(
            "kernel {kernel:?} strides {strides:?} dilations {dilations:?} pads {pads:?} input {size:?}"
        );
        // Conv.
        let mut g = Graph::new();
        let mut x_dims = vec![n, c];
        x_dims.extend(&size);
        let mut w_dims = vec![m, c];
        w_dims.extend(&kernel);
        let x = g.weight("x", &x_dims, rng.values(dims(&x_dims)));
        let w = g.weight("w", &w_dims, rng.values(dims(&w_dims)));
        let b = g.weight("b", &[m], rng.values(m as usize));
        g.node("Conv", &[&x, &w, &b], attrs());
        check(&format!("Conv {what}"), &g, Loss::Mse, seed);
        // ConvTranspose (weight [C_in, C_out, k...]).
        let mut g = Graph::new();
        let mut wt_dims = vec![c, m];
        wt_dims.extend(&kernel);
        let x = g.weight("x", &x_dims, rng.values(dims(&x_dims)));
        let w = g.weight("w", &wt_dims, rng.values(dims(&wt_dims)));
        let b = g.weight("b", &[m], rng.values(m as usize));
        g.node("ConvTranspose", &[&x, &w, &b], attrs());
        check(&format!("ConvTranspose {what}"), &g, Loss::Mse, seed);
    }
}

#[test]
fn pooling_rules() {
    if !ready() {
        return;
    }
    for seed in 0..4u64 {
        let mut rng = Rng(seed + 50);
        let k = 2 + rng.below(2);
        let s = 1 + rng.below(2);
        let p = rng.below(2).min(k - 1);
        let size = [1 + rng.below(2), 2, 5 + rng.below(3), 4 + rng.below(3)];
        let n = dims(&size);
        // MaxPool: overlapping windows, pads.
        let mut g = Graph::new();
        let x = g.weight("x", &size, rng.distinct(n));
        g.node(
            "MaxPool",
            &[&x],
            vec![
                AttributeProto::ints("kernel_shape", &[k, k]),
                AttributeProto::ints("strides", &[s, s]),
                AttributeProto::ints("pads", &[p, p, p, p]),
            ],
        );
        check(
            &format!("MaxPool k={k} s={s} p={p} {size:?}"),
            &g,
            Loss::Mse,
            seed,
        );
        // AveragePool with strides equal to the kernel (remainder rows dropped).
        let mut g = Graph::new();
        let x = g.weight("x", &size, rng.values(n));
        g.node(
            "AveragePool",
            &[&x],
            vec![
                AttributeProto::ints("kernel_shape", &[k, k]),
                AttributeProto::ints("strides", &[k, k]),
            ],
        );
        check(&format!("AveragePool k={k} {size:?}"), &g, Loss::Mse, seed);
        // GlobalAveragePool.
        let mut g = Graph::new();
        let x = g.weight("x", &size, rng.values(n));
        g.node("GlobalAveragePool", &[&x], vec![]);
        check(&format!("GlobalAveragePool {size:?}"), &g, Loss::Mse, seed);
    }
}

#[test]
fn shape_rules() {
    if !ready() {
        return;
    }
    let mut rng = Rng(60);
    let shape = [2, 3, 4];
    // Flatten at each axis.
    for axis in 0..3 {
        let mut g = Graph::new();
        let x = g.weight("x", &shape, rng.values(24));
        g.node("Flatten", &[&x], vec![AttributeProto::int("axis", axis)]);
        check(&format!("Flatten axis {axis}"), &g, Loss::Mse, 60);
    }
    // Reshape with -1 and 0.
    let mut g = Graph::new();
    let x = g.weight("x", &shape, rng.values(24));
    let s = g.ints("s", &[0, -1, 2]);
    g.node("Reshape", &[&x, &s], vec![]);
    check("Reshape [0, -1, 2]", &g, Loss::Mse, 60);
    // Transpose, default and explicit perm.
    for perm in [None, Some(vec![1i64, 2, 0])] {
        let mut g = Graph::new();
        let x = g.weight("x", &shape, rng.values(24));
        let attrs = perm
            .clone()
            .map(|p| vec![AttributeProto::ints("perm", &p)])
            .unwrap_or_default();
        g.node("Transpose", &[&x], attrs);
        check(&format!("Transpose {perm:?}"), &g, Loss::Mse, 60);
    }
    // Unsqueeze then Squeeze.
    let mut g = Graph::new();
    let x = g.weight("x", &shape, rng.values(24));
    let a = g.ints("a", &[1]);
    let u = g.node("Unsqueeze", &[&x, &a], vec![]);
    let t = g.node("Tanh", &[&u], vec![]);
    g.node("Squeeze", &[&t, &a], vec![]);
    check("Unsqueeze/Squeeze", &g, Loss::Mse, 60);
    // Concat of three along each axis, one operand used twice.
    for axis in 0..3i64 {
        let mut g = Graph::new();
        let mut part = |name: &str, rng: &mut Rng| {
            let mut d = shape.to_vec();
            d[axis as usize] = 1 + rng.below(3);
            g.weight(name, &d, rng.values(dims(&d)))
        };
        let (p, q) = (part("p", &mut rng), part("q", &mut rng));
        g.node(
            "Concat",
            &[&p, &q, &p],
            vec![AttributeProto::int("axis", axis)],
        );
        check(&format!("Concat axis {axis}"), &g, Loss::Mse, 60);
    }
    // ReduceSum and ReduceMean, kept and dropped axes.
    for op in ["ReduceSum", "ReduceMean"] {
        for keep in [0, 1] {
            let mut g = Graph::new();
            let x = g.weight("x", &shape, rng.values(24));
            let axes = g.ints("axes", &[0, 2]);
            g.node(
                op,
                &[&x, &axes],
                vec![AttributeProto::int("keepdims", keep)],
            );
            check(&format!("{op} keepdims={keep}"), &g, Loss::Mse, 60);
        }
    }
}

#[test]
fn every_loss() {
    if !ready() {
        return;
    }
    let mut rng = Rng(70);
    for (name, loss) in [
        ("mse", Loss::Mse),
        ("cross-entropy", Loss::CrossEntropy),
        ("bce-with-logits", Loss::BceWithLogits),
        ("soft dice", Loss::SoftDice),
        (
            "0.5 ce + 1.5 dice",
            Loss::Sum(vec![(0.5, Loss::CrossEntropy), (1.5, Loss::SoftDice)]),
        ),
    ] {
        // Classification logits [N, K] and segmentation logits [N, K, H, W].
        for shape in [vec![3i64, 4], vec![2, 2, 3, 3]] {
            let mut g = Graph::new();
            let x = g.weight("x", &shape, rng.values(dims(&shape)));
            g.node("Identity", &[&x], vec![]);
            check(&format!("{name} {shape:?}"), &g, loss.clone(), 70);
        }
    }
}

#[test]
fn a_small_cnn_end_to_end() {
    if !ready() {
        return;
    }
    let mut rng = Rng(80);
    let mut g = Graph::new();
    let x = g.weight("x", &[2, 1, 8, 8], rng.values(128));
    let w1 = g.weight("w1", &[3, 1, 3, 3], rng.values(27));
    let b1 = g.weight("b1", &[3], vec![0.3, -0.2, 0.1]);
    let c1 = g.node(
        "Conv",
        &[&x, &w1, &b1],
        vec![AttributeProto::ints("pads", &[1, 1, 1, 1])],
    );
    let r1 = g.node("Relu", &[&c1], vec![]);
    let p1 = g.node(
        "MaxPool",
        &[&r1],
        vec![
            AttributeProto::ints("kernel_shape", &[2, 2]),
            AttributeProto::ints("strides", &[2, 2]),
        ],
    );
    let gap = g.node("GlobalAveragePool", &[&p1], vec![]);
    let flat = g.node("Flatten", &[&gap], vec![]);
    let w2 = g.weight("w2", &[2, 3], rng.values(6));
    let b2 = g.weight("b2", &[2], rng.values(2));
    g.node(
        "Gemm",
        &[&flat, &w2, &b2],
        vec![AttributeProto::int("transB", 1)],
    );
    check("CNN", &g, Loss::CrossEntropy, 80);
}

#[test]
fn normalisation_layers_in_training_mode() {
    if !ready() {
        return;
    }
    let mut rng = Rng(90);
    for op in ["BatchNormalization", "InstanceNormalization"] {
        for shape in [vec![3i64, 2, 4, 5], vec![2, 3, 6]] {
            let c = shape[1];
            let mut g = Graph::new();
            let x = g.weight("x", &shape, rng.values(dims(&shape)));
            let scale = g.weight("scale", &[c], rng.values(c as usize));
            let bias = g.weight("bias", &[c], rng.values(c as usize));
            let mut inputs = vec![x.clone(), scale, bias];
            if op == "BatchNormalization" {
                inputs.push(g.weight("mean", &[c], vec![0.5; c as usize]));
                inputs.push(g.weight("var", &[c], vec![2.0; c as usize]));
            }
            let refs: Vec<&str> = inputs.iter().map(String::as_str).collect();
            let y = g.node(op, &refs, vec![AttributeProto::float("epsilon", 1e-3)]);
            g.node("Tanh", &[&y], vec![]);
            check(&format!("{op} {shape:?}"), &g, Loss::Mse, 90);
        }
    }
    // The running statistics come out as ONNX specifies: momentum · running + (1 − momentum)
    // · batch statistic (population variance), per channel.
    let shape = [4usize, 2, 3];
    let values = rng.values(24);
    let mut g = Graph::new();
    let x = g.weight("x", &[4, 2, 3], values.clone());
    let s = g.weight("s", &[2], vec![1.0, 1.0]);
    let b = g.weight("b", &[2], vec![0.0, 0.0]);
    let m = g.weight("m", &[2], vec![0.5, -0.5]);
    let v = g.weight("v", &[2], vec![2.0, 3.0]);
    g.node(
        "BatchNormalization",
        &[&x, &s, &b, &m, &v],
        vec![AttributeProto::float("momentum", 0.8)],
    );
    let tg = derive(
        &g.model(),
        &Spec {
            trainable: Some(vec!["s".into(), "b".into()]),
            prediction: None,
            loss: Loss::Mse,
            seed: 0,
        },
    )
    .unwrap();
    assert_eq!(tg.state.len(), 2);
    let mut session = Session::from_bytes(&tg.model.to_bytes(), 1).unwrap();
    let st = Tensor::new(vec![2], vec![1.0, 1.0]);
    let bt = Tensor::new(vec![2], vec![0.0, 0.0]);
    let mt = Tensor::new(vec![2], vec![0.5, -0.5]);
    let vt = Tensor::new(vec![2], vec![2.0, 3.0]);
    let labels = Tensor::new(shape.to_vec(), vec![0.0; 24]);
    // x is an initializer of this model (not trained), so it is not an input.
    let out = session
        .run(
            &[
                ("s", &st),
                ("b", &bt),
                ("m", &mt),
                ("v", &vt),
                ("labels", &labels),
            ],
            &["m.updated", "v.updated"],
        )
        .unwrap();
    for ch in 0..2 {
        let xs: Vec<f64> = (0..4)
            .flat_map(|n| (0..3).map(move |i| (n, i)))
            .map(|(n, i)| f64::from(values[(n * 2 + ch) * 3 + i]))
            .collect();
        let mean = xs.iter().sum::<f64>() / 12.0;
        let var = xs.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / 12.0;
        let want_m = 0.8 * [0.5, -0.5][ch] + 0.2 * mean;
        let want_v = 0.8 * [2.0, 3.0][ch] + 0.2 * var;
        assert!(
            (f64::from(out[0].1.data[ch]) - want_m).abs() < 1e-5,
            "mean {ch}"
        );
        assert!(
            (f64::from(out[1].1.data[ch]) - want_v).abs() < 1e-5,
            "var {ch}"
        );
    }
}

#[test]
fn split_slice_and_grouped_convolution_rules() {
    if !ready() {
        return;
    }
    let mut rng = Rng(100);
    // Split by given sizes; one part unused (its gradient is zero), two combined.
    let mut g = Graph::new();
    let x = g.weight("x", &[2, 6, 3], rng.values(36));
    let sizes = g.ints("sizes", &[1, 2, 3]);
    let parts = g.node_n(
        "Split",
        &[&x, &sizes],
        3,
        vec![AttributeProto::int("axis", 1)],
    );
    g.node("Mul", &[&parts[0], &parts[2]], vec![]);
    check(
        "Split [1, 2, 3] axis 1, middle part unused",
        &g,
        Loss::Mse,
        100,
    );
    // Split into equal parts (opset 18 num_outputs), the last one shorter, on a negative axis.
    let mut g = Graph::new();
    let x = g.weight("x", &[3, 7], rng.values(21));
    let parts = g.node_n(
        "Split",
        &[&x],
        2,
        vec![
            AttributeProto::int("axis", -1),
            AttributeProto::int("num_outputs", 2),
        ],
    );
    let t = g.node("Tanh", &[&parts[1]], vec![]);
    let head = g.ints("head", &[0]);
    let three = g.ints("three", &[3]);
    let axis1 = g.ints("axis1", &[1]);
    let cut = g.node("Slice", &[&parts[0], &head, &three, &axis1], vec![]);
    g.node("Add", &[&cut, &t], vec![]);
    check("Split num_outputs 2 of 7, then Slice", &g, Loss::Mse, 101);
    // Slice with negative, clamped and omitted bounds on two axes.
    for (starts, ends, axes) in [
        (vec![1i64, -3], vec![3i64, 100], vec![0i64, 2]),
        (vec![-100, 1], vec![-1, 4], vec![-1, 1]),
    ] {
        let mut g = Graph::new();
        let x = g.weight("x", &[3, 5, 4], rng.values(60));
        let (s, e, a) = (g.ints("s", &starts), g.ints("e", &ends), g.ints("a", &axes));
        let sliced = g.node("Slice", &[&x, &s, &e, &a], vec![]);
        g.node("Sigmoid", &[&sliced], vec![]);
        check(
            &format!("Slice {starts:?}..{ends:?} axes {axes:?}"),
            &g,
            Loss::Mse,
            102,
        );
    }
    // Grouped convolutions (weight gradients per group), including depthwise, and a grouped
    // transposed convolution.
    for (c, m, group) in [(4i64, 6i64, 2i64), (3, 3, 3)] {
        let mut g = Graph::new();
        let x = g.weight("x", &[2, c, 5, 5], rng.values(dims(&[2, c, 5, 5])));
        let w = g.weight(
            "w",
            &[m, c / group, 3, 3],
            rng.values(dims(&[m, c / group, 3, 3])),
        );
        let b = g.weight("b", &[m], rng.values(m as usize));
        g.node(
            "Conv",
            &[&x, &w, &b],
            vec![
                AttributeProto::int("group", group),
                AttributeProto::ints("strides", &[2, 1]),
                AttributeProto::ints("pads", &[1, 0, 1, 1]),
            ],
        );
        check(
            &format!("Conv group {group} ({c} -> {m})"),
            &g,
            Loss::Mse,
            103,
        );
    }
    let mut g = Graph::new();
    let x = g.weight("x", &[1, 4, 3, 3], rng.values(36));
    let w = g.weight("w", &[4, 3, 2, 2], rng.values(48));
    g.node(
        "ConvTranspose",
        &[&x, &w],
        vec![
            AttributeProto::int("group", 2),
            AttributeProto::ints("strides", &[2, 2]),
        ],
    );
    check("ConvTranspose group 2 (4 -> 6)", &g, Loss::Mse, 104);
}

/// What a Resize node is given: scales or output sizes.
#[derive(Debug)]
enum ResizeTo {
    Scales(Vec<f32>),
    Sizes(Vec<i64>),
}

#[test]
fn resize_rules_for_every_mode_and_coordinate_transform() {
    if !ready() {
        return;
    }
    let mut rng = Rng(110);
    // (mode, coordinate transform, nearest rounding, input, scales or sizes)
    use ResizeTo::{Scales, Sizes};
    let cases: Vec<(&str, &str, &str, Vec<i64>, ResizeTo)> = vec![
        // torch nn.Upsample(scale_factor=2) as exported.
        (
            "nearest",
            "asymmetric",
            "floor",
            vec![1, 2, 3, 4],
            Scales(vec![1.0, 1.0, 2.0, 2.0]),
        ),
        (
            "nearest",
            "half_pixel",
            "round_prefer_floor",
            vec![2, 1, 3, 4],
            Scales(vec![1.0, 1.0, 1.5, 2.5]),
        ),
        (
            "nearest",
            "align_corners",
            "round_prefer_ceil",
            vec![1, 2, 5, 3],
            Sizes(vec![1, 2, 3, 7]),
        ),
        // Bilinear, as torch exports align_corners=False and True.
        (
            "linear",
            "half_pixel",
            "round_prefer_floor",
            vec![1, 2, 3, 4],
            Scales(vec![1.0, 1.0, 2.0, 2.0]),
        ),
        (
            "linear",
            "pytorch_half_pixel",
            "round_prefer_floor",
            vec![1, 2, 4, 6],
            Scales(vec![1.0, 1.0, 0.5, 0.5]),
        ),
        (
            "linear",
            "align_corners",
            "round_prefer_floor",
            vec![2, 1, 3, 4],
            Sizes(vec![2, 1, 5, 7]),
        ),
        (
            "linear",
            "asymmetric",
            "round_prefer_floor",
            vec![1, 1, 4, 3],
            Scales(vec![1.0, 1.0, 1.75, 3.0]),
        ),
    ];
    for (mode, transform, rounding, shape, target) in cases {
        let mut g = Graph::new();
        let x = g.weight("x", &shape, rng.values(dims(&shape)));
        let (scales, sizes) = match &target {
            Scales(s) => (g.floats("scales", &[4], s), String::new()),
            Sizes(z) => (String::new(), g.ints("sizes", z)),
        };
        let attrs = vec![
            AttributeProto::string("mode", mode),
            AttributeProto::string("coordinate_transformation_mode", transform),
            AttributeProto::string("nearest_mode", rounding),
        ];
        let r = g.node("Resize", &[&x, "", &scales, &sizes], attrs);
        // A nonlinearity after, so the loss's gradient differs per output position.
        g.node("Tanh", &[&r], vec![]);
        check(
            &format!("Resize {mode} {transform} {rounding} {shape:?} -> {target:?}"),
            &g,
            Loss::Mse,
            110,
        );
    }
}

/// The loss of a training graph with Dropout, in a fresh session (ONNX Runtime seeds each
/// Dropout once per session, so the first mask of every fresh session is the same).
fn dropout_loss(bytes: &[u8], w: &Tensor, labels: &Tensor, training: bool) -> f64 {
    let mut session = Session::from_bytes(bytes, 1).unwrap();
    let mode = Tensor::scalar(if training { 1.0 } else { 0.0 });
    let out = session
        .run(
            &[("w", w), ("labels", labels), ("training_mode", &mode)],
            &["loss"],
        )
        .unwrap();
    f64::from(out[0].1.data[0])
}

#[test]
fn dropout_rule_is_seeded_and_off_in_evaluation() {
    if !ready() {
        return;
    }
    let mut rng = Rng(120);
    let values = rng.values(40);
    let mut g = Graph::new();
    let w = g.weight("w", &[4, 10], values.clone());
    let ratio = g.floats("ratio", &[], &[0.4]);
    let dropped = g.node("Dropout", &[&w, &ratio], vec![]);
    g.node("Tanh", &[&dropped], vec![]);
    let model = g.model();
    let derive_with = |seed: u64| {
        derive(
            &model,
            &Spec {
                trainable: None,
                prediction: None,
                loss: Loss::Mse,
                seed,
            },
        )
        .unwrap()
    };
    let tg = derive_with(7);
    assert_eq!(tg.training_mode.as_deref(), Some("training_mode"));
    let bytes = tg.model.to_bytes();
    let w0 = Tensor::new(vec![4, 10], values.clone());
    let labels = Tensor::new(vec![4, 10], rng.values(40));
    let grads = |bytes: &[u8], runs: usize| -> Vec<Vec<f32>> {
        let mut session = Session::from_bytes(bytes, 1).unwrap();
        let one = Tensor::scalar(1.0);
        (0..runs)
            .map(|_| {
                session
                    .run(
                        &[("w", &w0), ("labels", &labels), ("training_mode", &one)],
                        &["w.grad"],
                    )
                    .unwrap()
                    .remove(0)
                    .1
                    .data
            })
            .collect()
    };
    let first = grads(&bytes, 2);
    // Dropped positions get no gradient; about 40% are dropped.
    let zeros = first[0].iter().filter(|v| **v == 0.0).count();
    assert!(
        (6..=26).contains(&zeros),
        "{zeros} of 40 dropped at ratio 0.4"
    );
    // The next step draws a new mask; a fresh session with the same seed repeats the
    // sequence; another seed gives other masks.
    assert_ne!(first[0], first[1]);
    assert_eq!(grads(&bytes, 2), first);
    assert_ne!(grads(&derive_with(8).model.to_bytes(), 1)[0], first[0]);
    // The gradient against central differences of the same (first) mask.
    let eps = 1e-2f32;
    let numeric: Vec<f64> = (0..40)
        .map(|i| {
            let mut plus = w0.clone();
            plus.data[i] += eps;
            let mut minus = w0.clone();
            minus.data[i] -= eps;
            (dropout_loss(&bytes, &plus, &labels, true)
                - dropout_loss(&bytes, &minus, &labels, true))
                / (2.0 * f64::from(eps))
        })
        .collect();
    let scale = numeric.iter().fold(1e-6f64, |m, v| m.max(v.abs()));
    for (a, n) in first[0].iter().zip(&numeric) {
        assert!(
            (f64::from(*a) - n).abs() / scale < 2e-2,
            "Dropout gradient {a} vs central difference {n}"
        );
    }
    // Evaluation (training_mode 0) drops nothing: the loss of tanh(w) itself.
    let want: f64 = values
        .iter()
        .zip(&labels.data)
        .map(|(w, t)| (f64::from(w.tanh()) - f64::from(*t)).powi(2))
        .sum::<f64>()
        / 40.0;
    let got = dropout_loss(&bytes, &w0, &labels, false);
    assert!((got - want).abs() < 1e-5, "evaluation loss {got} vs {want}");
}
