//! Volumes and masks from synthetic archives whose exact geometry is known (ground-truth.json).

use amicus_imaging::{ImagingError, load_series, rtstruct, seg};
use std::path::{Path, PathBuf};

const BIG: u64 = 1 << 30;

struct Archive {
    _tmp: tempfile::TempDir,
    state: amicus_index::scan::ArchiveState,
    truth: amicus_synth::Summary,
}

fn archive(profile: &str, seed: u64, patients: usize) -> Archive {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("archive");
    let truth =
        amicus_synth::generate(&dir, "Imaging Test", patients, seed, profile, |_, _| {}).unwrap();
    let index = tmp.path().join("index");
    amicus_index::scan(&dir, &index, |_| {}).unwrap();
    let state = amicus_index::scan::archive_state(&index).unwrap();
    Archive {
        _tmp: tmp,
        state,
        truth,
    }
}

fn only(v: Vec<(PathBuf, &amicus_index::InstanceFacts)>) -> PathBuf {
    assert_eq!(v.len(), 1, "{v:?}");
    v[0].0.clone()
}

fn dice(a: &[f32], b: &[f32]) -> f64 {
    let inter: f64 = a.iter().zip(b).map(|(x, y)| f64::from(x.min(*y))).sum();
    let total: f64 = a.iter().chain(b).map(|x| f64::from(*x)).sum();
    2.0 * inter / total
}

#[test]
fn ct_volume_has_the_written_geometry_and_hounsfield_units() {
    let a = archive("community", 5, 1);
    let p = &a.truth.patients[0];
    let files = a.state.series_files(&p.ct_series_uid);
    assert_eq!(files.len(), p.slices);
    let v = load_series(&files, BIG).unwrap();
    assert_eq!(v.shape(), [p.slices, p.rows as usize, p.rows as usize]);
    let g = &v.geometry;
    assert!((g.spacing[0] - p.pixel_spacing_mm).abs() < 1e-3);
    assert!((g.spacing[2] - p.slice_thickness_mm).abs() < 1e-3);
    assert_eq!(g.direction[2], [0.0, 0.0, 1.0]);
    // Air outside the body, lung, soft tissue and bone are all there, in HU.
    let min = v.data.iter().copied().fold(f32::INFINITY, f32::min);
    let max = v.data.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    assert!(min < -900.0 && max > 300.0, "HU range {min}..{max}");
    // The corner voxel is air.
    assert!(v.data[0] < -900.0, "{}", v.data[0]);

    // Shuffled file order gives the identical volume.
    let mut shuffled = files.clone();
    shuffled.reverse();
    shuffled.swap(0, files.len() / 2);
    assert_eq!(load_series(&shuffled, BIG).unwrap(), v);

    // Memory is checked before anything is allocated.
    let needed = (v.data.len() * 4) as u64;
    assert_eq!(
        load_series(&files, needed - 1).unwrap_err(),
        ImagingError::TooLarge {
            needed,
            available: needed - 1
        }
    );
}

#[test]
fn rtstruct_and_seg_masks_match_the_lesions() {
    // Academic profile: 1.5 mm slices; several patients so that lesions of several sizes occur.
    let a = archive("academic", 12, 8);
    let mut checked = 0;
    for p in &a.truth.patients {
        let files = a.state.series_files(&p.ct_series_uid);
        let ct = load_series(&files, BIG).unwrap();
        let rt = only(a.state.referencing(&p.ct_series_uid, "RTSTRUCT"));
        let sg = only(a.state.referencing(&p.ct_series_uid, "SEG"));
        for lesion in &p.phantom.lesions {
            let m = rtstruct::load_roi_mask(&rt, &lesion.name, &ct.geometry).unwrap();
            let s = seg::load_segment_mask(&sg, &lesion.name, &ct.geometry).unwrap();
            let voxels: f64 = m.data.iter().map(|v| f64::from(*v)).sum();
            let volume = voxels * ct.geometry.voxel_volume_mm3();
            let expected = lesion.volume_mm3();
            let d = dice(&m.data, &s.data);
            assert!(d >= 0.95, "{}: Dice RTSTRUCT/SEG {d}", lesion.name);
            // Centre of mass within one voxel of the lesion's centre.
            let [nx, ny, _] = ct.geometry.size;
            let mut c = [0.0f64; 3];
            for (i, v) in m.data.iter().enumerate() {
                if *v > 0.0 {
                    c[0] += (i % nx) as f64;
                    c[1] += (i / nx % ny) as f64;
                    c[2] += (i / (nx * ny)) as f64;
                }
            }
            let c = ct
                .geometry
                .to_patient([c[0] / voxels, c[1] / voxels, c[2] / voxels]);
            for axis in 0..3 {
                assert!(
                    (c[axis] - lesion.center[axis]).abs() <= ct.geometry.spacing[axis],
                    "{}: centre {c:?} vs {:?}",
                    lesion.name,
                    lesion.center
                );
            }
            // Resampled to 1 mm isotropic (nearest neighbour), a mask keeps its volume.
            let iso = amicus_imaging::resample(&m, [1.0, 1.0, 1.0], true, BIG).unwrap();
            let iso_volume: f64 = iso.data.iter().map(|v| f64::from(*v)).sum();
            assert!(iso.data.iter().all(|v| *v == 0.0 || *v == 1.0));
            assert!(
                (iso_volume - volume).abs() / volume < 0.1,
                "{iso_volume} vs {volume}"
            );
            // Volume within 2% for lesions large enough to be resolved (radius ≥ 5 voxels).
            let min_radius = lesion.radii.iter().copied().fold(f64::INFINITY, f64::min);
            if min_radius >= 5.0 * ct.geometry.spacing[2] {
                let error = (volume - expected).abs() / expected;
                assert!(
                    error < 0.02,
                    "{}: {volume:.0} mm³ vs {expected:.0} mm³ ({:.1}%)",
                    lesion.name,
                    error * 100.0
                );
                checked += 1;
            }
        }
        // Organs too, and unknown names are refused with the names that exist.
        let lung = rtstruct::load_roi_mask(&rt, "Lung_L", &ct.geometry).unwrap();
        assert!(lung.data.iter().any(|v| *v > 0.0));
        let e = rtstruct::load_roi_mask(&rt, "Heart", &ct.geometry).unwrap_err();
        assert!(
            matches!(&e, ImagingError::NoLabel(m) if m.contains("Lung_R")),
            "{e}"
        );
        let e = seg::load_segment_mask(&sg, "Heart", &ct.geometry).unwrap_err();
        assert!(matches!(e, ImagingError::NoLabel(_)));
    }
    assert!(
        checked >= 1,
        "no lesion large enough for the volume check; change the seed"
    );
}

fn copy_series(files: &[PathBuf], to: &Path) -> Vec<PathBuf> {
    std::fs::create_dir_all(to).unwrap();
    files
        .iter()
        .map(|f| {
            let target = to.join(f.file_name().unwrap());
            std::fs::copy(f, &target).unwrap();
            target
        })
        .collect()
}

#[test]
fn broken_series_are_refused_clearly() {
    let a = archive("legacy", 3, 1);
    let p = &a.truth.patients[0];
    let files = a.state.series_files(&p.ct_series_uid);
    let tmp = tempfile::tempdir().unwrap();

    // A missing slice in the middle: irregular spacing.
    let mut gap = copy_series(&files, &tmp.path().join("gap"));
    gap.sort();
    gap.remove(gap.len() / 2);
    let e = load_series(&gap, BIG).unwrap_err();
    assert!(
        matches!(&e, ImagingError::Inconsistent(m) if m.contains("irregular slice spacing")),
        "{e}"
    );

    // The same slice twice.
    let mut twice = files.clone();
    twice.push(files[0].clone());
    let e = load_series(&twice, BIG).unwrap_err();
    assert!(
        matches!(&e, ImagingError::Inconsistent(m) if m.contains("same position")),
        "{e}"
    );

    // Truncated pixel data.
    let cut = copy_series(&files, &tmp.path().join("cut"));
    let bytes = std::fs::read(&cut[3]).unwrap();
    std::fs::write(&cut[3], &bytes[..bytes.len() - 1000]).unwrap();
    let e = load_series(&cut, BIG).unwrap_err();
    assert!(matches!(&e, ImagingError::BadFile { .. }), "{e}");

    // Absurd dimensions: Rows = Columns = 65535 in one slice.
    let absurd = copy_series(&files, &tmp.path().join("absurd"));
    let mut obj = dicom_object::open_file(&absurd[0]).unwrap();
    for tag in [
        dicom_dictionary_std::tags::ROWS,
        dicom_dictionary_std::tags::COLUMNS,
    ] {
        obj.put(dicom_core::DataElement::new(
            tag,
            dicom_core::VR::US,
            dicom_core::PrimitiveValue::from(65535u16),
        ));
    }
    obj.write_to_file(&absurd[0]).unwrap();
    let e = load_series(&absurd, BIG).unwrap_err();
    assert!(
        matches!(&e, ImagingError::Inconsistent(m) if m.contains("matrix")),
        "{e}"
    );
    let e = load_series(&absurd[..1], BIG).unwrap_err();
    assert!(
        matches!(
            e,
            ImagingError::TooLarge { .. } | ImagingError::BadFile { .. }
        ),
        "{e}"
    );

    // A file that is not an image of the series at all.
    let rt = only(a.state.referencing(&p.ct_series_uid, "RTSTRUCT"));
    let mut mixed = files.clone();
    mixed.push(rt);
    assert!(load_series(&mixed, BIG).is_err());
}
