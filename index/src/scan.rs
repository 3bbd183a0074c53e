//! Incremental scan of an archive folder into the index directory.
//!
//! Owns the index directory's files: `files.jsonl` (what each archive file contributed, keyed
//! by relative path, size and modification time), `graph.nq` (the RDF graph, N-Quads),
//! `report.json` (the last scan's report) and the pseudonymisation key. A re-scan parses only
//! new or changed files, drops removed ones, and rewrites the graph. Every file that cannot be
//! indexed is quarantined with a reason; no file stops the scan. Each output is replaced
//! atomically (graph first, then state, then report), so a crash leaves the previous index
//! or a consistent new one, never a half-written file.

use crate::graph::{GraphCounts, write_graph};
use crate::header::{InstanceFacts, read_facts};
use crate::pseudonym::{KeyError, PseudonymKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

pub const STATE_FILE: &str = "files.jsonl";
pub const GRAPH_FILE: &str = "graph.nq";
pub const REPORT_FILE: &str = "report.json";
const STATE_VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}: the archive is not a readable folder")]
    NoArchive(PathBuf),
    #[error(transparent)]
    Key(#[from] KeyError),
}

/// What one archive file contributed to the index.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileEntry {
    pub path: String,
    pub size: u64,
    pub mtime_ns: u128,
    #[serde(flatten)]
    pub outcome: Outcome,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Facts(Box<InstanceFacts>),
    Quarantined(String),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct StateHeader {
    version: u32,
    archive: String,
    key: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Quarantined {
    pub path: String,
    pub reason: String,
}

/// The report of one scan: stored as `report.json` and printed by the CLI.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IndexReport {
    pub archive: String,
    pub finished_unix: u64,
    pub seconds: f64,
    pub files_seen: u64,
    pub new: u64,
    pub changed: u64,
    pub unchanged: u64,
    pub removed: u64,
    pub indexed: u64,
    pub quarantined: Vec<Quarantined>,
    pub counts: GraphCounts,
    pub warnings: Vec<String>,
    pub key_fingerprint: String,
    pub graph_sha256: String,
}

/// Progress of a scan, for a terminal progress bar.
#[derive(Debug, Clone, Copy)]
pub enum Progress<'a> {
    /// The folder walk found this many files.
    Found(u64),
    /// One more file was handled (parsed or reused).
    File(&'a str),
    /// Writing the graph.
    Writing,
}

/// Scan `archive` into `index_dir` (created if missing).
pub fn scan(
    archive: &Path,
    index_dir: &Path,
    mut progress: impl FnMut(Progress<'_>),
) -> Result<IndexReport, ScanError> {
    let started = Instant::now();
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ScanError::Io { path, source }
    };
    std::fs::create_dir_all(index_dir).map_err(io(index_dir))?;
    let key = PseudonymKey::load_or_create(index_dir)?;
    let archive = archive
        .canonicalize()
        .map_err(|_| ScanError::NoArchive(archive.into()))?;
    if !archive.is_dir() {
        return Err(ScanError::NoArchive(archive));
    }
    let archive_text = archive.display().to_string();
    let mut previous = read_state(
        &index_dir.join(STATE_FILE),
        &archive_text,
        &key.fingerprint(),
    );

    let mut files = Vec::new();
    let mut quarantined = Vec::new();
    walk(&archive, &archive, &mut files, &mut quarantined, 0);
    files.sort();
    // Entries the walk itself could not read (links, special files, unlistable folders).
    let files_seen = (files.len() + quarantined.len()) as u64;
    progress(Progress::Found(files_seen));

    let (mut new, mut changed, mut unchanged) = (0, 0, 0);
    // Slots in sorted order: reused entries now, parsed ones filled in by the workers.
    let mut slots: Vec<Option<FileEntry>> = Vec::with_capacity(files.len());
    let mut to_parse: Vec<(usize, &String, u64, u128)> = Vec::new();
    for rel in &files {
        let meta = match std::fs::metadata(archive.join(rel)) {
            Ok(m) => m,
            Err(e) => {
                quarantined.push(Quarantined {
                    path: rel.clone(),
                    reason: format!("cannot stat: {e}"),
                });
                progress(Progress::File(rel));
                continue;
            }
        };
        let size = meta.len();
        let mtime_ns = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos());
        match previous.remove(rel) {
            Some(old) if old.size == size && old.mtime_ns == mtime_ns => {
                unchanged += 1;
                slots.push(Some(old));
                progress(Progress::File(rel));
            }
            old => {
                if old.is_some() {
                    changed += 1;
                } else {
                    new += 1;
                }
                to_parse.push((slots.len(), rel, size, mtime_ns));
                slots.push(None);
            }
        }
    }
    // Parse headers on every core; results come back to this thread for progress.
    let workers = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(8);
    let next = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|scope| {
        let (tx, rx) = std::sync::mpsc::channel();
        for _ in 0..workers {
            let tx = tx.clone();
            let (next, to_parse, key, archive) = (&next, &to_parse, &key, &archive);
            scope.spawn(move || {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some(&(slot, rel, size, mtime_ns)) = to_parse.get(i) else {
                        break;
                    };
                    let path = archive.join(rel);
                    // A parser bug must cost one file, not the scan.
                    let read = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        read_facts(&path, key)
                    }));
                    let outcome = match read {
                        Ok(Ok(facts)) => Outcome::Facts(Box::new(facts)),
                        Ok(Err(e)) => Outcome::Quarantined(e.to_string()),
                        Err(_) => {
                            Outcome::Quarantined("the DICOM parser panicked on this file".into())
                        }
                    };
                    let entry = FileEntry {
                        path: rel.clone(),
                        size,
                        mtime_ns,
                        outcome,
                    };
                    if tx.send((slot, entry)).is_err() {
                        break;
                    }
                }
            });
        }
        drop(tx);
        for (slot, entry) in rx {
            progress(Progress::File(&entry.path));
            slots[slot] = Some(entry);
        }
    });
    let entries: Vec<FileEntry> = slots.into_iter().flatten().collect();
    for entry in &entries {
        if let Outcome::Quarantined(reason) = &entry.outcome {
            quarantined.push(Quarantined {
                path: entry.path.clone(),
                reason: reason.clone(),
            });
        }
    }
    let removed = previous.len() as u64;

    // Duplicate SOP instances: the first path (sorted) counts, the others are quarantined.
    let mut seen: HashMap<&str, &str> = HashMap::new();
    let mut duplicates = Vec::new();
    for e in &entries {
        if let Outcome::Facts(f) = &e.outcome
            && let Some(first) = seen.insert(&f.sop_instance_uid, &e.path)
        {
            seen.insert(&f.sop_instance_uid, first);
            duplicates.push((e.path.clone(), first.to_string()));
        }
    }
    let duplicate_paths: std::collections::HashSet<&str> =
        duplicates.iter().map(|(p, _)| p.as_str()).collect();
    for (path, first) in &duplicates {
        quarantined.push(Quarantined {
            path: path.clone(),
            reason: format!("duplicate SOP instance of {first}"),
        });
    }

    progress(Progress::Writing);
    let facts: Vec<&InstanceFacts> = entries
        .iter()
        .filter(|e| !duplicate_paths.contains(e.path.as_str()))
        .filter_map(|e| match &e.outcome {
            Outcome::Facts(f) => Some(f.as_ref()),
            Outcome::Quarantined(_) => None,
        })
        .collect();
    let graph_path = index_dir.join(GRAPH_FILE);
    let (counts, issues, graph_sha256) = replace_file(&graph_path, |w| {
        let mut hashing = HashingWriter {
            inner: w,
            hash: Sha256::new(),
        };
        let (counts, issues) = write_graph(facts.iter().copied(), &mut hashing)?;
        Ok((counts, issues, hex::encode(hashing.hash.finalize())))
    })
    .map_err(io(&graph_path))?;
    let state_path = index_dir.join(STATE_FILE);
    replace_file(&state_path, |w| {
        let header = StateHeader {
            version: STATE_VERSION,
            archive: archive_text.clone(),
            key: key.fingerprint(),
        };
        serde_json::to_writer(&mut *w, &header)?;
        w.write_all(b"\n")?;
        for e in &entries {
            serde_json::to_writer(&mut *w, e)?;
            w.write_all(b"\n")?;
        }
        Ok(())
    })
    .map_err(io(&state_path))?;

    quarantined.sort_by(|a, b| a.path.cmp(&b.path));
    let report = IndexReport {
        archive: archive_text,
        finished_unix: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        seconds: started.elapsed().as_secs_f64(),
        files_seen,
        new,
        changed,
        unchanged,
        removed,
        indexed: facts.len() as u64,
        quarantined,
        counts,
        warnings: issues.0,
        key_fingerprint: key.fingerprint(),
        graph_sha256,
    };
    let report_path = index_dir.join(REPORT_FILE);
    replace_file(&report_path, |w| {
        serde_json::to_writer_pretty(&mut *w, &report)?;
        w.write_all(b"\n")
    })
    .map_err(io(&report_path))?;
    Ok(report)
}

/// What the last scan saw: the archive folder and every file's entry (for the imaging module,
/// which finds a series' files here instead of trusting anything a train says).
#[derive(Debug, Clone)]
pub struct ArchiveState {
    pub archive: PathBuf,
    pub entries: Vec<FileEntry>,
}

impl ArchiveState {
    /// Paths of the indexed files of a series, in path order.
    pub fn series_files(&self, series_uid: &str) -> Vec<PathBuf> {
        self.entries
            .iter()
            .filter_map(|e| match &e.outcome {
                Outcome::Facts(f) if f.series_uid == series_uid => Some(self.archive.join(&e.path)),
                _ => None,
            })
            .collect()
    }

    /// The indexed instances of `modality` that reference `series_uid` (RTSTRUCT or SEG
    /// objects drawn on it), with their facts.
    pub fn referencing(&self, series_uid: &str, modality: &str) -> Vec<(PathBuf, &InstanceFacts)> {
        self.entries
            .iter()
            .filter_map(|e| match &e.outcome {
                Outcome::Facts(f)
                    if f.modality == modality
                        && f.referenced_series.iter().any(|r| r == series_uid) =>
                {
                    Some((self.archive.join(&e.path), f.as_ref()))
                }
                _ => None,
            })
            .collect()
    }
}

/// The state the last scan left in `index_dir`, if any (and readable).
pub fn archive_state(index_dir: &Path) -> Option<ArchiveState> {
    let file = std::fs::File::open(index_dir.join(STATE_FILE)).ok()?;
    archive_state_from(std::io::BufReader::new(file))
}

/// [`archive_state`] from an open `files.jsonl` (the run worker opens it before it confines
/// itself, and reads it after).
pub fn archive_state_from(reader: impl BufRead) -> Option<ArchiveState> {
    let mut lines = reader.lines();
    let header: StateHeader = serde_json::from_str(&lines.next()?.ok()?).ok()?;
    let mut entries = Vec::new();
    for line in lines {
        entries.push(serde_json::from_str(&line.ok()?).ok()?);
    }
    Some(ArchiveState {
        archive: PathBuf::from(header.archive),
        entries,
    })
}

/// Where the station notes that `graph.nq` was checked against the last report (its size,
/// modification time and SHA-256), so a check costs a `stat` until the file changes.
const GRAPH_CHECKED_FILE: &str = "graph.checked";

#[derive(Serialize, Deserialize, PartialEq)]
struct GraphChecked {
    len: u64,
    modified_ns: u128,
    sha256: String,
}

/// Check that `graph.nq` is the graph the last scan wrote (its SHA-256 is in `report.json`):
/// a run only ever queries an index the station made. The hash is computed again only when the
/// file's size or modification time changed since the last check.
pub fn check_graph(index_dir: &Path) -> Result<(), crate::LoadError> {
    use crate::LoadError;
    let graph = index_dir.join(GRAPH_FILE);
    let report = last_report(index_dir).ok_or_else(|| {
        LoadError::Damaged(format!(
            "{} has no readable {REPORT_FILE}; run amicus station index",
            index_dir.display()
        ))
    })?;
    let meta = std::fs::metadata(&graph).map_err(|source| LoadError::Io {
        path: graph.clone(),
        source,
    })?;
    let stamp = GraphChecked {
        len: meta.len(),
        modified_ns: meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos()),
        sha256: report.graph_sha256.clone(),
    };
    let checked = index_dir.join(GRAPH_CHECKED_FILE);
    if let Ok(text) = std::fs::read(&checked)
        && serde_json::from_slice::<GraphChecked>(&text).ok().as_ref() == Some(&stamp)
    {
        return Ok(());
    }
    let mut file = std::fs::File::open(&graph).map_err(|source| LoadError::Io {
        path: graph.clone(),
        source,
    })?;
    let mut hash = Sha256::new();
    std::io::copy(&mut file, &mut HashOnly(&mut hash)).map_err(|source| LoadError::Io {
        path: graph.clone(),
        source,
    })?;
    if hex::encode(hash.finalize()) != report.graph_sha256 {
        return Err(LoadError::Damaged(format!(
            "{} is not the graph the last scan wrote (its SHA-256 differs from {REPORT_FILE}); run amicus station index",
            graph.display()
        )));
    }
    // Best effort: without the note the next check hashes again.
    if let Ok(text) = serde_json::to_vec(&stamp) {
        let _ = replace_file(&checked, |w| w.write_all(&text));
    }
    Ok(())
}

/// A writer that only hashes.
struct HashOnly<'a>(&'a mut Sha256);

impl Write for HashOnly<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The last scan's report, if any.
pub fn last_report(index_dir: &Path) -> Option<IndexReport> {
    let text = std::fs::read(index_dir.join(REPORT_FILE)).ok()?;
    serde_json::from_slice(&text).ok()
}

/// Previous entries by path; empty (a full re-scan) if the state is missing, from another
/// archive or key, of another version, or damaged.
fn read_state(path: &Path, archive: &str, key: &str) -> BTreeMap<String, FileEntry> {
    let Ok(file) = std::fs::File::open(path) else {
        return BTreeMap::new();
    };
    let mut lines = std::io::BufReader::new(file).lines();
    let header: Option<StateHeader> = lines
        .next()
        .and_then(|l| l.ok())
        .and_then(|l| serde_json::from_str(&l).ok());
    match header {
        Some(h) if h.version == STATE_VERSION && h.archive == archive && h.key == key => {}
        _ => return BTreeMap::new(),
    }
    let mut out = BTreeMap::new();
    for line in lines {
        let Some(entry) = line
            .ok()
            .and_then(|l| serde_json::from_str::<FileEntry>(&l).ok())
        else {
            return BTreeMap::new();
        };
        out.insert(entry.path.clone(), entry);
    }
    out
}

/// Regular files below `dir`, as paths relative to `root` with `/` separators. Symbolic links
/// are not followed (they could point outside the archive) and are quarantined.
fn walk(
    root: &Path,
    dir: &Path,
    files: &mut Vec<String>,
    quarantined: &mut Vec<Quarantined>,
    depth: usize,
) {
    let rel = |p: &Path| {
        p.strip_prefix(root)
            .unwrap_or(p)
            .to_string_lossy()
            .replace('\\', "/")
    };
    if depth > 64 {
        quarantined.push(Quarantined {
            path: rel(dir),
            reason: "folder nesting deeper than 64".into(),
        });
        return;
    }
    let read = match std::fs::read_dir(dir) {
        Ok(r) => r,
        Err(e) => {
            quarantined.push(Quarantined {
                path: rel(dir),
                reason: format!("cannot list folder: {e}"),
            });
            return;
        }
    };
    for entry in read.flatten() {
        let path = entry.path();
        match entry.file_type() {
            Ok(t) if t.is_symlink() => quarantined.push(Quarantined {
                path: rel(&path),
                reason: "symbolic link, not followed".into(),
            }),
            Ok(t) if t.is_dir() => walk(root, &path, files, quarantined, depth + 1),
            Ok(t) if t.is_file() => files.push(rel(&path)),
            Ok(_) => quarantined.push(Quarantined {
                path: rel(&path),
                reason: "not a regular file".into(),
            }),
            Err(e) => quarantined.push(Quarantined {
                path: rel(&path),
                reason: format!("cannot stat: {e}"),
            }),
        }
    }
}

struct HashingWriter<W> {
    inner: W,
    hash: Sha256,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Write `path` through a temporary sibling, fsync, then rename over the old file.
fn replace_file<T>(
    path: &Path,
    write: impl FnOnce(&mut std::io::BufWriter<&std::fs::File>) -> std::io::Result<T>,
) -> std::io::Result<T> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = tempfile::NamedTempFile::new_in(dir)?;
    let value = {
        let mut w = std::io::BufWriter::new(tmp.as_file());
        let value = write(&mut w)?;
        w.flush()?;
        value
    };
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(value)
}
