//! The HTTP endpoints of a coordinator and its workers: /healthz, /readyz (not
//! ready until a worker has registered; a worker until it is registered) and
//! /metrics (Prometheus text: jobs by state, workers, rows and bytes read, phase
//! seconds).

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{DEADLINE, demo_spec, run_job, succeeded, wait_for_workers};
use shoal_coordinator::{CoordinatorConfig, spawn_coordinator};
use shoal_kernels::CpuBackend;
use shoal_worker::{WorkerConfig, spawn_worker};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

/// Status code and body of a GET.
async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: shoal\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).await.unwrap();
    let code = text[9..12].parse().unwrap();
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (code, body)
}

/// The value of the first metric line starting with `name` (name plus labels).
fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_readiness_and_metrics() {
    let shutdown = CancellationToken::new();
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let c = spawn_coordinator(
        CoordinatorConfig {
            http_listen: Some(any),
            ..CoordinatorConfig::default()
        },
        shutdown.clone(),
    )
    .await
    .unwrap();
    let http = c.http_addr.expect("HTTP endpoints were asked for");
    assert_eq!(get(http, "/healthz").await.0, 200);
    let (code, body) = get(http, "/readyz").await;
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("no worker"), "{body}");

    let w = spawn_worker(
        WorkerConfig {
            coordinator: c.url(),
            http_listen: Some(any),
            ..WorkerConfig::default()
        },
        Arc::new(CpuBackend::new()),
        shutdown.clone(),
    )
    .await
    .unwrap();
    wait_for_workers(&c.url(), 1).await;
    assert_eq!(get(http, "/readyz").await.0, 200);
    let worker_http = w.http_addr.unwrap();
    let deadline = Instant::now() + DEADLINE;
    while get(worker_http, "/readyz").await.0 != 200 {
        assert!(Instant::now() < deadline, "the worker never became ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (_, worker_metrics) = get(worker_http, "/metrics").await;
    assert_eq!(
        metric(&worker_metrics, "shoal_worker_registered"),
        Some(1.0),
        "{worker_metrics}"
    );
    assert_eq!(
        metric(&worker_metrics, "shoal_worker_backend{backend=\"cpu\"}"),
        Some(1.0),
        "{worker_metrics}"
    );

    let dir = tempfile::tempdir().unwrap();
    let status = run_job(&c.url(), &demo_spec(&dir.path().join("out"), 4)).await;
    assert!(succeeded(&status), "{status:?}");
    let (_, worker_metrics) = get(worker_http, "/metrics").await;
    assert_eq!(
        metric(&worker_metrics, "shoal_worker_rows_read_total"),
        Some(541_909.0),
        "{worker_metrics}"
    );
    assert!(metric(&worker_metrics, "shoal_worker_bytes_read_total").unwrap() > 7e6);
    let (code, text) = get(http, "/metrics").await;
    assert_eq!(code, 200);
    assert_eq!(
        metric(&text, "shoal_jobs{state=\"succeeded\"}"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        metric(&text, "shoal_jobs{state=\"running\"}"),
        Some(0.0),
        "{text}"
    );
    assert_eq!(metric(&text, "shoal_workers"), Some(1.0), "{text}");
    assert_eq!(
        metric(&text, "shoal_rows_read_total"),
        Some(541_909.0),
        "{text}"
    );
    assert!(
        metric(&text, "shoal_bytes_read_total").unwrap() > 7e6,
        "{text}"
    );
    for phase in ["plan", "ingest", "load", "lloyd", "write"] {
        assert_eq!(
            metric(
                &text,
                &format!("shoal_phase_seconds_count{{phase=\"{phase}\"}}")
            ),
            Some(1.0),
            "{phase}: {text}"
        );
    }
    assert!(text.trim_end().ends_with("# EOF"), "{text}");

    shutdown.cancel();
    w.wait().await.unwrap();
    c.wait().await.unwrap();
}
