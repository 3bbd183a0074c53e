//! Reading attribute values the way every imaging module needs them: trimmed text, sequence
//! items, integers and decimal strings, with values stored as VR UN decoded (dicom-rs reads UN
//! as raw bytes, so Rescale Slope stored as UN would otherwise come out as byte values).

use dicom_core::{Tag, VR};
use dicom_object::InMemDicomObject;

pub(crate) fn text(obj: &InMemDicomObject, tag: Tag) -> Option<String> {
    let e = obj.get(tag)?;
    let s = if e.vr() == VR::UN {
        String::from_utf8_lossy(&e.to_bytes().ok()?).into_owned()
    } else {
        e.to_str().ok()?.into_owned()
    };
    let s = s.trim_matches(|c: char| c == '\0' || c.is_whitespace());
    (!s.is_empty()).then(|| s.to_string())
}

pub(crate) fn items(obj: &InMemDicomObject, tag: Tag) -> &[InMemDicomObject] {
    obj.get(tag).and_then(|e| e.items()).unwrap_or(&[])
}

pub(crate) fn uint(obj: &InMemDicomObject, tag: Tag) -> Option<u32> {
    let e = obj.get(tag)?;
    if e.vr() == VR::UN {
        let b = e.to_bytes().ok()?;
        return (b.len() == 2).then(|| u32::from(u16::from_le_bytes([b[0], b[1]])));
    }
    e.to_int::<u32>().ok()
}

/// Decimal strings (DS) or binary floats of an element, all finite.
pub(crate) fn floats(obj: &InMemDicomObject, tag: Tag) -> Option<Vec<f64>> {
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
