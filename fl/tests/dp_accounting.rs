//! The RDP accountant against Google's `dp_accounting` (PyPI, in the test venv that
//! `scripts/setup.sh --test` makes) on a grid of sampling rates, noise multipliers, step counts
//! and deltas.

use amicus_fl::rdp::Accountant;
use std::path::PathBuf;
use std::process::Command;

fn python() -> Option<PathBuf> {
    let p = std::env::var_os("AMICUS_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var("HOME").unwrap_or_default())
                .join(".cache/amicus/venv/bin/python")
        });
    p.is_file().then_some(p)
}

const SCRIPT: &str = r#"
import json, sys
import dp_accounting
from dp_accounting.rdp import rdp_privacy_accountant as r
out = []
for q, sigma, steps, delta in json.load(sys.stdin):
    acc = r.RdpAccountant(list(range(2, 257)))
    acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)
    eps, order = acc.get_epsilon_and_optimal_order(delta)
    out.append([float(eps), int(order)])
print(json.dumps(out))
"#;

#[test]
fn epsilon_matches_dp_accounting_on_a_grid() {
    let Some(py) = python() else {
        assert!(
            std::env::var_os("CI").is_none(),
            "test venv missing under CI: run scripts/setup.sh --test"
        );
        eprintln!("skipped: no venv (run scripts/setup.sh --test)");
        return;
    };
    let mut grid = Vec::new();
    for q in [0.001, 0.01, 0.2, 1.0] {
        for sigma in [0.7, 1.0, 5.0] {
            for steps in [1u64, 50, 2000] {
                for delta in [1e-5, 1e-8] {
                    grid.push((q, sigma, steps, delta));
                }
            }
        }
    }
    let input = serde_json::to_string(&grid).unwrap();
    let mut child = Command::new(py)
        .args(["-c", SCRIPT])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "dp_accounting failed");
    let reference: Vec<(f64, u32)> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(reference.len(), grid.len());
    for (&(q, sigma, steps, delta), &(eps, order)) in grid.iter().zip(&reference) {
        let mut acc = Accountant::default();
        acc.compose(q, sigma, steps).unwrap();
        let (got, at) = acc.epsilon(delta).unwrap();
        assert!(
            (got - eps).abs() <= 1e-7 * eps.max(1.0),
            "q {q} σ {sigma} T {steps} δ {delta}: amicus {got} (order {at}), dp_accounting {eps} (order {order})"
        );
    }
}
