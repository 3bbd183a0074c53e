//! The station's pseudonymisation secret and the keyed hash of patient identifiers.
//!
//! Owns `index/pseudonym.key` (32 random bytes, hex, mode 0600, created once). A pseudonym is
//! HMAC-SHA256(key, "amicus-patient-v1" ‖ issuer ‖ 0x00 ‖ patient ID), hex, truncated to 128
//! bits: stable for a station, unlinkable across stations, and not reversible without the key.
//! The key never leaves this module except as a fingerprint.

use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

pub const KEY_FILE: &str = "pseudonym.key";

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}: not a pseudonymisation key (expected 64 hex characters)")]
    Malformed(PathBuf),
    #[error("{0}: readable by group or others; run `chmod 600` on it")]
    TooOpen(PathBuf),
    #[error("no randomness from the operating system: {0}")]
    Random(String),
}

pub struct PseudonymKey([u8; 32]);

impl std::fmt::Debug for PseudonymKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PseudonymKey({})", self.fingerprint())
    }
}

impl PseudonymKey {
    pub fn from_bytes(bytes: [u8; 32]) -> PseudonymKey {
        PseudonymKey(bytes)
    }

    /// Load the key from `dir`, creating it (0600) if there is none yet.
    pub fn load_or_create(dir: &Path) -> Result<PseudonymKey, KeyError> {
        let path = dir.join(KEY_FILE);
        let io = |source| KeyError::Io {
            path: path.clone(),
            source,
        };
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                check_mode(&path)?;
                let bytes =
                    hex::decode(text.trim()).map_err(|_| KeyError::Malformed(path.clone()))?;
                let bytes: [u8; 32] = bytes
                    .try_into()
                    .map_err(|_| KeyError::Malformed(path.clone()))?;
                Ok(PseudonymKey(bytes))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut bytes = [0u8; 32];
                getrandom::fill(&mut bytes).map_err(|e| KeyError::Random(e.to_string()))?;
                std::fs::create_dir_all(dir).map_err(io)?;
                write_private(&path, format!("{}\n", hex::encode(bytes)).as_bytes()).map_err(io)?;
                Ok(PseudonymKey(bytes))
            }
            Err(e) => Err(io(e)),
        }
    }

    /// The pseudonym of a patient identifier (issuer may be empty).
    pub fn pseudonym(&self, issuer: &str, patient_id: &str) -> String {
        let mut mac =
            <Hmac<Sha256> as KeyInit>::new_from_slice(&self.0).expect("HMAC takes any key length");
        mac.update(b"amicus-patient-v1");
        mac.update(issuer.as_bytes());
        mac.update(&[0]);
        mac.update(patient_id.as_bytes());
        let tag = mac.finalize().into_bytes();
        hex::encode(&tag[..16])
    }

    /// A public fingerprint of the key (first 8 bytes of its SHA-256), to detect a key change.
    pub fn fingerprint(&self) -> String {
        hex::encode(&Sha256::digest(self.0)[..8])
    }
}

#[cfg(unix)]
fn check_mode(path: &Path) -> Result<(), KeyError> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path).map_err(|source| KeyError::Io {
        path: path.into(),
        source,
    })?;
    if meta.permissions().mode() & 0o077 != 0 {
        return Err(KeyError::TooOpen(path.into()));
    }
    Ok(())
}

#[cfg(not(unix))]
fn check_mode(_: &Path) -> Result<(), KeyError> {
    Ok(())
}

fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut f = options.open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keyed_stable_and_separated() {
        let a = PseudonymKey::from_bytes([1; 32]);
        let b = PseudonymKey::from_bytes([2; 32]);
        assert_eq!(a.pseudonym("", "12345"), a.pseudonym("", "12345"));
        assert_ne!(a.pseudonym("", "12345"), b.pseudonym("", "12345"));
        assert_ne!(a.pseudonym("", "12345"), a.pseudonym("", "12346"));
        // The issuer separates namespaces and cannot be shifted into the ID.
        assert_ne!(a.pseudonym("A", "B1"), a.pseudonym("AB", "1"));
        assert_eq!(a.pseudonym("", "x").len(), 32);
        assert!(!format!("{a:?}").contains(&hex::encode([1u8; 32])));
    }

    #[test]
    fn key_file_is_created_private_and_reloaded() {
        let dir = tempfile::tempdir().unwrap();
        let k1 = PseudonymKey::load_or_create(dir.path()).unwrap();
        let k2 = PseudonymKey::load_or_create(dir.path()).unwrap();
        assert_eq!(k1.pseudonym("", "p"), k2.pseudonym("", "p"));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let path = dir.path().join(KEY_FILE);
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
            assert!(matches!(
                PseudonymKey::load_or_create(dir.path()),
                Err(KeyError::TooOpen(_))
            ));
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
            std::fs::write(&path, "zz").unwrap();
            assert!(matches!(
                PseudonymKey::load_or_create(dir.path()),
                Err(KeyError::Malformed(_))
            ));
        }
    }
}
