//! Imaging for trains: a DICOM image series as a volume of real-world values (Hounsfield units
//! for CT) with its patient-space geometry, and label masks from RTSTRUCT ROIs or SEG segments
//! on the same grid.
//!
//! Owns the reading of pixel data and the geometry rules: slices sorted by position along the
//! slice normal (never by file name or instance number), one orientation and spacing per series,
//! irregular or duplicate positions refused, memory checked before anything is allocated.
//! It reads files the index listed for a series (the caller passes them); it never decides
//! what a train may read, never touches the audit log, and never writes.
//!
//! Supported: single- and multi-frame grey-scale images (enhanced with functional groups, RT
//! Dose grids), 8/16/32-bit, in the native transfer syntaxes, RLE, JPEG (8-bit lossy, lossless),
//! JPEG-LS and JPEG 2000; linear rescale or Modality LUT; RTSTRUCT closed planar contours
//! (even-odd rule at pixel centres, so holes and several contours per slice work); binary and
//! fractional SEG; resampling, slices, crop/pad, window, z-score and seeded patch sampling.
//! What is not supported is refused with a reason (see `docs/imaging.md`).

mod grid;
pub mod options;
pub mod patches;
mod pixels;
mod rle;
pub mod rtstruct;
pub mod seg;
pub mod series;

pub use grid::{Geometry, Volume};
pub use options::{
    Window, apply_window, crop_or_pad, crop_or_pad_around, label_box_centre, resample,
    select_slices, z_score,
};
pub use patches::{PatchRequest, Patches, sample_patches};
pub use series::{Frames, load_frames, load_series, series_geometry};

/// Why a series or mask could not be loaded. Every variant says what to fix.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ImagingError {
    #[error("series {0} has no indexed images on this station")]
    UnknownSeries(String),
    #[error("{path}: {reason}")]
    BadFile { path: String, reason: String },
    #[error("not supported yet: {0}")]
    Unsupported(String),
    #[error("inconsistent series: {0}")]
    Inconsistent(String),
    #[error("the volume needs {needed} bytes; {available} are left in the run's memory limit")]
    TooLarge { needed: u64, available: u64 },
    #[error("no label {0}")]
    NoLabel(String),
    #[error("invalid request: {0}")]
    InvalidRequest(String),
}
