//! The coordinator's Prometheus metrics, served over HTTP by [`shoal_net::http`]
//! (the readiness and per-scrape gauges: [`crate::probe`]).

use std::sync::Arc;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::output::PhaseTimes;

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

    /// Workers registered and alive (refreshed per scrape).
    pub fn set_workers(&self, n: usize) {
        self.workers.set(n as i64);
    }

    /// Jobs in `state` (refreshed per scrape).
    pub fn set_jobs(&self, state: &str, n: usize) {
        self.jobs
            .get_or_create(&vec![("state", state.to_string())])
            .set(n as i64);
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
