//! The FAIR index end to end through the `amicus` binary: synth → station index → cohort-stats
//! on three site profiles, the data owner's query and catalog, refused train queries (audited),
//! and no direct identifier in anything the station writes or releases.

mod common;

use common::{Fixture, amicus, fails, ok, s};
use dicom_dictionary_std::tags;
use std::path::Path;

const LDCM: &str = "PREFIX ldcm: <https://johanvansoest.nl/ontologies/LinkedDicom/>\n";

/// A fixture whose archive holds `patients` synthetic patients of `profile`, indexed, with a
/// minimum cohort of `min`.
fn indexed(profile: &str, patients: usize, seed: u64, min: u32) -> (Fixture, serde_json::Value) {
    let f = Fixture::new();
    f.synth_archive(profile, patients, seed);
    f.policy_edit("min_patients = 10", &format!("min_patients = {min}"));
    let out = ok(&["station", "index", "--dir", s(&f.station()), "--json"]);
    let report: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    (f, report)
}

fn table<'a>(summary: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    summary["tables"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == name)
        .unwrap_or_else(|| panic!("no table {name} in {summary}"))
}

fn cell(table: &serde_json::Value, value: &str) -> Option<(u64, u64)> {
    table["cells"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["value"] == value)
        .map(|c| {
            (
                c["patients"].as_u64().unwrap(),
                c["series"].as_u64().unwrap(),
            )
        })
}

#[test]
fn synth_index_and_cohort_stats_on_three_profiles() {
    for (i, profile) in ["academic", "community", "legacy"].into_iter().enumerate() {
        let patients = 4;
        let (f, report) = indexed(profile, patients, 40 + i as u64, 3);
        assert_eq!(report["counts"]["patients"], patients, "{report}");
        assert_eq!(report["counts"]["series"], 3 * patients, "{report}");
        assert_eq!(report["quarantined"].as_array().unwrap().len(), 1);
        let indexed = f.last_event("archive-indexed");
        assert_eq!(indexed["patients"], patients);
        assert_eq!(indexed["graph_sha256"], report["graph_sha256"]);

        let b = f.ready("cohort-stats");
        let out = f.run(&b, None);
        assert!(out.ok, "{profile}: {}", out.text());
        let summary: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&f.released()[0]).unwrap()).unwrap();
        assert_eq!(summary["index"]["state"], "queried", "{summary}");
        assert_eq!(summary["min_patients"], 3);
        let modality = table(&summary, "modality");
        for m in ["CT", "RTSTRUCT", "SEG"] {
            assert_eq!(cell(modality, m), Some((4, 4)), "{profile} {m}: {summary}");
        }
        let roi = table(&summary, "roi");
        assert_eq!(cell(roi, "Lung_L"), Some((4, 4)));
        // Lesion ROIs: shown with exact counts when at least 3 patients have one, else
        // suppressed by the station.
        let truth = f.ground_truth();
        let with = |n: usize| {
            truth["patients"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|p| p["phantom"]["lesions"].as_array().unwrap().len() >= n)
                .count() as u64
        };
        let mut suppressed = 0;
        for n in 1..=3 {
            match cell(roi, &format!("GTV-{n}")) {
                Some((p, _)) => assert_eq!(p, with(n)),
                None => {
                    assert!(with(n) < 3, "GTV-{n} missing");
                    if with(n) > 0 {
                        suppressed += 1;
                    }
                }
            }
        }
        assert_eq!(roi["suppressed"], suppressed, "{summary}");
        let calls: Vec<_> = f
            .events()
            .into_iter()
            .filter(|e| e["event"] == "capability-call")
            .collect();
        assert_eq!(calls.len(), 4);
        assert!(
            calls
                .iter()
                .all(|c| c["call"] == "tally" && c["outcome"] == "ok")
        );
        f.audit_verifies();
    }
}

#[test]
fn data_owner_queries_and_publishes_a_catalog() {
    let (f, _) = indexed("academic", 3, 9, 2);
    let st = f.station();
    let q = format!(
        "{LDCM}SELECT ?m (COUNT(?s) AS ?n) WHERE {{ ?s ldcm:T00080060 ?m }} GROUP BY ?m ORDER BY ?m"
    );
    let out = ok(&["station", "query", "--dir", s(&st), &q]);
    assert_eq!(
        out.stdout,
        "?m\t?n\n\"CT\"\t3\n\"RTSTRUCT\"\t3\n\"SEG\"\t3\n"
    );
    let json = ok(&["station", "query", "--dir", s(&st), "--json", &q]);
    let v: serde_json::Value = serde_json::from_str(&json.stdout).unwrap();
    assert_eq!(v["results"]["bindings"].as_array().unwrap().len(), 3);
    // From a file, and ASK.
    std::fs::write(
        f.path("q.rq"),
        format!("{LDCM}ASK {{ ?s ldcm:T00080060 \"MR\" }}"),
    )
    .unwrap();
    let out = ok(&[
        "station",
        "query",
        "--dir",
        s(&st),
        &format!("@{}", s(&f.path("q.rq"))),
    ]);
    assert_eq!(out.stdout, "false\n");
    // Updates and SERVICE are refused for the owner too, and audited.
    let out = fails(&[
        "station",
        "query",
        "--dir",
        s(&st),
        "DELETE WHERE { ?s ?p ?o }",
    ]);
    assert!(
        out.stderr.contains("updates are not allowed"),
        "{}",
        out.text()
    );
    let e = f.last_event("index-queried");
    assert!(e["outcome"].as_str().unwrap().starts_with("refused"), "{e}");
    let out = fails(&[
        "station",
        "query",
        "--dir",
        s(&st),
        "SELECT * { SERVICE <http://127.0.0.1:9/> { ?s ?p ?o } }",
    ]);
    assert!(out.stderr.contains("SERVICE"), "{}", out.text());

    let ttl = ok(&["station", "catalog", "--dir", s(&st)]).stdout;
    assert!(ttl.contains("dcat:Catalog"), "{ttl}");
    assert!(
        ttl.contains("numberOfUniqueIndividuals \"10\"^^xsd:nonNegativeInteger"),
        "{ttl}"
    );
    // Over the minimum cohort, nothing is counted.
    f.policy_edit("min_patients = 2", "min_patients = 4");
    let ttl = ok(&["station", "catalog", "--dir", s(&st)]).stdout;
    assert!(!ttl.contains("numberOfUniqueIndividuals"), "{ttl}");
    // The catalog parses as Turtle (rdflib, the reference Python implementation).
    std::fs::write(f.path("catalog.ttl"), &ttl).unwrap();
    if common::python().is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "rdflib venv missing under CI: run scripts/setup.sh --test"
        );
    }
    // The auditor's PROV-O export records the index run.
    ok(&[
        "audit",
        "export",
        "--dir",
        s(&st),
        "--out",
        s(&f.path("audit.ttl")),
    ]);
    if let Some(python) = common::python() {
        let script = "import sys, rdflib
g = rdflib.Graph(); g.parse(sys.argv[1], format='turtle')
a = rdflib.Graph(); a.parse(sys.argv[2], format='turtle')
q = 'PREFIX prov: <http://www.w3.org/ns/prov#> SELECT ?r WHERE { ?g prov:wasGeneratedBy ?r . ?r a prov:Activity }'
print(len(g), len(list(a.query(q))))";
        let check = std::process::Command::new(python)
            .args([
                "-c",
                script,
                s(&f.path("catalog.ttl")),
                s(&f.path("audit.ttl")),
            ])
            .output()
            .unwrap();
        assert!(
            check.status.success(),
            "{}",
            String::from_utf8_lossy(&check.stderr)
        );
        let out = String::from_utf8_lossy(&check.stdout);
        let counts: Vec<u64> = out.split_whitespace().map(|n| n.parse().unwrap()).collect();
        assert!(counts[0] > 10, "{out}");
        assert!(counts[1] >= 1, "no index run in the PROV-O export: {out}");
    }
}

fn misbehave_query(f: &Fixture, b: &Path, query: &str) -> common::Out {
    let params = serde_json::json!({"do": "cohort", "query": query}).to_string();
    f.run(b, Some(&params))
}

#[test]
fn refused_train_queries_are_audited_and_release_nothing() {
    let (f, _) = indexed("community", 3, 5, 3);
    f.policy_edit(
        "allowed_capabilities = [\"cohort\"]",
        "allowed_capabilities = [\"cohort\", \"imaging\"]",
    );
    let b = f.ready("testing/misbehave");
    let ct = format!("{LDCM}SELECT ?s WHERE {{ ?s ldcm:T00080060 \"CT\" }}");
    let out = misbehave_query(&f, &b, &ct);
    assert!(out.ok, "{}", out.text());
    let call = f.last_event("capability-call");
    assert_eq!(call["outcome"], "ok");
    assert_eq!(call["rows"], 3);

    let cases = [
        (
            format!("{LDCM}SELECT ?s WHERE {{ ?s ldcm:T00080060 \"CT\" }} LIMIT 2"),
            "denied: the result covers fewer distinct patients than the station's minimum cohort (3)",
        ),
        (
            format!("{LDCM}SELECT DISTINCT ?m WHERE {{ ?s ldcm:T00080060 ?m }}"),
            "denied: row 1 cannot be attributed",
        ),
        (
            "INSERT DATA { <urn:a> <urn:b> <urn:c> }".to_string(),
            "denied: SPARQL updates are not allowed",
        ),
        (
            "SELECT * WHERE { SERVICE <http://127.0.0.1:9/sparql> { ?s ?p ?o } }".to_string(),
            "denied: SERVICE",
        ),
        (
            "CONSTRUCT { ?s ?p ?o } WHERE { ?s ?p ?o }".to_string(),
            "denied: only SELECT queries",
        ),
        (
            format!("{ct} #{}", "x".repeat(20_000)),
            "limit-exceeded: the query is",
        ),
        (
            "SELECT nonsense".to_string(),
            "invalid-argument: not a valid SPARQL query",
        ),
    ];
    for (query, expected) in cases {
        let out = misbehave_query(&f, &b, &query);
        assert!(!out.ok, "{query}: {}", out.text());
        let call = f.last_event("capability-call");
        assert!(
            call["outcome"].as_str().unwrap().starts_with(expected),
            "{query}: {call}"
        );
        assert!(call["rows"].is_null());
        assert!(call["detail"].as_str().unwrap().starts_with("sha256:"));
        let fin = f.last_event("run-finished");
        assert_eq!(fin["outcome"], "failed");
        assert_eq!(fin["outputs_released"], 0);
    }
    assert_eq!(
        f.released().len(),
        1,
        "only the first, allowed run released"
    );
    // A row limit from the policy.
    f.policy_edit("max_rows = 100000", "max_rows = 2");
    let out = misbehave_query(&f, &b, &ct);
    assert!(!out.ok);
    f.last_call_outcome("limit-exceeded: the result has more than 2 rows");
    f.audit_verifies();
}

/// Direct identifiers synth wrote, read back from the files.
fn identifiers(archive: &Path) -> Vec<String> {
    let mut out = std::collections::BTreeSet::new();
    for path in amicus_synth_files(archive) {
        let Ok(obj) = dicom_object::open_file(&path) else {
            continue;
        };
        for tag in [
            tags::PATIENT_NAME,
            tags::PATIENT_ID,
            tags::PATIENT_BIRTH_DATE,
            tags::PATIENT_ADDRESS,
            tags::PATIENT_TELEPHONE_NUMBERS,
        ] {
            if let Some(v) = obj.get(tag).and_then(|e| e.to_str().ok()) {
                out.extend(
                    std::iter::once(v.trim().to_string())
                        .chain(v.split('^').map(|p| p.trim().to_string()))
                        .filter(|p| p.len() >= 4),
                );
            }
        }
    }
    out.into_iter().collect()
}

fn amicus_synth_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "dcm") {
                out.push(p);
            }
        }
    }
    out
}

fn all_bytes_below(dir: &Path, skip: &str, out: &mut Vec<u8>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            all_bytes_below(&p, skip, out);
        } else if p.file_name().is_some_and(|n| n != skip) {
            out.extend(std::fs::read(&p).unwrap());
        }
    }
}

#[test]
fn no_direct_identifier_leaves_the_archive() {
    let (f, _) = indexed("legacy", 4, 77, 2);
    let ids = identifiers(&f.path("archive"));
    assert!(ids.len() >= 8, "{ids:?}");
    let b = f.ready("cohort-stats");
    assert!(f.run(&b, None).ok);
    let mut everything = Vec::new();
    // Everything the station wrote: index, audit log, run records and outputs, policy.
    all_bytes_below(&f.station(), "pseudonym.key", &mut everything);
    everything.extend(
        ok(&["station", "catalog", "--dir", s(&f.station())])
            .stdout
            .into_bytes(),
    );
    everything.extend(
        amicus(&["audit", "export", "--dir", s(&f.station())])
            .stdout
            .into_bytes(),
    );
    let text = String::from_utf8_lossy(&everything);
    for id in &ids {
        assert!(!text.contains(id.as_str()), "{id:?} left the archive");
    }
}

#[test]
fn a_damaged_index_refuses_runs_and_says_so() {
    let (f, _) = indexed("academic", 2, 13, 1);
    let catalog = ok(&["station", "catalog", "--dir", s(&f.station())]).stdout;
    let published = f.last_event("catalog-published");
    assert_eq!(published["bytes"], catalog.len());
    std::fs::write(f.station().join("index/graph.nq"), "<urn:a> <urn:b> broken").unwrap();
    let b = f.ready("cohort-stats");
    let out = f.run(&b, None);
    assert!(!out.ok, "{}", out.text());
    let refused = f.last_event("train-refused");
    assert_eq!(refused["stage"], "index", "{refused}");
    assert!(
        refused["reason"]
            .as_str()
            .unwrap()
            .contains("cannot be loaded"),
        "{refused}"
    );
    // Re-indexing repairs it (the graph is always rewritten from the facts).
    ok(&["station", "index", "--dir", s(&f.station())]);
    assert!(f.run(&b, None).ok);
}

#[test]
fn query_budgets_and_noisy_tallies_are_counted_per_train() {
    let (f, _) = indexed("academic", 8, 31, 1);
    // Per run: 2 queries; per digest: 4, over all its runs.
    f.policy_edit("max_queries_per_run = 1000", "max_queries_per_run = 2");
    f.policy_edit(
        "max_queries_per_digest = 100000",
        "max_queries_per_digest = 4",
    );
    let b = f.ready("cohort-stats");
    let three = r#"{"tables": ["modality", "body_part", "roi"]}"#;
    let out = f.run(&b, Some(three));
    assert!(
        !out.ok,
        "the third query of a run went through:\n{}",
        out.text()
    );
    let call = f.last_call_outcome("limit-exceeded");
    assert!(
        call["outcome"].as_str().unwrap().contains("budget"),
        "{call}"
    );
    let counted = f.last_event("cohort-queries-counted");
    assert_eq!(counted["queries"], 3, "{counted}");
    let two = r#"{"tables": ["modality", "roi"]}"#;
    let out = f.run(&b, Some(two));
    assert!(!out.ok, "the digest's budget was not held:\n{}", out.text());
    assert_eq!(f.last_event("cohort-queries-counted")["digest_queries"], 5);
    // Nothing of a run over its budget leaves, and the log verifies.
    assert!(f.released().is_empty());

    // Noisy tallies: each costs ε from the digest's privacy budget, and the budget ends them.
    let (f, _) = indexed("academic", 8, 32, 1);
    f.policy_edit("tally_epsilon = 0.0", "tally_epsilon = 1.0");
    f.policy_edit("default_epsilon = 10.0", "default_epsilon = 2.5");
    let b = f.ready("cohort-stats");
    let one = r#"{"tables": ["modality"]}"#;
    for _ in 0..2 {
        let out = f.run(&b, Some(one));
        assert!(out.ok, "{}", out.text());
    }
    let spent = f.last_event("cohort-queries-counted");
    assert_eq!(spent["digest_epsilon"], 2.0, "{spent}");
    let out = f.run(&b, Some(one));
    assert!(
        !out.ok,
        "a tally past the privacy budget ran:\n{}",
        out.text()
    );
    let call = f.last_call_outcome("limit-exceeded");
    assert!(
        call["outcome"].as_str().unwrap().contains("privacy budget"),
        "{call}"
    );
    f.audit_verifies();
}
