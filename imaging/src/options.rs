//! Options a train may ask for on a loaded volume: resampling to a spacing (trilinear for
//! images, nearest neighbour for masks), an intensity window, and crop/pad to a fixed size
//! around the centre.

use crate::ImagingError;
use crate::grid::Volume;

/// Intensity window: values are clipped to [center - width/2, center + width/2] and scaled to
/// [0, 1].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Window {
    pub center: f32,
    pub width: f32,
}

pub fn apply_window(volume: &mut Volume, w: Window) -> Result<(), ImagingError> {
    if !(w.width > 0.0 && w.width.is_finite() && w.center.is_finite()) {
        return Err(ImagingError::InvalidRequest(format!(
            "window width {} must be positive",
            w.width
        )));
    }
    let low = w.center - w.width / 2.0;
    for v in &mut volume.data {
        *v = ((*v - low) / w.width).clamp(0.0, 1.0);
    }
    Ok(())
}

/// Refuse a float32 grid of `size` voxels that would not fit in `max_bytes`.
pub(crate) fn fits(size: [usize; 3], max_bytes: u64) -> Result<(), ImagingError> {
    let needed = size
        .iter()
        .try_fold(4u64, |acc, &n| acc.checked_mul(n as u64))
        .unwrap_or(u64::MAX);
    if needed > max_bytes {
        return Err(ImagingError::TooLarge {
            needed,
            available: max_bytes,
        });
    }
    Ok(())
}

/// Resample to `spacing` (x, y, z) in mm on a grid with the same origin and direction that
/// covers the same extent: trilinear interpolation for images, nearest neighbour for masks
/// (`nearest`). `max_bytes` bounds the result.
pub fn resample(
    volume: &Volume,
    spacing: [f64; 3],
    nearest: bool,
    max_bytes: u64,
) -> Result<Volume, ImagingError> {
    if spacing.iter().any(|s| !(s.is_finite() && *s > 0.0)) {
        return Err(ImagingError::InvalidRequest(format!(
            "spacing {spacing:?} must be positive"
        )));
    }
    let old = volume.geometry.size;
    let old_spacing = volume.geometry.spacing;
    let size: [usize; 3] = std::array::from_fn(|a| {
        ((old[a] as f64 * old_spacing[a] / spacing[a]).round() as usize).max(1)
    });
    fits(size, max_bytes)?;
    // Old continuous coordinate of new voxel i along each axis, split into index and weight.
    let axis = |a: usize| -> Vec<(usize, usize, f32)> {
        (0..size[a])
            .map(|i| {
                let x = (i as f64 * spacing[a] / old_spacing[a]).clamp(0.0, (old[a] - 1) as f64);
                let lo = x.floor() as usize;
                let hi = (lo + 1).min(old[a] - 1);
                let t = (x - lo as f64) as f32;
                if nearest {
                    let n = if t >= 0.5 { hi } else { lo };
                    (n, n, 0.0)
                } else {
                    (lo, hi, t)
                }
            })
            .collect()
    };
    let (ax, ay, az) = (axis(0), axis(1), axis(2));
    let at = |x: usize, y: usize, z: usize| volume.data[(z * old[1] + y) * old[0] + x];
    let mut data = Vec::with_capacity(size.iter().product());
    for &(z0, z1, tz) in &az {
        for &(y0, y1, ty) in &ay {
            for &(x0, x1, tx) in &ax {
                let lerp = |a: f32, b: f32, t: f32| a + (b - a) * t;
                let plane = |z| {
                    lerp(
                        lerp(at(x0, y0, z), at(x1, y0, z), tx),
                        lerp(at(x0, y1, z), at(x1, y1, z), tx),
                        ty,
                    )
                };
                data.push(lerp(plane(z0), plane(z1), tz));
            }
        }
    }
    let mut geometry = volume.geometry.clone();
    geometry.spacing = spacing;
    geometry.size = size;
    Ok(Volume { data, geometry })
}

/// Crop or pad (with `fill`) to `size` (x, y, z), keeping the volume's centre; the geometry's
/// origin moves with the grid. `max_bytes` bounds the result.
pub fn crop_or_pad(
    volume: &Volume,
    size: [usize; 3],
    fill: f32,
    max_bytes: u64,
) -> Result<Volume, ImagingError> {
    let old = volume.geometry.size;
    let offset = std::array::from_fn(|a| (old[a] as i64 - size[a] as i64) / 2);
    crop_at(volume, size, offset, fill, max_bytes)
}

/// Crop or pad (with `fill`) to `size` (x, y, z) centred on the continuous voxel position
/// `centre` (x, y, z) of this grid, which may lie outside it.
pub fn crop_or_pad_around(
    volume: &Volume,
    size: [usize; 3],
    centre: [f64; 3],
    fill: f32,
    max_bytes: u64,
) -> Result<Volume, ImagingError> {
    if centre.iter().any(|c| !c.is_finite() || c.abs() > 1e9) {
        return Err(ImagingError::InvalidRequest(format!(
            "crop centre {centre:?} is not a finite position"
        )));
    }
    let offset = std::array::from_fn(|a| (centre[a] - (size[a] as f64 - 1.0) / 2.0).round() as i64);
    crop_at(volume, size, offset, fill, max_bytes)
}

/// The sub-grid of `size` whose first voxel is `offset` (in this grid's voxels, possibly
/// negative); voxels outside the volume get `fill`.
fn crop_at(
    volume: &Volume,
    size: [usize; 3],
    offset: [i64; 3],
    fill: f32,
    max_bytes: u64,
) -> Result<Volume, ImagingError> {
    if size.contains(&0) {
        return Err(ImagingError::InvalidRequest(
            "crop/pad size must be positive".into(),
        ));
    }
    fits(size, max_bytes)?;
    let old = volume.geometry.size;
    let mut data = vec![fill; size[0] * size[1] * size[2]];
    copy_region(&volume.data, old, offset, &mut data, size);
    let mut geometry = volume.geometry.clone();
    geometry.origin = geometry.to_patient([offset[0] as f64, offset[1] as f64, offset[2] as f64]);
    geometry.size = size;
    Ok(Volume { data, geometry })
}

/// Copy the part of `src` (size `old`) that the box at `offset` of size `size` covers into
/// `dst`, leaving the rest of `dst` as it is.
pub(crate) fn copy_region(
    src: &[f32],
    old: [usize; 3],
    offset: [i64; 3],
    dst: &mut [f32],
    size: [usize; 3],
) {
    // The overlap along each axis, in destination coordinates.
    let range = |a: usize| {
        let lo = (-offset[a]).clamp(0, size[a] as i64) as usize;
        let hi = (old[a] as i64 - offset[a]).clamp(0, size[a] as i64) as usize;
        lo..hi.max(lo)
    };
    let (xs, ys, zs) = (range(0), range(1), range(2));
    if xs.is_empty() {
        return;
    }
    for z in zs {
        let oz = (z as i64 + offset[2]) as usize;
        for y in ys.clone() {
            let oy = (y as i64 + offset[1]) as usize;
            let ox = (xs.start as i64 + offset[0]) as usize;
            let from = (oz * old[1] + oy) * old[0] + ox;
            let to = (z * size[1] + y) * size[0] + xs.start;
            dst[to..to + xs.len()].copy_from_slice(&src[from..from + xs.len()]);
        }
    }
}

/// Keep `count` slices from slice `first` (z), for 2D slices (count 1) or 2.5D slabs.
pub fn select_slices(volume: &Volume, first: usize, count: usize) -> Result<Volume, ImagingError> {
    let [nx, ny, nz] = volume.geometry.size;
    if count == 0 || first.checked_add(count).is_none_or(|end| end > nz) {
        return Err(ImagingError::InvalidRequest(format!(
            "slices {first}..{} are not within the volume's {nz} slices",
            first.saturating_add(count)
        )));
    }
    let plane = nx * ny;
    let data = volume.data[first * plane..(first + count) * plane].to_vec();
    let mut geometry = volume.geometry.clone();
    geometry.origin = geometry.to_patient([0.0, 0.0, first as f64]);
    geometry.size = [nx, ny, count];
    Ok(Volume { data, geometry })
}

/// Scale to mean 0 and standard deviation 1 over the whole volume (a constant volume
/// becomes all zeros).
pub fn z_score(volume: &mut Volume) {
    let n = volume.data.len().max(1) as f64;
    let mean = volume.data.iter().map(|v| f64::from(*v)).sum::<f64>() / n;
    let var = volume
        .data
        .iter()
        .map(|v| (f64::from(*v) - mean).powi(2))
        .sum::<f64>()
        / n;
    let std = var.sqrt();
    for v in &mut volume.data {
        *v = if std > 0.0 {
            ((f64::from(*v) - mean) / std) as f32
        } else {
            0.0
        };
    }
}

/// Centre (continuous voxel x, y, z) of the bounding box of a mask's voxels ≥ 0.5; `None` for
/// an empty mask.
pub fn label_box_centre(mask: &Volume) -> Option<[f64; 3]> {
    let [nx, ny, _] = mask.geometry.size;
    let mut lo = [usize::MAX; 3];
    let mut hi = [0usize; 3];
    for (i, v) in mask.data.iter().enumerate() {
        if *v >= 0.5 {
            let p = [i % nx, (i / nx) % ny, i / (nx * ny)];
            for a in 0..3 {
                lo[a] = lo[a].min(p[a]);
                hi[a] = hi[a].max(p[a]);
            }
        }
    }
    (lo[0] != usize::MAX).then(|| std::array::from_fn(|a| (lo[a] + hi[a]) as f64 / 2.0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::grid::Geometry;

    fn ramp(size: [usize; 3]) -> Volume {
        let n = size.iter().product::<usize>();
        Volume {
            data: (0..n).map(|i| i as f32).collect(),
            geometry: Geometry {
                origin: [0.0; 3],
                spacing: [1.0, 2.0, 3.0],
                direction: [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]],
                size,
            },
        }
    }

    #[test]
    fn crop_then_pad_keeps_the_centre_and_geometry() {
        let v = ramp([4, 4, 4]);
        let c = crop_or_pad(&v, [2, 2, 2], -1.0, 1 << 20).unwrap();
        assert_eq!(c.data[0], v.data[(16 + 4) + 1]);
        assert_eq!(c.geometry.origin, [1.0, 2.0, 3.0]);
        let p = crop_or_pad(&v, [6, 6, 6], -1.0, 1 << 20).unwrap();
        assert_eq!(p.data[0], -1.0);
        assert_eq!(p.data[(36 + 6) + 1], v.data[0]);
        assert_eq!(p.geometry.origin, [-1.0, -2.0, -3.0]);
        assert!(matches!(
            crop_or_pad(&v, [1000, 1000, 1000], 0.0, 1 << 20),
            Err(ImagingError::TooLarge { .. })
        ));
    }

    #[test]
    fn slices_centres_and_normalisation() {
        let v = ramp([4, 4, 4]);
        // A 2.5D slab of slices 1..3 keeps the voxels and moves the origin by one slice.
        let slab = select_slices(&v, 1, 2).unwrap();
        assert_eq!(slab.geometry.size, [4, 4, 2]);
        assert_eq!(slab.data[..], v.data[16..48]);
        assert_eq!(slab.geometry.origin, [0.0, 0.0, 3.0]);
        assert!(select_slices(&v, 3, 2).is_err());
        assert!(select_slices(&v, 0, 0).is_err());
        // Crop around a voxel near the corner: padded where the box leaves the volume.
        let c = crop_or_pad_around(&v, [3, 3, 1], [0.0, 0.0, 2.0], -1.0, 1 << 20).unwrap();
        assert_eq!(c.data[0], -1.0);
        assert_eq!(c.data[4], v.data[32]);
        assert_eq!(c.geometry.origin, [-1.0, -2.0, 6.0]);
        assert!(crop_or_pad_around(&v, [3, 3, 1], [f64::NAN, 0.0, 0.0], 0.0, 1 << 20).is_err());
        // Bounding box centre of a label.
        let mut m = ramp([4, 4, 4]);
        for (i, x) in m.data.iter_mut().enumerate() {
            *x = f32::from(i == 5 || i == 42);
        }
        assert_eq!(label_box_centre(&m), Some([1.5, 1.5, 1.0]));
        m.data.fill(0.0);
        assert_eq!(label_box_centre(&m), None);
        // z-score: mean 0, standard deviation 1.
        let mut z = ramp([4, 1, 1]);
        z_score(&mut z);
        let mean: f32 = z.data.iter().sum::<f32>() / 4.0;
        let var: f32 = z.data.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / 4.0;
        assert!(mean.abs() < 1e-6 && (var - 1.0).abs() < 1e-5);
    }

    #[test]
    fn resampling_interpolates_images_and_keeps_masks_binary() {
        // x ramp 0, 1, 2, 3 at 1 mm → 0.5 mm: 8 samples, linear, clamped at the end.
        let v = ramp([4, 1, 1]);
        let r = resample(&v, [0.5, 2.0, 3.0], false, 1 << 20).unwrap();
        assert_eq!(r.geometry.size, [8, 1, 1]);
        assert_eq!(r.data, [0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.0]);
        assert_eq!(r.geometry.origin, v.geometry.origin);
        // Downsampling a mask by 2 with nearest neighbour stays 0/1.
        let mut m = ramp([4, 4, 1]);
        for (i, x) in m.data.iter_mut().enumerate() {
            *x = if i % 4 >= 2 { 1.0 } else { 0.0 };
        }
        let r = resample(&m, [2.0, 4.0, 3.0], true, 1 << 20).unwrap();
        assert_eq!(r.geometry.size, [2, 2, 1]);
        assert_eq!(r.data, [0.0, 1.0, 0.0, 1.0]);
        assert!(matches!(
            resample(&v, [1e-6, 1.0, 1.0], false, 1 << 20),
            Err(ImagingError::TooLarge { .. })
        ));
        assert!(resample(&v, [0.0, 1.0, 1.0], false, 1 << 20).is_err());
    }

    #[test]
    fn window_scales_to_unit_range() {
        let mut v = ramp([4, 1, 1]);
        apply_window(
            &mut v,
            Window {
                center: 1.5,
                width: 2.0,
            },
        )
        .unwrap();
        assert_eq!(v.data, [0.0, 0.25, 0.75, 1.0]);
        assert!(
            apply_window(
                &mut v,
                Window {
                    center: 0.0,
                    width: 0.0
                }
            )
            .is_err()
        );
    }
}
