//! The train manifest (`train.toml`): what a train is, what it may touch, what it may emit.
//!
//! The manifest inside a bundle is stored in *canonical form*: the exact bytes that
//! [`Manifest::to_canonical`] produces for it. A reader re-serialises what it parsed and refuses
//! the manifest unless the bytes are identical, so the digest (SHA-256 of those bytes) is a
//! property of the manifest's meaning, and what a signer signed is what a reader sees.

use crate::digest::{Digest, sha256};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::fmt;

/// The WIT contract this build of amicus implements.
pub const CONTRACT: &str = "amicus:train@0.1.0";

/// Path of the train's WebAssembly component inside a bundle.
pub const COMPONENT_PATH: &str = "train.wasm";

/// Largest manifest we parse.
pub const MAX_MANIFEST_BYTES: usize = 256 * 1024;

const MAX_OUTPUT_BYTES: u64 = 1 << 30;
const MAX_FILES: usize = 256;
const MAX_OUTPUTS: usize = 256;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ManifestError {
    #[error("manifest is not valid TOML for amicus: {0}")]
    Parse(String),
    #[error("manifest is larger than {MAX_MANIFEST_BYTES} bytes")]
    TooLarge,
    #[error("manifest is not in canonical form (it was edited after `amicus train build`)")]
    NotCanonical,
    #[error("manifest field {field}: {reason}")]
    Invalid { field: String, reason: String },
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> ManifestError {
    ManifestError::Invalid {
        field: field.into(),
        reason: reason.into(),
    }
}

/// A capability a train may ask for: an interface of the contract beyond `output`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Capability {
    /// SPARQL over the station's FAIR index (`amicus:train/cohort`).
    Cohort,
    /// Series and masks as tensors (`amicus:train/imaging`).
    Imaging,
    /// ONNX inference and training (`amicus:train/kernels`, and `federated` in a federated job).
    Kernels,
}

impl Capability {
    pub const ALL: [Capability; 3] = [Capability::Cohort, Capability::Imaging, Capability::Kernels];

    pub fn name(self) -> &'static str {
        match self {
            Capability::Cohort => "cohort",
            Capability::Imaging => "imaging",
            Capability::Kernels => "kernels",
        }
    }

    /// The WIT interfaces (without package and version) this capability grants.
    pub fn interfaces(self) -> &'static [&'static str] {
        match self {
            Capability::Cohort => &["cohort"],
            Capability::Imaging => &["imaging", "tensors"],
            Capability::Kernels => &["kernels", "tensors", "federated"],
        }
    }

    pub fn parse(s: &str) -> Option<Capability> {
        Capability::ALL.into_iter().find(|c| c.name() == s)
    }
}

impl fmt::Display for Capability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainInfo {
    pub name: String,
    pub version: String,
    #[serde(default)]
    pub authors: Vec<String>,
    #[serde(default)]
    pub description: String,
    /// The WIT package the component was built against.
    #[serde(default = "default_contract")]
    pub contract: String,
}

fn default_contract() -> String {
    CONTRACT.to_string()
}

/// Resources a run may use; a station refuses a train that asks for more than its caps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// WebAssembly fuel (roughly: instructions executed).
    pub fuel: u64,
    /// Guest linear memory plus host-side tensors, in MiB.
    pub memory_mib: u32,
    /// Wall-clock time of the whole run, in seconds.
    pub wall_seconds: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OutputKind {
    Statistics,
    ModelUpdate,
    Metrics,
}

/// An output the train may emit. Nothing else can leave a run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputDecl {
    pub name: String,
    pub kind: OutputKind,
    pub max_bytes: u64,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ModelRole {
    Frozen,
    Trainable,
}

/// An ONNX model shipped in the bundle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelDecl {
    /// Path inside the bundle, e.g. `models/unet.onnx`; must be listed in `files`.
    pub file: String,
    pub role: ModelRole,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss: Option<String>,
}

/// The parameters the train takes (`[params]`): a JSON Schema (see `crate::params` for the
/// subset), shown to the data owner at review; an approval can bind runs to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParamsDecl {
    /// The schema, as JSON text.
    pub schema: String,
}

impl ParamsDecl {
    /// The schema as JSON (it was checked when the manifest was validated).
    pub fn schema_json(&self) -> Result<serde_json::Value, String> {
        let v: serde_json::Value =
            serde_json::from_str(&self.schema).map_err(|e| format!("not JSON: {e}"))?;
        crate::params::check_schema(&v)?;
        Ok(v)
    }
}

/// Longest params schema a manifest may carry.
pub const MAX_PARAMS_SCHEMA_BYTES: usize = 16 << 10;

/// A file of the bundle with its size and SHA-256.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileEntry {
    pub path: String,
    pub size: u64,
    pub sha256: Digest,
}

/// The whole manifest. Field order here is the order of the canonical TOML.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    #[serde(default)]
    pub capabilities: Vec<Capability>,
    pub train: TrainInfo,
    pub limits: Limits,
    #[serde(default)]
    pub outputs: Vec<OutputDecl>,
    #[serde(default)]
    pub models: Vec<ModelDecl>,
    /// The parameters the train takes (optional; without it, an approval scoped to the
    /// train's schema admits no run).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub params: Option<ParamsDecl>,
    /// Filled in by `amicus train build`; absent from an author's source `train.toml`.
    #[serde(default)]
    pub files: Vec<FileEntry>,
}

impl Manifest {
    /// Parse a manifest as an author writes it (no canonical-form requirement) and validate
    /// everything except the file list.
    pub fn parse_source(text: &str) -> Result<Manifest, ManifestError> {
        if text.len() > MAX_MANIFEST_BYTES {
            return Err(ManifestError::TooLarge);
        }
        let mut m: Manifest =
            toml::from_str(text).map_err(|e| ManifestError::Parse(e.message().to_string()))?;
        m.normalize();
        m.validate_declarations()?;
        Ok(m)
    }

    /// Parse the manifest stored in a bundle: it must be complete, valid and canonical.
    pub fn parse_canonical(bytes: &[u8]) -> Result<Manifest, ManifestError> {
        if bytes.len() > MAX_MANIFEST_BYTES {
            return Err(ManifestError::TooLarge);
        }
        let text = std::str::from_utf8(bytes)
            .map_err(|_| ManifestError::Parse("not UTF-8".to_string()))?;
        let m: Manifest =
            toml::from_str(text).map_err(|e| ManifestError::Parse(e.message().to_string()))?;
        m.validate()?;
        if m.to_canonical().as_bytes() != bytes {
            return Err(ManifestError::NotCanonical);
        }
        Ok(m)
    }

    /// Sort and deduplicate the sets so that equal meaning gives equal bytes.
    pub fn normalize(&mut self) {
        self.capabilities.sort();
        self.capabilities.dedup();
    }

    /// The canonical TOML text.
    pub fn to_canonical(&self) -> String {
        toml::to_string(self).expect("a manifest always serialises to TOML")
    }

    /// The bundle digest: SHA-256 of the canonical manifest.
    pub fn digest(&self) -> Digest {
        sha256(self.to_canonical().as_bytes())
    }

    pub fn file(&self, path: &str) -> Option<&FileEntry> {
        self.files.iter().find(|f| f.path == path)
    }

    pub fn output(&self, name: &str) -> Option<&OutputDecl> {
        self.outputs.iter().find(|o| o.name == name)
    }

    /// Full validation of a built manifest.
    pub fn validate(&self) -> Result<(), ManifestError> {
        self.validate_declarations()?;
        let mut sorted = self.capabilities.clone();
        sorted.sort();
        sorted.dedup();
        if sorted != self.capabilities {
            return Err(invalid("capabilities", "must be sorted and unique"));
        }
        if self.files.len() > MAX_FILES {
            return Err(invalid("files", format!("more than {MAX_FILES} files")));
        }
        let mut paths = BTreeSet::new();
        for f in &self.files {
            check_path(&f.path)?;
            if !paths.insert(f.path.as_str()) {
                return Err(invalid("files", format!("{:?} listed twice", f.path)));
            }
        }
        if !paths.contains(COMPONENT_PATH) {
            return Err(invalid("files", format!("no {COMPONENT_PATH:?} entry")));
        }
        for m in &self.models {
            if !paths.contains(m.file.as_str()) {
                return Err(invalid(
                    "models",
                    format!("{:?} is not listed in files", m.file),
                ));
            }
        }
        Ok(())
    }

    fn validate_declarations(&self) -> Result<(), ManifestError> {
        let t = &self.train;
        if t.name.is_empty()
            || t.name.len() > 64
            || !t
                .name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        {
            return Err(invalid(
                "train.name",
                "1-64 characters of a-z, 0-9, '-' and '_'",
            ));
        }
        if t.version.is_empty() || t.version.len() > 64 || !t.version.bytes().all(is_plain) {
            return Err(invalid(
                "train.version",
                "1-64 characters of letters, digits, '.', '-', '_', '+'",
            ));
        }
        if let Some(p) = &self.params {
            if p.schema.len() > MAX_PARAMS_SCHEMA_BYTES {
                return Err(invalid("params.schema", "longer than 16 KiB"));
            }
            if let Err(e) = p.schema_json() {
                return Err(ManifestError::Invalid {
                    field: "params.schema".into(),
                    reason: e,
                });
            }
        }
        if t.description.len() > 4096 || t.authors.iter().any(|a| a.len() > 256) {
            return Err(invalid("train", "description or author too long"));
        }
        if t.contract != CONTRACT {
            return Err(invalid(
                "train.contract",
                format!(
                    "built against {:?}, this amicus implements {CONTRACT:?}",
                    t.contract
                ),
            ));
        }
        let l = &self.limits;
        if l.fuel == 0 {
            return Err(invalid("limits.fuel", "must be positive"));
        }
        if !(1..=65536).contains(&l.memory_mib) {
            return Err(invalid("limits.memory_mib", "must be 1..=65536"));
        }
        if !(1..=86400).contains(&l.wall_seconds) {
            return Err(invalid("limits.wall_seconds", "must be 1..=86400"));
        }
        if self.outputs.len() > MAX_OUTPUTS {
            return Err(invalid(
                "outputs",
                format!("more than {MAX_OUTPUTS} outputs"),
            ));
        }
        let mut names = BTreeSet::new();
        for o in &self.outputs {
            check_output_name(&o.name)?;
            if !names.insert(o.name.as_str()) {
                return Err(invalid("outputs", format!("{:?} declared twice", o.name)));
            }
            if o.max_bytes == 0 || o.max_bytes > MAX_OUTPUT_BYTES {
                return Err(invalid(
                    format!("outputs.{}.max_bytes", o.name),
                    format!("must be 1..={MAX_OUTPUT_BYTES}"),
                ));
            }
        }
        for m in &self.models {
            check_path(&m.file)?;
        }
        Ok(())
    }
}

fn is_plain(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b'+')
}

/// An output name: 1-128 of letters, digits, '.', '-', '_', not starting with '.'.
pub fn check_output_name(name: &str) -> Result<(), ManifestError> {
    if name.is_empty() || name.len() > 128 || name.starts_with('.') || !name.bytes().all(is_plain) {
        return Err(invalid(
            "outputs.name",
            format!(
                "{name:?}: 1-128 characters of letters, digits, '.', '-', '_', '+', not starting with '.'"
            ),
        ));
    }
    Ok(())
}

/// A relative path inside a bundle: '/'-separated segments of plain characters, no `.`/`..`.
pub fn check_path(path: &str) -> Result<(), ManifestError> {
    let ok = !path.is_empty()
        && path.len() <= 200
        && path
            .split('/')
            .all(|seg| !seg.is_empty() && !seg.starts_with('.') && seg.bytes().all(is_plain));
    if !ok {
        return Err(invalid(
            "files.path",
            format!("{path:?} is not a plain relative path"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    pub(crate) const SOURCE: &str = r#"
capabilities = ["cohort", "cohort"]

[train]
name = "cohort-stats"
version = "0.1.0"
authors = ["Alice <alice@example.org>"]
description = "counts"

[limits]
fuel = 1000000
memory_mib = 64
wall_seconds = 10

[[outputs]]
name = "summary.json"
kind = "statistics"
max_bytes = 4096
"#;

    fn built() -> Manifest {
        let mut m = Manifest::parse_source(SOURCE).unwrap();
        m.files.push(FileEntry {
            path: COMPONENT_PATH.into(),
            size: 3,
            sha256: sha256(b"abc"),
        });
        m
    }

    #[test]
    fn canonical_round_trip() {
        let m = built();
        assert_eq!(m.capabilities, vec![Capability::Cohort]);
        let text = m.to_canonical();
        let back = Manifest::parse_canonical(text.as_bytes()).unwrap();
        assert_eq!(back, m);
        assert_eq!(back.digest(), sha256(text.as_bytes()));
    }

    #[test]
    fn non_canonical_is_refused() {
        let text = built().to_canonical();
        let edited = text.replace("memory_mib = 64", "memory_mib =  64");
        assert_ne!(edited, text);
        assert_eq!(
            Manifest::parse_canonical(edited.as_bytes()),
            Err(ManifestError::NotCanonical)
        );
    }

    #[test]
    fn refuses_bad_declarations() {
        let cases = [
            ("name = \"cohort-stats\"", "name = \"../evil\""),
            ("max_bytes = 4096", "max_bytes = 0"),
            ("fuel = 1000000", "fuel = 0"),
            ("name = \"summary.json\"", "name = \".hidden\""),
            ("[limits]", "[limits]\nnetwork = true"),
            (
                "capabilities = [\"cohort\", \"cohort\"]",
                "capabilities = [\"sockets\"]",
            ),
        ];
        for (from, to) in cases {
            let text = SOURCE.replace(from, to);
            assert!(Manifest::parse_source(&text).is_err(), "accepted {to}");
        }
    }

    #[test]
    fn refuses_bad_paths() {
        for p in [
            "",
            "/etc/passwd",
            "../x",
            "models/../x",
            "a//b",
            ".hidden",
            "a b",
        ] {
            assert!(check_path(p).is_err(), "accepted {p:?}");
        }
        assert!(check_path("models/unet.onnx").is_ok());
    }

    #[test]
    fn built_manifest_needs_component() {
        let mut m = built();
        m.files.clear();
        assert!(m.validate().is_err());
    }

    proptest! {
        #[test]
        fn parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = Manifest::parse_canonical(&bytes);
        }

        #[test]
        fn edited_source_never_panics(pos in 0usize..400, byte in any::<u8>()) {
            let mut bytes = built().to_canonical().into_bytes();
            let i = pos % bytes.len();
            bytes[i] = byte;
            let _ = Manifest::parse_canonical(&bytes);
        }
    }
}
