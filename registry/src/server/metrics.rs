//! The registry's Prometheus metrics: requests by action and status, their latency, refusals by
//! code (counted as requests are answered), and, read from the database at each scrape, runs
//! and jobs by state, stations registered and seen in the last 5 minutes, rounds ended. Served
//! as OpenMetrics text on a listener of its own (`serve --metrics-listen`), never on the API's
//! port: the counts say how busy the registry is, which is the operator's business.
//!
//! Must not label anything with what callers send (names, ids, paths): labels are the
//! handler's fixed action name, the status code and the error code, so the number of series
//! is bounded whatever the traffic.

use super::App;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::time::Duration;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    action: &'static str,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ActionLabels {
    action: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CodeLabels {
    code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: String,
}

/// The registry's metrics; one per process.
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    latency: Family<ActionLabels, Histogram>,
    refusals: Family<CodeLabels, Counter>,
    runs: Family<StateLabels, Gauge>,
    jobs: Family<StateLabels, Gauge>,
    stations: Gauge,
    stations_seen: Gauge,
    rounds: Gauge,
    scrape_errors: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("amicus_registry");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "Requests answered, by the handler's action and the HTTP status",
            requests.clone(),
        );
        let latency = Family::<ActionLabels, Histogram>::new_with_constructor(|| {
            // 1 ms to ~65 s: long polls included.
            Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
                0.001, 2.0, 17,
            ))
        });
        registry.register(
            "request_duration_seconds",
            "Time from a request's arrival at its handler to its answer, by action",
            latency.clone(),
        );
        let refusals = Family::<CodeLabels, Counter>::default();
        registry.register(
            "refusals",
            "Requests refused, by error code (rate_limited, unauthenticated, forbidden, ...)",
            refusals.clone(),
        );
        let runs = Family::<StateLabels, Gauge>::default();
        registry.register("runs", "Runs in the database, by state", runs.clone());
        let jobs = Family::<StateLabels, Gauge>::default();
        registry.register(
            "jobs",
            "Federated jobs in the database, by state",
            jobs.clone(),
        );
        let stations = Gauge::default();
        registry.register("stations", "Stations registered", stations.clone());
        let stations_seen = Gauge::default();
        registry.register(
            "stations_seen_5m",
            "Stations that made a signed request in the last 5 minutes",
            stations_seen.clone(),
        );
        let rounds = Gauge::default();
        registry.register(
            "rounds_ended",
            "Federated rounds that ended with a checkpoint",
            rounds.clone(),
        );
        let scrape_errors = Counter::default();
        registry.register(
            "scrape_database_errors",
            "Scrapes for which the database could not be read (its gauges keep their last values)",
            scrape_errors.clone(),
        );
        Metrics {
            registry,
            requests,
            latency,
            refusals,
            runs,
            jobs,
            stations,
            stations_seen,
            rounds,
            scrape_errors,
        }
    }
}

impl Metrics {
    /// One answered request.
    pub(super) fn answered(&self, action: &'static str, status: u16, took: Duration) {
        self.requests
            .get_or_create(&RequestLabels { action, status })
            .inc();
        self.latency
            .get_or_create(&ActionLabels { action })
            .observe(took.as_secs_f64());
    }

    /// One refused request.
    pub(super) fn refused(&self, code: &'static str) {
        self.refusals.get_or_create(&CodeLabels { code }).inc();
    }

    /// The OpenMetrics text, with the database's counts read now.
    pub async fn render(&self, app: &App) -> String {
        match tokio::time::timeout(Duration::from_secs(5), app.db.census()).await {
            Ok(Ok(c)) => {
                self.runs.clear();
                for (state, n) in c.runs_by_state {
                    self.runs.get_or_create(&StateLabels { state }).set(n);
                }
                self.jobs.clear();
                for (state, n) in c.jobs_by_state {
                    self.jobs.get_or_create(&StateLabels { state }).set(n);
                }
                self.stations.set(c.stations);
                self.stations_seen.set(c.stations_seen_5m);
                self.rounds.set(c.rounds_ended);
            }
            _ => {
                self.scrape_errors.inc();
            }
        }
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Serve `GET /metrics` on `listener` until `shutdown` resolves.
pub async fn serve_metrics(
    listener: tokio::net::TcpListener,
    app: App,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use axum::http::header;
    use axum::response::IntoResponse;
    let router = axum::Router::new()
        .route(
            "/metrics",
            axum::routing::get(
                |axum::extract::State(app): axum::extract::State<App>| async move {
                    let text = app.metrics.render(&app).await;
                    (
                        [(
                            header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        text,
                    )
                        .into_response()
                },
            ),
        )
        .with_state(app);
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
}
