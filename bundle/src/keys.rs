//! Ed25519 key pairs and their files.
//!
//! Text formats are the standard ones, readable by OpenSSL and most tooling:
//! - private key: PKCS#8 PEM (`-----BEGIN PRIVATE KEY-----`, RFC 8410), file mode 0600;
//! - public key: SubjectPublicKeyInfo PEM (`-----BEGIN PUBLIC KEY-----`, RFC 8410).
//!
//! A key is named by its [`KeyId`]: the SHA-256 of the raw 32-byte public key, in hex.

use crate::digest::{Digest, sha256};
use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
use ed25519_dalek::pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey};
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Largest key file we read: real ones are a few hundred bytes.
const MAX_KEY_FILE: u64 = 16 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}: not an Ed25519 private key in PKCS#8 PEM form")]
    BadSecretKey(PathBuf),
    #[error("{0}: not an Ed25519 public key in SubjectPublicKeyInfo PEM form")]
    BadPublicKey(String),
    #[error(
        "{path}: private key file is accessible by group or others (mode {mode:o}); run `chmod 600` on it"
    )]
    Permissions { path: PathBuf, mode: u32 },
    #[error("{0} already exists; refusing to overwrite a key file")]
    Exists(PathBuf),
    #[error("{0}: key file larger than {MAX_KEY_FILE} bytes")]
    TooLarge(PathBuf),
    #[error("no operating-system randomness: {0}")]
    Random(String),
}

/// Identifies a public key: SHA-256 of its raw 32 bytes.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct KeyId(pub Digest);

impl KeyId {
    pub fn short(&self) -> String {
        self.0.short()
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({})", self.0.short())
    }
}

/// An Ed25519 public key.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct PublicKey(VerifyingKey);

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.id().short())
    }
}

impl PublicKey {
    pub fn id(&self) -> KeyId {
        KeyId(sha256(self.0.as_bytes()))
    }

    pub fn to_pem(&self) -> String {
        self.0
            .to_public_key_pem(LineEnding::LF)
            .expect("encoding a valid Ed25519 public key cannot fail")
    }

    /// Parse SubjectPublicKeyInfo PEM. `origin` names the source in errors.
    pub fn from_pem(pem: &str, origin: &str) -> Result<Self, KeyError> {
        VerifyingKey::from_public_key_pem(pem.trim())
            .map(PublicKey)
            .map_err(|_| KeyError::BadPublicKey(origin.to_string()))
    }

    pub fn read(path: &Path) -> Result<Self, KeyError> {
        let text = read_capped(path)?;
        Self::from_pem(&text, &path.display().to_string())
    }

    pub fn from_raw(bytes: &[u8; 32]) -> Result<Self, KeyError> {
        VerifyingKey::from_bytes(bytes)
            .map(PublicKey)
            .map_err(|_| KeyError::BadPublicKey("raw bytes".into()))
    }

    /// Strict Ed25519 verification (rejects small-order keys and malleable signatures).
    pub fn verify(&self, message: &[u8], signature: &[u8]) -> bool {
        let Ok(sig) = Signature::from_slice(signature) else {
            return false;
        };
        self.0.verify_strict(message, &sig).is_ok()
    }
}

/// An Ed25519 private key. Never printed: `Debug` shows only the key id.
#[derive(Clone)]
pub struct SecretKey(SigningKey);

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretKey({})", self.public().id().short())
    }
}

impl SecretKey {
    /// A new key from the operating system's randomness.
    pub fn generate() -> Result<Self, KeyError> {
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).map_err(|e| KeyError::Random(e.to_string()))?;
        let key = SigningKey::from_bytes(&seed);
        seed.fill(0);
        Ok(SecretKey(key))
    }

    pub fn public(&self) -> PublicKey {
        PublicKey(self.0.verifying_key())
    }

    pub fn sign(&self, message: &[u8]) -> [u8; 64] {
        self.0.sign(message).to_bytes()
    }

    /// Read a PKCS#8 PEM private key; refuses files that group or others can access.
    pub fn read(path: &Path) -> Result<Self, KeyError> {
        let text = read_private_key_file(path)?;
        SigningKey::from_pkcs8_pem(text.trim())
            .map(SecretKey)
            .map_err(|_| KeyError::BadSecretKey(path.into()))
    }

    /// Write the private key to `key_path` (mode 0600, created new) and the public key beside
    /// it (see [`public_key_path`]). Returns the public key's path.
    pub fn write_pair(&self, key_path: &Path) -> Result<PathBuf, KeyError> {
        let pub_path = public_key_path(key_path);
        for p in [key_path, pub_path.as_path()] {
            if p.exists() {
                return Err(KeyError::Exists(p.into()));
            }
        }
        // PKCS#8 v1 (RFC 8410 section 7, no embedded public key): the form OpenSSL 3.0 reads.
        let pem = ed25519_dalek::pkcs8::KeypairBytes {
            secret_key: self.0.to_bytes(),
            public_key: None,
        }
        .to_pkcs8_pem(LineEnding::LF)
        .expect("encoding a valid Ed25519 key cannot fail");
        write_new(key_path, pem.as_bytes(), 0o600)?;
        write_new(&pub_path, self.public().to_pem().as_bytes(), 0o644)?;
        Ok(pub_path)
    }
}

/// `alice.key` → `alice.pub`; any other name gets `.pub` appended.
pub fn public_key_path(key_path: &Path) -> PathBuf {
    if key_path.extension().is_some_and(|e| e == "key") {
        key_path.with_extension("pub")
    } else {
        let mut s = key_path.as_os_str().to_owned();
        s.push(".pub");
        PathBuf::from(s)
    }
}

/// A private key file's text, refused when group or others can access the file.
pub fn read_private_key_file(path: &Path) -> Result<String, KeyError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let meta = std::fs::metadata(path).map_err(|source| KeyError::Io {
            path: path.into(),
            source,
        })?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(KeyError::Permissions {
                path: path.into(),
                mode,
            });
        }
    }
    read_capped(path)
}

/// A key file's text (at most 16 KiB).
pub fn read_capped(path: &Path) -> Result<String, KeyError> {
    let io = |source| KeyError::Io {
        path: path.into(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(io)?;
    if meta.len() > MAX_KEY_FILE {
        return Err(KeyError::TooLarge(path.into()));
    }
    std::fs::read_to_string(path).map_err(io)
}

/// Create a key file that must not exist yet, with `mode`, synced.
pub fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<(), KeyError> {
    let io = |source| KeyError::Io {
        path: path.into(),
        source,
    };
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(mode);
    }
    #[cfg(not(unix))]
    let _ = mode;
    let mut f = opts.open(path).map_err(io)?;
    f.write_all(bytes).map_err(io)?;
    f.sync_all().map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pair_round_trip_and_permissions() {
        let dir = tempfile::tempdir().unwrap();
        let key_path = dir.path().join("alice.key");
        let key = SecretKey::generate().unwrap();
        let pub_path = key.write_pair(&key_path).unwrap();
        assert_eq!(pub_path, dir.path().join("alice.pub"));
        let back = SecretKey::read(&key_path).unwrap();
        assert_eq!(back.public(), key.public());
        assert_eq!(PublicKey::read(&pub_path).unwrap(), key.public());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&key_path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
            std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o644)).unwrap();
            assert!(matches!(
                SecretKey::read(&key_path),
                Err(KeyError::Permissions { .. })
            ));
        }
        assert!(matches!(
            key.write_pair(&key_path),
            Err(KeyError::Exists(_))
        ));
    }

    #[test]
    fn sign_verify_and_reject() {
        let key = SecretKey::generate().unwrap();
        let sig = key.sign(b"message");
        assert!(key.public().verify(b"message", &sig));
        assert!(!key.public().verify(b"messagf", &sig));
        assert!(!key.public().verify(b"message", &sig[..63]));
        let other = SecretKey::generate().unwrap();
        assert!(!other.public().verify(b"message", &sig));
    }

    #[test]
    fn garbage_public_key_is_an_error() {
        assert!(PublicKey::from_pem("hello", "x").is_err());
        assert!(
            PublicKey::from_pem(
                "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----",
                "x"
            )
            .is_err()
        );
    }
}
