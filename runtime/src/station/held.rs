//! Outputs held for the data owner (`[outputs] hold_for_release`): a run's outputs that passed
//! the output rules wait in `runs/<id>/held/` until the data owner releases them (moved to
//! `outputs/`, each audited `output-released`) or withholds them (deleted). Either decision is
//! audited once (`held-outputs-decided`), is final, and survives a crash half-way (a retry
//! finishes it without a second entry).
//!
//! Owns only the decision on held outputs. It does not run trains, apply output rules (the
//! run did) or send anything anywhere (the daemon reads [`HeldState`] and reports).

use super::{HELD_DIR, OUTPUTS_DIR, RUNS_DIR, RunRecord, Station, StationError, io};
use crate::audit::Event;
use amicus_bundle::sha256;
use std::path::{Path, PathBuf};

/// Longest reason a data owner may give for withholding (kept at the station).
const MAX_REASON_CHARS: usize = 500;

/// Where a run's held outputs stand.
#[derive(Debug, Clone)]
pub enum HeldState {
    /// The run released its outputs directly, or had none.
    NotHeld,
    /// Waiting for the data owner.
    Waiting(RunRecord),
    /// Released by the data owner: the record lists them in `outputs`.
    Released(RunRecord),
    /// Withheld by the data owner (the files are gone).
    Withheld { reason: String },
}

/// Why a decision cannot be taken.
fn not_held(run_id: &str, why: &str) -> StationError {
    StationError::NotHeld {
        run_id: amicus_bundle::text::short(run_id, 40),
        why: why.to_string(),
    }
}

/// A run id as the station makes them (timestamp and hex): nothing that could name another
/// path.
fn plain_run_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

impl Station {
    fn run_dir(&self, run_id: &str) -> Result<PathBuf, StationError> {
        if !plain_run_id(run_id) {
            return Err(not_held(run_id, "not a run id of this station"));
        }
        let dir = self.dir.join(RUNS_DIR).join(run_id);
        if !dir.join("run.json").is_file() {
            return Err(not_held(run_id, "no such run at this station"));
        }
        Ok(dir)
    }

    /// The record of a finished run (`runs/<id>/run.json`).
    pub fn run_record(&self, run_id: &str) -> Result<RunRecord, StationError> {
        let path = self.run_dir(run_id)?.join("run.json");
        let bytes = std::fs::read(&path).map_err(io(&path))?;
        serde_json::from_slice(&bytes).map_err(|e| StationError::Io {
            path,
            source: std::io::Error::other(e.to_string()),
        })
    }

    /// Where `run_id`'s held outputs stand.
    pub fn held_state(&self, run_id: &str) -> Result<HeldState, StationError> {
        let record = self.run_record(run_id)?;
        Ok(match record.decision.as_deref() {
            _ if record.held.is_empty() => HeldState::NotHeld,
            None => HeldState::Waiting(record),
            Some("released") => HeldState::Released(record),
            Some(_) => HeldState::Withheld {
                reason: self.withhold_reason(run_id).unwrap_or_default(),
            },
        })
    }

    /// Runs whose outputs wait for the data owner, oldest first.
    pub fn held_runs(&self) -> Result<Vec<RunRecord>, StationError> {
        let runs = self.dir.join(RUNS_DIR);
        let mut out = Vec::new();
        let entries = match std::fs::read_dir(&runs) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(io(&runs)(e)),
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(id) = name.to_str() else { continue };
            if !plain_run_id(id) || !entry.path().join(HELD_DIR).is_dir() {
                continue;
            }
            if let Ok(HeldState::Waiting(record)) = self.held_state(id) {
                out.push(record);
            }
        }
        out.sort_by(|a, b| a.run_id.cmp(&b.run_id));
        Ok(out)
    }

    /// `amicus station release RUN`: the held outputs become released outputs, exactly the
    /// bytes the run's `output-held` entries name (a file changed since is refused).
    pub fn release_held(&self, run_id: &str) -> Result<RunRecord, StationError> {
        let dir = self.run_dir(run_id)?;
        let _lock = decision_lock(&dir)?;
        let mut record = self.undecided(run_id)?;
        let held_dir = dir.join(HELD_DIR);
        let out_dir = dir.join(OUTPUTS_DIR);
        if held_dir.is_dir() {
            for o in &record.held {
                let path = held_dir.join(&o.name);
                let bytes = std::fs::read(&path).map_err(io(&path))?;
                if sha256(&bytes) != o.sha256 || bytes.len() as u64 != o.bytes {
                    return Err(not_held(
                        run_id,
                        &format!(
                            "the held output {} changed since the run; nothing was released",
                            amicus_bundle::text::shown(&o.name, 80)
                        ),
                    ));
                }
            }
            if out_dir.exists() {
                return Err(not_held(run_id, "its outputs/ directory already exists"));
            }
            std::fs::rename(&held_dir, &out_dir).map_err(io(&out_dir))?;
        } else if !out_dir.is_dir() {
            return Err(not_held(run_id, "its held outputs are missing"));
        }
        if !self.decided_in_log(run_id)? {
            let audit = self.audit()?;
            audit.append(Event::HeldOutputsDecided {
                run_id: record.run_id.clone(),
                decision: "released".into(),
                outputs: record.held.len() as u64,
                reason: None,
            })?;
            for o in &record.held {
                audit.append(Event::OutputReleased {
                    run_id: record.run_id.clone(),
                    name: o.name.clone(),
                    bytes: o.bytes,
                    sha256: o.sha256,
                })?;
            }
        }
        record.outputs = record
            .held
            .iter()
            .map(|o| super::ReleasedOutput {
                path: out_dir.join(&o.name),
                ..o.clone()
            })
            .collect();
        record.decision = Some("released".into());
        write_record(&dir, &record)?;
        Ok(record)
    }

    /// `amicus station withhold RUN`: the held outputs are deleted; nothing of them leaves.
    /// `reason` (the data owner's words, control characters removed, at most 500 characters)
    /// stays in the station's own log.
    pub fn withhold_held(&self, run_id: &str, reason: &str) -> Result<RunRecord, StationError> {
        let dir = self.run_dir(run_id)?;
        let _lock = decision_lock(&dir)?;
        let mut record = self.undecided(run_id)?;
        let reason: String = reason
            .chars()
            .filter(|c| !c.is_control())
            .take(MAX_REASON_CHARS)
            .collect();
        if !self.decided_in_log(run_id)? {
            self.audit()?.append(Event::HeldOutputsDecided {
                run_id: record.run_id.clone(),
                decision: "withheld".into(),
                outputs: record.held.len() as u64,
                reason: Some(reason),
            })?;
        }
        let held_dir = dir.join(HELD_DIR);
        match std::fs::remove_dir_all(&held_dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(&held_dir)(e)),
        }
        record.decision = Some("withheld".into());
        write_record(&dir, &record)?;
        Ok(record)
    }

    /// The record of a run whose held outputs wait for a decision.
    fn undecided(&self, run_id: &str) -> Result<RunRecord, StationError> {
        let record = self.run_record(run_id)?;
        if record.held.is_empty() {
            return Err(not_held(run_id, "it has no held outputs"));
        }
        if let Some(d) = &record.decision {
            return Err(not_held(run_id, &format!("its outputs were already {d}")));
        }
        Ok(record)
    }

    /// Whether the log already has the decision (a retry after a crash adds no second one).
    fn decided_in_log(&self, run_id: &str) -> Result<bool, StationError> {
        Ok(crate::audit::read_entries(&self.dir)?
            .iter()
            .any(|e| e.entry["event"] == "held-outputs-decided" && e.entry["run_id"] == run_id))
    }

    fn withhold_reason(&self, run_id: &str) -> Option<String> {
        crate::audit::read_entries(&self.dir)
            .ok()?
            .iter()
            .rev()
            .find(|e| e.entry["event"] == "held-outputs-decided" && e.entry["run_id"] == run_id)
            .and_then(|e| e.entry["reason"].as_str().map(str::to_string))
    }
}

/// One decision at a time per run (the CLI and a console may race).
fn decision_lock(dir: &Path) -> Result<std::fs::File, StationError> {
    let path = dir.join(".decision.lock");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(io(&path))?;
    f.lock().map_err(io(&path))?;
    Ok(f)
}

fn write_record(dir: &Path, record: &RunRecord) -> Result<(), StationError> {
    let path = dir.join("run.json");
    let bytes = serde_json::to_vec_pretty(record).unwrap_or_default();
    amicus_bundle::bundle::write_atomic(&path, &bytes).map_err(io(&path))
}

#[cfg(test)]
mod tests {
    use super::plain_run_id;

    #[test]
    fn run_ids_name_no_other_path() {
        assert!(plain_run_id("20261207T071500Z-0a1b2c3d"));
        for bad in ["", "..", "../x", "a/b", "/etc", "a b", &"a".repeat(65), "ü"] {
            assert!(!plain_run_id(bad), "{bad:?}");
        }
    }
}
