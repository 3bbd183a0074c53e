//! Federated jobs over HTTP: creating and showing jobs, their weights, and moving rounds on
//! (the round logic itself is `crate::jobs`).

use super::*;

// ---- federated jobs ---------------------------------------------------------------------

/// Move a job on after one of its runs finished, and record what happened in the trail.
/// One job's trouble stays that job's: a panic or a damaged row fails the job (recorded), a
/// database that is down is reported to the caller; the housekeeping tick tries again.
pub(super) async fn advance_job(app: &App, job: &str) -> Result<(), ApiError> {
    advance_guarded(&app.db, &app.notify, job).await?;
    Ok(())
}

/// [`report_advance`] in a task of its own, so that a panic in one job's aggregation cannot
/// take the caller (a request, or housekeeping) with it. A panic or a corrupt row fails the
/// job with the reason; only a database error is returned.
pub(super) async fn advance_guarded(
    db: &Db,
    notify: &Arc<Notify>,
    job: &str,
) -> Result<(), crate::db::DbError> {
    let (db2, notify2, id) = (db.clone(), notify.clone(), job.to_string());
    let outcome = tokio::spawn(async move { report_advance(&db2, &notify2, &id).await }).await;
    let reason = match outcome {
        Ok(Ok(())) => return Ok(()),
        Ok(Err(crate::db::DbError::Corrupt(what))) => format!("the job's data is damaged: {what}"),
        Ok(Err(e)) => return Err(e),
        Err(join) => {
            let what = join
                .try_into_panic()
                .ok()
                .and_then(|p| {
                    p.downcast_ref::<String>()
                        .cloned()
                        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                })
                .unwrap_or_else(|| "cancelled".into());
            format!("the registry failed while aggregating ({what})")
        }
    };
    eprintln!("registry: job {job}: {reason}");
    if let Some(round) = crate::jobs::fail_job(db, job, &reason).await? {
        db.audit(
            "registry",
            "job-failed",
            job,
            &format!("failed at round {round}: {reason}"),
        )
        .await?;
    }
    Ok(())
}

pub(super) async fn report_advance(
    db: &Db,
    notify: &Notify,
    job: &str,
) -> Result<(), crate::db::DbError> {
    use crate::jobs::Advanced;
    match crate::jobs::advance(db, job).await? {
        Advanced::RoundEnded { round, state } => {
            let summary = db
                .checkpoint(job, round)
                .await?
                .and_then(|c| serde_json::from_str::<RoundSummary>(&c.summary).ok());
            let detail = match summary {
                Some(s) => {
                    let parts: Vec<String> = s
                        .stations
                        .iter()
                        .map(|st| format!("{} {}", st.station, st.status))
                        .collect();
                    format!(
                        "ok round {round} aggregated ({}), job {}",
                        parts.join(", "),
                        state.as_str()
                    )
                }
                None => format!("ok round {round} ended, job {}", state.as_str()),
            };
            db.audit("registry", "job-round", job, &detail).await?;
            notify.notify_waiters();
        }
        Advanced::Failed { round, reason } => {
            db.audit(
                "registry",
                "job-failed",
                job,
                &format!("failed at round {round}: {reason}"),
            )
            .await?;
        }
        Advanced::Waiting | Advanced::Nothing => {}
    }
    Ok(())
}

/// After a station's report was stored: move its job on. The report stands whatever happens
/// here (a failure is logged; the housekeeping tick tries again), so a station is never
/// told to retry a report the registry already has.
pub(super) async fn advance_run_job(app: &App, run: &str) -> Result<(), ApiError> {
    let job = match app.db.run(run).await {
        Ok(Some(r)) => app.db.round_of_task(&r.task).await.ok().flatten(),
        _ => None,
    };
    if let Some((job, _)) = job
        && let Err(e) = advance_guarded(&app.db, &app.notify, &job).await
    {
        eprintln!("registry: job {job}: moving on after a report: {e}");
    }
    Ok(())
}

/// Housekeeping: rounds whose deadline passed (their runs just expired) end here. Each job
/// on its own: one that fails does not stop the others.
pub(super) async fn advance_all_jobs(
    db: &Db,
    notify: &Arc<Notify>,
) -> Result<(), crate::db::DbError> {
    for job in db.running_jobs().await? {
        if let Err(e) = advance_guarded(db, notify, &job).await {
            eprintln!("registry: job {job}: {e}");
        }
    }
    Ok(())
}

pub(super) async fn job_info(app: &App, j: crate::db::JobRow) -> Result<JobInfo, ApiError> {
    let summaries = app.db.round_summaries(&j.id).await?;
    let mut rounds = Vec::new();
    for (round, task) in app.db.job_rounds(&j.id).await? {
        rounds.push(JobRoundInfo {
            round,
            runs: app.db.runs_of_task(&task).await?,
            task,
            summary: summaries
                .iter()
                .find(|(r, _)| *r == round)
                .and_then(|(_, s)| serde_json::from_str(s).ok()),
        });
    }
    Ok(JobInfo {
        params: serde_json::from_str(&j.params).unwrap_or(serde_json::Value::Null),
        id: j.id,
        researcher: j.researcher,
        train: j.train,
        plan: j.plan,
        stations: j.stations,
        state: j.state,
        round: j.round,
        reason: j.reason,
        created_ms: j.created_ms,
        updated_ms: j.updated_ms,
        rounds,
    })
}

pub(super) async fn create_job(State(app): State<App>, req: Request) -> Response {
    // The initial weights travel in the request: allow a result-sized body.
    let limit = app.limits.result_bytes;
    handle(
        app,
        "job-create",
        req,
        limit,
        Auth::People(&[Role::Researcher]),
        |app, r, c| async move {
            let caller = c.expect("authenticated");
            let user = caller.person();
            let new: NewJob = r.parse()?;
            check_train(&app, &new.train).await?;
            let recipient = recipient_key(user)?;
            check_stations(&app, &new.stations, "job").await?;
            crate::jobs::check_plan(&new.plan, new.stations.len()).map_err(bad_request)?;
            let weights = B64
                .decode(&new.weights)
                .map_err(|_| bad_request("weights are base64"))?;
            let decoded = amicus_fl::wire::Weights::decode(&weights)
                .map_err(|e| bad_request(format!("initial weights: {e}")))?;
            if decoded.is_empty() {
                return Err(bad_request("initial weights hold no values"));
            }
            let now = now_ms();
            let job = crate::db::JobRow {
                id: random_id(),
                researcher: user.name.clone(),
                train: new.train.clone(),
                params: new.params.unwrap_or(serde_json::json!({})).to_string(),
                plan: new.plan,
                stations: new.stations,
                recipient_key: recipient,
                state: JobState::Running,
                round: 1,
                reason: None,
                created_ms: now,
                updated_ms: now,
                statement: new.statement.clone(),
            };
            if let Some(s) = &new.statement {
                // A job's rounds expire one after another; its request must outlive them all.
                let last =
                    now + (i64::from(job.plan.rounds) + 1) * job.plan.round_seconds as i64 * 1000;
                check_statement(
                    s,
                    "job",
                    &job.train,
                    &job.params,
                    &job.stations,
                    &job.recipient_key,
                    last,
                    Some(&job.plan),
                    Some(&weights),
                )?;
            }
            let initial = crate::db::Checkpoint {
                round: 0,
                weights,
                server_state: serde_json::to_vec(&amicus_fl::aggregate::ServerState::default())
                    .expect("state serialises"),
                summary: "{}".into(),
            };
            let first = crate::jobs::round_task(&job);
            app.db.create_job(&job, &initial, &first).await?;
            trail(
                &app,
                &caller.label(),
                "job-create",
                &job.id,
                &format!(
                    "ok train {} stations {} rounds {} ({} values)",
                    job.train,
                    job.stations.join(","),
                    job.plan.rounds,
                    decoded.len()
                ),
            )
            .await;
            app.notify.notify_waiters();
            let info = job_info(&app, job).await?;
            Ok((StatusCode::CREATED, axum::Json(info)).into_response())
        },
    )
    .await
}

/// The job, if the caller may see it: its researcher, admins and auditors (`weights`: only
/// its researcher).
pub(super) async fn visible_job(
    app: &App,
    c: &Caller,
    id: &str,
    weights: bool,
) -> Result<crate::db::JobRow, ApiError> {
    let j = app
        .db
        .job(id)
        .await?
        .ok_or_else(|| not_found("no such job"))?;
    let u = c.person();
    let own = u.role == Role::Researcher.as_str() && j.researcher == u.name;
    let oversight = !weights && matches!(c.role(), Some(Role::Admin | Role::Auditor));
    if own || oversight {
        Ok(j)
    } else {
        Err(forbidden(if weights {
            "only the researcher who created a job may fetch its weights"
        } else {
            "this job is not yours"
        }))
    }
}

pub(super) async fn list_jobs(State(app): State<App>, req: Request) -> Response {
    let roles: &[Role] = &[Role::Researcher, Role::Admin, Role::Auditor];
    handle(
        app,
        "job-list",
        req,
        0,
        Auth::People(roles),
        |app, r, c| async move {
            let caller = c.expect("authenticated");
            let page = super::page::page(&r)?;
            let who =
                (caller.role() == Some(Role::Researcher)).then(|| caller.person().name.clone());
            let rows = page.known(
                app.db
                    .jobs(who.as_deref(), page.after.as_deref(), page.fetch())
                    .await?,
            )?;
            let mut out = Vec::new();
            for j in rows {
                out.push(job_info(&app, j).await?);
            }
            Ok(page.answer(&r, out, |j| j.id.clone()))
        },
    )
    .await
}

pub(super) async fn get_job(
    State(app): State<App>,
    Path(id): Path<String>,
    req: Request,
) -> Response {
    let roles: &[Role] = &[Role::Researcher, Role::Admin, Role::Auditor];
    handle(
        app,
        "job-show",
        req,
        0,
        Auth::People(roles),
        |app, _, c| async move {
            let j = visible_job(&app, c.as_ref().expect("authenticated"), &id, false).await?;
            Ok(json(&job_info(&app, j).await?))
        },
    )
    .await
}

/// The global weights after a round (`?round=N`; default the newest checkpoint).
pub(super) async fn job_weights(
    State(app): State<App>,
    Path(id): Path<String>,
    req: Request,
) -> Response {
    handle(
        app,
        "job-weights",
        req,
        0,
        Auth::People(ANY_PERSON),
        |app, r, c| async move {
            let caller = c.expect("authenticated");
            let j = visible_job(&app, &caller, &id, true).await?;
            let wanted = match r.query_param("round") {
                Some(v) => Some(
                    v.parse::<u32>()
                        .map_err(|_| bad_request("round is a whole number"))?,
                ),
                None => None,
            };
            let checkpoint = match wanted {
                Some(n) => app.db.checkpoint(&j.id, n).await?,
                None => {
                    let mut found = None;
                    for n in (0..=j.round.min(j.plan.rounds)).rev() {
                        if let Some(c) = app.db.checkpoint(&j.id, n).await? {
                            found = Some(c);
                            break;
                        }
                    }
                    found
                }
            }
            .ok_or_else(|| not_found("no checkpoint for that round"))?;
            trail(
                &app,
                &caller.label(),
                "job-weights",
                &j.id,
                &format!("ok round {}", checkpoint.round),
            )
            .await;
            let mut resp = octets(checkpoint.weights);
            if let Ok(v) = HeaderValue::from_str(&checkpoint.round.to_string()) {
                resp.headers_mut().insert("amicus-round", v);
            }
            Ok(resp)
        },
    )
    .await
}

/// A station fetches the global weights a round of its own starts from.
pub(super) async fn station_round_weights(
    State(app): State<App>,
    Path((id, round)): Path<(String, u32)>,
    req: Request,
) -> Response {
    handle(
        app,
        "station-round-weights",
        req,
        0,
        Auth::Station,
        |app, _, c| async move {
            let st = c.expect("authenticated").station().name.clone();
            let open = app.db.open_work(&st).await?;
            if !open.iter().any(|w| {
                w.job
                    .as_ref()
                    .is_some_and(|j| j.job == id && j.round == round)
            }) {
                return Err(forbidden("no open run of this station is in that round"));
            }
            let c = app
                .db
                .checkpoint(&id, round.saturating_sub(1))
                .await?
                .ok_or_else(|| not_found("no global weights for that round"))?;
            Ok(octets(c.weights))
        },
    )
    .await
}
