//! An image series → a volume of real-world values with geometry.
//!
//! A series is a set of frames: one per single-frame file, or several per multi-frame file
//! (enhanced CT/MR/PET with per-frame functional groups, or RT Dose with a Grid Frame Offset
//! Vector). Frames are placed by position along the slice normal, never by file name, instance
//! or frame number.

use crate::ImagingError;
use crate::grid::{Geometry, Volume, cross, dot};
use crate::pixels::{self, Layout, Rescale};
use amicus_index::values::{floats, items, text, uint};
use dicom_core::Tag;
use dicom_dictionary_std::tags;
use dicom_object::InMemDicomObject;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// What one image frame says about itself.
#[derive(Debug, Clone)]
pub(crate) struct Slice {
    pub path: PathBuf,
    /// Frame number within the file, 0-based.
    pub frame: usize,
    /// Number of frames in the file (for messages).
    pub frames: usize,
    pub transfer_syntax: String,
    pub position: [f64; 3],
    pub row_dir: [f64; 3],
    pub col_dir: [f64; 3],
    /// (row spacing = between rows, column spacing = between columns), mm.
    pub spacing: [f64; 2],
    pub layout: Layout,
    pub rescale: Rescale,
    pub thickness: Option<f64>,
}

impl Slice {
    /// The file, and the frame when the file holds several.
    pub fn name(&self) -> String {
        if self.frames > 1 {
            format!("{} frame {}", self.path.display(), self.frame + 1)
        } else {
            self.path.display().to_string()
        }
    }
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

/// An attribute of a functional group macro: in the frame's own group first, then in the
/// shared groups, then (for files that carry it there) at the top level.
fn group_floats(
    frame_group: Option<&InMemDicomObject>,
    shared: Option<&InMemDicomObject>,
    top: &InMemDicomObject,
    macro_tag: Tag,
    tag: Tag,
) -> Option<Vec<f64>> {
    [frame_group, shared]
        .into_iter()
        .flatten()
        .find_map(|g| items(g, macro_tag).first().and_then(|m| floats(m, tag)))
        .or_else(|| floats(top, tag))
}

/// The image pixel module of one file: how its frames are stored and rescaled.
#[derive(Debug, Clone)]
pub(crate) struct PixelModule {
    pub transfer_syntax: String,
    pub layout: Layout,
    /// One per frame.
    pub rescale: Vec<Rescale>,
}

/// Read how the frames of `path` (parsed as `obj`, transfer syntax `ts`) are stored, refusing
/// what cannot become real-world values: colour or palette images, bit depths other than 8/16/32, transfer syntaxes without a decoder.
pub(crate) fn read_pixel_module(
    path: &Path,
    obj: &InMemDicomObject,
    ts: &str,
) -> Result<PixelModule, ImagingError> {
    let ts_uid = ts.split(' ').next().unwrap_or("");
    pixels::check_decodable(ts_uid)
        .map_err(|reason| ImagingError::Unsupported(format!("{}: {reason}", path.display())))?;
    if uint(obj, tags::SAMPLES_PER_PIXEL).is_some_and(|n| n != 1) {
        return Err(ImagingError::Unsupported(format!(
            "{}: colour image (only one sample per pixel makes a volume of real-world values)",
            path.display()
        )));
    }
    let photometric = text(obj, tags::PHOTOMETRIC_INTERPRETATION).unwrap_or_default();
    if !matches!(photometric.as_str(), "MONOCHROME1" | "MONOCHROME2" | "") {
        return Err(ImagingError::Unsupported(format!(
            "{}: photometric interpretation {photometric} (values are not intensities)",
            path.display()
        )));
    }
    let rows = uint(obj, tags::ROWS).ok_or_else(|| bad(path, "missing Rows"))? as usize;
    let columns = uint(obj, tags::COLUMNS).ok_or_else(|| bad(path, "missing Columns"))? as usize;
    if rows == 0 || columns == 0 {
        return Err(bad(path, "Rows and Columns must be positive"));
    }
    let bits_allocated =
        uint(obj, tags::BITS_ALLOCATED).ok_or_else(|| bad(path, "missing Bits Allocated"))? as u16;
    if !matches!(bits_allocated, 8 | 16 | 32) {
        return Err(ImagingError::Unsupported(format!(
            "{}: {bits_allocated}-bit pixels{}",
            path.display(),
            if bits_allocated == 1 {
                " (a segmentation: load it as a mask)"
            } else {
                ""
            }
        )));
    }
    let bits_stored = uint(obj, tags::BITS_STORED).map_or(bits_allocated, |b| b as u16);
    if bits_stored == 0 || bits_stored > bits_allocated {
        return Err(bad(
            path,
            format!("Bits Stored {bits_stored} with Bits Allocated {bits_allocated}"),
        ));
    }
    if ts_uid == "1.2.840.10008.1.2.4.51" && bits_stored > 8 {
        return Err(ImagingError::Unsupported(format!(
            "{}: {bits_stored}-bit JPEG Extended (process 4); its decoder reads 8-bit JPEG only",
            path.display()
        )));
    }
    let layout = Layout {
        rows,
        columns,
        bits_allocated,
        bits_stored,
        signed: uint(obj, tags::PIXEL_REPRESENTATION).unwrap_or(0) == 1,
    };
    let frames = match (
        obj.get(tags::NUMBER_OF_FRAMES),
        uint(obj, tags::NUMBER_OF_FRAMES),
    ) {
        (None, _) => 1,
        (Some(_), Some(n)) if n > 0 => n as usize,
        (Some(_), _) => return Err(bad(path, "Number of Frames is not a positive integer")),
    };
    let lut = modality_lut(path, obj, layout.signed)?;
    let per_frame = items(obj, tags::PER_FRAME_FUNCTIONAL_GROUPS_SEQUENCE);
    if !per_frame.is_empty() && per_frame.len() != frames {
        return Err(bad(
            path,
            format!(
                "{frames} frames but {} per-frame functional groups",
                per_frame.len()
            ),
        ));
    }
    let shared = items(obj, tags::SHARED_FUNCTIONAL_GROUPS_SEQUENCE).first();
    // RT Dose: stored values × Dose Grid Scaling are the dose in Gy.
    let dose_scaling = floats(obj, tags::DOSE_GRID_SCALING)
        .and_then(|v| v.first().copied())
        .filter(|s| *s > 0.0)
        .unwrap_or(1.0);
    let rescale = (0..frames)
        .map(|frame| {
            let first = |tag: Tag| {
                group_floats(
                    per_frame.get(frame),
                    shared,
                    obj,
                    tags::PIXEL_VALUE_TRANSFORMATION_SEQUENCE,
                    tag,
                )
                .and_then(|v| v.first().copied())
            };
            Rescale {
                slope: first(tags::RESCALE_SLOPE).unwrap_or(1.0) * dose_scaling,
                intercept: first(tags::RESCALE_INTERCEPT).unwrap_or(0.0),
                lut: lut.clone(),
            }
        })
        .collect();
    Ok(PixelModule {
        transfer_syntax: ts_uid.to_string(),
        layout,
        rescale,
    })
}

/// The Modality LUT Sequence's table, if the file has one (it replaces the linear rescale).
fn modality_lut(
    path: &Path,
    obj: &InMemDicomObject,
    signed: bool,
) -> Result<Option<std::sync::Arc<pixels::ModalityLut>>, ImagingError> {
    let Some(item) = obj.get(tags::MODALITY_LUT_SEQUENCE) else {
        return Ok(None);
    };
    let item = item
        .items()
        .and_then(|i| i.first())
        .ok_or_else(|| bad(path, "empty Modality LUT Sequence"))?;
    let ints = |tag: Tag| {
        item.get(tag)
            .and_then(|e| e.value().to_multi_int::<i64>().ok())
            .ok_or_else(|| bad(path, format!("Modality LUT without a readable {tag}")))
    };
    let descriptor = ints(tags::LUT_DESCRIPTOR)?;
    let data = ints(tags::LUT_DATA)?;
    let [entries, first, _bits] = descriptor[..] else {
        return Err(bad(path, "LUT Descriptor does not have 3 values"));
    };
    // 0 entries means 65536; the first mapped value is signed when the pixels are.
    let entries = if entries == 0 {
        65536
    } else {
        entries as usize
    };
    let first = if signed {
        i64::from(first as u16 as i16)
    } else {
        first as u16 as i64
    };
    if data.len() != entries {
        return Err(bad(
            path,
            format!(
                "LUT Data has {} entries; its descriptor says {entries}",
                data.len()
            ),
        ));
    }
    Ok(Some(std::sync::Arc::new(pixels::ModalityLut {
        first,
        table: data.iter().map(|v| *v as f64).collect(),
    })))
}

/// Every frame of the image `path` (parsed as `obj`, transfer syntax `ts`), placed in space.
pub(crate) fn read_slices(
    path: &Path,
    obj: &InMemDicomObject,
    ts: &str,
) -> Result<Vec<Slice>, ImagingError> {
    let module = read_pixel_module(path, obj, ts)?;
    let frames = module.rescale.len();
    let per_frame = items(obj, tags::PER_FRAME_FUNCTIONAL_GROUPS_SEQUENCE);
    let shared = items(obj, tags::SHARED_FUNCTIONAL_GROUPS_SEQUENCE).first();
    let grid_offsets = floats(obj, tags::GRID_FRAME_OFFSET_VECTOR);
    if per_frame.is_empty() && frames > 1 && grid_offsets.is_none() {
        return Err(ImagingError::Unsupported(format!(
            "{}: multi-frame image with {frames} frames but neither per-frame functional groups \
             nor a Grid Frame Offset Vector to place them",
            path.display()
        )));
    }
    let mut slices = Vec::with_capacity(frames);
    for (frame, rescale) in module.rescale.iter().enumerate() {
        let group = per_frame.get(frame);
        let name = || {
            if frames > 1 {
                format!(" of frame {}", frame + 1)
            } else {
                String::new()
            }
        };
        let need = |macro_tag: Tag, tag: Tag, what: &str, n: usize| {
            let v = group_floats(group, shared, obj, macro_tag, tag)
                .ok_or_else(|| bad(path, format!("missing or invalid {what}{}", name())))?;
            if v.len() != n {
                return Err(bad(path, format!("{what} has {} values, not {n}", v.len())));
            }
            Ok(v)
        };
        let mut position = vec3(&need(
            tags::PLANE_POSITION_SEQUENCE,
            tags::IMAGE_POSITION_PATIENT,
            "Image Position (Patient)",
            3,
        )?);
        let orientation = need(
            tags::PLANE_ORIENTATION_SEQUENCE,
            tags::IMAGE_ORIENTATION_PATIENT,
            "Image Orientation (Patient)",
            6,
        )?;
        let spacing = need(
            tags::PIXEL_MEASURES_SEQUENCE,
            tags::PIXEL_SPACING,
            "Pixel Spacing",
            2,
        )?;
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
        if per_frame.is_empty()
            && let Some(offsets) = &grid_offsets
        {
            position =
                grid_frame_position(path, position, row_dir, col_dir, offsets, frames, frame)?;
        }
        slices.push(Slice {
            path: path.to_path_buf(),
            frame,
            frames,
            transfer_syntax: module.transfer_syntax.clone(),
            position,
            row_dir,
            col_dir,
            spacing: [spacing[0], spacing[1]],
            layout: module.layout,
            rescale: rescale.clone(),
            thickness: group_floats(
                group,
                shared,
                obj,
                tags::PIXEL_MEASURES_SEQUENCE,
                tags::SLICE_THICKNESS,
            )
            .and_then(|v| v.first().copied()),
        });
    }
    Ok(slices)
}

/// Position of frame `frame` of an RT Dose grid: Image Position (Patient) moved along the
/// normal by the frame's Grid Frame Offset (relative when the first offset is 0; absolute z
/// when the frames are axial and the first offset is the position's z).
fn grid_frame_position(
    path: &Path,
    position: [f64; 3],
    row_dir: [f64; 3],
    col_dir: [f64; 3],
    offsets: &[f64],
    frames: usize,
    frame: usize,
) -> Result<[f64; 3], ImagingError> {
    if offsets.len() != frames {
        return Err(bad(
            path,
            format!(
                "Grid Frame Offset Vector has {} values for {frames} frames",
                offsets.len()
            ),
        ));
    }
    let normal = cross(row_dir, col_dir);
    let axial = (normal[2].abs() - 1.0).abs() < 1e-6;
    let base = if offsets[0].abs() < 1e-6 {
        0.0
    } else if axial && (offsets[0] - position[2]).abs() < 1e-3 {
        position[2]
    } else {
        return Err(bad(
            path,
            "Grid Frame Offset Vector neither starts at 0 nor at the image position",
        ));
    };
    let d = offsets[frame] - base;
    let d = if base != 0.0 { d * normal[2] } else { d };
    Ok(std::array::from_fn(|i| position[i] + d * normal[i]))
}

/// Decode the frames `work` (all from `path`) into their places, reading the file once and
/// spreading the frames over `workers` threads.
fn decode_file(
    path: &Path,
    work: Vec<(&Slice, &mut [f32])>,
    workers: usize,
) -> Result<(), ImagingError> {
    let (obj, _) = amicus_index::header::read_whole(path).map_err(|e| bad(path, e.to_string()))?;
    let decode = |slice: &Slice, out: &mut [f32]| {
        pixels::decode_frame(
            &obj,
            &slice.transfer_syntax,
            slice.frame,
            &slice.layout,
            &slice.rescale,
            out,
        )
        .map_err(|reason| bad(path, reason))
    };
    if workers <= 1 || work.len() <= 1 {
        for (slice, out) in work {
            decode(slice, out)?;
        }
        return Ok(());
    }
    let mut shares: Vec<Vec<(&Slice, &mut [f32])>> = (0..workers).map(|_| Vec::new()).collect();
    for (i, w) in work.into_iter().enumerate() {
        shares[i % workers].push(w);
    }
    std::thread::scope(|scope| {
        let handles: Vec<_> = shares
            .into_iter()
            .map(|share| {
                scope.spawn(|| {
                    for (slice, out) in share {
                        decode(slice, out)?;
                    }
                    Ok(())
                })
            })
            .collect();
        joined(handles)
    })
}

fn joined(
    handles: Vec<std::thread::ScopedJoinHandle<'_, Result<(), ImagingError>>>,
) -> Result<(), ImagingError> {
    let mut result = Ok(());
    for h in handles {
        let r = h
            .join()
            .unwrap_or_else(|_| Err(ImagingError::Unsupported("pixel decoder panicked".into())));
        if result.is_ok() {
            result = r;
        }
    }
    result
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
                s.name(),
                first.name()
            )));
        }
        if (s.layout.rows, s.layout.columns) != (first.layout.rows, first.layout.columns)
            || (0..2).any(|i| (s.spacing[i] - first.spacing[i]).abs() > 1e-4)
        {
            return Err(ImagingError::Inconsistent(format!(
                "{} has another matrix or pixel spacing than {}",
                s.name(),
                first.name()
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
                s.name()
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
                slices[i].name(),
                slices[i + 1].name()
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
        size: [first.layout.columns, first.layout.rows, slices.len()],
    };
    Ok((slices, geometry))
}

/// The grid of the images `files` (one series), from their headers only.
pub fn series_geometry(files: &[PathBuf]) -> Result<Geometry, ImagingError> {
    let mut slices = Vec::with_capacity(files.len());
    for path in files {
        let (obj, ts) =
            amicus_index::header::read_header(path).map_err(|e| bad(path, e.to_string()))?;
        slices.extend(read_slices(path, &obj, &ts)?);
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
        slices.extend(read_slices(path, &obj, &ts)?);
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
    // Each file is read once and its frames decoded straight into their places: files spread
    // over every core, or, for fewer files than cores (a multi-frame series), frames do.
    let mut by_file: BTreeMap<&Path, Vec<(&Slice, &mut [f32])>> = BTreeMap::new();
    for (slice, out) in slices.iter().zip(data.chunks_mut(plane)) {
        by_file.entry(&slice.path).or_default().push((slice, out));
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    if by_file.len() < cores {
        for (path, work) in by_file {
            decode_file(path, work, cores)?;
        }
    } else {
        let mut shares: Vec<Vec<_>> = (0..cores).map(|_| Vec::new()).collect();
        for (i, file) in by_file.into_iter().enumerate() {
            shares[i % cores].push(file);
        }
        std::thread::scope(|scope| {
            let handles: Vec<_> = shares
                .into_iter()
                .map(|share| {
                    scope.spawn(move || {
                        for (path, work) in share {
                            decode_file(path, work, 1)?;
                        }
                        Ok(())
                    })
                })
                .collect();
            joined(handles)
        })?;
    }
    Ok(Volume { data, geometry })
}

/// Every frame of one image file as real-world values, without geometry: for images that are
/// not part of a volume (radiographs, single slices) and for checking decoders. Frames are in
/// file order; the result is (frames, rows, columns) row-major.
pub fn load_frames(path: &Path, max_bytes: u64) -> Result<Frames, ImagingError> {
    let (obj, ts) =
        amicus_index::header::read_header(path).map_err(|e| bad(path, e.to_string()))?;
    let module = read_pixel_module(path, &obj, &ts)?;
    let (rows, columns) = (module.layout.rows, module.layout.columns);
    let frames = module.rescale.len();
    crate::options::fits([columns, rows, frames], max_bytes)?;
    let slices: Vec<Slice> = module
        .rescale
        .iter()
        .enumerate()
        .map(|(frame, rescale)| Slice {
            path: path.to_path_buf(),
            frame,
            frames,
            transfer_syntax: module.transfer_syntax.clone(),
            position: [0.0; 3],
            row_dir: [1.0, 0.0, 0.0],
            col_dir: [0.0, 1.0, 0.0],
            spacing: [1.0, 1.0],
            layout: module.layout,
            rescale: rescale.clone(),
            thickness: None,
        })
        .collect();
    let plane = rows * columns;
    let mut data = vec![0f32; plane * frames];
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let work = slices.iter().zip(data.chunks_mut(plane)).collect();
    decode_file(path, work, cores)?;
    Ok(Frames {
        data,
        frames,
        rows,
        columns,
    })
}

/// Frames of one image file: (frames, rows, columns) row-major real-world values.
#[derive(Debug, Clone, PartialEq)]
pub struct Frames {
    pub data: Vec<f32>,
    pub frames: usize,
    pub rows: usize,
    pub columns: usize,
}
