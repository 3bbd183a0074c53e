//! An image series → a volume of real-world values with geometry.

use crate::ImagingError;
use crate::grid::{Geometry, Volume, cross, dot};
use amicus_index::values::{floats, uint};
use dicom_core::Tag;
use dicom_core::value::{DicomValueType, PrimitiveValue};
use dicom_dictionary_std::tags;
use dicom_object::InMemDicomObject;
use std::path::{Path, PathBuf};

const NATIVE: [&str; 3] = [
    "1.2.840.10008.1.2",
    "1.2.840.10008.1.2.1",
    "1.2.840.10008.1.2.2",
];

/// What one image slice says about itself.
#[derive(Debug, Clone)]
pub(crate) struct Slice {
    pub path: PathBuf,
    pub position: [f64; 3],
    pub row_dir: [f64; 3],
    pub col_dir: [f64; 3],
    /// (row spacing = between rows, column spacing = between columns), mm.
    pub spacing: [f64; 2],
    pub rows: usize,
    pub columns: usize,
    pub bits_allocated: u16,
    pub bits_stored: u16,
    pub signed: bool,
    pub slope: f64,
    pub intercept: f64,
    pub thickness: Option<f64>,
}

fn bad(path: &Path, reason: impl Into<String>) -> ImagingError {
    ImagingError::BadFile {
        path: path.display().to_string(),
        reason: reason.into(),
    }
}

fn vec3(v: &[f64]) -> [f64; 3] {
    [v[0], v[1], v[2]]
}

pub(crate) fn read_slice(
    path: &Path,
    obj: &InMemDicomObject,
    ts: &str,
) -> Result<Slice, ImagingError> {
    if !NATIVE.contains(&ts.split(' ').next().unwrap_or("")) {
        return Err(ImagingError::Unsupported(format!(
            "{}: transfer syntax {ts} (compressed pixel data is not decoded yet)",
            path.display()
        )));
    }
    if uint(obj, tags::NUMBER_OF_FRAMES).is_some_and(|n| n > 1) {
        return Err(ImagingError::Unsupported(format!(
            "{}: multi-frame image",
            path.display()
        )));
    }
    if uint(obj, tags::SAMPLES_PER_PIXEL).is_some_and(|n| n != 1) {
        return Err(ImagingError::Unsupported(format!(
            "{}: colour image",
            path.display()
        )));
    }
    if obj.get(tags::MODALITY_LUT_SEQUENCE).is_some() {
        return Err(ImagingError::Unsupported(format!(
            "{}: Modality LUT Sequence (only linear rescale is applied)",
            path.display()
        )));
    }
    let need = |tag: Tag, name: &str, n: usize| -> Result<Vec<f64>, ImagingError> {
        let v = floats(obj, tag).ok_or_else(|| bad(path, format!("missing or invalid {name}")))?;
        if v.len() != n {
            return Err(bad(path, format!("{name} has {} values, not {n}", v.len())));
        }
        Ok(v)
    };
    let position = vec3(&need(
        tags::IMAGE_POSITION_PATIENT,
        "Image Position (Patient)",
        3,
    )?);
    let orientation = need(
        tags::IMAGE_ORIENTATION_PATIENT,
        "Image Orientation (Patient)",
        6,
    )?;
    let spacing = need(tags::PIXEL_SPACING, "Pixel Spacing", 2)?;
    if spacing.iter().any(|s| *s <= 0.0) {
        return Err(bad(path, "Pixel Spacing must be positive"));
    }
    let row_dir = vec3(&orientation[..3]);
    let col_dir = vec3(&orientation[3..]);
    for d in [row_dir, col_dir] {
        if (dot(d, d).sqrt() - 1.0).abs() > 1e-3 {
            return Err(bad(
                path,
                "Image Orientation (Patient) is not made of unit vectors",
            ));
        }
    }
    if dot(row_dir, col_dir).abs() > 1e-3 {
        return Err(bad(path, "Image Orientation (Patient) is not orthogonal"));
    }
    let rows = uint(obj, tags::ROWS).ok_or_else(|| bad(path, "missing Rows"))? as usize;
    let columns = uint(obj, tags::COLUMNS).ok_or_else(|| bad(path, "missing Columns"))? as usize;
    if rows == 0 || columns == 0 {
        return Err(bad(path, "Rows and Columns must be positive"));
    }
    let bits_allocated =
        uint(obj, tags::BITS_ALLOCATED).ok_or_else(|| bad(path, "missing Bits Allocated"))? as u16;
    if bits_allocated != 8 && bits_allocated != 16 {
        return Err(ImagingError::Unsupported(format!(
            "{}: {bits_allocated}-bit pixels",
            path.display()
        )));
    }
    let bits_stored = uint(obj, tags::BITS_STORED).map_or(bits_allocated, |b| b as u16);
    if bits_stored == 0 || bits_stored > bits_allocated {
        return Err(bad(
            path,
            format!("Bits Stored {bits_stored} with Bits Allocated {bits_allocated}"),
        ));
    }
    let signed = uint(obj, tags::PIXEL_REPRESENTATION).unwrap_or(0) == 1;
    let slope = floats(obj, tags::RESCALE_SLOPE)
        .and_then(|v| v.first().copied())
        .unwrap_or(1.0);
    let intercept = floats(obj, tags::RESCALE_INTERCEPT)
        .and_then(|v| v.first().copied())
        .unwrap_or(0.0);
    Ok(Slice {
        path: path.to_path_buf(),
        position,
        row_dir,
        col_dir,
        spacing: [spacing[0], spacing[1]],
        rows,
        columns,
        bits_allocated,
        bits_stored,
        signed,
        slope,
        intercept,
        thickness: floats(obj, tags::SLICE_THICKNESS).and_then(|v| v.first().copied()),
    })
}

/// Stored value → integer, honouring Bits Stored and Pixel Representation.
fn stored(raw: u32, bits_stored: u16, signed: bool) -> f64 {
    let mask = if bits_stored >= 32 {
        u32::MAX
    } else {
        (1u32 << bits_stored) - 1
    };
    let v = raw & mask;
    if signed && bits_stored < 32 && v & (1 << (bits_stored - 1)) != 0 {
        f64::from(v) - f64::from(1u32 << bits_stored)
    } else {
        f64::from(v)
    }
}

/// Decode one slice's pixels into `out` (rows × columns), rescaled.
fn decode_into(slice: &Slice, out: &mut [f32]) -> Result<(), ImagingError> {
    let path = &slice.path;
    let (obj, _) = amicus_index::header::read_whole(path).map_err(|e| bad(path, e.to_string()))?;
    let pixels = obj
        .get(tags::PIXEL_DATA)
        .and_then(|e| e.value().primitive())
        .ok_or_else(|| bad(path, "no native pixel data"))?;
    let n = slice.rows * slice.columns;
    let too_short = |have: usize| {
        bad(
            path,
            format!("pixel data holds {have} values; Rows × Columns is {n}"),
        )
    };
    let (bs, signed) = (slice.bits_stored, slice.signed);
    let (m, b) = (slice.slope, slice.intercept);
    match (slice.bits_allocated, pixels) {
        (16, PrimitiveValue::U16(w)) => {
            if w.len() < n {
                return Err(too_short(w.len()));
            }
            for (o, v) in out.iter_mut().zip(w.iter()) {
                *o = (stored(u32::from(*v), bs, signed) * m + b) as f32;
            }
        }
        (16, PrimitiveValue::I16(w)) => {
            if w.len() < n {
                return Err(too_short(w.len()));
            }
            for (o, v) in out.iter_mut().zip(w.iter()) {
                *o = (stored(u32::from(*v as u16), bs, signed) * m + b) as f32;
            }
        }
        (16, PrimitiveValue::U8(bytes)) => {
            if bytes.len() < 2 * n {
                return Err(too_short(bytes.len() / 2));
            }
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                let v = u16::from_le_bytes([c[0], c[1]]);
                *o = (stored(u32::from(v), bs, signed) * m + b) as f32;
            }
        }
        (8, PrimitiveValue::U8(bytes)) => {
            if bytes.len() < n {
                return Err(too_short(bytes.len()));
            }
            for (o, v) in out.iter_mut().zip(bytes.iter()) {
                *o = (stored(u32::from(*v), bs, signed) * m + b) as f32;
            }
        }
        (bits, other) => {
            return Err(ImagingError::Unsupported(format!(
                "{}: {bits}-bit pixel data stored as {:?}",
                path.display(),
                other.value_type()
            )));
        }
    }
    Ok(())
}

/// The geometry shared by every slice, or why the slices do not form one volume. Returns the
/// slices sorted along the normal with the geometry.
pub(crate) fn arrange(mut slices: Vec<Slice>) -> Result<(Vec<Slice>, Geometry), ImagingError> {
    let first = slices
        .first()
        .ok_or_else(|| ImagingError::Inconsistent("no images".into()))?
        .clone();
    let normal = cross(first.row_dir, first.col_dir);
    for s in &slices {
        let same = |a: [f64; 3], b: [f64; 3]| (0..3).all(|i| (a[i] - b[i]).abs() < 1e-4);
        if !same(s.row_dir, first.row_dir) || !same(s.col_dir, first.col_dir) {
            return Err(ImagingError::Inconsistent(format!(
                "{} has another orientation than {}",
                s.path.display(),
                first.path.display()
            )));
        }
        if (s.rows, s.columns) != (first.rows, first.columns)
            || (0..2).any(|i| (s.spacing[i] - first.spacing[i]).abs() > 1e-4)
        {
            return Err(ImagingError::Inconsistent(format!(
                "{} has another matrix or pixel spacing than {}",
                s.path.display(),
                first.path.display()
            )));
        }
    }
    slices.sort_by(|a, b| dot(a.position, normal).total_cmp(&dot(b.position, normal)));
    let origin = slices[0].position;
    // In-plane offsets must agree (no gantry tilt, no shifted slices).
    for s in &slices {
        let d = [
            s.position[0] - origin[0],
            s.position[1] - origin[1],
            s.position[2] - origin[2],
        ];
        if dot(d, first.row_dir).abs() > 1e-2 || dot(d, first.col_dir).abs() > 1e-2 {
            return Err(ImagingError::Unsupported(format!(
                "{} is shifted in-plane against the first slice (gantry tilt?)",
                s.path.display()
            )));
        }
    }
    let z: Vec<f64> = slices.iter().map(|s| dot(s.position, normal)).collect();
    let dz = if z.len() == 1 {
        first.thickness.filter(|t| *t > 0.0).unwrap_or(1.0)
    } else {
        let gaps: Vec<f64> = z.windows(2).map(|w| w[1] - w[0]).collect();
        if let Some(i) = gaps.iter().position(|g| *g < 1e-3) {
            return Err(ImagingError::Inconsistent(format!(
                "{} and {} are at the same position",
                slices[i].path.display(),
                slices[i + 1].path.display()
            )));
        }
        let min = gaps.iter().copied().fold(f64::INFINITY, f64::min);
        let max = gaps.iter().copied().fold(0.0, f64::max);
        if max - min > 0.01 * min + 1e-3 {
            return Err(ImagingError::Inconsistent(format!(
                "irregular slice spacing: gaps from {min:.3} to {max:.3} mm (missing slices?)"
            )));
        }
        (z[z.len() - 1] - z[0]) / (z.len() - 1) as f64
    };
    let geometry = Geometry {
        origin,
        spacing: [first.spacing[1], first.spacing[0], dz],
        direction: [first.row_dir, first.col_dir, normal],
        size: [first.columns, first.rows, slices.len()],
    };
    Ok((slices, geometry))
}

/// The grid of the images `files` (one series), from their headers only.
pub fn series_geometry(files: &[PathBuf]) -> Result<Geometry, ImagingError> {
    let mut slices = Vec::with_capacity(files.len());
    for path in files {
        let (obj, ts) =
            amicus_index::header::read_header(path).map_err(|e| bad(path, e.to_string()))?;
        slices.push(read_slice(path, &obj, &ts)?);
    }
    Ok(arrange(slices)?.1)
}

/// Load the images `files` (one series) as a volume, refusing before allocation if it would
/// need more than `max_bytes`.
pub fn load_series(files: &[PathBuf], max_bytes: u64) -> Result<Volume, ImagingError> {
    if files.is_empty() {
        return Err(ImagingError::Inconsistent("no images".into()));
    }
    let mut slices = Vec::with_capacity(files.len());
    for path in files {
        let (obj, ts) =
            amicus_index::header::read_header(path).map_err(|e| bad(path, e.to_string()))?;
        slices.push(read_slice(path, &obj, &ts)?);
    }
    let (slices, geometry) = arrange(slices)?;
    let plane = geometry.size[0] * geometry.size[1];
    let needed = (plane as u64)
        .saturating_mul(slices.len() as u64)
        .saturating_mul(4);
    if needed > max_bytes {
        return Err(ImagingError::TooLarge {
            needed,
            available: max_bytes,
        });
    }
    let mut data = vec![0f32; plane * slices.len()];
    // Decode on every core, each slice straight into its place.
    let workers = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(slices.len());
    let chunks: Vec<(&Slice, &mut [f32])> = slices.iter().zip(data.chunks_mut(plane)).collect();
    let mut per_worker: Vec<Vec<(&Slice, &mut [f32])>> = (0..workers).map(|_| Vec::new()).collect();
    for (i, c) in chunks.into_iter().enumerate() {
        per_worker[i % workers].push(c);
    }
    let results: Vec<Result<(), ImagingError>> = std::thread::scope(|scope| {
        let handles: Vec<_> = per_worker
            .into_iter()
            .map(|work| {
                scope.spawn(move || {
                    for (slice, out) in work {
                        decode_into(slice, out)?;
                    }
                    Ok(())
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(ImagingError::Unsupported("decoder panicked".into())))
            })
            .collect()
    });
    results.into_iter().collect::<Result<(), _>>()?;
    Ok(Volume { data, geometry })
}

#[cfg(test)]
mod tests {
    use super::stored;

    #[test]
    fn stored_values_honour_bits_stored_and_sign() {
        assert_eq!(stored(0x0FFF, 12, false), 4095.0);
        assert_eq!(stored(0x0FFF, 12, true), -1.0);
        assert_eq!(stored(0xF000, 12, true), 0.0);
        assert_eq!(stored(0x0800, 12, true), -2048.0);
        assert_eq!(stored(0xFFFF, 16, true), -1.0);
        assert_eq!(stored(200, 8, false), 200.0);
    }
}
