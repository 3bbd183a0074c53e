//! The privacy a station has spent: one ledger per train digest (`privacy/<digest>.json`),
//! an RDP accountant over every update the station released for that digest.
//!
//! Owns the ledger files and the budget check; the mechanism itself (clipping and noise) is
//! `sandbox::privatise`, the budgets are the policy's `[privacy]`.

use crate::policy::PrivacyPolicy;
use amicus_bundle::Digest;
use amicus_fl::rdp::Accountant;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

pub const PRIVACY_DIR: &str = "privacy";

#[derive(Debug, thiserror::Error)]
pub enum PrivacyError {
    #[error("privacy ledger {path}: {reason}")]
    Ledger { path: PathBuf, reason: String },
}

/// Everything one train digest has spent on this station.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Ledger {
    /// Noised updates released.
    pub releases: u64,
    pub accountant: Accountant,
    /// Cohort queries the digest's runs made here.
    #[serde(default)]
    pub queries: u64,
    /// ε of the noisy tallies answered (pure ε-DP, composed by addition).
    #[serde(default)]
    pub tally_epsilon: f64,
}

fn path(station_dir: &Path, digest: &Digest) -> PathBuf {
    station_dir
        .join(PRIVACY_DIR)
        .join(format!("{}.json", digest.to_hex()))
}

impl Ledger {
    /// The digest's ledger (empty if it has spent nothing).
    pub fn load(station_dir: &Path, digest: &Digest) -> Result<Ledger, PrivacyError> {
        let path = path(station_dir, digest);
        let err = |reason: String| PrivacyError::Ledger {
            path: path.clone(),
            reason,
        };
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| err(e.to_string())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Ledger::default()),
            Err(e) => Err(err(e.to_string())),
        }
    }

    /// Write atomically.
    pub fn save(&self, station_dir: &Path, digest: &Digest) -> Result<(), PrivacyError> {
        let path = path(station_dir, digest);
        let err = |reason: String| PrivacyError::Ledger {
            path: path.clone(),
            reason,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| err(e.to_string()))?;
        }
        let bytes = serde_json::to_vec_pretty(self).expect("a ledger serialises");
        amicus_bundle::bundle::write_atomic(&path, &bytes).map_err(|e| err(e.to_string()))
    }

    /// ε spent so far at the policy's δ (0 when nothing was released).
    pub fn epsilon(&self, delta: f64) -> f64 {
        let tallies = self.tally_epsilon.max(0.0);
        if self.releases == 0 {
            return tallies;
        }
        // The updates' (ε, δ) and the tallies' pure ε compose by addition.
        self.accountant
            .epsilon(delta)
            .map_or(f64::INFINITY, |e| e.0 + tallies)
    }

    /// ε after one more release with noise multiplier `sigma`.
    pub fn epsilon_after(&self, sigma: f64, delta: f64) -> Result<f64, String> {
        self.accountant
            .epsilon_after(1.0, sigma, 1, delta)
            .map(|e| e + self.tally_epsilon.max(0.0))
            .map_err(|e| e.to_string())
    }

    pub fn spend(&mut self, sigma: f64) -> Result<(), String> {
        self.accountant
            .compose(1.0, sigma, 1)
            .map_err(|e| e.to_string())?;
        self.releases += 1;
        Ok(())
    }
}

/// Spend one release with noise multiplier `sigma` for `digest`, if the budget still allows it
/// (checked again here: another run of the same digest may have spent since admission).
/// Load, check and save happen under an exclusive lock on `privacy/<digest>.lock`, so
/// concurrent runs never lose a release. Returns the ε spent so far, or the refusal.
pub fn spend(
    station_dir: &Path,
    digest: &Digest,
    policy: &PrivacyPolicy,
    sigma: f64,
) -> Result<Result<f64, String>, PrivacyError> {
    let dir = station_dir.join(PRIVACY_DIR);
    let lock_path = dir.join(format!("{}.lock", digest.to_hex()));
    let err = |e: std::io::Error| PrivacyError::Ledger {
        path: lock_path.clone(),
        reason: e.to_string(),
    };
    std::fs::create_dir_all(&dir).map_err(err)?;
    let lock = std::fs::File::create(&lock_path).map_err(err)?;
    lock.lock().map_err(err)?;
    let mut ledger = Ledger::load(station_dir, digest)?;
    if let Err(reason) = admit_round(policy, &ledger, digest, Some(sigma)) {
        return Ok(Err(reason));
    }
    ledger.spend(sigma).map_err(|reason| PrivacyError::Ledger {
        path: dir.clone(),
        reason,
    })?;
    ledger.save(station_dir, digest)?;
    Ok(Ok(ledger.epsilon(policy.delta)))
}

/// Record a run's cohort queries and the ε of its noisy tallies for `digest` (under the
/// digest's lock). Returns the ledger after.
pub fn spend_queries(
    station_dir: &Path,
    digest: &Digest,
    queries: u64,
    tally_epsilon: f64,
) -> Result<Ledger, PrivacyError> {
    let dir = station_dir.join(PRIVACY_DIR);
    let lock_path = dir.join(format!("{}.lock", digest.to_hex()));
    let err = |e: std::io::Error| PrivacyError::Ledger {
        path: lock_path.clone(),
        reason: e.to_string(),
    };
    std::fs::create_dir_all(&dir).map_err(err)?;
    let lock = std::fs::File::create(&lock_path).map_err(err)?;
    lock.lock().map_err(err)?;
    let mut ledger = Ledger::load(station_dir, digest)?;
    ledger.queries = ledger.queries.saturating_add(queries);
    if tally_epsilon.is_finite() && tally_epsilon > 0.0 {
        ledger.tally_epsilon += tally_epsilon;
    }
    ledger.save(station_dir, digest)?;
    Ok(ledger)
}

/// Whether a round with this noise may run: `Err(reason)` to refuse.
pub fn admit_round(
    policy: &PrivacyPolicy,
    ledger: &Ledger,
    digest: &Digest,
    noise_multiplier: Option<f64>,
) -> Result<Option<f64>, String> {
    let budget = policy.budget(digest);
    let Some(sigma) = noise_multiplier else {
        if policy.require_noise {
            return Err(
                "the station's policy requires differentially private updates and the job's plan adds no noise"
                    .into(),
            );
        }
        return Ok(None);
    };
    let after = ledger.epsilon_after(sigma, policy.delta)?;
    if after > budget {
        return Err(format!(
            "privacy budget exhausted: this round would bring ε to {after:.3} (δ {}), the budget for this train is {budget}; spent so far {:.3} over {} releases",
            policy.delta,
            ledger.epsilon(policy.delta),
            ledger.releases
        ));
    }
    Ok(Some(after))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_refuses_the_round_that_would_exceed_it() {
        let dir = tempfile::tempdir().unwrap();
        let digest = amicus_bundle::digest::sha256(b"a train");
        let policy = PrivacyPolicy {
            default_epsilon: 8.0,
            ..PrivacyPolicy::default()
        };
        let mut ledger = Ledger::load(dir.path(), &digest).unwrap();
        assert_eq!(ledger.epsilon(1e-5), 0.0);
        let mut rounds = 0;
        while admit_round(&policy, &ledger, &digest, Some(2.0)).is_ok() {
            ledger.spend(2.0).unwrap();
            ledger.save(dir.path(), &digest).unwrap();
            ledger = Ledger::load(dir.path(), &digest).unwrap();
            rounds += 1;
            assert!(rounds < 100, "budget never ran out");
        }
        let spent = ledger.epsilon(1e-5);
        assert!(spent <= 8.0 && spent > 4.0, "spent {spent}");
        assert!(rounds >= 2, "{rounds}");
        let refusal = admit_round(&policy, &ledger, &digest, Some(2.0)).unwrap_err();
        assert!(refusal.contains("privacy budget exhausted"), "{refusal}");
        // Another digest has its own ledger; a named budget overrides the default.
        let other = amicus_bundle::digest::sha256(b"another train");
        assert!(
            admit_round(
                &policy,
                &Ledger::load(dir.path(), &other).unwrap(),
                &other,
                Some(2.0)
            )
            .is_ok()
        );
        let strict = PrivacyPolicy {
            budgets: vec![crate::policy::PrivacyBudget {
                digest: other,
                epsilon: 0.1,
            }],
            ..policy.clone()
        };
        assert!(admit_round(&strict, &Ledger::default(), &other, Some(2.0)).is_err());
        // Without noise: allowed unless the policy requires it.
        assert_eq!(admit_round(&policy, &ledger, &digest, None), Ok(None));
        let require = PrivacyPolicy {
            require_noise: true,
            ..policy
        };
        assert!(admit_round(&require, &ledger, &digest, None).is_err());
    }

    #[test]
    fn concurrent_spends_lose_nothing_and_stop_at_the_budget() {
        let dir = tempfile::tempdir().unwrap();
        let digest = amicus_bundle::digest::sha256(b"a train");
        let policy = PrivacyPolicy {
            default_epsilon: 1e12,
            ..PrivacyPolicy::default()
        };
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..10 {
                        spend(dir.path(), &digest, &policy, 1.0).unwrap().unwrap();
                    }
                });
            }
        });
        let ledger = Ledger::load(dir.path(), &digest).unwrap();
        assert_eq!(ledger.releases, 40);
        let tight = PrivacyPolicy {
            default_epsilon: ledger.epsilon(1e-5),
            ..policy
        };
        let refused = spend(dir.path(), &digest, &tight, 1.0)
            .unwrap()
            .unwrap_err();
        assert!(refused.contains("exhausted"), "{refused}");
        assert_eq!(Ledger::load(dir.path(), &digest).unwrap().releases, 40);
    }

    /// One Gaussian mechanism with σ has RDP α/(2σ²); k of them k·α/(2σ²). Checked against
    /// the closed form of the conversion the accountant uses, at its best order.
    #[test]
    fn ledger_epsilon_matches_the_gaussian_closed_form() {
        let mut ledger = Ledger::default();
        for _ in 0..5 {
            ledger.spend(3.0).unwrap();
        }
        let delta: f64 = 1e-5;
        // Canonne–Kamath–Steinke: ε = rdp + ln((α−1)/α) − (ln δ + ln α)/(α−1).
        let best = (2..=256u32)
            .map(|a| {
                let a = f64::from(a);
                let rdp = 5.0 * a / (2.0 * 9.0);
                rdp + ((a - 1.0) / a).ln() - (delta.ln() + a.ln()) / (a - 1.0)
            })
            .fold(f64::INFINITY, f64::min);
        let got = ledger.epsilon(delta);
        assert!((got - best).abs() < 1e-9, "{got} vs {best}");
    }
}
