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
pub mod metrics;
pub mod page;
mod people;
mod secagg;
mod station;
mod throttle;

use auth::*;
use jobs::*;
use page::page;
use people::*;
use secagg::*;
use station::*;

pub use listen::{ServeOptions, default_max_connections, serve, serve_with, tls_server_config};
pub use metrics::serve_metrics;
pub use people::add_user;
pub use throttle::{ROWS_PER_MINUTE, RateLimits};

/// The OpenAPI document, kept in the repository and served at `/v1/openapi.json`.
pub const OPENAPI: &str = include_str!("../../openapi.json");

/// Every route: (method, path as in the OpenAPI document).
pub const ROUTES: &[(&str, &str)] = &[
    ("get", "/v1/health"),
    ("get", "/v1/ready"),
    ("get", "/v1/openapi.json"),
    ("get", "/v1/me"),
    ("get", "/v1/users"),
    ("post", "/v1/users"),
    ("post", "/v1/users/{name}/token"),
    ("delete", "/v1/users/{name}/token"),
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
    /// Request rates per client address and per identity.
    pub rates: RateLimits,
    /// Bodies over `json_bytes` (bundles, results, audit uploads) read at once: what bounds
    /// the memory they take.
    pub large_bodies: usize,
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
            rates: RateLimits::default(),
            large_bodies: 4,
        }
    }
}

#[derive(Clone)]
pub struct App {
    pub db: Db,
    notify: Arc<Notify>,
    limits: Arc<Limits>,
    throttle: Arc<throttle::Throttle>,
    refusals: Arc<throttle::Refusals>,
    large_bodies: Arc<tokio::sync::Semaphore>,
    pub metrics: Arc<metrics::Metrics>,
}

impl App {
    pub fn new(db: Db, limits: Limits) -> App {
        App {
            db,
            notify: Arc::new(Notify::new()),
            throttle: Arc::new(throttle::Throttle::new(limits.rates)),
            refusals: Arc::new(throttle::Refusals::default()),
            large_bodies: Arc::new(tokio::sync::Semaphore::new(limits.large_bodies.max(1))),
            metrics: Arc::new(metrics::Metrics::default()),
            limits: Arc::new(limits),
        }
    }

    /// Write every refusal count now (at shutdown, and for tests that read the trail).
    pub async fn flush_trail(&self) {
        self.refusals.flush(&self.db, true).await;
    }
}

/// An error answer: HTTP status, a stable code, a message for people.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    /// Seconds to wait before retrying (a `Retry-After` header).
    pub retry_after: Option<u64>,
}

fn err(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
    ApiError {
        status,
        code,
        message: message.into(),
        retry_after: None,
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
        let mut r = (self.status, axum::Json(body)).into_response();
        if let Some(s) = self.retry_after
            && let Ok(v) = HeaderValue::from_str(&s.to_string())
        {
            r.headers_mut().insert(header::RETRY_AFTER, v);
        }
        r
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

/// The client's address (the TCP peer; behind a reverse proxy, the proxy's).
fn client_address(req: &Request) -> Option<std::net::IpAddr> {
    req.extensions()
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|c| c.0.ip())
}

/// A refusal that happens outside `handle` (rate limits, answers axum makes itself), recorded
/// within the trail's budget.
async fn record_refusal(
    app: &App,
    actor: &str,
    source: &str,
    action: &str,
    target: &str,
    e: &ApiError,
) {
    app.metrics.refused(e.code);
    let outcome = format!("refused {} {}: {}", e.status.as_u16(), e.code, e.message);
    if let Some(row) = app.refusals.note(
        actor,
        source,
        action,
        e.code,
        &one_line(target),
        one_line(&outcome),
    ) {
        write_row(app, row).await;
    }
}

/// Record what a request did in the trail. What the request changed is already stored, so a
/// database too busy for the row does not turn the answer into an error (the caller's retry
/// would do it twice): the row is retried and, failing that, kept for the housekeeping tick.
async fn trail(app: &App, actor: &str, action: &str, target: &str, outcome: &str) {
    let row = throttle::Row {
        actor: actor.to_string(),
        action: action.to_string(),
        target: target.to_string(),
        outcome: outcome.to_string(),
    };
    write_row(app, row).await
}

/// Write a trail row, retrying a busy database briefly; what still fails is kept for the
/// housekeeping tick.
async fn write_row(app: &App, row: throttle::Row) {
    for wait in [0u64, 50, 200] {
        if wait > 0 {
            tokio::time::sleep(Duration::from_millis(wait)).await;
        }
        if app
            .db
            .audit(&row.actor, &row.action, &row.target, &row.outcome)
            .await
            .is_ok()
        {
            return;
        }
    }
    eprintln!("registry: the trail cannot take a refusal now; it is kept for later");
    app.refusals.requeue(row);
}

/// Requests per client address, before anything else is looked at.
async fn address_layer(State(app): State<App>, req: Request, next: Next) -> Response {
    let Some(addr) = client_address(&req) else {
        return next.run(req).await;
    };
    match app.throttle.address(addr) {
        Ok(()) => next.run(req).await,
        Err(wait) => {
            let mut e = err(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                format!("too many requests from this address; retry after {wait} s"),
            );
            e.retry_after = Some(wait);
            record_refusal(
                &app,
                "anonymous",
                &addr.to_string(),
                "rate-limit",
                req.uri().path(),
                &e,
            )
            .await;
            e.into_response()
        }
    }
}

/// One error shape everywhere: answers axum makes itself (a path it cannot parse, a method
/// a route does not have) become the JSON error body too, and are recorded in the trail.
async fn json_errors(State(app): State<App>, req: Request, next: Next) -> Response {
    let path = req.uri().path().to_string();
    let source = client_address(&req)
        .map(|a| a.to_string())
        .unwrap_or_default();
    let resp = next.run(req).await;
    let status = resp.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return resp;
    }
    let json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if json {
        return resp;
    }
    let (mut parts, body) = resp.into_parts();
    let text = axum::body::to_bytes(body, 4096).await.unwrap_or_default();
    let text = one_line(String::from_utf8_lossy(&text).trim());
    let code = match status.as_u16() {
        404 => "not_found",
        405 => "method_not_allowed",
        408 => "timeout",
        413 => "payload_too_large",
        415 => "unsupported_media_type",
        429 => "rate_limited",
        431 => "headers_too_large",
        s if s >= 500 => "internal",
        _ => "bad_request",
    };
    let message = if text.is_empty() {
        status.canonical_reason().unwrap_or("error").to_string()
    } else {
        text
    };
    let e = err(status, code, message);
    record_refusal(&app, "anonymous", &source, "request", &path, &e).await;
    let fresh = e.into_response();
    let (fresh_parts, body) = fresh.into_parts();
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.insert(
        header::CONTENT_TYPE,
        fresh_parts
            .headers
            .get(header::CONTENT_TYPE)
            .cloned()
            .unwrap_or(HeaderValue::from_static("application/json")),
    );
    Response::from_parts(parts, body)
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
        .route("/v1/ready", get(people::ready))
        .route("/v1/openapi.json", get(openapi))
        .route("/v1/me", get(me))
        .route("/v1/users", get(list_users).post(create_user))
        .route(
            "/v1/users/{name}/token",
            post(people::post_token).delete(people::delete_token),
        )
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
        .layer(axum::middleware::from_fn_with_state(
            app.clone(),
            json_errors,
        ))
        .layer(axum::middleware::from_fn_with_state(
            app.clone(),
            address_layer,
        ))
        .with_state(app)
}
