//! Small helpers for building DICOM data sets with dicom-rs: value formatting within each VR's
//! limits, UIDs, sequences, and writing Part 10 files.

use dicom_core::value::{DataSetSequence, PrimitiveValue};
use dicom_core::{DataElement, Tag, VR};
use dicom_dictionary_std::{tags, uids};
use dicom_object::{FileMetaTableBuilder, InMemDicomObject};
use std::path::Path;

/// Implementation Class UID of amicus-synth (under the UUID-derived 2.25 root).
pub const IMPLEMENTATION_CLASS_UID: &str = "2.25.207958351254104452916457402893634012611";
pub const IMPLEMENTATION_VERSION: &str = "AMICUS_SYNTH_01";

/// A UID under the 2.25 root (ISO/IEC 9834-8), derived from a seed and labels.
pub fn uid(seed: u64, labels: &[&str]) -> String {
    let d = crate::rng::labelled_hash(b"amicus-synth-uid", seed, labels);
    let mut b = [0u8; 16];
    b.copy_from_slice(&d[..16]);
    // A version-4-like value: 122 bits of hash, never starting with a zero digit.
    let v = u128::from_be_bytes(b) >> 2 | (1u128 << 125);
    format!("2.25.{v}")
}

/// A decimal string (VR DS) of at most 16 characters.
pub fn ds(v: f64) -> String {
    if v == 0.0 || !v.is_finite() {
        return "0".into();
    }
    for decimals in (0..=8).rev() {
        let s = format!("{v:.decimals$}");
        let s = if s.contains('.') {
            s.trim_end_matches('0').trim_end_matches('.').to_string()
        } else {
            s
        };
        let s = if s == "-0" { "0".to_string() } else { s };
        if s.len() <= 16 {
            return s;
        }
    }
    format!("{v:.3e}")
}

pub fn ds_list(vs: &[f64]) -> String {
    vs.iter().map(|&v| ds(v)).collect::<Vec<_>>().join("\\")
}

pub type Obj = InMemDicomObject;

pub fn put_str(obj: &mut Obj, tag: Tag, vr: VR, value: &str) {
    obj.put(DataElement::new(tag, vr, PrimitiveValue::from(value)));
}

pub fn put_u16(obj: &mut Obj, tag: Tag, value: u16) {
    obj.put(DataElement::new(tag, VR::US, PrimitiveValue::from(value)));
}

pub fn put_seq(obj: &mut Obj, tag: Tag, items: Vec<Obj>) {
    obj.put(DataElement::new(tag, VR::SQ, DataSetSequence::from(items)));
}

/// Image Pixel module of a square, unsigned, single-sample MONOCHROME2 image.
pub fn put_pixel_module(obj: &mut Obj, rows: u16, bits_allocated: u16, bits_stored: u16) {
    put_u16(obj, tags::SAMPLES_PER_PIXEL, 1);
    put_str(obj, tags::PHOTOMETRIC_INTERPRETATION, VR::CS, "MONOCHROME2");
    put_u16(obj, tags::ROWS, rows);
    put_u16(obj, tags::COLUMNS, rows);
    put_u16(obj, tags::BITS_ALLOCATED, bits_allocated);
    put_u16(obj, tags::BITS_STORED, bits_stored);
    put_u16(obj, tags::HIGH_BIT, bits_stored - 1);
    put_u16(obj, tags::PIXEL_REPRESENTATION, 0);
}

/// Write `obj` as a Part 10 file in explicit VR little endian.
pub fn write(obj: Obj, sop_class: &str, sop_instance: &str, path: &Path) -> Result<(), String> {
    let meta = FileMetaTableBuilder::new()
        .media_storage_sop_class_uid(sop_class)
        .media_storage_sop_instance_uid(sop_instance)
        .transfer_syntax(uids::EXPLICIT_VR_LITTLE_ENDIAN)
        .implementation_class_uid(IMPLEMENTATION_CLASS_UID)
        .implementation_version_name(IMPLEMENTATION_VERSION)
        .build()
        .map_err(|e| e.to_string())?;
    let file = obj.with_exact_meta(meta);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    file.write_to_file(path)
        .map_err(|e| format!("{}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn ds_examples() {
        assert_eq!(ds(0.1 + 0.2), "0.3");
        assert_eq!(ds(-1024.0), "-1024");
        assert_eq!(ds(1.5625), "1.5625");
        assert_eq!(ds(-0.0), "0");
    }

    #[test]
    fn uids_are_valid_and_distinct() {
        let a = uid(1, &["study"]);
        let b = uid(1, &["series"]);
        assert_ne!(a, b);
        for u in [&a, &b] {
            assert!(u.len() <= 64, "{u}");
            assert!(u.starts_with("2.25.") && !u[5..].starts_with('0'));
            assert!(u.bytes().all(|c| c.is_ascii_digit() || c == b'.'));
        }
        assert_eq!(uid(1, &["study"]), a);
    }

    proptest! {
        #[test]
        fn ds_fits_and_round_trips(v in -1.0e6f64..1.0e6) {
            let s = ds(v);
            prop_assert!(s.len() <= 16, "{}", s);
            let back: f64 = s.parse().unwrap();
            prop_assert!((back - v).abs() <= 1e-6 * v.abs().max(1.0), "{} -> {}", v, s);
        }
    }
}
