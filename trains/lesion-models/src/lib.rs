//! Example train: deep learning on the station, end to end through the contract.
//!
//! A cohort query finds CT series with GTV contours; `imaging.sample-patches` draws windowed
//! 32 × 32 patches (2D, one slice), half centred on lesion voxels; the station trains the
//! bundle's U-Net (`models/unet.onnx`, BCE + soft Dice) to segment the lesion and its CNN
//! (`models/cnn.onnx`, cross-entropy) to tell lesion-centred from background patches. The
//! last series is held out. Only metrics leave: losses, held-out Dice and accuracy before and
//! after training.
//!
//! Parameters (JSON, optional): `steps` (default 60), `batch` (default 8), `learning_rate`
//! (default 0.01), `seed` (default 1), `cosine_floor` (when given, both learning rates follow
//! a cosine decay over the steps down to this fraction); for tests of the station's refusals, `unet` (the
//! model file, default `models/unet.onnx`) and `patch` (patch side, default 32, which the
//! models expect).

use amicus_sdk::cohort::LDCM;
use amicus_sdk::imaging::{LabelSource, LoadOptions, PatchRequest, Window};
use amicus_sdk::kernels::{Adam, CosineDecay, Optimizer, Schedule, Trainer, TrainerOptions};
use amicus_sdk::tensors::Tensor;
use amicus_sdk::{Params, Train};
use serde::Serialize;
use std::collections::BTreeMap;

#[derive(Serialize, Default)]
struct Metrics {
    train: &'static str,
    series_trained: u64,
    series_held_out: u64,
    steps: u64,
    patches_per_step: u64,
    unet_loss_first: f32,
    unet_loss_last: f32,
    unet_held_out_loss_before: f32,
    unet_held_out_loss_after: f32,
    unet_held_out_dice_before: f64,
    unet_held_out_dice_after: f64,
    cnn_loss_first: f32,
    cnn_loss_last: f32,
    cnn_held_out_accuracy_before: f64,
    cnn_held_out_accuracy_after: f64,
}

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

struct Batch {
    images: Tensor,
    masks: Tensor,
    /// One-hot: [background, lesion] per patch.
    classes: Tensor,
    lesion: Vec<bool>,
}

fn batch(series: &str, roi: &str, count: u32, seed: u64, side: u32) -> amicus_sdk::Result<Batch> {
    let p = amicus_sdk::imaging::sample_patches(
        series,
        &LabelSource::RtstructRoi(roi.to_string()),
        &options(),
        PatchRequest {
            size: (side, side, 1),
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
    Ok(Batch {
        images: p.images,
        masks: p.masks,
        classes,
        lesion,
    })
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

/// Share of patches whose larger logit is the right class.
fn accuracy(logits: &[f32], lesion: &[bool]) -> f64 {
    let right = lesion
        .iter()
        .enumerate()
        .filter(|(i, l)| (logits[2 * i + 1] > logits[2 * i]) == **l)
        .count();
    right as f64 / lesion.len().max(1) as f64
}

struct LesionModels;

impl Train for LesionModels {
    fn run(params: Params) -> amicus_sdk::Result<()> {
        let steps: u64 = params.get("steps")?.unwrap_or(60);
        let count: u32 = params.get("batch")?.unwrap_or(8);
        let learning_rate: f32 = params.get("learning_rate")?.unwrap_or(0.01);
        let seed: u64 = params.get("seed")?.unwrap_or(1);
        let cosine_floor: Option<f32> = params.get("cosine_floor")?;
        let unet_file: String = params
            .get("unet")?
            .unwrap_or_else(|| "models/unet.onnx".into());
        let side: u32 = params.get("patch")?.unwrap_or(32);
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
        if series.len() < 2 {
            return Err("need at least two series with a GTV (one is held out)".into());
        }
        let (held_out, training) = series.split_last().expect("two or more");
        let optimizer = |lr: f32| TrainerOptions {
            optimizer: Optimizer::Adam(Adam {
                learning_rate: lr,
                beta1: 0.9,
                beta2: 0.999,
                epsilon: 1e-8,
                weight_decay: 0.0,
                decoupled: true,
            }),
            clip_norm: Some(5.0),
            seed,
        };
        let unet = Trainer::open(&unet_file, optimizer(learning_rate))?;
        let cnn = Trainer::open("models/cnn.onnx", optimizer(learning_rate))?;
        if let Some(floor) = cosine_floor {
            for t in [&unet, &cnn] {
                t.set_schedule(Schedule::CosineDecay(CosineDecay { steps, floor }))?;
            }
        }
        let test = batch(&held_out.0, &held_out.1, 32, seed ^ 0xFEED, side)?;
        let mut m = Metrics {
            train: "lesion-models",
            series_trained: training.len() as u64,
            series_held_out: 1,
            steps,
            patches_per_step: u64::from(count),
            ..Default::default()
        };
        m.unet_held_out_loss_before = unet.evaluate(&test.images, &test.masks)?;
        m.unet_held_out_dice_before = dice(&unet.predict(&test.images)?.read(), &test.masks.read());
        m.cnn_held_out_accuracy_before = accuracy(&cnn.predict(&test.images)?.read(), &test.lesion);
        for step in 0..steps {
            amicus_sdk::progress(step as f32 / steps as f32, "training");
            let (uid, roi) = &training[step as usize % training.len()];
            let b = batch(
                uid,
                roi,
                count,
                seed.wrapping_mul(1000).wrapping_add(step),
                side,
            )?;
            let unet_loss = unet.step(&b.images, &b.masks)?;
            let cnn_loss = cnn.step(&b.images, &b.classes)?;
            if step == 0 {
                m.unet_loss_first = unet_loss;
                m.cnn_loss_first = cnn_loss;
            }
            m.unet_loss_last = unet_loss;
            m.cnn_loss_last = cnn_loss;
        }
        m.unet_held_out_loss_after = unet.evaluate(&test.images, &test.masks)?;
        m.unet_held_out_dice_after = dice(&unet.predict(&test.images)?.read(), &test.masks.read());
        m.cnn_held_out_accuracy_after = accuracy(&cnn.predict(&test.images)?.read(), &test.lesion);
        amicus_sdk::emit_json("metrics.json", &m)?;
        amicus_sdk::progress(1.0, "done");
        Ok(())
    }
}

amicus_sdk::export_train!(LesionModels);
