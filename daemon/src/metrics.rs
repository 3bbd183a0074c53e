//! The station daemon's Prometheus metrics, written as an OpenMetrics text file
//! (`<station>/registry/metrics.prom`, or `station serve --metrics-file`) after every pass:
//! the station listens on no socket, so a collector reads the file (e.g. node_exporter's
//! textfile collector, or any exporter that serves files). Runs by outcome and their
//! duration, the journal's queue by stage, the last successful poll, passes that failed to
//! reach the registry, the audit log's size.
//!
//! Must not label anything with run ids, train names or anything a registry or train sends:
//! the label values are fixed words.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::path::Path;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StageLabels {
    stage: &'static str,
}

/// The journal's stages, as the `stage` label says them.
pub const STAGES: [&str; 5] = [
    "received",
    "held",
    "started",
    "awaiting-release",
    "finished",
];

pub struct Metrics {
    registry: Registry,
    runs: Family<OutcomeLabels, Counter>,
    duration: Histogram,
    queue: Family<StageLabels, Gauge>,
    last_poll: Gauge<f64, AtomicU64>,
    poll_failures: Counter,
    audit_bytes: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("amicus_station");
        let runs = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "runs",
            "Runs this daemon reported since it started, by outcome (done, refused, failed)",
            runs.clone(),
        );
        // 0.1 s to ~3.6 h.
        let duration = Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
            0.1, 2.0, 18,
        ));
        registry.register(
            "run_duration_seconds",
            "Time each run took at this station, verification to release",
            duration.clone(),
        );
        let queue = Family::<StageLabels, Gauge>::default();
        registry.register(
            "queue",
            "Runs in the daemon's journal, by stage",
            queue.clone(),
        );
        let last_poll = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "last_successful_poll_timestamp_seconds",
            "When the registry last answered this station's poll (Unix time)",
            last_poll.clone(),
        );
        let poll_failures = Counter::default();
        registry.register(
            "registry_unreachable_passes",
            "Passes in which the registry could not be reached or answered what the station cannot use",
            poll_failures.clone(),
        );
        let audit_bytes = Gauge::default();
        registry.register(
            "audit_log_bytes",
            "Size of the station's audit log",
            audit_bytes.clone(),
        );
        Metrics {
            registry,
            runs,
            duration,
            queue,
            last_poll,
            poll_failures,
            audit_bytes,
        }
    }
}

impl Metrics {
    pub fn reported(&self, outcome: &'static str) {
        self.runs.get_or_create(&OutcomeLabels { outcome }).inc();
    }

    pub fn ran(&self, took: Duration) {
        self.duration.observe(took.as_secs_f64());
    }

    pub fn polled(&self) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        self.last_poll.set(now);
    }

    pub fn unreachable(&self) {
        self.poll_failures.inc();
    }

    /// Set the journal's queue (one count per stage in [`STAGES`]) and the audit log's size,
    /// and write the file atomically (a new file renamed over the old one).
    pub fn write(&self, path: &Path, queue: [i64; 5], audit_bytes: u64) -> std::io::Result<()> {
        for (stage, n) in STAGES.iter().zip(queue) {
            self.queue.get_or_create(&StageLabels { stage }).set(n);
        }
        self.audit_bytes
            .set(i64::try_from(audit_bytes).unwrap_or(i64::MAX));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .map_err(std::io::Error::other)?;
        let tmp = path.with_extension("prom.tmp");
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, path)
    }
}
