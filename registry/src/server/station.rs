//! Routes for stations (signed requests): work, open runs, bundles, run states and results,
//! audit uploads.

use super::*;

// ---- station routes ---------------------------------------------------------------------

pub(super) async fn station_work(State(app): State<App>, req: Request) -> Response {
    handle(
        app,
        "station-work",
        req,
        0,
        Auth::Station,
        |app, r, c| async move {
            let st = c.expect("authenticated").station().name.clone();
            let wait_s: u64 = match r.query_param("wait") {
                Some(v) => v
                    .parse()
                    .map_err(|_| bad_request("wait is whole seconds"))?,
                None => 0,
            };
            let wait = Duration::from_secs(wait_s).min(app.limits.max_wait);
            let deadline = tokio::time::Instant::now() + wait;
            loop {
                // Register for wake-ups before looking, so a task created in between is not missed.
                let notified = app.notify.notified();
                // Expired tasks are never handed out (take_work checks); marking them expired is
                // housekeeping's and the readers' job, not every poll's.
                let items = app.db.take_work(&st).await?;
                if !items.is_empty() {
                    for i in &items {
                        trail(
                            &app,
                            &format!("station:{st}"),
                            "run-delivered",
                            &i.run,
                            &format!("ok task {}", i.task),
                        )
                        .await;
                    }
                    return Ok(json(&WorkResponse { items }));
                }
                let now = tokio::time::Instant::now();
                if now >= deadline {
                    return Ok(json(&WorkResponse { items }));
                }
                // The notification wakes this replica at once; the nap bounds how late a task
                // created through another replica is seen.
                let nap = (deadline - now).min(Duration::from_secs(2));
                tokio::select! {
                    _ = notified => {}
                    _ = tokio::time::sleep(nap) => {}
                }
            }
        },
    )
    .await
}

pub(super) async fn station_open(State(app): State<App>, req: Request) -> Response {
    handle(
        app,
        "station-open",
        req,
        0,
        Auth::Station,
        |app, _, c| async move {
            let st = c.expect("authenticated").station().name.clone();
            app.db.expire_overdue().await?;
            Ok(json(&WorkResponse {
                items: app.db.open_work(&st).await?,
            }))
        },
    )
    .await
}

pub(super) async fn station_train(
    State(app): State<App>,
    Path(digest): Path<String>,
    req: Request,
) -> Response {
    handle(
        app,
        "station-train-download",
        req,
        0,
        Auth::Station,
        |app, _, c| async move {
            let st = c.expect("authenticated").station().name.clone();
            if !valid_digest(&digest) {
                return Err(bad_request("a digest is 64 lowercase hex digits"));
            }
            // A station fetches only trains it was asked to run.
            let open = app.db.open_work(&st).await?;
            if !open.iter().any(|w| w.train == digest) {
                return Err(forbidden("no open run of this station uses this train"));
            }
            let bytes = app
                .db
                .train_bundle(&digest)
                .await?
                .ok_or_else(|| not_found("no such train"))?;
            Ok(octets(bytes))
        },
    )
    .await
}

pub(super) fn refused_update(e: UpdateRefused) -> ApiError {
    match e {
        UpdateRefused::NotFound => not_found("no such run for this station"),
        UpdateRefused::Conflict(s) => conflict(format!("the run is {}", s.as_str())),
    }
}

pub(super) async fn station_run_state(
    State(app): State<App>,
    Path(id): Path<String>,
    req: Request,
) -> Response {
    let limit = app.limits.json_bytes;
    handle(app, "run-state", req, limit, Auth::Station, |app, r, c| async move {
        let caller = c.expect("authenticated");
        let st = caller.station().name.clone();
        let update: RunUpdate = r.parse()?;
        if !matches!(
            update.state,
            RunState::Delivered | RunState::Running | RunState::Refused | RunState::Failed
        ) {
            return Err(bad_request("a station reports delivered, running, refused or failed (done comes with the result)"));
        }
        let reason = update.reason.as_deref().map(one_line);
        app.db
            .update_run(&st, &id, update.state, reason.as_deref())
            .await?
            .map_err(refused_update)?;
        trail(&app, &caller.label(), "run-state", &id, &format!("ok {}{}", update.state.as_str(), reason.map(|r| format!(": {r}")).unwrap_or_default())).await;
        if update.state.is_final() {
            advance_run_job(&app, &id).await?;
        }
        Ok(StatusCode::NO_CONTENT.into_response())
    })
    .await
}

pub(super) async fn station_run_result(
    State(app): State<App>,
    Path(id): Path<String>,
    req: Request,
) -> Response {
    let limit = app.limits.result_bytes;
    handle(
        app,
        "run-result",
        req,
        limit,
        Auth::Station,
        |app, r, c| async move {
            let caller = c.expect("authenticated");
            let st = caller.station().name.clone();
            let upload: ResultUpload = r.parse()?;
            let job_round = match app.db.run(&id).await? {
                Some(run) if run.station == st => app.db.round_of_task(&run.task).await?,
                _ => None,
            };
            let update = match (&upload.update, &job_round) {
                (None, _) => None,
                (Some(_), None) => {
                    return Err(bad_request(
                        "an update comes only with a run of a federated job",
                    ));
                }
                (Some(u), Some(_)) => Some(
                    B64.decode(u)
                        .map_err(|_| bad_request("the update is base64"))?,
                ),
            };
            if let Some((job, round)) = &job_round {
                check_masked_update(&app, job, *round, &st, update.as_deref()).await?;
            }
            if upload.outputs.len() > 256 {
                return Err(bad_request("at most 256 outputs"));
            }
            let mut outputs = Vec::new();
            let mut names = std::collections::BTreeSet::new();
            for o in upload.outputs {
                // The manifest's rule for output names: what a train may declare, nothing a
                // researcher's `task results` could not write inside its folder.
                let declarable = amicus_bundle::manifest::check_output_name(&o.name).is_ok();
                if !declarable || !names.insert(o.name.clone()) {
                    return Err(bad_request(format!(
                        "bad or repeated output name {:?}",
                        o.name
                    )));
                }
                let sealed = B64
                    .decode(&o.sealed)
                    .map_err(|_| bad_request("sealed outputs are base64"))?;
                if o.signature.as_ref().is_some_and(|s| s.len() > 200) {
                    return Err(bad_request("an output's signature is too long"));
                }
                outputs.push((o.name, sealed, o.signature));
            }
            app.db
                .store_result(&st, &id, &outputs, update.as_deref())
                .await?
                .map_err(refused_update)?;
            let bytes: usize = outputs.iter().map(|(_, s, _)| s.len()).sum();
            let update_note = update
                .as_ref()
                .map(|u| format!(", update {} bytes", u.len()))
                .unwrap_or_default();
            trail(
                &app,
                &caller.label(),
                "run-result",
                &id,
                &format!(
                    "ok done, {} sealed outputs, {bytes} bytes{update_note}",
                    outputs.len()
                ),
            )
            .await;
            if let Some((job, _)) = job_round {
                advance_job(&app, &job).await?;
            }
            Ok(StatusCode::NO_CONTENT.into_response())
        },
    )
    .await
}

pub(super) async fn station_audit_next(State(app): State<App>, req: Request) -> Response {
    handle(
        app,
        "station-audit-next",
        req,
        0,
        Auth::Station,
        |app, _, c| async move {
            let st = c.expect("authenticated").station().name.clone();
            let (next_seq, _) = app.db.station_audit_tip(&st).await?;
            Ok(json(&AuditAck { next_seq }))
        },
    )
    .await
}

pub(super) async fn station_audit_upload(State(app): State<App>, req: Request) -> Response {
    let limit = app.limits.audit_bytes;
    handle(
        app,
        "station-audit-upload",
        req,
        limit,
        Auth::Station,
        |app, r, c| async move {
            let caller = c.expect("authenticated");
            let station = caller.station();
            let upload: AuditUpload = r.parse()?;
            if upload.lines.len() > 100_000 {
                return Err(bad_request("at most 100000 lines per upload"));
            }
            let key = PublicKey::from_pem(&station.public_key, &station.name).map_err(|_| {
                err(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    "stored key unreadable",
                )
            })?;
            let (mut seq, last) = app.db.station_audit_tip(&station.name).await?;
            let mut prev = match last {
                Some(h) => h.parse::<amicus_bundle::Digest>().map_err(|_| {
                    err(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "internal",
                        "stored hash unreadable",
                    )
                })?,
                None => amicus_bundle::audit_chain::GENESIS,
            };
            let mut rows = Vec::new();
            // Lines after a hand-over are signed by the key it hands over to; the station's
            // key becomes that key when the lines are stored.
            let mut signer = key;
            let mut retired: Vec<(String, String)> = Vec::new();
            for line in &upload.lines {
                let checked = amicus_bundle::audit_chain::check_line(
                    line.as_bytes(),
                    &signer,
                    seq as u64,
                    &prev,
                    amicus_bundle::audit_chain::PUBLIC,
                )
                .map_err(|why| {
                    err(
                        StatusCode::BAD_REQUEST,
                        "bad_audit",
                        format!("entry {seq}: {why}"),
                    )
                })?;
                rows.push((seq, line.clone(), checked.hash.to_hex()));
                prev = checked.hash;
                if let Some(next) = checked.next_key {
                    retired.push((signer.id().to_string(), signer.to_pem()));
                    signer = next;
                }
                seq += 1;
            }
            if let Some(h) = &upload.head
                && (h.len() > 4096 || serde_json::from_str::<serde_json::Value>(h).is_err())
            {
                return Err(err(
                    StatusCode::BAD_REQUEST,
                    "bad_audit",
                    "head is not the station's audit.head",
                ));
            }
            let rekey = (!retired.is_empty()).then(|| crate::db::Rekey {
                from_id: station.key_id.clone(),
                to_id: signer.id().to_string(),
                to_pem: signer.to_pem(),
                retired,
            });
            let stored = match app
                .db
                .append_station_audit(
                    &station.name,
                    &station.key_id,
                    &rows,
                    upload.head.as_deref(),
                    rekey.as_ref(),
                )
                .await
            {
                Ok(stored) => stored,
                Err(crate::db::DbError::KeyTaken(id)) => {
                    return Err(err(
                        StatusCode::CONFLICT,
                        "key_taken",
                        format!(
                            "the log hands this station's key over to key {id}, which another station holds or which was retired: refused"
                        ),
                    ));
                }
                Err(e) => return Err(e.into()),
            };
            if !stored {
                return Err(conflict(
                    "another upload of this station's log came first; fetch next_seq and retry",
                ));
            }
            if let Some(k) = &rekey {
                trail(
                    &app,
                    &caller.label(),
                    "station-key-rotated",
                    &station.name,
                    &format!("ok key {} -> {}", k.from_id, k.to_id),
                )
                .await;
            }
            if !rows.is_empty() {
                trail(
                    &app,
                    &caller.label(),
                    "station-audit-upload",
                    &station.name,
                    &format!("ok {} entries to seq {}", rows.len(), seq - 1),
                )
                .await;
            }
            Ok(json(&AuditAck { next_seq: seq }))
        },
    )
    .await
}
