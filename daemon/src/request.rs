//! The station daemon's check of what the registry delivers against the researcher's signed
//! request (`amicus_registry::request`), before anything is fetched into a run.
//!
//! Owns the replay markers (`<station>/registry/requests/`): a statement is bound to the first
//! task or job it arrived with, and each of its rounds to the first registry run that carried
//! it, so a registry cannot make a station act twice on one request. Must not decide whom to
//! trust (the station's policy lists the researchers) nor run, audit or report anything: the
//! daemon does, with what this returns.

use amicus_bundle::{Digest, TrustedKey};
use amicus_registry::request::{self, Delivered, RequestError, RequestStatement};
use amicus_registry::wire::{RoundWork, WorkItem};
use std::path::Path;

/// Folder (under the daemon's directory) of replay markers.
pub const REQUESTS_DIR: &str = "requests";

/// A request that verified, for the audit log.
#[derive(Debug, Clone)]
pub struct Verified {
    pub statement: RequestStatement,
    /// The data owner's name for the researcher's key.
    pub researcher: String,
    pub keyid: String,
    /// SHA-256 of the signed payload: the request's identity.
    pub statement_sha256: Digest,
    /// False when this run's request was verified before (the daemon processes a run again
    /// after the data owner's approval).
    pub first_time: bool,
}

/// What [`admit`] decided.
#[derive(Debug)]
pub enum Admitted {
    /// The station does not require signed requests and none came.
    Unsigned,
    /// Signed by a trusted researcher and asks for exactly what was delivered. For a round of a
    /// job, `round` is rebuilt from the verified plan (nothing the registry derived is used).
    Verified {
        verified: Box<Verified>,
        round: Option<Box<RoundWork>>,
    },
}

/// Check `item` against its signed request. `daemon_dir` holds the replay markers; `my_keys`
/// are this station's key ids (its identity, whatever the registry calls it: the current key
/// and any it rotated away from, so a request made before a rotation still finds it);
/// `trusted` are the
/// researchers the station's policy trusts; `required` is the policy's
/// `require_signed_requests`.
pub fn admit(
    daemon_dir: &Path,
    my_keys: &[String],
    trusted: &[TrustedKey],
    required: bool,
    item: &WorkItem,
    now_ms: i64,
) -> Result<Admitted, RequestError> {
    let bad = |what: &str| RequestError::Malformed(format!("{what} is not a plain name"));
    if !request::plain_name(&item.task) {
        return Err(bad("the task id"));
    }
    if !request::plain_name(&item.station) {
        return Err(bad("the station name"));
    }
    if let Some(j) = &item.job
        && !request::plain_name(&j.job)
    {
        return Err(bad("the job id"));
    }
    let Some(envelope) = &item.statement else {
        return if required {
            Err(RequestError::Unsigned)
        } else {
            Ok(Admitted::Unsigned)
        };
    };
    let keys: Vec<_> = trusted.iter().map(|t| t.key).collect();
    let request::VerifiedRequest {
        statement,
        signer,
        payload_sha256: statement_sha256,
    } = match request::verify_request(envelope, &keys) {
        Ok(v) => v,
        Err(_) if !required => return Ok(Admitted::Unsigned),
        Err(e) => return Err(e),
    };
    // The researcher named each station by its key: a run the registry addresses to a station
    // name must be for the station holding that key, or a request signed for another station
    // would run on this one's data.
    match statement.station_keys.get(&item.station) {
        Some(id) if my_keys.contains(id) => {}
        Some(_) => {
            return Err(RequestError::Mismatch(format!(
                "the run is for station {}, which the researcher named by another key than this station's",
                amicus_bundle::text::shown(&item.station, 64)
            )));
        }
        None => {
            return Err(RequestError::Mismatch(format!(
                "the request names no key for station {}",
                amicus_bundle::text::shown(&item.station, 64)
            )));
        }
    }
    let plan = match &item.job {
        None => None,
        Some(j) => Some(j.plan.as_ref().ok_or_else(|| {
            RequestError::Mismatch("the round came without its job's plan".into())
        })?),
    };
    request::check_request(
        &statement,
        &Delivered {
            station: &item.station,
            train: &item.train,
            params: &item.params,
            recipient_key: &item.recipient_key,
            expires_ms: item.expires_ms,
            plan,
            now_ms,
        },
    )?;
    let round = match (&item.job, plan) {
        (Some(j), Some(plan)) => {
            let last = plan.rounds.saturating_add(u32::from(plan.evaluate_final));
            if j.round == 0 || j.round > last {
                return Err(RequestError::Mismatch(format!(
                    "round {} of a job of {last} round(s)",
                    j.round
                )));
            }
            Some(Box::new(RoundWork::from_plan(
                j.job.clone(),
                j.round,
                plan.clone(),
            )))
        }
        _ => None,
    };
    // One request, one task or job; one round, one registry run. Keyed by the signed payload,
    // which no re-formatting of the envelope changes.
    let dir = daemon_dir.join(REQUESTS_DIR);
    let owner = match &item.job {
        Some(j) => format!("job {}", j.job),
        None => format!("task {}", item.task),
    };
    let hex = statement_sha256.to_hex();
    bind(&dir.join(format!("{hex}.owner")), &owner)?;
    let n = item.job.as_ref().map_or(0, |j| j.round);
    let first_time = bind(&dir.join(format!("{hex}-{n}.run")), &item.run)?;
    let trusted_key = &trusted[signer];
    Ok(Admitted::Verified {
        verified: Box::new(Verified {
            statement,
            researcher: trusted_key.name.clone(),
            keyid: trusted_key.key.id().to_string(),
            statement_sha256,
            first_time,
        }),
        round,
    })
}

/// Record that the marker at `path` belongs to `value`; refuse when it belongs to another.
/// Returns whether the marker is new.
fn bind(path: &Path, value: &str) -> Result<bool, RequestError> {
    let io = |e: std::io::Error| RequestError::Malformed(format!("replay marker: {e}"));
    match std::fs::read_to_string(path) {
        Ok(v) if v == value => Ok(false),
        Ok(_) => Err(RequestError::Replayed),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).map_err(io)?;
            }
            amicus_bundle::bundle::write_atomic(path, value.as_bytes()).map_err(io)?;
            Ok(true)
        }
        Err(e) => Err(io(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use amicus_bundle::{SecretKey, sha256};
    use amicus_registry::request::{nonce, sign_request};
    use amicus_registry::wire::{Encoding, Plan};

    fn plan() -> Plan {
        serde_json::from_value(serde_json::json!({"rounds": 2, "evaluate_final": true})).unwrap()
    }

    fn setup(job: bool) -> (SecretKey, WorkItem) {
        setup_naming(job, "key-of-st1")
    }

    /// A request that names st1 by `st1_key`.
    fn setup_naming(job: bool, st1_key: &str) -> (SecretKey, WorkItem) {
        let alice = SecretKey::generate().unwrap();
        let train = "ab".repeat(32);
        let params = "{\"epochs\":1}".to_string();
        let recipient = amicus_registry::sealed::RecipientKey::generate()
            .public()
            .to_pem();
        let st = RequestStatement {
            kind: if job { "job" } else { "task" }.into(),
            researcher: "alice".into(),
            train: train.clone(),
            params_sha256: sha256(params.as_bytes()).to_hex(),
            stations: vec!["st1".into(), "st2".into()],
            recipient_key_sha256: amicus_registry::sealed::RecipientPublicKey::from_pem(
                &recipient, "t",
            )
            .unwrap()
            .fingerprint(),
            plan_sha256: job.then(|| request::plan_sha256(&plan())),
            initial_weights_sha256: None,
            station_keys: [("st1", st1_key), ("st2", "key-of-st2")]
                .iter()
                .map(|(n, k)| (n.to_string(), k.to_string()))
                .collect(),
            expires_ms: 10_000,
            nonce: nonce(),
        };
        let item = WorkItem {
            run: "0".repeat(32),
            task: "t1".into(),
            station: "st1".into(),
            state: amicus_registry::wire::RunState::Delivered,
            train,
            params,
            recipient_key: recipient,
            expires_ms: 9_000,
            job: job.then(|| RoundWork::from_plan("j1".into(), 1, plan())),
            statement: Some(sign_request(&alice, &st)),
        };
        (alice, item)
    }

    fn trusted(k: &SecretKey) -> Vec<TrustedKey> {
        vec![TrustedKey {
            name: "Alice".into(),
            key: k.public(),
        }]
    }

    /// `admit` at station st1 (key id `key-of-st1`) trusting `researcher`.
    fn at(
        dir: &tempfile::TempDir,
        researcher: &SecretKey,
        required: bool,
        item: &WorkItem,
        now_ms: i64,
    ) -> Result<Admitted, RequestError> {
        admit(
            dir.path(),
            &["key-of-st1".to_string(), "retired-key-of-st1".to_string()],
            &trusted(researcher),
            required,
            item,
            now_ms,
        )
    }

    #[test]
    fn a_request_made_before_the_station_rotated_its_key_still_finds_it() {
        let dir = tempfile::tempdir().unwrap();
        let (alice, item) = setup_naming(false, "retired-key-of-st1");
        assert!(matches!(
            at(&dir, &alice, true, &item, 1_000),
            Ok(Admitted::Verified { .. })
        ));
        // A key this station never held is another station.
        let (alice, item) = setup_naming(false, "key-of-someone-else");
        assert!(matches!(
            at(&dir, &alice, true, &item, 1_000),
            Err(RequestError::Mismatch(_))
        ));
    }

    #[test]
    fn a_round_is_rebuilt_from_the_signed_plan_and_acted_on_once() {
        let dir = tempfile::tempdir().unwrap();
        let (alice, mut item) = setup(true);
        // The registry's derived fields lie (no DP, other encoding): the plan decides.
        if let Some(j) = item.job.as_mut() {
            j.encoding = Encoding::Q8;
            j.proximal_mu = 5.0;
        }
        let Admitted::Verified { verified, round } = at(&dir, &alice, true, &item, 1_000).unwrap()
        else {
            panic!("verified")
        };
        assert!(verified.first_time);
        assert_eq!(verified.researcher, "Alice");
        let round = round.unwrap();
        assert_eq!(round.proximal_mu, 0.0);
        assert_eq!(round.encoding, plan().encoding);
        // The same run again (after approval): fine, not new.
        let Admitted::Verified { verified, .. } = at(&dir, &alice, true, &item, 1_000).unwrap()
        else {
            panic!()
        };
        assert!(!verified.first_time);
        // The same request re-formatted (another envelope, same signed payload) under
        // another registry run: still a replay.
        let mut reformatted = item.clone();
        reformatted.run = "4".repeat(32);
        let mut env: amicus_bundle::dsse::Envelope =
            serde_json::from_str(item.statement.as_deref().unwrap()).unwrap();
        env.signatures.push(amicus_bundle::dsse::EnvelopeSignature {
            keyid: "padding".into(),
            sig: "AAAA".into(),
        });
        reformatted.statement = Some(String::from_utf8(env.to_json()).unwrap());
        assert_ne!(reformatted.statement, item.statement);
        assert!(matches!(
            at(&dir, &alice, true, &reformatted, 1_000),
            Err(RequestError::Replayed)
        ));
        // A run the registry addressed to st2 (also named in the request, by another key) is
        // not this station's, whatever the registry says; nor one for a name not keyed.
        let mut elsewhere = item.clone();
        elsewhere.station = "st2".into();
        assert!(matches!(
            at(&dir, &alice, true, &elsewhere, 1_000),
            Err(RequestError::Mismatch(_))
        ));
        elsewhere.station = "st9".into();
        assert!(matches!(
            at(&dir, &alice, true, &elsewhere, 1_000),
            Err(RequestError::Mismatch(_))
        ));
        // Round 1 again under another registry run: a replay.
        let mut again = item.clone();
        again.run = "1".repeat(32);
        assert!(matches!(
            at(&dir, &alice, true, &again, 1_000),
            Err(RequestError::Replayed)
        ));
        // The same statement for another job: a replay.
        let mut other = item.clone();
        other.run = "2".repeat(32);
        if let Some(j) = other.job.as_mut() {
            j.job = "j2".into();
            j.round = 2;
        }
        assert!(matches!(
            at(&dir, &alice, true, &other, 1_000),
            Err(RequestError::Replayed)
        ));
        // Round 4 of a 2-round job with evaluation: out of the plan.
        let mut late = item.clone();
        late.run = "3".repeat(32);
        if let Some(j) = late.job.as_mut() {
            j.round = 4;
        }
        assert!(matches!(
            at(&dir, &alice, true, &late, 1_000),
            Err(RequestError::Mismatch(_))
        ));
    }

    #[test]
    fn unsigned_untrusted_or_changed_requests_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (alice, item) = setup(false);
        let mallory = SecretKey::generate().unwrap();
        let mut unsigned = item.clone();
        unsigned.statement = None;
        assert!(matches!(
            at(&dir, &alice, true, &unsigned, 1_000),
            Err(RequestError::Unsigned)
        ));
        assert!(matches!(
            at(&dir, &alice, false, &unsigned, 1_000),
            Ok(Admitted::Unsigned)
        ));
        assert!(matches!(
            at(&dir, &mallory, true, &item, 1_000),
            Err(RequestError::Untrusted)
        ));
        let mut swapped = item.clone();
        swapped.recipient_key = amicus_registry::sealed::RecipientKey::generate()
            .public()
            .to_pem();
        assert!(matches!(
            at(&dir, &alice, true, &swapped, 1_000),
            Err(RequestError::Mismatch(_))
        ));
        let mut hostile = item.clone();
        hostile.task = "../../x".into();
        assert!(matches!(
            at(&dir, &alice, true, &hostile, 1_000),
            Err(RequestError::Malformed(_))
        ));
        // A task's statement delivered as a job round.
        let mut as_job = item.clone();
        as_job.job = Some(RoundWork::from_plan("j1".into(), 1, plan()));
        assert!(matches!(
            at(&dir, &alice, true, &as_job, 1_000),
            Err(RequestError::Mismatch(_))
        ));
        assert!(matches!(
            at(&dir, &alice, true, &item, 20_000),
            Err(RequestError::Expired)
        ));
    }
}
