//! The station's supervision of its run worker, against a worker that misbehaves in every way
//! a crashing or compromised process can (`fake_worker.py`, speaking the real protocol): it
//! panics, aborts, runs out of memory, is killed, hangs before and after it is ready, writes
//! garbage or a frame announcing a terabyte, lies about its outputs and its outcome, and floods
//! the audit log. Each run must end as the stated outcome with the reason in the audit log,
//! release nothing, leave a verifying log, and leave the station able to run the next train.

mod common;

use amicus_runtime::station::{Station, StationError};
use amicus_runtime::worker::WorkerCommand;
use common::{Fixture, ok, s};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

fn python() -> PathBuf {
    for p in ["/usr/bin/python3", "/usr/local/bin/python3"] {
        if Path::new(p).is_file() {
            return PathBuf::from(p);
        }
    }
    panic!("python3 is needed for the fake worker");
}

fn fake(mode: &str) -> WorkerCommand {
    WorkerCommand {
        program: python(),
        args: vec![
            common::repo_root()
                .join("cli/tests/fake_worker.py")
                .into_os_string(),
            mode.into(),
        ],
    }
}

/// A station (empty archive) whose data owner approved `cohort-stats`; short worker set-up
/// time and a small audit cap for the flood.
fn station() -> (Fixture, PathBuf) {
    let f = Fixture::new();
    f.policy_edit("max_audit_bytes = 1048576", "max_audit_bytes = 65536");
    f.policy_edit("setup_seconds = 120", "setup_seconds = 2");
    let b = f.ready("cohort-stats");
    warm(&f, &b, None);
    (f, b)
}

/// One run with the real worker, so the station's cache holds the compilation and the fake
/// worker is only ever asked to run.
fn warm(f: &Fixture, bundle: &Path, params: Option<&str>) {
    let _ = f.run(bundle, params);
    for p in f.released() {
        std::fs::remove_file(p).unwrap();
    }
    assert!(
        std::fs::read_dir(f.station().join("cache"))
            .map(|d| d.count() > 0)
            .unwrap_or(false),
        "the compilation was not cached"
    );
}

/// Run `bundle` with the fake worker in `mode`; returns the error's outcome and reason.
fn run_fake(f: &Fixture, bundle: &Path, mode: &str) -> (String, String, Duration) {
    let st = Station::open(&f.station()).unwrap().with_worker(fake(mode));
    let t = Instant::now();
    let result = st.run(bundle, None, Box::new(|_, _| {}));
    let elapsed = t.elapsed();
    match result {
        Err(StationError::RunFailed {
            outcome, reason, ..
        }) => (outcome, reason, elapsed),
        Ok(r) => panic!("{mode}: the run succeeded: {r:?}"),
        Err(e) => panic!("{mode}: {e}"),
    }
}

fn nothing_released(f: &Fixture, mode: &str) {
    assert!(f.released().is_empty(), "{mode}: something was released");
    let e = f.last_event("run-finished");
    assert_eq!(e["outputs_released"], 0, "{mode}: {e}");
    let run = e["run_id"].clone();
    assert!(
        !f.events()
            .iter()
            .any(|e| e["event"] == "output-released" && e["run_id"] == run),
        "{mode}: an output-released entry"
    );
    f.audit_verifies();
}

#[test]
fn a_worker_that_dies_fails_its_run_and_the_station_goes_on() {
    let (f, b) = station();
    for (mode, outcome, needle) in [
        ("panic-in-setup", "failed", "panicked"),
        ("panic", "failed", "boom while running"),
        ("abort", "failed", "SIGABRT"),
        ("out-of-memory", "memory-limit", "memory limit"),
        ("killed", "failed", "SIGKILL"),
        ("segfault", "failed", "SIGSEGV"),
        ("exit-quietly", "failed", "before finishing"),
        ("hang-in-setup", "failed", "did not get ready"),
    ] {
        let (got, reason, elapsed) = run_fake(&f, &b, mode);
        assert_eq!(got, outcome, "{mode}: {reason}");
        assert!(reason.contains(needle), "{mode}: {reason}");
        let e = f.last_event("run-finished");
        assert_eq!(e["outcome"], outcome, "{mode}: {e}");
        assert!(
            e["reason"].as_str().unwrap().contains(needle),
            "{mode}: {e}"
        );
        assert!(
            elapsed < Duration::from_secs(5),
            "{mode}: busy for {elapsed:?}"
        );
        nothing_released(&f, mode);
    }
    // The real worker still runs the real train.
    let out = f.run(&b, None);
    assert!(out.ok, "{}", out.text());
}

#[test]
fn a_worker_past_the_deadline_is_killed() {
    let (f, _) = station();
    // host-hog asks for 2 s.
    f.policy_edit(
        "allowed_capabilities = [\"cohort\"]",
        "allowed_capabilities = [\"cohort\", \"imaging\", \"kernels\"]",
    );
    let b = f.ready("testing/host-hog");
    warm(&f, &b, Some(r#"{"do": "sleep", "seconds": 0}"#));
    let built = amicus_bundle::Bundle::read(&b).unwrap();
    assert_eq!(built.manifest().limits.wall_seconds, 2);
    let (outcome, reason, elapsed) = run_fake(&f, &b, "hang");
    assert_eq!(outcome, "wall-clock-exceeded", "{reason}");
    let wall = Duration::from_secs(built.manifest().limits.wall_seconds.into());
    assert!(
        elapsed < wall + Duration::from_secs(2),
        "busy for {elapsed:?}"
    );
    nothing_released(&f, "hang");
}

#[test]
fn a_worker_that_breaks_the_protocol_is_stopped() {
    let (f, b) = station();
    for mode in [
        "garbage",
        "huge-frame",
        "truncated",
        "second-ready",
        "more-blobs-than-announced",
    ] {
        let (outcome, reason, elapsed) = run_fake(&f, &b, mode);
        assert!(
            outcome == "failed" || outcome == "policy-violation",
            "{mode}: {outcome}: {reason}"
        );
        assert!(
            elapsed < Duration::from_secs(5),
            "{mode}: busy for {elapsed:?}"
        );
        nothing_released(&f, mode);
    }
}

#[test]
fn what_a_worker_hands_back_passes_the_output_rules_again() {
    let (f, b) = station();
    for (mode, outcome, needle) in [
        ("undeclared-output", "policy-violation", "not declared"),
        ("oversized-output", "policy-violation", "limit"),
        ("update-output", "policy-violation", "update"),
        // No room is read for an update outside a round: a broken protocol.
        ("update-outside-a-round", "failed", "protocol"),
        ("station-outcome", "failed", "only the station decides"),
    ] {
        let (got, reason, _) = run_fake(&f, &b, mode);
        assert_eq!(got, outcome, "{mode}: {reason}");
        assert!(reason.contains(needle), "{mode}: {reason}");
        nothing_released(&f, mode);
    }
}

#[test]
fn the_audit_volume_of_a_run_is_bounded() {
    let (f, b) = station();
    let before = std::fs::metadata(f.station().join("audit.log"))
        .unwrap()
        .len();
    let (outcome, reason, _) = run_fake(&f, &b, "flood");
    assert_eq!(outcome, "limit-exceeded", "{reason}");
    let grew = std::fs::metadata(f.station().join("audit.log"))
        .unwrap()
        .len()
        - before;
    assert!(grew < 200_000, "the log grew by {grew} bytes");
    nothing_released(&f, "flood");

    // 20,000 identical calls are one entry with their count.
    let st = Station::open(&f.station())
        .unwrap()
        .with_worker(fake("coalesced-flood"));
    let record = st.run(&b, None, Box::new(|_, _| {})).unwrap();
    let calls: Vec<serde_json::Value> = f
        .events()
        .into_iter()
        .filter(|e| e["event"] == "capability-call" && e["run_id"] == record.run_id.as_str())
        .collect();
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert_eq!(calls[0]["count"], 20000, "{calls:?}");
    f.audit_verifies();
}

#[test]
fn text_from_the_worker_is_escaped_and_bounded_in_the_log() {
    let (f, b) = station();
    let st = Station::open(&f.station())
        .unwrap()
        .with_worker(fake("escapes"));
    st.run(&b, None, Box::new(|_, _| {})).unwrap();
    let call = f.last_event("capability-call");
    let detail = call["detail"].as_str().unwrap();
    assert!(!detail.contains('\u{1b}'), "{detail}");
    assert!(!detail.contains('\r'), "{detail}");
    assert!(detail.len() <= 4096 + 16, "{}", detail.len());
    assert!(!call["outcome"].as_str().unwrap().contains('\u{1b}'));
    let shown = ok(&["audit", "show", "--dir", s(&f.station())]);
    assert!(!shown.stdout.contains('\u{1b}'));
    f.audit_verifies();
}
