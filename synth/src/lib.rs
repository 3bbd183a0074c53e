//! Synthetic hospital archives for amicus: realistic, deterministic DICOM with exact ground
//! truth, generated locally because no real patient images can be fetched.
//!
//! A site gets a [`profile::Profile`] (scanner noise, kernel, slice thickness, in-plane size,
//! calibration offset, lesion prevalence and sizes) so that a federation of sites is non-IID.
//! Each patient is a thorax [`phantom::Phantom`] with 0-3 lesions, written as a CT series and an
//! RTSTRUCT (one ROI per lesion, `GTV-n`, plus `Lung_L` / `Lung_R`) and a binary DICOM SEG with
//! the same structures, both referencing the CT, with
//! fake direct identifiers (names, birth dates, IDs, addresses) so pseudonymisation is exercised.
//! `ground-truth.json` records the exact geometry (no identifiers).
//!
//! This crate only writes files into the folder it is given; it never reads an archive.

pub mod archive;
pub mod dicom;
pub mod identity;
pub mod phantom;
pub mod profile;
pub mod rng;
mod seg;

use serde::Serialize;
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum SynthError {
    #[error("unknown profile {0:?} (known: academic, community, legacy)")]
    UnknownProfile(String),
    #[error("{0} exists and is not empty")]
    NotEmpty(String),
    #[error("writing the archive: {0}")]
    Write(String),
}

#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub site: String,
    pub seed: u64,
    pub profile: profile::Profile,
    pub patients: Vec<archive::PatientRecord>,
}

impl Summary {
    pub fn lesions(&self) -> usize {
        self.patients.iter().map(|p| p.phantom.lesions.len()).sum()
    }
    pub fn files(&self) -> usize {
        self.patients.iter().map(|p| p.slices + 2).sum()
    }
}

pub const GROUND_TRUTH: &str = "ground-truth.json";

/// Write a site's archive into `out` (created; must be empty). `progress(done, total)` is called
/// after each patient.
pub fn generate(
    out: &Path,
    site: &str,
    patients: usize,
    seed: u64,
    profile: &str,
    mut progress: impl FnMut(usize, usize),
) -> Result<Summary, SynthError> {
    let profile =
        profile::by_name(profile).ok_or_else(|| SynthError::UnknownProfile(profile.into()))?;
    if out.exists()
        && std::fs::read_dir(out)
            .map(|mut d| d.next().is_some())
            .unwrap_or(true)
    {
        return Err(SynthError::NotEmpty(out.display().to_string()));
    }
    std::fs::create_dir_all(out).map_err(|e| SynthError::Write(e.to_string()))?;
    let mut records = Vec::new();
    for i in 0..patients {
        records
            .push(archive::write_patient(out, site, profile, seed, i).map_err(SynthError::Write)?);
        progress(i + 1, patients);
    }
    let summary = Summary {
        site: site.to_string(),
        seed,
        profile: profile.clone(),
        patients: records,
    };
    let json = serde_json::to_vec_pretty(&summary).expect("a summary serialises");
    std::fs::write(out.join(GROUND_TRUTH), json).map_err(|e| SynthError::Write(e.to_string()))?;
    Ok(summary)
}
