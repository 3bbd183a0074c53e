//! The registry's HTTP service (axum): routes, authentication of people (bearer tokens, stored
//! as SHA-256) and stations (RFC 9421 signatures, nonce-checked), roles and scopes, limits,
//! JSON errors with stable codes, long-polling for work, and the audit of every refusal.
//!
//! Owns who may do what. Must not hold plaintext results (stations send ciphertext) or any
//! private key; SQL lives in `db`.

use crate::db::{Db, TaskRow, UpdateRefused, UserRow, now_ms, random_id};
use crate::httpsig::{self, RequestParts};
use crate::wire::*;
use amicus_bundle::{Bundle, PublicKey};
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use sha2::{Digest as _, Sha256};
use std::collections::BTreeSet;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;

/// The OpenAPI document, kept in the repository and served at `/v1/openapi.json`.
pub const OPENAPI: &str = include_str!("../openapi.json");

/// Every route: (method, path as in the OpenAPI document).
pub const ROUTES: &[(&str, &str)] = &[
    ("get", "/v1/health"),
    ("get", "/v1/openapi.json"),
    ("get", "/v1/me"),
    ("get", "/v1/users"),
    ("post", "/v1/users"),
    ("get", "/v1/stations"),
    ("post", "/v1/stations"),
    ("get", "/v1/stations/{name}/runs"),
    ("get", "/v1/stations/{name}/audit"),
    ("get", "/v1/trains"),
    ("put", "/v1/trains"),
    ("get", "/v1/trains/{digest}"),
    ("get", "/v1/tasks"),
    ("post", "/v1/tasks"),
    ("get", "/v1/tasks/{id}"),
    ("get", "/v1/tasks/{id}/results"),
    ("get", "/v1/jobs"),
    ("post", "/v1/jobs"),
    ("get", "/v1/jobs/{id}"),
    ("get", "/v1/jobs/{id}/weights"),
    ("get", "/v1/audit"),
    ("get", "/v1/station/work"),
    ("get", "/v1/station/open"),
    ("get", "/v1/station/trains/{digest}"),
    ("get", "/v1/station/jobs/{id}/rounds/{round}/weights"),
    ("get", "/v1/station/jobs/{id}/rounds/{round}/secagg"),
    ("post", "/v1/station/jobs/{id}/rounds/{round}/secagg"),
    ("post", "/v1/station/runs/{id}/state"),
    ("post", "/v1/station/runs/{id}/result"),
    ("get", "/v1/station/audit/next"),
    ("post", "/v1/station/audit"),
];

/// Request limits and timeouts.
#[derive(Debug, Clone)]
pub struct Limits {
    pub json_bytes: usize,
    pub bundle_bytes: usize,
    pub result_bytes: usize,
    pub audit_bytes: usize,
    pub request_timeout: Duration,
    /// Longest long-poll a station may ask for.
    pub max_wait: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            json_bytes: 1 << 20,
            bundle_bytes: 256 << 20,
            result_bytes: 64 << 20,
            audit_bytes: 16 << 20,
            request_timeout: Duration::from_secs(60),
            max_wait: Duration::from_secs(30),
        }
    }
}

#[derive(Clone)]
pub struct App {
    pub db: Db,
    notify: Arc<Notify>,
    limits: Arc<Limits>,
}

impl App {
    pub fn new(db: Db, limits: Limits) -> App {
        App {
            db,
            notify: Arc::new(Notify::new()),
            limits: Arc::new(limits),
        }
    }
}

/// An error answer: HTTP status, a stable code, a message for people.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

fn err(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
    ApiError {
        status,
        code,
        message: message.into(),
    }
}

fn bad_request(m: impl Into<String>) -> ApiError {
    err(StatusCode::BAD_REQUEST, "bad_request", m)
}
fn forbidden(m: impl Into<String>) -> ApiError {
    err(StatusCode::FORBIDDEN, "forbidden", m)
}
fn not_found(m: impl Into<String>) -> ApiError {
    err(StatusCode::NOT_FOUND, "not_found", m)
}
fn conflict(m: impl Into<String>) -> ApiError {
    err(StatusCode::CONFLICT, "conflict", m)
}

impl From<crate::db::DbError> for ApiError {
    fn from(e: crate::db::DbError) -> Self {
        // The message may name tables; it never contains request secrets.
        eprintln!("registry: database error: {e}");
        err(
            StatusCode::SERVICE_UNAVAILABLE,
            "database_unavailable",
            "the registry's database failed; retry later",
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code.to_string(),
                message: self.message,
            },
        };
        (self.status, axum::Json(body)).into_response()
    }
}

fn json<T: serde::Serialize>(v: &T) -> Response {
    axum::Json(v).into_response()
}

/// Who is calling.
#[derive(Clone)]
enum Caller {
    Person(Arc<UserRow>),
    Station(Arc<StationInfo>),
}

impl Caller {
    fn label(&self) -> String {
        match self {
            Caller::Person(u) => format!("user:{}", u.name),
            Caller::Station(s) => format!("station:{}", s.name),
        }
    }
    fn person(&self) -> &UserRow {
        match self {
            Caller::Person(u) => u,
            Caller::Station(_) => unreachable!("routes for people reject stations first"),
        }
    }
    fn station(&self) -> &StationInfo {
        match self {
            Caller::Station(s) => s,
            Caller::Person(_) => unreachable!("station routes reject people first"),
        }
    }
    fn role(&self) -> Option<Role> {
        match self {
            Caller::Person(u) => Role::parse(&u.role),
            Caller::Station(_) => None,
        }
    }
}

/// Who may call a route.
#[derive(Clone, Copy)]
enum Auth {
    None,
    People(&'static [Role]),
    Station,
}

const ANY_PERSON: &[Role] = &[
    Role::Admin,
    Role::Researcher,
    Role::DataOwner,
    Role::Auditor,
];

/// A read request: the parts the signature covers, and the body.
struct Req {
    method: String,
    authority: String,
    path: String,
    query: String,
    headers: HeaderMap,
    body: Bytes,
}

impl Req {
    fn parse<T: serde::de::DeserializeOwned>(&self) -> Result<T, ApiError> {
        serde_json::from_slice(&self.body).map_err(|e| {
            err(
                StatusCode::BAD_REQUEST,
                "malformed_json",
                format!("request body is not the expected JSON: {e}"),
            )
        })
    }
    fn query_param(&self, name: &str) -> Option<String> {
        self.query.split('&').find_map(|kv| {
            let (k, v) = kv.split_once('=')?;
            (k == name).then(|| v.to_string())
        })
    }
}

/// The request's parts; the body is read separately (`read_body`), so people are
/// authenticated before the registry buffers anything they send.
fn head(req: Request) -> (Req, Body) {
    let (parts, body) = req.into_parts();
    let authority = parts
        .headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .or_else(|| parts.uri.authority().map(|a| a.to_string()))
        .unwrap_or_default();
    let r = Req {
        method: parts.method.as_str().to_string(),
        authority,
        path: parts.uri.path().to_string(),
        query: parts.uri.query().unwrap_or("").to_string(),
        headers: parts.headers,
        body: Bytes::new(),
    };
    (r, body)
}

/// Read the body, refusing more than `limit` bytes (by `Content-Length` before reading, and
/// while reading).
async fn read_body(r: &mut Req, body: Body, limit: usize) -> Result<(), ApiError> {
    let too_big = || {
        err(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("request body exceeds {limit} bytes"),
        )
    };
    if let Some(len) = header_str(&r.headers, "content-length").and_then(|v| v.parse::<u64>().ok())
        && len > limit as u64
    {
        return Err(too_big());
    }
    r.body = axum::body::to_bytes(body, limit)
        .await
        .map_err(|_| too_big())?;
    Ok(())
}

fn header_str<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

fn token_hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

async fn authenticate(app: &App, r: &Req, auth: Auth) -> Result<Option<Caller>, ApiError> {
    let unauth = |m: &str| err(StatusCode::UNAUTHORIZED, "unauthenticated", m);
    if let Auth::None = auth {
        return Ok(None);
    }
    if let Some(value) = header_str(&r.headers, "authorization") {
        let token = value
            .strip_prefix("Bearer ")
            .ok_or_else(|| unauth("Authorization must be `Bearer <token>`"))?;
        let user = app
            .db
            .user_by_token(&token_hash(token.trim()))
            .await?
            .ok_or_else(|| unauth("unknown token"))?;
        let caller = Caller::Person(Arc::new(user));
        return match auth {
            Auth::People(roles) if caller.role().is_some_and(|r| roles.contains(&r)) => {
                Ok(Some(caller))
            }
            Auth::People(_) => Err(forbidden(format!(
                "role {} may not do this",
                caller.person().role
            ))),
            _ => Err(forbidden("this route is for stations (signed requests)")),
        };
    }
    if let Some(input) = header_str(&r.headers, "signature-input") {
        let bad = |e: httpsig::SignatureError| {
            err(StatusCode::UNAUTHORIZED, "bad_signature", e.to_string())
        };
        let params = httpsig::parse_input(input).map_err(bad)?;
        let station = app.db.station_by_key(&params.keyid).await?.ok_or_else(|| {
            err(
                StatusCode::UNAUTHORIZED,
                "unknown_station",
                "no station is registered with this key",
            )
        })?;
        let key = PublicKey::from_pem(&station.public_key, &station.name).map_err(|_| {
            err(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "stored key unreadable",
            )
        })?;
        let parts = RequestParts {
            method: &r.method,
            authority: &r.authority,
            path: &r.path,
            query: &r.query,
            body: &r.body,
        };
        httpsig::verify(
            &parts,
            header_str(&r.headers, "content-digest"),
            header_str(&r.headers, "signature"),
            &params,
            &key,
            now_ms() / 1000,
        )
        .map_err(bad)?;
        // Only after the signature verified: unauthenticated requests cannot burn nonces.
        if !app
            .db
            .use_nonce(&params.keyid, &params.nonce, params.created)
            .await?
        {
            return Err(err(
                StatusCode::UNAUTHORIZED,
                "replayed",
                "this request's nonce was used before (replayed request)",
            ));
        }
        app.db.touch_station(&station.name).await?;
        let caller = Caller::Station(Arc::new(station));
        return match auth {
            Auth::Station => Ok(Some(caller)),
            _ => Err(forbidden("this route is for people (bearer tokens)")),
        };
    }
    Err(unauth(
        "no credentials: send `Authorization: Bearer <token>` or a signed station request",
    ))
}

/// Strip what would break one-line audit fields.
fn one_line(s: &str) -> String {
    let mut s: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if s.len() > 500 {
        let mut end = 500;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push('…');
    }
    s
}

/// Run a handler: read the body under `limit`, authenticate, call `f`; every refusal is
/// answered as JSON and recorded in the registry's trail.
async fn handle<F, Fut>(
    app: App,
    action: &'static str,
    req: Request,
    limit: usize,
    auth: Auth,
    f: F,
) -> Response
where
    F: FnOnce(App, Req, Option<Caller>) -> Fut,
    Fut: Future<Output = Result<Response, ApiError>>,
{
    let path = req.uri().path().to_string();
    let result = async {
        let (mut r, body) = head(req);
        // People authenticate by header alone: check before reading what they send. A
        // station's signature covers the body, so it is read (within the limit) first.
        let caller = if r.headers.contains_key(header::AUTHORIZATION) {
            let caller = authenticate(&app, &r, auth).await?;
            read_body(&mut r, body, limit)
                .await
                .map_err(|e| (e, caller.as_ref().map(Caller::label)))?;
            caller
        } else {
            read_body(&mut r, body, limit).await?;
            authenticate(&app, &r, auth).await?
        };
        let label = caller.as_ref().map(Caller::label);
        f(app.clone(), r, caller).await.map_err(|e| (e, label))
    }
    .await;
    let (e, label) = match result {
        Ok(resp) => return resp,
        Err(e) => e,
    };
    let actor = label.unwrap_or_else(|| "anonymous".to_string());
    if e.code != "database_unavailable"
        && let Err(db) = app
            .db
            .audit(
                &actor,
                action,
                &one_line(&path),
                &one_line(&format!(
                    "refused {} {}: {}",
                    e.status.as_u16(),
                    e.code,
                    e.message
                )),
            )
            .await
    {
        eprintln!("registry: cannot record a refusal in the trail: {db}");
    }
    e.into_response()
}

// `handle`'s inner error carries the caller label; the first two steps have none.
impl From<ApiError> for (ApiError, Option<String>) {
    fn from(e: ApiError) -> Self {
        (e, None)
    }
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

fn valid_digest(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn user_info(u: &UserRow) -> UserInfo {
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
    let mut raw = [0u8; 32];
    getrandom::fill(&mut raw)
        .map_err(|e| err(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?;
    let token = format!("amicus_{}", hex::encode(raw));
    if !db
        .insert_user(
            &new.name,
            new.role.as_str(),
            new.station.as_deref(),
            &token_hash(&token),
            new.enc_public_key.as_deref(),
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

async fn health(State(app): State<App>, req: Request) -> Response {
    handle(app, "health", req, 0, Auth::None, |_, _, _| async {
        Ok(json(&serde_json::json!({"status": "ok"})))
    })
    .await
}

async fn openapi(State(app): State<App>, req: Request) -> Response {
    handle(app, "openapi", req, 0, Auth::None, |_, _, _| async {
        Ok(([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response())
    })
    .await
}

async fn me(State(app): State<App>, req: Request) -> Response {
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

async fn list_users(State(app): State<App>, req: Request) -> Response {
    let limit = 0;
    handle(
        app,
        "user-list",
        req,
        limit,
        Auth::People(&[Role::Admin]),
        |app, _, _| async move {
            let users: Vec<UserInfo> = app.db.users().await?.iter().map(user_info).collect();
            Ok(json(&users))
        },
    )
    .await
}

async fn create_user(State(app): State<App>, req: Request) -> Response {
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
            app.db
                .audit(
                    &actor,
                    "user-add",
                    &new.name,
                    &format!("ok role {}", new.role.as_str()),
                )
                .await?;
            Ok((StatusCode::CREATED, axum::Json(created)).into_response())
        },
    )
    .await
}

async fn list_stations(State(app): State<App>, req: Request) -> Response {
    handle(
        app,
        "station-list",
        req,
        0,
        Auth::People(ANY_PERSON),
        |app, _, _| async move { Ok(json(&app.db.stations().await?)) },
    )
    .await
}

async fn create_station(State(app): State<App>, req: Request) -> Response {
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
            app.db
                .audit(
                    &actor,
                    "station-add",
                    &new.name,
                    &format!("ok key {key_id}"),
                )
                .await?;
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
fn may_see_station(c: &Caller, station: &str) -> Result<(), ApiError> {
    let u = c.person();
    match Role::parse(&u.role) {
        Some(Role::Admin | Role::Auditor) => Ok(()),
        Some(Role::DataOwner) if u.station.as_deref() == Some(station) => Ok(()),
        _ => Err(forbidden(format!("you may not see station {station:?}"))),
    }
}

async fn station_runs(State(app): State<App>, Path(name): Path<String>, req: Request) -> Response {
    let roles: &[Role] = &[Role::Admin, Role::Auditor, Role::DataOwner];
    handle(
        app,
        "station-runs",
        req,
        0,
        Auth::People(roles),
        |app, _, c| async move {
            may_see_station(c.as_ref().expect("authenticated"), &name)?;
            app.db.expire_overdue().await?;
            Ok(json(&app.db.runs_of_station(&name).await?))
        },
    )
    .await
}

async fn station_audit(State(app): State<App>, Path(name): Path<String>, req: Request) -> Response {
    let roles: &[Role] = &[Role::Admin, Role::Auditor, Role::DataOwner];
    handle(
        app,
        "station-audit",
        req,
        0,
        Auth::People(roles),
        |app, _, c| async move {
            may_see_station(c.as_ref().expect("authenticated"), &name)?;
            let st = app
                .db
                .station(&name)
                .await?
                .ok_or_else(|| not_found("no such station"))?;
            let (lines, head) = app.db.station_audit(&name).await?;
            Ok(json(&StationAudit {
                station: name,
                public_key: st.public_key,
                lines,
                head,
            }))
        },
    )
    .await
}

async fn list_trains(State(app): State<App>, req: Request) -> Response {
    handle(
        app,
        "train-list",
        req,
        0,
        Auth::People(ANY_PERSON),
        |app, _, _| async move { Ok(json(&app.db.trains().await?)) },
    )
    .await
}

async fn put_train(State(app): State<App>, req: Request) -> Response {
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
            app.db
                .audit(
                    &actor.label(),
                    "train-upload",
                    &info.digest,
                    &format!("ok {}@{}", info.name, info.version),
                )
                .await?;
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

fn octets(bytes: Vec<u8>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        )],
        Body::from(bytes),
    )
        .into_response()
}

async fn get_train(State(app): State<App>, Path(digest): Path<String>, req: Request) -> Response {
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

async fn task_info(app: &App, t: TaskRow) -> Result<TaskInfo, ApiError> {
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
fn recipient_key(user: &UserRow) -> Result<String, ApiError> {
    user.enc_public_key.clone().ok_or_else(|| {
        bad_request(
            "you have no encryption key at the registry: results could not be sealed to you",
        )
    })
}

/// A bundle digest the registry holds.
async fn check_train(app: &App, digest: &str) -> Result<(), ApiError> {
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
async fn check_stations(app: &App, stations: &[String], what: &str) -> Result<(), ApiError> {
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

async fn create_task(State(app): State<App>, req: Request) -> Response {
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
            };
            app.db.create_task(&task, &recipient, &new.stations).await?;
            app.db
                .audit(
                    &caller.label(),
                    "task-create",
                    &task.id,
                    &format!("ok train {} stations {}", new.train, new.stations.join(",")),
                )
                .await?;
            app.notify.notify_waiters();
            let info = task_info(&app, task).await?;
            Ok((StatusCode::CREATED, axum::Json(info)).into_response())
        },
    )
    .await
}

async fn list_tasks(State(app): State<App>, req: Request) -> Response {
    let roles: &[Role] = &[Role::Researcher, Role::Admin, Role::Auditor];
    handle(
        app,
        "task-list",
        req,
        0,
        Auth::People(roles),
        |app, _, c| async move {
            let caller = c.expect("authenticated");
            app.db.expire_overdue().await?;
            let who =
                (caller.role() == Some(Role::Researcher)).then(|| caller.person().name.clone());
            let mut out = Vec::new();
            for t in app.db.tasks(who.as_deref()).await? {
                out.push(task_info(&app, t).await?);
            }
            Ok(json(&out))
        },
    )
    .await
}

/// The task, if the caller may see it: its researcher, admins and auditors.
async fn visible_task(app: &App, c: &Caller, id: &str, results: bool) -> Result<TaskRow, ApiError> {
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

async fn get_task(State(app): State<App>, Path(id): Path<String>, req: Request) -> Response {
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

async fn task_results(State(app): State<App>, Path(id): Path<String>, req: Request) -> Response {
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
                    .map(|(name, sealed)| SealedOutput {
                        name,
                        sealed: B64.encode(sealed),
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
            app.db
                .audit(&caller.label(), "task-results", &t.id, "ok")
                .await?;
            Ok(json(&TaskResults { task: t.id, runs }))
        },
    )
    .await
}

// ---- federated jobs ---------------------------------------------------------------------

/// Move a job on after one of its runs finished, and record what happened in the trail.
async fn advance_job(app: &App, job: &str) -> Result<(), ApiError> {
    report_advance(&app.db, &app.notify, job).await?;
    Ok(())
}

async fn report_advance(db: &Db, notify: &Notify, job: &str) -> Result<(), crate::db::DbError> {
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

async fn advance_run_job(app: &App, run: &str) -> Result<(), ApiError> {
    if let Some(r) = app.db.run(run).await?
        && let Some((job, _)) = app.db.round_of_task(&r.task).await?
    {
        advance_job(app, &job).await?;
    }
    Ok(())
}

/// Housekeeping: rounds whose deadline passed (their runs just expired) end here.
async fn advance_all_jobs(db: &Db, notify: &Notify) -> Result<(), crate::db::DbError> {
    for job in db.running_jobs().await? {
        report_advance(db, notify, &job).await?;
    }
    Ok(())
}

async fn job_info(app: &App, j: crate::db::JobRow) -> Result<JobInfo, ApiError> {
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

async fn create_job(State(app): State<App>, req: Request) -> Response {
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
            };
            let initial = crate::db::Checkpoint {
                round: 0,
                weights,
                server_state: serde_json::to_vec(&amicus_fl::aggregate::ServerState::default())
                    .expect("state serialises"),
                summary: "{}".into(),
            };
            let first = crate::jobs::round_task(&job);
            app.db.create_job(&job, &initial, &first).await?;
            app.db
                .audit(
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
                .await?;
            app.notify.notify_waiters();
            let info = job_info(&app, job).await?;
            Ok((StatusCode::CREATED, axum::Json(info)).into_response())
        },
    )
    .await
}

/// The job, if the caller may see it: its researcher, admins and auditors (`weights`: only
/// its researcher).
async fn visible_job(
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

async fn list_jobs(State(app): State<App>, req: Request) -> Response {
    let roles: &[Role] = &[Role::Researcher, Role::Admin, Role::Auditor];
    handle(
        app,
        "job-list",
        req,
        0,
        Auth::People(roles),
        |app, _, c| async move {
            let caller = c.expect("authenticated");
            let who =
                (caller.role() == Some(Role::Researcher)).then(|| caller.person().name.clone());
            let mut out = Vec::new();
            for j in app.db.jobs(who.as_deref()).await? {
                out.push(job_info(&app, j).await?);
            }
            Ok(json(&out))
        },
    )
    .await
}

async fn get_job(State(app): State<App>, Path(id): Path<String>, req: Request) -> Response {
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
async fn job_weights(State(app): State<App>, Path(id): Path<String>, req: Request) -> Response {
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
            app.db
                .audit(
                    &caller.label(),
                    "job-weights",
                    &j.id,
                    &format!("ok round {}", checkpoint.round),
                )
                .await?;
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
async fn station_round_weights(
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

// ---- secure aggregation ------------------------------------------------------------------

/// A securely aggregated round as seen from one of its job's stations.
struct SecAggRoundRef {
    job: crate::db::JobRow,
    task: TaskRow,
    plan: SecAggPlan,
    me: u32,
}

async fn secagg_round_ref(
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
async fn secagg_phase(
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
async fn station_secagg_view(
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
                    }) if state.sets.participants.contains(&i) => {
                        view.participants.push(SecAggParticipant {
                            id: i,
                            station: m.station.clone(),
                            keys: SecAggKeys {
                                mask_public,
                                share_public,
                                self_commitment,
                            },
                        })
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
            view.sharers = state.sets.sharers;
            view.survivors = state.sets.survivors;
            view.dropped = state.sets.dropped;
            Ok(json(&view))
        },
    )
    .await
}

/// A station sends its keys, its sealed shares or its unmasking shares.
async fn station_secagg_send(
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
            } => {
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
        app.db
            .audit(&caller.label(), "secagg", &format!("{id}/{round}"), &format!("ok {kind}"))
            .await?;
        advance_job(&app, &id).await?;
        Ok(StatusCode::NO_CONTENT.into_response())
    })
    .await
}

/// For a securely aggregated round: an update must be a masked vector of the right length
/// from a station whose shares went out; a plain update is refused.
async fn check_masked_update(
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

async fn registry_audit(State(app): State<App>, req: Request) -> Response {
    let roles: &[Role] = &[Role::Admin, Role::Auditor];
    handle(
        app,
        "audit-read",
        req,
        0,
        Auth::People(roles),
        |app, _, _| async move { Ok(json(&app.db.audit_entries().await?)) },
    )
    .await
}

// ---- station routes ---------------------------------------------------------------------

async fn station_work(State(app): State<App>, req: Request) -> Response {
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
                        app.db
                            .audit(
                                &format!("station:{st}"),
                                "run-delivered",
                                &i.run,
                                &format!("ok task {}", i.task),
                            )
                            .await?;
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

async fn station_open(State(app): State<App>, req: Request) -> Response {
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

async fn station_train(
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

fn refused_update(e: UpdateRefused) -> ApiError {
    match e {
        UpdateRefused::NotFound => not_found("no such run for this station"),
        UpdateRefused::Conflict(s) => conflict(format!("the run is {}", s.as_str())),
    }
}

async fn station_run_state(
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
        app.db
            .audit(&caller.label(), "run-state", &id, &format!("ok {}{}", update.state.as_str(), reason.map(|r| format!(": {r}")).unwrap_or_default()))
            .await?;
        if update.state.is_final() {
            advance_run_job(&app, &id).await?;
        }
        Ok(StatusCode::NO_CONTENT.into_response())
    })
    .await
}

async fn station_run_result(
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
                if !valid_name(&o.name) || !names.insert(o.name.clone()) {
                    return Err(bad_request(format!(
                        "bad or repeated output name {:?}",
                        o.name
                    )));
                }
                let sealed = B64
                    .decode(&o.sealed)
                    .map_err(|_| bad_request("sealed outputs are base64"))?;
                outputs.push((o.name, sealed));
            }
            app.db
                .store_result(&st, &id, &outputs, update.as_deref())
                .await?
                .map_err(refused_update)?;
            let bytes: usize = outputs.iter().map(|(_, s)| s.len()).sum();
            let update_note = update
                .as_ref()
                .map(|u| format!(", update {} bytes", u.len()))
                .unwrap_or_default();
            app.db
                .audit(
                    &caller.label(),
                    "run-result",
                    &id,
                    &format!(
                        "ok done, {} sealed outputs, {bytes} bytes{update_note}",
                        outputs.len()
                    ),
                )
                .await?;
            if let Some((job, _)) = job_round {
                advance_job(&app, &job).await?;
            }
            Ok(StatusCode::NO_CONTENT.into_response())
        },
    )
    .await
}

async fn station_audit_next(State(app): State<App>, req: Request) -> Response {
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

async fn station_audit_upload(State(app): State<App>, req: Request) -> Response {
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
                None => amicus_runtime::audit::GENESIS,
            };
            let mut rows = Vec::new();
            for line in &upload.lines {
                let hash = amicus_runtime::audit::check_line(
                    line.as_bytes(),
                    &key,
                    seq as u64,
                    &prev,
                    amicus_runtime::audit::PUBLIC,
                )
                .map_err(|why| {
                    err(
                        StatusCode::BAD_REQUEST,
                        "bad_audit",
                        format!("entry {seq}: {why}"),
                    )
                })?;
                rows.push((seq, line.clone(), hash.to_hex()));
                prev = hash;
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
            if !app
                .db
                .append_station_audit(&station.name, &rows, upload.head.as_deref())
                .await?
            {
                return Err(conflict(
                    "another upload of this station's log came first; fetch next_seq and retry",
                ));
            }
            if !rows.is_empty() {
                app.db
                    .audit(
                        &caller.label(),
                        "station-audit-upload",
                        &station.name,
                        &format!("ok {} entries to seq {}", rows.len(), seq - 1),
                    )
                    .await?;
            }
            Ok(json(&AuditAck { next_seq: seq }))
        },
    )
    .await
}

async fn timeout_layer(State(limits): State<Arc<Limits>>, req: Request, next: Next) -> Response {
    match tokio::time::timeout(limits.request_timeout, next.run(req)).await {
        Ok(r) => r,
        Err(_) => err(
            StatusCode::GATEWAY_TIMEOUT,
            "timeout",
            "the request took too long",
        )
        .into_response(),
    }
}

async fn fallback(State(app): State<App>, req: Request) -> Response {
    handle(app, "unknown-route", req, 0, Auth::None, |_, _, _| async {
        Err(not_found("no such route; see /v1/openapi.json"))
    })
    .await
}

/// The service's routes.
pub fn router(app: App) -> Router {
    let limits = app.limits.clone();
    Router::new()
        .route("/v1/health", get(health))
        .route("/v1/openapi.json", get(openapi))
        .route("/v1/me", get(me))
        .route("/v1/users", get(list_users).post(create_user))
        .route("/v1/stations", get(list_stations).post(create_station))
        .route("/v1/stations/{name}/runs", get(station_runs))
        .route("/v1/stations/{name}/audit", get(station_audit))
        .route("/v1/trains", get(list_trains).put(put_train))
        .route("/v1/trains/{digest}", get(get_train))
        .route("/v1/tasks", get(list_tasks).post(create_task))
        .route("/v1/tasks/{id}", get(get_task))
        .route("/v1/tasks/{id}/results", get(task_results))
        .route("/v1/jobs", get(list_jobs).post(create_job))
        .route("/v1/jobs/{id}", get(get_job))
        .route("/v1/jobs/{id}/weights", get(job_weights))
        .route("/v1/audit", get(registry_audit))
        .route("/v1/station/work", get(station_work))
        .route("/v1/station/open", get(station_open))
        .route("/v1/station/trains/{digest}", get(station_train))
        .route(
            "/v1/station/jobs/{id}/rounds/{round}/weights",
            get(station_round_weights),
        )
        .route(
            "/v1/station/jobs/{id}/rounds/{round}/secagg",
            get(station_secagg_view).post(station_secagg_send),
        )
        .route("/v1/station/runs/{id}/state", post(station_run_state))
        .route("/v1/station/runs/{id}/result", post(station_run_result))
        .route("/v1/station/audit/next", get(station_audit_next))
        .route("/v1/station/audit", post(station_audit_upload))
        .fallback(fallback)
        .layer(axum::middleware::from_fn_with_state(limits, timeout_layer))
        .layer(axum::extract::DefaultBodyLimit::disable())
        .with_state(app)
}

/// Serve until `shutdown` resolves. Prunes old nonces and expires overdue runs in the
/// background.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: App,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let db = app.db.clone();
    let notify = app.notify.clone();
    let housekeeping = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(10));
        loop {
            tick.tick().await;
            let cutoff = now_ms() / 1000 - 2 * httpsig::MAX_SKEW_S;
            if let Err(e) = db.prune_nonces(cutoff).await {
                eprintln!("registry: pruning nonces: {e}");
            }
            if let Err(e) = db.expire_overdue().await {
                eprintln!("registry: expiring runs: {e}");
            }
            if let Err(e) = advance_all_jobs(&db, &notify).await {
                eprintln!("registry: advancing jobs: {e}");
            }
        }
    });
    let result = axum::serve(listener, router(app))
        .with_graceful_shutdown(shutdown)
        .await;
    housekeeping.abort();
    result
}
