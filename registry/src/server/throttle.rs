//! Abuse limits: request rates per client address and per identity (GCRA, `governor`), and the
//! trail's refusal budget.
//!
//! Every refusal is recorded, but not one row each without end: per caller and client address
//! the first [`ROWS_PER_MINUTE`] refusals of a minute are written as they happen (what an
//! auditor reads in the normal case, and what the tests check), the rest are counted per
//! (action, code) and written as one row per count when the minute is over. A row that cannot
//! be written now (the database is busy) is kept and written by the housekeeping tick, so a
//! flood can neither fill the disk nor make refusals disappear.
//!
//! Owns counting. Must not decide whether a request is allowed (that is `auth`) or write
//! anything but trail rows.

use super::*;
use governor::clock::{Clock, DefaultClock};
use governor::{Quota, RateLimiter};
use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Mutex;

/// Refusals per caller and address written one by one each minute.
pub const ROWS_PER_MINUTE: u32 = 30;
/// Distinct (caller, address) pairs counted at once; beyond, refusals are counted together.
const MAX_KEYS: usize = 20_000;
/// Trail rows kept for a retry when the database cannot take them.
const MAX_PENDING: usize = 10_000;

/// Request rates (requests per second, and the burst allowed above them).
#[derive(Debug, Clone, Copy)]
pub struct RateLimits {
    pub per_address: u32,
    pub address_burst: u32,
    pub per_identity: u32,
    pub identity_burst: u32,
}

impl Default for RateLimits {
    fn default() -> Self {
        // A hospital's stations may share one address behind its proxy; a station long-polls
        // and reports a few times per run, a person's CLI a few requests per command.
        RateLimits {
            per_address: 100,
            address_burst: 400,
            per_identity: 50,
            identity_burst: 200,
        }
    }
}

type Keyed<K> = RateLimiter<K, governor::state::keyed::DefaultKeyedStateStore<K>, DefaultClock>;

fn quota(rate: u32, burst: u32) -> Quota {
    let rate = NonZeroU32::new(rate.max(1)).unwrap_or(NonZeroU32::MIN);
    let burst = NonZeroU32::new(burst.max(1)).unwrap_or(NonZeroU32::MIN);
    Quota::per_second(rate).allow_burst(burst)
}

/// The two rate limiters.
pub struct Throttle {
    by_address: Keyed<IpAddr>,
    by_identity: Keyed<String>,
    clock: DefaultClock,
}

impl Throttle {
    pub fn new(l: RateLimits) -> Throttle {
        Throttle {
            by_address: RateLimiter::keyed(quota(l.per_address, l.address_burst)),
            by_identity: RateLimiter::keyed(quota(l.per_identity, l.identity_burst)),
            clock: DefaultClock::default(),
        }
    }

    /// `Err(seconds to wait)` when `addr` is over its rate.
    pub fn address(&self, addr: IpAddr) -> Result<(), u64> {
        self.by_address
            .check_key(&addr)
            .map_err(|t| t.wait_time_from(self.clock.now()).as_secs() + 1)
    }

    /// `Err(seconds to wait)` when the caller `who` is over its rate.
    pub fn identity(&self, who: &str) -> Result<(), u64> {
        self.by_identity
            .check_key(&who.to_string())
            .map_err(|t| t.wait_time_from(self.clock.now()).as_secs() + 1)
    }

    /// Forget callers that have been quiet (housekeeping).
    pub fn forget_quiet(&self) {
        self.by_address.retain_recent();
        self.by_identity.retain_recent();
        self.by_address.shrink_to_fit();
        self.by_identity.shrink_to_fit();
    }
}

/// A trail row.
#[derive(Debug, Clone)]
pub struct Row {
    pub actor: String,
    pub action: String,
    pub target: String,
    pub outcome: String,
}

#[derive(Default)]
struct Window {
    minute: i64,
    written: u32,
    /// (action, code) → (count, last target, last message)
    counted: HashMap<(String, String), (u64, String, String)>,
}

#[derive(Default)]
struct State {
    windows: HashMap<(String, String), Window>,
    pending: Vec<Row>,
    /// Connections closed at the cap, per address, this minute.
    connections: HashMap<IpAddr, (i64, u64)>,
}

/// The trail's refusal budget.
#[derive(Default)]
pub struct Refusals {
    state: Mutex<State>,
}

fn minute_of(ms: i64) -> i64 {
    ms.div_euclid(60_000)
}

fn minute_text(minute: i64) -> String {
    let secs = u64::try_from(minute.saturating_mul(60)).unwrap_or(0);
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_secs(secs)).to_string()
}

impl Refusals {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A refusal: the row to write now, or None when this caller and address are over the
    /// minute's budget (then it is counted).
    pub fn note(
        &self,
        actor: &str,
        source: &str,
        action: &str,
        code: &str,
        target: &str,
        outcome: String,
    ) -> Option<Row> {
        let minute = minute_of(now_ms());
        let mut st = self.lock();
        let mut key = (actor.to_string(), source.to_string());
        if !st.windows.contains_key(&key) && st.windows.len() >= MAX_KEYS {
            key = ("(many)".to_string(), "(many)".to_string());
        }
        let mut closed = None;
        let w = st.windows.entry(key.clone()).or_default();
        if w.minute != minute {
            closed = Some(std::mem::take(w));
            w.minute = minute;
        }
        let row = if w.written < ROWS_PER_MINUTE {
            w.written += 1;
            Some(Row {
                actor: actor.to_string(),
                action: action.to_string(),
                target: target.to_string(),
                outcome: format!("{outcome} [from {source}]"),
            })
        } else {
            let c = w
                .counted
                .entry((action.to_string(), code.to_string()))
                .or_insert((0, String::new(), String::new()));
            c.0 += 1;
            c.1 = target.to_string();
            c.2 = outcome;
            None
        };
        if let Some(old) = closed {
            let rows = summary_rows(&key, old);
            push_pending(&mut st, rows);
        }
        row
    }

    /// A row that could not be written now: the housekeeping tick writes it.
    pub fn requeue(&self, row: Row) {
        let mut st = self.lock();
        push_pending(&mut st, vec![row]);
    }

    /// A connection closed at the connection cap.
    pub fn connection_refused(&self, addr: IpAddr) {
        let minute = minute_of(now_ms());
        let mut st = self.lock();
        if !st.connections.contains_key(&addr) && st.connections.len() >= MAX_KEYS {
            return;
        }
        let mut closed = None;
        let e = st.connections.entry(addr).or_insert((minute, 0));
        if e.0 != minute {
            closed = Some((e.0, e.1));
            *e = (minute, 0);
        }
        e.1 += 1;
        if let Some((m, n)) = closed {
            let row = connection_row(addr, m, n);
            push_pending(&mut st, vec![row]);
        }
    }

    /// Write the counts of minutes that are over (`all`: every count, as at shutdown) and the
    /// rows kept for a retry. What the database does not take stays for the next call.
    pub async fn flush(&self, db: &Db, all: bool) {
        let minute = minute_of(now_ms());
        let rows = {
            let mut st = self.lock();
            let mut rows = std::mem::take(&mut st.pending);
            let over: Vec<(String, String)> = st
                .windows
                .iter()
                .filter(|(_, w)| all || w.minute < minute)
                .map(|(k, _)| k.clone())
                .collect();
            for k in over {
                if let Some(w) = st.windows.remove(&k) {
                    rows.extend(summary_rows(&k, w));
                }
            }
            let done: Vec<IpAddr> = st
                .connections
                .iter()
                .filter(|(_, (m, _))| all || *m < minute)
                .map(|(a, _)| *a)
                .collect();
            for a in done {
                if let Some((m, n)) = st.connections.remove(&a) {
                    rows.push(connection_row(a, m, n));
                }
            }
            rows
        };
        let mut failed = Vec::new();
        for row in rows {
            if !failed.is_empty() {
                failed.push(row);
                continue;
            }
            if let Err(e) = db
                .audit(&row.actor, &row.action, &row.target, &row.outcome)
                .await
            {
                eprintln!("registry: the trail cannot take refusal counts now: {e}");
                failed.push(row);
            }
        }
        if !failed.is_empty() {
            let mut st = self.lock();
            push_pending(&mut st, failed);
        }
    }
}

fn connection_row(addr: IpAddr, minute: i64, n: u64) -> Row {
    Row {
        actor: "anonymous".into(),
        action: "connect".into(),
        target: String::new(),
        outcome: format!(
            "refused {n} connection(s) at the connection cap [from {addr}] in the minute from {}",
            minute_text(minute)
        ),
    }
}

fn summary_rows(key: &(String, String), w: Window) -> Vec<Row> {
    w.counted
        .into_iter()
        .map(|((action, code), (n, target, last))| Row {
            actor: key.0.clone(),
            action,
            target,
            outcome: format!(
                "refused {n} more time(s) {code} [from {}] in the minute from {} (over {ROWS_PER_MINUTE} refusals a minute are counted, not listed); last: {last}",
                key.1,
                minute_text(w.minute)
            ),
        })
        .collect()
}

fn push_pending(st: &mut State, rows: Vec<Row>) {
    for row in rows {
        if st.pending.len() < MAX_PENDING {
            st.pending.push(row);
        } else {
            // Keep the last slot as a count of what could not be kept.
            let lost = Row {
                actor: "registry".into(),
                action: "trail".into(),
                target: String::new(),
                outcome:
                    "refusal rows were dropped: the database did not take them for a long time"
                        .into(),
            };
            if let Some(last) = st.pending.last_mut() {
                *last = lost;
            }
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_costs_a_bounded_number_of_rows() {
        let r = Refusals::default();
        let mut written = 0;
        for i in 0..10_000 {
            if r.note(
                "anonymous",
                "10.0.0.1",
                "task-read",
                "unauthenticated",
                &format!("/v1/tasks/{i}"),
                "refused 401 unauthenticated: no credentials".into(),
            )
            .is_some()
            {
                written += 1;
            }
        }
        assert_eq!(written, ROWS_PER_MINUTE);
        // Another address has its own budget.
        assert!(
            r.note("anonymous", "10.0.0.2", "a", "c", "/", "x".into())
                .is_some()
        );
        let st = r.lock();
        let w = &st.windows[&("anonymous".to_string(), "10.0.0.1".to_string())];
        let (n, target, _) = &w.counted[&("task-read".to_string(), "unauthenticated".to_string())];
        assert_eq!(*n, 10_000 - u64::from(ROWS_PER_MINUTE));
        assert_eq!(target, "/v1/tasks/9999");
    }

    #[test]
    fn counts_are_rows_when_the_minute_is_over() {
        let r = Refusals::default();
        for _ in 0..(ROWS_PER_MINUTE + 5) {
            r.note("user:x", "::1", "a", "forbidden", "/t", "refused".into());
        }
        let mut st = r.lock();
        let w = st.windows.remove(&("user:x".into(), "::1".into())).unwrap();
        let rows = summary_rows(&("user:x".into(), "::1".into()), w);
        assert_eq!(rows.len(), 1);
        assert!(
            rows[0]
                .outcome
                .starts_with("refused 5 more time(s) forbidden")
        );
    }

    #[test]
    fn rate_limits_refuse_over_the_burst_and_say_when_to_come_back() {
        let t = Throttle::new(RateLimits {
            per_address: 1,
            address_burst: 3,
            per_identity: 1,
            identity_burst: 1,
        });
        let a: IpAddr = "127.0.0.1".parse().unwrap();
        for _ in 0..3 {
            assert!(t.address(a).is_ok());
        }
        let wait = t.address(a).unwrap_err();
        assert!((1..=2).contains(&wait), "{wait}");
        assert!(t.address("127.0.0.2".parse().unwrap()).is_ok());
        assert!(t.identity("user:a").is_ok());
        assert!(t.identity("user:a").is_err());
        assert!(t.identity("user:b").is_ok());
    }
}
