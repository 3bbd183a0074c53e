//! HTTP clients of the registry: `PersonClient` (bearer token) for researchers, data owners,
//! auditors and admins, and `StationClient`, which signs every request with the station's
//! Ed25519 key (see `httpsig`).
//!
//! Owns requests, the transport (TLS with rustls: Mozilla's roots or a pinned CA file; the
//! hospital's proxy) and the mapping of error answers to `ClientError`. Must not decide
//! anything: callers choose what to send and what to do with refusals.

use crate::httpsig;
use crate::wire::*;
use amicus_bundle::SecretKey;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use reqwest::{Method, StatusCode};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the registry at {url}: {reason}")]
    Unreachable { url: String, reason: String },
    #[error("the registry refused ({status} {code}): {message}")]
    Api {
        status: u16,
        code: String,
        message: String,
    },
    #[error("unexpected answer from the registry: {0}")]
    Decode(String),
    #[error("bad registry URL {0:?}: use https://host[:port] (or http:// on a trusted network)")]
    Url(String),
    #[error("TLS set-up: {0}")]
    Tls(String),
    #[error("bad proxy {url:?}: {reason}")]
    Proxy { url: String, reason: String },
}

impl ClientError {
    /// Worth retrying later: the registry was down, overloaded or its database failed.
    pub fn is_transient(&self) -> bool {
        match self {
            ClientError::Unreachable { .. } => true,
            ClientError::Api { status, .. } => *status >= 500 || *status == 429,
            _ => false,
        }
    }

    pub fn code(&self) -> Option<&str> {
        match self {
            ClientError::Api { code, .. } => Some(code),
            _ => None,
        }
    }
}

fn base_url(url: &str) -> Result<reqwest::Url, ClientError> {
    let u =
        reqwest::Url::parse(url.trim_end_matches('/')).map_err(|_| ClientError::Url(url.into()))?;
    if !matches!(u.scheme(), "http" | "https") || u.host_str().is_none() {
        return Err(ClientError::Url(url.into()));
    }
    Ok(u)
}

/// How a client reaches the registry.
#[derive(Debug, Clone, Default)]
pub struct Transport {
    /// PEM file of the CA certificate(s) to trust for `https://` registries *instead of*
    /// Mozilla's roots (a registry behind a hospital's or consortium's own CA; pinning).
    pub ca_file: Option<PathBuf>,
    /// Proxy for every request (`http://proxy:3128`; HTTPS goes through it with CONNECT).
    /// Without it, `HTTPS_PROXY` / `HTTP_PROXY` / `ALL_PROXY` and `NO_PROXY` apply.
    pub proxy: Option<String>,
}

/// The rustls configuration of every client: ring, TLS 1.2 and 1.3, and either the pinned
/// CA file's certificates or Mozilla's roots (compiled in: a station may have no CA store).
pub fn tls_config(ca_file: Option<&std::path::Path>) -> Result<rustls::ClientConfig, ClientError> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let tls = |e: String| ClientError::Tls(e);
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(path) => {
            let certs = CertificateDer::pem_file_iter(path)
                .map_err(|e| tls(format!("{}: {e}", path.display())))?;
            for cert in certs {
                let cert = cert.map_err(|e| tls(format!("{}: {e}", path.display())))?;
                roots
                    .add(cert)
                    .map_err(|e| tls(format!("{}: {e}", path.display())))?;
            }
            if roots.is_empty() {
                return Err(tls(format!(
                    "{}: no CA certificate (expected PEM `BEGIN CERTIFICATE` blocks)",
                    path.display()
                )));
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    // ring, not aws-lc-rs: minutes less to build on a station's hardware, no C toolchain
    // beyond cc. ring has no post-quantum key exchange (rustls marks that deprecated); the
    // results are sealed with X25519 HPKE anyway (ARCHITECTURE.md, "Transport").
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// The HTTP client the registry's clients use: rustls, the transport's proxy (or the
/// environment's), bounded connect and total time, no redirects (a request is signed for one
/// URL).
pub fn http_with(timeout: Duration, t: &Transport) -> Result<reqwest::Client, ClientError> {
    builder(timeout, t)?
        .build()
        .map_err(|e| ClientError::Tls(e.to_string()))
}

/// [`http`] with connections from `local` (benches and tests on loopback: each address is a
/// client of its own to the registry's per-address limits).
pub fn http_from(
    timeout: Duration,
    local: std::net::IpAddr,
) -> Result<reqwest::Client, ClientError> {
    builder(timeout, &Transport::default())?
        .local_address(local)
        .build()
        .map_err(|e| ClientError::Tls(e.to_string()))
}

fn builder(timeout: Duration, t: &Transport) -> Result<reqwest::ClientBuilder, ClientError> {
    let mut b = reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(Duration::from_secs(10))
        .redirect(reqwest::redirect::Policy::none())
        .tls_backend_preconfigured(tls_config(t.ca_file.as_deref())?);
    if let Some(url) = &t.proxy {
        let bad = |reason: String| ClientError::Proxy {
            url: url.clone(),
            reason,
        };
        let proxy = reqwest::Proxy::all(url.as_str())
            .map_err(|e| bad(e.to_string()))?
            .no_proxy(reqwest::NoProxy::from_env());
        b = b.proxy(proxy);
    }
    Ok(b)
}

/// [`http_with`] with the default transport (Mozilla's roots, the environment's proxy).
pub fn http(timeout: Duration) -> reqwest::Client {
    http_with(timeout, &Transport::default()).expect("the default HTTP client builds")
}

/// Largest answer a station takes (a bundle is at most 256 MiB by the registry's default
/// limits; everything else is far smaller): a hostile registry or proxy cannot make a station
/// hold more than this in memory.
pub const STATION_MAX_ANSWER: usize = 320 << 20;
/// Largest answer a person's client takes (a task's sealed results come in one answer).
pub const PERSON_MAX_ANSWER: usize = 1 << 30;
/// Largest error answer read.
const MAX_ERROR_ANSWER: usize = 64 << 10;

/// The body of a response of at most `cap` bytes (checked against `Content-Length` first, then
/// while streaming), or the registry's error.
async fn answer(
    url: &str,
    r: Result<reqwest::Response, reqwest::Error>,
    cap: usize,
) -> Result<Vec<u8>, ClientError> {
    let unreachable = |e: reqwest::Error| ClientError::Unreachable {
        url: url.to_string(),
        reason: e.to_string(),
    };
    let mut resp = r.map_err(unreachable)?;
    let status = resp.status();
    let cap = if status.is_success() {
        cap
    } else {
        MAX_ERROR_ANSWER
    };
    let too_large = || {
        ClientError::Decode(format!(
            "the answer from {url} is larger than {} MiB: refused",
            cap >> 20
        ))
    };
    if resp
        .content_length()
        .is_some_and(|n| n > cap as u64 && status.is_success())
    {
        return Err(too_large());
    }
    let mut body: Vec<u8> = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(unreachable)? {
        if body.len().saturating_add(chunk.len()) > cap {
            if status.is_success() {
                return Err(too_large());
            }
            break;
        }
        body.extend_from_slice(&chunk);
    }
    if status.is_success() {
        return Ok(body);
    }
    match serde_json::from_slice::<ErrorBody>(&body) {
        Ok(e) => Err(ClientError::Api {
            status: status.as_u16(),
            code: e.error.code,
            message: e.error.message,
        }),
        Err(_) => Err(ClientError::Api {
            status: status.as_u16(),
            code: "http".into(),
            message: status.canonical_reason().unwrap_or("error").to_string(),
        }),
    }
}

fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, ClientError> {
    serde_json::from_slice(bytes).map_err(|e| ClientError::Decode(e.to_string()))
}

/// A person's client.
pub struct PersonClient {
    base: reqwest::Url,
    token: String,
    http: reqwest::Client,
}

impl PersonClient {
    pub fn new(url: &str, token: &str) -> Result<PersonClient, ClientError> {
        Self::with_transport(url, token, &Transport::default())
    }

    pub fn with_transport(
        url: &str,
        token: &str,
        t: &Transport,
    ) -> Result<PersonClient, ClientError> {
        Ok(PersonClient {
            base: base_url(url)?,
            token: token.trim().to_string(),
            http: http_with(Duration::from_secs(120), t)?,
        })
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<(Vec<u8>, &str)>,
    ) -> Result<Vec<u8>, ClientError> {
        self.send_keyed(method, path, body, None).await
    }

    async fn send_keyed(
        &self,
        method: Method,
        path: &str,
        body: Option<(Vec<u8>, &str)>,
        idempotency_key: Option<&str>,
    ) -> Result<Vec<u8>, ClientError> {
        let url = self
            .base
            .join(path)
            .map_err(|_| ClientError::Url(path.into()))?;
        let mut req = self
            .http
            .request(method, url.clone())
            .bearer_auth(&self.token);
        if let Some(k) = idempotency_key {
            req = req.header("idempotency-key", k);
        }
        if let Some((bytes, ctype)) = body {
            req = req.header("content-type", ctype).body(bytes);
        }
        answer(url.as_str(), req.send().await, PERSON_MAX_ANSWER).await
    }

    /// A creating request, sent with an Idempotency-Key and retried (same key) while the
    /// registry is unreachable or overloaded: it creates one object however often it is sent.
    async fn create(
        &self,
        method: Method,
        path: &str,
        bytes: Vec<u8>,
        ctype: &str,
    ) -> Result<Vec<u8>, ClientError> {
        let mut raw = [0u8; 16];
        getrandom::fill(&mut raw).map_err(|e| ClientError::Tls(e.to_string()))?;
        let key = hex::encode(raw);
        let mut attempt = 0u32;
        loop {
            let r = self
                .send_keyed(
                    method.clone(),
                    path,
                    Some((bytes.clone(), ctype)),
                    Some(&key),
                )
                .await;
            match r {
                Err(e) if e.is_transient() && attempt < 3 => {
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(500u64 << attempt)).await;
                }
                other => return other,
            }
        }
    }

    async fn get<T: serde::de::DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        decode(&self.send(Method::GET, path, None).await?)
    }

    async fn post_create<B: serde::Serialize, T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        let bytes = serde_json::to_vec(body).expect("request bodies serialise");
        decode(
            &self
                .create(Method::POST, path, bytes, "application/json")
                .await?,
        )
    }

    pub async fn me(&self) -> Result<UserInfo, ClientError> {
        self.get("/v1/me").await
    }

    /// A new token for `name` (yourself, or anyone for an admin); the old one stops working.
    /// Sent once, never retried: a lost answer means asking again.
    pub async fn rotate_token(
        &self,
        name: &str,
        req: &TokenRequest,
    ) -> Result<TokenResponse, ClientError> {
        let path = format!("/v1/users/{}/token", path_segment(name)?);
        let body = serde_json::to_vec(req).expect("request bodies serialise");
        decode(
            &self
                .send(Method::POST, &path, Some((body, "application/json")))
                .await?,
        )
    }

    /// Stop `name`'s token working.
    pub async fn revoke_token(&self, name: &str) -> Result<(), ClientError> {
        let path = format!("/v1/users/{}/token", path_segment(name)?);
        self.send(Method::DELETE, &path, None).await.map(|_| ())
    }
    pub async fn add_user(&self, new: &NewUser) -> Result<NewUserResponse, ClientError> {
        self.post_create("/v1/users", new).await
    }
    pub async fn add_station(&self, new: &NewStation) -> Result<StationInfo, ClientError> {
        self.post_create("/v1/stations", new).await
    }
    pub async fn stations(&self) -> Result<Vec<StationInfo>, ClientError> {
        self.get_all("/v1/stations").await
    }
    pub async fn push_train(&self, bundle: Vec<u8>) -> Result<TrainInfo, ClientError> {
        decode(
            &self
                .create(
                    Method::PUT,
                    "/v1/trains",
                    bundle,
                    "application/octet-stream",
                )
                .await?,
        )
    }
    pub async fn trains(&self) -> Result<Vec<TrainInfo>, ClientError> {
        self.get_all("/v1/trains").await
    }
    pub async fn train_bundle(&self, digest: &str) -> Result<Vec<u8>, ClientError> {
        self.send(
            Method::GET,
            &format!("/v1/trains/{}", path_segment(digest)?),
            None,
        )
        .await
    }
    pub async fn create_task(&self, new: &NewTask) -> Result<TaskInfo, ClientError> {
        self.post_create("/v1/tasks", new).await
    }
    pub async fn tasks(&self) -> Result<Vec<TaskInfo>, ClientError> {
        self.get_all("/v1/tasks").await
    }
    pub async fn task(&self, id: &str) -> Result<TaskInfo, ClientError> {
        self.get(&format!("/v1/tasks/{}", path_segment(id)?)).await
    }
    pub async fn results(&self, id: &str) -> Result<TaskResults, ClientError> {
        self.get(&format!("/v1/tasks/{}/results", path_segment(id)?))
            .await
    }
    pub async fn create_job(&self, new: &NewJob) -> Result<JobInfo, ClientError> {
        self.post_create("/v1/jobs", new).await
    }
    pub async fn jobs(&self) -> Result<Vec<JobInfo>, ClientError> {
        self.get_all("/v1/jobs").await
    }
    pub async fn job(&self, id: &str) -> Result<JobInfo, ClientError> {
        self.get(&format!("/v1/jobs/{}", path_segment(id)?)).await
    }
    /// A checkpoint's weights (`round` None: the newest).
    pub async fn job_weights(&self, id: &str, round: Option<u32>) -> Result<Vec<u8>, ClientError> {
        let id = path_segment(id)?;
        let path = match round {
            Some(r) => format!("/v1/jobs/{id}/weights?round={r}"),
            None => format!("/v1/jobs/{id}/weights"),
        };
        self.send(Method::GET, &path, None).await
    }
    pub async fn station_runs(&self, station: &str) -> Result<Vec<RunInfo>, ClientError> {
        self.get_all(&format!("/v1/stations/{}/runs", path_segment(station)?))
            .await
    }
    /// A station's audit copy, every page of its lines (the head as the first page had it:
    /// lines that arrived while paging only make the head lag, never look truncated).
    pub async fn station_audit(&self, station: &str) -> Result<StationAudit, ClientError> {
        let mut first: Option<StationAudit> = None;
        let path = format!("/v1/stations/{}/audit", path_segment(station)?);
        self.pages(&path, |body: StationAudit| {
            match first.as_mut() {
                None => first = Some(body),
                Some(f) => f.lines.extend(body.lines),
            }
            Ok(())
        })
        .await?;
        first.ok_or_else(|| ClientError::Decode("no audit copy".into()))
    }
    pub async fn registry_audit(&self) -> Result<Vec<RegistryAuditEntry>, ClientError> {
        self.get_all("/v1/audit").await
    }

    /// Every page of a list: follows the `Link: <…>; rel="next"` headers (at most
    /// `MAX_PAGES`, and only to paths on this registry).
    async fn get_all<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
    ) -> Result<Vec<T>, ClientError> {
        let mut out = Vec::new();
        self.pages(path, |mut items: Vec<T>| {
            out.append(&mut items);
            Ok(())
        })
        .await?;
        Ok(out)
    }

    /// Fetch `path` and every page its `Link` headers lead to, handing each decoded body to
    /// `each`.
    async fn pages<B: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        mut each: impl FnMut(B) -> Result<(), ClientError>,
    ) -> Result<(), ClientError> {
        const MAX_PAGES: usize = 100_000;
        let mut next = Some(path.to_string());
        let mut pages = 0;
        while let Some(p) = next.take() {
            pages += 1;
            if pages > MAX_PAGES {
                return Err(ClientError::Decode("too many pages".into()));
            }
            let url = self
                .base
                .join(&p)
                .map_err(|_| ClientError::Url(p.clone()))?;
            let resp = self
                .http
                .get(url.clone())
                .bearer_auth(&self.token)
                .send()
                .await;
            let link = resp
                .as_ref()
                .ok()
                .and_then(|r| r.headers().get("link"))
                .and_then(|v| v.to_str().ok())
                .and_then(crate::server::page::next_link)
                .map(str::to_string);
            let body = answer(url.as_str(), resp, PERSON_MAX_ANSWER).await?;
            each(decode(&body)?)?;
            // A relative path on this registry only: never another host.
            next = link.filter(|l| l.starts_with("/v1/") && !l.contains("//"));
        }
        Ok(())
    }
}

/// A station's client: every request signed with the station key.
#[derive(Clone)]
pub struct StationClient {
    base: reqwest::Url,
    authority: String,
    key: SecretKey,
    http: reqwest::Client,
}

impl StationClient {
    pub fn new(url: &str, key: SecretKey) -> Result<StationClient, ClientError> {
        Self::with_transport(url, key, &Transport::default())
    }

    pub fn with_transport(
        url: &str,
        key: SecretKey,
        t: &Transport,
    ) -> Result<StationClient, ClientError> {
        Self::with_http(url, key, http_with(Duration::from_secs(90), t)?)
    }

    /// The same registry and connection pool, signing with `key` (a rotated station key).
    pub fn with_key(&self, key: SecretKey) -> StationClient {
        StationClient {
            key,
            ..self.clone()
        }
    }

    /// A station client on a shared HTTP connection pool (many simulated stations in one
    /// process, as the registry benchmark runs them).
    pub fn with_http(
        url: &str,
        key: SecretKey,
        http: reqwest::Client,
    ) -> Result<StationClient, ClientError> {
        let base = base_url(url)?;
        let host = base.host_str().unwrap_or_default().to_string();
        let authority = match base.port() {
            Some(p) => format!("{host}:{p}"),
            None => host,
        };
        Ok(StationClient {
            base,
            authority,
            key,
            http,
        })
    }

    /// Send a signed request. `path_and_query` is e.g. `/v1/station/work?wait=20`.
    pub async fn send(
        &self,
        method: Method,
        path_and_query: &str,
        body: Vec<u8>,
    ) -> Result<Vec<u8>, ClientError> {
        let url = self
            .base
            .join(path_and_query)
            .map_err(|_| ClientError::Url(path_and_query.into()))?;
        let mut nonce = [0u8; 16];
        getrandom::fill(&mut nonce).expect("operating-system randomness");
        let nonce = hex::encode(nonce);
        let created = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        let parts = httpsig::RequestParts {
            method: method.as_str(),
            authority: &self.authority,
            path: url.path(),
            query: url.query().unwrap_or(""),
            body: &body,
        };
        let headers = httpsig::sign(&parts, &self.key, created, &nonce);
        let mut req = self.http.request(method, url.clone());
        for (name, value) in headers {
            req = req.header(name, value);
        }
        if !body.is_empty() {
            req = req.header("content-type", "application/json");
        }
        answer(
            url.as_str(),
            req.body(body).send().await,
            STATION_MAX_ANSWER,
        )
        .await
    }

    async fn post<B: serde::Serialize>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<Vec<u8>, ClientError> {
        self.send(
            Method::POST,
            path,
            serde_json::to_vec(body).expect("request bodies serialise"),
        )
        .await
    }

    /// Wait up to `wait_s` seconds for new runs.
    pub async fn work(&self, wait_s: u64) -> Result<Vec<WorkItem>, ClientError> {
        Ok(self
            .work_items(wait_s)
            .await?
            .into_iter()
            .filter_map(Result::ok)
            .collect())
    }

    /// New work, each item decoded on its own: one the station cannot read (a state it does
    /// not know, a field of the wrong type) is an `Err` with the reason, not the whole answer.
    pub async fn work_items(
        &self,
        wait_s: u64,
    ) -> Result<Vec<Result<WorkItem, String>>, ClientError> {
        let body = self
            .send(
                Method::GET,
                &format!("/v1/station/work?wait={wait_s}"),
                Vec::new(),
            )
            .await?;
        items_of(&body)
    }

    /// Runs delivered to or running at this station, as the registry sees them (each decoded on
    /// its own, as for [`StationClient::work_items`]).
    pub async fn open_runs(&self) -> Result<Vec<Result<WorkItem, String>>, ClientError> {
        let body = self
            .send(Method::GET, "/v1/station/open", Vec::new())
            .await?;
        items_of(&body)
    }
    pub async fn train(&self, digest: &str) -> Result<Vec<u8>, ClientError> {
        self.send(
            Method::GET,
            &format!("/v1/station/trains/{digest}"),
            Vec::new(),
        )
        .await
    }
    pub async fn report(
        &self,
        run: &str,
        state: RunState,
        reason: Option<String>,
    ) -> Result<(), ClientError> {
        self.post(
            &format!("/v1/station/runs/{run}/state"),
            &RunUpdate { state, reason },
        )
        .await
        .map(drop)
    }
    pub async fn result(&self, run: &str, outputs: Vec<SealedOutput>) -> Result<(), ClientError> {
        self.result_with_update(run, outputs, None).await
    }
    /// A run's sealed outputs and, for a round of a federated job, its update (plain: the
    /// registry aggregates it).
    pub async fn result_with_update(
        &self,
        run: &str,
        outputs: Vec<SealedOutput>,
        update: Option<&[u8]>,
    ) -> Result<(), ClientError> {
        self.post(
            &format!("/v1/station/runs/{run}/result"),
            &ResultUpload {
                outputs,
                update: update.map(|u| B64.encode(u)),
            },
        )
        .await
        .map(drop)
    }
    /// The global weights round `round` of `job` starts from.
    pub async fn round_weights(&self, job: &str, round: u32) -> Result<Vec<u8>, ClientError> {
        self.send(
            Method::GET,
            &format!("/v1/station/jobs/{job}/rounds/{round}/weights"),
            Vec::new(),
        )
        .await
    }
    /// Where a securely aggregated round of `job` stands, as this station sees it.
    pub async fn secagg_view(&self, job: &str, round: u32) -> Result<SecAggView, ClientError> {
        decode(
            &self
                .send(
                    Method::GET,
                    &format!("/v1/station/jobs/{job}/rounds/{round}/secagg"),
                    Vec::new(),
                )
                .await?,
        )
    }
    /// Send keys, sealed shares or unmasking shares in a securely aggregated round.
    pub async fn secagg_send(
        &self,
        job: &str,
        round: u32,
        message: &SecAggMessage,
    ) -> Result<(), ClientError> {
        self.post(
            &format!("/v1/station/jobs/{job}/rounds/{round}/secagg"),
            message,
        )
        .await
        .map(drop)
    }
    pub async fn audit_next(&self) -> Result<i64, ClientError> {
        let a: AuditAck = decode(
            &self
                .send(Method::GET, "/v1/station/audit/next", Vec::new())
                .await?,
        )?;
        Ok(a.next_seq)
    }
    pub async fn upload_audit(
        &self,
        lines: Vec<String>,
        head: Option<String>,
    ) -> Result<i64, ClientError> {
        let a: AuditAck = decode(
            &self
                .post("/v1/station/audit", &AuditUpload { lines, head })
                .await?,
        )?;
        Ok(a.next_seq)
    }
}

/// `true` for a status the caller should treat as "not there".
pub fn is_not_found(e: &ClientError) -> bool {
    matches!(e, ClientError::Api { status, .. } if *status == StatusCode::NOT_FOUND.as_u16())
}

fn items_of(body: &[u8]) -> Result<Vec<Result<WorkItem, String>>, ClientError> {
    #[derive(serde::Deserialize)]
    struct Items {
        items: Vec<serde_json::Value>,
    }
    let r: Items = decode(body)?;
    Ok(r.items
        .into_iter()
        .map(|v| serde_json::from_value(v).map_err(|e| e.to_string()))
        .collect())
}

/// A name that goes into a request path: a plain name or nothing (no `/`, `?`, `..`).
fn path_segment(name: &str) -> Result<&str, ClientError> {
    if crate::request::plain_name(name) {
        Ok(name)
    } else {
        Err(ClientError::Url(format!("{name:?} is not a plain name")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A one-shot HTTP server on loopback that answers `raw` to the first request.
    async fn serve_once(raw: Vec<u8>) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/", listener.local_addr().unwrap());
        tokio::spawn(async move {
            let (mut tcp, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 4096];
            let _ = tcp.read(&mut buf).await;
            let _ = tcp.write_all(&raw).await;
            let _ = tcp.shutdown().await;
        });
        url
    }

    async fn fetch(raw: &[u8], cap: usize) -> Result<Vec<u8>, ClientError> {
        let url = serve_once(raw.to_vec()).await;
        let r = http(Duration::from_secs(10)).get(&url).send().await;
        answer(&url, r, cap).await
    }

    #[tokio::test]
    async fn answers_over_the_cap_are_refused_declared_or_streamed() {
        // Declared too large: refused before any of the body is read.
        let declared = b"HTTP/1.1 200 OK\r\nContent-Length: 1000000000000\r\n\r\n";
        let e = fetch(declared, 2048).await.unwrap_err();
        assert!(e.to_string().contains("larger than"), "{e}");
        // Chunked, no length: refused once it passes the cap.
        let mut chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        for _ in 0..3 {
            chunked.extend_from_slice(b"400\r\n");
            chunked.extend_from_slice(&[b'x'; 1024]);
            chunked.extend_from_slice(b"\r\n");
        }
        chunked.extend_from_slice(b"0\r\n\r\n");
        let e = fetch(&chunked, 2048).await.unwrap_err();
        assert!(e.to_string().contains("larger than"), "{e}");
        // Within the cap: the body.
        assert_eq!(fetch(&chunked, 4096).await.unwrap().len(), 3072);
        // An error page of any size: cut, and still the status.
        let mut error =
            b"HTTP/1.1 503 Service Unavailable\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        for _ in 0..100 {
            error.extend_from_slice(b"400\r\n");
            error.extend_from_slice(&[b'y'; 1024]);
            error.extend_from_slice(b"\r\n");
        }
        error.extend_from_slice(b"0\r\n\r\n");
        match fetch(&error, 2048).await {
            Err(ClientError::Api { status: 503, .. }) => {}
            other => panic!("{other:?}"),
        }
    }
}
