//! The commands that talk to a registry: `registry serve|user add|station add|audit`,
//! `train push`, `task create|list|show|results`, `station serve|pending|refuse`, and
//! `audit verify --registry`. Argument handling and printing only: the work is in
//! `amicus-registry`.

use amicus_bundle::{Bundle, PublicKey};
use amicus_daemon::{self as daemon, Daemon, DaemonOptions};
use amicus_registry::client::PersonClient;
use amicus_registry::sealed::{RecipientKey, SealContext};
use amicus_registry::wire::{NewStation, NewTask, RunState, TaskInfo, TokenRequest};
use amicus_registryd::{parse_duration, write_secret};
use anyhow::{Context, Result, bail};
use base64::Engine as _;
use clap::{Args, Subcommand};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How a client reaches the registry: TLS roots and proxy.
#[derive(Args, Debug, Clone, Default)]
pub struct TransportArgs {
    /// Trust only the CA certificate(s) in this PEM file for an https:// registry, instead of
    /// the public roots (default: $AMICUS_CA_FILE).
    #[arg(long)]
    pub ca_file: Option<PathBuf>,
    /// Reach the registry through this proxy, e.g. http://proxy:3128 (default: $AMICUS_PROXY,
    /// else HTTPS_PROXY / HTTP_PROXY with NO_PROXY).
    #[arg(long)]
    pub proxy: Option<String>,
}

impl TransportArgs {
    pub fn transport(&self) -> amicus_registry::client::Transport {
        amicus_registry::client::Transport {
            ca_file: self
                .ca_file
                .clone()
                .or_else(|| std::env::var_os("AMICUS_CA_FILE").map(PathBuf::from)),
            proxy: self
                .proxy
                .clone()
                .or_else(|| std::env::var("AMICUS_PROXY").ok()),
        }
    }
}

/// Where the registry is and who you are.
#[derive(Args, Debug, Clone)]
pub struct Conn {
    /// Registry URL, e.g. https://registry.example.org (default: $AMICUS_REGISTRY).
    #[arg(long)]
    pub registry: Option<String>,
    /// A file holding your API token (default: $AMICUS_TOKEN_FILE, or the token in
    /// $AMICUS_TOKEN). Tokens are never taken on the command line, where `ps` shows them.
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    #[command(flatten)]
    pub transport: TransportArgs,
}

impl Conn {
    fn url(&self) -> Result<String> {
        self.registry
            .clone()
            .or_else(|| std::env::var("AMICUS_REGISTRY").ok())
            .context("no registry: pass --registry URL or set AMICUS_REGISTRY")
    }

    pub fn person(&self) -> Result<PersonClient> {
        let file = self
            .token_file
            .clone()
            .or_else(|| std::env::var_os("AMICUS_TOKEN_FILE").map(PathBuf::from));
        let token = match file {
            Some(f) => std::fs::read_to_string(&f)
                .with_context(|| format!("reading the token from {}", f.display()))?,
            None => std::env::var("AMICUS_TOKEN").context(
                "no token: pass --token-file FILE or set AMICUS_TOKEN_FILE or AMICUS_TOKEN",
            )?,
        };
        Ok(PersonClient::with_transport(
            &self.url()?,
            token.trim(),
            &self.transport.transport(),
        )?)
    }
}

#[derive(Subcommand)]
pub enum RegistryCommand {
    /// Run the registry service until SIGTERM or SIGINT (the same as `amicus-registry serve`).
    Serve(amicus_registryd::ServeCommand),
    /// People: add a user directly in the database (the way to create the first admin);
    /// prints the user's token once.
    #[command(subcommand)]
    User(UserCommand),
    /// Admin: register a station with its Ed25519 public key (its `station.pub`).
    #[command(subcommand)]
    Station(RegistryStationCommand),
    /// Tokens: rotate yours (or anyone's, as an admin), revoke one.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Auditor or admin: fetch the registry's own trail and verify its hash chain.
    Audit {
        #[command(flatten)]
        conn: Conn,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
pub enum UserCommand {
    /// Add a person with a role; prints the token once (or writes it with --token-out).
    Add(amicus_registryd::UserAddCommand),
}

#[derive(Subcommand)]
pub enum TokenCommand {
    /// A new token for a user (default: yourself); the old one stops working at once.
    Rotate {
        #[command(flatten)]
        conn: Conn,
        /// Whose token (an admin may name anyone).
        #[arg(long)]
        name: Option<String>,
        /// The new token stops working after this long (e.g. 90days; default: never).
        #[arg(long)]
        expires_in: Option<String>,
        /// Write the new token to this file (mode 0600) instead of printing it.
        #[arg(long)]
        token_out: Option<PathBuf>,
    },
    /// Stop a user's token working (yourself, or anyone as an admin) until it is rotated.
    Revoke {
        #[command(flatten)]
        conn: Conn,
        #[arg(long)]
        name: String,
    },
}

#[derive(Subcommand)]
pub enum RegistryStationCommand {
    /// Admin: register a station by name with its public key; its daemon can then poll.
    Add {
        #[command(flatten)]
        conn: Conn,
        #[arg(long)]
        name: String,
        /// The station's public key file (`<station>/station.pub`).
        #[arg(long)]
        key: PathBuf,
    },
    /// List registered stations.
    List {
        #[command(flatten)]
        conn: Conn,
    },
}

#[derive(Subcommand)]
pub enum TaskCommand {
    /// Researcher: ask stations to run a train the registry has.
    Create {
        #[command(flatten)]
        conn: Conn,
        /// The train's digest, or its bundle file.
        #[arg(long)]
        train: String,
        /// A station to run it (repeat for more).
        #[arg(long = "station", required = true)]
        stations: Vec<String>,
        /// Parameters: a JSON file.
        #[arg(long)]
        params: Option<PathBuf>,
        /// Runs not finished by then expire (e.g. 30m, 2h, 1day; default 1 day).
        #[arg(long)]
        expires_in: Option<String>,
        #[command(flatten)]
        sign: crate::signing::SignArgs,
        #[arg(long)]
        json: bool,
    },
    /// Tasks you may see.
    List {
        #[command(flatten)]
        conn: Conn,
    },
    /// A task and its runs.
    Show {
        #[command(flatten)]
        conn: Conn,
        id: String,
        #[arg(long)]
        json: bool,
        /// Wait until every run has finished (done, refused, failed or expired), up to this long.
        #[arg(long)]
        wait: Option<String>,
    },
    /// Researcher: fetch the sealed results and open them with your private key.
    Results {
        #[command(flatten)]
        conn: Conn,
        id: String,
        /// Your X25519 private key (from `amicus keygen --x25519`).
        #[arg(long)]
        key: PathBuf,
        /// Write each output to OUT/<station>/<name>.
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

pub fn registry(cmd: RegistryCommand) -> Result<()> {
    let rt = runtime()?;
    match cmd {
        RegistryCommand::Serve(c) => rt.block_on(amicus_registryd::serve(&c)),
        RegistryCommand::User(UserCommand::Add(c)) => rt.block_on(amicus_registryd::user_add(&c)),
        RegistryCommand::Station(RegistryStationCommand::Add { conn, name, key }) => {
            rt.block_on(async {
                let pk = PublicKey::read(&key)?;
                let info = conn
                    .person()?
                    .add_station(&NewStation {
                        name,
                        public_key: pk.to_pem(),
                    })
                    .await?;
                println!("station {} registered (key {})", info.name, info.key_id);
                Ok(())
            })
        }
        RegistryCommand::Station(RegistryStationCommand::List { conn }) => rt.block_on(async {
            for s in conn.person()?.stations().await? {
                let seen = s
                    .last_seen_ms
                    .map(|ms| format!("last seen {}", humantime_ms(ms)))
                    .unwrap_or_else(|| "never seen".into());
                let retired = match s.retired_keys.len() {
                    0 => String::new(),
                    n => format!("  ({n} retired key(s))"),
                };
                println!(
                    "{:<20} {}  {seen}{retired}",
                    amicus_bundle::text::shown(&s.name, 64),
                    amicus_bundle::text::short(&s.key_id, 16)
                );
            }
            Ok(())
        }),
        RegistryCommand::Token(TokenCommand::Rotate {
            conn,
            name,
            expires_in,
            token_out,
        }) => rt.block_on(async {
            let client = conn.person()?;
            let name = match name {
                Some(n) => n,
                None => client.me().await?.name,
            };
            let expires_in_s = expires_in
                .map(|s| parse_duration(&s))
                .transpose()?
                .map(|d| d.as_secs());
            let made = client
                .rotate_token(&name, &TokenRequest { expires_in_s })
                .await?;
            let until = made
                .expires_ms
                .map(|t| format!(", expires {}", humantime_ms(t)))
                .unwrap_or_default();
            match token_out {
                Some(path) => {
                    replace_secret(&path, &made.token)?;
                    println!(
                        "new token for {}{until} written to {} (mode 0600); the old one no longer works",
                        made.user,
                        path.display()
                    );
                }
                None => {
                    println!(
                        "new token for {}{until} (shown once; the old one no longer works):",
                        made.user
                    );
                    println!("{}", made.token);
                }
            }
            Ok(())
        }),
        RegistryCommand::Token(TokenCommand::Revoke { conn, name }) => rt.block_on(async {
            conn.person()?.revoke_token(&name).await?;
            println!("the token of {name} is revoked (rotate it to give them a new one)");
            Ok(())
        }),
        RegistryCommand::Audit { conn, json } => rt.block_on(async {
            let entries = conn.person()?.registry_audit().await?;
            let check = amicus_registry::db::verify_registry_trail(&entries);
            if json {
                println!("{}", serde_json::to_string_pretty(&entries)?);
            } else {
                for e in &entries {
                    println!(
                        "{:>6} {} {:<24} {:<22} {:<34} {}",
                        e.seq,
                        humantime_ms(e.time_ms),
                        e.actor,
                        e.action,
                        e.target,
                        e.outcome
                    );
                }
            }
            match check {
                Ok(()) => {
                    eprintln!("{} entries; the hash chain verifies", entries.len());
                    Ok(())
                }
                Err(p) => bail!("registry trail verification FAILED: {p}"),
            }
        }),
    }
}

fn humantime_ms(ms: i64) -> String {
    let t = std::time::UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

/// Write a secret over `path` (a rotated token over the old one): a new file beside it, mode
/// 0600, renamed into place.
fn replace_secret(path: &Path, text: &str) -> Result<()> {
    let mut raw = [0u8; 8];
    getrandom::fill(&mut raw).map_err(|e| anyhow::anyhow!("randomness: {e}"))?;
    let name = path
        .file_name()
        .with_context(|| format!("{} is not a file name", path.display()))?;
    let tmp = path.with_file_name(format!(".{}.{}", name.to_string_lossy(), hex::encode(raw)));
    write_secret(&tmp, text)?;
    std::fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))
}

pub fn push(conn: &Conn, bundle: &Path) -> Result<()> {
    // Verify locally first: a broken bundle should not travel.
    let bytes = std::fs::read(bundle).with_context(|| format!("reading {}", bundle.display()))?;
    Bundle::from_reader(&bytes[..])
        .with_context(|| format!("{} is not a valid bundle", bundle.display()))?;
    let info = runtime()?.block_on(async {
        conn.person()?
            .push_train(bytes)
            .await
            .map_err(anyhow::Error::from)
    })?;
    println!(
        "pushed {}@{} ({} bytes)",
        info.name, info.version, info.bytes
    );
    println!("digest       {}", info.digest);
    println!("capabilities {}", info.capabilities.join(", "));
    for s in &info.signers {
        println!("signed by    {} ({})", s.keyid, s.role);
    }
    if info.signers.is_empty() {
        println!("warning: unsigned; stations refuse unsigned trains (amicus train sign)");
    }
    Ok(())
}

pub fn list_trains(conn: &Conn, json: bool) -> Result<()> {
    let trains = runtime()?
        .block_on(async { conn.person()?.trains().await.map_err(anyhow::Error::from) })?;
    if json {
        println!("{}", serde_json::to_string_pretty(&trains)?);
        return Ok(());
    }
    for t in &trains {
        let signers: Vec<String> = t
            .signers
            .iter()
            .map(|s| format!("{} ({})", amicus_bundle::text::short(&s.keyid, 16), s.role))
            .collect();
        println!(
            "{}  {}@{}  {} bytes  by {}  capabilities [{}]  signed by {}",
            t.digest,
            t.name,
            t.version,
            t.bytes,
            t.uploaded_by,
            t.capabilities.join(", "),
            if signers.is_empty() {
                "nobody".to_string()
            } else {
                signers.join(", ")
            }
        );
    }
    Ok(())
}

fn print_task(t: &TaskInfo) {
    println!(
        "task {}  train {}  by {}",
        t.id,
        amicus_bundle::text::short(&t.train, 16),
        t.researcher
    );
    println!("expires {}", humantime_ms(t.expires_ms));
    for r in &t.runs {
        println!(
            "  {:<16} {:<10} {}{}",
            r.station,
            r.state.as_str(),
            r.id,
            r.reason
                .as_deref()
                .map(|x| format!("  ({x})"))
                .unwrap_or_default()
        );
    }
}

pub fn task(cmd: TaskCommand) -> Result<()> {
    let rt = runtime()?;
    match cmd {
        TaskCommand::Create {
            conn,
            train,
            stations,
            params,
            expires_in,
            sign,
            json,
        } => {
            let train = if Path::new(&train).is_file() {
                Bundle::read(Path::new(&train))?.digest().to_hex()
            } else {
                train
            };
            let params = match params {
                Some(p) => Some(
                    serde_json::from_str(&std::fs::read_to_string(&p)?)
                        .with_context(|| format!("{} is not JSON", p.display()))?,
                ),
                None => None,
            };
            let expires_in_s = expires_in
                .map(|s| parse_duration(&s))
                .transpose()?
                .map(|d| d.as_secs());
            let t = rt.block_on(async {
                let client = conn.person()?;
                // The registry's default is one day; a minute of slack for clocks.
                let expires_ms = crate::signing::now_ms()
                    .saturating_add(
                        i64::try_from(expires_in_s.unwrap_or(86_400))
                            .unwrap_or(i64::MAX)
                            .saturating_mul(1000),
                    )
                    .saturating_add(60_000);
                let statement = crate::signing::sign(
                    &sign,
                    &client,
                    crate::signing::Ask {
                        kind: "task",
                        train: &train,
                        params: params.as_ref(),
                        stations: &stations,
                        expires_ms,
                        plan: None,
                        initial_weights: None,
                    },
                )
                .await?;
                client
                    .create_task(&NewTask {
                        train,
                        stations,
                        params,
                        expires_in_s,
                        statement,
                    })
                    .await
                    .map_err(anyhow::Error::from)
            })?;
            if json {
                println!("{}", serde_json::to_string_pretty(&t)?);
            } else {
                print_task(&t);
            }
            Ok(())
        }
        TaskCommand::List { conn } => rt.block_on(async {
            for t in conn.person()?.tasks().await? {
                let done = t.runs.iter().filter(|r| r.state.is_final()).count();
                println!(
                    "{}  train {}  {}/{} runs finished",
                    t.id,
                    amicus_bundle::text::short(&t.train, 16),
                    done,
                    t.runs.len()
                );
            }
            Ok(())
        }),
        TaskCommand::Show {
            conn,
            id,
            json,
            wait,
        } => rt.block_on(async {
            let client = conn.person()?;
            let deadline = wait
                .map(|w| parse_duration(&w))
                .transpose()?
                .map(|d| std::time::Instant::now() + d);
            let t = loop {
                let t = client.task(&id).await?;
                let finished = t.runs.iter().all(|r| r.state.is_final());
                match deadline {
                    Some(d) if !finished && std::time::Instant::now() < d => {
                        tokio::time::sleep(Duration::from_millis(300)).await;
                    }
                    Some(_) if !finished => bail!("task {id}: not finished in time"),
                    _ => break t,
                }
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&t)?);
            } else {
                print_task(&t);
            }
            Ok(())
        }),
        TaskCommand::Results {
            conn,
            id,
            key,
            out,
            verify,
        } => rt.block_on(async {
            let key = RecipientKey::read(&key)?;
            let client = conn.person()?;
            let stations = crate::signing::StationKeys::gather(&verify, &client).await?;
            let results = client.results(&id).await?;
            crate::signing::check_results(&id, &results)?;
            let mut written = 0;
            for run in &results.runs {
                if run.state != RunState::Done {
                    println!(
                        "{:<16} {}{}",
                        run.station,
                        run.state.as_str(),
                        run.reason
                            .as_deref()
                            .map(|r| format!(": {r}"))
                            .unwrap_or_default()
                    );
                    continue;
                }
                // Names from the registry were checked to be plain names (no `/`, no `..`).
                let dir = out.join(&run.station);
                std::fs::create_dir_all(&dir)?;
                for o in &run.outputs {
                    let sealed = base64::engine::general_purpose::STANDARD
                        .decode(&o.sealed)
                        .context("sealed output is not base64")?;
                    let ctx = SealContext {
                        task: &results.task,
                        run: &run.run,
                        station: &run.station,
                        output: &o.name,
                    };
                    stations.check(&ctx, None, &sealed, o)?;
                    let plain = key
                        .open(&ctx, &sealed)
                        .with_context(|| format!("{} from {}", o.name, run.station))?;
                    let path = dir.join(&o.name);
                    amicus_bundle::bundle::write_atomic(&path, &plain)?;
                    written += 1;
                    println!(
                        "{:<16} {} ({} bytes) → {}",
                        run.station,
                        o.name,
                        plain.len(),
                        path.display()
                    );
                }
            }
            println!(
                "{written} output(s) opened and written under {}",
                out.display()
            );
            Ok(())
        }),
    }
}

pub fn station_serve(
    dir: &Path,
    registry: Option<String>,
    poll_wait: u64,
    (stop_grace, metrics_file): (u64, Option<PathBuf>),
    transport: &TransportArgs,
) -> Result<()> {
    let config = daemon::NetworkConfig::read(dir)?;
    let registry = registry
        .or(config.registry.clone())
        .or_else(|| std::env::var("AMICUS_REGISTRY").ok())
        .context(
            "no registry: pass --registry URL, set it in the station's network.toml, or set AMICUS_REGISTRY",
        )?;
    let transport = amicus_registry::client::Transport {
        ca_file: transport.ca_file.clone().or(config.ca_file),
        proxy: transport.proxy.clone().or(config.proxy),
    };
    let d = Daemon::new(DaemonOptions {
        dir: dir.to_path_buf(),
        registry,
        transport,
        poll_wait: Duration::from_secs(poll_wait),
        max_backoff: Duration::from_secs(30),
        stop_grace: Duration::from_secs(stop_grace),
        metrics_file,
    })?;
    runtime()?.block_on(d.serve_until(amicus_registryd::stop_signal()))?;
    Ok(())
}

pub fn station_pending(dir: &Path, json: bool) -> Result<()> {
    let held = daemon::pending(dir)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&held)?);
        return Ok(());
    }
    if held.is_empty() {
        println!("no trains await approval");
    }
    use amicus_bundle::text::{short, shown};
    let journal = daemon::Journal::new(dir);
    let policy = amicus_runtime::station::Station::open(dir)?.policy()?;
    for e in held {
        println!(
            "run {}  train {} {}  task {}",
            short(&e.item.run, 32),
            shown(e.train_name.as_deref().unwrap_or("?"), 128),
            short(&e.item.train, 16),
            short(&e.item.task, 32),
        );
        // What the data owner decides on: what it may use and release, then its parameters.
        if let Ok(b) = amicus_bundle::Bundle::read(&journal.bundle_path(&e.item.train)) {
            let m = b.manifest();
            let caps: Vec<&str> = m.capabilities.iter().map(|c| c.name()).collect();
            println!(
                "    capabilities  {}",
                if caps.is_empty() {
                    "(none)".into()
                } else {
                    caps.join(", ")
                }
            );
            for o in &m.outputs {
                println!(
                    "    output        {} ({:?}, at most {} bytes)",
                    shown(&o.name, 128),
                    o.kind,
                    o.max_bytes
                );
            }
            let scope = match policy.admit_params(&b, &e.item.params) {
                Ok(s) => format!("admitted by the current approval ({s})"),
                Err(r) => format!("not covered by an approval: {}", shown(&r.reason, 300)),
            };
            println!("    params        {}", shown(&e.item.params, 2048));
            println!("                  {scope}");
            if let Some(p) = &m.params {
                let compact = p.schema_json().map(|v| v.to_string()).unwrap_or_else(|e| e);
                println!("    schema        {}", shown(&compact, 2048));
            }
        }
    }
    for (run, reason) in daemon::Journal::new(dir).parked() {
        println!("parked run {}: {}", short(&run, 32), shown(&reason, 1024));
    }
    crate::release::held_hint(dir);
    Ok(())
}

pub fn station_approve_run(
    dir: &Path,
    run: &str,
    scope: Option<amicus_runtime::policy::ApprovalScope>,
) -> Result<()> {
    let scope = scope.unwrap_or(amicus_runtime::policy::ApprovalScope::Exact);
    let digest = daemon::approve(dir, run, scope)?;
    println!(
        "approved {digest} for run {run} ({} parameters); the station daemon runs it on its next pass",
        scope.name()
    );
    Ok(())
}

pub fn station_refuse(dir: &Path, run: &str, reason: &str) -> Result<()> {
    daemon::refuse(dir, run, reason)?;
    println!("run {run} will be reported refused by the station daemon on its next pass");
    Ok(())
}

/// `amicus audit verify --registry URL --station NAME`: verify the station's chain as the
/// registry holds it. With `--key`, the station key is pinned instead of taken from the
/// registry.
pub fn audit_verify_remote(
    conn: &Conn,
    station: &str,
    pinned: Option<&Path>,
    json: bool,
) -> Result<()> {
    let audit = runtime()?.block_on(async {
        conn.person()?
            .station_audit(station)
            .await
            .map_err(anyhow::Error::from)
    })?;
    let registered = PublicKey::from_pem(&audit.public_key, "registry")?;
    let key = match pinned {
        Some(p) => PublicKey::read(p)?,
        None => registered,
    };
    let lines: Vec<&[u8]> = audit.lines.iter().map(|l| l.as_bytes()).collect();
    let head = match &audit.head {
        Some(h) => amicus_runtime::audit::HeadFile::Bytes(h.as_bytes().to_vec()),
        None => amicus_runtime::audit::HeadFile::Missing,
    };
    // Stations upload the public chain: the copy of their log that may leave them. A pinned
    // key may be the station's current one or one it rotated away from.
    let mut report =
        amicus_runtime::audit::verify_lines(&lines, head, &key, amicus_runtime::audit::PUBLIC);
    // Nothing proves nothing: an empty copy is a registry that dropped the log, or a station
    // that never uploaded one.
    if lines.is_empty() && report.problem.is_none() {
        report.problem = Some(format!(
            "the registry holds none of {station}'s log (never uploaded, or dropped): nothing to verify"
        ));
    }
    // The registry switches a station's key only when its copy takes the hand-over: the key
    // it lists must be the one the copy ends with.
    if report.problem.is_none()
        && !lines.is_empty()
        && report
            .keys
            .last()
            .is_some_and(|k| k.keyid != registered.id().to_string())
    {
        report.problem = Some(format!(
            "the registry lists key {} for {station}, but its copy of the log is signed by key {} since its last hand-over",
            registered.id(),
            report.keys.last().map(|k| k.keyid.as_str()).unwrap_or("?")
        ));
    }
    crate::report_verification(
        &report,
        json,
        &format!("station {station} (key {}): ", key.id()),
    )
}

pub fn keygen_x25519(out: &Path) -> Result<()> {
    let key = RecipientKey::generate();
    let pub_path = key.write_pair(out)?;
    println!(
        "private key  {} (mode 0600, X25519: opens results sealed to you)",
        out.display()
    );
    println!("public key   {}", pub_path.display());
    print!("{}", key.public().to_pem());
    Ok(())
}
