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
//! - `daemon`: `amicus station serve`, a station's pull-only loop around `amicus-runtime`.
//! - `station_secagg`: a station's part in a securely aggregated round (keys, sealed shares,
//!   masking, revealing).
//!
//! The registry never holds a private key of anyone, never sees a result's plaintext (a federated
//! round's updates are not results: they come to it to be aggregated, masked when the plan asks
//! for secure aggregation), and
//! never runs a train; stations never listen on a socket.

pub mod client;
pub mod daemon;
pub mod db;
pub mod httpsig;
pub mod jobs;
pub mod request;
pub mod sealed;
pub mod server;
pub mod station_request;
pub mod station_secagg;
pub mod wire;
