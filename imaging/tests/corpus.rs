//! Decoding against pydicom on the real-world corpus (`scripts/setup.sh --test` installs it and
//! the venv with pydicom and its pylibjpeg / pyjpegls decoders): for every file both can
//! decode, every frame's real-world values agree; files that only pydicom decodes are refused
//! by us with a reason; lossless pairs of the same image decode identically.
//!
//! Without the venv or corpus the test fails under CI and is skipped (with a message) locally.

use amicus_imaging::{Frames, ImagingError, load_frames};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

const MAX_BYTES: u64 = 2 << 30;

fn home() -> PathBuf {
    PathBuf::from(std::env::var("HOME").unwrap_or_default())
}

fn corpus() -> Option<PathBuf> {
    let c = home().join(".cache/amicus/corpus");
    c.join(".complete").is_file().then_some(c)
}

fn python() -> Option<PathBuf> {
    let p = std::env::var_os("AMICUS_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| home().join(".cache/amicus/venv/bin/python"));
    p.is_file().then_some(p)
}

fn ready() -> Option<(PathBuf, PathBuf)> {
    match (corpus(), python()) {
        (Some(c), Some(p)) => Some((c, p)),
        _ => {
            assert!(
                std::env::var_os("CI").is_none(),
                "corpus or pydicom venv missing under CI: run scripts/setup.sh --test"
            );
            eprintln!("skipped: no corpus or venv (run scripts/setup.sh --test)");
            None
        }
    }
}

fn files_under(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            files_under(&p, out);
        } else if !p.file_name().unwrap().to_string_lossy().starts_with('.') {
            out.push(p);
        }
    }
}

/// What pydicom made of each file: its frames, or why it could not.
fn pydicom_reference(python: &Path, files: &[PathBuf]) -> Vec<Result<Frames, String>> {
    let out = tempfile::tempdir().unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/pydicom_frames.py");
    let status = std::process::Command::new(python)
        .arg(&script)
        .arg(out.path())
        .args(files)
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "{} failed", script.display());
    let index: Vec<serde_json::Value> =
        serde_json::from_slice(&std::fs::read(out.path().join("index.json")).unwrap()).unwrap();
    assert_eq!(index.len(), files.len());
    index
        .iter()
        .enumerate()
        .map(|(n, e)| {
            if e["ok"] != true {
                return Err(e["error"].as_str().unwrap_or("?").to_string());
            }
            let shape: Vec<usize> = e["shape"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as usize)
                .collect();
            let bytes = std::fs::read(out.path().join(format!("{n}.f32"))).unwrap();
            let data: Vec<f32> = bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            Ok(Frames {
                data,
                frames: shape[0],
                rows: shape[1],
                columns: shape[2],
            })
        })
        .collect()
}

/// Transfer syntaxes whose decoders may legitimately differ by rounding (lossy JPEG: the
/// inverse DCT is not specified bit-exactly).
fn lossy_jpeg(path: &Path) -> bool {
    let bytes = std::fs::read(path).unwrap();
    let has = |uid: &str| bytes.windows(uid.len()).any(|w| w == uid.as_bytes());
    has("1.2.840.10008.1.2.4.50\0") || has("1.2.840.10008.1.2.4.51\0")
}

/// Largest difference between two frame sets, in units of the largest magnitude.
fn max_difference(a: &Frames, b: &Frames) -> f64 {
    a.data
        .iter()
        .zip(&b.data)
        .map(|(x, y)| f64::from((x - y).abs()))
        .fold(0.0, f64::max)
}

#[test]
fn every_file_both_decode_agrees_with_pydicom() {
    let Some((corpus, python)) = ready() else {
        return;
    };
    let mut files = Vec::new();
    files_under(&corpus, &mut files);
    let reference = pydicom_reference(&python, &files);
    let mut agreed = Vec::new();
    let mut problems = Vec::new();
    let mut refused: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (path, theirs) in files.iter().zip(&reference) {
        let name = path.strip_prefix(&corpus).unwrap().display().to_string();
        let ours = std::panic::catch_unwind(|| load_frames(path, MAX_BYTES));
        let ours = match ours {
            Ok(r) => r,
            Err(_) => {
                problems.push(format!("{name}: panicked"));
                continue;
            }
        };
        match (ours, theirs) {
            (Ok(ours), Ok(theirs)) => {
                if (ours.frames, ours.rows, ours.columns)
                    != (theirs.frames, theirs.rows, theirs.columns)
                {
                    problems.push(format!(
                        "{name}: shape {:?} vs pydicom {:?}",
                        (ours.frames, ours.rows, ours.columns),
                        (theirs.frames, theirs.rows, theirs.columns)
                    ));
                    continue;
                }
                let diff = max_difference(&ours, theirs);
                let scale = theirs.data.iter().fold(1f32, |m, v| m.max(v.abs()));
                // Lossless: equal up to float32 rounding of the rescale. Lossy JPEG: within a
                // few grey levels of 8/12-bit data (IDCT rounding differs between decoders).
                let tolerance = if lossy_jpeg(path) {
                    4.0
                } else {
                    1e-6 * f64::from(scale)
                };
                if diff > tolerance {
                    problems.push(format!(
                        "{name}: values differ by up to {diff} (tolerance {tolerance})"
                    ));
                } else {
                    agreed.push(name);
                }
            }
            (Ok(_), Err(why)) => {
                eprintln!("only amicus decodes {name} (pydicom: {why})");
            }
            (Err(e), Ok(_)) => match e {
                ImagingError::Unsupported(reason) => {
                    let reason = reason
                        .split_once(": ")
                        .map_or(reason.clone(), |r| r.1.into());
                    refused.entry(reason).or_default().push(name);
                }
                other => problems.push(format!("{name}: pydicom decodes it, we fail: {other}")),
            },
            (Err(_), Err(_)) => {}
        }
    }
    eprintln!("{} files agree with pydicom:", agreed.len());
    for a in &agreed {
        eprintln!("  {a}");
    }
    eprintln!("refused by amicus, decoded by pydicom:");
    for (reason, names) in &refused {
        eprintln!("  {reason}: {}", names.join(", "));
    }
    assert!(problems.is_empty(), "{problems:#?}");
    // Every compressed family the station decodes is represented in what agreed.
    for expected in [
        "pydicom-data/693_J2KR.dcm",             // JPEG 2000 lossless
        "pydicom-data/RG1_J2KI.dcm",             // JPEG 2000 lossy
        "pydicom-data/JPEG-LL.dcm",              // JPEG lossless, process 14
        "pydicom/MR_small_jpeg_ls_lossless.dcm", // JPEG-LS lossless
        "pydicom/JPEGLSNearLossless_16.dcm",     // JPEG-LS near-lossless
        "pydicom/MR_small_RLE.dcm",              // RLE lossless
        "pydicom-data/emri_small_RLE.dcm",       // RLE, multi-frame
        "pydicom/rtdose.dcm",                    // 32-bit, multi-frame, dose grid scaling
        "pydicom/MR_small_bigendian.dcm",        // explicit VR big endian
        "pydicom-data/mlut_18.dcm",              // Modality LUT Sequence
        "pydicom-data/eCT_Supplemental.dcm",     // enhanced CT, per-frame rescale
    ] {
        assert!(
            agreed.iter().any(|a| a == expected),
            "{expected} did not agree with pydicom"
        );
    }
}

#[test]
fn lossless_pairs_decode_identically() {
    let Some((corpus, _)) = ready() else {
        return;
    };
    let pairs = [
        ("pydicom-data/RG1_UNCR.dcm", "pydicom-data/RG1_J2KR.dcm"),
        ("pydicom-data/RG3_UNCR.dcm", "pydicom-data/RG3_J2KR.dcm"),
        ("pydicom-data/MR2_UNCR.dcm", "pydicom-data/MR2_J2KR.dcm"),
        ("pydicom-data/693_UNCR.dcm", "pydicom-data/693_J2KR.dcm"),
        (
            "pydicom-data/emri_small.dcm",
            "pydicom-data/emri_small_RLE.dcm",
        ),
        (
            "pydicom-data/emri_small.dcm",
            "pydicom-data/emri_small_jpeg_2k_lossless.dcm",
        ),
        (
            "pydicom-data/emri_small.dcm",
            "pydicom-data/emri_small_jpeg_ls_lossless.dcm",
        ),
        (
            "pydicom-data/emri_small.dcm",
            "pydicom-data/emri_small_big_endian.dcm",
        ),
        ("pydicom/MR_small.dcm", "pydicom/MR_small_RLE.dcm"),
        ("pydicom/MR_small.dcm", "pydicom/MR_small_jp2klossless.dcm"),
        (
            "pydicom/MR_small.dcm",
            "pydicom/MR_small_jpeg_ls_lossless.dcm",
        ),
        ("pydicom/rtdose.dcm", "pydicom/rtdose_rle.dcm"),
        ("pydicom/rtdose.dcm", "pydicom/rtdose_expb.dcm"),
    ];
    for (plain, packed) in pairs {
        let a =
            load_frames(&corpus.join(plain), MAX_BYTES).unwrap_or_else(|e| panic!("{plain}: {e}"));
        let b = load_frames(&corpus.join(packed), MAX_BYTES)
            .unwrap_or_else(|e| panic!("{packed}: {e}"));
        assert_eq!(
            (a.frames, a.rows, a.columns),
            (b.frames, b.rows, b.columns),
            "{plain} vs {packed}"
        );
        let differing = a.data.iter().zip(&b.data).filter(|(x, y)| x != y).count();
        assert_eq!(
            differing, 0,
            "{plain} vs {packed}: {differing} values differ"
        );
        assert!(
            a.data.iter().any(|v| *v != a.data[0]),
            "{plain} decoded to a constant"
        );
    }
}

const PYDICOM_COMPRESS: &str = r#"
import sys, pathlib, pydicom
uid, out = sys.argv[1], pathlib.Path(sys.argv[2])
for m, f in enumerate(sys.argv[3:]):
    ds = pydicom.dcmread(f)
    ds.compress(uid)
    ds.save_as(out / f"{m:04}.dcm", enforce_file_format=True)
"#;

#[test]
fn compressed_copies_of_a_synthetic_series_load_as_the_same_volume() {
    let Some((_, python)) = ready() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let archive = tmp.path().join("archive");
    let truth = amicus_synth::generate(&archive, "Codec Test", 1, 11, "legacy", |_, _| {}).unwrap();
    amicus_index::scan(&archive, &tmp.path().join("index"), |_| {}).unwrap();
    let state = amicus_index::scan::archive_state(&tmp.path().join("index")).unwrap();
    let files = state.series_files(&truth.patients[0].ct_series_uid);
    let original = amicus_imaging::load_series(&files, MAX_BYTES).unwrap();
    for uid in [
        "1.2.840.10008.1.2.5",    // RLE Lossless
        "1.2.840.10008.1.2.4.80", // JPEG-LS lossless
        "1.2.840.10008.1.2.4.90", // JPEG 2000 lossless
        "1.2.840.10008.1.2.4.70", // JPEG lossless, first-order prediction
    ] {
        let out = tmp.path().join(uid);
        std::fs::create_dir_all(&out).unwrap();
        // Reversed order: the volume must not depend on the order files are listed in.
        let status = std::process::Command::new(&python)
            .args(["-c", PYDICOM_COMPRESS, uid])
            .arg(&out)
            .args(files.iter().rev())
            .stderr(std::process::Stdio::null())
            .status()
            .unwrap();
        if !status.success() {
            // pydicom has no JPEG lossless encoder; the corpus covers that decoder instead.
            assert_eq!(
                uid, "1.2.840.10008.1.2.4.70",
                "pydicom could not write {uid}"
            );
            continue;
        }
        let mut copies = Vec::new();
        files_under(&out, &mut copies);
        let volume = amicus_imaging::load_series(&copies, MAX_BYTES).unwrap();
        assert_eq!(volume.geometry, original.geometry, "{uid}");
        let differing = volume
            .data
            .iter()
            .zip(&original.data)
            .filter(|(a, b)| a != b)
            .count();
        assert_eq!(differing, 0, "{uid}: {differing} voxels differ");
    }
}

#[test]
fn multi_frame_files_load_as_volumes() {
    let Some((corpus, _)) = ready() else {
        return;
    };
    // Enhanced CT: frames placed by their Plane Position (Patient), rescaled per frame.
    let mr = corpus.join("pydicom-data/eCT_Supplemental.dcm");
    let volume = amicus_imaging::load_series(std::slice::from_ref(&mr), MAX_BYTES).unwrap();
    let frames = load_frames(&mr, MAX_BYTES).unwrap();
    assert_eq!(
        volume.geometry.size,
        [frames.columns, frames.rows, frames.frames]
    );
    // Every frame of the file is a slice of the volume (sorted along the normal).
    let plane = frames.rows * frames.columns;
    for f in frames.data.chunks(plane) {
        assert!(volume.data.chunks(plane).any(|s| s == f));
    }
    assert!(volume.geometry.spacing[2] > 0.0);
    // Enhanced MR without functional groups (a stripped test file) cannot be placed.
    let e = amicus_imaging::load_series(&[corpus.join("pydicom-data/emri_small.dcm")], MAX_BYTES)
        .unwrap_err();
    assert!(
        matches!(&e, ImagingError::Unsupported(m) if m.contains("functional groups")),
        "{e}"
    );
    // RT Dose: frames placed by the Grid Frame Offset Vector, values in Gy.
    let dose = corpus.join("pydicom/rtdose.dcm");
    let volume = amicus_imaging::load_series(std::slice::from_ref(&dose), MAX_BYTES).unwrap();
    assert_eq!(volume.geometry.size[2], 15);
    let max = volume.data.iter().fold(0f32, |m, v| m.max(*v));
    assert!(max > 0.0 && max < 100.0, "dose maximum {max} Gy");
    // The RLE copy is the same volume.
    let rle = corpus.join("pydicom/rtdose_rle.dcm");
    let copy = amicus_imaging::load_series(std::slice::from_ref(&rle), MAX_BYTES).unwrap();
    assert_eq!(copy, volume);
}

/// Replace (or add) one element of a DICOM file.
fn edit(path: &Path, element: dicom_core::DataElement<dicom_object::InMemDicomObject>) {
    let mut obj = dicom_object::open_file(path).unwrap();
    obj.put(element);
    obj.write_to_file(path).unwrap();
}

#[test]
fn hostile_compressed_and_multi_frame_files_are_refused_clearly() {
    use dicom_core::{DataElement, PrimitiveValue, VR};
    use dicom_dictionary_std::tags;
    let Some((corpus, _)) = ready() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let copy = |name: &str| {
        let target = tmp.path().join(name.replace('/', "_"));
        std::fs::copy(corpus.join(name), &target).unwrap();
        target
    };
    let refused = |path: &Path| {
        let r = std::panic::catch_unwind(|| load_frames(path, MAX_BYTES));
        let r = r.unwrap_or_else(|_| panic!("{} panicked", path.display()));
        match r {
            Ok(f) => panic!(
                "{} was accepted as {} × {} × {}",
                path.display(),
                f.frames,
                f.rows,
                f.columns
            ),
            Err(e) => e,
        }
    };
    // A codestream cut short: every compressed family.
    for name in [
        "pydicom-data/693_J2KR.dcm",
        "pydicom/MR_small_jpeg_ls_lossless.dcm",
        "pydicom-data/JPEG-LL.dcm",
        "pydicom/MR_small_RLE.dcm",
    ] {
        let path = copy(name);
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() * 2 / 3]).unwrap();
        let e = refused(&path);
        assert!(matches!(e, ImagingError::BadFile { .. }), "{name}: {e}");
    }
    // Rows/Columns that do not match the codestream.
    for name in [
        "pydicom-data/693_J2KR.dcm",
        "pydicom/MR_small_jpeg_ls_lossless.dcm",
        "pydicom/MR_small_RLE.dcm",
    ] {
        let path = copy(name);
        edit(
            &path,
            DataElement::new(tags::ROWS, VR::US, PrimitiveValue::from(4000u16)),
        );
        let e = refused(&path);
        assert!(matches!(e, ImagingError::BadFile { .. }), "{name}: {e}");
    }
    // Absurd dimensions: 65535 × 65535 × 65535 is refused before anything is allocated.
    let path = copy("pydicom/rtdose_rle_1frame.dcm");
    for (tag, vr, value) in [
        (tags::ROWS, VR::US, PrimitiveValue::from(65535u16)),
        (tags::COLUMNS, VR::US, PrimitiveValue::from(65535u16)),
        (
            tags::NUMBER_OF_FRAMES,
            VR::IS,
            PrimitiveValue::from("65535"),
        ),
    ] {
        edit(&path, DataElement::new(tag, vr, value));
    }
    let e = refused(&path);
    assert!(matches!(e, ImagingError::TooLarge { .. }), "{e}");
    // More frames claimed than there are.
    let path = copy("pydicom/rtdose_rle.dcm");
    edit(
        &path,
        DataElement::new(tags::NUMBER_OF_FRAMES, VR::IS, PrimitiveValue::from("16")),
    );
    let e = amicus_imaging::load_series(std::slice::from_ref(&path), MAX_BYTES).unwrap_err();
    assert!(
        matches!(&e, ImagingError::BadFile { reason, .. } if reason.contains("15 values for 16 frames")),
        "{e}"
    );
    let e = refused(&path);
    assert!(matches!(e, ImagingError::BadFile { .. }), "{e}");
    let path = copy("pydicom-data/eCT_Supplemental.dcm");
    edit(
        &path,
        DataElement::new(tags::NUMBER_OF_FRAMES, VR::IS, PrimitiveValue::from("3")),
    );
    let e = refused(&path);
    assert!(
        matches!(&e, ImagingError::BadFile { reason, .. } if reason.contains("per-frame functional groups")),
        "{e}"
    );
    // An unreadable Number of Frames.
    let path = copy("pydicom/rtdose.dcm");
    edit(
        &path,
        DataElement::new(tags::NUMBER_OF_FRAMES, VR::IS, PrimitiveValue::from("1A")),
    );
    let e = refused(&path);
    assert!(
        matches!(&e, ImagingError::BadFile { reason, .. } if reason.contains("Number of Frames")),
        "{e}"
    );
    // A dose grid whose offsets do not match its frames.
    let path = copy("pydicom/rtdose.dcm");
    edit(
        &path,
        DataElement::new(
            tags::GRID_FRAME_OFFSET_VECTOR,
            VR::DS,
            PrimitiveValue::from("0\\3\\6"),
        ),
    );
    let e = amicus_imaging::load_series(std::slice::from_ref(&path), MAX_BYTES).unwrap_err();
    assert!(
        matches!(&e, ImagingError::BadFile { reason, .. } if reason.contains("Grid Frame Offset")),
        "{e}"
    );
}
