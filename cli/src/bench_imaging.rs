//! `amicus bench imaging`: series → volume throughput against pydicom.
//!
//! Generates a synthetic archive, then loads each CT series as a volume in Hounsfield units
//! (`amicus_imaging::load_series`: headers, sort along the normal, decode and rescale on every
//! core) and, in the same run, with pydicom (`dcmread` + `pixel_array` + rescale, sorted by
//! position and stacked with numpy). The same series are then compressed by pydicom (RLE
//! Lossless, JPEG-LS lossless, JPEG 2000 lossless) and timed the same way. Reports MB/s of
//! output volume and slices/s per encoding, the ratios (goal ≥ 2x pydicom on uncompressed
//! data) and writes JSON and Markdown; asserts nothing.

use crate::bench::{median_secs as median, python_baseline, venv_python};
use anyhow::Result;
use serde::Serialize;
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Args)]
pub struct ImagingArgs {
    /// Synthetic patients (one CT series each).
    #[arg(long, default_value_t = 6)]
    patients: usize,
    /// Site profile of the synthetic archive (academic: 256 × 256, 1.5 mm slices).
    #[arg(long, default_value = "academic")]
    profile: String,
    #[arg(long, default_value_t = 3)]
    reps: usize,
    #[arg(long, default_value = "bench-imaging.json")]
    out: PathBuf,
}

#[derive(Serialize)]
struct Figures {
    profile: String,
    /// Transfer syntax of the files ("uncompressed" for the synthetic originals).
    encoding: String,
    series: usize,
    slices: usize,
    volume_bytes: u64,
    amicus_s: f64,
    amicus_mb_per_s: f64,
    amicus_slices_per_s: f64,
    pydicom_s: Option<f64>,
    pydicom_mb_per_s: Option<f64>,
    ratio: Option<f64>,
}

const PYDICOM_LOADER: &str = r#"
import sys, time
import numpy as np, pydicom
series = [s.split("\t") for s in open(sys.argv[1]).read().split("\n") if s]
reps = int(sys.argv[2])
times = []
for _ in range(reps):
    t = time.perf_counter()
    for files in series:
        slices = [pydicom.dcmread(f) for f in files]
        normal = np.cross(np.array(slices[0].ImageOrientationPatient[:3], float),
                          np.array(slices[0].ImageOrientationPatient[3:], float))
        slices.sort(key=lambda d: float(np.dot(normal, np.array(d.ImagePositionPatient, float))))
        volume = np.stack([d.pixel_array.astype(np.float32) * float(d.RescaleSlope)
                           + float(d.RescaleIntercept) for d in slices])
    times.append(time.perf_counter() - t)
times.sort()
print(times[len(times) // 2])
"#;

/// Compressed copies of the series, written by pydicom: (name, transfer syntax UID).
const ENCODINGS: [(&str, &str); 3] = [
    ("RLE Lossless", "1.2.840.10008.1.2.5"),
    ("JPEG-LS lossless", "1.2.840.10008.1.2.4.80"),
    ("JPEG 2000 lossless", "1.2.840.10008.1.2.4.90"),
];

const PYDICOM_COMPRESS: &str = r#"
import sys, pathlib, pydicom
uid, out = sys.argv[1], pathlib.Path(sys.argv[2])
for n, line in enumerate(open(sys.argv[3]).read().split("\n")):
    for m, f in enumerate(line.split("\t")):
        ds = pydicom.dcmread(f)
        ds.compress(uid)
        target = out / str(n) / f"{m}.dcm"
        target.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(target, enforce_file_format=True)
"#;

/// The series compressed to `uid` by pydicom under `out`, same order; `None` without the venv.
fn compressed_copies(
    series: &[Vec<PathBuf>],
    uid: &str,
    out: &std::path::Path,
) -> Result<Option<Vec<Vec<PathBuf>>>> {
    let Some(python) = venv_python() else {
        return Ok(None);
    };
    let list = tempfile::NamedTempFile::new()?;
    std::fs::write(list.path(), series_lines(series))?;
    let run = std::process::Command::new(python)
        .args(["-c", PYDICOM_COMPRESS, uid])
        .arg(out)
        .arg(list.path())
        .output()?;
    if !run.status.success() {
        anyhow::bail!(
            "pydicom could not compress to {uid}: {}",
            String::from_utf8_lossy(&run.stderr)
        );
    }
    Ok(Some(
        series
            .iter()
            .enumerate()
            .map(|(n, files)| {
                (0..files.len())
                    .map(|m| out.join(n.to_string()).join(format!("{m}.dcm")))
                    .collect()
            })
            .collect(),
    ))
}

fn series_lines(series: &[Vec<PathBuf>]) -> String {
    series
        .iter()
        .map(|files| {
            files
                .iter()
                .map(|f| f.display().to_string())
                .collect::<Vec<_>>()
                .join("\t")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Time amicus and pydicom loading `series` as volumes.
fn measure(profile: &str, encoding: &str, series: &[Vec<PathBuf>], reps: usize) -> Result<Figures> {
    let slices: usize = series.iter().map(Vec::len).sum();
    // Warm the page cache for both.
    for f in series.iter().flatten() {
        let _ = std::fs::read(f);
    }
    let mut times = Vec::new();
    let mut volume_bytes = 0u64;
    for _ in 0..reps {
        let t = Instant::now();
        volume_bytes = 0;
        for files in series {
            let v = amicus_imaging::load_series(files, u64::MAX)?;
            volume_bytes += (v.data.len() * 4) as u64;
        }
        times.push(t.elapsed().as_secs_f64());
    }
    let amicus_s = median(times);
    let pydicom_s = python_baseline(PYDICOM_LOADER, &series_lines(series), reps)?;
    let mb = volume_bytes as f64 / 1e6;
    Ok(Figures {
        profile: profile.to_string(),
        encoding: encoding.to_string(),
        series: series.len(),
        slices,
        volume_bytes,
        amicus_s,
        amicus_mb_per_s: mb / amicus_s,
        amicus_slices_per_s: slices as f64 / amicus_s,
        pydicom_s,
        pydicom_mb_per_s: pydicom_s.map(|s| mb / s),
        ratio: pydicom_s.map(|s| s / amicus_s),
    })
}

pub fn run(args: ImagingArgs) -> Result<()> {
    let reps = args.reps.max(1);
    let tmp = tempfile::tempdir()?;
    let archive = tmp.path().join("archive");
    eprintln!(
        "bench: generating {} synthetic patients ({})",
        args.patients, args.profile
    );
    let summary = amicus_synth::generate(
        &archive,
        "Bench Hospital",
        args.patients,
        1,
        &args.profile,
        |_, _| {},
    )?;
    let index = tmp.path().join("index");
    amicus_index::scan(&archive, &index, |_| {})?;
    let state = amicus_index::scan::archive_state(&index)
        .ok_or_else(|| anyhow::anyhow!("no index state"))?;
    let series: Vec<Vec<PathBuf>> = summary
        .patients
        .iter()
        .map(|p| state.series_files(&p.ct_series_uid))
        .collect();
    eprintln!("bench: uncompressed");
    let mut rows = vec![measure(&args.profile, "uncompressed", &series, reps)?];
    for (name, uid) in ENCODINGS {
        eprintln!("bench: {name} (compressing with pydicom)");
        let dir = tmp.path().join(uid);
        match compressed_copies(&series, uid, &dir)? {
            Some(copies) => rows.push(measure(&args.profile, name, &copies, reps)?),
            None => {
                eprintln!("bench: no venv python (run scripts/setup.sh --test): {name} skipped")
            }
        }
    }
    std::fs::write(&args.out, serde_json::to_vec_pretty(&rows)?)?;
    let mut md = String::from(
        "| data | series | slices | amicus MB/s | amicus slices/s | pydicom MB/s | ratio |\n|---|---:|---:|---:|---:|---:|---:|\n",
    );
    for f in &rows {
        md += &format!(
            "| {} CT ({}) | {} | {} | {:.0} | {:.0} | {} | {} |\n",
            f.encoding,
            f.profile,
            f.series,
            f.slices,
            f.amicus_mb_per_s,
            f.amicus_slices_per_s,
            f.pydicom_mb_per_s.map_or("–".into(), |v| format!("{v:.0}")),
            f.ratio.map_or("–".into(), |v| format!("{v:.1}x")),
        );
    }
    let md_path = args.out.with_extension("md");
    std::fs::write(&md_path, &md)?;
    print!("{md}");
    println!("wrote {} and {}", args.out.display(), md_path.display());
    match rows[0].ratio {
        Some(r) => println!("imaging: {r:.1}x pydicom on uncompressed CT (goal 2x)"),
        None => println!("imaging: no pydicom baseline measured (goal 2x)"),
    }
    Ok(())
}
