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
use crate::wire::{
    JobState, Plan, RoundStation, RoundSummary, RunInfo, RunState, SecAggMessage, SecAggPhase,
    SecAggPlan, SecretKind, Strategy,
};
use amicus_fl::aggregate::{self, ServerState, Update};
use amicus_fl::secagg;
use amicus_fl::wire::{Update as WireUpdate, Weights};
use std::collections::{BTreeMap, BTreeSet};

/// Largest server learning rate, clipping norm or FedProx μ a plan may ask for: far above
/// anything useful, low enough that a round cannot turn finite weights into infinities by
/// itself (every combined update is checked for that too).
const MAX_PLAN_NUMBER: f64 = 1e6;

/// Whether `x` is a finite number in (0, MAX_PLAN_NUMBER].
fn positive_bounded(x: f64) -> bool {
    x.is_finite() && x > 0.0 && x <= MAX_PLAN_NUMBER
}

/// Refuse a plan that cannot run. Every number in it comes from a researcher: the checks use
/// no arithmetic that can overflow.
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
        && trim
            .checked_mul(2)
            .is_none_or(|t| t >= plan.min_stations as usize)
    {
        return Err(format!(
            "trimming {trim} from each end needs min_stations above twice that ({})",
            plan.min_stations
        ));
    }
    if let Some(c) = plan.clip_update_norm
        && !positive_bounded(c)
    {
        return Err(format!(
            "clip_update_norm must be a positive number up to {MAX_PLAN_NUMBER}"
        ));
    }
    if !(plan.proximal_mu.is_finite()
        && plan.proximal_mu >= 0.0
        && f64::from(plan.proximal_mu) <= MAX_PLAN_NUMBER)
    {
        return Err(format!(
            "proximal_mu must be a number from 0 to {MAX_PLAN_NUMBER}"
        ));
    }
    if let Some(dp) = plan.dp
        && !(positive_bounded(dp.clip_norm) && positive_bounded(dp.noise_multiplier))
    {
        return Err(format!(
            "dp needs a clip_norm and a noise_multiplier above 0 and up to {MAX_PLAN_NUMBER}"
        ));
    }
    if let Some(sa) = plan.secure_aggregation {
        if sa.threshold < 2 || sa.threshold as usize > stations || stations > 254 {
            return Err(format!(
                "secure_aggregation.threshold must be 2 to the number of stations ({stations}, at most 254)"
            ));
        }
        if sa.threshold < plan.min_stations {
            return Err(
                "secure_aggregation.threshold below min_stations: the quorum could never be checked on a masked sum".into(),
            );
        }
        if sa.exchange_seconds == 0 || sa.exchange_seconds > 3600 {
            return Err("secure_aggregation.exchange_seconds must be 1 s to 1 hour".into());
        }
        if plan.round_seconds <= 2 * sa.exchange_seconds {
            return Err(
                "round_seconds must exceed twice secure_aggregation.exchange_seconds (keys and shares are exchanged within the round)".into(),
            );
        }
        // These need each station's update on its own, which masking hides from the registry.
        if plan.strategy != Strategy::FedAvg {
            return Err(
                "secure aggregation sums updates: median and trimmed mean need individual updates; use fed-avg".into(),
            );
        }
        if plan.clip_update_norm.is_some() {
            return Err(
                "secure aggregation hides individual updates, so the registry cannot clip them: clip at the stations with dp".into(),
            );
        }
        if plan.encoding != amicus_fl::wire::Encoding::Fp32 {
            return Err(
                "secure aggregation masks fixed-point values: 8-bit quantised updates cannot be summed masked; use fp32".into(),
            );
        }
    }
    let ok = match plan.server {
        aggregate::ServerOptimizer::Sgd { lr } => positive_bounded(lr),
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
            positive_bounded(lr)
                && (0.0..1.0).contains(&beta1)
                && (0.0..1.0).contains(&beta2)
                && positive_bounded(tau)
        }
    };
    if !ok {
        return Err(format!(
            "server optimizer: lr and tau must be above 0 and up to {MAX_PLAN_NUMBER}, betas in [0, 1)"
        ));
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
        statement: job.statement.clone(),
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

/// Fail `job_id` at its current round with `reason` (the registry could not move it on).
/// Returns the round, or None when the job was not running or another caller ended it.
pub async fn fail_job(db: &Db, job_id: &str, reason: &str) -> Result<Option<u32>, DbError> {
    let Some(job) = db.job(job_id).await? else {
        return Ok(None);
    };
    if job.state != JobState::Running {
        return Ok(None);
    }
    let round = job.round;
    Ok(match fail(db, &job, round, reason.to_string()).await? {
        Advanced::Failed { round, .. } => Some(round),
        _ => None,
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
    let secagg = job
        .plan
        .secure_aggregation
        .filter(|_| evaluation_round(&job.plan) != Some(round));
    // A masked round moves through its phases while runs are still open.
    if secagg.is_none() && runs.iter().any(|r| !r.state.is_final()) {
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

    // A masked round's phases need no weights: they are read when the sum is unmasked.
    if let Some(sa) = secagg {
        let task = db
            .task(&task)
            .await?
            .ok_or_else(|| DbError::Corrupt(format!("round task {task} missing")))?;
        return advance_masked(db, &job, round, &task, &runs, sa).await;
    }
    let (global, server_state) = round_start(db, &job, round).await?;
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
    apply_and_checkpoint(
        db,
        &job,
        round,
        global,
        server_state,
        &combined,
        stations,
        used,
    )
    .await
}

/// The global weights and server-optimizer state round `round` starts from.
async fn round_start(db: &Db, job: &JobRow, round: u32) -> Result<(Weights, ServerState), DbError> {
    let previous = db.checkpoint(&job.id, round - 1).await?.ok_or_else(|| {
        DbError::Corrupt(format!("job {} lacks checkpoint {}", job.id, round - 1))
    })?;
    let global = Weights::decode(&previous.weights)
        .map_err(|e| DbError::Corrupt(format!("checkpoint {}: {e}", round - 1)))?;
    let server_state: ServerState = serde_json::from_slice(&previous.server_state)
        .map_err(|e| DbError::Corrupt(format!("server state {}: {e}", round - 1)))?;
    Ok((global, server_state))
}

/// Apply a round's combined update with the server optimizer, store the checkpoint and start
/// the next round (or finish the job), atomically.
#[allow(clippy::too_many_arguments)]
async fn apply_and_checkpoint(
    db: &Db,
    job: &JobRow,
    round: u32,
    global: Weights,
    mut server_state: ServerState,
    combined: &[f32],
    stations: Vec<RoundStation>,
    used: u32,
) -> Result<Advanced, DbError> {
    // Updates are finite one by one (the wire decoder), but their combination and the
    // server step can still overflow: such a round fails, nothing non-finite is stored.
    if !combined.iter().all(|x| x.is_finite()) {
        let reason = format!("round {round}: the combined update is not finite (overflow)");
        return fail(db, job, round, reason).await;
    }
    let mut flat = global.flat();
    job.plan
        .server
        .apply(&mut flat, combined, &mut server_state);
    if !flat.iter().all(|x| x.is_finite())
        || !server_state
            .m
            .iter()
            .chain(&server_state.v)
            .all(|x| x.is_finite())
    {
        let reason = format!(
            "round {round}: the server optimizer's step made the weights non-finite (overflow); the job stops at the last finite checkpoint"
        );
        return fail(db, job, round, reason).await;
    }
    let weights = global
        .with_flat(&flat)
        .map_err(|e| DbError::Corrupt(e.to_string()))?;
    let summary = RoundSummary {
        round,
        stations,
        used,
        delta_norm: aggregate::l2_norm(combined),
        created_ms: now_ms(),
    };
    let checkpoint = Checkpoint {
        round,
        weights: weights.encode(),
        server_state: serde_json::to_vec(&server_state).expect("state serialises"),
        summary: serde_json::to_string(&summary).expect("summary serialises"),
    };
    let last_training_round = round == job.plan.rounds;
    let next = (!last_training_round || job.plan.evaluate_final).then(|| round_task(job));
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
    Ok(if db.end_round(job, round, end).await? {
        Advanced::RoundEnded { round, state }
    } else {
        Advanced::Nothing
    })
}

/// The label a securely aggregated round's masks are derived under (stations and registry
/// must agree on it; it ties every mask to one job and round).
pub fn secagg_label(job: &str, round: u32) -> Vec<u8> {
    format!("amicus-job {job} round {round}").into_bytes()
}

/// A 32-byte key or commitment of the secure-aggregation messages, from hex.
pub fn hex32(s: &str) -> Option<[u8; 32]> {
    hex::decode(s).ok()?.try_into().ok()
}

/// A station's protocol id in a securely aggregated job: its position in the job's list.
pub fn secagg_id(job: &JobRow, station: &str) -> Option<u32> {
    job.stations
        .iter()
        .position(|s| s == station)
        .map(|i| i as u32)
}

/// The revealed shares a stored `reveal` message carries.
fn revealed_of(body: &str) -> Option<Vec<secagg::Revealed>> {
    let SecAggMessage::Reveal { shares } = serde_json::from_str(body).ok()? else {
        return None;
    };
    shares
        .into_iter()
        .map(|r| {
            let share = secagg::Share {
                x: r.x,
                y: hex::decode(&r.y).ok()?,
            };
            Some(match r.secret {
                SecretKind::SelfSeed => secagg::Revealed::SelfSeed { of: r.of, share },
                SecretKind::MaskKey => secagg::Revealed::MaskKey { of: r.of, share },
            })
        })
        .collect()
}

/// A securely aggregated round, phase by phase (see `amicus_fl::secagg`): keys → shares →
/// masked (the stations train) → reveal → the sum. Each phase ends when every station it
/// waits for has answered (or its run ended), or `exchange_seconds` after it began (the
/// masked phase: at the round's deadline, when open runs expire). Fewer than `threshold`
/// stations at any phase fails the job with nothing unmasked.
async fn advance_masked(
    db: &Db,
    job: &JobRow,
    round: u32,
    task: &TaskRow,
    runs: &[RunInfo],
    sa: SecAggPlan,
) -> Result<Advanced, DbError> {
    let state = db.secagg_round(&task.id, task.created_ms).await?;
    let messages = db.secagg_messages(&task.id).await?;
    let sent = |kind: &str| -> BTreeSet<u32> {
        messages
            .iter()
            .filter(|m| m.kind == kind)
            .filter_map(|m| secagg_id(job, &m.station))
            .collect()
    };
    let run_of = |id: u32| {
        job.stations
            .get(id as usize)
            .and_then(|st| runs.iter().find(|r| &r.station == st))
    };
    let run_ended = |id: u32| run_of(id).is_none_or(|r| r.state.is_final());
    let exchange_over = now_ms() >= state.phase_ms + sa.exchange_seconds as i64 * 1000;
    let threshold = sa.threshold as usize;
    let everyone: Vec<u32> = (0..job.stations.len() as u32).collect();
    let below = |what: String| {
        format!(
            "round {round}: secure aggregation: {what}, the threshold is {threshold}; nothing was unmasked"
        )
    };
    let mut sets = state.sets.clone();
    match state.phase {
        SecAggPhase::Keys => {
            let keyed = sent("keys");
            if !exchange_over && !everyone.iter().all(|&i| keyed.contains(&i) || run_ended(i)) {
                return Ok(Advanced::Waiting);
            }
            sets.participants = keyed.into_iter().collect();
            if sets.participants.len() < threshold {
                let why = below(format!("keys from {} station(s)", sets.participants.len()));
                return fail(db, job, round, why).await;
            }
            db.secagg_move(&task.id, SecAggPhase::Keys, SecAggPhase::Shares, &sets)
                .await?;
            Ok(Advanced::Waiting)
        }
        SecAggPhase::Shares => {
            let shared = sent("shares");
            if !exchange_over
                && !sets
                    .participants
                    .iter()
                    .all(|&i| shared.contains(&i) || run_ended(i))
            {
                return Ok(Advanced::Waiting);
            }
            sets.sharers = sets
                .participants
                .iter()
                .copied()
                .filter(|i| shared.contains(i))
                .collect();
            if sets.sharers.len() < threshold {
                let why = below(format!("shares from {} station(s)", sets.sharers.len()));
                return fail(db, job, round, why).await;
            }
            db.secagg_move(&task.id, SecAggPhase::Shares, SecAggPhase::Masked, &sets)
                .await?;
            Ok(Advanced::Waiting)
        }
        SecAggPhase::Masked => {
            if sets.sharers.iter().any(|&i| !run_ended(i)) {
                return Ok(Advanced::Waiting);
            }
            let updates = db.updates_of_task(&task.id).await?;
            let arrived = |id: u32| {
                run_of(id).is_some_and(|r| {
                    r.state == RunState::Done && updates.iter().any(|u| u.run == r.id)
                })
            };
            (sets.survivors, sets.dropped) = sets.sharers.iter().partition(|&&i| arrived(i));
            if sets.survivors.len() < threshold {
                let why = below(format!(
                    "masked updates from {} station(s)",
                    sets.survivors.len()
                ));
                return fail(db, job, round, why).await;
            }
            db.secagg_move(&task.id, SecAggPhase::Masked, SecAggPhase::Reveal, &sets)
                .await?;
            Ok(Advanced::Waiting)
        }
        SecAggPhase::Reveal => {
            let revealed_by: BTreeSet<u32> = sent("reveal")
                .into_iter()
                .filter(|i| sets.survivors.contains(i))
                .collect();
            if !exchange_over && revealed_by.len() < sets.survivors.len() {
                return Ok(Advanced::Waiting);
            }
            if revealed_by.len() < threshold {
                let why = below(format!(
                    "unmasking shares from {} station(s)",
                    revealed_by.len()
                ));
                return fail(db, job, round, why).await;
            }
            let mut revealed = Vec::new();
            let mut publics = BTreeMap::new();
            let mut commitments = BTreeMap::new();
            for m in &messages {
                let Some(id) = secagg_id(job, &m.station) else {
                    continue;
                };
                if m.kind == "reveal" && revealed_by.contains(&id) {
                    revealed.extend(revealed_of(&m.body).unwrap_or_default());
                }
                if m.kind == "keys"
                    && sets.sharers.contains(&id)
                    && let Ok(SecAggMessage::Keys {
                        mask_public,
                        self_commitment,
                        ..
                    }) = serde_json::from_str(&m.body)
                    && let (Some(pk), Some(c)) = (hex32(&mask_public), hex32(&self_commitment))
                {
                    publics.insert(id, pk);
                    commitments.insert(id, c);
                }
            }
            let (global, server_state) = round_start(db, job, round).await?;
            let updates = db.updates_of_task(&task.id).await?;
            let mut masked = BTreeMap::new();
            let mut bytes = BTreeMap::new();
            for &i in &sets.survivors {
                let run = run_of(i)
                    .ok_or_else(|| DbError::Corrupt(format!("survivor {i} has no run")))?;
                let u = updates.iter().find(|u| u.run == run.id);
                let y = u.and_then(|u| secagg::decode_masked(&u.payload).ok());
                match y {
                    Some(y) if y.len() == global.len() + 1 => {
                        bytes.insert(i, u.map_or(0, |u| u.payload.len() as u64));
                        masked.insert(i, y);
                    }
                    _ => {
                        // Checked on upload; a stored one that does not parse is a corrupt row.
                        return Err(DbError::Corrupt(format!(
                            "masked update of run {} does not parse",
                            run.id
                        )));
                    }
                }
            }
            let label = secagg_label(&job.id, round);
            let mean = secagg::unmask(
                &label,
                &masked,
                &publics,
                &commitments,
                &revealed,
                threshold,
            )
            .and_then(|sum| secagg::decode_weighted(&sum));
            let (mean, total) = match mean {
                Ok(m) if m.0.iter().all(|v| v.is_finite()) => m,
                Ok(_) => {
                    let why = format!("round {round}: the unmasked sum is not finite");
                    return fail(db, job, round, why).await;
                }
                Err(e) => {
                    let why = format!("round {round}: secure aggregation: {e}");
                    return fail(db, job, round, why).await;
                }
            };
            let stations = job
                .stations
                .iter()
                .enumerate()
                .map(|(i, st)| {
                    let i = i as u32;
                    let (status, reason) = if sets.survivors.contains(&i) {
                        (
                            "used",
                            format!(
                                "masked: only the sum of {} update(s) ({total:.0} samples) is known",
                                sets.survivors.len()
                            ),
                        )
                    } else if sets.dropped.contains(&i) {
                        (
                            "missing",
                            "dropped after sharing its secrets; its masks were removed with the others' shares".into(),
                        )
                    } else if sets.participants.contains(&i) {
                        ("missing", "sent keys but no shares in time".into())
                    } else {
                        ("missing", match run_of(i) {
                            Some(r) if r.state.is_final() => format!(
                                "run {}{}",
                                r.state.as_str(),
                                r.reason.as_deref().map(|r| format!(": {r}")).unwrap_or_default()
                            ),
                            _ => "no round keys in time".into(),
                        })
                    };
                    RoundStation {
                        station: st.clone(),
                        status: status.into(),
                        samples: 0,
                        bytes: bytes.get(&i).copied().unwrap_or(0),
                        norm: None,
                        reason: Some(reason),
                    }
                })
                .collect();
            let used = sets.survivors.len() as u32;
            // `end_round` decides which concurrent caller ends the round.
            apply_and_checkpoint(db, job, round, global, server_state, &mean, stations, used).await
        }
        // Never stored: the view says `ended` once the job has left the round.
        SecAggPhase::Ended => Ok(Advanced::Nothing),
    }
}
