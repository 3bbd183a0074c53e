//! `amicus demo --quick`: the federated demo end to end as a user runs it (registry, three
//! station daemons, a federated job, the report, audit verification), and the model learned.

mod common;

use common::{amicus, bundle, s};

#[test]
fn the_quick_demo_learns_and_every_audit_chain_verifies() {
    if let Err(e) = amicus_kernels::available() {
        assert!(std::env::var_os("CI").is_none(), "{e}");
        eprintln!("skipped: {e}");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("demo");
    let train = bundle("fed-seg");
    let run = amicus(&["demo", "--quick", "--out", s(&out), "--train", s(&train)]);
    assert!(run.ok, "{}", run.text());
    // `amicus demo` fails if any station's log does not verify through the registry.
    assert_eq!(
        run.stdout.matches("audit log OK").count(),
        3,
        "{}",
        run.stdout
    );
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("report/report.json")).unwrap()).unwrap();
    let dice = |station: &str, round: u64| {
        report["per_round"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["station"] == station && p["round"] == round)
            .and_then(|p| p["metrics"]["test_dice_global"].as_f64())
            .unwrap_or_else(|| panic!("no Dice for {station} in round {round}"))
    };
    let mut after = Vec::new();
    for st in ["st1", "st2", "st3"] {
        let (b, a) = (dice(st, 1), dice(st, 4));
        eprintln!("{st}: test Dice {b:.3} → {a:.3}");
        assert!(a > b, "{st} did not improve: {b} → {a}");
        after.push(a);
    }
    let mean = after.iter().sum::<f64>() / 3.0;
    assert!(mean > 0.3, "mean final test Dice {mean}");
    let html = std::fs::read_to_string(out.join("report/report.html")).unwrap();
    assert!(html.matches("<svg").count() >= 4);
    assert!(
        std::fs::read_to_string(out.join("registry-trail.txt"))
            .unwrap()
            .contains("job-round")
    );
    // With secure aggregation the stations mask their updates; the model still learns.
    let masked = tmp.path().join("demo-masked");
    let run = amicus(&[
        "demo",
        "--quick",
        "--secure-aggregation",
        "--rounds",
        "2",
        "--out",
        s(&masked),
        "--train",
        s(&train),
    ]);
    assert!(run.ok, "{}", run.text());
    assert_eq!(run.stdout.matches("audit log OK").count(), 3);
    assert!(run.stdout.contains("unmasked only each round's sum"));
    let trail = std::fs::read_to_string(masked.join("registry-trail.txt")).unwrap();
    for kind in ["ok keys", "ok shares", "ok reveal"] {
        assert_eq!(trail.matches(kind).count(), 6, "{kind}: {trail}");
    }
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(masked.join("report/report.json")).unwrap()).unwrap();
    let mean_dice = |round: u64| {
        report["per_round"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p["round"] == round)
            .filter_map(|p| p["metrics"]["test_dice_global"].as_f64())
            .sum::<f64>()
            / 3.0
    };
    let (b, a) = (mean_dice(1), mean_dice(3));
    eprintln!("masked: mean test Dice {b:.3} → {a:.3}");
    assert!(a > b + 0.05, "masked demo did not learn: {b} → {a}");

    // A second run replaces the demo's own directory, but never someone else's.
    let other = tmp.path().join("not-a-demo");
    std::fs::create_dir(&other).unwrap();
    std::fs::write(other.join("thesis.tex"), "precious").unwrap();
    let refused = amicus(&["demo", "--quick", "--out", s(&other)]);
    assert!(
        !refused.ok && refused.text().contains("not an earlier demo"),
        "{}",
        refused.text()
    );
    assert_eq!(
        std::fs::read_to_string(other.join("thesis.tex")).unwrap(),
        "precious"
    );
}
