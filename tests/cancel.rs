//! Cancelling jobs on a real cluster (coordinator and workers in this process, on
//! loopback gRPC): a running job stops on every worker within seconds, ends
//! Cancelled with its staging removed and no `_SUCCESS`; a queued job cancelled
//! before it starts never runs.

mod common;

use common::*;
use shoal_proto::pb::worker_service_client::WorkerServiceClient;
use shoal_proto::pb::{
    GetJobRequest, JobActivity, JobActivityRequest, JobState, JobStatus, ListWorkersRequest,
    SubmitJobRequest,
};
use std::path::Path;
use std::time::{Duration, Instant};

/// How long a cancelled job may take to end (the coordinator releases it on every
/// worker, the workers stop between row batches).
const STOP_WITHIN: Duration = Duration::from_secs(5);

async fn submit(url: &str, spec: &shoal_spec::JobSpec) -> String {
    job_client(url, None)
        .await
        .unwrap()
        .submit_job(SubmitJobRequest {
            spec_toml: spec.to_toml(),
        })
        .await
        .expect("submit")
        .into_inner()
        .job_id
}

async fn status(url: &str, job: &str) -> JobStatus {
    job_client(url, None)
        .await
        .unwrap()
        .get_job(GetJobRequest {
            job_id: job.to_string(),
        })
        .await
        .expect("get")
        .into_inner()
}

async fn cancel(url: &str, job: &str) -> JobStatus {
    job_client(url, None)
        .await
        .unwrap()
        .cancel_job(GetJobRequest {
            job_id: job.to_string(),
        })
        .await
        .expect("cancel")
        .into_inner()
}

/// Polls the job until `done` holds for its status (or fails the test at `limit`).
async fn poll(
    url: &str,
    job: &str,
    limit: Duration,
    done: impl Fn(&JobStatus) -> bool,
) -> JobStatus {
    let deadline = Instant::now() + limit;
    loop {
        let s = status(url, job).await;
        if done(&s) {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "job {job} not there in time: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// What every worker of the cluster reports about `job`, in worker order.
async fn activity(url: &str, job: &str) -> Vec<JobActivity> {
    let workers = job_client(url, None)
        .await
        .unwrap()
        .list_workers(ListWorkersRequest {})
        .await
        .unwrap()
        .into_inner()
        .workers;
    let mut out = Vec::new();
    for w in workers {
        let mut c = WorkerServiceClient::connect(w.address.clone())
            .await
            .unwrap();
        out.push(
            c.get_job_activity(JobActivityRequest {
                job_id: job.to_string(),
            })
            .await
            .unwrap()
            .into_inner(),
        );
    }
    out
}

/// Files below `dir` (recursively), relative to it.
fn files_below(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.map(Result::unwrap) {
            if e.file_type().unwrap().is_dir() {
                todo.push(e.path());
            } else {
                out.push(e.path().strip_prefix(dir).unwrap().display().to_string());
            }
        }
    }
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_stops_a_running_job_on_every_worker_and_a_queued_job_never_runs() {
    let dir = tempfile::tempdir().unwrap();
    // Four CSV files (one split each, two per worker) of ~0.9 M rows each.
    let input = dir.path().join("in");
    std::fs::create_dir_all(&input).unwrap();
    let mut total_rows = 0;
    for part in 0..4 {
        total_rows += write_repeated_log(&input.join(format!("part-{part}.csv")), 300, part, 40);
    }
    let small = dir.path().join("small.csv");
    write_planted_log(&small, 30, 3, 0);

    // The default coordinator runs one job at a time: the second job queues.
    let cluster = Cluster::start(2).await;
    let out_big = dir.path().join("out-big");
    let out_queued = dir.path().join("out-queued");
    let big = submit(&cluster.url, &planted_spec(&input, &out_big, 4)).await;
    let queued = submit(&cluster.url, &planted_spec(&small, &out_queued, 3)).await;
    assert_eq!(
        status(&cluster.url, &queued).await.state,
        JobState::Queued as i32
    );

    // Wait until the workers are reading rows of the big job.
    let running = poll(&cluster.url, &big, DEADLINE, |s| {
        s.phase == "ingest" && s.rows_read > 0
    })
    .await;
    assert_eq!(running.state, JobState::Running as i32, "{running:?}");
    assert!(
        running.bytes_total > 0 && running.bytes_read > 0,
        "{running:?}"
    );
    assert!(
        running.phase_progress > 0.0 && running.phase_progress < 1.0,
        "{running:?}"
    );

    // ... both of them.
    let deadline = Instant::now() + DEADLINE;
    loop {
        let reading = activity(&cluster.url, &big).await;
        if reading
            .iter()
            .all(|a| a.rows_read > 0 && a.tasks_running > 0)
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "a worker does not ingest: {reading:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The queued job, cancelled before it starts, ends at once.
    let q = cancel(&cluster.url, &queued).await;
    assert_eq!(q.state, JobState::Cancelled as i32, "{q:?}");
    assert!(q.error.contains("before it started"), "{q:?}");

    // The running job: cancelled while its workers ingest.
    let asked = Instant::now();
    let c = cancel(&cluster.url, &big).await;
    assert!(c.cancel_requested, "{c:?}");
    let done = poll(&cluster.url, &big, STOP_WITHIN, |s| {
        s.state != JobState::Running as i32
    })
    .await;
    let stopped_after = asked.elapsed();
    assert_eq!(done.state, JobState::Cancelled as i32, "{done:?}");
    assert!(
        done.error
            .contains("cancelled by an operator during ingest"),
        "{done:?}"
    );
    assert!(done.finished_unix_ms > 0);
    let last = done.phases.last().expect("phases");
    assert_eq!(last.phase, "ingest");
    assert!(last.finished_unix_ms > 0, "{done:?}");

    // Every worker released the job and has no task of it left; the rows they read
    // stop growing, short of the whole input.
    let released = activity(&cluster.url, &big).await;
    assert_eq!(released.len(), 2);
    for a in &released {
        assert!(a.released, "{released:?}");
        assert_eq!(a.tasks_running, 0, "{released:?}");
        assert!(
            a.rows_read > 0,
            "each worker had started reading: {released:?}"
        );
        assert!(!a.holds_shards, "{released:?}");
    }
    let rows_at_stop: u64 = released.iter().map(|a| a.rows_read).sum();
    assert!(
        rows_at_stop < total_rows,
        "ingest stopped early: {rows_at_stop} of {total_rows} rows read"
    );
    let watch_until = Instant::now() + Duration::from_secs(1);
    while Instant::now() < watch_until {
        let later: u64 = activity(&cluster.url, &big)
            .await
            .iter()
            .map(|a| a.rows_read)
            .sum();
        assert_eq!(
            later, rows_at_stop,
            "a worker kept reading after the release"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "cancel: job ended {} ms after CancelJob; workers had read {rows_at_stop} of {total_rows} rows",
        stopped_after.as_millis()
    );

    // No _SUCCESS, no staging left (not even written late by a stopped task).
    assert!(!out_big.join("_SUCCESS").exists());
    assert!(
        files_below(&out_big.join("_staging")).is_empty(),
        "staging left: {:?}",
        files_below(&out_big.join("_staging"))
    );

    // The queued job never ran: no phase, no start, no output, no worker saw it.
    let q = status(&cluster.url, &queued).await;
    assert_eq!(q.state, JobState::Cancelled as i32, "{q:?}");
    assert!(q.phases.is_empty() && q.started_unix_ms == 0, "{q:?}");
    assert!(
        !out_queued.exists(),
        "the cancelled queued job wrote output"
    );
    for a in activity(&cluster.url, &queued).await {
        assert_eq!(a, JobActivity::default(), "a worker saw the queued job");
    }

    // The cluster goes on: the next job runs and succeeds.
    let after = run_job(
        &cluster.url,
        &planted_spec(&small, &dir.path().join("out-after"), 3),
    )
    .await;
    assert!(succeeded(&after), "{after:?}");
    cluster.stop().await;
}
