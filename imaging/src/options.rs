//! Options a train may ask for on a loaded volume: an intensity window, and crop/pad to a fixed
//! size around the centre.

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
        return Err(ImagingError::Inconsistent(format!(
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

/// Crop or pad (with `fill`) to `size` (x, y, z), keeping the volume's centre; the geometry's
/// origin moves with the grid. `max_bytes` bounds the result.
pub fn crop_or_pad(
    volume: &Volume,
    size: [usize; 3],
    fill: f32,
    max_bytes: u64,
) -> Result<Volume, ImagingError> {
    if size.contains(&0) {
        return Err(ImagingError::Inconsistent(
            "crop/pad size must be positive".into(),
        ));
    }
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
    let old = volume.geometry.size;
    // Offset of the new grid's first voxel in old voxel coordinates (may be negative).
    let offset: Vec<i64> = (0..3)
        .map(|a| (old[a] as i64 - size[a] as i64) / 2)
        .collect();
    let mut data = vec![fill; size[0] * size[1] * size[2]];
    for z in 0..size[2] {
        let oz = z as i64 + offset[2];
        if oz < 0 || oz >= old[2] as i64 {
            continue;
        }
        for y in 0..size[1] {
            let oy = y as i64 + offset[1];
            if oy < 0 || oy >= old[1] as i64 {
                continue;
            }
            for x in 0..size[0] {
                let ox = x as i64 + offset[0];
                if ox < 0 || ox >= old[0] as i64 {
                    continue;
                }
                data[(z * size[1] + y) * size[0] + x] =
                    volume.data[(oz as usize * old[1] + oy as usize) * old[0] + ox as usize];
            }
        }
    }
    let mut geometry = volume.geometry.clone();
    geometry.origin = geometry.to_patient([offset[0] as f64, offset[1] as f64, offset[2] as f64]);
    geometry.size = size;
    Ok(Volume { data, geometry })
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
