//! Whole-system tests: real coordinator and workers on loopback gRPC ports, real
//! files through object_store, real Parquet outputs.

mod common;

use common::*;
use std::path::Path;
use std::time::Instant;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_data_gives_identical_assignments_with_1_and_3_workers() {
    let dir = tempfile::tempdir().unwrap();
    let mut results = Vec::new();
    for workers in [1usize, 3] {
        let out = dir.path().join(format!("w{workers}"));
        let cluster = Cluster::start(workers).await;
        let status = run_job(&cluster.url, &demo_spec(&out, 8)).await;
        assert!(succeeded(&status), "{workers} workers: {status:?}");
        cluster.stop().await;
        let report = read_report(&out);
        assert_eq!(report["workers"], workers as u64);
        assert_eq!(report["rows"]["read"], 541_909);
        assert_eq!(report["rows"]["kept"], 397_884);
        assert_eq!(report["users"], 4_338);
        let factors = (
            read_factors(&out, "user_factors.parquet", "user_id"),
            read_factors(&out, "item_factors.parquet", "item_id"),
        );
        results.push((read_assignments(&out), report, factors));
    }
    let (one, r1, f1) = &results[0];
    let (three, r3, f3) = &results[1];
    // ALS: the same factors bit for bit (reductions run in shard order), every
    // user and every item of the log.
    assert_eq!(f1.0.len(), 4_338);
    assert_eq!(f1.1.len(), r1["als"]["items"].as_u64().unwrap() as usize);
    assert!(f1.1.len() > 3_000, "{} items", f1.1.len());
    assert!(f1 == f3, "ALS factors differ between 1 and 3 workers");
    assert_eq!(
        r1["als"]["loss_per_iteration"],
        r3["als"]["loss_per_iteration"]
    );
    assert_eq!(one.len(), 4_338);
    assert_eq!(
        segments_of(one),
        segments_of(three),
        "assignments differ between 1 and 3 workers"
    );
    assert_eq!(one, three, "distances and RFM must match bit for bit");
    assert_eq!(
        r1["kmeans"]["inertia_per_iteration"],
        r3["kmeans"]["inertia_per_iteration"]
    );
    // every segment is used and sizes add up
    let sizes: Vec<u64> = r1["segments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["size"].as_u64().unwrap())
        .collect();
    assert_eq!(sizes.len(), 6);
    assert!(sizes.iter().all(|s| *s > 0), "{sizes:?}");
    assert_eq!(sizes.iter().sum::<u64>(), 4_338);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_outputs_have_a_manifest_listing_every_file_with_rows() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let cluster = Cluster::start(2).await;
    let status = run_job(&cluster.url, &demo_spec(&out, 8)).await;
    assert!(succeeded(&status), "{status:?}");
    cluster.stop().await;
    let manifest = read_manifest(&out);
    let assignments = read_assignments(&out);
    let parts: u64 = manifest
        .files
        .iter()
        .filter(|f| f.path.starts_with("assignments.parquet/"))
        .map(|f| f.rows)
        .sum();
    assert_eq!(parts, assignments.len() as u64);
    for name in [
        "segments.parquet",
        "segment_items.parquet",
        "centroids.parquet",
        "report.json",
        "report.html",
    ] {
        assert!(
            manifest.files.iter().any(|f| f.path == name),
            "manifest lacks {name}"
        );
    }
    let rows_of = |prefix: &str| -> u64 {
        manifest
            .files
            .iter()
            .filter(|f| f.path.starts_with(prefix))
            .map(|f| f.rows)
            .sum()
    };
    assert_eq!(rows_of("user_factors.parquet/"), 4_338);
    assert_eq!(
        rows_of("item_factors.parquet/"),
        read_factors(&out, "item_factors.parquet", "item_id").len() as u64
    );
    // ten recommendations for every user (the catalogue is far larger than what
    // anyone bought)
    assert_eq!(rows_of("recommendations.parquet/"), 43_380);
    assert_eq!(rows_of("segment_items.parquet"), 60);
    let seg = manifest
        .files
        .iter()
        .find(|f| f.path == "segments.parquet")
        .unwrap();
    assert_eq!(seg.rows, 6);
    for f in &manifest.files {
        let len = std::fs::metadata(out.join(&f.path)).unwrap().len();
        assert_eq!(len, f.bytes, "{} size", f.path);
    }
    assert_eq!(manifest.input.len(), 1);
    assert_eq!(manifest.spec.segments.k.fixed(), Some(6));
    assert!(!out.join("_staging").exists(), "staging is cleaned up");

    // The report's figures are consistent with the assignments: inertia is the sum of
    // squared distances, and recency is measured from the last event of the log.
    let report = read_report(&out);
    let inertia: f64 = assignments
        .values()
        .map(|a| f64::from(a.distance).powi(2))
        .sum();
    let reported = report["kmeans"]["inertia"].as_f64().unwrap();
    assert!(
        (inertia - reported).abs() <= 1e-4 * reported,
        "{inertia} vs {reported}"
    );
    assert_eq!(report["reference_time"], "2011-12-09T12:50:00.000Z");
    assert!(assignments.values().any(|a| a.recency_days == 0.0));
    // Hand check of one well-known customer (UCI Online Retail, CustomerID 12346:
    // one order of 74,215 units at 1.04 on 2011-01-18 10:01, then cancelled; the
    // cancellation is dropped, so monetary = 77,183.60 and frequency = 1).
    let c = &assignments["12346.0"];
    assert_eq!(c.frequency, 1);
    assert!((c.monetary - 77_183.6).abs() < 1e-6, "{}", c.monetary);
    let expected_recency = (1_323_435_000_000f64 - 1_295_344_860_000f64) / 86_400_000.0;
    assert!(
        (c.recency_days - expected_recency).abs() < 1e-9,
        "{}",
        c.recency_days
    );
    let q = &report["quality"];
    assert_eq!(q["silhouette_sample"], 4_338);
    let s = q["silhouette"].as_f64().unwrap();
    // RFM + 32 ALS factors: segments overlap more than on RFM alone, but users
    // are still clearly closer to their own segment than to the next one.
    assert!(s > 0.05 && s < 1.0, "silhouette {s}");
    assert!(q["davies_bouldin"].as_f64().unwrap() > 0.0);
    assert!(q["calinski_harabasz"].as_f64().unwrap() > 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn planted_customer_groups_are_recovered() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("log.csv");
    let truth = write_planted_log(&input, 400, 11, 25);
    let out = dir.path().join("out");
    let cluster = Cluster::start(2).await;
    let status = run_job(&cluster.url, &planted_spec(&input, &out, 4)).await;
    assert!(succeeded(&status), "{status:?}");
    cluster.stop().await;
    let got = read_assignments(&out);
    assert_eq!(got.len(), truth.len());
    let (a, b): (Vec<usize>, Vec<usize>) = got
        .iter()
        .map(|(u, r)| (truth[u], r.segment as usize))
        .unzip();
    let ari = adjusted_rand_index(&a, &b);
    assert!(ari >= 0.95, "adjusted Rand index {ari}");
    let report = read_report(&out);
    assert_eq!(
        report["rows"]["dropped"]["bad_price"], 25,
        "{}",
        report["rows"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_worker_processes_started_by_hand() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("log.csv");
    write_planted_log(&input, 150, 5, 0);
    let (_coordinator, url) = coordinator_process();
    let _workers: Vec<Proc> = (0..3).map(|_| worker_process(&url, &[])).collect();
    wait_for_workers(&url, 3).await;

    let out = dir.path().join("out");
    let spec_path = dir.path().join("job.toml");
    std::fs::write(&spec_path, planted_spec(&input, &out, 4).to_toml()).unwrap();
    let submitted = run_shoal(
        &[
            "submit",
            spec_path.to_str().unwrap(),
            "--coordinator",
            &url,
            "--wait",
        ],
        &[],
    )
    .await;
    assert_eq!(
        submitted.code,
        Some(0),
        "submit --wait: {}",
        submitted.text()
    );
    assert!(
        submitted.stdout.contains("median recency"),
        "prints the segment table: {}",
        submitted.text()
    );
    assert_eq!(read_report(&out)["workers"], 3);
    let by_processes = read_assignments(&out);

    // The same job in one in-process worker gives the same assignments.
    let out1 = dir.path().join("out1");
    let cluster = Cluster::start(1).await;
    let status = run_job(&cluster.url, &planted_spec(&input, &out1, 4)).await;
    assert!(succeeded(&status), "{status:?}");
    cluster.stop().await;
    assert_eq!(
        segments_of(&by_processes),
        segments_of(&read_assignments(&out1))
    );
}

async fn failing(spec: &shoal_spec::JobSpec, cluster: &Cluster) -> String {
    let status = run_job(&cluster.url, spec).await;
    assert!(!succeeded(&status), "job should fail: {status:?}");
    assert!(
        !Path::new(&spec.output.path).join("_SUCCESS").exists(),
        "a failed job leaves no _SUCCESS"
    );
    status.error
}

/// Workers with too little memory for a job's shards: the job is refused before
/// anything is loaded, the message naming what it needs and what they have.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_that_does_not_fit_the_workers_memory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = Cluster::start_with(2, Some(48 << 20)).await;
    let spec = demo_spec(&dir.path().join("out"), 8);
    let err = failing(&spec, &cluster).await;
    assert!(
        err.contains("needs about")
            && err.contains("users")
            && err.contains("worker-1 0.05 GiB, worker-2 0.05 GiB")
            && err.contains("--memory-limit"),
        "{err}"
    );
    cluster.stop().await;
    // with enough memory the same job runs
    let cluster = Cluster::start_with(2, Some(2 << 30)).await;
    let status = run_job(&cluster.url, &spec).await;
    assert!(succeeded(&status), "{status:?}");
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_fails_with_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = Cluster::start(2).await;
    let log = dir.path().join("log.csv");
    write_planted_log(&log, 20, 3, 2);

    // a missing column is named, with the columns present
    let mut spec = planted_spec(&log, &dir.path().join("o1"), 3);
    spec.input.columns.user = "CustomerID".into();
    let err = failing(&spec, &cluster).await;
    assert!(
        err.contains("CustomerID") && err.contains("customer") && err.contains("unit_price"),
        "{err}"
    );

    // on_bad_rows = "fail" names the file and the row
    let mut spec = planted_spec(&log, &dir.path().join("o2"), 3);
    spec.input.clean.on_bad_rows = shoal_spec::spec::OnBadRows::Fail;
    let err = failing(&spec, &cluster).await;
    assert!(
        err.contains("log.csv") && err.contains("row ") && err.contains("not-a-price"),
        "{err}"
    );

    // empty input: a header and no rows
    let empty = dir.path().join("empty.csv");
    std::fs::write(&empty, "order_id,customer,ts,sku,qty,unit_price\n").unwrap();
    let err = failing(&planted_spec(&empty, &dir.path().join("o3"), 3), &cluster).await;
    assert!(err.contains("no data rows"), "{err}");

    // k larger than the number of users
    let err = failing(&planted_spec(&log, &dir.path().join("o4"), 500), &cluster).await;
    assert!(
        err.contains("segments.k = 500") && err.contains("80 users"),
        "{err}"
    );

    // an output path that is a file
    let file = dir.path().join("not-a-folder");
    std::fs::write(&file, "x").unwrap();
    let err = failing(&planted_spec(&log, &file, 3), &cluster).await;
    assert!(err.contains("is a file"), "{err}");

    // a job that needs CUDA on CPU workers (the test cluster's workers run the CPU backend)
    let mut spec = planted_spec(&log, &dir.path().join("o6"), 3);
    spec.cluster.device = shoal_spec::spec::Device::Cuda;
    let err = failing(&spec, &cluster).await;
    assert!(
        err.contains("cluster.device = \"cuda\"") && err.contains("runs on cpu"),
        "{err}"
    );

    // no input at all
    let err = failing(
        &planted_spec(&dir.path().join("missing/*.csv"), &dir.path().join("o5"), 3),
        &cluster,
    )
    .await;
    assert!(err.contains("no input objects"), "{err}");

    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rerun_replaces_the_previous_outputs() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log.csv");
    write_planted_log(&log, 30, 9, 0);
    let out = dir.path().join("out");
    let cluster = Cluster::start(1).await;
    let mut spec = planted_spec(&log, &out, 3);
    spec.cluster.shards = 12;
    assert!(succeeded(&run_job(&cluster.url, &spec).await));
    spec.cluster.shards = 2;
    let started = Instant::now();
    assert!(succeeded(&run_job(&cluster.url, &spec).await));
    assert!(started.elapsed() < DEADLINE);
    cluster.stop().await;
    let parts = std::fs::read_dir(out.join("assignments.parquet"))
        .unwrap()
        .count();
    assert_eq!(parts, 2, "parts of the earlier 12-shard run are gone");
    assert_eq!(read_assignments(&out).len(), 120);
    assert_eq!(
        read_manifest(&out)
            .files
            .iter()
            .filter(|f| f.path.starts_with("assignments"))
            .count(),
        2
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parquet_input_segments_like_the_same_csv() {
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("log.csv");
    write_planted_log(&csv, 100, 21, 0);
    let pq_dir = dir.path().join("pq");
    std::fs::create_dir_all(&pq_dir).unwrap();
    csv_to_parquet(&csv, &pq_dir.join("part-0.parquet"));
    let cluster = Cluster::start(2).await;
    let from_csv = dir.path().join("out-csv");
    let from_pq = dir.path().join("out-pq");
    assert!(succeeded(
        &run_job(&cluster.url, &planted_spec(&csv, &from_csv, 4)).await
    ));
    // a folder of Parquet files, format from the extension
    let status = run_job(&cluster.url, &planted_spec(&pq_dir, &from_pq, 4)).await;
    assert!(succeeded(&status), "{status:?}");
    cluster.stop().await;
    let a = read_assignments(&from_csv);
    let b = read_assignments(&from_pq);
    assert_eq!(a.len(), 400);
    assert_eq!(segments_of(&a), segments_of(&b));
    for (user, x) in &a {
        let y = &b[user];
        assert_eq!(x.frequency, y.frequency, "{user}");
        assert!(
            (x.monetary - y.monetary).abs() <= 1e-9 * x.monetary.abs(),
            "{user}"
        );
        assert_eq!(x.recency_days, y.recency_days, "{user}");
    }
    assert_eq!(
        read_report(&from_pq)["rows"]["read"],
        read_report(&from_csv)["rows"]["read"]
    );
}
