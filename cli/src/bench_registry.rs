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
            let _ = server::serve(l, App::new(server_db, Limits::default()), async {
                let _ = stop_rx.await;
            })
            .await;
        });
    });
    // People, stations, a train.
    let researcher_key = RecipientKey::generate();
    let alice = server::add_user(
        &db,
        &NewUser {
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
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let json = serde_json::json!({
        "bench": "registry",
        "cpus": cpus,
        "interval_s": args.interval,
        "goal": "1000 stations polling one replica over PostgreSQL: p99 request latency under 100 ms",
        "results": all,
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
    println!(
        "registry: p99 {:.0} ms at {} stations over {} (goal 100 ms over PostgreSQL{})",
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
