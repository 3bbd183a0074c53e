//! A model as PyTorch users produce it — `torch.onnx.export`, opset 17, evaluation mode —
//! trains here with the gradients PyTorch's own autograd computes. The fixture
//! (`tests/data/torch-net.onnx`, `torch-net-reference.json`, written by
//! `scripts/torch-fixture.py`) holds a network with Conv + BatchNormalization + ReLU,
//! MaxPool, a grouped Conv, bilinear and nearest upsampling (Resize, scales assembled by
//! Concat), a skip Concat, LeakyRelu, a crop (Slice with Unsqueezed bounds) and a 1×1 head,
//! plus PyTorch's loss, every parameter's gradient and the BatchNorm running statistics after
//! one training-mode step on a fixed batch. PyTorch itself is not needed to run this test.

use amicus_autodiff::onnx::ModelProto;
use amicus_autodiff::{Loss, Spec, derive};
use amicus_kernels::{Session, Tensor};

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

fn floats(v: &serde_json::Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

/// Largest element difference relative to the reference's largest element, or to 1e-4 where
/// that is smaller: a bias just before BatchNormalization has a zero gradient in exact
/// arithmetic (the normalisation removes it), so both sides hold rounding noise of ~1e-9 there.
fn relative_error(ours: &[f32], theirs: &[f32]) -> f32 {
    assert_eq!(ours.len(), theirs.len());
    let scale = theirs.iter().fold(1e-4f32, |m, v| m.max(v.abs()));
    ours.iter()
        .zip(theirs)
        .map(|(a, b)| (a - b).abs() / scale)
        .fold(0.0, f32::max)
}

#[test]
fn a_torch_export_trains_with_pytorchs_gradients() {
    if !ready() {
        return;
    }
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data");
    let model =
        ModelProto::from_bytes(&std::fs::read(dir.join("torch-net.onnx")).unwrap()).unwrap();
    let reference: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("torch-net-reference.json")).unwrap())
            .unwrap();
    let tg = derive(
        &model,
        &Spec {
            trainable: None,
            prediction: None,
            loss: Loss::Mse,
            seed: 0,
        },
    )
    .unwrap();
    let grads = reference["grads"].as_object().unwrap();
    let mut names: Vec<&str> = tg.weights.iter().map(|w| w.name.as_str()).collect();
    names.sort_unstable();
    let mut expected: Vec<&str> = grads.keys().map(String::as_str).collect();
    expected.sort_unstable();
    assert_eq!(
        names, expected,
        "the trained weights are PyTorch's parameters"
    );
    assert_eq!(
        tg.state.len(),
        2,
        "BatchNormalization's running statistics are state"
    );

    let image = Tensor::new(vec![2, 1, 16, 16], floats(&reference["image"]));
    let labels = Tensor::new(vec![2, 1, 14, 14], floats(&reference["labels"]));
    let mut feeds: Vec<(String, Tensor)> = vec![("image".into(), image), ("labels".into(), labels)];
    for w in &tg.weights {
        feeds.push((
            w.name.clone(),
            Tensor::new(
                w.shape.iter().map(|d| *d as usize).collect(),
                w.initial.clone(),
            ),
        ));
    }
    for st in &tg.state {
        feeds.push((
            st.name.clone(),
            Tensor::new(
                st.shape.iter().map(|d| *d as usize).collect(),
                st.initial.clone(),
            ),
        ));
    }
    let inputs: Vec<(&str, &Tensor)> = feeds.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let mut wanted = vec!["loss".to_string()];
    wanted.extend(tg.weights.iter().map(|w| w.grad.clone()));
    wanted.extend(tg.state.iter().map(|s| s.updated.clone()));
    let wanted: Vec<&str> = wanted.iter().map(String::as_str).collect();
    let mut session = Session::from_bytes(&tg.model.to_bytes(), 1).unwrap();
    let out = session.run(&inputs, &wanted).unwrap();

    let loss = out[0].1.data[0];
    let torch_loss = reference["loss"].as_f64().unwrap() as f32;
    assert!(
        (loss - torch_loss).abs() <= 1e-5 * torch_loss.abs().max(1.0),
        "loss {loss} vs PyTorch {torch_loss}"
    );
    for (i, w) in tg.weights.iter().enumerate() {
        let err = relative_error(&out[1 + i].1.data, &floats(&grads[&w.name]));
        eprintln!("{}: {err:.1e}", w.name);
        assert!(
            err < 1e-3,
            "gradient of {} off PyTorch's by {err:.1e}",
            w.name
        );
    }
    for (i, st) in tg.state.iter().enumerate() {
        let got = &out[1 + tg.weights.len() + i].1.data;
        let err = relative_error(got, &floats(&reference["running"][&st.name]));
        assert!(err < 1e-4, "{} off PyTorch's by {err:.1e}", st.name);
    }
}
