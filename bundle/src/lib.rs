//! Train bundles: what a train *is*, independent of where it runs.
//!
//! This crate owns the train manifest (`train.toml`) and its canonical form, the bundle file
//! (a tar archive holding the manifest, the component and model files), the bundle digest
//! (SHA-256 of the canonical manifest), Ed25519 key files, and signatures over the digest in
//! DSSE envelopes carrying an in-toto Statement; and the format of a station's signed audit
//! chain with its verification (`audit_chain`), which registries and auditors run without a
//! station runtime.
//!
//! It must not run anything, touch a station's state or know about policy: the station
//! (`amicus-runtime`), the CLI and the registry all build on it. Everything read from a file is
//! treated as hostile: sizes are capped, names are checked, hashes verified before use.

pub mod audit_chain;
pub mod bundle;
pub mod digest;
pub mod dsse;
pub mod keys;
pub mod manifest;
pub mod params;
pub mod text;

pub use bundle::{Bundle, BundleError, SignatureCheck, SignerReport, TrustedKey};
pub use digest::{Digest, sha256};
pub use keys::{KeyError, KeyId, PublicKey, SecretKey};
pub use manifest::{
    CONTRACT, Capability, FileEntry, Limits, Manifest, ManifestError, ModelDecl, ModelRole,
    OutputDecl, OutputKind, ParamsDecl, TrainInfo,
};
