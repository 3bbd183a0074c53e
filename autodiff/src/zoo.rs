//! Standard ONNX models for people without PyTorch at hand: a CNN classifier and a 2D U-Net
//! with configurable width and depth, He-initialised from a seed (the same arguments give the
//! same bytes). Opset 17, as `torch.onnx.export` writes by default, and only ops with gradient
//! rules.

use crate::onnx::{
    AttributeProto, Dim, FLOAT, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, TensorProto,
    ValueInfoProto,
};

/// The input and output names of every model written here.
pub const INPUT: &str = "image";
pub const OUTPUT: &str = "logits";

/// A classifier: `widths.len()` blocks of 3×3 convolution + ReLU + 2×2 max pooling, global
/// average pooling, and a linear layer to `classes` logits.
#[derive(Debug, Clone, PartialEq)]
pub struct Cnn {
    pub channels: i64,
    pub height: i64,
    pub width: i64,
    pub classes: i64,
    pub widths: Vec<i64>,
    pub seed: u64,
}

/// A 2D U-Net: `depth` levels of two 3×3 convolution (+ normalisation) + ReLU, max pooling down, 2×2 transposed
/// convolutions up with skip connections (Concat), and a 1×1 convolution to `classes` logits
/// per pixel. Height and width must be divisible by 2^depth.
#[derive(Debug, Clone, PartialEq)]
pub struct Unet2d {
    pub channels: i64,
    pub height: i64,
    pub width: i64,
    pub classes: i64,
    pub base: i64,
    pub depth: u32,
    /// Normalisation after each 3×3 convolution.
    pub norm: Norm,
    pub seed: u64,
}

/// Normalisation layers of the U-Net.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Norm {
    None,
    /// BatchNormalization (running mean and variance updated while training).
    Batch,
    /// InstanceNormalization (per sample and channel; no running statistics).
    Instance,
}

impl Norm {
    pub fn parse(s: &str) -> Result<Norm, String> {
        match s {
            "none" => Ok(Norm::None),
            "batch" => Ok(Norm::Batch),
            "instance" => Ok(Norm::Instance),
            other => Err(format!(
                "unknown normalisation {other:?} (none, batch, instance)"
            )),
        }
    }
}

struct Builder {
    nodes: Vec<NodeProto>,
    initializers: Vec<TensorProto>,
    rng: u64,
    n: usize,
}

impl Builder {
    fn new(seed: u64) -> Builder {
        Builder {
            nodes: Vec::new(),
            initializers: Vec::new(),
            rng: seed,
            n: 0,
        }
    }

    fn next(&mut self) -> f32 {
        // SplitMix64 → uniform (0, 1).
        self.rng = self.rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        ((z >> 40) as f32 + 0.5) / (1u64 << 24) as f32
    }

    /// Normal(0, std) by Box-Muller.
    fn normal(&mut self, std: f32) -> f32 {
        let (u, v) = (self.next(), self.next());
        std * (-2.0 * u.ln()).sqrt() * (2.0 * std::f32::consts::PI * v).cos()
    }

    fn weight(&mut self, name: &str, dims: &[i64], fan_in: i64) -> String {
        let std = (2.0 / fan_in as f32).sqrt();
        let n: i64 = dims.iter().product();
        let values: Vec<f32> = (0..n).map(|_| self.normal(std)).collect();
        self.initializers
            .push(TensorProto::floats(name, dims, &values));
        name.to_string()
    }

    fn zeros(&mut self, name: &str, n: i64) -> String {
        self.initializers
            .push(TensorProto::floats(name, &[n], &vec![0.0; n as usize]));
        name.to_string()
    }

    fn node(&mut self, op: &str, inputs: &[&str], attrs: Vec<AttributeProto>) -> String {
        self.n += 1;
        let out = format!("{}_{}", op.to_lowercase(), self.n);
        self.nodes.push(NodeProto {
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![out.clone()],
            name: Some(format!("{op}_{}", self.n)),
            op_type: Some(op.into()),
            attribute: attrs,
            ..Default::default()
        });
        out
    }

    fn conv(&mut self, x: &str, name: &str, cin: i64, cout: i64, k: i64) -> String {
        let w = self.weight(&format!("{name}.weight"), &[cout, cin, k, k], cin * k * k);
        let b = self.zeros(&format!("{name}.bias"), cout);
        let p = (k - 1) / 2;
        self.node(
            "Conv",
            &[x, &w, &b],
            vec![
                AttributeProto::ints("kernel_shape", &[k, k]),
                AttributeProto::ints("pads", &[p, p, p, p]),
            ],
        )
    }

    fn filled(&mut self, name: &str, n: i64, v: f32) -> String {
        self.initializers
            .push(TensorProto::floats(name, &[n], &vec![v; n as usize]));
        name.to_string()
    }

    fn norm(&mut self, x: &str, name: &str, channels: i64, norm: Norm) -> String {
        match norm {
            Norm::None => x.to_string(),
            Norm::Batch => {
                let s = self.filled(&format!("{name}.weight"), channels, 1.0);
                let b = self.zeros(&format!("{name}.bias"), channels);
                let m = self.zeros(&format!("{name}.running_mean"), channels);
                let v = self.filled(&format!("{name}.running_var"), channels, 1.0);
                self.node("BatchNormalization", &[x, &s, &b, &m, &v], vec![])
            }
            Norm::Instance => {
                let s = self.filled(&format!("{name}.weight"), channels, 1.0);
                let b = self.zeros(&format!("{name}.bias"), channels);
                self.node("InstanceNormalization", &[x, &s, &b], vec![])
            }
        }
    }

    fn relu(&mut self, x: &str) -> String {
        self.node("Relu", &[x], vec![])
    }

    fn pool(&mut self, x: &str) -> String {
        self.node(
            "MaxPool",
            &[x],
            vec![
                AttributeProto::ints("kernel_shape", &[2, 2]),
                AttributeProto::ints("strides", &[2, 2]),
            ],
        )
    }

    fn finish(mut self, graph: &str, input: &[Dim], output: &[Dim], last: &str) -> ModelProto {
        let last_node = self.nodes.last_mut().expect("a model has nodes");
        assert_eq!(last_node.output[0], last);
        last_node.output[0] = OUTPUT.into();
        ModelProto {
            ir_version: Some(9),
            opset_import: vec![OperatorSetIdProto {
                domain: Some(String::new()),
                version: Some(17),
            }],
            producer_name: Some("amicus model new".into()),
            graph: Some(GraphProto {
                node: self.nodes,
                name: Some(graph.into()),
                initializer: self.initializers,
                input: vec![ValueInfoProto::tensor(INPUT, FLOAT, input)],
                output: vec![ValueInfoProto::tensor(OUTPUT, FLOAT, output)],
                ..Default::default()
            }),
            ..Default::default()
        }
    }
}

fn batch() -> Dim {
    Dim::Named("N".into())
}

impl Cnn {
    pub fn build(&self) -> Result<ModelProto, String> {
        if self.widths.is_empty() || self.classes < 2 || self.channels < 1 {
            return Err("a CNN needs at least one block, one channel and two classes".into());
        }
        let scale = 1i64 << self.widths.len();
        if self.height % scale != 0 || self.width % scale != 0 {
            return Err(format!(
                "height and width must be divisible by {scale} for {} pooling blocks",
                self.widths.len()
            ));
        }
        let mut b = Builder::new(self.seed);
        let mut x = INPUT.to_string();
        let mut cin = self.channels;
        for (i, &w) in self.widths.iter().enumerate() {
            let c = b.conv(&x, &format!("block{}.conv", i + 1), cin, w, 3);
            let r = b.relu(&c);
            x = b.pool(&r);
            cin = w;
        }
        let gap = b.node("GlobalAveragePool", &[&x], vec![]);
        let flat = b.node("Flatten", &[&gap], vec![AttributeProto::int("axis", 1)]);
        let w = b.weight("head.weight", &[self.classes, cin], cin);
        let bias = b.zeros("head.bias", self.classes);
        let logits = b.node(
            "Gemm",
            &[&flat, &w, &bias],
            vec![AttributeProto::int("transB", 1)],
        );
        Ok(b.finish(
            "cnn",
            &[
                batch(),
                Dim::Known(self.channels),
                Dim::Known(self.height),
                Dim::Known(self.width),
            ],
            &[batch(), Dim::Known(self.classes)],
            &logits,
        ))
    }
}

impl Unet2d {
    pub fn build(&self) -> Result<ModelProto, String> {
        let scale = 1i64 << self.depth;
        if self.depth == 0 || self.depth > 6 || self.base < 1 || self.classes < 1 {
            return Err("a U-Net needs depth 1 to 6, a positive base width and classes".into());
        }
        if self.height % scale != 0 || self.width % scale != 0 {
            return Err(format!(
                "height and width must be divisible by {scale} for depth {}",
                self.depth
            ));
        }
        let mut b = Builder::new(self.seed);
        let norm = self.norm;
        let double = |b: &mut Builder, x: &str, name: &str, cin: i64, cout: i64| {
            let c = b.conv(x, &format!("{name}.conv1"), cin, cout, 3);
            let c = b.norm(&c, &format!("{name}.norm1"), cout, norm);
            let r = b.relu(&c);
            let c = b.conv(&r, &format!("{name}.conv2"), cout, cout, 3);
            let c = b.norm(&c, &format!("{name}.norm2"), cout, norm);
            b.relu(&c)
        };
        let mut skips = Vec::new();
        let mut x = INPUT.to_string();
        let mut cin = self.channels;
        for level in 0..self.depth {
            let width = self.base << level;
            let y = double(&mut b, &x, &format!("down{}", level + 1), cin, width);
            skips.push((y.clone(), width));
            x = b.pool(&y);
            cin = width;
        }
        let bottom = self.base << self.depth;
        x = double(&mut b, &x, "bottom", cin, bottom);
        cin = bottom;
        for level in (0..self.depth).rev() {
            let (skip, width) = skips[level as usize].clone();
            let name = format!("up{}", level + 1);
            let w = b.weight(
                &format!("{name}.upsample.weight"),
                &[cin, width, 2, 2],
                cin * 4,
            );
            let bias = b.zeros(&format!("{name}.upsample.bias"), width);
            let up = b.node(
                "ConvTranspose",
                &[&x, &w, &bias],
                vec![
                    AttributeProto::ints("kernel_shape", &[2, 2]),
                    AttributeProto::ints("strides", &[2, 2]),
                ],
            );
            let cat = b.node(
                "Concat",
                &[&up, &skip],
                vec![AttributeProto::int("axis", 1)],
            );
            x = double(&mut b, &cat, &name, 2 * width, width);
            cin = width;
        }
        let logits = b.conv(&x, "head", cin, self.classes, 1);
        let spatial = [Dim::Known(self.height), Dim::Known(self.width)];
        let mut input = vec![batch(), Dim::Known(self.channels)];
        input.extend(spatial.clone());
        let mut output = vec![batch(), Dim::Known(self.classes)];
        output.extend(spatial);
        Ok(b.finish("unet2d", &input, &output, &logits))
    }
}
