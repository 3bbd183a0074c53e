//! One DICOM file's header → the plain facts the index keeps about it ([`InstanceFacts`]).
//!
//! Owns the reading of headers (never pixel data) and the choice of what is kept: UIDs,
//! technical attributes, ROI names and segment labels, references, and generalised
//! demographics (sex, age in whole years capped at 90, study year). Direct identifiers
//! (names, birth dates, addresses, phone numbers, original patient IDs) are read only to
//! derive the pseudonym or the age and are dropped here: nothing returned holds them.

use crate::pseudonym::PseudonymKey;
use dicom_core::Tag;
use dicom_dictionary_std::tags;
use dicom_object::{InMemDicomObject, OpenFileOptions};
use serde::{Deserialize, Serialize};
use std::io::Read;
use std::path::Path;

/// What the index keeps of one DICOM instance. Plain data, no identifiers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstanceFacts {
    pub sop_class_uid: String,
    pub sop_instance_uid: String,
    pub study_uid: String,
    pub series_uid: String,
    pub modality: String,
    /// Keyed hash of issuer + patient ID (see [`PseudonymKey`]).
    pub patient: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patient_sex: Option<String>,
    /// Age at the study in whole years, capped at 90 (HIPAA Safe Harbor style).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub age_years: Option<u32>,
    /// Study year only: dates are generalised.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub study_year: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body_part: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slice_thickness_mm: Option<f64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pixel_spacing_mm: Vec<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rows: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub columns: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frames: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manufacturer: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<String>,
    /// RT Structure Set ROI names (3006,0026).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub roi_names: Vec<String>,
    /// SEG segment labels (0062,0005).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub segment_labels: Vec<String>,
    /// Series Instance UIDs referenced from inside sequences (RTSTRUCT, SEG → their image series).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub referenced_series: Vec<String>,
    pub transfer_syntax: String,
}

/// Why a file was not indexed. Shown to the data owner in the index report.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("not a DICOM file: {0}")]
    NotDicom(String),
    #[error("unreadable DICOM: {0}")]
    Unreadable(String),
    #[error("missing required attribute {0}")]
    Missing(&'static str),
    #[error("invalid value of {0}: {1}")]
    Invalid(&'static str, String),
}

/// Read a file's header and keep the facts. The pixel data is never read when the file has a
/// file meta group; files without one (raw implicit-VR datasets, as some old tools write) are
/// read through a fallback path and reported as such in `transfer_syntax`.
pub fn read_facts(path: &Path, key: &PseudonymKey) -> Result<InstanceFacts, HeaderError> {
    let (obj, transfer_syntax) = open(path)?;
    facts_of(&obj, transfer_syntax, key)
}

const IMPLICIT_VR_LE: &str = "1.2.840.10008.1.2";
const EXPLICIT_VR_LE: &str = "1.2.840.10008.1.2.1";

fn open(path: &Path) -> Result<(InMemDicomObject, String), HeaderError> {
    let mut head = [0u8; 132];
    let n = read_up_to(path, &mut head).map_err(|e| HeaderError::Unreadable(e.to_string()))?;
    if n == 132 && &head[128..132] == b"DICM" {
        let file = OpenFileOptions::new()
            .read_until(tags::PIXEL_DATA)
            .open_file(path)
            .map_err(|e| HeaderError::Unreadable(one_line(&e)))?;
        let ts = file
            .meta()
            .transfer_syntax()
            .trim_end_matches('\0')
            .to_string();
        return Ok((file.into_inner(), ts));
    }
    // No preamble/"DICM": accept only what looks like a raw little-endian dataset that starts
    // with a group 0008 element (as pydicom's test `rtstruct.dcm`), otherwise it is not DICOM.
    if n < 8 || head[0..2] != [0x08, 0x00] {
        return Err(HeaderError::NotDicom(
            "no DICM prefix and no group 0008 dataset at the start".into(),
        ));
    }
    // Explicit VR if bytes 4..6 are an uppercase VR, implicit otherwise.
    let explicit = head[4].is_ascii_uppercase() && head[5].is_ascii_uppercase();
    let ts_uid = if explicit {
        EXPLICIT_VR_LE
    } else {
        IMPLICIT_VR_LE
    };
    let ts = dicom_transfer_syntax_registry::TransferSyntaxRegistry
        .get(ts_uid)
        .ok_or_else(|| HeaderError::Unreadable(format!("transfer syntax {ts_uid} unknown")))?;
    let file = std::fs::File::open(path).map_err(|e| HeaderError::Unreadable(e.to_string()))?;
    let obj = InMemDicomObject::read_dataset_with_ts(std::io::BufReader::new(file), ts)
        .map_err(|e| HeaderError::Unreadable(format!("no file meta group: {}", one_line(&e))))?;
    Ok((obj, format!("{ts_uid} (no file meta group)")))
}

use dicom_transfer_syntax_registry::TransferSyntaxIndex as _;

fn read_up_to(path: &Path, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut f = std::fs::File::open(path)?;
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

fn one_line(e: &dyn std::fmt::Display) -> String {
    let s = e.to_string().replace('\n', " ");
    s.chars().take(300).collect()
}

/// Text of an element, trimmed of DICOM padding; `None` when absent or empty.
fn text(obj: &InMemDicomObject, tag: Tag) -> Option<String> {
    let e = obj.get(tag)?;
    let s = e.to_str().ok()?;
    let s = s.trim_matches(|c: char| c == '\0' || c.is_whitespace());
    (!s.is_empty()).then(|| s.to_string())
}

fn required(obj: &InMemDicomObject, tag: Tag, name: &'static str) -> Result<String, HeaderError> {
    text(obj, tag).ok_or(HeaderError::Missing(name))
}

fn uid(obj: &InMemDicomObject, tag: Tag, name: &'static str) -> Result<String, HeaderError> {
    let v = required(obj, tag, name)?;
    if is_uid(&v) {
        Ok(v)
    } else {
        Err(HeaderError::Invalid(name, format!("{v:?} is not a UID")))
    }
}

/// A DICOM UID: dot-separated digit groups, at most 64 characters.
pub fn is_uid(v: &str) -> bool {
    !v.is_empty()
        && v.len() <= 64
        && v.split('.')
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
}

fn float(obj: &InMemDicomObject, tag: Tag) -> Option<f64> {
    obj.get(tag)?.to_float64().ok().filter(|v| v.is_finite())
}

fn uint(obj: &InMemDicomObject, tag: Tag) -> Option<u32> {
    obj.get(tag)?.to_int::<u32>().ok()
}

fn facts_of(
    obj: &InMemDicomObject,
    transfer_syntax: String,
    key: &PseudonymKey,
) -> Result<InstanceFacts, HeaderError> {
    let sop_class_uid = uid(obj, tags::SOP_CLASS_UID, "SOPClassUID (0008,0016)")?;
    let sop_instance_uid = uid(obj, tags::SOP_INSTANCE_UID, "SOPInstanceUID (0008,0018)")?;
    let study_uid = uid(
        obj,
        tags::STUDY_INSTANCE_UID,
        "StudyInstanceUID (0020,000D)",
    )?;
    let series_uid = uid(
        obj,
        tags::SERIES_INSTANCE_UID,
        "SeriesInstanceUID (0020,000E)",
    )?;
    let modality = required(obj, tags::MODALITY, "Modality (0008,0060)")?;
    let patient_id = required(obj, tags::PATIENT_ID, "PatientID (0010,0020)")?;
    let issuer = text(obj, tags::ISSUER_OF_PATIENT_ID).unwrap_or_default();
    let patient = key.pseudonym(&issuer, &patient_id);

    let study_date = text(obj, tags::STUDY_DATE)
        .or_else(|| text(obj, tags::SERIES_DATE))
        .and_then(|d| parse_date(&d));
    let age_years = text(obj, tags::PATIENT_AGE)
        .and_then(|a| parse_age(&a))
        .or_else(|| {
            let birth = text(obj, tags::PATIENT_BIRTH_DATE).and_then(|d| parse_date(&d))?;
            age_between(birth, study_date?)
        })
        .map(|a| a.min(90));
    let patient_sex =
        text(obj, tags::PATIENT_SEX).filter(|s| matches!(s.as_str(), "M" | "F" | "O"));

    let mut roi_names = Vec::new();
    for item in items(obj, tags::STRUCTURE_SET_ROI_SEQUENCE) {
        if let Some(name) = text(item, tags::ROI_NAME) {
            push_unique(&mut roi_names, name);
        }
    }
    let mut segment_labels = Vec::new();
    for item in items(obj, tags::SEGMENT_SEQUENCE) {
        if let Some(label) = text(item, tags::SEGMENT_LABEL) {
            push_unique(&mut segment_labels, label);
        }
    }
    let mut referenced_series = Vec::new();
    for seq in [
        tags::REFERENCED_FRAME_OF_REFERENCE_SEQUENCE,
        tags::REFERENCED_SERIES_SEQUENCE,
    ] {
        for item in items(obj, seq) {
            collect_series_refs(item, &mut referenced_series, 0);
        }
    }
    referenced_series.retain(|s| s != &series_uid);

    Ok(InstanceFacts {
        sop_class_uid,
        sop_instance_uid,
        study_uid,
        series_uid,
        modality,
        patient,
        patient_sex,
        age_years,
        study_year: study_date.map(|(y, _, _)| y),
        body_part: text(obj, tags::BODY_PART_EXAMINED),
        slice_thickness_mm: float(obj, tags::SLICE_THICKNESS),
        pixel_spacing_mm: obj
            .get(tags::PIXEL_SPACING)
            .and_then(|e| e.to_multi_float64().ok())
            .unwrap_or_default()
            .into_iter()
            .filter(|v| v.is_finite())
            .collect(),
        rows: uint(obj, tags::ROWS),
        columns: uint(obj, tags::COLUMNS),
        frames: uint(obj, tags::NUMBER_OF_FRAMES),
        manufacturer: text(obj, tags::MANUFACTURER),
        model: text(obj, tags::MANUFACTURER_MODEL_NAME),
        kernel: text(obj, tags::CONVOLUTION_KERNEL),
        roi_names,
        segment_labels,
        referenced_series,
        transfer_syntax,
    })
}

fn items(obj: &InMemDicomObject, tag: Tag) -> &[InMemDicomObject] {
    obj.get(tag).and_then(|e| e.items()).unwrap_or(&[])
}

/// Series Instance UIDs anywhere below a referencing sequence item (bounded depth).
fn collect_series_refs(item: &InMemDicomObject, out: &mut Vec<String>, depth: usize) {
    if depth > 8 {
        return;
    }
    if let Some(s) = text(item, tags::SERIES_INSTANCE_UID).filter(|s| is_uid(s)) {
        push_unique(out, s);
    }
    for element in item.iter() {
        if let Some(children) = element.items() {
            for child in children {
                collect_series_refs(child, out, depth + 1);
            }
        }
    }
}

fn push_unique(v: &mut Vec<String>, s: String) {
    if !v.contains(&s) {
        v.push(s);
    }
}

/// DICOM DA `YYYYMMDD` (also tolerates the old `YYYY.MM.DD`).
fn parse_date(s: &str) -> Option<(i32, u32, u32)> {
    let digits: String = s.chars().filter(|c| c.is_ascii_digit()).collect();
    if digits.len() != 8 {
        return None;
    }
    let y: i32 = digits[0..4].parse().ok()?;
    let m: u32 = digits[4..6].parse().ok()?;
    let d: u32 = digits[6..8].parse().ok()?;
    ((1800..=2200).contains(&y) && (1..=12).contains(&m) && (1..=31).contains(&d))
        .then_some((y, m, d))
}

/// DICOM AS `nnnY` / `nnnM` / `nnnW` / `nnnD` → whole years.
fn parse_age(s: &str) -> Option<u32> {
    if s.len() != 4 || !s.is_ascii() {
        return None;
    }
    let n: u32 = s[..3].parse().ok()?;
    match &s[3..] {
        "Y" => Some(n),
        "M" => Some(n / 12),
        "W" => Some(n / 52),
        "D" => Some(n / 365),
        _ => None,
    }
}

fn age_between(birth: (i32, u32, u32), at: (i32, u32, u32)) -> Option<u32> {
    let mut years = at.0 - birth.0;
    if (at.1, at.2) < (birth.1, birth.2) {
        years -= 1;
    }
    u32::try_from(years).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_and_ages() {
        assert_eq!(parse_date("20240229"), Some((2024, 2, 29)));
        assert_eq!(parse_date("2024.02.29"), Some((2024, 2, 29)));
        assert_eq!(parse_date("2024"), None);
        assert_eq!(parse_date("20241301"), None);
        assert_eq!(parse_age("063Y"), Some(63));
        assert_eq!(parse_age("018M"), Some(1));
        assert_eq!(parse_age("63Y"), None);
        assert_eq!(age_between((1960, 5, 10), (2020, 5, 9)), Some(59));
        assert_eq!(age_between((1960, 5, 10), (2020, 5, 10)), Some(60));
        assert_eq!(age_between((2021, 1, 1), (2020, 1, 1)), None);
    }

    #[test]
    fn uids() {
        assert!(is_uid("1.2.840.10008.5.1.4.1.1.2"));
        assert!(!is_uid("1..2"));
        assert!(!is_uid("1.2.a"));
        assert!(!is_uid(""));
        assert!(!is_uid(&"1.".repeat(40)));
    }

    proptest::proptest! {
        #[test]
        fn date_and_age_parsers_never_panic(s in "\\PC{0,12}") {
            let _ = parse_date(&s);
            let _ = parse_age(&s);
            let _ = is_uid(&s);
        }
    }
}
