//! Building graph nodes: fresh names that cannot collide with the model's, constants as
//! initializers (deduplicated), and opset-aware helpers for the few ops whose signature moved
//! between opsets.

use crate::onnx::{AttributeProto, FLOAT, INT64, NodeProto, TensorProto};
use std::collections::{BTreeMap, HashSet};

pub(crate) struct Emitter {
    pub nodes: Vec<NodeProto>,
    pub constants: Vec<TensorProto>,
    taken: HashSet<String>,
    next: usize,
    const_names: BTreeMap<(i32, Vec<i64>, Vec<u8>), String>,
    pub opset: i64,
}

impl Emitter {
    pub fn new(taken: HashSet<String>, opset: i64) -> Emitter {
        Emitter {
            nodes: Vec::new(),
            constants: Vec::new(),
            taken,
            next: 0,
            const_names: BTreeMap::new(),
            opset,
        }
    }

    /// A name no tensor or node of the model uses.
    pub fn fresh(&mut self, base: &str) -> String {
        loop {
            self.next += 1;
            let name = format!("ad/{base}/{}", self.next);
            if self.taken.insert(name.clone()) {
                return name;
            }
        }
    }

    /// Reserve a specific name (an output the caller wants to call so).
    pub fn reserve(&mut self, name: &str) -> bool {
        self.taken.insert(name.to_string())
    }

    /// Emit `op` on `inputs` with `n` outputs; returns the output names.
    pub fn node_n(
        &mut self,
        op: &str,
        inputs: &[&str],
        n: usize,
        attributes: Vec<AttributeProto>,
    ) -> Vec<String> {
        let outputs: Vec<String> = (0..n).map(|_| self.fresh(&op.to_lowercase())).collect();
        let name = self.fresh(op);
        self.nodes.push(NodeProto {
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: outputs.clone(),
            name: Some(name),
            op_type: Some(op.into()),
            attribute: attributes,
            ..Default::default()
        });
        outputs
    }

    pub fn node(&mut self, op: &str, inputs: &[&str], attributes: Vec<AttributeProto>) -> String {
        self.node_n(op, inputs, 1, attributes).remove(0)
    }

    /// Emit `op` writing to the given output name.
    pub fn node_into(
        &mut self,
        op: &str,
        inputs: &[&str],
        output: &str,
        attributes: Vec<AttributeProto>,
    ) {
        let name = self.fresh(op);
        self.nodes.push(NodeProto {
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![output.to_string()],
            name: Some(name),
            op_type: Some(op.into()),
            attribute: attributes,
            ..Default::default()
        });
    }

    fn constant(&mut self, data_type: i32, dims: Vec<i64>, bytes: Vec<u8>) -> String {
        let key = (data_type, dims.clone(), bytes.clone());
        if let Some(name) = self.const_names.get(&key) {
            return name.clone();
        }
        let name = self.fresh("const");
        let t = TensorProto {
            name: Some(name.clone()),
            dims,
            data_type: Some(data_type),
            raw_data: Some(bytes),
            ..Default::default()
        };
        self.constants.push(t);
        self.const_names.insert(key, name.clone());
        name
    }

    /// A float scalar constant (shape []).
    pub fn scalar(&mut self, v: f32) -> String {
        self.constant(FLOAT, vec![], v.to_le_bytes().to_vec())
    }

    /// A float constant of any shape.
    pub fn floats(&mut self, dims: &[i64], values: &[f32]) -> String {
        self.constant(
            FLOAT,
            dims.to_vec(),
            values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        )
    }

    /// A 1-D int64 constant (shapes, axes, pads, split sizes).
    pub fn ints(&mut self, values: &[i64]) -> String {
        self.constant(
            INT64,
            vec![values.len() as i64],
            values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        )
    }

    /// ReduceSum over `axes` (axes as an input: opset 13+).
    pub fn reduce_sum(&mut self, x: &str, axes: &[i64], keepdims: bool) -> String {
        if axes.is_empty() {
            return self.node("Identity", &[x], vec![]);
        }
        let axes = self.ints(axes);
        self.node(
            "ReduceSum",
            &[x, &axes],
            vec![AttributeProto::int("keepdims", keepdims as i64)],
        )
    }

    /// ReduceMean over `axes` (an attribute up to opset 17, an input from 18).
    pub fn reduce_mean(&mut self, x: &str, axes: &[i64], keepdims: bool) -> String {
        let keep = AttributeProto::int("keepdims", keepdims as i64);
        if self.opset >= 18 {
            let axes = self.ints(axes);
            self.node("ReduceMean", &[x, &axes], vec![keep])
        } else {
            self.node(
                "ReduceMean",
                &[x],
                vec![AttributeProto::ints("axes", axes), keep],
            )
        }
    }

    pub fn reshape(&mut self, x: &str, shape: &[i64]) -> String {
        let s = self.ints(shape);
        self.node("Reshape", &[x, &s], vec![])
    }

    pub fn transpose(&mut self, x: &str, perm: &[i64]) -> String {
        self.node("Transpose", &[x], vec![AttributeProto::ints("perm", perm)])
    }

    pub fn mul(&mut self, a: &str, b: &str) -> String {
        self.node("Mul", &[a, b], vec![])
    }
}
