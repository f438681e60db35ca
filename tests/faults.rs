//! Faults of a standing cluster (a `shoal coordinator` and `shoal worker`
//! processes): a worker that stops answering does not leave a job waiting.

mod common;

use common::*;
use std::time::{Duration, Instant};

/// A worker frozen (SIGSTOP) while it holds a job's step is dropped for its
/// missed heartbeats, and the job ends with an error naming it and the step,
/// soon after; the frozen worker, woken, registers again and the next job runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_worker_ends_its_job_with_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let (_coordinator, url) = coordinator_process_with(&[("SHOAL_WORKER_TIMEOUT_SECS", "3")]);
    let _alive = worker_process(&url, &[]);
    let frozen = worker_process(&url, &[]);
    wait_for_workers(&url, 2).await;
    let input = dir.path().join("log.csv");
    write_planted_log(&input, 40, 3, 0);
    let spec = dir.path().join("job.toml");
    let out = dir.path().join("out");
    std::fs::write(&spec, planted_spec(&input, &out, 3).to_toml()).unwrap();
    let env = [("SHOAL_COORDINATOR", url.as_str())];

    let pid = frozen.0.id().to_string();
    let signal = |sig: &str| {
        let status = std::process::Command::new("kill")
            .args([sig, &pid])
            .status()
            .unwrap();
        assert!(status.success(), "kill {sig}");
    };
    signal("-STOP");
    let frozen_at = Instant::now();
    let ran = run_shoal(&["submit", spec.to_str().unwrap(), "--wait"], &env).await;
    let took = frozen_at.elapsed();
    signal("-CONT");
    assert_eq!(ran.code, Some(1), "{}", ran.text());
    assert!(
        ran.stderr.contains("was lost in ingest") && ran.stderr.contains("no heartbeat for 3s"),
        "{}",
        ran.text()
    );
    println!("frozen worker to failed job: {took:?} (heartbeat timeout 3 s)");
    assert!(took < Duration::from_secs(12), "{took:?}");
    assert!(!out.join("_SUCCESS").exists());

    // Woken, it registers again and takes part in the next job.
    wait_for_workers(&url, 2).await;
    let ran = run_shoal(&["submit", spec.to_str().unwrap(), "--wait"], &env).await;
    assert_eq!(ran.code, Some(0), "{}", ran.text());
    assert!(out.join("_SUCCESS").exists());
}
