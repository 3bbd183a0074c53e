//! The run worker: every train runs in a child process of its own, which the operating system
//! confines and bounds.
//!
//! The station (`station run` and the `station serve` daemon alike) verifies and admits a
//! bundle, writes the audit log and releases outputs; the worker only instantiates and runs.
//! The worker holds no key, starts in an empty private directory, and before the train starts
//! it restricts itself (Landlock: read only the archive and the ONNX Runtime library; no TCP,
//! no signals out), bounds its memory and CPU (`RLIMIT_DATA`, `RLIMIT_CPU`), drops
//! capabilities and installs a seccomp filter (no sockets, no exec, no new processes). The
//! station kills it at the run's deadline plus a short grace, whatever host code it is in
//! (ONNX Runtime, oxigraph, a codec, a blocking WASI call), and a worker that crashes
//! (panic, abort, out of memory, signal) ends its run as `failed` with the reason, while the
//! station goes on.
//!
//! - [`protocol`]: the frames on the pipes and the messages;
//! - [`supervise`]: the station's side (start, feed, follow, kill, reap, classify);
//! - [`child`]: the worker's side (`amicus __run-worker`);
//! - [`confine`]: Landlock, resource limits, capabilities and seccomp.
//!
//! Must not: hold or read any key, write the audit log (the station does, from the reports),
//! decide policy, or release anything.

pub mod child;
pub mod confine;
pub mod protocol;
pub mod supervise;

pub use supervise::{SUBCOMMAND, WorkerCommand};
