//! Differential privacy of a federated update, applied by the station after the run and before
//! anything leaves: clipping to the plan's L2 norm and Gaussian noise from the operating
//! system's randomness (never from the run's recorded seed). It runs in the station process,
//! not in the run worker, so a worker that misbehaves cannot skip it.
//!
//! Owns the arithmetic only; the budget is `privacy`, the plan's numbers come from the round.

/// Clip `delta` to `clip_norm` and add Gaussian noise of standard deviation
/// `noise_multiplier · clip_norm` (from OS randomness). Returns the norm before clipping and
/// whether it was clipped.
pub fn privatise(
    delta: &mut [f32],
    clip_norm: Option<f64>,
    noise_multiplier: Option<f64>,
) -> Result<(f64, bool), String> {
    let norm = amicus_fl::aggregate::l2_norm(delta);
    if !norm.is_finite() {
        return Err("the update is not finite".into());
    }
    let clipped = match clip_norm {
        Some(c) if c.is_finite() && c > 0.0 => {
            amicus_fl::aggregate::clip_norm(delta, c);
            norm > c
        }
        Some(c) => return Err(format!("clip norm {c} is not a positive number")),
        None => false,
    };
    if let Some(sigma) = noise_multiplier {
        let Some(c) = clip_norm else {
            return Err("noise needs a clip norm (the sensitivity)".into());
        };
        if !(sigma.is_finite() && sigma > 0.0) {
            return Err(format!("noise multiplier {sigma} is not a positive number"));
        }
        let mut rng = os_rng().map_err(|e| format!("operating system randomness: {e}"))?;
        let std = sigma * c;
        for x in delta.iter_mut() {
            *x = (f64::from(*x) + std * gaussian(&mut rng)) as f32;
        }
    }
    Ok((norm, clipped))
}

fn os_rng() -> Result<rand::rngs::StdRng, getrandom::Error> {
    use rand::SeedableRng;
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed)?;
    Ok(rand::rngs::StdRng::from_seed(seed))
}

/// A standard normal draw (Box–Muller).
fn gaussian(rng: &mut rand::rngs::StdRng) -> f64 {
    use rand::Rng;
    let unit = |rng: &mut rand::rngs::StdRng| (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
    let u1 = 1.0 - unit(rng); // (0, 1]
    let u2 = unit(rng);
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}
