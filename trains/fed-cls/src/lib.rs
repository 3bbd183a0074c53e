//! Example train: one round of federated lesion present/absent classification — the smaller
//! sibling of `fed-seg`.
//!
//! A cohort query finds CT series with GTV contours (RTSTRUCT). The last `test_series` series
//! (by UID) are the station's test set and the one before them its validation series; neither
//! is trained on. Each round the CNN starts from the job's global weights
//! (`federated.load-global`), trains `local_steps` steps of Adam with cross-entropy on windowed
//! 32 × 32 patches, half centred on a lesion voxel (class 1) and half on background (class 0),
//! and hands the station its update (`federated.submit`); the station clips, noises and
//! encodes it. In the evaluation round after the last it only measures the global weights.
//! Only `metrics.json` (and the update) leave.
//!
//! Parameters (JSON, optional): `local_steps` (default 20), `batch` (default 16),
//! `learning_rate` (default 0.01), `seed` (default 1), `test_series` (default 2).

use amicus_sdk::cohort::LDCM;
use amicus_sdk::federated;
use amicus_sdk::imaging::{LabelSource, LoadOptions, PatchRequest, Window};
use amicus_sdk::kernels::{Adam, Optimizer, Trainer, TrainerOptions};
use amicus_sdk::tensors::Tensor;
use amicus_sdk::{Params, Train};
use serde::Serialize;
use std::collections::BTreeMap;

#[derive(Serialize, Default)]
struct Metrics {
    train: &'static str,
    round: u32,
    rounds: u32,
    evaluation_only: bool,
    series_trained: u64,
    test_series: u64,
    local_steps: u64,
    samples: u64,
    loss_first: f32,
    loss_last: f32,
    /// The round's global weights, before local training.
    validation_loss_global: f32,
    validation_accuracy_global: f64,
    test_accuracy_global: f64,
    /// After local training (absent in the evaluation round).
    validation_accuracy_local: Option<f64>,
}

const PATCH: u32 = 32;

/// Patches with one-hot classes (lesion-centred: [0, 1]) and the truth as booleans.
fn patches(
    series: &str,
    roi: &str,
    count: u32,
    seed: u64,
) -> amicus_sdk::Result<(Tensor, Tensor, Vec<bool>)> {
    let p = amicus_sdk::imaging::sample_patches(
        series,
        &LabelSource::RtstructRoi(roi.to_string()),
        &LoadOptions {
            spacing: None,
            slices: None,
            size: None,
            centre: None,
            window: Some(Window {
                center: 40.0,
                width: 400.0,
            }),
            z_score: false,
        },
        PatchRequest {
            size: (PATCH, PATCH, 1),
            count,
            foreground_fraction: 0.5,
            seed,
        },
    )?;
    let lesion: Vec<bool> = p.centres.iter().map(|c| c.foreground).collect();
    let onehot: Vec<f32> = lesion
        .iter()
        .flat_map(|&l| if l { [0.0, 1.0] } else { [1.0, 0.0] })
        .collect();
    let classes = Tensor::create(&[count, 2], &onehot)?;
    Ok((p.images, classes, lesion))
}

/// Share of patches whose larger logit is the right class.
fn accuracy(logits: &[f32], lesion: &[bool]) -> f64 {
    let right = lesion
        .iter()
        .enumerate()
        .filter(|(i, l)| (logits[2 * i + 1] > logits[2 * i]) == **l)
        .count();
    right as f64 / lesion.len().max(1) as f64
}

struct FedCls;

impl Train for FedCls {
    fn run(params: Params) -> amicus_sdk::Result<()> {
        let local_steps: u64 = params.get("local_steps")?.unwrap_or(20);
        let count: u32 = params.get("batch")?.unwrap_or(16);
        let learning_rate: f32 = params.get("learning_rate")?.unwrap_or(0.01);
        let seed: u64 = params.get("seed")?.unwrap_or(1);
        let test_series: usize = params.get("test_series")?.unwrap_or(2);
        let round = federated::current()?;

        let query = format!(
            "PREFIX ldcm: <{LDCM}>\nSELECT ?ct ?roi WHERE {{ ?rt ldcm:T00080060 \"RTSTRUCT\" ; \
             ldcm:R0020000E ?ct ; ldcm:T30060026 ?roi . ?ct ldcm:T00080060 \"CT\" . \
             FILTER(STRSTARTS(?roi, \"GTV\")) }} ORDER BY ?ct ?roi"
        );
        let rows = amicus_sdk::cohort::select(&query)?;
        let mut lesions: BTreeMap<String, String> = BTreeMap::new();
        for row in &rows.rows {
            if let (Some(Some(ct)), Some(Some(roi))) = (row.first(), row.get(1)) {
                lesions
                    .entry(ct.text().trim_start_matches("urn:oid:").to_string())
                    .or_insert_with(|| roi.text().to_string());
            }
        }
        let series: Vec<(String, String)> = lesions.into_iter().collect();
        let test_series = test_series.max(1);
        if series.len() < test_series + 2 {
            return Err(format!(
                "need at least {} series with a GTV ({test_series} test, 1 validation, 1 or more to train on)",
                test_series + 2
            )
            .into());
        }
        let (rest, test) = series.split_at(series.len() - test_series);
        let (validation, training) = rest.split_last().expect("two or more");

        let cnn = Trainer::open(
            "models/cnn.onnx",
            TrainerOptions {
                optimizer: Optimizer::Adam(Adam {
                    learning_rate,
                    beta1: 0.9,
                    beta2: 0.999,
                    epsilon: 1e-8,
                    weight_decay: 0.0,
                    decoupled: true,
                }),
                clip_norm: Some(5.0),
                seed,
            },
        )?;
        federated::load_global(&cnn)?;
        // The same held-out patches every round, so rounds compare.
        let (val_x, val_y, val_truth) = patches(&validation.0, &validation.1, 64, seed ^ 0xFEED)?;
        let mut m = Metrics {
            train: "fed-cls",
            round: round.number,
            rounds: round.rounds,
            evaluation_only: round.number > round.rounds,
            series_trained: training.len() as u64,
            ..Default::default()
        };
        m.validation_loss_global = cnn.evaluate(&val_x, &val_y)?;
        m.validation_accuracy_global = accuracy(&cnn.predict(&val_x)?.read(), &val_truth);
        let (mut logits, mut truth) = (Vec::new(), Vec::new());
        for (i, (uid, roi)) in test.iter().enumerate() {
            let (x, _, t) = patches(uid, roi, 64, seed ^ 0xBEEF ^ i as u64)?;
            logits.extend(cnn.predict(&x)?.read());
            truth.extend(t);
        }
        m.test_accuracy_global = accuracy(&logits, &truth);
        m.test_series = test.len() as u64;
        if m.evaluation_only {
            amicus_sdk::emit_json("metrics.json", &m)?;
            return Ok(());
        }

        for step in 0..local_steps {
            amicus_sdk::progress(step as f32 / local_steps as f32, "training");
            let (uid, roi) = &training[step as usize % training.len()];
            let draw = seed
                .wrapping_mul(1_000_003)
                .wrapping_add(u64::from(round.number) * 10_000 + step);
            let (x, y, _) = patches(uid, roi, count, draw)?;
            let loss = cnn.step(&x, &y)?;
            if step == 0 {
                m.loss_first = loss;
            }
            m.loss_last = loss;
        }
        m.local_steps = local_steps;
        m.samples = local_steps * u64::from(count);
        m.validation_accuracy_local = Some(accuracy(&cnn.predict(&val_x)?.read(), &val_truth));
        federated::submit(&cnn, m.samples as u32)?;
        amicus_sdk::emit_json("metrics.json", &m)?;
        amicus_sdk::progress(1.0, "done");
        Ok(())
    }
}

amicus_sdk::export_train!(FedCls);
