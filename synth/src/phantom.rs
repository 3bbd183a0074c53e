//! A thorax-like phantom in patient coordinates (LPS, millimetres; z increases superiorly):
//! body outline with a subcutaneous fat layer, two lungs that taper towards the apex,
//! mediastinum and heart, a vertebral body, and 0-3 ellipsoidal lesions inside the lungs.
//! Densities are in Hounsfield units; every shape is analytic so ground truth is exact.

use crate::profile::Profile;
use crate::rng::Rng;
use serde::Serialize;

/// An axis-aligned ellipse in a transverse plane.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Ellipse {
    pub cx: f64,
    pub cy: f64,
    pub rx: f64,
    pub ry: f64,
}

impl Ellipse {
    pub fn contains(&self, x: f64, y: f64) -> bool {
        let dx = (x - self.cx) / self.rx;
        let dy = (y - self.cy) / self.ry;
        dx * dx + dy * dy <= 1.0
    }

    /// `n` points on the outline, counter-clockwise.
    pub fn polygon(&self, n: usize) -> Vec<(f64, f64)> {
        (0..n)
            .map(|i| {
                let t = 2.0 * std::f64::consts::PI * i as f64 / n as f64;
                (self.cx + self.rx * t.cos(), self.cy + self.ry * t.sin())
            })
            .collect()
    }
}

/// An axis-aligned ellipsoidal lesion.
#[derive(Debug, Clone, Serialize)]
pub struct Lesion {
    /// "GTV-1", "GTV-2", ...
    pub name: String,
    pub center: [f64; 3],
    pub radii: [f64; 3],
    pub hu: f64,
}

impl Lesion {
    /// The lesion's cross-section in the plane `z`, if it cuts it.
    pub fn section(&self, z: f64) -> Option<Ellipse> {
        let dz = (z - self.center[2]) / self.radii[2];
        if dz.abs() >= 1.0 {
            return None;
        }
        let k = (1.0 - dz * dz).sqrt();
        Some(Ellipse {
            cx: self.center[0],
            cy: self.center[1],
            rx: self.radii[0] * k,
            ry: self.radii[1] * k,
        })
    }

    pub fn volume_mm3(&self) -> f64 {
        4.0 / 3.0 * std::f64::consts::PI * self.radii.iter().product::<f64>()
    }
}

/// One patient's anatomy.
#[derive(Debug, Clone, Serialize)]
pub struct Phantom {
    pub body: Ellipse,
    pub fat_mm: f64,
    /// Lungs at the base of the scan (z = z_min); they shrink towards the apex.
    pub lung_left: Ellipse,
    pub lung_right: Ellipse,
    pub heart: Ellipse,
    pub spine: Ellipse,
    pub z_min: f64,
    pub z_max: f64,
    pub lesions: Vec<Lesion>,
}

const AIR: f64 = -1000.0;
const FAT: f64 = -100.0;
const SOFT: f64 = 40.0;
const LUNG: f64 = -850.0;
const BLOOD: f64 = 45.0;
const BONE: f64 = 650.0;

impl Phantom {
    pub fn new(profile: &Profile, rng: &mut Rng) -> Phantom {
        let a = rng.range(140.0, 175.0);
        let b = rng.range(95.0, 125.0);
        let body = Ellipse {
            cx: 0.0,
            cy: 0.0,
            rx: a,
            ry: b,
        };
        let lung = |side: f64, rng: &mut Rng| Ellipse {
            cx: side * a * rng.range(0.42, 0.48),
            cy: -b * rng.range(0.0, 0.1),
            rx: a * rng.range(0.28, 0.34),
            ry: b * rng.range(0.55, 0.66),
        };
        let lung_left = lung(1.0, rng);
        let lung_right = lung(-1.0, rng);
        let heart = Ellipse {
            cx: a * rng.range(0.0, 0.08),
            cy: -b * rng.range(0.15, 0.3),
            rx: a * rng.range(0.16, 0.2),
            ry: b * rng.range(0.22, 0.3),
        };
        let spine = Ellipse {
            cx: 0.0,
            cy: b * rng.range(0.55, 0.65),
            rx: rng.range(14.0, 19.0),
            ry: rng.range(13.0, 17.0),
        };
        let half = profile.scan_length_mm / 2.0;
        let z_center = rng.range(-400.0, -300.0).round();
        let mut phantom = Phantom {
            body,
            fat_mm: rng.range(6.0, 20.0),
            lung_left,
            lung_right,
            heart,
            spine,
            z_min: z_center - half,
            z_max: z_center + half,
            lesions: Vec::new(),
        };
        let count = if rng.unit() < profile.lesion_prevalence {
            rng.int(1, 3)
        } else {
            0
        };
        let mut attempts = 0;
        while phantom.lesions.len() < count as usize && attempts < 200 {
            attempts += 1;
            let d = rng.range(profile.lesion_diameter_mm.0, profile.lesion_diameter_mm.1);
            let r = d / 2.0;
            let radii = [
                r * rng.range(0.85, 1.15),
                r * rng.range(0.85, 1.15),
                r * rng.range(0.85, 1.15),
            ];
            let z = rng.range(
                phantom.z_min + radii[2] + 2.0,
                phantom.z_max - radii[2] - 2.0,
            );
            let lung = if rng.unit() < 0.5 {
                phantom.lung_left
            } else {
                phantom.lung_right
            };
            let section = phantom.lung_at(&lung, z);
            let x = section.cx + rng.range(-0.6, 0.6) * section.rx;
            let y = section.cy + rng.range(-0.6, 0.6) * section.ry;
            let candidate = Lesion {
                name: format!("GTV-{}", phantom.lesions.len() + 1),
                center: [x, y, z],
                radii,
                hu: rng.range(profile.lesion_hu.0, profile.lesion_hu.1),
            };
            if phantom.lesion_fits(&candidate) {
                phantom.lesions.push(candidate);
            }
        }
        phantom
    }

    /// The lung outline at height `z`: full size at the base, 60 % at the top of the scan.
    pub fn lung_at(&self, base: &Ellipse, z: f64) -> Ellipse {
        let t = ((z - self.z_min) / (self.z_max - self.z_min)).clamp(0.0, 1.0);
        let k = 1.0 - 0.4 * t * t;
        Ellipse {
            rx: base.rx * k,
            ry: base.ry * k,
            ..*base
        }
    }

    pub fn lungs_at(&self, z: f64) -> [Ellipse; 2] {
        [
            self.lung_at(&self.lung_left, z),
            self.lung_at(&self.lung_right, z),
        ]
    }

    /// A lesion fits if it lies inside one lung on every slice it cuts, and does not touch
    /// another lesion.
    fn lesion_fits(&self, l: &Lesion) -> bool {
        let zs = [-0.95, -0.5, 0.0, 0.5, 0.95].map(|f| l.center[2] + f * l.radii[2]);
        let inside = zs.iter().all(|&z| {
            let Some(s) = l.section(z) else {
                return false;
            };
            let margin = Ellipse {
                rx: s.rx + 2.0,
                ry: s.ry + 2.0,
                ..s
            };
            self.lungs_at(z)
                .iter()
                .any(|lung| margin.polygon(24).iter().all(|&(x, y)| lung.contains(x, y)))
        });
        let apart = self.lesions.iter().all(|o| {
            let d: f64 = (0..3)
                .map(|i| (o.center[i] - l.center[i]).powi(2))
                .sum::<f64>()
                .sqrt();
            d > o.radii.iter().cloned().fold(0.0, f64::max)
                + l.radii.iter().cloned().fold(0.0, f64::max)
                + 3.0
        });
        inside && apart
    }

    /// Density at a point, HU, before scanner effects.
    pub fn hu(&self, x: f64, y: f64, z: f64) -> f64 {
        if !self.body.contains(x, y) {
            return AIR;
        }
        for l in &self.lesions {
            if let Some(s) = l.section(z)
                && s.contains(x, y)
            {
                return l.hu;
            }
        }
        if self.spine.contains(x, y) {
            let inner = Ellipse {
                rx: self.spine.rx * 0.7,
                ry: self.spine.ry * 0.7,
                ..self.spine
            };
            return if inner.contains(x, y) { 250.0 } else { BONE };
        }
        if self.lungs_at(z).iter().any(|l| l.contains(x, y)) {
            return LUNG;
        }
        if self.heart.contains(x, y) {
            return BLOOD;
        }
        let inner = Ellipse {
            rx: self.body.rx - self.fat_mm,
            ry: self.body.ry - self.fat_mm,
            ..self.body
        };
        if inner.contains(x, y) { SOFT } else { FAT }
    }
}

/// Render one transverse slice as HU values (row-major, `rows` x `rows`), with the profile's
/// blur, edge enhancement, calibration offset and noise.
pub fn render_slice(
    phantom: &Phantom,
    profile: &Profile,
    origin: (f64, f64),
    z: f64,
    rng: &mut Rng,
) -> Vec<f64> {
    let n = profile.rows as usize;
    let dx = profile.pixel_spacing_mm();
    // 2x2 supersampling for partial-volume edges.
    let mut img = vec![0.0; n * n];
    for r in 0..n {
        for c in 0..n {
            let mut acc = 0.0;
            for (sx, sy) in [(-0.25, -0.25), (0.25, -0.25), (-0.25, 0.25), (0.25, 0.25)] {
                let x = origin.0 + (c as f64 + sx) * dx;
                let y = origin.1 + (r as f64 + sy) * dx;
                acc += phantom.hu(x, y, z);
            }
            img[r * n + c] = acc / 4.0;
        }
    }
    let blurred = gaussian_blur(&img, n, profile.blur_px);
    if profile.sharpen > 0.0 {
        let smooth = gaussian_blur(&blurred, n, 1.0);
        for i in 0..img.len() {
            img[i] = blurred[i] + profile.sharpen * (blurred[i] - smooth[i]);
        }
    } else {
        img = blurred;
    }
    for v in &mut img {
        *v += profile.hu_offset + profile.noise_hu * rng.normal();
    }
    img
}

fn gaussian_blur(img: &[f64], n: usize, sigma: f64) -> Vec<f64> {
    if sigma <= 0.0 {
        return img.to_vec();
    }
    let radius = (3.0 * sigma).ceil() as isize;
    let kernel: Vec<f64> = (-radius..=radius)
        .map(|i| (-(i * i) as f64 / (2.0 * sigma * sigma)).exp())
        .collect();
    let sum: f64 = kernel.iter().sum();
    let kernel: Vec<f64> = kernel.iter().map(|k| k / sum).collect();
    let pass = |src: &[f64], horizontal: bool| {
        let mut out = vec![0.0; src.len()];
        for r in 0..n {
            for c in 0..n {
                let mut acc = 0.0;
                for (k, w) in kernel.iter().enumerate() {
                    let o = k as isize - radius;
                    let (rr, cc) = if horizontal {
                        (r as isize, c as isize + o)
                    } else {
                        (r as isize + o, c as isize)
                    };
                    let rr = rr.clamp(0, n as isize - 1) as usize;
                    let cc = cc.clamp(0, n as isize - 1) as usize;
                    acc += w * src[rr * n + cc];
                }
                out[r * n + c] = acc;
            }
        }
        out
    };
    pass(&pass(img, true), false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::PROFILES;

    #[test]
    fn anatomy_has_realistic_densities() {
        let p = &PROFILES[0];
        let mut rng = Rng::new(3, &["t"]);
        let ph = Phantom::new(p, &mut rng);
        let z = (ph.z_min + ph.z_max) / 2.0;
        assert_eq!(ph.hu(500.0, 0.0, z), AIR);
        assert_eq!(
            ph.hu(ph.lung_left.cx, ph.lung_left.cy, ph.z_min + 1.0)
                .round(),
            LUNG
        );
        assert!(ph.hu(ph.spine.cx, ph.spine.cy + ph.spine.ry * 0.9, z) > 300.0);
        assert_eq!(ph.hu(ph.body.cx, ph.body.cy - ph.body.ry + 1.0, z), FAT);
    }

    #[test]
    fn lesions_lie_in_the_lungs_and_have_their_density() {
        for seed in 0..30 {
            let p = &PROFILES[seed as usize % 3];
            let ph = Phantom::new(p, &mut Rng::new(seed, &["t"]));
            assert!(ph.lesions.len() <= 3);
            for l in &ph.lesions {
                let d = 2.0 * l.radii.iter().cloned().fold(0.0, f64::max);
                assert!(d <= p.lesion_diameter_mm.1 * 1.15 + 1e-9 && d >= 4.0, "{d}");
                assert_eq!(ph.hu(l.center[0], l.center[1], l.center[2]), l.hu);
                assert!(l.center[2] - l.radii[2] > ph.z_min && l.center[2] + l.radii[2] < ph.z_max);
            }
        }
    }

    #[test]
    fn noise_matches_the_profile() {
        let p = &PROFILES[1];
        let ph = Phantom::new(p, &mut Rng::new(5, &["t"]));
        let n = p.rows as usize;
        let half = p.field_of_view_mm / 2.0;
        let img = render_slice(
            &ph,
            p,
            (-half, -half),
            ph.z_min,
            &mut Rng::new(5, &["noise"]),
        );
        // Outside the body: air plus offset plus noise.
        let air: Vec<f64> = img[..n * 3].to_vec();
        let mean = air.iter().sum::<f64>() / air.len() as f64;
        let sd = (air.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / air.len() as f64).sqrt();
        assert!((mean - (AIR + p.hu_offset)).abs() < 10.0, "{mean}");
        assert!((sd - p.noise_hu).abs() < p.noise_hu * 0.25, "{sd}");
    }
}
