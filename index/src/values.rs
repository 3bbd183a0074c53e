//! Reading attribute values from a parsed DICOM data set: trimmed text, sequence items,
//! integers and decimals. Shared by the index and the imaging crate.
//!
//! Values stored with VR UN in explicit-VR files reach us from dicom-rs as raw bytes (it would
//! render Rescale Slope "1 " as 49\32). Every standard attribute read through here is text,
//! numbers-as-text or a 16-bit integer, so UN bytes are decoded as such; anything else is
//! treated as absent.

use dicom_core::{Tag, VR};
use dicom_object::InMemDicomObject;

/// Text of an element, trimmed of DICOM padding; `None` when absent or empty.
pub fn text(obj: &InMemDicomObject, tag: Tag) -> Option<String> {
    let e = obj.get(tag)?;
    let s = if e.vr() == VR::UN {
        let bytes = e.to_bytes().ok()?;
        if !bytes.iter().all(|b| *b == 0 || (0x20..0x7f).contains(b)) {
            return None;
        }
        String::from_utf8_lossy(&bytes).into_owned()
    } else {
        e.to_str().ok()?.into_owned()
    };
    let s = s.trim_matches(|c: char| c == '\0' || c.is_whitespace());
    (!s.is_empty()).then(|| s.to_string())
}

/// The items of a sequence (none when absent or not a sequence).
pub fn items(obj: &InMemDicomObject, tag: Tag) -> &[InMemDicomObject] {
    obj.get(tag).and_then(|e| e.items()).unwrap_or(&[])
}

/// An unsigned integer (US, UL, IS; UN holding 2 bytes little endian or IS text).
pub fn uint(obj: &InMemDicomObject, tag: Tag) -> Option<u32> {
    let e = obj.get(tag)?;
    if e.vr() == VR::UN {
        // Little endian, as in the explicit VR little endian files where UN is met in practice.
        let bytes = e.to_bytes().ok()?;
        return match bytes.len() {
            2 => Some(u32::from(u16::from_le_bytes([bytes[0], bytes[1]]))),
            _ => text(obj, tag)?.trim().parse().ok(),
        };
    }
    e.to_int::<u32>().ok()
}

/// The first value of a decimal element, if finite.
pub fn float(obj: &InMemDicomObject, tag: Tag) -> Option<f64> {
    let e = obj.get(tag)?;
    let v = if e.vr() == VR::UN {
        text(obj, tag)?.split('\\').next()?.trim().parse().ok()?
    } else {
        e.to_float64().ok()?
    };
    v.is_finite().then_some(v)
}

/// Every value of a decimal element (DS or binary floats); `None` when absent, or when any
/// value is unreadable or not finite.
pub fn floats(obj: &InMemDicomObject, tag: Tag) -> Option<Vec<f64>> {
    let e = obj.get(tag)?;
    let v: Vec<f64> = if e.vr() == VR::UN || e.vr() == VR::DS {
        text(obj, tag)?
            .split('\\')
            .map(|p| p.trim().parse::<f64>())
            .collect::<Result<_, _>>()
            .ok()?
    } else {
        e.to_multi_float64().ok()?
    };
    v.iter().all(|x| x.is_finite()).then_some(v)
}
