//! One job, end to end, driven by the coordinator: plan, ingest, load, scale,
//! k-means|| initialisation, Lloyd rounds, finalize, write. The coordinator pushes
//! every step to the workers and merges their answers in shard order.

use crate::CoordinatorError;
use crate::model::Model;
use crate::output::{self, PhaseTimes, Report};
use crate::placement::{self, MemoryModel, Placement, Sizes};
use crate::state::{Progress, StateHandle, WorkerEntry};
use crate::{extra, kmeans};
use futures::future::try_join_all;
use parquet::arrow::async_reader::ParquetRecordBatchStreamBuilder;
use shoal_proto::auth::{AuthChannel, WithToken};
use shoal_proto::pb::worker_service_client::WorkerServiceClient;
use shoal_proto::pb::{self, PointRef};
use shoal_proto::spec::{Format, RFM_DIMS};
use shoal_proto::store::{self, InputObject};
use shoal_proto::tls;
use shoal_proto::{JobId, JobSpec, MAX_MESSAGE_BYTES, hash};
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, info_span, warn};

/// Parquet row groups are grouped into splits of about this many bytes.
const SPLIT_BYTES: u64 = 64 * 1024 * 1024;
/// k-means|| rounds (Bahmani et al. suggest a handful).
const INIT_ROUNDS: u32 = 5;
/// Weighted k-means++ restarts on the candidate set.
const INIT_STARTS: usize = 10;
/// Users in the silhouette sample.
const SILHOUETTE_SAMPLE: u32 = 10_000;
const ATTEMPT: u32 = 1;
/// How often a call in flight checks that its worker is still registered.
const LIVENESS_POLL: Duration = Duration::from_secs(1);

pub struct JobContext {
    pub id: JobId,
    pub spec: JobSpec,
    pub state: StateHandle,
    pub cancel: CancellationToken,
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
        phase = tracing::field::Empty
    );
    let crew = std::sync::Mutex::new(Vec::<Member>::new());
    let committing = AtomicBool::new(false);
    let mut work = Box::pin(drive(&ctx, &crew, &committing).instrument(span.clone()));
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
            info!(parent: &span, "job cancelled; releasing it on its workers");
            Err(CoordinatorError::Cancelled)
        }
    };
    // Workers forget the job and stop its work (all at once, each bounded); then
    // staging is removed, after the last write a worker could make into it.
    // A worker dropped for missed heartbeats is released in the background: the
    // job's end does not wait on it (should it wake, it gets the release then).
    let mut members = std::mem::take(&mut *crew.lock().expect("crew lock"));
    if let Ok(live) = ctx.state.workers().await {
        let (here, gone): (Vec<Member>, Vec<Member>) = members
            .into_iter()
            .partition(|m| live.iter().any(|w| w.id == m.worker.id));
        members = here;
        for m in gone {
            let (job, span) = (ctx.id.clone(), span.clone());
            tokio::spawn(async move { release(&m, &job, &span).await });
        }
    }
    let started = Instant::now();
    futures::future::join_all(members.iter().map(|m| release(m, &ctx.id, &span))).await;
    if !members.is_empty() {
        info!(
            parent: &span,
            workers = members.len(),
            ms = started.elapsed().as_millis() as u64,
            "job released on its workers"
        );
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

/// How long the coordinator waits for a worker to release a job (the worker
/// itself waits up to 10 s for the job's tasks to stop).
const RELEASE_TIMEOUT: Duration = Duration::from_secs(15);
/// How often the workers' ingest counters are read for the job's progress.
const INGEST_POLL: Duration = Duration::from_millis(500);

/// Releases the job on one worker (best effort: a worker that is gone forgets it
/// anyway); logs what did not go as planned.
async fn release(m: &Member, job: &JobId, span: &tracing::Span) {
    let mut c = m.client.clone();
    let req = pb::ReleaseJobRequest {
        job_id: job.to_string(),
    };
    match tokio::time::timeout(RELEASE_TIMEOUT, c.release_job(req)).await {
        Ok(Ok(r)) if r.get_ref().stopped => {}
        Ok(Ok(_)) => {
            warn!(
                parent: span,
                worker = %m.worker.id,
                "the worker still ran tasks of the job when it answered the release"
            )
        }
        Ok(Err(status)) => {
            warn!(
                parent: span,
                worker = %m.worker.id,
                error = %status.message(),
                "could not release the job on a worker"
            )
        }
        Err(_) => {
            warn!(
                parent: span,
                worker = %m.worker.id,
                "the worker did not answer the release within {} s",
                RELEASE_TIMEOUT.as_secs()
            )
        }
    }
}

#[derive(Clone)]
struct Member {
    worker: WorkerEntry,
    client: WorkerServiceClient<AuthChannel>,
    /// Where the worker's liveness is kept (its heartbeats).
    state: StateHandle,
}

impl Member {
    /// Calls the worker. A worker dropped for missed heartbeats (frozen, or its
    /// host gone without closing the connection) ends the call with an error
    /// naming it, instead of leaving the job waiting on an answer that never
    /// comes.
    async fn call<T, F, Fut>(&self, step: &'static str, f: F) -> Result<T, CoordinatorError>
    where
        F: FnOnce(WorkerServiceClient<AuthChannel>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let call = f(self.client.clone());
        let lost = async {
            loop {
                tokio::time::sleep(LIVENESS_POLL).await;
                if let Ok(live) = self.state.workers().await
                    && !live.iter().any(|w| w.id == self.worker.id)
                {
                    return;
                }
            }
        };
        tokio::select! {
            answer = call => answer
                .map(|r| r.into_inner())
                .map_err(|status| CoordinatorError::Worker {
                    worker: self.worker.id.to_string(),
                    address: self.worker.address.clone(),
                    step,
                    status,
                }),
            () = lost => Err(CoordinatorError::WorkerLost {
                worker: self.worker.id.to_string(),
                address: self.worker.address.clone(),
                step,
                timeout: self.state.config.worker_timeout,
            }),
        }
    }
}

async fn connect(
    worker: WorkerEntry,
    token: WithToken,
    ca: Option<&std::path::Path>,
    state: StateHandle,
) -> Result<Member, CoordinatorError> {
    let endpoint = tls::endpoint(&worker.address, ca)
        .map_err(|e| CoordinatorError::Protocol {
            worker: worker.id.to_string(),
            step: "connect",
            detail: e.to_string(),
        })?
        .connect_timeout(Duration::from_secs(10));
    let channel = endpoint
        .connect()
        .await
        .map_err(|source| CoordinatorError::Connect {
            worker: worker.id.to_string(),
            address: worker.address.clone(),
            source,
        })?;
    let client = WorkerServiceClient::with_interceptor(channel, token)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    Ok(Member {
        worker,
        client,
        state,
    })
}

async fn wait_for_workers(state: &StateHandle) -> Result<Vec<WorkerEntry>, CoordinatorError> {
    let deadline = Instant::now() + state.config.worker_wait;
    loop {
        let workers = state.workers().await?;
        if !workers.is_empty() {
            return Ok(workers);
        }
        if Instant::now() >= deadline {
            return Err(CoordinatorError::NoWorkers {
                seconds: state.config.worker_wait.as_secs(),
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

struct Driver<'a> {
    ctx: &'a JobContext,
    crew: Vec<Member>,
    shards: u32,
    /// Where the shards are, once ingest has sized them.
    placement: Option<Placement>,
}

impl Driver<'_> {
    fn progress(&self, p: Progress) {
        self.ctx.state.progress(&self.ctx.id, p);
    }

    fn phase(&self, phase: &'static str) {
        tracing::Span::current().record("phase", phase);
        info!(phase, "phase");
        self.progress(Progress {
            phase: Some(phase),
            ..Default::default()
        });
    }

    fn placement(&self) -> &Placement {
        self.placement
            .as_ref()
            .expect("shards are placed after ingest, before any step that uses them")
    }

    /// The member holding `shard` (user shard and item shard of that index).
    fn owner(&self, shard: u32) -> usize {
        self.placement().owner[shard as usize]
    }

    fn shards_of(&self, member: usize) -> Vec<u32> {
        self.placement().shards_of(member)
    }

    /// Calls every member concurrently; answers come back in member order.
    async fn all<T, F, Fut>(&self, step: &'static str, f: F) -> Result<Vec<T>, CoordinatorError>
    where
        F: Fn(usize, WorkerServiceClient<AuthChannel>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let f = &f;
        try_join_all(
            self.crew
                .iter()
                .enumerate()
                .map(|(i, m)| m.call(step, move |c| f(i, c))),
        )
        .await
    }

    fn job_id(&self) -> String {
        self.ctx.id.to_string()
    }
}

/// Reads the workers' ingest counters every [`INGEST_POLL`] and reports rows and
/// bytes read (and the share of the planned bytes) as the job's progress. Never
/// ends: it runs alongside the ingest step. Workers that do not answer in time
/// are left out of that round.
async fn watch_ingest(d: &Driver<'_>, bytes_total: u64) -> std::convert::Infallible {
    let mut last = (0u64, 0u64);
    loop {
        tokio::time::sleep(INGEST_POLL).await;
        let activity = futures::future::join_all(d.crew.iter().map(|m| {
            let mut c = m.client.clone();
            let req = pb::JobActivityRequest { job_id: d.job_id() };
            async move {
                match tokio::time::timeout(INGEST_POLL, c.get_job_activity(req)).await {
                    Ok(Ok(r)) => Some(r.into_inner()),
                    _ => None,
                }
            }
        }))
        .await;
        let rows: u64 = activity.iter().flatten().map(|a| a.rows_read).sum();
        let bytes: u64 = activity.iter().flatten().map(|a| a.bytes_read).sum();
        if (rows, bytes) != last {
            last = (rows, bytes);
            d.progress(Progress {
                rows_read: Some(rows),
                bytes_read: Some(bytes),
                phase_progress: (bytes_total > 0)
                    .then(|| (bytes as f64 / bytes_total as f64).min(1.0)),
                ..Default::default()
            });
        }
    }
}

async fn drive(
    ctx: &JobContext,
    crew_slot: &std::sync::Mutex<Vec<Member>>,
    committing: &AtomicBool,
) -> Result<(), CoordinatorError> {
    let spec = &ctx.spec;
    let started = Instant::now();
    let mut times = PhaseTimes::default();

    // ---- plan
    let t = Instant::now();
    ctx.state.progress(
        &ctx.id,
        Progress {
            phase: Some("plan"),
            ..Default::default()
        },
    );
    let output = store::resolve(&spec.output.path)?;
    // Checked before the output folder is touched (it must not be the model's).
    let model = match &spec.model {
        Some(m) => Some(Model::load(&m.path, spec, &output).await?),
        None => None,
    };
    if output.head().await?.is_some() {
        return Err(CoordinatorError::OutputIsFile { url: output.url() });
    }
    // The folder must not look complete while this job writes into it.
    output::clear_previous(&output).await?;
    let staging_url = spec.staging_for(&ctx.id);
    let staging = store::resolve(&staging_url)?;
    let inputs = store::list_inputs(&spec.input.interactions).await?;
    let splits = plan_splits(spec.input.format, &inputs).await?;
    let extra_inputs = match spec.features.extra() {
        Some(pattern) => {
            let found = match store::list_inputs(pattern).await {
                Err(shoal_proto::StoreError::NoInputs { .. }) => Vec::new(),
                other => other?,
            };
            if found.is_empty() {
                return Err(CoordinatorError::ExtraTable {
                    reason: format!(
                        "no object matches `{pattern}` (looked for a file, a folder and a glob)"
                    ),
                });
            }
            found
        }
        None => Vec::new(),
    };
    let extra_splits = plan_splits(None, &extra_inputs).await?;
    if let Some(pattern) = spec.recommend.users() {
        // checked here, before any work, though the workers read it at finalize
        match store::list_inputs(pattern).await {
            Err(shoal_proto::StoreError::NoInputs { .. }) => {
                return Err(CoordinatorError::Spec(shoal_proto::SpecError::Invalid {
                    field: "recommend.users",
                    message: format!(
                        "nothing matches `{pattern}` (a file, folder or glob of .txt lists or CSV / Parquet tables of ids)"
                    ),
                }));
            }
            other => {
                other?;
            }
        }
    }
    info!(
        objects = inputs.len(),
        splits = splits.len(),
        extra_splits = extra_splits.len(),
        "planned"
    );
    let workers = wait_for_workers(&ctx.state).await?;
    let token = WithToken::new(ctx.state.config.worker_token.as_deref()).map_err(|reason| {
        CoordinatorError::BadToken {
            which: "SHOAL_WORKER_TOKEN",
            reason,
        }
    })?;
    let ca = ctx.state.config.tls_ca.as_deref();
    let crew = try_join_all(
        workers
            .into_iter()
            .map(|w| connect(w, token.clone(), ca, ctx.state.clone())),
    )
    .await?;
    *crew_slot.lock().expect("crew lock") = crew.clone();
    let mut d = Driver {
        ctx,
        crew,
        shards: spec.cluster.shards,
        placement: None,
    };
    d.progress(Progress {
        workers: Some(d.crew.len() as u32),
        ..Default::default()
    });
    times.add("plan", t);

    // ---- ingest
    let t = Instant::now();
    d.phase("ingest");
    let job_ctx = pb::JobContext {
        job_id: d.job_id(),
        spec_toml: spec.to_toml(),
        staging: staging.url(),
    };
    let share = |splits: &[pb::Split]| -> Vec<Vec<pb::Split>> {
        (0..d.crew.len())
            .map(|m| {
                splits
                    .iter()
                    .filter(|s| s.index as usize % d.crew.len() == m)
                    .cloned()
                    .collect()
            })
            .collect()
    };
    let (per_member, extra_per_member) = (share(&splits), share(&extra_splits));
    let bytes_total: u64 = splits.iter().chain(&extra_splits).map(|s| s.size).sum();
    d.progress(Progress {
        bytes_total: Some(bytes_total),
        bytes_read: Some(0),
        rows_read: Some(0),
        ..Default::default()
    });
    let ingest = d.all("ingest", |m, mut c| {
        let req = pb::IngestRequest {
            job: Some(job_ctx.clone()),
            attempt: ATTEMPT,
            splits: per_member[m].clone(),
            extra_splits: extra_per_member[m].clone(),
        };
        async move { c.ingest(req).await }
    });
    let answers = tokio::select! {
        answers = ingest => answers?,
        never = watch_ingest(&d, bytes_total) => match never {},
    };
    let mut split_results = Vec::new();
    let mut extra_results = Vec::new();
    for a in answers {
        split_results.extend(a.splits);
        extra_results.extend(a.extra_splits);
    }
    split_results.sort_by_key(|s| s.split);
    extra_results.sort_by_key(|s| s.split);
    let rows = output::RowTally::from_splits(&split_results);
    d.progress(Progress {
        rows_read: Some(rows.read),
        bytes_read: Some(split_results.iter().map(|s| s.bytes_read).sum()),
        phase_progress: Some(1.0),
        ..Default::default()
    });
    if rows.read == 0 {
        return Err(CoordinatorError::EmptyInput {
            pattern: spec.input.interactions.clone(),
            objects: inputs.len(),
        });
    }
    output::check_id_forms(&split_results, &splits)?;
    if rows.kept == 0 {
        return Err(CoordinatorError::NothingKept {
            read: rows.read,
            dropped: rows.dropped_text(),
        });
    }
    let reference_ms = split_results
        .iter()
        .filter(|s| s.counts.as_ref().is_some_and(|c| c.kept > 0))
        .map(|s| s.max_time_ms)
        .max()
        .unwrap_or(0);
    info!(read = rows.read, kept = rows.kept, "ingested");
    // The extra table's columns, as its splits agree on them.
    let extra_columns = extra::agree(&extra_results, |i| {
        extra_splits
            .get(i as usize)
            .map_or_else(|| format!("split {i}"), |s| s.object.clone())
    })?;
    let extra_rows = extra::tally(&extra_results);
    if spec.features.extra().is_some() && extra_rows.kept == 0 {
        return Err(CoordinatorError::ExtraTable {
            reason: format!(
                "no row of the table is usable: read {}, dropped {}",
                extra_rows.read,
                extra_rows.dropped_text()
            ),
        });
    }
    if let Some(model) = &model {
        model.check_extra(&extra_columns)?;
    }
    let bytes_read = split_results
        .iter()
        .map(|s| s.bytes_read)
        .chain(extra_results.iter().map(|s| s.bytes_read))
        .sum();
    ctx.state
        .config
        .metrics
        .ingested(rows.read + extra_rows.read, bytes_read);
    // Sized from what was staged, the shards go where there is memory for them.
    let sizes = Sizes::from_splits(&split_results, d.shards);
    let memory = MemoryModel {
        factors: if spec.features.als {
            u64::from(spec.als.factors)
        } else {
            0
        },
        dims: u64::from(spec.als.factors) * u64::from(spec.features.als)
            + RFM_DIMS as u64
            + extra::dims(&extra_columns) as u64,
        extra: extra::dims(&extra_columns) as u64,
        parallel_loads: d
            .crew
            .iter()
            .map(|m| u64::from(m.worker.threads))
            .max()
            .unwrap_or(1),
    };
    let limits: Vec<u64> = d.crew.iter().map(|m| m.worker.memory_limit).collect();
    let names: Vec<String> = d.crew.iter().map(|m| m.worker.id.to_string()).collect();
    let placement = placement::place(&sizes, &limits, &names, &memory)?;
    d.placement = Some(placement);
    times.add("ingest", t);

    // ---- load
    let t = Instant::now();
    d.phase("load");
    let loaded = d
        .all("load", |m, mut c| {
            let req = pb::LoadShardsRequest {
                job: Some(job_ctx.clone()),
                attempt: ATTEMPT,
                shards: d.shards_of(m),
                reference_time_ms: reference_ms,
                item_shards: if spec.features.als && model.is_none() {
                    d.shards_of(m)
                } else {
                    Vec::new()
                },
                extra_columns: extra_columns.clone(),
                memory_estimate_bytes: d.placement().need[m],
            };
            async move { c.load_shards(req).await }
        })
        .await?;
    let dims = loaded.first().map(|l| l.dims as usize).unwrap_or(0);
    let mut stats: BTreeMap<u32, pb::ShardStats> = BTreeMap::new();
    let mut item_stats: Vec<pb::ItemShardStats> = Vec::new();
    for (m, l) in loaded.into_iter().enumerate() {
        item_stats.extend(l.item_shards);
        if l.dims as usize != dims {
            return Err(CoordinatorError::Protocol {
                worker: d.crew[m].worker.id.to_string(),
                step: "load",
                detail: format!("{} dimensions, others have {dims}", l.dims),
            });
        }
        for s in l.shards {
            stats.insert(s.shard, s);
        }
    }
    if stats.len() != d.shards as usize {
        return Err(CoordinatorError::Protocol {
            worker: "(all)".into(),
            step: "load",
            detail: format!("{} of {} shards reported", stats.len(), d.shards),
        });
    }
    let shard_users: Vec<u64> = stats.values().map(|s| s.users).collect();
    let users: u64 = shard_users.iter().sum();
    d.progress(Progress {
        users: Some(users),
        ..Default::default()
    });
    let k = model.as_ref().map_or(spec.segments.k as usize, |m| m.k);
    if model.is_none() && users < k as u64 {
        return Err(CoordinatorError::TooFewUsers {
            k: spec.segments.k,
            users,
        });
    }
    times.add("load", t);

    // ---- ALS
    let als = if spec.features.als {
        let t = Instant::now();
        d.phase("als");
        let facts = match &model {
            Some(model) => fold_in(&d, model, users).await?,
            None => {
                let item_stats =
                    in_shard_order(item_stats.into_iter(), d.shards, "load", |s| s.shard)?;
                run_als(&d, &stats, &item_stats, users).await?
            }
        };
        info!(
            items = facts.items,
            pairs = facts.pairs,
            loss = facts.loss_per_iteration.last().copied().unwrap_or(f64::NAN),
            "ALS done"
        );
        times.add("als", t);
        Some(facts)
    } else {
        None
    };

    // ---- scale: one reduce round
    let t = Instant::now();
    d.phase("scale");
    let moments: Vec<Vec<pb::Moments>> = stats.values().map(|s| s.moments.clone()).collect();
    let extra_dims = extra::dims(&extra_columns);
    let extra_moments: Vec<Vec<pb::Moments>> =
        stats.values().map(|s| s.extra_moments.clone()).collect();
    let (rfm_mean, rfm_scale, extra_mean, extra_scale) = match &model {
        // the model's scaling, so its centroids mean what they meant
        Some(model) => (
            model.rfm_mean.clone(),
            model.rfm_scale.clone(),
            model.extra_mean.clone(),
            model.extra_scale.clone(),
        ),
        None => {
            let (mean, scale, _) = kmeans::merge_moments(&moments, dims);
            let (extra_mean, extra_scale, _) = kmeans::merge_moments(&extra_moments, extra_dims);
            (mean, scale, extra_mean, extra_scale)
        }
    };
    let scaled = d
        .all("scale", |_, mut c| {
            let req = pb::StandardizeRequest {
                job_id: d.job_id(),
                attempt: ATTEMPT,
                mean: rfm_mean.clone(),
                scale: rfm_scale.clone(),
                extra_mean: extra_mean.clone(),
                extra_scale: extra_scale.clone(),
            };
            async move { c.standardize(req).await }
        })
        .await?;
    // With ALS the factor block (L2-normalised, times features.als_weight) comes
    // first; it is used as it is (mean 0, scale 1 in the report's terms). The
    // extra table's block comes after RFM.
    let factors = als.as_ref().map_or(0, |_| spec.als.factors as usize);
    let dims = factors + dims + extra_dims;
    if let Some(bad) = scaled.iter().find(|s| s.dims as usize != dims) {
        return Err(CoordinatorError::Protocol {
            worker: "(all)".into(),
            step: "scale",
            detail: format!("{} dimensions after scaling, expected {dims}", bad.dims),
        });
    }
    let scaled_stats = in_shard_order(
        scaled.into_iter().flat_map(|s| s.shards),
        d.shards,
        "scale",
        |s| s.shard,
    )?;
    let feature_moments: Vec<Vec<pb::Moments>> =
        scaled_stats.iter().map(|s| s.moments.clone()).collect();
    let factor_var = kmeans::merge_variances(&feature_moments, dims);
    let mean: Vec<f64> = std::iter::repeat_n(0.0, factors)
        .chain(rfm_mean)
        .chain(extra_mean)
        .collect();
    let scale: Vec<f64> = std::iter::repeat_n(1.0, factors)
        .chain(rfm_scale)
        .chain(extra_scale)
        .collect();
    let mut feature_names = spec.feature_names();
    feature_names.extend(extra::feature_names(&extra_columns));
    times.add("scale", t);

    let seed = spec.segments.seed;
    let (centroids, inertia_per_iteration, converged, reseeds, n_candidates) = if let Some(model) =
        &model
    {
        // Frozen centroids: nothing to fit.
        (model.centroids.clone(), Vec::new(), true, 0, 0)
    } else {
        // ---- init: k-means||
        let t = Instant::now();
        d.phase("init");
        let (candidates, n_candidates) = kmeans_parallel(&d, k, dims, seed, &shard_users).await?;
        let weights = candidate_weights(&d, &candidates, dims).await?;
        let mut centroids = kmeans::recluster(&candidates, dims, &weights, k, seed, INIT_STARTS);
        times.add("init", t);

        // ---- Lloyd rounds
        let t = Instant::now();
        d.phase("lloyd");
        // scikit-learn's tolerance: relative to the mean variance of the features,
        // which is 1 for every standardised RFM feature and 0 for a constant one; the
        // factor block's and the extra table's (whose missing values sit at the
        // mean) as measured.
        let mean_var = (0..dims)
            .map(|j| match j.checked_sub(factors) {
                Some(r) if r < RFM_DIMS && scale[j] == 1.0 => 0.0,
                Some(r) if r < RFM_DIMS => 1.0,
                _ => factor_var[j],
            })
            .sum::<f64>()
            / dims as f64;
        let tol = spec.segments.tol * if mean_var > 0.0 { mean_var } else { 1.0 };
        let mut inertia_per_iteration = Vec::new();
        let mut converged = false;
        let mut reseeds = 0usize;
        for round in 0..spec.segments.max_iter {
            let partials = d
                .all("lloyd", |m, mut c| {
                    let _ = m;
                    let req = pb::LloydStepRequest {
                        job_id: d.job_id(),
                        attempt: ATTEMPT,
                        round,
                        k: k as u32,
                        dims: dims as u32,
                        centroids: centroids.clone(),
                        far_points: k as u32,
                    };
                    async move { c.lloyd_step(req).await }
                })
                .await?;
            let partials = in_shard_order(
                partials.into_iter().flat_map(|p| p.shards),
                d.shards,
                "lloyd",
                |p| p.shard,
            )?;
            let r = kmeans::merge_round(&centroids, k, dims, &partials);
            inertia_per_iteration.push(r.inertia);
            reseeds += r.reseeded.len();
            centroids = r.centroids;
            d.progress(Progress {
                iteration: Some(round + 1),
                inertia: Some(r.inertia),
                phase_progress: Some(f64::from(round + 1) / f64::from(spec.segments.max_iter)),
                ..Default::default()
            });
            if r.reseeded.is_empty() && r.shift <= tol {
                converged = true;
                break;
            }
        }
        info!(
            iterations = inertia_per_iteration.len(),
            converged, "k-means done"
        );
        times.add("lloyd", t);
        (
            centroids,
            inertia_per_iteration,
            converged,
            reseeds,
            n_candidates,
        )
    };
    let iterations = inertia_per_iteration.len() as u32;

    // ---- finalize: segments ordered by monetary centroid, highest first
    let t = Instant::now();
    d.phase("finalize");
    let money = factors + RFM_DIMS - 1;
    let mut order: Vec<usize> = (0..k).collect();
    order.sort_by(|&a, &b| {
        centroids[b * dims + money]
            .total_cmp(&centroids[a * dims + money])
            .then(a.cmp(&b))
    });
    let centroids: Vec<f32> = order
        .iter()
        .flat_map(|&c| centroids[c * dims..(c + 1) * dims].to_vec())
        .collect();
    let finals = d
        .all("finalize", |_, mut c| {
            let req = pb::FinalizeRequest {
                job_id: d.job_id(),
                attempt: ATTEMPT,
                k: k as u32,
                dims: dims as u32,
                centroids: centroids.clone(),
                output: output.url(),
                sample_size: SILHOUETTE_SAMPLE,
                seed,
            };
            async move { c.finalize(req).await }
        })
        .await?;
    let mut item_files: Vec<pb::WrittenFile> = finals
        .iter()
        .flat_map(|f| f.item_files.iter().cloned())
        .collect();
    let item_counts = output::ItemCounts::merge(&finals, k)?;
    let audience = spec.recommend.users().map(|source| output::AudienceFacts {
        source: source.to_string(),
        requested: finals.iter().map(|f| f.recommend_requested).sum(),
        unknown: finals.iter().map(|f| f.recommend_unknown).sum(),
    });
    if let Some(model) = &model {
        // the item factors scored against belong to the outputs too
        item_files = output::copy_item_factors(model, &output).await?;
    }
    // the manifest lists them in one order whatever the number of workers
    item_files.sort_by(|a, b| a.path.cmp(&b.path));
    let finals = in_shard_order(
        finals.into_iter().flat_map(|f| f.shards),
        d.shards,
        "finalize",
        |f| f.shard,
    )?;
    let mut summary = output::summarize(
        &finals,
        &centroids,
        output::Layout {
            dims,
            rfm_at: factors,
            names: &feature_names,
            extra_at: (extra_dims > 0).then_some((factors + RFM_DIMS, spec.features.extra_weight)),
        },
        k,
        &mean,
        &scale,
        SILHOUETTE_SAMPLE as usize,
    );
    summary.add_top_items(&item_counts);
    times.add("finalize", t);

    // ---- write
    let t = Instant::now();
    d.phase("write");
    times.add("write", t);
    ctx.state.config.metrics.phases(&times);
    let mut report = Report::new(
        ctx,
        &rows,
        users,
        &feature_names,
        &mean,
        &scale,
        output::KmeansFacts {
            k,
            iterations,
            converged,
            inertia: summary.inertia,
            inertia_per_iteration,
            candidates: n_candidates,
            init_rounds: INIT_ROUNDS,
            reseeded_clusters: reseeds,
        },
        &summary,
        times,
        started,
        d.crew.len(),
        reference_ms,
    );
    report.extra = spec.features.extra().map(|table| {
        let mut facts = extra::ExtraFacts::new(
            table,
            &extra_columns,
            spec.features.extra_weight,
            extra_rows.clone(),
            &stats.values().cloned().collect::<Vec<_>>(),
        );
        if model.is_some() {
            facts.cold_start_users =
                Some(summary.segments.iter().map(|s| s.cold_start_users).sum());
        }
        facts
    });
    report.als = als.map(|mut facts| {
        facts.recommend_users = audience;
        if spec.evaluate.holdout > 0.0 {
            facts.evaluation = output::Evaluation::from_partials(
                spec.evaluate.k,
                finals.iter().filter_map(|f| f.ranking.as_ref()),
            );
        }
        facts
    });
    // From here a cancellation lets the write finish (see `run`).
    committing.store(true, Ordering::SeqCst);
    output::write_all(
        ctx,
        &output,
        &inputs,
        &finals,
        &item_files,
        &summary,
        &centroids,
        dims,
        report,
    )
    .await?;
    info!(output = %output.url(), seconds = started.elapsed().as_secs_f64(), "outputs written");
    Ok(())
}

/// Fold-in: every worker solves its users' factors against the model's item
/// factors.
async fn fold_in(
    d: &Driver<'_>,
    model: &Model,
    n_users: u64,
) -> Result<output::AlsFacts, CoordinatorError> {
    let answers = d
        .all("als", |_, mut c| {
            let req = pb::AlsFoldInRequest {
                job_id: d.job_id(),
                attempt: ATTEMPT,
                model: model.folder.url(),
                item_parts: model.item_parts(),
            };
            async move { c.als_fold_in(req).await }
        })
        .await?;
    let items = answers.first().map_or(0, |a| a.items);
    let shards = in_shard_order(
        answers.into_iter().flat_map(|a| a.shards),
        d.shards,
        "als",
        |s| s.shard,
    )?;
    Ok(output::AlsFacts {
        factors: d.ctx.spec.als.factors,
        iterations: 0,
        users: n_users,
        items,
        pairs: shards.iter().map(|s| s.pairs).sum(),
        held_out_pairs: 0,
        nonpositive_pairs: 0,
        loss_per_iteration: Vec::new(),
        seconds_per_iteration: Vec::new(),
        evaluation: None,
        model: Some(output::ModelFacts {
            path: model.folder.url(),
            job_id: model.manifest.job_id.clone(),
            unknown_item_pairs: shards.iter().map(|s| s.unknown_item_pairs).sum(),
        }),
        recommend_users: None,
    })
}

/// Sums per-shard Gram matrices in shard order (the answers are in shard order).
fn reduce_grams(
    parts: &[pb::GramPartial],
    f: usize,
    step: &'static str,
) -> Result<Vec<f64>, CoordinatorError> {
    let mut total = vec![0.0f64; f * f];
    for p in parts {
        if p.gram.len() != f * f {
            return Err(CoordinatorError::Protocol {
                worker: "(all)".into(),
                step,
                detail: format!(
                    "shard {}: a Gram matrix of {} values for {f} factors",
                    p.shard,
                    p.gram.len()
                ),
            });
        }
        for (t, v) in total.iter_mut().zip(&p.gram) {
            *t += v;
        }
    }
    Ok(total)
}

fn trace(gram: &[f64], f: usize) -> f64 {
    (0..f).map(|i| gram[i * f + i]).sum()
}

/// Distributed implicit ALS: link (id lists, confidences, initial factors), then
/// per iteration a user half-step and an item half-step, each given the other
/// side's Gram matrix reduced over its shards in shard order.
async fn run_als(
    d: &Driver<'_>,
    users: &BTreeMap<u32, pb::ShardStats>,
    items: &[pb::ItemShardStats],
    n_users: u64,
) -> Result<output::AlsFacts, CoordinatorError> {
    let spec = &d.ctx.spec.als;
    let f = spec.factors as usize;
    let owners: Vec<String> = (0..d.shards)
        .map(|s| d.crew[d.owner(s)].worker.address.clone())
        .collect();
    let linked = d
        .all("als", |_, mut c| {
            let req = pb::AlsLinkRequest {
                job_id: d.job_id(),
                attempt: ATTEMPT,
                owners: owners.clone(),
                item_owners: owners.clone(),
                item_shard_sizes: items.iter().map(|s| s.items).collect(),
            };
            async move { c.als_link(req).await }
        })
        .await?;
    let grams = in_shard_order(
        linked.into_iter().flat_map(|l| l.item_shards),
        d.shards,
        "als",
        |g| g.shard,
    )?;
    let mut yty = reduce_grams(&grams, f, "als")?;
    let n_items: u64 = items.iter().map(|s| s.items).sum();
    let pairs: u64 = items.iter().map(|s| s.pairs).sum();
    let confidence: f64 = items.iter().map(|s| s.confidence_sum).sum();
    let cells = confidence + n_users as f64 * n_items as f64 - pairs as f64;
    let lambda = spec.regularization;
    let mut losses = Vec::new();
    let mut seconds = Vec::new();
    for iteration in 0..spec.iterations {
        let started = Instant::now();
        let mut data_loss = 0.0;
        let mut traces = 0.0;
        for side in [pb::AlsSide::Users, pb::AlsSide::Items] {
            let gram = yty.clone();
            let answers = d
                .all("als", |_, mut c| {
                    let req = pb::AlsStepRequest {
                        job_id: d.job_id(),
                        attempt: ATTEMPT,
                        iteration,
                        side: side as i32,
                        gram: gram.clone(),
                    };
                    async move { c.als_step(req).await }
                })
                .await?;
            let parts = in_shard_order(
                answers.into_iter().flat_map(|a| a.shards),
                d.shards,
                "als",
                |g| g.shard,
            )?;
            yty = reduce_grams(&parts, f, "als")?;
            traces += trace(&yty, f);
            data_loss += parts.iter().map(|p| p.data_loss).sum::<f64>();
        }
        let loss = (data_loss + lambda * traces) / cells.max(1.0);
        losses.push(loss);
        seconds.push(started.elapsed().as_secs_f64());
        d.progress(Progress {
            iteration: Some(iteration + 1),
            phase_progress: Some(f64::from(iteration + 1) / f64::from(spec.iterations)),
            ..Default::default()
        });
        info!(iteration = iteration + 1, loss, "ALS iteration");
    }
    Ok(output::AlsFacts {
        factors: spec.factors,
        iterations: spec.iterations,
        users: n_users,
        items: n_items,
        pairs,
        held_out_pairs: users.values().map(|s| s.held_out).sum(),
        nonpositive_pairs: users.values().map(|s| s.nonpositive).sum(),
        loss_per_iteration: losses,
        seconds_per_iteration: seconds,
        evaluation: None,
        model: None,
        recommend_users: None,
    })
}

/// Puts per-shard answers in shard order, checking every shard answered once.
fn in_shard_order<T>(
    items: impl Iterator<Item = T>,
    shards: u32,
    step: &'static str,
    shard_of: impl Fn(&T) -> u32,
) -> Result<Vec<T>, CoordinatorError> {
    let mut by: BTreeMap<u32, T> = BTreeMap::new();
    for item in items {
        let s = shard_of(&item);
        if by.insert(s, item).is_some() {
            return Err(CoordinatorError::Protocol {
                worker: "(all)".into(),
                step,
                detail: format!("shard {s} answered twice"),
            });
        }
    }
    if by.len() != shards as usize {
        return Err(CoordinatorError::Protocol {
            worker: "(all)".into(),
            step,
            detail: format!("{} of {shards} shards answered", by.len()),
        });
    }
    Ok(by.into_values().collect())
}

/// Cuts the input objects into splits: one per CSV object (a gzip stream cannot be
/// split), Parquet row groups grouped into splits of about [`SPLIT_BYTES`].
/// Splits of the objects `inputs`, read as `format` (else as their names say).
async fn plan_splits(
    format: Option<Format>,
    inputs: &[InputObject],
) -> Result<Vec<pb::Split>, CoordinatorError> {
    let mut splits = Vec::new();
    for obj in inputs {
        let named = Format::from_name(&obj.url);
        let (format, gzip) = match (format, named) {
            (Some(f), Some((nf, gz))) if f == nf => (f, gz),
            (Some(f), _) => (f, obj.url.to_ascii_lowercase().ends_with(".gz")),
            (None, Some(x)) => x,
            (None, None) => {
                return Err(CoordinatorError::UnknownFormat {
                    object: obj.url.clone(),
                });
            }
        };
        match format {
            Format::Csv => splits.push(pb::Split {
                index: splits.len() as u32,
                object: obj.url.clone(),
                size: obj.size,
                format: "csv".into(),
                row_groups: Vec::new(),
                gzip,
            }),
            Format::Parquet => {
                let loc = store::resolve(&obj.url)?;
                let builder = ParquetRecordBatchStreamBuilder::new(store::ParquetSource::new(&loc))
                    .await
                    .map_err(|source| CoordinatorError::ParquetFooter {
                        object: obj.url.clone(),
                        source,
                    })?;
                let mut group: Vec<u32> = Vec::new();
                let mut bytes = 0u64;
                let groups = builder.metadata().row_groups();
                for (i, rg) in groups.iter().enumerate() {
                    group.push(i as u32);
                    bytes += rg.compressed_size().max(0) as u64;
                    if bytes >= SPLIT_BYTES || i + 1 == groups.len() {
                        splits.push(pb::Split {
                            index: splits.len() as u32,
                            object: obj.url.clone(),
                            size: bytes,
                            format: "parquet".into(),
                            row_groups: std::mem::take(&mut group),
                            gzip: false,
                        });
                        bytes = 0;
                    }
                }
            }
        }
    }
    Ok(splits)
}

/// k-means|| (Bahmani et al. 2012): a first point drawn uniformly, then
/// `INIT_ROUNDS` rounds that each sample every point with probability
/// min(1, l * cost / total cost), l = 2k. Returns the candidates (row-major).
async fn kmeans_parallel(
    d: &Driver<'_>,
    k: usize,
    dims: usize,
    seed: u64,
    shard_users: &[u64],
) -> Result<(Vec<f32>, usize), CoordinatorError> {
    let users: u64 = shard_users.iter().sum();
    // first center: the user at a seeded global position (shard order, then row)
    let mut pos = hash::key(seed, &[0x1417]) % users;
    let mut first = PointRef::default();
    for (s, &n) in shard_users.iter().enumerate() {
        if pos < n {
            first = PointRef {
                shard: s as u32,
                index: pos,
            };
            break;
        }
        pos -= n;
    }
    let owner = &d.crew[d.owner(first.shard)];
    let got = owner
        .call("init", |mut c| {
            let req = pb::GetPointsRequest {
                job_id: d.job_id(),
                points: vec![first],
            };
            async move { c.get_points(req).await }
        })
        .await?;
    let mut candidates = got.values;
    let mut new_centers = candidates.clone();
    let oversampling = 2.0 * k as f64;
    for round in 1..=INIT_ROUNDS {
        let costs = d
            .all("init", |_, mut c| {
                let req = pb::InitCostsRequest {
                    job_id: d.job_id(),
                    attempt: ATTEMPT,
                    round,
                    dims: dims as u32,
                    new_centers: new_centers.clone(),
                };
                async move { c.init_costs(req).await }
            })
            .await?;
        let costs = in_shard_order(
            costs.into_iter().flat_map(|c| c.shards),
            d.shards,
            "init",
            |c| c.shard,
        )?;
        let total: f64 = costs.iter().map(|c| c.cost).sum();
        d.progress(Progress {
            phase_progress: Some(f64::from(round) / f64::from(INIT_ROUNDS)),
            ..Default::default()
        });
        if total <= 0.0 {
            break;
        }
        let sampled = d
            .all("init", |_, mut c| {
                let req = pb::InitSampleRequest {
                    job_id: d.job_id(),
                    attempt: ATTEMPT,
                    round,
                    total_cost: total,
                    oversampling,
                    seed,
                };
                async move { c.init_sample(req).await }
            })
            .await?;
        let mut points: Vec<pb::SampledPoint> =
            sampled.into_iter().flat_map(|s| s.points).collect();
        points.sort_by_key(|p| p.point.map(|r| (r.shard, r.index)));
        new_centers = points
            .iter()
            .flat_map(|p| p.values.iter().copied())
            .collect();
        candidates.extend_from_slice(&new_centers);
    }
    let n = candidates.len() / dims;
    info!(candidates = n, "k-means|| candidates");
    Ok((candidates, n))
}

/// The weight of each candidate: how many users are nearest to it.
async fn candidate_weights(
    d: &Driver<'_>,
    candidates: &[f32],
    dims: usize,
) -> Result<Vec<f64>, CoordinatorError> {
    let c = candidates.len() / dims;
    let partials = d
        .all("init", |_, mut cl| {
            let req = pb::LloydStepRequest {
                job_id: d.job_id(),
                attempt: ATTEMPT,
                round: u32::MAX,
                k: c as u32,
                dims: dims as u32,
                centroids: candidates.to_vec(),
                far_points: 0,
            };
            async move { cl.lloyd_step(req).await }
        })
        .await?;
    let partials = in_shard_order(
        partials.into_iter().flat_map(|p| p.shards),
        d.shards,
        "init",
        |p| p.shard,
    )?;
    let mut weights = vec![0.0f64; c];
    for p in &partials {
        for (w, n) in weights.iter_mut().zip(&p.counts) {
            *w += *n as f64;
        }
    }
    Ok(weights)
}
