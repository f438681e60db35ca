//! The coordinator's state, owned by one task: the event loop is the only writer of
//! the worker registry and of every job's record. gRPC handlers and job drivers
//! talk to it through [`StateHandle`].

use crate::CoordinatorError;
use futures::future::BoxFuture;
use shoal_proto::PROTOCOL_VERSION;
use shoal_proto::pb::{self, JobState, JobStatus};
use shoal_spec::{JobId, JobSpec, WorkerId};
use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

/// A live worker as the coordinator knows it.
#[derive(Debug, Clone)]
pub struct WorkerEntry {
    pub id: WorkerId,
    pub address: String,
    pub backend: String,
    pub threads: u32,
    /// Bytes the worker may use for jobs (its --memory-limit).
    pub memory_limit: u64,
    last_seen: Instant,
    last_seen_unix_ms: i64,
}

/// What a job's driver is given: the job, the state loop, its cancellation.
pub struct JobContext {
    pub id: JobId,
    pub spec: JobSpec,
    pub state: StateHandle,
    pub cancel: CancellationToken,
    /// A job the coordinator restarted with: what it had established.
    pub resume: Option<Resume>,
    /// The coordinator's shutdown: a job it stops while it keeps a state is
    /// suspended (its staging kept for the next coordinator), not cancelled.
    pub shutdown: CancellationToken,
}

/// What a job had established when its coordinator stopped, as its state kept
/// it ([`crate::journal`]).
#[derive(Debug, Clone, Default)]
pub struct Resume {
    pub progress: Option<shoal_proto::pb::StoredProgress>,
    pub ingest: Option<shoal_proto::pb::StoredIngest>,
}

/// Runs a job to its end (the coordinator's is [`crate::job::run`]; the state
/// loop is given it, so that it does not depend on the driver).
pub type JobRunner = fn(JobContext) -> BoxFuture<'static, Result<(), CoordinatorError>>;

/// A change a job driver reports.
#[derive(Debug, Clone, Default)]
pub struct Progress {
    pub phase: Option<&'static str>,
    pub phase_progress: Option<f64>,
    pub iteration: Option<u32>,
    pub inertia: Option<f64>,
    pub rows_read: Option<u64>,
    pub users: Option<u64>,
    pub workers: Option<u32>,
    /// ingest: bytes of every planned split
    pub bytes_total: Option<u64>,
    /// ingest: bytes fetched so far
    pub bytes_read: Option<u64>,
    /// The job's attempt, and what its last recovery did.
    pub attempt: Option<u32>,
    pub recovery: Option<String>,
}

enum Event {
    Register {
        req: pb::RegisterRequest,
        reply: oneshot::Sender<Result<pb::RegisterResponse, CoordinatorError>>,
    },
    Heartbeat {
        worker: WorkerId,
        reply: oneshot::Sender<(bool, Vec<String>)>,
    },
    Workers {
        reply: oneshot::Sender<Vec<WorkerEntry>>,
    },
    Submit {
        spec: Box<JobSpec>,
        reply: oneshot::Sender<JobId>,
    },
    Get {
        job: JobId,
        reply: oneshot::Sender<Option<JobStatus>>,
    },
    Watch {
        job: JobId,
        reply: oneshot::Sender<Option<watch::Receiver<JobStatus>>>,
    },
    List {
        reply: oneshot::Sender<Vec<JobStatus>>,
    },
    Cancel {
        job: JobId,
        reply: oneshot::Sender<Option<JobStatus>>,
    },
    Progress {
        job: JobId,
        progress: Progress,
    },
    Finished {
        job: JobId,
        result: Result<(), CoordinatorError>,
    },
    Tick,
}

/// Settings of the coordinator's state machine.
#[derive(Debug, Clone)]
pub struct StateConfig {
    pub heartbeat_interval: Duration,
    /// A worker not heard from for this long is dropped.
    pub worker_timeout: Duration,
    /// Jobs running at once; the rest wait in FIFO order.
    pub max_running_jobs: usize,
    /// How long a job waits for a first worker.
    pub worker_wait: Duration,
    /// The workers' token: workers' calls must carry it, and the coordinator's
    /// calls to workers do. `None`: authentication off.
    pub worker_token: Option<String>,
    /// A private CA (PEM) that signs the workers' certificates, for `https://`
    /// worker addresses (the system's roots are trusted too).
    pub tls_ca: Option<std::path::PathBuf>,
    /// Where the job drivers count their figures (the HTTP `/metrics` reads them).
    pub metrics: std::sync::Arc<crate::metrics::Metrics>,
    /// The locations jobs may read and write; checked at submission.
    pub allow: crate::allow::AllowList,
    /// Where the jobs' records and progress are kept (`--state`); `None`: in
    /// memory only (a restart forgets every job).
    pub journal: Option<crate::journal::Journal>,
}

impl Default for StateConfig {
    fn default() -> Self {
        StateConfig {
            heartbeat_interval: Duration::from_millis(1000),
            worker_timeout: Duration::from_secs(10),
            max_running_jobs: 1,
            worker_wait: Duration::from_secs(60),
            worker_token: None,
            tls_ca: None,
            metrics: crate::metrics::Metrics::new(),
            allow: crate::allow::AllowList::default(),
            journal: None,
        }
    }
}

/// Cheap, cloneable access to the state loop.
#[derive(Clone)]
pub struct StateHandle {
    tx: mpsc::UnboundedSender<Event>,
    pub config: StateConfig,
}

impl StateHandle {
    async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Event,
    ) -> Result<T, CoordinatorError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(make(reply))
            .map_err(|_| CoordinatorError::ShuttingDown)?;
        rx.await.map_err(|_| CoordinatorError::ShuttingDown)
    }

    pub async fn register(
        &self,
        req: pb::RegisterRequest,
    ) -> Result<pb::RegisterResponse, CoordinatorError> {
        self.ask(|reply| Event::Register { req, reply }).await?
    }

    /// Whether the worker is known, and the jobs running.
    pub async fn heartbeat(
        &self,
        worker: WorkerId,
    ) -> Result<(bool, Vec<String>), CoordinatorError> {
        self.ask(|reply| Event::Heartbeat { worker, reply }).await
    }

    /// Live workers, ordered by id.
    pub async fn workers(&self) -> Result<Vec<WorkerEntry>, CoordinatorError> {
        self.ask(|reply| Event::Workers { reply }).await
    }

    pub async fn submit(&self, spec: JobSpec) -> Result<JobId, CoordinatorError> {
        self.config.allow.check(&spec)?;
        self.ask(|reply| Event::Submit {
            spec: Box::new(spec),
            reply,
        })
        .await
    }

    pub async fn get(&self, job: JobId) -> Result<Option<JobStatus>, CoordinatorError> {
        self.ask(|reply| Event::Get { job, reply }).await
    }

    pub async fn watch(
        &self,
        job: JobId,
    ) -> Result<Option<watch::Receiver<JobStatus>>, CoordinatorError> {
        self.ask(|reply| Event::Watch { job, reply }).await
    }

    pub async fn list(&self) -> Result<Vec<JobStatus>, CoordinatorError> {
        self.ask(|reply| Event::List { reply }).await
    }

    pub async fn cancel(&self, job: JobId) -> Result<Option<JobStatus>, CoordinatorError> {
        self.ask(|reply| Event::Cancel { job, reply }).await
    }

    /// Reports progress of a running job (fire and forget).
    pub fn progress(&self, job: &JobId, progress: Progress) {
        let _ = self.tx.send(Event::Progress {
            job: job.clone(),
            progress,
        });
    }

    fn finished(&self, job: JobId, result: Result<(), CoordinatorError>) {
        let _ = self.tx.send(Event::Finished { job, result });
    }
}

struct JobRecord {
    spec: JobSpec,
    status: watch::Sender<JobStatus>,
    cancel: CancellationToken,
    /// Submission order.
    sequence: u64,
    /// What a job the coordinator restarted with had established.
    resume: Option<Resume>,
}

struct State {
    config: StateConfig,
    workers: BTreeMap<WorkerId, WorkerEntry>,
    next_worker: u64,
    jobs: BTreeMap<JobId, JobRecord>,
    queue: VecDeque<JobId>,
    /// The next job's place in the submission order.
    sequence: u64,
    running: usize,
    runner: JobRunner,
    handle: StateHandle,
    tasks: TaskTracker,
    shutdown: CancellationToken,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Starts the state loop; it ends when `shutdown` is cancelled (cancelling running jobs).
pub fn spawn_state(
    config: StateConfig,
    tasks: TaskTracker,
    shutdown: CancellationToken,
    restored: Vec<crate::journal::Restored>,
    runner: JobRunner,
) -> StateHandle {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let handle = StateHandle {
        tx,
        config: config.clone(),
    };
    let mut state = State {
        config,
        workers: BTreeMap::new(),
        next_worker: 1,
        jobs: BTreeMap::new(),
        queue: VecDeque::new(),
        sequence: 1,
        running: 0,
        runner,
        handle: handle.clone(),
        tasks: tasks.clone(),
        shutdown: shutdown.clone(),
    };
    state.restore(restored);
    let ticker = handle.clone();
    tasks.spawn(async move {
        let mut tick = tokio::time::interval(ticker.config.heartbeat_interval);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => {
                    for record in state.jobs.values() {
                        record.cancel.cancel();
                    }
                    break;
                }
                _ = tick.tick() => state.on(Event::Tick),
                event = rx.recv() => match event {
                    Some(event) => state.on(event),
                    None => break,
                },
            }
        }
    });
    handle
}

impl State {
    /// Takes back the jobs of the state the coordinator started with: the
    /// finished ones as records, the queued ones queued in their order, and the
    /// running ones queued first, to resume from what they had established.
    fn restore(&mut self, restored: Vec<crate::journal::Restored>) {
        let (mut resumed, mut queued) = (Vec::new(), Vec::new());
        for r in restored {
            self.sequence = self.sequence.max(r.sequence + 1);
            let mut status = r.status;
            let running = status.state == JobState::Running as i32;
            if running && status.cancel_requested {
                status.state = JobState::Cancelled as i32;
                status.error =
                    "cancelled by an operator; the coordinator restarted meanwhile".into();
                status.finished_unix_ms = now_ms();
            } else if running {
                status.state = JobState::Queued as i32;
                status.phase = "resuming".into();
                resumed.push(r.id.clone());
            } else if status.state == JobState::Queued as i32 {
                queued.push(r.id.clone());
            }
            let resume = running.then_some(Resume {
                progress: r.progress,
                ingest: r.ingest,
            });
            let (tx, _) = watch::channel(status);
            self.jobs.insert(
                r.id,
                JobRecord {
                    spec: r.spec,
                    status: tx,
                    cancel: self.shutdown.child_token(),
                    sequence: r.sequence,
                    resume,
                },
            );
        }
        if !resumed.is_empty() || !queued.is_empty() {
            info!(
                resumed = resumed.len(),
                queued = queued.len(),
                "jobs taken back from the coordinator's state"
            );
        }
        self.queue.extend(resumed);
        self.queue.extend(queued);
        self.start_queued();
    }

    /// Writes a job's record to the state, when there is one.
    fn journal(&self, job: &JobId) {
        if let (Some(journal), Some(record)) = (&self.config.journal, self.jobs.get(job)) {
            journal.record(job, &record.spec, &record.status.borrow(), record.sequence);
        }
    }

    fn on(&mut self, event: Event) {
        match event {
            Event::Register { req, reply } => {
                let _ = reply.send(self.register(req));
            }
            Event::Heartbeat { worker, reply } => {
                let known = match self.workers.get_mut(&worker) {
                    Some(w) => {
                        w.last_seen = Instant::now();
                        w.last_seen_unix_ms = now_ms();
                        true
                    }
                    None => false,
                };
                let running = self
                    .jobs
                    .iter()
                    .filter(|(_, r)| r.status.borrow().state == JobState::Running as i32)
                    .map(|(id, _)| id.to_string())
                    .collect();
                let _ = reply.send((known, running));
            }
            Event::Workers { reply } => {
                let _ = reply.send(self.workers.values().cloned().collect());
            }
            Event::Submit { spec, reply } => {
                let id = JobId::generate();
                let status = JobStatus {
                    job_id: id.to_string(),
                    name: spec.name.clone(),
                    state: JobState::Queued as i32,
                    phase: "queued".into(),
                    output: spec.output.path.clone(),
                    submitted_unix_ms: now_ms(),
                    ..Default::default()
                };
                let (tx, _) = watch::channel(status);
                info!(job = %id, name = %spec.name, "job queued");
                self.jobs.insert(
                    id.clone(),
                    JobRecord {
                        spec: *spec,
                        status: tx,
                        cancel: self.shutdown.child_token(),
                        sequence: self.sequence,
                        resume: None,
                    },
                );
                self.sequence += 1;
                self.journal(&id);
                self.queue.push_back(id.clone());
                let _ = reply.send(id);
                self.start_queued();
            }
            Event::Get { job, reply } => {
                let _ = reply.send(self.jobs.get(&job).map(|r| r.status.borrow().clone()));
            }
            Event::Watch { job, reply } => {
                let _ = reply.send(self.jobs.get(&job).map(|r| r.status.subscribe()));
            }
            Event::List { reply } => {
                let _ = reply.send(
                    self.jobs
                        .values()
                        .map(|r| r.status.borrow().clone())
                        .collect(),
                );
            }
            Event::Cancel { job, reply } => {
                let status = self.jobs.get(&job).map(|record| {
                    let state = record.status.borrow().state;
                    if state == JobState::Queued as i32 {
                        record.cancel.cancel();
                        info!(job = %job, "queued job cancelled");
                        record.status.send_modify(|s| {
                            s.state = JobState::Cancelled as i32;
                            s.error = "cancelled before it started".into();
                            s.finished_unix_ms = now_ms();
                        });
                    } else if state == JobState::Running as i32 {
                        // The driver abandons its step, releases the job on every
                        // worker (they stop its work) and removes its staging; then
                        // the job ends as Cancelled.
                        record.cancel.cancel();
                        info!(job = %job, "cancelling a running job");
                        record.status.send_modify(|s| s.cancel_requested = true);
                    }
                    record.status.borrow().clone()
                });
                self.queue.retain(|j| j != &job);
                self.journal(&job);
                let _ = reply.send(status);
            }
            Event::Progress { job, progress } => {
                if let Some(record) = self.jobs.get(&job) {
                    record.status.send_modify(|s| {
                        let now = now_ms();
                        if let Some(phase) = progress.phase
                            && s.phase != phase
                        {
                            s.phase = phase.into();
                            s.phase_progress = 0.0;
                            s.phase_eta_ms = 0;
                            // ALS and Lloyd each count their own iterations (the
                            // last phase's count stays for the phases after it)
                            if matches!(phase, "als" | "lloyd") {
                                s.iteration = 0;
                            }
                            if let Some(last) = s.phases.last_mut()
                                && last.finished_unix_ms == 0
                            {
                                last.finished_unix_ms = now;
                            }
                            s.phases.push(pb::PhaseTiming {
                                phase: phase.into(),
                                started_unix_ms: now,
                                finished_unix_ms: 0,
                                // every phase after load works on the users
                                rows: s.users,
                            });
                        }
                        if let Some(p) = progress.phase_progress {
                            s.phase_progress = p;
                            let started = s.phases.last().map_or(now, |t| t.started_unix_ms);
                            let spent = (now - started).max(0) as f64;
                            s.phase_eta_ms = if p > 0.0 && p < 1.0 {
                                (spent * (1.0 - p) / p).round() as i64
                            } else {
                                0
                            };
                        }
                        if let Some(b) = progress.bytes_total {
                            s.bytes_total = b;
                        }
                        if let Some(b) = progress.bytes_read {
                            s.bytes_read = b;
                        }
                        if let Some(i) = progress.iteration {
                            s.iteration = i;
                        }
                        if let Some(a) = progress.attempt {
                            s.attempt = a;
                        }
                        if let Some(r) = &progress.recovery {
                            s.recovery = r.clone();
                        }
                        if let Some(x) = progress.inertia {
                            s.inertia = x;
                        }
                        if let Some(r) = progress.rows_read {
                            s.rows_read = r;
                            if let Some(t) = s.phases.last_mut().filter(|t| t.phase == "ingest") {
                                t.rows = r;
                            }
                        }
                        if let Some(u) = progress.users {
                            s.users = u;
                            if let Some(t) = s.phases.last_mut().filter(|t| t.phase == "load") {
                                t.rows = u;
                            }
                        }
                        if let Some(w) = progress.workers {
                            s.workers = w;
                        }
                    });
                }
            }
            Event::Finished { job, result } => {
                self.running = self.running.saturating_sub(1);
                if matches!(result, Err(CoordinatorError::Suspended)) {
                    // its record stays `running` in the state, to be resumed
                    info!(job = %job, "job suspended");
                    return;
                }
                if let Some(record) = self.jobs.get(&job) {
                    record.status.send_modify(|s| {
                        s.finished_unix_ms = now_ms();
                        s.phase_eta_ms = 0;
                        if let Some(last) = s.phases.last_mut()
                            && last.finished_unix_ms == 0
                        {
                            last.finished_unix_ms = s.finished_unix_ms;
                        }
                        match &result {
                            Ok(()) => {
                                s.state = JobState::Succeeded as i32;
                                s.phase = "done".into();
                                s.phase_progress = 1.0;
                            }
                            Err(CoordinatorError::Cancelled) => {
                                s.state = JobState::Cancelled as i32;
                                s.error = if s.cancel_requested {
                                    format!("cancelled by an operator during {}", s.phase)
                                } else {
                                    format!(
                                        "cancelled: the coordinator shut down during {}",
                                        s.phase
                                    )
                                };
                            }
                            Err(e) => {
                                s.state = JobState::Failed as i32;
                                s.error = e.to_string();
                            }
                        }
                    });
                }
                self.journal(&job);
                if let Some(journal) = &self.config.journal {
                    journal.ended(&job);
                }
                match &result {
                    Ok(()) => info!(job = %job, "job succeeded"),
                    Err(CoordinatorError::Cancelled) => info!(job = %job, "job cancelled"),
                    Err(e) => warn!(job = %job, error = %e, "job did not succeed"),
                }
                self.start_queued();
            }
            Event::Tick => {
                let timeout = self.config.worker_timeout;
                self.workers.retain(|id, w| {
                    let alive = w.last_seen.elapsed() <= timeout;
                    if !alive {
                        warn!(worker = %id, address = %w.address, "worker missed its heartbeats; dropped");
                    }
                    alive
                });
            }
        }
    }

    fn register(
        &mut self,
        req: pb::RegisterRequest,
    ) -> Result<pb::RegisterResponse, CoordinatorError> {
        if req.protocol_version != PROTOCOL_VERSION {
            warn!(address = %req.address, version = req.protocol_version, "refused a worker of another protocol version");
            return Err(CoordinatorError::ProtocolVersion {
                worker: req.protocol_version,
                coordinator: PROTOCOL_VERSION,
            });
        }
        // A worker that re-registers from the same address replaces its old entry.
        self.workers.retain(|_, w| w.address != req.address);
        let id = WorkerId::new(self.next_worker);
        self.next_worker += 1;
        info!(worker = %id, address = %req.address, backend = %req.backend, "worker registered");
        self.workers.insert(
            id.clone(),
            WorkerEntry {
                id: id.clone(),
                address: req.address,
                backend: req.backend,
                threads: req.threads,
                memory_limit: req.memory_limit_bytes,
                last_seen: Instant::now(),
                last_seen_unix_ms: now_ms(),
            },
        );
        Ok(pb::RegisterResponse {
            worker_id: id.to_string(),
            heartbeat_interval_ms: self.config.heartbeat_interval.as_millis() as u32,
        })
    }

    fn start_queued(&mut self) {
        while self.running < self.config.max_running_jobs.max(1) {
            let Some(id) = self.queue.pop_front() else {
                break;
            };
            let Some(record) = self.jobs.get_mut(&id) else {
                continue;
            };
            if record.cancel.is_cancelled() {
                continue;
            }
            self.running += 1;
            let max_iter = record.spec.segments.max_iter;
            record.status.send_modify(|s| {
                s.state = JobState::Running as i32;
                s.phase = "starting".into();
                s.started_unix_ms = now_ms();
                s.max_iter = max_iter;
            });
            let ctx = JobContext {
                id: id.clone(),
                spec: record.spec.clone(),
                state: self.handle.clone(),
                cancel: record.cancel.clone(),
                resume: record.resume.take(),
                shutdown: self.shutdown.clone(),
            };
            self.journal(&id);
            let (handle, runner) = (self.handle.clone(), self.runner);
            self.tasks.spawn(async move {
                let result = runner(ctx).await;
                handle.finished(id, result);
            });
        }
    }
}

impl WorkerEntry {
    pub fn to_proto(&self) -> pb::WorkerInfo {
        pb::WorkerInfo {
            worker_id: self.id.to_string(),
            address: self.address.clone(),
            backend: self.backend.clone(),
            threads: self.threads,
            memory_limit_bytes: self.memory_limit,
            last_heartbeat_unix_ms: self.last_seen_unix_ms,
        }
    }
}
