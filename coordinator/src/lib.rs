//! shoal coordinator: owns job state (one event loop, [`state`]), the worker
//! registry, shard placement, and drives every job ([`job`]): it pushes each step to
//! the workers, merges their partial results in shard order ([`kmeans`]) and writes
//! the job-level outputs and the manifest ([`output`]).

pub mod error;
pub mod grpc;
pub mod job;
pub mod kmeans;
pub mod output;
pub mod state;

pub use error::CoordinatorError;
pub use state::StateConfig;

use shoal_proto::MAX_MESSAGE_BYTES;
use shoal_proto::pb::job_service_server::JobServiceServer;
use shoal_proto::pb::registry_service_server::RegistryServiceServer;
use std::net::SocketAddr;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::info;

/// How a coordinator runs.
#[derive(Debug, Clone)]
pub struct CoordinatorConfig {
    /// Address to listen on; port 0 picks a free port.
    pub listen: SocketAddr,
    pub state: StateConfig,
}

impl Default for CoordinatorConfig {
    fn default() -> Self {
        CoordinatorConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            state: StateConfig::default(),
        }
    }
}

/// A running coordinator.
pub struct CoordinatorHandle {
    pub addr: SocketAddr,
    tracker: TaskTracker,
    server: tokio::task::JoinHandle<Result<(), CoordinatorError>>,
}

impl CoordinatorHandle {
    /// The URL clients and workers use.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Waits until the coordinator has stopped (after `shutdown` is cancelled).
    pub async fn wait(self) -> Result<(), CoordinatorError> {
        let served = self.server.await.unwrap_or(Ok(()));
        self.tracker.wait().await;
        served
    }
}

/// Binds the coordinator's port and starts its services and state loop.
pub async fn spawn_coordinator(
    config: CoordinatorConfig,
    shutdown: CancellationToken,
) -> Result<CoordinatorHandle, CoordinatorError> {
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| CoordinatorError::Bind {
            addr: config.listen.to_string(),
            source,
        })?;
    let addr = listener
        .local_addr()
        .map_err(|source| CoordinatorError::Bind {
            addr: config.listen.to_string(),
            source,
        })?;
    let tracker = TaskTracker::new();
    let state = state::spawn_state(config.state.clone(), tracker.clone(), shutdown.clone());
    let services = grpc::Services { state };
    let server = tonic::transport::Server::builder()
        .add_service(
            JobServiceServer::new(services.clone())
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        )
        .add_service(RegistryServiceServer::new(services))
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            shutdown.clone().cancelled_owned(),
        );
    let server = tokio::spawn(async move { server.await.map_err(CoordinatorError::from) });
    tracker.close();
    info!(%addr, "coordinator listening");
    Ok(CoordinatorHandle {
        addr,
        tracker,
        server,
    })
}
