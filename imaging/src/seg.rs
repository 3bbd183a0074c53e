//! DICOM SEG segment → a label mask on an image series' grid.
//!
//! Binary segmentations (1 bit per pixel, frames packed back to back) give 0/1; fractional ones
//! give the fraction in [0, 1]. Each frame is placed by its Plane Position (Patient) on the
//! image grid; a frame that is not on a slice of the series, or a SEG on another in-plane grid,
//! is refused rather than resampled.

use crate::ImagingError;
use crate::grid::{Geometry, Volume};
use amicus_index::values::{floats, items, text, uint};
use dicom_core::value::PrimitiveValue;
use dicom_dictionary_std::tags;
use std::path::Path;

/// The mask of the segment labelled `label` of the SEG at `path` on `geometry`.
pub fn load_segment_mask(
    path: &Path,
    label: &str,
    geometry: &Geometry,
) -> Result<Volume, ImagingError> {
    let bad = |reason: String| ImagingError::BadFile {
        path: path.display().to_string(),
        reason,
    };
    let (obj, ts) = amicus_index::header::read_whole(path).map_err(|e| bad(e.to_string()))?;
    if !["1.2.840.10008.1.2", "1.2.840.10008.1.2.1"].contains(&ts.split(' ').next().unwrap_or("")) {
        return Err(ImagingError::Unsupported(format!(
            "SEG in transfer syntax {ts}"
        )));
    }
    let segments = items(&obj, tags::SEGMENT_SEQUENCE);
    let number = segments
        .iter()
        .find(|s| text(s, tags::SEGMENT_LABEL).as_deref() == Some(label))
        .and_then(|s| uint(s, tags::SEGMENT_NUMBER))
        .ok_or_else(|| {
            let labels: Vec<String> = segments
                .iter()
                .filter_map(|s| text(s, tags::SEGMENT_LABEL))
                .collect();
            ImagingError::NoLabel(format!("{label:?} in the SEG (it has {labels:?})"))
        })?;
    let kind = text(&obj, tags::SEGMENTATION_TYPE).unwrap_or_default();
    let bits = uint(&obj, tags::BITS_ALLOCATED).unwrap_or(0);
    let (fractional, max) = match (kind.as_str(), bits) {
        ("BINARY", 1) => (false, 1.0),
        ("FRACTIONAL", 8) => {
            let max = uint(&obj, tags::MAXIMUM_FRACTIONAL_VALUE)
                .unwrap_or(255)
                .max(1);
            (true, f64::from(max))
        }
        _ => {
            return Err(ImagingError::Unsupported(format!(
                "SEG of type {kind:?} with {bits}-bit pixels"
            )));
        }
    };
    let rows = uint(&obj, tags::ROWS).unwrap_or(0) as usize;
    let columns = uint(&obj, tags::COLUMNS).unwrap_or(0) as usize;
    let [nx, ny, nz] = geometry.size;
    if (columns, rows) != (nx, ny) {
        return Err(ImagingError::Unsupported(format!(
            "the SEG's {columns} × {rows} frames are not on the image's {nx} × {ny} grid"
        )));
    }
    let frames = uint(&obj, tags::NUMBER_OF_FRAMES).unwrap_or(1) as usize;
    let per_frame = items(&obj, tags::PER_FRAME_FUNCTIONAL_GROUPS_SEQUENCE);
    if per_frame.len() != frames {
        return Err(bad(format!(
            "{frames} frames but {} per-frame functional groups",
            per_frame.len()
        )));
    }
    let pixels = match obj
        .get(tags::PIXEL_DATA)
        .and_then(|e| e.value().primitive())
    {
        Some(PrimitiveValue::U8(b)) => b.to_vec(),
        Some(PrimitiveValue::U16(w)) => w.iter().flat_map(|v| v.to_le_bytes()).collect(),
        _ => return Err(bad("no native pixel data".into())),
    };
    let plane = nx * ny;
    let needed_bits = frames * plane * if fractional { 8 } else { 1 };
    if pixels.len() * 8 < needed_bits {
        return Err(bad(format!(
            "pixel data holds {} bytes; {frames} frames need {}",
            pixels.len(),
            needed_bits.div_ceil(8)
        )));
    }
    let mut mask = vec![0f32; plane * nz];
    for (f, group) in per_frame.iter().enumerate() {
        let segment = items(group, tags::SEGMENT_IDENTIFICATION_SEQUENCE)
            .first()
            .and_then(|i| uint(i, tags::REFERENCED_SEGMENT_NUMBER));
        if segment != Some(number) {
            continue;
        }
        let position = items(group, tags::PLANE_POSITION_SEQUENCE)
            .first()
            .and_then(|i| floats(i, tags::IMAGE_POSITION_PATIENT))
            .filter(|v| v.len() == 3)
            .ok_or_else(|| bad(format!("frame {} has no Image Position (Patient)", f + 1)))?;
        let v = geometry.to_voxel([position[0], position[1], position[2]]);
        let k = v[2].round();
        if v[0].abs() > 0.1
            || v[1].abs() > 0.1
            || (v[2] - k).abs() > 0.1
            || k < 0.0
            || k >= nz as f64
        {
            return Err(ImagingError::Inconsistent(format!(
                "SEG frame {} at {position:?} is not on a slice of the image grid",
                f + 1
            )));
        }
        let out = &mut mask[k as usize * plane..(k as usize + 1) * plane];
        for (p, o) in out.iter_mut().enumerate() {
            let value = if fractional {
                f64::from(pixels[f * plane + p]) / max
            } else {
                let bit = f * plane + p;
                f64::from((pixels[bit / 8] >> (bit % 8)) & 1)
            };
            *o = (*o).max(value as f32);
        }
    }
    Ok(Volume {
        data: mask,
        geometry: geometry.clone(),
    })
}
