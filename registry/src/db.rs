//! The registry's database: connection (SQLite or PostgreSQL through sqlx's `Any` driver), the
//! embedded migrations from `migrations/`, and every query the server runs.
//!
//! Owns SQL. Must not decide who may do what (the server checks roles before calling here)
//! and must not see plaintext results (only sealed bytes reach it).
//!
//! The SQL is portable: `$n` placeholders (SQLite reads them as numbered parameters),
//! `ON CONFLICT DO NOTHING` and `RETURNING` (SQLite 3.35+, bundled), no autoincrement (ids
//! are random text), times as BIGINT milliseconds.

use crate::wire::{
    JobState, Plan, RegistryAuditEntry, RetiredKey, RoundWork, RunInfo, RunState, SecAggPhase,
    StationInfo, TrainInfo, WorkItem,
};
use sha2::{Digest as _, Sha256};
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, Row};
use std::time::Duration;

/// The migrations, in order: (version, name, SQL).
const MIGRATIONS: &[(i64, &str, &str)] = &[
    (
        1,
        "registry",
        include_str!("../../migrations/0001_registry.sql"),
    ),
    (2, "jobs", include_str!("../../migrations/0002_jobs.sql")),
    (
        3,
        "secagg",
        include_str!("../../migrations/0003_secagg.sql"),
    ),
    (
        4,
        "hardening",
        include_str!("../../migrations/0004_hardening.sql"),
    ),
    (
        5,
        "signed-requests",
        include_str!("../../migrations/0005_signed_requests.sql"),
    ),
    (
        6,
        "station-keys",
        include_str!("../../migrations/0006_station_keys.sql"),
    ),
    (
        7,
        "list-pages",
        include_str!("../../migrations/0007_list_pages.sql"),
    ),
];

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("database: {0}")]
    Sql(#[from] sqlx::Error),
    #[error(
        "migration {version} ({name}) applied to this database differs from the one built into this registry"
    )]
    MigrationChanged { version: i64, name: String },
    #[error("database URL must start with sqlite:// or postgres://")]
    Scheme,
    #[error("corrupt row: {0}")]
    Corrupt(String),
    #[error("the database is too busy: {0}")]
    Busy(String),
    #[error("key {0} belongs to another station or was retired")]
    KeyTaken(String),
}

/// A station key hand-over that an audit upload carries (see migration 0006).
#[derive(Debug, Clone)]
pub struct Rekey {
    /// The station's key when the upload began.
    pub from_id: String,
    /// Its key after the last hand-over in the upload.
    pub to_id: String,
    pub to_pem: String,
    /// Every key handed over from, in order (`from_id` first): (key id, PEM).
    pub retired: Vec<(String, String)>,
}

#[derive(Clone)]
pub struct Db {
    pub pool: AnyPool,
    pub postgres: bool,
}

type Tx = sqlx::Transaction<'static, sqlx::Any>;

/// Insert a task and one pending run per station; returns the run ids.
async fn insert_task(
    tx: &mut Tx,
    task: &TaskRow,
    recipient_key: &str,
    stations: &[String],
) -> Result<Vec<String>, DbError> {
    sqlx::query(
        "INSERT INTO tasks (id, researcher, train, params, recipient_key, created_ms, expires_ms,
         statement) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(&task.id)
    .bind(&task.researcher)
    .bind(&task.train)
    .bind(&task.params)
    .bind(recipient_key)
    .bind(task.created_ms)
    .bind(task.expires_ms)
    .bind(task.statement.as_deref())
    .execute(&mut **tx)
    .await?;
    let mut ids = Vec::new();
    for st in stations {
        let id = random_id();
        sqlx::query(
            "INSERT INTO runs (id, task, station, state, updated_ms) VALUES ($1, $2, $3, 'pending', $4)",
        )
        .bind(&id)
        .bind(&task.id)
        .bind(st)
        .bind(task.created_ms)
        .execute(&mut **tx)
        .await?;
        ids.push(id);
    }
    Ok(ids)
}

/// A federated job's row.
#[derive(Debug, Clone)]
pub struct JobRow {
    pub id: String,
    pub researcher: String,
    pub train: String,
    pub params: String,
    pub plan: Plan,
    pub stations: Vec<String>,
    pub recipient_key: String,
    pub state: JobState,
    pub round: u32,
    pub reason: Option<String>,
    pub created_ms: i64,
    pub updated_ms: i64,
    /// The researcher's signed request.
    pub statement: Option<String>,
}

/// A stored update and the run it came with.
#[derive(Debug, Clone)]
pub struct StoredUpdate {
    pub run: String,
    pub station: String,
    pub payload: Vec<u8>,
}

/// A round's checkpoint.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    pub round: u32,
    pub weights: Vec<u8>,
    pub server_state: Vec<u8>,
    pub summary: String,
}

/// The station sets of a securely aggregated round (protocol ids), each fixed when the phase
/// that uses it began.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SecAggSets {
    pub participants: Vec<u32>,
    pub sharers: Vec<u32>,
    pub survivors: Vec<u32>,
    pub dropped: Vec<u32>,
}

/// Where a securely aggregated round stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecAggRound {
    pub phase: SecAggPhase,
    pub sets: SecAggSets,
    /// When the phase began.
    pub phase_ms: i64,
}

/// A message a station sent in a securely aggregated round.
#[derive(Debug, Clone)]
pub struct SecAggStored {
    pub station: String,
    /// keys | shares | reveal
    pub kind: String,
    pub body: String,
}

/// How a round ends: the next round's task (or none: the job is over) and the checkpoint.
pub struct RoundEnd<'a> {
    pub checkpoint: Option<&'a Checkpoint>,
    pub next_task: Option<&'a TaskRow>,
    pub state: JobState,
    pub reason: Option<&'a str>,
}

async fn insert_checkpoint(tx: &mut Tx, job: &str, c: &Checkpoint) -> Result<(), DbError> {
    sqlx::query(
        "INSERT INTO checkpoints (job, round, weights, server_state, summary, created_ms)
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(job)
    .bind(i64::from(c.round))
    .bind(&c.weights[..])
    .bind(&c.server_state[..])
    .bind(&c.summary)
    .bind(now_ms())
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// The job part of a work item row (`job`, `round`, `plan` columns; NULL for plain tasks).
fn round_work(r: &AnyRow) -> Result<Option<RoundWork>, DbError> {
    let job: Option<String> = r.try_get("job")?;
    let (Some(job), Some(round), Some(plan)) = (
        job,
        r.try_get::<Option<i64>, _>("round")?,
        r.try_get::<Option<String>, _>("plan")?,
    ) else {
        return Ok(None);
    };
    let plan: Plan =
        serde_json::from_str(&plan).map_err(|e| DbError::Corrupt(format!("job plan: {e}")))?;
    let round = u32::try_from(round).map_err(|_| DbError::Corrupt(format!("round {round}")))?;
    Ok(Some(RoundWork::from_plan(job, round, plan)))
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// A random id: 16 bytes of OS randomness in hex.
pub fn random_id() -> String {
    let mut b = [0u8; 16];
    getrandom::fill(&mut b).expect("operating-system randomness");
    hex::encode(b)
}

pub struct UserRow {
    pub name: String,
    pub role: String,
    pub station: Option<String>,
    pub enc_public_key: Option<String>,
    /// The token stops working then (milliseconds since the epoch).
    pub token_expires_ms: Option<i64>,
    /// The token was revoked then.
    pub revoked_ms: Option<i64>,
}

pub struct TaskRow {
    pub id: String,
    pub researcher: String,
    pub train: String,
    pub params: String,
    pub created_ms: i64,
    pub expires_ms: i64,
    /// The researcher's signed request (a job's, for the tasks of its rounds).
    pub statement: Option<String>,
}

/// Where a request with an Idempotency-Key stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Idempotent {
    /// The first of its key: handle it.
    Fresh,
    /// Answered before: send that answer again.
    Replay { status: u16, response: String },
    /// The first is still being handled.
    InProgress,
    /// The key was used for another request.
    Mismatch,
}

/// Why a station's state report was not applied.
pub enum UpdateRefused {
    NotFound,
    Conflict(RunState),
}

impl Db {
    /// Connect and apply missing migrations. `sqlite://path` creates the file if needed.
    pub async fn connect(url: &str) -> Result<Db, DbError> {
        sqlx::any::install_default_drivers();
        let postgres = url.starts_with("postgres://") || url.starts_with("postgresql://");
        let url = if url.starts_with("sqlite:") {
            if url.contains("mode=") {
                url.to_string()
            } else if url.contains('?') {
                format!("{url}&mode=rwc")
            } else {
                format!("{url}?mode=rwc")
            }
        } else if postgres {
            url.to_string()
        } else {
            return Err(DbError::Scheme);
        };
        let pool = AnyPoolOptions::new()
            .max_connections(if postgres { 16 } else { 4 })
            .acquire_timeout(Duration::from_secs(10))
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    if !postgres {
                        // Writers wait for each other instead of failing; WAL lets readers
                        // run beside the writer.
                        sqlx::raw_sql("PRAGMA busy_timeout = 10000; PRAGMA foreign_keys = ON;")
                            .execute(&mut *conn)
                            .await?;
                    }
                    Ok(())
                })
            })
            .connect(&url)
            .await?;
        if !postgres {
            sqlx::raw_sql("PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL;")
                .execute(&pool)
                .await?;
        }
        let db = Db { pool, postgres };
        db.migrate().await?;
        Ok(db)
    }

    async fn migrate(&self) -> Result<(), DbError> {
        sqlx::raw_sql(
            "CREATE TABLE IF NOT EXISTS amicus_migrations (
                version BIGINT PRIMARY KEY, name TEXT NOT NULL, sha256 TEXT NOT NULL,
                applied_ms BIGINT NOT NULL)",
        )
        .execute(&self.pool)
        .await?;
        for &(version, name, sql) in MIGRATIONS {
            let sum = sha256_hex(sql.as_bytes());
            let mut tx = self.pool.begin().await?;
            if self.postgres {
                // One migrator at a time across replicas.
                sqlx::raw_sql("LOCK TABLE amicus_migrations IN EXCLUSIVE MODE")
                    .execute(&mut *tx)
                    .await?;
            }
            let applied: Option<String> =
                sqlx::query_scalar("SELECT sha256 FROM amicus_migrations WHERE version = $1")
                    .bind(version)
                    .fetch_optional(&mut *tx)
                    .await?;
            match applied {
                Some(s) if s == sum => {}
                Some(_) => {
                    return Err(DbError::MigrationChanged {
                        version,
                        name: name.to_string(),
                    });
                }
                None => {
                    sqlx::raw_sql(sql).execute(&mut *tx).await?;
                    sqlx::query(
                        "INSERT INTO amicus_migrations (version, name, sha256, applied_ms) VALUES ($1, $2, $3, $4)",
                    )
                    .bind(version)
                    .bind(name)
                    .bind(&sum)
                    .bind(now_ms())
                    .execute(&mut *tx)
                    .await?;
                }
            }
            tx.commit().await?;
        }
        Ok(())
    }

    // ---- people -------------------------------------------------------------------------

    /// Returns false when the name is taken.
    pub async fn insert_user(
        &self,
        name: &str,
        role: &str,
        station: Option<&str>,
        token_sha256: &str,
        enc_public_key: Option<&str>,
        token_expires_ms: Option<i64>,
    ) -> Result<bool, DbError> {
        let r = sqlx::query(
            "INSERT INTO users (name, role, station, token_sha256, enc_public_key, created_ms,
             token_expires_ms) VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT DO NOTHING",
        )
        .bind(name)
        .bind(role)
        .bind(station)
        .bind(token_sha256)
        .bind(enc_public_key)
        .bind(now_ms())
        .bind(token_expires_ms)
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    fn user_row(r: &AnyRow) -> Result<UserRow, DbError> {
        Ok(UserRow {
            name: r.try_get("name")?,
            role: r.try_get("role")?,
            station: r.try_get("station")?,
            enc_public_key: r.try_get("enc_public_key")?,
            token_expires_ms: r.try_get("token_expires_ms")?,
            revoked_ms: r.try_get("revoked_ms")?,
        })
    }

    /// Give `name` a new token (its hash), valid until `expires_ms`; the old one stops
    /// working and a revocation is lifted. False when there is no such user.
    pub async fn rotate_token(
        &self,
        name: &str,
        token_sha256: &str,
        expires_ms: Option<i64>,
    ) -> Result<bool, DbError> {
        let r = sqlx::query(
            "UPDATE users SET token_sha256 = $2, token_expires_ms = $3, revoked_ms = NULL
             WHERE name = $1",
        )
        .bind(name)
        .bind(token_sha256)
        .bind(expires_ms)
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    /// Stop `name`'s token working (a second revocation keeps the first time). False when
    /// there is no such user.
    pub async fn revoke_token(&self, name: &str) -> Result<bool, DbError> {
        let r =
            sqlx::query("UPDATE users SET revoked_ms = COALESCE(revoked_ms, $2) WHERE name = $1")
                .bind(name)
                .bind(now_ms())
                .execute(&self.pool)
                .await?;
        Ok(r.rows_affected() == 1)
    }

    /// The user whose token hashes to `token_sha256`. The lookup is by hash, so its timing
    /// says nothing about the token.
    pub async fn user_by_token(&self, token_sha256: &str) -> Result<Option<UserRow>, DbError> {
        let row = sqlx::query(
            "SELECT name, role, station, enc_public_key, token_expires_ms, revoked_ms FROM users
             WHERE token_sha256 = $1",
        )
        .bind(token_sha256)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(Self::user_row).transpose()
    }

    pub async fn users(&self) -> Result<Vec<UserRow>, DbError> {
        let rows =
            sqlx::query("SELECT name, role, station, enc_public_key, token_expires_ms, revoked_ms FROM users ORDER BY name")
                .fetch_all(&self.pool)
                .await?;
        rows.iter().map(Self::user_row).collect()
    }

    // ---- stations -----------------------------------------------------------------------

    pub async fn insert_station(
        &self,
        name: &str,
        key_id: &str,
        public_key: &str,
    ) -> Result<bool, DbError> {
        // A key some station retired is never taken again.
        let retired: Option<String> =
            sqlx::query_scalar("SELECT key_id FROM retired_station_keys WHERE key_id = $1")
                .bind(key_id)
                .fetch_optional(&self.pool)
                .await?;
        if retired.is_some() {
            return Ok(false);
        }
        let r = sqlx::query(
            "INSERT INTO stations (name, key_id, public_key, created_ms) VALUES ($1, $2, $3, $4)
             ON CONFLICT DO NOTHING",
        )
        .bind(name)
        .bind(key_id)
        .bind(public_key)
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    fn station_row(r: &AnyRow) -> Result<StationInfo, DbError> {
        Ok(StationInfo {
            name: r.try_get("name")?,
            key_id: r.try_get("key_id")?,
            public_key: r.try_get("public_key")?,
            last_seen_ms: r.try_get("last_seen_ms")?,
            retired_keys: Vec::new(),
        })
    }

    /// The keys `station` signed with before its current one, oldest first.
    pub async fn retired_keys(&self, station: &str) -> Result<Vec<RetiredKey>, DbError> {
        let rows = sqlx::query(
            "SELECT key_id, public_key, retired_ms FROM retired_station_keys WHERE station = $1
             ORDER BY retired_ms, key_id",
        )
        .bind(station)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(RetiredKey {
                    key_id: r.try_get("key_id")?,
                    public_key: r.try_get("public_key")?,
                    retired_ms: r.try_get("retired_ms")?,
                })
            })
            .collect()
    }

    /// Every station's retired keys, by station.
    async fn all_retired_keys(
        &self,
    ) -> Result<std::collections::BTreeMap<String, Vec<RetiredKey>>, DbError> {
        let rows = sqlx::query(
            "SELECT station, key_id, public_key, retired_ms FROM retired_station_keys
             ORDER BY retired_ms, key_id",
        )
        .fetch_all(&self.pool)
        .await?;
        let mut out: std::collections::BTreeMap<String, Vec<RetiredKey>> = Default::default();
        for r in &rows {
            out.entry(r.try_get("station")?)
                .or_default()
                .push(RetiredKey {
                    key_id: r.try_get("key_id")?,
                    public_key: r.try_get("public_key")?,
                    retired_ms: r.try_get("retired_ms")?,
                });
        }
        Ok(out)
    }

    pub async fn station_by_key(&self, key_id: &str) -> Result<Option<StationInfo>, DbError> {
        let row = sqlx::query(
            "SELECT name, key_id, public_key, last_seen_ms FROM stations WHERE key_id = $1",
        )
        .bind(key_id)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(Self::station_row).transpose()
    }

    /// A station with its retired keys.
    pub async fn station(&self, name: &str) -> Result<Option<StationInfo>, DbError> {
        let row = sqlx::query(
            "SELECT name, key_id, public_key, last_seen_ms FROM stations WHERE name = $1",
        )
        .bind(name)
        .fetch_optional(&self.pool)
        .await?;
        let Some(mut st) = row.as_ref().map(Self::station_row).transpose()? else {
            return Ok(None);
        };
        st.retired_keys = self.retired_keys(name).await?;
        Ok(Some(st))
    }

    /// Every station with its retired keys.
    pub async fn stations(&self) -> Result<Vec<StationInfo>, DbError> {
        let rows = sqlx::query(
            "SELECT name, key_id, public_key, last_seen_ms FROM stations ORDER BY name",
        )
        .fetch_all(&self.pool)
        .await?;
        let mut retired = self.all_retired_keys().await?;
        rows.iter()
            .map(|r| {
                let mut st = Self::station_row(r)?;
                st.retired_keys = retired.remove(&st.name).unwrap_or_default();
                Ok(st)
            })
            .collect()
    }

    /// Record that a station was seen; writes at most every 10 s per station.
    pub async fn touch_station(&self, name: &str) -> Result<(), DbError> {
        let now = now_ms();
        sqlx::query(
            "UPDATE stations SET last_seen_ms = $1 WHERE name = $2
             AND (last_seen_ms IS NULL OR last_seen_ms < $3)",
        )
        .bind(now)
        .bind(name)
        .bind(now - 10_000)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Remember a nonce; false if it was seen before (a replay).
    pub async fn use_nonce(
        &self,
        key_id: &str,
        nonce: &str,
        created_s: i64,
    ) -> Result<bool, DbError> {
        let r = sqlx::query(
            "INSERT INTO nonces (key_id, nonce, created_s) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
        )
        .bind(key_id)
        .bind(nonce)
        .bind(created_s)
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    /// Forget nonces older than any request the clock window still admits.
    pub async fn prune_nonces(&self, older_than_s: i64) -> Result<u64, DbError> {
        let r = sqlx::query("DELETE FROM nonces WHERE created_s < $1")
            .bind(older_than_s)
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected())
    }

    // ---- pages of growing lists ------------------------------------------------------

    /// One page of `table` in (`order`, `id`) order, read with the database's index rather
    /// than the whole list: at most `limit` rows after the row whose `id` is `after`, only rows
    /// whose `filter` column equals its value. `None` when `after` names no row of that list.
    /// Table and column names are this module's constants, never a caller's text.
    #[allow(clippy::too_many_arguments)]
    async fn keyset<T>(
        &self,
        table: &'static str,
        cols: &'static str,
        order: &'static str,
        id: &'static str,
        filter: Option<(&'static str, &str)>,
        after: Option<&str>,
        limit: usize,
        row: fn(&AnyRow) -> Result<T, DbError>,
    ) -> Result<Option<Vec<T>>, DbError> {
        let cursor = match after {
            None => None,
            Some(a) => {
                let sql = match filter {
                    Some((col, _)) => {
                        format!("SELECT {order} FROM {table} WHERE {id} = $1 AND {col} = $2")
                    }
                    None => format!("SELECT {order} FROM {table} WHERE {id} = $1"),
                };
                // Audited: only the `'static` names above are formatted in; values are bound.
                let mut q = sqlx::query_scalar::<_, i64>(sqlx::AssertSqlSafe(sql)).bind(a);
                if let Some((_, v)) = filter {
                    q = q.bind(v);
                }
                match q.fetch_optional(&self.pool).await? {
                    None => return Ok(None),
                    Some(at) => Some((at, a)),
                }
            }
        };
        let mut n = 0;
        let mut next = || {
            n += 1;
            format!("${n}")
        };
        let mut conds = Vec::new();
        if let Some((col, _)) = filter {
            conds.push(format!("{col} = {}", next()));
        }
        if cursor.is_some() {
            let (at, last) = (next(), next());
            conds.push(format!(
                "({order} > {at} OR ({order} = {at} AND {id} > {last}))"
            ));
        }
        let limit_param = next();
        let sql = format!(
            "SELECT {cols} FROM {table}{} ORDER BY {order}, {id} LIMIT {limit_param}",
            if conds.is_empty() {
                String::new()
            } else {
                format!(" WHERE {}", conds.join(" AND "))
            }
        );
        // Audited: only the `'static` names above and numbered placeholders are formatted in.
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
        if let Some((_, v)) = filter {
            q = q.bind(v);
        }
        if let Some((at, last)) = cursor {
            q = q.bind(at).bind(last);
        }
        let rows = q
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(row)
            .collect::<Result<Vec<T>, _>>()
            .map(Some)
    }

    // ---- trains -------------------------------------------------------------------------

    /// Store a verified bundle. A second upload of the same digest replaces the stored bytes
    /// (new signatures) only for the same uploader; false otherwise.
    pub async fn put_train(&self, info: &TrainInfo, bundle: &[u8]) -> Result<bool, DbError> {
        let caps = serde_json::to_string(&info.capabilities).expect("strings serialise");
        let signers = serde_json::to_string(&info.signers).expect("strings serialise");
        let r = sqlx::query(
            "INSERT INTO trains (digest, name, version, bytes, capabilities, signers, uploaded_by, created_ms, bundle)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT DO NOTHING",
        )
        .bind(&info.digest)
        .bind(&info.name)
        .bind(&info.version)
        .bind(info.bytes)
        .bind(&caps)
        .bind(&signers)
        .bind(&info.uploaded_by)
        .bind(info.created_ms)
        .bind(bundle)
        .execute(&self.pool)
        .await?;
        if r.rows_affected() == 1 {
            return Ok(true);
        }
        let r = sqlx::query(
            "UPDATE trains SET bytes = $1, signers = $2, bundle = $3 WHERE digest = $4 AND uploaded_by = $5",
        )
        .bind(info.bytes)
        .bind(&signers)
        .bind(bundle)
        .bind(&info.digest)
        .bind(&info.uploaded_by)
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    fn train_row(r: &AnyRow) -> Result<TrainInfo, DbError> {
        let caps: String = r.try_get("capabilities")?;
        let signers: String = r.try_get("signers")?;
        Ok(TrainInfo {
            digest: r.try_get("digest")?,
            name: r.try_get("name")?,
            version: r.try_get("version")?,
            bytes: r.try_get("bytes")?,
            capabilities: serde_json::from_str(&caps)
                .map_err(|e| DbError::Corrupt(e.to_string()))?,
            signers: serde_json::from_str(&signers).map_err(|e| DbError::Corrupt(e.to_string()))?,
            uploaded_by: r.try_get("uploaded_by")?,
            created_ms: r.try_get("created_ms")?,
        })
    }

    /// A page of the trains, oldest first (see [`Db::keyset`]).
    pub async fn trains(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Option<Vec<TrainInfo>>, DbError> {
        self.keyset(
            "trains",
            "digest, name, version, bytes, capabilities, signers, uploaded_by, created_ms",
            "created_ms",
            "digest",
            None,
            after,
            limit,
            Self::train_row,
        )
        .await
    }

    pub async fn train(&self, digest: &str) -> Result<Option<TrainInfo>, DbError> {
        let row = sqlx::query(
            "SELECT digest, name, version, bytes, capabilities, signers, uploaded_by, created_ms
             FROM trains WHERE digest = $1",
        )
        .bind(digest)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(Self::train_row).transpose()
    }

    pub async fn train_bundle(&self, digest: &str) -> Result<Option<Vec<u8>>, DbError> {
        Ok(
            sqlx::query_scalar("SELECT bundle FROM trains WHERE digest = $1")
                .bind(digest)
                .fetch_optional(&self.pool)
                .await?,
        )
    }

    // ---- tasks and runs -----------------------------------------------------------------

    /// Create a task and one pending run per station, atomically. Returns the run ids.
    pub async fn create_task(
        &self,
        task: &TaskRow,
        recipient_key: &str,
        stations: &[String],
    ) -> Result<Vec<String>, DbError> {
        let mut tx = self.pool.begin().await?;
        let ids = insert_task(&mut tx, task, recipient_key, stations).await?;
        tx.commit().await?;
        Ok(ids)
    }

    fn task_row(r: &AnyRow) -> Result<TaskRow, DbError> {
        Ok(TaskRow {
            id: r.try_get("id")?,
            researcher: r.try_get("researcher")?,
            train: r.try_get("train")?,
            params: r.try_get("params")?,
            created_ms: r.try_get("created_ms")?,
            expires_ms: r.try_get("expires_ms")?,
            statement: r.try_get("statement")?,
        })
    }

    pub async fn task(&self, id: &str) -> Result<Option<TaskRow>, DbError> {
        let row = sqlx::query(
            "SELECT id, researcher, train, params, created_ms, expires_ms, statement FROM tasks WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(Self::task_row).transpose()
    }

    /// Tasks of one researcher, or all of them.
    /// A page of the tasks (of one researcher, or all), oldest first.
    pub async fn tasks(
        &self,
        researcher: Option<&str>,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Option<Vec<TaskRow>>, DbError> {
        self.keyset(
            "tasks",
            "id, researcher, train, params, created_ms, expires_ms, statement",
            "created_ms",
            "id",
            researcher.map(|r| ("researcher", r)),
            after,
            limit,
            Self::task_row,
        )
        .await
    }

    fn run_row(r: &AnyRow) -> Result<RunInfo, DbError> {
        let state: String = r.try_get("state")?;
        Ok(RunInfo {
            id: r.try_get("id")?,
            task: r.try_get("task")?,
            station: r.try_get("station")?,
            state: RunState::parse(&state).ok_or_else(|| DbError::Corrupt(state.clone()))?,
            reason: r.try_get("reason")?,
            updated_ms: r.try_get("updated_ms")?,
        })
    }

    pub async fn runs_of_task(&self, task: &str) -> Result<Vec<RunInfo>, DbError> {
        let rows = sqlx::query(
            "SELECT id, task, station, state, reason, updated_ms FROM runs WHERE task = $1 ORDER BY station",
        )
        .bind(task)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(Self::run_row).collect()
    }

    /// A page of a station's runs, least recently changed first.
    pub async fn runs_of_station(
        &self,
        station: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Option<Vec<RunInfo>>, DbError> {
        self.keyset(
            "runs",
            "id, task, station, state, reason, updated_ms",
            "updated_ms",
            "id",
            Some(("station", station)),
            after,
            limit,
            Self::run_row,
        )
        .await
    }

    pub async fn run(&self, id: &str) -> Result<Option<RunInfo>, DbError> {
        let row = sqlx::query(
            "SELECT id, task, station, state, reason, updated_ms FROM runs WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(Self::run_row).transpose()
    }

    /// Runs whose task's deadline passed before they finished become `expired`.
    pub async fn expire_overdue(&self) -> Result<Vec<RunInfo>, DbError> {
        let now = now_ms();
        let rows = sqlx::query(
            "UPDATE runs SET state = 'expired', reason = 'the task expired before the run finished',
             updated_ms = $1
             WHERE state IN ('pending', 'delivered', 'running')
             AND task IN (SELECT id FROM tasks WHERE expires_ms < $1)
             RETURNING id, task, station, state, reason, updated_ms",
        )
        .bind(now)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(Self::run_row).collect()
    }

    async fn work_items(&self, station: &str, running_too: bool) -> Result<Vec<WorkItem>, DbError> {
        let sql = if running_too {
            "SELECT r.id, r.task, r.station, r.state, t.train, t.params, t.recipient_key, t.expires_ms,
             t.statement, jr.job AS job, jr.round AS round, j.plan AS plan
             FROM runs r JOIN tasks t ON t.id = r.task
             LEFT JOIN job_rounds jr ON jr.task = t.id LEFT JOIN jobs j ON j.id = jr.job
             WHERE r.station = $1 AND r.state IN ('delivered', 'running') ORDER BY t.created_ms, r.id"
        } else {
            "SELECT r.id, r.task, r.station, r.state, t.train, t.params, t.recipient_key, t.expires_ms,
             t.statement, jr.job AS job, jr.round AS round, j.plan AS plan
             FROM runs r JOIN tasks t ON t.id = r.task
             LEFT JOIN job_rounds jr ON jr.task = t.id LEFT JOIN jobs j ON j.id = jr.job
             WHERE r.station = $1 AND r.state = 'delivered' ORDER BY t.created_ms, r.id"
        };
        let rows = sqlx::query(sql).bind(station).fetch_all(&self.pool).await?;
        rows.iter()
            .map(|r| {
                let state: String = r.try_get("state")?;
                Ok(WorkItem {
                    run: r.try_get("id")?,
                    task: r.try_get("task")?,
                    station: r.try_get("station")?,
                    train: r.try_get("train")?,
                    params: r.try_get("params")?,
                    recipient_key: r.try_get("recipient_key")?,
                    state: RunState::parse(&state)
                        .ok_or_else(|| DbError::Corrupt(state.clone()))?,
                    expires_ms: r.try_get("expires_ms")?,
                    job: round_work(r)?,
                    statement: r.try_get("statement")?,
                })
            })
            .collect()
    }

    /// Hand a station its pending runs: they become `delivered` (exactly once, also across
    /// replicas: the UPDATE decides).
    pub async fn take_work(&self, station: &str) -> Result<Vec<WorkItem>, DbError> {
        let taken: Vec<String> = sqlx::query_scalar(
            "UPDATE runs SET state = 'delivered', updated_ms = $1
             WHERE station = $2 AND state = 'pending'
             AND task IN (SELECT id FROM tasks WHERE expires_ms >= $1) RETURNING id",
        )
        .bind(now_ms())
        .bind(station)
        .fetch_all(&self.pool)
        .await?;
        if taken.is_empty() {
            return Ok(Vec::new());
        }
        let items = self.work_items(station, false).await?;
        Ok(items
            .into_iter()
            .filter(|i| taken.contains(&i.run))
            .collect())
    }

    /// A station's delivered and running runs, for reconciling after a restart.
    pub async fn open_work(&self, station: &str) -> Result<Vec<WorkItem>, DbError> {
        self.work_items(station, true).await
    }

    /// Apply a station's state report if the transition is allowed. Reporting the state a
    /// run is already in is accepted (a retried request).
    pub async fn update_run(
        &self,
        station: &str,
        run: &str,
        to: RunState,
        reason: Option<&str>,
    ) -> Result<Result<(), UpdateRefused>, DbError> {
        // One literal statement per allowed transition (sqlx refuses dynamic SQL).
        let sql = match to {
            RunState::Delivered | RunState::Running => Some(
                "UPDATE runs SET state = $1, reason = $2, updated_ms = $3
                 WHERE id = $4 AND station = $5 AND state = 'delivered'
                 AND task IN (SELECT id FROM tasks WHERE expires_ms >= $3)",
            ),
            // The station's admission runs after it announced the run (a federated round's
            // privacy budget, for one), so a refusal may follow `running`.
            RunState::Refused | RunState::Failed => Some(
                "UPDATE runs SET state = $1, reason = $2, updated_ms = $3
                 WHERE id = $4 AND station = $5 AND state IN ('delivered', 'running')
                 AND task IN (SELECT id FROM tasks WHERE expires_ms >= $3)",
            ),
            _ => None,
        };
        if let Some(sql) = sql {
            let r = sqlx::query(sql)
                .bind(to.as_str())
                .bind(reason)
                .bind(now_ms())
                .bind(run)
                .bind(station)
                .execute(&self.pool)
                .await?;
            if r.rows_affected() == 1 {
                return Ok(Ok(()));
            }
        }
        // Expiry is decided here, not only by the sweep: a late report finds the run expired.
        self.expire_overdue().await?;
        match self.run(run).await? {
            Some(r) if r.station == station && r.state == to => Ok(Ok(())),
            Some(r) if r.station == station => Ok(Err(UpdateRefused::Conflict(r.state))),
            _ => Ok(Err(UpdateRefused::NotFound)),
        }
    }

    /// Store a run's sealed outputs and mark it done, atomically.
    pub async fn store_result(
        &self,
        station: &str,
        run: &str,
        outputs: &[(String, Vec<u8>, Option<String>)],
        update: Option<&[u8]>,
    ) -> Result<Result<(), UpdateRefused>, DbError> {
        let mut tx = self.pool.begin().await?;
        let r = sqlx::query(
            "UPDATE runs SET state = 'done', reason = NULL, updated_ms = $1
             WHERE id = $2 AND station = $3 AND state = 'running'
             AND task IN (SELECT id FROM tasks WHERE expires_ms >= $1)",
        )
        .bind(now_ms())
        .bind(run)
        .bind(station)
        .execute(&mut *tx)
        .await?;
        if r.rows_affected() != 1 {
            drop(tx);
            self.expire_overdue().await?;
            return match self.run(run).await? {
                Some(r) if r.station == station && r.state == RunState::Done => Ok(Ok(())),
                Some(r) if r.station == station => Ok(Err(UpdateRefused::Conflict(r.state))),
                _ => Ok(Err(UpdateRefused::NotFound)),
            };
        }
        for (name, sealed, signature) in outputs {
            sqlx::query(
                "INSERT INTO results (run, name, sealed, signature) VALUES ($1, $2, $3, $4)",
            )
            .bind(run)
            .bind(name)
            .bind(&sealed[..])
            .bind(signature.as_deref())
            .execute(&mut *tx)
            .await?;
        }
        if let Some(update) = update {
            sqlx::query("INSERT INTO updates (run, payload) VALUES ($1, $2)")
                .bind(run)
                .bind(update)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(Ok(()))
    }

    /// A run's sealed outputs: (name, sealed bytes, the station's signature).
    pub async fn results_of_run(
        &self,
        run: &str,
    ) -> Result<Vec<(String, Vec<u8>, Option<String>)>, DbError> {
        let rows =
            sqlx::query("SELECT name, sealed, signature FROM results WHERE run = $1 ORDER BY name")
                .bind(run)
                .fetch_all(&self.pool)
                .await?;
        rows.iter()
            .map(|r| {
                Ok((
                    r.try_get("name")?,
                    r.try_get("sealed")?,
                    r.try_get("signature")?,
                ))
            })
            .collect()
    }

    // ---- federated jobs -----------------------------------------------------------------

    /// Create a job with its round-0 checkpoint (the initial weights) and round 1's task.
    pub async fn create_job(
        &self,
        job: &JobRow,
        initial: &Checkpoint,
        first: &TaskRow,
    ) -> Result<(), DbError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO jobs (id, researcher, train, params, plan, stations, recipient_key, state,
             round, reason, created_ms, updated_ms, statement)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, NULL, $10, $10, $11)",
        )
        .bind(&job.id)
        .bind(&job.researcher)
        .bind(&job.train)
        .bind(&job.params)
        .bind(serde_json::to_string(&job.plan).expect("a plan serialises"))
        .bind(serde_json::to_string(&job.stations).expect("names serialise"))
        .bind(&job.recipient_key)
        .bind(job.state.as_str())
        .bind(i64::from(job.round))
        .bind(job.created_ms)
        .bind(job.statement.as_deref())
        .execute(&mut *tx)
        .await?;
        insert_checkpoint(&mut tx, &job.id, initial).await?;
        insert_task(&mut tx, first, &job.recipient_key, &job.stations).await?;
        sqlx::query("INSERT INTO job_rounds (job, round, task) VALUES ($1, $2, $3)")
            .bind(&job.id)
            .bind(i64::from(job.round))
            .bind(&first.id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    fn job_row(r: &AnyRow) -> Result<JobRow, DbError> {
        let corrupt =
            |what: &str, e: &dyn std::fmt::Display| DbError::Corrupt(format!("{what}: {e}"));
        let plan: String = r.try_get("plan")?;
        let stations: String = r.try_get("stations")?;
        let state: String = r.try_get("state")?;
        let round: i64 = r.try_get("round")?;
        Ok(JobRow {
            id: r.try_get("id")?,
            researcher: r.try_get("researcher")?,
            train: r.try_get("train")?,
            params: r.try_get("params")?,
            plan: serde_json::from_str(&plan).map_err(|e| corrupt("job plan", &e))?,
            stations: serde_json::from_str(&stations).map_err(|e| corrupt("job stations", &e))?,
            recipient_key: r.try_get("recipient_key")?,
            state: JobState::parse(&state).ok_or_else(|| DbError::Corrupt(state.clone()))?,
            round: u32::try_from(round).map_err(|e| corrupt("job round", &e))?,
            reason: r.try_get("reason")?,
            created_ms: r.try_get("created_ms")?,
            updated_ms: r.try_get("updated_ms")?,
            statement: r.try_get("statement")?,
        })
    }

    pub async fn job(&self, id: &str) -> Result<Option<JobRow>, DbError> {
        let row = sqlx::query(
            "SELECT id, researcher, train, params, plan, stations, recipient_key, state, round, reason,
             created_ms, updated_ms, statement FROM jobs WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(Self::job_row).transpose()
    }

    /// Jobs of one researcher, or all of them.
    /// A page of the jobs (of one researcher, or all), oldest first.
    pub async fn jobs(
        &self,
        researcher: Option<&str>,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Option<Vec<JobRow>>, DbError> {
        self.keyset(
            "jobs",
            "id, researcher, train, params, plan, stations, recipient_key, state, round, reason, \
             created_ms, updated_ms, statement",
            "created_ms",
            "id",
            researcher.map(|r| ("researcher", r)),
            after,
            limit,
            Self::job_row,
        )
        .await
    }

    /// Ids of the jobs still running.
    pub async fn running_jobs(&self) -> Result<Vec<String>, DbError> {
        Ok(
            sqlx::query_scalar("SELECT id FROM jobs WHERE state = 'running' ORDER BY created_ms")
                .fetch_all(&self.pool)
                .await?,
        )
    }

    /// The job and round a task belongs to, if any.
    pub async fn round_of_task(&self, task: &str) -> Result<Option<(String, u32)>, DbError> {
        let row = sqlx::query("SELECT job, round FROM job_rounds WHERE task = $1")
            .bind(task)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| {
            let round: i64 = r.try_get("round")?;
            Ok((r.try_get("job")?, round as u32))
        })
        .transpose()
    }

    /// (round, task) of every round a job has started.
    pub async fn job_rounds(&self, job: &str) -> Result<Vec<(u32, String)>, DbError> {
        let rows = sqlx::query("SELECT round, task FROM job_rounds WHERE job = $1 ORDER BY round")
            .bind(job)
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| {
                let round: i64 = r.try_get("round")?;
                Ok((round as u32, r.try_get("task")?))
            })
            .collect()
    }

    pub async fn checkpoint(&self, job: &str, round: u32) -> Result<Option<Checkpoint>, DbError> {
        let row = sqlx::query(
            "SELECT round, weights, server_state, summary FROM checkpoints WHERE job = $1 AND round = $2",
        )
        .bind(job)
        .bind(i64::from(round))
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| {
            let round: i64 = r.try_get("round")?;
            Ok(Checkpoint {
                round: round as u32,
                weights: r.try_get("weights")?,
                server_state: r.try_get("server_state")?,
                summary: r.try_get("summary")?,
            })
        })
        .transpose()
    }

    /// (round, summary) of every checkpoint after round 0.
    pub async fn round_summaries(&self, job: &str) -> Result<Vec<(u32, String)>, DbError> {
        let rows = sqlx::query(
            "SELECT round, summary FROM checkpoints WHERE job = $1 AND round > 0 ORDER BY round",
        )
        .bind(job)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let round: i64 = r.try_get("round")?;
                Ok((round as u32, r.try_get("summary")?))
            })
            .collect()
    }

    /// The updates stored for a task's runs.
    pub async fn updates_of_task(&self, task: &str) -> Result<Vec<StoredUpdate>, DbError> {
        let rows = sqlx::query(
            "SELECT u.run AS run, r.station AS station, u.payload AS payload
             FROM updates u JOIN runs r ON r.id = u.run WHERE r.task = $1 ORDER BY r.station",
        )
        .bind(task)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(StoredUpdate {
                    run: r.try_get("run")?,
                    station: r.try_get("station")?,
                    payload: r.try_get("payload")?,
                })
            })
            .collect()
    }

    /// End round `round` of `job` atomically: store its checkpoint, start the next round (if
    /// any) and move the job on. Returns false (and changes nothing) when the round was
    /// already ended, e.g. by another replica or a concurrent report.
    pub async fn end_round(
        &self,
        job: &JobRow,
        round: u32,
        end: RoundEnd<'_>,
    ) -> Result<bool, DbError> {
        let mut tx = self.pool.begin().await?;
        let next_round = if end.next_task.is_some() {
            round + 1
        } else {
            round
        };
        let moved = sqlx::query(
            "UPDATE jobs SET state = $1, round = $2, reason = $3, updated_ms = $4
             WHERE id = $5 AND round = $6 AND state = 'running'",
        )
        .bind(end.state.as_str())
        .bind(i64::from(next_round))
        .bind(end.reason)
        .bind(now_ms())
        .bind(&job.id)
        .bind(i64::from(round))
        .execute(&mut *tx)
        .await?;
        if moved.rows_affected() != 1 {
            return Ok(false);
        }
        if let Some(c) = end.checkpoint {
            insert_checkpoint(&mut tx, &job.id, c).await?;
        }
        if let Some(task) = end.next_task {
            insert_task(&mut tx, task, &job.recipient_key, &job.stations).await?;
            sqlx::query("INSERT INTO job_rounds (job, round, task) VALUES ($1, $2, $3)")
                .bind(&job.id)
                .bind(i64::from(next_round))
                .bind(&task.id)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(true)
    }

    // ---- secure aggregation -------------------------------------------------------------

    /// The protocol state of a round's task, created in the key phase (from `started_ms`) on
    /// first use. Stations poll it: a write happens only the first time.
    pub async fn secagg_round(&self, task: &str, started_ms: i64) -> Result<SecAggRound, DbError> {
        let select = "SELECT phase, sets, phase_ms FROM secagg_rounds WHERE task = $1";
        let row = match sqlx::query(select)
            .bind(task)
            .fetch_optional(&self.pool)
            .await?
        {
            Some(row) => row,
            None => {
                sqlx::query(
                    "INSERT INTO secagg_rounds (task, phase, sets, phase_ms)
                     VALUES ($1, 'keys', $2, $3) ON CONFLICT DO NOTHING",
                )
                .bind(task)
                .bind(serde_json::to_string(&SecAggSets::default()).expect("sets serialise"))
                .bind(started_ms)
                .execute(&self.pool)
                .await?;
                sqlx::query(select).bind(task).fetch_one(&self.pool).await?
            }
        };
        let phase: String = row.try_get("phase")?;
        let sets: String = row.try_get("sets")?;
        Ok(SecAggRound {
            phase: SecAggPhase::parse(&phase)
                .ok_or_else(|| DbError::Corrupt(format!("secure aggregation phase {phase}")))?,
            sets: serde_json::from_str(&sets)
                .map_err(|e| DbError::Corrupt(format!("secure aggregation sets: {e}")))?,
            phase_ms: row.try_get("phase_ms")?,
        })
    }

    /// Move a round from phase `from` to `to` with `sets`; false when another caller moved it
    /// first (nothing changed).
    pub async fn secagg_move(
        &self,
        task: &str,
        from: SecAggPhase,
        to: SecAggPhase,
        sets: &SecAggSets,
    ) -> Result<bool, DbError> {
        let r = sqlx::query(
            "UPDATE secagg_rounds SET phase = $1, sets = $2, phase_ms = $3
             WHERE task = $4 AND phase = $5",
        )
        .bind(to.as_str())
        .bind(serde_json::to_string(sets).expect("sets serialise"))
        .bind(now_ms())
        .bind(task)
        .bind(from.as_str())
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    /// Store a station's message; a repeat of the same message is accepted, a different one
    /// of the same kind is not (false).
    pub async fn secagg_put(
        &self,
        task: &str,
        station: &str,
        kind: &str,
        body: &str,
    ) -> Result<bool, DbError> {
        sqlx::query(
            "INSERT INTO secagg_messages (task, station, kind, body, created_ms)
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
        )
        .bind(task)
        .bind(station)
        .bind(kind)
        .bind(body)
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        let stored: String = sqlx::query_scalar(
            "SELECT body FROM secagg_messages WHERE task = $1 AND station = $2 AND kind = $3",
        )
        .bind(task)
        .bind(station)
        .bind(kind)
        .fetch_one(&self.pool)
        .await?;
        Ok(stored == body)
    }

    /// Every message of a round's task.
    pub async fn secagg_messages(&self, task: &str) -> Result<Vec<SecAggStored>, DbError> {
        let rows = sqlx::query(
            "SELECT station, kind, body FROM secagg_messages WHERE task = $1 ORDER BY station, kind",
        )
        .bind(task)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(SecAggStored {
                    station: r.try_get("station")?,
                    kind: r.try_get("kind")?,
                    body: r.try_get("body")?,
                })
            })
            .collect()
    }

    // ---- station audit copies -----------------------------------------------------------

    /// The next sequence number and the hash of the last stored entry of a station's log.
    pub async fn station_audit_tip(&self, station: &str) -> Result<(i64, Option<String>), DbError> {
        let row = sqlx::query(
            "SELECT seq, hash FROM station_audit WHERE station = $1 ORDER BY seq DESC LIMIT 1",
        )
        .bind(station)
        .fetch_optional(&self.pool)
        .await?;
        match row {
            Some(r) => Ok((r.try_get::<i64, _>("seq")? + 1, Some(r.try_get("hash")?))),
            None => Ok((0, None)),
        }
    }

    /// Append verified lines (seq, line, hash) and the head; false if another upload won the
    /// race (the caller retries from the new tip). `rekeyed`: the lines hand the station's key
    /// over from `from` (its current key) to `to`, which becomes its key in the same
    /// transaction; `Err(KeyTaken)` when `to` is another station's or was ever retired.
    pub async fn append_station_audit(
        &self,
        station: &str,
        signer_key_id: &str,
        lines: &[(i64, String, String)],
        head: Option<&str>,
        rekeyed: Option<&Rekey>,
    ) -> Result<bool, DbError> {
        let mut tx = self.pool.begin().await?;
        // The lines were checked with the key the station had when the request was
        // authenticated: still its key? A write first, so that it also takes the write lock
        // (SQLite) or the row lock (PostgreSQL) for the rest of the transaction: an upload
        // racing a key hand-over either sees the new key here or waits for it.
        let current =
            sqlx::query("UPDATE stations SET key_id = $1 WHERE name = $2 AND key_id = $1")
                .bind(signer_key_id)
                .bind(station)
                .execute(&mut *tx)
                .await?;
        if current.rows_affected() != 1 {
            return Ok(false);
        }
        if let Some(k) = rekeyed {
            // Every key the upload hands over to (the last and any in between) must be new,
            // and appear once.
            let handed: Vec<&String> = k
                .retired
                .iter()
                .skip(1)
                .map(|(id, _)| id)
                .chain([&k.to_id])
                .collect();
            let mut seen = std::collections::BTreeSet::new();
            for id in &handed {
                if !seen.insert(*id) || **id == k.from_id {
                    return Err(DbError::KeyTaken((*id).clone()));
                }
            }
            for id in handed {
                let retired: Option<String> =
                    sqlx::query_scalar("SELECT key_id FROM retired_station_keys WHERE key_id = $1")
                        .bind(id)
                        .fetch_optional(&mut *tx)
                        .await?;
                let taken: Option<String> =
                    sqlx::query_scalar("SELECT name FROM stations WHERE key_id = $1")
                        .bind(id)
                        .fetch_optional(&mut *tx)
                        .await?;
                if retired.is_some() || taken.is_some() {
                    return Err(DbError::KeyTaken(id.clone()));
                }
            }
            let moved = sqlx::query(
                "UPDATE stations SET key_id = $1, public_key = $2 WHERE name = $3 AND key_id = $4",
            )
            .bind(&k.to_id)
            .bind(&k.to_pem)
            .bind(station)
            .bind(&k.from_id)
            .execute(&mut *tx)
            .await?;
            if moved.rows_affected() != 1 {
                // Another upload rotated it first.
                return Ok(false);
            }
            for (id, pem) in &k.retired {
                sqlx::query(
                    "INSERT INTO retired_station_keys (key_id, station, public_key, retired_ms)
                     VALUES ($1, $2, $3, $4)",
                )
                .bind(id)
                .bind(station)
                .bind(pem)
                .bind(now_ms())
                .execute(&mut *tx)
                .await?;
            }
        }
        for (seq, line, hash) in lines {
            let r = sqlx::query(
                "INSERT INTO station_audit (station, seq, line, hash) VALUES ($1, $2, $3, $4)
                 ON CONFLICT DO NOTHING",
            )
            .bind(station)
            .bind(*seq)
            .bind(line)
            .bind(hash)
            .execute(&mut *tx)
            .await?;
            if r.rows_affected() != 1 {
                return Ok(false);
            }
        }
        if let Some(head) = head {
            sqlx::query(
                "INSERT INTO station_heads (station, head) VALUES ($1, $2)
                 ON CONFLICT (station) DO UPDATE SET head = excluded.head",
            )
            .bind(station)
            .bind(head)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(true)
    }

    /// At most `limit` lines of a station's audit copy after sequence number `after` (-1: from
    /// the first), with their sequence numbers, and the station's signed head.
    pub async fn station_audit(
        &self,
        station: &str,
        after: i64,
        limit: usize,
    ) -> Result<(Vec<(i64, String)>, Option<String>), DbError> {
        let rows = sqlx::query(
            "SELECT seq, line FROM station_audit WHERE station = $1 AND seq > $2
             ORDER BY seq LIMIT $3",
        )
        .bind(station)
        .bind(after)
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(&self.pool)
        .await?;
        let lines = rows
            .iter()
            .map(|r| Ok((r.try_get("seq")?, r.try_get("line")?)))
            .collect::<Result<Vec<_>, DbError>>()?;
        let head: Option<String> =
            sqlx::query_scalar("SELECT head FROM station_heads WHERE station = $1")
                .bind(station)
                .fetch_optional(&self.pool)
                .await?;
        Ok((lines, head))
    }

    /// Whether the database answers (readiness).
    pub async fn ping(&self) -> Result<(), DbError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    // ---- the registry's own trail -------------------------------------------------------

    /// Append to the registry's hash-chained trail. Concurrent appends race on the primary
    /// key; the loser retries on the new tip.
    pub async fn audit(
        &self,
        actor: &str,
        action: &str,
        target: &str,
        outcome: &str,
    ) -> Result<i64, DbError> {
        for _ in 0..50 {
            let tip = sqlx::query("SELECT seq, hash FROM registry_audit ORDER BY seq DESC LIMIT 1")
                .fetch_optional(&self.pool)
                .await?;
            let (seq, prev) = match tip {
                Some(r) => (
                    r.try_get::<i64, _>("seq")? + 1,
                    r.try_get::<String, _>("hash")?,
                ),
                None => (0, "0".repeat(64)),
            };
            let entry = RegistryAuditEntry {
                seq,
                time_ms: now_ms(),
                actor: actor.to_string(),
                action: action.to_string(),
                target: target.to_string(),
                outcome: outcome.to_string(),
                prev,
                hash: String::new(),
            };
            let hash = audit_hash(&entry);
            let r = sqlx::query(
                "INSERT INTO registry_audit (seq, time_ms, actor, action, target, outcome, prev, hash)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT DO NOTHING",
            )
            .bind(seq)
            .bind(entry.time_ms)
            .bind(&entry.actor)
            .bind(&entry.action)
            .bind(&entry.target)
            .bind(&entry.outcome)
            .bind(&entry.prev)
            .bind(&hash)
            .execute(&self.pool)
            .await?;
            if r.rows_affected() == 1 {
                return Ok(seq);
            }
            tokio::time::sleep(Duration::from_millis(1 + (seq as u64 % 7))).await;
        }
        Err(DbError::Busy(
            "registry audit trail: too much contention".into(),
        ))
    }

    // ---- idempotency ----------------------------------------------------------------------

    /// Start a creating request sent with an Idempotency-Key. A placeholder older than
    /// `abandoned_ms` (its request died with a registry) is taken over.
    pub async fn idempotency_begin(
        &self,
        actor: &str,
        key: &str,
        action: &str,
        request_sha256: &str,
        abandoned_ms: i64,
    ) -> Result<Idempotent, DbError> {
        let now = now_ms();
        let r = sqlx::query(
            "INSERT INTO idempotency (actor, key, action, request_sha256, status, created_ms)
             VALUES ($1, $2, $3, $4, 0, $5) ON CONFLICT DO NOTHING",
        )
        .bind(actor)
        .bind(key)
        .bind(action)
        .bind(request_sha256)
        .bind(now)
        .execute(&self.pool)
        .await?;
        if r.rows_affected() == 1 {
            return Ok(Idempotent::Fresh);
        }
        let Some(row) = sqlx::query(
            "SELECT action, request_sha256, status, response, created_ms FROM idempotency
             WHERE actor = $1 AND key = $2",
        )
        .bind(actor)
        .bind(key)
        .fetch_optional(&self.pool)
        .await?
        else {
            // Pruned in between: try once more.
            return Box::pin(self.idempotency_begin(
                actor,
                key,
                action,
                request_sha256,
                abandoned_ms,
            ))
            .await;
        };
        let (a, sha): (String, String) = (row.try_get("action")?, row.try_get("request_sha256")?);
        if a != action || sha != request_sha256 {
            return Ok(Idempotent::Mismatch);
        }
        let status: i64 = row.try_get("status")?;
        if status != 0 {
            return Ok(Idempotent::Replay {
                status: status as u16,
                response: row
                    .try_get::<Option<String>, _>("response")?
                    .unwrap_or_default(),
            });
        }
        let created: i64 = row.try_get("created_ms")?;
        if created < now - abandoned_ms {
            let took = sqlx::query(
                "UPDATE idempotency SET created_ms = $1 WHERE actor = $2 AND key = $3
                 AND status = 0 AND created_ms = $4",
            )
            .bind(now)
            .bind(actor)
            .bind(key)
            .bind(created)
            .execute(&self.pool)
            .await?;
            if took.rows_affected() == 1 {
                return Ok(Idempotent::Fresh);
            }
        }
        Ok(Idempotent::InProgress)
    }

    /// The first request's answer, for the retries.
    pub async fn idempotency_finish(
        &self,
        actor: &str,
        key: &str,
        status: u16,
        response: &str,
    ) -> Result<(), DbError> {
        sqlx::query(
            "UPDATE idempotency SET status = $1, response = $2 WHERE actor = $3 AND key = $4",
        )
        .bind(i64::from(status))
        .bind(response)
        .bind(actor)
        .bind(key)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The first request failed: a retry may try again.
    pub async fn idempotency_abort(&self, actor: &str, key: &str) -> Result<(), DbError> {
        sqlx::query("DELETE FROM idempotency WHERE actor = $1 AND key = $2 AND status = 0")
            .bind(actor)
            .bind(key)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn prune_idempotency(&self, older_than_ms: i64) -> Result<u64, DbError> {
        let r = sqlx::query("DELETE FROM idempotency WHERE created_ms < $1")
            .bind(older_than_ms)
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected())
    }

    pub async fn audit_entries(&self) -> Result<Vec<RegistryAuditEntry>, DbError> {
        self.audit_page(-1, i64::MAX as usize).await
    }

    /// At most `limit` trail entries after sequence number `after` (-1: from the first, 0),
    /// in order.
    pub async fn audit_page(
        &self,
        after: i64,
        limit: usize,
    ) -> Result<Vec<RegistryAuditEntry>, DbError> {
        let rows = sqlx::query(
            "SELECT seq, time_ms, actor, action, target, outcome, prev, hash FROM registry_audit
             WHERE seq > $1 ORDER BY seq LIMIT $2",
        )
        .bind(after)
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(RegistryAuditEntry {
                    seq: r.try_get("seq")?,
                    time_ms: r.try_get("time_ms")?,
                    actor: r.try_get("actor")?,
                    action: r.try_get("action")?,
                    target: r.try_get("target")?,
                    outcome: r.try_get("outcome")?,
                    prev: r.try_get("prev")?,
                    hash: r.try_get("hash")?,
                })
            })
            .collect()
    }
}

/// An entry's hash: SHA-256 over its fields, newline-separated (fields are single-line: the
/// server strips newlines from anything it records).
pub fn audit_hash(e: &RegistryAuditEntry) -> String {
    sha256_hex(
        format!(
            "amicus-registry-audit-v1\n{}\n{}\n{}\n{}\n{}\n{}\n{}",
            e.seq, e.time_ms, e.actor, e.action, e.target, e.outcome, e.prev
        )
        .as_bytes(),
    )
}

/// Check the registry trail's chain: the first broken entry, if any.
pub fn verify_registry_trail(entries: &[RegistryAuditEntry]) -> Result<(), String> {
    let mut prev = "0".repeat(64);
    for (i, e) in entries.iter().enumerate() {
        if e.seq != i as i64 {
            return Err(format!(
                "entry {i}: sequence number {} (entries missing)",
                e.seq
            ));
        }
        if e.prev != prev {
            return Err(format!("entry {i}: does not chain to the previous entry"));
        }
        if audit_hash(e) != e.hash {
            return Err(format!(
                "entry {i}: hash does not match its contents (edited)"
            ));
        }
        prev = e.hash.clone();
    }
    Ok(())
}

/// Counts for the metrics endpoint, read at each scrape.
#[derive(Debug, Clone, Default)]
pub struct Census {
    pub runs_by_state: Vec<(String, i64)>,
    pub jobs_by_state: Vec<(String, i64)>,
    pub stations: i64,
    pub stations_seen_5m: i64,
    pub rounds_ended: i64,
}

impl Db {
    /// What the metrics endpoint reports about the database's contents.
    pub async fn census(&self) -> Result<Census, DbError> {
        let by_state = |table: &'static str| {
            sqlx::AssertSqlSafe(format!(
                "SELECT state, COUNT(*) AS n FROM {table} GROUP BY state ORDER BY state"
            ))
        };
        let mut c = Census::default();
        for row in sqlx::query(by_state("runs")).fetch_all(&self.pool).await? {
            c.runs_by_state
                .push((row.try_get("state")?, row.try_get::<i64, _>("n")?));
        }
        for row in sqlx::query(by_state("jobs")).fetch_all(&self.pool).await? {
            c.jobs_by_state
                .push((row.try_get("state")?, row.try_get::<i64, _>("n")?));
        }
        let row = sqlx::query(
            "SELECT COUNT(*) AS n,
                    COALESCE(SUM(CASE WHEN last_seen_ms >= $1 THEN 1 ELSE 0 END), 0) AS seen
             FROM stations",
        )
        .bind(now_ms() - 300_000)
        .fetch_one(&self.pool)
        .await?;
        c.stations = row.try_get("n")?;
        c.stations_seen_5m = row.try_get("seen")?;
        c.rounds_ended = sqlx::query_scalar("SELECT COUNT(*) FROM checkpoints")
            .fetch_one(&self.pool)
            .await?;
        Ok(c)
    }
}
