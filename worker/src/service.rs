//! The gRPC `WorkerService`: every step of a job, as the coordinator pushes it.
//! The handlers parse the request, run the step ([`crate::steps`]) as a task of
//! the job, and answer; the worker's per-job state is in [`crate::job`]. The
//! coordinator decides what runs next.

use crate::flight::{Peers, Shelf};
use crate::job::{JobHandle, JobRun, JobState, Runs, joined, stop_if_cancelled};
use crate::staging::checkpoint;
use crate::steps::als::Side;
use crate::steps::als_job::{AlsJob, Catalog, OwnedShard, Resume};
use crate::steps::audience;
use crate::steps::catalog::{self, Source};
use crate::steps::finalize::{self, Part};
use crate::steps::kmeans::{self, check_dims};
use crate::steps::load::{self, DIMS};
use crate::steps::previous;
use crate::{WorkerError, extra, ingest};
use futures::{StreamExt, TryStreamExt};
use shoal_kernels::{Backend, CpuBackend};
use shoal_net::auth::WithToken;
use shoal_proto::pb;
use shoal_proto::pb::worker_service_server::WorkerService;
use shoal_spec::JobSpec;
use shoal_spec::spec::Device;
use shoal_store as store;
use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tonic::{Request, Response, Status};
use tracing::{Instrument, debug, info, info_span, warn};

/// How long ReleaseJob waits for the job's running tasks to stop.
const RELEASE_WAIT: Duration = Duration::from_secs(10);
/// Released jobs remembered, so that late requests for them are refused.
const RELEASED_KEPT: usize = 1024;
/// Output parts made but not yet written, at most (finalize waits for the writer).
const PARTS_IN_FLIGHT: usize = 2;
/// Checkpoint objects written (or read) at once.
const CHECKPOINT_WRITES: usize = 4;
/// Shards of the other side's factor rows an ALS half-step fetches at once.
const FETCHES_AT_ONCE: usize = 2;

/// The worker's service state.
#[derive(Clone)]
pub struct WorkerServiceImpl {
    backend: Arc<dyn Backend>,
    jobs: Arc<Mutex<HashMap<String, JobHandle>>>,
    runs: Arc<Mutex<Runs>>,
    /// Splits read, and shards loaded, at once by one call.
    parallelism: usize,
    /// What this worker serves over Arrow Flight.
    shelf: Shelf,
    /// Other workers' Flight services.
    peers: Peers,
    /// Bytes this worker may use for jobs.
    memory_limit: u64,
}

impl WorkerServiceImpl {
    pub fn new(backend: Arc<dyn Backend>, parallelism: usize) -> Self {
        let shelf = Shelf::default();
        WorkerServiceImpl {
            backend,
            jobs: Arc::default(),
            runs: Arc::default(),
            parallelism: parallelism.max(1),
            peers: Peers::new(shelf.clone(), WithToken::new(None).expect("no token"), None),
            shelf,
            memory_limit: u64::MAX,
        }
    }

    /// Sets the memory this worker may use: shards estimated to need more are
    /// refused at load.
    pub fn with_memory_limit(mut self, bytes: u64) -> Self {
        self.memory_limit = bytes;
        self
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

    /// Number of jobs this worker holds state for.
    pub fn jobs_held(&self) -> usize {
        self.jobs.lock().expect("job map lock").len()
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

    /// Runs `work` as a task of the job (see [`JobRun::spawn`]) for the
    /// coordinator's `attempt` (0: whichever runs); refused once the job has been
    /// released or a later attempt has begun. The first request of a later
    /// attempt cancels the earlier one's tasks and drops what it held: the new
    /// attempt loads its shards afresh.
    async fn tracked<T, Fut>(
        &self,
        job: &str,
        attempt: u32,
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
            let (run, superseded) = runs.enter(job, attempt)?;
            if superseded {
                info!(
                    job,
                    attempt, "a later attempt of the job began; the earlier one's work stops"
                );
                self.drop_held(job);
            }
            run.spawn(work(run.clone()).instrument(tracing::Span::current()))
        };
        joined(handle, "the step").await
    }

    /// Runs `f` on the job's state on a blocking thread (the work is CPU-bound),
    /// as a task of the job.
    async fn with_job<T, F>(&self, job: &str, attempt: u32, f: F) -> Result<T, WorkerError>
    where
        T: Send + 'static,
        F: FnOnce(&mut JobState, &dyn Backend) -> Result<T, WorkerError> + Send + 'static,
    {
        let handle = self.job_handle(job)?;
        let id = job.to_string();
        self.tracked(job, attempt, move |run| async move {
            let mut guard = handle.lock_owned().await;
            if attempt != 0 && guard.attempt != attempt {
                return Err(WorkerError::StaleAttempt {
                    job: id,
                    attempt,
                    current: guard.attempt,
                });
            }
            let backend = guard.backend.clone();
            run.blocking("the step", move || f(&mut guard, backend.as_ref()))
                .await
        })
        .await
    }

    /// [`Self::with_job`] for a step with large temporaries (load, ALS, scaling,
    /// finalize): afterwards the memory they used goes back to the system.
    async fn with_job_large<T, F>(&self, job: &str, attempt: u32, f: F) -> Result<T, WorkerError>
    where
        T: Send + 'static,
        F: FnOnce(&mut JobState, &dyn Backend) -> Result<T, WorkerError> + Send + 'static,
    {
        self.with_job(job, attempt, move |state, backend| {
            let out = f(state, backend);
            crate::memory::release_free_memory();
            out
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
    async fn catalog(&self, job: &str, attempt: u32) -> Result<Option<Arc<Catalog>>, WorkerError> {
        let source = self
            .with_job(job, attempt, {
                let job = job.to_string();
                move |state, _| {
                    Ok(match &state.als {
                        Some(a) if a.top_n > 0 || a.holdout > 0.0 => match &a.catalog {
                            Some(c) => Source::Model(c.clone()),
                            None => {
                                let (owners, version) = a.catalog_source(&job)?;
                                Source::Shards(owners, version, a.f)
                            }
                        },
                        _ => Source::None,
                    })
                }
            })
            .await?;
        let (owners, version, f) = match source {
            Source::None => return Ok(None),
            Source::Model(model) => return Ok(Some(model)),
            Source::Shards(owners, version, f) => (owners, version, f),
        };
        let (peers, job2) = (self.peers.clone(), job.to_string());
        let catalog = self
            .tracked(job, attempt, move |_| async move {
                catalog::fetch(&peers, &job2, &owners, version, f).await
            })
            .await?;
        Ok(Some(Arc::new(catalog)))
    }
}

impl WorkerServiceImpl {
    /// Marks `job` released: its tasks are cancelled (and refused from now on),
    /// its state and what the shelf serves of it dropped. Returns its record
    /// (to wait on its tasks) and whether it held state here.
    fn release(&self, job: &str) -> (Arc<JobRun>, bool) {
        let mut runs = self.runs.lock().expect("runs lock");
        let run = match runs.released.get(job) {
            Some(run) => run.clone(),
            None => {
                let run = runs
                    .live
                    .remove(job)
                    .unwrap_or_else(|| Arc::new(JobRun::new(job, 0)));
                runs.released.insert(job.to_string(), run.clone());
                runs.order.push_back(job.to_string());
                while runs.order.len() > RELEASED_KEPT {
                    if let Some(old) = runs.order.pop_front()
                        && let Some(old) = runs.released.remove(&old)
                    {
                        runs.forget(&old);
                    }
                }
                run
            }
        };
        run.control.cancel.cancel();
        run.tasks.close();
        let removed = self.drop_held(job);
        (run, removed)
    }

    /// Drops what the worker holds of `job` (its state, what the shelf serves of
    /// it); whether it held state. Called under the runs lock (lock order: runs,
    /// then jobs).
    fn drop_held(&self, job: &str) -> bool {
        self.shelf.drop_job(job);
        self.jobs
            .lock()
            .expect("job map lock")
            .remove(job)
            .is_some()
    }

    /// Drops the work of every job the coordinator no longer runs: those not in
    /// `running` whose work began before `asked` (the heartbeat that brought the
    /// list was sent then; a job begun since may be too new for it). Returns
    /// the jobs dropped.
    pub fn keep_only(&self, running: &[String], asked: Instant) -> Vec<String> {
        let stale: Vec<String> = self
            .runs
            .lock()
            .expect("runs lock")
            .live
            .iter()
            .filter(|(job, run)| run.created < asked && !running.contains(job))
            .map(|(job, _)| job.clone())
            .collect();
        for job in &stale {
            self.release(job);
            info!(job = %job, "dropped the work of a job its coordinator no longer runs");
        }
        stale
    }
}

/// ALS checkpoints ([`crate::staging::checkpoint`]).
impl WorkerServiceImpl {
    /// The job's factors per row, and the shards of each side this worker owns
    /// in its ALS.
    async fn als_shards(
        &self,
        job: &str,
        attempt: u32,
    ) -> Result<(usize, Vec<(Side, u32)>), WorkerError> {
        let id = job.to_string();
        self.with_job(job, attempt, move |state, _| {
            let a = state.als(&id)?;
            let owned = a
                .users
                .keys()
                .map(|&s| (Side::Users, s))
                .chain(a.items.keys().map(|&s| (Side::Items, s)))
                .collect();
            Ok((a.f, owned))
        })
        .await
    }

    /// Writes the factors of every shard this worker owns, as published at
    /// `version` (both sides), into the checkpoint folder `folder`.
    async fn write_checkpoint(
        &self,
        job: &str,
        attempt: u32,
        folder: &str,
        version: u32,
    ) -> Result<(), WorkerError> {
        let folder = store::resolve(folder)?;
        let (_, owned) = self.als_shards(job, attempt).await?;
        let (shelf, id) = (self.shelf.clone(), job.to_string());
        let started = Instant::now();
        let shards = owned.len();
        self.tracked(job, attempt, move |_| async move {
            futures::stream::iter(owned)
                .map(|(side, shard)| {
                    let (shelf, folder, id) = (shelf.clone(), folder.clone(), id.clone());
                    async move {
                        let entry = shelf
                            .get(&id, side, shard)
                            .and_then(|e| Some((e.keys, e.factors?)));
                        let Some((keys, (have, f, values))) = entry else {
                            return Err(WorkerError::UnknownShard { job: id, shard });
                        };
                        if have != version {
                            return Err(WorkerError::StaleFactors {
                                what: format!("{} factors of job {id} (checkpoint)", side.as_str()),
                                have,
                                wanted: version,
                            });
                        }
                        checkpoint::write(&folder, side, shard, &keys, f, &values).await
                    }
                })
                .buffer_unordered(CHECKPOINT_WRITES)
                .try_collect::<Vec<()>>()
                .await
        })
        .await?;
        info!(
            version,
            shards,
            ms = started.elapsed().as_millis() as u64,
            "ALS checkpoint written"
        );
        Ok(())
    }

    /// The factors a link resumes from: none for iteration 0, else every owned
    /// shard's from the checkpoint folder the request names.
    async fn read_checkpoint(
        &self,
        job: &str,
        attempt: u32,
        req: &pb::AlsLinkRequest,
    ) -> Result<Resume, WorkerError> {
        let iteration = req.resume_iteration;
        if iteration == 0 {
            return Ok(Resume::default());
        }
        let folder = store::resolve(&req.checkpoint)?;
        let (f, owned) = self.als_shards(job, attempt).await?;
        let (shelf, id) = (self.shelf.clone(), job.to_string());
        let factors = self
            .tracked(job, attempt, move |_| async move {
                futures::stream::iter(owned)
                    .map(|(side, shard)| {
                        let (shelf, folder, id) = (shelf.clone(), folder.clone(), id.clone());
                        async move {
                            let keys = shelf
                                .get(&id, side, shard)
                                .ok_or_else(|| WorkerError::UnknownShard {
                                    job: id.clone(),
                                    shard,
                                })?
                                .keys;
                            let values = checkpoint::read(&folder, side, shard, &keys, f).await?;
                            Ok::<_, WorkerError>(((side, shard), values))
                        }
                    })
                    .buffer_unordered(CHECKPOINT_WRITES)
                    .try_collect::<HashMap<_, _>>()
                    .await
            })
            .await?;
        Ok(Resume { iteration, factors })
    }
}

fn parse_context(
    ctx: Option<&pb::JobContext>,
) -> Result<(String, JobSpec, store::Location), WorkerError> {
    let ctx = ctx.ok_or_else(|| WorkerError::InvalidRequest("missing job context".into()))?;
    let spec = JobSpec::parse(&ctx.spec_toml)?;
    let staging = store::resolve(&ctx.staging)?;
    Ok((ctx.job_id.clone(), spec, staging))
}

/// `k` centroids of `dims` values each, as a request sends them.
fn centroid_count(k: u32, dims: u32, values: usize) -> Result<usize, WorkerError> {
    let n = check_dims(dims, values, "centroids")?;
    if n != k as usize || n == 0 {
        return Err(WorkerError::InvalidRequest(format!(
            "k = {k} but {n} centroids were sent"
        )));
    }
    Ok(n)
}

#[tonic::async_trait]
impl WorkerService for WorkerServiceImpl {
    async fn ingest(
        &self,
        req: Request<pb::IngestRequest>,
    ) -> Result<Response<pb::IngestResponse>, Status> {
        let req = req.into_inner();
        let attempt = req.attempt;
        let (job, spec, staging) = parse_context(req.job.as_ref())?;
        let span = info_span!("ingest", job = %job, attempt = req.attempt, phase = "ingest");
        let spec = Arc::new(spec);
        let staging = Arc::new(staging);
        let parallelism = self.parallelism;
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
            for done in self.tracked(&job, attempt, work).await? {
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
            Ok(pb::IngestResponse {
                splits: results,
                extra_splits: extra_results,
            })
        }
        .instrument(span)
        .await
        .map(Response::new)
        .map_err(|e: WorkerError| e.into())
    }

    async fn load_shards(
        &self,
        req: Request<pb::LoadShardsRequest>,
    ) -> Result<Response<pb::LoadShardsResponse>, Status> {
        let req = req.into_inner();
        let attempt = req.attempt;
        let (job, spec, staging) = parse_context(req.job.as_ref())?;
        let span = info_span!("load", job = %job, attempt = req.attempt, phase = "load");
        let (jobs, runs) = (self.jobs.clone(), self.runs.clone());
        let shelf = self.shelf.clone();
        let backend = self.backend_for(spec.cluster.device);
        let parallelism = self.parallelism;
        let job_id = job.clone();
        let limit = self.memory_limit;
        let work = move |run: Arc<JobRun>| async move {
            if req.memory_estimate_bytes > limit {
                return Err(WorkerError::OverBudget {
                    need_mib: req.memory_estimate_bytes >> 20,
                    limit_mib: limit >> 20,
                    detail: format!(
                        "{} user shards and {} item shards",
                        req.shards.len(),
                        req.item_shards.len()
                    ),
                });
            }
            let backend = backend?;
            info!(
                device = spec.cluster.device.as_str(),
                backend = backend.name(),
                "job backend"
            );
            let cancel = run.control.cancel.clone();
            let started = Instant::now();
            let spec = Arc::new(spec);
            let loaded = load::load_shards(
                spec.clone(),
                Arc::new(staging),
                &req,
                run.clone(),
                parallelism,
            )
            .await?;
            crate::memory::release_free_memory();
            let users: u64 = loaded.stats.iter().map(|s| s.users).sum();
            info!(
                shards = req.shards.len(),
                item_shards = loaded.item_stats.len(),
                users,
                seconds = started.elapsed().as_secs_f64(),
                "loaded"
            );
            // key lists to serve, published with the job's state (never for a job
            // released meanwhile, whose shelf entries would outlive it)
            let mut published = Vec::new();
            let mut item_names = BTreeMap::new();
            let als_job = spec.features.als.then(|| {
                let users: BTreeMap<u32, OwnedShard> = loaded
                    .user_pairs
                    .into_iter()
                    .map(|(s, (keys, pairs))| {
                        published.push((Side::Users, s, keys.clone(), None));
                        (s, OwnedShard::new(keys, pairs))
                    })
                    .collect();
                let items: BTreeMap<u32, OwnedShard> = loaded
                    .items
                    .into_iter()
                    .map(|(s, (names, keys, pairs))| {
                        published.push((Side::Items, s, keys.clone(), Some(names.ids.clone())));
                        item_names.insert(s, names);
                        (s, OwnedShard::new(keys, pairs))
                    })
                    .collect();
                AlsJob {
                    spec: spec.als.clone(),
                    f: spec.als.factors as usize,
                    seed: spec.segments.seed,
                    holdout: spec.evaluate.holdout,
                    shards: spec.cluster.shards,
                    users,
                    items,
                    linked: None,
                    top_n: spec.recommend.top_n as usize,
                    exclude_seen: spec.recommend.exclude_seen,
                    eval_k: spec.evaluate.k as usize,
                    catalog: None,
                }
            });
            // A reload replaces what the worker held for the job; a job released
            // meanwhile keeps nothing (same lock order as ReleaseJob: runs, jobs).
            let handle = Arc::new(tokio::sync::Mutex::new(JobState {
                attempt: run.attempt,
                spec: spec.clone(),
                shards: loaded.users,
                item_names,
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
            for (side, shard, keys, ids) in published {
                shelf.put_keys(&job, side, shard, keys, ids);
            }
            jobs.lock()
                .expect("job map lock")
                .insert(job.clone(), handle);
            drop(runs);
            Ok(pb::LoadShardsResponse {
                shards: loaded.stats,
                dims: DIMS as u32,
                item_shards: loaded.item_stats,
            })
        };
        self.tracked(&job_id, attempt, work)
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
        let attempt = req.attempt;
        let (id, job) = (req.job_id.clone(), req.job_id.clone());
        let (shards, dims) = self
            .with_job_large(&id, attempt, move |state, backend| {
                kmeans::standardize(state, &job, &req, backend)
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
        let attempt = 0; // whichever attempt holds the points
        let (id, job) = (req.job_id.clone(), req.job_id.clone());
        let (values, dims) = self
            .with_job(&id, attempt, move |state, backend| {
                Ok((kmeans::get_points(state, &job, &req, backend)?, state.dims))
            })
            .await?;
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
        let attempt = req.attempt;
        let k = check_dims(req.dims, req.new_centers.len(), "new centers")?;
        let (id, job) = (req.job_id.clone(), req.job_id.clone());
        let shards = self
            .with_job(&id, attempt, move |state, backend| {
                kmeans::init_costs(state, &job, &req, k, backend)
            })
            .await?;
        Ok(Response::new(pb::InitCostsResponse { shards }))
    }

    async fn init_sample(
        &self,
        req: Request<pb::InitSampleRequest>,
    ) -> Result<Response<pb::InitSampleResponse>, Status> {
        let req = req.into_inner();
        let attempt = req.attempt;
        let (id, job) = (req.job_id.clone(), req.job_id.clone());
        let points = self
            .with_job(&id, attempt, move |state, backend| {
                kmeans::init_sample(state, &job, &req, backend)
            })
            .await?;
        Ok(Response::new(pb::InitSampleResponse { points }))
    }

    async fn lloyd_step(
        &self,
        req: Request<pb::LloydStepRequest>,
    ) -> Result<Response<pb::LloydStepResponse>, Status> {
        let req = req.into_inner();
        let attempt = req.attempt;
        let (id, job) = (req.job_id.clone(), req.job_id.clone());
        let shards = self
            .with_job(&id, attempt, move |state, backend| {
                kmeans::lloyd(state, &job, &req, backend)
            })
            .await?;
        Ok(Response::new(pb::LloydStepResponse { shards }))
    }

    async fn sample_points(
        &self,
        req: Request<pb::SamplePointsRequest>,
    ) -> Result<Response<pb::SamplePointsResponse>, Status> {
        let req = req.into_inner();
        let attempt = req.attempt;
        let (id, job) = (req.job_id.clone(), req.job_id.clone());
        let points = self
            .with_job(&id, attempt, move |state, backend| {
                kmeans::sample(state, &job, &req, backend)
            })
            .await?;
        Ok(Response::new(pb::SamplePointsResponse { points }))
    }

    async fn previous_overlap(
        &self,
        req: Request<pb::PreviousRequest>,
    ) -> Result<Response<pb::PreviousResponse>, Status> {
        let req = req.into_inner();
        let attempt = req.attempt;
        let job = req.job_id.clone();
        let span = info_span!("previous", job = %job, attempt, phase = "finalize");
        async move {
            let folder = store::resolve(&req.folder).map_err(WorkerError::from)?;
            // every owned shard's ids (key -> row), to find the earlier customers
            let (shards, owned) = self
                .with_job(&job, attempt, |state, _| {
                    let owned: BTreeMap<u32, crate::ids::IdTable> = state
                        .shards
                        .iter()
                        .map(|(&s, shard)| (s, shard.ids.clone()))
                        .collect();
                    Ok((state.spec.cluster.shards, owned))
                })
                .await?;
            let req = Arc::new(req);
            let earlier = self
                .tracked(&job, attempt, {
                    let req = req.clone();
                    move |_| async move {
                        let list: Vec<u32> = owned.keys().copied().collect();
                        previous::read_earlier(&folder, &req, (&list, shards), |s, key, id| {
                            let ids = owned.get(&s)?;
                            ids.position(key).filter(|&p| ids.id(p as usize) == id)
                        })
                        .await
                    }
                })
                .await?;
            let job2 = job.clone();
            let shards = self
                .with_job(&job, attempt, move |state, backend| {
                    previous::overlap(state, &job2, &req, &earlier, backend)
                })
                .await?;
            Ok(pb::PreviousResponse { shards })
        }
        .instrument(span)
        .await
        .map(Response::new)
        .map_err(|e: WorkerError| e.into())
    }

    async fn finalize(
        &self,
        req: Request<pb::FinalizeRequest>,
    ) -> Result<Response<pb::FinalizeResponse>, Status> {
        let req = req.into_inner();
        let attempt = req.attempt;
        let k = centroid_count(req.k, req.dims, req.centroids.len())?;
        let output = store::resolve(&req.output).map_err(WorkerError::from)?;
        let span =
            info_span!("finalize", job = %req.job_id, attempt = req.attempt, phase = "finalize");
        let job = req.job_id.clone();
        async move {
            let catalog = self.catalog(&job, attempt).await?;
            let (spec, owned) = self
                .with_job(&job, attempt, |state, _| {
                    Ok((
                        state.spec.clone(),
                        state.shards.keys().copied().collect::<Vec<u32>>(),
                    ))
                })
                .await?;
            let audience = self
                .tracked(&job, attempt, move |_| async move {
                    audience::read(&spec, &owned).await
                })
                .await?
                .map(Arc::new);
            // Parts are written while the next ones are made.
            let (tx, mut rx) = mpsc::channel::<Part>(PARTS_IN_FLIGHT);
            let writer = self.tracked(&job, attempt, move |run| async move {
                let mut parts = 0usize;
                while let Some((rel, bytes)) = rx.recv().await {
                    stop_if_cancelled(&run.control.cancel, &run.control.job)?;
                    output.child(&rel).put(bytes.into()).await?;
                    parts += 1;
                }
                Ok(parts)
            });
            let job2 = job.clone();
            let work = self.with_job_large(&job, attempt, move |state, backend| {
                finalize::finalize(state, &job2, &req, k, (catalog, audience), backend, &tx)
            });
            let (done, written) = tokio::join!(work, writer);
            // the writer's error explains a finalize that stopped for lack of it
            let parts = written?;
            let done = done?;
            info!(shards = done.shards.len(), parts, "finalized");
            Ok(pb::FinalizeResponse {
                shards: done.shards,
                item_files: done.item_files,
                item_users: done.item_users,
                item_ids: done.item_ids,
                recommend_requested: done.requested,
                recommend_unknown: done.unknown,
            })
        }
        .instrument(span)
        .await
        .map(Response::new)
        .map_err(|e: WorkerError| e.into())
    }

    async fn als_link(
        &self,
        req: Request<pb::AlsLinkRequest>,
    ) -> Result<Response<pb::AlsLinkResponse>, Status> {
        let req = req.into_inner();
        let attempt = req.attempt;
        let job = req.job_id.clone();
        let span = info_span!("als_link", job = %job, attempt = req.attempt, phase = "als");
        async move {
            let (item_shards, user_shards, shards) = self
                .with_job(&job, attempt, {
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
            for (what, list) in [("owners", &req.owners), ("item owners", &req.item_owners)] {
                if list.len() != shards as usize {
                    return Err(WorkerError::InvalidRequest(format!(
                        "{} shard {what} for {shards} shards",
                        list.len()
                    )));
                }
            }
            if req.item_shard_sizes.len() != shards as usize {
                return Err(WorkerError::InvalidRequest(format!(
                    "{} item shard sizes for {shards} shards",
                    req.item_shard_sizes.len()
                )));
            }
            let wanted: Vec<(Side, u32, String)> = item_shards
                .iter()
                .map(|&s| (Side::Items, s, req.item_owners[s as usize].clone()))
                .chain(
                    user_shards
                        .iter()
                        .map(|&s| (Side::Users, s, req.owners[s as usize].clone())),
                )
                .collect();
            let (peers, job2) = (self.peers.clone(), job.clone());
            let lists = self
                .tracked(&job, attempt, move |_| async move {
                    futures::future::try_join_all(wanted.into_iter().map(|(side, shard, owner)| {
                        let (peers, job) = (peers.clone(), job2.clone());
                        async move {
                            let keys = peers.fetch_keys(&owner, &job, side, shard).await?;
                            Ok::<_, WorkerError>((side, shard, keys))
                        }
                    }))
                    .await
                })
                .await?;
            let mut item_lists = HashMap::new();
            let mut user_lists = HashMap::new();
            for (side, shard, keys) in lists {
                match side {
                    Side::Items => item_lists.insert(shard, keys),
                    Side::Users => user_lists.insert(shard, keys),
                };
            }
            let resume = self.read_checkpoint(&job, attempt, &req).await?;
            let shelf = self.shelf.clone();
            let grams = self
                .with_job_large(&job, attempt, {
                    let job = job.clone();
                    move |state, backend| {
                        state.als_mut(&job)?.link(
                            &job,
                            req.owners,
                            req.item_owners,
                            &req.item_shard_sizes,
                            &item_lists,
                            &user_lists,
                            backend,
                            &shelf,
                            resume,
                        )
                    }
                })
                .await?;
            info!(
                item_shards = grams.len(),
                resumed_at = req.resume_iteration,
                "ALS linked"
            );
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
        let attempt = req.attempt;
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
                .with_job(&job, attempt, {
                    let job = job.clone();
                    move |state, _| state.als(&job)?.fetch_plan(&job, side, iteration)
                })
                .await?;
            // The other side's rows, shard by shard, a few fetches at a time;
            // each part goes into the local copy as it arrives.
            let other = side.other();
            let plan = Arc::new(plan);
            let mut fetches = futures::stream::iter(0..plan.parts.len())
                .map(|part| {
                    let (peers, job2, plan) = (self.peers.clone(), job.clone(), plan.clone());
                    self.tracked(&job, attempt, move |_| async move {
                        let (shard, rows, _) = &plan.parts[part];
                        let owner = &plan.owners[*shard as usize];
                        let at = (other, *shard);
                        let values = peers
                            .fetch_rows(owner, &job2, at, plan.version, rows.clone())
                            .await?;
                        Ok((part, values))
                    })
                })
                .buffer_unordered(FETCHES_AT_ONCE);
            let mut rows = 0usize;
            while let Some(fetched) = fetches.next().await {
                let (part, values) = fetched?;
                rows += values.len();
                let (job2, plan) = (job.clone(), plan.clone());
                self.with_job(&job, attempt, move |state, backend| {
                    state
                        .als_mut(&job2)?
                        .write_fetched(&job2, &plan, part, values, backend)
                })
                .await?;
            }
            drop(fetches);
            let shelf = self.shelf.clone();
            let shards = self
                .with_job_large(&job, attempt, {
                    let job = job.clone();
                    move |state, backend| {
                        stop_if_cancelled(&state.cancel, &job)?;
                        state
                            .als_mut(&job)?
                            .step(&job, &plan, &req.gram, backend, &shelf)
                    }
                })
                .await?;
            debug!(
                shards = shards.len(),
                values_fetched = rows,
                "ALS half-step"
            );
            if side == Side::Items && !req.checkpoint.is_empty() {
                self.write_checkpoint(&job, attempt, &req.checkpoint, iteration + 1)
                    .await?;
            }
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
        let attempt = req.attempt;
        let job = req.job_id.clone();
        let span = info_span!("als_fold_in", job = %job, attempt = req.attempt, phase = "als");
        async move {
            let f = self
                .with_job(&job, attempt, {
                    let job = job.clone();
                    move |state, _| Ok(state.als(&job)?.f)
                })
                .await?;
            let model = store::resolve(&req.model)?;
            let parts = req.item_parts.clone();
            let catalog = self
                .tracked(&job, attempt, move |_| async move {
                    catalog::read_model(&model, &parts, f).await
                })
                .await?;
            let items = catalog.len() as u64;
            let catalog = Arc::new(catalog);
            let shards = self
                .with_job_large(&job, attempt, {
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
        let (run, removed) = self.release(&job);
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The work of a job the coordinator no longer runs is dropped; that of a
    /// job it runs, or of one begun after the heartbeat was sent, is kept.
    #[test]
    fn work_of_jobs_the_coordinator_forgot_is_dropped() {
        let service = WorkerServiceImpl::new(Arc::new(CpuBackend::new()), 1);
        let enter = |job: &str| {
            service.runs.lock().unwrap().enter(job, 1).unwrap();
        };
        enter("forgotten");
        enter("running");
        let asked = Instant::now();
        std::thread::sleep(Duration::from_millis(2));
        enter("new");
        let dropped = service.keep_only(&["running".to_string()], asked);
        assert_eq!(dropped, ["forgotten"]);
        let runs = service.runs.lock().unwrap();
        assert!(runs.released.contains_key("forgotten"));
        assert!(runs.live.contains_key("running") && runs.live.contains_key("new"));
    }
}
