//! The ground truth as a DICOM Segmentation (binary, one frame per segment and slice where the
//! segment is present), referencing the CT through the Derivation Image and Common Instance
//! Reference modules, on the CT's grid so a mask voxel is exactly a CT voxel.

use crate::archive::{Roi, Slice, Study, image_ref};
use crate::dicom::{Obj, ds, ds_list, put_pixel_module, put_seq, put_str, put_u16, uid, write};
use dicom_core::value::PrimitiveValue;
use dicom_core::{DataElement, VR, dicom_value};
use dicom_dictionary_std::{tags, uids};
use std::path::Path;

fn code(value: &str, scheme: &str, meaning: &str) -> Obj {
    let mut c = Obj::new_empty();
    put_str(&mut c, tags::CODE_VALUE, VR::SH, value);
    put_str(&mut c, tags::CODING_SCHEME_DESIGNATOR, VR::SH, scheme);
    put_str(&mut c, tags::CODE_MEANING, VR::LO, meaning);
    c
}

fn segment_item(number: u16, roi: &Roi) -> Obj {
    let mut s = Obj::new_empty();
    put_u16(&mut s, tags::SEGMENT_NUMBER, number);
    put_str(&mut s, tags::SEGMENT_LABEL, VR::LO, &roi.name);
    put_str(&mut s, tags::SEGMENT_ALGORITHM_TYPE, VR::CS, "MANUAL");
    let (category, kind) = if roi.interpreted == "GTV" {
        (
            code("49755003", "SCT", "Morphologically Altered Structure"),
            code("108369006", "SCT", "Neoplasm"),
        )
    } else {
        (
            code("123037004", "SCT", "Anatomical Structure"),
            code("39607008", "SCT", "Lung"),
        )
    };
    put_seq(
        &mut s,
        tags::SEGMENTED_PROPERTY_CATEGORY_CODE_SEQUENCE,
        vec![category],
    );
    let mut kind = kind;
    if roi.interpreted != "GTV" {
        let side = if roi.name.ends_with("_L") {
            code("7771000", "SCT", "Left")
        } else {
            code("24028007", "SCT", "Right")
        };
        put_seq(
            &mut kind,
            tags::SEGMENTED_PROPERTY_TYPE_MODIFIER_CODE_SEQUENCE,
            vec![side],
        );
    }
    put_seq(
        &mut s,
        tags::SEGMENTED_PROPERTY_TYPE_CODE_SEQUENCE,
        vec![kind],
    );
    s
}

pub(crate) fn write_seg(
    path: &Path,
    st: &Study,
    rois: &[Roi],
    ct_series_uid: &str,
    series_uid: &str,
    slices: &[Slice],
    label: &str,
) -> Result<(), String> {
    let p = st.profile;
    let n = p.rows as usize;
    let dx = p.pixel_spacing_mm();
    let sop_uid = uid(st.seed, &[st.site, label, "seg"]);
    let dim_uid = uid(st.seed, &[st.site, label, "seg-dimensions"]);

    let mut obj = st.derived_object(
        "SEG",
        series_uid,
        4,
        uids::SEGMENTATION_STORAGE,
        &sop_uid,
        "Ground truth segmentation",
    );
    put_str(&mut obj, tags::DEVICE_SERIAL_NUMBER, VR::LO, "1");
    put_str(
        &mut obj,
        tags::SOFTWARE_VERSIONS,
        VR::LO,
        env!("CARGO_PKG_VERSION"),
    );
    put_str(&mut obj, tags::IMAGE_TYPE, VR::CS, "DERIVED\\PRIMARY");
    put_str(&mut obj, tags::CONTENT_DATE, VR::DA, &st.study_date);
    put_str(&mut obj, tags::CONTENT_TIME, VR::TM, "120000");
    put_str(&mut obj, tags::CONTENT_LABEL, VR::CS, "GROUND_TRUTH");
    put_str(
        &mut obj,
        tags::CONTENT_DESCRIPTION,
        VR::LO,
        "Synthetic ground truth",
    );
    put_str(&mut obj, tags::CONTENT_CREATOR_NAME, VR::PN, "amicus^synth");
    put_pixel_module(&mut obj, p.rows, 1, 1);
    put_str(&mut obj, tags::LOSSY_IMAGE_COMPRESSION, VR::CS, "00");
    put_str(&mut obj, tags::SEGMENTATION_TYPE, VR::CS, "BINARY");
    put_seq(
        &mut obj,
        tags::SEGMENT_SEQUENCE,
        rois.iter()
            .enumerate()
            .map(|(i, r)| segment_item(i as u16 + 1, r))
            .collect(),
    );

    // Dimensions: segment number, then position.
    let mut org = Obj::new_empty();
    put_str(&mut org, tags::DIMENSION_ORGANIZATION_UID, VR::UI, &dim_uid);
    put_seq(&mut obj, tags::DIMENSION_ORGANIZATION_SEQUENCE, vec![org]);
    put_str(&mut obj, tags::DIMENSION_ORGANIZATION_TYPE, VR::CS, "3D");
    let dim = |pointer, group| {
        let mut d = Obj::new_empty();
        put_str(&mut d, tags::DIMENSION_ORGANIZATION_UID, VR::UI, &dim_uid);
        d.put(DataElement::new(
            tags::DIMENSION_INDEX_POINTER,
            VR::AT,
            dicom_value!(Tags, [pointer]),
        ));
        d.put(DataElement::new(
            tags::FUNCTIONAL_GROUP_POINTER,
            VR::AT,
            dicom_value!(Tags, [group]),
        ));
        d
    };
    put_seq(
        &mut obj,
        tags::DIMENSION_INDEX_SEQUENCE,
        vec![
            dim(
                tags::REFERENCED_SEGMENT_NUMBER,
                tags::SEGMENT_IDENTIFICATION_SEQUENCE,
            ),
            dim(tags::IMAGE_POSITION_PATIENT, tags::PLANE_POSITION_SEQUENCE),
        ],
    );

    // Shared: spacing and orientation of the CT grid.
    let mut measures = Obj::new_empty();
    put_str(
        &mut measures,
        tags::PIXEL_SPACING,
        VR::DS,
        &ds_list(&[dx, dx]),
    );
    put_str(
        &mut measures,
        tags::SLICE_THICKNESS,
        VR::DS,
        &ds(p.slice_thickness_mm),
    );
    put_str(
        &mut measures,
        tags::SPACING_BETWEEN_SLICES,
        VR::DS,
        &ds(p.slice_thickness_mm),
    );
    let mut orientation = Obj::new_empty();
    put_str(
        &mut orientation,
        tags::IMAGE_ORIENTATION_PATIENT,
        VR::DS,
        "1\\0\\0\\0\\1\\0",
    );
    let mut shared = Obj::new_empty();
    put_seq(&mut shared, tags::PIXEL_MEASURES_SEQUENCE, vec![measures]);
    put_seq(
        &mut shared,
        tags::PLANE_ORIENTATION_SEQUENCE,
        vec![orientation],
    );
    put_seq(
        &mut obj,
        tags::SHARED_FUNCTIONAL_GROUPS_SEQUENCE,
        vec![shared],
    );

    // Frames: every (segment, slice) where the segment is present. 1-bit frames are packed
    // back to back (little-endian bit order), without padding between frames.
    let mut per_frame = Vec::new();
    let mut pixels: Vec<u8> = Vec::new();
    let mut bit_offset = 0usize;
    for (si, roi) in rois.iter().enumerate() {
        for (k, section) in &roi.sections {
            let slice = &slices[*k];
            pixels.resize((bit_offset + n * n).div_ceil(8), 0);
            for r in 0..n {
                for c in 0..n {
                    let x = slice.origin.0 + c as f64 * dx;
                    let y = slice.origin.1 + r as f64 * dx;
                    if section.contains(x, y) {
                        let bit = bit_offset + r * n + c;
                        pixels[bit / 8] |= 1 << (bit % 8);
                    }
                }
            }
            bit_offset += n * n;

            let mut item = Obj::new_empty();
            let mut content = Obj::new_empty();
            content.put(DataElement::new(
                tags::DIMENSION_INDEX_VALUES,
                VR::UL,
                dicom_value!(U32, [si as u32 + 1, *k as u32 + 1]),
            ));
            put_seq(&mut item, tags::FRAME_CONTENT_SEQUENCE, vec![content]);
            let mut position = Obj::new_empty();
            put_str(
                &mut position,
                tags::IMAGE_POSITION_PATIENT,
                VR::DS,
                &ds_list(&[slice.origin.0, slice.origin.1, slice.z]),
            );
            put_seq(&mut item, tags::PLANE_POSITION_SEQUENCE, vec![position]);
            let mut ident = Obj::new_empty();
            put_u16(&mut ident, tags::REFERENCED_SEGMENT_NUMBER, si as u16 + 1);
            put_seq(
                &mut item,
                tags::SEGMENT_IDENTIFICATION_SEQUENCE,
                vec![ident],
            );
            let mut source = image_ref(&slice.sop_uid);
            put_seq(
                &mut source,
                tags::PURPOSE_OF_REFERENCE_CODE_SEQUENCE,
                vec![code(
                    "121322",
                    "DCM",
                    "Source image for image processing operation",
                )],
            );
            let mut derivation = Obj::new_empty();
            put_seq(&mut derivation, tags::SOURCE_IMAGE_SEQUENCE, vec![source]);
            put_seq(
                &mut derivation,
                tags::DERIVATION_CODE_SEQUENCE,
                vec![code("113076", "DCM", "Segmentation")],
            );
            put_seq(&mut item, tags::DERIVATION_IMAGE_SEQUENCE, vec![derivation]);
            per_frame.push(item);
        }
    }
    obj.put(DataElement::new(
        tags::NUMBER_OF_FRAMES,
        VR::IS,
        PrimitiveValue::from(per_frame.len().to_string()),
    ));
    put_seq(
        &mut obj,
        tags::PER_FRAME_FUNCTIONAL_GROUPS_SEQUENCE,
        per_frame,
    );

    // Common Instance Reference: every CT image the frames derive from.
    let instances = slices.iter().map(|s| image_ref(&s.sop_uid)).collect();
    let mut series = Obj::new_empty();
    put_str(
        &mut series,
        tags::SERIES_INSTANCE_UID,
        VR::UI,
        ct_series_uid,
    );
    put_seq(&mut series, tags::REFERENCED_INSTANCE_SEQUENCE, instances);
    put_seq(&mut obj, tags::REFERENCED_SERIES_SEQUENCE, vec![series]);

    if pixels.len() % 2 == 1 {
        pixels.push(0);
    }
    obj.put(DataElement::new(
        tags::PIXEL_DATA,
        VR::OB,
        PrimitiveValue::from(pixels),
    ));
    write(obj, uids::SEGMENTATION_STORAGE, &sop_uid, path)
}
