//! Optimizers on the host: SGD (momentum, Nesterov) and Adam/AdamW, with weight decay, global
//! gradient-norm clipping and learning-rate schedules. Weights and optimizer state stay here;
//! a train holds handles.
//!
//! Owns the update rule only: it is handed gradients and weights as plain slices.

/// How weights are updated.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Optimizer {
    Sgd {
        learning_rate: f32,
        momentum: f32,
        nesterov: bool,
        /// L2 penalty added to the gradient.
        weight_decay: f32,
    },
    Adam {
        learning_rate: f32,
        beta1: f32,
        beta2: f32,
        epsilon: f32,
        weight_decay: f32,
        /// AdamW: decay the weights directly instead of adding to the gradient.
        decoupled: bool,
    },
}

/// Learning rate as a function of the step (counted from 1).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Schedule {
    Constant,
    /// Multiply by `factor` every `every` steps.
    Step {
        every: u64,
        factor: f32,
    },
    /// Cosine from the base rate to `floor` × base over `steps`, then `floor` × base.
    Cosine {
        steps: u64,
        floor: f32,
    },
    /// Linear warm-up over `steps`, then constant.
    Warmup {
        steps: u64,
    },
}

impl Schedule {
    /// Refuse schedules that would stall or blow up training.
    pub fn validate(&self) -> Result<(), UpdateError> {
        let bad = |why: &str| Err(UpdateError::Invalid(format!("schedule: {why}")));
        match *self {
            Schedule::Constant => Ok(()),
            Schedule::Step { every, factor } => {
                if every == 0 {
                    bad("a step decay needs at least one step between decays")
                } else if !(factor.is_finite() && factor > 0.0 && factor <= 1.0) {
                    bad("a step decay's factor must be in (0, 1]")
                } else {
                    Ok(())
                }
            }
            Schedule::Cosine { steps, floor } => {
                if steps == 0 {
                    bad("a cosine decay needs at least one step")
                } else if !(0.0..=1.0).contains(&floor) {
                    bad("a cosine decay's floor must be in [0, 1]")
                } else {
                    Ok(())
                }
            }
            Schedule::Warmup { steps: 0 } => bad("a warm-up needs at least one step"),
            Schedule::Warmup { .. } => Ok(()),
        }
    }

    pub fn factor(&self, step: u64) -> f32 {
        match *self {
            Schedule::Constant => 1.0,
            Schedule::Step { every, factor } => {
                factor.powi((step.saturating_sub(1) / every.max(1)) as i32)
            }
            Schedule::Cosine { steps, floor } => {
                let t = (step.min(steps) as f32) / steps.max(1) as f32;
                floor + (1.0 - floor) * 0.5 * (1.0 + (std::f32::consts::PI * t).cos())
            }
            Schedule::Warmup { steps } => (step as f32 / steps.max(1) as f32).min(1.0),
        }
    }
}

/// Why an update was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum UpdateError {
    #[error("the gradient of {0} is not finite (NaN or infinity); nothing was updated")]
    NonFiniteGradient(String),
    #[error("the update of {0} is not finite; nothing was updated")]
    NonFiniteUpdate(String),
    #[error("invalid optimizer setting: {0}")]
    Invalid(String),
}

impl Optimizer {
    pub fn validate(&self) -> Result<(), UpdateError> {
        let bad = |what: &str| Err(UpdateError::Invalid(what.into()));
        match *self {
            Optimizer::Sgd {
                learning_rate,
                momentum,
                weight_decay,
                ..
            } => {
                if !(learning_rate.is_finite() && learning_rate > 0.0) {
                    return bad("learning rate must be positive");
                }
                if !(0.0..1.0).contains(&momentum) {
                    return bad("momentum must be in [0, 1)");
                }
                if !(weight_decay.is_finite() && weight_decay >= 0.0) {
                    return bad("weight decay must not be negative");
                }
            }
            Optimizer::Adam {
                learning_rate,
                beta1,
                beta2,
                epsilon,
                weight_decay,
                ..
            } => {
                if !(learning_rate.is_finite() && learning_rate > 0.0) {
                    return bad("learning rate must be positive");
                }
                if !(0.0..1.0).contains(&beta1) || !(0.0..1.0).contains(&beta2) {
                    return bad("betas must be in [0, 1)");
                }
                if !(epsilon.is_finite() && epsilon > 0.0) {
                    return bad("epsilon must be positive");
                }
                if !(weight_decay.is_finite() && weight_decay >= 0.0) {
                    return bad("weight decay must not be negative");
                }
            }
        }
        Ok(())
    }
}

/// Optimizer state for one weight tensor.
#[derive(Debug, Clone, Default)]
struct Slot {
    m: Vec<f32>,
    v: Vec<f32>,
}

/// The state of an optimisation: step count and per-weight moments.
#[derive(Debug, Clone)]
pub struct OptimizerState {
    pub optimizer: Optimizer,
    pub schedule: Schedule,
    pub clip_norm: Option<f32>,
    step: u64,
    slots: Vec<Slot>,
}

impl OptimizerState {
    pub fn new(
        optimizer: Optimizer,
        schedule: Schedule,
        clip_norm: Option<f32>,
        sizes: &[usize],
    ) -> Result<OptimizerState, UpdateError> {
        optimizer.validate()?;
        schedule.validate()?;
        if clip_norm.is_some_and(|c| !(c.is_finite() && c > 0.0)) {
            return Err(UpdateError::Invalid("clip norm must be positive".into()));
        }
        Ok(OptimizerState {
            optimizer,
            schedule,
            clip_norm,
            step: 0,
            slots: sizes
                .iter()
                .map(|&n| Slot {
                    m: vec![0.0; n],
                    v: vec![0.0; n],
                })
                .collect(),
        })
    }

    pub fn steps(&self) -> u64 {
        self.step
    }

    /// Apply one update to `weights` (name, values) from `grads`, all or nothing: a non-finite
    /// gradient or result leaves every weight and the state as they were.
    pub fn update(
        &mut self,
        weights: &mut [(String, Vec<f32>)],
        grads: &[Vec<f32>],
    ) -> Result<(), UpdateError> {
        for ((name, _), g) in weights.iter().zip(grads) {
            if g.iter().any(|v| !v.is_finite()) {
                return Err(UpdateError::NonFiniteGradient(name.clone()));
            }
        }
        let norm = grads
            .iter()
            .flatten()
            .map(|g| f64::from(*g) * f64::from(*g))
            .sum::<f64>()
            .sqrt() as f32;
        let clip = match self.clip_norm {
            Some(c) if norm > c => c / norm,
            _ => 1.0,
        };
        let step = self.step + 1;
        let lr_factor = self.schedule.factor(step);
        let mut new_weights: Vec<Vec<f32>> = Vec::with_capacity(weights.len());
        let mut new_slots = self.slots.clone();
        for (((name, w), g), slot) in weights.iter().zip(grads).zip(new_slots.iter_mut()) {
            let mut out = w.clone();
            match self.optimizer {
                Optimizer::Sgd {
                    learning_rate,
                    momentum,
                    nesterov,
                    weight_decay,
                } => {
                    let lr = learning_rate * lr_factor;
                    for i in 0..out.len() {
                        let d = g[i] * clip + weight_decay * w[i];
                        let buf = momentum * slot.m[i] + d;
                        slot.m[i] = buf;
                        let dir = if nesterov { d + momentum * buf } else { buf };
                        out[i] = w[i] - lr * dir;
                    }
                }
                Optimizer::Adam {
                    learning_rate,
                    beta1,
                    beta2,
                    epsilon,
                    weight_decay,
                    decoupled,
                } => {
                    let lr = learning_rate * lr_factor;
                    let c1 = 1.0 - beta1.powi(step as i32);
                    let c2 = 1.0 - beta2.powi(step as i32);
                    for i in 0..out.len() {
                        let mut d = g[i] * clip;
                        if !decoupled {
                            d += weight_decay * w[i];
                        }
                        slot.m[i] = beta1 * slot.m[i] + (1.0 - beta1) * d;
                        slot.v[i] = beta2 * slot.v[i] + (1.0 - beta2) * d * d;
                        let update = (slot.m[i] / c1) / ((slot.v[i] / c2).sqrt() + epsilon);
                        let decayed = if decoupled {
                            w[i] * (1.0 - lr * weight_decay)
                        } else {
                            w[i]
                        };
                        out[i] = decayed - lr * update;
                    }
                }
            }
            if out.iter().any(|v| !v.is_finite()) {
                return Err(UpdateError::NonFiniteUpdate(name.clone()));
            }
            new_weights.push(out);
        }
        for ((_, w), new) in weights.iter_mut().zip(new_weights) {
            *w = new;
        }
        self.slots = new_slots;
        self.step = step;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(w: f32) -> Vec<(String, Vec<f32>)> {
        vec![("w".into(), vec![w])]
    }

    #[test]
    fn sgd_with_momentum_and_nesterov_match_hand_computed_steps() {
        let sgd = |nesterov| Optimizer::Sgd {
            learning_rate: 0.1,
            momentum: 0.9,
            nesterov,
            weight_decay: 0.0,
        };
        // Heavy ball: buf1 = 1, w = 1 - 0.1; buf2 = 0.9 + 1 = 1.9, w -= 0.19.
        let mut s = OptimizerState::new(sgd(false), Schedule::Constant, None, &[1]).unwrap();
        let mut w = one(1.0);
        s.update(&mut w, &[vec![1.0]]).unwrap();
        s.update(&mut w, &[vec![1.0]]).unwrap();
        assert!((w[0].1[0] - (1.0 - 0.1 - 0.19)).abs() < 1e-6);
        // Nesterov: step 1 moves by 0.1·(1 + 0.9·1) = 0.19.
        let mut s = OptimizerState::new(sgd(true), Schedule::Constant, None, &[1]).unwrap();
        let mut w = one(1.0);
        s.update(&mut w, &[vec![1.0]]).unwrap();
        assert!((w[0].1[0] - 0.81).abs() < 1e-6);
    }

    #[test]
    fn adam_first_step_moves_by_the_learning_rate_and_adamw_decays() {
        let adam = |decoupled, weight_decay| Optimizer::Adam {
            learning_rate: 0.01,
            beta1: 0.9,
            beta2: 0.999,
            epsilon: 1e-8,
            weight_decay,
            decoupled,
        };
        let mut s = OptimizerState::new(adam(false, 0.0), Schedule::Constant, None, &[1]).unwrap();
        let mut w = one(1.0);
        s.update(&mut w, &[vec![0.3]]).unwrap();
        assert!((w[0].1[0] - 0.99).abs() < 1e-5, "{:?}", w);
        // AdamW with a zero gradient only decays: w·(1 - lr·wd).
        let mut s = OptimizerState::new(adam(true, 0.5), Schedule::Constant, None, &[1]).unwrap();
        let mut w = one(2.0);
        s.update(&mut w, &[vec![0.0]]).unwrap();
        assert!((w[0].1[0] - 2.0 * (1.0 - 0.005)).abs() < 1e-6);
    }

    #[test]
    fn clipping_schedules_and_refusals() {
        let sgd = Optimizer::Sgd {
            learning_rate: 1.0,
            momentum: 0.0,
            nesterov: false,
            weight_decay: 0.0,
        };
        // Gradient (3, 4) has norm 5; clipped to 1 it becomes (0.6, 0.8).
        let mut s = OptimizerState::new(sgd, Schedule::Constant, Some(1.0), &[2]).unwrap();
        let mut w = vec![("w".to_string(), vec![0.0, 0.0])];
        s.update(&mut w, &[vec![3.0, 4.0]]).unwrap();
        assert!((w[0].1[0] + 0.6).abs() < 1e-6 && (w[0].1[1] + 0.8).abs() < 1e-6);
        // Schedules.
        assert_eq!(
            Schedule::Step {
                every: 10,
                factor: 0.5
            }
            .factor(10),
            1.0
        );
        assert_eq!(
            Schedule::Step {
                every: 10,
                factor: 0.5
            }
            .factor(11),
            0.5
        );
        assert!(
            (Schedule::Cosine {
                steps: 100,
                floor: 0.0
            }
            .factor(50)
                - 0.5)
                .abs()
                < 1e-6
        );
        assert!(
            Schedule::Cosine {
                steps: 100,
                floor: 0.1
            }
            .factor(200)
                - 0.1
                < 1e-6
        );
        assert_eq!(Schedule::Warmup { steps: 4 }.factor(1), 0.25);
        // Schedules that would stall or blow up training are refused.
        for bad in [
            Schedule::Step {
                every: 0,
                factor: 0.5,
            },
            Schedule::Step {
                every: 5,
                factor: 1.5,
            },
            Schedule::Step {
                every: 5,
                factor: f32::NAN,
            },
            Schedule::Cosine {
                steps: 0,
                floor: 0.1,
            },
            Schedule::Cosine {
                steps: 10,
                floor: -0.1,
            },
            Schedule::Warmup { steps: 0 },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
            assert!(
                OptimizerState::new(sgd, bad, None, &[1]).is_err(),
                "{bad:?}"
            );
        }
        // A NaN gradient changes nothing, weights nor state.
        let before = w.clone();
        let e = s.update(&mut w, &[vec![f32::NAN, 0.0]]).unwrap_err();
        assert_eq!(e, UpdateError::NonFiniteGradient("w".into()));
        assert_eq!(w, before);
        assert_eq!(s.steps(), 1);
        // An update that overflows is refused the same way.
        let huge = Optimizer::Sgd {
            learning_rate: 3e38,
            momentum: 0.0,
            nesterov: false,
            weight_decay: 0.0,
        };
        let mut s = OptimizerState::new(huge, Schedule::Constant, None, &[1]).unwrap();
        let mut w = one(1.0);
        assert!(matches!(
            s.update(&mut w, &[vec![1e10]]),
            Err(UpdateError::NonFiniteUpdate(_))
        ));
        assert_eq!(w, one(1.0));
        // Settings out of range.
        for bad in [
            Optimizer::Sgd {
                learning_rate: 0.0,
                momentum: 0.0,
                nesterov: false,
                weight_decay: 0.0,
            },
            Optimizer::Sgd {
                learning_rate: 0.1,
                momentum: 1.0,
                nesterov: false,
                weight_decay: 0.0,
            },
            Optimizer::Adam {
                learning_rate: 0.1,
                beta1: 0.9,
                beta2: 1.5,
                epsilon: 1e-8,
                weight_decay: 0.0,
                decoupled: true,
            },
        ] {
            assert!(OptimizerState::new(bad, Schedule::Constant, None, &[1]).is_err());
        }
    }
}
