//! One job, end to end, driven by the coordinator: plan, ingest, load, ALS,
//! scale, k-means|| initialisation, Lloyd rounds, finalize, write. The
//! coordinator pushes every step to the workers and merges their answers in
//! shard order.
//!
//! - [`driver`]: the loop that runs the phases and, when a step fails in a way a
//!   retry can mend (a worker lost, a store briefly away), recovers: drops the
//!   lost workers, takes in newly registered ones, places the shards again and
//!   resumes with a new [`Attempt`] from what is kept (ingested splits, the last
//!   ALS checkpoint, the centroids of the last Lloyd round).
//! - [`crew`]: the workers of a job and the calls to them.
//! - [`placement`]: where the shards go, within the workers' memory.
//! - [`phases`]: one module per phase.

mod crew;
mod driver;
mod phases;
pub mod placement;

use crate::CoordinatorError;
pub use crate::state::{JobContext, Resume};
use crew::Crew;
use shoal_store as store;
use std::sync::atomic::{AtomicBool, Ordering};
use tracing::{Instrument, info, info_span, warn};

impl JobContext {
    fn output_job(&self) -> crate::output::Job<'_> {
        crate::output::Job {
            id: &self.id,
            spec: &self.spec,
        }
    }
}

/// The coordinator's attempt at a job: 1, then one more after each recovery.
/// Every request to a worker carries it; a worker refuses requests of an
/// attempt older than one it has seen, so late answers of a superseded attempt
/// never mix with the current one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Attempt(pub u32);

impl std::fmt::Display for Attempt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// The phases of a job, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Phase {
    Plan,
    Ingest,
    Load,
    Als,
    Scale,
    Init,
    Lloyd,
    Finalize,
    Write,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Plan => "plan",
            Phase::Ingest => "ingest",
            Phase::Load => "load",
            Phase::Als => "als",
            Phase::Scale => "scale",
            Phase::Init => "init",
            Phase::Lloyd => "lloyd",
            Phase::Finalize => "finalize",
            Phase::Write => "write",
        }
    }
}

/// A unit of work that is tried (and retried) as one: a phase, and within ALS
/// the iteration, within Lloyd the round of one candidate k (or the choosing of
/// k, after the rounds).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Step {
    pub phase: Phase,
    pub index: Option<u32>,
    /// Lloyd: the k the round fits ([`CHOOSING`]: the choosing of k).
    pub k: Option<u32>,
}

/// [`Step::k`] of the choosing of k.
const CHOOSING: u32 = u32::MAX;

impl Step {
    pub fn of(phase: Phase) -> Step {
        Step {
            phase,
            index: None,
            k: None,
        }
    }

    pub fn at(phase: Phase, index: u32) -> Step {
        Step {
            phase,
            index: Some(index),
            k: None,
        }
    }

    /// Lloyd round `round` of the starts of `k`.
    pub fn round_of(k: usize, round: u32) -> Step {
        Step {
            phase: Phase::Lloyd,
            index: Some(round),
            k: Some(k as u32),
        }
    }

    /// Measuring the candidates of k and choosing one.
    pub fn choosing() -> Step {
        Step {
            phase: Phase::Lloyd,
            index: None,
            k: Some(CHOOSING),
        }
    }
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.phase, self.index) {
            (Phase::Als, Some(i)) => write!(f, "als iteration {}", i + 1),
            (Phase::Lloyd, None) if self.k == Some(CHOOSING) => f.write_str("choosing k"),
            (Phase::Lloyd, Some(i)) => match self.k {
                Some(k) => write!(f, "lloyd round {} (k = {k})", i + 1),
                None => write!(f, "lloyd round {}", i + 1),
            },
            (p, Some(i)) => write!(f, "{} {}", p.as_str(), i + 1),
            (p, None) => f.write_str(p.as_str()),
        }
    }
}

/// Runs the job; on cancellation the in-flight step is abandoned (unless the
/// outputs are already being written: then the write finishes, so the output is
/// never left half-committed), the job is released on every worker, which stops
/// its work there, and its staging is removed.
pub async fn run(ctx: JobContext) -> Result<(), CoordinatorError> {
    let span = info_span!(
        "job",
        job = %ctx.id,
        job_name = %ctx.spec.name,
        phase = tracing::field::Empty,
        attempt = tracing::field::Empty
    );
    let crew = std::sync::Mutex::new(Crew::default());
    let committing = AtomicBool::new(false);
    let mut work = Box::pin(driver::drive(&ctx, &crew, &committing).instrument(span.clone()));
    let finished = tokio::select! {
        r = &mut work => Some(r),
        _ = ctx.cancel.cancelled() => None,
    };
    let result = match finished {
        Some(r) => r,
        None if committing.load(Ordering::SeqCst) => {
            info!(
                parent: &span,
                "cancel arrived while the outputs were being written; finishing the write"
            );
            work.await
        }
        None => {
            // Dropping the driver aborts its in-flight calls to the workers.
            drop(work);
            if ctx.shutdown.is_cancelled() && ctx.state.config.journal.is_some() {
                info!(parent: &span, "the coordinator stops; the job resumes when it starts again");
                Err(CoordinatorError::Suspended)
            } else {
                info!(parent: &span, "job cancelled; releasing it on its workers");
                Err(CoordinatorError::Cancelled)
            }
        }
    };
    // Workers forget the job and stop its work (all at once, each bounded); then
    // staging is removed, after the last write a worker could make into it.
    // Workers dropped or lost on the way are released in the background: the
    // job's end does not wait on them (should one wake, it gets the release then).
    let crew = std::mem::take(&mut *crew.lock().expect("crew lock"));
    crew.release_all(&ctx, &span).await;
    if matches!(result, Err(CoordinatorError::Suspended)) {
        // what the next coordinator resumes from
        return result;
    }
    if let Ok(staging) = store::resolve(&ctx.spec.staging_for(&ctx.id)) {
        if let Err(e) = staging.delete_all().await {
            warn!(parent: &span, error = %e, "could not remove the staging prefix");
        }
        staging.remove_empty_folders();
    }
    if ctx.spec.cluster.staging.is_none()
        && let Ok(base) = store::resolve(&ctx.spec.staging_base())
    {
        base.remove_empty_folders();
    }
    result
}
