//! The bundle file: one tar archive (ustar, deterministic headers) holding
//!
//! ```text
//! train.toml                  canonical manifest (its SHA-256 is the bundle digest)
//! train.wasm, models/...      every file listed in the manifest, in manifest order
//! signatures/<keyid>.dsse.json  zero or more DSSE envelopes over the digest
//! ```
//!
//! Reading is strict: only regular files with these names, no duplicates, every listed file
//! present with the listed size and SHA-256, sizes capped. Nothing is ever extracted to disk.

use crate::digest::{Digest, sha256};
use crate::dsse::{self, Envelope, EnvelopeError};
use crate::keys::{KeyId, PublicKey, SecretKey};
use crate::manifest::{COMPONENT_PATH, FileEntry, MAX_MANIFEST_BYTES, Manifest, ManifestError};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

pub const MANIFEST_PATH: &str = "train.toml";
pub const SIGNATURE_DIR: &str = "signatures/";
/// Largest bundle we read (component + models).
pub const MAX_BUNDLE_BYTES: u64 = 1 << 30;
const MAX_SIGNATURES: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("not a readable bundle archive: {0}")]
    Archive(String),
    #[error("bundle has no {MANIFEST_PATH} as its first entry")]
    NoManifest,
    #[error("bundle manifest: {0}")]
    Manifest(#[from] ManifestError),
    #[error("bundle entry {0:?} is not allowed (not the manifest, a listed file or a signature)")]
    UnexpectedEntry(String),
    #[error("bundle entry {0:?} appears twice")]
    DuplicateEntry(String),
    #[error("bundle is missing file {0:?} listed in its manifest")]
    MissingFile(String),
    #[error("file {path:?} does not match the manifest: {what}")]
    FileMismatch { path: String, what: String },
    #[error("bundle is larger than {MAX_BUNDLE_BYTES} bytes")]
    TooLarge,
    #[error("signature {entry:?}: {source}")]
    Signature {
        entry: String,
        #[source]
        source: EnvelopeError,
    },
    #[error("bundle has more than {MAX_SIGNATURES} signatures")]
    TooManySignatures,
}

/// A public key the verifier trusts, with the name it knows the signer by.
#[derive(Debug, Clone)]
pub struct TrustedKey {
    pub name: String,
    pub key: PublicKey,
}

/// What one signature in the bundle proved to a verifier.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SignerReport {
    pub keyid: String,
    /// The verifier's name for the key, when it trusts it.
    pub trusted_as: Option<String>,
    pub role: String,
    pub valid: bool,
    /// Why it does not count, when it does not.
    pub problem: Option<String>,
}

/// The result of checking a bundle's signatures against a trust set.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SignatureCheck {
    pub signers: Vec<SignerReport>,
    /// Distinct trusted keys with a valid signature.
    pub trusted_valid: usize,
    pub required: usize,
}

impl SignatureCheck {
    pub fn satisfied(&self) -> bool {
        self.required > 0 && self.trusted_valid >= self.required
    }

    /// A one-line reason for a refusal, or `None` when satisfied.
    pub fn refusal(&self) -> Option<String> {
        if self.satisfied() {
            return None;
        }
        if self.signers.is_empty() {
            return Some(format!(
                "bundle is unsigned; {} trusted signature(s) required",
                self.required
            ));
        }
        let problems: Vec<String> = self
            .signers
            .iter()
            .filter_map(|s| {
                s.problem
                    .as_ref()
                    .map(|p| format!("{}: {p}", crate::text::short(&s.keyid, 12)))
            })
            .collect();
        Some(format!(
            "{} valid signature(s) from trusted keys, {} required{}",
            self.trusted_valid,
            self.required,
            if problems.is_empty() {
                String::new()
            } else {
                format!(" ({})", problems.join("; "))
            }
        ))
    }
}

/// A train bundle held in memory, integrity-checked.
#[derive(Debug, Clone)]
pub struct Bundle {
    manifest_bytes: Vec<u8>,
    manifest: Manifest,
    digest: Digest,
    files: BTreeMap<String, Vec<u8>>,
    signatures: Vec<Envelope>,
}

impl Bundle {
    /// Make a bundle from a source manifest (its `files` are replaced) and the files to ship.
    /// `files` must contain [`COMPONENT_PATH`].
    pub fn create(
        mut manifest: Manifest,
        files: Vec<(String, Vec<u8>)>,
    ) -> Result<Bundle, BundleError> {
        manifest.normalize();
        manifest.files = files
            .iter()
            .map(|(path, data)| FileEntry {
                path: path.clone(),
                size: data.len() as u64,
                sha256: sha256(data),
            })
            .collect();
        manifest.validate()?;
        let manifest_bytes = manifest.to_canonical().into_bytes();
        let digest = sha256(&manifest_bytes);
        Ok(Bundle {
            manifest_bytes,
            manifest,
            digest,
            files: files.into_iter().collect(),
            signatures: Vec::new(),
        })
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The bundle digest: SHA-256 of the canonical manifest.
    pub fn digest(&self) -> Digest {
        self.digest
    }

    pub fn manifest_bytes(&self) -> &[u8] {
        &self.manifest_bytes
    }

    pub fn component(&self) -> &[u8] {
        &self.files[COMPONENT_PATH]
    }

    pub fn file(&self, path: &str) -> Option<&[u8]> {
        self.files.get(path).map(Vec::as_slice)
    }

    pub fn signatures(&self) -> &[Envelope] {
        &self.signatures
    }

    /// `name@version`, the subject name signatures use.
    pub fn subject_name(&self) -> String {
        format!(
            "{}@{}",
            self.manifest.train.name, self.manifest.train.version
        )
    }

    /// Attach an envelope made elsewhere (a reviewer's signature sent as a file), unchecked:
    /// signatures are checked when a station admits the bundle, never when they are attached.
    pub fn attach(&mut self, env: dsse::Envelope) {
        self.signatures.push(env);
    }

    /// Sign the digest with `key` in `role`; replaces an earlier signature by the same key.
    pub fn sign(&mut self, key: &SecretKey, role: &str) {
        let env = dsse::sign(key, &self.digest, &self.subject_name(), role);
        let id = key.public().id().to_string();
        self.signatures
            .retain(|e| !e.signatures.iter().any(|s| s.keyid == id));
        self.signatures.push(env);
    }

    /// Check every signature against `trusted`; `required` distinct trusted keys must verify.
    pub fn check_signatures(&self, trusted: &[TrustedKey], required: usize) -> SignatureCheck {
        let keys: Vec<PublicKey> = trusted.iter().map(|t| t.key).collect();
        let mut signers = Vec::new();
        let mut counted: Vec<KeyId> = Vec::new();
        for env in &self.signatures {
            let statement = env.statement_for(&self.digest);
            let verified = env.verified_keys(&keys);
            for s in &env.signatures {
                let trusted_key = trusted.iter().find(|t| t.key.id().to_string() == s.keyid);
                let valid = verified.iter().any(|k| k.to_string() == s.keyid);
                let problem = match (&statement, trusted_key, valid) {
                    (Err(e), _, _) => Some(e.to_string()),
                    (Ok(_), None, _) => Some("key is not trusted".to_string()),
                    (Ok(_), Some(_), false) => {
                        Some("signature does not verify (bundle or signature altered)".to_string())
                    }
                    (Ok(_), Some(t), true) => {
                        if !counted.contains(&t.key.id()) {
                            counted.push(t.key.id());
                        }
                        None
                    }
                };
                signers.push(SignerReport {
                    keyid: s.keyid.clone(),
                    trusted_as: trusted_key.map(|t| t.name.clone()),
                    role: statement
                        .as_ref()
                        .map(|st| st.predicate.role.clone())
                        .unwrap_or_default(),
                    valid: problem.is_none(),
                    problem,
                });
            }
        }
        SignatureCheck {
            signers,
            trusted_valid: counted.len(),
            required,
        }
    }

    /// Read and integrity-check a bundle file.
    pub fn read(path: &Path) -> Result<Bundle, BundleError> {
        let file = std::fs::File::open(path).map_err(|source| BundleError::Io {
            path: path.into(),
            source,
        })?;
        Self::from_reader(std::io::BufReader::new(file))
    }

    pub fn from_reader(reader: impl Read) -> Result<Bundle, BundleError> {
        let mut archive = tar::Archive::new(reader);
        let entries = archive
            .entries()
            .map_err(|e| BundleError::Archive(e.to_string()))?;
        let mut manifest: Option<(Vec<u8>, Manifest)> = None;
        let mut files: BTreeMap<String, Vec<u8>> = BTreeMap::new();
        let mut signatures = Vec::new();
        let mut total: u64 = 0;
        for entry in entries {
            let mut entry = entry.map_err(|e| BundleError::Archive(e.to_string()))?;
            let name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
            if entry.header().entry_type() != tar::EntryType::Regular {
                return Err(BundleError::UnexpectedEntry(name));
            }
            let size = entry
                .header()
                .size()
                .map_err(|e| BundleError::Archive(e.to_string()))?;
            total = total.saturating_add(size);
            if total > MAX_BUNDLE_BYTES {
                return Err(BundleError::TooLarge);
            }
            let Some((_, m)) = &manifest else {
                if name != MANIFEST_PATH {
                    return Err(BundleError::NoManifest);
                }
                if size > MAX_MANIFEST_BYTES as u64 {
                    return Err(ManifestError::TooLarge.into());
                }
                let bytes = read_entry(&mut entry, size)?;
                let m = Manifest::parse_canonical(&bytes)?;
                manifest = Some((bytes, m));
                continue;
            };
            if let Some(rest) = name.strip_prefix(SIGNATURE_DIR) {
                if rest.is_empty() || rest.contains('/') || !rest.ends_with(".dsse.json") {
                    return Err(BundleError::UnexpectedEntry(name));
                }
                if signatures.len() >= MAX_SIGNATURES {
                    return Err(BundleError::TooManySignatures);
                }
                if size > dsse::MAX_ENVELOPE_BYTES as u64 {
                    return Err(BundleError::Signature {
                        entry: name,
                        source: EnvelopeError::Malformed("too large".into()),
                    });
                }
                let bytes = read_entry(&mut entry, size)?;
                let env = Envelope::parse(&bytes).map_err(|source| BundleError::Signature {
                    entry: name,
                    source,
                })?;
                signatures.push(env);
                continue;
            }
            let Some(listed) = m.file(&name) else {
                return Err(BundleError::UnexpectedEntry(name));
            };
            if files.contains_key(&name) {
                return Err(BundleError::DuplicateEntry(name));
            }
            if size != listed.size {
                return Err(BundleError::FileMismatch {
                    path: name,
                    what: format!("size {size}, manifest says {}", listed.size),
                });
            }
            let data = read_entry(&mut entry, size)?;
            let actual = sha256(&data);
            if actual != listed.sha256 {
                return Err(BundleError::FileMismatch {
                    path: name,
                    what: format!("SHA-256 {actual}, manifest says {}", listed.sha256),
                });
            }
            files.insert(name, data);
        }
        let Some((manifest_bytes, manifest)) = manifest else {
            return Err(BundleError::NoManifest);
        };
        for f in &manifest.files {
            if !files.contains_key(&f.path) {
                return Err(BundleError::MissingFile(f.path.clone()));
            }
        }
        let digest = sha256(&manifest_bytes);
        Ok(Bundle {
            manifest_bytes,
            manifest,
            digest,
            files,
            signatures,
        })
    }

    /// The bundle as tar bytes (deterministic: fixed order, mode, owner and mtime).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = tar::Builder::new(Vec::new());
        let mut add = |name: &str, data: &[u8]| {
            let mut h = tar::Header::new_ustar();
            h.set_entry_type(tar::EntryType::Regular);
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_mtime(0);
            h.set_uid(0);
            h.set_gid(0);
            out.append_data(&mut h, name, data)
                .expect("writing a tar archive to memory cannot fail");
        };
        add(MANIFEST_PATH, &self.manifest_bytes);
        for f in &self.manifest.files {
            add(&f.path, &self.files[&f.path]);
        }
        for env in &self.signatures {
            let id = env
                .signatures
                .first()
                .map(|s| s.keyid.as_str())
                .unwrap_or("unknown");
            add(&format!("{SIGNATURE_DIR}{id}.dsse.json"), &env.to_json());
        }
        out.into_inner()
            .expect("finishing a tar archive in memory cannot fail")
    }

    /// Write atomically: a temporary file beside `path`, synced, then renamed over it.
    pub fn write(&self, path: &Path) -> Result<(), BundleError> {
        write_atomic(path, &self.to_bytes()).map_err(|source| BundleError::Io {
            path: path.into(),
            source,
        })
    }
}

fn read_entry(entry: &mut impl Read, size: u64) -> Result<Vec<u8>, BundleError> {
    let mut data = Vec::with_capacity(size.min(1 << 20) as usize);
    entry
        .take(size)
        .read_to_end(&mut data)
        .map_err(|e| BundleError::Archive(e.to_string()))?;
    if data.len() as u64 != size {
        return Err(BundleError::Archive("truncated entry".into()));
    }
    Ok(data)
}

/// Write `bytes` to `path` via a synced temporary file and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let file_name = path
        .file_name()
        .ok_or_else(|| std::io::Error::other("path has no file name"))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(file_name);
    tmp_name.push(format!(".tmp{}", std::process::id()));
    let tmp = dir.join(tmp_name);
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        if let Ok(d) = std::fs::File::open(&dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Bundle {
        let m = Manifest::parse_source(
            r#"
[train]
name = "t"
version = "1"
[limits]
fuel = 10
memory_mib = 1
wall_seconds = 1
[[models]]
file = "models/m.onnx"
role = "frozen"
"#,
        )
        .unwrap();
        Bundle::create(
            m,
            vec![
                (COMPONENT_PATH.into(), b"\0asm fake component".to_vec()),
                ("models/m.onnx".into(), vec![7u8; 1000]),
            ],
        )
        .unwrap()
    }

    fn trusted(k: &SecretKey, name: &str) -> TrustedKey {
        TrustedKey {
            name: name.into(),
            key: k.public(),
        }
    }

    #[test]
    fn round_trip_is_deterministic() {
        let b = sample();
        let bytes = b.to_bytes();
        let back = Bundle::from_reader(&bytes[..]).unwrap();
        assert_eq!(back.digest(), b.digest());
        assert_eq!(back.to_bytes(), bytes);
        assert_eq!(back.file("models/m.onnx").unwrap().len(), 1000);
    }

    #[test]
    fn signatures_count_distinct_trusted_keys() {
        let alice = SecretKey::generate().unwrap();
        let bob = SecretKey::generate().unwrap();
        let mallory = SecretKey::generate().unwrap();
        let mut b = sample();
        let trust = [trusted(&alice, "alice"), trusted(&bob, "bob")];
        let check = b.check_signatures(&trust, 1);
        assert!(!check.satisfied());
        assert!(check.refusal().unwrap().contains("unsigned"));

        b.sign(&alice, "author");
        b.sign(&alice, "author"); // replaces, does not count twice
        b.sign(&mallory, "reviewer");
        let b = Bundle::from_reader(&b.to_bytes()[..]).unwrap();
        assert_eq!(b.signatures().len(), 2);
        assert!(b.check_signatures(&trust, 1).satisfied());
        let two = b.check_signatures(&trust, 2);
        assert!(!two.satisfied());
        assert!(
            two.refusal().unwrap().contains("not trusted"),
            "{:?}",
            two.refusal()
        );

        let mut b2 = b.clone();
        b2.sign(&bob, "reviewer");
        assert!(b2.check_signatures(&trust, 2).satisfied());
        assert!(
            !b2.check_signatures(&trust, 0).satisfied(),
            "zero required never passes"
        );
    }

    /// Flip one byte at every position of interest; the bundle must either fail to read or
    /// fail signature verification — never verify.
    #[test]
    fn any_flipped_byte_is_caught() {
        let alice = SecretKey::generate().unwrap();
        let mut b = sample();
        b.sign(&alice, "author");
        let bytes = b.to_bytes();
        let trust = [trusted(&alice, "alice")];
        let sig_start = bytes.windows(11).position(|w| w == b"signatures/").unwrap();
        for i in (0..sig_start).step_by(7) {
            let mut t = bytes.clone();
            t[i] ^= 0x20;
            if t == bytes {
                continue;
            }
            if let Ok(read) = Bundle::from_reader(&t[..]) {
                // Only bytes that do not matter (tar padding, header fields we do not use) may
                // still read; then the content must be unchanged.
                if read.check_signatures(&trust, 1).satisfied() {
                    assert_eq!(read.digest(), b.digest(), "byte {i}");
                    assert_eq!(read.component(), b.component(), "byte {i}");
                }
            }
        }
    }

    #[test]
    fn refuses_extra_and_missing_entries() {
        let b = sample();
        let mut builder = tar::Builder::new(Vec::new());
        let mut add = |name: &str, data: &[u8]| {
            let mut h = tar::Header::new_ustar();
            h.set_size(data.len() as u64);
            h.set_entry_type(tar::EntryType::Regular);
            builder.append_data(&mut h, name, data).unwrap();
        };
        add(MANIFEST_PATH, b.manifest_bytes());
        add(COMPONENT_PATH, b.component());
        add("evil.sh", b"rm -rf /");
        let bytes = builder.into_inner().unwrap();
        assert!(matches!(
            Bundle::from_reader(&bytes[..]),
            Err(BundleError::UnexpectedEntry(n)) if n == "evil.sh"
        ));

        let mut builder = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_ustar();
        h.set_size(b.manifest_bytes().len() as u64);
        builder
            .append_data(&mut h, MANIFEST_PATH, b.manifest_bytes())
            .unwrap();
        let bytes = builder.into_inner().unwrap();
        assert!(matches!(
            Bundle::from_reader(&bytes[..]),
            Err(BundleError::MissingFile(_))
        ));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn reading_garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
            let _ = Bundle::from_reader(&bytes[..]);
        }
    }
}
