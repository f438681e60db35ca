//! The workers of a job: connecting to them, calling them (a call ends as soon
//! as its worker is dropped for missed heartbeats), telling which are gone, and
//! releasing the job on each at its end.

use super::JobContext;
use crate::CoordinatorError;
use crate::state::{StateHandle, WorkerEntry};
use shoal_net::auth::{AuthChannel, WithToken};
use shoal_net::tls;
use shoal_proto::MAX_MESSAGE_BYTES;
use shoal_proto::pb;
use shoal_proto::pb::worker_service_client::WorkerServiceClient;
use shoal_spec::{JobId, WorkerId};
use std::future::Future;
use std::time::{Duration, Instant};
use tracing::warn;

/// How often a call in flight checks that its worker is still registered.
const LIVENESS_POLL: Duration = Duration::from_secs(1);
/// How long the coordinator waits for a worker to release a job (the worker
/// itself waits up to 10 s for the job's tasks to stop).
const RELEASE_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a worker has to answer the probe of a recovery.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Clone)]
pub(super) struct Member {
    pub worker: WorkerEntry,
    pub client: WorkerServiceClient<AuthChannel>,
    /// Where the worker's liveness is kept (its heartbeats).
    state: StateHandle,
}

impl Member {
    /// Calls the worker. A worker dropped for missed heartbeats (frozen, or its
    /// host gone without closing the connection) ends the call with an error
    /// naming it, instead of leaving the job waiting on an answer that never
    /// comes.
    pub async fn call<T, F, Fut>(&self, step: &'static str, f: F) -> Result<T, CoordinatorError>
    where
        F: FnOnce(WorkerServiceClient<AuthChannel>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let call = f(self.client.clone());
        let lost = async {
            loop {
                tokio::time::sleep(LIVENESS_POLL).await;
                if !self.registered().await {
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

    /// Whether the worker is still registered (a state that cannot answer
    /// counts as yes: the job ends on its own then).
    async fn registered(&self) -> bool {
        match self.state.workers().await {
            Ok(live) => live.iter().any(|w| w.id == self.worker.id),
            Err(_) => true,
        }
    }

    /// Whether the worker is registered and answers within [`PROBE_TIMEOUT`].
    pub async fn alive(&self, job: &JobId) -> bool {
        if !self.registered().await {
            return false;
        }
        let mut c = self.client.clone();
        let req = pb::JobActivityRequest {
            job_id: job.to_string(),
        };
        matches!(
            tokio::time::timeout(PROBE_TIMEOUT, c.get_job_activity(req)).await,
            Ok(Ok(_))
        )
    }

    /// Releases the job on the worker (best effort: a worker that is gone
    /// forgets it anyway); logs what did not go as planned.
    async fn release(&self, job: &JobId, span: &tracing::Span) {
        let mut c = self.client.clone();
        let req = pb::ReleaseJobRequest {
            job_id: job.to_string(),
        };
        let id = &self.worker.id;
        match tokio::time::timeout(RELEASE_TIMEOUT, c.release_job(req)).await {
            Ok(Ok(r)) if r.get_ref().stopped => {}
            Ok(Ok(_)) => warn!(
                parent: span,
                worker = %id,
                "the worker still ran tasks of the job when it answered the release"
            ),
            Ok(Err(status)) => warn!(
                parent: span,
                worker = %id,
                error = %status.message(),
                "could not release the job on a worker"
            ),
            Err(_) => warn!(
                parent: span,
                worker = %id,
                "the worker did not answer the release within {} s",
                RELEASE_TIMEOUT.as_secs()
            ),
        }
    }
}

/// Every worker a job has used: the members it runs on, and those it dropped
/// (lost, or gone from the registry), which may still hold its work.
#[derive(Default)]
pub(super) struct Crew {
    pub members: Vec<Member>,
    pub dropped: Vec<Member>,
}

impl Crew {
    /// Releases the job on every worker it used: the registered members at once
    /// (each bounded), the others in the background.
    pub async fn release_all(self, ctx: &JobContext, span: &tracing::Span) {
        let live = ctx.state.workers().await.unwrap_or_default();
        let (here, gone): (Vec<Member>, Vec<Member>) = self
            .members
            .into_iter()
            .partition(|m| live.iter().any(|w| w.id == m.worker.id));
        for m in gone.into_iter().chain(self.dropped) {
            let (job, span) = (ctx.id.clone(), span.clone());
            tokio::spawn(async move { m.release(&job, &span).await });
        }
        let started = Instant::now();
        futures::future::join_all(here.iter().map(|m| m.release(&ctx.id, span))).await;
        if !here.is_empty() {
            tracing::info!(
                parent: span,
                workers = here.len(),
                ms = started.elapsed().as_millis() as u64,
                "job released on its workers"
            );
        }
    }
}

/// Connects to a registered worker.
pub(super) async fn connect(
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

/// The registered workers not in `exclude`, once there is at least one; waits
/// for one to register up to the coordinator's `worker_wait`.
pub(super) async fn wait_for_workers(
    state: &StateHandle,
    exclude: &[WorkerId],
) -> Result<Vec<WorkerEntry>, CoordinatorError> {
    let deadline = Instant::now() + state.config.worker_wait;
    loop {
        let workers: Vec<WorkerEntry> = state
            .workers()
            .await?
            .into_iter()
            .filter(|w| !exclude.contains(&w.id))
            .collect();
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
