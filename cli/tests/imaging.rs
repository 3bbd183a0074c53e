//! Imaging through the contract: the lesion-volumes train finds GTVs with a cohort query, the
//! station rasterises them on their CT grid and loads the CT; only aggregates leave.

mod common;

use common::{Fixture, ok, s};

fn imaging_station(profile: &str, patients: usize, seed: u64) -> Fixture {
    let f = Fixture::new();
    f.synth_archive(profile, patients, seed);
    f.policy_edit("min_patients = 10", "min_patients = 1");
    f.policy_edit(
        "allowed_capabilities = [\"cohort\"]",
        "allowed_capabilities = [\"cohort\", \"imaging\"]",
    );
    f
}

#[test]
fn lesion_volumes_match_the_ground_truth() {
    let f = imaging_station("legacy", 5, 8);
    let b = f.ready("lesion-volumes");
    // Before the archive is indexed, imaging (like cohort) is not available.
    let out = f.run(&b, None);
    assert!(!out.ok);
    ok(&["station", "index", "--dir", s(&f.station())]);
    let out = f.run(&b, None);
    assert!(out.ok, "{}", out.text());
    let summary: serde_json::Value = serde_json::from_slice(
        &std::fs::read(
            f.released()
                .into_iter()
                .find(|p| p.ends_with("summary.json"))
                .unwrap(),
        )
        .unwrap(),
    )
    .unwrap();
    let truth = f.ground_truth();
    let lesions: Vec<&serde_json::Value> = truth["patients"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["phantom"]["lesions"].as_array().unwrap())
        .collect();
    assert!(!lesions.is_empty(), "choose a seed with lesions");
    assert_eq!(summary["lesions"], lesions.len(), "{summary}");
    let expected: f64 = lesions
        .iter()
        .map(|l| {
            let r: Vec<f64> = l["radii"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap())
                .collect();
            4.0 / 3.0 * std::f64::consts::PI * r[0] * r[1] * r[2]
        })
        .sum();
    let measured = summary["total_volume_mm3"].as_f64().unwrap();
    // 5 mm slices: small lesions are coarse, the total is still close.
    assert!(
        (measured - expected).abs() / expected < 0.1,
        "measured {measured:.0} mm³, ground truth {expected:.0} mm³"
    );
    // Lesions are soft tissue inside lung (around -850 HU); with 5 mm slices the partial
    // volume pulls their mean down, but far above lung.
    let hu = summary["mean_hu_in_lesions"].as_f64().unwrap();
    assert!(hu > -500.0 && hu < 200.0, "{hu}");

    let calls: Vec<serde_json::Value> = f
        .events()
        .into_iter()
        .filter(|e| e["event"] == "capability-call" && e["capability"] == "imaging")
        .collect();
    assert!(
        calls
            .iter()
            .any(|c| c["call"] == "load-series" && c["outcome"] == "ok")
    );
    assert_eq!(
        calls
            .iter()
            .filter(|c| c["call"] == "load-mask" && c["outcome"] == "ok")
            .count(),
        lesions.len()
    );
    f.audit_verifies();
}

#[test]
fn imaging_refusals_are_clear_and_audited() {
    let f = imaging_station("legacy", 1, 2);
    ok(&["station", "index", "--dir", s(&f.station())]);
    let b = f.ready("testing/misbehave");
    // An unknown series: invalid argument, the run fails, nothing released.
    let out = f.run(&b, Some(r#"{"do":"imaging"}"#));
    assert!(!out.ok, "{}", out.text());
    let call = f.last_event("capability-call");
    assert_eq!(call["call"], "load-series");
    assert!(
        call["outcome"]
            .as_str()
            .unwrap()
            .starts_with("invalid-argument: series 1.2.3 has no indexed images"),
        "{call}"
    );
    // A volume larger than the run's memory limit (here: padded to 2000 × 2000 × 100 voxels,
    // 1.6 GB, in a train limited to 32 MiB) is refused before it is allocated.
    let truth = f.ground_truth();
    let ct = truth["patients"][0]["ct_series_uid"].as_str().unwrap();
    let params =
        serde_json::json!({"do": "imaging", "series": ct, "size": [2000, 2000, 100]}).to_string();
    let out = f.run(&b, Some(&params));
    assert!(!out.ok);
    f.last_call_outcome("limit-exceeded");
    assert!(f.released().is_empty());
}

#[test]
fn lesion_patches_are_balanced_centred_and_reproducible() {
    let f = imaging_station("legacy", 4, 8);
    ok(&["station", "index", "--dir", s(&f.station())]);
    let b = f.ready("lesion-patches");
    let summaries = |f: &Fixture| -> Vec<serde_json::Value> {
        f.released()
            .into_iter()
            .filter(|p| p.ends_with("summary.json"))
            .map(|p| serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap())
            .collect()
    };
    let out = f.run(&b, Some(r#"{"patches": 8, "seed": 3}"#));
    assert!(out.ok, "{}", out.text());
    let first = summaries(&f).remove(0);
    let series = first["series"].as_u64().unwrap();
    assert!(series > 0, "choose a seed with lesions: {first}");
    // Exactly the requested number and balance, every foreground patch centred on the label.
    assert_eq!(first["patches"], 8 * series, "{first}");
    assert_eq!(first["foreground_patches"], 4 * series, "{first}");
    assert_eq!(
        first["centres_on_label"], first["foreground_patches"],
        "{first}"
    );
    let fg = first["mean_label_fraction_foreground"].as_f64().unwrap();
    let bg = first["mean_label_fraction_background"].as_f64().unwrap();
    assert!(fg > 0.05 && fg > 5.0 * bg, "{first}");
    // Windowed to [0, 1]; every lesion-centred crop holds lesion; one 2D slice per series.
    assert!(first["intensity_min"].as_f64().unwrap() >= 0.0, "{first}");
    assert!(first["intensity_max"].as_f64().unwrap() <= 1.0, "{first}");
    assert_eq!(first["crops_with_lesion"], first["lesions"], "{first}");
    assert_eq!(first["slices_2d"], series, "{first}");
    // The same seed draws the same patches on a second run.
    let out = f.run(&b, Some(r#"{"patches": 8, "seed": 3}"#));
    assert!(out.ok, "{}", out.text());
    assert_eq!(summaries(&f), [first.clone(), first]);
    let calls: Vec<serde_json::Value> = f
        .events()
        .into_iter()
        .filter(|e| e["event"] == "capability-call" && e["call"] == "sample-patches")
        .collect();
    assert_eq!(calls.len() as u64, 2 * series);
    assert!(calls.iter().all(|c| c["outcome"] == "ok"), "{calls:?}");
    assert!(calls[0]["detail"].as_str().unwrap().contains("seed=3"));
    // A request the station cannot honour is refused as an invalid argument.
    let out = f.run(&b, Some(r#"{"patch": [0, 24, 3]}"#));
    assert!(!out.ok);
    f.last_call_outcome("invalid-argument");
    f.audit_verifies();
}
