//! One frame of pixel data → real-world values, from any transfer syntax we can decode.
//!
//! Owns the step from stored bytes to `slope · value + intercept`: native (uncompressed) data is
//! read in place, encapsulated data goes through dicom-rs's codecs (JPEG baseline, extended
//! 8-bit and lossless via jpeg-decoder; JPEG-LS via CharLS; JPEG 2000 via OpenJPEG). RLE
//! Lossless is decoded here by `rle`, since dicom-rs's adapter stops at 16 bits. Bits Stored
//! and Pixel Representation are honoured on every path, so a codec that returns the raw bit
//! pattern still gives the right signed values. Knows nothing about
//! geometry or series; callers say which frame goes where.

use dicom_core::value::{PrimitiveValue, Value};
use dicom_dictionary_std::tags;
use dicom_encoding::Codec;
use dicom_encoding::adapters::{PixelDataObject, RawPixelData};
use dicom_object::InMemDicomObject;
use dicom_transfer_syntax_registry::{TransferSyntaxIndex as _, TransferSyntaxRegistry};
use std::borrow::Cow;

/// How a frame's stored values are laid out.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Layout {
    pub rows: usize,
    pub columns: usize,
    pub bits_allocated: u16,
    pub bits_stored: u16,
    pub signed: bool,
}

impl Layout {
    fn pixels(&self) -> usize {
        self.rows * self.columns
    }

    fn frame_bytes(&self) -> usize {
        self.pixels() * usize::from(self.bits_allocated / 8)
    }
}

/// The modality transform of a frame: real value = slope · stored + intercept, or, when the
/// file has a Modality LUT Sequence, the table's entry for the stored value.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Rescale {
    pub slope: f64,
    pub intercept: f64,
    pub lut: Option<std::sync::Arc<ModalityLut>>,
}

/// A Modality LUT: stored values below `first` map to the first entry, above the last
/// entry's to the last one (PS3.3 C.11.1).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ModalityLut {
    pub first: i64,
    pub table: Vec<f64>,
}

/// The transfer syntaxes whose pixel data is native (not encapsulated); a deflated data set
/// is inflated by dicom-rs as it is read.
pub(crate) fn is_native(ts_uid: &str) -> bool {
    matches!(
        ts_uid,
        "1.2.840.10008.1.2"
            | "1.2.840.10008.1.2.1"
            | "1.2.840.10008.1.2.2"
            | "1.2.840.10008.1.2.1.99"
    )
}

const RLE_LOSSLESS: &str = "1.2.840.10008.1.2.5";

/// Whether frames of this transfer syntax can be decoded here; `Err` says why not.
pub(crate) fn check_decodable(ts_uid: &str) -> Result<(), String> {
    if is_native(ts_uid) || ts_uid == RLE_LOSSLESS {
        return Ok(());
    }
    let ts = TransferSyntaxRegistry
        .get(ts_uid)
        .ok_or_else(|| format!("transfer syntax {ts_uid} is unknown"))?;
    match ts.codec() {
        Codec::EncapsulatedPixelData(Some(_), _) => Ok(()),
        _ => Err(format!(
            "transfer syntax {} ({ts_uid}) has no pixel data decoder here",
            ts.name()
        )),
    }
}

/// Stored value → integer, honouring Bits Stored and Pixel Representation.
pub(crate) fn stored(raw: u32, bits_stored: u16, signed: bool) -> f64 {
    let mask = if bits_stored >= 32 {
        u32::MAX
    } else {
        (1u32 << bits_stored) - 1
    };
    let v = raw & mask;
    if signed && v & (1 << (bits_stored - 1)) != 0 {
        if bits_stored >= 32 {
            f64::from(v as i32)
        } else {
            f64::from(v) - f64::from(1u32 << bits_stored)
        }
    } else {
        f64::from(v)
    }
}

fn write(out: &mut [f32], raw: impl Iterator<Item = u32>, layout: &Layout, r: &Rescale) {
    let (bs, signed) = (layout.bits_stored, layout.signed);
    if let Some(lut) = &r.lut {
        let last = lut.table.len() as i64 - 1;
        for (o, v) in out.iter_mut().zip(raw) {
            let i = (stored(v, bs, signed) as i64 - lut.first).clamp(0, last);
            *o = lut.table[i as usize] as f32;
        }
        return;
    }
    for (o, v) in out.iter_mut().zip(raw) {
        *o = (stored(v, bs, signed) * r.slope + r.intercept) as f32;
    }
}

/// Values from little-endian bytes of `bits_allocated` bits each.
fn from_le_bytes(out: &mut [f32], bytes: &[u8], layout: &Layout, r: &Rescale) {
    match layout.bits_allocated {
        8 => write(out, bytes.iter().map(|b| u32::from(*b)), layout, r),
        16 => write(
            out,
            bytes
                .chunks_exact(2)
                .map(|c| u32::from(u16::from_le_bytes([c[0], c[1]]))),
            layout,
            r,
        ),
        _ => write(
            out,
            bytes
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])),
            layout,
            r,
        ),
    }
}

/// Decode frame `frame` (0-based) of `obj`'s pixel data into `out` (rows × columns values).
/// `ts_uid` is the file's transfer syntax. Errors are one line, for the caller to attach to
/// the file.
pub(crate) fn decode_frame(
    obj: &InMemDicomObject,
    ts_uid: &str,
    frame: usize,
    layout: &Layout,
    rescale: &Rescale,
    out: &mut [f32],
) -> Result<(), String> {
    let n = layout.pixels();
    if out.len() != n {
        return Err(format!("frame buffer of {} for {n} pixels", out.len()));
    }
    if !matches!(layout.bits_allocated, 8 | 16 | 32) {
        return Err(format!(
            "{}-bit pixels are not supported",
            layout.bits_allocated
        ));
    }
    let value = obj
        .get(tags::PIXEL_DATA)
        .map(|e| e.value())
        .ok_or("no Pixel Data")?;
    if is_native(ts_uid) {
        let Value::Primitive(p) = value else {
            return Err("native transfer syntax with encapsulated pixel data".into());
        };
        return native_frame(
            p,
            ts_uid == "1.2.840.10008.1.2.2",
            frame,
            layout,
            rescale,
            out,
        );
    }
    let source = Encapsulated { obj, ts_uid };
    if ts_uid == RLE_LOSSLESS {
        let encoded = source
            .frame_pixel_data(frame as u32)
            .ok_or_else(|| format!("RLE Lossless frame {} is missing", frame + 1))?;
        let bytes = crate::rle::decode(&encoded, n, usize::from(layout.bits_allocated / 8))
            .map_err(|e| format!("frame {}: {e}", frame + 1))?;
        from_le_bytes(out, &bytes, layout, rescale);
        return Ok(());
    }
    let ts = TransferSyntaxRegistry
        .get(ts_uid)
        .ok_or_else(|| format!("transfer syntax {ts_uid} is unknown"))?;
    let Codec::EncapsulatedPixelData(Some(decoder), _) = ts.codec() else {
        return Err(format!("no decoder for transfer syntax {}", ts.name()));
    };
    // The codecs size their output from Rows/Columns but decode what the codestream says:
    // the two must agree, or a frame would come out padded, cut or misaligned.
    let encoded = source
        .frame_pixel_data(frame as u32)
        .ok_or_else(|| format!("{} frame {} is missing", ts.name(), frame + 1))?;
    match codestream_size(&encoded) {
        Some(size) if size == (layout.rows, layout.columns) => {}
        Some((rows, columns)) => {
            return Err(format!(
                "{} frame {} holds a {columns} × {rows} image; Columns × Rows say {} × {}",
                ts.name(),
                frame + 1,
                layout.columns,
                layout.rows
            ));
        }
        None => {
            return Err(format!(
                "{} frame {} has no readable frame header",
                ts.name(),
                frame + 1
            ));
        }
    }
    let mut bytes = Vec::with_capacity(layout.frame_bytes());
    decoder
        .decode_frame(&source, frame as u32, &mut bytes)
        .map_err(|e| format!("{} frame {}: {e}", ts.name(), frame + 1))?;
    if bytes.len() < layout.frame_bytes() {
        return Err(format!(
            "{} frame {} decoded to {} bytes; {} × {} pixels of {} bits need {}",
            ts.name(),
            frame + 1,
            bytes.len(),
            layout.rows,
            layout.columns,
            layout.bits_allocated,
            layout.frame_bytes()
        ));
    }
    from_le_bytes(out, &bytes[..layout.frame_bytes()], layout, rescale);
    Ok(())
}

/// (rows, columns) of a JPEG, JPEG-LS or JPEG 2000 codestream, from its frame header (SOFn /
/// SOF55 marker segment, or the SIZ segment after SOC); `None` if there is none.
pub(crate) fn codestream_size(data: &[u8]) -> Option<(usize, usize)> {
    let be16 = |i: usize| -> Option<usize> {
        Some(usize::from(u16::from_be_bytes([
            *data.get(i)?,
            *data.get(i + 1)?,
        ])))
    };
    let be32 = |i: usize| -> Option<usize> {
        let b = data.get(i..i + 4)?;
        Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
    };
    if data.starts_with(&[0xFF, 0x4F, 0xFF, 0x51]) {
        // JPEG 2000: SOC, then SIZ: Lsiz, Rsiz, Xsiz, Ysiz, XOsiz, YOsiz.
        let (x, y, x0, y0) = (be32(8)?, be32(12)?, be32(16)?, be32(20)?);
        return Some((y.checked_sub(y0)?, x.checked_sub(x0)?));
    }
    if !data.starts_with(&[0xFF, 0xD8]) {
        return None;
    }
    // JPEG / JPEG-LS: walk the marker segments up to the frame header.
    let mut i = 2;
    loop {
        while *data.get(i)? != 0xFF {
            i += 1;
        }
        while *data.get(i)? == 0xFF {
            i += 1;
        }
        let marker = *data.get(i)?;
        i += 1;
        match marker {
            0xC0..=0xC3 | 0xC5..=0xC7 | 0xC9..=0xCB | 0xCD..=0xCF | 0xF7 => {
                // Lf, P, Y (lines), X (samples per line).
                return Some((be16(i + 3)?, be16(i + 5)?));
            }
            0xD0..=0xD9 | 0x01 => {}
            _ => i += be16(i)?,
        }
    }
}

/// A frame of native pixel data, read where it lies.
fn native_frame(
    p: &PrimitiveValue,
    big_endian: bool,
    frame: usize,
    layout: &Layout,
    r: &Rescale,
    out: &mut [f32],
) -> Result<(), String> {
    let n = layout.pixels();
    let short = |have_bytes: usize| {
        format!(
            "pixel data holds {have_bytes} bytes; frame {} of {} × {} pixels of {} bits needs {}",
            frame + 1,
            layout.rows,
            layout.columns,
            layout.bits_allocated,
            (frame + 1) * layout.frame_bytes()
        )
    };
    // dicom-rs has already put OW words in native order; OB bytes are as in the file.
    match (layout.bits_allocated, p) {
        (8, PrimitiveValue::U8(b)) => {
            let s = b.get(frame * n..(frame + 1) * n).ok_or(short(b.len()))?;
            write(out, s.iter().map(|v| u32::from(*v)), layout, r);
        }
        (16, PrimitiveValue::U16(w)) => {
            let s = w
                .get(frame * n..(frame + 1) * n)
                .ok_or(short(2 * w.len()))?;
            write(out, s.iter().map(|v| u32::from(*v)), layout, r);
        }
        (16, PrimitiveValue::I16(w)) => {
            let s = w
                .get(frame * n..(frame + 1) * n)
                .ok_or(short(2 * w.len()))?;
            write(out, s.iter().map(|v| u32::from(*v as u16)), layout, r);
        }
        (32, PrimitiveValue::U16(w)) => {
            // 32-bit values in OW: two 16-bit words each, in the file's byte order.
            let s = w
                .get(2 * frame * n..2 * (frame + 1) * n)
                .ok_or(short(2 * w.len()))?;
            let words = s.chunks_exact(2).map(|c| {
                let (low, high) = if big_endian {
                    (c[1], c[0])
                } else {
                    (c[0], c[1])
                };
                u32::from(low) | u32::from(high) << 16
            });
            write(out, words, layout, r);
        }
        (32, PrimitiveValue::U32(w)) => {
            let s = w
                .get(frame * n..(frame + 1) * n)
                .ok_or(short(4 * w.len()))?;
            write(out, s.iter().copied(), layout, r);
        }
        (32, PrimitiveValue::I32(w)) => {
            let s = w
                .get(frame * n..(frame + 1) * n)
                .ok_or(short(4 * w.len()))?;
            write(out, s.iter().map(|v| *v as u32), layout, r);
        }
        (bits, PrimitiveValue::U8(b)) if !big_endian || bits == 8 => {
            let fb = layout.frame_bytes();
            let s = b.get(frame * fb..(frame + 1) * fb).ok_or(short(b.len()))?;
            from_le_bytes(out, s, layout, r);
        }
        (bits, other) => {
            return Err(format!(
                "{bits}-bit pixel data stored as {:?}",
                other.value_type()
            ));
        }
    }
    Ok(())
}

use dicom_core::value::DicomValueType as _;

/// A parsed data set seen through the interface dicom-rs's codecs read pixel data from
/// (dicom-rs implements it only for objects with a file meta group, and reads attributes
/// without our UN-aware readers).
struct Encapsulated<'a> {
    obj: &'a InMemDicomObject,
    ts_uid: &'a str,
}

impl Encapsulated<'_> {
    fn u16_of(&self, tag: dicom_core::Tag) -> Option<u16> {
        amicus_index::values::uint(self.obj, tag).and_then(|v| u16::try_from(v).ok())
    }

    fn fragments(&self) -> Option<&[Vec<u8>]> {
        match self.obj.get(tags::PIXEL_DATA)?.value() {
            Value::PixelSequence(s) => Some(s.fragments()),
            _ => None,
        }
    }
}

impl PixelDataObject for Encapsulated<'_> {
    fn transfer_syntax_uid(&self) -> &str {
        self.ts_uid
    }

    fn rows(&self) -> Option<u16> {
        self.u16_of(tags::ROWS)
    }

    fn cols(&self) -> Option<u16> {
        self.u16_of(tags::COLUMNS)
    }

    fn samples_per_pixel(&self) -> Option<u16> {
        self.u16_of(tags::SAMPLES_PER_PIXEL)
    }

    fn bits_allocated(&self) -> Option<u16> {
        self.u16_of(tags::BITS_ALLOCATED)
    }

    fn bits_stored(&self) -> Option<u16> {
        self.u16_of(tags::BITS_STORED)
    }

    fn photometric_interpretation(&self) -> Option<&str> {
        self.obj
            .get(tags::PHOTOMETRIC_INTERPRETATION)?
            .string()
            .ok()
            .map(|s| s.trim_end_matches(['\0', ' ']))
    }

    fn number_of_frames(&self) -> Option<u32> {
        amicus_index::values::uint(self.obj, tags::NUMBER_OF_FRAMES)
    }

    fn number_of_fragments(&self) -> Option<u32> {
        self.fragments().map(|f| f.len() as u32)
    }

    fn fragment(&self, fragment: usize) -> Option<Cow<'_, [u8]>> {
        self.fragments()?
            .get(fragment)
            .map(|f| Cow::Borrowed(f.as_slice()))
    }

    fn offset_table(&self) -> Option<Cow<'_, [u32]>> {
        match self.obj.get(tags::PIXEL_DATA)?.value() {
            Value::PixelSequence(s) => Some(Cow::Borrowed(s.offset_table())),
            _ => None,
        }
    }

    fn raw_pixel_data(&self) -> Option<RawPixelData> {
        match self.obj.get(tags::PIXEL_DATA)?.value() {
            Value::PixelSequence(s) => Some(RawPixelData {
                fragments: s.fragments().iter().cloned().collect(),
                offset_table: s.offset_table().iter().copied().collect(),
            }),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{codestream_size, stored};
    use proptest::prelude::*;

    #[test]
    fn frame_headers_give_the_image_size() {
        // JPEG: SOI, APP0 (skipped by its length), SOF3 with 512 lines of 256 samples.
        let jpeg = [
            0xFF, 0xD8, 0xFF, 0xE0, 0x00, 0x04, 0xAA, 0xBB, 0xFF, 0xC3, 0x00, 0x0B, 0x10, 0x02,
            0x00, 0x01, 0x00,
        ];
        assert_eq!(codestream_size(&jpeg), Some((512, 256)));
        // JPEG 2000: SOC, SIZ with Xsiz 300, Ysiz 200, offsets 0.
        let mut j2k = vec![0xFF, 0x4F, 0xFF, 0x51, 0x00, 0x29, 0x00, 0x00];
        for v in [300u32, 200, 0, 0] {
            j2k.extend(v.to_be_bytes());
        }
        assert_eq!(codestream_size(&j2k), Some((200, 300)));
        assert_eq!(codestream_size(&j2k[..20]), None);
        assert_eq!(codestream_size(b"not a codestream"), None);
    }

    proptest! {
        #[test]
        fn frame_header_search_never_panics(mut data in prop::collection::vec(any::<u8>(), 0..200)) {
            let _ = codestream_size(&data);
            data.splice(0..0, [0xFF, 0xD8]);
            let _ = codestream_size(&data);
        }
    }

    #[test]
    fn stored_values_honour_bits_stored_and_sign() {
        assert_eq!(stored(0x0FFF, 12, false), 4095.0);
        assert_eq!(stored(0x0FFF, 12, true), -1.0);
        assert_eq!(stored(0xF000, 12, true), 0.0);
        assert_eq!(stored(0x0800, 12, true), -2048.0);
        assert_eq!(stored(0xFFFF, 16, true), -1.0);
        assert_eq!(stored(200, 8, false), 200.0);
        assert_eq!(stored(u32::MAX, 32, true), -1.0);
        assert_eq!(stored(u32::MAX, 32, false), f64::from(u32::MAX));
    }
}
