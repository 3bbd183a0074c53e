//! Deep learning through the contract: the `lesion-models` train (WebAssembly) samples lesion
//! and background patches on a synthetic station, and the station trains the bundle's U-Net
//! and CNN in ONNX Runtime with its own training graphs; only metrics leave. Plus the
//! refusals: kernels not allowed by policy, a model the bundle does not declare, batches the
//! model cannot take.

mod common;

use common::{Fixture, ok, s};

fn kernels_station(allow_kernels: bool) -> Fixture {
    let f = Fixture::new();
    f.synth_archive("legacy", 12, 8);
    f.policy_edit("min_patients = 10", "min_patients = 1");
    let allowed = if allow_kernels {
        "allowed_capabilities = [\"cohort\", \"imaging\", \"kernels\"]"
    } else {
        "allowed_capabilities = [\"cohort\", \"imaging\"]"
    };
    f.policy_edit("allowed_capabilities = [\"cohort\"]", allowed);
    ok(&["station", "index", "--dir", s(&f.station())]);
    f
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

#[test]
fn a_unet_and_a_cnn_learn_on_the_station() {
    if !ready() {
        return;
    }
    let f = kernels_station(true);
    let b = f.ready("lesion-models");
    let out = f.run(
        &b,
        Some(r#"{"steps": 80, "batch": 16, "cosine_floor": 0.1}"#),
    );
    assert!(out.ok, "{}", out.text());
    let metrics: serde_json::Value = serde_json::from_slice(
        &std::fs::read(
            f.released()
                .into_iter()
                .find(|p| p.ends_with("metrics.json"))
                .unwrap(),
        )
        .unwrap(),
    )
    .unwrap();
    eprintln!("{metrics:#}");
    let num = |k: &str| metrics[k].as_f64().unwrap();
    assert!(num("series_trained") >= 1.0, "{metrics}");
    // The segmentation loss falls and held-out Dice rises well above chance.
    assert!(
        num("unet_loss_last") < 0.6 * num("unet_loss_first"),
        "{metrics}"
    );
    assert!(
        num("unet_held_out_loss_after") < num("unet_held_out_loss_before"),
        "{metrics}"
    );
    assert!(num("unet_held_out_dice_after") > 0.6, "{metrics}");
    assert!(
        num("unet_held_out_dice_after") > num("unet_held_out_dice_before") + 0.2,
        "{metrics}"
    );
    // The classifier tells lesion from background patches.
    assert!(num("cnn_held_out_accuracy_after") >= 0.8, "{metrics}");
    // The audit log has the kernels calls: two trainers opened, the steps counted.
    let calls: Vec<serde_json::Value> = f
        .events()
        .into_iter()
        .filter(|e| e["event"] == "capability-call" && e["capability"] == "kernels")
        .collect();
    let opened = calls
        .iter()
        .filter(|c| c["call"] == "trainer.open" && c["outcome"] == "ok")
        .count();
    assert_eq!(opened, 2, "{calls:?}");
    assert!(
        calls.iter().any(|c| c["call"] == "trainer.step"),
        "{calls:?}"
    );
    // The audit names each training graph by its digest, and anyone can re-derive it from the
    // bundle's model: `amicus model grad` with the model's loss and the train's seed prints
    // the same digest.
    let unet_open = calls
        .iter()
        .find(|c| {
            c["call"] == "trainer.open"
                && c["detail"]
                    .as_str()
                    .unwrap()
                    .starts_with("models/unet.onnx")
        })
        .unwrap();
    let audited = unet_open["detail"]
        .as_str()
        .unwrap()
        .split("training-graph ")
        .nth(1)
        .unwrap()
        .split(' ')
        .next()
        .unwrap()
        .to_string();
    assert!(
        audited.starts_with("sha256:") && audited.len() == 7 + 64,
        "{unet_open}"
    );
    let out_path = f.path("unet-train.onnx");
    let model = common::repo_root().join("trains/lesion-models/models/unet.onnx");
    let grad = ok(&[
        "model",
        "grad",
        s(&model),
        "--out",
        s(&out_path),
        "--loss",
        "0.5*bce+0.5*dice",
        "--seed",
        "1",
    ]);
    assert!(
        grad.stdout.contains(&format!("training-graph {audited}")),
        "{}",
        grad.stdout
    );
    // Both learning rates followed the cosine schedule the train set.
    let scheduled = calls
        .iter()
        .filter(|c| c["call"] == "trainer.set-schedule" && c["outcome"] == "ok")
        .count();
    assert_eq!(scheduled, 2, "{calls:?}");
    f.audit_verifies();
}

/// `bundle` rebuilt with a params schema that admits any object, signed by alice and
/// approved (as a careless or hostile author would ship it).
fn permissive(f: &Fixture, bundle: &std::path::Path) -> std::path::PathBuf {
    use amicus_bundle::{Bundle, ParamsDecl};
    let built = Bundle::read(bundle).unwrap();
    let mut manifest = built.manifest().clone();
    manifest.params = Some(ParamsDecl {
        schema: r#"{"type": "object"}"#.into(),
    });
    let files = manifest
        .files
        .iter()
        .map(|e| (e.path.clone(), built.file(&e.path).unwrap().to_vec()))
        .collect();
    let b = Bundle::create(manifest, files).unwrap();
    let path = f.path("permissive.train");
    b.write(&path).unwrap();
    ok(&["train", "sign", s(&path), "--key", s(&f.path("alice.key"))]);
    f.approve(&path);
    path
}

#[test]
fn kernel_refusals_are_clear_and_audited() {
    if !ready() {
        return;
    }
    // Not allowed by the station's policy: refused before the train runs.
    let f = kernels_station(false);
    let b = f.ready("lesion-models");
    let out = f.run(&b, None);
    assert!(!out.ok);
    assert!(out.text().contains("kernels"), "{}", out.text());
    assert!(f.released().is_empty());

    let f = kernels_station(true);
    let b = f.ready("lesion-models");
    // The train's params schema names its one model and bounds the floor: such params are
    // refused before anything runs.
    for params in [
        r#"{"unet": "models/other.onnx", "steps": 1}"#,
        r#"{"cosine_floor": 2.0, "steps": 1}"#,
    ] {
        let out = f.run(&b, Some(params));
        assert!(!out.ok);
        let e = f.last_event("train-refused");
        assert_eq!(e["stage"], "params", "{e}");
    }
    // The host does not rely on the author's schema: the same train with a schema that
    // admits anything meets the same refusals inside the kernels.
    let b = permissive(&f, &b);
    // A model file the bundle does not declare (nothing outside the signed bundle loads).
    let out = f.run(&b, Some(r#"{"unet": "models/other.onnx", "steps": 1}"#));
    assert!(!out.ok);
    let call = f.last_call_outcome("invalid-argument");
    assert_eq!(call["call"], "trainer.open");
    assert!(
        call["outcome"]
            .as_str()
            .unwrap()
            .contains("not a model the bundle declares"),
        "{call}"
    );
    // Patches of a size the models do not take: the step is refused, nothing trains.
    let out = f.run(&b, Some(r#"{"patch": 24, "steps": 1}"#));
    assert!(!out.ok);
    let call = f.last_call_outcome("invalid-argument");
    assert!(
        call["outcome"]
            .as_str()
            .unwrap()
            .contains("does not match the model"),
        "{call}"
    );
    // A schedule that makes no sense: refused by name, audited, nothing trains.
    let out = f.run(&b, Some(r#"{"cosine_floor": 2.0, "steps": 1}"#));
    assert!(!out.ok);
    let call = f.last_call_outcome("invalid-argument");
    assert_eq!(call["call"], "trainer.set-schedule");
    assert!(
        call["outcome"].as_str().unwrap().contains("floor"),
        "{call}"
    );
    assert!(f.released().is_empty());
    // A station whose policy asks for CUDA while its ONNX Runtime library is the CPU build:
    // every kernels call is refused as not available, saying what to install.
    if !amicus_kernels::cuda_available().unwrap() {
        f.policy_edit("device = \"cpu\"", "device = \"cuda\"");
        let out = f.run(&b, Some(r#"{"steps": 1}"#));
        assert!(!out.ok);
        let call = f.last_call_outcome("not-available");
        assert_eq!(call["call"], "trainer.open");
        assert!(
            call["outcome"]
                .as_str()
                .unwrap()
                .contains("onnxruntime-gpu"),
            "{call}"
        );
        f.policy_edit("device = \"cuda\"", "device = \"auto\"");
        let out = f.run(&b, Some(r#"{"steps": 1}"#));
        assert!(out.ok, "{}", out.text());
        let opened = f
            .events()
            .into_iter()
            .rev()
            .find(|e| e["call"] == "trainer.open" && e["outcome"] == "ok")
            .unwrap();
        assert!(
            opened["detail"].as_str().unwrap().ends_with("on Cpu"),
            "{opened}"
        );
        f.policy_edit("device = \"auto\"", "device = \"cpu\"");
    }
    f.audit_verifies();
}

/// The run's time limit holds inside ONNX Runtime: `testing/kernel-hog` trains on large
/// batches forever under a two-second limit (wasm's epoch checks never run while the station
/// is inside ONNX Runtime). The station stops the call at the deadline, audits it, ends the
/// run as over its limit, and releases nothing — not even what the train emitted after
/// catching the error.
#[test]
fn the_time_limit_stops_a_train_inside_onnx_runtime() {
    if !ready() {
        return;
    }
    let f = kernels_station(true);
    let b = f.ready("testing/kernel-hog");
    let out = f.run(&b, None);
    assert!(!out.ok, "{}", out.text());
    assert!(out.text().contains("wall-clock"), "{}", out.text());
    let stopped: Vec<serde_json::Value> = f
        .events()
        .into_iter()
        .filter(|e| {
            e["event"] == "capability-call"
                && e["call"] == "trainer.step"
                && e["outcome"]
                    .as_str()
                    .is_some_and(|o| o.contains("time limit passed during an ONNX Runtime call"))
        })
        .collect();
    assert_eq!(stopped.len(), 1, "{:?}", f.events());
    assert!(
        stopped[0]["outcome"]
            .as_str()
            .unwrap()
            .starts_with("limit-exceeded")
    );
    assert!(f.released().is_empty());
    f.audit_verifies();
}
