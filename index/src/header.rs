//! One DICOM file's header → the plain facts the index keeps about it ([`InstanceFacts`]).
//!
//! Owns the reading of headers (never pixel data) and the choice of what is kept: UIDs,
//! technical attributes, ROI names and segment labels, references, and generalised
//! demographics (sex, age in whole years capped at 90, study year). Direct identifiers
//! (names, birth dates, addresses, phone numbers, original patient IDs) are read only to
//! derive the pseudonym or the age and are dropped here: nothing returned holds them.

use crate::pseudonym::PseudonymKey;
use crate::values::{float, floats, items, text, uint};
use dicom_core::Tag;
use dicom_dictionary_std::tags;
use dicom_object::{InMemDicomObject, OpenFileOptions};
use serde::{Deserialize, Serialize};
use std::io::{BufRead, Read};
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
    let (obj, transfer_syntax) = open(path, false)?;
    facts_of(&obj, transfer_syntax, key)
}

const IMPLICIT_VR_LE: &str = "1.2.840.10008.1.2";
const EXPLICIT_VR_LE: &str = "1.2.840.10008.1.2.1";
const EXPLICIT_VR_BE: &str = "1.2.840.10008.1.2.2";

/// Read a DICOM file's header (up to the pixel data) behind the length guard.
pub fn read_header(path: &Path) -> Result<(InMemDicomObject, String), HeaderError> {
    open(path, false)
}

/// Read a whole DICOM file, pixel data included, behind the same length guard (which then
/// also checks the pixel data's declared length). Returns the data set and its transfer
/// syntax UID. For the imaging module, which needs the pixels.
pub fn read_whole(path: &Path) -> Result<(InMemDicomObject, String), HeaderError> {
    open(path, true)
}

fn open(path: &Path, with_pixels: bool) -> Result<(InMemDicomObject, String), HeaderError> {
    let mut head = [0u8; 132];
    let n = read_up_to(path, &mut head).map_err(|e| HeaderError::Unreadable(e.to_string()))?;
    if n == 132 && &head[128..132] == b"DICM" {
        guard_lengths(path, None, with_pixels)?;
        let options = if with_pixels {
            OpenFileOptions::new()
        } else {
            OpenFileOptions::new().read_until(tags::PIXEL_DATA)
        };
        let file = options
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
    let little = head[0..2] == [0x08, 0x00];
    let big = head[0..2] == [0x00, 0x08];
    if n < 8 || !(little || big) {
        return Err(HeaderError::NotDicom(
            "no DICM prefix and no group 0008 dataset at the start".into(),
        ));
    }
    // Explicit VR if bytes 4..6 are an uppercase VR, implicit otherwise; big endian is
    // always explicit (the retired Explicit VR Big Endian).
    let explicit = head[4].is_ascii_uppercase() && head[5].is_ascii_uppercase();
    let ts_uid = match (big, explicit) {
        (true, true) => EXPLICIT_VR_BE,
        (true, false) => {
            return Err(HeaderError::NotDicom(
                "big-endian data without explicit VRs is not DICOM".into(),
            ));
        }
        (false, true) => EXPLICIT_VR_LE,
        (false, false) => IMPLICIT_VR_LE,
    };
    let ts = dicom_transfer_syntax_registry::TransferSyntaxRegistry
        .get(ts_uid)
        .ok_or_else(|| HeaderError::Unreadable(format!("transfer syntax {ts_uid} unknown")))?;
    guard_lengths(
        path,
        Some(Encoding {
            explicit: ts_uid != IMPLICIT_VR_LE,
            big_endian: ts_uid == EXPLICIT_VR_BE,
        }),
        with_pixels,
    )?;
    let file = std::fs::File::open(path).map_err(|e| HeaderError::Unreadable(e.to_string()))?;
    let obj = InMemDicomObject::read_dataset_with_ts(std::io::BufReader::new(file), ts)
        .map_err(|e| HeaderError::Unreadable(format!("no file meta group: {}", one_line(&e))))?;
    Ok((obj, format!("{ts_uid} (no file meta group)")))
}

use dicom_transfer_syntax_registry::TransferSyntaxIndex as _;

/// Refuse a file whose element, sequence or item lengths exceed the file's own size.
///
/// dicom-rs 0.10 allocates (and zero-fills) a value's declared length before reading it: a
/// 674-byte file declaring a 4 GB value (pydicom's `UN_sequence.dcm`) made it take 3.6 GB
/// and 9 s. This walks the element headers the way dicom-rs's tokenizer does (explicit or
/// implicit VR, either byte order, into sequences and items, implicit VR inside an
/// undefined-length UN, fragments of nested encapsulated pixel data), skipping values
/// without decoding them, and stops at the top-level pixel data like the real read. What it
/// cannot make sense of is left to the real read to report.
fn guard_lengths(
    path: &Path,
    no_meta: Option<Encoding>,
    with_pixels: bool,
) -> Result<(), HeaderError> {
    let io = |e: std::io::Error| HeaderError::Unreadable(e.to_string());
    let file_len = std::fs::metadata(path).map_err(io)?.len();
    let file = std::fs::File::open(path).map_err(io)?;
    let mut r = Cursor {
        inner: std::io::BufReader::with_capacity(16 << 10, file),
        pos: 0,
        file_len,
    };
    let encoding = match no_meta {
        Some(e) => e,
        None => match r.meta()? {
            Some(DataSet::Stored(e)) => e,
            Some(DataSet::Deflated) => return guard_deflated(path, r.pos, with_pixels),
            None => return Ok(()),
        },
    };
    r.walk(encoding, with_pixels)
}

/// The length guard for a deflated data set starting at byte `start`: inflate it once to
/// measure it (refusing a deflate bomb), then walk the inflated stream against that size.
fn guard_deflated(path: &Path, start: u64, with_pixels: bool) -> Result<(), HeaderError> {
    let io = |e: std::io::Error| HeaderError::Unreadable(e.to_string());
    let compressed = std::fs::metadata(path)
        .map_err(io)?
        .len()
        .saturating_sub(start);
    let cap = compressed.saturating_mul(MAX_INFLATE_RATIO).max(16 << 20);
    let inflated = || -> Result<_, HeaderError> {
        let mut file = std::io::BufReader::new(std::fs::File::open(path).map_err(io)?);
        std::io::Seek::seek(&mut file, std::io::SeekFrom::Start(start)).map_err(io)?;
        Ok(std::io::BufReader::new(
            flate2::bufread::DeflateDecoder::new(file),
        ))
    };
    let size = std::io::copy(&mut inflated()?.take(cap + 1), &mut std::io::sink())
        .map_err(|e| HeaderError::Unreadable(format!("deflated data set: {e}")))?;
    if size > cap {
        return Err(HeaderError::Unreadable(format!(
            "the deflated data set inflates to more than {cap} bytes ({MAX_INFLATE_RATIO}x its \
             {compressed} compressed bytes)"
        )));
    }
    let mut r = Cursor {
        inner: inflated()?,
        pos: 0,
        file_len: size,
    };
    r.walk(
        Encoding {
            explicit: true,
            big_endian: false,
        },
        with_pixels,
    )
}

/// How the data set after the file meta group is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DataSet {
    Stored(Encoding),
    /// Deflated Explicit VR Little Endian: raw deflate of an explicit little-endian data set.
    Deflated,
}

/// A deflated data set may inflate to at most this many times its compressed size (and at
/// least 16 MiB): DICOM deflates by 2-10x, a deflate bomb by up to ~1000x.
const MAX_INFLATE_RATIO: u64 = 100;

/// How a data set is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Encoding {
    explicit: bool,
    big_endian: bool,
}

impl Encoding {
    /// `None` for transfer syntaxes whose data set is not stored as it is (deflate).
    fn of(ts_uid: &str) -> Option<Encoding> {
        match ts_uid {
            IMPLICIT_VR_LE => Some(Encoding {
                explicit: false,
                big_endian: false,
            }),
            EXPLICIT_VR_BE => Some(Encoding {
                explicit: true,
                big_endian: true,
            }),
            "1.2.840.10008.1.2.1.99" | "1.2.840.10008.1.2.8.1" => None,
            _ => Some(Encoding {
                explicit: true,
                big_endian: false,
            }),
        }
    }
}

/// Whether an explicit VR header has two reserved bytes and a 4-byte length: the long VRs,
/// and (as dicom-rs reads them, as UN) unknown VR codes.
fn long_vr(vr: [u8; 2]) -> bool {
    let short = matches!(
        &vr,
        b"AE"
            | b"AS"
            | b"AT"
            | b"CS"
            | b"DA"
            | b"DS"
            | b"DT"
            | b"FL"
            | b"FD"
            | b"IS"
            | b"LO"
            | b"LT"
            | b"PN"
            | b"SH"
            | b"SL"
            | b"SS"
            | b"ST"
            | b"TM"
            | b"UI"
            | b"UL"
            | b"US"
    );
    !short
}

#[derive(Debug)]
struct Frame {
    /// End offset of a defined-length sequence or item; `None` until its delimiter.
    end: Option<u64>,
    kind: FrameKind,
    encoding: Encoding,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FrameKind {
    Sequence,
    Item,
    Fragments,
}

/// Where the walk reads from: the file, or the inflated stream of a deflated data set.
trait Source: BufRead {
    /// Move by `n` bytes (negative only for the file); false when that is not possible.
    fn move_by(&mut self, n: i64) -> bool;
}

impl Source for std::io::BufReader<std::fs::File> {
    fn move_by(&mut self, n: i64) -> bool {
        self.seek_relative(n).is_ok()
    }
}

impl<R: BufRead> Source for std::io::BufReader<flate2::bufread::DeflateDecoder<R>> {
    fn move_by(&mut self, n: i64) -> bool {
        let Ok(n) = u64::try_from(n) else {
            return false;
        };
        std::io::copy(&mut self.by_ref().take(n), &mut std::io::sink()).is_ok_and(|c| c == n)
    }
}

struct Cursor<R: Source> {
    inner: R,
    pos: u64,
    /// Bytes the data set can hold at most: the file's size, or a deflated data set's
    /// inflated size.
    file_len: u64,
}

impl<R: Source> Cursor<R> {
    fn bytes<const N: usize>(&mut self) -> Option<[u8; N]> {
        let mut b = [0u8; N];
        self.inner.read_exact(&mut b).ok()?;
        self.pos += N as u64;
        Some(b)
    }

    fn u16(&mut self, e: Encoding) -> Option<u16> {
        let b = self.bytes::<2>()?;
        Some(if e.big_endian {
            u16::from_be_bytes(b)
        } else {
            u16::from_le_bytes(b)
        })
    }

    fn u32(&mut self, e: Encoding) -> Option<u32> {
        let b = self.bytes::<4>()?;
        Some(if e.big_endian {
            u32::from_be_bytes(b)
        } else {
            u32::from_le_bytes(b)
        })
    }

    fn skip(&mut self, n: u64) -> bool {
        let Ok(n) = i64::try_from(n) else {
            return false;
        };
        if !self.inner.move_by(n) {
            return false;
        }
        self.pos += n as u64;
        true
    }

    fn check(&self, what: impl FnOnce() -> String, len: u32) -> Result<(), HeaderError> {
        if u64::from(len) > self.file_len {
            return Err(HeaderError::Unreadable(format!(
                "{} declares {len} bytes, more than the whole file ({} bytes)",
                what(),
                self.file_len
            )));
        }
        Ok(())
    }

    /// Walk the file meta group (explicit VR little endian from byte 132); the data set's
    /// encoding, or `None` when the walk cannot tell (the real read reports why).
    fn meta(&mut self) -> Result<Option<DataSet>, HeaderError> {
        let le = Encoding {
            explicit: true,
            big_endian: false,
        };
        if !self.skip(132) {
            return Ok(None);
        }
        let mut ts = String::new();
        loop {
            let Some(group) = self.u16(le) else {
                return Ok(None);
            };
            if group != 0x0002 {
                if !self.inner.move_by(-2) {
                    return Err(HeaderError::Unreadable("cannot seek in the file".into()));
                }
                self.pos -= 2;
                break;
            }
            let (Some(element), Some(vr)) = (self.u16(le), self.bytes::<2>()) else {
                return Ok(None);
            };
            let len = if long_vr(vr) {
                let (Some(_), Some(len)) = (self.bytes::<2>(), self.u32(le)) else {
                    return Ok(None);
                };
                len
            } else {
                let Some(len) = self.u16(le) else {
                    return Ok(None);
                };
                u32::from(len)
            };
            self.check(|| format!("file meta element (0002,{element:04X})"), len)?;
            if element == 0x0010 && len <= 64 {
                let mut value = vec![0u8; len as usize];
                if self.inner.read_exact(&mut value).is_err() {
                    return Ok(None);
                }
                self.pos += u64::from(len);
                ts = String::from_utf8_lossy(&value)
                    .trim_end_matches(['\0', ' '])
                    .to_string();
            } else if !self.skip(u64::from(len)) {
                return Ok(None);
            }
        }
        if ts.is_empty() {
            return Ok(None);
        }
        Ok(Some(
            Encoding::of(&ts).map_or(DataSet::Deflated, DataSet::Stored),
        ))
    }

    /// Walk the data set's element headers up to the top-level pixel data.
    fn walk(&mut self, base: Encoding, with_pixels: bool) -> Result<(), HeaderError> {
        const UNDEFINED: u32 = 0xFFFF_FFFF;
        let mut stack: Vec<Frame> = Vec::new();
        for _ in 0..1_000_000 {
            while stack
                .last()
                .is_some_and(|f| f.end.is_some_and(|end| self.pos >= end))
            {
                stack.pop();
            }
            let enc = stack.last().map_or(base, |f| f.encoding);
            let (Some(group), Some(element)) = (self.u16(enc), self.u16(enc)) else {
                return Ok(());
            };
            if group == 0xFFFE {
                let Some(len) = self.u32(enc) else {
                    return Ok(());
                };
                match element {
                    0xE000 if stack.last().is_some_and(|f| f.kind == FrameKind::Fragments) => {
                        self.check(|| "a pixel data fragment".into(), len)?;
                        if len == UNDEFINED || !self.skip(u64::from(len)) {
                            return Ok(());
                        }
                    }
                    0xE000 => {
                        let end = if len == UNDEFINED {
                            None
                        } else {
                            self.check(|| "an item".into(), len)?;
                            Some(self.pos + u64::from(len))
                        };
                        stack.push(Frame {
                            end,
                            kind: FrameKind::Item,
                            encoding: enc,
                        });
                    }
                    0xE00D => {
                        if stack
                            .last()
                            .is_some_and(|f| f.kind == FrameKind::Item && f.end.is_none())
                        {
                            stack.pop();
                        }
                    }
                    0xE0DD => {
                        if stack
                            .last()
                            .is_some_and(|f| f.kind != FrameKind::Item && f.end.is_none())
                        {
                            stack.pop();
                        }
                    }
                    _ => return Ok(()),
                }
                continue;
            }
            let (vr, len) = if enc.explicit {
                let Some(vr) = self.bytes::<2>() else {
                    return Ok(());
                };
                if long_vr(vr) {
                    let (Some(_), Some(len)) = (self.bytes::<2>(), self.u32(enc)) else {
                        return Ok(());
                    };
                    (Some(vr), len)
                } else {
                    let Some(len) = self.u16(enc) else {
                        return Ok(());
                    };
                    (Some(vr), u32::from(len))
                }
            } else {
                let Some(len) = self.u32(enc) else {
                    return Ok(());
                };
                (None, len)
            };
            let pixel_data = (group, element) == (0x7FE0, 0x0010);
            if pixel_data && stack.is_empty() {
                if !with_pixels {
                    return Ok(());
                }
                if len != UNDEFINED {
                    self.check(|| "the pixel data".into(), len)?;
                    return Ok(());
                }
                // Encapsulated pixel data: its fragments are walked (and checked) below.
            }
            let what = || format!("element ({group:04X},{element:04X})");
            if len == UNDEFINED {
                // dicom-rs 0.10 reads an undefined-length UN as a sequence in the data set's
                // own encoding (not implicit VR, as the standard has it); so does this walk,
                // since it guards dicom-rs's reading.
                let kind = if pixel_data {
                    FrameKind::Fragments
                } else {
                    FrameKind::Sequence
                };
                let encoding = enc;
                stack.push(Frame {
                    end: None,
                    kind,
                    encoding,
                });
                continue;
            }
            self.check(what, len)?;
            let sequence = match vr {
                Some(vr) => vr == *b"SQ",
                // Implicit VR: a sequence if its value starts with an item tag.
                None => {
                    len >= 8 && {
                        let peek = self
                            .inner
                            .fill_buf()
                            .map(|b| b.get(..4).map(|t| t.to_vec()))
                            .ok()
                            .flatten();
                        peek.is_some_and(|t| {
                            if enc.big_endian {
                                t == [0xFF, 0xFE, 0xE0, 0x00]
                            } else {
                                t == [0xFE, 0xFF, 0x00, 0xE0]
                            }
                        })
                    }
                }
            };
            if sequence {
                stack.push(Frame {
                    end: Some(self.pos + u64::from(len)),
                    kind: FrameKind::Sequence,
                    encoding: enc,
                });
            } else if !self.skip(u64::from(len)) {
                return Ok(());
            }
        }
        Ok(())
    }
}

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
        pixel_spacing_mm: floats(obj, tags::PIXEL_SPACING).unwrap_or_default(),
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

    /// Explicit VR little endian element with a 2-byte length.
    fn element(
        group: u16,
        elem: u16,
        vr: &[u8; 2],
        value: &[u8],
        declared: Option<u16>,
    ) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend(group.to_le_bytes());
        out.extend(elem.to_le_bytes());
        out.extend(vr);
        out.extend(declared.unwrap_or(value.len() as u16).to_le_bytes());
        out.extend(value);
        out
    }

    fn file_with(dataset: &[u8]) -> tempfile::NamedTempFile {
        file_in(b"1.2.840.10008.1.2.1\0", dataset)
    }

    /// A file whose meta group names transfer syntax `ts`, followed by `dataset` as it is.
    fn file_in(ts: &[u8], dataset: &[u8]) -> tempfile::NamedTempFile {
        let mut meta = element(0x0002, 0x0010, b"UI", ts, None);
        let mut bytes = vec![0u8; 128];
        bytes.extend(b"DICM");
        let mut group_length = element(
            0x0002,
            0x0000,
            b"UL",
            &(meta.len() as u32).to_le_bytes(),
            None,
        );
        bytes.append(&mut group_length);
        bytes.append(&mut meta);
        bytes.extend(dataset);
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), bytes).unwrap();
        f
    }

    #[test]
    fn a_declared_length_beyond_the_file_is_refused_before_allocation() {
        let key = PseudonymKey::from_bytes([7; 32]);
        // A UI value that claims 60000 bytes in a file of ~200.
        let bad = element(0x0008, 0x0016, b"UI", b"1.2.3\0", Some(60_000));
        let f = file_with(&bad);
        let e = read_facts(f.path(), &key).unwrap_err();
        assert!(
            matches!(&e, HeaderError::Unreadable(m) if m.contains("more than the whole file")),
            "{e}"
        );
        // The same element with its true length is read (and then lacks other attributes).
        let good = element(0x0008, 0x0016, b"UI", b"1.2.3\0", None);
        let f = file_with(&good);
        let e = read_facts(f.path(), &key).unwrap_err();
        assert!(matches!(e, HeaderError::Missing(_)), "{e}");
    }

    fn deflated(data: &[u8]) -> Vec<u8> {
        use std::io::Write;
        let mut e = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::best());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    #[test]
    fn deflated_data_sets_are_guarded_too() {
        let key = PseudonymKey::from_bytes([7; 32]);
        let ts = b"1.2.840.10008.1.2.1.99\0";
        // A declared length beyond the inflated data set.
        let bad = element(0x0008, 0x0016, b"UI", b"1.2.3\0", Some(60_000));
        let f = file_in(ts, &deflated(&bad));
        let e = read_facts(f.path(), &key).unwrap_err();
        assert!(
            matches!(&e, HeaderError::Unreadable(m) if m.contains("more than the whole file")),
            "{e}"
        );
        // A deflate bomb: 64 MiB of one element's value from a file of ~70 KB.
        let mut bomb = element(0x0008, 0x0016, b"UI", b"1.2.3\0", None);
        bomb.extend([0x09, 0x00, 0x10, 0x00, b'O', b'B', 0, 0]);
        bomb.extend((64u32 << 20).to_le_bytes());
        bomb.resize(bomb.len() + (64 << 20), 0);
        let f = file_in(ts, &deflated(&bomb));
        let e = read_facts(f.path(), &key).unwrap_err();
        assert!(
            matches!(&e, HeaderError::Unreadable(m) if m.contains("inflates to more than")),
            "{e}"
        );
        // An honest deflated data set is read (and then lacks other attributes).
        let good = element(0x0008, 0x0016, b"UI", b"1.2.3\0", None);
        let f = file_in(ts, &deflated(&good));
        let e = read_facts(f.path(), &key).unwrap_err();
        assert!(matches!(e, HeaderError::Missing(_)), "{e}");
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]
        /// Garbage after a valid file meta group, or raw: an error or facts, never a panic.
        #[test]
        fn arbitrary_data_sets_never_panic(body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..2048), raw in proptest::prelude::any::<bool>()) {
            let key = PseudonymKey::from_bytes([7; 32]);
            let f = if raw {
                let f = tempfile::NamedTempFile::new().unwrap();
                let mut bytes = vec![0x08, 0x00];
                bytes.extend(&body);
                std::fs::write(f.path(), bytes).unwrap();
                f
            } else {
                file_with(&body)
            };
            let _ = read_facts(f.path(), &key);
        }
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
