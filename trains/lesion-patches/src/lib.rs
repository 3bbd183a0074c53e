//! Example train: the data a segmentation model trains on, prepared by the station.
//!
//! For every CT series with an RTSTRUCT ROI named `GTV…` (found by a cohort query), the train
//! asks the station for (a) a 2.5D slab cropped around the lesion's bounding box, image and
//! mask on the same box, and (b) a batch of seeded training patches, half centred on lesion
//! voxels and half on background, windowed to [0, 1], and (c) one whole slice as a 2D image,
//! z-scored. It releases aggregates only: how many
//! patches and crops it got and how much lesion they hold, which shows the sampling works
//! without any image leaving.
//!
//! Parameters (JSON, optional): `roi_prefix` (default `"GTV"`), `patches` per series (default
//! 8), `seed` (default 7), `patch` size `[x, y, z]` (default `[24, 24, 3]`).

use amicus_sdk::cohort::LDCM;
use amicus_sdk::imaging::{CropCentre, LabelSource, LoadOptions, PatchRequest, SliceRange, Window};
use amicus_sdk::{Params, Train};
use serde::Serialize;
use std::collections::BTreeMap;

#[derive(Serialize, Default)]
struct Summary {
    train: &'static str,
    series: u64,
    lesions: u64,
    patches: u64,
    foreground_patches: u64,
    /// Foreground patches whose centre voxel is on the label.
    centres_on_label: u64,
    mean_label_fraction_foreground: f64,
    mean_label_fraction_background: f64,
    /// Intensities after the window, over every patch.
    intensity_min: f32,
    intensity_max: f32,
    /// Lesion-centred crops that contain lesion voxels.
    crops_with_lesion: u64,
    /// Single slices (2D) loaded whole, one per series.
    slices_2d: u64,
}

fn window() -> Option<Window> {
    Some(Window {
        center: 40.0,
        width: 400.0,
    })
}

struct LesionPatches;

impl Train for LesionPatches {
    fn run(params: Params) -> amicus_sdk::Result<()> {
        let prefix: String = params.get("roi_prefix")?.unwrap_or_else(|| "GTV".into());
        if prefix.contains(['"', '\\', '\n']) {
            return Err("roi_prefix must be plain text".into());
        }
        let count: u32 = params.get("patches")?.unwrap_or(8);
        let seed: u64 = params.get("seed")?.unwrap_or(7);
        let size: (u32, u32, u32) = params.get("patch")?.unwrap_or((24, 24, 3));
        let query = format!(
            "PREFIX ldcm: <{LDCM}>\nSELECT ?ct ?roi WHERE {{ ?rt ldcm:T00080060 \"RTSTRUCT\" ; \
             ldcm:R0020000E ?ct ; ldcm:T30060026 ?roi . ?ct ldcm:T00080060 \"CT\" . \
             FILTER(STRSTARTS(?roi, \"{prefix}\")) }} ORDER BY ?ct ?roi"
        );
        let rows = amicus_sdk::cohort::select(&query)?;
        let mut by_series: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for row in &rows.rows {
            let (Some(Some(ct)), Some(Some(roi))) = (row.first(), row.get(1)) else {
                continue;
            };
            let uid = ct.text().trim_start_matches("urn:oid:").to_string();
            by_series
                .entry(uid)
                .or_default()
                .push(roi.text().to_string());
        }
        let mut s = Summary {
            train: "lesion-patches",
            intensity_min: f32::INFINITY,
            intensity_max: f32::NEG_INFINITY,
            ..Default::default()
        };
        let (mut fg_fraction, mut bg_fraction, mut bg_patches) = (0.0, 0.0, 0u64);
        let total = by_series.len().max(1);
        for (i, (uid, rois)) in by_series.iter().enumerate() {
            amicus_sdk::progress(i as f32 / total as f32, "sampling patches");
            s.series += 1;
            for roi in rois {
                s.lesions += 1;
                let label = LabelSource::RtstructRoi(roi.clone());
                // (a) A 3-slice slab, 32 × 32 in-plane, around the lesion: image and mask.
                let crop = LoadOptions {
                    spacing: None,
                    slices: None,
                    size: Some((32, 32, 3)),
                    centre: Some(CropCentre::LabelBox(label.clone())),
                    window: window(),
                    z_score: false,
                };
                let mask = amicus_sdk::imaging::load_mask(uid, &label, &crop)?;
                if mask.data.read().iter().any(|v| *v >= 0.5) {
                    s.crops_with_lesion += 1;
                }
                let image = amicus_sdk::imaging::load_series(uid, &crop)?;
                drop(image);
            }
            // (c) One whole slice as a 2D image.
            let first = LoadOptions {
                spacing: None,
                slices: Some(SliceRange { first: 0, count: 1 }),
                size: None,
                centre: None,
                window: window(),
                z_score: true,
            };
            let slice = amicus_sdk::imaging::load_series(uid, &first)?;
            if slice.data.shape().first() == Some(&1) {
                s.slices_2d += 1;
            }
            drop(slice);
            // (b) Training patches for the first lesion of the series, half on the lesion.
            let label = LabelSource::RtstructRoi(rois[0].clone());
            let options = LoadOptions {
                spacing: None,
                slices: None,
                size: None,
                centre: None,
                window: window(),
                z_score: false,
            };
            let request = PatchRequest {
                size,
                count,
                foreground_fraction: 0.5,
                seed,
            };
            let p = amicus_sdk::imaging::sample_patches(uid, &label, &options, request)?;
            let images = p.images.read();
            let masks = p.masks.read();
            let per = (size.0 * size.1 * size.2) as usize;
            let centre_index = ((size.2 as usize - 1) / 2 * size.1 as usize
                + (size.1 as usize - 1) / 2)
                * size.0 as usize
                + (size.0 as usize - 1) / 2;
            for (n, c) in p.centres.iter().enumerate() {
                let m = &masks[n * per..(n + 1) * per];
                let fraction = m.iter().map(|v| f64::from(*v)).sum::<f64>() / per as f64;
                s.patches += 1;
                if c.foreground {
                    s.foreground_patches += 1;
                    fg_fraction += fraction;
                    if m[centre_index] >= 0.5 {
                        s.centres_on_label += 1;
                    }
                } else {
                    bg_patches += 1;
                    bg_fraction += fraction;
                }
            }
            for v in &images {
                s.intensity_min = s.intensity_min.min(*v);
                s.intensity_max = s.intensity_max.max(*v);
            }
        }
        if s.foreground_patches > 0 {
            s.mean_label_fraction_foreground = fg_fraction / s.foreground_patches as f64;
        }
        if bg_patches > 0 {
            s.mean_label_fraction_background = bg_fraction / bg_patches as f64;
        }
        amicus_sdk::emit_json("summary.json", &s)?;
        amicus_sdk::progress(1.0, "done");
        Ok(())
    }
}

amicus_sdk::export_train!(LesionPatches);
