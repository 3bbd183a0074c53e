//! `amicus bench imaging`: series → volume throughput against pydicom.
//!
//! Generates a synthetic archive, then loads each CT series as a volume in Hounsfield units
//! (`amicus_imaging::load_series`: headers, sort along the normal, decode and rescale on every
//! core) and, in the same run, with pydicom (`dcmread` + `pixel_array` + rescale, sorted by
//! position and stacked with numpy). Reports MB/s of output volume and slices/s, the ratio
//! (goal ≥ 2x pydicom on uncompressed data) and writes JSON and Markdown; asserts nothing.

use crate::bench::{median_secs as median, python_baseline};
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

fn pydicom_seconds(series: &[Vec<PathBuf>], reps: usize) -> Result<Option<f64>> {
    let lines: Vec<String> = series
        .iter()
        .map(|files| {
            files
                .iter()
                .map(|f| f.display().to_string())
                .collect::<Vec<_>>()
                .join("\t")
        })
        .collect();
    python_baseline(PYDICOM_LOADER, &lines.join("\n"), reps)
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
        for files in &series {
            let v = amicus_imaging::load_series(files, u64::MAX)?;
            volume_bytes += (v.data.len() * 4) as u64;
        }
        times.push(t.elapsed().as_secs_f64());
    }
    let amicus_s = median(times);
    let pydicom_s = pydicom_seconds(&series, reps)?;
    let mb = volume_bytes as f64 / 1e6;
    let f = Figures {
        profile: args.profile.clone(),
        series: series.len(),
        slices,
        volume_bytes,
        amicus_s,
        amicus_mb_per_s: mb / amicus_s,
        amicus_slices_per_s: slices as f64 / amicus_s,
        pydicom_s,
        pydicom_mb_per_s: pydicom_s.map(|s| mb / s),
        ratio: pydicom_s.map(|s| s / amicus_s),
    };
    std::fs::write(&args.out, serde_json::to_vec_pretty(&f)?)?;
    let md = format!(
        "| data | series | slices | amicus MB/s | amicus slices/s | pydicom MB/s | ratio |\n|---|---:|---:|---:|---:|---:|---:|\n| uncompressed CT ({}) | {} | {} | {:.0} | {:.0} | {} | {} |\n",
        f.profile,
        f.series,
        f.slices,
        f.amicus_mb_per_s,
        f.amicus_slices_per_s,
        f.pydicom_mb_per_s.map_or("–".into(), |v| format!("{v:.0}")),
        f.ratio.map_or("–".into(), |v| format!("{v:.1}x")),
    );
    let md_path = args.out.with_extension("md");
    std::fs::write(&md_path, &md)?;
    print!("{md}");
    println!("wrote {} and {}", args.out.display(), md_path.display());
    match f.ratio {
        Some(r) => println!("imaging: {r:.1}x pydicom on uncompressed CT (goal 2x)"),
        None => println!("imaging: no pydicom baseline measured (goal 2x)"),
    }
    Ok(())
}
