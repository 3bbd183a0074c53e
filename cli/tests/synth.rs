//! `amicus synth` checked by third-party DICOM tools: dciodvfy (dicom3tools) validates every
//! kind of file against its IOD, and pydicom decodes every file and cross-checks the SEG against
//! the ground truth. `scripts/setup.sh` installs both; without them the test fails under CI and
//! is skipped (loudly) elsewhere.

mod common;

use common::*;
use std::path::{Path, PathBuf};

use std::process::Command;

fn have_dciodvfy() -> bool {
    Command::new("dciodvfy").arg("-help").output().is_ok()
}

fn validators_or_skip() -> Option<PathBuf> {
    let py = python();
    if py.is_some() && have_dciodvfy() {
        return py;
    }
    if std::env::var_os("CI").is_some() {
        panic!("DICOM validators missing under CI: run scripts/setup.sh (dicom3tools, pydicom)");
    }
    eprintln!("dciodvfy or the pydicom venv is missing: run scripts/setup.sh; skipping");
    None
}

/// dciodvfy's error lines for a file (warnings about extra attributes are allowed: the archive
/// carries fake direct identifiers on purpose).
fn dciodvfy_errors(file: &Path) -> Vec<String> {
    let out = Command::new("dciodvfy").arg(file).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    text.lines()
        .filter(|l| l.starts_with("Error"))
        .map(str::to_string)
        .collect()
}

#[test]
fn synthetic_archives_pass_third_party_validation_for_every_profile() {
    let Some(py) = validators_or_skip() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let checker = repo_root().join("synth/tests/validate/check_archive.py");
    let mut total_lesions = 0;
    for (profile, seed) in [("academic", 4u64), ("community", 2), ("legacy", 3)] {
        let out = tmp.path().join(profile);
        let site = format!("{profile} hospital");
        ok(&[
            "synth",
            "--out",
            s(&out),
            "--site",
            &site,
            "--patients",
            "3",
            "--seed",
            &seed.to_string(),
            "--profile",
            profile,
        ]);
        for patient in ["p0001", "p0002", "p0003"] {
            let dir = out.join(patient);
            for f in [
                dir.join("ct/0001.dcm"),
                dir.join("rtstruct.dcm"),
                dir.join("seg.dcm"),
            ] {
                let errors = dciodvfy_errors(&f);
                assert!(errors.is_empty(), "{}: {errors:?}", f.display());
            }
        }
        let check = Command::new(&py).arg(&checker).arg(&out).output().unwrap();
        let report = String::from_utf8_lossy(&check.stdout);
        assert!(
            check.status.success(),
            "{profile}: {report}{}",
            String::from_utf8_lossy(&check.stderr)
        );
        let v: serde_json::Value = serde_json::from_str(&report).unwrap();
        assert_eq!(v["counts"]["SEG"], 3);
        total_lesions += v["lesions_checked"].as_u64().unwrap();
    }
    assert!(total_lesions > 0, "the seeds chosen must produce lesions");
}

#[test]
fn synth_refuses_unknown_profile_and_non_empty_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let out = fails(&[
        "synth",
        "--out",
        s(&tmp.path().join("a")),
        "--site",
        "x",
        "--profile",
        "nope",
    ]);
    assert!(out.stderr.contains("unknown profile"), "{}", out.text());
    std::fs::write(tmp.path().join("file"), b"x").unwrap();
    let out = fails(&[
        "synth",
        "--out",
        s(tmp.path()),
        "--site",
        "x",
        "--patients",
        "1",
    ]);
    assert!(out.stderr.contains("not empty"), "{}", out.text());
}
