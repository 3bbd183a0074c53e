//! The registry's API suite, against a real server on loopback over a real database: SQLite
//! always, PostgreSQL when `AMICUS_TEST_POSTGRES` names a server (the test command starts one
//! and sets `AMICUS_REQUIRE_POSTGRES=1`, which turns a missing server into a failure).
//!
//! Every refusal is checked for its status, its stable code and its entry in the registry's
//! own audit trail.

use amicus_bundle::{Bundle, SecretKey, manifest::Manifest};
use amicus_registry::client::{ClientError, PersonClient, StationClient};
use amicus_registry::db::{Db, verify_registry_trail};
use amicus_registry::httpsig;
use amicus_registry::sealed::{RecipientKey, SealContext, seal};
use amicus_registry::server::{self, App, Limits};
use amicus_registry::wire::*;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use std::time::{Duration, Instant};

struct Harness {
    url: String,
    db: Db,
    admin: PersonClient,
    admin_token: String,
    /// Researcher alice, with her decryption key.
    alice: PersonClient,
    alice_token: String,
    alice_key: RecipientKey,
    bob: PersonClient,
    owner1: PersonClient,
    auditor: PersonClient,
    st1: StationClient,
    st1_key: SecretKey,
    st2: StationClient,
    st2_key: SecretKey,
    train: String,
    _shutdown: tokio::sync::oneshot::Sender<()>,
}

fn sample_bundle(name: &str, signer: &SecretKey) -> Bundle {
    let m = Manifest::parse_source(&format!(
        r#"
capabilities = ["cohort"]
[train]
name = "{name}"
version = "1.0.0"
[limits]
fuel = 1000
memory_mib = 1
wall_seconds = 1
[[outputs]]
name = "summary.json"
kind = "statistics"
max_bytes = 1024
"#
    ))
    .unwrap();
    let mut b = Bundle::create(
        m,
        vec![(
            "train.wasm".into(),
            b"\0asm not run by the registry".to_vec(),
        )],
    )
    .unwrap();
    b.sign(signer, "author");
    b
}

async fn start(db_url: &str, limits: Limits) -> Harness {
    let db = Db::connect(db_url).await.expect("database");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let app = App::new(db.clone(), limits);
    tokio::spawn(async move {
        server::serve(listener, app, async {
            let _ = rx.await;
        })
        .await
        .unwrap();
    });
    let admin_token = server::add_user(
        &db,
        &NewUser {
            token_expires_in_s: None,
            name: "root".into(),
            role: Role::Admin,
            station: None,
            enc_public_key: None,
        },
    )
    .await
    .unwrap()
    .token;
    let admin = PersonClient::new(&url, &admin_token).unwrap();
    let admin_token = admin_token.to_string();
    let st1_key = SecretKey::generate().unwrap();
    let st2_key = SecretKey::generate().unwrap();
    for (name, k) in [("st1", &st1_key), ("st2", &st2_key)] {
        admin
            .add_station(&NewStation {
                name: name.into(),
                public_key: k.public().to_pem(),
            })
            .await
            .unwrap();
    }
    let alice_key = RecipientKey::generate();
    let mk = |name: &str, role: Role, station: Option<&str>, enc: Option<String>| NewUser {
        token_expires_in_s: None,
        name: name.into(),
        role,
        station: station.map(str::to_string),
        enc_public_key: enc,
    };
    let alice = admin
        .add_user(&mk(
            "alice",
            Role::Researcher,
            None,
            Some(alice_key.public().to_pem()),
        ))
        .await
        .unwrap();
    let bob = admin
        .add_user(&mk(
            "bob",
            Role::Researcher,
            None,
            Some(RecipientKey::generate().public().to_pem()),
        ))
        .await
        .unwrap();
    let owner1 = admin
        .add_user(&mk("olga", Role::DataOwner, Some("st1"), None))
        .await
        .unwrap();
    let auditor = admin
        .add_user(&mk("audrey", Role::Auditor, None, None))
        .await
        .unwrap();
    let alice_token = alice.token.clone();
    let alice = PersonClient::new(&url, &alice.token).unwrap();
    let signer = SecretKey::generate().unwrap();
    let train = alice
        .push_train(sample_bundle("cohort-stats", &signer).to_bytes())
        .await
        .unwrap()
        .digest;
    Harness {
        st1: StationClient::new(&url, st1_key.clone()).unwrap(),
        st2: StationClient::new(&url, st2_key.clone()).unwrap(),
        bob: PersonClient::new(&url, &bob.token).unwrap(),
        owner1: PersonClient::new(&url, &owner1.token).unwrap(),
        auditor: PersonClient::new(&url, &auditor.token).unwrap(),
        url,
        db,
        admin,
        admin_token,
        alice,
        alice_token,
        alice_key,
        st1_key,
        st2_key,
        train,
        _shutdown: tx,
    }
}

/// The refusal's status and code, and its entry in the registry's trail.
async fn refused<T: std::fmt::Debug>(
    h: &Harness,
    r: Result<T, ClientError>,
    status: u16,
    code: &str,
) {
    match r {
        Err(ClientError::Api {
            status: s,
            code: c,
            message,
        }) => {
            assert_eq!((s, c.as_str()), (status, code), "{message}");
            let trail = h.db.audit_entries().await.unwrap();
            let needle = format!("refused {status} {code}");
            assert!(
                trail
                    .iter()
                    .rev()
                    .take(5)
                    .any(|e| e.outcome.starts_with(&needle)),
                "no audit entry for {needle}: {:?}",
                trail.iter().rev().take(3).collect::<Vec<_>>()
            );
        }
        other => panic!("expected {status} {code}, got {other:?}"),
    }
}

async fn new_task(h: &Harness, stations: &[&str]) -> TaskInfo {
    h.alice
        .create_task(&NewTask {
            statement: None,
            train: h.train.clone(),
            stations: stations.iter().map(|s| s.to_string()).collect(),
            params: Some(serde_json::json!({"tables": ["modality"]})),
            expires_in_s: None,
        })
        .await
        .unwrap()
}

async fn lifecycle_and_sealed_results(h: &Harness) {
    let task = new_task(h, &["st1", "st2"]).await;
    assert!(task.runs.iter().all(|r| r.state == RunState::Pending));
    let work = h.st1.work(0).await.unwrap();
    assert_eq!(work.len(), 1);
    let item = &work[0];
    assert_eq!(
        (item.task.as_str(), item.train.as_str()),
        (task.id.as_str(), h.train.as_str())
    );
    assert_eq!(item.params, r#"{"tables":["modality"]}"#);
    // Delivered exactly once.
    assert!(h.st1.work(0).await.unwrap().is_empty());
    // The station fetches the bundle of its run, byte-identical to what was pushed.
    let bytes = h.st1.train(&h.train).await.unwrap();
    assert_eq!(
        Bundle::from_reader(&bytes[..]).unwrap().digest().to_hex(),
        h.train
    );
    // Done before running is a conflict.
    refused(h, h.st1.result(&item.run, vec![]).await, 409, "conflict").await;
    h.st1
        .report(&item.run, RunState::Running, None)
        .await
        .unwrap();
    // A retried report is accepted.
    h.st1
        .report(&item.run, RunState::Running, None)
        .await
        .unwrap();
    // Another station cannot touch st1's run.
    refused(
        h,
        h.st2
            .report(&item.run, RunState::Failed, Some("x".into()))
            .await,
        404,
        "not_found",
    )
    .await;
    let plaintext = b"{\"secret-marker-7f3a\": 42}";
    let recipient =
        amicus_registry::sealed::RecipientPublicKey::from_pem(&item.recipient_key, "t").unwrap();
    let ctx = SealContext {
        task: &item.task,
        run: &item.run,
        station: "st1",
        output: "summary.json",
    };
    let sealed = seal(&recipient, &ctx, plaintext).unwrap();
    h.st1
        .result(
            &item.run,
            vec![SealedOutput {
                signature: None,
                name: "summary.json".into(),
                sealed: B64.encode(&sealed),
            }],
        )
        .await
        .unwrap();
    // st2 refuses.
    let w2 = h.st2.work(0).await.unwrap();
    h.st2
        .report(
            &w2[0].run,
            RunState::Refused,
            Some("approval: not approved".into()),
        )
        .await
        .unwrap();
    let t = h.alice.task(&task.id).await.unwrap();
    let states: Vec<_> = t
        .runs
        .iter()
        .map(|r| (r.station.as_str(), r.state))
        .collect();
    assert_eq!(
        states,
        [("st1", RunState::Done), ("st2", RunState::Refused)]
    );
    assert_eq!(t.runs[1].reason.as_deref(), Some("approval: not approved"));
    // Alice opens her result.
    let res = h.alice.results(&task.id).await.unwrap();
    let out = &res.runs[0].outputs[0];
    let opened = h
        .alice_key
        .open(&ctx, &B64.decode(&out.sealed).unwrap())
        .unwrap();
    assert_eq!(opened, plaintext);
    // Nobody else may fetch it: not another researcher, not the admin, not the auditor.
    refused(h, h.bob.results(&task.id).await, 403, "forbidden").await;
    refused(h, h.bob.task(&task.id).await, 403, "forbidden").await;
    refused(h, h.admin.results(&task.id).await, 403, "forbidden").await;
    refused(h, h.auditor.results(&task.id).await, 403, "forbidden").await;
    // Bob sees only his own tasks; the auditor sees every task's metadata.
    assert!(h.bob.tasks().await.unwrap().is_empty());
    assert!(
        h.auditor
            .tasks()
            .await
            .unwrap()
            .iter()
            .any(|t| t.id == task.id)
    );
    // The registry's storage holds ciphertext only.
    let stored = h.db.results_of_run(&item.run).await.unwrap();
    assert!(!stored[0].1.windows(plaintext.len()).any(|w| w == plaintext));
}

async fn people_and_scopes(h: &Harness) {
    assert_eq!(h.owner1.me().await.unwrap().station.as_deref(), Some("st1"));
    h.owner1.station_runs("st1").await.unwrap();
    refused(h, h.owner1.station_runs("st2").await, 403, "forbidden").await;
    refused(h, h.owner1.station_audit("st2").await, 403, "forbidden").await;
    refused(h, h.alice.registry_audit().await, 403, "forbidden").await;
    refused(h, h.alice.station_runs("st1").await, 403, "forbidden").await;
    // Only admins add people and stations; only researchers create tasks.
    let nu = NewUser {
        token_expires_in_s: None,
        name: "eve".into(),
        role: Role::Admin,
        station: None,
        enc_public_key: None,
    };
    refused(h, h.alice.add_user(&nu).await, 403, "forbidden").await;
    let ns = NewStation {
        name: "st9".into(),
        public_key: SecretKey::generate().unwrap().public().to_pem(),
    };
    refused(h, h.owner1.add_station(&ns).await, 403, "forbidden").await;
    let nt = NewTask {
        statement: None,
        train: h.train.clone(),
        stations: vec!["st1".into()],
        params: None,
        expires_in_s: None,
    };
    refused(h, h.auditor.create_task(&nt).await, 403, "forbidden").await;
    refused(
        h,
        h.owner1.push_train(vec![1, 2, 3]).await,
        403,
        "forbidden",
    )
    .await;
    // Unknown token; no credentials at all.
    let stranger = PersonClient::new(&h.url, "amicus_0000").unwrap();
    refused(h, stranger.me().await, 401, "unauthenticated").await;
    let r = amicus_registry::client::http(std::time::Duration::from_secs(60))
        .get(format!("{}/v1/tasks", h.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    // Bad input.
    refused(
        h,
        h.admin
            .add_station(&NewStation {
                name: "st1".into(),
                public_key: ns.public_key.clone(),
            })
            .await,
        409,
        "conflict",
    )
    .await;
    refused(
        h,
        h.admin
            .add_station(&NewStation {
                name: "x".into(),
                public_key: "not a key".into(),
            })
            .await,
        400,
        "bad_request",
    )
    .await;
    refused(
        h,
        h.alice.push_train(b"not a tar".to_vec()).await,
        400,
        "invalid_bundle",
    )
    .await;
    let unknown = NewTask {
        statement: None,
        train: "0".repeat(64),
        ..nt.clone()
    };
    refused(h, h.alice.create_task(&unknown).await, 404, "not_found").await;
    let nowhere = NewTask {
        statement: None,
        stations: vec!["st404".into()],
        ..nt.clone()
    };
    refused(h, h.alice.create_task(&nowhere).await, 404, "not_found").await;
    let twice = NewTask {
        statement: None,
        stations: vec!["st1".into(), "st1".into()],
        ..nt.clone()
    };
    refused(h, h.alice.create_task(&twice).await, 400, "bad_request").await;
    // Malformed JSON, raw.
    let client = amicus_registry::client::http(std::time::Duration::from_secs(60));
    let r = client
        .post(format!("{}/v1/tasks", h.url))
        .bearer_auth(alice_token(h).await)
        .body("{\"train\": ")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let body: ErrorBody = r.json().await.unwrap();
    assert_eq!(body.error.code, "malformed_json");
    // Unknown routes answer JSON too.
    let r = client
        .get(format!("{}/v1/nothing", h.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(r.json::<ErrorBody>().await.unwrap().error.code, "not_found");
}

/// A fresh researcher token for raw requests (tokens are shown once, so make a new user).
/// A new person `name` with `role` (no station, no key), added by the admin; their token.
async fn person_token(h: &Harness, name: &str, role: Role) -> String {
    h.admin
        .add_user(&NewUser {
            name: name.into(),
            role,
            station: None,
            enc_public_key: None,
            token_expires_in_s: None,
        })
        .await
        .unwrap()
        .token
}

async fn alice_token(h: &Harness) -> String {
    let name = format!("r{}", amicus_registry::db::random_id());
    let u = NewUser {
        token_expires_in_s: None,
        name: name[..20].to_string(),
        role: Role::Researcher,
        station: None,
        enc_public_key: Some(RecipientKey::generate().public().to_pem()),
    };
    h.admin.add_user(&u).await.unwrap().token
}

/// Build a signed request by hand, then break it in one way.
async fn raw_signed(
    h: &Harness,
    key: &SecretKey,
    method: &str,
    path: &str,
    body: &[u8],
    tweak: impl FnOnce(&mut Vec<(String, String)>, &mut Vec<u8>),
) -> (u16, String) {
    let authority = h.url.trim_start_matches("http://").to_string();
    let (p, q) = path.split_once('?').unwrap_or((path, ""));
    let mut nonce = [0u8; 16];
    getrandom::fill(&mut nonce).unwrap();
    let parts = httpsig::RequestParts {
        method,
        authority: &authority,
        path: p,
        query: q,
        body,
    };
    let now = amicus_registry::db::now_ms() / 1000;
    let mut headers: Vec<(String, String)> = httpsig::sign(&parts, key, now, &hex::encode(nonce))
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    let mut body = body.to_vec();
    tweak(&mut headers, &mut body);
    send_raw(h, method, path, &headers, body).await
}

async fn send_raw(
    h: &Harness,
    method: &str,
    path: &str,
    headers: &[(String, String)],
    body: Vec<u8>,
) -> (u16, String) {
    let client = amicus_registry::client::http(std::time::Duration::from_secs(60));
    let mut req = client.request(method.parse().unwrap(), format!("{}{}", h.url, path));
    for (k, v) in headers {
        req = req.header(k, v);
    }
    let r = req.body(body).send().await.unwrap();
    let status = r.status().as_u16();
    let code = r
        .json::<ErrorBody>()
        .await
        .map(|b| b.error.code)
        .unwrap_or_default();
    (status, code)
}

async fn station_attacks(h: &Harness) {
    let path = "/v1/station/audit/next";
    // The honest request works.
    assert_eq!(
        raw_signed(h, &h.st1_key, "GET", path, b"", |_, _| {})
            .await
            .0,
        200
    );
    // Unsigned.
    assert_eq!(
        send_raw(h, "GET", path, &[], vec![]).await,
        (401, "unauthenticated".into())
    );
    // Signed by a key no station has.
    let stranger = SecretKey::generate().unwrap();
    assert_eq!(
        raw_signed(h, &stranger, "GET", path, b"", |_, _| {}).await,
        (401, "unknown_station".into())
    );
    // Signed by st2's key but claiming st1's key id.
    let st1_id = h.st1_key.public().id().to_string();
    let st2_id = h.st2_key.public().id().to_string();
    let r = raw_signed(h, &h.st2_key, "GET", path, b"", |hs, _| {
        for (k, v) in hs.iter_mut() {
            if k == "signature-input" {
                *v = v.replace(&st2_id, &st1_id);
            }
        }
    })
    .await;
    assert_eq!(r, (401, "bad_signature".into()));
    // Replayed: the same headers twice.
    let authority = h.url.trim_start_matches("http://").to_string();
    let parts = httpsig::RequestParts {
        method: "GET",
        authority: &authority,
        path,
        query: "",
        body: b"",
    };
    let headers: Vec<(String, String)> = httpsig::sign(
        &parts,
        &h.st1_key,
        amicus_registry::db::now_ms() / 1000,
        "replayreplayreplay01",
    )
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    assert_eq!(send_raw(h, "GET", path, &headers, vec![]).await.0, 200);
    assert_eq!(
        send_raw(h, "GET", path, &headers, vec![]).await,
        (401, "replayed".into())
    );
    // A body changed after signing.
    let body = br#"{"state":"running"}"#;
    let r = raw_signed(
        h,
        &h.st1_key,
        "POST",
        "/v1/station/runs/00000000000000000000000000000000/state",
        body,
        |_, b| {
            *b = br#"{"state":"failed"}"#.to_vec();
        },
    )
    .await;
    assert_eq!(r, (401, "bad_signature".into()));
    // Signed for another path.
    let r = raw_signed(h, &h.st1_key, "GET", "/v1/station/open", b"", |_, _| {}).await;
    assert_eq!(r.0, 200);
    let parts = httpsig::RequestParts {
        method: "GET",
        authority: &authority,
        path: "/v1/station/open",
        query: "",
        body: b"",
    };
    let headers: Vec<(String, String)> = httpsig::sign(
        &parts,
        &h.st1_key,
        amicus_registry::db::now_ms() / 1000,
        "otherpathotherpath01",
    )
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    assert_eq!(
        send_raw(h, "GET", path, &headers, vec![]).await,
        (401, "bad_signature".into())
    );
    // An old signature (outside the clock window).
    let headers: Vec<(String, String)> = httpsig::sign(
        &httpsig::RequestParts {
            method: "GET",
            authority: &authority,
            path,
            query: "",
            body: b"",
        },
        &h.st1_key,
        amicus_registry::db::now_ms() / 1000 - 3600,
        "stalestalestalestale",
    )
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    assert_eq!(
        send_raw(h, "GET", path, &headers, vec![]).await,
        (401, "bad_signature".into())
    );
    // A station on a people's route, a person on a station route.
    assert_eq!(
        raw_signed(h, &h.st1_key, "GET", "/v1/tasks", b"", |_, _| {}).await,
        (403, "forbidden".into())
    );
    refused(h, h.alice.results("x").await.map(drop), 404, "not_found").await;
    let r = amicus_registry::client::http(std::time::Duration::from_secs(60))
        .get(format!("{}/v1/station/open", h.url))
        .bearer_auth(alice_token(h).await)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    // A station may fetch only trains of its open runs.
    refused(h, h.st2.train(&h.train).await, 403, "forbidden").await;
    // Every refusal above is in the trail.
    let trail = h.db.audit_entries().await.unwrap();
    for code in [
        "unauthenticated",
        "unknown_station",
        "bad_signature",
        "replayed",
        "forbidden",
    ] {
        assert!(
            trail
                .iter()
                .any(|e| e.outcome.contains(&format!(" {code}:"))),
            "{code} not audited"
        );
    }
}

async fn oversized_bodies(h: &Harness) {
    // The harness's limits: 64 KiB of JSON.
    let big = vec![b' '; 70 * 1024];
    let r = amicus_registry::client::http(std::time::Duration::from_secs(60))
        .post(format!("{}/v1/tasks", h.url))
        .bearer_auth(alice_token(h).await)
        .body(big.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    assert_eq!(
        r.json::<ErrorBody>().await.unwrap().error.code,
        "payload_too_large"
    );
    // Signed station requests too (before the signature is even checked).
    let r = raw_signed(
        h,
        &h.st1_key,
        "POST",
        "/v1/station/runs/00000000000000000000000000000000/state",
        &big,
        |_, _| {},
    )
    .await;
    assert_eq!(r, (413, "payload_too_large".into()));
    let trail = h.db.audit_entries().await.unwrap();
    assert!(
        trail
            .iter()
            .any(|e| e.outcome.starts_with("refused 413 payload_too_large"))
    );
    // A person with a bad token announcing a huge upload is refused before any of it is read.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let authority = h.url.trim_start_matches("http://");
    let mut tcp = tokio::net::TcpStream::connect(authority).await.unwrap();
    let head = format!(
        "PUT /v1/trains HTTP/1.1\r\nHost: {authority}\r\nAuthorization: Bearer amicus_nope\r\nContent-Length: 200000000\r\n\r\n"
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    let mut answer = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut answer))
        .await
        .expect("answered without the body")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer[..n]);
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
}

async fn audit_copies(h: &Harness) {
    // A real station log: write entries with the runtime's own writer.
    let dir = tempfile::tempdir().unwrap();
    let log = amicus_runtime::audit::AuditLog::new(dir.path(), h.st1_key.clone());
    log.create().unwrap();
    for i in 0..5 {
        log.append(amicus_runtime::audit::Event::DigestApproved {
            digest: amicus_bundle::sha256(&[i]),
            train: None,
            scope: None,
            params_sha256: None,
        })
        .unwrap();
    }
    // What a station uploads: the public chain.
    let text = std::fs::read_to_string(dir.path().join("audit-public.log")).unwrap();
    let lines: Vec<String> = text.lines().map(str::to_string).collect();
    let head = std::fs::read_to_string(dir.path().join("audit-public.head")).unwrap();
    assert_eq!(h.st1.audit_next().await.unwrap(), 0);
    assert_eq!(
        h.st1.upload_audit(lines[..3].to_vec(), None).await.unwrap(),
        3
    );
    // A gap, an edited entry, another station's entries: refused.
    refused(
        h,
        h.st1.upload_audit(lines[4..].to_vec(), None).await,
        400,
        "bad_audit",
    )
    .await;
    let edited = lines[3].replace("digest-approved", "digest-approvee");
    refused(
        h,
        h.st1.upload_audit(vec![edited], None).await,
        400,
        "bad_audit",
    )
    .await;
    refused(
        h,
        h.st2.upload_audit(lines[..1].to_vec(), None).await,
        400,
        "bad_audit",
    )
    .await;
    assert_eq!(
        h.st1
            .upload_audit(lines[3..].to_vec(), Some(head))
            .await
            .unwrap(),
        5
    );
    // The copy is paged like every list: two lines a page, then the client follows the links.
    let r = amicus_registry::client::http(Duration::from_secs(60))
        .get(format!("{}/v1/stations/st1/audit?limit=2", h.url))
        .bearer_auth(h.alice_token.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403, "researchers do not read station logs");
    let auditor_token = person_token(h, "paging-auditor", Role::Auditor).await;
    let r = amicus_registry::client::http(Duration::from_secs(60))
        .get(format!("{}/v1/stations/st1/audit?limit=2", h.url))
        .bearer_auth(&auditor_token)
        .send()
        .await
        .unwrap();
    let link = r.headers()["link"].to_str().unwrap().to_string();
    let page: StationAudit = r.json().await.unwrap();
    assert_eq!(page.lines.len(), 2);
    assert!(link.contains("after=1"), "{link}");
    // The auditor verifies the copy with the runtime's verifier.
    let copy = h.auditor.station_audit("st1").await.unwrap();
    let raw: Vec<&[u8]> = copy.lines.iter().map(|l| l.as_bytes()).collect();
    let report = amicus_runtime::audit::verify_lines(
        &raw,
        amicus_runtime::audit::HeadFile::Bytes(copy.head.clone().unwrap().into_bytes()),
        &h.st1_key.public(),
        amicus_runtime::audit::PUBLIC,
    );
    assert!(report.ok(), "{report:?}");
    assert_eq!(report.valid_entries, 5);
    // A registry that dropped the last entry is caught by the station's signed head.
    let report = amicus_runtime::audit::verify_lines(
        &raw[..4],
        amicus_runtime::audit::HeadFile::Bytes(copy.head.unwrap().into_bytes()),
        &h.st1_key.public(),
        amicus_runtime::audit::PUBLIC,
    );
    assert!(!report.ok());
}

async fn long_poll_and_expiry(h: &Harness) {
    // A waiting station wakes when a task arrives, well before its wait ends.
    let url = h.url.clone();
    let key = h.st2_key.clone();
    let waiter = tokio::spawn(async move {
        let st = StationClient::new(&url, key).unwrap();
        let t0 = Instant::now();
        let items = st.work(25).await.unwrap();
        (items, t0.elapsed())
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let task = new_task(h, &["st2"]).await;
    let (items, waited) = waiter.await.unwrap();
    assert_eq!(items.len(), 1);
    assert_eq!(items[0].task, task.id);
    assert!(
        waited < Duration::from_secs(20),
        "long poll did not wake: {waited:?}"
    );
    // A task that expires: its undelivered runs become expired, and late reports are refused.
    let short = h
        .alice
        .create_task(&NewTask {
            statement: None,
            train: h.train.clone(),
            stations: vec!["st1".into()],
            params: None,
            expires_in_s: Some(1),
        })
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1300)).await;
    assert!(
        h.st1
            .work(0)
            .await
            .unwrap()
            .iter()
            .all(|w| w.task != short.id)
    );
    let t = h.alice.task(&short.id).await.unwrap();
    assert_eq!(t.runs[0].state, RunState::Expired);
    refused(
        h,
        h.st1.report(&t.runs[0].id, RunState::Running, None).await,
        409,
        "conflict",
    )
    .await;
}

/// Tokens expire, are revoked and rotated; a signed request must ask for what the task
/// asks, and stations' output signatures travel to the researcher.
async fn tokens_and_signed_requests(h: &Harness) {
    let unauthorized = |r: Result<UserInfo, ClientError>, says: &str| match r {
        Err(ClientError::Api {
            status: 401,
            message,
            ..
        }) => assert!(message.contains(says), "{message}"),
        other => panic!("expected 401 ({says}), got {other:?}"),
    };
    let mk = |name: &str, expires: Option<u64>| NewUser {
        name: name.into(),
        role: Role::Researcher,
        station: None,
        enc_public_key: None,
        token_expires_in_s: expires,
    };
    // Expiry.
    let brief = h.admin.add_user(&mk("brief", Some(1))).await.unwrap();
    let brief = PersonClient::new(&h.url, &brief.token).unwrap();
    brief.me().await.unwrap();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    unauthorized(brief.me().await, "expired");
    refused(
        h,
        h.admin
            .add_user(&mk("forever", Some(20 * 365 * 86_400)))
            .await,
        400,
        "bad_request",
    )
    .await;
    // Rotation by oneself: the old token stops working.
    let tom = h.admin.add_user(&mk("tom", None)).await.unwrap();
    let old = PersonClient::new(&h.url, &tom.token).unwrap();
    let made = old
        .rotate_token(
            "tom",
            &TokenRequest {
                expires_in_s: Some(3600),
            },
        )
        .await
        .unwrap();
    assert!(made.expires_ms.is_some() && made.token != tom.token);
    unauthorized(old.me().await, "unknown token");
    let tom = PersonClient::new(&h.url, &made.token).unwrap();
    assert_eq!(tom.me().await.unwrap().name, "tom");
    // Nobody but an admin changes another's token.
    refused(
        h,
        tom.rotate_token("alice", &TokenRequest::default()).await,
        403,
        "forbidden",
    )
    .await;
    refused(h, tom.revoke_token("alice").await, 403, "forbidden").await;
    h.alice.me().await.unwrap();
    // Revocation, then an admin's rotation gives a working token again.
    h.admin.revoke_token("tom").await.unwrap();
    unauthorized(tom.me().await, "revoked");
    let again = h
        .admin
        .rotate_token("tom", &TokenRequest::default())
        .await
        .unwrap();
    let tom = PersonClient::new(&h.url, &again.token).unwrap();
    tom.me().await.unwrap();
    refused(
        h,
        h.admin
            .rotate_token("nobody", &TokenRequest::default())
            .await,
        404,
        "not_found",
    )
    .await;
    refused(
        h,
        h.admin
            .rotate_token(
                "tom",
                &TokenRequest {
                    expires_in_s: Some(0),
                },
            )
            .await,
        400,
        "bad_request",
    )
    .await;
    assert!(matches!(
        h.admin.revoke_token("../users").await,
        Err(ClientError::Url(_))
    ));
    // The trail says who changed which token; never the token.
    let trail = h.db.audit_entries().await.unwrap();
    assert!(
        trail
            .iter()
            .any(|e| e.action == "token-rotate" && e.target == "tom")
    );
    assert!(
        trail
            .iter()
            .any(|e| e.action == "token-revoke" && e.target == "tom")
    );
    assert!(!trail.iter().any(|e| e.outcome.contains(&again.token)));

    // A signed request is checked against the task it comes with.
    use amicus_registry::request::{RequestStatement, nonce, sign_request};
    let researcher = SecretKey::generate().unwrap();
    let params = serde_json::json!({"tables": ["modality"]});
    let statement = |params: &serde_json::Value, stations: &[&str], key: &RecipientKey| {
        sign_request(
            &researcher,
            &RequestStatement {
                kind: "task".into(),
                researcher: "alice".into(),
                train: h.train.clone(),
                params_sha256: amicus_bundle::sha256(params.to_string().as_bytes()).to_hex(),
                stations: stations.iter().map(|s| s.to_string()).collect(),
                recipient_key_sha256: key.public().fingerprint(),
                plan_sha256: None,
                initial_weights_sha256: None,
                station_keys: Default::default(),
                expires_ms: amicus_registry::db::now_ms() + 2 * 86_400_000,
                nonce: nonce(),
            },
        )
    };
    let task = |st: String| NewTask {
        train: h.train.clone(),
        stations: vec!["st1".into()],
        params: Some(params.clone()),
        expires_in_s: None,
        statement: Some(st),
    };
    let other_key = RecipientKey::generate();
    for bad in [
        statement(
            &serde_json::json!({"tables": ["roi"]}),
            &["st1"],
            &h.alice_key,
        ),
        statement(&params, &["st1", "st2"], &h.alice_key),
        statement(&params, &["st1"], &other_key),
        "{\"payloadType\": \"x\"}".to_string(),
        "not a signed request".to_string(),
    ] {
        refused(h, h.alice.create_task(&task(bad)).await, 400, "bad_request").await;
    }
    let signed = statement(&params, &["st1"], &h.alice_key);
    let t = h.alice.create_task(&task(signed.clone())).await.unwrap();
    let work = h.st1.work(0).await.unwrap();
    let item = work.iter().find(|w| w.task == t.id).unwrap();
    assert_eq!(item.statement.as_deref(), Some(signed.as_str()));
    // The station's signature over an output reaches the researcher as the station sent it.
    h.st1
        .report(&item.run, RunState::Running, None)
        .await
        .unwrap();
    let ctx = SealContext {
        task: &t.id,
        run: &item.run,
        station: "st1",
        output: "summary.json",
    };
    let sealed = seal(
        &amicus_registry::sealed::RecipientPublicKey::from_pem(&item.recipient_key, "t").unwrap(),
        &ctx,
        b"{}",
    )
    .unwrap();
    let sig = amicus_registry::request::sign_output(&h.st1_key, &ctx, None, &sealed);
    let too_long = SealedOutput {
        name: "summary.json".into(),
        sealed: B64.encode(&sealed),
        signature: Some("A".repeat(300)),
    };
    refused(
        h,
        h.st1.result(&item.run, vec![too_long]).await,
        400,
        "bad_request",
    )
    .await;
    h.st1
        .result(
            &item.run,
            vec![SealedOutput {
                name: "summary.json".into(),
                sealed: B64.encode(&sealed),
                signature: Some(sig.clone()),
            }],
        )
        .await
        .unwrap();
    let results = h.alice.results(&t.id).await.unwrap();
    let out = &results.runs[0].outputs[0];
    assert_eq!(out.signature.as_deref(), Some(sig.as_str()));
    assert!(amicus_registry::request::verify_output(
        &h.st1_key.public(),
        &ctx,
        None,
        &B64.decode(&out.sealed).unwrap(),
        &sig
    ));
}

/// Every list is paged: `limit` and `after`, a `Link: rel="next"` while more remain; the
/// client follows the links.
async fn pagination(h: &Harness) {
    let http = amicus_registry::client::http(Duration::from_secs(60));
    let get = |path: String, token: String| {
        let http = http.clone();
        let url = format!("{}{path}", h.url);
        async move {
            let r = http.get(url).bearer_auth(token).send().await.unwrap();
            let status = r.status().as_u16();
            let link = r
                .headers()
                .get("link")
                .map(|v| v.to_str().unwrap().to_string());
            let body: serde_json::Value = r.json().await.unwrap();
            (status, link, body)
        }
    };
    let all = h.alice.tasks().await.unwrap();
    assert!(all.len() >= 5, "{}", all.len());
    let mut seen = Vec::new();
    let mut next = Some("/v1/tasks?limit=2".to_string());
    let mut pages = 0;
    while let Some(p) = next.take() {
        let (status, link, body) = get(p, h.alice_token.clone()).await;
        assert_eq!(status, 200, "{body}");
        let items = body.as_array().unwrap();
        assert!(items.len() <= 2);
        seen.extend(items.iter().map(|t| t["id"].as_str().unwrap().to_string()));
        next = link.map(|l| {
            amicus_registry::server::page::next_link(&l)
                .unwrap()
                .to_string()
        });
        pages += 1;
        assert!(pages <= all.len(), "pages never end");
    }
    let ids: Vec<String> = all.iter().map(|t| t.id.clone()).collect();
    assert_eq!(seen, ids);
    // The trail by sequence number.
    let (status, link, body) = get("/v1/audit?limit=3".into(), h.admin_token.clone()).await;
    assert_eq!(status, 200);
    assert_eq!(body.as_array().unwrap().len(), 3);
    assert_eq!(body[0]["seq"], 0);
    let last = body[2]["seq"].as_i64().unwrap();
    assert!(link.unwrap().contains(&format!("after={last}")));
    let (_, _, body) = get(
        format!("/v1/audit?limit=3&after={last}"),
        h.admin_token.clone(),
    )
    .await;
    assert_eq!(body[0]["seq"], last + 1);
    // The client follows the links to the whole trail (more than one default page).
    for i in 0..amicus_registry::server::page::DEFAULT_PAGE {
        h.db.audit("test", "filler", &i.to_string(), "ok")
            .await
            .unwrap();
    }
    let whole = h.auditor.registry_audit().await.unwrap();
    assert_eq!(whole.len(), h.db.audit_entries().await.unwrap().len());
    assert!(whole.len() > 500, "{}", whole.len());
    verify_registry_trail(&whole).unwrap();
    // Bad pages are refused in the one error shape.
    for bad in [
        "/v1/tasks?limit=0",
        "/v1/tasks?limit=5000",
        "/v1/tasks?after=..%2Fx",
        "/v1/tasks?after=nosuchtask",
        "/v1/audit?after=three",
    ] {
        let (status, _, body) = get(bad.into(), h.admin_token.clone()).await;
        assert_eq!(status, 400, "{bad}: {body}");
        assert!(body["error"]["code"].is_string(), "{bad}: {body}");
    }
    // Paging hides nothing a caller may not see: bob's pages hold none of alice's tasks, and
    // one of alice's task ids is no cursor for him.
    let bob: Vec<TaskInfo> = h.bob.tasks().await.unwrap();
    assert!(bob.iter().all(|t| t.researcher == "bob"));
    let carol = person_token(h, "carol", Role::Researcher).await;
    let (status, _, body) = get(format!("/v1/tasks?after={}", ids[0]), carol).await;
    assert_eq!(status, 400, "{body}");
    // Every list the database pages: two at a time, the same items in the same order as one
    // big page, whatever ties in time the ids break.
    let auditor = person_token(h, "pages-auditor", Role::Auditor).await;
    for name in ["paged-train-a", "paged-train-b"] {
        h.alice
            .push_train(sample_bundle(name, &SecretKey::generate().unwrap()).to_bytes())
            .await
            .unwrap();
    }
    for (path, id) in [
        ("/v1/trains", "digest"),
        ("/v1/tasks", "id"),
        ("/v1/jobs", "id"),
        ("/v1/stations/st1/runs", "id"),
    ] {
        let (status, _, whole) = get(format!("{path}?limit=1000"), auditor.clone()).await;
        assert_eq!(status, 200, "{path}: {whole}");
        let whole: Vec<String> = whole
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x[id].as_str().unwrap().to_string())
            .collect();
        assert!(whole.len() >= 2, "{path}: {}", whole.len());
        let mut paged = Vec::new();
        let mut next = Some(format!("{path}?limit=2"));
        while let Some(p) = next.take() {
            let (status, link, body) = get(p, auditor.clone()).await;
            assert_eq!(status, 200, "{path}: {body}");
            paged.extend(
                body.as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x[id].as_str().unwrap().to_string()),
            );
            next = link.map(|l| {
                amicus_registry::server::page::next_link(&l)
                    .unwrap()
                    .to_string()
            });
            assert!(paged.len() <= whole.len() + 2, "{path}: pages never end");
        }
        assert_eq!(paged, whole, "{path}");
        let (status, _, _) = get(format!("{path}?after=nosuchitem"), auditor.clone()).await;
        assert_eq!(status, 400, "{path}");
    }
}

async fn trail_and_openapi(h: &Harness) {
    let entries = h.auditor.registry_audit().await.unwrap();
    assert!(entries.len() > 20);
    verify_registry_trail(&entries).unwrap();
    let mut edited = entries.clone();
    edited[3].outcome = "ok".into();
    assert!(verify_registry_trail(&edited).is_err());
    let mut dropped = entries.clone();
    dropped.remove(5);
    assert!(verify_registry_trail(&dropped).is_err());
    // The served document is the one in the repository, and names every route.
    let doc: serde_json::Value = amicus_registry::client::http(std::time::Duration::from_secs(60))
        .get(format!("{}/v1/openapi.json", h.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        doc,
        serde_json::from_str::<serde_json::Value>(server::OPENAPI).unwrap()
    );
    for (method, path) in server::ROUTES {
        assert!(
            doc["paths"][path][method].is_object(),
            "{method} {path} missing from openapi.json"
        );
    }
    let documented: usize = doc["paths"]
        .as_object()
        .unwrap()
        .values()
        .map(|p| p.as_object().unwrap().len())
        .sum();
    assert_eq!(
        documented,
        server::ROUTES.len(),
        "openapi.json documents routes the server lacks"
    );
}

fn weights(values: &[f32]) -> amicus_fl::wire::Weights {
    amicus_fl::wire::Weights {
        tensors: vec![amicus_fl::wire::Tensor {
            name: "w".into(),
            shape: vec![values.len()],
            data: values.to_vec(),
        }],
    }
}

fn update(delta: &[f32], samples: u64) -> Vec<u8> {
    amicus_fl::wire::Update {
        samples,
        delta: delta.to_vec(),
    }
    .encode(Encoding::Fp32)
    .unwrap()
}

fn plan(rounds: u32, min_stations: u32, strategy: Strategy) -> Plan {
    serde_json::from_value(serde_json::json!({"rounds": rounds, "min_stations": min_stations}))
        .map(|p: Plan| Plan { strategy, ..p })
        .unwrap()
}

async fn new_job(h: &Harness, stations: &[&str], plan: Plan, initial: &[f32]) -> JobInfo {
    h.alice
        .create_job(&NewJob {
            statement: None,
            train: h.train.clone(),
            stations: stations.iter().map(|s| s.to_string()).collect(),
            params: None,
            plan,
            weights: B64.encode(weights(initial).encode()),
        })
        .await
        .unwrap()
}

/// Take the station's work for `job`, check the global weights it gets, and send `update`
/// (or report `failed` when `None`).
async fn play_round(
    st: &StationClient,
    job: &str,
    round: u32,
    expect_global: &[f32],
    send: Option<Vec<u8>>,
) {
    let work = st.work(0).await.unwrap();
    let item = work
        .iter()
        .find(|w| {
            w.job
                .as_ref()
                .is_some_and(|j| j.job == job && j.round == round)
        })
        .unwrap_or_else(|| panic!("no work for round {round}: {work:?}"));
    let global = st.round_weights(job, round).await.unwrap();
    assert_eq!(
        amicus_fl::wire::Weights::decode(&global).unwrap(),
        weights(expect_global)
    );
    st.report(&item.run, RunState::Running, None).await.unwrap();
    match send {
        Some(u) => st
            .result_with_update(&item.run, Vec::new(), Some(&u))
            .await
            .unwrap(),
        None => st
            .report(&item.run, RunState::Failed, Some("station crashed".into()))
            .await
            .unwrap(),
    }
}

async fn checkpoint(h: &Harness, job: &str, round: u32) -> Vec<f32> {
    let bytes = h.alice.job_weights(job, Some(round)).await.unwrap();
    amicus_fl::wire::Weights::decode(&bytes).unwrap().flat()
}

async fn federated_jobs(h: &Harness) {
    let st3_key = SecretKey::generate().unwrap();
    h.admin
        .add_station(&NewStation {
            name: "st3".into(),
            public_key: st3_key.public().to_pem(),
        })
        .await
        .unwrap();
    let st3 = StationClient::new(&h.url, st3_key).unwrap();

    // Plans that cannot run are refused.
    let bad = NewJob {
        statement: None,
        train: h.train.clone(),
        stations: vec!["st1".into()],
        params: None,
        plan: plan(2, 2, Strategy::FedAvg),
        weights: B64.encode(weights(&[0.0]).encode()),
    };
    refused(h, h.alice.create_job(&bad).await, 400, "bad_request").await;
    let bad_weights = NewJob {
        statement: None,
        plan: plan(1, 1, Strategy::FedAvg),
        weights: B64.encode(b"not weights"),
        ..bad.clone()
    };
    refused(
        h,
        h.alice.create_job(&bad_weights).await,
        400,
        "bad_request",
    )
    .await;
    refused(
        h,
        h.bob
            .create_job(&NewJob {
                statement: None,
                stations: vec!["nowhere".into()],
                ..bad.clone()
            })
            .await,
        404,
        "not_found",
    )
    .await;

    // Robust aggregation: a scaled (Byzantine) update is neutralised by the median; a NaN
    // update never decodes; below the quorum the job fails, with nothing checkpointed.
    let job = new_job(
        h,
        &["st1", "st2", "st3"],
        plan(2, 2, Strategy::Median),
        &[0.0; 4],
    )
    .await;
    assert_eq!((job.state, job.round), (JobState::Running, 1));
    play_round(
        &h.st1,
        &job.id,
        1,
        &[0.0; 4],
        Some(update(&[1.0, 1.0, 1.0, 1.0], 10)),
    )
    .await;
    play_round(
        &h.st2,
        &job.id,
        1,
        &[0.0; 4],
        Some(update(&[1.2, 0.8, 1.0, 1.0], 30)),
    )
    .await;
    // Not part of round 2 yet, and another station's round is not st1's to fetch.
    refused(h, h.st1.round_weights(&job.id, 2).await, 403, "forbidden").await;
    play_round(
        &st3,
        &job.id,
        1,
        &[0.0; 4],
        Some(update(&[1e3, -1e3, 1e3, 1e3], 10)),
    )
    .await;
    let round1 = checkpoint(h, &job.id, 1).await;
    assert_eq!(
        round1,
        vec![1.2, 0.8, 1.0, 1.0],
        "median of each coordinate"
    );
    let info = h.alice.job(&job.id).await.unwrap();
    assert_eq!(info.round, 2);
    let summary = info.rounds[0].summary.clone().unwrap();
    assert_eq!(summary.used, 3);
    assert_eq!(
        summary
            .stations
            .iter()
            .find(|s| s.station == "st3")
            .unwrap()
            .norm,
        Some(2000.0)
    );

    let mut nan = update(&[0.5; 4], 10);
    let at = nan.len() - 4;
    nan[at..].copy_from_slice(&f32::NAN.to_le_bytes());
    play_round(&h.st1, &job.id, 2, &round1, Some(nan)).await;
    play_round(&h.st2, &job.id, 2, &round1, Some(update(&[0.1; 4], 30))).await;
    play_round(&st3, &job.id, 2, &round1, None).await;
    let info = h.alice.job(&job.id).await.unwrap();
    assert_eq!(info.state, JobState::Failed);
    assert!(
        info.reason.as_deref().unwrap().contains("quorum is 2"),
        "{:?}",
        info.reason
    );
    assert!(h.alice.job_weights(&job.id, Some(2)).await.is_err());
    let trail = h.auditor.registry_audit().await.unwrap();
    assert!(
        trail
            .iter()
            .any(|e| e.action == "job-failed" && e.target == job.id)
    );
    assert!(
        trail.iter().any(|e| e.action == "job-round"
            && e.target == job.id
            && e.outcome.contains("st3 used"))
    );

    // Only the job's researcher fetches weights; a plain task's run carries no update.
    refused(h, h.bob.job_weights(&job.id, None).await, 403, "forbidden").await;
    refused(
        h,
        h.auditor.job_weights(&job.id, None).await,
        403,
        "forbidden",
    )
    .await;
    assert_eq!(h.auditor.job(&job.id).await.unwrap().id, job.id);
    refused(h, h.bob.job(&job.id).await, 403, "forbidden").await;
    // Lists: a researcher sees their own jobs, an auditor every job.
    assert!(h.alice.jobs().await.unwrap().iter().any(|j| j.id == job.id));
    assert!(h.bob.jobs().await.unwrap().is_empty());
    assert!(
        h.auditor
            .jobs()
            .await
            .unwrap()
            .iter()
            .any(|j| j.id == job.id)
    );
    let task = new_task(h, &["st1"]).await;
    let item = h
        .st1
        .work(0)
        .await
        .unwrap()
        .into_iter()
        .find(|w| w.task == task.id)
        .unwrap();
    assert!(item.job.is_none());
    h.st1
        .report(&item.run, RunState::Running, None)
        .await
        .unwrap();
    refused(
        h,
        h.st1
            .result_with_update(&item.run, Vec::new(), Some(&update(&[1.0], 1)))
            .await,
        400,
        "bad_request",
    )
    .await;

    // FedAvg weighted by samples, server SGD at lr 0.5; a station that misses the round's
    // deadline does not stall it when the quorum is met; the last round finishes the job.
    let adam = Plan {
        round_seconds: 1,
        server: ServerOptimizer::Sgd { lr: 0.5 },
        ..plan(1, 2, Strategy::FedAvg)
    };
    let job = new_job(h, &["st1", "st2", "st3"], adam, &[1.0, 2.0]).await;
    play_round(
        &h.st1,
        &job.id,
        1,
        &[1.0, 2.0],
        Some(update(&[1.0, 0.0], 10)),
    )
    .await;
    play_round(
        &h.st2,
        &job.id,
        1,
        &[1.0, 2.0],
        Some(update(&[4.0, 3.0], 20)),
    )
    .await;
    assert_eq!(
        h.alice.job(&job.id).await.unwrap().state,
        JobState::Running,
        "st3 may still answer"
    );
    tokio::time::sleep(Duration::from_millis(1200)).await;
    h.db.expire_overdue().await.unwrap();
    amicus_registry::jobs::advance(&h.db, &job.id)
        .await
        .unwrap();
    let info = h.alice.job(&job.id).await.unwrap();
    assert_eq!(info.state, JobState::Done);
    let s = info.rounds[0].summary.clone().unwrap();
    let st3_part = s.stations.iter().find(|x| x.station == "st3").unwrap();
    assert_eq!(st3_part.status, "missing");
    assert!(st3_part.reason.as_deref().unwrap().contains("expired"));
    // (10·[1,0] + 20·[4,3]) / 30 = [3, 2]; half of it applied.
    assert_eq!(checkpoint(h, &job.id, 1).await, vec![2.5, 3.0]);
    let newest = h.alice.job_weights(&job.id, None).await.unwrap();
    assert_eq!(
        amicus_fl::wire::Weights::decode(&newest).unwrap().flat(),
        vec![2.5, 3.0]
    );
}

fn secagg_plan(rounds: u32, threshold: u32, exchange_seconds: u64) -> Plan {
    Plan {
        round_seconds: 120,
        secure_aggregation: Some(SecAggPlan {
            threshold,
            exchange_seconds,
        }),
        ..plan(rounds, 2, Strategy::FedAvg)
    }
}

/// A station takes its work for round 1 of `job` and says it runs; the run id.
async fn start_round(st: &StationClient, job: &str) -> String {
    let work = st.work(0).await.unwrap();
    let item = work
        .iter()
        .find(|w| w.job.as_ref().is_some_and(|j| j.job == job))
        .unwrap_or_else(|| panic!("no work for {job}: {work:?}"));
    assert!(item.job.as_ref().unwrap().secure_aggregation.is_some());
    st.report(&item.run, RunState::Running, None).await.unwrap();
    item.run.clone()
}

/// Secure aggregation through the real protocol code of the stations
/// (`amicus_daemon::secagg`): the registry gets exactly the FedAvg sum, stores
/// only masked updates, recovers a station that dropped after sharing, refuses plain
/// updates and out-of-phase messages, and below the threshold fails with nothing unmasked.
async fn secure_aggregation(h: &Harness) {
    use amicus_daemon::secagg::join;
    let st4_key = SecretKey::generate().unwrap();
    h.admin
        .add_station(&NewStation {
            name: "st4".into(),
            public_key: st4_key.public().to_pem(),
        })
        .await
        .unwrap();
    let st4 = StationClient::new(&h.url, st4_key.clone()).unwrap();
    let three = ["st1", "st2", "st4"];

    // Plans that would need individual updates, or cannot keep the threshold, are refused.
    let base = secagg_plan(1, 2, 30);
    for bad in [
        Plan {
            strategy: Strategy::Median,
            ..base.clone()
        },
        Plan {
            encoding: Encoding::Q8,
            ..base.clone()
        },
        Plan {
            clip_update_norm: Some(1.0),
            ..base.clone()
        },
        secagg_plan(1, 1, 30),
        secagg_plan(1, 4, 30),
        Plan {
            round_seconds: 60,
            ..base.clone()
        },
    ] {
        let r = h
            .alice
            .create_job(&NewJob {
                statement: None,
                train: h.train.clone(),
                stations: three.iter().map(|s| s.to_string()).collect(),
                params: None,
                plan: bad,
                weights: B64.encode(weights(&[0.0; 4]).encode()),
            })
            .await;
        refused(h, r, 400, "bad_request").await;
    }

    // Three stations share; st4 drops after sharing (its run fails before it masks).
    let job = new_job(h, &three, base.clone(), &[0.0; 4]).await;
    let runs = [
        start_round(&h.st1, &job.id).await,
        start_round(&h.st2, &job.id).await,
        start_round(&st4, &job.id).await,
    ];
    // Out of phase, and plain updates, are refused before anything is stored.
    refused(
        h,
        h.st1
            .secagg_send(&job.id, 1, &SecAggMessage::Shares { shares: vec![] })
            .await,
        409,
        "conflict",
    )
    .await;
    refused(
        h,
        h.st1
            .result_with_update(&runs[0], Vec::new(), Some(&update(&[1.0; 4], 1)))
            .await,
        400,
        "bad_request",
    )
    .await;
    refused(h, h.st1.secagg_view(&job.id, 2).await, 400, "bad_request").await;
    // A station outside the job sees nothing of it.
    let st5_key = SecretKey::generate().unwrap();
    h.admin
        .add_station(&NewStation {
            name: "st5".into(),
            public_key: st5_key.public().to_pem(),
        })
        .await
        .unwrap();
    let st5 = StationClient::new(&h.url, st5_key).unwrap();
    refused(h, st5.secagg_view(&job.id, 1).await, 403, "forbidden").await;
    let deadline = amicus_registry::db::now_ms() + 60_000;
    let plan = base.secure_aggregation.unwrap();
    // Each station signs its round keys; each checks the others' against the key ids the
    // researcher's request names.
    let named: std::collections::BTreeMap<String, String> =
        [("st1", &h.st1_key), ("st2", &h.st2_key), ("st4", &st4_key)]
            .iter()
            .map(|(n, k)| (n.to_string(), k.public().id().to_string()))
            .collect();
    let (s1, s2, s4) = tokio::join!(
        join(
            &h.st1, &h.st1_key, "st1", &named, &job.id, 1, plan, deadline
        ),
        join(
            &h.st2, &h.st2_key, "st2", &named, &job.id, 1, plan, deadline
        ),
        join(&st4, &st4_key, "st4", &named, &job.id, 1, plan, deadline),
    );
    let (s1, s2, _s4) = (s1.unwrap(), s2.unwrap(), s4.unwrap());
    let view = h.st1.secagg_view(&job.id, 1).await.unwrap();
    assert_eq!(
        (view.phase, view.sharers.clone()),
        (SecAggPhase::Masked, vec![0, 1, 2])
    );
    // The registry relays shares it cannot open; late keys are refused.
    assert!(view.shares.iter().all(|s| s.to == view.me));
    refused(
        h,
        st4.secagg_send(
            &job.id,
            1,
            &SecAggMessage::Keys {
                mask_public: hex::encode([9u8; 32]),
                share_public: hex::encode([9u8; 32]),
                self_commitment: hex::encode([9u8; 32]),
                station_key: None,
                signature: None,
            },
        )
        .await,
        409,
        "conflict",
    )
    .await;
    let plain1 = update(&[1.0, 0.0, 0.0, 2.0], 10);
    let plain2 = update(&[4.0, 3.0, 0.0, -1.0], 20);
    let masked1 = s1.mask(&plain1).unwrap();
    // A masked vector of the wrong length is refused.
    refused(
        h,
        h.st1
            .result_with_update(
                &runs[0],
                Vec::new(),
                Some(&amicus_fl::secagg::encode_masked(&[1, 2, 3])),
            )
            .await,
        400,
        "bad_request",
    )
    .await;
    h.st1
        .result_with_update(&runs[0], Vec::new(), Some(&masked1))
        .await
        .unwrap();
    h.st2
        .result_with_update(&runs[1], Vec::new(), Some(&s2.mask(&plain2).unwrap()))
        .await
        .unwrap();
    st4.report(&runs[2], RunState::Failed, Some("station crashed".into()))
        .await
        .unwrap();
    let view = h.st1.secagg_view(&job.id, 1).await.unwrap();
    assert_eq!(view.phase, SecAggPhase::Reveal);
    assert_eq!((view.survivors, view.dropped), (vec![0, 1], vec![2]));

    // What the registry holds of each update is masked: no coordinate near the plain value.
    let task = &h.alice.job(&job.id).await.unwrap().rounds[0].task;
    let stored = h.db.updates_of_task(task).await.unwrap();
    assert_eq!(stored.len(), 2);
    for (u, plain) in stored.iter().zip([&plain1, &plain2]) {
        assert!(amicus_fl::wire::Update::decode(&u.payload).is_err());
        let (p, _) = amicus_fl::wire::Update::decode(plain).unwrap();
        let x = amicus_fl::secagg::encode_weighted(&p.delta, p.samples);
        let y = amicus_fl::secagg::decode_masked(&u.payload).unwrap();
        assert!(y.iter().zip(&x).all(|(a, b)| a.abs_diff(*b) > 1 << 40));
    }
    // A reveal must not mix secrets: the mask key of a survivor is refused.
    refused(
        h,
        h.st1
            .secagg_send(
                &job.id,
                1,
                &SecAggMessage::Reveal {
                    shares: vec![RevealedShare {
                        of: 1,
                        secret: SecretKind::MaskKey,
                        x: 1,
                        y: hex::encode([0u8; 32]),
                    }],
                },
            )
            .await,
        400,
        "bad_request",
    )
    .await;
    refused(
        h,
        st4.secagg_send(&job.id, 1, &SecAggMessage::Reveal { shares: vec![] })
            .await,
        403,
        "forbidden",
    )
    .await;
    // Only survivors sign the sets, with a signature of sane size.
    refused(
        h,
        st4.secagg_send(
            &job.id,
            1,
            &SecAggMessage::Consistency {
                signature: "AAAA".into(),
            },
        )
        .await,
        403,
        "forbidden",
    )
    .await;
    refused(
        h,
        h.st1
            .secagg_send(
                &job.id,
                1,
                &SecAggMessage::Consistency {
                    signature: "A".repeat(300),
                },
            )
            .await,
        400,
        "bad_request",
    )
    .await;
    // Each survivor signs the sets it was shown and reveals once the threshold signed the same.
    let (r1, r2) = tokio::join!(s1.reveal(&h.st1, deadline), s2.reveal(&h.st2, deadline));
    assert_eq!(r1.unwrap(), Some((2, 1)));
    assert_eq!(r2.unwrap(), Some((2, 1)));
    let info = h.alice.job(&job.id).await.unwrap();
    assert_eq!(info.state, JobState::Done, "{:?}", info.reason);
    // (10·[1,0,0,2] + 20·[4,3,0,−1]) / 30 = [3, 2, 0, 0], from masked updates only.
    let got = checkpoint(h, &job.id, 1).await;
    for (g, w) in got.iter().zip([3.0f32, 2.0, 0.0, 0.0]) {
        assert!((g - w).abs() < 1e-6, "{got:?}");
    }
    let summary = info.rounds[0].summary.clone().unwrap();
    assert_eq!(summary.used, 2);
    let st4_part = summary
        .stations
        .iter()
        .find(|s| s.station == "st4")
        .unwrap();
    assert_eq!(st4_part.status, "missing");
    assert!(
        st4_part
            .reason
            .as_deref()
            .unwrap()
            .contains("dropped after sharing")
    );
    assert!(summary.stations.iter().all(|s| s.norm.is_none()));

    // Below the threshold: st4 never answers (the key exchange closes at its deadline
    // without it), st2 drops after sharing, so one masked update is all there is. The job
    // fails and nothing is unmasked: no reveal is asked for, none stored.
    let job = new_job(h, &three, secagg_plan(1, 2, 1), &[0.0; 4]).await;
    let r1 = start_round(&h.st1, &job.id).await;
    let r2 = start_round(&h.st2, &job.id).await;
    let plan = secagg_plan(1, 2, 1).secure_aggregation.unwrap();
    let none = Default::default();
    let (s1, s2) = tokio::join!(
        join(&h.st1, &h.st1_key, "st1", &none, &job.id, 1, plan, deadline),
        join(&h.st2, &h.st2_key, "st2", &none, &job.id, 1, plan, deadline),
    );
    let (s1, _s2) = (s1.unwrap(), s2.unwrap());
    let view = h.st1.secagg_view(&job.id, 1).await.unwrap();
    assert_eq!(view.sharers, vec![0, 1]);
    h.st1
        .result_with_update(&r1, Vec::new(), Some(&s1.mask(&plain1).unwrap()))
        .await
        .unwrap();
    h.st2
        .report(&r2, RunState::Failed, Some("station crashed".into()))
        .await
        .unwrap();
    let info = h.alice.job(&job.id).await.unwrap();
    assert_eq!(info.state, JobState::Failed);
    assert!(
        info.reason
            .as_deref()
            .unwrap()
            .contains("masked updates from 1 station(s), the threshold is 2; nothing was unmasked"),
        "{:?}",
        info.reason
    );
    assert_eq!(s1.reveal(&h.st1, deadline).await.unwrap(), None);
    assert!(h.alice.job_weights(&job.id, Some(1)).await.is_err());
    let task = &info.rounds[0].task;
    assert!(
        h.db.secagg_messages(task)
            .await
            .unwrap()
            .iter()
            .all(|m| m.kind != "reveal")
    );
}

/// What a hostile or careless researcher, a late station and a damaged row can do to the
/// service: each is refused or contained, and the registry goes on.
/// A registry's proxy that passes every request through unchanged (the station's signature
/// still verifies: the `Host` it signed goes along) and shows the station whose key id is
/// `victim` a different survivor set in the reveal phase: every sharer survived.
async fn equivocating_proxy(upstream: String, victim: String) -> String {
    use axum::response::IntoResponse;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let http = amicus_registry::client::http(Duration::from_secs(60));
    let app = axum::Router::new().fallback(move |req: axum::extract::Request| {
        let (http, upstream, victim) = (http.clone(), upstream.clone(), victim.clone());
        async move {
            let (parts, body) = req.into_parts();
            let bytes = axum::body::to_bytes(body, 1 << 20).await.unwrap();
            let target = format!(
                "{upstream}{}",
                parts.uri.path_and_query().map_or("/", |p| p.as_str())
            );
            let mut ask = http.request(parts.method.clone(), target);
            for (name, value) in &parts.headers {
                if name != "content-length" && name != "transfer-encoding" {
                    ask = ask.header(name, value);
                }
            }
            let answer = ask.body(bytes.to_vec()).send().await.unwrap();
            let status = answer.status();
            let mut body = answer.bytes().await.unwrap().to_vec();
            let from_victim = parts
                .headers
                .get("signature-input")
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.contains(&victim));
            if from_victim
                && status.is_success()
                && parts.method == axum::http::Method::GET
                && parts.uri.path().ends_with("/secagg")
            {
                let mut view: serde_json::Value = serde_json::from_slice(&body).unwrap();
                if view["phase"] == "reveal" {
                    let sharers = view["sharers"].clone();
                    view["survivors"] = sharers;
                    view["dropped"] = serde_json::json!([]);
                    body = serde_json::to_vec(&view).unwrap();
                }
            }
            (status, [("content-type", "application/json")], body).into_response()
        }
    });
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    url
}

/// A registry that shows two survivors different survivor sets (here through a proxy in
/// front of one of them): each signs the sets it was shown, sees that the other's signature
/// is over other sets, and neither reveals anything.
async fn equivocating_registry(h: &Harness) {
    use amicus_daemon::secagg::join;
    let mut keys = Vec::new();
    for name in ["eq1", "eq2", "eq3"] {
        let k = SecretKey::generate().unwrap();
        h.admin
            .add_station(&NewStation {
                name: name.into(),
                public_key: k.public().to_pem(),
            })
            .await
            .unwrap();
        keys.push(k);
    }
    let honest: Vec<StationClient> = keys
        .iter()
        .map(|k| StationClient::new(&h.url, k.clone()).unwrap())
        .collect();
    let names = ["eq1", "eq2", "eq3"];
    let base = secagg_plan(1, 2, 30);
    let job = new_job(h, &names, base.clone(), &[0.0; 4]).await;
    let mut runs = Vec::new();
    for st in &honest {
        runs.push(start_round(st, &job.id).await);
    }
    let deadline = amicus_registry::db::now_ms() + 60_000;
    let plan = base.secure_aggregation.unwrap();
    let named: std::collections::BTreeMap<String, String> = names
        .iter()
        .zip(&keys)
        .map(|(n, k)| (n.to_string(), k.public().id().to_string()))
        .collect();
    let (s1, s2, s3) = tokio::join!(
        join(
            &honest[0], &keys[0], "eq1", &named, &job.id, 1, plan, deadline
        ),
        join(
            &honest[1], &keys[1], "eq2", &named, &job.id, 1, plan, deadline
        ),
        join(
            &honest[2], &keys[2], "eq3", &named, &job.id, 1, plan, deadline
        ),
    );
    let (s1, s2, _s3) = (s1.unwrap(), s2.unwrap(), s3.unwrap());
    honest[0]
        .result_with_update(
            &runs[0],
            Vec::new(),
            Some(&s1.mask(&update(&[1.0; 4], 1)).unwrap()),
        )
        .await
        .unwrap();
    honest[1]
        .result_with_update(
            &runs[1],
            Vec::new(),
            Some(&s2.mask(&update(&[2.0; 4], 1)).unwrap()),
        )
        .await
        .unwrap();
    honest[2]
        .report(&runs[2], RunState::Failed, Some("station crashed".into()))
        .await
        .unwrap();
    let view = honest[0].secagg_view(&job.id, 1).await.unwrap();
    assert_eq!((view.survivors, view.dropped), (vec![0, 1], vec![2]));
    // eq2 talks to the registry through the lie; eq1 directly.
    let lying = equivocating_proxy(h.url.clone(), keys[1].public().id().to_string()).await;
    let lied_to = StationClient::new(&lying, keys[1].clone()).unwrap();
    let shown = lied_to.secagg_view(&job.id, 1).await.unwrap();
    assert_eq!((shown.survivors, shown.dropped), (vec![0, 1, 2], vec![]));
    let soon = amicus_registry::db::now_ms() + 6_000;
    let (r1, r2) = tokio::join!(s1.reveal(&honest[0], soon), s2.reveal(&lied_to, soon));
    for r in [r1, r2] {
        let e = r.expect_err("a station revealed under an equivocating registry");
        assert!(e.to_string().contains("confirmed"), "{e}");
    }
    // Both signed what they were shown, and nothing was revealed.
    let after = honest[0].secagg_view(&job.id, 1).await.unwrap();
    assert_eq!(after.consistency.len(), 2);
    assert_eq!(after.phase, SecAggPhase::Reveal);
}

async fn robustness(h: &Harness) {
    let job_with = |plan: Plan| NewJob {
        statement: None,
        train: h.train.clone(),
        stations: vec!["st1".into(), "st2".into()],
        params: None,
        plan,
        weights: B64.encode(weights(&[0.0]).encode()),
    };
    // Numbers that overflow or make no sense are refused when the plan is checked.
    for bad in [
        Plan {
            strategy: Strategy::TrimmedMean {
                trim: (1usize << 63) + 1,
            },
            ..plan(1, 2, Strategy::FedAvg)
        },
        Plan {
            strategy: Strategy::TrimmedMean { trim: usize::MAX },
            ..plan(1, 2, Strategy::FedAvg)
        },
        Plan {
            server: ServerOptimizer::Sgd { lr: 1e300 },
            ..plan(1, 2, Strategy::FedAvg)
        },
        Plan {
            clip_update_norm: Some(1e12),
            ..plan(1, 2, Strategy::FedAvg)
        },
    ] {
        refused(
            h,
            h.alice.create_job(&job_with(bad)).await,
            400,
            "bad_request",
        )
        .await;
    }
    // Finite updates whose step overflows: the round fails with the reason, nothing
    // non-finite is stored, and the stations' reports were taken.
    let job = h
        .alice
        .create_job(&job_with(Plan {
            server: ServerOptimizer::Sgd { lr: 1e6 },
            ..plan(2, 2, Strategy::FedAvg)
        }))
        .await
        .unwrap();
    play_round(&h.st1, &job.id, 1, &[0.0], Some(update(&[3.0e38], 1))).await;
    play_round(&h.st2, &job.id, 1, &[0.0], Some(update(&[3.0e38], 1))).await;
    let j = h.alice.job(&job.id).await.unwrap();
    assert_eq!(j.state, JobState::Failed, "{j:?}");
    assert!(
        j.reason
            .as_deref()
            .unwrap_or_default()
            .contains("non-finite"),
        "{j:?}"
    );
    assert!(h.alice.job_weights(&job.id, Some(1)).await.is_err());
    // A damaged checkpoint (as an older registry could store): the job fails with the reason
    // when a station reports; the report itself is taken, not answered 503 for ever.
    let job = h
        .alice
        .create_job(&NewJob {
            statement: None,
            stations: vec!["st1".into()],
            ..job_with(plan(2, 1, Strategy::FedAvg))
        })
        .await
        .unwrap();
    sqlx::query("UPDATE checkpoints SET weights = $1 WHERE job = $2")
        .bind(&b"not weights"[..])
        .bind(&job.id)
        .execute(&h.db.pool)
        .await
        .unwrap();
    let work = h.st1.work(0).await.unwrap();
    let item = work
        .iter()
        .find(|w| w.job.as_ref().is_some_and(|j| j.job == job.id))
        .unwrap();
    h.st1
        .report(&item.run, RunState::Running, None)
        .await
        .unwrap();
    h.st1
        .result_with_update(&item.run, Vec::new(), Some(&update(&[1.0], 1)))
        .await
        .unwrap();
    let j = h.alice.job(&job.id).await.unwrap();
    assert_eq!(j.state, JobState::Failed, "{j:?}");
    assert!(
        j.reason.as_deref().unwrap_or_default().contains("damaged"),
        "{j:?}"
    );
    // Expiry is decided when the state changes, not only by the sweep: a result sent after
    // the task expired is refused although the sweep has not run.
    let short = h
        .alice
        .create_task(&NewTask {
            statement: None,
            train: h.train.clone(),
            stations: vec!["st2".into()],
            params: None,
            expires_in_s: Some(2),
        })
        .await
        .unwrap();
    let item = h
        .st2
        .work(0)
        .await
        .unwrap()
        .into_iter()
        .find(|w| w.task == short.id)
        .unwrap();
    h.st2
        .report(&item.run, RunState::Running, None)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(2300)).await;
    refused(
        h,
        h.st2.result(&item.run, Vec::new()).await,
        409,
        "conflict",
    )
    .await;
    assert_eq!(
        h.alice.task(&short.id).await.unwrap().runs[0].state,
        RunState::Expired
    );
    // One error shape everywhere, also for what axum answers itself; each is in the trail.
    let token = alice_token(h).await;
    let auth = vec![("authorization".to_string(), format!("Bearer {token}"))];
    for (method, path, status, code) in [
        ("GET", "/v1/tasks/%FF%FE", 400, "bad_request"),
        ("GET", "/v1/jobs/x/weights?round=1", 404, "not_found"),
        (
            "GET",
            "/v1/station/jobs/x/rounds/notanumber/weights",
            400,
            "bad_request",
        ),
        ("DELETE", "/v1/tasks", 405, "method_not_allowed"),
        ("PATCH", "/v1/health", 405, "method_not_allowed"),
        ("GET", "/v1/nothing-here", 404, "not_found"),
    ] {
        let got = send_raw(h, method, path, &auth, Vec::new()).await;
        assert_eq!(got, (status, code.to_string()), "{method} {path}");
    }
    let trail = h.db.audit_entries().await.unwrap();
    assert!(
        trail
            .iter()
            .any(|e| e.outcome.starts_with("refused 405 method_not_allowed")),
        "405 not in the trail"
    );
    // A creating request retried with its Idempotency-Key creates one task and gets the first
    // answer again; the same key with another request is refused.
    let before = h.alice.tasks().await.unwrap().len();
    let body = serde_json::to_vec(&NewTask {
        statement: None,
        train: h.train.clone(),
        stations: vec!["st1".into()],
        params: None,
        expires_in_s: None,
    })
    .unwrap();
    let client = amicus_registry::client::http(Duration::from_secs(30));
    let mut ids = Vec::new();
    for _ in 0..3 {
        let r = client
            .post(format!("{}/v1/tasks", h.url))
            .bearer_auth(&h.alice_token)
            .header("idempotency-key", "retry-7f3a")
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
        let replayed = r.headers().contains_key("idempotent-replayed");
        let t: TaskInfo = r.json().await.unwrap();
        ids.push((t.id, replayed));
    }
    assert!(ids.iter().all(|(id, _)| *id == ids[0].0), "{ids:?}");
    assert_eq!(
        ids.iter().map(|(_, r)| *r).collect::<Vec<_>>(),
        [false, true, true]
    );
    assert_eq!(h.alice.tasks().await.unwrap().len(), before + 1);
    let r = client
        .post(format!("{}/v1/tasks", h.url))
        .bearer_auth(&h.alice_token)
        .header("idempotency-key", "retry-7f3a")
        .header("content-type", "application/json")
        .body(b"{\"train\": \"other\", \"stations\": [\"st1\"]}".to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 422);
    let r = client
        .post(format!("{}/v1/tasks", h.url))
        .bearer_auth(&h.alice_token)
        .header("idempotency-key", "bad key with spaces")
        .header("content-type", "application/json")
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
}

/// The public chain's lines and head of the station log in `dir`.
fn public_chain(dir: &std::path::Path) -> (Vec<String>, String) {
    let text = std::fs::read_to_string(dir.join("audit-public.log")).unwrap();
    let head = std::fs::read_to_string(dir.join("audit-public.head")).unwrap();
    (text.lines().map(str::to_string).collect(), head)
}

fn approved(i: u8) -> amicus_runtime::audit::Event {
    amicus_runtime::audit::Event::DigestApproved {
        digest: amicus_bundle::sha256(&[i]),
        train: None,
        scope: None,
        params_sha256: None,
    }
}

/// A station log in a new directory, signed by `key`, with one entry, then `handover`.
fn log_handing_over(
    key: &SecretKey,
    handover: amicus_runtime::audit::Event,
) -> (tempfile::TempDir, Vec<String>) {
    let dir = tempfile::tempdir().unwrap();
    let log = amicus_runtime::audit::AuditLog::new(dir.path(), key.clone());
    log.create().unwrap();
    log.append(approved(1)).unwrap();
    log.append(handover).unwrap();
    let (lines, _) = public_chain(dir.path());
    (dir, lines)
}

async fn station_key_rotation(h: &Harness) {
    use amicus_runtime::audit::{AuditLog, Event, rekey_message};
    let b64 = |b: &[u8]| B64.encode(b);
    // A station of its own whose log the runtime writes and rotates.
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("station.key");
    let old = SecretKey::generate().unwrap();
    old.write_pair(&key_file).unwrap();
    h.admin
        .add_station(&NewStation {
            name: "rot".into(),
            public_key: old.public().to_pem(),
        })
        .await
        .unwrap();
    let as_old = StationClient::new(&h.url, old.clone()).unwrap();
    // Hostile hand-overs, each signed by the station's current key, are refused whole: one
    // whose "new key" never agreed (the proof is someone else's), and one to a key another
    // station holds (st2's, proof and all).
    let stranger = SecretKey::generate().unwrap();
    let (_d1, unproven) = log_handing_over(
        &old,
        Event::StationKeyRotated {
            old_key: old.public().to_pem(),
            new_key: h.st2_key.public().to_pem(),
            proof: b64(&stranger.sign(&rekey_message(&old.public(), &h.st2_key.public()))),
        },
    );
    refused(
        h,
        as_old.upload_audit(unproven, None).await,
        400,
        "bad_audit",
    )
    .await;
    let (_d2, to_st2) = log_handing_over(
        &old,
        Event::StationKeyRotated {
            old_key: old.public().to_pem(),
            new_key: h.st2_key.public().to_pem(),
            proof: b64(&h
                .st2_key
                .sign(&rekey_message(&old.public(), &h.st2_key.public()))),
        },
    );
    match as_old.upload_audit(to_st2, None).await {
        Err(ClientError::Api {
            status: 409, code, ..
        }) => assert_eq!(code, "key_taken"),
        other => panic!("expected 409 key_taken, got {other:?}"),
    }
    assert_eq!(as_old.audit_next().await.unwrap(), 0, "nothing was stored");

    // The real rotation.
    let log = AuditLog::for_station(dir.path(), &key_file);
    log.create().unwrap();
    log.append(approved(2)).unwrap();
    let rotated = amicus_runtime::rekey::rotate(&log, &key_file, true).unwrap();
    log.append(approved(3)).unwrap();
    let new = SecretKey::read(&key_file).unwrap();
    assert_eq!(new.public(), rotated.new);
    let as_new = StationClient::new(&h.url, new.clone()).unwrap();
    // Until the registry's copy has the hand-over, it does not know the new key.
    refused(h, as_new.audit_next().await, 401, "unknown_station").await;
    let (lines, head) = public_chain(dir.path());
    assert_eq!(lines.len(), 3);
    // The old key uploads through the hand-over (and the new key's entry after it).
    assert_eq!(
        as_old
            .upload_audit(lines.clone(), Some(head))
            .await
            .unwrap(),
        3
    );
    refused(h, as_old.audit_next().await, 401, "unknown_station").await;
    assert_eq!(as_new.audit_next().await.unwrap(), 3);
    let listed = h.admin.stations().await.unwrap();
    let rot = listed.iter().find(|s| s.name == "rot").unwrap();
    assert_eq!(rot.key_id, new.public().id().to_string());
    assert_eq!(rot.retired_keys.len(), 1);
    assert_eq!(rot.retired_keys[0].key_id, old.public().id().to_string());
    let trail = h.db.audit_entries().await.unwrap();
    assert!(
        trail
            .iter()
            .any(|e| e.action == "station-key-rotated" && e.target == "rot"),
        "the rotation is in the registry's trail"
    );
    // A retired key is never taken again, by this station or another.
    refused(
        h,
        h.admin
            .add_station(&NewStation {
                name: "rot-again".into(),
                public_key: old.public().to_pem(),
            })
            .await,
        409,
        "conflict",
    )
    .await;
    // An upload checked with the key the station had when it was authenticated is not
    // stored once the key has moved on (an upload racing the hand-over).
    let (tip, last) = h.db.station_audit_tip("rot").await.unwrap();
    let stale = vec![(tip, "{}".to_string(), last.unwrap())];
    assert!(
        !h.db
            .append_station_audit("rot", &old.public().id().to_string(), &stale, None, None)
            .await
            .unwrap()
    );
    // Handing the key back and forth within one upload (K1 -> K2 -> K1) is refused, not a 5xx.
    let k2 = SecretKey::generate().unwrap();
    for (from, to) in [(&new, &k2), (&k2, &new)] {
        AuditLog::new(dir.path(), from.clone())
            .append(Event::StationKeyRotated {
                old_key: from.public().to_pem(),
                new_key: to.public().to_pem(),
                proof: b64(&to.sign(&rekey_message(&from.public(), &to.public()))),
            })
            .unwrap();
    }
    let (lines, _) = public_chain(dir.path());
    match as_new.upload_audit(lines[3..].to_vec(), None).await {
        Err(ClientError::Api {
            status: 409, code, ..
        }) => assert_eq!(code, "key_taken"),
        other => panic!("expected 409 key_taken, got {other:?}"),
    }
    assert_eq!(as_new.audit_next().await.unwrap(), 3, "nothing was stored");
    // The auditor verifies the copy pinned to the old key or to the new one.
    let copy = h.auditor.station_audit("rot").await.unwrap();
    let raw: Vec<&[u8]> = copy.lines.iter().map(|l| l.as_bytes()).collect();
    for pinned in [old.public(), new.public()] {
        let report = amicus_runtime::audit::verify_lines(
            &raw,
            amicus_runtime::audit::HeadFile::Bytes(copy.head.clone().unwrap().into_bytes()),
            &pinned,
            amicus_runtime::audit::PUBLIC,
        );
        assert!(report.ok(), "{report:?}");
        assert_eq!(report.keys.len(), 2);
    }
}

async fn suite(db_url: &str) {
    let limits = Limits {
        json_bytes: 64 * 1024,
        ..Limits::default()
    };
    let h = start(db_url, limits).await;
    lifecycle_and_sealed_results(&h).await;
    people_and_scopes(&h).await;
    station_attacks(&h).await;
    oversized_bodies(&h).await;
    audit_copies(&h).await;
    long_poll_and_expiry(&h).await;
    federated_jobs(&h).await;
    secure_aggregation(&h).await;
    equivocating_registry(&h).await;
    robustness(&h).await;
    tokens_and_signed_requests(&h).await;
    pagination(&h).await;
    station_key_rotation(&h).await;
    trail_and_openapi(&h).await;
    // Reconnecting applies no migration twice.
    Db::connect(db_url).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_suite_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("registry.db").display());
    suite(&url).await;
    // Confidentiality at rest: the database files never hold the plaintext marker.
    for f in std::fs::read_dir(dir.path()).unwrap() {
        // SQLite may remove its -wal/-shm files between the listing and the read.
        let Ok(bytes) = std::fs::read(f.unwrap().path()) else {
            continue;
        };
        assert!(!bytes.windows(18).any(|w| w == b"secret-marker-7f3a"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_suite_on_postgres() {
    let Ok(server) = std::env::var("AMICUS_TEST_POSTGRES") else {
        assert!(
            std::env::var("AMICUS_REQUIRE_POSTGRES").is_err(),
            "AMICUS_REQUIRE_POSTGRES is set but AMICUS_TEST_POSTGRES is not"
        );
        eprintln!(
            "SKIPPED: set AMICUS_TEST_POSTGRES=postgres://user:pass@127.0.0.1/postgres to run the suite on PostgreSQL"
        );
        return;
    };
    let name = format!("amicus_test_{}", &amicus_registry::db::random_id()[..12]);
    sqlx::any::install_default_drivers();
    let admin = sqlx::AnyPool::connect(&server)
        .await
        .expect("PostgreSQL server");
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&admin)
        .await
        .unwrap();
    let base = server.rsplit_once('/').unwrap().0;
    let url = format!("{base}/{name}");
    suite(&url).await;
    // Confidentiality at rest: no stored value holds the plaintext marker.
    let db = Db::connect(&url).await.unwrap();
    for sql in [
        "SELECT count(*) FROM results WHERE position('secret-marker-7f3a'::bytea in sealed) > 0",
        "SELECT count(*) FROM trains WHERE position('secret-marker-7f3a'::bytea in bundle) > 0",
        "SELECT count(*) FROM tasks t WHERE t::text LIKE '%secret-marker-7f3a%'",
        "SELECT count(*) FROM runs t WHERE t::text LIKE '%secret-marker-7f3a%'",
        "SELECT count(*) FROM station_audit t WHERE t::text LIKE '%secret-marker-7f3a%'",
        "SELECT count(*) FROM registry_audit t WHERE t::text LIKE '%secret-marker-7f3a%'",
    ] {
        let n: i64 = sqlx::query_scalar(sql).fetch_one(&db.pool).await.unwrap();
        assert_eq!(n, 0, "{sql}");
    }
    db.pool.close().await;
    let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE {name} WITH (FORCE)"
    )))
    .execute(&admin)
    .await;
}
