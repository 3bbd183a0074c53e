//! One synthetic patient as DICOM files: a CT series and its RTSTRUCT ground truth.

use crate::dicom::{Obj, ds, ds_list, put_pixel_module, put_seq, put_str, uid, write};
use crate::identity::Identity;
use crate::phantom::{Ellipse, Phantom, render_slice};
use crate::profile::Profile;
use crate::rng::Rng;
use dicom_core::value::PrimitiveValue;
use dicom_core::{DataElement, VR};
use dicom_dictionary_std::{tags, uids};
use serde::Serialize;
use std::path::{Path, PathBuf};

/// Points per contour polygon.
const CONTOUR_POINTS: usize = 48;

/// What was written for one patient (no direct identifiers: this goes into ground-truth.json).
#[derive(Debug, Clone, Serialize)]
pub struct PatientRecord {
    pub folder: String,
    pub study_uid: String,
    pub ct_series_uid: String,
    pub rtstruct_series_uid: String,
    pub seg_series_uid: String,
    pub frame_of_reference_uid: String,
    pub slices: usize,
    pub rows: u16,
    pub pixel_spacing_mm: f64,
    pub slice_thickness_mm: f64,
    pub phantom: Phantom,
}

pub(crate) struct Study<'a> {
    pub(crate) seed: u64,
    pub(crate) site: &'a str,
    pub(crate) profile: &'a Profile,
    pub(crate) who: &'a Identity,
    pub(crate) study_uid: String,
    pub(crate) for_uid: String,
    pub(crate) study_date: String,
    pub(crate) accession: String,
}

impl Study<'_> {
    /// Patient, study, equipment and frame-of-reference attributes shared by every instance.
    pub(crate) fn common(
        &self,
        obj: &mut Obj,
        modality: &str,
        series_uid: &str,
        series_number: u16,
    ) {
        put_str(obj, tags::SPECIFIC_CHARACTER_SET, VR::CS, "ISO_IR 192");
        put_str(obj, tags::PATIENT_NAME, VR::PN, &self.who.name);
        put_str(obj, tags::PATIENT_ID, VR::LO, &self.who.patient_id);
        put_str(obj, tags::ISSUER_OF_PATIENT_ID, VR::LO, self.site);
        put_str(obj, tags::PATIENT_BIRTH_DATE, VR::DA, &self.who.birth_date);
        put_str(obj, tags::PATIENT_SEX, VR::CS, self.who.sex);
        let mut other = Obj::new_empty();
        put_str(&mut other, tags::PATIENT_ID, VR::LO, &self.who.other_id);
        put_str(&mut other, tags::TYPE_OF_PATIENT_ID, VR::CS, "TEXT");
        put_str(
            &mut other,
            tags::ISSUER_OF_PATIENT_ID,
            VR::LO,
            "National registry",
        );
        put_seq(obj, tags::OTHER_PATIENT_I_DS_SEQUENCE, vec![other]);
        put_str(obj, tags::PATIENT_ADDRESS, VR::LO, &self.who.address);
        put_str(
            obj,
            tags::PATIENT_TELEPHONE_NUMBERS,
            VR::SH,
            &self.who.phone,
        );
        put_str(obj, tags::STUDY_INSTANCE_UID, VR::UI, &self.study_uid);
        put_str(obj, tags::STUDY_DATE, VR::DA, &self.study_date);
        put_str(obj, tags::STUDY_TIME, VR::TM, "101500");
        put_str(obj, tags::REFERRING_PHYSICIAN_NAME, VR::PN, "Huisarts^Henk");
        put_str(obj, tags::STUDY_ID, VR::SH, "1");
        put_str(obj, tags::ACCESSION_NUMBER, VR::SH, &self.accession);
        put_str(obj, tags::STUDY_DESCRIPTION, VR::LO, "CT THORAX");
        put_str(obj, tags::MODALITY, VR::CS, modality);
        put_str(obj, tags::SERIES_INSTANCE_UID, VR::UI, series_uid);
        obj.put(DataElement::new(
            tags::SERIES_NUMBER,
            VR::IS,
            PrimitiveValue::from(series_number.to_string()),
        ));
        put_str(obj, tags::SERIES_DATE, VR::DA, &self.study_date);
        put_str(obj, tags::FRAME_OF_REFERENCE_UID, VR::UI, &self.for_uid);
        put_str(obj, tags::POSITION_REFERENCE_INDICATOR, VR::LO, "");
        put_str(obj, tags::MANUFACTURER, VR::LO, self.profile.manufacturer);
        put_str(obj, tags::INSTITUTION_NAME, VR::LO, self.site);
        put_str(obj, tags::BODY_PART_EXAMINED, VR::CS, "CHEST");
    }

    /// `common` plus what every ground-truth object (RTSTRUCT, SEG) of this study shares:
    /// its SOP class and instance, series description, model name and instance number 1.
    pub(crate) fn derived_object(
        &self,
        modality: &str,
        series_uid: &str,
        series_number: u16,
        sop_class: &str,
        sop_uid: &str,
        description: &str,
    ) -> Obj {
        let mut obj = Obj::new_empty();
        self.common(&mut obj, modality, series_uid, series_number);
        put_str(&mut obj, tags::SOP_CLASS_UID, VR::UI, sop_class);
        put_str(&mut obj, tags::SOP_INSTANCE_UID, VR::UI, sop_uid);
        put_str(&mut obj, tags::SERIES_DESCRIPTION, VR::LO, description);
        put_str(
            &mut obj,
            tags::MANUFACTURER_MODEL_NAME,
            VR::LO,
            "amicus-synth",
        );
        obj.put(DataElement::new(
            tags::INSTANCE_NUMBER,
            VR::IS,
            PrimitiveValue::from("1"),
        ));
        obj
    }
}

/// Write patient number `index` of `site` under `out/<folder>/`.
pub fn write_patient(
    out: &Path,
    site: &str,
    profile: &Profile,
    seed: u64,
    index: usize,
) -> Result<PatientRecord, String> {
    let label = format!("patient-{index}");
    let mut rng = Rng::new(seed, &[site, &label, "anatomy"]);
    let phantom = Phantom::new(profile, &mut rng);
    let who = Identity::new(site, &mut Rng::new(seed, &[site, &label, "identity"]));
    let mut drng = Rng::new(seed, &[site, &label, "dates"]);
    let study = Study {
        seed,
        site,
        profile,
        who: &who,
        study_uid: uid(seed, &[site, &label, "study"]),
        for_uid: uid(seed, &[site, &label, "frame-of-reference"]),
        study_date: format!(
            "20{:02}{:02}{:02}",
            drng.int(15, 25),
            drng.int(1, 12),
            drng.int(1, 28)
        ),
        accession: format!("A{:08}", drng.int(0, 99_999_999)),
    };
    let folder = format!("p{:04}", index + 1);
    let dir = out.join(&folder);
    let ct_series_uid = uid(seed, &[site, &label, "ct-series"]);
    let slices = write_ct(&dir.join("ct"), &study, &phantom, &ct_series_uid, &label)?;
    let rtstruct_series_uid = uid(seed, &[site, &label, "rtstruct-series"]);
    let rois = rois(&phantom, &slices);
    write_rtstruct(
        &dir.join("rtstruct.dcm"),
        &study,
        &rois,
        &ct_series_uid,
        &rtstruct_series_uid,
        &slices,
        &label,
    )?;
    let seg_series_uid = uid(seed, &[site, &label, "seg-series"]);
    crate::seg::write_seg(
        &dir.join("seg.dcm"),
        &study,
        &rois,
        &ct_series_uid,
        &seg_series_uid,
        &slices,
        &label,
    )?;
    Ok(PatientRecord {
        folder,
        study_uid: study.study_uid.clone(),
        ct_series_uid,
        rtstruct_series_uid,
        seg_series_uid,
        frame_of_reference_uid: study.for_uid.clone(),
        slices: slices.len(),
        rows: profile.rows,
        pixel_spacing_mm: profile.pixel_spacing_mm(),
        slice_thickness_mm: profile.slice_thickness_mm,
        phantom,
    })
}

/// One written CT slice: its SOP Instance UID and z position.
pub(crate) struct Slice {
    pub(crate) sop_uid: String,
    pub(crate) z: f64,
    /// Image Position (Patient) x and y of the first pixel centre.
    pub(crate) origin: (f64, f64),
}

fn write_ct(
    dir: &Path,
    st: &Study,
    phantom: &Phantom,
    series_uid: &str,
    label: &str,
) -> Result<Vec<Slice>, String> {
    let p = st.profile;
    let n = p.rows as usize;
    let dx = p.pixel_spacing_mm();
    let half = p.field_of_view_mm / 2.0;
    // Pixel centres: the first at origin, so the grid is centred on the body.
    let origin = (-half + dx / 2.0, -half + dx / 2.0);
    let mut noise = Rng::new(st.seed, &[st.site, label, "noise"]);
    let mut out = Vec::new();
    for k in 0..p.slices() {
        let z = phantom.z_min + (k as f64 + 0.5) * p.slice_thickness_mm;
        let hu = render_slice(phantom, p, origin, z, &mut noise);
        let mut pixels = Vec::with_capacity(n * n * 2);
        for v in hu {
            let stored = (v.round() + 1024.0).clamp(0.0, 4095.0) as u16;
            pixels.extend_from_slice(&stored.to_le_bytes());
        }
        let sop_uid = uid(st.seed, &[st.site, label, "ct", &k.to_string()]);
        let mut obj = Obj::new_empty();
        st.common(&mut obj, "CT", series_uid, 2);
        put_str(
            &mut obj,
            tags::SOP_CLASS_UID,
            VR::UI,
            uids::CT_IMAGE_STORAGE,
        );
        put_str(&mut obj, tags::SOP_INSTANCE_UID, VR::UI, &sop_uid);
        put_str(
            &mut obj,
            tags::IMAGE_TYPE,
            VR::CS,
            "ORIGINAL\\PRIMARY\\AXIAL",
        );
        put_str(
            &mut obj,
            tags::SERIES_DESCRIPTION,
            VR::LO,
            &format!("Thorax {} mm {}", ds(p.slice_thickness_mm), p.kernel),
        );
        put_str(&mut obj, tags::MANUFACTURER_MODEL_NAME, VR::LO, p.model);
        put_str(&mut obj, tags::PATIENT_POSITION, VR::CS, "HFS");
        put_str(&mut obj, tags::KVP, VR::DS, &p.kvp.to_string());
        put_str(&mut obj, tags::CONVOLUTION_KERNEL, VR::SH, p.kernel);
        put_str(
            &mut obj,
            tags::SLICE_THICKNESS,
            VR::DS,
            &ds(p.slice_thickness_mm),
        );
        obj.put(DataElement::new(
            tags::INSTANCE_NUMBER,
            VR::IS,
            PrimitiveValue::from((k + 1).to_string()),
        ));
        put_str(
            &mut obj,
            tags::IMAGE_POSITION_PATIENT,
            VR::DS,
            &ds_list(&[origin.0, origin.1, z]),
        );
        put_str(
            &mut obj,
            tags::IMAGE_ORIENTATION_PATIENT,
            VR::DS,
            "1\\0\\0\\0\\1\\0",
        );
        put_str(&mut obj, tags::SLICE_LOCATION, VR::DS, &ds(z));
        put_str(&mut obj, tags::PIXEL_SPACING, VR::DS, &ds_list(&[dx, dx]));
        put_pixel_module(&mut obj, p.rows, 16, 12);
        put_str(&mut obj, tags::RESCALE_INTERCEPT, VR::DS, "-1024");
        put_str(&mut obj, tags::RESCALE_SLOPE, VR::DS, "1");
        put_str(&mut obj, tags::RESCALE_TYPE, VR::LO, "HU");
        put_str(&mut obj, tags::WINDOW_CENTER, VR::DS, "-600\\40");
        put_str(&mut obj, tags::WINDOW_WIDTH, VR::DS, "1500\\400");
        put_str(&mut obj, tags::ACQUISITION_NUMBER, VR::IS, "1");
        obj.put(DataElement::new(
            tags::PIXEL_DATA,
            VR::OW,
            PrimitiveValue::from(pixels),
        ));
        write(
            obj,
            uids::CT_IMAGE_STORAGE,
            &sop_uid,
            &dir.join(format!("{:04}.dcm", k + 1)),
        )?;
        out.push(Slice { sop_uid, z, origin });
    }
    Ok(out)
}

/// A reference to one CT image (SOP class and instance).
pub(crate) fn image_ref(sop_uid: &str) -> Obj {
    let mut o = Obj::new_empty();
    put_str(
        &mut o,
        tags::REFERENCED_SOP_CLASS_UID,
        VR::UI,
        uids::CT_IMAGE_STORAGE,
    );
    put_str(&mut o, tags::REFERENCED_SOP_INSTANCE_UID, VR::UI, sop_uid);
    o
}

/// Contour data (x\y\z triplets) for a polygon in the plane `z`.
fn contour_item(poly: &[(f64, f64)], z: f64, slice: &Slice) -> Obj {
    let mut item = Obj::new_empty();
    put_seq(
        &mut item,
        tags::CONTOUR_IMAGE_SEQUENCE,
        vec![image_ref(&slice.sop_uid)],
    );
    put_str(
        &mut item,
        tags::CONTOUR_GEOMETRIC_TYPE,
        VR::CS,
        "CLOSED_PLANAR",
    );
    obj_is(&mut item, tags::NUMBER_OF_CONTOUR_POINTS, poly.len());
    let coords: Vec<f64> = poly.iter().flat_map(|&(x, y)| [x, y, z]).collect();
    put_str(&mut item, tags::CONTOUR_DATA, VR::DS, &ds_list(&coords));
    item
}

fn obj_is(obj: &mut Obj, tag: dicom_core::Tag, v: usize) {
    obj.put(DataElement::new(
        tag,
        VR::IS,
        PrimitiveValue::from(v.to_string()),
    ));
}

pub(crate) struct Roi {
    pub(crate) name: String,
    pub(crate) interpreted: &'static str,
    pub(crate) color: &'static str,
    /// The ROI's outline on each slice it appears on.
    pub(crate) sections: Vec<(usize, Ellipse)>,
}

/// The ground-truth structures: one ROI per lesion (`GTV-n`), then `Lung_L` and `Lung_R`.
pub(crate) fn rois(phantom: &Phantom, slices: &[Slice]) -> Vec<Roi> {
    let mut rois = Vec::new();
    for l in &phantom.lesions {
        rois.push(Roi {
            name: l.name.clone(),
            interpreted: "GTV",
            color: "255\\0\\0",
            sections: slices
                .iter()
                .enumerate()
                .filter_map(|(i, s)| l.section(s.z).map(|e| (i, e)))
                .collect(),
        });
    }
    // Patient left is +x: the left lung is the one at positive x.
    for (name, which) in [("Lung_L", 0usize), ("Lung_R", 1usize)] {
        rois.push(Roi {
            name: name.into(),
            interpreted: "ORGAN",
            color: if which == 0 {
                "0\\128\\255"
            } else {
                "0\\200\\255"
            },
            sections: slices
                .iter()
                .enumerate()
                .map(|(i, s)| (i, phantom.lungs_at(s.z)[which]))
                .collect(),
        });
    }
    rois
}

fn write_rtstruct(
    path: &Path,
    st: &Study,
    rois: &[Roi],
    ct_series_uid: &str,
    series_uid: &str,
    slices: &[Slice],
    label: &str,
) -> Result<(), String> {
    let sop_uid = uid(st.seed, &[st.site, label, "rtstruct"]);
    let mut obj = st.derived_object(
        "RTSTRUCT",
        series_uid,
        3,
        uids::RT_STRUCTURE_SET_STORAGE,
        &sop_uid,
        "Ground truth",
    );
    put_str(&mut obj, tags::OPERATORS_NAME, VR::PN, "");
    put_str(&mut obj, tags::STRUCTURE_SET_LABEL, VR::SH, "GT");
    put_str(&mut obj, tags::STRUCTURE_SET_DATE, VR::DA, &st.study_date);
    put_str(&mut obj, tags::STRUCTURE_SET_TIME, VR::TM, "120000");

    let images: Vec<Obj> = slices.iter().map(|s| image_ref(&s.sop_uid)).collect();
    let mut series = Obj::new_empty();
    put_str(
        &mut series,
        tags::SERIES_INSTANCE_UID,
        VR::UI,
        ct_series_uid,
    );
    put_seq(&mut series, tags::CONTOUR_IMAGE_SEQUENCE, images);
    let mut study = Obj::new_empty();
    // Detached Study Management SOP Class, as RT Structure Sets conventionally reference.
    put_str(
        &mut study,
        tags::REFERENCED_SOP_CLASS_UID,
        VR::UI,
        "1.2.840.10008.3.1.2.3.1",
    );
    put_str(
        &mut study,
        tags::REFERENCED_SOP_INSTANCE_UID,
        VR::UI,
        &st.study_uid,
    );
    put_seq(
        &mut study,
        tags::RT_REFERENCED_SERIES_SEQUENCE,
        vec![series],
    );
    let mut frame = Obj::new_empty();
    put_str(
        &mut frame,
        tags::FRAME_OF_REFERENCE_UID,
        VR::UI,
        &st.for_uid,
    );
    put_seq(&mut frame, tags::RT_REFERENCED_STUDY_SEQUENCE, vec![study]);
    put_seq(
        &mut obj,
        tags::REFERENCED_FRAME_OF_REFERENCE_SEQUENCE,
        vec![frame],
    );

    let mut set_rois = Vec::new();
    let mut contours = Vec::new();
    let mut observations = Vec::new();
    for (i, roi) in rois.iter().enumerate() {
        let number = i + 1;
        let mut s = Obj::new_empty();
        obj_is(&mut s, tags::ROI_NUMBER, number);
        put_str(
            &mut s,
            tags::REFERENCED_FRAME_OF_REFERENCE_UID,
            VR::UI,
            &st.for_uid,
        );
        put_str(&mut s, tags::ROI_NAME, VR::LO, &roi.name);
        put_str(&mut s, tags::ROI_GENERATION_ALGORITHM, VR::CS, "MANUAL");
        set_rois.push(s);

        let mut c = Obj::new_empty();
        put_str(&mut c, tags::ROI_DISPLAY_COLOR, VR::IS, roi.color);
        obj_is(&mut c, tags::REFERENCED_ROI_NUMBER, number);
        let items = roi
            .sections
            .iter()
            .map(|(k, e)| contour_item(&e.polygon(CONTOUR_POINTS), slices[*k].z, &slices[*k]))
            .collect();
        put_seq(&mut c, tags::CONTOUR_SEQUENCE, items);
        contours.push(c);

        let mut o = Obj::new_empty();
        obj_is(&mut o, tags::OBSERVATION_NUMBER, number);
        obj_is(&mut o, tags::REFERENCED_ROI_NUMBER, number);
        put_str(
            &mut o,
            tags::RTROI_INTERPRETED_TYPE,
            VR::CS,
            roi.interpreted,
        );
        put_str(&mut o, tags::ROI_INTERPRETER, VR::PN, "");
        observations.push(o);
    }
    put_seq(&mut obj, tags::STRUCTURE_SET_ROI_SEQUENCE, set_rois);
    put_seq(&mut obj, tags::ROI_CONTOUR_SEQUENCE, contours);
    put_seq(&mut obj, tags::RTROI_OBSERVATIONS_SEQUENCE, observations);
    write(obj, uids::RT_STRUCTURE_SET_STORAGE, &sop_uid, path)
}

/// Paths of every DICOM file under `dir`, sorted.
pub fn dicom_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "dcm") {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}
