//! The registry service's front end: what `amicus-registry serve|user add` (the registry's own
//! binary, the one in its container image) and `amicus registry serve|user add` share. It
//! reads the command line, the environment and a TOML configuration file, opens the database,
//! and hands the rest to `amicus_registry::server`.
//!
//! Owns the service's configuration (precedence: command line, then environment, then the
//! configuration file, then defaults) and its process life (SIGTERM/SIGINT stop accepting,
//! finish what is in flight, flush the trail, exit 0). Must not depend on the station runtime:
//! the registry image carries no WebAssembly engine, ONNX Runtime, RDF store or DICOM code.

use amicus_registry::db::Db;
use amicus_registry::sealed::RecipientPublicKey;
use amicus_registry::server::{self, App, Limits};
use amicus_registry::wire::{NewUser, Role};
use anyhow::{Context, Result, bail};
use clap::Args;
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Where the database URL comes from when `--db` is not given.
pub const DB_ENV: &str = "AMICUS_DB_URL";
/// Where the listening address comes from when `--listen` is not given.
pub const LISTEN_ENV: &str = "AMICUS_LISTEN";
/// Where the metrics listener's address comes from when `--metrics-listen` is not given.
pub const METRICS_ENV: &str = "AMICUS_METRICS_LISTEN";
/// Where the configuration file comes from when `--config` is not given.
pub const CONFIG_ENV: &str = "AMICUS_REGISTRY_CONFIG";

const DEFAULT_DB: &str = "sqlite://registry.db";
const DEFAULT_LISTEN: &str = "127.0.0.1:7700";

/// `serve`: run the registry service until SIGTERM or SIGINT.
#[derive(Args, Debug, Clone, Default)]
pub struct ServeCommand {
    /// A TOML configuration file (default: $AMICUS_REGISTRY_CONFIG): any of `db`, `listen`, `metrics_listen`,
    /// `tls_cert`, `tls_key`, `max_connections`, `header_timeout`, `idle_timeout`,
    /// `rate_per_address`, `rate_per_identity`. Flags and environment variables win over it.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// sqlite://FILE (created if missing) or postgres://user:pass@host/db (default:
    /// $AMICUS_DB_URL, then the configuration file, then sqlite://registry.db). Prefer the
    /// environment or the file for a URL with a password: every user of the machine can read
    /// a process's arguments.
    #[arg(long)]
    pub db: Option<String>,
    /// Address to listen on (default: $AMICUS_LISTEN, then the configuration file, then
    /// 127.0.0.1:7700).
    #[arg(long)]
    pub listen: Option<String>,
    /// Serve Prometheus metrics (OpenMetrics text, `GET /metrics`, no authentication) on this
    /// address, e.g. an internal interface (default: $AMICUS_METRICS_LISTEN, then the
    /// configuration file, then none).
    #[arg(long)]
    pub metrics_listen: Option<String>,
    /// Terminate TLS here: the certificate chain (PEM, leaf first). With --tls-key.
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The certificate's private key (PEM).
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Most connections open at once (default: three quarters of the open-files limit).
    #[arg(long)]
    pub max_connections: Option<usize>,
    /// Seconds a client may take to send a request's head (and a TLS handshake; default 10).
    #[arg(long)]
    pub header_timeout: Option<u64>,
    /// Seconds an idle keep-alive connection stays open (default 60).
    #[arg(long)]
    pub idle_timeout: Option<u64>,
    /// Requests per second per client address, bursts of four times that (default 100).
    #[arg(long)]
    pub rate_per_address: Option<u32>,
    /// Requests per second per person or station, bursts of four times that (default 50).
    #[arg(long)]
    pub rate_per_identity: Option<u32>,
}

/// The registry's configuration file: the same settings as `serve`'s flags.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub db: Option<String>,
    pub listen: Option<String>,
    pub metrics_listen: Option<String>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub max_connections: Option<usize>,
    pub header_timeout: Option<u64>,
    pub idle_timeout: Option<u64>,
    pub rate_per_address: Option<u32>,
    pub rate_per_identity: Option<u32>,
}

impl Config {
    /// Read and check a configuration file (unknown keys are refused: a misspelt limit must
    /// not silently fall back to its default).
    pub fn read(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the configuration {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("configuration {}", path.display()))
    }
}

/// Everything `serve` runs with, once flags, environment, file and defaults are merged.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub db: String,
    pub listen: String,
    pub metrics_listen: Option<String>,
    pub tls: Option<(PathBuf, PathBuf)>,
    pub max_connections: usize,
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
    pub rate_per_address: u32,
    pub rate_per_identity: u32,
}

impl ServeCommand {
    /// Merge the flags with `env` (a lookup of environment variables) and the configuration
    /// file: flags first, then the environment, then the file, then defaults.
    pub fn settings(&self, env: &dyn Fn(&str) -> Option<String>) -> Result<Settings> {
        let config_path = self
            .config
            .clone()
            .or_else(|| env(CONFIG_ENV).map(PathBuf::from));
        let file = match &config_path {
            Some(p) => Config::read(p)?,
            None => Config::default(),
        };
        let db = self
            .db
            .clone()
            .or_else(|| env(DB_ENV))
            .or(file.db)
            .unwrap_or_else(|| DEFAULT_DB.into());
        let listen = self
            .listen
            .clone()
            .or_else(|| env(LISTEN_ENV))
            .or(file.listen)
            .unwrap_or_else(|| DEFAULT_LISTEN.into());
        let metrics_listen = self
            .metrics_listen
            .clone()
            .or_else(|| env(METRICS_ENV))
            .or(file.metrics_listen);
        let tls = match (
            self.tls_cert.clone().or(file.tls_cert),
            self.tls_key.clone().or(file.tls_key),
        ) {
            (Some(c), Some(k)) => Some((c, k)),
            (None, None) => None,
            _ => bail!("TLS needs both a certificate (tls_cert) and its key (tls_key)"),
        };
        let rate_per_address = self
            .rate_per_address
            .or(file.rate_per_address)
            .unwrap_or(100)
            .max(1);
        let rate_per_identity = self
            .rate_per_identity
            .or(file.rate_per_identity)
            .unwrap_or(50)
            .max(1);
        Ok(Settings {
            db,
            listen,
            metrics_listen,
            tls,
            max_connections: self
                .max_connections
                .or(file.max_connections)
                .unwrap_or_else(server::default_max_connections)
                .max(1),
            header_timeout: Duration::from_secs(
                self.header_timeout
                    .or(file.header_timeout)
                    .unwrap_or(10)
                    .max(1),
            ),
            idle_timeout: Duration::from_secs(
                self.idle_timeout.or(file.idle_timeout).unwrap_or(60).max(1),
            ),
            rate_per_address,
            rate_per_identity,
        })
    }
}

impl Settings {
    fn options(&self) -> Result<server::ServeOptions> {
        let tls = match &self.tls {
            Some((c, k)) => Some(
                server::tls_server_config(c, k)
                    .map_err(|e| anyhow::anyhow!("TLS certificate: {e}"))?,
            ),
            None => None,
        };
        Ok(server::ServeOptions {
            max_connections: self.max_connections,
            header_read_timeout: self.header_timeout,
            idle_timeout: self.idle_timeout,
            tls,
        })
    }

    fn limits(&self) -> Limits {
        Limits {
            rates: server::RateLimits {
                per_address: self.rate_per_address,
                address_burst: self.rate_per_address.saturating_mul(4),
                per_identity: self.rate_per_identity,
                identity_burst: self.rate_per_identity.saturating_mul(4),
            },
            ..Limits::default()
        }
    }
}

fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// Say so when a password was passed on the command line (it is readable by every user of the
/// machine for as long as the process runs).
fn warn_password_in_argv(flag: Option<&str>) {
    if let Some(url) = flag
        && redact(url) != url
    {
        eprintln!(
            "warning: --db carries a password, which any user of this machine can read in the process list; set {DB_ENV} or `db` in the configuration file instead"
        );
    }
}

/// Run the registry until SIGTERM or SIGINT: stop accepting, let requests in flight finish,
/// write the trail's counts, return.
pub async fn serve(cmd: &ServeCommand) -> Result<()> {
    warn_password_in_argv(cmd.db.as_deref());
    let settings = cmd.settings(&process_env)?;
    let options = settings.options()?;
    let database = Db::connect(&settings.db)
        .await
        .with_context(|| format!("opening the registry database {}", redact(&settings.db)))?;
    let listener = tokio::net::TcpListener::bind(&settings.listen)
        .await
        .with_context(|| format!("listening on {}", settings.listen))?;
    let addr = listener.local_addr()?;
    let scheme = if options.tls.is_some() {
        "https"
    } else {
        "http"
    };
    println!(
        "registry listening on {scheme}://{addr} (database {}; at most {} connections)",
        redact(&settings.db),
        options.max_connections
    );
    let app = App::new(database, settings.limits());
    let (stop_metrics, metrics_stopped) = tokio::sync::oneshot::channel::<()>();
    let metrics = match &settings.metrics_listen {
        Some(addr) => {
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("listening for metrics on {addr}"))?;
            println!("metrics on http://{}/metrics", l.local_addr()?);
            Some(tokio::spawn(server::serve_metrics(l, app.clone(), async {
                let _ = metrics_stopped.await;
            })))
        }
        None => None,
    };
    server::serve_with(listener, app.clone(), options, stop_signal()).await?;
    let _ = stop_metrics.send(());
    if let Some(m) = metrics {
        let _ = m.await;
    }
    app.flush_trail().await;
    eprintln!("registry stopped");
    Ok(())
}

/// `user add`: a person, added directly in the database (how the first admin is made).
#[derive(Args, Debug, Clone)]
pub struct UserAddCommand {
    /// The registry database (default: $AMICUS_DB_URL).
    #[arg(long)]
    pub db: Option<String>,
    #[arg(long)]
    pub name: String,
    /// admin, researcher, data-owner or auditor.
    #[arg(long)]
    pub role: String,
    /// The station a data owner owns.
    #[arg(long)]
    pub station: Option<String>,
    /// A researcher's X25519 public key (from `amicus keygen --x25519`): results are sealed to
    /// it.
    #[arg(long)]
    pub enc_key: Option<PathBuf>,
    /// Write the token to this file (mode 0600) instead of printing it.
    #[arg(long)]
    pub token_out: Option<PathBuf>,
    /// The token stops working after this long (e.g. 90days; default: never).
    #[arg(long)]
    pub expires_in: Option<String>,
}

/// Add a user in the database and print (or write) the token once.
pub async fn user_add(cmd: &UserAddCommand) -> Result<()> {
    warn_password_in_argv(cmd.db.as_deref());
    let Some(db) = cmd.db.clone().or_else(|| process_env(DB_ENV)) else {
        bail!("no database: pass --db URL or set {DB_ENV}");
    };
    let token_expires_in_s = cmd
        .expires_in
        .as_deref()
        .map(parse_duration)
        .transpose()?
        .map(|d| d.as_secs());
    let role = Role::parse(&cmd.role).with_context(|| {
        format!(
            "unknown role {:?}: admin, researcher, data-owner or auditor",
            cmd.role
        )
    })?;
    let enc_public_key = match &cmd.enc_key {
        Some(p) => Some(RecipientPublicKey::read(p)?.to_pem()),
        None => None,
    };
    let database = Db::connect(&db)
        .await
        .with_context(|| format!("opening the registry database {}", redact(&db)))?;
    let created = server::add_user(
        &database,
        &NewUser {
            name: cmd.name.clone(),
            role,
            station: cmd.station.clone(),
            enc_public_key,
            token_expires_in_s,
        },
    )
    .await
    .map_err(|e| anyhow::anyhow!("{}: {}", e.code, e.message))?;
    database
        .audit(
            "local-admin",
            "user-add",
            &created.user.name,
            &format!("ok role {}", role.as_str()),
        )
        .await?;
    match &cmd.token_out {
        Some(path) => {
            write_secret(path, &created.token)?;
            println!(
                "user {} ({}) added; token written to {} (mode 0600)",
                created.user.name,
                role.as_str(),
                path.display()
            );
        }
        None => {
            println!(
                "user {} ({}) added; token (shown once):",
                created.user.name,
                role.as_str()
            );
            println!("{}", created.token);
        }
    }
    Ok(())
}

/// Resolves at SIGINT or SIGTERM (what a service manager or container runtime sends).
pub async fn stop_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

/// A database URL without its password.
pub fn redact(url: &str) -> String {
    let (Some(s), Some(at)) = (url.find("://"), url.rfind('@')) else {
        return url.to_string();
    };
    let (Some(scheme), Some(creds), Some(rest)) =
        (url.get(..s + 3), url.get(s + 3..at), url.get(at..))
    else {
        return url.to_string();
    };
    if at <= s || !creds.contains(':') {
        return url.to_string();
    }
    let user = creds.split(':').next().unwrap_or("");
    format!("{scheme}{user}:***{rest}")
}

/// Write a secret to a new file, mode 0600 (refuses to overwrite).
pub fn write_secret(path: &Path, text: &str) -> Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    writeln!(f, "{text}")?;
    Ok(())
}

/// A duration such as 90s, 30m, 2h or 90days.
pub fn parse_duration(s: &str) -> Result<Duration> {
    humantime::parse_duration(s)
        .with_context(|| format!("{s:?} is not a duration (e.g. 90s, 30m, 2h)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_of(pairs: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |k| {
            pairs
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn flags_win_over_environment_which_wins_over_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("registry.toml");
        std::fs::write(
            &file,
            "db = \"postgres://f:pw@file/db\"\nlisten = \"0.0.0.0:9000\"\nrate_per_address = 7\nidle_timeout = 5\n",
        )
        .unwrap();
        let cmd = ServeCommand {
            config: Some(file.clone()),
            ..Default::default()
        };
        let s = cmd.settings(&env_of(&[])).unwrap();
        assert_eq!(s.db, "postgres://f:pw@file/db");
        assert_eq!(s.listen, "0.0.0.0:9000");
        assert_eq!(s.rate_per_address, 7);
        assert_eq!(s.idle_timeout, Duration::from_secs(5));
        assert_eq!(s.rate_per_identity, 50);

        let s = cmd
            .settings(&env_of(&[
                (DB_ENV, "sqlite://env.db"),
                (LISTEN_ENV, "127.0.0.1:1"),
            ]))
            .unwrap();
        assert_eq!(
            (s.db.as_str(), s.listen.as_str()),
            ("sqlite://env.db", "127.0.0.1:1")
        );

        let cmd = ServeCommand {
            config: Some(file),
            db: Some("sqlite://flag.db".into()),
            rate_per_address: Some(3),
            ..Default::default()
        };
        let s = cmd
            .settings(&env_of(&[(DB_ENV, "sqlite://env.db")]))
            .unwrap();
        assert_eq!((s.db.as_str(), s.rate_per_address), ("sqlite://flag.db", 3));
    }

    #[test]
    fn the_configuration_file_comes_from_the_environment_too_and_is_checked() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("r.toml");
        std::fs::write(&file, "listen = \"127.0.0.1:7\"\n").unwrap();
        let leaked: &'static str = Box::leak(file.display().to_string().into_boxed_str());
        let pairs: &'static [(&'static str, &'static str)] =
            Box::leak(vec![(CONFIG_ENV, leaked)].into_boxed_slice());
        let s = ServeCommand::default().settings(&env_of(pairs)).unwrap();
        assert_eq!(s.listen, "127.0.0.1:7");
        assert_eq!(s.db, DEFAULT_DB);

        // A misspelt key is refused, not ignored.
        std::fs::write(&file, "rate_per_adress = 7\n").unwrap();
        let e = ServeCommand::default()
            .settings(&env_of(pairs))
            .unwrap_err();
        assert!(format!("{e:#}").contains("rate_per_adress"), "{e:#}");
        // Half a TLS configuration is refused.
        std::fs::write(&file, "tls_cert = \"c.pem\"\n").unwrap();
        assert!(ServeCommand::default().settings(&env_of(pairs)).is_err());
        // A missing file is an error, not the defaults.
        std::fs::remove_file(&file).unwrap();
        assert!(ServeCommand::default().settings(&env_of(pairs)).is_err());
    }

    #[test]
    fn passwords_are_redacted_and_odd_urls_do_not_panic() {
        assert_eq!(
            redact("postgres://amicus:s3cret@db:5432/amicus"),
            "postgres://amicus:***@db:5432/amicus"
        );
        assert_eq!(redact("sqlite://registry.db"), "sqlite://registry.db");
        assert_eq!(redact("postgres://amicus@db/x"), "postgres://amicus@db/x");
        assert_eq!(redact("postgres://u:p@ss@h/db"), "postgres://u:***@h/db");
        // Whatever arrives in argv or the environment, redaction must not panic.
        for odd in [
            "@://",
            "://@",
            "a@b://c",
            "é://ü:ö@ß",
            "",
            "://:@",
            "x://:@",
        ] {
            let _ = redact(odd);
        }
    }
}
