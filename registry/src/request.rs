//! Trust that does not depend on the registry: what a researcher asks of stations is signed by
//! the researcher, and what a station sends back is signed by the station.
//!
//! **Requests.** A task or a federated job carries a [`RequestStatement`], a DSSE envelope
//! signed with the researcher's Ed25519 key: the train's digest, the SHA-256 of the exact
//! parameters, the stations, the SHA-256 of the key results are sealed to, for a job the
//! SHA-256 of its plan and of its initial weights, an expiry and a nonce. The registry stores
//! and relays it; a station checks it against what the registry delivered
//! ([`check_request`]) with the keys its data owner trusts, before anything runs. A registry
//! that swaps the train, the parameters, the recipient key, the plan (its privacy settings
//! among them) or the first weights, that extends the expiry or replays a request, is caught.
//!
//! **Results.** Each sealed output is signed by the station over the task, run, station, output
//! name and the sealed bytes ([`sign_output`], [`verify_output`]): HPKE base mode lets anyone
//! who knows the researcher's public key seal, so without this a registry could forge results
//! that open correctly.
//!
//! Owns these formats and checks. Must not decide whom to trust (the station's policy and the
//! researcher's pinned keys do) or talk to the network.

use amicus_bundle::dsse::{Envelope, EnvelopeSignature, pae};
use amicus_bundle::{PublicKey, SecretKey, sha256};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The DSSE payload type of a signed request.
pub const REQUEST_TYPE: &str = "application/vnd.amicus.request+json";
/// Largest signed request a station parses.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;
/// Clock difference allowed between a registry's expiry and the request's.
const SKEW_MS: i64 = 5 * 60 * 1000;
const OUTPUT_DOMAIN: &str = "amicus-output-signature-v1\n";

/// What a researcher asks: signed, relayed by the registry, checked by every station.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestStatement {
    /// `task` or `job`.
    pub kind: String,
    /// The researcher's name at the registry (shown to data owners; the key is what counts).
    pub researcher: String,
    /// The train's bundle digest.
    pub train: String,
    /// SHA-256 of the parameters exactly as stations receive them (JSON text).
    pub params_sha256: String,
    pub stations: Vec<String>,
    /// The fingerprint (`RecipientPublicKey::fingerprint`) of the researcher's X25519 public
    /// key results are sealed to.
    pub recipient_key_sha256: String,
    /// Jobs: SHA-256 of the plan (its JSON as [`plan_sha256`] writes it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan_sha256: Option<String>,
    /// Jobs: SHA-256 of the initial global weights (the `amicus_fl::wire` bytes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initial_weights_sha256: Option<String>,
    /// Each named station's key id: a station acts only on runs addressed to the name the
    /// researcher gave its key, and in secure aggregation checks the others' signed key
    /// advertisements against these, not the registry's copy of their keys.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub station_keys: BTreeMap<String, String>,
    /// No station acts on it after this (milliseconds since the epoch).
    pub expires_ms: i64,
    /// Random: one request, one statement (a station refuses one it has acted on).
    pub nonce: String,
}

/// Why a station refuses a request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error(
        "the request is not signed (this station requires requests signed by a researcher it trusts)"
    )]
    Unsigned,
    #[error("the signed request is malformed: {0}")]
    Malformed(String),
    #[error("the request is not signed by a researcher this station trusts")]
    Untrusted,
    #[error("the request was changed on the way: {0}")]
    Mismatch(String),
    #[error("the request expired")]
    Expired,
    #[error("the request was already acted on here (a replay)")]
    Replayed,
}

/// The plan's hash as the statement names it: SHA-256 of its JSON (fields in declaration
/// order, as `serde_json` writes them).
pub fn plan_sha256(plan: &crate::wire::Plan) -> String {
    sha256(&serde_json::to_vec(plan).expect("a plan always serialises")).to_hex()
}

/// A fresh nonce.
pub fn nonce() -> String {
    let mut b = [0u8; 16];
    getrandom::fill(&mut b).expect("operating-system randomness");
    hex::encode(b)
}

/// Sign `statement` with the researcher's key: a DSSE envelope, as JSON text.
pub fn sign_request(key: &SecretKey, statement: &RequestStatement) -> String {
    let payload = serde_json::to_vec(statement).expect("a statement always serialises");
    let sig = key.sign(&pae(REQUEST_TYPE, &payload));
    let env = Envelope {
        payload_type: REQUEST_TYPE.into(),
        payload: B64.encode(&payload),
        signatures: vec![EnvelopeSignature {
            keyid: key.public().id().to_string(),
            sig: B64.encode(sig),
        }],
    };
    String::from_utf8(env.to_json()).expect("JSON is UTF-8")
}

/// A verified request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedRequest {
    pub statement: RequestStatement,
    /// Index in the trusted keys of the key that signed it.
    pub signer: usize,
    /// SHA-256 of the signed payload: the request's identity. The envelope around it can be
    /// re-formatted by anyone; the payload cannot be changed without the signature failing.
    pub payload_sha256: amicus_bundle::Digest,
}

/// The statement in `envelope` and the trusted key that signed it. Nothing in the envelope is
/// believed before a trusted signature verifies.
pub fn verify_request(
    envelope: &str,
    trusted: &[PublicKey],
) -> Result<VerifiedRequest, RequestError> {
    if envelope.len() > MAX_REQUEST_BYTES {
        return Err(RequestError::Malformed("too large".into()));
    }
    let env =
        Envelope::parse(envelope.as_bytes()).map_err(|e| RequestError::Malformed(e.to_string()))?;
    if env.payload_type != REQUEST_TYPE {
        return Err(RequestError::Malformed("not a signed request".into()));
    }
    let signer = env
        .verified_keys(trusted)
        .first()
        .and_then(|id| trusted.iter().position(|k| k.id() == *id))
        .ok_or(RequestError::Untrusted)?;
    let payload = B64
        .decode(&env.payload)
        .map_err(|e| RequestError::Malformed(e.to_string()))?;
    let statement: RequestStatement =
        serde_json::from_slice(&payload).map_err(|e| RequestError::Malformed(e.to_string()))?;
    Ok(VerifiedRequest {
        statement,
        signer,
        payload_sha256: sha256(&payload),
    })
}

/// What the registry delivered with a run, to be compared with the signed statement.
pub struct Delivered<'a> {
    pub station: &'a str,
    pub train: &'a str,
    pub params: &'a str,
    pub recipient_key: &'a str,
    pub expires_ms: i64,
    /// For a round of a job: the plan as delivered.
    pub plan: Option<&'a crate::wire::Plan>,
    pub now_ms: i64,
}

/// Whether `st` asks for exactly what was delivered.
pub fn check_request(st: &RequestStatement, d: &Delivered) -> Result<(), RequestError> {
    let differs = |what: &str| {
        Err(RequestError::Mismatch(format!(
            "{what}: not what the researcher signed"
        )))
    };
    if st.train != d.train {
        return differs("the train");
    }
    if st.params_sha256 != sha256(d.params.as_bytes()).to_hex() {
        return differs("the parameters");
    }
    if !st.stations.iter().any(|s| s == d.station) {
        return Err(RequestError::Mismatch(
            "this station is not one the researcher named".into(),
        ));
    }
    let fingerprint = crate::sealed::RecipientPublicKey::from_pem(d.recipient_key, "recipient")
        .map(|k| k.fingerprint())
        .ok();
    if fingerprint.as_deref() != Some(st.recipient_key_sha256.as_str()) {
        return differs("the key results are sealed to");
    }
    match (st.kind.as_str(), d.plan) {
        ("task", None) if st.plan_sha256.is_none() && st.initial_weights_sha256.is_none() => {}
        ("task", None) => {
            return Err(RequestError::Malformed(
                "a task's request names a plan or weights".into(),
            ));
        }
        ("job", Some(plan)) => {
            if st.plan_sha256.as_deref() != Some(plan_sha256(plan).as_str()) {
                return differs("the job's plan");
            }
        }
        ("job", None) => return differs("the kind of request (a job's, for a plain task)"),
        ("task", Some(_)) => return differs("the kind of request (a task's, for a job round)"),
        (other, _) => return Err(RequestError::Malformed(format!("kind {other:?}"))),
    }
    if d.now_ms > st.expires_ms {
        return Err(RequestError::Expired);
    }
    if d.expires_ms > st.expires_ms.saturating_add(SKEW_MS) {
        return differs("the expiry (later than the researcher's by more than the clock skew)");
    }
    Ok(())
}

/// `round`: the job and round number for a round of a federated job (so a registry cannot
/// show one round's outputs as another's).
fn output_message(
    ctx: &crate::sealed::SealContext,
    round: Option<(&str, u32)>,
    sealed: &[u8],
) -> Vec<u8> {
    let round = match round {
        Some((job, n)) => format!("job {job}\nround {n}"),
        None => "job -\nround -".to_string(),
    };
    format!(
        "{OUTPUT_DOMAIN}task {}\nrun {}\nstation {}\noutput {}\n{round}\nsha256 {}",
        ctx.task,
        ctx.run,
        ctx.station,
        ctx.output,
        sha256(sealed).to_hex()
    )
    .into_bytes()
}

/// The station's signature over one sealed output (base64).
pub fn sign_output(
    key: &SecretKey,
    ctx: &crate::sealed::SealContext,
    round: Option<(&str, u32)>,
    sealed: &[u8],
) -> String {
    B64.encode(key.sign(&output_message(ctx, round, sealed)))
}

/// Whether `signature` is `station_key`'s over this sealed output.
pub fn verify_output(
    station_key: &PublicKey,
    ctx: &crate::sealed::SealContext,
    round: Option<(&str, u32)>,
    sealed: &[u8],
    signature: &str,
) -> bool {
    let Ok(sig) = B64.decode(signature) else {
        return false;
    };
    station_key.verify(&output_message(ctx, round, sealed), &sig)
}

/// What a station signs when it advertises its round keys in a securely aggregated round.
pub fn secagg_keys_message(
    job: &str,
    round: u32,
    id: u32,
    station: &str,
    keys: &crate::wire::SecAggKeys,
) -> Vec<u8> {
    format!(
        "amicus-secagg-keys-v1\njob {job}\nround {round}\nid {id}\nstation {station}\nmask {}\nshare {}\ncommitment {}",
        keys.mask_public, keys.share_public, keys.self_commitment
    )
    .into_bytes()
}

/// What a surviving station signs before it reveals shares: the survivors and dropped of a
/// securely aggregated round as it was shown them.
pub fn secagg_sets_message(job: &str, round: u32, survivors: &[u32], dropped: &[u32]) -> Vec<u8> {
    let list = |v: &[u32]| {
        let mut v = v.to_vec();
        v.sort_unstable();
        v.iter().map(u32::to_string).collect::<Vec<_>>().join(",")
    };
    format!(
        "amicus-secagg-sets-v1\njob {job}\nround {round}\nsurvivors {}\ndropped {}",
        list(survivors),
        list(dropped)
    )
    .into_bytes()
}

/// The registry's names (people, stations, tasks, jobs), and any such name from the network
/// that may become part of a path: 1 to 64 of `A-Z a-z 0-9 . _ -`, not starting with `.` (so
/// never `.`, `..` or a hidden file). Output names follow the manifest's rule
/// (`amicus_bundle::manifest::check_output_name`), which is as safe in a path.
pub fn plain_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && !s.starts_with('.')
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recipient() -> String {
        // One key for the whole test binary, so that statements and deliveries agree.
        static PEM: std::sync::OnceLock<String> = std::sync::OnceLock::new();
        PEM.get_or_init(|| crate::sealed::RecipientKey::generate().public().to_pem())
            .clone()
    }

    fn statement() -> RequestStatement {
        RequestStatement {
            kind: "task".into(),
            researcher: "alice".into(),
            train: "ab".repeat(32),
            params_sha256: sha256(b"{}").to_hex(),
            stations: vec!["st1".into()],
            recipient_key_sha256: crate::sealed::RecipientPublicKey::from_pem(&recipient(), "t")
                .unwrap()
                .fingerprint(),
            plan_sha256: None,
            initial_weights_sha256: None,
            station_keys: BTreeMap::new(),
            expires_ms: 2_000_000,
            nonce: nonce(),
        }
    }

    fn delivered(train: &str) -> Delivered<'_> {
        static PEM: std::sync::OnceLock<String> = std::sync::OnceLock::new();
        Delivered {
            station: "st1",
            train,
            params: "{}",
            recipient_key: PEM.get_or_init(recipient),
            expires_ms: 1_500_000,
            plan: None,
            now_ms: 1_000_000,
        }
    }

    const OTHER_PEM: &str = "-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VuAyEAMzMzMzMzMzMzMzMzMzMzMzMzMzMzMzMzMzMzMzMzMzM=\n-----END PUBLIC KEY-----\n";

    #[test]
    fn a_signed_request_verifies_only_with_a_trusted_key_and_only_unchanged() {
        let alice = SecretKey::generate().unwrap();
        let mallory = SecretKey::generate().unwrap();
        let env = sign_request(&alice, &statement());
        let v = verify_request(&env, &[mallory.public(), alice.public()]).unwrap();
        assert_eq!(v.signer, 1);
        let st = v.statement;
        // Re-formatting the envelope does not change the request's identity.
        let mut e: Envelope = serde_json::from_str(&env).unwrap();
        e.signatures.push(EnvelopeSignature {
            keyid: "x".into(),
            sig: "AAAA".into(),
        });
        let reformatted = String::from_utf8(e.to_json()).unwrap();
        let again = verify_request(&reformatted, &[alice.public()]).unwrap();
        assert_ne!(reformatted, env);
        assert_eq!(again.payload_sha256, v.payload_sha256);
        let train = "ab".repeat(32);
        check_request(&st, &delivered(&train)).unwrap();
        assert_eq!(
            verify_request(&env, &[mallory.public()]),
            Err(RequestError::Untrusted)
        );
        // The registry edits the payload: the signature no longer verifies.
        let mut e: Envelope = serde_json::from_str(&env).unwrap();
        let mut other = statement();
        other.params_sha256 = sha256(b"{\"patient\": 7}").to_hex();
        e.payload = B64.encode(serde_json::to_vec(&other).unwrap());
        let forged = String::from_utf8(e.to_json()).unwrap();
        assert_eq!(
            verify_request(&forged, &[alice.public()]),
            Err(RequestError::Untrusted)
        );
        // A statement for other things than were delivered.
        let other_train = "cd".repeat(32);
        assert!(matches!(
            check_request(&st, &delivered(&other_train)),
            Err(RequestError::Mismatch(_))
        ));
        for edit in [
            |d: &mut Delivered| d.params = "{\"patient\": 7}",
            |d: &mut Delivered| d.station = "st9",
            |d: &mut Delivered| d.recipient_key = OTHER_PEM,
            |d: &mut Delivered| d.expires_ms = 9_000_000,
        ] {
            let mut d = delivered(&train);
            edit(&mut d);
            assert!(matches!(
                check_request(&st, &d),
                Err(RequestError::Mismatch(_))
            ));
        }
        let mut late = delivered(&train);
        late.now_ms = 3_000_000;
        assert_eq!(check_request(&st, &late), Err(RequestError::Expired));
    }

    #[test]
    fn outputs_are_bound_to_their_run_and_bytes() {
        let st = SecretKey::generate().unwrap();
        let ctx = crate::sealed::SealContext {
            task: "t",
            run: "r",
            station: "st1",
            output: "summary.json",
        };
        let sig = sign_output(&st, &ctx, None, b"sealed");
        assert!(verify_output(&st.public(), &ctx, None, b"sealed", &sig));
        assert!(!verify_output(&st.public(), &ctx, None, b"forged", &sig));
        let other = crate::sealed::SealContext {
            output: "other.json",
            ..ctx
        };
        assert!(!verify_output(&st.public(), &other, None, b"sealed", &sig));
        let mallory = SecretKey::generate().unwrap();
        assert!(!verify_output(
            &mallory.public(),
            &ctx,
            None,
            b"sealed",
            &sig
        ));
        assert!(!verify_output(
            &st.public(),
            &ctx,
            None,
            b"sealed",
            "not base64!"
        ));
        // A round's output is that round's: not another round's, not a plain task's.
        let r2 = sign_output(&st, &ctx, Some(("j", 2)), b"sealed");
        assert!(verify_output(
            &st.public(),
            &ctx,
            Some(("j", 2)),
            b"sealed",
            &r2
        ));
        assert!(!verify_output(
            &st.public(),
            &ctx,
            Some(("j", 1)),
            b"sealed",
            &r2
        ));
        assert!(!verify_output(
            &st.public(),
            &ctx,
            Some(("k", 2)),
            b"sealed",
            &r2
        ));
        assert!(!verify_output(&st.public(), &ctx, None, b"sealed", &r2));
    }

    #[test]
    fn names_from_the_network_never_leave_their_folder() {
        for ok in ["st1", "summary.json", "A-b_c.d"] {
            assert!(plain_name(ok), "{ok}");
        }
        for bad in [
            "",
            ".",
            "..",
            "../x",
            "/etc",
            ".hidden",
            "a/b",
            "a\\b",
            "é",
            &"a".repeat(65),
        ] {
            assert!(!plain_name(bad), "{bad:?}");
        }
    }
}
