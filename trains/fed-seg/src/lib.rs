//! Example train: one round of federated lesion segmentation.
//!
//! A cohort query finds CT series with GTV contours (RTSTRUCT). The last `test_series` series
//! (by UID) are the station's test set and the one before them its validation series; neither
//! is trained on.
//! Each round the trainer starts from the job's global weights (`federated.load-global`),
//! trains `local_steps` steps of Adam on windowed 32 × 32 patches (half centred on lesion
//! voxels) with BCE + soft Dice, and hands the station its update (`federated.submit`); the
//! station clips, noises and encodes it. In the evaluation round after the last (`round >
//! rounds`) it only measures the global weights. Only `metrics.json` (and the update) leave.
//!
//! Parameters (JSON, optional): `local_steps` (default 20), `batch` (default 8),
//! `learning_rate` (default 0.005), `seed` (default 1), `test_series` (default 3).

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
    validation_dice_global: f64,
    test_dice_global: f64,
    /// After local training (absent in the evaluation round).
    validation_dice_local: Option<f64>,
}

const PATCH: u32 = 32;

fn options() -> LoadOptions {
    LoadOptions {
        spacing: None,
        slices: None,
        size: None,
        centre: None,
        window: Some(Window {
            center: 40.0,
            width: 400.0,
        }),
        z_score: false,
    }
}

fn patches(series: &str, roi: &str, count: u32, seed: u64) -> amicus_sdk::Result<(Tensor, Tensor)> {
    let p = amicus_sdk::imaging::sample_patches(
        series,
        &LabelSource::RtstructRoi(roi.to_string()),
        &options(),
        PatchRequest {
            size: (PATCH, PATCH, 1),
            count,
            foreground_fraction: 0.5,
            seed,
        },
    )?;
    Ok((p.images, p.masks))
}

/// Dice of the thresholded logits against the masks.
fn dice(logits: &[f32], masks: &[f32]) -> f64 {
    let (mut inter, mut total) = (0.0, 0.0);
    for (l, m) in logits.iter().zip(masks) {
        let p = f64::from((*l > 0.0) as u8);
        inter += p * f64::from(*m);
        total += p + f64::from(*m);
    }
    if total == 0.0 {
        1.0
    } else {
        2.0 * inter / total
    }
}

struct FedSeg;

impl Train for FedSeg {
    fn run(params: Params) -> amicus_sdk::Result<()> {
        let local_steps: u64 = params.get("local_steps")?.unwrap_or(20);
        let count: u32 = params.get("batch")?.unwrap_or(8);
        let learning_rate: f32 = params.get("learning_rate")?.unwrap_or(0.005);
        let seed: u64 = params.get("seed")?.unwrap_or(1);
        let test_series: usize = params.get("test_series")?.unwrap_or(3);
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

        let unet = Trainer::open(
            "models/unet.onnx",
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
        federated::load_global(&unet)?;
        // The same held-out patches every round, so rounds compare.
        let (val_x, val_y) = patches(&validation.0, &validation.1, 32, seed ^ 0xFEED)?;
        let val_masks = val_y.read();
        let mut m = Metrics {
            train: "fed-seg",
            round: round.number,
            rounds: round.rounds,
            evaluation_only: round.number > round.rounds,
            series_trained: training.len() as u64,
            ..Default::default()
        };
        m.validation_loss_global = unet.evaluate(&val_x, &val_y)?;
        m.validation_dice_global = dice(&unet.predict(&val_x)?.read(), &val_masks);
        // Dice over all test patches together (32 from each test series).
        let (mut test_logits, mut test_masks) = (Vec::new(), Vec::new());
        for (i, (uid, roi)) in test.iter().enumerate() {
            let (x, y) = patches(uid, roi, 32, seed ^ 0xBEEF ^ i as u64)?;
            test_logits.extend(unet.predict(&x)?.read());
            test_masks.extend(y.read());
        }
        m.test_dice_global = dice(&test_logits, &test_masks);
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
            let (x, y) = patches(uid, roi, count, draw)?;
            let loss = unet.step(&x, &y)?;
            if step == 0 {
                m.loss_first = loss;
            }
            m.loss_last = loss;
        }
        m.local_steps = local_steps;
        m.samples = local_steps * u64::from(count);
        m.validation_dice_local = Some(dice(&unet.predict(&val_x)?.read(), &val_masks));
        federated::submit(&unet, m.samples as u32)?;
        amicus_sdk::emit_json("metrics.json", &m)?;
        amicus_sdk::progress(1.0, "done");
        Ok(())
    }
}

amicus_sdk::export_train!(FedSeg);
