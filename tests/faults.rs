//! Faults of a standing cluster (a `shoal coordinator` and `shoal worker`
//! processes): a worker killed or frozen in any phase is replaced, and the job
//! writes the outputs an undisturbed run writes, byte for byte.

mod common;

use common::*;
use shoal_proto::pb::{GetJobRequest, JobState, JobStatus, ListWorkersRequest, SubmitJobRequest};
use shoal_spec::JobSpec;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Heartbeat timeout of the tests' coordinators (the default is 10 s).
const TIMEOUT_SECS: &str = "3";

/// A log in three CSV files (three splits, one per worker), planted groups.
fn write_log(dir: &Path) -> PathBuf {
    let input = dir.join("log");
    std::fs::create_dir_all(&input).unwrap();
    for seed in 1..=3u64 {
        write_planted_log(&input.join(format!("part-{seed}.csv")), 300, seed, 0);
    }
    input
}

/// The planted spec with ALS (checkpoints every 3 of 9 iterations) and
/// recommendations; k = 40 on 600 users, so that the Lloyd rounds run long
/// enough (dozens of rounds) to be interrupted.
fn spec(input: &Path, out: &Path) -> JobSpec {
    let mut spec = planted_spec(input, out, 40);
    spec.features.als = true;
    spec.als.factors = 8;
    spec.als.iterations = 9;
    spec.als.checkpoint_every = 3;
    spec.segments.max_iter = 300;
    spec.segments.tol = 0.0;
    spec.recommend.top_n = 5;
    spec
}

/// The reports: the job's figures with its id, timings and workers.
const REPORTS: [&str; 2] = ["report.json", "report.html"];

/// Every output file but the reports (which hold the job's id and timings) and
/// the manifest (which lists the reports), by path, with its bytes.
fn outputs(out: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut files = BTreeMap::new();
    let mut stack = vec![out.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            let rel = path.strip_prefix(out).unwrap().display().to_string();
            if !REPORTS.contains(&rel.as_str()) && rel != "_SUCCESS" {
                files.insert(rel, std::fs::read(&path).unwrap());
            }
        }
    }
    files
}

/// Asserts the two output folders hold the same files, byte for byte, and that
/// the manifest of `got` names every file in it (no file of an earlier attempt
/// is left beside them).
fn assert_same_outputs(got: &Path, want: &Path) {
    let mut listed: Vec<String> = read_manifest(got)
        .files
        .iter()
        .map(|f| f.path.clone())
        .filter(|p| !REPORTS.contains(&p.as_str()))
        .collect();
    listed.sort();
    let (got, want) = (outputs(got), outputs(want));
    assert_eq!(
        got.keys().cloned().collect::<Vec<_>>(),
        listed,
        "the files are the manifest's"
    );
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>(),
        "the same files"
    );
    for (path, bytes) in &want {
        assert!(
            got[path] == *bytes,
            "{path} differs from the undisturbed run's"
        );
    }
}

fn signal(p: &Proc, sig: &str) {
    let pid = p.0.id().to_string();
    let status = std::process::Command::new("kill")
        .args([sig, &pid])
        .status()
        .unwrap();
    assert!(status.success(), "kill {sig} {pid}");
}

/// Polls until exactly `n` workers are registered.
async fn wait_for_exactly(url: &str, n: usize) {
    let deadline = Instant::now() + DEADLINE;
    let mut c = job_client(url, None).await.unwrap();
    loop {
        let have = c
            .list_workers(ListWorkersRequest {})
            .await
            .unwrap()
            .into_inner()
            .workers
            .len();
        if have == n {
            return;
        }
        assert!(Instant::now() < deadline, "{have} workers, not {n}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// What a fault did to a job.
struct Disturbed {
    status: JobStatus,
    /// From the fault to the job's next attempt (None: it needed none).
    to_recovery: Option<Duration>,
}

/// Submits `spec`; once `at` holds for the job's status, `fault` runs (once);
/// then follows the job to its end.
async fn run_disturbed(
    url: &str,
    spec: &JobSpec,
    at: impl Fn(&JobStatus) -> bool,
    fault: impl FnOnce(),
) -> Disturbed {
    let mut c = job_client(url, None).await.unwrap();
    let id = c
        .submit_job(SubmitJobRequest {
            spec_toml: spec.to_toml(),
        })
        .await
        .unwrap()
        .into_inner()
        .job_id;
    let deadline = Instant::now() + DEADLINE;
    let mut fault = Some(fault);
    let mut faulted_at = None;
    let mut to_recovery = None;
    loop {
        let s = c
            .get_job(GetJobRequest { job_id: id.clone() })
            .await
            .unwrap()
            .into_inner();
        if fault.is_some() && at(&s) {
            (fault.take().unwrap())();
            faulted_at = Some(Instant::now());
        }
        if let Some(t) = faulted_at
            && to_recovery.is_none()
            && s.attempt > 1
        {
            to_recovery = Some(t.elapsed());
        }
        let done = [JobState::Succeeded, JobState::Failed, JobState::Cancelled]
            .iter()
            .any(|t| *t as i32 == s.state);
        if done {
            assert!(fault.is_none(), "the job ended before its fault: {s:?}");
            return Disturbed {
                status: s,
                to_recovery,
            };
        }
        assert!(Instant::now() < deadline, "job {id} did not finish: {s:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The job is in `phase` at `from_iteration` or later, or already past it (a
/// phase of a few milliseconds may be over before a poll sees it: the fault
/// then lands in the next one, which the printed recovery names).
fn in_phase(phase: &'static str, from_iteration: u32) -> impl Fn(&JobStatus) -> bool {
    const ORDER: [&str; 9] = [
        "ingest", "load", "als", "scale", "init", "lloyd", "finalize", "write", "done",
    ];
    let at = |p: &str| ORDER.iter().position(|q| *q == p);
    move |s| match (at(&s.phase), at(phase)) {
        (Some(now), Some(want)) => now > want || (now == want && s.iteration >= from_iteration),
        _ => false,
    }
}

/// A `shoal coordinator` (heartbeat timeout [`TIMEOUT_SECS`]) and `n` workers,
/// all registered; the log; and the outputs of an undisturbed run.
struct Bench {
    dir: tempfile::TempDir,
    input: PathBuf,
    url: String,
    workers: Vec<Proc>,
    reference: PathBuf,
    _coordinator: Proc,
}

async fn bench(n: usize) -> Bench {
    let dir = tempfile::tempdir().unwrap();
    let input = write_log(dir.path());
    let (coordinator, url) =
        coordinator_process_with(&[("SHOAL_WORKER_TIMEOUT_SECS", TIMEOUT_SECS)]);
    let workers: Vec<Proc> = (0..n).map(|_| worker_process(&url, &[])).collect();
    wait_for_exactly(&url, n).await;
    let reference = dir.path().join("undisturbed");
    let s = run_job(&url, &spec(&input, &reference)).await;
    assert!(succeeded(&s), "{s:?}");
    assert_eq!(s.attempt, 1);
    let lloyd = s.phases.iter().find(|p| p.phase == "lloyd").unwrap();
    println!(
        "undisturbed: {} Lloyd rounds in {} ms",
        s.iteration,
        lloyd.finished_unix_ms - lloyd.started_unix_ms
    );
    Bench {
        dir,
        input,
        url,
        workers,
        reference,
        _coordinator: coordinator,
    }
}

/// A worker SIGKILLed in each phase that works on the workers: the job goes on
/// on the others (and on the restarted worker, once it has registered), and
/// writes what an undisturbed run writes. The time from the kill to the next
/// attempt is printed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_worker_is_replaced_in_every_phase() {
    let mut b = bench(3).await;
    for (n, (phase, from)) in [
        ("ingest", 0),
        ("load", 0),
        ("als", 2),
        ("init", 0),
        ("lloyd", 1),
        ("finalize", 0),
        ("write", 0),
    ]
    .into_iter()
    .enumerate()
    {
        let out = b.dir.path().join(format!("killed-in-{phase}"));
        let victim = b.workers.remove(n % b.workers.len());
        let mut victim = Some(victim);
        let url2 = b.url.clone();
        let restarted = std::sync::Mutex::new(None);
        let got = run_disturbed(&b.url, &spec(&b.input, &out), in_phase(phase, from), || {
            let mut v = victim.take().unwrap();
            v.0.kill().unwrap();
            let _ = v.0.wait();
            // the killed worker's host starts it again
            *restarted.lock().unwrap() = Some(worker_process(&url2, &[]));
        })
        .await;
        b.workers.push(restarted.into_inner().unwrap().unwrap());
        assert!(
            succeeded(&got.status),
            "killed in {phase}: {:?}",
            got.status
        );
        println!(
            "killed in {phase}: attempt {}, kill to next attempt {:?}; {}",
            got.status.attempt, got.to_recovery, got.status.recovery
        );
        // The coordinator writes alone: a worker lost then costs nothing. Init and
        // finalize end with the coordinator's own work (a few milliseconds), where
        // a kill may land after the workers' last answer: no attempt is needed
        // then, and the outputs must still be the undisturbed run's.
        match phase {
            "write" => {}
            "init" | "finalize" if got.status.attempt == 1 => {
                println!("killed in {phase} after the workers' last answer");
            }
            _ => {
                assert!(got.status.attempt >= 2, "{phase}: {:?}", got.status);
                assert!(
                    got.to_recovery.unwrap() < Duration::from_secs(15),
                    "{phase}: {:?}",
                    got.to_recovery
                );
            }
        }
        assert_same_outputs(&out, &b.reference);
        wait_for_exactly(&b.url, 3).await;
    }
}

/// Two of three workers killed together during ALS: the job finishes on the one
/// left, with the outputs of an undisturbed run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_of_three_workers_killed_in_als() {
    let mut b = bench(3).await;
    let out = b.dir.path().join("two-killed");
    let mut victims: Vec<Proc> = b.workers.drain(..2).collect();
    let got = run_disturbed(&b.url, &spec(&b.input, &out), in_phase("als", 4), || {
        for v in &mut victims {
            v.0.kill().unwrap();
            let _ = v.0.wait();
        }
    })
    .await;
    assert!(succeeded(&got.status), "{:?}", got.status);
    assert!(got.status.attempt >= 2);
    assert_eq!(got.status.workers, 1, "{:?}", got.status);
    println!(
        "two killed in als: kill to next attempt {:?}; {}",
        got.to_recovery, got.status.recovery
    );
    assert_same_outputs(&out, &b.reference);
}

/// A worker frozen (SIGSTOP) in ALS, then one in Lloyd: each is dropped for its
/// missed heartbeats, its shards move to the others and to a worker started
/// meanwhile, and the job writes the outputs of an undisturbed run. Woken, the
/// frozen worker's late work is of a superseded attempt; it registers again and
/// the next job runs on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_worker_is_dropped_and_its_shards_move() {
    let b = bench(3).await;
    for (phase, from, frozen) in [("als", 2, &b.workers[0]), ("lloyd", 1, &b.workers[1])] {
        let out = b.dir.path().join(format!("frozen-in-{phase}"));
        // a worker started as the other freezes takes its place at the recovery
        let newcomer = std::sync::Mutex::new(None);
        let got = run_disturbed(&b.url, &spec(&b.input, &out), in_phase(phase, from), || {
            signal(frozen, "-STOP");
            *newcomer.lock().unwrap() = Some(worker_process(&b.url, &[]));
        })
        .await;
        signal(frozen, "-CONT");
        assert!(
            succeeded(&got.status),
            "frozen in {phase}: {:?}",
            got.status
        );
        assert!(got.status.attempt >= 2, "{:?}", got.status);
        assert!(
            got.status.recovery.contains("was lost in"),
            "{}",
            got.status.recovery
        );
        assert_eq!(
            got.status.workers, 3,
            "the newcomer joined: {:?}",
            got.status
        );
        println!(
            "frozen in {phase}: freeze to next attempt {:?} (heartbeat timeout {TIMEOUT_SECS} s); {}",
            got.to_recovery, got.status.recovery
        );
        assert!(got.to_recovery.unwrap() < Duration::from_secs(15));
        assert_same_outputs(&out, &b.reference);
        // Woken, it registers again; the newcomer leaves: three again.
        drop(newcomer.into_inner().unwrap());
        wait_for_exactly(&b.url, 3).await;
    }
    let out = b.dir.path().join("after");
    let s = run_job(&b.url, &spec(&b.input, &out)).await;
    assert!(succeeded(&s), "{s:?}");
    assert_eq!((s.attempt, s.workers), (1, 3));
    assert_same_outputs(&out, &b.reference);
}

/// With `cluster.max_attempts = 1` a lost worker still ends the job, naming the
/// step, the worker and its shards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attempts_are_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let input = write_log(dir.path());
    let (_coordinator, url) =
        coordinator_process_with(&[("SHOAL_WORKER_TIMEOUT_SECS", TIMEOUT_SECS)]);
    let _alive = worker_process(&url, &[]);
    let victim = worker_process(&url, &[]);
    wait_for_exactly(&url, 2).await;
    let out = dir.path().join("out");
    let mut spec = spec(&input, &out);
    spec.cluster.max_attempts = 1;
    let got = run_disturbed(&url, &spec, in_phase("lloyd", 1), || {
        signal(&victim, "-KILL")
    })
    .await;
    assert_eq!(
        got.status.state,
        JobState::Failed as i32,
        "{:?}",
        got.status
    );
    let error = &got.status.error;
    assert!(
        error.contains("lloyd round") && error.contains("cluster.max_attempts = 1"),
        "{error}"
    );
    assert!(
        error.contains("losing worker-") && error.contains("(shards "),
        "{error}"
    );
    assert!(!out.join("_SUCCESS").exists());
}

/// Submits `spec` through `url`; returns the job's id.
async fn submit(url: &str, spec: &JobSpec) -> String {
    let mut c = job_client(url, None).await.unwrap();
    c.submit_job(SubmitJobRequest {
        spec_toml: spec.to_toml(),
    })
    .await
    .unwrap()
    .into_inner()
    .job_id
}

/// Polls job `id` at `url` until `until` holds for its status.
async fn poll(url: &str, id: &str, until: impl Fn(&JobStatus) -> bool) -> JobStatus {
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Ok(mut c) = job_client(url, None).await
            && let Ok(s) = c
                .get_job(GetJobRequest {
                    job_id: id.to_string(),
                })
                .await
        {
            let s = s.into_inner();
            if until(&s) {
                return s;
            }
            assert!(Instant::now() < deadline, "job {id}: {s:?}");
        }
        assert!(Instant::now() < deadline, "job {id} cannot be asked for");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn finished(s: &JobStatus) -> bool {
    [JobState::Succeeded, JobState::Failed, JobState::Cancelled]
        .iter()
        .any(|t| *t as i32 == s.state)
}

/// The coordinator SIGKILLed while a job runs (mid-ALS, then mid-Lloyd) and
/// started again at its address with the same `--state` (a local folder, then a
/// prefix on the S3 test server): the running job resumes from its last
/// finished step (its status says from where) and writes the outputs of an
/// undisturbed run; the job queued behind it survives the restart and runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_coordinator_resumes_its_jobs() {
    let b = bench(2).await;
    let local = b.dir.path().join("state").display().to_string();
    for (phase, from, state) in [("als", 4, local), ("lloyd", 1, s3().url("state/"))] {
        let args = ["--state", state.as_str()];
        let env = [("SHOAL_WORKER_TIMEOUT_SECS", TIMEOUT_SECS)];
        let (mut coordinator, url) = coordinator_process_at("127.0.0.1:0", &args, &env);
        let _workers: Vec<Proc> = (0..2).map(|_| worker_process(&url, &[])).collect();
        wait_for_exactly(&url, 2).await;
        let out = b.dir.path().join(format!("restarted-in-{phase}"));
        let queued_out = b.dir.path().join(format!("queued-in-{phase}"));
        let running = submit(&url, &spec(&b.input, &out)).await;
        let queued = submit(&url, &spec(&b.input, &queued_out)).await;
        let at = poll(&url, &running, |s| in_phase(phase, from)(s) || finished(s)).await;
        assert!(!finished(&at), "the job ended before the restart: {at:?}");
        coordinator.0.kill().unwrap();
        let _ = coordinator.0.wait();
        let killed_at = Instant::now();
        // again at its address (the workers register there again by themselves)
        let listen = url.trim_start_matches("http://");
        let (_coordinator, url) = coordinator_process_at(listen, &args, &env);
        let status = poll(&url, &running, finished).await;
        assert!(succeeded(&status), "restarted in {phase}: {status:?}");
        assert!(
            status.recovery.contains("resumed") && status.attempt >= 2,
            "{status:?}"
        );
        println!(
            "coordinator killed in {} (iteration {}), restarted: the job ended {:?} later; {}",
            at.phase,
            at.iteration,
            killed_at.elapsed(),
            status.recovery
        );
        assert_same_outputs(&out, &b.reference);
        let last = poll(&url, &queued, finished).await;
        assert!(succeeded(&last), "the queued job: {last:?}");
        assert_eq!(last.attempt, 1, "{last:?}");
        assert_same_outputs(&queued_out, &b.reference);
    }
}

/// Resident memory of a process, from /proc (kB).
fn rss_kb(p: &Proc) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", p.0.id())).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// 50 jobs submitted at once to a coordinator with 2 workers: every one
/// succeeds, they run one at a time (`--max-running-jobs` 1) in the order they
/// were submitted, and the coordinator's memory afterwards is within twice what
/// it was before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_jobs_at_once_run_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("log.csv");
    write_planted_log(&input, 20, 5, 0);
    let (coordinator, url) = coordinator_process();
    let _workers: Vec<Proc> = (0..2).map(|_| worker_process(&url, &[])).collect();
    wait_for_exactly(&url, 2).await;
    let before = rss_kb(&coordinator);
    let specs: Vec<JobSpec> = (0..50)
        .map(|i| planted_spec(&input, &dir.path().join(format!("out-{i:02}")), 3))
        .collect();
    let ids = futures::future::join_all(specs.iter().map(|s| submit(&url, s))).await;
    let mut statuses = Vec::new();
    for id in &ids {
        statuses.push(poll(&url, id, finished).await);
    }
    for s in &statuses {
        assert!(succeeded(s), "{s:?}");
    }
    // submitted at once: their order is the one the coordinator took them in,
    // which their ids keep (UUID v7, monotonic)
    statuses.sort_by(|a, b| a.job_id.cmp(&b.job_id));
    for pair in statuses.windows(2) {
        assert!(
            pair[1].started_unix_ms >= pair[0].finished_unix_ms,
            "one at a time, first come first served: {} then {}",
            pair[0].job_id,
            pair[1].job_id
        );
    }
    let after = rss_kb(&coordinator);
    println!("coordinator RSS: {before} kB before 50 jobs, {after} kB after");
    assert!(after <= 2 * before, "{before} kB -> {after} kB");
}
