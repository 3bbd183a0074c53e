//! End-to-end tests of the `amicus` command: real keys, real WebAssembly trains built with
//! cargo, a real station directory. Every refusal must fail the command, say why, leave an
//! audit entry, release nothing, and keep the audit log verifiable.

mod common;

use common::*;

fn assert_refused(f: &Fixture, out: &Out, stage: &str, needle: &str) {
    assert!(
        out.stderr.contains(needle),
        "expected {needle:?} in:\n{}",
        out.text()
    );
    let e = f.last_event("train-refused");
    assert_eq!(e["stage"], stage, "{e}");
    assert!(e["reason"].as_str().unwrap().contains(needle), "{e}");
    assert!(f.released().is_empty(), "something was released");
    f.audit_verifies();
}

fn assert_run_failed(f: &Fixture, out: &Out, outcome: &str, needle: &str) {
    assert!(!out.ok, "run should fail:\n{}", out.text());
    assert!(
        out.stderr.contains("nothing was released"),
        "{}",
        out.text()
    );
    let e = f.last_event("run-finished");
    assert_eq!(e["outcome"], outcome, "{e}");
    assert!(
        e["reason"].as_str().unwrap_or("").contains(needle),
        "expected {needle:?} in {e}"
    );
    assert_eq!(e["outputs_released"], 0);
    assert!(f.released().is_empty(), "something was released");
    assert!(
        !f.events().iter().any(|e| e["event"] == "output-released"),
        "an output-released entry exists"
    );
    f.audit_verifies();
}

#[test]
fn round_trip_keygen_build_sign_verify_approve_run_audit() {
    let f = Fixture::new();
    let key_mode = {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(f.path("alice.key"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(key_mode, 0o600);
    assert!(
        std::fs::read_to_string(f.path("alice.pub"))
            .unwrap()
            .starts_with("-----BEGIN PUBLIC KEY-----")
    );

    let b = f.signed("cohort-stats", &["alice", "bob"]);
    let out = ok(&[
        "train",
        "verify",
        s(&b),
        "--trust",
        s(&f.path("alice.pub")),
        "--trust",
        s(&f.path("bob.pub")),
        "--require",
        "2",
    ]);
    assert!(out.stdout.contains("verified: 2 of 2"), "{}", out.text());

    let inspect = ok(&["train", "inspect", s(&b), "--json"]);
    let v: serde_json::Value = serde_json::from_str(&inspect.stdout).unwrap();
    assert_eq!(v["manifest"]["train"]["name"], "cohort-stats");
    assert_eq!(v["manifest"]["capabilities"][0], "cohort");
    assert_eq!(v["signatures"].as_array().unwrap().len(), 2);
    let digest = v["digest"].as_str().unwrap().to_string();

    ok(&["station", "approve", "--dir", s(&f.station()), &digest]);
    let out = f.run(&b, Some(r#"{"tables": ["modality", "roi"]}"#));
    assert!(out.ok, "{}", out.text());
    assert!(
        out.stdout.contains("released summary.json"),
        "{}",
        out.stdout
    );

    let released = f.released();
    assert_eq!(released.len(), 1);
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&released[0]).unwrap()).unwrap();
    assert_eq!(summary["requested"], serde_json::json!(["modality", "roi"]));
    assert_eq!(summary["index"]["state"], "unavailable");
    assert!(
        summary["index"]["reason"]
            .as_str()
            .unwrap()
            .contains("not available on this station")
    );

    let kinds: Vec<String> = f
        .events()
        .iter()
        .map(|e| e["event"].as_str().unwrap().to_string())
        .collect();
    for k in [
        "station-initialised",
        "signer-trusted",
        "digest-approved",
        "train-received",
        "run-started",
        "capability-call",
        "output-released",
        "run-finished",
    ] {
        assert!(kinds.contains(&k.to_string()), "no {k} in {kinds:?}");
    }
    let call = f.last_event("capability-call");
    assert_eq!(call["capability"], "cohort");
    assert_eq!(call["outcome"], "not-available");
    let fin = f.last_event("run-finished");
    assert_eq!(fin["outcome"], "succeeded");
    assert!(fin["fuel_used"].as_u64().unwrap() > 0);
    assert!(fin["peak_memory_bytes"].as_u64().unwrap() > 0);
    let rel = f.last_event("output-released");
    assert_eq!(rel["name"], "summary.json");
    assert_eq!(
        rel["sha256"].as_str().unwrap(),
        amicus_bundle::sha256(&std::fs::read(&released[0]).unwrap()).to_hex()
    );
    let verify = ok(&["audit", "verify", "--dir", s(&f.station())]);
    assert!(verify.stdout.contains("audit log OK"));

    // A second run loads the station's cached compilation.
    let again = f.run(&b, None);
    assert!(
        again.ok && again.stdout.contains("module from cache"),
        "{}",
        again.text()
    );
}

#[test]
fn unsigned_bundle_is_refused() {
    let f = Fixture::new();
    let b = f.signed("cohort-stats", &[]);
    f.approve(&b);
    let out = f.run(&b, None);
    assert!(!out.ok);
    assert_refused(&f, &out, "signatures", "unsigned");
    fails(&["train", "verify", s(&b), "--trust", s(&f.path("alice.pub"))]);
}

#[test]
fn untrusted_signer_is_refused() {
    let f = Fixture::new();
    let b = f.signed("cohort-stats", &["mallory"]);
    f.approve(&b);
    let out = f.run(&b, None);
    assert_refused(&f, &out, "signatures", "not trusted");
    let v = fails(&["train", "verify", s(&b), "--trust", s(&f.path("alice.pub"))]);
    assert!(v.text().contains("(untrusted)"), "{}", v.text());
}

#[test]
fn too_few_signatures_are_refused() {
    let f = Fixture::new();
    ok(&[
        "station",
        "trust",
        "--dir",
        s(&f.station()),
        s(&f.path("bob.pub")),
    ]);
    f.policy_edit("required_signatures = 1", "required_signatures = 2");
    let b = f.ready("cohort-stats");
    let out = f.run(&b, None);
    assert_refused(
        &f,
        &out,
        "signatures",
        "1 valid signature(s) from trusted keys, 2 required",
    );
    fails(&[
        "train",
        "verify",
        s(&b),
        "--trust",
        s(&f.path("alice.pub")),
        "--trust",
        s(&f.path("bob.pub")),
        "--require",
        "2",
    ]);
    // The reviewer's signature completes it.
    ok(&[
        "train",
        "sign",
        s(&b),
        "--key",
        s(&f.path("bob.key")),
        "--role",
        "reviewer",
    ]);
    let out = f.run(&b, None);
    assert!(out.ok, "{}", out.text());
}

/// Position of `needle` inside the bundle file.
fn find(data: &[u8], needle: &[u8]) -> usize {
    data.windows(needle.len())
        .position(|w| w == needle)
        .expect("needle in bundle")
}

#[test]
fn component_byte_changed_after_signing_is_refused() {
    let f = Fixture::new();
    let b = f.ready("cohort-stats");
    let mut data = std::fs::read(&b).unwrap();
    // The component's data follows its 512-byte tar header; flip a byte well inside it.
    let header = find(&data, b"train.wasm\0");
    data[header + 512 + 2000] ^= 0x01;
    std::fs::write(&b, &data).unwrap();
    let out = f.run(&b, None);
    assert_refused(&f, &out, "bundle", "does not match the manifest");
    let e = f.last_event("train-refused");
    assert!(e["digest"].is_null());
}

#[test]
fn manifest_byte_changed_after_signing_is_refused() {
    let f = Fixture::new();
    let b = f.ready("cohort-stats");
    let mut data = std::fs::read(&b).unwrap();
    // Same length, still canonical TOML: a bigger memory limit. The digest changes, so the
    // signature (over the old digest) no longer vouches for it.
    let at = find(&data, b"memory_mib = 64");
    data[at + 13] = b'9';
    // Fix the tar header checksum so only the content change is what gets caught.
    fix_tar_checksum(&mut data, 0);
    std::fs::write(&b, &data).unwrap();
    let out = f.run(&b, None);
    assert!(!out.ok, "{}", out.text());
    assert_refused(&f, &out, "signatures", "not this bundle");
}

fn fix_tar_checksum(data: &mut [u8], header: usize) {
    let h = &mut data[header..header + 512];
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    let text = format!("{sum:06o}\0 ");
    h[148..156].copy_from_slice(text.as_bytes());
}

#[test]
fn unapproved_digest_is_refused() {
    let f = Fixture::new();
    let b = f.signed("cohort-stats", &["alice"]);
    let out = f.run(&b, None);
    assert_refused(&f, &out, "approval", "not approved by the data owner");
}

#[test]
fn capability_not_allowed_is_refused() {
    let f = Fixture::new();
    let b = f.ready("testing/misbehave"); // declares imaging; the default policy grants cohort
    let out = f.run(&b, Some(r#"{"do":"ok"}"#));
    assert_refused(
        &f,
        &out,
        "capabilities",
        "capability imaging is not allowed",
    );
}

#[test]
fn limits_above_the_station_caps_are_refused() {
    let f = Fixture::new();
    f.policy_edit("memory_mib = 1024", "memory_mib = 16");
    let b = f.ready("cohort-stats");
    let out = f.run(&b, None);
    assert_refused(
        &f,
        &out,
        "limits",
        "memory_mib 64, this station allows at most 16",
    );
}

#[test]
fn bad_params_are_refused() {
    let f = Fixture::new();
    let b = f.ready("cohort-stats");
    let out = f.run(&b, Some("{not json"));
    assert_refused(&f, &out, "params", "not JSON");
}

#[test]
fn file_access_through_wasi_is_refused_before_running() {
    let f = Fixture::new();
    let b = f.ready("testing/fs-escape");
    let out = f.run(&b, None);
    assert_refused(&f, &out, "imports", "wasi:filesystem/");
    assert!(!f.events().iter().any(|e| e["event"] == "run-started"));
}

#[test]
fn socket_access_through_wasi_is_refused_before_running() {
    let f = Fixture::new();
    let b = f.ready("testing/net-escape");
    let out = f.run(&b, None);
    assert_refused(&f, &out, "imports", "wasi:sockets/");
}

#[test]
fn foreign_import_is_refused() {
    let f = Fixture::new();
    let b = f.ready("testing/foreign-import");
    let out = f.run(&b, None);
    assert_refused(&f, &out, "imports", "evil:exfil/upload@1.0.0");
}

/// The misbehave train with imaging granted, so each behaviour gets to run.
fn misbehaving() -> (Fixture, std::path::PathBuf) {
    let f = Fixture::new();
    f.policy_edit(
        "allowed_capabilities = [\"cohort\"]",
        "allowed_capabilities = [\"cohort\", \"imaging\"]",
    );
    let b = f.ready("testing/misbehave");
    (f, b)
}

#[test]
fn misbehave_ok_run_releases_its_output() {
    let (f, b) = misbehaving();
    let out = f.run(&b, Some(r#"{"do":"ok"}"#));
    assert!(out.ok, "{}", out.text());
    assert_eq!(f.released().len(), 1);
}

#[test]
fn infinite_loop_is_stopped_by_fuel() {
    let (f, b) = misbehaving();
    let out = f.run(&b, Some(r#"{"do":"loop"}"#));
    assert_run_failed(&f, &out, "out-of-fuel", "fuel exhausted");
    assert_eq!(f.last_event("run-finished")["fuel_used"], 500_000_000);
}

#[test]
fn memory_bomb_is_stopped_by_the_limiter() {
    let (f, b) = misbehaving();
    let out = f.run(&b, Some(r#"{"do":"alloc"}"#));
    assert_run_failed(&f, &out, "memory-limit", "refused (limit 33554432 bytes)");
    // The audited peak is the worker's resident set: the 32 MiB of linear memory the budget
    // allowed, and the runtime around it, under the worker's operating-system limit.
    let peak = f.last_event("run-finished")["peak_memory_bytes"]
        .as_u64()
        .unwrap();
    let limit = f.last_event("worker-started")["memory_limit_bytes"]
        .as_u64()
        .unwrap();
    assert!(
        peak >= 32 << 20 && peak <= limit,
        "peak {peak}, limit {limit}"
    );
    let record: serde_json::Value = serde_json::from_slice(
        &std::fs::read(
            f.station()
                .join("runs")
                .join(f.last_event("run-finished")["run_id"].as_str().unwrap())
                .join("run.json"),
        )
        .unwrap(),
    )
    .unwrap();
    assert!(
        record["budget_peak_bytes"].as_u64().unwrap() <= 32 << 20,
        "{record}"
    );
}

#[test]
fn host_tensor_bomb_counts_against_the_memory_limit() {
    let (f, b) = misbehaving();
    let out = f.run(&b, Some(r#"{"do":"tensor-bomb"}"#));
    assert_run_failed(&f, &out, "failed", "memory limit");
}

#[test]
fn undeclared_output_fails_the_run() {
    let (f, b) = misbehaving();
    let out = f.run(&b, Some(r#"{"do":"undeclared"}"#));
    assert_run_failed(
        &f,
        &out,
        "policy-violation",
        "\"secret.bin\" is not declared",
    );
}

#[test]
fn oversized_output_fails_the_run() {
    let (f, b) = misbehaving();
    let out = f.run(&b, Some(r#"{"do":"oversized"}"#));
    assert_run_failed(
        &f,
        &out,
        "policy-violation",
        "4096 bytes, its limit is 1024",
    );
}

#[test]
fn output_emitted_twice_fails_the_run() {
    let (f, b) = misbehaving();
    let out = f.run(&b, Some(r#"{"do":"twice"}"#));
    assert_run_failed(&f, &out, "policy-violation", "emitted twice");
}

#[test]
fn outputs_of_a_failed_run_are_not_released() {
    let (f, b) = misbehaving();
    let out = f.run(&b, Some(r#"{"do":"emit-then-fail"}"#));
    assert_run_failed(&f, &out, "failed", "failed after emitting");
}

#[test]
fn guest_panic_is_a_clean_failure() {
    let (f, b) = misbehaving();
    let out = f.run(&b, Some(r#"{"do":"panic"}"#));
    assert_run_failed(&f, &out, "trapped", "deliberate panic in a train");
}

#[test]
fn unavailable_capability_fails_cleanly_inside_the_train() {
    let (f, b) = misbehaving();
    let out = f.run(&b, Some(r#"{"do":"imaging"}"#));
    assert_run_failed(&f, &out, "failed", "not available on this station");
    let call = f.last_event("capability-call");
    assert_eq!(call["capability"], "imaging");
    assert_eq!(call["call"], "load-series");
}

#[test]
fn log_and_stdout_floods_are_capped() {
    let (f, b) = misbehaving();
    f.policy_edit("max_log_bytes = 1048576", "max_log_bytes = 10000");
    for what in ["log-flood", "stdout-flood"] {
        let out = f.run(&b, Some(&format!(r#"{{"do":"{what}"}}"#)));
        assert!(out.ok, "{what}: {}", out.text());
        let fin = f.last_event("run-finished");
        let log = f
            .station()
            .join("runs")
            .join(fin["run_id"].as_str().unwrap())
            .join("log.txt");
        let len = std::fs::metadata(log).unwrap().len();
        assert!(len < 20_000, "{what}: log is {len} bytes");
    }
}

#[test]
fn audit_tampering_is_detected_and_named() {
    let f = Fixture::new();
    let b = f.ready("cohort-stats");
    assert!(f.run(&b, None).ok);
    let log_path = f.station().join("audit.log");
    let original = std::fs::read_to_string(&log_path).unwrap();
    let lines: Vec<&str> = original.lines().collect();
    assert!(lines.len() >= 8);
    let check = |text: String, needle: &str| {
        std::fs::write(&log_path, text).unwrap();
        let out = fails(&["audit", "verify", "--dir", s(&f.station())]);
        assert!(
            out.stderr.contains(needle),
            "expected {needle:?}:\n{}",
            out.text()
        );
        std::fs::write(&log_path, &original).unwrap();
    };
    let join = |l: Vec<&str>| l.join("\n") + "\n";
    // Edit: change the approved train name inside entry 3.
    check(
        original.replacen("cohort-stats@0.1.0", "cohort-stats@0.1.1", 1),
        "line 3 (expected seq 2)",
    );
    let mut deleted = lines.clone();
    deleted.remove(4);
    check(join(deleted), "line 5 (expected seq 4)");
    let mut reordered = lines.clone();
    reordered.swap(5, 6);
    check(join(reordered), "line 6 (expected seq 5)");
    let mut truncated = lines.clone();
    truncated.truncate(lines.len() - 2);
    check(join(truncated), "log truncated");
    // A torn last line (crash mid-write) is reported but earlier entries stay valid.
    std::fs::write(&log_path, format!("{original}{{\"entry\":{{\"seq\"")).unwrap();
    let out = ok(&["audit", "verify", "--dir", s(&f.station())]);
    assert!(out.stdout.contains("torn last line"), "{}", out.text());
}

#[test]
fn keys_interoperate_with_openssl() {
    if std::process::Command::new("openssl")
        .arg("version")
        .output()
        .is_err()
    {
        eprintln!("openssl not installed; skipping the interoperability check");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let key = tmp.path().join("k.key");
    ok(&["keygen", "--out", s(&key)]);
    let derived = std::process::Command::new("openssl")
        .args(["pkey", "-pubout", "-in", s(&key)])
        .output()
        .unwrap();
    assert!(
        derived.status.success(),
        "{}",
        String::from_utf8_lossy(&derived.stderr)
    );
    assert_eq!(
        String::from_utf8(derived.stdout).unwrap(),
        std::fs::read_to_string(tmp.path().join("k.pub")).unwrap()
    );
}

/// The PROV-O export read back by an independent RDF library (rdflib) and queried with SPARQL:
/// the run used the bundle, produced the output with its hash, and a refusal is recorded.
#[test]
fn audit_export_is_prov_o_that_rdflib_can_query() {
    let f = Fixture::new();
    let unsigned = f.signed("cohort-stats", &[]);
    assert!(!f.run(&unsigned, None).ok);
    let b = f.ready("cohort-stats");
    assert!(f.run(&b, None).ok);
    let digest = f.last_event("train-received")["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let out_bytes = f.last_event("output-released")["bytes"].as_u64().unwrap();
    let ttl = f.path("audit.ttl");
    ok(&[
        "audit",
        "export",
        "--dir",
        s(&f.station()),
        "--out",
        s(&ttl),
    ]);
    let text = std::fs::read_to_string(&ttl).unwrap();
    assert!(
        !text.contains("SELECT"),
        "train-supplied query text must not be exported"
    );
    // No capability call and no output hash leaves (the output is the researcher's; a hash
    // would let whoever holds the export confirm a guess of it).
    assert!(!text.contains("CapabilityCall"), "{text}");
    let out_sha = f.last_event("output-released")["sha256"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(!text.contains(&out_sha), "{text}");

    let Some(py) = python() else {
        assert!(
            std::env::var_os("CI").is_none(),
            "rdflib venv missing under CI: run scripts/setup.sh"
        );
        eprintln!("rdflib venv missing: run scripts/setup.sh; skipping the rdflib half");
        return;
    };
    let script = format!(
        r#"
import sys, rdflib
g = rdflib.Graph(); g.parse(sys.argv[1], format="turtle")
q = '''
PREFIX prov: <http://www.w3.org/ns/prov#>
PREFIX au: <urn:amicus:audit:>
SELECT ?outcome ?bytes WHERE {{
  ?run a au:Run ; prov:used <urn:amicus:train:{digest}> ; au:outcome ?outcome .
  ?out prov:wasGeneratedBy ?run ; au:bytes ?bytes .
}}'''
rows = [(str(a), str(b)) for a, b in g.query(q)]
refusals = list(g.query('PREFIX au: <urn:amicus:audit:> SELECT ?s WHERE {{ ?r a au:Refusal ; au:stage ?s }}'))
print(rows, [str(r[0]) for r in refusals])
assert rows == [("succeeded", "{out_bytes}")], rows
assert [str(r[0]) for r in refusals] == ["signatures"], refusals
"#
    );
    let check = std::process::Command::new(py)
        .arg("-c")
        .arg(script)
        .arg(&ttl)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );

    // A log that does not verify is not exported.
    let log = f.station().join("audit.log");
    let original = std::fs::read_to_string(&log).unwrap();
    std::fs::write(&log, original.replacen("\"seq\":1", "\"seq\":7", 1)).unwrap();
    let out = fails(&["audit", "export", "--dir", s(&f.station())]);
    assert!(out.stderr.contains("does not verify"), "{}", out.text());
}

#[test]
fn a_run_interrupted_by_a_crash_is_recovered_and_audited() {
    let f = Fixture::new();
    let b = f.ready("cohort-stats");
    // What a station killed mid-run leaves: a partial run directory the log never saw finish.
    let id = "20990101T000000Z-deadbeef";
    let partial = f.station().join("runs").join(format!(".partial-{id}"));
    std::fs::create_dir_all(partial.join("outputs")).unwrap();
    std::fs::write(partial.join("outputs/summary.json"), b"{}").unwrap();
    assert!(f.run(&b, None).ok);
    let recovered = f.station().join("runs").join(id);
    assert!(recovered.join("RECOVERED.txt").is_file());
    assert!(
        recovered.join("outputs/summary.json").is_file(),
        "files are never deleted"
    );
    assert!(!partial.exists());
    let e = f
        .events()
        .into_iter()
        .find(|e| e["event"] == "run-finished" && e["run_id"] == id)
        .expect("the interrupted run is audited");
    assert_eq!(e["outcome"], "interrupted");
    assert_eq!(e["outputs_released"], 0);
    f.audit_verifies();
}

#[test]
fn an_oversized_bundle_is_refused_and_audited_without_reading_it_into_memory() {
    let f = Fixture::new();
    let big = f.path("huge.train");
    let file = std::fs::File::create(&big).unwrap();
    file.set_len((1 << 30) + 1).unwrap(); // sparse: costs no disk
    drop(file);
    let out = f.run(&big, None);
    assert_refused(&f, &out, "bundle", "larger than 1073741824 bytes");
    assert!(f.last_event("train-refused")["bundle_sha256"].is_string());
}

#[test]
fn train_inspect_escapes_bundle_text_and_shows_what_matters_first() {
    let f = Fixture::new();
    let built = amicus_bundle::Bundle::read(&common::bundle("testing/host-hog")).unwrap();
    let mut m = built.manifest().clone();
    // A description that tries to forge a line, hide the next ones and reorder text.
    m.train.description = "harmless\ncapabilities  (none)\u{1b}[8m\u{202e}".into();
    m.train.authors = vec!["Eve \u{1b}]0;title\u{7}".into()];
    let mut files = vec![(
        amicus_bundle::manifest::COMPONENT_PATH.to_string(),
        built.component().to_vec(),
    )];
    for model in &m.models {
        files.push((
            model.file.clone(),
            built.file(&model.file).unwrap().to_vec(),
        ));
    }
    let b = amicus_bundle::Bundle::create(m, files).unwrap();
    let path = f.path("forged.train");
    b.write(&path).unwrap();
    let out = ok(&["train", "inspect", s(&path)]);
    assert!(!out.stdout.contains('\u{1b}'), "{}", out.stdout);
    assert!(!out.stdout.contains('\u{202e}'), "{}", out.stdout);
    assert!(!out.stdout.contains('\u{7}'), "{}", out.stdout);
    let lines: Vec<&str> = out.stdout.lines().collect();
    let caps: Vec<&&str> = lines
        .iter()
        .filter(|l| l.starts_with("capabilities"))
        .collect();
    assert_eq!(caps.len(), 1, "{}", out.stdout);
    assert!(
        caps[0].contains("cohort, imaging, kernels"),
        "{}",
        out.stdout
    );
    let at = |p: &str| lines.iter().position(|l| l.starts_with(p)).unwrap();
    assert!(at("capabilities") < at("description"), "{}", out.stdout);
    assert!(at("output") < at("description"), "{}", out.stdout);
    // The station's review of a held run and the errors it prints are escaped too.
    let out = f.run(&path, None);
    assert!(!out.stderr.contains('\u{1b}'), "{}", out.stderr);
}

#[test]
fn an_approval_binds_the_parameters_runs_may_take() {
    let f = Fixture::new();
    let b = f.signed("cohort-stats", &["alice"]);
    let digest = f.run(&b, None);
    assert!(!digest.ok);
    let dir = f.station();
    // The default scope: parameters that match the schema the train declares.
    ok(&["station", "approve", "--dir", s(&dir), s(&b)]);
    assert_eq!(f.last_event("digest-approved")["scope"], "schema");
    let admitted = |params: &str| {
        let out = f.run(&b, Some(params));
        let refused = f
            .events()
            .last()
            .is_some_and(|e| e["event"] == "train-refused");
        (out, !refused)
    };
    let (_, yes) = admitted(r#"{"tables": ["modality"]}"#);
    assert!(yes);
    assert_eq!(f.last_event("run-started")["approval"], "schema");
    for bad in [
        r#"{"tables": ["age"]}"#,
        r#"{"patient": "4f2a"}"#,
        r#"{"tables": "modality"}"#,
    ] {
        let (out, yes) = admitted(bad);
        assert!(!yes, "{bad} ran:\n{}", out.text());
        let e = f.last_event("train-refused");
        assert_eq!(e["stage"], "params", "{e}");
        assert!(e["reason"].as_str().unwrap().contains("schema"), "{e}");
    }
    // Exactly these parameters.
    let p1 = f.path("p1.json");
    std::fs::write(&p1, r#"{"tables": ["roi"]}"#).unwrap();
    ok(&[
        "station",
        "approve",
        "--dir",
        s(&dir),
        s(&b),
        "--scope",
        "exact",
        "--params",
        s(&p1),
    ]);
    assert_eq!(f.last_event("digest-approved")["scope"], "exact");
    let (_, yes) = admitted(r#"{"tables": ["roi"]}"#);
    assert!(yes);
    assert_eq!(f.last_event("run-started")["approval"], "exact");
    let (_, yes) = admitted(r#"{"tables": ["modality"]}"#);
    assert!(!yes, "other parameters than the approved ones ran");
    assert_eq!(f.last_event("train-refused")["stage"], "approval");
    // Any parameters, when the data owner says so.
    ok(&[
        "station",
        "approve",
        "--dir",
        s(&dir),
        s(&b),
        "--scope",
        "any",
    ]);
    let (_, yes) = admitted(r#"{"anything": true}"#);
    assert!(yes);
    assert_eq!(f.last_event("run-started")["approval"], "any");
    // Bad requests of the command itself.
    fails(&[
        "station",
        "approve",
        "--dir",
        s(&dir),
        s(&b),
        "--scope",
        "exact",
    ]);
    fails(&[
        "station",
        "approve",
        "--dir",
        s(&dir),
        s(&b),
        "--scope",
        "maybe",
    ]);
    f.audit_verifies();
}

#[test]
fn held_outputs_wait_for_the_data_owners_decision() {
    let f = Fixture::new();
    f.policy_edit("hold_for_release = false", "hold_for_release = true");
    let b = f.ready("cohort-stats");
    let dir = f.station();
    let run = |f: &Fixture| {
        let out = f.run(&b, Some("{}"));
        assert!(out.ok, "{}", out.text());
        assert!(
            out.stdout.contains("holds this run's outputs"),
            "{}",
            out.stdout
        );
        let held = ok(&["station", "held", "--dir", s(&dir), "--json"]);
        let v: Vec<serde_json::Value> = serde_json::from_str(&held.stdout).unwrap();
        v.last().unwrap()["run_id"].as_str().unwrap().to_string()
    };
    let first = run(&f);
    // Held: nothing released, the log says held, not released.
    assert!(f.released().is_empty());
    let held = f.last_event("output-held");
    assert_eq!(held["name"], "summary.json");
    assert!(!f.events().iter().any(|e| e["event"] == "output-released"));
    let held_file = dir.join("runs").join(&first).join("held/summary.json");
    let bytes = std::fs::read(&held_file).unwrap();
    assert_eq!(held["sha256"], amicus_bundle::sha256(&bytes).to_hex());

    // Only a run id of this station is taken; nothing else names a path.
    for bad in ["../../x", "/etc", "", "runs", "0000-nope"] {
        let out = amicus(&["station", "release", "--dir", s(&dir), bad]);
        assert!(!out.ok, "{bad:?} was taken");
    }
    // The held bytes are what was audited: a changed file is not released.
    std::fs::write(&held_file, b"{\"forged\": true}").unwrap();
    let out = amicus(&["station", "release", "--dir", s(&dir), &first]);
    assert!(!out.ok);
    assert!(
        out.text().contains("changed since the run"),
        "{}",
        out.text()
    );
    assert!(f.released().is_empty());
    std::fs::write(&held_file, &bytes).unwrap();

    let out = ok(&["station", "release", "--dir", s(&dir), &first]);
    assert!(out.stdout.contains("released 1 output"), "{}", out.stdout);
    assert_eq!(f.released().len(), 1);
    assert_eq!(std::fs::read(&f.released()[0]).unwrap(), bytes);
    let decided = f.last_event("held-outputs-decided");
    assert_eq!(decided["decision"], "released");
    assert_eq!(f.last_event("output-released")["sha256"], held["sha256"]);
    // Final: neither a second release nor a withhold afterwards.
    for verb in ["release", "withhold"] {
        let out = amicus(&["station", verb, "--dir", s(&dir), &first]);
        assert!(!out.ok);
        assert!(out.text().contains("already released"), "{}", out.text());
    }

    let second = run(&f);
    let out = ok(&[
        "station",
        "withhold",
        "--dir",
        s(&dir),
        &second,
        "--reason",
        "not\u{1b}[8m today",
    ]);
    assert!(out.stdout.contains("withheld 1 output"), "{}", out.stdout);
    assert!(!dir.join("runs").join(&second).join("held").exists());
    assert_eq!(f.released().len(), 1);
    let decided = f.last_event("held-outputs-decided");
    assert_eq!(decided["decision"], "withheld");
    assert!(!decided["reason"].as_str().unwrap().contains('\u{1b}'));
    let out = amicus(&["station", "release", "--dir", s(&dir), &second]);
    assert!(!out.ok);
    let listed = ok(&["station", "held", "--dir", s(&dir)]).stdout;
    assert!(listed.contains("no outputs are held"), "{listed}");
    // The auditor's copy has the decisions, not the owner's words.
    let public = std::fs::read_to_string(dir.join("audit-public.log")).unwrap();
    assert_eq!(public.matches("held-outputs-decided").count(), 2);
    assert!(!public.contains("today"));
    f.audit_verifies();
    let prov = ok(&["audit", "export", "--dir", s(&dir)]).stdout;
    assert!(prov.contains("au:ReleaseDecision"), "{prov}");
}
