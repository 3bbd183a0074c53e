//! Routes for people: users, stations, trains, tasks and their results, the trail.

use super::*;

pub(super) fn user_info(u: &UserRow) -> UserInfo {
    UserInfo {
        name: u.name.clone(),
        role: Role::parse(&u.role).unwrap_or(Role::Auditor),
        station: u.station.clone(),
        has_enc_key: u.enc_public_key.is_some(),
    }
}

/// Create a user (admin API and `amicus registry user add`); returns the token, shown once.
pub async fn add_user(db: &Db, new: &NewUser) -> Result<NewUserResponse, ApiError> {
    if !valid_name(&new.name) {
        return Err(bad_request("user names are 1-64 of A-Z a-z 0-9 . _ -"));
    }
    match (new.role, &new.station) {
        (Role::DataOwner, Some(st)) if db.station(st).await?.is_none() => {
            return Err(bad_request(format!("no station {st:?}; register it first")));
        }
        (Role::DataOwner, Some(_)) => {}
        (Role::DataOwner, None) => return Err(bad_request("a data owner needs --station")),
        (_, Some(_)) => return Err(bad_request("only data owners belong to a station")),
        _ => {}
    }
    if let Some(pem) = &new.enc_public_key {
        if new.role != Role::Researcher {
            return Err(bad_request("only researchers have an encryption key"));
        }
        crate::sealed::RecipientPublicKey::from_pem(pem, "enc_public_key")
            .map_err(|e| bad_request(e.to_string()))?;
    }
    let expires_ms = token_expiry(new.token_expires_in_s)?;
    let token = new_token()?;
    if !db
        .insert_user(
            &new.name,
            new.role.as_str(),
            new.station.as_deref(),
            &token_hash(&token),
            new.enc_public_key.as_deref(),
            expires_ms,
        )
        .await?
    {
        return Err(conflict(format!("user {:?} exists", new.name)));
    }
    Ok(NewUserResponse {
        user: UserInfo {
            name: new.name.clone(),
            role: new.role,
            station: new.station.clone(),
            has_enc_key: new.enc_public_key.is_some(),
        },
        token,
    })
}

// ---- handlers ---------------------------------------------------------------------------

pub(super) async fn health(State(app): State<App>, req: Request) -> Response {
    handle(app, "health", req, 0, Auth::None, |_, _, _| async {
        Ok(json(&serde_json::json!({"status": "ok"})))
    })
    .await
}

/// Readiness: 200 while the database answers within 3 s, else 503 `not_ready` (a load
/// balancer or Kubernetes then sends no traffic here; `/v1/health` stays 200: the process is
/// alive).
pub(super) async fn ready(State(app): State<App>, req: Request) -> Response {
    handle(app, "ready", req, 0, Auth::None, |app, _, _| async move {
        match tokio::time::timeout(std::time::Duration::from_secs(3), app.db.ping()).await {
            Ok(Ok(())) => Ok(json(&serde_json::json!({"status": "ready"}))),
            _ => Err(err(
                StatusCode::SERVICE_UNAVAILABLE,
                "not_ready",
                "the registry cannot reach its database",
            )),
        }
    })
    .await
}

pub(super) async fn openapi(State(app): State<App>, req: Request) -> Response {
    handle(app, "openapi", req, 0, Auth::None, |_, _, _| async {
        Ok(([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response())
    })
    .await
}

pub(super) async fn me(State(app): State<App>, req: Request) -> Response {
    handle(
        app,
        "me",
        req,
        0,
        Auth::People(ANY_PERSON),
        |_, _, c| async move { Ok(json(&user_info(c.expect("authenticated").person()))) },
    )
    .await
}

/// Longest a token may be made to last: ten years.
const MAX_TOKEN_SECONDS: u64 = 10 * 365 * 86_400;

fn token_expiry(expires_in_s: Option<u64>) -> Result<Option<i64>, ApiError> {
    match expires_in_s {
        None => Ok(None),
        Some(s) if s == 0 || s > MAX_TOKEN_SECONDS => {
            Err(bad_request("a token expires in 1 s to 10 years"))
        }
        Some(s) => Ok(Some(crate::db::now_ms() + s as i64 * 1000)),
    }
}

fn new_token() -> Result<String, ApiError> {
    let mut raw = [0u8; 32];
    getrandom::fill(&mut raw)
        .map_err(|e| err(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?;
    Ok(format!("amicus_{}", hex::encode(raw)))
}

/// Give `name` a new token (`amicus registry user add` has made the first). The old token
/// stops working at once.
pub async fn rotate_token(
    db: &Db,
    name: &str,
    req: &TokenRequest,
) -> Result<TokenResponse, ApiError> {
    let expires_ms = token_expiry(req.expires_in_s)?;
    let token = new_token()?;
    if !db
        .rotate_token(name, &token_hash(&token), expires_ms)
        .await?
    {
        return Err(not_found(format!("no user {name:?}")));
    }
    Ok(TokenResponse {
        user: name.to_string(),
        token,
        expires_ms,
    })
}

/// Admins for anyone, everyone for themselves.
fn may_manage_token(c: &Caller, name: &str) -> Result<(), ApiError> {
    let me = c.person();
    if me.role == Role::Admin.as_str() || me.name == name {
        Ok(())
    } else {
        Err(forbidden("only an admin may change another person's token"))
    }
}

pub(super) async fn post_token(
    State(app): State<App>,
    Path(name): Path<String>,
    req: Request,
) -> Response {
    let limit = app.limits.json_bytes;
    handle(
        app,
        "token-rotate",
        req,
        limit,
        Auth::People(ANY_PERSON),
        |app, r, c| async move {
            let c = c.expect("authenticated");
            may_manage_token(&c, &name)?;
            let body: TokenRequest = if r.body.is_empty() {
                TokenRequest::default()
            } else {
                r.parse()?
            };
            let made = rotate_token(&app.db, &name, &body).await?;
            let until = made
                .expires_ms
                .map(|t| format!(", expires {t}"))
                .unwrap_or_default();
            trail(
                &app,
                &c.label(),
                "token-rotate",
                &name,
                &format!("ok{until}"),
            )
            .await;
            Ok((StatusCode::CREATED, axum::Json(made)).into_response())
        },
    )
    .await
}

pub(super) async fn delete_token(
    State(app): State<App>,
    Path(name): Path<String>,
    req: Request,
) -> Response {
    handle(
        app,
        "token-revoke",
        req,
        0,
        Auth::People(ANY_PERSON),
        |app, _, c| async move {
            let c = c.expect("authenticated");
            may_manage_token(&c, &name)?;
            if !app.db.revoke_token(&name).await? {
                return Err(not_found(format!("no user {name:?}")));
            }
            trail(&app, &c.label(), "token-revoke", &name, "ok").await;
            Ok(StatusCode::NO_CONTENT.into_response())
        },
    )
    .await
}

pub(super) async fn list_users(State(app): State<App>, req: Request) -> Response {
    let limit = 0;
    handle(
        app,
        "user-list",
        req,
        limit,
        Auth::People(&[Role::Admin]),
        |app, r, _| async move {
            let page = page(&r)?;
            let users: Vec<UserInfo> = app.db.users().await?.iter().map(user_info).collect();
            let rest = page.skip(users, |u| &u.name)?;
            Ok(page.answer(&r, rest, |u| u.name.clone()))
        },
    )
    .await
}

pub(super) async fn create_user(State(app): State<App>, req: Request) -> Response {
    let limit = app.limits.json_bytes;
    handle(
        app,
        "user-add",
        req,
        limit,
        Auth::People(&[Role::Admin]),
        |app, r, c| async move {
            let new: NewUser = r.parse()?;
            let created = add_user(&app.db, &new).await?;
            let actor = c.expect("authenticated").label();
            trail(
                &app,
                &actor,
                "user-add",
                &new.name,
                &format!("ok role {}", new.role.as_str()),
            )
            .await;
            Ok((StatusCode::CREATED, axum::Json(created)).into_response())
        },
    )
    .await
}

pub(super) async fn list_stations(State(app): State<App>, req: Request) -> Response {
    handle(
        app,
        "station-list",
        req,
        0,
        Auth::People(ANY_PERSON),
        |app, r, _| async move {
            let page = page(&r)?;
            let rest = page.skip(app.db.stations().await?, |s| &s.name)?;
            Ok(page.answer(&r, rest, |s| s.name.clone()))
        },
    )
    .await
}

pub(super) async fn create_station(State(app): State<App>, req: Request) -> Response {
    let limit = app.limits.json_bytes;
    handle(
        app,
        "station-add",
        req,
        limit,
        Auth::People(&[Role::Admin]),
        |app, r, c| async move {
            let new: NewStation = r.parse()?;
            if !valid_name(&new.name) {
                return Err(bad_request("station names are 1-64 of A-Z a-z 0-9 . _ -"));
            }
            let key = PublicKey::from_pem(&new.public_key, "public_key")
                .map_err(|e| bad_request(e.to_string()))?;
            let key_id = key.id().to_string();
            if !app
                .db
                .insert_station(&new.name, &key_id, &key.to_pem())
                .await?
            {
                return Err(conflict("a station with this name or key exists"));
            }
            let actor = c.expect("authenticated").label();
            trail(
                &app,
                &actor,
                "station-add",
                &new.name,
                &format!("ok key {key_id}"),
            )
            .await;
            let info = app
                .db
                .station(&new.name)
                .await?
                .ok_or_else(|| not_found("station"))?;
            Ok((StatusCode::CREATED, axum::Json(info)).into_response())
        },
    )
    .await
}

/// Data owners see only their own station; admins and auditors see every one.
pub(super) fn may_see_station(c: &Caller, station: &str) -> Result<(), ApiError> {
    let u = c.person();
    match Role::parse(&u.role) {
        Some(Role::Admin | Role::Auditor) => Ok(()),
        Some(Role::DataOwner) if u.station.as_deref() == Some(station) => Ok(()),
        _ => Err(forbidden(format!("you may not see station {station:?}"))),
    }
}

pub(super) async fn station_runs(
    State(app): State<App>,
    Path(name): Path<String>,
    req: Request,
) -> Response {
    let roles: &[Role] = &[Role::Admin, Role::Auditor, Role::DataOwner];
    handle(
        app,
        "station-runs",
        req,
        0,
        Auth::People(roles),
        |app, r, c| async move {
            may_see_station(c.as_ref().expect("authenticated"), &name)?;
            let page = page(&r)?;
            app.db.expire_overdue().await?;
            let rest = page.known(
                app.db
                    .runs_of_station(&name, page.after.as_deref(), page.fetch())
                    .await?,
            )?;
            Ok(page.answer(&r, rest, |x| x.id.clone()))
        },
    )
    .await
}

pub(super) async fn station_audit(
    State(app): State<App>,
    Path(name): Path<String>,
    req: Request,
) -> Response {
    let roles: &[Role] = &[Role::Admin, Role::Auditor, Role::DataOwner];
    handle(
        app,
        "station-audit",
        req,
        0,
        Auth::People(roles),
        |app, r, c| async move {
            may_see_station(c.as_ref().expect("authenticated"), &name)?;
            let page = page(&r)?;
            let st = app
                .db
                .station(&name)
                .await?
                .ok_or_else(|| not_found("no such station"))?;
            let (mut lines, head) = app
                .db
                .station_audit(&name, page.after_seq()?, page.limit.saturating_add(1))
                .await?;
            let more = lines.len() > page.limit;
            lines.truncate(page.limit);
            let last = lines.last().map(|(seq, _)| seq.to_string());
            let mut resp = json(&StationAudit {
                station: name,
                public_key: st.public_key,
                lines: lines.into_iter().map(|(_, l)| l).collect(),
                head,
            });
            if more && let Some(last) = last {
                page.link(&r, &last, &mut resp);
            }
            Ok(resp)
        },
    )
    .await
}

pub(super) async fn list_trains(State(app): State<App>, req: Request) -> Response {
    handle(
        app,
        "train-list",
        req,
        0,
        Auth::People(ANY_PERSON),
        |app, r, _| async move {
            let page = page(&r)?;
            let rest = page.known(app.db.trains(page.after.as_deref(), page.fetch()).await?)?;
            Ok(page.answer(&r, rest, |t| t.digest.clone()))
        },
    )
    .await
}

pub(super) async fn put_train(State(app): State<App>, req: Request) -> Response {
    let limit = app.limits.bundle_bytes;
    let roles: &[Role] = &[Role::Researcher, Role::Admin];
    handle(
        app,
        "train-upload",
        req,
        limit,
        Auth::People(roles),
        |app, r, c| async move {
            let actor = c.expect("authenticated");
            let bundle = Bundle::from_reader(&r.body[..]).map_err(|e| {
                err(
                    StatusCode::BAD_REQUEST,
                    "invalid_bundle",
                    format!("not a valid bundle: {e}"),
                )
            })?;
            let digest = bundle.digest();
            let m = bundle.manifest();
            let signers = bundle
                .signatures()
                .iter()
                .flat_map(|env| {
                    let role = env
                        .statement_for(&digest)
                        .map(|s| s.predicate.role)
                        .unwrap_or_else(|_| "invalid".into());
                    env.signatures.iter().map(move |s| SignerInfo {
                        keyid: s.keyid.clone(),
                        role: role.clone(),
                    })
                })
                .collect();
            let info = TrainInfo {
                digest: digest.to_hex(),
                name: m.train.name.clone(),
                version: m.train.version.clone(),
                bytes: r.body.len() as i64,
                capabilities: m
                    .capabilities
                    .iter()
                    .map(|c| c.name().to_string())
                    .collect(),
                signers,
                uploaded_by: actor.person().name.clone(),
                created_ms: now_ms(),
            };
            if !app.db.put_train(&info, &r.body).await? {
                return Err(conflict("this train was uploaded by someone else"));
            }
            trail(
                &app,
                &actor.label(),
                "train-upload",
                &info.digest,
                &format!("ok {}@{}", info.name, info.version),
            )
            .await;
            let stored = app
                .db
                .train(&info.digest)
                .await?
                .ok_or_else(|| not_found("train"))?;
            Ok((StatusCode::CREATED, axum::Json(stored)).into_response())
        },
    )
    .await
}

pub(super) fn octets(bytes: Vec<u8>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        )],
        Body::from(bytes),
    )
        .into_response()
}

pub(super) async fn get_train(
    State(app): State<App>,
    Path(digest): Path<String>,
    req: Request,
) -> Response {
    handle(
        app,
        "train-download",
        req,
        0,
        Auth::People(ANY_PERSON),
        |app, _, _| async move {
            if !valid_digest(&digest) {
                return Err(bad_request("a digest is 64 lowercase hex digits"));
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

pub(super) async fn task_info(app: &App, t: TaskRow) -> Result<TaskInfo, ApiError> {
    let runs = app.db.runs_of_task(&t.id).await?;
    Ok(TaskInfo {
        params: serde_json::from_str(&t.params).unwrap_or(serde_json::Value::Null),
        id: t.id,
        researcher: t.researcher,
        train: t.train,
        created_ms: t.created_ms,
        expires_ms: t.expires_ms,
        runs,
    })
}

/// The researcher's X25519 key, which results are sealed to.
pub(super) fn recipient_key(user: &UserRow) -> Result<String, ApiError> {
    user.enc_public_key.clone().ok_or_else(|| {
        bad_request(
            "you have no encryption key at the registry: results could not be sealed to you",
        )
    })
}

/// A bundle digest the registry holds.
pub(super) async fn check_train(app: &App, digest: &str) -> Result<(), ApiError> {
    if !valid_digest(digest) {
        return Err(bad_request(
            "train must be a bundle digest (64 lowercase hex digits)",
        ));
    }
    if app.db.train(digest).await?.is_none() {
        return Err(not_found("no such train; push it first"));
    }
    Ok(())
}

/// 1 to 10 000 registered stations, none named twice.
pub(super) async fn check_stations(
    app: &App,
    stations: &[String],
    what: &str,
) -> Result<(), ApiError> {
    if stations.is_empty() || stations.len() > 10_000 {
        return Err(bad_request(format!("a {what} names 1 to 10000 stations")));
    }
    let mut seen = std::collections::BTreeSet::new();
    for st in stations {
        if !seen.insert(st) {
            return Err(bad_request(format!("station {st:?} named twice")));
        }
        if app.db.station(st).await?.is_none() {
            return Err(not_found(format!("no station {st:?}")));
        }
    }
    Ok(())
}

pub(super) async fn create_task(State(app): State<App>, req: Request) -> Response {
    let limit = app.limits.json_bytes;
    handle(
        app,
        "task-create",
        req,
        limit,
        Auth::People(&[Role::Researcher]),
        |app, r, c| async move {
            let caller = c.expect("authenticated");
            let user = caller.person();
            let new: NewTask = r.parse()?;
            check_train(&app, &new.train).await?;
            let recipient = recipient_key(user)?;
            check_stations(&app, &new.stations, "task").await?;
            let expires_in = new.expires_in_s.unwrap_or(86_400);
            if expires_in == 0 || expires_in > 30 * 86_400 {
                return Err(bad_request("expires_in_s must be 1 s to 30 days"));
            }
            let params = new.params.unwrap_or(serde_json::json!({}));
            let now = now_ms();
            let task = TaskRow {
                id: random_id(),
                researcher: user.name.clone(),
                train: new.train.clone(),
                params: params.to_string(),
                created_ms: now,
                expires_ms: now + expires_in as i64 * 1000,
                statement: new.statement.clone(),
            };
            if let Some(s) = &new.statement {
                check_statement(
                    s,
                    "task",
                    &task.train,
                    &task.params,
                    &new.stations,
                    &recipient,
                    task.expires_ms,
                    None,
                    None,
                )?;
            }
            app.db.create_task(&task, &recipient, &new.stations).await?;
            trail(
                &app,
                &caller.label(),
                "task-create",
                &task.id,
                &format!("ok train {} stations {}", new.train, new.stations.join(",")),
            )
            .await;
            app.notify.notify_waiters();
            let info = task_info(&app, task).await?;
            Ok((StatusCode::CREATED, axum::Json(info)).into_response())
        },
    )
    .await
}

pub(super) async fn list_tasks(State(app): State<App>, req: Request) -> Response {
    let roles: &[Role] = &[Role::Researcher, Role::Admin, Role::Auditor];
    handle(
        app,
        "task-list",
        req,
        0,
        Auth::People(roles),
        |app, r, c| async move {
            let caller = c.expect("authenticated");
            let page = page(&r)?;
            app.db.expire_overdue().await?;
            let who =
                (caller.role() == Some(Role::Researcher)).then(|| caller.person().name.clone());
            let rows = page.known(
                app.db
                    .tasks(who.as_deref(), page.after.as_deref(), page.fetch())
                    .await?,
            )?;
            let mut out = Vec::new();
            for t in rows {
                out.push(task_info(&app, t).await?);
            }
            Ok(page.answer(&r, out, |t| t.id.clone()))
        },
    )
    .await
}

/// The task, if the caller may see it: its researcher, admins and auditors.
pub(super) async fn visible_task(
    app: &App,
    c: &Caller,
    id: &str,
    results: bool,
) -> Result<TaskRow, ApiError> {
    let t = app
        .db
        .task(id)
        .await?
        .ok_or_else(|| not_found("no such task"))?;
    let u = c.person();
    let own = u.role == Role::Researcher.as_str() && t.researcher == u.name;
    let oversight = !results && matches!(c.role(), Some(Role::Admin | Role::Auditor));
    if own || oversight {
        Ok(t)
    } else {
        Err(forbidden(if results {
            "only the researcher who created a task may fetch its results"
        } else {
            "this task is not yours"
        }))
    }
}

pub(super) async fn get_task(
    State(app): State<App>,
    Path(id): Path<String>,
    req: Request,
) -> Response {
    let roles: &[Role] = &[Role::Researcher, Role::Admin, Role::Auditor];
    handle(
        app,
        "task-show",
        req,
        0,
        Auth::People(roles),
        |app, _, c| async move {
            app.db.expire_overdue().await?;
            let t = visible_task(&app, c.as_ref().expect("authenticated"), &id, false).await?;
            Ok(json(&task_info(&app, t).await?))
        },
    )
    .await
}

pub(super) async fn task_results(
    State(app): State<App>,
    Path(id): Path<String>,
    req: Request,
) -> Response {
    handle(
        app,
        "task-results",
        req,
        0,
        Auth::People(ANY_PERSON),
        |app, _, c| async move {
            let caller = c.expect("authenticated");
            let t = visible_task(&app, &caller, &id, true).await?;
            let mut runs = Vec::new();
            for run in app.db.runs_of_task(&t.id).await? {
                let outputs = app
                    .db
                    .results_of_run(&run.id)
                    .await?
                    .into_iter()
                    .map(|(name, sealed, signature)| SealedOutput {
                        name,
                        sealed: B64.encode(sealed),
                        signature,
                    })
                    .collect();
                runs.push(RunResult {
                    run: run.id,
                    station: run.station,
                    state: run.state,
                    reason: run.reason,
                    outputs,
                });
            }
            trail(&app, &caller.label(), "task-results", &t.id, "ok").await;
            Ok(json(&TaskResults { task: t.id, runs }))
        },
    )
    .await
}

pub(super) async fn registry_audit(State(app): State<App>, req: Request) -> Response {
    let roles: &[Role] = &[Role::Admin, Role::Auditor];
    handle(
        app,
        "audit-read",
        req,
        0,
        Auth::People(roles),
        |app, r, _| async move {
            let page = page(&r)?;
            let rest = app
                .db
                .audit_page(page.after_seq()?, page.limit.saturating_add(1))
                .await?;
            Ok(page.answer(&r, rest, |e| e.seq.to_string()))
        },
    )
    .await
}

/// A signed request sent with a task or job must ask for what the registry will deliver: the
/// stations check it against that (and the signature against the researchers they trust), so
/// a statement that cannot pass is refused here, where the researcher sees why.
#[allow(clippy::too_many_arguments)]
pub(super) fn check_statement(
    envelope: &str,
    kind: &str,
    train: &str,
    params: &str,
    stations: &[String],
    recipient_key: &str,
    expires_ms: i64,
    plan: Option<&Plan>,
    initial_weights: Option<&[u8]>,
) -> Result<(), ApiError> {
    use crate::request::{MAX_REQUEST_BYTES, REQUEST_TYPE, RequestStatement};
    let bad = |m: String| bad_request(format!("the signed request: {m}"));
    if envelope.len() > MAX_REQUEST_BYTES {
        return Err(bad("longer than 64 KiB".into()));
    }
    let env = amicus_bundle::dsse::Envelope::parse(envelope.as_bytes())
        .map_err(|e| bad(e.to_string()))?;
    if env.payload_type != REQUEST_TYPE || env.signatures.is_empty() {
        return Err(bad("not a signed amicus request".into()));
    }
    let payload = B64.decode(&env.payload).map_err(|e| bad(e.to_string()))?;
    let st: RequestStatement = serde_json::from_slice(&payload).map_err(|e| bad(e.to_string()))?;
    let sha = |b: &[u8]| amicus_bundle::sha256(b).to_hex();
    let mut named: Vec<&String> = st.stations.iter().collect();
    let mut asked: Vec<&String> = stations.iter().collect();
    named.sort();
    asked.sort();
    let checks = [
        (st.kind == kind, "kind"),
        (st.train == train, "train"),
        (st.params_sha256 == sha(params.as_bytes()), "parameters"),
        (named == asked, "stations"),
        (
            st.station_keys.is_empty() || st.station_keys.keys().collect::<Vec<_>>() == asked,
            "stations' keys (not the stations asked for)",
        ),
        (
            crate::sealed::RecipientPublicKey::from_pem(recipient_key, "recipient")
                .is_ok_and(|k| k.fingerprint() == st.recipient_key_sha256),
            "recipient key (your registered encryption key)",
        ),
        (
            st.expires_ms >= expires_ms,
            "expiry (earlier than the task's)",
        ),
        (
            plan.is_none_or(|p| {
                st.plan_sha256.as_deref() == Some(crate::request::plan_sha256(p).as_str())
            }),
            "plan",
        ),
        (
            initial_weights
                .is_none_or(|w| st.initial_weights_sha256.as_deref() == Some(sha(w).as_str())),
            "initial weights",
        ),
    ];
    for (ok, what) in checks {
        if !ok {
            return Err(bad(format!("its {what} differs from this request's")));
        }
    }
    Ok(())
}
