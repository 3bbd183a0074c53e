//! Library-level tests of the sandbox with real components: limits that the CLI tests cannot
//! reach through a manifest (the wall clock), determinism, and the compiled-module cache.

mod common;

use amicus_bundle::Bundle;
use amicus_runtime::sandbox::{CompileSource, Outcome, RunReport, RunRequest, Sandbox};
use std::time::{Duration, Instant};

fn run(sandbox: &Sandbox, bundle: &Bundle, params: &str, fuel: u64, wall: Duration) -> RunReport {
    let (component, _) = sandbox.compile(bundle.component()).unwrap();
    let m = bundle.manifest();
    sandbox
        .run(
            &component,
            RunRequest {
                manifest: m,
                granted: m.capabilities.iter().copied().collect(),
                params: params.to_string(),
                fuel,
                memory_bytes: (m.limits.memory_mib as usize) << 20,
                wall,
                output_max_bytes: 1 << 20,
                output_max_total: 1 << 20,
                log_cap: 1 << 20,
                seed: [7; 32],
                progress: Box::new(|_, _| {}),
                on_call: None,
                cohort: None,
                imaging: None,
                kernels: None,
                federated: None,
            },
        )
        .unwrap()
}

fn misbehave() -> Bundle {
    Bundle::read(&common::bundle("testing/misbehave")).unwrap()
}

#[test]
fn wall_clock_deadline_stops_a_loop_that_fuel_would_not() {
    let sandbox = Sandbox::new(None).unwrap();
    let b = misbehave();
    let started = Instant::now();
    let r = run(
        &sandbox,
        &b,
        r#"{"do":"loop"}"#,
        u64::MAX / 2,
        Duration::from_secs(1),
    );
    assert_eq!(
        r.outcome,
        Outcome::WallClockExceeded(Duration::from_secs(1))
    );
    // Stopped close to the deadline (generous bound: this machine is shared and noisy).
    assert!(started.elapsed() < Duration::from_secs(20));
    assert!(r.outputs.is_empty());
}

#[test]
fn fuel_use_is_deterministic() {
    let sandbox = Sandbox::new(None).unwrap();
    let b = Bundle::read(&common::bundle("cohort-stats")).unwrap();
    let a = run(
        &sandbox,
        &b,
        r#"{"tables": ["modality"]}"#,
        1 << 32,
        Duration::from_secs(30),
    );
    let c = run(
        &sandbox,
        &b,
        r#"{"tables": ["modality"]}"#,
        1 << 32,
        Duration::from_secs(30),
    );
    assert_eq!(a.outcome, Outcome::Succeeded);
    assert_eq!(a.fuel_used, c.fuel_used);
    assert_eq!(a.outputs, c.outputs);
    let d = run(
        &sandbox,
        &b,
        r#"{"tables": ["roi"]}"#,
        1 << 32,
        Duration::from_secs(30),
    );
    assert_eq!(d.outcome, Outcome::Succeeded);
    assert_ne!(a.outputs, d.outputs, "parameters reach the train");
}

#[test]
fn cache_is_used_and_keyed_by_component() {
    let dir = tempfile::tempdir().unwrap();
    let sandbox = Sandbox::new(Some(dir.path())).unwrap();
    let b = Bundle::read(&common::bundle("cohort-stats")).unwrap();
    assert_eq!(
        sandbox.compile(b.component()).unwrap().1,
        CompileSource::Compiled
    );
    assert_eq!(
        sandbox.compile(b.component()).unwrap().1,
        CompileSource::Cache
    );
    let other = misbehave();
    assert_eq!(
        sandbox.compile(other.component()).unwrap().1,
        CompileSource::Compiled
    );
    // A corrupted cache entry is recompiled, never trusted.
    for e in std::fs::read_dir(dir.path()).unwrap() {
        std::fs::write(e.unwrap().path(), b"garbage").unwrap();
    }
    assert_eq!(
        sandbox.compile(b.component()).unwrap().1,
        CompileSource::Compiled
    );
}

#[test]
fn not_webassembly_is_an_error_not_a_panic() {
    let sandbox = Sandbox::new(None).unwrap();
    assert!(sandbox.compile(b"\0asm\x0d\0\x01\0garbage").is_err());
    assert!(sandbox.compile(b"").is_err());
}

#[test]
fn component_imports_are_listed() {
    let sandbox = Sandbox::new(None).unwrap();
    let b = Bundle::read(&common::bundle("testing/fs-escape")).unwrap();
    let (c, _) = sandbox.compile(b.component()).unwrap();
    let imports = sandbox.imports(&c);
    assert!(
        imports.iter().any(|i| i.starts_with("wasi:filesystem/")),
        "{imports:?}"
    );
    assert!(
        imports.iter().any(|i| i == "amicus:train/output@0.1.0"),
        "{imports:?}"
    );
}
