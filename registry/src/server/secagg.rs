//! Secure aggregation over HTTP: stations read their round's phase and send keys, sealed
//! shares and unmasking shares; a masked update is checked against the round.

use super::*;

// ---- secure aggregation ------------------------------------------------------------------

/// A securely aggregated round as seen from one of its job's stations.
pub(super) struct SecAggRoundRef {
    job: crate::db::JobRow,
    task: TaskRow,
    plan: SecAggPlan,
    me: u32,
}

pub(super) async fn secagg_round_ref(
    app: &App,
    job_id: &str,
    round: u32,
    station: &str,
) -> Result<SecAggRoundRef, ApiError> {
    let job = app
        .db
        .job(job_id)
        .await?
        .ok_or_else(|| not_found("no such job"))?;
    let me = crate::jobs::secagg_id(&job, station)
        .ok_or_else(|| forbidden("this station is not one of the job's stations"))?;
    let plan = job
        .plan
        .secure_aggregation
        .filter(|_| round >= 1 && round <= job.plan.rounds)
        .ok_or_else(|| bad_request("that round of this job is not securely aggregated"))?;
    let task = match app
        .db
        .job_rounds(&job.id)
        .await?
        .into_iter()
        .find(|(r, _)| *r == round)
    {
        Some((_, t)) => app.db.task(&t).await?,
        None => None,
    }
    .ok_or_else(|| not_found("the job has not reached that round"))?;
    Ok(SecAggRoundRef {
        job,
        task,
        plan,
        me,
    })
}

/// The round's phase as stations see it: `ended` once the job has left the round.
pub(super) async fn secagg_phase(
    app: &App,
    r: &SecAggRoundRef,
    round: u32,
) -> Result<crate::db::SecAggRound, ApiError> {
    let mut state = app.db.secagg_round(&r.task.id, r.task.created_ms).await?;
    if r.job.state != JobState::Running || r.job.round != round {
        state.phase = SecAggPhase::Ended;
    }
    Ok(state)
}

use crate::jobs::hex32;

/// A station reads where its securely aggregated round stands.
pub(super) async fn station_secagg_view(
    State(app): State<App>,
    Path((id, round)): Path<(String, u32)>,
    req: Request,
) -> Response {
    handle(
        app,
        "secagg-view",
        req,
        0,
        Auth::Station,
        |app, _, c| async move {
            let st = c.expect("authenticated").station().name.clone();
            let r = secagg_round_ref(&app, &id, round, &st).await?;
            let state = secagg_phase(&app, &r, round).await?;
            let mut view = SecAggView {
                phase: state.phase,
                threshold: r.plan.threshold,
                me: r.me,
                participants: Vec::new(),
                sharers: Vec::new(),
                shares: Vec::new(),
                survivors: Vec::new(),
                dropped: Vec::new(),
                consistency: Vec::new(),
            };
            if matches!(state.phase, SecAggPhase::Keys | SecAggPhase::Ended) {
                return Ok(json(&view));
            }
            let messages = app.db.secagg_messages(&r.task.id).await?;
            for m in &messages {
                let Some(i) = crate::jobs::secagg_id(&r.job, &m.station) else {
                    continue;
                };
                match serde_json::from_str::<SecAggMessage>(&m.body) {
                    Ok(SecAggMessage::Keys {
                        mask_public,
                        share_public,
                        self_commitment,
                        station_key,
                        signature,
                    }) if state.sets.participants.contains(&i) => {
                        view.participants.push(SecAggParticipant {
                            id: i,
                            station: m.station.clone(),
                            keys: SecAggKeys {
                                mask_public,
                                share_public,
                                self_commitment,
                                station_key,
                                signature,
                            },
                        })
                    }
                    Ok(SecAggMessage::Consistency { signature })
                        if state.phase == SecAggPhase::Reveal
                            && state.sets.survivors.contains(&i) =>
                    {
                        view.consistency.push(ConsistencySignature {
                            id: i,
                            station: m.station.clone(),
                            signature,
                        });
                    }
                    Ok(SecAggMessage::Shares { shares })
                        if state.phase != SecAggPhase::Shares
                            && state.sets.sharers.contains(&i) =>
                    {
                        view.shares
                            .extend(shares.into_iter().filter(|s| s.to == r.me && s.from == i));
                    }
                    _ => {}
                }
            }
            view.participants.sort_by_key(|p| p.id);
            view.shares.sort_by_key(|s| s.from);
            view.consistency.sort_by_key(|s| s.id);
            view.sharers = state.sets.sharers;
            view.survivors = state.sets.survivors;
            view.dropped = state.sets.dropped;
            Ok(json(&view))
        },
    )
    .await
}

/// A station sends its keys, its sealed shares or its unmasking shares.
pub(super) async fn station_secagg_send(
    State(app): State<App>,
    Path((id, round)): Path<(String, u32)>,
    req: Request,
) -> Response {
    let limit = app.limits.json_bytes;
    handle(app, "secagg-send", req, limit, Auth::Station, |app, body, c| async move {
        let caller = c.expect("authenticated");
        let st = caller.station().name.clone();
        let msg: SecAggMessage = body.parse()?;
        let r = secagg_round_ref(&app, &id, round, &st).await?;
        let state = secagg_phase(&app, &r, round).await?;
        let (kind, want) = match &msg {
            SecAggMessage::Keys { .. } => ("keys", SecAggPhase::Keys),
            SecAggMessage::Shares { .. } => ("shares", SecAggPhase::Shares),
            SecAggMessage::Reveal { .. } => ("reveal", SecAggPhase::Reveal),
            SecAggMessage::Consistency { .. } => ("consistency", SecAggPhase::Reveal),
        };
        if state.phase != want {
            return Err(conflict(format!(
                "the round is in its {} phase: {kind} are not taken now",
                state.phase.as_str()
            )));
        }
        let sets = &state.sets;
        match &msg {
            SecAggMessage::Keys {
                mask_public,
                share_public,
                self_commitment,
                station_key,
                signature,
            } => {
                // A station advertises its own registered key, or none.
                if let Some(pem) = station_key {
                    let registered = app.db.station(&st).await?.map(|s| s.public_key);
                    let same = PublicKey::from_pem(pem, "station_key").ok()
                        == registered.and_then(|k| PublicKey::from_pem(&k, "registered").ok());
                    if pem.len() > 1024 || !same {
                        return Err(bad_request("station_key is not this station's key"));
                    }
                }
                if signature.as_ref().is_some_and(|s| s.len() > 200) {
                    return Err(bad_request("the keys' signature is too long"));
                }
                let open = app
                    .db
                    .runs_of_task(&r.task.id)
                    .await?
                    .into_iter()
                    .any(|run| {
                        run.station == st
                            && matches!(run.state, RunState::Delivered | RunState::Running)
                    });
                if !open {
                    return Err(forbidden("this station has no open run in that round"));
                }
                if [mask_public, share_public, self_commitment]
                    .iter()
                    .any(|k| hex32(k).is_none())
                {
                    return Err(bad_request("keys and the commitment are 32 bytes in hex"));
                }
            }
            SecAggMessage::Shares { shares } => {
                if !sets.participants.contains(&r.me) {
                    return Err(forbidden("this station's keys came after the key exchange closed"));
                }
                let to: BTreeSet<u32> = shares.iter().map(|s| s.to).collect();
                let everyone: BTreeSet<u32> = sets.participants.iter().copied().collect();
                if to != everyone
                    || shares.len() != everyone.len()
                    || shares.iter().any(|s| s.from != r.me || s.sealed.len() > 1024)
                {
                    return Err(bad_request(
                        "one sealed share from this station to each participant, itself included",
                    ));
                }
            }
            SecAggMessage::Consistency { signature } => {
                if !sets.survivors.contains(&r.me) {
                    return Err(forbidden("only stations whose masked update was used sign the sets"));
                }
                if signature.is_empty() || signature.len() > 200 {
                    return Err(bad_request("a signature is 1 to 200 characters"));
                }
            }
            SecAggMessage::Reveal { shares } => {
                if !sets.survivors.contains(&r.me) {
                    return Err(forbidden("only stations whose masked update was used reveal shares"));
                }
                let want: BTreeSet<(u32, SecretKind)> = sets
                    .survivors
                    .iter()
                    .map(|&i| (i, SecretKind::SelfSeed))
                    .chain(sets.dropped.iter().map(|&i| (i, SecretKind::MaskKey)))
                    .collect();
                let got: BTreeSet<(u32, SecretKind)> =
                    shares.iter().map(|s| (s.of, s.secret)).collect();
                if got != want || shares.len() != want.len() || shares.iter().any(|s| hex32(&s.y).is_none()) {
                    return Err(bad_request(
                        "reveal exactly the self-seed shares of the survivors and the mask-key shares of the dropped",
                    ));
                }
            }
        }
        let stored = serde_json::to_string(&msg).expect("messages serialise");
        if !app.db.secagg_put(&r.task.id, &st, kind, &stored).await? {
            return Err(conflict(format!("this station already sent different {kind} in this round")));
        }
        trail(&app, &caller.label(), "secagg", &format!("{id}/{round}"), &format!("ok {kind}")).await;
        advance_job(&app, &id).await?;
        Ok(StatusCode::NO_CONTENT.into_response())
    })
    .await
}

/// For a securely aggregated round: an update must be a masked vector of the right length
/// from a station whose shares went out; a plain update is refused.
pub(super) async fn check_masked_update(
    app: &App,
    job: &str,
    round: u32,
    station: &str,
    update: Option<&[u8]>,
) -> Result<(), ApiError> {
    let Some(job_row) = app.db.job(job).await? else {
        return Ok(());
    };
    if job_row.plan.secure_aggregation.is_none() || round > job_row.plan.rounds {
        return Ok(());
    }
    let Some(update) = update else {
        return Ok(());
    };
    let y = amicus_fl::secagg::decode_masked(update).map_err(|_| {
        bad_request("this round uses secure aggregation: only a masked update is taken")
    })?;
    let r = secagg_round_ref(app, job, round, station).await?;
    let state = secagg_phase(app, &r, round).await?;
    if state.phase != SecAggPhase::Masked || !state.sets.sharers.contains(&r.me) {
        return Err(conflict(
            "a masked update is taken only in the masked phase, from a station whose shares went out",
        ));
    }
    let global = app
        .db
        .checkpoint(job, round - 1)
        .await?
        .and_then(|c| amicus_fl::wire::Weights::decode(&c.weights).ok())
        .ok_or_else(|| not_found("no global weights for that round"))?;
    if y.len() != global.len() + 1 {
        return Err(bad_request(format!(
            "the masked update has {} values; this model needs {}",
            y.len(),
            global.len() + 1
        )));
    }
    Ok(())
}
