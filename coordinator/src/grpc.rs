//! The coordinator's gRPC services: `JobService` for operators and
//! `RegistryService` for workers. Both are thin: they ask the state loop.

use crate::CoordinatorError;
use crate::state::StateHandle;
use futures::Stream;
use shoal_proto::pb::job_service_server::JobService;
use shoal_proto::pb::registry_service_server::RegistryService;
use shoal_proto::pb::{self, JobState, JobStatus};
use shoal_spec::{JobId, JobSpec, WorkerId};
use std::pin::Pin;
use tonic::{Request, Response, Status};

#[derive(Clone)]
pub struct Services {
    pub state: StateHandle,
}

fn terminal(s: &JobStatus) -> bool {
    matches!(
        JobState::try_from(s.state),
        Ok(JobState::Succeeded | JobState::Failed | JobState::Cancelled)
    )
}

#[tonic::async_trait]
impl JobService for Services {
    async fn submit_job(
        &self,
        req: Request<pb::SubmitJobRequest>,
    ) -> Result<Response<pb::SubmitJobResponse>, Status> {
        let spec = JobSpec::parse(&req.into_inner().spec_toml).map_err(CoordinatorError::from)?;
        let id = self.state.submit(spec).await?;
        Ok(Response::new(pb::SubmitJobResponse {
            job_id: id.to_string(),
        }))
    }

    async fn get_job(
        &self,
        req: Request<pb::GetJobRequest>,
    ) -> Result<Response<JobStatus>, Status> {
        let id = req.into_inner().job_id;
        match self.state.get(JobId::from(id.clone())).await? {
            Some(s) => Ok(Response::new(s)),
            None => Err(CoordinatorError::UnknownJob(id).into()),
        }
    }

    type WatchJobStream = Pin<Box<dyn Stream<Item = Result<JobStatus, Status>> + Send>>;

    async fn watch_job(
        &self,
        req: Request<pb::GetJobRequest>,
    ) -> Result<Response<Self::WatchJobStream>, Status> {
        let id = req.into_inner().job_id;
        let Some(mut rx) = self.state.watch(JobId::from(id.clone())).await? else {
            return Err(CoordinatorError::UnknownJob(id).into());
        };
        let stream = async_stream(move |tx| async move {
            loop {
                let status = rx.borrow_and_update().clone();
                let done = terminal(&status);
                if tx.send(Ok(status)).await.is_err() || done {
                    break;
                }
                if rx.changed().await.is_err() {
                    break;
                }
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn cancel_job(
        &self,
        req: Request<pb::GetJobRequest>,
    ) -> Result<Response<JobStatus>, Status> {
        let id = req.into_inner().job_id;
        match self.state.cancel(JobId::from(id.clone())).await? {
            Some(s) => Ok(Response::new(s)),
            None => Err(CoordinatorError::UnknownJob(id).into()),
        }
    }

    async fn list_jobs(
        &self,
        _: Request<pb::ListJobsRequest>,
    ) -> Result<Response<pb::ListJobsResponse>, Status> {
        Ok(Response::new(pb::ListJobsResponse {
            jobs: self.state.list().await?,
        }))
    }

    async fn list_workers(
        &self,
        _: Request<pb::ListWorkersRequest>,
    ) -> Result<Response<pb::ListWorkersResponse>, Status> {
        let workers = self
            .state
            .workers()
            .await?
            .iter()
            .map(|w| w.to_proto())
            .collect();
        Ok(Response::new(pb::ListWorkersResponse { workers }))
    }
}

/// A stream fed by a task through a bounded channel.
fn async_stream<T, F, Fut>(f: F) -> impl Stream<Item = T> + Send
where
    T: Send + 'static,
    F: FnOnce(tokio::sync::mpsc::Sender<T>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(f(tx));
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

#[tonic::async_trait]
impl RegistryService for Services {
    async fn register(
        &self,
        req: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterResponse>, Status> {
        Ok(Response::new(self.state.register(req.into_inner()).await?))
    }

    async fn heartbeat(
        &self,
        req: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let req = req.into_inner();
        if req.protocol_version != shoal_proto::PROTOCOL_VERSION {
            return Err(CoordinatorError::ProtocolVersion {
                worker: req.protocol_version,
                coordinator: shoal_proto::PROTOCOL_VERSION,
            }
            .into());
        }
        let (known, running_jobs) = self.state.heartbeat(WorkerId::from(req.worker_id)).await?;
        Ok(Response::new(pb::HeartbeatResponse {
            known,
            running_jobs,
        }))
    }
}
