//! `amicus model`: tools for the ONNX models trains ship. `model new` writes a CNN classifier
//! or a 2D U-Net; `model grad` writes the training graph the station would derive from a
//! forward model, for inspection (the station derives its own from the signed model; this is
//! the same derivation).

use anyhow::{Context, Result, bail};
use std::path::PathBuf;

#[derive(clap::Subcommand)]
pub enum ModelCommand {
    /// Derive the training graph of a forward model (loss and every weight's gradient, standard
    /// ONNX ops only) and write it.
    Grad {
        /// The forward model (.onnx, opset 13-21).
        model: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// mse, ce (softmax cross-entropy over axis 1), bce (with logits), dice (soft Dice of
        /// the sigmoid), or a weighted sum such as "0.5*ce+0.5*dice".
        #[arg(long, default_value = "ce")]
        loss: String,
        /// Initializers to train, comma-separated (default: every float initializer a
        /// gradient reaches).
        #[arg(long, value_delimiter = ',')]
        trainable: Option<Vec<String>>,
        /// The graph output the loss applies to (default: the first).
        #[arg(long)]
        prediction: Option<String>,
        /// The trainer's seed (it seeds Dropout; a train's `trainer-options.seed`), to
        /// reproduce the graph a station ran.
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Write a standard ONNX model (opset 17, He-initialised from a seed): a CNN classifier
    /// or a 2D U-Net. Input `image` [N, channels, height, width], output `logits`.
    #[command(subcommand)]
    New(NewModel),
}

#[derive(clap::Subcommand)]
pub enum NewModel {
    /// 3×3 conv + ReLU + 2×2 max-pool blocks, global average pooling, a linear head.
    Cnn {
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 1)]
        channels: i64,
        #[arg(long, default_value_t = 64)]
        height: i64,
        #[arg(long, default_value_t = 64)]
        width: i64,
        #[arg(long, default_value_t = 2)]
        classes: i64,
        /// Channels of each block, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "16,32")]
        widths: Vec<i64>,
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// A U-Net: `depth` levels of two 3×3 conv + ReLU, transposed-conv upsampling with skip
    /// connections, a 1×1 conv to per-pixel logits.
    Unet2d {
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 1)]
        channels: i64,
        #[arg(long, default_value_t = 128)]
        height: i64,
        #[arg(long, default_value_t = 128)]
        width: i64,
        #[arg(long, default_value_t = 2)]
        classes: i64,
        /// Channels of the first level (doubled at each level down).
        #[arg(long, default_value_t = 16)]
        base: i64,
        #[arg(long, default_value_t = 3)]
        depth: u32,
        /// Normalisation after each 3×3 convolution: none, batch or instance.
        #[arg(long, default_value = "none")]
        norm: String,
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
}

/// Write `bytes` to `out` atomically (temporary file in the same folder, fsync, rename).
fn write_atomically(out: &std::path::Path, bytes: &[u8]) -> Result<()> {
    let dir = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    std::io::Write::write_all(&mut tmp, bytes)?;
    // Models are not secrets: readable like any file the user writes.
    tmp.as_file()
        .set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o644))?;
    tmp.as_file().sync_all()?;
    tmp.persist(out)
        .with_context(|| format!("writing {}", out.display()))?;
    Ok(())
}

pub fn run(c: ModelCommand) -> Result<()> {
    match c {
        ModelCommand::Grad {
            model,
            out,
            loss,
            trainable,
            prediction,
            seed,
        } => {
            let bytes =
                std::fs::read(&model).with_context(|| format!("reading {}", model.display()))?;
            let forward = amicus_autodiff::onnx::ModelProto::from_bytes(&bytes)
                .with_context(|| model.display().to_string())?;
            let spec = amicus_autodiff::Spec {
                trainable,
                prediction,
                loss: amicus_autodiff::Loss::parse(&loss).map_err(|e| anyhow::anyhow!(e))?,
                seed,
            };
            let tg = amicus_autodiff::derive(&forward, &spec)
                .with_context(|| format!("deriving the training graph of {}", model.display()))?;
            let encoded = tg.model.to_bytes();
            // Check that ONNX Runtime takes the graph before writing it (where the runtime is
            // installed; the derivation itself does not need it).
            let loads = match amicus_kernels::Session::from_bytes(&encoded, 1) {
                Ok(_) => true,
                Err(
                    e @ (amicus_kernels::KernelError::LibraryMissing(_)
                    | amicus_kernels::KernelError::LibraryUnloadable { .. }),
                ) => {
                    eprintln!("warning: not checked with ONNX Runtime: {e}");
                    false
                }
                Err(e) => bail!("the derived graph does not load in ONNX Runtime: {e}"),
            };
            write_atomically(&out, &encoded)?;
            let params: usize = tg.weights.iter().map(|w| w.initial.len()).sum();
            let nodes = tg.model.graph.as_ref().map_or(0, |g| g.node.len());
            println!(
                "wrote {} ({} bytes, {nodes} nodes): inputs {} + {} + {} weights ({params} parameters); outputs {}, {}, and a gradient per weight",
                out.display(),
                encoded.len(),
                tg.data_inputs.join(", "),
                tg.labels,
                tg.weights.len(),
                tg.loss,
                tg.prediction
            );
            for w in &tg.weights {
                println!("  {:<32} {:?} -> {}", w.name, w.shape, w.grad);
            }
            if loads {
                println!("ONNX Runtime {} loads it", amicus_kernels::ORT_VERSION);
            }
            // What a station's audit log names for the trainer it opened on this model.
            println!(
                "training-graph sha256:{}",
                amicus_bundle::sha256(&encoded).to_hex()
            );
            Ok(())
        }
        ModelCommand::New(kind) => {
            let (model, out) = match kind {
                NewModel::Cnn {
                    out,
                    channels,
                    height,
                    width,
                    classes,
                    widths,
                    seed,
                } => (
                    amicus_autodiff::zoo::Cnn {
                        channels,
                        height,
                        width,
                        classes,
                        widths,
                        seed,
                    }
                    .build(),
                    out,
                ),
                NewModel::Unet2d {
                    out,
                    channels,
                    height,
                    width,
                    classes,
                    base,
                    depth,
                    norm,
                    seed,
                } => (
                    amicus_autodiff::zoo::Norm::parse(&norm).and_then(|norm| {
                        amicus_autodiff::zoo::Unet2d {
                            channels,
                            height,
                            width,
                            classes,
                            base,
                            depth,
                            norm,
                            seed,
                        }
                        .build()
                    }),
                    out,
                ),
            };
            let model = model.map_err(|e| anyhow::anyhow!(e))?;
            let params: usize = model
                .graph
                .as_ref()
                .map(|g| g.initializer.iter().filter_map(|t| t.element_count()).sum())
                .unwrap_or(0);
            write_atomically(&out, &model.to_bytes())?;
            println!(
                "wrote {} ({params} parameters): input {} → output {}",
                out.display(),
                amicus_autodiff::zoo::INPUT,
                amicus_autodiff::zoo::OUTPUT
            );
            Ok(())
        }
    }
}
