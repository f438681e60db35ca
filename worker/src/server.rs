//! Running a worker: the gRPC server on its port, and the registration / heartbeat
//! loop towards the coordinator. `shoal worker` and `shoal run` start the same code.

use crate::WorkerError;
use crate::flight::FactorService;
use crate::service::WorkerServiceImpl;
use arrow_flight::flight_service_server::FlightServiceServer;
use futures::future::BoxFuture;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use shoal_kernels::Backend;
use shoal_net::auth::{RequireToken, WithToken};
use shoal_net::http::Probe;
use shoal_net::tls::{self, ServerIdentity};
use shoal_proto::pb::registry_service_client::RegistryServiceClient;
use shoal_proto::pb::worker_service_server::WorkerServiceServer;
use shoal_proto::pb::{HeartbeatRequest, RegisterRequest};
use shoal_proto::{MAX_MESSAGE_BYTES, PROTOCOL_VERSION};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::service::interceptor::InterceptedService;
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
    /// Certificate and key to serve TLS with; `None`: plain HTTP/2.
    pub tls: Option<ServerIdentity>,
    /// A private CA (PEM) that signs the coordinator's certificate, for an
    /// `https://` coordinator URL (the system's roots are trusted too).
    pub tls_ca: Option<PathBuf>,
    /// Address of the HTTP endpoints (/healthz, /readyz, /metrics); `None`: none.
    pub http_listen: Option<SocketAddr>,
    /// Bytes of memory the worker may use for jobs; `None`: its container's
    /// limit, else the machine's memory ([`crate::memory::detected_limit`]).
    pub memory_limit: Option<u64>,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            coordinator: "http://127.0.0.1:7070".into(),
            advertise: None,
            protocol_version: PROTOCOL_VERSION,
            token: None,
            tls: None,
            tls_ca: None,
            http_listen: None,
            memory_limit: None,
        }
    }
}

/// A running worker.
pub struct WorkerHandle {
    /// The address the gRPC server listens on.
    pub addr: SocketAddr,
    /// Where the HTTP endpoints listen, when asked for.
    pub http_addr: Option<SocketAddr>,
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
    let scheme = if config.tls.is_some() {
        "https"
    } else {
        "http"
    };
    let advertise = config
        .advertise
        .clone()
        .unwrap_or_else(|| format!("{scheme}://{addr}"));
    let threads = rayon::current_num_threads();
    let memory_limit = match config.memory_limit {
        Some(bytes) => bytes,
        None => {
            let (bytes, from) = crate::memory::detected_limit();
            info!(bytes, "memory limit: {from}");
            bytes
        }
    };
    let with_token = WithToken::new(config.token.as_deref()).map_err(WorkerError::BadToken)?;
    let service = WorkerServiceImpl::new(backend.clone(), threads.max(1))
        .with_peers(with_token.clone(), config.tls_ca.clone())
        .with_memory_limit(memory_limit);
    let tracker = TaskTracker::new();
    let fatal: Arc<Mutex<Option<WorkerError>>> = Arc::default();
    let metrics = WorkerMetrics::new(backend.name(), threads, service.clone());
    let http_addr = match config.http_listen {
        None => None,
        Some(listen) => {
            let http = shoal_net::http::serve(
                listen,
                metrics.registry(),
                Arc::new(metrics.clone()),
                shutdown.clone().cancelled_owned(),
            )
            .await
            .map_err(|source| WorkerError::Bind {
                addr: listen.to_string(),
                source,
            })?;
            Some(http.track(&tracker))
        }
    };

    let mut builder = tonic::transport::Server::builder();
    if let Some(identity) = &config.tls {
        builder = builder.tls_config(identity.server_config()?)?;
    }
    let flight = FlightServiceServer::new(FactorService::new(service.shelf()))
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let server = builder
        .add_service(InterceptedService::new(
            flight,
            RequireToken::new(config.token.as_deref(), "SHOAL_TOKEN (the workers' token)"),
        ))
        .add_service(InterceptedService::new(
            WorkerServiceServer::new(service.clone())
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
            memory_limit_bytes: memory_limit,
        };
        let coordinator = config.coordinator.clone();
        let tls_ca = config.tls_ca.clone();
        let registered = metrics.registered.clone();
        tracker.spawn(async move {
            tokio::select! {
                _ = shutdown.cancelled() => {}
                result = registration_loop(coordinator, register, with_token, tls_ca, registered, service) => {
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
    info!(
        %addr,
        advertise = %advertise,
        backend = backend.name(),
        memory_limit_mib = memory_limit >> 20,
        "worker listening"
    );
    Ok(WorkerHandle {
        addr,
        http_addr,
        tracker,
        shutdown,
        fatal,
    })
}

/// Registers (retrying while the coordinator is unreachable), then heartbeats; a
/// heartbeat the coordinator does not recognise leads to registering again. Each
/// heartbeat's answer names the jobs the coordinator runs: the work of any other
/// is dropped. Returns only on a refusal.
async fn registration_loop(
    coordinator: String,
    register: RegisterRequest,
    token: WithToken,
    tls_ca: Option<PathBuf>,
    registered_gauge: Gauge,
    service: WorkerServiceImpl,
) -> Result<(), WorkerError> {
    let retry = Duration::from_millis(250);
    loop {
        let channel = match tls::endpoint(&coordinator, tls_ca.as_deref()) {
            Ok(endpoint) => endpoint.connect().await,
            Err(e) => {
                return Err(WorkerError::BadCoordinatorUrl(e.to_string()));
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
        registered_gauge.set(1);
        let every = Duration::from_millis(u64::from(registered.heartbeat_interval_ms.max(50)));
        loop {
            tokio::time::sleep(every).await;
            let beat = HeartbeatRequest {
                protocol_version: register.protocol_version,
                worker_id: registered.worker_id.clone(),
            };
            let asked = std::time::Instant::now();
            match client.heartbeat(beat).await {
                Ok(r) if r.get_ref().known => {
                    service.keep_only(&r.get_ref().running_jobs, asked);
                }
                Ok(_) => {
                    warn!(worker = %registered.worker_id, "coordinator forgot this worker; registering again");
                    registered_gauge.set(0);
                    break;
                }
                Err(status) => {
                    warn!(error = %status, "heartbeat failed; registering again");
                    registered_gauge.set(0);
                    tokio::time::sleep(retry).await;
                    break;
                }
            }
        }
    }
}

/// The worker's Prometheus metrics; registered with a coordinator = ready.
#[derive(Clone)]
struct WorkerMetrics {
    registered: Gauge,
    threads: Gauge,
    backend: Family<Vec<(&'static str, String)>, Gauge>,
    backend_name: String,
    jobs: Gauge,
    rows_read: Counter,
    bytes_read: Counter,
    service: WorkerServiceImpl,
}

impl WorkerMetrics {
    fn new(backend: &str, threads: usize, service: WorkerServiceImpl) -> WorkerMetrics {
        let m = WorkerMetrics {
            registered: Gauge::default(),
            threads: Gauge::default(),
            backend: Family::default(),
            backend_name: backend.to_string(),
            jobs: Gauge::default(),
            rows_read: Counter::default(),
            bytes_read: Counter::default(),
            service,
        };
        m.threads.set(threads as i64);
        m.backend
            .get_or_create(&vec![("backend", m.backend_name.clone())])
            .set(1);
        m
    }

    fn registry(&self) -> Registry {
        let mut r = Registry::with_prefix("shoal_worker");
        r.register(
            "registered",
            "1 while registered with a coordinator",
            self.registered.clone(),
        );
        r.register("threads", "Compute threads", self.threads.clone());
        r.register(
            "backend",
            "The compute backend in use (value 1)",
            self.backend.clone(),
        );
        r.register("jobs", "Jobs with work on this worker", self.jobs.clone());
        r.register(
            "rows_read",
            "Interaction rows read by this worker",
            self.rows_read.clone(),
        );
        r.register(
            "bytes_read",
            "Input bytes read by this worker",
            self.bytes_read.clone(),
        );
        r
    }
}

impl Probe for WorkerMetrics {
    fn ready(&self) -> BoxFuture<'_, Result<(), String>> {
        let registered = self.registered.get() == 1;
        Box::pin(async move {
            if registered {
                Ok(())
            } else {
                Err("not registered with the coordinator".into())
            }
        })
    }

    fn refresh(&self) -> BoxFuture<'_, ()> {
        let (rows, bytes) = self.service.read_totals();
        // The totals only grow: the counters follow them.
        self.rows_read
            .inc_by(rows.saturating_sub(self.rows_read.get()));
        self.bytes_read
            .inc_by(bytes.saturating_sub(self.bytes_read.get()));
        self.jobs.set(self.service.jobs_held() as i64);
        Box::pin(async {})
    }
}
