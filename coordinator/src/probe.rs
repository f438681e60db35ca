//! The coordinator's readiness (a worker has registered) and the gauges its
//! `/metrics` refreshes on each scrape (workers, jobs by state).

use crate::metrics::Metrics;
use crate::state::StateHandle;
use futures::future::BoxFuture;
use shoal_net::http::Probe;
use shoal_proto::pb::JobState;
use std::sync::Arc;

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
                self.metrics.set_workers(workers.len());
            }
            if let Ok(jobs) = self.state.list().await {
                for (state, name) in STATES {
                    let n = jobs.iter().filter(|j| j.state == state as i32).count();
                    self.metrics.set_jobs(name, n);
                }
            }
        })
    }
}
