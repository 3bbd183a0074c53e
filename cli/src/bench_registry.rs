//! `amicus bench registry`: request latency and throughput of one registry replica with many
//! simulated stations polling it, and the task round trip (create → delivered → result
//! stored), on SQLite and on PostgreSQL. Loopback only, bounded in time and count. Writes
//! JSON and Markdown; asserts nothing. The last line states the headline against its goal.
//!
//! Each simulated station has its own Ed25519 key and signs every request (RFC 9421), so the
//! registry does exactly the work it does for real stations: signature check, nonce insert,
//! last-seen update, work query. Stations poll without waiting (`wait=0`) every `--interval`
//! seconds, jittered, so the request rate is stations / interval; latency is measured by the
//! client, signing included. Four more stations long-poll and answer each task at once:
//! their round trips measure the registry's path, not the poll interval. Then 32 stations poll
//! back to back for a few seconds: the replica's capacity. Server and load
//! share this machine's cores: figures are an upper bound on what the registry alone costs.

use amicus_bundle::{Bundle, SecretKey, manifest::Manifest};
use amicus_registry::client::{PersonClient, StationClient, http};
use amicus_registry::db::Db;
use amicus_registry::sealed::{RecipientKey, RecipientPublicKey, SealContext, seal};
use amicus_registry::server::{self, App, Limits};
use amicus_registry::wire::{NewTask, NewUser, Role, RunState, SealedOutput};
use anyhow::{Context, Result};
use base64::Engine as _;
use serde::Serialize;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

#[derive(clap::Args)]
pub struct RegistryArgs {
    /// Numbers of polling stations to measure (comma-separated).
    #[arg(long, default_value = "100,1000", value_delimiter = ',')]
    stations: Vec<usize>,
    /// Seconds between one station's polls.
    #[arg(long, default_value_t = 5.0)]
    interval: f64,
    /// Seconds of load per configuration.
    #[arg(long, default_value_t = 15)]
    seconds: u64,
    /// A PostgreSQL server (postgres://user:pass@host:port/postgres) to measure on as well;
    /// default $AMICUS_BENCH_POSTGRES. `scripts/postgres.sh start DIR PORT` starts one.
    #[arg(long)]
    postgres: Option<String>,
    /// Seconds of each phase of the flood measurement (quiet, flood, quiet; 0: skip it).
    #[arg(long, default_value_t = 10)]
    flood_seconds: u64,
    #[arg(long, default_value = "bench-registry.json")]
    json: PathBuf,
    #[arg(long, default_value = "bench-registry.md")]
    markdown: PathBuf,
}

#[derive(Serialize, Default, Clone)]
struct Figures {
    database: String,
    stations: usize,
    seconds: f64,
    poll_requests: u64,
    poll_errors: u64,
    requests_per_second: f64,
    poll_p50_ms: f64,
    poll_p95_ms: f64,
    poll_p99_ms: f64,
    poll_max_ms: f64,
    round_trips: usize,
    /// Signed polls per second that 32 stations polling back to back get answered, after
    /// the timed phase: the replica's capacity on this machine.
    capacity_requests_per_second: f64,
    round_trip_errors: u64,
    create_to_delivered_p50_ms: f64,
    create_to_delivered_p99_ms: f64,
    create_to_stored_p50_ms: f64,
    create_to_stored_p99_ms: f64,
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn tiny_bundle(signer: &SecretKey) -> Bundle {
    let m = Manifest::parse_source(
        "capabilities = []\n[train]\nname = \"bench\"\nversion = \"1\"\n[limits]\nfuel = 1000\nmemory_mib = 1\nwall_seconds = 1\n[[outputs]]\nname = \"r.json\"\nkind = \"statistics\"\nmax_bytes = 64\n",
    )
    .expect("a valid manifest");
    let mut b =
        Bundle::create(m, vec![("train.wasm".into(), b"\0asm bench".to_vec())]).expect("bundle");
    b.sign(signer, "author");
    b
}

/// A database for one configuration: a fresh SQLite file or a fresh PostgreSQL database.
async fn fresh_db(
    kind: &str,
    tmp: &std::path::Path,
    pg: Option<&str>,
    tag: &str,
) -> Result<(String, Option<(sqlx::AnyPool, String)>)> {
    if kind == "sqlite" {
        return Ok((
            format!("sqlite://{}", tmp.join(format!("{tag}.db")).display()),
            None,
        ));
    }
    let server = pg.context("no PostgreSQL URL")?;
    sqlx::any::install_default_drivers();
    let admin = sqlx::AnyPool::connect(server)
        .await
        .context("connecting to PostgreSQL")?;
    let name = format!("amicus_bench_{}", &amicus_registry::db::random_id()[..12]);
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&admin)
        .await?;
    let base = server
        .rsplit_once('/')
        .context("a PostgreSQL URL ends in /database")?
        .0;
    Ok((format!("{base}/{name}"), Some((admin, name))))
}

/// A registry on its own runtime thread (two workers), on a free loopback port: its URL, the
/// sender that stops it (refusal counts are flushed to the trail on the way out) and its thread.
fn start_registry(
    db: &Db,
    limits: Limits,
) -> Result<(
    String,
    tokio::sync::oneshot::Sender<()>,
    std::thread::JoinHandle<()>,
)> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    listener.set_nonblocking(true)?;
    let base = format!("http://{}", listener.local_addr()?);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server_db = db.clone();
    let server = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let l = tokio::net::TcpListener::from_std(listener).expect("listener");
            let app = App::new(server_db, limits);
            let _ = server::serve(l, app.clone(), async {
                let _ = stop_rx.await;
            })
            .await;
            app.flush_trail().await;
        });
    });
    Ok((base, stop_tx, server))
}

async fn one(
    kind: &str,
    stations: usize,
    args: &RegistryArgs,
    tmp: &std::path::Path,
    pg: Option<&str>,
) -> Result<Figures> {
    let (url, cleanup) = fresh_db(kind, tmp, pg, &format!("{kind}-{stations}")).await?;
    let db = Db::connect(&url).await?;
    // The registry on its own runtime thread.
    // Every simulated station connects from 127.0.0.1: the per-address limit, which real
    // hospitals meet one address each, is lifted here (the flood measurement keeps it).
    let limits = Limits {
        rates: amicus_registry::server::RateLimits {
            per_address: 1_000_000,
            address_burst: 1_000_000,
            ..Default::default()
        },
        ..Limits::default()
    };
    let (base, stop_tx, server) = start_registry(&db, limits)?;
    // People, stations, a train.
    let researcher_key = RecipientKey::generate();
    let alice = server::add_user(
        &db,
        &NewUser {
            token_expires_in_s: None,
            name: "alice".into(),
            role: Role::Researcher,
            station: None,
            enc_public_key: Some(researcher_key.public().to_pem()),
        },
    )
    .await
    .map_err(|e| anyhow::anyhow!(e.message))?;
    let alice = PersonClient::new(&base, &alice.token)?;
    let signer = SecretKey::generate()?;
    let train = alice
        .push_train(tiny_bundle(&signer).to_bytes())
        .await?
        .digest;
    let shared = http(Duration::from_secs(60));
    let mut pollers = Vec::new();
    let mut responders = Vec::new();
    let mut flooders = Vec::new();
    for i in 0..32 {
        let key = SecretKey::generate()?;
        db.insert_station(
            &format!("cap{i:02}"),
            &key.public().id().to_string(),
            &key.public().to_pem(),
        )
        .await?;
        flooders.push(StationClient::with_http(&base, key, shared.clone())?);
    }
    for i in 0..stations + 4 {
        let key = SecretKey::generate()?;
        let name = if i < stations {
            format!("poll{i:05}")
        } else {
            format!("resp{}", i - stations)
        };
        db.insert_station(
            &name,
            &key.public().id().to_string(),
            &key.public().to_pem(),
        )
        .await?;
        let client = StationClient::with_http(&base, key, shared.clone())?;
        if i < stations {
            pollers.push(client);
        } else {
            responders.push((name, client));
        }
    }
    let running = Arc::new(AtomicBool::new(true));
    let errors = Arc::new(AtomicU64::new(0));
    let bar = indicatif::ProgressBar::new(args.seconds);
    bar.set_style(
        indicatif::ProgressStyle::with_template("  {prefix:>22} [{bar:30}] {pos}/{len} s")
            .expect("template"),
    );
    bar.set_prefix(format!("{kind}, {stations} stations"));
    // Polling stations.
    let interval = Duration::from_secs_f64(args.interval);
    let mut tasks = Vec::new();
    for (i, client) in pollers.into_iter().enumerate() {
        let running = running.clone();
        let errors = errors.clone();
        tasks.push(tokio::spawn(async move {
            // Spread the first polls over one interval.
            let offset = interval.mul_f64((i as f64 * 0.618_033_988_7).fract());
            tokio::time::sleep(offset).await;
            let mut lat = Vec::new();
            while running.load(Ordering::Relaxed) {
                let t0 = Instant::now();
                match client.work(0).await {
                    Ok(_) => lat.push(t0.elapsed().as_secs_f64() * 1000.0),
                    Err(_) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
                let nap = interval.saturating_sub(t0.elapsed());
                tokio::time::sleep(nap).await;
            }
            lat
        }));
    }
    // Responders: long-poll, answer each run with a sealed result.
    let rt_errors = Arc::new(AtomicU64::new(0));
    let delivered: Arc<std::sync::Mutex<Vec<(String, Instant)>>> = Arc::default();
    let stored: Arc<std::sync::Mutex<Vec<(String, Instant)>>> = Arc::default();
    let mut responder_tasks = Vec::new();
    for (name, client) in responders {
        let running = running.clone();
        let errs = rt_errors.clone();
        let delivered = delivered.clone();
        let stored = stored.clone();
        responder_tasks.push(tokio::spawn(async move {
            while running.load(Ordering::Relaxed) {
                let items = match client.work(2).await {
                    Ok(i) => i,
                    Err(_) => {
                        errs.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                };
                for item in items {
                    delivered
                        .lock()
                        .expect("lock")
                        .push((item.task.clone(), Instant::now()));
                    let ok = async {
                        client.report(&item.run, RunState::Running, None).await?;
                        let pk = RecipientPublicKey::from_pem(&item.recipient_key, "task")
                            .map_err(|e| {
                                amicus_registry::client::ClientError::Decode(e.to_string())
                            })?;
                        let ctx = SealContext {
                            task: &item.task,
                            run: &item.run,
                            station: &name,
                            output: "r.json",
                        };
                        let sealed = seal(&pk, &ctx, b"{\"n\":1}").map_err(|e| {
                            amicus_registry::client::ClientError::Decode(e.to_string())
                        })?;
                        client
                            .result(
                                &item.run,
                                vec![SealedOutput {
                                    name: "r.json".into(),
                                    sealed: base64::engine::general_purpose::STANDARD
                                        .encode(sealed),
                                    signature: None,
                                }],
                            )
                            .await
                    }
                    .await;
                    match ok {
                        Ok(()) => stored
                            .lock()
                            .expect("lock")
                            .push((item.task.clone(), Instant::now())),
                        Err(_) => {
                            errs.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }
        }));
    }
    // The researcher: one task to one responder every 250 ms, in turn.
    let start = Instant::now();
    let mut created: Vec<(String, Instant)> = Vec::new();
    let mut n = 0usize;
    while start.elapsed() < Duration::from_secs(args.seconds) {
        let t0 = Instant::now();
        let task = alice
            .create_task(&NewTask {
                train: train.clone(),
                stations: vec![format!("resp{}", n % 4)],
                params: None,
                expires_in_s: None,
                statement: None,
            })
            .await;
        match task {
            Ok(t) => created.push((t.id, t0)),
            Err(_) => {
                rt_errors.fetch_add(1, Ordering::Relaxed);
            }
        }
        n += 1;
        bar.set_position(start.elapsed().as_secs().min(args.seconds));
        tokio::time::sleep(Duration::from_millis(250).saturating_sub(t0.elapsed())).await;
    }
    let elapsed = start.elapsed().as_secs_f64();
    running.store(false, Ordering::Relaxed);
    bar.finish_and_clear();
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await?);
    }
    for t in responder_tasks {
        t.await?;
    }
    // Capacity: 32 stations polling back to back for a few seconds.
    let flood_for = Duration::from_secs(args.seconds.clamp(1, 5));
    let t0 = Instant::now();
    let mut floods = Vec::new();
    for client in flooders {
        floods.push(tokio::spawn(async move {
            let mut n = 0u64;
            while t0.elapsed() < flood_for {
                if client.work(0).await.is_ok() {
                    n += 1;
                }
            }
            n
        }));
    }
    let mut answered = 0u64;
    for f in floods {
        answered += f.await?;
    }
    let capacity = answered as f64 / t0.elapsed().as_secs_f64();
    let _ = stop_tx.send(());
    let _ = server.join();
    lat.sort_by(f64::total_cmp);
    let since = |list: &[(String, Instant)]| {
        let mut v: Vec<f64> = created
            .iter()
            .filter_map(|(id, t0)| {
                list.iter()
                    .find(|(t, _)| t == id)
                    .map(|(_, t)| t.duration_since(*t0).as_secs_f64() * 1000.0)
            })
            .collect();
        v.sort_by(f64::total_cmp);
        v
    };
    let d = since(&delivered.lock().expect("lock"));
    let s = since(&stored.lock().expect("lock"));
    drop(db);
    if let Some((admin, name)) = cleanup {
        let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE {name} WITH (FORCE)"
        )))
        .execute(&admin)
        .await;
    }
    Ok(Figures {
        database: kind.into(),
        stations,
        seconds: elapsed,
        poll_requests: lat.len() as u64,
        poll_errors: errors.load(Ordering::Relaxed),
        requests_per_second: lat.len() as f64 / elapsed,
        poll_p50_ms: pct(&lat, 0.5),
        poll_p95_ms: pct(&lat, 0.95),
        poll_p99_ms: pct(&lat, 0.99),
        poll_max_ms: lat.last().copied().unwrap_or(f64::NAN),
        round_trips: s.len(),
        capacity_requests_per_second: capacity,
        round_trip_errors: rt_errors.load(Ordering::Relaxed),
        create_to_delivered_p50_ms: pct(&d, 0.5),
        create_to_delivered_p99_ms: pct(&d, 0.99),
        create_to_stored_p50_ms: pct(&s, 0.5),
        create_to_stored_p99_ms: pct(&s, 0.99),
    })
}

#[derive(Serialize, Default, Clone)]
struct Flood {
    database: String,
    stations: usize,
    phase_seconds: u64,
    quiet_polls: usize,
    quiet_p50_ms: f64,
    quiet_p99_ms: f64,
    flood_polls: usize,
    flood_p50_ms: f64,
    flood_p99_ms: f64,
    poll_errors: u64,
    /// p99 during the flood over p99 without (goal ≤ 2).
    p99_ratio: f64,
    bad_requests: u64,
    bad_requests_per_second: f64,
    /// Of the bad requests: answered 429 (rate limited before anything else).
    rate_limited: u64,
    /// Trail rows written during the flood phase.
    trail_rows_during_flood: u64,
}

/// Good stations poll once a second, from ten loopback addresses (ten each), for a quiet
/// phase, a phase in which one address floods the registry with bad requests (unauthenticated
/// uploads with 1 MiB bodies, unknown tokens, forged station signatures), and a quiet phase
/// again; the registry runs with its default limits.
async fn flood(
    kind: &str,
    args: &RegistryArgs,
    tmp: &std::path::Path,
    pg: Option<&str>,
) -> Result<Flood> {
    const STATIONS: usize = 100;
    const ADDRESSES: usize = 10;
    let (url, cleanup) = fresh_db(kind, tmp, pg, &format!("{kind}-flood")).await?;
    let db = Db::connect(&url).await?;
    let (base, stop_tx, server) = start_registry(&db, Limits::default())?;
    let mut pollers = Vec::new();
    let mut shared = Vec::new();
    for a in 0..ADDRESSES {
        let ip: std::net::IpAddr = format!("127.0.1.{}", a + 1).parse()?;
        shared.push(amicus_registry::client::http_from(
            Duration::from_secs(30),
            ip,
        )?);
    }
    for i in 0..STATIONS {
        let key = SecretKey::generate()?;
        let name = format!("good{i:03}");
        db.insert_station(
            &name,
            &key.public().id().to_string(),
            &key.public().to_pem(),
        )
        .await?;
        pollers.push(Arc::new(StationClient::with_http(
            &base,
            key,
            shared[i % ADDRESSES].clone(),
        )?));
    }
    let errors = Arc::new(AtomicU64::new(0));
    let phase = Duration::from_secs(args.flood_seconds);
    let poll_phase = |pollers: &Vec<Arc<StationClient>>| {
        let mut tasks = Vec::new();
        let t0 = Instant::now();
        for (i, c) in pollers.iter().enumerate() {
            let c = c.clone();
            let errors = errors.clone();
            tasks.push(tokio::spawn(async move {
                let interval = Duration::from_secs(1);
                tokio::time::sleep(interval.mul_f64((i as f64 * 0.618_033_988_7).fract())).await;
                let mut lat = Vec::new();
                while t0.elapsed() < phase {
                    let t = Instant::now();
                    match c.work(0).await {
                        Ok(_) => lat.push(t.elapsed().as_secs_f64() * 1000.0),
                        Err(_) => {
                            errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    tokio::time::sleep(interval.saturating_sub(t.elapsed())).await;
                }
                lat
            }));
        }
        tasks
    };
    let gather = |tasks: Vec<tokio::task::JoinHandle<Vec<f64>>>| async move {
        let mut lat = Vec::new();
        for t in tasks {
            lat.extend(t.await.unwrap_or_default());
        }
        lat
    };
    let mut quiet = gather(poll_phase(&pollers)).await;
    // The flood: 8 senders from one address, paced to 1000 requests/s in all.
    let bad = amicus_registry::client::http_from(Duration::from_secs(10), "127.0.0.2".parse()?)?;
    let sent = Arc::new(AtomicU64::new(0));
    let limited = Arc::new(AtomicU64::new(0));
    let trail_before = db.audit_entries().await?.len();
    let good = poll_phase(&pollers);
    let t0 = Instant::now();
    let mut flooders = Vec::new();
    for f in 0..8u64 {
        let (bad, base, sent, limited) = (bad.clone(), base.clone(), sent.clone(), limited.clone());
        flooders.push(tokio::spawn(async move {
            let big = vec![0u8; 1 << 20];
            let mut n = 0u64;
            while t0.elapsed() < phase {
                let t = Instant::now();
                let req = match (n + f) % 10 {
                    0 => bad
                        .put(format!("{base}/v1/trains"))
                        .bearer_auth("amicus_not_a_token")
                        .body(big.clone()),
                    1..=5 => bad
                        .get(format!("{base}/v1/tasks"))
                        .bearer_auth(format!("amicus_{n:064x}")),
                    _ => bad
                        .get(format!("{base}/v1/station/work?wait=0"))
                        .header("signature-input", "sig1=(\"@method\");keyid=\"nobody\"")
                        .header("signature", "sig1=:AAAA:"),
                };
                if let Ok(r) = req.send().await
                    && r.status().as_u16() == 429
                {
                    limited.fetch_add(1, Ordering::Relaxed);
                }
                sent.fetch_add(1, Ordering::Relaxed);
                n += 1;
                tokio::time::sleep(Duration::from_millis(8).saturating_sub(t.elapsed())).await;
            }
        }));
    }
    let mut flooded = gather(good).await;
    for f in flooders {
        f.await?;
    }
    let flood_elapsed = t0.elapsed().as_secs_f64();
    // Refusal counts are written by the registry's housekeeping each minute: stop it (it
    // flushes them) before counting rows.
    quiet.extend(gather(poll_phase(&pollers)).await);
    let _ = stop_tx.send(());
    let _ = server.join();
    let trail_rows = db.audit_entries().await?.len().saturating_sub(trail_before);
    drop(db);
    if let Some((admin, name)) = cleanup {
        let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE {name} WITH (FORCE)"
        )))
        .execute(&admin)
        .await;
    }
    quiet.sort_by(f64::total_cmp);
    flooded.sort_by(f64::total_cmp);
    let bad_requests = sent.load(Ordering::Relaxed);
    Ok(Flood {
        database: kind.into(),
        stations: STATIONS,
        phase_seconds: args.flood_seconds,
        quiet_polls: quiet.len(),
        quiet_p50_ms: pct(&quiet, 0.5),
        quiet_p99_ms: pct(&quiet, 0.99),
        flood_polls: flooded.len(),
        flood_p50_ms: pct(&flooded, 0.5),
        flood_p99_ms: pct(&flooded, 0.99),
        poll_errors: errors.load(Ordering::Relaxed),
        p99_ratio: pct(&flooded, 0.99) / pct(&quiet, 0.99),
        bad_requests,
        bad_requests_per_second: bad_requests as f64 / flood_elapsed,
        rate_limited: limited.load(Ordering::Relaxed),
        trail_rows_during_flood: trail_rows as u64,
    })
}

pub fn run(args: RegistryArgs) -> Result<()> {
    let pg = args
        .postgres
        .clone()
        .or_else(|| std::env::var("AMICUS_BENCH_POSTGRES").ok());
    let tmp = tempfile::tempdir()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let mut kinds = vec!["sqlite"];
    if pg.is_some() {
        kinds.push("postgres");
    } else {
        eprintln!(
            "bench: PostgreSQL not measured: pass --postgres URL (scripts/postgres.sh start DIR PORT starts one)"
        );
    }
    let mut all = Vec::new();
    for kind in &kinds {
        for &n in &args.stations {
            let f = rt.block_on(one(kind, n, &args, tmp.path(), pg.as_deref()))?;
            eprintln!(
                "  {kind:>8} {n:>5} stations: {:.0} req/s, poll p50 {:.1} ms p99 {:.1} ms, round trip p50 {:.0} ms ({} tasks, {} errors); capacity {:.0} req/s",
                f.requests_per_second,
                f.poll_p50_ms,
                f.poll_p99_ms,
                f.create_to_stored_p50_ms,
                f.round_trips,
                f.poll_errors + f.round_trip_errors,
                f.capacity_requests_per_second
            );
            all.push(f);
        }
    }
    let mut floods = Vec::new();
    if args.flood_seconds > 0 {
        for kind in &kinds {
            let f = rt.block_on(flood(kind, &args, tmp.path(), pg.as_deref()))?;
            eprintln!(
                "  {kind:>8} flood: poll p99 {:.1} ms quiet, {:.1} ms under {:.0} bad requests/s ({} of {} answered 429, {} trail rows): {:.2}x",
                f.quiet_p99_ms,
                f.flood_p99_ms,
                f.bad_requests_per_second,
                f.rate_limited,
                f.bad_requests,
                f.trail_rows_during_flood,
                f.p99_ratio
            );
            floods.push(f);
        }
    }
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let json = serde_json::json!({
        "bench": "registry",
        "cpus": cpus,
        "interval_s": args.interval,
        "goal": "1000 stations polling one replica over PostgreSQL: p99 request latency under 100 ms",
        "results": all,
        "flood_goal": "p99 of good stations' polls during a flood of bad requests at most 2x p99 without",
        "flood": floods,
    });
    std::fs::write(&args.json, serde_json::to_string_pretty(&json)?)?;
    let mut md = String::from(
        "# amicus bench registry\n\nSimulated stations poll (signed, `wait=0`) every interval; four more long-poll and answer tasks at once. Server and load share the machine.\n\n| database | stations | req/s | poll p50 ms | poll p95 ms | poll p99 ms | poll max ms | errors | tasks | create→delivered p50 ms | create→stored p50 ms | create→stored p99 ms | capacity req/s (32 back-to-back pollers) |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for f in &all {
        md += &format!(
            "| {} | {} | {:.0} | {:.1} | {:.1} | {:.1} | {:.1} | {} | {} | {:.0} | {:.0} | {:.0} | {:.0} |\n",
            f.database,
            f.stations,
            f.requests_per_second,
            f.poll_p50_ms,
            f.poll_p95_ms,
            f.poll_p99_ms,
            f.poll_max_ms,
            f.poll_errors + f.round_trip_errors,
            f.round_trips,
            f.create_to_delivered_p50_ms,
            f.create_to_stored_p50_ms,
            f.create_to_stored_p99_ms,
            f.capacity_requests_per_second
        );
    }
    if !floods.is_empty() {
        md += "\n## A flood of bad requests\n\n100 stations poll once a second from ten loopback addresses; one other address sends bad requests from 8 senders paced to 1000/s (one in ten an unauthenticated 1 MiB upload, the others unknown tokens and forged station signatures; the achieved rate is in the table). Default limits. Quiet: the phases before and after.\n\n| database | quiet p50 ms | quiet p99 ms | flood p50 ms | flood p99 ms | p99 ratio | bad req/s | answered 429 | trail rows during flood | poll errors |\n|---|---|---|---|---|---|---|---|---|---|\n";
        for f in &floods {
            md += &format!(
                "| {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.2}x | {:.0} | {} of {} | {} | {} |\n",
                f.database,
                f.quiet_p50_ms,
                f.quiet_p99_ms,
                f.flood_p50_ms,
                f.flood_p99_ms,
                f.p99_ratio,
                f.bad_requests_per_second,
                f.rate_limited,
                f.bad_requests,
                f.trail_rows_during_flood,
                f.poll_errors
            );
        }
    }
    std::fs::write(&args.markdown, md)?;
    eprintln!(
        "wrote {} and {}",
        args.json.display(),
        args.markdown.display()
    );
    let most = args.stations.iter().copied().max().unwrap_or(0);
    let headline = all
        .iter()
        .filter(|f| f.stations == most)
        .max_by_key(|f| (f.database == "postgres") as u8)
        .context("no results")?;
    let flood_note = floods
        .iter()
        .max_by_key(|f| (f.database == "postgres") as u8)
        .map(|f| {
            format!(
                "; under a flood of bad requests p99 {:.2}x ({}, goal 2x)",
                f.p99_ratio, f.database
            )
        })
        .unwrap_or_default();
    println!(
        "registry: p99 {:.0} ms at {} stations over {} (goal 100 ms over PostgreSQL{}){flood_note}",
        headline.poll_p99_ms,
        headline.stations,
        if headline.database == "postgres" {
            "PostgreSQL"
        } else {
            "SQLite"
        },
        if headline.database == "postgres" {
            ""
        } else {
            "; PostgreSQL not measured"
        }
    );
    Ok(())
}
