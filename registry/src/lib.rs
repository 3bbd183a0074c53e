//! The amicus registry and its protocol: the HTTP service researchers, data owners, auditors
//! and stations talk to, and both of its clients.
//!
//! - `server`: routes, authentication, roles and scopes, limits, the refusal audit.
//! - `db`: SQLite or PostgreSQL through sqlx, the embedded migrations, every query.
//! - `jobs`: federated jobs round by round (quorum, aggregation, checkpoints).
//! - `wire`: the JSON bodies (plain data), also described by `registry/openapi.json`.
//! - `httpsig`: RFC 9421 signatures of station requests.
//! - `sealed`: HPKE-sealed results and the researcher's X25519 key files.
//! - `client`: HTTP clients for people (bearer token) and stations (signing key).
//! - `request`: researchers' signed requests and stations' signed outputs.
//!
//! The station's side (`amicus station serve`, its checks of signed requests, its part in
//! secure aggregation) is the `amicus-daemon` crate: this crate must not depend on the station
//! runtime, so a registry is built without wasmtime, ONNX Runtime, oxigraph or DICOM code (it
//! checks stations' audit lines with `amicus_bundle::audit_chain`).
//!
//! The registry never holds a private key of anyone, never sees a result's plaintext (a federated
//! round's updates are not results: they come to it to be aggregated, masked when the plan asks
//! for secure aggregation), and
//! never runs a train; stations never listen on a socket.

pub mod client;
pub mod db;
pub mod httpsig;
pub mod jobs;
pub mod request;
pub mod sealed;
pub mod server;
pub mod wire;
