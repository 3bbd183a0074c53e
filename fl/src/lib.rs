//! The arithmetic of federated learning, as plain functions over flat `f32` vectors: how the
//! registry combines the stations' updates (`aggregate`: FedAvg weighted by samples,
//! coordinate-wise median, trimmed mean, update-norm clipping, non-finite rejection; FedAdam,
//! FedYogi and server SGD), how updates travel small (`quant`: 8-bit blockwise quantisation),
//! how a station counts the privacy it spends (`rdp`: the Rényi-DP accountant of the sampled
//! Gaussian mechanism), and how the registry learns only the sum of a round's updates
//! (`secagg`: pairwise masking with secret-shared recovery of dropped stations), and the
//! bytes of weights and updates (`wire`).
//!
//! Owns the numbers only. Must not do I/O, know about the registry, stations or rounds, or
//! draw randomness it is not given: callers pass seeds and get reproducible results.

pub mod aggregate;
pub mod quant;
pub mod rdp;
pub mod secagg;
pub mod wire;
