//! `amicus`: the one command for train authors, data owners, station operators and auditors.
//!
//! This crate only parses arguments, calls the libraries and prints. Every decision (what a
//! bundle is, whether it may run, what is released) lives in `amicus-bundle` and
//! `amicus-runtime`. Exit status: 0 on success, 1 on any failure or refusal, 2 on bad usage.

mod bench;
mod bench_fl;
mod bench_imaging;
mod bench_index;
mod bench_registry;
mod bench_start;
mod bench_train;
mod demo;
mod job;
mod model;
mod net;
mod rekey;
mod release;
mod signing;
mod train_build;

use amicus_bundle::{Bundle, Digest, PublicKey, SecretKey, TrustedKey};
use amicus_runtime::audit;
use amicus_runtime::station::{Station, StationError};
use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "amicus",
    version,
    about = "Personal Health Train runtime: signed WebAssembly trains, sandboxed stations, audit logs"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate an Ed25519 key pair (PKCS#8 PEM private key, mode 0600; SPKI PEM public key).
    Keygen {
        /// Private key file to create; the public key goes beside it (alice.key → alice.pub).
        #[arg(long)]
        out: PathBuf,
        /// An X25519 encryption key (a researcher's: results are sealed to it) instead of an
        /// Ed25519 signing key.
        #[arg(long)]
        x25519: bool,
    },
    /// The registry service and its administration.
    #[command(subcommand)]
    Registry(net::RegistryCommand),
    /// Researcher: tasks at the registry (create, list, show, results).
    #[command(subcommand)]
    Task(net::TaskCommand),
    /// The federated demo: three synthetic hospitals, a registry and three station daemons on
    /// loopback, a federated U-Net, an HTML report and audit verification.
    Demo(demo::DemoArgs),
    /// Researcher: federated jobs at the registry (create, show, weights, report).
    #[command(subcommand)]
    Job(job::JobCommand),
    /// Build, sign, verify and inspect train bundles.
    #[command(subcommand)]
    Train(TrainCommand),
    /// Create and operate a station.
    #[command(subcommand)]
    Station(StationCommand),
    /// Show and verify a station's audit log.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Write a synthetic hospital DICOM archive (CT + RTSTRUCT ground truth), deterministic for a seed.
    Synth {
        #[arg(long)]
        out: PathBuf,
        /// Site name (institution); also separates the random streams of sites.
        #[arg(long)]
        site: String,
        #[arg(long, default_value_t = 10)]
        patients: usize,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Scanner and population profile: academic, community or legacy.
        #[arg(long, default_value = "academic")]
        profile: String,
    },
    /// Measure (not test) performance; writes JSON.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// ONNX model tools: write a CNN or U-Net (`model new`), derive a training graph (`model grad`).
    #[command(subcommand)]
    Model(model::ModelCommand),
}

#[derive(Subcommand)]
enum TrainCommand {
    /// Compile a train crate to a wasm32-wasip2 component and write one bundle file.
    /// Researcher: upload a (signed) bundle to the registry.
    Push {
        #[command(flatten)]
        conn: net::Conn,
        bundle: PathBuf,
    },
    /// The trains at the registry, with their signers and capabilities.
    List {
        #[command(flatten)]
        conn: net::Conn,
        #[arg(long)]
        json: bool,
    },
    /// Build a train crate for wasm32-wasip2 and pack it with its train.toml and models into an
    /// unsigned bundle (sign it with `train sign`).
    Build {
        /// The train crate (a folder with Cargo.toml and train.toml).
        crate_dir: PathBuf,
        /// Where to write the bundle (e.g. my-train.train).
        #[arg(long)]
        out: PathBuf,
    },
    /// Add a detached signature over the bundle digest (DSSE envelope, in-toto statement).
    Sign {
        bundle: PathBuf,
        #[arg(long)]
        key: PathBuf,
        /// What the signer vouches as.
        #[arg(long, default_value = "author")]
        role: String,
    },
    /// Check a bundle's integrity and signatures against trusted public keys.
    Verify {
        bundle: PathBuf,
        /// A trusted public key file (repeatable).
        #[arg(long = "trust", required = true)]
        trust: Vec<PathBuf>,
        /// Distinct trusted signatures required.
        #[arg(long, default_value_t = 1)]
        require: usize,
        #[arg(long)]
        json: bool,
    },
    /// Show a bundle's manifest, digest, signers, capabilities and sizes.
    Inspect {
        bundle: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum StationCommand {
    /// Create a station: key pair, deny-by-default policy, empty audit log.
    Init {
        #[arg(long)]
        dir: PathBuf,
        /// The DICOM archive (folder) this station serves.
        #[arg(long)]
        archive: PathBuf,
        #[arg(long)]
        name: Option<String>,
        /// A station already set up in --dir (for this archive) is left as it is, exit 0: for
        /// a container's init step, which runs at every start.
        #[arg(long)]
        if_missing: bool,
    },
    /// Data owner: trust a signer's public key.
    Trust {
        #[arg(long)]
        dir: PathBuf,
        public_key: PathBuf,
        /// Name for the signer (default: the key file's stem).
        #[arg(long)]
        name: Option<String>,
        /// Trust the key for signed requests (tasks and jobs from the registry) rather than
        /// for bundles: the researcher's, as they gave it to you.
        #[arg(long)]
        researcher: bool,
    },
    /// Data owner: approve a bundle digest (or the digest of a bundle file, or the train of
    /// a run `pending` lists) to run here.
    Approve {
        #[arg(long)]
        dir: PathBuf,
        /// A bundle digest (64 hex digits), a bundle file, or a pending run id (32 hex digits).
        digest_or_bundle: String,
        /// What the approval admits: `schema` (parameters that match the schema the train
        /// declares; the default for a digest or bundle), `exact` (exactly the parameters of
        /// `--params`, or of the pending run; the default for a run), or `any`.
        #[arg(long)]
        scope: Option<String>,
        /// With `--scope exact`: the parameter document (JSON file) to approve.
        #[arg(long)]
        params: Option<PathBuf>,
    },
    /// Run the station daemon: poll the registry for work (outbound connections only), run
    /// what policy admits, return sealed results and the audit log. SIGTERM or SIGINT stop it
    /// cleanly (exit 0): no new work, a run in flight finishes within --stop-grace or ends
    /// `interrupted`, reports and the audit log go out.
    Serve {
        #[arg(long)]
        dir: PathBuf,
        /// Registry URL (default: $AMICUS_REGISTRY).
        #[arg(long)]
        registry: Option<String>,
        /// Long-poll length in seconds.
        #[arg(long, default_value_t = 20)]
        poll_wait: u64,
        /// Seconds a run in flight may go on after SIGTERM before it is stopped (keep it below
        /// the service manager's stop timeout: podman's default is 10 s, Kubernetes' 30 s).
        #[arg(long, default_value_t = 5)]
        stop_grace: u64,
        /// Write the daemon's Prometheus metrics (OpenMetrics text) to this file after every
        /// pass, e.g. into node_exporter's textfile directory (default:
        /// <dir>/registry/metrics.prom). The station listens on no socket.
        #[arg(long)]
        metrics_file: Option<PathBuf>,
        #[command(flatten)]
        transport: net::TransportArgs,
    },
    /// Data owner: runs the daemon holds for approval.
    Pending {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Data owner: runs whose outputs the station holds for your release
    /// (`[outputs] hold_for_release`).
    Held {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Data owner: release a run's held outputs (audited; the daemon then sends them).
    Release {
        #[arg(long)]
        dir: PathBuf,
        /// The station's run id (`station held` lists them).
        run: String,
    },
    /// Data owner: withhold a run's held outputs: they are deleted and nothing of them
    /// leaves (audited; the daemon reports the run failed).
    Withhold {
        #[arg(long)]
        dir: PathBuf,
        run: String,
        #[arg(long, default_value = "withheld by the data owner")]
        reason: String,
    },
    /// Data owner: refuse a pending run; the daemon reports the refusal and audits it.
    Refuse {
        #[arg(long)]
        dir: PathBuf,
        run: String,
        #[arg(long, default_value = "not approved by the data owner")]
        reason: String,
    },
    /// Verify, admit and run a bundle; print and store the outputs that passed policy.
    Run {
        #[arg(long)]
        dir: PathBuf,
        bundle: PathBuf,
        /// Task parameters (a JSON file).
        #[arg(long)]
        params: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Show the station's identity and policy.
    Show {
        #[arg(long)]
        dir: PathBuf,
    },
    /// Data owner: scan the archive into the station's FAIR index (incremental: only new,
    /// changed and removed files are touched). Bad files are quarantined with a reason.
    Index {
        #[arg(long)]
        dir: PathBuf,
        /// Print the full report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Data owner: run a read-only SPARQL query (SELECT, ASK, CONSTRUCT, DESCRIBE) on the
    /// station's own index. Audited.
    Query {
        #[arg(long)]
        dir: PathBuf,
        /// The query text, or @FILE to read it from a file.
        sparql: String,
        /// SPARQL 1.1 results JSON instead of tab-separated values.
        #[arg(long)]
        json: bool,
    },
    /// Print the station's public description: a DCAT catalog (Turtle) with aggregate counts
    /// only, small counts suppressed.
    Catalog {
        #[arg(long)]
        dir: PathBuf,
    },
    /// Rotate the station's key: a new key pair, handed over in the audit log (signed by the
    /// old key, with the new key's proof). The station daemon hands the registry the rotation
    /// on its next pass, with the old key, which is then deleted.
    Rekey {
        #[arg(long)]
        dir: PathBuf,
        /// No registry knows this station: delete the old secret key at once.
        #[arg(long)]
        no_registry: bool,
    },
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Print the audit log's entries (unverified: use `verify` for proof).
    Show {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Verify the chain, every signature and the head; name the first bad entry. Either a
    /// station directory (`--dir`) or a station's copy at the registry (`--registry URL
    /// --station NAME`, as an auditor).
    Verify {
        #[arg(long, required_unless_present = "station")]
        dir: Option<PathBuf>,
        #[command(flatten)]
        conn: net::Conn,
        /// The station whose copy at the registry to verify.
        #[arg(long, conflicts_with = "dir")]
        station: Option<String>,
        /// Pin the station's public key (a station.pub you were given, the current one or
        /// one it rotated away from) instead of trusting the registry's or the directory's.
        #[arg(long)]
        key: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Verify, then export the log as W3C PROV-O Turtle (station-generated facts only).
    Export {
        #[arg(long)]
        dir: PathBuf,
        /// Write here instead of standard output.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    // A station's run worker (`amicus __run-worker`): hidden, started only by the station
    // itself, before any argument parsing or output.
    if std::env::args_os().nth(1).as_deref() == Some(amicus_runtime::worker::SUBCOMMAND.as_ref()) {
        amicus_runtime::worker::child::main();
    }
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // An error may quote a bundle, an envelope or a registry answer: escaped.
            eprintln!(
                "error: {}",
                amicus_runtime::sandbox::guest_text(&format!("{e:#}"))
            );
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Keygen { out, x25519 } => {
            if x25519 {
                net::keygen_x25519(&out)
            } else {
                keygen(&out)
            }
        }
        Command::Registry(c) => net::registry(c),
        Command::Task(c) => net::task(c),
        Command::Job(c) => job::job(c),
        Command::Demo(a) => demo::run(a),
        Command::Train(c) => match c {
            TrainCommand::Build { crate_dir, out } => train_build::build(&crate_dir, &out),
            TrainCommand::Sign { bundle, key, role } => sign(&bundle, &key, &role),
            TrainCommand::Verify {
                bundle,
                trust,
                require,
                json,
            } => verify(&bundle, &trust, require, json),
            TrainCommand::Inspect { bundle, json } => inspect(&bundle, json),
            TrainCommand::Push { conn, bundle } => net::push(&conn, &bundle),
            TrainCommand::List { conn, json } => net::list_trains(&conn, json),
        },
        Command::Station(c) => match c {
            StationCommand::Init {
                dir,
                archive,
                name,
                if_missing,
            } => {
                if if_missing && dir.join(amicus_runtime::station::STATION_FILE).exists() {
                    let st = Station::open(&dir)?;
                    let wanted = archive
                        .canonicalize()
                        .with_context(|| format!("the archive {}", archive.display()))?;
                    if st.config().archive != wanted {
                        bail!(
                            "{} is a station for the archive {}, not {}",
                            dir.display(),
                            st.config().archive.display(),
                            wanted.display()
                        );
                    }
                    println!(
                        "station {:?} already set up in {}; nothing changed",
                        st.config().name,
                        dir.display()
                    );
                    return Ok(());
                }
                let st = Station::init(&dir, &archive, name.as_deref())?;
                println!(
                    "station {:?} created in {}\n  key      {}\n  archive  {}\n  policy   {} (deny by default: trust signers with `amicus station trust`, approve digests with `amicus station approve`)",
                    st.config().name,
                    dir.display(),
                    st.public_key()?.id(),
                    st.config().archive.display(),
                    dir.join(amicus_runtime::policy::POLICY_FILE).display(),
                );
                Ok(())
            }
            StationCommand::Trust {
                dir,
                public_key,
                name,
                researcher,
            } => {
                let st = Station::open(&dir)?;
                let key = PublicKey::read(&public_key)?;
                let name = name.unwrap_or_else(|| key_name(&public_key));
                if researcher {
                    st.trust_researcher(&name, &key)?;
                    println!(
                        "trusted researcher {name:?} (key {}): requests they sign may run here once their trains are approved",
                        key.id()
                    );
                } else {
                    st.trust(&name, &key)?;
                    println!("trusted signer {name:?} (key {})", key.id());
                }
                Ok(())
            }
            StationCommand::Approve {
                dir,
                digest_or_bundle,
                scope,
                params,
            } => {
                let scope = scope
                    .map(|s| {
                        amicus_runtime::policy::ApprovalScope::parse(&s).ok_or_else(|| {
                            anyhow::anyhow!("unknown scope {s:?} (schema, exact, any)")
                        })
                    })
                    .transpose()?;
                let is_run = digest_or_bundle.len() == 32
                    && digest_or_bundle.bytes().all(|b| b.is_ascii_hexdigit())
                    && !Path::new(&digest_or_bundle).exists();
                if is_run {
                    if params.is_some() {
                        bail!("a pending run's approval takes that run's parameters, not --params");
                    }
                    net::station_approve_run(&dir, &digest_or_bundle, scope)
                } else {
                    approve(&dir, &digest_or_bundle, scope, params.as_deref())
                }
            }
            StationCommand::Serve {
                dir,
                registry,
                poll_wait,
                stop_grace,
                metrics_file,
                transport,
            } => net::station_serve(
                &dir,
                registry,
                poll_wait,
                (stop_grace, metrics_file),
                &transport,
            ),
            StationCommand::Pending { dir, json } => net::station_pending(&dir, json),
            StationCommand::Refuse { dir, run, reason } => net::station_refuse(&dir, &run, &reason),
            StationCommand::Held { dir, json } => release::held(&dir, json),
            StationCommand::Release { dir, run } => release::release(&dir, &run),
            StationCommand::Withhold { dir, run, reason } => release::withhold(&dir, &run, &reason),
            StationCommand::Run {
                dir,
                bundle,
                params,
                json,
            } => station_run(&dir, &bundle, params.as_deref(), json),
            StationCommand::Index { dir, json } => station_index(&dir, json),
            StationCommand::Query { dir, sparql, json } => {
                let st = Station::open(&dir)?;
                let text = match sparql.strip_prefix('@') {
                    Some(file) => std::fs::read_to_string(file)
                        .with_context(|| format!("reading the query from {file}"))?,
                    None => sparql,
                };
                let format = if json {
                    amicus_index::OwnerFormat::Json
                } else {
                    amicus_index::OwnerFormat::Text
                };
                let out = st.query(&text, format)?;
                std::io::stdout().write_all(&out)?;
                if json {
                    println!();
                }
                Ok(())
            }
            StationCommand::Catalog { dir } => {
                let st = Station::open(&dir)?;
                print!("{}", st.catalog()?);
                Ok(())
            }
            StationCommand::Rekey { dir, no_registry } => rekey::station_rekey(&dir, no_registry),
            StationCommand::Show { dir } => {
                let st = Station::open(&dir)?;
                let policy = st.policy()?;
                println!("station   {}", st.config().name);
                println!("key       {}", st.public_key()?.id());
                println!("archive   {}", st.config().archive.display());
                println!("contract  {}", st.config().contract);
                println!(
                    "signatures required {} · approval {} · capabilities {}",
                    policy.required_signatures,
                    if policy.require_approval {
                        "required"
                    } else {
                        "not required"
                    },
                    policy
                        .allowed_capabilities
                        .iter()
                        .map(|c| c.name())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
                let kernel = amicus_runtime::worker::confine::describe_kernel();
                println!(
                    "worker    each run in its own process; Landlock {}; seccomp {}; memory and CPU limits by the kernel{}",
                    kernel.landlock,
                    kernel.seccomp,
                    if policy.worker.require_confinement {
                        "; the policy refuses runs without full confinement"
                    } else if kernel.landlock.starts_with("available")
                        && kernel.seccomp == "available"
                    {
                        ""
                    } else {
                        "; runs go ahead without what is missing (best effort), and their audit entries say so"
                    }
                );
                for s in policy.trusted_keys() {
                    println!(
                        "trusted   {} {}",
                        amicus_bundle::text::shown(&s.name, 64),
                        s.key.id()
                    );
                }
                for a in &policy.approved {
                    println!(
                        "approved  {} {}",
                        a.digest,
                        amicus_bundle::text::shown(a.train.as_deref().unwrap_or(""), 128)
                    );
                }
                Ok(())
            }
        },
        Command::Audit(c) => match c {
            AuditCommand::Show { dir, json } => audit_show(&dir, json),
            AuditCommand::Verify {
                dir,
                conn,
                station,
                key,
                json,
            } => match (dir, station) {
                (Some(dir), _) => audit_verify(&dir, key.as_deref(), json),
                (None, Some(station)) => {
                    net::audit_verify_remote(&conn, &station, key.as_deref(), json)
                }
                (None, None) => bail!("pass --dir or --station"),
            },
            AuditCommand::Export { dir, out } => audit_export(&dir, out.as_deref()),
        },
        Command::Synth {
            out,
            site,
            patients,
            seed,
            profile,
        } => synth(&out, &site, patients, seed, &profile),
        Command::Bench(c) => bench::run(c),
        Command::Model(c) => model::run(c),
    }
}

fn station_index(dir: &Path, json: bool) -> Result<()> {
    let st = Station::open(dir)?;
    let bar = std::io::stderr().is_terminal().then(|| {
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} [{bar:30}] {pos}/{len} files {per_sec} {elapsed} {msg}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        bar
    });
    let report = st.index(|p| {
        if let Some(b) = &bar {
            match p {
                amicus_index::Progress::Found(n) => b.set_length(n),
                amicus_index::Progress::File(_) => b.inc(1),
                amicus_index::Progress::Writing => b.set_message("writing the graph"),
            }
        }
    })?;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    let c = &report.counts;
    println!(
        "indexed {} in {:.1} s: {} files seen ({} new, {} changed, {} unchanged, {} removed)",
        report.archive,
        report.seconds,
        report.files_seen,
        report.new,
        report.changed,
        report.unchanged,
        report.removed
    );
    println!(
        "  {} instances in {} series, {} studies, {} patients ({} triples)",
        c.instances, c.series, c.studies, c.patients, c.triples
    );
    if !report.quarantined.is_empty() {
        println!("  quarantined {} files:", report.quarantined.len());
        for q in report.quarantined.iter().take(20) {
            println!("    {}: {}", q.path, q.reason);
        }
        if report.quarantined.len() > 20 {
            println!("    ... {} more", report.quarantined.len() - 20);
        }
    }
    for w in &report.warnings {
        println!("  warning: {w}");
    }
    println!(
        "  report: {}",
        amicus_index::index_dir(dir)
            .join(amicus_index::scan::REPORT_FILE)
            .display()
    );
    Ok(())
}

fn synth(out: &Path, site: &str, patients: usize, seed: u64, profile: &str) -> Result<()> {
    let bar = std::io::stderr().is_terminal().then(|| {
        let bar = indicatif::ProgressBar::new(patients as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} [{bar:30}] {pos}/{len} patients {elapsed}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        bar
    });
    let summary = amicus_synth::generate(out, site, patients, seed, profile, |done, _| {
        if let Some(b) = &bar {
            b.set_position(done as u64);
        }
    })?;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    let p = &summary.profile;
    println!(
        "wrote {} patients ({} files, {} lesions) for site {site:?} to {}",
        summary.patients.len(),
        summary.files(),
        summary.lesions(),
        out.display()
    );
    println!(
        "profile {}: {} {} kernel {}, {} mm slices, {}x{} px of {:.3} mm, noise {} HU, offset {} HU",
        p.name,
        p.manufacturer,
        p.model,
        p.kernel,
        p.slice_thickness_mm,
        p.rows,
        p.rows,
        p.pixel_spacing_mm(),
        p.noise_hu,
        p.hu_offset
    );
    println!(
        "ground truth: {}",
        out.join(amicus_synth::GROUND_TRUTH).display()
    );
    Ok(())
}

fn key_name(path: &Path) -> String {
    path.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "signer".into())
}

fn keygen(out: &Path) -> Result<()> {
    let key = SecretKey::generate()?;
    let pub_path = key.write_pair(out)?;
    let public = key.public();
    println!("private key  {} (mode 0600)", out.display());
    println!("public key   {}", pub_path.display());
    println!("key id       {}", public.id());
    print!("{}", public.to_pem());
    Ok(())
}

fn sign(bundle_path: &Path, key_path: &Path, role: &str) -> Result<()> {
    if role.is_empty()
        || role.len() > 64
        || !role.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    {
        bail!("role must be 1-64 letters, digits or '-'");
    }
    let key = SecretKey::read(key_path)?;
    let mut bundle = Bundle::read(bundle_path)?;
    bundle.sign(&key, role);
    bundle.write(bundle_path)?;
    println!(
        "signed {} ({}) as {role} with key {}",
        bundle.subject_name(),
        bundle.digest(),
        key.public().id()
    );
    Ok(())
}

fn trusted_keys(paths: &[PathBuf]) -> Result<Vec<TrustedKey>> {
    paths
        .iter()
        .map(|p| {
            Ok(TrustedKey {
                name: key_name(p),
                key: PublicKey::read(p)?,
            })
        })
        .collect()
}

fn verify(bundle_path: &Path, trust: &[PathBuf], require: usize, json: bool) -> Result<()> {
    if require == 0 {
        bail!("--require must be at least 1");
    }
    let trusted = trusted_keys(trust)?;
    let bundle = Bundle::read(bundle_path).context("bundle integrity check failed")?;
    let check = bundle.check_signatures(&trusted, require);
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "digest": bundle.digest(),
                "train": bundle.subject_name(),
                "ok": check.satisfied(),
                "signatures": check,
            }))?
        );
    } else {
        use amicus_bundle::text::{short, shown};
        println!(
            "bundle   {} ({})",
            shown(&bundle.subject_name(), 200),
            bundle.digest()
        );
        println!(
            "files    all {} hashes match",
            bundle.manifest().files.len()
        );
        for s in &check.signers {
            println!(
                "  {} {} {} {}",
                if s.valid { "ok " } else { "BAD" },
                short(&s.keyid, 16),
                shown(s.trusted_as.as_deref().unwrap_or("(untrusted)"), 128),
                s.problem
                    .as_deref()
                    .map(|p| format!("— {}", shown(p, 512)))
                    .unwrap_or_else(|| format!("as {}", shown(&s.role, 64))),
            );
        }
    }
    match check.refusal() {
        None => {
            if !json {
                println!(
                    "verified: {} of {} required trusted signatures",
                    check.trusted_valid, require
                );
            }
            Ok(())
        }
        Some(reason) => bail!("verification failed: {reason}"),
    }
}

fn inspect(bundle_path: &Path, json: bool) -> Result<()> {
    let bundle = Bundle::read(bundle_path)?;
    let size = std::fs::metadata(bundle_path)?.len();
    let m = bundle.manifest();
    let signatures: Vec<serde_json::Value> = bundle
        .signatures()
        .iter()
        .flat_map(|env| {
            let role = env
                .statement_for(&bundle.digest())
                .map(|s| s.predicate.role)
                .unwrap_or_else(|e| format!("invalid: {e}"));
            env.signatures
                .iter()
                .map(move |s| serde_json::json!({ "keyid": s.keyid, "role": role }))
        })
        .collect();
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "digest": bundle.digest(),
                "bundle_bytes": size,
                "manifest": m,
                "signatures": signatures,
            }))?
        );
        return Ok(());
    }
    // What decides the review comes first, and every text from the bundle is escaped: a
    // description cannot forge or hide a line above or below it.
    use amicus_bundle::text::{short, shown};
    println!(
        "train         {} {}",
        shown(&m.train.name, 128),
        shown(&m.train.version, 64)
    );
    println!("digest        {}", bundle.digest());
    let caps: Vec<&str> = m.capabilities.iter().map(|c| c.name()).collect();
    println!(
        "capabilities  {}",
        if caps.is_empty() {
            "(none)".to_string()
        } else {
            caps.join(", ")
        }
    );
    println!(
        "limits        fuel {} · memory {} MiB · wall {} s",
        m.limits.fuel, m.limits.memory_mib, m.limits.wall_seconds
    );
    for o in &m.outputs {
        println!(
            "output        {} ({:?}, at most {} bytes)",
            shown(&o.name, 128),
            o.kind,
            o.max_bytes
        );
    }
    for model in &m.models {
        println!(
            "model         {} ({:?}{})",
            shown(&model.file, 256),
            model.role,
            model
                .loss
                .as_deref()
                .map(|l| format!(", loss {}", shown(l, 64)))
                .unwrap_or_default()
        );
    }
    if signatures.is_empty() {
        println!("signatures    (unsigned)");
    }
    for sig in &signatures {
        println!(
            "signature     {} as {}",
            short(sig["keyid"].as_str().unwrap_or(""), 64),
            shown(sig["role"].as_str().unwrap_or(""), 64)
        );
    }
    println!("contract      {}", shown(&m.train.contract, 64));
    for f in &m.files {
        println!(
            "file          {} {} bytes sha256 {}",
            shown(&f.path, 256),
            f.size,
            f.sha256
        );
    }
    // Free text last, escaped, on one line each.
    if !m.train.authors.is_empty() {
        let authors: Vec<String> = m.train.authors.iter().map(|a| shown(a, 256)).collect();
        println!("authors       {}", authors.join(", "));
    }
    if !m.train.description.is_empty() {
        println!("description   {}", shown(&m.train.description, 4096));
    }
    println!("bundle size   {size} bytes");
    Ok(())
}

fn approve(
    dir: &Path,
    arg: &str,
    scope: Option<amicus_runtime::policy::ApprovalScope>,
    params: Option<&Path>,
) -> Result<()> {
    use amicus_runtime::policy::ApprovalScope;
    let st = Station::open(dir)?;
    let (digest, train, bundle) = match arg.parse::<Digest>() {
        Ok(d) => (d, None, None),
        Err(parse_err) => {
            let path = Path::new(arg);
            if !path.is_file() {
                bail!("{parse_err}, and not a bundle file");
            }
            let b = Bundle::read(path)?;
            (b.digest(), Some(b.subject_name()), Some(b))
        }
    };
    let scope = scope.unwrap_or(if params.is_some() {
        ApprovalScope::Exact
    } else {
        ApprovalScope::Schema
    });
    let params_sha256 = match (scope, params) {
        (ApprovalScope::Exact, Some(p)) => {
            let text =
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            serde_json::from_str::<serde_json::Value>(&text)
                .with_context(|| format!("{} is not JSON", p.display()))?;
            Some(amicus_bundle::sha256(text.as_bytes()))
        }
        (ApprovalScope::Exact, None) => bail!("--scope exact needs --params FILE"),
        (_, Some(_)) => bail!("--params goes with --scope exact"),
        (_, None) => None,
    };
    if scope == ApprovalScope::Schema
        && let Some(b) = &bundle
        && b.manifest().params.is_none()
    {
        eprintln!(
            "note: this train declares no parameter schema, so a schema-scoped approval admits none of its runs; approve with --scope exact --params FILE, or --scope any"
        );
    }
    let shown = train
        .as_deref()
        .map(|t| format!(" ({})", amicus_bundle::text::shown(t, 128)))
        .unwrap_or_default();
    if st.approve_scoped(digest, train, scope, params_sha256)? {
        println!(
            "approved {digest}{shown} for {}",
            match (scope, params_sha256) {
                (ApprovalScope::Any, _) => "any parameters".to_string(),
                (ApprovalScope::Schema, _) => "parameters that match the train's schema".into(),
                (ApprovalScope::Exact, Some(h)) => format!("the parameters with sha256 {h}"),
                (ApprovalScope::Exact, None) => "exact parameters".into(),
            }
        );
    } else {
        println!("{digest} was already approved so");
    }
    Ok(())
}

fn station_run(dir: &Path, bundle: &Path, params: Option<&Path>, json: bool) -> Result<()> {
    let st = Station::open(dir)?;
    let params = params
        .map(|p| std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display())))
        .transpose()?;
    let bar = if std::io::stderr().is_terminal() && !json {
        let bar = indicatif::ProgressBar::new(1000);
        bar.set_style(
            indicatif::ProgressStyle::with_template("{spinner} [{bar:30}] {percent:>3}% {msg}")
                .expect("valid template")
                .progress_chars("=> "),
        );
        Some(bar)
    } else {
        None
    };
    let progress_bar = bar.clone();
    let progress = Box::new(move |fraction: f32, message: &str| {
        if let Some(b) = &progress_bar {
            b.set_position((fraction * 1000.0) as u64);
            b.set_message(message.to_string());
        }
    });
    let result = st.run(bundle, params.as_deref(), progress);
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    match result {
        Ok(record) => {
            if json {
                println!("{}", serde_json::to_string_pretty(&record)?);
                return Ok(());
            }
            println!(
                "run {} of {} {} succeeded in {:.1} ms (fuel {}, peak memory {} KiB, module from {})",
                record.run_id,
                record.train,
                record.version,
                record.wall_us as f64 / 1000.0,
                record.fuel_used,
                record.peak_memory_bytes / 1024,
                record.compile
            );
            for o in &record.outputs {
                println!(
                    "released {} ({} bytes, sha256 {}) → {}",
                    o.name,
                    o.bytes,
                    o.sha256,
                    o.path.display()
                );
                let data = std::fs::read(&o.path)?;
                // Show small text outputs, but never bytes that could drive the terminal.
                if data.len() <= 64 * 1024
                    && let Ok(text) = std::str::from_utf8(&data)
                    && !text
                        .chars()
                        .any(|c| c.is_control() && !matches!(c, '\n' | '\t' | '\r'))
                {
                    println!("{text}");
                }
            }
            release::print_after_run(dir, &record);
            println!("run record and log: {}", record.dir.display());
            Ok(())
        }
        Err(StationError::RunFailed {
            run_id,
            outcome,
            reason,
        }) => {
            bail!(
                "run {run_id} did not succeed ({outcome}): {reason}\nnothing was released; log: {}",
                dir.join("runs").join(&run_id).join("log.txt").display()
            )
        }
        Err(e) => Err(e.into()),
    }
}

fn audit_show(dir: &Path, json: bool) -> Result<()> {
    let entries = audit::read_entries(dir)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&entries)?);
        return Ok(());
    }
    for e in entries {
        let v = &e.entry;
        let mut rest = v.clone();
        if let Some(o) = rest.as_object_mut() {
            for k in ["seq", "time", "prev", "event"] {
                o.remove(k);
            }
        }
        println!(
            "{:>5} {} {:<20} {}",
            v["seq"],
            v["time"].as_str().unwrap_or("?"),
            v["event"].as_str().unwrap_or("?"),
            rest
        );
    }
    Ok(())
}

fn audit_verify(dir: &Path, pinned: Option<&Path>, json: bool) -> Result<()> {
    let key = match pinned {
        Some(p) => PublicKey::read(p)?,
        None => Station::open(dir)?.public_key()?,
    };
    let report = audit::verify(dir, &key)?;
    report_verification(&report, json, "")
}

/// Print a verification report (as JSON, or as lines after `label`); fail if it found a
/// problem. Shared by `audit verify --dir` and `--station`.
pub(crate) fn report_verification(
    report: &audit::VerifyReport,
    json: bool,
    label: &str,
) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(report)?);
    } else {
        println!("{label}{} entries verified", report.valid_entries);
        if report.public_entries > 0 || report.public_lags > 0 {
            println!(
                "{label}the public copy (what leaves the station): {} entries verified, the projection of the log{}",
                report.public_entries,
                if report.public_lags > 0 {
                    format!(
                        "; {} still to be written (the next entry writes them)",
                        report.public_lags
                    )
                } else {
                    String::new()
                }
            );
        }
        if let Some(n) = report.torn_tail_bytes {
            println!(
                "note: torn last line of {n} bytes (a crash mid-write); earlier entries are intact"
            );
        }
        if report.head_lags {
            println!(
                "note: head lags the log by one entry (a crash between append and head update)"
            );
        }
        if report.keys.len() > 1 {
            for k in &report.keys {
                println!(
                    "{label}signed by key {} from entry seq {}",
                    k.keyid, k.from_seq
                );
            }
        }
    }
    match &report.problem {
        None => {
            if !json {
                println!("audit log OK");
            }
            Ok(())
        }
        Some(p) => bail!("audit log verification FAILED: {p}"),
    }
}

fn audit_export(dir: &Path, out: Option<&Path>) -> Result<()> {
    let st = Station::open(dir)?;
    let key = st.public_key()?;
    let report = audit::verify(dir, &key)?;
    if let Some(p) = &report.problem {
        bail!("refusing to export an audit log that does not verify: {p}");
    }
    // The station's IRI stays its first key's across rotations.
    let first = report
        .keys
        .first()
        .map_or_else(|| key.id().to_string(), |k| k.keyid.clone());
    let turtle = amicus_runtime::prov::export_turtle(dir, &first)?;
    match out {
        Some(path) => {
            std::fs::write(path, turtle).with_context(|| format!("writing {}", path.display()))?;
            eprintln!(
                "exported {} verified entries as PROV-O to {}",
                report.valid_entries,
                path.display()
            );
        }
        None => print!("{turtle}"),
    }
    Ok(())
}
