//! The coordinator's Prometheus metrics and its readiness, served over HTTP by
//! [`shoal_net::http`].

use std::sync::Arc;

use futures::future::BoxFuture;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use shoal_net::http::Probe;
use shoal_proto::pb::JobState;

use crate::output::PhaseTimes;
use crate::state::StateHandle;

type Labels = Vec<(&'static str, String)>;

/// Figures the job drivers count; gauges of the registry are refreshed per scrape.
#[derive(Debug)]
pub struct Metrics {
    jobs: Family<Labels, Gauge>,
    workers: Gauge,
    rows_read: Counter,
    bytes_read: Counter,
    recoveries: Counter,
    phase_seconds: Family<Labels, Histogram, fn() -> Histogram>,
}

fn phase_histogram() -> Histogram {
    // 10 ms .. ~3 h
    Histogram::new(exponential_buckets(0.01, 4.0, 11))
}

impl Metrics {
    pub fn new() -> Arc<Metrics> {
        Arc::new(Metrics {
            jobs: Family::default(),
            workers: Gauge::default(),
            rows_read: Counter::default(),
            bytes_read: Counter::default(),
            recoveries: Counter::default(),
            phase_seconds: Family::new_with_constructor(phase_histogram),
        })
    }

    /// A registry that exposes these metrics (they are shared, not copied).
    pub fn registry(&self) -> Registry {
        let m = self;
        let mut r = Registry::with_prefix("shoal");
        r.register(
            "jobs",
            "Jobs this coordinator knows, by state",
            m.jobs.clone(),
        );
        r.register("workers", "Workers registered and alive", m.workers.clone());
        r.register(
            "rows_read",
            "Interaction rows read by finished ingest phases",
            m.rows_read.clone(),
        );
        r.register(
            "bytes_read",
            "Input bytes read by finished ingest phases",
            m.bytes_read.clone(),
        );
        r.register(
            "recoveries",
            "Times a job recovered from a lost worker or a step a retry mends",
            m.recoveries.clone(),
        );
        r.register(
            "phase_seconds",
            "Wall time of each phase of finished jobs",
            m.phase_seconds.clone(),
        );
        r
    }

    /// An ingest phase read `rows` rows and `bytes` bytes.
    pub fn ingested(&self, rows: u64, bytes: u64) {
        self.rows_read.inc_by(rows);
        self.bytes_read.inc_by(bytes);
    }

    /// A job recovered and goes on with its next attempt.
    pub fn recovered(&self) {
        self.recoveries.inc();
    }

    /// The phases of a job that got to its outputs.
    pub fn phases(&self, times: &PhaseTimes) {
        for (phase, secs) in &times.0 {
            self.phase_seconds
                .get_or_create(&vec![("phase", phase.clone())])
                .observe(*secs);
        }
    }
}

/// Readiness and on-demand gauges of a coordinator.
pub struct CoordinatorProbe {
    pub state: StateHandle,
    pub metrics: Arc<Metrics>,
}

const STATES: [(JobState, &str); 5] = [
    (JobState::Queued, "queued"),
    (JobState::Running, "running"),
    (JobState::Succeeded, "succeeded"),
    (JobState::Failed, "failed"),
    (JobState::Cancelled, "cancelled"),
];

impl Probe for CoordinatorProbe {
    fn ready(&self) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move {
            let workers = self
                .state
                .workers()
                .await
                .map_err(|e| format!("the state loop does not answer: {e}"))?;
            if workers.is_empty() {
                return Err("no worker has registered".into());
            }
            Ok(())
        })
    }

    fn refresh(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            if let Ok(workers) = self.state.workers().await {
                self.metrics.workers.set(workers.len() as i64);
            }
            if let Ok(jobs) = self.state.list().await {
                for (state, name) in STATES {
                    let n = jobs.iter().filter(|j| j.state == state as i32).count();
                    self.metrics
                        .jobs
                        .get_or_create(&vec![("state", name.to_string())])
                        .set(n as i64);
                }
            }
        })
    }
}
