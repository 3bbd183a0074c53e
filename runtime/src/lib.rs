//! The amicus station: everything that happens inside a hospital.
//!
//! - [`policy`]: the data owner's decisions (`policy.toml`) and the admission checks;
//! - [`privacy`]: the privacy each train digest has spent here (federated updates);
//! - [`audit`]: the signed, hash-chained audit log; [`prov`]: its export as PROV-O;
//!   [`rekey`]: the rotation of the station key that signs it;
//! - [`sandbox`]: the wasmtime sandbox and the host side of the `amicus:train` contract;
//! - [`station`]: a station directory, and the verify → admit → run → release flow that ties
//!   the others together.
//!
//! The runtime must never let data leave except as a declared, size-checked output of a
//! successful run, and must never act on a bundle before verifying it.

pub mod audit;
pub mod disclosure;
pub mod host;
pub mod noise;
pub mod policy;
pub mod privacy;
pub mod prov;
pub mod rekey;
pub mod sandbox;
pub mod station;
pub mod worker;
