//! `amicus station held | release | withhold`: the data owner's decision on outputs the
//! station holds for them (`[outputs] hold_for_release`). The decision itself (files, audit)
//! is `amicus_runtime::station::held`; this file only prints.

use amicus_bundle::text::shown;
use amicus_runtime::station::{RunRecord, Station};
use anyhow::Result;
use std::path::Path;

fn print_outputs(verb: &str, outputs: &[amicus_runtime::station::ReleasedOutput]) {
    for o in outputs {
        println!(
            "    {verb} {} ({} bytes, sha256 {}) {}",
            shown(&o.name, 128),
            o.bytes,
            o.sha256,
            o.path.display()
        );
    }
}

fn print_held(dir: &Path, r: &RunRecord) {
    println!(
        "run {}  train {} {}  digest {}",
        r.run_id,
        shown(&r.train, 128),
        shown(&r.version, 64),
        amicus_bundle::text::short(&r.digest.to_hex(), 16)
    );
    print_outputs("held", &r.held);
    println!(
        "    release: amicus station release --dir {0} {1}   withhold: amicus station withhold --dir {0} {1}",
        dir.display(),
        r.run_id
    );
}

/// `station held`: runs whose outputs wait for the data owner.
pub fn held(dir: &Path, json: bool) -> Result<()> {
    let runs = Station::open(dir)?.held_runs()?;
    if json {
        println!("{}", serde_json::to_string_pretty(&runs)?);
        return Ok(());
    }
    if runs.is_empty() {
        println!("no outputs are held for release");
    }
    for r in &runs {
        print_held(dir, r);
    }
    Ok(())
}

/// Said in `station pending` and after a run when outputs are held.
pub fn held_hint(dir: &Path) {
    if let Ok(runs) = Station::open(dir).and_then(|s| s.held_runs())
        && !runs.is_empty()
    {
        println!(
            "{} run(s) have outputs held for your release: amicus station held --dir {}",
            runs.len(),
            dir.display()
        );
    }
}

pub fn release(dir: &Path, run: &str) -> Result<()> {
    let record = Station::open(dir)?.release_held(run)?;
    println!(
        "run {}: released {} output(s)",
        record.run_id,
        record.outputs.len()
    );
    print_outputs("released", &record.outputs);
    Ok(())
}

pub fn withhold(dir: &Path, run: &str, reason: &str) -> Result<()> {
    let record = Station::open(dir)?.withhold_held(run, reason)?;
    println!(
        "run {}: withheld {} output(s); they were deleted and nothing of them leaves",
        record.run_id,
        record.held.len()
    );
    Ok(())
}

/// After `station run`: the outputs the run left waiting.
pub fn print_after_run(dir: &Path, r: &RunRecord) {
    if r.held.is_empty() {
        return;
    }
    println!("the station's policy holds this run's outputs for the data owner:");
    print_held(dir, r);
}
