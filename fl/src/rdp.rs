//! Privacy accounting for the sampled Gaussian mechanism with Rényi differential privacy
//! (Mironov 2017; Mironov, Talwar and Zhang 2019): each step samples records with probability
//! `q`, clips each record's contribution and adds Gaussian noise of standard deviation
//! `sigma` × the clipping bound. RDP adds up over steps; `epsilon` converts the total to
//! (ε, δ)-DP with the bound of Canonne, Kamath and Steinke (2020), Proposition 12, minimised
//! over the orders. Integer orders 2..=256, as Google's `dp_accounting` library computes them
//! for integer orders; the test suite compares the two.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RdpError {
    #[error("sampling probability must be in [0, 1] (got {0})")]
    Sampling(f64),
    #[error("noise multiplier must be positive and finite (got {0})")]
    Noise(f64),
    #[error("delta must be in (0, 1) (got {0})")]
    Delta(f64),
}

fn log_add(a: f64, b: f64) -> f64 {
    if a == f64::NEG_INFINITY {
        return b;
    }
    if b == f64::NEG_INFINITY {
        return a;
    }
    let (hi, lo) = if a > b { (a, b) } else { (b, a) };
    hi + (lo - hi).exp().ln_1p()
}

/// RDP at integer order `alpha` of one step of the sampled Gaussian mechanism.
pub fn sampled_gaussian_rdp(q: f64, sigma: f64, alpha: u32) -> Result<f64, RdpError> {
    if !(0.0..=1.0).contains(&q) {
        return Err(RdpError::Sampling(q));
    }
    if !(sigma > 0.0 && sigma.is_finite()) {
        return Err(RdpError::Noise(sigma));
    }
    let a = f64::from(alpha);
    if q == 0.0 {
        return Ok(0.0);
    }
    if q == 1.0 {
        return Ok(a / (2.0 * sigma * sigma));
    }
    let (lq, l1q) = (q.ln(), (-q).ln_1p());
    let mut log_fact = vec![0.0f64; alpha as usize + 1];
    for i in 1..=alpha as usize {
        log_fact[i] = log_fact[i - 1] + (i as f64).ln();
    }
    let mut log_a = f64::NEG_INFINITY;
    for k in 0..=alpha as usize {
        let kf = k as f64;
        let log_binom = log_fact[alpha as usize] - log_fact[k] - log_fact[alpha as usize - k];
        let term = log_binom + kf * lq + (a - kf) * l1q + (kf * kf - kf) / (2.0 * sigma * sigma);
        log_a = log_add(log_a, term);
    }
    Ok(log_a / (a - 1.0))
}

/// Convert RDP at `orders` to ε for `delta`; returns (ε, the order that gave it).
pub fn epsilon(orders: &[u32], rdp: &[f64], delta: f64) -> Result<(f64, u32), RdpError> {
    if !(delta > 0.0 && delta < 1.0) {
        return Err(RdpError::Delta(delta));
    }
    let mut best = (f64::INFINITY, orders.first().copied().unwrap_or(0));
    for (&order, &r) in orders.iter().zip(rdp) {
        let a = f64::from(order);
        let eps = if r < 0.0 || delta * delta + (-r).exp_m1() > 0.0 {
            0.0
        } else {
            r + (-1.0 / a).ln_1p() - (delta * a).ln() / (a - 1.0)
        };
        if eps < best.0 {
            best = (eps, order);
        }
    }
    Ok((best.0.max(0.0), best.1))
}

/// The privacy a station has spent, per train digest in its policy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Accountant {
    pub orders: Vec<u32>,
    /// Total RDP at each order.
    pub rdp: Vec<f64>,
}

impl Default for Accountant {
    fn default() -> Self {
        let orders: Vec<u32> = (2..=256).collect();
        let rdp = vec![0.0; orders.len()];
        Accountant { orders, rdp }
    }
}

impl Accountant {
    /// The RDP of `steps` steps of the sampled Gaussian mechanism.
    pub fn cost(&self, q: f64, sigma: f64, steps: u64) -> Result<Vec<f64>, RdpError> {
        self.orders
            .iter()
            .map(|&a| Ok(sampled_gaussian_rdp(q, sigma, a)? * steps as f64))
            .collect()
    }

    /// Add `steps` steps.
    pub fn compose(&mut self, q: f64, sigma: f64, steps: u64) -> Result<(), RdpError> {
        let c = self.cost(q, sigma, steps)?;
        for (r, c) in self.rdp.iter_mut().zip(c) {
            *r += c;
        }
        Ok(())
    }

    pub fn epsilon(&self, delta: f64) -> Result<(f64, u32), RdpError> {
        epsilon(&self.orders, &self.rdp, delta)
    }

    /// ε after `steps` more steps, without spending them: what a station checks against its
    /// budget before it runs a train.
    pub fn epsilon_after(
        &self,
        q: f64,
        sigma: f64,
        steps: u64,
        delta: f64,
    ) -> Result<f64, RdpError> {
        let mut next = self.clone();
        next.compose(q, sigma, steps)?;
        Ok(next.epsilon(delta)?.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (q, sigma, steps, delta, ε, optimal order) from Google's `dp_accounting` 0.6.0,
    /// `RdpAccountant(orders=range(2, 257))`, `PoissonSampledDpEvent(q, GaussianDpEvent(sigma))`
    /// composed `steps` times, `get_epsilon_and_optimal_order(delta)`.
    const REFERENCE: &[(f64, f64, u64, f64, f64, u32)] = &[
        (0.01, 4.0, 10000, 1e-5, 1.0354900660362436, 17),
        (0.01, 1.1, 10000, 1e-5, 5.6543080001495145, 5),
        (1.0, 1.0, 1, 1e-5, 4.752728336819822, 5),
        (0.1, 2.0, 100, 1e-6, 2.9155929057381087, 8),
        (0.001, 0.8, 5000, 1e-5, 1.3026456630909364, 8),
    ];

    #[test]
    fn matches_dp_accounting() {
        for &(q, sigma, steps, delta, eps, order) in REFERENCE {
            let mut acc = Accountant::default();
            acc.compose(q, sigma, steps).unwrap();
            let (got, at) = acc.epsilon(delta).unwrap();
            assert!(
                (got - eps).abs() <= 1e-9 * eps.max(1.0),
                "q {q} σ {sigma} T {steps}: {got} vs {eps}"
            );
            assert_eq!(at, order);
        }
    }

    #[test]
    fn composition_adds_and_no_steps_cost_nothing() {
        let mut a = Accountant::default();
        a.compose(0.05, 1.5, 30).unwrap();
        a.compose(0.05, 1.5, 70).unwrap();
        let mut b = Accountant::default();
        b.compose(0.05, 1.5, 100).unwrap();
        for (x, y) in a.rdp.iter().zip(&b.rdp) {
            assert!((x - y).abs() <= 1e-12 * y.max(1.0));
        }
        assert_eq!(Accountant::default().epsilon(1e-5).unwrap().0, 0.0);
        assert!(a.epsilon_after(0.05, 1.5, 10, 1e-5).unwrap() > a.epsilon(1e-5).unwrap().0);
    }

    #[test]
    fn bad_parameters_are_refused() {
        assert_eq!(
            sampled_gaussian_rdp(1.5, 1.0, 2),
            Err(RdpError::Sampling(1.5))
        );
        assert_eq!(sampled_gaussian_rdp(0.5, 0.0, 2), Err(RdpError::Noise(0.0)));
        assert_eq!(
            Accountant::default().epsilon(0.0),
            Err(RdpError::Delta(0.0))
        );
    }
}
