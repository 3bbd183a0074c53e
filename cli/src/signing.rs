//! The researcher's side of trust that does not depend on the registry: signing what a task
//! or job asks of stations (`task create`, `job create`), and checking that each result came
//! from the station it names (`task results`, `job collect`). The formats and checks are
//! `amicus_registry::request`'s; this module only gathers keys and arguments.

use amicus_bundle::{PublicKey, SecretKey};
use amicus_registry::client::PersonClient;
use amicus_registry::request::{self, RequestStatement};
use amicus_registry::sealed::{RecipientKey, RecipientPublicKey, SealContext};
use amicus_registry::wire::{Plan, SealedOutput};
use anyhow::{Context, Result, bail};
use clap::Args;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Keys for signing a request.
#[derive(Args, Clone, Default)]
pub struct SignArgs {
    /// Your Ed25519 key (from `amicus keygen`), which stations' data owners trust with
    /// `station trust --researcher` (default: $AMICUS_SIGN_KEY). Without it the request is
    /// unsigned, and stations refuse it unless their policy says otherwise.
    #[arg(long)]
    pub sign_key: Option<PathBuf>,
    /// Your X25519 key that results are sealed to (the private key or its `.pub`; default:
    /// $AMICUS_RECIPIENT_KEY): the request names it, so the registry cannot substitute its own.
    #[arg(long)]
    pub recipient_key: Option<PathBuf>,
    /// A station's public key from its data owner (repeat): the request names each station by
    /// its key id (a station acts only on runs for its own key; in secure aggregation peers
    /// accept only round keys it signed). Stations not pinned are named by the key the
    /// registry lists now.
    #[arg(long = "station-key", value_name = "NAME=FILE")]
    pub station_keys: Vec<String>,
}

/// What a request asks for.
pub struct Ask<'a> {
    pub kind: &'a str,
    pub train: &'a str,
    pub params: Option<&'a serde_json::Value>,
    pub stations: &'a [String],
    pub expires_ms: i64,
    pub plan: Option<&'a Plan>,
    pub initial_weights: Option<&'a [u8]>,
}

/// The key ids of `stations`: pinned ones, else the registry's.
async fn station_key_ids(
    args: &SignArgs,
    client: &PersonClient,
    stations: &[String],
) -> Result<BTreeMap<String, String>> {
    let pins = StationKeys::gather(
        &VerifyArgs {
            station_keys: args.station_keys.clone(),
        },
        client,
    )
    .await?;
    stations
        .iter()
        .map(|s| {
            // A station is named by the key pinned for it last (a station that rotated
            // accepts requests naming any of its keys), else by the registry's current key.
            let key = match pins.pinned.get(s).and_then(|k| k.last()) {
                Some(k) => k,
                None => {
                    let k = pins.keys.get(s).and_then(|k| k.first()).with_context(|| {
                        format!("no key for station {s:?}: pass --station-key {s}=FILE")
                    })?;
                    eprintln!(
                        "note: station {s} is named by the key the registry lists (pin it with --station-key {s}=FILE)"
                    );
                    k
                }
            };
            Ok((s.clone(), key.id().to_string()))
        })
        .collect()
}

fn env_path(var: &str) -> Option<PathBuf> {
    std::env::var_os(var)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

/// The fingerprint of the X25519 key in `path` (a public key, or the private key's public half).
fn recipient_fingerprint(path: &Path) -> Result<String> {
    if let Ok(k) = RecipientPublicKey::read(path) {
        return Ok(k.fingerprint());
    }
    let k = RecipientKey::read(path).with_context(|| {
        format!(
            "{} is neither an X25519 public nor private key",
            path.display()
        )
    })?;
    Ok(k.public().fingerprint())
}

/// The signed request for `ask`, or `None` (with a warning) when no signing key is given.
pub async fn sign(args: &SignArgs, client: &PersonClient, ask: Ask<'_>) -> Result<Option<String>> {
    let Some(key_path) = args
        .sign_key
        .clone()
        .or_else(|| env_path("AMICUS_SIGN_KEY"))
    else {
        eprintln!(
            "warning: this request is not signed (no --sign-key or AMICUS_SIGN_KEY); stations that require signed requests, the default, refuse it"
        );
        return Ok(None);
    };
    let key = SecretKey::read(&key_path)?;
    let recipient_path = args
        .recipient_key
        .clone()
        .or_else(|| env_path("AMICUS_RECIPIENT_KEY"))
        .context("a signed request names the key results are sealed to: pass --recipient-key FILE or set AMICUS_RECIPIENT_KEY")?;
    let recipient_key_sha256 = recipient_fingerprint(&recipient_path)?;
    let me = client.me().await?;
    let params = ask
        .params
        .cloned()
        .unwrap_or_else(|| serde_json::json!({}))
        .to_string();
    let statement = RequestStatement {
        kind: ask.kind.into(),
        researcher: me.name,
        train: ask.train.into(),
        params_sha256: amicus_bundle::sha256(params.as_bytes()).to_hex(),
        stations: ask.stations.to_vec(),
        recipient_key_sha256,
        plan_sha256: ask.plan.map(request::plan_sha256),
        initial_weights_sha256: ask
            .initial_weights
            .map(|w| amicus_bundle::sha256(w).to_hex()),
        station_keys: station_key_ids(args, client, ask.stations).await?,
        expires_ms: ask.expires_ms,
        nonce: request::nonce(),
    };
    Ok(Some(request::sign_request(&key, &statement)))
}

/// Milliseconds since the epoch.
pub fn now_ms() -> i64 {
    amicus_registry::db::now_ms()
}

/// Station keys the researcher pinned (`--station-key NAME=FILE`).
#[derive(Args, Clone, Default)]
pub struct VerifyArgs {
    /// A station's public key you got from its data owner (repeat for more, and for a
    /// station that rotated its key, give its old and new keys): its results are checked
    /// against this key rather than the ones the registry lists.
    #[arg(long = "station-key", value_name = "NAME=FILE")]
    pub station_keys: Vec<String>,
}

/// Keys results are checked against: pinned ones, else the registry's list (each station's
/// current key and the keys it rotated away from, which signed its earlier results).
pub struct StationKeys {
    keys: BTreeMap<String, Vec<PublicKey>>,
    pinned: BTreeMap<String, Vec<PublicKey>>,
    /// Some key was pinned: then only pinned stations' results are taken (a registry could
    /// otherwise add a station of its own to the task).
    strict: bool,
}

impl StationKeys {
    pub async fn gather(args: &VerifyArgs, client: &PersonClient) -> Result<StationKeys> {
        let mut keys: BTreeMap<String, Vec<PublicKey>> = BTreeMap::new();
        if let Ok(listed) = client.stations().await {
            for s in listed {
                let all = std::iter::once(&s.public_key)
                    .chain(s.retired_keys.iter().map(|r| &r.public_key));
                let parsed: Vec<PublicKey> = all
                    .filter_map(|pem| PublicKey::from_pem(pem, &s.name).ok())
                    .collect();
                keys.insert(s.name, parsed);
            }
        }
        let mut pinned: BTreeMap<String, Vec<PublicKey>> = BTreeMap::new();
        for pin in &args.station_keys {
            let (name, file) = pin
                .split_once('=')
                .with_context(|| format!("--station-key {pin:?}: expected NAME=FILE"))?;
            pinned
                .entry(name.to_string())
                .or_default()
                .push(PublicKey::read(Path::new(file))?);
        }
        let strict = !args.station_keys.is_empty();
        Ok(StationKeys {
            keys,
            pinned,
            strict,
        })
    }

    /// Whether `output` was signed by `station`'s key (for a job's round, as that round's);
    /// errors say why not. Notes each output checked against a key from the registry rather
    /// than a pin; with pins, stations not pinned are refused.
    pub fn check(
        &self,
        ctx: &SealContext,
        round: Option<(&str, u32)>,
        sealed: &[u8],
        output: &SealedOutput,
    ) -> Result<()> {
        let pinned = self.pinned.get(ctx.station);
        if self.strict && pinned.is_none() {
            bail!(
                "results from station {:?}, whose key you did not pin: refused (pin it with --station-key {}=FILE, or pin none to take the registry's keys)",
                ctx.station,
                ctx.station
            );
        }
        let Some(keys) = pinned.or_else(|| self.keys.get(ctx.station)) else {
            bail!(
                "no key for station {:?}: pass --station-key {}=FILE",
                ctx.station,
                ctx.station
            );
        };
        let Some(sig) = &output.signature else {
            bail!(
                "{} from {} is not signed by the station: refused (a registry could have made it)",
                ctx.output,
                ctx.station
            );
        };
        if !keys
            .iter()
            .any(|key| request::verify_output(key, ctx, round, sealed, sig))
        {
            bail!(
                "{} from {} does not carry the station's signature: refused (forged or damaged on the way{})",
                ctx.output,
                ctx.station,
                if pinned.is_some() {
                    ", or signed by a key the station rotated to that you have not pinned"
                } else {
                    ""
                }
            );
        }
        if pinned.is_none() {
            eprintln!(
                "note: {} from {} checked against the keys the registry lists for that station (pin it with --station-key {}=FILE)",
                ctx.output, ctx.station, ctx.station
            );
        }
        Ok(())
    }
}

/// The results of the task asked for, every station and output name a plain name: checked
/// before anything is written.
pub fn check_results(asked: &str, results: &amicus_registry::wire::TaskResults) -> Result<()> {
    if results.task != asked {
        bail!(
            "the registry answered with the results of task {} for task {asked}: refused",
            amicus_bundle::text::shown(&results.task, 64)
        );
    }
    for run in &results.runs {
        path_name("station", &run.station)?;
        for o in &run.outputs {
            if amicus_bundle::manifest::check_output_name(&o.name).is_err() {
                bail!(
                    "the registry sent an output named {}: not a plain name (one a train could declare), refused",
                    amicus_bundle::text::shown(&o.name, 80)
                );
            }
        }
    }
    Ok(())
}

/// A station name from the registry, checked before it becomes part of a path.
fn path_name<'a>(what: &str, name: &'a str) -> Result<&'a str> {
    if !request::plain_name(name) {
        bail!(
            "the registry sent a {what} named {}: not a plain name, refused",
            amicus_bundle::text::shown(name, 80)
        );
    }
    Ok(name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use amicus_registry::request::sign_output;

    fn output(key: &SecretKey, ctx: &SealContext, round: Option<(&str, u32)>) -> SealedOutput {
        SealedOutput {
            name: ctx.output.into(),
            sealed: String::new(),
            signature: Some(sign_output(key, ctx, round, b"sealed")),
        }
    }

    #[test]
    fn results_are_taken_only_from_the_stations_and_rounds_they_claim() {
        let (st1, evil) = (
            SecretKey::generate().unwrap(),
            SecretKey::generate().unwrap(),
        );
        // The registry lists st1 and a station of its own; the researcher pinned st1.
        let mut listed = BTreeMap::new();
        listed.insert("st1".to_string(), vec![st1.public()]);
        listed.insert("evil".to_string(), vec![evil.public()]);
        let mut pinned = BTreeMap::new();
        pinned.insert("st1".to_string(), vec![st1.public()]);
        let ctx = |station| SealContext {
            task: "t",
            run: "r",
            station,
            output: "summary.json",
        };
        let lax = StationKeys {
            keys: listed.clone(),
            pinned: BTreeMap::new(),
            strict: false,
        };
        let strict = StationKeys {
            keys: listed,
            pinned,
            strict: true,
        };
        let good = output(&st1, &ctx("st1"), None);
        lax.check(&ctx("st1"), None, b"sealed", &good).unwrap();
        strict.check(&ctx("st1"), None, b"sealed", &good).unwrap();
        // A station the registry added, signing with the key the registry lists: taken only
        // when nothing is pinned.
        let added = output(&evil, &ctx("evil"), None);
        lax.check(&ctx("evil"), None, b"sealed", &added).unwrap();
        assert!(strict.check(&ctx("evil"), None, b"sealed", &added).is_err());
        // Round 2's output shown as round 1's, or a round's as a plain task's.
        let r2 = output(&st1, &ctx("st1"), Some(("j", 2)));
        strict
            .check(&ctx("st1"), Some(("j", 2)), b"sealed", &r2)
            .unwrap();
        assert!(
            strict
                .check(&ctx("st1"), Some(("j", 1)), b"sealed", &r2)
                .is_err()
        );
        assert!(strict.check(&ctx("st1"), None, b"sealed", &r2).is_err());
        // Not signed, or another station's signature under st1's name.
        let unsigned = SealedOutput {
            signature: None,
            ..good.clone()
        };
        assert!(lax.check(&ctx("st1"), None, b"sealed", &unsigned).is_err());
        let relabelled = output(&evil, &ctx("st1"), None);
        assert!(
            lax.check(&ctx("st1"), None, b"sealed", &relabelled)
                .is_err()
        );
    }

    #[test]
    fn a_rotated_station_is_checked_against_any_of_its_keys_and_only_those() {
        let (old, new, evil) = (
            SecretKey::generate().unwrap(),
            SecretKey::generate().unwrap(),
            SecretKey::generate().unwrap(),
        );
        let ctx = SealContext {
            task: "t",
            run: "r",
            station: "st1",
            output: "summary.json",
        };
        // The registry lists st1's current key and the one it retired.
        let mut listed = BTreeMap::new();
        listed.insert("st1".to_string(), vec![new.public(), old.public()]);
        let lax = StationKeys {
            keys: listed.clone(),
            pinned: BTreeMap::new(),
            strict: false,
        };
        for k in [&old, &new] {
            lax.check(&ctx, None, b"sealed", &output(k, &ctx, None))
                .unwrap();
        }
        assert!(
            lax.check(&ctx, None, b"sealed", &output(&evil, &ctx, None))
                .is_err()
        );
        // Pinned to the old key only: the new key's results are refused, whatever the
        // registry lists; pinned to both, taken.
        let only_old = StationKeys {
            keys: listed.clone(),
            pinned: [("st1".to_string(), vec![old.public()])].into(),
            strict: true,
        };
        let e = only_old
            .check(&ctx, None, b"sealed", &output(&new, &ctx, None))
            .unwrap_err();
        assert!(e.to_string().contains("rotated to"), "{e}");
        let both = StationKeys {
            keys: listed,
            pinned: [("st1".to_string(), vec![old.public(), new.public()])].into(),
            strict: true,
        };
        both.check(&ctx, None, b"sealed", &output(&new, &ctx, None))
            .unwrap();
    }

    #[test]
    fn results_of_another_task_or_with_hostile_names_are_refused() {
        let results = |task: &str, station: &str, name: &str| amicus_registry::wire::TaskResults {
            task: task.into(),
            runs: vec![amicus_registry::wire::RunResult {
                run: "r".into(),
                station: station.into(),
                state: amicus_registry::wire::RunState::Done,
                reason: None,
                outputs: vec![SealedOutput {
                    name: name.into(),
                    sealed: String::new(),
                    signature: None,
                }],
            }],
        };
        check_results("t1", &results("t1", "st1", "summary.json")).unwrap();
        // Whatever a manifest may declare is taken.
        check_results("t1", &results("t1", "st1", "dice+hd95_per-site.json")).unwrap();
        assert!(check_results("t1", &results("t2", "st1", "summary.json")).is_err());
        for bad in ["../x", "/etc/passwd", ".hidden", "a\nb", ""] {
            assert!(check_results("t1", &results("t1", bad, "summary.json")).is_err());
            assert!(check_results("t1", &results("t1", "st1", bad)).is_err());
        }
    }
}
