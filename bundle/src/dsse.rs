//! Signatures over a bundle digest, as DSSE envelopes (Dead Simple Signing Envelope, v1)
//! carrying an in-toto Statement v1 whose single subject is the bundle digest.
//!
//! This is the convention Sigstore/cosign and in-toto use for attestations, so signatures can
//! be inspected with standard tooling. The signed bytes are DSSE's pre-authentication encoding
//! `PAE(payloadType, payload)`; the Ed25519 key is named by its [`KeyId`] in `keyid`.

use crate::digest::Digest;
use crate::keys::{KeyId, PublicKey, SecretKey};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

pub const PAYLOAD_TYPE: &str = "application/vnd.in-toto+json";
pub const STATEMENT_TYPE: &str = "https://in-toto.io/Statement/v1";
/// What an amicus signature asserts: "I vouch for this train bundle in this role".
pub const PREDICATE_TYPE: &str = "urn:amicus:train-signature:v1";

/// Largest envelope we parse.
pub const MAX_ENVELOPE_BYTES: usize = 64 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Envelope {
    pub payload_type: String,
    /// Base64 of the payload bytes.
    pub payload: String,
    pub signatures: Vec<EnvelopeSignature>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnvelopeSignature {
    pub keyid: String,
    /// Base64 of the 64-byte Ed25519 signature.
    pub sig: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Statement {
    #[serde(rename = "_type")]
    pub type_: String,
    pub subject: Vec<Subject>,
    pub predicate_type: String,
    pub predicate: Predicate,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Subject {
    pub name: String,
    pub digest: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Predicate {
    /// What the signer vouches as, e.g. "author" or "reviewer".
    pub role: String,
}

/// DSSE v1 pre-authentication encoding.
pub fn pae(payload_type: &str, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + payload_type.len() + 32);
    out.extend_from_slice(b"DSSEv1 ");
    out.extend_from_slice(payload_type.len().to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(payload_type.as_bytes());
    out.push(b' ');
    out.extend_from_slice(payload.len().to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(payload);
    out
}

/// Sign `digest` (the bundle of train `subject_name`) in `role`.
pub fn sign(key: &SecretKey, digest: &Digest, subject_name: &str, role: &str) -> Envelope {
    let statement = Statement {
        type_: STATEMENT_TYPE.into(),
        subject: vec![Subject {
            name: subject_name.into(),
            digest: BTreeMap::from([("sha256".to_string(), digest.to_hex())]),
        }],
        predicate_type: PREDICATE_TYPE.into(),
        predicate: Predicate { role: role.into() },
    };
    let payload = serde_json::to_vec(&statement).expect("a statement always serialises");
    let sig = key.sign(&pae(PAYLOAD_TYPE, &payload));
    Envelope {
        payload_type: PAYLOAD_TYPE.into(),
        payload: B64.encode(&payload),
        signatures: vec![EnvelopeSignature {
            keyid: key.public().id().to_string(),
            sig: B64.encode(sig),
        }],
    }
}

/// Why an envelope does not vouch for a bundle.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    #[error("envelope is not valid DSSE JSON: {0}")]
    Malformed(String),
    #[error("payload type {0:?} is not {PAYLOAD_TYPE:?}")]
    PayloadType(String),
    #[error("statement is not an amicus train signature: {0}")]
    Statement(String),
    #[error("signature is for bundle {signed}, not this bundle {actual}")]
    OtherBundle { signed: String, actual: Digest },
}

impl Envelope {
    pub fn parse(bytes: &[u8]) -> Result<Envelope, EnvelopeError> {
        if bytes.len() > MAX_ENVELOPE_BYTES {
            return Err(EnvelopeError::Malformed("too large".into()));
        }
        serde_json::from_slice(bytes).map_err(|e| EnvelopeError::Malformed(e.to_string()))
    }

    pub fn to_json(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec_pretty(self).expect("an envelope always serialises");
        v.push(b'\n');
        v
    }

    /// Decode the statement and check it names `digest`. Returns the signer role.
    pub fn statement_for(&self, digest: &Digest) -> Result<Statement, EnvelopeError> {
        if self.payload_type != PAYLOAD_TYPE {
            return Err(EnvelopeError::PayloadType(self.payload_type.clone()));
        }
        let payload = B64
            .decode(&self.payload)
            .map_err(|e| EnvelopeError::Malformed(format!("payload: {e}")))?;
        let st: Statement = serde_json::from_slice(&payload)
            .map_err(|e| EnvelopeError::Statement(e.to_string()))?;
        if st.type_ != STATEMENT_TYPE || st.predicate_type != PREDICATE_TYPE {
            return Err(EnvelopeError::Statement(format!(
                "type {:?} / predicate {:?}",
                st.type_, st.predicate_type
            )));
        }
        let [subject] = st.subject.as_slice() else {
            return Err(EnvelopeError::Statement(
                "expected exactly one subject".into(),
            ));
        };
        let signed = subject.digest.get("sha256").cloned().unwrap_or_default();
        if signed != digest.to_hex() {
            return Err(EnvelopeError::OtherBundle {
                signed,
                actual: *digest,
            });
        }
        Ok(st)
    }

    /// Key ids whose signature in this envelope verifies with the matching key in `keys`.
    /// Signatures by keys not in `keys` are ignored (they prove nothing to this verifier).
    pub fn verified_keys(&self, keys: &[PublicKey]) -> Vec<KeyId> {
        let Ok(payload) = B64.decode(&self.payload) else {
            return Vec::new();
        };
        let message = pae(&self.payload_type, &payload);
        let mut out = Vec::new();
        for s in &self.signatures {
            let Some(key) = keys.iter().find(|k| k.id().to_string() == s.keyid) else {
                continue;
            };
            let Ok(sig) = B64.decode(&s.sig) else {
                continue;
            };
            if key.verify(&message, &sig) && !out.contains(&key.id()) {
                out.push(key.id());
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::digest::sha256;

    #[test]
    fn pae_matches_the_dsse_spec_example() {
        // Example from the DSSE v1 protocol description.
        assert_eq!(
            pae("http://example.com/HelloWorld", b"hello world"),
            b"DSSEv1 29 http://example.com/HelloWorld 11 hello world".to_vec()
        );
    }

    #[test]
    fn sign_and_verify() {
        let key = SecretKey::generate().unwrap();
        let d = sha256(b"bundle");
        let env = sign(&key, &d, "t@1", "author");
        let env = Envelope::parse(&env.to_json()).unwrap();
        assert_eq!(env.statement_for(&d).unwrap().predicate.role, "author");
        assert_eq!(env.verified_keys(&[key.public()]), vec![key.public().id()]);
        let other = SecretKey::generate().unwrap();
        assert!(env.verified_keys(&[other.public()]).is_empty());
        assert!(matches!(
            env.statement_for(&sha256(b"other")),
            Err(EnvelopeError::OtherBundle { .. })
        ));
    }

    #[test]
    fn tampered_payload_fails() {
        let key = SecretKey::generate().unwrap();
        let d = sha256(b"bundle");
        let mut env = sign(&key, &d, "t@1", "author");
        let mut payload = B64.decode(&env.payload).unwrap();
        let pos = payload.len() - 5;
        payload[pos] ^= 1;
        env.payload = B64.encode(payload);
        assert!(env.verified_keys(&[key.public()]).is_empty());
    }
}
