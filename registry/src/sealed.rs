//! Results sealed to the researcher who asked for them: HPKE (RFC 9180) base mode with
//! DHKEM(X25519, HKDF-SHA256), HKDF-SHA256 and ChaCha20-Poly1305, and the X25519 key files.
//!
//! Owns the sealed-output format and the researcher's encryption keys, and the sealing of
//! secure-aggregation shares from station to station (round share keys, in memory only).
//! Must not know where sealed bytes travel: stations seal, the registry stores ciphertext it
//! cannot read, the researcher (or the recipient station) opens.
//!
//! A sealed output is `enc (32 bytes) || ciphertext`. The AEAD's associated data binds it to
//! its task, run, station and output name, so the registry cannot swap one station's result
//! for another's, or rename an output, without opening failing.
//!
//! Key files are the standard RFC 8410 forms that `openssl pkey` reads: the private key as
//! PKCS#8 PEM (mode 0600, refused when group or others can read it), the public key as
//! SubjectPublicKeyInfo PEM.

use amicus_bundle::keys;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use hpke::kem::X25519HkdfSha256;
use hpke::{Deserializable, Kem as _, OpModeR, OpModeS, Serializable};
use std::path::{Path, PathBuf};

type Kem = X25519HkdfSha256;
type Aead = hpke::aead::ChaCha20Poly1305;
type Kdf = hpke::kdf::HkdfSha256;

const INFO: &[u8] = b"amicus-result-v1";
const ENC_LEN: usize = 32;
/// RFC 8410 DER prefixes for X25519 (OID 1.3.101.110).
const PKCS8_PREFIX: [u8; 16] = [
    0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x6e, 0x04, 0x22, 0x04, 0x20,
];
const SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x6e, 0x03, 0x21, 0x00,
];

#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("{0}")]
    File(#[from] amicus_bundle::KeyError),
    #[error("{0}: not an X25519 private key in PKCS#8 PEM form")]
    BadPrivateKey(String),
    #[error("{0}: not an X25519 public key in SubjectPublicKeyInfo PEM form")]
    BadPublicKey(String),
    #[error("sealed data is too short")]
    Truncated,
    #[error(
        "the sealed output does not open with this key for this task, run, station and name (wrong key, or altered or moved ciphertext)"
    )]
    Open,
    #[error("sealing failed: {0}")]
    Seal(String),
}

/// Where a sealed output belongs; authenticated, not encrypted.
#[derive(Debug, Clone)]
pub struct SealContext<'a> {
    pub task: &'a str,
    pub run: &'a str,
    pub station: &'a str,
    pub output: &'a str,
}

impl SealContext<'_> {
    fn aad(&self) -> Vec<u8> {
        format!(
            "amicus-result-v1\ntask {}\nrun {}\nstation {}\noutput {}",
            self.task, self.run, self.station, self.output
        )
        .into_bytes()
    }
}

/// A researcher's public encryption key.
#[derive(Clone)]
pub struct RecipientPublicKey(<Kem as hpke::Kem>::PublicKey);

/// A researcher's private decryption key.
pub struct RecipientKey(<Kem as hpke::Kem>::PrivateKey, RecipientPublicKey);

fn pem(label: &str, der: &[u8]) -> String {
    let b64 = B64.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(chunk).expect("base64 is ASCII"));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

fn unpem(text: &str, label: &str) -> Option<Vec<u8>> {
    let body = text
        .trim()
        .strip_prefix(&format!("-----BEGIN {label}-----"))?
        .strip_suffix(&format!("-----END {label}-----"))?;
    let joined: String = body.split_whitespace().collect();
    B64.decode(joined).ok()
}

impl RecipientPublicKey {
    pub fn to_pem(&self) -> String {
        let mut der = SPKI_PREFIX.to_vec();
        der.extend_from_slice(&self.0.to_bytes());
        pem("PUBLIC KEY", &der)
    }

    pub fn from_pem(text: &str, origin: &str) -> Result<Self, SealError> {
        let bad = || SealError::BadPublicKey(origin.to_string());
        let der = unpem(text, "PUBLIC KEY").ok_or_else(bad)?;
        let raw = der.strip_prefix(&SPKI_PREFIX[..]).ok_or_else(bad)?;
        if raw.len() != 32 {
            return Err(bad());
        }
        <Kem as hpke::Kem>::PublicKey::from_bytes(raw)
            .map(RecipientPublicKey)
            .map_err(|_| bad())
    }

    pub fn read(path: &Path) -> Result<Self, SealError> {
        Self::from_pem(&keys::read_capped(path)?, &path.display().to_string())
    }

    /// SHA-256 (hex) of the raw 32-byte key: how a signed request names it, whatever the
    /// PEM's line breaks.
    pub fn fingerprint(&self) -> String {
        amicus_bundle::sha256(&self.0.to_bytes()).to_hex()
    }
}

impl RecipientKey {
    pub fn generate() -> RecipientKey {
        let (sk, pk) = Kem::gen_keypair();
        RecipientKey(sk, RecipientPublicKey(pk))
    }

    pub fn public(&self) -> &RecipientPublicKey {
        &self.1
    }

    fn from_raw(raw: &[u8], origin: &str) -> Result<Self, SealError> {
        let bad = || SealError::BadPrivateKey(origin.to_string());
        let sk = <Kem as hpke::Kem>::PrivateKey::from_bytes(raw).map_err(|_| bad())?;
        let pk = Kem::sk_to_pk(&sk);
        Ok(RecipientKey(sk, RecipientPublicKey(pk)))
    }

    /// Read a PKCS#8 PEM private key; refuses files that group or others can access.
    pub fn read(path: &Path) -> Result<Self, SealError> {
        let text = keys::read_private_key_file(path)?;
        let origin = path.display().to_string();
        let der =
            unpem(&text, "PRIVATE KEY").ok_or_else(|| SealError::BadPrivateKey(origin.clone()))?;
        let raw = der
            .strip_prefix(&PKCS8_PREFIX[..])
            .filter(|r| r.len() == 32)
            .ok_or_else(|| SealError::BadPrivateKey(origin.clone()))?;
        Self::from_raw(raw, &origin)
    }

    /// Write the private key (mode 0600, created new) and the public key beside it
    /// (`x.key` → `x.pub`). Returns the public key's path.
    pub fn write_pair(&self, key_path: &Path) -> Result<PathBuf, SealError> {
        let pub_path = keys::public_key_path(key_path);
        for p in [key_path, pub_path.as_path()] {
            if p.exists() {
                return Err(keys::KeyError::Exists(p.into()).into());
            }
        }
        let mut der = PKCS8_PREFIX.to_vec();
        der.extend_from_slice(&self.0.to_bytes());
        keys::write_new(key_path, pem("PRIVATE KEY", &der).as_bytes(), 0o600)?;
        keys::write_new(&pub_path, self.1.to_pem().as_bytes(), 0o644)?;
        Ok(pub_path)
    }

    /// Open a sealed output.
    pub fn open(&self, ctx: &SealContext, sealed: &[u8]) -> Result<Vec<u8>, SealError> {
        open_with(&self.0, INFO, &ctx.aad(), sealed)
    }
}

/// HPKE base-mode open of `enc || ciphertext`.
fn open_with(
    sk: &<Kem as hpke::Kem>::PrivateKey,
    info: &[u8],
    aad: &[u8],
    sealed: &[u8],
) -> Result<Vec<u8>, SealError> {
    if sealed.len() < ENC_LEN {
        return Err(SealError::Truncated);
    }
    let (enc, ciphertext) = sealed.split_at(ENC_LEN);
    let enc = <Kem as hpke::Kem>::EncappedKey::from_bytes(enc).map_err(|_| SealError::Open)?;
    hpke::single_shot_open::<Aead, Kdf, Kem>(&OpModeR::Base, sk, &enc, info, ciphertext, aad)
        .map_err(|_| SealError::Open)
}

/// HPKE base-mode seal; returns `enc || ciphertext`.
fn seal_with(
    pk: &<Kem as hpke::Kem>::PublicKey,
    info: &[u8],
    aad: &[u8],
    plaintext: &[u8],
) -> Result<Vec<u8>, SealError> {
    let (enc, ciphertext) =
        hpke::single_shot_seal::<Aead, Kdf, Kem>(&OpModeS::Base, pk, info, plaintext, aad)
            .map_err(|e| SealError::Seal(e.to_string()))?;
    let mut out = enc.to_bytes().to_vec();
    out.extend_from_slice(&ciphertext);
    Ok(out)
}

/// Seal `plaintext` to `recipient` for `ctx`.
pub fn seal(
    recipient: &RecipientPublicKey,
    ctx: &SealContext,
    plaintext: &[u8],
) -> Result<Vec<u8>, SealError> {
    seal_with(&recipient.0, INFO, &ctx.aad(), plaintext)
}

// ---- shares of a securely aggregated round ----------------------------------------------

const SHARE_INFO: &[u8] = b"amicus-secagg-share-v1";

/// Associated data of a sealed share: it belongs to one job, round, sender and recipient.
pub fn share_aad(job: &str, round: u32, from: u32, to: u32) -> Vec<u8> {
    format!("amicus-secagg-share-v1\njob {job}\nround {round}\nfrom {from}\nto {to}").into_bytes()
}

/// A station's key for one securely aggregated round: the other stations seal the shares of
/// their secrets to it, so the registry that relays them cannot read them. Lives in memory
/// only, for one round.
pub struct ShareKey(<Kem as hpke::Kem>::PrivateKey, [u8; 32]);

impl ShareKey {
    pub fn generate() -> ShareKey {
        let (sk, pk) = Kem::gen_keypair();
        let public = pk.to_bytes().into();
        ShareKey(sk, public)
    }

    pub fn public(&self) -> [u8; 32] {
        self.1
    }

    pub fn open(&self, aad: &[u8], sealed: &[u8]) -> Result<Vec<u8>, SealError> {
        open_with(&self.0, SHARE_INFO, aad, sealed)
    }
}

/// Seal a share bundle to another station's share key.
pub fn seal_share(to: &[u8; 32], aad: &[u8], plaintext: &[u8]) -> Result<Vec<u8>, SealError> {
    let pk = <Kem as hpke::Kem>::PublicKey::from_bytes(to)
        .map_err(|_| SealError::BadPublicKey("a station's share key".into()))?;
    seal_with(&pk, SHARE_INFO, aad, plaintext)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx<'a>(output: &'a str) -> SealContext<'a> {
        SealContext {
            task: "t1",
            run: "r1",
            station: "st1",
            output,
        }
    }

    #[test]
    fn shares_open_only_for_their_recipient_job_round_and_pair() {
        let key = ShareKey::generate();
        let other = ShareKey::generate();
        let aad = share_aad("job1", 2, 0, 1);
        let sealed = seal_share(&key.public(), &aad, b"share bytes").unwrap();
        assert_eq!(key.open(&aad, &sealed).unwrap(), b"share bytes");
        assert!(matches!(other.open(&aad, &sealed), Err(SealError::Open)));
        for moved in [
            share_aad("job1", 3, 0, 1),
            share_aad("job1", 2, 2, 1),
            share_aad("job2", 2, 0, 1),
        ] {
            assert!(matches!(key.open(&moved, &sealed), Err(SealError::Open)));
        }
        assert!(matches!(
            key.open(&aad, &sealed[..10]),
            Err(SealError::Truncated)
        ));
    }

    #[test]
    fn seal_and_open_round_trip_and_bind_the_context() {
        let key = RecipientKey::generate();
        let sealed = seal(key.public(), &ctx("summary.json"), b"{\"n\":12}").unwrap();
        assert!(!sealed.windows(8).any(|w| w == b"{\"n\":12}"));
        assert_eq!(
            key.open(&ctx("summary.json"), &sealed).unwrap(),
            b"{\"n\":12}"
        );
        assert!(matches!(
            key.open(&ctx("other.json"), &sealed),
            Err(SealError::Open)
        ));
        let other = SealContext {
            station: "st2",
            ..ctx("summary.json")
        };
        assert!(matches!(key.open(&other, &sealed), Err(SealError::Open)));
        let mut flipped = sealed.clone();
        *flipped.last_mut().unwrap() ^= 1;
        assert!(matches!(
            key.open(&ctx("summary.json"), &flipped),
            Err(SealError::Open)
        ));
        assert!(matches!(
            key.open(&ctx("summary.json"), &sealed[..10]),
            Err(SealError::Truncated)
        ));
        let stranger = RecipientKey::generate();
        assert!(matches!(
            stranger.open(&ctx("summary.json"), &sealed),
            Err(SealError::Open)
        ));
    }

    #[test]
    fn key_files_round_trip_and_private_keys_must_be_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.key");
        let key = RecipientKey::generate();
        let pub_path = key.write_pair(&path).unwrap();
        let back = RecipientKey::read(&path).unwrap();
        let public = RecipientPublicKey::read(&pub_path).unwrap();
        let sealed = seal(&public, &ctx("a"), b"x").unwrap();
        assert_eq!(back.open(&ctx("a"), &sealed).unwrap(), b"x");
        assert_eq!(public.to_pem(), key.public().to_pem());
        assert!(matches!(
            key.write_pair(&path),
            Err(SealError::File(keys::KeyError::Exists(_)))
        ));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
            assert!(matches!(
                RecipientKey::read(&path),
                Err(SealError::File(keys::KeyError::Permissions { .. }))
            ));
        }
        // An Ed25519 public key is not an X25519 one.
        let ed = amicus_bundle::SecretKey::generate()
            .unwrap()
            .public()
            .to_pem();
        assert!(RecipientPublicKey::from_pem(&ed, "ed").is_err());
    }
}
