//! Bearer tokens on every gRPC call: operators' calls need the operators' token,
//! workers' calls (and the coordinator's calls to workers) the workers' token; a
//! worker of another protocol version is refused.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{demo_spec, read_assignments, run_job_with, succeeded};
use shoal_coordinator::{CoordinatorConfig, CoordinatorHandle, StateConfig, spawn_coordinator};
use shoal_kernels::CpuBackend;
use shoal_net::auth::{AuthChannel, WithToken};
use shoal_proto::PROTOCOL_VERSION;
use shoal_proto::pb::job_service_client::JobServiceClient;
use shoal_proto::pb::registry_service_client::RegistryServiceClient;
use shoal_proto::pb::worker_service_client::WorkerServiceClient;
use shoal_proto::pb::{ListJobsRequest, ListWorkersRequest, RegisterRequest, ReleaseJobRequest};
use shoal_worker::{WorkerConfig, WorkerError, spawn_worker};
use tokio_util::sync::CancellationToken;
use tonic::Code;
use tonic::transport::Channel;

const OPERATORS: &str = "operators-7f3a";
const WORKERS: &str = "workers-91c2";

async fn coordinator(shutdown: &CancellationToken) -> CoordinatorHandle {
    let config = CoordinatorConfig {
        state: StateConfig {
            worker_token: Some(WORKERS.into()),
            ..StateConfig::default()
        },
        operator_token: Some(OPERATORS.into()),
        ..CoordinatorConfig::default()
    };
    spawn_coordinator(config, shutdown.clone()).await.unwrap()
}

async fn channel(url: &str, token: Option<&str>) -> AuthChannel {
    let channel = Channel::from_shared(url.to_string())
        .unwrap()
        .connect()
        .await
        .unwrap();
    tonic::service::interceptor::InterceptedService::new(channel, WithToken::new(token).unwrap())
}

async fn jobs(url: &str, token: Option<&str>) -> JobServiceClient<AuthChannel> {
    JobServiceClient::new(channel(url, token).await)
}

fn worker_config(url: &str, token: Option<&str>) -> WorkerConfig {
    WorkerConfig {
        coordinator: url.to_string(),
        token: token.map(str::to_string),
        ..WorkerConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_need_the_operators_token() {
    let shutdown = CancellationToken::new();
    let c = coordinator(&shutdown).await;
    for (token, why) in [
        (None, "no token"),
        (Some("operators-7f3b"), "a wrong token"),
        (Some(WORKERS), "the workers' token"),
    ] {
        let err = jobs(&c.url(), token)
            .await
            .list_jobs(ListJobsRequest {})
            .await
            .expect_err(why);
        assert_eq!(err.code(), Code::Unauthenticated, "{why}: {err:?}");
        assert!(
            err.message().contains("SHOAL_TOKEN"),
            "{why}: {}",
            err.message()
        );
    }
    jobs(&c.url(), Some(OPERATORS))
        .await
        .list_jobs(ListJobsRequest {})
        .await
        .expect("the operators' token is accepted");
    shutdown.cancel();
    c.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_need_the_workers_token_and_protocol_version() {
    let shutdown = CancellationToken::new();
    let c = coordinator(&shutdown).await;
    let register = RegisterRequest {
        memory_limit_bytes: 1 << 30,
        protocol_version: PROTOCOL_VERSION,
        address: "http://127.0.0.1:1".into(),
        backend: "cpu".into(),
        threads: 1,
    };
    for (token, why) in [
        (None, "no token"),
        (Some(OPERATORS), "the operators' token"),
    ] {
        let err = RegistryServiceClient::new(channel(&c.url(), token).await)
            .register(register.clone())
            .await
            .expect_err(why);
        assert_eq!(err.code(), Code::Unauthenticated, "{why}: {err:?}");
    }
    let err = RegistryServiceClient::new(channel(&c.url(), Some(WORKERS)).await)
        .register(RegisterRequest {
            protocol_version: PROTOCOL_VERSION + 1,
            ..register
        })
        .await
        .expect_err("another protocol version");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message().contains("protocol version"),
        "{}",
        err.message()
    );

    // Real workers give up (and say why) on either refusal.
    let wrong = spawn_worker(
        worker_config(&c.url(), Some("nope")),
        Arc::new(CpuBackend::new()),
        CancellationToken::new(),
    )
    .await
    .unwrap();
    let old = spawn_worker(
        WorkerConfig {
            protocol_version: PROTOCOL_VERSION + 1,
            ..worker_config(&c.url(), Some(WORKERS))
        },
        Arc::new(CpuBackend::new()),
        CancellationToken::new(),
    )
    .await
    .unwrap();
    for (w, want) in [(wrong, "token"), (old, "protocol version")] {
        let err = tokio::time::timeout(Duration::from_secs(20), w.wait())
            .await
            .expect("a refused worker stops")
            .expect_err("a refused worker fails");
        assert!(matches!(err, WorkerError::Refused { .. }), "{err}");
        assert!(err.to_string().contains(want), "{err}");
    }
    let listed = jobs(&c.url(), Some(OPERATORS))
        .await
        .list_workers(ListWorkersRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(listed.workers.is_empty(), "{listed:?}");
    shutdown.cancel();
    c.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_runs_with_tokens_on_every_call() {
    let shutdown = CancellationToken::new();
    let c = coordinator(&shutdown).await;
    let mut workers = Vec::new();
    for _ in 0..2 {
        workers.push(
            spawn_worker(
                worker_config(&c.url(), Some(WORKERS)),
                Arc::new(CpuBackend::new()),
                shutdown.clone(),
            )
            .await
            .unwrap(),
        );
    }
    // A worker's own service refuses calls without the workers' token.
    let err = WorkerServiceClient::new(channel(&format!("http://{}", workers[0].addr), None).await)
        .release_job(ReleaseJobRequest::default())
        .await
        .expect_err("no token");
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");

    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let mut client = jobs(&c.url(), Some(OPERATORS)).await;
    let status = run_job_with(&mut client, &demo_spec(&out, 4)).await;
    assert!(succeeded(&status), "{status:?}");
    assert_eq!(read_assignments(&out).len(), 4338);
    shutdown.cancel();
    for w in workers {
        w.wait().await.unwrap();
    }
    c.wait().await.unwrap();
}
