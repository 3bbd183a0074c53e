//! Federated jobs: checking a plan, and moving a job from round to round.
//!
//! A job is a train, a plan and its stations. Each round is an ordinary task (one run per
//! station) linked to the job; a station's run reports its update with its result. A round
//! ends when every run has finished (done, failed, refused, or expired at the round's
//! deadline): with at least `min_stations` usable updates the registry screens them (the wire
//! decoder refuses non-finite values; wrong lengths and zero samples are set aside), optionally
//! clips each to `clip_update_norm`, combines them (FedAvg, median or trimmed mean), applies the
//! result with the server optimizer, and stores a checkpoint (weights, optimizer state, what
//! each station contributed) in the same transaction that starts the next round. Below the
//! quorum the job fails, and no checkpoint is written for that round.
//!
//! Owns the round logic. The SQL is `db`'s, the arithmetic `amicus_fl`'s; the HTTP side
//! (`server`) calls [`advance`] after every run report and on its housekeeping tick, so a
//! restarted registry carries on from the last checkpoint by itself.

use crate::db::{Checkpoint, Db, DbError, JobRow, RoundEnd, TaskRow, now_ms, random_id};
use crate::wire::{JobState, Plan, RoundStation, RoundSummary, RunState, Strategy};
use amicus_fl::aggregate::{self, ServerState, Update};
use amicus_fl::wire::{Update as WireUpdate, Weights};

/// Refuse a plan that cannot run.
pub fn check_plan(plan: &Plan, stations: usize) -> Result<(), String> {
    if plan.rounds == 0 || plan.rounds > 10_000 {
        return Err("rounds must be 1 to 10000".into());
    }
    if plan.min_stations == 0 || plan.min_stations as usize > stations {
        return Err(format!(
            "min_stations must be 1 to the number of stations ({stations})"
        ));
    }
    if plan.round_seconds == 0 || plan.round_seconds > 7 * 86_400 {
        return Err("round_seconds must be 1 s to 7 days".into());
    }
    if let Strategy::TrimmedMean { trim } = plan.strategy
        && 2 * trim >= plan.min_stations as usize
    {
        return Err(format!(
            "trimming {trim} from each end needs min_stations above {}",
            2 * trim
        ));
    }
    if let Some(c) = plan.clip_update_norm
        && !(c.is_finite() && c > 0.0)
    {
        return Err("clip_update_norm must be a positive number".into());
    }
    if !(plan.proximal_mu.is_finite() && plan.proximal_mu >= 0.0) {
        return Err("proximal_mu must be a number ≥ 0".into());
    }
    if let Some(dp) = plan.dp
        && !(dp.clip_norm.is_finite()
            && dp.clip_norm > 0.0
            && dp.noise_multiplier.is_finite()
            && dp.noise_multiplier > 0.0)
    {
        return Err("dp needs a positive clip_norm and noise_multiplier".into());
    }
    let ok = match plan.server {
        aggregate::ServerOptimizer::Sgd { lr } => lr.is_finite() && lr > 0.0,
        aggregate::ServerOptimizer::Adam {
            lr,
            beta1,
            beta2,
            tau,
        }
        | aggregate::ServerOptimizer::Yogi {
            lr,
            beta1,
            beta2,
            tau,
        } => {
            lr.is_finite()
                && lr > 0.0
                && (0.0..1.0).contains(&beta1)
                && (0.0..1.0).contains(&beta2)
                && tau.is_finite()
                && tau > 0.0
        }
    };
    if !ok {
        return Err("server optimizer: lr and tau must be positive, betas in [0, 1)".into());
    }
    Ok(())
}

/// The task of a new round (its deadline is the plan's `round_seconds` from now).
pub fn round_task(job: &JobRow) -> TaskRow {
    let now = now_ms();
    TaskRow {
        id: random_id(),
        researcher: job.researcher.clone(),
        train: job.train.clone(),
        params: job.params.clone(),
        created_ms: now,
        expires_ms: now + job.plan.round_seconds as i64 * 1000,
    }
}

/// The last round that trains (the evaluation round, if planned, comes after it).
fn evaluation_round(plan: &Plan) -> Option<u32> {
    plan.evaluate_final.then_some(plan.rounds + 1)
}

/// What [`advance`] did.
#[derive(Debug, Clone, PartialEq)]
pub enum Advanced {
    /// The round is still waiting for runs.
    Waiting,
    /// Round `round` was aggregated and the next one started (or the job finished).
    RoundEnded { round: u32, state: JobState },
    /// The job failed at `round`.
    Failed { round: u32, reason: String },
    /// Nothing to do: the job is not running, or another caller ended the round first.
    Nothing,
}

/// End the job at `round` as failed, with nothing checkpointed for that round.
async fn fail(db: &Db, job: &JobRow, round: u32, reason: String) -> Result<Advanced, DbError> {
    let end = RoundEnd {
        checkpoint: None,
        next_task: None,
        state: JobState::Failed,
        reason: Some(&reason),
    };
    Ok(if db.end_round(job, round, end).await? {
        Advanced::Failed { round, reason }
    } else {
        Advanced::Nothing
    })
}

/// Move `job_id` on if its current round has ended. Safe to call any number of times from
/// any number of places: the round is ended by exactly one caller (`Db::end_round` checks).
pub async fn advance(db: &Db, job_id: &str) -> Result<Advanced, DbError> {
    let Some(job) = db.job(job_id).await? else {
        return Ok(Advanced::Nothing);
    };
    if job.state != JobState::Running {
        return Ok(Advanced::Nothing);
    }
    let round = job.round;
    let Some((_, task)) = db
        .job_rounds(&job.id)
        .await?
        .into_iter()
        .find(|(r, _)| *r == round)
    else {
        return Err(DbError::Corrupt(format!(
            "job {} has no task for round {round}",
            job.id
        )));
    };
    let runs = db.runs_of_task(&task).await?;
    if runs.iter().any(|r| !r.state.is_final()) {
        return Ok(Advanced::Waiting);
    }

    // The evaluation round trains nothing: the job is done when its runs are.
    if evaluation_round(&job.plan) == Some(round) {
        let end = RoundEnd {
            checkpoint: None,
            next_task: None,
            state: JobState::Done,
            reason: None,
        };
        return Ok(if db.end_round(&job, round, end).await? {
            Advanced::RoundEnded {
                round,
                state: JobState::Done,
            }
        } else {
            Advanced::Nothing
        });
    }

    let previous = db.checkpoint(&job.id, round - 1).await?.ok_or_else(|| {
        DbError::Corrupt(format!("job {} lacks checkpoint {}", job.id, round - 1))
    })?;
    let global = Weights::decode(&previous.weights)
        .map_err(|e| DbError::Corrupt(format!("checkpoint {}: {e}", round - 1)))?;
    let mut server_state: ServerState = serde_json::from_slice(&previous.server_state)
        .map_err(|e| DbError::Corrupt(format!("server state {}: {e}", round - 1)))?;
    let updates = db.updates_of_task(&task).await?;

    let mut stations = Vec::new();
    let mut usable = Vec::new();
    for run in &runs {
        let stored = updates.iter().find(|u| u.run == run.id);
        let entry = |status: &str, samples, bytes, norm, reason: Option<String>| RoundStation {
            station: run.station.clone(),
            status: status.into(),
            samples,
            bytes,
            norm,
            reason,
        };
        match (run.state, stored) {
            (RunState::Done, Some(u)) => match WireUpdate::decode(&u.payload) {
                Ok((update, _)) => {
                    let norm = aggregate::l2_norm(&update.delta);
                    stations.push(entry(
                        "used",
                        update.samples,
                        u.payload.len() as u64,
                        Some(norm),
                        None,
                    ));
                    usable.push((
                        stations.len() - 1,
                        Update {
                            delta: update.delta,
                            samples: update.samples,
                        },
                    ));
                }
                Err(e) => stations.push(entry(
                    "rejected",
                    0,
                    u.payload.len() as u64,
                    None,
                    Some(format!("update does not decode: {e}")),
                )),
            },
            (RunState::Done, None) => stations.push(entry(
                "missing",
                0,
                0,
                None,
                Some("the run finished without an update".into()),
            )),
            (state, _) => stations.push(entry(
                "missing",
                0,
                0,
                None,
                Some(format!(
                    "run {}{}",
                    state.as_str(),
                    run.reason
                        .as_deref()
                        .map(|r| format!(": {r}"))
                        .unwrap_or_default()
                )),
            )),
        }
    }
    let (positions, usable): (Vec<usize>, Vec<Update>) = usable.into_iter().unzip();
    let (kept, rejected) = aggregate::screen(usable, global.len());
    for (i, why) in rejected {
        let s = &mut stations[positions[i]];
        s.status = "rejected".into();
        s.reason = Some(format!("{why:?}"));
    }
    let used = kept.len() as u32;
    if used < job.plan.min_stations {
        let reason = format!(
            "round {round}: {used} usable update(s), the plan's quorum is {}",
            job.plan.min_stations
        );
        return fail(db, &job, round, reason).await;
    }
    let mut kept = kept;
    if let Some(c) = job.plan.clip_update_norm {
        for u in &mut kept {
            aggregate::clip_norm(&mut u.delta, c);
        }
    }
    let combined = match job.plan.strategy {
        Strategy::FedAvg => aggregate::fed_avg(&kept),
        Strategy::Median => aggregate::coordinate_median(&kept),
        Strategy::TrimmedMean { trim } => aggregate::trimmed_mean(&kept, trim),
    };
    let combined = match combined {
        Ok(c) => c,
        Err(e) => {
            let reason = format!("round {round}: {e}");
            return fail(db, &job, round, reason).await;
        }
    };
    let mut flat = global.flat();
    job.plan
        .server
        .apply(&mut flat, &combined, &mut server_state);
    let weights = global
        .with_flat(&flat)
        .map_err(|e| DbError::Corrupt(e.to_string()))?;
    let summary = RoundSummary {
        round,
        stations,
        used,
        delta_norm: aggregate::l2_norm(&combined),
        created_ms: now_ms(),
    };
    let checkpoint = Checkpoint {
        round,
        weights: weights.encode(),
        server_state: serde_json::to_vec(&server_state).expect("state serialises"),
        summary: serde_json::to_string(&summary).expect("summary serialises"),
    };
    let last_training_round = round == job.plan.rounds;
    let next = (!last_training_round || job.plan.evaluate_final).then(|| round_task(&job));
    let state = if next.is_some() {
        JobState::Running
    } else {
        JobState::Done
    };
    let end = RoundEnd {
        checkpoint: Some(&checkpoint),
        next_task: next.as_ref(),
        state,
        reason: None,
    };
    Ok(if db.end_round(&job, round, end).await? {
        Advanced::RoundEnded { round, state }
    } else {
        Advanced::Nothing
    })
}
