//! ONNX Runtime on the station: where its shared library is, one process-wide environment,
//! and sessions that take and give named f32 tensors as plain data.
//!
//! The library is ONNX Runtime's CPU build from the pinned `onnxruntime` wheel on PyPI, which
//! `scripts/setup.sh` unpacks to `~/.cache/amicus/onnxruntime/` (hash-checked); it is loaded at
//! run time (`ort`'s `load-dynamic`), so nothing needs to be set by the user. `AMICUS_ORT_LIB`
//! overrides the path (a GPU build, for instance).
//!
//! Owns loading the runtime and moving tensors across (this module), host-side optimizers
//! (`optim`) and the training step around a derived training graph (`trainer`); it does not
//! decide which models may run (the station does) and does not derive gradients
//! (`amicus-autodiff` does).

pub mod optim;
pub mod trainer;

use std::path::PathBuf;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

/// The ONNX Runtime release the station is built and tested against.
pub const ORT_VERSION: &str = "1.31.1";

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error(
        "ONNX Runtime library not found at {0} (run scripts/setup.sh, or point AMICUS_ORT_LIB at libonnxruntime.so.{ORT_VERSION})"
    )]
    LibraryMissing(String),
    #[error("ONNX Runtime could not be loaded from {path}: {reason}")]
    LibraryUnloadable { path: String, reason: String },
    #[error("the model was refused by ONNX Runtime: {0}")]
    Model(String),
    #[error("running the model failed: {0}")]
    Run(String),
    #[error("tensor {name}: {reason}")]
    Tensor { name: String, reason: String },
    #[error("refused input: {0}")]
    Input(String),
    #[error("stopped: the time limit passed during an ONNX Runtime call")]
    Deadline,
    #[error("{0}")]
    DeviceUnavailable(String),
}

/// Where ONNX Runtime runs a model: the station's policy chooses.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Device {
    /// The CPU execution provider (every ONNX Runtime build has it).
    #[default]
    Cpu,
    /// NVIDIA GPUs through ONNX Runtime's CUDA execution provider; refused when the loaded
    /// library has none.
    Cuda,
    /// CUDA when the library has it, else the CPU.
    Auto,
}

/// Whether the loaded ONNX Runtime library has the CUDA execution provider (the
/// `onnxruntime-gpu` build; the CPU build does not).
pub fn cuda_available() -> Result<bool, KernelError> {
    use ort::ep::ExecutionProvider;
    environment()?;
    ort::ep::CUDA::is_available().map_err(|e| KernelError::Model(e.to_string()))
}

/// Where the shared library is expected.
pub fn library_path() -> PathBuf {
    if let Some(p) = std::env::var_os("AMICUS_ORT_LIB") {
        return PathBuf::from(p);
    }
    PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
        .join(".cache/amicus/onnxruntime")
        .join(format!("libonnxruntime.so.{ORT_VERSION}"))
}

static ENVIRONMENT: OnceLock<Result<ort::environment::Environment, String>> = OnceLock::new();

/// The process-wide ONNX Runtime environment, loading the library on first use.
fn environment() -> Result<&'static ort::environment::Environment, KernelError> {
    let path = library_path();
    let env = ENVIRONMENT.get_or_init(|| {
        if !path.is_file() {
            return Err(String::new());
        }
        ort::init_from(&path)
            .map_err(|e| e.to_string())?
            .with_name("amicus")
            .build()
            .map_err(|e| e.to_string())
    });
    match env {
        Ok(e) => Ok(e),
        Err(reason) if reason.is_empty() => {
            Err(KernelError::LibraryMissing(path.display().to_string()))
        }
        Err(reason) => Err(KernelError::LibraryUnloadable {
            path: path.display().to_string(),
            reason: reason.clone(),
        }),
    }
}

/// Whether the runtime can be loaded here (for tools that report it).
pub fn available() -> Result<(), KernelError> {
    environment().map(|_| ())
}

/// A named f32 tensor as plain data, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl Tensor {
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Tensor {
        Tensor { shape, data }
    }

    pub fn scalar(v: f32) -> Tensor {
        Tensor {
            shape: vec![],
            data: vec![v],
        }
    }
}

/// A model loaded into ONNX Runtime.
pub struct Session {
    inner: ort::session::Session,
    /// Where it runs: `Cpu` or `Cuda` (never `Auto`).
    device: Device,
}

impl Session {
    /// Load a model from its bytes, with `threads` intra-op threads and every graph
    /// optimisation on.
    pub fn from_bytes(model: &[u8], threads: usize) -> Result<Session, KernelError> {
        Session::from_bytes_on(model, threads, Device::Cpu)
    }

    /// `from_bytes` on `device`: `Cuda` is refused (`DeviceUnavailable`) when the library has
    /// no CUDA execution provider; `Auto` then uses the CPU. ONNX Runtime places each node on
    /// the GPU when the CUDA provider has a kernel for it, on the CPU otherwise.
    pub fn from_bytes_on(
        model: &[u8],
        threads: usize,
        device: Device,
    ) -> Result<Session, KernelError> {
        Session::from_bytes_capped(
            model,
            threads,
            device,
            &amicus_autodiff::loadable::Caps::CEILING,
        )
    }

    /// `from_bytes_on` under the station's `caps`. Every model reaches ONNX Runtime through
    /// here, and only as bytes: it is first checked to be self-contained (no external data, no
    /// field that makes ONNX Runtime open a file; see `amicus_autodiff::loadable`) and within
    /// the caps.
    pub fn from_bytes_capped(
        model: &[u8],
        threads: usize,
        device: Device,
        caps: &amicus_autodiff::loadable::Caps,
    ) -> Result<Session, KernelError> {
        amicus_autodiff::loadable::check(model, caps)
            .map_err(|e| KernelError::Model(e.to_string()))?;
        let env = environment()?;
        let cuda = match device {
            Device::Cpu => false,
            Device::Auto => cuda_available()?,
            Device::Cuda => {
                if !cuda_available()? {
                    return Err(KernelError::DeviceUnavailable(format!(
                        "the station's policy asks for the CUDA execution provider, and the ONNX Runtime library at {} has none (it is the CPU build; install the library of the onnxruntime-gpu wheel {ORT_VERSION} and point AMICUS_ORT_LIB at it, or set the policy's kernels.device to \"cpu\" or \"auto\")",
                        library_path().display()
                    )));
                }
                true
            }
        };
        let model_error = |e: ort::Error| KernelError::Model(e.to_string());
        let mut builder = ort::session::Session::builder(env)
            .map_err(model_error)?
            .with_optimization_level(ort::session::builder::GraphOptimizationLevel::All)
            .map_err(|e| KernelError::Model(e.to_string()))?
            .with_intra_threads(threads.max(1))
            .map_err(|e| KernelError::Model(e.to_string()))?;
        if cuda {
            builder = builder
                .with_execution_providers([ort::ep::CUDA::default().build().error_on_failure()])
                .map_err(|e| KernelError::DeviceUnavailable(format!("CUDA: {e}")))?;
        }
        let inner = builder.commit_from_memory(model).map_err(model_error)?;
        Ok(Session {
            inner,
            device: if cuda { Device::Cuda } else { Device::Cpu },
        })
    }

    /// Where the session runs (`Cpu` or `Cuda`).
    pub fn device(&self) -> Device {
        self.device
    }

    /// Names of the model's inputs, in order.
    pub fn input_names(&self) -> Vec<String> {
        self.inner
            .inputs()
            .iter()
            .map(|i| i.name().to_string())
            .collect()
    }

    /// Names of the model's outputs, in order.
    pub fn output_names(&self) -> Vec<String> {
        self.inner
            .outputs()
            .iter()
            .map(|o| o.name().to_string())
            .collect()
    }

    /// Run with `inputs`, returning the outputs `wanted` (every output when empty), by name.
    pub fn run(
        &mut self,
        inputs: &[(&str, &Tensor)],
        wanted: &[&str],
    ) -> Result<Vec<(String, Tensor)>, KernelError> {
        self.run_until(inputs, wanted, None)
    }

    /// `run`, stopped by ONNX Runtime (between nodes) once `deadline` passes: the time limit
    /// of a run must also hold inside host code, where wasm's epoch checks do not reach.
    pub fn run_until(
        &mut self,
        inputs: &[(&str, &Tensor)],
        wanted: &[&str],
        deadline: Option<Instant>,
    ) -> Result<Vec<(String, Tensor)>, KernelError> {
        let Some(deadline) = deadline else {
            return self.run_with(inputs, wanted, None);
        };
        if Instant::now() >= deadline {
            return Err(KernelError::Deadline);
        }
        let options =
            ort::session::RunOptions::new().map_err(|e| KernelError::Run(e.to_string()))?;
        let finished = AtomicBool::new(false);
        let result = std::thread::scope(|scope| {
            let watchdog = scope.spawn(|| {
                // Parked until the run ends (unpark) or the deadline passes.
                while !finished.load(Ordering::Acquire) {
                    let now = Instant::now();
                    if now >= deadline {
                        let _ = options.terminate();
                        return true;
                    }
                    std::thread::park_timeout(deadline - now);
                }
                false
            });
            let result = self.run_with(inputs, wanted, Some(&options));
            finished.store(true, Ordering::Release);
            watchdog.thread().unpark();
            let terminated = watchdog.join().unwrap_or(false);
            (result, terminated)
        });
        match result {
            (Err(_), true) => Err(KernelError::Deadline),
            (result, _) => result,
        }
    }

    fn run_with(
        &mut self,
        inputs: &[(&str, &Tensor)],
        wanted: &[&str],
        options: Option<&ort::session::RunOptions>,
    ) -> Result<Vec<(String, Tensor)>, KernelError> {
        let mut feeds: Vec<(String, ort::session::SessionInputValue<'_>)> =
            Vec::with_capacity(inputs.len());
        for (name, t) in inputs {
            let expected: usize = t.shape.iter().product();
            if expected != t.data.len() {
                return Err(KernelError::Tensor {
                    name: name.to_string(),
                    reason: format!(
                        "shape {:?} holds {expected} values, data has {}",
                        t.shape,
                        t.data.len()
                    ),
                });
            }
            let value =
                ort::value::TensorRef::from_array_view((t.shape.clone(), t.data.as_slice()))
                    .map_err(|e| KernelError::Tensor {
                        name: name.to_string(),
                        reason: e.to_string(),
                    })?;
            feeds.push((name.to_string(), value.into()));
        }
        let names: Vec<String> = if wanted.is_empty() {
            self.output_names()
        } else {
            wanted.iter().map(|s| s.to_string()).collect()
        };
        let outputs = match options {
            Some(o) => self.inner.run_with_options(feeds, o),
            None => self.inner.run(feeds),
        }
        .map_err(|e| KernelError::Run(e.to_string()))?;
        names
            .into_iter()
            .map(|name| {
                let value = outputs.get(&name).ok_or_else(|| KernelError::Tensor {
                    name: name.clone(),
                    reason: "not an output of the model".into(),
                })?;
                let (shape, data) =
                    value
                        .try_extract_tensor::<f32>()
                        .map_err(|e| KernelError::Tensor {
                            name: name.clone(),
                            reason: e.to_string(),
                        })?;
                let shape = shape.iter().map(|d| *d as usize).collect();
                Ok((name, Tensor::new(shape, data.to_vec())))
            })
            .collect()
    }
}
