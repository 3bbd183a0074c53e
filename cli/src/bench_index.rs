//! `amicus bench index`: how fast a station indexes its archive and answers cohort queries.
//!
//! Measures header indexing (files/s of a full scan into a fresh index) on a synthetic archive
//! and on the real-world corpus, against pydicom's `dcmread(stop_before_pixels=True)` on the
//! same files in the same run (ratio; goal ≥ 20x); and, with `--idc`, a large index built from
//! the real series metadata of the `idc-index-data` wheel: graph size, load time, peak memory
//! and the median latency of join queries (goal ≤ 100 ms). Writes JSON and Markdown; asserts
//! nothing. The last line states the headline figure against its goal.

use crate::bench::{home, median_secs as median, python_baseline, venv_python};
use amicus_index::{InstanceFacts, query};
use anyhow::{Context, Result, bail};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[derive(clap::Args)]
pub struct IndexArgs {
    /// Synthetic patients to generate for the synthetic archive.
    #[arg(long, default_value_t = 20)]
    patients: usize,
    /// The real-world corpus (default: ~/.cache/amicus/corpus, from `scripts/setup.sh --test`).
    #[arg(long)]
    corpus: Option<PathBuf>,
    /// Repetitions per measurement (the median is reported).
    #[arg(long, default_value_t = 5)]
    reps: usize,
    /// Also benchmark a large index from the idc-index-data wheel (downloads ~80 MB from PyPI
    /// into ~/.cache/amicus/idc, needs pyarrow in the venv; takes minutes).
    #[arg(long)]
    idc: bool,
    /// Use only the first N series of the IDC metadata (default: all).
    #[arg(long)]
    idc_series: Option<usize>,
    #[arg(long, default_value = "bench-index.json")]
    out: PathBuf,
}

#[derive(Serialize)]
struct ScanFigures {
    dataset: String,
    files: usize,
    bytes: u64,
    /// A full scan into a fresh index: parse, pseudonymise, write graph, state and report
    /// (each fsynced), create the station key.
    amicus_s: f64,
    amicus_files_per_s: f64,
    /// Header reading only (the same reader the scan uses, on every core), nothing written.
    headers_s: f64,
    headers_files_per_s: f64,
    pydicom_s: Option<f64>,
    pydicom_files_per_s: Option<f64>,
    /// pydicom time / full scan time.
    ratio: Option<f64>,
    /// pydicom time / header reading time.
    headers_ratio: Option<f64>,
}

#[derive(Serialize)]
struct QueryFigure {
    name: String,
    sparql: String,
    rows: usize,
    p50_ms: f64,
    max_ms: f64,
}

#[derive(Serialize)]
struct IdcFigures {
    series: u64,
    patients: u64,
    triples: u64,
    graph_bytes: u64,
    build_s: f64,
    load_s: f64,
    peak_rss_mib: f64,
    queries: Vec<QueryFigure>,
}

#[derive(Serialize)]
struct Report {
    machine: String,
    scans: Vec<ScanFigures>,
    idc: Option<IdcFigures>,
}

fn files_below(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let t = e.file_type()?;
        if t.is_dir() {
            files_below(&e.path(), out)?;
        } else if t.is_file() {
            out.push(e.path());
        }
    }
    Ok(())
}

/// pydicom reading every file's header, timed inside Python (interpreter start excluded).
const PYDICOM_TIMER: &str = r#"
import sys, time, pydicom
files = open(sys.argv[1]).read().split("\n")
reps = int(sys.argv[2])
times = []
for _ in range(reps):
    t = time.perf_counter()
    for f in files:
        try:
            pydicom.dcmread(f, stop_before_pixels=True)
        except Exception:
            pass
    times.append(time.perf_counter() - t)
times.sort()
print(times[len(times) // 2])
"#;

fn pydicom_seconds(files: &[PathBuf], reps: usize) -> Result<Option<f64>> {
    let text: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
    python_baseline(PYDICOM_TIMER, &text.join("\n"), reps)
}

fn scan_figures(name: &str, archive: &Path, reps: usize) -> Result<ScanFigures> {
    let mut files = Vec::new();
    files_below(archive, &mut files)?;
    let bytes = files
        .iter()
        .map(|f| std::fs::metadata(f).map(|m| m.len()).unwrap_or(0))
        .sum();
    // Warm the page cache for both readers.
    for f in &files {
        let _ = std::fs::read(f);
    }
    let mut times = Vec::new();
    for _ in 0..reps {
        let dir = tempfile::tempdir()?;
        let t = Instant::now();
        amicus_index::scan(archive, &dir.path().join("index"), |_| {})?;
        times.push(t.elapsed().as_secs_f64());
    }
    let amicus_s = median(times);
    let key = amicus_index::pseudonym::PseudonymKey::from_bytes([1; 32]);
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut times = Vec::new();
    for _ in 0..reps {
        let t = Instant::now();
        std::thread::scope(|scope| {
            for w in 0..workers {
                let (files, key) = (&files, &key);
                scope.spawn(move || {
                    for f in files.iter().skip(w).step_by(workers) {
                        let _ = amicus_index::header::read_facts(f, key);
                    }
                });
            }
        });
        times.push(t.elapsed().as_secs_f64());
    }
    let headers_s = median(times);
    let pydicom_s = pydicom_seconds(&files, reps)?;
    let n = files.len() as f64;
    Ok(ScanFigures {
        dataset: name.into(),
        files: files.len(),
        bytes,
        amicus_s,
        amicus_files_per_s: n / amicus_s,
        headers_s,
        headers_files_per_s: n / headers_s,
        pydicom_s,
        pydicom_files_per_s: pydicom_s.map(|s| n / s),
        ratio: pydicom_s.map(|s| s / amicus_s),
        headers_ratio: pydicom_s.map(|s| s / headers_s),
    })
}

/// The IDC series metadata as JSON lines (one series each), converted once by pyarrow.
const IDC_EXPORT: &str = r#"
import json, sys, zipfile, io
import pyarrow.parquet as pq
wheel, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    table = pq.read_table(io.BytesIO(z.read("idc_index_data/idc_index.parquet")),
        columns=["PatientID", "collection_id", "StudyInstanceUID", "SeriesInstanceUID", "Modality",
                 "BodyPartExamined", "Manufacturer", "SOPClassUID", "instanceCount", "PatientSex",
                 "PatientAge", "StudyDate"])
with open(out, "w") as f:
    for batch in table.to_batches(100000):
        for row in batch.to_pylist():
            f.write(json.dumps(row, default=str) + "\n")
"#;

fn idc_rows() -> Result<PathBuf> {
    let dir = home().join(".cache/amicus/idc");
    std::fs::create_dir_all(&dir)?;
    let rows = dir.join("idc-series.jsonl");
    if rows.is_file() {
        return Ok(rows);
    }
    let python = venv_python().context("no venv python: run scripts/setup.sh --test")?;
    let wheel_dir = dir.join("wheel");
    let pip = python.with_file_name("pip");
    let status = std::process::Command::new(&pip)
        .args(["install", "-q", "pyarrow"])
        .status()?;
    if !status.success() {
        bail!("pip install pyarrow failed");
    }
    let status = std::process::Command::new(&pip)
        .args([
            "download",
            "-q",
            "--no-deps",
            "idc-index-data==25.0.5",
            "-d",
        ])
        .arg(&wheel_dir)
        .status()?;
    if !status.success() {
        bail!("pip download idc-index-data failed");
    }
    let wheel = std::fs::read_dir(&wheel_dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .context("no idc-index-data wheel")?;
    let tmp = dir.join("idc-series.jsonl.partial");
    let status = std::process::Command::new(python)
        .args(["-c", IDC_EXPORT])
        .arg(&wheel)
        .arg(&tmp)
        .status()?;
    if !status.success() {
        bail!("exporting the IDC metadata failed");
    }
    std::fs::rename(&tmp, &rows)?;
    Ok(rows)
}

/// IDC series metadata → the facts our header reader would have kept (one per series;
/// patient IDs are pseudonymised with a throw-away key like any station would).
fn idc_facts(rows: &Path, limit: Option<usize>) -> Result<Vec<InstanceFacts>> {
    use std::io::BufRead;
    let key = amicus_index::pseudonym::PseudonymKey::from_bytes([42; 32]);
    let mut out = Vec::new();
    for line in std::io::BufReader::new(std::fs::File::open(rows)?).lines() {
        if limit.is_some_and(|n| out.len() >= n) {
            break;
        }
        let v: serde_json::Value = serde_json::from_str(&line?)?;
        let (Some(series), Some(study), Some(patient), Some(modality)) = (
            text(&v["SeriesInstanceUID"]),
            text(&v["StudyInstanceUID"]),
            text(&v["PatientID"]),
            text(&v["Modality"]),
        ) else {
            continue;
        };
        if !amicus_index::header::is_uid(series) || !amicus_index::header::is_uid(study) {
            continue;
        }
        let sop_class = text(&v["SOPClassUID"])
            .filter(|c| amicus_index::header::is_uid(c))
            .unwrap_or("1.2.840.10008.5.1.4.1.1.7");
        out.push(InstanceFacts {
            sop_class_uid: sop_class.into(),
            sop_instance_uid: series.into(),
            study_uid: study.into(),
            series_uid: series.into(),
            modality: modality.into(),
            patient: key.pseudonym(text(&v["collection_id"]).unwrap_or(""), patient),
            patient_sex: text(&v["PatientSex"]).map(str::to_string),
            age_years: None,
            study_year: text(&v["StudyDate"]).and_then(|d| d.get(..4)?.parse().ok()),
            body_part: text(&v["BodyPartExamined"]).map(str::to_string),
            slice_thickness_mm: None,
            pixel_spacing_mm: Vec::new(),
            rows: None,
            columns: None,
            frames: v["instanceCount"]
                .as_u64()
                .and_then(|n| u32::try_from(n).ok()),
            manufacturer: text(&v["Manufacturer"]).map(str::to_string),
            model: None,
            kernel: None,
            roi_names: Vec::new(),
            segment_labels: Vec::new(),
            referenced_series: Vec::new(),
            transfer_syntax: String::new(),
        });
    }
    Ok(out)
}

fn text(v: &serde_json::Value) -> Option<&str> {
    v.as_str().map(str::trim).filter(|s| !s.is_empty())
}

fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))?
                .split_whitespace()
                .nth(1)?
                .parse::<f64>()
                .ok()
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

const LDCM: &str = "PREFIX ldcm: <https://johanvansoest.nl/ontologies/LinkedDicom/>\n";

fn idc_figures(limit: Option<usize>, reps: usize) -> Result<IdcFigures> {
    let rows = idc_rows()?;
    let facts = idc_facts(&rows, limit)?;
    eprintln!("bench: {} IDC series; building the graph", facts.len());
    let dir = tempfile::tempdir()?;
    let graph = dir.path().join("graph.nq");
    let t = Instant::now();
    let (counts, _) = amicus_index::graph::write_graph(
        facts.iter(),
        std::io::BufWriter::new(std::fs::File::create(&graph)?),
    )?;
    let build_s = t.elapsed().as_secs_f64();
    drop(facts);
    let graph_bytes = std::fs::metadata(&graph)?.len();
    eprintln!(
        "bench: {} triples ({} MiB); loading",
        counts.triples,
        graph_bytes >> 20
    );
    let t = Instant::now();
    let index = amicus_index::Index::load(&graph)?;
    let load_s = t.elapsed().as_secs_f64();
    let queries = [
        (
            "CT series of patients who also have a SEG (4-way join)",
            format!(
                "{LDCM}SELECT ?ct WHERE {{ ?p ldcm:has_study ?st . ?st ldcm:has_series ?ct . \
                 ?ct ldcm:T00080060 \"CT\" . ?p ldcm:has_study ?st2 . ?st2 ldcm:has_series ?seg . \
                 ?seg ldcm:T00080060 \"SEG\" }} LIMIT 1000"
            ),
        ),
        (
            "MR series of the breast by manufacturer (join + group)",
            format!(
                "{LDCM}SELECT ?m (COUNT(?s) AS ?n) WHERE {{ ?s ldcm:T00080060 \"MR\" ; \
                 ldcm:T00180015 \"BREAST\" ; ldcm:T00080070 ?m }} GROUP BY ?m"
            ),
        ),
        (
            "series of female patients' chest CT studies (patient-study-series join)",
            format!(
                "{LDCM}SELECT ?s WHERE {{ ?p ldcm:T00100040 \"F\" ; ldcm:has_study ?st . \
                 ?st ldcm:has_series ?s . ?s ldcm:T00080060 \"CT\" ; ldcm:T00180015 \"CHEST\" }} LIMIT 1000"
            ),
        ),
    ];
    let mut figures = Vec::new();
    for (name, sparql) in queries {
        let mut times = Vec::new();
        let mut rows = 0;
        for _ in 0..reps.max(3) {
            let t = Instant::now();
            let out = query::owner_query(
                &index,
                &sparql,
                Duration::from_secs(120),
                query::OwnerFormat::Text,
            )?;
            times.push(t.elapsed().as_secs_f64() * 1000.0);
            rows = out
                .iter()
                .filter(|b| **b == b'\n')
                .count()
                .saturating_sub(1);
        }
        let max_ms = times.iter().copied().fold(0.0, f64::max);
        figures.push(QueryFigure {
            name: name.into(),
            sparql,
            rows,
            p50_ms: median(times),
            max_ms,
        });
    }
    Ok(IdcFigures {
        series: counts.series,
        patients: counts.patients,
        triples: counts.triples,
        graph_bytes,
        build_s,
        load_s,
        peak_rss_mib: peak_rss_mib(),
        queries: figures,
    })
}

pub fn run(args: IndexArgs) -> Result<()> {
    let reps = args.reps.max(1);
    let mut scans = Vec::new();
    let synth_dir = tempfile::tempdir()?;
    let archive = synth_dir.path().join("archive");
    eprintln!("bench: generating {} synthetic patients", args.patients);
    amicus_synth::generate(
        &archive,
        "Bench Hospital",
        args.patients,
        1,
        "academic",
        |_, _| {},
    )?;
    scans.push(scan_figures("synthetic (academic)", &archive, reps)?);
    let corpus = args
        .corpus
        .clone()
        .unwrap_or_else(|| home().join(".cache/amicus/corpus"));
    if corpus.is_dir() {
        scans.push(scan_figures("real-world corpus", &corpus, reps)?);
    } else {
        eprintln!(
            "bench: no corpus at {} (run scripts/setup.sh --test)",
            corpus.display()
        );
    }
    let idc = if args.idc {
        Some(idc_figures(args.idc_series, reps)?)
    } else {
        None
    };
    let report = Report {
        machine: format!(
            "{} logical CPUs",
            std::thread::available_parallelism().map_or(0, |n| n.get())
        ),
        scans,
        idc,
    };
    std::fs::write(&args.out, serde_json::to_vec_pretty(&report)?)?;
    let md = args.out.with_extension("md");
    std::fs::write(&md, markdown(&report))?;
    print!("{}", markdown(&report));
    println!("wrote {} and {}", args.out.display(), md.display());
    let worst = |ratio: fn(&ScanFigures) -> Option<f64>| {
        report
            .scans
            .iter()
            .filter_map(ratio)
            .fold(f64::INFINITY, f64::min)
    };
    let (scan, headers) = (worst(|s| s.ratio), worst(|s| s.headers_ratio));
    if scan.is_finite() {
        println!(
            "index: {scan:.0}x pydicom for a full scan, {headers:.0}x for header reading (worst of the datasets; goal 20x)"
        );
    } else {
        println!("index: no pydicom baseline measured (goal 20x)");
    }
    Ok(())
}

fn markdown(r: &Report) -> String {
    let mut s = String::from(
        "| dataset | files | full scan files/s | headers files/s | pydicom files/s | scan ratio | headers ratio |\n|---|---:|---:|---:|---:|---:|---:|\n",
    );
    for f in &r.scans {
        s.push_str(&format!(
            "| {} | {} | {:.0} | {:.0} | {} | {} | {} |\n",
            f.dataset,
            f.files,
            f.amicus_files_per_s,
            f.headers_files_per_s,
            f.pydicom_files_per_s
                .map_or("–".into(), |v| format!("{v:.0}")),
            f.ratio.map_or("–".into(), |v| format!("{v:.1}x")),
            f.headers_ratio.map_or("–".into(), |v| format!("{v:.1}x")),
        ));
    }
    if let Some(i) = &r.idc {
        s.push_str(&format!(
            "\nIDC index: {} series, {} patients, {} triples, graph {} MiB; build {:.1} s, load {:.1} s, peak RSS {:.0} MiB\n\n| query | rows | p50 ms | max ms |\n|---|---:|---:|---:|\n",
            i.series,
            i.patients,
            i.triples,
            i.graph_bytes >> 20,
            i.build_s,
            i.load_s,
            i.peak_rss_mib
        ));
        for q in &i.queries {
            s.push_str(&format!(
                "| {} | {} | {:.1} | {:.1} |\n",
                q.name, q.rows, q.p50_ms, q.max_ms
            ));
        }
    }
    s
}
