//! The gRPC `WorkerService`: every step of a job, as the coordinator pushes it.
//! The worker keeps per-job state (its shards' users, RFM and resident points) and
//! nothing else; the coordinator decides what runs next.

use crate::als::{self, Side};
use crate::als_job::{self, AlsJob, OwnedShard};
use crate::flight::{Peers, Shelf};
use crate::ingest::IngestControl;
use crate::load::{self, DIMS, ShardRfm};
use crate::{WorkerError, extra, ingest, staging};
use arrow::array::{ArrayRef, Float32Array, Float64Array, StringArray, UInt32Array, UInt64Array};
use arrow::datatypes::{DataType, Field, Schema};
use arrow::record_batch::RecordBatch;
use futures::StreamExt;
use shoal_kernels::{Backend, CpuBackend, NO_SECOND, Nearest, Resident};
use shoal_proto::auth::WithToken;
use shoal_proto::pb::worker_service_server::WorkerService;
use shoal_proto::pb::{self, PointRef};
use shoal_proto::sketch::Sketch;
use shoal_proto::spec::Device;
use shoal_proto::{JobSpec, hash, store};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::{Request, Response, Status};
use tracing::{Instrument, debug, info, info_span, warn};

/// How long ReleaseJob waits for the job's running tasks to stop.
const RELEASE_WAIT: Duration = Duration::from_secs(10);
/// Released jobs remembered, so that late requests for them are refused.
const RELEASED_KEPT: usize = 1024;

/// One user shard held by this worker.
struct Shard {
    rfm: ShardRfm,
    /// log-scaled features, row-major `DIMS` per user (before standardisation)
    log_features: Vec<f64>,
    /// `features.extra`: the table's features of every user, row-major (NaN
    /// where missing; empty without a table).
    extra: Vec<f32>,
    /// Rows of the table whose user has no interactions here.
    orphans: Vec<(String, Vec<f32>)>,
    points: Option<Resident>,
    /// k-means|| cost of every point: squared distance to the nearest chosen center
    costs: Vec<f32>,
    nearest: Vec<Nearest>,
}

impl Shard {
    fn points(&self, job: &str, shard: u32) -> Result<&Resident, WorkerError> {
        self.points.as_ref().ok_or_else(|| {
            WorkerError::InvalidRequest(format!("job {job} shard {shard} is not standardised yet"))
        })
    }
}

struct JobState {
    shards: BTreeMap<u32, Shard>,
    /// Features per user: the RFM block, with ALS the factors in front of it.
    dims: usize,
    /// ALS, when the spec asks for it.
    als: Option<AlsJob>,
    /// `features.als_weight` of the spec.
    als_weight: f64,
    /// `features.extra`: the table's columns (empty without one), its weight,
    /// and (once standardised) the mean and scale of its features.
    extra_columns: Vec<pb::ExtraColumn>,
    extra_weight: f64,
    extra_scaling: (Vec<f64>, Vec<f64>),
    /// A fold-in (`[model]`): the users of the extra table without interactions
    /// are assigned from its features alone.
    fold_in: bool,
    /// The backend this job runs on (its spec's `cluster.device`).
    backend: Arc<dyn Backend>,
    /// Fired by ReleaseJob; long steps check it between shards.
    cancel: CancellationToken,
}

type JobHandle = Arc<tokio::sync::Mutex<JobState>>;

impl JobState {
    fn check_dims(&self, d: usize, what: &str) -> Result<(), WorkerError> {
        if d != self.dims {
            return Err(WorkerError::InvalidRequest(format!(
                "{what}: {d} dimensions, this job's features have {}",
                self.dims
            )));
        }
        Ok(())
    }

    fn als(&self, job: &str) -> Result<&AlsJob, WorkerError> {
        self.als.as_ref().ok_or_else(|| {
            WorkerError::InvalidRequest(format!(
                "job {job} does not run ALS (features.als = false)"
            ))
        })
    }

    fn als_mut(&mut self, job: &str) -> Result<&mut AlsJob, WorkerError> {
        self.als.as_mut().ok_or_else(|| {
            WorkerError::InvalidRequest(format!(
                "job {job} does not run ALS (features.als = false)"
            ))
        })
    }
}

/// Fails with [`WorkerError::Cancelled`] once `cancel` has fired.
fn stop_if_cancelled(cancel: &CancellationToken, job: &str) -> Result<(), WorkerError> {
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
struct JobRun {
    control: IngestControl,
    tasks: TaskTracker,
}

impl JobRun {
    fn new(job: &str) -> JobRun {
        JobRun {
            control: IngestControl {
                job: job.to_string(),
                ..IngestControl::default()
            },
            tasks: TaskTracker::new(),
        }
    }

    /// Spawns `work` as a task of the job; it is dropped at its next await once
    /// the job is cancelled.
    fn spawn<T: Send + 'static>(
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
}

/// Jobs with work on this worker, and the jobs released (most recent last).
#[derive(Default)]
struct Runs {
    live: HashMap<String, Arc<JobRun>>,
    released: HashMap<String, Arc<JobRun>>,
    order: VecDeque<String>,
    /// Rows and bytes read by the runs no longer kept (for the totals).
    forgotten: (u64, u64),
}

impl Runs {
    /// Rows and bytes every job has read on this worker since it started.
    fn read_totals(&self) -> (u64, u64) {
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

async fn joined<T>(
    handle: tokio::task::JoinHandle<Result<T, WorkerError>>,
    what: &str,
) -> Result<T, WorkerError> {
    handle
        .await
        .map_err(|e| WorkerError::InvalidRequest(format!("{what} did not finish: {e}")))?
}

/// The worker's service state.
#[derive(Clone)]
pub struct WorkerServiceImpl {
    backend: Arc<dyn Backend>,
    jobs: Arc<Mutex<HashMap<String, JobHandle>>>,
    runs: Arc<Mutex<Runs>>,
    /// splits read at once by one Ingest call
    ingest_parallelism: usize,
    /// What this worker serves over Arrow Flight.
    shelf: Shelf,
    /// Other workers' Flight services.
    peers: Peers,
}

impl WorkerServiceImpl {
    pub fn new(backend: Arc<dyn Backend>, ingest_parallelism: usize) -> Self {
        let shelf = Shelf::default();
        WorkerServiceImpl {
            backend,
            jobs: Arc::default(),
            runs: Arc::default(),
            ingest_parallelism: ingest_parallelism.max(1),
            peers: Peers::new(shelf.clone(), WithToken::new(None).expect("no token"), None),
            shelf,
        }
    }

    /// Sets how this worker reaches other workers' Flight services: the token it
    /// sends and the CA that signs their certificates.
    pub fn with_peers(mut self, token: WithToken, ca: Option<std::path::PathBuf>) -> Self {
        self.peers = Peers::new(self.shelf.clone(), token, ca);
        self
    }

    /// The shelf the worker's Flight service answers from.
    pub fn shelf(&self) -> Shelf {
        self.shelf.clone()
    }

    /// Rows and bytes of input read on this worker since it started (every job).
    pub fn read_totals(&self) -> (u64, u64) {
        self.runs.lock().expect("runs lock").read_totals()
    }

    fn job_handle(&self, job: &str) -> Result<JobHandle, WorkerError> {
        if self
            .runs
            .lock()
            .expect("runs lock")
            .released
            .contains_key(job)
        {
            return Err(WorkerError::Cancelled {
                job: job.to_string(),
            });
        }
        self.jobs
            .lock()
            .expect("job map lock")
            .get(job)
            .cloned()
            .ok_or_else(|| WorkerError::UnknownJob {
                job: job.to_string(),
            })
    }

    /// Runs `work` as a task of the job (see [`JobRun::spawn`]); refused once the
    /// job has been released.
    async fn tracked<T, Fut>(
        &self,
        job: &str,
        work: impl FnOnce(Arc<JobRun>) -> Fut,
    ) -> Result<T, WorkerError>
    where
        T: Send + 'static,
        Fut: Future<Output = Result<T, WorkerError>> + Send + 'static,
    {
        let handle = {
            // Checked and spawned under the lock ReleaseJob takes: a task either
            // exists before the release (and is waited for) or is refused.
            let mut runs = self.runs.lock().expect("runs lock");
            if runs.released.contains_key(job) {
                return Err(WorkerError::Cancelled {
                    job: job.to_string(),
                });
            }
            let run = runs
                .live
                .entry(job.to_string())
                .or_insert_with(|| Arc::new(JobRun::new(job)))
                .clone();
            run.spawn(work(run.clone()).instrument(tracing::Span::current()))
        };
        joined(handle, "the step").await
    }

    /// Runs `f` on the job's state on a blocking thread (the work is CPU-bound),
    /// as a task of the job.
    async fn with_job<T, F>(&self, job: &str, f: F) -> Result<T, WorkerError>
    where
        T: Send + 'static,
        F: FnOnce(&mut JobState, &dyn Backend) -> Result<T, WorkerError> + Send + 'static,
    {
        let handle = self.job_handle(job)?;
        self.tracked(job, move |run| async move {
            let mut guard = handle.lock_owned().await;
            let backend = guard.backend.clone();
            let blocking = run
                .tasks
                .spawn_blocking(move || f(&mut guard, backend.as_ref()));
            blocking
                .await
                .map_err(|e| WorkerError::InvalidRequest(format!("step panicked: {e}")))?
        })
        .await
    }

    /// The backend for a job that asks for `device`: the worker's own for `auto`
    /// and for the device it runs; the CPU for `cpu`; an error for `cuda` on a
    /// worker without CUDA.
    fn backend_for(&self, device: Device) -> Result<Arc<dyn Backend>, WorkerError> {
        let own = self.backend.name();
        match device {
            Device::Auto => Ok(self.backend.clone()),
            Device::Cpu if own == "cpu" => Ok(self.backend.clone()),
            Device::Cpu => Ok(Arc::new(CpuBackend::new())),
            Device::Cuda if own.starts_with("cuda") => Ok(self.backend.clone()),
            Device::Cuda => Err(WorkerError::DeviceUnavailable {
                wanted: device.as_str(),
                have: own.to_string(),
            }),
        }
    }

    /// Every item's id and final factors, when the job recommends or evaluates.
    async fn catalog(&self, job: &str) -> Result<Option<Arc<als_job::Catalog>>, WorkerError> {
        /// Where the catalogue comes from.
        enum Source {
            /// Not needed: the job neither recommends nor evaluates.
            None,
            /// A fold-in's model, read at load.
            Model(Arc<als_job::Catalog>),
            /// The item shards' owners and the final version, with the shard
            /// count and the factor count.
            Shards((Vec<String>, u32), u32, usize),
        }
        let source = self
            .with_job(job, {
                let job = job.to_string();
                move |state, _| {
                    Ok(match &state.als {
                        Some(a) if a.top_n > 0 || a.holdout > 0.0 => match &a.catalog {
                            Some(c) => Source::Model(c.clone()),
                            None => Source::Shards(a.catalog_source(&job)?, a.shards, a.f),
                        },
                        _ => Source::None,
                    })
                }
            })
            .await?;
        let ((owners, version), shards, f) = match source {
            Source::None => return Ok(None),
            Source::Model(model) => return Ok(Some(model)),
            Source::Shards(at, shards, f) => (at, shards, f),
        };
        let (peers, job2) = (self.peers.clone(), job.to_string());
        let parts = self
            .tracked(job, move |_| async move {
                futures::future::try_join_all((0..shards).map(|shard| {
                    let (peers, owner, job) =
                        (peers.clone(), owners[shard as usize].clone(), job2.clone());
                    async move {
                        let ids = peers.fetch_ids(&owner, &job, Side::Items, shard).await?;
                        let values = peers
                            .fetch_rows(&owner, &job, (Side::Items, shard), version, Vec::new())
                            .await?;
                        Ok::<_, WorkerError>((shard, ids, values))
                    }
                }))
                .await
            })
            .await?;
        Ok(Some(Arc::new(als_job::Catalog::new(
            job, shards, f, parts,
        )?)))
    }

    /// Number of jobs this worker holds state for.
    pub fn jobs_held(&self) -> usize {
        self.jobs.lock().expect("job map lock").len()
    }
}

/// How many rows of `dims` values `values` holds (the job checks `dims` itself).
fn check_dims(dims: u32, values: usize, what: &str) -> Result<usize, WorkerError> {
    let d = dims as usize;
    if d == 0 {
        return Err(WorkerError::InvalidRequest(format!("{what}: 0 dimensions")));
    }
    if !values.is_multiple_of(d) {
        return Err(WorkerError::InvalidRequest(format!(
            "{what}: {values} values is not a multiple of {d}"
        )));
    }
    Ok(values / d)
}

fn parse_context(
    ctx: Option<&pb::JobContext>,
) -> Result<(String, JobSpec, store::Location), WorkerError> {
    let ctx = ctx.ok_or_else(|| WorkerError::InvalidRequest("missing job context".into()))?;
    let spec = JobSpec::parse(&ctx.spec_toml)?;
    let staging = store::resolve(&ctx.staging)?;
    Ok((ctx.job_id.clone(), spec, staging))
}

#[tonic::async_trait]
impl WorkerService for WorkerServiceImpl {
    async fn ingest(
        &self,
        req: Request<pb::IngestRequest>,
    ) -> Result<Response<pb::IngestResponse>, Status> {
        let req = req.into_inner();
        let (job, spec, staging) = parse_context(req.job.as_ref())?;
        let span = info_span!("ingest", job = %job, attempt = req.attempt, phase = "ingest");
        let spec = Arc::new(spec);
        let staging = Arc::new(staging);
        let parallelism = self.ingest_parallelism;
        // Interaction splits, then the splits of the features.extra table, on one
        // pool of tasks.
        let splits: Vec<(bool, pb::Split)> = req
            .splits
            .into_iter()
            .map(|s| (false, s))
            .chain(req.extra_splits.into_iter().map(|s| (true, s)))
            .collect();
        enum Done {
            Log(pb::SplitResult),
            Extra(pb::ExtraSplitResult),
        }
        let work = move |run: Arc<JobRun>| async move {
            futures::stream::iter(splits)
                .map(|(is_extra, split)| {
                    let (spec, staging, control) =
                        (spec.clone(), staging.clone(), run.control.clone());
                    // each split on its own task, so parsing runs on all cores
                    joined(
                        run.spawn(async move {
                            if is_extra {
                                extra::ingest_split(&spec, &split, &staging, &control)
                                    .await
                                    .map(Done::Extra)
                            } else {
                                ingest::ingest_split_controlled(&spec, &split, &staging, &control)
                                    .await
                                    .map(Done::Log)
                            }
                        }),
                        "ingest task",
                    )
                })
                .buffer_unordered(parallelism)
                .collect::<Vec<_>>()
                .await
                .into_iter()
                .collect::<Result<Vec<Done>, _>>()
        };
        async move {
            let (mut results, mut extra_results) = (Vec::new(), Vec::new());
            for done in self.tracked(&job, work).await? {
                match done {
                    Done::Log(r) => results.push(r),
                    Done::Extra(r) => extra_results.push(r),
                }
            }
            results.sort_by_key(|r| r.split);
            extra_results.sort_by_key(|r| r.split);
            let rows: u64 = results
                .iter()
                .filter_map(|r| r.counts.as_ref())
                .map(|c| c.read)
                .sum();
            info!(
                splits = results.len(),
                rows,
                extra_splits = extra_results.len(),
                "ingested"
            );
            Ok(Response::new(pb::IngestResponse {
                splits: results,
                extra_splits: extra_results,
            }))
        }
        .instrument(span)
        .await
        .map_err(|e: WorkerError| e.into())
    }

    async fn load_shards(
        &self,
        req: Request<pb::LoadShardsRequest>,
    ) -> Result<Response<pb::LoadShardsResponse>, Status> {
        let req = req.into_inner();
        let (job, spec, staging) = parse_context(req.job.as_ref())?;
        let span = info_span!("load", job = %job, attempt = req.attempt, phase = "load");
        let (jobs, runs) = (self.jobs.clone(), self.runs.clone());
        let shelf = self.shelf.clone();
        let backend = self.backend_for(spec.cluster.device);
        let job_id = job.clone();
        let work = move |run: Arc<JobRun>| async move {
            let backend = backend?;
            info!(
                device = spec.cluster.device.as_str(),
                backend = backend.name(),
                "job backend"
            );
            let cancel = run.control.cancel.clone();
            let mut loaded = BTreeMap::new();
            let mut stats = Vec::new();
            let use_als = spec.features.als;
            let (seed, holdout) = (spec.segments.seed, spec.evaluate.holdout);
            let mut user_pairs = BTreeMap::new();
            // id lists to serve, published with the job's state (never for a job
            // released meanwhile, whose shelf entries would outlive it)
            let mut published = Vec::new();
            for &shard in &req.shards {
                stop_if_cancelled(&cancel, &job)?;
                let batches = staging::read_shard(&staging, shard).await?;
                let reference = req.reference_time_ms;
                let (rfm, feats, pairs) = run
                    .tasks
                    .spawn_blocking(move || {
                        let rfm = load::aggregate(&batches, reference)?;
                        let feats = rfm.log_features();
                        let pairs = if use_als {
                            Some(als::user_pairs(&batches, &rfm.users, seed, holdout)?)
                        } else {
                            None
                        };
                        Ok::<_, WorkerError>((rfm, feats, pairs))
                    })
                    .await
                    .map_err(|e| WorkerError::InvalidRequest(format!("load panicked: {e}")))??;
                let mut stat = pb::ShardStats {
                    shard,
                    users: rfm.len() as u64,
                    moments: load::moments(&feats, DIMS),
                    ..Default::default()
                };
                let (joined, rfm) = if req.extra_columns.is_empty() {
                    (extra::Joined::default(), rfm)
                } else {
                    let table =
                        extra::ShardExtra::read(&staging, shard, &req.extra_columns).await?;
                    let e = extra::dims(&req.extra_columns);
                    let (joined, moments, rfm) = run
                        .tasks
                        .spawn_blocking(move || {
                            let joined = table.join(&rfm.users, e);
                            let moments = extra::moments(&joined.values, e);
                            (joined, moments, rfm)
                        })
                        .await
                        .map_err(|e| WorkerError::InvalidRequest(format!("load panicked: {e}")))?;
                    stat.extra_moments = moments;
                    stat.extra_users = joined.users_with_row;
                    stat.extra_missing_values = joined.missing;
                    stat.extra_orphans = joined.orphans.len() as u64;
                    (joined, rfm)
                };
                if let Some(pairs) = pairs {
                    stat.pairs = pairs.nnz() as u64;
                    stat.held_out = pairs.held.len() as u64;
                    stat.nonpositive = pairs.nonpositive;
                    published.push((Side::Users, shard, Arc::new(rfm.users.clone())));
                    user_pairs.insert(shard, pairs);
                }
                stats.push(stat);
                loaded.insert(
                    shard,
                    Shard {
                        rfm,
                        log_features: feats,
                        extra: joined.values,
                        orphans: joined.orphans,
                        points: None,
                        costs: Vec::new(),
                        nearest: Vec::new(),
                    },
                );
            }
            let mut item_stats = Vec::new();
            let mut item_pairs = BTreeMap::new();
            if use_als {
                for &shard in &req.item_shards {
                    stop_if_cancelled(&cancel, &job)?;
                    let batches = staging::read_item_shard(&staging, shard).await?;
                    let pairs = run
                        .tasks
                        .spawn_blocking(move || als::item_pairs(&batches, seed, holdout))
                        .await
                        .map_err(|e| {
                            WorkerError::InvalidRequest(format!("load panicked: {e}"))
                        })??;
                    let confidence_sum: f64 = pairs
                        .strength
                        .iter()
                        .map(|&s| spec.als.confidence_of(s))
                        .sum();
                    item_stats.push(pb::ItemShardStats {
                        shard,
                        items: pairs.rows() as u64,
                        pairs: pairs.nnz() as u64,
                        confidence_sum,
                    });
                    published.push((Side::Items, shard, Arc::new(pairs.ids.clone())));
                    item_pairs.insert(shard, pairs);
                }
            }
            let als_job = use_als.then(|| {
                let owned = |pairs: BTreeMap<u32, als::Pairs>| {
                    pairs
                        .into_iter()
                        .map(|(s, pairs)| {
                            (
                                s,
                                OwnedShard {
                                    pairs,
                                    conf: None,
                                    factors: None,
                                },
                            )
                        })
                        .collect()
                };
                AlsJob {
                    spec: spec.als.clone(),
                    f: spec.als.factors as usize,
                    seed,
                    holdout,
                    shards: spec.cluster.shards,
                    users: owned(user_pairs),
                    items: owned(item_pairs),
                    linked: None,
                    top_n: spec.recommend.top_n as usize,
                    exclude_seen: spec.recommend.exclude_seen,
                    eval_k: spec.evaluate.k as usize,
                    catalog: None,
                }
            });
            let users: u64 = stats.iter().map(|s| s.users).sum();
            info!(
                shards = req.shards.len(),
                item_shards = item_stats.len(),
                users,
                "loaded"
            );
            // A reload replaces what the worker held for the job; a job released
            // meanwhile keeps nothing (same lock order as ReleaseJob: runs, jobs).
            let handle = Arc::new(tokio::sync::Mutex::new(JobState {
                shards: loaded,
                dims: DIMS,
                als: als_job,
                als_weight: spec.features.als_weight,
                extra_columns: req.extra_columns.clone(),
                extra_weight: spec.features.extra_weight,
                extra_scaling: (Vec::new(), Vec::new()),
                fold_in: spec.model.is_some(),
                backend,
                cancel: cancel.clone(),
            }));
            let runs = runs.lock().expect("runs lock");
            stop_if_cancelled(&cancel, &job)?;
            for (side, shard, ids) in published {
                shelf.put_ids(&job, side, shard, ids);
            }
            jobs.lock()
                .expect("job map lock")
                .insert(job.clone(), handle);
            drop(runs);
            Ok(pb::LoadShardsResponse {
                shards: stats,
                dims: DIMS as u32,
                item_shards: item_stats,
            })
        };
        self.tracked(&job_id, work)
            .instrument(span)
            .await
            .map(Response::new)
            .map_err(|e: WorkerError| e.into())
    }

    async fn standardize(
        &self,
        req: Request<pb::StandardizeRequest>,
    ) -> Result<Response<pb::StandardizeResponse>, Status> {
        let req = req.into_inner();
        if req.mean.len() != DIMS || req.scale.len() != DIMS {
            return Err(WorkerError::InvalidRequest(format!(
                "scaling needs {DIMS} means and scales"
            ))
            .into());
        }
        let job_id = req.job_id.clone();
        let (shards, dims) = self
            .with_job(&req.job_id, move |job, backend| {
                let f = job.als.as_ref().map_or(0, |a| a.f);
                let e = extra::dims(&job.extra_columns);
                if req.extra_mean.len() != e || req.extra_scale.len() != e {
                    return Err(WorkerError::InvalidRequest(format!(
                        "scaling of the features.extra block needs {e} means and scales, got {} and {}",
                        req.extra_mean.len(),
                        req.extra_scale.len()
                    )));
                }
                let dims = f + DIMS + e;
                let mut stats = Vec::new();
                for (&id, shard) in job.shards.iter_mut() {
                    stop_if_cancelled(&job.cancel, &job_id)?;
                    let factors = match &job.als {
                        Some(a) => a.user_features(&job_id, id, job.als_weight, backend)?,
                        None => Vec::new(),
                    };
                    let mut features = Vec::with_capacity(shard.rfm.len() * dims);
                    for (u, row) in shard.log_features.chunks_exact(DIMS).enumerate() {
                        features.extend_from_slice(&factors[u * f..(u + 1) * f]);
                        features.extend(
                            row.iter()
                                .enumerate()
                                .map(|(j, x)| ((x - req.mean[j]) / req.scale[j]) as f32),
                        );
                        features.extend(extra::scaled(
                            &shard.extra[u * e..(u + 1) * e],
                            &req.extra_mean,
                            &req.extra_scale,
                            job.extra_weight,
                        ));
                    }
                    let as_f64: Vec<f64> = features.iter().map(|&v| f64::from(v)).collect();
                    stats.push(pb::ShardStats {
                        shard: id,
                        users: shard.rfm.len() as u64,
                        moments: load::moments(&as_f64, dims),
                        ..Default::default()
                    });
                    shard.points = Some(backend.upload(&features, dims)?);
                    shard.costs = vec![f32::INFINITY; shard.rfm.len()];
                    shard.nearest = vec![Nearest::default(); shard.rfm.len()];
                }
                job.dims = dims;
                job.extra_scaling = (req.extra_mean.clone(), req.extra_scale.clone());
                Ok((stats, dims))
            })
            .await?;
        Ok(Response::new(pb::StandardizeResponse {
            shards,
            dims: dims as u32,
        }))
    }

    async fn get_points(
        &self,
        req: Request<pb::GetPointsRequest>,
    ) -> Result<Response<pb::GetPointsResponse>, Status> {
        let req = req.into_inner();
        let job_id = req.job_id.clone();
        let values = self
            .with_job(&req.job_id, move |job, backend| {
                let mut values = Vec::with_capacity(req.points.len() * job.dims);
                for p in &req.points {
                    let shard = job.shards.get(&p.shard).ok_or(WorkerError::UnknownShard {
                        job: job_id.clone(),
                        shard: p.shard,
                    })?;
                    let row = u32::try_from(p.index).map_err(|_| {
                        WorkerError::InvalidRequest(format!("point index {} out of range", p.index))
                    })?;
                    values.extend(backend.download_rows(shard.points(&job_id, p.shard)?, &[row])?);
                }
                Ok((values, job.dims))
            })
            .await?;
        let (values, dims) = values;
        Ok(Response::new(pb::GetPointsResponse {
            dims: dims as u32,
            values,
        }))
    }

    async fn init_costs(
        &self,
        req: Request<pb::InitCostsRequest>,
    ) -> Result<Response<pb::InitCostsResponse>, Status> {
        let req = req.into_inner();
        let k = check_dims(req.dims, req.new_centers.len(), "new centers")?;
        let job_id = req.job_id.clone();
        let shards = self
            .with_job(&req.job_id, move |job, backend| {
                job.check_dims(req.dims as usize, "new centers")?;
                let mut out = Vec::new();
                for (&id, shard) in job.shards.iter_mut() {
                    stop_if_cancelled(&job.cancel, &job_id)?;
                    if k > 0 && !shard.rfm.is_empty() {
                        let points = shard.points.as_ref().ok_or_else(|| {
                            WorkerError::InvalidRequest(format!(
                                "job {job_id} shard {id} is not standardised yet"
                            ))
                        })?;
                        backend.assign(points, &req.new_centers, k, &mut shard.nearest)?;
                        for (c, n) in shard.costs.iter_mut().zip(&shard.nearest) {
                            *c = c.min(n.best_dist);
                        }
                    }
                    let cost: f64 = shard.costs.iter().map(|c| f64::from(*c)).sum();
                    out.push(pb::ShardCost { shard: id, cost });
                }
                Ok(out)
            })
            .await?;
        Ok(Response::new(pb::InitCostsResponse { shards }))
    }

    async fn init_sample(
        &self,
        req: Request<pb::InitSampleRequest>,
    ) -> Result<Response<pb::InitSampleResponse>, Status> {
        let req = req.into_inner();
        if !(req.total_cost.is_finite() && req.total_cost >= 0.0 && req.oversampling > 0.0) {
            return Err(WorkerError::InvalidRequest(
                "sampling needs a finite total cost and positive oversampling".into(),
            )
            .into());
        }
        let job_id = req.job_id.clone();
        let points = self
            .with_job(&req.job_id, move |job, backend| {
                let mut out = Vec::new();
                if req.total_cost == 0.0 {
                    return Ok(out);
                }
                for (&id, shard) in job.shards.iter() {
                    stop_if_cancelled(&job.cancel, &job_id)?;
                    let mut rows = Vec::new();
                    for (i, cost) in shard.costs.iter().enumerate() {
                        let p = (req.oversampling * f64::from(*cost) / req.total_cost).min(1.0);
                        let u = hash::unit(hash::key(
                            req.seed,
                            &[u64::from(req.round), u64::from(id), i as u64],
                        ));
                        if u < p {
                            rows.push(i as u32);
                        }
                    }
                    if rows.is_empty() {
                        continue;
                    }
                    let values = backend.download_rows(shard.points(&job_id, id)?, &rows)?;
                    for (row, v) in rows.iter().zip(values.chunks_exact(job.dims)) {
                        out.push(pb::SampledPoint {
                            point: Some(PointRef {
                                shard: id,
                                index: u64::from(*row),
                            }),
                            values: v.to_vec(),
                        });
                    }
                }
                Ok(out)
            })
            .await?;
        Ok(Response::new(pb::InitSampleResponse { points }))
    }

    async fn lloyd_step(
        &self,
        req: Request<pb::LloydStepRequest>,
    ) -> Result<Response<pb::LloydStepResponse>, Status> {
        let req = req.into_inner();
        let k = check_dims(req.dims, req.centroids.len(), "centroids")?;
        if k != req.k as usize || k == 0 {
            return Err(WorkerError::InvalidRequest(format!(
                "k = {} but {} centroids were sent",
                req.k, k
            ))
            .into());
        }
        let job_id = req.job_id.clone();
        let shards = self
            .with_job(&req.job_id, move |job, backend| {
                job.check_dims(req.dims as usize, "centroids")?;
                let d = job.dims;
                let mut out = Vec::new();
                for (&id, shard) in job.shards.iter_mut() {
                    stop_if_cancelled(&job.cancel, &job_id)?;
                    if shard.rfm.is_empty() {
                        out.push(pb::ShardPartial {
                            shard: id,
                            sums: vec![0.0; k * d],
                            counts: vec![0; k],
                            inertia: 0.0,
                            far: Vec::new(),
                        });
                        continue;
                    }
                    let points = shard.points.as_ref().ok_or_else(|| {
                        WorkerError::InvalidRequest(format!(
                            "job {job_id} shard {id} is not standardised yet"
                        ))
                    })?;
                    backend.assign(points, &req.centroids, k, &mut shard.nearest)?;
                    let labels: Vec<u32> = shard.nearest.iter().map(|n| n.best).collect();
                    let partial = backend.partial_sums(points, &labels, k)?;
                    let inertia: f64 = shard.nearest.iter().map(|n| f64::from(n.best_dist)).sum();
                    let far_rows = farthest(&shard.nearest, req.far_points as usize);
                    let values = backend.download_rows(points, &far_rows)?;
                    let far = far_rows
                        .iter()
                        .zip(values.chunks_exact(d))
                        .map(|(&row, v)| pb::FarPoint {
                            point: Some(PointRef {
                                shard: id,
                                index: u64::from(row),
                            }),
                            label: shard.nearest[row as usize].best,
                            distance: f64::from(shard.nearest[row as usize].best_dist),
                            values: v.to_vec(),
                        })
                        .collect();
                    out.push(pb::ShardPartial {
                        shard: id,
                        sums: partial.sums,
                        counts: partial.counts,
                        inertia,
                        far,
                    });
                }
                Ok(out)
            })
            .await?;
        Ok(Response::new(pb::LloydStepResponse { shards }))
    }

    async fn finalize(
        &self,
        req: Request<pb::FinalizeRequest>,
    ) -> Result<Response<pb::FinalizeResponse>, Status> {
        let req = req.into_inner();
        let k = check_dims(req.dims, req.centroids.len(), "centroids")?;
        if k != req.k as usize || k == 0 {
            return Err(WorkerError::InvalidRequest(format!(
                "k = {} but {} centroids were sent",
                req.k, k
            ))
            .into());
        }
        let output = store::resolve(&req.output).map_err(WorkerError::from)?;
        let span =
            info_span!("finalize", job = %req.job_id, attempt = req.attempt, phase = "finalize");
        let job_id = req.job_id.clone();
        let req = Arc::new(req);
        let catalog = self.catalog(&job_id).instrument(span.clone()).await?;
        let (finals, files, item_files) = {
            let req = req.clone();
            self.with_job(&job_id.clone(), move |job, backend| {
                let catalog_items = match &catalog {
                    Some(c) if !c.ids.is_empty() => {
                        Some(backend.upload(&c.factors, job.als(&job_id)?.f)?)
                    }
                    _ => None,
                };
                job.check_dims(req.dims as usize, "centroids")?;
                let d = job.dims;
                let job_parts = ColdParts {
                    fold_in: job.fold_in,
                    at: d - extra::dims(&job.extra_columns),
                    dims: extra::dims(&job.extra_columns),
                    weight: job.extra_weight,
                    mean: job.extra_scaling.0.clone(),
                    scale: job.extra_scaling.1.clone(),
                };
                let mut finals = Vec::new();
                let mut files = Vec::new();
                let mut item_files = Vec::new();
                if let Some(a) = &job.als {
                    for &id in a.items.keys() {
                        let part = factors_part(
                            "item_id",
                            &a.items[&id].pairs.ids,
                            &a.factors(Side::Items, &job_id, id, backend)?,
                            a.f,
                        )?;
                        let rel = format!("item_factors.parquet/part-{id:05}.parquet");
                        item_files.push(pb::WrittenFile {
                            path: rel.clone(),
                            rows: a.items[&id].pairs.rows() as u64,
                            bytes: part.len() as u64,
                        });
                        files.push((rel, part));
                    }
                }
                for (&id, shard) in job.shards.iter_mut() {
                    stop_if_cancelled(&job.cancel, &job_id)?;
                    let mut more = Vec::new();
                    if let Some(a) = &job.als {
                        let part = factors_part(
                            "user_id",
                            &shard.rfm.users,
                            &a.factors(Side::Users, &job_id, id, backend)?,
                            a.f,
                        )?;
                        let rel = format!("user_factors.parquet/part-{id:05}.parquet");
                        more.push(pb::WrittenFile {
                            path: rel.clone(),
                            rows: shard.rfm.len() as u64,
                            bytes: part.len() as u64,
                        });
                        files.push((rel, part));
                    }
                    let mut ranking = None;
                    if let (Some(a), Some(catalog), Some(items)) =
                        (&job.als, &catalog, &catalog_items)
                    {
                        let (recs, rank) = a.recommend(
                            &job_id,
                            id,
                            catalog,
                            items,
                            a.top_n,
                            a.exclude_seen,
                            a.eval_k,
                            backend,
                        )?;
                        ranking = rank;
                        if let Some(recs) = recs {
                            let (part, rows) =
                                recommendations_part(&shard.rfm.users, &recs, catalog)?;
                            let rel = format!("recommendations.parquet/part-{id:05}.parquet");
                            more.push(pb::WrittenFile {
                                path: rel.clone(),
                                rows,
                                bytes: part.len() as u64,
                            });
                            files.push((rel, part));
                        }
                    }
                    let cold =
                        cold_start(job_cold(&job_parts, shard), &req.centroids, k, d, backend)?;
                    let mut cold_counts = vec![0u64; if cold.is_empty() { 0 } else { k }];
                    for n in &cold {
                        cold_counts[n.best as usize] += 1;
                    }
                    let cold_users: Vec<&str> = shard
                        .orphans
                        .iter()
                        .take(cold.len())
                        .map(|(u, _)| u.as_str())
                        .collect();
                    if shard.rfm.is_empty() {
                        let file = if cold.is_empty() {
                            None
                        } else {
                            let bytes =
                                assignments_parquet(&shard.rfm, &[], k, &cold_users, &cold)?;
                            let rel = format!("assignments.parquet/part-{id:05}.parquet");
                            let file = pb::WrittenFile {
                                path: rel.clone(),
                                rows: cold.len() as u64,
                                bytes: bytes.len() as u64,
                            };
                            files.push((rel, bytes));
                            Some(file)
                        };
                        finals.push(pb::ShardFinal {
                            shard: id,
                            segments: empty_segments(k, d),
                            sample: Vec::new(),
                            file,
                            files: more,
                            ranking,
                            items: Vec::new(),
                            cold_start: cold_counts,
                        });
                        continue;
                    }
                    let points = shard.points.as_ref().ok_or_else(|| {
                        WorkerError::InvalidRequest(format!(
                            "job {job_id} shard {id} is not standardised yet"
                        ))
                    })?;
                    backend.assign(points, &req.centroids, k, &mut shard.nearest)?;
                    let all_rows: Vec<u32> = (0..shard.rfm.len() as u32).collect();
                    let scaled = backend.download_rows(points, &all_rows)?;
                    let segments = segment_partials(&shard.rfm, &scaled, &shard.nearest, k, d);
                    let sample = sample_points(
                        &shard.rfm,
                        &shard.nearest,
                        points,
                        backend,
                        req.seed,
                        req.sample_size as usize,
                        d,
                    )?;
                    let bytes =
                        assignments_parquet(&shard.rfm, &shard.nearest, k, &cold_users, &cold)?;
                    let items = match &job.als {
                        Some(a) => {
                            let labels: Vec<u32> = shard.nearest.iter().map(|n| n.best).collect();
                            a.segment_items(id, &labels)
                        }
                        None => Vec::new(),
                    };
                    let rel = format!("assignments.parquet/part-{id:05}.parquet");
                    debug!(
                        shard = id,
                        users = shard.rfm.len(),
                        bytes = bytes.len(),
                        "assignments part"
                    );
                    finals.push(pb::ShardFinal {
                        shard: id,
                        segments,
                        sample,
                        file: Some(pb::WrittenFile {
                            path: rel.clone(),
                            rows: (shard.rfm.len() + cold.len()) as u64,
                            bytes: bytes.len() as u64,
                        }),
                        files: more,
                        ranking,
                        items,
                        cold_start: cold_counts,
                    });
                    files.push((rel, bytes));
                }
                Ok((finals, files, item_files))
            })
            .instrument(span.clone())
            .await?
        };
        let shards = finals.len();
        self.tracked(&req.job_id, move |run| async move {
            for (rel, bytes) in files {
                stop_if_cancelled(&run.control.cancel, &run.control.job)?;
                output
                    .child(&rel)
                    .put(bytes.into())
                    .await
                    .map_err(WorkerError::from)?;
            }
            info!(shards, "assignments written");
            Ok::<_, WorkerError>(())
        })
        .instrument(span)
        .await?;
        Ok(Response::new(pb::FinalizeResponse {
            shards: finals,
            item_files,
        }))
    }

    async fn als_link(
        &self,
        req: Request<pb::AlsLinkRequest>,
    ) -> Result<Response<pb::AlsLinkResponse>, Status> {
        let req = req.into_inner();
        let job = req.job_id.clone();
        let span = info_span!("als_link", job = %job, attempt = req.attempt, phase = "als");
        async move {
            let (item_shards, user_shards, shards) = self
                .with_job(&job, {
                    let job = job.clone();
                    move |state, _| {
                        let a = state.als(&job)?;
                        Ok((
                            a.other_shards(Side::Users),
                            a.other_shards(Side::Items),
                            a.shards,
                        ))
                    }
                })
                .await?;
            if req.owners.len() != shards as usize {
                return Err(WorkerError::InvalidRequest(format!(
                    "{} shard owners for {shards} shards",
                    req.owners.len()
                )));
            }
            let wanted: Vec<(Side, u32)> = item_shards
                .iter()
                .map(|&s| (Side::Items, s))
                .chain(user_shards.iter().map(|&s| (Side::Users, s)))
                .collect();
            let (peers, owners, job2) = (self.peers.clone(), req.owners.clone(), job.clone());
            let lists = self
                .tracked(&job, move |_| async move {
                    futures::future::try_join_all(wanted.into_iter().map(|(side, shard)| {
                        let (peers, owner, job) =
                            (peers.clone(), owners[shard as usize].clone(), job2.clone());
                        async move {
                            let ids = peers.fetch_ids(&owner, &job, side, shard).await?;
                            Ok::<_, WorkerError>((side, shard, ids))
                        }
                    }))
                    .await
                })
                .await?;
            let mut item_lists = HashMap::new();
            let mut user_lists = HashMap::new();
            for (side, shard, ids) in lists {
                match side {
                    Side::Items => item_lists.insert(shard, ids),
                    Side::Users => user_lists.insert(shard, ids),
                };
            }
            let shelf = self.shelf.clone();
            let owners = req.owners.clone();
            let grams = self
                .with_job(&job, {
                    let job = job.clone();
                    move |state, backend| {
                        state.als_mut(&job)?.link(
                            &job,
                            owners,
                            &item_lists,
                            &user_lists,
                            backend,
                            &shelf,
                        )
                    }
                })
                .await?;
            info!(item_shards = grams.len(), "ALS linked");
            Ok(pb::AlsLinkResponse { item_shards: grams })
        }
        .instrument(span)
        .await
        .map(Response::new)
        .map_err(|e: WorkerError| e.into())
    }

    async fn als_step(
        &self,
        req: Request<pb::AlsStepRequest>,
    ) -> Result<Response<pb::AlsStepResponse>, Status> {
        let req = req.into_inner();
        let side = Side::from_proto(req.side)?;
        let job = req.job_id.clone();
        let span = info_span!(
            "als_step",
            job = %job,
            attempt = req.attempt,
            phase = "als",
            side = side.as_str(),
            iteration = req.iteration
        );
        async move {
            let iteration = req.iteration;
            let plan = self
                .with_job(&job, {
                    let job = job.clone();
                    move |state, _| state.als(&job)?.fetch_plan(&job, side, iteration)
                })
                .await?;
            let other = side.other();
            let (peers, job2, plan2) = (self.peers.clone(), job.clone(), plan.clone());
            let fetched = self
                .tracked(&job, move |_| async move {
                    futures::future::try_join_all(plan2.parts.iter().map(|(shard, rows, _)| {
                        let owner = plan2.owners[*shard as usize].clone();
                        let (peers, job, at) = (peers.clone(), job2.clone(), (other, *shard));
                        let (version, rows) = (plan2.version, rows.clone());
                        async move { peers.fetch_rows(&owner, &job, at, version, rows).await }
                    }))
                    .await
                })
                .await?;
            let rows: usize = fetched.iter().map(Vec::len).sum();
            let shelf = self.shelf.clone();
            let shards = self
                .with_job(&job, {
                    let job = job.clone();
                    move |state, backend| {
                        stop_if_cancelled(&state.cancel, &job)?;
                        state
                            .als_mut(&job)?
                            .step(&job, &plan, fetched, &req.gram, backend, &shelf)
                    }
                })
                .await?;
            debug!(
                shards = shards.len(),
                values_fetched = rows,
                "ALS half-step"
            );
            Ok(pb::AlsStepResponse { shards })
        }
        .instrument(span)
        .await
        .map(Response::new)
        .map_err(|e: WorkerError| e.into())
    }

    async fn als_fold_in(
        &self,
        req: Request<pb::AlsFoldInRequest>,
    ) -> Result<Response<pb::AlsFoldInResponse>, Status> {
        let req = req.into_inner();
        let job = req.job_id.clone();
        let span = info_span!("als_fold_in", job = %job, attempt = req.attempt, phase = "als");
        async move {
            let f = self
                .with_job(&job, {
                    let job = job.clone();
                    move |state, _| Ok(state.als(&job)?.f)
                })
                .await?;
            let model = store::resolve(&req.model)?;
            let parts = req.item_parts.clone();
            let (ids, factors) = self
                .tracked(&job, move |_| async move {
                    read_model_items(&model, &parts, f).await
                })
                .await?;
            let items = ids.len() as u64;
            let catalog = Arc::new(als_job::Catalog::from_table(ids, factors));
            let shards = self
                .with_job(&job, {
                    let job = job.clone();
                    move |state, backend| state.als_mut(&job)?.fold_in(&job, catalog, backend)
                })
                .await?;
            info!(items, shards = shards.len(), "folded in");
            Ok(pb::AlsFoldInResponse { shards, items })
        }
        .instrument(span)
        .await
        .map(Response::new)
        .map_err(|e: WorkerError| e.into())
    }

    async fn release_job(
        &self,
        req: Request<pb::ReleaseJobRequest>,
    ) -> Result<Response<pb::ReleaseJobResponse>, Status> {
        let job = req.into_inner().job_id;
        let started = Instant::now();
        let (run, removed) = {
            let mut runs = self.runs.lock().expect("runs lock");
            let run = match runs.released.get(&job) {
                Some(run) => run.clone(),
                None => {
                    let run = runs
                        .live
                        .remove(&job)
                        .unwrap_or_else(|| Arc::new(JobRun::new(&job)));
                    runs.released.insert(job.clone(), run.clone());
                    runs.order.push_back(job.clone());
                    while runs.order.len() > RELEASED_KEPT {
                        if let Some(old) = runs.order.pop_front()
                            && let Some(old) = runs.released.remove(&old)
                        {
                            runs.forgotten.0 += old.control.rows_read.load(Ordering::Relaxed);
                            runs.forgotten.1 += old.control.bytes_read.load(Ordering::Relaxed);
                        }
                    }
                    run
                }
            };
            run.control.cancel.cancel();
            run.tasks.close();
            self.shelf.drop_job(&job);
            let removed = self
                .jobs
                .lock()
                .expect("job map lock")
                .remove(&job)
                .is_some();
            (run, removed)
        };
        let running = run.tasks.len();
        let stopped = tokio::time::timeout(RELEASE_WAIT, run.tasks.wait())
            .await
            .is_ok();
        let rows_read = run.control.rows_read.load(Ordering::Relaxed);
        if stopped {
            info!(
                job = %job,
                removed,
                tasks = running,
                rows_read,
                waited_ms = started.elapsed().as_millis() as u64,
                "released job"
            );
        } else {
            warn!(
                job = %job,
                tasks = run.tasks.len(),
                "released job; some of its tasks were still running after {} s",
                RELEASE_WAIT.as_secs()
            );
        }
        Ok(Response::new(pb::ReleaseJobResponse { stopped, rows_read }))
    }

    async fn get_job_activity(
        &self,
        req: Request<pb::JobActivityRequest>,
    ) -> Result<Response<pb::JobActivity>, Status> {
        let job = req.into_inner().job_id;
        let runs = self.runs.lock().expect("runs lock");
        let (run, released) = match (runs.live.get(&job), runs.released.get(&job)) {
            (_, Some(run)) => (Some(run), true),
            (Some(run), None) => (Some(run), false),
            (None, None) => (None, false),
        };
        let holds_shards = self.jobs.lock().expect("job map lock").contains_key(&job);
        Ok(Response::new(pb::JobActivity {
            rows_read: run.map_or(0, |r| r.control.rows_read.load(Ordering::Relaxed)),
            bytes_read: run.map_or(0, |r| r.control.bytes_read.load(Ordering::Relaxed)),
            tasks_running: run.map_or(0, |r| r.tasks.len() as u32),
            released,
            holds_shards,
        }))
    }
}

/// Rows of the `m` largest distances (ties: lower row first), largest first.
/// What a fold-in needs to assign a shard's cold-start users.
struct ColdParts {
    fold_in: bool,
    /// Where the extra block starts in the feature vector, and its length.
    at: usize,
    dims: usize,
    weight: f64,
    mean: Vec<f64>,
    scale: Vec<f64>,
}

/// The scaled extra features (row-major, `parts.dims` each) of the shard's
/// users without interactions, when the job assigns them (a fold-in with an
/// extra block that weighs something), with the block's place; `None`
/// otherwise.
fn job_cold(parts: &ColdParts, shard: &Shard) -> Option<(Vec<f32>, usize, usize)> {
    if !parts.fold_in || parts.dims == 0 || parts.weight <= 0.0 || shard.orphans.is_empty() {
        return None;
    }
    let mut features = Vec::with_capacity(shard.orphans.len() * parts.dims);
    for (_, values) in &shard.orphans {
        features.extend(extra::scaled(
            values,
            &parts.mean,
            &parts.scale,
            parts.weight,
        ));
    }
    Some((features, parts.at, parts.dims))
}

/// Nearest and second nearest centroid of each cold-start user by the extra
/// block alone: its features against the same block of every centroid.
fn cold_start(
    cold: Option<(Vec<f32>, usize, usize)>,
    centroids: &[f32],
    k: usize,
    d: usize,
    backend: &dyn Backend,
) -> Result<Vec<Nearest>, WorkerError> {
    let Some((features, at, e)) = cold else {
        return Ok(Vec::new());
    };
    let block: Vec<f32> = centroids
        .chunks_exact(d)
        .flat_map(|c| c[at..at + e].iter().copied())
        .collect();
    let points = backend.upload(&features, e)?;
    let mut nearest = vec![Nearest::default(); features.len() / e];
    backend.assign(&points, &block, k, &mut nearest)?;
    Ok(nearest)
}

fn farthest(nearest: &[Nearest], m: usize) -> Vec<u32> {
    let m = m.min(nearest.len());
    if m == 0 {
        return Vec::new();
    }
    let mut rows: Vec<u32> = (0..nearest.len() as u32).collect();
    let order = |a: &u32, b: &u32| {
        nearest[*b as usize]
            .best_dist
            .total_cmp(&nearest[*a as usize].best_dist)
            .then(a.cmp(b))
    };
    if m < rows.len() {
        rows.select_nth_unstable_by(m - 1, order);
        rows.truncate(m);
    }
    rows.sort_by(order);
    rows
}

fn empty_segments(k: usize, d: usize) -> Vec<pb::SegmentPartial> {
    (0..k)
        .map(|_| pb::SegmentPartial {
            count: 0,
            rfm_sum: vec![0.0; 3],
            rfm_sketch: vec![Sketch::default().to_proto(); 3],
            distance_sum: 0.0,
            inertia: 0.0,
            feature_sum: vec![0.0; d],
        })
        .collect()
}

fn segment_partials(
    rfm: &ShardRfm,
    points: &[f32],
    nearest: &[Nearest],
    k: usize,
    d: usize,
) -> Vec<pb::SegmentPartial> {
    let mut feature_sum = vec![0.0f64; k * d];
    let mut count = vec![0u64; k];
    let mut sums = vec![[0.0f64; 3]; k];
    let mut sketches = vec![[Sketch::default(), Sketch::default(), Sketch::default()]; k];
    let mut dist = vec![0.0f64; k];
    let mut inertia = vec![0.0f64; k];
    for (i, n) in nearest.iter().enumerate() {
        let s = n.best as usize;
        let v = [
            rfm.recency_days[i],
            rfm.frequency[i] as f64,
            rfm.monetary[i],
        ];
        count[s] += 1;
        for j in 0..3 {
            sums[s][j] += v[j];
            sketches[s][j].add(v[j]);
        }
        for (j, x) in points[i * d..(i + 1) * d].iter().enumerate() {
            feature_sum[s * d + j] += f64::from(*x);
        }
        dist[s] += f64::from(n.best_dist).sqrt();
        inertia[s] += f64::from(n.best_dist);
    }
    (0..k)
        .map(|s| pb::SegmentPartial {
            count: count[s],
            rfm_sum: sums[s].to_vec(),
            rfm_sketch: sketches[s].iter().map(Sketch::to_proto).collect(),
            distance_sum: dist[s],
            inertia: inertia[s],
            feature_sum: feature_sum[s * d..(s + 1) * d].to_vec(),
        })
        .collect()
}

/// The shard's `size` users with the smallest `hash(seed, user)`: a sample whose
/// union over shards, cut to the smallest keys, is the same however shards are placed.
fn sample_points(
    rfm: &ShardRfm,
    nearest: &[Nearest],
    points: &Resident,
    backend: &dyn Backend,
    seed: u64,
    size: usize,
    d: usize,
) -> Result<Vec<pb::SamplePoint>, WorkerError> {
    let mut keyed: Vec<(u64, u32)> = rfm
        .users
        .iter()
        .enumerate()
        .map(|(i, u)| (hash::key_str(seed, u), i as u32))
        .collect();
    let size = size.min(keyed.len());
    if size == 0 {
        return Ok(Vec::new());
    }
    if size < keyed.len() {
        keyed.select_nth_unstable(size - 1);
        keyed.truncate(size);
    }
    keyed.sort_unstable();
    let rows: Vec<u32> = keyed.iter().map(|(_, r)| *r).collect();
    let values = backend.download_rows(points, &rows)?;
    Ok(keyed
        .iter()
        .zip(values.chunks_exact(d))
        .map(|((key, row), v)| pb::SamplePoint {
            key: *key,
            label: nearest[*row as usize].best,
            values: v.to_vec(),
        })
        .collect())
}

/// Schema of `user_factors.parquet` / `item_factors.parquet` parts.
pub fn factors_schema(id: &str) -> Arc<Schema> {
    Arc::new(Schema::new(vec![
        Field::new(id, DataType::Utf8, false),
        Field::new(
            "factors",
            DataType::List(Arc::new(Field::new("item", DataType::Float32, false))),
            false,
        ),
    ]))
}

/// One part of a factors table: ids and their factor rows (row-major, `f` each).
fn factors_part(
    id: &str,
    ids: &[String],
    values: &[f32],
    f: usize,
) -> Result<Vec<u8>, WorkerError> {
    let file = format!("{}_factors.parquet", id.trim_end_matches("_id"));
    let offsets = arrow::buffer::OffsetBuffer::from_lengths(std::iter::repeat_n(f, ids.len()));
    let list = arrow::array::ListArray::try_new(
        Arc::new(Field::new("item", DataType::Float32, false)),
        offsets,
        Arc::new(Float32Array::from(values.to_vec())),
        None,
    )
    .map_err(|source| WorkerError::Arrow {
        file: file.clone(),
        source,
    })?;
    let schema = factors_schema(id);
    let batch = RecordBatch::try_new(
        schema.clone(),
        vec![
            Arc::new(StringArray::from_iter_values(ids.iter())),
            Arc::new(list),
        ],
    )
    .map_err(|source| WorkerError::Arrow {
        file: file.clone(),
        source,
    })?;
    store::encode_parquet(schema, &[batch]).map_err(|source| WorkerError::Parquet { file, source })
}

/// Every item of a model's item factor `parts` (paths in its folder, as its
/// manifest lists them): ids and row-major factors, each row checked to have `f`
/// values, each id once.
async fn read_model_items(
    model: &store::Location,
    parts: &[String],
    f: usize,
) -> Result<(Vec<String>, Vec<f32>), WorkerError> {
    use arrow::array::AsArray;
    if parts.is_empty() {
        return Err(WorkerError::InvalidRequest(format!(
            "the manifest of {} lists no item_factors.parquet parts; is it the output folder of a job with features.als = true?",
            model.url()
        )));
    }
    let (mut ids, mut factors) = (Vec::new(), Vec::new());
    let mut seen = std::collections::HashSet::new();
    for part in parts {
        let at = model.child(part);
        let file = at.url();
        let bytes = at.get().await?;
        let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(bytes)
            .and_then(|b| b.build())
            .map_err(|source| WorkerError::Parquet {
                file: file.clone(),
                source,
            })?;
        for batch in reader {
            let batch = batch.map_err(|source| WorkerError::Arrow {
                file: file.clone(),
                source,
            })?;
            let (Some(id), Some(list)) = (
                batch
                    .column_by_name("item_id")
                    .and_then(|c| c.as_string_opt::<i32>()),
                batch
                    .column_by_name("factors")
                    .and_then(|c| c.as_list_opt::<i32>()),
            ) else {
                return Err(WorkerError::InvalidRequest(format!(
                    "{file}: not an item factors table (needs columns item_id: string, factors: list<float>)"
                )));
            };
            for r in 0..batch.num_rows() {
                let row = list.value(r);
                let values = row
                    .as_primitive_opt::<arrow::datatypes::Float32Type>()
                    .filter(|v| v.len() == f)
                    .ok_or_else(|| {
                        WorkerError::InvalidRequest(format!(
                            "{file}, row {r}: item `{}` has {} factors; the spec's als.factors is {f}",
                            id.value(r),
                            row.len()
                        ))
                    })?;
                if !seen.insert(id.value(r).to_string()) {
                    return Err(WorkerError::InvalidRequest(format!(
                        "{file}, row {r}: item `{}` appears twice in the model's item factors",
                        id.value(r)
                    )));
                }
                ids.push(id.value(r).to_string());
                factors.extend_from_slice(values.values());
            }
        }
    }
    Ok((ids, factors))
}

/// Schema of `recommendations.parquet` parts.
pub fn recommendations_schema() -> Arc<Schema> {
    Arc::new(Schema::new(vec![
        Field::new("user_id", DataType::Utf8, false),
        Field::new("rank", DataType::UInt32, false),
        Field::new("item_id", DataType::Utf8, false),
        Field::new("score", DataType::Float32, false),
    ]))
}

/// One part of `recommendations.parquet`: every filled slot, rank 1 first.
fn recommendations_part(
    users: &[String],
    top: &shoal_kernels::TopN,
    catalog: &als_job::Catalog,
) -> Result<(Vec<u8>, u64), WorkerError> {
    let file = "recommendations.parquet";
    let (mut user, mut rank, mut item, mut score) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (u, id) in users.iter().enumerate() {
        for r in 0..top.n {
            let i = top.items[u * top.n + r];
            if i == shoal_kernels::NO_ITEM {
                break;
            }
            user.push(id.as_str());
            rank.push(r as u32 + 1);
            item.push(catalog.ids[i as usize].as_str());
            score.push(top.scores[u * top.n + r]);
        }
    }
    let rows = user.len() as u64;
    let columns: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from(user)),
        Arc::new(UInt32Array::from(rank)),
        Arc::new(StringArray::from(item)),
        Arc::new(Float32Array::from(score)),
    ];
    let batch = RecordBatch::try_new(recommendations_schema(), columns).map_err(|source| {
        WorkerError::Arrow {
            file: file.into(),
            source,
        }
    })?;
    let bytes = store::encode_parquet(recommendations_schema(), &[batch]).map_err(|source| {
        WorkerError::Parquet {
            file: file.into(),
            source,
        }
    })?;
    Ok((bytes, rows))
}

/// Schema of `assignments.parquet` parts.
pub fn assignments_schema() -> Arc<Schema> {
    Arc::new(Schema::new(vec![
        Field::new("user_id", DataType::Utf8, false),
        Field::new("segment", DataType::UInt32, false),
        Field::new("distance", DataType::Float32, false),
        Field::new("second_segment", DataType::UInt32, true),
        Field::new("second_distance", DataType::Float32, true),
        // null for a cold-start user (no interactions)
        Field::new("recency_days", DataType::Float64, true),
        Field::new("frequency", DataType::UInt64, true),
        Field::new("monetary", DataType::Float64, true),
        // assigned from the features.extra table alone (a fold-in's users
        // without interactions): distances are over that block only
        Field::new("cold_start", DataType::Boolean, false),
    ]))
}

/// The assignments part of a shard: its users (RFM from `rfm`, results
/// `nearest`), then its cold-start users (`cold_users`, results `cold`).
fn assignments_parquet(
    rfm: &ShardRfm,
    nearest: &[Nearest],
    k: usize,
    cold_users: &[&str],
    cold: &[Nearest],
) -> Result<Vec<u8>, WorkerError> {
    let second = |n: &Nearest| (k > 1 && n.second != NO_SECOND).then_some(n.second);
    let all = || nearest.iter().chain(cold);
    fn none<T>(n: usize) -> impl Iterator<Item = Option<T>> {
        std::iter::repeat_with(|| None).take(n)
    }
    let columns: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from_iter_values(
            rfm.users
                .iter()
                .map(String::as_str)
                .chain(cold_users.iter().copied()),
        )),
        Arc::new(UInt32Array::from_iter_values(all().map(|n| n.best))),
        Arc::new(Float32Array::from_iter_values(
            all().map(|n| n.best_dist.sqrt()),
        )),
        Arc::new(UInt32Array::from_iter(all().map(second))),
        Arc::new(Float32Array::from_iter(
            all().map(|n| second(n).map(|_| n.second_dist.sqrt())),
        )),
        Arc::new(Float64Array::from_iter(
            rfm.recency_days
                .iter()
                .map(|&v| Some(v))
                .chain(none(cold.len())),
        )),
        Arc::new(UInt64Array::from_iter(
            rfm.frequency
                .iter()
                .map(|&v| Some(v))
                .chain(none(cold.len())),
        )),
        Arc::new(Float64Array::from_iter(
            rfm.monetary
                .iter()
                .map(|&v| Some(v))
                .chain(none(cold.len())),
        )),
        Arc::new(arrow::array::BooleanArray::from_iter(
            std::iter::repeat_n(Some(false), nearest.len())
                .chain(std::iter::repeat_n(Some(true), cold.len())),
        )),
    ];
    let batch = RecordBatch::try_new(assignments_schema(), columns).map_err(|source| {
        WorkerError::Arrow {
            file: "assignments.parquet".into(),
            source,
        }
    })?;
    store::encode_parquet(assignments_schema(), &[batch]).map_err(|source| WorkerError::Parquet {
        file: "assignments.parquet".into(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn near(d: &[f32]) -> Vec<Nearest> {
        d.iter()
            .map(|&best_dist| Nearest {
                best: 0,
                best_dist,
                second: 1,
                second_dist: best_dist + 1.0,
            })
            .collect()
    }

    #[test]
    fn farthest_breaks_ties_by_row() {
        let n = near(&[1.0, 5.0, 3.0, 5.0, 0.0]);
        assert_eq!(farthest(&n, 3), vec![1, 3, 2]);
        assert_eq!(farthest(&n, 10), vec![1, 3, 2, 0, 4]);
        assert!(farthest(&n, 0).is_empty());
    }
}
