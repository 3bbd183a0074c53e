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
