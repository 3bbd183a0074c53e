//! `amicus job create|show|weights|report`: federated jobs at a registry, for the researcher
//! who runs them. Argument handling, printing and the HTML report; the rounds themselves are
//! `amicus-registry`'s.

use crate::net::Conn;
use amicus_bundle::Bundle;
use amicus_registry::sealed::{RecipientKey, SealContext};
use amicus_registry::wire::{JobInfo, JobState, NewJob, Plan, RunState};
use anyhow::{Context, Result, bail};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use clap::Subcommand;
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Subcommand)]
pub enum JobCommand {
    /// Researcher: start a federated job (the train must be pushed already).
    Create {
        #[command(flatten)]
        conn: Conn,
        /// The train's signed bundle file: its digest names the train, and its trainable
        /// model gives the initial global weights.
        #[arg(long)]
        train: PathBuf,
        /// Which trainable model of the bundle is federated (default: the only one).
        #[arg(long)]
        model: Option<String>,
        /// A station to take part (repeat for more).
        #[arg(long = "station", required = true)]
        stations: Vec<String>,
        /// The plan: a JSON file (rounds, min_stations, round_seconds, strategy, server,
        /// clip_update_norm, proximal_mu, encoding, dp, evaluate_final).
        #[arg(long)]
        plan: PathBuf,
        /// Train parameters: a JSON file.
        #[arg(long)]
        params: Option<PathBuf>,
        /// Start from these global weights instead of the model's (a weights file from `job
        /// weights`, e.g. the last checkpoint of a job that failed); names and shapes must be
        /// the model's.
        #[arg(long)]
        initial_weights: Option<PathBuf>,
        #[command(flatten)]
        sign: crate::signing::SignArgs,
        #[arg(long)]
        json: bool,
    },
    /// A job, its rounds and what each station contributed.
    Show {
        #[command(flatten)]
        conn: Conn,
        id: String,
        #[arg(long)]
        json: bool,
        /// Wait until the job is done or failed, up to this long (e.g. 10m).
        #[arg(long)]
        wait: Option<String>,
    },
    /// Researcher: download the global weights after a round (default: the newest).
    Weights {
        #[command(flatten)]
        conn: Conn,
        id: String,
        #[arg(long)]
        round: Option<u32>,
        #[arg(long)]
        out: PathBuf,
    },
    /// Researcher: open every round's sealed metrics and write an HTML report with curves.
    Report {
        #[command(flatten)]
        conn: Conn,
        id: String,
        /// Your X25519 private key.
        #[arg(long)]
        key: PathBuf,
        /// Directory for report.html, report.json and the opened metrics.
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        verify: crate::signing::VerifyArgs,
    },
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

/// The initial global weights: the trainable model's weights as the station's trainer sees
/// them (so every name and shape matches what `federated.load-global` sets).
pub fn initial_weights(bundle: &Bundle, model: Option<&str>) -> Result<amicus_fl::wire::Weights> {
    let trainable: Vec<_> = bundle
        .manifest()
        .models
        .iter()
        .filter(|m| m.role == amicus_bundle::manifest::ModelRole::Trainable)
        .filter(|m| model.is_none_or(|f| m.file == f))
        .collect();
    let decl = match trainable.as_slice() {
        [one] => *one,
        [] => bail!("the bundle declares no such trainable model"),
        _ => bail!("the bundle declares several trainable models: choose one with --model"),
    };
    let bytes = bundle.file(&decl.file).context("model file missing")?;
    let forward = amicus_autodiff::onnx::ModelProto::from_bytes(bytes)
        .map_err(|e| anyhow::anyhow!("{}: {e}", decl.file))?;
    let loss = amicus_autodiff::Loss::parse(decl.loss.as_deref().unwrap_or("mse"))
        .map_err(|e| anyhow::anyhow!("loss: {e}"))?;
    let trainer = amicus_kernels::trainer::Trainer::new(
        &forward,
        amicus_kernels::trainer::TrainerOptions {
            loss,
            trainable: None,
            // Never stepped: only the weights' names, shapes and values are read.
            optimizer: amicus_kernels::optim::Optimizer::Sgd {
                learning_rate: 1e-3,
                momentum: 0.0,
                nesterov: false,
                weight_decay: 0.0,
            },
            schedule: amicus_kernels::optim::Schedule::Constant,
            clip_norm: None,
            threads: 1,
            seed: 0,
            device: amicus_kernels::Device::Cpu,
        },
    )?;
    Ok(amicus_fl::wire::Weights {
        tensors: trainer
            .weights()
            .into_iter()
            .map(|w| amicus_fl::wire::Tensor {
                name: w.name,
                shape: w.shape,
                data: w.data,
            })
            .collect(),
    })
}

fn print_job(j: &JobInfo) {
    println!(
        "job {}  train {}  by {}  {} (round {}/{}){}",
        j.id,
        amicus_bundle::text::short(&j.train, 16),
        j.researcher,
        j.state.as_str(),
        j.round.min(j.plan.rounds),
        j.plan.rounds,
        j.reason
            .as_deref()
            .map(|r| format!(": {r}"))
            .unwrap_or_default()
    );
    for r in &j.rounds {
        let label = if r.round > j.plan.rounds {
            "evaluation".to_string()
        } else {
            format!("round {}", r.round)
        };
        match &r.summary {
            Some(s) => println!(
                "  {label}: {} update(s) used, combined update norm {:.4}",
                s.used, s.delta_norm
            ),
            None => println!("  {label}:"),
        }
        for run in &r.runs {
            let part = r
                .summary
                .as_ref()
                .and_then(|s| s.stations.iter().find(|x| x.station == run.station));
            println!(
                "    {:<12} {:<9}{}{}",
                run.station,
                run.state.as_str(),
                part.map(|p| format!(" {} ({} samples, {} bytes)", p.status, p.samples, p.bytes))
                    .unwrap_or_default(),
                run.reason
                    .as_deref()
                    .map(|x| format!("  ({x})"))
                    .unwrap_or_default()
            );
        }
    }
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    serde_json::from_str(
        &std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?,
    )
    .with_context(|| format!("{} is not the expected JSON", path.display()))
}

pub fn job(cmd: JobCommand) -> Result<()> {
    let rt = runtime()?;
    match cmd {
        JobCommand::Create {
            conn,
            train,
            model,
            stations,
            plan,
            params,
            initial_weights: from,
            sign,
            json,
        } => {
            let bundle = Bundle::read(&train)?;
            let mut weights = initial_weights(&bundle, model.as_deref())?;
            if let Some(path) = from {
                let given = amicus_fl::wire::Weights::decode(
                    &std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?,
                )
                .with_context(|| format!("{} is not a weights file", path.display()))?;
                let fits = given.tensors.len() == weights.tensors.len()
                    && given
                        .tensors
                        .iter()
                        .zip(&weights.tensors)
                        .all(|(g, w)| g.name == w.name && g.shape == w.shape);
                if !fits {
                    bail!(
                        "{} does not hold the model's weights (same names and shapes, in order)",
                        path.display()
                    );
                }
                weights = given;
            }
            let plan: Plan = read_json(&plan)?;
            let params = params.map(|p| read_json(&p)).transpose()?;
            let j = rt.block_on(async {
                let client = conn.person()?;
                let train = bundle.digest().to_hex();
                let weights = weights.encode();
                // Outlives every round: each may take its deadline, plus an hour of slack.
                let rounds = i64::from(plan.rounds) + 2;
                let round_ms = i64::try_from(plan.round_seconds)
                    .unwrap_or(i64::MAX)
                    .saturating_mul(1000);
                let expires_ms = crate::signing::now_ms()
                    .saturating_add(rounds.saturating_mul(round_ms))
                    .saturating_add(3_600_000);
                let statement = crate::signing::sign(
                    &sign,
                    &client,
                    crate::signing::Ask {
                        kind: "job",
                        train: &train,
                        params: params.as_ref(),
                        stations: &stations,
                        expires_ms,
                        plan: Some(&plan),
                        initial_weights: Some(&weights),
                    },
                )
                .await?;
                client
                    .create_job(&NewJob {
                        train,
                        stations,
                        params,
                        plan,
                        weights: B64.encode(weights),
                        statement,
                    })
                    .await
                    .map_err(anyhow::Error::from)
            })?;
            if json {
                println!("{}", serde_json::to_string_pretty(&j)?);
            } else {
                print_job(&j);
            }
            Ok(())
        }
        JobCommand::Show {
            conn,
            id,
            json,
            wait,
        } => rt.block_on(async {
            let client = conn.person()?;
            let deadline = wait
                .map(|w| humantime::parse_duration(&w))
                .transpose()
                .context("--wait is a duration, e.g. 10m")?
                .map(|d| std::time::Instant::now() + d);
            let mut shown = (0, 0);
            let j = loop {
                let j = client.job(&id).await?;
                if !json && deadline.is_some() {
                    let now = (
                        j.round,
                        j.rounds.iter().filter(|r| r.summary.is_some()).count(),
                    );
                    if now != shown {
                        eprintln!(
                            "job {}: round {}/{} ({} aggregated)",
                            j.state.as_str(),
                            j.round.min(j.plan.rounds),
                            j.plan.rounds,
                            now.1
                        );
                        shown = now;
                    }
                }
                let finished = j.state != JobState::Running;
                match deadline {
                    Some(d) if !finished && std::time::Instant::now() < d => {
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                    Some(_) if !finished => bail!("job {id}: not finished in time"),
                    _ => break j,
                }
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&j)?);
            } else {
                print_job(&j);
            }
            Ok(())
        }),
        JobCommand::Weights {
            conn,
            id,
            round,
            out,
        } => rt.block_on(async {
            let bytes = conn.person()?.job_weights(&id, round).await?;
            let w = amicus_fl::wire::Weights::decode(&bytes)?;
            amicus_bundle::bundle::write_atomic(&out, &bytes)?;
            println!(
                "{} tensors, {} values → {}",
                w.tensors.len(),
                w.len(),
                out.display()
            );
            Ok(())
        }),
        JobCommand::Report {
            conn,
            id,
            key,
            out,
            verify,
        } => rt.block_on(async {
            let key = RecipientKey::read(&key)?;
            let client = conn.person()?;
            let stations = crate::signing::StationKeys::gather(&verify, &client).await?;
            let j = client.job(&id).await?;
            if j.id != id {
                bail!(
                    "the registry answered with job {} for job {id}: refused",
                    amicus_bundle::text::shown(&j.id, 64)
                );
            }
            let report = collect(&client, &j, &key, &stations, &out).await?;
            let path = write_report(&j, &report, &out)?;
            println!("report: {}", path.display());
            Ok(())
        }),
    }
}

/// One station's metrics in one round (what fed-seg-like trains emit), opened.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct StationRound {
    pub round: u32,
    pub station: String,
    pub state: String,
    pub metrics: Option<serde_json::Value>,
    pub update_bytes: u64,
    pub update_status: Option<String>,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Report {
    pub job: String,
    pub state: String,
    pub rounds: u32,
    pub stations: Vec<String>,
    pub per_round: Vec<StationRound>,
    /// Bytes of updates each station sent over the job.
    pub bytes_sent: Vec<(String, u64)>,
    /// (ε, δ) each station spent on this job's train in this job, from the plan and the
    /// rounds it contributed to (what the station's ledger counts when the digest ran nowhere
    /// else there); `None` when the plan adds no noise.
    pub privacy: Option<Vec<(String, f64, f64)>>,
}

async fn collect(
    client: &amicus_registry::client::PersonClient,
    j: &JobInfo,
    key: &RecipientKey,
    stations: &crate::signing::StationKeys,
    out: &Path,
) -> Result<Report> {
    let mut per_round = Vec::new();
    for r in &j.rounds {
        let results = client.results(&r.task).await?;
        crate::signing::check_results(&r.task, &results)?;
        for run in &results.runs {
            let mut metrics = None;
            if run.state == RunState::Done {
                for o in &run.outputs {
                    let sealed = B64.decode(&o.sealed).context("sealed output")?;
                    let ctx = SealContext {
                        task: &results.task,
                        run: &run.run,
                        station: &run.station,
                        output: &o.name,
                    };
                    // Signed as this job's round `r.round`: the registry cannot relabel rounds.
                    stations.check(&ctx, Some((j.id.as_str(), r.round)), &sealed, o)?;
                    let plain = key
                        .open(&ctx, &sealed)
                        .with_context(|| format!("{} from {}", o.name, run.station))?;
                    let dir = out.join(format!("round-{:03}", r.round)).join(&run.station);
                    std::fs::create_dir_all(&dir)?;
                    amicus_bundle::bundle::write_atomic(&dir.join(&o.name), &plain)?;
                    if o.name == "metrics.json" {
                        metrics = serde_json::from_slice(&plain).ok();
                    }
                }
            }
            let part = r
                .summary
                .as_ref()
                .and_then(|s| s.stations.iter().find(|x| x.station == run.station));
            per_round.push(StationRound {
                round: r.round,
                station: run.station.clone(),
                state: run.state.as_str().to_string(),
                metrics,
                update_bytes: part.map_or(0, |p| p.bytes),
                update_status: part.map(|p| p.status.clone()),
            });
        }
    }
    let bytes_sent = j
        .stations
        .iter()
        .map(|s| {
            let b = per_round
                .iter()
                .filter(|p| &p.station == s)
                .map(|p| p.update_bytes)
                .sum();
            (s.clone(), b)
        })
        .collect();
    let privacy = match j.plan.dp {
        None => None,
        Some(dp) => {
            let delta = 1e-5;
            let mut v = Vec::new();
            for s in &j.stations {
                let releases = per_round
                    .iter()
                    .filter(|p| &p.station == s && p.update_bytes > 0)
                    .count() as u64;
                let mut acc = amicus_fl::rdp::Accountant::default();
                if releases > 0 {
                    acc.compose(1.0, dp.noise_multiplier, releases)?;
                }
                let eps = if releases == 0 {
                    0.0
                } else {
                    acc.epsilon(delta)?.0
                };
                v.push((s.clone(), eps, delta));
            }
            Some(v)
        }
    };
    Ok(Report {
        job: j.id.clone(),
        state: j.state.as_str().to_string(),
        rounds: j.plan.rounds,
        stations: j.stations.clone(),
        per_round,
        bytes_sent,
        privacy,
    })
}

fn metric(p: &StationRound, name: &str) -> Option<f64> {
    p.metrics.as_ref()?.get(name)?.as_f64()
}

/// Curves of `name` per station over rounds (x = round).
fn curves(r: &Report, name: &str) -> Vec<(String, Vec<(f64, f64)>)> {
    r.stations
        .iter()
        .map(|s| {
            let pts = r
                .per_round
                .iter()
                .filter(|p| &p.station == s)
                .filter_map(|p| Some((f64::from(p.round), metric(p, name)?)))
                .collect();
            (s.clone(), pts)
        })
        .collect()
}

const COLOURS: &[&str] = &[
    "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b",
];

/// A line chart as inline SVG.
pub fn svg_chart(title: &str, y_label: &str, series: &[(String, Vec<(f64, f64)>)]) -> String {
    let (w, h, left, right, top, bottom) = (520.0, 300.0, 56.0, 130.0, 30.0, 40.0);
    let pts: Vec<(f64, f64)> = series.iter().flat_map(|(_, p)| p.iter().copied()).collect();
    if pts.is_empty() {
        return format!("<p>{title}: no data</p>");
    }
    let (mut x0, mut x1) = (f64::INFINITY, f64::NEG_INFINITY);
    let (mut y0, mut y1) = (f64::INFINITY, f64::NEG_INFINITY);
    for (x, y) in &pts {
        x0 = x0.min(*x);
        x1 = x1.max(*x);
        y0 = y0.min(*y);
        y1 = y1.max(*y);
    }
    if x1 == x0 {
        x1 = x0 + 1.0;
    }
    if y1 - y0 < 1e-9 {
        y1 = y0 + 1.0;
    }
    let pad = (y1 - y0) * 0.05;
    let (y0, y1) = (y0 - pad, y1 + pad);
    let px = |x: f64| left + (x - x0) / (x1 - x0) * (w - left - right);
    let py = |y: f64| top + (1.0 - (y - y0) / (y1 - y0)) * (h - top - bottom);
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"11\">\
         <text x=\"{}\" y=\"18\" font-size=\"13\" font-weight=\"bold\">{}</text>\
         <line x1=\"{left}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"#333\"/>\
         <line x1=\"{left}\" y1=\"{top}\" x2=\"{left}\" y2=\"{}\" stroke=\"#333\"/>",
        left,
        html(title),
        h - bottom,
        w - right,
        h - bottom,
        h - bottom
    );
    for i in 0..=4 {
        let y = y0 + (y1 - y0) * f64::from(i) / 4.0;
        s.push_str(&format!(
            "<text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{:.3}</text><line x1=\"{left}\" y1=\"{:.1}\" x2=\"{}\" y2=\"{:.1}\" stroke=\"#eee\"/>",
            left - 4.0,
            py(y) + 4.0,
            y,
            py(y),
            w - right,
            py(y)
        ));
    }
    let ticks = (x1 - x0).round() as i64;
    let step = (ticks / 10).max(1);
    let mut x = x0.round() as i64;
    while x as f64 <= x1 {
        s.push_str(&format!(
            "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{x}</text>",
            px(x as f64),
            h - bottom + 14.0
        ));
        x += step;
    }
    s.push_str(&format!(
        "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">round</text>\
         <text x=\"12\" y=\"{:.1}\" transform=\"rotate(-90 12 {:.1})\" text-anchor=\"middle\">{}</text>",
        (left + w - right) / 2.0,
        h - 6.0,
        (top + h - bottom) / 2.0,
        (top + h - bottom) / 2.0,
        html(y_label)
    ));
    for (i, (name, p)) in series.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let line: Vec<String> = p
            .iter()
            .map(|(x, y)| format!("{:.1},{:.1}", px(*x), py(*y)))
            .collect();
        s.push_str(&format!(
            "<polyline fill=\"none\" stroke=\"{colour}\" stroke-width=\"2\" points=\"{}\"/>",
            line.join(" ")
        ));
        for (x, y) in p {
            s.push_str(&format!(
                "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"2.5\" fill=\"{colour}\"/>",
                px(*x),
                py(*y)
            ));
        }
        let ly = top + 14.0 * i as f64 + 8.0;
        s.push_str(&format!(
            "<line x1=\"{}\" y1=\"{ly}\" x2=\"{}\" y2=\"{ly}\" stroke=\"{colour}\" stroke-width=\"2\"/><text x=\"{}\" y=\"{}\">{}</text>",
            w - right + 10.0,
            w - right + 28.0,
            w - right + 32.0,
            ly + 4.0,
            html(name)
        ));
    }
    s.push_str("</svg>");
    s
}

fn html(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The mean of a metric over the stations in one round.
fn round_mean(r: &Report, round: u32, name: &str) -> Option<f64> {
    let v: Vec<f64> = r
        .per_round
        .iter()
        .filter(|p| p.round == round)
        .filter_map(|p| metric(p, name))
        .collect();
    (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
}

/// Write report.html and report.json under `out`; returns the HTML's path.
pub fn write_report(j: &JobInfo, r: &Report, out: &Path) -> Result<PathBuf> {
    std::fs::create_dir_all(out)?;
    amicus_bundle::bundle::write_atomic(&out.join("report.json"), &serde_json::to_vec_pretty(r)?)?;
    let mut global = Vec::new();
    for round in 1..=j.rounds.iter().map(|x| x.round).max().unwrap_or(0) {
        if let Some(m) = round_mean(r, round, "validation_dice_global") {
            global.push((f64::from(round), m));
        }
    }
    let mut with_mean = curves(r, "validation_dice_global");
    with_mean.push(("mean".into(), global));
    let final_round = j.rounds.iter().map(|x| x.round).max().unwrap_or(0);
    let mut body = format!(
        "<h1>amicus federated job {}</h1><p>train <code>{}</code>, {} stations, plan: {} round(s), strategy <code>{}</code>, encoding <code>{}</code>, state <b>{}</b>{}</p>",
        html(&j.id),
        html(&j.train),
        j.stations.len(),
        j.plan.rounds,
        html(&serde_json::to_string(&j.plan.strategy)?),
        html(&serde_json::to_string(&j.plan.encoding)?),
        j.state.as_str(),
        j.reason
            .as_deref()
            .map(|x| format!(": {}", html(x)))
            .unwrap_or_default()
    );
    body.push_str("<p>Round <i>r</i> of the curves measures the global weights a round starts from (round 1: the initial weights), on each station's own validation and test series; the last round is the evaluation round when the plan has one.</p>");
    body.push_str(&svg_chart(
        "Dice of the global model (validation, per site and mean)",
        "Dice",
        &with_mean,
    ));
    body.push_str(&svg_chart(
        "Dice of the global model (test series, per site)",
        "Dice",
        &curves(r, "test_dice_global"),
    ));
    body.push_str(&svg_chart(
        "Local training loss (last step of the round)",
        "loss",
        &curves(r, "loss_last"),
    ));
    body.push_str(&svg_chart(
        "Validation loss of the global model",
        "loss",
        &curves(r, "validation_loss_global"),
    ));
    body.push_str("<h2>Final model, per site</h2><table border=\"1\" cellpadding=\"4\"><tr><th>station</th><th>test Dice (final global)</th><th>validation Dice (final global)</th><th>update bytes sent</th><th>privacy (ε, δ)</th></tr>");
    for s in &r.stations {
        let last = r
            .per_round
            .iter()
            .filter(|p| &p.station == s && p.round == final_round)
            .find_map(|p| {
                Some((
                    metric(p, "test_dice_global")?,
                    metric(p, "validation_dice_global")?,
                ))
            });
        let bytes = r.bytes_sent.iter().find(|(n, _)| n == s).map_or(0, |x| x.1);
        let privacy = match &r.privacy {
            None => "no noise in the plan".to_string(),
            Some(v) => v
                .iter()
                .find(|(n, _, _)| n == s)
                .map(|(_, e, d)| format!("ε {e:.2}, δ {d}"))
                .unwrap_or_default(),
        };
        body.push_str(&format!(
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{bytes}</td><td>{}</td></tr>",
            html(s),
            last.map(|x| format!("{:.3}", x.0)).unwrap_or("–".into()),
            last.map(|x| format!("{:.3}", x.1)).unwrap_or("–".into()),
            html(&privacy)
        ));
    }
    body.push_str("</table><h2>Rounds</h2><table border=\"1\" cellpadding=\"4\"><tr><th>round</th><th>station</th><th>run</th><th>update</th><th>bytes</th><th>samples</th></tr>");
    for round in &j.rounds {
        for run in &round.runs {
            let part = round
                .summary
                .as_ref()
                .and_then(|s| s.stations.iter().find(|x| x.station == run.station));
            body.push_str(&format!(
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                round.round,
                html(&run.station),
                run.state.as_str(),
                html(
                    &part
                        .map(|p| format!(
                            "{}{}",
                            p.status,
                            p.reason
                                .as_deref()
                                .map(|x| format!(": {x}"))
                                .unwrap_or_default()
                        ))
                        .unwrap_or_default()
                ),
                part.map_or(0, |p| p.bytes),
                part.map_or(0, |p| p.samples)
            ));
        }
    }
    body.push_str("</table>");
    let page = format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>amicus job {}</title>\
         <style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}svg{{margin:8px;border:1px solid #ddd}}table{{border-collapse:collapse}}</style></head><body>{body}</body></html>",
        html(&j.id)
    );
    let path = out.join("report.html");
    amicus_bundle::bundle::write_atomic(&path, page.as_bytes())?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charts_scale_points_into_the_plot_and_escape_names() {
        let svg = svg_chart(
            "Dice <test>",
            "Dice",
            &[
                ("st1".into(), vec![(1.0, 0.2), (2.0, 0.6)]),
                ("a&b".into(), vec![(1.0, 0.4)]),
            ],
        );
        assert!(svg.starts_with("<svg"));
        assert!(svg.contains("Dice &lt;test&gt;") && svg.contains("a&amp;b"));
        assert_eq!(svg.matches("<polyline").count(), 2);
        // Every point lies inside the plotting area.
        for c in svg.split("<circle cx=\"").skip(1) {
            let x: f64 = c.split('"').next().unwrap().parse().unwrap();
            assert!((56.0..=390.0).contains(&x), "{x}");
        }
        assert!(svg_chart("t", "y", &[]).contains("no data"));
    }
}
