//! `amicus bench fl`: federated against centralised and local-only training, on the same
//! synthetic hospitals and the same total training budget.
//!
//! Generates three non-IID hospitals (profiles academic, community, legacy) and a fourth that
//! never trains (a new hospital, community profile, other patients), makes a station of each,
//! and trains the `fed-seg` U-Net through the stations' real `run_round` (the sandboxed train,
//! ONNX Runtime, the station's update encoding), combining updates with the same `amicus_fl`
//! FedAvg the registry uses (no registry process: this measures learning, not the network):
//! - federated, fp32 updates and 8-bit updates: `rounds` rounds, `local_steps` steps per site;
//! - centralised: one station over the pooled archives (hard links), `3 × local_steps` steps
//!   per round (the same number of samples in total);
//! - local-only: each site alone, `local_steps` steps per round.
//!
//! Every final model is measured by an evaluation round on each site's own test series and on
//! the unseen hospital's. Writes JSON and Markdown; asserts nothing. The last line states the
//! headline against its goal.

use amicus_bundle::{Bundle, Capability, SecretKey};
use amicus_fl::aggregate::{ServerOptimizer, ServerState, Update, fed_avg};
use amicus_fl::wire::{Encoding, Weights};
use amicus_runtime::sandbox::{FederatedRound, UPDATE_OUTPUT};
use amicus_runtime::station::Station;
use anyhow::{Context, Result, bail};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

#[derive(clap::Args)]
pub struct FlArgs {
    #[arg(long, default_value_t = 12)]
    rounds: u32,
    /// Local steps per site and round (batch 8).
    #[arg(long, default_value_t = 8)]
    local_steps: u32,
    /// Synthetic patients per hospital.
    #[arg(long, default_value_t = 24)]
    patients: usize,
    /// Server optimizer of the federated runs: sgd (FedAvg), adam (FedAdam) or yogi (FedYogi).
    #[arg(long, default_value = "sgd")]
    server: String,
    /// The server optimizer's learning rate (1 with sgd is plain FedAvg).
    #[arg(long, default_value_t = 1.0)]
    server_lr: f64,
    /// FedProx μ in the stations' optimizers (federated runs only).
    #[arg(long, default_value_t = 0.0)]
    proximal_mu: f32,
    /// Train every model this many times with training seeds 1..=N (the test patches stay
    /// the same): figures are means over the repeats, with each repeat's value beside them.
    #[arg(long, default_value_t = 1)]
    repeats: u32,
    /// The fed-seg bundle (default: built from trains/fed-seg).
    #[arg(long)]
    train: Option<PathBuf>,
    #[arg(long, default_value = "bench-fl.json")]
    json: PathBuf,
    #[arg(long, default_value = "bench-fl.md")]
    markdown: PathBuf,
}

const SITES: [(&str, &str, u64); 3] = [
    ("academic", "academic", 31),
    ("community", "community", 32),
    ("legacy", "legacy", 33),
];
const UNSEEN: (&str, &str, u64) = ("unseen", "community", 34);

#[derive(Serialize, Clone)]
struct ModelFigures {
    model: String,
    /// Test Dice on each training site's own test series, in `SITES` order (mean over repeats).
    site_dice: Vec<f64>,
    mean_site_dice: f64,
    unseen_dice: f64,
    /// `mean_site_dice` and `unseen_dice` of each repeat.
    mean_site_dice_per_repeat: Vec<f64>,
    unseen_dice_per_repeat: Vec<f64>,
    /// Update bytes one station sent per round (federated only).
    update_bytes: Option<u64>,
    wall_s: f64,
    wall_per_round_s: f64,
}

#[derive(Serialize)]
struct Figures {
    server: String,
    server_lr: f64,
    proximal_mu: f32,
    rounds: u32,
    local_steps: u32,
    patients_per_site: usize,
    values: usize,
    repeats: u32,
    models: Vec<ModelFigures>,
    federated_over_centralised: f64,
    federated_over_centralised_per_repeat: Vec<f64>,
    federated_beats_every_local_on_unseen: bool,
    q8_bytes_over_fp32: f64,
    /// Mean over repeats of fp32 − q8 (paired: the same seed), in Dice points.
    q8_dice_points_lost: f64,
    q8_dice_points_lost_per_repeat: Vec<f64>,
    station_peak_memory_bytes: u64,
}

/// One trained model of one repeat, evaluated.
struct Evaluated {
    model: String,
    site_dice: Vec<f64>,
    unseen_dice: f64,
    update_bytes: Option<u64>,
    wall: f64,
}

struct Bench {
    bundle: PathBuf,
    initial: Weights,
    rounds: u32,
    peak: u64,
    /// For the federated runs; local and centralised training use FedAvg without μ (one
    /// station: the server step just applies its update).
    server: ServerOptimizer,
    proximal_mu: f32,
    /// The training seed of the current repeat (evaluation always uses the train's default,
    /// so every repeat is tested on the same patches).
    seed: u64,
}

fn params(steps: u32, seed: Option<u64>) -> String {
    match seed {
        Some(seed) => format!("{{\"local_steps\": {steps}, \"batch\": 8, \"seed\": {seed}}}"),
        None => format!("{{\"local_steps\": {steps}, \"batch\": 8}}"),
    }
}

impl Bench {
    #[allow(clippy::too_many_arguments)]
    fn round(
        &mut self,
        st: &Station,
        label: &str,
        number: u32,
        global: &Weights,
        steps: u32,
        encoding: Encoding,
        proximal_mu: f32,
    ) -> Result<(Option<Update>, serde_json::Value, u64)> {
        let round = FederatedRound {
            job: label.to_string(),
            number,
            rounds: self.rounds,
            proximal_mu,
            global: Arc::new(global.clone()),
            encoding,
            clip_norm: None,
            noise_multiplier: None,
        };
        let evaluation = number > self.rounds;
        let record = st
            .run_round(
                &self.bundle,
                Some(&params(steps, (!evaluation).then_some(self.seed))),
                round,
                Box::new(|_, _| {}),
            )
            .with_context(|| format!("{label} round {number} at {}", st.config().name))?;
        self.peak = self.peak.max(record.peak_memory_bytes);
        let mut update = None;
        let mut metrics = serde_json::Value::Null;
        let mut bytes = 0;
        for o in &record.outputs {
            let data = std::fs::read(&o.path)?;
            if o.name == UPDATE_OUTPUT {
                bytes = data.len() as u64;
                let (u, _) = amicus_fl::wire::Update::decode(&data)?;
                update = Some(Update {
                    delta: u.delta,
                    samples: u.samples,
                });
            } else if o.name == "metrics.json" {
                metrics = serde_json::from_slice(&data)?;
            }
        }
        Ok((update, metrics, bytes))
    }

    /// `rounds` rounds of FedAvg over `stations` (one station: local or centralised training).
    fn train(
        &mut self,
        label: &str,
        stations: &[&Station],
        steps: u32,
        encoding: Encoding,
    ) -> Result<(Weights, u64, f64)> {
        let federated = stations.len() > 1;
        let (server, mu) = if federated {
            (self.server, self.proximal_mu)
        } else {
            (ServerOptimizer::Sgd { lr: 1.0 }, 0.0)
        };
        let t0 = Instant::now();
        let mut global = self.initial.clone();
        let mut state = ServerState::default();
        let mut bytes = 0;
        for number in 1..=self.rounds {
            let mut updates = Vec::new();
            for st in stations {
                let (u, _, b) = self.round(st, label, number, &global, steps, encoding, mu)?;
                updates.push(u.context("the train submitted no update")?);
                bytes = b;
            }
            let combined = fed_avg(&updates)?;
            let mut flat = global.flat();
            server.apply(&mut flat, &combined, &mut state);
            global = global.with_flat(&flat)?;
            eprintln!(
                "  {label}: round {number}/{} ({:.0} s)",
                self.rounds,
                t0.elapsed().as_secs_f64()
            );
        }
        Ok((global, bytes, t0.elapsed().as_secs_f64()))
    }

    /// Test Dice of `weights` at `st` (an evaluation round).
    fn test_dice(&mut self, st: &Station, weights: &Weights) -> Result<f64> {
        let (_, metrics, _) = self.round(
            st,
            "evaluation",
            self.rounds + 1,
            weights,
            0,
            Encoding::Fp32,
            0.0,
        )?;
        metrics["test_dice_global"]
            .as_f64()
            .context("metrics.json has no test_dice_global")
    }
}

/// A station over `archive`, allowed to train, trusting `signer`, with `digest` approved.
fn station(
    dir: &Path,
    archive: &Path,
    name: &str,
    signer: &SecretKey,
    bundle: &Bundle,
) -> Result<Station> {
    let st = Station::init(dir, archive, Some(name))?;
    st.index(|_| {})?;
    let mut policy = st.policy()?;
    policy.allowed_capabilities =
        vec![Capability::Cohort, Capability::Imaging, Capability::Kernels];
    policy.cohort.min_patients = 3;
    policy.save(dir)?;
    st.trust("bench", &signer.public())?;
    st.approve(bundle.digest(), None)?;
    Ok(st)
}

/// Hard-link every file of `from` under `to`.
fn link_tree(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        let target = to.join(e.file_name());
        if e.file_type()?.is_dir() {
            link_tree(&e.path(), &target)?;
        } else if e.file_name() != amicus_synth::GROUND_TRUTH {
            std::fs::hard_link(e.path(), &target)
                .or_else(|_| std::fs::copy(e.path(), &target).map(drop))?;
        }
    }
    Ok(())
}

pub fn run(args: FlArgs) -> Result<()> {
    amicus_kernels::available()?;
    let tmp = tempfile::tempdir()?;
    let work = tmp.path();
    let bundle_path = match &args.train {
        Some(p) => p.clone(),
        None => {
            let p = work.join("fed-seg.train");
            let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
            crate::train_build::build(&root.join("trains/fed-seg"), &p)?;
            p
        }
    };
    let signer = SecretKey::generate()?;
    let mut bundle = Bundle::read(&bundle_path)?;
    bundle.sign(&signer, "author");
    let signed = work.join("fed-seg.signed.train");
    bundle.write(&signed)?;
    let initial = crate::job::initial_weights(&bundle, None)?;
    if args.rounds == 0 || args.local_steps == 0 {
        bail!("rounds and local steps must be positive");
    }

    eprintln!(
        "bench fl: generating four hospitals ({} patients each) and their stations",
        args.patients
    );
    let mut stations = Vec::new();
    for (name, profile, seed) in SITES.iter().chain(std::iter::once(&UNSEEN)) {
        let archive = work.join(format!("archive-{name}"));
        amicus_synth::generate(&archive, name, args.patients, *seed, profile, |_, _| {})?;
        stations.push(station(&work.join(name), &archive, name, &signer, &bundle)?);
    }
    let pooled = work.join("archive-pooled");
    for (name, _, _) in SITES {
        link_tree(&work.join(format!("archive-{name}")), &pooled.join(name))?;
    }
    let central = station(&work.join("pooled"), &pooled, "pooled", &signer, &bundle)?;
    let (sites, unseen) = stations.split_at(3);
    let unseen = &unseen[0];

    let server = match args.server.as_str() {
        "sgd" => ServerOptimizer::Sgd { lr: args.server_lr },
        "adam" => ServerOptimizer::Adam {
            lr: args.server_lr,
            beta1: 0.9,
            beta2: 0.99,
            tau: 1e-3,
        },
        "yogi" => ServerOptimizer::Yogi {
            lr: args.server_lr,
            beta1: 0.9,
            beta2: 0.99,
            tau: 1e-3,
        },
        other => bail!("--server is sgd, adam or yogi, not {other:?}"),
    };
    let mut b = Bench {
        bundle: signed,
        initial,
        rounds: args.rounds,
        peak: 0,
        server,
        proximal_mu: args.proximal_mu,
        seed: 1,
    };
    if args.repeats == 0 {
        bail!("repeats must be at least 1");
    }
    let site_refs: Vec<&Station> = sites.iter().collect();
    // Per repeat, per model.
    let mut runs: Vec<Vec<Evaluated>> = Vec::new();
    for repeat in 1..=args.repeats {
        b.seed = u64::from(repeat);
        if args.repeats > 1 {
            eprintln!(
                "bench fl: repeat {repeat}/{} (training seed {repeat})",
                args.repeats
            );
        }
        let mut trained: Vec<(String, Weights, Option<u64>, f64)> = Vec::new();
        let (w, bytes, wall) = b.train(
            "federated fp32",
            &site_refs,
            args.local_steps,
            Encoding::Fp32,
        )?;
        trained.push(("federated (fp32 updates)".into(), w, Some(bytes), wall));
        let (w, bytes, wall) =
            b.train("federated q8", &site_refs, args.local_steps, Encoding::Q8)?;
        trained.push(("federated (8-bit updates)".into(), w, Some(bytes), wall));
        let (w, _, wall) = b.train(
            "centralised",
            &[&central],
            3 * args.local_steps,
            Encoding::Fp32,
        )?;
        trained.push(("centralised (pooled data)".into(), w, None, wall));
        for (i, (name, _, _)) in SITES.iter().enumerate() {
            let (w, _, wall) = b.train(
                &format!("local {name}"),
                &[&sites[i]],
                args.local_steps,
                Encoding::Fp32,
            )?;
            trained.push((format!("local only: {name}"), w, None, wall));
        }
        eprintln!(
            "bench fl: evaluating {} models at four hospitals",
            trained.len()
        );
        let mut evaluated = Vec::new();
        for (model, weights, update_bytes, wall) in trained {
            let mut site_dice = Vec::new();
            for st in sites {
                site_dice.push(b.test_dice(st, &weights)?);
            }
            let unseen_dice = b.test_dice(unseen, &weights)?;
            evaluated.push(Evaluated {
                model,
                site_dice,
                unseen_dice,
                update_bytes,
                wall,
            });
        }
        runs.push(evaluated);
    }
    let n = f64::from(args.repeats);
    let mean_of = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let models: Vec<ModelFigures> = (0..runs[0].len())
        .map(|m| {
            let per: Vec<&Evaluated> = runs.iter().map(|r| &r[m]).collect();
            let site_dice: Vec<f64> = (0..SITES.len())
                .map(|k| per.iter().map(|p| p.site_dice[k]).sum::<f64>() / n)
                .collect();
            let mean_site_dice_per_repeat: Vec<f64> =
                per.iter().map(|p| mean_of(&p.site_dice)).collect();
            let unseen_dice_per_repeat: Vec<f64> = per.iter().map(|p| p.unseen_dice).collect();
            let wall = per.iter().map(|p| p.wall).sum::<f64>() / n;
            ModelFigures {
                model: per[0].model.clone(),
                mean_site_dice: mean_of(&mean_site_dice_per_repeat),
                unseen_dice: mean_of(&unseen_dice_per_repeat),
                site_dice,
                mean_site_dice_per_repeat,
                unseen_dice_per_repeat,
                update_bytes: per[0].update_bytes,
                wall_s: wall,
                wall_per_round_s: wall / f64::from(args.rounds),
            }
        })
        .collect();
    let fed = &models[0];
    let q8 = &models[1];
    let central = &models[2];
    let locals = &models[3..];
    let figures = Figures {
        server: args.server.clone(),
        server_lr: args.server_lr,
        proximal_mu: args.proximal_mu,
        rounds: args.rounds,
        local_steps: args.local_steps,
        patients_per_site: args.patients,
        values: b.initial.len(),
        repeats: args.repeats,
        federated_over_centralised: fed.mean_site_dice / central.mean_site_dice,
        federated_over_centralised_per_repeat: fed
            .mean_site_dice_per_repeat
            .iter()
            .zip(&central.mean_site_dice_per_repeat)
            .map(|(f, c)| f / c)
            .collect(),
        federated_beats_every_local_on_unseen: locals
            .iter()
            .all(|l| fed.unseen_dice > l.unseen_dice),
        q8_bytes_over_fp32: q8.update_bytes.unwrap_or(0) as f64
            / fed.update_bytes.unwrap_or(1) as f64,
        q8_dice_points_lost: 100.0 * (fed.mean_site_dice - q8.mean_site_dice),
        q8_dice_points_lost_per_repeat: fed
            .mean_site_dice_per_repeat
            .iter()
            .zip(&q8.mean_site_dice_per_repeat)
            .map(|(f, q)| 100.0 * (f - q))
            .collect(),
        station_peak_memory_bytes: b.peak,
        models: models.clone(),
    };
    std::fs::write(&args.json, serde_json::to_string_pretty(&figures)?)?;
    let mut md = format!(
        "# amicus bench fl\n\n{} rounds, {} local steps of 8 patches per site and round, {} patients per hospital, U-Net with {} weights; federated server optimizer {} (lr {}), FedProx μ {}. Test Dice of the final model on each site's own test series and on a hospital that never trained.\n\n| model | academic | community | legacy | mean | unseen | update bytes | wall per round |\n|---|---|---|---|---|---|---|---|\n",
        args.rounds,
        args.local_steps,
        args.patients,
        figures.values,
        args.server,
        args.server_lr,
        args.proximal_mu
    );
    for m in &models {
        md.push_str(&format!(
            "| {} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {} | {:.1} s |\n",
            m.model,
            m.site_dice[0],
            m.site_dice[1],
            m.site_dice[2],
            m.mean_site_dice,
            m.unseen_dice,
            m.update_bytes.map_or("–".into(), |b| b.to_string()),
            m.wall_per_round_s
        ));
    }
    md.push_str(&format!(
        "\nfederated / centralised mean Dice: {:.3} (goal ≥ 0.99); federated beats every local-only model on the unseen hospital: {}; 8-bit updates: {:.1} % of fp32 bytes, {:.2} Dice points lost (goal ≤ 25 %, ≤ 0.5 points); station peak memory (wasm + host tensors, not ONNX Runtime's own): {:.1} MiB. Stations run one after another in this bench, so a round's wall time is the sum of the sites'.\n",
        figures.federated_over_centralised,
        figures.federated_beats_every_local_on_unseen,
        100.0 * figures.q8_bytes_over_fp32,
        figures.q8_dice_points_lost,
        b.peak as f64 / (1 << 20) as f64
    ));
    if args.repeats > 1 {
        let list = |v: &[f64], digits: usize| {
            v.iter()
                .map(|x| format!("{x:.digits$}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        md.push_str(&format!(
            "\nMeans over {} repeats (training seeds 1–{}); per repeat: federated / centralised {}; q8 Dice points lost {}; federated fp32 mean Dice {}; centralised {}.\n",
            args.repeats,
            args.repeats,
            list(&figures.federated_over_centralised_per_repeat, 3),
            list(&figures.q8_dice_points_lost_per_repeat, 1),
            list(&fed.mean_site_dice_per_repeat, 3),
            list(&central.mean_site_dice_per_repeat, 3),
        ));
    }
    std::fs::write(&args.markdown, &md)?;
    print!("{md}");
    eprintln!(
        "bench fl: wrote {} and {}",
        args.json.display(),
        args.markdown.display()
    );
    let per = &figures.federated_over_centralised_per_repeat;
    let spread = if per.len() > 1 {
        let lo = per.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = per.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        format!("; {} repeats: {lo:.3}–{hi:.3}", per.len())
    } else {
        String::new()
    };
    println!(
        "fl: {:.3}x centralised Dice (goal 0.99x{spread})",
        figures.federated_over_centralised
    );
    Ok(())
}
