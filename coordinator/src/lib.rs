//! shoal coordinator: owns job state (one event loop, [`state`]), the worker
//! registry, shard placement, and drives every job ([`job`]): it pushes each step to
//! the workers, merges their partial results in shard order ([`kmeans`]) and writes
//! the job-level outputs and the manifest ([`output`]).

pub mod allow;
pub mod error;
pub mod extra;
pub mod grpc;
pub mod job;
pub mod journal;
pub mod kchoice;
pub mod kmeans;
pub mod metrics;
pub mod model;
pub mod output;
pub mod pca;
pub mod previous;
pub mod probe;
pub mod rows;

pub mod state;

pub use allow::AllowList;
pub use error::CoordinatorError;
pub use state::StateConfig;

use shoal_net::auth::{RequireToken, WithToken};
use shoal_net::tls::ServerIdentity;
use shoal_proto::MAX_MESSAGE_BYTES;
use shoal_proto::pb::job_service_server::JobServiceServer;
use shoal_proto::pb::registry_service_server::RegistryServiceServer;
use std::net::SocketAddr;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::service::interceptor::InterceptedService;
use tracing::{info, warn};

/// How a coordinator runs.
#[derive(Debug, Clone)]
pub struct CoordinatorConfig {
    /// Address to listen on; port 0 picks a free port.
    pub listen: SocketAddr,
    pub state: StateConfig,
    /// The operators' token: every JobService call must carry it. `None`:
    /// authentication off. (The workers' token is in [`StateConfig`].)
    pub operator_token: Option<String>,
    /// Certificate and key to serve TLS with; `None`: plain HTTP/2.
    pub tls: Option<ServerIdentity>,
    /// Address of the HTTP endpoints (/healthz, /readyz, /metrics); `None`: none.
    pub http_listen: Option<SocketAddr>,
}

impl Default for CoordinatorConfig {
    fn default() -> Self {
        CoordinatorConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            state: StateConfig::default(),
            operator_token: None,
            tls: None,
            http_listen: None,
        }
    }
}

/// A running coordinator.
pub struct CoordinatorHandle {
    pub addr: SocketAddr,
    /// Where the HTTP endpoints listen, when asked for.
    pub http_addr: Option<SocketAddr>,
    /// Whether it serves TLS.
    tls: bool,
    tracker: TaskTracker,
    server: tokio::task::JoinHandle<Result<(), CoordinatorError>>,
    journal: Option<journal::Journal>,
}

impl CoordinatorHandle {
    /// The URL clients and workers use.
    pub fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// Waits until the coordinator has stopped (after `shutdown` is cancelled).
    pub async fn wait(self) -> Result<(), CoordinatorError> {
        let served = self.server.await.unwrap_or(Ok(()));
        self.tracker.wait().await;
        if let Some(journal) = &self.journal {
            journal.flush().await;
        }
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
    let restored = match &config.state.journal {
        Some(journal) => {
            let jobs = journal.load().await?;
            info!(state = %journal.url(), jobs = jobs.len(), "coordinator state read");
            jobs
        }
        None => Vec::new(),
    };
    let state = state::spawn_state(
        config.state.clone(),
        tracker.clone(),
        shutdown.clone(),
        restored,
        |ctx| Box::pin(job::run(ctx)),
    );
    let http_addr = match config.http_listen {
        None => None,
        Some(listen) => {
            let probe = std::sync::Arc::new(probe::CoordinatorProbe {
                state: state.clone(),
                metrics: config.state.metrics.clone(),
            });
            let http = shoal_net::http::serve(
                listen,
                config.state.metrics.registry(),
                probe,
                shutdown.clone().cancelled_owned(),
            )
            .await
            .map_err(|source| CoordinatorError::Bind {
                addr: listen.to_string(),
                source,
            })?;
            Some(http.track(&tracker))
        }
    };
    let services = grpc::Services { state };
    for (which, token) in [
        ("SHOAL_TOKEN", &config.operator_token),
        ("SHOAL_WORKER_TOKEN", &config.state.worker_token),
    ] {
        WithToken::new(token.as_deref())
            .map_err(|reason| CoordinatorError::BadToken { which, reason })?;
    }
    if config.operator_token.is_none() || config.state.worker_token.is_none() {
        let who = match (&config.operator_token, &config.state.worker_token) {
            (None, None) => "operators and workers",
            (None, Some(_)) => "operators",
            _ => "workers",
        };
        let advice = "set SHOAL_TOKEN (operators) and SHOAL_WORKER_TOKEN (workers)";
        // On loopback (demo, run, tests) only this machine can call.
        if addr.ip().is_loopback() {
            info!("authentication is off for {who} (loopback only): {advice}");
        } else {
            warn!("authentication is off for {who}: {advice}");
        }
    }
    let operators = RequireToken::new(config.operator_token.as_deref(), "SHOAL_TOKEN");
    let workers = RequireToken::new(
        config.state.worker_token.as_deref(),
        "SHOAL_TOKEN on the worker (the coordinator's SHOAL_WORKER_TOKEN)",
    );
    let mut builder = tonic::transport::Server::builder();
    if let Some(identity) = &config.tls {
        builder = builder.tls_config(identity.server_config()?)?;
    }
    let server = builder
        .add_service(InterceptedService::new(
            JobServiceServer::new(services.clone())
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
            operators,
        ))
        .add_service(InterceptedService::new(
            RegistryServiceServer::new(services),
            workers,
        ))
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            shutdown.clone().cancelled_owned(),
        );
    let server = tokio::spawn(async move { server.await.map_err(CoordinatorError::from) });
    tracker.close();
    info!(%addr, "coordinator listening");
    Ok(CoordinatorHandle {
        addr,
        http_addr,
        tls: config.tls.is_some(),
        tracker,
        server,
        journal: config.state.journal.clone(),
    })
}
