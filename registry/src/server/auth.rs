//! Who is calling and whether they may: the request head, bodies read under a limit, bearer
//! tokens and signed station requests, and `handle`, which runs every route and records its
//! refusals. Owns authentication; must not know what a route does.

use super::*;

/// Who is calling.
#[derive(Clone)]
pub(super) enum Caller {
    Person(Arc<UserRow>),
    Station(Arc<StationInfo>),
}

impl Caller {
    pub(super) fn label(&self) -> String {
        match self {
            Caller::Person(u) => format!("user:{}", u.name),
            Caller::Station(s) => format!("station:{}", s.name),
        }
    }
    pub(super) fn person(&self) -> &UserRow {
        match self {
            Caller::Person(u) => u,
            Caller::Station(_) => unreachable!("routes for people reject stations first"),
        }
    }
    pub(super) fn station(&self) -> &StationInfo {
        match self {
            Caller::Station(s) => s,
            Caller::Person(_) => unreachable!("station routes reject people first"),
        }
    }
    pub(super) fn role(&self) -> Option<Role> {
        match self {
            Caller::Person(u) => Role::parse(&u.role),
            Caller::Station(_) => None,
        }
    }
}

/// Who may call a route.
#[derive(Clone, Copy)]
pub(super) enum Auth {
    None,
    People(&'static [Role]),
    Station,
}

pub(super) const ANY_PERSON: &[Role] = &[
    Role::Admin,
    Role::Researcher,
    Role::DataOwner,
    Role::Auditor,
];

/// A read request: the parts the signature covers, and the body.
pub(super) struct Req {
    pub(super) method: String,
    pub(super) authority: String,
    pub(super) path: String,
    pub(super) query: String,
    pub(super) headers: HeaderMap,
    pub(super) body: Bytes,
}

impl Req {
    pub(super) fn parse<T: serde::de::DeserializeOwned>(&self) -> Result<T, ApiError> {
        serde_json::from_slice(&self.body).map_err(|e| {
            err(
                StatusCode::BAD_REQUEST,
                "malformed_json",
                format!("request body is not the expected JSON: {e}"),
            )
        })
    }
    pub(super) fn query_param(&self, name: &str) -> Option<String> {
        self.query.split('&').find_map(|kv| {
            let (k, v) = kv.split_once('=')?;
            (k == name).then(|| v.to_string())
        })
    }
}

/// The request's parts; the body is read separately (`read_body`), so people are
/// authenticated before the registry buffers anything they send.
pub(super) fn head(req: Request) -> (Req, Body) {
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
/// while reading). Bodies that may be larger than a JSON request (bundles, results, audit
/// uploads) wait for one of the registry's few large-body slots first, so that what they take
/// in memory is bounded whoever sends them.
pub(super) async fn read_body(
    app: &App,
    r: &mut Req,
    body: Body,
    limit: usize,
) -> Result<(), ApiError> {
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
    let _slot = if limit > app.limits.json_bytes {
        Some(app.large_bodies.acquire().await.map_err(|_| {
            err(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "the registry is shutting down",
            )
        })?)
    } else {
        None
    };
    r.body = axum::body::to_bytes(body, limit)
        .await
        .map_err(|_| too_big())?;
    Ok(())
}

/// Before a station's body is read: the request names a registered station's key, was signed
/// inside the clock window, and is for a station route. The signature itself (which covers
/// the body) is checked after the body is read.
async fn precheck_station(app: &App, r: &Req, auth: Auth) -> Result<(), ApiError> {
    let input = header_str(&r.headers, "signature-input").unwrap_or_default();
    let params = httpsig::parse_input(input)
        .map_err(|e| err(StatusCode::UNAUTHORIZED, "bad_signature", e.to_string()))?;
    if (now_ms() / 1000 - params.created).abs() > httpsig::MAX_SKEW_S {
        return Err(err(
            StatusCode::UNAUTHORIZED,
            "bad_signature",
            format!(
                "the signature was created outside the registry's clock window ({} s)",
                httpsig::MAX_SKEW_S
            ),
        ));
    }
    if app.db.station_by_key(&params.keyid).await?.is_none() {
        return Err(err(
            StatusCode::UNAUTHORIZED,
            "unknown_station",
            "no station is registered with this key",
        ));
    }
    if !matches!(auth, Auth::Station) {
        return Err(forbidden("this route is for people (bearer tokens)"));
    }
    Ok(())
}

pub(super) fn header_str<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

pub(super) fn token_hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

pub(super) async fn authenticate(
    app: &App,
    r: &Req,
    auth: Auth,
) -> Result<Option<Caller>, ApiError> {
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
        if user.revoked_ms.is_some() {
            return Err(unauth("this token was revoked"));
        }
        if user
            .token_expires_ms
            .is_some_and(|t| t <= crate::db::now_ms())
        {
            return Err(unauth("this token expired; ask an admin for a new one"));
        }
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
pub(super) fn one_line(s: &str) -> String {
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
pub(super) async fn handle<F, Fut>(
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
    let started = std::time::Instant::now();
    let path = req.uri().path().to_string();
    let source = client_address(&req)
        .map(|a| a.to_string())
        .unwrap_or_else(|| "local".into());
    let result = async {
        let (mut r, body) = head(req);
        // Nothing a caller sends is read before we know who they are, as far as the headers
        // can tell: people by their token; stations by a registered key and a fresh signature
        // time (the signature covers the body, so it is verified once the body is read);
        // callers with no credentials not at all.
        let caller = if r.headers.contains_key(header::AUTHORIZATION) {
            authenticate(&app, &r, auth).await?
        } else if r.headers.contains_key("signature-input") {
            precheck_station(&app, &r, auth).await?;
            None
        } else if matches!(auth, Auth::None) {
            None
        } else {
            return Err(err(
                StatusCode::UNAUTHORIZED,
                "unauthenticated",
                "no credentials: send `Authorization: Bearer <token>` or a signed station request",
            )
            .into());
        };
        let label = caller.as_ref().map(Caller::label);
        if let Some(who) = &label
            && let Err(wait) = app.throttle.identity(who)
        {
            return Err((rate_limited_error(wait), label));
        }
        read_body(&app, &mut r, body, limit)
            .await
            .map_err(|e| (e, label.clone()))?;
        let caller = match caller {
            Some(c) => Some(c),
            None => authenticate(&app, &r, auth).await?,
        };
        let label = caller.as_ref().map(Caller::label);
        if caller
            .as_ref()
            .is_some_and(|c| matches!(c, Caller::Station(_)))
            && let Some(who) = &label
            && let Err(wait) = app.throttle.identity(who)
        {
            return Err((rate_limited_error(wait), label));
        }
        match (idempotency_key(&r.headers, action), &label) {
            (Some(key), Some(who)) => idempotent(&app, who, &key, action, r, caller, f)
                .await
                .map_err(|e| (e, label)),
            (None, _) => f(app.clone(), r, caller).await.map_err(|e| (e, label)),
            (Some(_), None) => Err((
                bad_request("Idempotency-Key needs an authenticated caller"),
                None,
            )),
        }
    }
    .await;
    let (e, label) = match result {
        Ok(resp) => {
            app.metrics
                .answered(action, resp.status().as_u16(), started.elapsed());
            return resp;
        }
        Err(e) => e,
    };
    app.metrics
        .answered(action, e.status.as_u16(), started.elapsed());
    let actor = label.unwrap_or_else(|| "anonymous".to_string());
    // Answers about the database being out of reach are not written to it (the write would
    // hold the answer for the pool's timeout).
    if e.code != "database_unavailable" && e.code != "not_ready" {
        record_refusal(&app, &actor, &source, action, &path, &e).await;
    } else {
        app.metrics.refused(e.code);
    }
    e.into_response()
}

/// Creating requests a client may retry safely with an `Idempotency-Key` header.
/// Never an action whose answer carries a secret (`user-add`, `token-rotate` answer with a
/// token): answers are stored for a day.
const IDEMPOTENT_ACTIONS: &[&str] = &["station-add", "train-upload", "task-create", "job-create"];

/// How long a first request may take before its key is free again (its request died with a
/// registry replica).
const IDEMPOTENCY_ABANDONED_MS: i64 = 5 * 60 * 1000;

/// The request's `Idempotency-Key` (1 to 128 visible ASCII characters) on a creating route;
/// None elsewhere (the header is ignored on routes that create nothing).
fn idempotency_key(h: &HeaderMap, action: &str) -> Option<Result<String, ()>> {
    if !IDEMPOTENT_ACTIONS.contains(&action) {
        return None;
    }
    let v = h.get("idempotency-key")?;
    Some(match v.to_str() {
        Ok(k) if !k.is_empty() && k.len() <= 128 && k.bytes().all(|b| b.is_ascii_graphic()) => {
            Ok(k.to_string())
        }
        _ => Err(()),
    })
}

/// Handle a creating request once per key: a retry with the same key and body gets the first
/// answer (`Idempotent-Replayed: true`), with another body a 422, while the first is still
/// running a 409.
async fn idempotent<F, Fut>(
    app: &App,
    who: &str,
    key: &Result<String, ()>,
    action: &'static str,
    r: Req,
    caller: Option<Caller>,
    f: F,
) -> Result<Response, ApiError>
where
    F: FnOnce(App, Req, Option<Caller>) -> Fut,
    Fut: Future<Output = Result<Response, ApiError>>,
{
    let Ok(key) = key else {
        return Err(bad_request(
            "Idempotency-Key must be 1 to 128 visible ASCII characters",
        ));
    };
    let sha = hex::encode(Sha256::digest(&r.body));
    match app
        .db
        .idempotency_begin(who, key, action, &sha, IDEMPOTENCY_ABANDONED_MS)
        .await?
    {
        crate::db::Idempotent::Fresh => {}
        crate::db::Idempotent::Replay { status, response } => {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
            let mut resp = (
                status,
                [(header::CONTENT_TYPE, "application/json")],
                response,
            )
                .into_response();
            resp.headers_mut()
                .insert("idempotent-replayed", HeaderValue::from_static("true"));
            return Ok(resp);
        }
        crate::db::Idempotent::InProgress => {
            return Err(conflict(
                "a request with this Idempotency-Key is still being handled; retry later",
            ));
        }
        crate::db::Idempotent::Mismatch => {
            return Err(err(
                StatusCode::UNPROCESSABLE_ENTITY,
                "idempotency_mismatch",
                "this Idempotency-Key was used for a different request",
            ));
        }
    }
    match f(app.clone(), r, caller).await {
        Ok(resp) if resp.status().is_success() => {
            let (parts, body) = resp.into_parts();
            let bytes = axum::body::to_bytes(body, 1 << 20)
                .await
                .unwrap_or_default();
            let text = String::from_utf8_lossy(&bytes).into_owned();
            if let Err(e) = app
                .db
                .idempotency_finish(who, key, parts.status.as_u16(), &text)
                .await
            {
                // The object exists; a retry now waits for the placeholder to be abandoned.
                eprintln!("registry: cannot store an idempotent answer: {e}");
            }
            Ok(Response::from_parts(parts, Body::from(bytes)))
        }
        other => {
            let _ = app.db.idempotency_abort(who, key).await;
            other
        }
    }
}

fn rate_limited_error(wait_s: u64) -> ApiError {
    let mut e = err(
        StatusCode::TOO_MANY_REQUESTS,
        "rate_limited",
        format!("too many requests from this caller; retry after {wait_s} s"),
    );
    e.retry_after = Some(wait_s);
    e
}

// `handle`'s inner error carries the caller label; the first two steps have none.
impl From<ApiError> for (ApiError, Option<String>) {
    fn from(e: ApiError) -> Self {
        (e, None)
    }
}

pub(super) fn valid_name(s: &str) -> bool {
    crate::request::plain_name(s)
}

pub(super) fn valid_digest(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}
