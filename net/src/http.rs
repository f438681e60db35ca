//! The HTTP side of every long-running shoal process, for orchestrators and
//! monitoring: `GET /healthz` (the process is alive), `GET /readyz` (it can take
//! work; 503 with the reason when not) and `GET /metrics` (Prometheus text format).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use futures::future::BoxFuture;
use prometheus_client::registry::Registry;

/// What a process tells its HTTP endpoints.
pub trait Probe: Send + Sync + 'static {
    /// `Ok` when the process can take work, else why not.
    fn ready(&self) -> BoxFuture<'_, Result<(), String>>;
    /// Brings gauges computed on demand up to date, before a scrape.
    fn refresh(&self) -> BoxFuture<'_, ()>;
}

struct Shared {
    registry: Registry,
    probe: Arc<dyn Probe>,
}

/// A bound HTTP listener serving the endpoints until `shutdown` completes.
pub struct HttpServer {
    pub addr: SocketAddr,
    pub task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl HttpServer {
    /// Hands the server's task to `tracker` (a failure is logged) and logs the
    /// address it listens on, which it returns.
    pub fn track(self, tracker: &tokio_util::task::TaskTracker) -> SocketAddr {
        let HttpServer { addr, task } = self;
        tracker.spawn(async move {
            if let Ok(Err(e)) = task.await {
                tracing::warn!(error = %e, "the HTTP endpoints stopped");
            }
        });
        tracing::info!(addr = %addr, "HTTP endpoints: /healthz /readyz /metrics");
        addr
    }
}

/// Binds `listen` and serves the endpoints for `registry` and `probe`.
pub async fn serve(
    listen: SocketAddr,
    registry: Registry,
    probe: Arc<dyn Probe>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<HttpServer> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    let shared = Arc::new(Shared { registry, probe });
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(shared);
    let task = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(shutdown)
            .await
    });
    Ok(HttpServer { addr, task })
}

async fn readyz(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    match shared.probe.ready().await {
        Ok(()) => (StatusCode::OK, "ready\n".to_string()),
        Err(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        ),
    }
}

async fn metrics(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    shared.probe.refresh().await;
    let mut text = String::new();
    match prometheus_client::encoding::text::encode(&mut text, &shared.registry) {
        Ok(()) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        ),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            format!("cannot encode the metrics: {e}\n"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::metrics::counter::Counter;
    use std::sync::atomic::{AtomicBool, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    struct Flag(AtomicBool, Counter);
    impl Probe for Flag {
        fn ready(&self) -> BoxFuture<'_, Result<(), String>> {
            let ready = self.0.load(Ordering::SeqCst);
            Box::pin(async move {
                if ready {
                    Ok(())
                } else {
                    Err("no workers".into())
                }
            })
        }
        fn refresh(&self) -> BoxFuture<'_, ()> {
            self.1.inc();
            Box::pin(async {})
        }
    }

    async fn get(addr: SocketAddr, path: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn endpoints_answer() {
        let scrapes = Counter::default();
        let mut registry = Registry::default();
        registry.register("test_scrapes", "scrapes so far", scrapes.clone());
        let probe = Arc::new(Flag(AtomicBool::new(false), scrapes));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = serve(
            "127.0.0.1:0".parse().unwrap(),
            registry,
            probe.clone(),
            async move {
                let _ = stopped.await;
            },
        )
        .await
        .unwrap();
        assert!(
            get(server.addr, "/healthz")
                .await
                .starts_with("HTTP/1.1 200")
        );
        let not_ready = get(server.addr, "/readyz").await;
        assert!(not_ready.starts_with("HTTP/1.1 503"), "{not_ready}");
        assert!(not_ready.contains("no workers"), "{not_ready}");
        probe.0.store(true, Ordering::SeqCst);
        assert!(
            get(server.addr, "/readyz")
                .await
                .starts_with("HTTP/1.1 200")
        );
        let metrics = get(server.addr, "/metrics").await;
        assert!(metrics.contains("test_scrapes_total 1"), "{metrics}");
        assert!(get(server.addr, "/nope").await.starts_with("HTTP/1.1 404"));
        stop.send(()).unwrap();
        server.task.await.unwrap().unwrap();
    }
}
