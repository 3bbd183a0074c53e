//! Site profiles: what makes one hospital's CT archive differ from another's (non-IID data).

use serde::Serialize;

/// Scanner, reconstruction and population settings of a site.
#[derive(Debug, Clone, Serialize)]
pub struct Profile {
    pub name: &'static str,
    pub manufacturer: &'static str,
    pub model: &'static str,
    /// Reconstruction kernel name as the scanner writes it.
    pub kernel: &'static str,
    /// Gaussian blur of the reconstruction, in pixels (smooth kernels blur more).
    pub blur_px: f64,
    /// Edge enhancement of sharp kernels (unsharp-mask amount, 0 = none).
    pub sharpen: f64,
    /// Standard deviation of image noise, HU.
    pub noise_hu: f64,
    pub slice_thickness_mm: f64,
    pub rows: u16,
    pub field_of_view_mm: f64,
    /// Calibration error added to every voxel, HU.
    pub hu_offset: f64,
    pub kvp: u32,
    /// Scan length along z, mm.
    pub scan_length_mm: f64,
    /// Probability that a patient has at least one lesion.
    pub lesion_prevalence: f64,
    /// Lesion diameter range, mm.
    pub lesion_diameter_mm: (f64, f64),
    /// Lesion density range, HU.
    pub lesion_hu: (f64, f64),
}

pub const PROFILES: [Profile; 3] = [
    Profile {
        name: "academic",
        manufacturer: "SIEMENS",
        model: "SOMATOM Force",
        kernel: "Br40d",
        blur_px: 0.6,
        sharpen: 0.0,
        noise_hu: 12.0,
        slice_thickness_mm: 1.5,
        rows: 256,
        field_of_view_mm: 380.0,
        hu_offset: 0.0,
        kvp: 120,
        scan_length_mm: 96.0,
        lesion_prevalence: 0.6,
        lesion_diameter_mm: (5.0, 25.0),
        lesion_hu: (-10.0, 60.0),
    },
    Profile {
        name: "community",
        manufacturer: "GE MEDICAL SYSTEMS",
        model: "Revolution EVO",
        kernel: "LUNG",
        blur_px: 0.3,
        sharpen: 0.6,
        noise_hu: 28.0,
        slice_thickness_mm: 3.0,
        rows: 192,
        field_of_view_mm: 400.0,
        hu_offset: 18.0,
        kvp: 120,
        scan_length_mm: 120.0,
        lesion_prevalence: 0.45,
        lesion_diameter_mm: (8.0, 40.0),
        lesion_hu: (0.0, 80.0),
    },
    Profile {
        name: "legacy",
        manufacturer: "Philips",
        model: "Brilliance 16",
        kernel: "B",
        blur_px: 1.2,
        sharpen: 0.0,
        noise_hu: 35.0,
        slice_thickness_mm: 5.0,
        rows: 160,
        field_of_view_mm: 420.0,
        hu_offset: -22.0,
        kvp: 140,
        scan_length_mm: 150.0,
        lesion_prevalence: 0.75,
        lesion_diameter_mm: (12.0, 40.0),
        lesion_hu: (10.0, 70.0),
    },
];

pub fn by_name(name: &str) -> Option<&'static Profile> {
    PROFILES.iter().find(|p| p.name == name)
}

impl Profile {
    pub fn pixel_spacing_mm(&self) -> f64 {
        self.field_of_view_mm / f64::from(self.rows)
    }

    pub fn slices(&self) -> usize {
        (self.scan_length_mm / self.slice_thickness_mm)
            .round()
            .max(1.0) as usize
    }
}
