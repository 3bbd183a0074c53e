//! `amicus model grad` on models written by the reference `onnx` Python package (an
//! independent producer, as `torch.onnx.export` would be): the training graph is derived,
//! loads in ONNX Runtime, passes `onnx.checker`, and a model with an op that has no rule is
//! refused by name.

mod common;

use common::{fails, ok, python, s};

const WRITE_CNN: &str = r#"
import sys, numpy as np, onnx
from onnx import helper as h, numpy_helper as nh, TensorProto as T
rng = np.random.default_rng(0)
w = lambda name, *shape: nh.from_array(rng.standard_normal(shape).astype(np.float32) * 0.3, name)
act = sys.argv[2]
nodes = [
    h.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
    h.make_node(act, ["c1"], ["r1"]),
    h.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
    h.make_node("Flatten", ["p1"], ["f"]),
    h.make_node("Gemm", ["f", "w2", "b2"], ["logits"], transB=1),
]
graph = h.make_graph(nodes, "cnn",
    [h.make_tensor_value_info("x", T.FLOAT, ["N", 1, 8, 8])],
    [h.make_tensor_value_info("logits", T.FLOAT, ["N", 2])],
    [w("w1", 4, 1, 3, 3), w("b1", 4), w("w2", 2, 64), w("b2", 2)])
model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)], ir_version=9)
onnx.checker.check_model(model)
onnx.save(model, sys.argv[1])
"#;

const CHECK: &str = r#"
import sys, onnx
m = onnx.load(sys.argv[1])
onnx.checker.check_model(m, full_check=True)
print([i.name for i in m.graph.input], [o.name for o in m.graph.output])
"#;

fn py(script: &str, args: &[&str]) -> String {
    let python = python().expect("venv python");
    let out = std::process::Command::new(python)
        .arg("-c")
        .arg(script)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "python failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn model_grad_derives_a_checked_training_graph_and_refuses_ops_without_rules() {
    let has_onnx = python().is_some_and(|p| {
        std::process::Command::new(p)
            .args(["-c", "import onnx"])
            .status()
            .is_ok_and(|s| s.success())
    });
    if !has_onnx {
        assert!(
            std::env::var_os("CI").is_none(),
            "venv with onnx missing under CI: run scripts/setup.sh --test"
        );
        eprintln!("skipped: no venv with onnx (run scripts/setup.sh --test)");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let cnn = tmp.path().join("cnn.onnx");
    let train = tmp.path().join("train.onnx");
    py(WRITE_CNN, &[s(&cnn), "Relu"]);
    let out = ok(&[
        "model",
        "grad",
        s(&cnn),
        "--out",
        s(&train),
        "--loss",
        "0.7*ce+0.3*dice",
    ]);
    assert!(
        out.stdout.contains("4 weights (170 parameters)"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains("ONNX Runtime 1.31.1 loads it"),
        "{}",
        out.stdout
    );
    let names = py(CHECK, &[s(&train)]);
    assert!(
        names.contains("['x', 'labels', 'b1', 'b2', 'w1', 'w2']"),
        "{names}"
    );
    assert!(names.contains("'loss', 'logits', 'b1.grad'"), "{names}");
    // The derivation is deterministic.
    let again = tmp.path().join("again.onnx");
    ok(&[
        "model",
        "grad",
        s(&cnn),
        "--out",
        s(&again),
        "--loss",
        "0.7*ce+0.3*dice",
    ]);
    assert_eq!(
        std::fs::read(&train).unwrap(),
        std::fs::read(&again).unwrap()
    );
    // Without ONNX Runtime the derivation still works; the load check is skipped, said so.
    let no_ort = tmp.path().join("no-ort.onnx");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_amicus"))
        .args([
            "model",
            "grad",
            s(&cnn),
            "--out",
            s(&no_ort),
            "--loss",
            "0.7*ce+0.3*dice",
        ])
        .env("AMICUS_ORT_LIB", tmp.path().join("missing.so"))
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not checked with ONNX Runtime"));
    assert_eq!(
        std::fs::read(&no_ort).unwrap(),
        std::fs::read(&train).unwrap()
    );
    // Only some weights trained.
    let out = ok(&[
        "model",
        "grad",
        s(&cnn),
        "--out",
        s(&train),
        "--trainable",
        "w2,b2",
    ]);
    assert!(
        out.stdout.contains("2 weights (130 parameters)"),
        "{}",
        out.stdout
    );

    // An op without a gradient rule on the gradient path: refused by name, nothing written.
    let erf = tmp.path().join("erf.onnx");
    py(WRITE_CNN, &[s(&erf), "Erf"]);
    let refused = tmp.path().join("refused.onnx");
    let out = fails(&["model", "grad", s(&erf), "--out", s(&refused)]);
    assert!(out.stderr.contains("op Erf"), "{}", out.stderr);
    assert!(!refused.exists());
    // Not a model, an unknown loss.
    std::fs::write(tmp.path().join("junk.onnx"), b"\xff\xff\xff not protobuf").unwrap();
    let out = fails(&[
        "model",
        "grad",
        s(&tmp.path().join("junk.onnx")),
        "--out",
        s(&refused),
    ]);
    assert!(out.stderr.contains("not an ONNX model"), "{}", out.stderr);
    let out = fails(&[
        "model",
        "grad",
        s(&cnn),
        "--out",
        s(&refused),
        "--loss",
        "hinge",
    ]);
    assert!(out.stderr.contains("unknown loss"), "{}", out.stderr);
}

#[test]
fn model_new_writes_standard_trainable_models() {
    let tmp = tempfile::tempdir().unwrap();
    let cnn = tmp.path().join("cnn.onnx");
    let out = ok(&[
        "model",
        "new",
        "cnn",
        "--out",
        s(&cnn),
        "--height",
        "32",
        "--width",
        "32",
        "--widths",
        "8,16",
        "--classes",
        "3",
        "--seed",
        "4",
    ]);
    // 8·1·9 + 8 + 16·8·9 + 16 + 3·16 + 3 = 1299
    assert!(out.stdout.contains("(1299 parameters)"), "{}", out.stdout);
    let unet = tmp.path().join("unet.onnx");
    ok(&[
        "model",
        "new",
        "unet2d",
        "--out",
        s(&unet),
        "--height",
        "64",
        "--width",
        "64",
        "--base",
        "4",
        "--depth",
        "2",
    ]);
    // Same seed, same bytes; another seed, other weights.
    let again = tmp.path().join("again.onnx");
    ok(&[
        "model",
        "new",
        "unet2d",
        "--out",
        s(&again),
        "--height",
        "64",
        "--width",
        "64",
        "--base",
        "4",
        "--depth",
        "2",
    ]);
    assert_eq!(
        std::fs::read(&unet).unwrap(),
        std::fs::read(&again).unwrap()
    );
    ok(&[
        "model",
        "new",
        "unet2d",
        "--out",
        s(&again),
        "--height",
        "64",
        "--width",
        "64",
        "--base",
        "4",
        "--depth",
        "2",
        "--seed",
        "9",
    ]);
    assert_ne!(
        std::fs::read(&unet).unwrap(),
        std::fs::read(&again).unwrap()
    );
    // Both derive training graphs.
    for (model, loss) in [(&cnn, "ce"), (&unet, "0.5*ce+0.5*dice")] {
        let train = tmp.path().join("train.onnx");
        ok(&[
            "model",
            "grad",
            s(model),
            "--out",
            s(&train),
            "--loss",
            loss,
        ]);
    }
    // Normalised U-Nets derive too (BatchNormalization's running statistics become state).
    let bn = tmp.path().join("bn.onnx");
    ok(&[
        "model",
        "new",
        "unet2d",
        "--out",
        s(&bn),
        "--height",
        "32",
        "--width",
        "32",
        "--base",
        "4",
        "--depth",
        "1",
        "--norm",
        "batch",
    ]);
    let train = tmp.path().join("bn-train.onnx");
    ok(&[
        "model",
        "grad",
        s(&bn),
        "--out",
        s(&train),
        "--loss",
        "dice",
    ]);
    let out = fails(&["model", "new", "unet2d", "--out", s(&bn), "--norm", "group"]);
    assert!(
        out.stderr.contains("unknown normalisation"),
        "{}",
        out.stderr
    );
    // Sizes the architecture cannot take are refused.
    let out = fails(&[
        "model",
        "new",
        "unet2d",
        "--out",
        s(&again),
        "--height",
        "60",
        "--depth",
        "3",
    ]);
    assert!(out.stderr.contains("divisible by 8"), "{}", out.stderr);
    // The reference onnx package accepts them (when the venv is there).
    if python().is_some_and(|p| {
        std::process::Command::new(p)
            .args(["-c", "import onnx"])
            .status()
            .is_ok_and(|s| s.success())
    }) {
        for m in [&cnn, &unet] {
            py(CHECK, &[s(m)]);
        }
    }
}

#[test]
fn the_example_trains_models_are_what_model_new_writes() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = common::repo_root().join("trains/lesion-models/models");
    for (file, args) in [
        (
            "unet.onnx",
            &[
                "unet2d",
                "--height",
                "32",
                "--width",
                "32",
                "--classes",
                "1",
                "--base",
                "8",
                "--depth",
                "2",
                "--seed",
                "1",
            ][..],
        ),
        (
            "cnn.onnx",
            &[
                "cnn",
                "--height",
                "32",
                "--width",
                "32",
                "--classes",
                "2",
                "--widths",
                "8,16",
                "--seed",
                "1",
            ][..],
        ),
    ] {
        let out = tmp.path().join(file);
        let mut cmd = vec!["model", "new"];
        cmd.extend_from_slice(args);
        cmd.extend(["--out", s(&out)]);
        ok(&cmd);
        assert_eq!(
            std::fs::read(&out).unwrap(),
            std::fs::read(dir.join(file)).unwrap(),
            "trains/lesion-models/models/{file} differs from `amicus model new {}` (regenerate it)",
            args.join(" ")
        );
    }
}
