//! The gRPC `WorkerService`: every step of a job, as the coordinator pushes it.
//! The worker keeps per-job state (its shards' users, RFM and resident points) and
//! nothing else; the coordinator decides what runs next.

use crate::ingest::IngestControl;
use crate::load::{self, DIMS, ShardRfm};
use crate::{WorkerError, ingest, staging};
use arrow::array::{ArrayRef, Float32Array, Float64Array, StringArray, UInt32Array, UInt64Array};
use arrow::datatypes::{DataType, Field, Schema};
use arrow::record_batch::RecordBatch;
use futures::StreamExt;
use shoal_kernels::{Backend, CpuBackend, NO_SECOND, Nearest, Resident};
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
    /// The backend this job runs on (its spec's `cluster.device`).
    backend: Arc<dyn Backend>,
    /// Fired by ReleaseJob; long steps check it between shards.
    cancel: CancellationToken,
}

type JobHandle = Arc<tokio::sync::Mutex<JobState>>;

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
}

impl WorkerServiceImpl {
    pub fn new(backend: Arc<dyn Backend>, ingest_parallelism: usize) -> Self {
        WorkerServiceImpl {
            backend,
            jobs: Arc::default(),
            runs: Arc::default(),
            ingest_parallelism: ingest_parallelism.max(1),
        }
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

    /// Number of jobs this worker holds state for.
    pub fn jobs_held(&self) -> usize {
        self.jobs.lock().expect("job map lock").len()
    }
}

fn check_dims(dims: u32, values: usize, what: &str) -> Result<usize, WorkerError> {
    let d = dims as usize;
    if d != DIMS {
        return Err(WorkerError::InvalidRequest(format!(
            "{what}: {d} dimensions, this worker's features have {DIMS}"
        )));
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
        let splits = req.splits;
        let work = move |run: Arc<JobRun>| async move {
            futures::stream::iter(splits)
                .map(|split| {
                    let (spec, staging, control) =
                        (spec.clone(), staging.clone(), run.control.clone());
                    // each split on its own task, so parsing runs on all cores
                    joined(
                        run.spawn(async move {
                            ingest::ingest_split_controlled(&spec, &split, &staging, &control).await
                        }),
                        "ingest task",
                    )
                })
                .buffer_unordered(parallelism)
                .collect::<Vec<_>>()
                .await
                .into_iter()
                .collect::<Result<Vec<pb::SplitResult>, _>>()
        };
        async move {
            let mut results = self.tracked(&job, work).await?;
            results.sort_by_key(|r| r.split);
            let rows: u64 = results
                .iter()
                .filter_map(|r| r.counts.as_ref())
                .map(|c| c.read)
                .sum();
            info!(splits = results.len(), rows, "ingested");
            Ok(Response::new(pb::IngestResponse { splits: results }))
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
            for &shard in &req.shards {
                stop_if_cancelled(&cancel, &job)?;
                let batches = staging::read_shard(&staging, shard).await?;
                let reference = req.reference_time_ms;
                let (rfm, feats) = run
                    .tasks
                    .spawn_blocking(move || {
                        let rfm = load::aggregate(&batches, reference)?;
                        let feats = rfm.log_features();
                        Ok::<_, WorkerError>((rfm, feats))
                    })
                    .await
                    .map_err(|e| WorkerError::InvalidRequest(format!("load panicked: {e}")))??;
                stats.push(pb::ShardStats {
                    shard,
                    users: rfm.len() as u64,
                    moments: load::moments(&feats, DIMS),
                });
                loaded.insert(
                    shard,
                    Shard {
                        rfm,
                        log_features: feats,
                        points: None,
                        costs: Vec::new(),
                        nearest: Vec::new(),
                    },
                );
            }
            let users: u64 = stats.iter().map(|s| s.users).sum();
            info!(shards = req.shards.len(), users, "loaded");
            // A reload replaces what the worker held for the job; a job released
            // meanwhile keeps nothing (same lock order as ReleaseJob: runs, jobs).
            let handle = Arc::new(tokio::sync::Mutex::new(JobState {
                shards: loaded,
                backend,
                cancel: cancel.clone(),
            }));
            let runs = runs.lock().expect("runs lock");
            stop_if_cancelled(&cancel, &job)?;
            jobs.lock()
                .expect("job map lock")
                .insert(job.clone(), handle);
            drop(runs);
            Ok(pb::LoadShardsResponse {
                shards: stats,
                dims: DIMS as u32,
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
        self.with_job(&req.job_id, move |job, backend| {
            for shard in job.shards.values_mut() {
                stop_if_cancelled(&job.cancel, &job_id)?;
                let scaled: Vec<f32> = shard
                    .log_features
                    .chunks_exact(DIMS)
                    .flat_map(|row| {
                        row.iter()
                            .enumerate()
                            .map(|(j, x)| ((x - req.mean[j]) / req.scale[j]) as f32)
                    })
                    .collect();
                shard.points = Some(backend.upload(&scaled, DIMS)?);
                shard.costs = vec![f32::INFINITY; shard.rfm.len()];
                shard.nearest = vec![Nearest::default(); shard.rfm.len()];
            }
            Ok(())
        })
        .await?;
        Ok(Response::new(pb::StandardizeResponse {}))
    }

    async fn get_points(
        &self,
        req: Request<pb::GetPointsRequest>,
    ) -> Result<Response<pb::GetPointsResponse>, Status> {
        let req = req.into_inner();
        let job_id = req.job_id.clone();
        let values = self
            .with_job(&req.job_id, move |job, backend| {
                let mut values = Vec::with_capacity(req.points.len() * DIMS);
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
                Ok(values)
            })
            .await?;
        Ok(Response::new(pb::GetPointsResponse {
            dims: DIMS as u32,
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
                    for (row, v) in rows.iter().zip(values.chunks_exact(DIMS)) {
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
                let mut out = Vec::new();
                for (&id, shard) in job.shards.iter_mut() {
                    stop_if_cancelled(&job.cancel, &job_id)?;
                    if shard.rfm.is_empty() {
                        out.push(pb::ShardPartial {
                            shard: id,
                            sums: vec![0.0; k * DIMS],
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
                        .zip(values.chunks_exact(DIMS))
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
        let (finals, files) = {
            let req = req.clone();
            self.with_job(&job_id.clone(), move |job, backend| {
                let mut finals = Vec::new();
                let mut files = Vec::new();
                for (&id, shard) in job.shards.iter_mut() {
                    stop_if_cancelled(&job.cancel, &job_id)?;
                    if shard.rfm.is_empty() {
                        finals.push(pb::ShardFinal {
                            shard: id,
                            segments: empty_segments(k),
                            sample: Vec::new(),
                            file: None,
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
                    let segments = segment_partials(&shard.rfm, &scaled, &shard.nearest, k);
                    let sample = sample_points(
                        &shard.rfm,
                        &shard.nearest,
                        points,
                        backend,
                        req.seed,
                        req.sample_size as usize,
                    )?;
                    let bytes = assignments_parquet(&shard.rfm, &shard.nearest, k)?;
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
                            rows: shard.rfm.len() as u64,
                            bytes: bytes.len() as u64,
                        }),
                    });
                    files.push((rel, bytes));
                }
                Ok((finals, files))
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
        Ok(Response::new(pb::FinalizeResponse { shards: finals }))
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

fn empty_segments(k: usize) -> Vec<pb::SegmentPartial> {
    (0..k)
        .map(|_| pb::SegmentPartial {
            count: 0,
            rfm_sum: vec![0.0; 3],
            rfm_sketch: vec![Sketch::default().to_proto(); 3],
            distance_sum: 0.0,
            inertia: 0.0,
            feature_sum: vec![0.0; DIMS],
        })
        .collect()
}

fn segment_partials(
    rfm: &ShardRfm,
    points: &[f32],
    nearest: &[Nearest],
    k: usize,
) -> Vec<pb::SegmentPartial> {
    let mut feature_sum = vec![0.0f64; k * DIMS];
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
        for (j, x) in points[i * DIMS..(i + 1) * DIMS].iter().enumerate() {
            feature_sum[s * DIMS + j] += f64::from(*x);
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
            feature_sum: feature_sum[s * DIMS..(s + 1) * DIMS].to_vec(),
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
        .zip(values.chunks_exact(DIMS))
        .map(|((key, row), v)| pb::SamplePoint {
            key: *key,
            label: nearest[*row as usize].best,
            values: v.to_vec(),
        })
        .collect())
}

/// Schema of `assignments.parquet` parts.
pub fn assignments_schema() -> Arc<Schema> {
    Arc::new(Schema::new(vec![
        Field::new("user_id", DataType::Utf8, false),
        Field::new("segment", DataType::UInt32, false),
        Field::new("distance", DataType::Float32, false),
        Field::new("second_segment", DataType::UInt32, true),
        Field::new("second_distance", DataType::Float32, true),
        Field::new("recency_days", DataType::Float64, false),
        Field::new("frequency", DataType::UInt64, false),
        Field::new("monetary", DataType::Float64, false),
    ]))
}

fn assignments_parquet(
    rfm: &ShardRfm,
    nearest: &[Nearest],
    k: usize,
) -> Result<Vec<u8>, WorkerError> {
    let second = |n: &Nearest| (k > 1 && n.second != NO_SECOND).then_some(n.second);
    let columns: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from_iter_values(rfm.users.iter())),
        Arc::new(UInt32Array::from_iter_values(
            nearest.iter().map(|n| n.best),
        )),
        Arc::new(Float32Array::from_iter_values(
            nearest.iter().map(|n| n.best_dist.sqrt()),
        )),
        Arc::new(UInt32Array::from_iter(nearest.iter().map(second))),
        Arc::new(Float32Array::from_iter(
            nearest
                .iter()
                .map(|n| second(n).map(|_| n.second_dist.sqrt())),
        )),
        Arc::new(Float64Array::from(rfm.recency_days.clone())),
        Arc::new(UInt64Array::from(rfm.frequency.clone())),
        Arc::new(Float64Array::from(rfm.monetary.clone())),
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
