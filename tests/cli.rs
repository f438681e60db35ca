//! The operators' CLI against real processes: `shoal coordinator` with the
//! operators' and workers' tokens, two `shoal worker` processes, and the `shoal`
//! commands an operator types (submit --wait, watch, jobs, status, cancel), with
//! their output and exit codes. Every process is killed when the test ends, also
//! when it fails.

mod common;

use common::*;
use shoal_proto::pb::{GetJobRequest, JobState};
use std::time::{Duration, Instant};

const OPERATORS: &str = "operators-5d1e";
const WORKERS: &str = "workers-8a2f";
const PHASES: [&str; 8] = [
    "plan", "ingest", "load", "scale", "init", "lloyd", "finalize", "write",
];

/// The line of `table` that mentions `job`.
fn row<'a>(table: &'a str, job: &str) -> &'a str {
    table
        .lines()
        .find(|l| l.starts_with(job))
        .unwrap_or_else(|| panic!("no row for {job} in\n{table}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_submit_watch_list_and_cancel_jobs_with_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let (_coordinator, url) =
        coordinator_process_with(&[("SHOAL_TOKEN", OPERATORS), ("SHOAL_WORKER_TOKEN", WORKERS)]);
    let _workers: Vec<Proc> = (0..2)
        .map(|_| worker_process(&url, &[("SHOAL_TOKEN", WORKERS)]))
        .collect();
    wait_for_workers_with_token(&url, 2, Some(OPERATORS)).await;
    let env = [
        ("SHOAL_COORDINATOR", url.as_str()),
        ("SHOAL_TOKEN", OPERATORS),
    ];

    // submit --wait: the job id, a line per phase as it ends, the segment table.
    let input = dir.path().join("log.csv");
    write_planted_log(&input, 150, 5, 0);
    let spec = dir.path().join("job.toml");
    std::fs::write(
        &spec,
        planted_spec(&input, &dir.path().join("out"), 4).to_toml(),
    )
    .unwrap();
    let submitted = run_shoal(&["submit", spec.to_str().unwrap(), "--wait"], &env).await;
    assert_eq!(submitted.code, Some(0), "{}", submitted.text());
    let job = submitted.stdout.lines().next().unwrap().trim().to_string();
    assert!(job.starts_with("job-"), "{}", submitted.text());
    for phase in PHASES {
        assert!(
            submitted.stdout.contains(&format!("{phase:<9} done · ")),
            "{phase}: {}",
            submitted.text()
        );
    }
    assert!(
        submitted.stdout.contains("median recency"),
        "{}",
        submitted.text()
    );

    // watch of the finished job: its phases with their timings, exit 0.
    let watched = run_shoal(&["watch", &job], &env).await;
    assert_eq!(watched.code, Some(0), "{}", watched.text());
    for phase in PHASES {
        assert!(
            watched.stdout.contains(&format!("{phase:<9} done · ")),
            "{phase}: {}",
            watched.text()
        );
    }
    assert!(
        watched.stdout.contains("ingest    done · ")
            && watched.stdout.contains(" rows")
            && watched.stdout.contains(" iterations · inertia "),
        "{}",
        watched.text()
    );
    assert!(
        watched
            .stdout
            .contains(&format!("job {job} (planted): succeeded")),
        "{}",
        watched.text()
    );

    // status: state, phases, output
    let status = run_shoal(&["status", &job], &env).await;
    assert_eq!(status.code, Some(0), "{}", status.text());
    assert!(
        status.stdout.contains("succeeded") && status.stdout.contains("  lloyd"),
        "{}",
        status.text()
    );

    // cancel of a finished job: nothing to do, said so, exit 0.
    let cancelled = run_shoal(&["cancel", &job], &env).await;
    assert_eq!(cancelled.code, Some(0), "{}", cancelled.text());
    assert!(
        cancelled
            .stdout
            .contains(&format!("job {job} had already finished: succeeded")),
        "{}",
        cancelled.text()
    );

    // A job that fails (a user column the input does not have): watch prints the
    // error and exits 1.
    let mut bad = planted_spec(&input, &dir.path().join("out-bad"), 4);
    bad.input.columns.user = "CustomerID".into();
    let bad_spec = dir.path().join("bad.toml");
    std::fs::write(&bad_spec, bad.to_toml()).unwrap();
    let submitted = run_shoal(&["submit", bad_spec.to_str().unwrap()], &env).await;
    assert_eq!(submitted.code, Some(0), "{}", submitted.text());
    let bad_job = submitted.stdout.trim().to_string();
    let watched = run_shoal(&["watch", &bad_job], &env).await;
    assert_eq!(watched.code, Some(1), "{}", watched.text());
    assert!(
        watched.stderr.contains(&format!("job {bad_job} failed"))
            && watched.stderr.contains("`CustomerID`")
            && watched.stderr.contains("columns are"),
        "{}",
        watched.text()
    );
    assert!(
        watched.stdout.contains("ingest    stopped · "),
        "{}",
        watched.text()
    );
    assert!(!dir.path().join("out-bad/_SUCCESS").exists());

    // jobs: both, with state, phase and the error of the failed one.
    let jobs = run_shoal(&["jobs"], &env).await;
    assert_eq!(jobs.code, Some(0), "{}", jobs.text());
    assert!(
        jobs.stdout.starts_with("JOB ") && jobs.stdout.contains("SUBMITTED (UTC)"),
        "{}",
        jobs.text()
    );
    let ok_row = row(&jobs.stdout, &job);
    assert!(
        ok_row.contains("planted") && ok_row.contains("succeeded") && ok_row.contains("done"),
        "{ok_row}"
    );
    let bad_row = row(&jobs.stdout, &bad_job);
    assert!(
        bad_row.contains("failed") && bad_row.contains("ingest") && bad_row.contains("CustomerID"),
        "{bad_row}"
    );

    // A running job, cancelled with the CLI while its workers ingest: `cancel`
    // exits 0 once it stopped, the watch that followed it exits 3 with the reason.
    let big = dir.path().join("big.csv");
    let big_rows = write_repeated_log(&big, 300, 9, 120);
    let big_spec = dir.path().join("big.toml");
    let big_out = dir.path().join("out-big");
    std::fs::write(&big_spec, planted_spec(&big, &big_out, 4).to_toml()).unwrap();
    let submitted = run_shoal(&["submit", big_spec.to_str().unwrap()], &env).await;
    assert_eq!(submitted.code, Some(0), "{}", submitted.text());
    let big_job = submitted.stdout.trim().to_string();
    let watch = tokio::spawn({
        let (job, env) = (big_job.clone(), env.map(|(k, v)| (k, v.to_string())));
        async move {
            let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
            run_shoal(&["watch", &job], &env).await
        }
    });
    let mut client = job_client(&url, Some(OPERATORS)).await.unwrap();
    let deadline = Instant::now() + DEADLINE;
    loop {
        let s = client
            .get_job(GetJobRequest {
                job_id: big_job.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(s.state, JobState::Running as i32, "{s:?}");
        if s.phase == "ingest" && s.rows_read > 0 {
            assert!(s.rows_read < big_rows, "{s:?}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the big job did not start: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let cancelled = run_shoal(&["cancel", &big_job], &env).await;
    assert_eq!(cancelled.code, Some(0), "{}", cancelled.text());
    assert!(
        cancelled.stdout.contains(&format!(
            "job {big_job} cancelled (cancelled by an operator during ingest)"
        )),
        "{}",
        cancelled.text()
    );
    let watched = watch.await.unwrap();
    assert_eq!(watched.code, Some(3), "{}", watched.text());
    assert!(
        watched.stderr.contains(&format!(
            "job {big_job} cancelled: cancelled by an operator"
        )),
        "{}",
        watched.text()
    );
    assert!(!big_out.join("_SUCCESS").exists());
    assert!(!big_out.join("_staging").join(&big_job).exists());

    // Without the operators' token the coordinator refuses, naming SHOAL_TOKEN;
    // the flags work as well as the variables.
    let refused = run_shoal(&["jobs"], &[("SHOAL_COORDINATOR", url.as_str())]).await;
    assert_eq!(refused.code, Some(1), "{}", refused.text());
    assert!(refused.stderr.contains("SHOAL_TOKEN"), "{}", refused.text());
    let by_flags = run_shoal(&["jobs", "--coordinator", &url, "--token", OPERATORS], &[]).await;
    assert_eq!(by_flags.code, Some(0), "{}", by_flags.text());
    assert!(by_flags.stdout.contains(&big_job), "{}", by_flags.text());
    let unknown = run_shoal(&["watch", "job-0000"], &env).await;
    assert_eq!(unknown.code, Some(1), "{}", unknown.text());
    assert!(
        unknown.stderr.contains("no job job-0000"),
        "{}",
        unknown.text()
    );
}

/// `shoal demo` from any folder finds the bundled log and writes under that
/// folder, naming where.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_writes_its_output_under_the_current_folder() {
    let dir = tempfile::tempdir().unwrap();
    let ran = run_shoal_in(
        Some(dir.path()),
        &["demo", "--workers", "1", "--device", "cpu"],
        &[],
    )
    .await;
    assert_eq!(ran.code, Some(0), "{}", ran.text());
    let out = dir.path().join("out/online-retail");
    let manifest = read_manifest(&out);
    assert!(!manifest.files.is_empty(), "{}", ran.text());
    assert!(
        ran.stdout
            .contains(&format!("outputs in file://{}", out.display())),
        "{}",
        ran.text()
    );
    assert_eq!(read_report(&out)["rows"]["read"], 541_909);
}
