//! Training patches from an image and its label mask: fixed-size boxes (2D when one slice
//! deep, 2.5D slabs when a few, 3D otherwise) centred on voxels drawn, with a seed, from the
//! label (foreground) or from outside it (background) in a requested proportion.
//!
//! Owns the sampling rule and nothing else: the caller loads, resamples and normalises the
//! volumes first and decides what may be sampled.

use crate::ImagingError;
use crate::grid::Volume;
use crate::options::copy_region;

/// What a train asks for.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PatchRequest {
    /// Patch size (x, y, z).
    pub size: [usize; 3],
    pub count: usize,
    /// Share of patches centred on a label voxel, in [0, 1].
    pub foreground_fraction: f32,
    pub seed: u64,
}

/// Patches, back to back, each (z, y, x) row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Patches {
    pub images: Vec<f32>,
    pub masks: Vec<f32>,
    /// Centre voxel (x, y, z) of each patch and whether it was drawn from the label.
    pub centres: Vec<([usize; 3], bool)>,
}

/// SplitMix64: a small, well-mixed, seedable generator (the sampling must be reproducible from
/// the seed alone, on any station).
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in 0..n (n > 0), without modulo bias worth mentioning for n ≪ 2^64.
    fn below(&mut self, n: usize) -> usize {
        ((u128::from(self.next()) * n as u128) >> 64) as usize
    }
}

/// Sample `request.count` patches of `image` and `mask` (same grid). Foreground patches are
/// centred on voxels with mask ≥ 0.5, background ones on the others; when one kind does not
/// exist the other is drawn instead (the centres say which each patch is). Outside the volume
/// images are padded with `fill`, masks with 0. `max_bytes` bounds the result.
pub fn sample_patches(
    image: &Volume,
    mask: &Volume,
    request: &PatchRequest,
    fill: f32,
    max_bytes: u64,
) -> Result<Patches, ImagingError> {
    if image.geometry.size != mask.geometry.size {
        return Err(ImagingError::Inconsistent(format!(
            "image grid {:?} and mask grid {:?} differ",
            image.geometry.size, mask.geometry.size
        )));
    }
    let size = request.size;
    if size.contains(&0) || request.count == 0 {
        return Err(ImagingError::InvalidRequest(
            "patch size and count must be positive".into(),
        ));
    }
    if !(0.0..=1.0).contains(&request.foreground_fraction) {
        return Err(ImagingError::InvalidRequest(format!(
            "foreground fraction {} is not within [0, 1]",
            request.foreground_fraction
        )));
    }
    let per_patch = size
        .iter()
        .try_fold(1u64, |acc, &n| acc.checked_mul(n as u64));
    let needed = per_patch
        .and_then(|p| p.checked_mul(request.count as u64))
        .and_then(|v| v.checked_mul(8))
        .unwrap_or(u64::MAX);
    if needed > max_bytes {
        return Err(ImagingError::TooLarge {
            needed,
            available: max_bytes,
        });
    }
    let foreground: Vec<usize> = (0..mask.data.len())
        .filter(|&i| mask.data[i] >= 0.5)
        .collect();
    let background_count = mask.data.len() - foreground.len();
    let wanted_fg =
        (request.count as f64 * f64::from(request.foreground_fraction)).round() as usize;
    let old = image.geometry.size;
    let voxel = |i: usize| [i % old[0], (i / old[0]) % old[1], i / (old[0] * old[1])];
    let mut rng = SplitMix(request.seed);
    let patch = size[0] * size[1] * size[2];
    let mut images = vec![fill; patch * request.count];
    let mut masks = vec![0f32; patch * request.count];
    let mut centres = Vec::with_capacity(request.count);
    for n in 0..request.count {
        let want_fg = n < wanted_fg;
        let from_fg = if want_fg {
            !foreground.is_empty()
        } else {
            background_count == 0
        };
        let centre = if from_fg {
            voxel(foreground[rng.below(foreground.len())])
        } else {
            // The k-th background voxel, found by skipping over foreground indices.
            let mut k = rng.below(background_count);
            let mut index = k;
            for &f in &foreground {
                if f <= index {
                    index += 1;
                } else {
                    break;
                }
            }
            k = index;
            voxel(k)
        };
        let offset = std::array::from_fn(|a| centre[a] as i64 - (size[a] as i64 - 1) / 2);
        let range = n * patch..(n + 1) * patch;
        copy_region(&image.data, old, offset, &mut images[range.clone()], size);
        copy_region(&mask.data, old, offset, &mut masks[range], size);
        centres.push((centre, from_fg));
    }
    Ok(Patches {
        images,
        masks,
        centres,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::grid::Geometry;
    use proptest::prelude::*;

    fn volume(size: [usize; 3], f: impl Fn(usize) -> f32) -> Volume {
        Volume {
            data: (0..size.iter().product()).map(f).collect(),
            geometry: Geometry {
                origin: [0.0; 3],
                spacing: [1.0; 3],
                direction: [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]],
                size,
            },
        }
    }

    proptest! {
        #[test]
        fn patches_are_the_volume_around_their_centres(
            seed in any::<u64>(),
            fraction in 0.0f32..=1.0,
            sx in 1usize..6, sy in 1usize..6, sz in 1usize..4,
        ) {
            let size = [9, 7, 5];
            let image = volume(size, |i| i as f32);
            // A small box of label.
            let mask = volume(size, |i| {
                let (x, y, z) = (i % 9, (i / 9) % 7, i / 63);
                f32::from((3..5).contains(&x) && (2..4).contains(&y) && z == 2)
            });
            let request = PatchRequest { size: [sx, sy, sz], count: 12, foreground_fraction: fraction, seed };
            let p = sample_patches(&image, &mask, &request, -1.0, 1 << 20).unwrap();
            prop_assert_eq!(p.centres.len(), 12);
            let wanted = (12.0 * f64::from(fraction)).round() as usize;
            for (n, &(c, fg)) in p.centres.iter().enumerate() {
                prop_assert_eq!(fg, n < wanted);
                let label = mask.data[(c[2] * 7 + c[1]) * 9 + c[0]];
                prop_assert_eq!(label >= 0.5, fg);
                // Every voxel of the patch is the volume's voxel at centre + offset, or fill.
                let patch = sx * sy * sz;
                for z in 0..sz { for y in 0..sy { for x in 0..sx {
                    let v = [
                        c[0] as i64 + x as i64 - (sx as i64 - 1) / 2,
                        c[1] as i64 + y as i64 - (sy as i64 - 1) / 2,
                        c[2] as i64 + z as i64 - (sz as i64 - 1) / 2,
                    ];
                    let inside = v.iter().zip(size).all(|(p, n)| *p >= 0 && *p < n as i64);
                    let got = p.images[n * patch + (z * sy + y) * sx + x];
                    let expected = if inside { ((v[2] * 7 + v[1]) * 9 + v[0]) as f32 } else { -1.0 };
                    prop_assert_eq!(got, expected);
                }}}
            }
            // The same seed gives the same patches.
            prop_assert_eq!(sample_patches(&image, &mask, &request, -1.0, 1 << 20).unwrap(), p);
        }
    }

    #[test]
    fn missing_foreground_falls_back_and_limits_hold() {
        let image = volume([4, 4, 4], |i| i as f32);
        let empty = volume([4, 4, 4], |_| 0.0);
        let request = PatchRequest {
            size: [2, 2, 1],
            count: 4,
            foreground_fraction: 1.0,
            seed: 1,
        };
        let p = sample_patches(&image, &empty, &request, 0.0, 1 << 20).unwrap();
        assert!(p.centres.iter().all(|(_, fg)| !fg));
        let huge = PatchRequest {
            size: [1000, 1000, 1000],
            ..request
        };
        assert!(matches!(
            sample_patches(&image, &empty, &huge, 0.0, 1 << 20),
            Err(ImagingError::TooLarge { .. })
        ));
        let bad = PatchRequest {
            foreground_fraction: 1.5,
            ..request
        };
        assert!(sample_patches(&image, &empty, &bad, 0.0, 1 << 20).is_err());
        let other = volume([4, 4, 3], |_| 0.0);
        assert!(sample_patches(&image, &other, &request, 0.0, 1 << 20).is_err());
    }
}
