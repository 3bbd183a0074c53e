//! Combining the updates of one round.
//!
//! An update is a station's weight delta (new local weights minus the round's global weights),
//! flattened, with the number of samples it was trained on. Strategies:
//! - `fed_avg`: mean weighted by samples (McMahan et al. 2017);
//! - `coordinate_median`, `trimmed_mean`: robust to a minority of arbitrary updates (Yin et al.
//!   2018);
//! - `clip_norm`: scale an update down to an L2 norm bound before combining;
//! - `ServerOptimizer`: apply the combined delta as a pseudo-gradient with SGD, Adam or Yogi
//!   (Reddi et al. 2021, "Adaptive Federated Optimization").
//!
//! Updates with a NaN or infinity, or of the wrong length, are rejected by `screen` before any
//! strategy sees them.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq)]
pub struct Update {
    pub delta: Vec<f32>,
    pub samples: u64,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum AggregateError {
    #[error("no updates to combine")]
    Empty,
    #[error("updates carry no samples")]
    NoSamples,
    #[error("trimming {trim} of {n} updates from each end leaves none")]
    OverTrimmed { trim: usize, n: usize },
}

/// Why `screen` set an update aside.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rejection {
    WrongLength { expected: usize, got: usize },
    NotFinite { index: usize },
    NoSamples,
}

/// Keep the updates that can be combined: the right length, every value finite, some samples.
/// Returns the kept updates and, for each rejected one, its position and why.
pub fn screen(updates: Vec<Update>, len: usize) -> (Vec<Update>, Vec<(usize, Rejection)>) {
    let mut kept = Vec::new();
    let mut rejected = Vec::new();
    for (i, u) in updates.into_iter().enumerate() {
        if u.delta.len() != len {
            rejected.push((
                i,
                Rejection::WrongLength {
                    expected: len,
                    got: u.delta.len(),
                },
            ));
        } else if let Some(index) = u.delta.iter().position(|x| !x.is_finite()) {
            rejected.push((i, Rejection::NotFinite { index }));
        } else if u.samples == 0 {
            rejected.push((i, Rejection::NoSamples));
        } else {
            kept.push(u);
        }
    }
    (kept, rejected)
}

fn check(updates: &[Update]) -> Result<usize, AggregateError> {
    let first = updates.first().ok_or(AggregateError::Empty)?;
    Ok(first.delta.len())
}

/// Mean of the deltas weighted by samples (accumulated in f64).
pub fn fed_avg(updates: &[Update]) -> Result<Vec<f32>, AggregateError> {
    let n = check(updates)?;
    let total: u64 = updates.iter().map(|u| u.samples).sum();
    if total == 0 {
        return Err(AggregateError::NoSamples);
    }
    let mut acc = vec![0f64; n];
    for u in updates {
        let w = u.samples as f64 / total as f64;
        for (a, x) in acc.iter_mut().zip(&u.delta) {
            *a += w * f64::from(*x);
        }
    }
    Ok(acc.into_iter().map(|a| a as f32).collect())
}

/// Per coordinate, the median of the deltas (the mean of the two middle values for an even
/// count). Ignores sample counts: each station is one vote.
pub fn coordinate_median(updates: &[Update]) -> Result<Vec<f32>, AggregateError> {
    let n = check(updates)?;
    let mut column = Vec::with_capacity(updates.len());
    Ok((0..n)
        .map(|j| {
            column.clear();
            column.extend(updates.iter().map(|u| u.delta[j]));
            column.sort_by(f32::total_cmp);
            let m = column.len();
            if m % 2 == 1 {
                column[m / 2]
            } else {
                ((f64::from(column[m / 2 - 1]) + f64::from(column[m / 2])) / 2.0) as f32
            }
        })
        .collect())
}

/// Per coordinate, drop the `trim` smallest and `trim` largest values and average the rest.
pub fn trimmed_mean(updates: &[Update], trim: usize) -> Result<Vec<f32>, AggregateError> {
    let n = check(updates)?;
    // `trim` may come from outside: no overflow on the way to the refusal.
    if trim.checked_mul(2).is_none_or(|t| t >= updates.len()) {
        return Err(AggregateError::OverTrimmed {
            trim,
            n: updates.len(),
        });
    }
    let mut column = Vec::with_capacity(updates.len());
    Ok((0..n)
        .map(|j| {
            column.clear();
            column.extend(updates.iter().map(|u| u.delta[j]));
            column.sort_by(f32::total_cmp);
            let kept = &column[trim..column.len() - trim];
            (kept.iter().map(|&x| f64::from(x)).sum::<f64>() / kept.len() as f64) as f32
        })
        .collect())
}

pub fn l2_norm(v: &[f32]) -> f64 {
    v.iter()
        .map(|&x| f64::from(x) * f64::from(x))
        .sum::<f64>()
        .sqrt()
}

/// Scale `delta` so its L2 norm is at most `max_norm`; returns the factor applied (1 when it
/// was within the bound).
pub fn clip_norm(delta: &mut [f32], max_norm: f64) -> f64 {
    let norm = l2_norm(delta);
    if norm <= max_norm || norm == 0.0 {
        return 1.0;
    }
    let factor = max_norm / norm;
    for x in delta.iter_mut() {
        *x = (f64::from(*x) * factor) as f32;
    }
    factor
}

/// How the registry turns the combined delta into new global weights.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum ServerOptimizer {
    /// `w += lr · Δ` (lr 1 is plain FedAvg).
    Sgd { lr: f64 },
    /// FedAdam.
    Adam {
        lr: f64,
        beta1: f64,
        beta2: f64,
        tau: f64,
    },
    /// FedYogi.
    Yogi {
        lr: f64,
        beta1: f64,
        beta2: f64,
        tau: f64,
    },
}

/// A server optimizer's moments, kept in the round checkpoint.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ServerState {
    pub m: Vec<f64>,
    pub v: Vec<f64>,
    pub rounds: u64,
}

impl ServerOptimizer {
    /// Apply the round's combined `delta` to `global` in place.
    pub fn apply(&self, global: &mut [f32], delta: &[f32], state: &mut ServerState) {
        assert_eq!(global.len(), delta.len(), "delta matches the model");
        state.rounds += 1;
        match *self {
            ServerOptimizer::Sgd { lr } => {
                for (w, d) in global.iter_mut().zip(delta) {
                    *w = (f64::from(*w) + lr * f64::from(*d)) as f32;
                }
            }
            ServerOptimizer::Adam {
                lr,
                beta1,
                beta2,
                tau,
            }
            | ServerOptimizer::Yogi {
                lr,
                beta1,
                beta2,
                tau,
            } => {
                let yogi = matches!(self, ServerOptimizer::Yogi { .. });
                if state.m.len() != global.len() {
                    state.m = vec![0.0; global.len()];
                    // Reddi et al. initialise v at τ².
                    state.v = vec![tau * tau; global.len()];
                }
                for i in 0..global.len() {
                    let d = f64::from(delta[i]);
                    state.m[i] = beta1 * state.m[i] + (1.0 - beta1) * d;
                    let d2 = d * d;
                    state.v[i] = if yogi {
                        state.v[i] - (1.0 - beta2) * d2 * (state.v[i] - d2).signum()
                    } else {
                        beta2 * state.v[i] + (1.0 - beta2) * d2
                    };
                    global[i] =
                        (f64::from(global[i]) + lr * state.m[i] / (state.v[i].sqrt() + tau)) as f32;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn u(delta: &[f32], samples: u64) -> Update {
        Update {
            delta: delta.to_vec(),
            samples,
        }
    }

    #[test]
    fn fed_avg_weights_by_samples() {
        let r = fed_avg(&[u(&[1.0, 0.0], 1), u(&[4.0, 3.0], 2)]).unwrap();
        assert_eq!(r, vec![3.0, 2.0]);
        assert_eq!(fed_avg(&[]), Err(AggregateError::Empty));
    }

    #[test]
    fn robust_strategies_ignore_a_scaled_update() {
        let honest = [
            u(&[1.0, -1.0], 10),
            u(&[1.2, -0.8], 10),
            u(&[0.8, -1.2], 10),
            u(&[1.1, -0.9], 10),
        ];
        let mut all = honest.to_vec();
        all.push(u(&[1000.0, 1000.0], 10));
        let med = coordinate_median(&all).unwrap();
        assert!(
            (med[0] - 1.1).abs() < 1e-6 && (med[1] + 0.9).abs() < 1e-6,
            "{med:?}"
        );
        let tm = trimmed_mean(&all, 1).unwrap();
        assert!((tm[0] - 1.1).abs() < 1e-5, "{tm:?}");
        let avg = fed_avg(&all).unwrap();
        assert!(avg[0] > 100.0, "plain averaging is not robust: {avg:?}");
        assert_eq!(
            trimmed_mean(&all, 3),
            Err(AggregateError::OverTrimmed { trim: 3, n: 5 })
        );
        // Even count: the mean of the middle two.
        assert_eq!(coordinate_median(&honest).unwrap()[0], 1.05);
    }

    #[test]
    fn screening_rejects_nan_infinity_wrong_length_and_empty() {
        let (kept, rejected) = screen(
            vec![
                u(&[1.0, 2.0], 3),
                u(&[f32::NAN, 0.0], 3),
                u(&[0.0, f32::INFINITY], 3),
                u(&[1.0], 3),
                u(&[0.0, 0.0], 0),
            ],
            2,
        );
        assert_eq!(kept, vec![u(&[1.0, 2.0], 3)]);
        assert_eq!(
            rejected,
            vec![
                (1, Rejection::NotFinite { index: 0 }),
                (2, Rejection::NotFinite { index: 1 }),
                (
                    3,
                    Rejection::WrongLength {
                        expected: 2,
                        got: 1
                    }
                ),
                (4, Rejection::NoSamples),
            ]
        );
    }

    #[test]
    fn clipping_bounds_the_norm_and_keeps_the_direction() {
        let mut d = vec![3.0, 4.0];
        assert_eq!(clip_norm(&mut d, 10.0), 1.0);
        assert_eq!(d, vec![3.0, 4.0]);
        let f = clip_norm(&mut d, 1.0);
        assert!((f - 0.2).abs() < 1e-12);
        assert!((d[0] - 0.6).abs() < 1e-6 && (d[1] - 0.8).abs() < 1e-6);
    }

    #[test]
    fn fed_adam_and_yogi_match_a_hand_computation() {
        // One coordinate, two rounds, by hand from Reddi et al. (2021), Algorithm 2.
        let (lr, b1, b2, tau) = (0.1, 0.9, 0.99, 1e-3);
        let mut w = vec![1.0f32];
        let mut st = ServerState::default();
        ServerOptimizer::Adam {
            lr,
            beta1: b1,
            beta2: b2,
            tau,
        }
        .apply(&mut w, &[0.5], &mut st);
        let m1 = 0.1 * 0.5;
        let v1 = 0.99 * tau * tau + 0.01 * 0.25;
        let w1 = 1.0 + lr * m1 / (f64::sqrt(v1) + tau);
        assert!((f64::from(w[0]) - w1).abs() < 1e-6, "{} vs {w1}", w[0]);
        let mut wy = vec![1.0f32];
        let mut sy = ServerState::default();
        let yogi = ServerOptimizer::Yogi {
            lr,
            beta1: b1,
            beta2: b2,
            tau,
        };
        yogi.apply(&mut wy, &[0.5], &mut sy);
        // v0 = τ² < Δ² = 0.25: sign(v0 − Δ²) = −1, so v1 = τ² + 0.01·0.25.
        let vy1 = tau * tau + 0.01 * 0.25;
        assert!((sy.v[0] - vy1).abs() < 1e-12);
        yogi.apply(&mut wy, &[-0.5], &mut sy);
        let my2 = 0.9 * m1 + 0.1 * -0.5;
        let vy2 = vy1 + 0.01 * 0.25; // still v < Δ²
        let wy2 = f64::from(1.0f32 + (lr * m1 / (vy1.sqrt() + tau)) as f32)
            + lr * my2 / (vy2.sqrt() + tau);
        assert!((f64::from(wy[0]) - wy2).abs() < 1e-5, "{} vs {wy2}", wy[0]);
        assert_eq!(sy.rounds, 2);
    }

    proptest! {
        #[test]
        fn identical_updates_combine_to_themselves(
            d in proptest::collection::vec(-100f32..100.0, 1..20),
            n in 1usize..7,
            s in 1u64..1000,
        ) {
            let all: Vec<Update> = (0..n).map(|_| Update { delta: d.clone(), samples: s }).collect();
            for r in [fed_avg(&all).unwrap(), coordinate_median(&all).unwrap()] {
                for (a, b) in r.iter().zip(&d) {
                    prop_assert!((a - b).abs() <= 1e-4 * b.abs().max(1.0));
                }
            }
        }

        #[test]
        fn median_lies_within_the_honest_range(
            cols in proptest::collection::vec(proptest::collection::vec(-10f32..10.0, 3), 5),
            bad in -1e6f32..1e6,
        ) {
            // Five honest updates of three coordinates, two byzantine ones.
            let mut all: Vec<Update> = cols.iter().map(|c| Update { delta: c.clone(), samples: 1 }).collect();
            all.push(Update { delta: vec![bad; 3], samples: 1 });
            all.push(Update { delta: vec![-bad; 3], samples: 1 });
            let med = coordinate_median(&all).unwrap();
            for j in 0..3 {
                let lo = cols.iter().map(|c| c[j]).fold(f32::MAX, f32::min);
                let hi = cols.iter().map(|c| c[j]).fold(f32::MIN, f32::max);
                prop_assert!(med[j] >= lo - 1e-4 && med[j] <= hi + 1e-4);
            }
        }
    }
}
