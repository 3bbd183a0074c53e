//! Example train: lesion volumes from RTSTRUCT contours, measured on the station.
//!
//! A cohort query finds every RTSTRUCT ROI named `GTV…` and the CT series it references; the
//! station rasterises each ROI on its CT grid (`imaging.load-mask`) and loads the CT in
//! Hounsfield units (`imaging.load-series`). The train releases aggregates only: lesion count,
//! total and mean volume, a three-bin volume histogram and the mean HU inside lesions.
//!
//! Parameters (JSON, optional): `roi_prefix` (default `"GTV"`).

use amicus_sdk::cohort::LDCM;
use amicus_sdk::imaging::{LabelSource, LoadOptions};
use amicus_sdk::{Params, Train};
use serde::Serialize;
use std::collections::BTreeMap;

#[derive(Serialize, Default)]
struct Summary {
    train: &'static str,
    lesions: u64,
    series: u64,
    total_volume_mm3: f64,
    mean_volume_mm3: f64,
    /// Lesions under 1 cm³, 1–10 cm³, over 10 cm³.
    histogram_cm3: [u64; 3],
    mean_hu_in_lesions: f64,
}

fn options() -> LoadOptions {
    LoadOptions {
        spacing: None,
        slices: None,
        size: None,
        centre: None,
        window: None,
        z_score: false,
    }
}

struct LesionVolumes;

impl Train for LesionVolumes {
    fn run(params: Params) -> amicus_sdk::Result<()> {
        let prefix: String = params.get("roi_prefix")?.unwrap_or_else(|| "GTV".into());
        if prefix.contains(['"', '\\', '\n']) {
            return Err("roi_prefix must be plain text".into());
        }
        let query = format!(
            "PREFIX ldcm: <{LDCM}>\nSELECT ?ct ?roi WHERE {{ ?rt ldcm:T00080060 \"RTSTRUCT\" ; \
             ldcm:R0020000E ?ct ; ldcm:T30060026 ?roi . ?ct ldcm:T00080060 \"CT\" . \
             FILTER(STRSTARTS(?roi, \"{prefix}\")) }} ORDER BY ?ct ?roi"
        );
        let rows = amicus_sdk::cohort::select(&query)?;
        // CT series → its lesion ROI names.
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
            train: "lesion-volumes",
            ..Default::default()
        };
        let (mut hu_sum, mut hu_voxels) = (0.0f64, 0.0f64);
        let total = by_series.len().max(1);
        for (i, (uid, rois)) in by_series.iter().enumerate() {
            amicus_sdk::progress(i as f32 / total as f32, "measuring lesions");
            let ct = amicus_sdk::imaging::load_series(uid, &options())?;
            let hu = ct.data.read();
            drop(ct);
            s.series += 1;
            for roi in rois {
                let mask = amicus_sdk::imaging::load_mask(
                    uid,
                    &LabelSource::RtstructRoi(roi.clone()),
                    &options(),
                )?;
                let (sx, sy, sz) = mask.geometry.spacing;
                let m = mask.data.read();
                let voxels: f64 = m.iter().map(|v| f64::from(*v)).sum();
                for (h, w) in hu.iter().zip(&m) {
                    hu_sum += f64::from(*h) * f64::from(*w);
                }
                hu_voxels += voxels;
                let volume = voxels * sx * sy * sz;
                s.lesions += 1;
                s.total_volume_mm3 += volume;
                s.histogram_cm3[match volume / 1000.0 {
                    v if v < 1.0 => 0,
                    v if v < 10.0 => 1,
                    _ => 2,
                }] += 1;
            }
        }
        if s.lesions > 0 {
            s.mean_volume_mm3 = s.total_volume_mm3 / s.lesions as f64;
        }
        if hu_voxels > 0.0 {
            s.mean_hu_in_lesions = hu_sum / hu_voxels;
        }
        amicus_sdk::emit_json("summary.json", &s)?;
        amicus_sdk::progress(1.0, "done");
        Ok(())
    }
}

amicus_sdk::export_train!(LesionVolumes);
