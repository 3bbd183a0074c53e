//! `amicus bench train`: samples per second of a training step (forward, our derived backward
//! graph, Adam on the host) and of inference, for the `model new` U-Net and CNN on ONNX
//! Runtime, against PyTorch CPU training the same architecture (same layers, same parameter
//! count, same loss and optimizer) in the same run with the same thread count.
//!
//! PyTorch is a baseline, not a dependency: the bench looks for a Python with `torch`
//! (`--python`, `$AMICUS_TORCH_PYTHON`, then the test venv) and reports our figures alone
//! when there is none. Writes JSON and Markdown; asserts nothing; the last line states the
//! headline figure against its goal.

use amicus_autodiff::Loss;
use amicus_autodiff::onnx::ModelProto;
use amicus_autodiff::zoo::{Cnn, Norm, Unet2d};
use amicus_kernels::Tensor;
use amicus_kernels::optim::{Optimizer, Schedule};
use amicus_kernels::trainer::{Trainer, TrainerOptions};
use anyhow::{Context, Result, bail};
use serde::Serialize;
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Args)]
pub struct TrainArgs {
    /// ONNX Runtime intra-op threads (and PyTorch's).
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Timed steps per figure (after the warm-up); figures are medians.
    #[arg(long, default_value_t = 10)]
    steps: usize,
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// U-Net: base width, input size (square), batch.
    #[arg(long, default_value_t = 16)]
    unet_base: i64,
    #[arg(long, default_value_t = 3)]
    unet_depth: u32,
    #[arg(long, default_value_t = 128)]
    unet_size: i64,
    #[arg(long, default_value_t = 8)]
    unet_batch: usize,
    /// CNN: input size (square), batch.
    #[arg(long, default_value_t = 64)]
    cnn_size: i64,
    #[arg(long, default_value_t = 32)]
    cnn_batch: usize,
    /// A Python with `torch` for the baseline (else `$AMICUS_TORCH_PYTHON`, else the test
    /// venv's python if it has torch).
    #[arg(long)]
    python: Option<PathBuf>,
    #[arg(long, default_value = "bench-train.json")]
    out: PathBuf,
}

/// One model's figures.
#[derive(Debug, Serialize)]
struct ModelFigures {
    model: String,
    batch: usize,
    parameters: usize,
    /// Deriving the training graph and loading both sessions (what `trainer.open` costs).
    open_s: f64,
    /// Of which deriving the training graph (median of 5).
    derive_s: f64,
    train_samples_per_s: f64,
    infer_samples_per_s: f64,
    torch: Option<TorchFigures>,
    /// Ours divided by PyTorch's (above 1: faster).
    train_ratio: Option<f64>,
    infer_ratio: Option<f64>,
}

#[derive(Debug, Serialize, serde::Deserialize)]
struct TorchFigures {
    version: String,
    parameters: usize,
    train_samples_per_s: f64,
    infer_samples_per_s: f64,
}

#[derive(Debug, Serialize)]
struct Report {
    threads: usize,
    steps: usize,
    onnxruntime: String,
    torch_python: Option<String>,
    models: Vec<ModelFigures>,
    headline: String,
}

/// The PyTorch side: the same architectures as `amicus_autodiff::zoo`, the same loss and
/// optimizer; argv[1] is a JSON job, stdout one JSON line of figures.
const TORCH_SCRIPT: &str = r#"
import json, sys, time
import torch, torch.nn as nn, torch.nn.functional as F
job = json.loads(sys.argv[1])
torch.set_num_threads(job["threads"])
torch.set_num_interop_threads(1)
torch.manual_seed(0)

def double(cin, cout):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(cout, cout, 3, padding=1), nn.ReLU())

class UNet(nn.Module):
    def __init__(s, channels, classes, base, depth):
        super().__init__()
        s.down, s.up, s.dec = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        cin = channels
        for level in range(depth):
            s.down.append(double(cin, base << level)); cin = base << level
        s.bottom = double(cin, base << depth); cin = base << depth
        for level in reversed(range(depth)):
            w = base << level
            s.up.append(nn.ConvTranspose2d(cin, w, 2, stride=2))
            s.dec.append(double(2 * w, w)); cin = w
        s.head = nn.Conv2d(cin, classes, 1)
    def forward(s, x):
        skips = []
        for d in s.down:
            x = d(x); skips.append(x); x = F.max_pool2d(x, 2)
        x = s.bottom(x)
        for up, dec, skip in zip(s.up, s.dec, reversed(skips)):
            x = dec(torch.cat([up(x), skip], 1))
        return s.head(x)

class CNN(nn.Module):
    def __init__(s, channels, classes, widths):
        super().__init__()
        layers, cin = [], channels
        for w in widths:
            layers += [nn.Conv2d(cin, w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]; cin = w
        s.body = nn.Sequential(*layers)
        s.head = nn.Linear(cin, classes)
    def forward(s, x):
        return s.head(torch.flatten(F.adaptive_avg_pool2d(s.body(x), 1), 1))

def bce_dice(logits, t):
    p = torch.sigmoid(logits)
    dice = 1 - (2 * (p * t).sum() + 1) / (p.sum() + t.sum() + 1)
    return 0.5 * F.binary_cross_entropy_with_logits(logits, t) + 0.5 * dice

m = job["model"]
n, size = job["batch"], job["size"]
x = torch.randn(n, 1, size, size)
if m == "unet":
    model = UNet(1, 1, job["base"], job["depth"])
    y = (torch.rand(n, 1, size, size) > 0.5).float()
    loss_of = lambda out: bce_dice(out, y)
else:
    model = CNN(1, 2, job["widths"])
    y = torch.randint(0, 2, (n,))
    loss_of = lambda out: F.cross_entropy(out, y)
opt = torch.optim.Adam(model.parameters(), lr=1e-3)

def median(v):
    v = sorted(v); return v[len(v) // 2]

def timed(f, warmup, steps):
    for _ in range(warmup): f()
    out = []
    for _ in range(steps):
        t = time.perf_counter(); f(); out.append(time.perf_counter() - t)
    return median(out)

def train_step():
    opt.zero_grad(set_to_none=True)
    loss = loss_of(model(x))
    loss.backward()
    opt.step()

model.train()
train_s = timed(train_step, job["warmup"], job["steps"])
model.eval()
with torch.inference_mode():
    infer_s = timed(lambda: model(x), job["warmup"], job["steps"])
print(json.dumps({
    "version": torch.__version__,
    "parameters": sum(p.numel() for p in model.parameters()),
    "train_samples_per_s": n / train_s,
    "infer_samples_per_s": n / infer_s,
}))
"#;

/// A Python that can import torch, or why there is none.
fn torch_python(explicit: Option<PathBuf>) -> Result<PathBuf, String> {
    let candidates: Vec<PathBuf> = explicit
        .into_iter()
        .chain(std::env::var_os("AMICUS_TORCH_PYTHON").map(PathBuf::from))
        .chain(crate::bench::venv_python())
        .collect();
    for p in &candidates {
        let ok = std::process::Command::new(p)
            .args(["-c", "import torch"])
            .output()
            .is_ok_and(|o| o.status.success());
        if ok {
            return Ok(p.clone());
        }
    }
    Err(format!(
        "no Python with torch among {candidates:?} (give --python or $AMICUS_TORCH_PYTHON)"
    ))
}

struct Job {
    name: &'static str,
    model: ModelProto,
    loss: Loss,
    x: Tensor,
    y: Tensor,
    torch: serde_json::Value,
}

/// Deterministic pseudo-random values in [-1, 1) (the figures do not depend on them).
fn noise(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn measure(job: &Job, args: &TrainArgs, python: Option<&PathBuf>) -> Result<ModelFigures> {
    let batch = job.x.shape[0];
    eprintln!("bench train: {} (batch {batch}) on ONNX Runtime…", job.name);
    let started = Instant::now();
    let mut trainer = Trainer::new(
        &job.model,
        TrainerOptions {
            loss: job.loss.clone(),
            trainable: None,
            optimizer: Optimizer::Adam {
                learning_rate: 1e-3,
                beta1: 0.9,
                beta2: 0.999,
                epsilon: 1e-8,
                weight_decay: 0.0,
                decoupled: false,
            },
            schedule: Schedule::Constant,
            clip_norm: None,
            threads: args.threads,
            seed: 0,
            device: amicus_kernels::Device::Cpu,
        },
    )
    .with_context(|| format!("loading the {} trainer", job.name))?;
    let open_s = started.elapsed().as_secs_f64();
    let spec = amicus_autodiff::Spec {
        trainable: None,
        prediction: None,
        loss: job.loss.clone(),
        seed: 0,
    };
    let mut derive = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        amicus_autodiff::derive(&job.model, &spec)?;
        derive.push(t.elapsed().as_secs_f64());
    }
    let derive_s = crate::bench::median_secs(derive);
    let parameters = trainer.trained_parameters();
    let mut train = Vec::new();
    for i in 0..args.warmup + args.steps {
        let t = Instant::now();
        trainer.step(&job.x, &job.y)?;
        if i >= args.warmup {
            train.push(t.elapsed().as_secs_f64());
        }
    }
    let mut infer = Vec::new();
    for i in 0..args.warmup + args.steps {
        let t = Instant::now();
        trainer.infer(&job.x)?;
        if i >= args.warmup {
            infer.push(t.elapsed().as_secs_f64());
        }
    }
    let train_samples_per_s = batch as f64 / crate::bench::median_secs(train);
    let infer_samples_per_s = batch as f64 / crate::bench::median_secs(infer);
    let torch = match python {
        None => None,
        Some(p) => {
            eprintln!("bench train: {} on PyTorch…", job.name);
            let mut spec = job.torch.clone();
            spec["threads"] = args.threads.into();
            spec["steps"] = args.steps.into();
            spec["warmup"] = args.warmup.into();
            spec["batch"] = batch.into();
            let out = std::process::Command::new(p)
                .args(["-c", TORCH_SCRIPT, &spec.to_string()])
                .output()
                .context("running the PyTorch baseline")?;
            if !out.status.success() {
                bail!(
                    "the PyTorch baseline failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            let figures: TorchFigures = serde_json::from_slice(&out.stdout)
                .context("reading the PyTorch baseline's figures")?;
            if figures.parameters != parameters {
                bail!(
                    "the PyTorch {} has {} parameters, ours {parameters}: not the same architecture",
                    job.name,
                    figures.parameters
                );
            }
            Some(figures)
        }
    };
    Ok(ModelFigures {
        model: job.name.into(),
        batch,
        parameters,
        open_s,
        derive_s,
        train_samples_per_s,
        infer_samples_per_s,
        train_ratio: torch
            .as_ref()
            .map(|t| train_samples_per_s / t.train_samples_per_s),
        infer_ratio: torch
            .as_ref()
            .map(|t| infer_samples_per_s / t.infer_samples_per_s),
        torch,
    })
}

fn markdown(r: &Report) -> String {
    let mut s = format!(
        "# amicus bench train\n\n{} threads, median of {} steps; ONNX Runtime {}; PyTorch: {}\n\n\
         | model | batch | parameters | open (s) | derive (ms) | train samples/s | PyTorch | ratio | infer samples/s | PyTorch | ratio |\n\
         |---|---|---|---|---|---|---|---|---|---|---|\n",
        r.threads,
        r.steps,
        r.onnxruntime,
        r.torch_python.as_deref().unwrap_or("not found"),
    );
    let opt =
        |v: Option<f64>, digits: usize| v.map_or("–".to_string(), |v| format!("{v:.digits$}"));
    for m in &r.models {
        s += &format!(
            "| {} | {} | {} | {:.2} | {:.1} | {:.1} | {} | {} | {:.1} | {} | {} |\n",
            m.model,
            m.batch,
            m.parameters,
            m.open_s,
            m.derive_s * 1000.0,
            m.train_samples_per_s,
            opt(m.torch.as_ref().map(|t| t.train_samples_per_s), 1),
            opt(m.train_ratio, 2),
            m.infer_samples_per_s,
            opt(m.torch.as_ref().map(|t| t.infer_samples_per_s), 1),
            opt(m.infer_ratio, 2),
        );
    }
    s += &format!("\n{}\n", r.headline);
    s
}

pub fn run(args: TrainArgs) -> Result<()> {
    amicus_kernels::available().context("ONNX Runtime is needed (scripts/setup.sh)")?;
    if args.steps == 0 {
        bail!("--steps must be at least 1");
    }
    let python = match torch_python(args.python.clone()) {
        Ok(p) => Some(p),
        Err(why) => {
            eprintln!("bench train: {why}; reporting ONNX Runtime figures only");
            None
        }
    };
    let (s, b) = (args.unet_size, args.unet_batch);
    let unet = Unet2d {
        channels: 1,
        height: s,
        width: s,
        classes: 1,
        base: args.unet_base,
        depth: args.unet_depth,
        norm: Norm::None,
        seed: 1,
    }
    .build()
    .map_err(anyhow::Error::msg)?;
    let n = b * (s * s) as usize;
    let unet_labels: Vec<f32> = noise(n, 2)
        .iter()
        .map(|v| (*v > 0.0) as u8 as f32)
        .collect();
    let widths = vec![16, 32];
    let cs = args.cnn_size;
    let cnn = Cnn {
        channels: 1,
        height: cs,
        width: cs,
        classes: 2,
        widths: widths.clone(),
        seed: 1,
    }
    .build()
    .map_err(anyhow::Error::msg)?;
    let cb = args.cnn_batch;
    let cnn_labels: Vec<f32> = (0..cb)
        .flat_map(|i| if i % 2 == 0 { [1.0, 0.0] } else { [0.0, 1.0] })
        .collect();
    let jobs = [
        Job {
            name: "unet",
            model: unet,
            loss: Loss::parse("0.5*bce+0.5*dice").map_err(anyhow::Error::msg)?,
            x: Tensor::new(vec![b, 1, s as usize, s as usize], noise(n, 1)),
            y: Tensor::new(vec![b, 1, s as usize, s as usize], unet_labels),
            torch: serde_json::json!({
                "model": "unet", "size": s, "base": args.unet_base, "depth": args.unet_depth,
            }),
        },
        Job {
            name: "cnn",
            model: cnn,
            loss: Loss::CrossEntropy,
            x: Tensor::new(
                vec![cb, 1, cs as usize, cs as usize],
                noise(cb * (cs * cs) as usize, 3),
            ),
            y: Tensor::new(vec![cb, 2], cnn_labels),
            torch: serde_json::json!({ "model": "cnn", "size": cs, "widths": widths }),
        },
    ];
    let mut models = Vec::new();
    for job in &jobs {
        models.push(measure(job, &args, python.as_ref())?);
    }
    let headline = match models[0].train_ratio {
        Some(r) => format!("train: {r:.2}x PyTorch (goal 1x)"),
        None => "train: no PyTorch baseline in this run (goal 1x PyTorch)".to_string(),
    };
    let report = Report {
        threads: args.threads,
        steps: args.steps,
        onnxruntime: amicus_kernels::library_path().display().to_string(),
        torch_python: python.map(|p| p.display().to_string()),
        models,
        headline,
    };
    std::fs::write(&args.out, serde_json::to_vec_pretty(&report)?)?;
    let md = args.out.with_extension("md");
    std::fs::write(&md, markdown(&report))?;
    print!("{}", markdown(&report));
    println!("wrote {} and {}", args.out.display(), md.display());
    println!("{}", report.headline);
    Ok(())
}
