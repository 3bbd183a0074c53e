//! The registry's HTTP service (axum): routes, authentication of people (bearer tokens, stored
//! as SHA-256) and stations (RFC 9421 signatures, nonce-checked), roles and scopes, limits,
//! JSON errors with stable codes, long-polling for work, and the audit of every refusal.
//!
//! Owns who may do what. Must not hold plaintext results (stations send ciphertext) or any
//! private key; SQL lives in `db`.
//!
//! One file a job: `auth` (the request head, bodies under limits, tokens and signatures,
//! `handle` and its refusals), `people` (users, stations, trains, tasks, the trail), `jobs`
//! (federated jobs and moving their rounds on), `secagg` (secure-aggregation messages),
//! `station` (the routes stations call), `listen` (serving and housekeeping); this file has
//! the shared types, errors and the router.

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

mod auth;
mod jobs;
mod listen;
mod people;
mod secagg;
mod station;

use auth::*;
use jobs::*;
use people::*;
use secagg::*;
use station::*;

pub use listen::serve;
pub use people::add_user;

/// The OpenAPI document, kept in the repository and served at `/v1/openapi.json`.
pub const OPENAPI: &str = include_str!("../../openapi.json");

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
