//! The generated archive read back with dicom-rs: determinism, geometry, references, and
//! pixel values against the analytic phantom.

use amicus_synth::archive::dicom_files;
use amicus_synth::{GROUND_TRUTH, Summary, generate};
use dicom_dictionary_std::tags;
use dicom_object::open_file;
use sha2::{Digest, Sha256};
use std::collections::BTreeSet;
use std::path::Path;

fn tree_hash(dir: &Path) -> String {
    let mut h = Sha256::new();
    for f in dicom_files(dir) {
        h.update(f.strip_prefix(dir).unwrap().to_string_lossy().as_bytes());
        h.update(std::fs::read(&f).unwrap());
    }
    h.update(std::fs::read(dir.join(GROUND_TRUTH)).unwrap());
    hex(&h.finalize())
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn str_of(obj: &dicom_object::DefaultDicomObject, tag: dicom_core::Tag) -> String {
    obj.element(tag)
        .unwrap()
        .to_str()
        .unwrap()
        .trim()
        .to_string()
}

fn floats(obj: &dicom_object::DefaultDicomObject, tag: dicom_core::Tag) -> Vec<f64> {
    obj.element(tag).unwrap().to_multi_float64().unwrap()
}

#[test]
fn same_seed_same_bytes_other_seed_other_bytes() {
    let t = tempfile::tempdir().unwrap();
    let a = t.path().join("a");
    let b = t.path().join("b");
    let c = t.path().join("c");
    generate(&a, "Site A", 2, 11, "legacy", |_, _| {}).unwrap();
    generate(&b, "Site A", 2, 11, "legacy", |_, _| {}).unwrap();
    generate(&c, "Site A", 2, 12, "legacy", |_, _| {}).unwrap();
    assert_eq!(tree_hash(&a), tree_hash(&b));
    assert_ne!(tree_hash(&a), tree_hash(&c));
    assert!(
        generate(&a, "Site A", 1, 11, "legacy", |_, _| {}).is_err(),
        "refuses a non-empty folder"
    );
    assert!(generate(&t.path().join("d"), "x", 1, 1, "nope", |_, _| {}).is_err());
}

#[test]
fn ct_and_rtstruct_are_consistent_with_the_phantom() {
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("arch");
    let summary: Summary =
        generate(&out, "Utrecht Community", 4, 5, "community", |_, _| {}).unwrap();
    let gt: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join(GROUND_TRUTH)).unwrap()).unwrap();
    assert_eq!(gt["patients"].as_array().unwrap().len(), 4);
    let with_lesion = summary
        .patients
        .iter()
        .find(|p| !p.phantom.lesions.is_empty())
        .expect("some patient has a lesion");
    let dir = out.join(&with_lesion.folder);

    // CT: geometry and HU.
    let mut sop_uids = BTreeSet::new();
    let mut zs = Vec::new();
    for f in dicom_files(&dir.join("ct")) {
        let o = open_file(&f).unwrap();
        assert_eq!(str_of(&o, tags::MODALITY), "CT");
        assert_eq!(
            str_of(&o, tags::SERIES_INSTANCE_UID),
            with_lesion.ct_series_uid
        );
        assert_eq!(
            str_of(&o, tags::FRAME_OF_REFERENCE_UID),
            with_lesion.frame_of_reference_uid
        );
        let ipp = floats(&o, tags::IMAGE_POSITION_PATIENT);
        zs.push(ipp[2]);
        sop_uids.insert(str_of(&o, tags::SOP_INSTANCE_UID));
        for v in floats(&o, tags::PIXEL_SPACING) {
            assert!((v - with_lesion.pixel_spacing_mm).abs() < 1e-6);
        }
    }
    assert_eq!(zs.len(), with_lesion.slices);
    for w in zs.windows(2) {
        assert!(
            (w[1] - w[0] - with_lesion.slice_thickness_mm).abs() < 1e-6,
            "{zs:?}"
        );
    }

    // The voxel at a lesion's centre holds the lesion's density (plus offset, within noise).
    let lesion = &with_lesion.phantom.lesions[0];
    let k = zs
        .iter()
        .enumerate()
        .min_by(|a, b| {
            (a.1 - lesion.center[2])
                .abs()
                .total_cmp(&(b.1 - lesion.center[2]).abs())
        })
        .unwrap()
        .0;
    let o = open_file(dir.join("ct").join(format!("{:04}.dcm", k + 1))).unwrap();
    let ipp = floats(&o, tags::IMAGE_POSITION_PATIENT);
    let dx = with_lesion.pixel_spacing_mm;
    let col = ((lesion.center[0] - ipp[0]) / dx).round() as usize;
    let row = ((lesion.center[1] - ipp[1]) / dx).round() as usize;
    let rows = with_lesion.rows as usize;
    let pixels = o.element(tags::PIXEL_DATA).unwrap().to_bytes().unwrap();
    let slope: f64 = str_of(&o, tags::RESCALE_SLOPE).parse().unwrap();
    let intercept: f64 = str_of(&o, tags::RESCALE_INTERCEPT).parse().unwrap();
    let i = (row * rows + col) * 2;
    let hu = f64::from(u16::from_le_bytes([pixels[i], pixels[i + 1]])) * slope + intercept;
    let expected = lesion.hu + summary.profile.hu_offset;
    assert!(
        (hu - expected).abs() < 6.0 * summary.profile.noise_hu,
        "HU {hu}, expected about {expected}"
    );

    // RTSTRUCT: ROI names, references to the CT, and contour points on the ellipsoid.
    let rt = open_file(dir.join("rtstruct.dcm")).unwrap();
    assert_eq!(str_of(&rt, tags::MODALITY), "RTSTRUCT");
    let names: Vec<String> = rt
        .element(tags::STRUCTURE_SET_ROI_SEQUENCE)
        .unwrap()
        .items()
        .unwrap()
        .iter()
        .map(|i| {
            i.element(tags::ROI_NAME)
                .unwrap()
                .to_str()
                .unwrap()
                .trim()
                .to_string()
        })
        .collect();
    assert_eq!(names.len(), with_lesion.phantom.lesions.len() + 2);
    assert!(
        names.contains(&"GTV-1".to_string())
            && names.contains(&"Lung_L".to_string())
            && names.contains(&"Lung_R".to_string())
    );
    let contours = rt
        .element(tags::ROI_CONTOUR_SEQUENCE)
        .unwrap()
        .items()
        .unwrap();
    let first = &contours[0];
    let mut checked = 0;
    for c in first
        .element(tags::CONTOUR_SEQUENCE)
        .unwrap()
        .items()
        .unwrap()
    {
        let refd = c
            .element(tags::CONTOUR_IMAGE_SEQUENCE)
            .unwrap()
            .items()
            .unwrap()[0]
            .element(tags::REFERENCED_SOP_INSTANCE_UID)
            .unwrap()
            .to_str()
            .unwrap()
            .trim_end_matches('\0')
            .to_string();
        assert!(
            sop_uids.contains(&refd),
            "contour references an unknown image"
        );
        let pts = c
            .element(tags::CONTOUR_DATA)
            .unwrap()
            .to_multi_float64()
            .unwrap();
        for p in pts.chunks(3) {
            let q: f64 = (0..3)
                .map(|a| ((p[a] - lesion.center[a]) / lesion.radii[a]).powi(2))
                .sum();
            assert!(
                (q - 1.0).abs() < 1e-3,
                "point {p:?} off the ellipsoid ({q})"
            );
            checked += 1;
        }
    }
    assert!(checked > 0);
}
