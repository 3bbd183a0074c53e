//! What an ONNX model must be before ONNX Runtime may load it on a station.
//!
//! A model comes from a train's bundle, so its author is untrusted. ONNX lets a tensor keep its
//! data in a file beside the model (`external_data` / `data_location = EXTERNAL`), and ONNX
//! Runtime then opens that path, relative to the model's directory or, for a model loaded from
//! bytes, to the process's working directory: a train could read any file the station can.
//! `check` walks the protobuf wire format of the whole model (graph, nested subgraphs of
//! `If`/`Loop`/`Scan`, model-local functions, training info, every tensor of every attribute
//! and every sparse tensor) and refuses:
//!
//! - any tensor that names external data, wherever it is;
//! - any node of the `EPContext` op (its `ep_cache_context` may name a file);
//! - any field, in the messages on the way to a tensor, that this walker does not know (a newer
//!   ONNX field could carry a tensor; deny by default), and deprecated protobuf groups;
//! - graphs nested deeper than [`MAX_DEPTH`], and models over the caps the caller gives.
//!
//! The walk is independent of the prost subset in [`crate::onnx`], which drops unknown fields
//! when decoding and so could not see what it does not model. It never panics on any input
//! (fuzzed in the tests) and reads every byte at most once per nesting level.
//!
//! Owns this check only; loading is `amicus-kernels`' job.

/// Graphs nested inside graphs (If/Loop/Scan bodies, functions) deeper than this are refused.
pub const MAX_DEPTH: u32 = 16;

/// Caps a station puts on the models it loads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caps {
    /// Largest model file, in bytes.
    pub max_bytes: u64,
    /// Most nodes, counted over every graph and function of the model.
    pub max_nodes: u64,
}

impl Caps {
    /// The ceilings no policy can raise: 2 GiB (protobuf's own limit) and 1,000,000 nodes.
    pub const CEILING: Caps = Caps {
        max_bytes: 2 << 30,
        max_nodes: 1_000_000,
    };
}

/// What the walk counted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Summary {
    pub bytes: u64,
    /// Nodes in every graph and function.
    pub nodes: u64,
    /// Graphs (the main graph, subgraphs, training graphs).
    pub graphs: u64,
    /// Tensors (initializers, attribute tensors, sparse tensor parts).
    pub tensors: u64,
    /// Deepest graph nesting seen (the main graph is 1).
    pub depth: u32,
}

/// Why a model may not be loaded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("the model is {bytes} bytes; the station loads models of at most {max} bytes")]
    TooLarge { bytes: u64, max: u64 },
    #[error("the model has more than {max} nodes (the station's limit)")]
    TooManyNodes { max: u64 },
    #[error("a tensor of the model ({0}) names external data: models must be self-contained")]
    ExternalData(String),
    #[error("the model uses the EPContext op, which may make ONNX Runtime open files")]
    EpContext,
    #[error("graphs are nested more than {MAX_DEPTH} deep")]
    TooDeep,
    #[error("field {field} of {message} is not one this station knows; refused")]
    UnknownField { message: &'static str, field: u64 },
    #[error("not a well-formed ONNX model: {0}")]
    Malformed(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Msg {
    Model,
    Graph,
    Node,
    Attribute,
    Tensor,
    SparseTensor,
    Function,
    TrainingInfo,
}

impl Msg {
    fn name(self) -> &'static str {
        match self {
            Msg::Model => "ModelProto",
            Msg::Graph => "GraphProto",
            Msg::Node => "NodeProto",
            Msg::Attribute => "AttributeProto",
            Msg::Tensor => "TensorProto",
            Msg::SparseTensor => "SparseTensorProto",
            Msg::Function => "FunctionProto",
            Msg::TrainingInfo => "TrainingInfoProto",
        }
    }
}

/// What to do with one field of a message.
enum Field {
    /// A scalar, string, bytes or a message without tensors: skip it.
    Skip,
    /// A nested message to walk.
    Walk(Msg),
    /// Not known: refuse.
    Unknown,
}

/// The fields of each message, by number, as `onnx.proto` (IR version 11) defines them.
fn field(msg: Msg, number: u64) -> Field {
    use Field::{Skip, Unknown, Walk};
    match (msg, number) {
        // ModelProto: ir_version 1, producer_name 2, producer_version 3, domain 4,
        // model_version 5, doc_string 6, graph 7, opset_import 8, metadata_props 14,
        // training_info 20, functions 25, configuration 26.
        (Msg::Model, 1..=6 | 8 | 14 | 26) => Skip,
        (Msg::Model, 7) => Walk(Msg::Graph),
        (Msg::Model, 20) => Walk(Msg::TrainingInfo),
        (Msg::Model, 25) => Walk(Msg::Function),
        // GraphProto: node 1, name 2, initializer 5, doc_string 10, input 11, output 12,
        // value_info 13, quantization_annotation 14, sparse_initializer 15, metadata_props 16.
        (Msg::Graph, 1) => Walk(Msg::Node),
        (Msg::Graph, 5) => Walk(Msg::Tensor),
        (Msg::Graph, 15) => Walk(Msg::SparseTensor),
        (Msg::Graph, 2 | 10..=14 | 16) => Skip,
        // NodeProto: input 1, output 2, name 3, op_type 4, attribute 5, doc_string 6,
        // domain 7, overload 8, metadata_props 9, device_configurations 10.
        (Msg::Node, 5) => Walk(Msg::Attribute),
        (Msg::Node, 1..=4 | 6..=10) => Skip,
        // AttributeProto: name 1, f 2, i 3, s 4, t 5, g 6, floats 7, ints 8, strings 9,
        // tensors 10, graphs 11, doc_string 13, tp 14, type_protos 15, type 20,
        // ref_attr_name 21, sparse_tensor 22, sparse_tensors 23.
        (Msg::Attribute, 5 | 10) => Walk(Msg::Tensor),
        (Msg::Attribute, 6 | 11) => Walk(Msg::Graph),
        (Msg::Attribute, 22 | 23) => Walk(Msg::SparseTensor),
        (Msg::Attribute, 1..=4 | 7..=9 | 13..=15 | 20 | 21) => Skip,
        // TensorProto: dims 1, data_type 2, segment 3, float_data 4, int32_data 5,
        // string_data 6, int64_data 7, name 8, raw_data 9, double_data 10, uint64_data 11,
        // doc_string 12, metadata_props 16; external_data 13 and data_location 14 are
        // handled by the walker.
        (Msg::Tensor, 1..=12 | 16) => Skip,
        // SparseTensorProto: values 1, indices 2, dims 3.
        (Msg::SparseTensor, 1 | 2) => Walk(Msg::Tensor),
        (Msg::SparseTensor, 3) => Skip,
        // FunctionProto: name 1, input 4, output 5, attribute 6, node 7, doc_string 8,
        // opset_import 9, domain 10, attribute_proto 11, value_info 12, overload 13,
        // metadata_props 14.
        (Msg::Function, 7) => Walk(Msg::Node),
        (Msg::Function, 11) => Walk(Msg::Attribute),
        (Msg::Function, 1 | 4..=6 | 8..=10 | 12..=14) => Skip,
        // TrainingInfoProto: initialization 1, algorithm 2, initialization_binding 3,
        // update_binding 4.
        (Msg::TrainingInfo, 1 | 2) => Walk(Msg::Graph),
        (Msg::TrainingInfo, 3 | 4) => Skip,
        _ => Unknown,
    }
}

/// Check `bytes` (an ONNX `ModelProto`) against `caps` and the rules above.
pub fn check(bytes: &[u8], caps: &Caps) -> Result<Summary, Refusal> {
    let len = bytes.len() as u64;
    let max_bytes = caps.max_bytes.min(Caps::CEILING.max_bytes);
    if len > max_bytes {
        return Err(Refusal::TooLarge {
            bytes: len,
            max: max_bytes,
        });
    }
    let mut w = Walker {
        summary: Summary {
            bytes: len,
            ..Summary::default()
        },
        max_nodes: caps.max_nodes.min(Caps::CEILING.max_nodes),
    };
    w.message(bytes, Msg::Model, 0)?;
    if w.summary.graphs == 0 {
        return Err(Refusal::Malformed("the model has no graph".into()));
    }
    Ok(w.summary)
}

struct Walker {
    summary: Summary,
    max_nodes: u64,
}

/// A protobuf reader over one message's bytes.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

fn malformed(what: &str) -> Refusal {
    Refusal::Malformed(what.to_string())
}

impl<'a> Reader<'a> {
    fn varint(&mut self) -> Result<u64, Refusal> {
        let mut value: u64 = 0;
        for i in 0..10u32 {
            let Some(&b) = self.bytes.get(self.at) else {
                return Err(malformed("truncated varint"));
            };
            self.at += 1;
            let low = u64::from(b & 0x7f);
            if i == 9 && low > 1 {
                return Err(malformed("varint longer than 64 bits"));
            }
            value |= low << (7 * i);
            if b & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(malformed("varint longer than 10 bytes"))
    }

    fn take(&mut self, n: u64) -> Result<&'a [u8], Refusal> {
        let n = usize::try_from(n).map_err(|_| malformed("length out of range"))?;
        let end = self
            .at
            .checked_add(n)
            .filter(|&e| e <= self.bytes.len())
            .ok_or_else(|| malformed("field runs past the end of its message"))?;
        let out = self.bytes.get(self.at..end).unwrap_or_default();
        self.at = end;
        Ok(out)
    }

    fn done(&self) -> bool {
        self.at >= self.bytes.len()
    }
}

/// A field's value, by wire type.
enum Value<'a> {
    Varint(u64),
    Fixed,
    Bytes(&'a [u8]),
}

impl Walker {
    fn message(&mut self, bytes: &[u8], msg: Msg, depth: u32) -> Result<(), Refusal> {
        let mut depth = depth;
        if msg == Msg::Graph {
            depth += 1;
            if depth > MAX_DEPTH {
                return Err(Refusal::TooDeep);
            }
            self.summary.graphs += 1;
            self.summary.depth = self.summary.depth.max(depth);
        }
        if msg == Msg::Node {
            self.summary.nodes += 1;
            if self.summary.nodes > self.max_nodes {
                return Err(Refusal::TooManyNodes {
                    max: self.max_nodes,
                });
            }
        }
        if msg == Msg::Tensor {
            self.summary.tensors += 1;
        }
        let mut r = Reader { bytes, at: 0 };
        let mut tensor_name: Option<&[u8]> = None;
        let mut external = false;
        let mut op_type: Option<&[u8]> = None;
        while !r.done() {
            let key = r.varint()?;
            let number = key >> 3;
            if number == 0 {
                return Err(malformed("field number 0"));
            }
            let value = match key & 7 {
                0 => Value::Varint(r.varint()?),
                1 => {
                    r.take(8)?;
                    Value::Fixed
                }
                2 => {
                    let n = r.varint()?;
                    Value::Bytes(r.take(n)?)
                }
                5 => {
                    r.take(4)?;
                    Value::Fixed
                }
                _ => return Err(malformed("protobuf groups or an invalid wire type")),
            };
            if msg == Msg::Tensor {
                match (number, &value) {
                    (13, _) => external = true,
                    (14, Value::Varint(v)) if *v != 0 => external = true,
                    (14, Value::Varint(_)) => {}
                    (14, _) => return Err(malformed("data_location is not a varint")),
                    (8, Value::Bytes(b)) => tensor_name = Some(b),
                    _ => {}
                }
                if matches!(number, 13 | 14) {
                    continue;
                }
            }
            if msg == Msg::Node
                && number == 4
                && let Value::Bytes(b) = &value
            {
                op_type = Some(b);
            }
            match field(msg, number) {
                Field::Skip => {}
                Field::Unknown => {
                    return Err(Refusal::UnknownField {
                        message: msg.name(),
                        field: number,
                    });
                }
                Field::Walk(inner) => match value {
                    Value::Bytes(b) => self.message(b, inner, depth)?,
                    _ => {
                        return Err(Refusal::Malformed(format!(
                            "field {number} of {} is not a message",
                            msg.name()
                        )));
                    }
                },
            }
        }
        if external {
            let name = tensor_name
                .map(|n| {
                    let text = String::from_utf8_lossy(n);
                    let shown: String = text
                        .chars()
                        .take(64)
                        .map(|c| if c.is_control() { '?' } else { c })
                        .collect();
                    format!("{shown:?}")
                })
                .unwrap_or_else(|| "unnamed".into());
            return Err(Refusal::ExternalData(name));
        }
        if op_type == Some(b"EPContext".as_slice()) {
            return Err(Refusal::EpContext);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx::{
        AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto,
        StringStringEntryProto, TensorProto,
    };
    use prost::Message;

    fn model(graph: GraphProto) -> ModelProto {
        ModelProto {
            ir_version: Some(8),
            opset_import: vec![OperatorSetIdProto {
                domain: Some(String::new()),
                version: Some(17),
            }],
            graph: Some(graph),
            ..Default::default()
        }
    }

    fn external(name: &str, location: &str) -> TensorProto {
        TensorProto {
            name: Some(name.into()),
            dims: vec![4],
            data_type: Some(crate::onnx::FLOAT),
            data_location: Some(1),
            external_data: vec![StringStringEntryProto {
                key: Some("location".into()),
                value: Some(location.into()),
            }],
            ..Default::default()
        }
    }

    fn constant(t: TensorProto) -> NodeProto {
        NodeProto {
            op_type: Some("Constant".into()),
            output: vec!["c".into()],
            attribute: vec![AttributeProto::tensor("value", t)],
            ..Default::default()
        }
    }

    fn cnn() -> ModelProto {
        crate::zoo::Cnn {
            channels: 1,
            height: 16,
            width: 16,
            classes: 2,
            widths: vec![4, 8],
            seed: 1,
        }
        .build()
        .unwrap()
    }

    fn unet() -> ModelProto {
        crate::zoo::Unet2d {
            channels: 1,
            height: 32,
            width: 32,
            classes: 1,
            base: 4,
            depth: 2,
            norm: crate::zoo::Norm::Batch,
            seed: 1,
        }
        .build()
        .unwrap()
    }

    const CAPS: Caps = Caps {
        max_bytes: 1 << 20,
        max_nodes: 100,
    };

    #[test]
    fn plain_models_pass() {
        let g = GraphProto {
            node: vec![constant(TensorProto::floats("w", &[2], &[1.0, 2.0]))],
            initializer: vec![TensorProto::floats("b", &[1], &[0.5])],
            ..Default::default()
        };
        let s = check(&model(g).encode_to_vec(), &CAPS).unwrap();
        assert_eq!((s.nodes, s.graphs, s.tensors, s.depth), (1, 1, 2, 1));
        for m in [cnn(), unet()] {
            check(&m.to_bytes(), &Caps::CEILING).unwrap();
        }
    }

    #[test]
    fn external_data_is_refused_wherever_it_hides() {
        for location in ["/etc/passwd", "../../station.key", "station.key", "x"] {
            // An initializer.
            let g = GraphProto {
                initializer: vec![external("w", location)],
                ..Default::default()
            };
            assert!(matches!(
                check(&model(g).encode_to_vec(), &CAPS),
                Err(Refusal::ExternalData(_))
            ));
            // A Constant node's tensor.
            let g = GraphProto {
                node: vec![constant(external("c", location))],
                ..Default::default()
            };
            assert!(matches!(
                check(&model(g).encode_to_vec(), &CAPS),
                Err(Refusal::ExternalData(_))
            ));
            // A subgraph of an If node, two levels down.
            let inner = GraphProto {
                node: vec![constant(external("deep", location))],
                ..Default::default()
            };
            let middle = GraphProto {
                node: vec![NodeProto {
                    op_type: Some("If".into()),
                    attribute: vec![AttributeProto {
                        name: Some("then_branch".into()),
                        r#type: Some(5),
                        g: Some(inner.encode_to_vec()),
                        ..Default::default()
                    }],
                    ..Default::default()
                }],
                ..Default::default()
            };
            let outer = GraphProto {
                node: vec![NodeProto {
                    op_type: Some("If".into()),
                    attribute: vec![AttributeProto {
                        name: Some("else_branch".into()),
                        r#type: Some(5),
                        g: Some(middle.encode_to_vec()),
                        ..Default::default()
                    }],
                    ..Default::default()
                }],
                ..Default::default()
            };
            assert!(matches!(
                check(&model(outer).encode_to_vec(), &CAPS),
                Err(Refusal::ExternalData(n)) if n.contains("deep")
            ));
        }
        // data_location = EXTERNAL without entries, and entries without data_location.
        let mut t = external("a", "x");
        t.external_data.clear();
        let g = GraphProto {
            initializer: vec![t],
            ..Default::default()
        };
        assert!(check(&model(g).encode_to_vec(), &CAPS).is_err());
        let mut t = external("b", "x");
        t.data_location = None;
        let g = GraphProto {
            initializer: vec![t],
            ..Default::default()
        };
        assert!(check(&model(g).encode_to_vec(), &CAPS).is_err());
    }

    /// Raw protobuf bytes: field `number` as a length-delimited value.
    fn len_field(number: u64, value: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        prost::encoding::encode_key(
            number as u32,
            prost::encoding::WireType::LengthDelimited,
            &mut out,
        );
        prost::encoding::encode_varint(value.len() as u64, &mut out);
        out.extend_from_slice(value);
        out
    }

    #[test]
    fn fields_the_prost_subset_drops_are_still_walked() {
        let ext = external("hidden", "station.key").encode_to_vec();
        // AttributeProto.tensors (10), sparse_tensor (22), graphs (11); GraphProto's
        // sparse_initializer (15); FunctionProto nodes (7); TrainingInfoProto graphs (1).
        let sparse = len_field(1, &ext);
        let graph_with_init = len_field(5, &ext);
        let node_of = |attr: Vec<u8>| len_field(1, &len_field(5, &attr));
        let cases: Vec<Vec<u8>> = vec![
            len_field(7, &node_of(len_field(10, &ext))),
            len_field(7, &node_of(len_field(22, &sparse))),
            len_field(7, &node_of(len_field(23, &sparse))),
            len_field(7, &node_of(len_field(11, &graph_with_init))),
            len_field(7, &len_field(15, &sparse)),
            [
                len_field(7, &[]),
                len_field(25, &len_field(7, &len_field(5, &len_field(5, &ext)))),
            ]
            .concat(),
            [
                len_field(7, &[]),
                len_field(20, &len_field(1, &graph_with_init)),
            ]
            .concat(),
        ];
        for (i, bytes) in cases.iter().enumerate() {
            assert!(
                matches!(check(bytes, &CAPS), Err(Refusal::ExternalData(_))),
                "case {i}: {:?}",
                check(bytes, &CAPS)
            );
        }
        // An unknown field of a message on the way to tensors.
        let unknown = len_field(7, &len_field(99, b"new"));
        assert!(matches!(
            check(&unknown, &CAPS),
            Err(Refusal::UnknownField { field: 99, .. })
        ));
    }

    #[test]
    fn ep_context_depth_and_caps() {
        let g = GraphProto {
            node: vec![NodeProto {
                op_type: Some("EPContext".into()),
                domain: Some("com.microsoft".into()),
                attribute: vec![AttributeProto::string("ep_cache_context", "ctx.bin")],
                ..Default::default()
            }],
            ..Default::default()
        };
        assert_eq!(
            check(&model(g).encode_to_vec(), &CAPS),
            Err(Refusal::EpContext)
        );
        let mut g = GraphProto::default();
        for _ in 0..MAX_DEPTH + 1 {
            g = GraphProto {
                node: vec![NodeProto {
                    op_type: Some("If".into()),
                    attribute: vec![AttributeProto {
                        name: Some("then_branch".into()),
                        g: Some(g.encode_to_vec()),
                        ..Default::default()
                    }],
                    ..Default::default()
                }],
                ..Default::default()
            };
        }
        assert_eq!(
            check(&model(g).encode_to_vec(), &Caps::CEILING),
            Err(Refusal::TooDeep)
        );
        let g = GraphProto {
            node: (0..101)
                .map(|_| constant(TensorProto::floats("w", &[1], &[1.0])))
                .collect(),
            ..Default::default()
        };
        let bytes = model(g).encode_to_vec();
        assert_eq!(
            check(&bytes, &CAPS),
            Err(Refusal::TooManyNodes { max: 100 })
        );
        let small = Caps {
            max_bytes: 10,
            max_nodes: 1000,
        };
        assert!(matches!(
            check(&bytes, &small),
            Err(Refusal::TooLarge { .. })
        ));
        assert!(check(b"", &CAPS).is_err(), "no graph");
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            let _ = check(&bytes, &CAPS);
        }

        #[test]
        fn mutated_models_never_panic(flips in proptest::collection::vec((0usize..4096, proptest::prelude::any::<u8>()), 1..8)) {
            let mut bytes = cnn().to_bytes();
            for (at, b) in flips {
                let i = at % bytes.len();
                bytes[i] = b;
            }
            let _ = check(&bytes, &Caps::CEILING);
        }
    }
}
