//! TLS on every gRPC connection: operators → coordinator, workers → coordinator and
//! coordinator → workers, with certificates signed by a private CA.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{DEADLINE, demo_spec, job_client_tls, read_assignments, run_job_with, succeeded};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use shoal_coordinator::{CoordinatorConfig, StateConfig, spawn_coordinator};
use shoal_kernels::CpuBackend;
use shoal_net::tls::{ServerIdentity, endpoint};
use shoal_proto::pb::job_service_client::JobServiceClient;
use shoal_proto::pb::{JobState, ListWorkersRequest};
use shoal_worker::{WorkerConfig, spawn_worker};
use tokio_util::sync::CancellationToken;

/// A CA and a server certificate it signed for localhost / 127.0.0.1, as PEM files.
struct Pki {
    _dir: tempfile::TempDir,
    ca: PathBuf,
    server: ServerIdentity,
    /// A certificate of another, untrusted CA.
    stranger: ServerIdentity,
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

fn pki() -> Pki {
    let dir = tempfile::tempdir().unwrap();
    let issue = |tag: &str| {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
            .unwrap()
            .signed_by(&key, &ca)
            .unwrap();
        let ca_path = write(dir.path(), &format!("{tag}-ca.pem"), &ca.pem());
        let identity = ServerIdentity {
            cert: write(dir.path(), &format!("{tag}-cert.pem"), &cert.pem()),
            key: write(dir.path(), &format!("{tag}-key.pem"), &key.serialize_pem()),
        };
        (ca_path, identity)
    };
    let (ca, server) = issue("ours");
    let (_, stranger) = issue("theirs");
    Pki {
        _dir: dir,
        ca,
        server,
        stranger,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_runs_over_tls_and_untrusted_or_plain_clients_are_refused() {
    let pki = pki();
    let shutdown = CancellationToken::new();
    let c = spawn_coordinator(
        CoordinatorConfig {
            state: StateConfig {
                tls_ca: Some(pki.ca.clone()),
                ..StateConfig::default()
            },
            tls: Some(pki.server.clone()),
            ..CoordinatorConfig::default()
        },
        shutdown.clone(),
    )
    .await
    .unwrap();
    let url = c.url();
    assert!(url.starts_with("https://"), "{url}");
    let mut workers = Vec::new();
    for _ in 0..2 {
        let w = spawn_worker(
            WorkerConfig {
                coordinator: url.clone(),
                tls: Some(pki.server.clone()),
                tls_ca: Some(pki.ca.clone()),
                ..WorkerConfig::default()
            },
            Arc::new(CpuBackend::new()),
            shutdown.clone(),
        )
        .await
        .unwrap();
        workers.push(w);
    }

    // Without the CA, or in plain HTTP/2, the coordinator cannot be reached.
    let untrusted = endpoint(&url, None).unwrap().connect().await;
    assert!(untrusted.is_err(), "a client without the CA connected");
    let plain = url.replacen("https://", "http://", 1);
    let plain = JobServiceClient::connect(plain).await;
    if let Ok(mut c) = plain {
        assert!(c.list_workers(ListWorkersRequest {}).await.is_err());
    }

    let mut client = job_client_tls(&url, None, Some(&pki.ca)).await.unwrap();
    let deadline = Instant::now() + DEADLINE;
    while client
        .list_workers(ListWorkersRequest {})
        .await
        .unwrap()
        .into_inner()
        .workers
        .len()
        < 2
    {
        assert!(
            Instant::now() < deadline,
            "workers did not register over TLS"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let listed = client
        .list_workers(ListWorkersRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(
        listed
            .workers
            .iter()
            .all(|w| w.address.starts_with("https://")),
        "{listed:?}"
    );

    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let status = run_job_with(&mut client, &demo_spec(&out, 4)).await;
    assert!(succeeded(&status), "{status:?}");
    assert_eq!(read_assignments(&out).len(), 4338);

    shutdown.cancel();
    for w in workers {
        w.wait().await.unwrap();
    }
    c.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_with_a_certificate_of_another_ca_cannot_be_used() {
    let pki = pki();
    let shutdown = CancellationToken::new();
    let c = spawn_coordinator(
        CoordinatorConfig {
            state: StateConfig {
                tls_ca: Some(pki.ca.clone()),
                worker_wait: Duration::from_secs(5),
                ..StateConfig::default()
            },
            tls: Some(pki.server.clone()),
            ..CoordinatorConfig::default()
        },
        shutdown.clone(),
    )
    .await
    .unwrap();
    // It trusts the coordinator, but serves a certificate the coordinator does not
    // trust: it registers, and the job fails when the coordinator connects to it.
    let w = spawn_worker(
        WorkerConfig {
            coordinator: c.url(),
            tls: Some(pki.stranger.clone()),
            tls_ca: Some(pki.ca.clone()),
            ..WorkerConfig::default()
        },
        Arc::new(CpuBackend::new()),
        shutdown.clone(),
    )
    .await
    .unwrap();
    let mut client = job_client_tls(&c.url(), None, Some(&pki.ca)).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let status = run_job_with(&mut client, &demo_spec(&out, 2)).await;
    assert_eq!(status.state, JobState::Failed as i32, "{status:?}");
    assert!(
        status.error.contains("cannot connect to worker"),
        "{}",
        status.error
    );
    assert!(!out.join("_SUCCESS").exists());
    shutdown.cancel();
    let _ = w.wait().await;
    c.wait().await.unwrap();
}
