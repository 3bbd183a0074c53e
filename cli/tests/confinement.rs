//! Red-team tests of the run worker, through the real binary: a train that holds the station in
//! host code (a blocking WASI call, a SPARQL query that outgrows its limits, ONNX Runtime
//! session creation and `Run` that outlast the time limit or allocate beyond the run's memory),
//! models that name external data, series "UIDs" that are paths, and a look at the worker
//! process itself while it runs (its environment, files, capabilities, filters and limits).
//! Every run must end with the stated outcome, an audit entry with the reason, nothing
//! released, the audit log verifying, and the station free again within the limit + 2 s.

mod common;

use amicus_autodiff::onnx::{
    AttributeProto, Dim, FLOAT, GraphProto, ModelProto, NodeProto, OperatorSetIdProto,
    StringStringEntryProto, TensorProto, ValueInfoProto,
};
use amicus_bundle::Bundle;
use amicus_bundle::manifest::{COMPONENT_PATH, ModelDecl, ModelRole};
use common::{Fixture, Out, ok, s};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// A station with a small synthetic archive, indexed, that allows every capability.
fn station() -> Fixture {
    let f = Fixture::new();
    f.synth_archive("academic", 12, 3);
    f.policy_edit("min_patients = 10", "min_patients = 1");
    f.policy_edit(
        "allowed_capabilities = [\"cohort\"]",
        "allowed_capabilities = [\"cohort\", \"imaging\", \"kernels\"]",
    );
    ok(&["station", "index", "--dir", s(&f.station())]);
    f
}

/// The `host-hog` train with `models` in its bundle and the given limits, signed and approved.
fn hostile(
    f: &Fixture,
    name: &str,
    models: &[(&str, Vec<u8>)],
    memory_mib: u32,
    wall: u32,
) -> PathBuf {
    let built = Bundle::read(&common::bundle("testing/host-hog")).unwrap();
    let mut manifest = built.manifest().clone();
    manifest.limits.memory_mib = memory_mib;
    manifest.limits.wall_seconds = wall;
    let mut files = vec![(COMPONENT_PATH.to_string(), built.component().to_vec())];
    manifest.models = models
        .iter()
        .map(|(file, _)| ModelDecl {
            file: file.to_string(),
            role: ModelRole::Frozen,
            loss: None,
        })
        .collect();
    for (file, bytes) in models {
        files.push((file.to_string(), bytes.clone()));
    }
    let b = Bundle::create(manifest, files).unwrap();
    let path = f.path(&format!("{name}.train"));
    b.write(&path).unwrap();
    ok(&["train", "sign", s(&path), "--key", s(&f.path("alice.key"))]);
    f.approve(&path);
    path
}

/// Run `bundle` with `params`; returns the output and how long the station was busy.
fn timed(f: &Fixture, bundle: &std::path::Path, params: &str) -> (Out, Duration) {
    let t = Instant::now();
    let out = f.run(bundle, Some(params));
    (out, t.elapsed())
}

/// The run failed with `outcome` (one of them), audited, nothing released, the log verifies,
/// and the station then runs a good train.
fn stopped(f: &Fixture, out: &Out, outcomes: &[&str]) -> serde_json::Value {
    assert!(!out.ok, "the run should not succeed:\n{}", out.text());
    assert!(
        out.stderr.contains("nothing was released"),
        "{}",
        out.text()
    );
    let e = f.last_event("run-finished");
    assert!(
        outcomes.contains(&e["outcome"].as_str().unwrap_or("")),
        "expected one of {outcomes:?}: {e}\n{}",
        out.text()
    );
    assert!(e["reason"].as_str().is_some_and(|r| !r.is_empty()), "{e}");
    assert_eq!(e["outputs_released"], 0);
    assert!(f.released().is_empty(), "something was released");
    f.audit_verifies();
    e
}

/// The station is alive and well: a plain train runs and releases.
fn still_serves(f: &Fixture) {
    let b = f.ready("cohort-stats");
    let out = f.run(&b, None);
    assert!(out.ok, "{}", out.text());
    for p in f.released() {
        std::fs::remove_file(p).unwrap();
    }
}

fn kernels_ready() -> bool {
    match amicus_kernels::available() {
        Ok(()) => true,
        Err(e) => {
            assert!(std::env::var_os("CI").is_none(), "{e}");
            eprintln!("SKIPPED (counted): ONNX Runtime is not available: {e}");
            false
        }
    }
}

fn model(
    nodes: Vec<NodeProto>,
    inputs: Vec<ValueInfoProto>,
    output: &str,
    initializers: Vec<TensorProto>,
) -> Vec<u8> {
    ModelProto {
        ir_version: Some(8),
        opset_import: vec![OperatorSetIdProto {
            domain: Some(String::new()),
            version: Some(17),
        }],
        producer_name: Some("amicus-tests".into()),
        graph: Some(GraphProto {
            name: Some("hostile".into()),
            node: nodes,
            initializer: initializers,
            input: inputs,
            output: vec![ValueInfoProto::tensor(output, FLOAT, &[])],
            ..Default::default()
        }),
        ..Default::default()
    }
    .to_bytes()
}

fn node(op: &str, inputs: &[&str], output: &str, attribute: Vec<AttributeProto>) -> NodeProto {
    NodeProto {
        op_type: Some(op.into()),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: vec![output.into()],
        attribute,
        ..Default::default()
    }
}

fn input_x() -> Vec<ValueInfoProto> {
    vec![ValueInfoProto::tensor(
        "x",
        FLOAT,
        &[Dim::Named("a".into()), Dim::Named("b".into())],
    )]
}

/// Constant folding at session creation: a constant tiled to `elements` values and `nodes`
/// elementwise `Sin`s of it, reduced and added to the input (so the chain is folded, and every
/// intermediate kept while ONNX Runtime loads the model).
fn fold_bomb(elements: i64, nodes: usize) -> Vec<u8> {
    let mut chain = vec![node("Tile", &["c", "reps"], "a0", vec![])];
    for i in 0..nodes {
        chain.push(node(
            "Sin",
            &[&format!("a{i}")],
            &format!("a{}", i + 1),
            vec![],
        ));
    }
    chain.push(node(
        "ReduceMax",
        &[&format!("a{nodes}")],
        "r",
        vec![AttributeProto::int("keepdims", 0)],
    ));
    chain.push(node("Add", &["r", "x"], "y", vec![]));
    model(
        chain,
        input_x(),
        "y",
        vec![
            TensorProto::ints("reps", &[1], &[elements]),
            TensorProto::floats("c", &[1], &[0.5]),
        ],
    )
}

/// At run time: x expanded to [rows, cols], multiplied by itself when `matmul`, reduced.
fn run_bomb(rows: i64, cols: i64, matmul: bool) -> Vec<u8> {
    let mut nodes = vec![node("Expand", &["x", "shape"], "a", vec![])];
    let last = if matmul {
        nodes.push(node("MatMul", &["a", "a"], "b", vec![]));
        "b"
    } else {
        "a"
    };
    nodes.push(node(
        "ReduceMax",
        &[last],
        "y",
        vec![AttributeProto::int("keepdims", 0)],
    ));
    model(
        nodes,
        input_x(),
        "y",
        vec![TensorProto::ints("shape", &[2], &[rows, cols])],
    )
}

/// A model whose only weight lives in a file at `location`.
fn external(location: &str) -> Vec<u8> {
    let w = TensorProto {
        name: Some("w".into()),
        dims: vec![1],
        data_type: Some(FLOAT),
        data_location: Some(1),
        external_data: vec![
            StringStringEntryProto {
                key: Some("location".into()),
                value: Some(location.into()),
            },
            StringStringEntryProto {
                key: Some("length".into()),
                value: Some("4".into()),
            },
        ],
        ..Default::default()
    };
    model(
        vec![node("Add", &["x", "w"], "y", vec![])],
        input_x(),
        "y",
        vec![w],
    )
}

#[test]
fn a_blocking_wasi_call_is_stopped_at_the_deadline_and_the_worker_is_locked_down() {
    let f = station();
    let b = hostile(&f, "sleep", &[], 64, 2);
    // While the train sleeps, look at its worker from outside.
    let station_pid = std::sync::Arc::new(std::sync::Mutex::new(None::<u32>));
    let params = f.path("sleep.json");
    std::fs::write(&params, r#"{"do": "sleep"}"#).unwrap();
    let t = Instant::now();
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_amicus"))
        .args([
            "station",
            "run",
            "--dir",
            s(&f.station()),
            "--params",
            s(&params),
            s(&b),
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    *station_pid.lock().unwrap() = Some(child.id());
    let worker = find_worker(child.id(), Duration::from_secs(2));
    let worker = worker.expect("a worker process under the station");
    let environ = std::fs::read(format!("/proc/{worker}/environ")).unwrap_or_default();
    let vars: Vec<String> = environ
        .split(|b| *b == 0)
        .filter(|v| !v.is_empty())
        .map(|v| {
            String::from_utf8_lossy(v)
                .split('=')
                .next()
                .unwrap_or("")
                .to_string()
        })
        .collect();
    assert!(
        vars.iter()
            .all(|v| v == "MALLOC_ARENA_MAX" || v == "AMICUS_ORT_LIB"),
        "the worker's environment: {vars:?}"
    );
    let status = std::fs::read_to_string(format!("/proc/{worker}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .unwrap_or("")
            .to_string()
    };
    assert_eq!(field("NoNewPrivs:"), "1", "{status}");
    assert_eq!(field("Seccomp:"), "2", "seccomp filter mode: {status}");
    assert_eq!(field("CapEff:").trim_start_matches('0'), "", "{status}");
    assert_eq!(field("CapBnd:").trim_start_matches('0'), "", "{status}");
    let limits = std::fs::read_to_string(format!("/proc/{worker}/limits")).unwrap();
    let data = limits
        .lines()
        .find(|l| l.starts_with("Max data size"))
        .unwrap();
    assert!(!data.contains("unlimited"), "{limits}");
    let cwd = std::fs::read_link(format!("/proc/{worker}/cwd")).unwrap();
    assert!(
        cwd.file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with(".work-"),
        "{cwd:?}"
    );
    // Nothing of the station's directory is open in the worker, its key least of all.
    for fd in std::fs::read_dir(format!("/proc/{worker}/fd"))
        .unwrap()
        .flatten()
    {
        if let Ok(target) = std::fs::read_link(fd.path()) {
            let t = target.to_string_lossy().to_string();
            assert!(
                !t.contains("station.key")
                    && !t.contains("pseudonym.key")
                    && !t.ends_with("policy.toml"),
                "the worker holds {t}"
            );
        }
    }
    let out = child.wait_with_output().unwrap();
    let elapsed = t.elapsed();
    let out = Out {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    stopped(&f, &out, &["wall-clock-exceeded"]);
    assert!(elapsed < Duration::from_secs(4), "busy for {elapsed:?}");
    let started = f.last_event("worker-started");
    assert!(
        started["landlock"]
            .as_str()
            .unwrap()
            .starts_with("enforced"),
        "{started}"
    );
    assert_eq!(started["seccomp"], "enforced", "{started}");
    assert_eq!(started["gaps"].as_array().unwrap().len(), 0, "{started}");
    still_serves(&f);
}

/// The pid of a child of `parent` (the run worker), within `wait`.
fn find_worker(parent: u32, wait: Duration) -> Option<u32> {
    let t = Instant::now();
    while t.elapsed() < wait {
        for e in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                continue;
            };
            // pid (comm) state ppid …: the comm may hold spaces, the last ')' ends it.
            let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
            let ppid: Option<u32> = rest.split_whitespace().nth(1).and_then(|p| p.parse().ok());
            if ppid == Some(parent) {
                // Wait until it is confined (it has said it is ready once seccomp is on).
                let confined = std::fs::read_to_string(format!("/proc/{pid}/status"))
                    .map(|s| {
                        s.lines()
                            .any(|l| l.starts_with("Seccomp:") && l.ends_with('2'))
                    })
                    .unwrap_or(false);
                if confined {
                    return Some(pid);
                }
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

#[test]
fn sparql_that_outgrows_its_limits_is_stopped() {
    let f = station();
    let b = hostile(&f, "sparql", &[], 64, 2);
    // A cartesian product of five triple patterns, sorted: far more rows than memory.
    let query = "SELECT ?a ?b ?c ?d ?e WHERE { ?a ?p1 ?x . ?b ?p2 ?y . ?c ?p3 ?z . ?d ?p4 ?w . ?e ?p5 ?v } ORDER BY ?x ?y ?z ?w ?v";
    let params = serde_json::json!({"do": "select", "query": query}).to_string();
    // First line: the query guard counts what would be sorted, streaming, and refuses it.
    let (out, elapsed) = timed(&f, &b, &params);
    stopped(&f, &out, &["failed"]);
    let call = f.last_call_outcome("limit-exceeded");
    assert!(
        call["outcome"].as_str().unwrap().contains("ORDER BY"),
        "{call}"
    );
    assert!(elapsed < Duration::from_secs(4), "busy for {elapsed:?}");

    // Second line: with the guard's limit lifted, the query's own time limit stops it (the
    // guard checks the deadline on every row, where oxigraph does not).
    f.policy_edit(
        "max_intermediate_rows = 1000000",
        "max_intermediate_rows = 1000000000000",
    );
    f.policy_edit("timeout_ms = 10000", "timeout_ms = 500");
    let b = hostile(&f, "sparql-long", &[], 64, 30);
    let (out, elapsed) = timed(&f, &b, &params);
    stopped(&f, &out, &["failed"]);
    let call = f.last_call_outcome("limit-exceeded");
    assert!(
        call["outcome"].as_str().unwrap().contains("500 ms"),
        "{call}"
    );
    assert!(elapsed < Duration::from_secs(4), "busy for {elapsed:?}");

    // The backstop: with no query limit left, the worker is killed at the run's deadline.
    f.policy_edit("timeout_ms = 500", "timeout_ms = 3600000");
    let (out, elapsed) = timed(&f, &hostile(&f, "sparql-short", &[], 64, 2), &params);
    stopped(&f, &out, &["memory-limit", "wall-clock-exceeded"]);
    assert!(elapsed < Duration::from_secs(4), "busy for {elapsed:?}");
    // The call it was in is on record, marked interrupted.
    let call = f.last_event("capability-call");
    assert_eq!(call["call"], "select", "{call}");
    assert!(
        call["outcome"].as_str().unwrap().starts_with("interrupted"),
        "{call}"
    );
    still_serves(&f);
}

#[test]
fn onnx_runtime_past_the_time_limit_is_stopped() {
    if !kernels_ready() {
        return;
    }
    let f = station();
    // Session creation: ONNX Runtime folds 400 functions of a million values while it loads
    // the model (seconds, and a gigabyte and more kept).
    let b = hostile(
        &f,
        "fold",
        &[("models/fold.onnx", fold_bomb(1 << 20, 400))],
        1024,
        1,
    );
    let (out, elapsed) = timed(&f, &b, r#"{"do": "open", "model": "models/fold.onnx"}"#);
    let e = stopped(&f, &out, &["wall-clock-exceeded", "memory-limit"]);
    assert!(
        elapsed < Duration::from_secs(3),
        "busy for {elapsed:?}: {e}"
    );
    // Run: one 8192 x 8192 matrix product (a teraflop), a single node that ONNX Runtime's
    // terminate flag cannot interrupt: only the kill at the deadline stops it.
    let b = hostile(
        &f,
        "matmul",
        &[("models/matmul.onnx", run_bomb(8192, 8192, true))],
        1024,
        1,
    );
    let (out, elapsed) = timed(
        &f,
        &b,
        r#"{"do": "infer", "model": "models/matmul.onnx", "input": "x", "shape": [1, 1]}"#,
    );
    let e = stopped(&f, &out, &["wall-clock-exceeded"]);
    assert!(
        elapsed < Duration::from_secs(3),
        "busy for {elapsed:?}: {e}"
    );
    let call = f.last_event("capability-call");
    assert_eq!(call["call"], "model.infer", "{call}");
    still_serves(&f);
}

#[test]
fn allocations_inside_onnx_runtime_count_against_the_run() {
    if !kernels_ready() {
        return;
    }
    let f = station();
    // 2 GiB of floats at Run, and 1 GiB folded while the session is created, from a 64 MiB run.
    let b = hostile(
        &f,
        "alloc",
        &[
            ("models/alloc.onnx", run_bomb(32768, 16384, false)),
            ("models/fold-alloc.onnx", fold_bomb(1 << 28, 1)),
        ],
        64,
        20,
    );
    // Folding the gigabyte at session creation fails inside ONNX Runtime, which then keeps
    // the node unfolded: the model opens, within the run's memory.
    let out = f.run(
        &b,
        Some(r#"{"do": "open", "model": "models/fold-alloc.onnx"}"#),
    );
    assert!(out.ok, "{}", out.text());
    let e = f.last_event("run-finished");
    let limit = f.last_event("worker-started")["memory_limit_bytes"]
        .as_u64()
        .unwrap();
    assert!(e["peak_memory_bytes"].as_u64().unwrap() < limit, "{e}");
    for p in f.released() {
        std::fs::remove_file(p).unwrap();
    }
    for params in [
        r#"{"do": "infer", "model": "models/alloc.onnx", "input": "x", "shape": [1, 1]}"#,
        r#"{"do": "infer", "model": "models/fold-alloc.onnx", "input": "x", "shape": [1, 1]}"#,
    ] {
        let (out, elapsed) = timed(&f, &b, params);
        let e = stopped(&f, &out, &["memory-limit"]);
        assert!(
            elapsed < Duration::from_secs(10),
            "busy for {elapsed:?}: {e}"
        );
        // The audited peak is the worker's real resident set, not a guess, and it stayed
        // under the worker's limit.
        let started = f.last_event("worker-started");
        let limit = started["memory_limit_bytes"].as_u64().unwrap();
        let peak = e["peak_memory_bytes"].as_u64().unwrap();
        assert!(
            peak > 1 << 20 && peak <= limit,
            "peak {peak}, limit {limit}: {e}"
        );
    }
    still_serves(&f);
}

#[test]
fn models_that_name_external_data_are_refused_before_anything_runs() {
    let f = station();
    let key = f.station().join("station.key");
    for (i, location) in [
        key.to_string_lossy().to_string(),
        "../../station.key".into(),
        "../station.key".into(),
        "station.key".into(),
        "policy.toml".into(),
        "/proc/self/environ".into(),
    ]
    .iter()
    .enumerate()
    {
        let b = hostile(
            &f,
            &format!("external-{i}"),
            &[("models/m.onnx", external(location))],
            64,
            5,
        );
        let out = f.run(
            &b,
            Some(r#"{"do": "infer", "model": "models/m.onnx", "input": "x", "shape": [1, 1]}"#),
        );
        assert!(!out.ok, "{}", out.text());
        let e = f.last_event("train-refused");
        assert_eq!(e["stage"], "models", "{e}");
        assert!(
            e["reason"].as_str().unwrap().contains("external data"),
            "{e}"
        );
        assert!(f.released().is_empty());
    }
    f.audit_verifies();
    still_serves(&f);
}

#[test]
fn series_that_are_paths_reach_no_file() {
    let f = station();
    let b = hostile(&f, "paths", &[], 64, 5);
    let key = f.station().join("station.key");
    for series in [
        key.to_string_lossy().to_string(),
        "../st1/station.key".into(),
        "/etc/passwd".into(),
        "p0001/ct/0001.dcm".into(),
        "index/graph.nq".into(),
    ] {
        let params = serde_json::json!({"do": "load-series", "series": series}).to_string();
        let out = f.run(&b, Some(&params));
        assert!(!out.ok, "{}", out.text());
        let call = f.last_call_outcome("invalid-argument");
        assert!(
            call["outcome"].as_str().unwrap().contains("series"),
            "{call}"
        );
        assert!(f.released().is_empty());
    }
    f.audit_verifies();
}

fn leb(mut n: u64, out: &mut Vec<u8>) {
    loop {
        let b = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            out.push(b);
            return;
        }
        out.push(b | 0x80);
    }
}

fn section(id: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![id];
    leb(content.len() as u64, &mut out);
    out.extend_from_slice(content);
    out
}

/// A core module of one function that pushes `n` constants and adds them up: valid, unused,
/// and slow and large to compile.
fn heavy_module(n: usize) -> Vec<u8> {
    let mut body = vec![0u8]; // no locals
    for i in 0..n {
        body.push(0x41); // i32.const
        body.push((i % 64) as u8);
    }
    body.extend(std::iter::repeat_n(0x6a, n - 1)); // i32.add
    body.push(0x0b);
    let mut code = Vec::new();
    leb(1, &mut code);
    leb(body.len() as u64, &mut code);
    code.extend_from_slice(&body);
    [
        b"\0asm\x01\0\0\0".to_vec(),
        section(1, &[1, 0x60, 0, 1, 0x7f]),
        section(3, &[1, 0]),
        section(10, &code),
    ]
    .concat()
}

#[test]
fn compiling_a_component_is_confined_and_bounded() {
    let f = station();
    let built = Bundle::read(&common::bundle("testing/host-hog")).unwrap();
    // The train's component with an unused core module appended (component section 1).
    let mut component = built.component().to_vec();
    component.extend(section(1, &heavy_module(1_000_000)));
    let mut files = vec![(COMPONENT_PATH.to_string(), component)];
    for m in &built.manifest().models {
        files.push((m.file.clone(), built.file(&m.file).unwrap().to_vec()));
    }
    let b = Bundle::create(built.manifest().clone(), files).unwrap();
    let path = f.path("heavy.train");
    b.write(&path).unwrap();
    ok(&["train", "sign", s(&path), "--key", s(&f.path("alice.key"))]);
    f.approve(&path);
    // Time: the compile worker is stopped at the policy's compile time.
    f.policy_edit("compile_seconds = 60", "compile_seconds = 1");
    let (out, elapsed) = timed(&f, &path, r#"{"do": "sleep", "seconds": 0}"#);
    assert!(!out.ok, "{}", out.text());
    let e = f.last_event("train-refused");
    assert_eq!(e["stage"], "component", "{e}");
    assert!(
        e["reason"].as_str().unwrap().contains("compile_seconds"),
        "{e}"
    );
    assert!(elapsed < Duration::from_secs(4), "busy for {elapsed:?}");
    assert!(!f.events().iter().any(|e| e["event"] == "run-started"));
    // Memory: the compiler's allocations count against the policy's compile memory.
    f.policy_edit("compile_seconds = 1", "compile_seconds = 60");
    f.policy_edit("compile_memory_mib = 1024", "compile_memory_mib = 64");
    let (out, elapsed) = timed(&f, &path, r#"{"do": "sleep", "seconds": 0}"#);
    assert!(!out.ok, "{}", out.text());
    let e = f.last_event("train-refused");
    assert_eq!(e["stage"], "component", "{e}");
    assert!(
        e["reason"].as_str().unwrap().contains("compile_memory_mib"),
        "{e}"
    );
    assert!(elapsed < Duration::from_secs(10), "busy for {elapsed:?}");
    // Size: a component over the policy's cap is refused before anything compiles it.
    f.policy_edit("max_component_mib = 64", "max_component_mib = 1");
    let (out, _) = timed(&f, &path, r#"{"do": "sleep", "seconds": 0}"#);
    assert!(!out.ok, "{}", out.text());
    let e = f.last_event("train-refused");
    assert!(
        e["reason"].as_str().unwrap().contains("max_component_mib"),
        "{e}"
    );
    f.policy_edit("compile_memory_mib = 64", "compile_memory_mib = 1024");
    f.policy_edit("max_component_mib = 1", "max_component_mib = 64");
    f.audit_verifies();
    still_serves(&f);
}
