//! Signed station requests: HTTP Message Signatures (RFC 9421) with Ed25519, over the request's
//! method, authority, path, query and body (through `Content-Digest`, RFC 9530).
//!
//! Owns the signature base, the two headers and their strict parsing. Must not know about the
//! database: replay protection (the nonce seen before) and key lookup are the server's.
//!
//! Every station request carries
//! ```text
//! Content-Digest: sha-256=:<base64 SHA-256 of the body>:
//! Signature-Input: amicus=("@method" "@authority" "@path" "@query" "content-digest");created=<unix s>;nonce="<random>";keyid="<station key id>";alg="ed25519"
//! Signature: amicus=:<base64 Ed25519 signature over the signature base>:
//! ```
//! The verifier accepts exactly this component list, in this order, and nothing else: a request
//! signed over fewer components would let a replay change what the signature does not cover.

use amicus_bundle::{PublicKey, SecretKey};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use sha2::{Digest as _, Sha256};

/// The signature label this protocol uses in both headers.
pub const LABEL: &str = "amicus";
/// Covered components, in order.
pub const COMPONENTS: &str = r#"("@method" "@authority" "@path" "@query" "content-digest")"#;
/// How far a request's `created` may be from the verifier's clock, in seconds.
pub const MAX_SKEW_S: i64 = 300;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("the request is not signed (no {0} header)")]
    Missing(&'static str),
    #[error("malformed {0} header")]
    Malformed(&'static str),
    #[error("Content-Digest does not match the body")]
    DigestMismatch,
    #[error("the signature was created {0} s from the registry's clock (allowed: {MAX_SKEW_S} s)")]
    Stale(i64),
    #[error("the signature does not verify with the station's key")]
    BadSignature,
}

/// What a request's signature says about itself, before the key is known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignatureParams {
    pub created: i64,
    pub nonce: String,
    pub keyid: String,
}

/// The parts of a request the signature covers.
pub struct RequestParts<'a> {
    pub method: &'a str,
    /// `host[:port]` as the client addressed the server (the `Host` header).
    pub authority: &'a str,
    pub path: &'a str,
    /// The query string without `?` (empty when there is none).
    pub query: &'a str,
    pub body: &'a [u8],
}

/// `sha-256=:…:` for a body (RFC 9530).
pub fn content_digest(body: &[u8]) -> String {
    format!("sha-256=:{}:", B64.encode(Sha256::digest(body)))
}

fn params_value(p: &SignatureParams) -> String {
    format!(
        "{COMPONENTS};created={};nonce=\"{}\";keyid=\"{}\";alg=\"ed25519\"",
        p.created, p.nonce, p.keyid
    )
}

/// The signature base of RFC 9421 section 2.5 for our fixed component list.
fn signature_base(req: &RequestParts, digest: &str, params: &str) -> String {
    format!(
        "\"@method\": {}\n\"@authority\": {}\n\"@path\": {}\n\"@query\": ?{}\n\"content-digest\": {}\n\"@signature-params\": {}",
        req.method.to_ascii_uppercase(),
        req.authority.to_ascii_lowercase(),
        req.path,
        req.query,
        digest,
        params
    )
}

/// The three headers (name, value) that sign `req` with `key` at time `created` (unix seconds).
pub fn sign(
    req: &RequestParts,
    key: &SecretKey,
    created: i64,
    nonce: &str,
) -> [(&'static str, String); 3] {
    let params = SignatureParams {
        created,
        nonce: nonce.to_string(),
        keyid: key.public().id().to_string(),
    };
    let digest = content_digest(req.body);
    let params = params_value(&params);
    let base = signature_base(req, &digest, &params);
    let sig = key.sign(base.as_bytes());
    [
        ("content-digest", digest),
        ("signature-input", format!("{LABEL}={params}")),
        ("signature", format!("{LABEL}=:{}:", B64.encode(sig))),
    ]
}

fn nonce_ok(s: &str) -> bool {
    (16..=64).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Parse `Signature-Input` strictly: our label, our component list, our parameters in order.
pub fn parse_input(header: &str) -> Result<SignatureParams, SignatureError> {
    let bad = SignatureError::Malformed("Signature-Input");
    let rest = header
        .strip_prefix(LABEL)
        .and_then(|r| r.strip_prefix('='))
        .and_then(|r| r.strip_prefix(COMPONENTS))
        .ok_or(bad.clone())?;
    let rest = rest.strip_prefix(";created=").ok_or(bad.clone())?;
    let (created, rest) = rest.split_once(';').ok_or(bad.clone())?;
    if created.is_empty() || created.len() > 12 || !created.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad);
    }
    let created: i64 = created.parse().map_err(|_| bad.clone())?;
    let rest = rest.strip_prefix("nonce=\"").ok_or(bad.clone())?;
    let (nonce, rest) = rest.split_once('"').ok_or(bad.clone())?;
    let rest = rest.strip_prefix(";keyid=\"").ok_or(bad.clone())?;
    let (keyid, rest) = rest.split_once('"').ok_or(bad.clone())?;
    if rest != ";alg=\"ed25519\"" || !nonce_ok(nonce) {
        return Err(bad);
    }
    if keyid.len() != 64
        || !keyid
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    {
        return Err(bad);
    }
    Ok(SignatureParams {
        created,
        nonce: nonce.to_string(),
        keyid: keyid.to_string(),
    })
}

fn parse_signature(header: &str) -> Result<Vec<u8>, SignatureError> {
    let bad = SignatureError::Malformed("Signature");
    let inner = header
        .strip_prefix(LABEL)
        .and_then(|r| r.strip_prefix("=:"))
        .and_then(|r| r.strip_suffix(':'))
        .ok_or(bad.clone())?;
    let sig = B64.decode(inner).map_err(|_| bad.clone())?;
    if sig.len() != 64 {
        return Err(bad);
    }
    Ok(sig)
}

/// Check the body digest, the clock and the signature of a request whose `Signature-Input` was
/// parsed into `params` and whose key the caller looked up by `params.keyid`.
pub fn verify(
    req: &RequestParts,
    digest_header: Option<&str>,
    signature_header: Option<&str>,
    params: &SignatureParams,
    key: &PublicKey,
    now: i64,
) -> Result<(), SignatureError> {
    let digest_header = digest_header.ok_or(SignatureError::Missing("Content-Digest"))?;
    let signature = parse_signature(signature_header.ok_or(SignatureError::Missing("Signature"))?)?;
    let digest = content_digest(req.body);
    // Not secret, but compare in constant time anyway: it is cheap.
    if !constant_time_eq(digest.as_bytes(), digest_header.as_bytes()) {
        return Err(SignatureError::DigestMismatch);
    }
    let skew = now - params.created;
    if skew.abs() > MAX_SKEW_S {
        return Err(SignatureError::Stale(skew));
    }
    let base = signature_base(req, &digest, &params_value(params));
    if key.verify(base.as_bytes(), &signature) {
        Ok(())
    } else {
        Err(SignatureError::BadSignature)
    }
}

/// Compare two byte strings without an early exit on the first difference.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn parts<'a>(body: &'a [u8]) -> RequestParts<'a> {
        RequestParts {
            method: "POST",
            authority: "127.0.0.1:8080",
            path: "/v1/station/runs/r1/state",
            query: "",
            body,
        }
    }

    fn signed(
        key: &SecretKey,
        req: &RequestParts,
    ) -> (SignatureParams, [(&'static str, String); 3]) {
        let h = sign(req, key, 1_000_000, "abcdefghijklmnop");
        (parse_input(&h[1].1).unwrap(), h)
    }

    #[test]
    fn sign_then_verify_round_trips() {
        let key = SecretKey::generate().unwrap();
        let req = parts(b"{\"state\":\"running\"}");
        let (params, h) = signed(&key, &req);
        assert_eq!(params.keyid, key.public().id().to_string());
        verify(
            &req,
            Some(&h[0].1),
            Some(&h[2].1),
            &params,
            &key.public(),
            1_000_010,
        )
        .unwrap();
    }

    #[test]
    fn every_covered_part_is_covered() {
        let key = SecretKey::generate().unwrap();
        let req = parts(b"{}");
        let (params, h) = signed(&key, &req);
        let pk = key.public();
        let check =
            |r: &RequestParts, d: &str| verify(r, Some(d), Some(&h[2].1), &params, &pk, 1_000_000);
        let mut r = parts(b"{}");
        r.method = "PUT";
        assert_eq!(check(&r, &h[0].1), Err(SignatureError::BadSignature));
        let mut r = parts(b"{}");
        r.authority = "127.0.0.1:9090";
        assert_eq!(check(&r, &h[0].1), Err(SignatureError::BadSignature));
        let mut r = parts(b"{}");
        r.path = "/v1/station/runs/r2/state";
        assert_eq!(check(&r, &h[0].1), Err(SignatureError::BadSignature));
        let mut r = parts(b"{}");
        r.query = "wait=1";
        assert_eq!(check(&r, &h[0].1), Err(SignatureError::BadSignature));
        // A changed body with its honest digest: the digest is covered.
        let r = parts(b"{\"x\":1}");
        assert_eq!(
            check(&r, &content_digest(b"{\"x\":1}")),
            Err(SignatureError::BadSignature)
        );
        // A changed body with the old digest.
        assert_eq!(check(&r, &h[0].1), Err(SignatureError::DigestMismatch));
    }

    #[test]
    fn another_key_and_old_signatures_are_refused() {
        let key = SecretKey::generate().unwrap();
        let other = SecretKey::generate().unwrap();
        let req = parts(b"");
        let (params, h) = signed(&key, &req);
        assert_eq!(
            verify(
                &req,
                Some(&h[0].1),
                Some(&h[2].1),
                &params,
                &other.public(),
                1_000_000
            ),
            Err(SignatureError::BadSignature)
        );
        assert_eq!(
            verify(
                &req,
                Some(&h[0].1),
                Some(&h[2].1),
                &params,
                &key.public(),
                1_000_000 + 301
            ),
            Err(SignatureError::Stale(301))
        );
    }

    #[test]
    fn other_component_lists_and_algorithms_are_refused() {
        let id = "a".repeat(64);
        let ok = format!(
            "amicus={COMPONENTS};created=5;nonce=\"abcdefghijklmnop\";keyid=\"{id}\";alg=\"ed25519\""
        );
        assert!(parse_input(&ok).is_ok());
        for bad in [
            ok.replace("\"content-digest\"", ""),
            ok.replace("ed25519", "hmac-sha256"),
            ok.replace("amicus=", "sig1="),
            ok.replace("nonce=\"abcdefghijklmnop\"", "nonce=\"short\""),
            ok.replace("created=5", "created=-5"),
            format!("{ok};expires=9"),
            ok.replace(&id, &"A".repeat(64)),
        ] {
            assert!(parse_input(&bad).is_err(), "{bad}");
        }
    }

    proptest! {
        #[test]
        fn parsers_never_panic(s in ".{0,300}") {
            let _ = parse_input(&s);
            let _ = parse_signature(&s);
        }
    }
}
