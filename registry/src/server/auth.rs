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
/// while reading).
pub(super) async fn read_body(r: &mut Req, body: Body, limit: usize) -> Result<(), ApiError> {
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

pub(super) fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

pub(super) fn valid_digest(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}
