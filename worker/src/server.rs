//! Running a worker: the gRPC server on its port, and the registration / heartbeat
//! loop towards the coordinator. `shoal worker` and `shoal run` start the same code.

use crate::WorkerError;
use crate::service::WorkerServiceImpl;
use shoal_kernels::Backend;
use shoal_proto::auth::{RequireToken, WithToken};
use shoal_proto::pb::registry_service_client::RegistryServiceClient;
use shoal_proto::pb::worker_service_server::WorkerServiceServer;
use shoal_proto::pb::{HeartbeatRequest, RegisterRequest};
use shoal_proto::{MAX_MESSAGE_BYTES, PROTOCOL_VERSION};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Endpoint;
use tracing::{error, info, warn};

/// How a worker runs.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Address to listen on; port 0 picks a free port.
    pub listen: SocketAddr,
    /// The coordinator's URL, e.g. `http://127.0.0.1:7070`.
    pub coordinator: String,
    /// The URL the coordinator reaches this worker at; default `http://<listen address>`.
    pub advertise: Option<String>,
    /// Protocol version to register with (the current one, except in tests).
    pub protocol_version: u32,
    /// The workers' token: sent to the coordinator, and required of its calls.
    /// `None`: authentication off.
    pub token: Option<String>,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            coordinator: "http://127.0.0.1:7070".into(),
            advertise: None,
            protocol_version: PROTOCOL_VERSION,
            token: None,
        }
    }
}

/// A running worker.
pub struct WorkerHandle {
    /// The address the gRPC server listens on.
    pub addr: SocketAddr,
    tracker: TaskTracker,
    shutdown: CancellationToken,
    fatal: Arc<Mutex<Option<WorkerError>>>,
}

impl WorkerHandle {
    /// Waits until the worker has stopped (after `shutdown` is cancelled, or a fatal
    /// error such as the coordinator refusing it). Returns that error, if any.
    pub async fn wait(self) -> Result<(), WorkerError> {
        self.tracker.wait().await;
        match self.fatal.lock().expect("fatal lock").take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    pub fn shutdown(&self) {
        self.shutdown.cancel();
    }
}

/// Binds the worker's port, starts its gRPC server and its registration loop.
pub async fn spawn_worker(
    config: WorkerConfig,
    backend: Arc<dyn Backend>,
    shutdown: CancellationToken,
) -> Result<WorkerHandle, WorkerError> {
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| WorkerError::Bind {
            addr: config.listen.to_string(),
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| WorkerError::Bind {
        addr: config.listen.to_string(),
        source,
    })?;
    let advertise = config
        .advertise
        .clone()
        .unwrap_or_else(|| format!("http://{addr}"));
    let threads = rayon::current_num_threads();
    let service = WorkerServiceImpl::new(backend.clone(), threads.max(1));
    let tracker = TaskTracker::new();
    let fatal: Arc<Mutex<Option<WorkerError>>> = Arc::default();

    let with_token = WithToken::new(config.token.as_deref()).map_err(WorkerError::BadToken)?;
    let server = tonic::transport::Server::builder()
        .add_service(InterceptedService::new(
            WorkerServiceServer::new(service)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
            RequireToken::new(config.token.as_deref(), "SHOAL_TOKEN (the workers' token)"),
        ))
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            shutdown.clone().cancelled_owned(),
        );
    {
        let fatal = fatal.clone();
        let shutdown = shutdown.clone();
        tracker.spawn(async move {
            if let Err(e) = server.await {
                error!(error = %e, "worker gRPC server failed");
                fatal
                    .lock()
                    .expect("fatal lock")
                    .get_or_insert(WorkerError::Serve(e));
                shutdown.cancel();
            }
        });
    }
    {
        let fatal = fatal.clone();
        let shutdown = shutdown.clone();
        let register = RegisterRequest {
            protocol_version: config.protocol_version,
            address: advertise.clone(),
            backend: backend.name().to_string(),
            threads: threads as u32,
        };
        let coordinator = config.coordinator.clone();
        tracker.spawn(async move {
            tokio::select! {
                _ = shutdown.cancelled() => {}
                result = registration_loop(coordinator, register, with_token) => {
                    if let Err(e) = result {
                        error!(error = %e, "worker stops");
                        fatal.lock().expect("fatal lock").get_or_insert(e);
                        shutdown.cancel();
                    }
                }
            }
        });
    }
    tracker.close();
    info!(%addr, advertise = %advertise, backend = backend.name(), "worker listening");
    Ok(WorkerHandle {
        addr,
        tracker,
        shutdown,
        fatal,
    })
}

/// Registers (retrying while the coordinator is unreachable), then heartbeats; a
/// heartbeat the coordinator does not recognise leads to registering again. Returns
/// only on a refusal.
async fn registration_loop(
    coordinator: String,
    register: RegisterRequest,
    token: WithToken,
) -> Result<(), WorkerError> {
    let retry = Duration::from_millis(250);
    loop {
        let channel = match Endpoint::from_shared(coordinator.clone()) {
            Ok(endpoint) => endpoint.connect().await,
            Err(e) => {
                return Err(WorkerError::BadCoordinatorUrl(format!(
                    "{coordinator}: {e}"
                )));
            }
        };
        let mut client = match channel {
            Ok(c) => RegistryServiceClient::with_interceptor(c, token.clone()),
            Err(e) => {
                warn!(coordinator = %coordinator, error = %e, "coordinator not reachable yet; retrying");
                tokio::time::sleep(retry).await;
                continue;
            }
        };
        let registered = match client.register(register.clone()).await {
            Ok(r) => r.into_inner(),
            Err(status)
                if matches!(
                    status.code(),
                    tonic::Code::FailedPrecondition
                        | tonic::Code::Unauthenticated
                        | tonic::Code::PermissionDenied
                        | tonic::Code::InvalidArgument
                ) =>
            {
                return Err(WorkerError::Refused {
                    coordinator,
                    message: status.message().to_string(),
                });
            }
            Err(status) => {
                warn!(error = %status, "registration failed; retrying");
                tokio::time::sleep(retry).await;
                continue;
            }
        };
        info!(worker = %registered.worker_id, coordinator = %coordinator, "registered");
        let every = Duration::from_millis(u64::from(registered.heartbeat_interval_ms.max(50)));
        loop {
            tokio::time::sleep(every).await;
            let beat = HeartbeatRequest {
                protocol_version: register.protocol_version,
                worker_id: registered.worker_id.clone(),
            };
            match client.heartbeat(beat).await {
                Ok(r) if r.get_ref().known => {}
                Ok(_) => {
                    warn!(worker = %registered.worker_id, "coordinator forgot this worker; registering again");
                    break;
                }
                Err(status) => {
                    warn!(error = %status, "heartbeat failed; registering again");
                    tokio::time::sleep(retry).await;
                    break;
                }
            }
        }
    }
}
