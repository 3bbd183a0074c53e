//! The index against real synthetic archives: scan, graph, incremental re-scan, quarantine,
//! pseudonymisation, guarded queries and the catalog.

use amicus_index::query::{self, OwnerFormat, QueryError, QueryLimits};
use amicus_index::{CatalogInfo, Index, catalog_turtle, scan};
use dicom_dictionary_std::tags;
use std::path::Path;
use std::time::Duration;

fn synth(dir: &Path, patients: usize, profile: &str, seed: u64) -> amicus_synth::Summary {
    amicus_synth::generate(dir, "Test Hospital", patients, seed, profile, |_, _| {}).unwrap()
}

fn owner(index: &Index, q: &str) -> String {
    let out = query::owner_query(index, q, Duration::from_secs(10), OwnerFormat::Text).unwrap();
    String::from_utf8(out).unwrap()
}

const PREFIX: &str = "PREFIX ldcm: <https://johanvansoest.nl/ontologies/LinkedDicom/>\n";

fn limits(min_patients: u32) -> QueryLimits {
    QueryLimits {
        max_query_bytes: 4096,
        max_rows: 10_000,
        timeout: Duration::from_secs(10),
        min_patients,
        max_intermediate: 100_000,
        tally_noise: None,
    }
}

#[test]
fn synthetic_archive_is_indexed_with_references_and_rois() {
    let tmp = tempfile::tempdir().unwrap();
    let archive = tmp.path().join("archive");
    let summary = synth(&archive, 3, "academic", 7);
    let index_dir = tmp.path().join("index");
    let mut files = 0;
    let report = scan(&archive, &index_dir, |p| {
        if let amicus_index::Progress::File(_) = p {
            files += 1
        }
    })
    .unwrap();
    // ground-truth.json is not DICOM: quarantined with a reason, not fatal.
    assert_eq!(report.quarantined.len(), 1, "{:?}", report.quarantined);
    assert_eq!(report.quarantined[0].path, "ground-truth.json");
    assert!(
        report.quarantined[0].reason.contains("not a DICOM file"),
        "{}",
        report.quarantined[0].reason
    );
    assert_eq!(report.indexed as usize, summary.files());
    assert_eq!(files, summary.files() + 1);
    assert_eq!(report.counts.patients, 3);
    assert_eq!(report.counts.studies, 3);
    assert_eq!(report.counts.series, 9);
    assert!(report.warnings.is_empty(), "{:?}", report.warnings);

    let index = amicus_index::Index::load(&index_dir.join("graph.nq")).unwrap();
    assert_eq!(index.patients(), 3);
    for p in &summary.patients {
        // RTSTRUCT and SEG reference their CT series, found by a join.
        let q = format!(
            "{PREFIX}SELECT ?kind WHERE {{ ?x ldcm:R0020000E <urn:oid:{}> ; ldcm:T00080060 ?kind }} ORDER BY ?kind",
            p.ct_series_uid
        );
        assert_eq!(owner(&index, &q), "?kind\n\"RTSTRUCT\"\n\"SEG\"\n");
        let q = format!(
            "{PREFIX}SELECT ?roi WHERE {{ <urn:oid:{}> ldcm:T30060026 ?roi }} ORDER BY ?roi",
            p.rtstruct_series_uid
        );
        let rois = owner(&index, &q);
        for organ in ["Lung_L", "Lung_R"] {
            assert!(rois.contains(organ), "{rois}");
        }
        assert_eq!(
            rois.matches("GTV-").count(),
            p.phantom.lesions.len(),
            "{rois}"
        );
        let q = format!(
            "{PREFIX}SELECT ?n ?t ?rows WHERE {{ <urn:oid:{}> ldcm:T00201209 ?n ; ldcm:T00180050 ?t ; ldcm:T00280010 ?rows }}",
            p.ct_series_uid
        );
        let row = owner(&index, &q);
        let fields: Vec<&str> = row.lines().nth(1).unwrap().split('\t').collect();
        assert_eq!(fields[0], p.slices.to_string());
        assert!(
            fields[1].contains(&p.slice_thickness_mm.to_string()),
            "{row}"
        );
        assert_eq!(fields[2], p.rows.to_string());
    }
}

#[test]
fn rescan_is_incremental_idempotent_and_quarantines_bad_files() {
    let tmp = tempfile::tempdir().unwrap();
    let archive = tmp.path().join("archive");
    let summary = synth(&archive, 2, "community", 11);
    let index_dir = tmp.path().join("index");
    let first = scan(&archive, &index_dir, |_| {}).unwrap();
    let again = scan(&archive, &index_dir, |_| {}).unwrap();
    assert_eq!(again.new + again.changed + again.removed, 0);
    assert_eq!(again.unchanged, first.files_seen);
    assert_eq!(
        again.graph_sha256, first.graph_sha256,
        "re-indexing changed the graph"
    );

    // Remove one CT slice, truncate another, add junk, a duplicate, and a raw dataset.
    let ct = archive.join(&summary.patients[0].folder).join("ct");
    let mut slices: Vec<_> = std::fs::read_dir(&ct)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    slices.sort();
    std::fs::remove_file(&slices[0]).unwrap();
    let bytes = std::fs::read(&slices[1]).unwrap();
    std::fs::write(&slices[1], &bytes[..700]).unwrap();
    std::fs::write(archive.join("notes.txt"), "not dicom").unwrap();
    std::fs::copy(&slices[2], archive.join("copy.dcm")).unwrap();
    std::fs::write(archive.join("empty.dcm"), b"").unwrap();

    let third = scan(&archive, &index_dir, |_| {}).unwrap();
    assert_eq!(third.removed, 1);
    assert_eq!(third.changed, 1);
    assert_eq!(third.new, 3);
    let reasons: std::collections::BTreeMap<_, _> = third
        .quarantined
        .iter()
        .map(|q| (q.path.as_str(), q.reason.as_str()))
        .collect();
    assert!(
        reasons["notes.txt"].contains("not a DICOM file"),
        "{reasons:?}"
    );
    assert!(
        reasons["empty.dcm"].contains("not a DICOM file"),
        "{reasons:?}"
    );
    // Of two files with one SOP instance, the first path in sorted order counts.
    let original = slices[2]
        .strip_prefix(&archive)
        .unwrap()
        .to_string_lossy()
        .to_string();
    assert!(
        reasons[original.as_str()].contains("duplicate SOP instance of copy.dcm"),
        "{reasons:?}"
    );
    assert!(!reasons.contains_key("copy.dcm"));
    let truncated = slices[1]
        .strip_prefix(&archive)
        .unwrap()
        .to_string_lossy()
        .to_string();
    assert!(
        reasons[truncated.as_str()].contains("unreadable DICOM"),
        "{reasons:?}"
    );
    assert_eq!(third.indexed, first.indexed - 2);

    let index = amicus_index::Index::load(&index_dir.join("graph.nq")).unwrap();
    let q = format!(
        "{PREFIX}SELECT ?n WHERE {{ <urn:oid:{}> ldcm:T00201209 ?n }}",
        summary.patients[0].ct_series_uid
    );
    assert_eq!(
        owner(&index, &q),
        format!("?n\n{}\n", summary.patients[0].slices - 2)
    );

    // Restoring the files brings the graph back to the first one, byte for byte.
    std::fs::remove_file(archive.join("copy.dcm")).unwrap();
    std::fs::remove_file(archive.join("notes.txt")).unwrap();
    std::fs::remove_file(archive.join("empty.dcm")).unwrap();
    std::fs::write(&slices[1], &bytes).unwrap();
    std::fs::copy(&slices[2], &slices[0]).unwrap();
    std::fs::remove_file(&slices[0]).unwrap();
    let fourth = scan(&archive, &index_dir, |_| {}).unwrap();
    assert_eq!(fourth.removed, 3);
    assert_eq!(fourth.indexed, first.indexed - 1);
}

/// Every direct identifier written by synth, read back from the files themselves.
fn identifiers(archive: &Path) -> Vec<String> {
    let mut out = std::collections::BTreeSet::new();
    for path in amicus_synth::archive::dicom_files(archive) {
        let obj = dicom_object::open_file(&path).unwrap();
        for tag in [
            tags::PATIENT_NAME,
            tags::PATIENT_ID,
            tags::PATIENT_BIRTH_DATE,
            tags::PATIENT_ADDRESS,
            tags::PATIENT_TELEPHONE_NUMBERS,
            tags::STUDY_DATE,
            tags::ACCESSION_NUMBER,
            tags::REFERRING_PHYSICIAN_NAME,
            tags::OPERATORS_NAME,
        ] {
            if let Some(v) = obj.get(tag).and_then(|e| e.to_str().ok()) {
                let v = v.trim().to_string();
                if v.len() >= 4 {
                    out.insert(v.clone());
                    // Name parts on their own, too.
                    out.extend(v.split('^').filter(|p| p.len() >= 4).map(str::to_string));
                }
            }
        }
    }
    out.into_iter().collect()
}

#[test]
fn no_direct_identifier_reaches_the_index_or_catalog() {
    let tmp = tempfile::tempdir().unwrap();
    let index_dir = tmp.path().join("index");
    let mut ids = Vec::new();
    for (i, profile) in ["academic", "community", "legacy"].into_iter().enumerate() {
        let archive = tmp.path().join(profile);
        synth(&archive, 2, profile, 100 + i as u64);
        ids.extend(identifiers(&archive));
    }
    assert!(ids.len() >= 12, "{ids:?}");
    let mut everything = Vec::new();
    for profile in ["academic", "community", "legacy"] {
        let report = scan(&tmp.path().join(profile), &index_dir, |_| {}).unwrap();
        assert_eq!(report.counts.patients, 2);
        for name in ["graph.nq", "files.jsonl", "report.json"] {
            everything.extend(std::fs::read(index_dir.join(name)).unwrap());
        }
        let index = Index::load(&index_dir.join("graph.nq")).unwrap();
        let info = CatalogInfo {
            base: "urn:amicus:station:test",
            title: "Test",
            publisher: "Test Hospital",
            license: "https://creativecommons.org/publicdomain/zero/1.0/",
            min_patients: 1,
        };
        everything.extend(
            catalog_turtle(&index, &info, Some(&report))
                .unwrap()
                .into_bytes(),
        );
    }
    let text = String::from_utf8_lossy(&everything);
    for id in &ids {
        assert!(
            !text.contains(id.as_str()),
            "identifier {id:?} leaked into the index"
        );
    }
}

#[test]
fn train_queries_are_guarded() {
    let tmp = tempfile::tempdir().unwrap();
    let archive = tmp.path().join("archive");
    synth(&archive, 4, "academic", 3);
    let index_dir = tmp.path().join("index");
    scan(&archive, &index_dir, |_| {}).unwrap();
    let index = Index::load(&index_dir.join("graph.nq")).unwrap();
    let ct =
        format!("{PREFIX}SELECT ?s ?t WHERE {{ ?s ldcm:T00080060 \"CT\" ; ldcm:T00180050 ?t }}");

    let ok = query::select(&index, &ct, &limits(4)).unwrap();
    assert_eq!(ok.rows.len(), 4);
    assert_eq!(ok.variables, ["s", "t"]);
    assert_eq!(
        query::select(&index, &ct, &limits(5)).unwrap_err(),
        QueryError::BelowMinimum(5)
    );
    let one = format!("{PREFIX}SELECT ?s WHERE {{ ?s ldcm:T00080060 \"CT\" }} LIMIT 1");
    assert_eq!(
        query::select(&index, &one, &limits(2)).unwrap_err(),
        QueryError::BelowMinimum(2)
    );
    let bare = format!("{PREFIX}SELECT DISTINCT ?m WHERE {{ ?s ldcm:T00080060 ?m }}");
    assert_eq!(
        query::select(&index, &bare, &limits(1)).unwrap_err(),
        QueryError::NotAttributable(1)
    );
    let mut few_rows = limits(1);
    few_rows.max_rows = 3;
    assert_eq!(
        query::select(&index, &ct, &few_rows).unwrap_err(),
        QueryError::TooManyRows(3)
    );

    let update = format!("{PREFIX}INSERT DATA {{ <urn:x> <urn:y> <urn:z> }}");
    assert_eq!(
        query::select(&index, &update, &limits(1)).unwrap_err(),
        QueryError::Update
    );
    let delete = "DELETE WHERE { ?s ?p ?o }";
    assert_eq!(
        query::select(&index, delete, &limits(1)).unwrap_err(),
        QueryError::Update
    );
    let service = "SELECT * WHERE { SERVICE <http://127.0.0.1:9/sparql> { ?s ?p ?o } }";
    assert_eq!(
        query::select(&index, service, &limits(1)).unwrap_err(),
        QueryError::Service
    );
    let nested =
        "SELECT * WHERE { ?s ?p ?o FILTER EXISTS { SERVICE SILENT <urn:x> { ?s ?p ?o } } }";
    assert_eq!(
        query::select(&index, nested, &limits(1)).unwrap_err(),
        QueryError::Service
    );
    let construct = "CONSTRUCT { ?s ?p ?o } WHERE { ?s ?p ?o }";
    assert_eq!(
        query::select(&index, construct, &limits(1)).unwrap_err(),
        QueryError::NotSelect("CONSTRUCT")
    );
    assert_eq!(
        query::select(&index, "ASK {}", &limits(1)).unwrap_err(),
        QueryError::NotSelect("ASK")
    );
    let long = format!("{ct}\n#{}", "x".repeat(5000));
    assert!(matches!(
        query::select(&index, &long, &limits(1)),
        Err(QueryError::TooLong { .. })
    ));
    assert!(matches!(
        query::select(&index, "SELEKT", &limits(1)),
        Err(QueryError::Syntax(_))
    ));

    // A query that cannot finish in time is cancelled.
    let mut quick = limits(1);
    quick.timeout = Duration::from_millis(50);
    quick.max_rows = usize::MAX;
    quick.max_intermediate = usize::MAX;
    let heavy = "SELECT (COUNT(*) AS ?n) WHERE { ?a ?b ?c . ?d ?e ?f . ?g ?h ?i . ?j ?k ?l }";
    let started = std::time::Instant::now();
    assert_eq!(
        query::select(&index, heavy, &quick).unwrap_err(),
        QueryError::Timeout(50)
    );
    assert!(started.elapsed() < Duration::from_secs(20));

    // What oxigraph would hold in memory to sort, group, join, OPTIONAL or MINUS is counted
    // first, streaming, and refused beyond the limit: quickly, however large the product.
    let sorted = format!(
        "{PREFIX}SELECT ?s ?t WHERE {{ ?s ldcm:T00080060 \"CT\" ; ldcm:T00180050 ?t }} ORDER BY ?t"
    );
    assert_eq!(
        query::select(&index, &sorted, &limits(4))
            .unwrap()
            .rows
            .len(),
        4
    );
    let mut tight = limits(1);
    tight.max_intermediate = 3;
    assert_eq!(
        query::select(&index, &sorted, &tight).unwrap_err(),
        QueryError::TooManyIntermediate("ORDER BY", 3)
    );
    let product = "{ ?a ?p1 ?x . ?b ?p2 ?y . ?c ?p3 ?z . ?d ?p4 ?w . ?e ?p5 ?v }";
    for (q, what) in [
        (
            format!("SELECT ?a ?b WHERE {product} ORDER BY ?x ?y ?z ?w ?v"),
            "ORDER BY",
        ),
        (
            format!("SELECT ?a (COUNT(*) AS ?n) WHERE {product} GROUP BY ?a"),
            "GROUP BY",
        ),
        (
            format!("SELECT DISTINCT ?a ?x ?y WHERE {product}"),
            "DISTINCT",
        ),
        (
            format!("SELECT ?s WHERE {{ ?s ?p ?o OPTIONAL {product} }}"),
            "OPTIONAL",
        ),
        (
            format!("SELECT ?s WHERE {{ ?s ?p ?o MINUS {product} }}"),
            "MINUS",
        ),
    ] {
        let started = std::time::Instant::now();
        let err = query::select(&index, &q, &limits(1)).unwrap_err();
        assert_eq!(err, QueryError::TooManyIntermediate(what, 100_000), "{q}");
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{q}: {:?}",
            started.elapsed()
        );
    }
    let mut paths = limits(1);
    paths.max_intermediate = 5;
    let closure = "SELECT ?a ?b WHERE { ?a (<urn:x>|!<urn:y>)* ?b }";
    assert_eq!(
        query::select(&index, closure, &paths).unwrap_err(),
        QueryError::TooManyIntermediate("a property path", 5)
    );
}

#[test]
fn tally_counts_patients_and_suppresses_small_cells() {
    let tmp = tempfile::tempdir().unwrap();
    let archive = tmp.path().join("archive");
    let summary = synth(&archive, 5, "academic", 21);
    let index_dir = tmp.path().join("index");
    scan(&archive, &index_dir, |_| {}).unwrap();
    let index = Index::load(&index_dir.join("graph.nq")).unwrap();

    let by_modality = format!("{PREFIX}SELECT ?s ?m WHERE {{ ?s ldcm:T00080060 ?m }}");
    let t = query::tally(&index, &by_modality, &limits(5)).unwrap();
    assert_eq!(t.columns, ["m"]);
    let cells: Vec<(String, u32, u32)> = t
        .cells
        .iter()
        .map(|c| (c.key[0].clone().unwrap(), c.patients, c.items))
        .collect();
    assert_eq!(
        cells,
        [
            ("CT".into(), 5, 5),
            ("RTSTRUCT".into(), 5, 5),
            ("SEG".into(), 5, 5)
        ]
    );
    assert_eq!(t.suppressed, 0);

    // Lesion ROI names: each GTV-n holds fewer patients than the minimum of 5 unless all
    // patients have that many lesions; the suppressed ones are counted, not shown.
    let by_roi = format!("{PREFIX}SELECT ?s ?roi WHERE {{ ?s ldcm:T30060026 ?roi }}");
    let t = query::tally(&index, &by_roi, &limits(5)).unwrap();
    let with = |n: usize| {
        summary
            .patients
            .iter()
            .filter(|p| p.phantom.lesions.len() >= n)
            .count() as u32
    };
    for n in 1..=3 {
        let shown = t
            .cells
            .iter()
            .find(|c| c.key[0].as_deref() == Some(&format!("GTV-{n}")));
        if with(n) >= 5 {
            assert_eq!(shown.unwrap().patients, with(n));
        } else {
            assert!(
                shown.is_none(),
                "GTV-{n} with {} patients was not suppressed",
                with(n)
            );
        }
    }
    let expected_suppressed = (1..=3).filter(|n| with(*n) > 0 && with(*n) < 5).count() as u32;
    assert_eq!(t.suppressed, expected_suppressed);
    assert!(
        t.cells
            .iter()
            .any(|c| c.key[0].as_deref() == Some("Lung_L") && c.patients == 5)
    );

    let bare = format!("{PREFIX}SELECT ?m WHERE {{ ?s ldcm:T00080060 ?m }}");
    assert_eq!(
        query::tally(&index, &bare, &limits(1)).unwrap_err(),
        QueryError::NotAttributable(1)
    );
}

/// The (key values → patients) truth: for a tally grouping `item` rows by keys bound on the
/// same patient's nodes, how many distinct patients own each key combination.
fn owners_of(index: &Index, values: &[&str]) -> u32 {
    // Every patient whose own nodes (patient, studies, series) hold each value.
    let mut clauses = String::new();
    for (i, v) in values.iter().enumerate() {
        clauses.push_str(&format!(
            "{{ ?p ?a{i} ?v{i} }} UNION {{ ?p ldcm:has_study ?st{i} . ?st{i} ?b{i} ?v{i} }} UNION \
             {{ ?p ldcm:has_study ?sx{i} . ?sx{i} ldcm:has_series ?se{i} . ?se{i} ?c{i} ?v{i} }} \
             FILTER(STR(?v{i}) = {v:?}) "
        ));
    }
    let q = format!(
        "{PREFIX}SELECT (COUNT(DISTINCT ?p) AS ?n) WHERE {{ ?p a ldcm:Patient . {clauses} }}"
    );
    let text = owner(index, &q);
    text.lines()
        .filter_map(|l| {
            l.split_whitespace()
                .find_map(|w| w.trim_matches('"').split('^').next()?.parse().ok())
        })
        .next()
        .unwrap_or(0)
}

#[test]
fn a_tally_cell_counts_only_the_patients_whose_own_data_it_is() {
    let tmp = tempfile::tempdir().unwrap();
    let archive = tmp.path().join("archive");
    synth(&archive, 12, "academic", 5);
    let index_dir = tmp.path().join("index");
    scan(&archive, &index_dir, |_| {}).unwrap();
    let index = Index::load(&index_dir.join("graph.nq")).unwrap();

    // The attack: one patient's sex and a study's age, cross-joined with every patient IRI.
    // Each cell must count only patients who have that sex and age themselves.
    let attack = format!(
        "{PREFIX}SELECT ?p ?sex ?age WHERE {{ ?p a ldcm:Patient . ?q ldcm:T00100040 ?sex ; \
         ldcm:has_study ?st . ?st ldcm:T00101010 ?age }}"
    );
    let t = query::tally(&index, &attack, &limits(1)).unwrap();
    assert!(!t.cells.is_empty());
    for c in &t.cells {
        let sex = c.key[0].as_deref().unwrap();
        let age = c.key[1].as_deref().unwrap();
        let truth = owners_of(&index, &[sex, age]);
        assert_eq!(
            c.patients, truth,
            "cell ({sex}, {age}) counts {} patients, {truth} own it",
            c.patients
        );
    }
    // The same with the keys bound through the row's own patient: the same counts.
    let honest = format!(
        "{PREFIX}SELECT ?p ?sex ?age WHERE {{ ?p a ldcm:Patient ; ldcm:T00100040 ?sex ; \
         ldcm:has_study ?st . ?st ldcm:T00101010 ?age }}"
    );
    let h = query::tally(&index, &honest, &limits(1)).unwrap();
    let mut a: Vec<_> = t
        .cells
        .iter()
        .map(|c| (c.key.clone(), c.patients))
        .collect();
    let mut b: Vec<_> = h
        .cells
        .iter()
        .map(|c| (c.key.clone(), c.patients))
        .collect();
    a.sort();
    b.sort();
    assert_eq!(a, b);
    // A computed key is nobody's own value: counted for no one, so suppressed.
    let computed = format!(
        "{PREFIX}SELECT ?p ?x WHERE {{ ?p a ldcm:Patient ; ldcm:T00100040 ?sex . BIND(CONCAT(?sex, \"!\") AS ?x) }}"
    );
    let c = query::tally(&index, &computed, &limits(1)).unwrap();
    assert!(c.cells.is_empty(), "{c:?}");
}

#[test]
fn queries_that_name_an_individual_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let archive = tmp.path().join("archive");
    synth(&archive, 4, "academic", 9);
    let index_dir = tmp.path().join("index");
    scan(&archive, &index_dir, |_| {}).unwrap();
    let index = Index::load(&index_dir.join("graph.nq")).unwrap();
    let all = query::select(
        &index,
        &format!("{PREFIX}SELECT ?p ?id WHERE {{ ?p a ldcm:Patient ; ldcm:T00100020 ?id }}"),
        &limits(1),
    )
    .unwrap();
    let p = all.rows[0][0].as_ref().unwrap().value().to_string();
    let id = all.rows[0][1].as_ref().unwrap().value().to_string();
    let series = query::select(
        &index,
        &format!("{PREFIX}SELECT ?s ?uid WHERE {{ ?s a ldcm:Series ; ldcm:T0020000E ?uid }}"),
        &limits(1),
    )
    .unwrap();
    let s_iri = series.rows[0][0].as_ref().unwrap().value().to_string();
    let s_uid = series.rows[0][1].as_ref().unwrap().value().to_string();
    for q in [
        format!("{PREFIX}SELECT ?p ?sex WHERE {{ ?p ldcm:T00100040 ?sex . FILTER(?p = <{p}>) }}"),
        format!("{PREFIX}SELECT ?p ?sex WHERE {{ ?p ldcm:T00100040 ?sex . FILTER(?p != <{p}>) }}"),
        format!("{PREFIX}SELECT ?p ?sex WHERE {{ <{p}> ldcm:T00100040 ?sex . ?p a ldcm:Patient }}"),
        format!("{PREFIX}SELECT ?p WHERE {{ ?p ldcm:T00100020 \"{id}\" }}"),
        format!("{PREFIX}SELECT ?p WHERE {{ ?p ldcm:T00100020 ?i . FILTER(STR(?i) != \"{id}\") }}"),
        format!("{PREFIX}SELECT ?s WHERE {{ VALUES ?s {{ <{s_iri}> }} ?s ?x ?y }}"),
        format!("{PREFIX}SELECT ?s WHERE {{ ?s ldcm:T0020000E ?u . FILTER(?u = \"{s_uid}\") }}"),
    ] {
        assert_eq!(
            query::select(&index, &q, &limits(1)).unwrap_err(),
            QueryError::NamesIndividual,
            "{q}"
        );
        assert_eq!(
            query::tally(&index, &q, &limits(1)).unwrap_err(),
            QueryError::NamesIndividual,
            "{q}"
        );
    }
}

#[test]
fn noisy_tallies_are_noisy_nonnegative_and_suppressed_below_the_minimum() {
    let tmp = tempfile::tempdir().unwrap();
    let archive = tmp.path().join("archive");
    synth(&archive, 10, "academic", 13);
    let index_dir = tmp.path().join("index");
    scan(&archive, &index_dir, |_| {}).unwrap();
    let index = Index::load(&index_dir.join("graph.nq")).unwrap();
    let by_modality = format!("{PREFIX}SELECT ?s ?m WHERE {{ ?s ldcm:T00080060 ?m }}");
    let mut noisy = limits(1);
    noisy.tally_noise = Some(query::TallyNoise {
        epsilon: 0.5,
        cells_per_patient: 1,
    });
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..40 {
        let t = query::tally(&index, &by_modality, &noisy).unwrap();
        for c in &t.cells {
            seen.insert(c.patients);
            // Items would be exact beside a noisy count: they carry the same figure.
            assert_eq!(c.items, c.patients);
        }
    }
    // Each patient counts in one cell only (contribution bounded), and the counts vary.
    assert!(seen.len() > 3, "{seen:?}");
    let exact = query::tally(&index, &by_modality, &limits(1)).unwrap();
    assert!(exact.cells.iter().all(|c| c.patients == 10));
}

#[test]
fn catalog_is_turtle_with_rounded_counts() {
    let tmp = tempfile::tempdir().unwrap();
    let archive = tmp.path().join("archive");
    synth(&archive, 6, "legacy", 5);
    let index_dir = tmp.path().join("index");
    let report = scan(&archive, &index_dir, |_| {}).unwrap();
    let index = Index::load(&index_dir.join("graph.nq")).unwrap();
    let info = |min| CatalogInfo {
        base: "urn:amicus:station:abc",
        title: "Legacy Hospital",
        publisher: "Legacy Hospital IT",
        license: "https://creativecommons.org/publicdomain/zero/1.0/",
        min_patients: min,
    };
    let ttl = catalog_turtle(&index, &info(5), Some(&report)).unwrap();
    // It parses as Turtle, and says what it should.
    let store = oxigraph::store::Store::new().unwrap();
    store
        .load_from_reader(oxigraph::io::RdfFormat::Turtle, ttl.as_bytes())
        .unwrap();
    assert!(ttl.contains("dcat:Catalog"), "{ttl}");
    assert!(
        ttl.contains("healthdcatap:numberOfUniqueIndividuals \"10\"^^xsd:nonNegativeInteger"),
        "{ttl}"
    );
    assert!(
        ttl.contains("dct:license <https://creativecommons.org/publicdomain/zero/1.0/>"),
        "{ttl}"
    );
    assert!(ttl.contains("prov:wasGeneratedBy"), "{ttl}");
    assert!(!ttl.contains("urn:oid:"), "{ttl}");
    // Above the number of patients, nothing is counted.
    let ttl = catalog_turtle(&index, &info(7), Some(&report)).unwrap();
    assert!(!ttl.contains("numberOfUniqueIndividuals"), "{ttl}");
    assert!(!ttl.contains("dataset:imaging:CT"), "{ttl}");
}

/// The real-world corpus `scripts/setup.sh --test` unpacks (pydicom's test files and the
/// pydicom-data wheel): odd transfer syntaxes, files without meta, UN values, truncated and
/// malicious files.
fn corpus() -> Option<std::path::PathBuf> {
    let dir = std::env::var_os("AMICUS_CORPUS")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(&std::env::var("HOME").unwrap_or_default()).join(".cache/amicus/corpus")
        });
    if dir.join(".complete").is_file() {
        return Some(dir);
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "real-world corpus missing under CI: run scripts/setup.sh --test"
    );
    eprintln!("real-world corpus missing: run scripts/setup.sh --test; skipping");
    None
}

#[test]
fn real_world_corpus_is_indexed_or_quarantined_and_reindexing_is_idempotent() {
    let Some(corpus) = corpus() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let index_dir = tmp.path().join("index");
    let first = scan(&corpus, &index_dir, |_| {}).unwrap();
    assert!(first.files_seen >= 200, "{}", first.files_seen);
    // Every file is accounted for: indexed, or quarantined with a reason.
    assert_eq!(
        first.indexed + first.quarantined.len() as u64,
        first.files_seen
    );
    assert!(first.quarantined.iter().all(|q| !q.reason.is_empty()));
    assert!(first.indexed >= 100, "{}", first.indexed);
    let reason = |p: &str| {
        first
            .quarantined
            .iter()
            .find(|q| q.path == p)
            .map(|q| q.reason.as_str())
    };
    // Lengths beyond the file are refused before dicom-rs allocates them (this file made it
    // allocate 3.6 GB).
    assert!(
        reason("pydicom/UN_sequence.dcm")
            .unwrap()
            .contains("more than the whole file")
    );
    assert!(
        reason("pydicom/README.txt")
            .unwrap()
            .contains("not a DICOM file")
    );
    assert!(
        reason("pydicom/rtplan_truncated.dcm")
            .unwrap()
            .contains("unreadable")
    );
    // Read despite quirks: no file meta, big endian, UN-encoded standard attributes.
    assert_eq!(reason("pydicom/rtstruct.dcm"), None);
    assert_eq!(reason("pydicom-data/explicit_VR-UN.dcm"), None);
    assert!(
        !reason("pydicom/ExplVR_BigEndNoMeta.dcm")
            .unwrap()
            .contains("not a DICOM")
    );

    let again = scan(&corpus, &index_dir, |_| {}).unwrap();
    assert_eq!(again.unchanged, again.files_seen);
    assert_eq!(again.new + again.changed + again.removed, 0);
    assert_eq!(again.graph_sha256, first.graph_sha256);
    assert_eq!(again.quarantined, first.quarantined);
    // The real-world graph answers joins: the RTSTRUCT's referenced series, CT series sizes.
    let index = Index::load(&index_dir.join("graph.nq")).unwrap();
    let ct = owner(
        &index,
        &format!(
            "{PREFIX}SELECT (COUNT(?s) AS ?n) WHERE {{ ?st ldcm:has_series ?s . ?s ldcm:T00080060 \"CT\" }}"
        ),
    );
    let n: u64 = ct.lines().nth(1).unwrap().parse().unwrap();
    assert!(n >= 5, "{ct}");
}
