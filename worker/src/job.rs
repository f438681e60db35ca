//! What a worker holds for a job: its user shards (ids, RFM, the features.extra
//! rows, the resident points and the k-means state), the ALS state, and the
//! record of the job's running tasks that a release cancels and waits for.

use crate::WorkerError;
use crate::ids::IdTable;
use crate::ingest::IngestControl;
use crate::steps::als_job::AlsJob;
use crate::steps::load::Rfm;
use arrow::array::StringArray;
use shoal_kernels::{Backend, Nearest, Resident};
use shoal_proto::pb;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// One user shard held by this worker.
pub struct Shard {
    pub ids: IdTable,
    pub rfm: Rfm,
    /// `features.extra`: the table's features of every user, row-major (NaN
    /// where missing; empty without a table).
    pub extra: Vec<f32>,
    /// Rows of the table whose user has no interactions here.
    pub orphans: Vec<(String, Vec<f32>)>,
    /// The scaled features, resident in the backend (after Standardize).
    pub points: Option<Resident>,
    /// Σ‖x‖² over the points, in row order (the inertia of a Lloyd round
    /// follows from it and the round's sums).
    pub sum_sq: f64,
    /// The Lloyd rounds' state per fit (of the group of the last round):
    /// distance bounds carried between rounds, and the last labels.
    pub fits: FitStates,
    /// k-means|| cost of every point: squared distance to the nearest chosen center
    pub costs: Vec<f32>,
    pub nearest: Vec<Nearest>,
}

impl Shard {
    pub fn new(ids: IdTable, rfm: Rfm) -> Shard {
        Shard {
            ids,
            rfm,
            extra: Vec::new(),
            orphans: Vec::new(),
            points: None,
            sum_sq: 0.0,
            fits: FitStates::default(),
            costs: Vec::new(),
            nearest: Vec::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    pub fn points(&self, job: &str, shard: u32) -> Result<&Resident, WorkerError> {
        resident(&self.points, job, shard)
    }
}

/// The Lloyd state of a shard's fits, for one group of fits at a time.
#[derive(Default)]
pub struct FitStates {
    pub group: Option<u32>,
    pub fits: std::collections::BTreeMap<u32, FitState>,
}

/// One fit's Lloyd state on a shard.
pub struct FitState {
    pub bounds: Resident,
    pub labels: Vec<u32>,
}

impl FitStates {
    /// The state of fit `id` of `group` (a new group drops the others' state).
    pub fn of(
        &mut self,
        group: u32,
        id: u32,
        make: impl FnOnce() -> Result<Resident, WorkerError>,
    ) -> Result<&mut FitState, WorkerError> {
        if self.group != Some(group) {
            self.fits.clear();
            self.group = Some(group);
        }
        match self.fits.entry(id) {
            std::collections::btree_map::Entry::Occupied(e) => Ok(e.into_mut()),
            std::collections::btree_map::Entry::Vacant(e) => Ok(e.insert(FitState {
                bounds: make()?,
                labels: Vec::new(),
            })),
        }
    }
}

/// A shard's resident points (borrowed alone, so the shard's other fields stay
/// free), or the error that it is not standardised yet.
pub fn resident<'a>(
    points: &'a Option<Resident>,
    job: &str,
    shard: u32,
) -> Result<&'a Resident, WorkerError> {
    points.as_ref().ok_or_else(|| {
        WorkerError::InvalidRequest(format!("job {job} shard {shard} is not standardised yet"))
    })
}

/// An item shard's ids and labels, for the segments' top items.
pub struct ItemNames {
    pub ids: StringArray,
    pub labels: StringArray,
}

pub struct JobState {
    /// The attempt whose load made this state: steps of another attempt are
    /// refused.
    pub attempt: u32,
    /// The job's spec, as the load received it.
    pub spec: Arc<shoal_spec::JobSpec>,
    pub shards: BTreeMap<u32, Shard>,
    /// The item shards this worker owns (ALS): their ids and labels.
    pub item_names: BTreeMap<u32, ItemNames>,
    /// Features per user: the RFM block, with ALS the factors in front of it.
    pub dims: usize,
    /// ALS, when the spec asks for it.
    pub als: Option<AlsJob>,
    /// `features.als_weight` of the spec.
    pub als_weight: f64,
    /// `features.extra`: the table's columns (empty without one), its weight,
    /// and (once standardised) the mean and scale of its features.
    pub extra_columns: Vec<pb::ExtraColumn>,
    pub extra_weight: f64,
    pub extra_scaling: (Vec<f64>, Vec<f64>),
    /// A fold-in (`[model]`): the users of the extra table without interactions
    /// are assigned from its features alone.
    pub fold_in: bool,
    /// The backend this job runs on (its spec's `cluster.device`).
    pub backend: Arc<dyn Backend>,
    /// Fired by ReleaseJob; long steps check it between shards.
    pub cancel: CancellationToken,
}

pub type JobHandle = Arc<tokio::sync::Mutex<JobState>>;

impl JobState {
    pub fn check_dims(&self, d: usize, what: &str) -> Result<(), WorkerError> {
        if d != self.dims {
            return Err(WorkerError::InvalidRequest(format!(
                "{what}: {d} dimensions, this job's features have {}",
                self.dims
            )));
        }
        Ok(())
    }

    pub fn als(&self, job: &str) -> Result<&AlsJob, WorkerError> {
        self.als.as_ref().ok_or_else(|| {
            WorkerError::InvalidRequest(format!(
                "job {job} does not run ALS (features.als = false)"
            ))
        })
    }

    pub fn als_mut(&mut self, job: &str) -> Result<&mut AlsJob, WorkerError> {
        self.als.as_mut().ok_or_else(|| {
            WorkerError::InvalidRequest(format!(
                "job {job} does not run ALS (features.als = false)"
            ))
        })
    }
}

/// Fails with [`WorkerError::Cancelled`] once `cancel` has fired.
pub fn stop_if_cancelled(cancel: &CancellationToken, job: &str) -> Result<(), WorkerError> {
    if cancel.is_cancelled() {
        return Err(WorkerError::Cancelled {
            job: job.to_string(),
        });
    }
    Ok(())
}

/// The worker's record of one job's work: ReleaseJob fires the cancellation in
/// `control`, and every step of the job runs as a task of `tasks`, so the release
/// can wait until they have all stopped.
pub struct JobRun {
    /// The coordinator's attempt this record runs: a request of a later attempt
    /// supersedes it (its tasks are cancelled), one of an earlier is refused.
    pub attempt: u32,
    /// When the first request of the attempt arrived.
    pub created: std::time::Instant,
    pub control: IngestControl,
    pub tasks: TaskTracker,
}

impl JobRun {
    pub fn new(job: &str, attempt: u32) -> JobRun {
        JobRun {
            attempt,
            created: std::time::Instant::now(),
            control: IngestControl {
                job: job.to_string(),
                ..IngestControl::default()
            },
            tasks: TaskTracker::new(),
        }
    }

    /// Spawns `work` as a task of the job; it is dropped at its next await once
    /// the job is cancelled.
    pub fn spawn<T: Send + 'static>(
        &self,
        work: impl Future<Output = Result<T, WorkerError>> + Send + 'static,
    ) -> tokio::task::JoinHandle<Result<T, WorkerError>> {
        let cancel = self.control.cancel.clone();
        let job = self.control.job.clone();
        self.tasks.spawn(async move {
            tokio::select! {
                biased;
                _ = cancel.cancelled() => Err(WorkerError::Cancelled { job }),
                r = work => r,
            }
        })
    }

    /// Runs `f` on a blocking thread as a task of the job.
    pub async fn blocking<T: Send + 'static>(
        &self,
        what: &str,
        f: impl FnOnce() -> Result<T, WorkerError> + Send + 'static,
    ) -> Result<T, WorkerError> {
        self.tasks
            .spawn_blocking(f)
            .await
            .map_err(|e| WorkerError::InvalidRequest(format!("{what} panicked: {e}")))?
    }
}

/// Jobs with work on this worker, and the jobs released (most recent last).
#[derive(Default)]
pub struct Runs {
    pub live: HashMap<String, Arc<JobRun>>,
    pub released: HashMap<String, Arc<JobRun>>,
    pub order: VecDeque<String>,
    /// Rows and bytes read by the runs no longer kept (for the totals).
    pub forgotten: (u64, u64),
}

impl Runs {
    /// Rows and bytes every job has read on this worker since it started.
    pub fn read_totals(&self) -> (u64, u64) {
        let counts = |r: &Arc<JobRun>| {
            (
                r.control.rows_read.load(Ordering::Relaxed),
                r.control.bytes_read.load(Ordering::Relaxed),
            )
        };
        self.live
            .values()
            .chain(self.released.values())
            .map(counts)
            .fold(self.forgotten, |(r, b), (r2, b2)| (r + r2, b + b2))
    }
}

impl Runs {
    /// Counts what a record no longer kept had read into the totals.
    pub fn forget(&mut self, run: &JobRun) {
        self.forgotten.0 += run.control.rows_read.load(Ordering::Relaxed);
        self.forgotten.1 += run.control.bytes_read.load(Ordering::Relaxed);
    }

    /// The record of `job`'s work for a request of `attempt` (0: whichever
    /// attempt runs): the live one of that attempt, a new one when the request is
    /// of a later attempt (the earlier one's tasks are cancelled and `true` says
    /// the job's state must go), or an error for an earlier attempt or a
    /// released job.
    pub fn enter(&mut self, job: &str, attempt: u32) -> Result<(Arc<JobRun>, bool), WorkerError> {
        if self.released.contains_key(job) {
            return Err(WorkerError::Cancelled {
                job: job.to_string(),
            });
        }
        match self.live.get(job) {
            Some(run) if attempt == 0 || run.attempt == attempt => Ok((run.clone(), false)),
            Some(run) if attempt < run.attempt => Err(WorkerError::StaleAttempt {
                job: job.to_string(),
                attempt,
                current: run.attempt,
            }),
            old => {
                let superseded = old.cloned();
                if let Some(old) = &superseded {
                    old.control.cancel.cancel();
                    old.tasks.close();
                    self.forget(old);
                }
                let run = Arc::new(JobRun::new(job, attempt.max(1)));
                self.live.insert(job.to_string(), run.clone());
                Ok((run, superseded.is_some()))
            }
        }
    }
}

/// The answer of a task of the job.
pub async fn joined<T>(
    handle: tokio::task::JoinHandle<Result<T, WorkerError>>,
    what: &str,
) -> Result<T, WorkerError> {
    handle
        .await
        .map_err(|e| WorkerError::InvalidRequest(format!("{what} did not finish: {e}")))?
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A later attempt supersedes the live one (cancelling its work); an
    /// earlier one is refused; 0 joins whichever runs; a released job refuses all.
    #[test]
    fn attempts_supersede_and_stale_ones_are_refused() {
        let mut runs = Runs::default();
        let (first, superseded) = runs.enter("j", 1).unwrap();
        assert!(!superseded && first.attempt == 1);
        let (same, superseded) = runs.enter("j", 1).unwrap();
        assert!(!superseded && Arc::ptr_eq(&first, &same));
        let (second, superseded) = runs.enter("j", 2).unwrap();
        assert!(superseded && second.attempt == 2);
        assert!(first.control.cancel.is_cancelled());
        assert!(!second.control.cancel.is_cancelled());
        let stale = runs.enter("j", 1).err();
        assert!(matches!(
            stale,
            Some(WorkerError::StaleAttempt {
                attempt: 1,
                current: 2,
                ..
            })
        ));
        let (any, _) = runs.enter("j", 0).unwrap();
        assert!(Arc::ptr_eq(&any, &second));
        let released = runs.live.remove("j").unwrap();
        runs.released.insert("j".into(), released);
        assert!(matches!(
            runs.enter("j", 3),
            Err(WorkerError::Cancelled { .. })
        ));
    }
}
