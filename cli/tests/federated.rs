//! The station's side of a federated round with a real (hostile) train in WebAssembly: the
//! update is computed, clipped, noised and encoded by the station, never by the train; every
//! way round that is refused and audited; the privacy budget refuses rounds before they run.
//! Plus `trains/fed-cls` learning over rounds. (Rounds across processes and the registry:
//! `registry.rs`.)

mod common;

use amicus_fl::wire::{Encoding, Update, Weights};
use amicus_runtime::sandbox::{FederatedRound, UPDATE_OUTPUT};
use amicus_runtime::station::StationError;
use common::Fixture;
use std::path::{Path, PathBuf};
use std::sync::Arc;

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

fn station() -> (Fixture, PathBuf) {
    let f = Fixture::new();
    f.policy_edit(
        "allowed_capabilities = [\"cohort\"]",
        "allowed_capabilities = [\"cohort\", \"kernels\"]",
    );
    let bundle = f.ready("testing/fl-cheat");
    (f, bundle)
}

/// The bundle model's trainable weights, as the station's trainer holds them.
fn initial(bundle: &Path) -> Weights {
    initial_of(bundle, "models/unet.onnx", "0.5*bce+0.5*dice")
}

/// The weights (and running statistics) a trainer on the bundle's `file` starts from.
fn initial_of(bundle: &Path, file: &str, loss: &str) -> Weights {
    let b = amicus_bundle::Bundle::read(bundle).unwrap();
    let model = amicus_autodiff::onnx::ModelProto::from_bytes(b.file(file).unwrap()).unwrap();
    let t = amicus_kernels::trainer::Trainer::new(
        &model,
        amicus_kernels::trainer::TrainerOptions {
            loss: amicus_autodiff::Loss::parse(loss).unwrap(),
            trainable: None,
            optimizer: amicus_kernels::optim::Optimizer::Sgd {
                learning_rate: 0.01,
                momentum: 0.0,
                nesterov: false,
                weight_decay: 0.0,
            },
            schedule: amicus_kernels::optim::Schedule::Constant,
            clip_norm: None,
            threads: 1,
            seed: 0,
            device: amicus_kernels::Device::Cpu,
        },
    )
    .unwrap();
    Weights {
        tensors: t
            .weights()
            .into_iter()
            .map(|w| amicus_fl::wire::Tensor {
                name: w.name,
                shape: w.shape,
                data: w.data,
            })
            .collect(),
    }
}

fn round(global: &Weights, number: u32, noise: Option<(f64, f64)>) -> FederatedRound {
    FederatedRound {
        job: "job-1".into(),
        number,
        rounds: 1,
        proximal_mu: 0.0,
        global: Arc::new(global.clone()),
        encoding: Encoding::Fp32,
        clip_norm: noise.map(|n| n.0),
        noise_multiplier: noise.map(|n| n.1),
    }
}

fn run(
    f: &Fixture,
    bundle: &Path,
    what: &str,
    round: FederatedRound,
) -> Result<amicus_runtime::station::RunRecord, StationError> {
    common::station(&f.station()).run_round(
        bundle,
        Some(&format!("{{\"do\": \"{what}\"}}")),
        round,
        Box::new(|_, _| {}),
    )
}

fn update_of(record: &amicus_runtime::station::RunRecord) -> Update {
    let o = record
        .outputs
        .iter()
        .find(|o| o.name == UPDATE_OUTPUT)
        .expect("an update was released");
    Update::decode(&std::fs::read(&o.path).unwrap()).unwrap().0
}

#[test]
fn the_station_writes_the_update_and_refuses_every_way_round() {
    if !ready() {
        return;
    }
    let (f, bundle) = station();
    f.policy_edit("default_epsilon = 10.0", "default_epsilon = 1000.0");
    let global = initial(&bundle);

    // Honest, no noise: nothing trained, so the update is exactly zero, with the samples.
    let record = run(&f, &bundle, "honest", round(&global, 1, None)).unwrap();
    let u = update_of(&record);
    assert_eq!((u.samples, u.delta.len()), (8, global.len()));
    assert!(u.delta.iter().all(|x| *x == 0.0));
    let e = f.last_event("update-submitted");
    assert_eq!(
        (e["samples"].as_u64(), e["round"].as_u64()),
        (Some(8), Some(1))
    );
    assert!(e["epsilon"].is_null());

    // With noise: std σ·C on every value, from OS randomness; the ledger counts one release.
    let record = run(&f, &bundle, "honest", round(&global, 1, Some((2.0, 0.5)))).unwrap();
    let u = update_of(&record);
    let n = u.delta.len() as f64;
    let mean = u.delta.iter().map(|x| f64::from(*x)).sum::<f64>() / n;
    let std = (u
        .delta
        .iter()
        .map(|x| (f64::from(*x) - mean).powi(2))
        .sum::<f64>()
        / n)
        .sqrt();
    assert!(
        (std - 1.0).abs() < 0.05 && mean.abs() < 0.05,
        "std {std}, mean {mean}"
    );
    let e = f.last_event("update-submitted");
    let epsilon = e["epsilon"].as_f64().unwrap();
    let expected = amicus_fl::rdp::Accountant::default()
        .epsilon_after(1.0, 0.5, 1, 1e-5)
        .unwrap();
    assert!((epsilon - expected).abs() < 1e-9, "{epsilon} vs {expected}");
    let again = run(&f, &bundle, "honest", round(&global, 1, Some((2.0, 0.5)))).unwrap();
    assert_ne!(
        update_of(&again).delta,
        u.delta,
        "fresh noise every release"
    );

    // The train cannot write the update itself.
    match run(&f, &bundle, "emit-update", round(&global, 1, None)) {
        Err(StationError::RunFailed {
            outcome, reason, ..
        }) => {
            assert_eq!(outcome, "policy-violation");
            assert!(reason.contains("federated.submit"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    // Submitting a trainer that never got the global weights, submitting twice, submitting in
    // the evaluation round: refused, audited with the reason.
    for (what, number, needle) in [
        ("submit-without-load", 1, "load-global"),
        ("submit-twice", 1, "already submitted"),
        ("honest", 2, "evaluation round"),
    ] {
        let r = run(&f, &bundle, what, round(&global, number, None));
        assert!(
            matches!(r, Err(StationError::RunFailed { .. })),
            "{what}: {r:?}"
        );
        let call = f.last_call_outcome("invalid-argument");
        assert!(
            call["outcome"].as_str().unwrap().contains(needle),
            "{what}: {call}"
        );
    }
    // Outside a job the interface is not available.
    let out = f.run(&bundle, Some(r#"{"do": "current"}"#));
    assert!(!out.ok);
    f.last_call_outcome("not-available");
    // Nothing but the two honest rounds' updates ever left.
    let released: Vec<_> = f
        .released()
        .into_iter()
        .filter(|p| p.file_name().unwrap() == UPDATE_OUTPUT)
        .collect();
    assert_eq!(released.len(), 3, "{released:?}");
    f.audit_verifies();
}

#[test]
fn privacy_budget_and_required_noise_refuse_rounds_before_they_run() {
    if !ready() {
        return;
    }
    let (f, bundle) = station();
    let global = initial(&bundle);
    let one = amicus_fl::rdp::Accountant::default()
        .epsilon_after(1.0, 1.0, 1, 1e-5)
        .unwrap();
    f.policy_edit(
        "default_epsilon = 10.0",
        &format!("default_epsilon = {}", 1.01 * one),
    );
    run(&f, &bundle, "honest", round(&global, 1, Some((1.0, 1.0)))).unwrap();
    let runs_before = std::fs::read_dir(f.station().join("runs")).unwrap().count();
    match run(&f, &bundle, "honest", round(&global, 1, Some((1.0, 1.0)))) {
        Err(StationError::Refused(r)) => {
            assert_eq!(r.stage, "privacy");
            assert!(
                r.reason.contains("privacy budget exhausted"),
                "{}",
                r.reason
            );
        }
        other => panic!("{other:?}"),
    }
    let refused = f.last_event("train-refused");
    assert_eq!(refused["stage"], "privacy");
    assert_eq!(
        std::fs::read_dir(f.station().join("runs")).unwrap().count(),
        runs_before,
        "the refused round never ran"
    );
    // A station that requires noise refuses a plan without it.
    f.policy_edit("require_noise = false", "require_noise = true");
    match run(&f, &bundle, "honest", round(&global, 1, None)) {
        Err(StationError::Refused(r)) => {
            assert_eq!(r.stage, "privacy");
            assert!(
                r.reason.contains("requires differentially private"),
                "{}",
                r.reason
            );
        }
        other => panic!("{other:?}"),
    }
    // The ledger survived on disk: one release.
    let ledger = std::fs::read_dir(f.station().join("privacy"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "json"))
        .expect("a ledger");
    let ledger: serde_json::Value =
        serde_json::from_slice(&std::fs::read(ledger).unwrap()).unwrap();
    assert_eq!(ledger["releases"], 1);
}

/// `trains/fed-cls`, the smaller example train: rounds of federated lesion present/absent
/// classification at one station (the global model is the previous global plus this
/// station's update, FedAvg with one participant). The global CNN's accuracy on the station's
/// own test series rises well above chance, and the evaluation round measures it without
/// taking an update.
#[test]
fn fed_cls_learns_over_rounds() {
    if !ready() {
        return;
    }
    let f = Fixture::new();
    f.synth_archive("legacy", 12, 8);
    f.policy_edit("min_patients = 10", "min_patients = 1");
    f.policy_edit(
        "allowed_capabilities = [\"cohort\"]",
        "allowed_capabilities = [\"cohort\", \"imaging\", \"kernels\"]",
    );
    common::ok(&["station", "index", "--dir", common::s(&f.station())]);
    let bundle = f.ready("fed-cls");
    let mut global = initial_of(&bundle, "models/cnn.onnx", "ce");
    let rounds = 3;
    let mut accuracy = Vec::new();
    for number in 1..=rounds + 1 {
        let round = FederatedRound {
            job: "job-cls".into(),
            number,
            rounds,
            proximal_mu: 0.0,
            global: Arc::new(global.clone()),
            encoding: Encoding::Fp32,
            clip_norm: None,
            noise_multiplier: None,
        };
        let record = common::station(&f.station())
            .run_round(
                &bundle,
                Some(r#"{"local_steps": 25, "batch": 16, "learning_rate": 0.01}"#),
                round,
                Box::new(|_, _| {}),
            )
            .unwrap();
        let metrics: serde_json::Value = serde_json::from_slice(
            &std::fs::read(
                &record
                    .outputs
                    .iter()
                    .find(|o| o.name == "metrics.json")
                    .expect("metrics")
                    .path,
            )
            .unwrap(),
        )
        .unwrap();
        eprintln!("round {number}: {metrics}");
        accuracy.push(metrics["test_accuracy_global"].as_f64().unwrap());
        if number > rounds {
            assert_eq!(metrics["evaluation_only"], true);
            assert!(record.outputs.iter().all(|o| o.name != UPDATE_OUTPUT));
            break;
        }
        let update = update_of(&record);
        assert_eq!(update.samples, 25 * 16);
        assert_eq!(update.delta.len(), global.len());
        let mut flat = update.delta.iter();
        for t in &mut global.tensors {
            for v in &mut t.data {
                *v += flat.next().unwrap();
            }
        }
    }
    let (first, last) = (accuracy[0], *accuracy.last().unwrap());
    assert!(last >= 0.8, "global test accuracy {first} → {last}");
    assert!(last > first + 0.1, "global test accuracy {first} → {last}");
}
