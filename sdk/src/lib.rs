//! Write amicus trains in Rust.
//!
//! A train is a WebAssembly component (`wasm32-wasip2`) that a station runs in its sandbox.
//! This crate binds the `amicus:train` WIT contract (`wit/train.wit`) for the guest side and
//! wraps it in a small Rust API: logging, progress, `emit` of declared outputs, and the
//! capability interfaces (`cohort`, `imaging`, `kernels`).
//!
//! It owns nothing on the host side and must never grow a way around the contract: everything
//! a train does goes through the imports below, which the station checks and audits.
//!
//! # Example
//!
//! ```no_run
//! use amicus_sdk::{Params, Train};
//!
//! struct CountSeries;
//!
//! impl Train for CountSeries {
//!     fn run(params: Params) -> amicus_sdk::Result<()> {
//!         let modality: String = params.get("modality")?.unwrap_or_else(|| "CT".into());
//!         amicus_sdk::log::info(&format!("counting {modality} series"));
//!         amicus_sdk::progress(0.5, "querying");
//!         let rows = amicus_sdk::cohort::select(
//!             "SELECT ?s WHERE { ?s a <urn:example:Series> }",
//!         )?;
//!         amicus_sdk::emit_json("summary.json", &serde_json::json!({ "series": rows.rows.len() }))?;
//!         Ok(())
//!     }
//! }
//!
//! amicus_sdk::export_train!(CountSeries);
//! ```
//!
//! The outputs a train may emit (here `summary.json`), the capabilities it uses (here
//! `cohort`) and its resource limits are declared in the crate's `train.toml`; see the
//! repository README.

#[doc(hidden)]
pub mod bindings {
    wit_bindgen::generate!({
        world: "train",
        path: "../wit",
        pub_export_macro: true,
        export_macro_name: "__export_train_world",
        default_bindings_module: "amicus_sdk::bindings",
    });
}

use bindings::amicus::train::output;
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::fmt;

/// The error a host call returns (see the WIT `types.error` variant).
pub use bindings::amicus::train::types::Error as HostError;

/// A one-line human description of a host error.
pub fn describe(e: &HostError) -> String {
    match e {
        HostError::NotAvailable(m) => format!("not available on this station: {m}"),
        HostError::Denied(m) => format!("denied by station policy: {m}"),
        HostError::InvalidArgument(m) => format!("invalid argument: {m}"),
        HostError::LimitExceeded(m) => format!("station limit exceeded: {m}"),
        HostError::Failed(m) => format!("host failure: {m}"),
    }
}

/// Why a train run failed. The message goes to the station's log and audit trail; it never
/// leaves the station.
#[derive(Debug)]
pub struct Error(pub String);

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<HostError> for Error {
    fn from(e: HostError) -> Self {
        Error(describe(&e))
    }
}

impl From<serde_json::Error> for Error {
    fn from(e: serde_json::Error) -> Self {
        Error(format!("JSON: {e}"))
    }
}

impl From<String> for Error {
    fn from(e: String) -> Self {
        Error(e)
    }
}

impl From<&str> for Error {
    fn from(e: &str) -> Self {
        Error(e.to_string())
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The task parameters a train was started with (JSON).
#[derive(Debug, Clone)]
pub struct Params(serde_json::Value);

impl Params {
    /// Parse parameters; empty text means `{}`.
    pub fn parse(text: &str) -> Result<Params> {
        if text.trim().is_empty() {
            return Ok(Params(serde_json::Value::Object(Default::default())));
        }
        Ok(Params(serde_json::from_str(text)?))
    }

    /// The whole parameter document.
    pub fn value(&self) -> &serde_json::Value {
        &self.0
    }

    /// Deserialize the whole document into `T`.
    pub fn to<T: DeserializeOwned>(&self) -> Result<T> {
        Ok(serde_json::from_value(self.0.clone())?)
    }

    /// Field `key` of a top-level object, if present.
    pub fn get<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>> {
        match self.0.get(key) {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(v) => serde_json::from_value(v.clone())
                .map(Some)
                .map_err(|e| Error(format!("parameter {key:?}: {e}"))),
        }
    }
}

/// A train: implement this and call [`export_train!`].
pub trait Train {
    fn run(params: Params) -> Result<()>;
}

/// Logging to the run's log at the station (size-capped, never leaves the station).
pub mod log {
    use super::output::{self, Level};

    pub fn debug(message: &str) {
        output::log(Level::Debug, message);
    }
    pub fn info(message: &str) {
        output::log(Level::Info, message);
    }
    pub fn warn(message: &str) {
        output::log(Level::Warn, message);
    }
    pub fn error(message: &str) {
        output::log(Level::Error, message);
    }
}

/// Report progress in [0, 1] to the station operator.
pub fn progress(fraction: f32, message: &str) {
    output::progress(fraction, message);
}

/// Emit the declared output `name`. An undeclared name, a repeated name or data over the size
/// limit ends the run at once and nothing is released.
pub fn emit(name: &str, data: &[u8]) {
    output::emit(name, data);
}

/// Emit `value` as JSON under the declared output `name`.
pub fn emit_json<T: Serialize>(name: &str, value: &T) -> Result<()> {
    let bytes = serde_json::to_vec_pretty(value)?;
    emit(name, &bytes);
    Ok(())
}

/// Capability `cohort`: SPARQL SELECT over the station's FAIR index.
///
/// The index uses LinkedDicom's DICOM-tag vocabulary (see the repository's
/// `docs/fair-index.md`): `?series ldcm:T00080060 "CT"` is "Modality is CT".
pub mod cohort {
    pub use crate::bindings::amicus::train::cohort::{
        Literal, Solutions, TallyCell, TallyResult, Term,
    };

    /// The LinkedDicom namespace, for `PREFIX ldcm: <...>`.
    pub const LDCM: &str = "https://johanvansoest.nl/ontologies/LinkedDicom/";

    /// Run a SPARQL SELECT query. Every row must hold a patient, study or series IRI and the
    /// rows must cover the station's minimum cohort, or the station refuses.
    pub fn select(sparql: &str) -> Result<Solutions, crate::HostError> {
        crate::bindings::amicus::train::cohort::select(sparql)
    }

    /// Count distinct patients per group of the non-IRI columns of a SELECT; the station
    /// suppresses groups under its minimum cohort.
    pub fn tally(sparql: &str) -> Result<TallyResult, crate::HostError> {
        crate::bindings::amicus::train::cohort::tally(sparql)
    }

    impl Term {
        /// The lexical value: IRI, literal value or blank node label.
        pub fn text(&self) -> &str {
            match self {
                Term::Iri(s) | Term::BlankNode(s) => s,
                Term::Literal(l) => &l.value,
            }
        }
    }
}

/// Host-side tensors shared by `imaging` and `kernels`.
pub mod tensors {
    pub use crate::bindings::amicus::train::tensors::Tensor;
}

/// Capability `imaging`: series and masks as host tensors.
pub mod imaging {
    pub use crate::bindings::amicus::train::imaging::*;
}

/// Capability `kernels`: ONNX inference and training on the station.
pub mod kernels {
    pub use crate::bindings::amicus::train::kernels::*;
}

/// Part of `kernels` in a federated job: the round's global weights in, the update out
/// (clipped, noised and counted by the station, never emitted by the train).
pub mod federated {
    pub use crate::bindings::amicus::train::federated::*;
}

#[doc(hidden)]
pub fn __run<T: Train>(params: String) -> std::result::Result<(), String> {
    std::panic::set_hook(Box::new(|info| {
        output::log(output::Level::Error, &format!("train panicked: {info}"));
    }));
    let params = Params::parse(&params).map_err(|e| format!("parameters: {e}"))?;
    T::run(params).map_err(|e| e.0)
}

/// Export `$train` (a type implementing [`Train`]) as the component's `run` function.
#[macro_export]
macro_rules! export_train {
    ($train:ty) => {
        #[doc(hidden)]
        struct __AmicusTrainEntry;

        impl $crate::bindings::Guest for __AmicusTrainEntry {
            fn run(
                params: ::std::string::String,
            ) -> ::std::result::Result<(), ::std::string::String> {
                $crate::__run::<$train>(params)
            }
        }

        $crate::bindings::__export_train_world!(__AmicusTrainEntry with_types_in $crate::bindings);
    };
}
